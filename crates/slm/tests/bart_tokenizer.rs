//! BART's byte-level BPE read from `vocab.json` + `merges.txt` alone (no `tokenizer.json`), as
//! facebook/bart-* folders ship it: `<s> … </s>` around every text, pairs as
//! `<s> A </s></s> B </s>`, `<mask>` taking the space before it. The folder is built from the
//! GPT-2 asset (tools/make_fixtures.py `bart_folder`, the same rule here) and the expected ids and
//! decodings are transformers' `BartTokenizer` on it (make_fixtures.py bart_tok).

use std::path::{Path, PathBuf};

use slm::tokenize::Tokenizer;

use crate::common::{assets, fixtures, ids, read_json, tempdir};

/// GPT-2's vocabulary with `<s> <pad> </s> <unk>` first (GPT-2's ids moved up by 4) and `<mask>`
/// last, its merges, and a config naming the model type: what `bart_folder` writes.
fn bart_folder(dir: &Path) -> PathBuf {
    let gpt2 = assets().join("tokenizers/gpt2");
    let enc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(gpt2.join("encoder.json")).unwrap()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for (t, id) in enc {
        vocab.insert(t, (id.as_u64().unwrap() + 4).into());
    }
    vocab.insert("<mask>".into(), vocab.len().into());
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(&vocab).unwrap(),
    )
    .unwrap();
    std::fs::copy(gpt2.join("vocab.bpe"), dir.join("merges.txt")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "bart", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2}"#,
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn bart_vocab_and_merges_encode_and_decode_as_bart_tokenizer() {
    let scratch = tempdir("bart-tok");
    let dir = bart_folder(&scratch);
    let tok = Tokenizer::from_hf_folder(&dir).unwrap();
    let want = read_json(fixtures().join("bart_tok/expected.json"));
    assert_eq!(tok.vocab_size(), 50262);
    let mut wrong = Vec::new();
    let single = want["single"].as_array().unwrap();
    for c in single {
        let text = c["text"].as_str().unwrap();
        // What an encoder-decoder's input and label get.
        let got = tok.encode_sequence(text).unwrap();
        if got != ids(&c["ids"]) {
            wrong.push(format!("{text:?}: {got:?} != {:?}", ids(&c["ids"])));
        }
    }
    for c in want["pairs"].as_array().unwrap() {
        let (a, b) = (c["a"].as_str().unwrap(), c["b"].as_str().unwrap());
        let got = tok.encode_pair(a, Some(b), 512).unwrap().ids;
        if got != ids(&c["ids"]) {
            wrong.push(format!("pair {a:?} {b:?}: {got:?} != {:?}", ids(&c["ids"])));
        }
    }
    for c in want["decode"].as_array().unwrap() {
        let ids = ids(&c["ids"]);
        for (key, skip) in [("skip", true), ("keep", false)] {
            let got = tok.decode(&ids, skip).unwrap();
            if got != c[key].as_str().unwrap() {
                wrong.push(format!("decode {ids:?} {key}: {got:?} != {:?}", c[key]));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases differ:\n{}",
        wrong.len(),
        single.len(),
        wrong.join("\n")
    );
    assert_eq!((tok.bos, tok.eos_ids()), (Some(0), &[2][..]));
    assert_eq!(tok.pad_id(), 1);
}

#[test]
fn the_same_files_without_a_bart_config_stay_gpt2() {
    // GPT-2's own folders name no model type that makes them RoBERTa-style: nothing is added.
    let scratch = tempdir("bart-tok-gpt2");
    let dir = bart_folder(&scratch);
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let tok = Tokenizer::from_hf_folder(&dir).unwrap();
    // "Hello world" is GPT-2's 15496 995, moved up by 4.
    assert_eq!(tok.encode("Hello world", true).unwrap(), [15500, 999]);
    let bad = tempdir("bart-tok-bad");
    std::fs::copy(dir.join("merges.txt"), bad.join("merges.txt")).unwrap();
    std::fs::write(bad.join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
    std::fs::write(bad.join("config.json"), r#"{"model_type": "bart"}"#).unwrap();
    let e = Tokenizer::from_hf_folder(&bad).err().unwrap().to_string();
    assert!(e.contains("vocab.json") && e.contains("<s>"), "{e}");
}
