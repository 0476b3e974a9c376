use candle_core::Tensor;

use super::{Activation, Linear};
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
                let n = gu.dim(candle_core::D::Minus1)? / 2;
                let gate = gu.narrow(candle_core::D::Minus1, 0, n)?;
                let up = gu.narrow(candle_core::D::Minus1, n, n)?;
                down.forward(&(act.forward(&gate)? * up)?)
            }
        }
    }
}
