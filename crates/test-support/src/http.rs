//! An HTTP client for tests: requests, JSON, metrics, and waiting on a
//! condition with a deadline.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The value of one sample line of a Prometheus exposition, e.g.
/// `metric(text, "router_failover_total", &[("backend_id", "b")])`, summed
/// over the series that carry those labels. Panics when no series matches:
/// a missing metric (a typo, a renamed metric, a label never set) must not
/// read as 0. See [`metric_or_zero`] for a counter that may not have counted
/// yet.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_opt(text, name, labels)
        .unwrap_or_else(|| panic!("no series {name}{labels:?} in the exposition (a missing metric is not 0)"))
}

/// Like [`metric`], but 0 when no series matches yet (a counter with labels
/// appears only once it has counted). Panics when `name` is not a metric the
/// router registers, so a misspelled name cannot pass as 0.
pub fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    assert!(registered(name), "{name} is not a metric the router registers (router-core/src/metrics.rs)");
    metric_opt(text, name, labels).unwrap_or(0.0)
}

fn metric_opt(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Whether `name` (or the histogram it is a series of) is registered by
/// the router's metrics module: its names are the string literals there.
pub fn registered(name: &str) -> bool {
    const SOURCE: &str = include_str!("../../router-core/src/metrics.rs");
    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    [name, base].iter().any(|n| SOURCE.contains(&format!("\"{n}\"")))
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
    /// Asserts an error response: status and `error.code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let j = self.json();
        assert_eq!(j["error"]["code"], code, "body: {j}");
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "message: {j}");
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Full<Bytes>>> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http())
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    try_send(method, url, headers, body, Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// [`send`], with the failure to get an answer (refused, reset, no answer
/// within `timeout`) as an `Err` instead of a panic.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
    timeout: Duration,
) -> Result<Resp, String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let request = b.body(Full::new(body.into())).map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client().request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Resp { status: parts.status, headers: parts.headers, body })
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| Err(format!("no answer in {timeout:?}")))
}

pub async fn get_json(url: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = send(Method::GET, url, headers, String::new()).await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET and parse JSON; `None` if nothing answers (a server still starting).
pub async fn try_get_json(url: &str) -> Option<Value> {
    let req = Request::builder().uri(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req)).await.ok()?.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}
