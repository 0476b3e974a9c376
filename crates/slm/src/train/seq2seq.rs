//! Seq2Seq training: an encoder-decoder family from `models/` (the definition inference runs)
//! on the training executor, taught by teacher forcing as transformers does it: the decoder
//! reads `decoder_start_token_id` and the target shifted right, and each position predicts the
//! next target token; padding carries no loss.
//!
//! Data is JSONL, one `{"input", "target"}` or `{"prompt", "completion"}` object per line
//! ([`crate::data::read_pairs`]).

use std::path::{Path, PathBuf};

use super::causal::{save_model, Saved};
use super::ops;
use super::params::{step_seed, Params};
use super::tape::{Dropout, LoraSpec, ParamLoader, Tape, TrainW};
use super::trainer::{Evaluation, Model};
use super::TrainResult;
use crate::io::{open_weights, ModelFiles};
use crate::models::{bart, config_of, t5, Architecture, ModelConfig};
use crate::nn::exec::Seq2SeqFamily;
use crate::nn::Vb;
use crate::tokenize::Tokenizer;
use crate::Error;

/// A source and its target, as token ids; the target ends with EOS.
#[derive(Debug, Clone)]
pub struct Seq2SeqExample {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

#[derive(Debug)]
pub struct Seq2SeqData {
    pub train: Vec<Seq2SeqExample>,
    pub valid: Vec<Seq2SeqExample>,
    /// Examples whose source or target was cut to the maximum length.
    pub truncated: usize,
    pub format: &'static str,
}

pub struct Seq2SeqDataOptions<'a> {
    pub train: &'a Path,
    pub valid: Option<&'a Path>,
    pub valid_split: f32,
    pub seed: u64,
    /// The longest source and target, in tokens.
    pub max_source: usize,
    pub max_target: usize,
}

/// Token ids of `text` as [`Tokenizer::encode_sequence`] makes them (a `target` through the
/// target side, which differs for Marian), cut to `max` keeping the last token; and whether it
/// was cut.
pub fn encode(
    tok: &Tokenizer,
    text: &str,
    target: bool,
    max: usize,
) -> crate::Result<(Vec<u32>, bool)> {
    let mut ids = match target {
        true => tok.encode_target(text)?,
        false => tok.encode_sequence(text)?,
    };
    let cut = ids.len() > max;
    if cut {
        let last = ids[ids.len() - 1];
        ids.truncate(max.max(1));
        *ids.last_mut().expect("max ≥ 1") = last;
    }
    Ok((ids, cut))
}

/// One JSONL file of pairs as token ids, how many were cut, and the field names it used.
pub fn read_pairs(
    tok: &Tokenizer,
    path: &Path,
    max_source: usize,
    max_target: usize,
) -> TrainResult<(Vec<Seq2SeqExample>, usize, &'static str)> {
    let (pairs, format) = crate::data::read_pairs(path)?;
    let mut truncated = 0;
    let mut out = Vec::with_capacity(pairs.len());
    for p in &pairs {
        let (source, a) = encode(tok, &p.input, false, max_source)?;
        let (target, b) = encode(tok, &p.target, true, max_target)?;
        if source.is_empty() || target.is_empty() {
            return Err(Error::Data(format!(
                "{}: line {}: an empty {}: nothing to learn",
                path.display(),
                p.line,
                if source.is_empty() { "input" } else { "target" }
            )));
        }
        truncated += usize::from(a || b);
        out.push(Seq2SeqExample { source, target });
    }
    Ok((out, truncated, format))
}

pub fn load_seq2seq_data(tok: &Tokenizer, o: &Seq2SeqDataOptions) -> TrainResult<Seq2SeqData> {
    let (mut train, mut truncated, format) = read_pairs(tok, o.train, o.max_source, o.max_target)?;
    let valid = match o.valid {
        Some(v) => {
            let (valid, t, _) = read_pairs(tok, v, o.max_source, o.max_target)?;
            truncated += t;
            valid
        }
        None => super::hold_out(&mut train, o.valid_split, o.seed),
    };
    Ok(Seq2SeqData {
        train,
        valid,
        truncated,
        format,
    })
}

/// Right-padded sources `[b, ts]` and decoder inputs `[b, tt]` with the target each decoder
/// position predicts (`None` on padding).
#[derive(Debug, Clone)]
pub struct Seq2SeqBatch {
    pub source: Vec<u32>,
    pub source_lengths: Vec<usize>,
    pub ts: usize,
    pub decoder: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub target_lengths: Vec<usize>,
    pub tt: usize,
}

impl Seq2SeqBatch {
    /// Teacher forcing: each decoder input is `start` then the target shifted right.
    pub fn new(examples: &[&Seq2SeqExample], start: u32, pad: u32) -> Self {
        let ts = examples.iter().map(|e| e.source.len()).max().unwrap_or(1);
        let tt = examples.iter().map(|e| e.target.len()).max().unwrap_or(1);
        let mut b = Seq2SeqBatch {
            source: Vec::with_capacity(examples.len() * ts),
            source_lengths: Vec::with_capacity(examples.len()),
            ts: ts.max(1),
            decoder: Vec::with_capacity(examples.len() * tt),
            targets: Vec::with_capacity(examples.len() * tt),
            target_lengths: Vec::with_capacity(examples.len()),
            tt: tt.max(1),
        };
        for e in examples {
            let (s, t) = (e.source.len(), e.target.len());
            b.source.extend(&e.source);
            b.source.extend(std::iter::repeat_n(pad, b.ts - s));
            b.source_lengths.push(s);
            b.decoder.push(start);
            b.decoder.extend(&e.target[..t - 1]);
            b.decoder.extend(std::iter::repeat_n(pad, b.tt - t));
            b.targets.extend(e.target.iter().map(|&x| Some(x)));
            b.targets.extend(std::iter::repeat_n(None, b.tt - t));
            b.target_lengths.push(t);
        }
        b
    }

    pub fn size(&self) -> usize {
        self.source_lengths.len()
    }

    fn target_count(&self) -> usize {
        self.target_lengths.iter().sum()
    }
}

/// Batches of `batch_size` examples in order (evaluation).
pub fn seq2seq_batches(
    examples: &[Seq2SeqExample],
    batch_size: usize,
    start: u32,
    pad: u32,
) -> Vec<Seq2SeqBatch> {
    examples
        .chunks(batch_size.max(1))
        .map(|c| Seq2SeqBatch::new(&c.iter().collect::<Vec<_>>(), start, pad))
        .collect()
}

enum Net {
    T5(t5::T5<TrainW>),
    Bart(bart::Bart<TrainW>),
}

/// The forward pass of one family over a batch: encoder on the sources, decoder on the
/// shifted targets over its states.
fn forward<F: Seq2SeqFamily<TrainW>>(
    m: &F,
    tape: &mut Tape,
    batch: &Seq2SeqBatch,
) -> crate::Result<usize> {
    let memory = m.encode(tape, &batch.source)?;
    tape.begin_decoder(batch.tt, &batch.target_lengths);
    m.decode(tape, &batch.decoder, Some(&memory), false)
}

/// An encoder-decoder in training.
pub struct Seq2SeqTrain {
    net: Net,
    pub params: Params,
    pub arch: Architecture,
    pub lora: Option<LoraSpec>,
    /// The model's own dropout while training (evaluation never drops).
    pub dropout: Dropout,
    /// The decoder's first input and the padding id.
    pub start: u32,
    pub pad: u32,
    seed: u64,
    vocab: usize,
}

impl Seq2SeqTrain {
    /// Loads an encoder-decoder checkpoint (a HF folder); with `lora`, only LoRA factors on
    /// its target modules are trained.
    pub fn load(path: &Path, lora: Option<LoraSpec>, seed: u64) -> TrainResult<Self> {
        let files = ModelFiles::locate(path)?;
        let cfg = config_of(&files)?;
        let vb = Vb::new(open_weights(&files)?, false);
        let mut l = ParamLoader::new(vb, lora.clone(), seed);
        let m = Self::built(&cfg, &mut l, path, seed)?;
        if let Some(spec) = &lora {
            if !l.params.list.iter().any(|p| p.name.contains(".lora_A")) {
                return Err(Error::Unsupported(format!(
                    "{}: no module of this model is named {} (LoRA targets); t5 has e.g. q, k, v, o, wi, wo",
                    path.display(),
                    spec.targets.join(", ")
                )));
            }
        }
        Ok(Self {
            params: l.params,
            lora,
            ..m
        })
    }

    /// A new model of `cfg`, every weight drawn by the family's initialisation from `seed`.
    pub fn init(cfg: &ModelConfig, seed: u64) -> TrainResult<Self> {
        let Some(rule) = cfg.init_rule() else {
            return Err(Error::Unsupported(format!(
                "a new '{}' model is not initialised this way",
                cfg.architecture().name()
            )));
        };
        let mut l = ParamLoader::init(rule, seed);
        let m = Self::built(cfg, &mut l, Path::new("<new model>"), seed)?;
        Ok(Self {
            params: l.params,
            ..m
        })
    }

    /// The family's definition over `l`; the parameters stay in the loader.
    fn built(cfg: &ModelConfig, l: &mut ParamLoader, path: &Path, seed: u64) -> TrainResult<Self> {
        let (net, start, pad) = match cfg {
            ModelConfig::T5(c) => (
                Net::T5(t5::T5::new(c, l)?),
                c.decoder_start(),
                c.pad_token_id,
            ),
            ModelConfig::Bart(c) => (
                Net::Bart(bart::Bart::new(c, l)?),
                c.decoder_start(),
                c.pad_token_id,
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: '{}' is not an encoder-decoder; --task seq2seq trains t5 and bart models",
                    path.display(),
                    other.architecture().name()
                )))
            }
        };
        Ok(Self {
            net,
            params: Params::default(),
            arch: cfg.architecture(),
            lora: None,
            dropout: Dropout::Config,
            start,
            pad,
            seed,
            vocab: cfg.vocab_size(),
        })
    }

    /// Runs the forward pass; `seed` while training (dropout), `None` to evaluate.
    fn run(&self, batch: &Seq2SeqBatch, seed: Option<u64>) -> crate::Result<(Tape<'_>, usize)> {
        let mut tape = Tape::new(
            &self.params,
            batch.size(),
            batch.ts,
            &batch.source_lengths,
            seed,
        )
        .with_dropout(self.dropout);
        let out = match &self.net {
            Net::T5(m) => forward(m, &mut tape, batch)?,
            Net::Bart(m) => forward(m, &mut tape, batch)?,
        };
        Ok((tape, out))
    }

    /// The decoder's logits `[b·tt, vocab]`.
    pub fn logits(&self, batch: &Seq2SeqBatch) -> crate::Result<Vec<f32>> {
        let (tape, out) = self.run(batch, None)?;
        Ok(tape.value(out).to_vec())
    }

    /// Summed target-token loss and the number of target tokens, without gradients.
    pub fn loss_sum(&self, batch: &Seq2SeqBatch) -> crate::Result<(f64, usize)> {
        let (tape, out) = self.run(batch, None)?;
        let (loss, _) = ops::cross_entropy(tape.value(out), &batch.targets, self.vocab, 1.0);
        Ok((loss, batch.target_count()))
    }

    /// Forward and backward of the mean target-token loss / `accum`; returns the mean loss.
    pub fn forward_backward(&mut self, batch: &Seq2SeqBatch, accum: usize) -> crate::Result<f64> {
        let seed = step_seed(step_seed(self.seed, &batch.source), &batch.decoder);
        let (tape, out) = self.run(batch, Some(seed))?;
        let mut record = tape.finish();
        let count = batch.target_count().max(1);
        let (loss, dlogits) = ops::cross_entropy_owned(
            record.take_value(out),
            &batch.targets,
            self.vocab,
            (count * accum) as f32,
        );
        record.backward(out, dlogits, &mut self.params);
        Ok(loss * accum as f64)
    }
}

/// A Seq2Seq run for the trainer.
pub struct Seq2SeqRun {
    pub model: Seq2SeqTrain,
    /// The Hugging Face folder the model came from (config and tokenizer files).
    pub source: PathBuf,
}

impl Model for Seq2SeqRun {
    type Batch = Seq2SeqBatch;

    fn params(&self) -> &Params {
        &self.model.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.model.params
    }

    fn forward_backward(&mut self, batch: &Seq2SeqBatch, accum: usize) -> TrainResult<f64> {
        self.model.forward_backward(batch, accum)
    }

    fn evaluate(&self, batches: &[Seq2SeqBatch], done: &dyn Fn(usize)) -> TrainResult<Evaluation> {
        Evaluation::mean_token_loss(batches, done, |b| self.model.loss_sum(b))
    }

    fn tokens(batch: &Seq2SeqBatch) -> usize {
        batch.source_lengths.iter().sum::<usize>() + batch.target_count()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        save_model(
            dir,
            &Saved {
                params: &self.model.params,
                lora: self.model.lora.as_ref(),
                source: &self.source,
                task_type: "SEQ_2_SEQ_LM",
                fan_in_fan_out: false,
                alias: None,
            },
        )
    }
}
