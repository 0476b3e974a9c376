//! Constrained decoding: output that must match a JSON schema, enforced token by token by
//! llguidance (the engine behind guidance and llama.cpp's `--json-schema` with llguidance) over
//! the model's vocabulary as bytes. Before each draw every token that cannot continue a valid
//! document gets `-inf`; once the document is complete only end-of-sequence remains.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenize::Tokenizer;

/// The vocabulary as llguidance sees it, built once per tokenizer (a trie over every token's
/// bytes; 49k tokens take ~0.1 s) and shared by every constrained request on that model.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

struct Vocab {
    trie: TokTrie,
    inner: tokenizers::Tokenizer,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.inner
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

fn llg(what: &str, e: impl std::fmt::Display) -> Error {
    Error::msg(format!("{what}: {e}"))
}

impl Grammars {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let json: Value = serde_json::from_str(
            &tok.inner()?
                .to_string(false)
                .map_err(|e| llg("the tokenizer as JSON", e))?,
        )
        .map_err(|e| llg("the tokenizer as JSON", e))?;
        let words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| {
            llg(
                "constrained decoding needs a byte-level or byte-fallback tokenizer",
                e,
            )
        })?;
        let eos = tok.eos_ids().first().copied().ok_or_else(|| {
            Error::msg(
                "constrained decoding needs an end-of-sequence token, and the tokenizer has none",
            )
        })?;
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), &words);
        let env: TokEnv = Arc::new(Vocab {
            trie,
            inner: tok.inner()?.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| llg("llguidance", e))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// A constraint for documents valid under `schema` (OpenAI's `json_schema.schema`;
    /// `{"type": "object"}` for `json_object`). Compact JSON unless the schema's
    /// `x-guidance` options say otherwise: a small model then cannot wander in whitespace.
    /// A schema llguidance cannot compile is an error naming why.
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint> {
        let mut schema = schema.clone();
        let Some(obj) = schema.as_object_mut() else {
            return Err(Error::msg("a JSON schema must be an object"));
        };
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| llg("unsupported JSON schema", e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(llg("unsupported JSON schema", e));
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's position in its grammar.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets every token the grammar does not allow next to `-inf`.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| llg("constrained decoding", e))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= allowed.len() || !allowed.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past the sampled token.
    pub fn accept(&mut self, id: u32) -> Result<()> {
        self.matcher
            .consume_token(id as TokenId)
            .map_err(|e| llg("constrained decoding", e))
    }
}
