//! Audit: one record per routed request, looked up by
//! `GET /v1/audit/requests/{requestId}`.
//!
//! Durable before the answer, cheap on the request path: a record is first
//! appended to the audit journal (a [`crate::wal`] under
//! `DATA_DIR/audit/journal`) by its group-commit thread, and the request is
//! answered only once it is there, handed to the OS: killing the process
//! then loses nothing (as with the usage buffer; power loss can cost the
//! last moments, as the OS's write-back allows). From the journal, records
//! go to the audit store off the request path, and are acknowledged in the
//! journal only once the store has them:
//! - [`embedded`] (the single-node default): an embedded database under
//!   `DATA_DIR/audit`, which only this replica can answer from;
//! - [`postgres`] (`AUDIT_DATABASE_URL`): PostgreSQL, shared by every
//!   replica, drained from the journal as usage is drained to Kafka, so
//!   that a PostgreSQL outage costs no record and no request.
//!
//! Either way a lookup on the replica that served a request finds it: the
//! lookup first waits for what was journaled before it to reach the store.

mod embedded;
mod log;
pub mod postgres;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::json;
use crate::metrics::Metrics;
use crate::readiness::{Component, ComponentStatus};
use crate::routing::decisions::DecisionType;
use crate::wal::{Wal, Writer, Written};

#[derive(Debug, Clone, Serialize)]
pub struct AuditAttempt {
    pub backend_id: Arc<str>,
    /// The model tried: the request's, or a fallback model.
    pub model: Arc<str>,
    pub decision_type: DecisionType,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: f64,
    #[serde(serialize_with = "crate::util::serialize_time")]
    pub started_at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub request_id: Arc<str>,
    pub organization_id: Arc<str>,
    /// The managed API key the request came with; absent for static keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Arc<str>>,
    pub model: Arc<str>,
    /// The HTTP status the client received.
    pub status: u16,
    /// The backend that produced the answer, if one did.
    pub backend_id: Option<Arc<str>>,
    pub error: Option<String>,
    pub latency_ms: f64,
    #[serde(serialize_with = "crate::util::serialize_time")]
    pub started_at: SystemTime,
    #[serde(serialize_with = "crate::util::serialize_time")]
    pub finished_at: SystemTime,
    pub attempts: Vec<AuditAttempt>,
    /// Token usage reported by the backend, when there was any.
    pub usage: Option<crate::limits::Usage>,
}

impl AuditRecord {
    /// The record's JSON, as its `Serialize` writes it ([`crate::json`]).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        json::Object::new(&mut out)
            .field("request_id", &*self.request_id)
            .field("organization_id", &*self.organization_id)
            .some("key_id", self.key_id.as_deref())
            .field("model", &*self.model)
            .field("status", self.status)
            .field("backend_id", self.backend_id.as_deref())
            .field("error", self.error.as_deref())
            .field("latency_ms", self.latency_ms)
            .field("started_at", self.started_at)
            .field("finished_at", self.finished_at)
            .field("attempts", &self.attempts[..])
            .field("usage", self.usage)
            .end();
        out
    }
}

impl json::Value for &[AuditAttempt] {
    fn write(self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, a) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json::Object::new(out)
                .field("backend_id", &*a.backend_id)
                .field("model", &*a.model)
                .field("decision_type", a.decision_type)
                .field("status", a.status)
                .field("error", a.error.as_deref())
                .field("latency_ms", a.latency_ms)
                .field("started_at", a.started_at)
                .end();
        }
        out.push(b']');
    }
}

#[derive(Debug)]
pub enum AuditError {
    /// The store failed (a write, a read, the journal).
    Storage(String),
    /// The store cannot answer now (PostgreSQL unreachable, or records still
    /// on their way to it): a lookup must not say "not found".
    Unavailable(String),
}

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditError::Storage(e) => write!(f, "audit store: {e}"),
            AuditError::Unavailable(e) => write!(f, "the audit store is unavailable: {e}"),
        }
    }
}

impl std::error::Error for AuditError {}

fn storage<E: std::fmt::Display>(e: E) -> AuditError {
    AuditError::Storage(e.to_string())
}

/// What the journal writer hands on with each record.
struct Meta {
    organization_id: Arc<str>,
    finished_ms: u64,
}

/// What the journal writer calls with each batch it has written (and the
/// journal's pending count).
type OnWritten = Box<dyn FnMut(u64, Vec<Written<Meta>>) + Send>;

/// The keys of a journaled record, read back from its JSON.
struct JournalKeys {
    organization_id: String,
    finished_ms: u64,
}

impl JournalKeys {
    fn of(payload: &[u8]) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Keys<'a> {
            #[serde(borrow)]
            organization_id: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            finished_at: std::borrow::Cow<'a, str>,
        }
        let keys: Keys<'_> = serde_json::from_slice(payload).ok()?;
        let finished_ms = humantime::parse_rfc3339_weak(&keys.finished_at).map(unix_ms).unwrap_or(0);
        Some(Self { organization_id: keys.organization_id.into_owned(), finished_ms })
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Clone)]
enum Store {
    Embedded(embedded::Embedded),
    Postgres(Arc<postgres::PgAudit>),
}

/// Cheap to clone; every clone feeds the same journal and store.
#[derive(Clone)]
pub struct AuditStore {
    journal: Writer<Meta>,
    store: Store,
}

impl AuditStore {
    /// The embedded store: opens (or creates) `dir/log` and `dir/journal`,
    /// writes what the journal holds from before a restart,
    /// and starts its writer (on the current Tokio runtime).
    pub fn open(dir: &Path, metrics: Metrics, window: Duration) -> Result<Self, AuditError> {
        let wal = open_journal(dir)?;
        let (store, on_written) = embedded::Embedded::open(dir, metrics.clone(), window, wal.clone())?;
        let journal = spawn_journal(wal, &metrics, on_written)?;
        Ok(Self { journal, store: Store::Embedded(store) })
    }

    /// PostgreSQL: the journal under `dir/journal`, drained to the database
    /// by [`AuditStore::run`]. Does not wait for PostgreSQL: records wait in
    /// the journal until it answers. `ca_file`: extra CAs for `sslmode=require`.
    pub fn open_postgres(dir: &Path, metrics: Metrics, url: &str, ca_file: Option<&Path>) -> Result<Self, AuditError> {
        let config = postgres::parse_url(url).map_err(AuditError::Storage)?;
        let tls = if postgres::wants_tls(&config) {
            let spec = router_providers::transport::tls::TlsSpec {
                ca_file: ca_file.map(Path::to_path_buf),
                ..Default::default()
            };
            Some(Arc::new(spec.client_config(&[]).map_err(storage)?))
        } else {
            None
        };
        let wal = open_journal(dir)?;
        let (store, on_written) = postgres::PgAudit::new(postgres::plain(config), tls, metrics.clone(), wal.clone());
        let journal = spawn_journal(wal, &metrics, on_written)?;
        Ok(Self { journal, store: Store::Postgres(store) })
    }

    /// Journals a record; returns once it is in the journal's file. `Err`:
    /// it could not be written, and the request must not be answered as served.
    pub async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let json = record.to_json();
        let meta = Meta { organization_id: record.organization_id.clone(), finished_ms: unix_ms(record.finished_at) };
        self.journal.append(record.request_id.clone(), json, meta).await.map(drop).map_err(storage)
    }

    /// Waits until everything journaled so far is in the store (with
    /// PostgreSQL unreachable, until it is back: callers bound the wait).
    pub async fn flush(&self) {
        match &self.store {
            Store::Embedded(s) => s.flush().await,
            Store::Postgres(s) => s.flush().await,
        }
    }

    /// The record JSON for `request_id`. With `org`, only that organization's
    /// record; without (admin), the most recent of any organization.
    pub async fn get(&self, request_id: &str, org: Option<&str>) -> Result<Option<Vec<u8>>, AuditError> {
        match &self.store {
            Store::Embedded(s) => s.get(request_id, org).await,
            Store::Postgres(s) => s.get(request_id, org).await,
        }
    }

    /// Deletes records that finished before `cutoff` (with PostgreSQL, the
    /// daily partitions wholly before it). Returns how many records (with
    /// PostgreSQL, partitions) went.
    pub async fn prune(&self, cutoff: SystemTime) -> Result<usize, AuditError> {
        match &self.store {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.prune(cutoff)).await.map_err(storage)?
            }
            Store::Postgres(s) => s.prune(cutoff).await,
        }
    }

    /// The store's background work until cancelled: retention every `every`
    /// and, with PostgreSQL, the drainer from the journal.
    pub async fn run(self, retention: Duration, every: Duration, cancel: tokio_util::sync::CancellationToken) {
        let drainer = match &self.store {
            Store::Postgres(s) => Some(tokio::spawn(s.clone().run_drainer(cancel.clone()))),
            Store::Embedded(_) => None,
        };
        loop {
            let cutoff = SystemTime::now() - retention;
            match self.prune(cutoff).await {
                Ok(n) if n > 0 => tracing::info!(removed = n, "audit retention removed old records"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "audit retention failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        if let Some(d) = drainer {
            let _ = d.await;
        }
    }

    /// The `audit_store` readiness component.
    pub fn component(&self) -> Arc<dyn Component> {
        Arc::new(self.clone())
    }
}

impl Component for AuditStore {
    fn name(&self) -> &'static str {
        "audit_store"
    }
    fn status(&self) -> ComponentStatus {
        let healthy = self.journal.watch().is_running()
            && match &self.store {
                Store::Embedded(s) => s.is_healthy(),
                Store::Postgres(s) => s.is_healthy(),
            };
        if healthy { ComponentStatus::Healthy } else { ComponentStatus::Unhealthy }
    }
}

fn open_journal(dir: &Path) -> Result<Arc<Mutex<Wal>>, AuditError> {
    std::fs::create_dir_all(dir).map_err(storage)?;
    let (wal, recovery) = Wal::open(&dir.join("journal")).map_err(storage)?;
    if recovery.damaged_ranges > 0 {
        tracing::error!(
            damaged_ranges = recovery.damaged_ranges,
            "audit journal had damaged entries; intact records recovered"
        );
    }
    Ok(Arc::new(Mutex::new(wal)))
}

/// The journal's group-commit thread, handing each written batch to the store.
fn spawn_journal(wal: Arc<Mutex<Wal>>, metrics: &Metrics, on_written: OnWritten) -> Result<Writer<Meta>, AuditError> {
    let failures = metrics.clone();
    Writer::spawn("audit-journal", wal, false, metrics.audit_journal_seconds.clone(), on_written, move |e, records| {
        failures.audit_records.with_label_values(&["error"]).inc_by(records as u64);
        tracing::error!(error = %e, records, "audit journal write failed; refusing these requests");
    })
    .map_err(storage)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::json::tests::{text, time};

    fn record(id: &str, org: &str, finished: SystemTime) -> AuditRecord {
        AuditRecord {
            request_id: Arc::from(id),
            organization_id: Arc::from(org),
            key_id: None,
            model: Arc::from("m"),
            status: 200,
            backend_id: Some(Arc::from("b1")),
            error: None,
            latency_ms: 1.5,
            started_at: finished,
            finished_at: finished,
            attempts: vec![],
            usage: None,
        }
    }

    fn attempt() -> impl proptest::strategy::Strategy<Value = AuditAttempt> {
        let decision = proptest::sample::select(vec![
            DecisionType::Primary,
            DecisionType::Failover,
            DecisionType::NoHealthyBackend,
            DecisionType::FallbackModel,
        ]);
        (text(), text(), decision, any::<Option<u16>>(), proptest::option::of(text()), any::<f64>(), time()).prop_map(
            |(b, m, decision_type, status, error, latency_ms, started_at)| AuditAttempt {
                backend_id: Arc::from(b),
                model: Arc::from(m),
                decision_type,
                status,
                error,
                latency_ms,
                started_at,
            },
        )
    }

    fn usage() -> impl proptest::strategy::Strategy<Value = Option<crate::limits::Usage>> {
        let n = || prop_oneof![Just(0u64), any::<u64>()];
        proptest::option::of((n(), n(), n(), n(), n()).prop_map(|(p, c, t, r, w)| crate::limits::Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
            cache_read_tokens: r,
            cache_write_tokens: w,
        }))
    }

    proptest::proptest! {
        #[test]
        fn the_hand_written_json_is_what_serialize_writes(
            (id, org, key, model) in (text(), text(), proptest::option::of(text()), text()),
            (status, backend, error, latency) in (any::<u16>(), proptest::option::of(text()), proptest::option::of(text()), any::<f64>()),
            (started_at, finished_at) in (time(), time()),
            attempts in proptest::collection::vec(attempt(), 0..3),
            usage in usage(),
        ) {
            let r = AuditRecord {
                request_id: Arc::from(id),
                organization_id: Arc::from(org),
                key_id: key.map(Arc::from),
                model: Arc::from(model),
                status,
                backend_id: backend.map(Arc::from),
                error,
                latency_ms: latency,
                started_at,
                finished_at,
                attempts,
                usage,
            };
            proptest::prop_assert_eq!(String::from_utf8(r.to_json()).unwrap(), serde_json::to_string(&r).unwrap());
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_are_scoped_by_organization() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(100)).unwrap();
            store.record(&record("r1", "org-a", SystemTime::now())).await.unwrap();
            store.record(&record("r1", "org-b", SystemTime::now())).await.unwrap();
            store.flush().await;
        }
        // The writer task of the first store ends when its channel closes;
        // wait for the file lock to be released.
        let store = loop {
            match AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(100)) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let a: serde_json::Value =
            serde_json::from_slice(&store.get("r1", Some("org-a")).await.unwrap().unwrap()).unwrap();
        assert_eq!(a["organization_id"], "org-a");
        assert!(store.get("r1", Some("org-c")).await.unwrap().is_none());
        assert!(store.get("r1", None).await.unwrap().is_some());
        assert!(store.get("r2", None).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn records_in_a_store_from_before_the_log_are_copied_into_it_once() {
        use redb::TableDefinition;
        const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join("audit.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(RECORDS).unwrap();
                for (id, org) in [("before-1", "org-a"), ("before-2", "org-b")] {
                    let json = serde_json::to_vec(&record(id, org, SystemTime::now())).unwrap();
                    table.insert((id, org), json.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(10)).unwrap();
        assert!(store.get("before-1", Some("org-a")).await.unwrap().is_some());
        assert!(store.get("before-2", Some("org-a")).await.unwrap().is_none(), "still scoped by organization");
        assert!(store.get("before-2", Some("org-b")).await.unwrap().is_some());
        assert!(!dir.path().join("audit.redb").exists());
        assert!(dir.path().join("audit.redb.migrated").exists(), "kept, renamed, for the operator to delete");
    }

    #[tokio::test]
    async fn a_lookup_sees_records_still_inside_the_commit_window() {
        let dir = tempfile::tempdir().unwrap();
        // A window far longer than the test: only the lookup's flush commits.
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_secs(3600)).unwrap();
        for i in 0..50 {
            store.record(&record(&format!("r{i}"), "org-a", SystemTime::now())).await.unwrap();
        }
        for i in [0, 49] {
            let found = store.get(&format!("r{i}"), Some("org-a")).await.unwrap();
            assert!(found.is_some(), "r{i} must be visible to a lookup right after it was recorded");
        }
        assert!(store.get("r7", Some("org-b")).await.unwrap().is_none(), "other organizations see nothing");
    }

    #[tokio::test]
    async fn records_journaled_before_a_crash_are_committed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed process leaves: records in the journal, not in the database.
        {
            let (mut wal, _) = Wal::open(&dir.path().join("journal")).unwrap();
            let json = serde_json::to_vec(&record("crashed-1", "org-a", SystemTime::now())).unwrap();
            wal.append(&[(b"crashed-1".as_slice(), json.as_slice())]).unwrap();
        }
        let metrics = Metrics::new();
        let store = AuditStore::open(dir.path(), metrics.clone(), Duration::from_millis(100)).unwrap();
        let found = store.get("crashed-1", Some("org-a")).await.unwrap().expect("replayed into the database");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&found).unwrap()["request_id"], "crashed-1");
        let (wal, _) = Wal::open(&dir.path().join("journal")).unwrap();
        assert_eq!(wal.pending(), 0, "acknowledged once committed");
        assert_eq!(metrics.audit_records.with_label_values(&["written"]).get(), 1, "the replayed record is counted");
    }

    #[tokio::test]
    async fn prune_removes_only_records_older_than_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(100)).unwrap();
        let now = SystemTime::now();
        store.record(&record("old", "o", now - Duration::from_secs(8 * 86400))).await.unwrap();
        store.record(&record("new", "o", now)).await.unwrap();
        store.flush().await;
        assert_eq!(store.prune(now - Duration::from_secs(7 * 86400)).await.unwrap(), 1);
        assert!(store.get("old", Some("o")).await.unwrap().is_none());
        assert!(store.get("new", Some("o")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_admin_lookup_of_an_id_two_organizations_used_finds_the_most_recent() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(10)).unwrap();
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(60);
        // Key order puts org-a first: the answer must not depend on it.
        store.record(&record("x", "org-a", now)).await.unwrap();
        store.record(&record("x", "org-b", earlier)).await.unwrap();
        store.record(&record("y", "org-a", earlier)).await.unwrap();
        store.record(&record("y", "org-b", now)).await.unwrap();
        let org_of = |json: Option<Vec<u8>>| {
            serde_json::from_slice::<serde_json::Value>(&json.unwrap()).unwrap()["organization_id"].clone()
        };
        assert_eq!(org_of(store.get("x", None).await.unwrap()), "org-a");
        assert_eq!(org_of(store.get("y", None).await.unwrap()), "org-b");
    }

    #[tokio::test]
    async fn committed_records_are_counted_and_the_store_reports_itself_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let store = AuditStore::open(dir.path(), metrics.clone(), Duration::from_millis(10)).unwrap();
        for i in 0..5 {
            store.record(&record(&format!("c{i}"), "org-a", SystemTime::now())).await.unwrap();
        }
        store.flush().await;
        assert_eq!(metrics.audit_records.with_label_values(&["written"]).get(), 5);
        assert_eq!(metrics.audit_pending.get(), 0);
        let component = store.component();
        assert_eq!((component.name(), component.status()), ("audit_store", ComponentStatus::Healthy));
    }

    #[tokio::test]
    async fn a_flush_after_the_records_were_committed_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let store = AuditStore::open(dir.path(), metrics.clone(), Duration::from_millis(10)).unwrap();
        for i in 0..5 {
            store.record(&record(&format!("f{i}"), "org-a", SystemTime::now())).await.unwrap();
        }
        // Committed by the window, before the flush: the flush's own batch
        // is empty, and it must still sync the log and write the watermark.
        let committed = || async { metrics.audit_records.with_label_values(&["written"]).get() == 5 };
        assert!(test_support::eventually(Duration::from_secs(10), committed).await, "the window committed them");
        store.flush().await;
        let (wal, _) = Wal::open(&dir.path().join("journal")).unwrap();
        assert_eq!(wal.pending(), 0, "a restart now would write these records into the log a second time");
    }

    #[tokio::test]
    async fn the_retention_task_prunes_until_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(10)).unwrap();
        let now = SystemTime::now();
        store.record(&record("old", "o", now - Duration::from_secs(3 * 3600))).await.unwrap();
        store.record(&record("new", "o", now)).await.unwrap();
        store.flush().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let task =
            tokio::spawn(store.clone().run(Duration::from_secs(3600), Duration::from_millis(20), cancel.clone()));
        let gone = || async { store.get("old", Some("o")).await.unwrap().is_none() };
        assert!(
            test_support::eventually(Duration::from_secs(10), gone).await,
            "the hour-old retention did not remove a 3-hour-old record"
        );
        assert!(store.get("new", Some("o")).await.unwrap().is_some());
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("the task ends when cancelled").unwrap();
    }

    #[tokio::test]
    async fn a_store_that_cannot_open_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let Err(e) = AuditStore::open(&not_a_dir, Metrics::new(), Duration::from_millis(10)) else {
            panic!("a file where the store's directory should be must not open")
        };
        assert!(e.to_string().starts_with("audit store: "), "{e}");
        let e = AuditError::Unavailable("PostgreSQL did not answer".into());
        assert_eq!(e.to_string(), "the audit store is unavailable: PostgreSQL did not answer");
    }
}
