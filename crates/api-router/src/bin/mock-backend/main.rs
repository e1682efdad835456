//! `mock-backend`: a fake inference backend for demos, tests and benchmarks.
//!
//! ```text
//! mock-backend --listen 127.0.0.1:8001 --id backend-1 [--latency-ms N] [--error-rate F] [--error-status S]
//! ```
//!
//! - `GET /health`: 200, or 503 while the `healthy` fault is false.
//! - `POST /v1/inference`: JSON with this backend's id, the request id (from
//!   `X-Request-Id` or the body), a fake output and token usage.
//! - `POST /mock/faults`: `{"latency_ms", "error_rate", "error_status", "healthy"}`,
//!   each optional, changes behaviour at run time.
//! - `GET /mock/stats`: `{"requests": N, "errors": N, "health_checks": N}`.
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
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/inference", post(inference))
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

async fn inference(State(m): State<Arc<Mock>>, headers: HeaderMap, body: Bytes) -> Response {
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
        let body =
            format!(r#"{{"error":{{"code":"injected_fault","message":"mock-backend {} injected error"}}}}"#, m.id);
        return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Faults {
    latency_ms: Option<u64>,
    error_rate: Option<f64>,
    error_status: Option<u16>,
    healthy: Option<bool>,
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
    }))
    .into_response()
}
