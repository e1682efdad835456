//! A few fields of a JSON object, read without deserializing the rest.
//!
//! The router reads two or three fields of bodies it otherwise passes on:
//! an answer's `usage`, a native request's `model` and `request_id`.
//! Through serde_json (a struct with those fields, the others ignored) that
//! cost thousands of instructions a request, most of them serde's machinery
//! for each key and value thrown away (`docs/benchmarks.md`). [`object`]
//! walks the top-level object and checks it as serde_json checks it
//! (strings: control characters and escapes; numbers' grammar, leading
//! zeros included; literals; nesting; nothing after the end), handing the
//! wanted fields' values to the caller.
//!
//! Where the walk is not sure of serde's verdict (a key with an escape or a
//! non-ASCII byte, a wanted key twice, nesting past [`MAX_DEPTH`], a
//! top-level array, anything malformed) it answers `None`, and the caller
//! asks serde. Each caller checks that the two never differ, in its tests
//! and a fuzz target.

/// serde_json refuses input nested deeper than 128; the walk gives up well
/// before (so a value read alone is never refused for a depth it would
/// have had in the whole).
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

/// Walks the object `body`, calling `read(i, walk)` at the value of each
/// key `wanted[i]` (which must read that whole value, or answer `None`);
/// every other value is checked and skipped. `None`: not sure (a wanted
/// key twice counts, as serde refuses a duplicate field).
pub fn object<'a, const N: usize>(
    body: &'a [u8],
    wanted: [&[u8]; N],
    mut read: impl FnMut(usize, &mut Walk<'a>) -> Option<()>,
) -> Option<()> {
    let mut s = Walk { b: body, i: 0 };
    let mut seen = [false; N];
    s.ws();
    s.fields(|key, w| match wanted.iter().position(|k| *k == key) {
        Some(i) if std::mem::replace(&mut seen[i], true) => None,
        Some(i) => read(i, w),
        None => w.value(1),
    })?;
    s.ws();
    (s.i == body.len()).then_some(())
}

/// A cursor over JSON text. Every method answers `None` where serde_json
/// might not agree with a plain reading.
pub struct Walk<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    /// A string of printable ASCII without escapes, or `null` (`Some(None)`);
    /// anything else is serde's to read.
    pub fn text(&mut self) -> Option<Option<&'a str>> {
        if self.literal(b"null").is_some() {
            return Some(None);
        }
        let text = self.key()?;
        // `key` only lets ASCII through.
        std::str::from_utf8(text).ok().map(Some)
    }

    /// An object whose keys (plain ASCII, see [`Walk::key`]) are read by
    /// `field(key, walk)`, which must read the key's whole value; `None`
    /// from it gives up. (Duplicates are the caller's to find.)
    pub(crate) fn fields(&mut self, mut field: impl FnMut(&'a [u8], &mut Self) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        self.items(b'}', |w| {
            let key = w.key()?;
            w.colon()?;
            field(key, w)
        })
    }

    /// The items of an object or an array, after its opening byte: each
    /// read by `item`, separated by commas, up to `close`.
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.ws();
        if self.peek()? == close {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.next()? {
                b',' => {}
                c if c == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// The colon after a key, with the whitespace around it.
    fn colon(&mut self) -> Option<()> {
        self.ws();
        self.expect(b':')?;
        self.ws();
        Some(())
    }

    pub(crate) fn peek(&self) -> Option<u8> {
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

    /// A count: a plain non-negative integer of at most 19 digits (always
    /// a `u64`); anything else (a fraction, an exponent, a sign, a leading
    /// zero) is serde's.
    pub(crate) fn count(&mut self) -> Option<u64> {
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
    pub(crate) fn value(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string(),
            b'{' => {
                self.i += 1;
                self.items(b'}', |w| {
                    w.string()?;
                    w.colon()?;
                    w.value(depth + 1)
                })
            }
            b'[' => {
                self.i += 1;
                self.items(b']', |w| w.value(depth + 1))
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    pub(crate) fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object walked with nothing wanted, and serde's verdict on it as
    /// an object whose fields are all ignored.
    fn walked(body: &str) -> Option<()> {
        let walk = object(body.as_bytes(), [], |_, _| None);
        if walk.is_some() {
            let serde = serde_json::from_str::<std::collections::HashMap<String, serde::de::IgnoredAny>>(body);
            assert!(serde.is_ok(), "the walk took what serde refuses: {body:?}");
        }
        walk
    }

    #[test]
    fn well_formed_objects_are_walked() {
        assert_eq!(walked("{}"), Some(()));
        assert_eq!(
            walked(
                r#" {"a" : [1, -2.5e+3, 0, true, false, null, "x\n\"\u00e9", {"b":{}}, []]}
"#
            ),
            Some(())
        );
        let long = format!(r#"{{"text":"{}\n\t{}"}}"#, "x".repeat(40), "é".repeat(40));
        assert_eq!(walked(&long), Some(()));
    }

    #[test]
    fn malformed_or_unsure_input_gives_up() {
        for body in [
            "",
            "   ",
            "{",
            "[]",
            r#"{"a":1"#,
            r#"{"a":1} x"#,
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            "{\"a\":\"tab\tinside\"}",
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12G4"}"#,
            r#"{"a":tru}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a" "b"}"#,
            r#"{"a":[1 2]}"#,
            r#"{"\u0061":1}"#,
            r#"{"é":1}"#,
        ] {
            assert_eq!(walked(body), None, "{body}");
        }
        let long = "x".repeat(40);
        assert_eq!(walked(&format!("{{\"a\":\"{long}\u{1}\"}}")), None);
        assert_eq!(walked(&format!("{{\"a\":\"{long}\\q\"}}")), None);
        assert_eq!(walked(&format!("{{\"a\":\"{long}")), None);
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(100), "]".repeat(100));
        assert_eq!(walked(&deep), None);
    }

    #[test]
    fn a_wanted_key_twice_gives_up() {
        let read = |_: usize, w: &mut Walk<'_>| w.value(1);
        assert_eq!(object(br#"{"a":1,"b":2}"#, [b"a"], read), Some(()));
        assert_eq!(object(br#"{"a":1,"a":2}"#, [b"a"], read), None);
    }

    #[test]
    fn text_is_plain_ascii_or_null() {
        let text = |v: &str| {
            let mut out = None;
            object(format!(r#"{{"v":{v}}}"#).as_bytes(), [b"v"], |_, w| {
                out = Some(w.text()?.map(str::to_string));
                Some(())
            })
            .and(out)
        };
        assert_eq!(text(r#""gpt-4o""#), Some(Some("gpt-4o".to_string())));
        assert_eq!(text("null"), Some(None));
        for unsure in [r#""a\nb""#, r#""é""#, "1", "[]", "nul"] {
            assert_eq!(text(unsure), None, "{unsure}");
        }
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
    }
}
