//! The shared audit store on PostgreSQL (`AUDIT_DATABASE_URL`): every replica
//! writes its records there and any replica answers a lookup.
//!
//! - **Writes** are drained from this replica's audit journal, as usage is
//!   drained to Kafka: one multi-row `INSERT … SELECT FROM unnest(…) ON
//!   CONFLICT DO NOTHING` per batch (up to [`BATCH`] records, as many as have
//!   queued while the previous insert ran), then acknowledged in the journal.
//!   A record written twice (a restart before the journal's watermark was
//!   written down) is the same row: the conflict drops it.
//! - **PostgreSQL down**: the drainer retries with backoff; records wait in
//!   the journal (on disk, so a restart loses none), requests are served as
//!   usual, readiness reports `audit_store: unhealthy`, and lookups answer
//!   503 `audit_store_unavailable` rather than a 404 they cannot vouch for.
//! - **Read your writes**: a lookup first waits (up to [`LOOKUP_WAIT`]) until
//!   everything this replica journaled before it is in the database.
//! - **Schema**: created and migrated at start-up under a transaction-scoped
//!   advisory lock, so that replicas starting together apply each migration
//!   once; versions are in `audit_schema_migrations`.
//! - **Retention**: `audit_records` is partitioned by day (UTC) of
//!   `finished_at`; partitions are created ahead (today and the next two
//!   days, and any day a record needs) and dropped whole once they end before
//!   the retention cut-off. No row-by-row deletes.
//! - **TLS**: `sslmode=require` in the URL connects over TLS (rustls), the
//!   server's certificate verified against the web PKI roots and
//!   `AUDIT_DATABASE_CA_FILE`; any other `sslmode` connects in plain TCP.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, NoTls, TlsConnect};
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::{AuditError, JournalKeys, OnWritten, unix_ms};
use crate::metrics::Metrics;
use crate::util::Backoff;
use crate::wal::Wal;

/// The most records in one insert.
pub const BATCH: usize = 2000;
/// How long a lookup waits for this replica's journal to reach the database.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle drainer checks the database this often (readiness).
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const CURSOR_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The advisory lock key for schema changes (migrations and partitions):
/// "api-rout" in ASCII.
const SCHEMA_LOCK: i64 = 0x6170_692d_726f_7574;
/// Partitions created ahead of time, from today.
const DAYS_AHEAD: i64 = 3;
const DAY_MS: u64 = 86_400_000;

/// The schema, by version. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "audit_records, partitioned by day of finished_at",
    "CREATE TABLE audit_records (
        request_id      text        NOT NULL,
        organization_id text        NOT NULL,
        finished_at     timestamptz NOT NULL,
        record          jsonb       NOT NULL,
        PRIMARY KEY (request_id, organization_id, finished_at)
    ) PARTITION BY RANGE (finished_at)",
)];

const INSERT: &str = "INSERT INTO audit_records (request_id, organization_id, finished_at, record)
    SELECT r, o, to_timestamp(f / 1000.0), j::jsonb
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS t(r, o, f, j)
    ON CONFLICT DO NOTHING";

/// Parses and checks `AUDIT_DATABASE_URL` (`postgres://user@host:5432/db`,
/// or libpq's `key=value` form).
pub fn parse_url(url: &str) -> Result<Config, String> {
    let mut config: Config = url.parse().map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("no host in the connection string".into());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("api-router");
    }
    Ok(config)
}

pub struct PgAudit {
    config: Config,
    /// With `sslmode=require`: the TLS client configuration.
    tls: Option<Arc<rustls::ClientConfig>>,
    wal: Arc<Mutex<Wal>>,
    metrics: Metrics,
    /// Every journal sequence number below this is in the database.
    drained: watch::Sender<u64>,
    /// New records in the journal.
    wake: Notify,
    healthy: AtomicBool,
    schema_ready: AtomicBool,
    /// The connection lookups use; replaced when it fails.
    reader: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl PgAudit {
    pub(super) fn new(
        config: Config,
        tls: Option<Arc<rustls::ClientConfig>>,
        metrics: Metrics,
        wal: Arc<Mutex<Wal>>,
    ) -> (Arc<Self>, OnWritten) {
        let (watermark, pending) = {
            let w = wal.lock().unwrap_or_else(|p| p.into_inner());
            (w.watermark(), w.pending())
        };
        metrics.audit_pending.set(pending as i64);
        let me = Arc::new(Self {
            config,
            tls,
            wal,
            metrics: metrics.clone(),
            drained: watch::Sender::new(watermark),
            wake: Notify::new(),
            healthy: AtomicBool::new(false),
            schema_ready: AtomicBool::new(false),
            reader: tokio::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&me);
        let on_written: OnWritten = Box::new(move |pending, _| {
            metrics.audit_pending.set(pending as i64);
            if let Some(me) = weak.upgrade() {
                me.wake.notify_one();
            }
        });
        (me, on_written)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn set_healthy(&self, ok: bool, error: Option<&str>) {
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        match (was, ok) {
            (false, true) => tracing::info!("audit store (PostgreSQL) reachable: audit records written"),
            (true, false) => tracing::error!(
                error = error.unwrap_or(""),
                "audit store (PostgreSQL) unreachable: audit records wait in the journal"
            ),
            _ => {}
        }
    }

    async fn connect(&self) -> Result<Client, String> {
        let connected = match &self.tls {
            Some(tls) => connect_with(&self.config, RustlsConnect(tls.clone())).await,
            None => connect_with(&self.config, NoTls).await,
        };
        connected.map_err(|e| format!("cannot connect to PostgreSQL: {}", message(&e)))
    }

    /// The lookup connection, connecting if there is none (or it broke).
    async fn reader(&self) -> Result<Arc<Client>, String> {
        let mut guard = self.reader.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.connect().await?);
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Waits until everything journaled so far is in the database.
    pub(super) async fn flush(&self) {
        let target = self.journal_end();
        let mut rx = self.drained.subscribe();
        let _ = rx.wait_for(|d| *d >= target).await;
        self.persist_cursor().await;
    }

    fn journal_end(&self) -> u64 {
        self.wal.lock().unwrap_or_else(|p| p.into_inner()).next_seq()
    }

    async fn persist_cursor(&self) {
        if let Err(e) = crate::wal::persist_cursor_async(&self.wal).await {
            tracing::warn!(error = %e, "cannot write the audit journal's watermark");
        }
    }

    pub(super) async fn get(&self, request_id: &str, org: Option<&str>) -> Result<Option<Vec<u8>>, AuditError> {
        // Everything this replica answered before the lookup was journaled
        // before it: wait for that to reach the database.
        let target = self.journal_end();
        let mut rx = self.drained.subscribe();
        let caught_up = tokio::time::timeout(LOOKUP_WAIT, rx.wait_for(|d| *d >= target)).await.is_ok_and(|r| r.is_ok());
        let unavailable = |e: String| AuditError::Unavailable(e);
        let client = self.reader().await.map_err(unavailable)?;
        let query = async {
            match org {
                Some(org) => {
                    client
                        .query_opt(
                            "SELECT record::text FROM audit_records WHERE request_id = $1 AND organization_id = $2 \
                             ORDER BY finished_at DESC LIMIT 1",
                            &[&request_id, &org],
                        )
                        .await
                }
                None => {
                    client
                        .query_opt(
                            "SELECT record::text FROM audit_records WHERE request_id = $1 \
                             ORDER BY finished_at DESC LIMIT 1",
                            &[&request_id],
                        )
                        .await
                }
            }
        };
        let row = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Ok(Ok(row)) => row,
            failed => {
                *self.reader.lock().await = None;
                let why = match failed {
                    Ok(Err(e)) => message(&e),
                    _ => format!("no answer within {QUERY_TIMEOUT:?}"),
                };
                return Err(unavailable(why));
            }
        };
        match row {
            Some(row) => {
                let json: String = row.try_get(0).map_err(|e| AuditError::Storage(e.to_string()))?;
                Ok(Some(json.into_bytes()))
            }
            None if caught_up => Ok(None),
            None => Err(unavailable("records this replica served are still on their way to PostgreSQL".into())),
        }
    }

    /// Drops the daily partitions that end before `cutoff` and creates the
    /// coming days'. Returns how many partitions were dropped.
    pub(super) async fn prune(&self, cutoff: SystemTime) -> Result<usize, AuditError> {
        let mut client = self.connect().await.map_err(AuditError::Unavailable)?;
        self.ensure_schema(&mut client).await?;
        let today = (unix_ms(SystemTime::now()) / DAY_MS) as i64;
        ensure_partitions(&mut client, (today..today + DAYS_AHEAD).collect()).await?;
        let rows = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent
                  WHERE p.relname = 'audit_records' AND p.relnamespace = to_regnamespace(current_schema())::oid",
                &[],
            )
            .await
            .map_err(pg)?;
        let cutoff_day = (unix_ms(cutoff) / DAY_MS) as i64;
        let old: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            // A partition holds its day: it ends before the cut-off when
            // the next day starts at or before it (day + 1 <= cutoff_day).
            .filter(|name| day_of_partition(name).is_some_and(|day| day < cutoff_day))
            .collect();
        for name in &old {
            let txn = client.transaction().await.map_err(pg)?;
            txn.batch_execute(&format!(
                "SET LOCAL lock_timeout = '5s'; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); DROP TABLE IF EXISTS {name}"
            ))
            .await
            .map_err(pg)?;
            txn.commit().await.map_err(pg)?;
            tracing::info!(partition = %name, "audit retention dropped a partition");
        }
        Ok(old.len())
    }

    /// Creates or migrates the schema, once per process.
    async fn ensure_schema(&self, client: &mut Client) -> Result<(), AuditError> {
        if self.schema_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        migrate(client).await?;
        self.schema_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Drains the journal into the database until cancelled.
    pub(super) async fn run_drainer(self: Arc<Self>, cancel: CancellationToken) {
        let mut client: Option<Client> = None;
        let mut partitions: HashSet<i64> = HashSet::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let mut cursor = *self.drained.borrow();
        let mut cursor_written = Instant::now();
        let mut checked = Instant::now();
        while !cancel.is_cancelled() {
            if cursor_written.elapsed() >= CURSOR_EVERY {
                self.persist_cursor().await;
                cursor_written = Instant::now();
            }
            let c = match client.as_mut().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        client = None;
                        self.failed(&e, &cancel, &mut backoff).await;
                        continue;
                    }
                },
            };
            if let Err(e) = self.ensure_schema(c).await {
                client = None;
                self.failed(&e.to_string(), &cancel, &mut backoff).await;
                continue;
            }
            let wal = self.wal.clone();
            let from = cursor;
            let batch = match tokio::task::spawn_blocking(move || {
                wal.lock().unwrap_or_else(|p| p.into_inner()).read_from(from, BATCH)
            })
            .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the audit journal");
                    self.failed(&e.to_string(), &cancel, &mut backoff).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit journal read task failed");
                    continue;
                }
            };
            let Some(last) = batch.last().map(|e| e.seq) else {
                // Idle: check the database now and then, so that readiness
                // tells the truth without traffic.
                if checked.elapsed() >= HEALTH_EVERY {
                    checked = Instant::now();
                    match tokio::time::timeout(QUERY_TIMEOUT, c.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => self.set_healthy(true, None),
                        failed => {
                            client = None;
                            let e = match failed {
                                Ok(Err(e)) => message(&e),
                                _ => "no answer".into(),
                            };
                            self.failed(&e, &cancel, &mut backoff).await;
                            continue;
                        }
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(HEALTH_EVERY) => {}
                }
                continue;
            };
            let rows = Rows::of(&batch);
            let days: HashSet<i64> = rows.finished_ms.iter().map(|ms| *ms / DAY_MS as i64).collect();
            let missing: Vec<i64> = days.difference(&partitions).copied().collect();
            let written = async {
                if !missing.is_empty() {
                    ensure_partitions(c, missing.clone()).await?;
                }
                c.execute(INSERT, &[&rows.request_ids, &rows.organization_ids, &rows.finished_ms, &rows.json])
                    .await
                    .map_err(pg)
            };
            match tokio::time::timeout(QUERY_TIMEOUT, written).await {
                Ok(Ok(_)) => {
                    partitions.extend(missing);
                    let pending = {
                        let mut w = self.wal.lock().unwrap_or_else(|p| p.into_inner());
                        for e in &batch {
                            w.ack(e.seq);
                        }
                        w.pending()
                    };
                    cursor = last + 1;
                    self.drained.send_replace(cursor);
                    self.metrics.audit_records.with_label_values(&["written"]).inc_by(batch.len() as u64);
                    self.metrics.audit_pending.set(pending as i64);
                    self.set_healthy(true, None);
                    backoff.reset();
                    checked = Instant::now();
                }
                failed => {
                    // The records stay in the journal and are tried again.
                    let e = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {QUERY_TIMEOUT:?}"),
                    };
                    self.metrics.audit_records.with_label_values(&["error"]).inc_by(batch.len() as u64);
                    client = None;
                    partitions.clear();
                    self.failed(&e, &cancel, &mut backoff).await;
                }
            }
        }
        self.persist_cursor().await;
    }

    /// A failed round: unhealthy, logged, and a wait before the next.
    async fn failed(&self, e: &str, cancel: &CancellationToken, backoff: &mut Backoff) {
        self.set_healthy(false, Some(e));
        tracing::debug!(error = %e, "audit store write failed; will retry");
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn pg(e: tokio_postgres::Error) -> AuditError {
    AuditError::Storage(message(&e))
}

/// The server's own message and SQLSTATE when there is one (the error's
/// `Display` says only "db error").
fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// One batch, as the insert's four arrays.
struct Rows {
    request_ids: Vec<String>,
    organization_ids: Vec<String>,
    finished_ms: Vec<i64>,
    json: Vec<String>,
}

impl Rows {
    fn of(batch: &[crate::wal::Entry]) -> Self {
        let mut rows = Rows {
            request_ids: Vec::with_capacity(batch.len()),
            organization_ids: Vec::with_capacity(batch.len()),
            finished_ms: Vec::with_capacity(batch.len()),
            json: Vec::with_capacity(batch.len()),
        };
        for e in batch {
            // An entry that is not a record (it cannot be: its crc matched)
            // is skipped, and acknowledged with the rest.
            let Some(keys) = JournalKeys::of(&e.payload) else { continue };
            rows.request_ids.push(String::from_utf8_lossy(&e.key).into_owned());
            rows.organization_ids.push(keys.organization_id);
            rows.finished_ms.push(keys.finished_ms as i64);
            rows.json.push(jsonb_text(&e.payload));
        }
        rows
    }
}

/// The record JSON as `jsonb` accepts it: `jsonb` has no NUL character, so
/// an escaped one (say, in a backend's error text) becomes U+FFFD.
fn jsonb_text(json: &[u8]) -> String {
    let text = String::from_utf8_lossy(json);
    if text.contains("\\u0000") { text.replace("\\u0000", "\\ufffd") } else { text.into_owned() }
}

/// Applies the migrations not yet applied, under the schema lock.
async fn migrate(client: &mut Client) -> Result<(), AuditError> {
    let txn = client.transaction().await.map_err(pg)?;
    txn.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({SCHEMA_LOCK});
         CREATE TABLE IF NOT EXISTS audit_schema_migrations (
             version     integer PRIMARY KEY,
             description text        NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )"
    ))
    .await
    .map_err(pg)?;
    let current: i32 = txn
        .query_one("SELECT coalesce(max(version), 0) FROM audit_schema_migrations", &[])
        .await
        .map_err(pg)?
        .try_get(0)
        .map_err(pg)?;
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > latest {
        tracing::warn!(
            database = current,
            known = latest,
            "the audit schema is newer than this router knows (a newer replica migrated it); using it as it is"
        );
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        txn.batch_execute(sql).await.map_err(pg)?;
        txn.execute(
            "INSERT INTO audit_schema_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await
        .map_err(pg)?;
        tracing::info!(version, description, "audit schema migrated");
    }
    txn.commit().await.map_err(pg)
}

/// The partition of day `day` (days since 1970-01-01, UTC).
fn partition_name(day: i64) -> String {
    let (y, m, d) = crate::limits::period::civil_from_days(day);
    format!("audit_records_d{y:04}{m:02}{d:02}")
}

fn day_of_partition(name: &str) -> Option<i64> {
    let date = name.strip_prefix("audit_records_d")?;
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d) = (date[..4].parse().ok()?, date[4..6].parse().ok()?, date[6..].parse().ok()?);
    Some(crate::limits::period::days_from_civil(y, m, d))
}

/// Creates the partitions of `days` that do not exist, under the schema lock.
async fn ensure_partitions(client: &mut Client, days: Vec<i64>) -> Result<(), AuditError> {
    let mut sql = format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK});");
    for day in days {
        let bound = |day: i64| {
            let (y, m, d) = crate::limits::period::civil_from_days(day);
            format!("'{y:04}-{m:02}-{d:02} 00:00:00+00'")
        };
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF audit_records FOR VALUES FROM ({}) TO ({});",
            partition_name(day),
            bound(day),
            bound(day + 1)
        ));
    }
    let txn = client.transaction().await.map_err(pg)?;
    txn.batch_execute(&sql).await.map_err(pg)?;
    txn.commit().await.map_err(pg)
}

async fn connect_with<T>(config: &Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<tokio_postgres::Socket> + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Whether the URL asks for TLS (`sslmode=require`); any other mode is
/// plain TCP.
pub fn wants_tls(config: &Config) -> bool {
    config.get_ssl_mode() == SslMode::Require
}

/// Plain TCP for every mode but `require`.
pub(super) fn plain(mut config: Config) -> Config {
    if !wants_tls(&config) {
        config.ssl_mode(SslMode::Disable);
    }
    config
}

/// tokio-postgres over rustls.
#[derive(Clone)]
struct RustlsConnect(Arc<rustls::ClientConfig>);

struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
}

impl MakeTlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = TlsStream;
    type TlsConnect = RustlsConnectOne;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnectOne, std::io::Error> {
        let name = rustls_pki_types::ServerName::try_from(domain.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne { config: self.0.clone(), name })
    }
}

impl TlsConnect<tokio_postgres::Socket> for RustlsConnectOne {
    type Stream = TlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, std::io::Error>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(TlsStream(stream))
        })
    }
}

struct TlsStream(tokio_rustls::client::TlsStream<tokio_postgres::Socket>);

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_to_their_day() {
        for day in [0, 20_000, 20_785, 20_786] {
            assert_eq!(day_of_partition(&partition_name(day)), Some(day));
        }
        assert_eq!(partition_name(20_785), "audit_records_d20261128");
        assert_eq!(day_of_partition("audit_records_d2026112"), None);
        assert_eq!(day_of_partition("audit_records_default"), None);
        assert_eq!(day_of_partition("other_d20261128"), None);
    }

    #[test]
    fn urls_are_checked_and_tls_only_when_required() {
        let c = parse_url("postgres://router@db.internal:5432/audit").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(!wants_tls(&c), "the default mode (prefer) is plain TCP");
        assert_eq!(plain(c).get_ssl_mode(), SslMode::Disable);
        assert!(wants_tls(&parse_url("postgres://router@db/audit?sslmode=require").unwrap()));
        assert!(parse_url("not a url at all =").is_err());
        assert!(parse_url("mysql://x@y/z").is_err());
    }

    #[test]
    fn escaped_nul_characters_become_replacement_characters() {
        assert_eq!(jsonb_text(br#"{"error":"a\u0000b"}"#), r#"{"error":"a\ufffdb"}"#);
        assert_eq!(jsonb_text(br#"{"ok":1}"#), r#"{"ok":1}"#);
    }
}
