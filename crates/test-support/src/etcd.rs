//! A private etcd on free ports.

use std::process::Command;
use std::time::Duration;

use crate::process::{Proc, free_port, start_on_fresh_ports};

/// A private etcd on free ports, in a temp dir.
pub struct Etcd {
    pub port: u16,
    peer: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Etcd {
    pub fn start() -> Etcd {
        start_on_fresh_ports("etcd", || {
            let mut e = Etcd { port: free_port(), peer: free_port(), dir: tempfile::tempdir().unwrap(), proc: None };
            e.try_spawn().map(|()| e)
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Restarts on the same ports.
    fn spawn(&mut self) {
        self.try_spawn().unwrap_or_else(|e| panic!("etcd did not start:\n{e}"));
    }

    fn try_spawn(&mut self) -> Result<(), String> {
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
        proc.wait_ready(Duration::from_secs(20), "ready to serve client requests", "address already in use")?;
        self.proc = Some(proc);
        Ok(())
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
