//! Matrix products with block-quantized weights.

use candle_core::quantized::QMatMul as CandleQMatMul;
use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::io::QuantWeight;

pub struct QMatMul {
    inner: CandleQMatMul,
}

impl QMatMul {
    pub fn new(w: QuantWeight) -> Result<Self> {
        Ok(Self {
            inner: CandleQMatMul::from_qtensor(w.to_qtensor()?)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.inner.forward(&x.contiguous()?)?)
    }
}
