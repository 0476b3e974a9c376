//! Language-model training on long texts as parallel streams with truncated back-propagation
//! through time, as PyTorch's `word_language_model` does it: the token stream is cut into `b`
//! columns read side by side, consecutive chunks of `bptt` positions are the batches, and a
//! recurrent model starts each chunk from the state the previous chunk ended in (detached).

use std::path::Path;

use super::causal::CausalRun;
use super::lm::CausalBatch;
use super::params::Params;
use super::trainer::{Evaluation, Model};
use super::TrainResult;
use crate::nn::recurrent::State;

/// A token stream in `b` columns of `len` tokens (`batchify`: the tail that does not fill a
/// row is dropped).
#[derive(Debug, Clone)]
pub struct Streams {
    b: usize,
    len: usize,
    ids: Vec<u32>,
}

impl Streams {
    pub fn new(ids: &[u32], b: usize, what: &str) -> TrainResult<Self> {
        let len = ids.len() / b.max(1);
        if b == 0 || len < 2 {
            return Err(crate::Error::Data(format!(
                "{what}: {} tokens cannot fill {b} streams of at least 2 tokens",
                ids.len()
            )));
        }
        Ok(Self {
            b,
            len,
            ids: ids[..b * len].to_vec(),
        })
    }

    /// Chunks of at most `bptt` positions (the last one shorter).
    pub fn chunks(&self, bptt: usize) -> usize {
        (self.len - 1).div_ceil(bptt)
    }

    /// Chunk `i`: positions `i·bptt..` of every stream, each predicting the next token.
    pub fn chunk(&self, i: usize, bptt: usize) -> StreamBatch {
        let start = i * bptt;
        let t = bptt.min(self.len - 1 - start);
        let mut ids = Vec::with_capacity(self.b * t);
        let mut targets = Vec::with_capacity(self.b * t);
        for s in 0..self.b {
            let col = &self.ids[s * self.len..][..self.len];
            ids.extend_from_slice(&col[start..start + t]);
            targets.extend(col[start + 1..start + 1 + t].iter().map(|&x| Some(x)));
        }
        StreamBatch {
            index: i,
            batch: CausalBatch {
                ids,
                targets,
                lengths: vec![t; self.b],
                t,
            },
        }
    }

    /// Every chunk, in order.
    pub fn batches(&self, bptt: usize) -> Vec<StreamBatch> {
        (0..self.chunks(bptt))
            .map(|i| self.chunk(i, bptt))
            .collect()
    }
}

/// One chunk and its place in the streams.
#[derive(Debug, Clone)]
pub struct StreamBatch {
    pub index: usize,
    pub batch: CausalBatch,
}

/// A causal model trained on streams: a recurrent model's state is carried from chunk `i` to
/// chunk `i + 1` (a transformer's chunks are independent windows).
pub struct StreamRun {
    pub run: CausalRun,
    carried: Vec<Option<State>>,
    last: Option<usize>,
}

impl StreamRun {
    pub fn new(run: CausalRun) -> Self {
        Self {
            run,
            carried: Vec::new(),
            last: None,
        }
    }
}

impl Model for StreamRun {
    type Batch = StreamBatch;

    fn params(&self) -> &Params {
        &self.run.model.params
    }

    fn params_mut(&mut self) -> &mut Params {
        &mut self.run.model.params
    }

    fn forward_backward(&mut self, b: &StreamBatch, accum: usize) -> TrainResult<f64> {
        // A new epoch (or a resumed run) starts its streams from zeros.
        let follows = b.index > 0 && self.last == Some(b.index - 1);
        let states = if follows {
            std::mem::take(&mut self.carried)
        } else {
            Vec::new()
        };
        let (loss, states) = self
            .run
            .model
            .forward_backward_with(&b.batch, accum, states)?;
        self.carried = states;
        self.last = Some(b.index);
        Ok(loss)
    }

    fn evaluate(&self, batches: &[StreamBatch], done: &dyn Fn(usize)) -> TrainResult<Evaluation> {
        let mut states = Vec::new();
        Evaluation::mean_token_loss(batches, done, |b| {
            let (s, c, next) = self
                .run
                .model
                .loss_sum_with(&b.batch, std::mem::take(&mut states))?;
            states = next;
            Ok((s, c))
        })
    }

    fn tokens(b: &StreamBatch) -> usize {
        b.batch.lengths.iter().sum()
    }

    fn save(&self, dir: &Path) -> TrainResult<()> {
        self.run.save(dir)
    }

    /// The carried states (`state.{slot}.h`, `.c`) and the chunk they follow (`state.last`).
    fn extra_state(&self) -> super::checkpoint::Extra {
        let Some(last) = self.last else {
            return Vec::new();
        };
        let mut out = vec![("state.last".to_string(), vec![1], vec![last as f32])];
        for (k, st) in self.carried.iter().enumerate() {
            let Some(st) = st else { continue };
            out.push((format!("state.{k}.h"), vec![st.h.len()], st.h.clone()));
            if !st.c.is_empty() {
                out.push((format!("state.{k}.c"), vec![st.c.len()], st.c.clone()));
            }
        }
        out
    }

    fn restore_extra(
        &mut self,
        mut saved: std::collections::HashMap<String, crate::io::write::F32Tensor>,
    ) -> TrainResult<()> {
        let Some((_, last)) = saved.remove("state.last") else {
            return Ok(());
        };
        self.last = last.first().map(|&x| x as usize);
        self.carried = (0..)
            .map_while(|k| {
                let (_, h) = saved.remove(&format!("state.{k}.h"))?;
                let c = saved
                    .remove(&format!("state.{k}.c"))
                    .map(|(_, c)| c)
                    .unwrap_or_default();
                Some(Some(State { h, c }))
            })
            .collect();
        Ok(())
    }

    fn begin_step(&mut self, step: usize) {
        // New dropout masks every epoch, and the same ones in a resumed run.
        self.run.model.salt = step as u64 + 1;
    }
}
