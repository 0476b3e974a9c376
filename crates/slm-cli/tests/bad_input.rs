//! Bad input through the real binary: each case must exit with status 1 (2 for usage errors) and a
//! single-line message naming the file and the problem, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn slm() -> Command {
    crate::common::command()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn assets() -> PathBuf {
    let dir = slm::assets_dir();
    assert!(
        dir.join("MANIFEST.md").exists(),
        "assets not found at {} (set SLM_ASSETS)",
        dir.display()
    );
    dir
}

fn tempdir(name: &str) -> crate::scratch::Scratch {
    crate::scratch::Scratch::new(&format!("bad-input-{name}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A tiny GPT-2 fixture folder with the real GPT-2 tokenizer files, so the CLI can run it.
fn gpt2_model(name: &str, format: &str) -> crate::scratch::Scratch {
    let d = tempdir(name);
    copy_dir(&fixtures().join("gpt2").join(format), &d);
    d
}

/// Runs slm and returns stderr, asserting the exit code and the shape of the message.
fn fails(args: &[&str], stdin: Option<&str>, code: i32) -> String {
    let mut cmd = slm();
    cmd.args(args);
    let out = if let Some(input) = stdin {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    } else {
        cmd.output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "args {args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    if code == 1 {
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    err
}

fn truncate(path: &Path, keep: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(keep).unwrap();
}

fn scribble(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn truncated_safetensors() {
    let d = gpt2_model("trunc-st", "safetensors");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    truncate(&f, len / 2);
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn corrupted_safetensors_header() {
    let d = gpt2_model("corrupt-st", "safetensors");
    let f = d.join("model.safetensors");
    scribble(&f, 8, b"{\"x\": garbage");
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn truncated_pytorch_bin() {
    let d = gpt2_model("trunc-bin", "bin");
    let f = d.join("pytorch_model.bin");
    let len = std::fs::metadata(&f).unwrap().len();
    truncate(&f, len / 3);
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("not a readable PyTorch checkpoint"),
        "{err}"
    );
}

#[test]
fn corrupted_pytorch_bin() {
    let d = gpt2_model("corrupt-bin", "bin");
    let f = d.join("pytorch_model.bin");
    let len = std::fs::metadata(&f).unwrap().len() as usize;
    // Overwrite the zip's central directory at the end of the file.
    scribble(&f, len - 40, &[0xAB; 40]);
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(err.contains("pytorch_model.bin"), "{err}");
}

fn smollm2() -> PathBuf {
    assets().join("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn truncated_gguf() {
    let d = tempdir("trunc-gguf");
    let f = d.join("model.gguf");
    let data = std::fs::read(smollm2()).unwrap();
    std::fs::write(&f, &data[..data.len() / 2]).unwrap();
    let err = fails(&["generate", "--model", f.to_str().unwrap(), "hi"], None, 1);
    assert!(
        err.contains("model.gguf") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside the metadata too.
    std::fs::write(&f, &data[..4096]).unwrap();
    let err = fails(&["info", "--model", f.to_str().unwrap()], None, 1);
    assert!(
        err.contains("model.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
}

#[test]
fn corrupted_gguf() {
    let d = tempdir("corrupt-gguf");
    let f = d.join("model.gguf");
    let mut data = std::fs::read(smollm2()).unwrap()[..1 << 20].to_vec();
    data[0..4].copy_from_slice(b"GGXX");
    std::fs::write(&f, &data).unwrap();
    let err = fails(&["info", "--model", f.to_str().unwrap()], None, 1);
    assert!(
        err.contains("model.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
}

#[test]
fn config_with_a_missing_key() {
    let d = tempdir("missing-key");
    copy_dir(&fixtures().join("llama/safetensors"), &d);
    let cfg = d.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights() {
    let d = tempdir("wrong-shape");
    copy_dir(&fixtures().join("qwen2/safetensors"), &d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    std::fs::copy(
        assets().join("tokenizers/gpt2/encoder.json"),
        d.join("vocab.json"),
    )
    .unwrap();
    std::fs::copy(
        assets().join("tokenizers/gpt2/vocab.bpe"),
        d.join("merges.txt"),
    )
    .unwrap();
    // The tokenizer is checked after the weights, so the shape error comes first.
    let err = fails(&["generate", "--model", d.to_str().unwrap(), "hi"], None, 1);
    assert!(
        err.contains("model.safetensors")
            && err.contains("gate_proj.weight")
            && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn unknown_architecture() {
    let d = tempdir("unknown-arch");
    copy_dir(&fixtures().join("gpt2/safetensors"), &d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"model_type\": \"gpt2\"", "\"model_type\": \"mamba\"")
        .replace("GPT2LMHeadModel", "MambaForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let err = fails(&["info", "--model", d.to_str().unwrap()], None, 1);
    assert!(
        err.contains("unknown architecture 'mamba'") && err.contains("supported: gpt2"),
        "{err}"
    );
}

#[test]
fn tokenizer_that_does_not_match_the_weights() {
    let d = gpt2_model("tok-mismatch", "safetensors");
    std::fs::copy(
        assets().join("tokenizers/gpt2/encoder.json"),
        d.join("vocab.json"),
    )
    .unwrap();
    std::fs::copy(
        assets().join("tokenizers/gpt2/vocab.bpe"),
        d.join("merges.txt"),
    )
    .unwrap();
    let err = fails(
        &["generate", "--model", d.to_str().unwrap(), "Hello"],
        None,
        1,
    );
    assert!(
        err.contains("vocab.json") && err.contains("50257 tokens") && err.contains("320"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let text = std::fs::read_to_string(assets().join("corpora/tinyshakespeare/input.txt")).unwrap();
    let long = &text[..60_000];
    let err = fails(
        &[
            "generate",
            "--model",
            smollm2().to_str().unwrap(),
            "-n",
            "1",
        ],
        Some(long),
        1,
    );
    assert!(err.contains("context length is 8192"), "{err}");
}

#[test]
fn missing_model_and_usage_errors() {
    let err = fails(&["info", "--model", "/nonexistent/model"], None, 1);
    assert!(
        err.contains("/nonexistent/model") && err.contains("no such file"),
        "{err}"
    );
    fails(&["generate", "--temperature", "hot"], None, 2);
    fails(&["no-such-command"], None, 2);
}

/// The damage an earlier copy of the vocab assets had in transit: every byte sequence that is not
/// valid UTF-8 (binary lengths, counts, f32 scores) replaced by U+FFFD.
#[test]
fn vocab_gguf_with_every_non_utf8_byte_replaced() {
    let d = tempdir("utf8-damaged-gguf");
    let intact = std::fs::read(assets().join("tokenizers/vectors/ggml-vocab-gpt-2.gguf")).unwrap();
    assert!(std::str::from_utf8(&intact).is_err());
    let f = d.join("ggml-vocab-gpt-2.gguf");
    std::fs::write(&f, String::from_utf8_lossy(&intact).as_bytes()).unwrap();
    let err = fails(
        &["tokenize", "--model", f.to_str().unwrap(), "hello"],
        None,
        1,
    );
    assert!(
        err.contains("ggml-vocab-gpt-2.gguf") && err.contains("not a valid GGUF file"),
        "{err}"
    );
}
