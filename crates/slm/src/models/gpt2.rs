//! GPT-2 and DistilGPT2: learned positions, pre-LayerNorm blocks, Conv1D weights, tied head.

use serde::Deserialize;

use crate::error::Result;
use crate::nn::exec::{AttnSpec, CausalFamily, Exec, Loader, NormKind, Parts, Rows, Weights};
use crate::nn::Activation;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    /// Dropout after the embeddings, on the residual branches and on the attention
    /// probabilities (GPT2Config's defaults: 0.1 each).
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f32,
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f32,
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f32,
    /// The std of a new model's weights.
    #[serde(default = "super::default_init_range")]
    pub initializer_range: f32,
}

fn default_dropout() -> f32 {
    0.1
}

fn default_eps() -> f64 {
    1e-5
}

fn default_act() -> Activation {
    Activation::GeluNew
}

struct Block<W: Weights> {
    ln_1: W::Norm,
    c_attn: Parts<W::Linear>,
    attn_proj: W::Linear,
    ln_2: W::Norm,
    c_fc: W::Linear,
    mlp_proj: W::Linear,
}

impl<W: Weights> Block<W> {
    fn new(cfg: &Config, l: &mut impl Loader<W = W>, base: &str) -> Result<Self> {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: l.norm(NormKind::Layer, &format!("{base}.ln_1"), h, eps)?,
            c_attn: Parts::Fused(
                l.conv1d(&format!("{base}.attn.c_attn"), h, 3 * h)?,
                vec![h; 3],
            ),
            attn_proj: l.conv1d(&format!("{base}.attn.c_proj"), h, h)?,
            ln_2: l.norm(NormKind::Layer, &format!("{base}.ln_2"), h, eps)?,
            c_fc: l.conv1d(&format!("{base}.mlp.c_fc"), h, inner)?,
            mlp_proj: l.conv1d(&format!("{base}.mlp.c_proj"), inner, h)?,
        })
    }
}

impl Config {
    /// `GPT2PreTrainedModel._init_weights`: N(0, range²) weights, the residual projections
    /// (`c_proj`) scaled by 1/√(2·layers), the head tied.
    pub fn init_rule(&self) -> crate::train::loader::InitRule {
        crate::train::loader::InitRule {
            std: self.initializer_range,
            scaled: vec![("c_proj.weight", 1.0 / (2.0 * self.n_layer as f32).sqrt())],
            tied: true,
        }
    }
}

/// The module PEFT's LoRA targets by default (the fused Q|K|V Conv1D).
pub const LORA_TARGETS: &[&str] = &["c_attn"];

pub struct Gpt2<W: Weights> {
    wte: W::Embedding,
    wpe: W::Embedding,
    blocks: Vec<Block<W>>,
    ln_f: W::Norm,
    lm_head: W::Linear,
    attn: AttnSpec,
    pub cfg: Config,
}

impl<W: Weights> Gpt2<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        // HF checkpoints of GPT2LMHeadModel prefix the body with "transformer."; bare GPT2Model
        // checkpoints do not.
        let body = if l.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let h = cfg.n_embd;
        let wte = l.embedding(&format!("{body}wte"), cfg.vocab_size, h)?;
        let wpe = l.embedding(&format!("{body}wpe"), cfg.n_positions, h)?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, l, &format!("{body}h.{i}")))
            .collect::<Result<_>>()?;
        let ln_f = l.norm(
            NormKind::Layer,
            &format!("{body}ln_f"),
            h,
            cfg.layer_norm_epsilon,
        )?;
        let lm_head = if l.contains("lm_head.weight") {
            l.linear("lm_head", h, cfg.vocab_size, false)?
        } else {
            l.tied(&format!("{body}wte"), cfg.vocab_size, h, None)?
        };
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            attn: AttnSpec {
                n_heads: cfg.n_head,
                n_kv_heads: cfg.n_head,
                head_dim: h / cfg.n_head,
                rope: None,
                window: None,
                dropout: cfg.attn_pdrop,
                causal: true,
                scale: None,
                softcap: None,
            },
            cfg: cfg.clone(),
        })
    }
}

impl<W: Weights> CausalFamily<W> for Gpt2<W> {
    fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], last_only: bool) -> Result<E::X> {
        let c = &self.cfg;
        let tokens = e.embed(&self.wte, ids)?;
        let positions = e.positions(&self.wpe, 0)?;
        let x = e.add(tokens, positions)?;
        let mut x = e.dropout(x, c.embd_pdrop)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = e.norm(&b.ln_1, &x)?;
            let [q, k, v] = e.parts(&b.c_attn, &h)?;
            let a = e.attention(&self.attn, i, q, k, v)?;
            let a = e.linear(&b.attn_proj, &a, None)?;
            let a = e.dropout(a, c.resid_pdrop)?;
            x = e.add(x, a)?;
            let h = e.norm(&b.ln_2, &x)?;
            let m = e.linear(&b.c_fc, &h, Some(c.activation_function))?;
            let m = e.linear(&b.mlp_proj, &m, None)?;
            let m = e.dropout(m, c.resid_pdrop)?;
            x = e.add(x, m)?;
        }
        if last_only {
            x = e.rows(&x, Rows::Last)?;
        }
        let x = e.norm(&self.ln_f, &x)?;
        e.linear(&self.lm_head, &x, None)
    }

    fn n_layers(&self) -> usize {
        self.blocks.len()
    }

    fn context_length(&self) -> usize {
        self.cfg.n_positions
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
