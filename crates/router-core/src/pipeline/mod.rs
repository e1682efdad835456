//! The request path, in one ordered list. Each step says what it needs and
//! what it adds. The door has already done its part: a request id (its own
//! or a new one), the body within its limit, the organization behind the key
//! ([`crate::auth`]), and its shape parsed into one [`InferenceRequest`].
//!
//! 1. **Capacity.** A full usage buffer refuses work it could not record.
//! 2. **Admit.** Rate limit, budget and quota in one check (one Redis round
//!    trip when Redis is configured): a denial, or a reservation to settle.
//! 3. **Route.** The snapshot's policy for (organization, model), or the
//!    default route → an ordered candidate list (weighted pick, then failover
//!    order) of backends whose kind serves the operation, leaving out
//!    degraded and unhealthy ones.
//! 4. **Dispatch with failover.** Try the candidates in order, each over its
//!    own transport with the body its provider prepares. Each attempt feeds
//!    passive health, metrics and the decision log. A stream fails over only
//!    before its first byte.
//! 5. **Settle.** The reservation is settled to the reported usage on
//!    success, released otherwise; the settler task applies it off the path.
//! 6. **Record.** The usage record is written ahead to the durable buffer
//!    (group commit) before the outcome is returned; the publisher sends it
//!    to Kafka later. The audit record goes to its batched writer without
//!    waiting. A stream is answered as it arrives, so steps 5 and 6 run when
//!    it ends, breaks or the client leaves ([`stream`]), on the task tracker.
//!
//! The result is a [`Processed`]: the request id, the rate-limit state for
//! the response headers, and an [`Outcome`] (a full answer, a stream, or a
//! [`RequestError`]) that the door writes in its own shape.

pub mod stream;

use std::sync::Arc;
use std::time::SystemTime;

// Tokio's clock: the real one in service, the paused one in tests.
use tokio::time::Instant;

use http::StatusCode;
use http::header::HeaderValue;
use router_providers::Kind;
use router_providers::provider::UpstreamRequest;
use router_providers::transport::{self, Answer, AttemptError, BackendResponse};

use crate::audit::{AuditAttempt, AuditRecord};
use crate::backends::health::Transition;
use crate::config_service::{Backend, RoutePolicy};
use crate::core::Core;
use crate::limits::gcra::RateInfo;
use crate::limits::{AdmitRequest, LimitError, Price, Reservation, Usage};
use crate::request::InferenceRequest;
use crate::routing::decisions::{DecisionType, RoutingDecision};
use crate::routing::selector;
use crate::usage::{self, RecordError, UsageRecord};

/// Why a request was not answered by a backend. The door maps each to its
/// status and shape; the text is the message (and the audit record's error).
#[derive(Debug)]
pub enum RequestError {
    /// No policy for the model, and no default route.
    ModelNotFound(String),
    /// The policy has no backend that is healthy and not degraded.
    NoHealthyBackend,
    /// Every candidate failed; carries the last failure.
    BackendsFailed { attempts: usize, last: AttemptError },
    /// The admission check refused or could not decide.
    Limits(LimitError),
    /// The usage record could not be taken.
    Usage(RecordError),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::ModelNotFound(m) => write!(f, "no routing policy for model {m:?}"),
            RequestError::NoHealthyBackend => f.write_str("no healthy backend is available for this model"),
            RequestError::BackendsFailed { attempts, last } => {
                write!(f, "all {attempts} candidate backend(s) failed; last error: {last}")
            }
            RequestError::Limits(e) => e.fmt(f),
            RequestError::Usage(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RequestError {}

/// How the request ended, for the door to write.
pub enum Outcome {
    /// A backend's complete answer, whatever its status.
    Answered { response: BackendResponse, backend_id: Arc<str> },
    /// A 2xx stream: the head now, the body as it arrives.
    Streaming {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        backend_id: Arc<str>,
        body: Box<stream::MeteredBody>,
    },
    /// The request failed here.
    Failed(RequestError),
}

/// A processed request: its id, the rate-limit state for the
/// `RateLimit-*` headers, and how it ended.
pub struct Processed {
    pub request_id: Arc<str>,
    pub rate: Option<RateInfo>,
    pub outcome: Outcome,
}

/// Steps 1 to 6 for a parsed request of any door.
pub async fn process(core: &Arc<Core>, request: InferenceRequest) -> Processed {
    let started_at = SystemTime::now();
    let started = Instant::now();
    let request_id = request.request_id.clone();
    let failed =
        |e: RequestError, rate| Processed { request_id: request_id.clone(), rate, outcome: Outcome::Failed(e) };
    // One snapshot read for everything this request needs from it. Hold the
    // policy, not the snapshot guard, across awaits.
    let (org_limits, price, policy) = {
        let snapshot = core.config.load();
        (
            snapshot.org_limits(&request.organization_id),
            snapshot.price(&request.model),
            snapshot.route(&request.organization_id, &request.model).cloned(),
        )
    };

    // Step 1: a full usage buffer refuses work it could not record.
    if let Err(e) = core.usage.check_capacity() {
        return failed(RequestError::Usage(e), None);
    }

    // Step 2: rate limit, budget and quota, in one check. Denials are audited.
    let admit = AdmitRequest {
        org: &request.organization_id,
        request_id: &request.request_id,
        model: &request.model,
        limits: org_limits,
        price,
    };
    let admission = match core.limits.admit(&admit).await {
        Ok(a) => a,
        Err(e) => {
            let e = RequestError::Limits(e);
            let outcome =
                Ending { status: (core.status_of)(&e), backend_id: None, error: Some(e.to_string()), usage: None };
            audit(core, &request, started_at, started, outcome, Vec::new());
            return failed(e, None);
        }
    };

    // Steps 3 and 4: route, then dispatch with failover.
    let mut attempts = Vec::new();
    let result = match policy {
        Some(policy) => dispatch(core, &request, &policy, &mut attempts).await,
        None => Err(RequestError::ModelNotFound(request.model.to_string())),
    };
    let rate = admission.rate;
    let finish = Finish {
        core: core.clone(),
        request,
        started_at,
        started,
        price,
        reservation: admission.reservation,
        attempts,
    };
    let outcome = match result {
        Ok((Answer::Stream(s), backend, kind)) => finish.stream(s, backend, kind),
        Ok((Answer::Full(answer), backend, kind)) => finish.full(Ok((answer, backend, kind))).await,
        Err(e) => finish.full(Err(e)).await,
    };
    Processed { request_id, rate, outcome }
}

/// Everything steps 5 and 6 need, for a complete answer now or a stream later.
pub struct Finish {
    core: Arc<Core>,
    request: InferenceRequest,
    started_at: SystemTime,
    started: Instant,
    price: Option<Price>,
    reservation: Option<Reservation>,
    attempts: Vec<AuditAttempt>,
}

impl Finish {
    /// Steps 5 and 6 for a complete answer (or an error).
    async fn full(mut self, result: Result<(BackendResponse, Arc<str>, Kind), RequestError>) -> Outcome {
        let (status, backend_id, error, usage, success) = match &result {
            Ok((answer, backend, kind)) => {
                let success = answer.status.is_success();
                let usage = if success { kind.provider().usage(self.request.op, &answer.body) } else { None };
                (answer.status.as_u16(), Some(backend.clone()), None, usage, success)
            }
            Err(e) => ((self.core.status_of)(e), None, Some(e.to_string()), None, false),
        };
        if let Err(e) = self.record(status, backend_id, error, usage, success).await {
            return Outcome::Failed(RequestError::Usage(e));
        }
        match result {
            Ok((response, backend_id, _)) => Outcome::Answered { response, backend_id },
            Err(e) => Outcome::Failed(e),
        }
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
    ) -> Result<(), RecordError> {
        let core = self.core.clone();
        // Step 5: settle to what was used, or release.
        if let Some(reservation) = self.reservation.take() {
            core.limits.finish(reservation, success.then_some(usage));
        }
        if let Some(u) = usage {
            core.metrics.tokens.with_label_values(&["prompt"]).inc_by(u.prompt_tokens);
            core.metrics.tokens.with_label_values(&["completion"]).inc_by(u.completion_tokens);
        }
        // Step 6: the usage record ahead, then the audit record.
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
            total_tokens: usage.map(|u| u.total()),
            cost: (self.price.is_some() || core.limits.settings().default_request_cost > 0.0)
                .then(|| core.limits.cost(self.price, usage)),
            timestamp: SystemTime::now(),
            router_instance_id: core.instance_id.clone(),
        };
        if let Err(e) = core.usage.record(&record).await {
            let failure = RequestError::Usage(e.clone());
            let ending =
                Ending { status: (core.status_of)(&failure), backend_id, error: Some(failure.to_string()), usage };
            audit(&core, request, self.started_at, self.started, ending, attempts);
            return Err(e);
        }
        audit(&core, request, self.started_at, self.started, Ending { status, backend_id, error, usage }, attempts);
        Ok(())
    }

    /// A stream: answer now with the first bytes; steps 5 and 6 run when it
    /// ends, breaks, or the client leaves.
    fn stream(self, s: transport::StreamStart, backend: Arc<str>, kind: Kind) -> Outcome {
        let scanner = router_providers::sse::Scanner::new(kind, self.request.op);
        Outcome::Streaming {
            status: s.status,
            content_type: s.content_type,
            backend_id: backend.clone(),
            body: Box::new(stream::MeteredBody::new(s.first, s.rest, scanner, self, backend)),
        }
    }

    /// Called once by the stream body when it ends, breaks or is dropped.
    fn stream_done(self, backend: Arc<str>, usage: Option<Usage>, end: stream::End) {
        let core = self.core.clone();
        let (status, error) = match &end {
            stream::End::Complete => (200, None),
            stream::End::Reported(e) => (502, Some(format!("the backend reported an error in its stream: {e}"))),
            stream::End::Broken(e) => (502, Some(format!("stream broken midway: {e}"))),
            stream::End::ClientGone => (499, Some("client disconnected; upstream request cancelled".to_string())),
        };
        if let Some(e) = &error {
            tracing::warn!(request_id = %self.request.request_id, backend_id = %backend, error = %e, "stream did not complete");
        }
        // Off the request path, and tracked: it completes even though the
        // client is gone, and shutdown waits for it.
        let mut finish = self;
        core.tasks.spawn(async move {
            let success = matches!(end, stream::End::Complete) || usage.is_some();
            let _ = finish.record(status, Some(backend), error, usage, success).await;
        });
    }
}

/// Steps 3 and 4: candidates in order; each attempt feeds passive health,
/// metrics, the decision log and `attempts`.
async fn dispatch(
    core: &Core,
    request: &InferenceRequest,
    policy: &RoutePolicy,
    attempts: &mut Vec<AuditAttempt>,
) -> Result<(Answer, Arc<str>, Kind), RequestError> {
    let candidates = selector::candidates(policy, request.op, &mut fastrand::Rng::new());
    let decision = |backend_id: Option<Arc<str>>,
                    t: DecisionType,
                    reason: String,
                    status: Option<u16>,
                    error: Option<String>,
                    latency_ms: f64| {
        core.metrics.decisions.with_label_values(&[t.as_str(), backend_id.as_deref().unwrap_or("")]).inc();
        core.decisions.record(RoutingDecision {
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
        let reason =
            format!("no routable backend for {} requests in policy {}", request.op.as_str(), policy.policy.policy_id);
        tracing::warn!(model = %request.model, policy_id = %policy.policy.policy_id, "no healthy backend");
        decision(None, DecisionType::NoHealthyBackend, reason, None, None, 0.0);
        return Err(RequestError::NoHealthyBackend);
    }

    let headers = [("x-request-id", &*request.request_id), ("x-organization-id", &*request.organization_id)];
    let upstream = UpstreamRequest {
        op: request.op,
        model: &request.model,
        stream: request.stream,
        body: &request.body,
        json: request.json.as_ref(),
    };
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
        let result = attempt(core, backend, &upstream, &headers).await;
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
                return Ok((answer, backend.id.clone(), backend.kind()));
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
    Err(RequestError::BackendsFailed { attempts: candidates.len(), last })
}

/// One attempt at one backend: its provider prepares the request, its
/// transport carries it, within the per-attempt timeout.
async fn attempt(
    core: &Core,
    backend: &Backend,
    upstream: &UpstreamRequest<'_>,
    headers: &[(&'static str, &str)],
) -> Result<Answer, AttemptError> {
    let request = backend.target.request(upstream, headers).map_err(AttemptError::Io)?;
    if upstream.stream {
        transport::open_stream(&*backend.transport, request, core.backend_timeout).await
    } else {
        transport::send(&*backend.transport, request, core.backend_timeout).await.map(Answer::Full)
    }
}

/// How a request ended, for its audit record.
struct Ending {
    status: u16,
    backend_id: Option<Arc<str>>,
    error: Option<String>,
    usage: Option<Usage>,
}

/// Step 6: hand the audit record to the writer; never waits on the disk.
fn audit(
    core: &Core,
    request: &InferenceRequest,
    started_at: SystemTime,
    started: Instant,
    ending: Ending,
    attempts: Vec<AuditAttempt>,
) {
    let record = AuditRecord {
        request_id: request.request_id.clone(),
        organization_id: request.organization_id.clone(),
        model: request.model.clone(),
        status: ending.status,
        backend_id: ending.backend_id,
        error: ending.error,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        started_at,
        finished_at: SystemTime::now(),
        attempts,
        usage: ending.usage,
    };
    core.audit.submit(record, &core.tasks);
}
