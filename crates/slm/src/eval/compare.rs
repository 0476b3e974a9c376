//! What a change to a model (quantization, fine-tuning) did to its predictions, as llama.cpp's
//! `llama-perplexity --kl-divergence` reports it: both perplexities, the KL divergence of the
//! second model's next-token distribution from the first's, and how often their top tokens agree.

use super::perplexity::{for_each_target, log_sum_exp, Options, Perplexity};
use crate::error::{Error, Result};
use crate::models::CausalLM;

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub a: Perplexity,
    pub b: Perplexity,
    /// Mean over scored tokens of KL(P_a ‖ P_b), nats.
    pub mean_kl: f64,
    pub median_kl: f64,
    pub p99_kl: f64,
    pub max_kl: f64,
    /// Fraction of scored tokens where both models rank the same token first.
    pub top1_agreement: f64,
}

pub fn compare(
    a: &mut dyn CausalLM,
    b: &mut dyn CausalLM,
    ids: &[u32],
    opts: Options,
    progress: impl FnMut(usize, usize),
) -> Result<Comparison> {
    if a.vocab_size() != b.vocab_size() {
        return Err(Error::msg(format!(
            "the models have different vocabularies ({} and {} tokens): their distributions cannot be compared",
            a.vocab_size(),
            b.vocab_size()
        )));
    }
    let (mut nll_a, mut nll_b, mut agree) = (0f64, 0f64, 0usize);
    let mut kls = Vec::new();
    let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j]).then(j.cmp(&i)));
    let windows = for_each_target(
        &mut [a, b],
        ids,
        opts,
        |target, rows| {
            let (ra, rb) = (rows[0], rows[1]);
            let (za, zb) = (log_sum_exp(ra), log_sum_exp(rb));
            let t = ids[target] as usize;
            nll_a += za - ra[t] as f64;
            nll_b += zb - rb[t] as f64;
            let kl: f64 = ra
                .iter()
                .zip(rb)
                .map(|(&x, &y)| {
                    let (la, lb) = (x as f64 - za, y as f64 - zb);
                    la.exp() * (la - lb)
                })
                .sum();
            kls.push(kl.max(0.0));
            agree += (argmax(ra) == argmax(rb)) as usize;
        },
        progress,
    )?;
    let n = kls.len();
    let mean_kl = kls.iter().sum::<f64>() / n as f64;
    kls.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| kls[((n - 1) as f64 * p).round() as usize];
    let ppl = |nll: f64| Perplexity {
        tokens: n,
        mean_nll: nll / n as f64,
        windows,
    };
    Ok(Comparison {
        a: ppl(nll_a),
        b: ppl(nll_b),
        mean_kl,
        median_kl: pct(0.5),
        p99_kl: pct(0.99),
        max_kl: kls[n - 1],
        top1_agreement: agree as f64 / n as f64,
    })
}
