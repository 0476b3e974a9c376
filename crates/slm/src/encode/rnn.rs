//! Recurrent text classifiers at inference: the same network definition the trainer ran
//! (`models::rnn::RnnClassifier`), over the inference executor, in padded batches.

use std::path::Path;

use candle_core::D;

use crate::error::{Error, Result};
use crate::io::{open_weights, ModelFiles};
use crate::models::rnn::{classifier_config, unknown_if_empty, ClassifierConfig, RnnClassifier};
use crate::nn::infer::{Infer, InferW, VbLoader};
use crate::nn::Vb;
use crate::tokenize::Tokenizer;

pub struct RnnTextClassifier {
    net: RnnClassifier<InferW>,
    pub tokenizer: Tokenizer,
    pub cfg: ClassifierConfig,
}

/// Whether `path` is a folder holding an RNN text classifier.
pub fn is_rnn_classifier(path: &Path) -> bool {
    ModelFiles::locate(path)
        .ok()
        .and_then(|f| classifier_config(&f).ok().flatten())
        .is_some()
}

impl RnnTextClassifier {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// Loads the classifier; `adapter` is refused by name (LoRA has no recurrent layers), as
    /// the encoders' loader takes one.
    pub fn load_with(path: &Path, adapter: Option<&Path>) -> Result<Self> {
        if let Some(a) = adapter {
            return Err(Error::file(
                a,
                "an RNN classifier takes no LoRA adapter (it is trained fully)",
            ));
        }
        let files = ModelFiles::locate(path)?;
        let cfg = classifier_config(&files)?.ok_or_else(|| {
            Error::file(
                path,
                "not an RNN text classifier (model_type rnn_classifier)",
            )
        })?;
        let tokenizer = Tokenizer::load(&files)?;
        tokenizer.check_matches(cfg.ntoken)?;
        let vb = Vb::new(open_weights(&files)?, false);
        let net = RnnClassifier::new(&cfg, &mut VbLoader::new(vb))?;
        Ok(Self {
            net,
            tokenizer,
            cfg,
        })
    }

    /// Token ids of a text, as the classifier was trained on them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, false)?;
        unknown_if_empty(&mut ids, &self.tokenizer);
        Ok(ids)
    }

    /// Class probabilities of each text, in batches of `batch_size` of similar length.
    pub fn classify(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        self.batched(texts, batch_size, |e, ids| {
            let logits = self.net.forward(e, ids)?.tensor()?.squeeze(1)?;
            Ok(candle_nn::ops::softmax(&logits, D::Minus1)?)
        })
    }

    /// Each text's embedding: the pooled recurrent states the classifier's head reads, scaled
    /// to unit length with `normalize`.
    pub fn embed(
        &self,
        texts: &[&str],
        batch_size: usize,
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>> {
        self.batched(texts, batch_size, |e, ids| {
            let v = self.net.pooled(e, ids)?.tensor()?.squeeze(1)?;
            Ok(match normalize {
                true => v.broadcast_div(
                    &v.sqr()?
                        .sum_keepdim(D::Minus1)?
                        .sqrt()?
                        .clamp(1e-12, f32::MAX)?,
                )?,
                false => v,
            })
        })
    }

    /// `run` over the texts in batches of `batch_size` of similar length, one row per text, in
    /// the texts' order.
    fn batched(
        &self,
        texts: &[&str],
        batch_size: usize,
        run: impl Fn(&mut Infer, &[u32]) -> Result<candle_core::Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        let pad = self.tokenizer.pad_id();
        for chunk in order.chunks(batch_size.max(1)) {
            let t = chunk.iter().map(|&i| ids[i].len()).max().unwrap_or(1);
            let lengths: Vec<usize> = chunk.iter().map(|&i| ids[i].len()).collect();
            let mut flat = Vec::with_capacity(chunk.len() * t);
            for &i in chunk {
                flat.extend(&ids[i]);
                flat.extend(std::iter::repeat_n(pad, t - ids[i].len()));
            }
            let mut e = Infer::encoder(&lengths, t);
            let rows = run(&mut e, &flat)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i] = row;
            }
        }
        Ok(out)
    }
}
