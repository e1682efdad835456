//! One inference request, whatever door it came through, and the rules for
//! request ids.

use std::sync::Arc;

use bytes::Bytes;
use router_providers::Operation;

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

/// A generated request id: a UUID v4 from the thread's fast generator. It
/// only has to be unique, not secret (lookups are scoped to the caller's
/// organization), so it costs no `getrandom` system call per request.
pub fn new_request_id() -> Arc<str> {
    let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
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
}
