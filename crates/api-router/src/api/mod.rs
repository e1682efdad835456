//! HTTP surface: the router of every endpoint, shared state, and the
//! per-request metrics layer. Handlers are thin; the inference path itself is
//! in [`crate::pipeline`].

pub mod admin;
pub mod audit;
pub mod auth;
pub mod error;
pub mod openai;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio_util::task::TaskTracker;

use crate::audit::AuditStore;
use crate::backends::client::BackendClient;
use crate::config::Settings;
use crate::config_service::{ConfigStore, ConfigWriter};
use crate::limits::Limits;
use crate::routing::decisions::DecisionLog;
use crate::telemetry::metrics::Metrics;
use crate::usage::UsageSink;
use crate::usage::publisher::Publisher;

use self::status::Component;

/// Everything a handler can reach. Pools and stores are created once at
/// start-up; routing state is read through `config.load()`.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub instance_id: Arc<str>,
    pub config: Arc<ConfigStore>,
    /// Where admin writes go (in process, or etcd).
    pub writer: ConfigWriter,
    pub client: BackendClient,
    pub decisions: DecisionLog,
    pub audit: AuditStore,
    pub limits: Arc<Limits>,
    pub usage: UsageSink,
    /// The publisher and its buffer, when `KAFKA_BROKERS` is set.
    pub publisher: Option<(Arc<Publisher>, Arc<crate::usage::Shared>)>,
    pub metrics: Metrics,
    /// Side effects that must finish even if the client leaves; shutdown waits.
    pub tasks: TaskTracker,
    /// Readiness components, in report order.
    pub components: Vec<Arc<dyn Component>>,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
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
        .route_layer(middleware::from_fn_with_state(state.clone(), admin::require_admin));

    Router::new()
        .route("/v1/inference", post(inference))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/status/healthz", get(status::healthz))
        .route("/v1/status/readyz", get(status::readyz))
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(status::openapi))
        .route("/v1/audit/requests/{request_id}", get(audit::lookup))
        .merge(admin)
        .fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn inference(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    crate::pipeline::inference(&state, headers, body).await
}

/// Counts every answer by route template and status, and times it.
async fn track(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.http_requests.with_label_values(&[route.as_str(), status.as_str()]).inc();
    state.metrics.http_duration.with_label_values(&[route.as_str()]).observe(started.elapsed().as_secs_f64());
    response
}
