//! An encoder in training: BERT, DistilBERT or RoBERTa (`models/bert.rs`, the definition
//! inference runs) on the training executor, with a sequence-classification or masked-LM head.
//! Parameters keep the task model's names (`bert.encoder.layer.0.…`), so what is saved is a
//! `…ForSequenceClassification` / `…ForMaskedLM` checkpoint transformers and slm both load.

use std::path::Path;

use super::ops;
use super::params::{step_seed, Params};
use super::tape::{Dropout, LoraSpec, ParamLoader, Tape, TrainW};
use super::TrainResult;
use crate::io::{open_weights, ModelFiles};
use crate::models::bert::{Bert, Config, Flavor, Task};
use crate::models::{config_of, ModelConfig};
use crate::nn::Vb;

/// A right-padded batch of token ids with their labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub lengths: Vec<usize>,
    pub t: usize,
    /// Classification: one label per sequence.
    pub labels: Vec<u32>,
    /// Masked LM: the original id at each masked position, `None` elsewhere (`[b·t]`).
    pub targets: Vec<Option<u32>>,
}

impl Batch {
    pub fn size(&self) -> usize {
        self.lengths.len()
    }

    /// The inputs right-padded to the longest with `pad` (segment 0), no labels yet.
    pub fn padded(inputs: &[&crate::tokenize::EncoderInput], pad: u32) -> Self {
        let t = inputs.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let mut b = Batch {
            ids: Vec::with_capacity(inputs.len() * t),
            types: Vec::with_capacity(inputs.len() * t),
            lengths: Vec::with_capacity(inputs.len()),
            t,
            labels: Vec::new(),
            targets: Vec::new(),
        };
        for e in inputs {
            let n = e.ids.len();
            b.ids.extend(&e.ids);
            b.ids.extend(std::iter::repeat_n(pad, t - n));
            b.types.extend(&e.type_ids);
            b.types.extend(std::iter::repeat_n(0, t - n));
            b.lengths.push(n);
        }
        b
    }
}

/// How the encoder is trained.
#[derive(Debug, Clone)]
pub struct Method {
    /// LoRA rank and alpha; `None` trains every weight.
    pub lora: Option<(usize, f32)>,
    /// LoRA target modules by name (`query`, `value`, ...).
    pub targets: Vec<String>,
    pub seed: u64,
}

pub struct BertTrain {
    net: Bert<TrainW>,
    pub cfg: Config,
    pub method: Method,
    pub lora_dropout: f32,
    /// The model's own dropout while training (evaluation never drops).
    pub dropout: Dropout,
    pub params: Params,
    pub labels: Vec<String>,
}

impl BertTrain {
    /// A sequence classifier with these labels: the checkpoint's head when it has one of this
    /// size, else a new one (transformers' init).
    pub fn load(path: &Path, labels: Vec<String>, method: &Method) -> TrainResult<Self> {
        Self::load_with(path, Task::SequenceClassification, labels, method)
    }

    /// A token classifier (NER, tagging) with these labels; the head is new unless the
    /// checkpoint's is of this size.
    pub fn load_token_classifier(
        path: &Path,
        labels: Vec<String>,
        method: &Method,
    ) -> TrainResult<Self> {
        Self::load_with(path, Task::TokenClassification, labels, method)
    }

    /// A masked LM: the checkpoint's head, or a new one (N(0, 0.02²) dense, unit LayerNorm,
    /// zero bias) on a bare encoder.
    pub fn load_masked_lm(path: &Path, method: &Method) -> TrainResult<Self> {
        Self::load_with(path, Task::MaskedLm, Vec::new(), method)
    }

    fn load_with(
        path: &Path,
        task: Task,
        labels: Vec<String>,
        method: &Method,
    ) -> TrainResult<Self> {
        let files = ModelFiles::locate(path)?;
        let ModelConfig::Bert(cfg) = config_of(&files)? else {
            return Err(crate::Error::Unsupported(format!(
                "{}: this task fine-tunes BERT-family encoders (bert, distilbert, roberta)",
                path.display()
            )));
        };
        let vb = Vb::new(open_weights(&files)?, false);
        let lora = method.lora.map(|(r, alpha)| LoraSpec {
            r,
            alpha,
            targets: method.targets.clone(),
            dropout: 0.0,
        });
        let mut l = ParamLoader::new(vb, lora, method.seed);
        let net = Bert::new(&cfg, &mut l, task, labels.clone())?;
        if method.lora.is_some() && !l.params.list.iter().any(|p| p.name.contains(".lora_A")) {
            return Err(crate::Error::Unsupported(format!(
                "{}: no module of this {:?} model is named {} (LoRA targets)",
                path.display(),
                cfg.flavor,
                method.targets.join(", "),
            )));
        }
        Ok(Self {
            net,
            cfg,
            method: method.clone(),
            lora_dropout: 0.0,
            dropout: Dropout::Config,
            params: l.params,
            labels,
        })
    }

    /// The head's logits through the training executor; `seed` while training.
    fn run(&self, batch: &Batch, seed: Option<u64>) -> crate::Result<(Tape<'_>, usize)> {
        let mut tape = Tape::new(&self.params, batch.size(), batch.t, &batch.lengths, seed)
            .with_dropout(self.dropout)
            .with_lora_dropout(self.lora_dropout);
        let x = self.net.hidden(&mut tape, &batch.ids, &batch.types)?;
        let rows: Option<Vec<usize>> = self.is_masked_lm().then(|| {
            (0..batch.targets.len())
                .filter(|&i| batch.targets[i].is_some())
                .collect()
        });
        let y = self.net.head(&mut tape, x, rows.as_deref())?;
        Ok((tape, y))
    }

    /// Class logits `[b, labels]`, per-token class logits `[b·t, labels]`, or for a masked
    /// LM the vocabulary logits of the masked positions `[masked, vocab]`.
    pub fn logits(&self, batch: &Batch) -> crate::Result<Vec<f32>> {
        let (tape, y) = self.run(batch, None)?;
        Ok(tape.value(y).to_vec())
    }

    /// The targets of the rows `logits` returns, and how many classes each row has.
    pub fn targets(&self, batch: &Batch) -> (Vec<Option<u32>>, usize) {
        match self.net.task {
            Task::MaskedLm => {
                let t = batch.targets.iter().filter(|t| t.is_some()).copied();
                (t.collect(), self.cfg.vocab_size)
            }
            Task::TokenClassification => (batch.targets.clone(), self.labels.len()),
            _ => {
                let t = batch.labels.iter().map(|&l| Some(l));
                (t.collect(), self.labels.len())
            }
        }
    }

    pub fn task(&self) -> Task {
        self.net.task
    }

    pub fn is_masked_lm(&self) -> bool {
        self.net.task == Task::MaskedLm
    }

    /// Forward and backward of the mean cross-entropy over the batch divided by `accum`
    /// (gradient accumulation); gradients are added to the parameters'. Returns the batch's
    /// mean loss.
    pub fn forward_backward(&mut self, batch: &Batch, accum: usize) -> crate::Result<f64> {
        let (tape, y) = self.run(batch, Some(step_seed(self.method.seed, &batch.ids)))?;
        let mut record = tape.finish();
        let (targets, classes) = self.targets(batch);
        let count = targets.iter().filter(|t| t.is_some()).count();
        let denom = (count.max(1) * accum) as f32;
        let (loss, dlogits) =
            ops::cross_entropy_owned(record.take_value(y), &targets, classes, denom);
        record.backward(y, dlogits, &mut self.params);
        Ok(loss * accum as f64)
    }

    /// PEFT's `lora_dropout` on every LoRA branch.
    pub fn set_lora_dropout(&mut self, p: f32) {
        self.lora_dropout = p;
    }

    /// The parameters with every LoRA update folded into its weight (the model unchanged).
    pub fn clone_params_merged(&self) -> Params {
        let mut p = self.params.clone();
        if let Some((r, alpha)) = self.method.lora {
            p.merge_lora(alpha / r as f32);
        }
        p
    }

    /// transformers' class name of the saved model (`BertForSequenceClassification`, …).
    pub fn architecture(&self) -> String {
        let body = match self.cfg.flavor {
            Flavor::Bert => "Bert",
            Flavor::DistilBert => "DistilBert",
            Flavor::Roberta => "Roberta",
        };
        let head = match self.net.task {
            Task::MaskedLm => "ForMaskedLM",
            Task::TokenClassification => "ForTokenClassification",
            _ => "ForSequenceClassification",
        };
        format!("{body}{head}")
    }
}
