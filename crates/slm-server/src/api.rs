//! The OpenAI wire format: request bodies, their checks, and error objects.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use slm::generate::{GenerateOptions, SamplingParams};

/// An OpenAI error object with its HTTP status: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unknown_model(name: &str, known: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model '{name}' does not exist; this server has: {}",
                known.join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided; pass it as 'Authorization: Bearer KEY'".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn busy(running: usize, queued: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "The server is busy ({running} requests running, {queued} queued); retry later"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("There is no endpoint {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON body, naming the field that has the wrong type.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(
                format!("We could not parse the JSON body of your request: {inner}"),
                None,
            );
        }
        // serde names a missing field only in its message.
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next().map(str::to_string));
        let param = match (path.as_str(), missing) {
            (".", Some(m)) => Some(m),
            (".", None) => None,
            (p, Some(m)) => Some(format!("{p}.{m}")),
            (p, None) => Some(p.to_string()),
        };
        ApiError::invalid(
            format!(
                "Invalid request body{}: {inner}",
                param
                    .as_ref()
                    .map(|p| format!(" at '{p}'"))
                    .unwrap_or_default()
            ),
            param.as_deref(),
        )
    })
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt: text, texts, or token ids.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Everything `/v1/chat/completions` and `/v1/completions` read (each checks what it needs).
/// Fields OpenAI defines and slm does not use are ignored, as clients send many.
#[derive(Deserialize, Debug, Default)]
#[serde(default)]
pub struct GenRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// llama.cpp's extensions, as llama-server takes them.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// A bool for chat, a count for completions.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    pub ignore_eos: Option<bool>,
    /// llama.cpp's switch for reusing a cached prompt prefix (default on).
    pub cache_prompt: Option<bool>,
}

fn range(v: Option<f64>, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
            Some(name),
        )
        .with_code("invalid_value")),
        v => Ok(v.map(|x| x as f32)),
    }
}

impl GenRequest {
    /// The generation options, checked; `logprobs` is the number of alternatives wanted.
    pub fn options(&self, logprobs: Option<usize>) -> Result<GenerateOptions, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                format!("'n' must be 1 (one choice per request), got {n}"),
                Some("n"),
            )
            .with_code("invalid_value"));
        }
        let (limit, name) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => (Some(n), "max_completion_tokens"),
            (None, n) => (n, "max_tokens"),
        };
        if let Some(n) = limit.filter(|&n| n < 1) {
            return Err(ApiError::invalid(
                format!("'{name}' must be at least 1, got {n}"),
                Some(name),
            )
            .with_code("invalid_value"));
        }
        let defaults = SamplingParams::default();
        let temperature = range(self.temperature, "temperature", 0.0, 2.0)?;
        let top_p = range(self.top_p, "top_p", 0.0, 1.0)?;
        let min_p = range(self.min_p, "min_p", 0.0, 1.0)?;
        let presence = range(self.presence_penalty, "presence_penalty", -2.0, 2.0)?;
        let frequency = range(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
        let repeat = range(self.repeat_penalty, "repeat_penalty", 0.0, 10.0)?;
        if repeat == Some(0.0) {
            return Err(ApiError::invalid(
                "'repeat_penalty' must be above 0",
                Some("repeat_penalty"),
            ));
        }
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    format!("'top_k' must be 0 (off) or more, got {k}"),
                    Some("top_k"),
                ))
            }
            k => k.map(|k| k as usize),
        };
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                format!("'stop' takes at most 4 sequences, got {}", stop.len()),
                Some("stop"),
            ));
        }
        Ok(GenerateOptions {
            // Without a limit, the context is: the engine stops there.
            max_tokens: limit.map_or(usize::MAX, |n| n as usize),
            sampling: SamplingParams {
                temperature: temperature.unwrap_or(defaults.temperature),
                top_k: top_k.unwrap_or(defaults.top_k),
                top_p: top_p.unwrap_or(defaults.top_p),
                min_p: min_p.unwrap_or(defaults.min_p),
                repeat_penalty: repeat.unwrap_or(defaults.repeat_penalty),
                presence_penalty: presence.unwrap_or(0.0),
                frequency_penalty: frequency.unwrap_or(0.0),
                seed: self.seed.map_or(defaults.seed, |s| s as u64),
                ..defaults
            },
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            cancel: None,
            logprobs,
        })
    }

    /// The JSON schema OpenAI's `response_format` asks for: none for `text`, any object for
    /// `json_object`, `json_schema.schema` for `json_schema`.
    pub fn schema(&self) -> Result<Option<Value>, ApiError> {
        let Some(f) = self.response_format.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = |m: &str, p: &str| Err(ApiError::invalid(m, Some(p)));
        match f.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(serde_json::json!({"type": "object"}))),
            Some("json_schema") => match f.pointer("/json_schema/schema") {
                Some(s) if s.is_object() => Ok(Some(s.clone())),
                Some(_) => bad(
                    "'response_format.json_schema.schema' must be an object",
                    "response_format.json_schema.schema",
                ),
                None => bad(
                    "'response_format.json_schema.schema' is required",
                    "response_format.json_schema.schema",
                ),
            },
            Some(t) => bad(
                &format!("response_format type '{t}' is not one of text, json_object, json_schema"),
                "response_format.type",
            ),
            None => bad("'response_format.type' is required", "response_format.type"),
        }
    }
}

#[derive(Deserialize, Debug)]
pub struct EmbeddingsRequest {
    pub model: Option<String>,
    pub input: OneOrMany,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// A document to rerank: text, or Cohere's and Jina's `{"text": ...}`.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    pub fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t } => t,
        }
    }
}

/// `/v1/rerank` as llama.cpp, Jina and Cohere shape it.
#[derive(Deserialize, Debug)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<Document>,
    #[serde(default)]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub return_documents: Option<bool>,
}
