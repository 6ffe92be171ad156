//! Metric names (every one a constant here) and the Prometheus text rendering
//! of merged worker counters.
//!
//! Names keep the original gateway's so existing dashboards keep working.

use crate::control::ControlStats;
use crate::stats::WorkerStats;
use crate::worker::WorkerInfo;
use std::fmt::Write;
use std::sync::atomic::Ordering;

pub const CONNECTIONS_ACTIVE: &str = "game_gateway_connections_active";
pub const CONNECTIONS_TOTAL: &str = "game_gateway_connections_total";
pub const CONNECTION_REJECTED_TOTAL: &str = "game_gateway_connection_rejected_total";
pub const SESSIONS_ACTIVE: &str = "game_gateway_sessions_active";
pub const MESSAGES_PROCESSED_TOTAL: &str = "game_gateway_messages_processed_total";
pub const ROUTING_ERRORS_TOTAL: &str = "game_gateway_routing_errors_total";
pub const FRAMES_DROPPED_TOTAL: &str = "game_gateway_frames_dropped_total";
pub const SESSIONS_CLOSED_TOTAL: &str = "game_gateway_sessions_closed_total";
pub const PROTOCOL_ERRORS_TOTAL: &str = "game_gateway_protocol_errors_total";
pub const BACKEND_CONNECTIONS_ACTIVE: &str = "game_gateway_backend_connections_active";
pub const BACKEND_ERRORS_TOTAL: &str = "game_gateway_backend_errors_total";
pub const BACKEND_DIALS_TOTAL: &str = "game_gateway_backend_dials_total";
pub const BACKEND_BYTES_TRANSMITTED_TOTAL: &str = "game_gateway_backend_bytes_transmitted_total";
pub const RATE_LIMIT_REJECTED_TOTAL: &str = "game_gateway_rate_limit_rejected_total";
pub const CIRCUIT_BREAKER_STATE: &str = "game_gateway_circuit_breaker_state";
pub const BACKEND_RTT_SECONDS: &str = "game_gateway_backend_rtt_seconds";
pub const ROUTE_SNAPSHOT_VERSION: &str = "game_gateway_route_snapshot_version";
pub const WORKER_INFO: &str = "game_gateway_worker_info";
pub const CONFIG_REFRESH_SUCCESS_TOTAL: &str = "game_gateway_config_refresh_success_total";
pub const CONFIG_REFRESH_ERRORS_TOTAL: &str = "game_gateway_config_refresh_errors_total";
pub const ROUTE_SNAPSHOTS_REJECTED_TOTAL: &str = "game_gateway_route_snapshots_rejected_total";
pub const REDIS_UP: &str = "game_gateway_redis_up";
pub const CONFIG_RELOADS_TOTAL: &str = "game_gateway_config_reloads_total";
pub const CONFIG_RELOAD_ERRORS_TOTAL: &str = "game_gateway_config_reload_errors_total";

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labelled(out: &mut String, name: &str, label: &str, map: &ahash::AHashMap<&'static str, u64>) {
    let mut items: Vec<_> = map.iter().collect();
    items.sort();
    for (k, v) in items {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {v}", escape(k));
    }
}

/// Renders merged counters in the Prometheus text exposition format.
pub fn render(s: &WorkerStats, workers: &[WorkerInfo], c: &ControlStats) -> String {
    let mut o = String::with_capacity(4096);
    header(&mut o, CONNECTIONS_ACTIVE, "gauge", "Open client connections.");
    let _ = writeln!(o, "{CONNECTIONS_ACTIVE} {}", s.connections_active);
    header(&mut o, CONNECTIONS_TOTAL, "counter", "Client connections accepted.");
    let _ = writeln!(o, "{CONNECTIONS_TOTAL} {}", s.connections_total);
    header(&mut o, CONNECTION_REJECTED_TOTAL, "counter", "Client connections refused, by reason.");
    labelled(&mut o, CONNECTION_REJECTED_TOTAL, "reason", &s.connection_rejected);
    header(&mut o, SESSIONS_ACTIVE, "gauge", "Live sessions.");
    let _ = writeln!(o, "{SESSIONS_ACTIVE} {}", s.sessions_active);
    header(&mut o, MESSAGES_PROCESSED_TOTAL, "counter", "Frames forwarded, by direction and server type.");
    for (dir, arr) in [("client_to_backend", &s.messages_in), ("backend_to_client", &s.messages_out)] {
        for (t, v) in arr.iter().enumerate() {
            if *v > 0 {
                let _ = writeln!(o, "{MESSAGES_PROCESSED_TOTAL}{{direction=\"{dir}\",server_type=\"{t}\"}} {v}");
            }
        }
    }
    header(&mut o, ROUTING_ERRORS_TOTAL, "counter", "Client frames that could not be routed, by type.");
    labelled(&mut o, ROUTING_ERRORS_TOTAL, "type", &s.routing_errors);
    header(&mut o, FRAMES_DROPPED_TOTAL, "counter", "Frames dropped, by reason.");
    labelled(&mut o, FRAMES_DROPPED_TOTAL, "reason", &s.frames_dropped);
    header(&mut o, SESSIONS_CLOSED_TOTAL, "counter", "Sessions ended, by disconnect reason.");
    labelled(&mut o, SESSIONS_CLOSED_TOTAL, "reason", &s.sessions_closed);
    header(&mut o, PROTOCOL_ERRORS_TOTAL, "counter", "Protocol errors and timeouts, by kind.");
    labelled(&mut o, PROTOCOL_ERRORS_TOTAL, "kind", &s.protocol_errors);
    header(&mut o, RATE_LIMIT_REJECTED_TOTAL, "counter", "Connections and frames refused by a limit, by limit.");
    labelled(&mut o, RATE_LIMIT_REJECTED_TOTAL, "limit", &s.rate_limit_rejected);
    let mut backends: Vec<_> = s.backends.iter().collect();
    backends.sort_by(|a, b| a.0.cmp(b.0));
    header(&mut o, BACKEND_CONNECTIONS_ACTIVE, "gauge", "Backend connections up, by endpoint.");
    for (name, b) in &backends {
        let _ = writeln!(o, "{BACKEND_CONNECTIONS_ACTIVE}{{backend=\"{}\"}} {}", escape(name), b.connections_active);
    }
    header(&mut o, BACKEND_ERRORS_TOTAL, "counter", "Backend connection errors, by endpoint and type.");
    for (name, b) in &backends {
        let mut errs: Vec<_> = b.errors.iter().collect();
        errs.sort();
        for (k, v) in errs {
            let _ = writeln!(o, "{BACKEND_ERRORS_TOTAL}{{backend=\"{}\",type=\"{k}\"}} {v}", escape(name));
        }
    }
    header(
        &mut o,
        CIRCUIT_BREAKER_STATE,
        "gauge",
        "Circuit breaker per backend: 0 closed, 1 open, 2 half-open (worst over workers).",
    );
    for (name, b) in &backends {
        let _ = writeln!(o, "{CIRCUIT_BREAKER_STATE}{{backend=\"{}\"}} {}", escape(name), b.circuit_state);
    }
    header(&mut o, BACKEND_RTT_SECONDS, "summary", "Keep-alive PING round trips per backend.");
    for (name, b) in &backends {
        let n = escape(name);
        let _ = writeln!(o, "{BACKEND_RTT_SECONDS}_sum{{backend=\"{n}\"}} {}", b.rtt_sum_us as f64 / 1e6);
        let _ = writeln!(o, "{BACKEND_RTT_SECONDS}_count{{backend=\"{n}\"}} {}", b.rtt_count);
    }
    header(&mut o, BACKEND_DIALS_TOTAL, "counter", "Backend dial attempts, by endpoint.");
    for (name, b) in &backends {
        let _ = writeln!(o, "{BACKEND_DIALS_TOTAL}{{backend=\"{}\"}} {}", escape(name), b.dials);
    }
    header(&mut o, BACKEND_BYTES_TRANSMITTED_TOTAL, "counter", "Bytes to and from backends.");
    for (name, b) in &backends {
        let n = escape(name);
        let _ = writeln!(o, "{BACKEND_BYTES_TRANSMITTED_TOTAL}{{backend=\"{n}\",direction=\"sent\"}} {}", b.bytes_sent);
        let _ = writeln!(
            o,
            "{BACKEND_BYTES_TRANSMITTED_TOTAL}{{backend=\"{n}\",direction=\"received\"}} {}",
            b.bytes_received
        );
    }
    header(&mut o, ROUTE_SNAPSHOT_VERSION, "gauge", "Routing snapshot version (lowest over workers).");
    let _ = writeln!(o, "{ROUTE_SNAPSHOT_VERSION} {}", s.route_version);
    header(&mut o, WORKER_INFO, "gauge", "One per worker: its core and I/O driver.");
    for w in workers {
        let cpu = w.cpu.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        let _ = writeln!(o, "{WORKER_INFO}{{worker=\"{}\",cpu=\"{cpu}\",io_driver=\"{}\"}} 1", w.index, w.io_driver);
    }
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, kind, help, v) in [
        (CONFIG_REFRESH_SUCCESS_TOTAL, "counter", "Successful route reads from Redis.", ld(&c.refresh_success)),
        (CONFIG_REFRESH_ERRORS_TOTAL, "counter", "Failed or rejected route reads from Redis.", ld(&c.refresh_errors)),
        (
            ROUTE_SNAPSHOTS_REJECTED_TOTAL,
            "counter",
            "Route snapshots rejected by validation.",
            ld(&c.snapshots_rejected),
        ),
        (CONFIG_RELOADS_TOTAL, "counter", "Config file reloads applied.", ld(&c.config_reloads)),
        (CONFIG_RELOAD_ERRORS_TOTAL, "counter", "Config file reloads rejected.", ld(&c.config_reload_errors)),
        (
            REDIS_UP,
            "gauge",
            "1 when Redis answered the last read, 0 when not (or not configured).",
            (c.redis_state.load(Ordering::Relaxed) == 1) as u64,
        ),
    ] {
        header(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    o
}
