//! Metrics: every name is a constant here (and label values known in advance
//! are listed here, exported at zero from the start); the [`GatewayCollector`] turns the
//! workers' counters (merged at scrape time) and the control side's into
//! Prometheus metric families, encoded by the `prometheus` crate. Label
//! values the published routes make known (every endpoint for the
//! per-backend families, every rule's server type for
//! `messages_processed_total`) are exported at zero too, from the control
//! side's [`crate::state::RouteLabels`], so that every family the alerts and
//! dashboard use exists on a fresh gateway.
//!
//! Names keep the original gateway's so dashboards and alerts keep working,
//! and so do its label names and values: where our label differs, the Go
//! gateway's label is exported beside ours on the same series (`type` and
//! `error_type`, `server_type` and `service_type`) so that neither side's
//! `sum by (...)` double counts; where the label name is the same but the
//! values differ, the values are the Go gateway's and our finer value moves
//! to a label of its own (`connection_rejected_total{reason, refusal}`), or
//! the values are renamed one to one (`backend_bytes_transmitted_total`
//! `direction` = `request` / `response`). [`go`] holds those mappings.
//! The data path never sees any of this: workers keep plain integers and
//! fixed-bucket histograms and hand copies over when asked.

use crate::protocol::backend::DisconnectReason;
use crate::routing::RouteError;
use crate::state::{ControlStats, RedisState};
use crate::stats::{BackendStats, LatencyHistogram, WorkerStats, LATENCY_BOUNDS};
use crate::worker::WorkerInfo;
use ahash::AHashMap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) const CONNECTIONS_ACTIVE: &str = "game_gateway_connections_active";
pub(crate) const CONNECTIONS_TOTAL: &str = "game_gateway_connections_total";
pub(crate) const CONNECTION_REJECTED_TOTAL: &str = "game_gateway_connection_rejected_total";
pub(crate) const SESSIONS_ACTIVE: &str = "game_gateway_sessions_active";
pub(crate) const MESSAGES_PROCESSED_TOTAL: &str = "game_gateway_messages_processed_total";
pub(crate) const ROUTING_ERRORS_TOTAL: &str = "game_gateway_routing_errors_total";
pub(crate) const RATE_LIMIT_REJECTED_TOTAL: &str = "game_gateway_rate_limit_rejected_total";
pub(crate) const CIRCUIT_BREAKER_STATE: &str = "game_gateway_circuit_breaker_state";
pub(crate) const BACKEND_CONNECTIONS_ACTIVE: &str = "game_gateway_backend_connections_active";
pub(crate) const BACKEND_ERRORS_TOTAL: &str = "game_gateway_backend_errors_total";
pub(crate) const BACKEND_RETRIES_TOTAL: &str = "game_gateway_backend_retries_total";
pub(crate) const BACKEND_TIMEOUTS_TOTAL: &str = "game_gateway_backend_timeouts_total";
pub(crate) const BACKEND_BYTES_TRANSMITTED_TOTAL: &str = "game_gateway_backend_bytes_transmitted_total";
pub(crate) const BACKEND_DIALS_TOTAL: &str = "game_gateway_backend_dials_total";
pub(crate) const CONNECTION_SETUP_LATENCY_SECONDS: &str = "game_gateway_connection_setup_latency_seconds";
pub(crate) const BACKEND_CONNECTION_LATENCY_SECONDS: &str = "game_gateway_backend_connection_latency_seconds";
pub(crate) const CONFIG_REFRESH_SUCCESS_TOTAL: &str = "game_gateway_config_refresh_success_total";
pub(crate) const CONFIG_REFRESH_ERRORS_TOTAL: &str = "game_gateway_config_refresh_errors_total";
pub(crate) const CONFIG_REFRESH_EMPTY_TOTAL: &str = "game_gateway_config_refresh_empty_total";
pub(crate) const MAX_CONNECTIONS_EFFECTIVE: &str = "game_gateway_max_connections_effective";
pub(crate) const FORWARD_LATENCY_SECONDS: &str = "game_gateway_forward_latency_seconds";
pub(crate) const BACKEND_RTT_SECONDS: &str = "game_gateway_backend_rtt_seconds";
pub(crate) const ROUTE_SNAPSHOT_VERSION: &str = "game_gateway_route_snapshot_version";
pub(crate) const ROUTE_PROPAGATION_SECONDS: &str = "game_gateway_route_propagation_seconds";
pub(crate) const WORKER_INFO: &str = "game_gateway_worker_info";
pub(crate) const FRAMES_DROPPED_TOTAL: &str = "game_gateway_frames_dropped_total";
pub(crate) const SESSIONS_CLOSED_TOTAL: &str = "game_gateway_sessions_closed_total";
pub(crate) const PROTOCOL_ERRORS_TOTAL: &str = "game_gateway_protocol_errors_total";
pub(crate) const ROUTE_SNAPSHOTS_REJECTED_TOTAL: &str = "game_gateway_route_snapshots_rejected_total";
pub(crate) const REDIS_UP: &str = "game_gateway_redis_up";
pub(crate) const CONSUL_ERRORS_TOTAL: &str = "game_gateway_consul_errors_total";
pub(crate) const ROUTE_DATA_WARNINGS_TOTAL: &str = "game_gateway_route_data_warnings_total";
pub(crate) const CONFIG_RELOADS_TOTAL: &str = "game_gateway_config_reloads_total";
pub(crate) const CONFIG_RELOAD_ERRORS_TOTAL: &str = "game_gateway_config_reload_errors_total";
pub(crate) const ACCESS_LOG_RECORDS_TOTAL: &str = "game_gateway_access_log_records_total";
pub(crate) const ACCESS_LOG_DROPPED_TOTAL: &str = "game_gateway_access_log_dropped_total";
pub(crate) const WORKERS_RESPONSIVE: &str = "game_gateway_workers_responsive";
pub(crate) const WEBSOCKET_UPGRADES_TOTAL: &str = "game_gateway_websocket_upgrades_total";
pub(crate) const DRAINING: &str = "game_gateway_draining";
pub(crate) const TLS_CERTIFICATE_EXPIRY_SECONDS: &str = "game_gateway_tls_certificate_expiry_seconds";
pub(crate) const TRACE_SPANS_DROPPED_TOTAL: &str = "game_gateway_trace_spans_dropped_total";
pub(crate) const MESSAGE_POLICY_TOTAL: &str = "game_gateway_message_policy_total";
pub(crate) const ANNOUNCEMENTS_DELIVERED_TOTAL: &str = "game_gateway_announcements_delivered_total";
pub(crate) const ANNOUNCEMENTS_RECEIVED_TOTAL: &str = "game_gateway_announcements_received_total";
pub(crate) const ANNOUNCEMENTS_DROPPED_TOTAL: &str = "game_gateway_announcements_dropped_total";
pub(crate) const ANNOUNCEMENTS_REFUSED_TOTAL: &str = "game_gateway_announcements_refused_total";
pub(crate) const WORKER_HEARTBEAT_AGE_SECONDS: &str = "game_gateway_worker_heartbeat_age_seconds";
pub(crate) const OVERLOAD_BUDGET_BYTES: &str = "game_gateway_overload_budget_bytes";
pub(crate) const OVERLOAD_QUEUED_BYTES: &str = "game_gateway_overload_queued_bytes";
pub(crate) const OVERLOAD_STATE: &str = "game_gateway_overload_state";
pub(crate) const OVERLOAD_ACTIONS_TOTAL: &str = "game_gateway_overload_actions_total";
pub(crate) const HANDOFF_SESSIONS_TOTAL: &str = "game_gateway_handoff_sessions_total";
pub(crate) const HANDOFF_PAUSE_SECONDS: &str = "game_gateway_handoff_pause_seconds";
// Families the Go gateway exported (or its dashboard used) that we derive
// from the counters above.
pub(crate) const BACKEND_REQUESTS_TOTAL: &str = "game_gateway_backend_requests_total";
pub(crate) const BACKEND_POOL_ACTIVE: &str = "game_gateway_backend_pool_active";
pub(crate) const BACKEND_POOL_IDLE: &str = "game_gateway_backend_pool_idle";
pub(crate) const POOL_CLEANUP_ERRORS_TOTAL: &str = "game_gateway_pool_cleanup_errors_total";
// The Go client library's handler metrics (promhttp), kept by name.
pub(crate) const PROMHTTP_REQUESTS_TOTAL: &str = "promhttp_metric_handler_requests_total";
pub(crate) const PROMHTTP_REQUESTS_IN_FLIGHT: &str = "promhttp_metric_handler_requests_in_flight";

/// The Go gateway's label values, from ours. Each function maps one of our
/// values to the Go gateway's value for the same event; a value of ours with
/// no Go counterpart maps to itself (a new value beside the Go gateway's).
pub(crate) mod go {
    /// `routing_errors_total{error_type}` from our `type`.
    pub(crate) fn routing_error_type(t: &str) -> &str {
        match t {
            // The Go gateway said `not_found` for no rule, no endpoints and
            // an unknown strategy alike.
            "no_rule" | "no_endpoints" => "not_found",
            // Every endpoint of the rule skipped: circuit open (or backing
            // off after a failure, which the Go gateway did not have).
            "backend_unavailable" => "circuit_breaker_open",
            other => other,
        }
    }

    /// `backend_errors_total{error_type}` from our `type`.
    pub(crate) fn backend_error_type(t: &str) -> &str {
        match t {
            "dial_failed" => "connection_failed",
            "dial_timeout" | "keepalive_timeout" => "timeout",
            // Frames refused because the endpoint is not usable (circuit
            // open, backing off, or its connection gone).
            "backend_unavailable" => "circuit_breaker_open",
            other => other,
        }
    }

    /// `connection_rejected_total{reason}` from our refusal.
    pub(crate) fn rejection_reason(r: &str) -> &str {
        match r {
            "max_connections" => "global_rate_limit",
            "max_connections_per_ip" | "connection_rate_per_ip" | "ip_table_full" => "ip_rate_limit",
            other => other,
        }
    }

    /// `routing_errors_total` values only the Go gateway had; we derive them
    /// (see `families`).
    pub(crate) const ROUTING_ERROR_TYPES_DERIVED: [&str; 2] = ["connection_failed", "message_too_large"];
    /// `connection_rejected_total{reason}` values of the Go gateway's worker
    /// pool and accept queue: there is no such pool here, they stay 0.
    pub(crate) const REJECTION_REASONS_NEVER: [&str; 2] = ["pool_and_queue_full", "pool_closed_or_full"];
    /// `backend_errors_total{error_type}`: the Go gateway's failed gRPC
    /// connect notice. Here `CONNECT` is a frame queued on the backend
    /// connection; its loss is counted as that connection's loss (or as
    /// `backend_queue_full`), so this stays 0.
    pub(crate) const BACKEND_ERROR_TYPES_NEVER: [&str; 1] = ["notification_failed"];
    /// `config_refresh_*_total{config_type}`: one read of ours covers both
    /// keys (and is validated whole), so both values carry the same count.
    pub(crate) const CONFIG_TYPES: [&str; 2] = ["routing_rules", "realm_mapping"];
}

// Label values known in advance, exported at zero from the start so that
// `rate()` panels and alerts see every series of a fresh gateway. They come
// from the shard's own enums (one source of truth); a value missing here is
// still exported as soon as it is counted.

/// `connection_rejected_total{reason}`: every admission refusal, and accept failures.
fn connection_rejected_reasons() -> impl Iterator<Item = &'static str> {
    crate::shard::AcceptRefusal::ALL.iter().map(|r| r.as_str()).chain(["accept_error", "overload"])
}
/// `rate_limit_rejected_total{limit}`: the per-IP limits and the per-session frame rate.
fn rate_limits() -> impl Iterator<Item = &'static str> {
    crate::limits::Refusal::ALL.iter().map(|r| r.as_str()).chain(["messages_per_second"])
}
/// `frames_dropped_total{reason}`.
fn frames_dropped_reasons() -> impl Iterator<Item = &'static str> {
    crate::shard::DropReason::ALL.iter().map(|r| r.as_str())
}

/// `protocol_errors_total{kind}`. The shard names these where they happen
/// (front door refusals, WebSocket close codes, timeouts, slow readers,
/// backend frames) rather than in one enum, so they are listed here.
const PROTOCOL_ERROR_KINDS: [&str; 16] = [
    "frame_too_large",
    "slow_reader",
    "handshake_timeout",
    "idle_timeout",
    "proxy_not_enabled",
    "proxy_untrusted",
    "proxy_malformed",
    "http_426",
    "http_400",
    "http_403",
    "http_404",
    "http_431",
    "websocket_text",
    "websocket_too_large",
    "websocket_protocol",
    "backend_frame",
];
/// `backend_errors_total{type}`: connection losses (the shard's loss kinds),
/// circuit openings, rebinds, and frames a backend connection refused.
const BACKEND_ERROR_TYPES: [&str; 11] = [
    "dial_failed",
    "dial_timeout",
    "closed_by_backend",
    "read_failed",
    "write_failed",
    "protocol_error",
    "keepalive_timeout",
    "circuit_opened",
    "session_rebind",
    "backend_queue_full",
    "backend_unavailable",
];

/// `(label value, count)` for every value in `map` and every `known` one (0
/// when not counted yet).
fn with_known<'a>(map: &AHashMap<&'static str, u64>, known: impl IntoIterator<Item = &'a str>) -> Vec<(&'a str, u64)> {
    let mut v: Vec<(&str, u64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
    for k in known {
        if !map.contains_key(k) {
            v.push((k, 0));
        }
    }
    v
}

/// The circuit breaker gauge value as `/status` names it.
pub(crate) fn circuit_name(gauge: u64) -> &'static str {
    match gauge {
        0 => "closed",
        1 => "open",
        _ => "half_open",
    }
}

/// Builds one metric family at a time.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Family(mf)
    }

    fn metric(labels: &[(&str, &str)]) -> proto::Metric {
        let mut m = proto::Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        m
    }

    fn value(mut self, labels: &[(&str, &str)], v: f64) -> Family {
        let mut m = Self::metric(labels);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
        }
        self.0.mut_metric().push(m);
        self
    }

    fn histogram(mut self, labels: &[(&str, &str)], h: &LatencyHistogram) -> Family {
        let mut m = Self::metric(labels);
        let mut ph = proto::Histogram::default();
        ph.set_sample_count(h.count);
        ph.set_sample_sum(h.sum_ns as f64 / 1e9);
        let mut cumulative = 0;
        let buckets = LATENCY_BOUNDS
            .iter()
            .zip(h.counts.iter())
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(*bound);
                b
            })
            .collect();
        ph.set_bucket(buckets);
        m.set_histogram(ph);
        self.0.mut_metric().push(m);
        self
    }

    /// One series per `(label value, count)`, sorted for stable output.
    fn by<'a>(mut self, label: &str, items: impl IntoIterator<Item = (&'a str, u64)>) -> Family {
        let mut v: Vec<_> = items.into_iter().collect();
        v.sort();
        for (k, n) in v {
            self = self.value(&[(label, k)], n as f64);
        }
        self
    }
}

/// Everything `/metrics` reports, as metric families.
fn families(s: &WorkerStats, workers: &[WorkerInfo], responsive: usize, c: &ControlStats) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let routing_errors = RouteError::ALL.map(RouteError::as_str);
    let close_reasons: Vec<&str> = (0..=u8::MAX).filter_map(DisconnectReason::from_u8).map(|r| r.as_str()).collect();
    // Label values the published routes make known: every endpoint and
    // server type is exported at zero before its first frame.
    let known = c.route_labels.lock().unwrap().clone();
    let policy_classes = c.policy_classes.lock().unwrap().clone();
    let unused = BackendStats::default();
    let mut backends: Vec<(&str, &BackendStats)> = s.backends.iter().map(|(k, v)| (&**k, v)).collect();
    for e in &known.endpoints {
        if !s.backends.contains_key(e) {
            backends.push((e, &unused));
        }
    }
    backends.sort_by(|a, b| a.0.cmp(b.0));
    let per_backend = |name: &str, help: &str, kind: MetricType, f: &dyn Fn(&BackendStats) -> f64| {
        let mut fam = Family::new(name, help, kind);
        for (b, st) in &backends {
            fam = fam.value(&[("backend", b)], f(st));
        }
        fam.0
    };
    let mut messages =
        Family::new(MESSAGES_PROCESSED_TOTAL, "Frames forwarded, by direction and server type.", COUNTER);
    for (dir, arr) in [("client_to_backend", &s.messages_in), ("backend_to_client", &s.messages_out)] {
        for (t, v) in arr.iter().enumerate() {
            if *v > 0 || known.server_types.binary_search(&(t as u8)).is_ok() {
                let t = t.to_string();
                messages = messages.value(&[("direction", dir), ("server_type", &t), ("service_type", &t)], *v as f64);
            }
        }
    }
    let mut bytes = Family::new(BACKEND_BYTES_TRANSMITTED_TOTAL, "Bytes to and from backends.", COUNTER);
    let mut errors = Family::new(BACKEND_ERRORS_TOTAL, "Backend connection errors, by endpoint and type.", COUNTER);
    let mut rtt = Family::new(BACKEND_RTT_SECONDS, "Keep-alive PING round trips, by endpoint.", HISTOGRAM);
    let mut requests = Family::new(
        BACKEND_REQUESTS_TOTAL,
        "Frames towards a backend: success = written to it, error = refused (endpoint unavailable or its queue full).",
        COUNTER,
    );
    let mut pool_active = Family::new(BACKEND_POOL_ACTIVE, "Backend connections up and serving sessions.", GAUGE);
    let mut pool_idle = Family::new(BACKEND_POOL_IDLE, "Backend connections up and serving no session.", GAUGE);
    // Failed backend dials, for routing_errors_total{error_type="connection_failed"}.
    let mut dials_failed = 0;
    for (b, st) in &backends {
        // The Go gateway's direction values: request = towards the backend.
        bytes = bytes.value(&[("backend", b), ("direction", "request")], st.bytes_sent as f64);
        bytes = bytes.value(&[("backend", b), ("direction", "response")], st.bytes_received as f64);
        let mut errs = with_known(&st.errors, BACKEND_ERROR_TYPES.into_iter().chain(go::BACKEND_ERROR_TYPES_NEVER));
        errs.sort();
        for (k, v) in errs {
            errors = errors.value(&[("backend", b), ("type", k), ("error_type", go::backend_error_type(k))], v as f64);
        }
        let get = |k: &str| WorkerStats::get(&st.errors, k);
        dials_failed += get("dial_failed") + get("dial_timeout");
        requests = requests.value(&[("backend", b), ("status", "success")], st.frames_sent as f64);
        requests = requests.value(
            &[("backend", b), ("status", "error")],
            (get("backend_unavailable") + get("backend_queue_full")) as f64,
        );
        // A seed_tcp connection serves one session; a multiplexed one
        // serves many: connections up beyond the sessions bound are idle.
        let active = st.connections_active.min(st.sessions_bound);
        pool_active = pool_active.value(&[("backend", b)], active as f64);
        pool_idle = pool_idle.value(&[("backend", b)], (st.connections_active - active) as f64);
        rtt = rtt.histogram(&[("backend", b)], &st.rtt);
    }
    let mut routing = Family::new(ROUTING_ERRORS_TOTAL, "Client frames that could not be routed, by type.", COUNTER);
    let mut by_type = with_known(&s.routing_errors, routing_errors);
    by_type.sort();
    for (t, v) in by_type {
        routing = routing.value(&[("type", t), ("error_type", go::routing_error_type(t))], v as f64);
    }
    let oversize = WorkerStats::get(&s.protocol_errors, "frame_too_large")
        + WorkerStats::get(&s.protocol_errors, "websocket_too_large");
    for (t, v) in go::ROUTING_ERROR_TYPES_DERIVED.into_iter().zip([dials_failed, oversize]) {
        routing = routing.value(&[("type", t), ("error_type", t)], v as f64);
    }
    let mut rejected = Family::new(
        CONNECTION_REJECTED_TOTAL,
        "Client connections refused, by reason (the Go gateway's) and refusal (ours).",
        COUNTER,
    );
    let mut refusals =
        with_known(&s.connection_rejected, connection_rejected_reasons().chain(go::REJECTION_REASONS_NEVER));
    refusals.sort_by_key(|(r, _)| (go::rejection_reason(r), *r));
    for (r, v) in refusals {
        rejected = rejected.value(&[("reason", go::rejection_reason(r)), ("refusal", r)], v as f64);
    }
    let per_config_type = |name: &str, help: &str, v: f64| {
        let mut f = Family::new(name, help, COUNTER);
        for t in go::CONFIG_TYPES {
            f = f.value(&[("config_type", t)], v);
        }
        f.0
    };
    let mut info = Family::new(WORKER_INFO, "One series per worker: its core and I/O driver.", GAUGE);
    for w in workers {
        let cpu = w.cpu.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        info = info.value(&[("worker", &w.index.to_string()), ("cpu", &cpu), ("io_driver", w.io_driver)], 1.0);
    }
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let max_connections = c.fd_budget.lock().unwrap().map(|b| b.effective_max_connections).unwrap_or(0);
    vec![
        Family::new(CONNECTIONS_ACTIVE, "Open client connections.", GAUGE).value(&[], s.connections_active as f64).0,
        Family::new(CONNECTIONS_TOTAL, "Client connections accepted.", COUNTER)
            .value(&[], s.connections_total as f64)
            .0,
        rejected.0,
        Family::new(SESSIONS_ACTIVE, "Live sessions.", GAUGE).value(&[], s.sessions_active as f64).0,
        messages.0,
        routing.0,
        Family::new(RATE_LIMIT_REJECTED_TOTAL, "Connections and frames refused by a limit, by limit.", COUNTER)
            .by("limit", with_known(&s.rate_limit_rejected, rate_limits()))
            .0,
        Family::new(FRAMES_DROPPED_TOTAL, "Frames dropped, by reason.", COUNTER)
            .by("reason", with_known(&s.frames_dropped, frames_dropped_reasons()))
            .0,
        Family::new(SESSIONS_CLOSED_TOTAL, "Sessions ended, by disconnect reason.", COUNTER)
            .by("reason", with_known(&s.sessions_closed, close_reasons))
            .0,
        Family::new(PROTOCOL_ERRORS_TOTAL, "Protocol errors and timeouts, by kind.", COUNTER)
            .by("kind", with_known(&s.protocol_errors, PROTOCOL_ERROR_KINDS))
            .0,
        per_backend(
            CIRCUIT_BREAKER_STATE,
            "Circuit breaker: 0 closed, 1 open, 2 half-open (worst over workers).",
            GAUGE,
            &|b| b.circuit_state as f64,
        ),
        per_backend(BACKEND_CONNECTIONS_ACTIVE, "Backend connections up.", GAUGE, &|b| b.connections_active as f64),
        errors.0,
        per_backend(BACKEND_RETRIES_TOTAL, "Redials after a failed or lost connection.", COUNTER, &|b| {
            b.retries as f64
        }),
        per_backend(BACKEND_TIMEOUTS_TOTAL, "Dial and keep-alive timeouts.", COUNTER, &|b| b.timeouts as f64),
        per_backend(BACKEND_DIALS_TOTAL, "Backend dial attempts.", COUNTER, &|b| b.dials as f64),
        requests.0,
        pool_active.0,
        pool_idle.0,
        Family::new(POOL_CLEANUP_ERRORS_TOTAL, "Always 0: closing idle pooled connections cannot fail here.", COUNTER)
            .value(&[], 0.0)
            .0,
        bytes.0,
        Family::new(
            CONNECTION_SETUP_LATENCY_SECONDS,
            "Accept to the first client frame queued towards a backend.",
            HISTOGRAM,
        )
        .histogram(&[], &s.setup_latency)
        .0,
        Family::new(BACKEND_CONNECTION_LATENCY_SECONDS, "Backend dial time.", HISTOGRAM)
            .histogram(&[], &s.dial_latency)
            .0,
        Family::new(FORWARD_LATENCY_SECONDS, "Time a frame waits inside the gateway, per direction.", HISTOGRAM)
            .histogram(&[("direction", "client_to_backend")], &s.forward_c2b)
            .histogram(&[("direction", "backend_to_client")], &s.forward_b2c)
            .0,
        rtt.0,
        Family::new(ROUTE_SNAPSHOT_VERSION, "Routing snapshot version (lowest over workers).", GAUGE)
            .value(&[], s.route_version as f64)
            .0,
        Family::new(
            ROUTE_PROPAGATION_SECONDS,
            "Per route snapshot: from its cause reaching the control side (Redis notify, refresh, reload) to the last worker serving it.",
            HISTOGRAM,
        )
        .histogram(&[], &s.route_propagation)
        .0,
        info.0,
        Family::new(WORKERS_RESPONSIVE, "Workers that answered this scrape.", GAUGE).value(&[], responsive as f64).0,
        {
            // Label values: the configured class names (a bounded set), each
            // outcome known in advance at zero.
            let mut f = Family::new(
                MESSAGE_POLICY_TOTAL,
                "Client frames by message class ([[message_policy]] name) and outcome.",
                COUNTER,
            );
            let mut series: std::collections::BTreeMap<(String, &str), u64> = Default::default();
            for c in &policy_classes {
                for o in ["forwarded", "unauthenticated", "too_large", "rate_limited"] {
                    series.insert((c.to_string(), o), 0);
                }
            }
            for ((name, outcome), n) in &s.message_policy {
                *series.entry((name.to_string(), outcome)).or_default() += n;
            }
            for ((name, outcome), n) in &series {
                f = f.value(&[("policy", name), ("outcome", outcome)], *n as f64);
            }
            f.0
        },
        {
            let mut f = Family::new(
                TLS_CERTIFICATE_EXPIRY_SECONDS,
                "Seconds until each loaded TLS certificate expires (negative: expired).",
                GAUGE,
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            for (name, not_after) in c.tls_certificates.lock().unwrap().iter() {
                f = f.value(&[("name", name)], (not_after - now) as f64);
            }
            f.0
        },
        Family::new(TRACE_SPANS_DROPPED_TOTAL, "Trace spans dropped before the OTLP exporter (queue full).", COUNTER)
            .value(&[], s.spans_dropped as f64)
            .0,
        Family::new(ANNOUNCEMENTS_DELIVERED_TOTAL, "Announcement frames queued to clients.", COUNTER)
            .value(&[], s.announcements_delivered as f64)
            .0,
        Family::new(
            HANDOFF_SESSIONS_TOTAL,
            "Live upgrade: sessions this process took over (handed_over) or could not set up (lost).",
            COUNTER,
        )
        .value(&[("direction", "in"), ("result", "handed_over")], s.handoff_sessions_in as f64)
        .value(&[("direction", "in"), ("result", "lost")], s.handoff_sessions_lost as f64)
        .0,
        Family::new(
            HANDOFF_PAUSE_SECONDS,
            "Live upgrade this process took part in: from the first old worker frozen to the last session adopted.",
            GAUGE,
        )
        .value(&[], crate::upgrade::status().and_then(|u| u.pause_ms).unwrap_or(0.0) / 1e3)
        .0,
        Family::new(WEBSOCKET_UPGRADES_TOTAL, "Connections upgraded to WebSocket.", COUNTER)
            .value(&[], s.websocket_upgrades as f64)
            .0,
        Family::new(ACCESS_LOG_RECORDS_TOTAL, "Access-log records written.", COUNTER)
            .value(&[], s.access_log_records as f64)
            .0,
        Family::new(ACCESS_LOG_DROPPED_TOTAL, "Access-log records dropped under overload.", COUNTER)
            .value(&[], s.access_log_dropped as f64)
            .0,
        per_config_type(
            CONFIG_REFRESH_SUCCESS_TOTAL,
            "Successful route reads from Redis (one read covers both keys).",
            ld(&c.refresh_success),
        ),
        per_config_type(
            CONFIG_REFRESH_ERRORS_TOTAL,
            "Failed or rejected route reads from Redis (one read covers both keys).",
            ld(&c.refresh_errors),
        ),
        Family::new(
            CONFIG_REFRESH_EMPTY_TOTAL,
            "Redis reads that found no rules key (restarted empty, flushed); the last good Redis routes stay.",
            COUNTER,
        )
        .value(&[], ld(&c.refresh_empty))
        .0,
        Family::new(ROUTE_SNAPSHOTS_REJECTED_TOTAL, "Route snapshots rejected by validation.", COUNTER)
            .value(&[], ld(&c.snapshots_rejected))
            .0,
        Family::new(CONFIG_RELOADS_TOTAL, "Config file reloads applied.", COUNTER).value(&[], ld(&c.config_reloads)).0,
        Family::new(CONFIG_RELOAD_ERRORS_TOTAL, "Config file reloads rejected.", COUNTER)
            .value(&[], ld(&c.config_reload_errors))
            .0,
        Family::new(REDIS_UP, "1 when Redis answered the last read; 0 when not or not configured.", GAUGE)
            .value(&[], (c.redis_state.load() == RedisState::Up) as u8 as f64)
            .0,
        Family::new(
            MAX_CONNECTIONS_EFFECTIVE,
            "The client connection cap in force (limits.max_connections, lowered to fit the open-file limit).",
            GAUGE,
        )
        .value(&[], max_connections as f64)
        .0,
        Family::new(DRAINING, "1 from the start of a drain until the process exits, else 0.", GAUGE)
            .value(&[], c.draining.load(Ordering::Relaxed) as u8 as f64)
            .0,
        Family::new(CONSUL_ERRORS_TOTAL, "Consul queries that failed.", COUNTER).value(&[], ld(&c.consul_errors)).0,
        Family::new(ROUTE_DATA_WARNINGS_TOTAL, "Route data loaded with a warning.", COUNTER)
            .value(&[], ld(&c.route_warnings))
            .0,
    ]
}

/// The announcement queues and the workers' heartbeats: read from memory,
/// never from the workers' command channels.
fn relay_families(h: &crate::gateway::GatewayHandle, c: &ControlStats) -> Vec<MetricFamily> {
    use crate::relay::Source;
    use MetricType::{COUNTER, GAUGE};
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let a = h.announce_stats();
    let mut received = Family::new(
        ANNOUNCEMENTS_RECEIVED_TOTAL,
        "Announcements received for the whole node, by source (backend ANNOUNCE, Redis broadcast, admin POST /broadcast).",
        COUNTER,
    );
    for (i, s) in Source::ALL.iter().enumerate() {
        received = received.value(&[("source", s.as_str())], ld(&a.received[i]));
    }
    let mut age = Family::new(
        WORKER_HEARTBEAT_AGE_SECONDS,
        "Seconds since each worker last turned its loop (ticks every 20 ms); /health fails past 10 s.",
        GAUGE,
    );
    for (i, d) in h.heartbeats().ages().iter().enumerate() {
        age = age.value(&[("worker", &i.to_string())], d.as_secs_f64());
    }
    let o = h.overload();
    vec![
        Family::new(OVERLOAD_BUDGET_BYTES, "The node's budget of bytes queued towards clients (limits.overload_queued_bytes, or a quarter of the memory limit).", GAUGE)
            .value(&[], o.budget as f64)
            .0,
        Family::new(OVERLOAD_QUEUED_BYTES, "Bytes queued towards clients over every worker (gateway queues and the kernel send queues of sockets whose writer waits), measured every 200 ms.", GAUGE)
            .value(&[], o.total() as f64)
            .0,
        Family::new(OVERLOAD_STATE, "0 normal, 1 refusing new connections (85 % of the budget), 2 also closing the slowest readers (95 %).", GAUGE)
            .value(&[], o.state() as u8 as f64)
            .0,
        Family::new(OVERLOAD_ACTIONS_TOTAL, "Overload actions: sessions closed as the slowest readers, connections refused, kernel send buffers capped.", COUNTER)
            .value(&[("action", "close_slow_reader")], ld(&o.closed))
            .value(&[("action", "refuse_connection")], ld(&o.refused))
            .value(&[("action", "shrink_send_buffer")], ld(&o.shrunk))
            .0,
        received.0,
        Family::new(
            ANNOUNCEMENTS_DROPPED_TOTAL,
            "Announcement deliveries to a worker dropped because its queue (64) was full.",
            COUNTER,
        )
        .value(&[], ld(&a.dropped))
        .0,
        Family::new(
            ANNOUNCEMENTS_REFUSED_TOTAL,
            "Redis broadcast messages refused (not a valid announcement).",
            COUNTER,
        )
        .value(&[], ld(&c.announcements_refused))
        .0,
        age.0,
    ]
}

/// The custom collector: asks every worker for its counters at scrape time
/// (one request at a time: concurrent scrapes share it).
pub(crate) struct GatewayCollector {
    pub(crate) workers: Arc<super::WorkerStatsSource>,
    pub(crate) control: Arc<ControlStats>,
}

impl Collector for GatewayCollector {
    fn desc(&self) -> Vec<&Desc> {
        // Unchecked collector: the families are built fresh on every scrape.
        vec![]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let per = self.workers.get();
        let responsive = per.iter().filter(|s| s.is_some()).count();
        let merged = crate::gateway::merge_stats(per.iter().flatten());
        let mut f = families(&merged, self.workers.handle.workers(), responsive, &self.control);
        f.extend(relay_families(&self.workers.handle, &self.control));
        f
    }
}

/// Prometheus text exposition of `families`.
pub(crate) fn encode(families: &[MetricFamily]) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::with_capacity(8192);
    if let Err(e) = prometheus::TextEncoder::new().encode(families, &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}
