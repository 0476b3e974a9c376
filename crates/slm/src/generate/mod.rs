//! Text generation: a session that reuses the KV cache across turns, sampling, stop strings and
//! streaming UTF-8 output.

pub mod sampling;
pub mod stream;

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::models::CausalLM;
use crate::tokenize::Tokenizer;

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
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        let mut stream = TextStream::new();
        let mut stops = StopMatcher::new(&opts.stop);
        let mut stop = StopReason::MaxTokens;
        let cancelled = || {
            opts.cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        while out.len() < opts.max_tokens {
            if cancelled() {
                stop = StopReason::Cancelled;
                break;
            }
            let id = sampler.sample(&mut logits, &history);
            history.push(id);
            out.push(id);
            if !opts.ignore_eos && tok.is_eos(id) {
                stop = StopReason::Eos;
                break;
            }
            if let Some(text) = stream.push(tok, id)? {
                let (emit, hit) = stops.push(&text);
                if !emit.is_empty() {
                    on_text(&emit)?;
                }
                if hit {
                    stop = StopReason::StopString;
                    break;
                }
            }
            if out.len() == opts.max_tokens {
                break;
            }
            if self.cached.len() >= context {
                stop = StopReason::ContextFull;
                break;
            }
            logits = self.feed(&[id])?;
        }
        if stop != StopReason::StopString {
            let mut rest = stream.finish(tok)?.unwrap_or_default();
            if stop != StopReason::Eos || !rest.is_empty() {
                let (emit, _) = stops.push(&rest);
                rest = emit + &stops.flush();
            }
            if !rest.is_empty() {
                on_text(&rest)?;
            }
        }
        // The last sampled token has not been run through the model; the cache ends before it.
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
struct StopMatcher<'s> {
    stops: &'s [String],
    pending: String,
}

impl<'s> StopMatcher<'s> {
    fn new(stops: &'s [String]) -> Self {
        Self {
            stops,
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
        for s in self.stops {
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
