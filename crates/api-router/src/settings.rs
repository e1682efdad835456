//! Start-up settings: environment variables and the optional YAML file named by
//! `ROUTER_CONFIG`, resolved into the core's, the doors' and the process's.
//!
//! Everything is parsed and validated before anything starts. A bad value is one
//! [`ConfigError`] naming the setting, the value and what was expected; `main`
//! prints it as one line and exits non-zero, so the router never runs
//! half-configured. Parsing takes a lookup function instead of reading the
//! process environment directly, so that it is unit-testable.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use router_core::auth::hash_key;
use router_core::config_service::{BackendInput, BackendSpec, ConfigState};
use router_core::limits::redis::RedisTarget;
use router_core::limits::{BudgetServiceSettings, FailureMode, LimitSettings, OrgLimits, Price, RateLimit};
use router_core::routing::policy::PolicyInput;
use router_core::usage::{Fsync, FullPolicy, UsageSettings};
use router_core::util::valid_id;
use router_core::{AuditDatabase, CoreSettings};
use router_etcd::EtcdSettings;
use router_http::HttpSettings;
use router_http::server::ServerSettings;
use router_http::server::tls::{TlsFiles, load_pair};
use router_http::throttle::DEFAULT_FREE_FAILURES;
use router_providers::transport::TransportSettings;
use router_providers::transport::tls;

/// One bad setting: which, what value, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub setting: String,
    pub value: String,
    pub expected: String,
}

impl ConfigError {
    pub fn new(setting: &str, value: &str, expected: impl Into<String>) -> Self {
        Self { setting: setting.to_string(), value: value.to_string(), expected: expected.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid setting {}={:?}: expected {}", self.setting, self.value, self.expected)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Every setting the router reads, resolved and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub http: HttpSettings,
    /// The server's connection limits and TLS.
    pub server: ServerSettings,
    pub core: CoreSettings,
    /// The shared routing state, when `CONFIG_SERVICE_ENDPOINTS` is set.
    pub etcd: Option<EtcdSettings>,
}

/// The minimum admin token length accepted without `ALLOW_WEAK_ADMIN_TOKEN=true`.
pub const MIN_ADMIN_TOKEN_LEN: usize = 24;

const DEFAULT_FAILOVER_THRESHOLD: u32 = 3;

impl Settings {
    /// Reads the process environment (and the file it names).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let http_addr = match var("HTTP_ADDR") {
            None => SocketAddr::from(([0, 0, 0, 0], 8080)),
            Some(v) => {
                v.trim().parse().map_err(|_| ConfigError::new("HTTP_ADDR", &v, "an address like 0.0.0.0:8080"))?
            }
        };
        let ms = |name: &str, default: u64| -> Result<Duration, ConfigError> {
            positive_u64(name, var(name), default).map(Duration::from_millis)
        };
        let health_check_interval = ms("HEALTH_CHECK_INTERVAL_MS", 5000)?;
        let health_check_timeout = ms("HEALTH_CHECK_TIMEOUT_MS", 1000)?;
        let backend_timeout = ms("BACKEND_TIMEOUT_MS", 30_000)?;
        let max_body_bytes = positive_u64("MAX_BODY_BYTES", var("MAX_BODY_BYTES"), 1 << 20)? as usize;
        let shutdown_timeout =
            Duration::from_secs(positive_u64("SHUTDOWN_TIMEOUT_SECS", var("SHUTDOWN_TIMEOUT_SECS"), 10)?);
        let audit_retention =
            Duration::from_secs(positive_u64("AUDIT_RETENTION_HOURS", var("AUDIT_RETENTION_HOURS"), 7 * 24)? * 3600);
        let audit_commit_interval = ms("AUDIT_COMMIT_INTERVAL_MS", 10)?;
        let audit_database = match var("AUDIT_DATABASE_URL") {
            None => None,
            Some(url) => {
                // The URL can hold a password: never echo it back.
                router_core::audit::postgres::parse_url(&url).map_err(|why| {
                    ConfigError::new(
                        "AUDIT_DATABASE_URL",
                        "<redacted>",
                        format!("a PostgreSQL URL, e.g. postgres://router@db:5432/audit ({why})"),
                    )
                })?;
                let ca_file = var("AUDIT_DATABASE_CA_FILE").map(PathBuf::from);
                if let Some(path) = &ca_file {
                    tls::load_certs("AUDIT_DATABASE_CA_FILE", path).map_err(|e| {
                        ConfigError::new("AUDIT_DATABASE_CA_FILE", &path.display().to_string(), e.to_string())
                    })?;
                }
                Some(AuditDatabase { url, ca_file })
            }
        };
        let decisions_capacity = positive_u64("DECISIONS_CAPACITY", var("DECISIONS_CAPACITY"), 10_000)? as usize;
        let upstream_cooldown_max =
            Duration::from_secs(positive_u64("UPSTREAM_COOLDOWN_MAX_SECS", var("UPSTREAM_COOLDOWN_MAX_SECS"), 60)?);
        let log_format = match var("LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => return Err(ConfigError::new("LOG_FORMAT", other, "json or text")),
        };
        let allow_weak = boolean("ALLOW_WEAK_ADMIN_TOKEN", var("ALLOW_WEAK_ADMIN_TOKEN"), false)?;
        let admin_token = match var("ADMIN_TOKEN") {
            None => None,
            Some(token) => {
                if token.chars().count() < MIN_ADMIN_TOKEN_LEN && !allow_weak {
                    // The value is a secret: never echo it back.
                    return Err(ConfigError::new(
                        "ADMIN_TOKEN",
                        "<redacted>",
                        format!(
                            "at least {MIN_ADMIN_TOKEN_LEN} characters \
                             (set ALLOW_WEAK_ADMIN_TOKEN=true for local experiments)"
                        ),
                    ));
                }
                Some(token)
            }
        };
        let data_dir = PathBuf::from(var("DATA_DIR").unwrap_or_else(|| "./data".to_string()));
        let instance_id = var("INSTANCE_ID")
            .unwrap_or_else(|| format!("api-router-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));

        let limits = limit_settings(&var)?;
        let usage = usage_settings(&var)?;
        let config_service = match var("CONFIG_SERVICE_ENDPOINTS") {
            None => None,
            Some(v) => {
                let endpoints: Vec<String> =
                    v.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
                if endpoints.is_empty() || endpoints.iter().any(|e| e.contains(' ')) {
                    return Err(ConfigError::new(
                        "CONFIG_SERVICE_ENDPOINTS",
                        &v,
                        "etcd endpoints, comma-separated, e.g. http://127.0.0.1:2379",
                    ));
                }
                let prefix = var("CONFIG_SERVICE_PREFIX").unwrap_or_else(|| "/api-router".into());
                let prefix = prefix.trim_end_matches('/').to_string();
                if !prefix.starts_with('/') {
                    return Err(ConfigError::new(
                        "CONFIG_SERVICE_PREFIX",
                        &prefix,
                        "a key prefix starting with '/', e.g. /api-router",
                    ));
                }
                Some(EtcdSettings { endpoints, prefix })
            }
        };

        let mut state = match var("ROUTER_CONFIG") {
            Some(path) => load_file(&path)?,
            None => ConfigState {
                default_route: true,
                default_failover_threshold: DEFAULT_FAILOVER_THRESHOLD,
                ..ConfigState::default()
            },
        };
        if let Some(v) = var("DEFAULT_ROUTE") {
            state.default_route = boolean("DEFAULT_ROUTE", Some(v), true)?;
        }
        if let Some(v) = var("BACKEND_ENDPOINTS") {
            for (id, url) in pairs("BACKEND_ENDPOINTS", &v, "id=url pairs, comma-separated")? {
                let spec =
                    BackendSpec::parse_endpoint(&url).map_err(|why| ConfigError::new("BACKEND_ENDPOINTS", &v, why))?;
                check_id("BACKEND_ENDPOINTS", &id)?;
                state.backends.insert(id, spec);
            }
        }
        if let Some(v) = var("API_KEYS") {
            // The value holds secrets: errors never echo it.
            for (key, org) in pairs("API_KEYS", &v, "key=organization_id pairs, comma-separated")
                .map_err(|e| ConfigError { value: "<redacted>".into(), ..e })?
            {
                check_id("API_KEYS", &org).map_err(|e| ConfigError { value: "<redacted>".into(), ..e })?;
                state.api_keys.insert(hash_key(&key), org);
            }
        }
        // Policies from the file name backends; check them against the final registry.
        for policy in state.policies.values() {
            policy
                .validate_against(&state.backends)
                .map_err(|why| ConfigError::new("ROUTER_CONFIG", &policy.policy_id, why))?;
        }

        let server = server_settings(&var)?;
        let body_read_timeout = ms("HTTP_BODY_READ_TIMEOUT_MS", 30_000)?;

        let transport = TransportSettings {
            ca_file: match var("BACKEND_CA_FILE") {
                None => None,
                Some(path) => {
                    let path = PathBuf::from(path.trim());
                    tls::load_certs("BACKEND_CA_FILE", &path).map_err(|e| {
                        ConfigError::new(
                            "BACKEND_CA_FILE",
                            &path.display().to_string(),
                            format!("a PEM CA bundle ({})", e.reason),
                        )
                    })?;
                    Some(path)
                }
            },
            connect_timeout: backend_timeout.min(Duration::from_secs(5)),
        };

        Ok(Settings {
            http_addr,
            shutdown_timeout,
            log_format,
            http: HttpSettings {
                max_body_bytes,
                admin_token,
                body_read_timeout,
                admin_auth_free_failures: match var("ADMIN_AUTH_FREE_FAILURES") {
                    None => DEFAULT_FREE_FAILURES,
                    Some(v) => v
                        .trim()
                        .parse()
                        .map_err(|_| ConfigError::new("ADMIN_AUTH_FREE_FAILURES", &v, "a whole number"))?,
                },
            },
            server,
            core: CoreSettings {
                instance_id,
                data_dir,
                health_check_interval,
                health_check_timeout,
                backend_timeout,
                max_response_bytes: positive_u64(
                    "BACKEND_MAX_RESPONSE_BYTES",
                    var("BACKEND_MAX_RESPONSE_BYTES"),
                    32 << 20,
                )? as usize,
                audit_retention,
                audit_commit_interval,
                audit_database,
                decisions_capacity,
                upstream_cooldown_max,
                limits,
                usage,
                transport,
                initial_state: state,
            },
            etcd: config_service,
        })
    }
}

/// Client connections allowed by default with `nofile` file descriptors:
/// half of what is left after a reserve for the router's own (stores,
/// Redis, etcd, Kafka), since each client request may hold a backend
/// connection too; at most 10,000.
pub fn default_max_connections(nofile: u64) -> usize {
    (nofile.saturating_sub(128) / 2).clamp(16, 10_000) as usize
}

/// The process's open-file limit (soft), as raised at start-up.
fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Raises the open-file limit to the hard limit, as servers do (nginx's
/// `worker_rlimit_nofile`); returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
    }
    nofile_limit()
}

fn server_settings(var: &impl Fn(&str) -> Option<String>) -> Result<ServerSettings, ConfigError> {
    let ms = |name: &str, default: u64| -> Result<Duration, ConfigError> {
        positive_u64(name, var(name), default).map(Duration::from_millis)
    };
    let max_header_bytes = positive_u64("HTTP_MAX_HEADER_BYTES", var("HTTP_MAX_HEADER_BYTES"), 16 * 1024)?;
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        return Err(ConfigError::new("HTTP_MAX_HEADER_BYTES", &max_header_bytes.to_string(), "1024 to 1048576"));
    }
    let max_headers = positive_u64("HTTP_MAX_HEADERS", var("HTTP_MAX_HEADERS"), 100)?;
    if max_headers > 1000 {
        return Err(ConfigError::new("HTTP_MAX_HEADERS", &max_headers.to_string(), "1 to 1000"));
    }
    let max_connections = positive_u64(
        "HTTP_MAX_CONNECTIONS",
        var("HTTP_MAX_CONNECTIONS"),
        default_max_connections(nofile_limit()) as u64,
    )? as usize;
    let tls = match (var("TLS_CERT_FILE"), var("TLS_KEY_FILE")) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert_file: PathBuf::from(cert.trim()), key_file: PathBuf::from(key.trim()) };
            load_pair(&files).map_err(|e| {
                ConfigError::new(
                    "TLS_CERT_FILE",
                    &files.cert_file.display().to_string(),
                    format!("a usable pair ({})", e.0),
                )
            })?;
            Some(files)
        }
        (Some(_), None) => return Err(ConfigError::new("TLS_KEY_FILE", "", "set with TLS_CERT_FILE")),
        (None, Some(_)) => return Err(ConfigError::new("TLS_CERT_FILE", "", "set with TLS_KEY_FILE")),
    };
    Ok(ServerSettings {
        header_read_timeout: ms("HTTP_HEADER_READ_TIMEOUT_MS", 10_000)?,
        idle_timeout: ms("HTTP_IDLE_TIMEOUT_MS", 60_000)?,
        max_connections,
        max_header_bytes: max_header_bytes as usize,
        max_headers: max_headers as usize,
        tls,
    })
}

fn usage_settings(var: &impl Fn(&str) -> Option<String>) -> Result<UsageSettings, ConfigError> {
    let fsync = match var("USAGE_BUFFER_FSYNC").as_deref().map(str::trim) {
        None | Some("interval") => Fsync::Interval(Duration::from_millis(positive_u64(
            "USAGE_BUFFER_FSYNC_INTERVAL_MS",
            var("USAGE_BUFFER_FSYNC_INTERVAL_MS"),
            200,
        )?)),
        Some("always") => Fsync::Always,
        Some("never") => Fsync::Never,
        Some(other) => return Err(ConfigError::new("USAGE_BUFFER_FSYNC", other, "always, interval or never")),
    };
    let full_policy = match var("USAGE_BUFFER_FULL_POLICY").as_deref().map(str::trim) {
        None | Some("reject") => FullPolicy::Reject,
        Some("bypass") => FullPolicy::Bypass,
        Some(other) => return Err(ConfigError::new("USAGE_BUFFER_FULL_POLICY", other, "reject or bypass")),
    };
    let topic = var("KAFKA_USAGE_TOPIC").unwrap_or_else(|| "api-router.usage".into());
    let valid_topic =
        topic.len() <= 249 && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid_topic {
        return Err(ConfigError::new(
            "KAFKA_USAGE_TOPIC",
            &topic,
            "a Kafka topic name (letters, digits, '.', '_', '-')",
        ));
    }
    Ok(UsageSettings {
        brokers: var("KAFKA_BROKERS").map(|b| b.trim().to_string()),
        topic,
        max_records: positive_u64("USAGE_BUFFER_MAX_RECORDS", var("USAGE_BUFFER_MAX_RECORDS"), 1_000_000)?,
        full_policy,
        fsync,
        linger: match var("KAFKA_LINGER_MS") {
            None => router_core::usage::publisher::DEFAULT_LINGER,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(ms @ 0..=1000) => Duration::from_millis(ms),
                _ => return Err(ConfigError::new("KAFKA_LINGER_MS", &v, "a whole number of milliseconds, 0 to 1000")),
            },
        },
    })
}

fn limit_settings(var: &impl Fn(&str) -> Option<String>) -> Result<LimitSettings, ConfigError> {
    let number = |name: &str, default: f64| -> Result<f64, ConfigError> {
        match var(name) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(n) if n >= 0.0 && n.is_finite() => Ok(n),
                _ => Err(ConfigError::new(name, &v, "a number of at least 0")),
            },
        }
    };
    let rps = number("RATE_LIMIT_DEFAULT_RPS", 1000.0)?;
    let burst =
        positive_u64("RATE_LIMIT_BURST_SIZE", var("RATE_LIMIT_BURST_SIZE"), (rps * 2.0).clamp(1.0, 1e6) as u64)?;
    let burst = u32::try_from(burst)
        .ok()
        .filter(|b| *b <= 1_000_000)
        .ok_or_else(|| ConfigError::new("RATE_LIMIT_BURST_SIZE", &burst.to_string(), "at most 1000000"))?;
    let failure_mode = match var("RATE_LIMIT_FAILURE_MODE").as_deref().map(str::trim) {
        None | Some("local") => FailureMode::Local,
        Some("open") => FailureMode::Open,
        Some("closed") => FailureMode::Closed,
        Some(other) => {
            return Err(ConfigError::new("RATE_LIMIT_FAILURE_MODE", other, "local, open or closed"));
        }
    };
    let redis_url = var("REDIS_URL");
    if let Some(url) = redis_url.as_ref().filter(|u| !u.starts_with("redis://") && !u.starts_with("unix://")) {
        return Err(ConfigError::new("REDIS_URL", url, "a redis:// URL, e.g. redis://127.0.0.1:6379"));
    }
    let prefix = var("REDIS_KEY_PREFIX").unwrap_or_else(|| "api-router".into());
    let redis = match (redis_url, var("REDIS_CLUSTER_URLS")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "REDIS_CLUSTER_URLS",
                "<set>",
                "either REDIS_URL (one Redis) or REDIS_CLUSTER_URLS (a Redis Cluster), not both",
            ));
        }
        (Some(url), None) => Some(RedisTarget::Single(url)),
        (None, Some(list)) => {
            let urls: Vec<String> =
                list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
            if urls.is_empty() || urls.iter().any(|u| !u.starts_with("redis://")) {
                // The URLs can hold a password: never echo them back.
                return Err(ConfigError::new(
                    "REDIS_CLUSTER_URLS",
                    "<redacted>",
                    "comma-separated redis:// URLs of seed nodes, e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379",
                ));
            }
            if prefix.contains(['{', '}']) {
                return Err(ConfigError::new(
                    "REDIS_KEY_PREFIX",
                    &prefix,
                    "no { or } with REDIS_CLUSTER_URLS (the organization's hash tag must be the key's first)",
                ));
            }
            let replica_acks =
                match var("REDIS_CLUSTER_REPLICA_ACKS") {
                    None => 0,
                    Some(v) => v.trim().parse::<u32>().ok().filter(|n| *n <= 16).ok_or_else(|| {
                        ConfigError::new("REDIS_CLUSTER_REPLICA_ACKS", &v, "a whole number from 0 to 16")
                    })?,
                };
            Some(RedisTarget::Cluster { urls, replica_acks })
        }
        (None, None) => None,
    };
    let budget_service = match var("BUDGET_SERVICE_URL") {
        None => None,
        Some(url) => {
            BackendSpec::new(&url).map_err(|why| ConfigError::new("BUDGET_SERVICE_URL", &url, why))?;
            let fail_open = match var("BUDGET_SERVICE_FAILURE_MODE").as_deref().map(str::trim) {
                None | Some("open") => true,
                Some("closed") => false,
                Some(other) => {
                    return Err(ConfigError::new("BUDGET_SERVICE_FAILURE_MODE", other, "open or closed"));
                }
            };
            Some(BudgetServiceSettings {
                url,
                timeout: Duration::from_millis(positive_u64(
                    "BUDGET_SERVICE_TIMEOUT_MS",
                    var("BUDGET_SERVICE_TIMEOUT_MS"),
                    200,
                )?),
                fail_open,
                denial_cache: Duration::from_millis(positive_u64(
                    "BUDGET_SERVICE_DENIAL_CACHE_MS",
                    var("BUDGET_SERVICE_DENIAL_CACHE_MS"),
                    1000,
                )?),
            })
        }
    };
    Ok(LimitSettings {
        default_rate: (rps > 0.0).then_some(RateLimit { requests_per_second: rps, burst }),
        failure_mode,
        redis,
        redis_timeout: Duration::from_millis(positive_u64("REDIS_TIMEOUT_MS", var("REDIS_TIMEOUT_MS"), 250)?),
        redis_prefix: format!("{prefix}:"),
        default_request_cost: number("BUDGET_DEFAULT_REQUEST_COST", 0.0)?,
        estimated_tokens: number("BUDGET_ESTIMATED_TOKENS", 0.0)? as u64,
        budget_service,
    })
}

fn positive_u64(name: &str, value: Option<String>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ConfigError::new(name, &v, "a positive integer")),
        },
    }
}

fn boolean(name: &str, value: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match value.as_deref().map(str::trim) {
        None => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(other) => Err(ConfigError::new(name, other, "true or false")),
    }
}

fn check_id(setting: &str, id: &str) -> Result<(), ConfigError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ConfigError::new(setting, id, format!("an id of {}", router_core::util::ID_RULES)))
    }
}

fn pairs(name: &str, value: &str, expected: &str) -> Result<Vec<(String, String)>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(ConfigError::new(name, value, expected)),
        })
        .collect()
}

/// The YAML file: what does not fit in a variable.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    backends: Vec<FileBackend>,
    #[serde(default)]
    api_keys: Vec<FileApiKey>,
    #[serde(default)]
    policies: Vec<PolicyInput>,
    #[serde(default)]
    organizations: Vec<FileOrganization>,
    #[serde(default)]
    prices: BTreeMap<String, Price>,
    #[serde(default = "yes")]
    default_route: bool,
    #[serde(default = "default_threshold")]
    default_failover_threshold: u32,
}

fn yes() -> bool {
    true
}
fn default_threshold() -> u32 {
    DEFAULT_FAILOVER_THRESHOLD
}

#[derive(Debug, Deserialize)]
struct FileBackend {
    backend_id: String,
    #[serde(flatten)]
    backend: BackendInput,
    /// Whatever else the entry holds: refused, so that a typo fails start-up.
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_yaml::Value>,
}

/// An organization's limits: `organization_id` plus the admin API's shape.
#[derive(Debug, Deserialize)]
struct FileOrganization {
    organization_id: String,
    #[serde(flatten)]
    limits: serde_json::Value,
}

/// API keys are stored only as SHA-256 hashes (hex).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApiKey {
    key_sha256: String,
    organization_id: String,
}

fn load_file(path: &str) -> Result<ConfigState, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("ROUTER_CONFIG", path, format!("a readable YAML file ({e})")))?;
    let state = parse_file(path, &text)?;
    // The files a backend names (CA, client certificate) are read here, not
    // while parsing: the parser reads nothing but its text.
    for (id, spec) in &state.backends {
        spec.check_files().map_err(|why| ConfigError::new("ROUTER_CONFIG", path, format!("backend {id}: {why}")))?;
    }
    Ok(state)
}

/// The YAML file's text (read from `path`) as a routing state, or the one
/// error that names what is wrong. Reads no file.
pub fn parse_file(path: &str, text: &str) -> Result<ConfigState, ConfigError> {
    let err = |why: String| ConfigError::new("ROUTER_CONFIG", path, why);
    let file: FileConfig = serde_yaml::from_str(text).map_err(|e| err(format!("valid configuration YAML ({e})")))?;
    if file.default_failover_threshold < 1 {
        return Err(err("default_failover_threshold of at least 1".into()));
    }
    let mut state = ConfigState {
        default_route: file.default_route,
        default_failover_threshold: file.default_failover_threshold,
        ..ConfigState::default()
    };
    for b in file.backends {
        check_id("ROUTER_CONFIG", &b.backend_id)?;
        if let Some(field) = b.unknown.keys().next() {
            return Err(err(format!("backend {}: no unknown field {field:?}", b.backend_id)));
        }
        let spec = b.backend.into_spec().map_err(|why| err(format!("backend {}: {why}", b.backend_id)))?;
        state.backends.insert(b.backend_id, spec);
    }
    for k in file.api_keys {
        let hash: [u8; 32] = hex::decode(k.key_sha256.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| err("api_keys[].key_sha256 as 64 hex characters".into()))?;
        check_id("ROUTER_CONFIG", &k.organization_id)?;
        state.api_keys.insert(hash, k.organization_id);
    }
    for o in file.organizations {
        check_id("ROUTER_CONFIG", &o.organization_id)?;
        let limits = OrgLimits::from_json(o.limits)
            .map_err(|why| err(format!("valid limits for organization {}: {why}", o.organization_id)))?;
        state.organizations.insert(o.organization_id, limits);
    }
    for (model, price) in &file.prices {
        let amounts = [price.input_per_1k, price.output_per_1k, price.request_cost.unwrap_or(0.0)];
        if amounts.iter().any(|a| !a.is_finite() || *a < 0.0) {
            return Err(err(format!("prices for model {model} of at least 0")));
        }
    }
    state.prices = file.prices;
    let mut policies = BTreeMap::new();
    for input in file.policies {
        let policy = input.into_policy().map_err(|why| err(format!("a valid policy: {why}")))?;
        policies.insert((policy.organization_id.clone(), policy.model.clone()), policy);
    }
    state.policies = policies;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn the_audit_database_url_is_checked_and_never_echoed() {
        let ok = settings(&[("AUDIT_DATABASE_URL", "postgres://router:pw@db:5432/audit")]).unwrap();
        let db = ok.core.audit_database.expect("PostgreSQL configured");
        assert_eq!(db.url, "postgres://router:pw@db:5432/audit");
        assert!(!format!("{db:?}").contains("pw@"), "Debug hides the URL");
        assert!(settings(&[]).unwrap().core.audit_database.is_none(), "the embedded store by default");
        for bad in ["mysql://router:s3cret@db/audit", "postgres://", "host=db sslmode=sometimes password=s3cret"] {
            let e = settings(&[("AUDIT_DATABASE_URL", bad)]).unwrap_err();
            assert_eq!(e.setting, "AUDIT_DATABASE_URL", "{bad}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn an_unreadable_audit_database_ca_file_is_refused() {
        let e =
            settings(&[("AUDIT_DATABASE_URL", "postgres://db/audit"), ("AUDIT_DATABASE_CA_FILE", "/nonexistent.pem")])
                .unwrap_err();
        assert_eq!(e.setting, "AUDIT_DATABASE_CA_FILE");
    }

    #[test]
    fn redis_cluster_urls_are_parsed() {
        let s = settings(&[("REDIS_CLUSTER_URLS", " redis://10.0.0.1:6379, redis://10.0.0.2:6379 ,")]).unwrap();
        assert_eq!(
            s.core.limits.redis,
            Some(RedisTarget::Cluster {
                urls: vec!["redis://10.0.0.1:6379".into(), "redis://10.0.0.2:6379".into()],
                replica_acks: 0
            })
        );
        let s = settings(&[("REDIS_CLUSTER_URLS", "redis://a:1"), ("REDIS_CLUSTER_REPLICA_ACKS", "1")]).unwrap();
        assert!(matches!(s.core.limits.redis, Some(RedisTarget::Cluster { replica_acks: 1, .. })));
        let s = settings(&[("REDIS_URL", "redis://a:1")]).unwrap();
        assert_eq!(s.core.limits.redis, Some(RedisTarget::Single("redis://a:1".into())));
    }

    #[test]
    fn redis_url_and_redis_cluster_urls_together_are_refused() {
        let e = settings(&[("REDIS_URL", "redis://a:1"), ("REDIS_CLUSTER_URLS", "redis://b:1")]).unwrap_err();
        assert_eq!(e.setting, "REDIS_CLUSTER_URLS");
    }

    #[test]
    fn a_cluster_seed_that_is_not_a_redis_url_is_refused_without_echo() {
        for bad in [" , ", "http://user:s3cret@a:1", "redis://a:1,10.0.0.2:6379"] {
            let e = settings(&[("REDIS_CLUSTER_URLS", bad)]).unwrap_err();
            assert_eq!(e.setting, "REDIS_CLUSTER_URLS", "{bad:?}");
            assert!(!e.to_string().contains("s3cret"));
        }
    }

    #[test]
    fn a_key_prefix_with_a_brace_is_refused_on_a_cluster() {
        let e = settings(&[("REDIS_CLUSTER_URLS", "redis://a:1"), ("REDIS_KEY_PREFIX", "x{y}")]).unwrap_err();
        assert_eq!(e.setting, "REDIS_KEY_PREFIX");
        assert!(settings(&[("REDIS_URL", "redis://a:1"), ("REDIS_KEY_PREFIX", "x{y}")]).is_ok(), "fine on one Redis");
    }

    #[test]
    fn bad_replica_acks_are_refused() {
        for bad in ["-1", "two", "17"] {
            let e =
                settings(&[("REDIS_CLUSTER_URLS", "redis://a:1"), ("REDIS_CLUSTER_REPLICA_ACKS", bad)]).unwrap_err();
            assert_eq!(e.setting, "REDIS_CLUSTER_REPLICA_ACKS", "{bad}");
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.http_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(s.core.health_check_interval, Duration::from_millis(5000));
        assert_eq!(s.core.backend_timeout, Duration::from_secs(30));
        assert_eq!(s.http.max_body_bytes, 1 << 20);
        assert_eq!(s.shutdown_timeout, Duration::from_secs(10));
        assert!(s.http.admin_token.is_none());
        assert!(s.core.initial_state.default_route);
        assert_eq!(s.core.audit_commit_interval, Duration::from_millis(10));
    }

    #[test]
    fn audit_commit_interval_must_be_a_positive_number_of_milliseconds() {
        assert_eq!(
            settings(&[("AUDIT_COMMIT_INTERVAL_MS", "250")]).unwrap().core.audit_commit_interval.as_millis(),
            250
        );
        let e = settings(&[("AUDIT_COMMIT_INTERVAL_MS", "0")]).unwrap_err();
        assert_eq!(e.setting, "AUDIT_COMMIT_INTERVAL_MS");
        assert!(settings(&[("AUDIT_COMMIT_INTERVAL_MS", "10ms")]).is_err());
    }

    #[test]
    fn kafka_linger_is_5_ms_unless_set_between_0_and_1000() {
        assert_eq!(settings(&[]).unwrap().core.usage.linger, Duration::from_millis(5));
        assert_eq!(settings(&[("KAFKA_LINGER_MS", "0")]).unwrap().core.usage.linger, Duration::ZERO);
        assert_eq!(settings(&[("KAFKA_LINGER_MS", "1000")]).unwrap().core.usage.linger, Duration::from_secs(1));
    }

    #[test]
    fn a_kafka_linger_that_is_not_a_number_is_refused() {
        let e = settings(&[("KAFKA_LINGER_MS", "soon")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting KAFKA_LINGER_MS=\"soon\": expected a whole number of milliseconds, 0 to 1000"
        );
    }

    #[test]
    fn a_negative_kafka_linger_is_refused() {
        assert_eq!(settings(&[("KAFKA_LINGER_MS", "-5")]).unwrap_err().setting, "KAFKA_LINGER_MS");
    }

    #[test]
    fn a_kafka_linger_over_a_second_is_refused() {
        assert_eq!(settings(&[("KAFKA_LINGER_MS", "1001")]).unwrap_err().setting, "KAFKA_LINGER_MS");
    }

    #[test]
    fn bad_number_names_setting_value_and_expectation() {
        let e = settings(&[("HEALTH_CHECK_INTERVAL_MS", "soon")]).unwrap_err();
        assert_eq!(e.to_string(), "invalid setting HEALTH_CHECK_INTERVAL_MS=\"soon\": expected a positive integer");
        assert!(settings(&[("MAX_BODY_BYTES", "0")]).is_err());
        assert!(settings(&[("LOG_FORMAT", "xml")]).is_err());
        assert!(settings(&[("HTTP_ADDR", "nowhere")]).is_err());
    }

    #[test]
    fn admin_auth_free_failures_is_a_whole_number() {
        assert_eq!(settings(&[]).unwrap().http.admin_auth_free_failures, 5);
        assert_eq!(settings(&[("ADMIN_AUTH_FREE_FAILURES", "0")]).unwrap().http.admin_auth_free_failures, 0);
        let e = settings(&[("ADMIN_AUTH_FREE_FAILURES", "lots")]).unwrap_err();
        assert_eq!(e.to_string(), "invalid setting ADMIN_AUTH_FREE_FAILURES=\"lots\": expected a whole number");
    }

    #[test]
    fn http_server_limits_are_checked() {
        let s = settings(&[("HTTP_MAX_HEADERS", "50"), ("HTTP_IDLE_TIMEOUT_MS", "1500")]).unwrap();
        assert_eq!((s.server.max_headers, s.server.idle_timeout.as_millis()), (50, 1500));
        assert_eq!(settings(&[("HTTP_MAX_HEADERS", "1001")]).unwrap_err().setting, "HTTP_MAX_HEADERS");
        assert_eq!(settings(&[("HTTP_MAX_HEADER_BYTES", "100")]).unwrap_err().setting, "HTTP_MAX_HEADER_BYTES");
        assert_eq!(settings(&[("HTTP_MAX_CONNECTIONS", "0")]).unwrap_err().setting, "HTTP_MAX_CONNECTIONS");
        assert_eq!(settings(&[("TLS_CERT_FILE", "/x.pem")]).unwrap_err().setting, "TLS_KEY_FILE");
    }

    #[test]
    fn weak_admin_token_is_refused_without_its_secret_in_the_message() {
        let e = settings(&[("ADMIN_TOKEN", "short-secret")]).unwrap_err();
        assert_eq!(e.setting, "ADMIN_TOKEN");
        assert!(!e.to_string().contains("short-secret"));
        let s = settings(&[("ADMIN_TOKEN", "short-secret"), ("ALLOW_WEAK_ADMIN_TOKEN", "true")]).unwrap();
        assert_eq!(s.http.admin_token.as_deref(), Some("short-secret"));
    }

    #[test]
    fn backend_endpoints_and_api_keys_are_parsed() {
        let s = settings(&[
            ("BACKEND_ENDPOINTS", "backend-1=http://127.0.0.1:8001, backend-2=http://127.0.0.1:8002/"),
            ("API_KEYS", "k1=org-a,k2=org-b"),
        ])
        .unwrap();
        assert_eq!(s.core.initial_state.backends.len(), 2);
        assert_eq!(s.core.initial_state.backends["backend-2"].endpoint, "http://127.0.0.1:8002");
        assert_eq!(s.core.initial_state.api_keys.len(), 2);
        let e = settings(&[("BACKEND_ENDPOINTS", "backend-1")]).unwrap_err();
        assert_eq!(e.setting, "BACKEND_ENDPOINTS");
        assert!(settings(&[("BACKEND_ENDPOINTS", "b=ftp://x")]).is_err());
        let e = settings(&[("API_KEYS", "secret-key-without-org")]).unwrap_err();
        assert!(!e.to_string().contains("secret-key"));
    }

    #[test]
    fn file_holds_hashed_keys_backends_and_policies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.yaml");
        let hash = hex::encode(hash_key("file-key"));
        std::fs::write(
            &path,
            format!(
                "backends:\n  - backend_id: b1\n    endpoint: http://127.0.0.1:9001\n\
                 api_keys:\n  - key_sha256: {hash}\n    organization_id: org-1\n\
                 policies:\n  - policy_id: p1\n    organization_id: org-1\n    model: m\n    \
                 backends: [{{backend_id: b1, weight: 1}}]\n    failover_threshold: 2\n\
                 default_route: false\n"
            ),
        )
        .unwrap();
        let s = settings(&[("ROUTER_CONFIG", path.to_str().unwrap())]).unwrap();
        assert!(!s.core.initial_state.default_route);
        assert_eq!(s.core.initial_state.policies.len(), 1);
        assert_eq!(s.core.initial_state.api_keys.values().next().unwrap(), "org-1");

        std::fs::write(&path, "policies:\n  - policy_id: p1\n    organization_id: org-1\n    model: m\n    backends: [{backend_id: nope, weight: 1}]\n    failover_threshold: 2\n").unwrap();
        let e = settings(&[("ROUTER_CONFIG", path.to_str().unwrap())]).unwrap_err();
        assert!(e.expected.contains("unknown backend"), "{e}");
        std::fs::write(&path, "bakends: []\n").unwrap();
        assert!(settings(&[("ROUTER_CONFIG", path.to_str().unwrap())]).is_err());
    }

    #[test]
    fn https_endpoints_kinds_and_tls_settings_are_accepted() {
        let s = settings(&[("BACKEND_ENDPOINTS", "a=https://api.example.com,b=openai+https://h:8443/")]).unwrap();
        let b = &s.core.initial_state.backends;
        assert_eq!((b["a"].kind.name(), b["a"].endpoint.as_str()), ("native", "https://api.example.com"));
        assert_eq!((b["b"].kind.name(), b["b"].endpoint.as_str()), ("openai", "https://h:8443"));
        let e = settings(&[("BACKEND_ENDPOINTS", "a=grpc+https://h")]).unwrap_err();
        assert!(e.expected.contains("unknown backend kind"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let config = dir.path().join("router.yaml");
        std::fs::write(
            &config,
            format!(
                "backends:\n  - backend_id: b1\n    endpoint: https://127.0.0.1:9443\n    kind: openai\n    \
                 tls: {{ca_file: {}, server_name: backend.internal}}\n",
                ca_file.display()
            ),
        )
        .unwrap();
        let s =
            settings(&[("ROUTER_CONFIG", config.to_str().unwrap()), ("BACKEND_CA_FILE", ca_file.to_str().unwrap())])
                .unwrap();
        let b1 = &s.core.initial_state.backends["b1"];
        assert_eq!((b1.kind.name(), b1.tls.server_name.as_deref()), ("openai", Some("backend.internal")));
        assert_eq!(s.core.transport.ca_file.as_deref(), Some(ca_file.as_path()));
    }

    #[test]
    fn unreadable_tls_files_name_the_setting_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere.pem");
        let e = settings(&[("BACKEND_CA_FILE", missing.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.setting, "BACKEND_CA_FILE");
        assert!(e.to_string().contains("nowhere.pem"), "{e}");

        let config = dir.path().join("router.yaml");
        std::fs::write(
            &config,
            format!(
                "backends:\n  - backend_id: b1\n    endpoint: https://h\n    tls: {{client_cert_file: {0}, client_key_file: {0}}}\n",
                missing.display()
            ),
        )
        .unwrap();
        let e = settings(&[("ROUTER_CONFIG", config.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.setting, "ROUTER_CONFIG");
        assert!(e.expected.contains("tls.client_cert_file") && e.expected.contains("nowhere.pem"), "{e}");
        std::fs::write(&config, "backends:\n  - backend_id: b1\n    endpoint: https://h\n    tls: {ca_fil: x}\n")
            .unwrap();
        assert!(settings(&[("ROUTER_CONFIG", config.to_str().unwrap())]).is_err(), "unknown tls fields are refused");
        std::fs::write(&config, "backends:\n  - backend_id: b1\n    endpoint: https://h\n    api_kee_env: X\n")
            .unwrap();
        let e = settings(&[("ROUTER_CONFIG", config.to_str().unwrap())]).unwrap_err();
        assert!(e.expected.contains("api_kee_env"), "unknown backend fields are refused: {e}");
    }
}
