//! The PostgreSQL audit store against a real server: retention drops whole
//! daily partitions and keeps the rest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use router_core::audit::{AuditRecord, AuditStore};
use router_core::metrics::Metrics;
use test_support::Postgres;
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(86_400);

fn record(id: &str, finished: SystemTime) -> AuditRecord {
    AuditRecord {
        request_id: Arc::from(id),
        organization_id: Arc::from("org"),
        key_id: None,
        model: Arc::from("m"),
        status: 200,
        backend_id: Some(Arc::from("b1")),
        error: Some("a NUL \u{0} in a backend's error".into()),
        latency_ms: 1.5,
        started_at: finished,
        finished_at: finished,
        attempts: vec![],
        usage: None,
    }
}

fn partitions(pg: &Postgres) -> Vec<String> {
    let sql = "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
               JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_records' ORDER BY 1";
    pg.psql("retention", sql).lines().map(str::to_string).collect()
}

fn partition_of(t: SystemTime) -> String {
    let days = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    // The UTC date of the day, by date(1): an independent computation.
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", days * 86_400), "+audit_records_d%Y%m%d"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_partitions_whole_and_keeps_the_rest() {
    let pg = Postgres::start();
    let url = pg.create_database("retention");
    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open_postgres(dir.path(), Metrics::new(), &url, None).unwrap();
    let cancel = CancellationToken::new();
    // The background rounds keep 30 days (they run at once, concurrently
    // with this test); the cut-off under test is applied by hand below.
    let background = tokio::spawn(store.clone().run(30 * DAY, Duration::from_secs(3600), cancel.clone()));
    let now = SystemTime::now();
    let ages = [("ten-days", 10u32), ("eight-days", 8), ("six-days", 6), ("today", 0)];
    for (id, days) in ages {
        store.record(&record(id, now - DAY * days)).await.unwrap();
    }
    for (id, _) in ages {
        let found = store.get(id, Some("org")).await.unwrap().unwrap_or_else(|| panic!("{id} not stored"));
        let v: serde_json::Value = serde_json::from_slice(&found).unwrap();
        assert_eq!(v["request_id"], id);
        assert_eq!(v["error"], "a NUL \u{fffd} in a backend's error", "jsonb has no NUL: replaced");
    }
    // The background round creates the coming days' partitions.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !partitions(&pg).contains(&partition_of(now + DAY)) {
        assert!(std::time::Instant::now() < deadline, "the coming days' partitions: {:?}", partitions(&pg));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = partitions(&pg);
    for (_, days) in ages {
        assert!(before.contains(&partition_of(now - DAY * days)), "{before:?}");
    }

    assert_eq!(store.prune(now - 7 * DAY).await.unwrap(), 2);
    let after = partitions(&pg);
    assert!(!after.contains(&partition_of(now - DAY * 10)) && !after.contains(&partition_of(now - DAY * 8)));
    assert!(after.contains(&partition_of(now - DAY * 6)) && after.contains(&partition_of(now)), "{after:?}");
    assert_eq!(after.len(), before.len() - 2);
    for (id, days) in ages {
        let found = store.get(id, Some("org")).await.unwrap();
        assert_eq!(found.is_some(), days < 7, "{id}");
    }
    assert_eq!(pg.psql("retention", "SELECT count(*) FROM audit_records"), "2");
    // Pruning again drops nothing more.
    assert_eq!(store.prune(now - 7 * DAY).await.unwrap(), 0);
    cancel.cancel();
    background.await.unwrap();
}
