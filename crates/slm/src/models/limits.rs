//! Sanity checks on a model's hyperparameters before anything is built from them.
//!
//! Sizes from config.json or GGUF metadata drive allocations (RoPE tables, caches, buffers) and
//! divisions (heads, groups) long before a weight's shape could contradict them, so a zero or an
//! absurd value must be refused here, by name, instead of dividing by zero or asking the allocator
//! for hundreds of gigabytes. The bounds are far above any model slm could run on a CPU.

use std::path::Path;

use super::ModelConfig;
use crate::error::{Error, Result};

const MAX_VOCAB: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 16;
const MAX_FFN: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 4096;
/// Two million positions: more than any released small model (Qwen2.5-1M has 1,010,000).
const MAX_POSITIONS: usize = 1 << 21;

struct Check<'a> {
    origin: &'a Path,
}

impl Check<'_> {
    fn err(&self, msg: String) -> Error {
        Error::file(self.origin, msg)
    }

    fn size(&self, key: &str, v: usize, max: usize) -> Result<()> {
        if v == 0 || v > max {
            return Err(self.err(format!("{key} is {v}; it must be between 1 and {max}")));
        }
        Ok(())
    }

    fn positive(&self, key: &str, v: f64) -> Result<()> {
        if !(v.is_finite() && v > 0.0) {
            return Err(self.err(format!("{key} is {v}; it must be a positive number")));
        }
        Ok(())
    }

    /// Vocabulary, width, MLP width, layers and positions, under the names Llama and BERT use.
    fn sizes(&self, v: [usize; 5]) -> Result<()> {
        let keys = [
            ("vocab_size", MAX_VOCAB),
            ("hidden_size", MAX_WIDTH),
            ("intermediate_size", MAX_FFN),
            ("num_hidden_layers", MAX_LAYERS),
            ("max_position_embeddings", MAX_POSITIONS),
        ];
        for ((key, max), v) in keys.into_iter().zip(v) {
            self.size(key, v, max)?;
        }
        Ok(())
    }

    /// Heads that split the width evenly (or an explicit head size) and KV groups that split
    /// the query heads evenly.
    fn heads(
        &self,
        keys: [&str; 3],
        width: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: Option<usize>,
    ) -> Result<usize> {
        let [width_key, heads_key, kv_key] = keys;
        self.size(heads_key, heads, MAX_HEADS)?;
        self.size(kv_key, kv_heads, heads)?;
        if !heads.is_multiple_of(kv_heads) {
            return Err(self.err(format!(
                "{heads_key} ({heads}) is not a multiple of {kv_key} ({kv_heads})"
            )));
        }
        let hd = match head_dim {
            Some(d) => d,
            None if width.is_multiple_of(heads) => width / heads,
            None => {
                return Err(self.err(format!(
                    "{width_key} ({width}) is not a multiple of {heads_key} ({heads})"
                )))
            }
        };
        self.size("head_dim", hd, MAX_HEAD_DIM)?;
        Ok(hd)
    }
}

impl ModelConfig {
    /// Refuses hyperparameters that no model has; `origin` is the file they came from.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let c = Check { origin };
        match self {
            ModelConfig::Gpt2(g) => {
                c.size("vocab_size", g.vocab_size, MAX_VOCAB)?;
                c.size("n_embd", g.n_embd, MAX_WIDTH)?;
                c.size("n_layer", g.n_layer, MAX_LAYERS)?;
                c.size("n_positions", g.n_positions, MAX_POSITIONS)?;
                if let Some(i) = g.n_inner {
                    c.size("n_inner", i, MAX_FFN)?;
                }
                c.heads(
                    ["n_embd", "n_head", "n_head"],
                    g.n_embd,
                    g.n_head,
                    g.n_head,
                    None,
                )?;
                c.positive("layer_norm_epsilon", g.layer_norm_epsilon)?;
            }
            ModelConfig::Llama(l) => {
                c.sizes([
                    l.vocab_size,
                    l.hidden_size,
                    l.intermediate_size,
                    l.num_hidden_layers,
                    l.max_position_embeddings,
                ])?;
                let hd = c.heads(
                    ["hidden_size", "num_attention_heads", "num_key_value_heads"],
                    l.hidden_size,
                    l.num_attention_heads,
                    l.n_kv_heads(),
                    l.head_dim,
                )?;
                if !hd.is_multiple_of(2) {
                    return Err(c.err(format!(
                        "head_dim is {hd}; rotary embeddings need an even head size"
                    )));
                }
                c.positive("rms_norm_eps", l.rms_norm_eps)?;
                c.positive("rope_theta", l.rope_theta)?;
                if let Some(s) = &l.rope_scaling {
                    if let Some(f) = s.factor {
                        c.positive("rope_scaling.factor", f)?;
                    }
                    let t = s.rope_type.as_deref().unwrap_or("default");
                    if !matches!(t, "default" | "linear" | "llama3") {
                        return Err(c.err(format!(
                            "rope_scaling type '{t}' is not supported (supported: default, linear, llama3)"
                        )));
                    }
                }
                if let Some(w) = l.sliding_window {
                    c.size("sliding_window", w, usize::MAX)?;
                }
            }
            ModelConfig::Gemma(g) => {
                c.sizes([
                    g.vocab_size,
                    g.hidden_size,
                    g.intermediate_size,
                    g.num_hidden_layers,
                    g.max_position_embeddings,
                ])?;
                let hd = c.heads(
                    ["hidden_size", "num_attention_heads", "num_key_value_heads"],
                    g.hidden_size,
                    g.num_attention_heads,
                    g.n_kv_heads(),
                    Some(g.head_dim),
                )?;
                if !hd.is_multiple_of(2) {
                    return Err(c.err(format!(
                        "head_dim is {hd}; rotary embeddings need an even head size"
                    )));
                }
                c.positive("rms_norm_eps", g.rms_norm_eps)?;
                c.positive("rope_theta", g.rope_theta)?;
                c.positive("rope_local_base_freq", g.local_theta())?;
                c.positive("query_pre_attn_scalar", g.query_pre_attn_scalar)?;
                for (k, v) in [
                    ("final_logit_softcapping", g.final_logit_softcapping),
                    ("attn_logit_softcapping", g.attn_logit_softcapping),
                ] {
                    if let Some(v) = v {
                        c.positive(k, v as f64)?;
                    }
                }
                if let Some(s) = &g.rope_scaling {
                    if let Some(f) = s.factor {
                        c.positive("rope_scaling.factor", f)?;
                    }
                    let t = s.rope_type.as_deref().unwrap_or("default");
                    if !matches!(t, "default" | "linear") {
                        return Err(c.err(format!(
                            "rope_scaling type '{t}' is not supported for Gemma (supported: default, linear)"
                        )));
                    }
                }
                if let Some(w) = g.sliding_window {
                    c.size("sliding_window", w, usize::MAX)?;
                }
            }
            ModelConfig::Bert(b) => {
                c.sizes([
                    b.vocab_size,
                    b.hidden_size,
                    b.intermediate_size,
                    b.num_hidden_layers,
                    b.max_position_embeddings,
                ])?;
                if b.type_vocab_size > MAX_VOCAB {
                    c.size("type_vocab_size", b.type_vocab_size, MAX_VOCAB)?;
                }
                c.heads(
                    ["hidden_size", "num_attention_heads", "num_attention_heads"],
                    b.hidden_size,
                    b.num_attention_heads,
                    b.num_attention_heads,
                    None,
                )?;
                c.positive("layer_norm_eps", b.layer_norm_eps)?;
                if b.max_position_embeddings <= b.position_offset() {
                    return Err(c.err(format!(
                        "max_position_embeddings ({}) leaves no positions after RoBERTa's offset of {}",
                        b.max_position_embeddings,
                        b.position_offset()
                    )));
                }
            }
            ModelConfig::T5(t) => {
                c.size("vocab_size", t.vocab_size, MAX_VOCAB)?;
                c.size("d_model", t.d_model, MAX_WIDTH)?;
                c.size("d_kv", t.d_kv, MAX_HEAD_DIM)?;
                c.size("d_ff", t.d_ff, MAX_FFN)?;
                c.size("num_layers", t.num_layers, MAX_LAYERS)?;
                c.size("num_decoder_layers", t.decoder_layers(), MAX_LAYERS)?;
                c.size("num_heads", t.num_heads, MAX_HEADS)?;
                c.size(
                    "relative_attention_num_buckets",
                    t.relative_attention_num_buckets,
                    1 << 16,
                )?;
                if t.relative_attention_num_buckets < 4 {
                    return Err(c.err("relative_attention_num_buckets must be at least 4".into()));
                }
                c.size(
                    "relative_attention_max_distance",
                    t.relative_attention_max_distance,
                    MAX_POSITIONS,
                )?;
                if t.relative_attention_max_distance <= t.relative_attention_num_buckets / 2 {
                    return Err(c.err(format!(
                        "relative_attention_max_distance ({}) must exceed half the buckets ({}): the decoder's exact buckets",
                        t.relative_attention_max_distance, t.relative_attention_num_buckets
                    )));
                }
                c.positive("layer_norm_epsilon", t.layer_norm_epsilon)?;
                t.feed_forward().map_err(|e| c.err(e.to_string()))?;
            }
            ModelConfig::Bart(t) => {
                c.size("vocab_size", t.vocab_size, MAX_VOCAB)?;
                c.size("d_model", t.d_model, MAX_WIDTH)?;
                c.size("encoder_layers", t.encoder_layers, MAX_LAYERS)?;
                c.size("decoder_layers", t.decoder_layers, MAX_LAYERS)?;
                c.size("encoder_ffn_dim", t.encoder_ffn_dim, MAX_FFN)?;
                c.size("decoder_ffn_dim", t.decoder_ffn_dim, MAX_FFN)?;
                c.size(
                    "max_position_embeddings",
                    t.max_position_embeddings,
                    MAX_POSITIONS,
                )?;
                for (k, h) in [
                    ("encoder_attention_heads", t.encoder_attention_heads),
                    ("decoder_attention_heads", t.decoder_attention_heads),
                ] {
                    c.size(k, h, MAX_HEADS)?;
                    if t.d_model % h != 0 {
                        return Err(c.err(format!(
                            "d_model ({}) is not a multiple of {k} ({h})",
                            t.d_model
                        )));
                    }
                }
            }
            ModelConfig::Rnn(r) => {
                c.size("ntoken", r.ntoken, MAX_VOCAB)?;
                c.size("ninp", r.ninp, MAX_WIDTH)?;
                c.size("nhid", r.nhid, MAX_WIDTH)?;
                c.size("nlayers", r.nlayers, MAX_LAYERS)?;
                if !(0.0..1.0).contains(&r.dropout) {
                    return Err(c.err(format!("dropout is {}; it must be in [0, 1)", r.dropout)));
                }
            }
        }
        Ok(())
    }
}
