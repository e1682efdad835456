//! API keys managed at run time: created, listed, rotated with a grace
//! period, revoked, expired; each with optional allowed models, its own rate
//! limit and budget (on top of its organization's).
//!
//! A key is 256 bits from the operating system's generator, written as
//! [`KEY_PREFIX`] and 64 hex digits, so that secret scanners can find a
//! leaked one. Only its SHA-256 is stored, beside a short non-secret
//! `prefix` (the first hex digits) that identifies it in listings. The
//! `key_id` never changes, so a key's spend history survives rotation.
//!
//! Records are part of the routing state ([`crate::config_service`]): with
//! etcd they live under the config prefix and every replica learns of a
//! change through its watch; without it they live in `DATA_DIR/keys.json`.
//! Expiry and the end of a rotation's grace period are checked at each
//! request against the clock, so they need no change to take effect.
//! `last_used_at` is kept per key in memory (one atomic store per request)
//! and written out off the request path, about once a minute.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::limits::{Budget, RateLimit};
use crate::util::{now_ms, rfc3339};

/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-ar-";

/// Hex digits of the key shown in listings (32 bits: identifies, does not
/// reveal).
const SHOWN_DIGITS: usize = 8;

/// The length of a key's shown prefix: [`KEY_PREFIX`] and [`SHOWN_DIGITS`].
pub const SHOWN_PREFIX_LEN: usize = KEY_PREFIX.len() + SHOWN_DIGITS;

/// The longest key name.
pub const MAX_NAME: usize = 128;

/// How often a key's `last_used_at` is written out, at most.
pub const LAST_USED_EVERY_MS: u64 = 60_000;

/// A key as stored: metadata and hashes, never the key itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub organization_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's first characters: non-secret, for finding it in listings.
    pub prefix: String,
    /// SHA-256 of the current key, hex.
    pub hash: String,
    /// During a rotation: the previous key's hash and when it stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// Allowed models; `None`: every model of the organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    pub hash: String,
    /// The previous key's shown prefix (to find a leaked key by it).
    #[serde(default)]
    pub prefix: String,
    pub until_ms: u64,
}

/// A key's state, as listings show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Rotating,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Rotating => "rotating",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

impl KeyRecord {
    pub fn status(&self, now_ms: u64) -> KeyStatus {
        if self.revoked_at_ms.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|e| e <= now_ms) {
            KeyStatus::Expired
        } else if self.previous.as_ref().is_some_and(|p| p.until_ms > now_ms) {
            KeyStatus::Rotating
        } else {
            KeyStatus::Active
        }
    }

    /// The metadata the admin API shows: never the key or its hash.
    pub fn view(&self, last_used_ms: Option<u64>, now_ms: u64) -> Value {
        let time = |ms: Option<u64>| ms.map(|ms| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)));
        json!({
            "key_id": self.key_id,
            "organization_id": self.organization_id,
            "name": self.name,
            "prefix": self.prefix,
            "status": self.status(now_ms).as_str(),
            "created_at": time(Some(self.created_at_ms)),
            "expires_at": time(self.expires_at_ms),
            "last_used_at": time(last_used_ms),
            "revoked_at": time(self.revoked_at_ms),
            "rotation_ends_at": time(self.previous.as_ref().map(|p| p.until_ms).filter(|u| *u > now_ms)),
            "models": self.models,
            "rate_limit": self.rate_limit,
            "budget": self.budget,
        })
    }
}

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A new key: (the key, its SHA-256 in hex, its shown prefix).
pub fn generate() -> Result<(String, String, String), KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| KeyError(format!("the system's random generator failed: {e}")))?;
    let key = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    let hash = hex::encode(crate::auth::hash_key(&key));
    let prefix = key[..SHOWN_PREFIX_LEN].to_string();
    Ok((key, hash, prefix))
}

/// A new key id: `key_` and 16 hex digits.
pub fn new_key_id() -> Result<String, KeyError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| KeyError(format!("the system's random generator failed: {e}")))?;
    Ok(format!("key_{}", hex::encode(bytes)))
}

/// The longest grace period a rotation may give the old key (30 days).
pub const MAX_GRACE_SECS: u64 = 30 * 24 * 3600;

/// A key to create, as the admin API takes it, its shape checked. What it
/// names (the organization, the models) is checked against the routing
/// state when it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    pub organization_id: String,
    pub name: Option<String>,
    pub expires_at_ms: Option<u64>,
    pub models: Option<Vec<String>>,
    pub rate_limit: Option<RateLimit>,
    pub budget: Option<Budget>,
}

impl NewKey {
    /// `{"organization_id", "name"?, "expires_at"?, "models"?, "rate_limit"?,
    /// "budget"?}`; anything else is refused by name.
    pub fn from_json(value: Value, now_ms: u64) -> Result<NewKey, KeyError> {
        let bad = |m: String| KeyError(m);
        let Value::Object(mut obj) = value else { return Err(bad("the body must be a JSON object".into())) };
        const FIELDS: [&str; 6] = ["organization_id", "name", "expires_at", "models", "rate_limit", "budget"];
        if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(format!("unknown field `{unknown}`; expected one of {}", FIELDS.join(", "))));
        }
        let organization_id = match obj.remove("organization_id") {
            Some(Value::String(o)) if crate::util::valid_id(&o) => o,
            Some(_) => return Err(bad(format!("`organization_id` must be {}", crate::util::ID_RULES))),
            None => return Err(bad("missing field `organization_id`".into())),
        };
        let name = match obj.remove("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(n)) if n.chars().count() <= MAX_NAME && !n.chars().any(char::is_control) => Some(n),
            Some(Value::String(_)) => {
                return Err(bad(format!("`name` must be at most {MAX_NAME} characters, without control characters")));
            }
            Some(_) => return Err(bad("`name` must be a string".into())),
        };
        let expires_at_ms = match obj.remove("expires_at") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => match parse_time(&t) {
                Some(ms) if ms > now_ms => Some(ms),
                Some(_) => return Err(bad(format!("`expires_at` {t:?} is not in the future"))),
                None => return Err(bad(format!("`expires_at` {t:?} is not an RFC 3339 time"))),
            },
            Some(_) => return Err(bad("`expires_at` must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z".into())),
        };
        let models = match obj.remove("models") {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) if !list.is_empty() => {
                let mut models = Vec::with_capacity(list.len());
                for m in list {
                    match m {
                        Value::String(m) if !m.is_empty() && m.len() <= 256 => {
                            if !models.contains(&m) {
                                models.push(m);
                            }
                        }
                        _ => return Err(bad("`models` must be model names (1-256 characters)".into())),
                    }
                }
                Some(models)
            }
            Some(_) => return Err(bad("`models` must be a non-empty array of model names".into())),
        };
        // The same rules as an organization's limits (positive numbers).
        let limits = crate::limits::OrgLimits::from_json(Value::Object(obj)).map_err(bad)?;
        Ok(NewKey {
            organization_id,
            name,
            expires_at_ms,
            models,
            rate_limit: limits.rate_limit,
            budget: limits.budget,
        })
    }

    /// The stored record for a key with `hash` and `prefix`.
    pub fn into_record(self, key_id: String, hash: String, prefix: String, now_ms: u64) -> KeyRecord {
        KeyRecord {
            key_id,
            organization_id: self.organization_id,
            name: self.name,
            prefix,
            hash,
            previous: None,
            created_at_ms: now_ms,
            expires_at_ms: self.expires_at_ms,
            revoked_at_ms: None,
            models: self.models,
            rate_limit: self.rate_limit,
            budget: self.budget,
        }
    }
}

/// A key as the request path sees it: who it is, what it may do. Built in
/// each snapshot from its record.
#[derive(Debug)]
pub struct KeyEntry {
    pub key_id: Arc<str>,
    pub organization_id: Arc<str>,
    pub expires_at_ms: Option<u64>,
    pub revoked: bool,
    pub models: Option<Vec<String>>,
    pub rate_limit: Option<RateLimit>,
    pub budget: Option<Budget>,
    /// Outlives snapshots: when the key was last used.
    pub runtime: Arc<KeyRuntime>,
}

impl KeyEntry {
    /// Whether this key may ask for `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// Per key, across snapshots.
#[derive(Debug, Default)]
pub struct KeyRuntime {
    /// Unix ms of the last request with this key (0: none seen here).
    last_used_ms: AtomicU64,
    /// What was last written out.
    written_ms: AtomicU64,
}

impl KeyRuntime {
    /// One relaxed store: no lock, no write on the request path.
    #[inline]
    pub fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> Option<u64> {
        Some(self.last_used_ms.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    /// The time to write out, if it moved on by a minute since the last
    /// write (and marks it written).
    pub fn due(&self) -> Option<u64> {
        let used = self.last_used_ms.load(Ordering::Relaxed);
        let written = self.written_ms.load(Ordering::Relaxed);
        (used > 0 && (written == 0 || used >= written + LAST_USED_EVERY_MS)).then(|| {
            self.written_ms.store(used, Ordering::Relaxed);
            used
        })
    }

    /// A time read from storage (another replica's use, or before a
    /// restart): kept if later than what this replica saw.
    pub fn seen(&self, ms: u64) {
        self.last_used_ms.fetch_max(ms, Ordering::Relaxed);
        self.written_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// Key runtimes by key id, kept across snapshots (like backends' health).
#[derive(Debug, Default)]
pub struct KeyRuntimes(Mutex<HashMap<String, Arc<KeyRuntime>>>);

impl KeyRuntimes {
    pub fn get(&self, key_id: &str) -> Arc<KeyRuntime> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key_id.to_string()).or_default().clone()
    }

    /// Last-use times read from storage.
    pub fn restore(&self, times: &BTreeMap<String, u64>) {
        for (id, t) in times {
            self.get(id).seen(*t);
        }
    }

    /// Last-use times that are due to be written out, marked written.
    pub fn due(&self) -> Vec<(String, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().filter_map(|(id, rt)| rt.due().map(|t| (id.clone(), t))).collect()
    }

    /// Every known last-use time (for the key file).
    pub fn last_used(&self) -> BTreeMap<String, u64> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().filter_map(|(id, rt)| rt.last_used_ms().map(|t| (id.clone(), t))).collect()
    }

    pub fn retain(&self, live: &BTreeMap<String, KeyRecord>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| live.contains_key(id));
    }
}

/// `DATA_DIR/keys.json`: the keys and their `last_used_at`, when there is no
/// etcd. Written whole, atomically, on each change.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
}

/// What the key file holds.
#[derive(Debug, Default, Deserialize)]
pub struct StoredKeys {
    pub keys: BTreeMap<String, KeyRecord>,
    /// Key id → Unix ms of its last use.
    #[serde(default)]
    pub last_used_ms: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct StoredKeysRef<'a> {
    keys: &'a BTreeMap<String, KeyRecord>,
    last_used_ms: &'a BTreeMap<String, u64>,
}

impl KeyFile {
    pub fn new(data_dir: &Path) -> Self {
        Self { path: data_dir.join("keys.json") }
    }

    /// The stored keys and last-use times; nothing when there is no file.
    pub fn load(&self) -> Result<StoredKeys, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    pub fn save(&self, keys: &BTreeMap<String, KeyRecord>, last_used_ms: BTreeMap<String, u64>) -> Result<(), String> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let contents = StoredKeysRef { keys, last_used_ms: &last_used_ms };
        let bytes = serde_json::to_vec_pretty(&contents).map_err(|e| e.to_string())?;
        crate::util::write_atomically(&self.path, &bytes)
    }
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_time(s: &str) -> Option<u64> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

impl KeyRecord {
    /// SHA-256 hashes of the record's working keys, with the time each
    /// stops working (`None`: when the record says so otherwise).
    pub fn hashes(&self) -> Vec<([u8; 32], Option<u64>)> {
        let decode = |h: &str| hex::decode(h).ok().and_then(|v| <[u8; 32]>::try_from(v).ok());
        let mut out = Vec::new();
        if let Some(h) = decode(&self.hash) {
            out.push((h, None));
        }
        if let Some(p) = &self.previous
            && let Some(h) = decode(&p.hash)
        {
            out.push((h, Some(p.until_ms)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(now: u64) -> KeyRecord {
        KeyRecord {
            key_id: "key_1".into(),
            organization_id: "org".into(),
            name: None,
            prefix: "sk-ar-00000000".into(),
            hash: "00".repeat(32),
            previous: None,
            created_at_ms: now,
            expires_at_ms: None,
            revoked_at_ms: None,
            models: None,
            rate_limit: None,
            budget: None,
        }
    }

    #[test]
    fn keys_are_256_bits_with_a_fixed_prefix_and_only_their_hash_kept() {
        let (key, hash, prefix) = generate().unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 64, "{key}");
        assert!(key.starts_with(&prefix) && prefix.len() == SHOWN_PREFIX_LEN);
        assert_eq!(hash, hex::encode(crate::auth::hash_key(&key)));
        assert_ne!(generate().unwrap().0, key, "drawn afresh each time");
        assert!(new_key_id().unwrap().starts_with("key_"));
        // What listings show: "sk-ar-" and the key's first 8 hex digits.
        assert_eq!(prefix.len(), 14);
        assert_eq!(prefix, key[..14]);
        assert_eq!(KeyError("the reason".into()).to_string(), "the reason");
    }

    #[test]
    fn status_follows_revocation_expiry_and_rotation() {
        let now = 1_000_000;
        let mut r = record(now);
        assert_eq!(r.status(now), KeyStatus::Active);
        r.previous = Some(Previous { hash: "11".repeat(32), prefix: "sk-ar-11111111".into(), until_ms: now + 10 });
        assert_eq!(r.status(now), KeyStatus::Rotating);
        assert_eq!(r.status(now + 10), KeyStatus::Active, "the grace period is over");
        r.expires_at_ms = Some(now + 5);
        assert_eq!(r.status(now + 5), KeyStatus::Expired);
        r.revoked_at_ms = Some(now + 1);
        assert_eq!(r.status(now + 1), KeyStatus::Revoked);
        let v = r.view(Some(now), now);
        assert!(v.get("hash").is_none() && !v.to_string().contains(&"11".repeat(32)), "no hash in the view: {v}");
    }

    #[test]
    fn new_key_shape_is_checked_field_by_field() {
        let now = now_ms();
        let parse = |v: Value| NewKey::from_json(v, now).map_err(|e| e.0);
        let ok = parse(json!({"organization_id": "org", "name": "ci", "models": ["a", "a", "b"],
            "expires_at": "2999-01-01T00:00:00Z", "rate_limit": {"requests_per_second": 2, "burst": 4},
            "budget": {"amount": 10, "period": "daily"}}))
        .unwrap();
        assert_eq!(ok.models.as_deref(), Some(&["a".to_string(), "b".to_string()][..]), "deduplicated");
        assert!(ok.expires_at_ms.is_some() && ok.rate_limit.is_some() && ok.budget.is_some());
        let err = |v: Value, needle: &str| {
            let e = parse(v).unwrap_err();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        err(json!({}), "organization_id");
        err(json!({"organization_id": "org", "name": "x".repeat(129)}), "name");
        err(json!({"organization_id": "org", "expires_at": "2001-01-01T00:00:00Z"}), "not in the future");
        err(json!({"organization_id": "org", "expires_at": "tomorrow"}), "RFC 3339");
        err(json!({"organization_id": "org", "models": []}), "models");
        err(json!({"organization_id": "org", "rate_limit": {"requests_per_second": -1, "burst": 1}}), "greater than 0");
        err(json!({"organization_id": "org", "budget": {"amount": -5, "period": "daily"}}), "greater than 0");
        err(json!({"organization_id": "org", "quota": {"requests": 1}}), "unknown field `quota`");
        err(json!([1]), "object");
    }

    #[test]
    fn last_used_is_written_at_most_once_a_minute() {
        let rt = KeyRuntime::default();
        assert_eq!(rt.due(), None, "never used");
        rt.touch();
        assert!(rt.due().is_some(), "the first use is written");
        rt.touch();
        assert_eq!(rt.due(), None, "not again within the minute");
        let later = now_ms() + LAST_USED_EVERY_MS;
        rt.seen(later);
        assert_eq!(rt.last_used_ms(), Some(later), "another replica's later use counts");
        assert_eq!(rt.due(), None, "and is not written again");
    }

    #[test]
    fn the_view_shows_times_in_rfc3339_and_the_rotation_end_only_while_it_lasts() {
        // 2026-01-01T00:00:00Z
        let now = 1_767_225_600_000;
        let mut r = record(now);
        r.name = Some("ci".into());
        r.expires_at_ms = Some(now + 86_400_000);
        r.previous = Some(Previous { hash: "11".repeat(32), prefix: "sk-ar-11111111".into(), until_ms: now + 1_000 });
        r.models = Some(vec!["m".into()]);
        let v = r.view(Some(now - 500), now);
        assert_eq!(v["status"], "rotating");
        assert_eq!(v["created_at"], "2026-01-01T00:00:00.000Z");
        assert_eq!(v["expires_at"], "2026-01-02T00:00:00.000Z");
        assert_eq!(v["last_used_at"], "2025-12-31T23:59:59.500Z");
        assert_eq!(v["rotation_ends_at"], "2026-01-01T00:00:01.000Z");
        assert_eq!(v["revoked_at"], Value::Null);
        assert_eq!((&v["key_id"], &v["organization_id"], &v["name"]), (&json!("key_1"), &json!("org"), &json!("ci")));
        assert_eq!((&v["prefix"], &v["models"]), (&json!("sk-ar-00000000"), &json!(["m"])));
        let after = r.view(None, now + 1_000);
        assert_eq!(
            (&after["status"], &after["rotation_ends_at"], &after["last_used_at"]),
            (&json!("active"), &Value::Null, &Value::Null)
        );
        r.revoked_at_ms = Some(now + 2_000);
        assert_eq!(r.view(None, now + 3_000)["revoked_at"], "2026-01-01T00:00:02.000Z");
        let names =
            [KeyStatus::Active, KeyStatus::Rotating, KeyStatus::Expired, KeyStatus::Revoked].map(KeyStatus::as_str);
        assert_eq!(names, ["active", "rotating", "expired", "revoked"]);
    }

    #[test]
    fn a_records_working_hashes_are_its_own_and_its_predecessors_until_the_grace_ends() {
        let mut r = record(0);
        r.hash = "ab".repeat(32);
        assert_eq!(r.hashes(), vec![([0xab; 32], None)]);
        r.previous = Some(Previous { hash: "cd".repeat(32), prefix: String::new(), until_ms: 7 });
        assert_eq!(r.hashes(), vec![([0xab; 32], None), ([0xcd; 32], Some(7))]);
        // A damaged hash (not 32 bytes of hex) opens nothing.
        r.hash = "ab".repeat(31);
        r.previous.as_mut().unwrap().hash = "zz".repeat(32);
        assert_eq!(r.hashes(), vec![]);
    }

    #[test]
    fn runtimes_are_one_per_key_and_kept_only_for_live_keys() {
        let rts = KeyRuntimes::default();
        assert!(Arc::ptr_eq(&rts.get("key_a"), &rts.get("key_a")), "one runtime per key, across snapshots");
        let two_minutes_ago = now_ms() - 2 * LAST_USED_EVERY_MS;
        rts.restore(&BTreeMap::from([("key_a".to_string(), two_minutes_ago), ("key_b".to_string(), 5)]));
        assert_eq!(rts.due(), vec![], "times read from storage are not written back");
        assert_eq!(rts.get("key_a").last_used_ms(), Some(two_minutes_ago));
        rts.get("key_a").touch();
        let due = rts.due();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "key_a");
        assert!(due[0].1 >= two_minutes_ago + 2 * LAST_USED_EVERY_MS);
        rts.get("key_c");
        assert_eq!(rts.last_used().keys().collect::<Vec<_>>(), ["key_a", "key_b"], "never used: no time");
        let live = BTreeMap::from([("key_b".to_string(), record(0))]);
        rts.retain(&live);
        assert_eq!(rts.last_used(), BTreeMap::from([("key_b".to_string(), 5)]));
    }

    #[test]
    fn the_key_file_round_trips_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::new(&dir.path().join("data"));
        let empty = file.load().unwrap();
        assert!(empty.keys.is_empty() && empty.last_used_ms.is_empty());
        let keys = BTreeMap::from([("key_1".to_string(), record(9))]);
        file.save(&keys, BTreeMap::from([("key_1".to_string(), 42)])).unwrap();
        let back = file.load().unwrap();
        assert_eq!(back.keys, keys);
        assert_eq!(back.last_used_ms, BTreeMap::from([("key_1".to_string(), 42)]));
        std::fs::write(dir.path().join("data/keys.json"), b"{not json").unwrap();
        assert!(file.load().unwrap_err().contains("keys.json"));
        // Unreadable is not the same as absent: no keys would lock every key out.
        std::fs::create_dir_all(dir.path().join("other/keys.json")).unwrap();
        assert!(KeyFile::new(&dir.path().join("other")).load().is_err());
    }

    #[test]
    fn a_key_limited_to_models_allows_only_those() {
        let entry = |models: Option<Vec<String>>| KeyEntry {
            key_id: Arc::from("key_1"),
            organization_id: Arc::from("org"),
            expires_at_ms: None,
            revoked: false,
            models,
            rate_limit: None,
            budget: None,
            runtime: Arc::default(),
        };
        assert!(entry(None).allows("anything"));
        let only_a = entry(Some(vec!["a".into()]));
        assert!(only_a.allows("a") && !only_a.allows("b"));
    }

    #[test]
    fn more_bad_shapes_of_a_new_key_are_refused_by_name() {
        let now = now_ms();
        let err = |v: Value, needle: &str| {
            let e = NewKey::from_json(v.clone(), now).unwrap_err().0;
            assert!(e.contains(needle), "{v}: {e:?} should mention {needle:?}");
        };
        err(json!({"organization_id": "no spaces allowed"}), "`organization_id` must be");
        err(json!({"organization_id": 7}), "`organization_id` must be");
        err(json!({"organization_id": "org", "name": "a\nb"}), "without control characters");
        err(json!({"organization_id": "org", "name": 5}), "`name` must be a string");
        err(json!({"organization_id": "org", "expires_at": 1}), "must be an RFC 3339 time");
        err(json!({"organization_id": "org", "models": [""]}), "1-256 characters");
        err(json!({"organization_id": "org", "models": ["m".repeat(257)]}), "1-256 characters");
        err(json!({"organization_id": "org", "models": "m"}), "non-empty array");
        let longest =
            NewKey::from_json(json!({"organization_id": "org", "models": ["m".repeat(256)], "name": null}), now);
        assert_eq!(longest.map(|k| (k.name, k.models.map(|m| m[0].len()))), Ok((None, Some(256))));
        let named = NewKey::from_json(json!({"organization_id": "org", "name": "x".repeat(MAX_NAME)}), now).unwrap();
        assert_eq!(named.name.map(|n| n.len()), Some(MAX_NAME));
        let r = named_record(now);
        assert_eq!((r.created_at_ms, r.revoked_at_ms, r.previous), (now, None, None));
        assert_eq!(parse_time("1970-01-01T00:00:01.250Z"), Some(1_250));
        assert_eq!(parse_time("yesterday"), None);
        // An expiry must be later than now: now itself is refused.
        let at = parse_time("2030-01-01T00:00:00Z").unwrap();
        let expiring = |t: &str| NewKey::from_json(json!({"organization_id": "org", "expires_at": t}), at);
        assert!(expiring("2030-01-01T00:00:00Z").unwrap_err().0.contains("not in the future"));
        assert_eq!(expiring("2030-01-01T00:00:00.001Z").unwrap().expires_at_ms, Some(at + 1));
        assert_eq!(MAX_GRACE_SECS, 2_592_000, "30 days");
    }

    fn named_record(now: u64) -> KeyRecord {
        let k = NewKey::from_json(json!({"organization_id": "org", "name": "n", "models": ["m"]}), now).unwrap();
        let r = k.into_record("key_9".into(), "ab".repeat(32), "sk-ar-abababab".into(), now);
        assert_eq!(
            (r.key_id.as_str(), r.hash.as_str(), r.prefix.as_str()),
            ("key_9", &*"ab".repeat(32), "sk-ar-abababab")
        );
        assert_eq!((r.name.as_deref(), r.models.as_deref()), (Some("n"), Some(&["m".to_string()][..])));
        r
    }
}
