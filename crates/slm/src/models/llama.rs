//! The Llama architecture and its close relatives: Llama 2/3, SmolLM2, TinyLlama, Mistral,
//! Qwen2/2.5 (q/k/v biases) and Phi-3 (fused qkv and gate_up projections).

use std::sync::Arc;

use serde::Deserialize;

use crate::error::Result;
use crate::nn::exec::{AttnSpec, CausalFamily, Exec, Loader, NormKind, Parts, Rows, Weights};
use crate::nn::{Activation, Rope, RopeScaling};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Llama,
    Qwen2,
    Phi3,
}

impl Variant {
    /// The modules PEFT's LoRA targets by default for this model type.
    pub fn lora_targets(self) -> &'static [&'static str] {
        match self {
            Variant::Phi3 => &["qkv_proj"],
            Variant::Llama | Variant::Qwen2 => &["q_proj", "v_proj"],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Dropout on the attention probabilities while training (LlamaConfig: 0.0).
    #[serde(default)]
    pub attention_dropout: f32,
    /// The std of a new model's weights.
    #[serde(default = "super::default_init_range")]
    pub initializer_range: f32,
    #[serde(skip, default = "default_variant")]
    pub variant: Variant,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_act() -> Activation {
    Activation::Silu
}
fn default_variant() -> Variant {
    Variant::Llama
}

impl Config {
    /// `LlamaPreTrainedModel._init_weights`: N(0, range²) linear and embedding weights,
    /// unit norms, the head tied as the config says.
    pub fn init_rule(&self) -> crate::train::loader::InitRule {
        crate::train::loader::InitRule {
            std: self.initializer_range,
            scaled: Vec::new(),
            tied: self.tie_word_embeddings,
        }
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 configs carry a `sliding_window` that only applies when `use_sliding_window` is set.
    pub fn window(&self) -> Option<usize> {
        match self.use_sliding_window {
            Some(false) => None,
            _ => self.sliding_window,
        }
    }
}

struct Layer<W: Weights> {
    input_layernorm: W::Norm,
    qkv: Parts<W::Linear>,
    o_proj: W::Linear,
    post_attention_layernorm: W::Norm,
    gate_up: Parts<W::Linear>,
    down_proj: W::Linear,
}

impl<W: Weights> Layer<W> {
    fn new(cfg: &Config, l: &mut impl Loader<W = W>, base: &str) -> Result<Self> {
        let (h, hd, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let qkv_widths = vec![nh * hd, nkv * hd, nkv * hd];
        let (qkv, gate_up) = match cfg.variant {
            // Phi-3 stores q|k|v and gate|up as one matrix each.
            Variant::Phi3 => (
                Parts::Fused(
                    l.linear(
                        &format!("{base}.self_attn.qkv_proj"),
                        h,
                        (nh + 2 * nkv) * hd,
                        false,
                    )?,
                    qkv_widths,
                ),
                Parts::Fused(
                    l.linear(&format!("{base}.mlp.gate_up_proj"), h, 2 * i, false)?,
                    vec![i, i],
                ),
            ),
            Variant::Llama | Variant::Qwen2 => {
                let bias = cfg.attention_bias || cfg.variant == Variant::Qwen2;
                let att = |m: &str| format!("{base}.self_attn.{m}");
                let mlp = |m: &str| format!("{base}.mlp.{m}");
                (
                    l.parts(
                        &[&att("q_proj"), &att("k_proj"), &att("v_proj")],
                        h,
                        &qkv_widths,
                        bias,
                    )?,
                    l.parts(
                        &[&mlp("gate_proj"), &mlp("up_proj")],
                        h,
                        &[i, i],
                        cfg.mlp_bias,
                    )?,
                )
            }
        };
        let mlp_bias = cfg.mlp_bias && cfg.variant != Variant::Phi3;
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: l.norm(NormKind::Rms, &format!("{base}.input_layernorm"), h, eps)?,
            qkv,
            o_proj: l.linear(
                &format!("{base}.self_attn.o_proj"),
                nh * hd,
                h,
                cfg.attention_bias && cfg.variant != Variant::Phi3,
            )?,
            post_attention_layernorm: l.norm(
                NormKind::Rms,
                &format!("{base}.post_attention_layernorm"),
                h,
                eps,
            )?,
            gate_up,
            down_proj: l.linear(&format!("{base}.mlp.down_proj"), i, h, mlp_bias)?,
        })
    }
}

pub struct Llama<W: Weights> {
    embed_tokens: W::Embedding,
    layers: Vec<Layer<W>>,
    norm: W::Norm,
    lm_head: W::Linear,
    attn: AttnSpec,
    pub cfg: Config,
}

impl<W: Weights> Llama<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        let h = cfg.hidden_size;
        let rope = Arc::new(Rope::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.rope_scaling.as_ref(),
        )?);
        let embed_tokens = l.embedding("model.embed_tokens", cfg.vocab_size, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, l, &format!("model.layers.{i}")))
            .collect::<Result<_>>()?;
        let norm = l.norm(NormKind::Rms, "model.norm", h, cfg.rms_norm_eps)?;
        // A checkpoint without lm_head.weight ties the head to the embeddings, whatever the config
        // says (GGUF files drop `output.weight` when tied).
        let lm_head = if l.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            l.linear("lm_head", h, cfg.vocab_size, false)?
        } else {
            l.tied("model.embed_tokens", cfg.vocab_size, h, None)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            attn: AttnSpec {
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.n_kv_heads(),
                head_dim: cfg.head_dim(),
                rope: Some(rope),
                window: cfg.window(),
                dropout: cfg.attention_dropout,
                causal: true,
                scale: None,
                softcap: None,
            },
            cfg: cfg.clone(),
        })
    }
}

impl<W: Weights> CausalFamily<W> for Llama<W> {
    fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], last_only: bool) -> Result<E::X> {
        let mut x = e.embed(&self.embed_tokens, ids)?;
        for (i, l) in self.layers.iter().enumerate() {
            let h = e.norm(&l.input_layernorm, &x)?;
            let [q, k, v] = e.parts(&l.qkv, &h)?;
            let a = e.attention(&self.attn, i, q, k, v)?;
            let a = e.linear(&l.o_proj, &a, None)?;
            x = e.add(x, a)?;
            let h = e.norm(&l.post_attention_layernorm, &x)?;
            let [gate, up] = e.parts(&l.gate_up, &h)?;
            let m = e.glu(&gate, &up, self.cfg.hidden_act)?;
            let m = e.linear(&l.down_proj, &m, None)?;
            x = e.add(x, m)?;
        }
        if last_only {
            x = e.rows(&x, Rows::Last)?;
        }
        let x = e.norm(&self.norm, &x)?;
        e.linear(&self.lm_head, &x, None)
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
