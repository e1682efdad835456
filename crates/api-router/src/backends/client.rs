//! HTTP dispatch to backends over one pooled keep-alive client, with a
//! per-attempt timeout and a classification of every failure.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why one attempt at a backend failed. Each variant is one `error_type` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptError {
    /// The connection could not be made.
    Connect(String),
    /// No complete answer within the per-attempt timeout.
    Timeout,
    /// The connection broke while sending or reading.
    Io(String),
    /// The backend answered with a status that triggers failover (5xx, 429, 408).
    Status(StatusCode),
}

impl AttemptError {
    /// The low-cardinality label used in metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Timeout => "timeout",
            AttemptError::Io(_) => "io",
            AttemptError::Status(s) if s.is_server_error() => "status_5xx",
            AttemptError::Status(s) if *s == StatusCode::TOO_MANY_REQUESTS => "status_429",
            AttemptError::Status(_) => "status_408",
        }
    }

    /// Whether this failure counts towards ejecting the backend. 429 and 408
    /// say "not now", not "broken": they fail over but do not eject.
    pub fn counts_against_health(&self) -> bool {
        !matches!(self, AttemptError::Status(s) if !s.is_server_error())
    }

    pub const ERROR_TYPES: [&'static str; 6] = ["connect", "timeout", "io", "status_5xx", "status_429", "status_408"];
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "connect error: {e}"),
            AttemptError::Timeout => write!(f, "timed out"),
            AttemptError::Io(e) => write!(f, "connection error: {e}"),
            AttemptError::Status(s) => write!(f, "backend answered {}", s.as_u16()),
        }
    }
}

/// Whether a backend status triggers failover.
pub fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// What one attempt produced.
#[derive(Debug)]
pub enum Answer {
    Full(BackendResponse),
    Stream(StreamStart),
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Full(r) => r.status,
            Answer::Stream(s) => s.status,
        }
    }
}

/// A 2xx streaming answer: its head, its first bytes, and the rest to come.
#[derive(Debug)]
pub struct StreamStart {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub first: Bytes,
    pub rest: hyper::body::Incoming,
}

/// A backend's complete answer.
#[derive(Debug)]
pub struct BackendResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

#[derive(Clone, Debug)]
pub struct BackendClient {
    client: Client<HttpConnector, Full<Bytes>>,
    probes: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    probe_timeout: Duration,
}

impl BackendClient {
    pub fn new(timeout: Duration, probe_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(5))));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector.clone());
        let probes = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Self { client, probes, timeout, probe_timeout }
    }

    /// Sends one attempt. A retryable status comes back as `Err(Status)`, with
    /// the backend's body dropped; any other status is the answer.
    pub async fn send(
        &self,
        uri: &Uri,
        headers: &[(&'static str, &str)],
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<BackendResponse, AttemptError> {
        self.send_with_timeout(uri, headers, auth, body, self.timeout).await
    }

    fn post(
        uri: &Uri,
        headers: &[(&'static str, &str)],
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, AttemptError> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(auth) = auth {
            builder = builder.header(hyper::header::AUTHORIZATION, auth.clone());
        }
        builder.body(Full::new(body)).map_err(|e| AttemptError::Io(e.to_string()))
    }

    fn request_error(e: hyper_util::client::legacy::Error) -> AttemptError {
        if e.is_connect() { AttemptError::Connect(source_text(&e)) } else { AttemptError::Io(source_text(&e)) }
    }

    /// Opens a streaming request. Within the per-attempt timeout it must
    /// answer and, if it answers 2xx, send its first bytes: until then it can
    /// still fail over. Any other answer is collected whole.
    pub async fn open_stream(
        &self,
        uri: &Uri,
        headers: &[(&'static str, &str)],
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Answer, AttemptError> {
        let request = Self::post(uri, headers, auth, body)?;
        let open = async {
            let response = self.client.request(request).await.map_err(Self::request_error)?;
            let (parts, mut body) = response.into_parts();
            if retryable_status(parts.status) {
                return Err(AttemptError::Status(parts.status));
            }
            if !parts.status.is_success() {
                return collect(parts, body).await.map(Answer::Full);
            }
            let content_type = parts.headers.get(CONTENT_TYPE).cloned();
            // The first data frame: after it, the answer belongs to the client.
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(first) = frame.into_data() {
                            if first.is_empty() {
                                continue;
                            }
                            return Ok(Answer::Stream(StreamStart {
                                status: parts.status,
                                content_type,
                                first,
                                rest: body,
                            }));
                        }
                    }
                    Some(Err(e)) => return Err(AttemptError::Io(e.to_string())),
                    None => {
                        return Ok(Answer::Full(BackendResponse {
                            status: parts.status,
                            content_type,
                            body: Bytes::new(),
                        }));
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout, open).await.unwrap_or(Err(AttemptError::Timeout))
    }

    /// `send` with its own timeout (for calls that are not inference).
    pub async fn send_with_timeout(
        &self,
        uri: &Uri,
        headers: &[(&'static str, &str)],
        auth: Option<&HeaderValue>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<BackendResponse, AttemptError> {
        let request = Self::post(uri, headers, auth, body)?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(Self::request_error)?;
            let (parts, body) = response.into_parts();
            if retryable_status(parts.status) {
                return Err(AttemptError::Status(parts.status));
            }
            collect(parts, body).await
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AttemptError::Timeout))
    }

    /// `GET uri`, whatever the status, within `timeout`.
    pub async fn get_with_timeout(&self, uri: &Uri, timeout: Duration) -> Result<BackendResponse, AttemptError> {
        let request = Request::get(uri.clone()).body(Empty::new()).map_err(|e| AttemptError::Io(e.to_string()))?;
        let exchange = async {
            let response = self.probes.request(request).await.map_err(|e| AttemptError::Connect(source_text(&e)))?;
            let (parts, body) = response.into_parts();
            collect(parts, body).await
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AttemptError::Timeout))
    }

    /// An active health check: `GET uri` must answer 2xx within the probe timeout.
    pub async fn probe(&self, uri: &Uri) -> Result<(), String> {
        let request = Request::get(uri.clone()).body(Empty::new()).map_err(|e| e.to_string())?;
        let check = async {
            let response = self.probes.request(request).await.map_err(|e| source_text(&e))?;
            let status = response.status();
            // Drain so the connection can be reused.
            let _ = response.into_body().collect().await;
            if status.is_success() { Ok(()) } else { Err(format!("health check answered {}", status.as_u16())) }
        };
        tokio::time::timeout(self.probe_timeout, check)
            .await
            .unwrap_or_else(|_| Err("health check timed out".to_string()))
    }
}

/// Reads a whole answer.
async fn collect(
    parts: hyper::http::response::Parts,
    body: hyper::body::Incoming,
) -> Result<BackendResponse, AttemptError> {
    let body = body.collect().await.map_err(|e| AttemptError::Io(e.to_string()))?.to_bytes();
    Ok(BackendResponse { status: parts.status, content_type: parts.headers.get(CONTENT_TYPE).cloned(), body })
}

/// The innermost cause, which is what an operator needs ("Connection refused").
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_failures() {
        assert!(retryable_status(StatusCode::BAD_GATEWAY));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!retryable_status(StatusCode::BAD_REQUEST));
        assert!(!retryable_status(StatusCode::NOT_FOUND));
        assert_eq!(AttemptError::Status(StatusCode::SERVICE_UNAVAILABLE).error_type(), "status_5xx");
        assert!(!AttemptError::Status(StatusCode::TOO_MANY_REQUESTS).counts_against_health());
        assert!(AttemptError::Timeout.counts_against_health());
        assert!(AttemptError::Connect("refused".into()).counts_against_health());
    }

    #[tokio::test]
    async fn connect_error_is_classified_as_connect() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = BackendClient::new(Duration::from_secs(2), Duration::from_secs(1));
        let uri: Uri = format!("http://127.0.0.1:{port}/v1/inference").parse().unwrap();
        let err = client.send(&uri, &[], None, Bytes::from_static(b"{}")).await.unwrap_err();
        assert_eq!(err.error_type(), "connect", "{err}");
        assert!(client.probe(&uri).await.is_err());
    }
}
