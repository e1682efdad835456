//! `mock-backend`: a fake inference backend for demos, tests and benchmarks,
//! as a library (started in process by tests, or served without sockets
//! through [`app`]) and as a binary ([`main`]).
//!
//! ```text
//! mock-backend --listen 127.0.0.1:8001 --id backend-1 [--latency-ms N] [--error-rate F] [--error-status S]
//!              [--tls-cert FILE --tls-key FILE [--client-ca FILE] [--no-h2]]
//! ```
//!
//! - `GET /health`: 200, or 503 while the `healthy` fault is false.
//! - `POST /v1/inference`: JSON with this backend's id, the request id (from
//!   `X-Request-Id` or the body), a fake output and token usage.
//! - `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//!   `POST /v1/responses`, `GET /v1/models` (also the OpenAI kind's health
//!   check): OpenAI-compatible, with `"stream": true` answered as SSE (usage
//!   in a final chunk when `stream_options.include_usage`); a chat request
//!   that offers tools gets a tool call, its arguments streamed in pieces.
//! - `POST /v1/messages`, `POST /v1/messages/count_tokens`: Anthropic's
//!   Messages API (needs `anthropic-version`), streamed as
//!   its documented events, with a `tool_use` when tools are offered.
//! - `/openai/deployments/{deployment}/...?api-version=...` and
//!   `/openai/v1/...`: Azure OpenAI's paths (need `api-key`).
//! - `POST /mock/faults`: `{"latency_ms", "error_rate", "error_status", "healthy",
//!   "stream_chunks", "stream_delay_ms", "cut_stream_after",
//!   "stream_error_after", "retry_after_secs"}`, each optional, changes
//!   behaviour at run time (`cut_stream_after: N` breaks each stream after N
//!   chunks, `stream_error_after: N` ends it with the provider's error event;
//!   0 turns either off; `retry_after_secs` adds `Retry-After` to injected
//!   errors).
//! - `GET /mock/stats`: `{"requests": N, "errors": N, "health_checks": N,
//!   "disconnects": N, "last_version": "HTTP/2.0", "last_request": {"path",
//!   "query", "headers"}, "last_deployment", ...}` (`disconnects`: streams
//!   whose client went away).
//!
//! With `--tls-cert` and `--tls-key` it serves HTTPS (offering `h2` and
//! `http/1.1` by ALPN unless `--no-h2`); with `--client-ca` it requires a
//! client certificate signed by that CA. Plain HTTP serves HTTP/1.1 (and
//! HTTP/2 with prior knowledge). Every accepted socket has `TCP_NODELAY`.
//!
//! On start it prints `mock-backend listening on ADDR` (with `--listen
//! 127.0.0.1:0`, the port the OS chose). State is atomics; no locks on the
//! request path but the last model name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;

mod anthropic;
mod openai;
mod sse;

/// The mock's run-time state and counters.
pub struct Mock {
    id: String,
    latency_ms: AtomicU64,
    /// Error rate in millionths.
    error_ppm: AtomicU64,
    error_status: AtomicU16,
    healthy: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    health_checks: AtomicU64,
    stream_chunks: AtomicU64,
    stream_delay_ms: AtomicU64,
    cut_stream_after: AtomicU64,
    stream_error_after: AtomicU64,
    retry_after_secs: AtomicU64,
    disconnects: AtomicU64,
    tls_failures: AtomicU64,
    /// The Azure deployment of the last deployments-form request.
    last_deployment: std::sync::Mutex<String>,
    /// The path, query and credential-related headers of the last request
    /// a router sent (for checks of what went upstream).
    last_request: std::sync::Mutex<Value>,
    /// The model name of the last OpenAI request, as received.
    last_model: std::sync::Mutex<String>,
    /// The HTTP version of the last request.
    last_version: std::sync::Mutex<&'static str>,
}

/// How to start a mock.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub id: String,
    pub latency_ms: u64,
    pub error_rate: f64,
    pub error_status: u16,
    pub tls: Option<TlsOptions>,
}

impl Options {
    /// A healthy, instant mock on a port the OS picks.
    pub fn new(id: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            id: id.to_string(),
            latency_ms: 0,
            error_rate: 0.0,
            error_status: 500,
            tls: None,
        }
    }
}

/// Serving HTTPS: the certificate chain and key (PEM), and optionally the CA
/// that client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    /// Offer `h2` by ALPN.
    pub h2: bool,
}

impl Mock {
    pub fn new(options: &Options) -> Arc<Self> {
        Arc::new(Mock {
            id: options.id.clone(),
            latency_ms: AtomicU64::new(options.latency_ms),
            error_ppm: AtomicU64::new((options.error_rate * 1e6) as u64),
            error_status: AtomicU16::new(options.error_status),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            stream_chunks: AtomicU64::new(5),
            stream_delay_ms: AtomicU64::new(0),
            cut_stream_after: AtomicU64::new(0),
            stream_error_after: AtomicU64::new(0),
            retry_after_secs: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            last_deployment: std::sync::Mutex::new(String::new()),
            last_request: std::sync::Mutex::new(Value::Null),
            last_model: std::sync::Mutex::new(String::new()),
            last_version: std::sync::Mutex::new(""),
        })
    }

    /// Inference requests received (not health checks).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Streams whose client went away before the end.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }
}

/// The mock's routes over `mock`'s state: serve it, or call it in process.
pub fn app(mock: Arc<Mock>) -> Router {
    use openai::Kind;
    Router::new()
        .route("/health", get(health))
        .route("/v1/inference", post(inference))
        .route("/v1/chat/completions", post(|s, b| openai::openai(s, b, Kind::Chat)))
        .route("/v1/completions", post(|s, b| openai::openai(s, b, Kind::Completions)))
        .route("/v1/embeddings", post(|s, b| openai::openai(s, b, Kind::Embeddings)))
        .route("/v1/responses", post(|s, b| openai::openai(s, b, Kind::Responses)))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/openai/deployments/{deployment}/{*operation}", post(openai::azure_deployment))
        .route("/openai/v1/models", get(openai::azure_models))
        .route("/openai/v1/{*operation}", post(openai::azure_v1))
        .route("/mock/faults", post(faults))
        .route("/mock/stats", get(stats))
        .layer(middleware::from_fn_with_state(mock.clone(), note_request))
        .with_state(mock)
}

/// Headers whose presence or value tests check upstream.
const NOTED_HEADERS: [&str; 6] =
    ["authorization", "x-api-key", "api-key", "anthropic-version", "anthropic-beta", "x-request-id"];

/// Records the HTTP version, path, query and noted headers of the requests a
/// router sends (not of the test's own `/mock/` calls, nor health checks).
async fn note_request(State(m): State<Arc<Mock>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/mock/") || request.method() == axum::http::Method::GET {
        return next.run(request).await;
    }
    let version = match request.version() {
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    *m.last_version.lock().unwrap_or_else(|p| p.into_inner()) = version;
    let headers: serde_json::Map<String, Value> = NOTED_HEADERS
        .iter()
        .filter_map(|h| Some((h.to_string(), Value::from(request.headers().get(*h)?.to_str().ok()?))))
        .collect();
    *m.last_request.lock().unwrap_or_else(|p| p.into_inner()) =
        serde_json::json!({"path": path, "query": request.uri().query(), "headers": headers});
    next.run(request).await
}

/// A mock serving on its own tasks; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// With TLS: a plain-HTTP port serving the same routes, so that tests
    /// can read `/mock/stats` and set `/mock/faults` without a certificate.
    pub control_addr: Option<SocketAddr>,
    pub mock: Arc<Mock>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Starts a mock on the current runtime.
pub async fn start(options: Options) -> std::io::Result<Server> {
    let mock = Mock::new(&options);
    let listener = TcpListener::bind(options.listen).await?;
    let addr = listener.local_addr()?;
    let acceptor = options.tls.as_ref().map(tls_acceptor).transpose()?;
    let mut tasks = Vec::new();
    let mut control_addr = None;
    if acceptor.is_some() {
        let control = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
        control_addr = Some(control.local_addr()?);
        tasks.push(tokio::spawn(accept_loop(control, None, mock.clone())));
    }
    tasks.push(tokio::spawn(accept_loop(listener, acceptor, mock.clone())));
    Ok(Server { addr, control_addr, mock, tasks })
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
}

fn tls_acceptor(tls: &TlsOptions) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&tls.cert_file).map_err(invalid)?.collect::<Result<_, _>>().map_err(invalid)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(invalid)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(invalid)? {
                roots.add(cert.map_err(invalid)?).map_err(invalid)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(invalid)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(invalid)?;
    config.alpn_protocols =
        if tls.h2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, acceptor: Option<tokio_rustls::TlsAcceptor>, mock: Arc<Mock>) {
    let app = app(mock.clone());
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, mock) = (app.clone(), acceptor.clone(), mock.clone());
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
                Some(acceptor) => match acceptor.accept(tcp).into_fallible().await {
                    Ok(tls) => {
                        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                    }
                    Err((_, mut tcp)) => {
                        mock.tls_failures.fetch_add(1, Ordering::Relaxed);
                        // Lingering close, as servers do: read what the client
                        // still sends before closing, so that the close is a
                        // FIN, not a reset that would destroy the alert just
                        // sent before the client reads it.
                        let drain = async {
                            let mut buf = [0u8; 4096];
                            while tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await.is_ok_and(|n| n > 0) {}
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    }
                },
            }
        });
    }
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { listen: SocketAddr::from(([127, 0, 0, 1], 8001)), ..Options::new("backend-1") };
    let (mut cert, mut key, mut client_ca, mut h2) = (None, None, None, true);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => options.listen = value()?.parse().map_err(|_| "--listen: expected HOST:PORT".to_string())?,
            "--id" => options.id = value()?,
            "--latency-ms" => {
                options.latency_ms = value()?.parse().map_err(|_| "--latency-ms: expected an integer".to_string())?
            }
            "--error-rate" => {
                options.error_rate = value()?.parse().map_err(|_| "--error-rate: expected a number".to_string())?;
                if !(0.0..=1.0).contains(&options.error_rate) {
                    return Err("--error-rate: expected a number from 0 to 1".into());
                }
            }
            "--error-status" => {
                options.error_status =
                    value()?.parse().map_err(|_| "--error-status: expected a status code".to_string())?
            }
            "--tls-cert" => cert = Some(PathBuf::from(value()?)),
            "--tls-key" => key = Some(PathBuf::from(value()?)),
            "--client-ca" => client_ca = Some(PathBuf::from(value()?)),
            "--no-h2" => h2 = false,
            "-h" | "--help" => {
                return Err("usage: mock-backend --listen ADDR --id ID [--latency-ms N] [--error-rate F] \
                     [--error-status S] [--tls-cert FILE --tls-key FILE [--client-ca FILE] [--no-h2]]"
                    .into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    options.tls = match (cert, key) {
        (Some(cert_file), Some(key_file)) => Some(TlsOptions { cert_file, key_file, client_ca_file: client_ca, h2 }),
        (None, None) if client_ca.is_none() => None,
        _ => return Err("--tls-cert and --tls-key go together (and --client-ca needs them)".into()),
    };
    Ok(options)
}

/// The binary: parse the flags, serve until SIGINT or SIGTERM.
pub fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock-backend: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mock-backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = start(options).await?;
        if let Some(control) = server.control_addr {
            println!("mock-backend control on {control}");
        }
        println!("mock-backend listening on {}", server.addr);
        shutdown_signal().await;
        drop(server);
        Ok::<_, std::io::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-backend: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn health(State(m): State<Arc<Mock>>) -> StatusCode {
    m.health_checks.fetch_add(1, Ordering::Relaxed);
    if m.healthy.load(Ordering::Relaxed) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

#[derive(Deserialize)]
struct NativeRequest<'a> {
    #[serde(borrow, default)]
    request_id: Option<std::borrow::Cow<'a, str>>,
}

/// The shape of an injected error.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// OpenAI's, which also serves the native door.
    OpenAi,
    Anthropic,
}

/// Latency, then maybe an injected error (with `Retry-After` when set).
async fn common(m: &Mock, shape: Shape) -> Option<Response> {
    m.requests.fetch_add(1, Ordering::Relaxed);
    let latency = m.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let ppm = m.error_ppm.load(Ordering::Relaxed);
    if ppm > 0 && fastrand::u64(0..1_000_000) < ppm {
        m.errors.fetch_add(1, Ordering::Relaxed);
        let status =
            StatusCode::from_u16(m.error_status.load(Ordering::Relaxed)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = format!("mock-backend {} injected error", m.id);
        let body = match shape {
            Shape::OpenAi => {
                serde_json::json!({"error": {"code": "injected_fault", "message": message, "type": "invalid_request_error", "param": null}})
            }
            Shape::Anthropic => {
                serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}})
            }
        };
        let mut response = (status, axum::Json(body)).into_response();
        let retry_after = m.retry_after_secs.load(Ordering::Relaxed);
        if retry_after > 0 {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
        }
        return Some(response);
    }
    None
}

async fn inference(State(m): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(fault) = common(&m, Shape::OpenAi).await {
        return fault;
    }
    let from_body =
        serde_json::from_slice::<NativeRequest<'_>>(&body).ok().and_then(|r| r.request_id.map(|c| c.into_owned()));
    let request_id =
        headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(from_body).unwrap_or_default();
    let out = serde_json::json!({
        "backend_id": m.id,
        "request_id": request_id,
        "output": "This is a fake completion from mock-backend.",
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    });
    axum::Json(out).into_response()
}

/// Behaviour changed at run time (`POST /mock/faults`); each field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    pub latency_ms: Option<u64>,
    pub error_rate: Option<f64>,
    pub error_status: Option<u16>,
    pub healthy: Option<bool>,
    pub stream_chunks: Option<u64>,
    pub stream_delay_ms: Option<u64>,
    /// Break each stream after this many chunks; 0 turns it off.
    pub cut_stream_after: Option<u64>,
    /// End each stream with the provider's error event after this many
    /// events (inside the 200); 0 turns it off.
    pub stream_error_after: Option<u64>,
    /// `Retry-After` on injected errors, in seconds; 0 sends none.
    pub retry_after_secs: Option<u64>,
}

impl Mock {
    /// Applies `f`, all or nothing.
    pub fn apply(&self, f: &Faults) -> Result<(), String> {
        if f.error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            return Err("error_rate must be from 0 to 1".into());
        }
        if f.error_status.is_some_and(|s| StatusCode::from_u16(s).is_err()) {
            return Err("error_status must be an HTTP status".into());
        }
        let set = |cell: &AtomicU64, v: Option<u64>| v.into_iter().for_each(|v| cell.store(v, Ordering::Relaxed));
        set(&self.error_ppm, f.error_rate.map(|r| (r * 1e6) as u64));
        set(&self.latency_ms, f.latency_ms);
        set(&self.stream_chunks, f.stream_chunks);
        set(&self.stream_delay_ms, f.stream_delay_ms);
        set(&self.cut_stream_after, f.cut_stream_after);
        set(&self.stream_error_after, f.stream_error_after);
        set(&self.retry_after_secs, f.retry_after_secs);
        if let Some(s) = f.error_status {
            self.error_status.store(s, Ordering::Relaxed);
        }
        if let Some(h) = f.healthy {
            self.healthy.store(h, Ordering::Relaxed);
        }
        Ok(())
    }
}

async fn faults(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    let applied =
        serde_json::from_slice::<Faults>(&body).map_err(|e| format!("invalid faults: {e}")).and_then(|f| m.apply(&f));
    match applied {
        Ok(()) => stats(State(m)).await,
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

async fn stats(State(m): State<Arc<Mock>>) -> Response {
    axum::Json(serde_json::json!({
        "backend_id": m.id,
        "requests": m.requests.load(Ordering::Relaxed),
        "errors": m.errors.load(Ordering::Relaxed),
        "health_checks": m.health_checks.load(Ordering::Relaxed),
        "latency_ms": m.latency_ms.load(Ordering::Relaxed),
        "error_rate": m.error_ppm.load(Ordering::Relaxed) as f64 / 1e6,
        "error_status": m.error_status.load(Ordering::Relaxed),
        "healthy": m.healthy.load(Ordering::Relaxed),
        "stream_chunks": m.stream_chunks.load(Ordering::Relaxed),
        "stream_delay_ms": m.stream_delay_ms.load(Ordering::Relaxed),
        "cut_stream_after": m.cut_stream_after.load(Ordering::Relaxed),
        "stream_error_after": m.stream_error_after.load(Ordering::Relaxed),
        "retry_after_secs": m.retry_after_secs.load(Ordering::Relaxed),
        "last_deployment": m.last_deployment.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        "last_request": m.last_request.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        "disconnects": m.disconnects.load(Ordering::Relaxed),
        "tls_failures": m.tls_failures.load(Ordering::Relaxed),
        "last_version": *m.last_version.lock().unwrap_or_else(|p| p.into_inner()),
        "last_model": m.last_model.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }))
    .into_response()
}
