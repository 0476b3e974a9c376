//! Gemma 2 and Gemma 3 against transformers 5.24 on tiny random-init models
//! (tools/make_fixtures.py `gemma`): logits within 1e-4 and identical greedy ids with the KV
//! cache, and from the config.json transformers 4.x
//! writes (tools/make_v4_configs.py) and the older `sliding_window_pattern`.

use crate::common;

use std::path::{Path, PathBuf};

fn folder(family: &str) -> PathBuf {
    common::fixtures().join(family).join("safetensors")
}

/// A copy of the fixture's weights with another config.json.
fn with_config(family: &str, tag: &str, config: &serde_json::Value) -> crate::scratch::Scratch {
    let d = common::tempdir(&format!("{family}-{tag}"));
    for e in std::fs::read_dir(folder(family)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    d
}

fn check(family: &str, dir: &Path) {
    common::check_causal(family, dir);
}

#[test]
fn gemma2_soft_capped_and_alternating_layers_match_transformers() {
    check("gemma2", &folder("gemma2"));
}

#[test]
fn gemma3_qk_norms_and_two_rope_bases_match_transformers() {
    check("gemma3", &folder("gemma3"));
}

#[test]
fn configs_written_by_transformers_4_give_the_same_model() {
    for family in ["gemma2", "gemma3"] {
        let v4 = common::read_json(common::fixtures().join(family).join("config_v4.json"));
        assert!(
            v4.get("rope_parameters").is_none(),
            "{family}: a 4.x layout"
        );
        let d = with_config(family, "v4", &v4);
        check(family, &d);
        let _ = std::fs::remove_dir_all(&d);
    }
    // Gemma 3 as transformers 4.50-4.52 wrote it: no layer_types, every third layer global.
    let mut old = common::read_json(common::fixtures().join("gemma3/config_v4.json"));
    old.as_object_mut().unwrap().remove("layer_types");
    old["sliding_window_pattern"] = serde_json::json!(3);
    let d = with_config("gemma3", "pattern", &old);
    check("gemma3", &d);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn gemma_configs_slm_cannot_follow_are_errors() {
    let v5 = common::read_json(folder("gemma3").join("config.json"));
    for (key, value, want) in [
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked_attention", "full_attention"]),
            "layer type 'chunked_attention'",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "layer_types has 1 entries for 3 layers",
        ),
        (
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            "rope_scaling type 'yarn' is not supported",
        ),
        (
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
            "scaled RoPE on the sliding layers",
        ),
        (
            "rope_parameters",
            serde_json::json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "chunked": {"rope_type": "default", "rope_theta": 1e4}}),
            "layer type 'chunked'",
        ),
        (
            "query_pre_attn_scalar",
            serde_json::json!(0),
            "query_pre_attn_scalar",
        ),
    ] {
        let mut cfg = v5.clone();
        cfg[key] = value;
        let d = with_config("gemma3", "bad", &cfg);
        let err = slm::models::load_causal(&d, slm::models::ComputeDtype::F32)
            .err()
            .expect("must be refused")
            .to_string();
        assert!(err.contains("config.json") && err.contains(want), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// The real Gemma 3 270M (Q4_K_M GGUF, `tools/fetch_assets.sh --large`).
fn gemma_270m() -> PathBuf {
    let p = slm::models_dir().join("gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} is missing: fetch it with tools/fetch_assets.sh --large",
        p.display()
    );
    p
}

/// `n` greedy tokens after `ids`, one at a time through the KV cache.
fn greedy(m: &mut slm::models::LoadedModel, ids: &[u32], n: usize) -> Vec<u32> {
    use slm::generate::sampling::argmax;
    let model = m.model.as_mut();
    model.clear_cache();
    let last = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut logits = last(model.forward(ids, 0, false).unwrap());
    let mut out = Vec::new();
    for pos in ids.len()..ids.len() + n {
        let next = argmax(&logits);
        out.push(next);
        logits = last(model.forward(&[next], pos, false).unwrap());
    }
    out
}

/// The tokenizer read from the GGUF gives transformers' ids (BOS, no "▁" before the text);
/// the f32 model (dequantized as transformers dequantizes it) gives transformers' 16 greedy
/// tokens after both prompts; the quantized products give the same first tokens.
#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let path = gemma_270m();
    let want = common::read_json(common::fixtures().join("gemma3_270m.json"));
    let files = slm::io::ModelFiles::locate(&path).unwrap();
    let tok = slm::tokenize::Tokenizer::load(&files).unwrap();
    let cases = want["cases"].as_array().unwrap();
    let mut f32 = slm::models::load_causal(&path, slm::models::ComputeDtype::F32).unwrap();
    let mut quant = slm::models::load_causal(&path, slm::models::ComputeDtype::Auto).unwrap();
    let mut best_quant = 0;
    for case in cases {
        let ids = common::ids(&case["input_ids"]);
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true).unwrap(), ids, "{prompt}");
        let greedy_want = common::ids(&case["greedy"]);
        // The pieces Gemma adds on top of its vocabulary keep their ids both ways.
        assert_eq!(
            tok.decode(&greedy_want, true).unwrap(),
            case["text"].as_str().unwrap()
        );
        assert_eq!(greedy(&mut f32, &ids, 16), greedy_want, "f32: {prompt}");
        let q = greedy(&mut quant, &ids, 16);
        let same = q
            .iter()
            .zip(&greedy_want)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("quantized: {same} of 16 tokens as transformers after {prompt:?}");
        best_quant = best_quant.max(same);
    }
    assert!(
        best_quant >= 8,
        "quantized: at most {best_quant} first tokens agree"
    );
}

/// A GGUF without a template gets Gemma's turns (Google's documented prompt format, which the
/// -it models' template renders): the system message opens the first user turn, the assistant
/// speaks as `model`, and <end_of_turn> ends generation.
#[test]
fn gemma_chat_uses_start_of_turn_and_stops_at_end_of_turn() {
    let files = slm::io::ModelFiles::locate(&gemma_270m()).unwrap();
    let tok = slm::tokenize::Tokenizer::load(&files).unwrap();
    let m = |r: &str, c: &str| slm::tokenize::chat::Message::new(r, c);
    let text = tok
        .chat()
        .unwrap()
        .render(
            &[
                m("system", "You are terse."),
                m("user", "Hi"),
                m("assistant", "Hello!"),
                m("user", "Name a color."),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n"
    );
    let eot = tok.token_to_id("<end_of_turn>").unwrap();
    assert_eq!(eot, 106);
    assert!(tok.is_eos(eot) && tok.is_eos(1));
    let err = tok
        .chat()
        .unwrap()
        .render(&[m("user", "a"), m("user", "b")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("alternate"), "{err}");
}

/// Gemma's decoded tokens (k-quant products, head norms, the embedding's scale) run on the
/// decode executor: the logits the batched path gives, bit for bit, and no allocation but the
/// logits handed back.
#[test]
fn gemma3_270m_decodes_as_batched_bit_for_bit_allocating_only_its_logits() {
    let path = gemma_270m();
    let prompts = vec![
        vec![2, 818, 5279, 529],
        vec![2, 4521],
        vec![2, 105, 2364, 107, 9259],
    ];
    crate::batch_decode::check(&path, &prompts, 0.0);
    let mut m = slm::models::load_causal(&path, slm::models::ComputeDtype::Auto).unwrap();
    let made = crate::batch_decode::decode_allocations(m.model.as_mut(), &prompts[2], 4);
    assert!(
        made.iter().all(|&n| n <= 8),
        "allocations per decoded token {made:?}"
    );
}
