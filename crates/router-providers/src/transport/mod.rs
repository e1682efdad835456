//! The transport: HTTP to backends over pooled keep-alive connections, with a
//! per-attempt timeout and a classification of every failure.
//!
//! [`HttpTransport`] sends to `http://` backends over HTTP/1.1 on its own
//! pool of kept-alive connections ([`plain`]), and to `https://` backends on
//! hyper-util's pooled client over a rustls connector: they get TLS (webpki roots, plus an extra CA bundle and a
//! client certificate per TLS configuration, see [`tls`]) and HTTP/2 when the
//! handshake agrees on `h2` by ALPN, HTTP/1.1 otherwise. [`Transports`] keeps one such client (one pool) per
//! distinct TLS configuration, outside the routing snapshots, so that pools
//! survive configuration changes.
//!
//! The [`Transport`] trait is what the router's core calls; tests plug in an
//! in-process transport that serves requests from the mock without sockets,
//! so that timeouts can be tested on paused time.
//!
//! [`send`], [`open_stream`], [`get`] and [`probe`] are one exchange each,
//! bounded by a timeout, with every failure an [`AttemptError`].

mod diagnose;
pub mod plain;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::diagnose::{Diagnosing, Recent};
use self::plain::{PlainPool, PooledBody};
use self::tls::{TlsError, TlsSpec};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why one attempt at a backend failed. Each variant is one `error_type` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError {
    /// The connection could not be made.
    Connect(String),
    /// The TLS handshake (or the peer's verdict on our certificate) failed;
    /// a short reason such as `certificate not trusted`.
    Tls(String),
    /// No complete answer within the per-attempt timeout.
    Timeout,
    /// The connection broke while sending or reading.
    Io(String),
    /// The backend answered with a status that triggers failover (5xx, 429, 408).
    Status(StatusCode),
    /// The backend asked to be left alone for a while: a 429, 503 or 529
    /// with `Retry-After` or a provider's rate-limit reset header.
    Throttled { status: StatusCode, retry_after: Duration },
    /// A redirect (3xx): an inference backend that redirects is broken, and
    /// the router never follows one.
    Redirect(StatusCode),
    /// An answer larger than the limit (`BACKEND_MAX_RESPONSE_BYTES`).
    TooLarge { limit: usize },
}

impl AttemptError {
    /// The low-cardinality label used in metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Tls(_) => "tls",
            AttemptError::Timeout => "timeout",
            AttemptError::Io(_) => "io",
            AttemptError::Status(s) | AttemptError::Throttled { status: s, .. } if s.is_server_error() => "status_5xx",
            AttemptError::Status(s) | AttemptError::Throttled { status: s, .. }
                if *s == StatusCode::TOO_MANY_REQUESTS =>
            {
                "status_429"
            }
            AttemptError::Status(_) | AttemptError::Throttled { .. } => "status_408",
            AttemptError::Redirect(_) => "redirect",
            AttemptError::TooLarge { .. } => "too_large",
        }
    }

    /// Whether this failure counts towards ejecting the backend. 429 and 408
    /// say "not now", not "broken": they fail over but do not eject; nor
    /// does a backend that said when to come back (it cools down instead).
    pub fn counts_against_health(&self) -> bool {
        match self {
            AttemptError::Status(s) => s.is_server_error(),
            AttemptError::Throttled { .. } => false,
            _ => true,
        }
    }

    /// The HTTP status the backend answered, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            AttemptError::Status(s) | AttemptError::Throttled { status: s, .. } | AttemptError::Redirect(s) => Some(*s),
            _ => None,
        }
    }

    pub const ERROR_TYPES: [&'static str; 9] =
        ["connect", "tls", "timeout", "io", "status_5xx", "status_429", "status_408", "redirect", "too_large"];

    /// Classifies a transport error: TLS first (wherever it shows in the
    /// chain), then connect, then any other I/O failure.
    pub fn classify(e: &(dyn std::error::Error + 'static), is_connect: bool) -> AttemptError {
        if let Some(reason) = tls::reason(e) {
            AttemptError::Tls(reason)
        } else if is_connect {
            AttemptError::Connect(source_text(e))
        } else {
            AttemptError::Io(source_text(e))
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "connect error: {e}"),
            AttemptError::Tls(e) => write!(f, "tls: {e}"),
            AttemptError::Timeout => write!(f, "timed out"),
            AttemptError::Io(e) => write!(f, "connection error: {e}"),
            AttemptError::Status(s) => write!(f, "backend answered {}", s.as_u16()),
            AttemptError::Throttled { status, retry_after } => write!(
                f,
                "backend answered {}, retry after {} s",
                status.as_u16(),
                retry_after.as_secs_f64().ceil() as u64
            ),
            AttemptError::Redirect(s) => write!(f, "backend answered {} (a redirect, not followed)", s.as_u16()),
            AttemptError::TooLarge { limit } => write!(f, "backend answer larger than {limit} bytes"),
        }
    }
}

/// Whether a backend status triggers failover (a redirect does too).
pub fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status.is_redirection()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// The failure for a retryable status: [`AttemptError::Throttled`] when a
/// 429, 503 or 529 says when to come back, else [`AttemptError::Status`].
fn failed_status(parts: &http::response::Parts) -> AttemptError {
    if parts.status.is_redirection() {
        return AttemptError::Redirect(parts.status);
    }
    let waits = matches!(parts.status.as_u16(), 429 | 503 | 529);
    match retry_after(&parts.headers, std::time::SystemTime::now()).filter(|_| waits) {
        Some(retry_after) => AttemptError::Throttled { status: parts.status, retry_after },
        None => AttemptError::Status(parts.status),
    }
}

/// How long a backend asks to be left alone: `Retry-After` (seconds or an
/// HTTP date) if present, else the latest of the providers' reset headers
/// (OpenAI's `x-ratelimit-reset-*` durations such as `6m0s`, Anthropic's
/// `anthropic-ratelimit-*-reset` timestamps).
pub fn retry_after(headers: &http::HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<f64>()
            && secs.is_finite()
            && secs >= 0.0
        {
            return Some(Duration::from_secs_f64(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(at.duration_since(now).unwrap_or_default());
        }
    }
    let mut latest: Option<Duration> = None;
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        let name = name.as_str();
        let wait = if name.starts_with("x-ratelimit-reset-") {
            go_duration(value.trim())
        } else if name.starts_with("anthropic-ratelimit-") && name.ends_with("-reset") {
            humantime::parse_rfc3339(value.trim()).ok().map(|at| at.duration_since(now).unwrap_or_default())
        } else {
            None
        };
        latest = latest.max(wait);
    }
    latest
}

/// A duration as OpenAI writes it: `1s`, `6m0s`, `1h2m3.5s`, `20ms`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        total += n * match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// A backend's answer body: hyper's, one that gives its connection back to
/// the plain pool, or any other body (the in-process transport of tests).
pub enum ResponseBody {
    Hyper(hyper::body::Incoming),
    Pooled(PooledBody),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ResponseBody::Pooled(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Hyper(b) => b.is_end_stream(),
            ResponseBody::Pooled(b) => b.is_end_stream(),
            ResponseBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Hyper(b) => b.size_hint(),
            ResponseBody::Pooled(b) => b.size_hint(),
            ResponseBody::Boxed(b) => b.size_hint(),
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseBody")
    }
}

pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, AttemptError>> + Send>>;

/// Sends one request to a backend. Failures come back classified.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, request: Request<Full<Bytes>>) -> ResponseFuture;
}

impl std::fmt::Debug for dyn Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

/// The plain pool for `http://`, hyper's pooled client over rustls for
/// `https://`: see the module doc.
pub struct HttpTransport {
    plain: PlainPool,
    client: Client<Diagnosing<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    recent: Recent,
}

impl HttpTransport {
    pub fn new(tls: rustls::ClientConfig, server_name: Option<String>, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        let builder = match server_name.and_then(|n| rustls_pki_types::ServerName::try_from(n).ok()) {
            Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
            None => builder,
        };
        let recent = Recent::default();
        let connector =
            Diagnosing { inner: builder.enable_http1().enable_http2().wrap_connector(http), recent: recent.clone() };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self { plain: PlainPool::new(connect_timeout), client, recent }
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: Request<Full<Bytes>>) -> ResponseFuture {
        if request.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
            let plain = self.plain.clone();
            return Box::pin(async move { plain.send(request).await });
        }
        let authority = request.uri().authority().cloned();
        let pending = self.client.request(request);
        let recent = self.recent.clone();
        Box::pin(async move {
            match pending.await {
                Ok(response) => Ok(response.map(ResponseBody::Hyper)),
                Err(e) => match AttemptError::classify(&e, e.is_connect()) {
                    // A failure that says nothing of its own, on a connection
                    // whose TLS just failed (see `diagnose`): that is the reason.
                    err @ (AttemptError::Io(_) | AttemptError::Connect(_)) => {
                        match authority.and_then(|a| recent.take(a.as_str())) {
                            Some(reason) => Err(AttemptError::Tls(reason)),
                            None => Err(err),
                        }
                    }
                    err => Err(err),
                },
            }
        })
    }
}

/// What the transports are built from.
#[derive(Debug, Clone, Default)]
pub struct TransportSettings {
    /// An extra CA bundle trusted for every backend (`BACKEND_CA_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
}

/// One transport (one pool) per distinct TLS configuration. Built once at
/// start-up and shared by every snapshot; a configuration seen for the first
/// time gets its transport then, and keeps it for the life of the process.
pub struct Transports {
    settings: TransportSettings,
    global_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    default: Arc<dyn Transport>,
    by_spec: Mutex<HashMap<TlsSpec, Arc<dyn Transport>>>,
    /// Tests: every backend uses the default transport.
    fixed: bool,
}

impl Transports {
    /// Reads `BACKEND_CA_FILE`, if set: an unreadable bundle is an error.
    pub fn new(settings: TransportSettings) -> Result<Self, TlsError> {
        let global_ca = match &settings.ca_file {
            Some(path) => tls::load_certs("BACKEND_CA_FILE", path)?,
            None => Vec::new(),
        };
        let config = TlsSpec::default().client_config(&global_ca)?;
        let default: Arc<dyn Transport> = Arc::new(HttpTransport::new(config, None, settings.connect_timeout));
        Ok(Self { settings, global_ca, default, by_spec: Mutex::new(HashMap::new()), fixed: false })
    }

    /// Every backend and every call uses `transport` (the in-process mock).
    pub fn fixed(transport: Arc<dyn Transport>) -> Self {
        Self {
            settings: TransportSettings::default(),
            global_ca: Vec::new(),
            default: transport,
            by_spec: Mutex::new(HashMap::new()),
            fixed: true,
        }
    }

    /// The transport of backends without their own TLS settings, and of the
    /// router's other calls (the budget service).
    pub fn default_transport(&self) -> Arc<dyn Transport> {
        self.default.clone()
    }

    /// The transport for a backend's TLS settings, built on first use.
    pub fn for_spec(&self, spec: &TlsSpec) -> Result<Arc<dyn Transport>, TlsError> {
        if self.fixed || spec.is_default() {
            return Ok(self.default.clone());
        }
        // A short critical section, never held across an await; a build
        // (which reads files) happens once per distinct configuration.
        let mut cache = self.by_spec.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(spec) {
            return Ok(t.clone());
        }
        let config = spec.client_config(&self.global_ca)?;
        let t: Arc<dyn Transport> =
            Arc::new(HttpTransport::new(config, spec.server_name.clone(), self.settings.connect_timeout));
        cache.insert(spec.clone(), t.clone());
        Ok(t)
    }
}

/// A 2xx streaming answer: its head, its first bytes, and the rest to come.
#[derive(Debug)]
pub struct StreamStart {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The backend's `Content-Encoding`, passed on as it came.
    pub content_encoding: Option<HeaderValue>,
    pub first: Bytes,
    pub rest: ResponseBody,
}

/// A backend's complete answer.
#[derive(Debug)]
pub struct BackendResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The backend's `Content-Encoding` (a compressed body is passed on as it
    /// came, never decoded).
    pub content_encoding: Option<HeaderValue>,
    pub body: Bytes,
}

/// What one attempt produced.
#[derive(Debug)]
pub enum Answer {
    Full(BackendResponse),
    Stream(StreamStart),
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Full(r) => r.status,
            Answer::Stream(s) => s.status,
        }
    }
}

/// A `POST` of a JSON body, for calls that are not inference (the budget
/// service).
pub fn post_json(uri: &Uri, body: Bytes) -> Result<Request<Full<Bytes>>, AttemptError> {
    Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(Full::new(body))
        .map_err(|e| AttemptError::Io(e.to_string()))
}

/// One exchange within `timeout`, its answer read up to `limit` bytes. A
/// retryable status comes back as `Err(Status)`, with the backend's body
/// dropped; any other status is the answer.
pub async fn send(
    transport: &dyn Transport,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    limit: usize,
) -> Result<BackendResponse, AttemptError> {
    let exchange = async {
        let response = transport.send(request).await?;
        let (parts, body) = response.into_parts();
        if retryable_status(parts.status) {
            return Err(failed_status(&parts));
        }
        collect(parts, body, limit).await
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AttemptError::Timeout))
}

/// Opens a streaming request. Within `timeout` the backend must answer and,
/// if it answers 2xx, send its first bytes: until then the attempt can still
/// fail over. Any other answer is collected whole, up to `limit` bytes.
pub async fn open_stream(
    transport: &dyn Transport,
    request: Request<Full<Bytes>>,
    timeout: Duration,
    limit: usize,
) -> Result<Answer, AttemptError> {
    let open = async {
        let response = transport.send(request).await?;
        let (parts, mut body) = response.into_parts();
        if retryable_status(parts.status) {
            return Err(failed_status(&parts));
        }
        if !parts.status.is_success() {
            return collect(parts, body, limit).await.map(Answer::Full);
        }
        let content_type = parts.headers.get(CONTENT_TYPE).cloned();
        let content_encoding = parts.headers.get(CONTENT_ENCODING).cloned();
        // The first data frame: after it, the answer belongs to the client.
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(first) = frame.into_data() {
                        if first.is_empty() {
                            continue;
                        }
                        return Ok(Answer::Stream(StreamStart {
                            status: parts.status,
                            content_type,
                            content_encoding,
                            first,
                            rest: body,
                        }));
                    }
                }
                Some(Err(e)) => return Err(AttemptError::classify(&*e, false)),
                None => {
                    return Ok(Answer::Full(BackendResponse {
                        status: parts.status,
                        content_type,
                        content_encoding,
                        body: Bytes::new(),
                    }));
                }
            }
        }
    };
    tokio::time::timeout(timeout, open).await.unwrap_or(Err(AttemptError::Timeout))
}

fn get_request(uri: &Uri) -> Result<Request<Full<Bytes>>, AttemptError> {
    Request::get(uri.clone()).body(Full::new(Bytes::new())).map_err(|e| AttemptError::Io(e.to_string()))
}

/// `GET uri`, whatever the status, within `timeout` and `limit` bytes.
pub async fn get(
    transport: &dyn Transport,
    uri: &Uri,
    timeout: Duration,
    limit: usize,
) -> Result<BackendResponse, AttemptError> {
    let request = get_request(uri)?;
    let exchange = async {
        let (parts, body) = transport.send(request).await?.into_parts();
        collect(parts, body, limit).await
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AttemptError::Timeout))
}

/// An active health check: `GET uri` must answer 2xx within `timeout`. The
/// same transport as traffic, so TLS problems show here too.
pub async fn probe(transport: &dyn Transport, uri: &Uri, timeout: Duration) -> Result<(), String> {
    probe_with(transport, get_request(uri).map_err(|e| e.to_string())?, timeout).await
}

/// [`probe`] with a request of the caller's (a backend's, with its
/// credential: see `Target::health_request`).
pub async fn probe_with(
    transport: &dyn Transport,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(), String> {
    let check = async {
        let response = transport.send(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        // Drain so the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() { Ok(()) } else { Err(format!("health check answered {}", status.as_u16())) }
    };
    tokio::time::timeout(timeout, check).await.unwrap_or_else(|_| Err("health check timed out".to_string()))
}

/// Reads a whole answer, up to `limit` bytes (a larger declared length is
/// refused before reading).
async fn collect(
    parts: http::response::Parts,
    body: ResponseBody,
    limit: usize,
) -> Result<BackendResponse, AttemptError> {
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AttemptError::TooLarge { limit });
    }
    let mut body = body;
    let mut gathered = Gather::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| AttemptError::classify(&*e, false))?;
        if let Ok(data) = frame.into_data() {
            if gathered.len() + data.len() > limit {
                return Err(AttemptError::TooLarge { limit });
            }
            gathered.push(data);
        }
    }
    Ok(BackendResponse {
        status: parts.status,
        content_type: parts.headers.get(CONTENT_TYPE).map(owned),
        content_encoding: parts.headers.get(CONTENT_ENCODING).map(owned),
        body: gathered.into_bytes(),
    })
}

/// A header value of an answer that does not hold the connection's read
/// buffer (see [`Gather`]): the usual ones are constants, others copied.
fn owned(value: &HeaderValue) -> HeaderValue {
    const COMMON: [&str; 3] = ["application/json", "gzip", "br"];
    match COMMON.iter().find(|c| value.as_bytes() == c.as_bytes()) {
        Some(c) => HeaderValue::from_static(c),
        None => HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone()),
    }
}

/// A body's frames as one buffer of its own. The usual body is one frame,
/// a slice of the connection's read buffer (8 KiB): it is copied out, so that
/// the read buffer is freed now rather than held for as long as the body is
/// (the whole upstream call for a request, the write back for an answer),
/// which at 1,000 requests in flight is 8 MB on each side.
#[derive(Default)]
pub struct Gather {
    first: Bytes,
    more: Option<bytes::BytesMut>,
}

impl Gather {
    pub fn push(&mut self, data: Bytes) {
        match &mut self.more {
            Some(more) => more.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut more = bytes::BytesMut::with_capacity(self.first.len() + data.len());
                more.extend_from_slice(&self.first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.more.as_ref().map_or(self.first.len(), |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn into_bytes(self) -> Bytes {
        match self.more {
            Some(more) => more.freeze(),
            None if self.first.is_empty() => Bytes::new(),
            None => Bytes::copy_from_slice(&self.first),
        }
    }
}

/// The innermost cause, which is what an operator needs ("Connection refused").
pub fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::TlsSpec;

    #[test]
    fn classification_of_failures() {
        assert!(retryable_status(StatusCode::BAD_GATEWAY));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!retryable_status(StatusCode::BAD_REQUEST));
        assert!(!retryable_status(StatusCode::NOT_FOUND));
        assert_eq!(AttemptError::Status(StatusCode::SERVICE_UNAVAILABLE).error_type(), "status_5xx");
        assert!(!AttemptError::Status(StatusCode::TOO_MANY_REQUESTS).counts_against_health());
        assert!(AttemptError::Timeout.counts_against_health());
        assert!(AttemptError::Connect("refused".into()).counts_against_health());
        assert!(AttemptError::Tls("certificate not trusted".into()).counts_against_health());
        assert_eq!(AttemptError::Tls("certificate not trusted".into()).to_string(), "tls: certificate not trusted");
    }

    /// A TLS server on loopback that completes handshakes (and answers
    /// nothing), with `cert` signed by its own CA; with `client_ca`, it
    /// requires a client certificate.
    async fn tls_server(
        names: &[&str],
        require_client_cert: bool,
        h2: bool,
    ) -> (u16, rustls_pki_types::CertificateDer<'static>, tokio::task::JoinHandle<()>) {
        use rustls_pki_types::PrivateKeyDer;
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder.with_single_cert(vec![der.clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap()).unwrap();
        if h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        // Read the request, then hang up without answering.
                        let mut buf = [0u8; 1024];
                        let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
                    }
                });
            }
        });
        (port, der, task)
    }

    async fn attempt(transport: &dyn Transport, port: u16) -> AttemptError {
        let uri: Uri = format!("https://127.0.0.1:{port}/v1/inference").parse().unwrap();
        send(transport, post_json(&uri, Bytes::from_static(b"{}")).unwrap(), Duration::from_secs(5), 1 << 20)
            .await
            .unwrap_err()
    }

    fn trusting(ca: &rustls_pki_types::CertificateDer<'static>, spec: TlsSpec) -> HttpTransport {
        HttpTransport::new(spec.client_config(std::slice::from_ref(ca)).unwrap(), None, Duration::from_secs(2))
    }

    #[tokio::test]
    async fn tls_failures_of_real_handshakes_have_short_reasons() {
        let (port, _, _server) = tls_server(&["127.0.0.1"], false, false).await;
        let untrusting = Transports::new(TransportSettings::default()).unwrap().default_transport();
        assert_eq!(attempt(&*untrusting, port).await, AttemptError::Tls("certificate not trusted".into()));

        let (port, ca2, _server2) = tls_server(&["other.example"], false, false).await;
        let err = attempt(&trusting(&ca2, TlsSpec::default()), port).await;
        assert_eq!(err, AttemptError::Tls("certificate not valid for this name".into()));
        // The same certificate, checked against the name it has.
        let spec = TlsSpec { server_name: Some("other.example".into()), ..Default::default() };
        let named = HttpTransport::new(
            spec.client_config(std::slice::from_ref(&ca2)).unwrap(),
            spec.server_name.clone(),
            Duration::from_secs(2),
        );
        assert_eq!(attempt(&named, port).await.error_type(), "io", "the handshake passed; the server said nothing");

        // A refused client certificate, over HTTP/1.1 and over HTTP/2 (where
        // the alert is read by the connection, not the request).
        for h2 in [false, true] {
            let (port, ca3, _server3) = tls_server(&["127.0.0.1"], true, h2).await;
            let err = attempt(&trusting(&ca3, TlsSpec::default()), port).await;
            assert_eq!(err, AttemptError::Tls("client certificate refused".into()), "h2 {h2}: {err}");
        }
    }

    #[test]
    fn retry_after_is_read_from_every_form_providers_use() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        assert_eq!(retry_after(&h(&[("retry-after", "7")]), now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&h(&[("retry-after", &date)]), now), Some(Duration::from_secs(30)));
        let openai = h(&[("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-reset-tokens", "6m0s")]);
        assert_eq!(retry_after(&openai, now), Some(Duration::from_secs(360)), "the latest reset");
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("soon"), None);
        let at = humantime::format_rfc3339(now + Duration::from_secs(12)).to_string();
        assert_eq!(retry_after(&h(&[("anthropic-ratelimit-tokens-reset", &at)]), now), Some(Duration::from_secs(12)));
        assert_eq!(
            retry_after(&h(&[("retry-after", "3"), ("x-ratelimit-reset-tokens", "60s")]), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(&h(&[]), now), None);
        let t =
            AttemptError::Throttled { status: StatusCode::TOO_MANY_REQUESTS, retry_after: Duration::from_millis(6500) };
        assert_eq!((t.error_type(), t.counts_against_health()), ("status_429", false));
        assert_eq!(t.to_string(), "backend answered 429, retry after 7 s");
    }

    #[test]
    fn gather_copies_one_frame_out_and_joins_more() {
        let one = Bytes::from_static(b"{\"a\":1}");
        let mut g = Gather::default();
        assert!(g.is_empty());
        g.push(one.clone());
        let kept = g.into_bytes();
        assert_eq!(kept, one);
        assert_ne!(kept.as_ptr(), one.as_ptr(), "the connection's buffer is not held");

        let mut g = Gather::default();
        for part in [&b"ab"[..], b"", b"cd", b"e"] {
            g.push(Bytes::copy_from_slice(part));
        }
        assert_eq!(g.len(), 5);
        assert_eq!(g.into_bytes(), Bytes::from_static(b"abcde"));
    }

    /// A body that gives its frames one by one (as a chunked answer does).
    struct Frames(std::collections::VecDeque<&'static [u8]>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|f| Ok(Frame::data(Bytes::from_static(f)))))
        }
    }

    /// An answer in several frames, with no `Content-Length`.
    fn chunked_answer(frames: &[&'static [u8]]) -> (http::response::Parts, ResponseBody) {
        let body = ResponseBody::Boxed(Frames(frames.iter().copied().collect()).boxed_unsync());
        (Response::new(()).into_parts().0, body)
    }

    #[tokio::test]
    async fn a_chunked_answer_is_joined_within_the_limit_and_refused_past_it() {
        let (parts, body) = chunked_answer(&[b"0123", b"4567"]);
        assert_eq!(collect(parts, body, 8).await.unwrap().body, Bytes::from_static(b"01234567"));
        let (parts, body) = chunked_answer(&[b"0123", b"4567", b"8"]);
        assert_eq!(collect(parts, body, 8).await.unwrap_err(), AttemptError::TooLarge { limit: 8 });
    }

    #[tokio::test]
    async fn connect_error_is_classified_as_connect() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let transports =
            Transports::new(TransportSettings { ca_file: None, connect_timeout: Duration::from_secs(2) }).unwrap();
        let t = transports.default_transport();
        let uri: Uri = format!("http://127.0.0.1:{port}/v1/inference").parse().unwrap();
        let err = send(&*t, post_json(&uri, Bytes::from_static(b"{}")).unwrap(), Duration::from_secs(2), 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "connect", "{err}");
        assert!(probe(&*t, &uri, Duration::from_secs(1)).await.is_err());
    }
}
