//! Usage records to a real Kafka-protocol broker (tansu), through broker
//! outages, SIGTERM, SIGKILL, a full buffer and a damaged buffer file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use test_support::*;

fn with_kafka(b: RouterBuilder, broker: &Broker) -> RouterBuilder {
    b.env("KAFKA_BROKERS", &broker.bootstrap())
}

async fn wait_kafka(router: &Router, status: &str) {
    assert!(
        eventually(Duration::from_secs(15), || async { router.readiness().await["components"]["kafka"] == status })
            .await,
        "kafka never became {status}"
    );
}

async fn buffer_size(router: &Router) -> f64 {
    metric(&router.metrics().await, "api_router_buffer_store_size", &[])
}

/// Sends `n` requests with ids `{prefix}-{i}`, `concurrency` at a time; all must be 200.
async fn send_ids(router: &Router, prefix: &str, n: usize, concurrency: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in ids.chunks(concurrency) {
        let mut tasks = Vec::new();
        for id in chunk {
            let url = router.url("/v1/inference");
            let body = json!({"request_id": id, "model": "gpt-4o", "payload": "hi"}).to_string();
            tasks.push(tokio::spawn(
                async move { send(hyper::Method::POST, &url, &[("x-api-key", KEY_A)], body).await },
            ));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_give_a_thousand_records() {
    let broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = with_kafka(RouterBuilder::new(&[&m1]), &broker).env("INSTANCE_ID", "router-test-1").start();
    assert!(router.proc.lines().iter().any(|l| log_message(l).as_deref() == Some("Kafka publisher initialized")));
    wait_kafka(&router, "healthy").await;
    let ids = send_ids(&router, "thousand", 1000, 16).await;
    let msgs = consume(&broker, 1000, Duration::from_secs(30)).await;
    let keys = distinct_keys(&msgs);
    assert_eq!(keys.len(), 1000);
    assert_eq!(keys, ids.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(msgs.len(), 1000, "no duplicates without failures");
    for (key, record) in &msgs {
        assert_eq!(record["schema_version"], 3);
        assert_eq!(&record["request_id"], key);
        assert_eq!(record["organization_id"], "org-a");
        assert_eq!(record["model"], "gpt-4o");
        assert_eq!(record["backend_id"], "backend-1");
        assert_eq!(record["decision_type"], "PRIMARY");
        assert_eq!(record["attempts"], 1);
        assert_eq!(record["status"], 200);
        assert!(record["latency_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(record["prompt_tokens"], 12);
        assert_eq!(record["completion_tokens"], 9);
        assert_eq!(record["total_tokens"], 21);
        assert!(record["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(record["router_instance_id"], "router-test-1");
    }
    assert!(eventually(Duration::from_secs(5), || async { buffer_size(&router).await == 0.0 }).await);
    assert_eq!(
        metric(&router.metrics().await, "api_router_usage_records_published_total", &[("status", "success")]),
        1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_buffers_and_drains_without_a_manual_step() {
    let mut broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = with_kafka(RouterBuilder::new(&[&m1]), &broker).start();
    wait_kafka(&router, "healthy").await;
    let mut ids = send_ids(&router, "before", 1000, 16).await;

    broker.stop();
    wait_kafka(&router, "unhealthy").await;
    // Served normally during the outage.
    let t0 = Instant::now();
    ids.extend(send_ids(&router, "outage", 500, 16).await);
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(eventually(Duration::from_secs(10), || async { buffer_size(&router).await >= 500.0 }).await);
    let ready = router.readiness().await;
    assert_eq!(ready["components"]["kafka"], "unhealthy");
    assert_eq!(ready["status"], "degraded");
    let status = router.admin_get("/v1/admin/usage/buffer").await.json();
    assert!(status["size"].as_u64().unwrap() >= 500);
    assert!(status["last_error"].is_string());
    assert!(metric(&router.metrics().await, "api_router_buffer_store_age_seconds", &[]) > 0.0);

    broker.restart();
    wait_kafka(&router, "healthy").await;
    assert!(
        eventually(Duration::from_secs(30), || async { buffer_size(&router).await == 0.0 }).await,
        "buffer did not drain"
    );
    let msgs = consume(&broker, 1500, Duration::from_secs(30)).await;
    let keys = distinct_keys(&msgs);
    let want: HashSet<String> = ids.into_iter().collect();
    assert!(keys.is_superset(&want), "missing {:?}", want.difference(&keys).take(5).collect::<Vec<_>>());
    assert!(metric(&router.metrics().await, "api_router_buffer_store_retries_total", &[]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_an_outage_then_restart_loses_nothing() {
    let mut broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let mut router = with_kafka(RouterBuilder::new(&[&m1]), &broker).start();
    wait_kafka(&router, "healthy").await;
    broker.stop();
    wait_kafka(&router, "unhealthy").await;
    let ids = send_ids(&router, "term", 300, 8).await;
    router.restart();
    assert!(router.proc.lines().iter().any(|l| l.contains("usage buffer has records to retry")));
    assert_eq!(buffer_size(&router).await, 300.0);
    broker.restart();
    assert!(eventually(Duration::from_secs(30), || async { buffer_size(&router).await == 0.0 }).await);
    let keys = distinct_keys(&consume(&broker, 300, Duration::from_secs(30)).await);
    assert!(keys.is_superset(&ids.into_iter().collect()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_retry_skips_the_backoff() {
    let mut broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = with_kafka(RouterBuilder::new(&[&m1]), &broker).start();
    wait_kafka(&router, "healthy").await;
    broker.stop();
    wait_kafka(&router, "unhealthy").await;
    let ids = send_ids(&router, "retry", 20, 4).await;
    // Into the longest backoff (waits of 2.5 to 5 s): failed rounds of 0.1,
    // 0.2, 0.4, 0.8, 1.6 and 3.2 s first.
    let retries = || async { metric(&router.metrics().await, "api_router_buffer_store_retries_total", &[]) };
    assert!(eventually(Duration::from_secs(20), || async { retries().await >= 7.0 }).await);
    // Asked while the broker is still down: the drainer leaves its wait at
    // once (a retry endpoint that did nothing leaves no such line).
    let r = router.admin_post("/v1/admin/usage/buffer/retry", json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["retry"], "requested");
    let woken =
        || router.proc.lines().iter().any(|l| log_message(l).as_deref() == Some("usage delivery retried on request"));
    assert!(eventually(Duration::from_secs(10), || async { woken() }).await, "the retry did not wake the drainer");
    // With the broker back, a retry delivers everything.
    broker.restart();
    assert_eq!(router.admin_post("/v1/admin/usage/buffer/retry", json!({})).await.status, 200);
    assert!(eventually(Duration::from_secs(15), || async { buffer_size(&router).await == 0.0 }).await);
    let on_topic = distinct_keys(&consume(&broker, ids.len(), Duration::from_secs(20)).await);
    for id in &ids {
        assert!(on_topic.contains(id), "{id} is not on the topic");
    }
    // Without a token: 401, as every admin route.
    let r = send(hyper::Method::POST, &router.url("/v1/admin/usage/buffer/retry"), &[], "").await;
    r.assert_error(401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_refuses_with_503_and_service_resumes_as_it_drains() {
    let mut broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = with_kafka(RouterBuilder::new(&[&m1]), &broker).env("USAGE_BUFFER_MAX_RECORDS", "50").start();
    wait_kafka(&router, "healthy").await;
    broker.stop();
    wait_kafka(&router, "unhealthy").await;
    let ids = send_ids(&router, "cap", 50, 5).await;
    let before = m1.requests().await;
    let r = router.infer(KEY_A, json!({"model": "gpt-4o", "request_id": "over-cap"})).await;
    r.assert_error(503, "usage_buffer_full");
    assert_eq!(m1.requests().await, before, "refused before reaching a backend");
    assert_eq!(metric(&router.metrics().await, "api_router_usage_buffer_full_total", &[]), 1.0);
    broker.restart();
    assert!(eventually(Duration::from_secs(30), || async { buffer_size(&router).await == 0.0 }).await);
    assert_eq!(router.infer(KEY_A, json!({"model": "gpt-4o"})).await.status, 200);
    let keys = distinct_keys(&consume(&broker, 51, Duration::from_secs(30)).await);
    assert!(keys.is_superset(&ids.into_iter().collect()), "nothing dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loss_hunt_sigkill_under_load_loses_no_answered_record() {
    let broker = Broker::start();
    let m1 = Mock::start("backend-1", &[]);
    let router = with_kafka(RouterBuilder::new(&[&m1]), &broker).start();
    let (router, answered, cut_per_round) =
        kill_under_load(router, 10, || with_kafka(RouterBuilder::new(&[&m1]), &broker)).await;
    assert!(answered.len() > 100, "the load was too light to hunt: {}", answered.len());
    let rounds_cut = cut_per_round.iter().filter(|c| **c > 0).count();
    assert!(rounds_cut >= 7, "too few kills landed on requests in flight: {cut_per_round:?}");
    assert!(eventually(Duration::from_secs(30), || async { buffer_size(&router).await == 0.0 }).await);
    let msgs = consume(&broker, answered.len(), Duration::from_secs(60)).await;
    let keys = distinct_keys(&msgs);
    let lost: Vec<_> = answered.difference(&keys).take(10).collect();
    assert!(lost.is_empty(), "answered but not on the topic: {lost:?}");
    let duplicates = msgs.len() - keys.len();
    println!(
        "loss hunt: {} answered, {} on the topic, {} duplicates, requests cut per kill {cut_per_round:?}",
        answered.len(),
        keys.len(),
        duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_buffer_file_is_set_aside_and_intact_records_recovered() {
    let m1 = Mock::start("backend-1", &[]);
    // No broker: everything stays buffered.
    let port = free_port();
    let mut router = RouterBuilder::new(&[&m1]).env("KAFKA_BROKERS", &format!("127.0.0.1:{port}")).start();
    for i in 0..20 {
        assert_eq!(router.infer(KEY_A, json!({"model": "m", "request_id": format!("dmg-{i}")})).await.status, 200);
    }
    router.proc.signal("KILL");
    router.proc.wait_exit(Duration::from_secs(5)).unwrap();
    let dir = router.data_dir.join("usage-buffer");
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    bytes.truncate(bytes.len() - 7);
    std::fs::write(&seg, &bytes).unwrap();
    router = RouterBuilder::new(&[&m1])
        .env("KAFKA_BROKERS", &format!("127.0.0.1:{port}"))
        .data_dir(&router.data_dir.clone())
        .start_keeping(router);
    assert!(router.proc.lines().iter().any(|l| l.contains("damaged entries")));
    assert_eq!(metric(&router.metrics().await, "api_router_buffer_store_damaged_total", &[]), 2.0);
    // 20 written; one damaged in the middle, one torn at the end.
    assert_eq!(buffer_size(&router).await, 18.0);
    assert!(std::fs::read_dir(&dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".damaged-")));
    assert_eq!(router.infer(KEY_A, json!({"model": "m"})).await.status, 200, "starts and serves");
}
