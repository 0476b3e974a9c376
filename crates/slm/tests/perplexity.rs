//! Sliding-window perplexity against transformers' (tools/make_fixtures.py, `perplexity` part) on
//! the tiny random-init GPT-2 and Llama fixtures: overlapping and disjoint windows.

use crate::common;

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

#[test]
fn compare_matches_a_torch_kl_divergence() {
    let want = common::read_json(common::fixtures().join("perplexity.json"));
    let ids = common::ids(&want["ids"]);
    let c = &want["compare"];
    let load = |f: &str| {
        load_causal(
            &common::fixtures().join(f).join("safetensors"),
            ComputeDtype::F32,
        )
        .unwrap()
    };
    let (mut a, mut b) = (load("gpt2"), load("llama"));
    let opts = Options {
        max_length: c["max_length"].as_u64().unwrap() as usize,
        stride: c["stride"].as_u64().unwrap() as usize,
    };
    let got =
        slm::eval::compare::compare(a.model.as_mut(), b.model.as_mut(), &ids, opts, |_, _| {})
            .unwrap();
    assert_eq!(got.a.tokens as u64, c["tokens"].as_u64().unwrap());
    let (kl, max) = (
        c["mean_kl"].as_f64().unwrap(),
        c["max_kl"].as_f64().unwrap(),
    );
    assert!(
        (got.mean_kl - kl).abs() < 1e-6,
        "mean KL {} vs {kl}",
        got.mean_kl
    );
    assert!(
        (got.max_kl - max).abs() < 1e-6,
        "max KL {} vs {max}",
        got.max_kl
    );
    assert_eq!(got.top1_agreement, c["top1_agreement"].as_f64().unwrap());
    // The perplexities are the ones the single-model path gives.
    let pa = perplexity(a.model.as_mut(), &ids, opts, |_, _| {}).unwrap();
    assert!((got.a.mean_nll - pa.mean_nll).abs() < 1e-12);
    // A model against itself: no divergence, full agreement.
    let mut a2 = load("gpt2");
    let same =
        slm::eval::compare::compare(a.model.as_mut(), a2.model.as_mut(), &ids, opts, |_, _| {})
            .unwrap();
    assert!(same.max_kl < 1e-9 && same.top1_agreement == 1.0);
}
