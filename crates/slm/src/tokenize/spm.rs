//! SentencePiece models (`tokenizer.model` protobuf, or GGUF `llama` vocabularies) turned into the
//! BPE tokenizer that transformers' `LlamaConverter` builds, so both give HF's ids.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One vocabulary entry; `kind` uses SentencePiece's piece types (1 normal, 2 unknown, 3 control,
/// 4 user-defined, 6 byte), which GGUF's `tokenizer.ggml.token_type` shares.
#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: i32,
}

/// Parses the `pieces` field of a SentencePiece `ModelProto`; other fields are not needed.
pub fn parse_model_proto(bytes: &[u8]) -> std::result::Result<Vec<Piece>, String> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut pieces = Vec::new();
    while r.pos < r.b.len() {
        let (field, wire) = r.key()?;
        if field == 1 && wire == 2 {
            let sub = r.bytes()?;
            pieces.push(parse_piece(sub)?);
        } else {
            r.skip(wire)?;
        }
    }
    if pieces.is_empty() {
        return Err("no pieces found; not a SentencePiece model".into());
    }
    Ok(pieces)
}

fn parse_piece(b: &[u8]) -> std::result::Result<Piece, String> {
    let mut r = Reader { b, pos: 0 };
    let mut p = Piece {
        text: String::new(),
        score: 0.0,
        kind: 1,
    };
    while r.pos < r.b.len() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, 2) => {
                p.text = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "piece is not UTF-8")?
            }
            (2, 5) => p.score = f32::from_le_bytes(r.fixed::<4>()?),
            (3, 0) => p.kind = r.varint()? as i32,
            _ => r.skip(wire)?,
        }
    }
    Ok(p)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn key(&mut self) -> std::result::Result<(u64, u8), String> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.varint()? as usize;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn fixed<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let s = self
            .b
            .get(self.pos..self.pos + N)
            .ok_or("truncated field")?;
        self.pos += N;
        Ok(s.try_into().unwrap())
    }
    fn skip(&mut self, wire: u8) -> std::result::Result<(), String> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.fixed::<8>().map(|_| ()),
            2 => self.bytes().map(|_| ()),
            5 => self.fixed::<4>().map(|_| ()),
            w => Err(format!("unsupported protobuf wire type {w}")),
        }
    }
}

/// Merges in the order transformers' `SentencePieceExtractor` produces: every split of a piece into
/// two pieces of the vocabulary, ranked by the merged piece's score.
fn merges_from_scores(pieces: &[Piece]) -> Vec<(String, String)> {
    let vocab: std::collections::HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32, usize)> = Vec::new(); // (left, right, score, order)
    for p in pieces {
        let mut local: Vec<(usize, usize)> = Vec::new();
        for (i, _) in p.text.char_indices().skip(1) {
            let (l, r) = p.text.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri));
            }
        }
        local.sort();
        for (l, r) in local {
            let n = merges.len();
            merges.push((l, r, p.score, n));
        }
    }
    // Stable sort by descending score, as Python's sorted(reverse=True) is stable.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.3.cmp(&b.3)));
    merges
        .into_iter()
        .map(|(l, r, _, _)| (pieces[l].text.clone(), pieces[r].text.clone()))
        .collect()
}

/// A `tokenizer.json` document equal to what transformers' LlamaConverter (legacy mode) writes,
/// or with `space_prefix` false its GemmaConverter: no "▁" put before the text, none stripped
/// from the decoded text.
pub fn tokenizer_json(pieces: &[Piece], unk: Option<&str>, space_prefix: bool) -> Result<Value> {
    tokenizer_doc(pieces, unk, space_prefix, true)
}

/// The tokenizer of [`tokenizer_json`], built without the round trip through JSON for its
/// vocabulary and merges (Gemma's 262,144 pieces make 514,847 merges: parsing them back took
/// longer than computing them).
pub fn tokenizer(
    pieces: &[Piece],
    unk: Option<&str>,
    space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    use std::str::FromStr;
    let doc = tokenizer_doc(pieces, unk, space_prefix, false)?;
    let mut t = tokenizers::Tokenizer::from_str(&doc.to_string())
        .map_err(|e| Error::msg(format!("cannot build tokenizer: {e}")))?;
    let vocab: tokenizers::models::bpe::Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.clone(), i as u32))
        .collect();
    let mut b = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges_from_scores(pieces))
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(u) = unk {
        b = b.unk_token(u.to_string());
    }
    t.with_model(
        b.build()
            .map_err(|e| Error::msg(format!("cannot build tokenizer: {e}")))?,
    );
    // Added after the model, so that each takes its piece's id (added to an empty model, they
    // would get ids of their own).
    let (special, other): (Vec<_>, Vec<_>) = pieces
        .iter()
        .filter(|p| matches!(p.kind, 2..=4))
        .map(|p| {
            let special = p.kind != 4;
            tokenizers::AddedToken::from(p.text.clone(), special).normalized(!special)
        })
        .partition(|a| a.special);
    let added = |e: tokenizers::Error| Error::msg(format!("cannot add the special pieces: {e}"));
    t.add_special_tokens(special).map_err(added)?;
    t.add_tokens(other).map_err(added)?;
    Ok(t)
}

/// The document; with `full` false its model has no vocabulary or merges yet.
fn tokenizer_doc(
    pieces: &[Piece],
    unk: Option<&str>,
    space_prefix: bool,
    full: bool,
) -> Result<Value> {
    if pieces.is_empty() {
        return Err(Error::msg("empty SentencePiece vocabulary"));
    }
    let vocab: serde_json::Map<String, Value> = pieces
        .iter()
        .enumerate()
        .filter(|_| full)
        .map(|(i, p)| (p.text.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = if full {
        merges_from_scores(pieces)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect()
    } else {
        Vec::new()
    };
    let added: Vec<Value> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| full && matches!(p.kind, 2..=4))
        .map(|(i, p)| super::added_token(i as u32, &p.text, p.kind != 4))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let mut normalizers = vec![replace];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_rank_by_score_of_the_merged_piece() {
        let p = |t: &str, s: f32| Piece {
            text: t.into(),
            score: s,
            kind: 1,
        };
        let pieces = vec![
            p("a", 0.0),
            p("b", 0.0),
            p("c", 0.0),
            p("bc", -2.0),
            p("ab", -1.0),
            p("abc", -3.0),
        ];
        let m = merges_from_scores(&pieces);
        assert_eq!(m[0], ("a".to_string(), "b".to_string()));
        assert_eq!(m[1], ("b".to_string(), "c".to_string()));
        // "abc" splits as a+bc and ab+c, ordered by the ids of the halves.
        assert_eq!(
            &m[2..],
            &[("a".into(), "bc".into()), ("ab".into(), "c".into())]
        );
    }

    #[test]
    fn truncated_proto_is_an_error() {
        assert!(parse_model_proto(&[0x0a, 0x10, 0x0a]).is_err());
        assert!(parse_model_proto(&[]).is_err());
    }
}
