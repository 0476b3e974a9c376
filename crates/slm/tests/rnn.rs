//! Recurrent models against PyTorch (tools/make_rnn_fixtures.py): nn.LSTM / nn.GRU cells
//! forward and BPTT with a carried state, and checkpoints of PyTorch's `word_language_model`
//! (a torch.save state_dict and a safetensors file, with vocab.txt and no config) evaluated as
//! one stream.

use crate::common;

use std::path::PathBuf;

use serde_json::Value;
use slm::eval::perplexity::{perplexity, Options};
use slm::models::{load_causal, ComputeDtype};
use slm::nn::recurrent::{self, Cell, Hidden, Layout, RecurrentSpec, State};
use slm::tokenize::Tokenizer;
use slm::train::ops;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn rnn_fixtures() -> PathBuf {
    common::fixtures().join("rnn")
}

fn close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol * scale,
        "{name}: max |diff| {worst} (scale {scale})"
    );
}

/// The fixture's stacked layers on slm's kernels: outputs, final states and every gradient.
fn check_cell(kind: &str, cell: Cell) {
    let all = common::read_json(rnn_fixtures().join("cells.json"));
    let c = &all[kind];
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let (ninp, hd, layers, b, t) = (n("ninp"), n("nhid"), n("layers"), n("b"), n("t"));
    let g = cell.gates() * hd;
    let p = |name: &str| floats(&c["params"][name]);
    let spec = RecurrentSpec {
        cell,
        hidden: hd,
        reverse: false,
    };
    let starts: Vec<usize> = (0..b).map(|s| s * t).collect();
    let lengths = vec![t; b];
    let layout = Layout {
        starts: &starts,
        lengths: &lengths,
        rows: b * t,
    };
    let h0 = floats(&c["h0"]);
    let c0 = if cell == Cell::Lstm {
        floats(&c["c0"])
    } else {
        Vec::new()
    };
    let mut x = floats(&c["x"]);
    let mut inputs = Vec::new();
    let mut saves = Vec::new();
    let (mut hn, mut cn) = (Vec::new(), Vec::new());
    for k in 0..layers {
        let din = if k == 0 { ninp } else { hd };
        let gx = ops::linear(
            &x,
            &p(&format!("weight_ih_l{k}")),
            Some(&p(&format!("bias_ih_l{k}"))),
            (b * t, din, g),
        );
        let mut state = State {
            h: h0[k * b * hd..][..b * hd].to_vec(),
            c: if c0.is_empty() {
                Vec::new()
            } else {
                c0[k * b * hd..][..b * hd].to_vec()
            },
        };
        let whh = p(&format!("weight_hh_l{k}"));
        let bhh = p(&format!("bias_hh_l{k}"));
        let hh = Hidden {
            w: &whh,
            transposed: false,
            b: Some(&bhh),
        };
        let (y, saved) = recurrent::forward(spec, &gx, hh, &mut state, &layout, true);
        hn.extend_from_slice(&state.h);
        cn.extend_from_slice(&state.c);
        inputs.push(std::mem::replace(&mut x, y));
        saves.push(saved.unwrap());
    }
    close(&format!("{kind} y"), &x, &floats(&c["y"]), 1e-5);
    close(&format!("{kind} h_n"), &hn, &floats(&c["hn"]), 1e-5);
    if cell == Cell::Lstm {
        close(&format!("{kind} c_n"), &cn, &floats(&c["cn"]), 1e-5);
    }
    // Back-propagate sum(y * r) through both layers.
    let mut dy = floats(&c["r"]);
    for k in (0..layers).rev() {
        let din = if k == 0 { ninp } else { hd };
        let whh = p(&format!("weight_hh_l{k}"));
        let mut dwhh = vec![0f32; g * hd];
        let (dgx, dbhh) = recurrent::backward(spec, &dy, &saves[k], &whh, &layout, Some(&mut dwhh));
        let wih = p(&format!("weight_ih_l{k}"));
        let (mut dwih, mut dbih, mut dx) =
            (vec![0f32; g * din], vec![0f32; g], vec![0f32; b * t * din]);
        ops::linear_backward(
            &dgx,
            &inputs[k],
            &wih,
            Some((&mut dx, false)),
            Some(&mut dwih),
            Some(&mut dbih),
            (b * t, din, g),
        );
        let grad = |name: &str| floats(&c["grads"][name]);
        close(
            &format!("{kind} dW_hh l{k}"),
            &dwhh,
            &grad(&format!("weight_hh_l{k}")),
            1e-4,
        );
        close(
            &format!("{kind} db_hh l{k}"),
            &dbhh,
            &grad(&format!("bias_hh_l{k}")),
            1e-4,
        );
        close(
            &format!("{kind} dW_ih l{k}"),
            &dwih,
            &grad(&format!("weight_ih_l{k}")),
            1e-4,
        );
        close(
            &format!("{kind} db_ih l{k}"),
            &dbih,
            &grad(&format!("bias_ih_l{k}")),
            1e-4,
        );
        dy = dx;
    }
    close(&format!("{kind} dx"), &dy, &floats(&c["dx"]), 1e-4);
}

#[test]
fn lstm_forward_and_bptt_match_pytorch() {
    check_cell("LSTM", Cell::Lstm);
}

#[test]
fn gru_forward_and_bptt_match_pytorch() {
    check_cell("GRU", Cell::Gru);
}

/// The fixture's evaluation lines of WikiText-2 valid, as the file has them.
fn eval_text(r: &Value) -> String {
    let path = common::assets().join("corpora/wikitext-2/valid.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set SLM_ASSETS)", path.display()));
    let span = r["eval_lines"].as_array().unwrap();
    let (a, b) = (
        span[0].as_u64().unwrap() as usize,
        span[1].as_u64().unwrap() as usize,
    );
    text.split_inclusive('\n').skip(a).take(b - a).collect()
}

fn check_checkpoint(name: &str) {
    let dir = rnn_fixtures().join(name);
    let r = common::read_json(dir.join("reference.json"));
    let mut m = load_causal(&dir, ComputeDtype::Auto).unwrap();
    let files = slm::io::ModelFiles::locate(&dir).unwrap();
    let slm::models::ModelConfig::Rnn(cfg) = &m.config else {
        panic!("{name}: not read as a recurrent model");
    };
    assert_eq!(cfg.ntoken as u64, r["ntoken"].as_u64().unwrap());
    assert_eq!(cfg.nhid as u64, r["nhid"].as_u64().unwrap());
    assert_eq!(cfg.ninp as u64, r["ninp"].as_u64().unwrap());
    assert_eq!(cfg.nlayers, 2);
    assert_eq!(
        cfg.tie_weights,
        r["tied"].as_bool().unwrap(),
        "{name}: tying"
    );
    assert_eq!(cfg.rnn_type.name(), r["rnn_type"].as_str().unwrap());
    let tok = Tokenizer::load(&files).unwrap();
    let ids = tok.encode(&eval_text(&r), false).unwrap();
    assert_eq!(
        ids.len() as u64,
        r["eval_tokens"].as_u64().unwrap(),
        "{name}: tokens"
    );
    // The chunk length must not matter: the state is carried across chunks.
    for chunk in [35, 1000] {
        let opts = Options {
            max_length: chunk,
            stride: chunk,
        };
        let got = perplexity(m.model.as_mut(), &ids, opts, |_, _| {}).unwrap();
        let want = r["perplexity"].as_f64().unwrap();
        assert_eq!(got.tokens, ids.len() - 1);
        assert!(
            (got.perplexity() / want - 1.0).abs() < 1e-4,
            "{name} chunks of {chunk}: perplexity {} vs PyTorch {want}",
            got.perplexity()
        );
    }
}

#[test]
fn word_language_model_lstm_state_dict_evaluates_to_pytorch_perplexity() {
    check_checkpoint("wlm_lstm");
}

#[test]
fn word_language_model_tied_gru_safetensors_evaluates_to_pytorch_perplexity() {
    check_checkpoint("wlm_gru_tied");
}

fn ids_of(v: &Value) -> Vec<u32> {
    floats(v).iter().map(|&x| x as u32).collect()
}

/// RNNModel's loss and gradients on a second chunk whose state is carried (detached) from the
/// first: the family on the training executor against PyTorch's autograd, dropout off
/// (reference.json) and in training mode with dropout 0.2 at main.py's three sites
/// (dropout.json: the masks slm draws for the batch, applied by PyTorch). The second shows that
/// slm's dropout, forward and backward, between the recurrent layers included, is PyTorch's
/// for any mask: only which masks are drawn differs between the two.
#[test]
fn rnn_model_gradients_with_a_carried_state_match_pytorch() {
    use slm::train::lm::{CausalBatch, CausalLm};
    use slm::train::tape::Dropout;
    for name in ["wlm_lstm", "wlm_gru_tied"] {
        let dir = rnn_fixtures().join(name);
        let r = common::read_json(dir.join("reference.json"));
        let dropped = common::read_json(dir.join("dropout.json"));
        let g = &r["grad"];
        let (b, t) = (
            g["batch"].as_u64().unwrap() as usize,
            g["bptt"].as_u64().unwrap() as usize,
        );
        let batch = |ids: Vec<u32>, targets: Vec<Option<u32>>| CausalBatch {
            ids,
            targets,
            lengths: vec![t; b],
            t,
        };
        let first = batch(ids_of(&g["chunk1"]), vec![None; b * t]);
        let targets = ids_of(&g["targets2"]).into_iter().map(Some).collect();
        let second = batch(ids_of(&g["chunk2"]), targets);
        let cases = [
            ("no dropout", 0, Dropout::Off, g),
            (
                "dropout",
                dropped["seed"].as_u64().unwrap(),
                Dropout::Rate(dropped["dropout"].as_f64().unwrap() as f32),
                &dropped,
            ),
        ];
        for (case, seed, dropout, want) in cases {
            let name = format!("{name} ({case})");
            let mut m = CausalLm::load(&dir, None, seed).unwrap();
            assert!(m.recurrent());
            m.dropout = dropout;
            let (_, _, states) = m.loss_sum_with(&first, Vec::new()).unwrap();
            assert!(
                states.iter().all(Option::is_some),
                "{name}: no state carried"
            );
            m.params.zero_grad();
            let (loss, _) = m.forward_backward_with(&second, 1, states).unwrap();
            let want_loss = want["loss"].as_f64().unwrap();
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "{name}: loss {loss} vs {want_loss}"
            );
            check_grads(&name, &m.params, want["grads"].as_object().unwrap());
        }
    }
}

fn check_grads(
    name: &str,
    params: &slm::train::params::Params,
    grads: &serde_json::Map<String, Value>,
) {
    for (pname, w) in grads {
        let p = params
            .list
            .iter()
            .find(|p| &p.name == pname)
            .unwrap_or_else(|| panic!("{name}: no parameter {pname}"));
        let got = p.grad.as_ref().unwrap();
        if let Some(all) = w.get("all") {
            close(&format!("{name} d{pname}"), got, &floats(all), 1e-4);
        } else {
            let picked: Vec<f32> = ids_of(&w["idx"]).iter().map(|&i| got[i as usize]).collect();
            close(
                &format!("{name} d{pname} (sampled)"),
                &picked,
                &floats(&w["val"]),
                1e-4,
            );
            let sum: f64 = got.iter().map(|x| x.abs() as f64).sum();
            let want = w["abs_sum"].as_f64().unwrap();
            assert!(
                (sum / want - 1.0).abs() < 1e-4,
                "{name} |d{pname}|: {sum} vs {want}"
            );
        }
    }
    assert_eq!(grads.len(), params.list.len(), "{name}: parameters");
}

/// A recurrent text classifier (tools/make_rnn_fixtures.py: PyTorch's modules at their own
/// initialisation, packed sequences of different lengths): the training executor's logits,
/// loss and every gradient (dropout off, and with the masks slm draws), and the inference
/// executor's probabilities, against PyTorch's.
fn check_classifier(name: &str) {
    use slm::tokenize::EncoderInput;
    use slm::train::bert::Batch;
    use slm::train::rnn_classify::RnnClassifierTrain;
    let dir = rnn_fixtures().join(name);
    let r = common::read_json(dir.join("reference.json"));
    let ids: Vec<Vec<u32>> = r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(common::ids)
        .collect();
    let inputs: Vec<EncoderInput> = ids
        .iter()
        .map(|i| EncoderInput {
            ids: i.clone(),
            type_ids: vec![0; i.len()],
            full_len: i.len(),
        })
        .collect();
    let mut batch = Batch::padded(&inputs.iter().collect::<Vec<_>>(), 0);
    batch.labels = common::ids(&r["labels"]);
    let mut m = RnnClassifierTrain::load(&dir, 0).unwrap();
    let want: Vec<f32> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    close(
        &format!("{name} logits"),
        &m.logits(&batch).unwrap(),
        &want,
        1e-5,
    );
    let train_step = |m: &mut RnnClassifierTrain, case: &str, want: &Value| {
        m.params.zero_grad();
        let loss = m.forward_backward(&batch, 1).unwrap();
        let want_loss = want["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "{name} ({case}): loss {loss} vs {want_loss}"
        );
        let grads = want["grads"].as_object().unwrap();
        assert_eq!(grads.len(), m.params.list.len(), "{name}: parameters");
        for p in &m.params.list {
            let want = grads
                .get(&p.name)
                .unwrap_or_else(|| panic!("{name}: PyTorch has no parameter {}", p.name));
            close(
                &format!("{name} ({case}) d{}", p.name),
                p.grad.as_deref().unwrap(),
                &floats(want),
                1e-4,
            );
        }
    };
    train_step(&mut m, "no dropout", &r);
    // Training mode: the dropout masks slm draws for this batch, applied by PyTorch (on the
    // embedding, between the layers and on the pooled vector), give the same loss and gradients.
    let dropped = common::read_json(dir.join("dropout.json"));
    let mut dm = RnnClassifierTrain::load(&dir, dropped["seed"].as_u64().unwrap()).unwrap();
    dm.dropout = slm::train::tape::Dropout::Rate(dropped["dropout"].as_f64().unwrap() as f32);
    train_step(&mut dm, "dropout", &dropped);
    // Inference: the same network over the inference executor, from the texts.
    let c = slm::encode::rnn::RnnTextClassifier::load(&dir).unwrap();
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let probs: Vec<f32> = c.classify(&texts, 3).unwrap().concat();
    let softmax: Vec<f32> = want
        .chunks(3)
        .flat_map(|row| {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |x| x / s)
        })
        .collect();
    close(&format!("{name} probabilities"), &probs, &softmax, 1e-5);
}

#[test]
fn a_bidirectional_lstm_classifier_with_max_pooling_matches_pytorch() {
    check_classifier("bilstm_max");
}

#[test]
fn a_gru_classifier_with_mean_pooling_matches_pytorch() {
    check_classifier("gru_mean");
}

/// `slm embed` on a recurrent classifier: each text's pooled states (max over a 2-layer BiLSTM,
/// mean over a GRU) equal PyTorch's `RNNClassifier.pooled`, alone and in padded batches.
#[test]
fn rnn_classifier_embeddings_equal_pytorch_pooled_states() {
    for name in ["bilstm_max", "gru_mean"] {
        let dir = rnn_fixtures().join(name);
        let r = common::read_json(dir.join("reference.json"));
        let m = slm::encode::rnn::RnnTextClassifier::load(&dir).unwrap();
        let texts: Vec<&str> = r["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let want: Vec<Vec<f32>> = r["pooled"].as_array().unwrap().iter().map(floats).collect();
        for batch in [1, 4] {
            let got = m.embed(&texts, batch, false).unwrap();
            for (g, w) in got.iter().zip(&want) {
                close(&format!("{name} pooled (batch {batch})"), g, w, 1e-5);
            }
        }
        let unit = m.embed(&texts, 4, true).unwrap();
        for (u, w) in unit.iter().zip(&want) {
            let n = w.iter().map(|x| x * x).sum::<f32>().sqrt();
            let w: Vec<f32> = w.iter().map(|x| x / n).collect();
            close(&format!("{name} normalized"), u, &w, 1e-5);
        }
    }
}
