use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::io::ModelFiles;
use slm::tokenize::{Message, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder or .gguf file whose tokenizer to use.
    #[arg(long, short = 'm', default_value_os_t = super::default_model())]
    model: PathBuf,
    /// The text (default: read from stdin unless --chat is given).
    text: Option<String>,
    /// Add BOS/special tokens as the model's tokenizer would.
    #[arg(long)]
    special: bool,
    /// Render a JSON list of {"role","content"} messages with the chat template (with the
    /// generation prompt) and print the rendered text and its ids.
    #[arg(long, value_name = "FILE.json")]
    chat: Option<PathBuf>,
    /// Print JSON: {"text", "ids", "tokens"}.
    #[arg(long)]
    json: bool,
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    // A folder with only tokenizer files is enough here; no weights are needed.
    let tok = if a.model.is_dir() {
        Tokenizer::from_hf_folder(&a.model)?
    } else {
        Tokenizer::load(&ModelFiles::locate(&a.model)?)?
    };
    let text = if let Some(chat) = &a.chat {
        let raw = std::fs::read_to_string(chat).with_context(|| format!("{}", chat.display()))?;
        let msgs: Vec<Message> = serde_json::from_str(&raw).with_context(|| {
            format!(
                "{}: expected a JSON list of {{\"role\", \"content\"}} messages",
                chat.display()
            )
        })?;
        let rendered = tok.chat()?.render(&msgs, true)?;
        if !a.json {
            outln!("{rendered}");
        }
        rendered
    } else {
        match a.text {
            Some(t) => t,
            None => std::io::read_to_string(std::io::stdin())?,
        }
    };
    let ids = tok.encode(&text, a.special)?;
    if a.json {
        let tokens: Vec<String> = ids
            .iter()
            .map(|&i| tok.id_to_token(i).unwrap_or_default())
            .collect();
        outln!(
            "{}",
            serde_json::json!({"text": text, "ids": ids, "tokens": tokens})
        );
    } else {
        outln!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
