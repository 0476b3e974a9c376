//! The HTTP endpoints: the router, the API key, request counting, models, health and metrics;
//! generation and the encoders in their own files.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::{AppState, Model};

pub(super) type St = State<Arc<AppState>>;

/// Bodies up to this size are read (2048 embedding inputs fit); a larger one is a 413.
const BODY_LIMIT: usize = 16 << 20;

/// A request body; one that is too large or cannot be read is refused with an OpenAI error
/// object, as every other refusal is.
pub(super) struct RequestBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RequestBody)
            .map_err(|e| ApiError {
                status: e.status(),
                message: format!("The request body could not be read: {}", e.body_text()),
                kind: "invalid_request_error",
                param: None,
                code: None,
            })
    }
}

mod encoders;
mod generate;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/embeddings", post(encoders::embeddings))
        .route("/v1/rerank", post(encoders::rerank))
        .route("/rerank", post(encoders::rerank))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        // Health checks need no key, as load balancers probe without one.
        .route("/health", get(health))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn auth(State(s): St, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Counts every answer by endpoint and status.
async fn count(State(s): St, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let res = next.run(req).await;
    let known = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/models",
        "/metrics",
        "/health",
    ];
    let endpoint = if known.contains(&path.as_str()) {
        path.as_str()
    } else {
        "other"
    };
    s.metrics.request(endpoint, res.status().as_u16());
    res
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): St) -> Json<Value> {
    let data: Vec<Value> = s
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "slm"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(s): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(s.queued()),
    )
        .into_response()
}

pub(super) fn pick<'a>(s: &'a AppState, name: Option<&str>) -> Result<&'a Model, ApiError> {
    match name {
        // One model: it is the default, whatever the request names.
        _ if s.models.len() == 1 => Ok(&s.models[0]),
        Some(n) => s
            .models
            .iter()
            .find(|m| m.name == n)
            .ok_or_else(|| ApiError::unknown_model(n, &s.names())),
        None => Err(ApiError::invalid(
            format!(
                "'model' is required: this server has {}",
                s.names().join(", ")
            ),
            Some("model"),
        )),
    }
}
