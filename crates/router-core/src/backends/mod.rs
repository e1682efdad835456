//! Backends: passive and active health, the upstream cool-down, and the
//! health monitor task. (How a backend is reached is `router_providers`: its
//! kind and its transport.)
//!
//! Health is data: each backend's [`health::BackendHealth`] is a few atomics that
//! the request path reads without locks. Passive feedback (every attempt's
//! outcome) and the active monitor write them; the selector only reads.

pub mod cooldown;
pub mod health;
pub mod monitor;
