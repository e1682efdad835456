//! Start-up and shutdown, in order.
//!
//! Start-up: settings are already valid (see [`crate::settings`]). Then the
//! core (stores, pools, background tasks: `router_core::Core::start`), the
//! listener, and the HTTP server with its doors (`router_http`).
//!
//! Shutdown on SIGTERM or SIGINT, within `SHUTDOWN_TIMEOUT_SECS`:
//! 1. "shutting down gracefully"; stop accepting;
//! 2. let in-flight requests finish (until the deadline, less a reserve for
//!    the flushes);
//! 3. the core's shutdown: tracked side effects, the audit flush, the
//!    background tasks, the ledger (`router_core::Running::shutdown`);
//! 4. log "API router service stopped".

use std::sync::Arc;
use std::time::{Duration, Instant};

use router_core::config_service::RemoteConfig;
use router_core::core::StartRemote;
use router_core::{Core, Parts, build_info};
use router_etcd::{EtcdSettings, EtcdSource};
use router_http::HttpState;
use tokio::net::TcpListener;

use crate::settings::Settings;

/// What stops the service.
#[derive(Debug)]
pub enum AppError {
    Core(router_core::StartupError),
    Bind(String),
    Serve(String),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Core(e) => e.fmt(f),
            AppError::Bind(e) => write!(f, "cannot listen: {e}"),
            AppError::Serve(e) => write!(f, "server error: {e}"),
        }
    }
}

impl std::error::Error for AppError {}

pub async fn run(settings: Settings) -> Result<(), AppError> {
    tracing::info!(
        version = build_info::VERSION,
        commit = build_info::COMMIT,
        build_time = build_info::BUILD_TIME,
        instance_id = %settings.core.instance_id,
        "starting API router service"
    );
    if settings.http.admin_token.is_none() {
        tracing::warn!("admin API disabled: ADMIN_TOKEN is not set; admin routes answer 403");
    }
    let parts = Parts { transports: None, remote: settings.etcd.clone().map(|etcd| start_etcd(etcd, &settings)) };
    let running =
        Core::start(settings.core.clone(), router_http::error::status_of, parts).await.map_err(AppError::Core)?;
    let listener = TcpListener::bind(settings.http_addr)
        .await
        .map_err(|e| AppError::Bind(format!("{}: {e}", settings.http_addr)))?;
    let addr = listener.local_addr().map_err(|e| AppError::Bind(e.to_string()))?;
    let state = Arc::new(HttpState::new(running.core.clone(), settings.http.clone()));

    tracing::info!(
        addr = %addr,
        tls = settings.server.tls.is_some(),
        max_connections = settings.server.max_connections,
        "HTTP server starting"
    );
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<Instant>();
    let app = router_http::App::new(state);
    let metrics = running.core.metrics.clone();
    let server = router_http::server::serve(listener, app, settings.server.clone(), metrics, async move {
        shutdown_signal().await;
        tracing::info!("shutting down gracefully");
        let _ = signalled_tx.send(Instant::now());
    });
    let mut server = std::pin::pin!(server);

    // Serve until a signal; then give in-flight requests until the deadline,
    // keeping a little time back for the flushes below.
    let timeout = settings.shutdown_timeout;
    let deadline = tokio::select! {
        result = &mut server => {
            result.map_err(|e| AppError::Serve(e.to_string()))?;
            Instant::now() + timeout
        }
        at = signalled_rx => {
            let deadline = at.unwrap_or_else(|_| Instant::now()) + timeout;
            let drain_until = deadline - timeout.min(Duration::from_millis(1500)) / 2;
            match tokio::time::timeout_at(drain_until.into(), &mut server).await {
                Ok(result) => result.map_err(|e| AppError::Serve(e.to_string()))?,
                Err(_) => tracing::warn!("shutdown timeout reached with requests still in flight; abandoning them"),
            }
            deadline
        }
    };
    running.shutdown(deadline).await;
    tracing::info!("API router service stopped");
    Ok(())
}

/// The etcd source, started over the core's store once it exists.
fn start_etcd(etcd: EtcdSettings, settings: &Settings) -> StartRemote {
    let (base, data_dir) = (settings.core.initial_state.clone(), settings.core.data_dir.clone());
    Box::new(move |store, metrics| {
        Box::pin(async move {
            let source: Arc<dyn RemoteConfig> = EtcdSource::start(etcd, base, store, metrics, &data_dir).await;
            source
        })
    })
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
