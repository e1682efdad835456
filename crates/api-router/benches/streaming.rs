//! Time to first token (TTFT) through the router minus TTFT direct, in the
//! same run, at 1 and at 200 concurrent streams, with the mock's chunks 0, 20
//! and 100 ms apart. Starts the real `mock-backend` and `api-router` binaries
//! (release build) on free ports, pinned as in the HTTP harness (router on
//! core 0; mock and this load generator on core 1), and alternates direct and
//! routed rounds after a warm-up round of each. Every socket on the path
//! (this client's, the router's both sides, the mock's) has `TCP_NODELAY`,
//! so no figure waits on a delayed ACK.
//! Run with `cargo bench --bench streaming` (part of `make bench`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const ROUNDS: usize = 5;
/// Streams measured per path and row: one at a time takes the chunk
/// spacing each, so fewer.
fn samples(concurrency: usize) -> usize {
    if concurrency == 1 { 200 } else { 1000 }
}

/// Spawns a process and returns it with the first stdout line matching `pred`.
fn spawn(mut cmd: Command, pred: impl Fn(&str) -> bool) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let line =
        lines.by_ref().map_while(Result::ok).find(|l| pred(l)).unwrap_or_else(|| panic!("process did not start"));
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, line)
}

async fn ttft(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    auth: bool,
) -> Duration {
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut req = hyper::Request::post(url);
    if auth {
        req = req.header("authorization", "Bearer bench-key");
    }
    let req = req.body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let resp = client.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(resp.status().is_success(), "status {}", resp.status());
    let mut body = resp.into_body();
    loop {
        match body.frame().await {
            Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => break,
            Some(Ok(_)) => continue,
            other => panic!("stream ended before its first chunk: {other:?}"),
        }
    }
    let first = t0.elapsed();
    while body.frame().await.is_some() {}
    first
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One round: `concurrency` streams at once, a round's share of the row's
/// samples in all; their TTFTs.
async fn round(client: &HttpClient, url: &str, auth: bool, concurrency: usize) -> Vec<Duration> {
    let n = samples(concurrency) / ROUNDS;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, url) = (client.clone(), url.to_string());
                tokio::spawn(async move { ttft(&client, &url, auth).await })
            })
            .collect();
        for t in tasks {
            out.push(t.await.unwrap_or_else(|e| panic!("{e}")));
        }
    }
    out
}

fn pct(v: &[Duration], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (mut mock, line) = spawn(
        {
            // Pinned as in scripts/bench-http.sh: the router on core 0, the
            // mock and this load generator on core 1.
            let mut c = Command::new("taskset");
            c.args(["-c", "1", env!("CARGO_BIN_EXE_mock-backend"), "--listen", "127.0.0.1:0", "--id", "backend-1"]);
            c
        },
        |l| l.starts_with("mock-backend listening on "),
    );
    let mock_addr = line.trim_start_matches("mock-backend listening on ").to_string();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (mut router, line) = spawn(
        {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", env!("CARGO_BIN_EXE_api-router")]);
            c.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HTTP_ADDR", "127.0.0.1:0")
                .env("BACKEND_ENDPOINTS", format!("backend-1=openai+http://{mock_addr}"))
                .env("API_KEYS", "bench-key=org-bench")
                .env("RATE_LIMIT_DEFAULT_RPS", "0")
                .env("RUST_LOG", "warn,api_router::app=info")
                .env("DATA_DIR", dir.path());
            c
        },
        |l| l.contains("HTTP server starting"),
    );
    let router_addr = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v["addr"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no address in {line}"));

    // The load generator: one thread, and this process pinned to core 1.
    let _ =
        Command::new("taskset").args(["-p", "-c", "1", &std::process::id().to_string()]).stdout(Stdio::null()).status();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let setup = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        // One client per path, kept from the warm-up on, so that both paths
        // measure with their connections already open; rounds alternate, so
        // that drift on the shared machine hits both alike.
        let paths = [
            (format!("http://{mock_addr}/v1/chat/completions"), false),
            (format!("http://{router_addr}/v1/chat/completions"), true),
        ];
        let clients: Vec<HttpClient> = paths
            .iter()
            .map(|_| {
                let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
                http.set_nodelay(true);
                Client::builder(TokioExecutor::new()).pool_max_idle_per_host(200).build(http)
            })
            .collect();
        println!("time to first token, direct and through the router ({ROUNDS} rounds per path and row, alternating):");
        println!("| streams at once | chunk spacing ms | samples per path | direct p50 / p99 ms | via router p50 / p99 ms | router adds p50 / p99 ms |");
        println!("|---|---|---|---|---|---|");
        for concurrency in [1, 200] {
            for spacing in [0, 20, 100] {
                // The first chunk is the measured one; one stream at a time
                // needs only one more (the spacing), many at once get five.
                let chunks = if concurrency == 1 { 2 } else { 5 };
                let faults = hyper::Request::post(format!("http://{mock_addr}/mock/faults"))
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"stream_chunks": {chunks}, "stream_delay_ms": {spacing}}}"#
                    ))))
                    .unwrap_or_else(|e| panic!("{e}"));
                setup.request(faults).await.unwrap_or_else(|e| panic!("{e}"));
                let (mut direct, mut routed) = (Vec::new(), Vec::new());
                for r in 0..=ROUNDS {
                    for (i, (url, auth)) in paths.iter().enumerate() {
                        let ttfts = round(&clients[i], url, *auth, concurrency).await;
                        // Round 0 is the warm-up.
                        if r > 0 {
                            if i == 0 { direct.extend(ttfts) } else { routed.extend(ttfts) }
                        }
                    }
                }
                direct.sort();
                routed.sort();
                let (d50, d99, r50, r99) = (pct(&direct, 0.5), pct(&direct, 0.99), pct(&routed, 0.5), pct(&routed, 0.99));
                println!(
                    "| {concurrency} | {spacing} | {} | {d50:.3} / {d99:.3} | {r50:.3} / {r99:.3} | {:.3} / {:.3} |",
                    direct.len(),
                    r50 - d50,
                    r99 - d99
                );
            }
        }
    });
    let _ = router.kill();
    let _ = router.wait();
    let _ = mock.kill();
    let _ = mock.wait();
}
