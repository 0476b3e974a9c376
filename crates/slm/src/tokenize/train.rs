//! Training a tokenizer on your own text with the `tokenizers` crate's trainers, each type set
//! up as its reference pipeline is: GPT-2's byte-level BPE, SentencePiece-style BPE and Unigram
//! (`▁` for spaces), BERT's WordPiece, PyTorch `word_language_model`'s words (`<eos>` at every
//! line end) and characters. The result is a `tokenizer.json` (with a `tokenizer_config.json`)
//! that transformers' `AutoTokenizer` and slm load.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use std::io::Write;
use std::str::FromStr;

use super::preprocess::{Preprocess, Punctuation};
use crate::error::{Error, Result};
use crate::io::write::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SentencePiece-style BPE over characters, `▁` marking spaces, `<unk>` for the unseen.
    Bpe,
    /// GPT-2's byte-level BPE: every byte is in the vocabulary, so nothing is unknown.
    ByteBpe,
    /// BERT's WordPiece: lowercased, `##` continuations, `[CLS] … [SEP]` around each input.
    WordPiece,
    /// SentencePiece's Unigram language model.
    Unigram,
    /// Whitespace-separated words and `<eos>` for every line end, as PyTorch's
    /// `word_language_model` reads its corpus (a text's last line gets one when it ends with a
    /// newline, as a file's does); words outside the vocabulary are `<unk>`.
    Word,
    /// One token per character.
    Char,
}

impl Kind {
    pub fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "bpe" => Kind::Bpe,
            "byte-bpe" => Kind::ByteBpe,
            "wordpiece" => Kind::WordPiece,
            "unigram" => Kind::Unigram,
            "word" => Kind::Word,
            "char" => Kind::Char,
            _ => return None,
        })
    }

    /// The special tokens a tokenizer of this kind starts with, when none are given.
    pub fn default_specials(self) -> Vec<String> {
        let v: &[&str] = match self {
            Kind::Bpe | Kind::Unigram => &["<unk>", "<s>", "</s>"],
            Kind::ByteBpe => &["<|endoftext|>"],
            Kind::WordPiece => &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            Kind::Word => &["<unk>", "<eos>"],
            Kind::Char => &["<unk>"],
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    fn unk(self) -> Option<&'static str> {
        match self {
            Kind::Bpe | Kind::Unigram | Kind::Word | Kind::Char => Some("<unk>"),
            Kind::WordPiece => Some("[UNK]"),
            Kind::ByteBpe => None,
        }
    }
}

pub struct TrainOptions {
    pub kind: Kind,
    pub vocab_size: usize,
    /// Pairs (BPE, WordPiece) or words (word level) seen fewer times are not kept.
    pub min_frequency: u64,
    /// Added first, in order, with the first ids.
    pub special_tokens: Vec<String>,
    /// Lowercasing, accents, punctuation and stop words, built into the tokenizer (word and
    /// character tokenizers only).
    pub preprocess: Preprocess,
}

fn tok_err(what: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::msg(format!("{what}: {e}"))
}

/// Trains a tokenizer on the text files.
pub fn train(files: &[PathBuf], o: &TrainOptions) -> Result<Tokenizer> {
    if files.is_empty() {
        return Err(Error::msg("give at least one text file to train on"));
    }
    for f in files {
        std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
    }
    if o.vocab_size < o.special_tokens.len() + 1 {
        return Err(Error::msg(format!(
            "--vocab-size {} leaves no room beside the {} special tokens",
            o.vocab_size,
            o.special_tokens.len()
        )));
    }
    if let Some(unk) = o
        .kind
        .unk()
        .filter(|u| !o.special_tokens.iter().any(|s| s == u))
    {
        return Err(Error::msg(format!(
            "the special tokens must include {unk}, which this tokenizer type writes for unseen text"
        )));
    }
    if !o.preprocess.is_empty() && !matches!(o.kind, Kind::Word | Kind::Char) {
        return Err(Error::msg(
            "lowercasing, accents, punctuation and stop words are for word and char tokenizers; a subword tokenizer keeps its own normalisation",
        ));
    }
    let specials: Vec<AddedToken> = o
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let unk = o.kind.unk().map(str::to_string);
    let metaspace = || Metaspace::new('▁', PrependScheme::Always, true);
    let (mut tok, mut trainer): (Tokenizer, TrainerWrapper) = match o.kind {
        Kind::Bpe | Kind::ByteBpe => {
            let mut model = BPE::builder();
            if let Some(u) = &unk {
                model = model.unk_token(u.clone());
            }
            let model = model.build().map_err(tok_err("BPE"))?;
            let mut t = BpeTrainerBuilder::new()
                .vocab_size(o.vocab_size)
                .min_frequency(o.min_frequency)
                .special_tokens(specials)
                .show_progress(false);
            if o.kind == Kind::ByteBpe {
                t = t
                    .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>());
            }
            let mut tok = Tokenizer::new(model);
            if o.kind == Kind::ByteBpe {
                tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
                tok.with_decoder(Some(ByteLevelDecoder::default()));
                tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
            } else {
                tok.with_pre_tokenizer(Some(metaspace()));
                tok.with_decoder(Some(metaspace()));
            }
            (tok, t.build().into())
        }
        Kind::WordPiece => {
            let model = WordPiece::builder()
                .unk_token("[UNK]".into())
                .build()
                .map_err(tok_err("WordPiece"))?;
            let t = WordPieceTrainerBuilder::new()
                .vocab_size(o.vocab_size)
                .min_frequency(o.min_frequency)
                .special_tokens(specials)
                .show_progress(false)
                .build();
            let mut tok = Tokenizer::new(model);
            tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
                .map_err(tok_err("normalizer"))?;
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            (tok, t.into())
        }
        Kind::Unigram => {
            let t = UnigramTrainerBuilder::default()
                .vocab_size(o.vocab_size as u32)
                .special_tokens(specials)
                .unk_token(unk.clone())
                .show_progress(false)
                .build()
                .map_err(|e| Error::msg(format!("Unigram trainer: {e}")))?;
            let mut tok = Tokenizer::new(Unigram::default());
            tok.with_pre_tokenizer(Some(metaspace()));
            tok.with_decoder(Some(metaspace()));
            (tok, t.into())
        }
        Kind::Word | Kind::Char => {
            let model = WordLevel::builder()
                .unk_token("<unk>".into())
                .build()
                .map_err(tok_err("WordLevel"))?;
            let t = WordLevelTrainerBuilder::default()
                .vocab_size(o.vocab_size)
                .min_frequency(o.min_frequency)
                .special_tokens(specials)
                .show_progress(false)
                .build()
                .map_err(|e| Error::msg(format!("WordLevel trainer: {e}")))?;
            let mut tok = Tokenizer::new(model);
            let pre = o.preprocess.normalizers()?;
            if !pre.is_empty() {
                tok.with_normalizer(Some(Sequence::new(pre)))
                    .map_err(tok_err("normalizer"))?;
            }
            if o.kind == Kind::Word && o.preprocess.punctuation == Punctuation::Split {
                // Each punctuation mark its own word; the `<eos>` that line ends become stays whole.
                let punct = Split::new(
                    SplitPattern::Regex(r"<eos>|\p{P}".into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err("split"))?;
                tok.with_pre_tokenizer(Some(PreSequence::new(vec![
                    WhitespaceSplit.into(),
                    punct.into(),
                ])));
            } else if o.kind == Kind::Word {
                tok.with_pre_tokenizer(Some(WhitespaceSplit));
            } else {
                // Every character (newlines too) is its own piece, and decoding joins them.
                let chars = Split::new(
                    SplitPattern::Regex(r"[\s\S]".into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tok_err("split"))?;
                tok.with_pre_tokenizer(Some(chars));
                tok.with_decoder(Some(Fuse::new()));
            }
            (tok, t.into())
        }
    };
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    tok.train_from_files(&mut trainer, paths)
        .map_err(tok_err("training"))?;
    if matches!(o.kind, Kind::Word | Kind::Char) {
        tok = contiguous_word_ids(&tok, &o.special_tokens)?;
    }
    if o.kind == Kind::Word {
        // Set after training, so `<eos>` is not counted as a word: each line end becomes one.
        let eos = Replace::new("\n", " <eos> ").map_err(tok_err("normalizer"))?;
        let mut all = o.preprocess.normalizers()?;
        all.push(eos.into());
        tok.with_normalizer(Some(Sequence::new(all)))
            .map_err(tok_err("normalizer"))?;
    }
    let id = |s: &str| {
        tok.token_to_id(s)
            .ok_or_else(|| Error::msg(format!("internal: {s} is not in the trained vocabulary")))
    };
    let template = match o.kind {
        Kind::WordPiece => Some((
            "[CLS] $A [SEP]",
            "[CLS] $A [SEP] $B:1 [SEP]:1",
            vec!["[CLS]", "[SEP]"],
        )),
        _ => None,
    };
    if let Some((single, pair, names)) = template {
        let mut specials = Vec::new();
        for n in names {
            specials.push((n.to_string(), id(n)?));
        }
        let p = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::msg(format!("post-processor: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::msg(format!("post-processor: {e}")))?;
        tok.with_post_processor(Some(p));
    }
    Ok(tok)
}

/// The WordLevel trainer numbers the special tokens first and then every word by frequency,
/// so a special token that is also a word of the text (WikiText's `<unk>`) is numbered twice
/// and the word's number wins, leaving a hole at the special's: a vocabulary of n entries with
/// an id n. Renumbers it: the special tokens first, in order, then the words in the trainer's
/// order.
fn contiguous_word_ids(tok: &Tokenizer, specials: &[String]) -> Result<Tokenizer> {
    let mut doc: serde_json::Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| Error::msg(format!("tokenizer.json: {e}")))?,
    )
    .map_err(|e| Error::msg(format!("tokenizer.json: {e}")))?;
    let vocab = doc["model"]["vocab"]
        .as_object()
        .ok_or_else(|| Error::msg("internal: a WordLevel model without a vocabulary"))?;
    let mut words: Vec<(&String, u64)> = vocab
        .iter()
        .filter(|(w, _)| !specials.contains(w))
        .map(|(w, id)| (w, id.as_u64().unwrap_or(u64::MAX)))
        .collect();
    words.sort_by_key(|&(_, id)| id);
    let order: Vec<String> = specials
        .iter()
        .cloned()
        .chain(words.into_iter().map(|(w, _)| w.clone()))
        .collect();
    let renumbered: serde_json::Map<String, serde_json::Value> = order
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    if let Some(added) = doc["added_tokens"].as_array_mut() {
        for t in added {
            if let Some(i) = t["content"]
                .as_str()
                .and_then(|c| order.iter().position(|w| w == c))
            {
                t["id"] = serde_json::json!(i);
            }
        }
    }
    doc["model"]["vocab"] = serde_json::Value::Object(renumbered);
    Tokenizer::from_str(&doc.to_string()).map_err(tok_err("renumbered vocabulary"))
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` naming the special tokens, so that
/// transformers' `AutoTokenizer.from_pretrained(dir)` loads it as a fast tokenizer.
pub fn save(tok: &Tokenizer, o: &TrainOptions, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok
        .to_string(true)
        .map_err(|e| Error::msg(format!("tokenizer.json: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), |w| {
        w.write_all(json.as_bytes())
    })?;
    let has = |s: &str| o.special_tokens.iter().any(|t| t == s);
    let mut cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000_000_000_000u64,
        "clean_up_tokenization_spaces": false,
    });
    let roles: &[(&str, &[&str])] = &[
        ("unk_token", &["<unk>", "[UNK]"]),
        ("bos_token", &["<s>", "<|endoftext|>"]),
        ("eos_token", &["</s>", "<eos>", "<|endoftext|>"]),
        ("pad_token", &["[PAD]", "<pad>"]),
        ("cls_token", &["[CLS]"]),
        ("sep_token", &["[SEP]"]),
        ("mask_token", &["[MASK]", "<mask>"]),
    ];
    for (role, names) in roles {
        if let Some(n) = names.iter().find(|n| has(n)) {
            cfg[*role] = serde_json::json!(n);
        }
    }
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::msg(format!("tokenizer_config.json: {e}")))?;
    write_atomic(&dir.join("tokenizer_config.json"), |w| {
        w.write_all(text.as_bytes())
    })
}
