//! The OpenAI shapes: chat completions (with tool calls when the request
//! offers tools), completions, embeddings, the Responses API, and the model
//! list (which also answers health checks, as OpenAI-compatible servers'
//! do). Azure's paths serve the same, after checking `api-key` and, on the
//! deployments form, `api-version`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::sse::{data, event, stream};
use crate::{Mock, Shape, common};

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// Usage in the chat shape; 4 of the 12 prompt tokens were cached.
fn usage(completion: u64) -> Value {
    json!({"prompt_tokens": 12, "completion_tokens": completion, "total_tokens": 12 + completion,
        "prompt_tokens_details": {"cached_tokens": 4}})
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    let err = json!({"error": {"message": format!("invalid JSON: {e}"), "type": "invalid_request_error", "param": null, "code": null}});
    (StatusCode::BAD_REQUEST, axum::Json(err)).into_response()
}

/// `GET /v1/models`: the model list, and the health check of the OpenAI kind.
pub async fn models(State(m): State<Arc<Mock>>) -> Response {
    m.health_checks.fetch_add(1, Ordering::Relaxed);
    if !m.healthy.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    axum::Json(json!({"object": "list", "data": [{"id": format!("{}-model", m.id), "object": "model", "created": 0, "owned_by": "mock"}]}))
        .into_response()
}

pub async fn openai(State(m): State<Arc<Mock>>, body: Bytes, kind: Kind) -> Response {
    if let Some(fault) = common(&m, Shape::OpenAi).await {
        return fault;
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(e),
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    *m.last_model.lock().unwrap_or_else(|p| p.into_inner()) = model.clone();
    let id = format!("mock-{}", fastrand::u64(..));
    match kind {
        Kind::Embeddings => {
            let n = req["input"].as_array().map(|a| a.len()).unwrap_or(1);
            let data: Vec<_> = (0..n)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}))
                .collect();
            axum::Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 5, "total_tokens": 5}}))
                .into_response()
        }
        Kind::Responses => responses(&m, &req, &id, &model),
        Kind::Chat | Kind::Completions => chat(&m, &req, &id, &model, kind),
    }
}

/// A tool call to the first tool offered, unless the conversation already
/// has its result.
fn tool_to_call(req: &Value) -> Option<String> {
    let name = req["tools"][0]["function"]["name"].as_str()?;
    let answered = req["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["role"] == "tool");
    (!answered).then(|| name.to_string())
}

const ARGUMENTS: [&str; 2] = ["{\"location\": ", "\"Paris\"}"];

fn chat(m: &Arc<Mock>, req: &Value, id: &str, model: &str, kind: Kind) -> Response {
    let text = format!("Hello from {}.", m.id);
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    let tool = if kind == Kind::Chat { tool_to_call(req) } else { None };
    if req["stream"].as_bool() != Some(true) {
        let choice = match (kind, &tool) {
            (Kind::Chat, Some(name)) => {
                json!({"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "call_mock", "type": "function", "function": {"name": name, "arguments": ARGUMENTS.concat()}}]}})
            }
            (Kind::Chat, None) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
            }
            _ => json!({"index": 0, "text": text, "finish_reason": "stop"}),
        };
        return axum::Json(
            json!({"id": id, "object": object, "created": 0, "model": model, "choices": [choice], "usage": usage(9)}),
        )
        .into_response();
    }
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk =
        |choice: Value| data(&json!({"id": id, "object": object, "created": 0, "model": model, "choices": [choice]}));
    let chunks = m.stream_chunks.load(Ordering::Relaxed).max(1);
    let mut events = Vec::new();
    match &tool {
        Some(name) => {
            let call =
                json!({"index": 0, "id": "call_mock", "type": "function", "function": {"name": name, "arguments": ""}});
            events.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [call]}, "finish_reason": null})));
            for piece in ARGUMENTS {
                events.push(chunk(json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, "finish_reason": null})));
            }
            events.push(chunk(json!({"index": 0, "delta": {}, "finish_reason": "tool_calls"})));
        }
        None => {
            for i in 0..chunks {
                let piece = format!("tok{i} ");
                let finish = if i + 1 == chunks { json!("stop") } else { Value::Null };
                events.push(chunk(if kind == Kind::Chat {
                    json!({"index": 0, "delta": {"content": piece}, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": piece, "finish_reason": finish})
                }));
            }
        }
    }
    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
        let completion = if tool.is_some() { 9 } else { chunks };
        events.push(data(&json!({"id": id, "object": object, "created": 0, "model": model, "choices": [], "usage": usage(completion)})));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let error = data(
        &json!({"error": {"message": "mock-backend injected a stream error", "type": "server_error", "param": null, "code": null}}),
    );
    stream(m, events, error)
}

/// The Responses API: a message with text; a stream of its documented events.
fn responses(m: &Arc<Mock>, req: &Value, id: &str, model: &str) -> Response {
    let text = format!("Hello from {}.", m.id);
    let usage = json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": format!("resp_{id}"), "object": "response", "created_at": 0, "status": status, "model": model,
            "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "usage": usage,
            "error": null, "incomplete_details": null, "instructions": null, "metadata": {}, "temperature": 1.0, "top_p": 1.0})
    };
    let message = |text: &str| {
        json!({"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    if req["stream"].as_bool() != Some(true) {
        return axum::Json(response("completed", json!([message(&text)]), usage)).into_response();
    }
    let chunks = m.stream_chunks.load(Ordering::Relaxed).max(1);
    let pieces: Vec<String> = (0..chunks).map(|i| format!("tok{i} ")).collect();
    let full: String = pieces.concat();
    let mut seq = 0;
    let mut ev = |mut v: Value| {
        v["sequence_number"] = json!(seq);
        seq += 1;
        event(&v)
    };
    let mut events = vec![
        ev(json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)})),
        ev(json!({"type": "response.output_item.added", "output_index": 0,
            "item": {"type": "message", "id": "msg_mock", "status": "in_progress", "role": "assistant", "content": []}})),
        ev(json!({"type": "response.content_part.added", "item_id": "msg_mock", "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}})),
    ];
    for piece in &pieces {
        events.push(ev(json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": piece})));
    }
    events.push(ev(json!({"type": "response.output_text.done", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "text": full})));
    events.push(ev(json!({"type": "response.output_item.done", "output_index": 0, "item": message(&full)})));
    let mut done = usage;
    done["output_tokens"] = json!(chunks);
    done["total_tokens"] = json!(12 + chunks);
    events.push(ev(
        json!({"type": "response.completed", "response": response("completed", json!([message(&full)]), done)}),
    ));
    let error = event(
        &json!({"type": "error", "code": "server_error", "message": "mock-backend injected a stream error", "param": null}),
    );
    stream(m, events, error)
}

/// Azure: the key must come as `api-key`.
fn azure_key(headers: &HeaderMap) -> Option<Response> {
    if headers.contains_key("api-key") {
        return None;
    }
    let body = json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}});
    Some((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response())
}

/// `/openai/deployments/{deployment}/{operation}?api-version=...`
pub async fn azure_deployment(
    State(m): State<Arc<Mock>>,
    Path((deployment, operation)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = azure_key(&headers) {
        return denied;
    }
    if !query.contains_key("api-version") {
        let body = json!({"error": {"code": "404", "message": "Resource not found (no api-version)"}});
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    *m.last_deployment.lock().unwrap_or_else(|p| p.into_inner()) = deployment;
    let kind = match operation.as_str() {
        "chat/completions" => Kind::Chat,
        "completions" => Kind::Completions,
        "embeddings" => Kind::Embeddings,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    openai(State(m), body, kind).await
}

/// `/openai/v1/{operation}`: the deployment is the body's `model`.
pub async fn azure_v1(
    State(m): State<Arc<Mock>>,
    Path(operation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = azure_key(&headers) {
        return denied;
    }
    let kind = match operation.as_str() {
        "chat/completions" => Kind::Chat,
        "completions" => Kind::Completions,
        "embeddings" => Kind::Embeddings,
        "responses" => Kind::Responses,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    openai(State(m), body, kind).await
}

pub async fn azure_models(State(m): State<Arc<Mock>>, headers: HeaderMap) -> Response {
    match azure_key(&headers) {
        Some(denied) => denied,
        None => models(State(m)).await,
    }
}
