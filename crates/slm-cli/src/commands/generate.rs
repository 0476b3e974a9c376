use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use slm::generate::beam::{self, BeamOptions, EarlyStopping, Hypothesis};
use slm::generate::Session;
use slm::tokenize::Tokenizer;

use super::{ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    beams: BeamArgs,
    /// The prompt, or an encoder-decoder's input (default: read from stdin).
    prompt: Option<String>,
    /// Inputs from a file, one per line; one output line each, in order (an encoder-decoder
    /// runs them as one batch).
    #[arg(long, short = 'i', value_name = "FILE", conflicts_with = "prompt")]
    input: Option<PathBuf>,
    /// Do not add BOS/special tokens to the prompt.
    #[arg(long)]
    no_special: bool,
    /// The output must be a JSON document valid under this JSON schema (a file), enforced token
    /// by token (`{"type": "object"}` for any JSON object).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Print timings to stderr at the end (and each beam's score).
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// Beam search, as transformers' `generate(num_beams=…)`.
#[derive(clap::Args, Debug)]
pub(crate) struct BeamArgs {
    /// Beam search with this many beams (1: sample or greedy, as the sampling flags say).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) beams: u32,
    /// Print this many of the best beams, one per line.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) num_return: u32,
    /// Finished beams are scored `sum(logprobs) / length^p`: above 1 favours longer outputs.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f64,
    /// When beam search stops: `false` once no beam can win (transformers' estimate), `true`
    /// once `--beams` outputs are finished, `never` only when none could win at any length.
    #[arg(long, value_enum, default_value = "false")]
    early_stopping: EarlyStop,
    /// Beams never repeat an n-gram of this size (0: off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum EarlyStop {
    False,
    True,
    Never,
}

impl BeamArgs {
    pub(crate) fn options(&self, max_new_tokens: usize, eos: Option<u32>) -> Result<BeamOptions> {
        if self.num_return > self.beams {
            bail!(
                "--num-return {} is more than --beams {}: a beam search returns at most its beams",
                self.num_return,
                self.beams
            );
        }
        Ok(BeamOptions {
            beams: self.beams as usize,
            max_new_tokens,
            length_penalty: self.length_penalty,
            early_stopping: match self.early_stopping {
                EarlyStop::False => EarlyStopping::Heuristic,
                EarlyStop::True => EarlyStopping::Finished,
                EarlyStop::Never => EarlyStopping::Never,
            },
            no_repeat_ngram: self.no_repeat_ngram_size,
            num_return: self.num_return as usize,
            eos,
            // An encoder-decoder's own (config.json) is taken by the beam search.
            forced_eos: None,
        })
    }
}

/// The inputs: the prompt, each line of `--input`, or stdin.
fn inputs(a: &Args) -> Result<Vec<String>> {
    Ok(match (&a.prompt, &a.input) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect();
            if lines.is_empty() {
                bail!("{}: no inputs (every line is empty)", f.display());
            }
            lines
        }
        (None, None) => vec![std::io::read_to_string(std::io::stdin())?],
    })
}

pub fn run(a: Args) -> Result<()> {
    let mut path = a.model.model.clone();
    super::resolve_model(&mut path)?;
    if slm::models::seq2seq::is_seq2seq(&path) {
        return run_seq2seq(&a, &path);
    }
    let inputs = inputs(&a)?;
    let (mut m, tok) = super::load(&a.model)?;
    let constraint = match &a.json_schema {
        Some(path) => Some(schema(path, &tok)?),
        None => None,
    };
    let mut out = std::io::stdout().lock();
    if a.beams.beams > 1 || a.beams.num_return > 1 {
        if constraint.is_some() {
            bail!("--json-schema is not supported with --beams");
        }
        let opts = a
            .beams
            .options(a.sampling.max_tokens, tok.eos_ids().first().copied())?;
        for text in &inputs {
            let ids = tok.encode(text, !a.no_special)?;
            let hyps = beam::causal(m.model.as_ref(), &ids, &opts)?;
            print_beams(&mut out, &tok, &hyps, a.verbose)?;
        }
        return Ok(());
    }
    let session_context = m.model.context_length();
    let opts = a.sampling.options();
    let mut session = Session::new(m.model.as_mut());
    for text in &inputs {
        let ids = tok.encode(text, !a.no_special)?;
        let (_, stats) =
            session.generate_with(&tok, &ids, &opts, constraint.clone(), &mut |t| {
                // One output per line when several inputs are given.
                let t = if inputs.len() > 1 {
                    t.replace('\n', " ")
                } else {
                    t.to_string()
                };
                out.write_all(t.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| slm::Error::io("standard output", e))
            })?;
        writeln!(out)?;
        if stats.stop == slm::generate::StopReason::ContextFull {
            eprintln!(
                "(stopped at the model's context length of {} tokens)",
                session_context
            );
        }
        if a.verbose {
            eprintln!(
                "prompt: {} tokens in {:.2}s ({:.1} tok/s); generated: {} tokens in {:.2}s ({:.1} tok/s); stop: {:?}",
                stats.prompt_tokens,
                stats.prefill_time.as_secs_f64(),
                stats.prefill_tokens as f64 / stats.prefill_time.as_secs_f64(),
                stats.generated_tokens,
                stats.decode_time.as_secs_f64(),
                stats.generated_tokens as f64 / stats.decode_time.as_secs_f64(),
                stats.stop
            );
        }
    }
    Ok(())
}

fn schema(path: &Path, tok: &Tokenizer) -> Result<slm::generate::Constraint> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    slm::generate::Grammars::new(tok)?
        .json_schema(&schema)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn print_beams(
    out: &mut impl Write,
    tok: &Tokenizer,
    hyps: &[Hypothesis],
    verbose: bool,
) -> Result<()> {
    for h in hyps {
        let text = tok.decode(&h.tokens, true)?;
        writeln!(out, "{}", text.replace('\n', " "))?;
        if verbose {
            eprintln!(
                "score {:.6} ({} tokens{})",
                h.score,
                h.tokens.len(),
                if h.eos { ", ended by EOS" } else { "" }
            );
        }
    }
    Ok(())
}

/// An encoder-decoder (T5): the input is encoded, the output decoded from the decoder's start.
fn run_seq2seq(a: &Args, path: &Path) -> Result<()> {
    if a.json_schema.is_some() {
        bail!("--json-schema is not supported for encoder-decoder models");
    }
    let inputs = inputs(a)?;
    let m = slm::models::seq2seq::load_seq2seq_with(path, a.model.adapter.as_deref())?;
    let tok = Tokenizer::load(&m.files)?;
    tok.check_matches(m.config.vocab_size())?;
    let model = m.model.as_ref();
    let sources = inputs
        .iter()
        .map(|t| {
            if a.no_special {
                tok.encode(t, false)
            } else {
                tok.encode_sequence(t)
            }
        })
        .collect::<slm::Result<Vec<_>>>()?;
    let mut out = std::io::stdout().lock();
    let t0 = std::time::Instant::now();
    if a.beams.beams > 1 || a.beams.num_return > 1 {
        let opts = a.beams.options(a.sampling.max_tokens, Some(model.eos()))?;
        for s in &sources {
            print_beams(&mut out, &tok, &beam::seq2seq(model, s, &opts)?, a.verbose)?;
        }
    } else if sources.len() == 1 {
        // One input: streamed as it is decoded.
        let opts = a.sampling.options();
        slm::generate::seq2seq::generate(model, &tok, &sources, &opts, &mut |_, t| {
            out.write_all(t.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| slm::Error::io("standard output", e))
        })?;
        writeln!(out)?;
    } else {
        let opts = a.sampling.options();
        let outs =
            slm::generate::seq2seq::generate(model, &tok, &sources, &opts, &mut |_, _| Ok(()))?;
        for o in outs {
            writeln!(out, "{}", o.text.replace('\n', " "))?;
        }
    }
    if a.verbose {
        eprintln!(
            "{} input(s), {} source tokens, in {:.2}s",
            sources.len(),
            sources.iter().map(Vec::len).sum::<usize>(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
