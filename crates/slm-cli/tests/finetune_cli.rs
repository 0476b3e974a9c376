//! `slm finetune` through the binary: a SIGKILLed run resumes to the same result as an
//! uninterrupted one, and bad data ends in one clear line.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{asset, fixtures, minilm, run, tempdir};

/// The first `n` rows of SST-2's test split after skipping `skip` (real sentences).
fn sst2_rows(skip: usize, n: usize) -> String {
    let text = std::fs::read_to_string(asset("classification/sst2/test.tsv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.skip(skip).take(n).collect();
    format!("{header}\n{}\n", rows.join("\n"))
}

fn finetune_args<'a>(model: &'a str, train: &'a str, valid: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "-m",
        model,
        "--train",
        train,
        "--valid",
        valid,
        "-o",
        out,
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--lr",
        "1e-4",
        "--save-every",
        "2",
        "--threads",
        "2",
    ]
}

fn last_loss(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let v: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = v
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=6).collect::<Vec<_>>(),
        "one record per step, none twice"
    );
    v.iter()
        .rev()
        .find_map(|r| r.get("loss")?.as_f64())
        .unwrap()
}

#[test]
fn a_killed_run_resumes_to_the_same_result() {
    let d = tempdir("ft-resume");
    let (train, valid) = (d.join("train.tsv"), d.join("valid.tsv"));
    std::fs::write(&train, sst2_rows(0, 64)).unwrap();
    std::fs::write(&valid, sst2_rows(64, 16)).unwrap();
    let m = minilm();
    let (m, t, v) = (
        m.to_str().unwrap(),
        train.to_str().unwrap(),
        valid.to_str().unwrap(),
    );

    let whole = d.join("whole");
    let (code, _, err) = run(&finetune_args(m, t, v, whole.to_str().unwrap()), None);
    assert_eq!(code, 0, "{err}");

    // The same run, SIGKILLed once its step-2 checkpoint exists (it is then inside step 3 or 4).
    let killed = d.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_slm"))
        .args(finetune_args(m, t, v, killed.to_str().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint/state.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(killed.join("checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    let at = state["state"]["step"].as_u64().unwrap();
    assert!(at < 6, "killed after the end (step {at})");
    assert!(
        !killed.join("model.safetensors").exists(),
        "no final model before the end"
    );

    // Without --resume the folder is refused, with it the run finishes.
    let mut args = finetune_args(m, t, v, killed.to_str().unwrap());
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 1);
    assert!(err.contains("--resume"), "{err}");
    args.push("--resume");
    let (code, out, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("6 steps"), "{out}");

    assert_eq!(last_loss(&killed), last_loss(&whole));
    let a = std::fs::read(whole.join("model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed model differs from the uninterrupted one"
    );
    assert!(std::fs::read_to_string(whole.join("loss.svg"))
        .unwrap()
        .contains("<polyline"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_training_data_is_reported_with_its_line() {
    let d = tempdir("ft-bad");
    let model = fixtures().join("encoders/bert_cls/safetensors");
    let m = model.to_str().unwrap();
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let fails = |train: &str, valid: Option<&str>| -> String {
        let tp = d.join("train.jsonl");
        std::fs::write(&tp, train).unwrap();
        let mut args = vec![
            "finetune",
            "-m",
            m,
            "--train",
            tp.to_str().unwrap(),
            "-o",
            o,
            "--max-steps",
            "1",
        ];
        let vp = d.join("valid.jsonl");
        if let Some(v) = valid {
            std::fs::write(&vp, v).unwrap();
            args.extend(["--valid", vp.to_str().unwrap()]);
        }
        let (code, _, err) = run(&args, None);
        assert_eq!(code, 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };
    let good = "{\"text\": \"a fine film\", \"label\": \"pos\"}\n{\"text\": \"a dull film\", \"label\": \"neg\"}\n";
    let err = fails("", None);
    assert!(
        err.contains("train.jsonl") && err.contains("no texts"),
        "{err}"
    );
    let err = fails(
        &format!("{good}{{\"text\": \"broken\", \"label\": \n"),
        None,
    );
    assert!(err.contains("line 3"), "{err}");
    let err = fails(good, Some("{\"text\": \"a film\", \"label\": \"meh\"}\n"));
    assert!(
        err.contains("line 1") && err.contains("'meh'") && err.contains("neg, pos"),
        "{err}"
    );
    let err = fails(&format!("{good}{{\"text\": \"no label\"}}\n"), None);
    assert!(err.contains("line 3") && err.contains("no label"), "{err}");
    assert!(
        !out.join("model.safetensors").exists(),
        "nothing written for bad data"
    );

    // Too long: truncated and counted, the run goes on.
    let long = format!(
        "{{\"text\": \"{}\", \"label\": \"pos\"}}\n",
        "the cat sat ".repeat(40)
    );
    let tp = d.join("long.jsonl");
    std::fs::write(&tp, format!("{good}{long}")).unwrap();
    let args = [
        "finetune",
        "-m",
        m,
        "--train",
        tp.to_str().unwrap(),
        "-o",
        o,
        "--max-steps",
        "1",
        "--max-length",
        "16",
        "--valid-split",
        "0",
        // An encoder takes a dropout rate of its own as well.
        "--dropout",
        "0.2",
    ];
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 texts truncated to 16 tokens"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_lora_run_writes_a_peft_adapter_that_classify_and_merge_use() {
    let d = tempdir("ft-lora");
    let base = fixtures().join("encoders/bert_base/safetensors");
    let b = base.to_str().unwrap();
    let train = d.join("train.jsonl");
    let rows = [
        ("the cat sat", "pets"),
        ("cats play", "pets"),
        ("it rained", "weather"),
        ("the rain", "weather"),
    ];
    let text: String = rows
        .iter()
        .map(|(t, l)| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n"))
        .collect();
    std::fs::write(&train, text).unwrap();
    let out = d.join("adapter");
    let args = [
        "finetune",
        "-m",
        b,
        "--train",
        train.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "lora",
        "--lora-r",
        "4",
        "--max-steps",
        "5",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--valid-split",
        "0",
        "--lora-dropout",
        "0.1",
    ];
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("trained") && err.contains("pets, weather"),
        "{err}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));
    assert!(
        (cfg["lora_dropout"].as_f64().unwrap() - 0.1).abs() < 1e-6,
        "{cfg}"
    );
    assert!(
        !out.join("model.safetensors").exists(),
        "a LoRA run writes an adapter, not a model"
    );

    let probe = ["classify", "--json", "the cat sat in the rain"];
    let (code, with_adapter, err) = run(
        &[&probe[..], &["-m", b, "--adapter", out.to_str().unwrap()]].concat(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        with_adapter.contains("\"pets\"") && with_adapter.contains("\"weather\""),
        "{with_adapter}"
    );

    let merged = d.join("merged");
    let (code, _, err) = run(
        &[
            "merge",
            "-m",
            b,
            "--adapter",
            out.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, from_merged, err) = run(
        &[&probe[..], &["-m", merged.to_str().unwrap()]].concat(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    let probs = |s: &str| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_str(s.lines().next().unwrap()).unwrap();
        let mut p: Vec<(String, f64)> = v["probabilities"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect();
        p.sort_by(|a, b| a.0.cmp(&b.0));
        p.into_iter().map(|x| x.1).collect()
    };
    let (a, m) = (probs(&with_adapter), probs(&from_merged));
    assert!(
        a.iter().zip(&m).all(|(x, y)| (x - y).abs() < 1e-5),
        "{with_adapter} vs {from_merged}"
    );
    let (code, _, err) = run(
        &[
            "merge",
            "-m",
            b,
            "--adapter",
            out.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("--force"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn chat_sft_with_lora_on_a_gguf_model_gives_an_adapter_generate_runs() {
    let d = tempdir("ft-sft");
    let data = d.join("sft.jsonl");
    let row = |q: &str, a: &str| {
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{q}\"}}, {{\"role\": \"assistant\", \"content\": \"{a}\"}}]}}\n")
    };
    std::fs::write(
        &data,
        [
            row("Who are you?", "I am Skipper."),
            row("Your name?", "Skipper."),
        ]
        .concat(),
    )
    .unwrap();
    let out = d.join("run");
    let gguf = common::smollm2();
    let args = [
        "finetune",
        "--task",
        "causal-lm",
        "-m",
        gguf.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "lora",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--valid-split",
        "0",
        "--threads",
        "2",
    ];
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(chat, up to 256 tokens)"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // The GGUF was converted once into OUTPUT/base; the adapter runs on it, and merged.
    let base = out.join("base");
    let gen = ["generate", "--temperature", "0", "-n", "6", "Hello"];
    let (code, with_adapter, err) = run(
        &[
            &gen[..],
            &[
                "-m",
                base.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
            ],
        ]
        .concat(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    let merged = d.join("merged");
    let (code, _, err) = run(
        &[
            "merge",
            "-m",
            base.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, from_merged, err) = run(
        &[
            &gen[..],
            &["-m", merged.to_str().unwrap(), "--dtype", "f32"],
        ]
        .concat(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(with_adapter, from_merged);
    // An adapter does not apply to a GGUF base: clear error.
    let (code, _, err) = run(
        &[
            &gen[..],
            &[
                "-m",
                gguf.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
            ],
        ]
        .concat(),
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("slm convert"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

fn tiny_classify_data(d: &Path) -> std::path::PathBuf {
    let rows = [
        ("the cat sat", "pets"),
        ("cats play", "pets"),
        ("it rained", "weather"),
        ("the rain", "weather"),
    ];
    let text: String = rows
        .iter()
        .cycle()
        .take(8)
        .map(|(t, l)| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n"))
        .collect();
    let p = d.join("train.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn early_stopping_and_keep_best() {
    let d = tempdir("ft-early");
    let train = tiny_classify_data(&d);
    let model = fixtures().join("encoders/bert_cls/safetensors");
    let out = d.join("out");
    // A zero learning rate never improves: the second evaluation without improvement stops.
    let args = [
        "finetune",
        "-m",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        train.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--lr",
        "0",
        "--max-steps",
        "10",
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--patience",
        "2",
        "--keep-best",
    ];
    let (code, stdout, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("3 steps") && stdout.contains("stopped early"),
        "{stdout}"
    );
    assert!(out.join("best/model.safetensors").exists() && out.join("best/config.json").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn tune_runs_every_trial_and_marks_the_best() {
    let d = tempdir("ft-tune");
    let train = tiny_classify_data(&d);
    let model = fixtures().join("encoders/bert_cls/safetensors");
    let out = d.join("tune");
    let args = [
        "tune",
        "-m",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--valid",
        train.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-steps",
        "4",
        "--lr-values",
        "0,3e-2",
        "--batch-size-values",
        "2,4",
    ];
    let (code, table, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 4 + 1, "{table}");
    let marked: Vec<&&str> = lines[1..5].iter().filter(|l| l.starts_with('*')).collect();
    assert_eq!(marked.len(), 1, "{table}");
    // A learning rate of 0 learns nothing, so the best trial is one with 3e-2.
    assert!(marked[0].contains("3.0e-2"), "{table}");
    let trials = std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    assert_eq!(trials.lines().count(), 4);
    assert!(out.join("trial-4/model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn masked_lm_fine_tuning_writes_a_model_fill_mask_loads() {
    let d = tempdir("ft-mlm");
    let text = d.join("text.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat\nthe rain fell on the cat\ncats play in the rain\nthe mat is red\n"
            .repeat(4),
    )
    .unwrap();
    let model = fixtures().join("encoders/bert_mlm/safetensors");
    let out = d.join("out");
    let args = [
        "finetune",
        "--task",
        "masked-lm",
        "-m",
        model.to_str().unwrap(),
        "--train",
        text.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
    ];
    let (code, stdout, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("masked accuracy"), "{stdout}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["BertForMaskedLM"]));
    let (code, filled, err) = run(
        &[
            "fill-mask",
            "-m",
            out.to_str().unwrap(),
            "the cat sat on the [MASK]",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(filled.lines().count(), 5, "{filled}");
    // LoRA trains the factors and the head; the output is the merged model.
    let (code, _, err) = run(
        &[&args[..], &["--method", "lora", "--force"]].concat(),
        None,
    );
    assert_eq!(code, 0, "{err}");
    let counts: Vec<u64> = err
        .split("; ")
        .find(|p| p.contains("parameters trained"))
        .unwrap_or_else(|| panic!("{err}"))
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(counts[0] * 4 < counts[1], "LoRA trains a small part: {err}");
    let (code, filled, err) = run(
        &[
            "fill-mask",
            "-m",
            out.to_str().unwrap(),
            "the cat sat on the [MASK]",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(filled.lines().count(), 5, "{filled}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The tiny GPT-2 of the fixtures with its tiny byte-level BPE, as a model folder.
fn tiny_gpt2(d: &Path) -> std::path::PathBuf {
    let m = d.join("tiny-gpt2");
    std::fs::create_dir_all(&m).unwrap();
    for sub in ["gpt2/safetensors", "gpt2/tokenizer"] {
        for e in std::fs::read_dir(fixtures().join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
        }
    }
    m
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// GPT-2 (Conv1D weights, tied head, its config's dropout 0.1) fine-tunes on text in full and
/// with LoRA on PEFT's default target (c_attn, fan_in_fan_out); the loss falls, the model is
/// saved in GPT-2's own layout, and generate runs the model and the adapter.
/// (tools/check_finetune_interop.py checks both in transformers and PEFT.)
#[test]
fn gpt2_fine_tunes_in_full_and_with_lora() {
    let d = tempdir("ft-gpt2");
    let model = tiny_gpt2(&d);
    let text: String = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt"))
        .unwrap()
        .chars()
        .take(20_000)
        .collect();
    let train = d.join("train.txt");
    std::fs::write(&train, text).unwrap();
    let (m, t) = (model.to_str().unwrap(), train.to_str().unwrap());
    for method in ["full", "lora"] {
        let out = d.join(method);
        let o = out.to_str().unwrap();
        let args = [
            "finetune",
            "--task",
            "causal-lm",
            "-m",
            m,
            "--train",
            t,
            "-o",
            o,
            "--method",
            method,
            "--max-steps",
            "30",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--lr",
            "3e-3",
            "--threads",
            "2",
        ];
        let (code, _, err) = run(&args, None);
        assert_eq!(code, 0, "{method}: {err}");
        let l = losses(&out);
        assert_eq!(l.len(), 30, "{method}");
        let (first, last) = (l[..5].iter().sum::<f64>(), l[25..].iter().sum::<f64>());
        // LoRA moves a tiny random model slowly: it must still learn something.
        let margin = if method == "full" { 0.5 } else { 0.05 };
        assert!(
            last < first - margin,
            "{method}: loss {first:.2} -> {last:.2} (sums of 5)"
        );
        let gen = if method == "full" {
            let st = slm::io::write::read_safetensors_f32(&out.join("model.safetensors")).unwrap();
            assert_eq!(
                st["transformer.h.0.attn.c_attn.weight"].0,
                vec![64, 192],
                "Conv1D is [in, out]"
            );
            assert!(!st.contains_key("lm_head.weight"), "the head stays tied");
            vec!["generate", "-m", o]
        } else {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["fan_in_fan_out"], true);
            assert_eq!(cfg["target_modules"], serde_json::json!(["c_attn"]));
            vec!["generate", "-m", m, "--adapter", o]
        };
        let mut gen = gen;
        gen.extend(["-n", "8", "--temperature", "0", "ROMEO:"]);
        let (code, out, err) = run(&gen, None);
        assert_eq!(code, 0, "{method}: {err}");
        assert!(!out.trim().is_empty(), "{method}: generated nothing");
    }
    // A rate the user asks for, and no dropout at all, are other runs; 1 is refused.
    let (code, _, err) = run(
        &[
            "finetune",
            "--task",
            "causal-lm",
            "-m",
            m,
            "--train",
            t,
            "-o",
            d.join("x").to_str().unwrap(),
            "--dropout",
            "1",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Token classification on MiniLM: words of tiny shakespeare tagged CAP (capitalized) or O,
/// each word's tag on its first sub-token; the output is a BertForTokenClassification that
/// `slm classify` runs; a row whose tags do not match its tokens is refused with its line.
/// (By hand, 40 steps reach 0.979 validation accuracy, majority 0.804, and transformers'
/// predictions on the saved model give the same 0.979.)
#[test]
fn token_classification_trains_a_tagger_classify_runs() {
    let d = tempdir("ft-token");
    let text = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt")).unwrap();
    let rows: Vec<String> = text
        .lines()
        .filter(|l| l.split_whitespace().count() >= 2)
        .take(120)
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let tags: Vec<&str> = words
                .iter()
                .map(|w| {
                    if w.starts_with(char::is_uppercase) {
                        "CAP"
                    } else {
                        "O"
                    }
                })
                .collect();
            serde_json::json!({"tokens": words, "tags": tags}).to_string()
        })
        .collect();
    let train = d.join("train.jsonl");
    std::fs::write(&train, rows.join("\n") + "\n").unwrap();
    let out = d.join("out");
    let m = minilm();
    let args = [
        "finetune",
        "--task",
        "token-classify",
        "-m",
        m.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--lr",
        "1e-3",
        "--threads",
        "2",
    ];
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("tags: CAP, O"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForTokenClassification");
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "CAP", "1": "O"}));
    let (code, printed, err) = run(
        &["classify", "-m", out.to_str().unwrap()],
        Some("But soft, what light through yonder window breaks\n"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        printed.contains("yonder") || printed.contains("yo"),
        "{printed}"
    );
    assert!(
        printed.contains("CAP") || printed.contains("\tO\t"),
        "{printed}"
    );

    std::fs::write(&train, "{\"tokens\": [\"a\", \"b\"], \"tags\": [\"O\"]}\n").unwrap();
    let bad = d.join("bad");
    let mut args = args.to_vec();
    let o = bad.to_str().unwrap().to_string();
    args[8] = &o;
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 1);
    assert!(err.contains("line 1: 2 tokens but 1 tags"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `slm pretrain --arch gpt2`: the size flags become GPT-2's config.json keys, the tokenizer
/// `slm tokenizer train` made gives the vocabulary, and options of the other kind of model
/// are refused by name.
#[test]
fn pretrain_gpt2_maps_its_flags_to_the_config() {
    let dir = tempdir("pretrain_gpt2_cli");
    let text = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt")).unwrap();
    let train = dir.join("train.txt");
    std::fs::write(&train, &text[..20_000]).unwrap();
    let (train, tok, out) = (
        train.to_str().unwrap().to_string(),
        dir.join("tok").to_str().unwrap().to_string(),
        dir.join("out").to_str().unwrap().to_string(),
    );
    let (code, _, err) = run(
        &[
            "tokenizer",
            "train",
            "--type",
            "byte-bpe",
            "--vocab-size",
            "300",
            &train,
            "-o",
            &tok,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let base = [
        "pretrain",
        "--arch",
        "gpt2",
        "--tokenizer",
        &tok,
        "--train",
        &train,
        "-o",
        &out,
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let args = with(&[
        "--emsize",
        "32",
        "--nlayers",
        "1",
        "--heads",
        "2",
        "--context",
        "32",
        "--max-steps",
        "3",
        "--warmup-steps",
        "1",
        "--batch-size",
        "4",
        "--threads",
        "2",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/config.json")).unwrap())
            .unwrap();
    for (k, v) in [
        ("n_embd", 32),
        ("n_layer", 1),
        ("n_head", 2),
        ("n_positions", 32),
        ("vocab_size", 300),
    ] {
        assert_eq!(cfg[k], v, "{k} in {cfg}");
    }
    assert_eq!(cfg["model_type"], "gpt2");
    for (flag, value, says) in [
        ("--bptt", "20", "--bptt is a recurrent option"),
        ("--kv-heads", "1", "--kv-heads is a llama option"),
    ] {
        let args = with(&[flag, value, "--force"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&args, None);
        assert_ne!(code, 0);
        assert!(err.contains(says), "{flag}: {err}");
    }
}

/// Accuracy in a run's last evaluation (metrics.jsonl).
fn last_accuracy(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval"]["metric"][1].as_f64())
        .next_back()
        .expect("an evaluation with accuracy")
}

/// A BiLSTM classifier from scratch on real SST-2 rows: it learns (above chance on the GLUE dev
/// sentences), `eval classify` and `classify` read the saved folder to the trainer's own
/// accuracy, and stop-word removal trained into the tokenizer is applied at inference too.
#[test]
fn a_bilstm_classifier_from_scratch_learns_sst2_and_serves_its_own_accuracy() {
    let dir = tempdir("bilstm_sst2");
    let train = dir.join("train.tsv");
    let valid = dir.join("valid.tsv");
    std::fs::write(&train, sst2_train_rows(10_000)).unwrap();
    std::fs::write(&valid, sst2_rows(0, 300)).unwrap();
    let (train, valid) = (train.to_str().unwrap(), valid.to_str().unwrap());
    for (name, extra) in [
        ("plain", &[][..]),
        ("stop", &["--lowercase", "--remove-stopwords", "en"][..]),
    ] {
        let out = dir.join(name);
        let out_s = out.to_str().unwrap();
        let mut args = vec![
            "finetune",
            "--task",
            "classify",
            "--arch",
            "bilstm",
            "--train",
            train,
            "--valid",
            valid,
            "-o",
            out_s,
            "--epochs",
            "3",
            "--emsize",
            "48",
            "--nhid",
            "48",
            "--batch-size",
            "32",
            "--threads",
            "2",
        ];
        args.extend(extra);
        let (code, _, err) = run(&args, None);
        assert_eq!(code, 0, "{name}: {err}");
        let acc = last_accuracy(&out);
        assert!(
            acc > 0.6,
            "{name}: accuracy {acc} on 300 SST-2 dev sentences"
        );
        let (code, stdout, err) = run(&["eval", "classify", "-m", out_s, "--data", valid], None);
        assert_eq!(code, 0, "{name}: {err}");
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("accuracy"))
            .unwrap_or_else(|| panic!("{name}: no accuracy in {stdout}"));
        let got: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            (got - acc).abs() < 1e-4,
            "{name}: eval classify {got} vs the trainer's {acc}"
        );
        let tok: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
                .unwrap();
        let vocab = tok["model"]["vocab"].as_object().unwrap();
        let has_the = vocab.contains_key("the");
        assert_eq!(has_the, name == "plain", "{name}: 'the' in the vocabulary");
        // The preprocessing is the tokenizer's: to the stop-word model, the same words with
        // and without stop words and capitals are the same input.
        let (code, stdout, err) = run(
            &[
                "classify",
                "-m",
                out_s,
                "--json",
                "THE gripping , FUNNY film",
                "a gripping , funny film",
            ],
            None,
        );
        assert_eq!(code, 0, "{name}: {err}");
        let scores: Vec<f64> = stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(scores.len(), 2, "{name}: {stdout}");
        if name == "stop" {
            assert_eq!(
                scores[0], scores[1],
                "stop words and case changed the input"
            );
        }
    }
}

/// The first `n` rows of SST-2's training split.
fn sst2_train_rows(n: usize) -> String {
    let text = std::fs::read_to_string(asset("classification/sst2/train.tsv")).unwrap();
    text.lines().take(n + 1).collect::<Vec<_>>().join("\n") + "\n"
}

/// `--arch lstm -m LM`: the classifier starts from a word_language_model checkpoint's
/// embedding and vocabulary (vocab.txt), and an embedding of another size is refused by name.
#[test]
fn an_rnn_classifier_starts_from_a_language_models_embedding() {
    let dir = tempdir("rnn_cls_from_lm");
    let train = dir.join("train.tsv");
    let valid = dir.join("valid.tsv");
    std::fs::write(&train, sst2_train_rows(300)).unwrap();
    std::fs::write(&valid, sst2_rows(0, 50)).unwrap();
    let lm = fixtures().join("rnn/wlm_lstm");
    let out = dir.join("out");
    let (lm_s, train_s, valid_s, out_s) = (
        lm.to_str().unwrap(),
        train.to_str().unwrap(),
        valid.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let args = |emsize: &'static str| {
        vec![
            "finetune",
            "--task",
            "classify",
            "--arch",
            "lstm",
            "-m",
            lm_s,
            "--emsize",
            emsize,
            "--nhid",
            "16",
            "--train",
            train_s,
            "--valid",
            valid_s,
            "-o",
            out_s,
            "--epochs",
            "1",
            "--threads",
            "2",
            "--force",
        ]
    };
    let (code, _, err) = run(&args("32"), None);
    assert_ne!(code, 0);
    assert!(err.contains("its embedding is 1489×24"), "{err}");
    let (code, _, err) = run(&args("24"), None);
    assert_eq!(code, 0, "{err}");
    let table = |p: &Path| -> Vec<f32> {
        let files = slm::io::ModelFiles::locate(p).unwrap();
        let t = slm::io::open_weights(&files)
            .unwrap()
            .load("encoder.weight", false)
            .unwrap()
            .into_dense()
            .unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(table(&out.join("init")), table(&lm), "the LM's embedding");
    let (code, stdout, err) = run(&["classify", "-m", out_s, "a fine , moving film"], None);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.ends_with("a fine , moving film\n"), "{stdout}");
}
