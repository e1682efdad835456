//! Telemetry: Prometheus metrics, structured logging, and time formatting
//! shared by every JSON answer.

pub mod metrics;

use std::time::SystemTime;

use serde::Serializer;

use crate::config::LogFormat;

/// Installs the global `tracing` subscriber: JSON lines (default) or text, to
/// stdout, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => builder.init(),
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn serialize_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

pub fn serialize_opt_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_time(t, s),
        None => s.serialize_none(),
    }
}

/// Seconds since a unix-ms instant (0 for `None`).
pub fn age_seconds(since_ms: Option<u64>) -> f64 {
    let now_ms = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    since_ms.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0)
}
