//! Resilience towards backends: the circuit breaker (per endpoint, per
//! worker). A pure state machine driven by `now`.
//!
//! # Lifecycle
//! ```text
//! Closed --failure_threshold consecutive failures--> Open(until now + open_for)
//! Open --until passed--> HalfOpen: one probe (a dial) allowed, others refused
//! HalfOpen --probe succeeds--> Closed        HalfOpen --probe fails--> Open
//! ```
//! A failure is a failed or timed-out dial or a lost connection; a success is
//! a completed dial. Routing skips endpoints whose breaker refuses.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl CircuitState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> u64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open { .. } => 1,
            CircuitState::HalfOpen { .. } => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    state: CircuitState,
    failures: u32,
    threshold: u32,
    open_for: Duration,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_for: Duration) -> CircuitBreaker {
        CircuitBreaker { state: CircuitState::Closed, failures: 0, threshold: threshold.max(1), open_for }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// May traffic go to this endpoint now? Moves Open -> HalfOpen when due.
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::Open { until } if now >= until => {
                self.state = CircuitState::HalfOpen { probing: false };
                true
            }
            CircuitState::Open { .. } => false,
            CircuitState::HalfOpen { probing } => !probing,
        }
    }

    /// A dial is starting; in half-open it is the one probe.
    pub fn on_attempt(&mut self) {
        if let CircuitState::HalfOpen { .. } = self.state {
            self.state = CircuitState::HalfOpen { probing: true };
        }
    }

    /// Returns true when this closed the circuit (a state change).
    pub fn on_success(&mut self) -> bool {
        self.failures = 0;
        let changed = self.state != CircuitState::Closed;
        self.state = CircuitState::Closed;
        changed
    }

    /// A connection is up but not yet proven (gRPC: its call not answered
    /// yet): traffic may flow (a half-open probe closes the circuit), but the
    /// failures in a row are kept until [`Self::on_success`], so a server
    /// that accepts every connection and then fails each one still opens the
    /// circuit. Returns true when this closed the circuit.
    pub fn on_connected(&mut self) -> bool {
        let changed = self.state != CircuitState::Closed;
        self.state = CircuitState::Closed;
        changed
    }

    /// Returns true when this opened the circuit (a state change).
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let open = match self.state {
            CircuitState::HalfOpen { .. } => true,
            CircuitState::Closed => self.failures >= self.threshold,
            CircuitState::Open { .. } => false,
        };
        if open {
            self.state = CircuitState::Open { until: now + self.open_for };
        }
        open
    }

    /// Applies new thresholds (config reload) without losing state.
    pub fn reconfigure(&mut self, threshold: u32, open_for: Duration) {
        self.threshold = threshold.max(1);
        self.open_for = open_for;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn connections_that_are_never_proven_still_open_the_circuit() {
        let now = std::time::Instant::now();
        let mut b = super::CircuitBreaker::new(3, std::time::Duration::from_secs(10));
        for _ in 0..2 {
            b.on_connected();
            assert!(!b.on_failure(now));
        }
        b.on_connected();
        assert!(b.on_failure(now), "the third failure in a row opens it, connections or not");
        // A half-open probe that connects lets traffic through ...
        let later = now + std::time::Duration::from_secs(11);
        assert!(b.allows(later));
        b.on_attempt();
        assert!(!b.allows(later));
        assert!(b.on_connected());
        assert!(b.allows(later));
        // ... and an answer clears the count.
        b.on_success();
        assert!(!b.on_failure(later));
    }

    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_then_closes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(3, Duration::from_secs(1));
        assert!(!b.on_failure(t0) && !b.on_failure(t0));
        assert!(b.allows(t0));
        assert!(b.on_failure(t0));
        assert!(!b.allows(t0 + Duration::from_millis(500)));
        assert!(b.allows(t0 + Duration::from_secs(1)));
        b.on_attempt();
        assert!(!b.allows(t0 + Duration::from_secs(1)), "one probe at a time");
        assert!(b.on_success());
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn failed_probe_reopens() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(1, Duration::from_secs(1));
        b.on_failure(t0);
        let t1 = t0 + Duration::from_secs(2);
        assert!(b.allows(t1));
        b.on_attempt();
        assert!(b.on_failure(t1));
        assert!(!b.allows(t1 + Duration::from_millis(999)));
        assert!(b.allows(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(2, Duration::from_secs(1));
        b.on_failure(t0);
        b.on_success();
        assert!(!b.on_failure(t0));
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
