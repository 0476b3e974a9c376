//! `slm pretrain`: a language model from random init. A recurrent one is trained as PyTorch's
//! `word_language_model` trains one (its defaults are ours); a GPT-2 or Llama transformer with
//! AdamW, warmup and cosine decay on random blocks of the text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::nn::recurrent::Cell;
use slm::train::optim::{OptimConfig, Optimizer, Schedule};
use slm::train::pretrain::{self, Family, Pretrain, RnnSizes};
use slm::train::trainer::TrainConfig;

use super::finetune::{keep_freed_memory, progress, report};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Lstm,
    Gru,
    Gpt2,
    Llama,
    /// An encoder-decoder, trained on JSONL pairs {"input", "target"}.
    T5,
}

impl Arch {
    fn family(self) -> Option<Family> {
        match self {
            Arch::Lstm | Arch::Gru => None,
            Arch::Gpt2 => Some(Family::Gpt2),
            Arch::Llama => Some(Family::Llama),
            Arch::T5 => Some(Family::T5),
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optim {
    Sgd,
    Adamw,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    Constant,
    Linear,
    Cosine,
}

/// Defaults differ by kind: a recurrent model takes `word_language_model`'s (SGD, lr 20, clip
/// 0.25, batch 20), a transformer nanoGPT-like ones (AdamW, lr 1e-3, cosine, clip 1, batch 8).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The model: a recurrent cell (lstm, gru) or a transformer family (gpt2, llama).
    #[arg(long, value_enum)]
    arch: Arch,
    /// A JSON file of sizes: RNNModel's (`ninp` or `emsize`, `nhid`, `nlayers`, `dropout`,
    /// `tie_weights`) or a transformer's config.json keys (`n_embd`, `hidden_size`, ...);
    /// flags given on the command line win.
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
    /// Embedding size: the model's width [default: 200; transformers 384].
    #[arg(long)]
    emsize: Option<usize>,
    /// Hidden units per recurrent layer, or a transformer's MLP size [default: 200; gpt2
    /// 4·emsize, llama 1024].
    #[arg(long)]
    nhid: Option<usize>,
    /// Layers [default: 2; transformers 6].
    #[arg(long)]
    nlayers: Option<usize>,
    /// Transformers: attention heads [default: 6].
    #[arg(long)]
    heads: Option<usize>,
    /// Llama: key/value heads (grouped-query attention) [default: --heads].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Transformers: positions the model has [default: 256].
    #[arg(long)]
    context: Option<usize>,
    /// Dropout [default: 0.2 on a recurrent model's embeddings, between layers and before
    /// the decoder; gpt2 0.1 everywhere; llama 0 on attention].
    #[arg(long, value_parser = crate::parse::dropout)]
    dropout: Option<f32>,
    /// Recurrent: tie the decoder to the embedding table (needs --emsize = --nhid).
    /// Transformers are tied unless their config says otherwise.
    #[arg(long)]
    tied: bool,
    /// Recurrent: positions per chunk, how far back gradients flow (truncated BPTT) [default: 35].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    bptt: Option<usize>,
    /// Transformers: tokens per training block [default: --context].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    max_length: Option<usize>,
    /// Streams trained side by side (recurrent), or blocks per step [default: 20; transformers 8].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    batch_size: Option<usize>,
    /// Streams of the validation text, or blocks per evaluation batch [default: 10;
    /// transformers --batch-size].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    eval_batch_size: Option<usize>,
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Stop after this many steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// [default: sgd; transformers adamw]
    #[arg(long, value_enum)]
    optimizer: Option<Optim>,
    /// Learning rate [default: 20 for SGD, 1e-3 for AdamW].
    #[arg(long)]
    lr: Option<f32>,
    /// Steps of linear warmup from 0 to --lr [default: 0; transformers 100].
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Learning-rate decay after warmup [default: constant; transformers cosine].
    #[arg(long, value_enum)]
    schedule: Option<Sched>,
    /// Clip the global gradient norm (0: off) [default: 0.25; transformers 1].
    #[arg(long)]
    clip: Option<f32>,
    /// Multiply the learning rate by this after an evaluation whose validation loss did not
    /// improve (1: never) [default: 0.25; transformers 1].
    #[arg(long)]
    anneal: Option<f32>,
    /// [default: 0; transformers 0.1, not on biases and norms]
    #[arg(long)]
    weight_decay: Option<f32>,
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

/// `--config`'s JSON object (empty without one).
fn config_file(a: &Args) -> Result<serde_json::Value> {
    let Some(p) = &a.config else {
        return Ok(serde_json::json!({}));
    };
    let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
    let v = serde_json::from_str::<serde_json::Value>(&text)
        .with_context(|| format!("{}: not JSON", p.display()))?;
    anyhow::ensure!(v.is_object(), "{}: not a JSON object", p.display());
    Ok(v)
}

/// A transformer's config.json keys: `--config`'s, each overridden by its flag.
fn transformer_keys(
    a: &Args,
    family: Family,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let serde_json::Value::Object(mut keys) = config_file(a)? else {
        unreachable!("checked to be an object")
    };
    let names: &[&str] = match family {
        Family::Gpt2 => &["n_embd", "n_inner", "n_layer", "n_head", "n_positions"],
        Family::Llama => &[
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ],
        // Relative positions: T5 has no context to set.
        Family::T5 => &["d_model", "d_ff", "num_layers", "num_heads"],
    };
    anyhow::ensure!(
        family != Family::T5 || a.context.is_none(),
        "--context: t5 has relative positions and no fixed context; --max-length bounds the pairs"
    );
    let flags = [a.emsize, a.nhid, a.nlayers, a.heads, a.context];
    for (k, v) in names.iter().zip(flags) {
        if let Some(v) = v {
            anyhow::ensure!(v > 0, "{k} must be at least 1");
            keys.insert(k.to_string(), v.into());
        }
    }
    match family {
        Family::Gpt2 => {
            anyhow::ensure!(a.kv_heads.is_none(), "--kv-heads is a llama option");
            if let Some(d) = a.dropout {
                for k in ["embd_pdrop", "resid_pdrop", "attn_pdrop"] {
                    keys.insert(k.into(), d.into());
                }
            }
        }
        Family::T5 => {
            anyhow::ensure!(a.kv_heads.is_none(), "--kv-heads is a llama option");
            if let Some(d) = a.dropout {
                keys.insert("dropout_rate".into(), d.into());
            }
        }
        Family::Llama => {
            if let Some(h) = a.kv_heads.or(a.heads) {
                keys.insert("num_key_value_heads".into(), h.into());
            }
            if let Some(d) = a.dropout {
                keys.insert("attention_dropout".into(), d.into());
            }
        }
    }
    Ok(keys)
}

/// The sizes of `--config`, each overridden by its flag.
fn sizes(a: &Args) -> Result<RnnSizes> {
    let file = config_file(a)?;
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
    for (flag, set) in [
        ("--heads", a.heads.is_some()),
        ("--kv-heads", a.kv_heads.is_some()),
        ("--context", a.context.is_some()),
        ("--max-length", a.max_length.is_some()),
    ] {
        anyhow::ensure!(
            !set,
            "{flag} is a transformer option; a recurrent model has no heads or context"
        );
    }
    Ok(RnnSizes {
        cell: if a.arch == Arch::Gru {
            Cell::Gru
        } else {
            Cell::Lstm
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
    let family = a.arch.family();
    let tf = family.is_some();
    let (arch, seq_len) = match family {
        Some(family) => {
            anyhow::ensure!(
                a.bptt.is_none(),
                "--bptt is a recurrent option; transformers train on blocks of --max-length tokens"
            );
            anyhow::ensure!(!a.tied, "--tied is a recurrent option; a transformer's config.json says tie_word_embeddings");
            (
                pretrain::Arch::Transformer {
                    family,
                    config: transformer_keys(a, family)?,
                },
                a.max_length,
            )
        }
        None => (pretrain::Arch::Rnn(sizes(a)?), a.bptt),
    };
    let sgd = a
        .optimizer
        .unwrap_or(if tf { Optim::Adamw } else { Optim::Sgd })
        == Optim::Sgd;
    let batch_size = a.batch_size.unwrap_or(if tf { 8 } else { 20 });
    let schedule = a
        .schedule
        .unwrap_or(if tf { Sched::Cosine } else { Sched::Constant });
    Ok(Pretrain {
        arch,
        init: a.init.clone(),
        tokenizer: a.tokenizer.clone(),
        train: a.train.clone(),
        valid: a.valid.clone(),
        output: a.output.clone(),
        seq_len,
        batch_size,
        eval_batch_size: a
            .eval_batch_size
            .unwrap_or(if tf { batch_size } else { 10 }),
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
                plateau_factor: Some(a.anneal.unwrap_or(if tf { 1.0 } else { 0.25 }))
                    .filter(|&f| f != 1.0),
                lr: a.lr.unwrap_or(if sgd { 20.0 } else { 1e-3 }),
                weight_decay: a.weight_decay.unwrap_or(if tf { 0.1 } else { 0.0 }),
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                warmup_steps: a.warmup_steps.unwrap_or(if tf { 100 } else { 0 }),
                schedule: match schedule {
                    Sched::Constant => Schedule::Constant,
                    Sched::Linear => Schedule::Linear,
                    Sched::Cosine => Schedule::Cosine,
                },
                max_grad_norm: a.clip.unwrap_or(if tf { 1.0 } else { 0.25 }),
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
