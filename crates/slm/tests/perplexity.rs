//! Sliding-window perplexity against transformers' (tools/make_fixtures.py, `perplexity` part) on
//! the tiny random-init GPT-2 and Llama fixtures: overlapping and disjoint windows.

mod common;

use slm::eval::perplexity::{perplexity, Options};
use slm::models::{load_causal, ComputeDtype};

#[test]
fn matches_transformers_sliding_window() {
    let want = common::read_json(common::fixtures().join("perplexity.json"));
    let ids = common::ids(&want["ids"]);
    for case in want["cases"].as_array().unwrap() {
        let family = case["family"].as_str().unwrap();
        let mut m = load_causal(
            &common::fixtures().join(family).join("safetensors"),
            ComputeDtype::F32,
        )
        .unwrap();
        let opts = Options {
            max_length: case["max_length"].as_u64().unwrap() as usize,
            stride: case["stride"].as_u64().unwrap() as usize,
        };
        let mut calls = 0;
        let got = perplexity(m.model.as_mut(), &ids, opts, |_, _| calls += 1).unwrap();
        assert_eq!(
            got.tokens as u64,
            case["tokens"].as_u64().unwrap(),
            "{family} {opts:?}"
        );
        assert_eq!(got.windows as u64, case["windows"].as_u64().unwrap());
        assert_eq!(calls, got.windows);
        let nll = case["mean_nll"].as_f64().unwrap();
        assert!(
            (got.mean_nll - nll).abs() < 1e-4,
            "{family} {opts:?}: mean NLL {} vs {nll}",
            got.mean_nll
        );
        let ppl = case["perplexity"].as_f64().unwrap();
        assert!((got.perplexity() / ppl - 1.0).abs() < 1e-3);
    }
}

#[test]
fn bad_options_are_errors() {
    let mut m = load_causal(
        &common::fixtures().join("llama/safetensors"),
        ComputeDtype::F32,
    )
    .unwrap();
    let ids: Vec<u32> = (0..50).collect();
    let run = |m: &mut slm::models::LoadedModel, max_length, stride, ids: &[u32]| {
        perplexity(
            m.model.as_mut(),
            ids,
            Options { max_length, stride },
            |_, _| {},
        )
        .unwrap_err()
        .to_string()
    };
    assert!(run(&mut m, 16, 0, &ids)
        .contains("--stride must be between 1 and --max-length (16), got 0"));
    assert!(run(&mut m, 16, 17, &ids).contains("got 17"));
    assert!(run(&mut m, 4096, 16, &ids).contains("exceeds the model's context of 128 tokens"));
    assert!(run(&mut m, 16, 8, &ids[..1]).contains("fewer than 2 tokens"));
}
