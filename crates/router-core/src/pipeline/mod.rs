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
//!    order) of backends that can serve the operation (in their own shape,
//!    or through a translation), leaving out degraded and unhealthy ones and
//!    those cooling down after an upstream 429.
//! 4. **Dispatch with failover.** Try the candidates in order, each over its
//!    own transport with the body its provider prepares, translated when
//!    the backend's shape is not the door's (a field it cannot express skips
//!    that backend). Each attempt feeds passive health, the cool-down,
//!    metrics and the decision log. A stream fails over only before its
//!    first byte. When every candidate has failed (or none was routable),
//!    the policy's fallback models are tried in order, each under its own
//!    policy (a `FALLBACK_MODEL` decision per hop).
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

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

// Tokio's clock: the real one in service, the paused one in tests.
use tokio::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderName, HeaderValue};
use router_providers::provider::UpstreamRequest;
use router_providers::translate::{Translation, Untranslatable};
use router_providers::transport::{self, Answer, AttemptError, BackendResponse};
use router_providers::{Kind, Operation};

use crate::audit::{AuditAttempt, AuditError, AuditRecord};
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
    /// The audit record could not be journaled.
    Audit(AuditError),
    /// No backend could take the request in its shape: the message names
    /// the field that could not be translated.
    Untranslatable(String),
    /// Every backend for the model is cooling down after telling the router
    /// to wait (`status`: 429, or 503 when none said 429).
    CoolingDown { status: u16, retry_after_secs: u64 },
    /// The request's API key may not use this model.
    ModelNotAllowed(String),
}

impl RequestError {
    /// Whether the policy's fallback models are tried after this error (a
    /// fallback model without a policy is passed over for the next).
    fn allows_fallback(&self) -> bool {
        matches!(
            self,
            RequestError::ModelNotFound(_)
                | RequestError::NoHealthyBackend
                | RequestError::BackendsFailed { .. }
                | RequestError::Untranslatable(_)
                | RequestError::CoolingDown { .. }
        )
    }
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
            RequestError::Audit(e) => write!(f, "the audit record could not be stored ({e}); retry the request"),
            RequestError::Untranslatable(e) => write!(f, "no backend for this model can take the request: {e}"),
            RequestError::CoolingDown { retry_after_secs, .. } => {
                write!(f, "every backend for this model is rate limited upstream; retry after {retry_after_secs} s")
            }
            RequestError::ModelNotAllowed(m) => write!(f, "this API key may not use model {m:?}"),
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
        content_encoding: Option<HeaderValue>,
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
    // One snapshot read for everything this request needs from it. Hold
    // `Arc`s, not the snapshot guard, across awaits.
    let (org_limits, price, policy) = {
        let snapshot = core.config.load();
        (
            snapshot.org_limits(&request.organization_id),
            snapshot.price(&request.model),
            snapshot.route(&request.organization_id, &request.model).cloned(),
        )
    };

    // Step 1: a full usage buffer refuses work it could not record; a key
    // restricted to some models refuses the others (audited, as denials are).
    if let Err(e) = core.usage.check_capacity() {
        return failed(RequestError::Usage(e), None);
    }
    if request.key.as_ref().is_some_and(|k| !k.allows(&request.model)) {
        let e = RequestError::ModelNotAllowed(request.model.to_string());
        let ending = Ending { status: (core.status_of)(&e), backend_id: None, error: Some(e.to_string()), usage: None };
        let _ = audit(core, &request, started_at, started, ending, Vec::new()).await;
        return failed(e, None);
    }

    // Step 2: rate limit, budget and quota, in one check. Denials are audited.
    let billable = request.op != Operation::CountTokens;
    let admit = AdmitRequest {
        org: &request.organization_id,
        request_id: &request.request_id,
        model: &request.model,
        limits: org_limits,
        price,
        billable,
        key: request.key.as_deref(),
    };
    let admission = match core.limits.admit(&admit).await {
        Ok(a) => a,
        Err(e) => {
            let e = RequestError::Limits(e);
            let ending =
                Ending { status: (core.status_of)(&e), backend_id: None, error: Some(e.to_string()), usage: None };
            let _ = audit(core, &request, started_at, started, ending, Vec::new()).await;
            return failed(e, None);
        }
    };

    // Steps 3 and 4: route, then dispatch with failover; then the fallback
    // models, each under its own policy.
    let mut attempts = Vec::new();
    let mut served_request = None;
    let mut result = match &policy {
        Some(policy) => dispatch(core, &request, policy, DecisionType::Primary, &mut attempts).await,
        None => Err(RequestError::ModelNotFound(request.model.to_string())),
    };
    let fallbacks = policy.as_ref().map(|p| p.policy.fallback_models.as_slice()).unwrap_or_default();
    for model in fallbacks {
        let Err(error) = &result else { break };
        if !error.allows_fallback() {
            break;
        }
        if request.key.as_ref().is_some_and(|k| !k.allows(model)) {
            continue;
        }
        let next = core.config.load().route(&request.organization_id, model).cloned();
        let reason = format!("model {} failed ({error}); trying model {model}", request.model);
        record_decision(core, &request, None, DecisionType::FallbackModel, reason, None, None, 0.0);
        tracing::warn!(model = %request.model, fallback_model = %model, error = %error, "falling back to another model");
        let hop = request.with_model(model);
        result = match &next {
            Some(next) => dispatch(core, &hop, next, DecisionType::FallbackModel, &mut attempts).await,
            None => Err(RequestError::ModelNotFound(model.clone())),
        };
        served_request = Some(hop);
    }
    let served_model = served_request.as_ref().filter(|_| result.is_ok()).map(|r| r.model.clone());
    let mut reservation = admission.reservation;
    let mut price = price;
    if let Some(model) = &served_model {
        price = core.config.load().price(model);
        if let Some(r) = reservation.as_mut() {
            r.reprice(price);
        }
    }
    let rate = admission.rate;
    let mut finish = Finish {
        core: core.clone(),
        request,
        served_model,
        started_at,
        started,
        price,
        billable,
        reservation,
        attempts,
    };
    let outcome = match result {
        Ok(served) => match served.answer {
            Answer::Stream(s) => finish.stream(s, served.backend_id, served.kind, served.translation),
            Answer::Full(response) => {
                finish.full(Ok((response, served.backend_id, served.kind, served.translation))).await
            }
        },
        Err(e) => finish.full(Err(e)).await,
    };
    Processed { request_id, rate, outcome }
}

/// The headers every upstream request carries, named once (a name made
/// from text per request is an allocation).
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ORGANIZATION_ID: HeaderName = HeaderName::from_static("x-organization-id");

/// What one successful attempt produced, and how.
struct Served {
    answer: Answer,
    backend_id: Arc<str>,
    kind: Kind,
    translation: Option<Translation>,
}

type Full = (BackendResponse, Arc<str>, Kind, Option<Translation>);

/// Everything steps 5 and 6 need, for a complete answer now or a stream later.
pub struct Finish {
    core: Arc<Core>,
    request: InferenceRequest,
    /// The fallback model that answered, if one did.
    served_model: Option<Arc<str>>,
    started_at: SystemTime,
    started: Instant,
    price: Option<Price>,
    billable: bool,
    reservation: Option<Reservation>,
    attempts: Vec<AuditAttempt>,
}

impl Finish {
    /// Steps 5 and 6 for a complete answer (or an error). A translated
    /// answer is read (for usage) in the backend's shape and returned in the
    /// door's.
    async fn full(&mut self, result: Result<Full, RequestError>) -> Outcome {
        let (status, backend_id, error, usage, success) = match &result {
            Ok((answer, backend, kind, translation)) => {
                let success = answer.status.is_success();
                let op = translation.map(Translation::upstream_op).unwrap_or(self.request.op);
                let usage = if success { kind.provider().usage(op, &answer.body) } else { None };
                (answer.status.as_u16(), Some(backend.clone()), None, usage, success)
            }
            Err(e) => ((self.core.status_of)(e), None, Some(e.to_string()), None, false),
        };
        if let Err(e) = self.record(status, backend_id, error, usage, success).await {
            return Outcome::Failed(e);
        }
        match result {
            Ok((mut response, backend_id, _, Some(t))) => {
                let model = &self.request.model;
                let translated = if response.status.is_success() {
                    t.answer(&response.body, model)
                } else {
                    Some(t.error(response.status.as_u16(), &response.body))
                };
                // What could not be read (compressed, say) goes on as it came.
                if let Some(body) = translated {
                    response.body = body;
                    response.content_type = Some(http::HeaderValue::from_static("application/json"));
                    response.content_encoding = None;
                }
                Outcome::Answered { response, backend_id }
            }
            Ok((response, backend_id, _, None)) => Outcome::Answered { response, backend_id },
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Settles, writes the usage record ahead, and journals the audit record.
    /// `Err` when either could not be stored: then the answer must not be sent.
    async fn record(
        &mut self,
        status: u16,
        backend_id: Option<Arc<str>>,
        error: Option<String>,
        usage: Option<Usage>,
        success: bool,
    ) -> Result<(), RequestError> {
        let core = self.core.clone();
        // Backends that leave the total out (or count it otherwise) are
        // recorded with the parts' sum.
        let usage = usage.map(|u| Usage { total_tokens: u.total(), ..u });
        // Step 5: settle to what was used, or release.
        if let Some(reservation) = self.reservation.take() {
            core.limits.finish(reservation, success.then_some(usage));
        }
        if let Some(u) = usage {
            let tokens = &core.metrics.tokens_by_type;
            tokens.prompt.inc_by(u.prompt_tokens);
            tokens.completion.inc_by(u.completion_tokens);
            tokens.cache_read.inc_by(u.cache_read_tokens);
            tokens.cache_write.inc_by(u.cache_write_tokens);
        }
        // Step 6: the usage record ahead, then the audit record.
        let attempts = std::mem::take(&mut self.attempts);
        let request = &self.request;
        let cached = |n: u64| usage.is_some().then_some(n).filter(|n| *n > 0);
        let record = UsageRecord {
            schema_version: usage::SCHEMA_VERSION,
            request_id: request.request_id.clone(),
            organization_id: request.organization_id.clone(),
            key_id: request.key_id(),
            model: request.model.clone(),
            served_model: self.served_model.clone(),
            backend_id: backend_id.clone(),
            decision_type: attempts.last().map(|a| a.decision_type),
            attempts: attempts.len() as u32,
            status,
            error: error.clone(),
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            total_tokens: usage.map(|u| u.total()),
            cache_read_tokens: usage.and_then(|u| cached(u.cache_read_tokens)),
            cache_write_tokens: usage.and_then(|u| cached(u.cache_write_tokens)),
            cost: (self.billable && (self.price.is_some() || core.limits.settings().default_request_cost > 0.0))
                .then(|| core.limits.cost(self.price, usage)),
            timestamp: SystemTime::now(),
            router_instance_id: core.instance_id.clone(),
        };
        if let Err(e) = core.usage.record(&record).await {
            let failure = RequestError::Usage(e);
            let ending =
                Ending { status: (core.status_of)(&failure), backend_id, error: Some(failure.to_string()), usage };
            let _ = audit(&core, request, self.started_at, self.started, ending, attempts).await;
            return Err(failure);
        }
        let ending = Ending { status, backend_id, error, usage };
        audit(&core, request, self.started_at, self.started, ending, attempts).await.map_err(RequestError::Audit)
    }

    /// A stream: answer now with the first bytes; steps 5 and 6 run when it
    /// ends, breaks, or the client leaves. Usage is read in the backend's
    /// shape; a translated stream is sent on in the door's.
    fn stream(
        self,
        s: transport::StreamStart,
        backend: Arc<str>,
        kind: Kind,
        translation: Option<Translation>,
    ) -> Outcome {
        let op = translation.map(Translation::upstream_op).unwrap_or(self.request.op);
        let scanner = router_providers::sse::Scanner::new(kind, op);
        let translator = translation.map(|t| t.stream(&self.request.model, self.request.wants_stream_usage()));
        Outcome::Streaming {
            status: s.status,
            content_type: s.content_type,
            // A translated stream is re-written as text.
            content_encoding: s.content_encoding.filter(|_| translator.is_none()),
            backend_id: backend.clone(),
            body: Box::new(stream::MeteredBody::new(s.first, s.rest, scanner, translator, self, backend)),
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

/// One decision in the log and the decisions metric.
#[allow(clippy::too_many_arguments)]
fn record_decision(
    core: &Core,
    request: &InferenceRequest,
    backend_id: Option<Arc<str>>,
    t: DecisionType,
    reason: impl Into<Cow<'static, str>>,
    status: Option<u16>,
    error: Option<String>,
    latency_ms: f64,
) {
    core.metrics.decisions.with_label_values(&[t.as_str(), backend_id.as_deref().unwrap_or("")]).inc();
    core.decisions.record(RoutingDecision {
        request_id: request.request_id.clone(),
        organization_id: request.organization_id.clone(),
        key_id: request.key_id(),
        model: request.model.clone(),
        backend_id,
        decision_type: t,
        reason: reason.into(),
        status,
        error,
        latency_ms,
        timestamp: SystemTime::now(),
    });
}

/// A request body in one backend shape, computed once per request and
/// shape: (the translation, its body or why it cannot be expressed).
type Translated = (Translation, Result<(Bytes, serde_json::Value), Untranslatable>);

/// Steps 3 and 4 under one policy: candidates in order; each attempt feeds
/// passive health, the cool-down, metrics, the decision log and `attempts`.
/// `first` is the decision type of the first attempt (`FALLBACK_MODEL` on a
/// fallback hop).
async fn dispatch(
    core: &Core,
    request: &InferenceRequest,
    policy: &RoutePolicy,
    first: DecisionType,
    attempts: &mut Vec<AuditAttempt>,
) -> Result<Served, RequestError> {
    let candidates = selector::candidates(policy, request.op, &mut fastrand::Rng::new());
    if candidates.is_empty() {
        let cooling = cooling_down(policy, request.op);
        let reason = match cooling {
            Some(_) => {
                format!("every backend of policy {} is cooling down after an upstream 429", policy.policy.policy_id)
            }
            None => format!(
                "no routable backend for {} requests in policy {}",
                request.op.as_str(),
                policy.policy.policy_id
            ),
        };
        tracing::warn!(model = %request.model, policy_id = %policy.policy.policy_id, "no healthy backend");
        record_decision(core, request, None, DecisionType::NoHealthyBackend, reason, None, None, 0.0);
        return Err(cooling.unwrap_or(RequestError::NoHealthyBackend));
    }

    let headers = [(X_REQUEST_ID, &*request.request_id), (X_ORGANIZATION_ID, &*request.organization_id)];
    let mut translated: Vec<Translated> = Vec::new();
    let mut untranslatable: Option<Untranslatable> = None;
    let mut previous: Option<(Arc<str>, AttemptError)> = None;
    let (mut tried, mut throttled) = (0usize, 0usize);
    for (i, (backend, weight)) in candidates.iter().enumerate() {
        let decision_type = match (i, *weight) {
            (0, w) if w > 0 => first,
            _ if first == DecisionType::FallbackModel && tried == 0 => first,
            _ => DecisionType::Failover,
        };
        let reason: Cow<'static, str> = match (&previous, *weight) {
            (Some((prev, err)), _) => format!("failover from {prev}: {err}").into(),
            (None, 0) => "standby: no weighted backend is routable".into(),
            (None, _) => "weighted pick".into(),
        };
        // The request in this backend's shape: as it came, or translated.
        let translation = Translation::between(request.op, backend.kind()).flatten();
        let upstream = match translation {
            None => UpstreamRequest {
                headers: &request.headers,
                op: request.op,
                model: &request.model,
                stream: request.stream,
                body: &request.body,
                json: request.json.as_ref(),
            },
            Some(t) => {
                if !translated.iter().any(|(done, _)| *done == t) {
                    let body = request.json.as_ref().ok_or_else(|| Untranslatable("the body is not JSON".into()));
                    let out = body.and_then(|b| t.request(b)).and_then(|v| {
                        serde_json::to_vec(&v).map(|b| (Bytes::from(b), v)).map_err(|e| Untranslatable(e.to_string()))
                    });
                    translated.push((t, out));
                }
                let Some((_, result)) = translated.iter().find(|(done, _)| *done == t) else { continue };
                match result {
                    Ok((body, json)) => UpstreamRequest {
                        headers: &request.headers,
                        op: t.upstream_op(),
                        model: &request.model,
                        stream: request.stream,
                        body,
                        json: Some(json),
                    },
                    Err(e) => {
                        // Not an attempt: nothing was sent, and the backend is fine.
                        record_decision(
                            core,
                            request,
                            Some(backend.id.clone()),
                            decision_type,
                            reason,
                            None,
                            Some(format!("untranslatable: {e}")),
                            0.0,
                        );
                        untranslatable = Some(e.clone());
                        continue;
                    }
                }
            }
        };
        tried += 1;
        let attempt_started_at = SystemTime::now();
        let t0 = Instant::now();
        let result = attempt(core, backend, &upstream, &headers).await;
        let elapsed = t0.elapsed();
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let rt = &backend.runtime;
        let (status, error) = match &result {
            Ok(a) => (Some(a.status().as_u16()), None),
            Err(e) => (e.status().map(|s| s.as_u16()), Some(e)),
        };
        rt.metrics.attempt(status, error, elapsed.as_secs_f64());
        let error_text = error.map(|e| e.to_string());
        record_decision(
            core,
            request,
            Some(backend.id.clone()),
            decision_type,
            reason,
            status,
            error_text.clone(),
            latency_ms,
        );
        attempts.push(AuditAttempt {
            backend_id: backend.id.clone(),
            model: request.model.clone(),
            decision_type,
            status,
            error: error_text,
            latency_ms,
            started_at: attempt_started_at,
        });
        match result {
            Ok(answer) => {
                rt.health.record_success();
                return Ok(Served { answer, backend_id: backend.id.clone(), kind: backend.kind(), translation });
            }
            Err(err) => {
                if let AttemptError::Throttled { retry_after, .. } = &err {
                    throttled += 1;
                    let applied = rt.cooldown.start(*retry_after, core.cooldown_max);
                    rt.metrics.cooldowns.inc();
                    tracing::warn!(backend_id = %backend.id, cooldown_ms = applied.as_millis() as u64, error = %err, "backend cooling down after an upstream rate limit");
                } else if err.counts_against_health()
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
    if tried > 0 && throttled == tried {
        // Every backend tried asked to be left alone: tell the client when.
        if let Some(e) = cooling_down(policy, request.op) {
            return Err(e);
        }
    }
    match (previous, untranslatable) {
        (None, Some(e)) => Err(RequestError::Untranslatable(e.0)),
        (last, _) => Err(RequestError::BackendsFailed {
            attempts: tried,
            last: last.map(|(_, e)| e).unwrap_or(AttemptError::Timeout),
        }),
    }
}

/// When the policy's available backends for `op` are all cooling down: the
/// error that says how long until the first is back.
fn cooling_down(policy: &RoutePolicy, op: Operation) -> Option<RequestError> {
    let mut soonest: Option<std::time::Duration> = None;
    for (b, _) in &policy.members {
        if !b.can_serve(op) || !b.is_available() {
            continue;
        }
        match b.runtime.cooldown.remaining() {
            Some(left) => soonest = Some(soonest.map_or(left, |s| s.min(left))),
            // One is available and not cooling: this is not a cool-down.
            None => return None,
        }
    }
    soonest.map(|left| RequestError::CoolingDown {
        status: 429,
        retry_after_secs: left.as_secs_f64().ceil().max(1.0) as u64,
    })
}

/// One attempt at one backend: its provider prepares the request, its
/// transport carries it, within the per-attempt timeout.
async fn attempt(
    core: &Core,
    backend: &Backend,
    upstream: &UpstreamRequest<'_>,
    headers: &[(HeaderName, &str)],
) -> Result<Answer, AttemptError> {
    let request = backend.target.request(upstream, headers).map_err(AttemptError::Io)?;
    if upstream.stream {
        transport::open_stream(&*backend.transport, request, core.backend_timeout, core.max_response_bytes).await
    } else {
        transport::send(&*backend.transport, request, core.backend_timeout, core.max_response_bytes)
            .await
            .map(Answer::Full)
    }
}

/// How a request ended, for its audit record.
struct Ending {
    status: u16,
    backend_id: Option<Arc<str>>,
    error: Option<String>,
    usage: Option<Usage>,
}

/// Step 6: journal the audit record (one hop to the journal's group commit;
/// the database commit comes later, off the request path).
async fn audit(
    core: &Core,
    request: &InferenceRequest,
    started_at: SystemTime,
    started: Instant,
    ending: Ending,
    attempts: Vec<AuditAttempt>,
) -> Result<(), AuditError> {
    let record = AuditRecord {
        request_id: request.request_id.clone(),
        organization_id: request.organization_id.clone(),
        key_id: request.key_id(),
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
    core.audit.record(&record).await
}
