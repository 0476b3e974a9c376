//! The encoder commands through the real binary: outputs that a user relies on (JSONL, .npy,
//! labels) and bad input that must end in one clear line and exit status 1, never a panic.

use crate::common;

use common::{fixtures, minilm, run, tempdir};

fn fails(args: &[&str], stdin: Option<&str>) -> String {
    let (code, _, err) = run(args, stdin);
    assert_eq!(code, 1, "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    err
}

fn ok(args: &[&str], stdin: Option<&str>) -> (String, String) {
    let (code, o, e) = run(args, stdin);
    assert_eq!(code, 0, "{args:?}: {e}");
    (o, e)
}

#[test]
fn embed_writes_jsonl_and_npy_with_the_same_vectors() {
    let m = minilm();
    let m = m.to_str().unwrap();
    let d = tempdir("npy");
    let tsv = d.join("in.tsv");
    std::fs::write(&tsv, "sentence\tlabel\nhello world\t1\nthe cat sat\t0\n").unwrap();
    let (out, _) = ok(&["embed", "-m", m, "-i", tsv.to_str().unwrap()], None);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["text"], "the cat sat");
    let v: Vec<f32> = rows[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(v.len(), 384);
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-5,
        "normalised by modules.json: {norm}"
    );
    let npy = d.join("out.npy");
    ok(
        &[
            "embed",
            "-m",
            m,
            "-i",
            tsv.to_str().unwrap(),
            "-o",
            npy.to_str().unwrap(),
        ],
        None,
    );
    let bytes = std::fs::read(&npy).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert!(std::str::from_utf8(&bytes[10..10 + hlen])
        .unwrap()
        .contains("(2, 384)"));
    let first = f32::from_le_bytes(bytes[10 + hlen..14 + hlen].try_into().unwrap());
    assert!((first - v[0]).abs() < 1e-7);
    // --pooling cls --no-normalize changes the vector.
    let (out, _) = ok(
        &[
            "embed",
            "-m",
            m,
            "--pooling",
            "cls",
            "--no-normalize",
            "hello world",
        ],
        None,
    );
    let r: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let c: Vec<f32> = r["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let cn: f32 = c.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (cn - 1.0).abs() > 0.1,
        "cls pooling without normalisation: norm {cn}"
    );
}

#[test]
fn similarity_ranks_paraphrases_higher() {
    let m = minilm();
    let (out, _) = ok(
        &[
            "similarity",
            "--json",
            "-m",
            m.to_str().unwrap(),
            "A man is eating food.",
            "A man is eating bread.",
            "A plane is taking off.",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = |i: usize, j: usize| v["cosine"][i][j].as_f64().unwrap();
    assert!((c(0, 0) - 1.0).abs() < 1e-5);
    assert!(c(0, 1) > c(0, 2) + 0.3, "{v}");
    assert!((c(0, 1) - c(1, 0)).abs() < 1e-6);
}

#[test]
fn classify_prints_id2label_or_default_names() {
    let enc = fixtures().join("encoders");
    let (out, _) = ok(
        &[
            "classify",
            "--json",
            "-m",
            enc.join("bert_cls/bin").to_str().unwrap(),
            "hello world",
        ],
        None,
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let probs = r["probabilities"].as_object().unwrap();
    assert_eq!(
        probs.keys().collect::<Vec<_>>(),
        ["negative", "neutral", "positive"]
    );
    let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-5);
    let (out, _) = ok(
        &[
            "classify",
            "-m",
            enc.join("distilbert_cls/safetensors").to_str().unwrap(),
            "hello world",
        ],
        None,
    );
    assert!(out.starts_with("LABEL_"), "{out}");
    // A token-classification checkpoint gets one label per token, special tokens included.
    let (out, _) = ok(
        &[
            "classify",
            "--json",
            "-m",
            enc.join("bert_tok/safetensors").to_str().unwrap(),
            "hello world",
        ],
        None,
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tokens: Vec<&str> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, ["[CLS]", "hello", "world", "[SEP]"]);
    assert!(r["tokens"][1]["label"]
        .as_str()
        .unwrap()
        .starts_with("LABEL_"));
}

#[test]
fn empty_lines_are_named_or_skipped() {
    let m = minilm();
    let m = m.to_str().unwrap();
    let err = fails(&["embed", "-m", m], Some("first\n\nthird\n"));
    assert!(err.contains("line 2: empty text"), "{err}");
    let (out, _) = ok(
        &["embed", "-m", m, "--skip-empty"],
        Some("first\n\nthird\n"),
    );
    assert_eq!(out.lines().count(), 2);
    let d = tempdir("jsonl");
    let f = d.join("in.jsonl");
    std::fs::write(&f, "{\"text\": \"ok\"}\n{\"body\": \"no text field\"}\n").unwrap();
    let err = fails(&["embed", "-m", m, "-i", f.to_str().unwrap()], None);
    assert!(
        err.contains("in.jsonl") && err.contains("line 2: no text field"),
        "{err}"
    );
}

#[test]
fn over_long_text_is_truncated_with_a_warning_or_refused() {
    let m = minilm();
    let m = m.to_str().unwrap();
    let long = "word ".repeat(50);
    let (out, err) = ok(&["embed", "-m", m, "--max-length", "16", &long], None);
    assert_eq!(out.lines().count(), 1);
    assert!(
        err.contains("warning: 1 text(s) longer than 16 tokens were truncated"),
        "{err}"
    );
    let err = fails(
        &[
            "embed",
            "-m",
            m,
            "--max-length",
            "16",
            "--no-truncate",
            "short",
            &long,
        ],
        None,
    );
    assert!(
        err.contains("line 2: the text has 52 tokens, more than the limit of 16"),
        "{err}"
    );
    let err = fails(&["embed", "-m", m, "--max-length", "100000", "x"], None);
    assert!(err.contains("exceeds the model's 512 positions"), "{err}");
}

#[test]
fn wrong_kind_of_model_is_a_clear_error() {
    let gguf =
        slm::assets_dir().join("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let err = fails(&["embed", "-m", gguf.to_str().unwrap(), "x"], None);
    assert!(
        err.contains(
            "SmolLM2-135M-Instruct.Q4_1.gguf: 'llama' is a causal language model, not an encoder"
        ),
        "{err}"
    );
    let gpt2 = fixtures().join("gpt2/safetensors");
    let err = fails(&["classify", "-m", gpt2.to_str().unwrap(), "x"], None);
    assert!(err.contains("'gpt2' is a causal language model"), "{err}");
    let err = fails(&["classify", "-m", minilm().to_str().unwrap(), "x"], None);
    assert!(
        err.contains(
            "classify needs a *ForSequenceClassification checkpoint; this one is BertModel"
        ),
        "{err}"
    );
    let err = fails(&["generate", "-m", minilm().to_str().unwrap(), "x"], None);
    assert!(
        err.contains("'bert' is an encoder model, not a text generator"),
        "{err}"
    );
    let mlm = fixtures().join("encoders/bert_mlm/safetensors");
    let err = fails(
        &["fill-mask", "-m", mlm.to_str().unwrap(), "no mask here"],
        None,
    );
    assert!(
        err.contains("the text has no [MASK] token to fill"),
        "{err}"
    );
}

#[test]
fn eval_classify_reports_metrics_and_writes_files() {
    let model = fixtures().join("encoders/bert_cls/safetensors");
    let model = model.to_str().unwrap();
    let d = tempdir("evalcls");
    let data = d.join("data.tsv");
    // Label names and class indices are both accepted.
    std::fs::write(
        &data,
        "sentence\tlabel\nhello world\tpositive\nthe cat sat\tnegative\nhello\t2\n",
    )
    .unwrap();
    let report = d.join("report");
    let (out, _) = ok(
        &[
            "eval",
            "classify",
            "-m",
            model,
            "--data",
            data.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.contains("accuracy") && out.contains("confusion matrix"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let confusion = json["report"]["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 3);
    assert!(std::fs::read_to_string(report.join("confusion.svg"))
        .unwrap()
        .starts_with("<svg"));
    std::fs::write(&data, "sentence\tlabel\nhello\tbogus\n").unwrap();
    let err = fails(
        &[
            "eval",
            "classify",
            "-m",
            model,
            "--data",
            data.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        err.contains(
            "line 2: label 'bogus' is neither a label of the model (negative, neutral, positive)"
        ),
        "{err}"
    );
}

/// `slm embed` and `slm similarity` on a recurrent text classifier (the 2-layer BiLSTM fixture):
/// the embedding is PyTorch's pooled states (tools/make_rnn_fixtures.py); `--pooling` is
/// refused, the classifier's own pooling being part of the trained model.
#[test]
fn embed_takes_an_rnn_classifier() {
    let dir = fixtures().join("rnn/bilstm_max");
    let m = dir.to_str().unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let text = r["texts"][0].as_str().unwrap();
    let (code, out, err) = run(&["embed", "-m", m, text], None);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let got: Vec<f64> = v["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want: Vec<f64> = r["pooled"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(
        got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
        "{got:?} vs {want:?}"
    );
    let (code, out, err) = run(&["similarity", "-m", m, text, text], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1.0000"), "{out}");
    let err = fails(&["embed", "-m", m, "--pooling", "mean", text], None);
    assert!(err.contains("--pooling does not apply"), "{err}");
}
