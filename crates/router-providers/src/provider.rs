//! The provider trait, the backend kinds that implement it, and the target:
//! one configured backend as its provider sees it.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::Full;

use crate::operation::Operation;
use crate::sse::StreamFacts;
use crate::usage::Usage;

/// The request as a provider sees it: what was asked, and the client's body.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamRequest<'a> {
    /// The client's headers, for the ones a kind forwards (`anthropic-beta`).
    pub headers: &'a http::HeaderMap,
    pub op: Operation,
    /// The model the client named (before any mapping).
    pub model: &'a str,
    pub stream: bool,
    /// The body as the client sent it.
    pub body: &'a Bytes,
    /// The same body parsed, when the door parsed it whole (the OpenAI door
    /// does; the native door reads two fields only).
    pub json: Option<&'a serde_json::Value>,
}

/// Everything that differs between kinds of backend. Implementations are
/// stateless values (one `static` each, listed in [`crate::KINDS`]); what
/// differs between backends of one kind is in their [`Target`].
pub trait Provider: Send + Sync + 'static {
    /// The kind's name in configuration.
    fn name(&self) -> &'static str;

    /// The upstream path of `op`, when it does not depend on the request;
    /// `None` when this kind cannot serve `op`, or computes its URI
    /// ([`Provider::uri`]).
    fn path(&self, op: Operation) -> Option<&'static str>;

    /// Whether this kind serves `op` directly (in its own shape).
    fn serves(&self, op: Operation) -> bool {
        self.path(op).is_some()
    }

    /// The upstream URI of `op` for a kind whose paths depend on the
    /// request (Azure deployments); the others use [`Provider::path`].
    fn uri(&self, _target: &Target, _op: Operation, _model: &str) -> Option<Uri> {
        None
    }

    /// Adds the headers of this kind beyond the credential
    /// (`anthropic-version`).
    fn headers(&self, _request: &UpstreamRequest<'_>, _headers: &mut HeaderMap) {}

    /// The credential header for `secret`: `Authorization: Bearer` unless the
    /// kind wants another.
    fn credential_header(&self, secret: &str) -> Result<(HeaderName, HeaderValue), String> {
        let mut v = HeaderValue::from_str(&format!("Bearer {secret}"))
            .map_err(|_| "the credential is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok((AUTHORIZATION, v))
    }

    /// The body of one attempt: the client's, rewritten for this backend
    /// (model mapping, asking for usage in a stream). Returns the client's
    /// bytes unchanged when nothing needs rewriting.
    fn body(&self, request: &UpstreamRequest<'_>, target: &Target) -> Bytes;

    /// Usage in a complete answer to `op`.
    fn usage(&self, op: Operation, body: &[u8]) -> Option<Usage>;

    /// Reads one server-sent event of a streamed answer (`event` is the
    /// `event:` field, if any; `data` one `data:` line): records usage and
    /// whether the backend reported an error inside the 200.
    fn stream_event(&self, op: Operation, event: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts);

    /// The path the health monitor probes with `GET`; 2xx is healthy.
    fn health_path(&self) -> &'static str {
        "/health"
    }
}

/// A backend kind: a handle on its provider, compared and shown by name.
#[derive(Clone, Copy)]
pub struct Kind(&'static dyn Provider);

impl Kind {
    pub fn by_name(name: &str) -> Option<Kind> {
        crate::KINDS.iter().find(|p| p.name() == name).map(|p| Kind(*p))
    }

    /// Like [`Kind::by_name`], with an error that lists the known kinds.
    pub fn parse(name: &str) -> Result<Kind, String> {
        Kind::by_name(name).ok_or_else(|| {
            let known: Vec<&str> = crate::KINDS.iter().map(|p| p.name()).collect();
            format!("unknown backend kind {name:?}: use one of {}", known.join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    pub fn provider(self) -> &'static dyn Provider {
        self.0
    }

    /// Whether this kind can serve `op` in its own shape.
    #[inline]
    pub fn serves(self, op: Operation) -> bool {
        self.0.serves(op)
    }

    /// Splits `kind+url` (or a bare `url`, of the default kind), as in
    /// `BACKEND_ENDPOINTS`: `openai+https://api.openai.com`.
    pub fn split_endpoint(s: &str) -> Result<(Kind, &str), String> {
        let s = s.trim();
        match s.split_once("://").and_then(|(scheme, _)| scheme.split_once('+')) {
            Some((kind, _)) => Ok((Kind::parse(kind)?, &s[kind.len() + 1..])),
            None => Ok((Kind::default(), s)),
        }
    }
}

impl Default for Kind {
    fn default() -> Self {
        Kind(crate::KINDS[0])
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Kind {}

impl std::hash::Hash for Kind {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Kind::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// One configured backend as its provider sees it: where it is, how to
/// authenticate, its model names. Built once per snapshot; the URIs of the
/// operations its kind serves are parsed here, not per request.
pub struct Target {
    pub kind: Kind,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com`.
    pub endpoint: String,
    /// Model aliases: the name clients use → the backend's own name (an
    /// Azure deployment).
    pub models: BTreeMap<String, String>,
    /// The credential header, marked sensitive (never logged).
    pub credential: Option<(HeaderName, HeaderValue)>,
    /// The API version a kind sends (Azure's `api-version`).
    pub api_version: Option<String>,
    uris: [Option<Uri>; Operation::ALL.len()],
    pub health_uri: Uri,
    /// The `Host` header of a plain `http://` backend, made once (the
    /// transport would otherwise make it per request); `https://` requests
    /// get theirs from hyper-util's client (HTTP/1.1) or as `:authority` (h2).
    host: Option<HeaderValue>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("models", &self.models)
            .field("credential", &self.credential.as_ref().map(|(name, _)| name))
            .finish()
    }
}

/// `base` + `path` as a URI. `base` was checked to be an absolute URL without
/// a trailing slash and `path` is absolute, so this parses; the default
/// (which fails to connect) would only show a bug.
pub fn join(base: &str, path: &str) -> Uri {
    format!("{base}{path}").parse().unwrap_or_default()
}

impl Target {
    /// `credential` is the header from [`Provider::credential_header`].
    pub fn new(
        kind: Kind,
        endpoint: &str,
        models: BTreeMap<String, String>,
        credential: Option<(HeaderName, HeaderValue)>,
    ) -> Self {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let provider = kind.provider();
        let uris = Operation::ALL.map(|op| provider.path(op).map(|p| join(&endpoint, p)));
        let health_uri = join(&endpoint, provider.health_path());
        let host = (health_uri.scheme() == Some(&http::uri::Scheme::HTTP))
            .then(|| health_uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()))
            .flatten();
        Self { kind, endpoint, models, credential, api_version: None, uris, health_uri, host }
    }

    /// Per-backend settings: an API version (Azure) and a health path other
    /// than the kind's.
    pub fn with_settings(mut self, api_version: Option<String>, health_path: Option<&str>) -> Self {
        self.api_version = api_version;
        if let Some(path) = health_path {
            self.health_uri = join(&self.endpoint, path);
        }
        self
    }

    /// The upstream URI of `op` when it does not depend on the request.
    #[inline]
    pub fn uri(&self, op: Operation) -> Option<&Uri> {
        self.uris[op.index()].as_ref()
    }

    /// The health probe: `GET` the health path with the credential and the
    /// kind's headers (hosted providers answer only authenticated calls).
    pub fn health_request(&self) -> Request<Full<Bytes>> {
        let mut probe_request = Request::new(Full::new(Bytes::new()));
        *probe_request.uri_mut() = self.health_uri.clone();
        let headers = probe_request.headers_mut();
        if let Some((name, value)) = &self.credential {
            headers.insert(name, value.clone());
        }
        let empty = HeaderMap::new();
        let probe = UpstreamRequest {
            headers: &empty,
            op: Operation::Native,
            model: "",
            stream: false,
            body: &Bytes::new(),
            json: None,
        };
        self.kind.provider().headers(&probe, headers);
        probe_request
    }

    /// The backend's own name for the client's `model`, if it maps it.
    pub fn mapped_model(&self, model: &str) -> Option<&str> {
        self.models.get(model).map(String::as_str)
    }

    /// The upstream request of one attempt: `POST` to the operation's path
    /// with the provider's body, the credential, and `headers`.
    pub fn request(
        &self,
        request: &UpstreamRequest<'_>,
        headers: &[(HeaderName, &str)],
    ) -> Result<Request<Full<Bytes>>, String> {
        let provider = self.kind.provider();
        let uri = match self.uri(request.op) {
            Some(uri) => uri.clone(),
            None => provider
                .uri(self, request.op, request.model)
                .ok_or_else(|| format!("a {} backend cannot serve {}", self.kind, request.op.as_str()))?,
        };
        // Built in place: a `request::Builder` moves the whole request
        // through each call.
        let mut out = Request::new(Full::new(provider.body(request, self)));
        *out.method_mut() = Method::POST;
        *out.uri_mut() = uri;
        let h = out.headers_mut();
        h.reserve(headers.len() + 4);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(host) = &self.host {
            h.insert(HOST, host.clone());
        }
        for (name, value) in headers {
            let value = HeaderValue::from_str(value).map_err(|e| format!("{name}: {e}"))?;
            h.append(name.clone(), value);
        }
        if let Some((name, value)) = &self.credential {
            h.insert(name, value.clone());
        }
        provider.headers(request, h);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_by_name_and_from_endpoints() {
        assert_eq!(Kind::parse("openai").unwrap().name(), "openai");
        assert!(Kind::parse("nope").unwrap_err().contains("native, openai, anthropic, azure"));
        let (k, url) = Kind::split_endpoint("openai+https://api.openai.com").unwrap();
        assert_eq!((k.name(), url), ("openai", "https://api.openai.com"));
        let (k, url) = Kind::split_endpoint(" http://127.0.0.1:8001 ").unwrap();
        assert_eq!((k, url), (Kind::default(), "http://127.0.0.1:8001"));
        assert!(Kind::split_endpoint("bogus+http://x").is_err());
        assert_eq!(Kind::default().name(), "native");
    }

    #[test]
    fn upstream_requests_carry_the_ids_and_a_host_only_for_plain_http() {
        let body = Bytes::from_static(b"{}");
        let empty = HeaderMap::new();
        let upstream = UpstreamRequest {
            headers: &empty,
            op: Operation::Native,
            model: "m",
            stream: false,
            body: &body,
            json: None,
        };
        let ids =
            [(HeaderName::from_static("x-request-id"), "req-1"), (HeaderName::from_static("x-organization-id"), "org")];
        let plain = Target::new(Kind::default(), "http://127.0.0.1:8001", BTreeMap::new(), None);
        let r = plain.request(&upstream, &ids).unwrap();
        assert_eq!(r.headers()[HOST], "127.0.0.1:8001");
        assert_eq!(r.headers()["x-request-id"], "req-1");
        assert_eq!(r.headers()["x-organization-id"], "org");
        // A second request shares the Host value made once.
        assert_eq!(plain.request(&upstream, &ids).unwrap().headers()[HOST], "127.0.0.1:8001");
        // hyper-util's client (HTTP/1.1) or `:authority` (h2) names the host of a TLS backend.
        let tls = Target::new(Kind::default(), "https://api.example.com", BTreeMap::new(), None);
        assert!(tls.request(&upstream, &ids).unwrap().headers().get(HOST).is_none());
        // A value that cannot be a header is an error, not a panic.
        let bad = [(HeaderName::from_static("x-request-id"), "a\nb")];
        assert!(plain.request(&upstream, &bad).unwrap_err().contains("x-request-id"));
    }

    #[test]
    fn target_precomputes_the_uris_its_kind_serves() {
        let kind = Kind::parse("openai").unwrap();
        let credential = kind.provider().credential_header("s3cret").unwrap();
        let t = Target::new(kind, "https://h:8443/", BTreeMap::new(), Some(credential));
        assert_eq!(t.uri(Operation::Chat).unwrap().to_string(), "https://h:8443/v1/chat/completions");
        assert!(t.uri(Operation::Native).is_none());
        assert_eq!(t.health_uri.to_string(), "https://h:8443/v1/models");
        assert!(!format!("{t:?}").contains("s3cret"), "the secret is never in Debug output");
        let (name, value) = t.credential.as_ref().unwrap();
        assert_eq!((name.as_str(), value.is_sensitive()), ("authorization", true));
    }
}
