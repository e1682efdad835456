//! The Kafka publisher: an idempotent `rdkafka` producer (`acks=all`) that
//! drains the usage buffer in order, acknowledging each record in the buffer
//! only when the broker confirms its delivery.
//!
//! While Kafka is unreachable (the health check every two seconds fetches the
//! topic's metadata), the drainer waits with exponential backoff and jitter,
//! counting each retry in `api_router_buffer_store_retries_total`. A failed
//! delivery sends the drainer back to the first failed record; records after
//! it that were delivered are skipped, not resent.
//!
//! An idempotent producer can get stuck: after a fatal error librdkafka must
//! be given a new producer, and a broker that lost track of the producer's
//! sequence numbers (seen after a long network stall) refuses it for good.
//! So when records have waited [`STUCK_AFTER`] without one delivery, or
//! librdkafka reports a fatal error, the producer is replaced by a new one (a
//! new producer id). Records it had in flight may then be delivered twice,
//! with the same key: consumers drop the duplicate, nothing is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::readiness::Healthy;
use crate::util::Backoff;

const BATCH: usize = 2000;

/// How long the producer lets records gather into one batch by default
/// (`KAFKA_LINGER_MS`): librdkafka's own default. Longer batches cost the
/// broker less per record (at 50 ms, 14-45% less at full load), but its
/// larger bursts raised the router's p99 at 2,000 requests/s by about 1 ms
/// where the broker shares a core with the rest (`docs/benchmarks.md`).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(5);
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const CURSOR_EVERY: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Records waiting this long without a delivery: a new producer.
pub const STUCK_AFTER: Duration = Duration::from_secs(15);

pub struct Publisher {
    config: ClientConfig,
    producer: arc_swap::ArcSwap<FutureProducer>,
    topic: String,
    healthy: AtomicBool,
    /// When the broker last answered (a metadata check or a delivery), in
    /// nanoseconds after `born`: a check that fails after starting before
    /// that answer is stale and does not mark the broker away.
    answered: AtomicU64,
    born: Instant,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Set by the admin retry: skip the current backoff.
    retry_now: tokio::sync::Notify,
    /// The drainer panicked: nothing leaves the buffer until a restart.
    stopped: AtomicBool,
    /// The buffer's writer: when it has stopped, every request that needs
    /// a usage record is refused, so the publisher reports unhealthy too.
    writer: std::sync::OnceLock<crate::wal::WriterWatch<()>>,
}

impl Publisher {
    pub fn new(brokers: &str, topic: &str, client_id: &str, linger: Duration) -> Result<Self, String> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger.as_millis().to_string())
            .set("message.timeout.ms", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("socket.timeout.ms", "5000")
            .set("reconnect.backoff.max.ms", "1000");
        let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            producer: arc_swap::ArcSwap::from_pointee(producer),
            topic: topic.to_string(),
            healthy: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            born: Instant::now(),
            last_error: Mutex::new(None),
            retry_now: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
            writer: std::sync::OnceLock::new(),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.stopped.load(Ordering::Relaxed)
            && self.writer.get().is_none_or(|w| w.is_running())
    }

    /// Reports unhealthy from when the buffer's `writer` stops.
    pub fn watch_writer(&self, writer: crate::wal::WriterWatch<()>) {
        let _ = self.writer.set(writer);
    }

    /// The drainer panicked: the publisher reports unhealthy from now on
    /// (readiness shows it), with the reason for the admin status.
    pub fn drainer_stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.set_error("the usage drainer stopped (panicked): records wait in the buffer until a restart".into());
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.load_full()
    }

    /// Replaces the producer with a new one (a new producer id); the old one
    /// is flushed briefly and dropped off the request path.
    fn renew_producer(&self, why: &str, metrics: &crate::metrics::Metrics) {
        match self.config.create::<FutureProducer>() {
            Ok(p) => {
                let old = self.producer.swap(Arc::new(p));
                metrics.producer_renewals.inc();
                tracing::warn!(reason = why, "Kafka producer replaced by a new one");
                tokio::task::spawn_blocking(move || {
                    let _ = old.flush(Timeout::After(Duration::from_millis(500)));
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new Kafka producer"),
        }
    }

    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((e, SystemTime::now()));
    }

    /// Asks the drainer to try again now (the admin "manual retry").
    pub fn retry_now(&self) {
        self.retry_now.notify_one();
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The broker answered: it is reachable.
    fn mark_reachable(&self) {
        self.answered.fetch_max(self.now_ns(), Ordering::Relaxed);
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(topic = %self.topic, "Kafka reachable: publishing usage records");
        }
    }

    /// Whether the broker answers with the topic's metadata. A failure that
    /// began before the broker last answered (the health loop and the
    /// drainer both check, and deliveries count) changes nothing.
    pub async fn check(self: &Arc<Self>) -> Result<(), String> {
        let started = self.now_ns();
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let md = me
                .producer()
                .client()
                .fetch_metadata(Some(&me.topic), Timeout::After(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                Some(t) => Err(format!("topic {}: {:?}", me.topic, t.error())),
                None => Err(format!("topic {} not found", me.topic)),
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        match &result {
            Ok(()) => self.mark_reachable(),
            Err(_) if self.answered.load(Ordering::Relaxed) > started => {}
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, topic = %self.topic, "Kafka unreachable: usage records wait in the buffer store");
                }
                self.set_error(e.clone());
            }
        }
        result
    }

    pub async fn run_health(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let _ = self.check().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(HEALTH_EVERY) => {}
            }
        }
    }

    /// Drains the buffer until cancelled; then waits (briefly) for deliveries
    /// in flight and writes the cursor.
    pub async fn run_drainer(self: Arc<Self>, shared: Arc<Shared>, cancel: CancellationToken) {
        let metrics = shared.metrics.clone();
        let mut cursor = shared.lock().watermark();
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let mut last_persist = Instant::now();
        let mut progress = Instant::now();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if shared.pending.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                progress = Instant::now();
            }
            let fatal = self.producer().client().fatal_error();
            if fatal.is_some() || progress.elapsed() >= STUCK_AFTER {
                let why = match fatal {
                    Some((code, reason)) => format!("fatal error {code:?}: {reason}"),
                    None => format!("records waited {STUCK_AFTER:?} without a delivery"),
                };
                self.renew_producer(&why, &metrics);
                progress = Instant::now();
            }
            if last_persist.elapsed() >= CURSOR_EVERY {
                persist(&shared).await;
                last_persist = Instant::now();
            }
            if !self.is_healthy() {
                metrics.buffer_retries.inc();
                if self.wait(&cancel, backoff.next_delay()).await {
                    let _ = self.check().await;
                }
                continue;
            }
            let s = shared.clone();
            let from = cursor;
            let batch = match tokio::task::spawn_blocking(move || s.lock().read_from(from, BATCH)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the usage buffer");
                    self.set_error(e.to_string());
                    self.wait(&cancel, MAX_BACKOFF).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "usage buffer read task failed");
                    continue;
                }
            };
            if batch.is_empty() {
                cursor = cursor.max(shared.lock().watermark());
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(CURSOR_EVERY) => {}
                }
                continue;
            }
            let mut inflight = Vec::with_capacity(batch.len());
            let producer = self.producer();
            for e in &batch {
                let record = FutureRecord::to(&self.topic).key(&e.key).payload(&e.payload);
                match producer.send_result(record) {
                    Ok(delivery) => inflight.push((e.seq, Some(delivery))),
                    Err((err, _)) => {
                        self.set_error(err.to_string());
                        inflight.push((e.seq, None));
                    }
                }
            }
            let mut delivered = Vec::with_capacity(inflight.len());
            let mut first_failed: Option<u64> = None;
            for (seq, delivery) in inflight {
                let ok = match delivery {
                    Some(d) => match d.await {
                        Ok(Ok(_)) => true,
                        Ok(Err((err, _))) => {
                            self.set_error(err.to_string());
                            false
                        }
                        Err(_) => false,
                    },
                    None => false,
                };
                if ok {
                    delivered.push(seq);
                } else {
                    first_failed = Some(first_failed.map_or(seq, |f: u64| f.min(seq)));
                }
            }
            let failed = batch.len() - delivered.len();
            {
                let mut b = shared.lock();
                for seq in &delivered {
                    b.ack(*seq);
                }
                shared.pending.store(b.pending(), std::sync::atomic::Ordering::Relaxed);
            }
            metrics.usage_published.with_label_values(&["success"]).inc_by(delivered.len() as u64);
            if !delivered.is_empty() {
                progress = Instant::now();
                self.mark_reachable();
            }
            match first_failed {
                None => {
                    cursor = batch.last().map(|e| e.seq + 1).unwrap_or(cursor);
                    backoff.reset();
                }
                Some(f) => {
                    metrics.usage_published.with_label_values(&["error"]).inc_by(failed as u64);
                    metrics.buffer_retries.inc();
                    tracing::warn!(failed, error = ?self.last_error().map(|e| e.0), "usage record delivery failed; will retry from the buffer");
                    cursor = f;
                    let _ = self.check().await;
                    self.wait(&cancel, backoff.next_delay()).await;
                }
            }
        }
        let producer = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(Duration::from_secs(2)))).await;
        persist(&shared).await;
        tracing::info!("Kafka publisher closed");
    }

    /// Sleeps `d`, or less if cancelled or asked to retry. True if woken early by a retry.
    async fn wait(&self, cancel: &CancellationToken, d: Duration) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = self.retry_now.notified() => {
                tracing::info!(skipped_ms = d.as_millis() as u64, "usage delivery retried on request");
                true
            }
            _ = tokio::time::sleep(d) => false,
        }
    }
}

async fn persist(shared: &Shared) {
    if let Err(e) = crate::wal::persist_cursor_async(&shared.buffer).await {
        tracing::error!(error = %e, "cannot write the usage buffer cursor");
    }
}

impl Healthy for Publisher {
    fn is_healthy(&self) -> bool {
        Publisher::is_healthy(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_buffer_writer_makes_the_publisher_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = crate::wal::Wal::open(dir.path()).unwrap();
        let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        let writer = crate::wal::Writer::spawn(
            "usage-test",
            Arc::new(std::sync::Mutex::new(wal)),
            false,
            timer,
            |_, _: Vec<crate::wal::Written<()>>| panic!("hand-off failed"),
            |_, _| {},
        )
        .unwrap();
        let p = Publisher::new("127.0.0.1:1", "t", "test", DEFAULT_LINGER).unwrap_or_else(|e| panic!("{e}"));
        p.healthy.store(true, Ordering::Relaxed);
        p.watch_writer(writer.watch());
        assert!(p.is_healthy(), "a running writer changes nothing");
        assert!(writer.append(Arc::from("a"), b"a".to_vec(), ()).await.is_err());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.is_healthy() {
            assert!(std::time::Instant::now() < deadline, "readiness shows the stopped writer");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_check_that_began_before_the_broker_answered_is_stale() {
        // Nothing listens on port 1: every metadata check fails (after 1 s).
        let p = Arc::new(Publisher::new("127.0.0.1:1", "t", "test", DEFAULT_LINGER).unwrap_or_else(|e| panic!("{e}")));
        let (stale, ()) = tokio::join!(p.check(), async {
            // The check has started (join polls it first); a delivery lands.
            tokio::task::yield_now().await;
            p.mark_reachable();
        });
        assert!(stale.is_err());
        assert!(p.is_healthy(), "a check older than the delivery does not mark the broker away");
        assert!(p.last_error().is_none(), "{:?}", p.last_error());
        assert!(p.check().await.is_err());
        assert!(!p.is_healthy(), "a check begun after the last answer does");
        assert!(p.last_error().is_some());
    }

    #[test]
    fn a_stopped_drainer_keeps_the_publisher_unhealthy_whatever_the_broker_says() {
        // No broker is needed: creating the producer does not connect.
        let p = Publisher::new("127.0.0.1:1", "t", "test", DEFAULT_LINGER).unwrap_or_else(|e| panic!("{e}"));
        p.healthy.store(true, Ordering::Relaxed);
        assert!(p.is_healthy());
        p.drainer_stopped();
        assert!(!p.is_healthy(), "readiness shows the stopped drainer");
        let (reason, _) = p.last_error().unwrap_or_else(|| panic!("no reason kept"));
        assert!(reason.contains("drainer stopped"), "{reason}");
        // The health check answering again does not hide it.
        p.healthy.store(true, Ordering::Relaxed);
        assert!(!p.is_healthy());
    }
}
