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
use crate::keys::{self, KeyEntry, KeyFile, KeyRecord, KeyRuntimes, NewKey, Previous};
use crate::limits::{OrgLimits, Price};
use crate::metrics::{BackendMetrics, Metrics};
use crate::readiness::Healthy;
use crate::routing::policy::{Policy, PolicyBackend};
use crate::util::DigestMap;

/// Why a change to the routing state was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError {
    /// The change is not valid (the text says why).
    Invalid(String),
    /// It names something that does not exist.
    NotFound(String),
    /// etcd could not take (or this replica could not apply) the write.
    Unavailable(String),
    /// Someone else changed it first; nothing was written. Read and retry.
    Conflict(String),
    /// The write could not be prepared (the system's random generator or the
    /// local store failed).
    Internal(String),
}

impl std::fmt::Display for UpdateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateError::Invalid(e)
            | UpdateError::NotFound(e)
            | UpdateError::Conflict(e)
            | UpdateError::Internal(e) => f.write_str(e),
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
    /// API keys managed at run time, by key id.
    pub keys: BTreeMap<String, KeyRecord>,
}

/// One working key of a managed key: the current one, or during a rotation
/// the previous one, which stops working at `until_ms`.
#[derive(Debug)]
pub struct ManagedKey {
    pub entry: Arc<KeyEntry>,
    pub until_ms: Option<u64>,
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
    api_keys: DigestMap<Arc<str>>,
    /// Managed keys by the hash of each working key (a rotating key has two).
    managed: DigestMap<ManagedKey>,
    managed_by_id: HashMap<String, Arc<KeyEntry>>,
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

    /// Every known organization: those with an API key (static or
    /// managed), limits or a policy.
    pub fn organizations(&self) -> std::collections::BTreeSet<&str> {
        self.state
            .organizations
            .keys()
            .map(String::as_str)
            .chain(self.api_keys.values().map(|o| &**o))
            .chain(self.state.keys.values().map(|k| k.organization_id.as_str()))
            .chain(self.policies.keys().map(String::as_str))
            .collect()
    }

    pub fn knows_organization(&self, org: &str) -> bool {
        self.organizations().contains(org)
    }

    pub fn organization_for_key_hash(&self, hash: &[u8; 32]) -> Option<(&[u8; 32], &Arc<str>)> {
        self.api_keys.get_key_value(hash)
    }

    /// The managed key behind a hash.
    pub fn managed_key(&self, hash: &[u8; 32]) -> Option<(&[u8; 32], &ManagedKey)> {
        self.managed.get_key_value(hash)
    }

    /// A managed key by id.
    pub fn key(&self, key_id: &str) -> Option<&Arc<KeyEntry>> {
        self.managed_by_id.get(key_id)
    }

    /// Whether a model is named anywhere for `org`: its policies, a price, or
    /// a backend's model names.
    pub fn knows_model(&self, org: &str, model: &str) -> bool {
        self.policy(org, model).is_some()
            || self.state.prices.contains_key(model)
            || self.backend_list.iter().any(|b| b.target.models.contains_key(model))
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
        let mut managed = DigestMap::default();
        let mut managed_by_id = HashMap::new();
        for (id, record) in &state.keys {
            let entry = Arc::new(KeyEntry {
                key_id: Arc::from(id.as_str()),
                organization_id: Arc::from(record.organization_id.as_str()),
                expires_at_ms: record.expires_at_ms,
                revoked: record.revoked_at_ms.is_some(),
                models: record.models.clone(),
                rate_limit: record.rate_limit,
                budget: record.budget,
                runtime: runtimes.keys.get(id),
            });
            for (hash, until) in record.hashes() {
                managed.insert(hash, ManagedKey { entry: entry.clone(), until_ms: until });
            }
            managed_by_id.insert(id.clone(), entry);
        }
        runtimes.keys.retain(&state.keys);
        Snapshot { revision, state, backends, backend_list, policies, default_policy, api_keys, managed, managed_by_id }
    }
}

/// Per-backend health and metric handles, kept across snapshots, and the
/// transports (connection pools), which live outside them.
struct RuntimeRegistry {
    metrics: Metrics,
    transports: Arc<Transports>,
    by_id: HashMap<String, Arc<BackendRuntime>>,
    keys: Arc<KeyRuntimes>,
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
    keys: Arc<KeyRuntimes>,
}

impl ConfigStore {
    pub fn new(state: ConfigState, metrics: Metrics, transports: Arc<Transports>) -> Self {
        let keys = Arc::new(KeyRuntimes::default());
        let mut runtimes = RuntimeRegistry { metrics, transports, by_id: HashMap::new(), keys: keys.clone() };
        let snapshot = Snapshot::build(1, state, &mut runtimes);
        Self { current: ArcSwap::from_pointee(snapshot), writer: Mutex::new(runtimes), keys }
    }

    /// Every managed key's runtime (its last use), across snapshots.
    pub fn key_runtimes(&self) -> &Arc<KeyRuntimes> {
        &self.keys
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
    /// Runs `f` on the current state under the writer lock: no change is
    /// swapped in meanwhile.
    fn with_writer<T>(&self, f: impl FnOnce(&ConfigState) -> T) -> T {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.current.load().state)
    }

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
    /// Create (`before: None`) or change a managed key, if it is still
    /// `before` (so two admins rotating one key cannot both win).
    Key {
        before: Option<Box<KeyRecord>>,
        after: Box<KeyRecord>,
    },
}

pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<(), UpdateError>> + Send + 'a>>;

/// A routing state shared by every replica (etcd): admin writes go to it, and
/// each replica applies them when its watch sees them.
pub trait RemoteConfig: Healthy {
    /// Writes `change`; resolves once this replica has applied it
    /// (read-your-writes).
    fn write(&self, change: Change) -> WriteFuture<'_>;
    /// Records when keys were last used (key id, Unix ms), for every
    /// replica; no snapshot is rebuilt for it.
    fn write_last_used(&self, times: Vec<(String, u64)>) -> WriteFuture<'_>;
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
    /// In process; managed keys are kept in `DATA_DIR/keys.json`.
    Local(Arc<ConfigStore>, Arc<KeyFile>),
    Remote(Arc<ConfigStore>, Arc<dyn RemoteConfig>),
}

impl ConfigWriter {
    fn store(&self) -> &ConfigStore {
        match self {
            ConfigWriter::Local(store, _) | ConfigWriter::Remote(store, _) => store,
        }
    }

    /// Applies a validated change, here or through the shared source.
    async fn apply(&self, change: Change) -> Result<(), UpdateError> {
        match self {
            ConfigWriter::Local(store, file) => store
                .update(|s| {
                    match change {
                        Change::Key { before, after } => {
                            if s.keys.get(&after.key_id) != before.as_deref() {
                                return Err(UpdateError::Conflict(format!(
                                    "key {} changed meanwhile; read it and try again",
                                    after.key_id
                                )));
                            }
                            let mut keys = s.keys.clone();
                            keys.insert(after.key_id.clone(), *after);
                            // On disk first: a key that is not saved is not made.
                            file.save(&keys, store.keys.last_used()).map_err(UpdateError::Internal)?;
                            s.keys = keys;
                        }
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

    /// Creates a managed key for a known organization, limited to known
    /// models. `budgets`: whether per-key budgets can be kept (not with an
    /// external budget service). Returns the key, shown only now.
    pub async fn create_key(&self, new: NewKey, budgets: bool) -> Result<(String, KeyRecord), UpdateError> {
        {
            let snapshot = self.store().load();
            let org = &new.organization_id;
            if !snapshot.knows_organization(org) {
                return Err(UpdateError::Invalid(format!(
                    "unknown organization {org:?}: give it an API key, limits or a policy first"
                )));
            }
            if let Some(m) = new.models.iter().flatten().find(|m| !snapshot.knows_model(org, m)) {
                return Err(UpdateError::Invalid(format!(
                    "unknown model {m:?}: no policy of {org:?}, price or backend names it"
                )));
            }
        }
        if new.budget.is_some() && !budgets {
            return Err(UpdateError::Invalid(
                "per-key budgets are not available with BUDGET_SERVICE_URL: the service keeps the budgets".into(),
            ));
        }
        let (key, hash, prefix) = keys::generate().map_err(|e| UpdateError::Internal(e.0))?;
        let key_id = keys::new_key_id().map_err(|e| UpdateError::Internal(e.0))?;
        let record = new.into_record(key_id, hash, prefix, crate::util::now_ms());
        self.apply(Change::Key { before: None, after: Box::new(record.clone()) }).await?;
        Ok((key, record))
    }

    /// A new key under the same id; the old one keeps working for
    /// `grace_secs` (a rotation during a rotation ends the first one's grace).
    pub async fn rotate_key(&self, key_id: &str, grace_secs: u64) -> Result<(String, KeyRecord), UpdateError> {
        if grace_secs > keys::MAX_GRACE_SECS {
            return Err(UpdateError::Invalid(format!(
                "`grace_period_secs` must be at most {} (30 days)",
                keys::MAX_GRACE_SECS
            )));
        }
        let before = self.key_record(key_id)?;
        let now = crate::util::now_ms();
        match before.status(now) {
            keys::KeyStatus::Revoked => return Err(UpdateError::Invalid(format!("key {key_id} is revoked"))),
            keys::KeyStatus::Expired => {
                return Err(UpdateError::Invalid(format!("key {key_id} has expired; create a new one")));
            }
            keys::KeyStatus::Active | keys::KeyStatus::Rotating => {}
        }
        let (key, hash, prefix) = keys::generate().map_err(|e| UpdateError::Internal(e.0))?;
        let mut after = before.clone();
        let previous = Previous {
            hash: std::mem::replace(&mut after.hash, hash),
            prefix: std::mem::replace(&mut after.prefix, prefix),
            until_ms: now + grace_secs * 1000,
        };
        after.previous = (grace_secs > 0).then_some(previous);
        self.apply(Change::Key { before: Some(Box::new(before)), after: Box::new(after.clone()) }).await?;
        Ok((key, after))
    }

    /// Revokes a key (and a rotating key's previous one) at once; revoking
    /// a revoked key changes nothing.
    pub async fn revoke_key(&self, key_id: &str) -> Result<KeyRecord, UpdateError> {
        let before = self.key_record(key_id)?;
        if before.revoked_at_ms.is_some() {
            return Ok(before);
        }
        let mut after = before.clone();
        after.revoked_at_ms = Some(crate::util::now_ms());
        after.previous = None;
        self.apply(Change::Key { before: Some(Box::new(before)), after: Box::new(after.clone()) }).await?;
        Ok(after)
    }

    fn key_record(&self, key_id: &str) -> Result<KeyRecord, UpdateError> {
        self.store()
            .load()
            .state
            .keys
            .get(key_id)
            .cloned()
            .ok_or_else(|| UpdateError::NotFound(format!("unknown key {key_id:?}")))
    }

    /// Writes out the keys' last-use times that are due (at most about once
    /// a minute per key). Returns how many.
    pub async fn flush_last_used(&self) -> Result<usize, UpdateError> {
        let times = self.store().keys.due();
        if times.is_empty() {
            return Ok(0);
        }
        let n = times.len();
        match self {
            ConfigWriter::Local(store, file) => {
                let (store, file) = (store.clone(), file.clone());
                tokio::task::spawn_blocking(move || {
                    // Under the writer lock, so that a key change is not
                    // overwritten with an older key list.
                    store.with_writer(|state| file.save(&state.keys, store.keys.last_used()))
                })
                .await
                .map_err(|e| UpdateError::Internal(e.to_string()))?
                .map_err(UpdateError::Internal)?;
            }
            ConfigWriter::Remote(_, remote) => remote.write_last_used(times).await?,
        }
        Ok(n)
    }

    /// Seconds since the shared source confirmed this replica's state, if
    /// there is one.
    pub fn seconds_since_sync(&self) -> Option<f64> {
        match self {
            ConfigWriter::Local(..) => None,
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
