//! Encoder-decoders (T5 with ReLU and a tied head, T5 v1.1 with gated GELU and an untied one)
//! against transformers on the same random weights: encoder states, decoder logits, relative
//! position buckets, greedy and beam-search outputs (tools/make_fixtures.py t5).

use slm::generate::beam::{self, BeamOptions, EarlyStopping, Hypothesis};
use slm::generate::sampling::argmax;
use slm::models::seq2seq::{load_seq2seq, Seq2SeqLM};
use slm::nn::exec::RelativePositions;

use crate::common::{fixtures, ids, read_json};

pub fn max_diff(got: &[Vec<f32>], want: &serde_json::Value) -> f32 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "rows");
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let w = w.as_array().unwrap();
        assert_eq!(g.len(), w.len(), "columns");
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    let t = t.squeeze(0).unwrap();
    t.to_vec2::<f32>().unwrap()
}

/// Each family's fixture (under tests/fixtures) and the weight files it is read from.
const FAMILIES: [(&str, &str); 5] = [
    ("t5/t5_relu", "safetensors"),
    ("t5/t5_relu", "bin"),
    ("t5/t5_gated", "safetensors"),
    ("bart/bart", "safetensors"),
    ("bart/marian", "safetensors"),
];

/// The fixtures with greedy and beam-search references.
const MODELS: [&str; 4] = ["t5/t5_relu", "t5/t5_gated", "bart/bart", "bart/marian"];

#[test]
fn encoder_states_and_decoder_logits_match_transformers() {
    for (name, format) in FAMILIES {
        let dir = fixtures().join(name);
        let expected = read_json(dir.join("expected.json"));
        let m = load_seq2seq(&dir.join(format)).unwrap();
        let model = m.model.as_ref();
        for case in expected["cases"].as_array().unwrap() {
            let src = ids(&case["input_ids"]);
            let enc = model.encode(&[&src]).unwrap().remove(0);
            let d = max_diff(&rows(&enc), &case["encoder"]);
            assert!(d <= 1e-4, "{name}/{format} encoder {src:?}: max |diff| {d}");
            // Teacher forcing: every decoder row in one pass.
            let dec = ids(&case["decoder_input_ids"]);
            let mut cache = model.new_cache();
            let logits = model
                .decode(&mut [(&mut cache, &dec)], Some(&enc), true)
                .unwrap();
            let d = max_diff(&logits.to_vec2::<f32>().unwrap(), &case["logits"]);
            assert!(
                d <= 1e-4,
                "{name}/{format} decoder logits {dec:?}: max |diff| {d}"
            );
            // The same rows one at a time over the cache (cross-attention keys kept).
            let mut cache = model.new_cache();
            for (i, &id) in dec.iter().enumerate() {
                let memory = (i == 0).then_some(&enc);
                let row = model
                    .decode(&mut [(&mut cache, &[id])], memory, false)
                    .unwrap();
                let want = &case["logits"][i];
                let d = max_diff(&row.to_vec2::<f32>().unwrap(), &serde_json::json!([want]));
                assert!(d <= 1e-4, "{name} cached step {i}: max |diff| {d}");
            }
        }
        // A padded batch of sources gives each one's states.
        let sources: Vec<Vec<u32>> = expected["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["input_ids"]))
            .collect();
        let refs: Vec<&[u32]> = sources.iter().map(Vec::as_slice).collect();
        let states = model.encode(&refs).unwrap();
        for (i, s) in states.iter().enumerate() {
            let d = max_diff(&rows(s), &expected["batch_encoder"][i]);
            assert!(d <= 1e-4, "{name} batched source {i}: max |diff| {d}");
        }
    }
}

#[test]
fn relative_position_buckets_match_transformers() {
    for name in ["t5_relu", "t5_gated"] {
        let dir = fixtures().join("t5").join(name);
        let expected = read_json(dir.join("expected.json"));
        let cfg = read_json(dir.join("safetensors/config.json"));
        let rel: Vec<i64> = expected["relative"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        for bidirectional in [true, false] {
            let r = RelativePositions {
                buckets: cfg["relative_attention_num_buckets"].as_u64().unwrap() as usize,
                max_distance: cfg["relative_attention_max_distance"].as_u64().unwrap() as usize,
                bidirectional,
            };
            let want = ids(&expected["buckets"][if bidirectional { "True" } else { "False" }]);
            let got: Vec<u32> = rel.iter().map(|&d| r.bucket(d as isize)).collect();
            assert_eq!(got, want, "{name} bidirectional={bidirectional}");
        }
    }
}

/// Greedy decoding over the cache, stopping at EOS as generate() does.
pub fn greedy(model: &dyn Seq2SeqLM, src: &[u32], max_new: usize) -> Vec<u32> {
    let enc = model.encode(&[src]).unwrap().remove(0);
    let mut cache = model.new_cache();
    let mut out = vec![model.decoder_start()];
    for i in 0..max_new {
        let memory = (i == 0).then_some(&enc);
        let last = [*out.last().unwrap()];
        let logits = model
            .decode(&mut [(&mut cache, &last)], memory, false)
            .unwrap();
        let next = argmax(&logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        if next == model.eos() {
            break;
        }
    }
    out
}

#[test]
fn greedy_ids_match_generate() {
    for name in MODELS {
        let dir = fixtures().join(name);
        let expected = read_json(dir.join("expected.json"));
        let m = load_seq2seq(&dir.join("safetensors")).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let src = ids(&case["input_ids"]);
            assert_eq!(
                greedy(m.model.as_ref(), &src, 12),
                ids(&case["greedy"]),
                "{name} {src:?}"
            );
        }
    }
}

/// The options of a recorded `generate(num_beams=…)` call.
fn beam_options(b: &serde_json::Value, default_eos: u32) -> BeamOptions {
    BeamOptions {
        beams: b["num_beams"].as_u64().unwrap() as usize,
        max_new_tokens: b["max_new_tokens"].as_u64().unwrap() as usize,
        length_penalty: b["length_penalty"].as_f64().unwrap(),
        early_stopping: match &b["early_stopping"] {
            serde_json::Value::Bool(true) => EarlyStopping::Finished,
            serde_json::Value::Bool(false) => EarlyStopping::Heuristic,
            _ => EarlyStopping::Never,
        },
        no_repeat_ngram: b["no_repeat_ngram_size"].as_u64().unwrap() as usize,
        num_return: b["num_return"].as_u64().unwrap() as usize,
        // None: generate() falls back to the model's EOS.
        eos: Some(b["eos"].as_u64().map_or(default_eos, |e| e as u32)),
        forced_eos: None,
    }
}

/// The rows generate() returns for these hypotheses: prompt and tokens, the EOS appended to
/// those shorter than the longest (plus one, within the maximum length), padding after.
fn generate_rows(
    prompt: &[u32],
    hyps: &[Hypothesis],
    opts: &BeamOptions,
    pad: u32,
) -> Vec<Vec<u32>> {
    let longest = hyps
        .iter()
        .map(|h| prompt.len() + h.tokens.len())
        .max()
        .unwrap();
    let width = (longest + 1).min(prompt.len() + opts.max_new_tokens);
    hyps.iter()
        .map(|h| {
            let mut r = [prompt, &h.tokens].concat();
            if r.len() < width {
                r.push(opts.eos.unwrap());
            }
            r.resize(width, pad);
            r
        })
        .collect()
}

fn check_beams(
    what: &str,
    prompt: &[u32],
    b: &serde_json::Value,
    got: &[Hypothesis],
    opts: &BeamOptions,
    pad: u32,
) {
    let want: Vec<Vec<u32>> = b["sequences"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(
        generate_rows(prompt, got, opts, pad),
        want,
        "{what} {opts:?}"
    );
    for (h, w) in got.iter().zip(b["scores"].as_array().unwrap()) {
        let w = w.as_f64().unwrap();
        assert!(
            (h.score - w).abs() < 1e-4,
            "{what} {opts:?}: score {} vs {w}",
            h.score
        );
    }
}

#[test]
fn beam_search_matches_generate() {
    let mut settings = 0;
    for name in MODELS {
        let dir = fixtures().join(name);
        let expected = read_json(dir.join("expected.json"));
        let m = load_seq2seq(&dir.join("safetensors")).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let src = ids(&case["input_ids"]);
            for b in case["beams"].as_array().unwrap() {
                let opts = beam_options(b, m.model.eos());
                let got = beam::seq2seq(m.model.as_ref(), &src, &opts).unwrap();
                let (start, pad) = (m.model.decoder_start(), m.model.pad());
                check_beams(&format!("{name} {src:?}"), &[start], b, &got, &opts, pad);
                settings += 1;
            }
        }
    }
    assert_eq!(settings, 4 * 3 * 8);
}

#[test]
fn causal_beam_search_matches_generate() {
    let expected = read_json(fixtures().join("t5/gpt2_beams.json"));
    let m = slm::models::load_causal(
        &fixtures().join("gpt2/safetensors"),
        slm::models::ComputeDtype::F32,
    )
    .unwrap();
    let mut finished = 0;
    for case in expected["cases"].as_array().unwrap() {
        let prompt = ids(&case["input_ids"]);
        for b in case["beams"].as_array().unwrap() {
            // The tiny GPT-2's EOS is id 0.
            let opts = beam_options(b, 0);
            let got = beam::causal(m.model.as_ref(), &prompt, &opts).unwrap();
            finished += got.iter().filter(|h| h.eos).count();
            check_beams(&format!("gpt2 {prompt:?}"), &prompt, b, &got, &opts, 0);
        }
    }
    // The early EOS ends some hypotheses: the finished-hypothesis path is exercised.
    assert!(finished > 0);
}
