//! The router's core: everything between a parsed request and its outcome,
//! with no HTTP framework in it.
//!
//! The request path is written out, step by step, in [`pipeline`]:
//! `process(&Core, InferenceRequest) -> Processed`, whose outcome the door
//! turns into a response in its own shape. Start-up and the ordered shutdown
//! of everything the core runs are in [`core`]. Each other module owns one
//! concern, with its own error type:
//!
//! - [`request`]: the request model and the rules for request ids;
//! - [`auth`]: API keys (hashed) and the admin token;
//! - [`keys`]: API keys managed at run time (create, rotate, revoke, expire);
//! - [`routing`]: policies, weighted selection with failover order, the decision log;
//! - [`backends`]: health (circuit) and the active health monitor;
//! - [`config_service`]: the routing state, compiled into snapshots swapped
//!   atomically, and the trait of a shared source (etcd: `router-etcd`);
//! - [`limits`]: rate limits, budgets and quotas (in process, Redis, or a budget service);
//! - [`usage`]: usage records, the durable buffer store, the Kafka publisher;
//! - [`audit`]: the embedded audit store and its batched writer;
//! - [`readiness`]: the components readiness reports on;
//! - [`metrics`]: the Prometheus registry;
//! - [`util`]: time, identifiers, atomic file writes, backoff.
//!
//! Backend kinds and the transport are `router_providers`; the doors are
//! `router-http`.

pub mod audit;
pub mod auth;
pub mod backends;
pub mod build_info;
pub mod config_service;
pub mod core;
pub mod json;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod pipeline;
pub mod readiness;
pub mod request;
pub mod routing;
pub mod usage;
pub mod util;
pub mod wal;

pub use crate::core::{AuditDatabase, Core, CoreSettings, Parts, Running, StartupError};
pub use crate::pipeline::{Outcome, Processed, RequestError, process};
pub use crate::request::InferenceRequest;
