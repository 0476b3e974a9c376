use candle_core::{DType, Tensor};

use super::kernels::{self, with_f32};
use super::Vb;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: &Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[size])?,
            eps: eps as f32,
        })
    }

    /// Gemma's `(1 + w)·x̂`: the stored offset plus one, added once at load.
    pub fn offset(size: usize, eps: f64, vb: &Vb) -> Result<Self> {
        Ok(Self {
            weight: (vb.get("weight", &[size])? + 1.0)?,
            eps: eps as f32,
        })
    }

    pub fn size(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 || self.weight.dtype() != DType::F32 {
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps,
            )?);
        }
        let h = self.size()?;
        if x.dims().last() != Some(&h) {
            return Err(crate::error::Error::msg(format!(
                "rms norm of width {h} over a tensor of shape {:?}",
                x.dims()
            )));
        }
        let y = with_f32(x, |xs| {
            with_f32(&self.weight, |w| kernels::rms_norm(xs, w, self.eps, h))
        })??;
        kernels::tensor(y, x.dims().to_vec())
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: &Vb) -> Result<Self> {
        // Checkpoints from the original TensorFlow BERT port name the parameters gamma/beta;
        // transformers renames them on load, and so do we.
        let (w, b) = if !vb.contains("weight") && vb.contains("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Self {
            weight: vb.get(w, &[size])?,
            bias: vb.get(b, &[size])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `layer_norm(x + res)` in one pass (post-LN encoders add the residual right before).
    pub fn forward_residual(&self, x: &Tensor, res: Option<&Tensor>) -> Result<Tensor> {
        let h = self.weight.dim(0)?;
        let y = with_f32(x, |xs| {
            with_f32(&self.weight, |w| {
                with_f32(&self.bias, |b| match res {
                    Some(r) => with_f32(r, |rs| {
                        kernels::add_layer_norm(xs, Some(rs), w, b, self.eps, h)
                    }),
                    None => Ok(kernels::add_layer_norm(xs, None, w, b, self.eps, h)),
                })
            })
        })????;
        kernels::tensor(y, x.dims().to_vec())
    }
}

/// Either normalization, as a family's config chooses.
#[derive(Debug, Clone)]
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    /// The width each normalized group has.
    pub fn size(&self) -> Result<usize> {
        match self {
            Norm::Rms(n) => n.size(),
            Norm::Layer(n) => Ok(n.weight.dim(0)?),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }

    /// `norm(x + residual)` per row into `y` (as long as `x`), in the arithmetic of
    /// [`Self::forward`] (bit for bit) on f32 weights; a residual for LayerNorm only (one pass).
    pub fn forward_into(&self, x: &[f32], residual: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
        let h = self.size()?;
        if h == 0 || !x.len().is_multiple_of(h) || y.len() != x.len() {
            return Err(crate::error::Error::msg(format!(
                "internal: a norm of width {h} over {} values",
                x.len()
            )));
        }
        match self {
            Norm::Rms(_) if residual.is_some() => Err(crate::error::Error::msg(
                "internal: an RMS norm takes its residual added first",
            )),
            Norm::Rms(n) => with_f32(&n.weight, |w| kernels::rms_norm_into(x, w, n.eps, h, y)),
            Norm::Layer(n) => with_f32(&n.weight, |w| {
                with_f32(&n.bias, |b| {
                    kernels::add_layer_norm_into(x, residual, w, b, n.eps, h, y)
                })
            })?,
        }
    }
}
