//! Classic text clean-up for word-level pipelines (lowercasing, accent stripping, punctuation,
//! stop words), compiled into the tokenizer itself: normalizers and a pre-tokenizer in
//! `tokenizer.json`. It is then saved with every model that uses the tokenizer and applied the
//! same way wherever the tokenizer runs (training, `classify`, `generate`, and transformers'
//! or `tokenizers`' own loaders), with no separate setting to forget.
//!
//! Only word and character tokenizers take it: subword tokenizers for transformers keep the
//! normalisation their models were trained with.

use std::path::Path;

use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::strip::StripAccents;
use tokenizers::normalizers::unicode::NFD;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::NormalizerWrapper;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Punctuation {
    /// Left where it is (`movie!` stays one word).
    #[default]
    Keep,
    /// Each punctuation character becomes a word of its own (`movie !`).
    Split,
    /// Punctuation characters are replaced by spaces.
    Remove,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preprocess {
    pub lowercase: bool,
    /// Decomposes (NFD) and drops combining marks: `café` → `cafe`.
    pub strip_accents: bool,
    pub punctuation: Punctuation,
    /// Whole words removed, matched after lowercasing and accent stripping; a word is
    /// delimited by whitespace, punctuation or the text's ends.
    pub stopwords: Vec<String>,
}

/// The stop-word list of a language (an ISO 639-1 code: `en`, `de`, `fr`, ...) from the
/// `stop-words` crate: NLTK's list where NLTK has one (English: 198 words), else the
/// stopwords-iso list.
pub fn stopwords_for(lang: &str) -> Result<Vec<String>> {
    match stop_words::lookup(lang) {
        Some(words) => Ok(words.iter().map(|w| w.to_string()).collect()),
        None => Err(Error::msg(format!(
            "no stop-word list for '{lang}'; languages: {}",
            stop_words::available_languages().join(", ")
        ))),
    }
}

/// A stop-word file: one word per line; blank lines and lines starting with `#` are skipped.
pub fn stopwords_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let words: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if words.is_empty() {
        return Err(Error::file(path, "no stop words in the file"));
    }
    if let Some(w) = words.iter().find(|w| w.contains(char::is_whitespace)) {
        return Err(Error::file(
            path,
            format!("'{w}' is not one word (one stop word per line)"),
        ));
    }
    Ok(words)
}

/// Escapes a word for an Oniguruma pattern.
fn escape(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if "\\^$.|?*+()[]{}-/#&~<>=!:,'\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Preprocess {
    pub fn is_empty(&self) -> bool {
        *self == Preprocess::default()
    }

    /// The normalizers, in the order they run: accents, case, punctuation removal, stop words.
    pub fn normalizers(&self) -> Result<Vec<NormalizerWrapper>> {
        let mut out: Vec<NormalizerWrapper> = Vec::new();
        if self.strip_accents {
            out.push(NFD.into());
            out.push(StripAccents.into());
        }
        if self.lowercase {
            out.push(Lowercase.into());
        }
        let regex = |p: &str, to: &str| -> Result<NormalizerWrapper> {
            let r = Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(p.into()),
                to,
            )
            .map_err(|e| Error::msg(format!("preprocessing pattern: {e}")))?;
            Ok(r.into())
        };
        if self.punctuation == Punctuation::Remove {
            out.push(regex(r"\p{P}", " ")?);
        }
        if !self.stopwords.is_empty() {
            // Longest first, so that "don't" goes before "don" can match inside it.
            let mut words: Vec<&String> = self.stopwords.iter().collect();
            words.sort_by_key(|w| std::cmp::Reverse(w.chars().count()));
            let alt: Vec<String> = words.iter().map(|w| escape(w)).collect();
            let pattern = format!(r"(?<![^\s\p{{P}}])(?:{})(?![^\s\p{{P}}])", alt.join("|"));
            out.push(regex(&pattern, "")?);
        }
        Ok(out)
    }

    /// A line for the user: what this preprocessing does.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.lowercase {
            parts.push("lowercase".to_string());
        }
        if self.strip_accents {
            parts.push("accents stripped".to_string());
        }
        match self.punctuation {
            Punctuation::Keep => {}
            Punctuation::Split => parts.push("punctuation split".to_string()),
            Punctuation::Remove => parts.push("punctuation removed".to_string()),
        }
        if !self.stopwords.is_empty() {
            parts.push(format!("{} stop words removed", self.stopwords.len()));
        }
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_words_match_themselves_only() {
        let p = Preprocess {
            stopwords: vec!["a.b".into(), "it's".into(), "(x)".into()],
            ..Default::default()
        };
        let n = tokenizers::normalizers::utils::Sequence::new(p.normalizers().unwrap());
        let mut s = tokenizers::NormalizedString::from("a.b axb it's (x) its");
        tokenizers::Normalizer::normalize(&n, &mut s).unwrap();
        assert_eq!(
            s.get().split_whitespace().collect::<Vec<_>>(),
            ["axb", "its"]
        );
    }
}
