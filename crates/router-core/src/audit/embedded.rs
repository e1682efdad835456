//! The embedded audit store, the single-node default: an append-only log
//! with an index ([`super::log`]) under `DATA_DIR/audit/log/`, fed from the
//! audit journal.
//!
//! One commit thread gathers journaled records for a commit window
//! (`AUDIT_COMMIT_INTERVAL_MS`, or `MAX_BATCH` records) into a single append
//! (one write per segment), and only then are they acknowledged in the
//! journal. Once a second, and at a flush, it syncs the log and then writes
//! the journal's watermark down, so that the records the watermark passes
//! are on disk (a sync per batch, every 10 ms, had put a millisecond of
//! kernel work in the way of the request path on a shared core: see
//! `docs/benchmarks.md`). It runs at a lower CPU priority (nice 10)
//! while it keeps up: where the router shares a core, its work yields to the
//! request path instead of delaying it. When it takes a full batch at once,
//! it runs at normal priority, so a saturated router cannot starve it. A
//! lookup, and shutdown, send a flush marker through the same channel:
//! everything journaled before it is written first, so a lookup always sees
//! the requests answered before it.
//! At start-up, journaled records not yet acknowledged are written first
//! (writing a record again is harmless: a lookup finds the same record).
//!
//! Records are found by `(request_id, organization_id)`: one organization
//! never sees another's record, even under a reused id. A store from before
//! the log (`DATA_DIR/audit/audit.redb`, a redb database) is copied into the
//! log once at start-up and renamed `audit.redb.migrated`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::log::{Log, NewRecord};
use super::{AuditError, JournalKeys, Meta, OnWritten, storage, unix_ms};
use crate::metrics::Metrics;
use crate::wal::{Wal, Written};

/// The most records written in one append.
const MAX_BATCH: usize = 4096;
/// Batches queued for the commit thread at most (see [`Queue`]).
const CHANNEL_CAPACITY: usize = 65_536;

/// How often the journal's watermark is written down (a record committed but
/// not yet written down is committed again after a restart: harmless).
const CURSOR_EVERY: Duration = Duration::from_secs(1);

/// A record in the journal, on its way to the log.
struct Journaled {
    seq: u64,
    request_id: Arc<str>,
    organization_id: Arc<str>,
    finished_ms: u64,
    json: Vec<u8>,
}

enum Msg {
    Records(Vec<Journaled>),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub(super) struct Embedded {
    log: Arc<Mutex<Log>>,
    tx: Queue,
    /// The commit thread, woken by a flush.
    committer: std::thread::Thread,
    /// False after a commit failed, until one succeeds.
    healthy: Arc<AtomicBool>,
}

impl Embedded {
    /// Opens (or creates) `dir/log`, writes what the journal holds from
    /// before a restart, and starts the commit thread. Returns the store and
    /// what the journal writer hands its records to.
    pub(super) fn open(
        dir: &Path,
        metrics: Metrics,
        window: Duration,
        wal: Arc<Mutex<Wal>>,
    ) -> Result<(Self, OnWritten), AuditError> {
        let (mut log, opened) = Log::open(&dir.join("log")).map_err(storage)?;
        if opened.cut_bytes > 0 {
            tracing::warn!(
                bytes = opened.cut_bytes,
                "audit log ended in a torn write; cut off (its records are written again from the journal)"
            );
        }
        migrate_redb(dir, &mut log)?;
        let log = Arc::new(Mutex::new(log));
        let replayed = replay(&log, &wal)?;
        if replayed > 0 {
            metrics.audit_records.with_label_values(&["written"]).inc_by(replayed);
            tracing::info!(records = replayed, "audit records journaled before the restart committed");
        }
        let (tx, rx) = queue(CHANNEL_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let commit = Commit { metrics, window, wal, healthy: healthy.clone(), sync_failed: false };
        let commit_log = log.clone();
        let committer = std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || committer(commit_log, rx, commit))
            .map_err(storage)?
            .thread()
            .clone();
        let forward = tx.clone();
        let on_written: OnWritten = Box::new(move |_, written: Vec<Written<Meta>>| {
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
            // Waits for room only when the commit thread is
            // `CHANNEL_CAPACITY` batches behind: the requests wait with it,
            // and nothing is dropped. (The commit thread needs nothing from
            // the runtime this may hold up, so it always makes room.) If the
            // thread has stopped, the records stay in the journal and are
            // committed after a restart.
            let _ = forward.send(Msg::Records(records));
        });
        Ok((Self { log, tx, committer, healthy }, on_written))
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Waits until everything journaled so far is committed.
    pub(super) async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        let sent = match self.tx.try_send(Msg::Flush(ack)) {
            Ok(()) => true,
            Err(Full::Gone(_)) => false,
            // Far behind: wait for room off the runtime.
            Err(Full::Full(msg)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(msg).is_ok()).await.unwrap_or(false)
            }
        };
        if sent {
            self.committer.unpark();
            let _ = done.await;
        }
    }

    pub(super) async fn get(&self, request_id: &str, org: Option<&str>) -> Result<Option<Vec<u8>>, AuditError> {
        // Commit what is queued, so that every request answered before this
        // lookup can be found.
        self.flush().await;
        let log = self.log.clone();
        let request_id = request_id.to_string();
        let org = org.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let org = org.as_deref();
            // The open segments under the lock (the commit thread appends to
            // them); the sealed ones, which never change, without it.
            let (mut found, sealed, dir) = {
                let log = lock(&log);
                let (found, sealed) = log.find_open(&request_id, org).map_err(storage)?;
                (found, sealed, log.dir().to_path_buf())
            };
            found.extend(super::log::find_sealed(&dir, &sealed, &request_id, org).map_err(storage)?);
            // An id two organizations used (admin lookup), or a record
            // written twice: the most recent, the last written on a tie.
            Ok(found.into_iter().reduce(|a, b| if b.finished_ms >= a.finished_ms { b } else { a }).map(|f| f.json))
        })
        .await
        .map_err(storage)?
    }

    /// Deletes records that finished before `cutoff`. Returns how many.
    pub(super) fn prune(&self, cutoff: SystemTime) -> Result<usize, AuditError> {
        lock(&self.log).prune(unix_ms(cutoff)).map(|n| n as usize).map_err(storage)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The commit thread's queue, bounded to `capacity` messages: std's list
/// channel, which allocates as it fills, with the bound kept by a count.
/// (`sync_channel`'s array allocates and writes every slot up front: 2.1 MB
/// of every router's memory for 65,536 slots, used only when the commit
/// thread is far behind: `docs/benchmarks.md`.)
fn queue(capacity: usize) -> (Queue, Inbox) {
    let (tx, rx) = std::sync::mpsc::channel();
    let room = Arc::new(Room { queued: Mutex::new(Some(0)), freed: Condvar::new(), capacity });
    (Queue { tx, room: room.clone() }, Inbox { rx, room })
}

#[derive(Clone)]
struct Queue {
    tx: Sender<Msg>,
    room: Arc<Room>,
}

struct Inbox {
    rx: Receiver<Msg>,
    room: Arc<Room>,
}

struct Room {
    /// Messages sent and not yet received; `None` once the receiver is gone.
    queued: Mutex<Option<usize>>,
    /// Signalled when a full queue gets room, or the receiver goes.
    freed: Condvar,
    capacity: usize,
}

/// Why a message was not queued (it is given back).
enum Full<T> {
    Full(T),
    Gone(T),
}

impl Queue {
    /// Queues `msg`, waiting while the queue is full; gives it back if the
    /// receiver is gone.
    fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut queued = lock(&self.room.queued);
        while queued.is_some_and(|n| n >= self.room.capacity) {
            queued = self.room.freed.wait(queued).unwrap_or_else(|p| p.into_inner());
        }
        Self::push(&self.tx, &mut queued, msg)
    }

    /// Queues `msg` unless the queue is full or the receiver gone.
    fn try_send(&self, msg: Msg) -> Result<(), Full<Msg>> {
        let mut queued = lock(&self.room.queued);
        match *queued {
            Some(n) if n >= self.room.capacity => Err(Full::Full(msg)),
            _ => Self::push(&self.tx, &mut queued, msg).map_err(Full::Gone),
        }
    }

    /// Sends under the count's lock, so that the count never runs behind.
    fn push(tx: &Sender<Msg>, queued: &mut Option<usize>, msg: Msg) -> Result<(), Msg> {
        let Some(n) = queued else { return Err(msg) };
        tx.send(msg).map_err(|e| e.0)?;
        *n += 1;
        Ok(())
    }
}

impl Inbox {
    fn recv(&self) -> Result<Msg, RecvError> {
        let msg = self.rx.recv()?;
        self.took();
        Ok(msg)
    }

    fn try_recv(&self) -> Result<Msg, TryRecvError> {
        let msg = self.rx.try_recv()?;
        self.took();
        Ok(msg)
    }

    /// One message out: senders waiting on a full queue may go on. Only
    /// then is the condition variable signalled (a signal is a system
    /// call), and all of them are woken: with one, a second waiter would
    /// sleep on while the queue drained below full without passing through
    /// it again.
    fn took(&self) {
        let mut queued = lock(&self.room.queued);
        if let Some(n) = queued.as_mut() {
            if *n == self.room.capacity {
                self.room.freed.notify_all();
            }
            *n -= 1;
        }
    }
}

impl Drop for Inbox {
    /// Senders waiting for room give up.
    fn drop(&mut self) {
        *lock(&self.room.queued) = None;
        self.room.freed.notify_all();
    }
}

/// Copies the records of a store from before the log (a redb database at
/// `dir/audit.redb`, keyed by `(request_id, organization_id)`) into the
/// log, then renames the file `audit.redb.migrated`.
fn migrate_redb(dir: &Path, log: &mut Log) -> Result<(), AuditError> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("records");
    let path = dir.join("audit.redb");
    if !path.exists() {
        return Ok(());
    }
    let mut copied = 0;
    {
        let db = redb::Database::open(&path).map_err(storage)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(RECORDS).map_err(storage)?;
        let mut rows: Vec<(String, String, u64, Vec<u8>)> = Vec::new();
        let mut entries = table.iter().map_err(storage)?.peekable();
        while entries.peek().is_some() {
            rows.clear();
            for entry in entries.by_ref().take(MAX_BATCH) {
                let (k, v) = entry.map_err(storage)?;
                let (request_id, org) = k.value();
                let finished_ms = JournalKeys::of(v.value()).map_or(0, |k| k.finished_ms);
                rows.push((request_id.to_string(), org.to_string(), finished_ms, v.value().to_vec()));
            }
            let batch: Vec<NewRecord<'_>> = rows
                .iter()
                .map(|(id, org, finished_ms, json)| NewRecord {
                    request_id: id,
                    organization_id: org,
                    finished_ms: *finished_ms,
                    json,
                })
                .collect();
            log.append(&batch, unix_ms(SystemTime::now())).map_err(storage)?;
            copied += batch.len();
        }
    }
    // On disk before the old store is renamed away.
    log.sync().map_err(storage)?;
    std::fs::rename(&path, dir.join("audit.redb.migrated")).map_err(storage)?;
    tracing::info!(records = copied, "audit records copied from audit.redb into the audit log");
    Ok(())
}

/// Writes whatever the journal holds from before a restart; acknowledges
/// it. Returns how many records.
fn replay(log: &Mutex<Log>, wal: &Mutex<Wal>) -> Result<u64, AuditError> {
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
            let Some(keys) = JournalKeys::of(&e.payload) else { continue };
            batch.push(Journaled {
                seq: e.seq,
                request_id: Arc::from(String::from_utf8_lossy(&e.key).as_ref()),
                organization_id: Arc::from(keys.organization_id.as_str()),
                finished_ms: keys.finished_ms,
                json: e.payload.clone(),
            });
        }
        write_batch(log, &batch)?;
        for e in &entries {
            wal.ack(e.seq);
        }
        replayed += batch.len() as u64;
    }
    // The log on disk before the journal's watermark says it is.
    lock(log).sync().map_err(storage)?;
    wal.persist_cursor().map_err(storage)?;
    Ok(replayed)
}

/// The commit thread's nice value while it keeps up: a commit then yields to
/// the request path on a shared core. While records pile up (a full batch
/// taken at once) it commits at normal priority, so that a saturated router
/// cannot starve it and grow the queue without bound.
const NICE_WHEN_KEEPING_UP: i32 = 10;

/// Marks the store unhealthy if the commit thread stops by panicking.
struct PanicGuard(Arc<AtomicBool>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::Relaxed);
            tracing::error!("the audit commit thread panicked and stopped; records stay in the journal");
        }
    }
}

/// The commit thread: gathers journaled records for up to `window` after
/// the first (less when a flush is asked for or `MAX_BATCH` is reached),
/// writes them in one append, then acknowledges them in the journal and
/// answers the flushes. It sleeps through the window instead of waking for
/// every batch the journal hands on (a flush wakes it). Ends when every
/// sender is gone.
fn committer(log: Arc<Mutex<Log>>, rx: Inbox, mut c: Commit) {
    let _guard = PanicGuard(c.healthy.clone());
    let mut nice = 0;
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut cursor_written = Instant::now();
    let mut batch: Vec<Journaled> = Vec::new();
    let take = |msg: Msg, batch: &mut Vec<Journaled>, acks: &mut Vec<oneshot::Sender<()>>| match msg {
        Msg::Records(r) => batch.extend(r),
        Msg::Flush(ack) => acks.push(ack),
    };
    while let Ok(first) = rx.recv() {
        take(first, &mut batch, &mut acks);
        let deadline = Instant::now() + c.window;
        let mut open = true;
        while open && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => take(msg, &mut batch, &mut acks),
                Err(TryRecvError::Disconnected) => open = false,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if !acks.is_empty() || now >= deadline {
                        break;
                    }
                    // Woken early by a flush (`Embedded::flush` unparks).
                    std::thread::park_timeout(deadline - now);
                }
            }
        }
        let behind = batch.len() >= MAX_BATCH;
        let want = if behind { 0 } else { NICE_WHEN_KEEPING_UP };
        if want != nice {
            // On Linux a thread id names just this thread to setpriority(2).
            match rustix::process::setpriority_process(Some(rustix::thread::gettid()), want) {
                Ok(()) => nice = want,
                Err(e) => {
                    tracing::debug!(error = %e, nice = want, "could not change the audit commit thread's priority")
                }
            }
        }
        if !batch.is_empty() {
            c.commit(&log, &batch);
            batch.clear();
        }
        // A flush, or a second since: the log synced, the watermark written.
        if !acks.is_empty() || cursor_written.elapsed() >= CURSOR_EVERY {
            c.persist(&log);
            cursor_written = Instant::now();
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if !open {
            break;
        }
    }
}

/// What the commit thread reports to and acknowledges in.
struct Commit {
    metrics: Metrics,
    window: Duration,
    wal: Arc<Mutex<Wal>>,
    /// False after a commit failed, until one succeeds; for good after the
    /// log could not be synced.
    healthy: Arc<AtomicBool>,
    /// An `fdatasync` of the log failed. After one, the kernel may have
    /// dropped the pages it could not write and report the next sync clean,
    /// so the journal's watermark is not written again in this process: the
    /// records stay in the journal and are written again at the next start.
    sync_failed: bool,
}

impl Commit {
    /// Writes `batch` to the log; on success acknowledges it in the journal
    /// (its watermark is written down by [`Commit::persist`]). On failure
    /// the records stay in the journal: committed after a restart.
    fn commit(&self, log: &Mutex<Log>, batch: &[Journaled]) {
        let n = batch.len() as u64;
        match write_batch(log, batch) {
            Ok(()) => {
                self.healthy.store(!self.sync_failed, Ordering::Relaxed);
                self.metrics.audit_records.with_label_values(&["written"]).inc_by(n);
                {
                    let mut w = self.wal.lock().unwrap_or_else(|p| p.into_inner());
                    for r in batch {
                        w.ack(r.seq);
                    }
                    self.metrics.audit_pending.set(w.pending() as i64);
                }
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                self.metrics.audit_records.with_label_values(&["error"]).inc_by(n);
                tracing::error!(error = %e, records = n, "audit commit failed; the records stay in the journal");
            }
        }
    }

    /// Syncs the log, then writes the journal's watermark (outside the
    /// journal's lock: the request path appends to it), so that the records
    /// it passes are on disk first. Each costs nothing when nothing changed.
    fn persist(&mut self, log: &Mutex<Log>) {
        if self.sync_failed {
            return;
        }
        if let Err(e) = lock(log).sync() {
            self.sync_failed = true;
            self.healthy.store(false, Ordering::Relaxed);
            tracing::error!(
                error = %e,
                "cannot sync the audit log; its records stay in the journal until a restart writes them again"
            );
            return;
        }
        if let Err(e) = crate::wal::persist_cursor(&self.wal) {
            tracing::warn!(error = %e, "cannot write the audit journal's watermark");
        }
    }
}

fn write_batch(log: &Mutex<Log>, batch: &[Journaled]) -> Result<(), AuditError> {
    let records: Vec<NewRecord<'_>> = batch
        .iter()
        .map(|r| NewRecord {
            request_id: &r.request_id,
            organization_id: &r.organization_id,
            finished_ms: r.finished_ms,
            json: &r.json,
        })
        .collect();
    lock(log).append(&records, unix_ms(SystemTime::now())).map_err(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_thread_that_panics_leaves_the_store_unhealthy() {
        let healthy = Arc::new(AtomicBool::new(true));
        let guard = PanicGuard(healthy.clone());
        let ended = std::thread::spawn(move || {
            let _guard = guard;
            panic!("a commit went wrong");
        })
        .join();
        assert!(ended.is_err());
        assert!(!healthy.load(Ordering::Relaxed), "a stopped commit thread is reported");

        let healthy = Arc::new(AtomicBool::new(true));
        let guard = PanicGuard(healthy.clone());
        std::thread::spawn(move || drop(guard)).join().unwrap();
        assert!(healthy.load(Ordering::Relaxed), "ending normally (shutdown) is not a failure");
    }

    fn batch(seq: u64) -> Msg {
        let record = Journaled {
            seq,
            request_id: Arc::from("r"),
            organization_id: Arc::from("o"),
            finished_ms: 0,
            json: Vec::new(),
        };
        Msg::Records(vec![record])
    }

    fn seq(msg: &Msg) -> u64 {
        match msg {
            Msg::Records(r) => r[0].seq,
            Msg::Flush(_) => panic!("a flush"),
        }
    }

    /// Runs `send` on a thread; returns what it gave back, once it returns.
    fn sending(q: &Queue, msg: Msg) -> std::sync::mpsc::Receiver<Result<(), Msg>> {
        let (q, (done, result)) = (q.clone(), std::sync::mpsc::channel());
        std::thread::spawn(move || done.send(q.send(msg)).unwrap());
        result
    }

    #[test]
    fn a_full_queue_refuses_a_try_and_holds_a_sender_until_a_message_is_taken() {
        let (q, inbox) = queue(2);
        assert!(q.try_send(batch(1)).is_ok() && q.send(batch(2)).is_ok());
        assert!(matches!(q.try_send(batch(3)), Err(Full::Full(m)) if seq(&m) == 3));
        let waiting = sending(&q, batch(4));
        // Still waiting a while later (it only returns once there is room).
        assert!(waiting.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(seq(&inbox.recv().unwrap()), 1);
        assert!(waiting.recv_timeout(Duration::from_secs(10)).unwrap().is_ok(), "room was made");
        assert_eq!((seq(&inbox.try_recv().unwrap()), seq(&inbox.try_recv().unwrap())), (2, 4));
        assert!(matches!(inbox.try_recv(), Err(TryRecvError::Empty)));
    }

    #[test]
    fn every_sender_waiting_on_a_full_queue_goes_on_once_it_drains() {
        let (q, inbox) = queue(2);
        q.send(batch(1)).ok().unwrap();
        q.send(batch(2)).ok().unwrap();
        let waiting = [sending(&q, batch(3)), sending(&q, batch(4))];
        assert!(waiting.iter().all(|w| w.recv_timeout(Duration::from_millis(200)).is_err()));
        // Both taken at once: the queue drains below full in one go.
        assert_eq!((seq(&inbox.recv().unwrap()), seq(&inbox.recv().unwrap())), (1, 2));
        for w in &waiting {
            assert!(w.recv_timeout(Duration::from_secs(10)).unwrap().is_ok(), "a sender was left waiting");
        }
        let mut rest = [seq(&inbox.recv().unwrap()), seq(&inbox.recv().unwrap())];
        rest.sort_unstable();
        assert_eq!(rest, [3, 4]);
    }

    #[test]
    fn senders_get_their_message_back_once_the_receiver_is_gone_even_while_waiting() {
        let (q, inbox) = queue(1);
        q.send(batch(1)).ok().unwrap();
        let waiting = sending(&q, batch(2));
        assert!(waiting.recv_timeout(Duration::from_millis(200)).is_err());
        drop(inbox);
        let given_back = waiting.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(given_back.err().as_ref().map(seq), Some(2));
        assert!(matches!(q.try_send(batch(3)), Err(Full::Gone(m)) if seq(&m) == 3));
    }
}
