//! An answer's `usage` field, read by [`crate::json_walk`] without
//! deserializing the rest of the answer.
//!
//! Through serde_json (a struct with one field, the others ignored) the
//! mock's 160-byte answer cost about 3,400 instructions; walked, about 2,300
//! (`docs/benchmarks.md`). A `usage` of the common shape (the three counts
//! as plain integers) is read here; any other shape, and whatever the walk
//! is not sure of, is left to serde. [`agrees`] checks that the two never
//! differ; the `answers` fuzz target and the tests assert it.

use super::Usage;
use crate::json_walk::{self, Walk};

/// The answer's `usage`, as serde would read it: `Some(usage)` when the walk
/// is sure, `None` when serde must decide.
pub(super) fn usage_field(body: &[u8]) -> Option<Option<Usage>> {
    let mut usage = None;
    json_walk::object(body, [b"usage"], |_, w| {
        usage = read(w)?;
        Some(())
    })?;
    Some(usage)
}

/// The `usage` value: `null`, or `{"prompt_tokens":N,
/// "completion_tokens":N,"total_tokens":N}` in any order, each at most
/// once, other keys' values ignored (as serde ignores them); `None` for
/// anything else (serde reads it).
fn read(w: &mut Walk<'_>) -> Option<Option<Usage>> {
    if w.literal(b"null").is_some() {
        return Some(None);
    }
    let mut u = Usage::default();
    let mut seen = [false; 3];
    w.fields(|key, w| {
        let slot = match key {
            b"prompt_tokens" => 0,
            b"completion_tokens" => 1,
            b"total_tokens" => 2,
            // Its own struct: serde's.
            b"prompt_tokens_details" => return None,
            _ => return w.value(2),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None; // a duplicate field
        }
        let n = w.count()?;
        match slot {
            0 => u.prompt_tokens = n,
            1 => u.completion_tokens = n,
            _ => u.total_tokens = n,
        }
        Some(())
    })?;
    Some(Some(u))
}

/// Whether the walk and serde_json agree on `body`: the walk is either not
/// sure, or gives serde's answer. For the fuzz target and the tests.
pub(super) fn agrees(body: &[u8]) -> bool {
    match usage_field(body) {
        None => true,
        Some(quick) => quick == super::Usage::from_json_field_serde(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(body: &str) -> Option<Option<Usage>> {
        let answer = usage_field(body.as_bytes());
        assert!(agrees(body.as_bytes()), "the walk and serde disagree on {body:?}");
        answer
    }

    fn counts(p: u64, c: u64, t: u64) -> Option<Option<Usage>> {
        Some(Some(Usage { prompt_tokens: p, completion_tokens: c, total_tokens: t, ..Usage::default() }))
    }

    #[test]
    fn the_common_answers_are_read_by_the_walk() {
        let mock = r#"{"backend_id":"b1","output":"This is a fake completion.","request_id":"","usage":{"completion_tokens":9,"prompt_tokens":12,"total_tokens":21}}"#;
        assert_eq!(quick(mock), counts(12, 9, 21));
        let chat = r#" {"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Line one\nline \"two\" \u00e9 \\ done","refusal":null},
            "logprobs":null,"finish_reason":"stop"}],
            "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12},"system_fingerprint":"fp_1","score":-1.5e-3,"ok":true}
"#;
        assert_eq!(quick(chat), counts(5, 7, 12));
        // Unknown keys in the usage object are ignored, as serde ignores them.
        assert_eq!(quick(r#"{"usage":{"prompt_tokens":1,"extra":[1,{"a":null}],"total_tokens":3}}"#), counts(1, 0, 3));
        assert_eq!(quick(r#"{"usage":{}}"#), counts(0, 0, 0));
        // A long text, with escapes and non-ASCII past the first 32 bytes.
        let text = format!("{}\\n\\\"é\\u00e9{}", "x".repeat(40), "y".repeat(300));
        assert_eq!(quick(&format!(r#"{{"output":"{text}","usage":{{"total_tokens":4}}}}"#)), counts(0, 0, 4));
    }

    #[test]
    fn no_usage_or_a_null_one_is_none() {
        assert_eq!(quick(r#"{}"#), Some(None));
        assert_eq!(quick(r#"{"output":"x"}"#), Some(None));
        assert_eq!(quick(r#"{"usage":null}"#), Some(None));
        // "usage" inside a string or a nested object is not the field.
        assert_eq!(
            quick(r#"{"text":"\"usage\":{\"prompt_tokens\":1}","o":{"usage":{"prompt_tokens":2}}}"#),
            Some(None)
        );
    }

    #[test]
    fn other_shapes_are_left_to_serde() {
        for body in [
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":1.0}}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":1e2}}"#,
            r#"{"usage":{"prompt_tokens":99999999999999999999}}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"us\u0061ge":{"prompt_tokens":1}}"#,
            r#"{"usagé":1}"#,
            r#"{"usage":"12"}"#,
            r#"{"usage":[1,2,3]}"#,
            r#"[{"prompt_tokens":1}]"#,
        ] {
            assert_eq!(quick(body), None, "{body}");
        }
    }

    #[test]
    fn malformed_answers_are_left_to_serde() {
        // The walk's own checks are `json_walk`'s tests; here, that a usage
        // in a malformed answer is not read.
        for body in [
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"usage":{"prompt_tokens":1}} x"#,
            r#"{"a":01,"usage":{"prompt_tokens":1}}"#,
            r#"{"a":"\x","usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1,}}"#,
            r#"{"usage":{"prompt_tokens":1 "total_tokens":2}}"#,
        ] {
            assert_eq!(quick(body), None, "{body}");
        }
    }

    /// JSON text (valid, with whitespace) whose keys are often the ones
    /// the walk looks for.
    fn json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = proptest::sample::select(vec![
            "0",
            "7",
            "12",
            "-3",
            "1.5",
            "2e3",
            "18446744073709551615",
            "true",
            "false",
            "null",
            "\"x\"",
            "\"a\\nb\"",
            "\"\\u00e9\"",
            "\"é\"",
        ])
        .prop_map(str::to_string);
        let key = proptest::sample::select(vec![
            "usage",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
            "cached_tokens",
            "id",
            "us\\u0061ge",
        ]);
        leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((key.clone(), inner, " ?\n?"), 0..5).prop_map(|fields| {
                    let fields: Vec<String> =
                        fields.into_iter().map(|(k, v, ws)| format!("{ws}\"{k}\":{ws}{v}")).collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    /// The generator reaches the walk's answers, not only its refusals: the
    /// property below is not vacuous.
    #[test]
    fn the_generated_json_is_often_answered_by_the_walk() {
        use proptest::strategy::{Strategy, ValueTree};
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut read, mut none) = (0, 0);
        for _ in 0..2000 {
            let text = json().new_tree(&mut runner).map(|t| t.current()).unwrap_or_default();
            match usage_field(format!("{{\"usage\":{text}}}").as_bytes()) {
                Some(Some(_)) => read += 1,
                Some(None) => none += 1,
                None => {}
            }
        }
        assert!(read > 100 && none > 5, "read {read}, none {none}");
    }

    proptest::proptest! {
        /// Valid JSON, and the same with one byte changed, removed or
        /// added: the walk never gives an answer serde would not.
        #[test]
        fn the_walk_agrees_with_serde_on_json_and_near_json(
            text in json(),
            at in 0usize..1000,
            edit in 0u8..4,
            byte in proptest::sample::select(b"{}[],:\" 0-1.eE\\u\t".to_vec()),
        ) {
            proptest::prop_assert!(agrees(text.as_bytes()), "{}", text);
            let mut body = format!("{{\"id\":\"x\",\"usage\":{text}}}").into_bytes();
            let at = at % (body.len() + 1);
            match edit {
                0 => {}
                1 if at < body.len() => body[at] = byte,
                2 if at < body.len() => { body.remove(at); }
                _ => body.insert(at, byte),
            }
            proptest::prop_assert!(agrees(&body), "{}", String::from_utf8_lossy(&body));
        }

        /// Answers built from pieces that look like JSON, and mangled ones:
        /// the walk never gives an answer serde would not.
        #[test]
        fn the_walk_never_disagrees_with_serde(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "{", "}", "[", "]", ",", ":", " ", "\n", "\"usage\"", "\"prompt_tokens\"", "\"total_tokens\"",
                "\"completion_tokens\"", "\"prompt_tokens_details\"", "\"cached_tokens\"", "\"x\"", "\"a\\nb\"",
                "\"\\u00e9\"", "\"\\q\"", "0", "12", "-3", "1.5", "2e3", "01", "true", "false", "null", "nul", "\"",
            ]), 0..40),
        ) {
            let body = pieces.concat();
            proptest::prop_assert!(agrees(body.as_bytes()), "{}", body);
        }
    }
}
