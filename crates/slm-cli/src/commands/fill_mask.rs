use std::path::PathBuf;

use anyhow::Result;
use slm::encode::Encoder;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A *ForMaskedLM model folder.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Text with one or more mask tokens ([MASK] for BERT, <mask> for RoBERTa).
    pub text: String,
    /// Candidates printed per mask.
    #[arg(long, short = 'k', default_value_t = 5, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    pub top_k: usize,
    /// One JSON array per mask: token, id, probability.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut args: Args) -> Result<()> {
    super::resolve_model(&mut args.model)?;
    let enc = Encoder::load(&args.model)?;
    let masks = enc.fill_mask(&args.text, args.top_k)?;
    if args.json {
        let out: Vec<Vec<serde_json::Value>> = masks
            .iter()
            .map(|m| {
                m.iter()
                    .map(|p| serde_json::json!({"token": p.token, "id": p.id, "probability": p.probability}))
                    .collect()
            })
            .collect();
        outln!("{}", serde_json::Value::from(out));
        return Ok(());
    }
    for (i, m) in masks.iter().enumerate() {
        if masks.len() > 1 {
            outln!("mask {}:", i + 1);
        }
        for p in m {
            outln!("{:.4}\t{}", p.probability, p.token);
        }
    }
    Ok(())
}
