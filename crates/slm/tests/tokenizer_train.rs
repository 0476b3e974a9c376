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
        preprocess: Default::default(),
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
        preprocess: Default::default(),
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

/// Word tokenizers with classic preprocessing on tiny shakespeare: the vocabulary is built from
/// the cleaned text (no capitals, accents, stop words or attached punctuation) and the saved
/// tokenizer.json applies the same cleaning to new text, `<eos>` at line ends included.
#[test]
fn preprocessing_is_trained_into_the_tokenizer_and_applied_after_reloading() {
    use slm::tokenize::preprocess::{stopwords_file, stopwords_for, Preprocess, Punctuation};
    let dir = common::tempdir("tok-train-preprocess");
    let (file, _) = corpus(&dir);
    let en = stopwords_for("en").unwrap();
    assert!(en.len() > 150 && en.iter().any(|w| w == "the") && en.iter().any(|w| w == "not"));
    let words = |tok: &Tokenizer, text: &str| -> Vec<String> {
        let ids = tok.encode(text, false).unwrap();
        ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect()
    };
    let cases = [
        (
            Preprocess {
                lowercase: true,
                strip_accents: true,
                punctuation: Punctuation::Split,
                stopwords: en.clone(),
            },
            "The KING is NOT hére, my lord!\n",
            // "hére" loses its accent and is then the stop word "here".
            vec!["king", ",", "lord", "!", "<eos>"],
            &["The", "the", "speak,", "Speak", "not"][..],
        ),
        (
            Preprocess {
                lowercase: true,
                punctuation: Punctuation::Remove,
                ..Default::default()
            },
            "Speak, speak.\n",
            vec!["speak", "speak", "<eos>"],
            &["The", "speak,", "Speak", "speak."][..],
        ),
    ];
    for (i, (p, text, want, absent)) in cases.into_iter().enumerate() {
        let o = TrainOptions {
            kind: Kind::Word,
            vocab_size: 5000,
            min_frequency: 1,
            special_tokens: Kind::Word.default_specials(),
            preprocess: p.clone(),
        };
        let t = train(std::slice::from_ref(&file), &o).unwrap();
        let vocab = t.get_vocab(true);
        for a in absent {
            assert!(!vocab.contains_key(*a), "case {i}: '{a}' in the vocabulary");
        }
        let out = dir.join(format!("out{i}"));
        save(&t, &o, &out).unwrap();
        let tok = Tokenizer::from_hf_folder(&out).unwrap();
        assert_eq!(words(&tok, text), want, "case {i}: {text:?}");
    }
    // A stop-word file; an unknown language, and preprocessing on a subword tokenizer, refused.
    let f = dir.join("stop.txt");
    std::fs::write(&f, "# mine\nthou\nthee\n\n").unwrap();
    assert_eq!(stopwords_file(&f).unwrap(), ["thou", "thee"]);
    std::fs::write(&f, "two words\n").unwrap();
    assert!(stopwords_file(&f)
        .unwrap_err()
        .to_string()
        .contains("one stop word per line"));
    assert!(stopwords_for("xx")
        .unwrap_err()
        .to_string()
        .contains("no stop-word list for 'xx'"));
    let o = TrainOptions {
        kind: Kind::ByteBpe,
        vocab_size: 500,
        min_frequency: 2,
        special_tokens: Kind::ByteBpe.default_specials(),
        preprocess: Preprocess {
            lowercase: true,
            ..Default::default()
        },
    };
    let e = train(&[file], &o).unwrap_err().to_string();
    assert!(e.contains("word and char tokenizers"), "{e}");
}
