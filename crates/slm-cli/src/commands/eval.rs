//! `slm eval`: measuring models.

use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::eval::perplexity::{perplexity, Options};

use super::ModelArgs;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Perplexity of a text, with transformers' sliding-window method.
    Perplexity(PerplexityArgs),
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
