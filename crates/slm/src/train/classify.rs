//! Sequence classification: a `text,label` dataset (TSV/CSV/JSONL) turned into batches, and
//! the model side of the training loop for [`BertTrain`].

use std::io::Write;
use std::path::{Path, PathBuf};

use super::bert::{Batch, BertTrain};
use super::ops;
use super::params::seeded;
use super::trainer::{Evaluation, Model};
use super::TrainResult;
use crate::data::{read_records, Columns, Record};
use crate::io::write::{write_atomic, write_safetensors};
use crate::tokenize::{EncoderInput, Tokenizer};
use crate::Error;

#[derive(Debug, Clone)]
pub struct Example {
    pub input: EncoderInput,
    pub label: u32,
}

#[derive(Debug)]
pub struct ClassifyData {
    pub train: Vec<Example>,
    pub valid: Vec<Example>,
    /// Class names by id, as saved in `id2label`.
    pub labels: Vec<String>,
    /// Texts cut to the maximum length (train + valid).
    pub truncated: usize,
}

pub struct DataOptions<'a> {
    pub train: &'a Path,
    pub valid: Option<&'a Path>,
    /// Held out from `train` when there is no valid file.
    pub valid_split: f32,
    pub seed: u64,
    pub max_len: usize,
    pub columns: Columns,
    /// Drop rows with an empty text instead of refusing the file.
    pub skip_empty: bool,
}

fn label_of<'r>(path: &Path, r: &'r Record) -> TrainResult<&'r str> {
    r.label
        .as_deref()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| crate::Error::Data(format!("{}: line {}: no label", path.display(), r.line)))
}

/// Reads, labels and tokenizes the data. Labels are the training set's distinct values, in
/// numeric order when all are integers (so `0`/`1` keep their ids), else sorted by name.
pub fn load_data(tok: &Tokenizer, o: &DataOptions) -> TrainResult<ClassifyData> {
    let train = read_records(o.train, &o.columns, o.skip_empty)?;
    if train.is_empty() {
        return Err(crate::Error::Data(format!(
            "{}: no rows to train on",
            o.train.display()
        )));
    }
    let mut labels: Vec<String> = Vec::new();
    for r in &train {
        let l = label_of(o.train, r)?;
        if !labels.iter().any(|x| x == l) {
            labels.push(l.to_string());
        }
    }
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    } else {
        labels.sort();
    }
    if labels.len() < 2 {
        return Err(crate::Error::Data(format!(
            "{}: only one label ({}) in the training data",
            o.train.display(),
            labels.join("")
        )));
    }
    let mut truncated = 0;
    let mut examples = |path: &Path, rows: &[Record]| -> TrainResult<Vec<Example>> {
        rows.iter()
            .map(|r| {
                let l = label_of(path, r)?;
                let label = labels.iter().position(|x| x == l).ok_or_else(|| {
                    crate::Error::Data(format!(
                        "{}: line {}: label '{l}' does not occur in the training data ({})",
                        path.display(),
                        r.line,
                        labels.join(", ")
                    ))
                })?;
                let input = tok.encode_pair(&r.text, r.pair.as_deref(), o.max_len)?;
                if input.full_len > o.max_len {
                    truncated += 1;
                }
                Ok(Example {
                    input,
                    label: label as u32,
                })
            })
            .collect()
    };
    let (train, valid) = match o.valid {
        Some(v) => {
            let valid = read_records(v, &o.columns, o.skip_empty)?;
            (examples(o.train, &train)?, examples(v, &valid)?)
        }
        None => {
            let mut all = examples(o.train, &train)?;
            let n_valid = ((all.len() as f32) * o.valid_split).round() as usize;
            let mut order: Vec<usize> = (0..all.len()).collect();
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut seeded(o.seed));
            let held: std::collections::HashSet<usize> = order[..n_valid].iter().copied().collect();
            let mut valid = Vec::new();
            let mut i = 0;
            all.retain(|e| {
                let keep = !held.contains(&i);
                if !keep {
                    valid.push(e.clone());
                }
                i += 1;
                keep
            });
            (all, valid)
        }
    };
    Ok(ClassifyData {
        train,
        valid,
        labels,
        truncated,
    })
}

/// Right-pads the examples to the longest of them.
pub fn make_batch(examples: &[&Example], pad: u32) -> Batch {
    let inputs: Vec<&EncoderInput> = examples.iter().map(|e| &e.input).collect();
    let mut b = Batch::padded(&inputs, pad);
    b.labels = examples.iter().map(|e| e.label).collect();
    b
}

/// Mean cross-entropy and accuracy over `batches`; `run` gives a batch's logits, its targets
/// (`None`: not scored) and the number of classes.
pub fn evaluate_classes<B>(
    batches: &[B],
    done: &dyn Fn(usize),
    run: impl Fn(&B) -> TrainResult<(Vec<f32>, Vec<Option<u32>>, usize)>,
) -> TrainResult<Evaluation> {
    let (mut loss, mut correct, mut n) = (0.0, 0usize, 0usize);
    for (i, b) in batches.iter().enumerate() {
        let (logits, targets, c) = run(b)?;
        loss += ops::cross_entropy(&logits, &targets, c, 1.0).0;
        for (row, t) in logits.chunks(c).zip(&targets) {
            let Some(t) = t else { continue };
            let pred = (0..c)
                .max_by(|&x, &y| row[x].total_cmp(&row[y]))
                .unwrap_or(0);
            correct += usize::from(pred == *t as usize);
            n += 1;
        }
        done(i + 1);
    }
    Ok(Evaluation {
        loss: loss / n.max(1) as f64,
        metric: Some(("accuracy".into(), correct as f64 / n.max(1) as f64)),
    })
}

/// The model side of a classification run: the network and where its tokenizer files are.
pub struct ClassifierRun {
    pub model: BertTrain,
    pub source: PathBuf,
}

impl Model for ClassifierRun {
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
        // Per sequence, or per labelled token for token classification.
        evaluate_classes(batches, done, |b| {
            let (targets, c) = self.model.targets(b);
            Ok((self.model.logits(b)?, targets, c))
        })
    }

    fn tokens(batch: &Batch) -> usize {
        batch.lengths.iter().sum()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        if self.model.method.lora.is_some() {
            save_adapter(&self.model, &self.source, dir)
        } else {
            save_model(&self.model, &self.source, dir)
        }
    }
}

/// transformers' `id2label`: `{"0": "neg", ...}`.
fn id2label(labels: &[String]) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect()
}

/// Files that make a folder loadable besides the weights.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
];

/// A PEFT adapter folder (task SEQ_CLS): the LoRA factors and the classifier, with the labels
/// in the safetensors metadata, and the tokenizer files of the base.
pub fn save_adapter(m: &BertTrain, source: &Path, dir: &Path) -> TrainResult<()> {
    let Some((r, alpha)) = m.method.lora else {
        return Err(crate::Error::Unsupported("not a LoRA model".into()));
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = m
        .params
        .list
        .iter()
        .filter(|p| {
            p.name.contains(".lora_")
                || p.name.starts_with("classifier.")
                || p.name.starts_with("pre_classifier.")
        })
        .map(|p| {
            (
                format!("base_model.model.{}", p.name),
                p.shape.clone(),
                p.value.as_slice(),
            )
        })
        .collect();
    let id2label = id2label(&m.labels);
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "id2label".to_string(),
            serde_json::Value::from(id2label).to_string(),
        ),
    ]);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
    // DistilBERT's pre_classifier is new on a bare encoder: it is trained and saved too.
    let modules_to_save: &[&str] = if m.cfg.flavor == crate::models::bert::Flavor::DistilBert {
        &["pre_classifier", "classifier", "score"]
    } else {
        &["classifier", "score"]
    };
    let task_type = match m.task() {
        crate::models::bert::Task::TokenClassification => "TOKEN_CLS",
        _ => "SEQ_CLS",
    };
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": m.lora_dropout,
        "target_modules": m.method.targets,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": source.display().to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), |w| w.write_all(&json))?;
    copy_tokenizer(source, dir)
}

fn copy_tokenizer(source: &Path, dir: &Path) -> TrainResult<()> {
    for f in TOKENIZER_FILES {
        let src = source.join(f);
        if src.is_file() && source != dir {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&dir.join(f), |w| w.write_all(&bytes))?;
        }
    }
    Ok(())
}

/// A `BertForSequenceClassification` (config.json with id2label and label2id) or
/// `BertForMaskedLM` folder: model.safetensors, config.json, the tokenizer files of the source.
pub fn save_model(m: &BertTrain, source: &Path, dir: &Path) -> TrainResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Only a LoRA model needs a merged copy; a full one is saved from its own parameters.
    let merged;
    let params = if m.method.lora.is_some() {
        merged = m.clone_params_merged();
        &merged
    } else {
        &m.params
    };
    let tensors: Vec<(String, Vec<usize>, &[f32])> = params
        .list
        .iter()
        .filter(|p| !p.name.contains(".lora_"))
        .map(|p| (p.name.clone(), p.shape.clone(), p.value.as_slice()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    let cfg_path = source.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, e))?;
    let id2label = id2label(&m.labels);
    let label2id: serde_json::Map<String, serde_json::Value> = m
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    cfg["architectures"] = serde_json::json!([m.architecture()]);
    if !m.is_masked_lm() {
        cfg["id2label"] = id2label.into();
        cfg["label2id"] = label2id.into();
    }
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join("config.json"), |w| w.write_all(&json))?;
    copy_tokenizer(source, dir)
}
