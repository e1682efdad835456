//! The embedded audit store's files: an append-only log in hour buckets,
//! with a sorted index written once per segment.
//!
//! A record costs an append (a frame copied into the batch's buffer) and an
//! entry in memory; a batch costs one `pwrite` per segment it touched. The
//! segments written are made durable by [`Log::sync`] (one `fdatasync`
//! each), which the commit thread calls before the journal's watermark is
//! written past their records (once a second, at a flush, at shutdown):
//! until then the journal still holds them, and a restart writes them
//! again. Nothing is rewritten in place, so there is no per-record page
//! copy as in a B-tree.
//!
//! # Files (`DATA_DIR/audit/log/`)
//!
//! - `{bucket:010}-{n:04}.log`: the records that finished in hour `bucket`
//!   (unix ms / 3,600,000), in the order written; `n` counts the segments of
//!   that hour. Each frame is
//!   `len (u32 LE) | crc32 (u32 LE) | finished_ms (u64 LE) | id_len (u16 LE) | org_len (u16 LE) | request_id | organization_id | json`,
//!   where `len` counts what follows the crc and the crc covers it.
//! - `{bucket:010}-{n:04}.idx`: written (to a temporary name, synced, then
//!   renamed) when the segment is sealed: its hour is over, or it passed
//!   `SEGMENT_BYTES`. `(hash(request_id), offset)` pairs sorted, then every
//!   `FENCE_EVERY`-th hash (the fence, the only part kept in memory), then a
//!   footer `count (u64 LE) | FENCE_EVERY (u32 LE) | IDX_MAGIC`.
//! - `LOCK`: held while a store has the directory open: two processes never
//!   write one log.
//!
//! A segment still open (no `.idx`) keeps its `(hash, offset)` pairs in
//! memory; at start-up they are rebuilt by reading the segment, which also
//! cuts off a torn last frame (one whose batch was never acknowledged in the
//! journal, so it is written again from there).
//!
//! # Lookups and retention
//!
//! A lookup reads the open segments' pairs, and for each sealed segment the
//! one or two index blocks its fence points at: a few reads per segment, not
//! a scan. Retention deletes whole hours: a segment goes when its hour ends
//! before the cutoff, so a record outlives the cutoff by less than an hour.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) const HOUR_MS: u64 = 3_600_000;
/// A segment is sealed once it is past this size (a batch may overshoot it).
const SEGMENT_BYTES: u64 = 64 << 20;
const FENCE_EVERY: usize = 1024;
/// len + crc
const FRAME_HEAD: usize = 8;
/// finished_ms + id_len + org_len
const BODY_HEAD: usize = 12;
/// The largest frame read back (a damaged length is not trusted).
const MAX_FRAME: usize = 16 << 20;
const IDX_MAGIC: [u8; 4] = *b"AIX1";
const FOOTER: usize = 16;

/// One record to append.
pub(super) struct NewRecord<'a> {
    pub request_id: &'a str,
    pub organization_id: &'a str,
    pub finished_ms: u64,
    pub json: &'a [u8],
}

/// A record found by a lookup.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Found {
    pub organization_id: String,
    pub finished_ms: u64,
    pub json: Vec<u8>,
}

/// A segment still taking records.
struct Open {
    bucket: u64,
    n: u32,
    file: File,
    len: u64,
    /// `(hash(request_id), offset)`, in the order written.
    entries: Vec<(u64, u64)>,
    /// Written to since its last `fdatasync`.
    unsynced: bool,
}

/// An append's frames and pairs for one open segment (`at` in `Log::open`).
struct Pending {
    at: usize,
    frames: Vec<u8>,
    pairs: Vec<(u64, u64)>,
}

/// A segment with its index written.
pub(super) struct Sealed {
    bucket: u64,
    n: u32,
    count: u64,
    fence: Vec<u64>,
}

/// What opening the log found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Opened {
    pub segments: usize,
    /// Bytes cut off the end of open segments (torn or damaged frames).
    pub cut_bytes: u64,
}

pub(super) struct Log {
    dir: PathBuf,
    open: Vec<Open>,
    sealed: Vec<Arc<Sealed>>,
    segment_bytes: u64,
    /// Held for the log's lifetime (see `LOCK` above).
    _lock: File,
}

/// FNV-1a, 64 bits: stable across builds and restarts (it is on disk).
fn hash(id: &[u8]) -> u64 {
    id.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn bucket_of(ms: u64) -> u64 {
    ms / HOUR_MS
}

fn name(bucket: u64, n: u32, ext: &str) -> String {
    format!("{bucket:010}-{n:04}.{ext}")
}

fn parse_name(file_name: &str) -> Option<(u64, u32)> {
    let stem = file_name.strip_suffix(".log")?;
    let (bucket, n) = stem.split_once('-')?;
    Some((bucket.parse().ok()?, n.parse().ok()?))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn encode(r: &NewRecord<'_>, out: &mut Vec<u8>) {
    let id = &r.request_id.as_bytes()[..r.request_id.len().min(u16::MAX as usize)];
    let org = &r.organization_id.as_bytes()[..r.organization_id.len().min(u16::MAX as usize)];
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD]);
    out.extend_from_slice(&r.finished_ms.to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(&(org.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(org);
    out.extend_from_slice(r.json);
    let body = &out[start + FRAME_HEAD..];
    let (len, crc) = (body.len() as u32, crc32fast::hash(body));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame's body, parsed.
struct Body<'a> {
    finished_ms: u64,
    request_id: &'a [u8],
    organization_id: &'a [u8],
    json: &'a [u8],
}

fn parse_body(body: &[u8]) -> Option<Body<'_>> {
    let finished = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let id_len = u16::from_le_bytes(body.get(8..10)?.try_into().ok()?) as usize;
    let org_len = u16::from_le_bytes(body.get(10..12)?.try_into().ok()?) as usize;
    let id = body.get(BODY_HEAD..BODY_HEAD + id_len)?;
    let org = body.get(BODY_HEAD + id_len..BODY_HEAD + id_len + org_len)?;
    Some(Body {
        finished_ms: finished,
        request_id: id,
        organization_id: org,
        json: &body[BODY_HEAD + id_len + org_len..],
    })
}

/// The length and crc in a frame's head, if the length is plausible.
fn parse_head(head: &[u8; FRAME_HEAD]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (BODY_HEAD..=MAX_FRAME).contains(&len).then_some((len, crc))
}

/// The frame at `offset`: `None` if it is damaged.
fn read_frame(file: &File, offset: u64) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0; FRAME_HEAD];
    file.read_exact_at(&mut head, offset)?;
    let Some((len, crc)) = parse_head(&head) else { return Ok(None) };
    let mut body = vec![0; len];
    file.read_exact_at(&mut body, offset + FRAME_HEAD as u64)?;
    Ok((crc32fast::hash(&body) == crc).then_some(body))
}

/// The record in `body` if it is `request_id`'s (and `org`'s, when given).
fn matching(body: &[u8], request_id: &str, org: Option<&str>) -> Option<Found> {
    let b = parse_body(body)?;
    if b.request_id != request_id.as_bytes() || org.is_some_and(|o| o.as_bytes() != b.organization_id) {
        return None;
    }
    Some(Found {
        organization_id: String::from_utf8_lossy(b.organization_id).into_owned(),
        finished_ms: b.finished_ms,
        json: b.json.to_vec(),
    })
}

/// Reads a segment from the start: its `(hash, offset)` pairs and the
/// length of its intact part.
fn scan(file: &File) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut head = [0; FRAME_HEAD];
    let mut body = Vec::new();
    loop {
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let Some((len, crc)) = parse_head(&head) else { break };
        body.resize(len, 0);
        match reader.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let Some(b) = parse_body(&body).filter(|_| crc32fast::hash(&body) == crc) else { break };
        entries.push((hash(b.request_id), offset));
        offset += (FRAME_HEAD + len) as u64;
    }
    Ok((entries, offset))
}

impl Sealed {
    /// Reads an index's footer and fence.
    fn read(path: &Path, bucket: u64, n: u32) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut footer = [0; FOOTER];
        if size < FOOTER as u64 {
            return Err(invalid("index shorter than its footer"));
        }
        file.read_exact_at(&mut footer, size - FOOTER as u64)?;
        let count = u64::from_le_bytes(footer[..8].try_into().map_err(|_| invalid("footer"))?);
        let every = u32::from_le_bytes(footer[8..12].try_into().map_err(|_| invalid("footer"))?) as u64;
        if footer[12..] != IDX_MAGIC || every == 0 {
            return Err(invalid("not an audit index"));
        }
        let fences = count.div_ceil(every);
        if size != count * 16 + fences * 8 + FOOTER as u64 {
            return Err(invalid("index length does not match its footer"));
        }
        let mut raw = vec![0; (fences * 8) as usize];
        file.read_exact_at(&mut raw, count * 16)?;
        let fence = raw.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        Ok(Self { bucket, n, count, fence: fence.collect() })
    }

    /// The records with `request_id` in this segment (of `org`, when given).
    fn find(&self, dir: &Path, h: u64, request_id: &str, org: Option<&str>) -> io::Result<Vec<Found>> {
        let every = FENCE_EVERY as u64;
        // Pairs with hash `h` lie from the block before the first fence
        // at or above `h` to the last block whose fence is at most `h`.
        let from = self.fence.partition_point(|&f| f < h).saturating_sub(1) as u64 * every;
        let to = (self.fence.partition_point(|&f| f <= h) as u64 * every).min(self.count);
        if from >= to {
            return Ok(Vec::new());
        }
        // Deleted by retention since the lookup began: nothing to find.
        let open = |ext| match File::open(dir.join(name(self.bucket, self.n, ext))) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            other => other.map(Some),
        };
        let Some(idx) = open("idx")? else { return Ok(Vec::new()) };
        let mut raw = vec![0; ((to - from) * 16) as usize];
        idx.read_exact_at(&mut raw, from * 16)?;
        let mut offsets = Vec::new();
        for pair in raw.chunks_exact(16) {
            let (ph, offset) = pair.split_at(8);
            if u64::from_le_bytes(ph.try_into().map_err(|_| invalid("pair"))?) == h {
                offsets.push(u64::from_le_bytes(offset.try_into().map_err(|_| invalid("pair"))?));
            }
        }
        // The segment itself only where its index has the hash.
        if offsets.is_empty() {
            return Ok(Vec::new());
        }
        let Some(log) = open("log")? else { return Ok(Vec::new()) };
        let mut found = Vec::new();
        for offset in offsets {
            if let Some(f) = read_frame(&log, offset)?.and_then(|b| matching(&b, request_id, org)) {
                found.push(f);
            }
        }
        Ok(found)
    }
}

impl Log {
    /// Opens (or creates) the log in `dir`: reads every sealed segment's
    /// fence and every open segment's pairs, cutting off torn frames.
    pub(super) fn open(dir: &Path) -> io::Result<(Self, Opened)> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => {
                io::Error::new(io::ErrorKind::WouldBlock, format!("{} is in use by another store", dir.display()))
            }
            std::fs::TryLockError::Error(e) => e,
        })?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            open: Vec::new(),
            sealed: Vec::new(),
            segment_bytes: SEGMENT_BYTES,
            _lock: lock,
        };
        let mut opened = Opened::default();
        let mut names: Vec<(u64, u32)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let file_name = entry?.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.ends_with(".tmp") {
                // An index whose writing was interrupted: written again.
                std::fs::remove_file(dir.join(file_name.as_ref()))?;
            } else if let Some(parsed) = parse_name(&file_name) {
                names.push(parsed);
            }
        }
        names.sort_unstable();
        for (bucket, n) in names {
            let idx = dir.join(name(bucket, n, "idx"));
            match Sealed::read(&idx, bucket, n) {
                Ok(sealed) => {
                    log.sealed.push(Arc::new(sealed));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, index = %idx.display(), "audit index unreadable; rebuilding it");
                }
            }
            let file = OpenOptions::new().read(true).write(true).open(dir.join(name(bucket, n, "log")))?;
            let (entries, len) = scan(&file)?;
            let size = file.metadata()?.len();
            if size > len {
                file.set_len(len)?;
                opened.cut_bytes += size - len;
            }
            log.open.push(Open { bucket, n, file, len, entries, unsynced: false });
        }
        opened.segments = log.open.len() + log.sealed.len();
        Ok((log, opened))
    }

    /// Appends `records` (durable at the next [`Log::sync`]). Segments whose
    /// hour ended over an hour before `now_ms`, or that are full, are sealed
    /// first. On `Err` nothing is visible to lookups (bytes a failed write
    /// left are overwritten by the next one, or cut off at the next open).
    pub(super) fn append(&mut self, records: &[NewRecord<'_>], now_ms: u64) -> io::Result<()> {
        let stale = bucket_of(now_ms).saturating_sub(1);
        let mut i = 0;
        while i < self.open.len() {
            if self.open[i].bucket < stale || self.open[i].len >= self.segment_bytes {
                self.seal(i)?;
            } else {
                i += 1;
            }
        }
        let mut pending: Vec<Pending> = Vec::new();
        for r in records {
            let bucket = bucket_of(r.finished_ms);
            let at = match self.open.iter().position(|o| o.bucket == bucket) {
                Some(at) => at,
                None => self.create(bucket)?,
            };
            let slot = match pending.iter().position(|p| p.at == at) {
                Some(p) => p,
                None => {
                    pending.push(Pending { at, frames: Vec::new(), pairs: Vec::new() });
                    pending.len() - 1
                }
            };
            let p = &mut pending[slot];
            p.pairs.push((hash(r.request_id.as_bytes()), self.open[at].len + p.frames.len() as u64));
            encode(r, &mut p.frames);
        }
        for p in &pending {
            let seg = &self.open[p.at];
            seg.file.write_all_at(&p.frames, seg.len)?;
        }
        for p in pending {
            let seg = &mut self.open[p.at];
            seg.len += p.frames.len() as u64;
            seg.entries.extend(p.pairs);
            seg.unsynced = true;
        }
        Ok(())
    }

    /// fdatasyncs every open segment written to since its last sync (sealed
    /// ones were synced when sealed). After `Ok`, every record appended so
    /// far survives a crash of the machine.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        for seg in self.open.iter_mut().filter(|s| s.unsynced) {
            seg.file.sync_data()?;
            seg.unsynced = false;
        }
        Ok(())
    }

    /// Starts a segment for `bucket`, which has no open one (its earlier
    /// ones, if any, are sealed); returns its index in `self.open`.
    fn create(&mut self, bucket: u64) -> io::Result<usize> {
        let n = self.sealed.iter().filter(|s| s.bucket == bucket).map(|s| s.n + 1).max().unwrap_or(0);
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(self.dir.join(name(bucket, n, "log")))?;
        // The new name must survive a crash as the records in it do.
        File::open(&self.dir)?.sync_all()?;
        self.open.push(Open { bucket, n, file, len: 0, entries: Vec::new(), unsynced: false });
        Ok(self.open.len() - 1)
    }

    /// Writes the index of `self.open[i]` and moves it to the sealed ones.
    fn seal(&mut self, i: usize) -> io::Result<()> {
        let seg = &mut self.open[i];
        seg.file.sync_data()?;
        seg.entries.sort_unstable();
        let fence: Vec<u64> = seg.entries.iter().step_by(FENCE_EVERY).map(|&(h, _)| h).collect();
        let mut out = Vec::with_capacity(seg.entries.len() * 16 + fence.len() * 8 + FOOTER);
        for (h, offset) in &seg.entries {
            out.extend_from_slice(&h.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        for h in &fence {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&(seg.entries.len() as u64).to_le_bytes());
        out.extend_from_slice(&(FENCE_EVERY as u32).to_le_bytes());
        out.extend_from_slice(&IDX_MAGIC);
        let tmp = self.dir.join(name(seg.bucket, seg.n, "idx.tmp"));
        let mut file = File::create(&tmp)?;
        file.write_all(&out)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(name(seg.bucket, seg.n, "idx")))?;
        File::open(&self.dir)?.sync_all()?;
        let seg = self.open.swap_remove(i);
        self.sealed.push(Arc::new(Sealed { bucket: seg.bucket, n: seg.n, count: seg.entries.len() as u64, fence }));
        Ok(())
    }

    /// The records with `request_id` in the open segments, and the sealed
    /// segments to look in next (without holding the log).
    pub(super) fn find_open(&self, request_id: &str, org: Option<&str>) -> io::Result<(Vec<Found>, Vec<Arc<Sealed>>)> {
        let h = hash(request_id.as_bytes());
        let mut found = Vec::new();
        for seg in &self.open {
            for &(_, offset) in seg.entries.iter().filter(|(eh, _)| *eh == h) {
                if let Some(f) = read_frame(&seg.file, offset)?.and_then(|b| matching(&b, request_id, org)) {
                    found.push(f);
                }
            }
        }
        Ok((found, self.sealed.clone()))
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes every segment whose hour ended at or before `cutoff_ms`.
    /// Returns how many records went.
    pub(super) fn prune(&mut self, cutoff_ms: u64) -> io::Result<u64> {
        let old = |bucket: u64| (bucket + 1) * HOUR_MS <= cutoff_ms;
        let mut removed = 0;
        let mut gone = Vec::new();
        self.open.retain(|o| {
            let keep = !old(o.bucket);
            if !keep {
                removed += o.entries.len() as u64;
                gone.push((o.bucket, o.n));
            }
            keep
        });
        self.sealed.retain(|s| {
            let keep = !old(s.bucket);
            if !keep {
                removed += s.count;
                gone.push((s.bucket, s.n));
            }
            keep
        });
        for (bucket, n) in gone {
            // The index first: a log without one is read again at start-up,
            // an index without its log would point at nothing.
            for ext in ["idx", "log"] {
                match std::fs::remove_file(self.dir.join(name(bucket, n, ext))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(removed)
    }
}

/// The records with `request_id` in `sealed` segments of the log in `dir`.
pub(super) fn find_sealed(
    dir: &Path,
    sealed: &[Arc<Sealed>],
    request_id: &str,
    org: Option<&str>,
) -> io::Result<Vec<Found>> {
    let h = hash(request_id.as_bytes());
    let mut found = Vec::new();
    for seg in sealed {
        found.extend(seg.find(dir, h, request_id, org)?);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn rec<'a>(id: &'a str, org: &'a str, finished_ms: u64, json: &'a [u8]) -> NewRecord<'a> {
        NewRecord { request_id: id, organization_id: org, finished_ms, json }
    }

    fn find(log: &Log, id: &str, org: Option<&str>) -> Vec<Found> {
        let (mut found, sealed) = log.find_open(id, org).unwrap();
        found.extend(find_sealed(log.dir(), &sealed, id, org).unwrap());
        found
    }

    fn jsons(found: &[Found]) -> Vec<&[u8]> {
        found.iter().map(|f| f.json.as_slice()).collect()
    }

    #[test]
    fn the_hash_on_disk_is_fnv_1a_64() {
        // Sealed indexes hold it: another function would find nothing in them.
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn records_are_found_by_id_and_organization_open_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[rec("a", "o1", NOW, b"A1"), rec("a", "o2", NOW, b"A2"), rec("b", "o1", NOW, b"B")], NOW).unwrap();
        assert_eq!(jsons(&find(&log, "a", Some("o1"))), [b"A1"]);
        assert_eq!(find(&log, "a", None).len(), 2);
        assert!(find(&log, "a", Some("o3")).is_empty());
        assert!(find(&log, "c", None).is_empty());
        // Later in the same hour: the same segment.
        log.append(&[rec("d", "o1", NOW + 1, b"D")], NOW + 1).unwrap();
        assert_eq!((log.open.len(), log.sealed.len()), (1, 0));
        // Two hours later the segment is sealed by the next append.
        log.append(&[rec("c", "o1", NOW + 2 * HOUR_MS, b"C")], NOW + 2 * HOUR_MS).unwrap();
        assert_eq!((log.open.len(), log.sealed.len()), (1, 1));
        assert!(dir.path().join(name(bucket_of(NOW), 0, "idx")).exists());
        assert_eq!(jsons(&find(&log, "a", Some("o2"))), [b"A2"]);
        assert_eq!(jsons(&find(&log, "b", None)), [b"B"]);
        assert_eq!(jsons(&find(&log, "c", Some("o1"))), [b"C"]);
        assert!(find(&log, "a", Some("o3")).is_empty());
    }

    #[test]
    fn a_sealed_segment_of_many_blocks_finds_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..5000).map(|i| format!("req-{i}")).collect();
        let records: Vec<NewRecord<'_>> = ids.iter().map(|id| rec(id, "o", NOW, id.as_bytes())).collect();
        log.append(&records, NOW).unwrap();
        log.seal(0).unwrap();
        assert_eq!(log.sealed[0].fence.len(), 5);
        for id in ids.iter().step_by(97).chain([&ids[0], &ids[4999]]) {
            assert_eq!(jsons(&find(&log, id, Some("o"))), [id.as_bytes()], "{id}");
        }
        assert!(find(&log, "req-5000", None).is_empty());
        // Read back at the next start: the same fence, the same answers.
        let fence = log.sealed[0].fence.clone();
        drop(log);
        let (log, _) = Log::open(dir.path()).unwrap();
        assert_eq!(log.sealed[0].fence, fence);
        for id in ids.iter().step_by(97).chain([&ids[4999]]) {
            assert_eq!(jsons(&find(&log, id, Some("o"))), [id.as_bytes()], "{id} after reopening");
        }
    }

    #[test]
    fn a_full_segment_is_sealed_and_the_hour_goes_on_in_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.segment_bytes = 100;
        log.append(&[rec("a", "o", NOW, &[b'x'; 120])], NOW).unwrap();
        log.append(&[rec("b", "o", NOW, b"B")], NOW).unwrap();
        assert_eq!((log.sealed[0].n, log.open[0].n), (0, 1));
        assert_eq!(find(&log, "a", None).len(), 1);
        assert_eq!(jsons(&find(&log, "b", None)), [b"B"]);
    }

    #[test]
    fn reopening_rebuilds_open_segments_and_reads_sealed_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = Log::open(dir.path()).unwrap();
            log.append(&[rec("old", "o", NOW - 3 * HOUR_MS, b"OLD")], NOW - 3 * HOUR_MS).unwrap();
            log.append(&[rec("new", "o", NOW, b"NEW")], NOW).unwrap();
            assert_eq!(log.sealed.len(), 1);
        }
        let (log, opened) = Log::open(dir.path()).unwrap();
        assert_eq!(opened, Opened { segments: 2, cut_bytes: 0 });
        assert_eq!((log.open.len(), log.sealed.len()), (1, 1), "the sealed one is read from its index");
        assert_eq!(jsons(&find(&log, "old", Some("o"))), [b"OLD"]);
        assert_eq!(jsons(&find(&log, "new", Some("o"))), [b"NEW"]);
    }

    #[test]
    fn a_torn_last_frame_is_cut_off_at_open_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = Log::open(dir.path()).unwrap();
            log.append(&[rec("kept", "o", NOW, b"KEPT"), rec("torn", "o", NOW, b"TORN")], NOW).unwrap();
        }
        let path = dir.path().join(name(bucket_of(NOW), 0, "log"));
        let size = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(size - 2).unwrap();
        let (mut log, opened) = Log::open(dir.path()).unwrap();
        let torn_frame = (FRAME_HEAD + BODY_HEAD + "torn".len() + 1 + 4) as u64;
        assert_eq!(opened.cut_bytes, torn_frame - 2);
        assert_eq!(jsons(&find(&log, "kept", None)), [b"KEPT"]);
        assert!(find(&log, "torn", None).is_empty());
        // The next append lands where the torn frame was, and is found.
        log.append(&[rec("torn", "o", NOW, b"AGAIN")], NOW).unwrap();
        drop(log);
        let (log, _) = Log::open(dir.path()).unwrap();
        assert_eq!(jsons(&find(&log, "torn", None)), [b"AGAIN"]);
    }

    #[test]
    fn the_previous_hour_stays_open_for_records_that_finished_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        let hour = bucket_of(NOW) * HOUR_MS;
        log.append(&[rec("a", "o", hour, b"A")], hour).unwrap();
        log.append(&[rec("b", "o", hour + HOUR_MS, b"B")], hour + HOUR_MS).unwrap();
        assert_eq!((log.open.len(), log.sealed.len()), (2, 0));
        log.append(&[rec("c", "o", hour + 2 * HOUR_MS, b"C")], hour + 2 * HOUR_MS).unwrap();
        assert_eq!((log.open.len(), log.sealed.len()), (2, 1));
    }

    #[test]
    fn a_record_for_a_sealed_hour_starts_its_next_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[rec("a", "o", NOW, b"A")], NOW).unwrap();
        log.seal(0).unwrap();
        // Written again from the journal after the hour was sealed.
        log.append(&[rec("late", "o", NOW, b"LATE")], NOW).unwrap();
        assert_eq!((log.sealed[0].n, log.open[0].n), (0, 1));
        assert!(dir.path().join(name(bucket_of(NOW), 1, "log")).exists());
        assert_eq!(jsons(&find(&log, "late", None)), [b"LATE"]);
        assert_eq!(jsons(&find(&log, "a", None)), [b"A"]);
    }

    #[test]
    fn an_id_written_more_times_than_an_index_block_holds_is_found_in_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        let orgs: Vec<String> = (0..2500).map(|i| format!("org-{i}")).collect();
        let others: Vec<String> = (0..1000).map(|i| format!("other-{i}")).collect();
        let mut records: Vec<NewRecord<'_>> = orgs.iter().map(|o| rec("dup", o, NOW, o.as_bytes())).collect();
        records.extend(others.iter().map(|id| rec(id, "o", NOW, b"X")));
        log.append(&records, NOW).unwrap();
        log.seal(0).unwrap();
        for org in [&orgs[0], &orgs[1023], &orgs[1024], &orgs[2499]] {
            assert_eq!(jsons(&find(&log, "dup", Some(org))), [org.as_bytes()], "{org}");
        }
        assert_eq!(find(&log, "dup", None).len(), 2500);
    }

    #[test]
    fn a_segment_pruned_during_a_lookup_is_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        log.append(&[rec("a", "o", NOW, b"A")], NOW).unwrap();
        log.seal(0).unwrap();
        let (_, sealed) = log.find_open("a", None).unwrap();
        assert_eq!(log.prune(NOW + HOUR_MS).unwrap(), 1);
        assert!(find_sealed(dir.path(), &sealed, "a", None).unwrap().is_empty());
    }

    /// A log with one sealed segment holding "a"; returns its index's path.
    fn sealed_log(dir: &Path) -> PathBuf {
        let (mut log, _) = Log::open(dir).unwrap();
        log.append(&[rec("a", "o", NOW, b"A")], NOW).unwrap();
        log.seal(0).unwrap();
        dir.join(name(bucket_of(NOW), 0, "idx"))
    }

    /// Opens the log and checks the segment was read again from its records.
    fn assert_rebuilt(dir: &Path) {
        let (log, _) = Log::open(dir).unwrap();
        assert_eq!((log.open.len(), log.sealed.len()), (1, 0), "the index is not trusted");
        assert_eq!(jsons(&find(&log, "a", None)), [b"A"]);
    }

    #[test]
    fn a_damaged_index_is_rebuilt_from_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let idx = sealed_log(dir.path());
        std::fs::write(idx, b"garbage").unwrap();
        std::fs::write(dir.path().join("0000000001-0000.idx.tmp"), b"half").unwrap();
        assert_rebuilt(dir.path());
        assert!(!dir.path().join("0000000001-0000.idx.tmp").exists(), "a half-written index is removed");
    }

    #[test]
    fn an_index_cut_short_is_rebuilt_from_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let idx = sealed_log(dir.path());
        let bytes = std::fs::read(&idx).unwrap();
        // One pair (16 bytes) and its fence (8) in all; drop the pair.
        assert_eq!(bytes.len(), 16 + 8 + FOOTER);
        std::fs::write(&idx, &bytes[16..]).unwrap();
        assert_rebuilt(dir.path());
    }

    #[test]
    fn an_index_with_another_magic_or_no_fence_step_is_rebuilt() {
        for (at, byte) in [(16 + 8 + FOOTER - 1, b'2'), (16 + 8 + 8, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let idx = sealed_log(dir.path());
            let mut bytes = std::fs::read(&idx).unwrap();
            // The magic's last byte; or FENCE_EVERY (its low byte; 1024 has none).
            bytes[at] = byte;
            if at == 16 + 8 + 8 {
                bytes[at + 1] = 0;
            }
            std::fs::write(&idx, &bytes).unwrap();
            assert_rebuilt(dir.path());
        }
    }

    #[test]
    fn prune_deletes_whole_hours_that_ended_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path()).unwrap();
        let hour = bucket_of(NOW) * HOUR_MS;
        log.append(&[rec("a", "o", hour - 10 * HOUR_MS, b"A"), rec("a2", "o", hour - 10 * HOUR_MS, b"A")], NOW)
            .unwrap();
        log.append(&[rec("b", "o", hour - 2 * HOUR_MS + 5, b"B")], NOW).unwrap();
        log.append(&[rec("c", "o", hour + 5, b"C")], NOW).unwrap();
        // Sealed by the appends after them; the last is open.
        assert_eq!((log.sealed.len(), log.open.len()), (2, 1));
        // The cutoff falls inside b's hour: b stays.
        assert_eq!(log.prune(hour - 2 * HOUR_MS + 10).unwrap(), 2);
        assert!(find(&log, "a", None).is_empty());
        assert_eq!(find(&log, "b", None).len(), 1);
        assert_eq!(log.prune(hour + HOUR_MS).unwrap(), 2);
        assert!(find(&log, "c", None).is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["LOCK"]);
    }

    #[test]
    fn a_second_store_on_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, _) = Log::open(dir.path()).unwrap();
        let Err(e) = Log::open(dir.path()) else { panic!("two logs on one directory") };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
