//! Per-worker counters, merged by the control side at scrape time.
//!
//! A worker increments plain integers it alone owns (no atomics, no locks);
//! asking for stats sends a command over the worker's channel and the worker
//! answers with a copy. [`WorkerStats::merge`] adds copies together. Label
//! values are bounded: reasons are `&'static str`, server types are 0..=255,
//! backends are the configured endpoint names.

use ahash::AHashMap;
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets: 10 µs .. 10 s.
pub const LATENCY_BOUNDS: [f64; 19] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`LATENCY_BOUNDS`] in nanoseconds, for recording without floating point.
const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A fixed-bucket latency histogram a worker owns; merged at scrape time.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    pub counts: [u64; LATENCY_BOUNDS.len() + 1],
    pub sum_ns: u128,
    pub count: u64,
}

impl LatencyHistogram {
    /// Records `n` observations of `d`.
    #[inline]
    pub fn record_n(&mut self, d: Duration, n: u64) {
        let ns = d.as_nanos();
        let ns64 = ns.min(u64::MAX as u128) as u64;
        let i = LATENCY_BOUNDS_NS.iter().position(|b| ns64 <= *b).unwrap_or(LATENCY_BOUNDS_NS.len());
        self.counts[i] += n;
        self.sum_ns += ns * n as u128;
        self.count += n;
    }

    pub fn record(&mut self, d: Duration) {
        self.record_n(d, 1)
    }

    pub fn merge(&mut self, o: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
        self.count += o.count;
    }
}

/// The worse of two circuit gauge values (0 closed, 1 open, 2 half-open):
/// open > half-open > closed, so one worker open and another half-open merge
/// to open. (The gauge values keep the original gateway's numbering, which is
/// not in order of severity, so `max` would report half-open.)
fn worst_circuit(a: u64, b: u64) -> u64 {
    let severity = |g: u64| match g {
        1 => 2, // open
        2 => 1, // half-open
        _ => 0, // closed
    };
    if severity(b) > severity(a) {
        b
    } else {
        a
    }
}

/// Counters of one backend endpoint on one worker.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    pub connections_active: u64,
    pub dials: u64,
    pub errors: AHashMap<&'static str, u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub sessions_bound: u64,
    /// Circuit breaker: 0 closed, 1 open, 2 half-open (merged: the worst).
    pub circuit_state: u64,
    /// Keep-alive PING round trips.
    pub rtt: LatencyHistogram,
    /// Redials after a failure.
    pub retries: u64,
    /// Dial and keep-alive timeouts.
    pub timeouts: u64,
}

impl BackendStats {
    fn merge(&mut self, o: &BackendStats) {
        self.connections_active += o.connections_active;
        self.dials += o.dials;
        add_map(&mut self.errors, &o.errors);
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.frames_sent += o.frames_sent;
        self.frames_received += o.frames_received;
        self.sessions_bound += o.sessions_bound;
        self.circuit_state = worst_circuit(self.circuit_state, o.circuit_state);
        self.rtt.merge(&o.rtt);
        self.retries += o.retries;
        self.timeouts += o.timeouts;
    }
}

#[derive(Debug, Clone)]
pub struct WorkerStats {
    /// The worker (for per-worker views; meaningless after a merge).
    pub worker: usize,
    pub workers: usize,
    pub connections_total: u64,
    pub connections_active: u64,
    pub sessions_active: u64,
    pub connection_rejected: AHashMap<&'static str, u64>,
    /// Client -> backend frames, by server type.
    pub messages_in: Box<[u64; 256]>,
    /// Backend -> client frames, by server type of the replying route.
    pub messages_out: Box<[u64; 256]>,
    pub routing_errors: AHashMap<&'static str, u64>,
    pub frames_dropped: AHashMap<&'static str, u64>,
    pub sessions_closed: AHashMap<&'static str, u64>,
    pub protocol_errors: AHashMap<&'static str, u64>,
    /// Connections and frames refused by a limit, by limit name.
    pub rate_limit_rejected: AHashMap<&'static str, u64>,
    /// Accept to the first client frame queued towards a backend.
    pub setup_latency: LatencyHistogram,
    /// Backend dial durations (successful dials).
    pub dial_latency: LatencyHistogram,
    /// Time frames wait inside the gateway: read from the client until
    /// written to the backend, and read from the backend until written to the
    /// client (per write batch, timed from its oldest frame).
    pub forward_c2b: LatencyHistogram,
    pub forward_b2c: LatencyHistogram,
    pub access_log_records: u64,
    /// Connections upgraded to WebSocket.
    pub websocket_upgrades: u64,
    /// Access-log records dropped because the writer could not keep up.
    pub access_log_dropped: u64,
    pub backends: AHashMap<Arc<str>, BackendStats>,
    /// The route snapshot this worker serves (merged: the lowest).
    pub route_version: u64,
    /// When this worker applied it, microseconds since the Unix epoch (0:
    /// the snapshot it started with). Merged: the latest.
    pub route_applied_unix_us: u64,
    /// From its cause reaching the control side (a Redis notify, a refresh,
    /// a reload) to this worker serving it. Merged: the longest.
    pub route_apply_delay_us: u64,
    /// Per snapshot, from its cause reaching the control side to the last
    /// worker serving it: recorded by that last worker, so the merged
    /// histogram counts each snapshot once.
    pub route_propagation: LatencyHistogram,
    /// Client frames by message class and outcome (`[[message_policy]]`).
    pub message_policy: AHashMap<(Arc<str>, &'static str), u64>,
    /// Announcements delivered to sessions (client frames queued).
    pub announcements_delivered: u64,
    /// Live upgrade: sessions this worker took over from an old process.
    pub handoff_sessions_in: u64,
    /// Live upgrade: sessions this worker handed to a new process.
    pub handoff_sessions_out: u64,
    /// Live upgrade: sessions lost in a handover (never expected).
    pub handoff_sessions_lost: u64,
    /// Live upgrade: sessions a handover could not carry (TLS), closed.
    pub handoff_sessions_not_carried: u64,
    /// Spans dropped before the exporter (worker buffer or queue full).
    pub spans_dropped: u64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            worker: 0,
            workers: 1,
            connections_total: 0,
            connections_active: 0,
            sessions_active: 0,
            connection_rejected: AHashMap::new(),
            messages_in: Box::new([0; 256]),
            messages_out: Box::new([0; 256]),
            routing_errors: AHashMap::new(),
            frames_dropped: AHashMap::new(),
            sessions_closed: AHashMap::new(),
            protocol_errors: AHashMap::new(),
            rate_limit_rejected: AHashMap::new(),
            setup_latency: LatencyHistogram::default(),
            dial_latency: LatencyHistogram::default(),
            forward_c2b: LatencyHistogram::default(),
            forward_b2c: LatencyHistogram::default(),
            access_log_records: 0,
            websocket_upgrades: 0,
            access_log_dropped: 0,
            backends: AHashMap::new(),
            route_version: 0,
            route_applied_unix_us: 0,
            route_apply_delay_us: 0,
            route_propagation: LatencyHistogram::default(),
            message_policy: AHashMap::new(),
            announcements_delivered: 0,
            handoff_sessions_in: 0,
            handoff_sessions_out: 0,
            handoff_sessions_lost: 0,
            handoff_sessions_not_carried: 0,
            spans_dropped: 0,
        }
    }
}

fn add_map<K: Clone + Eq + std::hash::Hash>(a: &mut AHashMap<K, u64>, b: &AHashMap<K, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

/// `map[key] += n`.
#[inline]
pub fn bump(map: &mut AHashMap<&'static str, u64>, key: &'static str, n: u64) {
    *map.entry(key).or_default() += n;
}

impl WorkerStats {
    pub fn backend(&mut self, name: &Arc<str>) -> &mut BackendStats {
        if !self.backends.contains_key(name) {
            self.backends.insert(name.clone(), BackendStats::default());
        }
        self.backends.get_mut(name).unwrap()
    }

    /// Adds `o` into `self` (the version is the lowest any worker runs).
    pub fn merge(&mut self, o: &WorkerStats) {
        self.connections_total += o.connections_total;
        self.connections_active += o.connections_active;
        self.sessions_active += o.sessions_active;
        add_map(&mut self.connection_rejected, &o.connection_rejected);
        for i in 0..256 {
            self.messages_in[i] += o.messages_in[i];
            self.messages_out[i] += o.messages_out[i];
        }
        add_map(&mut self.routing_errors, &o.routing_errors);
        add_map(&mut self.frames_dropped, &o.frames_dropped);
        add_map(&mut self.sessions_closed, &o.sessions_closed);
        add_map(&mut self.protocol_errors, &o.protocol_errors);
        add_map(&mut self.rate_limit_rejected, &o.rate_limit_rejected);
        self.setup_latency.merge(&o.setup_latency);
        self.dial_latency.merge(&o.dial_latency);
        self.forward_c2b.merge(&o.forward_c2b);
        self.forward_b2c.merge(&o.forward_b2c);
        self.access_log_records += o.access_log_records;
        self.websocket_upgrades += o.websocket_upgrades;
        self.access_log_dropped += o.access_log_dropped;
        for (k, v) in &o.backends {
            self.backend(k).merge(v);
        }
        self.route_version = self.route_version.min(o.route_version);
        self.route_applied_unix_us = self.route_applied_unix_us.max(o.route_applied_unix_us);
        self.route_apply_delay_us = self.route_apply_delay_us.max(o.route_apply_delay_us);
        self.route_propagation.merge(&o.route_propagation);
        add_map(&mut self.message_policy, &o.message_policy);
        self.announcements_delivered += o.announcements_delivered;
        self.handoff_sessions_in += o.handoff_sessions_in;
        self.handoff_sessions_out += o.handoff_sessions_out;
        self.handoff_sessions_lost += o.handoff_sessions_lost;
        self.handoff_sessions_not_carried += o.handoff_sessions_not_carried;
        self.spans_dropped += o.spans_dropped;
    }

    pub fn get(map: &AHashMap<&'static str, u64>, key: &str) -> u64 {
        map.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_bounds_match_the_exported_ones() {
        for (ns, s) in LATENCY_BOUNDS_NS.iter().zip(LATENCY_BOUNDS) {
            assert_eq!(*ns, (s * 1e9).round() as u64);
        }
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(10));
        h.record(Duration::from_nanos(10_001));
        h.record(Duration::from_secs(11));
        assert_eq!((h.counts[0], h.counts[1], h.counts[19]), (1, 1, 1));
    }

    fn with_circuit(name: &Arc<str>, gauge: u64) -> WorkerStats {
        let mut s = WorkerStats::default();
        s.backend(name).circuit_state = gauge;
        s
    }

    #[test]
    fn circuit_state_merges_to_the_worst() {
        const CLOSED: u64 = 0;
        const OPEN: u64 = 1;
        const HALF_OPEN: u64 = 2;
        let name: Arc<str> = Arc::from("127.0.0.1:1");
        let merged = |states: &[u64]| {
            let mut total = WorkerStats::default();
            for g in states {
                total.merge(&with_circuit(&name, *g));
            }
            total.backends[&name].circuit_state
        };
        assert_eq!(merged(&[OPEN, HALF_OPEN]), OPEN);
        assert_eq!(merged(&[HALF_OPEN, OPEN]), OPEN);
        assert_eq!(merged(&[CLOSED, HALF_OPEN]), HALF_OPEN);
        assert_eq!(merged(&[HALF_OPEN, CLOSED]), HALF_OPEN);
        assert_eq!(merged(&[CLOSED, OPEN, CLOSED]), OPEN);
        assert_eq!(merged(&[CLOSED, CLOSED]), CLOSED);
    }
}
