//! Seeded mutation fuzzing of every reader of untrusted files: GGUF, safetensors, PyTorch
//! zip-pickle, config.json, tokenizer.json and datasets. Each case mutates a real seed file
//! (bit flips, interesting integers over length and size fields, cuts, inserts; JSON values
//! replaced by zeros, negatives, huge numbers, wrong types), then loads it the way the binary
//! does, as far as it gets (weights read, a forward pass run). An error is the expected outcome;
//! a panic fails the test, with the seed, case and input saved under `target/fuzz-failures/`.
//!
//! `SLM_FUZZ_CASES` sets the cases per target (default 250, about 20 s in all on two
//! cores), `SLM_FUZZ_SEED` the first seed. A longer run: `SLM_FUZZ_CASES=3000 cargo test
//! --release -p slm --test fuzz -- --nocapture` (see README).

use crate::common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use slm::models::ComputeDtype;

fn cases() -> u64 {
    std::env::var("SLM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250)
}

fn first_seed() -> u64 {
    std::env::var("SLM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const U32S: [u32; 10] = [0, 1, 2, 3, 7, 255, 256, 0x7fff_ffff, 0x8000_0000, u32::MAX];
const U64S: [u64; 8] = [0, 1, 2, 1 << 32, 1 << 40, 1 << 62, u64::MAX / 2, u64::MAX];

/// A few byte-level mutations, most of them inside `hot` (the header, where sizes live).
fn mutate_bytes(rng: &mut StdRng, data: &mut Vec<u8>, hot: usize) {
    for _ in 0..rng.random_range(1..=4) {
        if data.is_empty() {
            return;
        }
        let span = if rng.random_bool(0.85) {
            hot.clamp(1, data.len())
        } else {
            data.len()
        };
        let at = rng.random_range(0..span);
        match rng.random_range(0..8) {
            0 => data[at] ^= 1 << rng.random_range(0..8),
            1 => data[at] = [0u8, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
            2 => {
                let v = U32S[rng.random_range(0..U32S.len())].to_le_bytes();
                let n = v.len().min(data.len() - at);
                data[at..at + n].copy_from_slice(&v[..n]);
            }
            3 => {
                // 8-aligned: GGUF lengths, counts, dims and offsets are u64s.
                let at = at & !7;
                let v = U64S[rng.random_range(0..U64S.len())].to_le_bytes();
                let n = v.len().min(data.len() - at);
                data[at..at + n].copy_from_slice(&v[..n]);
            }
            4 => data.truncate(at),
            5 => {
                let n = rng.random_range(1..64).min(data.len() - at);
                data.drain(at..at + n);
            }
            6 => {
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                data.splice(at..at, extra);
            }
            _ => {
                // Copy a chunk over another: repeated structures, shifted lengths.
                let n = rng.random_range(1..32).min(data.len() - at);
                let from = rng.random_range(0..data.len() - n + 1);
                let chunk = data[from..from + n].to_vec();
                data[at..at + n].copy_from_slice(&chunk);
            }
        }
    }
}

/// A mutated copy of `seed`, its mutations mostly before byte `hot`.
fn mutated(rng: &mut StdRng, seed: &[u8], hot: usize) -> Vec<u8> {
    let mut d = seed.to_vec();
    mutate_bytes(rng, &mut d, hot);
    d
}

/// A mutated copy of `seed`, mutations anywhere.
fn anywhere(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    mutated(rng, seed, seed.len())
}

fn interesting_json(rng: &mut StdRng) -> Value {
    let choices = [
        Value::from(0),
        Value::from(-1),
        Value::from(1),
        Value::from(3),
        Value::from(1u64 << 40),
        Value::from(u64::MAX),
        Value::from(-1e308),
        Value::from(1e308),
        Value::from(0.5),
        Value::from(""),
        Value::from("x"),
        Value::Null,
        Value::Bool(true),
        Value::Array(vec![]),
        serde_json::json!({}),
        serde_json::json!([1, "a", null]),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// Replaces, removes or duplicates a random value up to `depth` levels into `v`.
fn mutate_at(rng: &mut StdRng, v: &mut Value, depth: usize) {
    if depth > 0 {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.random_range(0..m.len())).cloned().unwrap();
                if rng.random_bool(0.15) {
                    m.remove(&k);
                    return;
                }
                return mutate_at(rng, m.get_mut(&k).unwrap(), depth - 1);
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                if rng.random_bool(0.1) {
                    let dup = a[i].clone();
                    a.push(dup);
                    return;
                }
                return mutate_at(rng, &mut a[i], depth - 1);
            }
            _ => {}
        }
    }
    *v = interesting_json(rng);
}

fn mutate_json(rng: &mut StdRng, doc: &mut Value) {
    for _ in 0..rng.random_range(1..=3) {
        let depth = rng.random_range(1..6);
        mutate_at(rng, doc, depth);
    }
}

/// A JSON file mutated structurally (mostly) or as text.
fn mutate_json_text(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut doc: Value = serde_json::from_slice(seed).unwrap();
    mutate_json(rng, &mut doc);
    let text = doc.to_string().into_bytes();
    if rng.random_bool(0.2) {
        return anywhere(rng, &text);
    }
    text
}

struct Target<'a> {
    name: &'a str,
    /// Files copied into every case's folder as they are.
    fixed: Vec<(String, Vec<u8>)>,
    /// The file to damage: its name in the folder and its seed bytes.
    victim: String,
    seed: Vec<u8>,
    mutate: &'a dyn Fn(&mut StdRng, &[u8]) -> Vec<u8>,
    /// Loads the case's folder as the binary would; errors are fine, panics are not.
    run: &'a dyn Fn(&Path),
}

fn fuzz(t: Target) {
    let dir = common::tempdir(&format!("fuzz-{}", t.name));
    for (name, bytes) in &t.fixed {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let victim = dir.join(&t.victim);
    let mut failures = Vec::new();
    let n = cases();
    for case in first_seed()..first_seed() + n {
        let mut rng = StdRng::seed_from_u64(case);
        let data = (t.mutate)(&mut rng, &t.seed);
        std::fs::write(&victim, &data).unwrap();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&dir)));
        if let Err(p) = outcome {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("../fuzz-failures")
                .join(format!("{}-{case}-{}", t.name, t.victim));
            let _ = std::fs::create_dir_all(keep.parent().unwrap());
            let _ = std::fs::write(&keep, &data);
            failures.push(format!("case {case}: {msg} (input: {})", keep.display()));
        }
    }
    eprintln!("fuzz {}: {n} cases, {} panics", t.name, failures.len());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}:\n{}", t.name, failures.join("\n"));
}

/// Loads a causal model from `path` and runs a short forward pass.
fn run_causal(path: &Path) {
    for dtype in [ComputeDtype::Auto, ComputeDtype::F32] {
        let Ok(mut m) = slm::models::load_causal(path, dtype) else {
            return;
        };
        let _ = m.model.forward(&[1, 2, 3], 0, true);
        let _ = m.model.forward(&[4], 3, false);
    }
}

/// A one-layer Llama GGUF with llama.cpp's real SentencePiece vocabulary and Q8_0 and F32
/// tensors, small enough to rewrite for every case.
fn tiny_llama_gguf() -> Vec<u8> {
    let spm = common::assets().join("tokenizers/vectors/ggml-vocab-llama-spm.gguf");
    let g = slm::io::gguf::GgufFile::open(&spm).unwrap();
    let mut meta = g.content.metadata.clone();
    for (k, v) in [
        ("block_count", 1u32),
        ("context_length", 64),
        ("embedding_length", 32),
        ("feed_forward_length", 64),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
        ("rope.dimension_count", 16),
    ] {
        meta.insert(format!("llama.{k}"), gguf_file::Value::U32(v));
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut tensor = |rows: usize, cols: usize, dtype: GgmlDType| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        let shape: Vec<usize> = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let (h, f, kv) = (32, 64, 16);
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            tensor(32000, h, GgmlDType::Q8_0),
        ),
        (
            "output_norm.weight".to_string(),
            tensor(1, h, GgmlDType::F32),
        ),
    ];
    for (name, rows, cols, dtype) in [
        ("attn_norm", 1, h, GgmlDType::F32),
        ("ffn_norm", 1, h, GgmlDType::F32),
        ("attn_q", h, h, GgmlDType::Q8_0),
        ("attn_k", kv, h, GgmlDType::Q8_0),
        ("attn_v", kv, h, GgmlDType::F32),
        ("attn_output", h, h, GgmlDType::Q8_0),
        ("ffn_gate", f, h, GgmlDType::Q8_0),
        ("ffn_up", f, h, GgmlDType::Q8_0),
        ("ffn_down", h, f, GgmlDType::Q8_0),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), tensor(rows, cols, dtype)));
    }
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

#[test]
fn gguf() {
    let seed = tiny_llama_gguf();
    // The tiny model works before it is damaged.
    let dir = common::tempdir("fuzz-gguf-seed");
    std::fs::write(dir.join("model.gguf"), &seed).unwrap();
    let mut m = slm::models::load_causal(&dir.join("model.gguf"), ComputeDtype::Auto).unwrap();
    m.model.forward(&[1, 2, 3], 0, true).unwrap();
    let data_start = seed.len() - 32000 * 34 - 10_000;
    let mutate = move |rng: &mut StdRng, s: &[u8]| mutated(rng, s, data_start);
    fuzz(Target {
        name: "gguf",
        fixed: vec![],
        victim: "model.gguf".into(),
        seed,
        mutate: &mutate,
        run: &|dir| {
            let p = dir.join("model.gguf");
            if let Ok(g) = slm::io::gguf::GgufFile::open(&p) {
                let _ =
                    slm::tokenize::Tokenizer::from_gguf(&g).map(|t| t.encode("Hello world", true));
                let _ = slm::models::ModelConfig::from_gguf(&g);
            }
            run_causal(&p);
        },
    });
}

/// llama.cpp's vocab-only GGUF files: byte-level BPE (with merges) and WordPiece vocabularies
/// as GGUF metadata, read into tokenizers.
#[test]
fn gguf_vocabularies() {
    for name in ["ggml-vocab-gpt-2.gguf", "ggml-vocab-bert-bge.gguf"] {
        let seed = std::fs::read(common::assets().join("tokenizers/vectors").join(name)).unwrap();
        fuzz(Target {
            name: &format!("vocab-{name}"),
            fixed: vec![],
            victim: name.into(),
            seed,
            mutate: &anywhere,
            run: &|dir| {
                let Ok(g) = slm::io::gguf::GgufFile::open(&dir.join(name)) else {
                    return;
                };
                if let Ok(t) = slm::tokenize::Tokenizer::from_gguf(&g) {
                    for text in ["Hello world", " naïve 🦙 [CLS]", ""] {
                        if let Ok(ids) = t.encode(text, true) {
                            let _ = t.decode(&ids, false);
                        }
                    }
                }
            },
        });
    }
}

fn fixture_files(dir: &str) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(common::fixtures().join(dir))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Everything of a fixture folder but `victim`, and `victim`'s bytes.
fn split(dir: &str, victim: &str) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let (v, rest): (Vec<_>, Vec<_>) = fixture_files(dir)
        .into_iter()
        .partition(|(n, _)| n == victim);
    (rest, v.into_iter().next().unwrap().1)
}

#[test]
fn safetensors() {
    let (fixed, seed) = split("gpt2/safetensors", "model.safetensors");
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let mutate = move |rng: &mut StdRng, s: &[u8]| mutated(rng, s, header);
    fuzz(Target {
        name: "safetensors",
        fixed,
        victim: "model.safetensors".into(),
        seed,
        mutate: &mutate,
        run: &run_causal,
    });
}

/// The fixture's zip entries, mutated and zipped again with correct CRCs (so the damage reaches
/// the pickle reader), or the whole file damaged as bytes.
#[test]
fn pickle() {
    use std::io::{Read, Write};
    let (fixed, seed) = split("gpt2/bin", "pytorch_model.bin");
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(seed.clone())).unwrap();
    let entries: Vec<(String, Vec<u8>)> = (0..zin.len())
        .map(|i| {
            let mut e = zin.by_index(i).unwrap();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            (e.name().unwrap().to_string(), b)
        })
        .collect();
    let mutate = move |rng: &mut StdRng, s: &[u8]| {
        if rng.random_bool(0.2) {
            return anywhere(rng, s);
        }
        let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in &entries {
            let hit = if name.ends_with("data.pkl") {
                0.9
            } else {
                0.03
            };
            let b = if rng.random_bool(hit) {
                anywhere(rng, bytes)
            } else {
                bytes.clone()
            };
            out.start_file(name.as_str(), opts).unwrap();
            out.write_all(&b).unwrap();
        }
        out.finish().unwrap().into_inner()
    };
    fuzz(Target {
        name: "pickle",
        fixed,
        victim: "pytorch_model.bin".into(),
        seed,
        mutate: &mutate,
        run: &run_causal,
    });
}

#[test]
fn config_json() {
    for family in ["gpt2", "llama", "qwen2", "phi3"] {
        let (fixed, seed) = split(&format!("{family}/safetensors"), "config.json");
        fuzz(Target {
            name: &format!("config-{family}"),
            fixed,
            victim: "config.json".into(),
            seed,
            mutate: &mutate_json_text,
            run: &run_causal,
        });
    }
    // transformers 5.x's layout, RoPE inside rope_parameters.
    let (fixed, _) = split("llama/safetensors", "config.json");
    let seed = std::fs::read(common::fixtures().join("llama/config_v5.json")).unwrap();
    fuzz(Target {
        name: "config-llama-v5",
        fixed,
        victim: "config.json".into(),
        seed,
        mutate: &mutate_json_text,
        run: &run_causal,
    });
    let (fixed, seed) = split("encoders/bert_cls/safetensors", "config.json");
    fuzz(Target {
        name: "config-bert",
        fixed,
        victim: "config.json".into(),
        seed,
        mutate: &mutate_json_text,
        run: &|dir| {
            if let Ok(enc) = slm::encode::Encoder::load(dir) {
                let _ = enc.classify(
                    &[enc.tokenizer.encode_pair("a fine film", None, 16).unwrap()],
                    1,
                );
            }
        },
    });
}

#[test]
fn tokenizer_json() {
    let (fixed, seed) = split("encoders/bert_cls/safetensors", "tokenizer.json");
    fuzz(Target {
        name: "tokenizer-json",
        fixed,
        victim: "tokenizer.json".into(),
        seed,
        mutate: &mutate_json_text,
        run: &|dir| {
            let Ok(tok) = slm::tokenize::Tokenizer::from_hf_folder(dir) else {
                return;
            };
            for text in ["Hello world", "", "naïve [MASK] 🦙"] {
                if let Ok(ids) = tok.encode(text, true) {
                    let _ = tok.decode(&ids, false);
                }
                let _ = tok.encode_pair(text, Some("second"), 8);
            }
            if let Ok(enc) = slm::encode::Encoder::load(dir) {
                let _ = enc
                    .tokenizer
                    .encode_pair("a fine film", None, 16)
                    .map(|i| enc.classify(&[i], 1));
            }
        },
    });
}

#[test]
fn datasets() {
    let tsv = "sentence\tlabel\na fine film\t1\nnot good\t0\n\"quoted\ttab\"\t1\n";
    let jsonl = "{\"text\": \"a fine film\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": 0}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n";
    let tok = slm::tokenize::Tokenizer::from_hf_folder(
        &common::fixtures().join("encoders/bert_cls/safetensors"),
    )
    .unwrap();
    for (name, seed) in [
        ("data.tsv", tsv),
        ("data.csv", &tsv.replace('\t', ",")),
        ("data.jsonl", jsonl),
    ] {
        fuzz(Target {
            name: &format!("dataset-{name}"),
            fixed: vec![],
            victim: name.into(),
            seed: seed.as_bytes().to_vec(),
            mutate: &anywhere,
            run: &|dir| {
                let p = dir.join(name);
                let cols = slm::data::Columns::default();
                let _ = slm::data::read_records(&p, &cols, false);
                let _ = slm::data::read_records(&p, &cols, true);
                let _ = slm::train::classify::load_data(
                    &tok,
                    &slm::train::classify::DataOptions {
                        train: &p,
                        valid: None,
                        valid_split: 0.5,
                        seed: 1,
                        max_len: 16,
                        columns: cols.clone(),
                        skip_empty: false,
                    },
                );
                let _ = slm::train::causal::load_causal_data(
                    &tok,
                    &slm::train::causal::CausalDataOptions {
                        train: &p,
                        valid: None,
                        valid_split: 0.5,
                        seed: 1,
                        max_len: 16,
                    },
                );
            },
        });
    }
}
