//! A private Kafka-protocol broker (tansu) and a consumer that reads the
//! usage topic.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Proc, free_port, start_on_fresh_ports};

/// A private Kafka-protocol broker (tansu, sqlite storage) on a free port,
/// with the usage topic created. Records survive a broker restart.
pub struct Broker {
    pub port: u16,
    /// The port clients are told to use (a proxy's, or `port`).
    advertised: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

pub const TOPIC: &str = "api-router.usage";

fn tansu() -> String {
    std::env::var("TANSU_BIN").unwrap_or_else(|_| {
        let cargo_bin = std::path::Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
        if cargo_bin.exists() { cargo_bin.to_string_lossy().into_owned() } else { "tansu".into() }
    })
}

impl Broker {
    pub fn start() -> Broker {
        start_on_fresh_ports("tansu", || {
            let port = free_port();
            Self::try_start_advertising(port, port)
        })
    }

    /// A broker behind a fault proxy: clients bootstrap through the proxy,
    /// and the broker names the proxy in its metadata, so every connection
    /// goes through it.
    pub async fn start_behind_proxy() -> (Broker, crate::proxy::Proxy) {
        let port = free_port();
        let proxy = crate::proxy::Proxy::start(port).await;
        let advertised = proxy.port;
        let broker = tokio::task::spawn_blocking(move || Self::start_advertising(port, advertised)).await.unwrap();
        (broker, proxy)
    }

    fn start_advertising(port: u16, advertised: u16) -> Broker {
        Self::try_start_advertising(port, advertised).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_advertising(port: u16, advertised: u16) -> Result<Broker, String> {
        let mut b = Broker { port, advertised, dir: tempfile::tempdir().unwrap(), proc: None };
        b.try_spawn()?;
        let out = Command::new(tansu())
            .args(["topic", "create", TOPIC, "--partitions", "1", "--broker", &b.url()])
            .current_dir(b.dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!("topic create: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(b)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// What clients connect to (the proxy, when behind one).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// Restarts on the same port.
    fn spawn(&mut self) {
        self.try_spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(tansu());
        cmd.args([
            "broker",
            "--listener-url",
            &self.url(),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{}", self.advertised),
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(self.dir.path());
        let mut proc = Proc::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Listening, and still running (one that lost its port exits).
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() || proc.exited() {
            if Instant::now() > deadline || proc.exited() {
                return Err(format!("tansu did not listen on {}:\n{}", self.port, proc.lines().join("\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// What the broker printed.
    pub fn lines(&self) -> Vec<String> {
        self.proc.as_ref().map(|p| p.lines()).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// Every message on the topic, read from the beginning until `want` distinct
/// keys are seen (or `timeout`), then on to the partition's high watermark
/// as it is at that moment, so that every message written so far is read,
/// duplicates included. Returns (key, payload) pairs.
pub async fn consume(broker: &Broker, want: usize, timeout: Duration) -> Vec<(String, Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("test-{}", fastrand::u64(..)))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(TOPIC, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let deadline = Instant::now() + timeout;
        // The offset after the last message read.
        let mut next = 0i64;
        // Set once `want` keys are seen: the high watermark to read up to.
        let mut high: Option<i64> = None;
        loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let payload: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
                keys.insert(key.clone());
                out.push((key, payload));
                next = next.max(m.offset() + 1);
            }
            if keys.len() >= want && high.is_none() {
                high = consumer.fetch_watermarks(TOPIC, 0, Duration::from_secs(5)).ok().map(|(_, h)| h);
            }
            if high.is_some_and(|h| next >= h) || Instant::now() > deadline {
                return out;
            }
        }
    })
    .await
    .unwrap()
}

pub fn distinct_keys(msgs: &[(String, Value)]) -> std::collections::HashSet<String> {
    msgs.iter().map(|(k, _)| k.clone()).collect()
}
