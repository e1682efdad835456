//! The bounded, in-memory log of routing decisions behind
//! `GET /v1/admin/routing/decisions`. One entry per attempt (and one for a
//! request that found no routable backend). The oldest entries fall off.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DecisionType {
    /// The weighted pick: the first attempt of a request.
    Primary,
    /// A later attempt after a failure, or a standby taking the first attempt.
    Failover,
    /// No backend of the policy was routable; nothing was tried.
    NoHealthyBackend,
    /// Every backend for the model failed (or none was routable): the
    /// request is tried under the policy of the policy's next fallback model.
    FallbackModel,
}

impl DecisionType {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionType::Primary => "PRIMARY",
            DecisionType::Failover => "FAILOVER",
            DecisionType::NoHealthyBackend => "NO_HEALTHY_BACKEND",
            DecisionType::FallbackModel => "FALLBACK_MODEL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutingDecision {
    pub request_id: Arc<str>,
    pub organization_id: Arc<str>,
    /// The managed API key the request came with; absent for static keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Arc<str>>,
    pub model: Arc<str>,
    pub backend_id: Option<Arc<str>>,
    pub decision_type: DecisionType,
    pub reason: String,
    /// The backend's status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: f64,
    #[serde(serialize_with = "crate::util::serialize_time")]
    pub timestamp: SystemTime,
}

#[derive(Debug, Default, Deserialize)]
pub struct DecisionFilter {
    pub backend_id: Option<String>,
    pub decision_type: Option<DecisionType>,
    pub limit: Option<usize>,
}

pub struct DecisionLog {
    entries: Mutex<VecDeque<RoutingDecision>>,
    capacity: usize,
}

impl DecisionLog {
    pub fn new(capacity: usize) -> Self {
        Self { entries: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))), capacity }
    }

    pub fn record(&self, decision: RoutingDecision) {
        // The lock is held for a push and maybe a pop; nothing awaits under it.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(decision);
    }

    /// Newest first, filtered, at most `limit` (default 100).
    pub fn query(&self, filter: &DecisionFilter) -> Vec<RoutingDecision> {
        let limit = filter.limit.unwrap_or(100);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .rev()
            .filter(|d| filter.backend_id.as_deref().is_none_or(|id| d.backend_id.as_deref() == Some(id)))
            .filter(|d| filter.decision_type.is_none_or(|t| d.decision_type == t))
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(i: usize, backend: &str, t: DecisionType) -> RoutingDecision {
        RoutingDecision {
            request_id: Arc::from(format!("r{i}").as_str()),
            organization_id: Arc::from("o"),
            key_id: None,
            model: Arc::from("m"),
            backend_id: Some(Arc::from(backend)),
            decision_type: t,
            reason: String::new(),
            status: Some(200),
            error: None,
            latency_ms: 1.0,
            timestamp: SystemTime::now(),
        }
    }

    #[test]
    fn bounded_newest_first_and_filtered() {
        let log = DecisionLog::new(3);
        log.record(decision(0, "a", DecisionType::Primary));
        log.record(decision(1, "b", DecisionType::Failover));
        log.record(decision(2, "a", DecisionType::Primary));
        log.record(decision(3, "b", DecisionType::Primary));
        let all = log.query(&DecisionFilter::default());
        assert_eq!(all.iter().map(|d| &*d.request_id).collect::<Vec<_>>(), vec!["r3", "r2", "r1"]);
        let f = DecisionFilter { decision_type: Some(DecisionType::Failover), ..Default::default() };
        assert_eq!(log.query(&f).len(), 1);
        let f = DecisionFilter { backend_id: Some("a".into()), limit: Some(5), ..Default::default() };
        assert_eq!(log.query(&f).len(), 1);
        let f = DecisionFilter { limit: Some(1), ..Default::default() };
        assert_eq!(log.query(&f).len(), 1);
    }
}
