//! A language model from random init (`slm pretrain`), on the same trainer as fine-tuning:
//! - a recurrent LM trained as PyTorch's `word_language_model` trains it (streams, truncated
//!   BPTT, SGD with clipping and the learning rate cut on a plateau, or AdamW);
//! - a GPT-2 or Llama transformer initialised as transformers initialises one, trained on
//!   blocks of the text in random order;
//! - a T5 encoder-decoder, initialised the same way, trained on JSONL pairs
//!   (`{"input", "target"}`) by teacher forcing.
//!
//! The new model is written to `out/init/` first (its config, tokenizer and initial weights),
//! then trained from there like any checkpoint; the trained model lands in `out/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::causal::{
    causal_eval_batches, copy_files, make_causal_batch, pack_text, write_folder, CausalExample,
    CausalRun, TOKENIZER_FILES,
};
use super::job::prepare_output;
use super::lm::CausalLm;
use super::stream::{StreamRun, Streams};
use super::tape::Dropout;
use super::trainer::{self, Hooks, Summary, TrainConfig};
use super::TrainResult;
use crate::io::write::write_atomic;
use crate::models::{rnn, ModelConfig};
use crate::nn::recurrent::Cell;
use crate::tokenize::Tokenizer;
use crate::Error;

/// What `slm pretrain` builds.
#[derive(Debug, Clone)]
pub struct Pretrain {
    pub arch: Arch,
    /// Start from this checkpoint's weights (a `word_language_model` state_dict or an slm
    /// model) instead of a new initialisation; its tensors give the sizes, the arch only the
    /// dropout. Recurrent models only: a transformer checkpoint is fine-tuned.
    pub init: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub train: Vec<PathBuf>,
    pub valid: Vec<PathBuf>,
    pub output: PathBuf,
    /// Positions per chunk (recurrent: how far back gradients flow) or per block
    /// (transformer: default, its context).
    pub seq_len: Option<usize>,
    /// Streams read side by side (recurrent) or blocks per step (transformer).
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Epochs, optimizer, seed, evaluation and checkpoints; evaluation defaults to each
    /// epoch's end. A recurrent run's batch size is one chunk, its order sequential.
    pub config: TrainConfig,
    pub resume: bool,
    pub force: bool,
}

#[derive(Debug, Clone)]
pub enum Arch {
    /// `word_language_model`'s `RNNModel`; `ntoken` is taken from the tokenizer.
    Rnn(RnnSizes),
    /// A transformer: `config` holds config.json keys over the family's defaults
    /// ([`Family::defaults`]); the vocabulary and special tokens come from the tokenizer.
    Transformer {
        family: Family,
        config: serde_json::Map<String, serde_json::Value>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
    T5,
}

impl Family {
    /// A small model (~10M parameters with a few thousand tokens) in transformers' own key
    /// names, which the caller's keys replace.
    pub fn defaults(self) -> serde_json::Value {
        match self {
            Family::Gpt2 => serde_json::json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 256, "n_inner": null,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                "embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.1,
                "initializer_range": 0.02, "tie_word_embeddings": true, "torch_dtype": "float32",
            }),
            Family::Llama => serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
                "num_attention_heads": 6, "num_key_value_heads": 6,
                "max_position_embeddings": 256, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "attention_bias": false, "mlp_bias": false,
                "attention_dropout": 0.0, "initializer_range": 0.02,
                "tie_word_embeddings": true, "torch_dtype": "float32",
            }),
            Family::T5 => serde_json::json!({
                "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
                "d_model": 256, "d_ff": 1024, "num_layers": 4, "num_heads": 8,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
                "feed_forward_proj": "relu", "tie_word_embeddings": true,
                "is_encoder_decoder": true, "use_cache": true, "torch_dtype": "float32",
            }),
        }
    }

    /// The config.json of the new model: `keys` over the defaults, the tokenizer's
    /// vocabulary size and special-token ids over both.
    fn config(
        self,
        keys: &serde_json::Map<String, serde_json::Value>,
        tok: &Tokenizer,
    ) -> serde_json::Value {
        let mut cfg = self.defaults();
        let obj = cfg.as_object_mut().expect("defaults are an object");
        for (k, v) in keys {
            obj.insert(k.clone(), v.clone());
        }
        obj.insert("vocab_size".into(), tok.vocab_size().into());
        let eos = tok.eos.first().copied();
        if self == Family::T5 {
            // Each head's width follows the model's unless stated; the decoder starts from
            // the padding id, as T5's does.
            if !keys.contains_key("d_kv") {
                let n = |k: &str| obj.get(k).and_then(|v| v.as_u64()).unwrap_or(1).max(1);
                let d_kv = (n("d_model") / n("num_heads")).max(1);
                obj.insert("d_kv".into(), d_kv.into());
            }
            let pad = tok.pad_id();
            obj.insert("pad_token_id".into(), pad.into());
            obj.insert("decoder_start_token_id".into(), pad.into());
            obj.insert(
                "eos_token_id".into(),
                eos.map_or(serde_json::Value::Null, Into::into),
            );
            return cfg;
        }
        for (k, id) in [("bos_token_id", tok.bos.or(eos)), ("eos_token_id", eos)] {
            obj.insert(k.into(), id.map_or(serde_json::Value::Null, Into::into));
        }
        cfg
    }
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
    write_folder(dir, &rnn::tensor_refs(&tensors), &cfg.to_json(), tok_dir)
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
    if p.seq_len == Some(0) || p.batch_size == 0 || p.eval_batch_size == 0 {
        return Err(Error::Unsupported(
            "the sequence length, --batch-size and --eval-batch-size must be at least 1".into(),
        ));
    }
    if p.train.is_empty() {
        return Err(Error::Data("give at least one --train file".into()));
    }
    match &p.arch {
        Arch::Rnn(s) => run_rnn(p, *s, hooks),
        Arch::Transformer { family, config } => run_transformer(p, *family, config, hooks),
    }
}

/// Every file's text cut into blocks of `len` tokens (documents joined by EOS).
fn blocks(tok: &Tokenizer, files: &[PathBuf], len: usize) -> TrainResult<Vec<CausalExample>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        let b = pack_text(tok, &text, len)?;
        if b.is_empty() {
            return Err(Error::Data(format!(
                "{}: no text to train on (fewer than 2 tokens)",
                f.display()
            )));
        }
        out.extend(b);
    }
    Ok(out)
}

/// `out/init/` with the new model's config.json and the tokenizer's files (kept when
/// resuming): the folder, the config as read back, and whether the weights are still to be
/// drawn.
fn new_config(
    p: &Pretrain,
    family: Family,
    keys: &serde_json::Map<String, serde_json::Value>,
    tok: &Tokenizer,
) -> TrainResult<(PathBuf, ModelConfig, bool)> {
    let init = p.output.join("init");
    let config_file = init.join("config.json");
    let fresh = !(p.resume && init.join("model.safetensors").is_file());
    if fresh {
        std::fs::create_dir_all(&init).map_err(|e| Error::io(&init, e))?;
        let json = serde_json::to_vec_pretty(&family.config(keys, tok))
            .map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(&config_file, |w| w.write_all(&json))?;
        copy_files(&p.tokenizer, &init, TOKENIZER_FILES)?;
    }
    // Read back as any checkpoint's config is: its sizes are checked.
    let cfg = ModelConfig::from_hf_json(&config_file)?;
    Ok((init, cfg, fresh))
}

/// A new encoder-decoder trained on pairs: sources and targets of up to `seq_len` tokens.
fn run_seq2seq(
    p: &Pretrain,
    tok: &Tokenizer,
    init: PathBuf,
    cfg: &ModelConfig,
    fresh: bool,
    hooks: &dyn Hooks,
) -> TrainResult<Summary> {
    use super::seq2seq::{read_pairs, seq2seq_batches, Seq2SeqBatch, Seq2SeqRun, Seq2SeqTrain};
    if fresh {
        let run = Seq2SeqRun {
            model: Seq2SeqTrain::init(cfg, p.config.seed)?,
            source: init.clone(),
        };
        trainer::Model::save(&run, &init)?;
    }
    let len = p.seq_len.unwrap_or(256);
    let pairs = |files: &[PathBuf]| -> TrainResult<_> {
        let mut out = Vec::new();
        for f in files {
            out.extend(read_pairs(tok, f, len, len)?.0);
        }
        Ok(out)
    };
    let (train, valid) = (pairs(&p.train)?, pairs(&p.valid)?);
    let mut model = Seq2SeqTrain::load(&init, None, p.config.seed)?;
    model.dropout = Dropout::Config;
    let counts = (train.len(), valid.len(), len);
    let (start, pad) = (model.start, model.pad);
    let make = |idx: &[usize]| {
        Seq2SeqBatch::new(
            &idx.iter().map(|&i| &train[i]).collect::<Vec<_>>(),
            start,
            pad,
        )
    };
    let valid = seq2seq_batches(&valid, p.eval_batch_size, start, pad);
    let mut run = Seq2SeqRun {
        model,
        source: init,
    };
    fit_examples(p, cfg, &mut run, counts, "pairs", &make, &valid, hooks)
}

/// A transformer run's loop: its examples shuffled, `--batch-size` per step, an evaluation
/// at each epoch's end unless told otherwise; `counts` (train, valid, tokens per example) and
/// `unit` make the line announcing it.
#[allow(clippy::too_many_arguments)]
fn fit_examples<M: trainer::Model>(
    p: &Pretrain,
    cfg: &ModelConfig,
    run: &mut M,
    (n_train, n_valid, len): (usize, usize, usize),
    unit: &str,
    make: &dyn Fn(&[usize]) -> M::Batch,
    valid: &[M::Batch],
    hooks: &dyn Hooks,
) -> TrainResult<Summary> {
    let steps = n_train.div_ceil(p.batch_size);
    hooks.message(&format!(
        "{}: {} parameters; {n_train} {unit} of up to {len} tokens ({steps} steps per epoch); {n_valid} validation {unit}",
        cfg.architecture().name(),
        run.params().n_total(),
    ));
    let config = TrainConfig {
        batch_size: p.batch_size,
        shuffle: true,
        eval_every: p.config.eval_every.or(Some(steps)),
        ..p.config.clone()
    };
    trainer::train(
        run, n_train, make, valid, &config, &p.output, p.resume, hooks,
    )
}

fn run_transformer(
    p: &Pretrain,
    family: Family,
    keys: &serde_json::Map<String, serde_json::Value>,
    hooks: &dyn Hooks,
) -> TrainResult<Summary> {
    if let Some(init) = &p.init {
        return Err(Error::Unsupported(format!(
            "--init {}: a transformer checkpoint goes on training with `slm finetune --task causal-lm`",
            init.display()
        )));
    }
    prepare_output(None, &p.output, p.resume, p.force, hooks)?;
    let tok = Tokenizer::from_hf_folder(&p.tokenizer)?;
    let (init, cfg, fresh) = new_config(p, family, keys, &tok)?;
    if family == Family::T5 {
        return run_seq2seq(p, &tok, init, &cfg, fresh, hooks);
    }
    if fresh {
        let model = CausalLm::init(&cfg, p.config.seed)?;
        trainer::Model::save(
            &CausalRun {
                model,
                source: init.clone(),
            },
            &init,
        )?;
    }
    let context = cfg.context_length();
    let len = p.seq_len.unwrap_or(context);
    if len > context {
        return Err(Error::Unsupported(format!(
            "blocks of {len} tokens exceed the model's context of {context}"
        )));
    }
    let train = blocks(&tok, &p.train, len)?;
    let valid = blocks(&tok, &p.valid, len)?;
    let mut model = CausalLm::load(&init, None, p.config.seed)?;
    model.dropout = Dropout::Config;
    let counts = (train.len(), valid.len(), len);
    let pad = tok.pad_id();
    let make =
        |idx: &[usize]| make_causal_batch(&idx.iter().map(|&i| &train[i]).collect::<Vec<_>>(), pad);
    let valid = causal_eval_batches(&valid, p.eval_batch_size, pad);
    let mut run = CausalRun {
        model,
        source: init,
    };
    fit_examples(p, &cfg, &mut run, counts, "blocks", &make, &valid, hooks)
}

fn run_rnn(p: &Pretrain, s: RnnSizes, hooks: &dyn Hooks) -> TrainResult<Summary> {
    let bptt = p.seq_len.unwrap_or(35);
    if s.tied && s.emsize != s.nhid {
        return Err(Error::Unsupported(format!(
            "tied weights need --emsize equal to --nhid (got {} and {})",
            s.emsize, s.nhid
        )));
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
        .batches(bptt)
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
    let n = train.chunks(bptt);
    hooks.message(&format!(
        "{}: {} parameters; {} streams × {} chunks of {} tokens per epoch; {} validation chunks",
        cfg.describe(),
        model.params.n_total(),
        p.batch_size,
        n,
        bptt,
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
    let make = |idx: &[usize]| train.chunk(idx[0], bptt);
    trainer::train(
        &mut run, n, &make, &valid, &config, &p.output, p.resume, hooks,
    )
}
