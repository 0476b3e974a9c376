//! Rotary position embeddings in HF's "rotate half" layout, with the frequency scalings that
//! transformers' `ROPE_INIT_FUNCTIONS` define.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// `rope_scaling` from config.json. `type` is the older spelling of `rope_type`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The cos and sin tables, `[max_pos, head_dim / 2]` row-major, as transformers computes them.
pub fn tables(
    head_dim: usize,
    theta: f64,
    max_pos: usize,
    scaling: Option<&RopeScaling>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut inv_freq: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    if let Some(s) = scaling {
        let kind = s.rope_type.as_deref().unwrap_or("default");
        let factor = s.factor.unwrap_or(1.0);
        match kind {
            "default" => {}
            "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                let lo = s.low_freq_factor.unwrap_or(1.0);
                let hi = s.high_freq_factor.unwrap_or(4.0);
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (lo_wl, hi_wl) = (old / lo, old / hi);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > lo_wl {
                        *f /= factor;
                    } else if wl >= hi_wl {
                        let smooth = (old / wl - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            other => {
                return Err(Error::msg(format!(
                "rope_scaling type '{other}' is not supported (supported: default, linear, llama3)"
            )))
            }
        }
    }
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for f in &inv_freq {
            // transformers computes the angles in f32; do the same so tables agree bit for bit
            // as far as possible.
            let a = (p as f32) * (*f as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((cos, sin))
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_pos: usize,
        scaling: Option<&RopeScaling>,
    ) -> Result<Self> {
        let (cos, sin) = tables(head_dim, theta, max_pos, scaling)?;
        let half = head_dim / 2;
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_pos, half), &Device::Cpu)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// `x` is `[b, heads, t, head_dim]` for positions `pos..pos+t`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        if pos + t > self.max_positions() {
            return Err(Error::ContextOverflow {
                tokens: pos + t,
                context: self.max_positions(),
            });
        }
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}
