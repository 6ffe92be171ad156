//! Sessions: id generation and the per-session state a worker keeps.
//!
//! A session is one client connection. The worker owns a table of them
//! (`id -> session`) and nothing else ever sees it: backend frames find their
//! session by id in the table of the worker that read them.
//!
//! # Session id layout (positive i64)
//!
//! ```text
//! bit 63      : 0 (ids are positive)
//! bits 51..=62: node id    (12 bits, 0..=4095)  unique across gateway nodes
//! bits 44..=50: worker     (7 bits, 0..=127)    the owning core: `owner_worker(id)`
//! bits 0..=43 : sequence   (44 bits)            unique across restarts
//! ```
//! The sequence is a millisecond clock (ms since 2025-01-01, 44 bits last
//! ~557 years) that also counts up by one per session: each new id takes
//! `max(last + 1, now_ms)`. Restarts therefore never reuse an id unless a
//! worker handed out more than 1,000 ids per second for long enough to run
//! ahead of the wall clock and the process restarted before the clock caught
//! up (at 20,000 new sessions/s sustained for a minute, ~19 minutes).

use crate::protocol::backend::{DisconnectReason, Transport};
pub(crate) use crate::protocol::Hex;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const NODE_BITS: u32 = 12;
pub const WORKER_BITS: u32 = 7;
pub const SEQ_BITS: u32 = 44;
const SEQ_MASK: i64 = (1 << SEQ_BITS) - 1;
/// 2025-01-01T00:00:00Z in unix milliseconds: the sequence epoch.
const EPOCH_MS: u64 = 1_735_689_600_000;

/// The worker that owns a session id.
pub fn owner_worker(id: i64) -> usize {
    ((id >> SEQ_BITS) & ((1 << WORKER_BITS) - 1)) as usize
}

/// The node that issued a session id.
pub fn owner_node(id: i64) -> u16 {
    ((id >> (SEQ_BITS + WORKER_BITS)) & ((1 << NODE_BITS) - 1)) as u16
}

/// Per-worker session id generator.
#[derive(Debug)]
pub struct SessionIdGen {
    prefix: i64,
    last: i64,
}

impl SessionIdGen {
    pub fn new(node_id: u16, worker: usize) -> SessionIdGen {
        assert!(node_id < (1 << NODE_BITS) && worker < (1 << WORKER_BITS));
        SessionIdGen { prefix: ((node_id as i64) << (SEQ_BITS + WORKER_BITS)) | ((worker as i64) << SEQ_BITS), last: 0 }
    }

    fn now_ms() -> i64 {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        (ms.saturating_sub(EPOCH_MS) as i64) & SEQ_MASK
    }

    /// The next id, from an explicit clock reading (tests) ...
    pub fn next_at(&mut self, now_ms: i64) -> i64 {
        let seq = ((self.last + 1).max(now_ms)) & SEQ_MASK;
        // Sequence 0 is skipped so that node 0 / worker 0 never yields id 0.
        let seq = if seq == 0 { 1 } else { seq };
        self.last = seq;
        self.prefix | seq
    }

    /// A session a live upgrade brought over holds `id`: ids handed out
    /// from now on are above it when it has this generator's prefix.
    pub fn observe(&mut self, id: i64) {
        if id & !SEQ_MASK == self.prefix {
            self.last = self.last.max(id & SEQ_MASK);
        }
    }

    /// ... or from the wall clock.
    pub fn next_id(&mut self) -> i64 {
        self.next_at(Self::now_ms())
    }
}

/// A W3C-style trace id, displayed as 32 hex digits.
#[derive(Clone, Copy)]
pub struct TraceId(pub [u8; 16]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Hex(&self.0).fmt(f)
    }
}

/// What a worker knows about one live session, apart from its I/O handles.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: i64,
    /// Client address (after PROXY protocol, when that exists).
    pub peer: SocketAddr,
    pub transport: Transport,
    pub started: Instant,
    /// Last client frame (or accept); drives the idle timeout.
    pub last_active: Instant,
    /// Set by whoever decides the session ends (kick, idle, stop, error);
    /// `None` when the client simply closed.
    pub close_reason: Option<DisconnectReason>,
    /// A complete first frame has arrived (handshake timeout no longer applies).
    pub handshaken: bool,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// First frame's routing address, for the access log.
    pub first_server_type: Option<u8>,
    pub first_world: u16,
    /// W3C-style trace id, given at accept; carried to backends whose route
    /// has trace propagation on, and usable as an OTLP trace id later.
    pub trace_id: [u8; 16],
}

impl SessionInfo {
    pub fn new(id: i64, peer: SocketAddr, transport: Transport, now: Instant, trace_id: [u8; 16]) -> SessionInfo {
        SessionInfo {
            id,
            peer,
            transport,
            started: now,
            last_active: now,
            close_reason: None,
            handshaken: false,
            frames_in: 0,
            frames_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            first_server_type: None,
            first_world: 0,
            trace_id,
        }
    }

    /// Records why the session ends; the first reason wins.
    pub fn set_close_reason(&mut self, r: DisconnectReason) -> bool {
        if self.close_reason.is_none() {
            self.close_reason = Some(r);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_roundtrips() {
        let mut g = SessionIdGen::new(4095, 127);
        let id = g.next_id();
        assert!(id > 0);
        assert_eq!(owner_node(id), 4095);
        assert_eq!(owner_worker(id), 127);
        let mut g = SessionIdGen::new(3, 1);
        let id = g.next_id();
        assert_eq!((owner_node(id), owner_worker(id)), (3, 1));
    }

    #[test]
    fn ids_are_unique_and_increasing_even_faster_than_the_clock() {
        let mut g = SessionIdGen::new(1, 0);
        let mut last = 0;
        for _ in 0..10_000 {
            let id = g.next_at(5);
            assert!(id > last);
            last = id;
        }
        // The clock moving backwards never repeats an id either.
        assert!(g.next_at(1) > last);
    }

    #[test]
    fn restart_starts_at_the_clock() {
        let mut a = SessionIdGen::new(0, 0);
        let before = a.next_id();
        let mut b = SessionIdGen::new(0, 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(b.next_id() > before);
        assert!(SessionIdGen::new(0, 0).next_at(0) > 0);
    }
}
