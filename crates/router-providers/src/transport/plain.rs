//! `http://` backends: HTTP/1.1 over kept-alive connections, without
//! hyper-util's pool.
//!
//! hyper-util's legacy client spends a sixth of a request's instructions on
//! its pool (a checkout with waiters and connect racing, boxed futures, a
//! task per returned connection: see `docs/benchmarks.md`). For plain
//! HTTP/1.1 a pool needs less: per destination, a stack of idle
//! `SendRequest`s. A request takes the most recently used one (or connects),
//! sends in origin form with a `Host` header, and its answer's body gives the
//! connection back once read to the end. An answer not read to the end takes
//! its connection with it (hyper closes it). A request that a pooled
//! connection could not send (closed by the backend meanwhile) is sent on the
//! next one, or a new one. Connections idle for [`IDLE_TIMEOUT`] are closed.
//! TLS backends (and HTTP/2, which needs ALPN) stay on hyper-util's client.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{AttemptError, BoxError, ResponseBody};

/// An idle connection is closed after this long (as hyper-util's pool was
/// configured before).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per destination at most.
const MAX_IDLE: usize = 1024;
/// How often idle connections are looked over.
const REAP_EVERY: Duration = Duration::from_secs(10);

type Sender = SendRequest<Full<Bytes>>;

/// Idle connections per destination (see the module doc). A clone shares
/// the pool.
#[derive(Clone)]
pub struct PlainPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held only to push or pop, never across an await.
    /// foldhash: destinations come from the configuration, not from
    /// clients, so SipHash's defence against chosen keys buys nothing here,
    /// and it cost ~240 instructions a lookup, two lookups a request.
    idle: Mutex<foldhash::HashMap<Origin, VecDeque<Idle>>>,
    connect_timeout: Duration,
    /// The reaper task is started with the first connection (the pool may
    /// be built outside a runtime).
    reaping: AtomicBool,
}

/// A destination: its authority as written, compared and hashed as one
/// string. (`Authority`'s own `Hash` lowercases it byte by byte, which cost
/// about 900 instructions a lookup, two lookups a request; a target's URIs
/// are built once, so its authority is written the same way every time.)
#[derive(Clone)]
struct Origin(Authority);

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl PlainPool {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(foldhash::HashMap::default()),
                connect_timeout,
                reaping: AtomicBool::new(false),
            }),
        }
    }

    /// One exchange: a pooled connection, or a new one.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<ResponseBody>, AttemptError> {
        let (mut parts, body) = request.into_parts();
        let authority =
            Origin(parts.uri.authority().cloned().ok_or_else(|| AttemptError::Connect("the URL has no host".into()))?);
        if !parts.headers.contains_key(HOST) {
            let host = HeaderValue::from_str(authority.0.as_str()).map_err(|e| AttemptError::Connect(e.to_string()))?;
            parts.headers.insert(HOST, host);
        }
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
        let mut request = Request::from_parts(parts, body);

        while let Some(mut sender) = self.inner.checkout(&authority) {
            // Ready once the connection's task has seen the last answer end;
            // an error means it closed meanwhile.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(response, sender, authority)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed before it could be.
                    Some(unsent) => request = unsent,
                    None => return Err(AttemptError::classify(e.error(), false)),
                },
            }
        }
        let mut sender = self.connect(&authority).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(self.pooled(response, sender, authority)),
            Err(e) => Err(AttemptError::classify(&e, false)),
        }
    }

    fn pooled(&self, response: Response<Incoming>, sender: Sender, authority: Origin) -> Response<ResponseBody> {
        let keep = Keep { sender, authority, pool: Arc::downgrade(&self.inner) };
        response.map(|body| ResponseBody::Pooled(PooledBody { body, keep: Some(keep) }))
    }

    async fn connect(&self, Origin(authority): &Origin) -> Result<Sender, AttemptError> {
        self.inner.start_reaper();
        // An IPv6 literal is bracketed in the authority, not in an address.
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let tcp = match tokio::time::timeout(self.inner.connect_timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(AttemptError::Connect(e.to_string())),
            Err(_) => {
                return Err(AttemptError::Connect(format!(
                    "no connection within {} ms",
                    self.inner.connect_timeout.as_millis()
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let (sender, connection) =
            Builder::new().handshake(TokioIo::new(tcp)).await.map_err(|e| AttemptError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Inner {
    /// The most recently used idle connection to `authority`.
    fn checkout(&self, authority: &Origin) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(authority)?;
        while let Some(entry) = list.pop_back() {
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    fn give_back(&self, authority: Origin, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(authority).or_default();
        if list.len() < MAX_IDLE {
            list.push_back(Idle { sender, since: Instant::now() });
        }
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`] at `now` (the oldest are
    /// at the front), and forgets destinations with none left.
    fn reap(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in idle.values_mut() {
            while list.front().is_some_and(|e| now.duration_since(e.since) >= IDLE_TIMEOUT || e.sender.is_closed()) {
                list.pop_front();
            }
        }
        idle.retain(|_, list| !list.is_empty());
    }

    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REAP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.reap(Instant::now()),
                    None => return,
                }
            }
        });
    }
}

/// What gives a connection back to its pool.
struct Keep {
    sender: Sender,
    authority: Origin,
    pool: Weak<Inner>,
}

impl Keep {
    fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(self.authority, self.sender);
        }
    }
}

/// An answer's body whose connection goes back to the pool when it ends.
pub struct PooledBody {
    body: Incoming,
    keep: Option<Keep>,
}

impl PooledBody {
    fn done(&mut self) {
        if let Some(keep) = self.keep.take() {
            keep.give_back();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) if self.body.is_end_stream() => self.done(),
            None => self.done(),
            // The connection is broken: it goes with the body.
            Some(Err(_)) => self.keep = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    /// A body dropped unread but already complete (an empty one) leaves its
    /// connection reusable.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// A backend that answers each request on a connection with `answer`
    /// (and then, with `hang_up`, closes it), and reports each accepted
    /// connection and each request head it read.
    async fn backend(answer: &'static str, hang_up: bool) -> (u16, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tx.send("connection".to_string()).unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = tcp.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // Requests here have a 2-byte body after the head.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            if buf.len() < end + 6 {
                                break;
                            }
                            let head: Vec<u8> = buf.drain(..end + 6).collect();
                            tx.send(String::from_utf8_lossy(&head[..end]).into_owned()).unwrap();
                            if tcp.write_all(answer.as_bytes()).await.is_err() || hang_up {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    fn request(uri: &str) -> Request<Full<Bytes>> {
        Request::post(uri).body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    }

    async fn read(response: Response<ResponseBody>) -> (u16, Bytes) {
        let status = response.status().as_u16();
        (status, response.into_body().collect().await.unwrap().to_bytes())
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn requests_go_in_origin_form_with_a_host_and_reuse_one_connection() {
        let (port, mut seen) = backend(OK, false).await;
        let pool = PlainPool::new(Duration::from_secs(2));
        for _ in 0..3 {
            let response = pool.send(request(&format!("http://127.0.0.1:{port}/v1/chat?x=1"))).await.unwrap();
            assert_eq!(read(response).await, (200, Bytes::from_static(b"hello")));
        }
        assert_eq!(seen.recv().await.unwrap(), "connection");
        for _ in 0..3 {
            let head = seen.recv().await.unwrap();
            assert!(head.starts_with("POST /v1/chat?x=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.to_ascii_lowercase().contains(&format!("host: 127.0.0.1:{port}")), "{head}");
        }
        assert!(seen.try_recv().is_err(), "one connection for three requests");
    }

    #[tokio::test]
    async fn an_answer_not_read_to_the_end_does_not_leave_its_connection_in_the_pool() {
        let (port, mut seen) = backend(OK, false).await;
        let pool = PlainPool::new(Duration::from_secs(2));
        let uri = format!("http://127.0.0.1:{port}/");
        drop(pool.send(request(&uri)).await.unwrap());
        assert_eq!(read(pool.send(request(&uri)).await.unwrap()).await.0, 200);
        let events: Vec<String> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
        assert_eq!(events.iter().filter(|e| *e == "connection").count(), 2, "{events:?}");
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_all_return_to_the_pool() {
        let (port, mut seen) = backend(OK, false).await;
        let pool = Arc::new(PlainPool::new(Duration::from_secs(2)));
        let uri = format!("http://127.0.0.1:{port}/");
        // Four answers held unread at once need four connections.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.send(request(&uri)).await.unwrap());
        }
        for response in held {
            assert_eq!(read(response).await.0, 200);
        }
        let authority = Origin(format!("127.0.0.1:{port}").parse().unwrap());
        assert_eq!(pool.inner.idle.lock().unwrap()[&authority].len(), 4);
        for _ in 0..8 {
            assert_eq!(read(pool.send(request(&uri)).await.unwrap()).await.0, 200);
        }
        let events: Vec<String> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
        assert_eq!(events.iter().filter(|e| *e == "connection").count(), 4, "{events:?}");
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_used_again() {
        // The backend closes after each answer.
        let (port, mut seen) =
            backend("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok", false).await;
        let pool = PlainPool::new(Duration::from_secs(2));
        let uri = format!("http://127.0.0.1:{port}/");
        for _ in 0..3 {
            assert_eq!(read(pool.send(request(&uri)).await.unwrap()).await, (200, Bytes::from_static(b"ok")));
        }
        let events: Vec<String> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
        assert_eq!(events.iter().filter(|e| *e == "connection").count(), 3, "{events:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pool = PlainPool::new(Duration::from_secs(2));
        let err = pool.send(request(&format!("http://127.0.0.1:{port}/"))).await.unwrap_err();
        assert_eq!(err.error_type(), "connect", "{err}");
    }

    #[tokio::test]
    async fn a_backend_that_hangs_up_mid_answer_is_an_io_error_and_its_connection_is_not_kept() {
        let (port, _seen) = backend("HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\npartial", true).await;
        let pool = PlainPool::new(Duration::from_secs(2));
        let response = pool.send(request(&format!("http://127.0.0.1:{port}/"))).await.unwrap();
        let e = response.into_body().collect().await.unwrap_err();
        assert_eq!(AttemptError::classify(&*e, false).error_type(), "io", "{e}");
        assert!(pool.inner.idle.lock().unwrap().values().all(VecDeque::is_empty));
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (port, _seen) = backend(OK, false).await;
        let pool = PlainPool::new(Duration::from_secs(2));
        let uri = format!("http://127.0.0.1:{port}/");
        assert_eq!(read(pool.send(request(&uri)).await.unwrap()).await.0, 200);
        let authority = Origin(format!("127.0.0.1:{port}").parse().unwrap());
        let idle = |pool: &PlainPool| pool.inner.idle.lock().unwrap().get(&authority).map_or(0, VecDeque::len);
        assert_eq!(idle(&pool), 1);
        let now = Instant::now();
        pool.inner.reap(now + IDLE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(idle(&pool), 1, "not yet");
        pool.inner.reap(now + IDLE_TIMEOUT);
        assert_eq!(idle(&pool), 0, "closed after the idle timeout");
        assert!(pool.inner.idle.lock().unwrap().is_empty(), "the destination is forgotten");
    }
}
