//! Both directions between Hugging Face folders and GGUF, for every causal family: the fixture
//! models (random-init, real architectures, tools/make_fixtures.py) exported to GGUF by
//! `quantize_hf` and converted back by `gguf_to_hf` must still give transformers' logits (1e-4)
//! and greedy tokens. That covers the tensor names, Llama's Q/K permutation, GPT-2's transposed
//! Conv1D weights, Phi-3's fused projections, Qwen2's biases and Llama 3's RoPE scaling written as
//! llama.cpp's `rope_freqs` and recovered as `rope_scaling`. A SentencePiece tokenizer
//! (llama2's tokenizer.model) goes through GGUF metadata and still passes llama.cpp's vectors.

use crate::common;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use slm::convert::{gguf_to_hf, Dtype};
use slm::io::gguf::GgufFile;
use slm::quantize::from_hf::quantize_hf;
use slm::tokenize::Tokenizer;

/// GPT-2's real byte-level BPE cut to the fixtures' 320 tokens: the 256 byte tokens and the
/// first 64 merges, which make ids 256..319.
fn write_bpe_320(dir: &Path) {
    let src = common::assets().join("tokenizers/gpt2");
    let enc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("encoder.json")).unwrap()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = enc
        .into_iter()
        .filter(|(_, id)| id.as_u64().unwrap() < 320)
        .collect();
    assert_eq!(vocab.len(), 320);
    let merges: Vec<String> = std::fs::read_to_string(src.join("vocab.bpe"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("#version"))
        .take(64)
        .map(String::from)
        .collect();
    for m in &merges {
        assert!(vocab.contains_key(&m.replace(' ', "")), "merge {m}");
    }
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(&vocab).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
}

/// A copy of the fixture's safetensors folder with a tokenizer beside it.
fn hf_folder(family: &str, tag: &str) -> crate::scratch::Scratch {
    let d = common::tempdir(&format!("export-{tag}"));
    let src = common::fixtures().join(family).join("safetensors");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    write_bpe_320(&d);
    d
}

/// Returns the folder holding `model.gguf` and the converted-back `back/`.
fn round_trip(family: &str) -> crate::scratch::Scratch {
    let hf = hf_folder(family, family);
    let gguf = hf.join("model.gguf");
    quantize_hf(&hf, None, GgmlDType::F32, &gguf, false, |_, _| {}).unwrap();
    common::check_causal(family, &gguf);

    let g = GgufFile::open(&gguf).unwrap();
    let from_gguf = Tokenizer::from_gguf(&g).unwrap();
    let from_hf = Tokenizer::from_hf_folder(&hf).unwrap();
    for text in ["Hello world, the tiny tokenizer", " and the  thing\n"] {
        assert_eq!(
            from_gguf.encode(text, false).unwrap(),
            from_hf.encode(text, false).unwrap()
        );
    }

    let back = hf.join("back");
    let names = gguf_to_hf(&gguf, &back, Dtype::F32, false).unwrap();
    assert!(!names.is_empty());
    common::check_causal(family, &back);
    hf
}

#[test]
fn gpt2_exports_and_converts_back() {
    round_trip("gpt2");
}

#[test]
fn llama_with_llama3_rope_scaling_exports_and_converts_back() {
    let hf = round_trip("llama");
    let g = GgufFile::open(&hf.join("model.gguf")).unwrap();
    assert!(g.raw("rope_freqs.weight").is_some());
    let cfg = common::read_json(hf.join("back/config.json"));
    assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(cfg["rope_scaling"]["factor"], 8.0);
}

#[test]
fn qwen2_exports_and_converts_back() {
    round_trip("qwen2");
}

#[test]
fn phi3_exports_and_converts_back() {
    round_trip("phi3");
}

/// Gemma 3 (q/k norms, layers [sliding, sliding, global], two RoPE bases, linear scaling on the
/// global layer): norms stored as llama.cpp's `1 + w`, the layer pattern as its bools, and back.
#[test]
fn gemma3_exports_and_converts_back() {
    let hf = round_trip("gemma3");
    let g = GgufFile::open(&hf.join("model.gguf")).unwrap();
    let (_, _, norm) = g.raw("blk.0.attn_q_norm.weight").unwrap();
    let stored = f32::from_le_bytes([norm[0], norm[1], norm[2], norm[3]]);
    let hf_w = slm::io::write::read_safetensors_f32(&hf.join("model.safetensors")).unwrap()
        ["model.layers.0.self_attn.q_norm.weight"]
        .1[0];
    assert_eq!(stored, hf_w + 1.0);
    assert_eq!(g.meta_f64("gemma3.rope.freq_base_swa"), Some(10000.0));
    let _ = std::fs::remove_dir_all(&hf);
}

/// llama.cpp scales Gemma's queries by the head size (by hidden/heads for the 27B models): a
/// query_pre_attn_scalar other than that is refused, nothing written.
#[test]
fn gemma_that_llama_cpp_would_compute_otherwise_is_refused() {
    let hf = hf_folder("gemma2", "gemma2-scalar");
    let out = hf.join("model.gguf");
    let err = quantize_hf(&hf, None, GgmlDType::F32, &out, false, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("query_pre_attn_scalar 20") && err.contains("(24)"),
        "{err}"
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&hf);
}

/// f16/bf16 folders hold the f32 values rounded once, and refuse to overwrite without force.
#[test]
fn half_precision_folders_round_each_value_once() {
    let hf = hf_folder("qwen2", "qwen2-half");
    let gguf = hf.join("model.gguf");
    quantize_hf(&hf, None, GgmlDType::F32, &gguf, false, |_, _| {}).unwrap();
    let f32_dir = hf.join("f32");
    gguf_to_hf(&gguf, &f32_dir, Dtype::F32, false).unwrap();
    let full = slm::io::write::read_safetensors_f32(&f32_dir.join("model.safetensors")).unwrap();
    for (dtype, round) in [
        (
            Dtype::BF16,
            (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        let dir = hf.join(format!("{dtype:?}"));
        gguf_to_hf(&gguf, &dir, dtype, false).unwrap();
        let err = gguf_to_hf(&gguf, &dir, dtype, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), full.len());
        for (name, (shape, values)) in &full {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.shape(), shape.as_slice());
            let got: Vec<f32> = t
                .data()
                .chunks_exact(2)
                .map(|c| match dtype {
                    Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    _ => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                })
                .collect();
            let want: Vec<f32> = values.iter().map(|&x| round(x)).collect();
            assert_eq!(got, want, "{name} as {dtype:?}");
        }
        let cfg = common::read_json(dir.join("config.json"));
        assert_eq!(cfg["model_type"], "qwen2");
        assert_eq!(
            cfg["torch_dtype"],
            if dtype == Dtype::F16 {
                "float16"
            } else {
                "bfloat16"
            }
        );
    }
}

/// A tiny Llama with the real 32,000-piece SentencePiece vocabulary of Llama 2: the GGUF's
/// `llama` tokenizer metadata tokenizes llama.cpp's test vectors exactly, and the model read from
/// the GGUF gives the logits of the folder it came from.
#[test]
fn sentencepiece_tokenizer_goes_into_gguf() {
    let d = common::tempdir("export-spm");
    let spm = common::assets().join("tokenizers/llama2-spm/tokenizer.model");
    std::fs::copy(&spm, d.join("tokenizer.model")).unwrap();
    let (vocab, h, inter, heads, kv) = (32000usize, 16usize, 32usize, 2usize, 1usize);
    let hd = h / heads;
    std::fs::write(
        d.join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": 1,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2
        })
        .to_string(),
    )
    .unwrap();
    // Deterministic weights; what matters is that both readers see the same model.
    let mut seed = 7u64;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    };
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![vocab, h]),
        ("lm_head.weight", vec![vocab, h]),
        ("model.norm.weight", vec![h]),
        ("model.layers.0.input_layernorm.weight", vec![h]),
        ("model.layers.0.post_attention_layernorm.weight", vec![h]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![heads * hd, h],
        ),
        ("model.layers.0.self_attn.k_proj.weight", vec![kv * hd, h]),
        ("model.layers.0.self_attn.v_proj.weight", vec![kv * hd, h]),
        (
            "model.layers.0.self_attn.o_proj.weight",
            vec![h, heads * hd],
        ),
        ("model.layers.0.mlp.gate_proj.weight", vec![inter, h]),
        ("model.layers.0.mlp.up_proj.weight", vec![inter, h]),
        ("model.layers.0.mlp.down_proj.weight", vec![h, inter]),
    ];
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| values(s.iter().product()))
        .collect();
    let tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
        .iter()
        .zip(&data)
        .map(|((n, s), v)| (n.to_string(), s.clone(), v.as_slice()))
        .collect();
    slm::io::write::write_safetensors(&d.join("model.safetensors"), &tensors, None).unwrap();

    let gguf = d.join("spm.gguf");
    quantize_hf(&d, None, GgmlDType::F32, &gguf, false, |_, _| {}).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    assert_eq!(g.meta_str("tokenizer.ggml.model"), Some("llama"));
    assert_eq!(g.meta_bool("tokenizer.ggml.add_bos_token"), Some(true));
    assert_eq!(g.meta_u64("tokenizer.ggml.bos_token_id"), Some(1));
    let tok = Tokenizer::from_gguf(&g).unwrap();
    common::check_vectors("ggml-vocab-llama-spm.gguf", &tok);
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);

    let logits = |p: &Path| {
        let mut m =
            slm::models::load_causal(p, slm::models::ComputeDtype::F32).expect("model loads");
        m.model
            .forward(&[1, 15043, 3186, 29892, 920], 0, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(&d), logits(&gguf));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "GGUF vs folder: {diff}");

    // The same vocabulary on a model with 320 embedding rows cannot be written.
    let small = hf_folder("llama", "spm-small");
    std::fs::copy(&spm, small.join("tokenizer.model")).unwrap();
    let err = quantize_hf(
        &small,
        None,
        GgmlDType::F32,
        &small.join("x.gguf"),
        false,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("32000 tokens") && err.contains("vocab_size 320"),
        "{err}"
    );
    assert!(!small.join("x.gguf").exists());
}

/// What GGUF cannot hold is refused before anything is written.
#[test]
fn unsupported_models_are_clear_errors() {
    let minilm = common::assets().join("models/all-MiniLM-L6-v2");
    let d = common::tempdir("export-refused");
    let out = d.join("x.gguf");
    let err = quantize_hf(&minilm, None, GgmlDType::Q8_0, &out, false, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GGUF export covers") && err.contains("'bert'"),
        "{err}"
    );

    let phi3 = hf_folder("phi3", "export-longrope");
    let cfg_path = phi3.join("config.json");
    let mut cfg = common::read_json(cfg_path.clone());
    cfg["rope_scaling"] = serde_json::json!({"type": "longrope", "long_factor": vec![1.0; 8], "short_factor": vec![1.0; 8]});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = quantize_hf(&phi3, None, GgmlDType::Q8_0, &out, false, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("longrope"), "{err}");
    assert!(!out.exists());
}
