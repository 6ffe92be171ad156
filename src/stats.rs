//! Per-worker counters, merged by the control side at scrape time.
//!
//! A worker increments plain integers it alone owns (no atomics, no locks);
//! asking for stats sends a command over the worker's channel and the worker
//! answers with a copy. [`WorkerStats::merge`] adds copies together. Label
//! values are bounded: reasons are `&'static str`, server types are 0..=255,
//! backends are the configured endpoint names.

use ahash::AHashMap;
use std::sync::Arc;

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
    /// PING round trips: count and sum in microseconds.
    pub rtt_count: u64,
    pub rtt_sum_us: u64,
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
        self.circuit_state = self.circuit_state.max(o.circuit_state);
        self.rtt_count += o.rtt_count;
        self.rtt_sum_us += o.rtt_sum_us;
    }
}

#[derive(Debug, Clone)]
pub struct WorkerStats {
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
    pub backends: AHashMap<Arc<str>, BackendStats>,
    pub route_version: u64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
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
            backends: AHashMap::new(),
            route_version: 0,
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
        for (k, v) in &o.backends {
            self.backend(k).merge(v);
        }
        self.route_version = self.route_version.min(o.route_version);
    }

    pub fn get(map: &AHashMap<&'static str, u64>, key: &str) -> u64 {
        map.get(key).copied().unwrap_or(0)
    }
}
