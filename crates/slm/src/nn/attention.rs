//! Bidirectional multi-head self-attention of the encoders (causal attention with a KV cache is
//! the inference executor's, `nn/infer.rs`).

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{kernels, Linear, Rope};
use crate::error::Result;

/// How Q, K and V are projected: separately (Llama, Qwen2) or by one fused matrix (GPT-2, Phi-3).
#[derive(Clone)]
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

#[derive(Clone)]
pub struct Attention {
    qkv: QkvProj,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rope: Option<Arc<Rope>>,
}

impl Attention {
    pub fn new(
        qkv: QkvProj,
        o: Linear,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rope: Option<Arc<Rope>>,
    ) -> Self {
        Self {
            qkv,
            o,
            n_heads,
            n_kv_heads,
            head_dim,
            rope,
        }
    }

    /// Q, K and V as `[b, heads, t, head_dim]`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        match &self.qkv {
            QkvProj::Separate { q, k, v } => {
                let heads = |x: Tensor, n: usize| -> Result<Tensor> {
                    Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
                };
                Ok((
                    heads(q.forward(x)?, nh)?,
                    heads(k.forward(x)?, nkv)?,
                    heads(v.forward(x)?, nkv)?,
                ))
            }
            QkvProj::Fused(l) => {
                // One pass from [b, t, (nh + 2·nkv)·hd] to three head-major buffers.
                let y = l.forward(x)?;
                let [q, k, v] =
                    kernels::with_f32(&y, |y| kernels::split_heads(y, b, t, [nh, nkv, nkv], hd))?;
                Ok((
                    kernels::tensor(q, vec![b, nh, t, hd])?,
                    kernels::tensor(k, vec![b, nkv, t, hd])?,
                    kernels::tensor(v, vec![b, nkv, t, hd])?,
                ))
            }
        }
    }

    /// Scaled dot-product attention of `q` (`[b, nh, t, hd]`) over `k`, `v` (`[b, nkv, total,
    /// hd]`) with an additive `mask` broadcastable to `[b, nkv, groups*t, total]`, then the
    /// output projection.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let groups = nh / self.n_kv_heads;
        // Grouped-query attention: fold the query heads of a group into the row dimension so
        // each KV head is used by one matmul, with no copy of K or V per query head.
        let q = q.reshape((b, self.n_kv_heads, groups * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(v)?; // [b, nkv, groups*t, hd]
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&y)
    }

    /// Bidirectional self-attention (encoders): row `i` of sequence `s` sees the first
    /// `lengths[s]` tokens (right padding is never attended to).
    pub fn forward_bidirectional(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if let (QkvProj::Fused(l), None) = (&self.qkv, &self.rope) {
            let qkv = l.forward(x)?;
            let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
            let y = kernels::with_f32(&qkv, |s| {
                kernels::bidirectional_attention(s, t, nh, nkv, hd, lengths)
            })?;
            return self.o.forward(&kernels::tensor(y, vec![b, t, nh * hd])?);
        }
        let (q, k, v) = self.project(x)?;
        let (q, k) = match &self.rope {
            Some(r) => (r.apply(&q, 0)?, r.apply(&k, 0)?),
            None => (q, k),
        };
        let mask = if lengths.iter().any(|&l| l < t) {
            let m: Vec<f32> = (lengths.iter())
                .flat_map(|&l| (0..t).map(move |j| if j < l { 0.0 } else { f32::MIN }))
                .collect();
            Some(Tensor::from_vec(m, (b, 1, 1, t), &Device::Cpu)?)
        } else {
            None
        };
        self.attend(&q, &k, &v, mask.as_ref())
    }
}
