use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to quantize: a GGUF file, or a Hugging Face folder (GPT-2, Llama family, Qwen2,
    /// Phi-3, Gemma 2/3, T5; byte-level BPE or SentencePiece tokenizer).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// A PEFT LoRA adapter to merge first (Hugging Face folder models only).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k (or f16, f32).
    #[arg(long = "type", short = 't', value_parser = quant_type)]
    kind: candle_core::quantized::GgmlDType,
    /// The GGUF file to write.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// List every tensor's source and written type.
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// An unknown type is a usage error, listed with the ones there are.
fn quant_type(s: &str) -> Result<candle_core::quantized::GgmlDType, String> {
    slm::quantize::parse_type(s).ok_or_else(|| {
        format!("unknown type '{s}' (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, f16, f32)")
    })
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    super::clean_stale_beside(&a.output);
    let bar = indicatif::ProgressBar::new(0);
    let progress = |d: usize, t: usize| {
        bar.set_length(t as u64);
        bar.set_position(d as u64);
    };
    let s = if a.model.is_dir() {
        slm::quantize::from_hf::quantize_hf(
            &a.model,
            a.adapter.as_deref(),
            a.kind,
            &a.output,
            a.force,
            progress,
        )?
    } else if a.adapter.is_some() {
        bail!("--adapter needs a Hugging Face base folder; write one from the GGUF with `slm convert`");
    } else {
        slm::quantize::quantize_gguf(&a.model, a.kind, &a.output, a.force, progress)?
    };
    bar.finish_and_clear();
    let mut counts = std::collections::BTreeMap::new();
    for (name, from, to) in &s.tensors {
        *counts.entry(format!("{to:?}")).or_insert(0) += 1;
        if a.verbose {
            outln!("{name:<32} {from:?} -> {to:?}");
        }
    }
    let types: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    outln!(
        "wrote {} ({:.1} MB): {} tensors ({})",
        a.output.display(),
        s.bytes as f64 / 1e6,
        s.tensors.len(),
        types.join(", ")
    );
    Ok(())
}
