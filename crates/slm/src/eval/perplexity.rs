//! Perplexity with transformers' sliding-window method: windows of `max_length` tokens starting
//! every `stride` tokens, each token scored once, by the first window that has it as a target, with
//! as much preceding context as that window holds.

use crate::error::{Error, Result};
use crate::models::CausalLM;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub max_length: usize,
    pub stride: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Targets scored: every token but the first when windows overlap (with disjoint windows,
    /// as in transformers, each window's first token is not scored).
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    pub windows: usize,
}

impl Perplexity {
    pub fn perplexity(&self) -> f64 {
        self.mean_nll.exp()
    }
}

/// The windows as `(begin, end, first_scored)`: positions `first_scored..end` of the text are
/// targets in window `begin..end` (never position `begin`, which has no context in the window).
pub fn windows(n: usize, opts: Options) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + opts.max_length).min(n);
        let first = prev_end.max(begin + 1);
        if first < end {
            out.push((begin, end, first));
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += opts.stride;
    }
    out
}

fn check(model: &dyn CausalLM, ids: &[u32], opts: Options) -> Result<()> {
    if ids.len() < 2 {
        return Err(Error::msg(
            "the text has fewer than 2 tokens: nothing to score",
        ));
    }
    if opts.stride == 0 || opts.stride > opts.max_length {
        return Err(Error::msg(format!(
            "--stride must be between 1 and --max-length ({}), got {}",
            opts.max_length, opts.stride
        )));
    }
    if opts.max_length > model.context_length() {
        return Err(Error::msg(format!(
            "--max-length {} exceeds the model's context of {} tokens",
            opts.max_length,
            model.context_length()
        )));
    }
    Ok(())
}

/// Runs each model over every window and calls `score(target, rows)` for each scored target,
/// with each model's logits row that predicts it.
pub(crate) fn for_each_target(
    models: &mut [&mut dyn CausalLM],
    ids: &[u32],
    opts: Options,
    mut score: impl FnMut(usize, &[&[f32]]),
    mut progress: impl FnMut(usize, usize),
) -> Result<usize> {
    for m in models.iter() {
        check(&**m, ids, opts)?;
    }
    let wins = windows(ids.len(), opts);
    for (w, &(begin, end, first)) in wins.iter().enumerate() {
        let logits = models
            .iter_mut()
            .map(|m| {
                m.clear_cache();
                Ok(m.forward(&ids[begin..end], 0, true)?.to_vec2::<f32>()?)
            })
            .collect::<Result<Vec<_>>>()?;
        for target in first..end {
            // Logits at window position p predict the token at p + 1.
            let rows: Vec<&[f32]> = logits.iter().map(|l| &l[target - 1 - begin][..]).collect();
            score(target, &rows);
        }
        progress(w + 1, wins.len());
    }
    models.iter_mut().for_each(|m| m.clear_cache());
    Ok(wins.len())
}

/// `log Σ exp(row)`, in f64.
pub(crate) fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// A recurrent model over `ids` as one stream, its state carried from chunk to chunk of
/// `chunk` tokens: every token but the first is scored, as `word_language_model`'s
/// `evaluate()` does. `windows` counts the chunks.
fn stream_perplexity(
    model: &mut dyn CausalLM,
    ids: &[u32],
    chunk: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(Error::msg(format!(
            "the text has {} tokens; perplexity needs at least 2",
            ids.len()
        )));
    }
    let chunk = chunk.max(1);
    let inputs = &ids[..ids.len() - 1];
    let total = inputs.len().div_ceil(chunk);
    let mut nll = 0f64;
    model.clear_cache();
    for (c, part) in inputs.chunks(chunk).enumerate() {
        let start = c * chunk;
        let logits = model.forward(part, start, true)?.to_vec2::<f32>()?;
        for (i, row) in logits.iter().enumerate() {
            nll += log_sum_exp(row) - row[ids[start + i + 1] as usize] as f64;
        }
        progress(c + 1, total);
    }
    model.clear_cache();
    let tokens = inputs.len();
    Ok(Perplexity {
        tokens,
        mean_nll: nll / tokens as f64,
        windows: total,
    })
}

/// Runs `model` over `ids` window by window (a recurrent model: as one stream, in chunks of
/// the window's length); `progress(done, total)` after each window.
pub fn perplexity(
    model: &mut dyn CausalLM,
    ids: &[u32],
    opts: Options,
    progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if model.recurrent() {
        return stream_perplexity(model, ids, opts.max_length, progress);
    }
    let (mut nll, mut tokens) = (0f64, 0usize);
    let windows = for_each_target(
        &mut [model],
        ids,
        opts,
        |target, rows| {
            nll += log_sum_exp(rows[0]) - rows[0][ids[target] as usize] as f64;
            tokens += 1;
        },
        progress,
    )?;
    Ok(Perplexity {
        tokens,
        mean_nll: nll / tokens as f64,
        windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_is_scored_at_most_once_and_all_when_windows_overlap() {
        for (n, max_length, stride) in [(10, 4, 2), (10, 4, 4), (9, 16, 8), (100, 32, 7), (5, 5, 1)]
        {
            let w = windows(n, Options { max_length, stride });
            let mut seen = vec![0; n];
            for &(b, e, f) in &w {
                assert!(e - b <= max_length && f > b);
                (f..e).for_each(|i| seen[i] += 1);
            }
            assert_eq!(seen[0], 0);
            assert!(seen.iter().all(|&c| c <= 1));
            if stride < max_length {
                assert!(
                    seen[1..].iter().all(|&c| c == 1),
                    "{n} {max_length} {stride}: {seen:?}"
                );
            } else {
                // Disjoint windows, as in transformers: each window's first token has no context.
                let unscored: Vec<usize> = (0..n).filter(|&i| seen[i] == 0).collect();
                assert_eq!(unscored, (0..n).step_by(stride).collect::<Vec<_>>());
            }
        }
    }
}
