//! A keyed write-ahead log: records are in the file before the request that
//! made them is answered, and deleted only once their consumer confirms
//! them. The usage buffer (`DATA_DIR/usage-buffer`, delivered to Kafka) and
//! the audit journal (`DATA_DIR/audit/journal`, committed to the audit
//! database) are both one. [`Writer`] is the group commit in front of one:
//! concurrent requests share one `write`.
//!
//! # On-disk format
//!
//! - Segment files `seg-{first_seq:020}.log`, appended in order, rotated at
//!   `SEGMENT_BYTES`. Each entry is
//!   `MAGIC (4) | len (u32 LE) | crc32 (u32 LE) | seq (u64 LE) | key_len (u16 LE) | key | payload`,
//!   where `len` counts everything after the crc and the crc covers those same
//!   bytes. `key` is the record's `request_id` (the Kafka message key, the audit
//!   key) and `payload` its JSON.
//! - `cursor`: the *watermark*, the lowest sequence number not yet delivered,
//!   as decimal text, replaced atomically (write, fsync, rename).
//!
//! # Invariants
//!
//! 1. A record is in the file (handed to the OS by `write`) before
//!    [`Wal::append`] returns, and the request that produced it is answered
//!    only after that. So killing the process cannot lose an answered record.
//! 2. The watermark only moves forward, and only over records whose delivery
//!    the consumer confirmed ([`Wal::ack`]). Acks above the watermark are
//!    held in memory until the records below them are acked too.
//! 3. Data is deleted only when a whole segment lies below the persisted
//!    watermark. Nothing else deletes.
//!
//! # What each failure costs
//!
//! - **Process killed** (SIGKILL, panic, OOM): nothing appended is lost.
//!   Records delivered since the last cursor write (at most ~200 ms of
//!   deliveries) are delivered again after restart: duplicates with the same
//!   Kafka key (`request_id`), which consumers drop. Never a loss.
//! - **Power loss / kernel crash**: depends on `USAGE_BUFFER_FSYNC`. `always`
//!   fsyncs every group commit before answering: nothing answered is lost.
//!   `interval` (default) fsyncs the active segment every
//!   `USAGE_BUFFER_FSYNC_INTERVAL_MS`: at most that window is lost. `never`
//!   leaves it to the OS (typically up to 30 s).
//! - **A damaged file** (torn write, disk error): at open, every entry is
//!   checked. Damaged bytes are skipped by scanning for the next entry whose
//!   magic and crc are valid, so every intact record is recovered. The damaged
//!   segment is moved aside as `*.damaged-{unix}` after its intact records are
//!   rewritten into a fresh segment; the count is reported.
//! - **Disk full / write error**: `append` fails; the caller refuses the
//!   request (503) rather than answer without a durable record.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: [u8; 4] = [0xA5, 0x5A, 0xC3, 0x3C];
/// magic + len + crc
const HEADER: usize = 12;
const SEGMENT_BYTES: u64 = 64 << 20;
/// The largest entry accepted when reading (a damaged length is not trusted).
const MAX_ENTRY: usize = 16 << 20;

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// Byte offset of each entry, by `seq - first_seq`.
    offsets: Vec<u64>,
    len: u64,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.first_seq + self.offsets.len() as u64 - 1)
    }
}

/// What `open` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Records waiting for delivery.
    pub pending: u64,
    /// Damaged byte ranges skipped.
    pub damaged_ranges: u64,
    pub damaged_bytes: u64,
    /// Files moved aside.
    pub set_aside: Vec<PathBuf>,
}

/// One record as stored: its sequence number, Kafka key and JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// One write-ahead log, in its directory.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    next_seq: u64,
    watermark: u64,
    persisted_watermark: u64,
    /// Segments out of the log whose deletion waits for a watermark write.
    unlink: Vec<PathBuf>,
    acked: BTreeSet<u64>,
    /// (seq, append time in unix ms) of records below `next_seq` and at or
    /// above the watermark, oldest first.
    times: VecDeque<(u64, u64)>,
    /// A new segment is started past this size (`SEGMENT_BYTES`; smaller in
    /// tests, to see segments deleted).
    segment_bytes: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn encode(seq: u64, key: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    let key = &key[..key.len().min(u16::MAX as usize)];
    let body_len = 8 + 2 + key.len() + payload.len();
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Parses the entry at `pos`, if it is intact.
fn decode(bytes: &[u8], pos: usize) -> Option<(Entry, usize)> {
    let header = bytes.get(pos..pos + HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if !(10..=MAX_ENTRY).contains(&len) {
        return None;
    }
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let body = bytes.get(pos + HEADER..pos + HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
    let key_len = u16::from_le_bytes(body[8..10].try_into().ok()?) as usize;
    let key = body.get(10..10 + key_len)?.to_vec();
    let payload = body.get(10 + key_len..)?.to_vec();
    Some((Entry { seq, key, payload }, HEADER + len))
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

impl Wal {
    /// Opens the buffer in `dir`, recovering every intact record.
    pub fn open(dir: &Path) -> io::Result<(Self, Recovery)> {
        std::fs::create_dir_all(dir)?;
        let watermark = match std::fs::read_to_string(dir.join("cursor")) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seg-") && n.ends_with(".log"))
            })
            .collect();
        names.sort();

        let mut recovery = Recovery::default();
        let mut entries: Vec<Entry> = Vec::new();
        let mut damaged_files = Vec::new();
        let mut clean_segments = Vec::new();
        for path in names {
            let bytes = std::fs::read(&path)?;
            let (found, damaged_ranges, damaged_bytes) = scan(&bytes);
            if damaged_ranges > 0 {
                recovery.damaged_ranges += damaged_ranges;
                recovery.damaged_bytes += damaged_bytes;
                damaged_files.push(path);
                entries.extend(found.into_iter().filter(|e| e.seq >= watermark));
            } else {
                clean_segments.push((path, found));
            }
        }

        let mut buffer = Wal {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            next_seq: watermark,
            watermark,
            persisted_watermark: watermark,
            unlink: Vec::new(),
            acked: BTreeSet::new(),
            times: VecDeque::new(),
            segment_bytes: SEGMENT_BYTES,
        };
        let now = unix_ms();
        for (path, found) in clean_segments {
            let first_seq = found.first().map(|e| e.seq);
            let Some(first_seq) = first_seq else {
                std::fs::remove_file(&path)?;
                continue;
            };
            let last = found.last().map(|e| e.seq).unwrap_or(first_seq);
            if last < watermark {
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut offsets = Vec::with_capacity(found.len());
            let mut pos = 0u64;
            let mut expect = first_seq;
            for e in &found {
                if e.seq != expect {
                    break;
                }
                offsets.push(pos);
                pos += (HEADER + 10 + e.key.len() + e.payload.len()) as u64;
                expect += 1;
            }
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            let len = file.metadata()?.len();
            for e in &found[..offsets.len()] {
                if e.seq >= watermark {
                    buffer.times.push_back((e.seq, record_time(&e.payload).unwrap_or(now)));
                }
            }
            buffer.next_seq = buffer.next_seq.max(expect);
            buffer.segments.push(Segment { first_seq, path, file, offsets, len });
        }
        // Intact records from damaged files: the files are moved aside first,
        // then their records are appended to a fresh segment, in order.
        if !damaged_files.is_empty() {
            let stamp = now / 1000;
            for path in damaged_files {
                let aside = path.with_extension(format!("log.damaged-{stamp}"));
                std::fs::rename(&path, &aside)?;
                recovery.set_aside.push(aside);
            }
            entries.sort_by_key(|e| e.seq);
            entries.dedup_by_key(|e| e.seq);
            let start = buffer.next_seq;
            for e in &entries {
                // Renumbered after everything intact, so sequence order stays
                // append order.
                buffer.append_raw(&e.key, &e.payload, record_time(&e.payload).unwrap_or(now))?;
            }
            if !entries.is_empty() {
                tracing::warn!(
                    recovered = entries.len(),
                    first_seq = start,
                    "recovered intact usage records from a damaged buffer segment"
                );
            }
        }
        buffer.forget_missing();
        recovery.pending = buffer.pending();
        Ok((buffer, recovery))
    }

    /// Sequence numbers between the watermark and the end that no segment
    /// holds (their file was set aside) count as done, so the watermark can
    /// pass them.
    fn forget_missing(&mut self) {
        let mut missing = Vec::new();
        let mut seq = self.watermark;
        for seg in &self.segments {
            while seq < seg.first_seq.min(self.next_seq) {
                missing.push(seq);
                seq += 1;
            }
            seq = seq.max(seg.first_seq + seg.offsets.len() as u64);
        }
        while seq < self.next_seq {
            missing.push(seq);
            seq += 1;
        }
        for s in missing {
            self.ack(s);
        }
        let wm = self.watermark;
        self.times.retain(|(s, _)| *s >= wm);
    }

    fn active(&mut self) -> io::Result<&mut Segment> {
        let rotate = self.segments.last().is_none_or(|s| s.len >= self.segment_bytes);
        if rotate {
            let path = segment_path(&self.dir, self.next_seq);
            let file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
            self.segments.push(Segment { first_seq: self.next_seq, path, file, offsets: Vec::new(), len: 0 });
        }
        // Just ensured non-empty.
        self.segments.last_mut().ok_or_else(|| io::Error::other("no active segment"))
    }

    fn append_raw(&mut self, key: &[u8], payload: &[u8], time_ms: u64) -> io::Result<u64> {
        let mut buf = Vec::with_capacity(HEADER + 10 + key.len() + payload.len());
        let seq = self.next_seq;
        encode(seq, key, payload, &mut buf);
        let seg = self.active()?;
        seg.file.write_all(&buf)?;
        seg.offsets.push(seg.len);
        seg.len += buf.len() as u64;
        self.next_seq += 1;
        self.times.push_back((seq, time_ms));
        Ok(seq)
    }

    /// Appends records with one `write` (group commit). Returns the first
    /// sequence number; the records are numbered consecutively.
    pub fn append(&mut self, records: &[(&[u8], &[u8])]) -> io::Result<u64> {
        let first = self.next_seq;
        let mut buf = Vec::with_capacity(records.iter().map(|(k, p)| HEADER + 10 + k.len() + p.len()).sum());
        let mut lens = Vec::with_capacity(records.len());
        for (i, (key, payload)) in records.iter().enumerate() {
            let before = buf.len();
            encode(first + i as u64, key, payload, &mut buf);
            lens.push((buf.len() - before) as u64);
        }
        let seg = self.active()?;
        if let Err(e) = seg.file.write_all(&buf) {
            // A partial write leaves a torn entry at the end; the next open
            // skips it. Make sure nothing after it is appended to this file.
            seg.len = u64::MAX;
            return Err(e);
        }
        let mut pos = seg.len;
        for l in lens {
            seg.offsets.push(pos);
            pos += l;
        }
        seg.len = pos;
        self.next_seq += records.len() as u64;
        let now = unix_ms();
        self.times.extend((first..self.next_seq).map(|s| (s, now)));
        Ok(first)
    }

    /// fsyncs the active segment.
    pub fn sync(&self) -> io::Result<()> {
        match self.segments.last() {
            Some(s) => s.file.sync_data(),
            None => Ok(()),
        }
    }

    /// A handle to fsync the active segment without holding the buffer.
    pub fn active_file(&self) -> Option<File> {
        self.segments.last().and_then(|s| s.file.try_clone().ok())
    }

    /// Up to `max` undelivered records from `from` on, in order.
    pub fn read_from(&self, from: u64, max: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut seq = from.max(self.watermark);
        while seq < self.next_seq && out.len() < max {
            if self.acked.contains(&seq) {
                seq += 1;
                continue;
            }
            let Some(seg) = self.segments.iter().rev().find(|s| s.first_seq <= seq) else { break };
            let Some(&offset) = seg.offsets.get((seq - seg.first_seq) as usize) else {
                seq += 1;
                continue;
            };
            let mut header = [0u8; HEADER];
            seg.file.read_exact_at(&mut header, offset)?;
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
            let mut bytes = vec![0u8; HEADER + len];
            seg.file.read_exact_at(&mut bytes, offset)?;
            match decode(&bytes, 0) {
                Some((e, _)) if e.seq == seq => out.push(e),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("usage buffer entry {seq} is damaged"),
                    ));
                }
            }
            seq += 1;
        }
        Ok(out)
    }

    /// The broker confirmed delivery of `seq`.
    pub fn ack(&mut self, seq: u64) {
        if seq < self.watermark || seq >= self.next_seq {
            return;
        }
        self.acked.insert(seq);
        while self.acked.remove(&self.watermark) {
            self.watermark += 1;
        }
        while self.times.front().is_some_and(|(s, _)| *s < self.watermark || self.acked.contains(s)) {
            self.times.pop_front();
        }
    }

    /// Writes the watermark if it moved, then deletes segments wholly below
    /// it, all under the caller's hold of the log. Where others wait on the
    /// log (the request path appends to it), use [`persist_cursor`], which
    /// does the file work outside the lock.
    pub fn persist_cursor(&mut self) -> io::Result<()> {
        match self.take_cursor() {
            Some(write) => write.run().map_err(|(e, write)| {
                self.cursor_failed(write);
                e
            }),
            None => Ok(()),
        }
    }

    /// The watermark to write down, if it moved, with the segments wholly
    /// below it, which leave the log now (every record in them is
    /// delivered, so nothing reads them again) and are deleted by
    /// [`CursorWrite::run`] once the watermark is on disk.
    pub fn take_cursor(&mut self) -> Option<CursorWrite> {
        if self.watermark == self.persisted_watermark && self.unlink.is_empty() {
            return None;
        }
        let previous = self.persisted_watermark;
        self.persisted_watermark = self.watermark;
        let wm = self.watermark;
        let mut freed = std::mem::take(&mut self.unlink);
        // The last segment is the active one: it stays even when every
        // record in it is delivered (it takes the next appends). The bound
        // is read again after each removal.
        let mut i = 0;
        while i + 1 < self.segments.len() {
            if self.segments[i].last_seq().is_some_and(|l| l < wm) {
                freed.push(self.segments.remove(i).path);
            } else {
                i += 1;
            }
        }
        Some(CursorWrite { path: self.dir.join("cursor"), watermark: wm, previous, freed })
    }

    /// A [`CursorWrite`] that failed: the watermark counts as not written,
    /// and its segments are deleted after the next one that succeeds.
    pub fn cursor_failed(&mut self, write: CursorWrite) {
        if self.persisted_watermark == write.watermark {
            self.persisted_watermark = write.previous;
        }
        self.unlink.extend(write.freed);
    }

    /// Records appended and not yet delivered.
    pub fn pending(&self) -> u64 {
        self.next_seq - self.watermark - self.acked.len() as u64
    }

    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Unix ms when the oldest undelivered record was appended.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.times.front().map(|(_, t)| *t)
    }
}

/// A watermark to write down and the segments it frees, taken from a
/// [`Wal`] under its lock ([`Wal::take_cursor`]) and run outside it.
pub struct CursorWrite {
    path: PathBuf,
    watermark: u64,
    previous: u64,
    freed: Vec<PathBuf>,
}

impl CursorWrite {
    /// Writes the watermark (atomically, synced), then deletes the freed
    /// segments. On failure, give it back with [`Wal::cursor_failed`].
    pub fn run(self) -> Result<(), (io::Error, Self)> {
        if let Err(e) = crate::util::write_atomically(&self.path, self.watermark.to_string().as_bytes()) {
            return Err((io::Error::other(e), self));
        }
        for (i, path) in self.freed.iter().enumerate() {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != io::ErrorKind::NotFound
            {
                let rest = Self { freed: self.freed[i..].to_vec(), ..self };
                return Err((e, rest));
            }
        }
        Ok(())
    }
}

/// [`Wal::persist_cursor`] with the file work (two fsyncs, a rename, a
/// segment's unlink: milliseconds) outside the log's lock, so that appends
/// on the request path never wait for it. For a thread of its own.
pub fn persist_cursor(wal: &std::sync::Mutex<Wal>) -> io::Result<()> {
    let lock = || wal.lock().unwrap_or_else(|p| p.into_inner());
    let Some(write) = lock().take_cursor() else { return Ok(()) };
    write.run().map_err(|(e, write)| {
        lock().cursor_failed(write);
        e
    })
}

/// [`persist_cursor`] from async code: the file work on Tokio's blocking
/// pool, so that it holds up neither the log nor a runtime worker.
pub async fn persist_cursor_async(wal: &std::sync::Arc<std::sync::Mutex<Wal>>) -> io::Result<()> {
    let wal = wal.clone();
    tokio::task::spawn_blocking(move || persist_cursor(&wal)).await.map_err(io::Error::other)?
}

/// Every intact entry, and the damaged ranges skipped (count, bytes).
fn scan(bytes: &[u8]) -> (Vec<Entry>, u64, u64) {
    let mut out = Vec::new();
    let (mut ranges, mut damaged) = (0u64, 0u64);
    let mut pos = 0;
    while pos < bytes.len() {
        match decode(bytes, pos) {
            Some((e, n)) => {
                out.push(e);
                pos += n;
            }
            None => {
                // Resynchronise on the next intact entry.
                let start = pos;
                pos += 1;
                while pos < bytes.len() && decode(bytes, pos).is_none() {
                    pos += 1;
                }
                ranges += 1;
                damaged += (pos - start) as u64;
            }
        }
    }
    (out, ranges, damaged)
}

/// The record's own timestamp (unix ms), for the age metric after a restart.
fn record_time(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct T<'a> {
        #[serde(borrow)]
        timestamp: std::borrow::Cow<'a, str>,
    }
    let t: T<'_> = serde_json::from_slice(payload).ok()?;
    let at = humantime::parse_rfc3339(&t.timestamp).ok()?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// A record the [`Writer`] has put in the file, handed on with its
/// sequence number.
pub struct Written<X> {
    pub seq: u64,
    pub key: std::sync::Arc<str>,
    pub payload: Vec<u8>,
    pub extra: X,
}

struct Append<X> {
    key: std::sync::Arc<str>,
    payload: Vec<u8>,
    extra: X,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// The group-commit writer in front of a [`Wal`]: it appends whatever has
/// queued in one `write` (and, with `sync_each`, one fsync), hands the batch
/// on, then answers each caller with its record's sequence number. Cheap to
/// clone.
///
/// Without `sync_each` it is a task on the Tokio runtime: a `write` to the
/// page cache takes microseconds, and a task needs no thread switch on
/// either side (a thread here cost 0.3-0.6 context switches a request and
/// ~40 µs at one connection; `docs/benchmarks.md`, "The journals on the
/// runtime"). With `sync_each` it is a thread of its own, so that an fsync
/// never holds up a runtime worker.
pub struct Writer<X> {
    tx: tokio::sync::mpsc::Sender<Append<X>>,
}

impl<X> Clone for Writer<X> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

/// See [`Writer::watch`].
pub struct WriterWatch<X>(tokio::sync::mpsc::WeakSender<Append<X>>);

impl<X> WriterWatch<X> {
    /// False once the writer has stopped, or every `Writer` is gone.
    pub fn is_running(&self) -> bool {
        self.0.upgrade().is_some_and(|tx| !tx.is_closed())
    }
}

/// The most records in one group commit.
const MAX_BATCH: usize = 4096;

/// What a [`Writer`] does with each batch, wherever it runs.
struct GroupCommit<X, W, F> {
    wal: std::sync::Arc<std::sync::Mutex<Wal>>,
    sync_each: bool,
    timer: prometheus::Histogram,
    written: W,
    failed: F,
    batch: Vec<Append<X>>,
}

impl<X, W: FnMut(u64, Vec<Written<X>>), F: Fn(&io::Error, usize)> GroupCommit<X, W, F> {
    /// Takes what else has queued behind the batch's first record.
    fn gather(&mut self, rx: &mut tokio::sync::mpsc::Receiver<Append<X>>) {
        while self.batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => self.batch.push(a),
                Err(_) => break,
            }
        }
    }

    /// Writes the batch, hands it on, answers its callers.
    fn commit(&mut self) {
        let started = std::time::Instant::now();
        let result = {
            let mut w = self.wal.lock().unwrap_or_else(|p| p.into_inner());
            let records: Vec<(&[u8], &[u8])> =
                self.batch.iter().map(|a| (a.key.as_bytes(), a.payload.as_slice())).collect();
            let r = w.append(&records).and_then(|first| {
                if self.sync_each {
                    w.sync()?;
                }
                Ok(first)
            });
            r.map(|first| (first, w.pending()))
        };
        self.timer.observe(started.elapsed().as_secs_f64());
        match result {
            Ok((first, pending)) => {
                let mut out = Vec::with_capacity(self.batch.len());
                let mut dones = Vec::with_capacity(self.batch.len());
                for (i, a) in self.batch.drain(..).enumerate() {
                    let seq = first + i as u64;
                    dones.push((a.done, seq));
                    out.push(Written { seq, key: a.key, payload: a.payload, extra: a.extra });
                }
                // Handed on before the callers hear of it: whatever a
                // caller does next comes after it.
                (self.written)(pending, out);
                for (done, seq) in dones {
                    let _ = done.send(Ok(seq));
                }
            }
            Err(e) => {
                (self.failed)(&e, self.batch.len());
                for a in self.batch.drain(..) {
                    let _ = a.done.send(Err(e.to_string()));
                }
            }
        }
    }

    fn final_sync(&self) {
        if let Err(e) = self.wal.lock().unwrap_or_else(|p| p.into_inner()).sync() {
            tracing::error!(error = %e, "final fsync of a write-ahead log failed");
        }
    }
}

impl<X: Send + 'static> Writer<X> {
    /// Starts the writer `name` (without `sync_each`, as a task on the
    /// current Tokio runtime, so it must be called within one). After each
    /// batch is in the file, `written` gets it with the log's pending count
    /// (outside the log's lock); `failed` gets a write error and how many
    /// records it refused. Both may run on a runtime worker: they must not
    /// wait long.
    pub fn spawn(
        name: &'static str,
        wal: std::sync::Arc<std::sync::Mutex<Wal>>,
        sync_each: bool,
        timer: prometheus::Histogram,
        written: impl FnMut(u64, Vec<Written<X>>) + Send + 'static,
        failed: impl Fn(&io::Error, usize) + Send + 'static,
    ) -> io::Result<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Append<X>>(65_536);
        let mut group = GroupCommit { wal, sync_each, timer, written, failed, batch: Vec::with_capacity(1024) };
        if sync_each {
            std::thread::Builder::new().name(name.into()).spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    group.batch.push(first);
                    // Where the sender shares this thread's core, the
                    // wake-up preempts it: without this yield every record
                    // was written alone, at 1.7 context switches a request.
                    // Yielding once lets the request path run on and queue
                    // more records for this batch (`docs/benchmarks.md`,
                    // "Context switches"). With the core to itself, the
                    // yield returns at once.
                    std::thread::yield_now();
                    group.gather(&mut rx);
                    group.commit();
                }
                group.final_sync();
            })?;
        } else {
            let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
            let task = runtime.spawn(async move {
                while let Some(first) = rx.recv().await {
                    group.batch.push(first);
                    // Woken by a request on this worker, the task would run
                    // right after it (Tokio's LIFO slot) and write one record
                    // a batch. Yielding once lets every task that is ready run
                    // first and queue its record for this batch.
                    tokio::task::yield_now().await;
                    group.gather(&mut rx);
                    group.commit();
                }
                group.final_sync();
            });
            crate::util::watch_task(name, task, || {});
        }
        Ok(Self { tx })
    }

    /// A handle that tells whether the writer still runs (a writer that
    /// panicked has stopped, and every append fails), without keeping it
    /// running (the writer ends when its last `Writer` is dropped).
    pub fn watch(&self) -> WriterWatch<X> {
        WriterWatch(self.tx.downgrade())
    }

    /// Appends a record; returns its sequence number once it is in the file.
    pub async fn append(&self, key: std::sync::Arc<str>, payload: Vec<u8>, extra: X) -> Result<u64, String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(Append { key, payload, extra, done }).await.is_err() {
            return Err("the log's writer has stopped".into());
        }
        wait.await.unwrap_or_else(|_| Err("the log's writer has stopped".into()))
    }
}

#[cfg(test)]
mod tests;
