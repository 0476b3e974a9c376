//! A Hugging Face tokenizer as GGUF `tokenizer.ggml.*` metadata, the way llama.cpp's
//! `convert_hf_to_gguf.py` writes it, so llama.cpp tokenizes as transformers does: byte-level BPE
//! (`gpt2`: tokens and merges, plus the name of the pre-tokenizer's split) or SentencePiece
//! (`llama`: pieces with scores and types). The inverse is [`super::gguf_vocab`].

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::{read_json, spm, token_str, Tokenizer};
use crate::error::{Error, Result};

/// SentencePiece's piece types, which GGUF's `token_type` shares.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.ggml.*` keys and the chat template for the tokenizer in `dir`, padded to
/// `vocab_size` entries (the rows of the model's embedding) as llama.cpp requires.
pub fn gguf_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    // As llama.cpp's converter: SentencePiece's own file first, it carries the scores.
    let tj = dir.join("tokenizer.json");
    let mut meta = if let Some((p, m, unigram)) = super::spm_model(dir)? {
        match unigram {
            true => self::unigram(dir, &p, m, vocab_size)?,
            false => sentencepiece(dir, &p, m.pieces, vocab_size)?,
        }
    } else if tj.exists() && read_json(&tj)?["model"]["byte_fallback"] == true {
        sentencepiece_json(&tj, vocab_size)?
    } else {
        byte_level_bpe(dir, vocab_size)?
    };
    let tok = Tokenizer::from_hf_folder(dir)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.exists() {
        read_json(&cfg_path)?
    } else {
        Json::Null
    };
    let model_cfg = dir.join("config.json");
    let model_cfg = if model_cfg.exists() {
        read_json(&model_cfg)?
    } else {
        Json::Null
    };
    for (name, gguf) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
    ] {
        let id = token_str(cfg.get(format!("{name}_token")))
            .and_then(|s| tok.token_to_id(&s))
            .or_else(|| {
                model_cfg[format!("{name}_token_id")]
                    .as_u64()
                    .map(|i| i as u32)
            })
            .or(match name {
                "bos" => tok.bos,
                "eos" => tok.eos.first().copied(),
                _ => None,
            });
        if let Some(id) = id.filter(|&i| (i as usize) < vocab_size) {
            meta.push((gguf.into(), Value::U32(id)));
        }
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.add_bos),
    ));
    meta.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(tok.add_eos),
    ));
    if let Some(t) = tok.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(meta)
}

/// A unigram SentencePiece (T5's `spiece.model`) as llama.cpp's `t5` vocabulary: the pieces
/// with their scores and types, the sentinels after them as user-defined tokens (score -1000,
/// as its converter writes them), and the normalizer's charsmap and whitespace rules.
fn unigram(
    dir: &Path,
    path: &Path,
    m: spm::SpmModel,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    if m.pieces.len() > vocab_size {
        return Err(too_many(path, m.pieces.len(), vocab_size));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut scores = vec![-1000f32; vocab_size];
    for (i, p) in m.pieces.iter().enumerate() {
        tokens[i] = Some(p.text.clone());
        types[i] = p.kind;
        scores[i] = p.score;
    }
    for (id, text, _) in super::added_tokens(dir, m.pieces.len())? {
        let id = id as usize;
        if id >= vocab_size {
            return Err(too_many(path, id + 1, vocab_size));
        }
        if id >= m.pieces.len() {
            tokens[id] = Some(text);
            types[id] = USER_DEFINED;
        }
    }
    let mut meta = scored_vocab("t5", tokens, scores, types);
    meta.extend([
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(m.add_dummy_prefix),
        ),
        (
            "tokenizer.ggml.remove_extra_whitespaces".into(),
            Value::Bool(m.remove_extra_whitespaces),
        ),
    ]);
    if !m.charsmap.is_empty() {
        meta.push((
            "tokenizer.ggml.precompiled_charsmap".into(),
            Value::Array(m.charsmap.into_iter().map(Value::U8).collect()),
        ));
    }
    Ok(meta)
}

/// A SentencePiece vocabulary's keys (`llama` or `t5`), padded to the model's rows.
fn scored_vocab(
    model: &str,
    tokens: Vec<Option<String>>,
    scores: Vec<f32>,
    types: Vec<i32>,
) -> Vec<(String, Value)> {
    let (tokens, types) = padded(tokens, types);
    vec![
        ("tokenizer.ggml.model".into(), Value::String(model.into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
    ]
}

fn too_many(path: &Path, tokens: usize, vocab_size: usize) -> Error {
    Error::file(
        path,
        format!("the tokenizer has {tokens} tokens, more than the model's vocab_size {vocab_size}"),
    )
}

/// Tokens with their types, padded to `vocab_size` with llama.cpp's `[PAD{i}]` entries.
fn padded(tokens: Vec<Option<String>>, mut types: Vec<i32>) -> (Vec<Value>, Vec<Value>) {
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    (tokens, types.into_iter().map(Value::I32).collect())
}

fn sentencepiece(
    dir: &Path,
    path: &Path,
    pieces: Vec<spm::Piece>,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    if pieces.len() > vocab_size {
        return Err(too_many(path, pieces.len(), vocab_size));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut scores = vec![-1000f32; vocab_size];
    for (i, p) in pieces.iter().enumerate() {
        tokens[i] = Some(p.text.clone());
        types[i] = p.kind;
        scores[i] = p.score;
    }
    // Tokens added on top of the SentencePiece model (Phi-3's chat markers); the model's own
    // pieces keep their types (<unk> stays unknown, <s> control).
    for (id, text, special) in super::added_tokens(dir, pieces.len())? {
        let id = id as usize;
        if id >= vocab_size {
            return Err(too_many(path, id + 1, vocab_size));
        }
        if id < pieces.len() && pieces[id].kind != NORMAL {
            continue;
        }
        tokens[id] = Some(text);
        types[id] = if special { CONTROL } else { USER_DEFINED };
        scores[id] = 0.0;
    }
    Ok(scored_vocab("llama", tokens, scores, types))
}

/// A SentencePiece vocabulary from its `tokenizer.json` form (a byte-fallback BPE, as
/// transformers converts SentencePiece models, or as `slm convert` writes a GGUF's): llama.cpp
/// merges the adjacent pair whose result scores highest, so each piece scores minus the rank
/// of the first merge that makes it, which replays the BPE's merge order.
fn sentencepiece_json(path: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    const UNKNOWN: i32 = 2;
    const BYTE: i32 = 6;
    let doc = read_json(path)?;
    let model = &doc["model"];
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut scores = vec![0f32; vocab_size];
    let mut by_text = std::collections::HashMap::new();
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id.as_u64().unwrap_or(u64::MAX) as usize;
        let slot = tokens
            .get_mut(id)
            .ok_or_else(|| too_many(path, id + 1, vocab_size))?;
        *slot = Some(t.clone());
        by_text.insert(t.clone(), id);
        let byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        if byte {
            types[id] = BYTE;
        }
    }
    for (rank, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let merged = match m {
            Json::Array(p) => p.iter().filter_map(Json::as_str).collect::<String>(),
            Json::String(s) => s.replacen(' ', "", 1),
            _ => continue,
        };
        if let Some(&id) = by_text.get(&merged) {
            if scores[id] == 0.0 {
                scores[id] = -(rank as f32) - 1.0;
            }
        }
    }
    if let Some(&id) = model["unk_token"].as_str().and_then(|u| by_text.get(u)) {
        types[id] = UNKNOWN;
    }
    for a in doc["added_tokens"].as_array().into_iter().flatten() {
        let Some(id) = a["id"].as_u64().map(|i| i as usize) else {
            continue;
        };
        let slot = tokens
            .get_mut(id)
            .ok_or_else(|| too_many(path, id + 1, vocab_size))?;
        *slot = a["content"].as_str().map(String::from);
        if types[id] != UNKNOWN {
            types[id] = if a["special"] == true {
                CONTROL
            } else {
                USER_DEFINED
            };
        }
    }
    // No "▁" before the text when the normalizer does not prepend one (Gemma).
    let prepends = doc["normalizer"].to_string().contains("Prepend");
    let mut meta = scored_vocab("llama", tokens, scores, types);
    meta.push((
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(prepends),
    ));
    Ok(meta)
}

fn byte_level_bpe(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tj = dir.join("tokenizer.json");
    let (doc, path) = if tj.exists() {
        (read_json(&tj)?, tj)
    } else if let Some((v, m)) = super::bpe_files(dir) {
        (super::gpt2_json(&v, &m, super::is_roberta_style(dir))?, v)
    } else {
        return Err(Error::file(
            dir,
            "GGUF export needs tokenizer.json, vocab.json + merges.txt, or tokenizer.model",
        ));
    };
    let model = &doc["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(Error::file(
            &path,
            "GGUF export reads byte-level BPE from tokenizer.json; a SentencePiece tokenizer needs its tokenizer.model beside it",
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id.as_u64().unwrap_or(u64::MAX) as usize;
        let slot = tokens
            .get_mut(id)
            .ok_or_else(|| too_many(&path, id + 1, vocab_size))?;
        *slot = Some(t.clone());
    }
    for a in doc["added_tokens"].as_array().into_iter().flatten() {
        let Some(id) = a["id"].as_u64().map(|i| i as usize) else {
            continue;
        };
        if id >= vocab_size {
            return Err(too_many(&path, id + 1, vocab_size));
        }
        tokens[id] = a["content"].as_str().map(String::from);
        types[id] = if a["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
    }
    let (tokens, types) = padded(tokens, types);
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&doc).into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ])
}

/// llama.cpp's name for the pre-tokenizer, from the shape of tokenizer.json's: which regex
/// splits the text before BPE.
fn pre_tokenizer_name(tok: &Json) -> &'static str {
    let pre = &tok["pre_tokenizer"];
    let parts: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = parts.iter().filter_map(|p| p["type"].as_str()).collect();
    let digits = parts
        .iter()
        .any(|p| p["type"] == "Digits" && p["individual_digits"] == true);
    let split_regex = parts
        .iter()
        .find_map(|p| p["pattern"]["Regex"].as_str())
        .unwrap_or("");
    if digits && kinds.contains(&"ByteLevel") {
        // StarCoder's split (digits one by one, then GPT-2's regex): SmolLM, SmolLM2.
        "smollm"
    } else if split_regex.contains("\\p{N}{1,3}") {
        "llama-bpe"
    } else if split_regex.contains("\\p{N}") && split_regex.contains("(?i:'s") {
        "qwen2"
    } else {
        // llama.cpp spells GPT-2's own split with a hyphen.
        "gpt-2"
    }
}
