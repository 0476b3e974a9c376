//! LoRA: identity at initialisation, merged = base + adapter, and PEFT interop both ways on the
//! tiny BERT fixtures (tools/make_fixtures.py, parts `peft_slm` and `peft`).

use std::path::{Path, PathBuf};

use slm::encode::Encoder;
use slm::models::bert::EncoderBatch;
use slm::train::bert::{Batch, BertTrain, Method};
use slm::train::classify::save_adapter;
use slm::train::optim::{AdamW, OptimConfig};

use crate::train_fixture;

use train_fixture::{fixtures, labels};

fn base() -> PathBuf {
    fixtures().join("encoders/bert_base/safetensors")
}

fn lora(r: usize, seed: u64) -> Method {
    Method {
        lora: Some((r, 2.0 * r as f32)),
        targets: vec!["query".into(), "value".into()],
        seed,
    }
}

/// The train fixture's padded batch (single texts of the encoder fixtures).
fn batch() -> Batch {
    train_fixture::batch(&train_fixture::reference())
}

/// Logits through the inference path (the `slm classify` model) with an adapter applied.
fn inference_logits(model: &Path, adapter: Option<&Path>, b: &Batch) -> Vec<f32> {
    let enc = Encoder::load_with(model, adapter).unwrap();
    let batch = train_fixture::encoder_batch(b);
    enc.model
        .logits(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
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

/// A few LoRA steps on the fixture batch, deterministic.
fn trained_lora() -> BertTrain {
    let mut m = BertTrain::load(&base(), labels(), &lora(4, 7)).unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = slm::train::tape::Dropout::Off;
    let cfg = OptimConfig::constant(5e-2);
    let mut opt = AdamW::new(&m.params);
    let b = batch();
    for _ in 0..3 {
        m.forward_backward(&b, 1).unwrap();
        opt.step(&mut m.params, &cfg, cfg.lr);
        m.params.zero_grad();
    }
    m
}

#[test]
fn lora_at_initialisation_gives_the_base_logits() {
    let b = batch();
    let full = BertTrain::load(
        &base(),
        labels(),
        &Method {
            lora: None,
            targets: vec![],
            seed: 7,
        },
    )
    .unwrap();
    let with_lora = BertTrain::load(&base(), labels(), &lora(8, 7)).unwrap();
    assert_eq!(full.logits(&b).unwrap(), with_lora.logits(&b).unwrap());
    // Only the LoRA factors and the classifier train.
    let trained: Vec<&str> = with_lora
        .params
        .list
        .iter()
        .filter(|p| p.grad.is_some())
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(trained.len(), 2 * 2 * 2 + 2, "{trained:?}");
    assert!(trained
        .iter()
        .all(|n| n.contains(".lora_") || n.starts_with("classifier.")));
}

#[test]
fn lora_gradients_reach_every_trained_tensor() {
    let mut m = BertTrain::load(&base(), labels(), &lora(4, 3)).unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = slm::train::tape::Dropout::Off;
    // B starts at 0, so A gets no gradient on the first step; one update fixes that.
    let b = batch();
    m.forward_backward(&b, 1).unwrap();
    let cfg = OptimConfig::constant(1e-2);
    let mut opt = AdamW::new(&m.params);
    opt.step(&mut m.params, &cfg, cfg.lr);
    m.params.zero_grad();
    m.forward_backward(&b, 1).unwrap();
    for p in m.params.list.iter().filter(|p| p.grad.is_some()) {
        assert!(
            p.grad.as_ref().unwrap().iter().any(|&g| g != 0.0),
            "{} got no gradient",
            p.name
        );
    }
}

#[test]
fn merged_model_and_saved_adapter_give_the_trained_logits() {
    let m = trained_lora();
    let b = batch();
    let want = m.logits(&b).unwrap();
    let d = std::env::temp_dir().join(format!("slm-peft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    save_adapter(&m, &base(), &d.join("adapter")).unwrap();
    // base + adapter, unmerged on disk, through the inference model.
    assert_close(
        &inference_logits(&base(), Some(&d.join("adapter")), &b),
        &want,
        1e-5,
        "base + adapter",
    );
    // The merged model.
    slm::train::classify::save_model(&m, &base(), &d.join("merged")).unwrap();
    assert_close(
        &inference_logits(&d.join("merged"), None, &b),
        &want,
        1e-5,
        "merged",
    );
    let _ = std::fs::remove_dir_all(&d);
}

fn expected() -> serde_json::Value {
    let p = fixtures().join("peft/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn an_adapter_trained_by_python_peft_gives_peft_logits() {
    let b = batch();
    let want: Vec<f32> =
        serde_json::from_value::<Vec<Vec<f32>>>(expected()["python_adapter_logits"].clone())
            .unwrap()
            .concat();
    let got = inference_logits(&base(), Some(&fixtures().join("peft/python_adapter")), &b);
    assert_close(&got, &want, 1e-5, "PEFT adapter in slm");
}

#[test]
fn an_adapter_written_by_slm_gives_the_same_logits_in_peft() {
    // The committed adapter is what this code writes (rewrite it with SLM_WRITE_FIXTURES=1,
    // then rerun tools/make_fixtures.py peft to have PEFT check it).
    let m = trained_lora();
    let committed = fixtures().join("peft/slm_adapter");
    if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
        save_adapter(&m, &base(), &committed).unwrap();
    }
    let d = std::env::temp_dir().join(format!("slm-peft-w-{}", std::process::id()));
    save_adapter(&m, &base(), &d).unwrap();
    let read = |p: &Path| {
        slm::io::write::read_safetensors_f32(&p.join("adapter_model.safetensors")).unwrap()
    };
    let (now, then) = (read(&d), read(&committed));
    assert_eq!(now.len(), then.len());
    for (k, (_, v)) in &now {
        // Summation order differs between CPUs (AVX2 or AVX-512 GEMM kernels) and Adam scales
        // the tiny differences of small gradients up: 2.1e-5 seen on an AMD EPYC. The logits
        // below stay within 1e-5 of PEFT's.
        assert_close(v, &then[k].1, 1e-4, k);
    }
    let _ = std::fs::remove_dir_all(&d);
    // PEFT loaded the committed adapter on the same base and recorded these logits.
    let want: Vec<f32> =
        serde_json::from_value::<Vec<Vec<f32>>>(expected()["slm_adapter_logits"].clone())
            .unwrap()
            .concat();
    assert_close(
        &m.logits(&batch()).unwrap(),
        &want,
        1e-5,
        "slm adapter in PEFT",
    );
}

#[test]
fn causal_lora_adapter_and_merge_give_the_trained_logits() {
    use slm::train::causal::CausalRun;
    use slm::train::lm::{CausalBatch, CausalLm};
    use slm::train::tape::LoraSpec;
    use slm::train::trainer::Model;
    let base = fixtures().join("llama/safetensors");
    let targets = vec!["q_proj".into(), "v_proj".into(), "down_proj".into()];
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        targets,
        dropout: 0.0,
    };
    let model = CausalLm::load(&base, Some(spec), 1).unwrap();
    let ids: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 7, 7, 9, 11];
    let b = CausalBatch {
        targets: ids[1..].iter().map(|&i| Some(i)).chain([None]).collect(),
        ids: ids.clone(),
        lengths: vec![ids.len()],
        t: ids.len(),
    };
    let mut run = CausalRun {
        model,
        source: base.clone(),
    };
    let at_init = run.model.logits(&b).unwrap();
    let mut opt = AdamW::new(&run.model.params);
    let cfg = OptimConfig::constant(2e-2);
    for _ in 0..3 {
        run.forward_backward(&b, 1).unwrap();
        opt.step(&mut run.model.params, &cfg, cfg.lr);
        run.model.params.zero_grad();
    }
    let want = run.model.logits(&b).unwrap();
    assert!(
        want.iter().zip(&at_init).any(|(a, b)| (a - b).abs() > 1e-3),
        "training changed nothing"
    );
    let d = std::env::temp_dir().join(format!("slm-peft-causal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    run.save(&d.join("adapter")).unwrap();
    let logits_of = |m: &mut slm::models::LoadedModel| -> Vec<f32> {
        m.model
            .forward(&ids, 0, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut adapted = slm::models::load_causal_with(
        &base,
        slm::models::ComputeDtype::F32,
        Some(&d.join("adapter")),
    )
    .unwrap();
    assert_close(&logits_of(&mut adapted), &want, 1e-4, "base + adapter");
    slm::io::peft::merge(&base, &d.join("adapter"), &d.join("merged"), false).unwrap();
    let mut merged =
        slm::models::load_causal(&d.join("merged"), slm::models::ComputeDtype::F32).unwrap();
    assert_close(&logits_of(&mut merged), &want, 1e-4, "merged");
    let _ = std::fs::remove_dir_all(&d);
}

fn causal_reference() -> serde_json::Value {
    let p = fixtures().join("train_causal.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn causal_logits(model: &Path, adapter: &Path, ids: &[u32]) -> Vec<f32> {
    let mut m = slm::models::load_causal_with(model, slm::models::ComputeDtype::F32, Some(adapter))
        .unwrap();
    m.model
        .forward(ids, 0, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// GPT-2 (Conv1D: PEFT's `fan_in_fan_out`) and Phi-3 (fused projections) adapters both ways:
/// PEFT's adapter in slm gives PEFT's logits; the adapter slm trained (committed, written by
/// `SLM_WRITE_FIXTURES=1`) gives in PEFT the logits slm gives.
#[test]
fn causal_adapters_of_gpt2_and_phi3_interoperate_with_peft() {
    let r = causal_reference();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
    for (name, targets) in [
        ("gpt2", &["c_attn", "c_proj", "c_fc"][..]),
        ("phi3", &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ] {
        let base = fixtures().join(name).join("safetensors");
        let python = fixtures().join(format!("peft/{name}_lora"));
        let want: Vec<f32> =
            serde_json::from_value::<Vec<Vec<f32>>>(r["models"][name]["lora_logits"].clone())
                .unwrap()
                .concat();
        assert_close(
            &causal_logits(&base, &python, &ids),
            &want,
            1e-4,
            &format!("{name}: PEFT adapter in slm"),
        );

        let committed = fixtures().join(format!("peft/slm_{name}_adapter"));
        if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
            write_slm_adapter(&base, targets, &ids, &committed);
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(committed.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["fan_in_fan_out"], name == "gpt2", "{name}");
        let key = format!("slm_{name}_logits");
        let peft_logits: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(
            expected()
                .get(&key)
                .unwrap_or_else(|| panic!("{key}: run make_fixtures.py peft"))
                .clone(),
        )
        .unwrap()
        .concat();
        assert_close(
            &causal_logits(&base, &committed, &ids),
            &peft_logits,
            1e-4,
            &format!("{name}: slm adapter in PEFT"),
        );
    }
}

/// The same both ways with transformers 5.x and PEFT 0.21 (tools/make_fixtures.py `v5`): PEFT
/// 0.21's adapters on the models 5.x saved give its logits in slm, and the adapters slm wrote
/// give in PEFT 0.21 the logits slm gives.
#[test]
fn causal_adapters_interoperate_with_peft_0_21_on_transformers_5() {
    let v5 = fixtures().join("v5");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v5.join("train_causal.json")).unwrap())
            .unwrap();
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v5.join("peft/expected.json")).unwrap())
            .unwrap();
    assert_eq!(peft["peft"], "0.21.2");
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
    let rows = |v: &serde_json::Value| -> Vec<f32> {
        serde_json::from_value::<Vec<Vec<f32>>>(v.clone())
            .unwrap()
            .concat()
    };
    for name in ["gpt2", "phi3", "llama", "qwen2"] {
        let base = v5.join(name);
        assert_close(
            &causal_logits(&base, &v5.join(format!("peft/{name}_lora")), &ids),
            &rows(&r["models"][name]["lora_logits"]),
            1e-4,
            &format!("{name}: PEFT 0.21 adapter in slm"),
        );
    }
    for name in ["gpt2", "phi3"] {
        let committed = fixtures().join(format!("peft/slm_{name}_adapter"));
        assert_close(
            &causal_logits(&v5.join(name), &committed, &ids),
            &rows(&peft[format!("slm_{name}_logits")]),
            1e-4,
            &format!("{name}: slm adapter in PEFT 0.21"),
        );
    }
}

/// Logits of each text alone (no padding) through the inference path with `adapter`.
fn per_text_logits(model: &Path, adapter: &Path, rows: &[Vec<u32>]) -> Vec<f32> {
    let enc = Encoder::load_with(model, Some(adapter)).unwrap();
    rows.iter()
        .flat_map(|ids| {
            let input = slm::tokenize::EncoderInput {
                type_ids: vec![0; ids.len()],
                full_len: ids.len(),
                ids: ids.clone(),
            };
            let batch = EncoderBatch::new(&[input], 0).unwrap();
            let l: Vec<f32> = enc
                .model
                .logits(&batch)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            l
        })
        .collect()
}

/// DistilBERT (SEQ_CLS on q_lin, v_lin) and RoBERTa (TOKEN_CLS on query, value) adapters both
/// ways: PEFT's adapter, head in modules_to_save, gives PEFT's logits in slm; the adapter slm
/// trained (committed, written by `SLM_WRITE_FIXTURES=1`) gives in PEFT the logits slm gives.
#[test]
fn encoder_adapters_of_distilbert_and_roberta_interoperate_with_peft() {
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft/encoders.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(rec["input_ids"].clone()).unwrap();
    let flat = |v: &serde_json::Value| -> Vec<f32> {
        let v: Vec<serde_json::Value> = serde_json::from_value(v.clone()).unwrap();
        v.iter()
            .flat_map(|x| match x.as_array().unwrap()[0].is_array() {
                true => serde_json::from_value::<Vec<Vec<f32>>>(x.clone())
                    .unwrap()
                    .concat(),
                false => serde_json::from_value::<Vec<f32>>(x.clone()).unwrap(),
            })
            .collect()
    };
    let tr: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train_encoders.json")).unwrap(),
    )
    .unwrap();
    for (name, targets) in [
        ("distilbert_cls", ["q_lin", "v_lin"]),
        ("roberta_tok", ["query", "value"]),
    ] {
        let base = fixtures().join(format!("encoders/{name}/safetensors"));
        let python = fixtures().join(format!("peft/{name}_lora"));
        assert_close(
            &per_text_logits(&base, &python, &rows),
            &flat(&rec[format!("{name}_lora_logits")]),
            1e-5,
            &format!("{name}: PEFT adapter in slm"),
        );

        let committed = fixtures().join(format!("peft/slm_{name}_adapter"));
        if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
            let method = Method {
                lora: Some((4, 8.0)),
                targets: targets.map(String::from).to_vec(),
                seed: 3,
            };
            let labels = slm::models::load_encoder(&base).unwrap().model.labels;
            let mut b = batch();
            let mut m = if name.ends_with("tok") {
                let tags: Vec<Vec<i64>> = serde_json::from_value(tr["tags"].clone()).unwrap();
                b.targets = tags
                    .concat()
                    .into_iter()
                    .map(|x| (x >= 0).then_some(x as u32))
                    .collect();
                BertTrain::load_token_classifier(&base, labels, &method).unwrap()
            } else {
                BertTrain::load(&base, labels, &method).unwrap()
            };
            m.dropout = slm::train::tape::Dropout::Off;
            let cfg = OptimConfig::constant(5e-2);
            let mut opt = AdamW::new(&m.params);
            for _ in 0..3 {
                m.forward_backward(&b, 1).unwrap();
                opt.step(&mut m.params, &cfg, cfg.lr);
                m.params.zero_grad();
            }
            let _ = std::fs::remove_dir_all(&committed);
            save_adapter(&m, &base, &committed).unwrap();
            for f in std::fs::read_dir(&committed).unwrap() {
                let f = f.unwrap().path();
                let n = f.file_name().unwrap().to_str().unwrap().to_string();
                if !n.starts_with("adapter") {
                    std::fs::remove_file(f).unwrap();
                }
            }
        }
        let key = format!("slm_{name}_logits");
        let want = rec
            .get(&key)
            .unwrap_or_else(|| panic!("{key}: run make_fixtures.py peft"));
        assert_close(
            &per_text_logits(&base, &committed, &rows),
            &flat(want),
            1e-5,
            &format!("{name}: slm adapter in PEFT"),
        );
    }
}

/// PEFT 0.21's adapters on the tiny Gemma 2 (q_proj, v_proj) and Gemma 3 (every projection)
/// give PEFT's logits in slm.
#[test]
fn gemma_adapters_made_by_peft_give_peft_logits() {
    let root = fixtures().join("gemma");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("train_causal.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
    for name in ["gemma2", "gemma3"] {
        let want: Vec<f32> =
            serde_json::from_value::<Vec<Vec<f32>>>(r["models"][name]["lora_logits"].clone())
                .unwrap()
                .concat();
        let base = fixtures().join(name).join("safetensors");
        assert_close(
            &causal_logits(&base, &root.join(format!("peft/{name}_lora")), &ids),
            &want,
            1e-4,
            &format!("{name}: PEFT adapter in slm"),
        );
    }
}

/// Three LoRA steps of slm on `ids` from `base`, saved to `dir` as the committed adapter that
/// PEFT then reads (only the adapter files: tokenizer files would be copies of the fixture's).
fn write_slm_adapter(base: &Path, targets: &[&str], ids: &[u32], dir: &Path) {
    use slm::train::causal::CausalRun;
    use slm::train::lm::{CausalBatch, CausalLm};
    use slm::train::tape::LoraSpec;
    use slm::train::trainer::Model;
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        dropout: 0.0,
    };
    let model = CausalLm::load(base, Some(spec), 3).unwrap();
    let b = CausalBatch {
        targets: ids[1..].iter().map(|&i| Some(i)).chain([None]).collect(),
        ids: ids.to_vec(),
        lengths: vec![ids.len()],
        t: ids.len(),
    };
    let mut run = CausalRun {
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
            .to_str()
            .unwrap()
            .starts_with("adapter")
        {
            std::fs::remove_file(f).unwrap();
        }
    }
}

/// The adapters slm trains on the tiny Gemma 2 and Gemma 3 give in PEFT 0.21 (transformers
/// 5.24) the logits slm gives (committed, written by `SLM_WRITE_FIXTURES=1`, then
/// `make_fixtures.py gemma_peft`).
#[test]
fn gemma_adapters_written_by_slm_give_the_same_logits_in_peft() {
    let root = fixtures().join("gemma");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("train_causal.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("peft/expected.json")).unwrap_or_default(),
    )
    .unwrap_or_default();
    for (name, targets) in [
        ("gemma2", &["q_proj", "v_proj"][..]),
        (
            "gemma3",
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    ] {
        let base = fixtures().join(name).join("safetensors");
        let committed = root.join(format!("peft/slm_{name}_adapter"));
        if std::env::var_os("SLM_WRITE_FIXTURES").is_some() {
            write_slm_adapter(&base, targets, &ids, &committed);
        }
        let key = format!("slm_{name}_logits");
        let want: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(
            peft.get(&key)
                .unwrap_or_else(|| panic!("{key}: run make_fixtures.py gemma_peft"))
                .clone(),
        )
        .unwrap()
        .concat();
        assert_close(
            &causal_logits(&base, &committed, &ids),
            &want,
            1e-4,
            &format!("{name}: slm adapter in PEFT"),
        );
    }
}
