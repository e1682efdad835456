//! The mock backend as a process (`mock-backend`), restartable on its port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::http::{get_json, send};
use crate::process::Proc;

pub struct Mock {
    pub id: String,
    pub addr: SocketAddr,
    /// Where `/mock/stats` and `/mock/faults` answer in plain HTTP (the
    /// serving port itself, unless it serves TLS).
    control: SocketAddr,
    tls: bool,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Mock {
    /// Starts `mock-backend` with `args` (e.g. `--tls-cert`, `--tls-key`).
    pub fn start(id: &str, args: &[&str]) -> Mock {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let proc = spawn_mock(id, "127.0.0.1:0", &args);
        let line = proc
            .wait_for_line(Duration::from_secs(10), |l| l.starts_with("mock-backend listening on "))
            .unwrap_or_else(|| panic!("mock-backend did not start:\n{}", proc.lines().join("\n")));
        let addr = line.trim_start_matches("mock-backend listening on ").parse().unwrap();
        let control = proc
            .lines()
            .iter()
            .find_map(|l| l.strip_prefix("mock-backend control on ").map(|a| a.parse().unwrap()))
            .unwrap_or(addr);
        let tls = args.iter().any(|a| a == "--tls-cert");
        Mock { id: id.to_string(), addr, control, tls, args, proc: Some(proc) }
    }

    /// The serving URL: `https://` for a TLS mock.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    fn control_url(&self) -> String {
        format!("http://{}", self.control)
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
                if let Some(control) = proc
                    .lines()
                    .iter()
                    .find_map(|l| l.strip_prefix("mock-backend control on ").map(|a| a.parse().unwrap()))
                {
                    self.control = control;
                }
                self.proc = Some(proc);
                return;
            }
            assert!(Instant::now() < deadline, "mock-backend could not rebind {}", self.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub async fn stats(&self) -> Value {
        get_json(&format!("{}/mock/stats", self.control_url()), &[]).await.1
    }

    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap()
    }

    pub async fn faults(&self, faults: Value) {
        let r = send(Method::POST, &format!("{}/mock/faults", self.control_url()), &[], faults.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
}

fn spawn_mock(id: &str, listen: &str, args: &[String]) -> Proc {
    let mut cmd = std::process::Command::new(crate::bin("mock-backend"));
    cmd.args(["--listen", listen, "--id", id]).args(args);
    Proc::spawn(cmd)
}

/// `BACKEND_ENDPOINTS` naming one backend of each kind the doors reach:
/// `native` (native), `openai` (openai) and `anthropic` (anthropic).
pub fn endpoints_of_every_kind(native: &Mock, openai: &Mock, anthropic: &Mock) -> String {
    format!("{},{},{}=anthropic+{}", native.endpoint(), openai.openai_endpoint(), anthropic.id, anthropic.url())
}
