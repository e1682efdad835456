//! Server-sent events of a streamed answer, read as they pass through.
//!
//! [`Scanner`] splits the bytes into lines across frame boundaries, keeps the
//! current `event:` name, and hands each `data:` line to the backend kind's
//! [`Provider::stream_event`](crate::Provider::stream_event), which records
//! what it finds in [`StreamFacts`]: the usage, the number of events, and an
//! error the backend reported inside its 200.

use crate::operation::Operation;
use crate::provider::Kind;
use crate::usage::Usage;

/// What a stream has told so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamFacts {
    /// The last usage reported.
    pub usage: Option<Usage>,
    /// `data:` events seen, other than `[DONE]`.
    pub events: u64,
    /// The first error the backend reported in the stream.
    pub error: Option<String>,
}

impl StreamFacts {
    /// Reads one `data:` line of the OpenAI (and native) shape: counts it,
    /// takes a `usage` object, and a top-level `error` object's message.
    /// Only lines that can hold either are parsed.
    pub fn openai_like(&mut self, data: &[u8]) {
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            return;
        }
        self.events += 1;
        let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
        if has(b"\"usage\"")
            && let Some(u) = Usage::from_json_field(data)
        {
            self.usage = Some(u);
        }
        if self.error.is_none() && has(b"\"error\"") {
            #[derive(serde::Deserialize)]
            struct WithError {
                error: Option<serde_json::Value>,
            }
            if let Ok(WithError { error: Some(e) }) = serde_json::from_slice::<WithError>(data)
                && e.is_object()
            {
                let message = e["message"].as_str().map(str::to_owned).unwrap_or_else(|| e.to_string());
                self.error = Some(message);
            }
        }
    }
}

/// The longest SSE event kept while waiting for its end.
const MAX_EVENT: usize = 1 << 20;

/// Splits bytes into server-sent events across frame boundaries: each event
/// is its `event:` name, if any, and its `data:` lines joined by newlines,
/// complete at a blank line.
#[derive(Default)]
pub struct EventParser {
    partial: Vec<u8>,
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
}

impl EventParser {
    /// Feeds bytes; calls `on_event(event, data)` for each event completed.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(Option<&str>, &[u8])) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.line(&rest[..nl], on_event);
            } else {
                self.partial.extend_from_slice(&rest[..nl]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line, on_event);
            }
            rest = &rest[nl + 1..];
        }
        if self.partial.len() + rest.len() <= MAX_EVENT {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
    }

    /// The stream ended: an event left without its blank line still counts.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(Option<&str>, &[u8])) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, on_event);
        }
        self.dispatch(on_event);
    }

    fn line(&mut self, line: &[u8], on_event: &mut dyn FnMut(Option<&str>, &[u8])) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(on_event);
        } else if let Some(name) = line.strip_prefix(b"event:") {
            self.event = Some(String::from_utf8_lossy(name.trim_ascii()).into_owned());
        } else if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if self.has_data {
                self.data.push(b'\n');
            }
            if self.data.len() + data.len() <= MAX_EVENT {
                self.data.extend_from_slice(data);
            }
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, on_event: &mut dyn FnMut(Option<&str>, &[u8])) {
        if self.has_data {
            on_event(self.event.as_deref(), &self.data);
        }
        self.event = None;
        self.data.clear();
        self.has_data = false;
    }
}

/// Reads a stream's events as its bytes pass.
pub struct Scanner {
    kind: Kind,
    op: Operation,
    parser: EventParser,
    pub facts: StreamFacts,
}

impl Scanner {
    pub fn new(kind: Kind, op: Operation) -> Self {
        Self { kind, op, parser: EventParser::default(), facts: StreamFacts::default() }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let (provider, op, facts) = (self.kind.provider(), self.op, &mut self.facts);
        self.parser.feed(chunk, &mut |event, data| provider.stream_event(op, event.map(str::as_bytes), data, facts));
    }

    /// The stream ended.
    pub fn finish(&mut self) {
        let (provider, op, facts) = (self.kind.provider(), self.op, &mut self.facts);
        self.parser.finish(&mut |event, data| provider.stream_event(op, event.map(str::as_bytes), data, facts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_across_frame_boundaries() {
        let mut s = Scanner::new(Kind::parse("openai").unwrap(), Operation::Chat);
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert!(s.facts.usage.is_none());
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tok");
        s.feed(b"ens\":12,\"completion_tokens\":9,\"total_tokens\":21}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.facts.usage,
            Some(Usage { prompt_tokens: 12, completion_tokens: 9, total_tokens: 21, ..Default::default() })
        );
        assert_eq!(s.facts.events, 2);
        let mut s = Scanner::new(Kind::parse("openai").unwrap(), Operation::Chat);
        s.feed(b"data: {\"usage\":null}\n");
        s.finish();
        assert!(s.facts.usage.is_none());
        assert_eq!(s.facts.events, 1, "the last event counts at the end, without its blank line");
    }

    #[test]
    fn multi_line_data_is_one_event() {
        let mut p = EventParser::default();
        let mut seen = Vec::new();
        p.feed(b"event: x\ndata: a\ndata: b\n\n: comment\ndata: c\n", &mut |e, d| {
            seen.push((e.map(str::to_owned), String::from_utf8_lossy(d).into_owned()))
        });
        p.finish(&mut |e, d| seen.push((e.map(str::to_owned), String::from_utf8_lossy(d).into_owned())));
        assert_eq!(seen, vec![(Some("x".into()), "a\nb".into()), (None, "c".into())]);
    }

    #[test]
    fn an_error_event_is_recorded_with_crlf_lines() {
        let mut s = Scanner::new(Kind::parse("openai").unwrap(), Operation::Chat);
        s.feed(b"event: error\r\ndata: {\"error\":{\"message\":\"boom\"}}\r\n\r\n");
        assert_eq!(s.facts.error.as_deref(), Some("boom"));
        let mut s = Scanner::new(Kind::parse("openai").unwrap(), Operation::Chat);
        s.feed(b"event: error\ndata: upstream overloaded\n\n");
        assert_eq!(s.facts.error.as_deref(), Some("upstream overloaded"));
    }

    fn events(chunks: &[&[u8]]) -> Vec<(Option<String>, Vec<u8>)> {
        let mut p = EventParser::default();
        let mut seen = Vec::new();
        let mut on = |e: Option<&str>, d: &[u8]| seen.push((e.map(str::to_owned), d.to_vec()));
        for c in chunks {
            p.feed(c, &mut on);
        }
        p.finish(&mut on);
        seen
    }

    #[test]
    fn an_event_left_without_its_newline_at_the_end_still_counts() {
        assert_eq!(
            events(&[b"data: a

data: {\"b\":1}"]),
            vec![(None, b"a".to_vec()), (None, b"{\"b\":1}".to_vec())]
        );
    }

    #[test]
    fn what_passes_the_event_limit_is_dropped_whether_in_one_line_or_across_frames() {
        // A data line longer than the limit, whole in one frame: the event
        // comes, without the data it could not keep.
        let long = [b"data: ".as_slice(), &vec![b'x'; MAX_EVENT + 1], b"\n\n"].concat();
        assert_eq!(events(&[&long]), vec![(None, Vec::new())]);
        // A line longer than the limit, still unfinished when a frame ends,
        // is dropped: the blank line after it ends no event.
        let unfinished = [b"data: ".as_slice(), &vec![b'x'; MAX_EVENT + 1]].concat();
        assert_eq!(events(&[&unfinished, b"\n\n"]), vec![]);
        // Up to the limit, both are kept.
        let fits = [b"data: ".as_slice(), &vec![b'x'; MAX_EVENT - 6]].concat();
        assert_eq!(events(&[&fits, b"\n\n"]), vec![(None, vec![b'x'; MAX_EVENT - 6])]);
    }

    #[test]
    fn openai_lines_are_counted_and_give_usage_and_the_first_error() {
        let mut f = StreamFacts::default();
        f.openai_like(br#"{"choices":[{"delta":{"content":"hi"}}]}"#);
        f.openai_like(br#" {"error":{"message":"first"}} "#);
        f.openai_like(br#"{"error":{"message":"second"}}"#);
        f.openai_like(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#);
        f.openai_like(b"[DONE]");
        assert_eq!(f.events, 4, "[DONE] is not an event");
        assert_eq!(f.error.as_deref(), Some("first"), "the first error is kept");
        assert_eq!(f.usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((3, 4)));
    }
}
