//! The generic cell rate algorithm (GCRA), as a pure function, and the
//! in-process limiter built on it.
//!
//! State per key is one number, the theoretical arrival time (TAT) in
//! microseconds. A request at `now` is allowed if `max(tat, now) + interval -
//! burst * interval <= now`; then the TAT moves by one interval. This is the
//! same arithmetic as the Redis script in `limits::redis`, so a replica that
//! falls back to local limiting enforces the same shape of limit.

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
    /// foldhash: the names are organizations' and keys' from the
    /// configuration, not chosen by clients (SipHash cost ~250 instructions
    /// a lookup, two a request).
    tats: Mutex<foldhash::HashMap<String, u64>>,
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
    fn reset_is_when_the_bucket_is_full_again() {
        // 1 request a second, burst 3, three used at t = 10 s: the bucket is
        // full again 3 s later; the 4th is denied for 1 s and told so.
        let (interval, t) = (interval_us(1.0), 10_000_000);
        let mut tat = None;
        for _ in 0..3 {
            match gcra(tat, t, interval, 3) {
                Gcra::Allowed { new_tat, info } => {
                    tat = Some(new_tat);
                    assert_eq!(info.reset_secs, (new_tat - t) / 1_000_000);
                }
                denied => panic!("{denied:?}"),
            }
        }
        assert_eq!(tat, Some(t + 3 * interval));
        match gcra(tat, t, interval, 3) {
            Gcra::Denied { retry_after_us, info } => {
                assert_eq!(retry_after_us, interval);
                assert_eq!(info.reset_secs, 3);
            }
            allowed => panic!("{allowed:?}"),
        }
        // Half a second later: the wait and the reset are shorter.
        match gcra(tat, t + 500_000, interval, 3) {
            Gcra::Denied { retry_after_us, info } => {
                assert_eq!(retry_after_us, 500_000);
                assert_eq!(info.reset_secs, 3, "2.5 s, rounded up");
            }
            allowed => panic!("{allowed:?}"),
        }
    }

    #[test]
    fn now_is_the_wall_clock() {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        assert!(now_us().abs_diff(wall) < 60_000_000);
    }

    #[test]
    fn on_a_tie_the_first_limit_is_reported() {
        let l = LocalLimiter::default();
        let t0 = 1_000_000_000;
        let interval = interval_us(1.0);
        // The key (burst 5) has used 2: after this request both have 2 left.
        for _ in 0..2 {
            l.check_all(&[None, Some(("key", interval, 5))], t0).unwrap();
        }
        let info = l.check_all(&[Some(("org", interval, 3)), Some(("key", interval, 5))], t0).unwrap().unwrap();
        assert_eq!((info.remaining, info.limit), (2, 3));
    }

    #[test]
    fn past_100_000_keys_the_full_buckets_are_forgotten() {
        let l = LocalLimiter::default();
        let (interval, t0) = (interval_us(1.0), 1_000_000_000);
        let later = t0 + 10_000_000;
        let keys = |l: &LocalLimiter| {
            let mut k: Vec<String> = l.tats.lock().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        // A bucket that is full again exactly at `later`, and 99,998 that
        // are full again long before it.
        l.check_all(&[Some(("edge", interval, 5))], later - interval).unwrap();
        for i in 0..99_998 {
            l.check_all(&[Some((&format!("k{i}"), interval, 5))], t0).unwrap();
        }
        // At 100,000 keys nothing is forgotten yet.
        l.check_all(&[Some(("late", interval, 5))], later).unwrap();
        assert_eq!(l.tats.lock().unwrap().len(), 100_000);
        // One more: every full bucket is forgotten, the edge one too.
        l.check_all(&[Some(("last", interval, 5))], later).unwrap();
        assert_eq!(keys(&l), ["last", "late"]);
    }

    #[test]
    fn remaining_counts_down() {
        let interval = interval_us(1.0);
        let g = gcra(None, 10_000_000, interval, 3);
        assert!(matches!(g, Gcra::Allowed { info: RateInfo { remaining: 2, limit: 3, .. }, .. }));
    }
}
