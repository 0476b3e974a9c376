//! `slm eval`: measuring models (perplexity, classification metrics).

use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::eval::perplexity::{perplexity, Options};

use super::ModelArgs;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Perplexity of a text, with transformers' sliding-window method.
    Perplexity(PerplexityArgs),
    /// Accuracy, per-class precision/recall/F1 and the confusion matrix of a classifier.
    Classify(ClassifyArgs),
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
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Tokens per text (default: the model's limit); longer texts are truncated.
    #[arg(long)]
    max_length: Option<usize>,
    /// Also write report.json and confusion.svg into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score (UTF-8).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (default: the model's context, at most 1024).
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
    }
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("{}", a.text.display()))?;
    let (mut m, tok) = super::load(&a.model)?;
    // As transformers' tokenizer call does by default: with the model's BOS/EOS rules.
    let ids = tok.encode(&text, true)?;
    let max_length = a.max_length.unwrap_or(m.model.context_length().min(1024));
    let opts = Options {
        max_length,
        stride: a.stride.unwrap_or((max_length / 2).max(1)),
    };
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
        println!(
            "{}",
            serde_json::json!({"text_tokens": ids.len(), "tokens_scored": p.tokens, "windows": p.windows,
                               "max_length": opts.max_length, "stride": opts.stride,
                               "mean_nll": p.mean_nll, "perplexity": p.perplexity(), "seconds": secs})
        );
    } else {
        println!("text:        {} ({} tokens)", a.text.display(), ids.len());
        println!(
            "windows:     {} (max length {}, stride {})",
            p.windows, opts.max_length, opts.stride
        );
        println!("scored:      {} tokens in {secs:.1} s", p.tokens);
        println!("mean NLL:    {:.5}", p.mean_nll);
        println!("perplexity:  {:.4}", p.perplexity());
    }
    Ok(())
}

fn run_classify(a: ClassifyArgs) -> Result<()> {
    let enc = slm::encode::Encoder::load(&a.model)?;
    let cols = slm::data::Columns {
        text: a.column.clone(),
        pair: None,
        label: a.label_column.clone(),
    };
    let records = slm::data::read_records(&a.data, &cols, false)?;
    let labels = enc.model.labels.clone();
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
    let texts: Vec<(&str, Option<&str>)> =
        records.iter().map(|r| (r.text.as_str(), None)).collect();
    let (inputs, cut) = enc.prepare(&texts, a.max_length.unwrap_or(enc.max_len), true)?;
    if !cut.is_empty() {
        eprintln!("warning: {} text(s) were truncated", cut.len());
    }
    let probs = enc.classify(&inputs, a.batch_size)?;
    let pred: Vec<usize> = probs
        .iter()
        .map(|p| {
            (0..p.len())
                .max_by(|&x, &y| p[x].total_cmp(&p[y]))
                .unwrap_or(0)
        })
        .collect();
    let report = slm::eval::metrics::Report::new(&labels, &truth, &pred);
    print!("{}", report.table());
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
