//! `/v1/chat/completions` and `/v1/completions`: request checks, jobs for the engine, and
//! OpenAI's whole and streamed (server-sent events) answer shapes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use slm::generate::{StopReason, TokenLogprob};
use slm::tokenize::{Message, Tokenizer};
use tokio::sync::mpsc;

use super::{pick, RequestBody, St};
use crate::api::{self, ApiError, Content, GenRequest, Prompt};
use crate::engine::{Event, Finished, Job, Refused};
use crate::{AppState, Model, Served};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{t:x}{n:04x}")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    /// The request field that holds the prompt, for errors about it.
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }
}

/// What a generation request turned into: the job's prompt and options and how to answer.
struct Prepared {
    kind: Kind,
    model: String,
    prompt: Vec<u32>,
    opts: slm::generate::GenerateOptions,
    stream: bool,
    include_usage: bool,
    reuse_prefix: bool,
    constraint: Option<slm::generate::Constraint>,
    id: String,
    created: u64,
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

fn message_text(m: &api::ChatMessage, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("content parts of type '{kind}' are not supported (text only)"),
                            Some(&param),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

fn prepare<'a>(
    s: &'a AppState,
    body: &[u8],
    kind: Kind,
) -> Result<(Prepared, &'a Model), ApiError> {
    let req: GenRequest = api::parse(body)?;
    let model = pick(s, req.model.as_deref())?;
    let Served::Causal {
        engine,
        tok,
        template,
        grammars,
    } = &model.served
    else {
        return Err(ApiError::invalid(
            format!("'{}' is an embedding model; use /v1/embeddings", model.name),
            Some("model"),
        ));
    };
    let logprobs = match (kind, &req.logprobs) {
        (_, None | Some(Value::Null)) => None,
        (Kind::Chat, Some(Value::Bool(b))) => b.then_some(0),
        (Kind::Chat, _) => {
            return Err(ApiError::invalid(
                "'logprobs' must be a boolean",
                Some("logprobs"),
            ))
        }
        (Kind::Completion, Some(v)) => match v.as_u64().filter(|&n| n <= 5) {
            Some(n) => Some(n as usize),
            None => {
                return Err(ApiError::invalid(
                    "'logprobs' must be an integer from 0 to 5",
                    Some("logprobs"),
                ))
            }
        },
    };
    let logprobs = match (kind, req.top_logprobs) {
        (Kind::Chat, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::invalid(
                "'top_logprobs' must be between 0 and 20",
                Some("top_logprobs"),
            ))
        }
        (Kind::Chat, Some(_)) if logprobs.is_none() => {
            return Err(ApiError::invalid(
                "'top_logprobs' needs 'logprobs' set to true",
                Some("top_logprobs"),
            ))
        }
        (Kind::Chat, Some(n)) => Some(n as usize),
        _ => logprobs,
    };
    let opts = req.options(logprobs)?;
    let encode = |text: &str, special: bool| {
        tok.encode(text, special)
            .map_err(|e| ApiError::server(e.to_string()))
    };
    let prompt = match kind {
        Kind::Chat => {
            let Some(messages) = &req.messages else {
                return Err(ApiError::invalid(
                    "'messages' is required",
                    Some("messages"),
                ));
            };
            if messages.is_empty() {
                return Err(ApiError::invalid(
                    "'messages' must hold at least one message",
                    Some("messages"),
                ));
            }
            let mut turns = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let role = match m.role.as_str() {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    r => {
                        return Err(ApiError::invalid(
                            format!(
                                "role '{r}' is not supported (system, developer, user, assistant)"
                            ),
                            Some(&format!("messages[{i}].role")),
                        ))
                    }
                };
                turns.push(Message::new(role, &message_text(m, i)?));
            }
            let template = template.as_ref().as_ref().map_err(|e| {
                ApiError::invalid(format!("'{}' cannot chat: {e}", model.name), Some("model"))
            })?;
            let text = template
                .render(&turns, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            encode(&text, false)?
        }
        Kind::Completion => match &req.prompt {
            None => return Err(ApiError::invalid("'prompt' is required", Some("prompt"))),
            Some(Prompt::Text(t)) => encode(t, true)?,
            Some(Prompt::Texts(ts)) if ts.len() == 1 => encode(&ts[0], true)?,
            Some(Prompt::Texts(_)) => {
                return Err(ApiError::invalid(
                    "one prompt per request is supported",
                    Some("prompt"),
                ))
            }
            Some(Prompt::Tokens(ids)) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                    return Err(ApiError::invalid(
                        format!(
                            "token id {bad} is outside the vocabulary ({} tokens)",
                            tok.vocab_size()
                        ),
                        Some("prompt"),
                    ));
                }
                ids.clone()
            }
        },
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "the prompt has no tokens",
            Some(kind.prompt_param()),
        ));
    }
    if prompt.len() > engine.context {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens, but the prompt has {} tokens",
                engine.context,
                prompt.len()
            ),
            Some(kind.prompt_param()),
        )
        .with_code("context_length_exceeded"));
    }
    // Compiled last: a request refused for a cheaper reason never builds a grammar.
    let constraint = match req.schema()? {
        None => None,
        Some(schema) => {
            let g = grammars
                .get_or_init(|| {
                    slm::generate::Grammars::new(tok)
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                })
                .as_ref()
                .map_err(|e| {
                    ApiError::invalid(format!("'{}': {e}", model.name), Some("response_format"))
                })?;
            Some(
                g.json_schema(&schema)
                    .map_err(|e| ApiError::invalid(e.to_string(), Some("response_format")))?,
            )
        }
    };
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok((
        Prepared {
            kind,
            model: model.name.clone(),
            prompt,
            opts,
            stream: req.stream.unwrap_or(false),
            include_usage,
            reuse_prefix: req.cache_prompt.unwrap_or(true),
            constraint,
            id: new_id(kind.id_prefix()),
            created: crate::now(),
        },
        model,
    ))
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false)
        .ok()
        .or_else(|| tok.id_to_token(id))
        .unwrap_or_default()
}

/// Logprobs as OpenAI's chat API shapes them, one entry per token.
fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let mut v = entry(lp.id, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    v
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

/// Builds the JSON of each answer shape for one request.
struct Shape<'a> {
    p: &'a Prepared,
    tok: &'a Tokenizer,
}

impl Shape<'_> {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.p.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        let mut v = json!({
            "id": self.p.id,
            "object": self.object(chunk),
            "created": self.p.created,
            "model": self.p.model,
            "system_fingerprint": concat!("slm-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        });
        if chunk && self.p.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn logprobs(&self, lps: &[&TokenLogprob], text_offset: usize) -> Value {
        if lps.is_empty() {
            return Value::Null;
        }
        match self.p.kind {
            Kind::Chat => {
                json!({"content": lps.iter().map(|l| chat_logprob(self.tok, l)).collect::<Vec<_>>()})
            }
            Kind::Completion => {
                let mut offset = text_offset;
                let mut offsets = Vec::new();
                let tokens: Vec<String> = lps
                    .iter()
                    .map(|l| {
                        let t = token_text(self.tok, l.id);
                        offsets.push(offset);
                        offset += t.len();
                        t
                    })
                    .collect();
                let top: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let m: serde_json::Map<String, Value> = l
                            .top
                            .iter()
                            .map(|&(id, lp)| (token_text(self.tok, id), json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "tokens": tokens,
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// A streamed piece of text (`role` on the first chat chunk).
    fn chunk(&self, text: &str, role: bool, lps: &[&TokenLogprob], offset: usize) -> Value {
        let choice = match self.p.kind {
            Kind::Chat => {
                let mut delta = json!({"content": text});
                if role {
                    delta["role"] = json!("assistant");
                }
                json!({"index": 0, "delta": delta, "logprobs": self.logprobs(lps, offset), "finish_reason": null})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": self.logprobs(lps, offset), "finish_reason": null})
            }
        };
        self.envelope(true, json!([choice]))
    }

    fn last_chunk(&self, reason: StopReason) -> Value {
        let choice = match self.p.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)})
            }
            Kind::Completion => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(reason)})
            }
        };
        self.envelope(true, json!([choice]))
    }

    fn usage_chunk(&self, f: &Finished) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage(f);
        v
    }

    fn whole(&self, text: &str, lps: &[&TokenLogprob], f: &Finished) -> Value {
        let choice = match self.p.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": self.logprobs(lps, 0),
                "finish_reason": finish_reason(f.reason),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": self.logprobs(lps, 0),
                "finish_reason": finish_reason(f.reason),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(f);
        v
    }
}

pub(super) async fn chat(State(s): St, RequestBody(body): RequestBody) -> Response {
    generate(s, body, Kind::Chat).await
}

pub(super) async fn completions(State(s): St, RequestBody(body): RequestBody) -> Response {
    generate(s, body, Kind::Completion).await
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

async fn generate(s: Arc<AppState>, body: Bytes, kind: Kind) -> Response {
    let arrived = Instant::now();
    let (mut p, model) = match prepare(&s, &body, kind) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let Served::Causal { engine, tok, .. } = &model.served else {
        return ApiError::server("internal: not a causal model").into_response();
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: p.prompt.clone(),
        opts: p.opts.clone(),
        events: tx,
        arrived,
        reuse_prefix: p.reuse_prefix,
        constraint: p.constraint.take(),
    };
    match engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Busy { running, queued }) => {
            s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return ApiError::busy(running, queued).into_response();
        }
        Err(Refused::Stopped) => {
            return ApiError::unavailable("the model's engine has stopped").into_response()
        }
    }
    s.metrics
        .prompt_tokens
        .fetch_add(p.prompt.len(), Ordering::Relaxed);
    let tok = tok.clone();
    if !p.stream {
        let mut text = String::new();
        let mut lps = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { text: t, logprob } => {
                    text.push_str(&t);
                    lps.extend(logprob);
                }
                Event::Done(f) => {
                    s.metrics
                        .cached_tokens
                        .fetch_add(f.cached_tokens, Ordering::Relaxed);
                    s.metrics.latency.observe(arrived.elapsed().as_secs_f64());
                    let shape = Shape { p: &p, tok: &tok };
                    return Json(shape.whole(&text, &lps.iter().collect::<Vec<_>>(), &f))
                        .into_response();
                }
                Event::Failed(e) => return ApiError::server(e).into_response(),
            }
        }
        return ApiError::server("the engine ended the request without an answer").into_response();
    }
    // Streaming: role first, then a chunk per token with text, the finish reason, the usage
    // (when asked), and `[DONE]`.
    let state = s.clone();
    let stream = async_stream(move |out| async move {
        let shape = Shape { p: &p, tok: &tok };
        if p.kind == Kind::Chat && out.send(sse(&shape.chunk("", true, &[], 0))).is_err() {
            return;
        }
        let mut offset = 0;
        while let Some(ev) = rx.recv().await {
            let bytes = match ev {
                Event::Token { text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let lps: Vec<&TokenLogprob> = logprob.iter().collect();
                    let b = sse(&shape.chunk(&text, false, &lps, offset));
                    offset += text.len();
                    b
                }
                Event::Done(f) => {
                    state
                        .metrics
                        .cached_tokens
                        .fetch_add(f.cached_tokens, Ordering::Relaxed);
                    state
                        .metrics
                        .latency
                        .observe(arrived.elapsed().as_secs_f64());
                    let mut b = sse(&shape.last_chunk(f.reason)).to_vec();
                    if p.include_usage {
                        b.extend_from_slice(&sse(&shape.usage_chunk(&f)));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    let _ = out.send(Bytes::from(b));
                    return;
                }
                Event::Failed(e) => {
                    // Headers are sent: the error travels as an event, as OpenAI streams do.
                    let _ = out.send(sse(&ApiError::server(e).body()));
                    return;
                }
            };
            if out.send(bytes).is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::server(e.to_string()).into_response())
}

/// A body stream fed by a task: the task ends (and drops the engine's receiver, which frees
/// the slot) as soon as the client is gone and a send fails.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(mpsc::UnboundedSender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(f(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}
