//! llama.cpp's tokenizer test vectors (`ggml-vocab-*.gguf.inp/.out`), from the GGUF vocabularies
//! and from the original HF-format files, and the SmolLM2 chat template against transformers.

use crate::common;

use slm::io::gguf::GgufFile;
use slm::tokenize::{Message, Tokenizer};

use common::check_vectors as check_all;

fn gguf_tokenizer(name: &str) -> Tokenizer {
    let p = common::assets().join("tokenizers/vectors").join(name);
    Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap()
}

#[test]
fn gpt2_from_gguf() {
    check_all(
        "ggml-vocab-gpt-2.gguf",
        &gguf_tokenizer("ggml-vocab-gpt-2.gguf"),
    );
}

#[test]
fn llama_spm_from_gguf() {
    check_all(
        "ggml-vocab-llama-spm.gguf",
        &gguf_tokenizer("ggml-vocab-llama-spm.gguf"),
    );
}

#[test]
fn bert_bge_from_gguf() {
    check_all(
        "ggml-vocab-bert-bge.gguf",
        &gguf_tokenizer("ggml-vocab-bert-bge.gguf"),
    );
}

#[test]
fn gpt2_from_encoder_json_and_vocab_bpe() {
    let dir = common::assets().join("tokenizers/gpt2");
    let tok = Tokenizer::from_hf_folder(&dir).unwrap();
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15496, 995]);
    // As transformers' GPT2TokenizerFast: the end-of-text marker is one special token.
    assert_eq!(
        tok.encode("a<|endoftext|>b", false).unwrap(),
        vec![64, 50256, 65]
    );
    check_all("ggml-vocab-gpt-2.gguf", &tok);
}

#[test]
fn llama2_from_tokenizer_model() {
    let p = common::assets().join("tokenizers/llama2-spm/tokenizer.model");
    let tok = Tokenizer::from_spm_file(&p).unwrap();
    check_all("ggml-vocab-llama-spm.gguf", &tok);
    // With special tokens, SentencePiece models start with BOS.
    let tok = Tokenizer::from_hf_folder(p.parent().unwrap()).unwrap();
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);
}

#[test]
fn bert_bge_from_minilm_tokenizer_json() {
    let dir = common::assets().join("models/all-MiniLM-L6-v2");
    check_all(
        "ggml-vocab-bert-bge.gguf",
        &Tokenizer::from_hf_folder(&dir).unwrap(),
    );
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let expected = common::read_json(common::fixtures().join("smollm2.json"));
    let g = GgufFile::open(&common::smollm2_gguf()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let chat = tok.chat().unwrap();
    let chats = expected["chats"].as_array().unwrap();
    assert!(chats.len() >= 4);
    for c in chats {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let text = chat.render(&msgs, true).unwrap();
        assert_eq!(text, c["rendered"].as_str().unwrap());
        assert_eq!(tok.encode(&text, false).unwrap(), common::ids(&c["ids"]));
    }
}

#[test]
fn streamed_text_equals_decoded_text_for_multibyte_characters() {
    let tok = Tokenizer::from_hf_folder(&common::assets().join("tokenizers/gpt2")).unwrap();
    let text = "Äpfel 🦙 нещо на Български 你好 ✨✨";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = slm::generate::TextStream::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(t) = stream.push(&tok, id).unwrap() {
            assert!(!t.contains('\u{FFFD}'), "partial character streamed: {t:?}");
            out.push_str(&t);
        }
    }
    out.push_str(&stream.finish(&tok).unwrap().unwrap_or_default());
    assert_eq!(out, text);
}

/// SentencePiece BPE vocabularies encode and decode from their pieces (`spm_bpe`), without
/// transformers' merge list. Its construction of the same vocabulary (`spm::tokenizer`, run by
/// the tokenizers crate) is the reference here: the same ids and the same decoded text for the
/// vectors' inputs, special and user-defined pieces written in the text, byte fallback, invalid
/// UTF-8 byte runs when decoding, and lines of real English text.
fn spm_bpe_agrees_with_tokenizers(path: &std::path::Path) {
    use slm::tokenize::{gguf_vocab, spm, spm_bpe::SpmBpe};
    let g = GgufFile::open(path).unwrap();
    let (pieces, unk, prefix) = gguf_vocab::spm_vocab(&g).unwrap();
    let ours = SpmBpe::new(&pieces, unk.as_deref(), prefix)
        .unwrap()
        .expect("pieces with distinct texts");
    let hf = spm::tokenizer(&pieces, unk.as_deref(), prefix).unwrap();
    let mut texts: Vec<String> = common::vectors("ggml-vocab-llama-spm.gguf")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    for p in [
        "corpora/wikitext-2/valid.txt",
        "corpora/tinyshakespeare/input.txt",
    ] {
        let text = std::fs::read_to_string(common::assets().join(p)).unwrap();
        let lines: Vec<&str> = text.lines().take(400).collect();
        texts.extend(lines.iter().map(|l| l.to_string()));
        texts.push(lines.join("\n"));
    }
    // Special pieces (each vocabulary's), user-defined runs of newlines, spaces, literal byte
    // piece text, characters outside the vocabulary, a NUL.
    for s in [
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "<s>Hello</s> <unk>x<unk><pad><bos>  <eos>",
        "a\n\n\nb\n\n\n\n\n\n\nc  d   e\t\tf",
        "<unused17>x<mask>[multimodal]<0x41> ▁▁ x",
        "🦙🦙 \u{10FFFF}\u{E000} 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u{0}end",
        "  leading and trailing  ",
        " ",
        "",
    ] {
        texts.push(s.to_string());
    }
    for text in &texts {
        let want = hf.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let got = ours.encode(text);
        assert_eq!(got, want, "{}: encoding {text:?}", path.display());
        for skip in [false, true] {
            assert_eq!(
                ours.decode(&got, skip),
                hf.decode(&got, skip).unwrap(),
                "{}: decoding {text:?}",
                path.display()
            );
        }
    }
    // Id runs across the whole vocabulary, byte pieces (valid and invalid UTF-8) among them.
    let n = pieces.len() as u32;
    let step = (n / 500).max(1) | 1;
    let all: Vec<u32> = (0..n).step_by(step as usize).collect();
    let bytes: Vec<u32> = ["<0xE4>", "<0xBD>", "<0xA0>", "<0xFF>", "<0x41>", "<0xE4>"]
        .iter()
        .filter_map(|b| ours.id(b))
        .collect();
    assert_eq!(bytes.len(), 6, "byte pieces");
    for run in all.chunks(13).chain([&bytes[..], &bytes[..3], &bytes[3..]]) {
        for skip in [false, true] {
            assert_eq!(ours.decode(run, skip), hf.decode(run, skip).unwrap());
        }
    }
    assert_eq!(ours.len(), hf.get_vocab_size(true));
    for id in all {
        let p = ours.piece(id).unwrap();
        assert_eq!(Some(p.to_string()), hf.id_to_token(id));
        assert_eq!(ours.id(p), hf.token_to_id(p));
    }
}

#[test]
fn spm_bpe_matches_tokenizers_on_llama_vocabulary() {
    let p = common::assets().join("tokenizers/vectors/ggml-vocab-llama-spm.gguf");
    spm_bpe_agrees_with_tokenizers(&p);
}

/// Gemma's 262,144 pieces: control pieces matched in text, user-defined newline runs, no "▁"
/// before the text. Needs `tools/fetch_assets.sh --large`.
#[test]
fn spm_bpe_matches_tokenizers_on_gemma_vocabulary() {
    let p = slm::models_dir().join("gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "missing {} (run tools/fetch_assets.sh --large)",
        p.display()
    );
    spm_bpe_agrees_with_tokenizers(&p);
}
