//! A private `redis-server` on a free port.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, start_on_fresh_ports};

/// A private `redis-server` on a free port, nothing persisted.
pub struct RedisServer {
    pub port: u16,
    proc: Option<Proc>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        start_on_fresh_ports("redis-server", || {
            let mut r = RedisServer { port: free_port(), proc: None };
            r.try_spawn().map(|()| r)
        })
    }

    /// Restarts on the same port (retrying while the old one lets it go).
    fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.try_spawn() {
            assert!(Instant::now() < deadline, "redis-server did not start on {}:\n{e}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        let proc = Proc::spawn(cmd);
        proc.wait_ready(Duration::from_secs(5), "Ready to accept connections", "Address already in use")?;
        self.proc = Some(proc);
        Ok(())
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
