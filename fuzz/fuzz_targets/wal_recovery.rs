//! Any bytes as a write-ahead log segment (the usage buffer, the audit
//! journal) at start-up: recovered (intact entries kept, damage set aside),
//! never a panic; what is read back has its checksums right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_core::wal::Wal;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join(format!("seg-{:020}.log", 0)), data).is_err() {
        return;
    }
    let Ok((wal, _recovery)) = Wal::open(dir.path()) else { return };
    let entries = wal.read_from(wal.watermark(), 10_000).unwrap_or_default();
    assert!(entries.len() as u64 <= wal.pending());
});
