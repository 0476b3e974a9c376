//! slm: small language models on the CPU.
//!
//! The data flow: [`io`] finds and reads model files, [`models`] builds a family from a config
//! and a weight store using the shared layers in [`nn`], [`tokenize`] turns text into ids and
//! renders chat templates, [`generate`] samples continuations, [`encode`] runs encoders
//! (embeddings, classification, fill-mask) over [`data`] read from text files; [`hub`] fetches
//! models from the Hugging Face hub into the cache Python's tools share.

pub mod convert;
pub mod data;
pub mod encode;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod io;
pub mod models;
pub mod nn;
pub mod quantize;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};

/// Where tests and examples find the shared assets: `$SLM_ASSETS`, default `../shared/assets`
/// relative to the workspace root.
/// Where the models too large for the shared assets are (`tools/fetch_assets.sh --large`):
/// `SLM_MODELS`, else the workspace's `target/models`.
pub fn models_dir() -> std::path::PathBuf {
    match std::env::var_os("SLM_MODELS") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    }
}

pub fn assets_dir() -> std::path::PathBuf {
    match std::env::var_os("SLM_ASSETS") {
        Some(p) => p.into(),
        None => {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets");
            // Shown in messages and `info`: without the `crates/slm/../../..` detour.
            p.canonicalize().unwrap_or(p)
        }
    }
}
