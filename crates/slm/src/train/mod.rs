//! Fine-tuning on the CPU.
//!
//! - [`ops`]: forward and hand-written backward of every layer, on row-major f32 buffers;
//!   [`attention`]: the attention kernel's.
//! - [`params`]: parameters by transformers name, LoRA-capable linear layers.
//! - [`tape`]: the training executor, [`record`]: the backward of what it recorded;
//!   [`loader`]: which weights train, by HF name.
//! - [`bert`]: BERT sequence classification built from those.
//! - [`optim`]: AdamW, schedules, clipping.
//! - [`trainer`]: the loop: accumulation, evaluation, early stopping, checkpoints and resume.
//! - [`classify`]: a text/label dataset turned into batches, and the classification run.
//! - [`seq2seq`]: encoder-decoders taught by teacher forcing.
//! - [`job`]: one whole run of any task, from the model and data files to the saved output.

pub mod attention;
pub mod bert;
pub mod causal;
pub mod checkpoint;
pub mod classify;
pub mod job;
pub mod lm;
pub mod loader;
pub mod masked;
pub mod ops;
pub mod optim;
pub mod params;
pub mod pretrain;
pub mod record;
pub mod rnn_classify;
pub mod seq2seq;
pub mod stream;
pub mod tape;
pub mod token;
pub mod trainer;

/// Training errors are [`crate::Error`]s (`Unsupported`, `Data`, `Resume`, or any other).
pub type TrainResult<T> = crate::Result<T>;

/// Holds out `frac` of `train` (a seeded shuffle, at least one example kept for training) as
/// the validation set, both in file order.
pub fn hold_out<T>(train: &mut Vec<T>, frac: f32, seed: u64) -> Vec<T> {
    let n = ((train.len() as f32) * frac).round() as usize;
    let mut order: Vec<usize> = (0..train.len()).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut params::seeded(seed));
    let mut held: Vec<usize> = order[..n.min(train.len().saturating_sub(1))].to_vec();
    held.sort_unstable_by(|a, b| b.cmp(a));
    let mut valid: Vec<T> = held.iter().map(|&i| train.remove(i)).collect();
    valid.reverse();
    valid
}
