//! A language model from random init (`slm pretrain`): a recurrent LM trained as PyTorch's
//! `word_language_model` trains it (streams, truncated BPTT, SGD with clipping and the learning
//! rate cut on a plateau, or AdamW), on the same trainer as fine-tuning.
//!
//! The new model is written to `out/init/` first (its config, tokenizer and PyTorch-initialised
//! weights), then trained from there like any checkpoint; the trained model lands in `out/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::causal::{copy_files, CausalRun, TOKENIZER_FILES};
use super::job::prepare_output;
use super::lm::CausalLm;
use super::stream::{StreamRun, Streams};
use super::tape::Dropout;
use super::trainer::{self, Hooks, Summary, TrainConfig};
use super::TrainResult;
use crate::io::write::{write_atomic, write_safetensors};
use crate::models::{rnn, ModelConfig};
use crate::nn::recurrent::Cell;
use crate::tokenize::Tokenizer;
use crate::Error;

/// What `slm pretrain` builds.
#[derive(Debug, Clone)]
pub struct Pretrain {
    /// `RNNModel`'s sizes; `ntoken` is taken from the tokenizer.
    pub rnn: RnnSizes,
    /// Start from this checkpoint's weights (a `word_language_model` state_dict or an slm
    /// model) instead of a new initialisation; its tensors give the sizes, `rnn` only the
    /// dropout.
    pub init: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub train: Vec<PathBuf>,
    pub valid: Vec<PathBuf>,
    pub output: PathBuf,
    /// Positions per chunk (truncated BPTT).
    pub bptt: usize,
    /// Streams read side by side in training and in evaluation.
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Epochs, optimizer, seed, evaluation and checkpoints. Its batch size is one chunk, its
    /// order sequential; evaluation defaults to each epoch's end.
    pub config: TrainConfig,
    pub resume: bool,
    pub force: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RnnSizes {
    pub cell: Cell,
    pub emsize: usize,
    pub nhid: usize,
    pub nlayers: usize,
    pub dropout: f32,
    pub tied: bool,
}

/// Every file's tokens, one after another.
fn encode_files(tok: &Tokenizer, files: &[PathBuf]) -> TrainResult<Vec<u32>> {
    let mut ids = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        if text.trim().is_empty() {
            return Err(Error::Data(format!("{}: no text to train on", f.display())));
        }
        ids.extend(tok.encode(&text, false)?);
    }
    Ok(ids)
}

/// The tensors of a checkpoint to start from, with the config they imply.
fn checkpoint_tensors(path: &Path, dropout: f32) -> TrainResult<(rnn::Config, rnn::Tensors)> {
    let files = crate::io::ModelFiles::locate(path)?;
    let ModelConfig::Rnn(cfg) = crate::models::config_of(&files)? else {
        return Err(Error::Unsupported(format!(
            "--init {}: not a recurrent language model",
            path.display()
        )));
    };
    let store = crate::io::open_weights(&files)?;
    let mut out = Vec::new();
    for t in store.tensors() {
        let v = store.load(&t.name, false)?.into_dense()?;
        out.push((t.name, t.shape, v.flatten_all()?.to_vec1::<f32>()?));
    }
    Ok((rnn::Config { dropout, ..cfg }, out))
}

/// `out/init/`: the config, the tokenizer's files and the initial weights.
fn write_init(
    dir: &Path,
    cfg: &rnn::Config,
    tensors: rnn::Tensors,
    tok_dir: &Path,
) -> TrainResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &refs, Some(meta))?;
    let json = serde_json::to_vec_pretty(&cfg.to_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join("config.json"), |w| w.write_all(&json))?;
    copy_files(tok_dir, dir, TOKENIZER_FILES)
}

/// A word-level vocabulary as `word_language_model` reads it: one word per line, in id order.
fn write_vocab_txt(tok: &Tokenizer, dir: &Path) -> TrainResult<()> {
    let words: Option<Vec<String>> = (0..tok.vocab_size() as u32)
        .map(|i| tok.id_to_token(i))
        .collect();
    let Some(words) = words.filter(|w| w.iter().all(|w| !w.contains(char::is_whitespace))) else {
        return Ok(());
    };
    let text: String = words.iter().map(|w| format!("{w}\n")).collect();
    write_atomic(&dir.join("vocab.txt"), |w| w.write_all(text.as_bytes()))
}

pub fn run(p: &Pretrain, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let s = p.rnn;
    if s.tied && s.emsize != s.nhid {
        return Err(Error::Unsupported(format!(
            "tied weights need --emsize equal to --nhid (got {} and {})",
            s.emsize, s.nhid
        )));
    }
    if p.bptt == 0 || p.batch_size == 0 || p.eval_batch_size == 0 {
        return Err(Error::Unsupported(
            "--bptt, --batch-size and --eval-batch-size must be at least 1".into(),
        ));
    }
    if p.train.is_empty() {
        return Err(Error::Data("give at least one --train file".into()));
    }
    prepare_output(None, &p.output, p.resume, p.force, hooks)?;
    let tok = Tokenizer::from_hf_folder(&p.tokenizer)?;
    let (cfg, tensors) = match &p.init {
        Some(path) => {
            let (cfg, tensors) = checkpoint_tensors(path, s.dropout)?;
            if cfg.ntoken != tok.vocab_size() {
                return Err(Error::Unsupported(format!(
                    "--init {} has {} tokens, the tokenizer {}",
                    path.display(),
                    cfg.ntoken,
                    tok.vocab_size()
                )));
            }
            (cfg, tensors)
        }
        None => {
            let cfg = rnn::Config {
                rnn_type: s.cell,
                ntoken: tok.vocab_size(),
                ninp: s.emsize,
                nhid: s.nhid,
                nlayers: s.nlayers,
                dropout: s.dropout,
                tie_weights: s.tied,
                bias: true,
            };
            let tensors = rnn::init_tensors(&cfg, p.config.seed);
            (cfg, tensors)
        }
    };
    let train = Streams::new(
        &encode_files(&tok, &p.train)?,
        p.batch_size,
        "the training text",
    )?;
    let valid = if p.valid.is_empty() {
        Vec::new()
    } else {
        Streams::new(
            &encode_files(&tok, &p.valid)?,
            p.eval_batch_size,
            "the validation text",
        )?
        .batches(p.bptt)
    };
    let init = p.output.join("init");
    if !(p.resume && init.join("model.safetensors").is_file()) {
        write_init(&init, &cfg, tensors, &p.tokenizer)?;
        if !init.join("vocab.txt").exists() {
            write_vocab_txt(&tok, &init)?;
        }
    }
    // The sizes are checked (and the tensors read back) as any checkpoint's.
    let mut model = CausalLm::load(&init, None, p.config.seed)?;
    model.dropout = Dropout::Config;
    let n = train.chunks(p.bptt);
    hooks.message(&format!(
        "{}: {} parameters; {} streams × {} chunks of {} tokens per epoch; {} validation chunks",
        cfg.describe(),
        model.params.n_total(),
        p.batch_size,
        n,
        p.bptt,
        valid.len()
    ));
    let config = TrainConfig {
        batch_size: 1,
        grad_accum: 1,
        shuffle: false,
        eval_every: p.config.eval_every.or(Some(n)),
        ..p.config.clone()
    };
    let mut run = StreamRun::new(CausalRun {
        model,
        source: init,
    });
    let make = |idx: &[usize]| train.chunk(idx[0], p.bptt);
    trainer::train(
        &mut run, n, &make, &valid, &config, &p.output, p.resume, hooks,
    )
}
