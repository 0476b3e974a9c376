//! `slm pretrain`: a recurrent language model from random init, trained as PyTorch's
//! `word_language_model` trains one (its defaults are ours).

use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::nn::recurrent::Cell;
use slm::train::optim::{OptimConfig, Optimizer, Schedule};
use slm::train::pretrain::{self, Pretrain, RnnSizes};
use slm::train::trainer::TrainConfig;

use super::finetune::{keep_freed_memory, progress, report};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Lstm,
    Gru,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optim {
    Sgd,
    Adamw,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The recurrent cell.
    #[arg(long, value_enum)]
    arch: Arch,
    /// A JSON file of RNNModel's sizes (`ninp` or `emsize`, `nhid`, `nlayers`, `dropout`,
    /// `tie_weights`); flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from this checkpoint's weights instead of a new initialisation (a folder with a
    /// word_language_model state_dict and vocab.txt, or an slm model); its tensors set the
    /// sizes (--emsize, --nhid, --nlayers and --tied are not used).
    #[arg(long)]
    init: Option<PathBuf>,
    /// A tokenizer folder (tokenizer.json, e.g. from `slm tokenizer train --type word`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Training text files, read one after another as one stream.
    #[arg(long, num_args = 1.., required = true)]
    train: Vec<PathBuf>,
    /// Validation text files; evaluated at the end of every epoch.
    #[arg(long, num_args = 1..)]
    valid: Vec<PathBuf>,
    /// Where the model, init/, checkpoint/, metrics.jsonl and loss.svg go.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Embedding size [default: 200].
    #[arg(long)]
    emsize: Option<usize>,
    /// Hidden units per layer [default: 200].
    #[arg(long)]
    nhid: Option<usize>,
    /// Recurrent layers [default: 2].
    #[arg(long)]
    nlayers: Option<usize>,
    /// Dropout on the embeddings, between layers and before the decoder [default: 0.2].
    #[arg(long, value_parser = crate::parse::dropout)]
    dropout: Option<f32>,
    /// Tie the decoder to the embedding table (needs --emsize = --nhid).
    #[arg(long)]
    tied: bool,
    /// Positions per chunk: gradients flow back this far (truncated BPTT).
    #[arg(long, default_value_t = 35, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    bptt: usize,
    /// Streams trained side by side.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    batch_size: usize,
    /// Streams of the validation text.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Stop after this many chunks (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: Optim,
    /// Learning rate [default: 20 for SGD, 1e-3 for AdamW].
    #[arg(long)]
    lr: Option<f32>,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 0.25)]
    clip: f32,
    /// Multiply the learning rate by this after an epoch whose validation loss did not improve
    /// (1: never).
    #[arg(long, default_value_t = 0.25)]
    anneal: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 1111)]
    seed: u64,
    /// Evaluate every N chunks (default: at the end of every epoch).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Write a checkpoint every N chunks (one is always written at the end).
    #[arg(long)]
    save_every: Option<usize>,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    patience: Option<usize>,
    /// Continue the run in OUTPUT from its last checkpoint, with the same options.
    #[arg(long)]
    resume: bool,
    /// Overwrite an OUTPUT folder that already holds a run or a model.
    #[arg(long)]
    force: bool,
}

/// The sizes of `--config`, each overridden by its flag.
fn sizes(a: &Args) -> Result<RnnSizes> {
    let file = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            serde_json::from_str::<serde_json::Value>(&text)
                .with_context(|| format!("{}: not JSON", p.display()))?
        }
        None => serde_json::Value::Null,
    };
    let num = |keys: &[&str]| -> Result<Option<f64>> {
        for k in keys {
            match file.get(*k) {
                None => continue,
                Some(v) => {
                    return v
                        .as_f64()
                        .map(Some)
                        .with_context(|| format!("--config: '{k}' must be a number, got {v}"))
                }
            }
        }
        Ok(None)
    };
    let size = |flag: Option<usize>, keys: &[&str], default: usize| -> Result<usize> {
        let v = match flag {
            Some(v) => v,
            None => num(keys)?.map_or(default, |v| v as usize),
        };
        anyhow::ensure!(v > 0, "{} must be at least 1", keys[0]);
        Ok(v)
    };
    Ok(RnnSizes {
        cell: match a.arch {
            Arch::Lstm => Cell::Lstm,
            Arch::Gru => Cell::Gru,
        },
        emsize: size(a.emsize, &["emsize", "ninp"], 200)?,
        nhid: size(a.nhid, &["nhid"], 200)?,
        nlayers: size(a.nlayers, &["nlayers"], 2)?,
        dropout: match a.dropout {
            Some(d) => d,
            None => num(&["dropout"])?.map_or(0.2, |v| v as f32),
        },
        tied: a.tied || file.get("tie_weights").and_then(|v| v.as_bool()) == Some(true),
    })
}

fn job(a: &Args) -> Result<Pretrain> {
    let sgd = a.optimizer == Optim::Sgd;
    Ok(Pretrain {
        rnn: sizes(a)?,
        init: a.init.clone(),
        tokenizer: a.tokenizer.clone(),
        train: a.train.clone(),
        valid: a.valid.clone(),
        output: a.output.clone(),
        bptt: a.bptt,
        batch_size: a.batch_size,
        eval_batch_size: a.eval_batch_size,
        config: TrainConfig {
            epochs: a.epochs,
            max_steps: a.max_steps,
            batch_size: 1,
            grad_accum: 1,
            optim: OptimConfig {
                optimizer: if sgd {
                    Optimizer::Sgd
                } else {
                    Optimizer::AdamW
                },
                plateau_factor: (a.anneal != 1.0).then_some(a.anneal),
                lr: a.lr.unwrap_or(if sgd { 20.0 } else { 1e-3 }),
                weight_decay: a.weight_decay,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                warmup_steps: 0,
                schedule: Schedule::Constant,
                max_grad_norm: a.clip,
            },
            seed: a.seed,
            eval_every: a.eval_every,
            save_every: a.save_every,
            patience: a.patience,
            keep_best: true,
            shuffle: false,
        },
        resume: a.resume,
        force: a.force,
    })
}

pub fn run(a: Args) -> Result<()> {
    keep_freed_memory();
    let p = job(&a)?;
    let bar = progress(0);
    let summary =
        pretrain::run(&p, &bar).with_context(|| format!("training into {}", p.output.display()));
    bar.bar.finish_and_clear();
    report(&summary?, &p.output)
}
