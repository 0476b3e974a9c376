//! The training engine against PyTorch: loss, gradients and AdamW steps of a tiny random-init
//! BertForSequenceClassification recorded by tools/make_fixtures.py (part `train`).

use std::path::PathBuf;

use slm::train::bert::{Batch, BertClassifier, Method};
use slm::train::optim::{clip_grad_norm, AdamW, OptimConfig, Schedule};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> serde_json::Value {
    let p = fixtures().join("train_bert.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn labels() -> Vec<String> {
    ["negative", "neutral", "positive"]
        .map(String::from)
        .to_vec()
}

fn full() -> Method {
    Method {
        lora: None,
        targets: Vec::new(),
        seed: 0,
    }
}

fn batch(r: &serde_json::Value) -> Batch {
    let rows: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let t = rows[0].len();
    Batch {
        lengths: rows
            .iter()
            .map(|r| r.iter().filter(|&&i| i != 0).count())
            .collect(),
        ids: rows.concat(),
        types: vec![0; rows.len() * t],
        t,
        labels: serde_json::from_value(r["labels"].clone()).unwrap(),
    }
}

fn max_diff(a: &[f32], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max);
    let m = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    (d, m)
}

#[test]
fn loss_and_gradients_match_pytorch() {
    let r = reference();
    let dir = fixtures().join("encoders/bert_cls/safetensors");
    let mut m = BertClassifier::load(&dir, labels(), &full()).unwrap();
    let b = batch(&r);
    let loss = m.forward_backward(&b, 1);
    let want = r["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-5, "loss {loss} vs torch {want}");
    for (name, g) in r["grads"].as_object().unwrap() {
        let g: Vec<f64> = serde_json::from_value(g.clone()).unwrap();
        let p = m
            .params
            .list
            .iter()
            .find(|p| &p.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let (d, scale) = max_diff(p.grad.as_ref().unwrap(), &g);
        assert!(
            d <= 1e-5 + 1e-4 * scale,
            "{name}: max |diff| {d:e} (max |grad| {scale:e})"
        );
    }
    // Every parameter gets a gradient, as in PyTorch: nothing is cut from the graph.
    let with_grad = m
        .params
        .list
        .iter()
        .filter(|p| p.grad.as_ref().is_some_and(|g| g.iter().any(|&x| x != 0.0)))
        .count();
    assert_eq!(with_grad, m.params.list.len());
    assert_eq!(with_grad as u64, r["params_with_grad"].as_u64().unwrap());
}

#[test]
fn adamw_steps_follow_pytorch() {
    let r = reference();
    let dir = fixtures().join("encoders/bert_cls/safetensors");
    let mut m = BertClassifier::load(&dir, labels(), &full()).unwrap();
    let b = batch(&r);
    let cfg = OptimConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        warmup_steps: 1,
        schedule: Schedule::Linear,
        max_grad_norm: 1.0,
    };
    let mut opt = AdamW::new(&m.params);
    let want: Vec<f64> = serde_json::from_value(r["step_losses"].clone()).unwrap();
    for (step, w) in want.iter().enumerate() {
        let loss = m.forward_backward(&b, 1);
        assert!((loss - w).abs() < 1e-5, "step {step}: {loss} vs torch {w}");
        clip_grad_norm(&mut m.params, cfg.max_grad_norm);
        opt.step(&mut m.params, &cfg, cfg.lr_at(step, 4));
        m.params.zero_grad();
    }
    let logits = m.logits(&b);
    let targets: Vec<Option<u32>> = b.labels.iter().map(|&l| Some(l)).collect();
    let (loss, _) = slm::train::ops::cross_entropy(&logits, &targets, 3, b.size() as f32);
    let want = r["final_loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-5,
        "after 3 steps {loss} vs torch {want}"
    );
}
