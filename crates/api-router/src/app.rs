//! Start-up and shutdown, in order.
//!
//! Start-up: settings are already valid (see [`crate::config`]). Then metrics,
//! the config store and backend registry, the audit store, the listener, the
//! background tasks (health monitor, audit retention), and the server.
//!
//! Shutdown on SIGTERM or SIGINT, within `SHUTDOWN_TIMEOUT_SECS`:
//! 1. stop accepting;
//! 2. let in-flight requests finish;
//! 3. wait for tracked side effects;
//! 4. flush the audit writer;
//! 5. stop the background tasks and close the pools;
//! 6. log "API router service stopped".

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::status::{BackendRegistry, Component, Optional};
use crate::api::{self, AppState};
use crate::audit::AuditStore;
use crate::backends::client::BackendClient;
use crate::backends::monitor;
use crate::build_info;
use crate::config::Settings;
use crate::config_service::etcd::EtcdSource;
use crate::config_service::{ConfigStore, ConfigWriter};
use crate::limits::budget_service::BudgetServiceComponent;
use crate::limits::redis::RedisLimits;
use crate::limits::{Limits, local::Ledger};
use crate::routing::decisions::DecisionLog;
use crate::telemetry::metrics::Metrics;
use crate::usage::UsageSink;
use crate::usage::publisher::Publisher;

/// What stops the service from starting.
#[derive(Debug)]
pub enum StartupError {
    Audit(String),
    Limits(String),
    Usage(String),
    Bind(String),
    Serve(String),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Audit(e) => write!(f, "cannot open the audit store: {e}"),
            StartupError::Limits(e) => write!(f, "cannot set up limits: {e}"),
            StartupError::Usage(e) => write!(f, "cannot set up usage publishing: {e}"),
            StartupError::Bind(e) => write!(f, "cannot listen: {e}"),
            StartupError::Serve(e) => write!(f, "server error: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// How often audit retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

pub async fn run(settings: Settings) -> Result<(), StartupError> {
    tracing::info!(
        version = build_info::VERSION,
        commit = build_info::COMMIT,
        build_time = build_info::BUILD_TIME,
        instance_id = %settings.instance_id,
        "starting API router service"
    );
    if settings.admin_token.is_none() {
        tracing::warn!("admin API disabled: ADMIN_TOKEN is not set; admin routes answer 403");
    }
    let metrics = Metrics::new();
    let config = Arc::new(ConfigStore::new(settings.initial_state.clone(), metrics.clone()));
    {
        let snapshot = config.load();
        tracing::info!(
            backends = snapshot.backend_list.len(),
            policies = snapshot.state.policies.len(),
            api_keys = snapshot.state.api_keys.len(),
            default_route = snapshot.state.default_route,
            "backend registry initialized"
        );
        if snapshot.backend_list.is_empty() {
            tracing::warn!(
                "no backends configured: set BACKEND_ENDPOINTS or ROUTER_CONFIG; readiness reports backend_registry unhealthy"
            );
        }
    }
    let etcd = match &settings.config_service {
        None => None,
        Some(es) => Some(
            EtcdSource::start(
                es.clone(),
                settings.initial_state.clone(),
                config.clone(),
                metrics.clone(),
                &settings.data_dir,
            )
            .await,
        ),
    };
    let writer = match &etcd {
        Some(src) => ConfigWriter::Etcd(src.clone()),
        None => ConfigWriter::Local(config.clone()),
    };
    let audit = AuditStore::open(&settings.data_dir.join("audit"), metrics.clone(), settings.audit_commit_interval)
        .map_err(|e| StartupError::Audit(e.to_string()))?;
    let client = BackendClient::new(settings.backend_timeout, settings.health_check_timeout);
    let limits = start_limits(&settings, &client, &metrics).await?;
    let (usage, publisher) = start_usage(&settings, &metrics)?;
    let listener = TcpListener::bind(settings.http_addr)
        .await
        .map_err(|e| StartupError::Bind(format!("{}: {e}", settings.http_addr)))?;
    let addr = listener.local_addr().map_err(|e| StartupError::Bind(e.to_string()))?;

    let mut components: Vec<Arc<dyn Component>> = vec![
        Arc::new(Optional("redis", limits.redis().cloned())),
        Arc::new(Optional("kafka", publisher.as_ref().map(|(p, _)| p.clone()))),
        Arc::new(Optional("config_service", etcd.clone())),
        Arc::new(BackendRegistry(config.clone())),
    ];
    if limits.service().is_some() {
        components.push(Arc::new(BudgetServiceComponent(limits.clone())));
    }
    let settings = Arc::new(settings);
    let state = Arc::new(AppState {
        settings: settings.clone(),
        instance_id: Arc::from(settings.instance_id.as_str()),
        config: config.clone(),
        writer,
        client: client.clone(),
        decisions: DecisionLog::new(settings.decisions_capacity),
        audit: audit.clone(),
        limits: limits.clone(),
        usage,
        publisher: publisher.clone(),
        metrics,
        tasks: TaskTracker::new(),
        components,
    });

    // Background tasks.
    let cancel = CancellationToken::new();
    let background = TaskTracker::new();
    background.spawn(monitor::run(config.clone(), Arc::new(client), settings.health_check_interval, cancel.clone()));
    background.spawn(audit.clone().run_retention(settings.audit_retention, RETENTION_EVERY, cancel.clone()));
    background.spawn(limits.clone().run_settler(cancel.clone()));
    if let Some(src) = &etcd {
        background.spawn(src.clone().run(cancel.clone()));
        background.spawn(src.clone().run_cache_writer(cancel.clone()));
    }
    if let Some((publisher, shared)) = &publisher {
        background.spawn(publisher.clone().run_health(cancel.clone()));
        background.spawn(publisher.clone().run_drainer(shared.clone(), cancel.clone()));
    }
    background.spawn(limits.ledger().clone().run_saver(cancel.clone()));
    if let Some(redis) = limits.redis() {
        background.spawn(redis.clone().run_health(cancel.clone()));
    }
    if limits.service().is_some() {
        let (limits, cancel) = (limits.clone(), cancel.clone());
        background.spawn(async move {
            while !cancel.is_cancelled() {
                if let Some(s) = limits.service() {
                    s.check_health().await;
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        });
    }
    background.close();

    tracing::info!(addr = %addr, "HTTP server starting");
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<Instant>();
    // `into_make_service` resolves the routes once; serving a `Router`
    // directly rebuilds its route table for every connection (~9 KB each).
    let app = api::router(state.clone()).into_make_service();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down gracefully");
        let _ = signalled_tx.send(Instant::now());
    });
    let mut server = std::pin::pin!(server.into_future());

    // Serve until a signal; then give in-flight requests until the deadline,
    // keeping a little time back for the flushes below.
    let deadline = tokio::select! {
        result = &mut server => {
            result.map_err(|e| StartupError::Serve(e.to_string()))?;
            Instant::now() + settings.shutdown_timeout
        }
        at = signalled_rx => {
            let deadline = at.unwrap_or_else(|_| Instant::now()) + settings.shutdown_timeout;
            let drain_until = deadline - settings.shutdown_timeout.min(Duration::from_millis(1500)) / 2;
            match tokio::time::timeout_at(drain_until.into(), &mut server).await {
                Ok(result) => result.map_err(|e| StartupError::Serve(e.to_string()))?,
                Err(_) => tracing::warn!("shutdown timeout reached with requests still in flight; abandoning them"),
            }
            deadline
        }
    };

    state.tasks.close();
    if tokio::time::timeout_at(deadline.into(), state.tasks.wait()).await.is_err() {
        tracing::warn!("shutdown timeout reached before side effects finished");
    }
    if tokio::time::timeout_at(deadline.into(), audit.flush()).await.is_err() {
        tracing::warn!("shutdown timeout reached before the audit store was flushed");
    }
    cancel.cancel();
    let _ = tokio::time::timeout_at(deadline.into(), background.wait()).await;
    // The settler may have applied settlements after the saver's last round.
    if let Err(e) = limits.ledger().save() {
        tracing::error!(error = %e, "cannot save the budget ledger at shutdown");
    }
    tracing::info!("API router service stopped");
    Ok(())
}

type Publishing = Option<(Arc<Publisher>, Arc<crate::usage::Shared>)>;

/// Usage publishing: the buffer store and the Kafka publisher, when
/// `KAFKA_BROKERS` is set.
fn start_usage(settings: &Settings, metrics: &Metrics) -> Result<(UsageSink, Publishing), StartupError> {
    let us = &settings.usage;
    let Some(brokers) = &us.brokers else {
        tracing::info!("KAFKA_BROKERS not set: usage publishing is off; usage stays in the audit record");
        return Ok((UsageSink::disabled(), None));
    };
    let (sink, shared) = UsageSink::open(&settings.data_dir.join("usage-buffer"), us.clone(), metrics.clone())
        .map_err(StartupError::Usage)?;
    let publisher = Publisher::new(brokers, &us.topic, &settings.instance_id).map_err(StartupError::Usage)?;
    tracing::info!(
        brokers = %brokers,
        topic = %us.topic,
        buffered = shared.lock().pending(),
        fsync = ?us.fsync,
        "Kafka publisher initialized"
    );
    Ok((sink, Some((Arc::new(publisher), shared))))
}

/// The limits: the embedded ledger, and Redis and the budget service when set.
async fn start_limits(
    settings: &Settings,
    client: &BackendClient,
    metrics: &Metrics,
) -> Result<Arc<Limits>, StartupError> {
    let ls = &settings.limits;
    let ledger = Arc::new(Ledger::open(&settings.data_dir.join("limits")).map_err(StartupError::Limits)?);
    let redis = match &ls.redis_url {
        None => {
            tracing::info!("REDIS_URL not set: rate limits, budgets and quotas are enforced in process");
            None
        }
        Some(url) => {
            let redis = RedisLimits::new(url, ls.redis_timeout, metrics.clone()).map_err(StartupError::Limits)?;
            match redis.connect().await {
                Ok(()) => tracing::info!(
                    timeout_ms = ls.redis_timeout.as_millis() as u64,
                    "Redis connected for rate limiting"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    failure_mode = ls.failure_mode.as_str(),
                    "Redis unreachable at start-up; limits use RATE_LIMIT_FAILURE_MODE until it is back"
                ),
            }
            Some(Arc::new(redis))
        }
    };
    if let Some(svc) = &ls.budget_service {
        tracing::info!(fail_open = svc.fail_open, "budget service configured for budgets and quotas");
    }
    Ok(Arc::new(Limits::new(ls.clone(), ledger, redis, client.clone(), metrics.clone())))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
