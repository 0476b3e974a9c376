//! T5 as llama.cpp's GGUF (`t5`): files written by llama.cpp's own convert_hf_to_gguf.py from a
//! Flan-T5-style (gated GELU, untied head, encoder deeper than the decoder) and a t5-small-style
//! (ReLU, tied head) model with a SentencePiece unigram vocabulary trained on SST-2
//! (tools/make_fixtures.py t5_gguf). slm runs them as transformers runs the HF folders, writes
//! the same file from the folders, and converts the files back to folders.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use slm::io::gguf::GgufFile;
use slm::models::seq2seq::load_seq2seq;
use slm::tokenize::Tokenizer;

use crate::common::{fixtures, ids, read_json, tempdir};
use crate::seq2seq::{greedy, max_diff};

const MODELS: [&str; 2] = ["flan", "t5"];

fn dir(name: &str) -> PathBuf {
    fixtures().join("t5_gguf").join(name)
}

/// The model at `path` (a GGUF file or a folder) against transformers on its fixture: the
/// tokenizer's ids, teacher-forced decoder logits within 1e-4, greedy ids and decoded text.
fn check(name: &str, path: &Path) {
    let want = read_json(dir(name).join("expected.json"));
    let m = load_seq2seq(path).unwrap();
    let tok = Tokenizer::load(&m.files).unwrap();
    let model = m.model.as_ref();
    for c in want["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let src = tok.encode_sequence(text).unwrap();
        assert_eq!(
            src,
            ids(&c["input_ids"]),
            "{name} {path:?}: ids of {text:?}"
        );
        let enc = model.encode(&[&src]).unwrap().remove(0);
        let dec = ids(&c["decoder_input_ids"]);
        let mut cache = model.new_cache();
        let logits = model
            .decode(&mut [(&mut cache, &dec)], Some(&enc), true)
            .unwrap();
        let d = max_diff(&logits.to_vec2::<f32>().unwrap(), &c["logits"]);
        assert!(
            d <= 1e-4,
            "{name} {path:?} logits of {text:?}: max |diff| {d}"
        );
        let g = greedy(model, &src, 10);
        assert_eq!(g, ids(&c["greedy"]), "{name} {path:?} greedy of {text:?}");
        assert_eq!(
            tok.decode(&g, true).unwrap(),
            c["greedy_text"].as_str().unwrap()
        );
    }
}

#[test]
fn llama_cpp_t5_files_run_as_transformers_runs_the_folders() {
    for name in MODELS {
        check(name, &dir(name).join(format!("{name}.gguf")));
        check(name, &dir(name).join("hf"));
    }
}

#[test]
fn t5_unigram_tokenizers_equal_t5_tokenizer() {
    // From the GGUF vocabulary and from spiece.model alone (no tokenizer.json).
    let want = read_json(fixtures().join("t5_gguf/tokens.json"));
    for t in [
        Tokenizer::from_gguf(&GgufFile::open(&dir("t5").join("t5.gguf")).unwrap()).unwrap(),
        Tokenizer::from_hf_folder(&dir("t5").join("hf")).unwrap(),
    ] {
        assert_eq!(t.vocab_size(), 408);
        let mut wrong = Vec::new();
        for c in want["encode"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let got = t.encode_sequence(text).unwrap();
            if got != ids(&c["ids"]) {
                wrong.push(format!("{text:?}: {got:?} != {:?}", ids(&c["ids"])));
            }
        }
        for c in want["decode"].as_array().unwrap() {
            let ids = ids(&c["ids"]);
            for (key, skip) in [("skip", true), ("keep", false)] {
                let got = t.decode(&ids, skip).unwrap();
                if got != c[key].as_str().unwrap() {
                    wrong.push(format!("decode {ids:?} {key}: {got:?} != {:?}", c[key]));
                }
            }
        }
        assert!(wrong.is_empty(), "{:?}: {}", t.origin, wrong.join("\n"));
    }
}

/// Metadata written by llama.cpp's converter that says nothing about the model.
const NOT_COMPARED: [&str; 3] = ["general.name", "general.size_label", "general.type"];

#[test]
fn t5_folders_export_to_the_file_llama_cpp_writes() {
    let out = tempdir("t5-gguf-export");
    for name in MODELS {
        let file = out.join(format!("{name}.gguf"));
        slm::quantize::from_hf::quantize_hf(
            &dir(name).join("hf"),
            None,
            GgmlDType::F32,
            &file,
            false,
            |_, _| {},
        )
        .unwrap();
        let (ours, theirs) = (
            GgufFile::open(&file).unwrap(),
            GgufFile::open(&dir(name).join(format!("{name}.gguf"))).unwrap(),
        );
        let mut names: Vec<&String> = theirs.content.tensor_infos.keys().collect();
        names.sort();
        let mut our_names: Vec<&String> = ours.content.tensor_infos.keys().collect();
        our_names.sort();
        assert_eq!(our_names, names, "{name}: tensor names");
        for n in names {
            assert_eq!(ours.raw(n), theirs.raw(n), "{name}: tensor {n}");
        }
        for (k, v) in &theirs.content.metadata {
            if NOT_COMPARED.contains(&k.as_str()) {
                continue;
            }
            let got = ours.meta(k).map(|g| format!("{g:?}"));
            assert_eq!(got, Some(format!("{v:?}")), "{name}: metadata {k}");
        }
        check(name, &file);
    }
    // What llama.cpp cannot hold is refused by name: T5 buckets reaching distance 12.
    let e = slm::quantize::from_hf::quantize_hf(
        &fixtures().join("t5/t5_relu/safetensors"),
        None,
        GgmlDType::F32,
        &out.join("x.gguf"),
        false,
        |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("relative_attention_max_distance 12"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn t5_files_convert_back_to_folders() {
    let out = tempdir("t5-gguf-to-hf");
    for name in MODELS {
        let folder = out.join(name);
        slm::convert::gguf_to_hf(
            &dir(name).join(format!("{name}.gguf")),
            &folder,
            slm::convert::Dtype::F32,
            false,
        )
        .unwrap();
        check(name, &folder);
    }
    let _ = std::fs::remove_dir_all(&out);
}
