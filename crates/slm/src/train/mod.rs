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

/// Training errors are [`crate::Error`]s (`Unsupported`, `Data`, `Resume`, or any other).
pub type TrainResult<T> = crate::Result<T>;
