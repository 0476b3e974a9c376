#![allow(dead_code)]
//! What the server tests share: starting a server on a loopback port, HTTP calls that return
//! error bodies too, the library's reference answers, and the SSE frame check.

use std::io::Read;
use std::path::PathBuf;

use serde_json::Value;
use slm::generate::{GenerateOptions, SamplingParams, Session};
use slm::models::{load_causal, ComputeDtype};
use slm::tokenize::{Message, Tokenizer};
use slm_server::{ModelSpec, ServeOptions, Server};

#[path = "../../../slm/tests/common/mod.rs"]
pub mod common;
#[path = "../../../slm/tests/support/scratch.rs"]
pub mod scratch;

pub fn smollm2() -> PathBuf {
    common::smollm2_gguf()
}

pub fn minilm() -> PathBuf {
    common::assets().join("models/all-MiniLM-L6-v2")
}

pub const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1";

pub fn options(models: Vec<PathBuf>) -> ServeOptions {
    ServeOptions {
        models: models
            .into_iter()
            .map(|path| ModelSpec {
                path,
                alias: None,
                adapter: None,
            })
            .collect(),
        addr: "127.0.0.1:0".parse().unwrap(),
        api_key: None,
        parallel: 4,
        queue: 16,
        ctx_size: None,
        dtype: ComputeDtype::Auto,
    }
}

pub fn start(opts: ServeOptions) -> (Server, String) {
    let s = Server::start(opts).unwrap();
    let base = format!("http://{}", s.addr());
    (s, base)
}

/// POSTs JSON; returns the status and the parsed body, for errors too.
pub fn post(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, &body.to_string(), None)
}

pub fn post_raw(url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let res = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = res.status();
    let text = res.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    (status, v)
}

pub fn get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The library's greedy continuation of `ids`: the reference every answer is held to.
pub fn reference(ids: &[u32], max_tokens: usize) -> (String, usize) {
    let mut m = load_causal(&smollm2(), ComputeDtype::Auto).unwrap();
    let tok = Tokenizer::load(&m.files).unwrap();
    let mut s = Session::new(m.model.as_mut());
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut text = String::new();
    let (out, _) = s
        .generate(&tok, ids, &opts, &mut |t| {
            text.push_str(t);
            Ok(())
        })
        .unwrap();
    (text, out.len())
}

pub fn chat_ids(user: &str) -> Vec<u32> {
    let m = load_causal(&smollm2(), ComputeDtype::Auto).unwrap();
    let tok = Tokenizer::load(&m.files).unwrap();
    let text = tok
        .chat()
        .unwrap()
        .render(&[Message::new("user", user)], true)
        .unwrap();
    tok.encode(&text, false).unwrap()
}

pub fn error_of(v: &Value) -> (&str, Option<&str>, Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (
        e["type"].as_str().unwrap(),
        e["param"].as_str(),
        e["code"].as_str(),
    )
}

/// Reads an SSE body to its end: the `data:` payloads, checking the framing byte for byte
/// (each event is exactly `data: PAYLOAD\n\n`, nothing else is sent).
pub fn sse_events(mut r: impl Read) -> Vec<String> {
    let mut body = String::new();
    r.read_to_string(&mut body).unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "stream end: {body:?}");
    let frames: Vec<&str> = body.split_terminator("\n\n").collect();
    frames
        .iter()
        .map(|f| {
            let payload = f
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame {f:?}"));
            assert!(!payload.contains('\n'), "one line per event: {f:?}");
            payload.to_string()
        })
        .collect()
}
