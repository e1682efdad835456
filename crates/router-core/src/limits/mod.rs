//! Limits: per-organization rate limits (429), budgets and quotas (402).
//!
//! One admission check per request, before routing:
//! - **Rate limit**: GCRA per organization, `RATE_LIMIT_DEFAULT_RPS` with a burst
//!   of `RATE_LIMIT_BURST_SIZE`, or the organization's override.
//! - **Budget and quota**: the estimated cost and tokens are *reserved*
//!   atomically before dispatch, *settled* to the actual amount after a
//!   successful answer, and *released* if the request fails. Reservations are
//!   keyed by `request_id`, so a repeated reserve or settle never double-counts.
//!
//! Where the shared state lives:
//! - with `REDIS_URL`: in Redis, one Lua script per admission (rate limit,
//!   budget and quota together: one round trip) and one per settlement;
//! - with `BUDGET_SERVICE_URL`: budgets and quotas are asked of that service;
//! - otherwise: in this process ([`gcra::LocalLimiter`], [`local::Ledger`]).
//!
//! Redis down (known down: its PING failed, or calls failed or took longer
//! than `REDIS_TIMEOUT_MS` several times in a row; and for the one call that
//! failed): `RATE_LIMIT_FAILURE_MODE` decides. A slow Redis is waited for. `local` (default) falls back to the
//! in-process limiter, `open` admits, `closed` refuses with 503. Budgets and
//! quotas cannot be checked without the shared ledger, so under `local` and
//! `open` they are not enforced (counted in
//! `api_router_limits_degraded_total`). Settlements that cannot reach the
//! ledger are queued and retried by the settler task until they land.

pub mod budget_service;
pub mod gcra;
pub mod local;
pub mod period;
pub mod redis;
pub mod resp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyEntry;
use crate::metrics::Metrics;

use self::gcra::RateInfo;
use self::period::Period;

/// One micro-unit of currency: amounts are integers of these.
pub const MICROS: f64 = 1_000_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Currency units per period.
    pub amount: f64,
    pub period: Period,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    pub period: Period,
}

/// An organization's limits. Absent parts fall back to the defaults (rate
/// limit) or are not enforced (budget, quota).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

impl OrgLimits {
    /// Parses and validates the admin/file JSON shape. Numbers are read as
    /// JSON numbers first so that negative and zero values get a clear message.
    pub fn from_json(value: serde_json::Value) -> Result<Self, String> {
        fn positive(v: &serde_json::Value, path: &str, whole: bool) -> Result<(), String> {
            match v.as_f64() {
                Some(n) if n > 0.0 && n.is_finite() => {}
                Some(n) => return Err(format!("`{path}` must be greater than 0, got {n}")),
                None => return Err(format!("`{path}` must be a number")),
            }
            if whole && v.as_u64().is_none() {
                return Err(format!("`{path}` must be a whole number"));
            }
            Ok(())
        }
        for (section, field, whole) in [
            ("rate_limit", "requests_per_second", false),
            ("rate_limit", "burst", true),
            ("budget", "amount", false),
            ("quota", "requests", true),
            ("quota", "tokens", true),
        ] {
            if let Some(v) = value.get(section).and_then(|s| s.get(field)) {
                positive(v, &format!("{section}.{field}"), whole)?;
            }
        }
        let limits: OrgLimits = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if limits.quota.is_some_and(|q| q.requests.is_none() && q.tokens.is_none()) {
            return Err("`quota` needs `requests` and/or `tokens`".into());
        }
        if limits.rate_limit.is_some_and(|r| r.burst > 1_000_000 || r.requests_per_second > 1e9) {
            return Err("`rate_limit` is out of range".into());
        }
        Ok(limits)
    }
}

/// Prices for one model, per 1,000 tokens, and the flat cost per request
/// used when the backend reports no usage (and as the reservation estimate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_1k: f64,
    #[serde(default)]
    pub output_per_1k: f64,
    /// Input tokens read from the provider's cache (default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_per_1k: Option<f64>,
    /// Input tokens written to the provider's cache (default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_1k: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_cost: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Local,
    Open,
    Closed,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Local => "local",
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BudgetServiceSettings {
    pub url: String,
    pub timeout: Duration,
    /// `false`: refuse (503) when the service is unreachable.
    pub fail_open: bool,
    pub denial_cache: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// `None` when `RATE_LIMIT_DEFAULT_RPS=0`: no default limit.
    pub default_rate: Option<RateLimit>,
    pub failure_mode: FailureMode,
    /// `REDIS_URL` or `REDIS_CLUSTER_URLS`; `None`: limits in process.
    pub redis: Option<redis::RedisTarget>,
    pub redis_timeout: Duration,
    pub redis_prefix: String,
    pub default_request_cost: f64,
    pub estimated_tokens: u64,
    pub budget_service: Option<BudgetServiceSettings>,
}

pub use router_providers::Usage;

/// Why the admission check refused a request, or could not decide. The door
/// maps each to its status and shape; the text is the message.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitError {
    /// Over the organization's (or the API key's) rate limit.
    RateLimited { info: RateInfo, retry_after_secs: u64, scope: Scope },
    /// The reservation would exceed the organization's (or the key's) budget.
    BudgetExceeded { limit: f64, remaining: f64, reset_at: Option<SystemTime>, scope: Scope },
    /// The reservation would exceed a quota (`kind`: requests or tokens).
    QuotaExceeded { kind: &'static str, limit: u64, remaining: u64, reset_at: Option<SystemTime> },
    /// Redis is down and `RATE_LIMIT_FAILURE_MODE=closed`.
    LimiterUnavailable,
    /// The budget service is unreachable and `BUDGET_SERVICE_FAILURE_MODE=closed`.
    BudgetServiceUnavailable,
}

/// Whose limit a denial is: the organization's, or the API key's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Organization,
    Key,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Organization => "organization",
            Scope::Key => "key",
        }
    }
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitError::RateLimited { retry_after_secs, scope: Scope::Organization, .. } => {
                write!(f, "rate limit exceeded for this organization; retry after {retry_after_secs} s")
            }
            LimitError::RateLimited { retry_after_secs, scope: Scope::Key, .. } => {
                write!(f, "rate limit exceeded for this API key; retry after {retry_after_secs} s")
            }
            LimitError::BudgetExceeded { limit, remaining, scope: Scope::Organization, .. } => {
                write!(f, "budget exceeded: {remaining} of {limit} remaining in this period")
            }
            LimitError::BudgetExceeded { limit, remaining, scope: Scope::Key, .. } => {
                write!(f, "this API key's budget exceeded: {remaining} of {limit} remaining in this period")
            }
            LimitError::QuotaExceeded { kind, limit, remaining, .. } => {
                write!(f, "{kind} quota exceeded: {remaining} of {limit} remaining in this period")
            }
            LimitError::LimiterUnavailable => {
                f.write_str("rate limiting is unavailable (Redis is down and RATE_LIMIT_FAILURE_MODE=closed)")
            }
            LimitError::BudgetServiceUnavailable => {
                f.write_str("the budget service is unavailable (BUDGET_SERVICE_FAILURE_MODE=closed)")
            }
        }
    }
}

impl std::error::Error for LimitError {}

/// What one request must pass, resolved from settings and the snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// (interval in µs, burst)
    pub rate: Option<(u64, u32)>,
    /// (limit in micros, period)
    pub budget: Option<(i64, Period)>,
    pub quota_requests: Option<i64>,
    pub quota_tokens: Option<i64>,
    pub quota_period: Period,
    /// The reservation: estimated cost in micros, and tokens.
    pub cost_micros: i64,
    pub tokens: i64,
    /// The API key's own limits and counters, for a managed key.
    pub key: Option<KeyPlan>,
}

/// A managed API key's part of the check: its own rate limit and budget on
/// top of the organization's, and its spend and token counters (kept for
/// every managed key, for its usage endpoint).
#[derive(Debug, Clone, Copy)]
pub struct KeyPlan {
    /// (interval in µs, burst)
    pub rate: Option<(u64, u32)>,
    /// Limit in micros, per `period`.
    pub budget: Option<i64>,
    /// The counters' period: the key's budget's, else monthly.
    pub period: Period,
}

impl Plan {
    fn needs_ledger(&self) -> bool {
        self.budget.is_some() || self.quota_requests.is_some() || self.quota_tokens.is_some() || self.key.is_some()
    }
}

/// The key names of one request's counters (Redis keys, local ledger keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub rate: String,
    pub spend: String,
    pub requests: String,
    pub tokens: String,
    pub reservation: String,
    /// The API key's counters; empty without a managed key.
    pub key_rate: String,
    pub key_spend: String,
    pub key_tokens: String,
}

impl Keys {
    pub fn new(prefix: &str, org: &str, request_id: &str, plan: &Plan, now: SystemTime, key_id: Option<&str>) -> Self {
        Self::build(prefix, org, false, request_id, plan, now, key_id)
    }

    /// Only the organization's rate key, as [`Keys::new`] names it without
    /// a prefix: all that an admission in process reads when a rate limit
    /// is all it checks (the default configuration). Naming the other seven
    /// cost ~2,000 instructions a request (`docs/benchmarks.md`).
    pub fn rate_only(org: &str) -> Self {
        Keys { rate: join(&["rl:", org]), ..Default::default() }
    }

    /// For Redis Cluster: every key carries the organization's hash tag
    /// `{org}` (an API key's counters too), so that all the keys one
    /// admission touches are in one slot.
    pub fn tagged(
        prefix: &str,
        org: &str,
        request_id: &str,
        plan: &Plan,
        now: SystemTime,
        key_id: Option<&str>,
    ) -> Self {
        Self::build(prefix, org, true, request_id, plan, now, key_id)
    }

    fn build(
        prefix: &str,
        org: &str,
        tagged: bool,
        request_id: &str,
        plan: &Plan,
        now: SystemTime,
        key_id: Option<&str>,
    ) -> Self {
        let bp = plan.budget.map(|(_, p)| p).unwrap_or(Period::Total).key(now);
        let qp = plan.quota_period.key(now);
        // Built on every admission: joined by hand, as `format!` took ~1,500
        // instructions a name (10,900 a request with the period keys).
        let (l, r) = if tagged { ("{", "}") } else { ("", "") };
        let (key_rate, key_spend, key_tokens) = match (key_id, plan.key) {
            (Some(id), Some(k)) => {
                let kp = k.period.key(now);
                // A key's names carry its organization only as the tag.
                let (l, o, r) = if tagged { ("{", org, "}:") } else { ("", "", "") };
                (
                    join(&[prefix, "krl:", l, o, r, id]),
                    join(&[prefix, "kspend:", l, o, r, id, ":", &kp]),
                    join(&[prefix, "ktok:", l, o, r, id, ":", &kp]),
                )
            }
            _ => Default::default(),
        };
        Keys {
            rate: join(&[prefix, "rl:", l, org, r]),
            spend: join(&[prefix, "spend:", l, org, r, ":", &bp]),
            requests: join(&[prefix, "qreq:", l, org, r, ":", &qp]),
            tokens: join(&[prefix, "qtok:", l, org, r, ":", &qp]),
            reservation: join(&[prefix, "res:", l, org, r, ":", request_id]),
            key_rate,
            key_spend,
            key_tokens,
        }
    }
}

/// `parts` in one string, allocated once.
fn join(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// What a reservation holds against each counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub budget: bool,
    pub cost: i64,
    pub requests: i64,
    pub token_quota: bool,
    pub tokens: i64,
    /// The API key's counters hold the estimate too.
    #[serde(default)]
    pub key: bool,
    #[serde(default)]
    pub key_cost: i64,
    #[serde(default)]
    pub key_tokens: i64,
}

impl Held {
    pub fn for_plan(plan: &Plan) -> Self {
        let budget = plan.budget.is_some();
        let token_quota = plan.quota_tokens.is_some();
        Held {
            budget,
            cost: if budget { plan.cost_micros } else { 0 },
            requests: i64::from(plan.quota_requests.is_some()),
            token_quota,
            tokens: if token_quota { plan.tokens } else { 0 },
            key: plan.key.is_some(),
            key_cost: if plan.key.is_some() { plan.cost_micros } else { 0 },
            key_tokens: if plan.key.is_some() { plan.tokens } else { 0 },
        }
    }
}

/// The outcome of a check against a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { rate: Option<RateInfo> },
    RateLimited { retry_after_us: u64, info: RateInfo },
    Budget { spent: i64 },
    QuotaRequests { used: i64 },
    QuotaTokens { used: i64 },
    KeyRateLimited { retry_after_us: u64, info: RateInfo },
    KeyBudget { spent: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    Redis,
    Service,
}

/// Held for one admitted request until it is settled or released.
#[derive(Debug, Clone)]
#[must_use = "a reservation must be settled or released with Limits::finish"]
pub struct Reservation {
    org: Arc<str>,
    request_id: Arc<str>,
    keys: Keys,
    price: Option<Price>,
    billable: bool,
    store: Store,
}

impl Reservation {
    /// Settles at `price` instead (the request was served by a fallback model).
    pub fn reprice(&mut self, price: Option<Price>) {
        self.price = price;
    }
}

#[derive(Debug, Default)]
pub struct Admission {
    /// For the `RateLimit-*` headers.
    pub rate: Option<RateInfo>,
    pub reservation: Option<Reservation>,
}

/// A settlement (`actual = Some((cost, tokens))`) or release (`None`).
struct Settlement {
    reservation: Reservation,
    actual: Option<(i64, i64)>,
}

/// A key's part of the plan.
fn key_plan(k: &KeyEntry) -> KeyPlan {
    KeyPlan {
        rate: k.rate_limit.map(|r| (gcra::interval_us(r.requests_per_second), r.burst)),
        budget: k.budget.map(|b| (b.amount * MICROS).round() as i64),
        period: k.budget.map(|b| b.period).unwrap_or(Period::Monthly),
    }
}

/// The most settlements waiting for a store that is down.
const SETTLE_QUEUE: usize = 100_000;
/// Settlements the settler applies concurrently at most.
const SETTLE_AT_ONCE: usize = 64;

pub struct Limits {
    settings: LimitSettings,
    local_rate: gcra::LocalLimiter,
    ledger: Arc<local::Ledger>,
    redis: Option<Arc<redis::RedisLimits>>,
    service: Option<budget_service::BudgetService>,
    metrics: Metrics,
    settle_tx: mpsc::Sender<Settlement>,
    settle_rx: std::sync::Mutex<Option<mpsc::Receiver<Settlement>>>,
}

/// What the request brings to the admission check.
pub struct AdmitRequest<'a> {
    pub org: &'a Arc<str>,
    pub request_id: &'a Arc<str>,
    pub model: &'a str,
    pub limits: Option<OrgLimits>,
    pub price: Option<Price>,
    /// Whether it spends budget and tokens (not a token count): otherwise
    /// only the rate limit and the request quota apply.
    pub billable: bool,
    /// The managed API key the request came with, if any: its own limits
    /// apply on top of the organization's, in the same check.
    pub key: Option<&'a KeyEntry>,
}

impl Limits {
    pub fn new(
        settings: LimitSettings,
        ledger: Arc<local::Ledger>,
        redis: Option<Arc<redis::RedisLimits>>,
        transport: std::sync::Arc<dyn router_providers::transport::Transport>,
        metrics: Metrics,
    ) -> Self {
        let service = settings.budget_service.clone().map(|s| budget_service::BudgetService::new(s, transport.clone()));
        let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE);
        Self {
            settings,
            local_rate: gcra::LocalLimiter::default(),
            ledger,
            redis,
            service,
            metrics,
            settle_tx,
            settle_rx: std::sync::Mutex::new(Some(settle_rx)),
        }
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    pub fn redis(&self) -> Option<&Arc<redis::RedisLimits>> {
        self.redis.as_ref()
    }

    pub fn service(&self) -> Option<&budget_service::BudgetService> {
        self.service.as_ref()
    }

    pub fn ledger(&self) -> &Arc<local::Ledger> {
        &self.ledger
    }

    fn plan(&self, req: &AdmitRequest<'_>) -> Plan {
        let limits = req.limits.unwrap_or_default();
        let rate = limits
            .rate_limit
            .or(self.settings.default_rate)
            .map(|r| (gcra::interval_us(r.requests_per_second), r.burst));
        let estimate = if req.billable {
            req.price.and_then(|p| p.request_cost).unwrap_or(self.settings.default_request_cost)
        } else {
            0.0
        };
        Plan {
            rate,
            budget: limits.budget.map(|b| ((b.amount * MICROS).round() as i64, b.period)),
            quota_requests: limits.quota.and_then(|q| q.requests).map(|n| n as i64),
            quota_tokens: limits.quota.and_then(|q| q.tokens).map(|n| n as i64),
            quota_period: limits.quota.map(|q| q.period).unwrap_or(Period::Total),
            cost_micros: (estimate * MICROS).round() as i64,
            tokens: if req.billable { self.settings.estimated_tokens as i64 } else { 0 },
            key: req.key.map(key_plan),
        }
    }

    /// The admission check. `Ok` carries what to settle later.
    pub async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Admission, LimitError> {
        let plan = self.plan(req);
        if plan.rate.is_none() && !plan.needs_ledger() {
            return Ok(Admission::default());
        }
        let now = SystemTime::now();
        let key_id = req.key.map(|k| &*k.key_id);
        let keys = self.keys(req.org, req.request_id, &plan, now, key_id);
        let reservation = |store| self.reservation(req, &keys, store);

        // Budget service: rate limits here, budget and quota there. (Key
        // budgets and counters need Redis or the embedded ledger.)
        if let Some(service) = &self.service {
            let key = plan.key.map(|k| KeyPlan { budget: None, ..k }).filter(|k| k.rate.is_some());
            let rate_only = Plan { budget: None, quota_requests: None, quota_tokens: None, key, ..plan };
            let rate = match self.check_shared(&keys, &rate_only, now, req).await?.0 {
                Decision::Allowed { rate } => rate,
                other => return Err(self.deny(other, &plan, req, now)),
            };
            if !plan.needs_ledger() {
                return Ok(Admission { rate, reservation: None });
            }
            return match service.reserve(req, &plan, &self.metrics).await? {
                None => Ok(Admission { rate, reservation: Some(reservation(Store::Service)) }),
                Some(denial) => Err(denial),
            };
        }

        match self.check_shared(&keys, &plan, now, req).await? {
            (Decision::Allowed { rate }, store) => {
                let reservation = store.filter(|_| plan.needs_ledger()).map(reservation);
                Ok(Admission { rate, reservation })
            }
            (other, _) => Err(self.deny(other, &plan, req, now)),
        }
    }

    fn reservation(&self, req: &AdmitRequest<'_>, keys: &Keys, store: Store) -> Reservation {
        Reservation {
            org: req.org.clone(),
            request_id: req.request_id.clone(),
            keys: keys.clone(),
            price: req.price,
            billable: req.billable,
            store,
        }
    }

    /// The counters' names: prefixed in Redis, hash-tagged on a cluster.
    fn keys(&self, org: &str, request_id: &str, plan: &Plan, now: SystemTime, key_id: Option<&str>) -> Keys {
        match &self.redis {
            None if !plan.needs_ledger() => Keys::rate_only(org),
            None => Keys::new("", org, request_id, plan, now, key_id),
            Some(r) if r.is_cluster() => Keys::tagged(&self.settings.redis_prefix, org, request_id, plan, now, key_id),
            Some(_) => Keys::new(&self.settings.redis_prefix, org, request_id, plan, now, key_id),
        }
    }

    /// Rate limit plus (without a budget service) budget and quota, against
    /// Redis if configured, else in process. Also says which store holds the
    /// reservation: none when Redis was down and the failure mode applied.
    async fn check_shared(
        &self,
        keys: &Keys,
        plan: &Plan,
        now: SystemTime,
        req: &AdmitRequest<'_>,
    ) -> Result<(Decision, Option<Store>), LimitError> {
        let Some(redis) = &self.redis else {
            return Ok((self.check_local(keys, plan, now), Some(Store::Local)));
        };
        match redis.admit(keys, plan, now).await {
            Ok(d) => Ok((d, Some(Store::Redis))),
            Err(e) => {
                // The script may still have run (a timeout is not a refusal):
                // release whatever it might have reserved; a no-op otherwise.
                if plan.needs_ledger() {
                    self.enqueue(Settlement { reservation: self.reservation(req, keys, Store::Redis), actual: None });
                }
                let mode = self.settings.failure_mode;
                tracing::warn!(error = %e, mode = mode.as_str(), organization_id = %req.org, "Redis unavailable for limits; using the failure mode");
                let outcome = match mode {
                    FailureMode::Closed => {
                        self.metrics.limits_degraded.with_label_values(&[mode.as_str(), "refused"]).inc();
                        return Err(LimitError::LimiterUnavailable);
                    }
                    FailureMode::Open => Decision::Allowed { rate: None },
                    FailureMode::Local => self.rate_local(keys, plan),
                };
                let label = if matches!(outcome, Decision::Allowed { .. }) { "allowed" } else { "denied" };
                self.metrics.limits_degraded.with_label_values(&[mode.as_str(), label]).inc();
                Ok((outcome, None))
            }
        }
    }

    /// The organization's rate limit and the key's, in process: both
    /// allow, or neither is charged.
    fn rate_local(&self, keys: &Keys, plan: &Plan) -> Decision {
        let org = plan.rate.map(|(interval, burst)| (keys.rate.as_str(), interval, burst));
        let key = plan.key.and_then(|k| k.rate).map(|(interval, burst)| (keys.key_rate.as_str(), interval, burst));
        match self.local_rate.check_all(&[org, key], gcra::now_us()) {
            Ok(info) => Decision::Allowed { rate: info },
            Err((0, retry_after_us, info)) => Decision::RateLimited { retry_after_us, info },
            Err((_, retry_after_us, info)) => Decision::KeyRateLimited { retry_after_us, info },
        }
    }

    fn check_local(&self, keys: &Keys, plan: &Plan, now: SystemTime) -> Decision {
        let rate = match self.rate_local(keys, plan) {
            Decision::Allowed { rate } => rate,
            denied => return denied,
        };
        if !plan.needs_ledger() {
            return Decision::Allowed { rate };
        }
        match self.ledger.reserve(keys, plan, now) {
            Decision::Allowed { .. } => Decision::Allowed { rate },
            denied => denied,
        }
    }

    fn deny(&self, decision: Decision, plan: &Plan, req: &AdmitRequest<'_>, now: SystemTime) -> LimitError {
        let org = &**req.org;
        let retry = |us: u64| us.div_ceil(1_000_000).max(1);
        match decision {
            Decision::RateLimited { retry_after_us, info } => {
                self.metrics.rate_limit_denials.with_label_values(&[org]).inc();
                LimitError::RateLimited { info, retry_after_secs: retry(retry_after_us), scope: Scope::Organization }
            }
            Decision::KeyRateLimited { retry_after_us, info } => {
                self.metrics.rate_limit_denials.with_label_values(&[org]).inc();
                LimitError::RateLimited { info, retry_after_secs: retry(retry_after_us), scope: Scope::Key }
            }
            Decision::Budget { spent } => {
                self.metrics.budget_denials.with_label_values(&[org]).inc();
                let (limit, period) = plan.budget.unwrap_or((0, Period::Total));
                LimitError::BudgetExceeded {
                    limit: limit as f64 / MICROS,
                    remaining: (limit - spent).max(0) as f64 / MICROS,
                    reset_at: period.reset_at(now),
                    scope: Scope::Organization,
                }
            }
            Decision::KeyBudget { spent } => {
                self.metrics.budget_denials.with_label_values(&[org]).inc();
                let (limit, period) = plan.key.map(|k| (k.budget.unwrap_or(0), k.period)).unwrap_or((0, Period::Total));
                LimitError::BudgetExceeded {
                    limit: limit as f64 / MICROS,
                    remaining: (limit - spent).max(0) as f64 / MICROS,
                    reset_at: period.reset_at(now),
                    scope: Scope::Key,
                }
            }
            Decision::QuotaRequests { used } | Decision::QuotaTokens { used } => {
                self.metrics.quota_denials.with_label_values(&[org]).inc();
                let (kind, limit) = match decision {
                    Decision::QuotaRequests { .. } => ("requests", plan.quota_requests.unwrap_or(0)),
                    _ => ("tokens", plan.quota_tokens.unwrap_or(0)),
                };
                LimitError::QuotaExceeded {
                    kind,
                    limit: limit.max(0) as u64,
                    remaining: (limit - used).max(0) as u64,
                    reset_at: plan.quota_period.reset_at(now),
                }
            }
            // Callers pass denials only; were an allowance passed, refusing
            // is the safe answer.
            Decision::Allowed { .. } => LimitError::LimiterUnavailable,
        }
    }

    /// Settles a reservation to the actual usage (`Some`) or releases it
    /// (`None`). Never waits: the settler task applies it.
    pub fn finish(&self, reservation: Reservation, usage: Option<Option<Usage>>) {
        let actual = usage.map(|u| match reservation.billable {
            true => {
                let cost = self.cost(reservation.price, u);
                ((cost * MICROS).round() as i64, u.map(|u| u.total()).unwrap_or(0) as i64)
            }
            false => (0, 0),
        });
        self.enqueue(Settlement { reservation, actual });
    }

    /// The cost of a request: reported usage at the model's price, or the
    /// flat `request_cost` (default `BUDGET_DEFAULT_REQUEST_COST`).
    pub fn cost(&self, price: Option<Price>, usage: Option<Usage>) -> f64 {
        match (usage, price) {
            (Some(u), Some(p)) if u.prompt_tokens + u.completion_tokens > 0 => {
                let read = p.cache_read_per_1k.unwrap_or(p.input_per_1k);
                let write = p.cache_write_per_1k.unwrap_or(p.input_per_1k);
                (u.uncached_prompt_tokens() as f64 * p.input_per_1k
                    + u.cache_read_tokens as f64 * read
                    + u.cache_write_tokens as f64 * write
                    + u.completion_tokens as f64 * p.output_per_1k)
                    / 1000.0
            }
            _ => price.and_then(|p| p.request_cost).unwrap_or(self.settings.default_request_cost),
        }
    }

    fn enqueue(&self, settlement: Settlement) {
        if let Err(e) = self.settle_tx.try_send(settlement) {
            self.metrics.settlements.with_label_values(&["dropped"]).inc();
            let s = match e {
                mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
            };
            tracing::error!(request_id = %s.reservation.request_id, organization_id = %s.reservation.org, "settlement queue full; settlement dropped");
        }
    }

    async fn apply(&self, s: &Settlement) -> Result<(), String> {
        match s.reservation.store {
            Store::Local => {
                self.ledger.finish(&s.reservation.keys, s.actual);
                Ok(())
            }
            Store::Redis => match &self.redis {
                Some(r) => r.finish(&s.reservation.keys, s.actual).await,
                None => Ok(()),
            },
            Store::Service => match &self.service {
                Some(svc) => svc.settle(&s.reservation.org, &s.reservation.request_id, s.actual).await,
                None => Ok(()),
            },
        }
    }

    /// The settler: applies what is queued, up to [`SETTLE_AT_ONCE`]
    /// settlements at once (on one Redis in one script call; otherwise
    /// concurrently, pipelined on the one connection), retrying each with
    /// backoff until it lands. One at a time it kept up
    /// with about one round trip's worth a second: under sustained load the
    /// queue grew by thousands a second (138 MB at 1,000 connections) and
    /// budgets stayed reserved rather than settled for as long. Settlements
    /// of different reservations commute (counter increments), so their
    /// order does not matter. On cancel it drains what is queued, trying
    /// each once.
    pub async fn run_settler(self: Arc<Self>, cancel: CancellationToken) {
        let Some(mut rx) = self.settle_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        // Settlements still being retried when cancelled get their one last
        // try with the rest of the queue.
        let mut carried = Vec::new();
        let mut batch = Vec::with_capacity(SETTLE_AT_ONCE);
        loop {
            let received = tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, SETTLE_AT_ONCE) => n,
                _ = cancel.cancelled() => break,
            };
            if received == 0 {
                return;
            }
            self.apply_together(&mut batch).await;
            let applying = batch.drain(..).map(|s| self.settle_until_applied(s, &cancel)).collect();
            carried.extend(crate::util::join_all(applying).await.into_iter().flatten());
            if cancel.is_cancelled() {
                break;
            }
        }
        rx.close();
        let mut lost = 0u64;
        for s in carried.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if self.apply(&s).await.is_err() {
                lost += 1;
            }
        }
        if lost > 0 {
            self.metrics.settlements.with_label_values(&["dropped"]).inc_by(lost);
            tracing::error!(count = lost, "settlements could not be applied before shutdown");
        }
    }

    /// On one Redis, applies the Redis settlements of `batch` in one call
    /// (one script run for all of them, not one each), and takes them out
    /// of `batch` if it landed. If it did not, they stay, to be settled one
    /// by one with retries; settling one twice is harmless (a reservation
    /// is applied once).
    async fn apply_together(&self, batch: &mut Vec<Settlement>) {
        let Some(redis) = self.redis.as_ref().filter(|r| !r.is_cluster()) else { return };
        let together: Vec<_> = batch
            .iter()
            .filter(|s| s.reservation.store == Store::Redis)
            .map(|s| (&s.reservation.keys, s.actual))
            .collect();
        if together.len() < 2 || redis.finish_many(&together).await.is_err() {
            return;
        }
        let n = together.len() as u64;
        batch.retain(|s| s.reservation.store != Store::Redis);
        self.metrics.settlements.with_label_values(&["applied"]).inc_by(n);
    }

    /// Applies one settlement, retrying with backoff; gives it back if
    /// cancelled before it landed.
    async fn settle_until_applied(&self, s: Settlement, cancel: &CancellationToken) -> Option<Settlement> {
        let mut backoff = crate::util::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match self.apply(&s).await {
                Ok(()) => {
                    self.metrics.settlements.with_label_values(&["applied"]).inc();
                    return None;
                }
                Err(e) => {
                    self.metrics.settlements.with_label_values(&["retried"]).inc();
                    tracing::warn!(error = %e, request_id = %s.reservation.request_id, "settlement failed; will retry");
                    tokio::select! {
                        _ = cancel.cancelled() => return Some(s),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// A managed key's spend and tokens in the current period (its budget's,
    /// else the month), as [`Limits::usage`] gives an organization's.
    pub async fn key_usage(&self, key: &KeyEntry) -> Result<serde_json::Value, LimitError> {
        let now = SystemTime::now();
        let plan = Plan {
            rate: None,
            budget: None,
            quota_requests: None,
            quota_tokens: None,
            quota_period: Period::Total,
            cost_micros: 0,
            tokens: 0,
            key: Some(key_plan(key)),
        };
        let keys = self.keys(&key.organization_id, "", &plan, now, Some(&key.key_id));
        let (spend, tokens) = match &self.redis {
            Some(r) => r.key_counters(&keys).await.map_err(|_| LimitError::LimiterUnavailable)?,
            None => (self.ledger.get(&keys.key_spend), self.ledger.get(&keys.key_tokens)),
        };
        let period = plan.key.map(|k| k.period).unwrap_or(Period::Monthly);
        let time = |t: Option<SystemTime>| t.map(crate::util::rfc3339);
        let spent = spend as f64 / MICROS;
        Ok(serde_json::json!({
            "key_id": &*key.key_id,
            "organization_id": &*key.organization_id,
            "period": period,
            "reset_at": time(period.reset_at(now)),
            "spent": spent,
            "tokens_used": tokens,
            "budget": key.budget.map(|b| serde_json::json!({
                "period": b.period,
                "limit": b.amount,
                "spent": spent,
                "remaining": (b.amount - spent).max(0.0),
                "reset_at": time(b.period.reset_at(now)),
            })),
            "rate_limit": key.rate_limit,
            "source": if self.redis.is_some() { "redis" } else { "local" },
        }))
    }

    /// Current spend and quota use of an organization.
    pub async fn usage(&self, org: &str, limits: Option<OrgLimits>) -> Result<serde_json::Value, LimitError> {
        let now = SystemTime::now();
        let req_id: Arc<str> = Arc::from("");
        let org_arc: Arc<str> = Arc::from(org);
        let plan = self.plan(&AdmitRequest {
            org: &org_arc,
            request_id: &req_id,
            model: "",
            limits,
            price: None,
            billable: true,
            key: None,
        });
        let keys = self.keys(org, "", &plan, now, None);
        let (spend, requests, tokens) = if let Some(svc) = &self.service {
            return svc.usage(org).await;
        } else if let Some(r) = &self.redis {
            r.counters(&keys).await.map_err(|_| LimitError::LimiterUnavailable)?
        } else {
            (self.ledger.get(&keys.spend), self.ledger.get(&keys.requests), self.ledger.get(&keys.tokens))
        };
        let time = |t: Option<SystemTime>| t.map(crate::util::rfc3339);
        let limits = limits.unwrap_or_default();
        Ok(serde_json::json!({
            "organization_id": org,
            "budget": limits.budget.map(|b| serde_json::json!({
                "period": b.period,
                "limit": b.amount,
                "spent": spend as f64 / MICROS,
                "remaining": (b.amount - spend as f64 / MICROS).max(0.0),
                "reset_at": time(b.period.reset_at(now)),
            })),
            "quota": limits.quota.map(|q| serde_json::json!({
                "period": q.period,
                "requests_limit": q.requests,
                "requests_used": requests,
                "tokens_limit": q.tokens,
                "tokens_used": tokens,
                "reset_at": time(q.period.reset_at(now)),
            })),
            "rate_limit": limits.rate_limit.or(self.settings.default_rate),
            "source": if self.redis.is_some() { "redis" } else { "local" },
        }))
    }
}
