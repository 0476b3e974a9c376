//! `slm quantize` on the real SmolLM2 GGUF: the file re-reads bit-exactly, keeps the metadata,
//! follows llama.cpp's per-tensor type rules and still generates; bad requests fail cleanly and
//! leave no file behind. (That llama.cpp reads these files and decodes the same tokens is checked
//! by tools/check_quantized.py, recorded in BENCHMARKS.md.)

use crate::common;

use std::path::PathBuf;

use common::{smollm2, tempdir};

fn slm(args: &[&str]) -> (i32, String, String) {
    common::run(args, None)
}

use candle_core::quantized::GgmlDType;
use slm::io::gguf::GgufFile;
use slm::io::QuantWeight;

#[test]
fn q8_0_rereads_bit_exactly_and_generates() {
    let src = smollm2();
    let d = tempdir("q8");
    let out = d.join("q8.gguf");
    let (code, stdout, err) = slm(&[
        "quantize",
        "-m",
        src.to_str().unwrap(),
        "-t",
        "q8_0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("61 F32, 211 Q8_0"), "{stdout}");
    let (a, b) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
    // Metadata: everything copied, the file type updated (7 = llama.cpp's MOSTLY_Q8_0).
    for (k, v) in &a.content.metadata {
        if k != "general.file_type" {
            assert_eq!(
                format!("{:?}", b.content.metadata[k]),
                format!("{v:?}"),
                "{k}"
            );
        }
    }
    assert_eq!(b.meta_u64("general.file_type"), Some(7));
    assert_eq!(a.content.tensor_infos.len(), b.content.tensor_infos.len());
    for name in a.content.tensor_infos.keys() {
        let (ta, dims_a, bytes_a) = a.raw(name).unwrap();
        let (tb, dims_b, bytes_b) = b.raw(name).unwrap();
        assert_eq!(dims_a, dims_b, "{name}");
        let want_type = if dims_a.len() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        };
        assert_eq!(tb, want_type, "{name}");
        // What slm wrote is what quantizing the dequantized source gives, byte for byte.
        let cols = *dims_a.last().unwrap();
        let rows = dims_a.iter().product::<usize>() / cols;
        let f = QuantWeight {
            dtype: ta,
            rows,
            cols,
            data: bytes_a.to_vec().into(),
            origin: None,
        }
        .dequantize()
        .unwrap()
        .reshape(dims_a.clone())
        .unwrap();
        let q = slm::quantize::quantize_tensor(&f, tb).unwrap();
        assert_eq!(q.data().unwrap().as_ref(), bytes_b, "{name}");
    }
    let (code, text, err) = slm(&[
        "generate",
        "-m",
        out.to_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "6",
        "Once upon a time, there was a little",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text.starts_with(" girl named Emma"), "{text}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn k_quants_fall_back_on_rows_that_are_not_multiples_of_256() {
    let d = tempdir("q4k");
    let out = d.join("q4k.gguf");
    let (code, stdout, err) = slm(&[
        "quantize",
        "-m",
        smollm2().to_str().unwrap(),
        "-t",
        "q4_k",
        "-o",
        out.to_str().unwrap(),
        "-v",
    ]);
    assert_eq!(code, 0, "{err}");
    // SmolLM2 is 576 wide: only ffn_down (1536 = 6 x 256 per row) can be Q4_K; the rest falls
    // back to Q5_0 and the tied embedding/output to Q8_0, as llama-quantize does.
    assert!(
        stdout.contains("blk.0.ffn_down.weight") && stdout.contains("-> Q4K"),
        "{stdout}"
    );
    assert!(stdout.contains("30 Q4K, 180 Q5_0, 1 Q8_0"), "{stdout}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_requests_fail_cleanly_and_leave_nothing() {
    let src = smollm2();
    let src = src.to_str().unwrap();
    let d = tempdir("bad");
    let out = d.join("out.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        src,
        "-t",
        "q8_0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("out.gguf: already exists (pass --force to overwrite)"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        src,
        "-t",
        "q3_x",
        "-o",
        out.to_str().unwrap(),
    ]);
    // A usage error, as for any flag clap checks.
    assert_eq!(code, 2);
    assert!(err.contains("unknown type 'q3_x'"), "{err}");
    let missing = d.join("no/such/dir/out.gguf");
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        src,
        "-t",
        "q4_0",
        "-o",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no/such/dir/out.gguf"), "{err}");
    // A source that is not a GGUF file. (A full disk on the output side is simulated in
    // io/write.rs's unit test: write_atomic removes its temporary file on any write error.)
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        "/dev/full",
        "-t",
        "q4_0",
        "-o",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/dev/full: not a valid GGUF file"), "{err}");
    // Only the file that was there before.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["out.gguf"]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Each type's bytes for the same f32 rows (Gaussian values, so every rounding and scale
/// search is exercised) equal llama.cpp's own quantization of them (llama_model_quantize,
/// recorded by tools/make_fixtures.py `quant`). The k-quants go through slm's own quantizers
/// (`quantize/q45k.rs`, `quantize/q6k.rs`): candle's follow ggml's older scale fitting.
#[test]
fn blocks_match_llama_cpp_reference_quantization() {
    const EXACT: [&str; 8] = [
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
    ];
    let mut checked = Vec::new();
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant_vectors.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let mut mismatched = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let kind = case["type"].as_str().unwrap();
        if !EXACT.contains(&kind) {
            continue;
        }
        checked.push(kind);
        let t = slm::quantize::parse_type(kind).unwrap();
        let (rows, cols) = (
            case["rows"].as_u64().unwrap() as usize,
            case["cols"].as_u64().unwrap() as usize,
        );
        let input: Vec<f32> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let want: Vec<u8> = case["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect();
        let x =
            candle_core::Tensor::from_vec(input, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let got = slm::quantize::quantize_tensor(&x, t)
            .unwrap()
            .data()
            .unwrap()
            .to_vec();
        assert_eq!(got.len(), want.len(), "{kind}");
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        if differing > 0 {
            mismatched.push(format!("{kind}: {differing}/{} bytes differ", want.len()));
        }
    }
    assert!(mismatched.is_empty(), "{}", mismatched.join("; "));
    assert_eq!(checked, EXACT);
}

/// GGUF to a Hugging Face folder: slm loads the folder and decodes exactly what transformers
/// decodes on the dequantized GGUF (tests/fixtures/smollm2.json). (transformers loading the same
/// folder and matching the fixture's logits is a documented check in README.md.)
#[test]
fn convert_to_hf_folder_decodes_like_the_gguf() {
    let d = tempdir("convert");
    let out = d.join("hf");
    let (code, stdout, err) = slm(&[
        "convert",
        "-m",
        smollm2().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("272 tensors"), "{stdout}");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (code, text, err) = slm(&[
        "generate",
        "-m",
        out.to_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "12",
        fx["prompt"].as_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text.trim_end_matches('\n'),
        fx["greedy_text"].as_str().unwrap()
    );
    let (code, _, err) = slm(&[
        "convert",
        "-m",
        smollm2().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("already holds a model.safetensors (pass --force to overwrite)"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// Tensors and tokenizer of two GGUF files are the same bytes.
fn assert_same_gguf(a: &std::path::Path, b: &std::path::Path) {
    let (a, b) = (GgufFile::open(a).unwrap(), GgufFile::open(b).unwrap());
    assert_eq!(a.content.tensor_infos.len(), b.content.tensor_infos.len());
    for name in b.content.tensor_infos.keys() {
        let (ta, da, ba) = a.raw(name).unwrap_or_else(|| panic!("{name} missing"));
        let (tb, db, bb) = b.raw(name).unwrap();
        assert_eq!((ta, &da), (tb, &db), "{name}");
        assert!(ba == bb, "{name}: different bytes");
    }
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
    ] {
        assert_eq!(
            format!("{:?}", a.meta(k)),
            format!("{:?}", b.meta(k)),
            "{k}"
        );
    }
}

#[test]
fn a_hugging_face_folder_quantizes_to_the_same_gguf_as_the_original() {
    // GGUF → f32 HF folder (slm convert) → q8_0 GGUF must equal the GGUF → q8_0 GGUF: every
    // tensor (names, Q/K row order, types, bytes) and the tokenizer in the metadata.
    let d = tempdir("q-hf");
    let src = smollm2();
    let hf = d.join("hf");
    let (code, _, err) = slm(&[
        "convert",
        "-m",
        src.to_str().unwrap(),
        "-o",
        hf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (from_hf, from_gguf) = (d.join("from_hf.gguf"), d.join("from_gguf.gguf"));
    for (m, out) in [(&hf, &from_hf), (&src, &from_gguf)] {
        let (code, _, err) = slm(&[
            "quantize",
            "-m",
            m.to_str().unwrap(),
            "-t",
            "q8_0",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    assert_same_gguf(&from_hf, &from_gguf);

    // With an adapter: quantizing base + adapter equals quantizing the merged folder.
    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let a: Vec<f32> = (0..2 * 576)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let b: Vec<f32> = (0..576 * 2)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
        .collect();
    slm::io::write::write_safetensors(
        &adapter.join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![2, 576],
                &a,
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                vec![576, 2],
                &b,
            ),
        ],
        None,
    )
    .unwrap();
    let merged = d.join("merged");
    let (code, _, err) = slm(&[
        "merge",
        "-m",
        hf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (with_adapter, from_merged) = (d.join("with_adapter.gguf"), d.join("from_merged.gguf"));
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        hf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-t",
        "q8_0",
        "-o",
        with_adapter.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        merged.to_str().unwrap(),
        "-t",
        "q8_0",
        "-o",
        from_merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_same_gguf(&with_adapter, &from_merged);
    let q = GgufFile::open(&with_adapter).unwrap();
    let p = GgufFile::open(&from_gguf).unwrap();
    assert!(
        q.raw("blk.0.attn_q.weight").unwrap().2 != p.raw("blk.0.attn_q.weight").unwrap().2,
        "the adapter changed layer 0's q_proj"
    );
    assert!(q.raw("blk.1.attn_q.weight").unwrap().2 == p.raw("blk.1.attn_q.weight").unwrap().2);
    let (code, _, err) = slm(&[
        "quantize",
        "-m",
        src.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-t",
        "q8_0",
        "-o",
        d.join("x.gguf").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("slm convert"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
