//! The Anthropic Messages API: a message with text (and a `tool_use` when
//! the request offers tools and has no tool result yet), streamed as its
//! documented events when asked; token counting. Usage reports cache reads
//! and writes. `anthropic-version` is required, as Anthropic requires it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::sse::{event, stream};
use crate::{Mock, Shape, common};

/// 12 input tokens in all: 5 uncached, 4 read from the cache, 3 written.
fn usage(output: u64) -> Value {
    json!({"input_tokens": 5, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 3, "output_tokens": output})
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
}

/// What every Anthropic call checks first: the body, or the error answer.
/// (The key is recorded, not required: tests check what was sent.)
#[allow(clippy::result_large_err)] // Answered at once, never carried around.
fn check(headers: &HeaderMap, body: &Bytes) -> Result<Value, Response> {
    if !headers.contains_key("anthropic-version") {
        return Err(error(StatusCode::BAD_REQUEST, "invalid_request_error", "anthropic-version header is required"));
    }
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("invalid JSON: {e}")))
}

/// The first tool offered, unless the last turn carries a tool result.
fn tool_to_use(req: &Value) -> Option<String> {
    let name = req["tools"][0]["name"].as_str()?;
    let last = req["messages"].as_array().and_then(|m| m.last())?;
    let answered = last["content"].as_array().is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"));
    (!answered).then(|| name.to_string())
}

const INPUT: [&str; 2] = ["{\"location\": ", "\"Paris\"}"];

pub async fn messages(State(m): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(fault) = common(&m, Shape::Anthropic).await {
        return fault;
    }
    let req = match check(&headers, &body) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if req["max_tokens"].as_u64().is_none() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens: Field required");
    }
    let model = req["model"].as_str().unwrap_or_default().to_string();
    *m.last_model.lock().unwrap_or_else(|p| p.into_inner()) = model.clone();
    let id = format!("msg_mock{}", fastrand::u64(..));
    let text = format!("Hello from {}.", m.id);
    let tool = tool_to_use(&req);
    if req["stream"].as_bool() != Some(true) {
        let mut content = vec![json!({"type": "text", "text": text})];
        if let Some(name) = &tool {
            content.push(json!({"type": "tool_use", "id": "toolu_mock", "name": name, "input": {"location": "Paris"}}));
        }
        let stop = if tool.is_some() { "tool_use" } else { "end_turn" };
        return axum::Json(
            json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": null, "usage": usage(9)}),
        )
        .into_response();
    }
    let chunks = m.stream_chunks.load(Ordering::Relaxed).max(1);
    let mut events = vec![
        event(
            &json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(1)}}),
        ),
        event(&json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        event(&json!({"type": "ping"})),
    ];
    for i in 0..chunks {
        events.push(event(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("tok{i} ")}})));
    }
    events.push(event(&json!({"type": "content_block_stop", "index": 0})));
    if let Some(name) = &tool {
        events.push(event(&json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_mock", "name": name, "input": {}}})));
        for piece in INPUT {
            events.push(event(&json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}})));
        }
        events.push(event(&json!({"type": "content_block_stop", "index": 1})));
    }
    let stop = if tool.is_some() { "tool_use" } else { "end_turn" };
    events.push(event(&json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": chunks}})));
    events.push(event(&json!({"type": "message_stop"})));
    let error = event(&json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
    stream(&m, events, error)
}

/// `POST /v1/messages/count_tokens`: a character count over four.
pub async fn count_tokens(State(m): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(fault) = common(&m, Shape::Anthropic).await {
        return fault;
    }
    let req = match check(&headers, &body) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let chars = req["messages"].to_string().len() + req["system"].to_string().len();
    axum::Json(json!({"input_tokens": chars / 4 + 1})).into_response()
}
