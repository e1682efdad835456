//! Propagation delay of the config service: from an etcd put of a policy to
//! the new snapshot being in force in the router, over 200 updates. Starts
//! its own etcd on free ports. Run with `cargo bench --bench config`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use router_core::config_service::{BackendSpec, ConfigState, ConfigStore};
use router_core::metrics::Metrics;
use router_etcd::{EtcdSettings, EtcdSource};
use router_providers::transport::Transports;
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(23790)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = match Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config bench skipped: cannot start etcd: {e}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let mut client = loop {
            if let Ok(mut c) = etcd_client::Client::connect([client_url.as_str()], None).await
                && c.status().await.is_ok()
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut base = ConfigState { default_route: true, default_failover_threshold: 3, ..Default::default() };
        for id in ["backend-1", "backend-2"] {
            base.backends.insert(id.into(), BackendSpec::new("http://127.0.0.1:9").unwrap_or_else(|e| panic!("{e}")));
        }
        let metrics = Metrics::new();
        let transports = Arc::new(Transports::new(Default::default()).unwrap_or_else(|e| panic!("{e}")));
        let store = Arc::new(ConfigStore::new(base.clone(), metrics.clone(), transports));
        let settings = EtcdSettings { endpoints: vec![client_url.clone()], prefix: "/api-router".into() };
        let source = EtcdSource::start(settings, base, store.clone(), metrics, dir.path()).await;
        let cancel = CancellationToken::new();
        tokio::spawn(source.clone().watch_loop(cancel.clone()));
        // Let the watch establish.
        while !source.is_healthy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut samples = Vec::with_capacity(200);
        for i in 0..200u32 {
            let value = format!(
                r#"{{"policy_id":"p","organization_id":"org-a","model":"gpt-4o","backends":[{{"backend_id":"backend-1","weight":{}}},{{"backend_id":"backend-2","weight":1}}],"failover_threshold":3}}"#,
                i + 1
            );
            let t0 = Instant::now();
            let put = client.put("/api-router/policies/org-a/gpt-4o", value, None).await.unwrap_or_else(|e| panic!("{e}"));
            let rev = put.header().map(|h| h.revision()).unwrap_or(0) as u64;
            while store.load().revision < rev {
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
            samples.push(t0.elapsed());
        }
        samples.sort();
        let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
        println!("etcd put → applied in the router, 200 updates: median {:.2} ms, p99 {:.2} ms, max {:.2} ms", p(0.5), p(0.99), p(1.0));
        cancel.cancel();
    });
    let _ = etcd.kill();
    let _ = etcd.wait();
}
