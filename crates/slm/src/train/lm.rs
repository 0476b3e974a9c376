//! A causal LM in training: the family's forward pass from `models/` (the one inference runs)
//! on the training executor, with the token loss and its backward.

use std::path::Path;

use super::ops;
use super::params::{step_seed, Params};
use super::tape::{Dropout, LoraSpec, ParamLoader, Tape, TrainW};
use super::TrainResult;
use crate::io::{open_weights, ModelFiles};
use crate::models::{config_of, gemma, gpt2, llama, rnn, Architecture, ModelConfig};
use crate::nn::exec::CausalFamily;
use crate::nn::recurrent::State;
use crate::nn::Vb;

/// Token ids `[b, t]` with the id each position must predict (`None`: no loss there, as for
/// prompts, padding and the last position).
#[derive(Debug, Clone)]
pub struct CausalBatch {
    pub ids: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub lengths: Vec<usize>,
    pub t: usize,
}

impl CausalBatch {
    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}

enum Net {
    Gpt2(gpt2::Gpt2<TrainW>),
    Llama(llama::Llama<TrainW>),
    Gemma(gemma::Gemma<TrainW>),
    Rnn(rnn::RnnLm<TrainW>),
}

impl Net {
    fn new(cfg: &ModelConfig, l: &mut ParamLoader, path: &Path) -> TrainResult<Self> {
        Ok(match cfg {
            ModelConfig::Gpt2(c) => Net::Gpt2(gpt2::Gpt2::new(c, l)?),
            ModelConfig::Llama(c) => Net::Llama(llama::Llama::new(c, l)?),
            ModelConfig::Gemma(c) => Net::Gemma(gemma::Gemma::new(c, l)?),
            ModelConfig::Rnn(c) => Net::Rnn(rnn::RnnLm::new(c, l)?),
            ModelConfig::Bert(_) | ModelConfig::T5(_) | ModelConfig::Bart(_) => {
                return Err(crate::Error::Unsupported(format!(
                "{}: '{}' is not a causal language model; causal-LM fine-tuning takes gpt2, llama, qwen2, phi3, gemma2 or gemma3",
                path.display(),
                cfg.architecture().name()
            )))
            }
        })
    }
}

/// The Hugging Face folder a causal model trains from. Training reads f32 weights and saves a
/// Hugging Face folder, so a GGUF model is converted once (dequantized to f32) into
/// `out/base` and trained from there; `converting` is told before that happens.
pub fn trainable_source(
    model: &Path,
    out: &Path,
    converting: impl FnOnce(&Path),
) -> crate::Result<std::path::PathBuf> {
    if model.extension().is_none_or(|e| e != "gguf") {
        return Ok(model.to_path_buf());
    }
    let base = out.join("base");
    if !base.join("config.json").exists() {
        converting(&base);
        crate::convert::gguf_to_hf(model, &base, crate::convert::Dtype::F32, true)?;
    }
    Ok(base)
}

pub struct CausalLm {
    net: Net,
    pub params: Params,
    pub arch: Architecture,
    /// LoRA rank, alpha, targets and dropout, when training LoRA.
    pub lora: Option<LoraSpec>,
    /// The model's own dropout while training (evaluation never drops).
    pub dropout: Dropout,
    seed: u64,
    /// Mixed into the dropout seed: the optimizer step of a stream run, whose chunks hold the
    /// same tokens every epoch and would otherwise draw the same masks every epoch.
    pub salt: u64,
    vocab: usize,
}

impl CausalLm {
    /// Loads a causal checkpoint of any family (a HF folder, or a GGUF file dequantized to
    /// f32). With `lora`, only LoRA factors on its target modules are trained.
    pub fn load(path: &Path, lora: Option<LoraSpec>, seed: u64) -> TrainResult<Self> {
        let files = ModelFiles::locate(path)?;
        let cfg = config_of(&files)?;
        if lora.is_some() && matches!(cfg, ModelConfig::Rnn(_)) {
            return Err(crate::Error::Unsupported(format!(
                "{}: LoRA covers transformer layers (PEFT has none for LSTM/GRU); train a recurrent model fully",
                path.display()
            )));
        }
        let vb = Vb::new(open_weights(&files)?, false);
        let mut l = ParamLoader::new(vb, lora.clone(), seed);
        let net = Net::new(&cfg, &mut l, path)?;
        if let Some(spec) = &lora {
            let hit = l.params.list.iter().any(|p| p.name.contains(".lora_A"));
            if !hit {
                return Err(crate::Error::Unsupported(format!(
                    "{}: no module of this {} model is named {} (LoRA targets); {} has e.g. {}",
                    path.display(),
                    cfg.architecture().name(),
                    spec.targets.join(", "),
                    cfg.architecture().name(),
                    cfg.architecture().lora_targets().join(", ")
                )));
            }
        }
        Ok(Self::built(net, l, &cfg, lora, seed))
    }

    fn built(
        net: Net,
        l: ParamLoader,
        cfg: &ModelConfig,
        lora: Option<LoraSpec>,
        seed: u64,
    ) -> Self {
        Self {
            net,
            params: l.params,
            arch: cfg.architecture(),
            lora,
            dropout: Dropout::Config,
            seed,
            salt: 0,
            vocab: cfg.vocab_size(),
        }
    }

    /// A new model of `cfg`, every weight drawn by the family's initialisation from `seed`.
    pub fn init(cfg: &ModelConfig, seed: u64) -> TrainResult<Self> {
        let Some(rule) = cfg.init_rule() else {
            return Err(crate::Error::Unsupported(format!(
                "a new '{}' model is not initialised this way",
                cfg.architecture().name()
            )));
        };
        let mut l = ParamLoader::init(rule, seed);
        let net = Net::new(cfg, &mut l, Path::new("<new model>"))?;
        Ok(Self::built(net, l, cfg, None, seed))
    }

    /// LoRA targets on GPT-2's `Conv1D` layers: PEFT's `fan_in_fan_out`.
    pub fn fan_in_fan_out(&self) -> bool {
        self.arch == Architecture::Gpt2
    }

    /// The parameter a tied recurrent LM's decoder reads (`encoder.weight`).
    pub fn tied_decoder(&self) -> Option<usize> {
        match &self.net {
            Net::Rnn(m) if m.cfg.tie_weights => self
                .params
                .list
                .iter()
                .position(|p| p.name == "encoder.weight"),
            _ => None,
        }
    }

    /// The seed of a training step's dropout masks.
    fn dropout_seed(&self, ids: &[u32]) -> u64 {
        step_seed(
            self.seed ^ self.salt.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ids,
        )
    }

    /// A recurrent model: its state can be carried from one chunk of a stream to the next.
    pub fn recurrent(&self) -> bool {
        matches!(self.net, Net::Rnn(_))
    }

    /// Runs the forward pass of a batch; `seed` while training (dropout), `None` to evaluate.
    /// Recurrent layers start from `states` (by layer; zeros where missing).
    fn run(
        &self,
        batch: &CausalBatch,
        seed: Option<u64>,
        states: Vec<Option<State>>,
    ) -> crate::Result<(Tape<'_>, usize)> {
        let mut tape = Tape::new(&self.params, batch.size(), batch.t, &batch.lengths, seed)
            .with_dropout(self.dropout)
            .with_states(states);
        let out = match &self.net {
            Net::Gpt2(m) => m.forward(&mut tape, &batch.ids, false)?,
            Net::Llama(m) => m.forward(&mut tape, &batch.ids, false)?,
            Net::Gemma(m) => m.forward(&mut tape, &batch.ids, false)?,
            Net::Rnn(m) => m.forward(&mut tape, &batch.ids, false)?,
        };
        Ok((tape, out))
    }

    /// Logits `[b·t, vocab]` of a batch.
    pub fn logits(&self, batch: &CausalBatch) -> crate::Result<Vec<f32>> {
        let (tape, out) = self.run(batch, None, Vec::new())?;
        Ok(tape.value(out).to_vec())
    }

    /// Summed token loss and the number of target tokens of a batch, without gradients.
    pub fn loss_sum(&self, batch: &CausalBatch) -> crate::Result<(f64, usize)> {
        let (tape, out) = self.run(batch, None, Vec::new())?;
        let count = batch.targets.iter().filter(|t| t.is_some()).count();
        let (loss, _) = ops::cross_entropy(tape.value(out), &batch.targets, self.vocab, 1.0);
        Ok((loss, count))
    }

    /// The mean token loss that [`Self::forward_backward`] differentiates (training mode:
    /// the same dropout masks), without the backward.
    pub fn training_loss(&self, batch: &CausalBatch) -> crate::Result<f64> {
        let (tape, out) = self.run(batch, Some(self.dropout_seed(&batch.ids)), Vec::new())?;
        let count = batch.targets.iter().filter(|t| t.is_some()).count().max(1);
        let (loss, _) =
            ops::cross_entropy(tape.value(out), &batch.targets, self.vocab, count as f32);
        Ok(loss)
    }

    /// Summed token loss and target count of a batch whose recurrent layers start from
    /// `states`, and the states they end in (evaluating a stream chunk by chunk).
    pub fn loss_sum_with(
        &self,
        batch: &CausalBatch,
        states: Vec<Option<State>>,
    ) -> crate::Result<(f64, usize, Vec<Option<State>>)> {
        let (mut tape, out) = self.run(batch, None, states)?;
        let count = batch.targets.iter().filter(|t| t.is_some()).count();
        let (loss, _) = ops::cross_entropy(tape.value(out), &batch.targets, self.vocab, 1.0);
        Ok((loss, count, tape.take_states()))
    }

    /// Forward and backward of the mean token loss / `accum`; returns the mean token loss.
    pub fn forward_backward(&mut self, batch: &CausalBatch, accum: usize) -> crate::Result<f64> {
        Ok(self.forward_backward_with(batch, accum, Vec::new())?.0)
    }

    /// [`Self::forward_backward`] with recurrent layers starting from `states` (the state
    /// carried, detached, from the previous chunk: truncated BPTT); also returns the states
    /// the layers end in.
    pub fn forward_backward_with(
        &mut self,
        batch: &CausalBatch,
        accum: usize,
        states: Vec<Option<State>>,
    ) -> crate::Result<(f64, Vec<Option<State>>)> {
        let seed = self.dropout_seed(&batch.ids);
        let (mut tape, out) = self.run(batch, Some(seed), states)?;
        let states = tape.take_states();
        let mut record = tape.finish();
        let count = batch.targets.iter().filter(|t| t.is_some()).count().max(1);
        let (loss, dlogits) = ops::cross_entropy_owned(
            record.take_value(out),
            &batch.targets,
            self.vocab,
            (count * accum) as f32,
        );
        record.backward(out, dlogits, &mut self.params);
        Ok((loss * accum as f64, states))
    }
}
