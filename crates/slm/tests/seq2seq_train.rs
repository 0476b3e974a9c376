//! Seq2Seq training against PyTorch and PEFT: the teacher-forced loss and gradients of the tiny
//! T5s on a padded batch, LoRA with PEFT's factors, and adapters both ways
//! (tools/make_fixtures.py, part `t5_train`).

use std::path::{Path, PathBuf};

use slm::train::optim::{AdamW, OptimConfig};
use slm::train::seq2seq::{Seq2SeqBatch, Seq2SeqExample, Seq2SeqRun, Seq2SeqTrain};
use slm::train::tape::{Dropout, LoraSpec};
use slm::train::trainer::Model;

use crate::train::check_grads;

const NAMES: [&str; 2] = ["t5_relu", "t5_gated"];
const LORA_TARGETS: [&str; 3] = ["q", "v", "wo"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("train.json")).unwrap()).unwrap()
}

fn base(name: &str) -> PathBuf {
    root().join(name).join("safetensors")
}

fn lora() -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        targets: LORA_TARGETS.map(String::from).to_vec(),
        dropout: 0.0,
    }
}

/// The fixture's pairs; the targets end with EOS and T5 starts its decoder from pad (0).
fn examples(r: &serde_json::Value) -> Vec<Seq2SeqExample> {
    let sources: Vec<Vec<u32>> = serde_json::from_value(r["sources"].clone()).unwrap();
    let targets: Vec<Vec<u32>> = serde_json::from_value(r["targets"].clone()).unwrap();
    sources
        .into_iter()
        .zip(targets)
        .map(|(source, target)| Seq2SeqExample { source, target })
        .collect()
}

fn batch(r: &serde_json::Value) -> Seq2SeqBatch {
    let ex = examples(r);
    Seq2SeqBatch::new(&ex.iter().collect::<Vec<_>>(), 0, 0)
}

#[test]
fn t5_loss_and_gradients_match_pytorch() {
    let r = reference();
    let b = batch(&r);
    for name in NAMES {
        let want = &r["models"][name];
        let mut m = Seq2SeqTrain::load(&base(name), None, 0).unwrap();
        // PyTorch's gradients are of eval mode (the configs have dropout 0.1).
        m.dropout = Dropout::Off;
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = want["loss"].as_f64().unwrap();
        assert!((loss - w).abs() < 1e-5, "{name}: loss {loss} vs torch {w}");
        check_grads(&m.params, &want["grads"]);
        let silent: Vec<&str> = m
            .params
            .list
            .iter()
            .filter(|p| !p.grad.as_ref().is_some_and(|g| g.iter().any(|&x| x != 0.0)))
            .map(|p| p.name.as_str())
            .collect();
        assert!(silent.is_empty(), "{name}: no gradient for {silent:?}");
        // Evaluation gives the same loss without the backward.
        let (sum, n) = m.loss_sum(&b).unwrap();
        assert!((sum / n as f64 - w).abs() < 1e-5, "{name}: loss_sum");
    }
}

/// Sets the LoRA factors to those PEFT drew (saved with its adapter).
fn peft_factors(m: &mut Seq2SeqTrain, adapter: &Path) {
    let values =
        slm::io::write::read_safetensors_f32(&adapter.join("adapter_model.safetensors")).unwrap();
    let mut set = 0;
    for p in m
        .params
        .list
        .iter_mut()
        .filter(|p| p.name.contains(".lora_"))
    {
        p.value = values[&format!("base_model.model.{}", p.name)].1.clone();
        set += 1;
    }
    assert_eq!(set, values.len(), "every PEFT factor has a parameter");
}

/// The logits inference gives for the first pair's teacher-forced decoder inputs, with an
/// adapter applied to the weights.
fn adapted_logits(name: &str, adapter: &Path, r: &serde_json::Value) -> Vec<f32> {
    adapted_logits_in(&base(name), adapter, r)
}

fn adapted_logits_in(base: &Path, adapter: &Path, r: &serde_json::Value) -> Vec<f32> {
    let ex = &examples(r)[0];
    let m = slm::models::seq2seq::load_seq2seq_with(base, Some(adapter)).unwrap();
    let memory = m.model.encode(&[&ex.source]).unwrap();
    let mut cache = m.model.new_cache();
    let dec: Vec<u32> = std::iter::once(m.model.decoder_start())
        .chain(ex.target[..ex.target.len() - 1].iter().copied())
        .collect();
    let y = m
        .model
        .decode(&mut [(&mut cache, &dec)], Some(&memory[0]), true)
        .unwrap();
    y.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(d <= tol, "{what}: max |diff| {d:e}");
}

fn logits_of(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value::<Vec<Vec<f32>>>(v.clone())
        .unwrap()
        .concat()
}

#[test]
fn t5_lora_matches_peft() {
    let r = reference();
    let b = batch(&r);
    for name in NAMES {
        let want = &r["models"][name];
        let adapter = root().join(format!("peft/{name}_lora"));
        let mut m = Seq2SeqTrain::load(&base(name), Some(lora()), 0).unwrap();
        m.dropout = Dropout::Off;
        peft_factors(&mut m, &adapter);
        assert!(
            m.params
                .list
                .iter()
                .all(|p| p.grad.is_some() == p.name.contains(".lora_")),
            "{name}: only LoRA trains"
        );
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = want["lora_loss"].as_f64().unwrap();
        assert!(
            (loss - w).abs() < 1e-5,
            "{name}: LoRA loss {loss} vs PEFT {w}"
        );
        check_grads(&m.params, &want["lora_grads"]);
        // PEFT's adapter applied by inference gives PEFT's logits.
        assert_close(
            &adapted_logits(name, &adapter, &r),
            &logits_of(&want["lora_logits"]),
            1e-4,
            &format!("{name}: PEFT adapter in slm"),
        );
    }
}

/// A few LoRA steps, saved as a PEFT adapter.
/// How far logits of an adapter trained here may be from PEFT's for the committed one: another
/// CPU's kernels, and the threads the other tests leave, round the sums otherwise, and three
/// AdamW steps turn the last bits of near-zero gradients into whole steps (seen: factors 1e-3
/// apart, logits 1e-6 run alone and 2.2e-4 beside the other tests).
const DRIFT: f32 = 2e-3;

fn write_slm_adapter(name: &str, r: &serde_json::Value, dir: &Path) {
    write_slm_adapter_in(&base(name), lora(), r, dir)
}

fn write_slm_adapter_in(base: &Path, spec: LoraSpec, r: &serde_json::Value, dir: &Path) {
    let mut model = Seq2SeqTrain::load(base, Some(spec), 3).unwrap();
    model.dropout = Dropout::Off;
    let ex = examples(r);
    let b = Seq2SeqBatch::new(&ex.iter().collect::<Vec<_>>(), model.start, model.pad);
    let mut run = Seq2SeqRun {
        model,
        source: base.to_path_buf(),
    };
    let mut opt = AdamW::new(&run.model.params);
    let cfg = OptimConfig::constant(2e-2);
    for _ in 0..3 {
        run.forward_backward(&b, 1).unwrap();
        opt.step(&mut run.model.params, &cfg, cfg.lr);
        run.model.params.zero_grad();
    }
    let _ = std::fs::remove_dir_all(dir);
    run.save(dir).unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        if !f
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("adapter")
        {
            std::fs::remove_file(f).unwrap();
        }
    }
}

/// The adapter slm trained (committed; rewritten with `SLM_WRITE_FIXTURES=1`, then
/// `make_fixtures.py t5_train` records PEFT's logits for it) gives in PEFT the logits slm
/// gives, and slm writes it again the same.
#[test]
fn t5_adapters_slm_trains_load_in_peft() {
    let r = reference();
    let committed = |name: &str| root().join(format!("peft/slm_{name}_adapter"));
    if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
        for name in NAMES {
            write_slm_adapter(name, &r, &committed(name));
        }
    }
    for name in NAMES {
        let committed = committed(name);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(committed.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
        let d = std::env::temp_dir().join(format!("slm-t5-adapter-{name}-{}", std::process::id()));
        write_slm_adapter(name, &r, &d);
        let read = |p: &Path| {
            slm::io::write::read_safetensors_f32(&p.join("adapter_model.safetensors")).unwrap()
        };
        let (now, then) = (read(&d), read(&committed));
        let shapes = |m: &std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>| {
            let mut v: Vec<(String, Vec<usize>)> =
                m.iter().map(|(k, (s, _))| (k.clone(), s.clone())).collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&now), shapes(&then), "{name}: adapter tensors");
        let want = r["models"][name]
            .get("slm_adapter_logits")
            .unwrap_or_else(|| panic!("{name}: run make_fixtures.py t5_train"));
        // PEFT's logits for the committed adapter: slm reads it as PEFT does.
        assert_close(
            &adapted_logits(name, &committed, &r),
            &logits_of(want),
            1e-4,
            &format!("{name}: slm adapter in PEFT"),
        );
        // The adapter trained now, on another CPU perhaps (other kernels round otherwise, and
        // three AdamW steps normalise the last bits of near-zero gradients into whole steps):
        // the same model up to that drift.
        assert_close(
            &adapted_logits(name, &d, &r),
            &logits_of(want),
            DRIFT,
            &format!("{name}: the adapter trained now"),
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// BART (post-norm, learned positions, biased projections, a frozen `final_logits_bias`) and
/// Marian (sinusoidal positions computed, not stored): the loss and gradients of a padded
/// batch, full and with PEFT's LoRA factors on q_proj, v_proj.
#[test]
fn bart_and_marian_loss_and_gradients_match_pytorch_and_peft() {
    // BART starts its decoder from EOS (2) and pads with 1; Marian starts from padding.
    for (name, start, pad) in [("bart", 2, 1), ("marian", 319, 319)] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/bart")
            .join(name);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap())
                .unwrap();
        let ex = examples(&r);
        let b = Seq2SeqBatch::new(&ex.iter().collect::<Vec<_>>(), start, pad);
        let base = dir.join("safetensors");
        let mut m = Seq2SeqTrain::load(&base, None, 0).unwrap();
        assert_eq!((m.start, m.pad), (start, pad), "{name}");
        m.dropout = Dropout::Off;
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = r["loss"].as_f64().unwrap();
        assert!((loss - w).abs() < 1e-5, "{name}: loss {loss} vs torch {w}");
        check_grads(&m.params, &r["grads"]);
        for p in &m.params.list {
            let trained = p.grad.as_ref().is_some_and(|g| g.iter().any(|&x| x != 0.0));
            // transformers keeps final_logits_bias (and Marian its positions) as buffers.
            let buffer = p.name == "final_logits_bias"
                || (name == "marian" && p.name.contains("embed_positions"));
            assert_eq!(trained, !buffer, "{name}: {}", p.name);
        }

        let spec = LoraSpec {
            targets: vec!["q_proj".into(), "v_proj".into()],
            ..lora()
        };
        let mut m = Seq2SeqTrain::load(&base, Some(spec), 0).unwrap();
        m.dropout = Dropout::Off;
        peft_factors(&mut m, &dir.join("peft_lora"));
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = r["lora_loss"].as_f64().unwrap();
        assert!(
            (loss - w).abs() < 1e-5,
            "{name}: LoRA loss {loss} vs PEFT {w}"
        );
        check_grads(&m.params, &r["lora_grads"]);
        // PEFT's adapter applied by inference gives PEFT's logits.
        let adapter = dir.join("peft_lora");
        assert_close(
            &adapted_logits_in(&base, &adapter, &r),
            &logits_of(&r["lora_logits"]),
            1e-4,
            &format!("{name}: PEFT adapter in slm"),
        );
        // The adapter slm trained (committed; `SLM_WRITE_FIXTURES=1` rewrites it, then
        // `make_fixtures.py bart` records PEFT's logits for it) gives in PEFT slm's logits.
        let committed = dir.join("slm_adapter");
        let spec = LoraSpec {
            targets: vec!["q_proj".into(), "v_proj".into()],
            ..lora()
        };
        if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
            write_slm_adapter_in(&base, spec, &r, &committed);
            continue;
        }
        let want = r
            .get("slm_adapter_logits")
            .unwrap_or_else(|| panic!("{name}: run make_fixtures.py bart"));
        assert_close(
            &adapted_logits_in(&base, &committed, &r),
            &logits_of(want),
            1e-4,
            &format!("{name}: slm adapter in PEFT"),
        );
    }
}
