//! Routing: policies, weighted candidate selection with failover order, and the
//! bounded log of routing decisions.
//!
//! Selection is a pure function of a policy and the routable set (health and
//! overrides), so it is unit-tested without a network and benchmarked alone.

pub mod decisions;
pub mod policy;
pub mod selector;
