//! Greedy and sampled generation of encoder-decoder outputs, many sources at once: one batched
//! encoder pass, then every running output advances by one token per decoder pass.

use super::{GenerateOptions, Generation, StopReason};
use crate::error::Result;
use crate::models::seq2seq::Seq2SeqLM;
use crate::models::SeqCache;
use crate::tokenize::Tokenizer;

/// One source's output: its ids (a stop string's included, not the EOS), text and why it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

/// Generates the output of each of `sources`, streaming each one's text through
/// `on_text(source index, text)` as it comes.
pub fn generate(
    model: &dyn Seq2SeqLM,
    tok: &Tokenizer,
    sources: &[Vec<u32>],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str) -> Result<()>,
) -> Result<Vec<Output>> {
    let refs: Vec<&[u32]> = sources.iter().map(Vec::as_slice).collect();
    let memories = model.encode(&refs)?;
    let start = [model.decoder_start()];
    let mut caches: Vec<SeqCache> = sources.iter().map(|_| model.new_cache()).collect();
    let mut gens: Vec<Generation> = sources
        .iter()
        .map(|_| Generation::new(&start, opts, usize::MAX))
        .collect();
    let mut outs: Vec<Option<Output>> = vec![None; sources.len()];
    let mut texts = vec![String::new(); sources.len()];
    // The first step of each output runs alone: it makes its cross-attention keys.
    let mut logits: Vec<Vec<f32>> = Vec::with_capacity(sources.len());
    for (c, m) in caches.iter_mut().zip(&memories) {
        let l = model.decode(&mut [(c, &start)], Some(m), false)?;
        logits.push(l.flatten_all()?.to_vec1::<f32>()?);
    }
    let mut running: Vec<usize> = (0..sources.len()).collect();
    if opts.max_tokens == 0 {
        running.clear();
    }
    while !running.is_empty() {
        let mut next = Vec::with_capacity(running.len());
        for &i in &running {
            if let Some(e) = model.forced_eos() {
                if gens[i].generated().len() + 1 == opts.max_tokens {
                    super::beam::force(&mut logits[i], e);
                }
            }
            let step = gens[i].step(tok, &mut logits[i])?;
            if !step.text.is_empty() {
                on_text(i, &step.text)?;
                texts[i].push_str(&step.text);
            }
            match step.stop {
                Some(stop) => {
                    let mut ids = gens[i].generated().to_vec();
                    if stop == StopReason::Eos {
                        ids.pop();
                    }
                    outs[i] = Some(Output {
                        ids,
                        text: std::mem::take(&mut texts[i]),
                        stop,
                    });
                }
                None => next.push((i, step.id)),
            }
        }
        running = next.iter().map(|n| n.0).collect();
        if running.is_empty() {
            break;
        }
        let ids: Vec<[u32; 1]> = next.iter().map(|n| [n.1]).collect();
        let mut seqs: Vec<(&mut SeqCache, &[u32])> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| running.contains(i))
            .map(|(_, c)| c)
            .zip(&ids)
            .map(|(c, id)| (c, id.as_slice()))
            .collect();
        let rows = model.decode(&mut seqs, None, false)?.to_vec2::<f32>()?;
        for (&i, row) in running.iter().zip(rows) {
            logits[i] = row;
        }
    }
    Ok(outs
        .into_iter()
        .map(|o| {
            o.unwrap_or(Output {
                ids: Vec::new(),
                text: String::new(),
                stop: StopReason::MaxTokens,
            })
        })
        .collect())
}
