//! The Anthropic door: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, in the Anthropic Messages API's shape.
//!
//! The key comes as `x-api-key` or `Authorization: Bearer` (Anthropic's
//! clients send one or the other). `anthropic-version` and `anthropic-beta`
//! travel with the request for Anthropic backends. Like every door it only
//! parses: the request goes through the same pipeline (limits, routing and
//! failover, translation for OpenAI-shaped backends, usage, audit). Errors
//! leave in Anthropic's shape: `{"type":"error","error":{"type","message"}}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use router_core::InferenceRequest;
use router_core::auth::{self, Principal};
use router_providers::Operation;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::ApiError;
use crate::{Shape, SharedState, credentials, read_body, respond};

/// Client headers that go on to Anthropic backends.
const FORWARDED: [&str; 2] = ["anthropic-version", "anthropic-beta"];

/// Messages and token counting.
pub(crate) async fn handle(state: SharedState, request: Request, op: Operation) -> Response {
    // The request taken apart, not its headers copied (as the `HeaderMap`
    // extractor would).
    // The head is dropped once read: its values share the connection's read
    // buffer, which would otherwise be held for the whole upstream call.
    let request = {
        let (parts, body) = request.into_parts();
        match accept(&state, &parts.headers, body, op).await {
            Ok(r) => r,
            Err(e) => return e.anthropic(None),
        }
    };
    let span =
        tracing::info_span!("request", request_id = &*request.request_id, organization_id = &*request.organization_id);
    respond(router_core::process(&state.core, request).instrument(span).await, Shape::Anthropic)
}

async fn accept(
    state: &SharedState,
    headers: &HeaderMap,
    body: Body,
    op: Operation,
) -> Result<InferenceRequest, ApiError> {
    let bytes = read_body(body, headers, state.settings.max_body_bytes, state.settings.body_read_timeout).await?;
    let key = credentials::api_key(headers).filter(|k| !k.is_empty()).or_else(|| credentials::bearer(headers));
    let principal = auth::authenticate(&state.core.config.load(), key)?;
    parse(op, bytes, principal, headers)
}

/// Checks what the router relies on and what the API requires; everything
/// else is the backend's (or the translation's) to judge.
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
        Some(_) => return Err(ApiError::InvalidRequest("model: must be a string of 1-256 characters".into())),
        None => return Err(ApiError::InvalidRequest("model: Field required".into())),
    };
    match obj.get("messages") {
        Some(Value::Array(_)) => {}
        Some(_) => return Err(ApiError::InvalidRequest("messages: must be an array".into())),
        None => return Err(ApiError::InvalidRequest("messages: Field required".into())),
    }
    if op == Operation::Messages {
        match obj.get("max_tokens") {
            Some(n) if n.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => return Err(ApiError::InvalidRequest("max_tokens: must be an integer of at least 1".into())),
            None => return Err(ApiError::InvalidRequest("max_tokens: Field required".into())),
        }
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::InvalidRequest("stream: must be a boolean".into())),
    };
    if stream && op == Operation::CountTokens {
        return Err(ApiError::InvalidRequest("stream: token counting does not stream".into()));
    }
    let request_id = crate::request_id_header(headers)?;
    let mut forwarded = HeaderMap::new();
    for name in FORWARDED {
        // Copied: the client's values share the connection's read buffer,
        // which the request would otherwise hold for its whole upstream call.
        if let Some(value) = headers.get(name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
            forwarded.insert(name, value);
        }
    }
    Ok(InferenceRequest {
        request_id,
        organization_id: principal.organization_id,
        model,
        op,
        body,
        json: Some(v),
        stream,
        headers: forwarded,
        key: principal.key,
    })
}

/// The event that tells an Anthropic client its stream broke.
pub fn stream_error_event(detail: &str) -> Bytes {
    let body = json!({"type": "error", "error": {
        "type": "api_error",
        "message": format!("the backend's stream broke midway: {detail}"),
    }});
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(op: Operation, v: Value) -> Result<InferenceRequest, ApiError> {
        let mut h = HeaderMap::new();
        h.insert("anthropic-beta", "tools-2024-05-16".parse().unwrap());
        h.insert("x-other", "dropped".parse().unwrap());
        parse(op, Bytes::from(v.to_string()), Principal::organization("o"), &h)
    }

    #[test]
    fn what_the_messages_api_requires_is_checked() {
        let ok = parse_json(Operation::Messages, json!({"model": "m", "max_tokens": 5, "messages": []})).unwrap();
        assert_eq!(ok.headers.len(), 1, "only the anthropic headers travel");
        assert_eq!(ok.headers["anthropic-beta"], "tools-2024-05-16");
        let e = parse_json(Operation::Messages, json!({"model": "m", "messages": []})).unwrap_err();
        assert!(e.message().contains("max_tokens"), "{e:?}");
        let e = parse_json(Operation::Messages, json!({"model": "m", "max_tokens": 0, "messages": []})).unwrap_err();
        assert!(e.message().contains("max_tokens"), "{e:?}");
        assert!(parse_json(Operation::CountTokens, json!({"model": "m", "messages": []})).is_ok());
        let e = parse_json(Operation::CountTokens, json!({"model": "m", "messages": [], "stream": true})).unwrap_err();
        assert!(e.message().contains("stream"));
        assert!(matches!(parse_json(Operation::Messages, json!({"model": 5})), Err(ApiError::InvalidRequest(_))));
        assert!(matches!(
            parse(Operation::Messages, Bytes::from_static(b"{oops"), Principal::organization("o"), &HeaderMap::new()),
            Err(ApiError::InvalidJson(_))
        ));
    }
}
