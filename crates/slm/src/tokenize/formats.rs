//! The files a Hugging Face folder keeps its tokenizer in, other than `tokenizer.json`, turned
//! into `tokenizer.json` documents: GPT-2's `vocab.json` + `merges.txt` (or `encoder.json` +
//! `vocab.bpe`), BERT's `vocab.txt`, word lists, SentencePiece models, added tokens and special
//! token settings from `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{added_token, spm};
use crate::error::{Context, Error, Result};

/// A folder's SentencePiece model, parsed once: T5's `spiece.model` (always unigram, as
/// `T5Tokenizer` reads it) or `tokenizer.model` (unigram, or BPE as Llama's), and whether it is
/// to be read as unigram.
pub(crate) fn spm_model(dir: &Path) -> Result<Option<(PathBuf, spm::SpmModel, bool)>> {
    let Some(p) = ["spiece.model", "tokenizer.model"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
    else {
        return Ok(None);
    };
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    let m = spm::parse_model(&bytes).in_file(&p)?;
    let unigram = m.model_type == 1 || p.ends_with("spiece.model");
    Ok(Some((p, m, unigram)))
}

/// Tokens added after a model's own vocabulary, by id, with whether each is special:
/// `tokenizer.json`'s `added_tokens`, else `tokenizer_config.json`'s `added_tokens_decoder`, else
/// `added_tokens.json`, else T5's `extra_ids` count (sentinels after the model's `base` pieces,
/// `<extra_id_0>` last).
pub(crate) fn added_tokens(dir: &Path, base: usize) -> Result<Vec<(u32, String, bool)>> {
    let mut out: Vec<(u32, String, bool)> = Vec::new();
    let (tj, config, file) = (
        dir.join("tokenizer.json"),
        dir.join("tokenizer_config.json"),
        dir.join("added_tokens.json"),
    );
    let bad = |p: &Path| Error::file(p, "added tokens must map token text to an id");
    let config_doc = if config.exists() {
        read_json(&config)?
    } else {
        Value::Null
    };
    if tj.exists() {
        let doc = read_json(&tj)?;
        for a in doc["added_tokens"].as_array().into_iter().flatten() {
            let id = a["id"].as_u64().ok_or_else(|| bad(&tj))?;
            let text = a["content"].as_str().ok_or_else(|| bad(&tj))?;
            out.push((id as u32, text.to_string(), a["special"] == true));
        }
    } else if let Some(d) = config_doc["added_tokens_decoder"].as_object() {
        for (id, a) in d {
            let id = id.parse::<u32>().map_err(|_| bad(&config))?;
            let text = a["content"].as_str().ok_or_else(|| bad(&config))?;
            out.push((id, text.to_string(), a["special"] == true));
        }
    } else if file.exists() {
        let v = read_json(&file)?;
        for (text, id) in v.as_object().ok_or_else(|| bad(&file))? {
            let id = id.as_u64().ok_or_else(|| bad(&file))?;
            out.push((id as u32, text.clone(), false));
        }
    } else if let Some(n) = config_doc["extra_ids"].as_u64() {
        let n = n as usize;
        out.extend((0..n).map(|i| ((base + n - 1 - i) as u32, format!("<extra_id_{i}>"), true)));
    }
    out.sort();
    Ok(out)
}

/// The byte-level BPE files of a folder without `tokenizer.json`: `vocab.json` + `merges.txt`
/// (transformers' names) or `encoder.json` + `vocab.bpe` (OpenAI's).
pub(crate) fn bpe_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]
        .iter()
        .map(|(v, m)| (dir.join(v), dir.join(m)))
        .find(|(v, m)| v.exists() && m.exists())
}

/// Whether a folder's byte-level BPE is RoBERTa's form: BART and RoBERTa ship the same files as
/// GPT-2, and transformers tells them apart by the model type (`config.json`) or the tokenizer
/// class (`tokenizer_config.json`), not by the vocabulary.
pub(crate) fn is_roberta_style(dir: &Path) -> bool {
    let field = |file: &str, key: &str| {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v.get(key)?.as_str().map(str::to_lowercase))
    };
    let roberta_types = ["bart", "roberta", "longformer", "led"];
    field("config.json", "model_type").is_some_and(|t| roberta_types.contains(&t.as_str()))
        || field("tokenizer_config.json", "tokenizer_class")
            .is_some_and(|c| roberta_types.iter().any(|t| c.starts_with(t)))
}

/// A `tokenizer.json` for byte-level BPE files as transformers' converter writes it: GPT-2's
/// (`<|endoftext|>` special, nothing added around a text) or, with `roberta`, BART's and
/// RoBERTa's (`<s> A </s>`, `<s> A </s></s> B </s>` for pairs, and `<mask>` taking the space
/// before it, as `RobertaTokenizer` declares it with `lstrip`).
pub fn gpt2_json(vocab: &Path, merges: &Path, roberta: bool) -> Result<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?)
            .in_file(vocab)?;
    let text = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
    let merges: Vec<Value> = text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap_or((l, ""));
            json!([a, b])
        })
        .collect();
    let id_of = |t: &str| v.get(t).and_then(|id| id.as_u64()).map(|id| id as u32);
    let (added, post) = if roberta {
        let (Some(cls), Some(sep)) = (id_of("<s>"), id_of("</s>")) else {
            return Err(Error::file(
                vocab,
                "a BART/RoBERTa vocabulary needs the tokens <s> and </s>",
            ));
        };
        let added: Vec<Value> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
            .iter()
            .filter_map(|t| {
                let mut a = added_token(id_of(t)?, t, true);
                a["lstrip"] = json!(*t == "<mask>");
                Some(a)
            })
            .collect();
        let post = json!({"type": "RobertaProcessing", "sep": ["</s>", sep], "cls": ["<s>", cls],
                          "trim_offsets": true, "add_prefix_space": false});
        (added, post)
    } else {
        // transformers' GPT2Tokenizer makes "<|endoftext|>" its special BOS/EOS/UNK token: it
        // is matched whole in text, never split by BPE.
        let added = id_of("<|endoftext|>")
            .map(|id| added_token(id, "<|endoftext|>", true))
            .into_iter()
            .collect();
        (added, Value::Null)
    };
    Ok(json!({
        "version": "1.0", "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": v, "merges": merges}
    }))
}

/// A `tokenizer.json` for a WordPiece vocabulary (BERT family), as transformers' converter writes
/// it. `post_processor` adds `[CLS]`/`[SEP]` when the vocabulary has them.
pub(crate) fn wordpiece_json(
    vocab: serde_json::Map<String, Value>,
    added: Vec<Value>,
    lowercase: bool,
    strip_accents: Option<bool>,
    with_specials: bool,
) -> Value {
    let id = |t: &str| vocab.get(t).cloned();
    let post = match (with_specials, id("[CLS]"), id("[SEP]")) {
        (true, Some(cls), Some(sep)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}}
        }),
        _ => Value::Null,
    };
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": strip_accents, "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": post,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// A BERT `vocab.txt` with the casing rules of the folder's tokenizer_config.json.
pub(super) fn wordpiece_txt_json(dir: &Path, vocab_txt: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(vocab_txt).map_err(|e| Error::io(vocab_txt, e))?;
    let vocab: serde_json::Map<String, Value> = text
        .lines()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let tc = dir.join("tokenizer_config.json");
    let cfg = if tc.exists() {
        read_json(&tc)?
    } else {
        Value::Null
    };
    let lowercase = cfg
        .get("do_lower_case")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let strip = cfg.get("strip_accents").and_then(|v| v.as_bool());
    let added = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .filter_map(|t| Some(added_token(vocab.get(*t)?.as_u64()? as u32, t, true)))
        .collect();
    Ok(wordpiece_json(vocab, added, lowercase, strip, true))
}

/// A recurrent LM's `vocab.txt` (PyTorch `word_language_model`'s dictionary, one word per
/// line in id order) read as that example tokenizes: whitespace-split words and `<eos>` for
/// every line end.
pub(super) fn word_list_json(vocab_txt: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(vocab_txt).map_err(|e| Error::io(vocab_txt, e))?;
    let mut vocab = serde_json::Map::new();
    for (i, w) in text.lines().enumerate() {
        if w.is_empty() || w.contains(char::is_whitespace) {
            return Err(Error::file(
                vocab_txt,
                format!(
                    "line {}: a vocabulary entry must be one word without spaces",
                    i + 1
                ),
            ));
        }
        if vocab.insert(w.to_string(), json!(i)).is_some() {
            return Err(Error::file(
                vocab_txt,
                format!("line {}: '{w}' is listed twice", i + 1),
            ));
        }
    }
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": "\n"}, "content": " <eos> "},
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    }))
}

/// A vocab.txt is a word list, not BERT's WordPiece vocabulary, beside a recurrent model: a
/// folder without config.json, or one whose config says `rnn_lm` or `rnn_classifier`.
pub(super) fn is_word_list_folder(dir: &Path) -> bool {
    use crate::models::rnn::{CLASSIFIER_TYPE, MODEL_TYPE};
    let cfg = dir.join("config.json");
    !cfg.exists()
        || read_json(&cfg).is_ok_and(|c| {
            let t = c.get("model_type").and_then(|v| v.as_str());
            t == Some(MODEL_TYPE) || t == Some(CLASSIFIER_TYPE)
        })
}

/// A token given in tokenizer_config.json as a string or as `{"content": ...}`.
pub(super) fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

pub(super) fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).in_file(path)
}
