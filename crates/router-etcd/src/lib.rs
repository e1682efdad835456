//! The etcd source: routing state shared by every replica, watched for
//! changes. It implements the core's `RemoteConfig`: the core knows a shared
//! source exists, not that it is etcd (whose client brings a gRPC stack).
//!
//! Start-up reads the whole prefix at one revision, builds a snapshot, swaps it
//! in, and watches from the next revision. Each watch response is applied as
//! one new snapshot, in revision order; an event at or below the applied
//! revision is ignored, so an older revision never overwrites a newer one.
//!
//! When the watch breaks it reconnects with backoff and resumes from the last
//! applied revision. If that revision was compacted, it re-reads everything
//! and watches again: every change is applied eventually, none skipped.
//!
//! Invalid entries (bad JSON, an invalid policy, a key outside the schema, an
//! empty value) are rejected: logged with the key and the reason, counted in
//! `api_router_config_rejected_total`, and the last good value stays.
//!
//! Every applied state is also written to `DATA_DIR/config-cache.json` (write,
//! fsync, rename) with its revision. If etcd is unreachable at start-up, the
//! router serves from that cache, reports `config_service: unhealthy`, and
//! keeps trying; once etcd answers it re-reads everything.
//!
//! Admin writes go to etcd; the call returns once this replica has applied
//! the write's revision (read-your-writes). Other replicas follow by watch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use router_core::config_service::{
    BackendInput, BackendSpec, Change, ConfigState, ConfigStore, Override, RemoteConfig, UpdateError, WriteFuture,
};
use router_core::keys::KeyRecord;
use router_core::limits::OrgLimits;
use router_core::metrics::Metrics;
use router_core::readiness::Healthy;
use router_core::routing::policy::{Policy, PolicyInput};
use router_core::util::{Backoff, now_ms, valid_id};
use tokio_util::task::TaskTracker;

/// How often the watch asks etcd to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch with no answer for this long is broken.
const SILENCE_LIMIT: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Without a trailing slash, e.g. `/api-router`.
    pub prefix: String,
}

/// One accepted entry of the key space.
#[derive(Debug, Clone)]
enum Entry {
    Policy(Policy),
    Backend(String, BackendSpec),
    Override(String, Option<Override>),
    Organization(String, OrgLimits),
    ApiKey([u8; 32], String),
    /// A managed API key's record, at `keys/{key_id}`.
    Key(Box<KeyRecord>),
    /// When a managed key was last used (Unix ms), at `key-last-used/{key_id}`.
    KeyLastUsed(String, u64),
}

/// What a guarded write expects to find at its key.
enum Expect {
    Anything,
    Absent,
    /// This exact stored value.
    Value(String),
}

#[derive(Serialize, Deserialize)]
struct OverrideValue {
    #[serde(default = "yes")]
    degraded: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: String,
    #[serde(default)]
    since: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Default)]
struct Cache {
    revision: i64,
    kvs: BTreeMap<String, String>,
}

/// Why an entry was rejected; one `reason` label each.
#[derive(Debug)]
struct Rejection {
    reason: &'static str,
    detail: String,
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection { reason, detail: detail.into() }
}

/// Judges one entry as the watch does, without the state it would join (a
/// policy's backends are not checked): `Ok` or the rejection's reason and
/// detail. `prefix` is `CONFIG_SERVICE_PREFIX`. For the fuzz target.
pub fn check_entry(prefix: &str, key: &str, value: &str) -> Result<(), String> {
    parse_entry(&format!("{prefix}/"), key, value).map(|_| ()).map_err(|r| format!("{}: {}", r.reason, r.detail))
}

/// A key's kind and name below `key_prefix` (the prefix and a slash).
fn split_key<'k>(key_prefix: &str, key: &'k str) -> Result<(&'k str, &'k str), Rejection> {
    let rest = key.strip_prefix(key_prefix).ok_or_else(|| reject("schema", "outside the prefix"))?;
    match rest.split_once('/') {
        Some((
            kind @ ("policies" | "backends" | "backend-overrides" | "organizations" | "api-keys" | "keys"
            | "key-last-used"),
            name,
        )) if !name.is_empty() => Ok((kind, name)),
        _ => Err(reject("schema", "key outside the schema")),
    }
}

/// Parses one entry: the key's shape and the value's JSON.
fn parse_entry(key_prefix: &str, key: &str, value: &str) -> Result<Entry, Rejection> {
    let (kind, name) = split_key(key_prefix, key)?;
    if value.trim().is_empty() {
        return Err(reject("empty", "empty value"));
    }
    let json = || serde_json::from_str::<serde_json::Value>(value).map_err(|e| reject("json", e.to_string()));
    match kind {
        "policies" => {
            let (org, model) =
                name.split_once('/').ok_or_else(|| reject("schema", "expected policies/{org}/{model}"))?;
            let input: PolicyInput = serde_json::from_value(json()?).map_err(|e| reject("invalid", e.to_string()))?;
            let policy = input.into_policy().map_err(|e| reject("invalid", e))?;
            if policy.organization_id != org || policy.model != model {
                return Err(reject("invalid", "organization_id and model must match the key"));
            }
            Ok(Entry::Policy(policy))
        }
        "backends" => {
            if !valid_id(name) {
                return Err(reject("schema", "invalid backend id"));
            }
            let v: BackendInput = serde_json::from_value(json()?).map_err(|e| reject("invalid", e.to_string()))?;
            let spec = v.into_spec().map_err(|e| reject("invalid", e))?;
            Ok(Entry::Backend(name.to_string(), spec))
        }
        "backend-overrides" => {
            let v: OverrideValue = serde_json::from_value(json()?).map_err(|e| reject("invalid", e.to_string()))?;
            let since =
                v.since.as_deref().and_then(|s| humantime::parse_rfc3339(s).ok()).unwrap_or_else(SystemTime::now);
            let o = v.degraded.then_some(Override { reason: v.reason, since, by: v.by });
            Ok(Entry::Override(name.to_string(), o))
        }
        "organizations" => {
            if !valid_id(name) {
                return Err(reject("schema", "invalid organization id"));
            }
            let limits = OrgLimits::from_json(json()?).map_err(|e| reject("invalid", e))?;
            Ok(Entry::Organization(name.to_string(), limits))
        }
        "api-keys" => {
            let hash: [u8; 32] = hex::decode(name)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| reject("schema", "expected api-keys/{sha256 hex}"))?;
            let org = match serde_json::from_str::<serde_json::Value>(value) {
                Ok(serde_json::Value::Object(o)) => {
                    o.get("organization_id").and_then(|v| v.as_str()).unwrap_or_default().to_string()
                }
                Ok(serde_json::Value::String(s)) => s,
                _ => value.trim().to_string(),
            };
            if !valid_id(&org) {
                return Err(reject("invalid", "invalid organization id"));
            }
            Ok(Entry::ApiKey(hash, org))
        }
        "keys" => {
            let record: KeyRecord = serde_json::from_value(json()?).map_err(|e| reject("invalid", e.to_string()))?;
            if record.key_id != name {
                return Err(reject("invalid", "key_id must match the key"));
            }
            if !valid_id(&record.organization_id) {
                return Err(reject("invalid", "invalid organization id"));
            }
            if record.hashes().is_empty() {
                return Err(reject("invalid", "hash must be a SHA-256 in hex"));
            }
            Ok(Entry::Key(Box::new(record)))
        }
        "key-last-used" => {
            let ms = value.trim().parse().map_err(|_| reject("invalid", "expected Unix milliseconds"))?;
            Ok(Entry::KeyLastUsed(name.to_string(), ms))
        }
        _ => Err(reject("schema", "key outside the schema")),
    }
}

pub struct EtcdSource {
    settings: EtcdSettings,
    base: ConfigState,
    store: Arc<ConfigStore>,
    metrics: Metrics,
    cache_path: PathBuf,
    client: tokio::sync::Mutex<Option<Client>>,
    /// Raw values of accepted entries, by key; and the applied revision.
    accepted: Mutex<(BTreeMap<String, String>, i64)>,
    healthy: AtomicBool,
    applied: watch::Sender<i64>,
    cache_tx: watch::Sender<Option<Arc<Cache>>>,
    last_sync_ms: AtomicU64,
}

impl EtcdSource {
    /// Connects and syncs, or falls back to the cache. Never fails on etcd
    /// being down: the background task keeps trying.
    pub async fn start(
        settings: EtcdSettings,
        base: ConfigState,
        store: Arc<ConfigStore>,
        metrics: Metrics,
        data_dir: &Path,
    ) -> Arc<Self> {
        let (applied, _) = watch::channel(0);
        let (cache_tx, _) = watch::channel(None);
        let source = Arc::new(Self {
            settings,
            base,
            store,
            metrics,
            cache_path: data_dir.join("config-cache.json"),
            client: tokio::sync::Mutex::new(None),
            accepted: Mutex::new((BTreeMap::new(), 0)),
            healthy: AtomicBool::new(false),
            applied,
            cache_tx,
            last_sync_ms: AtomicU64::new(0),
        });
        match source.full_sync().await {
            Ok(rev) => {
                tracing::info!(revision = rev, prefix = %source.settings.prefix, "config service synced from etcd")
            }
            Err(e) => {
                tracing::error!(error = %e, "config service (etcd) unreachable at start-up; serving from the cache");
                source.load_cache();
            }
        }
        source
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn applied_revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Seconds since etcd last confirmed our state (a read, an event, or a
    /// watch progress report).
    pub fn seconds_since_sync(&self) -> f64 {
        router_core::util::age_seconds(Some(self.last_sync_ms.load(Ordering::Relaxed)).filter(|t| *t > 0))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeMap<String, String>, i64)> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn client(&self) -> Result<Client, String> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let c = Client::connect(&self.settings.endpoints, Some(options)).await.map_err(|e| e.to_string())?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    fn key_prefix(&self) -> String {
        format!("{}/", self.settings.prefix)
    }

    /// Reads the whole prefix at one revision and replaces the state with it.
    async fn full_sync(&self) -> Result<i64, String> {
        let mut client = self.client().await?;
        let resp = match client.get(self.key_prefix(), Some(GetOptions::new().with_prefix())).await {
            Ok(r) => r,
            Err(e) => {
                self.forget_client().await;
                return Err(e.to_string());
            }
        };
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut kvs: Vec<(String, String)> = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap_or("").to_string(), String::from_utf8_lossy(kv.value()).into_owned()))
            .collect();
        // Backends first, so policies are checked against them.
        kvs.sort_by_key(|(k, _)| !k.starts_with(&format!("{}backends/", self.key_prefix())));
        {
            let mut acc = self.lock();
            let mut fresh = BTreeMap::new();
            for (key, value) in kvs {
                match self.accept(&fresh, &key, &value) {
                    Ok(_) => {
                        fresh.insert(key, value);
                    }
                    Err(r) => {
                        // The last good value (from before the resync) stays.
                        self.rejected(&key, &r);
                        if let Some(old) = acc.0.get(&key) {
                            fresh.insert(key, old.clone());
                        }
                    }
                }
            }
            acc.0 = fresh;
        }
        self.apply(revision, true);
        self.healthy.store(true, Ordering::Relaxed);
        Ok(revision)
    }

    fn rejected(&self, key: &str, r: &Rejection) {
        self.metrics.config_rejected.with_label_values(&[r.reason]).inc();
        tracing::warn!(key = %key, reason = r.reason, detail = %r.detail, "config entry rejected; the last good value stays");
    }

    /// The kind of a key under the prefix, if it is in the schema.
    fn kind<'k>(&self, key: &'k str) -> Result<(&'k str, &'k str), Rejection> {
        split_key(&self.key_prefix(), key)
    }

    /// Validates one entry, and a policy's backends against the accepted
    /// state it would join.
    fn accept(&self, accepted: &BTreeMap<String, String>, key: &str, value: &str) -> Result<Entry, Rejection> {
        let entry = self.parse(key, value)?;
        match &entry {
            Entry::Policy(p) => {
                p.validate_against(&self.compose_backends(accepted)).map_err(|e| reject("unknown_backend", e))?
            }
            // Files are read here, once, not each time the state is composed.
            Entry::Backend(_, spec) => spec.tls.validate().map_err(|e| reject("tls", e.to_string()))?,
            _ => {}
        }
        Ok(entry)
    }

    /// Parses one entry: the key's shape and the value's JSON.
    fn parse(&self, key: &str, value: &str) -> Result<Entry, Rejection> {
        parse_entry(&self.key_prefix(), key, value)
    }

    fn compose_backends(&self, accepted: &BTreeMap<String, String>) -> BTreeMap<String, BackendSpec> {
        let mut backends = self.base.backends.clone();
        let prefix = format!("{}backends/", self.key_prefix());
        for (k, v) in accepted.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
            if let Ok(Entry::Backend(id, spec)) = self.parse(k, v) {
                backends.insert(id, spec);
            }
        }
        backends
    }

    /// The base state with every accepted entry applied.
    fn compose(&self, accepted: &BTreeMap<String, String>) -> ConfigState {
        let mut state = self.base.clone();
        state.backends = self.compose_backends(accepted);
        for (k, v) in accepted {
            // Accepted entries parse; a policy whose backend was deleted
            // since routes to the backends that remain.
            match self.parse(k, v) {
                Ok(Entry::Policy(p)) => {
                    state.policies.insert((p.organization_id.clone(), p.model.clone()), p);
                }
                Ok(Entry::Override(id, Some(o))) => {
                    state.overrides.insert(id, o);
                }
                Ok(Entry::Organization(org, l)) => {
                    state.organizations.insert(org, l);
                }
                Ok(Entry::ApiKey(h, org)) => {
                    state.api_keys.insert(h, org);
                }
                Ok(Entry::Key(record)) => {
                    state.keys.insert(record.key_id.clone(), *record);
                }
                Ok(Entry::Backend(..) | Entry::Override(_, None) | Entry::KeyLastUsed(..)) | Err(_) => {}
            }
        }
        state
    }

    /// Builds and swaps in the snapshot of the accepted state at `revision`.
    fn apply(&self, revision: i64, full: bool) {
        let (state, cache, last_used) = {
            let mut acc = self.lock();
            if !full && revision <= acc.1 {
                return;
            }
            acc.1 = revision;
            let last_used = self.last_used(&acc.0);
            (self.compose(&acc.0), Arc::new(Cache { revision, kvs: acc.0.clone() }), last_used)
        };
        self.store.replace(state, revision.max(0) as u64);
        self.store.key_runtimes().restore(&last_used);
        self.metrics.config_revision.set(revision);
        self.metrics.config_updates.inc();
        self.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        let _ = self.cache_tx.send(Some(cache));
        self.applied.send_replace(revision);
        tracing::info!(revision, "config snapshot applied");
    }

    /// Every key's last use, as stored.
    fn last_used(&self, accepted: &BTreeMap<String, String>) -> BTreeMap<String, u64> {
        let prefix = format!("{}key-last-used/", self.key_prefix());
        accepted
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| match self.parse(k, v) {
                Ok(Entry::KeyLastUsed(id, ms)) => Some((id, ms)),
                _ => None,
            })
            .collect()
    }

    fn load_cache(&self) {
        let cache: Cache = match std::fs::read(&self.cache_path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, path = %self.cache_path.display(), "config cache is unreadable; starting from the local configuration");
                    return;
                }
            },
            Err(_) => {
                tracing::warn!(path = %self.cache_path.display(), "no config cache; starting from the local configuration");
                return;
            }
        };
        let revision = cache.revision;
        self.lock().0 = cache.kvs;
        self.apply(revision, true);
        self.last_sync_ms.store(0, Ordering::Relaxed);
        tracing::info!(revision, "serving the cached configuration");
    }

    /// Writes the latest applied state to the cache file, off the watch path.
    pub async fn run_cache_writer(self: Arc<Self>, cancel: CancellationToken) {
        let mut rx = self.cache_tx.subscribe();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let Some(cache) = rx.borrow_and_update().clone() else { continue };
            let path = self.cache_path.clone();
            let result = tokio::task::spawn_blocking(move || {
                let bytes = serde_json::to_vec(&*cache).map_err(|e| e.to_string())?;
                router_core::util::write_atomically(&path, &bytes)
            })
            .await;
            if let Ok(Err(e)) | Err(e) = result.map_err(|e| e.to_string()) {
                tracing::error!(error = %e, "cannot write the config cache");
            }
        }
    }

    /// Watches until cancelled, reconnecting with backoff.
    pub async fn watch_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut need_full = !self.is_healthy();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if need_full {
                match self.full_sync().await {
                    Ok(rev) => {
                        tracing::info!(revision = rev, "config service re-synced from etcd");
                        need_full = false;
                    }
                    Err(e) => {
                        self.set_unhealthy(&e);
                        if !self.sleep(&cancel, &mut backoff).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            match self.watch(&cancel, &mut backoff).await {
                WatchEnd::Cancelled => return,
                WatchEnd::Compacted => {
                    tracing::warn!(revision = self.lock().1, "watch revision was compacted; re-reading everything");
                    need_full = true;
                }
                WatchEnd::Broken(e) => {
                    self.set_unhealthy(&e);
                    self.forget_client().await;
                    if !self.sleep(&cancel, &mut backoff).await {
                        return;
                    }
                }
            }
            self.metrics.config_watch_restarts.inc();
        }
    }

    fn set_unhealthy(&self, e: &str) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "config service (etcd) unreachable; serving the last applied configuration");
        }
    }

    async fn sleep(&self, cancel: &CancellationToken, backoff: &mut Backoff) -> bool {
        let d = backoff.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn watch(&self, cancel: &CancellationToken, backoff: &mut Backoff) -> WatchEnd {
        let mut client = match self.client().await {
            Ok(c) => c,
            Err(e) => return WatchEnd::Broken(e),
        };
        let from = self.lock().1 + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(from).with_progress_notify();
        let mut stream = match client.watch(self.key_prefix(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut heard = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => return WatchEnd::Cancelled,
                _ = progress.tick() => {
                    // A connection that stays open but silent (a stalled
                    // network) breaks nothing by itself: no answer to the
                    // progress requests for a while is a broken watch.
                    if heard.elapsed() > SILENCE_LIMIT {
                        return WatchEnd::Broken(format!("no answer from etcd for {SILENCE_LIMIT:?}"));
                    }
                    // Ask etcd to confirm the watch is current; the answer
                    // arrives as a response without events.
                    if let Err(e) = stream.request_progress().await {
                        return WatchEnd::Broken(e.to_string());
                    }
                    continue;
                }
                m = stream.message() => m,
            };
            heard = tokio::time::Instant::now();
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Err(e) => return WatchEnd::Broken(e.to_string()),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return WatchEnd::Compacted;
                }
                return WatchEnd::Broken(format!("watch canceled: {}", resp.cancel_reason()));
            }
            if !self.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!("config service (etcd) watch established");
            }
            backoff.reset();
            self.last_sync_ms.store(now_ms(), Ordering::Relaxed);
            if resp.events().is_empty() {
                continue;
            }
            let mut revision = self.lock().1;
            let mut changed = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                if kv.mod_revision() <= self.lock().1 {
                    continue;
                }
                revision = revision.max(kv.mod_revision());
                let key = kv.key_str().unwrap_or("").to_string();
                let mut acc = self.lock();
                match ev.event_type() {
                    EventType::Put => {
                        let value = String::from_utf8_lossy(kv.value()).into_owned();
                        match self.accept(&acc.0, &key, &value) {
                            // Another replica's note of a key's use: no
                            // snapshot to rebuild.
                            Ok(Entry::KeyLastUsed(id, ms)) => {
                                acc.0.insert(key, value);
                                drop(acc);
                                self.store.key_runtimes().get(&id).seen(ms);
                            }
                            Ok(_) => {
                                acc.0.insert(key, value);
                                changed = true;
                            }
                            Err(r) => self.rejected(&key, &r),
                        }
                    }
                    EventType::Delete => match self.kind(&key) {
                        Ok(_) => {
                            let removed_override = key.starts_with(&format!("{}backend-overrides/", self.key_prefix()));
                            if acc.0.remove(&key).is_some() {
                                changed = true;
                                if removed_override {
                                    drop(acc);
                                    self.reset_health(&key);
                                }
                            }
                        }
                        Err(r) => self.rejected(&key, &r),
                    },
                }
            }
            if changed {
                self.apply(revision, false);
            } else {
                // Nothing accepted: the revision still moves forward.
                self.lock().1 = revision;
                self.applied.send_replace(revision);
            }
        }
    }

    /// Marking healthy clears the failure counters on every replica.
    fn reset_health(&self, key: &str) {
        let id = key.rsplit('/').next().unwrap_or_default();
        if let Some(b) = self.store.load().backend(id) {
            b.runtime.health.reset();
        }
    }

    /// Writes `key` (or deletes it with `None`) and waits until this replica
    /// has applied the write.
    pub async fn write(&self, key: &str, value: Option<String>) -> Result<(), UpdateError> {
        self.write_if(key, value, Expect::Anything).await
    }

    /// [`EtcdSource::write`], if the key holds what `expect` says; else
    /// nothing is written and the answer is a conflict.
    async fn write_if(&self, key: &str, value: Option<String>, expect: Expect) -> Result<(), UpdateError> {
        let key = format!("{}{key}", self.key_prefix());
        let unavailable = UpdateError::Unavailable;
        let mut client = self.client().await.map_err(unavailable)?;
        let compare = match expect {
            Expect::Anything => None,
            Expect::Absent => Some(Compare::version(key.clone(), CompareOp::Equal, 0)),
            Expect::Value(v) => Some(Compare::value(key.clone(), CompareOp::Equal, v)),
        };
        let op = match value {
            Some(v) => TxnOp::put(key.clone(), v, None),
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new().when(compare.into_iter().collect::<Vec<_>>()).and_then([op]);
        let revision = match client.txn(txn).await {
            Ok(r) if !r.succeeded() => {
                return Err(UpdateError::Conflict(format!("{key} changed meanwhile; read it and try again")));
            }
            Ok(r) => r.header().map(|h| h.revision()).unwrap_or(0),
            Err(e) => {
                self.forget_client().await;
                return Err(unavailable(e.to_string()));
            }
        };
        let mut rx = self.applied.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|applied| *applied >= revision)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(unavailable(format!("written at revision {revision} but not yet applied by this replica"))),
        }
    }
}

impl EtcdSource {
    /// What a key's record must still be for a change to it: absent for a
    /// new key, else the stored text, if it is still what the caller read.
    fn expect_key(&self, key: &str, before: Option<&KeyRecord>) -> Result<Expect, UpdateError> {
        let Some(before) = before else { return Ok(Expect::Absent) };
        match self.lock().0.get(&format!("{}{key}", self.key_prefix())) {
            Some(raw) if serde_json::from_str::<KeyRecord>(raw).ok().as_ref() == Some(before) => {
                Ok(Expect::Value(raw.clone()))
            }
            _ => Err(UpdateError::Conflict(format!("{key} changed meanwhile; read it and try again"))),
        }
    }
}

enum WatchEnd {
    Cancelled,
    Compacted,
    Broken(String),
}

/// The JSON stored at `backend-overrides/{id}`.
pub fn override_value(o: &Override) -> String {
    serde_json::json!({
        "degraded": true,
        "reason": o.reason,
        "by": o.by,
        "since": router_core::util::rfc3339(o.since),
    })
    .to_string()
}

impl Healthy for EtcdSource {
    fn is_healthy(&self) -> bool {
        EtcdSource::is_healthy(self)
    }
}

impl RemoteConfig for EtcdSource {
    fn write(&self, change: Change) -> WriteFuture<'_> {
        Box::pin(async move {
            let (key, value, expect) = match &change {
                Change::Policy(p) => {
                    (format!("policies/{}/{}", p.organization_id, p.model), Some(json(p)?), Expect::Anything)
                }
                Change::Override(id, over) => {
                    (format!("backend-overrides/{id}"), over.as_ref().map(override_value), Expect::Anything)
                }
                Change::OrgLimits(org, limits) => {
                    (format!("organizations/{org}"), Some(json(limits)?), Expect::Anything)
                }
                Change::Key { before, after } => {
                    let key = format!("keys/{}", after.key_id);
                    let expect = self.expect_key(&key, before.as_deref())?;
                    (key, Some(json(after)?), expect)
                }
            };
            self.write_if(&key, value, expect).await
        })
    }

    fn write_last_used(&self, times: Vec<(String, u64)>) -> WriteFuture<'_> {
        Box::pin(async move {
            let mut client = self.client().await.map_err(UpdateError::Unavailable)?;
            // etcd takes at most 128 operations in one transaction.
            for chunk in times.chunks(100) {
                let puts: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(id, ms)| {
                        TxnOp::put(format!("{}key-last-used/{id}", self.key_prefix()), ms.to_string(), None)
                    })
                    .collect();
                if let Err(e) = client.txn(Txn::new().and_then(puts)).await {
                    self.forget_client().await;
                    return Err(UpdateError::Unavailable(e.to_string()));
                }
            }
            Ok(())
        })
    }

    fn seconds_since_sync(&self) -> f64 {
        EtcdSource::seconds_since_sync(self)
    }

    fn run(self: Arc<Self>, tasks: &TaskTracker, cancel: CancellationToken) {
        tasks.spawn(self.clone().watch_loop(cancel.clone()));
        tasks.spawn(self.run_cache_writer(cancel));
    }
}

fn json<T: Serialize>(value: &T) -> Result<String, UpdateError> {
    serde_json::to_string(value).map_err(|e| UpdateError::Invalid(e.to_string()))
}
