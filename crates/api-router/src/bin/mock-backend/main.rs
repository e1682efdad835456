//! `mock-backend`: a fake inference backend for demos, tests and benchmarks.
//!
//! ```text
//! mock-backend --listen 127.0.0.1:8001 --id backend-1 [--latency-ms N] [--error-rate F] [--error-status S]
//! ```
//!
//! - `GET /health`: 200, or 503 while the `healthy` fault is false.
//! - `POST /v1/inference`: JSON with this backend's id, the request id (from
//!   `X-Request-Id` or the body), a fake output and token usage.
//! - `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`,
//!   `GET /v1/models`: OpenAI-compatible, with `"stream": true` answered as SSE
//!   chunks (usage in a final chunk when `stream_options.include_usage`).
//! - `POST /mock/faults`: `{"latency_ms", "error_rate", "error_status", "healthy",
//!   "stream_chunks", "stream_delay_ms", "cut_stream_after"}`, each optional,
//!   changes behaviour at run time (`cut_stream_after: N` breaks each stream
//!   after N chunks; 0 turns it off).
//! - `GET /mock/stats`: `{"requests": N, "errors": N, "health_checks": N,
//!   "disconnects": N, ...}` (`disconnects`: streams whose client went away).
//!
//! On start it prints `mock-backend listening on ADDR` (with `--listen
//! 127.0.0.1:0`, the port the OS chose). State is atomics; no locks.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

struct Mock {
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
    disconnects: AtomicU64,
    /// The model name of the last OpenAI request, as received.
    last_model: std::sync::Mutex<String>,
}

struct Args {
    listen: SocketAddr,
    id: String,
    latency_ms: u64,
    error_rate: f64,
    error_status: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
        id: "backend-1".into(),
        latency_ms: 0,
        error_rate: 0.0,
        error_status: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|_| "--listen: expected HOST:PORT".to_string())?,
            "--id" => args.id = value()?,
            "--latency-ms" => {
                args.latency_ms = value()?.parse().map_err(|_| "--latency-ms: expected an integer".to_string())?
            }
            "--error-rate" => {
                args.error_rate = value()?.parse().map_err(|_| "--error-rate: expected a number".to_string())?;
                if !(0.0..=1.0).contains(&args.error_rate) {
                    return Err("--error-rate: expected a number from 0 to 1".into());
                }
            }
            "--error-status" => {
                args.error_status =
                    value()?.parse().map_err(|_| "--error-status: expected a status code".to_string())?
            }
            "-h" | "--help" => {
                return Err(
                    "usage: mock-backend --listen ADDR --id ID [--latency-ms N] [--error-rate F] [--error-status S]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
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
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-backend: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let mock = Arc::new(Mock {
        id: args.id,
        latency_ms: AtomicU64::new(args.latency_ms),
        error_ppm: AtomicU64::new((args.error_rate * 1e6) as u64),
        error_status: AtomicU16::new(args.error_status),
        healthy: AtomicBool::new(true),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        health_checks: AtomicU64::new(0),
        stream_chunks: AtomicU64::new(5),
        stream_delay_ms: AtomicU64::new(0),
        cut_stream_after: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        last_model: std::sync::Mutex::new(String::new()),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/inference", post(inference))
        .route("/v1/chat/completions", post(|s, b| openai(s, b, Kind::Chat)))
        .route("/v1/completions", post(|s, b| openai(s, b, Kind::Completions)))
        .route("/v1/embeddings", post(|s, b| openai(s, b, Kind::Embeddings)))
        .route("/v1/models", get(models))
        .route("/mock/faults", post(faults))
        .route("/mock/stats", get(stats))
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("mock-backend listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
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

/// Latency, then maybe an injected error (in the OpenAI error shape, which
/// also serves the native door).
async fn common(m: &Mock) -> Option<Response> {
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
        let body = format!(
            r#"{{"error":{{"code":"injected_fault","message":"mock-backend {} injected error","type":"invalid_request_error","param":null}}}}"#,
            m.id
        );
        return Some((status, [(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    None
}

async fn inference(State(m): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(fault) = common(&m).await {
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

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completions,
    Embeddings,
}

async fn models(State(m): State<Arc<Mock>>) -> Response {
    axum::Json(serde_json::json!({"object": "list", "data": [{"id": format!("{}-model", m.id), "object": "model", "created": 0, "owned_by": "mock"}]}))
        .into_response()
}

async fn openai(State(m): State<Arc<Mock>>, body: Bytes, kind: Kind) -> Response {
    if let Some(fault) = common(&m).await {
        return fault;
    }
    let req: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let err = serde_json::json!({"error": {"message": format!("invalid JSON: {e}"), "type": "invalid_request_error", "param": null, "code": null}});
            return (StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
        }
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    *m.last_model.lock().unwrap_or_else(|p| p.into_inner()) = model.clone();
    let id = format!("mock-{}", fastrand::u64(..));
    if kind == Kind::Embeddings {
        let n = req["input"].as_array().map(|a| a.len()).unwrap_or(1);
        let data: Vec<_> = (0..n)
            .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}))
            .collect();
        return axum::Json(serde_json::json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 5, "total_tokens": 5}}))
            .into_response();
    }
    let text = format!("Hello from {}.", m.id);
    if req["stream"].as_bool() != Some(true) {
        let choice = if kind == Kind::Chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "stop"})
        };
        let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        return axum::Json(serde_json::json!({
            "id": id, "object": object, "created": 0, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }))
        .into_response();
    }
    let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunks = m.stream_chunks.load(Ordering::Relaxed).max(1);
    let delay = Duration::from_millis(m.stream_delay_ms.load(Ordering::Relaxed));
    let cut = m.cut_stream_after.load(Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let mock = m.clone();
    tokio::spawn(async move {
        let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        for i in 0..chunks {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if cut > 0 && i >= cut {
                let _ = tx.send(Err(std::io::Error::other("injected stream cut"))).await;
                return;
            }
            let piece = format!("tok{i} ");
            let finish = if i + 1 == chunks { serde_json::json!("stop") } else { serde_json::Value::Null };
            let choice = if kind == Kind::Chat {
                serde_json::json!({"index": 0, "delta": {"content": piece}, "finish_reason": finish})
            } else {
                serde_json::json!({"index": 0, "text": piece, "finish_reason": finish})
            };
            let event =
                serde_json::json!({"id": id, "object": object, "created": 0, "model": model, "choices": [choice]});
            if tx.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await.is_err() {
                mock.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if include_usage {
            let usage = serde_json::json!({"id": id, "object": object, "created": 0, "model": model, "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {usage}\n\n")))).await;
        }
        if tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await.is_err() {
            mock.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut response = axum::body::Body::new(ChannelBody(rx)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    response
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Faults {
    latency_ms: Option<u64>,
    error_rate: Option<f64>,
    error_status: Option<u16>,
    healthy: Option<bool>,
    stream_chunks: Option<u64>,
    stream_delay_ms: Option<u64>,
    cut_stream_after: Option<u64>,
}

async fn faults(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    let f: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("invalid faults: {e}")).into_response(),
    };
    if let Some(rate) = f.error_rate {
        if !(0.0..=1.0).contains(&rate) {
            return (StatusCode::BAD_REQUEST, "error_rate must be from 0 to 1").into_response();
        }
        m.error_ppm.store((rate * 1e6) as u64, Ordering::Relaxed);
    }
    if let Some(s) = f.error_status {
        if StatusCode::from_u16(s).is_err() {
            return (StatusCode::BAD_REQUEST, "error_status must be an HTTP status").into_response();
        }
        m.error_status.store(s, Ordering::Relaxed);
    }
    if let Some(l) = f.latency_ms {
        m.latency_ms.store(l, Ordering::Relaxed);
    }
    if let Some(h) = f.healthy {
        m.healthy.store(h, Ordering::Relaxed);
    }
    if let Some(n) = f.stream_chunks {
        m.stream_chunks.store(n, Ordering::Relaxed);
    }
    if let Some(d) = f.stream_delay_ms {
        m.stream_delay_ms.store(d, Ordering::Relaxed);
    }
    if let Some(c) = f.cut_stream_after {
        m.cut_stream_after.store(c, Ordering::Relaxed);
    }
    stats(State(m)).await
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
        "disconnects": m.disconnects.load(Ordering::Relaxed),
        "last_model": m.last_model.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }))
    .into_response()
}
