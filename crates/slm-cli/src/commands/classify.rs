use std::path::PathBuf;

use anyhow::Result;
use slm::data::Record;
use slm::encode::Encoder;

use super::encoder::InputArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A *ForSequenceClassification model folder (or *ForTokenClassification: a label per token).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// One JSON object per text with every label's probability.
    #[arg(long)]
    pub json: bool,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// One line per text: the best label, its probability and the text (or all of it as JSON).
fn print_sequence_labels(
    json: bool,
    labels: &[String],
    records: &[Record],
    probs: &[Vec<f32>],
) -> Result<()> {
    for (r, p) in records.iter().zip(probs) {
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0);
        if json {
            let all: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .cloned()
                .zip(p.iter().map(|&x| x.into()))
                .collect();
            let line = serde_json::json!({"text": r.text, "label": labels[best], "score": p[best], "probabilities": all});
            outln!("{line}");
        } else {
            outln!("{}\t{:.4}\t{}", labels[best], p[best], r.text);
        }
    }
    Ok(())
}

pub fn run(mut args: Args) -> Result<()> {
    super::resolve_model(&mut args.model)?;
    if slm::encode::rnn::is_rnn_classifier(&args.model) {
        let m =
            slm::encode::rnn::RnnTextClassifier::load_with(&args.model, args.adapter.as_deref())?;
        let records = args.input.records()?;
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        let probs = m.classify(&texts, args.input.batch_size)?;
        return print_sequence_labels(args.json, &m.cfg.labels, &records, &probs);
    }
    let enc = Encoder::load_with(&args.model, args.adapter.as_deref())?;
    let records = args.input.records()?;
    let inputs = args.input.prepare(&enc, &records)?;
    let labels = &enc.model.labels;
    let best = |p: &[f32]| {
        (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .unwrap_or(0)
    };
    if enc.model.task == slm::models::bert::Task::TokenClassification {
        let per_token = enc.classify_tokens(&inputs, args.input.batch_size)?;
        for ((r, inp), probs) in records.iter().zip(&inputs).zip(&per_token) {
            let tags: Vec<serde_json::Value> = (inp.ids.iter().zip(probs))
                .map(|(&id, p)| {
                    let token = enc.tokenizer.id_to_token(id).unwrap_or_default();
                    let b = best(p);
                    serde_json::json!({"token": token, "label": labels[b], "score": p[b]})
                })
                .collect();
            if args.json {
                outln!("{}", serde_json::json!({"text": r.text, "tokens": tags}));
            } else {
                outln!("{}", r.text);
                for t in &tags {
                    outln!(
                        "  {}\t{}\t{:.4}",
                        t["token"].as_str().unwrap_or(""),
                        t["label"].as_str().unwrap_or(""),
                        t["score"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
        return Ok(());
    }
    let probs = enc.classify(&inputs, args.input.batch_size)?;
    print_sequence_labels(args.json, labels, &records, &probs)
}
