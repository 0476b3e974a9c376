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

/// What of a SentencePiece `ModelProto` decides how it splits text: the pieces, the algorithm
/// and the normalizer.
#[derive(Debug, Clone)]
pub struct SpmModel {
    pub pieces: Vec<Piece>,
    /// `trainer_spec.model_type`: 1 unigram (the proto's default), 2 BPE.
    pub model_type: u64,
    /// `normalizer_spec.precompiled_charsmap` (empty for the `identity` rule).
    pub charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
}

/// Parses the `pieces` field of a SentencePiece `ModelProto`.
pub fn parse_model_proto(bytes: &[u8]) -> std::result::Result<Vec<Piece>, String> {
    parse_model(bytes).map(|m| m.pieces)
}

/// Parses a SentencePiece `ModelProto` (fields 1 pieces, 2 trainer_spec, 3 normalizer_spec;
/// proto2 defaults where a field is absent).
pub fn parse_model(bytes: &[u8]) -> std::result::Result<SpmModel, String> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut m = SpmModel {
        pieces: Vec::new(),
        model_type: 1,
        charsmap: Vec::new(),
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
    };
    while r.pos < r.b.len() {
        match r.key()? {
            (1, 2) => m.pieces.push(parse_piece(r.bytes()?)?),
            (2, 2) => {
                let mut t = Reader {
                    b: r.bytes()?,
                    pos: 0,
                };
                while t.pos < t.b.len() {
                    match t.key()? {
                        (3, 0) => m.model_type = t.varint()?,
                        (_, wire) => t.skip(wire)?,
                    }
                }
            }
            (3, 2) => {
                let mut n = Reader {
                    b: r.bytes()?,
                    pos: 0,
                };
                while n.pos < n.b.len() {
                    match n.key()? {
                        (2, 2) => m.charsmap = n.bytes()?.to_vec(),
                        (3, 0) => m.add_dummy_prefix = n.varint()? != 0,
                        (4, 0) => m.remove_extra_whitespaces = n.varint()? != 0,
                        (_, wire) => n.skip(wire)?,
                    }
                }
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    if m.pieces.is_empty() {
        return Err("no pieces found; not a SentencePiece model".into());
    }
    Ok(m)
}

/// A tokenizer that splits text into the pieces SentencePiece's unigram `Encode` gives: the
/// model's charsmap, its whitespace rules (leading, trailing and repeated spaces dropped when
/// `remove_extra_whitespaces`), "▁" for spaces and before the text (`add_dummy_prefix`), words
/// split at "▁", and the Viterbi segmentation over the normal and user-defined pieces (control
/// pieces such as `</s>` never match text in SentencePiece). Its ids are positions among those
/// pieces, not the model's: callers read the pieces' text (Marian maps it through vocab.json).
pub fn unigram_splitter(m: &SpmModel) -> Result<tokenizers::Tokenizer> {
    let kept: Vec<&Piece> = m
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, 1 | 2 | 4))
        .collect();
    unigram_over(m, &kept)
}

/// SentencePiece's unigram `Encode` with the model's own ids (T5's `spiece.model`, llama.cpp's
/// `t5` vocabularies): every piece keeps its position, and the control, unknown and
/// user-defined pieces (`</s>`, `<pad>`, T5's `<extra_id_N>`) are special tokens matched whole
/// in text, as T5Tokenizer splits on them before SentencePiece sees the rest.
pub fn unigram_tokenizer(m: &SpmModel) -> Result<tokenizers::Tokenizer> {
    let all: Vec<&Piece> = m.pieces.iter().collect();
    let mut t = unigram_over(m, &all)?;
    let special: Vec<tokenizers::AddedToken> = m
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, 2..=4))
        .map(|p| {
            // T5Tokenizer's sentinels (its user-defined pieces) take the spaces around them.
            let user = p.kind == 4;
            tokenizers::AddedToken::from(p.text.clone(), true)
                .normalized(false)
                .lstrip(user)
                .rstrip(user)
        })
        .collect();
    t.add_special_tokens(special)
        .map_err(|e| Error::msg(format!("cannot add the special pieces: {e}")))?;
    let prepend = if m.add_dummy_prefix {
        tokenizers::pre_tokenizers::metaspace::PrependScheme::Always
    } else {
        tokenizers::pre_tokenizers::metaspace::PrependScheme::Never
    };
    t.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new(
        '\u{2581}', prepend, true,
    )));
    Ok(t)
}

fn unigram_over(m: &SpmModel, pieces: &[&Piece]) -> Result<tokenizers::Tokenizer> {
    use tokenizers::normalizers::{Precompiled, Replace, Sequence};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let err = |e: String| Error::msg(format!("cannot build the SentencePiece tokenizer: {e}"));
    if m.model_type != 1 {
        return Err(err(format!("model type {} is not unigram", m.model_type)));
    }
    let unk = pieces
        .iter()
        .position(|p| p.kind == 2)
        .ok_or_else(|| err("no unknown piece".into()))?;
    let vocab = pieces
        .iter()
        .map(|p| (p.text.clone(), p.score as f64))
        .collect();
    let model = tokenizers::models::unigram::Unigram::from(vocab, Some(unk), false)
        .map_err(|e| err(e.to_string()))?;
    let mut t = tokenizers::Tokenizer::new(model);
    let mut norms: Vec<tokenizers::NormalizerWrapper> = Vec::new();
    if !m.charsmap.is_empty() {
        norms.push(
            Precompiled::from(&m.charsmap)
                .map_err(|e| err(format!("bad precompiled charsmap: {e}")))?
                .into(),
        );
    }
    if m.remove_extra_whitespaces {
        for (pattern, to) in [("^ +", ""), (" +$", ""), (" {2,}", " ")] {
            let re = tokenizers::normalizers::replace::ReplacePattern::Regex(pattern.into());
            norms.push(Replace::new(re, to).map_err(|e| err(e.to_string()))?.into());
        }
    }
    t.with_normalizer(Some(Sequence::new(norms)))
        .map_err(|e| err(e.to_string()))?;
    let prepend = if m.add_dummy_prefix {
        PrependScheme::Always
    } else {
        PrependScheme::Never
    };
    t.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', prepend, true)));
    Ok(t)
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
/// two pieces of the vocabulary, ranked by the merged piece's score. Run across threads: Gemma's
/// 262,144 pieces make 514,847 merges, and building them was most of loading its GGUF.
fn merges_from_scores(pieces: &[Piece]) -> Vec<(String, String)> {
    use rayon::prelude::*;
    let vocab: std::collections::HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.as_str(), i))
        .collect();
    // (left, right, score), in piece order and within a piece by the halves' ids.
    let mut merges: Vec<(usize, usize, f32)> = pieces
        .par_iter()
        .flat_map_iter(|p| {
            let mut local: Vec<(usize, usize)> = p
                .text
                .char_indices()
                .skip(1)
                .filter_map(|(i, _)| {
                    let (l, r) = p.text.split_at(i);
                    Some((*vocab.get(l)?, *vocab.get(r)?))
                })
                .collect();
            local.sort();
            local.into_iter().map(move |(l, r)| (l, r, p.score))
        })
        .collect();
    // Stable sort by descending score, as Python's sorted(reverse=True) is stable.
    merges.par_sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_par_iter()
        .map(|(l, r, _)| (pieces[l].text.clone(), pieces[r].text.clone()))
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
    let pieces = pieces
        .iter()
        .filter(|p| matches!(p.kind, 2..=4))
        .map(|p| (p.text.clone(), p.kind != 4));
    super::add_vocab_tokens(&mut t, pieces)
        .map_err(|e| Error::msg(format!("cannot add the special pieces: {e}")))?;
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
