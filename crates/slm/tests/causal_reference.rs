//! Every causal family against HF transformers on tiny random-init models of the real
//! architectures (tools/make_fixtures.py): logits within 1e-4 and identical greedy tokens, from
//! safetensors (llama: sharded) and from pytorch_model.bin.

mod common;

use slm::generate::sampling::argmax;
use slm::models::{load_causal, ComputeDtype};

fn check(family: &str, format: &str) {
    let dir = common::fixtures().join(family);
    let expected = common::read_json(dir.join("expected.json"));
    let mut m = load_causal(&dir.join(format), ComputeDtype::F32).unwrap();
    let model = m.model.as_mut();
    for case in expected["cases"].as_array().unwrap() {
        let ids = common::ids(&case["input_ids"]);
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
        assert!(
            max_diff <= 1e-4,
            "{family}/{format} {ids:?}: max |diff| {max_diff}"
        );

        // Greedy decoding with the KV cache, one token at a time.
        model.clear_cache();
        let mut last = model
            .forward(&ids, 0, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut out = Vec::new();
        let want_greedy = common::ids(&case["greedy"]);
        for pos in ids.len()..ids.len() + want_greedy.len() {
            let next = argmax(&last);
            out.push(next);
            last = model
                .forward(&[next], pos, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        }
        assert_eq!(out, want_greedy, "{family}/{format} greedy from {ids:?}");
    }
}

#[test]
fn gpt2_safetensors() {
    check("gpt2", "safetensors");
}
#[test]
fn gpt2_bin() {
    check("gpt2", "bin");
}
#[test]
fn llama_sharded_safetensors() {
    check("llama", "safetensors");
}
#[test]
fn llama_bin() {
    check("llama", "bin");
}
#[test]
fn qwen2_safetensors() {
    check("qwen2", "safetensors");
}
#[test]
fn qwen2_bin() {
    check("qwen2", "bin");
}
#[test]
fn phi3_safetensors() {
    check("phi3", "safetensors");
}
#[test]
fn phi3_bin() {
    check("phi3", "bin");
}
