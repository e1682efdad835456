//! Test harness: real `api-router` and `mock-backend` processes on ports the
//! OS picks, driven over HTTP. Every wait is a condition with a deadline.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const KEY_A: &str = "key-org-a";
pub const KEY_B: &str = "key-org-b";

/// A child process whose stdout and stderr lines are collected.
pub struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc { child, lines, exited: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line matching `pred`; returns it.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn json_field(line: &str, field: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get(field)?.as_str().map(str::to_owned)
}

/// A log line's `message`, if it is a JSON log line.
pub fn log_message(line: &str) -> Option<String> {
    json_field(line, "message")
}

pub struct Mock {
    pub id: String,
    pub addr: SocketAddr,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Mock {
    pub fn start(id: &str, args: &[&str]) -> Mock {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let proc = spawn_mock(id, "127.0.0.1:0", &args);
        let line = proc
            .wait_for_line(Duration::from_secs(10), |l| l.starts_with("mock-backend listening on "))
            .expect("mock-backend did not start");
        let addr = line.trim_start_matches("mock-backend listening on ").parse().unwrap();
        Mock { id: id.to_string(), addr, args, proc: Some(proc) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `id=url`, for BACKEND_ENDPOINTS.
    pub fn endpoint(&self) -> String {
        format!("{}={}", self.id, self.url())
    }

    /// `id=openai+url`: an OpenAI-compatible backend.
    pub fn openai_endpoint(&self) -> String {
        format!("{}=openai+{}", self.id, self.url())
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let proc = spawn_mock(&self.id, &self.addr.to_string(), &self.args);
            if proc.wait_for_line(Duration::from_secs(5), |l| l.starts_with("mock-backend listening on ")).is_some() {
                self.proc = Some(proc);
                return;
            }
            assert!(Instant::now() < deadline, "mock-backend could not rebind {}", self.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub async fn stats(&self) -> Value {
        get_json(&format!("{}/mock/stats", self.url()), &[]).await.1
    }

    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap()
    }

    pub async fn faults(&self, faults: Value) {
        let r = send(Method::POST, &format!("{}/mock/faults", self.url()), &[], faults.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
}

fn spawn_mock(id: &str, listen: &str, args: &[String]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mock-backend"));
    cmd.args(["--listen", listen, "--id", id]).args(args);
    Proc::spawn(cmd)
}

/// A running router with its own data dir.
pub struct Router {
    pub addr: SocketAddr,
    pub proc: Proc,
    pub data_dir: PathBuf,
    env: HashMap<String, String>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct RouterBuilder {
    env: HashMap<String, String>,
    data_dir: Option<PathBuf>,
}

impl RouterBuilder {
    pub fn new(backends: &[&Mock]) -> Self {
        let mut env = HashMap::new();
        env.insert("HTTP_ADDR".into(), "127.0.0.1:0".into());
        env.insert("ADMIN_TOKEN".into(), ADMIN_TOKEN.into());
        env.insert("API_KEYS".into(), format!("{KEY_A}=org-a,{KEY_B}=org-b"));
        env.insert("HEALTH_CHECK_INTERVAL_MS".into(), "500".into());
        env.insert("HEALTH_CHECK_TIMEOUT_MS".into(), "300".into());
        env.insert("BACKEND_TIMEOUT_MS".into(), "5000".into());
        env.insert("RUST_LOG".into(), "info".into());
        // Load tests here are about routing; the limits tests set their own.
        env.insert("RATE_LIMIT_DEFAULT_RPS".into(), "0".into());
        if !backends.is_empty() {
            env.insert("BACKEND_ENDPOINTS".into(), backends.iter().map(|m| m.endpoint()).collect::<Vec<_>>().join(","));
        }
        RouterBuilder { env, data_dir: None }
    }

    /// The backends as OpenAI-compatible ones.
    pub fn openai(mut self, backends: &[&Mock]) -> Self {
        let v = backends.iter().map(|m| m.openai_endpoint()).collect::<Vec<_>>().join(",");
        self.env.insert("BACKEND_ENDPOINTS".into(), v);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    pub fn without(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    pub fn start(self) -> Router {
        let (tmp, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().unwrap();
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let proc = spawn_router(&self.env, &data_dir);
        let addr = wait_started(&proc);
        Router { addr, proc, data_dir, env: self.env, _tmp: tmp }
    }
}

impl RouterBuilder {
    /// Starts on `old`'s data dir, keeping that dir alive (after a kill).
    pub fn start_keeping(mut self, old: Router) -> Router {
        let Router { data_dir, proc, _tmp, .. } = old;
        drop(proc);
        self.data_dir = Some(data_dir);
        let mut router = self.start();
        router._tmp = _tmp;
        router
    }
}

fn spawn_router(env: &HashMap<String, String>, data_dir: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_api-router"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(env).env("DATA_DIR", data_dir);
    Proc::spawn(cmd)
}

fn wait_started(proc: &Proc) -> SocketAddr {
    let line = proc
        .wait_for_line(Duration::from_secs(20), |l| log_message(l).as_deref() == Some("HTTP server starting"))
        .unwrap_or_else(|| panic!("router did not start; output:\n{}", proc.lines().join("\n")));
    json_field(&line, "addr").unwrap().parse().unwrap()
}

impl Router {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops with SIGTERM and starts again on the same data dir and settings.
    pub fn restart(&mut self) {
        self.proc.signal("TERM");
        let status = self.proc.wait_exit(Duration::from_secs(15)).expect("router did not stop");
        assert!(status.success(), "router exited with {status}");
        self.proc = spawn_router(&self.env, &self.data_dir);
        self.addr = wait_started(&self.proc);
    }

    pub async fn infer(&self, key: &str, body: Value) -> Resp {
        send(Method::POST, &self.url("/v1/inference"), &[("x-api-key", key)], body.to_string()).await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        send(Method::GET, &self.url(path), &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))], String::new()).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> Resp {
        send(
            Method::POST,
            &self.url(path),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}")), ("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        send(Method::GET, &self.url("/metrics"), &[], String::new()).await.text()
    }

    pub async fn decisions(&self, query: &str) -> Vec<Value> {
        let r = self.admin_get(&format!("/v1/admin/routing/decisions?{query}")).await;
        assert_eq!(r.status, StatusCode::OK);
        r.json()["decisions"].as_array().unwrap().clone()
    }

    /// Waits until the health monitor has checked every backend once.
    pub async fn wait_health_round(&self) {
        let ok = eventually(Duration::from_secs(5), || async {
            let r = self.admin_get("/v1/admin/routing/backends").await.json();
            let ids: Vec<String> = r["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["backend_id"].as_str().unwrap().to_string())
                .collect();
            for id in ids {
                let h = self.admin_get(&format!("/v1/admin/routing/backends/{id}/health")).await.json();
                if h["last_check"].is_null() {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(ok, "no health round within 5 s");
    }

    pub async fn backend_status(&self, id: &str) -> String {
        let r = self.admin_get(&format!("/v1/admin/routing/backends/{id}/health")).await;
        r.json()["status"].as_str().unwrap_or_default().to_string()
    }
}

/// The value of one sample line of a Prometheus exposition, e.g.
/// `metric(text, "router_failover_total", &[("backend_id", "b")])`, summed
/// over the series that carry those labels.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
    /// Asserts an error response: status and `error.code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let j = self.json();
        assert_eq!(j["error"]["code"], code, "body: {j}");
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "message: {j}");
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Full<Bytes>>> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http())
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(b.body(Full::new(body.into())).unwrap()))
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer in 30 s"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = resp.into_parts();
    Resp { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

pub async fn get_json(url: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = send(Method::GET, url, headers, String::new()).await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn policy(org: &str, model: &str, weights: &[(&str, u32)], threshold: u32) -> Value {
    serde_json::json!({
        "policy_id": format!("policy-{org}-{model}"),
        "organization_id": org,
        "model": model,
        "backends": weights.iter().map(|(id, w)| serde_json::json!({"backend_id": id, "weight": w})).collect::<Vec<_>>(),
        "failover_threshold": threshold,
    })
}

/// Sends `n` inference requests, `concurrency` at a time; returns how many
/// were answered by each backend (`X-Backend-Id`) and the non-200 answers.
pub async fn load(
    router: &Router,
    key: &str,
    model: &str,
    n: usize,
    concurrency: usize,
) -> (HashMap<String, usize>, Vec<Resp>) {
    let url = router.url("/v1/inference");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, key, model, next) = (url.clone(), key.to_string(), model.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut by_backend: HashMap<String, usize> = HashMap::new();
            let mut failures = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let body = serde_json::json!({"model": model, "payload": "hello"}).to_string();
                let r = send(Method::POST, &url, &[("x-api-key", &key)], body).await;
                if r.status == StatusCode::OK {
                    *by_backend.entry(r.header("x-backend-id").unwrap_or_default()).or_default() += 1;
                } else {
                    failures.push(r);
                }
            }
            (by_backend, failures)
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (b, f) = t.await.unwrap();
        for (k, v) in b {
            *total.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    (total, failures)
}

/// The audit record of `request_id`, waiting for the batched writer.
pub async fn wait_audit(router: &Router, request_id: &str, headers: &[(&str, &str)]) -> Value {
    let url = router.url(&format!("/v1/audit/requests/{request_id}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, v) = get_json(&url, headers).await;
        if status == StatusCode::OK {
            return v;
        }
        assert!(Instant::now() < deadline, "no audit record for {request_id}: {status} {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private `redis-server` on a free port, nothing persisted.
pub struct RedisServer {
    pub port: u16,
    proc: Option<Proc>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer { port: free_port(), proc: None };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            let proc = Proc::spawn(cmd);
            if proc.wait_for_line(Duration::from_secs(5), |l| l.contains("Ready to accept connections")).is_some() {
                self.proc = Some(proc);
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start on {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGSTOP / SIGCONT: Redis hangs without closing connections.
    pub fn pause(&self, paused: bool) {
        self.proc.as_ref().unwrap().signal(if paused { "STOP" } else { "CONT" });
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(p) = &self.proc {
            // A paused process must be continued to die cleanly.
            let _ = Command::new("kill").args(["-CONT", &p.pid().to_string()]).status();
        }
        self.kill();
    }
}

impl Router {
    pub async fn admin_put(&self, path: &str, body: Value) -> Resp {
        send(
            Method::PUT,
            &self.url(path),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}")), ("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    pub async fn readiness(&self) -> Value {
        get_json(&self.url("/v1/status/readyz"), &[]).await.1
    }
}

/// Fires `n` requests at once (released together by a barrier), spread over
/// `routers` in turn; returns the responses.
pub async fn burst(routers: &[&Router], key: &str, model: &str, n: usize) -> Vec<Resp> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = routers[i % routers.len()].url("/v1/inference");
        let (key, model, barrier) = (key.to_string(), model.to_string(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": model, "request_id": format!("burst-{i}-{}", fastrand::u64(..))})
                .to_string();
            barrier.wait().await;
            send(Method::POST, &url, &[("x-api-key", &key)], body).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

pub fn count_status(resps: &[Resp], status: u16) -> usize {
    resps.iter().filter(|r| r.status.as_u16() == status).count()
}

/// A private Kafka-protocol broker (tansu, sqlite storage) on a free port,
/// with the usage topic created. Records survive a broker restart.
pub struct Broker {
    pub port: u16,
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
        let mut b = Broker { port: free_port(), dir: tempfile::tempdir().unwrap(), proc: None };
        b.spawn();
        let out = Command::new(tansu())
            .args(["topic", "create", TOPIC, "--partitions", "1", "--broker", &b.url()])
            .current_dir(b.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "topic create: {}", String::from_utf8_lossy(&out.stderr));
        b
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(tansu());
        cmd.args([
            "broker",
            "--listener-url",
            &self.url(),
            "--advertised-listener-url",
            &self.url(),
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(self.dir.path());
        let proc = Proc::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen:\n{}", proc.lines().join("\n"));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(proc);
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
/// keys are seen (or `timeout`), then for a short while more to catch
/// duplicates. Returns (key, payload) pairs.
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
        let mut settle_until: Option<Instant> = None;
        loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let payload: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
                keys.insert(key.clone());
                out.push((key, payload));
            }
            if keys.len() >= want && settle_until.is_none() {
                settle_until = Some(Instant::now() + Duration::from_millis(500));
            }
            if settle_until.is_some_and(|t| Instant::now() > t) || Instant::now() > deadline {
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

/// A private etcd on free ports, in a temp dir.
pub struct Etcd {
    pub port: u16,
    peer: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut e = Etcd { port: free_port(), peer: free_port(), dir: tempfile::tempdir().unwrap(), proc: None };
        e.spawn();
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "test",
            "--data-dir",
            &self.dir.path().join("data").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
        ]);
        let proc = Proc::spawn(cmd);
        let ok = proc.wait_for_line(Duration::from_secs(20), |l| l.contains("ready to serve client requests"));
        assert!(ok.is_some(), "etcd did not start:\n{}", proc.lines().join("\n"));
        self.proc = Some(proc);
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

    /// Runs `etcdctl` against this etcd; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }
}

/// A TCP proxy on a free port that can cut every connection and refuse new
/// ones (`set_open(false)`), to break a client's watch without touching etcd.
pub struct Proxy {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (o, g) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (o, g) = (o.clone(), g.clone());
                let born = g.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let cut = async {
                        while o.load(std::sync::atomic::Ordering::SeqCst)
                            && g.load(std::sync::atomic::Ordering::SeqCst) == born
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy { port, open, generation }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_open(&self, open: bool) {
        if !open {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

/// GET and parse JSON; `None` if nothing answers (a server still starting).
pub async fn try_get_json(url: &str) -> Option<Value> {
    let req = Request::builder().uri(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req)).await.ok()?.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}
