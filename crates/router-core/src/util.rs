//! Small helpers shared by every mechanism, each in one place: time
//! formatting, identifier rules, atomic file writes, retry backoff, and the
//! hasher of maps keyed by SHA-256 digests.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serializer;

/// A map keyed by SHA-256 digests (the API key tables).
pub type DigestMap<V> = std::collections::HashMap<[u8; 32], V, std::hash::BuildHasherDefault<DigestHasher>>;

/// Hashes a SHA-256 digest by its first eight bytes: they are already
/// uniform, so SipHash over all 32 (about 270 instructions a lookup, one
/// lookup a request: `docs/benchmarks.md`) adds nothing. A presented key
/// chooses only which digest is looked up, never what the map holds, so
/// no one can crowd a bucket.
#[derive(Default)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length (`write_usize`), then its bytes.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _: usize) {}
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    String::from_utf8_lossy(&rfc3339_millis(t)).into_owned()
}

pub fn serialize_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(std::str::from_utf8(&rfc3339_millis(*t)).map_err(serde::ser::Error::custom)?)
}

/// `t` as `humantime::format_rfc3339_millis` writes it
/// (`2026-12-02T07:58:12.123Z`), straight into a buffer: audit and usage
/// records carry three times each, and the formatting machinery cost about
/// 300 instructions more a time (`docs/benchmarks.md`). Clamped to years
/// 1970 to 9999 (where humantime would panic or fail).
pub(crate) fn rfc3339_millis(t: SystemTime) -> [u8; 24] {
    const LAST_MS_OF_9999: Duration = Duration::from_millis(253_402_300_799_999);
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).min(LAST_MS_OF_9999);
    let secs = since.as_secs();
    // The times of one request, and of the requests around it, mostly fall
    // in the same second: its date and time are kept per thread, and only
    // the milliseconds written.
    thread_local!(static LAST: std::cell::Cell<(u64, [u8; 24])> = const { std::cell::Cell::new((u64::MAX, [0; 24])) });
    let (last_secs, mut out) = LAST.get();
    if last_secs != secs {
        out = date_time(secs);
        LAST.set((secs, out));
    }
    let ms = since.subsec_millis();
    out[20] = b'0' + (ms / 100) as u8;
    out[21] = b'0' + (ms / 10 % 10) as u8;
    out[22] = b'0' + (ms % 10) as u8;
    out
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS.000Z`.
fn date_time(secs: u64) -> [u8; 24] {
    // Days to a civil date (H. Hinnant's `civil_from_days`, for days >= 0).
    let days = secs / 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let rem = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    out
}

pub fn serialize_opt_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_time(t, s),
        None => s.serialize_none(),
    }
}

/// Polls `futures` concurrently in the calling task until all are done;
/// their outputs in order. (For a few dozen at once: each wake polls every
/// one still pending.)
pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Watches a spawned task: if it panics, logs an error naming it and runs
/// `on_panic` (say, marking its component unhealthy). A panicked task is
/// otherwise gone without a word, and what it served stops. The returned
/// handle ends when the task does (callers need not keep it).
pub fn watch_task(
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
    on_panic: impl FnOnce() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(task = name, "background task panicked and stopped; see the panic message above");
            on_panic();
        }
    })
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

    #[tokio::test]
    async fn join_all_runs_the_futures_together_and_keeps_their_order() {
        use std::future::Future;
        use std::pin::Pin;
        // The first waits for what the second sends: one after the other,
        // they would never finish.
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let futures: Vec<Pin<Box<dyn Future<Output = u32>>>> = vec![
            Box::pin(async move { rx.await.unwrap() + 1 }),
            Box::pin(async move {
                tokio::task::yield_now().await;
                tx.send(41).unwrap();
                7
            }),
        ];
        let out = tokio::time::timeout(Duration::from_secs(5), join_all(futures)).await.unwrap();
        assert_eq!(out, vec![42, 7]);
        assert!(join_all(Vec::<std::future::Ready<u8>>::new()).await.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn times_are_written_as_humantime_writes_them(ms in 0u64..253_402_300_800_000, nanos in 0u32..1_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_nanos(u64::from(nanos));
            proptest::prop_assert_eq!(rfc3339(t), humantime::format_rfc3339_millis(t).to_string());
        }
    }

    #[test]
    fn times_in_the_same_second_reuse_its_date_and_write_their_own_milliseconds() {
        let second = UNIX_EPOCH + Duration::from_secs(1_764_662_292);
        for (t, text) in [
            (second + Duration::from_millis(123), "2025-12-02T07:58:12.123Z"),
            (second + Duration::from_millis(987), "2025-12-02T07:58:12.987Z"),
            (second + Duration::from_millis(5), "2025-12-02T07:58:12.005Z"),
            (second + Duration::from_millis(1_040), "2025-12-02T07:58:13.040Z"),
            (second, "2025-12-02T07:58:12.000Z"),
        ] {
            assert_eq!(rfc3339(t), text);
        }
    }

    #[test]
    fn times_outside_four_digit_years_are_clamped_and_serialized_as_text() {
        let end_of_9999 = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        assert_eq!(rfc3339(end_of_9999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(end_of_9999 + Duration::from_secs(86_400)), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        #[derive(serde::Serialize)]
        struct At {
            #[serde(serialize_with = "serialize_time")]
            at: SystemTime,
        }
        let json = serde_json::to_string(&At { at: UNIX_EPOCH + Duration::from_millis(1_500) }).unwrap();
        assert_eq!(json, r#"{"at":"1970-01-01T00:00:01.500Z"}"#);
    }

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
    fn digests_that_share_their_first_eight_bytes_are_told_apart() {
        let mut map = DigestMap::default();
        let (mut a, mut b) = ([7u8; 32], [7u8; 32]);
        a[31] = 1;
        b[31] = 2;
        map.insert(a, "a");
        map.insert(b, "b");
        assert_eq!((map.get(&a), map.get(&b)), (Some(&"a"), Some(&"b")));
        assert_eq!(map.get(&[7u8; 32]), None);
    }

    #[test]
    fn id_rules() {
        assert!(valid_id("org-a.1:x_y"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[tokio::test]
    async fn a_watched_task_that_panics_runs_its_handler_and_one_that_ends_does_not() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let (panicked, ended) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let flag = panicked.clone();
        let watcher = watch_task("test-panics", tokio::spawn(async { panic!("on purpose") }), move || {
            flag.store(true, Ordering::SeqCst)
        });
        watcher.await.unwrap();
        assert!(panicked.load(Ordering::SeqCst), "the handler of a panicked task ran");
        let flag = ended.clone();
        let watcher = watch_task("test-ends", tokio::spawn(async {}), move || flag.store(true, Ordering::SeqCst));
        watcher.await.unwrap();
        assert!(!ended.load(Ordering::SeqCst), "a task that ends normally is not reported");
    }
}
