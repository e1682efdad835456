//! The audit and usage records' JSON, written field by field into one
//! buffer.
//!
//! Every routed request writes an audit record (and, with Kafka, a usage
//! record). Through serde_json's serializer a record cost about 7,000
//! instructions, most of them in escaping: every key and value was scanned
//! byte by byte for characters to escape (`docs/benchmarks.md`). Here a key
//! is a literal written as it is, and a value is scanned in one pass the
//! compiler can vectorize, then copied; only a value that needs escaping
//! goes through serde_json. The records keep `#[derive(Serialize)]`, and
//! their tests check that both write the same bytes.

use std::time::SystemTime;

use crate::routing::decisions::DecisionType;

/// A JSON object being written.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// `"key":value`. Keys are literals that need no escaping.
    pub fn field(&mut self, key: &'static str, value: impl Value) -> &mut Self {
        debug_assert!(!needs_escape(key), "{key}");
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        value.write(self.out);
        self
    }

    /// The field only when there is a value (serde's
    /// `skip_serializing_if = "Option::is_none"`).
    pub fn some<V: Value>(&mut self, key: &'static str, value: Option<V>) -> &mut Self {
        match value {
            Some(v) => self.field(key, v),
            None => self,
        }
    }

    /// Closes the object.
    pub fn end(&mut self) {
        self.out.push(b'}');
    }
}

/// A value written as JSON.
pub trait Value {
    fn write(self, out: &mut Vec<u8>);
}

impl Value for &str {
    fn write(self, out: &mut Vec<u8>) {
        if needs_escape(self) {
            // A string serde_json can always write; into a Vec it cannot fail.
            let _ = serde_json::to_writer(&mut *out, self);
        } else {
            out.push(b'"');
            out.extend_from_slice(self.as_bytes());
            out.push(b'"');
        }
    }
}

impl<V: Value> Value for Option<V> {
    fn write(self, out: &mut Vec<u8>) {
        match self {
            Some(v) => v.write(out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// Integers and floats as serde_json writes them (`itoa`, `ryu`; a float
/// that is not finite as `null`).
macro_rules! number {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn write(self, out: &mut Vec<u8>) {
                // Into a Vec, serializing a number cannot fail.
                let _ = serde_json::to_writer(&mut *out, &self);
            }
        }
    )*};
}
number!(u16, u32, u64, f64);

impl Value for SystemTime {
    fn write(self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(&crate::util::rfc3339_millis(self));
        out.push(b'"');
    }
}

impl Value for DecisionType {
    fn write(self, out: &mut Vec<u8>) {
        self.as_str().write(out);
    }
}

impl Value for router_providers::Usage {
    fn write(self, out: &mut Vec<u8>) {
        let nonzero = |n: u64| (n != 0).then_some(n);
        Object::new(out)
            .field("prompt_tokens", self.prompt_tokens)
            .field("completion_tokens", self.completion_tokens)
            .field("total_tokens", self.total_tokens)
            .some("cache_read_tokens", nonzero(self.cache_read_tokens))
            .some("cache_write_tokens", nonzero(self.cache_write_tokens))
            .end();
    }
}

/// Whether serde_json would escape something in `s`: a control character,
/// a quote or a backslash. No early exit, so that the loop vectorizes.
fn needs_escape(s: &str) -> bool {
    s.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::strategy::Strategy;

    use super::*;

    /// Any text, with the characters JSON escapes made common.
    pub(crate) fn text() -> impl Strategy<Value = String> {
        "(\\PC|[\u{0}-\u{1f}\"\\\\\u{7f}])*"
    }

    /// Any time the records can carry (years 1970 to 9999).
    pub(crate) fn time() -> impl Strategy<Value = SystemTime> {
        (0u64..253_402_300_800_000).prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    fn object(f: impl FnOnce(&mut Object)) -> String {
        let mut out = Vec::new();
        let mut o = Object::new(&mut out);
        f(&mut o);
        o.end();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fields_are_separated_and_absent_ones_skipped() {
        assert_eq!(object(|_| {}), "{}");
        let s = object(|o| {
            o.field("a", "x").some("b", None::<&str>).field("c", None::<u64>).some("d", Some(2u32)).field("e", 1.5);
        });
        assert_eq!(s, r#"{"a":"x","c":null,"d":2,"e":1.5}"#);
    }

    proptest::proptest! {
        #[test]
        fn strings_and_numbers_are_written_as_serde_json_writes_them(
            s in text(),
            n in proptest::prelude::any::<u64>(),
            f in proptest::prelude::any::<f64>(),
        ) {
            let mut out = Vec::new();
            s.as_str().write(&mut out);
            proptest::prop_assert_eq!(&out, &serde_json::to_vec(&s).unwrap());
            out.clear();
            n.write(&mut out);
            proptest::prop_assert_eq!(&out, &serde_json::to_vec(&n).unwrap());
            out.clear();
            f.write(&mut out);
            proptest::prop_assert_eq!(&out, &serde_json::to_vec(&f).unwrap());
        }
    }
}
