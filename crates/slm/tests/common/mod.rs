#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

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

/// A fresh, empty folder unique to this process and `name`, removed when dropped.
pub fn tempdir(name: &str) -> super::scratch::Scratch {
    super::scratch::Scratch::new(name)
}

/// The model at `path` against transformers' outputs for the `family` fixture
/// (tools/make_fixtures.py): logits within 1e-4 and identical greedy tokens with the KV cache.
pub fn check_causal(family: &str, path: &Path) {
    use slm::generate::sampling::argmax;
    use slm::models::{load_causal, ComputeDtype};
    let expected = read_json(fixtures().join(family).join("expected.json"));
    let mut m = load_causal(path, ComputeDtype::F32).unwrap();
    let model = m.model.as_mut();
    let at = path.display();
    for case in expected["cases"].as_array().unwrap() {
        let ids = ids(&case["input_ids"]);
        model.clear_cache();
        let logits = model.forward(&ids, 0, true).unwrap();
        let got = logits.to_vec2::<f32>().unwrap();
        let want = case["logits"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        let mut max_diff = 0f32;
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w.as_array().unwrap()) {
                max_diff = max_diff.max((a - b.as_f64().unwrap() as f32).abs());
            }
        }
        assert!(max_diff <= 1e-4, "{at} {ids:?}: max |diff| {max_diff}");

        // Greedy decoding with the KV cache, one token at a time.
        model.clear_cache();
        let last = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut logits = last(model.forward(&ids, 0, false).unwrap());
        let mut out = Vec::new();
        let want_greedy = self::ids(&case["greedy"]);
        for pos in ids.len()..ids.len() + want_greedy.len() {
            let next = argmax(&logits);
            out.push(next);
            logits = last(model.forward(&[next], pos, false).unwrap());
        }
        assert_eq!(out, want_greedy, "{at}: greedy from {ids:?}");
    }
}

/// llama.cpp's tokenizer test cases for `name` (`ggml-vocab-*.gguf`): (text, ids).
pub fn vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = assets().join("tokenizers/vectors");
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
    // As llama.cpp's test-tokenizer-0 reads them: cases separated by the marker line.
    let mut cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if cases.last() == Some(&"") {
        cases.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        cases.len(),
        ids.len(),
        "{name}: {} cases, {} outputs",
        cases.len(),
        ids.len()
    );
    cases.into_iter().map(String::from).zip(ids).collect()
}

/// Every test case of `name` encodes (without special tokens) to llama.cpp's ids.
pub fn check_vectors(name: &str, tok: &slm::tokenize::Tokenizer) {
    let cases = vectors(name);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(text, want)| {
            let got = tok.encode(text, false).unwrap();
            (&got != want).then(|| format!("{text:?}: got {got:?}, want {want:?}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{name}: {}/{} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
