use candle_core::Tensor;

use super::{kernels, Activation, Linear};
use crate::error::Result;

/// Feed-forward blocks: plain (GPT-2, BERT) or gated (Llama family; Phi-3 fuses gate and up).
#[derive(Clone)]
pub enum Mlp {
    Plain {
        fc: Linear,
        proj: Linear,
        act: Activation,
    },
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
    GatedFused {
        gate_up: Linear,
        down: Linear,
        act: Activation,
    },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Plain { fc, proj, act } => proj.forward(&fc.forward_act(x, Some(*act))?),
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let h = (act.forward(&gate.forward(x)?)? * up.forward(x)?)?;
                down.forward(&h)
            }
            Mlp::GatedFused { gate_up, down, act } => {
                let gu = gate_up.forward(x)?;
                let mut dims = gu.dims().to_vec();
                let n = dims[dims.len() - 1] / 2;
                *dims.last_mut().unwrap() = n;
                let h = kernels::with_f32(&gu, |s| kernels::gated(s, n, *act))?;
                down.forward(&kernels::tensor(h, dims)?)
            }
        }
    }
}
