use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn append_ids(b: &mut Wal, ids: &[String]) -> u64 {
    let recs: Vec<(&[u8], &[u8])> = ids.iter().map(|i| (i.as_bytes(), i.as_bytes())).collect();
    b.append(&recs).unwrap()
}

fn readable(b: &Wal) -> Vec<Entry> {
    b.read_from(0, usize::MAX).unwrap()
}

fn ids(entries: &[Entry]) -> BTreeSet<String> {
    entries.iter().map(|e| String::from_utf8(e.payload.clone()).unwrap()).collect()
}

#[test]
fn append_read_ack_persist_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, rec) = Wal::open(dir.path()).unwrap();
        assert_eq!(rec.pending, 0);
        let first = append_ids(&mut b, &["a".into(), "b".into(), "c".into()]);
        assert_eq!(first, 0);
        assert_eq!(b.pending(), 3);
        let all = readable(&b);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].key, b"b");
        b.ack(1);
        assert_eq!(b.watermark(), 0, "not contiguous yet");
        assert_eq!(b.pending(), 2);
        b.ack(0);
        assert_eq!(b.watermark(), 2);
        b.persist_cursor().unwrap();
        assert_eq!(ids(&readable(&b)), BTreeSet::from(["c".to_string()]));
    }
    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.pending, 1);
    assert_eq!(ids(&readable(&b)), BTreeSet::from(["c".to_string()]));
    assert_eq!(b.next_seq(), 3);
}

#[test]
fn only_segments_wholly_below_the_persisted_watermark_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        b.segment_bytes = 1; // every append starts a segment
        for batch in [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]] {
            append_ids(&mut b, &batch.map(String::from));
        }
        assert_eq!(segment_files(dir.path()).len(), 3);
        for seq in 0..3 {
            b.ack(seq);
        }
        assert_eq!(b.watermark(), 3);
        b.persist_cursor().unwrap();
        // [0, 2] is below 3 and goes; [3, 5] holds 3 and stays; the active one stays.
        assert_eq!(segment_files(dir.path()).len(), 2);
        // A watermark inside the second segment deletes nothing more.
        b.ack(3);
        b.ack(4);
        b.persist_cursor().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 2);
    }
    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.pending, 4);
    assert_eq!(readable(&b).iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6, 7, 8]);
    assert!(b.oldest_ms().is_some(), "the age of what is pending is known after a restart");
    assert!(rec.set_aside.is_empty() && rec.damaged_ranges == 0, "a clean log is not treated as damaged: {rec:?}");
}

#[test]
fn the_cursor_is_written_outside_the_lock_and_segments_go_only_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    b.segment_bytes = 1; // every append starts a segment
    for batch in [["0", "1"], ["2", "3"], ["4", "5"]] {
        append_ids(&mut b, &batch.map(String::from));
    }
    for seq in 0..4 {
        b.ack(seq);
    }
    let wal = std::sync::Mutex::new(b);
    // Taken under the lock; nothing on disk changes until it runs.
    let write = wal.lock().unwrap().take_cursor().expect("the watermark moved");
    assert_eq!(segment_files(dir.path()).len(), 3, "no segment goes before the watermark is written");
    assert!(wal.lock().unwrap().take_cursor().is_none(), "nothing more to write meanwhile");
    // The log takes appends while the write is pending.
    append_ids(&mut wal.lock().unwrap(), &["6".to_string()]);
    write.run().map_err(|(e, _)| e).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("cursor")).unwrap(), "4");
    assert_eq!(segment_files(dir.path()).len(), 2, "[0, 1] and [2, 3] are delivered and gone");
    assert!(crate::wal::persist_cursor(&wal).is_ok());
}

#[test]
fn a_failed_cursor_write_keeps_the_segments_until_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    b.segment_bytes = 1;
    for batch in [["0", "1"], ["2", "3"]] {
        append_ids(&mut b, &batch.map(String::from));
    }
    b.ack(0);
    b.ack(1);
    let wal = std::sync::Mutex::new(b);
    // The cursor's temporary file cannot be created: a directory is in its way.
    std::fs::create_dir(dir.path().join("cursor.tmp")).unwrap();
    assert!(crate::wal::persist_cursor(&wal).is_err());
    assert_eq!(segment_files(dir.path()).len(), 2, "a segment is not deleted before the watermark is on disk");
    assert!(!dir.path().join("cursor").exists());
    // Once the write can succeed, the next persist writes it and deletes the segment.
    std::fs::remove_dir(dir.path().join("cursor.tmp")).unwrap();
    crate::wal::persist_cursor(&wal).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("cursor")).unwrap(), "2");
    assert_eq!(segment_files(dir.path()).len(), 1);
    drop(wal);
    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.pending, 2);
    assert_eq!(readable(&b).iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
}

#[test]
fn the_active_segment_is_kept_when_everything_in_it_is_delivered_too() {
    // An older segment and the active one, every record in both delivered:
    // the older one goes, the active one stays and takes the next records.
    // (The audit journal, acknowledged within milliseconds, is in this state
    // at its first persist after each rotation.)
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        b.segment_bytes = 1; // every append starts a segment
        append_ids(&mut b, &["0".into(), "1".into()]);
        append_ids(&mut b, &["2".into(), "3".into()]);
        assert_eq!(segment_files(dir.path()).len(), 2);
        for seq in 0..4 {
            b.ack(seq);
        }
        b.persist_cursor().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1, "the older segment goes, the active one stays");
        b.segment_bytes = SEGMENT_BYTES;
        append_ids(&mut b, &["4".into()]);
        assert_eq!(segment_files(dir.path()).len(), 1, "appended to the kept active segment");
        assert_eq!(readable(&b).iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
    }
    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.pending, 1);
    assert_eq!(ids(&readable(&b)), BTreeSet::from(["4".to_string()]));
    assert_eq!(b.next_seq(), 5);
}

#[test]
fn the_oldest_record_time_is_when_it_was_appended() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    assert_eq!(b.oldest_ms(), None);
    append_ids(&mut b, &["a".into()]);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(b.oldest_ms().unwrap().abs_diff(now) < 60_000, "{:?} vs {now}", b.oldest_ms());
}

#[test]
fn an_unreadable_cursor_stops_the_open_instead_of_starting_over() {
    let dir = tempfile::tempdir().unwrap();
    // A cursor that cannot be read (here: a directory) is not "no cursor":
    // starting from 0 would deliver everything again.
    std::fs::create_dir(dir.path().join("cursor")).unwrap();
    assert!(Wal::open(dir.path()).is_err());
}

#[test]
fn after_a_restart_a_record_is_as_old_as_its_own_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let payload = br#"{"request_id":"r","timestamp":"2026-01-02T03:04:05.678Z"}"#;
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        b.append(&[(b"r".as_slice(), payload.as_slice())]).unwrap();
    }
    let (b, _) = Wal::open(dir.path()).unwrap();
    let at = humantime::parse_rfc3339("2026-01-02T03:04:05.678Z").unwrap();
    assert_eq!(b.oldest_ms(), Some(at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64));
}

#[test]
fn a_read_returns_at_most_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    append_ids(&mut b, &["a", "b", "c", "d", "e"].map(String::from));
    assert_eq!(b.read_from(0, 2).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(b.read_from(3, 10).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
}

#[test]
fn an_entry_changed_on_disk_under_the_log_is_an_error_not_another_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    append_ids(&mut b, &["a".into()]);
    // A well-formed entry, but numbered 5, where entry 0 was written.
    let mut forged = Vec::new();
    encode(5, b"a", b"a", &mut forged);
    std::fs::write(&segment_files(dir.path())[0], &forged).unwrap();
    let e = b.read_from(0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn acks_outside_what_was_appended_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    append_ids(&mut b, &["a", "b", "c"].map(String::from));
    b.ack(100);
    b.ack(3);
    assert_eq!((b.pending(), b.watermark()), (3, 0));
    b.ack(0);
    b.ack(0);
    assert_eq!((b.pending(), b.watermark()), (2, 1), "an ack below the watermark counts once");
}

#[test]
fn the_oldest_age_follows_the_acks() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _) = Wal::open(dir.path()).unwrap();
    for (id, at) in [("a", 1_000), ("b", 2_000), ("c", 3_000)] {
        b.append_raw(id.as_bytes(), id.as_bytes(), at).unwrap();
    }
    assert_eq!(b.oldest_ms(), Some(1_000));
    b.ack(0);
    assert_eq!(b.oldest_ms(), Some(2_000));
    b.ack(2);
    assert_eq!(b.oldest_ms(), Some(2_000), "b still waits");
    b.ack(1);
    assert_eq!(b.oldest_ms(), None);
}

#[test]
fn a_crash_before_the_cursor_is_written_brings_back_duplicates_not_losses() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        append_ids(&mut b, &["a".into(), "b".into()]);
        b.ack(0);
        b.persist_cursor().unwrap();
        append_ids(&mut b, &["c".into()]);
        b.ack(1);
        // Dropped without persist_cursor: a crash.
    }
    let (b, _) = Wal::open(dir.path()).unwrap();
    assert_eq!(ids(&readable(&b)), BTreeSet::from(["b".to_string(), "c".to_string()]));
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn corruption_in_the_middle_recovers_every_intact_record() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<String> = (0..10).map(|i| format!("record-{i}")).collect();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        append_ids(&mut b, &all);
    }
    let seg = &segment_files(dir.path())[0];
    let mut bytes = std::fs::read(seg).unwrap();
    // Damage the 4th entry's payload (each entry: 12 + 10 + 2 * 8 bytes).
    let entry = 12 + 10 + 16;
    bytes[3 * entry + 30] ^= 0xFF;
    std::fs::write(seg, &bytes).unwrap();

    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.damaged_ranges, 1);
    assert_eq!(rec.damaged_bytes, entry as u64);
    assert_eq!(rec.set_aside.len(), 1);
    assert!(rec.set_aside[0].exists());
    // Named with the Unix second it was set aside.
    let stamp: u64 = rec.set_aside[0].to_string_lossy().rsplit(".damaged-").next().unwrap().parse().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(stamp.abs_diff(now) < 60, "{stamp} vs {now}");
    let got = ids(&readable(&b));
    let want: BTreeSet<String> = all.iter().filter(|i| *i != "record-3").cloned().collect();
    assert_eq!(got, want);
    assert_eq!(b.pending(), 9);
    drop(b);
    // The recovered state is itself durable and clean.
    let (b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.damaged_ranges, 0);
    assert_eq!(ids(&readable(&b)).len(), 9);
}

#[test]
fn a_damaged_older_segment_leaves_no_phantom_records_behind() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        b.segment_bytes = 1;
        append_ids(&mut b, &["a0".into(), "a1".into(), "a2".into()]);
        append_ids(&mut b, &["b3".into(), "b4".into(), "b5".into()]);
    }
    let first = &segment_files(dir.path())[0];
    let mut bytes = std::fs::read(first).unwrap();
    // Damage the middle entry of the first segment (12 + 10 + 2 * 2 bytes each).
    let entry = 12 + 10 + 4;
    bytes[entry + 24] ^= 0xFF;
    std::fs::write(first, &bytes).unwrap();

    let (mut b, rec) = Wal::open(dir.path()).unwrap();
    // Five intact records; the numbers of the set-aside segment (0 to 2)
    // are not waited for.
    assert_eq!(rec.pending, 5);
    let entries = readable(&b);
    assert_eq!(ids(&entries), BTreeSet::from(["a0", "a2", "b3", "b4", "b5"].map(String::from)));
    assert!(b.oldest_ms().is_some(), "the pending records' age is known after a restart");
    for e in &entries {
        b.ack(e.seq);
    }
    assert_eq!((b.pending(), b.watermark()), (0, b.next_seq()));
}

#[test]
fn a_torn_write_at_the_end_loses_only_the_torn_entry() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        append_ids(&mut b, &["a".into(), "b".into(), "c".into()]);
    }
    let seg = &segment_files(dir.path())[0];
    let bytes = std::fs::read(seg).unwrap();
    std::fs::write(seg, &bytes[..bytes.len() - 5]).unwrap();
    let (mut b, rec) = Wal::open(dir.path()).unwrap();
    assert_eq!(rec.damaged_ranges, 1);
    // The torn entry's bytes, and not one more (each entry 12 + 10 + 2).
    assert_eq!(rec.damaged_bytes, 24 - 5);
    assert_eq!(ids(&readable(&b)), BTreeSet::from(["a".to_string(), "b".to_string()]));
    // Appends continue after recovery and drain normally.
    append_ids(&mut b, &["d".into()]);
    let entries = readable(&b);
    for e in &entries {
        b.ack(e.seq);
    }
    assert_eq!(b.pending(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Ack(usize),
    /// A failed delivery: the record must stay; the buffer is not told.
    Fail,
    Persist,
    Crash,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..5).prop_map(Op::Append),
        3 => (0usize..64).prop_map(Op::Ack),
        1 => Just(Op::Fail),
        1 => Just(Op::Persist),
        1 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

/// About three records of the model's.
const SMALL_SEGMENT: u64 = 96;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Against a model: nothing appended (answered) is lost until delivered,
    /// and nothing delivered behind a persisted cursor ever comes back.
    #[test]
    fn buffer_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = Wal::open(dir.path()).unwrap();
        // Small segments: rotation and deletion happen within a case.
        b.segment_bytes = SMALL_SEGMENT;
        let mut next_id = 0u64;
        let mut appended: BTreeSet<String> = BTreeSet::new();
        // Delivered and acked, not yet behind a persisted cursor.
        let mut acked: BTreeSet<String> = BTreeSet::new();
        // Delivered behind a persisted cursor: must never come back.
        let mut gone: BTreeSet<String> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Append(n) => {
                    let new: Vec<String> = (0..n).map(|_| { next_id += 1; format!("id-{next_id}") }).collect();
                    append_ids(&mut b, &new);
                    appended.extend(new);
                }
                Op::Ack(i) => {
                    let pending: Vec<Entry> = readable(&b).into_iter()
                        .filter(|e| !acked.contains(&String::from_utf8(e.payload.clone()).unwrap())).collect();
                    if let Some(e) = pending.get(i % pending.len().max(1)) {
                        b.ack(e.seq);
                        acked.insert(String::from_utf8(e.payload.clone()).unwrap());
                    }
                }
                Op::Fail => {}
                Op::Persist => {
                    b.persist_cursor().unwrap();
                    let wm = b.watermark();
                    let below: Vec<String> = acked.iter().filter(|id| {
                        // Everything acked whose seq is below the watermark.
                        let n: u64 = id[3..].parse().unwrap();
                        n <= wm && !readable(&b).iter().any(|e| e.payload == id.as_bytes())
                    }).cloned().collect();
                    for id in below {
                        acked.remove(&id);
                        gone.insert(id);
                    }
                }
                Op::Crash | Op::Reopen => {
                    if matches!(op, Op::Reopen) {
                        b.persist_cursor().unwrap();
                    }
                    let wm_before = b.watermark();
                    drop(b);
                    let (nb, _) = Wal::open(dir.path()).unwrap();
                    b = nb;
                    b.segment_bytes = SMALL_SEGMENT;
                    prop_assert!(b.watermark() <= wm_before);
                    let now: BTreeSet<String> = ids(&readable(&b));
                    // Acks held only in memory are forgotten: those come back.
                    let wm = b.watermark();
                    acked.retain(|id| !now.contains(id));
                    let _ = wm;
                }
            }
            let now = ids(&readable(&b));
            let must_have: BTreeSet<String> = appended.difference(&acked).filter(|id| !gone.contains(*id)).cloned().collect();
            prop_assert!(now.is_superset(&must_have), "lost: {:?}", must_have.difference(&now).collect::<Vec<_>>());
            prop_assert!(now.is_disjoint(&gone), "came back: {:?}", now.intersection(&gone).collect::<Vec<_>>());
            prop_assert!(now.is_subset(&appended));
            prop_assert!(now.is_disjoint(&acked), "delivered records are not read again");
            prop_assert_eq!(b.pending(), now.len() as u64);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_answers_and_hands_on_each_record_with_its_number() {
    writer_numbers_and_hands_on(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_on_the_runtime_answers_and_hands_on_each_record_with_its_number() {
    writer_numbers_and_hands_on(false).await;
}

#[tokio::test]
async fn a_writer_that_panicked_refuses_appends_and_says_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path()).unwrap();
    let wal = std::sync::Arc::new(std::sync::Mutex::new(wal));
    let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
    let writer =
        Writer::spawn("wal-test", wal, false, timer, |_, _: Vec<Written<()>>| panic!("hand-off failed"), |_, _| {})
            .unwrap();
    let watch = writer.watch();
    assert!(watch.is_running());
    let first = writer.append(std::sync::Arc::from("a"), b"a".to_vec(), ()).await;
    assert!(first.is_err(), "the record whose hand-off panicked is not confirmed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while watch.is_running() {
        assert!(std::time::Instant::now() < deadline, "a stopped writer is reported");
        tokio::task::yield_now().await;
    }
    let next = writer.append(std::sync::Arc::from("b"), b"b".to_vec(), ()).await;
    assert_eq!(next, Err("the log's writer has stopped".to_string()));
}

#[tokio::test(flavor = "current_thread")]
async fn the_writer_on_a_single_threaded_runtime_shares_a_batch_between_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path()).unwrap();
    let wal = std::sync::Arc::new(std::sync::Mutex::new(wal));
    let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = batches.clone();
    let writer = Writer::spawn(
        "wal-test",
        wal,
        false,
        timer,
        move |_, written: Vec<Written<String>>| sink.lock().unwrap().push(written.len()),
        |_, _| {},
    )
    .unwrap();
    let answers = futures_join(&writer, 50).await;
    assert_eq!(answers.len(), 50);
    let batches = batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 50, "every record handed on once");
    assert!(batches.len() < 50, "records that queue together share a write: {batches:?}");
}

async fn writer_numbers_and_hands_on(sync_each: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path()).unwrap();
    let wal = std::sync::Arc::new(std::sync::Mutex::new(wal));
    let handed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let timer = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
    let sink = handed.clone();
    let writer = Writer::spawn(
        "wal-test",
        wal.clone(),
        sync_each,
        timer,
        move |_, written: Vec<Written<String>>| {
            sink.lock().unwrap().extend(written.into_iter().map(|w| (w.seq, w.extra)));
        },
        |_, _| {},
    )
    .unwrap();
    // Many at once, so that they share batches.
    let answers = futures_join(&writer, 50).await;
    let mut seqs: Vec<u64> = answers.iter().map(|(seq, _)| *seq).collect();
    seqs.sort();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>(), "each record its own number");
    let mut handed = handed.lock().unwrap().clone();
    handed.sort();
    let mut answered: Vec<(u64, String)> = answers;
    answered.sort();
    assert_eq!(handed, answered, "handed on with the number its caller was given");
    // And in the file under that number.
    let stored = wal.lock().unwrap().read_from(0, 100).unwrap();
    for (seq, extra) in &answered {
        assert_eq!(&stored[*seq as usize].payload, extra.as_bytes());
    }
}

/// `n` appends at once through `writer`: (the number each was given, its payload).
async fn futures_join(writer: &Writer<String>, n: usize) -> Vec<(u64, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let w = writer.clone();
            tokio::spawn(async move {
                let body = format!("record-{i}");
                let seq = w.append(std::sync::Arc::from(body.as_str()), body.clone().into_bytes(), body.clone()).await;
                (seq.unwrap(), body)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
