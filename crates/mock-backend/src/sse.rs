//! Streaming answers: a body fed by a channel, and a task that sends a
//! list of events with the mock's stream faults applied.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::Mock;

/// A response body fed by a channel: each message is one frame, an error
/// aborts the response (the connection is closed mid-body).
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|m| m.map(|r| r.map(http_body::Frame::data)))
    }
}

/// Streams `events` (each one SSE frame): `stream_delay_ms` between them;
/// after `cut_stream_after` of them the connection breaks; after
/// `stream_error_after` of them, `error_event` is sent and the stream ends.
/// The last frame (the closing one) always goes, unless cut.
pub fn stream(m: &Arc<Mock>, events: Vec<Bytes>, error_event: Bytes) -> Response {
    let delay = Duration::from_millis(m.stream_delay_ms.load(Ordering::Relaxed));
    let cut = m.cut_stream_after.load(Ordering::Relaxed);
    let error_after = m.stream_error_after.load(Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let mock = m.clone();
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            let i = i as u64;
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if cut > 0 && i >= cut {
                let _ = tx.send(Err(std::io::Error::other("injected stream cut"))).await;
                return;
            }
            if error_after > 0 && i >= error_after {
                let _ = tx.send(Ok(error_event)).await;
                return;
            }
            if tx.send(Ok(event)).await.is_err() {
                mock.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    });
    let mut response = axum::body::Body::new(ChannelBody(rx)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    response
}

/// `data: {json}` and a blank line.
pub fn data(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// `event: {type}`, `data: {json}` and a blank line.
pub fn event(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {v}\n\n", v["type"].as_str().unwrap_or("message")))
}
