//! Child processes whose output is collected, free ports, and log lines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

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

    /// Waits for the line saying the server is `ready`; `Err` with the
    /// output when it says its port was `taken` first, or nothing came in time.
    pub fn wait_ready(&self, timeout: Duration, ready: &str, taken: &str) -> Result<(), String> {
        match self.wait_for_line(timeout, |l| l.contains(ready) || l.contains(taken)) {
            Some(l) if l.contains(ready) => Ok(()),
            _ => Err(self.lines().join("\n")),
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.exited.is_some() || self.wait_exit(Duration::ZERO).is_some()
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

pub fn json_field(line: &str, field: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get(field)?.as_str().map(str::to_owned)
}

/// A log line's `message`, if it is a JSON log line.
pub fn log_message(line: &str) -> Option<String> {
    json_field(line, "message")
}

/// A port that was free a moment ago. A server started on it can still lose
/// a race for it: start such servers with a retry on a fresh port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a server with `start`, which picks fresh ports each time and
/// returns why it failed; tries up to 5 times (a port free a moment ago can
/// be taken before the server binds it).
pub fn start_on_fresh_ports<T>(what: &str, mut start: impl FnMut() -> Result<T, String>) -> T {
    let mut errors = Vec::new();
    for _ in 0..5 {
        match start() {
            Ok(t) => return t,
            Err(e) => errors.push(e),
        }
    }
    panic!("{what} did not start in 5 tries:\n{}", errors.join("\n---\n"))
}
