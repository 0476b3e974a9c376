//! GGUF to a Hugging Face folder (safetensors, config.json, tokenizer.json and
//! tokenizer_config.json), so a model that only ships as GGUF can be fine-tuned and loaded by
//! transformers. Tensors come through the same `WeightStore` the models load from, so llama.cpp's
//! names are mapped back and the Q/K row permutation is undone exactly as for inference.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::gguf::{hf_name, GgufFile, GPT2_CONV1D};
use crate::io::WeightStore;
use crate::models::{gemma, gpt2, llama, t5, ModelConfig};
use crate::nn::RopeScaling;

/// The element types a converted folder can hold.
pub use safetensors::Dtype;

/// Dtypes a converted folder can hold.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "f32" => Dtype::F32,
        "f16" => Dtype::F16,
        "bf16" => Dtype::BF16,
        _ => return None,
    })
}

fn torch_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// GGUF tensors that are not weights of the HF model: RoPE divisors become `rope_scaling`.
const NOT_WEIGHTS: [&str; 1] = ["rope_freqs.weight"];

/// Writes `out` (a new folder) from the GGUF file `src`. Each file is written atomically.
/// Returns the HF names of the tensors written.
pub fn gguf_to_hf(src: &Path, out: &Path, dtype: Dtype, force: bool) -> Result<Vec<String>> {
    let g = GgufFile::open_shared(src)?;
    let config = ModelConfig::from_gguf(&g)?;
    let arch = config.architecture().name();
    if out.join("model.safetensors").exists() && !force {
        return Err(Error::file(
            out,
            "already holds a model.safetensors (pass --force to overwrite)",
        ));
    }
    // GPT-2 files carry the tied head twice (llama.cpp's GPT-2 wants its own output tensor).
    let duplicate_head = matches!(config, ModelConfig::Gpt2(_))
        && g.raw("output.weight").map(|(t, _, b)| (t, b))
            == g.raw("token_embd.weight").map(|(t, _, b)| (t, b));
    let mut names = Vec::new();
    let mut gguf_names: Vec<&String> = g.content.tensor_infos.keys().collect();
    gguf_names.sort();
    for gname in gguf_names {
        if NOT_WEIGHTS.contains(&gname.as_str()) || (duplicate_head && gname == "output.weight") {
            continue;
        }
        let mut name = hf_name(arch, gname).ok_or_else(|| {
            Error::file(
                src,
                format!("tensor '{gname}' has no Hugging Face name for {arch}"),
            )
        })?;
        // T5's `ffn_up` is `wi_1` beside a gate, else ReLU's `wi`.
        if arch == "t5"
            && !g
                .content
                .tensor_infos
                .contains_key(&gname.replace("ffn_up", "ffn_gate"))
        {
            name = name.replace("DenseReluDense.wi_1.", "DenseReluDense.wi.");
        }
        names.push(name);
    }
    let tied = !names.iter().any(|n| n == "lm_head.weight");
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let mut t = g.load(name, false)?.into_dense()?;
        if arch == "gpt2" && t.rank() == 2 && GPT2_CONV1D.iter().any(|m| name.contains(m)) {
            t = t.t()?.contiguous()?;
        }
        tensors.push((
            name.clone(),
            t.dims().to_vec(),
            t.flatten_all()?.to_vec1::<f32>()?,
        ));
    }
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::write::write_safetensors_as(
        &out.join("model.safetensors"),
        &views,
        dtype,
        Some(meta),
    )?;
    let write = |name: &str, bytes: &[u8]| {
        crate::io::write::write_atomic(&out.join(name), |w| std::io::Write::write_all(w, bytes))
    };
    let id = |k: &str| g.meta_u64(k);
    let mut cfg = match &config {
        ModelConfig::Llama(c) => llama_config(c, &g)?,
        ModelConfig::Gpt2(c) => gpt2_config(c),
        ModelConfig::Gemma(c) => gemma_config(c),
        ModelConfig::T5(c) => t5_config(c),
        ModelConfig::Bert(_) | ModelConfig::Rnn(_) | ModelConfig::Bart(_) => {
            unreachable!("from_gguf builds neither encoders, BART nor recurrent models")
        }
    };
    cfg["bos_token_id"] = json!(id("tokenizer.ggml.bos_token_id"));
    cfg["eos_token_id"] = json!(id("tokenizer.ggml.eos_token_id"));
    cfg["tie_word_embeddings"] = json!(tied);
    cfg["torch_dtype"] = json!(torch_dtype(dtype));
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    write_tokenizer(&g, out, config.context_length())?;
    Ok(names)
}

/// A Gemma config.json in transformers 4.x's layout (5.x reads it too), with every layer's type
/// spelled out.
fn gemma_config(c: &gemma::Config) -> Value {
    let (architecture, model_type) = match c.variant {
        gemma::Variant::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
        gemma::Variant::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    let layer_types: Vec<&str> = (0..c.num_hidden_layers)
        .map(|i| match c.is_sliding(i) {
            true => "sliding_attention",
            false => "full_attention",
        })
        .collect();
    let rope_scaling = c
        .rope_scaling
        .as_ref()
        .filter(|s| s.is_scaled())
        .map(|s| json!({ "rope_type": s.rope_type, "factor": s.factor }));
    let mut cfg = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.n_kv_heads(),
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": short(c.rms_norm_eps),
        "rope_theta": short(c.rope_theta),
        "rope_scaling": rope_scaling,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window,
        "layer_types": layer_types,
        "final_logit_softcapping": c.final_logit_softcapping,
        "attn_logit_softcapping": c.attn_logit_softcapping,
        "attention_bias": false,
    });
    if c.variant == gemma::Variant::Gemma3 {
        cfg["rope_local_base_freq"] = json!(c.local_theta());
    }
    cfg
}

fn llama_config(c: &llama::Config, g: &GgufFile) -> Result<Value> {
    let (architecture, model_type) = match c.variant {
        llama::Variant::Llama => ("LlamaForCausalLM", "llama"),
        llama::Variant::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        llama::Variant::Phi3 => ("Phi3ForCausalLM", "phi3"),
    };
    let mut cfg = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.n_kv_heads(),
        "head_dim": c.head_dim(),
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": short(c.rms_norm_eps),
        "rope_theta": short(c.rope_theta),
        "rope_scaling": rope_scaling_json(c, g)?,
        "hidden_act": "silu",
    });
    match c.variant {
        llama::Variant::Llama => {
            cfg["attention_bias"] = json!(false);
            cfg["mlp_bias"] = json!(false);
        }
        llama::Variant::Qwen2 => {
            cfg["use_sliding_window"] = json!(false);
            cfg["sliding_window"] = json!(c.max_position_embeddings);
        }
        llama::Variant::Phi3 => {
            cfg["sliding_window"] = json!(c.sliding_window);
            cfg["original_max_position_embeddings"] = json!(c
                .rope_scaling
                .as_ref()
                .and_then(|s| s.original_max_position_embeddings)
                .unwrap_or(c.max_position_embeddings));
        }
    }
    Ok(cfg)
}

/// transformers' `rope_scaling` for what the GGUF file records: a linear factor, or llama.cpp's
/// divisors turned back into Llama 3's parameters.
fn rope_scaling_json(c: &llama::Config, g: &GgufFile) -> Result<Value> {
    let Some(s) = c.rope_scaling.as_ref() else {
        return Ok(Value::Null);
    };
    if let Some(f) = &s.freq_factors {
        let fit = crate::nn::rope::llama3_from_factors(
            c.head_dim(),
            c.rope_theta,
            f,
            s.original_max_position_embeddings,
        )
        .ok_or_else(|| {
            Error::file(
                &g.path,
                "rope_freqs.weight holds divisors that no transformers rope_scaling reproduces",
            )
        })?;
        return Ok(scaling_json(&fit));
    }
    Ok(scaling_json(s))
}

fn scaling_json(s: &RopeScaling) -> Value {
    let mut v = json!({"rope_type": s.rope_type, "factor": s.factor});
    if s.rope_type.as_deref() == Some("llama3") {
        v["low_freq_factor"] = json!(s.low_freq_factor);
        v["high_freq_factor"] = json!(s.high_freq_factor);
        v["original_max_position_embeddings"] = json!(s.original_max_position_embeddings);
    }
    v
}

/// GGUF keeps these as f32: write the shortest decimal that reads back as that f32 (1e-5, not
/// 9.999999747378752e-6), as the original config had it.
fn short(x: f64) -> f64 {
    format!("{}", x as f32).parse().unwrap_or(x)
}

fn t5_config(c: &t5::Config) -> Value {
    json!({
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": true,
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_decoder_layers": c.decoder_layers(),
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "layer_norm_epsilon": short(c.layer_norm_epsilon),
        "feed_forward_proj": c.feed_forward_proj,
        "pad_token_id": c.pad_token_id,
        "decoder_start_token_id": c.decoder_start(),
    })
}

fn gpt2_config(c: &gpt2::Config) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "layer_norm_epsilon": short(c.layer_norm_epsilon),
        "activation_function": "gelu_new",
    })
}

/// tokenizer.json and tokenizer_config.json from the GGUF vocabulary.
fn write_tokenizer(g: &GgufFile, out: &Path, context: usize) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        crate::io::write::write_atomic(&out.join(name), |w| std::io::Write::write_all(w, bytes))
    };
    let tok = crate::tokenize::Tokenizer::from_gguf(g)?;
    let mut doc = crate::tokenize::gguf_vocab::tokenizer_json(g)?;
    let token = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let bos = token(tok.bos);
    let eos = token(tok.eos.first().copied());
    // As transformers' converters: BOS before each text (Llama's), EOS after it (T5's), added by
    // the post-processor.
    let bos_added = bos.clone().filter(|_| tok.add_bos);
    let eos_added = eos.clone().filter(|_| tok.add_eos);
    if bos_added.is_some() || eos_added.is_some() {
        let special = |t: &Option<String>, type_id: u32| {
            t.iter()
                .map(|t| json!({"SpecialToken": {"id": t, "type_id": type_id}}))
                .collect::<Vec<_>>()
        };
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let part = |id: &str, type_id: u32| {
            let mut p = special(&bos_added, type_id);
            p.push(seq(id, type_id));
            p.extend(special(&eos_added, type_id));
            p
        };
        let mut pair = part("A", 0);
        pair.extend(part("B", 1));
        let mut specials = serde_json::Map::new();
        for (t, id) in [
            (&bos_added, tok.bos),
            (&eos_added, tok.eos.first().copied()),
        ] {
            if let Some(t) = t {
                specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
        }
        doc["post_processor"] = json!({
            "type": "TemplateProcessing", "single": part("A", 0), "pair": pair,
            "special_tokens": specials
        });
    }
    write("tokenizer.json", doc.to_string().as_bytes())?;
    if tok.eos.len() > 1 {
        // Several ends of generation (Gemma's <eos> and <end_of_turn>): transformers reads
        // them from generation_config.json.
        let gc = json!({"bos_token_id": tok.bos, "eos_token_id": tok.eos});
        write("generation_config.json", gc.to_string().as_bytes())?;
    }
    let tc = json!({
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "chat_template": tok.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
        // Decoders take no token_type_ids (the generic fast tokenizer would return them).
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": context,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tc)
            .unwrap_or_default()
            .as_bytes(),
    )
}
