//! The admin API (`/v1/admin/...`): backends, overrides, policies and routing
//! decisions. Every route passes [`require_admin`] first. Writes go through
//! `ConfigStore::update`, so a rejected write changes nothing and an accepted
//! one is in force before the response is sent.

use std::collections::HashMap;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use router_core::auth::{AdminAuthError, check_admin};
use router_core::config_service::{Backend, Override};
use router_core::limits::OrgLimits;
use router_core::routing::decisions::{DecisionFilter, DecisionType};
use router_core::routing::policy::PolicyInput;
use router_core::util::{ID_RULES, age_seconds, rfc3339, valid_id};

use crate::SharedState;
use crate::credentials::bearer;
use crate::error::ApiError;

/// The most decisions one call returns.
const MAX_DECISIONS: usize = 10_000;

/// Every admin route: the token checked in constant time. A failure is
/// counted and logged (with the client's address and the path, never what
/// was presented), and after repeated wrong tokens from one address answered
/// only after a growing delay ([`crate::throttle`]). A request with no token
/// at all guesses nothing, so it is counted but never slowed.
pub async fn require_admin(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let presented = bearer(request.headers());
    let guessed = presented.is_some();
    match check_admin(state.settings.admin_token.as_deref(), presented) {
        Ok(()) => {
            if let Some(ip) = peer {
                state.admin_throttle.succeeded(ip);
            }
            next.run(request).await
        }
        Err(e @ AdminAuthError::Unauthorized) => {
            state.core.metrics.admin_auth_failures.inc();
            let delay = peer.filter(|_| guessed).map(|ip| state.admin_throttle.failed(ip)).unwrap_or_default();
            tracing::warn!(
                client = %peer.map(|ip| ip.to_string()).unwrap_or_default(),
                path = %request.uri().path(),
                delay_ms = delay.as_millis() as u64,
                "admin authentication failed"
            );
            tokio::time::sleep(delay).await;
            ApiError::from(e).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn backend_json(b: &Backend) -> Value {
    let health = b.runtime.health.view();
    json!({
        "backend_id": &*b.id,
        "endpoint": b.endpoint(),
        "kind": b.kind(),
        "status": status_of(b),
        "degraded_reason": b.degraded.as_ref().map(|o| o.reason.as_str()),
        "degraded_since": b.degraded.as_ref().map(|o| rfc3339(o.since)),
        "degraded_by": b.degraded.as_ref().map(|o| o.by.as_str()),
        "consecutive_failures": health.consecutive_failures,
        "cooldown_seconds": cooldown_seconds(b),
    })
}

/// What is left of the backend's upstream cool-down, in seconds (0: none).
fn cooldown_seconds(b: &Backend) -> f64 {
    b.runtime.cooldown.remaining().map(|d| (d.as_secs_f64() * 10.0).ceil() / 10.0).unwrap_or(0.0)
}

fn status_of(b: &Backend) -> &'static str {
    if b.degraded.is_some() {
        "degraded"
    } else if b.runtime.health.is_healthy() {
        "healthy"
    } else {
        "unhealthy"
    }
}

pub async fn list_backends(State(state): State<SharedState>) -> Response {
    let snapshot = state.core.config.load_full();
    let backends: Vec<Value> = snapshot.backend_list.iter().map(|b| backend_json(b)).collect();
    axum::Json(json!({ "backends": backends })).into_response()
}

fn unknown_backend(id: &str) -> ApiError {
    ApiError::NotFound(format!("unknown backend {id:?}"))
}

pub async fn backend_health(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let snapshot = state.core.config.load_full();
    let b = snapshot.backend(&id).ok_or_else(|| unknown_backend(&id))?;
    let mut body = serde_json::to_value(b.runtime.health.view()).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["backend_id"] = json!(&*b.id);
    body["endpoint"] = json!(b.endpoint());
    body["kind"] = json!(b.kind());
    body["status"] = json!(status_of(b));
    body["degraded_reason"] = json!(b.degraded.as_ref().map(|o| o.reason.as_str()));
    body["cooldown_seconds"] = json!(cooldown_seconds(b));
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize, Default)]
struct DegradeBody {
    reason: Option<String>,
}

/// Parses an optional JSON body: empty is the default, anything else must parse.
fn optional_json<T: for<'de> Deserialize<'de> + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

pub(crate) async fn small_body(state: &SharedState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    crate::read_body(body, headers, 64 * 1024, state.settings.body_read_timeout).await
}

pub async fn degrade(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let input: DegradeBody = optional_json(&small_body(&state, &headers, body).await?)?;
    let reason = input.reason.filter(|r| !r.trim().is_empty()).unwrap_or_else(|| "degraded by admin".into());
    if reason.len() > 1024 {
        return Err(ApiError::InvalidRequest("`reason` must be at most 1024 characters".into()));
    }
    let over = Override { reason: reason.clone(), since: SystemTime::now(), by: "admin".into() };
    state.core.writer.set_override(&id, Some(over)).await?;
    tracing::warn!(backend_id = %id, reason = %reason, "backend marked degraded by admin");
    let snapshot = state.core.config.load_full();
    let b = snapshot.backend(&id).ok_or_else(|| unknown_backend(&id))?;
    Ok(axum::Json(backend_json(b)).into_response())
}

pub async fn mark_healthy(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The body carries nothing, but if one is sent it must be JSON.
    let _: Option<Value> = optional_json(&small_body(&state, &headers, body).await?)?;
    state.core.writer.set_override(&id, None).await?;
    let snapshot = state.core.config.load_full();
    let b = snapshot.backend(&id).ok_or_else(|| unknown_backend(&id))?;
    b.runtime.health.reset();
    b.runtime.cooldown.clear();
    tracing::info!(backend_id = %id, "backend marked healthy by admin");
    Ok(axum::Json(backend_json(b)).into_response())
}

pub async fn upsert_policy(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = small_body(&state, &headers, body).await?;
    let input: PolicyInput = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest(format!("invalid policy: {e}")),
        _ => ApiError::InvalidJson(e.to_string()),
    })?;
    let policy = input.into_policy().map_err(|e| ApiError::InvalidRequest(format!("invalid policy: {e}")))?;
    let stored = policy.clone();
    state.core.writer.put_policy(policy).await?;
    tracing::info!(policy_id = %stored.policy_id, organization_id = %stored.organization_id, model = %stored.model, "routing policy updated");
    Ok(axum::Json(stored).into_response())
}

pub async fn get_policy(
    State(state): State<SharedState>,
    Path((org, model)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let snapshot = state.core.config.load_full();
    match snapshot.policy(&org, &model) {
        Some(p) => Ok(axum::Json(&p.policy).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no policy for organization {org:?} and model {model:?}{}",
            if snapshot.state.default_route { " (the default route applies)" } else { "" }
        ))),
    }
}

pub async fn decisions(
    State(state): State<SharedState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut filter = DecisionFilter::default();
    for (k, v) in params {
        match k.as_str() {
            "backend_id" => filter.backend_id = Some(v),
            "decision_type" => {
                filter.decision_type =
                    Some(serde_json::from_value::<DecisionType>(Value::String(v.clone())).map_err(|_| {
                        ApiError::InvalidRequest(format!(
                            "unknown decision_type {v:?}: use PRIMARY, FAILOVER, NO_HEALTHY_BACKEND or FALLBACK_MODEL"
                        ))
                    })?)
            }
            "limit" => {
                filter.limit =
                    Some(v.parse::<usize>().ok().filter(|n| (1..=MAX_DECISIONS).contains(n)).ok_or_else(|| {
                        ApiError::InvalidRequest(format!("`limit` must be an integer from 1 to {MAX_DECISIONS}"))
                    })?)
            }
            other => {
                return Err(ApiError::InvalidRequest(format!("unknown query parameter {other:?}")));
            }
        }
    }
    Ok(axum::Json(json!({ "decisions": state.core.decisions.query(&filter) })).into_response())
}

pub async fn get_limits(State(state): State<SharedState>, Path(org): Path<String>) -> Result<Response, ApiError> {
    let snapshot = state.core.config.load_full();
    let configured = snapshot.org_limits(&org);
    if configured.is_none() && !snapshot.knows_organization(&org) {
        return Err(ApiError::NotFound(format!("unknown organization {org:?}")));
    }
    Ok(axum::Json(limits_json(&state, &org, configured)).into_response())
}

fn limits_json(state: &SharedState, org: &str, configured: Option<OrgLimits>) -> Value {
    let limits = configured.unwrap_or_default();
    json!({
        "organization_id": org,
        "rate_limit": limits.rate_limit.or(state.core.limits.settings().default_rate),
        "rate_limit_source": if limits.rate_limit.is_some() { "organization" } else { "default" },
        "budget": limits.budget,
        "quota": limits.quota,
    })
}

/// Replaces the organization's limits. Validated first; a 400 changes nothing.
pub async fn put_limits(
    State(state): State<SharedState>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !valid_id(&org) {
        return Err(ApiError::InvalidRequest(format!("organization id must be {ID_RULES}")));
    }
    let bytes = small_body(&state, &headers, body).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ApiError::InvalidRequest("invalid limits: expected a JSON object".into()));
    }
    let limits = OrgLimits::from_json(value).map_err(|e| ApiError::InvalidRequest(format!("invalid limits: {e}")))?;
    state.core.writer.put_org_limits(&org, limits).await?;
    tracing::info!(organization_id = %org, "organization limits updated");
    Ok(axum::Json(limits_json(&state, &org, Some(limits))).into_response())
}

pub async fn usage(State(state): State<SharedState>, Path(org): Path<String>) -> Result<Response, ApiError> {
    let snapshot = state.core.config.load_full();
    if !snapshot.knows_organization(&org) {
        return Err(ApiError::NotFound(format!("unknown organization {org:?}")));
    }
    let body = state.core.limits.usage(&org, snapshot.org_limits(&org)).await?;
    Ok(axum::Json(body).into_response())
}

fn buffer_json(state: &SharedState) -> Result<Value, ApiError> {
    let Some((publisher, shared)) = &state.core.publisher else {
        return Err(ApiError::NotFound("usage publishing is not configured (set KAFKA_BROKERS)".into()));
    };
    let (size, oldest, watermark, next) = {
        let b = shared.lock();
        (b.pending(), b.oldest_ms(), b.watermark(), b.next_seq())
    };
    let last = publisher.last_error();
    Ok(json!({
        "size": size,
        "oldest_age_seconds": age_seconds(oldest),
        "kafka": if publisher.is_healthy() { "healthy" } else { "unhealthy" },
        "last_error": last.as_ref().map(|(e, _)| e.as_str()),
        "last_error_at": last.map(|(_, at)| rfc3339(at)),
        "watermark": watermark,
        "next_seq": next,
    }))
}

pub async fn buffer_status(State(state): State<SharedState>) -> Result<Response, ApiError> {
    Ok(axum::Json(buffer_json(&state)?).into_response())
}

/// The runbook's "manual retry": skip the publisher's backoff and drain now.
pub async fn buffer_retry(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let mut body = buffer_json(&state)?;
    if let Some((publisher, shared)) = &state.core.publisher {
        publisher.retry_now();
        shared.wake.notify_one();
        tracing::info!("usage buffer retry requested by admin");
    }
    body["retry"] = json!("requested");
    Ok(axum::Json(body).into_response())
}
