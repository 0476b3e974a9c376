//! `slm eval`: measuring models (perplexity, classification metrics).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use slm::eval::perplexity::{perplexity, Options};

use super::ModelArgs;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Perplexity of a text, with transformers' sliding-window method.
    Perplexity(PerplexityArgs),
    /// Accuracy, per-class precision/recall/F1 and the confusion matrix of a classifier.
    Classify(ClassifyArgs),
    /// Perplexity of two models (e.g. f32 and quantized), the KL divergence of the second's
    /// next-token distribution from the first's, and their top-1 agreement.
    Compare(CompareArgs),
    /// An encoder-decoder on JSONL pairs: the targets' teacher-forced loss and perplexity,
    /// and with --generate BLEU, chrF, ROUGE and exact match of its outputs.
    Seq2seq(Seq2SeqArgs),
}

#[derive(clap::Args, Debug)]
pub struct Seq2SeqArgs {
    /// An encoder-decoder model folder (T5).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL pairs: {"input", "target"} or {"prompt", "completion"} per line.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per source and per target; longer ones are cut (and counted).
    #[arg(long, default_value_t = 512, value_parser = crate::parse::positive)]
    max_length: usize,
    /// Also generate each input's output and score it against the target.
    #[arg(long)]
    generate: bool,
    /// Longest generated output, in tokens.
    #[arg(long, default_value_t = 128, value_parser = crate::parse::positive)]
    max_new_tokens: usize,
    /// Greedy outputs generated side by side (beam search runs one input at a time).
    #[arg(long, default_value_t = 16, value_parser = crate::parse::positive)]
    batch_size: usize,
    #[command(flatten)]
    beams: super::generate::BeamArgs,
    /// Also write report.json (and outputs.jsonl with --generate) into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Replace files already in the --report folder.
    #[arg(long)]
    force: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The reference model, then the model to compare with it (give --model twice).
    #[arg(long, short = 'm', num_args = 1, required = true)]
    model: Vec<PathBuf>,
    /// `f32` dequantizes GGUF weights. Once for both models, or twice (one per --model), e.g.
    /// `--dtype f32 --dtype auto` to see what quantized matmuls cost against exact ones.
    #[arg(long, value_enum, default_values = ["auto"])]
    dtype: Vec<super::Dtype>,
    /// The text both models read (UTF-8), e.g. a WikiText split.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (default: the shorter context, at most 1024).
    #[arg(long, value_parser = crate::parse::positive)]
    max_length: Option<usize>,
    /// Tokens the window moves each time (default: half the window).
    #[arg(long, value_parser = crate::parse::positive)]
    stride: Option<usize>,
    /// One JSON object: KL divergence, top-1 agreement, both perplexities.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    /// A *ForSequenceClassification model folder.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Labelled texts: CSV/TSV with a header, or JSONL (`text` and `label` fields).
    #[arg(long)]
    data: PathBuf,
    /// The text column or field (default: text, sentence or sentence1).
    #[arg(long)]
    column: Option<String>,
    /// The label column or field (default: label); values are label names or class indices.
    #[arg(long)]
    label_column: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    batch_size: usize,
    /// Tokens per text (default: the model's limit); longer texts are truncated.
    #[arg(long)]
    max_length: Option<usize>,
    /// Also write report.json and confusion.svg into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Replace a report.json/confusion.svg already in the --report folder.
    #[arg(long)]
    force: bool,
    /// Skip rows whose text is empty instead of stopping with an error.
    #[arg(long)]
    skip_empty: bool,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (default: the model's context, at most 1024); a recurrent model runs the text as one stream, in chunks of this length.
    #[arg(long)]
    max_length: Option<usize>,
    /// Tokens between window starts; each window scores only tokens no earlier window scored
    /// (default: half of --max-length).
    #[arg(long)]
    stride: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Perplexity(a) => run_perplexity(a),
        Command::Classify(a) => run_classify(a),
        Command::Compare(a) => run_compare(a),
        Command::Seq2seq(a) => run_seq2seq(a),
    }
}

fn run_seq2seq(mut a: Seq2SeqArgs) -> Result<()> {
    use slm::eval::seq2seq::{teacher_forced, Generated};
    let files: &[&str] = if a.generate {
        &["report.json", "outputs.jsonl"]
    } else {
        &["report.json"]
    };
    if let Some(dir) = &a.report {
        for f in files {
            slm::io::write::check_overwrite(&dir.join(f), a.force)?;
        }
        super::clean_stale(dir);
    }
    if a.beams.num_return > 1 {
        bail!("--num-return: one output per input is scored");
    }
    super::resolve_model(&mut a.model)?;
    let (pairs, _) = slm::data::read_pairs(&a.data)?;
    let m = slm::models::seq2seq::load_seq2seq_with(&a.model, a.adapter.as_deref())?;
    let tok = slm::tokenize::Tokenizer::load(&m.files)?;
    tok.check_matches(m.config.vocab_size())?;
    let model = m.model.as_ref();
    let bar = progress_bar();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}, ETA {eta}")
            .expect("valid template"),
    );
    bar.set_length(pairs.len() as u64);
    bar.set_message("pairs scored");
    let mut report = teacher_forced(model, &tok, &pairs, a.max_length, &|k| {
        bar.set_position(k as u64)
    })?;
    let mut outputs = Vec::new();
    if a.generate {
        bar.set_position(0);
        bar.set_message("outputs generated");
        let sources = pairs
            .iter()
            .map(|p| Ok(slm::train::seq2seq::encode(&tok, &p.input, false, a.max_length)?.0))
            .collect::<Result<Vec<_>>>()?;
        if a.beams.beams > 1 {
            let opts = a.beams.options(a.max_new_tokens, Some(model.eos()))?;
            for s in &sources {
                let best = slm::generate::beam::seq2seq(model, s, &opts)?.remove(0);
                outputs.push(tok.decode(&best.tokens, true)?);
                bar.inc(1);
            }
        } else {
            let opts = slm::generate::GenerateOptions {
                max_tokens: a.max_new_tokens,
                sampling: slm::generate::SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            };
            for chunk in sources.chunks(a.batch_size) {
                let outs = slm::generate::seq2seq::generate(
                    model,
                    &tok,
                    chunk,
                    &opts,
                    &mut |_, _| Ok(()),
                )?;
                outputs.extend(outs.into_iter().map(|o| o.text));
                bar.inc(chunk.len() as u64);
            }
        }
        let hyps: Vec<&str> = outputs.iter().map(|s| s.trim()).collect();
        let refs: Vec<&str> = pairs.iter().map(|p| p.target.trim()).collect();
        report.generated = Some(Generated::score(&hyps, &refs));
    }
    bar.finish_and_clear();
    if report.truncated > 0 {
        eprintln!(
            "warning: {} pair(s) were cut to --max-length {}",
            report.truncated, a.max_length
        );
    }
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("{}", seq2seq_table(&report));
    }
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let json = serde_json::json!({
            "model": a.model.display().to_string(),
            "data": a.data.display().to_string(),
            "report": report,
        });
        let text = serde_json::to_string_pretty(&json)?;
        slm::io::write::write_atomic(&dir.join("report.json"), |w| w.write_all(text.as_bytes()))?;
        if a.generate {
            let mut lines = String::new();
            for (p, o) in pairs.iter().zip(&outputs) {
                let row = serde_json::json!({"input": p.input, "target": p.target, "output": o});
                lines.push_str(&format!("{row}\n"));
            }
            slm::io::write::write_atomic(&dir.join("outputs.jsonl"), |w| {
                w.write_all(lines.as_bytes())
            })?;
        }
        eprintln!(
            "wrote {}",
            files
                .iter()
                .map(|f| dir.join(f).display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    Ok(())
}

/// The report as aligned lines.
fn seq2seq_table(r: &slm::eval::seq2seq::Report) -> String {
    let mut s = format!(
        "pairs        {} ({} target tokens)\nmean NLL     {:.4}\nperplexity   {:.4}",
        r.pairs, r.target_tokens, r.mean_nll, r.perplexity
    );
    if let Some(g) = &r.generated {
        let p = g.bleu.precisions;
        s.push_str(&format!(
            "\nBLEU         {:.2} ({:.1}/{:.1}/{:.1}/{:.1}, BP {:.3}, {}/{} words)\nchrF         {:.2}\nROUGE-1/2/L  {:.4} / {:.4} / {:.4} (F1)\nexact match  {:.2}%",
            g.bleu.score, p[0], p[1], p[2], p[3], g.bleu.brevity_penalty, g.bleu.sys_len,
            g.bleu.ref_len, g.chrf, g.rouge.rouge1.fmeasure, g.rouge.rouge2.fmeasure,
            g.rouge.rouge_l.fmeasure, g.exact_match
        ));
    }
    s
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} windows, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template"),
    );
    bar
}

fn window_options(max_length: Option<usize>, stride: Option<usize>, context: usize) -> Options {
    let max_length = max_length.unwrap_or(context.min(1024));
    Options {
        max_length,
        stride: stride.unwrap_or((max_length / 2).max(1)),
    }
}

fn run_compare(mut a: CompareArgs) -> Result<()> {
    for m in &mut a.model {
        super::resolve_model(m)?;
    }
    let [pa, pb] = <[PathBuf; 2]>::try_from(a.model.clone())
        .map_err(|m| anyhow::anyhow!("give exactly two --model options (got {})", m.len()))?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("{}", a.text.display()))?;
    let (da, db) = match a.dtype.as_slice() {
        [d] => (*d, *d),
        [d1, d2] => (*d1, *d2),
        _ => anyhow::bail!("give --dtype once (both models) or twice (one per --model)"),
    };
    let (mut ma, ta) = super::load(&ModelArgs {
        model: pa.clone(),
        dtype: da,
        adapter: None,
    })?;
    let (mut mb, tb) = super::load(&ModelArgs {
        model: pb.clone(),
        dtype: db,
        adapter: None,
    })?;
    let ids = ta.encode(&text, true)?;
    anyhow::ensure!(
        tb.encode(&text, true)? == ids,
        "the two models tokenize the text differently: their predictions cannot be compared token by token"
    );
    let context = ma.model.context_length().min(mb.model.context_length());
    let opts = window_options(a.max_length, a.stride, context);
    let bar = progress_bar();
    let c =
        slm::eval::compare::compare(ma.model.as_mut(), mb.model.as_mut(), &ids, opts, |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
    bar.finish_and_clear();
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"a": pa.display().to_string(), "b": pb.display().to_string(),
                "tokens_scored": c.a.tokens, "perplexity_a": c.a.perplexity(), "perplexity_b": c.b.perplexity(),
                "mean_kl": c.mean_kl, "median_kl": c.median_kl, "p99_kl": c.p99_kl, "max_kl": c.max_kl,
                "top1_agreement": c.top1_agreement})
        );
    } else {
        outln!("A:               {}", pa.display());
        outln!("B:               {}", pb.display());
        outln!(
            "scored:          {} tokens ({} windows of {}, stride {})",
            c.a.tokens,
            c.a.windows,
            opts.max_length,
            opts.stride
        );
        outln!("perplexity A:    {:.4}", c.a.perplexity());
        outln!(
            "perplexity B:    {:.4} ({:+.2}%)",
            c.b.perplexity(),
            100.0 * (c.b.perplexity() / c.a.perplexity() - 1.0)
        );
        outln!(
            "KL(A||B):        mean {:.6}, median {:.6}, p99 {:.6}, max {:.6}",
            c.mean_kl,
            c.median_kl,
            c.p99_kl,
            c.max_kl
        );
        outln!("top-1 agreement: {:.2}%", 100.0 * c.top1_agreement);
    }
    Ok(())
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("{}", a.text.display()))?;
    let (mut m, tok) = super::load(&a.model)?;
    // As transformers' tokenizer call does by default: with the model's BOS/EOS rules.
    let ids = tok.encode(&text, true)?;
    let opts = window_options(a.max_length, a.stride, m.model.context_length());
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} windows, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let p = perplexity(m.model.as_mut(), &ids, opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        outln!(
            "{}",
            serde_json::json!({"text_tokens": ids.len(), "tokens_scored": p.tokens, "windows": p.windows,
                               "max_length": opts.max_length, "stride": opts.stride,
                               "stream": m.model.recurrent(),
                               "mean_nll": p.mean_nll, "perplexity": p.perplexity(), "seconds": secs})
        );
    } else {
        outln!("text:        {} ({} tokens)", a.text.display(), ids.len());
        if m.model.recurrent() {
            outln!(
                "stream:      {} chunks of {} tokens, the recurrent state carried",
                p.windows,
                opts.max_length
            );
        } else {
            outln!(
                "windows:     {} (max length {}, stride {})",
                p.windows,
                opts.max_length,
                opts.stride
            );
        }
        outln!("scored:      {} tokens in {secs:.1} s", p.tokens);
        outln!("mean NLL:    {:.5}", p.mean_nll);
        outln!("perplexity:  {:.4}", p.perplexity());
    }
    Ok(())
}

/// The model's labels and each record's class probabilities: an encoder's head, or a
/// recurrent classifier's.
fn classify_records(
    a: &ClassifyArgs,
    records: &[slm::data::Record],
) -> Result<(Vec<String>, Vec<Vec<f32>>)> {
    if slm::encode::rnn::is_rnn_classifier(&a.model) {
        let m = slm::encode::rnn::RnnTextClassifier::load_with(&a.model, a.adapter.as_deref())?;
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        return Ok((m.cfg.labels.clone(), m.classify(&texts, a.batch_size)?));
    }
    let enc = slm::encode::Encoder::load_with(&a.model, a.adapter.as_deref())?;
    if enc.model.task != slm::models::bert::Task::SequenceClassification {
        bail!(
            "{}: the model has no sequence-classification head; fine-tune one with `slm finetune --task classify`, or apply a SEQ_CLS adapter with --adapter",
            a.model.display()
        );
    }
    let texts: Vec<(&str, Option<&str>)> =
        records.iter().map(|r| (r.text.as_str(), None)).collect();
    let (inputs, cut) = enc.prepare(&texts, a.max_length.unwrap_or(enc.max_len), true)?;
    if !cut.is_empty() {
        eprintln!("warning: {} text(s) were truncated", cut.len());
    }
    Ok((
        enc.model.labels.clone(),
        enc.classify(&inputs, a.batch_size)?,
    ))
}

fn run_classify(mut a: ClassifyArgs) -> Result<()> {
    if let Some(dir) = &a.report {
        for f in ["report.json", "confusion.svg"] {
            slm::io::write::check_overwrite(&dir.join(f), a.force)?;
        }
        super::clean_stale(dir);
    }
    super::resolve_model(&mut a.model)?;
    let cols = slm::data::Columns {
        text: a.column.clone(),
        pair: None,
        label: a.label_column.clone(),
    };
    let records = slm::data::read_records(&a.data, &cols, a.skip_empty)?;
    let (labels, probs) = classify_records(&a, &records)?;
    let truth = records
        .iter()
        .map(|r| {
            let l = r.label.as_deref().ok_or_else(|| {
                anyhow::anyhow!("{}: line {}: no label", a.data.display(), r.line)
            })?;
            labels
                .iter()
                .position(|n| n == l)
                .or_else(|| l.trim().parse::<usize>().ok().filter(|&i| i < labels.len()))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: line {}: label '{l}' is neither a label of the model ({}) nor a class index below {}",
                        a.data.display(),
                        r.line,
                        labels.join(", "),
                        labels.len()
                    )
                })
        })
        .collect::<Result<Vec<usize>>>()?;
    let pred: Vec<usize> = probs
        .iter()
        .map(|p| {
            (0..p.len())
                .max_by(|&x, &y| p[x].total_cmp(&p[y]))
                .unwrap_or(0)
        })
        .collect();
    let report = slm::eval::metrics::Report::new(&labels, &truth, &pred);
    out!("{}", report.table());
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let json = serde_json::json!({
            "model": a.model.display().to_string(),
            "data": a.data.display().to_string(),
            "report": report,
        });
        let text = serde_json::to_string_pretty(&json)?;
        slm::io::write::write_atomic(&dir.join("report.json"), |w| w.write_all(text.as_bytes()))?;
        let svg = report.confusion_svg();
        slm::io::write::write_atomic(&dir.join("confusion.svg"), |w| w.write_all(svg.as_bytes()))?;
        eprintln!(
            "wrote {} and {}",
            dir.join("report.json").display(),
            dir.join("confusion.svg").display()
        );
    }
    Ok(())
}
