//! Bodies between the Anthropic Messages API and OpenAI chat completions.
//!
//! What maps, both ways: the system prompt; text and image content; tool
//! definitions, tool calls and tool results; `tool_choice` (and parallel
//! tool use); stop sequences; `max_tokens`; `temperature` and `top_p`;
//! `stream`; the user id; stop reasons; usage (cache reads and writes
//! included). What cannot map is refused, naming the field.

use serde_json::{Map, Value, json};

use super::Untranslatable;
use crate::usage::Usage;

fn refuse(what: impl std::fmt::Display, target: &str) -> Untranslatable {
    Untranslatable(format!("{what} cannot be expressed for an {target} backend"))
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Untranslatable> {
    v.as_object().ok_or_else(|| Untranslatable(format!("`{what}` must be an object")))
}

/// The max tokens sent to Anthropic when an OpenAI client sets none
/// (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

// ---------------------------------------------------------------------------
// Anthropic request → OpenAI chat request

/// Fields of an Anthropic request that translate (or are hints dropped).
const MESSAGES_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
];

/// An Anthropic Messages request as an OpenAI chat request.
pub fn messages_to_chat(body: &Value) -> Result<Value, Untranslatable> {
    const TARGET: &str = "OpenAI-compatible";
    let req = object(body, "body")?;
    if let Some(field) = req.keys().find(|k| !MESSAGES_FIELDS.contains(&k.as_str())) {
        return Err(refuse(format!("`{field}`"), TARGET));
    }
    let mut out = Map::new();
    out.insert("model".into(), req.get("model").cloned().unwrap_or(Value::Null));
    let mut messages = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let text = text_of_blocks(blocks, "system", TARGET)?;
            messages.push(json!({"role": "system", "content": text}));
        }
        Some(_) => return Err(Untranslatable("`system` must be a string or an array of text blocks".into())),
    }
    let input = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| Untranslatable("`messages` must be an array".into()))?;
    for (i, m) in input.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        match (role, &m["content"]) {
            (_, Value::String(s)) if role == "user" || role == "assistant" => {
                messages.push(json!({"role": role, "content": s}));
            }
            ("user", Value::Array(blocks)) => user_blocks_to_chat(blocks, i, &mut messages)?,
            ("assistant", Value::Array(blocks)) => messages.push(assistant_blocks_to_chat(blocks, i)?),
            _ => {
                return Err(Untranslatable(format!(
                    "`messages[{i}]`: role must be user or assistant, content a string or blocks"
                )));
            }
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(max) = req.get("max_tokens") {
        out.insert("max_tokens".into(), max.clone());
    }
    for key in ["temperature", "top_p", "stream"] {
        if let Some(v) = req.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(stops) = req.get("stop_sequences").and_then(Value::as_array) {
        if stops.len() > 4 {
            return Err(refuse("more than 4 `stop_sequences`", TARGET));
        }
        if !stops.is_empty() {
            out.insert("stop".into(), Value::Array(stops.clone()));
        }
    }
    if let Some(user) = req.get("metadata").and_then(|m| m.get("user_id")).filter(|u| !u.is_null()) {
        out.insert("user".into(), user.clone());
    }
    match req.get("thinking") {
        None | Some(Value::Null) => {}
        Some(t) if t["type"] == "disabled" => {}
        Some(_) => return Err(refuse("`thinking`", TARGET)),
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let mut defs = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if !matches!(t.get("type").and_then(Value::as_str), None | Some("custom")) {
                return Err(refuse(format!("`tools[{i}]` of type {}", t["type"]), TARGET));
            }
            let mut function = json!({"name": t["name"], "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
            if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                function["description"] = d.clone();
            }
            defs.push(json!({"type": "function", "function": function}));
        }
        out.insert("tools".into(), Value::Array(defs));
    }
    if let Some(choice) = req.get("tool_choice").filter(|c| !c.is_null()) {
        let mapped = match choice["type"].as_str() {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => return Err(Untranslatable("`tool_choice.type` must be auto, any, tool or none".into())),
        };
        out.insert("tool_choice".into(), mapped);
        if choice["disable_parallel_tool_use"] == true {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    Ok(Value::Object(out))
}

fn text_of_blocks(blocks: &[Value], what: &str, target: &str) -> Result<String, Untranslatable> {
    let mut text = String::new();
    for (i, b) in blocks.iter().enumerate() {
        match b["type"].as_str() {
            Some("text") => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(b["text"].as_str().unwrap_or_default());
            }
            other => return Err(refuse(format!("`{what}[{i}]` of type {}", other.unwrap_or("?")), target)),
        }
    }
    Ok(text)
}

/// An Anthropic image block as an OpenAI image part.
fn image_to_chat(block: &Value, at: &str) -> Result<Value, Untranslatable> {
    let source = &block["source"];
    let url = match source["type"].as_str() {
        Some("base64") => format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or_default()
        ),
        Some("url") => source["url"].as_str().unwrap_or_default().to_string(),
        _ => return Err(Untranslatable(format!("`{at}.source` must be base64 or url"))),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A user turn: its tool results become `tool` messages (first, so that they
/// follow the assistant's calls), the rest one user message.
fn user_blocks_to_chat(blocks: &[Value], i: usize, out: &mut Vec<Value>) -> Result<(), Untranslatable> {
    const TARGET: &str = "OpenAI-compatible";
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match b["type"].as_str() {
            Some("text") => parts.push(json!({"type": "text", "text": b["text"]})),
            Some("image") => parts.push(image_to_chat(b, &at)?),
            Some("tool_result") => {
                let content = match &b["content"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Array(inner) => text_of_blocks(inner, &format!("{at}.content"), TARGET)?,
                    _ => return Err(Untranslatable(format!("`{at}.content` must be a string or blocks"))),
                };
                let content = if b["is_error"] == true { format!("Error: {content}") } else { content };
                out.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content}));
            }
            other => return Err(refuse(format!("`{at}` of type {}", other.unwrap_or("?")), TARGET)),
        }
    }
    if !parts.is_empty() {
        // One text part is sent as a plain string, as most servers expect.
        let content = match parts.as_slice() {
            [p] if p["type"] == "text" => p["text"].clone(),
            _ => Value::Array(parts),
        };
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

fn assistant_blocks_to_chat(blocks: &[Value], i: usize) -> Result<Value, Untranslatable> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("tool_use") => {
                let arguments = serde_json::to_string(&b["input"]).unwrap_or_else(|_| "{}".into());
                calls.push(
                    json!({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": arguments}}),
                );
            }
            other => {
                return Err(refuse(
                    format!("`messages[{i}].content[{j}]` of type {}", other.unwrap_or("?")),
                    "OpenAI-compatible",
                ));
            }
        }
    }
    let mut m = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

// ---------------------------------------------------------------------------
// OpenAI chat request → Anthropic request

/// Fields of an OpenAI chat request that translate, or whose neutral value
/// is accepted (see [`neutral`]).
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "response_format",
    "store",
];

/// A field whose value asks for nothing beyond the default.
fn neutral(key: &str, v: &Value) -> bool {
    match key {
        "n" => v.is_null() || v.as_u64() == Some(1),
        "presence_penalty" | "frequency_penalty" => v.is_null() || v.as_f64() == Some(0.0),
        "logprobs" | "store" => v.is_null() || *v == false,
        "response_format" => v.is_null() || v["type"] == "text",
        _ => true,
    }
}

/// An OpenAI chat request as an Anthropic Messages request.
pub fn chat_to_messages(body: &Value) -> Result<Value, Untranslatable> {
    const TARGET: &str = "anthropic";
    let req = object(body, "body")?;
    for (key, v) in req {
        if !CHAT_FIELDS.contains(&key.as_str()) {
            return Err(refuse(format!("`{key}`"), TARGET));
        }
        if !neutral(key, v) {
            return Err(refuse(format!("`{key}` = {v}"), TARGET));
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), req.get("model").cloned().unwrap_or(Value::Null));
    let max = req.get("max_completion_tokens").or_else(|| req.get("max_tokens")).filter(|v| !v.is_null());
    out.insert("max_tokens".into(), max.cloned().unwrap_or_else(|| json!(DEFAULT_MAX_TOKENS)));
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let input = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| Untranslatable("`messages` must be an array".into()))?;
    for (i, m) in input.iter().enumerate() {
        let at = format!("messages[{i}]");
        match m["role"].as_str() {
            Some("system" | "developer") => system.push(content_text(&m["content"], &at)?),
            Some("user") => push_turn(&mut messages, "user", chat_user_content(&m["content"], &at)?),
            Some("assistant") => push_turn(&mut messages, "assistant", chat_assistant_content(m, &at)?),
            Some("tool") => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": m["tool_call_id"],
                    "content": content_text(&m["content"], &at)?,
                });
                push_turn(&mut messages, "user", vec![result]);
            }
            other => return Err(refuse(format!("`{at}` with role {}", other.unwrap_or("?")), TARGET)),
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    for key in ["top_p", "stream"] {
        if let Some(v) = req.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(t) = req.get("temperature").filter(|v| !v.is_null()) {
        if t.as_f64().is_some_and(|t| t > 1.0) {
            return Err(refuse(format!("`temperature` = {t} (above 1)"), TARGET));
        }
        out.insert("temperature".into(), t.clone());
    }
    match req.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        Some(_) => return Err(Untranslatable("`stop` must be a string or an array".into())),
    }
    if let Some(user) = req.get("user").filter(|u| !u.is_null()) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let mut defs = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if t["type"] != "function" {
                return Err(refuse(format!("`tools[{i}]` of type {}", t["type"]), TARGET));
            }
            let f = &t["function"];
            if f["strict"] == true {
                return Err(refuse(format!("`tools[{i}].function.strict`"), TARGET));
            }
            let mut def = json!({"name": f["name"], "input_schema": f.get("parameters").filter(|p| !p.is_null()).cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                def["description"] = d.clone();
            }
            defs.push(def);
        }
        out.insert("tools".into(), Value::Array(defs));
    }
    let parallel_off = req.get("parallel_tool_calls") == Some(&Value::Bool(false));
    let choice = match req.get("tool_choice") {
        None | Some(Value::Null) => parallel_off.then(|| json!({"type": "auto"})),
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            _ => return Err(Untranslatable("`tool_choice` must be auto, required, none or a function".into())),
        }),
        Some(c) if c["type"] == "function" => Some(json!({"type": "tool", "name": c["function"]["name"]})),
        Some(_) => return Err(Untranslatable("`tool_choice` must be auto, required, none or a function".into())),
    };
    if let Some(mut choice) = choice {
        if parallel_off && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = Value::Bool(true);
        }
        out.insert("tool_choice".into(), choice);
    }
    Ok(Value::Object(out))
}

/// Appends blocks to the conversation, merging into the previous turn when
/// it has the same role (tool results following each other, a user message
/// after tool results).
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if let Some(last) = messages.last_mut()
        && last["role"] == role
        && let Some(content) = last["content"].as_array_mut()
    {
        content.extend(blocks);
        return;
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// Text of an OpenAI content (a string, or text parts).
fn content_text(content: &Value, at: &str) -> Result<String, Untranslatable> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p["type"].as_str() {
                    Some("text") => text.push_str(p["text"].as_str().unwrap_or_default()),
                    other => {
                        return Err(refuse(
                            format!("`{at}.content[{j}]` of type {}", other.unwrap_or("?")),
                            "anthropic",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(Untranslatable(format!("`{at}.content` must be a string or an array"))),
    }
}

fn chat_user_content(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match p["type"].as_str() {
                Some("text") => Ok(json!({"type": "text", "text": p["text"]})),
                Some("image_url") => image_to_anthropic(p["image_url"]["url"].as_str().unwrap_or_default()),
                other => Err(refuse(format!("`{at}.content[{j}]` of type {}", other.unwrap_or("?")), "anthropic")),
            })
            .collect(),
        _ => Err(Untranslatable(format!("`{at}.content` must be a string or an array"))),
    }
}

fn image_to_anthropic(url: &str) -> Result<Value, Untranslatable> {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn chat_assistant_content(m: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    let mut blocks = Vec::new();
    let text = content_text(&m["content"], at)?;
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for (k, call) in m["tool_calls"].as_array().into_iter().flatten().enumerate() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        let input: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments)
                .map_err(|_| Untranslatable(format!("`{at}.tool_calls[{k}].function.arguments` is not JSON")))?
        };
        blocks.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------
// Answers

/// OpenAI's `finish_reason` as Anthropic's `stop_reason`.
pub fn stop_reason_from_finish(finish: Option<&str>) -> Option<&'static str> {
    Some(match finish? {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    })
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
pub fn finish_from_stop_reason(stop: Option<&str>) -> Option<&'static str> {
    Some(match stop? {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    })
}

/// An OpenAI chat answer as an Anthropic message.
pub fn chat_answer_to_message(v: &Value, model: &str) -> Value {
    let choice = &v["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        let input = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    let usage = Usage::from_openai(v).unwrap_or_default();
    json!({
        "id": format!("msg_{}", v["id"].as_str().unwrap_or("router")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason_from_finish(choice["finish_reason"].as_str()),
        "stop_sequence": null,
        "usage": usage.to_anthropic(),
    })
}

/// An Anthropic message as an OpenAI chat answer.
pub fn message_answer_to_chat(v: &Value, model: &str) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in v["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": serde_json::to_string(&block["input"]).unwrap_or_else(|_| "{}".into())},
            })),
            // Thinking and server-tool blocks have no place in a chat answer.
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = Usage::from_anthropic(&v["usage"]).unwrap_or_default();
    json!({
        "id": format!("chatcmpl-{}", v["id"].as_str().unwrap_or("router")),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_from_stop_reason(v["stop_reason"].as_str())}],
        "usage": usage.to_openai(),
    })
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Errors

/// The message of an error body in either shape (or the body's text).
pub fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => v["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

/// Anthropic's error type for a status.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`.
pub fn anthropic_error(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
}

/// OpenAI's error type for a status.
pub fn openai_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        400 | 404 | 413 | 422 => "invalid_request_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}

/// `{"error":{"message","type","param","code"}}`.
pub fn openai_error(status: u16, message: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": openai_error_type(status), "param": null, "code": code}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anthropic_request() -> Value {
        json!({
            "model": "claude-x",
            "max_tokens": 300,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is the weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                    {"type": "text", "text": "Thanks. And tomorrow?"},
                ]},
            ],
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "tools": [{"name": "weather", "description": "Weather by city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "metadata": {"user_id": "u-1"},
        })
    }

    #[test]
    fn an_anthropic_request_becomes_an_openai_chat_request() {
        let chat = messages_to_chat(&anthropic_request()).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[1]["content"][1]["image_url"]["url"], "data:image/jpeg;base64,AAAA");
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"}));
        assert_eq!(m[4], json!({"role": "user", "content": "Thanks. And tomorrow?"}));
        assert_eq!((chat["max_tokens"].as_u64(), &chat["stop"]), (Some(300), &json!(["END"])));
        assert_eq!((&chat["tool_choice"], &chat["parallel_tool_calls"]), (&json!("required"), &json!(false)));
        assert_eq!(chat["tools"][0]["function"]["parameters"]["properties"]["city"]["type"], "string");
        assert_eq!(chat["user"], "u-1");
    }

    #[test]
    fn what_openai_cannot_express_is_refused_by_name() {
        for (field, value) in [
            ("top_k", json!(5)),
            ("thinking", json!({"type": "enabled", "budget_tokens": 1024})),
            ("service_tier", json!("auto")),
        ] {
            let mut req = anthropic_request();
            req[field] = value;
            let e = messages_to_chat(&req).unwrap_err();
            assert!(e.0.contains(field), "{e}");
        }
        let mut req = anthropic_request();
        req["tools"][0]["type"] = json!("web_search_20250305");
        assert!(messages_to_chat(&req).unwrap_err().0.contains("tools[0]"));
        let mut req = anthropic_request();
        req["messages"][0]["content"][0] = json!({"type": "document", "source": {}});
        assert!(messages_to_chat(&req).unwrap_err().0.contains("messages[0].content[0]"));
    }

    #[test]
    fn an_openai_chat_request_becomes_an_anthropic_request() {
        let chat = json!({
            "model": "gpt-x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image_url", "image_url": {"url": "https://x/img.png"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
            ],
            "stop": "END",
            "max_completion_tokens": 100,
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "parallel_tool_calls": false,
            "n": 1,
            "stream_options": {"include_usage": true},
        });
        let a = chat_to_messages(&chat).unwrap();
        assert_eq!(a["system"], "Be brief.");
        assert_eq!(a["max_tokens"], 100);
        assert_eq!(a["messages"][0]["content"][1]["source"], json!({"type": "url", "url": "https://x/img.png"}));
        assert_eq!(a["messages"][1]["content"][1]["input"], json!({"city": "Rome"}));
        let results = a["messages"][2]["content"].as_array().unwrap();
        assert_eq!(results.len(), 2, "consecutive tool results are one user turn");
        assert_eq!(a["tool_choice"], json!({"type": "tool", "name": "weather", "disable_parallel_tool_use": true}));
        assert_eq!(a["stop_sequences"], json!(["END"]));
        let a = chat_to_messages(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(a["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn what_anthropic_cannot_express_is_refused_by_name() {
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("presence_penalty", json!(0.5)),
            ("response_format", json!({"type": "json_object"})),
            ("seed", json!(7)),
            ("temperature", json!(1.5)),
        ] {
            let mut req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            req[field] = value;
            let e = chat_to_messages(&req).unwrap_err();
            assert!(e.0.contains(field) && e.0.contains("anthropic"), "{e}");
        }
        let bad_args = json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{not json"}}]}]});
        assert!(chat_to_messages(&bad_args).unwrap_err().0.contains("arguments"));
    }

    #[test]
    fn answers_map_content_tool_calls_stop_reasons_and_usage() {
        let chat = json!({"id": "c1", "choices": [{"message": {"role": "assistant", "content": "On it.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}
        ]}, "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 20}}});
        let m = chat_answer_to_message(&chat, "gpt-x");
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["content"][1]["input"]["city"], "Paris");
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0})
        );
        let back = message_answer_to_chat(&m, "gpt-x");
        assert_eq!(back["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(back["choices"][0]["message"]["content"], "On it.");
        assert_eq!(back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(back["usage"]["prompt_tokens"], 30);
        assert_eq!(back["usage"]["prompt_tokens_details"], json!({"cached_tokens": 20, "cache_creation_tokens": 0}));
        for (finish, stop) in [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")] {
            assert_eq!(stop_reason_from_finish(Some(finish)), Some(stop));
            assert_eq!(finish_from_stop_reason(Some(stop)), Some(finish));
        }
    }

    #[test]
    fn errors_keep_their_message_in_the_other_shape() {
        let e = anthropic_error(429, &error_message(br#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#));
        assert_eq!(e, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}));
        let e = openai_error(
            529,
            &error_message(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
            None,
        );
        assert_eq!(
            (e["error"]["type"].as_str(), e["error"]["message"].as_str()),
            (Some("server_error"), Some("Overloaded"))
        );
    }

    /// A minimal Anthropic request with `extra` fields merged in.
    fn anthropic_with(extra: Value) -> Value {
        let mut req = json!({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    }

    #[test]
    fn anthropic_string_turns_sampling_stops_and_thinking_map_to_chat() {
        let turns = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
        let chat = messages_to_chat(&anthropic_with(turns)).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        );
        let system_turn = json!({"messages": [{"role": "system", "content": "be brief"}]});
        assert!(messages_to_chat(&anthropic_with(system_turn)).unwrap_err().0.contains("messages[0]"));

        let sampling = json!({"temperature": 0.5, "top_p": 0.9, "stream": true});
        let chat = messages_to_chat(&anthropic_with(sampling)).unwrap();
        assert_eq!((&chat["temperature"], &chat["top_p"], &chat["stream"]), (&json!(0.5), &json!(0.9), &json!(true)));
        let nulls =
            messages_to_chat(&anthropic_with(json!({"temperature": null, "metadata": {"user_id": null}}))).unwrap();
        assert_eq!((nulls.get("temperature"), nulls.get("user")), (None, None));

        let four = json!({"stop_sequences": ["a", "b", "c", "d"]});
        assert_eq!(messages_to_chat(&anthropic_with(four)).unwrap()["stop"], json!(["a", "b", "c", "d"]));
        let five = json!({"stop_sequences": ["a", "b", "c", "d", "e"]});
        assert!(messages_to_chat(&anthropic_with(five)).unwrap_err().0.contains("stop_sequences"));

        let off = json!({"thinking": {"type": "disabled"}});
        assert_eq!(messages_to_chat(&anthropic_with(off)).unwrap().get("thinking"), None);
    }

    #[test]
    fn anthropic_tools_choices_images_and_tool_results_map_to_chat() {
        let chat = messages_to_chat(&anthropic_request()).unwrap();
        assert_eq!(chat["tools"][0]["function"]["description"], "Weather by city");
        let tool = json!({"name": "weather", "input_schema": {"type": "object"}});
        for (choice, mapped) in [
            (json!({"type": "auto"}), json!("auto")),
            (json!({"type": "none"}), json!("none")),
            (json!({"type": "tool", "name": "weather"}), json!({"type": "function", "function": {"name": "weather"}})),
        ] {
            let chat = messages_to_chat(&anthropic_with(json!({"tools": [tool], "tool_choice": choice}))).unwrap();
            assert_eq!(chat["tool_choice"], mapped, "{choice}");
        }
        let url_image = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}},
        ]}]});
        let chat = messages_to_chat(&anthropic_with(url_image)).unwrap();
        // One image part stays a list of parts (only one text part becomes a string).
        assert_eq!(
            chat["messages"][0]["content"],
            json!([{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}])
        );
        let results = json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1"},
            {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]}]});
        let chat = messages_to_chat(&anthropic_with(results)).unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "tool", "tool_call_id": "t1", "content": ""},
                {"role": "tool", "tool_call_id": "t2", "content": "a\nb"},
            ])
        );
    }

    /// A minimal OpenAI chat request with `extra` fields merged in.
    fn chat_with(extra: Value) -> Value {
        let mut req = json!({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    }

    #[test]
    fn chat_fields_at_their_defaults_are_accepted_for_anthropic() {
        for (field, value) in [
            ("n", json!(null)),
            ("n", json!(1)),
            ("presence_penalty", json!(0.0)),
            ("frequency_penalty", json!(null)),
            ("logprobs", json!(false)),
            ("store", json!(null)),
            ("response_format", json!({"type": "text"})),
            ("temperature", json!(1.0)),
        ] {
            assert!(chat_to_messages(&chat_with(json!({ field: value }))).is_ok(), "{field} = {value}");
        }
    }

    #[test]
    fn chat_sampling_user_tools_and_choices_map_to_anthropic() {
        let a = chat_to_messages(&chat_with(json!({"top_p": 0.9, "stream": true, "user": "u-1", "temperature": 0.2})))
            .unwrap();
        assert_eq!((&a["top_p"], &a["stream"], &a["temperature"]), (&json!(0.9), &json!(true), &json!(0.2)));
        assert_eq!(a["metadata"], json!({"user_id": "u-1"}));
        let a = chat_to_messages(&chat_with(json!({"top_p": null, "user": null}))).unwrap();
        assert_eq!((a.get("top_p"), a.get("metadata")), (None, None));

        let tools = json!([{"type": "function", "function": {"name": "f", "description": "does f"}}]);
        let a = chat_to_messages(&chat_with(json!({"tools": tools}))).unwrap();
        assert_eq!(a["tools"][0]["description"], "does f");
        let a =
            chat_to_messages(&chat_with(json!({"tools": [{"type": "function", "function": {"name": "g"}}]}))).unwrap();
        assert_eq!(a["tools"][0].get("description"), None);
        let odd = json!({"tool_choice": {"type": "allowed_tools", "function": {"name": "f"}}});
        assert!(chat_to_messages(&chat_with(odd)).unwrap_err().0.contains("tool_choice"));

        for (choice, mapped) in
            [("auto", json!({"type": "auto"})), ("required", json!({"type": "any"})), ("none", json!({"type": "none"}))]
        {
            let a = chat_to_messages(&chat_with(json!({"tool_choice": choice}))).unwrap();
            assert_eq!(a["tool_choice"], mapped, "parallel calls stay allowed unless turned off");
        }
        let a = chat_to_messages(&chat_with(json!({"tool_choice": "none", "parallel_tool_calls": false}))).unwrap();
        assert_eq!(a["tool_choice"], json!({"type": "none"}), "no tools, nothing to run in parallel");
    }

    #[test]
    fn chat_text_parts_of_system_and_tool_messages_are_joined() {
        let parts = json!([{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]);
        let a = chat_to_messages(&chat_with(json!({"messages": [
            {"role": "system", "content": parts},
            {"role": "user", "content": "hi"},
        ]})))
        .unwrap();
        assert_eq!(a["system"], "Be brief.");
        let image = json!([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]);
        let e = chat_to_messages(&chat_with(json!({"messages": [{"role": "system", "content": image}]}))).unwrap_err();
        assert!(e.0.contains("messages[0].content[0]"), "{e}");
    }

    #[test]
    fn each_status_has_its_error_type_in_both_shapes() {
        for (status, anthropic, openai) in [
            (400, "invalid_request_error", "invalid_request_error"),
            (401, "authentication_error", "authentication_error"),
            (402, "billing_error", "insufficient_quota"),
            (403, "permission_error", "permission_error"),
            (404, "not_found_error", "invalid_request_error"),
            (413, "request_too_large", "invalid_request_error"),
            (422, "invalid_request_error", "invalid_request_error"),
            (429, "rate_limit_error", "rate_limit_error"),
            (500, "api_error", "server_error"),
            (503, "overloaded_error", "server_error"),
            (529, "overloaded_error", "server_error"),
        ] {
            assert_eq!((anthropic_error_type(status), openai_error_type(status)), (anthropic, openai), "{status}");
        }
    }

    #[test]
    fn a_translated_answer_is_created_now() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let answer = json!({"id": "msg_1", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"});
        let created = message_answer_to_chat(&answer, "m")["created"].as_u64().unwrap();
        assert!(created.abs_diff(now) <= 5, "{created} vs {now}");
    }
}
