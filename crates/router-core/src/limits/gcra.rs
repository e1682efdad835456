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

/// One limit of [`LocalLimiter::check_all`]: (key, interval µs, burst).
pub type Limit<'a> = Option<(&'a str, u64, u32)>;

impl LocalLimiter {
    /// Several limits at once (an organization's and an API key's): all
    /// allow, and all are charged, or none is. `Ok`: the tightest limit's
    /// state for the headers. `Err`: (which limit denied, retry after µs,
    /// its state).
    pub fn check_all(&self, limits: &[Limit<'_>], now: u64) -> Result<Option<RateInfo>, (usize, u64, RateInfo)> {
        if limits.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let mut allowed = Vec::with_capacity(limits.len());
        let mut tightest: Option<RateInfo> = None;
        for (i, limit) in limits.iter().enumerate() {
            let Some((key, interval, burst)) = limit else { continue };
            match gcra(tats.get(*key).copied(), now, *interval, *burst) {
                Gcra::Allowed { new_tat, info } => {
                    allowed.push((*key, new_tat));
                    if tightest.is_none_or(|t| info.remaining < t.remaining) {
                        tightest = Some(info);
                    }
                }
                Gcra::Denied { retry_after_us, info } => return Err((i, retry_after_us, info)),
            }
        }
        for (key, new_tat) in allowed {
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
        Ok(tightest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One limit: `Ok` if allowed, else (retry after µs, state).
    fn check(l: &LocalLimiter, key: &str, now: u64, interval: u64, burst: u32) -> Result<(), (u64, RateInfo)> {
        l.check_all(&[Some((key, interval, burst))], now).map(drop).map_err(|(_, retry, info)| (retry, info))
    }

    #[test]
    fn burst_then_rate() {
        let (interval, burst) = (interval_us(20.0), 20);
        let l = LocalLimiter::default();
        let t0 = 1_000_000_000;
        let allowed = (0..25).filter(|_| check(&l, "o", t0, interval, burst).is_ok()).count();
        assert_eq!(allowed, 20, "the burst, at once");
        let (retry_after_us, info) = check(&l, "o", t0, interval, burst).unwrap_err();
        assert_eq!(retry_after_us, interval);
        assert_eq!(info.remaining, 0);
        // One interval later, exactly one more.
        assert!(check(&l, "o", t0 + interval, interval, burst).is_ok());
        assert!(check(&l, "o", t0 + interval, interval, burst).is_err());
        // Over 3 s at most 20 * 3 + 20.
        let l = LocalLimiter::default();
        let mut n = 0;
        for ms in 0..3000u64 {
            for _ in 0..5 {
                if check(&l, "p", t0 + ms * 1000, interval, burst).is_ok() {
                    n += 1;
                }
            }
        }
        assert!((79..=81).contains(&n), "{n}");
    }

    #[test]
    fn two_limits_charge_both_or_neither() {
        let l = LocalLimiter::default();
        let t0 = 1_000_000_000;
        let org = Some(("org", interval_us(1.0), 10));
        let key = Some(("key", interval_us(1.0), 2));
        assert_eq!(l.check_all(&[org, key], t0).unwrap().unwrap().remaining, 1, "the tighter limit's state");
        assert!(l.check_all(&[org, key], t0).is_ok());
        match l.check_all(&[org, key], t0) {
            Err((1, _, info)) => assert_eq!(info.limit, 2, "the key denied"),
            other => panic!("{other:?}"),
        }
        // The key's denial charged nothing to the organization: 8 left of 10.
        let left = (0..20).filter(|_| l.check_all(&[org, None], t0).is_ok()).count();
        assert_eq!(left, 8);
        assert_eq!(l.check_all(&[None, None], t0), Ok(None));
    }

    #[test]
    fn remaining_counts_down() {
        let interval = interval_us(1.0);
        let g = gcra(None, 10_000_000, interval, 3);
        assert!(matches!(g, Gcra::Allowed { info: RateInfo { remaining: 2, limit: 3, .. }, .. }));
    }
}
