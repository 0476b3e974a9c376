//! SentencePiece BPE vocabularies (GGUF `llama` models such as Gemma and TinyLlama, and
//! `tokenizer.model` files) encoded straight from their pieces and scores.
//!
//! transformers turns such a vocabulary into a `tokenizers` BPE with one merge for every way of
//! splitting a piece in two, ranked by the piece's score ([`super::spm::tokenizer`] builds exactly
//! that, and stays the reference in tests). For Gemma's 262,144 pieces that is 514,847 merges and
//! three hash maps of strings: about 100 MB, built while the weights load, and most of the load
//! time. A merge's rank is a function of its two halves: the merged piece's score (higher first),
//! then its id, then the halves' ids. So here it is worked out when a pair is met, from one index
//! of ids by text, and the merge loop is `tokenizers`' own (lowest rank first, then leftmost;
//! stale queue entries skipped the same way): the ids are the same, from a few MB.
//!
//! Special pieces are split off first as `tokenizers`' `AddedVocabulary` does: control and
//! unknown pieces on the raw text, user-defined ones on the normalized text, both
//! leftmost-longest.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use aho_corasick::{AhoCorasick, MatchKind};
use hashbrown::{DefaultHashBuilder, HashTable};

use super::spm::Piece;
use crate::error::{Error, Result};

const SPACE: char = '\u{2581}';
const NO_ID: u32 = u32::MAX;

pub struct SpmBpe {
    /// Piece `i` is `text[starts[i]..starts[i + 1]]`.
    text: String,
    starts: Vec<u32>,
    scores: Vec<f32>,
    /// SentencePiece's piece types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
    kinds: Vec<u8>,
    /// Piece ids by text.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// The `<0xXX>` piece of each byte (`NO_ID` where the vocabulary has none).
    bytes: Box<[u32; 256]>,
    unk: Option<u32>,
    space_prefix: bool,
    special: Option<Matcher>,
    user: Option<Matcher>,
}

/// Pieces matched whole in text, leftmost-longest, with their ids.
struct Matcher {
    ac: AhoCorasick,
    ids: Vec<u32>,
}

impl Matcher {
    fn new(found: Vec<(String, u32)>) -> Result<Option<Self>> {
        if found.is_empty() {
            return Ok(None);
        }
        let (patterns, ids): (Vec<String>, Vec<u32>) = found.into_iter().unzip();
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| Error::msg(format!("cannot index the special pieces: {e}")))?;
        Ok(Some(Self { ac, ids }))
    }
}

/// `text` cut at the matches of `m`: `(Some(id), match)` for each match and `(None, text)` for
/// the non-empty stretches between them.
fn split<'a>(m: Option<&Matcher>, text: &'a str, out: &mut Vec<(Option<u32>, &'a str)>) {
    out.clear();
    let mut at = 0;
    if let Some(m) = m {
        for hit in m.ac.find_iter(text) {
            if hit.start() > at {
                out.push((None, &text[at..hit.start()]));
            }
            out.push((Some(m.ids[hit.pattern().as_usize()]), &text[hit.range()]));
            at = hit.end();
        }
    }
    if at < text.len() {
        out.push((None, &text[at..]));
    }
}

/// A candidate merge of the symbols at `pos` and the one after it. The heap pops the greatest:
/// the earliest in transformers' merge list, then the leftmost.
struct Merge {
    score: f32,
    new_id: u32,
    left: u32,
    right: u32,
    pos: usize,
}

impl Ord for Merge {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then(o.new_id.cmp(&self.new_id))
            .then(o.left.cmp(&self.left))
            .then(o.right.cmp(&self.right))
            .then(o.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Merge {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Merge {}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    gone: bool,
}

const NONE: usize = usize::MAX;

impl SpmBpe {
    /// None where two pieces share a text: transformers' maps then keep the last, and the
    /// tokenizer it builds is the one to use.
    pub fn new(pieces: &[Piece], unk: Option<&str>, space_prefix: bool) -> Result<Option<Self>> {
        if pieces.is_empty() {
            return Err(Error::msg("empty SentencePiece vocabulary"));
        }
        if pieces.len() >= NO_ID as usize {
            return Err(Error::msg("SentencePiece vocabulary too large"));
        }
        let mut text = String::with_capacity(pieces.iter().map(|p| p.text.len()).sum());
        let mut starts = Vec::with_capacity(pieces.len() + 1);
        for p in pieces {
            starts.push(text.len() as u32);
            text.push_str(&p.text);
        }
        starts.push(text.len() as u32);
        let mut t = Self {
            text,
            starts,
            scores: pieces.iter().map(|p| p.score).collect(),
            kinds: pieces.iter().map(|p| p.kind.clamp(0, 255) as u8).collect(),
            index: HashTable::with_capacity(pieces.len()),
            hasher: DefaultHashBuilder::default(),
            bytes: Box::new([NO_ID; 256]),
            unk: None,
            space_prefix,
            special: None,
            user: None,
        };
        let (text, starts) = (&t.text, &t.starts);
        let at = |i: u32| &text[starts[i as usize] as usize..starts[i as usize + 1] as usize];
        for id in 0..pieces.len() as u32 {
            let s = at(id);
            let h = t.hasher.hash_one(s);
            if t.index.find(h, |&i| at(i) == s).is_some() {
                return Ok(None);
            }
            t.index.insert_unique(h, id, |&i| t.hasher.hash_one(at(i)));
        }
        for b in 0..=255u8 {
            t.bytes[b as usize] = t.id(&format!("<{b:#04X}>")).unwrap_or(NO_ID);
        }
        t.unk = unk.and_then(|u| t.id(u));
        // What transformers adds as tokens: control and unknown pieces as special tokens
        // (matched as written), user-defined ones as normalized tokens (matched after the
        // normalizer, which also runs over their own text).
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if p.text.is_empty() {
                continue;
            }
            match p.kind {
                2 | 3 => special.push((p.text.clone(), i as u32)),
                4 => user.push((t.normalize(&p.text), i as u32)),
                _ => {}
            }
        }
        t.special = Matcher::new(special)?;
        t.user = Matcher::new(user)?;
        Ok(Some(t))
    }

    fn piece_text(&self, id: u32) -> &str {
        &self.text[self.starts[id as usize] as usize..self.starts[id as usize + 1] as usize]
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.len()).then(|| self.piece_text(id))
    }

    pub fn id(&self, s: &str) -> Option<u32> {
        let h = self.hasher.hash_one(s);
        self.index.find(h, |&i| self.piece_text(i) == s).copied()
    }

    /// Whether transformers treats the piece as a special token (skipped when decoding with
    /// `skip_special`).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.kinds.get(id as usize), Some(2 | 3))
    }

    /// The pieces back, for building transformers' form of this tokenizer where a library
    /// needs it.
    pub fn pieces(&self) -> Vec<Piece> {
        (0..self.len() as u32)
            .map(|i| Piece {
                text: self.piece_text(i).to_string(),
                score: self.scores[i as usize],
                kind: self.kinds[i as usize] as i32,
            })
            .collect()
    }

    pub fn unk_text(&self) -> Option<&str> {
        self.unk.map(|u| self.piece_text(u))
    }

    pub fn space_prefix(&self) -> bool {
        self.space_prefix
    }

    /// transformers' normalizer for these vocabularies: "▁" before the text (unless the model
    /// says not to), spaces as "▁".
    fn normalize(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 3);
        if self.space_prefix && !s.is_empty() {
            out.push(SPACE);
        }
        out.extend(s.chars().map(|c| if c == ' ' { SPACE } else { c }));
        out
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut parts = Vec::new();
        split(self.special.as_ref(), text, &mut parts);
        for &(id, part) in &parts {
            if let Some(id) = id {
                ids.push(id);
                continue;
            }
            let norm = self.normalize(part);
            let mut inner = Vec::new();
            split(self.user.as_ref(), &norm, &mut inner);
            for &(id, word) in &inner {
                match id {
                    Some(id) => ids.push(id),
                    None => self.bpe(word, &mut ids),
                }
            }
        }
        ids
    }

    /// The merge of two pieces, where their texts joined are a piece.
    fn merge(&self, left: u32, right: u32, pos: usize, buf: &mut String) -> Option<Merge> {
        buf.clear();
        buf.push_str(self.piece_text(left));
        buf.push_str(self.piece_text(right));
        let new_id = self.id(buf)?;
        Some(Merge {
            score: self.scores[new_id as usize],
            new_id,
            left,
            right,
            pos,
        })
    }

    /// One normalized word, as `tokenizers`' BPE `merge_word` and `Word::merge_all` do it.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(word.len());
        let add = |syms: &mut Vec<Symbol>, id: u32| {
            let n = syms.len();
            syms.push(Symbol {
                id,
                prev: if n == 0 { NONE } else { n - 1 },
                next: n + 1,
                gone: false,
            });
        };
        // A run of unknown characters becomes one unknown piece (fuse_unk). Characters that
        // fall back to bytes leave a pending unknown piece pending, as in `tokenizers`.
        let mut unk = false;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(id) = self.id(s) {
                if std::mem::take(&mut unk) {
                    add(&mut syms, self.unk.unwrap_or(NO_ID));
                }
                add(&mut syms, id);
            } else if s.bytes().all(|b| self.bytes[b as usize] != NO_ID) {
                for b in s.bytes() {
                    add(&mut syms, self.bytes[b as usize]);
                }
            } else if self.unk.is_some() {
                unk = true;
            }
        }
        if unk {
            add(&mut syms, self.unk.unwrap_or(NO_ID));
        }
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        let mut buf = String::new();
        let mut queue: BinaryHeap<Merge> = syms
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| self.merge(w[0].id, w[1].id, pos, &mut buf))
            .collect();
        while let Some(top) = queue.pop() {
            let cur = syms[top.pos];
            if cur.gone || cur.next == NONE {
                continue;
            }
            let right = syms[cur.next];
            // A stale entry: the pair there no longer makes this piece.
            if self
                .merge(cur.id, right.id, top.pos, &mut buf)
                .is_none_or(|m| m.new_id != top.new_id)
            {
                continue;
            }
            syms[top.pos].id = top.new_id;
            syms[top.pos].next = right.next;
            syms[cur.next].gone = true;
            if right.next != NONE {
                syms[right.next].prev = top.pos;
            }
            let cur = syms[top.pos];
            if cur.prev != NONE {
                if let Some(m) = self.merge(syms[cur.prev].id, cur.id, cur.prev, &mut buf) {
                    queue.push(m);
                }
            }
            if cur.next != NONE {
                if let Some(m) = self.merge(cur.id, syms[cur.next].id, top.pos, &mut buf) {
                    queue.push(m);
                }
            }
        }
        out.extend(syms.iter().filter(|s| !s.gone).map(|s| s.id));
    }

    /// transformers' decoder for these vocabularies: "▁" as a space, runs of `<0xXX>` pieces
    /// as UTF-8 (one U+FFFD per byte where a run is not valid UTF-8), and one leading space
    /// dropped where the normalizer put one.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        fn flush(out: &mut String, bytes: &mut Vec<u8>) {
            if bytes.is_empty() {
                return;
            }
            match std::str::from_utf8(bytes) {
                Ok(s) => out.push_str(s),
                Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
            }
            bytes.clear();
        }
        let (mut out, mut bytes) = (String::new(), Vec::new());
        for &id in ids {
            let Some(p) = self.piece(id) else { continue };
            if skip_special && self.is_special(id) {
                continue;
            }
            let byte = (p.len() == 6 && p.starts_with("<0x") && p.ends_with('>'))
                .then(|| u8::from_str_radix(&p[3..5], 16).ok())
                .flatten();
            match byte {
                Some(b) => bytes.push(b),
                None => {
                    flush(&mut out, &mut bytes);
                    out.extend(p.chars().map(|c| if c == SPACE { ' ' } else { c }));
                }
            }
        }
        flush(&mut out, &mut bytes);
        if self.space_prefix && out.starts_with(' ') {
            out.remove(0);
        }
        out
    }
}
