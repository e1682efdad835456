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
    assert!(rec.set_aside[0].to_string_lossy().contains(".damaged-"));
    assert!(rec.set_aside[0].exists());
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Against a model: nothing appended (answered) is lost until delivered,
    /// and nothing delivered behind a persisted cursor ever comes back.
    #[test]
    fn buffer_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = Wal::open(dir.path()).unwrap();
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
