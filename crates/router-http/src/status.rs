//! Liveness, readiness (per component), the Prometheus endpoint and the
//! OpenAPI document.

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use router_core::build_info;
use router_core::readiness::is_ready;
use router_core::util::{age_seconds, rfc3339};
use serde_json::{Map, Value, json};

use crate::SharedState;

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
    let statuses: Vec<_> = state.core.components.iter().map(|c| (c.name(), c.status())).collect();
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
    let snapshot = state.core.config.load_full();
    state.core.metrics.health_status.reset();
    for b in &snapshot.backend_list {
        let value = match (&b.degraded, b.runtime.health.is_healthy()) {
            (Some(_), _) => 2,
            (None, true) => 1,
            (None, false) => 0,
        };
        state.core.metrics.health_status.with_label_values(&[&*b.id]).set(value);
        let cooldown = b.runtime.cooldown.remaining().map(|d| d.as_secs_f64()).unwrap_or(0.0);
        state.core.metrics.cooldown_seconds.with_label_values(&[&*b.id]).set(cooldown);
    }
    // Per-organization denial counters exist, at 0, for every known
    // organization, so that a query or a grep finds them before any denial.
    for org in snapshot.organizations() {
        for family in [
            &state.core.metrics.rate_limit_denials,
            &state.core.metrics.budget_denials,
            &state.core.metrics.quota_denials,
        ] {
            family.with_label_values(&[org]);
        }
    }
    if let Some((_, shared)) = &state.core.publisher {
        let (size, oldest) = {
            let b = shared.lock();
            (b.pending(), b.oldest_ms())
        };
        state.core.metrics.buffer_size.set(size as i64);
        state.core.metrics.buffer_age.set(age_seconds(oldest));
    }
    if let Some(age) = state.core.writer.seconds_since_sync() {
        state.core.metrics.config_sync_age.set(age);
    }
    for c in &state.core.components {
        state.core.metrics.component_health.with_label_values(&[c.name()]).set(c.status().gauge());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.core.metrics.encode()).into_response()
}

/// `GET /openapi.json`: `docs/openapi.yaml`, embedded at build time and
/// converted to JSON once.
pub async fn openapi() -> Response {
    static JSON: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body = JSON.get_or_init(|| {
        serde_yaml::from_str::<Value>(include_str!("../../../docs/openapi.yaml"))
            .and_then(|v| serde_json::to_vec(&v).map_err(serde::ser::Error::custom))
            .unwrap_or_else(|e| format!(r#"{{"error":"openapi.yaml does not parse: {e}"}}"#).into_bytes())
    });
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}
