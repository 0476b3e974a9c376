//! Running encoders over many texts: tokenization with truncation, length-sorted padded batches,
//! and the three products users want from them: embeddings, class probabilities and masked-token
//! predictions.

pub mod pooling;
pub mod rnn;

use std::path::Path;

use candle_core::D;

use crate::error::{Error, Result};
use crate::models::bert::{self, Bert, EncoderBatch, Task};
use crate::models::load_encoder_with;
use crate::tokenize::{EncoderInput, Tokenizer};

pub use pooling::{PoolMode, Pooling};

/// An encoder model with its tokenizer.
pub struct Encoder {
    pub model: Bert,
    pub tokenizer: Tokenizer,
    /// The default limit on tokens per input (special tokens included).
    pub max_len: usize,
    pub pooling: Pooling,
}

/// One masked-token candidate.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub id: u32,
    pub token: String,
    pub probability: f32,
}

fn read_max_len(path: &Path, key: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v.get(key)?.as_u64().map(|n| n as usize)
}

impl Encoder {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// With a PEFT LoRA adapter applied.
    pub fn load_with(path: &Path, adapter: Option<&Path>) -> Result<Self> {
        let loaded = load_encoder_with(path, adapter)?;
        let tokenizer = Tokenizer::load(&loaded.files)?;
        tokenizer.check_matches(loaded.model.config.vocab_size)?;
        let root = &loaded.files.root;
        // The tightest of: the position table, the tokenizer's model_max_length (transformers'
        // default truncation), and sentence-transformers' max_seq_length.
        let mut max_len = loaded.model.config.max_tokens();
        for (file, key) in [
            ("tokenizer_config.json", "model_max_length"),
            ("sentence_bert_config.json", "max_seq_length"),
        ] {
            if let Some(n) = read_max_len(&root.join(file), key) {
                max_len = max_len.min(n);
            }
        }
        Ok(Self {
            pooling: Pooling::from_folder(root)?,
            model: loaded.model,
            tokenizer,
            max_len,
        })
    }

    /// Tokenizes texts (and optional pairs), truncated to `max_len` tokens; with `truncate`
    /// off an over-long input is an error naming it. Returns the inputs and the indices that
    /// were truncated, for the caller's warning.
    pub fn prepare(
        &self,
        texts: &[(&str, Option<&str>)],
        max_len: usize,
        truncate: bool,
    ) -> Result<(Vec<EncoderInput>, Vec<usize>)> {
        if max_len > self.model.config.max_tokens() {
            return Err(Error::msg(format!(
                "--max-length {max_len} exceeds the model's {} positions",
                self.model.config.max_tokens()
            )));
        }
        let mut out = Vec::with_capacity(texts.len());
        let mut cut = Vec::new();
        for (i, (a, b)) in texts.iter().enumerate() {
            let enc = self.tokenizer.encode_pair(a, *b, max_len)?;
            if enc.full_len > max_len {
                if !truncate {
                    return Err(Error::msg(format!(
                        "input {} has {} tokens, more than the limit of {max_len} (raise --max-length or allow truncation)",
                        i + 1,
                        enc.full_len
                    )));
                }
                cut.push(i);
            }
            out.push(enc);
        }
        Ok((out, cut))
    }

    /// Calls `f` on batches of at most `batch_size` inputs, longest first so that each batch
    /// pads little. `f` gets the original indices of the batch rows.
    pub fn for_each_batch(
        &self,
        inputs: &[EncoderInput],
        batch_size: usize,
        mut f: impl FnMut(&[usize], &EncoderBatch) -> Result<()>,
    ) -> Result<()> {
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].ids.len()));
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<EncoderInput> = chunk.iter().map(|&i| inputs[i].clone()).collect();
            let batch = EncoderBatch::new(&rows, self.tokenizer.pad_id())?;
            f(chunk, &batch)?;
        }
        Ok(())
    }

    /// One pooled vector per input, in input order.
    pub fn embed(
        &self,
        inputs: &[EncoderInput],
        batch_size: usize,
        pooling: Pooling,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); inputs.len()];
        self.for_each_batch(inputs, batch_size, |rows, batch| {
            let hidden = self.model.hidden_states(batch)?;
            let pooled = pooling.apply(&hidden, &batch.mask)?.to_vec2::<f32>()?;
            for (&i, v) in rows.iter().zip(pooled) {
                out[i] = v;
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn require(&self, task: Task, command: &str, needs: &str) -> Result<()> {
        if self.model.task != task {
            let arch = self.model.config.architectures.first().cloned();
            return Err(Error::msg(format!(
                "{command} needs a *{needs} checkpoint; this one is {}",
                arch.unwrap_or_else(|| "a bare encoder (no architectures in config.json)".into())
            )));
        }
        Ok(())
    }

    /// Class probabilities per input (softmax, or sigmoid for multi-label checkpoints).
    pub fn classify(&self, inputs: &[EncoderInput], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        self.require(
            Task::SequenceClassification,
            "classify",
            "ForSequenceClassification",
        )?;
        let mut out = vec![Vec::new(); inputs.len()];
        self.for_each_batch(inputs, batch_size, |rows, batch| {
            let logits = self.model.logits(batch)?;
            let p = bert::probabilities(&logits, self.model.multi_label())?.to_vec2::<f32>()?;
            for (&i, v) in rows.iter().zip(p) {
                out[i] = v;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Relevance of each document to `query`, higher is more relevant, and the tokens read. A
    /// cross-encoder (a sequence classifier with one label, as sentence-transformers'
    /// `CrossEncoder` rerankers are) scores each (query, document) pair with its raw logit; a
    /// bare encoder (an embedding model) scores the cosine similarity of the two embeddings.
    /// Inputs longer than the model's limit are truncated, as both libraries do.
    pub fn rerank(
        &self,
        query: &str,
        docs: &[&str],
        batch_size: usize,
    ) -> Result<(Vec<f32>, usize)> {
        match self.model.task {
            Task::SequenceClassification => {
                let n = self.model.labels.len();
                if n != 1 {
                    return Err(Error::msg(format!(
                        "a reranker (cross-encoder) has one label; this classifier has {n}"
                    )));
                }
                let pairs: Vec<(&str, Option<&str>)> = docs.iter().map(|d| (query, Some(*d))).collect();
                let (inputs, _) = self.prepare(&pairs, self.max_len, true)?;
                let mut out = vec![0f32; inputs.len()];
                self.for_each_batch(&inputs, batch_size, |rows, batch| {
                    let logits = self.model.logits(batch)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
                    for (&i, v) in rows.iter().zip(logits) {
                        out[i] = v[0];
                    }
                    Ok(())
                })?;
                Ok((out, inputs.iter().map(|i| i.ids.len()).sum()))
            }
            Task::Base => {
                let mut texts: Vec<(&str, Option<&str>)> = vec![(query, None)];
                texts.extend(docs.iter().map(|d| (*d, None)));
                let (inputs, _) = self.prepare(&texts, self.max_len, true)?;
                let v = self.embed(&inputs, batch_size, self.pooling)?;
                let norm = |x: &[f32]| x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                let q = &v[0];
                let scores = v[1..]
                    .iter()
                    .map(|d| q.iter().zip(d).map(|(a, b)| a * b).sum::<f32>() / (norm(q) * norm(d)))
                    .collect();
                Ok((scores, inputs.iter().map(|i| i.ids.len()).sum()))
            }
            _ => Err(Error::msg(
                "reranking needs a cross-encoder (a sequence classifier with one label) or an embedding model",
            )),
        }
    }

    /// Per-token label probabilities (`[tokens][labels]`, special tokens included) for
    /// token-classification checkpoints (NER, POS tagging).
    pub fn classify_tokens(
        &self,
        inputs: &[EncoderInput],
        batch_size: usize,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        self.require(
            Task::TokenClassification,
            "token classification",
            "ForTokenClassification",
        )?;
        let mut out = vec![Vec::new(); inputs.len()];
        self.for_each_batch(inputs, batch_size, |rows, batch| {
            let p = bert::probabilities(&self.model.logits(batch)?, self.model.multi_label())?;
            for (r, &i) in rows.iter().enumerate() {
                let len = inputs[i].ids.len();
                out[i] = p.get(r)?.narrow(0, 0, len)?.to_vec2::<f32>()?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The `top_k` most likely tokens at each mask position of `text`, in order of position.
    pub fn fill_mask(&self, text: &str, top_k: usize) -> Result<Vec<Vec<Prediction>>> {
        self.require(Task::MaskedLm, "fill-mask", "ForMaskedLM")?;
        let mask_id = ["[MASK]", "<mask>"]
            .iter()
            .find_map(|t| self.tokenizer.token_to_id(t))
            .ok_or_else(|| {
                Error::file(&self.tokenizer.origin, "the tokenizer has no mask token")
            })?;
        let (inputs, _) = self.prepare(&[(text, None)], self.max_len, false)?;
        let positions: Vec<usize> = (inputs[0].ids.iter().enumerate())
            .filter(|(_, &id)| id == mask_id)
            .map(|(i, _)| i)
            .collect();
        if positions.is_empty() {
            let tok = self.tokenizer.id_to_token(mask_id).unwrap_or_default();
            return Err(Error::msg(format!("the text has no {tok} token to fill")));
        }
        let batch = EncoderBatch::new(&inputs, self.tokenizer.pad_id())?;
        let logits = self.model.logits(&batch)?.squeeze(0)?; // [t, vocab]
        positions
            .iter()
            .map(|&p| {
                let probs =
                    candle_nn::ops::softmax(&logits.get(p)?, D::Minus1)?.to_vec1::<f32>()?;
                let mut idx: Vec<usize> = (0..probs.len()).collect();
                idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                idx.truncate(top_k);
                Ok(idx
                    .into_iter()
                    .map(|i| Prediction {
                        id: i as u32,
                        token: self
                            .tokenizer
                            .decode(&[i as u32], false)
                            .unwrap_or_default(),
                        probability: probs[i],
                    })
                    .collect())
            })
            .collect()
    }
}

/// Cosine similarity of every pair of rows.
pub fn cosine_matrix(vectors: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let norms: Vec<f32> = vectors
        .iter()
        .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12))
        .collect();
    vectors
        .iter()
        .zip(&norms)
        .map(|(a, na)| {
            vectors
                .iter()
                .zip(&norms)
                .map(|(b, nb)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (na * nb))
                .collect()
        })
        .collect()
}
