//! Fine-tuning on the CPU.
//!
//! - [`ops`]: forward and hand-written backward of every layer, on row-major f32 buffers.
//! - [`params`]: parameters by transformers name, LoRA-capable linear layers.
//! - [`bert`]: BERT sequence classification built from those.
//! - [`optim`]: AdamW, schedules, clipping.
//! - [`trainer`]: the loop: accumulation, evaluation, early stopping, checkpoints and resume.
//! - [`classify`]: a text/label dataset turned into batches, and the classification run.

pub mod bert;
pub mod causal;
pub mod checkpoint;
pub mod classify;
pub mod lm;
pub mod masked;
pub mod ops;
pub mod optim;
pub mod params;
pub mod tape;
pub mod token;
pub mod trainer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Resume(String),
    #[error(transparent)]
    Slm(#[from] crate::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Slm(e.into())
    }
}

pub type TrainResult<T> = std::result::Result<T, TrainError>;
