//! Slowing down admin token guessing: failed admin authentications are
//! counted per client address, and past the free ones
//! (`ADMIN_AUTH_FREE_FAILURES`, [`DEFAULT_FREE_FAILURES`]) within
//! [`FORGET_AFTER`] each further failure is answered only after a delay that
//! doubles, from [`FIRST_DELAY`] up to [`MAX_DELAY`]. A correct token is
//! answered at once and clears its address's count. Addresses are kept in a
//! bounded map.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures answered without delay, by default.
pub const DEFAULT_FREE_FAILURES: u32 = 5;
/// The delay of the first slowed answer; each next one doubles it.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// A count is forgotten after this long without a failure.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// Addresses remembered at most.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug)]
pub struct AdminThrottle {
    free: u32,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Default for AdminThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_FREE_FAILURES)
    }
}

impl AdminThrottle {
    /// Answers `free` failures per address without delay.
    pub fn new(free: u32) -> Self {
        Self { free, failures: Mutex::default() }
    }

    /// Notes a failure from `addr`; returns how long to wait before answering.
    pub fn failed(&self, addr: IpAddr) -> Duration {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&addr) {
            map.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
            if map.len() >= MAX_ADDRESSES {
                // Under a flood of addresses: forget the oldest.
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, last))| *last).map(|(a, _)| *a) {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(addr).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay_after(entry.0, self.free)
    }

    /// A correct token from `addr`: its count starts again.
    pub fn succeeded(&self, addr: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !map.is_empty() {
            map.remove(&addr);
        }
    }
}

/// The delay for the `n`th failure in a row, `free` of them free.
fn delay_after(n: u32, free: u32) -> Duration {
    match n.checked_sub(free.saturating_add(1)) {
        None => Duration::ZERO,
        Some(k) => FIRST_DELAY.saturating_mul(1u32 << k.min(16)).min(MAX_DELAY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_free_ones_wait_longer_each_time_per_address() {
        let t = AdminThrottle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..DEFAULT_FREE_FAILURES {
            assert_eq!(t.failed(a), Duration::ZERO);
        }
        assert_eq!(t.failed(a), FIRST_DELAY);
        assert_eq!(t.failed(a), FIRST_DELAY * 2);
        assert_eq!(t.failed(b), Duration::ZERO, "another address is not slowed");
        for _ in 0..20 {
            t.failed(a);
        }
        assert_eq!(t.failed(a), MAX_DELAY);
        t.succeeded(a);
        assert_eq!(t.failed(a), Duration::ZERO, "a correct token starts the count again");
    }
}
