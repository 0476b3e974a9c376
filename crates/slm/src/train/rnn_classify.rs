//! A recurrent text classifier trained from random init (`slm finetune --task classify --arch
//! bilstm|lstm|gru`), optionally from a recurrent language model's embedding, on the same
//! trainer, data reader and batches as the BERT classifiers.
//!
//! Its vocabulary is a word tokenizer: given (`--tokenizer`), the language model's, or trained
//! on the training texts with the preprocessing asked for (lowercasing, accents, punctuation,
//! stop words), which the tokenizer then carries to inference.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::bert::Batch;
use super::causal::{copy_files, write_folder, TOKENIZER_FILES};
use super::classify::{evaluate_classes, load_data, make_batch};
use super::job::Job;
use super::ops;
use super::params::{step_seed, Params};
use super::tape::{Dropout, ParamLoader, Tape, TrainW};
use super::trainer::{self, Evaluation, Hooks, Model, Summary};
use super::TrainResult;
use crate::io::write::write_atomic;
use crate::io::{open_weights, ModelFiles};
use crate::models::rnn::{
    classifier_config, tensor_refs, unknown_if_empty, ClassifierConfig, RnnClassifier, Tensors,
};
use crate::models::{config_of, ModelConfig};
use crate::nn::exec::Pool;
use crate::nn::recurrent::Cell;
use crate::nn::Vb;
use crate::tokenize::preprocess::Preprocess;
use crate::tokenize::train::{self as tok_train, Kind, TrainOptions};
use crate::tokenize::Tokenizer;
use crate::Error;

/// The network and its vocabulary, when a classifier is built rather than fine-tuned.
#[derive(Debug, Clone)]
pub struct RnnSpec {
    pub cell: Cell,
    pub bidirectional: bool,
    pub emsize: usize,
    pub nhid: usize,
    pub nlayers: usize,
    pub pooling: Pool,
    pub dropout: f32,
    /// A tokenizer folder to use instead of one trained on the training texts.
    pub tokenizer: Option<PathBuf>,
    /// The trained word tokenizer's limits.
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub preprocess: Preprocess,
}

pub struct RnnClassifierTrain {
    net: RnnClassifier<TrainW>,
    pub cfg: ClassifierConfig,
    pub params: Params,
    pub dropout: Dropout,
    seed: u64,
}

impl RnnClassifierTrain {
    pub fn load(dir: &Path, seed: u64) -> TrainResult<Self> {
        let files = ModelFiles::locate(dir)?;
        let cfg = classifier_config(&files)?.ok_or_else(|| {
            Error::Unsupported(format!("{}: not an RNN text classifier", dir.display()))
        })?;
        let vb = Vb::new(open_weights(&files)?, false);
        let mut l = ParamLoader::new(vb, None, seed);
        let net = RnnClassifier::new(&cfg, &mut l)?;
        Ok(Self {
            net,
            cfg,
            params: l.params,
            dropout: Dropout::Config,
            seed,
        })
    }

    fn run(&self, batch: &Batch, seed: Option<u64>) -> crate::Result<(Tape<'_>, usize)> {
        let mut tape = Tape::new(&self.params, batch.size(), batch.t, &batch.lengths, seed)
            .with_dropout(self.dropout);
        let y = self.net.forward(&mut tape, &batch.ids)?;
        Ok((tape, y))
    }

    pub fn logits(&self, batch: &Batch) -> crate::Result<Vec<f32>> {
        let (tape, y) = self.run(batch, None)?;
        Ok(tape.value(y).to_vec())
    }

    pub fn forward_backward(&mut self, batch: &Batch, accum: usize) -> crate::Result<f64> {
        let (tape, y) = self.run(batch, Some(step_seed(self.seed, &batch.ids)))?;
        let mut record = tape.finish();
        let targets: Vec<Option<u32>> = batch.labels.iter().map(|&l| Some(l)).collect();
        let denom = (targets.len().max(1) * accum) as f32;
        let (loss, dlogits) =
            ops::cross_entropy_owned(record.take_value(y), &targets, self.cfg.labels.len(), denom);
        record.backward(y, dlogits, &mut self.params);
        Ok(loss * accum as f64)
    }
}

pub struct RnnClassifierRun {
    pub model: RnnClassifierTrain,
    /// The folder holding the tokenizer files.
    pub source: PathBuf,
}

impl Model for RnnClassifierRun {
    type Batch = Batch;

    fn params(&self) -> &Params {
        &self.model.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.model.params
    }

    fn forward_backward(&mut self, batch: &Batch, accum: usize) -> TrainResult<f64> {
        self.model.forward_backward(batch, accum)
    }

    fn evaluate(&self, batches: &[Batch], done: &dyn Fn(usize)) -> TrainResult<Evaluation> {
        let classes = self.model.cfg.labels.len();
        evaluate_classes(batches, done, |b| {
            let targets = b.labels.iter().map(|&l| Some(l)).collect();
            Ok((self.model.logits(b)?, targets, classes))
        })
    }

    fn tokens(batch: &Batch) -> usize {
        batch.lengths.iter().sum()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        let tensors: Vec<(String, Vec<usize>, &[f32])> = self
            .model
            .params
            .list
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone(), p.value.as_slice()))
            .collect();
        write_folder(dir, &tensors, &self.model.cfg.to_json(), &self.source)
    }
}

/// A word tokenizer trained on the training texts (one per line), with `<pad>` and `<unk>`.
fn train_tokenizer(job: &Job, spec: &RnnSpec, dir: &Path) -> TrainResult<()> {
    let rows = crate::data::read_records(&job.train, &job.columns, job.skip_empty)?;
    let corpus = dir.join("tokenizer-corpus.txt");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut text = String::new();
    for r in &rows {
        text.push_str(&r.text.replace('\n', " "));
        text.push('\n');
    }
    write_atomic(&corpus, |w| w.write_all(text.as_bytes()))?;
    let o = TrainOptions {
        kind: Kind::Word,
        vocab_size: spec.vocab_size,
        min_frequency: spec.min_frequency,
        special_tokens: vec!["<pad>".into(), "<unk>".into()],
        preprocess: spec.preprocess.clone(),
    };
    let tok = tok_train::train(std::slice::from_ref(&corpus), &o);
    let _ = std::fs::remove_file(&corpus);
    tok_train::save(&tok?, &o, dir)
}

/// A recurrent language model's embedding table, to start the classifier from.
fn lm_embedding(model: &Path, ntoken: usize, emsize: usize) -> TrainResult<Vec<f32>> {
    let files = ModelFiles::locate(model)?;
    let ModelConfig::Rnn(c) = config_of(&files)? else {
        return Err(Error::Unsupported(format!(
            "-m {}: an RNN classifier starts from a recurrent language model's embedding (or from scratch without -m)",
            model.display()
        )));
    };
    if c.ntoken != ntoken || c.ninp != emsize {
        return Err(Error::Unsupported(format!(
            "-m {}: its embedding is {}×{}, the classifier's {ntoken}×{emsize} (use its tokenizer and --emsize {})",
            model.display(),
            c.ntoken,
            c.ninp,
            c.ninp
        )));
    }
    let t = open_weights(&files)?
        .load("encoder.weight", false)?
        .into_dense()?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Builds `out/init/` (tokenizer, config, initial weights) and trains the classifier from it.
pub fn run(job: &Job, spec: &RnnSpec, hooks: &dyn Hooks) -> TrainResult<Summary> {
    if job.lora.is_some() {
        return Err(Error::Unsupported(
            "LoRA covers transformer layers; an RNN classifier is trained fully".into(),
        ));
    }
    let init = job.output.join("init");
    let from_lm = !job.model.as_os_str().is_empty();
    if !(job.resume && init.join("model.safetensors").is_file()) {
        std::fs::create_dir_all(&init).map_err(|e| Error::io(&init, e))?;
        match (&spec.tokenizer, from_lm) {
            (Some(t), _) => copy_files(t, &init, TOKENIZER_FILES)?,
            (None, true) => copy_files(&job.model, &init, TOKENIZER_FILES)?,
            (None, false) => train_tokenizer(job, spec, &init)?,
        }
    }
    let tok = Tokenizer::from_hf_folder(&init)?;
    let max_length = job.max_length.unwrap_or(256);
    let mut data = load_data(&tok, &job.data_options(max_length))?;
    for e in data.train.iter_mut().chain(data.valid.iter_mut()) {
        if unknown_if_empty(&mut e.input.ids, &tok) {
            e.input.type_ids.push(0);
        }
    }
    let cfg = ClassifierConfig {
        rnn_type: spec.cell,
        ntoken: tok.vocab_size(),
        ninp: spec.emsize,
        nhid: spec.nhid,
        nlayers: spec.nlayers,
        bidirectional: spec.bidirectional,
        pooling: spec.pooling,
        dropout: spec.dropout,
        labels: data.labels.clone(),
    };
    if !(job.resume && init.join("model.safetensors").is_file()) {
        let mut tensors: Tensors = cfg.init_tensors(job.config.seed);
        if from_lm {
            tensors[0].2 = lm_embedding(&job.model, cfg.ntoken, cfg.ninp)?;
        }
        write_folder(&init, &tensor_refs(&tensors), &cfg.to_json(), &init)?;
    }
    let mut model = RnnClassifierTrain::load(&init, job.config.seed)?;
    model.dropout = job.dropout;
    let empty = data.train.iter().filter(|e| e.input.full_len == 0).count();
    hooks.message(&format!(
        "{}: {} parameters; vocabulary {} words (preprocessing: {}); {} train / {} valid texts{}",
        cfg.describe(),
        model.params.n_total(),
        cfg.ntoken,
        spec.preprocess.describe(),
        data.train.len(),
        data.valid.len(),
        if empty > 0 {
            format!(", {empty} left empty by the preprocessing")
        } else {
            String::new()
        }
    ));
    let pad = tok.pad_id();
    let train_set = &data.train;
    let make =
        |idx: &[usize]| make_batch(&idx.iter().map(|&i| &train_set[i]).collect::<Vec<_>>(), pad);
    let valid: Vec<Batch> = data
        .valid
        .chunks(64)
        .map(|c| make_batch(&c.iter().collect::<Vec<_>>(), pad))
        .collect();
    let mut run = RnnClassifierRun {
        model,
        source: init,
    };
    trainer::train(
        &mut run,
        train_set.len(),
        &make,
        &valid,
        &job.config,
        &job.output,
        job.resume,
        hooks,
    )
}
