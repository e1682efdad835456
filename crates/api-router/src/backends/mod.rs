//! Backends: passive and active health, the health monitor task, and HTTP
//! dispatch to a backend over the pooled client.
//!
//! Health is data: each backend's [`health::BackendHealth`] is a few atomics that
//! the request path reads without locks. Passive feedback (every attempt's
//! outcome) and the active monitor write them; the selector only reads.

pub mod client;
pub mod health;
pub mod monitor;
