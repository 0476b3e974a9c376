//! The decoding engine of one causal model: a thread that owns the model and up to `parallel`
//! slots, each a sequence with its own KV cache. Every step runs all active slots in one
//! batched forward pass (a decode row each, or the next chunk of a new prompt), so the
//! weights are read once per step for every stream; a new request joins between steps
//! (continuous batching). A finished slot keeps its cache, and the next request whose prompt
//! shares its prefix starts from there.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use slm::generate::{Constraint, GenerateOptions, Generation, StopReason, TokenLogprob};
use slm::models::{CausalLM, SeqCache};
use slm::tokenize::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// A prompt runs at most this many tokens per step (llama.cpp's default micro-batch), so the
/// streams decoding beside it wait one chunk, not the whole prompt.
const PREFILL_CHUNK: usize = 512;

/// What a request hears back, in order: tokens, then `Done` (or `Failed`).
#[derive(Debug)]
pub enum Event {
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(Finished),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: StopReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from a slot's cache.
    pub cached_tokens: usize,
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    /// Start from a slot's cached prefix of the prompt. The prompt's last rows then run in a
    /// smaller pass than they would alone, on the other kernel path, so greedy answers can
    /// differ in the last digits from an uncached run (as llama.cpp's `cache_prompt` warns).
    pub reuse_prefix: bool,
    /// The JSON schema the output must follow (`response_format`).
    pub constraint: Option<Constraint>,
}

/// Why a job was not taken.
#[derive(Debug)]
pub enum Refused {
    /// Every slot is busy and the queue is full.
    Busy { running: usize, queued: usize },
    /// The engine thread is gone (it failed or the server is stopping).
    Stopped,
}

/// The handle requests use; the engine thread ends when every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    /// Jobs taken and not finished: running plus queued.
    load: Arc<AtomicUsize>,
    parallel: usize,
    queue: usize,
    pub context: usize,
}

impl Engine {
    /// Starts the engine thread. `context` caps each sequence's positions (`--ctx-size`).
    pub fn start(
        model: Box<dyn CausalLM>,
        tok: Arc<Tokenizer>,
        parallel: usize,
        queue: usize,
        context: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model,
            tok,
            slots: Vec::new(),
            parallel: parallel.max(1),
            context,
            load: load.clone(),
            metrics,
        };
        // The loop runs on a worker of its own pool (as the CLI's commands do), so the
        // kernels' parallel parts start without waking a thread and blocking this one.
        let threads = rayon::current_num_threads();
        std::thread::Builder::new()
            .name("slm-engine".into())
            .spawn(
                move || match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                    Ok(pool) => pool.install(|| worker.run(rx)),
                    Err(_) => worker.run(rx),
                },
            )
            .expect("spawning the engine thread");
        Self {
            tx,
            load,
            parallel: parallel.max(1),
            queue,
            context,
        }
    }

    /// Takes a job, or refuses it when `parallel` run and `queue` wait already.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let limit = self.parallel + self.queue;
        let taken = self
            .load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            });
        if let Err(n) = taken {
            return Err(Refused::Busy {
                running: n.min(self.parallel),
                queued: n.saturating_sub(self.parallel),
            });
        }
        self.tx.send(job).map_err(|_| {
            self.load.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }

    /// Jobs waiting for a slot.
    pub fn queued(&self) -> usize {
        self.load
            .load(Ordering::SeqCst)
            .saturating_sub(self.parallel)
    }

    pub fn running(&self) -> usize {
        self.load.load(Ordering::SeqCst).min(self.parallel)
    }
}

/// A sequence in a slot: its generation state and the tokens still to run.
struct Active {
    job: Job,
    gen: Generation,
    /// Ids to run next: the rest of the prompt, then each sampled token.
    pending: Vec<u32>,
    cached_tokens: usize,
}

struct Slot {
    cache: SeqCache,
    /// The ids the cache holds, in order.
    ids: Vec<u32>,
    active: Option<Active>,
}

struct Worker {
    model: Box<dyn CausalLM>,
    tok: Arc<Tokenizer>,
    slots: Vec<Slot>,
    parallel: usize,
    context: usize,
    load: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Blocks only when nothing runs; otherwise takes what arrived since the last step.
            loop {
                let active = self.slots.iter().filter(|s| s.active.is_some()).count();
                if active >= self.parallel {
                    break;
                }
                let next = if active == 0 {
                    match rx.recv() {
                        Ok(j) => Some(j),
                        Err(_) => return,
                    }
                } else {
                    rx.try_recv().ok()
                };
                match next {
                    Some(job) => self.admit(job),
                    None => break,
                }
            }
            let active = self.slots.iter().filter(|s| s.active.is_some()).count();
            self.metrics.active.store(active, Ordering::Relaxed);
            self.step();
            let active = self.slots.iter().filter(|s| s.active.is_some()).count();
            self.metrics.active.store(active, Ordering::Relaxed);
        }
    }

    /// Puts a job in the free slot whose cache shares the longest prefix with its prompt.
    fn admit(&mut self, mut job: Job) {
        let common = |s: &Slot| {
            s.ids
                .iter()
                .zip(&job.prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .max_by_key(|(_, s)| common(s))
            .map(|(i, _)| i);
        let i = match best {
            Some(i) if self.slots.len() >= self.parallel || common(&self.slots[i]) > 0 => i,
            _ => {
                self.slots.push(Slot {
                    cache: self.model.new_cache(),
                    ids: Vec::new(),
                    active: None,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[i];
        // At least one prompt token must run to give the logits of the next.
        let keep = if job.reuse_prefix {
            common(slot).min(job.prompt.len().saturating_sub(1))
        } else {
            0
        };
        let keep = slot.cache.truncate(keep);
        slot.ids.truncate(keep);
        let mut gen = Generation::new(&job.prompt, &job.opts, self.context);
        if let Some(c) = job.constraint.take() {
            gen.constrain(c);
        }
        slot.active = Some(Active {
            pending: job.prompt[keep..].to_vec(),
            gen,
            job,
            cached_tokens: keep,
        });
    }

    /// Frees the slots of clients that went away, then runs every active slot once: decode
    /// rows and short prompts share a pass while it stays under the model's uniform-row bound
    /// (so each row computes exactly what it would alone); a long prompt chunk, or one that does
    /// not fit beside them, runs in a pass of its own.
    fn step(&mut self) {
        for slot in &mut self.slots {
            if slot
                .active
                .as_ref()
                .is_some_and(|a| a.job.events.is_closed())
            {
                slot.active = None;
                self.load.fetch_sub(1, Ordering::SeqCst);
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        let limit = self.model.uniform_rows().max(2);
        let mut want: Vec<(usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.active
                    .as_ref()
                    .map(|a| (i, a.pending.len().min(PREFILL_CHUNK)))
            })
            .collect();
        // Decode rows first: a stream never waits behind prompts.
        want.sort_by_key(|&(i, n)| (n > 1, i));
        let mut passes: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut shared: Vec<(usize, usize)> = Vec::new();
        let mut rows = 0;
        for (i, n) in want {
            if n >= limit {
                passes.push(vec![(i, n)]);
            } else if rows + n < limit {
                shared.push((i, n));
                rows += n;
            } else if n == 1 {
                // More decode rows than one uniform pass holds: another pass.
                passes.push(std::mem::take(&mut shared));
                shared.push((i, n));
                rows = 1;
            } else {
                // A prompt that does not fit beside the decode rows runs alone rather than
                // wait for them to finish.
                passes.push(vec![(i, n)]);
            }
        }
        if !shared.is_empty() {
            passes.push(shared);
        }
        for mut pass in passes {
            pass.sort_unstable();
            self.run_pass(&pass);
        }
    }

    /// One forward pass over `runs` (slot index, rows), in slot order; then a token for each
    /// slot that finished its prompt.
    fn run_pass(&mut self, runs: &[(usize, usize)]) {
        let ids: Vec<Vec<u32>> = runs
            .iter()
            .map(|&(i, n)| {
                self.slots[i]
                    .active
                    .as_ref()
                    .map_or(Vec::new(), |a| a.pending[..n].to_vec())
            })
            .collect();
        let result = {
            let mut seqs: Vec<(&mut SeqCache, &[u32])> = self
                .slots
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| runs.iter().any(|r| r.0 == *i))
                .zip(&ids)
                .map(|((_, s), ids)| (&mut s.cache, ids.as_slice()))
                .collect();
            // A panic in a kernel fails this pass's requests, not the engine: the slots it
            // touched are reset below and the other requests go on.
            let model = &self.model;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model.forward_batch(&mut seqs)
            }))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                Err(slm::Error::msg(format!(
                    "internal error in the forward pass: {what}"
                )))
            })
        };
        let logits = match result.and_then(|t| Ok(t.to_vec2::<f32>()?)) {
            Ok(l) => l,
            Err(e) => {
                // The caches may hold part of the pass: every sequence in it ends, and the
                // slots start empty.
                for &(i, _) in runs {
                    let slot = &mut self.slots[i];
                    if let Some(a) = slot.active.take() {
                        let _ = a.job.events.send(Event::Failed(e.to_string()));
                        self.load.fetch_sub(1, Ordering::SeqCst);
                    }
                    slot.cache.truncate(0);
                    slot.ids.clear();
                }
                return;
            }
        };
        let decoded = runs.iter().filter(|&&(_, n)| n == 1).count();
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .batched_rows
            .fetch_add(decoded, Ordering::Relaxed);
        for ((&(i, n), mut row), ran) in runs.iter().zip(logits).zip(ids) {
            let slot = &mut self.slots[i];
            slot.ids.extend_from_slice(&ran);
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            a.pending.drain(..n);
            if !a.pending.is_empty() {
                continue;
            }
            let done = match a.gen.step(&self.tok, &mut row) {
                Ok(step) => {
                    if a.gen.generated().len() == 1 {
                        self.metrics
                            .ttft
                            .observe(a.job.arrived.elapsed().as_secs_f64());
                    }
                    self.metrics
                        .completion_tokens
                        .fetch_add(1, Ordering::Relaxed);
                    let event = Event::Token {
                        text: step.text,
                        logprob: step.logprob,
                    };
                    let gone = a.job.events.send(event).is_err();
                    match (step.stop, gone) {
                        (Some(reason), _) => Some(Ok(reason)),
                        (None, true) => Some(Err(None)),
                        (None, false) => {
                            a.pending.push(step.id);
                            None
                        }
                    }
                }
                Err(e) => Some(Err(Some(e.to_string()))),
            };
            let Some(done) = done else {
                continue;
            };
            let Some(a) = slot.active.take() else {
                continue;
            };
            self.load.fetch_sub(1, Ordering::SeqCst);
            let _ = match done {
                Ok(reason) => a.job.events.send(Event::Done(Finished {
                    reason,
                    prompt_tokens: a.job.prompt.len(),
                    completion_tokens: a.gen.generated().len(),
                    cached_tokens: a.cached_tokens,
                })),
                Err(Some(msg)) => a.job.events.send(Event::Failed(msg)),
                Err(None) => {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            };
        }
    }
}
