//! OpenAI-compatible backends (OpenAI, vLLM, llama.cpp, TGI and most model
//! servers): chat completions, completions, embeddings and the Responses API
//! at their `/v1/` paths, `Authorization: Bearer`, usage in the answer's
//! `usage` object and, for a chat or completions stream, in a final chunk
//! that the router asks for with `stream_options.include_usage` (a Responses
//! stream reports it in `response.completed`). The health probe is
//! `GET /v1/models`, which every OpenAI-compatible server answers.

use bytes::Bytes;
use serde_json::Value;

use crate::operation::Operation;
use crate::provider::{Provider, Target, UpstreamRequest};
use crate::sse::StreamFacts;
use crate::usage::Usage;

pub struct OpenAi;

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn path(&self, op: Operation) -> Option<&'static str> {
        match op {
            Operation::Chat => Some("/v1/chat/completions"),
            Operation::Completions => Some("/v1/completions"),
            Operation::Embeddings => Some("/v1/embeddings"),
            Operation::Responses => Some("/v1/responses"),
            Operation::Native | Operation::Messages | Operation::CountTokens => None,
        }
    }

    /// The model mapped to the backend's own name, and a chat or
    /// completions stream asked for its usage; otherwise the client's bytes
    /// as they came.
    fn body(&self, request: &UpstreamRequest<'_>, target: &Target) -> Bytes {
        body(request, target.mapped_model(request.model))
    }

    fn usage(&self, op: Operation, body: &[u8]) -> Option<Usage> {
        usage(op, body)
    }

    fn stream_event(&self, op: Operation, event: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts) {
        stream_event(op, event, data, facts)
    }

    fn health_path(&self) -> &'static str {
        "/v1/models"
    }
}

/// The OpenAI shape's body rewrite, shared with Azure: `mapped` replaces the
/// model, and a chat or completions stream asks for its usage.
pub(crate) fn body(request: &UpstreamRequest<'_>, mapped: Option<&str>) -> Bytes {
    let ask_usage = request.stream
        && matches!(request.op, Operation::Chat | Operation::Completions)
        && request.json.is_none_or(|v| v["stream_options"]["include_usage"] != Value::Bool(true));
    if mapped.is_none() && !ask_usage {
        return request.body.clone();
    }
    let parsed;
    let original = match request.json {
        Some(v) => v,
        None => match serde_json::from_slice::<Value>(request.body) {
            Ok(v) => {
                parsed = v;
                &parsed
            }
            Err(_) => return request.body.clone(),
        },
    };
    let mut v = original.clone();
    let Some(obj) = v.as_object_mut() else { return request.body.clone() };
    if let Some(m) = mapped {
        obj.insert("model".into(), Value::from(m));
    }
    if ask_usage {
        match obj.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(options) => {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            None => {
                obj.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
            }
        }
    }
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or_else(|_| request.body.clone())
}

/// The body with `mapped` as its model, or the client's bytes when nothing
/// is mapped (Anthropic's kind rewrites nothing else).
pub(crate) fn with_model(request: &UpstreamRequest<'_>, mapped: Option<&str>) -> Bytes {
    let Some(mapped) = mapped else { return request.body.clone() };
    let mut v = match request.json {
        Some(v) => v.clone(),
        None => match serde_json::from_slice::<Value>(request.body) {
            Ok(v) => v,
            Err(_) => return request.body.clone(),
        },
    };
    match v.as_object_mut() {
        Some(obj) => {
            obj.insert("model".into(), Value::from(mapped));
            serde_json::to_vec(&v).map(Bytes::from).unwrap_or_else(|_| request.body.clone())
        }
        None => request.body.clone(),
    }
}

/// Usage of an OpenAI-shaped answer to `op`.
pub(crate) fn usage(op: Operation, body: &[u8]) -> Option<Usage> {
    if op == Operation::Responses {
        return Usage::from_responses(&serde_json::from_slice::<Value>(body).ok()?);
    }
    Usage::from_json_field(body)
}

/// One event of an OpenAI-shaped stream.
pub(crate) fn stream_event(op: Operation, event: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts) {
    if op == Operation::Responses {
        facts.events += 1;
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        match v["type"].as_str() {
            Some("response.completed" | "response.incomplete") => {
                facts.usage = Usage::from_responses(&v["response"]);
            }
            Some("response.failed") => {
                let message = v["response"]["error"]["message"].as_str().unwrap_or("response failed");
                facts.error.get_or_insert_with(|| message.to_string());
            }
            Some("error") => {
                let message = v["message"].as_str().unwrap_or("error event");
                facts.error.get_or_insert_with(|| message.to_string());
            }
            _ => {}
        }
        return;
    }
    facts.openai_like(data);
    if event == Some(b"error") && facts.error.is_none() {
        facts.error = Some(String::from_utf8_lossy(data.trim_ascii()).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::provider::Kind;

    fn target(models: &[(&str, &str)]) -> Target {
        let models: BTreeMap<String, String> = models.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Target::new(Kind::parse("openai").unwrap(), "http://h", models, None)
    }

    fn body(raw: &str, stream: bool, t: &Target) -> Value {
        let bytes = Bytes::from(raw.to_string());
        let json: Value = serde_json::from_str(raw).unwrap();
        let h = http::HeaderMap::new();
        let req = UpstreamRequest {
            headers: &h,
            op: Operation::Chat,
            model: "gpt-4o",
            stream,
            body: &bytes,
            json: Some(&json),
        };
        let out = OpenAi.body(&req, t);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn body_is_forwarded_untouched_unless_mapping_or_stream_usage_is_needed() {
        let raw = r#"{"model":"gpt-4o","messages":[],"unknown_field":{"kept":true}}"#;
        let bytes = Bytes::from(raw);
        let h = http::HeaderMap::new();
        let req = UpstreamRequest {
            headers: &h,
            op: Operation::Chat,
            model: "gpt-4o",
            stream: false,
            body: &bytes,
            json: None,
        };
        assert_eq!(OpenAi.body(&req, &target(&[])), bytes, "passthrough is byte for byte");

        let v = body(raw, false, &target(&[("gpt-4o", "llama-3")]));
        assert_eq!(v["model"], "llama-3");
        assert_eq!(v["unknown_field"]["kept"], true, "unknown fields are forwarded");

        let v = body(r#"{"model":"gpt-4o","stream":true,"stream_options":{"x":1}}"#, true, &target(&[]));
        assert_eq!(v["stream_options"], serde_json::json!({"x": 1, "include_usage": true}));
        let v = body(r#"{"model":"gpt-4o","stream":true}"#, true, &target(&[]));
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn stream_events_give_usage_and_errors() {
        let mut f = StreamFacts::default();
        OpenAi.stream_event(Operation::Chat, None, br#"{"choices":[{"delta":{"content":"\"error\""}}]}"#, &mut f);
        assert!(f.error.is_none(), "the word in content is not an error");
        OpenAi.stream_event(
            Operation::Chat,
            None,
            br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#,
            &mut f,
        );
        assert_eq!(f.usage.unwrap().total(), 5);
        OpenAi.stream_event(Operation::Chat, None, br#"{"error":{"message":"overloaded"}}"#, &mut f);
        assert_eq!(f.error.as_deref(), Some("overloaded"));
        assert_eq!(f.events, 3);
    }
}
