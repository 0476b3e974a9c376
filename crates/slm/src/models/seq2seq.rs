//! Encoder-decoder models on the inference executor: what translation and summarization run.
//! The encoder runs once per source; each decoder sequence keeps its self-attention cache and
//! the cross-attention keys of its source, which the beams of one source share.

use std::path::Path;

use candle_core::Tensor;

use super::{config_of, ModelConfig, SeqCache};
use crate::error::{Error, Result};
use crate::io::{open_weights, ModelFiles};
use crate::nn::exec::Seq2SeqFamily;
use crate::nn::infer::{Act, Infer, InferW, KvCache, VbLoader};
use crate::nn::Vb;

pub trait Seq2SeqLM: Send + Sync {
    /// The encoder's final states of each source, `[1, len, d_model]`, run as one padded batch.
    fn encode(&self, sources: &[&[u32]]) -> Result<Vec<Tensor>>;
    /// An empty decoder cache for one sequence.
    fn new_cache(&self) -> SeqCache;
    /// Runs each sequence's decoder `ids` after what its cache holds and returns the logits of
    /// each one's last row, `[n, vocab]` (`all_rows`: of every row, `[Σt, vocab]`). A cache's
    /// first call runs alone and passes its source's `memory` (from [`Seq2SeqLM::encode`]).
    fn decode(
        &self,
        seqs: &mut [(&mut SeqCache, &[u32])],
        memory: Option<&Tensor>,
        all_rows: bool,
    ) -> Result<Tensor>;
    /// The decoder's first input.
    fn decoder_start(&self) -> u32;
    fn eos(&self) -> u32;
    fn pad(&self) -> u32;
    fn vocab_size(&self) -> usize;
    /// The token the last position a length limit allows is forced to (config
    /// `forced_eos_token_id`).
    fn forced_eos(&self) -> Option<u32> {
        None
    }
}

/// A [`Seq2SeqFamily`] on the inference executor.
pub struct EncoderDecoder<F> {
    model: F,
    start: u32,
    eos: u32,
    pad: u32,
    forced_eos: Option<u32>,
}

impl<F: Seq2SeqFamily<InferW> + Send + Sync> Seq2SeqLM for EncoderDecoder<F> {
    fn encode(&self, sources: &[&[u32]]) -> Result<Vec<Tensor>> {
        let t = sources.iter().map(|s| s.len()).max().unwrap_or(0);
        if sources.is_empty() || sources.iter().any(|s| s.is_empty()) {
            return Err(Error::msg("an empty source: nothing to encode"));
        }
        let lengths: Vec<usize> = sources.iter().map(|s| s.len()).collect();
        let mut ids = Vec::with_capacity(sources.len() * t);
        for s in sources {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(self.pad, t - s.len()));
        }
        let mut e = Infer::encoder(&lengths, t);
        let y = self.model.encode(&mut e, &ids)?.tensor()?;
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| Ok(y.narrow(0, i, 1)?.narrow(1, 0, n)?.contiguous()?))
            .collect()
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache(vec![KvCache::default(); self.model.n_slots()])
    }

    fn decode(
        &self,
        seqs: &mut [(&mut SeqCache, &[u32])],
        memory: Option<&Tensor>,
        all_rows: bool,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut runs = Vec::with_capacity(seqs.len());
        for (cache, seq_ids) in seqs.iter_mut() {
            if cache.0.len() != self.model.n_slots() {
                return Err(Error::msg(
                    "internal: a decoder cache made for another model",
                ));
            }
            super::check_context(cache.len() + seq_ids.len(), self.model.context_length())?;
            ids.extend_from_slice(seq_ids);
            runs.push((cache.0.as_mut_slice(), seq_ids.len()));
        }
        if runs.is_empty() {
            return Err(Error::msg("internal: decode called without sequences"));
        }
        let mut e = Infer::batch(runs)?;
        let memory = memory.map(|m| Act::Full(m.clone()));
        let y = self
            .model
            .decode(&mut e, &ids, memory.as_ref(), !all_rows)?;
        Ok(y.tensor()?.squeeze(0)?)
    }

    fn decoder_start(&self) -> u32 {
        self.start
    }

    fn eos(&self) -> u32 {
        self.eos
    }

    fn pad(&self) -> u32 {
        self.pad
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn forced_eos(&self) -> Option<u32> {
        self.forced_eos
    }
}

/// An encoder-decoder ready to run.
pub struct LoadedSeq2Seq {
    pub config: ModelConfig,
    pub files: ModelFiles,
    pub model: Box<dyn Seq2SeqLM>,
}

/// Whether the model at `path` is an encoder-decoder (without loading its weights).
pub fn is_seq2seq(path: &Path) -> bool {
    ModelFiles::locate(path)
        .and_then(|f| config_of(&f))
        .is_ok_and(|c| c.architecture().is_seq2seq())
}

pub fn load_seq2seq(path: &Path) -> Result<LoadedSeq2Seq> {
    load_seq2seq_with(path, None)
}

/// An encoder-decoder with a PEFT LoRA adapter (`SEQ_2_SEQ_LM`) applied to its weights.
pub fn load_seq2seq_with(path: &Path, adapter: Option<&Path>) -> Result<LoadedSeq2Seq> {
    let files = ModelFiles::locate(path)?;
    let config = config_of(&files)?;
    let mut weights = open_weights(&files)?;
    if let Some(dir) = adapter {
        let a = crate::io::peft::PeftAdapter::open(dir)?;
        weights = std::sync::Arc::new(crate::io::peft::AdaptedStore::new(weights, a)?);
    }
    let mut l = VbLoader::new(Vb::new(weights, false));
    let model: Box<dyn Seq2SeqLM> = match &config {
        ModelConfig::T5(c) => Box::new(EncoderDecoder {
            model: super::t5::T5::new(c, &mut l)?,
            start: c.decoder_start(),
            eos: c.eos_token_id,
            pad: c.pad_token_id,
            forced_eos: None,
        }),
        ModelConfig::Bart(c) => Box::new(EncoderDecoder {
            model: super::bart::Bart::new(c, &mut l)?,
            start: c.decoder_start(),
            eos: c.eos_token_id,
            pad: c.pad_token_id,
            forced_eos: c.forced_eos_token_id,
        }),
        other => {
            return Err(Error::file(
                &files.root,
                format!(
                    "'{}' is not an encoder-decoder model",
                    other.architecture().name()
                ),
            ))
        }
    };
    Ok(LoadedSeq2Seq {
        config,
        files,
        model,
    })
}
