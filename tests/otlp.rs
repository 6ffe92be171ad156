//! OTLP trace export over real sockets: a receiver in the test decodes the
//! real OTLP protobuf requests (`opentelemetry-proto`) and checks the spans'
//! parent/child ids, the trace and span ids the backend saw, and the
//! resource attributes from the pod's environment.

mod common;

use common::*;
use mock_backend::{Event, Options};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

/// An OTLP/HTTP receiver: every request body, decoded.
fn receiver() -> (String, crossbeam_channel::Receiver<ExportTraceServiceRequest>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    assert!(line.starts_with("POST /v1/traces "), "{line}");
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    tx.send(ExportTraceServiceRequest::decode(&body[..]).expect("an OTLP protobuf request")).unwrap();
                    let mut c = conn.try_clone().unwrap();
                    c.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
                    )
                    .unwrap();
                }
            });
        }
    });
    (url, rx)
}

#[test]
fn sampled_sessions_export_setup_route_forward_and_session_spans() {
    let (url, requests) = receiver();
    let mb = mock_with(Options { record_trans: true, trace: true, ..Default::default() });
    let cfg = config_text(1, "", &route(10, 0, "round_robin", &[mb.addr()], "trace_propagation = true"));
    let gw = GatewayProcess::spawn_env(
        &cfg,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            ("OTEL_SERVICE_NAME", "realm-gw"),
            ("POD_NAME", "gw-3"),
            ("POD_NAMESPACE", "realm-7"),
        ],
    );
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"one");
    c.echo(2, sid(1, 10, 0), b"two");
    drop(c);
    let mut spans: Vec<Span> = Vec::new();
    let mut resource = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !spans.iter().any(|s| s.name == "session") && std::time::Instant::now() < deadline {
        if let Ok(req) = requests.recv_timeout(Duration::from_millis(500)) {
            for rs in req.resource_spans {
                resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
        }
    }
    let by = |name: &str| spans.iter().filter(|s| s.name == name).cloned().collect::<Vec<_>>();
    let root = by("session").pop().expect("a session span");
    assert!(root.parent_span_id.is_empty(), "the session span is the root");
    for name in ["session.setup", "route", "forward"] {
        let s = by(name);
        assert!(!s.is_empty(), "a {name} span");
        for s in s {
            assert_eq!(s.trace_id, root.trace_id, "{name} in the session's trace");
            assert_eq!(s.parent_span_id, root.span_id, "{name} is a child of the session span");
        }
    }
    assert_eq!(by("forward").len(), 2);
    // The ids the backend got in the trace extension are the spans' ids.
    let seen: Vec<([u8; 16], [u8; 8])> = mb
        .drain()
        .into_iter()
        .filter_map(|e| match e {
            Event::Trans { trace: Some(t), .. } => Some((t.trace_id, t.span_id)),
            _ => None,
        })
        .collect();
    assert_eq!(seen.len(), 2);
    for (trace_id, span_id) in seen {
        assert_eq!(trace_id.to_vec(), root.trace_id);
        assert!(by("forward").iter().any(|f| f.span_id == span_id.to_vec()), "a forward span per frame sent");
    }
    let attr = |k: &str| {
        resource
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
            .map(|v| format!("{v:?}"))
    };
    assert!(attr("service.name").unwrap().contains("realm-gw"));
    assert!(attr("k8s.pod.name").unwrap().contains("gw-3"));
    assert!(attr("k8s.namespace.name").unwrap().contains("realm-7"));
}
