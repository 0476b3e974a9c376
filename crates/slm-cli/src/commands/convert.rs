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
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Overwrite a model already in the output folder.
    #[arg(long)]
    force: bool,
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    let Some(dtype) = slm::convert::parse_dtype(&a.dtype) else {
        bail!("unknown --dtype '{}' (f32, f16, bf16)", a.dtype);
    };
    let names = slm::convert::gguf_to_hf(&a.model, &a.output, dtype, a.force)?;
    println!(
        "wrote {} ({} tensors, {:?}, config.json, tokenizer.json, tokenizer_config.json)",
        a.output.display(),
        names.len(),
        dtype
    );
    Ok(())
}
