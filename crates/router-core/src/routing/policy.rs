//! Routing policies: the admin/etcd JSON shape, and its validation.
//!
//! A policy is `{policy_id, organization_id, model, backends: [{backend_id,
//! weight}], failover_threshold}`. Input is parsed into [`PolicyInput`], where
//! every field is optional, so that a missing field gets its own message instead
//! of a generic deserialisation error, and only a fully valid [`Policy`] exists.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config_service::BackendSpec;
use crate::util::valid_id;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBackend {
    pub backend_id: String,
    /// Relative weight; 0 marks a standby used only by failover.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub policy_id: String,
    pub organization_id: String,
    pub model: String,
    pub backends: Vec<PolicyBackend>,
    /// Consecutive failures after which a backend is marked unhealthy.
    pub failover_threshold: u32,
    /// Models tried in order, each under its own policy, once every backend
    /// of this one has failed (or none is routable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_models: Vec<String>,
}

/// The most fallback models one policy may list.
pub const MAX_FALLBACK_MODELS: usize = 8;

/// A policy as it arrives, before validation.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyInput {
    pub policy_id: Option<String>,
    pub organization_id: Option<String>,
    pub model: Option<String>,
    pub backends: Option<Vec<PolicyBackendInput>>,
    pub failover_threshold: Option<i64>,
    #[serde(default)]
    pub fallback_models: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyBackendInput {
    pub backend_id: Option<String>,
    pub weight: Option<i64>,
}

impl PolicyInput {
    /// Checks the shape of the policy (everything but the backend registry).
    pub fn into_policy(self) -> Result<Policy, String> {
        let field = |v: Option<String>, name: &str| -> Result<String, String> {
            match v {
                None => Err(format!("missing field `{name}`")),
                Some(s) if s.trim().is_empty() => Err(format!("field `{name}` must not be empty")),
                Some(s) => Ok(s),
            }
        };
        let policy_id = field(self.policy_id, "policy_id")?;
        let organization_id = field(self.organization_id, "organization_id")?;
        if !valid_id(&organization_id) {
            return Err("`organization_id` must be 1-128 letters, digits, '-', '_', '.' or ':'".into());
        }
        let model = field(self.model, "model")?;
        if model.len() > 256 {
            return Err("`model` must be at most 256 characters".into());
        }
        let inputs = self.backends.ok_or("missing field `backends`")?;
        if inputs.is_empty() {
            return Err("`backends` must name at least one backend".into());
        }
        let threshold = self.failover_threshold.ok_or("missing field `failover_threshold`")?;
        if threshold < 1 {
            return Err(format!("`failover_threshold` must be at least 1, got {threshold}"));
        }
        let failover_threshold =
            u32::try_from(threshold).map_err(|_| "`failover_threshold` is too large".to_string())?;
        let mut seen = HashSet::new();
        let mut backends = Vec::with_capacity(inputs.len());
        for (i, b) in inputs.into_iter().enumerate() {
            let backend_id = b
                .backend_id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| format!("missing field `backends[{i}].backend_id`"))?;
            let weight = b.weight.ok_or_else(|| format!("missing field `backends[{i}].weight`"))?;
            if weight < 0 {
                return Err(format!("weight of backend {backend_id} must not be negative, got {weight}"));
            }
            let weight = u32::try_from(weight).map_err(|_| format!("weight of backend {backend_id} is too large"))?;
            if !seen.insert(backend_id.clone()) {
                return Err(format!("backend {backend_id} is listed twice"));
            }
            backends.push(PolicyBackend { backend_id, weight });
        }
        if backends.iter().all(|b| b.weight == 0) {
            return Err("at least one backend must have a weight above 0".into());
        }
        let fallback_models = self.fallback_models.unwrap_or_default();
        if fallback_models.len() > MAX_FALLBACK_MODELS {
            return Err(format!("`fallback_models` lists at most {MAX_FALLBACK_MODELS} models"));
        }
        let mut seen_models = HashSet::from([model.as_str()]);
        for m in &fallback_models {
            if m.is_empty() || m.len() > 256 {
                return Err("each of `fallback_models` must be 1-256 characters".into());
            }
            if !seen_models.insert(m.as_str()) {
                return Err(format!("`fallback_models` names {m:?} twice, or the policy's own model"));
            }
        }
        Ok(Policy { policy_id, organization_id, model, backends, failover_threshold, fallback_models })
    }
}

impl Policy {
    /// Checks that every backend the policy names is registered.
    pub fn validate_against(&self, backends: &BTreeMap<String, BackendSpec>) -> Result<(), String> {
        match self.backends.iter().find(|b| !backends.contains_key(&b.backend_id)) {
            Some(b) => Err(format!("unknown backend `{}`", b.backend_id)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> Result<Policy, String> {
        serde_json::from_str::<PolicyInput>(json).map_err(|e| e.to_string())?.into_policy()
    }

    const GOOD: &str = r#"{"policy_id":"p","organization_id":"org-1","model":"m",
        "backends":[{"backend_id":"b1","weight":80},{"backend_id":"b2","weight":20}],"failover_threshold":3}"#;

    #[test]
    fn valid_policy_parses() {
        let p = input(GOOD).unwrap();
        assert_eq!(p.backends[0].weight, 80);
        assert_eq!(p.failover_threshold, 3);
    }

    #[test]
    fn each_invalid_kind_is_refused_with_its_reason() {
        let cases = [
            (GOOD.replace("80", "-1"), "must not be negative"),
            (GOOD.replace("80", "0").replace("20", "0"), "weight above 0"),
            (GOOD.replace(r#""policy_id":"p","#, ""), "missing field `policy_id`"),
            (GOOD.replace(r#","failover_threshold":3"#, ""), "missing field `failover_threshold`"),
            (GOOD.replace(r#""failover_threshold":3"#, r#""failover_threshold":0"#), "at least 1"),
            (GOOD.replace("b2", "b1"), "listed twice"),
        ];
        for (json, want) in cases {
            let err = input(&json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn unknown_backend_is_found_against_the_registry() {
        let p = input(GOOD).unwrap();
        let mut reg = BTreeMap::new();
        reg.insert("b1".to_string(), BackendSpec::new("http://127.0.0.1:1").unwrap());
        assert_eq!(p.validate_against(&reg).unwrap_err(), "unknown backend `b2`");
        reg.insert("b2".to_string(), BackendSpec::new("http://127.0.0.1:2").unwrap());
        assert!(p.validate_against(&reg).is_ok());
    }
}
