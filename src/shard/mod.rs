//! The per-core shard: every decision about sessions and backend connections,
//! with no I/O.
//!
//! One [`Shard`] per worker. It owns the session table, each session's
//! bindings (server type -> backend connection and its generation), the
//! backend pools with their circuit breakers, the reverse index of sessions
//! per backend connection, the per-IP limit table, the counters and the
//! drain state. The monoio driver (`crate::worker`) owns the sockets and
//! timers: it feeds the shard events and carries out the [`Action`]s the
//! shard queues, in order, after each event.
//!
//! ```text
//!   driver                          shard (this module)
//!   accept(peer) ------------------> admission, session id
//!   client bytes ------------------> front door / framing / limits / route / bind
//!                                    -> enqueue on a backend connection
//!   <---- Action::WakeBackend(c) --- (the connection's queue became non-empty)
//!   take_backend_out(c) -----------> the whole queue, one write
//!   backend bytes -----------------> framing, isolation check, deliver
//!   <---- Action::WakeClient(s) ---- (the session's queue became non-empty)
//!   tick(now) ---------------------> idle / handshake sweep, keep-alive, evictions
//!   apply_routes / apply_config ---> unbind, retire, reconfigure live pools
//! ```
//!
//! Modelled on quinn-proto under quinn: the state machine is plain data with
//! `handle`-style methods that take `now`; it is unit-tested below without a
//! socket ([`tests`]) and can be driven by another runtime.
//!
//! Invariants the tests check:
//! - a backend frame reaches a session only when that session is bound to the
//!   very connection (and generation) it arrived on;
//! - a session's `DISCONNECT` is queued behind every frame it sent;
//! - every frame that is not forwarded is counted under a drop reason.

mod backend;
pub(crate) mod handoff;
mod session;
#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub(crate) use backend::RELEASED_REPLY_GRACE;
pub(crate) use backend::{BackendOut, BackendRead, LossKind};
use session::Mode;
pub(crate) use session::{ClientOut, ClientWrite, Flow, HalfClose};

use crate::config::Config;
use crate::protocol::backend::DisconnectReason;
use crate::routing::RouteTable;
use crate::session::SessionIdGen;
use crate::stats::{bump, WorkerStats};
use ahash::AHashMap;
use backend::Backends;
use bytes::BytesMut;
use session::Session;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend connection's slot in the shard. Slots are reused; the pair
/// (slot, generation) is what names one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId(pub(crate) u32);

/// The least share of a backend queue a session may fill before its reading
/// pauses: two of the largest client frames, so any frame fits.
pub(crate) const MIN_QUEUE_SHARE: usize = 128 * 1024;

/// A session id (see `crate::session` for its layout).
pub(crate) type SessionId = i64;

/// How the driver names a session: its slot in the table (found by index,
/// not by hashing, on every client event) and its id (so a reused slot is
/// never mistaken for the session that held it before).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    pub(crate) slot: u32,
    pub(crate) id: SessionId,
}

/// The session table: slots for the driver's keys, an id index for backend
/// frames (which carry only the id).
#[derive(Default)]
pub(crate) struct SessionTable {
    slots: Vec<Option<Session>>,
    /// Free slots, reused first.
    free: Vec<u32>,
    by_id: AHashMap<SessionId, u32>,
}

impl SessionTable {
    fn insert(&mut self, make: impl FnOnce(SessionKey) -> Session, id: SessionId) -> SessionKey {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() as u32 - 1
            }
        };
        let key = SessionKey { slot, id };
        self.slots[slot as usize] = Some(make(key));
        self.by_id.insert(id, slot);
        key
    }

    #[inline]
    fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.slots.get_mut(key.slot as usize)?.as_mut().filter(|s| s.info.id == key.id)
    }

    #[inline]
    fn get(&self, key: SessionKey) -> Option<&Session> {
        self.slots.get(key.slot as usize)?.as_ref().filter(|s| s.info.id == key.id)
    }

    fn by_id_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        let slot = *self.by_id.get(&id)?;
        self.slots[slot as usize].as_mut()
    }

    fn remove(&mut self, key: SessionKey) -> Option<Session> {
        self.get(key)?;
        self.by_id.remove(&key.id);
        self.free.push(key.slot);
        self.slots[key.slot as usize].take()
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn keys(&self) -> Vec<SessionKey> {
        self.slots.iter().flatten().map(|s| s.key).collect()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.slots.iter_mut().flatten()
    }
}

/// How much of a client socket the driver should shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shut {
    /// Stop reading: the reader sees end of stream after what is buffered and
    /// ends the session; queued replies are still written.
    Read,
    /// Both directions: for a client that does not read (its writer may be
    /// blocked on a full socket buffer) or whose socket already failed.
    Both,
    /// Graceful (drain): write what is queued, then send FIN; keep reading
    /// and forwarding until the client's end of stream.
    Write,
}

/// What the driver must do after an event, in the order queued.
#[derive(Debug)]
pub(crate) enum Action {
    /// The session's outgoing queue has bytes: wake its writer.
    WakeClient(SessionKey),
    /// End the session: shut its socket down so the reader stops.
    ShutdownClient(SessionKey, Shut),
    /// The session's share of a backend queue has room again: read on.
    ResumeClient(SessionKey),
    /// The session left the table. Its writer writes `tail` (the replies still
    /// queued, and a WebSocket close frame), then half-closes and exits.
    Closed { key: SessionKey, tail: BytesMut },
    /// Dial `addr` for connection `conn` as its `generation`, speaking `protocol`.
    Dial {
        conn: ConnId,
        generation: u64,
        addr: SocketAddr,
        protocol: crate::routing::BackendProtocol,
        timeout: Duration,
    },
    /// The connection's queue has bytes: wake its writer.
    WakeBackend(ConnId),
    /// The connection's `generation` is over: shut its socket so its tasks
    /// end. `graceful` (retired, idle or stopping; its queue is written): let
    /// a transport that buffers (HTTP/2) finish sending first; otherwise
    /// (lost) at once.
    CloseBackend { conn: ConnId, generation: u64, graceful: bool },
    /// Hand these access-log records to the writer thread (never blocking),
    /// then report with [`Shard::access_log_handed`].
    AccessLog { buf: Vec<u8>, records: u64 },
    /// The last session left the table (the drain waits for this).
    SessionsGone,
    /// An announcement for every session of the gateway: hand it to every
    /// worker (this one included), once each.
    Announce(Arc<Announcement>),
    /// Finished spans of sampled sessions, for the OTLP exporter.
    Spans(Vec<crate::otlp::SpanRecord>),
}

impl Action {
    /// Whether carrying it out writes to, shuts down, closes or opens a
    /// socket (a worker frozen for a live upgrade defers these).
    pub(crate) fn touches_sockets(&self) -> bool {
        match self {
            Action::WakeClient(_)
            | Action::ShutdownClient(..)
            | Action::ResumeClient(_)
            | Action::Closed { .. }
            | Action::Dial { .. }
            | Action::WakeBackend(_)
            | Action::CloseBackend { .. } => true,
            Action::AccessLog { .. } | Action::SessionsGone | Action::Announce(_) | Action::Spans(_) => false,
        }
    }
}

/// A realm-wide announcement: one client frame for every selected session
/// of every core. Shared between cores (one buffer), never copied per core.
#[derive(Debug)]
pub struct Announcement {
    pub msg_id: u16,
    pub payload: bytes::Bytes,
    pub target: AnnounceTarget,
}

/// Which sessions an announcement reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnounceTarget {
    All,
    /// Sessions whose first frame was for this world.
    World(u16),
    /// Sessions bound to this server type.
    ServerType(u8),
    /// Sessions their backend tagged so.
    Tag(Box<[u8]>),
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AcceptRefusal {
    #[error("max_connections reached")]
    MaxConnections,
    #[error("a per-IP limit refused it: {}", .0.as_str())]
    PerIp(crate::limits::Refusal),
    #[error("the gateway is draining")]
    Draining,
}

impl AcceptRefusal {
    /// Every refusal, for exporting each label at zero from the start.
    pub(crate) const ALL: [AcceptRefusal; 5] = [
        AcceptRefusal::MaxConnections,
        AcceptRefusal::PerIp(crate::limits::Refusal::PerIpConnections),
        AcceptRefusal::PerIp(crate::limits::Refusal::PerIpRate),
        AcceptRefusal::PerIp(crate::limits::Refusal::IpTableFull),
        AcceptRefusal::Draining,
    ];

    /// Metric label (`connection_rejected_total{reason}`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AcceptRefusal::MaxConnections => "max_connections",
            AcceptRefusal::PerIp(r) => r.as_str(),
            AcceptRefusal::Draining => "draining",
        }
    }
}

/// Why a frame was not delivered; each is a `frames_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// A backend reply larger than a client frame can carry.
    ReplyTooLarge,
    /// Over `messages_per_second`.
    RateLimited,
    /// No rule, no endpoints, or every backend unavailable.
    RoutingError,
    /// Queued on (or sent to) a backend connection that was then lost.
    BackendLost,
    /// The backend connection's queue is over `backend.max_queued_bytes`.
    BackendQueueFull,
    /// The backend connection is backing off.
    BackendUnavailable,
    /// A backend frame for a session not bound to the connection it came on.
    UnboundSession,
    /// A backend sent an opcode only the gateway may send.
    UnexpectedOpcode,
    /// A backend message whose length was good but whose body does not decode.
    Malformed,
    /// Refused by the message policy (class, size, rate or authentication).
    Policy,
    /// A reply for a session whose graceful close (FIN) was already decided.
    AfterClose,
}

impl DropReason {
    /// Every reason, for exporting each label at zero from the start.
    pub(crate) const ALL: [DropReason; 11] = [
        DropReason::AfterClose,
        DropReason::Malformed,
        DropReason::Policy,
        DropReason::ReplyTooLarge,
        DropReason::RateLimited,
        DropReason::RoutingError,
        DropReason::BackendLost,
        DropReason::BackendQueueFull,
        DropReason::BackendUnavailable,
        DropReason::UnboundSession,
        DropReason::UnexpectedOpcode,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DropReason::ReplyTooLarge => "reply_too_large",
            DropReason::RateLimited => "rate_limited",
            DropReason::RoutingError => "routing_error",
            DropReason::BackendLost => "backend_lost",
            DropReason::BackendQueueFull => "backend_queue_full",
            DropReason::BackendUnavailable => "backend_unavailable",
            DropReason::UnboundSession => "unbound_session",
            DropReason::UnexpectedOpcode => "unexpected_opcode",
            DropReason::Malformed => "malformed",
            DropReason::Policy => "policy",
            DropReason::AfterClose => "after_close",
        }
    }
}

/// The shard's view of the drain (see `WorkerCommand::Stop` in the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepting and serving.
    Running,
    /// No new sessions; live ones end by themselves or are closed.
    Draining,
}

/// Spans a worker buffers between two ticks at most.
const MAX_SPANS_PER_TICK: usize = 8192;

/// Data-path log lines are limited per kind: at most [`LOG_BURST`] a second,
/// the rest counted and reported in the next line of that kind.
pub(crate) const LOG_BURST: u32 = 10;

#[derive(Default)]
pub(crate) struct LogLimiter {
    kinds: AHashMap<&'static str, (Instant, u32, u64)>,
}

impl LogLimiter {
    /// `Some(suppressed_since_last)` when a line of `kind` may be logged now.
    pub(crate) fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        let e = self.kinds.entry(kind).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 < LOG_BURST {
            e.1 += 1;
            Some(std::mem::take(&mut e.2))
        } else {
            e.2 += 1;
            None
        }
    }
}

/// What every part of the shard reads or writes besides its own table: split
/// from [`Shard`] so that a session (borrowed from the table) and the context
/// can be used at once.
pub(crate) struct Ctx {
    /// The worker index: the round-robin cursor's start and log lines.
    index: usize,
    /// The running config; replaced whole on reload ([`Shard::apply_config`]).
    cfg: Arc<Config>,
    /// The routing snapshot frames are routed with; replaced between events.
    routes: Arc<RouteTable>,
    /// Round-robin cursor per rule key, per worker (as ROUTING.md says).
    rr: AHashMap<(u8, u16), usize>,
    /// This worker's counters, copied out for a scrape.
    stats: WorkerStats,
    /// Rate limits data-path log lines.
    logs: LogLimiter,
    /// xorshift state: trace and span ids, backoff jitter.
    rng: u64,
    /// Actions for the driver, drained after every event.
    actions: Vec<Action>,
    /// Bytes in the hold buffers of this worker's held sessions.
    held_bytes: usize,
    /// Spans of sampled sessions not yet handed to the exporter.
    spans: Vec<crate::otlp::SpanRecord>,
    /// Admission shared by every worker: exact per-IP limits for the real
    /// client address and the node's connection cap (touched at accept and
    /// close only).
    admission: Arc<crate::limits::SharedAdmission>,
    /// This worker's own copies of the message class names (the counters'
    /// keys), the last one "unclassified": counting a frame touches no
    /// reference count another core shares.
    policy_names: Vec<Arc<str>>,
}

/// Fresh copies of the message class names, then "unclassified".
fn policy_names(cfg: &Config) -> Vec<Arc<str>> {
    cfg.policy.classes.iter().map(|c| Arc::from(&*c.name)).chain([Arc::from("unclassified")]).collect()
}

impl Ctx {
    /// Records a span of a sampled session (handed over on the next tick).
    fn span(&mut self, rec: crate::otlp::SpanRecord) {
        // Bounded between ticks: a flood of sampled frames cannot grow it.
        if self.spans.len() < MAX_SPANS_PER_TICK {
            self.spans.push(rec);
        } else {
            self.stats.spans_dropped += 1;
        }
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn drop_frames(&mut self, reason: DropReason, n: u64) {
        bump(&mut self.stats.frames_dropped, reason.as_str(), n);
    }

    /// (max connections per IP, connects per second per IP): node-wide,
    /// enforced against the shared admission table.
    fn per_ip_limits(&self) -> (u32, u32) {
        let l = &self.cfg.limits;
        (l.max_connections_per_ip, l.connection_rate_per_ip)
    }
}

/// One core's sessions, backends and limits. See the module docs.
pub(crate) struct Shard {
    ctx: Ctx,
    /// Live sessions. A session leaves the table exactly once, in
    /// [`Shard::client_closed`].
    sessions: SessionTable,
    /// Backend pools, connections and the reverse index.
    backends: Backends,
    /// Session ids: node, worker and a clock sequence.
    ids: SessionIdGen,
    /// Access-log records (JSON lines) not yet handed to the writer.
    access_buf: Vec<u8>,
    /// How many records `access_buf` holds.
    access_pending: u64,
    phase: Phase,
}

/// What the driver needs to start a shard.
pub(crate) struct ShardSetup {
    pub(crate) index: usize,
    pub(crate) cfg: Arc<Config>,
    pub(crate) routes: Arc<RouteTable>,
    pub(crate) admission: Arc<crate::limits::SharedAdmission>,
    /// Non-zero seed for trace ids and jitter.
    pub(crate) seed: u64,
}

impl Shard {
    pub(crate) fn new(setup: ShardSetup) -> Shard {
        let ShardSetup { index, cfg, routes, admission, seed } = setup;
        let names = policy_names(&cfg);
        let stats = WorkerStats { worker: index, workers: 1, route_version: routes.version, ..Default::default() };
        Shard {
            ids: SessionIdGen::new(cfg.server.node_id, index),
            ctx: Ctx {
                index,
                cfg,
                routes,
                rr: AHashMap::new(),
                stats,
                logs: LogLimiter::default(),
                rng: seed | 1,
                actions: Vec::new(),
                held_bytes: 0,
                spans: Vec::new(),
                policy_names: names,
                admission,
            },
            sessions: SessionTable::default(),
            backends: Backends::default(),
            access_buf: Vec::new(),
            access_pending: 0,
            phase: Phase::Running,
        }
    }

    /// Whether actions are waiting for the driver.
    #[inline]
    pub(crate) fn has_actions(&self) -> bool {
        !self.ctx.actions.is_empty()
    }

    /// Takes the actions queued since the last call, in order.
    pub(crate) fn drain_actions(&mut self, into: &mut Vec<Action>) {
        into.append(&mut self.ctx.actions);
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A new routing snapshot. Bindings to a backend the rule for their server
    /// type (and world) no longer lists are released (`DISCONNECT` reason 8); the session
    /// rebinds on its next frame. Connections nobody routes to any more are
    /// retired: closed once their queue is written.
    pub(crate) fn apply_routes(&mut self, table: Arc<RouteTable>, now: Instant) {
        tracing::info!(worker = self.ctx.index, version = table.version, "route snapshot applied");
        self.ctx.stats.route_version = table.version;
        self.ctx.routes = table;
        for key in self.sessions.keys() {
            self.unbind_unlisted(key, now);
        }
        self.backends.retire_unlisted(&mut self.ctx, now);
    }

    /// The snapshot just applied reached this worker `delay` after its cause
    /// reached the control side, at `at` (since the Unix epoch); `last`: this
    /// worker was the last to apply it, so every worker serves it now and
    /// `delay` is the snapshot's propagation time.
    pub(crate) fn routes_propagated(&mut self, delay: Duration, at: Duration, last: bool) {
        let s = &mut self.ctx.stats;
        s.route_apply_delay_us = delay.as_micros().min(u64::MAX as u128) as u64;
        s.route_applied_unix_us = at.as_micros().min(u64::MAX as u128) as u64;
        if last {
            s.route_propagation.record(delay);
        }
    }

    /// A reloaded config: limits and timeouts apply from the next event, and
    /// breaker settings apply to the live pools too.
    pub(crate) fn apply_config(&mut self, cfg: Arc<Config>) {
        tracing::info!(worker = self.ctx.index, source = %cfg.source, "config applied");
        self.backends.reconfigure(&cfg.backend);
        self.ctx.policy_names = policy_names(&cfg);
        self.ctx.cfg = cfg;
    }

    /// A copy of the counters, with the gauges filled in.
    pub(crate) fn stats(&self, now: Instant) -> WorkerStats {
        let mut s = self.ctx.stats.clone();
        s.worker = self.ctx.index;
        s.sessions_active = self.sessions.len() as u64;
        s.connections_active = s.sessions_active;
        self.backends.fill_stats(&mut s, now);
        s
    }

    /// The periodic tick: handshake and idle timeouts, keep-alive, per-IP
    /// table eviction, retirement deadlines, access-log hand-over.
    pub(crate) fn tick(&mut self, now: Instant, sweep: bool, evict: bool) {
        if sweep {
            self.sweep(now);
            self.backends.keepalive(&mut self.ctx, &mut self.sessions, now);
            self.flush_access_log();
        }
        self.backends.finish_retirements(&mut self.ctx, now);
        self.backends.expire_released(now);
        self.hold_tick(now);
        self.paced_closes(now);
        if !self.ctx.spans.is_empty() {
            self.ctx.actions.push(Action::Spans(std::mem::take(&mut self.ctx.spans)));
        }
        if sweep {
            self.backends.close_idle_seed(&mut self.ctx, now);
        }
        // One worker sweeps the shared table for everyone.
        if evict && self.ctx.index == 0 {
            let rate = self.ctx.per_ip_limits().1;
            self.ctx.admission.evict_idle(rate, now);
        }
    }

    /// Queues buffered access-log records for the writer.
    pub(crate) fn flush_access_log(&mut self) {
        let records = std::mem::take(&mut self.access_pending);
        if records > 0 {
            let buf = std::mem::take(&mut self.access_buf);
            self.ctx.actions.push(Action::AccessLog { buf, records });
        }
    }

    /// How handing records to the writer went: `Ok(written)` or `Err(dropped)`.
    pub(crate) fn access_log_handed(&mut self, r: Result<u64, u64>, now: Instant) {
        match r {
            Ok(n) => self.ctx.stats.access_log_records += n,
            Err(n) => {
                self.ctx.stats.access_log_dropped += n;
                if let Some(s) = self.ctx.logs.allow("access_log_dropped", now) {
                    tracing::warn!(
                        worker = self.ctx.index,
                        records = n,
                        suppressed = s,
                        "access log writer behind: records dropped"
                    );
                }
            }
        }
    }

    /// Counts a failed accept (the driver backs off on descriptor exhaustion).
    pub(crate) fn accept_failed(&mut self, err: &dyn std::fmt::Display, now: Instant) {
        bump(&mut self.ctx.stats.connection_rejected, "accept_error", 1);
        if let Some(n) = self.ctx.logs.allow("accept_error", now) {
            tracing::warn!(worker = self.ctx.index, error = %err, suppressed = n, "accept failed");
        }
    }

    /// The overload manager refused a connection (the node is over its
    /// queued-bytes threshold): counted and logged like any refusal.
    pub(crate) fn refused_overload(&mut self, peer: std::net::SocketAddr, now: Instant) {
        bump(&mut self.ctx.stats.connection_rejected, "overload", 1);
        if let Some(n) = self.ctx.logs.allow("overload", now) {
            tracing::warn!(worker = self.ctx.index, client = %peer, suppressed = n, "connection refused: overload");
        }
    }

    /// Bytes queued for `key`'s client and not yet taken by its writer, and
    /// the session's bytes out so far (moves whenever something is queued).
    pub(crate) fn queued_out(&self, key: SessionKey) -> (usize, u64) {
        self.sessions.get(key).map_or((0, 0), |s| (s.out.len(), s.info.bytes_out))
    }

    /// `limits.client_send_buffer`: the kernel send buffer of client sockets
    /// (0: the kernel's own sizing).
    pub(crate) fn client_send_buffer(&self) -> usize {
        self.ctx.cfg.limits.client_send_buffer
    }

    /// The overload manager closes `key` as one of the slowest readers
    /// (`queued` bytes towards it): the same close, reason and counter as a
    /// client over its own queue limit. False when it was closing already.
    pub(crate) fn close_slow_reader(&mut self, key: SessionKey, queued: u64, now: Instant) -> bool {
        let ctx = &mut self.ctx;
        let Some(s) = self.sessions.get_mut(key) else { return false };
        if !s.begin_close(ctx, DisconnectReason::RateLimited, Shut::Both) {
            return false;
        }
        bump(&mut ctx.stats.protocol_errors, "slow_reader", 1);
        if let Some(n) = ctx.logs.allow("overload_shed", now) {
            tracing::warn!(
                session_id = key.id,
                trace_id = %s.trace_id(),
                queued,
                suppressed = n,
                "overload: closing one of the slowest readers"
            );
        }
        true
    }

    /// An announcement reached this core: one client frame to every selected
    /// session. A client whose queue is over its limit is closed as a slow
    /// reader (counted), never waited for.
    pub(crate) fn announce(&mut self, a: &Announcement, now: Instant) -> u64 {
        let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
        let mut n = 0;
        for s in self.sessions.iter_mut() {
            let selected = match &a.target {
                AnnounceTarget::All => true,
                AnnounceTarget::World(w) => s.info.first_server_type.is_some() && s.info.first_world == *w,
                AnnounceTarget::ServerType(t) => s.bindings.iter().any(|b| b.server_type == *t),
                AnnounceTarget::Tag(t) => s.tags.iter().any(|x| x == t),
            };
            if selected
                && s.mode() != Mode::Sniffing
                && s.info.close_reason.is_none()
                && s.deliver(&mut self.ctx, a.msg_id, 0, &a.payload, max_queued, now)
            {
                n += 1;
            }
        }
        self.ctx.stats.announcements_delivered += n;
        n
    }

    /// Span batches the exporter could not take.
    pub(crate) fn spans_dropped(&mut self, n: u64) {
        self.ctx.stats.spans_dropped += n;
    }

    /// Drain, step 1: refuse new sessions from now on. With `[drain]
    /// notice_msg_id`, every client gets the notice frame; with `paced`, each
    /// session is given a random moment before `until` to be closed at, so
    /// the realm does not see every client reconnect at once.
    pub(crate) fn begin_drain(&mut self, now: Instant, until: Instant) {
        if self.phase == Phase::Draining {
            return;
        }
        self.phase = Phase::Draining;
        let drain = self.ctx.cfg.drain.clone();
        let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
        let window = until.saturating_duration_since(now);
        for s in self.sessions.iter_mut() {
            // Client frames only for connections that speak them (not one
            // still sniffing or mid-upgrade), and not closing already.
            let speaks_frames = s.mode() != Mode::Sniffing && s.info.close_reason.is_none();
            if let Some((msg_id, payload)) = drain.notice.as_ref().filter(|_| speaks_frames) {
                s.deliver(&mut self.ctx, *msg_id, 0, payload, max_queued, now);
            }
            if drain.paced {
                let x = self.ctx.random();
                // Uniform over the window (53 bits of the draw).
                let frac = (x >> 11) as f64 / (1u64 << 53) as f64;
                s.close_at = Some(now + window.mul_f64(frac));
            }
        }
    }

    /// Paced drain: closes the sessions whose moment came.
    fn paced_closes(&mut self, now: Instant) {
        if self.phase != Phase::Draining || !self.ctx.cfg.drain.paced {
            return;
        }
        let due: Vec<SessionKey> = self
            .sessions
            .iter_mut()
            .filter(|s| s.close_at.is_some_and(|t| t <= now) && s.info.close_reason.is_none())
            .map(|s| s.key)
            .collect();
        for key in due {
            self.close_gracefully(key, DisconnectReason::Shutdown);
        }
    }

    /// Ends a session gracefully: its queued replies (and a WebSocket close
    /// frame) go out, then FIN; what the client still sends until its own end
    /// of stream is forwarded.
    fn close_gracefully(&mut self, key: SessionKey, reason: DisconnectReason) {
        let Some(s) = self.sessions.get_mut(key) else { return };
        if let Some(ws) = s.ws.as_mut() {
            let was_empty = s.out.is_empty();
            ws.close_for(&mut s.out, reason);
            if was_empty && !s.out.is_empty() {
                self.ctx.actions.push(Action::WakeClient(key));
            }
        }
        s.begin_close(&mut self.ctx, reason, Shut::Write);
    }

    /// Drain, deadline: ends every live session with `reason`, gracefully:
    /// its queued replies (and a WebSocket close frame) go out, then FIN, and
    /// whatever the client still sends until its own end of stream is
    /// forwarded; `DISCONNECT`s are queued behind every frame it sent.
    pub(crate) fn close_all(&mut self, reason: DisconnectReason) -> usize {
        let keys = self.sessions.keys();
        for &key in &keys {
            self.close_gracefully(key, reason);
        }
        keys.len()
    }

    /// Drain, read grace over: stop reading every session still open.
    pub(crate) fn force_close_all(&mut self) -> usize {
        let keys = self.sessions.keys();
        for &key in &keys {
            self.ctx.actions.push(Action::ShutdownClient(key, Shut::Read));
        }
        keys.len()
    }

    /// Drain, last step: is any backend connection still writing its queue?
    pub(crate) fn backends_pending(&self) -> bool {
        self.backends.any_pending()
    }

    /// Drain, end: close every backend connection.
    pub(crate) fn close_backends(&mut self) {
        self.backends.close_all(&mut self.ctx);
        self.flush_access_log();
    }
}
