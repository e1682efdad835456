//! One inference request, whatever door it came through, and the rules for
//! request ids.

use std::sync::Arc;

use bytes::Bytes;
use router_providers::Operation;

use crate::keys::KeyEntry;

/// A parsed, authenticated request. The door reads the body, finds the
/// organization behind the key, and parses its own shape into this; the
/// pipeline takes it from there.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub request_id: Arc<str>,
    pub organization_id: Arc<str>,
    pub model: Arc<str>,
    pub op: Operation,
    /// The body as the client sent it; each backend's provider decides what
    /// it forwards.
    pub body: Bytes,
    /// The body parsed, when the door parsed it whole.
    pub json: Option<serde_json::Value>,
    /// The client asked for a streamed answer.
    pub stream: bool,
    /// Client headers that a backend kind may forward (`anthropic-version`,
    /// `anthropic-beta`); empty for the other doors.
    pub headers: http::HeaderMap,
    /// The managed API key it came with (its models, limits, id).
    pub key: Option<Arc<KeyEntry>>,
}

impl InferenceRequest {
    /// The same request for another model (a fallback): the model name, and
    /// the body's `model` field.
    pub fn with_model(&self, model: &str) -> InferenceRequest {
        let mut json = match &self.json {
            Some(v) => Some(v.clone()),
            None => serde_json::from_slice::<serde_json::Value>(&self.body).ok(),
        };
        let body = match json.as_mut().and_then(serde_json::Value::as_object_mut) {
            Some(obj) => {
                obj.insert("model".into(), serde_json::Value::from(model));
                json.as_ref()
                    .and_then(|v| serde_json::to_vec(v).ok())
                    .map(Bytes::from)
                    .unwrap_or_else(|| self.body.clone())
            }
            None => self.body.clone(),
        };
        InferenceRequest {
            model: Arc::from(model),
            body,
            json: if self.json.is_some() { json } else { None },
            ..self.clone()
        }
    }

    /// The managed key's id, if the request came with one.
    pub fn key_id(&self) -> Option<Arc<str>> {
        self.key.as_ref().map(|k| k.key_id.clone())
    }

    /// Whether an OpenAI client asked its stream for the usage chunk.
    pub fn wants_stream_usage(&self) -> bool {
        self.json.as_ref().is_some_and(|v| v["stream_options"]["include_usage"] == true)
    }
}

/// The longest accepted request id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// What a valid request id is made of, for error messages.
pub const REQUEST_ID_RULES: &str = "1-128 letters, digits, '-', '_', '.' or ':'";

pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A generated request id: a UUID v7, the time in milliseconds then 74 bits
/// from the thread's fast generator. It only has to be unique, not secret
/// (lookups are scoped to the caller's organization), so it costs no
/// `getrandom` system call per request. Ids sort in the order requests
/// started, as logs and audit records are read.
pub fn new_request_id() -> Arc<str> {
    let ms = crate::util::now_ms();
    let mut random = [0u8; 10];
    random.copy_from_slice(&fastrand::u128(..).to_le_bytes()[..10]);
    let uuid = uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid();
    Arc::from(&*uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_rules() {
        assert!(valid_request_id("test-123"));
        assert!(valid_request_id("a.b:c_d-E9"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id("slash/no"));
        assert!(valid_request_id(&"x".repeat(128)));
        assert!(!valid_request_id(&"x".repeat(129)));
        assert_eq!(new_request_id().len(), 36);
    }

    #[test]
    fn generated_ids_are_uuid_v7_in_time_order() {
        let first = new_request_id();
        // The first 13 characters are the millisecond: take an id of a later one.
        let second = loop {
            let id = new_request_id();
            if id[..13] != first[..13] {
                break id;
            }
        };
        assert!(first < second, "{first} then {second}");
        let uuid = uuid::Uuid::parse_str(&second).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        assert!(now.abs_diff(ms) < 5_000, "{ms} vs {now}");
    }
}
