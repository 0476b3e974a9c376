//! The server on an ephemeral loopback port with the real SmolLM2 Q4_1: chat and completions,
//! the SSE framing, the error objects, the API key, queue-full 429, cancellation, graceful
//! stop, prefix reuse, batched decoding, JSON-schema output, and answers equal to the library's
//! own generation (what `slm generate` runs; the binary itself is compared in slm-cli's tests).

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use slm::models::{load_causal, ComputeDtype};
use slm::tokenize::Tokenizer;
use support::*;

#[test]
fn chat_streamed_and_whole_equal_the_librarys_greedy_answer() {
    let (_s, base) = start(options(vec![smollm2()]));
    let user = "What is the capital of France?";
    let (want, n) = reference(&chat_ids(user), 24);
    let body = json!({
        "model": SMOL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let (status, v) = post(&format!("{base}/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(
        v["choices"][0]["finish_reason"],
        if n == 24 { "length" } else { "stop" }
    );
    assert_eq!(v["usage"]["prompt_tokens"], chat_ids(user).len());
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["total_tokens"], chat_ids(user).len() + n);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    // Without the first request's cached prefix: the same passes as the reference runs.
    stream_body["cache_prompt"] = json!(false);
    let res = ureq::post(&format!("{base}/v1/chat/completions"))
        .send_string(&stream_body.to_string())
        .unwrap();
    assert_eq!(res.header("Content-Type"), Some("text/event-stream"));
    let events = sse_events(res.into_reader());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_string();
    let created = chunks[0]["created"].clone();
    // Every chunk, exactly: role first, a delta per piece of text, the finish reason, usage.
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate() {
        let envelope = |choices: Value, usage: Value| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": SMOL,
                "system_fingerprint": c["system_fingerprint"], "choices": choices, "usage": usage,
            })
        };
        let expected = if i == 0 {
            envelope(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                Value::Null,
            )
        } else if i == chunks.len() - 1 {
            envelope(
                json!([]),
                json!({"prompt_tokens": chat_ids(user).len(), "completion_tokens": n,
                       "total_tokens": chat_ids(user).len() + n,
                       "prompt_tokens_details": {"cached_tokens": c["usage"]["prompt_tokens_details"]["cached_tokens"]}}),
            )
        } else if i == chunks.len() - 2 {
            envelope(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": v["choices"][0]["finish_reason"]}]),
                Value::Null,
            )
        } else {
            let piece = c["choices"][0]["delta"]["content"].as_str().unwrap();
            assert!(!piece.is_empty(), "an empty delta at chunk {i}");
            text.push_str(piece);
            envelope(
                json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]),
                Value::Null,
            )
        };
        assert_eq!(c, &expected, "chunk {i}");
        // The bytes are serde_json's compact form of that object: no extra whitespace.
        assert_eq!(events[i], c.to_string());
    }
    assert_eq!(text, want);
    let cached = &chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert_eq!(cached, 0);
    // By default a prompt that repeats a cached one reuses all of it but the last token.
    let (_, again) = post(&format!("{base}/v1/chat/completions"), &body);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert_eq!(cached, Some(chat_ids(user).len() as u64 - 1));
}

#[test]
fn completions_equal_the_librarys_answer_and_carry_logprobs() {
    let (_s, base) = start(options(vec![smollm2()]));
    let m = load_causal(&smollm2(), ComputeDtype::Auto).unwrap();
    let tok = Tokenizer::load(&m.files).unwrap();
    let prompt = "The three primary colors are";
    let ids = tok.encode(prompt, true).unwrap();
    let (want, n) = reference(&ids, 16);
    let (status, v) = post(
        &format!("{base}/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 3}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    for (i, (chosen, top)) in lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
        .enumerate()
    {
        let chosen = chosen.as_f64().unwrap();
        let top: Vec<f64> = top
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(top.len() <= 3 && !top.is_empty());
        // Greedy: the chosen token is the most likely one.
        let best = top.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (chosen - best).abs() < 1e-6,
            "token {i}: {chosen} vs best {best}"
        );
        assert!(chosen <= 0.0 && top.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-5);
    }
    // Token ids as the prompt give the same answer.
    let (_, v2) = post(
        &format!("{base}/v1/completions"),
        &json!({"prompt": ids, "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(v2["choices"][0]["text"], want.as_str());

    // Chat logprobs: one entry per generated token, each with its top alternatives.
    let (_, v) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    for e in content {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(e["logprob"], e["top_logprobs"][0]["logprob"]);
        assert_eq!(e["token"], e["top_logprobs"][0]["token"]);
    }
}

#[test]
fn concurrent_streams_decode_together_and_each_gets_its_own_answer() {
    let (_s, base) = start(options(vec![smollm2()]));
    let users = [
        "Name a fruit.",
        "What is 2 + 2?",
        "Write a haiku about the sea.",
        "Who wrote Hamlet?",
        "Say hello in French.",
        "What color is the sky?",
    ];
    let want: Vec<String> = users
        .iter()
        .map(|u| reference(&chat_ids(u), 20).0)
        .collect();
    let threads: Vec<_> = users
        .iter()
        .map(|u| {
            let url = format!("{base}/v1/chat/completions");
            // Without prefix reuse (the prompts share the template's system turn), each row
            // of a shared pass computes what it computes alone: the answers are exactly equal.
            let body = json!({"messages": [{"role": "user", "content": u}], "max_tokens": 20,
                              "temperature": 0, "cache_prompt": false});
            std::thread::spawn(move || post(&url, &body))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (status, v) = t.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want[i].as_str(),
            "request {i}"
        );
    }
    let (_, metrics) = get(&format!("{base}/metrics"));
    let read = |name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // Six requests on four slots: more decode rows than passes means rows shared passes.
    assert!(
        read("slm_decode_rows_total") > read("slm_decode_steps_total") * 1.5,
        "{metrics}"
    );
    assert!(
        metrics.contains("slm_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 6")
    );
    assert_eq!(read("slm_queue_depth"), 0.0);
    assert!(read("slm_time_to_first_token_seconds_count") >= 6.0);
}

#[test]
fn bad_requests_get_openai_error_objects() {
    let mut opts = options(vec![smollm2(), minilm()]);
    opts.ctx_size = Some(64);
    let (_s, base) = start(opts);
    let chat = format!("{base}/v1/chat/completions");
    let msg = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(String, u16, Option<&str>, Option<&str>)> = vec![
        ("{not json".into(), 400, None, None),
        (
            json!({"model": SMOL}).to_string(),
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": "hi"}).to_string(),
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": msg, "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": msg, "temperature": 3}).to_string(),
            400,
            Some("temperature"),
            Some("invalid_value"),
        ),
        (
            json!({"model": SMOL, "messages": msg, "top_p": -0.5}).to_string(),
            400,
            Some("top_p"),
            Some("invalid_value"),
        ),
        (
            json!({"model": SMOL, "messages": msg, "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
            Some("invalid_value"),
        ),
        (
            json!({"model": SMOL, "messages": msg, "n": 2}).to_string(),
            400,
            Some("n"),
            Some("invalid_value"),
        ),
        (
            json!({"model": SMOL, "messages": msg, "stop": ["a","b","c","d","e"]}).to_string(),
            400,
            Some("stop"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": [{"content": "hi"}]}).to_string(),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": msg, "top_logprobs": 3}).to_string(),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": msg, "response_format": {"type": "json_schema"}})
                .to_string(),
            400,
            Some("response_format.json_schema.schema"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": msg, "response_format": {"type": "yaml"}}).to_string(),
            400,
            Some("response_format.type"),
            None,
        ),
        (
            // Unsatisfiable: llguidance refuses it, and so does the server.
            json!({"model": SMOL, "messages": msg, "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}})
            .to_string(),
            400,
            Some("response_format"),
            None,
        ),
        (
            json!({"model": SMOL, "messages": [{"role": "user", "content": "word ".repeat(80)}]})
                .to_string(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            json!({"model": "gpt-4o", "messages": msg}).to_string(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
    ];
    for (body, status, param, code) in cases {
        let (s, v) = post_raw(&chat, &body, None);
        let (kind, p, c) = error_of(&v);
        assert_eq!((s, p, c), (status, param, code), "{body} -> {v}");
        assert_eq!(kind, "invalid_request_error", "{body}");
    }
    let (s, v) = post(
        &format!("{base}/v1/completions"),
        &json!({"model": SMOL, "prompt": [999999]}),
    );
    assert_eq!((s, error_of(&v).1), (400, Some("prompt")));
    let (s, v) = post(&format!("{base}/v1/completions"), &json!({"model": SMOL}));
    assert_eq!((s, error_of(&v).1), (400, Some("prompt")));
    let (s, v) = post(
        &format!("{base}/v1/embeddings"),
        &json!({"model": "all-MiniLM-L6-v2"}),
    );
    assert_eq!((s, error_of(&v).1), (400, Some("input")));
    let (s, v) = post(
        &format!("{base}/v1/embeddings"),
        &json!({"model": "all-MiniLM-L6-v2", "input": []}),
    );
    assert_eq!((s, error_of(&v).1), (400, Some("input")));
    let (s, body) = get(&format!("{base}/v2/nothing"));
    assert_eq!(s, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_of(&v).2, Some("not_found"));
    // Still serving after all of that.
    let (s, v) = post(
        &chat,
        &json!({"model": SMOL, "messages": msg, "max_tokens": 2}),
    );
    assert_eq!(s, 200, "{v}");
}

#[test]
fn an_api_key_is_required_when_set_but_not_for_health() {
    let mut opts = options(vec![smollm2()]);
    opts.api_key = Some("sekret".into());
    let (_s, base) = start(opts);
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    let url = format!("{base}/v1/completions");
    for key in [None, Some("wrong")] {
        let (s, v) = post_raw(&url, &body, key);
        assert_eq!((s, error_of(&v).2), (401, Some("invalid_api_key")));
    }
    assert_eq!(post_raw(&url, &body, Some("sekret")).0, 200);
    assert_eq!(get(&format!("{base}/v1/models")).0, 401);
    assert_eq!(
        get(&format!("{base}/health")),
        (200, r#"{"status":"ok"}"#.to_string())
    );
}

/// Sends a streaming request on a raw socket and reads until the first content chunk.
fn open_stream(addr: std::net::SocketAddr, max_tokens: usize) -> TcpStream {
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": true,
                      "ignore_eos": true, "temperature": 0})
    .to_string();
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            break;
        }
    }
    c
}

#[test]
fn a_full_queue_answers_429_and_a_gone_client_frees_its_slot() {
    let mut opts = options(vec![smollm2()]);
    opts.parallel = 1;
    opts.queue = 1;
    let (s, base) = start(opts);
    let long = open_stream(s.addr(), 100_000);
    // The second waits in the queue, the third finds it full.
    let url = format!("{base}/v1/completions");
    let queued = {
        let url = url.clone();
        std::thread::spawn(move || post(&url, &json!({"prompt": "Hi", "max_tokens": 3})))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = get(&format!("{base}/metrics"));
        if m.contains("slm_queue_depth 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second request never queued: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, v) = post(&url, &json!({"prompt": "Hi", "max_tokens": 3}));
    assert_eq!((status, error_of(&v).0), (429, "rate_limit_error"), "{v}");
    // Closing the first stream cancels it; the queued request then runs.
    drop(long);
    let (status, v) = queued.join().unwrap();
    assert_eq!(status, 200, "{v}");
    let (_, m) = get(&format!("{base}/metrics"));
    assert!(m.contains("slm_requests_cancelled_total 1"), "{m}");
    assert!(m.contains("slm_requests_rejected_total 1"), "{m}");
    assert!(
        m.contains("slm_requests_total{endpoint=\"/v1/completions\",status=\"429\"} 1"),
        "{m}"
    );
}

#[test]
fn stopping_lets_running_streams_finish() {
    let (s, base) = start(options(vec![smollm2()]));
    let url = format!("{base}/v1/completions");
    let reader = std::thread::spawn(move || {
        let res = ureq::post(&url)
            .send_string(
                &json!({"prompt": "Once", "max_tokens": 40, "ignore_eos": true, "stream": true})
                    .to_string(),
            )
            .unwrap();
        sse_events(res.into_reader())
    });
    std::thread::sleep(Duration::from_millis(300));
    s.stop().unwrap();
    let events = reader.join().unwrap();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let text: String = events[..events.len() - 2]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!text.is_empty());
}

#[test]
fn response_format_json_schema_gives_valid_documents() {
    let (_s, base) = start(options(vec![smollm2()]));
    let url = format!("{base}/v1/chat/completions");
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false,
    });
    for (stream, temperature) in [(false, 0.0), (true, 0.0), (false, 1.0)] {
        let body = json!({
            "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "max_tokens": 80, "temperature": temperature, "seed": 7, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        });
        let text = if stream {
            let res = ureq::post(&url).send_string(&body.to_string()).unwrap();
            sse_events(res.into_reader())
                .iter()
                .filter(|e| *e != "[DONE]")
                .filter_map(|e| {
                    let v: Value = serde_json::from_str(e).unwrap();
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect::<String>()
        } else {
            let (status, v) = post(&url, &body);
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let obj = doc.as_object().unwrap();
        assert_eq!(obj.len(), 3, "{text}");
        assert!(
            obj["name"]
                .as_str()
                .is_some_and(|n| n.chars().count() <= 20),
            "{text}"
        );
        assert!(obj["age"].is_i64() || obj["age"].is_u64(), "{text}");
        let pets = obj["pets"].as_array().unwrap();
        assert!(
            pets.len() <= 3 && pets.iter().all(|p| p == "cat" || p == "dog"),
            "{text}"
        );
    }
    // json_object: any object.
    let (status, v) = post(
        &url,
        &json!({"messages": [{"role": "user", "content": "Give me JSON."}], "max_tokens": 60,
                "temperature": 0, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[test]
fn a_client_that_hangs_up_on_a_whole_answer_frees_its_slot() {
    let (_s, base) = start(options(vec![smollm2()]));
    let addr = base.strip_prefix("http://").unwrap().to_string();
    let body = json!({"prompt": "Once", "max_tokens": 100_000, "ignore_eos": true}).to_string();
    let mut c = TcpStream::connect(&addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let metric = |name: &str| -> u64 {
        let (_, m) = get(&format!("{base}/metrics"));
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {m}"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric("slm_completion_tokens_total") < 5 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    while metric("slm_requests_cancelled_total") < 1 || metric("slm_active_sequences") > 0 {
        assert!(
            Instant::now() < deadline,
            "the slot was not freed after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = metric("slm_completion_tokens_total");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric("slm_completion_tokens_total"),
        generated,
        "still generating"
    );
}

#[test]
fn a_prompt_that_does_not_fit_beside_running_streams_still_starts() {
    let (s, base) = start(options(vec![smollm2()]));
    // Three streams decoding for a long time, then a prompt of 30 tokens: 3 + 30 rows do not
    // fit one uniform pass (32), so the prompt gets a pass of its own instead of waiting.
    let streams: Vec<TcpStream> = (0..3).map(|_| open_stream(s.addr(), 100_000)).collect();
    let prompt: Vec<u32> = (0..30).map(|i| 1000 + i).collect();
    let t = Instant::now();
    let (status, v) = post(
        &format!("{base}/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(v["usage"]["prompt_tokens"], 30);
    drop(streams);
}
