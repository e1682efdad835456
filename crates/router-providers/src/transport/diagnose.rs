//! Keeps the TLS reason that HTTP/2 would lose.
//!
//! Under TLS 1.3 a server refuses a client certificate after the handshake
//! has completed on the client's side, with an alert the client reads on its
//! first read. Over HTTP/1.1 that read belongs to the request, which fails
//! with the alert. Over HTTP/2 it belongs to the connection's own task, whose
//! error hyper's pool discards; the request fails with "connection was not
//! ready". So the connector wraps every connection's I/O: a read or write
//! that fails with a TLS error is noted by destination, and a request to that
//! destination that fails at about the same time without a reason of its own
//! is given this one ([`Recent::take`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

/// How long a noted TLS failure explains a request's failure.
const WINDOW: Duration = Duration::from_secs(2);

/// TLS failures seen on connections, by destination (`host:port`).
#[derive(Clone, Default)]
pub struct Recent(Arc<Mutex<HashMap<String, (Instant, String)>>>);

impl Recent {
    fn note(&self, authority: &str, reason: String) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the number of backends; stale entries go on each note.
        map.retain(|_, (at, _)| at.elapsed() < WINDOW);
        map.insert(authority.to_string(), (Instant::now(), reason));
    }

    /// The TLS reason noted for `authority` in the last moments.
    pub fn take(&self, authority: &str) -> Option<String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(authority) {
            Some((at, reason)) if at.elapsed() < WINDOW => Some(reason),
            _ => None,
        }
    }
}

/// A connector whose connections note their TLS failures in `recent`.
#[derive(Clone)]
pub struct Diagnosing<C> {
    pub inner: C,
    pub recent: Recent,
}

impl<C> tower_service::Service<Uri> for Diagnosing<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
{
    type Response = Diagnosed<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let authority = dst.authority().map(|a| a.to_string()).unwrap_or_default();
        let recent = self.recent.clone();
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Diagnosed { io, authority, recent })
        })
    }
}

/// One connection's I/O, noting a TLS failure as it passes.
pub struct Diagnosed<T> {
    io: T,
    authority: String,
    recent: Recent,
}

impl<T> Diagnosed<T> {
    fn check<R>(&self, result: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(e)) = &result
            && let Some(reason) = super::tls::reason(e)
        {
            self.recent.note(&self.authority, reason);
        }
        result
    }
}

impl<T: Read + Unpin> Read for Diagnosed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        self.check(result)
    }
}

impl<T: Write + Unpin> Write for Diagnosed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.check(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(result)
    }
}

impl<T: Connection> Connection for Diagnosed<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
