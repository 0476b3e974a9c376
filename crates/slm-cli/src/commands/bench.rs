//! `slm bench`: the figures BENCHMARKS.md quotes, measured the way llama-bench does (a prefill of a
//! fixed prompt, then greedy decoding of a fixed number of tokens), repeated, medians reported.

use std::time::Instant;

use anyhow::{bail, Result};
use slm::generate::{GenerateOptions, SamplingParams, Session};

use super::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Runs to take the median over.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Text the prompt is cut from (default: tiny shakespeare from SLM_ASSETS).
    #[arg(long)]
    text: Option<std::path::PathBuf>,
    /// Also decode this many sequences together, one batched forward pass per step (what
    /// `slm serve --parallel N` runs), and report their aggregate decode speed.
    #[arg(long, default_value_t = 1, value_parser = crate::parse::positive)]
    parallel: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Encoders: texts to embed (default: the 872 SST-2 test sentences from SLM_ASSETS).
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Encoder-decoders: beams of the beam-search measurement.
    #[arg(long, default_value_t = 4, value_parser = crate::parse::positive)]
    beams: usize,
    /// Encoders: texts per batch.
    #[arg(long, default_value_t = 32, value_parser = crate::parse::positive)]
    batch_size: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model.model)?;
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let files = slm::io::ModelFiles::locate(&a.model.model)?;
    let arch = slm::models::config_of(&files)?.architecture();
    if arch.is_encoder() {
        return run_encoder(a);
    }
    if arch.is_seq2seq() {
        return run_seq2seq(a);
    }
    let text_path = a
        .text
        .clone()
        .unwrap_or_else(|| slm::assets_dir().join("corpora/tinyshakespeare/input.txt"));
    let text = std::fs::read_to_string(&text_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", text_path.display()))?;
    let (mut loads, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut batched = Vec::new();
    let mut threads = 0;
    for _ in 0..a.repeats {
        let t = Instant::now();
        let (mut m, tok) = super::load(&a.model)?;
        loads.push(t.elapsed().as_secs_f64());
        let mut ids = tok.encode(&text[..text.len().min(a.prompt_tokens * 8)], false)?;
        if ids.len() < a.prompt_tokens {
            bail!(
                "{}: too short for a {}-token prompt",
                text_path.display(),
                a.prompt_tokens
            );
        }
        ids.truncate(a.prompt_tokens);
        let mut session = Session::new(m.model.as_mut());
        let opts = GenerateOptions {
            max_tokens: a.gen_tokens + 1,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            ignore_eos: true,
            ..Default::default()
        };
        let (_, stats) = session.generate(&tok, &ids, &opts, &mut |_| Ok(()))?;
        prefill.push(ids.len() as f64 / stats.prefill_time.as_secs_f64());
        // The first sampled token comes from the prefill's logits; the rest each cost one forward.
        decode.push(a.gen_tokens as f64 / stats.decode_time.as_secs_f64());
        threads = rayon::current_num_threads();
        if a.parallel > 1 {
            batched.push(batched_decode(
                m.model.as_ref(),
                &ids,
                a.parallel,
                a.gen_tokens,
            )?);
        }
    }
    let batched = (!batched.is_empty()).then(|| median(batched));
    let (load, pp, tg, rss) = (
        median(loads),
        median(prefill),
        median(decode),
        peak_rss_mib(),
    );
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"model": a.model.model, "threads": threads, "load_s": load, "prefill_tok_s": pp,
                               "decode_tok_s": tg, "peak_rss_mib": rss, "prompt_tokens": a.prompt_tokens,
                               "gen_tokens": a.gen_tokens, "repeats": a.repeats,
                               "parallel": a.parallel, "batched_decode_tok_s": batched})
        );
    } else {
        outln!("model:        {}", a.model.model.display());
        outln!("threads:      {threads}");
        outln!("load:         {:.3} s", load);
        outln!("prefill:      {:.1} tok/s ({} tokens)", pp, a.prompt_tokens);
        outln!("decode:       {:.1} tok/s ({} tokens)", tg, a.gen_tokens);
        if let Some(b) = batched {
            outln!(
                "batched:      {:.1} tok/s ({} sequences decoding together)",
                b,
                a.parallel
            );
        }
        outln!("peak RSS:     {:.0} MiB", rss);
        outln!("(medians of {} runs)", a.repeats);
    }
    Ok(())
}

/// `n` sequences, each after its own slice of the prompt, decoded greedily in lockstep: one
/// `forward_batch` per step. Returns the aggregate decode tokens per second.
fn batched_decode(m: &dyn slm::models::CausalLM, ids: &[u32], n: usize, gen: usize) -> Result<f64> {
    let len = (ids.len() / n).max(1);
    let mut caches: Vec<_> = (0..n).map(|_| m.new_cache()).collect();
    let mut next = Vec::with_capacity(n);
    for (i, c) in caches.iter_mut().enumerate() {
        let start = (i * len).min(ids.len().saturating_sub(len));
        let prompt = &ids[start..start + len.min(ids.len())];
        let logits = m.forward_batch(&mut [(c, prompt)])?.to_vec2::<f32>()?;
        next.push(argmax(&logits[0]));
    }
    let t = Instant::now();
    for _ in 0..gen {
        let mut seqs: Vec<(&mut slm::models::SeqCache, &[u32])> = caches
            .iter_mut()
            .zip(&next)
            .map(|(c, id)| (c, std::slice::from_ref(id)))
            .collect();
        let logits = m.forward_batch(&mut seqs)?.to_vec2::<f32>()?;
        next = logits.iter().map(|r| argmax(r)).collect();
    }
    Ok((n * gen) as f64 / t.elapsed().as_secs_f64())
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0) as u32
}

/// Embedding throughput as sentence-transformers users measure it: tokenization, length-sorted
/// batches and pooling included, model load excluded.
fn run_encoder(a: Args) -> Result<()> {
    let input = a
        .input
        .clone()
        .unwrap_or_else(|| slm::assets_dir().join("classification/sst2/test.tsv"));
    let records = slm::data::read_records(&input, &Default::default(), false)?;
    let t = Instant::now();
    let enc = slm::encode::Encoder::load(&a.model.model)?;
    let load = t.elapsed().as_secs_f64();
    let texts: Vec<(&str, Option<&str>)> =
        records.iter().map(|r| (r.text.as_str(), None)).collect();
    let mut rates = Vec::new();
    let mut tokens = 0;
    for _ in 0..a.repeats {
        let t = Instant::now();
        let (inputs, _) = enc.prepare(&texts, enc.max_len, true)?;
        let v = enc.embed(&inputs, a.batch_size, enc.pooling)?;
        rates.push(v.len() as f64 / t.elapsed().as_secs_f64());
        tokens = inputs.iter().map(|i| i.ids.len()).sum();
    }
    let threads = rayon::current_num_threads();
    let per_s = median(rates);
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"engine": "slm", "threads": threads, "texts": records.len(), "tokens": tokens,
                               "batch_size": a.batch_size, "load_s": load, "sentences_per_s": per_s})
        );
    } else {
        outln!("model:        {}", a.model.model.display());
        outln!("threads:      {threads}");
        outln!(
            "texts:        {} ({tokens} tokens) from {}",
            records.len(),
            input.display()
        );
        outln!("load:         {load:.3} s");
        outln!(
            "embedding:    {per_s:.1} sentences/s (median of {}, batch {})",
            a.repeats,
            a.batch_size
        );
    }
    Ok(())
}

/// An encoder-decoder, as transformers' `generate` is timed on one: the encoder's tokens/s
/// over a source of `--prompt-tokens` ids, then `--gen-tokens` decoder steps over its states,
/// greedy and as a `--beams` beam search that no EOS ends. The ids are spread over the
/// vocabulary (the benchmark's models are random: no tokenizer needed).
fn run_seq2seq(a: Args) -> Result<()> {
    use slm::generate::beam::{seq2seq_over, BeamOptions};
    let t = Instant::now();
    let m = slm::models::seq2seq::load_seq2seq(&a.model.model)?;
    let load = t.elapsed().as_secs_f64();
    let model = m.model.as_ref();
    let vocab = model.vocab_size().max(4) as u64;
    let source: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| (3 + (i * 7919) % (vocab - 3)) as u32)
        .collect();
    let (mut enc, mut greedy, mut beam) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.repeats {
        let t = Instant::now();
        let memory = model.encode(&[&source])?.remove(0);
        enc.push(source.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut cache = model.new_cache();
        let mut next = model.decoder_start();
        for step in 0..a.gen_tokens {
            let mem = (step == 0).then_some(&memory);
            let logits =
                model.decode(&mut [(&mut cache, std::slice::from_ref(&next))], mem, false)?;
            next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
        }
        greedy.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
        let opts = BeamOptions {
            beams: a.beams,
            max_new_tokens: a.gen_tokens,
            eos: None,
            ..Default::default()
        };
        let t = Instant::now();
        seq2seq_over(model, &memory, &opts)?;
        beam.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let threads = rayon::current_num_threads();
    let (enc, greedy, beam) = (median(enc), median(greedy), median(beam));
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"model": a.model.model, "threads": threads, "load_s": load,
                               "encoder_tok_s": enc, "greedy_decode_tok_s": greedy,
                               "beam_decode_tok_s": beam, "beams": a.beams,
                               "source_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
                               "repeats": a.repeats, "peak_rss_mib": peak_rss_mib()})
        );
    } else {
        outln!("model:        {}", a.model.model.display());
        outln!("threads:      {threads}");
        outln!("load:         {load:.3} s");
        outln!(
            "encoder:      {enc:.1} tok/s ({} source tokens)",
            a.prompt_tokens
        );
        outln!("greedy:       {greedy:.1} tok/s ({} tokens)", a.gen_tokens);
        outln!(
            "{}-beam:       {beam:.1} tok/s ({} tokens)",
            a.beams,
            a.gen_tokens
        );
        outln!("(medians of {} runs)", a.repeats);
    }
    Ok(())
}
