//! The external budget service (`BUDGET_SERVICE_URL`), under the contract in
//! `docs/budget-service.md`: reserve before dispatch, settle after, health.
//!
//! Each call has a timeout. Denials are cached per organization for a short
//! time, so an exhausted organization does not cost a call per request. When
//! the service cannot be reached, `BUDGET_SERVICE_FAILURE_MODE` decides:
//! `open` admits, `closed` refuses with 503; either way it is logged and
//! counted in `api_router_budget_service_failures_total{mode}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use http::Uri;
use serde::Deserialize;
use serde_json::json;

use super::{AdmitRequest, BudgetServiceSettings, MICROS, Plan};
use std::sync::Arc;
use std::time::Duration;

use router_providers::transport::{self, Transport};

use super::LimitError;
use crate::metrics::Metrics;
use crate::readiness::{Component, ComponentStatus};

/// The largest answer read from the budget service.
const ANSWER_LIMIT: usize = 1 << 20;

#[derive(Debug, Deserialize)]
struct ReserveReply {
    allowed: bool,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    limit: Option<f64>,
    #[serde(default)]
    remaining: Option<f64>,
    #[serde(default)]
    reset_at: Option<String>,
}

pub struct BudgetService {
    settings: BudgetServiceSettings,
    transport: Arc<dyn Transport>,
    reserve_uri: Uri,
    settle_uri: Uri,
    health_uri: Uri,
    denials: Mutex<HashMap<String, (Instant, ReserveDenial)>>,
    healthy: AtomicBool,
}

#[derive(Debug, Clone)]
struct ReserveDenial {
    quota: bool,
    limit: f64,
    remaining: f64,
    reset_at: Option<SystemTime>,
}

impl ReserveDenial {
    fn error(&self) -> LimitError {
        if self.quota {
            LimitError::QuotaExceeded {
                kind: "quota",
                limit: self.limit.max(0.0) as u64,
                remaining: self.remaining.max(0.0) as u64,
                reset_at: self.reset_at,
            }
        } else {
            LimitError::BudgetExceeded {
                limit: self.limit,
                remaining: self.remaining,
                reset_at: self.reset_at,
                scope: super::Scope::Organization,
            }
        }
    }
}

/// How long a health check of the service may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn uri(base: &str, path: &str) -> Uri {
    // The URL was checked at start-up (the backend endpoint rules).
    router_providers::provider::join(base.trim_end_matches('/'), path)
}

impl BudgetService {
    pub fn new(settings: BudgetServiceSettings, transport: Arc<dyn Transport>) -> Self {
        Self {
            reserve_uri: uri(&settings.url, "/v1/budget/reserve"),
            settle_uri: uri(&settings.url, "/v1/budget/settle"),
            health_uri: uri(&settings.url, "/health"),
            settings,
            transport,
            denials: Mutex::new(HashMap::new()),
            healthy: AtomicBool::new(true),
        }
    }

    fn mode(&self) -> &'static str {
        if self.settings.fail_open { "open" } else { "closed" }
    }

    fn unreachable(&self, metrics: &Metrics, why: &str) -> Result<Option<LimitError>, LimitError> {
        self.healthy.store(false, Ordering::Relaxed);
        metrics.budget_service_failures.with_label_values(&[self.mode()]).inc();
        tracing::warn!(error = %why, mode = self.mode(), "budget service unreachable; applying BUDGET_SERVICE_FAILURE_MODE");
        if self.settings.fail_open { Ok(None) } else { Err(LimitError::BudgetServiceUnavailable) }
    }

    /// `Ok(None)`: reserved (or admitted under `open`). `Ok(Some(e))`: denied.
    pub async fn reserve(
        &self,
        req: &AdmitRequest<'_>,
        plan: &Plan,
        metrics: &Metrics,
    ) -> Result<Option<LimitError>, LimitError> {
        let org = &**req.org;
        {
            let mut cache = self.denials.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(org) {
                Some((until, d)) if *until > Instant::now() => {
                    let e = d.error();
                    drop(cache);
                    count_denial(metrics, &e, org);
                    return Ok(Some(e));
                }
                Some(_) => {
                    cache.remove(org);
                }
                None => {}
            }
        }
        let body = json!({
            "organization_id": org,
            "request_id": &**req.request_id,
            "model": req.model,
            "estimated_cost": plan.cost_micros as f64 / MICROS,
            "estimated_tokens": plan.tokens,
        });
        let answer = self.post(&self.reserve_uri, body).await;
        let answer = match answer {
            Ok(a) if a.status.is_success() => a,
            Ok(a) => {
                return self.unreachable(metrics, &format!("reserve answered {}", a.status.as_u16()));
            }
            Err(e) => return self.unreachable(metrics, &e.to_string()),
        };
        self.healthy.store(true, Ordering::Relaxed);
        let reply: ReserveReply = match serde_json::from_slice(&answer.body) {
            Ok(r) => r,
            Err(e) => {
                return self.unreachable(metrics, &format!("reserve reply is not the contract's JSON: {e}"));
            }
        };
        if reply.allowed {
            return Ok(None);
        }
        let denial = ReserveDenial {
            quota: reply.code.as_deref() == Some("quota_exceeded"),
            limit: reply.limit.unwrap_or(0.0),
            remaining: reply.remaining.unwrap_or(0.0),
            reset_at: reply.reset_at.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok()),
        };
        let e = denial.error();
        count_denial(metrics, &e, org);
        self.denials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(org.to_string(), (Instant::now() + self.settings.denial_cache, denial));
        Ok(Some(e))
    }

    pub async fn settle(&self, org: &str, request_id: &str, actual: Option<(i64, i64)>) -> Result<(), String> {
        let body = json!({
            "organization_id": org,
            "request_id": request_id,
            "released": actual.is_none(),
            "actual_cost": actual.map(|(c, _)| c as f64 / MICROS).unwrap_or(0.0),
            "actual_tokens": actual.map(|(_, t)| t).unwrap_or(0),
        });
        match self.post(&self.settle_uri, body).await {
            Ok(a) if a.status.is_success() => Ok(()),
            Ok(a) => Err(format!("budget service settle answered {}", a.status.as_u16())),
            Err(e) => Err(format!("budget service settle: {e}")),
        }
    }

    async fn post(
        &self,
        uri: &Uri,
        body: serde_json::Value,
    ) -> Result<transport::BackendResponse, transport::AttemptError> {
        let request = transport::post_json(uri, body.to_string().into())?;
        transport::send(&*self.transport, request, self.settings.timeout, ANSWER_LIMIT).await
    }

    /// The service's usage answer; one it cannot give, or that is not JSON,
    /// is the service being unavailable.
    pub async fn usage(&self, org: &str) -> Result<serde_json::Value, LimitError> {
        let uri = uri(&self.settings.url, &format!("/v1/budget/usage/{org}"));
        match transport::get(&*self.transport, &uri, self.settings.timeout, ANSWER_LIMIT).await {
            Ok(a) if a.status.is_success() => {
                serde_json::from_slice(&a.body).map_err(|_| LimitError::BudgetServiceUnavailable)
            }
            _ => Err(LimitError::BudgetServiceUnavailable),
        }
    }

    pub async fn check_health(&self) {
        let ok = transport::probe(&*self.transport, &self.health_uri, PROBE_TIMEOUT).await.is_ok();
        self.healthy.store(ok, Ordering::Relaxed);
    }
}

fn count_denial(metrics: &Metrics, e: &LimitError, org: &str) {
    match e {
        LimitError::QuotaExceeded { .. } => metrics.quota_denials.with_label_values(&[org]).inc(),
        _ => metrics.budget_denials.with_label_values(&[org]).inc(),
    }
}

/// Readiness component `budget_service`, shown only when configured.
pub struct BudgetServiceComponent(pub Arc<crate::limits::Limits>);

impl Component for BudgetServiceComponent {
    fn name(&self) -> &'static str {
        "budget_service"
    }
    fn status(&self) -> ComponentStatus {
        match self.0.service() {
            Some(s) if s.healthy.load(Ordering::Relaxed) => ComponentStatus::Healthy,
            Some(_) => ComponentStatus::Unhealthy,
            None => ComponentStatus::NotConfigured,
        }
    }
}
