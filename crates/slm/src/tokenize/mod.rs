//! Tokenizers from every place a model keeps one: `tokenizer.json`, GPT-2 style `vocab.json` +
//! `merges.txt` (or `encoder.json` + `vocab.bpe`), SentencePiece `tokenizer.model`, and GGUF
//! metadata. All become a HF `tokenizers` pipeline, so ids equal transformers', except
//! SentencePiece BPE vocabularies, which encode from their pieces (`spm_bpe.rs`) with the same
//! ids and build that pipeline only when a library asks for it.

pub mod chat;
mod formats;
pub mod gguf_vocab;
pub mod marian;
pub mod preprocess;
pub mod spm;
pub mod spm_bpe;
pub mod to_gguf;
pub mod train;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value};

use crate::error::{Context, Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::{ModelFiles, WeightFormat};

pub use chat::{ChatTemplate, Message};
pub use formats::gpt2_json;
pub(crate) use formats::{added_tokens, bpe_files, is_roberta_style, spm_model, wordpiece_json};
use formats::{
    ids_of, is_word_list_folder, read_json, token_str, word_list_json, wordpiece_txt_json,
};

/// Adds `(text, special)` tokens to a tokenizer whose model already holds them, so that each
/// keeps its vocabulary id (added to an empty model, they would get ids of their own).
pub(crate) fn add_vocab_tokens(
    t: &mut tokenizers::Tokenizer,
    tokens: impl Iterator<Item = (String, bool)>,
) -> std::result::Result<(), tokenizers::Error> {
    let (special, other): (Vec<_>, Vec<_>) = tokens
        .map(|(text, special)| tokenizers::AddedToken::from(text, special).normalized(!special))
        .partition(|a| a.special);
    t.add_special_tokens(special)?;
    t.add_tokens(other)?;
    Ok(())
}

pub(crate) fn added_token(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": !special, "special": special})
}

pub struct Tokenizer {
    /// transformers' tokenizer; for a SentencePiece BPE vocabulary (`spm`) built only if
    /// something asks for it (encoder pairs, constrained decoding).
    inner: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// SentencePiece BPE vocabularies encode and decode here, from their pieces (`spm_bpe.rs`).
    spm: Option<std::sync::Arc<spm_bpe::SpmBpe>>,
    /// Where the tokenizer came from, for error messages.
    pub origin: PathBuf,
    pub bos: Option<u32>,
    /// Every id that ends generation (the EOS token, plus generation_config's list).
    pub eos: Vec<u32>,
    /// Whether BOS/EOS are added by us (GGUF and legacy files) rather than by the tokenizer's own
    /// post-processor (tokenizer.json).
    manual_specials: bool,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    /// Marian's two SentencePiece models and vocab.json, which give the ids instead of `inner`.
    marian: Option<std::sync::Arc<marian::MarianVocab>>,
    /// T5Tokenizer's conventions for a unigram SentencePiece (`spiece.model`, llama.cpp's `t5`):
    /// EOS added only where the text does not end with it, and special tokens kept in decoded
    /// text joined as its `convert_tokens_to_string` joins them.
    t5_rules: bool,
}

fn from_json(doc: &Value, origin: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_str(&doc.to_string())
        .map_err(|e| Error::file(origin, format!("cannot build tokenizer: {e}")))
}

/// The tokenizers crate checks a template's special tokens when one is built in code, not when it
/// is read from JSON, and then panics at the first encode: check them here, by name.
fn check_templates(processor: Option<&Value>, origin: &Path) -> Result<()> {
    let Some(p) = processor.filter(|p| !p.is_null()) else {
        return Ok(());
    };
    match p.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for inner in p
                .get("processors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                check_templates(Some(inner), origin)?;
            }
        }
        Some("TemplateProcessing") => {
            let known = p.get("special_tokens").and_then(Value::as_object);
            for part in ["single", "pair"] {
                let pieces = p.get(part).and_then(Value::as_array).into_iter().flatten();
                for id in pieces.filter_map(|x| x.pointer("/SpecialToken/id")) {
                    let id = id.as_str().unwrap_or_default();
                    if !known.is_some_and(|k| k.contains_key(id)) {
                        return Err(Error::file(
                            origin,
                            format!(
                                "post_processor's '{part}' template uses special token '{id}', \
                                 which its special_tokens do not define"
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Ids, segment ids and the untruncated length of one encoder input.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Length with special tokens before truncation; above `ids.len()` when truncated.
    pub full_len: usize,
}

impl Tokenizer {
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, origin: PathBuf) -> Self {
        let mut t = Self::without_inner(origin);
        t.inner = inner.into();
        t
    }

    fn without_inner(origin: PathBuf) -> Self {
        Self {
            inner: std::sync::OnceLock::new(),
            spm: None,
            origin,
            bos: None,
            eos: Vec::new(),
            manual_specials: true,
            add_bos: false,
            add_eos: false,
            chat_template: None,
            marian: None,
            t5_rules: false,
        }
    }

    /// The tokenizer of a located model.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        match &files.format {
            WeightFormat::Gguf(p) if files.file("tokenizer.json").is_none() => {
                Self::from_gguf(&*GgufFile::open_shared(p)?)
            }
            _ => Self::from_hf_folder(&files.root),
        }
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let mut t = if g.meta_str("tokenizer.ggml.model") == Some("llama") {
            let (pieces, unk, space_prefix) = gguf_vocab::spm_vocab(g)?;
            Self::from_spm_bpe(&g.path, &pieces, unk.as_deref(), space_prefix)?
        } else if g.meta_str("tokenizer.ggml.model") == Some("gpt2") {
            Self::from_tokenizer(gguf_vocab::gpt2_tokenizer(g)?, g.path.clone())
        } else {
            Self::from_tokenizer(
                from_json(&gguf_vocab::tokenizer_json(g)?, &g.path)?,
                g.path.clone(),
            )
        };
        let id = |k: &str| g.meta_u64(k).map(|v| v as u32);
        t.bos = id("tokenizer.ggml.bos_token_id");
        t.eos = [
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.eot_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        t.eos.dedup();
        let model = g.meta_str("tokenizer.ggml.model");
        // llama.cpp's defaults: BOS before SentencePiece (llama) texts, EOS after T5's.
        t.add_bos = g
            .meta_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(model == Some("llama"));
        t.add_eos = g
            .meta_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(model == Some("t5"));
        t.t5_rules = model == Some("t5");
        t.chat_template = g.meta_str("tokenizer.chat_template").map(String::from);
        if g.architecture().is_ok_and(|a| a.starts_with("gemma")) {
            // Gemma files often carry no template; a turn ends with <end_of_turn>.
            t.chat_template
                .get_or_insert_with(|| chat::GEMMA.to_string());
            if let Some(id) = t.token_to_id("<end_of_turn>") {
                t.eos.push(id);
            }
        }
        Ok(t)
    }

    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let mut t = if tj.exists() {
            check_templates(read_json(&tj)?.get("post_processor"), &tj)?;
            let mut inner = tokenizers::Tokenizer::from_file(&tj)
                .map_err(|e| Error::file(&tj, format!("cannot read tokenizer: {e}")))?;
            // Padding and truncation are the caller's business (batching, --max-length), not a
            // property of the vocabulary; sentence-transformers' files ship with both enabled.
            inner.with_padding(None);
            inner
                .with_truncation(None)
                .map_err(|e| Error::file(&tj, e))?;
            let mut t = Self::from_tokenizer(inner, tj.clone());
            t.manual_specials = false;
            t
        } else if marian::is_marian_folder(dir) {
            let vocab = marian::MarianVocab::load(dir)?;
            let splitter = vocab.source_splitter().clone();
            let mut t = Self::from_tokenizer(splitter, dir.join("source.spm"));
            t.marian = Some(std::sync::Arc::new(vocab));
            t.manual_specials = false;
            t
        } else if let Some((v, m)) = bpe_files(dir) {
            let roberta = is_roberta_style(dir);
            let mut t = Self::from_tokenizer(from_json(&gpt2_json(&v, &m, roberta)?, &v)?, v);
            t.manual_specials = !roberta;
            t
        } else if dir.join("vocab.txt").exists() && is_word_list_folder(dir) {
            let p = dir.join("vocab.txt");
            Self::from_tokenizer(from_json(&word_list_json(&p)?, &p)?, p)
        } else if dir.join("vocab.txt").exists() {
            let p = dir.join("vocab.txt");
            let mut t = Self::from_tokenizer(from_json(&wordpiece_txt_json(dir, &p)?, &p)?, p);
            t.manual_specials = false;
            t
        } else if let Some((p, m, unigram)) = spm_model(dir)? {
            match unigram {
                true => Self::from_unigram_folder(dir, &p, m)?,
                false => Self {
                    add_bos: true,
                    ..Self::from_spm_pieces(&p, m.pieces)?
                },
            }
        } else {
            return Err(Error::file(
                dir,
                "no tokenizer found (tokenizer.json, vocab.json + merges.txt, vocab.txt, spiece.model or tokenizer.model)",
            ));
        };
        let tc = dir.join("tokenizer_config.json");
        if tc.exists() {
            let cfg = read_json(&tc)?;
            t.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str().map(String::from)),
                _ => None,
            };
            let id = |k: &str| token_str(cfg.get(k)).and_then(|s| t.token_to_id(&s));
            let (bos, eos) = (id("bos_token"), id("eos_token"));
            t.bos = bos;
            t.eos.extend(eos);
            if let Some(b) = cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
                t.add_bos = b;
            }
            if let Some(b) = cfg.get("add_eos_token").and_then(|v| v.as_bool()) {
                t.add_eos = b;
            }
        }
        if dir.join("chat_template.jinja").exists() {
            let p = dir.join("chat_template.jinja");
            t.chat_template = Some(std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?);
        }
        for f in ["generation_config.json", "config.json"] {
            let p = dir.join(f);
            if p.exists() {
                let v = read_json(&p)?;
                t.eos.extend(ids_of(v.get("eos_token_id")));
                if t.bos.is_none() {
                    t.bos = ids_of(v.get("bos_token_id")).first().copied();
                }
            }
        }
        t.eos.sort();
        t.eos.dedup();
        Ok(t)
    }

    /// T5's tokenizer from its SentencePiece unigram model (`spiece.model`) without a
    /// `tokenizer.json`, as `T5Tokenizer` reads it: the pieces' own ids, the sentinels
    /// (`<extra_id_N>`, from `added_tokens.json` or `tokenizer_config.json`) after them, and
    /// `</s>` closing every text.
    fn from_unigram_folder(dir: &Path, path: &Path, mut m: spm::SpmModel) -> Result<Self> {
        for (id, text, _) in added_tokens(dir, m.pieces.len())? {
            match (id as usize).cmp(&m.pieces.len()) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => m.pieces.push(spm::Piece {
                    text,
                    score: 0.0,
                    kind: 4,
                }),
                std::cmp::Ordering::Greater => {
                    return Err(Error::file(
                        dir,
                        format!(
                            "added token '{text}' has id {id}, but the vocabulary ends at {}",
                            m.pieces.len()
                        ),
                    ))
                }
            }
        }
        let inner = spm::unigram_tokenizer(&m).in_file(path)?;
        let mut t = Self::from_tokenizer(inner, path.to_path_buf());
        t.eos = t.token_to_id("</s>").into_iter().collect();
        t.add_eos = true;
        t.t5_rules = true;
        Ok(t)
    }

    /// A SentencePiece `tokenizer.model`, converted the way transformers does.
    pub fn from_spm_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_spm_pieces(path, spm::parse_model_proto(&bytes).in_file(path)?)
    }

    fn from_spm_pieces(path: &Path, pieces: Vec<spm::Piece>) -> Result<Self> {
        let unk = pieces.iter().find(|p| p.kind == 2).map(|p| p.text.clone());
        let mut t = Self::from_spm_bpe(path, &pieces, unk.as_deref(), true)?;
        let find = |s: &str| pieces.iter().position(|p| p.text == s).map(|i| i as u32);
        t.bos = find("<s>");
        t.eos = find("</s>").into_iter().collect();
        Ok(t)
    }

    /// A SentencePiece BPE vocabulary, encoded from its pieces; transformers' form of it only
    /// where two pieces share a text (its maps keep the last of them).
    fn from_spm_bpe(
        path: &Path,
        pieces: &[spm::Piece],
        unk: Option<&str>,
        space_prefix: bool,
    ) -> Result<Self> {
        Ok(
            match spm_bpe::SpmBpe::new(pieces, unk, space_prefix).in_file(path)? {
                Some(m) => {
                    let mut t = Self::without_inner(path.to_path_buf());
                    t.spm = Some(std::sync::Arc::new(m));
                    t
                }
                None => Self::from_tokenizer(
                    spm::tokenizer(pieces, unk, space_prefix).in_file(path)?,
                    path.to_path_buf(),
                ),
            },
        )
    }

    /// transformers' tokenizer, built on first use for a SentencePiece BPE vocabulary.
    fn hf(&self) -> Result<&tokenizers::Tokenizer> {
        if let Some(t) = self.inner.get() {
            return Ok(t);
        }
        let m = self
            .spm
            .as_ref()
            .ok_or_else(|| Error::file(&self.origin, "no tokenizer was built"))?;
        let built =
            spm::tokenizer(&m.pieces(), m.unk_text(), m.space_prefix()).in_file(&self.origin)?;
        Ok(self.inner.get_or_init(|| built))
    }

    /// Token ids for `text`. With `add_special`, BOS/EOS are added as the model's tokenizer would.
    /// Special-token text such as `<|im_start|>` always maps to its id, as in transformers.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        if let Some(m) = &self.marian {
            return m.encode(text, false, add_special);
        }
        let mut ids = match &self.spm {
            Some(m) => m.encode(text),
            None => self
                .hf()?
                .encode(text, add_special && !self.manual_specials)
                .map_err(|e| Error::msg(format!("tokenization failed: {e}")))?
                .get_ids()
                .to_vec(),
        };
        if add_special && self.manual_specials {
            if self.add_bos {
                if let Some(b) = self.bos {
                    ids.insert(0, b);
                }
            }
            let present = self.t5_rules && ids.last().is_some_and(|l| self.eos.contains(l));
            if self.add_eos && !present {
                ids.extend(self.eos.first());
            }
        }
        Ok(ids)
    }

    /// Encodes a text, or a pair of texts, for an encoder: with the tokenizer's special tokens
    /// (`[CLS] a [SEP] b [SEP]`), segment ids, and truncation to `max_len` tokens by HF's
    /// longest-first rule.
    pub fn encode_pair(&self, a: &str, b: Option<&str>, max_len: usize) -> Result<EncoderInput> {
        self.not_marian("encoding texts for an encoder-only model")?;
        use tokenizers::utils::truncation::{
            truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
        };
        use tokenizers::PostProcessor;
        let err = |e| Error::msg(format!("tokenization failed: {e}"));
        let inner = self.hf()?;
        let ea = inner.encode(a, false).map_err(err)?;
        let eb = b.map(|b| inner.encode(b, false)).transpose().map_err(err)?;
        let added = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(b.is_some()));
        let full_len = ea.len() + eb.as_ref().map_or(0, |e| e.len()) + added;
        let (ea, eb) = if full_len > max_len {
            let params = TruncationParams {
                max_length: max_len.saturating_sub(added),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            };
            truncate_encodings(ea, eb, &params).map_err(err)?
        } else {
            (ea, eb)
        };
        let enc = inner.post_process(ea, eb, true).map_err(err)?;
        Ok(EncoderInput {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            full_len,
        })
    }

    /// Encodes words already split (transformers' `is_split_into_words=True`) for an encoder:
    /// with special tokens, truncated to `max_len`, and the index of the word each token
    /// comes from (`None` for special tokens).
    pub fn encode_words(
        &self,
        words: &[String],
        max_len: usize,
    ) -> Result<(EncoderInput, Vec<Option<u32>>)> {
        use tokenizers::utils::truncation::{
            truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
        };
        use tokenizers::PostProcessor;
        self.not_marian("encoding split words")?;
        let err = |e| Error::msg(format!("tokenization failed: {e}"));
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let input = tokenizers::InputSequence::PreTokenized(words.into());
        let inner = self.hf()?;
        let enc = inner.encode(input, false).map_err(err)?;
        let added = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let full_len = enc.len() + added;
        let enc = if full_len > max_len {
            let params = TruncationParams {
                max_length: max_len.saturating_sub(added),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            };
            truncate_encodings(enc, None, &params).map_err(err)?.0
        } else {
            enc
        };
        let enc = inner.post_process(enc, None, true).map_err(err)?;
        Ok((
            EncoderInput {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                full_len,
            },
            enc.get_word_ids().to_vec(),
        ))
    }

    /// An encoder-decoder's input or target: the tokenizer's special tokens, and EOS at the
    /// end even where the tokenizer adds none (T5's tokenizer always ends with `</s>`; one
    /// trained by slm has no post-processor).
    pub fn encode_sequence(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, true)?;
        if let Some(&e) = self.eos.first().filter(|e| ids.last() != Some(e)) {
            ids.push(e);
        }
        Ok(ids)
    }

    /// An encoder-decoder's target (labels): Marian's target-side SentencePiece where the
    /// model has one, else as [`Self::encode_sequence`].
    pub fn encode_target(&self, text: &str) -> Result<Vec<u32>> {
        match &self.marian {
            Some(m) => m.encode(text, true, true),
            None => self.encode_sequence(text),
        }
    }

    fn not_marian(&self, what: &str) -> Result<()> {
        match self.marian {
            Some(_) => Err(Error::file(
                &self.origin,
                format!("{what} is not supported with a Marian tokenizer"),
            )),
            None => Ok(()),
        }
    }

    /// The id padding positions take: the tokenizer's `[PAD]`/`<pad>`, else 0 as transformers does.
    pub fn pad_id(&self) -> u32 {
        ["[PAD]", "<pad>"]
            .iter()
            .find_map(|t| self.token_to_id(t))
            .unwrap_or(0)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(m) = &self.marian {
            return Ok(m.decode(ids, skip_special));
        }
        if let Some(m) = &self.spm {
            return Ok(m.decode(ids, skip_special));
        }
        let inner = self.hf()?;
        let decode = |ids: &[u32]| {
            inner
                .decode(ids, skip_special)
                .map_err(|e| Error::msg(format!("detokenization failed: {e}")))
        };
        if !self.t5_rules || skip_special {
            return decode(ids);
        }
        // T5Tokenizer: SentencePiece decodes the pieces between special tokens; a space goes
        // before each such run that a special token ends; the text is stripped.
        let specials = inner.get_added_tokens_decoder();
        let (mut out, mut run, mut after_special) = (String::new(), Vec::new(), false);
        for &id in ids {
            match specials.get(&id).filter(|t| t.special) {
                Some(t) => {
                    if !after_special {
                        out.push(' ');
                    }
                    out.push_str(&decode(&run)?);
                    out.push_str(&t.content);
                    run.clear();
                    after_special = true;
                }
                None => {
                    run.push(id);
                    after_special = false;
                }
            }
        }
        out.push_str(&decode(&run)?);
        Ok(out.trim().to_string())
    }

    pub fn vocab_size(&self) -> usize {
        if let Some(m) = &self.marian {
            return m.vocab_size();
        }
        match &self.spm {
            Some(m) => m.len(),
            None => self.hf().map_or(0, |t| t.get_vocab_size(true)),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        if let Some(m) = &self.marian {
            return m.id_to_token(id);
        }
        match &self.spm {
            Some(m) => m.piece(id).map(String::from),
            None => self.hf().ok()?.id_to_token(id),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        if let Some(m) = &self.marian {
            return m.token_to_id(token);
        }
        match &self.spm {
            Some(m) => m.id(token),
            None => self.hf().ok()?.token_to_id(token),
        }
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// The ids that end a sequence, the main one first.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The `tokenizers` tokenizer underneath (for libraries that read its vocabulary), built
    /// now if this vocabulary has been encoding without it.
    pub fn inner(&self) -> Result<&tokenizers::Tokenizer> {
        self.hf()
    }

    /// A tokenizer with more ids than the model has embedding rows would index out of range.
    pub fn check_matches(&self, model_vocab: usize) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            return Err(Error::file(
                &self.origin,
                format!("tokenizer has {n} tokens but the model's vocabulary has {model_vocab}: they do not belong together"),
            ));
        }
        Ok(())
    }

    /// The model's chat template, ready to render.
    pub fn chat(&self) -> Result<ChatTemplate> {
        let src = self.chat_template.as_deref().ok_or_else(|| {
            Error::file(&self.origin, "the model has no chat template (tokenizer_config.json 'chat_template' or GGUF 'tokenizer.chat_template')")
        })?;
        let tok = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        ChatTemplate::new(src, &tok(self.bos), &tok(self.eos.first().copied()))
    }
}
