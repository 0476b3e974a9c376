//! The damaged inputs that fuzzing the binary found, each built here from a real file: every one
//! must end with exit status 1 and a one-line error naming the file and the problem; never a
//! panic, an abort or an attempt to allocate what the file cannot hold.

use crate::common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::{fixtures, smollm2, tempdir};

/// Runs slm, asserts exit 1 with one `error:` line that mentions `file`, returns the line.
fn fails_naming(args: &[&str], file: &str) -> String {
    let (code, _, err) = common::run(args, None);
    assert!(!err.contains("panicked"), "{args:?}: panic: {err}");
    assert_eq!(code, 1, "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(file), "{err}");
    err
}

// ---- GGUF: metadata and tensor infos patched in place in a copy of the SmolLM2 file ----

fn find(data: &[u8], needle: &[u8]) -> usize {
    data.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the file", String::from_utf8_lossy(needle)))
}

/// Where a GGUF string (u64 length + bytes) ends.
fn after_string(data: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    find(data, &needle) + needle.len()
}

/// Sets a u32 metadata value.
fn set_u32(data: &mut [u8], key: &str, v: u32) {
    let at = after_string(data, key);
    assert_eq!(data[at..at + 4], 4u32.to_le_bytes(), "{key} is not a u32");
    data[at + 4..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A tensor info: the position of its first dimension, and where its offset is stored.
fn tensor_info(data: &[u8], name: &str) -> (usize, usize) {
    let at = after_string(data, name);
    let n_dims = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    (at + 4, at + 4 + 8 * n_dims + 4)
}

/// A folder holding the edited copy as `model.gguf`.
fn gguf_with(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> crate::scratch::Scratch {
    let mut data = std::fs::read(smollm2()).unwrap();
    edit(&mut data);
    let d = tempdir(name);
    std::fs::write(d.join("model.gguf"), data).unwrap();
    d
}

fn gguf_fails(name: &str, edit: impl FnOnce(&mut Vec<u8>), want: &str) {
    let d = gguf_with(name, edit);
    let p = d.join("model.gguf");
    for cmd in ["info", "generate"] {
        let mut args = vec![cmd, "-m", p.to_str().unwrap()];
        if cmd == "generate" {
            args.extend(["-n", "1", "hi"]);
        }
        let err = fails_naming(&args, "model.gguf");
        assert!(err.contains(want), "{name} ({cmd}): {err}");
    }
}

#[test]
fn gguf_head_counts_of_zero() {
    gguf_fails(
        "heads0",
        |d| set_u32(d, "llama.attention.head_count", 0),
        "llama.attention.head_count' is 0",
    );
    gguf_fails(
        "kv0",
        |d| set_u32(d, "llama.attention.head_count_kv", 0),
        "num_key_value_heads is 0",
    );
    gguf_fails(
        "kv4",
        |d| set_u32(d, "llama.attention.head_count_kv", 4),
        "not a multiple of num_key_value_heads (4)",
    );
}

#[test]
fn gguf_absurd_sizes() {
    for key in ["llama.context_length", "llama.embedding_length"] {
        gguf_fails(
            key,
            |d| set_u32(d, key, u32::MAX),
            &format!("'{key}' is {}", u32::MAX),
        );
    }
    gguf_fails(
        "ctx-2^30",
        |d| set_u32(d, "llama.context_length", 1 << 30),
        "max_position_embeddings is 1073741824",
    );
    gguf_fails(
        "layers0",
        |d| set_u32(d, "llama.block_count", 0),
        "llama.block_count' is 0",
    );
    // No vocabulary array: the size comes from llama.vocab_size.
    gguf_fails(
        "vocab0",
        |d| {
            let at = after_string(d, "tokenizer.ggml.tokens");
            d[at - 1] = b'X';
            set_u32(d, "llama.vocab_size", 0);
        },
        "llama.vocab_size' is 0",
    );
}

#[test]
fn gguf_tensor_sizes_that_wrap() {
    // [2^62, 4] elements: the product is 2^64, which wraps to 0 in unchecked arithmetic.
    let edit = |d: &mut Vec<u8>| {
        let (dims, _) = tensor_info(d, "token_embd.weight");
        d[dims..dims + 8].copy_from_slice(&4u64.to_le_bytes());
        d[dims + 8..dims + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    };
    gguf_fails("dim2^62", edit, "'token_embd.weight' has a malformed size");
    // quantize must not write it into a new file either.
    let d = gguf_with("dim2^62-q", edit);
    let p = d.join("model.gguf");
    let out = p.with_file_name("out.gguf");
    fails_naming(
        &[
            "quantize",
            "-m",
            p.to_str().unwrap(),
            "-t",
            "q8_0",
            "-o",
            out.to_str().unwrap(),
        ],
        "model.gguf",
    );
    assert!(!out.exists());
}

#[test]
fn gguf_tensor_offsets_out_of_the_file_or_overlapping() {
    gguf_fails(
        "offset-out",
        |d| {
            let (_, off) = tensor_info(d, "blk.0.ffn_down.weight");
            d[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        },
        "truncated: tensor 'blk.0.ffn_down.weight'",
    );
    gguf_fails(
        "overlap",
        |d| {
            let (_, off) = tensor_info(d, "blk.0.ffn_down.weight");
            d[off..off + 8].copy_from_slice(&64u64.to_le_bytes());
        },
        "overlap",
    );
}

#[test]
fn gguf_alignment_of_zero() {
    // candle divides by general.alignment unchecked; the key is added by renaming another
    // u32 key of the same length ("general.file_type" -> "general.alignment" is 17 bytes each).
    gguf_fails(
        "align0",
        |d| {
            let at = after_string(d, "general.file_type");
            d[at - 17..at].copy_from_slice(b"general.alignment");
            set_u32(d, "general.alignment", 0);
        },
        "not a valid GGUF file",
    );
}

// ---- config.json ----

fn llama_with(name: &str, edit: Edit) -> crate::scratch::Scratch {
    let d = tempdir(name);
    for e in std::fs::read_dir(fixtures().join("llama/safetensors")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let cfg = d.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&cfg, json.to_string()).unwrap();
    d
}

type Edit = Box<dyn Fn(&mut serde_json::Value)>;

fn set(key: &'static str, v: impl Into<serde_json::Value>) -> Edit {
    let v = v.into();
    Box::new(move |j| j[key] = v.clone())
}

#[test]
fn config_values_no_model_has() {
    let cases: Vec<(Edit, &str)> = vec![
        (set("num_attention_heads", 0), "num_attention_heads is 0"),
        (set("num_key_value_heads", 0), "num_key_value_heads is 0"),
        (
            Box::new(|j| {
                j.as_object_mut().unwrap().remove("head_dim");
                j["num_attention_heads"] = 6.into();
            }),
            "hidden_size (64) is not a multiple of num_attention_heads (6)",
        ),
        (
            set("num_attention_heads", 3),
            "num_attention_heads (3) is not a multiple of num_key_value_heads (2)",
        ),
        (
            set("max_position_embeddings", 1u64 << 40),
            "max_position_embeddings is 1099511627776",
        ),
        (set("head_dim", 1u64 << 40), "head_dim is 1099511627776"),
        (set("rope_theta", 0), "rope_theta is 0"),
        (set("rope_theta", -10000.0), "rope_theta is -10000"),
        (set("rms_norm_eps", -1e-6), "rms_norm_eps is -0.000001"),
        (set("vocab_size", 0), "vocab_size is 0"),
        (set("num_hidden_layers", 0), "num_hidden_layers is 0"),
    ];
    for (i, (edit, want)) in cases.into_iter().enumerate() {
        let d = llama_with(&format!("cfg{i}"), edit);
        let d = d.to_str().unwrap();
        for args in [vec!["info", "-m", d], vec!["generate", "-m", d, "hi"]] {
            let err = fails_naming(&args, "config.json");
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}

// ---- tokenizer.json ----

#[test]
fn tokenizer_template_with_an_unknown_special_token() {
    let d = tempdir("tok-template");
    let src = fixtures().join("encoders/bert_cls/safetensors");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let tj = d.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    let single = json["post_processor"]["single"].as_array_mut().unwrap();
    single.push(serde_json::json!({"SpecialToken": {"id": "[NOPE]", "type_id": 0}}));
    std::fs::write(&tj, json.to_string()).unwrap();
    for args in [
        vec!["tokenize", "-m", d.to_str().unwrap(), "--special", "hello"],
        vec!["classify", "-m", d.to_str().unwrap(), "hello"],
    ] {
        let err = fails_naming(&args, "tokenizer.json");
        assert!(err.contains("'[NOPE]'"), "{err}");
    }
}

// ---- PyTorch .bin ----

/// The GPT-2 fixture's pytorch_model.bin rewritten with `edit` applied to each entry's bytes.
fn bin_with(name: &str, edit: impl Fn(&str, &mut Vec<u8>)) -> crate::scratch::Scratch {
    let d = tempdir(name);
    let src = fixtures().join("gpt2/bin");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let mut zin =
        zip::ZipArchive::new(std::fs::File::open(src.join("pytorch_model.bin")).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(d.join("pytorch_model.bin")).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let entry = e.name().unwrap().to_string();
        let mut bytes = Vec::new();
        e.read_to_end(&mut bytes).unwrap();
        edit(&entry, &mut bytes);
        zout.start_file(entry, opts).unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
    d
}

#[test]
fn pickle_nesting_100000_lists() {
    let d = bin_with("pkl-deep", |name, bytes| {
        if name.ends_with("data.pkl") {
            let mut p = vec![0x80, 2];
            for _ in 0..100_000 {
                p.extend([b']', b'(']);
            }
            p.push(b']');
            p.extend(std::iter::repeat_n(b'e', 100_000));
            p.push(b'.');
            *bytes = p;
        }
    });
    let err = fails_naming(&["info", "-m", d.to_str().unwrap()], "pytorch_model.bin");
    assert!(err.contains("nest deeper than 100 levels"), "{err}");
}

#[test]
fn pickle_tensor_with_a_flipped_bit() {
    let d = bin_with("pkl-bitflip", |_, _| {});
    // Flip one bit inside the first tensor's bytes, after the zip was written with its CRCs.
    let f = d.join("pytorch_model.bin");
    let mut data = std::fs::read(&f).unwrap();
    let at = find(&data, b"pytorch_model/data/0") + 200;
    data[at] ^= 0x10;
    std::fs::write(&f, data).unwrap();
    let err = fails_naming(&["info", "-m", d.to_str().unwrap()], "pytorch_model.bin");
    assert!(err.contains("data/0' is damaged"), "{err}");
}

#[test]
fn pickle_big_endian_storage() {
    let d = bin_with("pkl-big", |name, bytes| {
        if name.ends_with("byteorder") {
            *bytes = b"big".to_vec();
        }
    });
    let err = fails_naming(&["info", "-m", d.to_str().unwrap()], "pytorch_model.bin");
    assert!(err.contains("byte order 'big'"), "{err}");
}

// ---- standard output ----

fn slm() -> Command {
    common::command()
}

#[test]
fn full_standard_output_is_an_error_line() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let model = smollm2();
    let model = model.to_str().unwrap();
    for args in [
        vec!["info", "-m", model],
        vec!["tokenize", "-m", model, "--json", "hi"],
    ] {
        let out = slm()
            .args(&args)
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            "error: cannot write to standard output: No space left on device (os error 28)"
        );
    }
}

/// `slm … | head -1`: the reader goes away; slm stops quietly.
fn closed_pipe(args: &[&str], stdin: &str) {
    let mut child = slm()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
}

#[test]
fn closed_pipe_ends_quietly() {
    let cls = fixtures().join("encoders/bert_cls/safetensors");
    let lines = "a fine film\n".repeat(2000);
    closed_pipe(&["classify", "-m", cls.to_str().unwrap()], &lines);
    closed_pipe(&["embed", "-m", cls.to_str().unwrap()], &lines);
    let model = smollm2();
    closed_pipe(&["info", "-m", model.to_str().unwrap()], "");
}

#[test]
fn rust_backtrace_does_not_turn_errors_into_backtraces() {
    let out = slm()
        .env("RUST_BACKTRACE", "1")
        .args(["info", "-m", "/nonexistent/model"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // The full chain and backtrace are there when asked for.
    let out = slm()
        .env("RUST_LIB_BACKTRACE", "1")
        .args(["info", "-m", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).lines().count() > 1);
}

#[test]
fn generation_that_fills_the_context_says_so() {
    let d = gguf_with("ctx32", |d| set_u32(d, "llama.context_length", 32));
    let p = d.join("model.gguf");
    let (code, out, err) = common::run(
        &[
            "generate",
            "-m",
            p.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "100",
            "Once upon a time",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    assert!(
        err.contains("(stopped at the model's context length of 32 tokens)"),
        "{err}"
    );
}
