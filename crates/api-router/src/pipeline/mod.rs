//! The request path, in one ordered list. Each step says what it needs and
//! what it adds. Later capabilities (usage records, the OpenAI door) are
//! further steps or another parse in this list, not a second path.
//!
//! 1. **Request id.** A valid `request_id` from the body, or a generated UUID.
//!    Everything below runs in a tracing span carrying it.
//! 2. **Body limit.** 413 before reading more than `MAX_BODY_BYTES`.
//! 3. **Authenticate.** `X-API-Key` (or `Authorization: Bearer` on the OpenAI
//!    door) → organization (hash lookup, constant-time compare).
//! 4. **Parse.** The native body, or an OpenAI body ([`crate::api::openai`]),
//!    becomes one [`InferenceRequest`]. Both doors share everything below.
//! 5. **Admit.** Rate limit, budget and quota in one check (one Redis round
//!    trip when Redis is configured): 429 or 402, or a reservation to settle.
//! 6. **Route.** The snapshot's policy for (organization, model), or the
//!    default route → an ordered candidate list (weighted pick, then failover
//!    order), leaving out degraded and unhealthy backends.
//! 7. **Dispatch with failover.** Try candidates of the door's backend kind in
//!    order on the pooled client. Each attempt feeds passive health, metrics
//!    and the decision log. A stream fails over only before its first byte.
//! 8. **Settle.** The reservation is settled to the reported usage on success,
//!    released otherwise; the settler task applies it off the request path.
//! 9. **Record.** The usage record is written ahead to the durable buffer
//!    (group commit) before the client is answered; the publisher sends it to
//!    Kafka later. The audit record goes to its batched writer without waiting.
//!    The response gets `X-Request-Id`, `X-Backend-Id` and `RateLimit-*`.
//!    A stream is answered as it arrives, so steps 8 and 9 run when it ends,
//!    breaks or the client leaves ([`stream`]), on the task tracker.

pub mod stream;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tracing::Instrument;

use crate::api::auth;
use crate::api::error::{ApiError, rate_limit_headers};
use crate::api::{AppState, SharedState};
use crate::audit::{AuditAttempt, AuditRecord};
use crate::backends::client::{Answer, AttemptError, BackendResponse, StreamStart};
use crate::backends::health::Transition;
use crate::config_service::{Backend, BackendKind, RoutePolicy};
use crate::limits::gcra::RateInfo;
use crate::limits::{AdmitRequest, Price, Reservation, Usage};
use crate::routing::decisions::{DecisionType, RoutingDecision};
use crate::routing::selector;
use crate::usage::{self, UsageRecord};

/// Which door a request came through: what it is, and what kind of backend
/// can serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Native,
    Chat,
    Completions,
    Embeddings,
}

impl Door {
    pub fn backend_kind(self) -> BackendKind {
        if self == Door::Native { BackendKind::Native } else { BackendKind::Openai }
    }

    /// The upstream path on an OpenAI-compatible backend.
    pub fn openai_path(self) -> &'static str {
        match self {
            Door::Chat => "/v1/chat/completions",
            Door::Completions => "/v1/completions",
            Door::Embeddings => "/v1/embeddings",
            Door::Native => "/v1/inference",
        }
    }

    /// Errors in the door's own shape.
    pub fn error(self, e: ApiError, request_id: Option<&str>) -> Response {
        match self {
            Door::Native => e.into_response_with_id(request_id),
            _ => e.into_openai_response(request_id),
        }
    }
}

/// One inference request, whatever door it came through.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub request_id: Arc<str>,
    pub organization_id: Arc<str>,
    pub model: Arc<str>,
    /// The body forwarded to the backend: as received, or (a stream on the
    /// OpenAI door) with `stream_options.include_usage` set.
    pub body: Bytes,
    pub door: Door,
    /// `"stream": true` on the OpenAI door.
    pub stream: bool,
}

/// The longest accepted `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// `POST /v1/inference`.
pub async fn inference(state: &SharedState, headers: HeaderMap, body: Body) -> Response {
    // Step 2: the body, within the limit.
    let bytes = match read_body(body, &headers, state.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response_with_id(None),
    };
    // Step 3: authenticate.
    let organization_id = match auth::organization(&state.config.load(), &headers) {
        Ok(org) => org,
        Err(e) => return e.into_response_with_id(None),
    };
    // Steps 1 and 4: parse, with the request id.
    let request = match parse_native(bytes, organization_id) {
        Ok(r) => r,
        Err(e) => return e.into_response_with_id(None),
    };
    let span =
        tracing::info_span!("request", request_id = %request.request_id, organization_id = %request.organization_id);
    process(state, request).instrument(span).await
}

/// Step 2. Refuses on `Content-Length` before reading, and stops reading at
/// the limit for chunked bodies.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::InvalidRequest(format!("could not read the request body: {e}"))
        }
    })
}

#[derive(Deserialize)]
struct NativeBody<'a> {
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// A generated request id: a UUID v4 from the thread's fast generator. It
/// only has to be unique, not secret (lookups are scoped to the caller's
/// organization), so it costs no `getrandom` system call per request.
pub fn new_request_id() -> Arc<str> {
    let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    Arc::from(&*uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
}

/// Step 4 for the native door: `{"request_id", "model", "payload"}`.
pub fn parse_native(body: Bytes, organization_id: Arc<str>) -> Result<InferenceRequest, ApiError> {
    let parsed: NativeBody<'_> = serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest(format!("invalid request: {e}")),
        _ => ApiError::InvalidJson(e.to_string()),
    })?;
    let model = match parsed.model.as_deref() {
        Some(m) if !m.is_empty() && m.len() <= 256 => Arc::from(m),
        Some(_) => {
            return Err(ApiError::InvalidRequest("`model` must be 1-256 characters".into()));
        }
        None => return Err(ApiError::InvalidRequest("missing field `model`".into())),
    };
    let request_id = match parsed.request_id.as_deref() {
        None => new_request_id(),
        Some(id) if valid_request_id(id) => Arc::from(id),
        Some(_) => {
            return Err(ApiError::InvalidRequest(format!(
                "invalid `request_id`: use 1-{MAX_REQUEST_ID_LEN} letters, digits, '-', '_', '.' or ':'"
            )));
        }
    };
    drop(parsed);
    Ok(InferenceRequest { request_id, organization_id, model, body, door: Door::Native, stream: false })
}

/// Steps 5 to 9, for a parsed request of either door.
pub async fn process(state: &SharedState, request: InferenceRequest) -> Response {
    let started_at = SystemTime::now();
    let started = Instant::now();
    let door = request.door;
    // One snapshot read for everything this request needs from it. Hold the
    // policy, not the snapshot guard, across awaits.
    let (org_limits, price, policy) = {
        let snapshot = state.config.load();
        (
            snapshot.org_limits(&request.organization_id),
            snapshot.price(&request.model),
            snapshot.route(&request.organization_id, &request.model).cloned(),
        )
    };

    // A full usage buffer refuses work it could not record.
    if let Err(e) = state.usage.check_capacity() {
        return door.error(e, Some(&request.request_id));
    }

    // Step 5: rate limit, budget and quota, in one check. Denials are audited.
    let admit = AdmitRequest {
        org: &request.organization_id,
        request_id: &request.request_id,
        model: &request.model,
        limits: org_limits,
        price,
    };
    let admission = match state.limits.admit(&admit).await {
        Ok(a) => a,
        Err(e) => {
            let outcome =
                Outcome { status: e.status().as_u16(), backend_id: None, error: Some(e.message()), usage: None };
            audit(state, &request, started_at, started, outcome, Vec::new());
            return door.error(e, Some(&request.request_id));
        }
    };

    // Steps 6 and 7: route, then dispatch with failover.
    let mut attempts = Vec::new();
    let result = match policy {
        Some(policy) => dispatch(state, &request, &policy, &mut attempts).await,
        None => Err(ApiError::ModelNotFound(request.model.to_string())),
    };
    let finish = Finish {
        state: state.clone(),
        request,
        started_at,
        started,
        price,
        reservation: admission.reservation,
        rate: admission.rate,
        attempts,
    };
    match result {
        Ok((Answer::Stream(s), backend)) => finish.stream(s, backend),
        Ok((Answer::Full(answer), backend)) => finish.full(Ok((answer, backend))).await,
        Err(e) => finish.full(Err(e)).await,
    }
}

/// Everything steps 8 and 9 need, for a complete answer now or a stream later.
pub struct Finish {
    state: SharedState,
    request: InferenceRequest,
    started_at: SystemTime,
    started: Instant,
    price: Option<Price>,
    reservation: Option<Reservation>,
    rate: Option<RateInfo>,
    attempts: Vec<AuditAttempt>,
}

impl Finish {
    /// Steps 8 and 9 for a complete answer (or an error).
    async fn full(mut self, result: Result<(BackendResponse, Arc<str>), ApiError>) -> Response {
        let usage = match &result {
            Ok((answer, _)) if answer.status.is_success() => parse_usage(&answer.body),
            _ => None,
        };
        let success = matches!(&result, Ok((answer, _)) if answer.status.is_success());
        let (status, backend_id, error) = match &result {
            Ok((answer, backend)) => (answer.status.as_u16(), Some(backend.clone()), None),
            Err(e) => (e.status().as_u16(), None, Some(e.message())),
        };
        if let Err(e) = self.record(status, backend_id.clone(), error.clone(), usage, success).await {
            return self.request.door.error(e, Some(&self.request.request_id));
        }
        let door = self.request.door;
        let mut response = match result {
            Ok((answer, backend)) => respond(answer, &self.request.request_id, &backend),
            Err(e) => door.error(e, Some(&self.request.request_id)),
        };
        if let Some(info) = self.rate.take() {
            rate_limit_headers(response.headers_mut(), &info);
        }
        response
    }

    /// Settles, writes the usage record ahead, and audits. `Err` when the
    /// usage record could not be stored: then the answer must not be sent.
    async fn record(
        &mut self,
        status: u16,
        backend_id: Option<Arc<str>>,
        error: Option<String>,
        usage: Option<Usage>,
        success: bool,
    ) -> Result<(), ApiError> {
        let state = self.state.clone();
        // Step 8: settle to what was used, or release.
        if let Some(reservation) = self.reservation.take() {
            state.limits.finish(reservation, success.then_some(usage));
        }
        if let Some(u) = usage {
            state.metrics.tokens.with_label_values(&["prompt"]).inc_by(u.prompt_tokens);
            state.metrics.tokens.with_label_values(&["completion"]).inc_by(u.completion_tokens);
        }
        // Step 9: the usage record ahead, then the audit record.
        let attempts = std::mem::take(&mut self.attempts);
        let request = &self.request;
        let record = UsageRecord {
            schema_version: usage::SCHEMA_VERSION,
            request_id: request.request_id.clone(),
            organization_id: request.organization_id.clone(),
            model: request.model.clone(),
            backend_id: backend_id.clone(),
            decision_type: attempts.last().map(|a| a.decision_type),
            attempts: attempts.len() as u32,
            status,
            error: error.clone(),
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            total_tokens: usage.map(|u| u.total_tokens.max(u.prompt_tokens + u.completion_tokens)),
            cost: (self.price.is_some() || state.limits.settings().default_request_cost > 0.0)
                .then(|| state.limits.cost(self.price, usage)),
            timestamp: SystemTime::now(),
            router_instance_id: state.instance_id.clone(),
        };
        if let Err(e) = state.usage.record(&record).await {
            let outcome = Outcome { status: e.status().as_u16(), backend_id, error: Some(e.message()), usage };
            audit(&state, request, self.started_at, self.started, outcome, attempts);
            return Err(e);
        }
        audit(&state, request, self.started_at, self.started, Outcome { status, backend_id, error, usage }, attempts);
        Ok(())
    }

    /// A stream: answer now with the first bytes; steps 8 and 9 run when it
    /// ends, breaks, or the client leaves.
    fn stream(mut self, s: StreamStart, backend: Arc<str>) -> Response {
        let mut builder = Response::builder()
            .status(s.status)
            .header(
                header::CONTENT_TYPE,
                s.content_type.unwrap_or_else(|| HeaderValue::from_static("text/event-stream")),
            )
            .header(header::CACHE_CONTROL, "no-cache");
        if let Ok(v) = HeaderValue::from_str(&self.request.request_id) {
            builder = builder.header("x-request-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(&backend) {
            builder = builder.header("x-backend-id", v);
        }
        let rate = self.rate.take();
        let body = stream::MeteredBody::new(s.first, s.rest, self, backend);
        let mut response = builder
            .body(Body::new(body))
            .unwrap_or_else(|e| ApiError::Internal(format!("cannot build the stream response: {e}")).into_response());
        if let Some(info) = rate {
            rate_limit_headers(response.headers_mut(), &info);
        }
        response
    }

    /// Called once by the stream body when it ends, breaks or is dropped.
    fn stream_done(self, backend: Arc<str>, usage: Option<Usage>, end: stream::End) {
        let state = self.state.clone();
        let (status, error) = match &end {
            stream::End::Complete => (200, None),
            stream::End::Broken(e) => (502, Some(format!("stream broken midway: {e}"))),
            stream::End::ClientGone => (499, Some("client disconnected; upstream request cancelled".to_string())),
        };
        if let Some(e) = &error {
            tracing::warn!(request_id = %self.request.request_id, backend_id = %backend, error = %e, "stream did not complete");
        }
        // Off the request path, and tracked: it completes even though the
        // client is gone, and shutdown waits for it.
        let mut finish = self;
        state.tasks.spawn(async move {
            let success = matches!(end, stream::End::Complete) || usage.is_some();
            let _ = finish.record(status, Some(backend), error, usage, success).await;
        });
    }
}

/// The `usage` object of a backend's JSON answer, if it has one.
pub fn parse_usage(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage {
        #[serde(default)]
        usage: Option<Usage>,
    }
    serde_json::from_slice::<WithUsage>(body).ok()?.usage
}

/// The body sent to one backend: the request's, or (OpenAI backends that map
/// model names) with the model name mapped.
fn upstream_body(request: &InferenceRequest, backend: &Backend) -> Bytes {
    let mapped = match backend.models.get(&*request.model) {
        Some(m) if request.door != Door::Native => m,
        _ => return request.body.clone(),
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&request.body) else {
        return request.body.clone();
    };
    v["model"] = serde_json::Value::from(mapped.as_str());
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or_else(|_| request.body.clone())
}

/// Steps 6 and 7: candidates in order; each attempt feeds passive health,
/// metrics, the decision log and `attempts`.
async fn dispatch(
    state: &AppState,
    request: &InferenceRequest,
    policy: &RoutePolicy,
    attempts: &mut Vec<AuditAttempt>,
) -> Result<(Answer, Arc<str>), ApiError> {
    let candidates = selector::candidates(policy, request.door.backend_kind(), &mut fastrand::Rng::new());
    let decision = |backend_id: Option<Arc<str>>,
                    t: DecisionType,
                    reason: String,
                    status: Option<u16>,
                    error: Option<String>,
                    latency_ms: f64| {
        state.metrics.decisions.with_label_values(&[t.as_str(), backend_id.as_deref().unwrap_or("")]).inc();
        state.decisions.record(RoutingDecision {
            request_id: request.request_id.clone(),
            organization_id: request.organization_id.clone(),
            model: request.model.clone(),
            backend_id,
            decision_type: t,
            reason,
            status,
            error,
            latency_ms,
            timestamp: SystemTime::now(),
        });
    };

    if candidates.is_empty() {
        let reason = format!(
            "no routable {} backend in policy {}",
            request.door.backend_kind().as_str(),
            policy.policy.policy_id
        );
        tracing::warn!(model = %request.model, policy_id = %policy.policy.policy_id, "no healthy backend");
        decision(None, DecisionType::NoHealthyBackend, reason, None, None, 0.0);
        return Err(ApiError::NoHealthyBackend);
    }

    let headers = [("x-request-id", &*request.request_id), ("x-organization-id", &*request.organization_id)];
    let mut previous: Option<(Arc<str>, AttemptError)> = None;
    for (i, (backend, weight)) in candidates.iter().enumerate() {
        let decision_type = if i == 0 && *weight > 0 { DecisionType::Primary } else { DecisionType::Failover };
        let reason = match (&previous, *weight) {
            (Some((prev, err)), _) => format!("failover from {prev}: {err}"),
            (None, 0) => "standby: no weighted backend is routable".to_string(),
            (None, _) => "weighted pick".to_string(),
        };
        let attempt_started_at = SystemTime::now();
        let t0 = Instant::now();
        let uri = if request.door == Door::Native {
            backend.inference_uri.clone()
        } else {
            backend.uri_for(request.door.openai_path())
        };
        let body = upstream_body(request, backend);
        let auth = backend.auth.as_ref();
        let result = if request.stream {
            state.client.open_stream(&uri, &headers, auth, body).await
        } else {
            state.client.send(&uri, &headers, auth, body).await.map(Answer::Full)
        };
        let elapsed = t0.elapsed();
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let rt = &backend.runtime;
        let (status, error) = match &result {
            Ok(a) => (Some(a.status().as_u16()), None),
            Err(e @ AttemptError::Status(s)) => (Some(s.as_u16()), Some(e)),
            Err(e) => (None, Some(e)),
        };
        rt.metrics.attempt(status, error, elapsed.as_secs_f64());
        let error_text = error.map(|e| e.to_string());
        decision(Some(backend.id.clone()), decision_type, reason, status, error_text.clone(), latency_ms);
        attempts.push(AuditAttempt {
            backend_id: backend.id.clone(),
            decision_type,
            status,
            error: error_text,
            latency_ms,
            started_at: attempt_started_at,
        });
        match result {
            Ok(answer) => {
                rt.health.record_success();
                return Ok((answer, backend.id.clone()));
            }
            Err(err) => {
                if err.counts_against_health()
                    && rt.health.record_failure(policy.policy.failover_threshold, &err.to_string())
                        == Transition::BecameUnhealthy
                {
                    rt.metrics.transition("unhealthy");
                    tracing::warn!(backend_id = %backend.id, threshold = policy.policy.failover_threshold, error = %err, "backend marked unhealthy after consecutive failures");
                }
                if i + 1 < candidates.len() {
                    rt.metrics.failover(&err);
                    tracing::warn!(backend_id = %backend.id, error = %err, error_type = err.error_type(), "backend attempt failed; failing over");
                } else {
                    tracing::warn!(backend_id = %backend.id, error = %err, error_type = err.error_type(), "backend attempt failed; no candidates left");
                }
                previous = Some((backend.id.clone(), err));
            }
        }
    }
    let last = previous.map(|(_, e)| e).unwrap_or(AttemptError::Timeout);
    Err(ApiError::BackendsFailed { attempts: candidates.len(), last })
}

fn respond(answer: BackendResponse, request_id: &str, backend_id: &str) -> Response {
    let mut response = (answer.status, answer.body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, answer.content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(backend_id) {
        h.insert("x-backend-id", v);
    }
    response
}

/// How a request ended, for its audit record.
struct Outcome {
    status: u16,
    backend_id: Option<Arc<str>>,
    error: Option<String>,
    usage: Option<Usage>,
}

/// Step 9: hand the audit record to the writer; never waits on the disk.
fn audit(
    state: &AppState,
    request: &InferenceRequest,
    started_at: SystemTime,
    started: Instant,
    outcome: Outcome,
    attempts: Vec<AuditAttempt>,
) {
    let record = AuditRecord {
        request_id: request.request_id.clone(),
        organization_id: request.organization_id.clone(),
        model: request.model.clone(),
        status: outcome.status,
        backend_id: outcome.backend_id,
        error: outcome.error,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        started_at,
        finished_at: SystemTime::now(),
        attempts,
        usage: outcome.usage,
    };
    state.audit.submit(record, &state.tasks);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_rules() {
        assert!(valid_request_id("test-123"));
        assert!(valid_request_id("a.b:c_d-E9"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id("slash/no"));
        assert!(valid_request_id(&"x".repeat(128)));
        assert!(!valid_request_id(&"x".repeat(129)));
    }

    #[test]
    fn native_parse_errors() {
        let org: Arc<str> = Arc::from("o");
        let p = |b: &'static str| parse_native(Bytes::from_static(b.as_bytes()), org.clone());
        assert!(matches!(p("{not json"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(p(r#"{"payload":1}"#), Err(ApiError::InvalidRequest(m)) if m.contains("model")));
        assert!(matches!(p(r#"{"model":"m","request_id":"bad id"}"#), Err(ApiError::InvalidRequest(_))));
        assert!(matches!(p(r#"[1,2]"#), Err(ApiError::InvalidRequest(_))));
        let ok = p(r#"{"model":"m","payload":{"x":[1]}}"#).unwrap();
        assert_eq!(ok.request_id.len(), 36, "generated UUID");
        let ok = p(r#"{"model":"m","request_id":"abc"}"#).unwrap();
        assert_eq!(&*ok.request_id, "abc");
    }
}
