//! A streamed answer passed through to the client as it arrives.
//!
//! [`MeteredBody`] forwards each frame of the backend's body as soon as it is
//! read (no buffering), watches the SSE lines for a `usage` object (OpenAI
//! sends it in the final chunk when `stream_options.include_usage` is set), and
//! runs steps 8 and 9 of the pipeline exactly once, however the stream ends:
//!
//! - **complete**: the backend finished the body;
//! - **broken**: the backend's body failed midway. The client gets an SSE
//!   error event and the stream ends: no silent truncation behind the 200;
//! - **client gone**: the client disconnected, so the body was dropped. That
//!   drops the backend's body too, which closes the upstream connection and
//!   cancels the request there.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::Finish;
use crate::limits::Usage;

/// How a stream ended.
#[derive(Debug)]
pub enum End {
    Complete,
    Broken(String),
    ClientGone,
}

/// Finds the last `usage` object in SSE `data:` lines, across frame
/// boundaries.
#[derive(Default)]
pub struct UsageScanner {
    partial: Vec<u8>,
    pub usage: Option<Usage>,
    /// `data:` events seen, other than `[DONE]`.
    pub events: u64,
}

/// The longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 1 << 20;

impl UsageScanner {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.line(&rest[..nl]);
            } else {
                self.partial.extend_from_slice(&rest[..nl]);
                let line = std::mem::take(&mut self.partial);
                self.line(&line);
            }
            rest = &rest[nl + 1..];
        }
        if self.partial.len() + rest.len() <= MAX_LINE {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        if data.trim_ascii() != b"[DONE]" {
            self.events += 1;
        }
        // Only lines that can hold usage are parsed.
        if !data.windows(7).any(|w| w == b"\"usage\"") {
            return;
        }
        if let Some(u) = super::parse_usage(data) {
            self.usage = Some(u);
        }
    }
}

pub struct MeteredBody {
    first: Option<Bytes>,
    rest: Option<Incoming>,
    scanner: UsageScanner,
    finish: Option<(Finish, Arc<str>)>,
}

impl MeteredBody {
    pub fn new(first: Bytes, rest: Incoming, finish: Finish, backend: Arc<str>) -> Self {
        Self { first: Some(first), rest: Some(rest), scanner: UsageScanner::default(), finish: Some((finish, backend)) }
    }

    fn end(&mut self, end: End) {
        self.rest = None;
        if let Some((finish, backend)) = self.finish.take() {
            // A stream cut short carries no usage chunk: count what reached
            // the client, one token per event (an estimate, and marked so by
            // the error on the record).
            let usage = self.scanner.usage.or_else(|| {
                (!matches!(end, End::Complete) && self.scanner.events > 0).then_some(Usage {
                    prompt_tokens: 0,
                    completion_tokens: self.scanner.events,
                    total_tokens: self.scanner.events,
                })
            });
            finish.stream_done(backend, usage, end);
        }
    }
}

/// The SSE event that tells the client the stream broke.
fn error_event(detail: &str) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": format!("the backend's stream broke midway: {detail}"),
        "type": "server_error",
        "param": null,
        "code": "stream_interrupted",
    }});
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            this.scanner.feed(&first);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.scanner.feed(&data);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => {
                    let detail = e.to_string();
                    this.end(End::Broken(detail.clone()));
                    return Poll::Ready(Some(Ok(Frame::data(error_event(&detail)))));
                }
                Poll::Ready(None) => {
                    this.end(End::Complete);
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.finish.is_some() {
            self.end(End::ClientGone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_found_across_frame_boundaries() {
        let mut s = UsageScanner::default();
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert!(s.usage.is_none());
        s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tok");
        s.feed(b"ens\":12,\"completion_tokens\":9,\"total_tokens\":21}}\n\ndata: [DONE]\n\n");
        assert_eq!(s.usage, Some(Usage { prompt_tokens: 12, completion_tokens: 9, total_tokens: 21 }));
        let mut s = UsageScanner::default();
        s.feed(b"data: {\"usage\":null}\n");
        assert!(s.usage.is_none());
    }
}
