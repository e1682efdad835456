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
//! applied in process ([`ConfigWriter::Local`]) or a shared source
//! ([`RemoteConfig`]: the `router-etcd` crate's), which watches etcd and
//! feeds `ConfigStore::replace`; admin writes then go there
//! ([`ConfigWriter::Remote`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use router_providers::credential::CredentialRef;
use router_providers::translate::Translation;
use router_providers::transport::tls::TlsSpec;
use router_providers::transport::{Transport, Transports};
use router_providers::{Kind, Operation, Target};
use serde::Serialize;

use crate::backends::cooldown::Cooldown;
use crate::backends::health::BackendHealth;
use crate::limits::{OrgLimits, Price};
use crate::metrics::{BackendMetrics, Metrics};
use crate::readiness::Healthy;
use crate::routing::policy::{Policy, PolicyBackend};

/// Why a change to the routing state was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    /// The change is not valid (the text says why).
    Invalid(String),
    /// It names something that does not exist.
    NotFound(String),
    /// etcd could not take (or this replica could not apply) the write.
    Unavailable(String),
}

impl std::fmt::Display for UpdateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateError::Invalid(e) | UpdateError::NotFound(e) => f.write_str(e),
            UpdateError::Unavailable(e) => write!(f, "the config service (etcd) is unavailable: {e}"),
        }
    }
}

impl std::error::Error for UpdateError {}

/// A registered backend, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Base URL without a trailing slash, e.g. `https://api.openai.com`.
    pub endpoint: String,
    pub kind: Kind,
    pub credential: Option<CredentialRef>,
    /// Model aliases: the name clients use → the backend's own name.
    pub models: BTreeMap<String, String>,
    /// TLS settings for an `https://` endpoint.
    pub tls: TlsSpec,
    /// The API version a kind sends (Azure's `api-version`).
    pub api_version: Option<String>,
    /// The health probe's path, instead of the kind's.
    pub health_path: Option<String>,
}

impl BackendSpec {
    /// A backend of the default kind at `url` (`http://` or `https://`).
    pub fn new(url: &str) -> Result<Self, String> {
        let endpoint = url.trim().trim_end_matches('/').to_string();
        let uri: http::Uri = endpoint.parse().map_err(|_| format!("an http:// or https:// URL, got {url:?}"))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(_)) => Ok(Self {
                endpoint,
                kind: Kind::default(),
                credential: None,
                models: BTreeMap::new(),
                tls: TlsSpec::default(),
                api_version: None,
                health_path: None,
            }),
            _ => Err(format!("an http:// or https:// URL with a host, got {url:?}")),
        }
    }

    /// `url` (the default kind) or `kind+url`, e.g. `openai+https://api.openai.com`.
    pub fn parse_endpoint(s: &str) -> Result<Self, String> {
        let (kind, url) = Kind::split_endpoint(s)?;
        Ok(Self { kind, ..Self::new(url)? })
    }
}

/// A backend as written in the YAML file or an etcd value; unknown fields
/// are the caller's to judge.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BackendInput {
    /// `url` or `kind+url`.
    pub endpoint: String,
    /// Overrides a `kind+` prefix of the endpoint.
    #[serde(default)]
    pub kind: Option<Kind>,
    /// The upstream credential: the name of an environment variable...
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// ... or a file holding it. Credentials are referenced, never stored.
    #[serde(default)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Model aliases: client name → backend name.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// TLS settings for an `https://` endpoint.
    #[serde(default)]
    pub tls: TlsSpec,
    /// The API version a kind sends (Azure's `api-version`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// The health probe's path (absolute), instead of the kind's.
    #[serde(default)]
    pub health_path: Option<String>,
}

impl BackendInput {
    /// The spec, its shape checked. Files are not read here: see
    /// [`BackendSpec::check_files`].
    pub fn into_spec(self) -> Result<BackendSpec, String> {
        let mut spec = BackendSpec::parse_endpoint(&self.endpoint)?;
        if let Some(kind) = self.kind {
            spec.kind = kind;
        }
        spec.models = self.models;
        spec.credential = match (self.api_key_env, self.api_key_file) {
            (Some(_), Some(_)) => return Err("api_key_env or api_key_file, not both".into()),
            (Some(name), None) => Some(CredentialRef::Env(name)),
            (None, Some(path)) => Some(CredentialRef::File(path)),
            (None, None) => None,
        };
        spec.tls = self.tls;
        if let Some(v) = self.api_version.as_deref().filter(|v| !valid_query_value(v)) {
            return Err(format!("api_version {v:?}: letters, digits, '-', '.' and '_' only"));
        }
        spec.api_version = self.api_version;
        if let Some(p) = self.health_path.as_deref().filter(|p| !p.starts_with('/') || p.parse::<http::Uri>().is_err())
        {
            return Err(format!("health_path {p:?}: an absolute path, e.g. /health"));
        }
        spec.health_path = self.health_path;
        Ok(spec)
    }
}

fn valid_query_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl BackendSpec {
    /// Reads what the spec names: the credential and the TLS files.
    pub fn check_files(&self) -> Result<(), String> {
        if let Some(Err(why)) = self.credential.as_ref().map(|c| c.resolve()) {
            return Err(format!("a readable credential ({why})"));
        }
        self.tls.validate().map_err(|e| format!("usable TLS files ({e})"))
    }
}

/// An admin override that takes a backend out of routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    pub reason: String,
    #[serde(serialize_with = "crate::util::serialize_time")]
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
    pub cooldown: Cooldown,
    pub metrics: BackendMetrics,
}

/// A backend as the request path sees it.
#[derive(Debug)]
pub struct Backend {
    pub id: Arc<str>,
    /// Where it is and how its kind talks: URIs, credential, model names.
    pub target: Target,
    /// The pooled connections for its TLS settings.
    pub transport: Arc<dyn Transport>,
    pub degraded: Option<Override>,
    pub runtime: Arc<BackendRuntime>,
}

impl Backend {
    pub fn kind(&self) -> Kind {
        self.target.kind
    }

    pub fn endpoint(&self) -> &str {
        &self.target.endpoint
    }

    /// Whether this backend can serve `op`: in its kind's own shape, or
    /// through a translation.
    #[inline]
    pub fn can_serve(&self, op: Operation) -> bool {
        Translation::between(op, self.target.kind).is_some()
    }

    /// Available: not degraded by an admin and not marked unhealthy.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.degraded.is_none() && self.runtime.health.is_healthy()
    }

    /// Routable: available, and not cooling down after an upstream 429.
    #[inline]
    pub fn is_routable(&self) -> bool {
        self.is_available() && !self.runtime.cooldown.is_cooling()
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
            let backend = Arc::new(Backend {
                id: Arc::from(id.as_str()),
                target: runtimes.target(id, spec),
                transport: runtimes.transport(id, spec),
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
                fallback_models: vec![],
            })
        });
        let api_keys = state.api_keys.iter().map(|(hash, org)| (*hash, Arc::from(org.as_str()))).collect();
        Snapshot { revision, state, backends, backend_list, policies, default_policy, api_keys }
    }
}

/// Per-backend health and metric handles, kept across snapshots, and the
/// transports (connection pools), which live outside them.
struct RuntimeRegistry {
    metrics: Metrics,
    transports: Arc<Transports>,
    by_id: HashMap<String, Arc<BackendRuntime>>,
}

impl RuntimeRegistry {
    fn get(&mut self, id: &str) -> Arc<BackendRuntime> {
        if let Some(rt) = self.by_id.get(id) {
            return rt.clone();
        }
        let rt = Arc::new(BackendRuntime {
            health: BackendHealth::default(),
            cooldown: Cooldown::default(),
            metrics: self.metrics.backend(id),
        });
        self.by_id.insert(id.to_string(), rt.clone());
        rt
    }

    fn retain(&mut self, live: &BTreeMap<String, BackendSpec>) {
        self.by_id.retain(|id, _| live.contains_key(id));
    }

    /// The provider's view of the backend, with its credential read now. A
    /// credential that cannot be read was caught when the configuration was
    /// accepted; if it has gone since, the backend is called without it (and
    /// its 401 is the answer), which the log says.
    fn target(&self, id: &str, spec: &BackendSpec) -> Target {
        let credential = spec.credential.as_ref().and_then(|c| {
            match c.resolve().and_then(|secret| spec.kind.provider().credential_header(&secret)) {
                Ok(header) => Some(header),
                Err(e) => {
                    tracing::error!(backend_id = %id, error = %e, "backend credential unavailable; calling without it");
                    None
                }
            }
        });
        Target::new(spec.kind, &spec.endpoint, spec.models.clone(), credential)
            .with_settings(spec.api_version.clone(), spec.health_path.as_deref())
    }

    /// The transport for the backend's TLS settings. Files were checked when
    /// the configuration was accepted; if one has become unreadable since,
    /// the shared transport is used and TLS to this backend fails over.
    fn transport(&self, id: &str, spec: &BackendSpec) -> Arc<dyn Transport> {
        self.transports.for_spec(&spec.tls).unwrap_or_else(|e| {
            tracing::error!(backend_id = %id, error = %e, "backend TLS settings unusable; using the default trust");
            self.transports.default_transport()
        })
    }
}

/// Holds the current snapshot; the only way to change routing state.
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<RuntimeRegistry>,
}

impl ConfigStore {
    pub fn new(state: ConfigState, metrics: Metrics, transports: Arc<Transports>) -> Self {
        let mut runtimes = RuntimeRegistry { metrics, transports, by_id: HashMap::new() };
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

/// One admin change to the routing state, validated against it already.
#[derive(Debug, Clone)]
pub enum Change {
    Policy(Policy),
    /// Set (`Some`) or clear (`None`) a backend's degraded override.
    Override(String, Option<Override>),
    OrgLimits(String, OrgLimits),
}

pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<(), UpdateError>> + Send + 'a>>;

/// A routing state shared by every replica (etcd): admin writes go to it, and
/// each replica applies them when its watch sees them.
pub trait RemoteConfig: Healthy {
    /// Writes `change`; resolves once this replica has applied it
    /// (read-your-writes).
    fn write(&self, change: Change) -> WriteFuture<'_>;
    /// Seconds since the source last confirmed this replica's state.
    fn seconds_since_sync(&self) -> f64;
    /// Spawns the source's background work (its watch) on `tasks`, until
    /// `cancel`.
    fn run(self: Arc<Self>, tasks: &tokio_util::task::TaskTracker, cancel: tokio_util::sync::CancellationToken);
}

/// Where admin writes go: applied in process, or written to the shared
/// source and applied when this replica's watch sees them.
#[derive(Clone)]
pub enum ConfigWriter {
    Local(Arc<ConfigStore>),
    Remote(Arc<ConfigStore>, Arc<dyn RemoteConfig>),
}

impl ConfigWriter {
    fn store(&self) -> &ConfigStore {
        match self {
            ConfigWriter::Local(store) | ConfigWriter::Remote(store, _) => store,
        }
    }

    /// Applies a validated change, here or through the shared source.
    async fn apply(&self, change: Change) -> Result<(), UpdateError> {
        match self {
            ConfigWriter::Local(store) => store
                .update(|s| {
                    match change {
                        Change::Policy(p) => {
                            s.policies.insert((p.organization_id.clone(), p.model.clone()), p);
                        }
                        Change::Override(id, Some(o)) => {
                            s.overrides.insert(id, o);
                        }
                        Change::Override(id, None) => {
                            s.overrides.remove(&id);
                        }
                        Change::OrgLimits(org, l) => {
                            s.organizations.insert(org, l);
                        }
                    }
                    Ok::<_, UpdateError>(())
                })
                .map(drop),
            ConfigWriter::Remote(_, remote) => remote.write(change).await,
        }
    }

    /// Upserts a policy whose shape is valid; unknown backends are refused.
    pub async fn put_policy(&self, policy: Policy) -> Result<(), UpdateError> {
        let backends = &self.store().load().state.backends;
        policy.validate_against(backends).map_err(|e| UpdateError::Invalid(format!("invalid policy: {e}")))?;
        self.apply(Change::Policy(policy)).await
    }

    /// Sets (`Some`) or clears (`None`) a backend's degraded override.
    pub async fn set_override(&self, id: &str, over: Option<Override>) -> Result<(), UpdateError> {
        if !self.store().load().state.backends.contains_key(id) {
            return Err(UpdateError::NotFound(format!("unknown backend {id:?}")));
        }
        self.apply(Change::Override(id.to_string(), over)).await
    }

    pub async fn put_org_limits(&self, org: &str, limits: OrgLimits) -> Result<(), UpdateError> {
        self.apply(Change::OrgLimits(org.to_string(), limits)).await
    }

    /// Seconds since the shared source confirmed this replica's state, if
    /// there is one.
    pub fn seconds_since_sync(&self) -> Option<f64> {
        match self {
            ConfigWriter::Local(_) => None,
            ConfigWriter::Remote(_, remote) => Some(remote.seconds_since_sync()),
        }
    }
}

/// A store over `state` with the default transports (tests and benches).
#[doc(hidden)]
pub fn test_store(state: ConfigState) -> ConfigStore {
    let transports = Transports::new(Default::default()).unwrap_or_else(|e| panic!("default transports: {e}"));
    ConfigStore::new(state, Metrics::new(), Arc::new(transports))
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
        let store = test_store(state());
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
        let store = test_store(state());
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
        let store = test_store(state());
        assert_eq!(store.load().route("org", "any").unwrap().members.len(), 2);
        store
            .update(|s| {
                s.default_route = false;
                Ok::<_, ()>(())
            })
            .unwrap();
        assert!(store.load().route("org", "any").is_none());
        let snapshot = store.load();
        let b2 = snapshot.backend("b2").unwrap();
        assert_eq!(b2.target.uri(Operation::Native).unwrap().to_string(), "http://127.0.0.1:2/v1/inference");
    }
}
