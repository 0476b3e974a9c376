//! Nothing a client sends crashes the server or gets anything but an OpenAI error object:
//! empty, non-JSON, non-UTF-8, deeply nested and oversized bodies and every field with the
//! wrong type, on every POST endpoint; the server answers normally afterwards.

use crate::support;

use serde_json::{json, Value};
use support::*;

fn send(url: &str, body: &[u8]) -> (u16, String) {
    let res = match ureq::post(url)
        .set("Content-Type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: the connection failed: {e}"),
    };
    (res.status(), res.into_string().unwrap_or_default())
}

#[test]
fn garbage_gets_error_objects_and_the_server_keeps_serving() {
    let (_s, base) = start(options(vec![smollm2(), minilm()]));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"123".to_vec(),
        b"\"text\"".to_vec(),
        b"{}".to_vec(),
        b"{\"model\": 5}".to_vec(),
        vec![0xff, 0xfe, b'{', 0x80, b'}'],
        b"{\"messages\": [{\"role\": \"user\", \"content\": NaN}]}".to_vec(),
        deep.into_bytes(),
    ];
    let fields = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "input",
        "encoding_format",
        "query",
        "documents",
        "top_n",
        "cache_prompt",
        "ignore_eos",
    ];
    let wrong = [
        json!({"x": [1]}),
        json!(-1e300),
        json!("\u{0}"),
        json!([null]),
        json!(-1),
    ];
    for f in fields {
        for w in &wrong {
            let mut v = json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}],
                               "prompt": "hi", "input": "hi", "query": "q", "documents": ["d"],
                               "max_tokens": 2});
            v[f] = w.clone();
            bodies.push(v.to_string().into_bytes());
        }
    }
    for endpoint in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
    ] {
        let url = format!("{base}{endpoint}");
        for body in &bodies {
            let (status, text) = send(&url, body);
            let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).to_string();
            if status == 200 {
                // Some wrong-looking values are valid (seed -1, a stop of one string...).
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{endpoint} {shown}: {e}: {text}"));
                assert!(v.get("error").is_none(), "{endpoint} {shown}: {text}");
                continue;
            }
            assert!(
                (400..500).contains(&status),
                "{endpoint} {shown}: {status} {text}"
            );
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{endpoint} {shown}: {status}, not JSON ({e}): {text}"));
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{endpoint} {shown}: {text}"
            );
        }
    }
    // A body over the limit: a 413 error object once the limit is passed.
    {
        use std::io::{Read, Write};
        let addr = base.strip_prefix("http://").unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let len = 17usize << 20;
            let head = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
            );
            // The server may close before all of it is sent.
            let _ = w
                .write_all(head.as_bytes())
                .and_then(|_| w.write_all(&vec![b' '; len]));
        });
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply);
        let _ = writer.join();
        let reply = String::from_utf8_lossy(&reply).to_string();
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        let json = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {reply}"));
        assert!(v["error"]["message"].as_str().is_some(), "{reply}");
    }
    assert_eq!(get(&format!("{base}/health")).0, 200);
    let (status, v) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{v}");
}
