//! Usage records: the latency the write-ahead adds to a request at 2,000
//! requests/s, and the publish and drain rates to a real broker (tansu, if
//! installed). Run with `cargo bench --bench usage` (part of `make bench`).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use router_core::metrics::Metrics;
use router_core::usage::publisher::Publisher;
use router_core::usage::{Fsync, FullPolicy, SCHEMA_VERSION, Shared, UsageRecord, UsageSettings, UsageSink};
use tokio_util::sync::CancellationToken;

fn settings(brokers: Option<String>) -> UsageSettings {
    UsageSettings {
        brokers,
        topic: "bench.usage".into(),
        max_records: 10_000_000,
        full_policy: FullPolicy::Reject,
        fsync: Fsync::Interval(Duration::from_millis(200)),
        linger: router_core::usage::publisher::DEFAULT_LINGER,
    }
}

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        schema_version: SCHEMA_VERSION,
        request_id: Arc::from(format!("bench-{i}-{}", fastrand::u64(..)).as_str()),
        organization_id: Arc::from("org-bench"),
        key_id: None,
        model: Arc::from("gpt-4o"),
        served_model: None,
        backend_id: Some(Arc::from("backend-1")),
        decision_type: None,
        attempts: 1,
        status: 200,
        error: None,
        latency_ms: 1.5,
        prompt_tokens: Some(12),
        completion_tokens: Some(9),
        total_tokens: Some(21),
        cache_read_tokens: None,
        cache_write_tokens: None,
        cost: Some(0.03),
        timestamp: SystemTime::now(),
        router_instance_id: Arc::from("bench"),
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

async fn write_ahead_latency() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (sink, _shared) = UsageSink::open(dir.path(), settings(Some("unused:9092".into())), Metrics::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let n = 10_000u64;
    let mut ticker = tokio::time::interval(Duration::from_micros(500));
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        ticker.tick().await;
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let rec = record(i);
            let t0 = Instant::now();
            sink.record(&rec).await.unwrap_or_else(|e| panic!("{e:?}"));
            t0.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        lat.push(t.await.unwrap_or_default());
    }
    lat.sort();
    println!(
        "write-ahead at 2,000 records/s ({n} records, fsync=interval): median {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999)
    );
}

fn tansu() -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_default();
    [std::env::var("TANSU_BIN").unwrap_or_default(), format!("{home}/.cargo/bin/tansu"), "tansu".into()]
        .into_iter()
        .find(|p| !p.is_empty() && Command::new(p).arg("--help").stdout(Stdio::null()).status().is_ok())
}

async fn wait_drained(shared: &Shared, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while shared.pending.load(Ordering::Relaxed) > 0 {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

async fn publish_rates(tansu: &str) {
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(19092);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("tcp://127.0.0.1:{port}");
    let mut broker = Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = Command::new(tansu)
        .args(["topic", "create", "bench.usage", "--partitions", "1", "--broker", &url])
        .current_dir(dir.path())
        .output();
    if !created.is_ok_and(|o| o.status.success()) {
        eprintln!("publish bench skipped: cannot create the topic");
        let _ = broker.kill();
        let _ = broker.wait();
        return;
    }
    let bootstrap = format!("127.0.0.1:{port}");
    let buf_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (sink, shared) = UsageSink::open(buf_dir.path(), settings(Some(bootstrap.clone())), Metrics::new())
        .unwrap_or_else(|e| panic!("{e}"));

    // Drain after an outage: 100,000 records waiting, then the publisher starts.
    let n = 100_000u64;
    fill(&sink, n).await;
    let publisher = Arc::new(
        Publisher::new(&bootstrap, "bench.usage", "bench", router_core::usage::publisher::DEFAULT_LINGER)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let _ = publisher.check().await;
    let cancel = CancellationToken::new();
    let t0 = Instant::now();
    let drainer = tokio::spawn(publisher.clone().run_drainer(shared.clone(), cancel.clone()));
    let drained = wait_drained(&shared, Duration::from_secs(120)).await;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "drain after an outage: {n} records in {secs:.2} s = {:.0} records/s{}",
        n as f64 / secs,
        if drained { "" } else { " (timed out)" }
    );

    // Sustained: records arrive as fast as 8 writers can append while the
    // publisher delivers them.
    let t0 = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let sink = sink.clone();
            tokio::spawn(async move { fill(&sink, n / 8).await })
        })
        .collect();
    for w in writers {
        let _ = w.await;
    }
    let drained = wait_drained(&shared, Duration::from_secs(120)).await;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "sustained publish: {n} records appended and delivered in {secs:.2} s = {:.0} records/s{}",
        n as f64 / secs,
        if drained { "" } else { " (timed out)" }
    );
    cancel.cancel();
    let _ = drainer.await;
    let _ = broker.kill();
    let _ = broker.wait();
}

/// Appends `n` records, 256 at a time concurrently.
async fn fill(sink: &UsageSink, n: u64) {
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 256).min(n))
            .map(|j| {
                let sink = sink.clone();
                tokio::spawn(async move { sink.record(&record(j)).await.unwrap_or_else(|e| panic!("{e:?}")) })
            })
            .collect();
        for t in batch {
            let _ = t.await;
        }
        i += 256;
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        write_ahead_latency().await;
        match tansu() {
            Some(t) => publish_rates(&t).await,
            None => eprintln!("publish bench skipped: tansu is not installed (make test installs it)"),
        }
    });
}
