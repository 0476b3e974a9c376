use std::sync::Arc;

use candle_core::{Module, Tensor};

use super::kernels::{self, with_f32};
use super::qdot::BlockQ8;
use super::qmatmul::QMatMul;
use super::{Activation, Vb};
use crate::error::Result;
use crate::io::{QuantWeight, Weight};

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
            // Kept as [in, out]: the GEMM then reads it in place, with no per-call packing.
            Weight::Dense(t) => LinearWeight::Dense(t.t()?.contiguous()?),
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

    /// The dense weight, stored `[in, out]`, and the bias: what a kernel that runs its own
    /// product (the recurrence's step) reads. None for a quantized weight.
    pub fn dense(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.weight {
            LinearWeight::Dense(w) => Some((w, self.bias.as_ref())),
            LinearWeight::Quant(_) => None,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quant(_))
    }

    /// `x` is `[.., in]`; the result is `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }

    /// `act(x·Wᵀ + b)`; on dense weights the bias and activation are fused into the GEMM pass.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m = dims.iter().product::<usize>() / k.max(1);
        *dims.last_mut().unwrap() = self.out_features;
        if let LinearWeight::Quant(q) = &self.weight {
            if self.bias.is_none() && act.is_none() {
                super::pool::products_on_rayon(false);
                return q.forward(x);
            }
        }
        let mut y = vec![0f32; m * self.out_features];
        with_f32(x, |xs| {
            self.forward_into(xs, m, &mut y, act, &mut Vec::new())
        })??;
        kernels::tensor(y, dims)
    }

    /// [`Self::forward_act`] of `m` rows of `x` into `y` (`m × out`, overwritten); a quantized
    /// weight's activations are quantized into `xq`, a buffer kept from call to call.
    pub fn forward_into(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        act: Option<Activation>,
        xq: &mut Vec<BlockQ8>,
    ) -> Result<()> {
        let (k, n) = (x.len() / m.max(1), self.out_features);
        match &self.weight {
            LinearWeight::Dense(w) => {
                super::pool::products_on_rayon(true);
                with_f32(w, |ws| match &self.bias {
                    Some(b) => with_f32(b, |bs| {
                        kernels::linear_into(x, m, k, ws, n, Some(bs), act, y)
                    }),
                    None => {
                        kernels::linear_into(x, m, k, ws, n, None, act, y);
                        Ok(())
                    }
                })??;
            }
            LinearWeight::Quant(q) => {
                super::pool::products_on_rayon(false);
                q.forward_into(x, m, y, xq)?;
                if let Some(b) = &self.bias {
                    with_f32(b, |bs| {
                        y.chunks_exact_mut(n)
                            .for_each(|r| r.iter_mut().zip(bs).for_each(|(v, b)| *v += b))
                    })?;
                }
                if let Some(a) = act {
                    kernels::activate(y, a);
                }
            }
        }
        Ok(())
    }

    /// Unbiased quantized weights as one layer whose matrix is packed straight from their
    /// bytes ([`QMatMul::stacked`]); None when slm's kernels cannot take them as one.
    pub fn stacked(ws: &[Weight]) -> Option<Self> {
        let qs: Vec<&QuantWeight> = ws
            .iter()
            .map(|w| match w {
                Weight::Quant(q) => Some(q),
                Weight::Dense(_) => None,
            })
            .collect::<Option<_>>()?;
        Some(Self {
            weight: LinearWeight::Quant(Arc::new(QMatMul::stacked(&qs)?)),
            bias: None,
            out_features: qs.iter().map(|q| q.rows).sum(),
        })
    }

    /// One layer computing several layers' outputs side by side (Q, K and V; gate and up), so
    /// one product (and one quantization of the input) replaces several. None when the parts
    /// cannot share a matrix (dense mixed with quantized, different block types, some biased).
    pub fn try_concat(parts: &[&Linear]) -> Result<Option<Self>> {
        let biases: Vec<Tensor> = parts.iter().filter_map(|p| p.bias.clone()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            _ => return Ok(None),
        };
        let out_features = parts.iter().map(|p| p.out_features).sum();
        let weight = if let Some(ws) = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::Dense(w) => Some(w.clone()),
                LinearWeight::Quant(_) => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            // Dense weights are stored [in, out]: outputs side by side are columns.
            LinearWeight::Dense(Tensor::cat(&ws, 1)?)
        } else {
            let qs: Option<Vec<&QMatMul>> = parts
                .iter()
                .map(|p| match &p.weight {
                    LinearWeight::Quant(q) => Some(q.as_ref()),
                    LinearWeight::Dense(_) => None,
                })
                .collect();
            match qs.and_then(|qs| QMatMul::concat_rows(&qs)) {
                Some(q) => LinearWeight::Quant(Arc::new(q)),
                None => return Ok(None),
            }
        };
        Ok(Some(Self {
            weight,
            bias,
            out_features,
        }))
    }
}

/// A token or position embedding table. A block-quantized table (GGUF) stays quantized and only
/// the looked-up rows are dequantized: SmolLM2's Q8_0 table is 30 MB as stored, 113 MB as f32.
#[derive(Clone)]
pub struct Embedding {
    table: EmbeddingTable,
    dim: usize,
}

#[derive(Clone)]
enum EmbeddingTable {
    Dense(Tensor),
    Quant(Arc<QuantWeight>),
    /// In the quantized product's own layout, so that a tied output layer shares the bytes
    /// (Gemma's 262,144 × 640 Q8_0 table is 178 MB).
    Product(Arc<QMatMul>),
}

impl Embedding {
    /// A table of `[count, dim]` values.
    pub fn from_tensor(t: Tensor) -> Result<Self> {
        let dim = t.dim(1)?;
        Ok(Self {
            table: EmbeddingTable::Dense(t),
            dim,
        })
    }

    pub fn new(count: usize, dim: usize, vb: &Vb) -> Result<Self> {
        let table = match vb.get_weight("weight", &[count, dim])? {
            Weight::Dense(t) => EmbeddingTable::Dense(t),
            Weight::Quant(q) if QMatMul::is_own(&q) => {
                EmbeddingTable::Product(Arc::new(QMatMul::new(q)?))
            }
            Weight::Quant(q) => EmbeddingTable::Quant(Arc::new(q)),
        };
        Ok(Self { table, dim })
    }

    /// The output layer that reads this table (tied weights) without a copy of it, when the
    /// table is held in a product's layout.
    pub fn tied_linear(&self) -> Option<Linear> {
        match &self.table {
            EmbeddingTable::Product(m) => Some(Linear {
                out_features: m.own_shape()?.0,
                weight: LinearWeight::Quant(m.clone()),
                bias: None,
            }),
            _ => None,
        }
    }

    /// The whole table in f32 (dequantized if stored quantized), e.g. for a tied output layer.
    pub fn table(&self) -> Result<Tensor> {
        match &self.table {
            EmbeddingTable::Dense(t) => Ok(t.clone()),
            EmbeddingTable::Quant(q) => q.dequantize(),
            EmbeddingTable::Product(m) => {
                let (rows, cols) = m.own_shape().unwrap_or((0, self.dim));
                let mut out = vec![0f32; rows * cols];
                for (r, row) in out.chunks_mut(cols).enumerate() {
                    m.dequantize_row(r, row);
                }
                kernels::tensor(out, vec![rows, cols])
            }
        }
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The rows of `ids` into `y` (`ids.len() × dim`): a decoded token's embedding without a
    /// tensor, where the table is f32 or in slm's own block layout.
    pub fn rows_into(&self, ids: &[u32], y: &mut [f32]) -> Result<()> {
        let dim = self.dim;
        let outside = |id: u32| {
            crate::error::Error::msg(format!("token id {id} is outside the embedding table"))
        };
        match &self.table {
            EmbeddingTable::Dense(t) => with_f32(t, |table| {
                for (row, &id) in y.chunks_exact_mut(dim).zip(ids) {
                    let src = table.get(id as usize * dim..(id as usize + 1) * dim);
                    row.copy_from_slice(src.ok_or_else(|| outside(id))?);
                }
                Ok(())
            })?,
            EmbeddingTable::Product(m) => {
                for (row, &id) in y.chunks_exact_mut(dim).zip(ids) {
                    if !m.dequantize_row(id as usize, row) {
                        return Err(outside(id));
                    }
                }
                Ok(())
            }
            EmbeddingTable::Quant(_) => {
                let t = self.forward(&Tensor::new(ids, &candle_core::Device::Cpu)?)?;
                with_f32(&t, |rows| y.copy_from_slice(rows))
            }
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.table {
            EmbeddingTable::Dense(t) => {
                Ok(candle_nn::Embedding::new(t.clone(), self.dim).forward(ids)?)
            }
            EmbeddingTable::Quant(q) => {
                let rb = q.row_bytes();
                let mut out = Vec::with_capacity(ids.elem_count() * self.dim);
                for id in ids.flatten_all()?.to_vec1::<u32>()? {
                    let id = id as usize;
                    if id >= q.rows {
                        return Err(crate::error::Error::msg(format!(
                            "token id {id} is outside the embedding table ({} rows)",
                            q.rows
                        )));
                    }
                    let row = QuantWeight {
                        dtype: q.dtype,
                        rows: 1,
                        cols: q.cols,
                        data: q.data[id * rb..(id + 1) * rb].to_vec().into(),
                        origin: None,
                    };
                    out.extend(row.dequantize()?.flatten_all()?.to_vec1::<f32>()?);
                }
                let mut dims = ids.dims().to_vec();
                dims.push(self.dim);
                kernels::tensor(out, dims)
            }
            EmbeddingTable::Product(m) => {
                let mut dims = ids.dims().to_vec();
                dims.push(self.dim);
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * self.dim];
                for (row, &id) in out.chunks_mut(self.dim).zip(&ids) {
                    if !m.dequantize_row(id as usize, row) {
                        return Err(crate::error::Error::msg(format!(
                            "token id {id} is outside the embedding table"
                        )));
                    }
                }
                kernels::tensor(out, dims)
            }
        }
    }
}
