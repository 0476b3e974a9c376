use std::path::PathBuf;

use anyhow::Result;
use slm::encode::cosine_matrix;

use super::embed::PoolingArgs;
use super::encoder::{default_encoder, InputArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// An embedding model folder (BERT family; sentence-transformers pooling if it has one).
    #[arg(long, short = 'm', default_value_os_t = default_encoder())]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub pooling: PoolingArgs,
    /// Print the matrix as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut args: Args) -> Result<()> {
    super::resolve_model(&mut args.model)?;
    let (records, vectors) = args.pooling.embed(&args.model, &args.input)?;
    let m = cosine_matrix(&vectors);
    if args.json {
        outln!(
            "{}",
            serde_json::json!({"texts": records.iter().map(|r| &r.text).collect::<Vec<_>>(), "cosine": m})
        );
        return Ok(());
    }
    for (i, r) in records.iter().enumerate() {
        outln!("[{i}] {}", r.text);
    }
    out!("{:>6}", "");
    for j in 0..m.len() {
        out!("{:>8}", format!("[{j}]"));
    }
    outln!();
    for (i, row) in m.iter().enumerate() {
        out!("{:>6}", format!("[{i}]"));
        for c in row {
            out!("{c:>8.4}");
        }
        outln!();
    }
    Ok(())
}
