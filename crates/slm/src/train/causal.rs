//! Causal-LM data and the model side of a causal-LM run.
//!
//! - Plain text: documents (separated by blank lines) joined with EOS, packed into blocks of
//!   the maximum length; every token is a target.
//! - JSONL `{"prompt", "completion"}`: loss only on the completion (and the EOS after it).
//! - JSONL `{"messages": [...]}`: rendered with the model's chat template; loss only on the
//!   assistant turns, found by rendering the conversation up to each of them.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::lm::{CausalBatch, CausalLm};
use super::trainer::{Evaluation, Model};
use super::TrainResult;
use crate::io::write::{write_atomic, write_safetensors};
use crate::tokenize::chat::Message;
use crate::tokenize::Tokenizer;
use crate::Error;

#[derive(Debug, Clone)]
pub struct CausalExample {
    pub ids: Vec<u32>,
    /// The token each position must predict, `None` where there is no loss.
    pub targets: Vec<Option<u32>>,
}

#[derive(Debug)]
pub struct CausalData {
    pub train: Vec<CausalExample>,
    pub valid: Vec<CausalExample>,
    /// Examples cut to the maximum length.
    pub truncated: usize,
    pub format: &'static str,
}

pub struct CausalDataOptions<'a> {
    pub train: &'a Path,
    pub valid: Option<&'a Path>,
    pub valid_split: f32,
    pub seed: u64,
    pub max_len: usize,
}

fn data_err(path: &Path, line: usize, msg: impl std::fmt::Display) -> crate::Error {
    crate::Error::Data(format!("{}: line {line}: {msg}", path.display()))
}

/// Targets for `ids` where position `i` predicts `ids[i + 1]` when `wanted(i + 1)`.
fn next_targets(ids: &[u32], wanted: impl Fn(usize) -> bool) -> Vec<Option<u32>> {
    (0..ids.len())
        .map(|i| ids.get(i + 1).copied().filter(|_| wanted(i + 1)))
        .collect()
}

fn read_file(
    tok: &Tokenizer,
    path: &Path,
    max_len: usize,
) -> TrainResult<(Vec<CausalExample>, usize, &'static str)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(crate::Error::Data(format!(
            "{}: no text to train on",
            path.display()
        )));
    }
    let jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("json")
    );
    if !jsonl {
        return Ok((pack_text(tok, &text, max_len)?, 0, "text"));
    }
    let mut out = Vec::new();
    let mut truncated = 0;
    let mut format = "jsonl";
    let eos = tok.eos.first().copied();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| data_err(path, n, format!("not JSON: {e}")))?;
        let (ids, targets) = if let Some(msgs) = v.get("messages") {
            format = "chat";
            let msgs: Vec<Message> = serde_json::from_value(msgs.clone()).map_err(|e| {
                data_err(
                    path,
                    n,
                    format!("'messages' must be a list of {{role, content}}: {e}"),
                )
            })?;
            chat_example(tok, &msgs).map_err(|e| data_err(path, n, e))?
        } else {
            format = "prompt/completion";
            let field = |k: &str| {
                v.get(k).and_then(|x| x.as_str()).ok_or_else(|| {
                    data_err(
                        path,
                        n,
                        format!("no \"{k}\" string (expected prompt/completion or messages)"),
                    )
                })
            };
            let mut ids = tok.encode(field("prompt")?, true)?;
            let start = ids.len();
            ids.extend(tok.encode(field("completion")?, false)?);
            ids.extend(eos);
            let targets = next_targets(&ids, |j| j >= start);
            (ids, targets)
        };
        let (mut ids, mut targets) = (ids, targets);
        if ids.len() > max_len {
            truncated += 1;
            ids.truncate(max_len);
            targets.truncate(max_len);
            if let Some(last) = targets.last_mut() {
                *last = None;
            }
        }
        if targets.iter().all(|t| t.is_none()) {
            return Err(data_err(
                path,
                n,
                "no tokens to learn (empty completion, or cut off by --max-length)",
            ));
        }
        out.push(CausalExample { ids, targets });
    }
    if out.is_empty() {
        return Err(crate::Error::Data(format!(
            "{}: no examples",
            path.display()
        )));
    }
    Ok((out, truncated, format))
}

/// Token ids of a conversation and targets on the assistant turns only.
fn chat_example(tok: &Tokenizer, msgs: &[Message]) -> crate::Result<(Vec<u32>, Vec<Option<u32>>)> {
    let chat = tok.chat()?;
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err(Error::msg("no assistant message to learn from"));
    }
    let ids = tok.encode(&chat.render(msgs, false)?, false)?;
    let mut wanted = vec![false; ids.len()];
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = tok.encode(&chat.render(&msgs[..i], true)?, false)?.len();
        let end = tok.encode(&chat.render(&msgs[..=i], false)?, false)?.len();
        for w in wanted.iter_mut().take(end.min(ids.len())).skip(start) {
            *w = true;
        }
    }
    let targets = next_targets(&ids, |j| wanted[j]);
    Ok((ids, targets))
}

/// Documents separated by blank lines, each followed by EOS, cut into `max_len` blocks.
pub(crate) fn pack_text(
    tok: &Tokenizer,
    text: &str,
    max_len: usize,
) -> TrainResult<Vec<CausalExample>> {
    let mut ids = Vec::new();
    let eos = tok.eos.first().copied();
    for doc in text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()) {
        ids.extend(tok.encode(doc, false)?);
        ids.extend(eos);
    }
    let blocks: Vec<CausalExample> = ids
        .chunks(max_len)
        .filter(|c| c.len() >= 2)
        .map(|c| CausalExample {
            ids: c.to_vec(),
            targets: next_targets(c, |_| true),
        })
        .collect();
    Ok(blocks)
}

pub fn load_causal_data(tok: &Tokenizer, o: &CausalDataOptions) -> TrainResult<CausalData> {
    let (mut train, mut truncated, format) = read_file(tok, o.train, o.max_len)?;
    let valid = match o.valid {
        Some(v) => {
            let (valid, t, _) = read_file(tok, v, o.max_len)?;
            truncated += t;
            valid
        }
        None => super::hold_out(&mut train, o.valid_split, o.seed),
    };
    Ok(CausalData {
        train,
        valid,
        truncated,
        format,
    })
}

/// Right-pads the examples (no loss on padding).
pub fn make_causal_batch(examples: &[&CausalExample], pad: u32) -> CausalBatch {
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut b = CausalBatch {
        ids: Vec::with_capacity(examples.len() * t),
        targets: Vec::with_capacity(examples.len() * t),
        lengths: Vec::with_capacity(examples.len()),
        t,
    };
    for e in examples {
        let n = e.ids.len();
        b.ids.extend(&e.ids);
        b.ids.extend(std::iter::repeat_n(pad, t - n));
        b.targets.extend(&e.targets);
        b.targets.extend(std::iter::repeat_n(None, t - n));
        b.lengths.push(n);
    }
    b
}

pub fn causal_eval_batches(
    examples: &[CausalExample],
    batch_size: usize,
    pad: u32,
) -> Vec<CausalBatch> {
    examples
        .chunks(batch_size.max(1))
        .map(|c| make_causal_batch(&c.iter().collect::<Vec<_>>(), pad))
        .collect()
}

pub struct CausalRun {
    pub model: CausalLm,
    /// The Hugging Face folder the model came from (config and tokenizer files).
    pub source: PathBuf,
}

impl Model for CausalRun {
    type Batch = CausalBatch;

    fn params(&self) -> &super::params::Params {
        &self.model.params
    }

    fn params_mut(&mut self) -> &mut super::params::Params {
        &mut self.model.params
    }

    fn forward_backward(&mut self, batch: &CausalBatch, accum: usize) -> TrainResult<f64> {
        self.model.forward_backward(batch, accum)
    }

    fn evaluate(&self, batches: &[CausalBatch], done: &dyn Fn(usize)) -> TrainResult<Evaluation> {
        Evaluation::mean_token_loss(batches, done, |b| self.model.loss_sum(b))
    }

    fn tokens(batch: &CausalBatch) -> usize {
        batch.lengths.iter().sum()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        let m = &self.model;
        save_model(
            dir,
            &Saved {
                params: &m.params,
                lora: m.lora.as_ref(),
                source: &self.source,
                task_type: "CAUSAL_LM",
                fan_in_fan_out: m.fan_in_fan_out(),
                // PyTorch's RNNModel lists a tied decoder weight in its state_dict as well.
                alias: m.tied_decoder().map(|i| (i, "decoder.weight")),
            },
        )
    }
}

/// What a trained model's folder holds: the full weights beside the source's config, or the
/// LoRA factors as a PEFT adapter.
pub(crate) struct Saved<'a> {
    pub params: &'a super::params::Params,
    pub lora: Option<&'a super::tape::LoraSpec>,
    /// The folder the model came from (config and tokenizer files).
    pub source: &'a Path,
    /// PEFT's `task_type`: `CAUSAL_LM`, `SEQ_2_SEQ_LM`.
    pub task_type: &'static str,
    /// LoRA on GPT-2's `Conv1D` layers.
    pub fan_in_fan_out: bool,
    /// A parameter the state_dict lists a second time, under this name.
    pub alias: Option<(usize, &'static str)>,
}

/// Writes a trained model (or its adapter) and the source's tokenizer into `dir`.
pub(crate) fn save_model(dir: &Path, s: &Saved) -> TrainResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let p = s.params;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(spec) = s.lora {
        let tensors: Vec<(String, Vec<usize>, &[f32])> = p
            .list
            .iter()
            .filter(|x| x.name.contains(".lora_"))
            .map(|x| {
                (
                    format!("base_model.model.{}", x.name),
                    x.shape.clone(),
                    x.value.as_slice(),
                )
            })
            .collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
        let config = serde_json::json!({
            "peft_type": "LORA", "task_type": s.task_type, "r": spec.r, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": spec.targets, "modules_to_save": null,
            "base_model_name_or_path": s.source.display().to_string(), "bias": "none",
            "fan_in_fan_out": s.fan_in_fan_out, "inference_mode": true, "init_lora_weights": true,
            "use_rslora": false, "use_dora": false, "layers_to_transform": null,
            "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {}, "revision": null,
        });
        let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), |w| w.write_all(&json))?;
    } else {
        // GPT-2's Conv1D weights go back to their stored [in, out] layout.
        let stored: Vec<(String, Vec<usize>, std::borrow::Cow<[f32]>)> = p
            .list
            .iter()
            .map(|x| {
                if x.transposed {
                    let (o, i) = (x.shape[0], x.shape[1]);
                    let mut t = vec![0f32; o * i];
                    for r in 0..o {
                        for c in 0..i {
                            t[c * o + r] = x.value[r * i + c];
                        }
                    }
                    (x.name.clone(), vec![i, o], t.into())
                } else {
                    (x.name.clone(), x.shape.clone(), x.value.as_slice().into())
                }
            })
            .collect();
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = stored
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.as_ref()))
            .collect();
        if let Some((i, name)) = s.alias {
            let x = &p.list[i];
            tensors.push((name.into(), x.shape.clone(), x.value.as_slice()));
        }
        write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
        copy_files(s.source, dir, &["config.json", "generation_config.json"])?;
    }
    copy_files(s.source, dir, TOKENIZER_FILES)
}

/// The files a tokenizer may be made of, copied beside a trained model.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
];

/// A model folder slm and PyTorch read: `model.safetensors` (PyTorch's metadata),
/// `config.json`, and the tokenizer files of `tokenizer`.
pub(crate) fn write_folder(
    dir: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    config: &serde_json::Value,
    tokenizer: &Path,
) -> TrainResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), tensors, Some(meta))?;
    let json = serde_json::to_vec_pretty(config).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&dir.join("config.json"), |w| w.write_all(&json))?;
    copy_files(tokenizer, dir, TOKENIZER_FILES)
}

pub(crate) fn copy_files(from: &Path, to: &Path, names: &[&str]) -> TrainResult<()> {
    for f in names {
        let src = from.join(f);
        if src.is_file() && from != to {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&to.join(f), |w| w.write_all(&bytes))?;
        }
    }
    Ok(())
}
