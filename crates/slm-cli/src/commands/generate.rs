use std::io::Write;

use anyhow::Result;
use slm::generate::Session;

use super::{ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt (default: read from stdin).
    prompt: Option<String>,
    /// Do not add BOS/special tokens to the prompt.
    #[arg(long)]
    no_special: bool,
    /// The output must be a JSON document valid under this JSON schema (a file), enforced token
    /// by token (`{"type": "object"}` for any JSON object).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// Print timings to stderr at the end.
    #[arg(long, short = 'v')]
    verbose: bool,
}

pub fn run(a: Args) -> Result<()> {
    let prompt = match a.prompt {
        Some(p) => p,
        None => std::io::read_to_string(std::io::stdin())?,
    };
    let (mut m, tok) = super::load(&a.model)?;
    let ids = tok.encode(&prompt, !a.no_special)?;
    let constraint = match &a.json_schema {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
            let c = slm::generate::Grammars::new(&tok)?
                .json_schema(&schema)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(c)
        }
        None => None,
    };
    let session_context = m.model.context_length();
    let mut session = Session::new(m.model.as_mut());
    let mut out = std::io::stdout().lock();
    let opts = a.sampling.options();
    let (_, stats) = session.generate_with(&tok, &ids, &opts, constraint, &mut |t| {
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
    Ok(())
}
