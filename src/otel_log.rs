//! The `otel` log format (`[log] format = "otel"`): one JSON object per
//! line with the Go gateway's field names and value types, which are the
//! OpenTelemetry log data model's:
//!
//! | field | type | value |
//! |---|---|---|
//! | `timestamp` | integer | Unix epoch nanoseconds |
//! | `severity_text` | string | `TRACE`, `DEBUG`, `INFO`, `WARN`, `ERROR` |
//! | `severity_number` | integer | 1, 5, 9, 13, 17 (OpenTelemetry's numbers) |
//! | `body` | string | the message |
//! | `caller` | string | last directory, file and line: `shard/session.rs:696` |
//! | `service.name`, `service.namespace`, `service.version` | string | [`Resource`] |
//!
//! followed by the event's own fields with their types (integers stay
//! integers, `%`/`?` values are strings), `target` and `thread.name`. The
//! access log uses the same envelope with `body` = `"access_log"`
//! ([`crate::access_log`]).
//!
//! [`install`] makes the format process-wide (it is restart-only, like the
//! tracing subscriber it goes with): the access log reads [`active`] when it
//! writes a record.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The `service.*` fields of every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub service_name: String,
    pub service_namespace: String,
    pub service_version: String,
}

impl Resource {
    /// From the log config; the version is this build's.
    pub fn of(log: &crate::config::LogConfig) -> Resource {
        Resource {
            service_name: log.service_name.clone(),
            service_namespace: log.service_namespace.clone(),
            service_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

static ACTIVE: OnceLock<Resource> = OnceLock::new();

/// Makes the `otel` format the process's (for the access log); the first
/// call wins.
pub fn install(resource: Resource) {
    let _ = ACTIVE.set(resource);
}

/// The resource when the `otel` format is on.
pub fn active() -> Option<&'static Resource> {
    ACTIVE.get()
}

/// `(severity_text, severity_number)` of a level.
pub fn severity(level: &Level) -> (&'static str, u8) {
    match *level {
        Level::TRACE => ("TRACE", 1),
        Level::DEBUG => ("DEBUG", 5),
        Level::INFO => ("INFO", 9),
        Level::WARN => ("WARN", 13),
        Level::ERROR => ("ERROR", 17),
    }
}

/// The last directory, the file name and the line: `src/shard/session.rs`
/// line 696 gives `shard/session.rs:696`.
pub fn caller(file: &str, line: u32) -> String {
    let mut parts = file.rsplit(['/', '\\']);
    let name = parts.next().unwrap_or(file);
    match parts.next() {
        Some(dir) if !dir.is_empty() => format!("{dir}/{name}:{line}"),
        _ => format!("{name}:{line}"),
    }
}

/// Now, in Unix epoch nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// One JSON object written field by field, in order (serde_json's map would
/// sort the keys). Keys are written once: a later duplicate is dropped.
pub(crate) struct Line {
    buf: String,
    keys: Vec<String>,
}

impl Line {
    pub(crate) fn new() -> Line {
        Line { buf: String::from("{"), keys: Vec::new() }
    }

    pub(crate) fn field(&mut self, key: &str, value: impl serde::Serialize) {
        if self.keys.iter().any(|k| k == key) {
            return;
        }
        self.keys.push(key.to_string());
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        let _ = write!(self.buf, "{}:", serde_json::Value::from(key));
        match serde_json::to_string(&value) {
            Ok(v) => self.buf.push_str(&v),
            Err(_) => self.buf.push_str("null"),
        }
    }

    /// The envelope every line starts with.
    pub(crate) fn envelope(r: &Resource, level: &Level, body: &str, caller: &str) -> Line {
        let (text, number) = severity(level);
        let mut l = Line::new();
        l.field("timestamp", now_ns());
        l.field("severity_text", text);
        l.field("severity_number", number);
        l.field("body", body);
        l.field("caller", caller);
        l.field("service.name", &r.service_name);
        l.field("service.namespace", &r.service_namespace);
        l.field("service.version", &r.service_version);
        l
    }

    pub(crate) fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// Collects an event's fields as JSON values of their own type.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: serde_json::Value) {
        if field.name() == "message" {
            self.message = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.push((field.name(), v));
        }
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map(serde_json::Value::Number);
        self.put(field, v.unwrap_or_else(|| value.to_string().into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value).map(Into::into).unwrap_or_else(|_| value.to_string().into());
        self.put(field, v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value).map(Into::into).unwrap_or_else(|_| value.to_string().into());
        self.put(field, v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// The tracing-subscriber event formatter of the `otel` format.
pub struct OtelFormat {
    pub resource: Resource,
}

impl<S, N> FormatEvent<S, N> for OtelFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let caller = match (meta.file(), meta.line()) {
            (Some(file), Some(line)) => caller(file, line),
            _ => meta.target().to_string(),
        };
        let mut line = Line::envelope(&self.resource, meta.level(), &f.message, &caller);
        for (k, v) in f.fields {
            line.field(k, v);
        }
        line.field("target", meta.target());
        if let Some(name) = std::thread::current().name() {
            line.field("thread.name", name);
        }
        writeln!(writer, "{}", line.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_is_the_last_directory_file_and_line() {
        assert_eq!(caller("src/shard/session.rs", 696), "shard/session.rs:696");
        assert_eq!(caller("main.rs", 3), "main.rs:3");
        assert_eq!(caller("/a/b/c.rs", 1), "b/c.rs:1");
    }

    #[test]
    fn severities_are_opentelemetry_numbers() {
        assert_eq!(severity(&Level::DEBUG), ("DEBUG", 5));
        assert_eq!(severity(&Level::INFO), ("INFO", 9));
        assert_eq!(severity(&Level::WARN), ("WARN", 13));
        assert_eq!(severity(&Level::ERROR), ("ERROR", 17));
    }

    #[test]
    fn a_line_keeps_field_order_types_and_the_first_of_duplicates() {
        let r = Resource { service_name: "gw".into(), service_namespace: "".into(), service_version: "1".into() };
        let mut l = Line::envelope(&r, &Level::WARN, "hello \"x\"", "a/b.rs:1");
        l.field("session_id", 42u64);
        l.field("body", "again");
        let text = l.finish();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["timestamp"].is_u64() && v["severity_number"] == 13 && v["body"] == "hello \"x\"", "{text}");
        assert_eq!((v["service.namespace"].as_str(), v["session_id"].as_u64()), (Some(""), Some(42)));
        assert!(text.starts_with("{\"timestamp\":"), "{text}");
    }
}
