//! Prometheus metrics. Every metric is registered here, in one registry.
//!
//! Labels are bounded: backend ids (from configuration), status classes, error
//! types, decision types, route templates and component names. No request ids,
//! organization-free user input or other unbounded values.
//!
//! `router_backend_health_status{backend_id}`: 1 = healthy, 0 = unhealthy
//! (circuit open or failed check), 2 = degraded (admin override).

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use router_providers::transport::AttemptError;

/// Backend latency buckets, in seconds, for LLM-scale latencies up to 60 s.
const BACKEND_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0];

pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// One route's HTTP series, looked up once (a label lookup is a lock and a
/// hash, ~150 instructions): its duration histogram and its count of `200`
/// answers; any other status is looked up by its label.
pub struct RouteSeries {
    route: &'static str,
    ok: IntCounter,
    duration: Histogram,
    requests: IntCounterVec,
}

impl RouteSeries {
    /// One answer with `status`, `elapsed` after the request came.
    pub fn count(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        if status == http::StatusCode::OK {
            self.ok.inc();
        } else {
            self.requests.with_label_values(&[self.route, status.as_str()]).inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The series of `api_router_tokens_total`, one per type.
pub struct TokenCounters {
    pub prompt: IntCounter,
    pub completion: IntCounter,
    pub cache_read: IntCounter,
    pub cache_write: IntCounter,
}

pub struct Inner {
    registry: Registry,
    backend_requests: IntCounterVec,
    backend_errors: IntCounterVec,
    backend_duration: HistogramVec,
    failovers: IntCounterVec,
    health_transitions: IntCounterVec,
    pub health_status: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub component_health: IntGaugeVec,
    pub audit_records: IntCounterVec,
    pub rate_limit_denials: IntCounterVec,
    pub budget_denials: IntCounterVec,
    pub quota_denials: IntCounterVec,
    pub limits_degraded: IntCounterVec,
    pub redis_errors: IntCounterVec,
    pub redis_admit_seconds: Histogram,
    pub budget_service_failures: IntCounterVec,
    pub settlements: IntCounterVec,
    pub buffer_size: prometheus::IntGauge,
    pub buffer_age: prometheus::Gauge,
    pub buffer_retries: prometheus::IntCounter,
    pub buffer_damaged: prometheus::IntCounter,
    pub producer_renewals: prometheus::IntCounter,
    pub buffer_full: prometheus::IntCounter,
    pub buffer_write_seconds: Histogram,
    pub audit_journal_seconds: Histogram,
    pub audit_pending: prometheus::IntGauge,
    pub usage_published: IntCounterVec,
    pub config_revision: prometheus::IntGauge,
    pub config_updates: IntCounter,
    pub config_watch_restarts: IntCounter,
    pub config_rejected: IntCounterVec,
    pub config_sync_age: prometheus::Gauge,
    pub tokens: IntCounterVec,
    /// `tokens`' four series, looked up once (a label lookup is a lock and
    /// a hash, ~130 instructions, four a request).
    pub tokens_by_type: TokenCounters,
    pub cooldowns: IntCounterVec,
    pub cooldown_seconds: prometheus::GaugeVec,
    pub http_connections: prometheus::IntGauge,
    pub http_connections_refused: IntCounter,
    pub http_accept_errors: IntCounter,
    pub http_connections_closed: IntCounterVec,
    pub http_requests_refused: IntCounterVec,
    pub admin_auth_failures: IntCounter,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels))
}

/// Registers a collector built by `made` and returns it.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, made: prometheus::Result<C>) -> C {
    // Building fails only for an invalid name or label set, which is a
    // programming error caught by the tests.
    let c = made.unwrap_or_else(|e| panic!("metric definition: {e}"));
    register(r, c.clone());
    c
}

fn register<C: prometheus::core::Collector + 'static>(r: &Registry, c: C) {
    // Registration fails only for a duplicate name or label set, which is a
    // programming error caught by the tests.
    #[allow(clippy::expect_used)]
    r.register(Box::new(c)).expect("metric names are unique");
}

impl Metrics {
    /// `route`'s series of `api_router_http_requests_total` and
    /// `api_router_http_request_duration_seconds`.
    pub fn route_series(&self, route: &'static str) -> RouteSeries {
        RouteSeries {
            route,
            ok: self.http_requests.with_label_values(&[route, "200"]),
            duration: self.http_duration.with_label_values(&[route]),
            requests: self.http_requests.clone(),
        }
    }

    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let r = Registry::new();
        let backend_requests = counter(
            &r,
            "api_router_backend_requests_total",
            "Attempts sent to backends, by backend and status class (error = no HTTP answer).",
            &["backend_id", "status_class"],
        );
        let backend_errors = counter(
            &r,
            "api_router_backend_errors_total",
            "Failed attempts, by backend and error type.",
            &["backend_id", "error_type"],
        );
        let backend_duration = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "api_router_backend_request_duration_seconds",
                    "Duration of each attempt at a backend, in seconds.",
                )
                .buckets(BACKEND_BUCKETS.to_vec()),
                &["backend_id"],
            ),
        );
        let failovers = counter(
            &r,
            "router_failover_total",
            "Failovers from a failed backend to the next candidate, by the failed backend and the reason.",
            &["backend_id", "reason"],
        );
        let health_transitions = counter(
            &r,
            "router_backend_health_transitions_total",
            "Backend health changes, by backend and new state.",
            &["backend_id", "to"],
        );
        let health_status = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "router_backend_health_status",
                    "Backend health: 1 = healthy, 0 = unhealthy, 2 = degraded by an admin.",
                ),
                &["backend_id"],
            ),
        );
        let decisions = counter(
            &r,
            "api_router_routing_decisions_total",
            "Routing decisions, by type (PRIMARY, FAILOVER, NO_HEALTHY_BACKEND) and backend.",
            &["decision_type", "backend_id"],
        );
        let http_requests = counter(
            &r,
            "api_router_http_requests_total",
            "HTTP requests served, by route template and status code.",
            &["route", "status"],
        );
        let http_duration = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new("api_router_http_request_duration_seconds", "Time to answer, by route template.")
                    .buckets(BACKEND_BUCKETS.to_vec()),
                &["route"],
            ),
        );
        let component_health = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "api_router_component_health",
                    "Readiness components: 1 = healthy, 0 = unhealthy, -1 = not configured.",
                ),
                &["component"],
            ),
        );
        let audit_records = counter(
            &r,
            "api_router_audit_records_total",
            "Audit records, by outcome (written, dropped, error).",
            &["status"],
        );
        let rate_limit_denials = counter(
            &r,
            "api_router_rate_limit_denials_total",
            "Requests refused with 429 by the rate limit, by organization.",
            &["organization_id"],
        );
        let budget_denials = counter(
            &r,
            "api_router_budget_denials_total",
            "Requests refused with 402 budget_exceeded, by organization.",
            &["organization_id"],
        );
        let quota_denials = counter(
            &r,
            "api_router_quota_denials_total",
            "Requests refused with 402 quota_exceeded, by organization.",
            &["organization_id"],
        );
        let limits_degraded = counter(
            &r,
            "api_router_limits_degraded_total",
            "Admission decisions taken under RATE_LIMIT_FAILURE_MODE while Redis was unavailable, by mode and outcome.",
            &["mode", "outcome"],
        );
        let redis_errors =
            counter(&r, "api_router_redis_errors_total", "Failed or timed-out Redis calls, by operation.", &["op"]);
        let redis_admit_seconds = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "api_router_redis_admit_seconds",
                    "Time for Redis to answer an admission (the limits script's round trip, on the request path); \
                     calls that failed or timed out are in api_router_redis_errors_total.",
                )
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
            ),
        );
        let budget_service_failures = counter(
            &r,
            "api_router_budget_service_failures_total",
            "Budget service calls that could not be answered, by failure mode.",
            &["mode"],
        );
        let settlements = counter(
            &r,
            "api_router_budget_settlements_total",
            "Budget and quota settlements, by outcome (applied, retried, dropped).",
            &["status"],
        );
        let buffer_size = reg(
            &r,
            prometheus::IntGauge::new(
                "api_router_buffer_store_size",
                "Usage records in the buffer store waiting for delivery to Kafka.",
            ),
        );
        let buffer_age = reg(
            &r,
            prometheus::Gauge::new(
                "api_router_buffer_store_age_seconds",
                "Age of the oldest usage record waiting in the buffer store (0 when empty).",
            ),
        );
        let buffer_retries = reg(
            &r,
            prometheus::IntCounter::new(
                "api_router_buffer_store_retries_total",
                "Times the publisher backed off and retried delivery from the buffer store.",
            ),
        );
        let buffer_damaged = reg(
            &r,
            prometheus::IntCounter::new(
                "api_router_buffer_store_damaged_total",
                "Damaged byte ranges found (and set aside) in the buffer store at start-up.",
            ),
        );
        let producer_renewals = reg(
            &r,
            prometheus::IntCounter::new(
                "api_router_usage_producer_renewals_total",
                "Times the Kafka producer was replaced by a new one (a fatal error, or records waiting 15 s without a delivery).",
            ),
        );
        let buffer_full = reg(
            &r,
            prometheus::IntCounter::new(
                "api_router_usage_buffer_full_total",
                "Requests refused with 503 usage_buffer_full because the buffer store was at its cap.",
            ),
        );
        let buffer_write_seconds = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "api_router_buffer_store_write_seconds",
                    "Duration of one group commit to the buffer store (write, and fsync if always).",
                )
                .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05]),
            ),
        );
        let audit_journal_seconds = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "api_router_audit_journal_write_seconds",
                    "Duration of one group commit to the audit journal (before the answer).",
                )
                .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05]),
            ),
        );
        let audit_pending = reg(
            &r,
            prometheus::IntGauge::new(
                "api_router_audit_pending_records",
                "Audit records in the journal not yet in the audit store (waiting for PostgreSQL, or for the next commit).",
            ),
        );
        let usage_published = counter(
            &r,
            "api_router_usage_records_published_total",
            "Usage records by outcome: success (delivered), error (delivery failed, will retry), dropped, write_error.",
            &["status"],
        );
        let config_revision = reg(
            &r,
            prometheus::IntGauge::new("api_router_config_revision", "The etcd revision of the routing state in force."),
        );
        let config_updates = reg(
            &r,
            IntCounter::new(
                "api_router_config_updates_total",
                "Configuration snapshots applied from the config service.",
            ),
        );
        let config_watch_restarts = reg(
            &r,
            IntCounter::new(
                "api_router_config_watch_restarts_total",
                "Times the etcd watch was re-established (broken, or compacted and re-read).",
            ),
        );
        let config_rejected = counter(
            &r,
            "api_router_config_rejected_total",
            "Config service entries rejected, by reason (json, invalid, unknown_backend, schema, empty, tls).",
            &["reason"],
        );
        let config_sync_age = reg(
            &r,
            prometheus::Gauge::new(
                "api_router_config_last_sync_seconds",
                "Seconds since etcd last confirmed this replica's configuration.",
            ),
        );
        let tokens = counter(
            &r,
            "api_router_tokens_total",
            "Tokens reported by backends (every door, streamed or not), by type (prompt, completion; cache_read and cache_write are the part of prompt read from or written to the provider's cache).",
            &["type"],
        );
        let cooldowns = counter(
            &r,
            "api_router_backend_cooldowns_total",
            "Upstream cool-downs started: a backend answered 429, 503 or 529 saying when to come back.",
            &["backend_id"],
        );
        let cooldown_seconds = reg(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "api_router_backend_cooldown_seconds",
                    "Seconds left of each backend's upstream cool-down (0: none).",
                ),
                &["backend_id"],
            ),
        );
        let http_connections =
            reg(&r, prometheus::IntGauge::new("api_router_http_connections", "Client connections open now."));
        let http_connections_refused = reg(
            &r,
            IntCounter::new(
                "api_router_http_connections_refused_total",
                "Client connections closed at once because HTTP_MAX_CONNECTIONS were open.",
            ),
        );
        let http_accept_errors = reg(
            &r,
            IntCounter::new(
                "api_router_http_accept_errors_total",
                "Failures to accept a client connection (e.g. out of file descriptors).",
            ),
        );
        let http_connections_closed = counter(
            &r,
            "api_router_http_connections_closed_total",
            "Client connections closed by the router, by reason (header_timeout, idle, tls_handshake).",
            &["reason"],
        );
        let http_requests_refused = counter(
            &r,
            "api_router_http_requests_refused_total",
            "Requests refused before a door read them, by reason (ambiguous_framing: both Content-Length and Transfer-Encoding, or several Transfer-Encodings).",
            &["reason"],
        );
        let admin_auth_failures = reg(
            &r,
            IntCounter::new(
                "api_router_admin_auth_failures_total",
                "Admin API calls with a missing or wrong admin token.",
            ),
        );
        let build_info = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("api_router_build_info", "Build information; always 1."),
                &["version", "commit"],
            ),
        );
        build_info.with_label_values(&[crate::build_info::VERSION, crate::build_info::COMMIT]).set(1);
        #[cfg(target_os = "linux")]
        register(&r, prometheus::process_collector::ProcessCollector::for_self());
        // Series with a fixed set of labels exist from the start, at 0, so
        // that queries and alerts see them before the first event (the
        // tokens counter's, through `tokens_by_type` below).
        let fixed: [(&IntCounterVec, &[&str]); 5] = [
            (&usage_published, &["success", "error", "dropped", "write_error"]),
            (&settlements, &["applied", "retried", "dropped"]),
            (&audit_records, &["written", "dropped", "error"]),
            (&config_rejected, &["json", "invalid", "unknown_backend", "schema", "empty", "tls"]),
            (&budget_service_failures, &["open", "closed"]),
        ];
        for (vec, values) in fixed {
            for v in values {
                vec.with_label_values(&[v]);
            }
        }

        let tokens_by_type = TokenCounters {
            prompt: tokens.with_label_values(&["prompt"]),
            completion: tokens.with_label_values(&["completion"]),
            cache_read: tokens.with_label_values(&["cache_read"]),
            cache_write: tokens.with_label_values(&["cache_write"]),
        };

        Metrics(Arc::new(Inner {
            registry: r,
            backend_requests,
            backend_errors,
            backend_duration,
            failovers,
            health_transitions,
            health_status,
            decisions,
            http_requests,
            http_duration,
            component_health,
            audit_records,
            rate_limit_denials,
            budget_denials,
            quota_denials,
            limits_degraded,
            redis_errors,
            redis_admit_seconds,
            budget_service_failures,
            settlements,
            buffer_size,
            buffer_age,
            buffer_retries,
            buffer_damaged,
            producer_renewals,
            buffer_full,
            buffer_write_seconds,
            audit_journal_seconds,
            audit_pending,
            usage_published,
            config_revision,
            config_updates,
            config_watch_restarts,
            config_rejected,
            config_sync_age,
            tokens,
            tokens_by_type,
            cooldowns,
            cooldown_seconds,
            http_connections,
            http_connections_refused,
            http_accept_errors,
            http_connections_closed,
            http_requests_refused,
            admin_auth_failures,
        }))
    }

    /// Pre-resolved handles for one backend, so the request path does no label
    /// lookups.
    pub fn backend(&self, id: &str) -> BackendMetrics {
        BackendMetrics {
            requests: STATUS_CLASSES.map(|c| self.backend_requests.with_label_values(&[id, c])),
            no_answer: self.backend_requests.with_label_values(&[id, "error"]),
            errors: AttemptError::ERROR_TYPES.map(|t| self.backend_errors.with_label_values(&[id, t])),
            failovers: AttemptError::ERROR_TYPES.map(|t| self.failovers.with_label_values(&[id, t])),
            duration: self.backend_duration.with_label_values(&[id]),
            to_healthy: self.health_transitions.with_label_values(&[id, "healthy"]),
            to_unhealthy: self.health_transitions.with_label_values(&[id, "unhealthy"]),
            cooldowns: self.cooldowns.with_label_values(&[id]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

#[derive(Debug)]
pub struct BackendMetrics {
    requests: [IntCounter; 5],
    no_answer: IntCounter,
    errors: [IntCounter; AttemptError::ERROR_TYPES.len()],
    failovers: [IntCounter; AttemptError::ERROR_TYPES.len()],
    duration: Histogram,
    to_healthy: IntCounter,
    to_unhealthy: IntCounter,
    pub cooldowns: IntCounter,
}

fn error_index(e: &AttemptError) -> usize {
    let t = e.error_type();
    AttemptError::ERROR_TYPES.iter().position(|x| *x == t).unwrap_or(0)
}

impl BackendMetrics {
    /// One attempt: its answer status (if any), error (if any) and duration.
    pub fn attempt(&self, status: Option<u16>, error: Option<&AttemptError>, seconds: f64) {
        match status {
            Some(s) => self.requests[((s / 100) as usize).clamp(1, 5) - 1].inc(),
            None => self.no_answer.inc(),
        }
        if let Some(e) = error {
            self.errors[error_index(e)].inc();
        }
        self.duration.observe(seconds);
    }

    pub fn failover(&self, error: &AttemptError) {
        self.failovers[error_index(error)].inc();
    }

    pub fn transition(&self, to: &str) {
        if to == "healthy" { self.to_healthy.inc() } else { self.to_unhealthy.inc() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_runbook_names() {
        let m = Metrics::new();
        let b = m.backend("backend-1");
        b.attempt(Some(200), None, 0.01);
        b.attempt(None, Some(&AttemptError::Timeout), 1.0);
        b.failover(&AttemptError::Timeout);
        m.health_status.with_label_values(&["backend-1"]).set(1);
        let text = String::from_utf8(m.encode()).unwrap();
        for name in [
            "api_router_backend_requests_total{backend_id=\"backend-1\",status_class=\"2xx\"} 1",
            "api_router_backend_errors_total{backend_id=\"backend-1\",error_type=\"timeout\"} 1",
            "api_router_backend_request_duration_seconds_bucket{backend_id=\"backend-1\",le=\"60\"} 2",
            "router_failover_total{backend_id=\"backend-1\",reason=\"timeout\"} 1",
            "router_backend_health_status{backend_id=\"backend-1\"} 1",
            "api_router_build_info",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
