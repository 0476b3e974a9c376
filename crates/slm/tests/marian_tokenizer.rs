//! Marian's tokenizer as opus-mt models ship it (source.spm, target.spm and a vocab.json whose
//! ids are not SentencePiece's), with SentencePiece models trained by the sentencepiece library
//! on real text (SST-2 for the source with nmt_nfkc, tiny shakespeare for the target with no
//! normalization): the ids and decodings of transformers' `MarianTokenizer`
//! (tools/make_fixtures.py marian_tok), the llama.cpp tokenizer test inputs among the texts.

use slm::tokenize::Tokenizer;

use crate::common::{fixtures, ids, read_json};

fn marian() -> (Tokenizer, serde_json::Value) {
    let dir = fixtures().join("marian_tok");
    (
        Tokenizer::from_hf_folder(&dir).unwrap(),
        read_json(dir.join("expected.json")),
    )
}

#[test]
fn source_and_target_ids_equal_marian_tokenizer() {
    let (tok, want) = marian();
    assert_eq!(tok.vocab_size(), 1306);
    for (side, target) in [("source", false), ("target", true)] {
        let cases = want[side].as_array().unwrap();
        let mut wrong = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let got = if target {
                tok.encode_target(text).unwrap()
            } else {
                tok.encode(text, true).unwrap()
            };
            if got != ids(&c["ids"]) {
                wrong.push(format!("{text:?}: {got:?} != {:?}", ids(&c["ids"])));
            }
        }
        assert!(
            wrong.is_empty(),
            "{side}: {} of {} differ:\n{}",
            wrong.len(),
            cases.len(),
            wrong.join("\n")
        );
    }
    // The library's seq2seq encoding (inputs and labels) is the same.
    let c = &want["source"][0];
    assert_eq!(
        tok.encode_sequence(c["text"].as_str().unwrap()).unwrap(),
        ids(&c["ids"])
    );
    assert_eq!(tok.eos_ids(), &[0]);
    assert_eq!(tok.pad_id(), 1305);
}

#[test]
fn decoding_equals_marian_tokenizer_with_and_without_special_tokens() {
    let (tok, want) = marian();
    let mut wrong = Vec::new();
    for c in want["decode"].as_array().unwrap() {
        let ids = ids(&c["ids"]);
        for (key, skip) in [("skip", true), ("keep", false)] {
            let got = tok.decode(&ids, skip).unwrap();
            if got != c[key].as_str().unwrap() {
                wrong.push(format!("{ids:?} {key}: {got:?} != {:?}", c[key]));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_damaged_marian_vocabulary_is_a_clear_error() {
    let dir = crate::common::tempdir("marian-bad");
    for f in ["source.spm", "target.spm", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("marian_tok").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("vocab.json"), r#"{"</s>": 0, "<pad>": 1}"#).unwrap();
    let e = Tokenizer::from_hf_folder(&dir).err().unwrap().to_string();
    assert!(e.contains("vocab.json") && e.contains("<unk>"), "{e}");
    let spm = std::fs::read(dir.join("source.spm")).unwrap();
    std::fs::write(dir.join("source.spm"), &spm[..spm.len() / 2]).unwrap();
    std::fs::copy(
        fixtures().join("marian_tok/vocab.json"),
        dir.join("vocab.json"),
    )
    .unwrap();
    let e = Tokenizer::from_hf_folder(&dir).err().unwrap().to_string();
    assert!(e.contains("source.spm"), "{e}");
}
