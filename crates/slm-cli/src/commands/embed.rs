use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use slm::encode::{Encoder, PoolMode, Pooling};

use super::encoder::{default_encoder, InputArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A BERT, DistilBERT or RoBERTa model folder (sentence-transformers folders included), or
    /// an RNN text classifier (`finetune --task classify --arch bilstm…`).
    #[arg(long, short = 'm', default_value_os_t = default_encoder())]
    pub model: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Write here instead of standard output: `.npy` gives a float32 matrix, anything else JSONL.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Replace the --output file if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub pooling: PoolingArgs,
}

/// Overrides of the pooling the model folder declares.
#[derive(clap::Args, Debug, Clone)]
pub struct PoolingArgs {
    /// mean, cls, max or mean-sqrt-len (default: from 1_Pooling/config.json, else mean).
    #[arg(long)]
    pub pooling: Option<PoolMode>,
    /// Scale embeddings to unit length (default: when modules.json lists Normalize).
    #[arg(long, overrides_with = "no_normalize")]
    pub normalize: bool,
    /// Keep the raw pooled vectors even when modules.json lists Normalize.
    #[arg(long)]
    pub no_normalize: bool,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl PoolingArgs {
    /// Loads the model, reads the input and embeds every text with the resolved pooling.
    pub fn embed(
        &self,
        model: &std::path::Path,
        input: &InputArgs,
    ) -> Result<(Vec<slm::data::Record>, Vec<Vec<f32>>)> {
        if slm::encode::rnn::is_rnn_classifier(model) {
            // A recurrent classifier's embedding is what its head reads; its pooling is part of
            // the trained model.
            if self.pooling.is_some() {
                anyhow::bail!(
                    "--pooling does not apply to an RNN classifier: its embedding is the pooling it was trained with"
                );
            }
            let m = slm::encode::rnn::RnnTextClassifier::load_with(model, self.adapter.as_deref())?;
            let records = input.records()?;
            let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
            let vectors = m.embed(&texts, input.batch_size, self.normalize)?;
            return Ok((records, vectors));
        }
        let enc = Encoder::load_with(model, self.adapter.as_deref())?;
        let records = input.records()?;
        let inputs = input.prepare(&enc, &records)?;
        let vectors = enc.embed(&inputs, input.batch_size, self.resolve(enc.pooling))?;
        Ok((records, vectors))
    }

    pub fn resolve(&self, from_model: Pooling) -> Pooling {
        Pooling {
            mode: self.pooling.unwrap_or(from_model.mode),
            normalize: if self.normalize {
                true
            } else if self.no_normalize {
                false
            } else {
                from_model.normalize
            },
        }
    }
}

pub fn run(mut args: Args) -> Result<()> {
    if let Some(p) = &args.output {
        slm::io::write::check_overwrite(p, args.force)?;
        super::clean_stale_beside(p);
    }
    super::resolve_model(&mut args.model)?;
    let (records, vectors) = args.pooling.embed(&args.model, &args.input)?;
    let jsonl = |w: &mut dyn Write| -> std::io::Result<()> {
        for (r, v) in records.iter().zip(&vectors) {
            // Written by hand so that "text" comes first, as users read it.
            let text = serde_json::Value::from(r.text.as_str());
            writeln!(
                w,
                "{{\"text\":{text},\"embedding\":{}}}",
                serde_json::Value::from(v.clone())
            )?;
        }
        Ok(())
    };
    match &args.output {
        Some(p) if p.extension().is_some_and(|e| e == "npy") => {
            slm::io::write::write_atomic(p, |w| slm::io::write::write_npy(w, &vectors))?;
            eprintln!(
                "wrote {} x {} float32 to {}",
                vectors.len(),
                vectors[0].len(),
                p.display()
            );
        }
        Some(p) => slm::io::write::write_atomic(p, |w| jsonl(w))?,
        None => jsonl(&mut std::io::stdout().lock())?,
    }
    Ok(())
}
