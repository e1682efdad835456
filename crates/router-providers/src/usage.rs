//! Token usage, as backends report it, in one normal form.
//!
//! `prompt_tokens` counts every input token, cached or not;
//! `cache_read_tokens` and `cache_write_tokens` say how many of them were
//! read from, or written to, the provider's prompt cache. OpenAI reports
//! cached tokens inside its prompt count (`prompt_tokens_details.cached_tokens`);
//! Anthropic reports them beside it (`input_tokens` excludes
//! `cache_read_input_tokens` and `cache_creation_input_tokens`), so its
//! prompt count is the sum. Whatever the door and the kind, the same tokens
//! count the same.

mod scan;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Token usage reported by a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt, tokens read from the provider's cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    /// Of the prompt, tokens written to the provider's cache.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: u64,
    /// Not OpenAI's: the router's, so that cache writes survive the OpenAI
    /// shape (see [`Usage::to_openai`]).
    #[serde(default)]
    cache_creation_tokens: u64,
}

/// OpenAI's (and the native) shape: chat, completions, embeddings.
#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

/// The Responses API's shape.
#[derive(Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

/// Anthropic's shape.
#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// The total, never less than its parts (some backends omit it).
    pub fn total(&self) -> u64 {
        self.total_tokens.max(self.prompt_tokens + self.completion_tokens)
    }

    /// Input tokens not read from or written to the cache.
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.cache_read_tokens + self.cache_write_tokens)
    }

    /// The `usage` object of an OpenAI-shaped (or native) answer or stream
    /// event, if it has one.
    pub fn from_json_field(body: &[u8]) -> Option<Usage> {
        scan::usage_field(body).unwrap_or_else(|| Self::from_json_field_serde(body))
    }

    /// [`Usage::from_json_field`] through serde_json alone: what the walk
    /// ([`scan`]) must agree with, and what reads what it leaves.
    fn from_json_field_serde(body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct With {
            #[serde(default)]
            usage: Option<OpenAiUsage>,
        }
        serde_json::from_slice::<With>(body).ok()?.usage.map(Usage::from)
    }

    /// Whether the walk that reads `usage` without serde agrees with serde
    /// on `body` (it may leave it to serde). For the fuzz target.
    #[doc(hidden)]
    pub fn quick_agrees(body: &[u8]) -> bool {
        scan::agrees(body)
    }

    /// The `usage` object of an OpenAI-shaped value (an answer or a chunk).
    pub fn from_openai(value: &Value) -> Option<Usage> {
        let u: OpenAiUsage = serde_json::from_value(value.get("usage")?.clone()).ok()?;
        Some(u.into())
    }

    /// The `usage` object of a Responses API answer (or of the `response`
    /// inside a `response.completed` event, given that object).
    pub fn from_responses(value: &Value) -> Option<Usage> {
        let u: ResponsesUsage = serde_json::from_value(value.get("usage")?.clone()).ok()?;
        let cached = u.input_tokens_details.map(|d| d.cached_tokens).unwrap_or(0);
        Some(Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.total_tokens,
            cache_read_tokens: cached,
            cache_write_tokens: 0,
        })
    }

    /// Anthropic's `usage` object (of a message, or of a `message_delta`).
    pub fn from_anthropic(usage: &Value) -> Option<Usage> {
        let u: AnthropicUsage = serde_json::from_value(usage.clone()).ok()?;
        let read = u.cache_read_input_tokens.unwrap_or(0);
        let write = u.cache_creation_input_tokens.unwrap_or(0);
        let prompt = u.input_tokens + read + write;
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: u.output_tokens,
            total_tokens: prompt + u.output_tokens,
            cache_read_tokens: read,
            cache_write_tokens: write,
        })
    }

    /// This usage in OpenAI's chat shape, with cache writes as
    /// `prompt_tokens_details.cache_creation_tokens`.
    pub fn to_openai(&self) -> Value {
        let mut v = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total(),
        });
        if self.cache_read_tokens > 0 || self.cache_write_tokens > 0 {
            // `cache_creation_tokens` is an extension (OpenAI's shape has
            // cache reads only); clients that do not know it ignore it.
            v["prompt_tokens_details"] =
                json!({"cached_tokens": self.cache_read_tokens, "cache_creation_tokens": self.cache_write_tokens});
        }
        v
    }

    /// This usage in Anthropic's shape.
    pub fn to_anthropic(&self) -> Value {
        json!({
            "input_tokens": self.uncached_prompt_tokens(),
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
        })
    }
}

impl From<OpenAiUsage> for Usage {
    fn from(u: OpenAiUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cache_read_tokens: u.prompt_tokens_details.as_ref().map(|d| d.cached_tokens).unwrap_or(0),
            cache_write_tokens: u.prompt_tokens_details.map(|d| d.cache_creation_tokens).unwrap_or(0),
        }
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
        let u = Usage::from_json_field(
            br#"{"usage":{"prompt_tokens":30,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":20}}}"#,
        )
        .unwrap();
        assert_eq!((u.cache_read_tokens, u.uncached_prompt_tokens()), (20, 10));
    }

    #[test]
    fn the_same_tokens_count_the_same_in_every_shape() {
        let anthropic = Usage::from_anthropic(&json!({
            "input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 5
        }))
        .unwrap();
        assert_eq!((anthropic.prompt_tokens, anthropic.total()), (35, 39));
        assert_eq!(Usage::from_anthropic(&anthropic.to_anthropic()).unwrap(), anthropic);
        assert_eq!(anthropic.total_tokens, 39);
        let openai = Usage::from_json_field(format!(r#"{{"usage":{}}}"#, anthropic.to_openai()).as_bytes()).unwrap();
        assert_eq!((openai.prompt_tokens, openai.completion_tokens, openai.cache_read_tokens), (35, 4, 20));
        let responses = Usage::from_responses(&json!({"usage": {
            "input_tokens": 35, "output_tokens": 4, "total_tokens": 39, "input_tokens_details": {"cached_tokens": 20}
        }}))
        .unwrap();
        assert_eq!((responses.prompt_tokens, responses.total(), responses.cache_read_tokens), (35, 39, 20));
    }

    #[test]
    fn cache_counts_show_only_when_there_are_some() {
        let plain = Usage { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7, ..Default::default() };
        let v = serde_json::to_value(plain).unwrap();
        assert_eq!(v, json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}));
        assert_eq!(plain.to_openai().get("prompt_tokens_details"), None);
        let read = Usage { cache_read_tokens: 2, ..plain };
        let v = serde_json::to_value(read).unwrap();
        assert_eq!((v["cache_read_tokens"].as_u64(), v.get("cache_write_tokens")), (Some(2), None));
        assert_eq!(read.to_openai()["prompt_tokens_details"], json!({"cached_tokens": 2, "cache_creation_tokens": 0}));
        let written = Usage { cache_write_tokens: 5, ..plain };
        assert_eq!(
            written.to_openai()["prompt_tokens_details"],
            json!({"cached_tokens": 0, "cache_creation_tokens": 5})
        );
        assert_eq!(serde_json::to_value(written).unwrap()["cache_write_tokens"], 5);
    }
}
