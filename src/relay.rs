//! What crosses from the control side to the workers besides commands:
//! announcements, each worker's own bounded queue of them, and the workers'
//! heartbeats.
//!
//! Announcements (a backend's `ANNOUNCE`, Redis `{prefix}broadcast`, admin
//! `POST /broadcast`) used to travel in the workers' command channels, so a
//! storm of them filled those channels: routes, config, stats and stop then
//! waited behind data, and `/health` (which asked every worker for its
//! counters) answered 503 while every worker ran. Now:
//! - every worker has a queue of at most [`QUEUE_PER_WORKER`] announcements
//!   of its own, taken on its tick ([`MAX_PER_TICK`] a tick); over it an
//!   announcement is dropped for that worker and counted
//!   (`game_gateway_announcements_dropped_total`), with one WARN line a
//!   second at most;
//! - [`Heartbeats`]: each worker stamps its slot on every tick of its loop;
//!   liveness (`/health`) is "every worker turned its loop within
//!   [`STALE_AFTER`]", read from memory, independent of any queue.

use crate::shard::Announcement;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Announcements waiting for one worker: a realm-wide announcement is rare
/// (a few a minute); 64 absorb a burst while a worker is busy for a second.
pub const QUEUE_PER_WORKER: usize = 64;
/// Announcements a worker applies per tick (each one walks its sessions).
pub const MAX_PER_TICK: usize = 16;
/// A worker whose loop has not turned for this long is stuck: `/health`
/// answers 503. Its tick is 20 ms; 10 s leaves room for a stalled VM or a
/// long handover pause without calling a live worker dead.
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// At most one WARN line per this interval for dropped announcements.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Where an announcement came from (a label of the received counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Backend,
    Redis,
    Admin,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Backend, Source::Redis, Source::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Backend => "backend",
            Source::Redis => "redis",
            Source::Admin => "admin",
        }
    }
}

/// Counters of the announcement path, read by `/metrics`.
#[derive(Default)]
pub struct AnnounceStats {
    /// Announcements received, by [`Source`] (index of `Source::ALL`).
    pub received: [AtomicU64; 3],
    /// Deliveries to one worker dropped because its queue was full.
    pub dropped: AtomicU64,
    /// Drops not yet logged, and when the last WARN line went out.
    unlogged: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
}

/// Hands announcements to every worker's queue; cloneable, any thread.
#[derive(Clone)]
pub struct Announcer {
    txs: Vec<Sender<Arc<Announcement>>>,
    pub stats: Arc<AnnounceStats>,
}

impl Announcer {
    /// One queue per worker: the senders, and the receivers in worker order.
    pub fn new(workers: usize) -> (Announcer, Vec<Receiver<Arc<Announcement>>>) {
        let (txs, rxs) = (0..workers).map(|_| crossbeam_channel::bounded(QUEUE_PER_WORKER)).unzip();
        (Announcer { txs, stats: Arc::default() }, rxs)
    }

    /// Queues `a` for every worker without waiting; returns how many workers
    /// took it. A full queue drops it for that worker (counted, logged at
    /// most once a second).
    pub fn announce(&self, a: Arc<Announcement>, source: Source) -> usize {
        let i = Source::ALL.iter().position(|s| *s == source).unwrap_or(0);
        self.stats.received[i].fetch_add(1, Ordering::Relaxed);
        let mut taken = 0;
        for (worker, tx) in self.txs.iter().enumerate() {
            match tx.try_send(a.clone()) {
                Ok(()) => taken += 1,
                Err(TrySendError::Full(_)) => self.dropped(worker, source),
                // The worker has ended (stop, retire): nothing to deliver to.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        taken
    }

    fn dropped(&self, worker: usize, source: Source) {
        let s = &self.stats;
        s.dropped.fetch_add(1, Ordering::Relaxed);
        s.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = s.last_warn.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            let n = s.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                worker,
                source = source.as_str(),
                dropped = n,
                queue = QUEUE_PER_WORKER,
                "announcement queue full: announcements dropped (counted in game_gateway_announcements_dropped_total)"
            );
        }
    }
}

/// Milliseconds since the process's first use of this module: the time base
/// of the heartbeats (monotonic).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Each worker's last loop turn; written by the worker, read by `/health`.
#[derive(Clone)]
pub struct Heartbeats(Arc<Vec<AtomicU64>>);

impl Heartbeats {
    /// Every worker counts as just started.
    pub fn new(workers: usize) -> Heartbeats {
        let now = now_ms();
        Heartbeats(Arc::new((0..workers).map(|_| AtomicU64::new(now)).collect()))
    }

    /// Worker `i` turned its loop.
    pub fn beat(&self, i: usize) {
        if let Some(slot) = self.0.get(i) {
            slot.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// How long ago each worker last turned its loop.
    pub fn ages(&self) -> Vec<Duration> {
        let now = now_ms();
        self.0.iter().map(|b| Duration::from_millis(now.saturating_sub(b.load(Ordering::Relaxed)))).collect()
    }

    /// The workers stuck for longer than [`STALE_AFTER`], with their ages.
    pub fn stuck(&self) -> Vec<(usize, Duration)> {
        self.ages().into_iter().enumerate().filter(|(_, age)| *age > STALE_AFTER).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann() -> Arc<Announcement> {
        Arc::new(crate::state::parse_announcement(br#"{"msg_id": 900, "payload": "x"}"#).unwrap())
    }

    #[test]
    fn a_full_worker_queue_drops_and_counts_without_waiting() {
        let (a, rxs) = Announcer::new(2);
        for _ in 0..QUEUE_PER_WORKER {
            assert_eq!(a.announce(ann(), Source::Redis), 2);
        }
        // Worker 1 takes one; worker 0 takes none.
        rxs[1].try_recv().unwrap();
        let t0 = Instant::now();
        assert_eq!(a.announce(ann(), Source::Admin), 1, "only worker 1 had room");
        assert!(t0.elapsed() < Duration::from_millis(100), "never waits");
        assert_eq!(a.stats.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(a.stats.received[1].load(Ordering::Relaxed), QUEUE_PER_WORKER as u64);
        assert_eq!(a.stats.received[2].load(Ordering::Relaxed), 1);
        assert_eq!(rxs[0].len(), QUEUE_PER_WORKER, "bounded");
    }

    #[test]
    fn heartbeats_tell_a_stuck_worker() {
        let h = Heartbeats::new(2);
        assert!(h.stuck().is_empty());
        h.0[1].store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        h.beat(0);
        let ages = h.ages();
        assert!(ages[0] < Duration::from_secs(1));
        // Worker 1 last beat at the epoch; a just-started process has not
        // reached STALE_AFTER yet, so compare the ages instead.
        assert!(ages[1] >= ages[0]);
    }
}
