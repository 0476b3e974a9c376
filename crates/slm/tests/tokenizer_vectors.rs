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
