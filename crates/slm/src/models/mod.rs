//! Model families and the one entry point that builds the right one from a model's files.

pub mod bart;
pub mod bert;
pub mod gemma;
pub mod gpt2;
mod limits;
pub mod llama;
pub mod rnn;
pub mod seq2seq;
pub mod t5;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

use crate::error::{Context, Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::{open_weights, ModelFiles, WeightFormat, WeightStore};
use crate::nn::decode::{Arena, Decode};
use crate::nn::exec::CausalFamily;
use crate::nn::infer::{Infer, InferW, KvCache, VbLoader};
use crate::nn::Vb;

/// A decoder-only language model with a KV cache.
pub trait CausalLM: Send {
    /// Runs `ids` at positions `pos..`, appending to the cache (which must hold exactly `pos`
    /// positions). Returns logits `[t, vocab]` when `all_logits`, else `[1, vocab]` for the last
    /// position only, which spares the large head matmul over the prompt.
    fn forward(&mut self, ids: &[u32], pos: usize, all_logits: bool) -> Result<Tensor>;
    fn clear_cache(&mut self);
    fn context_length(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// An empty cache for one more sequence, for [`CausalLM::forward_batch`].
    fn new_cache(&self) -> SeqCache;
    /// Runs several sequences in one forward pass, each `(cache, ids)` appending its ids after
    /// what its cache holds; returns the logits of each sequence's last position, `[n, vocab]`.
    /// The weights are read once for all of them: how a server decodes many streams at once.
    fn forward_batch(&self, seqs: &mut [(&mut SeqCache, &[u32])]) -> Result<Tensor>;
    /// A pass of fewer rows than this runs each row as it would run alone, bit for bit, on
    /// block-quantized weights (the integer-dot kernels); larger passes may switch to
    /// dequantize + GEMM (the file's layout, on CPUs without VNNI). A server that keeps its shared passes under it gives every stream the answer it
    /// would get alone. Dense weights give no such guarantee (the GEMM's blocking depends on
    /// the row count), only agreement to rounding.
    fn uniform_rows(&self) -> usize {
        crate::nn::qmatmul::GEMM_FROM_TOKENS
    }
    /// A recurrent model: its cache is a state that runs forward only (no prefix of it can be
    /// kept), and a text is evaluated as one stream.
    fn recurrent(&self) -> bool {
        false
    }
}

/// The KV cache of one sequence, held by whoever runs it (a server slot).
#[derive(Clone, Default)]
pub struct SeqCache(Vec<KvCache>);

impl SeqCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.0.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions: a new prompt sharing them reuses their keys and values.
    /// Returns the positions kept: a recurrent model's state is kept whole or not at all.
    pub fn truncate(&mut self, len: usize) -> usize {
        self.0
            .iter_mut()
            .map(|c| c.truncate(len))
            .min()
            .unwrap_or(0)
    }
}

/// A causal family on the inference executor, with its KV cache: what generation runs.
pub struct Decoder<F> {
    model: F,
    cache: SeqCache,
    /// A decoded token's activations, kept for the next.
    arena: Arena,
}

impl<F: CausalFamily<InferW>> Decoder<F> {
    pub fn new(model: F) -> Self {
        let cache = SeqCache(vec![KvCache::default(); model.n_layers()]);
        Self {
            model,
            cache,
            arena: Arena::default(),
        }
    }
}

impl<F: CausalFamily<InferW> + Send> CausalLM for Decoder<F> {
    fn forward(&mut self, ids: &[u32], pos: usize, all_logits: bool) -> Result<Tensor> {
        check_context(pos + ids.len(), self.model.context_length())?;
        if ids.is_empty() {
            return Err(Error::msg("internal: forward called without tokens"));
        }
        if ids.len() == 1 && !self.model.recurrent() && self.cache.len() == pos {
            // A decoded token: the same forward pass over buffers kept between tokens.
            let mut e = Decode::new(&mut self.cache.0, &mut self.arena);
            let y = self.model.forward(&mut e, ids, true)?;
            return e.tensor(y);
        }
        let mut e = Infer::new(&mut self.cache.0, pos, ids.len())?;
        let y = self.model.forward(&mut e, ids, !all_logits)?;
        Ok(y.tensor()?.squeeze(0)?)
    }

    fn clear_cache(&mut self) {
        self.cache.truncate(0);
    }

    fn context_length(&self) -> usize {
        self.model.context_length()
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn recurrent(&self) -> bool {
        self.model.recurrent()
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache(vec![KvCache::default(); self.model.n_layers()])
    }

    fn forward_batch(&self, seqs: &mut [(&mut SeqCache, &[u32])]) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut runs = Vec::with_capacity(seqs.len());
        for (cache, seq_ids) in seqs.iter_mut() {
            check_context(cache.len() + seq_ids.len(), self.model.context_length())?;
            if cache.0.len() != self.model.n_layers() {
                return Err(Error::msg("internal: a KV cache made for another model"));
            }
            ids.extend_from_slice(seq_ids);
            runs.push((cache.0.as_mut_slice(), seq_ids.len()));
        }
        if runs.is_empty() {
            return Err(Error::msg(
                "internal: forward_batch called without sequences",
            ));
        }
        let mut e = Infer::batch(runs)?;
        let y = self.model.forward(&mut e, &ids, true)?;
        Ok(y.tensor()?.squeeze(0)?)
    }
}

pub(crate) fn check_context(needed: usize, context: usize) -> Result<()> {
    if needed > context {
        return Err(Error::ContextOverflow {
            tokens: needed,
            context,
        });
    }
    Ok(())
}

/// The families slm builds, as named by HF `model_type` and GGUF `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Gpt2,
    Llama(llama::Variant),
    /// Gemma 2 and Gemma 3 text models.
    Gemma(gemma::Variant),
    /// Encoders (BERT, DistilBERT, RoBERTa): embeddings, classification, fill-mask.
    Bert(bert::Flavor),
    /// Recurrent language models (PyTorch's `word_language_model`).
    Rnn(crate::nn::recurrent::Cell),
    /// Encoder-decoders: T5, T5 v1.1, Flan-T5, mT5.
    T5,
    /// Encoder-decoders: BART, Marian.
    Bart(bart::Variant),
}

pub const SUPPORTED: &str =
    "gpt2, llama (llama, mistral, smollm, tinyllama), qwen2, phi3, gemma2, gemma3 (text), LSTM/GRU language models (rnn_lm); encoders: bert, distilbert, roberta; encoder-decoders: t5, mt5, bart, marian";

impl Architecture {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gpt2" | "GPT2LMHeadModel" | "GPT2Model" => Architecture::Gpt2,
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => {
                Architecture::Llama(llama::Variant::Llama)
            }
            "qwen2" | "Qwen2ForCausalLM" => Architecture::Llama(llama::Variant::Qwen2),
            "phi3" | "Phi3ForCausalLM" => Architecture::Llama(llama::Variant::Phi3),
            "gemma2" | "Gemma2ForCausalLM" => Architecture::Gemma(gemma::Variant::Gemma2),
            // `gemma3` is llama.cpp's name; transformers' `gemma3` is the multimodal model,
            // refused with its text_config when config.json is read.
            "gemma3_text" | "gemma3" | "Gemma3ForCausalLM" => {
                Architecture::Gemma(gemma::Variant::Gemma3)
            }
            "t5" | "mt5" | "T5ForConditionalGeneration" | "MT5ForConditionalGeneration" => {
                Architecture::T5
            }
            "bart" | "BartForConditionalGeneration" => Architecture::Bart(bart::Variant::Bart),
            "marian" | "MarianMTModel" => Architecture::Bart(bart::Variant::Marian),
            "bert" => Architecture::Bert(bert::Flavor::Bert),
            "distilbert" => Architecture::Bert(bert::Flavor::DistilBert),
            "roberta" | "xlm-roberta" => Architecture::Bert(bert::Flavor::Roberta),
            n if n.starts_with("Bert") => Architecture::Bert(bert::Flavor::Bert),
            n if n.starts_with("DistilBert") => Architecture::Bert(bert::Flavor::DistilBert),
            n if n.starts_with("Roberta") || n.starts_with("XLMRoberta") => {
                Architecture::Bert(bert::Flavor::Roberta)
            }
            _ => return None,
        })
    }

    /// The modules PEFT's LoRA targets when none are named (PEFT's
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn lora_targets(&self) -> Vec<String> {
        let names = match self {
            Architecture::Gpt2 => gpt2::LORA_TARGETS,
            Architecture::Llama(v) => v.lora_targets(),
            Architecture::Gemma(v) => v.lora_targets(),
            Architecture::Bert(f) => f.lora_targets(),
            // PEFT has no LoRA for recurrent layers.
            Architecture::Rnn(_) => &[],
            Architecture::T5 => t5::LORA_TARGETS,
            Architecture::Bart(_) => bart::LORA_TARGETS,
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Gpt2 => "gpt2",
            Architecture::Llama(llama::Variant::Llama) => "llama",
            Architecture::Llama(llama::Variant::Qwen2) => "qwen2",
            Architecture::Llama(llama::Variant::Phi3) => "phi3",
            Architecture::Gemma(gemma::Variant::Gemma2) => "gemma2",
            Architecture::Gemma(gemma::Variant::Gemma3) => "gemma3",
            Architecture::Bert(bert::Flavor::Bert) => "bert",
            Architecture::Bert(bert::Flavor::DistilBert) => "distilbert",
            Architecture::Bert(bert::Flavor::Roberta) => "roberta",
            Architecture::Rnn(crate::nn::recurrent::Cell::Lstm) => "lstm",
            Architecture::Rnn(crate::nn::recurrent::Cell::Gru) => "gru",
            Architecture::T5 => "t5",
            Architecture::Bart(bart::Variant::Bart) => "bart",
            Architecture::Bart(bart::Variant::Marian) => "marian",
        }
    }

    pub fn is_encoder(&self) -> bool {
        matches!(self, Architecture::Bert(_))
    }

    /// T5, BART, Marian: run by `models::seq2seq`, trained by `--task seq2seq`.
    pub fn is_seq2seq(&self) -> bool {
        matches!(self, Architecture::T5 | Architecture::Bart(_))
    }
}

/// transformers' `initializer_range` default.
fn default_init_range() -> f32 {
    0.02
}

/// The model's configuration as a family understands it.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Gpt2(gpt2::Config),
    Llama(llama::Config),
    Gemma(gemma::Config),
    Bert(bert::Config),
    Rnn(rnn::Config),
    T5(t5::Config),
    Bart(bart::Config),
}

impl ModelConfig {
    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::Gpt2(_) => Architecture::Gpt2,
            ModelConfig::Llama(c) => Architecture::Llama(c.variant),
            ModelConfig::Gemma(c) => Architecture::Gemma(c.variant),
            ModelConfig::Bert(c) => Architecture::Bert(c.flavor),
            ModelConfig::Rnn(c) => Architecture::Rnn(c.rnn_type),
            ModelConfig::T5(_) => Architecture::T5,
            ModelConfig::Bart(c) => Architecture::Bart(c.variant),
        }
    }

    pub fn context_length(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gemma(c) => c.max_position_embeddings,
            ModelConfig::Bert(c) => c.max_tokens(),
            ModelConfig::Rnn(_) | ModelConfig::T5(_) => u32::MAX as usize,
            ModelConfig::Bart(c) => c.max_position_embeddings,
        }
    }

    /// How a new model of this config starts (`slm pretrain`), where transformers' rule is
    /// followed: N(0, range²) weights, zero biases, unit norms.
    pub fn init_rule(&self) -> Option<crate::train::loader::InitRule> {
        match self {
            ModelConfig::Gpt2(c) => Some(c.init_rule()),
            ModelConfig::Llama(c) => Some(c.init_rule()),
            ModelConfig::T5(c) => Some(c.init_rule()),
            _ => None,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gemma(c) => c.vocab_size,
            ModelConfig::Bert(c) => c.vocab_size,
            ModelConfig::Rnn(c) => c.ntoken,
            ModelConfig::T5(c) => c.vocab_size,
            ModelConfig::Bart(c) => c.vocab_size,
        }
    }

    /// Reads config.json; a missing key is reported with the key's name by serde.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let c = Self::parse_hf_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    fn parse_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).in_file(path)?;
        let model_type = json.get("model_type").and_then(|v| v.as_str());
        let first_arch = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|v| v.as_str());
        if model_type == Some(rnn::CLASSIFIER_TYPE) {
            return Err(Error::file(
                path,
                "an RNN text classifier: run it with `slm classify` or `slm eval classify`",
            ));
        }
        let found = model_type.or(first_arch).unwrap_or("<none>");
        let arch = model_type
            .and_then(Architecture::from_name)
            .or_else(|| first_arch.and_then(Architecture::from_name))
            .ok_or_else(|| Error::UnknownArchitecture {
                found: found.to_string(),
                origin: path.display().to_string(),
                supported: SUPPORTED.to_string(),
            })?;
        Ok(match arch {
            Architecture::Gpt2 => ModelConfig::Gpt2(serde_json::from_value(json).in_file(path)?),
            Architecture::Llama(variant) => {
                let mut json = json;
                crate::nn::rope::read_rope_parameters(&mut json).in_file(path)?;
                let mut c: llama::Config = serde_json::from_value(json).in_file(path)?;
                c.variant = variant;
                ModelConfig::Llama(c)
            }
            Architecture::Gemma(variant) => {
                if json.get("text_config").is_some() {
                    return Err(Error::file(
                        path,
                        "a multimodal Gemma 3 checkpoint (text_config, vision tower) is not supported; use a text model (model_type gemma3_text, e.g. gemma-3-270m or gemma-3-1b)",
                    ));
                }
                ModelConfig::Gemma(gemma::Config::from_json(json, variant).in_file(path)?)
            }
            Architecture::Bert(flavor) => {
                ModelConfig::Bert(bert::Config::from_json(json, flavor).in_file(path)?)
            }
            Architecture::T5 => ModelConfig::T5(serde_json::from_value(json).in_file(path)?),
            Architecture::Bart(v) => {
                ModelConfig::Bart(bart::Config::from_json(json, v).in_file(path)?)
            }
            Architecture::Rnn(_) => unreachable!("rnn_lm is not an architecture name"),
        })
    }

    /// Builds the config from GGUF metadata (`{arch}.*` keys), as llama.cpp reads it.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let c = Self::parse_gguf(g)?;
        c.validate(&g.path)?;
        Ok(c)
    }

    fn parse_gguf(g: &GgufFile) -> Result<Self> {
        let name = g.architecture()?;
        if name == "t5encoder" {
            return Err(Error::file(
                &g.path,
                "a T5 encoder alone ('t5encoder') is not supported; slm runs T5 GGUF files with their decoder ('t5')",
            ));
        }
        let arch = Architecture::from_name(name).ok_or_else(|| Error::UnknownArchitecture {
            found: name.to_string(),
            origin: format!("{} general.architecture", g.path.display()),
            supported: SUPPORTED.to_string(),
        })?;
        if arch.is_encoder() {
            return Err(Error::file(
                &g.path,
                format!(
                    "GGUF encoder models ('{name}') are not supported; use the Hugging Face folder"
                ),
            ));
        }
        let key = |k: &str| format!("{name}.{k}");
        // Zero or beyond u32 is never a size; refused here by the GGUF key's own name.
        let req = |k: &str| {
            let k = key(k);
            let v = g.require_u64(&k)?;
            if v == 0 || v > u32::MAX as u64 - 1 {
                return Err(Error::file(
                    &g.path,
                    format!("metadata '{k}' is {v}, not a size"),
                ));
            }
            Ok(v as usize)
        };
        let vocab_size = match g.meta("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
            None => req("vocab_size")?,
        };
        let heads = req("attention.head_count")?;
        Ok(match arch {
            Architecture::Gpt2 => ModelConfig::Gpt2(gpt2::Config {
                vocab_size,
                n_positions: req("context_length")?,
                n_embd: req("embedding_length")?,
                n_layer: req("block_count")?,
                n_head: heads,
                n_inner: Some(req("feed_forward_length")?),
                layer_norm_epsilon: g
                    .meta_f64(&key("attention.layer_norm_epsilon"))
                    .unwrap_or(1e-5),
                activation_function: crate::nn::Activation::GeluNew,
                // GGUF keeps no dropout rates; GPT2Config's defaults.
                embd_pdrop: 0.1,
                resid_pdrop: 0.1,
                attn_pdrop: 0.1,
                initializer_range: default_init_range(),
            }),
            Architecture::Llama(variant) => {
                let hidden = req("embedding_length")?;
                let head_dim = g
                    .meta_u64(&key("attention.key_length"))
                    .map(|v| v as usize)
                    .filter(|&d| d != hidden / heads);
                ModelConfig::Llama(llama::Config {
                    vocab_size,
                    hidden_size: hidden,
                    intermediate_size: req("feed_forward_length")?,
                    num_hidden_layers: req("block_count")?,
                    num_attention_heads: heads,
                    num_key_value_heads: g
                        .meta_u64(&key("attention.head_count_kv"))
                        .map(|v| v as usize),
                    head_dim,
                    max_position_embeddings: req("context_length")?,
                    rms_norm_eps: g
                        .meta_f64(&key("attention.layer_norm_rms_epsilon"))
                        .unwrap_or(1e-5),
                    rope_theta: g.meta_f64(&key("rope.freq_base")).unwrap_or(10000.0),
                    rope_scaling: rope_scaling_of(g, name)?,
                    tie_word_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
                    attention_bias: false,
                    mlp_bias: false,
                    sliding_window: g
                        .meta_u64(&key("attention.sliding_window"))
                        .map(|v| v as usize),
                    use_sliding_window: None,
                    hidden_act: crate::nn::Activation::Silu,
                    attention_dropout: 0.0,
                    initializer_range: default_init_range(),
                    variant,
                })
            }
            Architecture::Gemma(variant) => {
                let hidden = req("embedding_length")?;
                let layers = req("block_count")?;
                let head_dim = g
                    .meta_u64(&key("attention.key_length"))
                    .map_or(hidden / heads, |v| v as usize);
                let (layer_types, sliding_window_pattern) = gemma_layers(g, &key, layers)?;
                ModelConfig::Gemma(gemma::Config {
                    vocab_size,
                    hidden_size: hidden,
                    intermediate_size: req("feed_forward_length")?,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: g
                        .meta_u64(&key("attention.head_count_kv"))
                        .map(|v| v as usize),
                    head_dim,
                    max_position_embeddings: req("context_length")?,
                    rms_norm_eps: g
                        .meta_f64(&key("attention.layer_norm_rms_epsilon"))
                        .unwrap_or(1e-6),
                    rope_theta: g.meta_f64(&key("rope.freq_base")).unwrap_or(10000.0),
                    // llama.cpp's sliding layers rotate with base 10000 unless told, unscaled.
                    rope_local_base_freq: Some(
                        g.meta_f64(&key("rope.freq_base_swa")).unwrap_or(10000.0),
                    ),
                    rope_scaling: rope_scaling_of(g, name)?,
                    hidden_activation: Some(crate::nn::Activation::GeluNew),
                    hidden_act: None,
                    query_pre_attn_scalar: gemma::llama_cpp_query_scalar(
                        variant, layers, hidden, heads, head_dim,
                    ) as f64,
                    sliding_window: g
                        .meta_u64(&key("attention.sliding_window"))
                        .map(|v| v as usize),
                    // Without the key, llama.cpp's patterns: every other layer (Gemma 2), five
                    // of six (Gemma 3).
                    layer_types,
                    sliding_window_pattern,
                    final_logit_softcapping: g
                        .meta_f64(&key("final_logit_softcapping"))
                        .map(|v| v as f32),
                    attn_logit_softcapping: g
                        .meta_f64(&key("attn_logit_softcapping"))
                        .map(|v| v as f32),
                    attention_bias: false,
                    attention_dropout: 0.0,
                    variant,
                })
            }
            Architecture::Bert(_) => unreachable!("encoders are rejected above"),
            Architecture::T5 => {
                let d_model = req("embedding_length")?;
                let has = |t: &str| g.content.tensor_infos.contains_key(t);
                let tok = |k: &str| g.meta_u64(&format!("tokenizer.ggml.{k}")).map(|v| v as u32);
                ModelConfig::T5(t5::Config {
                    vocab_size,
                    d_model,
                    d_kv: g
                        .meta_u64(&key("attention.key_length"))
                        .map_or(d_model / heads, |v| v as usize),
                    d_ff: req("feed_forward_length")?,
                    num_layers: req("block_count")?,
                    num_decoder_layers: Some(match g.meta(&key("decoder_block_count")) {
                        Some(_) => req("decoder_block_count")?,
                        None => req("block_count")?,
                    }),
                    num_heads: heads,
                    relative_attention_num_buckets: req("attention.relative_buckets_count")?,
                    // llama.cpp's buckets reach a fixed distance, T5's default.
                    relative_attention_max_distance: 128,
                    dropout_rate: 0.0,
                    layer_norm_epsilon: g
                        .meta_f64(&key("attention.layer_norm_rms_epsilon"))
                        .or_else(|| g.meta_f64(&key("attention.layer_norm_epsilon")))
                        .unwrap_or(1e-6),
                    // llama.cpp picks gated GELU when the gate tensors are there, else ReLU.
                    feed_forward_proj: match has("enc.blk.0.ffn_gate.weight") {
                        true => "gated-gelu".into(),
                        false => "relu".into(),
                    },
                    tie_word_embeddings: !has("output.weight"),
                    pad_token_id: tok("padding_token_id").unwrap_or(0),
                    eos_token_id: tok("eos_token_id").unwrap_or(1),
                    decoder_start_token_id: g
                        .meta_u64(&key("decoder_start_token_id"))
                        .map(|v| v as u32),
                })
            }
            Architecture::Bart(_) => {
                return Err(Error::file(
                    &g.path,
                    "llama.cpp has no GGUF form of BART or Marian; use the Hugging Face folder",
                ))
            }
            Architecture::Rnn(_) => unreachable!("no GGUF architecture name is a recurrent LM"),
        })
    }
}

/// Which Gemma layers slide, as llama.cpp reads `attention.sliding_window_pattern`: one bool per
/// layer, or every n-th layer global.
type LayerPattern = (Option<Vec<String>>, Option<usize>);

fn gemma_layers(g: &GgufFile, key: &dyn Fn(&str) -> String, layers: usize) -> Result<LayerPattern> {
    use candle_core::quantized::gguf_file::Value;
    let k = key("attention.sliding_window_pattern");
    let bad = |what: &str| Err(Error::file(&g.path, format!("metadata '{k}' {what}")));
    match g.meta(&k) {
        None => Ok((None, None)),
        Some(Value::Array(a)) => {
            if a.len() != layers {
                return bad(&format!("has {} entries for {layers} layers", a.len()));
            }
            let mut types = Vec::with_capacity(layers);
            for v in a {
                match v {
                    Value::Bool(true) => types.push("sliding_attention".to_string()),
                    Value::Bool(false) => types.push("full_attention".to_string()),
                    _ => return bad("holds something other than bools"),
                }
            }
            Ok((Some(types), None))
        }
        Some(v) => match v.to_u32() {
            Ok(n) if n > 0 => Ok((None, Some(n as usize))),
            _ => bad("is not a positive number or a list of bools"),
        },
    }
}

/// RoPE scaling as llama.cpp records it: a `rope.scaling.type` key (linear), or per-frequency
/// divisors in the `rope_freqs` tensor (what Llama 3's scaling becomes).
fn rope_scaling_of(g: &GgufFile, arch: &str) -> Result<Option<crate::nn::RopeScaling>> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let unsupported = |what: &str| {
        Err(Error::file(
            &g.path,
            format!("RoPE scaling '{what}' is not supported (supported: linear, llama3 factors)"),
        ))
    };
    if g.content
        .tensor_infos
        .contains_key("rope_factors_long.weight")
    {
        return unsupported("longrope");
    }
    let mut scaling = crate::nn::RopeScaling {
        original_max_position_embeddings: g
            .meta_u64(&key("original_context_length"))
            .map(|v| v as usize),
        ..Default::default()
    };
    match g.meta_str(&key("type")) {
        None | Some("none") => {}
        Some("linear") => {
            scaling.rope_type = Some("linear".into());
            scaling.factor = g.meta_f64(&key("factor"));
        }
        Some(other) => return unsupported(other),
    }
    if let Some((dtype, dims, bytes)) = g.raw("rope_freqs.weight") {
        if dtype != GgmlDType::F32 || dims.len() != 1 || bytes.len() != 4 * dims[0] {
            return Err(Error::file(
                &g.path,
                "tensor 'rope_freqs.weight' is not a row of f32",
            ));
        }
        let f = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        scaling.freq_factors = Some(f);
    }
    Ok(scaling.is_scaled().then_some(scaling))
}

/// A model ready to run: its config, its weights' origin and the network itself.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub files: ModelFiles,
    pub weights: Arc<dyn WeightStore>,
    pub model: Box<dyn CausalLM>,
}

/// How to hold the weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDtype {
    /// Keep GGUF block-quantized weights quantized and use quantized matmuls (fast).
    #[default]
    Auto,
    /// Dequantize everything to f32 (exact reference arithmetic).
    F32,
}

pub fn config_of(files: &ModelFiles) -> Result<ModelConfig> {
    if let Some(c) = rnn_config(files)? {
        let c = ModelConfig::Rnn(c);
        c.validate(files.config.as_deref().unwrap_or(&files.root))?;
        return Ok(c);
    }
    match (&files.format, &files.config) {
        (_, Some(cfg)) => ModelConfig::from_hf_json(cfg),
        (WeightFormat::Gguf(p), None) => ModelConfig::from_gguf(&*GgufFile::open_shared(p)?),
        _ => Err(Error::file(&files.root, "config.json not found")),
    }
}

/// A recurrent LM's config: from config.json when it says `rnn_lm`, else from the tensors of a
/// folder without config.json that holds `rnn.weight_ih_l0` (a `word_language_model` checkpoint).
fn rnn_config(files: &ModelFiles) -> Result<Option<rnn::Config>> {
    if matches!(files.format, WeightFormat::Gguf(_)) {
        return Ok(None);
    }
    let stated = match &files.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).in_file(p)?;
            match rnn::Config::from_json(&json) {
                Some(c) => Some(c.in_file(p)?),
                None => return Ok(None),
            }
        }
        None => None,
    };
    let store = open_weights(files)?;
    if stated.is_none() && !store.contains("rnn.weight_ih_l0") {
        return Ok(None);
    }
    Ok(Some(rnn::Config::from_store(&*store, stated)?))
}

pub fn load_causal(path: &Path, dtype: ComputeDtype) -> Result<LoadedModel> {
    load_causal_with(path, dtype, None)
}

/// A causal model with a PEFT LoRA adapter applied to its weights. The adapter names weights
/// as transformers does, so the base must be a Hugging Face folder, not a GGUF file.
pub fn load_causal_with(
    path: &Path,
    dtype: ComputeDtype,
    adapter: Option<&Path>,
) -> Result<LoadedModel> {
    let files = ModelFiles::locate(path)?;
    let mut weights = open_weights(&files)?;
    if let Some(dir) = adapter {
        if let WeightFormat::Gguf(p) = &files.format {
            return Err(Error::file(
                p,
                "a LoRA adapter needs a Hugging Face base model; write one with `slm convert`",
            ));
        }
        let a = crate::io::peft::PeftAdapter::open(dir)?;
        weights = Arc::new(crate::io::peft::AdaptedStore::new(weights, a)?);
    }
    let config = config_of(&files)?;
    let mut l = VbLoader::new(Vb::new(weights.clone(), dtype == ComputeDtype::Auto));
    let model: Box<dyn CausalLM> = match &config {
        ModelConfig::Gpt2(c) => Box::new(Decoder::new(gpt2::Gpt2::new(c, &mut l)?)),
        ModelConfig::Llama(c) => Box::new(Decoder::new(llama::Llama::new(c, &mut l)?)),
        ModelConfig::Gemma(c) => Box::new(Decoder::new(gemma::Gemma::new(c, &mut l)?)),
        ModelConfig::Rnn(c) => Box::new(Decoder::new(rnn::RnnLm::new(c, &mut l)?)),
        ModelConfig::Bert(_) => {
            return Err(Error::file(
                &files.root,
                format!(
                    "'{}' is an encoder model, not a text generator; use embed, similarity, classify or fill-mask",
                    config.architecture().name()
                ),
            ))
        }
        ModelConfig::T5(_) | ModelConfig::Bart(_) => {
            return Err(Error::file(
                &files.root,
                "an encoder-decoder model: it runs with `slm generate` (one input, one output), not as a causal LM",
            ))
        }
    };
    weights.finish_load();
    Ok(LoadedModel {
        config,
        files,
        weights,
        model,
    })
}

/// An encoder ready to run.
pub struct LoadedEncoder {
    pub files: ModelFiles,
    pub model: bert::Bert,
}

pub fn load_encoder(path: &Path) -> Result<LoadedEncoder> {
    load_encoder_with(path, None)
}

/// An encoder with a PEFT LoRA adapter applied (see [`crate::io::peft`]). A sequence
/// classification adapter on a bare encoder turns it into a classifier: the head comes from
/// the adapter's `modules_to_save`, the labels from its metadata.
pub fn load_encoder_with(path: &Path, adapter: Option<&Path>) -> Result<LoadedEncoder> {
    let files = ModelFiles::locate(path)?;
    let config = config_of(&files)?;
    let ModelConfig::Bert(cfg) = &config else {
        let origin = match &files.format {
            WeightFormat::Gguf(p) => p.clone(),
            _ => files.root.clone(),
        };
        return Err(Error::file(
            origin,
            format!(
                "'{}' is a causal language model, not an encoder (supported encoders: bert, distilbert, roberta); use generate or chat",
                config.architecture().name()
            ),
        ));
    };
    let mut weights = open_weights(&files)?;
    let mut cfg = cfg.clone();
    if let Some(dir) = adapter {
        let a = crate::io::peft::PeftAdapter::open(dir)?;
        // A classification adapter on a bare encoder makes it the task model PEFT trained.
        let head = match a.config.task_type.as_deref() {
            Some("SEQ_CLS") => Some((
                "ForSequenceClassification",
                bert::Task::SequenceClassification,
            )),
            Some("TOKEN_CLS") => Some(("ForTokenClassification", bert::Task::TokenClassification)),
            _ => None,
        };
        if let Some((suffix, _)) = head.filter(|(_, t)| cfg.task() != *t) {
            let body = match cfg.flavor {
                bert::Flavor::Bert => "Bert",
                bert::Flavor::DistilBert => "DistilBert",
                bert::Flavor::Roberta => "Roberta",
            };
            cfg.architectures = vec![format!("{body}{suffix}")];
        }
        if let Some(labels) = &a.labels {
            cfg.id2label = Some(
                labels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i.to_string(), l.clone()))
                    .collect(),
            );
        }
        weights = Arc::new(crate::io::peft::AdaptedStore::new(weights, a)?);
    }
    let model = bert::Bert::load(&cfg, &Vb::new(weights, false))?;
    Ok(LoadedEncoder { files, model })
}
