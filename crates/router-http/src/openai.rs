//! The OpenAI-compatible door: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`.
//!
//! It only parses: the request becomes the same [`InferenceRequest`] as the
//! native door's and goes through the same `router_core::process` (limits,
//! routing, failover, usage, audit, metrics). Errors use OpenAI's shape and
//! status codes. The key comes as `Authorization: Bearer` or `X-API-Key`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use router_core::InferenceRequest;
use router_core::auth::{self, Principal};
use router_providers::Operation;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::ApiError;
use crate::{Shape, SharedState, credentials, read_body, respond};

/// Chat, completions, embeddings and the Responses API (passed through to
/// OpenAI and Azure backends).
pub(crate) async fn handle(state: SharedState, request: Request, op: Operation) -> Response {
    // The request taken apart, not its headers copied (as the `HeaderMap`
    // extractor would).
    // The head is dropped once read: its values share the connection's read
    // buffer, which would otherwise be held for the whole upstream call.
    let request = {
        let (parts, body) = request.into_parts();
        match accept(&state, &parts.headers, body, op).await {
            Ok(r) => r,
            Err(e) => return e.openai(None),
        }
    };
    let span =
        tracing::info_span!("request", request_id = &*request.request_id, organization_id = &*request.organization_id);
    let shape = if op == Operation::Responses { Shape::Responses } else { Shape::OpenAi };
    respond(router_core::process(&state.core, request).instrument(span).await, shape)
}

async fn accept(
    state: &SharedState,
    headers: &HeaderMap,
    body: Body,
    op: Operation,
) -> Result<InferenceRequest, ApiError> {
    let bytes = read_body(body, headers, state.settings.max_body_bytes, state.settings.body_read_timeout).await?;
    let principal = auth::authenticate(&state.core.config.load(), credentials::bearer_or_api_key(headers))?;
    parse(op, bytes, principal, headers)
}

/// Checks what the router relies on and what SDK users most often get wrong;
/// everything else is the backend's to judge. The parsed body travels with
/// the request, so a provider that rewrites it does not parse it again.
pub fn parse(
    op: Operation,
    body: Bytes,
    principal: Principal,
    headers: &HeaderMap,
) -> Result<InferenceRequest, ApiError> {
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = &v else {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".into()));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => Arc::from(m.as_str()),
        Some(_) => return Err(ApiError::InvalidRequest("`model` must be a string of 1-256 characters".into())),
        None => return Err(ApiError::InvalidRequest("you must provide a model parameter (`model`)".into())),
    };
    // The Responses API can take its input from a stored prompt or
    // conversation, so only the model is required there.
    let required = match op {
        Operation::Chat => Some("messages"),
        Operation::Completions => Some("prompt"),
        Operation::Embeddings => Some("input"),
        _ => None,
    };
    match (op, required.map(|r| (r, obj.get(r)))) {
        (_, Some((required, None | Some(Value::Null)))) => {
            return Err(ApiError::InvalidRequest(format!("missing required parameter `{required}`")));
        }
        (Operation::Chat, Some((_, Some(m)))) if !m.is_array() => {
            return Err(ApiError::InvalidRequest("`messages` must be an array".into()));
        }
        _ => {}
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::InvalidRequest("`stream` must be a boolean".into())),
    };
    if stream && op == Operation::Embeddings {
        return Err(ApiError::InvalidRequest("embeddings cannot be streamed".into()));
    }
    if !matches!(obj.get("stream_options"), None | Some(Value::Null | Value::Object(_))) {
        return Err(ApiError::InvalidRequest("`stream_options` must be an object".into()));
    }
    let request_id = crate::request_id_header(headers)?;
    Ok(InferenceRequest {
        request_id,
        organization_id: principal.organization_id,
        model,
        op,
        body,
        json: Some(v),
        stream,
        headers: Default::default(),
        key: principal.key,
    })
}

/// The SSE event that tells a Responses client the stream broke.
pub fn responses_error_event(detail: &str) -> Bytes {
    let body = json!({
        "type": "error",
        "code": "stream_interrupted",
        "message": format!("the backend's stream broke midway: {detail}"),
        "param": null,
    });
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

/// The SSE event that tells an OpenAI client the stream broke.
pub fn stream_error_event(detail: &str) -> Bytes {
    let body = json!({"error": {
        "message": format!("the backend's stream broke midway: {detail}"),
        "type": "server_error",
        "param": null,
        "code": "stream_interrupted",
    }});
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

/// `GET /v1/models`: the models the caller's organization can route to: its
/// policies' models, and with the default route, every model alias of the
/// backends that serve this door; for a managed key with allowed models,
/// only those.
pub async fn models(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let snapshot = state.core.config.load_full();
    let principal = match auth::authenticate(&snapshot, credentials::bearer_or_api_key(&headers)) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).openai(None),
    };
    let org = &*principal.organization_id;
    let mut names: BTreeSet<&str> =
        snapshot.state.policies.keys().filter(|(o, _)| o == org).map(|(_, m)| m.as_str()).collect();
    if snapshot.state.default_route {
        for b in snapshot.backend_list.iter().filter(|b| b.can_serve(Operation::Chat)) {
            names.extend(b.target.models.keys().map(String::as_str));
        }
    }
    let data: Vec<Value> = names
        .into_iter()
        .filter(|m| principal.key.as_ref().is_none_or(|k| k.allows(m)))
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "api-router"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
