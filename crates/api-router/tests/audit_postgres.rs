//! The shared audit store on a real PostgreSQL (a private server per test):
//! any replica answers a lookup, within a measured bound; organizations stay
//! apart; replicas starting together make one schema; PostgreSQL stopped
//! under load costs no request and no record; SIGKILL loses no record of an
//! answered request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use test_support::*;

fn with_pg(b: RouterBuilder, url: &str) -> RouterBuilder {
    b.env("AUDIT_DATABASE_URL", url)
}

async fn wait_audit_store(router: &Router, status: &str) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            router.readiness().await["components"]["audit_store"] == status
        })
        .await,
        "audit_store never became {status}: {}",
        router.readiness().await
    );
}

async fn lookup(router: &Router, id: &str, key: &str) -> Resp {
    send(Method::GET, &router.url(&format!("/v1/audit/requests/{id}")), &[("x-api-key", key)], "").await
}

async fn infer(router: &Router, id: &str) -> Resp {
    let body = json!({"request_id": id, "model": "m", "payload": "hi"}).to_string();
    send(Method::POST, &router.url("/v1/inference"), &[("x-api-key", KEY_A)], body).await
}

/// The request ids in the database.
fn ids_in(pg: &Postgres, db: &str) -> HashSet<String> {
    pg.psql(db, "SELECT request_id FROM audit_records").lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_answers_for_every_request_within_the_bound() {
    let pg = Postgres::start();
    let url = pg.create_database("shared");
    let m1 = Mock::start("backend-1", &[]);
    let a = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    let b = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    wait_audit_store(&a, "healthy").await;
    wait_audit_store(&b, "healthy").await;

    // Served by A, looked up on A at once: read-your-writes, no retry.
    for i in 0..20 {
        let id = format!("own-{i}");
        assert_eq!(infer(&a, &id).await.status, 200);
        let r = lookup(&a, &id, KEY_A).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["request_id"], id.as_str());
        assert_eq!(r.json()["organization_id"], "org-a");
    }

    // Served by A, looked up on B: how long until B sees it.
    let mut delays = Vec::new();
    for i in 0..100 {
        let id = format!("other-{i}");
        assert_eq!(infer(&a, &id).await.status, 200);
        let answered = Instant::now();
        loop {
            let r = lookup(&b, &id, KEY_A).await;
            if r.status == 200 {
                assert_eq!(r.json()["request_id"], id.as_str());
                break;
            }
            assert_eq!(r.status, 404, "{}", r.text());
            assert!(answered.elapsed() < Duration::from_secs(10), "{id} not visible on the other replica");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(answered.elapsed());
    }
    delays.sort();
    let p99 = delays[delays.len() * 99 / 100 - 1];
    println!("visibility on another replica: p50 {:?}, p99 {:?}, max {:?}", delays[50], p99, delays[99]);
    assert!(p99 < Duration::from_secs(2), "p99 {p99:?}: the documented bound is 1 s");

    // Another organization's key: the same 404 as an unknown id, on both.
    for r in [&a, &b] {
        lookup(r, "other-7", KEY_B).await.assert_error(404, "not_found");
        lookup(r, "never-sent", KEY_A).await.assert_error(404, "not_found");
        let admin = r.admin_get("/v1/audit/requests/other-7").await;
        assert_eq!(admin.status, 200);
        assert_eq!(admin.json()["organization_id"], "org-a");
    }
    assert_eq!(pg.psql("shared", "SELECT count(*) FROM audit_records"), "120");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_starting_at_once_make_one_schema() {
    let pg = Postgres::start();
    let url = pg.create_database("fresh");
    let m1 = Mock::start("backend-1", &[]);
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let b = with_pg(RouterBuilder::new(&[&m1]), &url);
            std::thread::spawn(move || b.start())
        })
        .collect();
    let routers: Vec<Router> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &routers {
        wait_audit_store(r, "healthy").await;
    }
    assert_eq!(pg.psql("fresh", "SELECT version FROM audit_schema_migrations"), "1");
    // Each serves, another answers.
    for (i, r) in routers.iter().enumerate() {
        let id = format!("start-{i}");
        assert_eq!(infer(r, &id).await.status, 200);
        let other = &routers[(i + 1) % 3];
        assert!(
            eventually(Duration::from_secs(5), || async { lookup(other, &id, KEY_A).await.status == 200 }).await,
            "{id} not found on another replica"
        );
    }
    for r in &routers {
        let errors: Vec<String> = r
            .proc
            .lines()
            .into_iter()
            .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("panicked"))
            .collect();
        assert!(errors.is_empty(), "errors at start-up: {errors:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_under_load_serves_throughout_and_drains_after() {
    let mut pg = Postgres::start();
    let url = pg.create_database("outage");
    let m1 = Mock::start("backend-1", &[]);
    let router = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    wait_audit_store(&router, "healthy").await;

    let mut answered = Vec::new();
    let mut send_some = async |prefix: &str, n: usize| {
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let r = infer(&router, &id).await;
            assert_eq!(r.status, 200, "served throughout: {}", r.text());
            answered.push(id);
        }
    };
    send_some("before", 50).await;
    pg.stop();
    send_some("during", 100).await;
    wait_audit_store(&router, "unhealthy").await;
    send_some("down", 100).await;
    let ready = send(Method::GET, &router.url("/v1/status/readyz"), &[], "").await;
    assert_eq!(ready.status, 503, "readiness reports the audit store");
    assert!(metric(&router.metrics().await, "api_router_audit_pending_records", &[]) > 0.0, "records wait");
    // A lookup cannot vouch for absence: 503, not 404.
    lookup(&router, "down-3", KEY_A).await.assert_error(503, "audit_store_unavailable");
    lookup(&router, "never-sent", KEY_A).await.assert_error(503, "audit_store_unavailable");

    pg.restart();
    wait_audit_store(&router, "healthy").await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(&router.metrics().await, "api_router_audit_pending_records", &[]) == 0.0
        })
        .await,
        "the journal drains"
    );
    let stored = ids_in(&pg, "outage");
    let lost: Vec<_> = answered.iter().filter(|id| !stored.contains(*id)).take(10).collect();
    assert!(lost.is_empty(), "answered during the outage but not stored: {lost:?}");
    assert_eq!(stored.len(), 250);
    let r = lookup(&router, "down-3", KEY_A).await;
    assert_eq!(r.status, 200, "{}", r.text());
    lookup(&router, "never-sent", KEY_A).await.assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loss_hunt_sigkill_under_load_loses_no_audit_record() {
    let pg = Postgres::start();
    let url = pg.create_database("hunt");
    let m1 = Mock::start("backend-1", &[]);
    let router = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    let (router, answered, cut_per_round) =
        kill_under_load(router, 6, || with_pg(RouterBuilder::new(&[&m1]), &url)).await;
    assert!(answered.len() > 100, "the load was too light to hunt: {}", answered.len());
    let rounds_cut = cut_per_round.iter().filter(|c| **c > 0).count();
    assert!(rounds_cut >= 4, "too few kills landed on requests in flight: {cut_per_round:?}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            metric(&router.metrics().await, "api_router_audit_pending_records", &[]) == 0.0
        })
        .await
    );
    let stored = ids_in(&pg, "hunt");
    let lost: Vec<_> = answered.difference(&stored).take(10).collect();
    assert!(lost.is_empty(), "answered but not in PostgreSQL: {lost:?}");
    println!(
        "audit loss hunt: {} answered, {} stored, requests cut per kill {cut_per_round:?}",
        answered.len(),
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_that_is_not_postgresql_stops_the_start_without_echoing_it() {
    let m1 = Mock::start("backend-1", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("api-router"))
        .env_clear()
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("BACKEND_ENDPOINTS", m1.endpoint())
        .env("DATA_DIR", tmp.path())
        .env("AUDIT_DATABASE_URL", "mysql://router:s3cret-pw@db/audit")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("AUDIT_DATABASE_URL"), "{text}");
    assert!(!text.contains("s3cret-pw"), "the password is echoed: {text}");
}

/// `make bench-audit` (release): the rate at which PostgreSQL takes a
/// backlog of journaled records, and how long a record served by one
/// replica takes to be visible on another while the first is under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: make bench-audit"]
async fn measure_audit_write_rate_and_visibility_under_load() {
    let mut pg = Postgres::start();
    let url = pg.create_database("bench");
    let m1 = Mock::start("backend-1", &[]);
    let a = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    let b = with_pg(RouterBuilder::new(&[&m1]), &url).start();
    wait_audit_store(&a, "healthy").await;

    // A backlog while PostgreSQL is down, then the time it takes to drain.
    pg.stop();
    let backlog = 20_000;
    let (_, failures) = load(&a, KEY_A, "m", backlog, 32).await;
    assert!(failures.is_empty(), "served while PostgreSQL is down");
    pg.restart();
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(120), || async {
            metric(&a.metrics().await, "api_router_audit_pending_records", &[]) == 0.0
        })
        .await
    );
    let drain = started.elapsed();
    println!(
        "backlog of {backlog} records drained in {drain:?}: {:.0} records/s (includes reconnecting, up to 2 s of backoff)",
        backlog as f64 / drain.as_secs_f64()
    );

    // Visibility on B while A serves steady load.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..8 {
        let (url, stop) = (a.url("/v1/inference"), stop.clone());
        loaders.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = send(Method::POST, &url, &[("x-api-key", KEY_A)], r#"{"model":"m"}"#).await;
                assert_eq!(r.status, 200);
                n += 1;
            }
            n
        }));
    }
    let load_started = Instant::now();
    let mut delays = Vec::new();
    for i in 0..200 {
        let id = format!("visible-{i}");
        assert_eq!(infer(&a, &id).await.status, 200);
        let answered = Instant::now();
        while lookup(&b, &id, KEY_A).await.status != 200 {
            assert!(answered.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(answered.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for l in loaders {
        served += l.await.unwrap();
    }
    let rate = served as f64 / load_started.elapsed().as_secs_f64();
    delays.sort();
    println!(
        "visibility on another replica at {rate:.0} requests/s: p50 {:?}, p99 {:?}, max {:?} ({} samples)",
        delays[delays.len() / 2],
        delays[delays.len() * 99 / 100 - 1],
        delays[delays.len() - 1],
        delays.len()
    );
}
