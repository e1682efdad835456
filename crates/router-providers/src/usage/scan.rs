//! The `usage` field of an answer, read without deserializing the rest.
//!
//! Every answer is read for its usage. Through serde_json (a struct with one
//! field, the others ignored) the mock's 160-byte answer cost about 3,400
//! instructions, most of them serde's per-token machinery for fields that
//! are thrown away; walked, about 2,300 (`docs/benchmarks.md`). Here the top-level object is
//! walked and checked as serde_json checks it (strings, escapes, numbers,
//! literals, nesting, nothing after the end), and the `usage` value is read
//! by hand when it is the common shape: an object of the three counts as
//! plain integers.
//!
//! Where the walk is not sure of serde's verdict (a key with an escape or
//! a non-ASCII byte, a second `usage` key, deep nesting, any malformed
//! input, a top-level array) or the usage is another shape, it says so and
//! the caller asks serde. [`agrees`] checks that the two never differ; the
//! `answers` fuzz target and the tests assert it.

use super::Usage;

/// serde_json refuses input nested deeper than 128; the walk gives up well
/// before (so a `usage` value read alone is never refused for a depth it
/// would have had in the whole).
const MAX_DEPTH: usize = 64;

/// The bytes that end a run of plain string content: a quote, a backslash,
/// a control character.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The answer's `usage`, as serde would read it: `Some(usage)` when the walk
/// is sure, `None` when serde must decide.
pub(super) fn usage_field(body: &[u8]) -> Option<Option<Usage>> {
    let mut s = Walk { b: body, i: 0 };
    s.ws();
    if s.next()? != b'{' {
        return None;
    }
    let mut usage = None;
    s.ws();
    if s.peek()? == b'}' {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let key = s.key()?;
            s.ws();
            s.expect(b':')?;
            s.ws();
            if key == b"usage" {
                if usage.is_some() {
                    return None; // serde: a duplicate field, refused
                }
                usage = Some(s.usage()?);
            } else {
                s.value(1)?;
            }
            s.ws();
            match s.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    if s.i != body.len() {
        return None;
    }
    Some(usage.flatten())
}

/// A cursor over JSON text. Every method returns `None` where serde_json
/// might not agree with a plain reading.
struct Walk<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// serde_json's whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// The first byte from `i` on that ends a run of plain string content
    /// (a quote, a backslash, a control character), if any: eight bytes at
    /// a time (as serde_json does), the last few one by one.
    fn special(&self, mut i: usize) -> Option<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // A byte of `v` is zero: its high bit in the result. The lowest bit
        // set is always the first such byte (a borrow only marks bytes above).
        let zero = |v: u64| v.wrapping_sub(ONES) & !v;
        let b = self.b;
        while let Some(chunk) = b.get(i..i + 8) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            let x = u64::from_le_bytes(word);
            let below_space = x.wrapping_sub(ONES * 0x20) & !x;
            let hits = (zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) | below_space) & HIGH;
            if hits != 0 {
                return Some(i + (hits.trailing_zeros() / 8) as usize);
            }
            i += 8;
        }
        b[i..].iter().position(|&c| SPECIAL[usize::from(c)]).map(|p| i + p)
    }

    /// A key: printable ASCII without escapes (serde unescapes keys and
    /// checks their UTF-8; such keys are left to it).
    fn key(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let (b, start) = (self.b, self.i);
        let end = self.special(start)?;
        let key = &b[start..end];
        if b[end] != b'"' || !key.is_ascii() {
            return None;
        }
        self.i = end + 1;
        Some(key)
    }

    /// A string value, checked as serde_json checks one it ignores: no
    /// control characters, valid escapes (any bytes otherwise).
    fn string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        loop {
            let at = self.special(self.i)?;
            self.i = at + 1;
            match self.b[at] {
                b'"' => return Some(()),
                b'\\' => {}
                _ => return None, // a control character
            }
            match self.next()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                b'u' => {
                    let hex = self.b.get(self.i..self.i + 4)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 4;
                }
                _ => return None,
            }
        }
    }

    /// A number in JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digit()?;
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
        }
        // A digit right after a leading zero: serde refuses it.
        if self.peek().is_some_and(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(())
    }

    fn digit(&mut self) -> Option<()> {
        self.next().filter(u8::is_ascii_digit).map(drop)
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    /// The `usage` value: `null`, or `{"prompt_tokens":N,
    /// "completion_tokens":N,"total_tokens":N}` in any order, each at most
    /// once, other keys' values ignored (as serde ignores them); `None` for
    /// anything else (serde reads it).
    fn usage(&mut self) -> Option<Option<Usage>> {
        if self.literal(b"null").is_some() {
            return Some(None);
        }
        let mut u = Usage::default();
        let mut seen = [false; 3];
        self.expect(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(Some(u));
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let slot = match key {
                b"prompt_tokens" => 0,
                b"completion_tokens" => 1,
                b"total_tokens" => 2,
                // Its own struct: serde's.
                b"prompt_tokens_details" => return None,
                _ => {
                    self.value(2)?;
                    3
                }
            };
            if slot < 3 {
                if std::mem::replace(&mut seen[slot], true) {
                    return None; // a duplicate field
                }
                let n = self.count()?;
                match slot {
                    0 => u.prompt_tokens = n,
                    1 => u.completion_tokens = n,
                    _ => u.total_tokens = n,
                }
            }
            self.ws();
            match self.next()? {
                b',' => {}
                b'}' => return Some(Some(u)),
                _ => return None,
            }
        }
    }

    /// A count: a plain non-negative integer of at most 19 digits (always
    /// a `u64`); anything else (a fraction, an exponent, a sign, a leading
    /// zero) is serde's.
    fn count(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n = 0u64;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            self.i += 1;
        }
        let len = self.i - start;
        let plain = (1..=19).contains(&len) && (len == 1 || self.b[start] != b'0');
        (plain && !matches!(self.peek(), Some(b'.' | b'e' | b'E'))).then_some(n)
    }

    /// Any value, checked, nested at `depth`.
    fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string(),
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => {}
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }
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
        for body in [
            "",
            "   ",
            "{",
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"usage":{"prompt_tokens":1}} x"#,
            r#"{"usage":{"prompt_tokens":1},}"#,
            r#"{"a":01,"usage":{"prompt_tokens":1}}"#,
            r#"{"a":"tab	inside","usage":{"prompt_tokens":1}}"#,
            r#"{"a":"\x","usage":{"prompt_tokens":1}}"#,
            r#"{"a":"\u12G4","usage":{"prompt_tokens":1}}"#,
            r#"{"a":tru,"usage":{"prompt_tokens":1}}"#,
            r#"{"a":1.,"usage":{"prompt_tokens":1}}"#,
            r#"{"a":-,"usage":{"prompt_tokens":1}}"#,
            r#"{"a" "b","usage":{"prompt_tokens":1}}"#,
            r#"{"a":[1 2],"usage":{"prompt_tokens":1}}"#,
        ] {
            assert_eq!(quick(body), None, "{body}");
        }
        // Long strings, read eight bytes at a time.
        let long = "x".repeat(40);
        assert_eq!(quick(&format!("{{\"a\":\"{long}\u{1}\",\"usage\":{{}}}}")), None);
        assert_eq!(quick(&format!("{{\"a\":\"{long}\\q\",\"usage\":{{}}}}")), None);
        assert_eq!(quick(&format!("{{\"a\":\"{long}")), None);
        let deep = format!(r#"{{"a":{}1{},"usage":{{"prompt_tokens":1}}}}"#, "[".repeat(100), "]".repeat(100));
        assert_eq!(quick(&deep), None);
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
        /// Eight bytes at a time finds what one at a time finds.
        #[test]
        fn special_bytes_are_found_as_one_by_one(
            bytes in proptest::collection::vec(proptest::strategy::Strategy::prop_map(proptest::prelude::any::<u8>(), |c| match c {
                // Mostly plain bytes, so that the special one is often words away.
                0..=223 => b'a' + c % 26 + (c & 0x80),
                224..=253 => c - 224,
                254 => b'"',
                255 => b'\\',
            }), 0..64),
            from in 0usize..64,
        ) {
            let from = from.min(bytes.len());
            let walk = Walk { b: &bytes, i: 0 };
            let expected = bytes[from..].iter().position(|&c| c < 0x20 || c == b'"' || c == b'\\').map(|p| from + p);
            proptest::prop_assert_eq!(walk.special(from), expected);
        }

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
