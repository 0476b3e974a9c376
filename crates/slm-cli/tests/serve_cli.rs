//! `slm serve` as users start it: the binary on an ephemeral port answers what `slm generate`
//! prints for the same prompt (streamed and whole), and SIGTERM stops it cleanly.

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

use serde_json::{json, Value};

#[test]
fn serve_answers_what_generate_prints_and_stops_on_sigterm() {
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let prompt = "The best way to learn a language is";
    let (code, want, err) = common::run(
        &[
            "generate",
            "-m",
            model,
            "--temperature",
            "0",
            "-n",
            "24",
            prompt,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let want = want.strip_suffix('\n').unwrap().to_string();

    let mut child = common::command()
        .args(["serve", "-m", model, "--port", "0", "--alias", "smol"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let url = format!("http://{addr}/v1/completions");
    let body = json!({"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0});
    let whole: Value = ureq::post(&url)
        .send_json(body.clone())
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(whole["choices"][0]["text"], want.as_str());
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["cache_prompt"] = json!(false);
    let mut sse = String::new();
    ureq::post(&url)
        .send_json(streamed)
        .unwrap()
        .into_reader()
        .read_to_string(&mut sse)
        .unwrap();
    let text: String = sse
        .split_terminator("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|p| *p != "[DONE]")
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, want);

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "exit {status}: {rest}");
    assert!(rest.contains("slm serve: stopped"), "{rest}");
}
