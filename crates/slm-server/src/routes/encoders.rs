//! `/v1/embeddings` and `/v1/rerank`: encoders run on tokio's blocking pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{pick, RequestBody, St};
use crate::api::{self, ApiError, EmbeddingsRequest, RerankRequest};
use crate::{AppState, Served};

pub(super) async fn embeddings(State(s): St, RequestBody(body): RequestBody) -> Response {
    answer(embed(&s, &body).await)
}

pub(super) async fn rerank(State(s): St, RequestBody(body): RequestBody) -> Response {
    answer(rank(&s, &body).await)
}

fn answer(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The encoder a request names, with its served name; a causal model is a 400 saying `needs`.
fn encoder(
    s: &AppState,
    name: Option<&str>,
    needs: &str,
) -> Result<(Arc<slm::encode::Encoder>, String), ApiError> {
    let model = pick(s, name)?;
    match &model.served {
        Served::Encoder(enc) => Ok((enc.clone(), model.name.clone())),
        Served::Causal { .. } => Err(ApiError::invalid(
            format!("'{}' is a text generator; {needs}", model.name),
            Some("model"),
        )),
    }
}

/// Runs an encoder on tokio's blocking pool, so the HTTP workers keep answering meanwhile.
async fn blocking(
    what: &str,
    f: impl FnOnce() -> Result<Value, ApiError> + Send + 'static,
) -> Result<Value, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::server(format!("the {what} task failed: {e}")))?
}

async fn embed(s: &Arc<AppState>, body: &[u8]) -> Result<Value, ApiError> {
    let req: EmbeddingsRequest = api::parse(body)?;
    let (enc, name) = encoder(
        s,
        req.model.as_deref(),
        "embeddings need an embedding model",
    )?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                format!("'encoding_format' must be 'float' or 'base64', got '{f}'"),
                Some("encoding_format"),
            ))
        }
    };
    let texts = req.input.into_vec();
    if texts.is_empty() || texts.len() > 2048 {
        return Err(ApiError::invalid(
            "'input' must hold 1 to 2048 texts",
            Some("input"),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            format!("input {i} is empty"),
            Some("input"),
        ));
    }
    let dimensions = req.dimensions;
    let s = s.clone();
    blocking("embedding", move || {
        let pairs: Vec<(&str, Option<&str>)> = texts.iter().map(|t| (t.as_str(), None)).collect();
        let (inputs, _) = enc.prepare(&pairs, enc.max_len, false).map_err(|e| {
            ApiError::invalid(e.to_string(), Some("input")).with_code("context_length_exceeded")
        })?;
        let tokens: usize = inputs.iter().map(|i| i.ids.len()).sum();
        let vectors = enc
            .embed(&inputs, 32, enc.pooling)
            .map_err(|e| ApiError::server(e.to_string()))?;
        if let Some(d) = dimensions.filter(|&d| vectors.first().is_some_and(|v| v.len() != d)) {
            return Err(ApiError::invalid(
                format!("'{name}' gives {} dimensions, not {d}", vectors[0].len()),
                Some("dimensions"),
            ));
        }
        s.metrics.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    })
    .await
}

async fn rank(s: &Arc<AppState>, body: &[u8]) -> Result<Value, ApiError> {
    let req: RerankRequest = api::parse(body)?;
    let (enc, name) = encoder(
        s,
        req.model.as_deref(),
        "reranking needs a cross-encoder or an embedding model",
    )?;
    if req.documents.is_empty() || req.documents.len() > 2048 {
        return Err(ApiError::invalid(
            "'documents' must hold 1 to 2048 documents",
            Some("documents"),
        ));
    }
    if req.query.is_empty() {
        return Err(ApiError::invalid("'query' is empty", Some("query")));
    }
    let s = s.clone();
    blocking("rerank", move || {
        let docs: Vec<&str> = req.documents.iter().map(|d| d.text()).collect();
        let (scores, tokens) = enc
            .rerank(&req.query, &docs, 32)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("model")))?;
        s.metrics.prompt_tokens.fetch_add(tokens, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.truncate(req.top_n.unwrap_or(order.len()));
        let results: Vec<Value> = order
            .iter()
            .map(|&i| {
                let mut r = json!({"index": i, "relevance_score": scores[i]});
                if req.return_documents.unwrap_or(false) {
                    r["document"] = json!({"text": docs[i]});
                }
                r
            })
            .collect();
        Ok(json!({
            "object": "list",
            "model": name,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    })
    .await
}
