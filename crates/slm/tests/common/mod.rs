#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The shared assets folder; a missing folder is a test failure that says how to get it.
pub fn assets() -> PathBuf {
    let dir = slm::assets_dir();
    assert!(
        dir.join("MANIFEST.md").exists(),
        "assets not found at {} (set SLM_ASSETS, or run tools/fetch_assets.sh)",
        dir.display()
    );
    dir
}

pub fn smollm2_gguf() -> PathBuf {
    let p = assets().join("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "missing {}", p.display());
    p
}

pub fn read_json(p: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
