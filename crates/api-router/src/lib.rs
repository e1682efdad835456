//! api-router: an inference API router.
//!
//! The request path is written out, step by step, in [`pipeline`]. Start-up and
//! shutdown order is in [`app`]. Each other module owns one concern:
//!
//! - [`api`]: HTTP handlers, authentication, and the one place errors become responses;
//! - [`routing`]: policies, weighted selection with failover order, the decision log;
//! - [`backends`]: health (circuit), the active health monitor, HTTP dispatch;
//! - [`config_service`]: the routing state, compiled into snapshots swapped atomically;
//! - [`config`]: start-up settings from the environment and the YAML file;
//! - [`limits`]: rate limits, budgets and quotas (in process, Redis, or a budget service);
//! - [`usage`]: usage records, the durable buffer store, the Kafka publisher;
//! - [`audit`]: the embedded audit store and its batched writer;
//! - [`telemetry`]: metrics and logging.

pub mod api;
pub mod app;
pub mod audit;
pub mod backends;
pub mod build_info;
pub mod config;
pub mod config_service;
pub mod limits;
pub mod pipeline;
pub mod routing;
pub mod telemetry;
pub mod usage;
