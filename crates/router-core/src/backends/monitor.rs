//! The active health monitor: probes every backend's health path (its kind's,
//! e.g. `GET /health`) each interval, concurrently, over the backend's own
//! transport (so TLS problems show here too), and writes the result into its
//! health atomics.
//!
//! The probe is a trait so that the loop's timing is unit-tested on paused
//! tokio time with an in-process fake, and runs against real HTTP otherwise.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backends::health::Transition;
use crate::config_service::{Backend, ConfigStore};

pub trait Probe: Send + Sync + 'static {
    fn check(&self, backend: Arc<Backend>) -> impl Future<Output = Result<(), String>> + Send;
}

/// The real probe: `GET` the health path, with the backend's credential
/// and its kind's headers (hosted providers answer only those), within
/// `timeout`.
pub struct TransportProbe {
    pub timeout: Duration,
}

impl Probe for TransportProbe {
    fn check(&self, backend: Arc<Backend>) -> impl Future<Output = Result<(), String>> + Send {
        let timeout = self.timeout;
        async move {
            router_providers::transport::probe_with(&*backend.transport, backend.target.health_request(), timeout).await
        }
    }
}

/// Runs until `cancel` fires. The first round runs at once.
pub async fn run<P: Probe>(store: Arc<ConfigStore>, probe: Arc<P>, interval: Duration, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        check_all(&store, &probe).await;
    }
}

/// One round: every backend of the current snapshot, concurrently.
pub async fn check_all<P: Probe>(store: &ConfigStore, probe: &Arc<P>) {
    let snapshot = store.load_full();
    let mut set = JoinSet::new();
    for backend in snapshot.backend_list.iter().cloned() {
        let probe = probe.clone();
        set.spawn(async move {
            let result = probe.check(backend.clone()).await;
            let error = result.as_ref().err().cloned();
            match backend.runtime.health.record_check(result, SystemTime::now()) {
                Transition::BecameHealthy => {
                    tracing::info!(backend_id = %backend.id, "backend recovered: health check passed");
                    backend.runtime.metrics.transition("healthy");
                }
                Transition::BecameUnhealthy => {
                    tracing::warn!(backend_id = %backend.id, error = error.as_deref().unwrap_or(""), "backend marked unhealthy by health check");
                    backend.runtime.metrics.transition("unhealthy");
                }
                Transition::Unchanged => {}
            }
        });
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_service::{BackendSpec, ConfigState};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct FakeProbe {
        up: AtomicBool,
        calls: AtomicUsize,
    }

    impl Probe for FakeProbe {
        fn check(&self, _b: Arc<Backend>) -> impl Future<Output = Result<(), String>> + Send {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let up = self.up.load(Ordering::SeqCst);
            async move { if up { Ok(()) } else { Err("connection refused".to_string()) } }
        }
    }

    fn store() -> Arc<ConfigStore> {
        let mut s = ConfigState { default_route: true, default_failover_threshold: 3, ..Default::default() };
        s.backends.insert("b1".into(), BackendSpec::new("http://127.0.0.1:1").unwrap());
        Arc::new(crate::config_service::test_store(s))
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_backend_is_readmitted_by_the_next_successful_probe() {
        let store = store();
        let b = store.load().backend("b1").unwrap().clone();
        let probe = Arc::new(FakeProbe { up: AtomicBool::new(true), calls: AtomicUsize::new(0) });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), probe.clone(), Duration::from_secs(5), cancel.clone()));
        settle().await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1, "first round runs at once");

        // Passive ejection at exactly the threshold.
        b.runtime.health.record_failure(3, "e");
        b.runtime.health.record_failure(3, "e");
        assert!(b.is_routable(), "one below the threshold does not eject");
        b.runtime.health.record_failure(3, "e");
        assert!(!b.is_routable(), "the threshold ejects");

        // Just before the next interval: still out.
        tokio::time::advance(Duration::from_millis(4999)).await;
        settle().await;
        assert!(!b.is_routable());
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);

        // The probe at 5 s succeeds: back in, counters cleared.
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
        assert!(b.is_routable());
        assert_eq!(b.runtime.health.view().consecutive_failures, 0);

        // A failing probe ejects; the next passing one readmits.
        probe.up.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(5)).await;
        settle().await;
        assert!(!b.is_routable());
        probe.up.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(5)).await;
        settle().await;
        assert!(b.is_routable());

        cancel.cancel();
        task.await.unwrap();
    }
}
