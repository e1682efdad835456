//! A private `redis-server` on a free port.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, start_on_fresh_ports};

/// A private `redis-server` on a free port, nothing persisted.
pub struct RedisServer {
    pub port: u16,
    proc: Option<Proc>,
    /// Also listening on this Unix socket.
    unix_socket: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Listening on `unix_socket` too.
    pub fn start_with_unix_socket(unix_socket: &std::path::Path) -> RedisServer {
        Self::start_with(Some(unix_socket.to_path_buf()))
    }

    fn start_with(unix_socket: Option<std::path::PathBuf>) -> RedisServer {
        start_on_fresh_ports("redis-server", || {
            let mut r = RedisServer { port: free_port(), proc: None, unix_socket: unix_socket.clone() };
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
        if let Some(path) = &self.unix_socket {
            cmd.arg("--unixsocket").arg(path);
        }
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

/// A Redis Cluster of three masters, each with one replica, on free ports
/// (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster
/// create`), nothing persisted. The node timeout is one second, so a killed
/// master is failed over within a few.
pub struct RedisCluster {
    /// The nodes' config and RDB files; removed at drop.
    _dir: tempfile::TempDir,
    nodes: Vec<(u16, Option<Proc>)>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let node = start_on_fresh_ports("redis-server (cluster node)", || {
                let port = free_port();
                spawn_cluster_node(dir.path(), port).map(|p| (port, Some(p)))
            });
            nodes.push(node);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for (port, _) in &nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create.args(["--cluster-replicas", "1", "--cluster-yes"]).output().unwrap();
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { _dir: dir, nodes };
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// The seed URLs, comma-separated (`REDIS_CLUSTER_URLS`).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|(p, _)| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// The node on `port`'s answer to `args` (`None`: it does not answer).
    pub fn cli(port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A running node's answer to `args`.
    pub fn ask(&self, args: &[&str]) -> String {
        self.nodes
            .iter()
            .filter(|(_, p)| p.is_some())
            .find_map(|(port, _)| Self::cli(*port, args))
            .expect("no cluster node answers")
    }

    /// Waits until every running node says `cluster_state:ok`, every slot
    /// has a master that is running and every replica has synced.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let all_ok = self.nodes.iter().filter(|(_, p)| p.is_some()).all(|(port, _)| {
                Self::cli(*port, &["cluster", "info"]).is_some_and(|i| i.contains("cluster_state:ok"))
            });
            let masters = self.masters();
            let masters_alive = masters.iter().all(|m| self.nodes.iter().any(|(p, r)| p == m && r.is_some()));
            // A replica that has not synced with its master cannot take
            // over from it: wait for every running replica's link.
            let synced = self.nodes.iter().filter(|(_, p)| p.is_some()).all(|(port, _)| {
                Self::cli(*port, &["info", "replication"])
                    .is_some_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
            });
            if all_ok && masters_alive && synced && masters.len() == 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not become ok: {}",
                self.ask(&["cluster", "nodes"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The ports of the masters that serve slots, as the cluster sees them.
    fn masters(&self) -> Vec<u16> {
        self.ask(&["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
            .collect()
    }

    /// The port of the master that holds `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = self.ask(&["cluster", "keyslot", key]).trim().parse().unwrap();
        for line in self.ask(&["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if !f.get(2).is_some_and(|flags| flags.contains("master")) || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((lo, hi)) => (lo.parse().unwrap_or(u16::MAX), hi.parse().unwrap_or(0)),
                    None => (range.parse().unwrap_or(u16::MAX), range.parse().unwrap_or(0)),
                };
                if (lo..=hi).contains(&slot) {
                    return f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                }
            }
        }
        panic!("no master holds slot {slot}");
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|(p, _)| *p == port).expect("a node of this cluster");
        if let Some(mut p) = node.1.take() {
            p.kill();
        }
    }

    /// Every key the cluster holds, from every running master.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for m in self.masters() {
            if let Some(out) = Self::cli(m, &["--scan"]) {
                keys.extend(out.lines().map(str::to_string));
            }
        }
        keys
    }
}

fn spawn_cluster_node(dir: &std::path::Path, port: u16) -> Result<Proc, String> {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0"])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{port}.conf")))
        // A replica's first sync writes an RDB file in the working directory.
        .arg("--dir")
        .arg(dir)
        // The cluster bus on a port of its own (the default, port + 10000,
        // can be out of range or taken).
        .args(["--cluster-port", &free_port().to_string()]);
    let proc = Proc::spawn(cmd);
    proc.wait_ready(Duration::from_secs(5), "Ready to accept connections", "Address already in use")?;
    Ok(proc)
}
