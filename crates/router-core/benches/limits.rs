//! What one admission check (rate limit + budget reservation) costs on the
//! request path, with Redis on loopback and in process, and how many Redis
//! round trips it takes. Starts its own `redis-server` on a free port.
//!
//! Run with `cargo bench --bench limits` (part of `make bench`).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use router_core::limits::local::Ledger;
use router_core::limits::period::Period;
use router_core::limits::redis::RedisLimits;
use router_core::limits::{AdmitRequest, Budget, FailureMode, LimitSettings, Limits, OrgLimits, RateLimit};
use router_core::metrics::Metrics;
use router_providers::transport::Transports;

const N: usize = 20_000;

fn settings(redis_url: Option<String>) -> LimitSettings {
    LimitSettings {
        default_rate: Some(RateLimit { requests_per_second: 1e8, burst: 1_000_000 }),
        failure_mode: FailureMode::Local,
        redis: redis_url.map(router_core::limits::redis::RedisTarget::Single),
        redis_timeout: Duration::from_millis(20),
        redis_prefix: "bench:".into(),
        default_request_cost: 0.0001,
        estimated_tokens: 0,
        budget_service: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs N admissions; returns the reservations, settled by the caller.
async fn run(name: &str, limits: &Limits) -> Vec<router_core::limits::Reservation> {
    let org: Arc<str> = Arc::from("org-bench");
    let org_limits =
        OrgLimits { rate_limit: None, budget: Some(Budget { amount: 1e12, period: Period::Monthly }), quota: None };
    let mut samples = Vec::with_capacity(N);
    let mut held = Vec::with_capacity(N);
    for i in 0..N {
        let rid: Arc<str> = Arc::from(format!("r-{i}").as_str());
        let req = AdmitRequest {
            org: &org,
            request_id: &rid,
            model: "m",
            limits: Some(org_limits),
            price: None,
            billable: true,
            key: None,
        };
        let t0 = Instant::now();
        let admission = limits.admit(&req).await;
        samples.push(t0.elapsed());
        match admission {
            Ok(a) => held.extend(a.reservation),
            Err(e) => panic!("{name}: admission refused: {e:?}"),
        }
    }
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("{name:<28} median {:>8.1} µs   p99 {:>8.1} µs", p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6);
    held
}

fn script_calls(port: u16) -> u64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "INFO", "commandstats"]).output();
    let Ok(out) = out else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(16379);
    let mut redis = match Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("limits bench skipped: cannot start redis-server: {e}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let metrics = Metrics::new();
        let transport = Transports::new(Default::default()).unwrap_or_else(|e| panic!("{e}")).default_transport();
        let url = format!("redis://127.0.0.1:{port}");
        let redis_limits = RedisLimits::new(&router_core::limits::redis::RedisTarget::Single(url.clone()), Duration::from_millis(20), metrics.clone()).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = redis_limits.connect().await {
            assert!(Instant::now() < deadline, "redis-server did not come up: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ledger = Arc::new(Ledger::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
        let with_redis = Arc::new(Limits::new(settings(Some(url)), ledger.clone(), Some(Arc::new(redis_limits)), transport.clone(), metrics.clone()));
        let settler = tokio::spawn(with_redis.clone().run_settler(tokio_util::sync::CancellationToken::new()));
        let local = Limits::new(settings(None), ledger, None, transport, metrics);

        println!("admission check (rate limit + budget reservation), {N} sequential requests");
        let before = script_calls(port);
        let held = run("redis (loopback)", &with_redis).await;
        let admits = script_calls(port) - before;
        for r in held {
            with_redis.finish(r, Some(None));
        }
        for r in run("in process", &local).await {
            local.finish(r, Some(None));
        }
        // Settlements run on the settler; let them land before counting.
        let deadline = Instant::now() + Duration::from_secs(30);
        while script_calls(port) - before < 2 * N as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let total = script_calls(port) - before;
        println!(
            "redis round trips per request: {:.2} on the request path (admission), {:.2} in all (admission + settlement)",
            admits as f64 / N as f64,
            total as f64 / N as f64
        );
        settler.abort();
    });
    let _ = redis.kill();
    let _ = redis.wait();
}
