//! A GGUF file from a Hugging Face folder (GPT-2, Llama, Qwen2, Phi-3, Gemma, T5), as llama.cpp's
//! `convert_hf_to_gguf.py` followed by `llama-quantize` writes it: tensors renamed, the Llama Q/K
//! rows permuted for llama.cpp's rotary layout, GPT-2's Conv1D weights transposed, RoPE scaling
//! as llama.cpp keeps it, the tokenizer (byte-level BPE or SentencePiece) and chat template in the
//! metadata. An optional PEFT adapter is merged on the way, so a fine-tuned model deploys in one
//! step.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;

use super::{
    check_output, file_type, quantize_tensor, tensor_type, write_gguf, GgmlDType, Summary,
};
use crate::error::{Error, Result};
use crate::io::gguf::{gemma_norm, gguf_name, unpermute_qk_rows, GPT2_CONV1D};
use crate::io::peft::{AdaptedStore, PeftAdapter};
use crate::io::{open_weights, ModelFiles, WeightFormat, WeightStore};
use crate::models::llama::{Config, Variant};
use crate::models::{config_of, gemma, gpt2, t5, ModelConfig};
use crate::nn::Activation;
use crate::tokenize::to_gguf;

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
    let config = config_of(&files)?;
    let arch = config.architecture().name();
    let mut meta = match &config {
        ModelConfig::Llama(c) => llama_metadata(c, arch, &files.root)?,
        ModelConfig::Gpt2(c) => gpt2_metadata(c, &files.root)?,
        ModelConfig::Gemma(c) => gemma_metadata(c, arch, &files.root)?,
        ModelConfig::T5(c) => t5_metadata(c, &files.root)?,
        ModelConfig::Bert(_) | ModelConfig::Rnn(_) | ModelConfig::Bart(_) => {
            return Err(Error::file(
                &files.root,
                format!(
                    "GGUF export covers gpt2, llama, qwen2, phi3, gemma2, gemma3 and t5 (llama.cpp's architectures), not '{arch}'"
                ),
            ))
        }
    };
    meta.insert(
        0,
        ("general.architecture".into(), Value::String(arch.into())),
    );
    meta.push(("general.file_type".into(), Value::U32(file_type(want))));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    meta.extend(to_gguf::gguf_metadata(&files.root, config.vocab_size())?);

    let mut store: std::sync::Arc<dyn WeightStore> = open_weights(&files)?;
    if let Some(dir) = adapter {
        store = std::sync::Arc::new(AdaptedStore::new(store, PeftAdapter::open(dir)?)?);
    }
    let tied = match &config {
        ModelConfig::Llama(c) => c.tie_word_embeddings || !store.contains("lm_head.weight"),
        ModelConfig::T5(c) => c.tie_word_embeddings || !store.contains("lm_head.weight"),
        _ => !store.contains("lm_head.weight"),
    };
    // T5 files may hold the one embedding table up to three times: `shared` first, as
    // llama.cpp's converter keeps the first it meets.
    let t5_tables = [
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
    ];
    let t5_table = match config {
        ModelConfig::T5(_) => t5_tables.into_iter().find(|n| store.contains(n)),
        _ => None,
    };
    let gpt2 = matches!(config, ModelConfig::Gpt2(_));
    // (GGUF name, HF name): rotary tables and attention-mask buffers are not weights, and a tied
    // head is the embedding itself; llama.cpp's GPT-2 still wants its own output tensor.
    let mut plan: Vec<(String, String)> = Vec::new();
    for name in store.tensors().into_iter().map(|t| t.name) {
        let buffer = ["rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"]
            .iter()
            .any(|b| name.ends_with(b));
        if buffer || (tied && name == "lm_head.weight") {
            continue;
        }
        if t5_table.is_some() && t5_tables.contains(&name.as_str()) {
            if t5_table == Some(name.as_str()) {
                plan.push(("token_embd.weight".into(), name));
            }
            continue;
        }
        let g = gguf_name(arch, &name).ok_or_else(|| {
            Error::file(
                store.file_of(&name),
                format!("no GGUF name for tensor '{name}'"),
            )
        })?;
        plan.push((g, name));
    }
    if gpt2 && tied {
        plan.push(("output.weight".into(), "transformer.wte.weight".into()));
    }
    let has_output = plan.iter().any(|(g, _)| g == "output.weight");
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(plan.len() + 1);
    let mut summary = Vec::with_capacity(plan.len() + 1);
    if let Some(f) = rope_freqs(&config)? {
        let n = f.len();
        let t = candle_core::Tensor::from_vec(f, n, &candle_core::Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            quantize_tensor(&t, GgmlDType::F32)?,
        ));
        summary.push(("rope_freqs.weight".into(), GgmlDType::F32, GgmlDType::F32));
    }
    for (i, (g, name)) in plan.iter().enumerate() {
        let mut t = store.load(name, false)?.into_dense()?;
        if let ModelConfig::Llama(c) = &config {
            // llama.cpp rotates adjacent pairs for `llama`: Q and K rows are interleaved.
            let heads = match name {
                _ if arch != "llama" => None,
                n if n.contains("self_attn.q_proj.") => Some(c.num_attention_heads),
                n if n.contains("self_attn.k_proj.") => Some(c.n_kv_heads()),
                _ => None,
            };
            if let Some(h) = heads {
                t = permute_qk(&t, h)?;
            }
        }
        if gemma_norm(arch, name) {
            // llama.cpp's Gemma norms hold the gain itself, 1 + w.
            t = (t + 1.0)?;
        }
        if gpt2 && t.rank() == 2 && GPT2_CONV1D.iter().any(|m| name.contains(m)) {
            // GPT-2's Conv1D keeps weights as [in, out]; GGUF as every linear layer, [out, in].
            t = t.t()?.contiguous()?;
        }
        let dims = t.dims().to_vec();
        let target = tensor_type(g, &dims, want, has_output)?;
        tensors.push((g.clone(), quantize_tensor(&t, target)?));
        summary.push((g.clone(), GgmlDType::F32, target));
        progress(i + 1, plan.len());
    }
    write_gguf(out, &meta, &tensors, summary)
}

/// llama.cpp keeps Llama 3's frequency scaling as a tensor of divisors, one per frequency.
fn rope_freqs(config: &ModelConfig) -> Result<Option<Vec<f32>>> {
    let ModelConfig::Llama(c) = config else {
        return Ok(None);
    };
    match c.rope_scaling.as_ref() {
        Some(s) if s.rope_type.as_deref() == Some("llama3") => Ok(Some(
            crate::nn::rope::freq_factors(c.head_dim(), c.rope_theta, s)?,
        )),
        _ => Ok(None),
    }
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

/// Linear RoPE scaling as llama.cpp records it.
fn linear_rope(arch: &str, s: &crate::nn::RopeScaling) -> [(String, Value); 2] {
    [
        (
            format!("{arch}.rope.scaling.type"),
            Value::String("linear".into()),
        ),
        (
            format!("{arch}.rope.scaling.factor"),
            Value::F32(s.factor.unwrap_or(1.0) as f32),
        ),
    ]
}

fn u(v: usize) -> Value {
    Value::U32(v as u32)
}

fn model_name(root: &Path) -> (String, Value) {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    ("general.name".into(), Value::String(name))
}

fn llama_metadata(c: &Config, arch: &str, root: &Path) -> Result<Vec<(String, Value)>> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta = vec![
        model_name(root),
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
    ];
    if c.head_dim() * c.num_attention_heads != c.hidden_size {
        meta.push((k("attention.key_length"), u(c.head_dim())));
        meta.push((k("attention.value_length"), u(c.head_dim())));
    }
    if c.variant == Variant::Phi3 {
        // llama.cpp requires it for Phi-3; a window as long as the context is no window.
        let window = c.sliding_window.unwrap_or(c.max_position_embeddings);
        meta.push((k("attention.sliding_window"), u(window)));
    }
    let scaling = c.rope_scaling.as_ref().filter(|s| s.is_scaled());
    // Phi-3 always records its original context (llama.cpp requires it), others when scaled.
    let original = scaling
        .and_then(|s| s.original_max_position_embeddings)
        .or((c.variant == Variant::Phi3).then_some(c.max_position_embeddings));
    if let Some(n) = original {
        meta.push((k("rope.scaling.original_context_length"), u(n)));
    }
    let unsupported = |t: &str| {
        Err(Error::file(
            root,
            format!("GGUF export of rope_scaling '{t}' for {arch} is not supported (supported: linear; llama3 for llama)"),
        ))
    };
    if let Some(s) = scaling {
        match s.rope_type.as_deref() {
            Some("linear") => meta.extend(linear_rope(arch, s)),
            Some("llama3") if arch == "llama" => {}
            other => return unsupported(other.unwrap_or("?")),
        }
    }
    Ok(meta)
}

/// Gemma's facts as llama.cpp reads them. What llama.cpp computes on its own (the query scale
/// from the head size, GELU-tanh, no biases) must be what the config says, or the file would
/// hold another model: refused by name.
fn gemma_metadata(c: &gemma::Config, arch: &str, root: &Path) -> Result<Vec<(String, Value)>> {
    let k = |s: &str| format!("{arch}.{s}");
    let refuse = |what: String| Err(Error::file(root, format!("GGUF export of {arch}: {what}")));
    let llama_cpp_scalar = gemma::llama_cpp_query_scalar(
        c.variant,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.head_dim,
    );
    if c.query_pre_attn_scalar != llama_cpp_scalar as f64 {
        return refuse(format!(
            "query_pre_attn_scalar {} is not what llama.cpp uses for this model ({llama_cpp_scalar})",
            c.query_pre_attn_scalar
        ));
    }
    if c.activation() != Activation::GeluNew || c.attention_bias {
        return refuse("llama.cpp's Gemma has GELU-tanh and no attention biases".into());
    }
    let mut meta = vec![
        model_name(root),
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("block_count"), u(c.num_hidden_layers)),
        (k("feed_forward_length"), u(c.intermediate_size)),
        (k("attention.head_count"), u(c.num_attention_heads)),
        (k("attention.head_count_kv"), u(c.n_kv_heads())),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.freq_base_swa"), Value::F32(c.local_theta() as f32)),
        (k("rope.dimension_count"), u(c.head_dim)),
        (
            k("attention.sliding_window_pattern"),
            Value::Array(
                (0..c.num_hidden_layers)
                    .map(|i| Value::Bool(c.is_sliding(i)))
                    .collect(),
            ),
        ),
    ];
    if let Some(w) = c.sliding_window {
        meta.push((k("attention.sliding_window"), u(w)));
    }
    for (key, cap) in [
        ("attn_logit_softcapping", c.attn_logit_softcapping),
        ("final_logit_softcapping", c.final_logit_softcapping),
    ] {
        if let Some(cap) = cap {
            meta.push((k(key), Value::F32(cap)));
        }
    }
    if let Some(s) = c.rope_scaling.as_ref().filter(|s| s.is_scaled()) {
        if s.rope_type.as_deref() != Some("linear") {
            return refuse(format!(
                "rope_scaling '{}' (supported: linear)",
                s.rope_type.as_deref().unwrap_or("?")
            ));
        }
        meta.extend(linear_rope(arch, s));
    }
    Ok(meta)
}

/// T5's facts as llama.cpp reads them. Its graph fixes what the config could vary (buckets
/// reaching distance 128; ReLU, or gated GELU-tanh when there are gate tensors): another value
/// would make the file hold another model, so it is refused by name.
fn t5_metadata(c: &t5::Config, root: &Path) -> Result<Vec<(String, Value)>> {
    let refuse = |what: String| Err(Error::file(root, format!("GGUF export of t5: {what}")));
    if c.relative_attention_max_distance != 128 {
        return refuse(format!(
            "relative_attention_max_distance {} is not llama.cpp's fixed 128",
            c.relative_attention_max_distance
        ));
    }
    match c.feed_forward()? {
        (false, Activation::Relu) | (true, Activation::GeluNew) => {}
        _ => {
            return refuse(format!(
                "feed_forward_proj '{}' (llama.cpp runs relu and gated-gelu)",
                c.feed_forward_proj
            ))
        }
    }
    let k = |s: &str| format!("t5.{s}");
    let eps = Value::F32(c.layer_norm_epsilon as f32);
    let mut meta = vec![
        model_name(root),
        // T5 has no context limit of its own; the converter's default.
        (k("context_length"), u(512)),
        (k("embedding_length"), u(c.d_model)),
        (k("feed_forward_length"), u(c.d_ff)),
        (k("block_count"), u(c.num_layers)),
    ];
    if let Some(n) = c.num_decoder_layers {
        meta.push((k("decoder_block_count"), u(n)));
    }
    meta.extend([
        (k("attention.head_count"), u(c.num_heads)),
        (k("attention.key_length"), u(c.d_kv)),
        (k("attention.value_length"), u(c.d_kv)),
        (k("attention.layer_norm_epsilon"), eps.clone()),
        (
            k("attention.relative_buckets_count"),
            u(c.relative_attention_num_buckets),
        ),
        (k("attention.layer_norm_rms_epsilon"), eps),
        (k("decoder_start_token_id"), Value::U32(c.decoder_start())),
    ]);
    Ok(meta)
}

fn gpt2_metadata(c: &gpt2::Config, root: &Path) -> Result<Vec<(String, Value)>> {
    if !matches!(c.activation_function, Activation::GeluNew) {
        // llama.cpp's GPT-2 graph uses the tanh approximation of GELU only.
        return Err(Error::file(
            root,
            format!(
                "GGUF export of GPT-2 needs activation_function gelu_new (llama.cpp's), not {:?}",
                c.activation_function
            ),
        ));
    }
    Ok(vec![
        model_name(root),
        ("gpt2.context_length".into(), u(c.n_positions)),
        ("gpt2.embedding_length".into(), u(c.n_embd)),
        (
            "gpt2.feed_forward_length".into(),
            u(c.n_inner.unwrap_or(4 * c.n_embd)),
        ),
        ("gpt2.block_count".into(), u(c.n_layer)),
        ("gpt2.attention.head_count".into(), u(c.n_head)),
        (
            "gpt2.attention.layer_norm_epsilon".into(),
            Value::F32(c.layer_norm_epsilon as f32),
        ),
    ])
}
