//! Liveness, readiness (per component) and the Prometheus endpoint.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::api::SharedState;
use crate::build_info;
use crate::config_service::ConfigStore;
use crate::telemetry::rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentStatus {
    Healthy,
    Unhealthy,
    NotConfigured,
}

impl ComponentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentStatus::Healthy => "healthy",
            ComponentStatus::Unhealthy => "unhealthy",
            ComponentStatus::NotConfigured => "not_configured",
        }
    }

    /// The `api_router_component_health` gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            ComponentStatus::Healthy => 1,
            ComponentStatus::Unhealthy => 0,
            ComponentStatus::NotConfigured => -1,
        }
    }
}

/// A dependency that readiness reports on.
pub trait Component: Send + Sync {
    fn name(&self) -> &'static str;
    fn status(&self) -> ComponentStatus;
}

/// A dependency that knows whether it is reachable.
pub trait Healthy: Send + Sync {
    fn is_healthy(&self) -> bool;
}

/// An optional dependency (`redis`, `kafka`, `config_service`): not
/// configured without one, else healthy or unhealthy as it reports.
pub struct Optional<T>(pub &'static str, pub Option<std::sync::Arc<T>>);

impl<T: Healthy> Component for Optional<T> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn status(&self) -> ComponentStatus {
        match &self.1 {
            None => ComponentStatus::NotConfigured,
            Some(d) if d.is_healthy() => ComponentStatus::Healthy,
            Some(_) => ComponentStatus::Unhealthy,
        }
    }
}

/// `backend_registry`: unhealthy with no backends, or none routable.
pub struct BackendRegistry(pub std::sync::Arc<ConfigStore>);

impl Component for BackendRegistry {
    fn name(&self) -> &'static str {
        "backend_registry"
    }
    fn status(&self) -> ComponentStatus {
        if self.0.load().any_routable() { ComponentStatus::Healthy } else { ComponentStatus::Unhealthy }
    }
}

/// Ready unless some component is unhealthy; `not_configured` is acceptable.
pub fn is_ready(statuses: &[(&'static str, ComponentStatus)]) -> bool {
    statuses.iter().all(|(_, s)| *s != ComponentStatus::Unhealthy)
}

pub async fn healthz() -> Response {
    axum::Json(json!({"status": "healthy", "timestamp": rfc3339(SystemTime::now())})).into_response()
}

/// `GET /v1/status/readyz`, exactly as the runbook shows. With
/// `?only=backend_registry` (comma-separated names), only those components
/// decide the status code; the body still reports all of them. The Helm chart's
/// readiness probe uses this, so that a shared dependency going down does not
/// take every replica out of service at once.
pub async fn readyz(
    State(state): State<SharedState>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let statuses: Vec<_> = state.components.iter().map(|c| (c.name(), c.status())).collect();
    let ready = match query.get("only") {
        None => is_ready(&statuses),
        Some(only) => {
            let names: Vec<&str> = only.split(',').map(str::trim).collect();
            let judged: Vec<_> = statuses.iter().filter(|(n, _)| names.contains(n)).copied().collect();
            is_ready(&judged)
        }
    };
    let components: Map<String, Value> =
        statuses.iter().map(|(n, s)| (n.to_string(), Value::from(s.as_str()))).collect();
    let body = json!({
        "status": if ready { "ready" } else { "degraded" },
        "components": components,
        "build": {"version": build_info::VERSION, "commit": build_info::COMMIT, "build_time": build_info::BUILD_TIME},
        "timestamp": rfc3339(SystemTime::now()),
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body)).into_response()
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    // Gauges that mirror state are set at scrape time from the current snapshot.
    let snapshot = state.config.load_full();
    state.metrics.health_status.reset();
    for b in &snapshot.backend_list {
        let value = match (&b.degraded, b.runtime.health.is_healthy()) {
            (Some(_), _) => 2,
            (None, true) => 1,
            (None, false) => 0,
        };
        state.metrics.health_status.with_label_values(&[&*b.id]).set(value);
    }
    // Per-organization denial counters exist, at 0, for every known
    // organization, so that a query or a grep finds them before any denial.
    for org in snapshot.organizations() {
        for family in [&state.metrics.rate_limit_denials, &state.metrics.budget_denials, &state.metrics.quota_denials] {
            family.with_label_values(&[org]);
        }
    }
    if let Some((_, shared)) = &state.publisher {
        let (size, oldest) = {
            let b = shared.lock();
            (b.pending(), b.oldest_ms())
        };
        state.metrics.buffer_size.set(size as i64);
        state.metrics.buffer_age.set(crate::telemetry::age_seconds(oldest));
    }
    if let crate::config_service::ConfigWriter::Etcd(src) = &state.writer {
        state.metrics.config_sync_age.set(src.seconds_since_sync());
    }
    for c in &state.components {
        state.metrics.component_health.with_label_values(&[c.name()]).set(c.status().gauge());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode()).into_response()
}

/// `GET /openapi.json`: `docs/openapi.yaml`, embedded at build time and
/// converted to JSON once.
pub async fn openapi() -> Response {
    static JSON: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body = JSON.get_or_init(|| {
        serde_yaml::from_str::<Value>(include_str!("../../../../docs/openapi.yaml"))
            .and_then(|v| serde_json::to_vec(&v).map_err(serde::ser::Error::custom))
            .unwrap_or_else(|e| format!(r#"{{"error":"openapi.yaml does not parse: {e}"}}"#).into_bytes())
    });
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_a_function_of_component_statuses() {
        use ComponentStatus::*;
        assert!(is_ready(&[("redis", NotConfigured), ("backend_registry", Healthy)]));
        assert!(!is_ready(&[("redis", Unhealthy), ("backend_registry", Healthy)]));
        assert!(!is_ready(&[("backend_registry", Unhealthy)]));
        assert!(is_ready(&[]));
    }
}
