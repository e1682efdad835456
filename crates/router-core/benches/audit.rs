//! The embedded audit store (`audit::log`): how fast records go in (record,
//! then flush), and what a lookup costs with a week of hourly segments
//! behind it, for a record that is there and for an id that is not (which
//! reads every segment's index). Run with `cargo bench --bench audit` (part
//! of `make bench`).

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use router_core::audit::{AuditRecord, AuditStore};
use router_core::metrics::Metrics;

const HOURS: u64 = 168;
const PER_HOUR: u64 = 1_000;

fn record(hour: u64, i: u64, finished: SystemTime) -> AuditRecord {
    AuditRecord {
        request_id: Arc::from(format!("req-{hour}-{i}").as_str()),
        organization_id: Arc::from("org-bench"),
        key_id: None,
        model: Arc::from("gpt-4o"),
        status: 200,
        backend_id: Some(Arc::from("backend-1")),
        error: None,
        latency_ms: 1.5,
        started_at: finished,
        finished_at: finished,
        attempts: vec![],
        usage: None,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0
}

type Result<T> = std::result::Result<T, Box<dyn Error>>;

async fn lookups(store: &AuditStore, ids: &[String]) -> Result<(f64, f64, usize)> {
    let mut took = Vec::with_capacity(ids.len());
    let mut found = 0;
    for id in ids {
        let t0 = Instant::now();
        found += usize::from(store.get(id, Some("org-bench")).await?.is_some());
        took.push(t0.elapsed());
    }
    took.sort();
    Ok((pct(&took, 0.5), pct(&took, 0.99), found))
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let store = AuditStore::open(dir.path(), Metrics::new(), Duration::from_millis(10))?;
        let now = SystemTime::now();
        let t0 = Instant::now();
        for hour in 0..HOURS {
            let finished = now - Duration::from_secs((HOURS - hour) * 3600);
            // Concurrent requests, as the journal sees them.
            let tasks: Vec<_> = (0..PER_HOUR)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { store.record(&record(hour, i, finished)).await })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
        }
        store.flush().await;
        let fill = t0.elapsed();
        let n = HOURS * PER_HOUR;
        println!(
            "audit fill: {n} records over {HOURS} hours in {:.1} s ({:.0} records/s, recorded concurrently, 1,000 at a time)",
            fill.as_secs_f64(),
            n as f64 / fill.as_secs_f64()
        );
        // One more record seals the last old hour.
        store.record(&record(HOURS, 0, now)).await?;
        let segments = std::fs::read_dir(dir.path().join("log"))?.count();
        println!("audit log: {segments} files (segments, indexes, LOCK)");
        let present: Vec<String> =
            (0..200).map(|_| format!("req-{}-{}", fastrand::u64(..HOURS), fastrand::u64(..PER_HOUR))).collect();
        let (p50, p99, found) = lookups(&store, &present).await?;
        assert_eq!(found, present.len(), "every recorded id is found");
        println!("audit lookup, present id ({HOURS} sealed hours): p50 {p50:.3} ms, p99 {p99:.3} ms (200 lookups)");
        let absent: Vec<String> = (0..200).map(|k| format!("absent-{k}")).collect();
        let (p50, p99, found) = lookups(&store, &absent).await?;
        assert_eq!(found, 0);
        println!("audit lookup, absent id ({HOURS} sealed hours): p50 {p50:.3} ms, p99 {p99:.3} ms (200 lookups)");
        Ok(())
    })
}
