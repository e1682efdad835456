//! The HTTP server: the accept loop and each connection's life, under the
//! limits a hostile client meets.
//!
//! - At most [`ServerSettings::max_connections`] client connections; past
//!   that a new one is closed at once (counted, logged), and the ones open
//!   keep being served. Accept errors (out of file descriptors) back off.
//! - A client has [`ServerSettings::header_read_timeout`] to send a request's
//!   headers, counted from the connection's start (or from the first byte of
//!   a later request's headers); then the connection is closed. A connection
//!   with no bytes in either direction for [`ServerSettings::idle_timeout`]
//!   is shut down gracefully (an answer in progress finishes), and closed
//!   after a second idle period.
//! - Header blocks over [`ServerSettings::max_header_bytes`] or with more
//!   than [`ServerSettings::max_headers`] headers: 431 (hyper). Requests
//!   framed two ways (smuggling): 400 and closed ([`framing`]).
//! - TLS, when configured ([`tls`]): the handshake within the header
//!   timeout; the certificate reloaded when its files change.
//! - HTTP/1.1, or HTTP/2 when the client's first bytes are its preface
//!   (prior knowledge, or after TLS), found by reading ahead within the
//!   header timeout; hyper then serves the connection in that version.
//! - Each request is served with the peer's address ([`App::serve`]).
//!
//! The body's read timeout and size limit are the doors' (`read_body`).

pub mod framing;
pub mod tls;

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use router_core::metrics::Metrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use self::framing::{Framing, H2_PREFACE};
use crate::App;

/// The server's limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Time to send a request's headers (`HTTP_HEADER_READ_TIMEOUT_MS`).
    pub header_read_timeout: Duration,
    /// A connection silent this long is shut down (`HTTP_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
    /// Open client connections at most (`HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// A request's header block at most, in bytes (`HTTP_MAX_HEADER_BYTES`).
    pub max_header_bytes: usize,
    /// Headers in a request at most (`HTTP_MAX_HEADERS`).
    pub max_headers: usize,
    /// Serve TLS with these files (`TLS_CERT_FILE`, `TLS_KEY_FILE`).
    pub tls: Option<tls::TlsFiles>,
}

/// Why the server stopped.
#[derive(Debug)]
pub enum ServeError {
    Tls(tls::ServerTlsError),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Tls(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ServeError {}

/// Milliseconds on a monotonic clock (since the first call).
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What the watchdog of one connection reads.
struct ConnState {
    /// When the header block being received started (0: none).
    head_started_ms: AtomicU64,
    /// The last byte in either direction.
    last_io_ms: AtomicU64,
}

/// Everything the connections share.
struct Shared {
    app: App,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    settings: ServerSettings,
    metrics: Metrics,
    tls: Option<tls::ServerTls>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then shuts every
/// connection down gracefully and returns once they are all closed (the
/// caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: App,
    settings: ServerSettings,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let tls = match &settings.tls {
        Some(files) => Some(tls::ServerTls::load(files.clone()).map_err(ServeError::Tls)?),
        None => None,
    };
    let mut h1 = http1::Builder::new();
    // hyper refuses a larger header block with 431 (its buffer has a floor
    // of 8 KiB). Header and idle timeouts are the watchdog's, not hyper's.
    h1.keep_alive(true)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers)
        .header_read_timeout(None);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let shared = Arc::new(Shared { app, h1, h2, settings, metrics, tls });
    let cancel = tokio_util::sync::CancellationToken::new();
    if let Some(tls) = &shared.tls {
        tokio::spawn(tls.clone().watch(cancel.clone()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = TaskTracker::new();
    let mut refused_logged: Option<Instant> = None;
    let mut accept_error_logged: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: say so (once a second) and back off.
                    if accept_error_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, "cannot accept a client connection");
                        accept_error_logged = Some(Instant::now());
                    }
                    shared.metrics.http_accept_errors.inc();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.http_connections_refused.inc();
            if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(
                    max_connections = shared.settings.max_connections,
                    "client connection limit reached; closing new connections"
                );
                refused_logged = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let (shared, stop) = (shared.clone(), stop_rx.clone());
        connections.spawn(async move {
            shared.metrics.http_connections.inc();
            connection(stream, peer, &shared, stop).await;
            shared.metrics.http_connections.dec();
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    cancel.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One connection: TLS if configured, then HTTP under the watchdog.
async fn connection(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>, stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState {
        head_started_ms: AtomicU64::new(mono_ms().max(1)),
        last_io_ms: AtomicU64::new(mono_ms()),
    });
    match &shared.tls {
        None => drive(stream, peer, shared, stop, state).await,
        // Boxed, as an HTTP/2 connection is (in `drive`): inline, a TLS
        // session's state and HTTP/2's sized every connection's task for
        // them, a plain HTTP/1.1 one's included (10.3 KB a task; 2.4 KB
        // with both boxed, `docs/benchmarks.md`).
        Some(tls) => Box::pin(tls_connection(tls, stream, peer, shared, stop, state)).await,
    }
}

/// The TLS handshake, within the header timeout, then HTTP.
async fn tls_connection(
    tls: &tls::ServerTls,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
    state: Arc<ConnState>,
) {
    match tokio::time::timeout(shared.settings.header_read_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => drive(stream, peer, shared, stop, state).await,
        Ok(Err(e)) => {
            shared.metrics.http_connections_closed.with_label_values(&["tls_handshake"]).inc();
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.http_connections_closed.with_label_values(&["header_timeout"]).inc();
        }
    }
}

async fn drive<I>(io: I, peer: SocketAddr, shared: &Arc<Shared>, mut stop: watch::Receiver<bool>, state: Arc<ConnState>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &shared.settings;
    let mut io = Guarded::new(io, state.clone(), settings.max_header_bytes, shared.metrics.clone());
    // HTTP/1.1 or HTTP/2, from the first bytes, within the header timeout
    // (the watchdog, [`watch`], starts after); a shutdown meanwhile closes it.
    let h2 = tokio::select! {
        found = tokio::time::timeout(settings.header_read_timeout, io.speaks_h2()) => match found {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
                return;
            }
            Err(_) => {
                shared.metrics.http_connections_closed.with_label_values(&["header_timeout"]).inc();
                return;
            }
        },
        _ = stop.changed() => return,
    };
    let app = shared.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(app.app.serve(request, peer).await) }
    });
    let io = TokioIo::new(io);
    if h2 {
        // Boxed, so that HTTP/1.1 connections' tasks are not sized for it
        // (see `connection`).
        let conn = Box::pin(shared.h2.serve_connection(io, service));
        watch(conn, |c| c.get_mut().as_mut().graceful_shutdown(), peer, shared, stop, &state).await;
    } else {
        let conn = shared.h1.serve_connection(io, service).with_upgrades();
        watch(conn, |c| c.graceful_shutdown(), peer, shared, stop, &state).await;
    }
}

/// Serves `conn` (hyper's HTTP/1.1 or HTTP/2 connection) until it ends,
/// under the watchdog: the header and idle timeouts, and a graceful
/// shutdown (`shutdown`) when the server stops.
async fn watch<C>(
    conn: C,
    shutdown: impl Fn(Pin<&mut C>),
    peer: SocketAddr,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    state: &ConnState,
) where
    C: Future<Output = hyper::Result<()>>,
{
    let settings = &shared.settings;
    tokio::pin!(conn);
    let tick = (settings.header_read_timeout.min(settings.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(tick);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutting_down_since: Option<u64> = None;
    let header_ms = settings.header_read_timeout.as_millis() as u64;
    let idle_ms = settings.idle_timeout.as_millis() as u64;
    loop {
        tokio::select! {
            // The connection first, every time: it is what wakes the task
            // (no random start, which cost a draw on every wake-up).
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if shutting_down_since.is_none() => {
                if changed.is_ok() {
                    shutdown(conn.as_mut());
                    shutting_down_since = Some(mono_ms());
                }
            }
            _ = watchdog.tick() => {
                let now = mono_ms();
                let head = state.head_started_ms.load(Ordering::Relaxed);
                if head != 0 && now.saturating_sub(head) > header_ms {
                    shared.metrics.http_connections_closed.with_label_values(&["header_timeout"]).inc();
                    return;
                }
                let quiet = now.saturating_sub(state.last_io_ms.load(Ordering::Relaxed));
                match shutting_down_since {
                    None if quiet > idle_ms => {
                        shared.metrics.http_connections_closed.with_label_values(&["idle"]).inc();
                        shutdown(conn.as_mut());
                        shutting_down_since = Some(now);
                    }
                    // A client that stopped reading its answer.
                    Some(since) if quiet > idle_ms && now.saturating_sub(since) > idle_ms => return,
                    _ => {}
                }
            }
        }
    }
}

/// The most read from a client at once.
const SCRATCH_BYTES: usize = 16 * 1024;
/// The checked-bytes buffer is kept between reads up to this size (a
/// request's head and a small body); a larger one is freed once read.
const KEPT_READY_BYTES: usize = 4 * 1024;

/// The client's byte stream as hyper reads it: request framing checked
/// ([`Framing`]), the header timer and the last activity noted.
struct Guarded<T> {
    inner: T,
    framing: Framing,
    /// Checked bytes not yet given to hyper.
    ready: Vec<u8>,
    ready_at: usize,
    eof: bool,
    state: Arc<ConnState>,
    metrics: Metrics,
}

impl<T> Guarded<T> {
    fn new(inner: T, state: Arc<ConnState>, max_head: usize, metrics: Metrics) -> Self {
        Self { inner, framing: Framing::new(max_head), ready: Vec::new(), ready_at: 0, eof: false, state, metrics }
    }
}

impl<T: AsyncRead + Unpin> Guarded<T> {
    /// Checked bytes waiting for hyper.
    fn pending(&self) -> &[u8] {
        &self.ready[self.ready_at..]
    }

    /// One read from the client, checked into `ready` (or the end noted).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // On the stack, and not zeroed: a buffer held per connection was
        // 16 KiB of every connection's memory (and a 16 KiB memset per
        // connection).
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH_BYTES];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        let data = read.filled();
        if data.is_empty() {
            self.eof = true;
            self.framing.flush(&mut self.ready);
            return Poll::Ready(Ok(()));
        }
        let now = mono_ms();
        self.state.last_io_ms.store(now, Ordering::Relaxed);
        let refused = self.framing.refused;
        self.framing.push(data, &mut self.ready);
        if self.framing.refused > refused {
            self.metrics.http_requests_refused.with_label_values(&["ambiguous_framing"]).inc();
        }
        if self.framing.reading_head() {
            // A new header block: its timer starts (a connection's first
            // block is timed from the connection's start).
            let _ = self.state.head_started_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        } else {
            self.state.head_started_ms.store(0, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }

    /// Whether the client speaks HTTP/2 (its first bytes are the connection
    /// preface), read ahead without consuming: hyper then reads them as
    /// usual. (hyper-util's `auto` server finds out the same way but gives
    /// the first 24 bytes back as a read of their own, which made hyper grow
    /// every connection's read buffer from 8 to 16 KiB.)
    async fn speaks_h2(&mut self) -> io::Result<bool> {
        std::future::poll_fn(|cx| {
            loop {
                let seen = self.pending();
                let n = seen.len().min(H2_PREFACE.len());
                if seen[..n] != H2_PREFACE[..n] {
                    return Poll::Ready(Ok(false));
                }
                if n == H2_PREFACE.len() {
                    return Poll::Ready(Ok(true));
                }
                if self.eof {
                    return Poll::Ready(Ok(false));
                }
                ready!(self.poll_fill(cx))?;
            }
        })
        .await
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready_at = 0;
                    if this.ready.capacity() > KEPT_READY_BYTES {
                        // A large body's chunks went through: not held
                        // for the rest of the connection's life.
                        this.ready = Vec::new();
                    } else {
                        this.ready.clear();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        if n > 0 {
            this.state.last_io_ms.store(mono_ms(), Ordering::Relaxed);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.state.last_io_ms.store(mono_ms(), Ordering::Relaxed);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Sends `request` from the client's end and reads it through `g`.
    async fn pass(g: &mut Guarded<DuplexStream>, client: &mut DuplexStream, request: &[u8]) {
        client.write_all(request).await.unwrap();
        let mut got = vec![0u8; request.len()];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
    }

    #[tokio::test]
    async fn a_large_body_read_through_is_not_held_by_the_connection() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let state = Arc::new(ConnState { head_started_ms: AtomicU64::new(1), last_io_ms: AtomicU64::new(0) });
        let mut g = Guarded::new(server, state, 16 * 1024, Metrics::new());
        let small = b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        pass(&mut g, &mut client, small).await;
        assert!(g.ready.capacity() > 0, "a small request's buffer is kept for the next one");
        let mut big = b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n".to_vec();
        big.resize(big.len() + 60_000, b'x');
        pass(&mut g, &mut client, &big).await;
        assert!(
            g.ready.capacity() <= KEPT_READY_BYTES,
            "{} bytes held after a 60 KB body was read",
            g.ready.capacity()
        );
        pass(&mut g, &mut client, small).await;
    }
}
