//! One backend's health: the circuit that passive failures open and a
//! successful probe closes.
//!
//! States: healthy, or unhealthy (from `failover_threshold` consecutive failures
//! in live traffic, or from a failed active check). An unhealthy backend takes no
//! traffic until the health monitor's probe succeeds (half-open: one probe, then
//! traffic). The admin `degraded` override is separate (it lives in the config
//! snapshot) and wins over whatever the checks say.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    BecameUnhealthy,
    BecameHealthy,
}

#[derive(Debug, Default)]
pub struct BackendHealth {
    unhealthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Unix milliseconds of the last active check; 0 if none yet.
    last_check_ms: AtomicU64,
    /// Written only on failures and checks, never read on the request path.
    last_error: Mutex<Option<(String, SystemTime)>>,
}

/// What the admin API shows of a backend's health.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    pub healthy: bool,
    pub consecutive_failures: u32,
    #[serde(serialize_with = "crate::util::serialize_opt_time")]
    pub last_check: Option<SystemTime>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "crate::util::serialize_opt_time")]
    pub last_error_at: Option<SystemTime>,
}

impl BackendHealth {
    #[inline]
    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// A live request succeeded (any non-retryable answer).
    #[inline]
    pub fn record_success(&self) {
        // Load first so the common path does not write a shared cache line.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A live request failed; at `threshold` consecutive failures the backend
    /// is marked unhealthy.
    pub fn record_failure(&self, threshold: u32, error: &str) -> Transition {
        self.set_error(error);
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold && !self.unhealthy.swap(true, Ordering::Relaxed) {
            Transition::BecameUnhealthy
        } else {
            Transition::Unchanged
        }
    }

    /// The result of an active probe at `now`.
    pub fn record_check(&self, result: Result<(), String>, now: SystemTime) -> Transition {
        self.last_check_ms.store(unix_ms(now), Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                if self.unhealthy.swap(false, Ordering::Relaxed) {
                    Transition::BecameHealthy
                } else {
                    Transition::Unchanged
                }
            }
            Err(e) => {
                self.set_error(&e);
                if self.unhealthy.swap(true, Ordering::Relaxed) {
                    Transition::Unchanged
                } else {
                    Transition::BecameUnhealthy
                }
            }
        }
    }

    /// Admin "mark healthy": clears the failure counters and the circuit.
    pub fn reset(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.unhealthy.store(false, Ordering::Relaxed);
    }

    pub fn view(&self) -> HealthView {
        let last_check = match self.last_check_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        };
        let err = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        HealthView {
            healthy: self.is_healthy(),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            last_check,
            last_error_at: err.as_ref().map(|(_, at)| *at),
            last_error: err.map(|(e, _)| e),
        }
    }

    fn set_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((error.to_string(), SystemTime::now()));
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_below_threshold_does_not_eject_and_the_threshold_does() {
        let h = BackendHealth::default();
        for _ in 0..2 {
            assert_eq!(h.record_failure(3, "boom"), Transition::Unchanged);
        }
        assert!(h.is_healthy());
        assert_eq!(h.record_failure(3, "boom"), Transition::BecameUnhealthy);
        assert!(!h.is_healthy());
        assert_eq!(h.record_failure(3, "boom"), Transition::Unchanged, "only one transition");
        assert_eq!(h.view().consecutive_failures, 4);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let h = BackendHealth::default();
        h.record_failure(3, "a");
        h.record_failure(3, "b");
        h.record_success();
        h.record_failure(3, "c");
        h.record_failure(3, "d");
        assert!(h.is_healthy());
        assert_eq!(h.view().last_error.as_deref(), Some("d"));
    }

    #[test]
    fn the_last_check_time_is_the_one_recorded() {
        let h = BackendHealth::default();
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        h.record_check(Ok(()), at);
        assert_eq!(h.view().last_check, Some(at));
    }

    #[test]
    fn probe_success_readmits_and_reset_clears() {
        let h = BackendHealth::default();
        h.record_failure(1, "down");
        assert_eq!(h.record_check(Ok(()), SystemTime::now()), Transition::BecameHealthy);
        assert!(h.is_healthy());
        assert_eq!(h.view().consecutive_failures, 0);
        assert!(h.view().last_check.is_some());
        h.record_failure(1, "down");
        h.reset();
        assert!(h.is_healthy());
        assert_eq!(h.view().consecutive_failures, 0);
    }
}
