//! What a user can get wrong, through the binary: outputs are never replaced without --force,
//! killed runs' temp files are cleaned up, numbers out of range are usage errors (exit 2), and
//! each message points the right way.

use crate::common;

use std::path::Path;

use common::{fixtures, run, smollm2, tempdir};

fn fails(args: &[&str], code: i32) -> String {
    let (got, _, err) = run(args, None);
    assert_eq!(got, code, "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    if code == 1 {
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    err
}

fn write(p: &Path, text: &str) -> String {
    std::fs::write(p, text).unwrap();
    p.to_str().unwrap().to_string()
}

const ROWS: &str = "{\"text\": \"a fine film\", \"label\": \"pos\"}\n{\"text\": \"a dull film\", \"label\": \"neg\"}\n{\"text\": \"fine\", \"label\": \"pos\"}\n{\"text\": \"dull\", \"label\": \"neg\"}\n";

fn finetune<'a>(model: &'a str, train: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "finetune",
        "-m",
        model,
        "--train",
        train,
        "-o",
        out,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn finetune_never_replaces_a_model_and_cleans_up_after_killed_runs() {
    let d = tempdir("nl-finetune");
    let model = fixtures().join("encoders/bert_cls/safetensors");
    let m = model.to_str().unwrap();
    let train = write(&d.join("train.jsonl"), ROWS);
    let out = d.join("out");
    let o = out.to_str().unwrap();

    // The model folder itself, with or without --force.
    for extra in [&[][..], &["--force"][..]] {
        let err = fails(&finetune(m, &train, m, extra), 1);
        assert!(err.contains("is the model folder itself"), "{err}");
    }

    // A folder that holds a model: refused, untouched; --force replaces it.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"precious").unwrap();
    let err = fails(&finetune(m, &train, o, &[]), 1);
    assert!(
        err.contains("already holds a model (model.safetensors)") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"precious"
    );

    // Temp files of killed runs (no such process) are removed and reported; --force replaces
    // the model. The final evaluation at step 2 runs once, and the summary's tokens/s counts
    // training time only.
    std::fs::create_dir_all(out.join(".checkpoint.4000000000.tmp")).unwrap();
    std::fs::write(
        out.join(".checkpoint.4000000000.tmp/model.safetensors"),
        [0u8; 1000],
    )
    .unwrap();
    std::fs::write(out.join(".model.safetensors.4000000001.tmp"), [0u8; 10]).unwrap();
    let args = finetune(
        m,
        &train,
        o,
        &["--force", "--eval-every", "1", "--valid-split", "0.5"],
    );
    let (code, stdout, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(".checkpoint.4000000000.tmp (0.0 MB), left by a run that was killed")
            && err.contains(".model.safetensors.4000000001.tmp"),
        "{err}"
    );
    assert!(!out.join(".checkpoint.4000000000.tmp").exists());
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"precious"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let evals: Vec<&str> = metrics.lines().filter(|l| l.contains("\"eval\"")).collect();
    assert_eq!(
        evals.len(),
        2,
        "one evaluation per step, the last not repeated: {metrics}"
    );
    assert!(
        stdout.contains("2 steps in") && stdout.contains("tokens/s"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn embed_and_eval_reports_are_not_overwritten() {
    let d = tempdir("nl-outputs");
    let cls = fixtures().join("encoders/bert_cls/safetensors");
    let c = cls.to_str().unwrap();
    let out = d.join("vectors.jsonl");
    std::fs::write(&out, b"keep").unwrap();
    let o = out.to_str().unwrap();
    let err = fails(&["embed", "-m", c, "-o", o, "hello"], 1);
    assert!(
        err.contains("vectors.jsonl: already exists (pass --force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let (code, _, err) = run(&["embed", "-m", c, "-o", o, "--force", "hello"], None);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(&out).unwrap().contains("embedding"));

    let data = write(
        &d.join("data.jsonl"),
        &ROWS
            .replace("\"pos\"", "\"positive\"")
            .replace("\"neg\"", "\"negative\""),
    );
    let report = d.join("report");
    std::fs::create_dir_all(&report).unwrap();
    std::fs::write(report.join("report.json"), b"keep").unwrap();
    let r = report.to_str().unwrap();
    let err = fails(
        &["eval", "classify", "-m", c, "--data", &data, "--report", r],
        1,
    );
    assert!(err.contains("report.json: already exists"), "{err}");
    assert_eq!(std::fs::read(report.join("report.json")).unwrap(), b"keep");
    let args = [
        "eval", "classify", "-m", c, "--data", &data, "--report", r, "--force",
    ];
    let (code, _, err) = run(&args, None);
    assert_eq!(code, 0, "{err}");
    assert!(report.join("confusion.svg").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn numbers_out_of_range_are_usage_errors() {
    let cls = fixtures().join("encoders/bert_cls/safetensors");
    let mlm = fixtures().join("encoders/bert_mlm/safetensors");
    let (c, k) = (cls.to_str().unwrap(), mlm.to_str().unwrap());
    let err = fails(&["generate", "-n", "-5", "hi"], 2);
    assert!(
        err.contains("'-5' is not a whole number") && !err.contains("-- -5"),
        "{err}"
    );
    for (args, want) in [
        (
            vec!["generate", "--threads", "0", "hi"],
            "must be at least 1",
        ),
        // Only the commands that compute take --threads.
        (
            vec!["info", "--threads", "2"],
            "unexpected argument '--threads'",
        ),
        (
            vec!["generate", "--temperature", "-1", "hi"],
            "must be 0 or more",
        ),
        (vec!["generate", "--top-p", "2", "hi"], "between 0 and 1"),
        (vec!["chat", "--min-p", "-0.5"], "between 0 and 1"),
        (
            vec!["embed", "-m", c, "--batch-size", "0", "x"],
            "at least 1",
        ),
        (
            vec!["classify", "-m", c, "--batch-size", "0", "x"],
            "at least 1",
        ),
        (
            vec!["fill-mask", "-m", k, "-k", "0", "a [MASK]"],
            "at least 1",
        ),
        (
            vec![
                "finetune",
                "-m",
                c,
                "--train",
                "x",
                "-o",
                "y",
                "--batch-size",
                "0",
            ],
            "at least 1",
        ),
        (
            vec!["quantize", "-m", c, "-t", "q3_k", "-o", "x.gguf"],
            "unknown type 'q3_k'",
        ),
        (
            vec!["convert", "-m", c, "-o", "x", "--dtype", "f8"],
            "unknown dtype 'f8'",
        ),
    ] {
        let err = fails(&args, 2);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn messages_point_the_right_way() {
    let d = tempdir("nl-messages");
    let gguf = smollm2();
    let g = gguf.to_str().unwrap();
    let cls = fixtures().join("encoders/bert_cls/safetensors");
    let base = fixtures().join("encoders/bert_base/safetensors");
    let (c, b) = (cls.to_str().unwrap(), base.to_str().unwrap());

    let err = fails(&["generate", "-m", g, ""], 1);
    assert!(
        err.contains("the prompt is empty") && !err.contains("--special"),
        "{err}"
    );

    let train = write(
        &d.join("empty.jsonl"),
        &format!("{ROWS}{{\"text\": \"\", \"label\": \"pos\"}}\n"),
    );
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let err = fails(&finetune(c, &train, o, &[]), 1);
    assert!(
        err.contains("line 5: empty text") && err.contains("--skip-empty"),
        "{err}"
    );
    let (code, _, err) = run(&finetune(c, &train, o, &["--skip-empty"]), None);
    assert_eq!(code, 0, "{err}");

    let train = write(&d.join("text.txt"), "some text\n");
    let err = fails(&finetune(g, &train, d.join("o2").to_str().unwrap(), &[]), 1);
    assert!(err.contains("use --task causal-lm"), "{err}");

    let data = write(&d.join("data.jsonl"), ROWS);
    let err = fails(&["eval", "classify", "-m", b, "--data", &data], 1);
    assert!(err.contains("no sequence-classification head"), "{err}");

    let err = fails(
        &["convert", "-m", c, "-o", d.join("conv").to_str().unwrap()],
        1,
    );
    assert!(
        err.contains("is a folder") && err.contains("slm quantize"),
        "{err}"
    );

    let adapter = d.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        "{\"base_model_name_or_path\": \"HuggingFaceTB/SmolLM2-135M\", \"peft_type\": \"LORA\"}",
    )
    .unwrap();
    let err = fails(&["generate", "-m", adapter.to_str().unwrap(), "hi"], 1);
    assert!(
        err.contains("is a LoRA adapter")
            && err.contains("--adapter")
            && err.contains("SmolLM2-135M"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn chat_commands_and_a_history_longer_than_the_context() {
    let g = smollm2();
    let g = g.to_str().unwrap();
    let args = [
        "chat",
        "-m",
        g,
        "--temperature",
        "0",
        "-n",
        "8",
        "--ctx-size",
        "96",
    ];
    let input = "/help\nHi!\n/nope\n/system Answer in one word.\n/clear\nName a color of the sky.\nName a fruit that is red.\nName an animal with stripes.\nName a season that is cold.\n/exit\nnever read\n";
    let (code, out, err) = run(&args, Some(input));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("/clear forget the conversation"), "{err}");
    assert!(err.contains("unknown command /nope"), "{err}");
    assert!(
        err.contains("(system message set)") && err.contains("(conversation cleared)"),
        "{err}"
    );
    assert!(
        err.contains("(dropped the oldest 2 messages to stay within 96 tokens)"),
        "{err}"
    );
    // One reply per message, none for what came after /exit.
    assert_eq!(
        out.lines().filter(|l| !l.trim().is_empty()).count(),
        5,
        "{out}"
    );
}

#[test]
fn ctrl_c_stops_the_reply_not_the_chat() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = common::command()
        .args(["chat", "-m", smollm2().to_str().unwrap(), "-n", "48"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"Tell me a long story.\n").unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    stdin.write_all(b"Thanks.\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("(stopped)").count(), 1, "{err}");
    // The second message was answered after the first reply was cut.
    assert!(rest.lines().count() >= 2, "{rest}");
}
