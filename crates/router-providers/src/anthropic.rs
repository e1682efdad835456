//! The Anthropic Messages API: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, the key in `x-api-key`, the API version
//! in `anthropic-version` (the client's, else `2023-06-01`), `anthropic-beta`
//! forwarded unchanged. Usage is in the message's `usage` (input, output,
//! cache reads and writes) and, in a stream, in `message_start` and the
//! cumulative `message_delta`. The health probe lists the models.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::operation::Operation;
use crate::provider::{Provider, Target, UpstreamRequest};
use crate::sse::StreamFacts;
use crate::usage::Usage;

pub struct Anthropic;

/// Sent when the client names no version.
pub const DEFAULT_VERSION: &str = "2023-06-01";

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn path(&self, op: Operation) -> Option<&'static str> {
        match op {
            Operation::Messages => Some("/v1/messages"),
            Operation::CountTokens => Some("/v1/messages/count_tokens"),
            _ => None,
        }
    }

    fn credential_header(&self, secret: &str) -> Result<(HeaderName, HeaderValue), String> {
        let mut v =
            HeaderValue::from_str(secret).map_err(|_| "the credential is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok((HeaderName::from_static("x-api-key"), v))
    }

    fn headers(&self, request: &UpstreamRequest<'_>, headers: &mut http::HeaderMap) {
        let version = request
            .headers
            .get("anthropic-version")
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_VERSION));
        headers.insert("anthropic-version", version);
        if let Some(beta) = request.headers.get("anthropic-beta") {
            headers.insert("anthropic-beta", beta.clone());
        }
    }

    /// The model mapped to the backend's own name; otherwise the bytes as
    /// they came.
    fn body(&self, request: &UpstreamRequest<'_>, target: &Target) -> Bytes {
        crate::openai::with_model(request, target.mapped_model(request.model))
    }

    fn usage(&self, op: Operation, body: &[u8]) -> Option<Usage> {
        if op == Operation::CountTokens {
            return None;
        }
        let v: Value = serde_json::from_slice(body).ok()?;
        Usage::from_anthropic(v.get("usage")?)
    }

    fn stream_event(&self, _: Operation, event: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts) {
        facts.events += 1;
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        match v["type"].as_str().or(event.and_then(|e| std::str::from_utf8(e).ok())) {
            Some("message_start") => {
                facts.usage = Usage::from_anthropic(&v["message"]["usage"]);
            }
            // Output tokens so far (cumulative), and on newer APIs the input
            // counts again; what it leaves out stays as `message_start` said.
            Some("message_delta") => {
                if let Some(delta) = v.get("usage").and_then(Usage::from_anthropic) {
                    let mut u = facts.usage.unwrap_or_default();
                    u.completion_tokens = delta.completion_tokens;
                    if delta.prompt_tokens > 0 {
                        (u.prompt_tokens, u.cache_read_tokens, u.cache_write_tokens) =
                            (delta.prompt_tokens, delta.cache_read_tokens, delta.cache_write_tokens);
                    }
                    facts.usage = Some(u);
                }
            }
            Some("error") => {
                let message = v["error"]["message"].as_str().unwrap_or("error event").to_string();
                facts.error.get_or_insert(message);
            }
            _ => {}
        }
    }

    fn health_path(&self) -> &'static str {
        "/v1/models"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_counts_input_from_message_start_and_output_from_the_last_delta() {
        let mut f = StreamFacts::default();
        let start = br#"{"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1,"cache_read_input_tokens":20,"cache_creation_input_tokens":5}}}"#;
        Anthropic.stream_event(Operation::Messages, Some(b"message_start"), start, &mut f);
        Anthropic.stream_event(
            Operation::Messages,
            Some(b"message_delta"),
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":42}}"#,
            &mut f,
        );
        let u = f.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.cache_read_tokens, u.cache_write_tokens), (35, 42, 20, 5));
        Anthropic.stream_event(
            Operation::Messages,
            Some(b"error"),
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &mut f,
        );
        assert_eq!(f.error.as_deref(), Some("Overloaded"));
    }

    #[test]
    fn the_version_defaults_and_beta_is_forwarded_unchanged() {
        let mut h = http::HeaderMap::new();
        h.insert("anthropic-beta", "prompt-caching-2024-07-31,tools-2024-05-16".parse().unwrap());
        let body = Bytes::new();
        let req = UpstreamRequest {
            headers: &h,
            op: Operation::Messages,
            model: "m",
            stream: false,
            body: &body,
            json: None,
        };
        let mut built = http::HeaderMap::new();
        Anthropic.headers(&req, &mut built);
        assert_eq!(built["anthropic-version"], DEFAULT_VERSION);
        assert_eq!(built["anthropic-beta"], "prompt-caching-2024-07-31,tools-2024-05-16");
        let mut h2 = h.clone();
        h2.insert("anthropic-version", "2024-01-01".parse().unwrap());
        let req = UpstreamRequest { headers: &h2, ..req };
        let mut built = http::HeaderMap::new();
        Anthropic.headers(&req, &mut built);
        assert_eq!(built["anthropic-version"], "2024-01-01");
    }
}
