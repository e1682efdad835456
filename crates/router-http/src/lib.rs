//! The router's HTTP surface: the doors, admin, audit and status endpoints.
//!
//! A door does the HTTP part of a request and nothing else: it reads the body
//! within its limit ([`read_body`]), finds the credential where its clients
//! send it ([`credentials`]), has the core name the organization, parses its
//! own shape into one `InferenceRequest`, hands that to
//! `router_core::process`, and writes the [`Processed`] outcome back in its
//! own shape ([`respond`]). Errors become responses in one place,
//! [`error`].
//!
//! Doors: [`native`] (`POST /v1/inference`), [`openai`] (chat,
//! completions, embeddings, the Responses API, models) and [`anthropic`]
//! (messages, token counting). [`admin`], [`keys`], [`audit`] and
//! [`status`] serve the operators. [`App`] is what the connections serve:
//! the doors' `POST` routes directly, the rest through an axum router; both
//! count every answer by route and status. [`server`] accepts and serves
//! the connections.

pub mod admin;
pub mod anthropic;
pub mod audit;
pub mod credentials;
pub mod error;
pub mod keys;
pub mod native;
pub mod openai;
pub mod server;
pub mod status;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use router_core::Core;
use router_core::metrics::RouteSeries;
use router_core::pipeline::stream::BreakEvent;
use router_core::pipeline::{Outcome, Processed};
use router_providers::Operation;
use router_providers::transport::Gather;
use tower::ServiceExt;

use self::error::{ApiError, rate_limit_headers};

/// What the doors need beyond the core.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The largest request body read (`MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// `None` disables the admin API (403).
    pub admin_token: Option<String>,
    /// Time to receive a whole request body (`HTTP_BODY_READ_TIMEOUT_MS`).
    pub body_read_timeout: Duration,
    /// Wrong admin tokens per address answered without delay
    /// (`ADMIN_AUTH_FREE_FAILURES`).
    pub admin_auth_free_failures: u32,
}

/// Everything a handler can reach.
pub struct HttpState {
    pub core: Arc<Core>,
    pub settings: HttpSettings,
    /// Failed admin authentications, per client address.
    pub admin_throttle: throttle::AdminThrottle,
}

impl HttpState {
    pub fn new(core: Arc<Core>, settings: HttpSettings) -> Self {
        let admin_throttle = throttle::AdminThrottle::new(settings.admin_auth_free_failures);
        Self { core, settings, admin_throttle }
    }
}

pub type SharedState = Arc<HttpState>;

/// The path a client sends each operation to: the inference doors' routes.
/// `POST` to each is served by [`App::serve`] straight from the connection,
/// without axum's router and middleware (the profile put those layers at
/// about 10,000 instructions a request, `docs/benchmarks.md`). The same
/// routes are in the axum router, which answers the other methods (405) and
/// every other path. The path is also the door's metrics label.
fn door_path(op: Operation) -> &'static str {
    match op {
        Operation::Native => "/v1/inference",
        Operation::Chat => "/v1/chat/completions",
        Operation::Completions => "/v1/completions",
        Operation::Embeddings => "/v1/embeddings",
        Operation::Responses => "/v1/responses",
        Operation::Messages => "/v1/messages",
        Operation::CountTokens => "/v1/messages/count_tokens",
    }
}

/// The door a request is for: `POST` and exactly its path (as axum's router
/// matches it).
fn door_of(method: &Method, path: &str) -> Option<Operation> {
    if method != Method::POST {
        return None;
    }
    Operation::ALL.into_iter().find(|op| door_path(*op) == path)
}

/// Serves `op` at its door.
async fn door(op: Operation, state: SharedState, request: Request) -> Response {
    match op {
        Operation::Native => native::inference(State(state), request).await,
        Operation::Chat | Operation::Completions | Operation::Embeddings | Operation::Responses => {
            openai::handle(state, request, op).await
        }
        Operation::Messages | Operation::CountTokens => anthropic::handle(state, request, op).await,
    }
}

/// What the server serves: the doors directly, everything else through the
/// axum router.
#[derive(Clone)]
pub struct App {
    state: SharedState,
    router: Router,
    /// Each door's HTTP series, in [`Operation::ALL`]'s order.
    doors: Arc<[RouteSeries]>,
}

impl App {
    pub fn new(state: SharedState) -> Self {
        let doors = Operation::ALL.map(|op| state.core.metrics.route_series(door_path(op)));
        Self { router: router(state.clone()), state, doors: Arc::new(doors) }
    }

    /// One request from `peer`, counted by route and status.
    pub async fn serve(&self, mut request: hyper::Request<hyper::body::Incoming>, peer: SocketAddr) -> Response {
        if let Some(op) = door_of(request.method(), request.uri().path()) {
            let started = Instant::now();
            let response = door(op, self.state.clone(), request.map(Body::new)).await;
            // `Operation::ALL` lists the operations in their declared order.
            self.doors[op as usize].count(response.status(), started.elapsed());
            return response;
        }
        request.extensions_mut().insert(ConnectInfo(peer));
        match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

fn router(state: SharedState) -> Router {
    let admin = Router::new()
        .route("/v1/admin/routing/backends", get(admin::list_backends))
        .route("/v1/admin/routing/backends/{backend_id}/health", get(admin::backend_health))
        .route("/v1/admin/routing/backends/{backend_id}/degrade", post(admin::degrade))
        .route("/v1/admin/routing/backends/{backend_id}/healthy", post(admin::mark_healthy))
        .route("/v1/admin/routing/policies", post(admin::upsert_policy))
        .route("/v1/admin/routing/policies/{org_id}/{*model}", get(admin::get_policy))
        .route("/v1/admin/routing/decisions", get(admin::decisions))
        .route("/v1/admin/organizations/{org_id}/limits", get(admin::get_limits).put(admin::put_limits))
        .route("/v1/admin/organizations/{org_id}/usage", get(admin::usage))
        .route("/v1/admin/usage/buffer", get(admin::buffer_status))
        .route("/v1/admin/usage/buffer/retry", post(admin::buffer_retry))
        .route("/v1/admin/keys", post(keys::create).get(keys::list))
        .route("/v1/admin/keys/{key_id}", get(keys::show).delete(keys::revoke))
        .route("/v1/admin/keys/{key_id}/rotate", post(keys::rotate))
        .route("/v1/admin/keys/{key_id}/usage", get(keys::usage))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin::require_admin));

    let mut doors = Router::new();
    for op in Operation::ALL {
        doors = doors.route(
            door_path(op),
            post(move |State(state): State<SharedState>, request: Request| door(op, state, request)),
        );
    }
    doors
        .route("/v1/models", get(openai::models))
        .route("/v1/status/healthz", get(status::healthz))
        .route("/v1/status/readyz", get(status::readyz))
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(status::openapi))
        .route("/v1/audit/requests/{request_id}", get(audit::lookup))
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts every answer the axum router gives by route template and status.
async fn track(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The route template is shared (an `Arc<str>`), not copied.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let response = next.run(request).await;
    count(&state, route, &response, started);
    response
}

fn count(state: &HttpState, route: &str, response: &Response, started: Instant) {
    let metrics = &state.core.metrics;
    metrics.http_requests.with_label_values(&[route, response.status().as_str()]).inc();
    metrics.http_duration.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
}

/// How much of an oversized body is read and thrown away, so that a client
/// still sending gets to read its 413 rather than a reset (nginx's lingering
/// close); past this, or [`DRAIN_TIME`], the connection is closed.
const DRAIN_LIMIT: u64 = 8 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads a request body within `limit` bytes and `timeout`: 413 on a
/// `Content-Length` over the limit before reading, or when a chunked body
/// passes it; 408 when the body is not in within the timeout (both close the
/// connection); 400 when the client's framing breaks.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|n| n > limit as u64) {
        drain(&mut body).await;
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let read = async {
        let mut gathered = Gather::default();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| Some(ApiError::InvalidRequest(format!("could not read the request body: {e}"))))?;
            if let Ok(data) = frame.into_data() {
                if gathered.len() + data.len() > limit {
                    return Err(None);
                }
                gathered.push(data);
            }
        }
        Ok(gathered.into_bytes())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(Some(e))) => Err(e),
        Ok(Err(None)) => {
            drain(&mut body).await;
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(_) => Err(ApiError::RequestTimeout { after: timeout }),
    }
}

/// Reads and discards up to [`DRAIN_LIMIT`] bytes for [`DRAIN_TIME`].
async fn drain(body: &mut Body) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut drained = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, |d| d.len() as u64);
            if drained > DRAIN_LIMIT {
                return;
            }
        }
    })
    .await;
}

/// The request id from `X-Request-Id` (a new one without it); a value that
/// breaks the rules, or is not text, is a 400.
pub fn request_id_header(headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
    use router_core::request::{REQUEST_ID_RULES, new_request_id, valid_request_id};
    match headers.get("x-request-id").map(|h| h.to_str()) {
        None => Ok(new_request_id()),
        Some(Ok(id)) if valid_request_id(id) => Ok(Arc::from(id)),
        Some(_) => Err(ApiError::InvalidRequest(format!("invalid X-Request-Id: use {REQUEST_ID_RULES}"))),
    }
}

/// The shape a door answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Native,
    /// Chat, completions and embeddings.
    OpenAi,
    /// The Responses API: OpenAI's errors, its own stream events.
    Responses,
    Anthropic,
}

impl Shape {
    pub fn error(self, e: ApiError, request_id: Option<&str>) -> Response {
        match self {
            Shape::Native => e.native(request_id),
            Shape::OpenAi | Shape::Responses => e.openai(request_id),
            Shape::Anthropic => e.anthropic(request_id),
        }
    }

    /// The event that ends a stream that broke midway.
    fn break_event(self) -> BreakEvent {
        match self {
            // The native door does not stream; OpenAI's event is as good as any.
            Shape::Native | Shape::OpenAi => openai::stream_error_event,
            Shape::Responses => openai::responses_error_event,
            Shape::Anthropic => anthropic::stream_error_event,
        }
    }
}

/// Writes a processed request in the door's shape, with `X-Request-Id`,
/// `X-Backend-Id` and `RateLimit-*`.
pub fn respond(processed: Processed, shape: Shape) -> Response {
    let Processed { request_id, rate, outcome } = processed;
    let mut response = match outcome {
        Outcome::Answered { response, backend_id } => {
            let mut r = (response.status, response.body).into_response();
            let content_type = response.content_type.unwrap_or_else(|| HeaderValue::from_static("application/json"));
            r.headers_mut().insert(header::CONTENT_TYPE, content_type);
            if let Some(encoding) = response.content_encoding {
                r.headers_mut().insert(header::CONTENT_ENCODING, encoding);
            }
            ids(&mut r, &request_id, &backend_id);
            r
        }
        Outcome::Streaming { status, content_type, content_encoding, backend_id, body } => {
            let mut r = Response::new(Body::new((*body).with_break_event(shape.break_event())));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                content_type.unwrap_or_else(|| HeaderValue::from_static("text/event-stream")),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            if let Some(encoding) = content_encoding {
                h.insert(header::CONTENT_ENCODING, encoding);
            }
            ids(&mut r, &request_id, &backend_id);
            r
        }
        Outcome::Failed(e) => shape.error(e.into(), Some(&request_id)),
    };
    if let Some(info) = rate {
        rate_limit_headers(response.headers_mut(), &info);
    }
    response
}

/// Names made once, not looked up from text per answer.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_BACKEND_ID: HeaderName = HeaderName::from_static("x-backend-id");

fn ids(response: &mut Response, request_id: &str, backend_id: &str) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(X_REQUEST_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(backend_id) {
        h.insert(X_BACKEND_ID, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_listed_in_their_declared_order() {
        for (i, op) in Operation::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "{op:?}: `App::doors` is indexed by it");
        }
    }

    #[test]
    fn doors_are_matched_by_post_and_exact_path_only() {
        for op in Operation::ALL {
            let path = door_path(op);
            assert_eq!(door_of(&Method::POST, path), Some(op));
            for method in [Method::GET, Method::PUT, Method::HEAD, Method::OPTIONS] {
                assert_eq!(door_of(&method, path), None, "{method} {path}");
            }
            for near in [format!("{path}/"), path.to_uppercase(), path[1..].to_string()] {
                assert_eq!(door_of(&Method::POST, &near), None, "{near}");
            }
        }
        let paths: std::collections::HashSet<_> = Operation::ALL.into_iter().map(door_path).collect();
        assert_eq!(paths.len(), Operation::ALL.len(), "each door has its own path");
        assert_eq!(door_of(&Method::POST, "/v1/models"), None);
    }
}
