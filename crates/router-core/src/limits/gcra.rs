//! The generic cell rate algorithm (GCRA), as a pure function, and the
//! in-process limiter built on it.
//!
//! State per key is one number, the theoretical arrival time (TAT) in
//! microseconds. A request at `now` is allowed if `max(tat, now) + interval -
//! burst * interval <= now`; then the TAT moves by one interval. This is the
//! same arithmetic as the Redis script in `limits::redis`, so a replica that
//! falls back to local limiting enforces the same shape of limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the client is told in `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// The burst size: the most requests that can be made at once.
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gcra {
    Allowed { new_tat: u64, info: RateInfo },
    Denied { retry_after_us: u64, info: RateInfo },
}

pub fn interval_us(rps: f64) -> u64 {
    ((1e6 / rps).round() as u64).max(1)
}

pub fn gcra(tat: Option<u64>, now: u64, interval: u64, burst: u32) -> Gcra {
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + interval;
    let window = u64::from(burst) * interval;
    let allow_at = new_tat.saturating_sub(window);
    if now < allow_at {
        return Gcra::Denied {
            retry_after_us: allow_at - now,
            info: RateInfo { limit: burst, remaining: 0, reset_secs: (tat - now).div_ceil(1_000_000) },
        };
    }
    let remaining = ((now - allow_at) / interval).min(u64::from(burst)) as u32;
    Gcra::Allowed {
        new_tat,
        info: RateInfo { limit: burst, remaining, reset_secs: (new_tat - now).div_ceil(1_000_000) },
    }
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Per-organization GCRA in this process.
#[derive(Default)]
pub struct LocalLimiter {
    tats: Mutex<HashMap<String, u64>>,
}

impl LocalLimiter {
    pub fn check(&self, key: &str, now: u64, interval: u64, burst: u32) -> Gcra {
        // A short critical section; nothing awaits under this lock.
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let result = gcra(tats.get(key).copied(), now, interval, burst);
        if let Gcra::Allowed { new_tat, .. } = result {
            match tats.get_mut(key) {
                Some(t) => *t = new_tat,
                None => {
                    tats.insert(key.to_string(), new_tat);
                }
            }
        }
        if tats.len() > 100_000 {
            // Forget keys whose bucket is full again; they carry no state.
            tats.retain(|_, t| *t > now);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let (interval, burst) = (interval_us(20.0), 20);
        let l = LocalLimiter::default();
        let t0 = 1_000_000_000;
        let allowed = (0..25).filter(|_| matches!(l.check("o", t0, interval, burst), Gcra::Allowed { .. })).count();
        assert_eq!(allowed, 20, "the burst, at once");
        match l.check("o", t0, interval, burst) {
            Gcra::Denied { retry_after_us, info } => {
                assert_eq!(retry_after_us, interval);
                assert_eq!(info.remaining, 0);
            }
            other => panic!("{other:?}"),
        }
        // One interval later, exactly one more.
        assert!(matches!(l.check("o", t0 + interval, interval, burst), Gcra::Allowed { .. }));
        assert!(matches!(l.check("o", t0 + interval, interval, burst), Gcra::Denied { .. }));
        // Over 3 s at most 20 * 3 + 20.
        let l = LocalLimiter::default();
        let mut n = 0;
        for ms in 0..3000u64 {
            for _ in 0..5 {
                if matches!(l.check("p", t0 + ms * 1000, interval, burst), Gcra::Allowed { .. }) {
                    n += 1;
                }
            }
        }
        assert!((79..=81).contains(&n), "{n}");
    }

    #[test]
    fn remaining_counts_down() {
        let interval = interval_us(1.0);
        let g = gcra(None, 10_000_000, interval, 3);
        assert!(matches!(g, Gcra::Allowed { info: RateInfo { remaining: 2, limit: 3, .. }, .. }));
    }
}
