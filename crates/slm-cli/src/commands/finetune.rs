//! `slm finetune`: train a model on your data, fully or with LoRA.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use slm::train::job::{self, Job, Lora};
use slm::train::optim::{OptimConfig, Schedule};
use slm::train::tape::Dropout;
use slm::train::trainer::{self, Evaluation, Hooks, StepInfo, TrainConfig};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification from text,label rows.
    Classify,
    /// Next-token prediction: plain text, prompt/completion or chat JSONL.
    CausalLm,
    /// Masked-token prediction on plain text (BERT family).
    MaskedLm,
    /// A tag per word (NER, POS) from JSONL {"tokens": [...], "tags": [...]} (BERT family).
    TokenClassify,
    /// A target text from a source text (T5): JSONL {"input", "target"} or {"prompt", "completion"}.
    Seq2seq,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Full,
    Lora,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Sched {
    Constant,
    Linear,
    Cosine,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The model to start from: a folder, or a hub id ORG/NAME. With --arch: a recurrent
    /// language model whose tokenizer and embedding the classifier starts from (optional).
    #[arg(long, short = 'm', required_unless_present = "arch")]
    pub(crate) model: Option<PathBuf>,
    /// What to train: a classifier head, a tagger, next-token prediction or masked-token prediction.
    #[arg(long, value_enum, default_value = "classify")]
    pub(crate) task: Task,
    /// Training data: TSV/CSV with a header or JSONL, with text and label fields.
    #[arg(long)]
    pub(crate) train: PathBuf,
    /// Validation data in the same format (default: --valid-split of the training data).
    #[arg(long)]
    pub(crate) valid: Option<PathBuf>,
    /// Fraction of the training data held out for validation when there is no --valid.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) valid_split: f32,
    /// Where the model, checkpoint/, metrics.jsonl and loss.svg go.
    #[arg(long, short = 'o')]
    pub(crate) output: PathBuf,
    /// full: every weight; lora: low-rank adapters on --target-modules (a PEFT adapter).
    #[arg(long, value_enum, default_value = "full")]
    pub(crate) method: Method,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    pub(crate) epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub(crate) max_steps: Option<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    pub(crate) batch_size: usize,
    /// Batches whose gradients are summed before each optimizer step.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    pub(crate) grad_accum: usize,
    /// Peak learning rate (default: 5e-5 for full fine-tuning, 2e-4 for LoRA, 1e-3 with --arch).
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Steps of linear warmup from 0 to --lr.
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup_steps: usize,
    /// Learning-rate decay after warmup: constant, linear to 0, or cosine to 0.
    #[arg(long, value_enum, default_value = "linear")]
    pub(crate) schedule: Sched,
    /// AdamW weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.01)]
    pub(crate) weight_decay: f32,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f32,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) max_grad_norm: f32,
    /// Seed of initialisation, shuffling, masking and dropout: the same seed, the same run.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Tokens per example, special tokens included; longer examples are truncated (and
    /// counted). Default: 128 for classification, 256 for causal LM (or the model's positions).
    #[arg(long)]
    pub(crate) max_length: Option<usize>,
    /// Seq2seq: tokens per target, EOS included (default: 128); --max-length bounds the source.
    #[arg(long)]
    pub(crate) max_target_length: Option<usize>,
    /// Evaluate on the validation set every N steps.
    #[arg(long)]
    pub(crate) eval_every: Option<usize>,
    /// Write a checkpoint every N steps (one is always written at the end).
    #[arg(long)]
    pub(crate) save_every: Option<usize>,
    /// Stop after N evaluations without improvement of the validation metric.
    #[arg(long)]
    pub(crate) patience: Option<usize>,
    /// Save the best evaluated model to OUTPUT/best.
    #[arg(long)]
    pub(crate) keep_best: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub(crate) lora_r: usize,
    /// LoRA scaling: the update is (alpha / r) * B * A.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) lora_alpha: f32,
    /// Dropout on the LoRA branches' input while training (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) lora_dropout: f32,
    /// The model's own dropout while training, at every site where the model applies it
    /// (default: the rates of its config, as transformers trains).
    #[arg(long, value_parser = crate::parse::dropout, conflicts_with = "no_dropout")]
    pub(crate) dropout: Option<f32>,
    /// Train without the model's dropout (LoRA dropout still applies).
    #[arg(long)]
    pub(crate) no_dropout: bool,
    /// LoRA target modules (default per family, as PEFT's: c_attn for GPT-2, q_proj,v_proj for
    /// Llama and Qwen2, qkv_proj for Phi-3, query,value for BERT).
    #[arg(long, value_delimiter = ',')]
    pub(crate) target_modules: Vec<String>,
    /// Continue the run in OUTPUT from its last checkpoint, with the same options.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Overwrite an OUTPUT folder that already holds a run.
    #[arg(long)]
    pub(crate) force: bool,
    /// Field (JSONL) or column (CSV/TSV) of the text (default: text, sentence, sentence1).
    #[arg(long)]
    pub(crate) text_column: Option<String>,
    /// Field or column of the label (default: label).
    #[arg(long)]
    pub(crate) label_column: Option<String>,
    /// Classification: drop rows whose text is empty instead of stopping with an error.
    #[arg(long)]
    pub(crate) skip_empty: bool,
    #[command(flatten)]
    pub(crate) rnn: RnnArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RnnArch {
    /// A bidirectional LSTM.
    Bilstm,
    /// A bidirectional GRU.
    Bigru,
    Lstm,
    Gru,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolArg {
    Mean,
    Max,
}

/// A recurrent text classifier built by `--task classify --arch ...`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RnnArgs {
    /// Build a recurrent classifier instead of fine-tuning an encoder: from random init, or
    /// from the embedding of the recurrent language model -m names. Its --dropout (default
    /// 0.3) is on the embeddings, between layers and before the head.
    #[arg(long, value_enum)]
    arch: Option<RnnArch>,
    /// --arch: embedding size.
    #[arg(long, default_value_t = 128, value_parser = crate::parse::positive)]
    emsize: usize,
    /// --arch: hidden units per direction.
    #[arg(long, default_value_t = 128, value_parser = crate::parse::positive)]
    nhid: usize,
    /// --arch: recurrent layers.
    #[arg(long, default_value_t = 1, value_parser = crate::parse::positive)]
    nlayers: usize,
    /// --arch: how a text's positions become one vector for the head.
    #[arg(long, value_enum, default_value = "max")]
    pooling: PoolArg,
    /// --arch: a word tokenizer folder to use (default: one trained on the training texts).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// --arch: the trained tokenizer's largest vocabulary.
    #[arg(long, default_value_t = 30_000, value_parser = crate::parse::positive)]
    vocab_size: usize,
    /// --arch: words seen fewer times in the training texts are <unk>.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[command(flatten)]
    preprocess: super::tokenizer::PreprocessArgs,
}

impl RnnArgs {
    fn spec(&self, dropout: Option<f32>) -> Result<Option<slm::train::rnn_classify::RnnSpec>> {
        use slm::nn::recurrent::Cell;
        let Some(arch) = self.arch else {
            return Ok(None);
        };
        let (cell, bidirectional) = match arch {
            RnnArch::Bilstm => (Cell::Lstm, true),
            RnnArch::Bigru => (Cell::Gru, true),
            RnnArch::Lstm => (Cell::Lstm, false),
            RnnArch::Gru => (Cell::Gru, false),
        };
        let preprocess = self.preprocess.preprocess()?;
        anyhow::ensure!(
            preprocess.is_empty() || self.tokenizer.is_none(),
            "--tokenizer brings its own preprocessing; the lowercase, accent, punctuation and stop-word options apply to the tokenizer slm trains"
        );
        Ok(Some(slm::train::rnn_classify::RnnSpec {
            cell,
            bidirectional,
            emsize: self.emsize,
            nhid: self.nhid,
            nlayers: self.nlayers,
            pooling: match self.pooling {
                PoolArg::Mean => slm::nn::exec::Pool::Mean,
                PoolArg::Max => slm::nn::exec::Pool::Max,
            },
            dropout: dropout.unwrap_or(0.3),
            tokenizer: self.tokenizer.clone(),
            vocab_size: self.vocab_size,
            min_frequency: self.min_frequency,
            preprocess,
        }))
    }
}

pub(crate) struct Bar {
    pub(crate) bar: ProgressBar,
}

impl Bar {
    /// Above the bar on a terminal; on stderr when the bar is hidden (a pipe, a log file).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Hooks for Bar {
    fn step(&self, s: &StepInfo) {
        self.bar.set_length(s.total as u64);
        self.bar.set_position(s.step as u64);
        self.bar.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e} {:.0} tok/s",
            s.epoch, s.loss, s.lr, s.tokens_per_s
        ));
    }

    fn evaluating(&self, done: usize, total: usize) {
        // The bar stands still while the model evaluates: say so, and how far it is.
        self.bar
            .set_message(format!("evaluating {done}/{total} batches"));
    }

    fn eval(&self, step: usize, e: &Evaluation, best: bool) {
        let metric = e
            .metric
            .as_ref()
            .map(|(n, v)| format!(" {n} {v:.4}"))
            .unwrap_or_else(|| format!(" perplexity {:.3}", e.loss.exp()));
        self.say(format!(
            "step {step}: eval loss {:.4}{metric}{}",
            e.loss,
            if best { " (best)" } else { "" }
        ));
    }

    fn message(&self, m: &str) {
        self.say(m.to_string());
    }
}

fn train_config(a: &Args) -> TrainConfig {
    let lora = a.method == Method::Lora;
    TrainConfig {
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        optim: OptimConfig {
            optimizer: slm::train::optim::Optimizer::AdamW,
            plateau_factor: None,
            // A network from random init (--arch) learns at Adam's usual rate.
            lr: a.lr.unwrap_or(if a.rnn.arch.is_some() {
                1e-3
            } else if lora {
                2e-4
            } else {
                5e-5
            }),
            weight_decay: a.weight_decay,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: 1e-8,
            warmup_steps: a.warmup_steps,
            schedule: match a.schedule {
                Sched::Constant => Schedule::Constant,
                Sched::Linear => Schedule::Linear,
                Sched::Cosine => Schedule::Cosine,
            },
            max_grad_norm: a.max_grad_norm,
        },
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        patience: a.patience,
        keep_best: a.keep_best,
        shuffle: true,
    }
}

/// The model's own dropout: its config's rates unless told otherwise.
fn dropout(a: &Args) -> Dropout {
    match (a.no_dropout, a.dropout) {
        (true, _) => Dropout::Off,
        (false, Some(p)) => Dropout::Rate(p),
        (false, None) => Dropout::Config,
    }
}

pub(crate) fn progress(total: usize) -> Bar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Bar { bar }
}

pub(crate) fn report(summary: &trainer::Summary, out: &std::path::Path) -> Result<()> {
    let eval = summary
        .final_eval
        .as_ref()
        .map(|e| {
            let m = e
                .metric
                .as_ref()
                .map(|(n, v)| format!(", {n} {v:.4}"))
                .unwrap_or_else(|| format!(", perplexity {:.3}", e.loss.exp()));
            format!("; valid loss {:.4}{m}", e.loss)
        })
        .unwrap_or_default();
    outln!(
        "{} steps in {:.1} s ({:.0} tokens/s), last train loss {:.4}{eval}{}",
        summary.steps,
        summary.seconds,
        summary.tokens as f64 / summary.train_seconds.max(1e-9),
        summary.final_loss,
        if summary.stopped_early {
            " (stopped early)"
        } else {
            ""
        }
    );
    outln!("saved to {}", out.display());
    Ok(())
}

/// Training allocates and frees the same large activation buffers every step. glibc returns
/// them to the system and maps them again, and each round trip costs page faults and TLB
/// shootdowns across the worker threads (measured: about 15% of a MiniLM step, 15% of an LSTM
/// LM step whose 38.6 MB logits sit above the 32 MB ceiling of glibc's mmap threshold). With
/// mmap off for allocations and no trimming, freed memory stays in the heap for the next step.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only changes allocator tuning; it is called before training starts.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    keep_freed_memory();
    let (summary, out) = train(a)?;
    report(&summary, &out)
}

/// The run an `Args` describes, for the library.
fn job(a: &Args) -> Result<Job> {
    let rnn = a.rnn.spec(a.dropout)?;
    anyhow::ensure!(
        rnn.is_none() || a.task == Task::Classify,
        "--arch builds a text classifier: use it with --task classify"
    );
    Ok(Job {
        task: match a.task {
            Task::Classify => job::Task::Classify,
            Task::CausalLm => job::Task::CausalLm,
            Task::MaskedLm => job::Task::MaskedLm,
            Task::TokenClassify => job::Task::TokenClassify,
            Task::Seq2seq => job::Task::Seq2Seq,
        },
        model: a.model.clone().unwrap_or_default(),
        output: a.output.clone(),
        train: a.train.clone(),
        valid: a.valid.clone(),
        valid_split: a.valid_split,
        columns: slm::data::Columns {
            text: a.text_column.clone(),
            pair: None,
            label: a.label_column.clone(),
        },
        skip_empty: a.skip_empty,
        max_length: a.max_length,
        max_target_length: a.max_target_length,
        lora: (a.method == Method::Lora).then(|| Lora {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            targets: a.target_modules.clone(),
        }),
        // An RNN classifier's --dropout is its config's rate.
        dropout: if rnn.is_some() && !a.no_dropout {
            Dropout::Config
        } else {
            dropout(a)
        },
        rnn,
        config: train_config(a),
        resume: a.resume,
        force: a.force,
    })
}

/// Runs the training an `Args` describes; `slm tune` calls it once per trial.
pub(crate) fn train(mut a: Args) -> Result<(trainer::Summary, PathBuf)> {
    if let Some(m) = a.model.as_mut() {
        super::resolve_model(m)?;
    }
    let job = job(&a)?;
    let bar = progress(0);
    let summary =
        job::run(&job, &bar).with_context(|| format!("training into {}", job.output.display()));
    bar.bar.finish_and_clear();
    Ok((summary?, a.output))
}
