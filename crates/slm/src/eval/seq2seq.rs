//! Measuring an encoder-decoder on pairs: the teacher-forced loss of the targets (what
//! training minimises; transformers' `loss` of `labels`), and the scores of what it generates
//! against them (BLEU, chrF, ROUGE, exact match).

use serde::Serialize;

use super::overlap::{bleu, chrf, rouge_mean, Bleu, Rouge};
use crate::data::TextPair;
use crate::error::Result;
use crate::models::seq2seq::Seq2SeqLM;
use crate::tokenize::Tokenizer;

/// The summed negative log-likelihood of each target token (its EOS included) after the
/// decoder start and the target before it, and the number of tokens.
pub fn target_nll(model: &dyn Seq2SeqLM, source: &[u32], target: &[u32]) -> Result<(f64, usize)> {
    if target.is_empty() {
        return Ok((0.0, 0));
    }
    let memory = model.encode(&[source])?.remove(0);
    let mut cache = model.new_cache();
    let input: Vec<u32> = std::iter::once(model.decoder_start())
        .chain(target[..target.len() - 1].iter().copied())
        .collect();
    let logits = model.decode(&mut [(&mut cache, &input)], Some(&memory), true)?;
    let rows = logits.to_vec2::<f32>()?;
    let mut sum = 0.0;
    for (row, &t) in rows.iter().zip(target) {
        sum += super::perplexity::log_sum_exp(row) - row[t as usize] as f64;
    }
    Ok((sum, target.len()))
}

/// Scores of generated outputs against their references.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    pub bleu: Bleu,
    pub chrf: f64,
    pub rouge: Rouge,
    /// Outputs equal to their reference (surrounding whitespace aside), in percent.
    pub exact_match: f64,
}

impl Generated {
    pub fn score(outputs: &[&str], references: &[&str]) -> Self {
        let exact = outputs
            .iter()
            .zip(references)
            .filter(|(o, r)| o.trim() == r.trim())
            .count();
        Generated {
            bleu: bleu(outputs, references),
            chrf: chrf(outputs, references),
            rouge: rouge_mean(outputs, references),
            exact_match: 100.0 * exact as f64 / outputs.len().max(1) as f64,
        }
    }
}

/// What `slm eval seq2seq` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pairs: usize,
    pub target_tokens: usize,
    /// Mean negative log-likelihood per target token, in nats.
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Pairs whose source or target was longer than the limit and cut.
    pub truncated: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<Generated>,
}

/// The teacher-forced loss over `pairs`, each source and target cut to `max_len` tokens;
/// `done(k)` after the k-th pair.
pub fn teacher_forced(
    model: &dyn Seq2SeqLM,
    tok: &Tokenizer,
    pairs: &[TextPair],
    max_len: usize,
    done: &dyn Fn(usize),
) -> Result<Report> {
    let (mut sum, mut n, mut truncated) = (0.0, 0, 0);
    for (i, p) in pairs.iter().enumerate() {
        let (source, a) = crate::train::seq2seq::encode(tok, &p.input, false, max_len)?;
        let (target, b) = crate::train::seq2seq::encode(tok, &p.target, true, max_len)?;
        truncated += usize::from(a || b);
        let (s, c) = target_nll(model, &source, &target)?;
        sum += s;
        n += c;
        done(i + 1);
    }
    let mean_nll = sum / n.max(1) as f64;
    Ok(Report {
        pairs: pairs.len(),
        target_tokens: n,
        mean_nll,
        perplexity: mean_nll.exp(),
        truncated,
        generated: None,
    })
}
