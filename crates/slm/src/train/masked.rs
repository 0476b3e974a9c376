//! Masked-LM fine-tuning data: one text per line (or JSONL `text`), masked as transformers'
//! `DataCollatorForLanguageModeling` does: 15% of the tokens (never `[CLS]`/`[SEP]`) are
//! chosen; of those 80% become `[MASK]`, 10% a random token, 10% stay, and only they count
//! in the loss. Masks are drawn per batch from a seed made of the run's seed and the batch's
//! examples, so a resumed run masks exactly as the uninterrupted one.

use std::path::{Path, PathBuf};

use rand::Rng;

use super::bert::{Batch, BertTrain};
use super::classify::save_model;
use super::params::seeded;
use super::trainer::{Evaluation, Model};
use super::TrainResult;
use crate::data::{read_records, Columns};
use crate::tokenize::{EncoderInput, Tokenizer};

pub struct MaskedData {
    pub train: Vec<EncoderInput>,
    pub valid: Vec<EncoderInput>,
    pub truncated: usize,
}

pub fn load_masked_data(
    tok: &Tokenizer,
    train: &Path,
    valid: Option<&Path>,
    valid_split: f32,
    seed: u64,
    max_len: usize,
) -> TrainResult<MaskedData> {
    let mut truncated = 0;
    let mut read = |path: &Path| -> TrainResult<Vec<EncoderInput>> {
        let records = read_records(path, &Columns::default(), true)?;
        if records.is_empty() {
            return Err(crate::Error::Data(format!(
                "{}: no text to train on",
                path.display()
            )));
        }
        records
            .iter()
            .map(|r| {
                let e = tok.encode_pair(&r.text, None, max_len)?;
                truncated += usize::from(e.full_len > max_len);
                Ok(e)
            })
            .collect()
    };
    let mut train_set = read(train)?;
    let valid_set = match valid {
        Some(v) => read(v)?,
        None => super::hold_out(&mut train_set, valid_split, seed),
    };
    Ok(MaskedData {
        train: train_set,
        valid: valid_set,
        truncated,
    })
}

/// What masking needs from the tokenizer.
#[derive(Clone, Copy)]
pub struct Masker {
    pub mask_id: u32,
    pub pad_id: u32,
    pub vocab: u32,
    pub seed: u64,
}

impl Masker {
    pub fn new(tok: &Tokenizer, seed: u64) -> TrainResult<Self> {
        let mask_id = ["[MASK]", "<mask>"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .ok_or_else(|| {
                crate::Error::Unsupported(format!(
                    "{}: the tokenizer has no mask token",
                    tok.origin.display()
                ))
            })?;
        Ok(Self {
            mask_id,
            pad_id: tok.pad_id(),
            vocab: tok.vocab_size() as u32,
            seed,
        })
    }

    /// A padded, masked batch; `key` (the examples' indices) seeds the draw.
    pub fn batch(&self, examples: &[&EncoderInput], key: &[usize]) -> Batch {
        let mut h = self.seed ^ 0xcbf2_9ce4_8422_2325;
        for &k in key {
            h = (h ^ k as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = seeded(h);
        let t = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut b = Batch {
            ids: Vec::with_capacity(examples.len() * t),
            types: Vec::with_capacity(examples.len() * t),
            lengths: Vec::with_capacity(examples.len()),
            t,
            labels: Vec::new(),
            targets: Vec::with_capacity(examples.len() * t),
        };
        for e in examples {
            let n = e.ids.len();
            for (j, &id) in e.ids.iter().enumerate() {
                let special = j == 0 || j + 1 == n;
                if !special && rng.random::<f32>() < 0.15 {
                    b.targets.push(Some(id));
                    let r: f32 = rng.random();
                    b.ids.push(if r < 0.8 {
                        self.mask_id
                    } else if r < 0.9 {
                        rng.random_range(0..self.vocab)
                    } else {
                        id
                    });
                } else {
                    b.targets.push(None);
                    b.ids.push(id);
                }
            }
            b.ids.extend(std::iter::repeat_n(self.pad_id, t - n));
            b.targets.extend(std::iter::repeat_n(None, t - n));
            b.types.extend(&e.type_ids);
            b.types.extend(std::iter::repeat_n(0, t - n));
            b.lengths.push(n);
        }
        b
    }
}

pub struct MaskedRun {
    pub model: BertTrain,
    pub source: PathBuf,
}

impl Model for MaskedRun {
    type Batch = Batch;

    fn params(&self) -> &super::params::Params {
        &self.model.params
    }

    fn params_mut(&mut self) -> &mut super::params::Params {
        &mut self.model.params
    }

    fn forward_backward(&mut self, batch: &Batch, accum: usize) -> TrainResult<f64> {
        self.model.forward_backward(batch, accum)
    }

    fn evaluate(&self, batches: &[Batch], done: &dyn Fn(usize)) -> TrainResult<Evaluation> {
        let (mut sum, mut n, mut correct) = (0.0, 0usize, 0usize);
        for (i, b) in batches.iter().enumerate() {
            let logits = self.model.logits(b)?;
            let (targets, v) = self.model.targets(b);
            sum += super::ops::cross_entropy(&logits, &targets, v, 1.0).0;
            for (row, t) in logits.chunks(v).zip(&targets) {
                let pred = (0..v)
                    .max_by(|&x, &y| row[x].total_cmp(&row[y]))
                    .unwrap_or(0);
                correct += usize::from(Some(pred as u32) == *t);
            }
            n += targets.len();
            done(i + 1);
        }
        Ok(Evaluation {
            loss: sum / n.max(1) as f64,
            metric: Some(("masked accuracy".into(), correct as f64 / n.max(1) as f64)),
        })
    }

    fn tokens(batch: &Batch) -> usize {
        batch.lengths.iter().sum()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        save_model(&self.model, &self.source, dir)
    }
}
