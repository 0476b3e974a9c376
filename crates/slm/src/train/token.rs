//! Token classification (NER, POS tagging) data: JSONL `{"tokens": [...], "tags": [...]}`,
//! one tag per word, tokenized as pre-split words with each word's tag on its first sub-token
//! and no loss on the others or on special tokens (transformers' token-classification recipe,
//! `label_all_tokens=False`). The run itself is a [`super::classify::ClassifierRun`].

use std::path::Path;

use super::bert::Batch;
use super::TrainResult;
use crate::tokenize::{EncoderInput, Tokenizer};
use crate::Error;

#[derive(Debug, Clone)]
pub struct TokenExample {
    pub input: EncoderInput,
    /// The tag id each token learns, `None` where there is no loss.
    pub targets: Vec<Option<u32>>,
}

#[derive(Debug)]
pub struct TokenData {
    pub train: Vec<TokenExample>,
    pub valid: Vec<TokenExample>,
    /// Tag names by id, as saved in `id2label`.
    pub labels: Vec<String>,
    /// Sentences cut to the maximum length.
    pub truncated: usize,
}

type Row = (usize, Vec<String>, Vec<String>);

fn err(path: &Path, line: usize, msg: impl std::fmt::Display) -> crate::Error {
    crate::Error::Data(format!("{}: line {line}: {msg}", path.display()))
}

/// `(line, words, tags)` of every non-empty line.
fn read_rows(path: &Path) -> TrainResult<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(path, n, format!("not JSON: {e}")))?;
        let strings = |k: &str| -> TrainResult<Vec<String>> {
            let a = v.get(k).and_then(|x| x.as_array()).ok_or_else(|| {
                err(
                    path,
                    n,
                    format!("no \"{k}\" list (expected {{\"tokens\": [...], \"tags\": [...]}})"),
                )
            })?;
            a.iter()
                .map(|x| match x {
                    serde_json::Value::String(s) => Ok(s.clone()),
                    serde_json::Value::Number(n) => Ok(n.to_string()),
                    other => Err(err(path, n, format!("\"{k}\" holds {other}, not a string"))),
                })
                .collect()
        };
        let (words, tags) = (strings("tokens")?, strings("tags")?);
        if words.len() != tags.len() {
            return Err(err(
                path,
                n,
                format!("{} tokens but {} tags", words.len(), tags.len()),
            ));
        }
        if words.is_empty() {
            return Err(err(path, n, "no tokens"));
        }
        rows.push((n, words, tags));
    }
    if rows.is_empty() {
        return Err(crate::Error::Data(format!(
            "{}: no examples",
            path.display()
        )));
    }
    Ok(rows)
}

/// Reads and tokenizes the data; tags are the training set's distinct values, in numeric
/// order when all are integers, else sorted by name.
pub fn load_token_data(
    tok: &Tokenizer,
    train: &Path,
    valid: Option<&Path>,
    valid_split: f32,
    seed: u64,
    max_len: usize,
) -> TrainResult<TokenData> {
    let rows = read_rows(train)?;
    let mut labels: Vec<String> = Vec::new();
    for (_, _, tags) in &rows {
        for t in tags {
            if !labels.contains(t) {
                labels.push(t.clone());
            }
        }
    }
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    } else {
        labels.sort();
    }
    let mut truncated = 0;
    let mut examples = |path: &Path, rows: &[Row]| -> TrainResult<Vec<TokenExample>> {
        rows.iter()
            .map(|(n, words, tags)| {
                let ids = tags
                    .iter()
                    .map(|t| {
                        labels.iter().position(|l| l == t).ok_or_else(|| {
                            err(
                                path,
                                *n,
                                format!("tag '{t}' does not occur in the training data"),
                            )
                        })
                    })
                    .collect::<TrainResult<Vec<usize>>>()?;
                let (input, word_ids) = tok.encode_words(words, max_len)?;
                if input.full_len > max_len {
                    truncated += 1;
                }
                let mut previous = None;
                let targets = word_ids
                    .iter()
                    .map(|w| {
                        let first = w.is_some() && *w != previous;
                        previous = *w;
                        w.filter(|_| first).map(|w| ids[w as usize] as u32)
                    })
                    .collect();
                Ok(TokenExample { input, targets })
            })
            .collect()
    };
    let (train, valid) = match valid {
        Some(v) => {
            let vrows = read_rows(v)?;
            (examples(train, &rows)?, examples(v, &vrows)?)
        }
        None => {
            let mut all = examples(train, &rows)?;
            let valid = super::hold_out(&mut all, valid_split, seed);
            (all, valid)
        }
    };
    Ok(TokenData {
        train,
        valid,
        labels,
        truncated,
    })
}

/// Right-pads the examples (no loss on padding).
pub fn make_token_batch(examples: &[&TokenExample], pad: u32) -> Batch {
    let inputs: Vec<&EncoderInput> = examples.iter().map(|e| &e.input).collect();
    let mut b = Batch::padded(&inputs, pad);
    for e in examples {
        b.targets.extend(&e.targets);
        b.targets
            .extend(std::iter::repeat_n(None, b.t - e.targets.len()));
    }
    b
}
