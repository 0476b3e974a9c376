//! Multi-head and grouped-query self-attention with an optional rotary embedding, a KV cache for
//! generation and an optional sliding window.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::{Linear, Rope};
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
    sliding_window: Option<usize>,
    cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    pub fn new(
        qkv: QkvProj,
        o: Linear,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rope: Option<Arc<Rope>>,
        sliding_window: Option<usize>,
    ) -> Self {
        Self {
            qkv,
            o,
            n_heads,
            n_kv_heads,
            head_dim,
            rope,
            sliding_window,
            cache: None,
        }
    }

    pub fn clear_cache(&mut self) {
        self.cache = None;
    }

    /// Causal self-attention over `x` (`[b, t, hidden]`) at positions `pos..pos+t`, appending to
    /// the KV cache.
    pub fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            QkvProj::Fused(l) => {
                let y = l.forward(x)?;
                (
                    y.narrow(D::Minus1, 0, nh * hd)?,
                    y.narrow(D::Minus1, nh * hd, nkv * hd)?,
                    y.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = match &self.rope {
            Some(r) => (r.apply(&q, pos)?, r.apply(&k, pos)?),
            None => (q, k),
        };
        let (k, v) = match &self.cache {
            Some((ck, cv)) if pos > 0 => (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?),
            _ => (k, v),
        };
        self.cache = Some((k.clone(), v.clone()));
        let total = k.dim(2)?;
        let groups = nh / nkv;
        // Grouped-query attention: fold the query heads of a group into the row dimension so
        // each KV head is used by one matmul, with no copy of K or V per query head.
        let q = q.reshape((b, nkv, groups * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask(t, total, pos, self.sliding_window, groups)? {
            Some(m) => att.broadcast_add(&m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // [b, nkv, groups*t, hd]
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&y)
    }
}

/// Additive mask for `t` new queries at `pos..pos+t` over `total` keys, repeated for the
/// `groups` query heads folded into the rows; None when nothing is masked.
fn mask(
    t: usize,
    total: usize,
    pos: usize,
    window: Option<usize>,
    groups: usize,
) -> Result<Option<Tensor>> {
    let needs_window = window.is_some_and(|w| total > w);
    if t == 1 && !needs_window {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(groups * t * total);
    for _ in 0..groups {
        for i in 0..t {
            let qpos = pos + i;
            for j in 0..total {
                let masked = j > qpos || window.is_some_and(|w| qpos >= w && j <= qpos - w);
                m.push(if masked { f32::NEG_INFINITY } else { 0.0 });
            }
        }
    }
    Ok(Some(
        Tensor::from_vec(m, (groups * t, total), &Device::Cpu)?.to_dtype(DType::F32)?,
    ))
}
