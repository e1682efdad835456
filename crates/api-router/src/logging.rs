//! Logging: the global `tracing` subscriber (JSON lines, or text), and the
//! JSON writer of span fields it uses.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

use crate::settings::LogFormat;

/// Installs the global subscriber: `format`, to stdout, filtered by
/// `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder.event_format(json_lines()).fmt_fields(JsonSpanFields).init(),
        LogFormat::Text => builder.init(),
    }
}

/// One JSON object a line: the event's fields at the top level, the span
/// it is in (its fields by [`JsonSpanFields`]) under `span`.
fn json_lines() -> Format<Json> {
    tracing_subscriber::fmt::format().json().flatten_event(true).with_current_span(true).with_span_list(false)
}

/// A span's fields as one JSON object, written straight into the span's
/// string. tracing-subscriber's own (`JsonFields`) gathers them into a map
/// of `serde_json::Value`s and serializes the map: 5,800 instructions for
/// the request span's two fields, on every request at the default level,
/// 7% of a request (`docs/benchmarks.md`). The JSON event formatter reads
/// the object back only when an event is logged inside the span, and writes
/// the same line either way.
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        writer.write_char('{')?;
        let mut pairs = Pairs { out: &mut writer, first: true, result: Ok(()) };
        fields.record(&mut pairs);
        pairs.result?;
        writer.write_char('}')
    }

    /// Fields recorded later go inside the object.
    fn add_fields(&self, current: &'w mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        if current.fields.pop() != Some('}') {
            current.fields.clear();
            return self.format_fields(current.as_writer(), fields);
        }
        let first = current.fields.len() == 1;
        let mut writer = current.as_writer();
        let mut pairs = Pairs { out: &mut writer, first, result: Ok(()) };
        fields.record(&mut pairs);
        pairs.result?;
        writer.write_char('}')
    }
}

/// Writes `"name":value` pairs, separated by commas.
struct Pairs<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Pairs<'_, '_> {
    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let out = &mut *self.out;
        let separator = if self.first { "\"" } else { ",\"" };
        self.first = false;
        self.result = out
            .write_str(separator)
            .and_then(|()| Escape(&mut *out).write_str(field.name()))
            .and_then(|()| out.write_str("\":"))
            .and_then(|()| value(out));
    }
}

impl Visit for Pairs<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field, |out| {
            out.write_char('"')?;
            write!(Escape(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field, |out| {
            out.write_char('"')?;
            Escape(&mut *out).write_str(value)?;
            out.write_char('"')
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.pair(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // As serde_json writes a float that is not finite.
        self.pair(field, |out| if value.is_finite() { write!(out, "{value}") } else { out.write_str("null") });
    }
}

/// JSON string escaping on the way through.
struct Escape<'a, W>(&'a mut W);

impl<W: Write> Write for Escape<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Most values need no escaping: one pass the compiler can vectorize.
        if !s.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\')) {
            return self.0.write_str(s);
        }
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written into a buffer.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `log` writes under the router's JSON subscriber.
    fn logged(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(json_lines())
            .fmt_fields(JsonSpanFields)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn an_event_inside_a_span_carries_its_fields_escaped_and_typed() {
        let tricky = "id \"quoted\" \\ back\nline\ttab \u{1} é";
        let lines = logged(|| {
            let span = tracing::info_span!("request", request_id = %tricky, raw = tricky, organization_id = "org-1", n = 5u64, ok = true, ratio = 0.25f64, nan = f64::NAN);
            let _entered = span.enter();
            tracing::warn!(reason = "x", "inside");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let span = &lines[0]["span"];
        assert_eq!(span["name"], "request");
        assert_eq!(
            (&span["request_id"], &span["raw"]),
            (&serde_json::Value::from(tricky), &serde_json::Value::from(tricky))
        );
        assert_eq!(span["organization_id"], "org-1");
        assert_eq!((span["n"].as_u64(), span["ok"].as_bool()), (Some(5), Some(true)));
        assert_eq!((span["ratio"].as_f64(), &span["nan"]), (Some(0.25), &serde_json::Value::Null));
        assert_eq!(lines[0]["message"], "inside");
    }

    #[test]
    fn fields_recorded_later_join_the_object() {
        let lines = logged(|| {
            let span = tracing::info_span!("request", request_id = "r1", backend = tracing::field::Empty, x = -2i64);
            span.record("backend", "b\"2");
            let _entered = span.enter();
            tracing::error!("inside");
        });
        let span = &lines[0]["span"];
        assert_eq!((span["request_id"].as_str(), span["backend"].as_str()), (Some("r1"), Some("b\"2")));
        assert_eq!(span["x"].as_i64(), Some(-2));
    }
}
