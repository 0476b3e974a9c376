//! `slm eval perplexity` and `slm eval compare` through the binary, on the tiny GPT-2 fixture
//! with a small word-level tokenizer written by the test (the fixture's vocabulary has 320 ids).

use crate::common;

use std::path::{Path, PathBuf};

use common::fixtures;

fn slm(args: &[&str]) -> (i32, String, String) {
    common::run(args, None)
}

fn model_with_tokenizer(format: &str, name: &str) -> crate::scratch::Scratch {
    let d = crate::scratch::Scratch::new(&format!("eval-cli-{name}"));
    for e in std::fs::read_dir(fixtures().join("gpt2").join(format)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let words =
        "[UNK] the a of and to in is was it that he she they on for with as at by an be this";
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .split(' ')
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null, "post_processor": null, "decoder": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    d
}

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let words = [
        "the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "he", "she",
    ];
    let t: Vec<&str> = (0..150)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect();
    std::fs::write(&p, t.join(" ")).unwrap();
    p
}

#[test]
fn perplexity_and_compare_of_the_same_weights_in_two_formats() {
    let (st, bin) = (
        model_with_tokenizer("safetensors", "st"),
        model_with_tokenizer("bin", "bin"),
    );
    let t = text(&st);
    let (code, out, err) = slm(&[
        "eval",
        "perplexity",
        "-m",
        st.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
        "--max-length",
        "32",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(p["tokens_scored"], 149);
    assert_eq!(p["stride"], 16);
    let (code, out, err) = slm(&[
        "eval",
        "compare",
        "-m",
        st.to_str().unwrap(),
        "-m",
        bin.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
        "--max-length",
        "32",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let c: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(c["top1_agreement"], 1.0);
    assert!(c["max_kl"].as_f64().unwrap() < 1e-9);
    assert_eq!(c["perplexity_a"], p["perplexity"]);
    let (code, _, err) = slm(&[
        "eval",
        "compare",
        "-m",
        st.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("give exactly two --model options (got 1)"),
        "{err}"
    );
    let (code, _, err) = slm(&[
        "eval",
        "perplexity",
        "-m",
        st.to_str().unwrap(),
        "--text",
        t.to_str().unwrap(),
        "--max-length",
        "32",
        "--stride",
        "40",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--stride must be between 1 and --max-length (32), got 40"),
        "{err}"
    );
}
