//! `slm merge`: fold a LoRA adapter into its base model.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model folder the adapter was trained on (or a hub id).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// The merged model's folder.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Overwrite an existing model in OUTPUT.
    #[arg(long)]
    force: bool,
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    super::clean_stale(&a.output);
    let written = slm::io::peft::merge(&a.model, &a.adapter, &a.output, a.force)?;
    outln!("wrote {} to {}", written.join(", "), a.output.display());
    Ok(())
}
