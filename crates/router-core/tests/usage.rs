//! The usage buffer and its publisher against a real Kafka-protocol broker
//! (a private tansu): every record written ahead reaches the topic once the
//! broker answers, in order, and leaves the buffer only then; a broker that
//! goes away holds records back (retries counted, health down) until it is
//! back; an operator's retry skips the backoff; a full buffer refuses or
//! bypasses as its policy says. End to end through the router:
//! `api-router/tests/usage.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use router_core::metrics::Metrics;
use router_core::readiness::Healthy;
use router_core::usage::publisher::{DEFAULT_LINGER, Publisher};
use router_core::usage::*;
use test_support::{Broker, TOPIC, consume, distinct_keys, eventually};
use tokio_util::sync::CancellationToken;

fn settings(max_records: u64, full_policy: FullPolicy) -> UsageSettings {
    UsageSettings {
        brokers: Some("unused".into()),
        topic: TOPIC.into(),
        max_records,
        full_policy,
        fsync: Fsync::Never,
        linger: DEFAULT_LINGER,
    }
}

fn record(id: &str) -> UsageRecord {
    UsageRecord {
        schema_version: SCHEMA_VERSION,
        request_id: Arc::from(id),
        organization_id: Arc::from("org-a"),
        key_id: None,
        model: Arc::from("m"),
        served_model: None,
        backend_id: Some(Arc::from("backend-1")),
        decision_type: None,
        attempts: 1,
        status: 200,
        error: None,
        latency_ms: 1.0,
        prompt_tokens: Some(3),
        completion_tokens: Some(4),
        total_tokens: Some(7),
        cache_read_tokens: None,
        cache_write_tokens: None,
        cost: Some(0.01),
        timestamp: SystemTime::now(),
        router_instance_id: Arc::from("test"),
    }
}

/// The sink, its shared state and a publisher to `broker`, with the health
/// check and the drainer running until `cancel`.
struct Running {
    sink: UsageSink,
    shared: Arc<Shared>,
    publisher: Arc<Publisher>,
    metrics: Metrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
    dir: tempfile::TempDir,
}

fn start(broker: &Broker, max_records: u64, policy: FullPolicy) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let (sink, shared) = UsageSink::open(dir.path(), settings(max_records, policy), metrics.clone()).unwrap();
    let publisher = Arc::new(Publisher::new(&broker.bootstrap(), TOPIC, "router-core-test", DEFAULT_LINGER).unwrap());
    let cancel = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(publisher.clone().run_health(cancel.clone())),
        tokio::spawn(publisher.clone().run_drainer(shared.clone(), cancel.clone())),
    ];
    Running { sink, shared, publisher, metrics, tasks, cancel, dir }
}

impl Running {
    /// Stops the tasks and drops the sink; the buffer's directory is
    /// returned, to open again.
    async fn stop(self) -> tempfile::TempDir {
        self.cancel.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.dir
    }
}

async fn until(what: &str, secs: u64, cond: impl Fn() -> bool) {
    assert!(eventually(Duration::from_secs(secs), || async { cond() }).await, "{what}: not within {secs} s");
}

fn published(m: &Metrics, outcome: &str) -> u64 {
    m.usage_published.with_label_values(&[outcome]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_topic_in_order_and_leaves_the_buffer_only_then() {
    let broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let r = start(&broker, 10_000, FullPolicy::Reject);
    until("the broker is seen healthy", 30, || r.publisher.is_healthy()).await;
    let ids: Vec<String> = (0..2_500).map(|i| format!("u-{i:05}")).collect();
    for id in &ids {
        r.sink.record(&record(id)).await.unwrap();
    }
    until("every record delivered", 60, || r.shared.pending.load(Ordering::Relaxed) == 0).await;
    assert_eq!(published(&r.metrics, "success"), 2_500, "more than one batch, each delivered once");
    assert_eq!(r.shared.lock().pending(), 0);
    let msgs = consume(&broker, ids.len(), Duration::from_secs(30)).await;
    let keys: Vec<&str> = msgs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ids.iter().map(String::as_str).collect::<Vec<_>>(), "each once, in the order written");
    assert_eq!(msgs[0].1["organization_id"], "org-a");
    assert_eq!(msgs[0].1["total_tokens"], 7);
    assert!(r.publisher.last_error().is_none(), "{:?}", r.publisher.last_error());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_while_the_broker_is_away_and_an_operators_retry_skips_the_backoff() {
    let mut broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let r = start(&broker, 10_000, FullPolicy::Reject);
    until("the broker is seen healthy", 30, || r.publisher.is_healthy()).await;
    r.sink.record(&record("before")).await.unwrap();
    until("the first record delivered", 30, || r.shared.pending.load(Ordering::Relaxed) == 0).await;
    assert_eq!(r.metrics.producer_renewals.get(), 0, "a producer that delivers is kept");
    broker.stop();
    until("the broker is seen away", 30, || !r.publisher.is_healthy()).await;
    assert!(r.publisher.last_error().is_some(), "the reason is kept for the admin status");
    for id in ["away-1", "away-2", "away-3"] {
        r.sink.record(&record(id)).await.unwrap();
    }
    // The drainer backs off, doubling up to 5 s (waits of 2.5 to 5 s after
    // rounds of 0.1, 0.2, 0.4, 0.8, 1.6 and 3.2 s), counting each retry.
    let retries = || r.metrics.buffer_retries.get();
    until("into the longest backoff", 30, || retries() >= 7).await;
    assert_eq!(r.shared.pending.load(Ordering::Relaxed), 3, "held in the buffer, not dropped");
    // Just as a wait of at least 2.5 s begins, an operator asks for a retry:
    // the drainer tries again at once (the check itself gives up after 1 s).
    let before = retries();
    until("the next retry", 10, || retries() > before).await;
    let asked = tokio::time::Instant::now();
    r.publisher.retry_now();
    until("a retry right after the request", 10, || retries() > before + 1).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(2_400), "the retry waited out the backoff: {took:?}");
    // Records waiting 15 s without a delivery: the producer is replaced
    // (librdkafka's idempotent producer can be stuck for good after a stall).
    until("the stuck producer replaced", 30, || r.metrics.producer_renewals.get() >= 1).await;
    broker.restart();
    r.publisher.retry_now();
    until("delivered after the broker came back", 30, || r.shared.pending.load(Ordering::Relaxed) == 0).await;
    assert!(r.publisher.is_healthy());
    let msgs = consume(&broker, 4, Duration::from_secs(30)).await;
    let keys = distinct_keys(&msgs);
    for id in ["before", "away-1", "away-2", "away-3"] {
        assert!(keys.contains(id), "{id} missing from {keys:?}");
    }
    assert_eq!(published(&r.metrics, "success"), 4);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_refuses_or_bypasses_as_its_policy_says() {
    // No broker answers on this address: nothing leaves the buffer.
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let (sink, shared) = UsageSink::open(dir.path(), settings(2, FullPolicy::Reject), metrics.clone()).unwrap();
    assert!(sink.enabled());
    for id in ["r1", "r2"] {
        sink.check_capacity().unwrap();
        sink.record(&record(id)).await.unwrap();
    }
    until("both records counted as pending", 10, || shared.pending.load(Ordering::Relaxed) == 2).await;
    assert_eq!(sink.check_capacity(), Err(RecordError::BufferFull));
    assert_eq!(metrics.buffer_full.get(), 1);

    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let (sink, shared) = UsageSink::open(dir.path(), settings(2, FullPolicy::Bypass), metrics.clone()).unwrap();
    for id in ["b1", "b2"] {
        sink.record(&record(id)).await.unwrap();
    }
    until("both records counted as pending", 10, || shared.pending.load(Ordering::Relaxed) == 2).await;
    sink.check_capacity().unwrap();
    sink.record(&record("b3")).await.unwrap();
    assert_eq!(shared.lock().pending(), 2, "the cap holds: over it, records are dropped");
    assert_eq!(published(&metrics, "dropped"), 1);
    assert_eq!(metrics.buffer_full.get(), 0, "bypass serves: nothing refused");

    let disabled = UsageSink::disabled();
    assert!(!disabled.enabled());
    assert_eq!(disabled.check_capacity(), Ok(()));
    disabled.record(&record("off")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_in_the_buffer_is_counted_and_the_intact_one_kept_when_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (sink, _) = UsageSink::open(dir.path(), settings(100, FullPolicy::Reject), Metrics::new()).unwrap();
        for id in ["damaged", "intact"] {
            sink.record(&record(id)).await.unwrap();
        }
    }
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    // A byte in the middle of the first record (whose id is near its start).
    let at = bytes.windows(7).position(|w| w == b"damaged").unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();
    let metrics = Metrics::new();
    let (_sink, shared) = UsageSink::open(dir.path(), settings(100, FullPolicy::Reject), metrics.clone()).unwrap();
    assert_eq!(metrics.buffer_damaged.get(), 1, "one damaged range");
    assert_eq!(shared.pending.load(Ordering::Relaxed), 1, "the intact record is kept to publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_broker_does_not_have_is_unhealthy() {
    let broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let publisher =
        Arc::new(Publisher::new(&broker.bootstrap(), "no-such-topic", "router-core-test", DEFAULT_LINGER).unwrap());
    let e = publisher.check().await.unwrap_err();
    assert!(e.contains("no-such-topic"), "{e}");
    // The readiness component reads the same verdict.
    assert!(!publisher.is_healthy() && !Healthy::is_healthy(&*publisher));
    let good = Arc::new(Publisher::new(&broker.bootstrap(), TOPIC, "router-core-test", DEFAULT_LINGER).unwrap());
    assert_eq!(good.check().await, Ok(()));
    assert!(good.is_healthy() && Healthy::is_healthy(&*good));
}

#[test]
fn record_errors_tell_the_client_what_happened() {
    assert_eq!(
        RecordError::BufferFull.to_string(),
        "the usage buffer is full (Kafka has been unreachable); retry later"
    );
    assert_eq!(
        RecordError::Unavailable("disk full".into()).to_string(),
        "the usage record could not be stored (disk full); the request was not recorded, retry it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_records_are_not_sent_again_after_a_restart() {
    let broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let r = start(&broker, 100, FullPolicy::Reject);
    for id in ["d1", "d2", "d3"] {
        r.sink.record(&record(id)).await.unwrap();
    }
    until("every record delivered", 30, || r.shared.pending.load(Ordering::Relaxed) == 0).await;
    let dir = r.stop().await;
    let (_sink, reopened) = UsageSink::open(dir.path(), settings(100, FullPolicy::Reject), Metrics::new()).unwrap();
    assert_eq!(reopened.pending.load(Ordering::Relaxed), 0, "the delivered position was written down");
}
