//! The core's state and lifecycle: what a request can reach ([`Core`]), the
//! start-up of every store and background task, and their ordered shutdown.
//!
//! Start-up: metrics, the routing state (and etcd, when configured), the
//! audit store, the limits (and Redis or the budget service), usage
//! publishing, the readiness components, then the background tasks.
//!
//! Shutdown ([`Running::shutdown`]), once the door has stopped taking
//! requests and let in-flight ones finish:
//! 1. wait for tracked side effects (work that outlives its client);
//! 2. flush the audit store (its commit thread);
//! 3. cancel the background tasks: the settler applies what is queued, the
//!    drainer flushes the producer and writes the buffer cursor;
//! 4. save the budget ledger once more.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use router_providers::transport::tls::TlsError;
use router_providers::transport::{TransportSettings, Transports};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditStore;
use crate::backends::monitor::{self, TransportProbe};
use crate::config_service::{ConfigState, ConfigStore, ConfigWriter, RemoteConfig};
use crate::keys::{KeyFile, StoredKeys};
use crate::limits::budget_service::BudgetServiceComponent;
use crate::limits::redis::RedisLimits;
use crate::limits::{LimitSettings, Limits, local::Ledger};
use crate::metrics::Metrics;
use crate::pipeline::RequestError;
use crate::readiness::{BackendRegistry, Component, Optional};
use crate::routing::decisions::DecisionLog;
use crate::usage::publisher::Publisher;
use crate::usage::{self, UsageSettings, UsageSink};
use crate::util::watch_task;

/// Everything the core needs, resolved and validated by the binary.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    pub instance_id: String,
    pub data_dir: PathBuf,
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
    /// Per attempt at a backend (to the first byte for streams).
    pub backend_timeout: Duration,
    /// The largest backend answer read whole (`BACKEND_MAX_RESPONSE_BYTES`).
    pub max_response_bytes: usize,
    pub audit_retention: Duration,
    /// How long the audit commit thread gathers records before one commit.
    pub audit_commit_interval: Duration,
    /// `AUDIT_DATABASE_URL`: PostgreSQL as the audit store, shared by every
    /// replica; `None`: the embedded store.
    pub audit_database: Option<AuditDatabase>,
    pub decisions_capacity: usize,
    /// The longest upstream cool-down a backend's `Retry-After` can ask for.
    pub upstream_cooldown_max: Duration,
    pub limits: LimitSettings,
    pub usage: UsageSettings,
    pub transport: TransportSettings,
    /// The routing state loaded from the environment and the file.
    pub initial_state: ConfigState,
}

/// The shared audit store's connection (`AUDIT_DATABASE_URL`). Its `Debug`
/// hides the URL, which can hold a password.
#[derive(Clone)]
pub struct AuditDatabase {
    pub url: String,
    /// `AUDIT_DATABASE_CA_FILE`: CAs trusted for `sslmode=require`.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for AuditDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditDatabase").field("url", &"<redacted>").field("ca_file", &self.ca_file).finish()
    }
}

/// What stops the core from starting.
#[derive(Debug)]
pub enum StartupError {
    Audit(String),
    Limits(String),
    Usage(String),
    Tls(TlsError),
    Keys(String),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Audit(e) => write!(f, "cannot open the audit store: {e}"),
            StartupError::Limits(e) => write!(f, "cannot set up limits: {e}"),
            StartupError::Usage(e) => write!(f, "cannot set up usage publishing: {e}"),
            StartupError::Tls(e) => write!(f, "invalid TLS setting {e}"),
            StartupError::Keys(e) => write!(f, "cannot read the managed API keys: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// Everything a request can reach. Stores and pools are created once at
/// start-up; routing state is read through `config.load()`.
pub struct Core {
    pub instance_id: Arc<str>,
    pub backend_timeout: Duration,
    /// The largest backend answer read whole; streams are forwarded.
    pub max_response_bytes: usize,
    /// The longest upstream cool-down (`UPSTREAM_COOLDOWN_MAX_SECS`).
    pub cooldown_max: Duration,
    pub config: Arc<ConfigStore>,
    /// Where admin writes go (in process, or etcd).
    pub writer: ConfigWriter,
    pub transports: Arc<Transports>,
    pub decisions: DecisionLog,
    pub audit: AuditStore,
    pub limits: Arc<Limits>,
    pub usage: UsageSink,
    /// The publisher and its buffer, when `KAFKA_BROKERS` is set.
    pub publisher: Option<(Arc<Publisher>, Arc<usage::Shared>)>,
    pub metrics: Metrics,
    /// Side effects that must finish even if the client leaves; shutdown waits.
    pub tasks: TaskTracker,
    /// Readiness components, in report order.
    pub components: Vec<Arc<dyn Component>>,
    /// The status a client gets for an error, as the door maps it: recorded
    /// in usage and audit records, which are written before the answer.
    pub status_of: fn(&RequestError) -> u16,
}

/// Starts the shared routing-state source (etcd) over the store, once the
/// store exists; the source keeps the store current from then on.
pub type StartRemote =
    Box<dyn FnOnce(Arc<ConfigStore>, Metrics) -> Pin<Box<dyn Future<Output = Arc<dyn RemoteConfig>> + Send>> + Send>;

/// How a core is put together beyond its settings.
#[derive(Default)]
pub struct Parts {
    /// Replaces the real transports (tests: the in-process mock).
    pub transports: Option<Arc<Transports>>,
    /// The shared routing state (etcd), when configured.
    pub remote: Option<StartRemote>,
}

/// A started core and its background tasks.
pub struct Running {
    pub core: Arc<Core>,
    cancel: CancellationToken,
    background: TaskTracker,
}

/// How often audit retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

impl Core {
    /// Starts every store and background task.
    pub async fn start(
        settings: CoreSettings,
        status_of: fn(&RequestError) -> u16,
        parts: Parts,
    ) -> Result<Running, StartupError> {
        let metrics = Metrics::new();
        let transports = match parts.transports {
            Some(t) => t,
            None => Arc::new(Transports::new(settings.transport.clone()).map_err(StartupError::Tls)?),
        };
        // Without etcd, managed keys live in the key file.
        let key_file = Arc::new(KeyFile::new(&settings.data_dir));
        let mut initial_state = settings.initial_state.clone();
        let mut stored = StoredKeys::default();
        if parts.remote.is_none() {
            stored = key_file.load().map_err(StartupError::Keys)?;
            initial_state.keys = std::mem::take(&mut stored.keys);
        }
        let config = Arc::new(ConfigStore::new(initial_state, metrics.clone(), transports.clone()));
        config.key_runtimes().restore(&stored.last_used_ms);
        {
            let snapshot = config.load();
            tracing::info!(
                backends = snapshot.backend_list.len(),
                policies = snapshot.state.policies.len(),
                api_keys = snapshot.state.api_keys.len(),
                managed_keys = snapshot.state.keys.len(),
                default_route = snapshot.state.default_route,
                "backend registry initialized"
            );
            if snapshot.backend_list.is_empty() {
                tracing::warn!(
                    "no backends configured: set BACKEND_ENDPOINTS or ROUTER_CONFIG; readiness reports backend_registry unhealthy"
                );
            }
        }
        let remote = match parts.remote {
            Some(start) => Some(start(config.clone(), metrics.clone()).await),
            None => None,
        };
        let writer = match &remote {
            Some(r) => ConfigWriter::Remote(config.clone(), r.clone()),
            None => ConfigWriter::Local(config.clone(), key_file),
        };
        let audit_dir = settings.data_dir.join("audit");
        let audit = match &settings.audit_database {
            None => AuditStore::open(&audit_dir, metrics.clone(), settings.audit_commit_interval),
            Some(db) => {
                tracing::info!("audit store: PostgreSQL (AUDIT_DATABASE_URL), shared by every replica");
                AuditStore::open_postgres(&audit_dir, metrics.clone(), &db.url, db.ca_file.as_deref())
            }
        }
        .map_err(|e| StartupError::Audit(e.to_string()))?;
        let limits = start_limits(&settings, &transports, &metrics).await?;
        let (usage, publisher) = start_usage(&settings, &metrics)?;

        let mut components: Vec<Arc<dyn Component>> = vec![
            Arc::new(Optional("redis", limits.redis().cloned())),
            Arc::new(Optional("kafka", publisher.as_ref().map(|(p, _)| p.clone()))),
            Arc::new(Optional("config_service", remote.clone())),
            Arc::new(BackendRegistry(config.clone())),
            audit.component(),
        ];
        if limits.service().is_some() {
            components.push(Arc::new(BudgetServiceComponent(limits.clone())));
        }
        let core = Arc::new(Core {
            instance_id: Arc::from(settings.instance_id.as_str()),
            backend_timeout: settings.backend_timeout,
            max_response_bytes: settings.max_response_bytes,
            cooldown_max: settings.upstream_cooldown_max,
            config: config.clone(),
            writer,
            transports,
            decisions: DecisionLog::new(settings.decisions_capacity),
            audit: audit.clone(),
            limits: limits.clone(),
            usage,
            publisher: publisher.clone(),
            metrics,
            tasks: TaskTracker::new(),
            components,
            status_of,
        });

        let cancel = CancellationToken::new();
        let background = TaskTracker::new();
        let probe = Arc::new(TransportProbe { timeout: settings.health_check_timeout });
        let monitor = monitor::run(config.clone(), probe, settings.health_check_interval, cancel.clone());
        watch_task("health-monitor", background.spawn(monitor), || {});
        let retention = audit.clone().run(settings.audit_retention, RETENTION_EVERY, cancel.clone());
        watch_task("audit-retention", background.spawn(retention), || {});
        watch_task("budget-settler", background.spawn(limits.clone().run_settler(cancel.clone())), || {});
        if let Some(r) = &remote {
            r.clone().run(&background, cancel.clone());
        }
        if let Some((publisher, shared)) = &publisher {
            background.spawn(publisher.clone().run_health(cancel.clone()));
            let drainer = background.spawn(publisher.clone().run_drainer(shared.clone(), cancel.clone()));
            let publisher = publisher.clone();
            watch_task("usage-drainer", drainer, move || publisher.drainer_stopped());
        }
        background.spawn(limits.ledger().clone().run_saver(cancel.clone()));
        background.spawn(run_last_used_writer(core.writer.clone(), cancel.clone()));
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
        Ok(Running { core, cancel, background })
    }
}

impl Running {
    /// Steps 1 to 4 of the module doc, within `deadline`.
    pub async fn shutdown(self, deadline: Instant) {
        let core = &self.core;
        core.tasks.close();
        if tokio::time::timeout_at(deadline.into(), core.tasks.wait()).await.is_err() {
            tracing::warn!("shutdown timeout reached before side effects finished");
        }
        if tokio::time::timeout_at(deadline.into(), core.audit.flush()).await.is_err() {
            tracing::warn!("shutdown timeout reached before the audit store was flushed");
        }
        self.cancel.cancel();
        let _ = tokio::time::timeout_at(deadline.into(), self.background.wait()).await;
        // The settler may have applied settlements after the saver's last round.
        if let Err(e) = core.limits.ledger().save() {
            tracing::error!(error = %e, "cannot save the budget ledger at shutdown");
        }
    }
}

/// How often due `last_used_at` times are written out.
const LAST_USED_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Writes managed keys' `last_used_at` off the request path: every
/// [`LAST_USED_FLUSH_EVERY`], the times that moved on by a minute, and once
/// more at shutdown.
async fn run_last_used_writer(writer: ConfigWriter, cancel: CancellationToken) {
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(LAST_USED_FLUSH_EVERY) => false,
        };
        if let Err(e) = writer.flush_last_used().await {
            tracing::warn!(error = %e, "cannot record when API keys were last used; will retry");
        }
        if stop {
            return;
        }
    }
}

type Publishing = Option<(Arc<Publisher>, Arc<usage::Shared>)>;

/// Usage publishing: the buffer store and the Kafka publisher, when
/// `KAFKA_BROKERS` is set.
fn start_usage(settings: &CoreSettings, metrics: &Metrics) -> Result<(UsageSink, Publishing), StartupError> {
    let us = &settings.usage;
    let Some(brokers) = &us.brokers else {
        tracing::info!("KAFKA_BROKERS not set: usage publishing is off; usage stays in the audit record");
        return Ok((UsageSink::disabled(), None));
    };
    let (sink, shared) = UsageSink::open(&settings.data_dir.join("usage-buffer"), us.clone(), metrics.clone())
        .map_err(StartupError::Usage)?;
    let publisher =
        Publisher::new(brokers, &us.topic, &settings.instance_id, us.linger).map_err(StartupError::Usage)?;
    if let Some(writer) = sink.writer() {
        publisher.watch_writer(writer);
    }
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
    settings: &CoreSettings,
    transports: &Transports,
    metrics: &Metrics,
) -> Result<Arc<Limits>, StartupError> {
    let ls = &settings.limits;
    let ledger = Arc::new(Ledger::open(&settings.data_dir.join("limits")).map_err(StartupError::Limits)?);
    let redis = match &ls.redis {
        None => {
            tracing::info!("REDIS_URL not set: rate limits, budgets and quotas are enforced in process");
            None
        }
        Some(target) => {
            let redis = RedisLimits::new(target, ls.redis_timeout, metrics.clone()).map_err(StartupError::Limits)?;
            match redis.connect().await {
                Ok(()) => tracing::info!(
                    timeout_ms = ls.redis_timeout.as_millis() as u64,
                    cluster = redis.is_cluster(),
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
    Ok(Arc::new(Limits::new(ls.clone(), ledger, redis, transports.default_transport(), metrics.clone())))
}
