//! The training engine against PyTorch: loss, gradients and AdamW steps of a tiny random-init
//! BertForSequenceClassification recorded by tools/make_fixtures.py (part `train`).

use crate::train_fixture;

use slm::train::bert::{Batch, BertTrain, Method};
use slm::train::optim::{clip_grad_norm, AdamW, OptimConfig, Schedule};
use train_fixture::{batch, fixtures, labels, reference};

fn full() -> Method {
    Method {
        lora: None,
        targets: Vec::new(),
        seed: 0,
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
    let mut m = BertTrain::load(&dir, labels(), &full()).unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = Dropout::Off;
    let b = batch(&r);
    let loss = m.forward_backward(&b, 1).unwrap();
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
        let mut grad = p.grad.clone().unwrap();
        if p.transposed {
            // Held [out, in]; GPT-2's Conv1D (and PyTorch's gradient) is [in, out].
            let (o, i) = (p.shape[0], p.shape[1]);
            grad = (0..i * o).map(|k| grad[(k % o) * i + k / o]).collect();
        }
        let (d, scale) = max_diff(&grad, &g);
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
    let mut m = BertTrain::load(&dir, labels(), &full()).unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = Dropout::Off;
    let b = batch(&r);
    let cfg = OptimConfig {
        optimizer: slm::train::optim::Optimizer::AdamW,
        plateau_factor: None,
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
        let loss = m.forward_backward(&b, 1).unwrap();
        assert!((loss - w).abs() < 1e-5, "step {step}: {loss} vs torch {w}");
        clip_grad_norm(&mut m.params, cfg.max_grad_norm);
        opt.step(&mut m.params, &cfg, cfg.lr_at(step, 4));
        m.params.zero_grad();
    }
    let logits = m.logits(&b).unwrap();
    let targets: Vec<Option<u32>> = b.labels.iter().map(|&l| Some(l)).collect();
    let (loss, _) = slm::train::ops::cross_entropy(&logits, &targets, 3, b.size() as f32);
    let want = r["final_loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-5,
        "after 3 steps {loss} vs torch {want}"
    );
}

use slm::train::lm::CausalLm;
use slm::train::tape::Dropout;

fn lora(r: usize, alpha: f32, targets: &[String]) -> slm::train::tape::LoraSpec {
    slm::train::tape::LoraSpec {
        r,
        alpha,
        targets: targets.to_vec(),
        dropout: 0.0,
    }
}

fn causal_reference() -> serde_json::Value {
    causal_reference_in(&fixtures())
}

fn causal_reference_in(root: &std::path::Path) -> serde_json::Value {
    let p = root.join("train_causal.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Where a fixture generation keeps the model of each name.
type ModelDir = fn(&str) -> std::path::PathBuf;

/// The fixtures made by each transformers major (tools/make_fixtures.py, and its `v5` under
/// transformers 5.x): the folder of their reference files, and where each model is.
fn generations() -> [(std::path::PathBuf, ModelDir); 2] {
    [
        (fixtures(), |n| {
            let enc = n.contains('_');
            let sub = if enc {
                format!("encoders/{n}")
            } else {
                n.into()
            };
            fixtures().join(sub).join("safetensors")
        }),
        (fixtures().join("v5"), |n| fixtures().join("v5").join(n)),
    ]
}

/// HF shifts labels inside the model; slm's targets are already the next token per position.
fn causal_batch(r: &serde_json::Value) -> slm::train::lm::CausalBatch {
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let labels: Vec<Vec<i64>> = serde_json::from_value(r["labels"].clone()).unwrap();
    let t = ids[0].len();
    let targets = labels
        .iter()
        .flat_map(|row| (0..t).map(move |j| row.get(j + 1).filter(|&&l| l >= 0).map(|&l| l as u32)))
        .collect();
    slm::train::lm::CausalBatch {
        lengths: vec![t; ids.len()],
        ids: ids.concat(),
        targets,
        t,
    }
}

pub(crate) fn check_grads(params: &slm::train::params::Params, want: &serde_json::Value) {
    for (name, g) in want.as_object().unwrap() {
        let g: Vec<f64> = serde_json::from_value(g.clone()).unwrap();
        let p = params
            .list
            .iter()
            .find(|p| &p.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let mut grad = p.grad.clone().unwrap();
        if p.transposed {
            // Held [out, in]; GPT-2's Conv1D (and PyTorch's gradient) is [in, out].
            let (o, i) = (p.shape[0], p.shape[1]);
            grad = (0..i * o).map(|k| grad[(k % o) * i + k / o]).collect();
        }
        let (d, scale) = max_diff(&grad, &g);
        assert!(
            d <= 1e-5 + 1e-4 * scale,
            "{name}: max |diff| {d:e} (max |grad| {scale:e})"
        );
    }
}

/// transformers 4.x and 5.x (each its own saved files and its own PyTorch run).
#[test]
fn causal_lm_loss_and_gradients_match_pytorch() {
    for (root, model_dir) in generations() {
        causal_lm_matches(&root, model_dir, &["llama", "qwen2", "gpt2", "phi3"]);
    }
    // Gemma (transformers 5.24 only: 4.46 has no Gemma 3).
    causal_lm_matches(&fixtures().join("gemma"), gemma_dir, &["gemma2", "gemma3"]);
}

fn gemma_dir(n: &str) -> std::path::PathBuf {
    fixtures().join(n).join("safetensors")
}

fn causal_lm_matches(root: &std::path::Path, model_dir: ModelDir, names: &[&str]) {
    let r = causal_reference_in(root);
    let b = causal_batch(&r);
    for &name in names {
        let want = &r["models"][name];
        let dir = model_dir(name);
        let mut m = CausalLm::load(&dir, None, 0).unwrap();
        // The fixtures are PyTorch's gradients in eval mode (GPT-2's config has dropout 0.1).
        m.dropout = Dropout::Off;
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = want["loss"].as_f64().unwrap();
        assert!((loss - w).abs() < 1e-5, "{name}: loss {loss} vs torch {w}");
        check_grads(&m.params, &want["grads"]);
        let with_grad = m
            .params
            .list
            .iter()
            .filter(|p| p.grad.as_ref().is_some_and(|g| g.iter().any(|&x| x != 0.0)))
            .count();
        assert_eq!(
            with_grad,
            m.params.list.len(),
            "{name}: every parameter gets a gradient"
        );
        assert_eq!(
            with_grad as u64,
            want["params_with_grad"].as_u64().unwrap(),
            "{name}"
        );
    }
}

/// PEFT 0.13 with transformers 4.x and PEFT 0.21 with 5.x.
#[test]
fn causal_lora_loss_and_gradients_match_peft() {
    for (root, model_dir) in generations() {
        causal_lora_matches(
            &root,
            model_dir,
            &[
                ("llama", &["q_proj", "v_proj"][..]),
                ("qwen2", &["q_proj", "v_proj"]),
                ("gpt2", &["c_attn", "c_proj", "c_fc"]),
                ("phi3", &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
            ],
        );
    }
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    causal_lora_matches(
        &fixtures().join("gemma"),
        gemma_dir,
        &[("gemma2", &["q_proj", "v_proj"][..]), ("gemma3", &all)],
    );
}

fn causal_lora_matches(root: &std::path::Path, model_dir: ModelDir, models: &[(&str, &[&str])]) {
    let r = causal_reference_in(root);
    let b = causal_batch(&r);
    for &(name, targets) in models {
        let want = &r["models"][name];
        let dir = model_dir(name);
        let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        let mut m = CausalLm::load(&dir, Some(lora(4, 8.0, &targets)), 0).unwrap();
        m.dropout = Dropout::Off;
        // PEFT's random A and B, so that both sides start from the same adapter.
        let adapter = root.join(format!("peft/{name}_lora/adapter_model.safetensors"));
        let values = slm::io::write::read_safetensors_f32(&adapter).unwrap();
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
        assert_eq!(set, values.len());
        assert_eq!(
            m.params.list.iter().filter(|p| p.grad.is_some()).count(),
            set,
            "only LoRA trains"
        );
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = want["lora_loss"].as_f64().unwrap();
        assert!(
            (loss - w).abs() < 1e-5,
            "{name}: LoRA loss {loss} vs PEFT {w}"
        );
        check_grads(&m.params, &want["lora_grads"]);
    }
}

fn smollm2_tokenizer() -> slm::tokenize::Tokenizer {
    let p =
        slm::assets_dir().join("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "missing {} (set SLM_ASSETS)", p.display());
    let files = slm::io::ModelFiles::locate(&p).unwrap();
    slm::tokenize::Tokenizer::load(&files).unwrap()
}

#[test]
fn chat_and_completion_data_learn_only_the_answers() {
    use slm::train::causal::{load_causal_data, CausalDataOptions};
    let tok = smollm2_tokenizer();
    let d = crate::scratch::Scratch::new("train-data");
    let path = d.join("sft.jsonl");
    std::fs::write(
        &path,
        concat!(
            "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Capital of France?\"}, {\"role\": \"assistant\", \"content\": \"Paris.\"}, {\"role\": \"user\", \"content\": \"And Italy?\"}, {\"role\": \"assistant\", \"content\": \"Rome.\"}]}\n",
            "\n",
            "{\"prompt\": \"2 + 2 =\", \"completion\": \" 4\"}\n",
        ),
    )
    .unwrap();
    let opts = CausalDataOptions {
        train: &path,
        valid: None,
        valid_split: 0.0,
        seed: 0,
        max_len: 256,
    };
    let data = load_causal_data(&tok, &opts).unwrap();
    assert_eq!(data.train.len(), 2);
    let learned = |e: &slm::train::causal::CausalExample| -> String {
        let ids: Vec<u32> = e.targets.iter().flatten().copied().collect();
        tok.decode(&ids, false).unwrap()
    };
    // Each assistant turn with the template's end of turn; nothing of system or user.
    assert_eq!(
        learned(&data.train[0]),
        "Paris.<|im_end|>\nRome.<|im_end|>\n"
    );
    assert_eq!(learned(&data.train[1]), " 4<|im_end|>");
    // Targets are the next ids.
    let e = &data.train[0];
    for (i, t) in e.targets.iter().enumerate() {
        if let Some(t) = t {
            assert_eq!(*t, e.ids[i + 1]);
        }
    }

    // A malformed line is reported with its number; a chat without an answer too.
    std::fs::write(
        &path,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"\n",
    )
    .unwrap();
    let err = load_causal_data(&tok, &opts).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("not JSON"), "{err}");
    std::fs::write(
        &path,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let err = load_causal_data(&tok, &opts).unwrap_err().to_string();
    assert!(
        err.contains("line 1") && err.contains("no assistant"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn masked_lm_loss_and_gradients_match_pytorch() {
    let r = &reference()["mlm"];
    let dir = fixtures().join("encoders/bert_mlm/safetensors");
    let mut m = BertTrain::load_masked_lm(&dir, &full()).unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = Dropout::Off;
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let labels: Vec<Vec<i64>> = serde_json::from_value(r["labels"].clone()).unwrap();
    let t = ids[0].len();
    let b = Batch {
        lengths: ids
            .iter()
            .map(|r| r.iter().filter(|&&i| i != 0).count())
            .collect(),
        ids: ids.concat(),
        types: vec![0; ids.len() * t],
        t,
        labels: vec![],
        targets: labels
            .concat()
            .iter()
            .map(|&l| (l >= 0).then_some(l as u32))
            .collect(),
    };
    let loss = m.forward_backward(&b, 1).unwrap();
    let want = r["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-5,
        "MLM loss {loss} vs torch {want}"
    );
    check_grads(&m.params, &r["grads"]);
}

/// Central differences of `loss` at the `k` entries of each named parameter with the largest
/// gradients, against those gradients.
fn finite_differences<T>(
    model: &mut T,
    params: fn(&mut T) -> &mut slm::train::params::Params,
    names: &[&str],
    k: usize,
    loss: &dyn Fn(&T) -> f64,
) {
    let eps = 1e-2f32;
    for name in names {
        let list = &params(model).list;
        let i = list
            .iter()
            .position(|p| p.name == *name)
            .unwrap_or_else(|| panic!("{name}"));
        let g = list[i]
            .grad
            .clone()
            .unwrap_or_else(|| panic!("{name} is not trained"));
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &j in order.iter().take(k) {
            let orig = params(model).list[i].value[j];
            params(model).list[i].value[j] = orig + eps;
            let up = loss(model);
            params(model).list[i].value[j] = orig - eps;
            let down = loss(model);
            params(model).list[i].value[j] = orig;
            let numeric = (up - down) / (2.0 * eps as f64);
            let err = (numeric - g[j] as f64).abs();
            assert!(
                err <= 2e-4 + 3e-2 * numeric.abs(),
                "{name}[{j}]: analytic {} numeric {numeric}",
                g[j]
            );
        }
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    use slm::train::ops::cross_entropy;
    // BERT: embeddings, LayerNorm, attention with padding, GELU MLP, pooler, classifier, loss.
    let mut m = BertTrain::load(
        &fixtures().join("encoders/bert_cls/safetensors"),
        labels(),
        &full(),
    )
    .unwrap();
    // The references are PyTorch's in eval mode: no dropout.
    m.dropout = Dropout::Off;
    let b = batch(&reference());
    m.forward_backward(&b, 1).unwrap();
    let (targets, classes) = m.targets(&b);
    finite_differences(
        &mut m,
        |m| &mut m.params,
        &[
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.self.key.bias",
            "bert.encoder.layer.1.intermediate.dense.weight",
            "bert.encoder.layer.1.output.LayerNorm.bias",
            "bert.pooler.dense.weight",
            "classifier.weight",
        ],
        3,
        &|m| {
            cross_entropy(
                &m.logits(&b).unwrap(),
                &targets,
                classes,
                targets.len() as f32,
            )
            .0
        },
    );

    // Llama with LoRA (non-zero B) on every projection: RMSNorm, RoPE, GQA causal attention,
    // SwiGLU MLP, untied head.
    let cr = causal_reference();
    let cb = causal_batch(&cr);
    let mean_loss = |l: &CausalLm| {
        let (sum, n) = l.loss_sum(&cb).unwrap();
        sum / n as f64
    };
    let modules = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .map(String::from)
    .to_vec();
    let dir = fixtures().join("llama/safetensors");
    let mut l = CausalLm::load(&dir, Some(lora(2, 4.0, &modules)), 5).unwrap();
    for (k, p) in l
        .params
        .list
        .iter_mut()
        .filter(|p| p.name.contains("lora_B"))
        .enumerate()
    {
        let n = p.value.len();
        p.value = (0..n)
            .map(|i| (((i * 7 + k * 13) % 11) as f32 - 5.0) * 0.02)
            .collect();
    }
    l.forward_backward(&cb, 1).unwrap();
    finite_differences(
        &mut l,
        |l| &mut l.params,
        &[
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.k_proj.lora_B.weight",
            "model.layers.1.self_attn.v_proj.lora_A.weight",
            "model.layers.0.mlp.gate_proj.lora_B.weight",
            "model.layers.1.mlp.down_proj.lora_A.weight",
        ],
        3,
        &mean_loss,
    );

    // Full Llama: the embedding (shared rows), the norms and the head.
    let mut l = CausalLm::load(&dir, None, 0).unwrap();
    l.forward_backward(&cb, 1).unwrap();
    finite_differences(
        &mut l,
        |l| &mut l.params,
        &[
            "model.embed_tokens.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ],
        3,
        &mean_loss,
    );
}

/// A copy of a fixture folder with `key` of its config.json set to `value`.
fn with_config(
    src: &std::path::Path,
    name: &str,
    key: &str,
    value: &str,
) -> crate::scratch::Scratch {
    let d = crate::scratch::Scratch::new(&format!("train-{name}"));
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = value.into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    d
}

/// The MLP activation is the config's: a Llama with GELU (tanh) trains with GELU's
/// derivative (finite differences), and its training logits are the inference logits.
#[test]
fn llama_trains_the_activation_its_config_names() {
    use slm::train::ops::cross_entropy;
    let d = with_config(
        &fixtures().join("llama/safetensors"),
        "act-llama",
        "hidden_act",
        "gelu_pytorch_tanh",
    );
    let cr = causal_reference();
    let cb = causal_batch(&cr);
    let mut l = CausalLm::load(&d, None, 0).unwrap();
    l.forward_backward(&cb, 1).unwrap();
    let v = 320;
    finite_differences(
        &mut l,
        |l| &mut l.params,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ],
        3,
        &|l| {
            let logits = l.logits(&cb).unwrap();
            let n = cb.targets.iter().filter(|t| t.is_some()).count();
            cross_entropy(&logits, &cb.targets, v, n as f32).0
        },
    );
    let mut inf = slm::models::load_causal(&d, slm::models::ComputeDtype::F32).unwrap();
    let ids = &cb.ids[..cb.t];
    let want = inf.model.forward(ids, 0, true).unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let got = &l.logits(&cb).unwrap()[..cb.t * v];
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "training vs inference logits: {d}");
}

/// One definition, two executors, for the encoders: the training executor's logits are the
/// inference executor's for every flavor and head (BERT, DistilBERT, RoBERTa; classification
/// and masked LM), and for an activation other than GELU.
#[test]
fn encoder_training_and_inference_forwards_give_the_same_logits() {
    let mut b = batch(&reference());
    // Two masked positions per sequence for the masked-LM heads.
    b.targets = (0..b.ids.len())
        .map(|i| (i % b.t == 2 || i % b.t == 3).then_some(b.ids[i]))
        .collect();
    let relu = with_config(
        &fixtures().join("encoders/bert_cls/safetensors"),
        "act-bert",
        "hidden_act",
        "relu",
    );
    let enc = |n: &str| fixtures().join(format!("encoders/{n}/safetensors"));
    let models = [
        ("bert_cls", enc("bert_cls")),
        ("bert relu", relu.to_path_buf()),
        ("distilbert_cls", enc("distilbert_cls")),
        ("roberta_cls", enc("roberta_cls")),
        ("bert_mlm", enc("bert_mlm")),
        ("distilbert_mlm", enc("distilbert_mlm")),
        ("roberta_mlm", enc("roberta_mlm")),
    ];
    for (name, dir) in models {
        let m = if name.ends_with("mlm") {
            BertTrain::load_masked_lm(&dir, &full()).unwrap()
        } else {
            BertTrain::load(&dir, labels(), &full()).unwrap()
        };
        let got = m.logits(&b).unwrap();
        let inf = slm::models::load_encoder(&dir).unwrap().model;
        let eb = train_fixture::encoder_batch(&b);
        let all: Vec<f32> = inf
            .logits(&eb)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = if name.ends_with("mlm") {
            let v = inf.config.vocab_size;
            (0..b.targets.len())
                .filter(|&i| b.targets[i].is_some())
                .flat_map(|i| all[i * v..(i + 1) * v].to_vec())
                .collect()
        } else {
            all
        };
        assert_eq!(got.len(), want.len(), "{name}");
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{name}: training vs inference logits {d:e}");
    }
}

/// One definition, two executors: for every causal family the training executor's logits are
/// the inference executor's (f32, whole sequences of the training batch).
#[test]
fn training_and_inference_forwards_give_the_same_logits() {
    let cr = causal_reference();
    let cb = causal_batch(&cr);
    for name in ["gpt2", "llama", "qwen2", "phi3", "gemma2", "gemma3"] {
        let dir = fixtures().join(name).join("safetensors");
        let m = CausalLm::load(&dir, None, 0).unwrap();
        let train = m.logits(&cb).unwrap();
        let mut inf = slm::models::load_causal(&dir, slm::models::ComputeDtype::F32).unwrap();
        let v = inf.model.vocab_size();
        for s in 0..cb.size() {
            inf.model.clear_cache();
            let ids = &cb.ids[s * cb.t..][..cb.t];
            let want: Vec<f32> = inf
                .model
                .forward(ids, 0, true)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = &train[s * cb.t * v..][..cb.t * v];
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // f32 rounding grows with the logits' size (Gemma 2's reach ~20): a few ulps of
            // the largest, whatever order the two executors' kernels sum in.
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            assert!(
                d < 1e-5 * scale,
                "{name} sequence {s}: max |diff| {d:e} (largest logit {scale})"
            );
        }
    }
}

/// GPT-2 with its config's dropout (embeddings, residual branches, attention probabilities,
/// 0.1 each): the gradients are those of the dropped network (finite differences through the
/// same masks), the masks repeat for the same step, and evaluation drops nothing.
#[test]
fn gpt2_dropout_trains_the_network_it_drops() {
    let cr = causal_reference();
    let cb = causal_batch(&cr);
    let dir = fixtures().join("gpt2/safetensors");
    let mut m = CausalLm::load(&dir, None, 0).unwrap();
    assert_eq!(
        m.dropout,
        Dropout::Config,
        "dropout is on by default, as transformers trains"
    );
    let dropped = m.training_loss(&cb).unwrap();
    assert_eq!(
        dropped,
        m.training_loss(&cb).unwrap(),
        "same step, same masks"
    );
    let (sum, n) = m.loss_sum(&cb).unwrap();
    let eval = sum / n as f64;
    assert!(
        (dropped - eval).abs() > 1e-4,
        "dropout changed nothing: {dropped} vs {eval}"
    );
    m.dropout = Dropout::Off;
    assert!((m.training_loss(&cb).unwrap() - eval).abs() < 1e-9);
    m.dropout = Dropout::Config;
    let loss = m.forward_backward(&cb, 1).unwrap();
    assert!((loss - dropped).abs() < 1e-9);
    finite_differences(
        &mut m,
        |m| &mut m.params,
        &[
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.ln_f.bias",
        ],
        3,
        &|m| m.training_loss(&cb).unwrap(),
    );
}

/// DistilBERT and RoBERTa with each head, and BERT's token head: loss and gradients of the
/// training executor against PyTorch (tools/make_fixtures.py `train`, eval mode), from the files
/// transformers 4.x and 5.x each wrote; with 5.x also the inference executor's logits.
#[test]
fn encoder_flavors_and_heads_match_pytorch_gradients() {
    for (root, model_dir) in generations() {
        encoders_match(&root, model_dir);
    }
}

fn encoders_match(root: &std::path::Path, model_dir: ModelDir) {
    let p = root.join("train_encoders.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let t = rows[0].len();
    let flat = |k: &str| -> Vec<Option<u32>> {
        let v: Vec<Vec<i64>> = serde_json::from_value(r[k].clone()).unwrap();
        v.concat()
            .into_iter()
            .map(|x| (x >= 0).then_some(x as u32))
            .collect()
    };
    let mut b = slm::train::bert::Batch {
        lengths: rows
            .iter()
            .map(|r| r.iter().filter(|&&i| i != 0).count())
            .collect(),
        ids: rows.concat(),
        types: vec![0; rows.len() * t],
        t,
        labels: serde_json::from_value(r["seq_labels"].clone()).unwrap(),
        targets: vec![],
    };
    for (name, want) in r["models"].as_object().unwrap() {
        let dir = model_dir(name);
        let labels = slm::models::load_encoder(&dir).unwrap().model.labels;
        let mut m = match name.rsplit('_').next().unwrap() {
            "cls" => BertTrain::load(&dir, labels, &full()).unwrap(),
            "tok" => {
                b.targets = flat("tags");
                BertTrain::load_token_classifier(&dir, labels, &full()).unwrap()
            }
            _ => {
                b.targets = flat("mlm_labels");
                BertTrain::load_masked_lm(&dir, &full()).unwrap()
            }
        };
        m.dropout = Dropout::Off;
        let loss = m.forward_backward(&b, 1).unwrap();
        let w = want["loss"].as_f64().unwrap();
        assert!((loss - w).abs() < 1e-5, "{name}: loss {loss} vs torch {w}");
        check_grads(&m.params, &want["grads"]);
        if let Some(logits) = want.get("logits") {
            check_encoder_logits(name, &dir, &b, logits);
        }
    }
}

/// The inference executor's logits against transformers' at every real (unpadded) position.
fn check_encoder_logits(
    name: &str,
    dir: &std::path::Path,
    b: &slm::train::bert::Batch,
    want: &serde_json::Value,
) {
    let inf = slm::models::load_encoder(dir).unwrap().model;
    let eb = train_fixture::encoder_batch(b);
    let got = inf.logits(&eb).unwrap();
    let mut d = 0f32;
    let mut n = 0;
    for s in 0..b.size() {
        let row = got.get(s).unwrap();
        if row.dims().len() == 1 {
            let w: Vec<f32> = serde_json::from_value(want[s].clone()).unwrap();
            let g: Vec<f32> = row.to_vec1().unwrap();
            d = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(d, f32::max);
            n += w.len();
            continue;
        }
        let g: Vec<Vec<f32>> = row.to_vec2().unwrap();
        for (j, gj) in g.iter().enumerate().take(b.lengths[s]) {
            let w: Vec<f32> = serde_json::from_value(want[s][j].clone()).unwrap();
            d = gj
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(d, f32::max);
            n += w.len();
        }
    }
    assert!(n > 0, "{name}: no logits compared");
    assert!(d <= 1e-4, "{name}: inference logits vs transformers {d:e}");
}
