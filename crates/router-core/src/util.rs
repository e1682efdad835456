//! Small helpers shared by every mechanism, each in one place: time
//! formatting, identifier rules, atomic file writes, and retry backoff.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serializer;

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

/// A record's JSON, written into a buffer sized for a whole record (audit
/// and usage records are a few hundred bytes: `serde_json::to_vec` would
/// grow its 128-byte buffer several times per request).
pub fn record_json<T: serde::Serialize + ?Sized>(record: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, record)?;
    Ok(out)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Seconds since a unix-ms instant (0 for `None`).
pub fn age_seconds(since_ms: Option<u64>) -> f64 {
    let now_ms = now_ms();
    since_ms.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0)
}

/// Identifiers (backend and organization ids) are short and printable, so
/// they are safe as metric labels and etcd key segments.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The message for an id that breaks [`valid_id`]'s rules.
pub const ID_RULES: &str = "1-128 letters, digits, '-', '_', '.' or ':'";

/// Writes `bytes` to `path` so that a crash leaves the old file or the new
/// one, never a mix: write a temporary file, fsync, rename, fsync the dir.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(Ok(d)) = path.parent().map(std::fs::File::open) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Exponential backoff with jitter: each delay doubles up to a cap, and each
/// wait is drawn from the upper half of the current delay, so that replicas
/// that failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    current: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, current: initial, max }
    }

    /// The next wait; doubles the delay for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let ms = self.current.as_millis() as u64;
        self.current = (self.current * 2).min(self.max);
        Duration::from_millis(fastrand::u64(ms / 2..=ms.max(1)))
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        for (w, cap) in waits.iter().zip([100, 200, 400, 400, 400]) {
            assert!((cap / 2..=cap).contains(w), "{waits:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn id_rules() {
        assert!(valid_id("org-a.1:x_y"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
    }
}
