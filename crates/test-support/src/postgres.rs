//! A private PostgreSQL server (`initdb` + `postgres`) in a temporary
//! directory on a free port, so that tests can stop and restart it. Run as
//! the `postgres` user when the tests run as root (PostgreSQL refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, start_on_fresh_ports};

pub struct Postgres {
    pub port: u16,
    /// Holds the data directory; removed at drop.
    root: tempfile::TempDir,
    proc: Option<Proc>,
}

/// The directory of `initdb` and `postgres`: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin` (Debian keeps them off the PATH).
/// Looked up once.
fn bin_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(find_bin_dir)
}

fn find_bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/test-deps.sh installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
    })
}

/// `program` as the `postgres` user when we are root (exec'd, not forked:
/// killing the child kills the server).
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            // The server runs as postgres: it must reach and own its directory.
            let ok = Command::new("chmod").arg("755").arg(root.path()).status().unwrap().success()
                && Command::new("chown").args(["-R", "postgres:postgres"]).arg(&data).status().unwrap().success();
            assert!(ok, "cannot hand the data directory to the postgres user");
        }
        let out = command(&bin_dir().join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres { port: 0, root, proc: None };
        start_on_fresh_ports("postgres", || {
            pg.port = free_port();
            pg.try_spawn()
        });
        pg
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = command(&bin_dir().join("postgres"));
        cmd.arg("-D").arg(self.data()).args(["-p", &self.port.to_string(), "-k"]).arg(self.data()).args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "log_min_messages=warning",
        ]);
        let proc = Proc::spawn(cmd);
        proc.wait_ready(Duration::from_secs(20), "ready to accept connections", "could not bind")?;
        self.proc = Some(proc);
        Ok(())
    }

    /// A URL for database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL with psql (`-At`: unaligned, tuples only); panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A fresh, empty database.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal("INT");
            if p.wait_exit(Duration::from_secs(20)).is_none() {
                p.kill();
            }
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = self.try_spawn() {
            assert!(Instant::now() < deadline, "postgres did not restart on {}:\n{e}", self.port);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
