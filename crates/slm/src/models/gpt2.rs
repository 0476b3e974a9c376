//! GPT-2 and DistilGPT2: learned positions, pre-LayerNorm blocks, Conv1D weights, tied head.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::CausalLM;
use crate::error::Result;
use crate::nn::{Activation, Attention, Embedding, LayerNorm, Linear, Mlp, QkvProj, Vb};

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
}

fn default_eps() -> f64 {
    1e-5
}

fn default_act() -> Activation {
    Activation::GeluNew
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let attn = Attention::new(
            QkvProj::Fused(Linear::conv1d(h, 3 * h, &vb.pp("attn.c_attn"))?),
            Linear::conv1d(h, h, &vb.pp("attn.c_proj"))?,
            cfg.n_head,
            cfg.n_head,
            h / cfg.n_head,
            None,
            None,
        );
        Ok(Self {
            ln_1: LayerNorm::new(h, cfg.layer_norm_epsilon, &vb.pp("ln_1"))?,
            attn,
            ln_2: LayerNorm::new(h, cfg.layer_norm_epsilon, &vb.pp("ln_2"))?,
            mlp: Mlp::Plain {
                fc: Linear::conv1d(h, inner, &vb.pp("mlp.c_fc"))?,
                proj: Linear::conv1d(inner, h, &vb.pp("mlp.c_proj"))?,
                act: cfg.activation_function,
            },
        })
    }

    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, pos)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    cfg: Config,
}

impl Gpt2 {
    pub fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        // HF checkpoints of GPT2LMHeadModel prefix the body with "transformer."; bare GPT2Model
        // checkpoints do not.
        let body = if vb.contains("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb.clone()
        };
        let h = cfg.n_embd;
        let wte = Embedding::new(cfg.vocab_size, h, &body.pp("wte"))?;
        let wpe = Embedding::new(cfg.n_positions, h, &body.pp("wpe"))?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, &body.pp("h").pp(i)))
            .collect::<Result<_>>()?;
        let ln_f = LayerNorm::new(h, cfg.layer_norm_epsilon, &body.pp("ln_f"))?;
        let lm_head = if vb.contains("lm_head.weight") {
            Linear::new(h, cfg.vocab_size, false, &vb.pp("lm_head"))?
        } else {
            Linear::new(h, cfg.vocab_size, false, &body.pp("wte"))?
        };
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            cfg: cfg.clone(),
        })
    }
}

impl CausalLM for Gpt2 {
    fn forward(&mut self, ids: &[u32], pos: usize, all_logits: bool) -> Result<Tensor> {
        super::check_context(pos + ids.len(), self.cfg.n_positions)?;
        let t = ids.len();
        let ids_t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let positions: Vec<u32> = (pos as u32..(pos + t) as u32).collect();
        let pos_t = Tensor::new(positions.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut x = self
            .wte
            .forward(&ids_t)?
            .broadcast_add(&self.wpe.forward(&pos_t)?)?;
        for b in self.blocks.iter_mut() {
            x = b.forward(&x, pos)?;
        }
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let x = self.ln_f.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?)
    }

    fn clear_cache(&mut self) {
        self.blocks.iter_mut().for_each(|b| b.attn.clear_cache());
    }

    fn context_length(&self) -> usize {
        self.cfg.n_positions
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
