//! A streamed answer passed through to the client as it arrives.
//!
//! [`MeteredBody`] forwards each frame of the backend's body as soon as it is
//! read (no buffering), lets the backend kind's provider read the events as
//! they pass (usage, an error reported inside the 200), and runs steps 5 and
//! 6 of the pipeline exactly once, however the stream ends:
//!
//! - **complete**: the backend finished the body;
//! - **reported**: the backend finished, but reported an error in an event
//!   (which the client has received as it came);
//! - **broken**: the backend's body failed midway. The client gets the
//!   door's error event (see [`MeteredBody::with_break_event`]) and the
//!   stream ends: no silent truncation behind the 200;
//! - **client gone**: the client disconnected, so the body was dropped. That
//!   drops the backend's body too, which closes the upstream connection and
//!   cancels the request there.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use router_providers::sse::Scanner;
use router_providers::translate::stream::StreamTranslator;
use router_providers::transport::{AttemptError, ResponseBody};

use super::Finish;
use crate::limits::Usage;

/// How a stream ended.
#[derive(Debug)]
pub enum End {
    Complete,
    Reported(String),
    Broken(String),
    ClientGone,
}

/// Makes the event that tells the client, in the door's shape, that the
/// stream broke; given the reason.
pub type BreakEvent = fn(&str) -> Bytes;

pub struct MeteredBody {
    first: Option<Bytes>,
    rest: Option<ResponseBody>,
    scanner: Scanner,
    /// Turns the backend's events into the door's, when they differ.
    translator: Option<StreamTranslator>,
    finish: Option<(Finish, Arc<str>)>,
    break_event: Option<BreakEvent>,
}

impl MeteredBody {
    pub(super) fn new(
        first: Bytes,
        rest: ResponseBody,
        scanner: Scanner,
        translator: Option<StreamTranslator>,
        finish: Finish,
        backend: Arc<str>,
    ) -> Self {
        Self {
            first: Some(first),
            rest: Some(rest),
            scanner,
            translator,
            finish: Some((finish, backend)),
            break_event: None,
        }
    }

    /// What the client gets of `data`: the same bytes, or their translation
    /// (possibly nothing yet).
    fn pass(&mut self, data: Bytes) -> Bytes {
        self.scanner.feed(&data);
        match &mut self.translator {
            Some(t) => t.push(&data),
            None => data,
        }
    }

    /// The door's error event, sent when the backend's body breaks midway.
    pub fn with_break_event(mut self, event: BreakEvent) -> Self {
        self.break_event = Some(event);
        self
    }

    fn end(&mut self, end: End) {
        self.rest = None;
        if let Some((finish, backend)) = self.finish.take() {
            let facts = &self.scanner.facts;
            let end = match (end, &facts.error) {
                (End::Complete, Some(e)) => End::Reported(e.clone()),
                (end, _) => end,
            };
            // A stream cut short carries no usage event: count what reached
            // the client, one token per event (an estimate, and marked so by
            // the error on the record).
            let usage = facts.usage.or_else(|| {
                (!matches!(end, End::Complete) && facts.events > 0).then_some(Usage {
                    completion_tokens: facts.events,
                    total_tokens: facts.events,
                    ..Usage::default()
                })
            });
            finish.stream_done(backend, usage, end);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(first) = this.first.take() {
            let out = this.pass(first);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
        loop {
            let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.pass(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => {
                    let detail = AttemptError::classify(&*e, false).to_string();
                    this.end(End::Broken(detail.clone()));
                    return Poll::Ready(this.break_event.map(|event| Ok(Frame::data(event(&detail)))));
                }
                Poll::Ready(None) => {
                    this.scanner.finish();
                    let tail = this.translator.as_mut().map(StreamTranslator::finish).unwrap_or_default();
                    this.end(End::Complete);
                    return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
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
