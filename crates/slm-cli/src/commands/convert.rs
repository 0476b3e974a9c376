use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file (GPT-2, Llama, Qwen2 or Phi-3).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The Hugging Face folder to write (model.safetensors, config.json, tokenizer files).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = dtype)]
    dtype: slm::convert::Dtype,
    /// Overwrite a model already in the output folder.
    #[arg(long)]
    force: bool,
}

fn dtype(s: &str) -> Result<slm::convert::Dtype, String> {
    slm::convert::parse_dtype(s).ok_or_else(|| format!("unknown dtype '{s}' (f32, f16, bf16)"))
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    if a.model.is_dir() {
        bail!(
            "{} is a folder; convert reads a .gguf file and writes a Hugging Face folder (for the other way, `slm quantize -m FOLDER -t f32 -o model.gguf`)",
            a.model.display()
        );
    }
    super::clean_stale(&a.output);
    let names = slm::convert::gguf_to_hf(&a.model, &a.output, a.dtype, a.force)?;
    outln!(
        "wrote {} ({} tensors, {:?}, config.json, tokenizer.json, tokenizer_config.json)",
        a.output.display(),
        names.len(),
        a.dtype
    );
    Ok(())
}
