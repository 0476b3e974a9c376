//! Options and input reading shared by the encoder commands (embed, similarity, classify).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use slm::data::{self, Columns, Format, Record};
use slm::encode::Encoder;
use slm::tokenize::EncoderInput;

/// The default embedding model, all-MiniLM-L6-v2: from SLM_ASSETS when the shared assets are
/// there, else its hub repo (from the cache, or downloaded on first use).
pub fn default_encoder() -> PathBuf {
    let local = slm::assets_dir().join("models/all-MiniLM-L6-v2");
    if local.exists() {
        local
    } else {
        PathBuf::from("sentence-transformers/all-MiniLM-L6-v2")
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct InputArgs {
    /// Texts to process; without any, texts are read from --input or standard input.
    pub texts: Vec<String>,
    /// One text per line, JSONL (a `text` field), or CSV/TSV with a header; by extension.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// The column (CSV/TSV) or field (JSONL) holding the text.
    #[arg(long)]
    pub column: Option<String>,
    /// The column or field holding a second text, encoded as a pair.
    #[arg(long)]
    pub pair_column: Option<String>,
    /// Skip empty texts instead of stopping with an error.
    #[arg(long)]
    pub skip_empty: bool,
    /// Texts per forward pass (sorted by length, padded per batch).
    #[arg(long, default_value_t = 32, allow_negative_numbers = true, value_parser = crate::parse::positive)]
    pub batch_size: usize,
    /// Tokens per text, special tokens included (default: the model's limit, e.g. MiniLM's 256).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Stop with an error on a text over the limit, instead of truncating it with a warning.
    #[arg(long)]
    pub no_truncate: bool,
}

impl InputArgs {
    pub fn records(&self) -> Result<Vec<Record>> {
        let cols = Columns {
            text: self.column.clone(),
            pair: self.pair_column.clone(),
            label: None,
        };
        if !self.texts.is_empty() {
            let records: Vec<Record> = (self.texts.iter().enumerate())
                .map(|(i, t)| Record {
                    text: t.clone(),
                    pair: None,
                    label: None,
                    line: i + 1,
                })
                .collect();
            if let Some(r) = records.iter().find(|r| r.text.trim().is_empty()) {
                anyhow::bail!("text argument {} is empty", r.line);
            }
            return Ok(records);
        }
        match &self.input {
            Some(p) => Ok(data::read_records(p, &cols, self.skip_empty)?),
            None => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading standard input")?;
                let records = data::parse(&s, Format::Lines, &cols)
                    .map_err(|m| anyhow::anyhow!("<stdin>: {m}"))?;
                let records: Vec<Record> = if self.skip_empty {
                    records
                        .into_iter()
                        .filter(|r| !r.text.trim().is_empty())
                        .collect()
                } else {
                    if let Some(r) = records.iter().find(|r| r.text.trim().is_empty()) {
                        anyhow::bail!(
                            "<stdin>: line {}: empty text (remove the line or pass --skip-empty)",
                            r.line
                        );
                    }
                    records
                };
                anyhow::ensure!(
                    !records.is_empty(),
                    "no texts given (arguments, --input FILE or standard input)"
                );
                Ok(records)
            }
        }
    }

    /// Tokenizes the records, warning once about truncated ones.
    pub fn prepare(&self, enc: &Encoder, records: &[Record]) -> Result<Vec<EncoderInput>> {
        let texts: Vec<(&str, Option<&str>)> = records
            .iter()
            .map(|r| (r.text.as_str(), r.pair.as_deref()))
            .collect();
        let max_len = self.max_length.unwrap_or(enc.max_len);
        let (inputs, cut) = enc.prepare(&texts, max_len, true)?;
        if let (Some(&first), true) = (cut.first(), self.no_truncate) {
            anyhow::bail!(
                "line {}: the text has {} tokens, more than the limit of {max_len} (raise --max-length, or drop --no-truncate to truncate)",
                records[first].line,
                inputs[first].full_len
            );
        }
        if let Some(&first) = cut.first() {
            eprintln!(
                "warning: {} text(s) longer than {max_len} tokens were truncated (first: line {}); --no-truncate makes this an error",
                cut.len(),
                records[first].line
            );
        }
        Ok(inputs)
    }
}
