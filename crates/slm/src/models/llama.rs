//! The Llama architecture and its close relatives: Llama 2/3, SmolLM2, TinyLlama, Mistral,
//! Qwen2/2.5 (q/k/v biases) and Phi-3 (fused qkv and gate_up projections).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::CausalLM;
use crate::error::Result;
use crate::nn::{
    Activation, Attention, Embedding, Linear, Mlp, QkvProj, RmsNorm, Rope, RopeScaling, Vb,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Llama,
    Qwen2,
    Phi3,
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
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 configs carry a `sliding_window` that only applies when `use_sliding_window` is set.
    fn window(&self) -> Option<usize> {
        match self.use_sliding_window {
            Some(false) => None,
            _ => self.sliding_window,
        }
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn new(cfg: &Config, rope: &Arc<Rope>, vb: &Vb) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let att = vb.pp("self_attn");
        let qkv = match cfg.variant {
            Variant::Phi3 => QkvProj::Fused(Linear::new(
                h,
                (nh + 2 * nkv) * hd,
                false,
                &att.pp("qkv_proj"),
            )?),
            Variant::Llama | Variant::Qwen2 => {
                let bias = cfg.attention_bias || cfg.variant == Variant::Qwen2;
                let q = Linear::new(h, nh * hd, bias, &att.pp("q_proj"))?;
                let k = Linear::new(h, nkv * hd, bias, &att.pp("k_proj"))?;
                let v = Linear::new(h, nkv * hd, bias, &att.pp("v_proj"))?;
                // One product (and one quantization of x) instead of three.
                match Linear::try_concat(&[&q, &k, &v])? {
                    Some(l) => QkvProj::Fused(l),
                    None => QkvProj::Separate { q, k, v },
                }
            }
        };
        let o = Linear::new(nh * hd, h, cfg.attention_bias, &att.pp("o_proj"))?;
        let self_attn = Attention::new(qkv, o, nh, nkv, hd, Some(rope.clone()), cfg.window());
        let m = vb.pp("mlp");
        let i = cfg.intermediate_size;
        let mlp = match cfg.variant {
            Variant::Phi3 => Mlp::GatedFused {
                gate_up: Linear::new(h, 2 * i, false, &m.pp("gate_up_proj"))?,
                down: Linear::new(i, h, false, &m.pp("down_proj"))?,
                act: cfg.hidden_act,
            },
            _ => {
                let gate = Linear::new(h, i, cfg.mlp_bias, &m.pp("gate_proj"))?;
                let up = Linear::new(h, i, cfg.mlp_bias, &m.pp("up_proj"))?;
                let down = Linear::new(i, h, cfg.mlp_bias, &m.pp("down_proj"))?;
                let act = cfg.hidden_act;
                match Linear::try_concat(&[&gate, &up])? {
                    Some(gate_up) => Mlp::GatedFused { gate_up, down, act },
                    None => Mlp::Gated {
                        gate,
                        up,
                        down,
                        act,
                    },
                }
            }
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(h, cfg.rms_norm_eps, &vb.pp("input_layernorm"))?,
            self_attn,
            post_attention_layernorm: RmsNorm::new(
                h,
                cfg.rms_norm_eps,
                &vb.pp("post_attention_layernorm"),
            )?,
            mlp,
        })
    }

    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, pos)?)?;
        Ok((&x
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&x)?)?)?)
    }
}

pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: Config,
}

impl Llama {
    pub fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        let h = cfg.hidden_size;
        let rope = Arc::new(Rope::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.rope_scaling.as_ref(),
        )?);
        let model = vb.pp("model");
        let embed_tokens = Embedding::new(cfg.vocab_size, h, &model.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &rope, &model.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::new(h, cfg.rms_norm_eps, &model.pp("norm"))?;
        // A checkpoint without lm_head.weight ties the head to the embeddings, whatever the config
        // says (GGUF files drop `output.weight` when tied).
        let lm_head = if vb.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            Linear::new(h, cfg.vocab_size, false, &vb.pp("lm_head"))?
        } else {
            Linear::new(h, cfg.vocab_size, false, &model.pp("embed_tokens"))?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
        })
    }
}

impl CausalLM for Llama {
    fn forward(&mut self, ids: &[u32], pos: usize, all_logits: bool) -> Result<Tensor> {
        super::check_context(pos + ids.len(), self.cfg.max_position_embeddings)?;
        let t = ids.len();
        let ids_t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.forward(&ids_t)?;
        for l in self.layers.iter_mut() {
            x = l.forward(&x, pos)?;
        }
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?)
    }

    fn clear_cache(&mut self) {
        self.layers
            .iter_mut()
            .for_each(|l| l.self_attn.clear_cache());
    }

    fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
