//! A GGUF file from a Hugging Face folder (Llama family), as llama.cpp's `convert_hf_to_gguf.py`
//! followed by `llama-quantize` writes it: tensors renamed, the Llama Q/K rows permuted for
//! llama.cpp's rotary layout, the tokenizer (byte-level BPE) and chat template in the metadata.
//! An optional PEFT adapter is merged on the way, so a fine-tuned model deploys in one step.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use serde_json::Value as Json;

use super::{
    check_output, file_type, quantize_tensor, tensor_type, write_gguf, GgmlDType, Summary,
};
use crate::error::{Error, Result};
use crate::io::gguf::{gguf_name, unpermute_qk_rows};
use crate::io::peft::{AdaptedStore, PeftAdapter};
use crate::io::{open_weights, ModelFiles, WeightFormat, WeightStore};
use crate::models::llama::{Config, Variant};
use crate::models::{config_of, ModelConfig};

pub fn quantize_hf(
    src: &Path,
    adapter: Option<&Path>,
    want: GgmlDType,
    out: &Path,
    force: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    check_output(out, force)?;
    let files = ModelFiles::locate(src)?;
    if let WeightFormat::Gguf(p) = &files.format {
        return Err(Error::file(p, "is a GGUF file; quantize it directly"));
    }
    let ModelConfig::Llama(cfg) = config_of(&files)? else {
        return Err(Error::file(
            &files.root,
            "GGUF export supports the Llama family (Llama, SmolLM2, TinyLlama, Qwen2)",
        ));
    };
    let arch = match cfg.variant {
        Variant::Llama => "llama",
        Variant::Qwen2 => "qwen2",
        Variant::Phi3 => {
            return Err(Error::file(
                &files.root,
                "GGUF export of Phi-3 is not supported yet",
            ))
        }
    };
    if cfg
        .rope_scaling
        .as_ref()
        .is_some_and(|s| s.rope_type.as_deref().is_some_and(|t| t != "default"))
    {
        return Err(Error::file(
            &files.root,
            "GGUF export of a model with rope_scaling is not supported yet",
        ));
    }
    let mut store: std::sync::Arc<dyn WeightStore> = open_weights(&files)?;
    if let Some(dir) = adapter {
        store = std::sync::Arc::new(AdaptedStore::new(store, PeftAdapter::open(dir)?)?);
    }
    let mut meta = model_metadata(&cfg, arch, &files.root, want);
    meta.extend(tokenizer_metadata(&files.root, cfg.vocab_size)?);

    let tied = cfg.tie_word_embeddings || !store.contains("lm_head.weight");
    let names: Vec<String> = store
        .tensors()
        .into_iter()
        .map(|t| t.name)
        .filter(|n| {
            // A tied head is the embedding; rotary tables are recomputed by llama.cpp.
            let skip = (tied && n == "lm_head.weight") || n.ends_with("rotary_emb.inv_freq");
            !skip
        })
        .collect();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut summary = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let g = gguf_name(arch, name).ok_or_else(|| {
            Error::file(
                store.file_of(name),
                format!("no GGUF name for tensor '{name}'"),
            )
        })?;
        let mut t = store.load(name, false)?.into_dense()?;
        let heads = match (arch, name) {
            ("llama", n) if n.contains("self_attn.q_proj.weight") => Some(cfg.num_attention_heads),
            ("llama", n) if n.contains("self_attn.k_proj.weight") => Some(cfg.n_kv_heads()),
            _ => None,
        };
        if let Some(h) = heads {
            t = permute_qk(&t, h)?;
        }
        let dims = t.dims().to_vec();
        let target = tensor_type(&g, &dims, want, !tied)?;
        tensors.push((g.clone(), quantize_tensor(&t, target)?));
        summary.push((g, GgmlDType::F32, target));
        progress(i + 1, names.len());
    }
    write_gguf(out, &meta, &tensors, summary)
}

/// HF row order to llama.cpp's: the inverse of [`unpermute_qk_rows`].
fn permute_qk(t: &candle_core::Tensor, heads: usize) -> Result<candle_core::Tensor> {
    let rows = t.dim(0)?;
    let src_of_dst = unpermute_qk_rows(rows, heads);
    let mut inverse = vec![0u32; rows];
    for (hf, &gguf) in src_of_dst.iter().enumerate() {
        inverse[gguf] = hf as u32;
    }
    let idx = candle_core::Tensor::from_vec(inverse, rows, t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

fn model_metadata(c: &Config, arch: &str, root: &Path, want: GgmlDType) -> Vec<(String, Value)> {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let u = |v: usize| Value::U32(v as u32);
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(file_type(want))),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_attention_heads)),
        (k("attention.head_count_kv"), u(c.n_kv_heads())),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.dimension_count"), u(c.head_dim())),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("vocab_size"), u(c.vocab_size)),
    ]
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, e))
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
        "gpt2"
    }
}

/// The `tokenizer.ggml.*` keys for a byte-level BPE tokenizer.json.
fn tokenizer_metadata(root: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tok_path = root.join("tokenizer.json");
    let tok = read_json(&tok_path)?;
    let model = &tok["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(Error::file(
            &tok_path,
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style) only for now",
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t.clone());
        }
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let Some(id) = a["id"]
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < vocab_size)
        else {
            continue;
        };
        tokens[id] = a["content"].as_str().map(String::from);
        types[id] = if a["special"] == true { 3 } else { 4 };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
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
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&tok).into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let cfg = read_json(&root.join("tokenizer_config.json")).unwrap_or(Json::Null);
    let id_of = |key: &str| -> Option<u32> {
        let v = &cfg[key];
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        model["vocab"][text]
            .as_u64()
            .or_else(|| {
                tok["added_tokens"]
                    .as_array()?
                    .iter()
                    .find(|a| a["content"] == text)?["id"]
                    .as_u64()
            })
            .map(|i| i as u32)
    };
    for (key, gguf) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = id_of(key) {
            meta.push((gguf.into(), Value::U32(id)));
        }
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(cfg["add_bos_token"].as_bool().unwrap_or(false)),
    ));
    if let Some(t) = cfg["chat_template"].as_str() {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(meta)
}
