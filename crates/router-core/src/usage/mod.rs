//! Usage records: one per admitted request, written ahead to the durable
//! buffer (a [`crate::wal`] under `DATA_DIR/usage-buffer`) before the client
//! is answered, then published to Kafka by the [`publisher`] and deleted
//! only after the broker confirms delivery.
//!
//! The request path's cost is one hop to the group-commit writer thread and
//! back: concurrent requests share one `write` (and, with
//! `USAGE_BUFFER_FSYNC=always`, one fsync). Publishing never delays or fails
//! the response: the publisher works from the buffer, whatever Kafka is doing.
//!
//! Without `KAFKA_BROKERS` usage publishing is off (`kafka: not_configured`),
//! nothing is written, and the usage stays in the audit record.

pub mod publisher;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::routing::decisions::DecisionType;

use crate::wal::{Wal, Writer};

/// 2 added `served_model`, `cache_read_tokens` and `cache_write_tokens`; 3
/// added `key_id` (all optional; `docs/usage-records.md`).
pub const SCHEMA_VERSION: u32 = 3;

/// Why a usage record could not be taken: the request must then not be
/// answered as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The buffer is at its cap (`USAGE_BUFFER_FULL_POLICY=reject`).
    BufferFull,
    /// The record could not be written ahead.
    Unavailable(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::BufferFull => {
                f.write_str("the usage buffer is full (Kafka has been unreachable); retry later")
            }
            RecordError::Unavailable(e) => {
                write!(f, "the usage record could not be stored ({e}); the request was not recorded, retry it")
            }
        }
    }
}

impl std::error::Error for RecordError {}

/// The published record. Its JSON schema is documented in
/// `docs/usage-records.md`; the Kafka message key is `request_id`.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRecord {
    pub schema_version: u32,
    pub request_id: Arc<str>,
    pub organization_id: Arc<str>,
    /// The managed API key the request came with; absent for static keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Arc<str>>,
    /// The model the client asked for.
    pub model: Arc<str>,
    /// The model that answered, when a fallback model did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model: Option<Arc<str>>,
    pub backend_id: Option<Arc<str>>,
    /// The decision type of the last attempt.
    pub decision_type: Option<DecisionType>,
    pub attempts: u32,
    /// The HTTP status the client received (499: the client left a stream;
    /// 502: a stream broke midway after a 200 head).
    pub status: u16,
    /// Why the request did not succeed, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: f64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// Of the prompt, tokens read from the provider's cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_tokens: Option<u64>,
    /// Of the prompt, tokens written to the provider's cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// In the currency of the price table; `None` without a price.
    pub cost: Option<f64>,
    #[serde(serialize_with = "crate::util::serialize_time")]
    pub timestamp: SystemTime,
    pub router_instance_id: Arc<str>,
}

impl UsageRecord {
    /// The record's JSON, as its `Serialize` writes it ([`crate::json`]).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        crate::json::Object::new(&mut out)
            .field("schema_version", self.schema_version)
            .field("request_id", &*self.request_id)
            .field("organization_id", &*self.organization_id)
            .some("key_id", self.key_id.as_deref())
            .field("model", &*self.model)
            .some("served_model", self.served_model.as_deref())
            .field("backend_id", self.backend_id.as_deref())
            .field("decision_type", self.decision_type)
            .field("attempts", self.attempts)
            .field("status", self.status)
            .some("error", self.error.as_deref())
            .field("latency_ms", self.latency_ms)
            .field("prompt_tokens", self.prompt_tokens)
            .field("completion_tokens", self.completion_tokens)
            .field("total_tokens", self.total_tokens)
            .some("cache_read_tokens", self.cache_read_tokens)
            .some("cache_write_tokens", self.cache_write_tokens)
            .field("cost", self.cost)
            .field("timestamp", self.timestamp)
            .field("router_instance_id", &*self.router_instance_id)
            .end();
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Never,
    Interval(Duration),
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Refuse new inference requests with 503 `usage_buffer_full`.
    Reject,
    /// Serve them and drop their usage records (counted).
    Bypass,
}

#[derive(Debug, Clone)]
pub struct UsageSettings {
    pub brokers: Option<String>,
    pub topic: String,
    pub max_records: u64,
    pub full_policy: FullPolicy,
    pub fsync: Fsync,
    /// How long the producer waits to fill a batch (`KAFKA_LINGER_MS`).
    pub linger: std::time::Duration,
}

/// Shared between the request path, the writer thread and the publisher.
pub struct Shared {
    pub buffer: Arc<Mutex<Wal>>,
    /// Mirrors `buffer.pending()`, readable without the lock.
    pub pending: AtomicU64,
    /// Wakes the publisher: new records, or an operator's retry.
    pub wake: Notify,
    pub metrics: Metrics,
    pub settings: UsageSettings,
}

impl Shared {
    /// Whether the buffer holds its cap of undelivered records.
    fn is_full(&self) -> bool {
        self.pending.load(Ordering::Relaxed) >= self.settings.max_records
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The usage sink: disabled, or the buffer plus its publisher.
#[derive(Clone, Default)]
pub struct UsageSink {
    inner: Option<(Arc<Shared>, Writer<()>)>,
}

impl UsageSink {
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Opens the buffer under `dir` and starts the group-commit writer.
    pub fn open(dir: &Path, settings: UsageSettings, metrics: Metrics) -> Result<(Self, Arc<Shared>), String> {
        let (buffer, recovery) = Wal::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if recovery.damaged_ranges > 0 {
            metrics.buffer_damaged.inc_by(recovery.damaged_ranges);
            tracing::error!(
                damaged_ranges = recovery.damaged_ranges,
                damaged_bytes = recovery.damaged_bytes,
                set_aside = ?recovery.set_aside,
                "usage buffer had damaged entries: intact records recovered, damaged files set aside"
            );
        }
        if recovery.pending > 0 {
            tracing::info!(pending = recovery.pending, "usage buffer has records to retry from before the restart");
        }
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(buffer.pending()),
            buffer: Arc::new(Mutex::new(buffer)),
            wake: Notify::new(),
            metrics,
            settings: settings.clone(),
        });
        let (written, failed) = (shared.clone(), shared.metrics.clone());
        let writer = Writer::spawn(
            "usage-writer",
            shared.buffer.clone(),
            settings.fsync == Fsync::Always,
            shared.metrics.buffer_write_seconds.clone(),
            move |pending, _| {
                written.pending.store(pending, Ordering::Relaxed);
                written.wake.notify_one();
            },
            move |e, records| {
                tracing::error!(error = %e, records, "usage buffer write failed; refusing these requests");
                failed.usage_published.with_label_values(&["write_error"]).inc_by(records as u64);
            },
        )
        .map_err(|e| e.to_string())?;
        if let Fsync::Interval(every) = settings.fsync {
            let s = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("usage-fsync".into())
                .spawn(move || {
                    while let Some(shared) = s.upgrade() {
                        let file = shared.lock().active_file();
                        drop(shared);
                        if let Some(f) = file {
                            let _ = f.sync_data();
                        }
                        std::thread::park_timeout(every);
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok((Self { inner: Some((shared.clone(), writer)) }, shared))
    }

    /// A handle telling whether the buffer's writer still runs (`None`
    /// when the buffer is disabled).
    pub fn writer(&self) -> Option<crate::wal::WriterWatch<()>> {
        self.inner.as_ref().map(|(_, w)| w.watch())
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Refuses new requests while the buffer is at its cap (policy `reject`).
    pub fn check_capacity(&self) -> Result<(), RecordError> {
        let Some((shared, _)) = &self.inner else { return Ok(()) };
        if !shared.is_full() || shared.settings.full_policy == FullPolicy::Bypass {
            return Ok(());
        }
        shared.metrics.buffer_full.inc();
        tracing::warn!(
            cap = shared.settings.max_records,
            "usage buffer full: refusing the request (USAGE_BUFFER_FULL_POLICY=reject)"
        );
        Err(RecordError::BufferFull)
    }

    /// Writes the record ahead; returns once it is in the buffer's file.
    pub async fn record(&self, record: &UsageRecord) -> Result<(), RecordError> {
        let Some((shared, writer)) = &self.inner else { return Ok(()) };
        if shared.settings.full_policy == FullPolicy::Bypass && shared.is_full() {
            shared.metrics.usage_published.with_label_values(&["dropped"]).inc();
            tracing::error!(request_id = %record.request_id, "usage buffer full: record dropped (USAGE_BUFFER_FULL_POLICY=bypass)");
            return Ok(());
        }
        let payload = record.to_json();
        writer.append(record.request_id.clone(), payload, ()).await.map(drop).map_err(RecordError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::json::tests::{text, time};

    proptest! {
        #[test]
        fn the_hand_written_json_is_what_serialize_writes(
            (schema_version, id, org, key, model, served) in
                (any::<u32>(), text(), text(), proptest::option::of(text()), text(), proptest::option::of(text())),
            (backend, decision, attempts, status, error) in (
                proptest::option::of(text()),
                proptest::option::of(proptest::sample::select(vec![DecisionType::Primary, DecisionType::FallbackModel])),
                any::<u32>(),
                any::<u16>(),
                proptest::option::of(text()),
            ),
            (latency_ms, tokens, cache, cost) in
                (any::<f64>(), any::<[Option<u64>; 3]>(), any::<[Option<u64>; 2]>(), any::<Option<f64>>()),
            (timestamp, instance) in (time(), text()),
        ) {
            let r = UsageRecord {
                schema_version,
                request_id: Arc::from(id),
                organization_id: Arc::from(org),
                key_id: key.map(Arc::from),
                model: Arc::from(model),
                served_model: served.map(Arc::from),
                backend_id: backend.map(Arc::from),
                decision_type: decision,
                attempts,
                status,
                error,
                latency_ms,
                prompt_tokens: tokens[0],
                completion_tokens: tokens[1],
                total_tokens: tokens[2],
                cache_read_tokens: cache[0],
                cache_write_tokens: cache[1],
                cost,
                timestamp,
                router_instance_id: Arc::from(instance),
            };
            prop_assert_eq!(String::from_utf8(r.to_json()).unwrap(), serde_json::to_string(&r).unwrap());
        }
    }
}
