//! Translation between a door's shape and a backend kind's, when they
//! differ: the Anthropic Messages API and OpenAI chat completions, both
//! ways, full answers and streams.
//!
//! Which translation a request takes is decided per attempt, from the door's
//! operation and the chosen backend's kind ([`Translation::between`]); a
//! policy may mix kinds. A field the target cannot express is an
//! [`Untranslatable`] error that names it, never a silent drop (the only
//! fields dropped are hints that change no answer: `cache_control` and
//! `stream_options`). Passthrough (the same shape in and out) is no
//! translation at all: unknown fields and headers go through untouched.
//!
//! - [`chat`]: request and answer bodies, stop reasons, errors;
//! - [`stream`]: the event streams, translated as they pass.

pub mod chat;
pub mod stream;

use bytes::Bytes;
use serde_json::Value;

use crate::operation::Operation;
use crate::provider::Kind;

/// A field the target shape cannot express: the message names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable(pub String);

impl std::fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untranslatable {}

/// One way of serving a door's operation on a backend of another shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Translation {
    /// The Anthropic door on an OpenAI-shaped backend (chat completions).
    MessagesViaChat,
    /// The OpenAI chat door on an Anthropic backend (messages).
    ChatViaMessages,
}

impl Translation {
    /// How a backend of `kind` serves `op`: `Some(None)` directly,
    /// `Some(Some(t))` through `t`, `None` not at all.
    pub fn between(op: Operation, kind: Kind) -> Option<Option<Translation>> {
        if kind.serves(op) {
            return Some(None);
        }
        match op {
            Operation::Messages if kind.serves(Operation::Chat) => Some(Some(Translation::MessagesViaChat)),
            Operation::Chat if kind.serves(Operation::Messages) => Some(Some(Translation::ChatViaMessages)),
            _ => None,
        }
    }

    /// The operation the backend is asked for.
    pub fn upstream_op(self) -> Operation {
        match self {
            Translation::MessagesViaChat => Operation::Chat,
            Translation::ChatViaMessages => Operation::Messages,
        }
    }

    /// The request body in the backend's shape.
    pub fn request(self, body: &Value) -> Result<Value, Untranslatable> {
        match self {
            Translation::MessagesViaChat => chat::messages_to_chat(body),
            Translation::ChatViaMessages => chat::chat_to_messages(body),
        }
    }

    /// A backend's 2xx answer in the door's shape. `model` is the name the
    /// client used.
    pub fn answer(self, body: &[u8], model: &str) -> Option<Bytes> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let out = match self {
            Translation::MessagesViaChat => chat::chat_answer_to_message(&v, model),
            Translation::ChatViaMessages => chat::message_answer_to_chat(&v, model),
        };
        serde_json::to_vec(&out).ok().map(Bytes::from)
    }

    /// A backend's error answer in the door's shape.
    pub fn error(self, status: u16, body: &[u8]) -> Bytes {
        let message = chat::error_message(body);
        let out = match self {
            Translation::MessagesViaChat => chat::anthropic_error(status, &message),
            Translation::ChatViaMessages => chat::openai_error(status, &message, None),
        };
        Bytes::from(out.to_string())
    }

    /// A translator for a streamed answer. `include_usage`: the client asked
    /// an OpenAI stream for its usage chunk.
    pub fn stream(self, model: &str, include_usage: bool) -> stream::StreamTranslator {
        stream::StreamTranslator::new(self, model, include_usage)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::sse::EventParser;

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 ,.!?\"'\\\\{}é]{1,40}"
    }

    fn call() -> impl Strategy<Value = (String, String)> {
        ("[a-z_]{1,12}", text())
    }

    fn usage() -> impl Strategy<Value = Usage> {
        (0u64..10_000, 0u64..10_000, 0u64..5_000, 0u64..5_000).prop_map(|(p, c, r, w)| Usage {
            prompt_tokens: p + r + w,
            completion_tokens: c,
            total_tokens: p + r + w + c,
            cache_read_tokens: r,
            cache_write_tokens: w,
        })
    }

    use crate::usage::Usage;

    /// Text and tool calls of an OpenAI chunk stream, reassembled.
    fn reassemble(bytes: &[u8]) -> (String, Vec<(String, String)>, Option<Usage>) {
        let (mut text, mut calls, mut usage) = (String::new(), Vec::<(String, String)>::new(), None);
        let mut p = EventParser::default();
        let mut on = |_: Option<&str>, d: &[u8]| {
            if d == b"[DONE]" {
                return;
            }
            let v: Value = serde_json::from_slice(d).unwrap();
            if let Some(u) = Usage::from_openai(&v) {
                usage = Some(u);
            }
            let delta = &v["choices"][0]["delta"];
            text.push_str(delta["content"].as_str().unwrap_or_default());
            for c in delta["tool_calls"].as_array().into_iter().flatten() {
                let i = c["index"].as_u64().unwrap() as usize;
                if calls.len() <= i {
                    calls.push((c["function"]["name"].as_str().unwrap().to_string(), String::new()));
                }
                calls[i].1.push_str(c["function"]["arguments"].as_str().unwrap_or_default());
            }
        };
        p.feed(bytes, &mut on);
        p.finish(&mut on);
        (text, calls, usage)
    }

    #[test]
    fn each_kind_serves_each_door_directly_through_a_translation_or_not_at_all() {
        let kind = |n| Kind::parse(n).unwrap();
        assert_eq!(Translation::between(Operation::Chat, kind("openai")), Some(None));
        assert_eq!(Translation::between(Operation::Messages, kind("anthropic")), Some(None));
        assert_eq!(Translation::between(Operation::Messages, kind("openai")), Some(Some(Translation::MessagesViaChat)));
        assert_eq!(Translation::between(Operation::Chat, kind("anthropic")), Some(Some(Translation::ChatViaMessages)));
        // The native kind serves neither shape, so neither translation.
        assert_eq!(Translation::between(Operation::Messages, kind("native")), None);
        assert_eq!(Translation::between(Operation::Chat, kind("native")), None);
        assert_eq!(Translation::between(Operation::Embeddings, kind("anthropic")), None);
        assert_eq!(Untranslatable("`top_k`".into()).to_string(), "`top_k`");
    }

    #[test]
    fn a_backends_error_is_answered_in_the_doors_shape() {
        let openai = br#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#;
        let v: Value = serde_json::from_slice(&Translation::MessagesViaChat.error(429, openai)).unwrap();
        assert_eq!((v["type"].as_str(), v["error"]["message"].as_str()), (Some("error"), Some("slow down")));
        let anthropic = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let v: Value = serde_json::from_slice(&Translation::ChatViaMessages.error(529, anthropic)).unwrap();
        assert_eq!(v["error"]["message"], "Overloaded");
    }

    proptest! {
        #[test]
        fn a_request_round_trip_keeps_text_and_tool_calls(
            asks in prop::collection::vec(text(), 1..4),
            calls in prop::collection::vec(call(), 0..3),
        ) {
            let mut messages = vec![json!({"role": "user", "content": asks[0]})];
            if !calls.is_empty() {
                let tool_calls: Vec<Value> = calls.iter().enumerate().map(|(i, (name, arg))| json!({
                    "id": format!("call_{i}"), "type": "function",
                    "function": {"name": name, "arguments": json!({"arg": arg}).to_string()}
                })).collect();
                messages.push(json!({"role": "assistant", "content": null, "tool_calls": tool_calls}));
                for (i, (_, arg)) in calls.iter().enumerate() {
                    messages.push(json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": arg}));
                }
            }
            for ask in &asks[1..] {
                messages.push(json!({"role": "assistant", "content": "ok"}));
                messages.push(json!({"role": "user", "content": ask}));
            }
            let chat = json!({"model": "m", "max_tokens": 64, "messages": messages});
            let back = Translation::MessagesViaChat.request(&Translation::ChatViaMessages.request(&chat).unwrap()).unwrap();
            prop_assert_eq!(&back["messages"], &chat["messages"]);
            prop_assert_eq!(&back["max_tokens"], &chat["max_tokens"]);
        }

        #[test]
        fn an_answer_round_trip_keeps_text_tool_calls_and_usage(
            said in text(), calls in prop::collection::vec(call(), 0..3), u in usage(),
        ) {
            let mut content = vec![json!({"type": "text", "text": said})];
            for (i, (name, arg)) in calls.iter().enumerate() {
                content.push(json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": {"arg": arg}}));
            }
            let message = json!({"id": "m1", "type": "message", "role": "assistant", "model": "x", "content": content,
                "stop_reason": if calls.is_empty() { "end_turn" } else { "tool_use" }, "stop_sequence": null,
                "usage": u.to_anthropic()});
            let chat = Translation::ChatViaMessages.answer(message.to_string().as_bytes(), "x").unwrap();
            let back: Value = serde_json::from_slice(&Translation::MessagesViaChat.answer(&chat, "x").unwrap()).unwrap();
            prop_assert_eq!(&back["content"], &message["content"]);
            prop_assert_eq!(&back["stop_reason"], &message["stop_reason"]);
            prop_assert_eq!(Usage::from_anthropic(&back["usage"]).unwrap(), u);
        }

        #[test]
        fn a_stream_round_trip_keeps_text_tool_arguments_and_usage(
            pieces in prop::collection::vec(text(), 1..6),
            calls in prop::collection::vec((("[a-z_]{1,12}"), prop::collection::vec(text(), 1..4)), 0..3),
            u in usage(),
            step in 1usize..200,
        ) {
            let mut upstream = String::new();
            let chunk = |delta: Value, finish: Value| format!("data: {}\n\n", json!({"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}));
            for p in &pieces {
                upstream += &chunk(json!({"content": p}), Value::Null);
            }
            for (i, (name, args)) in calls.iter().enumerate() {
                upstream += &chunk(json!({"tool_calls": [{"index": i, "id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null);
                for a in args {
                    upstream += &chunk(json!({"tool_calls": [{"index": i, "function": {"arguments": a}}]}), Value::Null);
                }
            }
            upstream += &chunk(json!({}), json!(if calls.is_empty() { "stop" } else { "tool_calls" }));
            upstream += &format!("data: {}\n\ndata: [DONE]\n\n", json!({"id": "c", "choices": [], "usage": u.to_openai()}));

            let mut to_anthropic = Translation::MessagesViaChat.stream("x", false);
            let mut to_openai = Translation::ChatViaMessages.stream("x", true);
            let mut out = Vec::new();
            for piece in upstream.as_bytes().chunks(step) {
                let a = to_anthropic.push(piece);
                out.extend_from_slice(&to_openai.push(&a));
            }
            let a = to_anthropic.finish();
            out.extend_from_slice(&to_openai.push(&a));
            out.extend_from_slice(&to_openai.finish());

            let (text, got_calls, got_usage) = reassemble(&out);
            prop_assert_eq!(text, pieces.concat());
            let want: Vec<(String, String)> = calls.iter().map(|(n, a)| (n.clone(), a.concat())).collect();
            prop_assert_eq!(got_calls, want);
            prop_assert_eq!(got_usage.unwrap(), Usage { total_tokens: u.total(), ..u });
        }
    }
}
