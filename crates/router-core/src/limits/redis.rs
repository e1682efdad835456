//! Limits in Redis: one Lua script per admission (rate limit, budget and quota
//! checked and reserved together, in one round trip) and one per batch of
//! settlements.
//!
//! The connection is the limits' own for one Redis (`REDIS_URL`,
//! [`super::resp`]: multiplexed, replaced when it fails) or redis-rs's
//! cluster connection (`REDIS_CLUSTER_URLS`): async, multiplexed, and
//! reconnecting by itself; it follows `MOVED` and `ASK` redirections and
//! refreshes its slot map when a master fails over.
//!
//! On Redis Cluster one script may only touch keys of one hash slot, so every
//! key of an organization carries the hash tag `{org}` (its keys, its API
//! keys' counters and its reservations; [`super::Keys::tagged`]), and an
//! admission stays one round trip. Replication in Redis is asynchronous: a
//! master that dies can take its last writes with it, and the replica that
//! takes over would then have counted less than was admitted. With
//! `REDIS_CLUSTER_REPLICA_ACKS=n` every admission that changed counters waits
//! (up to [`ACK_WAIT`]) for `n` replicas to have it (`WAIT`), so a failover
//! loses no admission. `WAIT` blocks the connection it is sent on (the
//! multiplexed one, to that master) until the replicas answer, so its bound
//! is short: about one replication round trip is what it normally costs; an acknowledgement that does not come in
//! time is counted (`api_router_redis_errors_total{op="replica_ack"}`)
//! and the request goes on. A master left without replicas (after a
//! failover, until the old master rejoins) would make every admission wait
//! the full bound, so after a missed acknowledgement the waits pause for
//! [`ACK_PAUSE`]: one request in that period pays for finding out.
//!
//! A slow Redis is not a Redis that is down. A request waits for Redis's
//! answer up to `REDIS_TIMEOUT_MS` (default 250 ms): a busy machine or a slow
//! network delays the answer but keeps the limits exact across replicas.
//! Redis is known to be down after [`FAILURES_TO_DOWN`] failed calls in a row
//! (an error or the bound passed), or when the pinger's PING fails; only
//! then, and for the call that failed, does the caller apply the failure
//! mode, and while it is down requests do not wait on it at all. The pinger
//! checks Redis every second, so that a recovered Redis is noticed (and
//! reconnected) within a couple of seconds even without traffic. All keys expire by themselves: the rate key
//! when its bucket is full again, period counters a day after their period,
//! reservations after `RESERVATION_TTL`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Client, Cmd, ErrorKind, FromRedisValue, ServerErrorKind, Value};
use tokio_util::sync::CancellationToken;

use super::gcra::RateInfo;
use super::resp::{self, Arg};
use super::{Decision, Held, Keys, Plan};
use crate::metrics::Metrics;
use crate::readiness::Healthy;

/// How long a reservation may stay unsettled before Redis forgets it (its
/// amount then stays counted: the safe direction).
const RESERVATION_TTL_SECS: u64 = 3600;
const PING_EVERY: Duration = Duration::from_secs(1);

/// The longest an admission waits for its replica acknowledgements.
pub const ACK_WAIT: Duration = Duration::from_millis(100);

/// How long replica acknowledgements are not waited for after one did not come.
pub const ACK_PAUSE: Duration = Duration::from_secs(5);

/// Failed calls in a row that mark Redis down.
pub const FAILURES_TO_DOWN: u32 = 3;

/// KEYS: 1 rate, 2 spend, 3 requests, 4 tokens, 5 reservation, 6 key rate,
///       7 key spend, 8 key tokens (the key's: placeholders without one).
/// ARGV: 1 interval_us (0: no rate limit), 2 burst, 3 budget limit (-1: none),
///       4 cost, 5 request quota (-1), 6 token quota (-1), 7 tokens, 8 budget
///       ttl, 9 quota ttl (0: never), 10 reservation ttl, 11 key interval_us
///       (0: none), 12 key burst, 13 key budget limit (-1: none), 14 key
///       cost (-1: no managed key, nothing counted), 15 key counters' ttl
///       (0: never), 16 key tokens.
/// Returns {code, a, b}: 0 allowed (a remaining, -1 without a rate limit; b
/// reset µs; a = b = -1 when the reservation already existed: nothing
/// changed), 1 rate limited (a retry-after µs, b reset µs), 2 budget (a
/// spent), 3 request quota (a used), 4 token quota (a used), 5 the key's
/// rate limit (as 1), 6 the key's budget (a spent).
/// Nothing is charged unless every limit allows.
///
/// Most of Redis's time in a script goes to the `redis.call`s (by `INFO
/// commandstats`, the script's own time was about four times its commands'
/// together), so it makes as few as it can: the reservation is written
/// first, `SET NX` (a repeat finds it there: no separate `EXISTS`), as one
/// string (no hash and its `EXPIRE`), and deleted if a limit refuses; a
/// counter that was read is written with its new value and expiry in one
/// `SET`, and one that was not is incremented and given its expiry only
/// when the increment created it.
const ADMIT: &str = r#"
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local budget, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local rq, tq, tokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local kinterval, kburst = tonumber(ARGV[11]), tonumber(ARGV[12])
local kbudget, kcost, ktokens = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[16])
local counted = kcost >= 0
local held = budget >= 0 or rq >= 0 or tq >= 0 or counted
if held then
  local v = string.format('%d %d %d %d %d %d %d %d', budget >= 0 and 1 or 0, budget >= 0 and cost or 0,
    rq >= 0 and 1 or 0, tq >= 0 and 1 or 0, tq >= 0 and tokens or 0,
    counted and 1 or 0, counted and kcost or 0, counted and ktokens or 0)
  if not redis.call('SET', KEYS[5], v, 'NX', 'EX', ARGV[10]) then return {0, -1, -1} end
end
local function deny(code, a, b)
  if held then redis.call('DEL', KEYS[5]) end
  return {code, a, b}
end
local now = 0
if interval > 0 or kinterval > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function gcra(key, iv, b)
  local v = redis.call('GET', key)
  local tat = now
  if v then tat = math.max(tonumber(v), now) end
  local new_tat = tat + iv
  local allow_at = new_tat - b * iv
  if now < allow_at then return false, allow_at - now, tat - now end
  return true, math.min(math.floor((now - allow_at) / iv), b), new_tat
end
local remaining, reset, new_tat, knew_tat = -1, 0, 0, 0
if interval > 0 then
  local ok, a, b = gcra(KEYS[1], interval, burst)
  if not ok then return deny(1, a, b) end
  remaining, new_tat, reset = a, b, b - now
end
if kinterval > 0 then
  local ok, a, b = gcra(KEYS[6], kinterval, kburst)
  if not ok then return deny(5, a, b) end
  knew_tat = b
  if remaining < 0 or a < remaining then remaining, reset = a, b - now end
end
local function get(k) local v = redis.call('GET', k); if v then return tonumber(v) end; return 0 end
local spent, kspent, rused, tused
if budget >= 0 then
  spent = get(KEYS[2])
  if spent + cost > budget then return deny(2, spent, 0) end
end
if kbudget >= 0 then
  kspent = get(KEYS[7])
  if kspent + kcost > kbudget then return deny(6, kspent, 0) end
end
if rq >= 0 then
  rused = get(KEYS[3])
  if rused + 1 > rq then return deny(3, rused, 0) end
end
if tq >= 0 then
  tused = get(KEYS[4])
  if tused >= tq or tused + tokens > tq then return deny(4, tused, 0) end
end
if interval > 0 then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
end
if kinterval > 0 then
  redis.call('SET', KEYS[6], string.format('%d', knew_tat), 'PX', math.ceil((knew_tat - now) / 1000) + 1000)
end
local bttl, qttl, kttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[15])
local function put(k, v, ttl)
  if ttl > 0 then
    redis.call('SET', k, string.format('%d', v), 'EX', ttl)
  else
    redis.call('SET', k, string.format('%d', v))
  end
end
local function add(k, by, ttl)
  if redis.call('INCRBY', k, by) == by and ttl > 0 then redis.call('EXPIRE', k, ttl) end
end
if budget >= 0 then put(KEYS[2], spent + cost, bttl) end
if rq >= 0 then put(KEYS[3], rused + 1, qttl) end
if tq >= 0 then put(KEYS[4], tused + tokens, qttl) end
if counted then
  if kbudget >= 0 then put(KEYS[7], kspent + kcost, kttl) else add(KEYS[7], kcost, kttl) end
  add(KEYS[8], ktokens, kttl)
end
return {0, remaining, reset}
"#;

/// Settles any number of reservations in one call. KEYS: for each, six:
/// spend, requests, tokens, reservation, key spend, key tokens. ARGV: for
/// each, three: release (1/0), cost, tokens.
/// Returns how many were applied; a reservation already settled or unknown
/// is skipped, so a settlement applied twice counts once. A reservation
/// written by a version before reservations were strings (a hash) is read
/// as a hash.
const FINISH: &str = r#"
local applied = 0
for i = 0, #KEYS / 6 - 1 do
  local k, a = i * 6, i * 3
  local v = redis.pcall('GET', KEYS[k + 4])
  local h
  if type(v) == 'table' and v.err then
    h = redis.call('HMGET', KEYS[k + 4], 'b', 'c', 'r', 'tq', 't', 'k', 'kc', 'kt')
    if not h[1] then h = nil end
  elseif v then
    h = {string.match(v, '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$')}
  end
  if h then
    local b, c, r, tq, t = tonumber(h[1] or 0), tonumber(h[2] or 0), tonumber(h[3] or 0), tonumber(h[4] or 0), tonumber(h[5] or 0)
    local kk, kc, kt = tonumber(h[6] or 0), tonumber(h[7] or 0), tonumber(h[8] or 0)
    if ARGV[a + 1] == '1' then
      if b == 1 then redis.call('INCRBY', KEYS[k + 1], -c) end
      if r == 1 then redis.call('INCRBY', KEYS[k + 2], -1) end
      if tq == 1 then redis.call('INCRBY', KEYS[k + 3], -t) end
      if kk == 1 then redis.call('INCRBY', KEYS[k + 5], -kc); redis.call('INCRBY', KEYS[k + 6], -kt) end
    else
      local cost, tokens = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
      if b == 1 then redis.call('INCRBY', KEYS[k + 1], cost - c) end
      if tq == 1 then redis.call('INCRBY', KEYS[k + 3], tokens - t) end
      if kk == 1 then
        redis.call('INCRBY', KEYS[k + 5], cost - kc)
        redis.call('INCRBY', KEYS[k + 6], tokens - kt)
      end
    end
    redis.call('DEL', KEYS[k + 4])
    applied = applied + 1
  end
end
return applied
"#;

/// Where the shared limits live. Its `Debug` hides the URLs, which can hold
/// passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (`REDIS_URL`).
    Single(String),
    /// A Redis Cluster's seed nodes (`REDIS_CLUSTER_URLS`), and how many
    /// replicas must have an admission before it is answered.
    Cluster { urls: Vec<String>, replica_acks: u32 },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(_) => f.write_str("Single(<redacted>)"),
            RedisTarget::Cluster { urls, replica_acks } => {
                f.debug_struct("Cluster").field("seed_nodes", &urls.len()).field("replica_acks", replica_acks).finish()
            }
        }
    }
}

enum Source {
    /// One Redis: the limits' own connection ([`super::resp`]); redis-rs
    /// parses the URL.
    Single(redis::ConnectionInfo),
    Cluster(Box<ClusterClient>),
}

/// A connection to one Redis or to a cluster: cheap to clone, multiplexed.
#[derive(Clone)]
enum Conn {
    Single(resp::Connection),
    Cluster(ClusterConnection),
}

/// Why a call got no usable answer.
#[derive(Debug)]
enum CallError {
    /// Redis does not have the script: load it and call again.
    NoScript,
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoScript => f.write_str("NOSCRIPT: the script is not loaded"),
            CallError::Failed(e) => f.write_str(e),
        }
    }
}

impl Conn {
    /// One command and its answer, as `T`.
    async fn query<T: FromRedisValue>(&self, args: &[Arg<'_>]) -> Result<T, CallError> {
        let value = match self {
            Conn::Single(c) => c
                .call(args)
                .await
                .map_err(|e| if e.is_no_script() { CallError::NoScript } else { CallError::Failed(e.to_string()) })?,
            Conn::Cluster(c) => {
                let mut cmd = Cmd::with_capacity(args.len(), resp::encoded_len(args));
                for arg in args {
                    match arg {
                        Arg::Str(s) => cmd.arg(*s),
                        Arg::Int(n) => cmd.arg(*n),
                    };
                }
                cmd.query_async::<Value>(&mut c.clone()).await.map_err(|e| {
                    if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
                        CallError::NoScript
                    } else {
                        CallError::Failed(e.to_string())
                    }
                })?
            }
        };
        T::from_redis_value(value).map_err(|e| CallError::Failed(e.to_string()))
    }

    /// One call of `script` (`EVALSHA` with `args` after the hash); a Redis
    /// that does not have it (restarted, flushed) gets it loaded and the
    /// call made again, as redis-rs's `ScriptInvocation` does.
    async fn call<T: FromRedisValue>(&self, script: &Lua, args: &[Arg<'_>]) -> Result<T, CallError> {
        match self.query(args).await {
            Err(CallError::NoScript) => {
                self.load(script).await?;
                self.query(args).await
            }
            other => other,
        }
    }

    /// `SCRIPT LOAD` (on a cluster, on every master).
    async fn load(&self, script: &Lua) -> Result<(), CallError> {
        self.query::<Value>(&[Arg::Str("SCRIPT"), Arg::Str("LOAD"), Arg::Str(script.code)]).await.map(drop)
    }
}

/// A Lua script and its SHA-1, as `EVALSHA` names it.
struct Lua {
    code: &'static str,
    hash: String,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Self { code, hash: redis::Script::new(code).get_hash().to_string() }
    }
}

pub struct RedisLimits {
    source: Source,
    /// On a cluster: replicas that must acknowledge an admission.
    replica_acks: u32,
    /// Replica acknowledgements are not waited for before this (ms since the
    /// epoch): one did not come in time.
    acks_paused_until_ms: std::sync::atomic::AtomicU64,
    /// Replaced when Redis stops answering on it (see [`RedisLimits::reconnect`]).
    conn: arc_swap::ArcSwap<Conn>,
    admit: Lua,
    finish: Lua,
    timeout: Duration,
    healthy: AtomicBool,
    /// Failed calls in a row.
    failures: AtomicU32,
    metrics: Metrics,
}

impl RedisLimits {
    /// Creates the connection without waiting for Redis; `connect` then tries.
    pub fn new(target: &RedisTarget, timeout: Duration, metrics: Metrics) -> Result<Self, String> {
        let (source, replica_acks) = match target {
            RedisTarget::Single(url) => {
                let info = Client::open(url.as_str()).map_err(|e| e.to_string())?.get_connection_info().clone();
                (Source::Single(info), 0)
            }
            RedisTarget::Cluster { urls, replica_acks } => {
                // Redirections and slot refreshes after a failover are
                // retried by the client, quickly; the request path bounds
                // every call by REDIS_TIMEOUT_MS.
                let client = ClusterClient::builder(urls.iter().map(String::as_str))
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| e.to_string())?;
                (Source::Cluster(Box::new(client)), *replica_acks)
            }
        };
        let conn = connection(&source, timeout)?;
        Ok(Self {
            source,
            replica_acks,
            acks_paused_until_ms: std::sync::atomic::AtomicU64::new(0),
            conn: arc_swap::ArcSwap::from_pointee(conn),
            admit: Lua::new(ADMIT),
            finish: Lua::new(FINISH),
            timeout,
            healthy: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            metrics,
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the limits live on a Redis Cluster (keys then carry hash tags).
    pub fn is_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster(_))
    }

    /// The connection to use now (a cheap clone of a multiplexed handle).
    /// One Redis's connection that failed is replaced here, as redis-rs's
    /// connection manager would replace it; the cluster's reconnects by
    /// itself.
    fn conn(&self) -> Conn {
        let current = self.conn.load();
        if let Conn::Single(c) = current.as_ref()
            && c.is_closed()
        {
            match connection(&self.source, self.timeout) {
                Ok(conn) => {
                    // Whoever replaced it first wins; every caller then
                    // uses the one in place.
                    self.conn.compare_and_swap(&*current, std::sync::Arc::new(conn));
                    return self.conn.load().as_ref().clone();
                }
                Err(e) => tracing::warn!(error = %e, "cannot create a new Redis connection"),
            }
        }
        current.as_ref().clone()
    }

    /// A new connection in place of the current one. A connection that
    /// breaks is replaced by [`RedisLimits::conn`], but not one that stays open and
    /// silent (a black hole, a half-open connection after a network fault):
    /// then commands queue behind replies that will never come. A failed
    /// PING replaces it, so that the next PING tries a fresh one.
    fn reconnect(&self) {
        match connection(&self.source, self.timeout) {
            Ok(conn) => self.conn.store(std::sync::Arc::new(conn)),
            Err(e) => tracing::warn!(error = %e, "cannot create a new Redis connection"),
        }
    }

    /// One PING, with a longer timeout than the request path's.
    pub async fn ping(&self, timeout: Duration) -> Result<(), String> {
        let conn = self.conn();
        match tokio::time::timeout(timeout, conn.query::<String>(&[Arg::Str("PING")])).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// A failed call: counted; the [`FAILURES_TO_DOWN`]th in a row (or a
    /// failed PING) marks Redis down.
    fn failed(&self, op: &str, e: &str) -> String {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        let in_a_row = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if (op == "ping" || in_a_row >= FAILURES_TO_DOWN) && self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "Redis unavailable: limits use RATE_LIMIT_FAILURE_MODE until it is back");
        }
        format!("redis {op}: {e}")
    }

    /// A call that Redis answered.
    fn answered(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Pings once at start-up and loads the scripts; on success Redis is
    /// healthy from the start.
    pub async fn connect(&self) -> Result<(), String> {
        self.ping(Duration::from_secs(2)).await?;
        self.load_scripts().await;
        self.healthy.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Loads the scripts, so that the first admissions after a (re)start of
    /// Redis do not pay for a missing script (two more round trips) on the
    /// request path. Best effort: a missing script is loaded on demand.
    async fn load_scripts(&self) {
        let conn = self.conn();
        for script in [&self.admit, &self.finish] {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.load(script)).await;
        }
    }

    pub async fn admit(&self, keys: &Keys, plan: &Plan, now: SystemTime) -> Result<Decision, String> {
        // While Redis is known to be down, do not wait on it at all: the
        // pinger notices when it is back.
        if !self.is_healthy() {
            return Err("redis is unhealthy; waiting for the health check".into());
        }
        let held = Held::for_plan(plan);
        let (interval, burst) = plan.rate.unwrap_or((0, 0));
        let ttl = |p: Option<super::period::Period>| p.and_then(|p| p.ttl_secs(now)).unwrap_or(0);
        // Without a managed key its three keys are never touched: the
        // organization's rate key stands in for them.
        let (kr, ks, kt) = if keys.key_rate.is_empty() {
            (&keys.rate, &keys.rate, &keys.rate)
        } else {
            (&keys.key_rate, &keys.key_spend, &keys.key_tokens)
        };
        let (kinterval, kburst) = plan.key.and_then(|k| k.rate).unwrap_or((0, 0));
        let args = [
            Arg::Str("EVALSHA"),
            Arg::Str(&self.admit.hash),
            Arg::Int(8),
            Arg::Str(&keys.rate),
            Arg::Str(&keys.spend),
            Arg::Str(&keys.requests),
            Arg::Str(&keys.tokens),
            Arg::Str(&keys.reservation),
            Arg::Str(kr),
            Arg::Str(ks),
            Arg::Str(kt),
            Arg::uint(interval),
            Arg::Int(i64::from(burst)),
            Arg::Int(plan.budget.map(|(l, _)| l).unwrap_or(-1)),
            Arg::Int(held.cost),
            Arg::Int(plan.quota_requests.unwrap_or(-1)),
            Arg::Int(plan.quota_tokens.unwrap_or(-1)),
            Arg::Int(held.tokens),
            Arg::uint(ttl(plan.budget.map(|(_, p)| p))),
            Arg::uint(ttl(Some(plan.quota_period))),
            Arg::uint(RESERVATION_TTL_SECS),
            Arg::uint(kinterval),
            Arg::Int(i64::from(kburst)),
            Arg::Int(plan.key.and_then(|k| k.budget).unwrap_or(-1)),
            Arg::Int(if held.key { held.key_cost } else { -1 }),
            Arg::uint(ttl(plan.key.map(|k| k.period))),
            Arg::Int(held.key_tokens),
        ];
        let conn = self.conn();
        let started = Instant::now();
        let reply: Vec<i64> = match tokio::time::timeout(self.timeout, conn.call(&self.admit, &args)).await {
            Ok(Ok(r)) => {
                self.metrics.redis_admit_seconds.observe(started.elapsed().as_secs_f64());
                self.answered();
                r
            }
            Ok(Err(e)) => return Err(self.failed("admit", &e.to_string())),
            // Past the bound: this request applies the failure mode; Redis
            // is down only after a few of these in a row.
            Err(_) => return Err(self.failed("admit_timeout", &format!("no answer within {:?}", self.timeout))),
        };
        let (code, a, b) = (
            reply.first().copied().unwrap_or(-1),
            reply.get(1).copied().unwrap_or(0),
            reply.get(2).copied().unwrap_or(0),
        );
        // An allowed admission changed counters (unless its reservation
        // already existed): on a cluster, have replicas take it first.
        if code == 0 && b != -1 {
            self.replica_ack(conn, &keys.rate).await;
        }
        let secs = |us: i64| (us.max(0) as u64).div_ceil(1_000_000);
        Ok(match code {
            0 => Decision::Allowed {
                rate: (interval > 0 && a >= 0).then(|| RateInfo {
                    limit: burst,
                    remaining: a as u32,
                    reset_secs: secs(b),
                }),
            },
            1 => Decision::RateLimited {
                retry_after_us: a.max(0) as u64,
                info: RateInfo { limit: burst, remaining: 0, reset_secs: secs(b) },
            },
            2 => Decision::Budget { spent: a },
            3 => Decision::QuotaRequests { used: a },
            4 => Decision::QuotaTokens { used: a },
            5 => Decision::KeyRateLimited {
                retry_after_us: a.max(0) as u64,
                info: RateInfo { limit: kburst, remaining: 0, reset_secs: secs(b) },
            },
            6 => Decision::KeyBudget { spent: a },
            other => return Err(self.failed("admit", &format!("unexpected reply code {other}"))),
        })
    }

    /// `WAIT` for `replica_acks` replicas of the master holding `key`'s
    /// slot, bounded by [`ACK_WAIT`] (or the request timeout, if shorter). Not having them is counted and
    /// logged, never a refusal: the master has the admission.
    async fn replica_ack(&self, conn: Conn, key: &str) {
        let (Conn::Cluster(mut conn), n @ 1..) = (conn, self.replica_acks) else { return };
        if crate::util::now_ms() < self.acks_paused_until_ms.load(Ordering::Relaxed) {
            return;
        }
        let bound = self.timeout.min(ACK_WAIT);
        let mut wait = redis::cmd("WAIT");
        wait.arg(n).arg(bound.as_millis() as u64);
        let route =
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)));
        let acked =
            tokio::time::timeout(self.timeout + Duration::from_millis(50), conn.route_command(wait, route)).await;
        match acked {
            Ok(Ok(Value::Int(got))) if got >= i64::from(n) => {}
            other => {
                self.metrics.redis_errors.with_label_values(&["replica_ack"]).inc();
                let until = crate::util::now_ms() + ACK_PAUSE.as_millis() as u64;
                self.acks_paused_until_ms.store(until, Ordering::Relaxed);
                tracing::warn!(
                    wanted = n,
                    answer = ?other.ok(),
                    paused_ms = ACK_PAUSE.as_millis() as u64,
                    "Redis Cluster replicas did not acknowledge an admission in time; not waiting for them for a while"
                );
            }
        }
    }

    pub async fn finish(&self, keys: &Keys, actual: Option<(i64, i64)>) -> Result<(), String> {
        self.finish_many(&[(keys, actual)]).await
    }

    /// Settles every one of `settlements` (their keys, and the actual cost
    /// and tokens, or `None` to release) in one call. On a cluster their
    /// keys must all be in one slot: one settlement at a time there.
    pub async fn finish_many(&self, settlements: &[(&Keys, Option<(i64, i64)>)]) -> Result<(), String> {
        let mut args = Vec::with_capacity(3 + 9 * settlements.len());
        args.extend([Arg::Str("EVALSHA"), Arg::Str(&self.finish.hash), Arg::uint(6 * settlements.len() as u64)]);
        for (keys, _) in settlements {
            let (ks, kt) = if keys.key_spend.is_empty() {
                (&keys.spend, &keys.spend)
            } else {
                (&keys.key_spend, &keys.key_tokens)
            };
            args.extend([&keys.spend, &keys.requests, &keys.tokens, &keys.reservation, ks, kt].map(|k| Arg::Str(k)));
        }
        for (_, actual) in settlements {
            let (cost, tokens) = actual.unwrap_or((0, 0));
            args.extend([Arg::Int(i64::from(actual.is_none())), Arg::Int(cost), Arg::Int(tokens)]);
        }
        let conn = self.conn();
        // Off the request path: allow more time than an admission.
        let bound = self.timeout.max(Duration::from_millis(500));
        match tokio::time::timeout(bound, conn.call::<i64>(&self.finish, &args)).await {
            Ok(Ok(_)) => {
                self.answered();
                Ok(())
            }
            Ok(Err(e)) => Err(self.failed("settle", &e.to_string())),
            Err(_) => Err(self.failed("settle", "timed out")),
        }
    }

    /// (spend, requests, tokens) of the current period, in one MGET.
    pub async fn counters(&self, keys: &Keys) -> Result<(i64, i64, i64), String> {
        let v = self.mget(&[&keys.spend, &keys.requests, &keys.tokens]).await?;
        Ok((v[0], v[1], v[2]))
    }

    /// (spend, tokens) of a key's current period, in one MGET.
    pub async fn key_counters(&self, keys: &Keys) -> Result<(i64, i64), String> {
        let v = self.mget(&[&keys.key_spend, &keys.key_tokens]).await?;
        Ok((v[0], v[1]))
    }

    /// The counters at `keys`, 0 where absent; always `keys.len()` values.
    async fn mget(&self, keys: &[&str]) -> Result<Vec<i64>, String> {
        let conn = self.conn();
        let args: Vec<Arg<'_>> = std::iter::once(Arg::Str("MGET")).chain(keys.iter().map(|k| Arg::Str(k))).collect();
        let values: Vec<Option<i64>> = match tokio::time::timeout(Duration::from_millis(500), conn.query(&args)).await {
            Ok(Ok(v)) => {
                self.answered();
                v
            }
            Ok(Err(e)) => return Err(self.failed("usage", &e.to_string())),
            Err(_) => return Err(self.failed("usage", "timed out")),
        };
        Ok((0..keys.len()).map(|i| values.get(i).copied().flatten().unwrap_or(0)).collect())
    }

    /// Pings every second; flips the health flag and logs transitions.
    pub async fn run_health(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        loop {
            let ok = self.ping(Duration::from_millis(250)).await;
            match ok {
                Ok(()) => {
                    self.answered();
                    if !self.is_healthy() {
                        self.load_scripts().await;
                    }
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("Redis connection healthy: shared limits enforced");
                    }
                }
                Err(e) => {
                    let _ = self.failed("ping", &e);
                    self.reconnect();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PING_EVERY) => {}
            }
        }
    }
}

/// A lazy connection: it connects on first use. `timeout` is the request
/// path's bound (`REDIS_TIMEOUT_MS`).
fn connection(source: &Source, timeout: Duration) -> Result<Conn, String> {
    match source {
        Source::Single(info) => resp::Connection::lazy(info, Duration::from_millis(500)).map(Conn::Single),
        Source::Cluster(client) => {
            // The client's own response timeout stays above every bound the
            // router sets (a WAIT is answered by the server at `timeout`):
            // a call the router has given up on is not a broken connection.
            let config = ClusterConfig::new()
                .set_connection_timeout(Duration::from_millis(500))
                .set_response_timeout(timeout + Duration::from_secs(1));
            Ok(Conn::Cluster(client.get_pending_async_connection_with_config(config)))
        }
    }
}

impl Healthy for RedisLimits {
    fn is_healthy(&self) -> bool {
        RedisLimits::is_healthy(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_prints_without_its_urls() {
        let single = RedisTarget::Single("redis://:s3cret@redis.internal:6379".into());
        assert_eq!(format!("{single:?}"), "Single(<redacted>)");
        let cluster = RedisTarget::Cluster {
            urls: vec!["redis://:s3cret@a:6379".into(), "redis://:s3cret@b:6379".into()],
            replica_acks: 1,
        };
        assert_eq!(format!("{cluster:?}"), "Cluster { seed_nodes: 2, replica_acks: 1 }");
    }
}
