//! A backend's upstream cool-down: when a backend answers 429, 503 or 529
//! and says when to come back (`Retry-After`, or a provider's rate-limit
//! reset header), selection skips it until then (capped by
//! `UPSTREAM_COOLDOWN_MAX_SECS`). Unlike the health circuit this is not a
//! failure: it does not count towards marking the backend unhealthy, and it
//! ends by itself. One atomic, read on the request path without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::util::now_ms;

#[derive(Debug, Default)]
pub struct Cooldown {
    /// Unix milliseconds when it ends; 0 when none was ever started.
    until_ms: AtomicU64,
}

impl Cooldown {
    /// Cools down for `wait` (at most `cap`), or longer if already cooling
    /// down for longer. Returns how long from now.
    pub fn start(&self, wait: Duration, cap: Duration) -> Duration {
        let wait = wait.min(cap);
        let until = now_ms() + wait.as_millis() as u64;
        let previous = self.until_ms.fetch_max(until, Ordering::Relaxed);
        Duration::from_millis(previous.max(until).saturating_sub(now_ms()))
    }

    /// Whether the backend is cooling down now.
    #[inline]
    pub fn is_cooling(&self) -> bool {
        self.is_cooling_at(now_ms())
    }

    /// Whether it is cooling down at `now` (Unix milliseconds): until the
    /// end, not at it.
    #[inline]
    fn is_cooling_at(&self, now: u64) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    /// What is left of the cool-down, if any.
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining_at(now_ms())
    }

    fn remaining_at(&self, now: u64) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Ends it (an admin marking the backend healthy).
    pub fn clear(&self) {
        self.until_ms.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_lasts_until_its_end_and_not_at_it() {
        let c = Cooldown::default();
        assert!(!c.is_cooling_at(0), "never started");
        c.until_ms.store(10_000, Ordering::Relaxed);
        assert!(c.is_cooling_at(9_999));
        assert!(!c.is_cooling_at(10_000));
        assert_eq!(c.remaining_at(9_700), Some(Duration::from_millis(300)));
        assert_eq!(c.remaining_at(10_000), None);
        assert_eq!(c.remaining_at(12_000), None);
    }

    #[test]
    fn a_started_cool_down_reports_what_is_left() {
        let c = Cooldown::default();
        c.start(Duration::from_secs(30), Duration::from_secs(60));
        let left = c.remaining().expect("cooling");
        assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30), "{left:?}");
    }

    #[test]
    fn a_cool_down_is_capped_extended_never_shortened_and_ends() {
        let c = Cooldown::default();
        assert!(!c.is_cooling());
        let applied = c.start(Duration::from_secs(600), Duration::from_secs(60));
        assert!(applied <= Duration::from_secs(60) && applied > Duration::from_secs(59), "{applied:?}");
        assert!(c.is_cooling());
        let shorter = c.start(Duration::from_secs(1), Duration::from_secs(60));
        assert!(shorter > Duration::from_secs(59), "a shorter wait does not shorten it: {shorter:?}");
        c.clear();
        assert!(!c.is_cooling() && c.remaining().is_none());
        c.start(Duration::from_millis(1), Duration::from_secs(60));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.is_cooling() {
            assert!(std::time::Instant::now() < deadline, "it ends by itself");
            std::thread::yield_now();
        }
    }
}
