//! Marian translators' tokenizer (`MarianTokenizer`; opus-mt models ship no `tokenizer.json`):
//! two SentencePiece models only split text into pieces, the source side's for inputs and the
//! target side's for labels, and one `vocab.json` gives the ids of both, which are not the
//! SentencePiece ids. Inputs may start with a target-language code such as `>>fra<<`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::spm::{self, SpmModel};
use crate::error::{Context, Error, Result};

/// The files that make a folder's tokenizer a Marian one.
pub fn is_marian_folder(dir: &Path) -> bool {
    ["source.spm", "target.spm", "vocab.json"]
        .iter()
        .all(|f| dir.join(f).exists())
}

struct Side {
    splitter: tokenizers::Tokenizer,
    /// The pieces SentencePiece knows (normal and user-defined): decoding treats others as
    /// unknown and writes them as they are.
    known: HashSet<String>,
    strip_first_space: bool,
}

impl Side {
    fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: SpmModel = spm::parse_model(&bytes).in_file(path)?;
        Ok(Self {
            splitter: spm::unigram_splitter(&m).in_file(path)?,
            known: m
                .pieces
                .iter()
                .filter(|p| matches!(p.kind, 1 | 4))
                .map(|p| p.text.clone())
                .collect(),
            strip_first_space: m.add_dummy_prefix || m.remove_extra_whitespaces,
        })
    }

    /// SentencePiece's `decode_pieces`: "▁" becomes a space, and the first piece loses the one
    /// the encoder put before the text; a piece it does not know is written as it is.
    fn decode_pieces(&self, pieces: &[&str]) -> String {
        let mut out = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let p = match p.strip_prefix('\u{2581}') {
                Some(rest) if i == 0 && self.strip_first_space && self.known.contains(*p) => rest,
                _ => p,
            };
            out.push_str(p);
        }
        out
    }
}

pub struct MarianVocab {
    source: Side,
    target: Side,
    ids: HashMap<String, u32>,
    tokens: Vec<Option<String>>,
    unk: u32,
    eos: u32,
    /// EOS, UNK and padding: whole tokens in the text, kept apart when decoding.
    specials: Vec<(String, u32)>,
    language_code: regex::Regex,
}

impl MarianVocab {
    pub fn load(dir: &Path) -> Result<Self> {
        let vp = dir.join("vocab.json");
        let text = std::fs::read_to_string(&vp).map_err(|e| Error::io(&vp, e))?;
        let ids: HashMap<String, u32> = serde_json::from_str(&text).in_file(&vp)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&t).in_file(&cfg_path)?
        } else {
            serde_json::Value::Null
        };
        let named = |key: &str, default: &str| -> Result<(String, u32)> {
            let name = super::token_str(cfg.get(key)).unwrap_or_else(|| default.to_string());
            let id = *ids.get(&name).ok_or_else(|| {
                Error::file(&vp, format!("the {key} {name:?} is not in the vocabulary"))
            })?;
            Ok((name, id))
        };
        let (eos, unk, pad) = (
            named("eos_token", "</s>")?,
            named("unk_token", "<unk>")?,
            named("pad_token", "<pad>")?,
        );
        let n = ids.values().max().map_or(0, |&m| m as usize + 1);
        let mut tokens = vec![None; n];
        for (t, &i) in &ids {
            tokens[i as usize] = Some(t.clone());
        }
        Ok(Self {
            source: Side::load(&dir.join("source.spm"))?,
            target: Side::load(&dir.join("target.spm"))?,
            unk: unk.1,
            eos: eos.1,
            specials: vec![eos, unk, pad],
            ids,
            tokens,
            language_code: regex::Regex::new(">>.+<<").expect("valid pattern"),
        })
    }

    /// The source side's splitter (its ids are not the model's).
    pub fn source_splitter(&self) -> &tokenizers::Tokenizer {
        &self.source.splitter
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize)?.clone()
    }

    /// `MarianTokenizer(text)` (or `text_target=` with `target`): special tokens in the text
    /// kept whole, a language code at the start kept as one token (and any code removed
    /// from the text, as its `re.sub` does), the pieces' ids from vocab.json (UNK for a piece
    /// it lacks), EOS at the end when `add_eos`.
    pub fn encode(&self, text: &str, target: bool, add_eos: bool) -> Result<Vec<u32>> {
        let side = if target { &self.target } else { &self.source };
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            let chunk = next.map_or(rest, |(at, _, _)| &rest[..at]);
            if !chunk.is_empty() {
                self.encode_chunk(side, chunk, &mut ids)?;
            }
            match next {
                Some((at, len, id)) => {
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => break,
            }
        }
        if add_eos {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    fn encode_chunk(&self, side: &Side, chunk: &str, ids: &mut Vec<u32>) -> Result<()> {
        let lookup = |t: &str| self.ids.get(t).copied().unwrap_or(self.unk);
        if let Some(code) = self.language_code.find(chunk).filter(|m| m.start() == 0) {
            ids.push(lookup(code.as_str()));
        }
        let text = self.language_code.replace_all(chunk, "");
        let enc = side
            .splitter
            .encode(text.as_ref(), false)
            .map_err(|e| Error::msg(format!("tokenization failed: {e}")))?;
        ids.extend(enc.get_tokens().iter().map(|t| lookup(t)));
        Ok(())
    }

    /// `MarianTokenizer.decode`: the target side's SentencePiece joins the pieces between
    /// special tokens; a special token kept is followed by a space; the text is stripped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let special = |id: u32| self.specials.iter().any(|s| s.1 == id);
        let mut out = String::new();
        let mut run: Vec<&str> = Vec::new();
        for &id in ids {
            let tok = self
                .tokens
                .get(id as usize)
                .and_then(|t| t.as_deref())
                .unwrap_or(self.specials[1].0.as_str());
            if special(id) || self.tokens.get(id as usize).is_none_or(|t| t.is_none()) {
                if skip_special {
                    continue;
                }
                out.push_str(&self.target.decode_pieces(&run));
                run.clear();
                out.push_str(tok);
                out.push(' ');
            } else {
                run.push(tok);
            }
        }
        out.push_str(&self.target.decode_pieces(&run));
        out.replace('\u{2581}', " ").trim().to_string()
    }
}
