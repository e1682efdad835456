//! The embedded budget and quota ledger, used when neither Redis nor a budget
//! service is configured.
//!
//! Counters live in this process under the same names as the Redis keys
//! (`spend:{org}:{period}`, `qreq:...`, `qtok:...`), in integer micro-units of
//! currency and whole requests and tokens. Reserve, settle and release are
//! each one short critical section, so concurrent requests cannot overshoot.
//!
//! Durability: a background task writes the counters to `DATA_DIR/ledger.json`
//! (write to a temporary file, fsync, rename) about once a second when they
//! changed, and shutdown writes them once more. A crash loses at most the last
//! second of settled spend; reservations in flight at a crash are not kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Decision, Held, Keys, Plan};

#[derive(Default, Serialize, Deserialize)]
struct State {
    /// key → (value, expiry in unix seconds; `None` never expires).
    counters: HashMap<String, (i64, Option<u64>)>,
    #[serde(skip)]
    reservations: HashMap<String, Held>,
}

pub struct Ledger {
    state: Mutex<State>,
    path: PathBuf,
    dirty: AtomicBool,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Ledger {
    /// Loads `dir/ledger.json` if present. A damaged file is moved aside (and
    /// reported) rather than silently overwritten.
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("ledger.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<State>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    let aside = dir.join(format!("ledger.json.damaged-{}", unix_secs(SystemTime::now())));
                    tracing::error!(error = %e, moved_to = %aside.display(), "budget ledger file is damaged; starting from zero");
                    std::fs::rename(&path, &aside).map_err(|e| format!("{}: {e}", path.display()))?;
                    State::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self { state: Mutex::new(state), path, dirty: AtomicBool::new(false) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> i64 {
        let now = unix_secs(SystemTime::now());
        match self.lock().counters.get(key) {
            Some((v, exp)) if exp.is_none_or(|e| e > now) => *v,
            _ => 0,
        }
    }

    /// Checks budget and quotas and, if all allow, reserves atomically.
    pub fn reserve(&self, keys: &Keys, plan: &Plan, now: SystemTime) -> Decision {
        let now_s = unix_secs(now);
        let budget_expiry = plan.budget.and_then(|(_, p)| p.ttl_secs(now)).map(|ttl| now_s + ttl);
        let quota_expiry = plan.quota_period.ttl_secs(now).map(|ttl| now_s + ttl);
        let key_expiry = plan.key.and_then(|k| k.period.ttl_secs(now)).map(|ttl| now_s + ttl);
        let mut st = self.lock();
        if st.reservations.contains_key(&keys.reservation) {
            return Decision::Allowed { rate: None };
        }
        let read = |st: &State, k: &str| match st.counters.get(k) {
            Some((v, exp)) if exp.is_none_or(|e| e > now_s) => *v,
            _ => 0,
        };
        if let Some((limit, _)) = plan.budget {
            let spent = read(&st, &keys.spend);
            if spent + plan.cost_micros > limit {
                return Decision::Budget { spent };
            }
        }
        if let Some(limit) = plan.key.and_then(|k| k.budget) {
            let spent = read(&st, &keys.key_spend);
            if spent + plan.cost_micros > limit {
                return Decision::KeyBudget { spent };
            }
        }
        if let Some(limit) = plan.quota_requests {
            let used = read(&st, &keys.requests);
            if used + 1 > limit {
                return Decision::QuotaRequests { used };
            }
        }
        if let Some(limit) = plan.quota_tokens {
            let used = read(&st, &keys.tokens);
            if used >= limit || used + plan.tokens > limit {
                return Decision::QuotaTokens { used };
            }
        }
        let held = Held::for_plan(plan);
        let mut add = |k: &str, by: i64, exp: Option<u64>| {
            let v = read(&st, k) + by;
            st.counters.insert(k.to_string(), (v, exp));
        };
        if held.budget {
            add(&keys.spend, held.cost, budget_expiry);
        }
        if held.requests > 0 {
            add(&keys.requests, held.requests, quota_expiry);
        }
        if held.token_quota {
            add(&keys.tokens, held.tokens, quota_expiry);
        }
        if held.key {
            add(&keys.key_spend, held.key_cost, key_expiry);
            add(&keys.key_tokens, held.key_tokens, key_expiry);
        }
        st.reservations.insert(keys.reservation.clone(), held);
        self.dirty.store(true, Ordering::Relaxed);
        Decision::Allowed { rate: None }
    }

    /// Settles to the actual amounts, or releases (`actual = None`). A second
    /// call for the same reservation does nothing.
    pub fn finish(&self, keys: &Keys, actual: Option<(i64, i64)>) {
        let mut st = self.lock();
        let Some(held) = st.reservations.remove(&keys.reservation) else {
            return;
        };
        let mut add = |k: &str, by: i64| {
            if let Some((v, _)) = st.counters.get_mut(k) {
                *v += by;
            }
        };
        match actual {
            None => {
                add(&keys.spend, -held.cost);
                add(&keys.requests, -held.requests);
                add(&keys.tokens, -held.tokens);
                add(&keys.key_spend, -held.key_cost);
                add(&keys.key_tokens, -held.key_tokens);
            }
            Some((cost, tokens)) => {
                if held.budget {
                    add(&keys.spend, cost - held.cost);
                }
                if held.token_quota {
                    add(&keys.tokens, tokens - held.tokens);
                }
                if held.key {
                    add(&keys.key_spend, cost - held.key_cost);
                    add(&keys.key_tokens, tokens - held.key_tokens);
                }
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the counters if they changed since the last save.
    pub fn save(&self) -> Result<(), String> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let now = unix_secs(SystemTime::now());
        let bytes = {
            let mut st = self.lock();
            st.counters.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
            serde_json::to_vec(&*st).map_err(|e| e.to_string())?
        };
        let result = crate::util::write_atomically(&self.path, &bytes);
        if result.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        result
    }

    /// Saves about once a second until cancelled, then once more.
    pub async fn run_saver(self: std::sync::Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let stop = tokio::select! {
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            let ledger = self.clone();
            match tokio::task::spawn_blocking(move || ledger.save()).await {
                Ok(Err(e)) => tracing::error!(error = %e, "cannot save the budget ledger"),
                Err(e) => tracing::error!(error = %e, "budget ledger save task failed"),
                Ok(Ok(())) => {}
            }
            if stop {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::period::Period;

    fn plan(budget: Option<i64>, cost: i64, requests: Option<i64>) -> Plan {
        Plan {
            rate: None,
            budget: budget.map(|b| (b, Period::Daily)),
            cost_micros: cost,
            quota_requests: requests,
            quota_tokens: None,
            quota_period: Period::Daily,
            tokens: 0,
            key: None,
        }
    }

    fn keys(rid: &str) -> Keys {
        Keys::new("", "org", rid, &plan(None, 0, None), SystemTime::now(), None)
    }

    #[test]
    fn a_rate_only_admission_counts_under_the_same_name_as_a_full_one() {
        let full = Keys::new("", "org-9", "r1", &plan(None, 0, None), SystemTime::now(), None);
        let rate_only = Keys::rate_only("org-9");
        assert_eq!(rate_only.rate, full.rate);
        assert_eq!((rate_only.spend.as_str(), rate_only.reservation.as_str()), ("", ""));
    }

    #[test]
    fn a_budget_admits_up_to_its_limit_exactly_releases_and_settles() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let p = plan(Some(9), 3, None);
        let now = SystemTime::now();
        let k = |rid: &str| Keys::new("", "org", rid, &p, now, None);
        for rid in ["r0", "r1", "r2"] {
            assert!(matches!(l.reserve(&k(rid), &p, now), Decision::Allowed { .. }), "{rid}: 9 of 9 is allowed");
        }
        assert!(matches!(l.reserve(&k("r3"), &p, now), Decision::Budget { spent: 9 }));
        let spent = || l.get(&k("any").spend);
        l.finish(&k("r1"), None);
        assert_eq!(spent(), 6, "released");
        l.finish(&k("r0"), Some((1, 0)));
        assert_eq!(spent(), 4, "settled to the actual cost");
        l.finish(&k("r0"), Some((1, 0)));
        assert_eq!(spent(), 4, "a second settlement does nothing");
        l.finish(&k("r2"), Some((5, 0)));
        assert_eq!(spent(), 6, "an actual cost above the estimate is charged");
    }

    #[test]
    fn a_token_quota_admits_what_fits_and_refuses_what_is_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let p = Plan { quota_tokens: Some(10), tokens: 5, ..plan(None, 0, None) };
        let now = SystemTime::now();
        let k = |rid: &str| Keys::new("", "org", rid, &p, now, None);
        assert!(matches!(l.reserve(&k("a"), &p, now), Decision::Allowed { .. }));
        assert!(matches!(l.reserve(&k("b"), &p, now), Decision::Allowed { .. }), "5 + 5 fits in 10");
        assert!(matches!(l.reserve(&k("c"), &p, now), Decision::QuotaTokens { used: 10 }));
        // Used up by what was actually counted, even for a request of no estimate.
        let small = Plan { tokens: 0, ..p };
        assert!(matches!(l.reserve(&k("d"), &small, now), Decision::QuotaTokens { used: 10 }));
        l.finish(&k("a"), Some((0, 2)));
        assert_eq!(l.get(&k("any").tokens), 7);
        assert!(matches!(l.reserve(&k("e"), &Plan { tokens: 3, ..p }, now), Decision::Allowed { .. }));
        assert!(matches!(l.reserve(&k("f"), &Plan { tokens: 1, ..p }, now), Decision::QuotaTokens { used: 10 }));
        // Released: 7 used again; 4 more would not fit, 3 would.
        l.finish(&k("e"), None);
        assert_eq!(l.get(&k("any").tokens), 7);
        assert!(matches!(l.reserve(&k("g"), &Plan { tokens: 4, ..p }, now), Decision::QuotaTokens { used: 7 }));
    }

    #[test]
    fn a_request_quota_admits_exactly_its_count_and_a_release_gives_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let p = plan(None, 0, Some(2));
        let now = SystemTime::now();
        let k = |rid: &str| Keys::new("", "org", rid, &p, now, None);
        assert!(matches!(l.reserve(&k("a"), &p, now), Decision::Allowed { .. }));
        assert!(matches!(l.reserve(&k("b"), &p, now), Decision::Allowed { .. }), "2 of 2");
        assert!(matches!(l.reserve(&k("c"), &p, now), Decision::QuotaRequests { used: 2 }));
        l.finish(&k("a"), None);
        assert_eq!(l.get(&k("any").requests), 1);
        assert!(matches!(l.reserve(&k("d"), &p, now), Decision::Allowed { .. }));
    }

    #[test]
    fn a_past_periods_spend_does_not_count_now() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let p = plan(Some(9), 3, None);
        let then = SystemTime::now() - Duration::from_secs(5 * 86_400);
        let old = Keys::new("", "org", "old", &p, then, None);
        assert!(matches!(l.reserve(&old, &p, then), Decision::Allowed { .. }));
        // Its counter has expired: read now, it is 0, and it is not saved.
        assert_eq!(l.get(&old.spend), 0);
        l.save().unwrap();
        let saved = std::fs::read_to_string(dir.path().join("ledger.json")).unwrap();
        assert!(!saved.contains(&old.spend), "{saved}");
        // A counter of today's is saved and read back.
        let now = SystemTime::now();
        let today = Keys::new("", "org", "new", &p, now, None);
        assert!(matches!(l.reserve(&today, &p, now), Decision::Allowed { .. }));
        l.save().unwrap();
        assert_eq!(Ledger::open(dir.path()).unwrap().get(&today.spend), 3);
    }

    #[test]
    fn an_unreadable_ledger_stops_the_open_instead_of_starting_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ledger.json")).unwrap();
        assert!(Ledger::open(dir.path()).is_err());
    }

    #[test]
    fn a_keys_budget_applies_on_top_of_its_organizations_and_settles_both() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let key = crate::limits::KeyPlan { rate: None, budget: Some(3), period: Period::Daily };
        let p = Plan { key: Some(key), ..plan(Some(10), 1, None) };
        let now = SystemTime::now();
        let keys = |rid: &str| Keys::new("", "org", rid, &p, now, Some("key_1"));
        for i in 0..3 {
            assert!(matches!(l.reserve(&keys(&format!("r{i}")), &p, now), Decision::Allowed { .. }));
        }
        assert!(matches!(l.reserve(&keys("r3"), &p, now), Decision::KeyBudget { spent: 3 }));
        assert_eq!(l.get(&keys("x").spend), 3, "the key's denial charged the organization nothing");
        // Settled at 2 each: both counters move; a release gives back both.
        l.finish(&keys("r0"), Some((2, 40)));
        assert_eq!((l.get(&keys("x").spend), l.get(&keys("x").key_spend), l.get(&keys("x").key_tokens)), (4, 4, 40));
        l.finish(&keys("r1"), None);
        assert_eq!((l.get(&keys("x").spend), l.get(&keys("x").key_spend)), (3, 3));
        // Another key of the organization has its own budget.
        let other = |rid: &str| Keys::new("", "org", rid, &p, now, Some("key_2"));
        assert!(matches!(l.reserve(&other("o1"), &p, now), Decision::Allowed { .. }));
    }

    #[test]
    fn concurrent_reservations_cannot_overshoot_and_settle_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = std::sync::Arc::new(Ledger::open(dir.path()).unwrap());
        let p = plan(Some(10 * 30_000), 30_000, None);
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..50 {
                let (ledger, p, admitted) = (&ledger, &p, &admitted);
                s.spawn(move || {
                    if matches!(ledger.reserve(&keys(&format!("r{i}")), p, SystemTime::now()), Decision::Allowed { .. })
                    {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 10);
        let k = keys("r0");
        // r0 may or may not be among the admitted; settle one that is.
        let admitted_key = (0..50)
            .map(|i| keys(&format!("r{i}")))
            .find(|k| ledger.lock().reservations.contains_key(&k.reservation))
            .unwrap();
        ledger.finish(&admitted_key, Some((20_000, 0)));
        ledger.finish(&admitted_key, Some((20_000, 0)));
        assert_eq!(ledger.get(&k.spend), 10 * 30_000 - 10_000);
    }

    #[test]
    fn release_returns_the_reservation_and_spend_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(Some(100), 40, Some(5));
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            let (a, b) = (keys("a"), keys("b"));
            assert!(matches!(ledger.reserve(&a, &p, SystemTime::now()), Decision::Allowed { .. }));
            assert!(matches!(ledger.reserve(&a, &p, SystemTime::now()), Decision::Allowed { .. }), "idempotent");
            assert!(matches!(ledger.reserve(&b, &p, SystemTime::now()), Decision::Allowed { .. }));
            assert_eq!(ledger.get(&a.spend), 80);
            assert!(matches!(ledger.reserve(&keys("c"), &p, SystemTime::now()), Decision::Budget { spent: 80 }));
            ledger.finish(&b, None);
            assert_eq!(ledger.get(&a.spend), 40);
            assert_eq!(ledger.get(&a.requests), 1);
            ledger.finish(&a, Some((25, 0)));
            ledger.save().unwrap();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.get(&keys("x").spend), 25);
        assert_eq!(ledger.get(&keys("x").requests), 1);
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ledger.json"), b"{broken").unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.get(&keys("x").spend), 0);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().any(|n| n.starts_with("ledger.json.damaged-")), "{names:?}");
    }
}

#[cfg(test)]
mod key_names {
    use super::*;
    use crate::limits::KeyPlan;
    use crate::limits::period::Period;

    fn plan_with_key() -> Plan {
        Plan {
            rate: Some((1000, 10)),
            budget: Some((5, Period::Monthly)),
            cost_micros: 1,
            quota_requests: Some(3),
            quota_tokens: Some(3),
            quota_period: Period::Daily,
            tokens: 0,
            key: Some(KeyPlan { rate: Some((1000, 1)), budget: Some(1), period: Period::Monthly }),
        }
    }

    fn all(k: &Keys) -> [&str; 8] {
        [&k.rate, &k.spend, &k.requests, &k.tokens, &k.reservation, &k.key_rate, &k.key_spend, &k.key_tokens]
    }

    /// Redis Cluster hashes only what is inside the first `{...}`: every key
    /// one admission touches must have the same first tag.
    #[test]
    fn on_a_cluster_every_key_of_an_admission_carries_the_organizations_tag() {
        let now = SystemTime::now();
        // Organization ids have no braces (`valid_id`), so the tag is the id.
        for org in ["org-a", "a.b:c_1"] {
            let k = Keys::tagged("api-router:", org, "req-1", &plan_with_key(), now, Some("key_1"));
            let tag = |key: &str| {
                let open = key.find('{').expect("a hash tag");
                let close = key[open + 1..].find('}').map(|c| open + 1 + c).expect("a closed tag");
                key[open + 1..close].to_string()
            };
            let first = tag(&k.rate);
            assert_eq!(first, org);
            for key in all(&k) {
                assert_eq!(tag(key), first, "{key}");
            }
        }
        // Two organizations: two tags.
        let a = Keys::tagged("p:", "org-a", "r", &plan_with_key(), now, None);
        let b = Keys::tagged("p:", "org-b", "r", &plan_with_key(), now, None);
        assert_ne!(a.rate, b.rate);
        assert_eq!(a.rate, "p:rl:{org-a}");
    }

    /// On one Redis the names stay as they were, so an upgrade keeps the
    /// counters of the running period.
    #[test]
    fn on_one_redis_the_names_are_unchanged() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let k = Keys::new("api-router:", "org-a", "req-1", &plan_with_key(), now, Some("key_1"));
        assert_eq!(k.rate, "api-router:rl:org-a");
        assert_eq!(k.reservation, "api-router:res:org-a:req-1");
        assert_eq!(k.key_rate, "api-router:krl:key_1");
        assert!(k.spend.starts_with("api-router:spend:org-a:m"));
        assert!(k.key_spend.starts_with("api-router:kspend:key_1:m"));
        assert!(all(&k).iter().all(|key| !key.contains('{')));
    }

    /// Every name, written out (they are joined by hand).
    #[test]
    fn every_name_in_full() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_788_000); // 2026-11-27
        let plan = plan_with_key();
        let k = Keys::new("p:", "org-a", "req-1", &plan, now, Some("key_1"));
        let bp = plan.budget.map(|(_, p)| p).unwrap_or(Period::Total).key(now);
        let qp = plan.quota_period.key(now);
        let kp = plan.key.unwrap().period.key(now);
        assert_eq!(
            all(&k),
            [
                "p:rl:org-a".to_string(),
                format!("p:spend:org-a:{bp}"),
                format!("p:qreq:org-a:{qp}"),
                format!("p:qtok:org-a:{qp}"),
                "p:res:org-a:req-1".into(),
                "p:krl:key_1".into(),
                format!("p:kspend:key_1:{kp}"),
                format!("p:ktok:key_1:{kp}"),
            ]
        );
        let t = Keys::tagged("p:", "org-a", "req-1", &plan, now, Some("key_1"));
        assert_eq!(
            all(&t),
            [
                "p:rl:{org-a}".to_string(),
                format!("p:spend:{{org-a}}:{bp}"),
                format!("p:qreq:{{org-a}}:{qp}"),
                format!("p:qtok:{{org-a}}:{qp}"),
                "p:res:{org-a}:req-1".into(),
                "p:krl:{org-a}:key_1".into(),
                format!("p:kspend:{{org-a}}:key_1:{kp}"),
                format!("p:ktok:{{org-a}}:key_1:{kp}"),
            ]
        );
        let none = Keys::new("p:", "org-a", "req-1", &plan, now, None);
        assert_eq!((none.key_rate.as_str(), none.key_spend.as_str(), none.key_tokens.as_str()), ("", "", ""));
    }
}
