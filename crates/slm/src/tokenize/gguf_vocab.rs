//! Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`), as `tokenizer.json` documents in the
//! shape transformers' converters write, so the same `tokenizers` engine runs them.

use serde_json::{json, Value};

use super::spm::{self, Piece};
use crate::error::{Context, Error, Result};
use crate::io::gguf::GgufFile;

/// Borrowed from the parsed metadata: a vocabulary is tens of thousands of strings, and each
/// copy of them all was a few milliseconds of the load.
fn strings<'g>(g: &'g GgufFile, key: &str) -> Result<Option<Vec<&'g str>>> {
    let Some(v) = g.meta(key) else {
        return Ok(None);
    };
    let arr = v
        .to_vec()
        .map_err(|_| Error::file(&g.path, format!("'{key}' is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .map(String::as_str)
                .map_err(|_| Error::file(&g.path, format!("'{key}' holds a non-string")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn numbers(g: &GgufFile, key: &str) -> Vec<f64> {
    use candle_core::quantized::gguf_file::Value as V;
    let Some(Ok(arr)) = g.meta(key).map(|v| v.to_vec()) else {
        return Vec::new();
    };
    arr.iter()
        .map(|x| match x {
            V::F32(f) => *f as f64,
            V::I32(i) => *i as f64,
            V::U32(i) => *i as f64,
            V::I8(i) => *i as f64,
            V::U8(i) => *i as f64,
            _ => 0.0,
        })
        .collect()
}

/// The `tokenizer.json` for a GGUF file's vocabulary.
/// A SentencePiece (`llama`) vocabulary: its pieces, the unknown piece, and whether a "▁" goes
/// before the text (Gemma's does not: llama.cpp's `add_space_prefix`).
pub fn spm_vocab(g: &GgufFile) -> Result<(Vec<Piece>, Option<String>, bool)> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::file(&g.path, "'tokenizer.ggml.tokens' missing"))?;
    let types = numbers(g, "tokenizer.ggml.token_type");
    let scores = numbers(g, "tokenizer.ggml.scores");
    let unk = g
        .meta_u64("tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize))
        .map(|t| t.to_string());
    let pieces = tokens
        .into_iter()
        .enumerate()
        .map(|(i, text)| Piece {
            text: text.to_string(),
            score: scores.get(i).copied().unwrap_or(0.0) as f32,
            kind: types.get(i).map_or(1, |&t| t as i32),
        })
        .collect();
    let space_prefix = g
        .meta_bool("tokenizer.ggml.add_space_prefix")
        .unwrap_or(true);
    Ok((pieces, unk, space_prefix))
}

/// A unigram SentencePiece (llama.cpp's `t5` model, which its T5 converter writes) as the
/// model it came from: the pieces with their scores and types, the normalizer's charsmap and
/// whitespace rules.
pub fn unigram_model(g: &GgufFile) -> Result<spm::SpmModel> {
    let (pieces, _, add_dummy_prefix) = spm_vocab(g)?;
    let charsmap = match g.meta("tokenizer.ggml.precompiled_charsmap") {
        None => Vec::new(),
        Some(v) => byte_array(g, v, "tokenizer.ggml.precompiled_charsmap")?,
    };
    Ok(spm::SpmModel {
        pieces,
        model_type: 1,
        charsmap,
        add_dummy_prefix,
        remove_extra_whitespaces: g
            .meta_bool("tokenizer.ggml.remove_extra_whitespaces")
            .unwrap_or(true),
    })
}

/// An array of bytes, each element checked (a charsmap is a binary blob: no element may be
/// quietly turned into 0).
fn byte_array(
    g: &GgufFile,
    v: &candle_core::quantized::gguf_file::Value,
    key: &str,
) -> Result<Vec<u8>> {
    use candle_core::quantized::gguf_file::Value as V;
    let bad = || Error::file(&g.path, format!("'{key}' is not an array of bytes"));
    v.to_vec()
        .map_err(|_| bad())?
        .iter()
        .map(|x| match x {
            V::U8(b) => Ok(*b),
            V::I8(b) => Ok(*b as u8),
            _ => Err(bad()),
        })
        .collect()
}

pub fn tokenizer_json(g: &GgufFile) -> Result<Value> {
    let model = g.meta_str("tokenizer.ggml.model").ok_or_else(|| {
        Error::file(
            &g.path,
            "no tokenizer in GGUF metadata ('tokenizer.ggml.model' missing)",
        )
    })?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::file(&g.path, "'tokenizer.ggml.tokens' missing"))?;
    let types: Vec<i32> = numbers(g, "tokenizer.ggml.token_type")
        .iter()
        .map(|&t| t as i32)
        .collect();
    let kind = |i: usize| types.get(i).copied().unwrap_or(1);
    match model {
        "gpt2" => {
            let merges: Vec<Value> = gpt2_merges(g)?
                .into_iter()
                .map(|(a, b)| json!([a, b]))
                .collect();
            let vocab: serde_json::Map<String, Value> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), json!(i)))
                .collect();
            let added: Vec<Value> = (0..tokens.len())
                .filter(|&i| matches!(kind(i), 3 | 4))
                .map(|i| super::added_token(i as u32, tokens[i], kind(i) == 3))
                .collect();
            Ok(gpt2_doc(
                gpt2_pre(g),
                added,
                Value::Object(vocab),
                Value::Array(merges),
            ))
        }
        "llama" => {
            let (pieces, unk, space_prefix) = spm_vocab(g)?;
            spm::tokenizer_json(&pieces, unk.as_deref(), space_prefix)
        }
        "t5" => {
            let t = spm::unigram_tokenizer(&unigram_model(g)?).in_file(&g.path)?;
            let doc = t
                .to_string(false)
                .map_err(|e| Error::file(&g.path, format!("cannot write the tokenizer: {e}")))?;
            serde_json::from_str(&doc).in_file(&g.path)
        }
        "bert" => {
            // llama.cpp stores word-initial pieces with a leading "▁" and continuation pieces
            // without WordPiece's "##"; undo that to get the original vocab.txt.
            let vocab: serde_json::Map<String, Value> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let orig = if t.starts_with('[') && t.ends_with(']') {
                        t.to_string()
                    } else if let Some(rest) = t.strip_prefix('\u{2581}') {
                        rest.to_string()
                    } else {
                        format!("##{t}")
                    };
                    (orig, json!(i))
                })
                .collect();
            let added: Vec<Value> = (0..tokens.len())
                .filter(|&i| kind(i) == 3)
                .map(|i| super::added_token(i as u32, tokens[i], true))
                .collect();
            // Specials are added by the caller, as for every GGUF vocabulary.
            Ok(super::wordpiece_json(vocab, added, true, None, false))
        }
        other => Err(Error::file(
            &g.path,
            format!(
                "tokenizer model '{other}' is not supported (supported: gpt2, llama, t5, bert)"
            ),
        )),
    }
}

/// The merges as pairs ("a b" in the file).
fn gpt2_merges(g: &GgufFile) -> Result<Vec<(String, String)>> {
    let merges = strings(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| Error::file(&g.path, "'tokenizer.ggml.merges' missing"))?;
    Ok(merges
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (m.to_string(), String::new()),
        })
        .collect())
}

fn gpt2_pre(g: &GgufFile) -> &str {
    g.meta_str("tokenizer.ggml.pre").unwrap_or("default")
}

/// A byte-level BPE (`tokenizer.ggml.model` "gpt2") as tokenizer.json writes it.
fn gpt2_doc(pre: &str, added: Vec<Value>, vocab: Value, merges: Value) -> Value {
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level_pre_tokenizer(pre),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": merges
        }
    })
}

/// The same byte-level BPE built in code: only the pipeline goes through a (small) JSON
/// document; the vocabulary and merges go straight into the model. Through the whole document
/// (49,152 tokens and 48,900 merges for SmolLM2) `slm tokenize` took 0.22-0.32 s and 93 MB,
/// built in code 0.07-0.10 s and 40 MB.
pub fn gpt2_tokenizer(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    use std::str::FromStr;
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::file(&g.path, "'tokenizer.ggml.tokens' missing"))?;
    let types = numbers(g, "tokenizer.ggml.token_type");
    let kind = |i: usize| types.get(i).map_or(1, |&t| t as i32);
    let built = |e: tokenizers::Error| Error::file(&g.path, format!("cannot build tokenizer: {e}"));
    let pre = gpt2_pre(g);
    let doc = gpt2_doc(pre, vec![], json!({}), json!([]));
    let mut t = tokenizers::Tokenizer::from_str(&doc.to_string()).map_err(built)?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let model = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, gpt2_merges(g)?)
        .ignore_merges(pre == "llama-bpe")
        .build()
        .map_err(built)?;
    t.with_model(model);
    let added = (0..tokens.len())
        .filter(|&i| matches!(kind(i), 3 | 4))
        .map(|i| (tokens[i].to_string(), kind(i) == 3));
    super::add_vocab_tokens(&mut t, added).map_err(built)?;
    Ok(t)
}

/// The pre-tokenizer HF uses for each of llama.cpp's `tokenizer.ggml.pre` names.
fn byte_level_pre_tokenizer(pre: &str) -> Value {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => byte_level(true),
    }
}
