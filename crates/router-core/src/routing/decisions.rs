//! The bounded, in-memory log of routing decisions behind
//! `GET /v1/admin/routing/decisions`. One entry per attempt (and one for a
//! request that found no routable backend). The oldest entries fall off, the
//! routine ones only to make room for routine ones.

use std::borrow::Cow;
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
    /// Text made per decision only when it says something particular (a
    /// failover's cause); the routine ones are constants.
    pub reason: Cow<'static, str>,
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

/// Two bounded rings: routine PRIMARY picks, and everything else (failovers,
/// no healthy backend, fallback models), so that under load the routine
/// ones cannot push out what an operator looks for.
pub struct DecisionLog {
    routine: Mutex<VecDeque<RoutingDecision>>,
    notable: Mutex<VecDeque<RoutingDecision>>,
    capacity: usize,
}

impl DecisionLog {
    /// Keeps up to `capacity` decisions of each kind.
    pub fn new(capacity: usize) -> Self {
        let ring = || Mutex::new(VecDeque::with_capacity(capacity.min(65_536)));
        Self { routine: ring(), notable: ring(), capacity }
    }

    pub fn record(&self, decision: RoutingDecision) {
        let ring = if decision.decision_type == DecisionType::Primary { &self.routine } else { &self.notable };
        // The lock is held for a push and maybe a pop; nothing awaits under it.
        let mut entries = ring.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(decision);
    }

    /// Newest first, filtered, at most `limit` (default 100) of each kind:
    /// without a `decision_type`, the newest routine PRIMARY decisions and
    /// the newest others, merged.
    pub fn query(&self, filter: &DecisionFilter) -> Vec<RoutingDecision> {
        let limit = filter.limit.unwrap_or(100);
        let pick = |ring: &Mutex<VecDeque<RoutingDecision>>| -> Vec<RoutingDecision> {
            let entries = ring.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .iter()
                .rev()
                .filter(|d| filter.backend_id.as_deref().is_none_or(|id| d.backend_id.as_deref() == Some(id)))
                .filter(|d| filter.decision_type.is_none_or(|t| d.decision_type == t))
                .take(limit)
                .cloned()
                .collect()
        };
        let (mut out, notable) = match filter.decision_type {
            Some(DecisionType::Primary) => (pick(&self.routine), Vec::new()),
            Some(_) => (pick(&self.notable), Vec::new()),
            None => (pick(&self.routine), pick(&self.notable)),
        };
        if !notable.is_empty() {
            out.extend(notable);
            // Both lists are newest first; a stable sort keeps ties in order.
            out.sort_by_key(|d| std::cmp::Reverse(d.timestamp));
        }
        out
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
            reason: Cow::Borrowed(""),
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
        log.record(decision(4, "a", DecisionType::Primary));
        let all = log.query(&DecisionFilter::default());
        assert_eq!(all.iter().map(|d| &*d.request_id).collect::<Vec<_>>(), vec!["r4", "r3", "r2", "r1"]);
        let f = DecisionFilter { decision_type: Some(DecisionType::Failover), ..Default::default() };
        assert_eq!(log.query(&f).len(), 1);
        let f = DecisionFilter { backend_id: Some("a".into()), limit: Some(5), ..Default::default() };
        assert_eq!(log.query(&f).len(), 2, "r0 fell off its ring");
        let f = DecisionFilter { limit: Some(1), ..Default::default() };
        assert_eq!(log.query(&f).iter().map(|d| &*d.request_id).collect::<Vec<_>>(), vec!["r4", "r1"]);
    }

    #[test]
    fn routine_decisions_do_not_push_out_the_others() {
        let log = DecisionLog::new(100);
        log.record(decision(0, "a", DecisionType::Failover));
        log.record(decision(1, "b", DecisionType::NoHealthyBackend));
        for i in 2..10_000 {
            log.record(decision(i, "b", DecisionType::Primary));
        }
        let all = log.query(&DecisionFilter::default());
        assert_eq!(all.len(), 102);
        assert!(all.iter().any(|d| d.decision_type == DecisionType::Failover));
        assert!(all.iter().any(|d| d.decision_type == DecisionType::NoHealthyBackend));
    }
}
