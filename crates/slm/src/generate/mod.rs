//! Text generation: a session that reuses the KV cache across turns, sampling, stop strings and
//! streaming UTF-8 output.

pub mod beam;
pub mod constrain;
pub mod sampling;
pub mod seq2seq;
pub mod stream;

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::models::CausalLM;
use crate::tokenize::Tokenizer;

pub use constrain::{Constraint, Grammars};
pub use sampling::{Sampler, SamplingParams};
pub use stream::TextStream;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Set from elsewhere (a Ctrl-C handler) to end the generation after the current token.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Report each chosen token's log-probability and this many most likely alternatives
    /// (OpenAI's `logprobs` / `top_logprobs`).
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            cancel: None,
            logprobs: None,
        }
    }
}

/// A token's log-probability under the model (before sampling options reshape it), with the
/// most likely alternatives at that step.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one sampled token gives: the text that may be shown now (held back while it could be
/// the start of a stop string), and the reason when the sequence is over.
#[derive(Debug, Clone)]
pub struct Step {
    pub id: u32,
    pub text: String,
    pub stop: Option<StopReason>,
    pub logprob: Option<TokenLogprob>,
}

/// One sequence's decoding state between forward passes: sampler, streamed text and stop
/// strings. [`Session::generate`] drives one over its own cache; a server drives many, one
/// batched forward pass per step.
pub struct Generation {
    sampler: Sampler,
    history: Vec<u32>,
    prompt_len: usize,
    context: usize,
    stream: TextStream,
    stops: StopMatcher,
    max_tokens: usize,
    ignore_eos: bool,
    logprobs: Option<usize>,
    constraint: Option<Constraint>,
}

impl Generation {
    /// Starts after `prompt` on a model with `context` positions.
    pub fn new(prompt: &[u32], opts: &GenerateOptions, context: usize) -> Self {
        Self {
            sampler: Sampler::new(opts.sampling.clone()),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            context,
            stream: TextStream::new(),
            stops: StopMatcher::new(&opts.stop),
            max_tokens: opts.max_tokens,
            ignore_eos: opts.ignore_eos,
            logprobs: opts.logprobs,
            constraint: None,
        }
    }

    /// Every token from here on must keep the output valid under `c`.
    pub fn constrain(&mut self, c: Constraint) {
        self.constraint = Some(c);
    }

    /// The tokens generated so far (a stop string's tokens included).
    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Picks the next token from the logits of the last position. When `stop` is set, the
    /// sequence is over and `text` ends with whatever was held back.
    pub fn step(&mut self, tok: &Tokenizer, logits: &mut [f32]) -> Result<Step> {
        let logprobs = self.logprobs.map(|n| log_softmax_top(logits, n));
        if let Some(c) = &mut self.constraint {
            c.mask(logits)?;
        }
        let id = self.sampler.sample(logits, &self.history);
        self.history.push(id);
        let logprob = logprobs.map(|(lp, top)| TokenLogprob {
            id,
            logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
            top,
        });
        let mut step = Step {
            id,
            text: String::new(),
            stop: None,
            logprob,
        };
        if tok.is_eos(id) && (!self.ignore_eos || self.constraint.is_some()) {
            step.text = self.finish(tok, StopReason::Eos)?;
            step.stop = Some(StopReason::Eos);
            return Ok(step);
        }
        if let Some(c) = &mut self.constraint {
            c.accept(id)?;
        }
        if let Some(text) = self.stream.push(tok, id)? {
            let (emit, hit) = self.stops.push(&text);
            step.text = emit;
            if hit {
                step.stop = Some(StopReason::StopString);
                return Ok(step);
            }
        }
        let generated = self.history.len() - self.prompt_len;
        // The cache holds every token but this last one, which the next pass would run.
        let reason = if generated >= self.max_tokens {
            Some(StopReason::MaxTokens)
        } else if self.history.len() > self.context {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if let Some(r) = reason {
            step.text += &self.finish(tok, r)?;
            step.stop = Some(r);
        }
        Ok(step)
    }

    /// Ends the sequence early (cancelled): the text still held back.
    pub fn cancel(&mut self, tok: &Tokenizer) -> Result<String> {
        self.finish(tok, StopReason::Cancelled)
    }

    fn finish(&mut self, tok: &Tokenizer, stop: StopReason) -> Result<String> {
        let mut rest = self.stream.finish(tok)?.unwrap_or_default();
        if stop != StopReason::Eos || !rest.is_empty() {
            let (emit, _) = self.stops.push(&rest);
            rest = emit + &self.stops.flush();
        }
        Ok(rest)
    }
}

/// Log-probabilities of every token, and the `n` most likely as `(id, logprob)`.
fn log_softmax_top(logits: &[f32], n: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let lp: Vec<f32> = logits.iter().map(|&l| l - lse).collect();
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let n = n.min(idx.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    }
    idx.truncate(n);
    idx.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    let top = idx.into_iter().map(|i| (i, lp[i as usize])).collect();
    (lp, top)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopString,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the cache).
    pub prefill_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop: StopReason,
}

/// A model plus the token ids its KV cache currently holds.
pub struct Session<'a> {
    pub model: &'a mut dyn CausalLM,
    cached: Vec<u32>,
}

impl<'a> Session<'a> {
    pub fn new(model: &'a mut dyn CausalLM) -> Self {
        model.clear_cache();
        Self {
            model,
            cached: Vec::new(),
        }
    }

    /// Runs `ids` after what is cached, returning the last position's logits.
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let logits = self.model.forward(ids, self.cached.len(), false)?;
        self.cached.extend_from_slice(ids);
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Brings the cache to `prompt`, reusing the longest cached prefix; returns the logits of
    /// the last prompt position and how many tokens were run.
    fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        if common < self.cached.len() || common == prompt.len() {
            // The cache cannot be truncated, and at least one token must run to get logits.
            self.model.clear_cache();
            self.cached.clear();
            return Ok((self.feed(prompt)?, prompt.len()));
        }
        Ok((self.feed(&prompt[common..])?, prompt.len() - common))
    }

    /// Generates a continuation of `prompt`, streaming text through `on_text`. Returns the
    /// generated ids (the stop string's tokens included) and timings.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(Vec<u32>, GenerateStats)> {
        self.generate_with(tok, prompt, opts, None, on_text)
    }

    /// [`Session::generate`] with every token held to `constraint` (a JSON schema).
    pub fn generate_with(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        constraint: Option<Constraint>,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(Vec<u32>, GenerateStats)> {
        let context = self.model.context_length();
        if prompt.is_empty() {
            return Err(Error::msg(
                "the prompt is empty (it has no tokens); give some text to continue",
            ));
        }
        if prompt.len() > context {
            return Err(Error::ContextOverflow {
                tokens: prompt.len(),
                context,
            });
        }
        let t0 = Instant::now();
        let (mut logits, prefill_tokens) = self.prefill(prompt)?;
        let prefill_time = t0.elapsed();
        let t1 = Instant::now();
        let mut gen = Generation::new(prompt, opts, context);
        if let Some(c) = constraint {
            gen.constrain(c);
        }
        let cancelled = || {
            opts.cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        let stop = loop {
            if opts.max_tokens == 0 {
                break StopReason::MaxTokens;
            }
            if cancelled() {
                let rest = gen.cancel(tok)?;
                if !rest.is_empty() {
                    on_text(&rest)?;
                }
                break StopReason::Cancelled;
            }
            let step = gen.step(tok, &mut logits)?;
            if !step.text.is_empty() {
                on_text(&step.text)?;
            }
            if let Some(stop) = step.stop {
                break stop;
            }
            logits = self.feed(&[step.id])?;
        };
        // The last sampled token has not been run through the model; the cache ends before it.
        let out = gen.generated().to_vec();
        let stats = GenerateStats {
            prompt_tokens: prompt.len(),
            prefill_tokens,
            generated_tokens: out.len(),
            prefill_time,
            decode_time: t1.elapsed(),
            stop,
        };
        Ok((out, stats))
    }
}

/// Holds back text that might be the start of a stop string, and cuts at the first full match.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            pending: String::new(),
        }
    }

    /// Returns the text that is safe to show, and whether a stop string was found.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // Longest suffix of pending that is a proper prefix of a stop string stays pending.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let suffix = &self.pending[i..];
                if s.starts_with(suffix) {
                    hold = hold.max(suffix.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (emit, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let stops = vec!["\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("Hello"), ("Hello".to_string(), false));
        assert_eq!(m.push(" there\nUs"), (" there".to_string(), false));
        assert_eq!(m.push("er: more"), (String::new(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("a\nU"), ("a".to_string(), false));
        assert_eq!(m.push("nicorn"), ("\nUnicorn".to_string(), false));
    }
}
