//! The routing state and where it comes from.
//!
//! [`ConfigState`] is the desired state: backends, policies, API-key hashes,
//! admin overrides. [`Snapshot`] is that state compiled for the request path:
//! lookups by `&str`, policies resolved to backend handles, the default route
//! precomputed. The [`ConfigStore`] holds the current snapshot behind an
//! `ArcSwap`: requests `load()` it without locks, and a writer builds a whole new
//! snapshot and swaps it in. Writers are serialised by a mutex that readers
//! never touch.
//!
//! Health and per-backend metric handles outlive snapshots: they live in
//! [`BackendRuntime`]s that each rebuilt snapshot reuses by backend id.
//!
//! Sources: the environment and file at start-up, then either admin writes
//! applied in process ([`ConfigWriter::Local`]) or the etcd source
//! ([`etcd::EtcdSource`]), which watches etcd and feeds `ConfigStore::replace`;
//! admin writes then go to etcd ([`ConfigWriter::Etcd`]).

pub mod etcd;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use hyper::Uri;
use serde::Serialize;

use crate::api::error::ApiError;
use crate::backends::health::BackendHealth;
use crate::limits::{OrgLimits, Price};
use crate::routing::policy::{Policy, PolicyBackend};
use crate::telemetry::metrics::{BackendMetrics, Metrics};

/// What protocol a backend speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `POST {endpoint}/v1/inference`: serves the native door.
    #[default]
    Native,
    /// OpenAI-compatible (`/v1/chat/completions`, ...): serves the OpenAI door.
    Openai,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Native => "native",
            BackendKind::Openai => "openai",
        }
    }
}

/// Where a backend's upstream credential is read from. The secret itself is
/// never part of the configuration state, the admin API or the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialRef {
    Env(String),
    File(std::path::PathBuf),
}

impl CredentialRef {
    /// Reads the secret (trimmed).
    pub fn resolve(&self) -> Result<String, String> {
        let secret = match self {
            CredentialRef::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
            }
            CredentialRef::File(path) => {
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
        };
        let secret = secret.trim().to_string();
        if secret.is_empty() { Err("the credential is empty".into()) } else { Ok(secret) }
    }
}

/// A registered backend, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8001`.
    pub endpoint: String,
    pub kind: BackendKind,
    pub credential: Option<CredentialRef>,
    /// Model aliases: the name clients use → the backend's own name.
    pub models: BTreeMap<String, String>,
}

impl BackendSpec {
    /// A native backend at `url`.
    pub fn new(url: &str) -> Result<Self, String> {
        let endpoint = url.trim().trim_end_matches('/').to_string();
        let uri: Uri = endpoint.parse().map_err(|_| format!("an http:// URL, got {url:?}"))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(_)) => {
                Ok(Self { endpoint, kind: BackendKind::Native, credential: None, models: BTreeMap::new() })
            }
            _ => Err(format!("an http:// URL with a host, got {url:?}")),
        }
    }

    /// `http://...` (native) or `openai+http://...` (OpenAI-compatible).
    pub fn parse_endpoint(s: &str) -> Result<Self, String> {
        match s.trim().strip_prefix("openai+") {
            Some(url) => Ok(Self { kind: BackendKind::Openai, ..Self::new(url)? }),
            None => Self::new(s),
        }
    }
}

/// An admin override that takes a backend out of routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    pub reason: String,
    #[serde(serialize_with = "crate::telemetry::serialize_time")]
    pub since: SystemTime,
    pub by: String,
}

/// The desired routing state, from every source.
#[derive(Debug, Clone, Default)]
pub struct ConfigState {
    pub backends: BTreeMap<String, BackendSpec>,
    pub policies: BTreeMap<(String, String), Policy>,
    pub api_keys: BTreeMap<[u8; 32], String>,
    pub overrides: BTreeMap<String, Override>,
    /// Per-organization rate limit, budget and quota settings.
    pub organizations: BTreeMap<String, OrgLimits>,
    /// Per-model prices for budgets.
    pub prices: BTreeMap<String, Price>,
    /// Route a model without a policy to every backend, equally weighted.
    pub default_route: bool,
    pub default_failover_threshold: u32,
}

/// What outlives snapshots for one backend id.
#[derive(Debug)]
pub struct BackendRuntime {
    pub health: BackendHealth,
    pub metrics: BackendMetrics,
}

/// A backend as the request path sees it.
#[derive(Debug)]
pub struct Backend {
    pub id: Arc<str>,
    pub endpoint: String,
    pub kind: BackendKind,
    pub inference_uri: Uri,
    pub health_uri: Uri,
    /// `Authorization: Bearer <secret>` for the upstream, marked sensitive.
    pub auth: Option<hyper::header::HeaderValue>,
    pub models: BTreeMap<String, String>,
    pub degraded: Option<Override>,
    pub runtime: Arc<BackendRuntime>,
}

impl Backend {
    /// The URI of `path` on this backend (OpenAI paths).
    pub fn uri_for(&self, path: &str) -> Uri {
        uri(&self.endpoint, path)
    }

    /// Routable: not degraded by an admin and not marked unhealthy.
    #[inline]
    pub fn is_routable(&self) -> bool {
        self.degraded.is_none() && self.runtime.health.is_healthy()
    }
}

/// A policy resolved against the backends of its snapshot.
#[derive(Debug)]
pub struct RoutePolicy {
    pub policy: Policy,
    pub members: Vec<(Arc<Backend>, u32)>,
}

/// The compiled, immutable routing state. Cheap to read, rebuilt on change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: u64,
    pub state: ConfigState,
    backends: HashMap<String, Arc<Backend>>,
    /// Sorted by id, for listings and the health monitor.
    pub backend_list: Vec<Arc<Backend>>,
    policies: HashMap<String, HashMap<String, Arc<RoutePolicy>>>,
    default_policy: Option<Arc<RoutePolicy>>,
    api_keys: HashMap<[u8; 32], Arc<str>>,
}

impl Snapshot {
    pub fn backend(&self, id: &str) -> Option<&Arc<Backend>> {
        self.backends.get(id)
    }

    /// The policy for (organization, model), or the default route if enabled.
    #[inline]
    pub fn route(&self, org: &str, model: &str) -> Option<&Arc<RoutePolicy>> {
        self.policies.get(org).and_then(|m| m.get(model)).or(self.default_policy.as_ref())
    }

    /// The explicit policy for (organization, model), without the default route.
    pub fn policy(&self, org: &str, model: &str) -> Option<&Arc<RoutePolicy>> {
        self.policies.get(org).and_then(|m| m.get(model))
    }

    pub fn org_limits(&self, org: &str) -> Option<OrgLimits> {
        self.state.organizations.get(org).copied()
    }

    pub fn price(&self, model: &str) -> Option<Price> {
        self.state.prices.get(model).copied()
    }

    /// Every known organization: those with an API key or limits.
    pub fn organizations(&self) -> std::collections::BTreeSet<&str> {
        self.state.organizations.keys().map(String::as_str).chain(self.api_keys.values().map(|o| &**o)).collect()
    }

    /// An organization is known if it has an API key or limits.
    pub fn knows_organization(&self, org: &str) -> bool {
        self.state.organizations.contains_key(org) || self.api_keys.values().any(|o| &**o == org)
    }

    pub fn organization_for_key_hash(&self, hash: &[u8; 32]) -> Option<(&[u8; 32], &Arc<str>)> {
        self.api_keys.get_key_value(hash)
    }

    /// Whether at least one backend can take traffic.
    pub fn any_routable(&self) -> bool {
        self.backend_list.iter().any(|b| b.is_routable())
    }

    fn build(revision: u64, state: ConfigState, runtimes: &mut RuntimeRegistry) -> Self {
        let mut backends = HashMap::with_capacity(state.backends.len());
        let mut backend_list = Vec::with_capacity(state.backends.len());
        for (id, spec) in &state.backends {
            let auth = spec.credential.as_ref().and_then(|c| match c.resolve() {
                Ok(secret) => {
                    let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {secret}")).ok()?;
                    v.set_sensitive(true);
                    Some(v)
                }
                Err(e) => {
                    tracing::error!(backend_id = %id, error = %e, "backend credential unavailable; calling without it");
                    None
                }
            });
            let backend = Arc::new(Backend {
                id: Arc::from(id.as_str()),
                endpoint: spec.endpoint.clone(),
                kind: spec.kind,
                inference_uri: uri(&spec.endpoint, "/v1/inference"),
                health_uri: uri(&spec.endpoint, "/health"),
                auth,
                models: spec.models.clone(),
                degraded: state.overrides.get(id).cloned(),
                runtime: runtimes.get(id),
            });
            backends.insert(id.clone(), backend.clone());
            backend_list.push(backend);
        }
        runtimes.retain(&state.backends);

        let resolve = |policy: &Policy| {
            let members = policy
                .backends
                .iter()
                .filter_map(|b| backends.get(&b.backend_id).map(|be| (be.clone(), b.weight)))
                .collect();
            Arc::new(RoutePolicy { policy: policy.clone(), members })
        };
        let mut policies: HashMap<String, HashMap<String, Arc<RoutePolicy>>> = HashMap::new();
        for ((org, model), policy) in &state.policies {
            policies.entry(org.clone()).or_default().insert(model.clone(), resolve(policy));
        }
        let default_policy = (state.default_route && !state.backends.is_empty()).then(|| {
            resolve(&Policy {
                policy_id: "default".into(),
                organization_id: "*".into(),
                model: "*".into(),
                backends: state.backends.keys().map(|id| PolicyBackend { backend_id: id.clone(), weight: 1 }).collect(),
                failover_threshold: state.default_failover_threshold,
            })
        });
        let api_keys = state.api_keys.iter().map(|(hash, org)| (*hash, Arc::from(org.as_str()))).collect();
        Snapshot { revision, state, backends, backend_list, policies, default_policy, api_keys }
    }
}

pub fn uri(base: &str, path: &str) -> Uri {
    // BackendSpec::new checked that `base` is an absolute http URL without a
    // trailing slash, and `path` is a constant absolute path, so this parses.
    format!("{base}{path}").parse().unwrap_or_default()
}

/// Per-backend health and metric handles, kept across snapshots.
struct RuntimeRegistry {
    metrics: Metrics,
    by_id: HashMap<String, Arc<BackendRuntime>>,
}

impl RuntimeRegistry {
    fn get(&mut self, id: &str) -> Arc<BackendRuntime> {
        if let Some(rt) = self.by_id.get(id) {
            return rt.clone();
        }
        let rt = Arc::new(BackendRuntime { health: BackendHealth::default(), metrics: self.metrics.backend(id) });
        self.by_id.insert(id.to_string(), rt.clone());
        rt
    }

    fn retain(&mut self, live: &BTreeMap<String, BackendSpec>) {
        self.by_id.retain(|id, _| live.contains_key(id));
    }
}

/// Holds the current snapshot; the only way to change routing state.
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<RuntimeRegistry>,
}

impl ConfigStore {
    pub fn new(state: ConfigState, metrics: Metrics) -> Self {
        let mut runtimes = RuntimeRegistry { metrics, by_id: HashMap::new() };
        let snapshot = Snapshot::build(1, state, &mut runtimes);
        Self { current: ArcSwap::from_pointee(snapshot), writer: Mutex::new(runtimes) }
    }

    /// The current snapshot, without taking a lock.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `change` to a copy of the current state and swaps in the result.
    /// On `Err` nothing changes. Writers are serialised; readers never wait.
    pub fn update<E>(&self, change: impl FnOnce(&mut ConfigState) -> Result<(), E>) -> Result<Arc<Snapshot>, E> {
        // A poisoned lock only means another writer panicked mid-build; the
        // registry it guards is still consistent (it is only ever appended to or
        // pruned), so keep going with it.
        let mut runtimes = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load_full();
        let mut state = current.state.clone();
        change(&mut state)?;
        let snapshot = Arc::new(Snapshot::build(current.revision + 1, state, &mut runtimes));
        self.current.store(snapshot.clone());
        Ok(snapshot)
    }
}

impl ConfigStore {
    /// Swaps in a snapshot of `state` at `revision` (the etcd source).
    pub fn replace(&self, state: ConfigState, revision: u64) -> Arc<Snapshot> {
        let mut runtimes = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = Arc::new(Snapshot::build(revision, state, &mut runtimes));
        self.current.store(snapshot.clone());
        snapshot
    }
}

/// Where admin writes go: applied in process, or written to etcd and applied
/// when this replica's watch sees them (read-your-writes).
#[derive(Clone)]
pub enum ConfigWriter {
    Local(Arc<ConfigStore>),
    Etcd(Arc<etcd::EtcdSource>),
}

impl ConfigWriter {
    /// Upserts a policy whose shape is valid; unknown backends are refused.
    pub async fn put_policy(&self, policy: Policy) -> Result<(), ApiError> {
        let invalid = |e: String| ApiError::InvalidRequest(format!("invalid policy: {e}"));
        match self {
            ConfigWriter::Local(store) => store
                .update(|s| {
                    policy.validate_against(&s.backends).map_err(invalid)?;
                    s.policies.insert((policy.organization_id.clone(), policy.model.clone()), policy);
                    Ok(())
                })
                .map(drop),
            ConfigWriter::Etcd(src) => {
                policy.validate_against(&src.store_state_backends()).map_err(invalid)?;
                let key = format!("policies/{}/{}", policy.organization_id, policy.model);
                let value = serde_json::to_string(&policy).map_err(|e| ApiError::Internal(e.to_string()))?;
                src.write(&key, Some(value)).await
            }
        }
    }

    /// Sets (`Some`) or clears (`None`) a backend's degraded override.
    pub async fn set_override(&self, id: &str, over: Option<Override>) -> Result<(), ApiError> {
        let unknown = || ApiError::NotFound(format!("unknown backend {id:?}"));
        match self {
            ConfigWriter::Local(store) => store
                .update(|s| {
                    if !s.backends.contains_key(id) {
                        return Err(unknown());
                    }
                    match over {
                        Some(o) => s.overrides.insert(id.to_string(), o),
                        None => s.overrides.remove(id),
                    };
                    Ok(())
                })
                .map(drop),
            ConfigWriter::Etcd(src) => {
                if !src.store_state_backends().contains_key(id) {
                    return Err(unknown());
                }
                src.write(&format!("backend-overrides/{id}"), over.map(|o| etcd::override_value(&o))).await
            }
        }
    }

    pub async fn put_org_limits(&self, org: &str, limits: OrgLimits) -> Result<(), ApiError> {
        match self {
            ConfigWriter::Local(store) => store
                .update(|s| {
                    s.organizations.insert(org.to_string(), limits);
                    Ok::<_, ApiError>(())
                })
                .map(drop),
            ConfigWriter::Etcd(src) => {
                let value = serde_json::to_string(&limits).map_err(|e| ApiError::Internal(e.to_string()))?;
                src.write(&format!("organizations/{org}"), Some(value)).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ConfigState {
        let mut s = ConfigState { default_route: true, default_failover_threshold: 3, ..Default::default() };
        s.backends.insert("b1".into(), BackendSpec::new("http://127.0.0.1:1").unwrap());
        s.backends.insert("b2".into(), BackendSpec::new("http://127.0.0.1:2/").unwrap());
        s
    }

    #[test]
    fn update_swaps_a_new_revision_and_keeps_health_handles() {
        let store = ConfigStore::new(state(), Metrics::new());
        let before = store.load_full();
        let health = before.backend("b1").unwrap().runtime.clone();
        let after = store
            .update(|s| {
                s.overrides
                    .insert("b1".into(), Override { reason: "x".into(), since: SystemTime::now(), by: "admin".into() });
                Ok::<_, ()>(())
            })
            .unwrap();
        assert_eq!(after.revision, before.revision + 1);
        assert!(Arc::ptr_eq(&health, &after.backend("b1").unwrap().runtime));
        assert!(!after.backend("b1").unwrap().is_routable());
        assert!(before.backend("b1").unwrap().is_routable(), "old snapshot is immutable");
    }

    #[test]
    fn failed_update_changes_nothing() {
        let store = ConfigStore::new(state(), Metrics::new());
        let rev = store.load().revision;
        let r = store.update(|s| {
            s.backends.clear();
            Err("no")
        });
        assert!(r.is_err());
        assert_eq!(store.load().revision, rev);
        assert_eq!(store.load().backend_list.len(), 2);
    }

    #[test]
    fn default_route_covers_unknown_models_unless_disabled() {
        let store = ConfigStore::new(state(), Metrics::new());
        assert_eq!(store.load().route("org", "any").unwrap().members.len(), 2);
        store
            .update(|s| {
                s.default_route = false;
                Ok::<_, ()>(())
            })
            .unwrap();
        assert!(store.load().route("org", "any").is_none());
        assert_eq!(store.load().backend("b2").unwrap().inference_uri.to_string(), "http://127.0.0.1:2/v1/inference");
    }
}
