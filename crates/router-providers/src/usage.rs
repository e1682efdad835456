//! Token usage, as backends report it.

use serde::{Deserialize, Serialize};

/// Token usage reported by a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// The total, never less than its parts (some backends omit it).
    pub fn total(&self) -> u64 {
        self.total_tokens.max(self.prompt_tokens + self.completion_tokens)
    }

    /// The `usage` object of a JSON document (an answer, or one stream
    /// event), if it has one in the OpenAI shape.
    pub fn from_json_field(body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct WithUsage {
            #[serde(default)]
            usage: Option<Usage>,
        }
        serde_json::from_slice::<WithUsage>(body).ok()?.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_field_is_read_when_present() {
        let u = Usage::from_json_field(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#).unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.total()), (3, 4, 7));
        assert!(Usage::from_json_field(br#"{"usage":null}"#).is_none());
        assert!(Usage::from_json_field(b"not json").is_none());
    }
}
