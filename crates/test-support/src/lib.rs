//! Test harness, split by role: [`process`] (child processes, free ports),
//! [`http`] (a client, JSON, metrics, waiting with a deadline), [`mock`] (the
//! mock backend as a process), [`router`] (the router as a process),
//! [`redis`] (one server, or a cluster), [`postgres`], [`kafka`] and
//! [`etcd`] (private servers on free ports),
//! [`proxy`] (a TCP fault proxy), [`raw`] (a backend and a client that
//! misbehave at the byte level), [`python`] (the official
//! SDKs driving a router), [`tls`] (certificates made
//! at test time) and [`in_process`] (the mock served without sockets).
//!
//! Every wait is a condition with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, clippy::new_without_default)]

pub mod etcd;
pub mod http;
pub mod in_process;
pub mod kafka;
pub mod mock;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod python;
pub mod raw;
pub mod redis;
pub mod router;
pub mod tls;

pub use etcd::Etcd;
pub use http::*;
pub use kafka::{Broker, TOPIC, consume, distinct_keys};
pub use mock::{Mock, endpoints_of_every_kind};
pub use postgres::Postgres;
pub use process::{Proc, free_port, log_message};
pub use proxy::{Fault, Proxy};
pub use raw::{Misbehaviour, RawBackend, RawReply, raw_exchange, read_until_closed};
pub use redis::{RedisCluster, RedisServer};
pub use router::*;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
pub const KEY_A: &str = "key-org-a";
pub const KEY_B: &str = "key-org-b";

/// The path of one of the workspace's binaries (`api-router`,
/// `mock-backend`), as cargo built them for the running test: next to the
/// test executable's `deps` directory.
pub fn bin(name: &str) -> std::path::PathBuf {
    let var = format!("NEXTEST_BIN_EXE_{name}");
    if let Some(p) = std::env::var_os(&var).or_else(|| std::env::var_os(var.replace('-', "_"))) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run the tests with cargo (it builds the binaries first)", path.display());
    path
}
