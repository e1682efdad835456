//! The native door: `POST /v1/inference` with `{"request_id", "model",
//! "payload"}` and `X-API-Key`. Only `request_id` and `model` are read; the
//! body is forwarded to the backend as it came.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use router_core::InferenceRequest;
use router_core::auth::{self, Principal};
use router_core::request::{REQUEST_ID_RULES, new_request_id, valid_request_id};
use router_providers::{Operation, json_walk};
use serde::Deserialize;
use tracing::Instrument;

use crate::error::ApiError;
use crate::{Shape, SharedState, credentials, read_body, respond};

pub async fn inference(State(state): State<SharedState>, request: Request) -> Response {
    // The request taken apart, not its headers copied (as the `HeaderMap`
    // extractor would).
    // The head is dropped once read: its values share the connection's read
    // buffer, which would otherwise be held for the whole upstream call.
    let request = {
        let (parts, body) = request.into_parts();
        match accept(&state, &parts.headers, body).await {
            Ok(r) => r,
            Err(e) => return e.native(None),
        }
    };
    let span =
        tracing::info_span!("request", request_id = &*request.request_id, organization_id = &*request.organization_id);
    respond(router_core::process(&state.core, request).instrument(span).await, Shape::Native)
}

/// The body within its limit, the organization behind the key, the parse.
async fn accept(state: &SharedState, headers: &HeaderMap, body: Body) -> Result<InferenceRequest, ApiError> {
    let bytes = read_body(body, headers, state.settings.max_body_bytes, state.settings.body_read_timeout).await?;
    let principal = auth::authenticate(&state.core.config.load(), credentials::api_key(headers))?;
    parse(bytes, principal)
}

#[derive(Deserialize)]
struct NativeBody<'a> {
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// JSON nested deeper than this is refused, as the other doors' parser does:
/// a backend's parser may recurse on it.
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether JSON text nests arrays and objects deeper than `max` (a linear
/// scan; strings are skipped).
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `{"request_id", "model", "payload"}`: a valid `request_id` (or a new one)
/// and a `model`; the rest is the backend's to judge, once it is known to be
/// JSON no deeper than [`MAX_JSON_DEPTH`]. The two fields are read by the
/// walk ([`walked`]) when it is sure, by serde otherwise.
pub fn parse(body: Bytes, principal: Principal) -> Result<InferenceRequest, ApiError> {
    let (request_id, model) = match walked(&body) {
        Some(fields) => checked(fields)?,
        None => {
            if nests_deeper_than(&body, MAX_JSON_DEPTH) {
                return Err(ApiError::InvalidJson(format!("nested deeper than {MAX_JSON_DEPTH} levels")));
            }
            let parsed: NativeBody<'_> = serde_json::from_slice(&body).map_err(|e| match e.classify() {
                serde_json::error::Category::Data => ApiError::InvalidRequest(format!("invalid request: {e}")),
                _ => ApiError::InvalidJson(e.to_string()),
            })?;
            checked((parsed.request_id.as_deref(), parsed.model.as_deref()))?
        }
    };
    Ok(InferenceRequest {
        request_id,
        organization_id: principal.organization_id,
        model,
        op: Operation::Native,
        body,
        json: None,
        stream: false,
        headers: Default::default(),
        key: principal.key,
    })
}

/// `request_id` and `model` as serde reads them into [`NativeBody`], when
/// [`json_walk`] is sure of its verdict (plain ASCII strings or `null`, in
/// well-formed JSON no deeper than its limit, which is under
/// [`MAX_JSON_DEPTH`]); `None`: serde decides. Through serde, a request's
/// body cost ~2,700 instructions (`docs/benchmarks.md`).
fn walked(body: &[u8]) -> Option<(Option<&str>, Option<&str>)> {
    let (mut request_id, mut model) = (None, None);
    json_walk::object(body, [b"request_id", b"model"], |i, w| {
        let text = w.text()?;
        if i == 0 {
            request_id = text;
        } else {
            model = text;
        }
        Some(())
    })?;
    Some((request_id, model))
}

/// The fields' rules: a `model` of 1 to 256 characters, a valid
/// `request_id` or a new one.
fn checked((request_id, model): (Option<&str>, Option<&str>)) -> Result<(Arc<str>, Arc<str>), ApiError> {
    let model = match model {
        Some(m) if !m.is_empty() && m.len() <= 256 => Arc::from(m),
        Some(_) => return Err(ApiError::InvalidRequest("`model` must be 1-256 characters".into())),
        None => return Err(ApiError::InvalidRequest("missing field `model`".into())),
    };
    let request_id = match request_id {
        None => new_request_id(),
        Some(id) if valid_request_id(id) => Arc::from(id),
        Some(_) => return Err(ApiError::InvalidRequest(format!("invalid `request_id`: use {REQUEST_ID_RULES}"))),
    };
    Ok((request_id, model))
}

/// Whether the walk and serde agree on `body`: the walk is either not
/// sure, or reads what serde reads. For the fuzz target and the tests.
#[doc(hidden)]
pub fn walk_agrees(body: &[u8]) -> bool {
    let Some(fields) = walked(body) else { return true };
    serde_json::from_slice::<NativeBody<'_>>(body)
        .is_ok_and(|p| fields == (p.request_id.as_deref(), p.model.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_parse_errors() {
        let p = |b: &'static str| parse(Bytes::from_static(b.as_bytes()), Principal::organization("o"));
        assert!(matches!(p("{not json"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(p(r#"{"payload":1}"#), Err(ApiError::InvalidRequest(m)) if m.contains("model")));
        assert!(matches!(p(r#"{"model":"m","request_id":"bad id"}"#), Err(ApiError::InvalidRequest(_))));
        assert!(matches!(p(r#"[1,2]"#), Err(ApiError::InvalidRequest(_))));
        let ok = p(r#"{"model":"m","payload":{"x":[1]}}"#).unwrap();
        assert_eq!(ok.request_id.len(), 36, "generated UUID");
        let ok = p(r#"{"model":"m","request_id":"abc"}"#).unwrap();
        assert_eq!(&*ok.request_id, "abc");
        let deep = format!(r#"{{"model":"m","payload":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(parse(Bytes::from(deep), Principal::organization("o")), Err(ApiError::InvalidJson(_))));
        let fine = format!(r#"{{"model":"m","payload":{}"[[[[\"]"{}}}"#, "[".repeat(100), "]".repeat(100));
        assert!(parse(Bytes::from(fine), Principal::organization("o")).is_ok(), "brackets in strings do not count");
    }

    #[test]
    fn the_walk_reads_the_two_fields_as_serde_does() {
        let walked = |b: &str| {
            assert!(walk_agrees(b.as_bytes()), "the walk and serde disagree on {b}");
            walked(b.as_bytes()).map(|(r, m)| (r.map(str::to_string), m.map(str::to_string)))
        };
        let some = |r: Option<&str>, m: Option<&str>| Some((r.map(str::to_string), m.map(str::to_string)));
        assert_eq!(
            walked(r#"{"request_id":"r-1","model":"m","payload":{"input":"a\nb","n":[1,2.5,null]}}"#),
            some(Some("r-1"), Some("m"))
        );
        assert_eq!(walked(r#"{"payload":{},"model":null}"#), some(None, None));
        assert_eq!(walked("{}"), some(None, None));
        // Left to serde: escapes or non-ASCII in a field, another type, a
        // duplicate, a top-level array, malformed JSON.
        for body in [
            r#"{"model":"m\u0031"}"#,
            r#"{"model":"modèle"}"#,
            r#"{"model":1}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"["r","m"]"#,
            r#"{"model":"m""#,
            r#"{"model":"m"} {}"#,
        ] {
            assert_eq!(walked(body), None, "{body}");
        }
        // What serde then answers is what it answered before.
        let p = |b: &'static str| parse(Bytes::from_static(b.as_bytes()), Principal::organization("o"));
        assert_eq!(&*p(r#"{"model":"m\u0031"}"#).unwrap().model, "m1");
        assert!(matches!(p(r#"{"model":1}"#), Err(ApiError::InvalidRequest(_))));
        assert!(
            matches!(p(r#"{"model":"a","model":"b"}"#), Err(ApiError::InvalidRequest(m)) if m.contains("duplicate"))
        );
    }
}
