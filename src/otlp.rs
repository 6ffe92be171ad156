//! OTLP trace export: spans for session setup, routing and forwarding,
//! sampled per session, exported off the data path.
//!
//! Workers record [`SpanRecord`]s for sampled sessions only (the shard decides
//! at accept, by `[otlp] sample_ratio`), batch them per tick and hand each
//! batch to this module's exporter thread over a bounded channel (a full
//! channel drops the batch, counted). The exporter groups spans into
//! `ExportTraceServiceRequest`s (the official OTLP protobuf messages, from
//! `opentelemetry-proto`) and POSTs them to `{endpoint}/v1/traces` as
//! `application/x-protobuf` (OTLP/HTTP). Trace ids are the sessions' trace
//! ids; a forwarded frame's span id is the one sent to the backend in the
//! gate header's trace extension, so backend spans join the same trace.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, ResourceSpans, ScopeSpans, Span};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Span batches waiting for the exporter.
pub(crate) const EXPORT_QUEUE: usize = 64;
/// Spans per export request at most.
const MAX_SPANS_PER_REQUEST: usize = 2048;
/// Longest a span waits in the exporter before it is sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Attr {
    Str(String),
    Int(i64),
}

/// One finished span, recorded by a worker.
#[derive(Debug, Clone)]
pub(crate) struct SpanRecord {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) parent: Option<[u8; 8]>,
    pub(crate) name: &'static str,
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) attrs: Vec<(&'static str, Attr)>,
}

/// Unix time in nanoseconds.
pub(crate) fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// What the exporter counts (exported to /metrics).
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
}

fn kv(key: &str, v: Attr) -> KeyValue {
    let value = match v {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// The request for `spans`, with the process's resource attributes.
pub(crate) fn request(resource: &[(String, String)], spans: Vec<SpanRecord>) -> ExportTraceServiceRequest {
    let spans = spans
        .into_iter()
        .map(|s| Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.to_string(),
            kind: if s.name == "forward" { SpanKind::Producer as i32 } else { SpanKind::Server as i32 },
            start_time_unix_nano: s.start_ns,
            end_time_unix_nano: s.end_ns,
            attributes: s.attrs.into_iter().map(|(k, v)| kv(k, v)).collect(),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, Attr::Str(v.clone()))).collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "game-gateway".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Starts the exporter thread; returns the channel workers hand batches to.
/// It ends when every worker has dropped its sender.
pub(crate) fn spawn_exporter(
    endpoint: String,
    resource: Vec<(String, String)>,
    stats: Arc<ExportStats>,
) -> std::io::Result<crossbeam_channel::Sender<Vec<SpanRecord>>> {
    let (tx, rx) = crossbeam_channel::bounded::<Vec<SpanRecord>>(EXPORT_QUEUE);
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    std::thread::Builder::new().name("gw-otlp".into()).spawn(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
        let mut pending: Vec<SpanRecord> = Vec::new();
        loop {
            let closed = match rx.recv_timeout(EXPORT_EVERY) {
                Ok(batch) => {
                    pending.extend(batch);
                    if pending.len() < MAX_SPANS_PER_REQUEST {
                        continue;
                    }
                    false
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => true,
            };
            while !pending.is_empty() {
                let n = pending.len().min(MAX_SPANS_PER_REQUEST);
                let batch: Vec<SpanRecord> = pending.drain(..n).collect();
                let body = request(&resource, batch).encode_to_vec();
                match agent.post(&url).header("content-type", "application/x-protobuf").send(&body[..]) {
                    Ok(_) => {
                        stats.exported.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.failed.fetch_add(n as u64, Ordering::Relaxed);
                        tracing::warn!(url = %url, error = %e, spans = n, "OTLP export failed; spans dropped");
                    }
                }
            }
            if closed {
                return;
            }
        }
    })?;
    Ok(tx)
}
