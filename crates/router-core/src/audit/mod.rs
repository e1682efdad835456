//! Audit: one record per routed request, written to an embedded database
//! (redb) under `DATA_DIR/audit`, looked up by
//! `GET /v1/audit/requests/{requestId}`.
//!
//! Durable before the answer, cheap on the request path: a record is first
//! appended to the audit journal (a [`crate::wal`] under
//! `DATA_DIR/audit/journal`) by its group-commit thread, and the request is
//! answered only once it is there, handed to the OS: killing the process
//! then loses nothing (as with the usage buffer; power loss can cost the
//! last moments, as the OS's write-back allows). Committing to redb is off
//! the request path: one writer task gathers journaled records for a commit
//! window (`AUDIT_COMMIT_INTERVAL_MS`, or `MAX_BATCH` records) into a single
//! transaction, and only then are they acknowledged in the journal. At
//! start-up, journaled records not yet acknowledged are committed first
//! (writing a record again is harmless: same key, same value).
//!
//! A redb commit costs far more than an insert (page allocation, copy-on-write
//! of the tree's path, checksums, fsync), so one commit per window rather than
//! per record is what keeps the audit store's CPU cost per request small
//! under load. Commits run on one dedicated thread at a lower CPU priority
//! (nice 10) while it keeps up: where the router shares a core, a commit
//! yields to the request path instead of delaying it. When a full batch or
//! more is waiting, it commits at normal priority, so a saturated router
//! cannot starve it. A lookup, and shutdown, send a flush marker through the
//! same channel: everything journaled before it is committed first, so a
//! lookup always sees the requests answered before it.
//!
//! Tables:
//! - `records`: `(request_id, organization_id)` → record JSON. Keyed by both, so
//!   one organization can never overwrite another's record by reusing an id.
//! - `by_time`: `(finished_unix_ms, request_id, organization_id)` → `()`, the
//!   retention index; a clean-up task deletes what is older than the retention.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::routing::decisions::DecisionType;
use crate::wal::{Wal, Writer, Written};

const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
const BY_TIME: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_time");

/// The most records written in one transaction.
const MAX_BATCH: usize = 4096;
const CHANNEL_CAPACITY: usize = 65_536;
const AUDIT_CACHE_BYTES: usize = 4 << 20;

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

#[derive(Debug)]
pub enum AuditError {
    Storage(String),
}

impl std::fmt::Display for AuditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditError::Storage(e) => write!(f, "audit store: {e}"),
        }
    }
}

fn storage<E: std::fmt::Display>(e: E) -> AuditError {
    AuditError::Storage(e.to_string())
}

/// A record in the journal, on its way to the database.
struct Journaled {
    seq: u64,
    request_id: Arc<str>,
    organization_id: Arc<str>,
    finished_ms: u64,
    json: Vec<u8>,
}

/// What the journal writer hands on with each record.
struct Meta {
    organization_id: Arc<str>,
    finished_ms: u64,
}

enum Msg {
    Records(Vec<Journaled>),
    Flush(oneshot::Sender<()>),
}

/// Cheap to clone; every clone feeds the same journal and writer.
#[derive(Clone)]
pub struct AuditStore {
    db: Arc<Database>,
    journal: Writer<Meta>,
    tx: mpsc::Sender<Msg>,
}

/// How often the journal's watermark is written down (a record committed but
/// not yet written down is committed again after a restart: harmless).
const CURSOR_EVERY: Duration = Duration::from_secs(1);

impl AuditStore {
    /// Opens (or creates) `dir/audit.redb` and `dir/journal`, commits what the
    /// journal holds from before a restart, and starts the journal thread and
    /// the writer task (on the current Tokio runtime).
    pub fn open(dir: &Path, metrics: Metrics, window: Duration) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        // redb caches up to 1 GiB by default; the audit store is written far
        // more than it is read, so a small cache (read cache and write buffer
        // together) keeps the router's memory flat.
        let db = Arc::new(
            redb::Builder::new().set_cache_size(AUDIT_CACHE_BYTES).create(dir.join("audit.redb")).map_err(storage)?,
        );
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(RECORDS).map_err(storage)?;
            txn.open_table(BY_TIME).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let (wal, recovery) = Wal::open(&dir.join("journal")).map_err(storage)?;
        if recovery.damaged_ranges > 0 {
            tracing::error!(
                damaged_ranges = recovery.damaged_ranges,
                "audit journal had damaged entries; intact records recovered"
            );
        }
        let wal = Arc::new(Mutex::new(wal));
        let replayed = replay(&db, &wal)?;
        if replayed > 0 {
            metrics.audit_records.with_label_values(&["written"]).inc_by(replayed);
            tracing::info!(records = replayed, "audit records journaled before the restart committed");
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (jobs, jobs_rx) = std::sync::mpsc::channel::<CommitJob>();
        let commit_db = db.clone();
        std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || committer(commit_db, jobs_rx))
            .map_err(storage)?;
        let (forward, failures) = (tx.clone(), metrics.clone());
        let journal = Writer::spawn(
            "audit-journal",
            wal.clone(),
            false,
            metrics.audit_journal_seconds.clone(),
            move |_, written: Vec<Written<Meta>>| {
                let records = written
                    .into_iter()
                    .map(|w| Journaled {
                        seq: w.seq,
                        request_id: w.key,
                        organization_id: w.extra.organization_id,
                        finished_ms: w.extra.finished_ms,
                        json: w.payload,
                    })
                    .collect();
                // Waits for room when the database is far behind: the
                // requests wait with it, and nothing is dropped.
                let _ = forward.blocking_send(Msg::Records(records));
            },
            move |e, records| {
                failures.audit_records.with_label_values(&["error"]).inc_by(records as u64);
                tracing::error!(error = %e, records, "audit journal write failed; refusing these requests");
            },
        )
        .map_err(storage)?;
        tokio::spawn(writer(rx, jobs, metrics, window, wal));
        Ok(Self { db, journal, tx })
    }

    /// Journals a record; returns once it is in the journal's file. `Err`:
    /// it could not be written, and the request must not be answered as served.
    pub async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let json = serde_json::to_vec(record).map_err(storage)?;
        let meta = Meta { organization_id: record.organization_id.clone(), finished_ms: unix_ms(record.finished_at) };
        self.journal.append(record.request_id.clone(), json, meta).await.map(drop).map_err(storage)
    }

    /// Waits until everything journaled so far is committed.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// The record JSON for `request_id`. With `org`, only that organization's
    /// record; without (admin), the most recent of any organization.
    pub async fn get(&self, request_id: &str, org: Option<&str>) -> Result<Option<Vec<u8>>, AuditError> {
        // Commit what is queued, so that every request answered before this
        // lookup can be found.
        self.flush().await;
        let db = self.db.clone();
        let request_id = request_id.to_string();
        let org = org.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(RECORDS).map_err(storage)?;
            if let Some(org) = org {
                return Ok(table
                    .get((request_id.as_str(), org.as_str()))
                    .map_err(storage)?
                    .map(|v| v.value().to_vec()));
            }
            // All organizations' records with this id are adjacent in key order.
            let mut found: Option<Vec<u8>> = None;
            for entry in table.range((request_id.as_str(), "")..).map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                if k.value().0 != request_id {
                    break;
                }
                found = Some(v.value().to_vec());
            }
            Ok(found)
        })
        .await
        .map_err(storage)?
    }

    /// Deletes records that finished before `cutoff`. Returns how many.
    pub fn prune(&self, cutoff: SystemTime) -> Result<usize, AuditError> {
        let cutoff_ms = unix_ms(cutoff);
        let txn = self.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        {
            let mut by_time = txn.open_table(BY_TIME).map_err(storage)?;
            let mut records = txn.open_table(RECORDS).map_err(storage)?;
            let old = by_time.extract_from_if(..(cutoff_ms, "", ""), |_, _| true).map_err(storage)?;
            for entry in old {
                let (k, _) = entry.map_err(storage)?;
                let (_, rid, org) = k.value();
                records.remove((rid, org)).map_err(storage)?;
                removed += 1;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    /// Runs `prune` every `every` until cancelled.
    pub async fn run_retention(
        self,
        retention: Duration,
        every: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let store = self.clone();
            let cutoff = SystemTime::now() - retention;
            match tokio::task::spawn_blocking(move || store.prune(cutoff)).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(removed = n, "audit retention removed old records")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "audit retention failed"),
                Err(e) => tracing::error!(error = %e, "audit retention task failed"),
            }
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Commits whatever the journal holds from before a restart; acknowledges
/// it. Returns how many records.
fn replay(db: &Database, wal: &Mutex<Wal>) -> Result<u64, AuditError> {
    #[derive(serde::Deserialize)]
    struct Keys<'a> {
        #[serde(borrow)]
        organization_id: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        finished_at: std::borrow::Cow<'a, str>,
    }
    let mut wal = wal.lock().unwrap_or_else(|p| p.into_inner());
    let mut replayed = 0;
    loop {
        let entries = wal.read_from(wal.watermark(), MAX_BATCH).map_err(storage)?;
        if entries.is_empty() {
            break;
        }
        let mut batch = Vec::with_capacity(entries.len());
        for e in &entries {
            // An entry that is not a record (it cannot be: the crc matched)
            // is acknowledged and skipped rather than blocking the rest.
            let Ok(keys) = serde_json::from_slice::<Keys<'_>>(&e.payload) else { continue };
            let finished = humantime::parse_rfc3339_weak(&keys.finished_at).map(unix_ms).unwrap_or(0);
            batch.push(Journaled {
                seq: e.seq,
                request_id: Arc::from(String::from_utf8_lossy(&e.key).as_ref()),
                organization_id: Arc::from(keys.organization_id.as_ref()),
                finished_ms: finished,
                json: e.payload.clone(),
            });
        }
        write_batch(db, &batch)?;
        for e in &entries {
            wal.ack(e.seq);
        }
        replayed += batch.len() as u64;
    }
    wal.persist_cursor().map_err(storage)?;
    Ok(replayed)
}

/// A batch for the commit thread, whether records are piling up behind it,
/// and where to report how it went.
struct CommitJob {
    batch: Vec<Journaled>,
    behind: bool,
    done: oneshot::Sender<(Vec<Journaled>, Result<(), AuditError>)>,
}

/// The commit thread's nice value while it keeps up: a commit then yields to
/// the request path on a shared core. While records pile up (a full batch or
/// more waiting) it commits at normal priority, so that a saturated router
/// cannot starve it and grow the queue without bound.
const NICE_WHEN_KEEPING_UP: i32 = 10;

/// The commit thread: one transaction per batch. Ends when the writer task is gone.
fn committer(db: Arc<Database>, jobs: std::sync::mpsc::Receiver<CommitJob>) {
    let mut nice = 0;
    while let Ok(job) = jobs.recv() {
        let want = if job.behind { 0 } else { NICE_WHEN_KEEPING_UP };
        if want != nice {
            // On Linux a thread id names just this thread to setpriority(2).
            match rustix::process::setpriority_process(Some(rustix::thread::gettid()), want) {
                Ok(()) => nice = want,
                Err(e) => {
                    tracing::debug!(error = %e, nice = want, "could not change the audit commit thread's priority")
                }
            }
        }
        let result = write_batch(&db, &job.batch);
        let _ = job.done.send((job.batch, result));
    }
}

/// The writer: gathers journaled records for up to `window` after the first
/// (less when a flush is asked for or `MAX_BATCH` is reached), has the
/// commit thread write them in one transaction, then acknowledges them in
/// the journal. Ends when every sender is gone.
async fn writer(
    mut rx: mpsc::Receiver<Msg>,
    jobs: std::sync::mpsc::Sender<CommitJob>,
    metrics: Metrics,
    window: Duration,
    wal: Arc<Mutex<Wal>>,
) {
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut cursor_written = Instant::now();
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<Journaled> = Vec::new();
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Msg::Records(r)) => batch.extend(r),
                Some(Msg::Flush(ack)) => acks.push(ack),
                None => {}
            }
            if batch.len() >= MAX_BATCH || !acks.is_empty() {
                break;
            }
            next = tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(msg) => Some(msg),
                    None => break,
                },
                _ = &mut deadline => break,
            };
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let (done, result) = oneshot::channel();
            let behind = batch.len() >= MAX_BATCH || rx.len() >= MAX_BATCH;
            let outcome = match jobs.send(CommitJob { batch, behind, done }) {
                Ok(()) => result.await.ok(),
                Err(_) => None,
            };
            match outcome {
                Some((batch, Ok(()))) => {
                    metrics.audit_records.with_label_values(&["written"]).inc_by(n);
                    let mut w = wal.lock().unwrap_or_else(|p| p.into_inner());
                    for r in &batch {
                        w.ack(r.seq);
                    }
                    if !acks.is_empty() || cursor_written.elapsed() >= CURSOR_EVERY {
                        if let Err(e) = w.persist_cursor() {
                            tracing::warn!(error = %e, "cannot write the audit journal's watermark");
                        }
                        cursor_written = Instant::now();
                    }
                }
                // The records stay in the journal: committed after a restart.
                Some((_, Err(e))) => {
                    metrics.audit_records.with_label_values(&["error"]).inc_by(n);
                    tracing::error!(error = %e, records = n, "audit commit failed; the records stay in the journal");
                }
                None => tracing::error!(records = n, "the audit commit thread stopped"),
            }
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

fn write_batch(db: &Database, batch: &[Journaled]) -> Result<(), AuditError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut records = txn.open_table(RECORDS).map_err(storage)?;
        let mut by_time = txn.open_table(BY_TIME).map_err(storage)?;
        for r in batch {
            let key = (&*r.request_id, &*r.organization_id);
            records.insert(key, r.json.as_slice()).map_err(storage)?;
            by_time.insert((r.finished_ms, key.0, key.1), ()).map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[tokio::test]
    async fn prune_removes_only_records_older_than_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(100)).unwrap();
        let now = SystemTime::now();
        store.record(&record("old", "o", now - Duration::from_secs(8 * 86400))).await.unwrap();
        store.record(&record("new", "o", now)).await.unwrap();
        store.flush().await;
        assert_eq!(store.prune(now - Duration::from_secs(7 * 86400)).unwrap(), 1);
        assert!(store.get("old", Some("o")).await.unwrap().is_none());
        assert!(store.get("new", Some("o")).await.unwrap().is_some());
    }
}
