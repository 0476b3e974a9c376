//! The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers on the same dequantized weights.

mod common;

use slm::generate::{GenerateOptions, SamplingParams, Session};
use slm::models::{load_causal, ComputeDtype};
use slm::tokenize::Tokenizer;

fn greedy(dtype: ComputeDtype) -> (Vec<u32>, String, Vec<u32>) {
    let expected = common::read_json(common::fixtures().join("smollm2.json"));
    let path = common::smollm2_gguf();
    let mut m = load_causal(&path, dtype).unwrap();
    let tok = Tokenizer::load(&m.files).unwrap();
    let prompt = tok
        .encode(expected["prompt"].as_str().unwrap(), false)
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
    };
    let mut text = String::new();
    let mut session = Session::new(m.model.as_mut());
    let (ids, _) = session
        .generate(&tok, &prompt, &opts, &mut |t| {
            text.push_str(t);
            Ok(())
        })
        .unwrap();
    (prompt, text, ids)
}

#[test]
fn f32_greedy_matches_transformers() {
    let expected = common::read_json(common::fixtures().join("smollm2.json"));
    let (prompt, text, ids) = greedy(ComputeDtype::F32);
    assert_eq!(prompt, common::ids(&expected["prompt_ids"]));
    assert_eq!(ids, common::ids(&expected["greedy_ids"]));
    assert_eq!(text, " girl named Emma who loved to play in the sun. She");
    assert_eq!(text, expected["greedy_text"].as_str().unwrap());
}

#[test]
fn f32_last_logits_match_transformers() {
    let expected = common::read_json(common::fixtures().join("smollm2.json"));
    let mut m = load_causal(&common::smollm2_gguf(), ComputeDtype::F32).unwrap();
    let prompt = common::ids(&expected["prompt_ids"]);
    let logits = m
        .model
        .forward(&prompt, 0, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let top = &expected["last_logits_top20"];
    for (id, want) in common::ids(&top["ids"])
        .iter()
        .zip(top["values"].as_array().unwrap())
    {
        let got = logits[*id as usize];
        let want = want.as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-4, "logit of {id}: {got} vs {want}");
    }
    let sum: f64 = logits.iter().map(|&x| x as f64).sum();
    let want_sum = expected["last_logits_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() / want_sum.abs() < 1e-4,
        "sum {sum} vs {want_sum}"
    );
}

#[test]
fn quantized_matmuls_give_the_same_first_12_tokens() {
    let expected = common::read_json(common::fixtures().join("smollm2.json"));
    let (_, text, ids) = greedy(ComputeDtype::Auto);
    assert_eq!(ids, common::ids(&expected["greedy_ids"]), "{text}");
}
