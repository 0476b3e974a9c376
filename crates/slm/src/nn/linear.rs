use std::sync::Arc;

use candle_core::{Module, Tensor};

use super::qmatmul::QMatMul;
use super::Vb;
use crate::error::Result;
use crate::io::Weight;

/// The one linear layer of slm: weight dense (f32, `[out, in]`) or block-quantized, optional bias.
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
}

#[derive(Clone)]
enum LinearWeight {
    Dense(Tensor),
    Quant(Arc<QMatMul>),
}

impl Linear {
    pub fn from_weight(w: Weight, bias: Option<Tensor>) -> Result<Self> {
        let out_features = w.dims()[0];
        let weight = match w {
            Weight::Dense(t) => LinearWeight::Dense(t),
            Weight::Quant(q) => LinearWeight::Quant(Arc::new(QMatMul::new(q)?)),
        };
        Ok(Self {
            weight,
            bias,
            out_features,
        })
    }

    /// HF `nn.Linear`: weight `[out, in]` under `vb`.
    pub fn new(in_features: usize, out_features: usize, bias: bool, vb: &Vb) -> Result<Self> {
        let w = vb.get_weight("weight", &[out_features, in_features])?;
        let b = if bias {
            Some(vb.get("bias", &[out_features])?)
        } else {
            None
        };
        Self::from_weight(w, b)
    }

    /// GPT-2's `Conv1D` stores the weight as `[in, out]`; GGUF files store it as `[out, in]`.
    pub fn conv1d(in_features: usize, out_features: usize, vb: &Vb) -> Result<Self> {
        let bias = Some(vb.get("bias", &[out_features])?);
        if vb.is_gguf() {
            let w = vb.get_weight("weight", &[out_features, in_features])?;
            return Self::from_weight(w, bias);
        }
        let w = vb.get("weight", &[in_features, out_features])?;
        Self::from_weight(Weight::Dense(w.t()?.contiguous()?), bias)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quant(_))
    }

    /// `x` is `[.., in]`; the result is `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let dims = x.dims().to_vec();
                let inner = dims[dims.len() - 1];
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
                let mut out = dims;
                *out.last_mut().unwrap() = self.out_features;
                y.reshape(out)?
            }
            LinearWeight::Quant(q) => q.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// A token or position embedding table, kept in f32 so lookups are exact copies.
#[derive(Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn new(count: usize, dim: usize, vb: &Vb) -> Result<Self> {
        Ok(Self {
            table: vb.get("weight", &[count, dim])?,
        })
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::Embedding::new(self.table.clone(), self.table.dim(1)?).forward(ids)?)
    }
}
