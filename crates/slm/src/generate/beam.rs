//! Beam search as transformers' `generate(num_beams=N)` runs it (`BeamSearchScorer`,
//! `BeamHypotheses`), so the same weights give the same sequences and scores: log-softmax
//! scores, the best `2·N` candidates of all beams, finished hypotheses scored by
//! `sum_logprobs / generated_len^length_penalty`, and its three stopping rules.
//!
//! The model is a step function over per-beam caches, so causal and encoder-decoder models
//! share it: a cache is cloned when a beam splits (the cross-attention keys of a source are
//! shared, not copied).

use crate::error::Result;
use crate::models::SeqCache;

/// When a beam search may stop before the maximum length (`early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False`: once no running beam can beat the worst kept hypothesis, by transformers'
    /// estimate from the current length.
    #[default]
    Heuristic,
    /// `True`: as soon as `num_beams` hypotheses are finished.
    Finished,
    /// `"never"`: only when no running beam could beat them at any length.
    Never,
}

#[derive(Debug, Clone)]
pub struct BeamOptions {
    pub beams: usize,
    pub max_new_tokens: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Never repeat an n-gram of this size (0: off), prompt included.
    pub no_repeat_ngram: usize,
    /// How many of the best hypotheses to return (at most `beams`).
    pub num_return: usize,
    pub eos: Option<u32>,
    /// The token the last position the length limit allows must be (transformers'
    /// `forced_eos_token_id`).
    pub forced_eos: Option<u32>,
}

impl Default for BeamOptions {
    fn default() -> Self {
        Self {
            beams: 4,
            max_new_tokens: 64,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            no_repeat_ngram: 0,
            num_return: 1,
            eos: None,
            forced_eos: None,
        }
    }
}

/// A finished sequence: its tokens after the prompt (without the EOS it ended with) and its
/// length-penalised score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
    /// It ended with the EOS token (not at the length limit or a stop).
    pub eos: bool,
}

/// The kept hypotheses (transformers' `BeamHypotheses`), in the order they were added.
struct Kept {
    beams: usize,
    length_penalty: f64,
    early: EarlyStopping,
    max_length: usize,
    hyps: Vec<(f64, Vec<u32>, bool)>,
    worst: f64,
}

impl Kept {
    fn add(&mut self, seq: Vec<u32>, sum_logprobs: f64, generated: usize, eos: bool) {
        let score = sum_logprobs / (generated as f64).powf(self.length_penalty);
        if self.hyps.len() < self.beams || score > self.worst {
            self.hyps.push((score, seq, eos));
            if self.hyps.len() > self.beams {
                let mut order: Vec<(f64, usize)> = self
                    .hyps
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (h.0, i))
                    .collect();
                order.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                self.hyps.remove(order[0].1);
                self.worst = order[1].0;
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    fn is_done(&self, best: f64, cur_len: usize, prompt_len: usize) -> bool {
        if self.hyps.len() < self.beams {
            return false;
        }
        let at = |len: usize| best / ((len - prompt_len) as f64).powf(self.length_penalty);
        match self.early {
            EarlyStopping::Finished => true,
            EarlyStopping::Heuristic => self.worst >= at(cur_len),
            EarlyStopping::Never if self.length_penalty > 0.0 => self.worst >= at(self.max_length),
            EarlyStopping::Never => self.worst >= at(cur_len),
        }
    }
}

/// Beam search after `prompt` (a causal model's prompt, or a decoder's start token), whose
/// last position gave `logits` with the model state `cache`. `step` runs one token per beam
/// over the beams' caches and returns each beam's next logits. Returns the best
/// `num_return` hypotheses, best first.
pub fn beam_search<C: Clone>(
    prompt: &[u32],
    cache: C,
    logits: Vec<f32>,
    opts: &BeamOptions,
    mut step: impl FnMut(&mut [C], &[u32]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Hypothesis>> {
    let nb = opts.beams.max(1);
    let vocab = logits.len();
    let prompt_len = prompt.len();
    let max_length = prompt_len + opts.max_new_tokens;
    let mut seqs = vec![prompt.to_vec(); nb];
    let mut caches = vec![cache; nb];
    let mut logits = vec![logits; nb];
    // Every beam starts as the same sequence: only the first may be extended at first.
    let mut beam_scores = vec![-1e9f32; nb];
    beam_scores[0] = 0.0;
    let mut kept = Kept {
        beams: nb,
        length_penalty: opts.length_penalty,
        early: opts.early_stopping,
        max_length,
        hyps: Vec::new(),
        worst: 1e9,
    };
    if opts.max_new_tokens == 0 {
        return Ok(vec![Hypothesis {
            tokens: Vec::new(),
            score: 0.0,
            eos: false,
        }]);
    }
    let keep = 2 * nb;
    let done = loop {
        let mut cand: Vec<(f32, usize)> = Vec::with_capacity(nb * vocab);
        for (b, l) in logits.iter().enumerate() {
            let mut lp = log_softmax(l);
            for t in banned(&seqs[b], opts.no_repeat_ngram) {
                lp[t as usize] = f32::NEG_INFINITY;
            }
            if let Some(e) = opts.forced_eos.filter(|_| seqs[b].len() + 1 == max_length) {
                force(&mut lp, e);
            }
            cand.extend(
                lp.iter()
                    .enumerate()
                    .map(|(v, &s)| (s + beam_scores[b], b * vocab + v)),
            );
        }
        let k = keep.min(cand.len());
        cand.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        cand.truncate(k);
        cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let cur_len = seqs[0].len() + 1;
        let mut next: Vec<(f32, u32, usize)> = Vec::with_capacity(nb);
        for (rank, &(score, flat)) in cand.iter().enumerate() {
            let (b, tok) = (flat / vocab, (flat % vocab) as u32);
            if Some(tok) == opts.eos {
                if rank < nb {
                    kept.add(seqs[b].clone(), score as f64, cur_len - prompt_len, true);
                }
            } else {
                next.push((score, tok, b));
            }
            if next.len() == nb {
                break;
            }
        }
        let done = kept.is_done(cand[0].0 as f64, cur_len, prompt_len);
        seqs = next
            .iter()
            .map(|&(_, t, b)| {
                let mut s = seqs[b].clone();
                s.push(t);
                s
            })
            .collect();
        caches = next.iter().map(|&(_, _, b)| caches[b].clone()).collect();
        beam_scores = next.iter().map(|n| n.0).collect();
        if done || seqs[0].len() >= max_length {
            break done;
        }
        let last: Vec<u32> = next.iter().map(|n| n.1).collect();
        logits = step(&mut caches, &last)?;
    };
    if !done {
        for (s, &score) in seqs.iter().zip(&beam_scores) {
            kept.add(s.clone(), score as f64, s.len() - prompt_len, false);
        }
    }
    // transformers sorts by score (stably) and pops the best.
    let mut hyps = kept.hyps;
    hyps.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    let n = opts.num_return.clamp(1, nb);
    Ok(hyps
        .into_iter()
        .rev()
        .take(n)
        .map(|(score, seq, eos)| Hypothesis {
            tokens: seq[prompt_len..].to_vec(),
            score,
            eos,
        })
        .collect())
}

/// `log_softmax` in f32, as torch computes it.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let lse = sum.ln();
    logits.iter().map(|&l| l - max - lse).collect()
}

/// The tokens that would repeat an n-gram of `seq` (`NoRepeatNGramLogitsProcessor`).
pub fn banned(seq: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || seq.len() + 1 < n {
        return Vec::new();
    }
    let tail = &seq[seq.len() + 1 - n..];
    seq.windows(n)
        .filter(|w| &w[..n - 1] == tail)
        .map(|w| w[n - 1])
        .collect()
}

/// Each beam's one new token over its cache, as rows of `[n, vocab]`.
fn rows(t: candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// Each beam's cache with its one new token, as a batched forward pass takes them.
fn one_each<'a>(caches: &'a mut [SeqCache], last: &'a [u32]) -> Vec<(&'a mut SeqCache, &'a [u32])> {
    caches
        .iter_mut()
        .zip(last)
        .map(|(c, t)| (c, std::slice::from_ref(t)))
        .collect()
}

/// Beam search of a causal model after `prompt`.
pub fn causal(
    model: &dyn crate::models::CausalLM,
    prompt: &[u32],
    opts: &BeamOptions,
) -> Result<Vec<Hypothesis>> {
    if prompt.is_empty() {
        return Err(crate::error::Error::msg(
            "an empty prompt: nothing to continue",
        ));
    }
    crate::models::check_context(prompt.len() + opts.max_new_tokens, model.context_length())?;
    let mut cache = model.new_cache();
    let first = rows(model.forward_batch(&mut [(&mut cache, prompt)])?)?.remove(0);
    beam_search(prompt, cache, first, opts, |caches, last| {
        let mut seqs = one_each(caches, last);
        rows(model.forward_batch(&mut seqs)?)
    })
}

/// Beam search of an encoder-decoder's output for `source`.
pub fn seq2seq(
    model: &dyn crate::models::seq2seq::Seq2SeqLM,
    source: &[u32],
    opts: &BeamOptions,
) -> Result<Vec<Hypothesis>> {
    let memory = model.encode(&[source])?.remove(0);
    seq2seq_over(model, &memory, opts)
}

/// Beam search of an encoder-decoder's output over the encoder states `memory` of one source.
pub fn seq2seq_over(
    model: &dyn crate::models::seq2seq::Seq2SeqLM,
    memory: &candle_core::Tensor,
    opts: &BeamOptions,
) -> Result<Vec<Hypothesis>> {
    let start = [model.decoder_start()];
    let mut cache = model.new_cache();
    let first = rows(model.decode(&mut [(&mut cache, &start)], Some(memory), false)?)?.remove(0);
    let opts = &BeamOptions {
        forced_eos: opts.forced_eos.or(model.forced_eos()),
        ..opts.clone()
    };
    beam_search(&start, cache, first, opts, |caches, last| {
        let mut seqs = one_each(caches, last);
        rows(model.decode(&mut seqs, None, false)?)
    })
}

/// Every score but `token`'s made impossible and `token`'s 0, as transformers' forced EOS
/// processor does.
pub fn force(scores: &mut [f32], token: u32) {
    scores.fill(f32::NEG_INFINITY);
    if let Some(s) = scores.get_mut(token as usize) {
        *s = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_tokens_complete_a_seen_ngram() {
        assert_eq!(banned(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert_eq!(banned(&[1, 2, 3, 1], 2), vec![2]);
        assert!(banned(&[1, 2], 3).is_empty());
        assert!(banned(&[5, 5, 5], 0).is_empty());
        // A unigram ban forbids every token seen.
        assert_eq!(banned(&[4, 7], 1), vec![4, 7]);
    }
}
