//! Streams between the Anthropic and OpenAI shapes, translated event by
//! event as they pass (nothing is held back beyond one incomplete event).
//!
//! OpenAI chunks → Anthropic events: the first chunk opens the message
//! (`message_start`); text opens a text block and streams `text_delta`s; a
//! tool call opens a `tool_use` block and streams its arguments as
//! `input_json_delta`s as they arrive; `[DONE]` (or the end of the body)
//! closes the open block and sends `message_delta` (stop reason and usage)
//! and `message_stop`.
//!
//! Anthropic events → OpenAI chunks: `message_start` sends the role;
//! `text_delta`s become content deltas; a `tool_use` block becomes a tool
//! call whose arguments stream as `input_json_delta`s arrive; `message_stop`
//! sends the finish reason, the usage chunk (when the client asked for it)
//! and `[DONE]`.
//!
//! An error the backend reports inside the stream ends it with the error in
//! the door's shape.

use bytes::Bytes;
use serde_json::{Value, json};

use super::Translation;
use super::chat::{anthropic_error, finish_from_stop_reason, now_secs, openai_error, stop_reason_from_finish};
use crate::sse::EventParser;
use crate::usage::Usage;

/// Translates one stream.
pub struct StreamTranslator {
    parser: EventParser,
    state: State,
    out: Vec<u8>,
    done: bool,
}

enum State {
    ToMessages(ToMessages),
    ToChat(ToChat),
}

impl StreamTranslator {
    pub(super) fn new(t: Translation, model: &str, include_usage: bool) -> Self {
        let state = match t {
            Translation::MessagesViaChat => State::ToMessages(ToMessages::new(model)),
            Translation::ChatViaMessages => State::ToChat(ToChat::new(model, include_usage)),
        };
        Self { parser: EventParser::default(), state, out: Vec::new(), done: false }
    }

    /// Translates the bytes received; returns what to send on (possibly
    /// nothing yet).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let (state, out, done) = (&mut self.state, &mut self.out, &mut self.done);
        self.parser.feed(chunk, &mut |event, data| {
            if !*done {
                *done = state.event(event, data, out);
            }
        });
        Bytes::from(std::mem::take(&mut self.out))
    }

    /// The backend's body ended: what closes the translated stream, if the
    /// backend did not already close it.
    pub fn finish(&mut self) -> Bytes {
        let (state, out, done) = (&mut self.state, &mut self.out, &mut self.done);
        self.parser.finish(&mut |event, data| {
            if !*done {
                *done = state.event(event, data, out);
            }
        });
        if !self.done {
            self.state.close(&mut self.out);
            self.done = true;
        }
        Bytes::from(std::mem::take(&mut self.out))
    }
}

impl State {
    /// Translates one event; `true` when the stream is over.
    fn event(&mut self, event: Option<&str>, data: &[u8], out: &mut Vec<u8>) -> bool {
        match self {
            State::ToMessages(s) => s.event(data, out),
            State::ToChat(s) => s.event(event, data, out),
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        match self {
            State::ToMessages(s) => s.close(out),
            State::ToChat(s) => s.done(out),
        }
    }
}

fn anthropic_event(out: &mut Vec<u8>, v: &Value) {
    let kind = v["type"].as_str().unwrap_or("message");
    out.extend_from_slice(format!("event: {kind}\ndata: {v}\n\n").as_bytes());
}

fn openai_chunk(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
}

// ---------------------------------------------------------------------------

#[derive(PartialEq)]
enum Block {
    None,
    Text,
    /// A tool use block, for the OpenAI tool call of this index.
    Tool(u64),
}

/// OpenAI chunks → Anthropic events.
struct ToMessages {
    model: String,
    started: bool,
    block: Block,
    next_index: u64,
    finish: Option<String>,
    usage: Usage,
}

impl ToMessages {
    fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            started: false,
            block: Block::None,
            next_index: 0,
            finish: None,
            usage: Usage::default(),
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        anthropic_event(
            out,
            &json!({"type": "message_start", "message": {
                "id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.block != Block::None {
            anthropic_event(out, &json!({"type": "content_block_stop", "index": self.next_index - 1}));
            self.block = Block::None;
        }
    }

    fn open_block(&mut self, block: Block, content_block: Value, out: &mut Vec<u8>) -> u64 {
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        self.block = block;
        anthropic_event(out, &json!({"type": "content_block_start", "index": index, "content_block": content_block}));
        index
    }

    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        if data.trim_ascii() == b"[DONE]" {
            self.close(out);
            return true;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return false };
        if v.get("error").is_some_and(Value::is_object) {
            let message = v["error"]["message"].as_str().unwrap_or("the backend reported an error");
            anthropic_event(out, &anthropic_error(500, message));
            return true;
        }
        self.start(v["id"].as_str().unwrap_or("router"), out);
        if let Some(u) = Usage::from_openai(&v) {
            self.usage = u;
        }
        let choice = &v["choices"][0];
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            let index = match self.block {
                Block::Text => self.next_index - 1,
                _ => self.open_block(Block::Text, json!({"type": "text", "text": ""}), out),
            };
            anthropic_event(
                out,
                &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let call_index = call["index"].as_u64().unwrap_or(0);
            let index = match self.block {
                Block::Tool(i) if i == call_index && call.get("id").is_none_or(Value::is_null) => self.next_index - 1,
                _ => self.open_block(
                    Block::Tool(call_index),
                    json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}),
                    out,
                ),
            };
            if let Some(args) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                anthropic_event(
                    out,
                    &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
        false
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        self.start("router", out);
        self.close_block(out);
        anthropic_event(
            out,
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason_from_finish(Some(self.finish.as_deref().unwrap_or("stop"))), "stop_sequence": null},
                "usage": self.usage.to_anthropic()}),
        );
        anthropic_event(out, &json!({"type": "message_stop"}));
    }
}

// ---------------------------------------------------------------------------

/// Anthropic events → OpenAI chunks.
struct ToChat {
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    /// For each content block index, its tool call index (if a tool use).
    tools: Vec<(u64, u64)>,
    next_tool: u64,
    stop_reason: Option<String>,
    usage: Usage,
}

impl ToChat {
    fn new(model: &str, include_usage: bool) -> Self {
        Self {
            model: model.to_string(),
            id: "chatcmpl-router".into(),
            created: now_secs(),
            include_usage,
            tools: Vec::new(),
            next_tool: 0,
            stop_reason: None,
            usage: Usage::default(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    fn event(&mut self, event: Option<&str>, data: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return false };
        match v["type"].as_str().or(event) {
            Some("message_start") => {
                self.id = format!("chatcmpl-{}", v["message"]["id"].as_str().unwrap_or("router"));
                self.usage = Usage::from_anthropic(&v["message"]["usage"]).unwrap_or_default();
                openai_chunk(out, &self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            Some("content_block_start") if v["content_block"]["type"] == "tool_use" => {
                let tool = self.next_tool;
                self.next_tool += 1;
                self.tools.push((v["index"].as_u64().unwrap_or(0), tool));
                let b = &v["content_block"];
                openai_chunk(
                    out,
                    &self.chunk(
                        json!({"tool_calls": [{"index": tool, "id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": ""}}]}),
                        None,
                    ),
                );
            }
            Some("content_block_delta") => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => openai_chunk(out, &self.chunk(json!({"content": d["text"]}), None)),
                    Some("input_json_delta") => {
                        let block = v["index"].as_u64().unwrap_or(0);
                        if let Some((_, tool)) = self.tools.iter().find(|(b, _)| *b == block) {
                            let args = d["partial_json"].as_str().unwrap_or_default();
                            openai_chunk(
                                out,
                                &self.chunk(
                                    json!({"tool_calls": [{"index": tool, "function": {"arguments": args}}]}),
                                    None,
                                ),
                            );
                        }
                    }
                    // Thinking and signatures have no place in a chat stream.
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(stop) = v["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(stop.to_string());
                }
                if let Some(u) = v.get("usage").and_then(Usage::from_anthropic) {
                    self.usage.completion_tokens = u.completion_tokens;
                    if u.prompt_tokens > 0 {
                        (self.usage.prompt_tokens, self.usage.cache_read_tokens, self.usage.cache_write_tokens) =
                            (u.prompt_tokens, u.cache_read_tokens, u.cache_write_tokens);
                    }
                }
            }
            Some("message_stop") => {
                self.done(out);
                return true;
            }
            Some("error") => {
                let e = &v["error"];
                let message = e["message"].as_str().unwrap_or("the backend reported an error");
                openai_chunk(out, &openai_error(500, message, e["type"].as_str()));
                return true;
            }
            _ => {}
        }
        false
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        let finish = finish_from_stop_reason(Some(self.stop_reason.as_deref().unwrap_or("end_turn")));
        openai_chunk(out, &self.chunk(json!({}), finish));
        if self.include_usage {
            let usage = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage.to_openai()});
            openai_chunk(out, &usage);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of an output, as (event name, data JSON) pairs.
    fn events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
        let mut p = EventParser::default();
        let mut seen = Vec::new();
        let mut on = |e: Option<&str>, d: &[u8]| {
            let v = if d == b"[DONE]" { json!("[DONE]") } else { serde_json::from_slice(d).unwrap() };
            seen.push((e.map(str::to_owned), v));
        };
        p.feed(bytes, &mut on);
        p.finish(&mut on);
        seen
    }

    /// An OpenAI stream with text, a tool call whose arguments come in
    /// pieces, and the usage chunk, as OpenAI documents it.
    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Let me \"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"check.\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":7,\"total_tokens\":37,\"prompt_tokens_details\":{\"cached_tokens\":20}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// An Anthropic stream with text and a tool use, as Anthropic documents it.
    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-x\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":20,\"cache_creation_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me check.\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    /// Feeds `input` in pieces of `step` bytes.
    fn run(t: Translation, input: &str, step: usize) -> Vec<u8> {
        let mut s = t.stream("model-x", true);
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(step) {
            out.extend_from_slice(&s.push(piece));
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn an_openai_stream_becomes_anthropic_events_with_streamed_tool_arguments() {
        for step in [1, 7, 4096] {
            let ev = events(&run(Translation::MessagesViaChat, OPENAI_STREAM, step));
            let names: Vec<&str> = ev.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
            assert_eq!(
                names,
                [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_delta",
                    "content_block_stop",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop"
                ],
                "step {step}"
            );
            let indices: Vec<&Value> = ev[1..9].iter().map(|(_, v)| &v["index"]).collect();
            assert_eq!(indices, [&json!(0); 4].into_iter().chain([&json!(1); 4]).collect::<Vec<_>>(), "step {step}");
            assert_eq!(ev[5].1["content_block"]["name"], "weather");
            let args: String = ev[6..8].iter().map(|(_, v)| v["delta"]["partial_json"].as_str().unwrap()).collect();
            assert_eq!(args, r#"{"city":"Paris"}"#);
            assert_eq!(ev[9].1["delta"]["stop_reason"], "tool_use");
            assert_eq!(
                ev[9].1["usage"],
                json!({"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0})
            );
        }
    }

    #[test]
    fn an_anthropic_stream_becomes_openai_chunks_with_streamed_tool_arguments() {
        for step in [1, 13, 4096] {
            let ev = events(&run(Translation::ChatViaMessages, ANTHROPIC_STREAM, step));
            let text: String = ev.iter().filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str()).collect();
            assert_eq!(text, "Let me check.");
            let calls: Vec<&Value> =
                ev.iter().filter_map(|(_, v)| v["choices"][0]["delta"]["tool_calls"].get(0)).collect();
            assert_eq!(
                (calls[0]["id"].as_str(), calls[0]["function"]["name"].as_str()),
                (Some("toolu_1"), Some("weather"))
            );
            let args: String = calls.iter().filter_map(|c| c["function"]["arguments"].as_str()).collect();
            assert_eq!(args, r#"{"city": "Paris"}"#);
            let n = ev.len();
            assert_eq!(ev[n - 3].1["choices"][0]["finish_reason"], "tool_calls");
            assert_eq!(
                ev[n - 2].1["usage"],
                json!({"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37,
                    "prompt_tokens_details": {"cached_tokens": 20, "cache_creation_tokens": 0}})
            );
            assert_eq!(ev[n - 1].1, json!("[DONE]"));
        }
    }

    #[test]
    fn an_error_mid_stream_ends_with_the_doors_error_event() {
        let broken = format!(
            "{}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n",
            &ANTHROPIC_STREAM[..ANTHROPIC_STREAM.find("event: content_block_stop").unwrap()]
        );
        let ev = events(&run(Translation::ChatViaMessages, &broken, 64));
        let (_, last) = ev.last().unwrap();
        assert_eq!(last["error"]["message"], "Overloaded");
        assert!(!ev.iter().any(|(_, v)| *v == json!("[DONE]")), "an errored stream does not claim success");

        let broken = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"error\":{\"message\":\"upstream died\",\"type\":\"server_error\"}}\n\n";
        let ev = events(&run(Translation::MessagesViaChat, broken, 64));
        let (name, last) = ev.last().unwrap();
        assert_eq!((name.as_deref(), &last["error"]["message"]), (Some("error"), &json!("upstream died")));
        assert!(!ev.iter().any(|(n, _)| n.as_deref() == Some("message_stop")));
    }

    #[test]
    fn a_stream_that_ends_without_its_last_event_is_closed() {
        let cut = &OPENAI_STREAM[..OPENAI_STREAM.find("data: [DONE]").unwrap()];
        let ev = events(&run(Translation::MessagesViaChat, cut, 4096));
        assert_eq!(ev.last().unwrap().0.as_deref(), Some("message_stop"));
    }

    #[test]
    fn a_last_chunk_without_its_blank_line_is_translated_before_the_close() {
        let unterminated = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}";
        let ev = events(&run(Translation::MessagesViaChat, unterminated, 4096));
        let text: String = ev.iter().filter_map(|(_, v)| v["delta"]["text"].as_str()).collect();
        assert_eq!(text, "Hi");
        assert_eq!(ev.last().unwrap().0.as_deref(), Some("message_stop"));
    }

    #[test]
    fn one_calls_arguments_never_land_in_another_calls_block() {
        // Call 0 opens, call 1 opens, then more arguments for call 0.
        let chunk = |call: &str| {
            format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{call}]}}}}]}}\n\n")
        };
        let input = [
            chunk(r#"{"index":0,"id":"call_a","function":{"name":"f","arguments":"{\"a\":"}}"#),
            chunk(r#"{"index":1,"id":"call_b","function":{"name":"g","arguments":"{}"}}"#),
            chunk(r#"{"index":0,"function":{"arguments":"1}"}}"#),
        ]
        .concat();
        let ev = events(&run(Translation::MessagesViaChat, &input, 4096));
        let block_of_b = ev.iter().find(|(_, v)| v["content_block"]["id"] == "call_b").unwrap().1["index"].clone();
        let last_args = ev.iter().rev().find(|(_, v)| v["delta"]["partial_json"] == "1}").unwrap();
        assert_ne!(last_args.1["index"], block_of_b, "{ev:?}");
    }

    #[test]
    fn message_stop_ends_the_chat_stream_at_once() {
        let mut s = Translation::ChatViaMessages.stream("model-x", false);
        let out = s.push(ANTHROPIC_STREAM.as_bytes());
        assert!(out.ends_with(b"data: [DONE]\n\n"), "{}", String::from_utf8_lossy(&out));
        // Whatever a backend sends after it is not the client's.
        let after = s.push(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"late\"}}\n\n");
        assert!(after.is_empty() && s.finish().is_empty());
    }
}
