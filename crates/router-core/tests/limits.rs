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
use test_support::eventually;
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
    let server = (store == Store::Redis).then(RedisServer::start);
    let target = server.as_ref().map(|s| RedisTarget::Single(s.url()));
    let mut f = fixture_on(target, None, default_rate, failure_mode).await;
    f.redis = server;
    f
}

/// Limits on `target` (`None`: in process), with an optional budget service.
async fn fixture_on(
    target: Option<RedisTarget>,
    budget_service: Option<BudgetServiceSettings>,
    default_rate: Option<RateLimit>,
    failure_mode: FailureMode,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    let metrics = Metrics::new();
    let transport = Transports::new(Default::default()).unwrap().default_transport();
    let redis = match &target {
        Some(t) => {
            let r = RedisLimits::new(t, Duration::from_millis(500), metrics.clone()).unwrap();
            // A cluster's first PING also fetches its slot map from every
            // node, which can take longer than connect's 2 s on a loaded
            // machine: retry until a deadline (the tests are not about that).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while let Err(e) = r.connect().await {
                assert!(tokio::time::Instant::now() < deadline, "Redis never answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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
        budget_service,
    };
    let limits = Arc::new(Limits::new(settings, ledger, redis, transport, metrics.clone()));
    Fixture { limits, metrics, redis: None, _dir: dir }
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
    let applied = || async { counter(&f.metrics.settlements, &["applied"]) >= n };
    assert!(eventually(Duration::from_secs(10), applied).await, "settlements not applied within 10 s");
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
async fn each_admission_redis_answers_is_timed_and_one_it_does_not_is_counted_as_an_error() {
    let mut f = fixture(Store::Redis, rate(1000.0, 1000), FailureMode::Open).await;
    for id in ["r1", "r2", "r3"] {
        admit(&f.limits, id, OrgLimits::default(), None).await.unwrap();
    }
    let timed = &f.metrics.redis_admit_seconds;
    assert_eq!(timed.get_sample_count(), 3);
    assert!(timed.get_sample_sum() > 0.0 && timed.get_sample_sum() < 3.0 * 0.5, "{}", timed.get_sample_sum());
    f.redis.as_mut().unwrap().kill();
    admit(&f.limits, "r4", OrgLimits::default(), None).await.unwrap();
    assert_eq!(timed.get_sample_count(), 3, "a failed call is not timed");
    assert_eq!(errors(&f.metrics, "admit") + errors(&f.metrics, "admit_timeout"), 1);
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
            assert!(a.rate.is_none(), "{store:?}: no rate limit, no rate headers");
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
async fn a_request_served_by_a_fallback_model_settles_at_that_models_price() {
    for store in STORES {
        let f = fixture(store, None, FailureMode::Local).await;
        let price = |input_per_1k| Price {
            input_per_1k,
            output_per_1k: 0.0,
            cache_read_per_1k: None,
            cache_write_per_1k: None,
            request_cost: None,
        };
        let (o, id) = (org(), Arc::from("fallback"));
        let mut req = request(&o, &id, budget(100.0), None);
        req.price = Some(price(1.0));
        let mut r = f.limits.admit(&req).await.unwrap().reservation.unwrap();
        r.reprice(Some(price(3.0)));
        f.limits.finish(r, Some(Some(Usage { prompt_tokens: 1000, total_tokens: 1000, ..Default::default() })));
        settle(&f, 1).await;
        assert_eq!(f.limits.usage("org-a", Some(budget(100.0))).await.unwrap()["budget"]["spent"], 3.0, "{store:?}");
    }
}

#[tokio::test]
async fn counters_are_named_by_organization_and_period_without_hash_tags_on_one_redis() {
    let f = fixture(Store::Redis, None, FailureMode::Local).await;
    assert!(f.limits.redis().is_some() && f.limits.service().is_none());
    let _held = admit(&f.limits, "r1", budget(1.0), None).await.unwrap();
    let port = f.redis.as_ref().unwrap().port;
    let keys = test_support::redis::RedisCluster::cli(port, &["KEYS", "*"]).unwrap();
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    let day = Period::Daily.key(SystemTime::now());
    assert_eq!(keys, ["test:res:org-a:r1".to_string(), format!("test:spend:org-a:{day}")], "{keys:?}");
    let local = fixture(Store::Local, None, FailureMode::Local).await;
    assert!(local.limits.redis().is_none() && local.limits.service().is_none());
}

#[tokio::test]
async fn on_a_redis_cluster_one_admission_stays_in_one_slot_and_waits_for_a_replica() {
    let cluster = test_support::redis::RedisCluster::start();
    let urls = cluster.urls().split(',').map(str::to_string).collect();
    let target = RedisTarget::Cluster { urls, replica_acks: 1 };
    let f = fixture_on(Some(target), None, None, FailureMode::Closed).await;
    assert!(f.limits.redis().is_some_and(|r| r.is_cluster()));
    // Without the organization's hash tag the rate, spend and reservation
    // keys would lie in different slots, and Redis would refuse the script.
    let limits = OrgLimits { rate_limit: rate(100.0, 10), ..budget(0.5) };
    for id in ["c1", "c2", "c1"] {
        let a = admit(&f.limits, id, limits, None).await.unwrap();
        assert!(a.reservation.is_some(), "{id}: reserved on the cluster");
    }
    assert!(matches!(admit(&f.limits, "c3", limits, None).await, Err(LimitError::BudgetExceeded { .. })));
    let keys = cluster.keys();
    assert!(!keys.is_empty() && keys.iter().all(|k| k.contains("{org-a}")), "{keys:?}");
    // A replica acknowledges each admission that changed counters: c1 and
    // c2, not c1 again (its reservation existed) nor the refused c3.
    assert_eq!(calls(cluster.master_of("{org-a}"), "wait"), 2);
    assert_eq!(errors(&f.metrics, "replica_ack"), 0);
}

#[tokio::test]
async fn replicas_that_do_not_acknowledge_are_not_waited_for_a_while() {
    // Each master has one replica: two acknowledgements never come.
    let cluster = test_support::redis::RedisCluster::start();
    let urls = cluster.urls().split(',').map(str::to_string).collect();
    let f = fixture_on(Some(RedisTarget::Cluster { urls, replica_acks: 2 }), None, None, FailureMode::Closed).await;
    let master = cluster.master_of("{org-a}");
    let waits = || calls(master, "wait");
    let first = admit(&f.limits, "w1", budget(10.0), None).await.unwrap();
    assert!(first.reservation.is_some(), "a missing acknowledgement is counted, never a refusal");
    assert_eq!((waits(), errors(&f.metrics, "replica_ack")), (1, 1));
    // Within ACK_PAUSE (5 s) of the miss: admitted without a WAIT.
    admit(&f.limits, "w2", budget(10.0), None).await.unwrap();
    assert_eq!(waits(), 1);
    // Then the replicas are asked again.
    let deadline = tokio::time::Instant::now() + router_core::limits::redis::ACK_PAUSE * 3;
    let mut n = 0;
    while waits() == 1 {
        assert!(tokio::time::Instant::now() < deadline, "never asked the replicas again");
        tokio::time::sleep(Duration::from_millis(200)).await;
        n += 1;
        admit(&f.limits, &format!("w-{n}"), budget(10.0), None).await.unwrap();
    }
    assert_eq!(errors(&f.metrics, "replica_ack"), 2);
}

#[tokio::test]
async fn with_a_budget_service_only_budgets_and_quotas_are_asked_of_it() {
    // Nothing listens on port 1: asking the service fails at once.
    let service = BudgetServiceSettings {
        url: "http://127.0.0.1:1".into(),
        timeout: Duration::from_millis(500),
        fail_open: false,
        denial_cache: Duration::from_secs(1),
    };
    let f = fixture_on(None, Some(service), None, FailureMode::Local).await;
    assert!(f.limits.service().is_some());
    let rate_only = OrgLimits { rate_limit: rate(10.0, 5), ..Default::default() };
    let a = admit(&f.limits, "s1", rate_only, None).await.unwrap();
    assert_eq!(a.rate.map(|r| r.remaining), Some(4), "the rate limit is kept here, the service is not asked");
    assert!(a.reservation.is_none());
    assert_eq!(admit(&f.limits, "s2", budget(1.0), None).await.err(), Some(LimitError::BudgetServiceUnavailable));
}

/// The reservations of requests `{prefix}0` to `{prefix}{n - 1}` under a
/// budget of `amount`.
async fn hold(f: &Fixture, prefix: &str, n: usize, amount: f64) -> Vec<Reservation> {
    let mut held = Vec::new();
    for i in 0..n {
        held.push(admit(&f.limits, &format!("{prefix}{i}"), budget(amount), None).await.unwrap().reservation.unwrap());
    }
    held
}

#[tokio::test]
async fn settlements_that_cannot_land_before_shutdown_are_counted_as_dropped() {
    let mut f = fixture(Store::Redis, None, FailureMode::Local).await;
    let held = hold(&f, "d", 3, 10.0).await;
    f.redis.as_mut().unwrap().kill();
    for r in held {
        f.limits.finish(r, None);
    }
    let cancel = CancellationToken::new();
    let settler = tokio::spawn(f.limits.clone().run_settler(cancel.clone()));
    let tried = || async { counter(&f.metrics.settlements, &["retried"]) > 0 };
    assert!(eventually(Duration::from_secs(10), tried).await, "the first settlement was not tried within 10 s");
    cancel.cancel();
    settler.await.unwrap();
    // The one being retried and the two behind it: each tried once more.
    assert_eq!(counter(&f.metrics.settlements, &["dropped"]), 3);
    assert_eq!(counter(&f.metrics.settlements, &["applied"]), 0);
}

#[tokio::test]
async fn settlements_queued_together_land_in_one_redis_call() {
    let f = fixture(Store::Redis, None, FailureMode::Local).await;
    let port = f.redis.as_ref().unwrap().port;
    let held = hold(&f, "s", 30, 100.0).await;
    assert_eq!(calls(port, "evalsha"), 30);
    // Every other one served (one token in), the rest released.
    for (i, r) in held.into_iter().enumerate() {
        let served = Some(Usage { prompt_tokens: 1, total_tokens: 1, ..Default::default() });
        f.limits.finish(r, (i % 2 == 0).then_some(served));
    }
    settle(&f, 30).await;
    assert_eq!(calls(port, "evalsha"), 31, "the 30 settlements in one call");
    let v = f.limits.usage("org-a", Some(budget(100.0))).await.unwrap();
    // The default request cost (0.25) for each of the 15 served; nothing
    // for the released ones.
    assert_eq!(v["budget"]["spent"], 3.75, "{v}");
}

#[tokio::test]
async fn a_batch_of_settlements_that_fails_is_settled_one_by_one_once_redis_answers() {
    let f = fixture(Store::Redis, None, FailureMode::Local).await;
    let held = hold(&f, "p", 5, 100.0).await;
    f.redis.as_ref().unwrap().pause(true);
    for r in held {
        f.limits.finish(r, None);
    }
    let cancel = CancellationToken::new();
    let settler = tokio::spawn(f.limits.clone().run_settler(cancel.clone()));
    let tried = || async { counter(&f.metrics.settlements, &["retried"]) > 0 };
    assert!(eventually(Duration::from_secs(10), tried).await, "no settlement was retried within 10 s");
    assert!(errors(&f.metrics, "settle") >= 2, "the batch's call and a single one failed");
    f.redis.as_ref().unwrap().pause(false);
    let applied = || async { counter(&f.metrics.settlements, &["applied"]) == 5 };
    assert!(eventually(Duration::from_secs(15), applied).await, "not all applied once Redis answered");
    cancel.cancel();
    settler.await.unwrap();
    let v = f.limits.usage("org-a", Some(budget(100.0))).await.unwrap();
    assert_eq!(v["budget"]["spent"], 0.0, "every reservation released: {v}");
}

/// The Redis on `port`'s answer to `args`, trimmed.
fn ask(port: u16, args: &[&str]) -> String {
    test_support::redis::RedisCluster::cli(port, args).unwrap().trim().to_string()
}

#[tokio::test]
async fn every_key_an_admission_writes_expires_when_it_should() {
    let server = RedisServer::start();
    let target = RedisTarget::Single(server.url());
    let redis = RedisLimits::new(&target, Duration::from_millis(500), Metrics::new()).unwrap();
    redis.connect().await.unwrap();
    let ttl = |key: &str| ask(server.port, &["TTL", key]).parse::<i64>().unwrap();
    let day = 86_400;
    // Everything at once: rate, a daily budget, a request and token quota
    // for all time, and a managed key with a rate limit and no budget (its
    // counters are incremented, not read).
    let plan = Plan {
        rate: Some((1_000, 10)),
        budget: Some((1_000_000, Period::Daily)),
        quota_requests: Some(100),
        quota_tokens: Some(10_000),
        quota_period: Period::Total,
        cost_micros: 10,
        tokens: 5,
        key: Some(KeyPlan { rate: Some((1_000, 10)), budget: None, period: Period::Monthly }),
    };
    for id in ["e1", "e2"] {
        let now = SystemTime::now();
        let keys = Keys::new("test:", "org-e", id, &plan, now, Some("key_e"));
        assert!(matches!(redis.admit(&keys, &plan, now).await, Ok(Decision::Allowed { .. })));
        // The daily budget's counter: until a day after today ends.
        assert!((day..=2 * day).contains(&ttl(&keys.spend)), "spend {}", ttl(&keys.spend));
        // Quotas for all time never expire.
        assert_eq!((ttl(&keys.requests), ttl(&keys.tokens)), (-1, -1));
        assert!((3_500..=3_600).contains(&ttl(&keys.reservation)), "reservation {}", ttl(&keys.reservation));
        // The key's monthly counters, written by increment: created with
        // their expiry, and keeping it.
        for k in [&keys.key_spend, &keys.key_tokens] {
            assert!((day..=32 * day).contains(&ttl(k)), "{k} {}", ttl(k));
        }
        for k in [&keys.rate, &keys.key_rate] {
            assert!(ask(server.port, &["PTTL", k]).parse::<i64>().unwrap() > 0, "{k}");
        }
    }
    let keys = Keys::new("test:", "org-e", "e3", &plan, SystemTime::now(), Some("key_e"));
    assert_eq!(ask(server.port, &["GET", &keys.requests]), "2");
    assert_eq!(ask(server.port, &["GET", &keys.key_tokens]), "10");
}

#[tokio::test]
async fn a_reservation_held_as_a_hash_by_an_earlier_version_is_settled_as_one() {
    let server = RedisServer::start();
    let target = RedisTarget::Single(server.url());
    let redis = RedisLimits::new(&target, Duration::from_millis(500), Metrics::new()).unwrap();
    redis.connect().await.unwrap();
    let (_, keys) = budget_plan("old");
    // What the version before wrote: 3 held against the budget and one
    // request against the quota.
    let p = server.port;
    ask(p, &["SET", &keys.spend, "3"]);
    ask(p, &["SET", &keys.requests, "1"]);
    ask(p, &["HSET", &keys.reservation, "b", "1", "c", "3", "r", "1", "tq", "0", "t", "0"]);
    redis.finish(&keys, Some((2, 0))).await.unwrap();
    assert_eq!(ask(p, &["GET", &keys.spend]), "2", "settled at the actual cost");
    assert_eq!(ask(p, &["EXISTS", &keys.reservation]), "0");
    // Settled once: a repeat changes nothing.
    redis.finish(&keys, Some((2, 0))).await.unwrap();
    assert_eq!((ask(p, &["GET", &keys.spend]), ask(p, &["GET", &keys.requests])), ("2".into(), "1".into()));
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

/// One request's keys and plan: a budget of 10 (Redis calls, not denials).
fn budget_plan(id: &str) -> (Plan, Keys) {
    let plan = Plan {
        rate: None,
        budget: Some((10_000_000, Period::Daily)),
        quota_requests: None,
        quota_tokens: None,
        quota_period: Period::Total,
        cost_micros: 1,
        tokens: 0,
        key: None,
    };
    let keys = Keys::new("test:", "org-a", id, &plan, SystemTime::now(), None);
    (plan, keys)
}

fn errors(m: &Metrics, op: &str) -> u64 {
    m.redis_errors.with_label_values(&[op]).get()
}

/// Waits (10 s at most) until Redis is seen `healthy` or not.
async fn until_healthy(redis: &RedisLimits, healthy: bool) {
    let reached = eventually(Duration::from_secs(10), || async { redis.is_healthy() == healthy }).await;
    assert!(reached, "healthy = {healthy} not reached within 10 s");
}

/// How many times the Redis on `port` ran `command` (`INFO commandstats`).
fn calls(port: u16, command: &str) -> u64 {
    let stats = test_support::redis::RedisCluster::cli(port, &["INFO", "commandstats"]).unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    stats.lines().find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn redis_is_down_after_three_failures_in_a_row_and_back_when_a_ping_answers() {
    let server = RedisServer::start();
    let metrics = Metrics::new();
    let target = RedisTarget::Single(server.url());
    let redis = Arc::new(RedisLimits::new(&target, Duration::from_millis(100), metrics.clone()).unwrap());
    redis.connect().await.unwrap();
    assert!(redis.is_healthy() && !redis.is_cluster());
    let admit = |id: &str| {
        let (plan, keys) = budget_plan(id);
        let redis = redis.clone();
        async move { redis.admit(&keys, &plan, SystemTime::now()).await }
    };
    // The scripts were loaded at connect: the first admission is one call.
    assert!(matches!(admit("a0").await, Ok(Decision::Allowed { .. })));
    assert_eq!(calls(server.port, "evalsha"), 1);
    // Two timeouts, then an answer: the count starts again.
    server.pause(true);
    for id in ["t1", "t2"] {
        assert!(admit(id).await.is_err());
    }
    assert!(redis.is_healthy(), "two failures are not an outage");
    server.pause(false);
    assert!(admit("a1").await.is_ok());
    server.pause(true);
    for id in ["t3", "t4"] {
        assert!(admit(id).await.is_err());
    }
    assert!(redis.is_healthy(), "an answer in between resets the count");
    assert!(admit("t5").await.is_err());
    assert!(!redis.is_healthy(), "the third failure in a row: down");
    assert_eq!(errors(&metrics, "admit_timeout"), 5);
    // Known down: not asked at all until a ping answers.
    assert!(admit("t6").await.is_err());
    assert_eq!(errors(&metrics, "admit_timeout"), 5);
    assert!(redis.ping(Duration::from_millis(100)).await.is_err());
    server.pause(false);
    let cancel = CancellationToken::new();
    let health = tokio::spawn(redis.clone().run_health(cancel.clone()));
    until_healthy(&redis, true).await;
    assert!(admit("a2").await.is_ok());
    cancel.cancel();
    health.await.unwrap();
}

#[tokio::test]
async fn after_a_redis_restart_its_scripts_are_loaded_before_the_first_admission() {
    let mut server = RedisServer::start();
    let metrics = Metrics::new();
    let target = RedisTarget::Single(server.url());
    let redis = Arc::new(RedisLimits::new(&target, Duration::from_millis(200), metrics.clone()).unwrap());
    redis.connect().await.unwrap();
    assert!(router_core::readiness::Healthy::is_healthy(&*redis), "the readiness component agrees");
    let cancel = CancellationToken::new();
    let health = tokio::spawn(redis.clone().run_health(cancel.clone()));
    server.kill();
    until_healthy(&redis, false).await;
    assert!(!router_core::readiness::Healthy::is_healthy(&*redis));
    // A new server knows no scripts.
    server.restart();
    until_healthy(&redis, true).await;
    let (plan, keys) = budget_plan("first");
    assert!(matches!(redis.admit(&keys, &plan, SystemTime::now()).await, Ok(Decision::Allowed { .. })));
    assert_eq!(calls(server.port, "evalsha"), 1, "one call, no NOSCRIPT round");
    cancel.cancel();
    health.await.unwrap();
}

#[tokio::test]
async fn a_silent_connection_is_replaced_so_redis_is_healthy_again_once_it_answers() {
    let server = RedisServer::start();
    let proxy = test_support::proxy::Proxy::start(server.port).await;
    let metrics = Metrics::new();
    let target = RedisTarget::Single(format!("redis://127.0.0.1:{}", proxy.port));
    let redis = Arc::new(RedisLimits::new(&target, Duration::from_millis(100), metrics.clone()).unwrap());
    redis.connect().await.unwrap();
    let cancel = CancellationToken::new();
    let health = tokio::spawn(redis.clone().run_health(cancel.clone()));
    // Everything sent is thrown away, and the connection stays open: the
    // pings queued on it will never be answered.
    proxy.set_fault(test_support::proxy::Fault::BlackHole);
    until_healthy(&redis, false).await;
    assert!(errors(&metrics, "ping") >= 1);
    proxy.set_fault(test_support::proxy::Fault::None);
    until_healthy(&redis, true).await;
    let (plan, keys) = budget_plan("after");
    assert!(redis.admit(&keys, &plan, SystemTime::now()).await.is_ok());
    cancel.cancel();
    health.await.unwrap();
}

/// The keys in database `db` of the Redis on `port`, asked as `user`.
fn keys_in(port: u16, user: &str, password: &str, db: u32) -> Vec<String> {
    let db = db.to_string();
    let auth = ["--user", user, "--pass", password, "--no-auth-warning", "-n", db.as_str()];
    let args: Vec<&str> = auth.iter().copied().chain(["KEYS", "*"]).collect();
    let out = test_support::redis::RedisCluster::cli(port, &args).unwrap();
    out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[tokio::test]
async fn the_user_password_and_database_in_redis_url_are_used() {
    let server = RedisServer::start();
    let cli = |args: &[&str]| test_support::redis::RedisCluster::cli(server.port, args).unwrap();
    assert_eq!(cli(&["ACL", "SETUSER", "router", "on", ">s3cret", "~*", "+@all"]).trim(), "OK");
    assert_eq!(cli(&["CONFIG", "SET", "requirepass", "other"]).trim(), "OK");
    let url = format!("redis://router:s3cret@127.0.0.1:{}/2", server.port);
    let redis = RedisLimits::new(&RedisTarget::Single(url), Duration::from_millis(500), Metrics::new()).unwrap();
    redis.connect().await.unwrap();
    let (plan, keys) = budget_plan("in-db-2");
    assert!(matches!(redis.admit(&keys, &plan, SystemTime::now()).await, Ok(Decision::Allowed { .. })));
    let in_2 = keys_in(server.port, "router", "s3cret", 2);
    assert!(in_2.contains(&keys.spend) && in_2.contains(&keys.reservation), "{in_2:?}");
    assert_eq!(keys_in(server.port, "router", "s3cret", 0), Vec::<String>::new());
}

#[tokio::test]
async fn a_wrong_password_fails_every_call_without_saying_the_password() {
    let server = RedisServer::start();
    test_support::redis::RedisCluster::cli(server.port, &["CONFIG", "SET", "requirepass", "right"]).unwrap();
    let metrics = Metrics::new();
    let url = format!("redis://:wrong-pass@127.0.0.1:{}", server.port);
    let redis = RedisLimits::new(&RedisTarget::Single(url), Duration::from_millis(500), metrics.clone()).unwrap();
    let e = redis.connect().await.unwrap_err();
    assert!(e.contains("WRONGPASS") && !e.contains("wrong-pass"), "{e}");
    assert!(!redis.is_healthy());
    // A new connection is tried, and refused the same way.
    let e = redis.ping(Duration::from_millis(500)).await.unwrap_err();
    assert!(e.contains("WRONGPASS"), "{e}");
}

#[tokio::test]
async fn a_redis_that_never_answers_auth_is_given_up_on_and_connected_again() {
    let server = RedisServer::start();
    test_support::redis::RedisCluster::cli(server.port, &["CONFIG", "SET", "requirepass", "pw"]).unwrap();
    let proxy = test_support::proxy::Proxy::start(server.port).await;
    proxy.set_fault(test_support::proxy::Fault::BlackHole);
    let url = format!("redis://:pw@127.0.0.1:{}", proxy.port);
    let redis = RedisLimits::new(&RedisTarget::Single(url), Duration::from_millis(200), Metrics::new()).unwrap();
    // Connected, AUTH sent, no answer: the connection gives up (after its
    // 500 ms connect bound) rather than hold the ping for good.
    let e = redis.ping(Duration::from_secs(3)).await.unwrap_err();
    assert!(e.contains("AUTH"), "{e}");
    proxy.set_fault(test_support::proxy::Fault::None);
    redis.connect().await.unwrap();
}

#[tokio::test]
async fn redis_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let server = RedisServer::start_with_unix_socket(&socket);
    let url = format!("unix://{}", socket.display());
    let redis = RedisLimits::new(&RedisTarget::Single(url), Duration::from_millis(500), Metrics::new()).unwrap();
    redis.connect().await.unwrap();
    let (plan, keys) = budget_plan("over-unix");
    assert!(matches!(redis.admit(&keys, &plan, SystemTime::now()).await, Ok(Decision::Allowed { .. })));
    assert_eq!(calls(server.port, "evalsha"), 1, "the admission reached the server on the socket");
}

#[tokio::test]
async fn many_admissions_at_once_share_the_connection_and_each_gets_its_own_answer() {
    let server = RedisServer::start();
    let target = RedisTarget::Single(server.url());
    let redis = Arc::new(RedisLimits::new(&target, Duration::from_millis(2000), Metrics::new()).unwrap());
    redis.connect().await.unwrap();
    // 400 admissions in flight at once, each for an organization of its
    // own whose burst is i + 1: the first admission leaves i remaining, so
    // an answer handed to the wrong caller shows.
    let now = SystemTime::now();
    let admissions: Vec<_> = (0..400u32)
        .map(|i| {
            let redis = redis.clone();
            tokio::spawn(async move {
                let plan = Plan { rate: Some((1_000_000, i + 1)), budget: None, ..budget_plan("x").0 };
                let keys = Keys::new("test:", &format!("org-{i}"), &format!("r{i}"), &plan, now, None);
                (i, redis.admit(&keys, &plan, now).await.unwrap())
            })
        })
        .collect();
    for a in admissions {
        match a.await.unwrap() {
            (i, Decision::Allowed { rate: Some(info) }) => assert_eq!((info.limit, info.remaining), (i + 1, i)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(calls(server.port, "evalsha"), 400);
}

#[tokio::test]
async fn cost_prices_cached_tokens_and_falls_back_to_the_flat_cost() {
    let f = fixture(Store::Local, None, FailureMode::Local).await;
    let l = &f.limits;
    let price = Price {
        input_per_1k: 2.0,
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
    // 500 uncached × 2.0 + 300 × 0.1 + 200 × 2.0 + 500 × 4.0, per 1,000.
    assert!((l.cost(Some(price), Some(u)) - 3.43).abs() < 1e-9);
    let no_cache_prices = Price { cache_read_per_1k: None, cache_write_per_1k: None, ..price };
    assert!((l.cost(Some(no_cache_prices), Some(u)) - 4.0).abs() < 1e-9);
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
