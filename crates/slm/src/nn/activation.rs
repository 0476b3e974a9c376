use candle_core::Tensor;
use serde::Deserialize;

use crate::error::Result;

/// The activations HF configs name (`hidden_act` / `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf).
    Gelu,
    /// GPT-2's tanh approximation.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    #[serde(alias = "swish")]
    Silu,
    Relu,
    Tanh,
}

impl Activation {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluNew => x.gelu()?,
            Activation::Silu => candle_nn::ops::silu(x)?,
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}
