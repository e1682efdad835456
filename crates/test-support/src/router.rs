//! The router as a process: a builder over its environment, start, restart,
//! and helpers that drive it (inference, admin, load, bursts, audit).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::http::{Resp, eventually, get_json, send};
use crate::mock::Mock;
use crate::process::{Proc, json_field, log_message};
use crate::{ADMIN_TOKEN, KEY_A, KEY_B};

/// A running router with its own data dir.
pub struct Router {
    pub addr: SocketAddr,
    pub proc: Proc,
    pub data_dir: PathBuf,
    env: HashMap<String, String>,
    wrapper: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct RouterBuilder {
    env: HashMap<String, String>,
    data_dir: Option<PathBuf>,
    wrapper: Vec<String>,
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
        RouterBuilder { env, data_dir: None, wrapper: Vec::new() }
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

    /// Starts the router under a command, e.g. `["prlimit", "--nofile=256"]`.
    pub fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
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
        let proc = spawn_router(&self.env, &data_dir, &self.wrapper);
        let addr = wait_started(&proc);
        Router { addr, proc, data_dir, env: self.env, wrapper: self.wrapper, _tmp: tmp }
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

fn spawn_router(env: &HashMap<String, String>, data_dir: &Path, wrapper: &[String]) -> Proc {
    let mut cmd = match wrapper.split_first() {
        None => Command::new(crate::bin("api-router")),
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(crate::bin("api-router"));
            c
        }
    };
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
        self.proc = spawn_router(&self.env, &self.data_dir, &self.wrapper);
        self.addr = wait_started(&self.proc);
    }

    /// Kills the process with SIGKILL (a crash), and waits for it to be gone.
    pub fn crash(&mut self) {
        self.proc.signal("KILL");
        self.proc.wait_exit(Duration::from_secs(10)).expect("router did not die");
    }

    /// Starts the process again on the same data dir and settings (after a
    /// crash), waiting until it serves.
    pub fn respawn(&mut self) {
        self.proc = spawn_router(&self.env, &self.data_dir, &self.wrapper);
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

    pub async fn admin_delete(&self, path: &str) -> Resp {
        send(Method::DELETE, &self.url(path), &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))], String::new())
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

/// The loss hunt's kills: `rounds` times, steady load from 4 clients (ids
/// `hunt-{round}-{client}-{i}`, org A), SIGKILL at a random moment, then a
/// restart on the same data dir from `builder()`. Returns the router now
/// running, the ids answered 200, and for each kill how many requests it cut
/// (sent, then the connection died): the proof that the kill landed while
/// requests were in flight.
pub async fn kill_under_load(
    mut router: Router,
    rounds: usize,
    builder: impl Fn() -> RouterBuilder,
) -> (Router, std::collections::HashSet<String>, Vec<usize>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut answered = std::collections::HashSet::new();
    let mut cut_per_round = Vec::new();
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..4 {
            let (url, stop) = (router.url("/v1/inference"), stop.clone());
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut cut) = (Vec::new(), 0usize);
                let client =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("hunt-{round}-{c}-{i}");
                    i += 1;
                    let req = hyper::Request::post(&url)
                        .header("x-api-key", KEY_A)
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            serde_json::json!({"request_id": id, "model": "m"}).to_string(),
                        )))
                        .unwrap();
                    match client.request(req).await {
                        Ok(resp) if resp.status() == 200 => ok.push(id),
                        // Refused connections came after the kill; others were cut by it.
                        Err(e) if !e.is_connect() => cut += 1,
                        _ => {}
                    }
                }
                (ok, cut)
            }));
        }
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..400))).await;
        router.proc.signal("KILL");
        stop.store(true, Ordering::SeqCst);
        let mut cut = 0;
        for t in tasks {
            let (ok, c) = t.await.unwrap();
            answered.extend(ok);
            cut += c;
        }
        cut_per_round.push(cut);
        router.proc.wait_exit(Duration::from_secs(5)).expect("killed router exits");
        router = builder().data_dir(&router.data_dir.clone()).start_keeping(router);
    }
    (router, answered, cut_per_round)
}
