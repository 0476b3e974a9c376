//! One fine-tuning run from start to end, whatever the task: the output folder checked, the
//! model, tokenizer and data loaded, the model configured, then the loop. A front end (the
//! CLI, `slm tune`) describes the run as a [`Job`] and shows what the [`Hooks`] report; every
//! decision about models, data and files is made here.

use std::path::{Path, PathBuf};

use super::bert::{BertTrain, Method};
use super::causal::{
    causal_eval_batches, load_causal_data, make_causal_batch, CausalDataOptions, CausalRun,
};
use super::classify::{load_data, make_batch, ClassifierRun, DataOptions};
use super::lm::{trainable_source, CausalLm};
use super::masked::{load_masked_data, MaskedRun, Masker};
use super::params::Params;
use super::seq2seq::{
    load_seq2seq_data, seq2seq_batches, Seq2SeqBatch, Seq2SeqDataOptions, Seq2SeqRun, Seq2SeqTrain,
};
use super::tape::{Dropout, LoraSpec};
use super::token::{load_token_data, make_token_batch};
use super::trainer::{self, Hooks, Summary, TrainConfig};
use super::TrainResult;
use crate::io::ModelFiles;
use crate::models::ModelConfig;
use crate::tokenize::Tokenizer;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification (BERT family).
    Classify,
    /// Next-token prediction (causal families).
    CausalLm,
    /// Masked-token prediction (BERT family).
    MaskedLm,
    /// A tag per word (BERT family).
    TokenClassify,
    /// A target sequence from a source sequence (encoder-decoders).
    Seq2Seq,
}

impl Task {
    /// The name `--task` takes.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::CausalLm => "causal-lm",
            Task::MaskedLm => "masked-lm",
            Task::TokenClassify => "token-classify",
            Task::Seq2Seq => "seq2seq",
        }
    }
}

/// Low-rank adapters instead of full fine-tuning.
#[derive(Debug, Clone)]
pub struct Lora {
    pub r: usize,
    pub alpha: f32,
    /// PEFT's `lora_dropout`, on the adapters' input while training.
    pub dropout: f32,
    /// Module names; empty for PEFT's defaults of the model's family.
    pub targets: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub task: Task,
    /// A Hugging Face folder, or a GGUF file for the causal task.
    pub model: PathBuf,
    /// Where the model, `checkpoint/`, `metrics.jsonl` and `loss.svg` go.
    pub output: PathBuf,
    pub train: PathBuf,
    pub valid: Option<PathBuf>,
    /// Fraction of `train` held out when there is no `valid`.
    pub valid_split: f32,
    /// Classification: the text and label fields (`None`: the usual names).
    pub columns: crate::data::Columns,
    /// Classification: drop rows with empty text instead of refusing them.
    pub skip_empty: bool,
    /// Tokens per example (default: 256 for causal LM, 128 for encoders, or fewer positions);
    /// for seq2seq, per source.
    pub max_length: Option<usize>,
    /// Seq2seq: tokens per target (default: 128).
    pub max_target_length: Option<usize>,
    pub lora: Option<Lora>,
    /// Classification: build a recurrent classifier (from scratch, or from the recurrent
    /// language model `model` names) instead of fine-tuning an encoder.
    pub rnn: Option<super::rnn_classify::RnnSpec>,
    pub dropout: Dropout,
    pub config: TrainConfig,
    /// Continue the run in `output` from its last checkpoint.
    pub resume: bool,
    /// Replace a run or model already in `output`.
    pub force: bool,
}

impl Job {
    /// Where a classification run's rows come from and how they are cut.
    pub(crate) fn data_options(&self, max_len: usize) -> DataOptions<'_> {
        DataOptions {
            train: &self.train,
            valid: self.valid.as_deref(),
            valid_split: self.valid_split,
            seed: self.config.seed,
            max_len,
            columns: self.columns.clone(),
            skip_empty: self.skip_empty,
        }
    }
}

/// Runs `job` to the end, reporting through `hooks`.
pub fn run(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    if let Some(l) = &job.lora {
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(Error::Unsupported(format!(
                "--lora-dropout must be in [0, 1), got {}",
                l.dropout
            )));
        }
    }
    if job.rnn.is_some() && job.task != Task::Classify {
        return Err(Error::Unsupported(format!(
            "--arch builds a recurrent classifier (--task classify), not --task {}",
            job.task.name()
        )));
    }
    prepare_output(Some(&job.model), &job.output, job.resume, job.force, hooks)?;
    match job.task {
        Task::CausalLm => run_causal(job, hooks),
        Task::Classify => match &job.rnn {
            Some(spec) => super::rnn_classify::run(job, spec, hooks),
            None => run_classify(job, hooks),
        },
        Task::MaskedLm => run_masked(job, hooks),
        Task::TokenClassify => run_token(job, hooks),
        Task::Seq2Seq => run_seq2seq(job, hooks),
    }
}

/// Refuses to mix a new run into an old one's folder or to replace a model already there, or
/// clears the old run when forced; never writes into the model it reads.
pub(crate) fn prepare_output(
    model: Option<&Path>,
    out: &Path,
    resume: bool,
    force: bool,
    hooks: &dyn Hooks,
) -> TrainResult<()> {
    let same = |x: &Path, y: &Path| matches!((x.canonicalize(), y.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if model.is_some_and(|m| m.is_dir() && same(out, m)) {
        return Err(Error::Exists(format!(
            "-o {} is the model folder itself; write the fine-tuned model to another folder",
            out.display()
        )));
    }
    let has_run = out.join("checkpoint").exists() || out.join("metrics.jsonl").exists();
    if has_run && !resume && !force {
        return Err(Error::Exists(format!(
            "{} already holds a run; pass --resume to continue it or --force to start over",
            out.display()
        )));
    }
    let model_file = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "adapter_model.safetensors",
    ]
    .into_iter()
    .find(|f| out.join(f).exists());
    if let Some(f) = model_file.filter(|_| !resume && !force) {
        return Err(Error::Exists(format!(
            "{} already holds a model ({f}); pass --force to replace it or choose another -o",
            out.display()
        )));
    }
    for (p, bytes) in crate::io::write::clean_stale_temps(out) {
        hooks.message(&format!(
            "removed {} ({:.1} MB), left by a run that was killed",
            p.display(),
            bytes as f64 / 1e6
        ));
    }
    if force && !resume {
        for f in ["checkpoint", "checkpoint.old", "best", "init"] {
            let _ = std::fs::remove_dir_all(out.join(f));
        }
        let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    }
    Ok(())
}

/// The loop itself, once a task has its model and batches.
fn fit<M: trainer::Model>(
    job: &Job,
    run: &mut M,
    n_train: usize,
    make: &dyn Fn(&[usize]) -> M::Batch,
    valid: &[M::Batch],
    hooks: &dyn Hooks,
) -> TrainResult<Summary> {
    trainer::train(
        run,
        n_train,
        make,
        valid,
        &job.config,
        &job.output,
        job.resume,
        hooks,
    )
}

/// The line before training: the data, what is trained, what was cut.
fn announce(
    hooks: &dyn Hooks,
    data: &str,
    params: &Params,
    truncated: usize,
    unit: &str,
    max: usize,
) {
    let cut = if truncated > 0 {
        format!("; {truncated} {unit} truncated to {max} tokens")
    } else {
        String::new()
    };
    hooks.message(&format!(
        "{data}; {} of {} parameters trained{cut}",
        params.n_trainable(),
        params.n_total()
    ));
}

/// The modules LoRA targets: those named, else PEFT's defaults for the model's family.
fn lora_targets(l: &Lora, cfg: &ModelConfig) -> Vec<String> {
    if l.targets.is_empty() {
        cfg.architecture().lora_targets()
    } else {
        l.targets.clone()
    }
}

fn run_causal(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let source = trainable_source(&job.model, &job.output, |base| {
        hooks.message(&format!(
            "converting {} to f32 safetensors in {}",
            job.model.display(),
            base.display()
        ))
    })?;
    let files = ModelFiles::locate(&source)?;
    let cfg = crate::models::config_of(&files)?;
    if cfg.architecture().is_seq2seq() {
        return Err(Error::Unsupported(format!(
            "{}: '{}' is an encoder-decoder; train it with --task seq2seq",
            job.model.display(),
            cfg.architecture().name()
        )));
    }
    let tok = Tokenizer::load(&files)?;
    let positions = cfg.context_length();
    let max_length = job.max_length.unwrap_or(256.min(positions));
    if max_length > positions {
        return Err(Error::Unsupported(format!(
            "--max-length {max_length} exceeds the model's context of {positions} tokens"
        )));
    }
    let data = load_causal_data(
        &tok,
        &CausalDataOptions {
            train: &job.train,
            valid: job.valid.as_deref(),
            valid_split: job.valid_split,
            seed: job.config.seed,
            max_len: max_length,
        },
    )?;
    let lora = job.lora.as_ref().map(|l| LoraSpec {
        r: l.r,
        alpha: l.alpha,
        targets: lora_targets(l, &cfg),
        dropout: l.dropout,
    });
    let mut model = CausalLm::load(&source, lora, job.config.seed)?;
    model.dropout = job.dropout;
    announce(
        hooks,
        &format!(
            "{} train / {} valid examples ({}, up to {max_length} tokens)",
            data.train.len(),
            data.valid.len(),
            data.format
        ),
        &model.params,
        data.truncated,
        "examples",
        max_length,
    );
    let pad = tok.pad_id();
    let train_set = &data.train;
    let make = |idx: &[usize]| {
        make_causal_batch(&idx.iter().map(|&i| &train_set[i]).collect::<Vec<_>>(), pad)
    };
    let valid = causal_eval_batches(&data.valid, job.config.batch_size, pad);
    let mut run = CausalRun { model, source };
    fit(job, &mut run, train_set.len(), &make, &valid, hooks)
}

/// What every encoder task starts with: the model's files and tokenizer, the maximum length
/// its positions allow, and the full or LoRA method on its flavor's modules.
fn encoder_setup(job: &Job) -> TrainResult<(ModelFiles, Tokenizer, usize, Method)> {
    let files = ModelFiles::locate(&job.model)?;
    let tok = Tokenizer::load(&files)?;
    let cfg = crate::models::config_of(&files)?;
    let positions = match &cfg {
        ModelConfig::Bert(c) => c.max_tokens(),
        other => {
            return Err(Error::Unsupported(format!(
                "{}: '{}' is a causal language model; --task {} fine-tunes BERT-family encoders, use --task causal-lm for this one",
                job.model.display(),
                other.architecture().name(),
                job.task.name()
            )))
        }
    };
    let max_length = job.max_length.unwrap_or(128.min(positions));
    if max_length > positions {
        return Err(Error::Unsupported(format!(
            "--max-length {max_length} exceeds the model's {positions} positions"
        )));
    }
    let method = Method {
        lora: job.lora.as_ref().map(|l| (l.r, l.alpha)),
        targets: job
            .lora
            .as_ref()
            .map(|l| lora_targets(l, &cfg))
            .unwrap_or_else(|| cfg.architecture().lora_targets()),
        seed: job.config.seed,
    };
    Ok((files, tok, max_length, method))
}

/// The options every encoder run applies to its model: LoRA dropout and the model's own.
fn configure(model: &mut BertTrain, job: &Job) {
    model.set_lora_dropout(job.lora.as_ref().map_or(0.0, |l| l.dropout));
    model.dropout = job.dropout;
}

/// What a labelled task hands to [`fit_labelled`]: its examples, how it names them, and how
/// it pads them into a batch.
struct Labelled<'a, E> {
    train: &'a [E],
    valid: &'a [E],
    truncated: usize,
    max_length: usize,
    /// What the examples and the labels are called: ("examples", "labels", "texts").
    nouns: (&'static str, &'static str, &'static str),
    batch: fn(&[&E], u32) -> super::bert::Batch,
}

/// The second half of every labelled run (sequence or token classification): the summary
/// line, the batches and the loop.
fn fit_labelled<E>(
    job: &Job,
    hooks: &dyn Hooks,
    model: BertTrain,
    source: PathBuf,
    pad: u32,
    set: Labelled<E>,
) -> TrainResult<Summary> {
    let (examples, labels, unit) = set.nouns;
    announce(
        hooks,
        &format!(
            "{} train / {} valid {examples}, {labels}: {}",
            set.train.len(),
            set.valid.len(),
            model.labels.join(", ")
        ),
        &model.params,
        set.truncated,
        unit,
        set.max_length,
    );
    let make =
        |idx: &[usize]| (set.batch)(&idx.iter().map(|&i| &set.train[i]).collect::<Vec<_>>(), pad);
    let valid: Vec<_> = set
        .valid
        .chunks(64)
        .map(|c| (set.batch)(&c.iter().collect::<Vec<_>>(), pad))
        .collect();
    let mut run = ClassifierRun { model, source };
    fit(job, &mut run, set.train.len(), &make, &valid, hooks)
}

fn run_classify(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let (files, tok, max_length, method) = encoder_setup(job)?;
    let data = load_data(&tok, &job.data_options(max_length))?;
    let mut model = BertTrain::load(&job.model, data.labels.clone(), &method)?;
    configure(&mut model, job);
    let set = Labelled {
        train: &data.train,
        valid: &data.valid,
        truncated: data.truncated,
        max_length,
        nouns: ("examples", "labels", "texts"),
        batch: make_batch,
    };
    fit_labelled(job, hooks, model, files.root.clone(), tok.pad_id(), set)
}

fn run_token(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let (files, tok, max_length, method) = encoder_setup(job)?;
    let data = load_token_data(
        &tok,
        &job.train,
        job.valid.as_deref(),
        job.valid_split,
        job.config.seed,
        max_length,
    )?;
    let mut model = BertTrain::load_token_classifier(&job.model, data.labels.clone(), &method)?;
    configure(&mut model, job);
    let set = Labelled {
        train: &data.train,
        valid: &data.valid,
        truncated: data.truncated,
        max_length,
        nouns: ("sentences", "tags", "sentences"),
        batch: make_token_batch,
    };
    fit_labelled(job, hooks, model, files.root.clone(), tok.pad_id(), set)
}

fn run_masked(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let (files, tok, max_length, method) = encoder_setup(job)?;
    let data = load_masked_data(
        &tok,
        &job.train,
        job.valid.as_deref(),
        job.valid_split,
        job.config.seed,
        max_length,
    )?;
    // LoRA trains the factors and the masked-LM head; the output is the merged model.
    let mut model = BertTrain::load_masked_lm(&job.model, &method)?;
    configure(&mut model, job);
    announce(
        hooks,
        &format!(
            "{} train / {} valid texts",
            data.train.len(),
            data.valid.len()
        ),
        &model.params,
        data.truncated,
        "texts",
        max_length,
    );
    let masker = Masker::new(&tok, job.config.seed)?;
    let train_set = &data.train;
    let make =
        |idx: &[usize]| masker.batch(&idx.iter().map(|&i| &train_set[i]).collect::<Vec<_>>(), idx);
    // Validation masks are fixed: the same positions at every evaluation.
    let valid: Vec<_> = data
        .valid
        .chunks(64)
        .enumerate()
        .map(|(k, c)| masker.batch(&c.iter().collect::<Vec<_>>(), &[usize::MAX - k]))
        .collect();
    let mut run = MaskedRun {
        model,
        source: files.root.clone(),
    };
    fit(job, &mut run, train_set.len(), &make, &valid, hooks)
}

fn run_seq2seq(job: &Job, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let files = ModelFiles::locate(&job.model)?;
    let cfg = crate::models::config_of(&files)?;
    if !cfg.architecture().is_seq2seq() {
        return Err(Error::Unsupported(format!(
            "{}: '{}' is not an encoder-decoder; --task seq2seq trains t5, bart and marian models (--task causal-lm trains this one)",
            job.model.display(),
            cfg.architecture().name()
        )));
    }
    let tok = Tokenizer::load(&files)?;
    let (max_source, max_target) = (
        job.max_length.unwrap_or(256),
        job.max_target_length.unwrap_or(128),
    );
    let data = load_seq2seq_data(
        &tok,
        &Seq2SeqDataOptions {
            train: &job.train,
            valid: job.valid.as_deref(),
            valid_split: job.valid_split,
            seed: job.config.seed,
            max_source,
            max_target,
        },
    )?;
    let lora = job.lora.as_ref().map(|l| LoraSpec {
        r: l.r,
        alpha: l.alpha,
        targets: lora_targets(l, &cfg),
        dropout: l.dropout,
    });
    let mut model = Seq2SeqTrain::load(&job.model, lora, job.config.seed)?;
    model.dropout = job.dropout;
    announce(
        hooks,
        &format!(
            "{} train / {} valid pairs ({}, up to {max_source} source and {max_target} target tokens)",
            data.train.len(),
            data.valid.len(),
            data.format
        ),
        &model.params,
        data.truncated,
        "pairs",
        max_source.max(max_target),
    );
    let (start, pad) = (model.start, model.pad);
    let train_set = &data.train;
    let make = |idx: &[usize]| {
        Seq2SeqBatch::new(
            &idx.iter().map(|&i| &train_set[i]).collect::<Vec<_>>(),
            start,
            pad,
        )
    };
    let valid = seq2seq_batches(&data.valid, job.config.batch_size, start, pad);
    let mut run = Seq2SeqRun {
        model,
        source: files.root.clone(),
    };
    fit(job, &mut run, train_set.len(), &make, &valid, hooks)
}
