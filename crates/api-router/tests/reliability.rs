//! Failing dependencies under steady load, each through a TCP fault proxy:
//! Redis, the Kafka broker, etcd and a backend, each with latency, a stall, a
//! reset of every connection, a black hole and a slow trickle; and three
//! replicas sharing Redis, etcd and the broker, one of them killed with
//! SIGKILL and restarted twice.
//!
//! For each: the answers stay within what the settings promise (served under
//! the failure mode, or a documented error), no request waits past its bound,
//! no usage record of an answered request is lost, limits are exact again
//! after recovery, and readiness shows the fault and clears after it.
//!
//! `make test` runs the short version (2 s faults). `make reliability` runs
//! them longer (`RELIABILITY_FAULT_SECS`) in a release build and writes each
//! scenario's row to `RELIABILITY_REPORT` for `docs/reliability.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use test_support::*;

/// How long each fault lasts.
fn fault_time() -> Duration {
    let secs = std::env::var("RELIABILITY_FAULT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4.0);
    Duration::from_secs_f64(secs)
}

/// Requests a second, across every router.
fn rate() -> u64 {
    std::env::var("RELIABILITY_RPS").ok().and_then(|s| s.parse().ok()).unwrap_or(40)
}

const FAULTS: [(&str, Fault); 5] = [
    ("latency 40 ms", Fault::Latency(Duration::from_millis(40))),
    ("stall", Fault::Stall),
    ("reset", Fault::None),
    ("black hole", Fault::BlackHole),
    ("trickle 200 B/s", Fault::Trickle(200)),
];

/// Applies fault `i` of [`FAULTS`] ("reset" resets every connection once).
fn apply(proxy: &Proxy, name: &str, fault: Fault) {
    if name == "reset" {
        proxy.reset_all();
    } else {
        proxy.set_fault(fault);
    }
}

/// One request of the steady load.
#[derive(Debug, Clone)]
struct Sample {
    id: String,
    /// Which of the load's routers it was sent to.
    router: usize,
    /// 0: no answer (refused, reset, or none within 30 s).
    status: u16,
    latency: Duration,
}

/// A steady load over some routers, each request with its own id.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

fn start_load(urls: Vec<String>, prefix: &str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let urls = Arc::new(urls);
    let workers = 8;
    let per_worker = Duration::from_secs_f64(workers as f64 / rate() as f64);
    let tasks = (0..workers)
        .map(|_| {
            let (stop, next, urls, prefix) = (stop.clone(), next.clone(), urls.clone(), prefix.to_string());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(per_worker);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let router = n as usize % urls.len();
                    let id = format!("{prefix}-{n}");
                    let body = json!({"model": "gpt-4o", "request_id": id, "payload": "hi"}).to_string();
                    let t0 = Instant::now();
                    let url = format!("{}/v1/inference", urls[router]);
                    let r = try_send(Method::POST, &url, &[("x-api-key", KEY_A)], body, Duration::from_secs(30)).await;
                    let status = r.map(|r| r.status.as_u16()).unwrap_or(0);
                    samples.push(Sample { id, router, status, latency: t0.elapsed() });
                }
                samples
            })
        })
        .collect();
    Load { stop, tasks }
}

impl Load {
    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

/// What one scenario showed: a row of `docs/reliability.md`.
struct Row {
    dependency: &'static str,
    fault: String,
    done: String,
    seen: String,
    lost: String,
}

impl Row {
    fn report(&self) {
        let line = json!({"dependency": self.dependency, "fault": self.fault, "done": self.done,
            "seen": self.seen, "lost": self.lost});
        println!("RELIABILITY {line}");
        if let Ok(path) = std::env::var("RELIABILITY_REPORT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{line}").unwrap();
        }
    }
}

/// Counts by status, and latency percentiles, of `samples`.
fn describe(samples: &[Sample]) -> String {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for s in samples {
        *by_status.entry(s.status).or_default() += 1;
    }
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    lat.sort();
    let at = |q: f64| lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default();
    let statuses: Vec<String> = by_status
        .iter()
        .map(|(s, n)| if *s == 0 { format!("{n} × no answer") } else { format!("{n} × {s}") })
        .collect();
    format!(
        "{} requests: {}; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        samples.len(),
        statuses.join(", "),
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    )
}

/// Every answered request's usage record on the topic, after recovery;
/// returns how many are missing. `seen` counts the distinct records the
/// topic already held (earlier rounds on the same broker), and grows.
async fn usage_lost(broker: &Broker, samples: &[Sample], seen: &mut usize) -> usize {
    let answered: HashSet<String> = samples.iter().filter(|s| s.status == 200).map(|s| s.id.clone()).collect();
    let found = distinct_keys(&consume(broker, *seen + answered.len(), Duration::from_secs(90)).await);
    *seen = found.len();
    answered.difference(&found).count()
}

async fn component(router: &Router, name: &str) -> String {
    router.readiness().await["components"][name].as_str().unwrap_or_default().to_string()
}

async fn wait_component(router: &Router, name: &str, want: &str, within: Duration) -> bool {
    eventually(within, || async { component(router, name).await == want }).await
}

/// What was done, for the report.
fn done_text(dependency: &str, name: &str) -> String {
    let what = if name == "reset" {
        format!("every connection between router and {dependency} reset (RST) once")
    } else {
        format!("{name} between router and {dependency} for {:.0} s", fault_time().as_secs_f64())
    };
    format!("{what}, under {} requests/s, then recovery", rate())
}

/// The readiness component `name` while the fault that [`under_load`]
/// applies lasts: `unhealthy` if it said so at any time (polled every
/// 100 ms), else what it said last.
async fn during_fault(router: &Router, name: &str) -> String {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now() + fault_time();
    let mut last = String::new();
    while Instant::now() < end {
        last = component(router, name).await;
        if last == "unhealthy" {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Fault `name` on `proxy` for [`fault_time`] under load, then recovery
/// under load; the samples of the whole run.
async fn under_load(proxy: &Proxy, urls: &[String], dependency: &str, name: &str, fault: Fault) -> Vec<Sample> {
    let prefix = format!("{dependency}-{}-{}", name.replace([' ', '/'], "_"), fastrand::u32(..));
    let load = start_load(urls.to_vec(), &prefix);
    tokio::time::sleep(Duration::from_millis(500)).await;
    apply(proxy, name, fault);
    tokio::time::sleep(fault_time()).await;
    proxy.set_fault(Fault::None);
    tokio::time::sleep(fault_time().max(Duration::from_secs(3))).await;
    load.finish().await
}

/// Exactly `n` of a burst of 30 from org-b are admitted, with its quota
/// raised by `n` first: limits are exact (shared, not per replica).
async fn assert_exact(routers: &[&Router], n: u64, total: u64) {
    let quota = json!({"quota": {"requests": total, "period": "daily"}});
    for r in routers {
        assert_eq!(r.admin_put("/v1/admin/organizations/org-b/limits", quota.clone()).await.status, 200);
    }
    let resps = burst(routers, KEY_B, "gpt-4o", 30).await;
    assert_eq!(count_status(&resps, 200) as u64, n, "{:?}", resps.iter().map(|r| r.status).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_faults_under_load() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let mut on_topic = 0;
    let broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1])
        .env("REDIS_URL", &format!("redis://127.0.0.1:{}", proxy.port))
        .env("KAFKA_BROKERS", &broker.bootstrap())
        // Every request goes through Redis (rate limit and budget), none is limited.
        .env("RATE_LIMIT_DEFAULT_RPS", "10000")
        .env("RATE_LIMIT_BURST_SIZE", "10000")
        .start();
    let budget = json!({"budget": {"amount": 1000000, "period": "daily"}});
    assert_eq!(router.admin_put("/v1/admin/organizations/org-a/limits", budget).await.status, 200);
    let urls = vec![router.url("")];
    for (round, (name, fault)) in FAULTS.into_iter().enumerate() {
        let degraded_before = metric_or_zero(&router.metrics().await, "api_router_limits_degraded_total", &[]);
        let (samples, during) =
            tokio::join!(under_load(&proxy, &urls, "redis", name, fault), during_fault(&router, "redis"));
        // Served under RATE_LIMIT_FAILURE_MODE=local: never an error.
        assert!(samples.iter().all(|s| s.status == 200), "{name}: {}", describe(&samples));
        // Nobody waits much past REDIS_TIMEOUT_MS (250 ms).
        let worst = samples.iter().map(|s| s.latency).max().unwrap();
        assert!(worst < Duration::from_millis(1500), "{name}: a request waited {worst:?}");
        if matches!(fault, Fault::Stall | Fault::BlackHole) {
            assert_eq!(during, "unhealthy", "{name}: readiness did not show the fault");
        }
        if name.starts_with("latency") {
            assert_eq!(during, "healthy", "a slow Redis is not a Redis that is down");
        }
        assert!(
            wait_component(&router, "redis", "healthy", Duration::from_secs(10)).await,
            "{name}: not healthy again"
        );
        assert_exact(&[&router], 10, 10 * (round as u64 + 1)).await;
        let lost = usage_lost(&broker, &samples, &mut on_topic).await;
        assert_eq!(lost, 0, "{name}: usage records lost");
        let degraded =
            metric_or_zero(&router.metrics().await, "api_router_limits_degraded_total", &[]) - degraded_before;
        Row {
            dependency: "Redis",
            fault: name.into(),
            done: done_text("Redis", name),
            seen: format!("{}; readiness during: redis {during}", describe(&samples)),
            lost: format!(
                "0 usage records; {degraded} admitted under RATE_LIMIT_FAILURE_MODE=local; limits exact again after"
            ),
        }
        .report();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_faults_under_load() {
    let mut on_topic = 0;
    let (mut broker, proxy) = Broker::start_behind_proxy().await;
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).env("KAFKA_BROKERS", &broker.bootstrap()).start();
    assert!(wait_component(&router, "kafka", "healthy", Duration::from_secs(15)).await);
    let urls = vec![router.url("")];
    for (name, fault) in FAULTS {
        let (samples, during) =
            tokio::join!(under_load(&proxy, &urls, "kafka", name, fault), during_fault(&router, "kafka"));
        // The write-ahead buffer takes every record: the broker's state
        // never reaches the client.
        assert!(samples.iter().all(|s| s.status == 200), "{name}: {}", describe(&samples));
        let worst = samples.iter().map(|s| s.latency).max().unwrap();
        assert!(worst < Duration::from_millis(1000), "{name}: a request waited {worst:?}");
        if matches!(fault, Fault::Stall | Fault::BlackHole) {
            assert_eq!(during, "unhealthy", "{name}: readiness did not show the fault");
        }
        // tansu 0.6's storage task can stop after a long stall under load
        // ("UnableToSend" on every request): a broker fault, not the
        // router's. The operator's remedy is a broker restart; the router
        // must then deliver everything it kept.
        let mut broker_restarted = false;
        if !wait_component(&router, "kafka", "healthy", Duration::from_secs(20)).await
            && broker.lines().iter().any(|l| l.contains("UnableToSend"))
        {
            broker.restart();
            broker_restarted = true;
        }
        let healthy = wait_component(&router, "kafka", "healthy", Duration::from_secs(30)).await;
        let said: Vec<String> =
            router.proc.lines().into_iter().filter(|l| l.to_lowercase().contains("kafka")).collect();
        assert!(healthy, "{name}: not healthy again; the router said:\n{}", said.join("\n"));
        let lost = usage_lost(&broker, &samples, &mut on_topic).await;
        let buffer = router.admin_get("/v1/admin/usage/buffer").await.text();
        let broker_said: Vec<String> = broker.lines().into_iter().filter(|l| !l.contains(" INFO ")).take(20).collect();
        assert_eq!(lost, 0, "{name}: usage records lost; buffer {buffer}; broker:\n{}", broker_said.join("\n"));
        let restarted = if broker_restarted {
            "; the broker (tansu) stopped storing after the fault and was restarted"
        } else {
            ""
        };
        Row {
            dependency: "Kafka",
            fault: name.into(),
            done: done_text("the broker", name),
            seen: format!("{}; readiness during: kafka {during}", describe(&samples)),
            lost: format!("0 usage records (every answered request's record on the topic after recovery){restarted}"),
        }
        .report();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_faults_under_load() {
    let etcd = Etcd::start();
    let proxy = Proxy::start(etcd.port).await;
    let mut on_topic = 0;
    let broker = Broker::start();
    let (m1, m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let router = RouterBuilder::new(&[&m1, &m2])
        .env("CONFIG_SERVICE_ENDPOINTS", &proxy.endpoint())
        .env("KAFKA_BROKERS", &broker.bootstrap())
        .start();
    assert!(wait_component(&router, "config_service", "healthy", Duration::from_secs(15)).await);
    let urls = vec![router.url("")];
    for (round, (name, fault)) in FAULTS.into_iter().enumerate() {
        // During the fault: a policy written straight to etcd (as another
        // replica's admin write would be), and an admin write here.
        let weights =
            if round % 2 == 0 { [("backend-1", 1), ("backend-2", 0)] } else { [("backend-1", 0), ("backend-2", 1)] };
        let want = policy("org-a", "gpt-4o", &weights, 3);
        let writes = async {
            tokio::time::sleep(Duration::from_millis(500) + fault_time() / 2).await;
            etcd.put("/api-router/policies/org-a/gpt-4o", &want.to_string());
            let other = policy("org-b", "gpt-4o", &[("backend-1", 1)], 3);
            router.admin_post("/v1/admin/routing/policies", other).await.status.as_u16()
        };
        let (samples, during, admin) = tokio::join!(
            under_load(&proxy, &urls, "etcd", name, fault),
            during_fault(&router, "config_service"),
            writes
        );
        // Served from the last applied state throughout.
        assert!(samples.iter().all(|s| s.status == 200), "{name}: {}", describe(&samples));
        let worst = samples.iter().map(|s| s.latency).max().unwrap();
        assert!(worst < Duration::from_millis(1000), "{name}: a request waited {worst:?}");
        if matches!(fault, Fault::Stall | Fault::BlackHole) {
            assert_eq!(during, "unhealthy", "{name}: readiness did not show the fault");
            assert_eq!(admin, 503, "{name}: an admin write must be refused while etcd is unreachable");
        }
        assert!(
            wait_component(&router, "config_service", "healthy", Duration::from_secs(30)).await,
            "{name}: not healthy again"
        );
        // The write made during the fault is applied after it.
        let applied = eventually(Duration::from_secs(10), || async {
            router.admin_get("/v1/admin/routing/policies/org-a/gpt-4o").await.json() == want
        })
        .await;
        assert!(applied, "{name}: the policy written during the fault was not applied after");
        assert_eq!(usage_lost(&broker, &samples, &mut on_topic).await, 0, "{name}: usage records lost");
        Row {
            dependency: "etcd",
            fault: name.into(),
            done: format!("{}; a policy put to etcd and an admin write during it", done_text("etcd", name)),
            seen: format!("{}; readiness during: config_service {during}; admin write: {admin}", describe(&samples)),
            lost: "0 usage records; the policy written during the fault applied after it".into(),
        }
        .report();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_faults_under_load() {
    let mut on_topic = 0;
    let broker = Broker::start();
    let (m1, m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let proxy = Proxy::start(m1.addr.port()).await;
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &format!("backend-1=http://127.0.0.1:{},{}", proxy.port, m2.endpoint()))
        .env("BACKEND_TIMEOUT_MS", "1000")
        .env("HEALTH_CHECK_INTERVAL_MS", "500")
        .env("HEALTH_CHECK_TIMEOUT_MS", "300")
        .env("KAFKA_BROKERS", &broker.bootstrap())
        .start();
    let p = policy("org-a", "gpt-4o", &[("backend-1", 1), ("backend-2", 1)], 3);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    let urls = vec![router.url("")];
    for (name, fault) in FAULTS {
        let status_during = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let end = Instant::now() + fault_time();
            let mut last = String::new();
            while Instant::now() < end && last != "unhealthy" {
                last = router.backend_status("backend-1").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last
        };
        let (samples, during) = tokio::join!(under_load(&proxy, &urls, "backend", name, fault), status_during);
        // Failed over to backend-2: every request answered.
        assert!(samples.iter().all(|s| s.status == 200), "{name}: {}", describe(&samples));
        // At most one attempt's timeout (1 s) before the failover.
        let worst = samples.iter().map(|s| s.latency).max().unwrap();
        assert!(worst < Duration::from_millis(2500), "{name}: a request waited {worst:?}");
        if matches!(fault, Fault::Stall | Fault::BlackHole | Fault::Trickle(_)) {
            assert_eq!(during, "unhealthy", "{name}: the backend's health did not show the fault");
        }
        assert!(
            eventually(Duration::from_secs(10), || async { router.backend_status("backend-1").await == "healthy" })
                .await,
            "{name}: backend-1 not healthy again"
        );
        assert_eq!(usage_lost(&broker, &samples, &mut on_topic).await, 0, "{name}: usage records lost");
        Row {
            dependency: "backend",
            fault: name.into(),
            done: format!("{} (one of two backends, 50/50)", done_text("backend-1", name)),
            seen: format!("{}; backend-1 during: {during}", describe(&samples)),
            lost: "0 usage records; failed over, backend-1 readmitted after".into(),
        }
        .report();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_one_killed_twice_under_load() {
    let redis = RedisServer::start();
    let etcd = Etcd::start();
    let mut on_topic = 0;
    let broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("router.yaml");
    // 0.03 a request: a budget of 4.50 is 150 requests, fewer than the load sends.
    std::fs::write(&config, "prices:\n  gpt-4o: {input_per_1k: 1.0, output_per_1k: 2.0, request_cost: 0.03}\n")
        .unwrap();
    let mut routers: Vec<Router> = (0..3)
        .map(|_| {
            RouterBuilder::new(&[&m1])
                .env("HTTP_ADDR", &format!("127.0.0.1:{}", free_port()))
                .env("REDIS_URL", &redis.url())
                .env("REDIS_TIMEOUT_MS", "2000")
                .env("CONFIG_SERVICE_ENDPOINTS", &etcd.endpoint())
                .env("KAFKA_BROKERS", &broker.bootstrap())
                .env("ROUTER_CONFIG", config.to_str().unwrap())
                .start()
        })
        .collect();
    let limits = json!({"budget": {"amount": 4.5, "period": "daily"}});
    assert_eq!(routers[0].admin_put("/v1/admin/organizations/org-a/limits", limits).await.status, 200);
    for r in &routers {
        assert!(
            eventually(Duration::from_secs(5), || async {
                r.admin_get("/v1/admin/organizations/org-a/limits").await.json()["budget"]["amount"] == 4.5
            })
            .await
        );
    }
    let urls: Vec<String> = routers.iter().map(|r| r.url("")).collect();
    let run = fault_time() * 2;
    let load = start_load(urls, &format!("kill-{}", fastrand::u32(..)));
    for _ in 0..2 {
        tokio::time::sleep(run / 2).await;
        routers[1].crash();
        tokio::time::sleep(Duration::from_millis(500)).await;
        routers[1].respawn();
    }
    tokio::time::sleep(run / 2).await;
    let samples = load.finish().await;

    // Only answers (or no answer from the dead replica); never a 5xx.
    for s in &samples {
        assert!(matches!(s.status, 200 | 402 | 0), "{s:?}");
        assert!(s.status != 0 || s.router == 1, "only the killed replica went unanswered: {s:?}");
    }
    let answered: Vec<&Sample> = samples.iter().filter(|s| s.status == 200).collect();
    // The budget across replicas is not overshot.
    assert!(answered.len() <= 150, "{} admitted against a budget of 150", answered.len());
    // Every answered request is in the audit store of the replica that answered.
    let mut missing_audit = 0;
    for s in &answered {
        let url = routers[s.router].url(&format!("/v1/audit/requests/{}", s.id));
        let (status, _) = get_json(&url, &[("x-api-key", KEY_A)]).await;
        if status != 200 {
            missing_audit += 1;
        }
    }
    assert_eq!(missing_audit, 0, "answered requests missing from their replica's audit store");
    let lost = usage_lost(&broker, &samples, &mut on_topic).await;
    assert_eq!(lost, 0, "usage records lost");
    Row {
        dependency: "replica",
        fault: "SIGKILL ×2".into(),
        done: format!(
            "3 replicas sharing Redis, etcd and the broker under {} requests/s for {:.0} s; one killed with SIGKILL and restarted, twice; budget 150 requests",
            rate(),
            run.as_secs_f64() * 1.5
        ),
        seen: describe(&samples),
        lost: format!("0 usage records, 0 audit records; {} admitted of a budget of 150", answered.len()),
    }
    .report();
}

/// The p99 latency of `samples`.
fn p99(samples: &[Sample]) -> Duration {
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    lat.sort();
    lat.get(((lat.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
}

/// Normal traffic for [`fault_time`] while `attack` runs; the samples.
async fn normal_traffic_during<F: std::future::Future<Output = ()>>(
    router: &Router,
    prefix: &str,
    attack: F,
) -> Vec<Sample> {
    let load = start_load(vec![router.url("")], prefix);
    tokio::select! {
        _ = attack => {}
        _ = tokio::time::sleep(fault_time()) => {}
    }
    load.finish().await
}

/// Slow headers, slow bodies and a connection flood against one router
/// while it serves normal traffic: the normal traffic's p99 against its
/// quiet value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_while_serving() {
    use tokio::io::AsyncWriteExt;
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1])
        .env("HTTP_HEADER_READ_TIMEOUT_MS", "2000")
        .env("HTTP_BODY_READ_TIMEOUT_MS", "2000")
        .env("HTTP_MAX_CONNECTIONS", "400")
        .start();
    let quiet = normal_traffic_during(&router, "quiet", std::future::pending()).await;
    let quiet_p99 = p99(&quiet);
    let addr = router.addr;
    // 300 clients sending their headers a byte a second, 100 sending a body so.
    let slow = async move {
        let mut tasks = Vec::new();
        for i in 0..400 {
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return };
                let head: &[u8] = if i < 300 {
                    b"GET /v1/status/healthz HTTP/1.1\r\n"
                } else {
                    b"POST /v1/inference HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n"
                };
                if s.write_all(head).await.is_err() {
                    return;
                }
                while s.write_all(b"x").await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        std::future::pending::<()>().await;
    };
    let during = normal_traffic_during(&router, "slowloris", slow).await;
    assert!(during.iter().all(|s| s.status == 200), "{}", describe(&during));
    let closed = metric_or_zero(
        &router.metrics().await,
        "api_router_http_connections_closed_total",
        &[("reason", "header_timeout")],
    );
    Row {
        dependency: "clients",
        fault: "slow headers and bodies".into(),
        done: format!(
            "300 connections sending headers a byte a second and 100 sending a body so, for {:.0} s, beside {} requests/s of normal traffic (header and body timeouts 2 s)",
            fault_time().as_secs_f64(),
            rate()
        ),
        seen: format!(
            "normal traffic: {}; p99 {:.1} ms quiet, {:.1} ms during ({:.1}×); {closed} slow connections closed at the header timeout",
            describe(&during),
            quiet_p99.as_secs_f64() * 1000.0,
            p99(&during).as_secs_f64() * 1000.0,
            p99(&during).as_secs_f64() / quiet_p99.as_secs_f64().max(1e-6)
        ),
        lost: "0: every normal request answered 200".into(),
    }
    .report();

    // A flood of idle connections past the cap.
    let flood = async move {
        let mut held = Vec::new();
        for _ in 0..1000 {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                held.push(s);
            }
        }
        std::future::pending::<()>().await;
        drop(held);
    };
    let during = normal_traffic_during(&router, "flood", flood).await;
    let refused = metric_or_zero(&router.metrics().await, "api_router_http_connections_refused_total", &[]);
    Row {
        dependency: "clients",
        fault: "connection flood".into(),
        done: format!("1,000 idle connections against HTTP_MAX_CONNECTIONS=400, beside {} requests/s of normal traffic on kept-alive connections", rate()),
        seen: format!(
            "normal traffic: {}; p99 {:.1} ms quiet, {:.1} ms during; {refused} connections refused at the cap",
            describe(&during),
            quiet_p99.as_secs_f64() * 1000.0,
            p99(&during).as_secs_f64() * 1000.0
        ),
        lost: format!("{} normal requests unanswered", during.iter().filter(|s| s.status != 200).count()),
    }
    .report();
}
