//! `slm generate` on an encoder-decoder: the tiny T5 v1.1 fixture with a unigram tokenizer that
//! slm trains on tiny shakespeare. Greedy outputs of a batch (`-i`) equal each input's alone,
//! and `--beams` prints the library's beam search.

use std::path::{Path, PathBuf};

use crate::common::{asset, fixtures, run, tempdir};

/// The T5 fixture with a 320-token unigram vocabulary (`<pad>` 0, `</s>` 1, `<unk>` 2).
fn t5_with_tokenizer(dir: &Path) -> PathBuf {
    let model = dir.join("t5");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("t5/t5_gated/safetensors").join(f),
            model.join(f),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt")).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text[..100_000]).unwrap();
    let tok = dir.join("tok");
    let (code, _, err) = run(
        &[
            "tokenizer",
            "train",
            "--type",
            "unigram",
            "--vocab-size",
            "320",
            "--special",
            "<pad>",
            "--special",
            "</s>",
            "--special",
            "<unk>",
            corpus.to_str().unwrap(),
            "-o",
            tok.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), model.join(f)).unwrap();
    }
    model
}

const INPUTS: [&str; 3] = [
    "To be, or not to be",
    "First Citizen: Before we proceed any further, hear me speak.",
    "What?",
];

#[test]
fn t5_generates_greedy_batched_and_beam_outputs() {
    let dir = tempdir("t5-generate");
    let model = t5_with_tokenizer(&dir);
    let m = model.to_str().unwrap();
    let alone: Vec<String> = INPUTS
        .iter()
        .map(|text| {
            let (code, out, err) = run(
                &["generate", "-m", m, text, "--temperature", "0", "-n", "10"],
                None,
            );
            assert_eq!(code, 0, "{err}");
            out.trim_end_matches('\n').to_string()
        })
        .collect();
    assert!(alone.iter().all(|o| !o.is_empty()), "{alone:?}");
    let file = dir.join("inputs.txt");
    std::fs::write(&file, INPUTS.join("\n")).unwrap();
    let (code, out, err) = run(
        &[
            "generate",
            "-m",
            m,
            "-i",
            file.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "10",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        alone,
        "a batch gives each input's output"
    );

    // Beams: the library's best two, decoded.
    let loaded = slm::models::seq2seq::load_seq2seq(&model).unwrap();
    let tok = slm::tokenize::Tokenizer::load(&loaded.files).unwrap();
    let opts = slm::generate::beam::BeamOptions {
        beams: 3,
        num_return: 2,
        max_new_tokens: 9,
        no_repeat_ngram: 2,
        eos: Some(1),
        ..Default::default()
    };
    let src = tok.encode_sequence(INPUTS[1]).unwrap();
    let hyps = slm::generate::beam::seq2seq(loaded.model.as_ref(), &src, &opts).unwrap();
    let want: Vec<String> = hyps
        .iter()
        .map(|h| tok.decode(&h.tokens, true).unwrap())
        .collect();
    let (code, out, err) = run(
        &[
            "generate",
            "-m",
            m,
            INPUTS[1],
            "--beams",
            "3",
            "--num-return",
            "2",
            "-n",
            "9",
            "--no-repeat-ngram-size",
            "2",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    assert_ne!(
        want[0], alone[1],
        "beam search found another output than greedy"
    );

    let (code, _, err) = run(
        &[
            "generate",
            "-m",
            m,
            "x",
            "--beams",
            "2",
            "--num-return",
            "3",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("--num-return 3 is more than --beams 2"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Short lines of tiny shakespeare with their words in reverse order, as JSONL pairs.
fn reversal_pairs(path: &Path, skip: usize, n: usize) {
    let text = std::fs::read_to_string(asset("corpora/tinyshakespeare/input.txt")).unwrap();
    let rows: String = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| (3..=7).contains(&w.len()))
        .skip(skip)
        .take(n)
        .map(|w| {
            let rev: Vec<&str> = w.iter().rev().copied().collect();
            format!(
                "{}\n",
                serde_json::json!({"input": w.join(" "), "target": rev.join(" ")})
            )
        })
        .collect();
    std::fs::write(path, rows).unwrap();
}

fn last_eval_loss(out: &Path) -> f64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["eval"]["loss"].as_f64())
        .expect("an evaluation")
}

fn json_of(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `finetune --task seq2seq` (full and LoRA), then `eval seq2seq` of what it wrote: the
/// teacher-forced loss equals the trainer's last evaluation, `--generate` scores the outputs
/// it writes to `--report`, and `generate` runs the model and the adapter.
#[test]
fn t5_finetunes_fully_and_with_lora_and_evaluates() {
    let dir = tempdir("t5-finetune");
    let model = t5_with_tokenizer(&dir);
    let (train, valid) = (dir.join("train.jsonl"), dir.join("valid.jsonl"));
    reversal_pairs(&train, 0, 160);
    reversal_pairs(&valid, 160, 12);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let finetune = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "finetune".to_string(),
            "-m".into(),
            s(&model),
            "--task".into(),
            "seq2seq".into(),
            "--train".into(),
            s(&train),
            "--valid".into(),
            s(&valid),
            "-o".into(),
            s(out),
            "--epochs".into(),
            "2".into(),
            "--batch-size".into(),
            "16".into(),
            "--max-length".into(),
            "24".into(),
            "--max-target-length".into(),
            "24".into(),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&args, None);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("160 train / 12 valid pairs (input/target"),
            "{err}"
        );
    };
    let (full, lora) = (dir.join("full"), dir.join("lora"));
    finetune(&full, &["--lr", "1e-3"]);
    finetune(&lora, &["--method", "lora", "--lr", "5e-3"]);
    assert!(full.join("model.safetensors").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_2_SEQ_LM");
    assert_eq!(cfg["target_modules"], serde_json::json!(["q", "v"]));

    let merged = dir.join("merged");
    let (code, _, err) = run(
        &[
            "merge",
            "-m",
            model.to_str().unwrap(),
            "--adapter",
            lora.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");

    // The teacher-forced loss of the saved model (of the base with the adapter, and of the two
    // merged) is the trainer's last validation loss.
    for (m, adapter, out) in [
        (&full, None, &full),
        (&model, Some(&lora), &lora),
        (&merged, None, &lora),
    ] {
        let mut args = vec![
            "eval".to_string(),
            "seq2seq".into(),
            "-m".into(),
            s(m),
            "--data".into(),
            s(&valid),
            "--max-length".into(),
            "24".into(),
            "--json".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".to_string(), s(a)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, err) = run(&args, None);
        assert_eq!(code, 0, "{err}");
        let r = json_of(&stdout);
        let (got, want) = (r["mean_nll"].as_f64().unwrap(), last_eval_loss(out));
        assert!((got - want).abs() < 1e-4, "{}: {got} vs {want}", s(out));
        assert_eq!(r["pairs"], 12);
        assert!((r["perplexity"].as_f64().unwrap() - got.exp()).abs() < 1e-6);
    }

    // --generate: the scores of the outputs written to the report.
    let report = dir.join("report");
    let eval_gen = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "seq2seq",
            "-m",
            full.to_str().unwrap(),
            "--data",
            valid.to_str().unwrap(),
            "--generate",
            "--max-new-tokens",
            "16",
            "--report",
            report.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        run(&args, None)
    };
    let (code, stdout, err) = eval_gen(&[]);
    assert_eq!(code, 0, "{err}");
    let r = json_of(&stdout);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(report.join("outputs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 12);
    let outs: Vec<&str> = rows.iter().map(|r| r["output"].as_str().unwrap()).collect();
    let refs: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    let bleu = slm::eval::overlap::bleu(&outs, &refs).score;
    assert!((r["generated"]["bleu"]["score"].as_f64().unwrap() - bleu).abs() < 1e-9);
    let chrf = slm::eval::overlap::chrf(&outs, &refs);
    assert!((r["generated"]["chrf"].as_f64().unwrap() - chrf).abs() < 1e-9);
    let saved = json_of(&std::fs::read_to_string(report.join("report.json")).unwrap());
    assert_eq!(saved["report"]["generated"], r["generated"]);
    // Greedy outputs are what `slm generate` prints for the same input.
    let first = rows[0]["input"].as_str().unwrap();
    let (code, stdout, err) = run(
        &[
            "generate",
            "-m",
            full.to_str().unwrap(),
            first,
            "--temperature",
            "0",
            "-n",
            "16",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(stdout.trim(), outs[0].trim());
    // The report is not overwritten without --force.
    let (code, _, err) = eval_gen(&[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("report.json") && err.contains("--force"),
        "{err}"
    );
    let (code, _, err) = eval_gen(&["--force", "--beams", "2"]);
    assert_eq!(code, 0, "{err}");

    // A pair without its target is named by line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"input\": \"a b\", \"target\": \"b a\"}\n{\"input\": \"c\"}\n",
    )
    .unwrap();
    let (code, _, err) = run(
        &[
            "eval",
            "seq2seq",
            "-m",
            full.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("bad.jsonl: line 2: no \"target\" string"),
        "{err}"
    );
    // The task and the model must agree, whatever the data.
    let wrong = |m: &Path, task: &str| {
        let out = dir.join(format!("wrong-{task}"));
        let (code, _, err) = run(
            &[
                "finetune",
                "-m",
                m.to_str().unwrap(),
                "--task",
                task,
                "--train",
                bad.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert_ne!(code, 0);
        err
    };
    let err = wrong(&full, "causal-lm");
    assert!(
        err.contains("is an encoder-decoder; train it with --task seq2seq"),
        "{err}"
    );
    let err = wrong(&fixtures().join("gpt2/safetensors"), "seq2seq");
    assert!(err.contains("'gpt2' is not an encoder-decoder"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A seq2seq run killed after a checkpoint resumes to exactly the uninterrupted run's model.
#[test]
fn a_killed_seq2seq_run_resumes_to_the_same_model() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempdir("t5-resume");
    let model = t5_with_tokenizer(&dir);
    let train = dir.join("train.jsonl");
    reversal_pairs(&train, 0, 96);
    let args = |out: &Path| -> Vec<String> {
        [
            "finetune",
            "-m",
            model.to_str().unwrap(),
            "--task",
            "seq2seq",
            "--train",
            train.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--max-steps",
            "24",
            "--batch-size",
            "8",
            "--save-every",
            "1",
            "--lr",
            "1e-3",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = dir.join("whole");
    let a = args(&whole);
    let (code, _, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert_eq!(code, 0, "{err}");
    let killed = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_slm"))
        .args(args(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoint/state.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "ended before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("model.safetensors").exists(),
        "killed after the end"
    );
    let mut b = args(&killed);
    b.push("--resume".into());
    let (code, _, err) = run(&b.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert_eq!(code, 0, "{err}");
    let x = std::fs::read(whole.join("model.safetensors")).unwrap();
    let y = std::fs::read(killed.join("model.safetensors")).unwrap();
    assert!(
        x == y,
        "the resumed model differs from the uninterrupted one"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Marian translator folder as opus-mt ships it (source.spm, target.spm, vocab.json, a
/// MarianMTModel with `forced_eos_token_id`): `slm generate`'s greedy translations, alone and
/// batched, are transformers' `generate()` outputs decoded by `MarianTokenizer`
/// (tools/make_fixtures.py marian_tok).
#[test]
fn marian_translates_as_transformers_alone_and_batched() {
    let model = fixtures().join("marian_tok");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("expected.json")).unwrap())
            .unwrap();
    let cases = want["greedy"].as_array().unwrap();
    let m = model.to_str().unwrap();
    let mut inputs = Vec::new();
    for c in cases {
        let input = c["input"].as_str().unwrap();
        let (code, out, err) = run(
            &["generate", "-m", m, input, "--temperature", "0", "-n", "16"],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.trim_end_matches('\n'),
            c["text"].as_str().unwrap(),
            "{input:?}"
        );
        inputs.push(input);
    }
    let dir = tempdir("marian-generate");
    let file = dir.join("inputs.txt");
    std::fs::write(&file, inputs.join("\n")).unwrap();
    let (code, out, err) = run(
        &[
            "generate",
            "-m",
            m,
            "-i",
            file.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "16",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let want: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    let _ = std::fs::remove_dir_all(&dir);
}
