//! The admission check, on both stores it can keep its counters in (this
//! process, and a private `redis-server`): what each denial says, what a
//! settlement and a release leave behind, the cost of a request, and the
//! failure modes when Redis goes away. End to end through the HTTP door:
//! `api-router/tests/limits.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use router_core::keys::{KeyEntry, KeyRuntime};
use router_core::limits::gcra::RateInfo;
use router_core::limits::local::Ledger;
use router_core::limits::period::Period;
use router_core::limits::redis::{RedisLimits, RedisTarget};
use router_core::limits::*;
use router_core::metrics::Metrics;
use router_providers::transport::Transports;
use test_support::redis::RedisServer;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    Local,
    Redis,
}

const STORES: [Store; 2] = [Store::Local, Store::Redis];

struct Fixture {
    limits: Arc<Limits>,
    metrics: Metrics,
    redis: Option<RedisServer>,
    _dir: tempfile::TempDir,
}

async fn fixture(store: Store, default_rate: Option<RateLimit>, failure_mode: FailureMode) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    let metrics = Metrics::new();
    let transport = Transports::new(Default::default()).unwrap().default_transport();
    let server = (store == Store::Redis).then(RedisServer::start);
    let target = server.as_ref().map(|s| RedisTarget::Single(s.url()));
    let redis = match &target {
        Some(t) => {
            let r = RedisLimits::new(t, Duration::from_millis(500), metrics.clone()).unwrap();
            r.connect().await.unwrap();
            Some(Arc::new(r))
        }
        None => None,
    };
    let settings = LimitSettings {
        default_rate,
        failure_mode,
        redis: target,
        redis_timeout: Duration::from_millis(500),
        redis_prefix: "test:".into(),
        default_request_cost: 0.25,
        estimated_tokens: 100,
        budget_service: None,
    };
    let limits = Arc::new(Limits::new(settings, ledger, redis, transport, metrics.clone()));
    Fixture { limits, metrics, redis: server, _dir: dir }
}

fn org() -> Arc<str> {
    Arc::from("org-a")
}

fn request<'a>(org: &'a Arc<str>, id: &'a Arc<str>, limits: OrgLimits, key: Option<&'a KeyEntry>) -> AdmitRequest<'a> {
    AdmitRequest { org, request_id: id, model: "m", limits: Some(limits), price: None, billable: true, key }
}

fn budget(amount: f64) -> OrgLimits {
    OrgLimits { budget: Some(Budget { amount, period: Period::Daily }), ..Default::default() }
}

fn rate(requests_per_second: f64, burst: u32) -> Option<RateLimit> {
    Some(RateLimit { requests_per_second, burst })
}

fn key(id: &str, rate_limit: Option<RateLimit>, budget: Option<Budget>) -> KeyEntry {
    KeyEntry {
        key_id: Arc::from(id),
        organization_id: org(),
        expires_at_ms: None,
        revoked: false,
        models: None,
        rate_limit,
        budget,
        runtime: Arc::new(KeyRuntime::default()),
    }
}

async fn admit(l: &Limits, id: &str, limits: OrgLimits, key: Option<&KeyEntry>) -> Result<Admission, LimitError> {
    let (org, id) = (org(), Arc::from(id));
    l.admit(&request(&org, &id, limits, key)).await
}

/// Runs the settler until it has applied `n` settlements (in order).
async fn settle(f: &Fixture, n: u64) {
    let cancel = CancellationToken::new();
    let settler = tokio::spawn(f.limits.clone().run_settler(cancel.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counter(&f.metrics.settlements, &["applied"]) < n {
        assert!(tokio::time::Instant::now() < deadline, "settlements not applied within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    settler.await.unwrap();
    assert_eq!(counter(&f.metrics.settlements, &["applied"]), n);
}

fn counter(v: &prometheus::IntCounterVec, labels: &[&str]) -> u64 {
    v.with_label_values(labels).get()
}

#[tokio::test]
async fn no_limits_at_all_admits_without_a_reservation() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let a = admit(&f.limits, "r1", OrgLimits::default(), None).await.unwrap();
        assert!(a.rate.is_none() && a.reservation.is_none(), "{store:?}");
    }
}

#[tokio::test]
async fn the_default_rate_applies_and_an_override_replaces_it() {
    for store in STORES {
        let f = fixture(store, rate(1.0, 2), FailureMode::Local).await;
        let a = admit(&f.limits, "r1", OrgLimits::default(), None).await.unwrap();
        assert_eq!(a.rate.map(|r| (r.limit, r.remaining)), Some((2, 1)), "{store:?}");
        assert!(a.reservation.is_none(), "{store:?}: a rate limit alone reserves nothing");
        admit(&f.limits, "r2", OrgLimits::default(), None).await.unwrap();
        match admit(&f.limits, "r3", OrgLimits::default(), None).await {
            // One request a second: the next one is due within a second.
            Err(LimitError::RateLimited { retry_after_secs, scope, info }) => {
                assert_eq!((retry_after_secs, scope, info.limit, info.remaining), (1, Scope::Organization, 2, 0));
            }
            other => panic!("{store:?}: expected a rate limit, got {other:?}"),
        }
        assert_eq!(counter(&f.metrics.rate_limit_denials, &["org-a"]), 1);
        let wide = OrgLimits { rate_limit: rate(1.0, 5), ..Default::default() };
        let a = admit(&f.limits, "r4", wide, None).await.unwrap();
        assert_eq!(a.rate.map(|r| r.limit), Some(5), "{store:?}: the organization's own limit replaces the default");
    }
}

#[tokio::test]
async fn retry_after_rounds_up_to_whole_seconds() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let slow = OrgLimits { rate_limit: rate(0.2, 1), ..Default::default() };
        admit(&f.limits, "r1", slow, None).await.unwrap();
        match admit(&f.limits, "r2", slow, None).await {
            // 5 s per request, less the moment since the first: 5 whole seconds.
            Err(LimitError::RateLimited { retry_after_secs, info, .. }) => {
                assert_eq!((retry_after_secs, info.reset_secs), (5, 5), "{store:?}");
            }
            other => panic!("{store:?}: expected a rate limit, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_budget_denial_says_the_limit_what_remains_and_when_it_resets() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        // Each request reserves the default cost, 0.25.
        for id in ["r1", "r2"] {
            let a = admit(&f.limits, id, budget(0.6), None).await.unwrap();
            assert!(a.reservation.is_some(), "{store:?}");
        }
        let now = SystemTime::now();
        match admit(&f.limits, "r3", budget(0.6), None).await {
            Err(LimitError::BudgetExceeded { limit, remaining, reset_at, scope }) => {
                assert_eq!((limit, remaining, scope), (0.6, 0.1, Scope::Organization), "{store:?}");
                assert_eq!(reset_at, Period::Daily.reset_at(now));
            }
            other => panic!("{store:?}: expected a budget denial, got {other:?}"),
        }
        assert_eq!(counter(&f.metrics.budget_denials, &["org-a"]), 1);
        assert_eq!(counter(&f.metrics.rate_limit_denials, &["org-a"]), 0);
        // The same request id again is the same reservation, not a new one.
        assert!(admit(&f.limits, "r1", budget(0.6), None).await.is_ok(), "{store:?}");
    }
}

#[tokio::test]
async fn quota_denials_name_their_kind_with_limit_and_remaining() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let requests = OrgLimits {
            quota: Some(Quota { requests: Some(2), tokens: None, period: Period::Monthly }),
            ..Default::default()
        };
        admit(&f.limits, "r1", requests, None).await.unwrap();
        admit(&f.limits, "r2", requests, None).await.unwrap();
        let now = SystemTime::now();
        match admit(&f.limits, "r3", requests, None).await {
            Err(LimitError::QuotaExceeded { kind, limit, remaining, reset_at }) => {
                assert_eq!((kind, limit, remaining), ("requests", 2, 0), "{store:?}");
                assert_eq!(reset_at, Period::Monthly.reset_at(now));
            }
            other => panic!("{store:?}: expected a request quota denial, got {other:?}"),
        }
        let tokens = OrgLimits {
            quota: Some(Quota { requests: None, tokens: Some(250), period: Period::Daily }),
            ..Default::default()
        };
        // 100 estimated tokens each: 200 of 250 held, 50 left.
        admit(&f.limits, "t1", tokens, None).await.unwrap();
        admit(&f.limits, "t2", tokens, None).await.unwrap();
        match admit(&f.limits, "t3", tokens, None).await {
            Err(LimitError::QuotaExceeded { kind, limit, remaining, .. }) => {
                assert_eq!((kind, limit, remaining), ("tokens", 250, 50), "{store:?}");
            }
            other => panic!("{store:?}: expected a token quota denial, got {other:?}"),
        }
        assert_eq!(counter(&f.metrics.quota_denials, &["org-a"]), 2);
    }
}

#[tokio::test]
async fn an_api_keys_own_rate_limit_and_budget_are_the_keys() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let k = key("key_1", rate(1.0, 1), None);
        let a = admit(&f.limits, "r1", OrgLimits::default(), Some(&k)).await.unwrap();
        assert!(a.reservation.is_some(), "{store:?}: a managed key's counters are kept");
        match admit(&f.limits, "r2", OrgLimits::default(), Some(&k)).await {
            Err(LimitError::RateLimited { scope, info, .. }) => assert_eq!((scope, info.limit), (Scope::Key, 1)),
            other => panic!("{store:?}: expected the key's rate limit, got {other:?}"),
        }
        let k = key("key_2", None, Some(Budget { amount: 0.3, period: Period::Monthly }));
        admit(&f.limits, "r3", OrgLimits::default(), Some(&k)).await.unwrap();
        let now = SystemTime::now();
        match admit(&f.limits, "r4", OrgLimits::default(), Some(&k)).await {
            Err(LimitError::BudgetExceeded { limit, remaining, reset_at, scope }) => {
                assert_eq!((limit, remaining, scope), (0.3, 0.05, Scope::Key), "{store:?}");
                assert_eq!(reset_at, Period::Monthly.reset_at(now));
            }
            other => panic!("{store:?}: expected the key's budget, got {other:?}"),
        }
        assert_eq!(counter(&f.metrics.rate_limit_denials, &["org-a"]), 1);
        assert_eq!(counter(&f.metrics.budget_denials, &["org-a"]), 1);
    }
}

#[tokio::test]
async fn settling_charges_the_actual_cost_and_releasing_charges_nothing() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let l = &f.limits;
        let limits = OrgLimits {
            budget: Some(Budget { amount: 10.0, period: Period::Daily }),
            quota: Some(Quota { requests: Some(10), tokens: Some(10_000), period: Period::Daily }),
            ..Default::default()
        };
        let price = Price {
            input_per_1k: 1.0,
            output_per_1k: 2.0,
            cache_read_per_1k: None,
            cache_write_per_1k: None,
            request_cost: None,
        };
        let (o, id) = (org(), Arc::from("settled"));
        let mut req = request(&o, &id, limits, None);
        req.price = Some(price);
        let settled = l.admit(&req).await.unwrap().reservation.unwrap();
        let released = admit(l, "released", limits, None).await.unwrap().reservation.unwrap();
        let held = l.usage("org-a", Some(limits)).await.unwrap();
        assert_eq!(held["budget"]["spent"], 0.5, "{store:?}: two estimates of 0.25 held");
        assert_eq!(held["quota"]["requests_used"], 2);
        assert_eq!(held["quota"]["tokens_used"], 200);
        let usage = Usage { prompt_tokens: 500, completion_tokens: 250, total_tokens: 750, ..Default::default() };
        l.finish(settled, Some(Some(usage)));
        l.finish(released, None);
        settle(&f, 2).await;
        let v = l.usage("org-a", Some(limits)).await.unwrap();
        // 0.5 × 1.0 + 0.25 × 2.0 = 1.0; the released one counts nothing.
        assert_eq!(v["budget"]["spent"], 1.0, "{store:?}");
        assert_eq!(v["budget"]["remaining"], 9.0);
        assert_eq!(v["budget"]["limit"], 10.0);
        assert_eq!(v["quota"]["requests_used"], 1);
        assert_eq!(v["quota"]["tokens_used"], 750);
        assert_eq!(v["source"], if store == Store::Redis { "redis" } else { "local" });
    }
}

#[tokio::test]
async fn a_request_that_is_not_billable_settles_to_nothing() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let l = &f.limits;
        let (o, id) = (org(), Arc::from("free"));
        let mut req = request(&o, &id, budget(1.0), None);
        req.billable = false;
        let r = l.admit(&req).await.unwrap().reservation.unwrap();
        l.finish(
            r,
            Some(Some(Usage { prompt_tokens: 9, completion_tokens: 9, total_tokens: 18, ..Default::default() })),
        );
        settle(&f, 1).await;
        assert_eq!(l.usage("org-a", Some(budget(1.0))).await.unwrap()["budget"]["spent"], 0.0, "{store:?}");
    }
}

#[tokio::test]
async fn a_managed_keys_usage_counts_its_own_spend_and_tokens() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let l = &f.limits;
        let k = key("key_1", None, Some(Budget { amount: 2.0, period: Period::Daily }));
        let r = admit(l, "k1", OrgLimits::default(), Some(&k)).await.unwrap().reservation.unwrap();
        let held = l.key_usage(&k).await.unwrap();
        assert_eq!((held["spent"].as_f64(), held["tokens_used"].as_i64()), (Some(0.25), Some(100)), "{store:?}");
        l.finish(r, Some(None));
        let released = admit(l, "k2", OrgLimits::default(), Some(&k)).await.unwrap().reservation.unwrap();
        l.finish(released, None);
        settle(&f, 2).await;
        let v = l.key_usage(&k).await.unwrap();
        assert_eq!(v["spent"], 0.25, "{store:?}: no usage reported: the flat default cost");
        assert_eq!(v["tokens_used"], 0);
        assert_eq!(v["budget"]["remaining"], 1.75);
        assert_eq!(v["period"], "daily");
        assert_eq!(v["key_id"], "key_1");
        assert_eq!(v["organization_id"], "org-a");
    }
}

#[tokio::test]
async fn redis_going_away_applies_the_failure_mode() {
    let one_a_second = OrgLimits { rate_limit: rate(1.0, 1), ..Default::default() };
    // closed: refused, and counted.
    let mut f = fixture(Store::Redis, None, FailureMode::Closed).await;
    f.redis.as_mut().unwrap().kill();
    assert_eq!(admit(&f.limits, "c1", one_a_second, None).await.err(), Some(LimitError::LimiterUnavailable));
    assert_eq!(counter(&f.metrics.limits_degraded, &["closed", "refused"]), 1);
    // open: admitted, with nothing to settle.
    let mut f = fixture(Store::Redis, None, FailureMode::Open).await;
    f.redis.as_mut().unwrap().kill();
    for id in ["o1", "o2"] {
        let a = admit(&f.limits, id, budget(0.01), None).await.unwrap();
        assert!(a.reservation.is_none() && a.rate.is_none());
    }
    assert_eq!(counter(&f.metrics.limits_degraded, &["open", "allowed"]), 2);
    // local: the in-process rate limit decides.
    let mut f = fixture(Store::Redis, None, FailureMode::Local).await;
    f.redis.as_mut().unwrap().kill();
    let a = admit(&f.limits, "l1", one_a_second, None).await.unwrap();
    assert_eq!(a.rate.map(|r| (r.limit, r.remaining)), Some((1, 0)));
    assert!(matches!(admit(&f.limits, "l2", one_a_second, None).await, Err(LimitError::RateLimited { .. })));
    assert_eq!(counter(&f.metrics.limits_degraded, &["local", "allowed"]), 1);
    assert_eq!(counter(&f.metrics.limits_degraded, &["local", "denied"]), 1);
    assert!(counter(&f.metrics.redis_errors, &["admit"]) >= 1);
}

#[tokio::test]
async fn cost_prices_cached_tokens_and_falls_back_to_the_flat_cost() {
    let f = fixture(Store::Local, None, FailureMode::Local).await;
    let l = &f.limits;
    let price = Price {
        input_per_1k: 1.0,
        output_per_1k: 4.0,
        cache_read_per_1k: Some(0.1),
        cache_write_per_1k: Some(2.0),
        request_cost: Some(0.5),
    };
    let u = Usage {
        prompt_tokens: 1000,
        completion_tokens: 500,
        total_tokens: 1500,
        cache_read_tokens: 300,
        cache_write_tokens: 200,
    };
    // 500 uncached × 1.0 + 300 × 0.1 + 200 × 2.0 + 500 × 4.0, per 1,000.
    assert!((l.cost(Some(price), Some(u)) - 2.93).abs() < 1e-9);
    let no_cache_prices = Price { cache_read_per_1k: None, cache_write_per_1k: None, ..price };
    assert!((l.cost(Some(no_cache_prices), Some(u)) - 3.0).abs() < 1e-9);
    assert_eq!(l.cost(Some(price), None), 0.5);
    assert_eq!(l.cost(Some(price), Some(Usage::default())), 0.5, "no tokens reported: the flat cost");
    let output_only = Usage { completion_tokens: 1000, total_tokens: 1000, ..Default::default() };
    assert_eq!(l.cost(Some(price), Some(output_only)), 4.0, "output tokens alone are priced");
    assert_eq!(l.cost(None, Some(u)), 0.25, "no price: the default cost");
}

#[test]
fn limits_json_refuses_what_cannot_be_enforced() {
    use serde_json::json;
    let bad = [
        (json!({"rate_limit": {"requests_per_second": 0, "burst": 1}}), "greater than 0"),
        (json!({"rate_limit": {"requests_per_second": 1, "burst": 1.5}}), "whole number"),
        (json!({"budget": {"amount": "5", "period": "daily"}}), "must be a number"),
        (json!({"budget": {"amount": -1, "period": "daily"}}), "greater than 0"),
        (json!({"quota": {"period": "daily"}}), "needs `requests`"),
        (json!({"quota": {"requests": 0, "period": "daily"}}), "greater than 0"),
        (json!({"rate_limit": {"requests_per_second": 1, "burst": 1_000_001}}), "out of range"),
        (json!({"rate_limit": {"requests_per_second": 2e9, "burst": 1}}), "out of range"),
        (json!({"budget": {"amount": 1, "period": "weekly"}}), "unknown variant"),
    ];
    for (value, message) in bad {
        let e = OrgLimits::from_json(value.clone()).unwrap_err();
        assert!(e.contains(message), "{value}: {e}");
    }
    let ok = json!({
        "rate_limit": {"requests_per_second": 1e9, "burst": 1_000_000},
        "quota": {"tokens": 5, "period": "total"},
    });
    let l = OrgLimits::from_json(ok).unwrap();
    assert_eq!(l.rate_limit.map(|r| r.burst), Some(1_000_000));
    assert_eq!(l.quota.and_then(|q| q.tokens), Some(5));
}

#[test]
fn denials_read_as_the_runbook_says() {
    let info = RateInfo { limit: 1, remaining: 0, reset_secs: 1 };
    let org = Scope::Organization;
    let cases = [
        (
            LimitError::RateLimited { info, retry_after_secs: 3, scope: org },
            "rate limit exceeded for this organization; retry after 3 s",
        ),
        (
            LimitError::RateLimited { info, retry_after_secs: 1, scope: Scope::Key },
            "rate limit exceeded for this API key; retry after 1 s",
        ),
        (
            LimitError::BudgetExceeded { limit: 5.0, remaining: 0.5, reset_at: None, scope: org },
            "budget exceeded: 0.5 of 5 remaining in this period",
        ),
        (
            LimitError::BudgetExceeded { limit: 5.0, remaining: 0.0, reset_at: None, scope: Scope::Key },
            "this API key's budget exceeded: 0 of 5 remaining in this period",
        ),
        (
            LimitError::QuotaExceeded { kind: "tokens", limit: 9, remaining: 2, reset_at: None },
            "tokens quota exceeded: 2 of 9 remaining in this period",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.to_string(), text);
    }
    assert!(LimitError::LimiterUnavailable.to_string().contains("RATE_LIMIT_FAILURE_MODE=closed"));
    assert!(LimitError::BudgetServiceUnavailable.to_string().contains("BUDGET_SERVICE_FAILURE_MODE=closed"));
    assert_eq!(
        [FailureMode::Open, FailureMode::Closed, FailureMode::Local].map(FailureMode::as_str),
        ["open", "closed", "local"]
    );
    assert_eq!([Scope::Organization, Scope::Key].map(Scope::as_str), ["organization", "key"]);
}
