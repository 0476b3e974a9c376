//! GGUF to a Hugging Face folder (safetensors, config.json, tokenizer.json and
//! tokenizer_config.json), so a model that only ships as GGUF can be fine-tuned and loaded by
//! transformers. Tensors come through the same `WeightStore` the models load from, so llama.cpp's
//! names are mapped back and the Q/K row permutation is undone exactly as for inference.

use std::path::Path;

use candle_core::DType;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::WeightStore;
use crate::models::{llama, ModelConfig};

/// Dtypes a converted folder can hold.
pub fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => return None,
    })
}

fn llama_names(c: &llama::Config) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for i in 0..c.num_hidden_layers {
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{i}.{n}"));
        }
    }
    if !c.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

fn config_json(c: &llama::Config, g: &GgufFile, dtype: DType) -> Value {
    let id = |k: &str| g.meta_u64(k);
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.n_kv_heads(),
        "head_dim": c.head_dim(),
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "torch_dtype": match dtype { DType::F16 => "float16", DType::BF16 => "bfloat16", _ => "float32" },
    })
}

/// Writes `out` (a new folder) from the GGUF file `src`. Each file is written atomically.
pub fn gguf_to_hf(src: &Path, out: &Path, dtype: DType, force: bool) -> Result<Vec<String>> {
    let g = GgufFile::open_shared(src)?;
    let ModelConfig::Llama(cfg) = ModelConfig::from_gguf(&g)? else {
        return Err(Error::file(src, "converting this architecture to a Hugging Face folder is not supported yet (llama family only)"));
    };
    if cfg.variant != llama::Variant::Llama {
        return Err(Error::file(src, "converting this architecture to a Hugging Face folder is not supported yet (llama family only)"));
    }
    if out.join("model.safetensors").exists() && !force {
        return Err(Error::file(
            out,
            "already holds a model.safetensors (pass --force to overwrite)",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors = Vec::new();
    for name in llama_names(&cfg).into_iter().filter(|n| g.contains(n)) {
        let t = g.load(&name, false)?.into_dense()?.to_dtype(dtype)?;
        tensors.push((name, t));
    }
    let st_dtype = match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    };
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let raw = match dtype {
                DType::F16 => t
                    .flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                DType::BF16 => t
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            };
            Ok((n.clone(), raw, t.dims().to_vec()))
        })
        .collect::<Result<_>>()?;
    let views = bytes
        .iter()
        .map(|(n, b, shape)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::msg(format!("internal: tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let data =
        safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::msg(e.to_string()))?;
    let write = |name: &str, bytes: &[u8]| {
        crate::io::write::write_atomic(&out.join(name), |w| std::io::Write::write_all(w, bytes))
    };
    write("model.safetensors", &data)?;
    write(
        "config.json",
        serde_json::to_string_pretty(&config_json(&cfg, &g, dtype))
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let tok = crate::tokenize::Tokenizer::from_gguf(&g)?;
    let mut doc = crate::tokenize::gguf_vocab::tokenizer_json(&g)?;
    let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let bos = token(tok.bos);
    if let (true, Some(b)) = (tok.add_bos, &bos) {
        // As transformers' Llama converter: BOS added by the post-processor.
        doc["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [tok.bos], "tokens": [b]}}
        });
    }
    write("tokenizer.json", doc.to_string().as_bytes())?;
    let tc = json!({
        "bos_token": bos,
        "eos_token": token(tok.eos.first().copied()),
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "chat_template": tok.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tc)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(tensors.into_iter().map(|(n, _)| n).collect())
}
