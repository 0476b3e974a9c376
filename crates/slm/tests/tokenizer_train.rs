//! Tokenizers trained by slm on tiny shakespeare: each type reloads through slm's own loader
//! with the same ids, keeps its special tokens first, and decodes what it encoded (byte-level
//! BPE, characters and the SentencePiece types exactly; WordPiece lowercased; words with `<eos>`
//! at each line end as PyTorch's `word_language_model` reads them).

use crate::common;

use std::path::PathBuf;

use slm::tokenize::train::{save, train, Kind, TrainOptions};
use slm::tokenize::Tokenizer;

fn corpus(dir: &std::path::Path) -> (PathBuf, String) {
    let text = std::fs::read_to_string(common::assets().join("corpora/tinyshakespeare/input.txt"))
        .unwrap();
    let head: String = text.chars().take(200_000).collect();
    let p = dir.join("train.txt");
    std::fs::write(&p, &head).unwrap();
    (p, head)
}

fn trained(
    kind: Kind,
    vocab: usize,
    name: &str,
) -> (tokenizers::Tokenizer, Tokenizer, TrainOptions) {
    let dir = common::tempdir(&format!("tok-train-{name}"));
    let (file, _) = corpus(&dir);
    let o = TrainOptions {
        kind,
        vocab_size: vocab,
        min_frequency: 2,
        special_tokens: kind.default_specials(),
    };
    let t = train(&[file], &o).unwrap();
    let out = dir.join("out");
    save(&t, &o, &out).unwrap();
    let loaded = Tokenizer::from_hf_folder(&out).unwrap();
    (t, loaded, o)
}

const SAMPLE: &str =
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.";

#[test]
fn each_type_trains_reloads_and_round_trips() {
    for (kind, vocab, name) in [
        (Kind::ByteBpe, 1000, "byte-bpe"),
        (Kind::Bpe, 1000, "bpe"),
        (Kind::Unigram, 1000, "unigram"),
        (Kind::WordPiece, 1000, "wordpiece"),
        (Kind::Word, 3000, "word"),
        (Kind::Char, 200, "char"),
    ] {
        let (t, loaded, o) = trained(kind, vocab, name);
        let n = t.get_vocab_size(true);
        assert!(
            n <= vocab && n > o.special_tokens.len() + 20,
            "{name}: vocabulary of {n}"
        );
        for (i, s) in o.special_tokens.iter().enumerate() {
            assert_eq!(t.token_to_id(s), Some(i as u32), "{name}: {s} first");
        }
        let ids = t.encode(SAMPLE, true).unwrap().get_ids().to_vec();
        assert_eq!(
            loaded.encode(SAMPLE, true).unwrap(),
            ids,
            "{name}: slm's loader disagrees"
        );
        let back = t.decode(&ids, true).unwrap();
        match kind {
            Kind::ByteBpe | Kind::Char | Kind::Bpe | Kind::Unigram => {
                assert_eq!(back, SAMPLE, "{name}: round trip");
                // A learned vocabulary compresses: fewer tokens than characters.
                assert!(
                    ids.len() * 2 < SAMPLE.len() || kind == Kind::Char,
                    "{name}: {} tokens",
                    ids.len()
                );
            }
            Kind::WordPiece => {
                assert_eq!(ids.first(), t.token_to_id("[CLS]").as_ref());
                assert_eq!(ids.last(), t.token_to_id("[SEP]").as_ref());
                let words = |s: &str| {
                    s.to_lowercase()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                assert_eq!(
                    words(&back)
                        .replace(" ,", ",")
                        .replace(" .", ".")
                        .replace(" :", ":"),
                    words(SAMPLE)
                );
            }
            Kind::Word => {
                let eos = t.token_to_id("<eos>").unwrap();
                let line = t
                    .encode("First Citizen: zyzzyva\nAll:", true)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                assert_eq!(line.len(), 5, "three words, <eos>, a word: {line:?}");
                assert_eq!(line[3], eos);
                assert_eq!(line[2], t.token_to_id("<unk>").unwrap(), "an unseen word");
                assert_eq!(t.decode(&line[..2], true).unwrap(), "First Citizen:");
                // As word_language_model counts: one <eos> per line of the sample.
                let eoses = ids.iter().filter(|&&i| i == eos).count();
                assert_eq!(eoses, SAMPLE.matches('\n').count());
            }
        }
    }
}

#[test]
fn bad_options_are_errors() {
    let dir = common::tempdir("tok-train-bad");
    let (file, _) = corpus(&dir);
    let o = |kind, vocab, specials: &[&str]| TrainOptions {
        kind,
        vocab_size: vocab,
        min_frequency: 2,
        special_tokens: specials.iter().map(|s| s.to_string()).collect(),
    };
    let e = train(std::slice::from_ref(&file), &o(Kind::Bpe, 1000, &["<s>"]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("<unk>"), "{e}");
    let e = train(
        std::slice::from_ref(&file),
        &o(Kind::Word, 1, &["<unk>", "<eos>"]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("vocab-size"), "{e}");
    let e = train(&[dir.join("missing.txt")], &o(Kind::ByteBpe, 100, &[]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.txt"), "{e}");
}
