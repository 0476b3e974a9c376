use std::path::PathBuf;

use anyhow::Result;
use slm::encode::Encoder;

use super::encoder::InputArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A *ForSequenceClassification model folder.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// One JSON object per text with every label's probability.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let enc = Encoder::load(&args.model)?;
    let records = args.input.records()?;
    let inputs = args.input.prepare(&enc, &records)?;
    let probs = enc.classify(&inputs, args.input.batch_size)?;
    let labels = &enc.model.labels;
    for (r, p) in records.iter().zip(&probs) {
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0);
        if args.json {
            let all: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .cloned()
                .zip(p.iter().map(|&x| x.into()))
                .collect();
            let line = serde_json::json!({"text": r.text, "label": labels[best], "score": p[best], "probabilities": all});
            println!("{line}");
        } else {
            println!("{}\t{:.4}\t{}", labels[best], p[best], r.text);
        }
    }
    Ok(())
}
