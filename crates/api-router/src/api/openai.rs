//! The OpenAI-compatible door: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`.
//!
//! It only parses: the request becomes the same [`InferenceRequest`] as the
//! native door's and goes through the same [`pipeline::process`] (limits,
//! routing, failover, usage, audit, metrics). Errors use OpenAI's shape and
//! status codes. The key comes as `Authorization: Bearer` or `X-API-Key`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::api::SharedState;
use crate::api::auth;
use crate::api::error::ApiError;
use crate::config_service::BackendKind;
use crate::pipeline::{self, Door, InferenceRequest};

pub async fn chat_completions(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, headers, body, Door::Chat).await
}

pub async fn completions(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, headers, body, Door::Completions).await
}

pub async fn embeddings(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    handle(state, headers, body, Door::Embeddings).await
}

async fn handle(state: SharedState, headers: HeaderMap, body: Body, door: Door) -> Response {
    let bytes = match pipeline::read_body(body, &headers, state.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return door.error(e, None),
    };
    let organization_id = match auth::organization_bearer_or_header(&state.config.load(), &headers) {
        Ok(org) => org,
        Err(e) => return door.error(e, None),
    };
    let request = match parse(door, bytes, organization_id, &headers) {
        Ok(r) => r,
        Err(e) => return door.error(e, None),
    };
    let span =
        tracing::info_span!("request", request_id = %request.request_id, organization_id = %request.organization_id);
    pipeline::process(&state, request).instrument(span).await
}

/// Checks what the router relies on and what SDK users most often get wrong;
/// everything else is the backend's to judge.
pub fn parse(
    door: Door,
    body: Bytes,
    organization_id: Arc<str>,
    headers: &HeaderMap,
) -> Result<InferenceRequest, ApiError> {
    let mut v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = &v else {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".into()));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => Arc::from(m.as_str()),
        Some(_) => return Err(ApiError::InvalidRequest("`model` must be a string of 1-256 characters".into())),
        None => return Err(ApiError::InvalidRequest("you must provide a model parameter (`model`)".into())),
    };
    let required = match door {
        Door::Chat => "messages",
        Door::Completions => "prompt",
        Door::Embeddings => "input",
        Door::Native => "payload",
    };
    match (door, obj.get(required)) {
        (_, None | Some(Value::Null)) => {
            return Err(ApiError::InvalidRequest(format!("missing required parameter `{required}`")));
        }
        (Door::Chat, Some(m)) if !m.is_array() => {
            return Err(ApiError::InvalidRequest("`messages` must be an array".into()));
        }
        _ => {}
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::InvalidRequest("`stream` must be a boolean".into())),
    };
    if stream && door == Door::Embeddings {
        return Err(ApiError::InvalidRequest("embeddings cannot be streamed".into()));
    }
    if !matches!(obj.get("stream_options"), None | Some(Value::Null | Value::Object(_))) {
        return Err(ApiError::InvalidRequest("`stream_options` must be an object".into()));
    }
    let request_id = match headers.get("x-request-id").and_then(|h| h.to_str().ok()) {
        Some(id) if pipeline::valid_request_id(id) => Arc::from(id),
        Some(_) => {
            return Err(ApiError::InvalidRequest(format!(
                "invalid X-Request-Id: use 1-{} letters, digits, '-', '_', '.' or ':'",
                pipeline::MAX_REQUEST_ID_LEN
            )));
        }
        None => pipeline::new_request_id(),
    };
    // A stream asks every backend for its usage (in the final chunk): added
    // once here, from this parse, rather than per attempt.
    let body = if stream && v["stream_options"]["include_usage"] != Value::Bool(true) {
        v["stream_options"]["include_usage"] = Value::Bool(true);
        serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body)
    } else {
        body
    };
    Ok(InferenceRequest { request_id, organization_id, model, body, door, stream })
}

/// `GET /v1/models`: the models the caller's organization can route to: its
/// policies' models, and with the default route, every model alias of the
/// OpenAI-compatible backends.
pub async fn models(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let snapshot = state.config.load_full();
    let org = match auth::organization_bearer_or_header(&snapshot, &headers) {
        Ok(org) => org,
        Err(e) => return e.into_openai_response(None),
    };
    let mut names: BTreeSet<&str> =
        snapshot.state.policies.keys().filter(|(o, _)| **o == *org).map(|(_, m)| m.as_str()).collect();
    if snapshot.state.default_route {
        for b in snapshot.backend_list.iter().filter(|b| b.kind == BackendKind::Openai) {
            names.extend(b.models.keys().map(String::as_str));
        }
    }
    let data: Vec<Value> = names
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "api-router"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
