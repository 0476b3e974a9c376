//! Every causal family against HF transformers on tiny random-init models of the real
//! architectures (tools/make_fixtures.py): logits within 1e-4 and identical greedy tokens, from
//! safetensors (llama: sharded) and from pytorch_model.bin.

use crate::common;

fn check(family: &str, format: &str) {
    common::check_causal(family, &common::fixtures().join(family).join(format));
}

#[test]
fn gpt2_safetensors() {
    check("gpt2", "safetensors");
}
#[test]
fn gpt2_bin() {
    check("gpt2", "bin");
}
#[test]
fn llama_sharded_safetensors() {
    check("llama", "safetensors");
}
#[test]
fn llama_bin() {
    check("llama", "bin");
}
#[test]
fn qwen2_safetensors() {
    check("qwen2", "safetensors");
}
#[test]
fn qwen2_bin() {
    check("qwen2", "bin");
}
#[test]
fn phi3_safetensors() {
    check("phi3", "safetensors");
}
#[test]
fn phi3_bin() {
    check("phi3", "bin");
}

/// The same weights with the config.json transformers 5.x writes (tools/make_v5_configs.py):
/// RoPE's theta and scaling sit in `rope_parameters`, and must give the same logits.
fn check_v5(family: &str) {
    let src = common::fixtures().join(family).join("safetensors");
    let d = common::tempdir(&format!("v5-{family}"));
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    std::fs::copy(
        common::fixtures().join(family).join("config_v5.json"),
        d.join("config.json"),
    )
    .unwrap();
    common::check_causal(family, &d);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn transformers_5_configs() {
    for family in ["gpt2", "llama", "qwen2", "phi3"] {
        check_v5(family);
    }
}

#[test]
fn rope_parameters_that_slm_cannot_follow_are_errors() {
    let src = common::fixtures().join("llama/safetensors");
    let d = common::tempdir("v5-bad");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let v5: serde_json::Value = common::read_json(common::fixtures().join("llama/config_v5.json"));
    for (edit, want) in [
        (
            serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
            "rope_scaling type 'yarn' is not supported",
        ),
        (
            serde_json::json!({"rope_type": "default"}),
            "rope_parameters.rope_theta",
        ),
        (
            serde_json::json!({"rope_type": "default", "rope_theta": "big"}),
            "rope_parameters.rope_theta",
        ),
        (
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
        (serde_json::json!([1, 2]), "rope_parameters"),
    ] {
        let mut cfg = v5.clone();
        cfg["rope_parameters"] = edit;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let err = slm::models::load_causal(&d, slm::models::ComputeDtype::F32)
            .err()
            .expect("must be refused")
            .to_string();
        assert!(err.contains("config.json") && err.contains(want), "{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The tiny models as transformers 5.x saves them (config.json, safetensors; tools/make_fixtures.py
/// `v5`): transformers 5.x's logits and greedy ids.
#[test]
fn files_written_by_transformers_5() {
    for family in ["gpt2", "phi3", "llama", "qwen2"] {
        let v5 = format!("v5/{family}");
        check(&v5, "");
    }
}
