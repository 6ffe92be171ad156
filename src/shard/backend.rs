//! Backend pools and connections inside the shard: binding, queues, loss,
//! retirement, keep-alive and demultiplexing of backend frames. No I/O: the
//! driver dials, writes each queue in one write and feeds what it reads.
//!
//! # Connection lifecycle
//! ```text
//! Idle --first bind--> Connecting --connected--> Up --lost (read/write error,
//!   |                      |                      |    bad length, keep-alive)--> Backoff(until)
//!   |                      +--dial failed/timeout------------------------------> Backoff(until)
//! Backoff --until passed and a new bind--> Connecting (a new generation)
//! Up/Connecting --no route lists it--> Retiring(deadline) --queue written or
//!   deadline--> gone (socket closed, slot freed)
//! ```
//! Every dial gets a generation unique within the shard, so a binding
//! `(ConnId, generation)` names one TCP stream forever, even after the slot
//! is reused: a binding made on an older stream is stale, and the backend
//! knows nothing of it. On loss, queued frames are counted as lost and each
//! bound session is closed (reason 7) or, where its rule says `rebind`,
//! unbound to rebind on its next frame. The backoff doubles per consecutive
//! failure between `reconnect_backoff_min` and `reconnect_backoff_max`, with
//! +-20% jitter; routing skips an endpoint whose breaker is open or whose
//! connections are all backing off.

use super::session::Session;
use super::{handoff, Action, ConnId, Ctx, DropReason, SessionId, SessionTable, Shard, Shut, MIN_QUEUE_SHARE};
use crate::config::BackendConfig;
use crate::protocol::backend::{self as bproto, Body, DisconnectReason, Opcode};
use crate::protocol::grpc::{self, ServerPacket};
use crate::resilience::{CircuitBreaker, CircuitState};
use crate::routing::{BackendProtocol, Endpoint, OnBackendLoss};
use crate::stats::{bump, WorkerStats};
use ahash::{AHashMap, AHashSet};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Longest a retired connection may take to write its last queue.
pub(crate) const RETIRE_DRAIN_MAX: Duration = Duration::from_secs(5);
/// After its last write, how long a retired connection is still read, so
/// replies in flight from the backend are handled (delivered to sessions
/// still bound, or dropped and counted as `unbound_session`).
pub(crate) const RETIRE_READ_GRACE: Duration = Duration::from_secs(1);
/// After a route change released a session from a stream, how long the
/// backend's replies to it are still delivered: they answer frames it was
/// sent before the release (and before the `DISCONNECT` queued behind them).
pub(crate) const RELEASED_REPLY_GRACE: Duration = Duration::from_secs(1);
/// Frames handled per backend read before yielding to other tasks, so one
/// busy backend cannot starve the core's other connections.
pub(crate) const MAX_FRAMES_PER_READ: usize = 4096;

/// Why a backend stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LossKind {
    DialFailed,
    DialTimeout,
    ClosedByBackend,
    ReadFailed,
    WriteFailed,
    /// A frame with an impossible length: the stream cannot be re-synchronised.
    ProtocolError,
    KeepaliveTimeout,
}

impl LossKind {
    /// Metric label (`backend_errors_total{type}`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LossKind::DialFailed => "dial_failed",
            LossKind::DialTimeout => "dial_timeout",
            LossKind::ClosedByBackend => "closed_by_backend",
            LossKind::ReadFailed => "read_failed",
            LossKind::WriteFailed => "write_failed",
            LossKind::ProtocolError => "protocol_error",
            LossKind::KeepaliveTimeout => "keepalive_timeout",
        }
    }

    fn is_timeout(self) -> bool {
        matches!(self, LossKind::DialTimeout | LossKind::KeepaliveTimeout)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Never dialed.
    Idle,
    Connecting,
    Up,
    /// Lost; may be redialed once `until` passes.
    Backoff(Instant),
    /// No route lists the endpoint: write the queue, then close by `deadline`.
    Retiring {
        deadline: Instant,
    },
}

/// Data-path counters of one connection, kept here so the hot path never
/// hashes an endpoint name; folded into the worker's per-backend stats when
/// a scrape asks and when the slot is freed.
#[derive(Debug, Default, Clone, Copy)]
struct ConnCounters {
    bytes_sent: u64,
    frames_sent: u64,
    bytes_received: u64,
    frames_received: u64,
}

impl ConnCounters {
    fn add_to(&self, b: &mut crate::stats::BackendStats) {
        b.bytes_sent += self.bytes_sent;
        b.frames_sent += self.frames_sent;
        b.bytes_received += self.bytes_received;
        b.frames_received += self.frames_received;
    }
}

/// One multiplexed stream to a backend.
struct BackendConn {
    /// The endpoint (its name labels metrics and logs).
    endpoint: Endpoint,
    /// What the stream speaks: how frames are encoded and decoded, and
    /// whether it is shared (gate, grpc) or one session's (seed_tcp).
    protocol: BackendProtocol,
    /// seed_tcp: since when the connection has served no session (idle pool).
    idle_since: Option<Instant>,
    /// Index in the pool, for logs and to spread sessions.
    slot: usize,
    state: ConnState,
    /// The current stream's generation; see the module docs.
    generation: u64,
    /// Frames waiting for the writer (taken whole per write).
    out: BytesMut,
    /// How many frames `out` holds (frames per write, and lost-frame counts).
    queued_frames: u64,
    /// A write is in progress: its bytes left `out` but are not on the wire.
    writing: bool,
    /// Sessions bound to this stream: the reverse index that backend frames
    /// are checked against (isolation) and that loss walks.
    sessions: AHashSet<SessionId>,
    /// Consecutive failed dials: the backoff exponent.
    failures: u32,
    /// Enqueue time of the oldest frame in `out` (forward latency).
    oldest: Option<Instant>,
    /// Last bytes from the backend; drives the keep-alive PING.
    last_rx: Instant,
    /// When the outstanding keep-alive PING went out.
    ping_sent: Option<Instant>,
    /// Bytes and frames each way since the slot was created.
    counters: ConnCounters,
    /// Bumped each time the writer takes the queue: a session's share of the
    /// queue counts the bytes it added since (see `Binding::queued`).
    epoch: u64,
    /// Sessions whose reading stopped because their share of this queue is
    /// full; resumed when the writer takes the queue (or the stream ends).
    paused: Vec<super::SessionKey>,
    /// `on_backend_loss = "hold"`: sessions waiting for this connection to be
    /// redialed, to resume on it.
    held: Vec<SessionId>,
    /// Retiring: its queue is written; it is closed after reading until then.
    retire_read_until: Option<Instant>,
    /// Sessions a route change released from this stream, and when: replies
    /// (`TRANS`, gRPC data) to them are still delivered for
    /// [`RELEASED_REPLY_GRACE`]; nothing else from the backend reaches them.
    released: AHashMap<SessionId, Instant>,
}

impl BackendConn {
    fn available(&self, now: Instant) -> bool {
        match self.state {
            ConnState::Backoff(until) => now >= until,
            ConnState::Retiring { .. } => false,
            _ => true,
        }
    }

    /// A seed_tcp connection in the idle pool: up, serving no session.
    fn idle_seed(&self) -> bool {
        self.protocol == BackendProtocol::SeedTcp && self.state == ConnState::Up && self.sessions.is_empty()
    }

    fn live(&self) -> bool {
        matches!(self.state, ConnState::Up | ConnState::Connecting | ConnState::Retiring { .. })
    }

    fn pending(&self) -> bool {
        self.live() && (!self.out.is_empty() || self.writing)
    }
}

/// The connections of one endpoint on this worker.
struct Pool {
    endpoint: Endpoint,
    conns: Vec<ConnId>,
    /// Shared by the pool's connections: failures of any open it.
    breaker: CircuitBreaker,
}

/// Pools by endpoint address, and the connection slots.
#[derive(Default)]
pub(super) struct Backends {
    /// By endpoint address and protocol (one address could serve two).
    pools: AHashMap<(SocketAddr, BackendProtocol), Pool>,
    conns: Vec<Option<BackendConn>>,
    /// Slots of connections that are gone, for reuse.
    free: Vec<u32>,
    /// Last generation handed out (shard-wide, so never reused).
    last_generation: u64,
}

/// What the driver's writer gets from [`Shard::take_backend_out`].
pub(crate) enum BackendOut {
    /// This generation is over: the writer exits.
    Stale,
    /// Nothing queued: wait for a wake-up.
    Empty,
    /// The queue was swapped into the writer's buffer: write it, then hand
    /// this back with the next take.
    Write(WriteDone),
}

/// One write to a backend: what it carried, reported back when it completed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteDone {
    bytes: u64,
    pub(crate) frames: u64,
    oldest: Option<Instant>,
}

/// What the driver's reader does after [`Shard::backend_data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendRead {
    /// Read more.
    Continue,
    /// Frames are left in the buffer: yield to other tasks, then call again.
    Yield,
    /// This generation is over: the reader exits.
    Stop,
}

impl Backends {
    fn conn(&self, id: ConnId) -> Option<&BackendConn> {
        self.conns.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut BackendConn> {
        self.conns.get_mut(id.0 as usize).and_then(Option::as_mut)
    }

    /// The connection if `generation` is its current stream.
    fn current(&mut self, id: ConnId, generation: u64) -> Option<&mut BackendConn> {
        self.conn_mut(id).filter(|c| c.generation == generation)
    }

    /// The generation of a live stream of `id`.
    pub(super) fn generation(&self, id: ConnId) -> Option<u64> {
        self.conn(id).map(|c| c.generation)
    }

    /// Is `ep` usable now: its breaker closed or due for a probe, and a
    /// connection not backing off (seed_tcp: an idle one, or room for one)?
    pub(super) fn available(
        &mut self,
        ep: &Endpoint,
        protocol: BackendProtocol,
        seed_max: usize,
        now: Instant,
    ) -> bool {
        let Some(p) = self.pools.get_mut(&(ep.addr, protocol)) else { return true };
        if !p.breaker.allows(now) {
            return false;
        }
        let conns = &self.conns;
        if protocol == BackendProtocol::SeedTcp {
            return p.conns.len() < seed_max
                || p.conns.iter().any(|c| conns[c.0 as usize].as_ref().is_some_and(BackendConn::idle_seed));
        }
        p.conns.iter().any(|c| conns[c.0 as usize].as_ref().is_some_and(|c| c.available(now)))
    }

    /// The connection a session binds to on `ep`. Shared protocols: from the
    /// session id's slot, the first not backing off, dialed if it is not
    /// live. seed_tcp: an idle connection of the pool, or a new one while the
    /// pool has room. `None`: nothing usable.
    pub(super) fn conn_for(
        &mut self,
        ctx: &mut Ctx,
        ep: &Endpoint,
        protocol: BackendProtocol,
        session: SessionId,
        now: Instant,
    ) -> Option<(ConnId, u64)> {
        let key = (ep.addr, protocol);
        if !self.pools.contains_key(&key) {
            let b = &ctx.cfg.backend;
            let n = match protocol {
                BackendProtocol::Gate => b.connections_per_endpoint.max(1),
                // One stream per endpoint per worker carries every session.
                BackendProtocol::Grpc => 1,
                // Created per session, below.
                BackendProtocol::SeedTcp => 0,
            };
            let breaker = CircuitBreaker::new(b.circuit_failure_threshold, b.circuit_open_duration);
            let conns = (0..n).map(|slot| self.insert(ep.clone(), protocol, slot, now)).collect();
            self.pools.insert(key, Pool { endpoint: ep.clone(), conns, breaker });
        }
        let id = if protocol == BackendProtocol::SeedTcp {
            let pool = &self.pools[&key];
            let idle = pool
                .conns
                .iter()
                .copied()
                .find(|c| self.conns[c.0 as usize].as_ref().is_some_and(BackendConn::idle_seed));
            match idle {
                Some(id) => id,
                None if pool.conns.len() < ctx.cfg.backend.seed_pool_max => {
                    let slot = pool.conns.len();
                    let id = self.insert(ep.clone(), protocol, slot, now);
                    self.pools.get_mut(&key)?.conns.push(id);
                    id
                }
                None => return None,
            }
        } else {
            let pool = &self.pools[&key];
            let n = pool.conns.len();
            let start = (session as u64 % n as u64) as usize;
            (0..n)
                .map(|i| pool.conns[(start + i) % n])
                .find(|c| self.conns[c.0 as usize].as_ref().is_some_and(|c| c.available(now)))?
        };
        self.ensure_dialing(ctx, id, now);
        let c = self.conns[id.0 as usize].as_mut()?;
        c.idle_since = None;
        Some((id, c.generation))
    }

    fn insert(&mut self, endpoint: Endpoint, protocol: BackendProtocol, slot: usize, now: Instant) -> ConnId {
        let c = BackendConn {
            endpoint,
            protocol,
            idle_since: None,
            slot,
            state: ConnState::Idle,
            generation: 0,
            out: BytesMut::new(),
            queued_frames: 0,
            writing: false,
            sessions: AHashSet::new(),
            failures: 0,
            oldest: None,
            last_rx: now,
            ping_sent: None,
            counters: ConnCounters::default(),
            epoch: 0,
            paused: Vec::new(),
            held: Vec::new(),
            retire_read_until: None,
            released: AHashMap::new(),
        };
        match self.free.pop() {
            Some(i) => {
                self.conns[i as usize] = Some(c);
                ConnId(i)
            }
            None => {
                self.conns.push(Some(c));
                ConnId(self.conns.len() as u32 - 1)
            }
        }
    }

    pub(super) fn ensure_dialing(&mut self, ctx: &mut Ctx, id: ConnId, now: Instant) {
        let Some(c) = self.conns[id.0 as usize].as_mut() else { return };
        match c.state {
            ConnState::Idle => {}
            ConnState::Backoff(until) if now >= until => {}
            _ => return,
        }
        self.last_generation += 1;
        let generation = self.last_generation;
        if let Some(p) = self.pools.get_mut(&(c.endpoint.addr, c.protocol)) {
            p.breaker.on_attempt();
        }
        c.generation = generation;
        c.state = ConnState::Connecting;
        let b = ctx.stats.backend(&c.endpoint.name);
        b.dials += 1;
        if c.failures > 0 {
            b.retries += 1;
        }
        ctx.actions.push(Action::Dial {
            conn: id,
            generation,
            addr: c.endpoint.addr,
            protocol: c.protocol,
            timeout: ctx.cfg.backend.dial_timeout,
        });
    }

    /// Appends one frame (written by `f`) to `id`'s queue. Refused and counted
    /// when the stream `generation` is not live or the queue is over
    /// `max_queued_bytes`.
    pub(super) fn enqueue(
        &mut self,
        ctx: &mut Ctx,
        id: ConnId,
        generation: u64,
        now: Instant,
        f: impl FnOnce(&mut BytesMut),
    ) -> bool {
        let max = ctx.cfg.backend.max_queued_bytes;
        let Some(c) = self.conn_mut(id) else {
            ctx.drop_frames(DropReason::BackendUnavailable, 1);
            return false;
        };
        let reason = if c.generation != generation || !c.live() {
            DropReason::BackendUnavailable
        } else if c.out.len() > max {
            DropReason::BackendQueueFull
        } else {
            let was_empty = c.out.is_empty();
            f(&mut c.out);
            c.queued_frames += 1;
            if c.oldest.is_none() {
                c.oldest = Some(now);
            }
            if was_empty {
                ctx.actions.push(Action::WakeBackend(id));
            }
            return true;
        };
        ctx.drop_frames(reason, 1);
        bump(&mut ctx.stats.backend(&c.endpoint.name).errors, reason.as_str(), 1);
        if let Some(n) = ctx.logs.allow(reason.as_str(), now) {
            tracing::warn!(backend = %c.endpoint, reason = reason.as_str(), suppressed = n, "frame to backend dropped");
        }
        false
    }

    /// A session's fair share of stream `id`'s queue: the queue limit split
    /// between the sessions bound to it, never below [`MIN_QUEUE_SHARE`].
    pub(super) fn share(&self, ctx: &Ctx, id: ConnId) -> usize {
        match self.conn(id) {
            Some(c) => (ctx.cfg.backend.max_queued_bytes / c.sessions.len().max(1)).max(MIN_QUEUE_SHARE),
            None => usize::MAX,
        }
    }

    /// The queue epoch of stream `id` (see [`Shard::take_backend_out`]).
    #[inline]
    pub(super) fn epoch(&self, id: ConnId) -> u64 {
        self.conn(id).map_or(0, |c| c.epoch)
    }

    /// Stops a session's reading until stream `id`'s queue is taken.
    pub(super) fn pause(&mut self, id: ConnId, key: super::SessionKey) {
        if let Some(c) = self.conn_mut(id) {
            if !c.paused.contains(&key) {
                c.paused.push(key);
            }
        }
    }

    /// Adds a session to the reverse index of stream `generation`.
    pub(super) fn bind(&mut self, id: ConnId, generation: u64, session: SessionId) {
        if let Some(c) = self.current(id, generation) {
            c.sessions.insert(session);
        }
    }

    /// Removes a session from the reverse index; `notify` tells the backend
    /// (gate: `DISCONNECT`; grpc: a `disconnect` packet) when the binding is on
    /// the live stream. A seed_tcp connection goes back to the idle pool.
    pub(super) fn unbind(
        &mut self,
        ctx: &mut Ctx,
        id: ConnId,
        generation: u64,
        session: SessionId,
        notify: Option<DisconnectReason>,
        now: Instant,
    ) {
        let Some(c) = self.current(id, generation) else { return };
        c.sessions.remove(&session);
        let protocol = c.protocol;
        if protocol == BackendProtocol::SeedTcp && c.sessions.is_empty() {
            if !ctx.cfg.backend.seed_reuse {
                // The session's own connection ends with it: it leaves the
                // pool at once (no other session can take it), writes what is
                // queued, reads a grace period (late replies are counted as
                // for an unbound session) and closes: the server sees EOF.
                tracing::debug!(worker = ctx.index, backend = %c.endpoint, session_id = session, "seed_tcp connection retired with its session");
                if c.live() {
                    c.state = ConnState::Retiring { deadline: now + RETIRE_DRAIN_MAX };
                    let key = (c.endpoint.addr, protocol);
                    if let Some(p) = self.pools.get_mut(&key) {
                        p.conns.retain(|c| *c != id);
                    }
                } else {
                    self.forget_seed(&mut ctx.stats, id);
                }
                return;
            }
            c.idle_since = Some(now);
        }
        let Some(reason) = notify else { return };
        match protocol {
            BackendProtocol::Gate => {
                self.enqueue(ctx, id, generation, now, |out| bproto::encode_disconnect(out, session, reason));
            }
            BackendProtocol::Grpc => {
                self.enqueue(ctx, id, generation, now, |out| grpc::encode_disconnect(out, session, reason.as_str()));
            }
            BackendProtocol::SeedTcp => {}
        }
    }

    /// A route change released `session` from stream `id`: the backend's
    /// replies to the frames it was sent before are still delivered for
    /// [`RELEASED_REPLY_GRACE`] (not on seed_tcp: the connection goes back to
    /// the idle pool and may serve another session at once).
    pub(super) fn released(&mut self, id: ConnId, generation: u64, session: SessionId, now: Instant) {
        if let Some(c) = self.current(id, generation).filter(|c| c.protocol != BackendProtocol::SeedTcp) {
            c.released.insert(session, now);
        }
    }

    /// Forgets released sessions past [`RELEASED_REPLY_GRACE`].
    pub(super) fn expire_released(&mut self, now: Instant) {
        for c in self.conns.iter_mut().flatten() {
            if !c.released.is_empty() {
                c.released.retain(|_, at| now.saturating_duration_since(*at) < RELEASED_REPLY_GRACE);
            }
        }
    }

    /// The endpoint name of `id` (access log), if the slot is in use.
    pub(super) fn endpoint_name(&self, id: ConnId) -> Option<&str> {
        self.conn(id).map(|c| &*c.endpoint.name)
    }

    pub(super) fn endpoint(&self, id: ConnId) -> Option<&Endpoint> {
        self.conn(id).map(|c| &c.endpoint)
    }

    /// Starts retiring connections whose endpoint no route lists any more.
    pub(super) fn retire_unlisted(&mut self, ctx: &mut Ctx, now: Instant) {
        let gone: Vec<(SocketAddr, BackendProtocol)> =
            self.pools.keys().filter(|(a, p)| !ctx.routes.lists_with(a, *p)).copied().collect();
        for key in gone {
            let Some(pool) = self.pools.remove(&key) else { continue };
            for id in pool.conns {
                let Some(c) = self.conn_mut(id) else { continue };
                if c.live() {
                    c.state = ConnState::Retiring { deadline: now + RETIRE_DRAIN_MAX };
                } else {
                    self.free_slot(&mut ctx.stats, id);
                }
            }
        }
        self.finish_retirements(ctx, now);
    }

    /// Closes retiring connections whose queue is written or whose deadline passed.
    pub(super) fn finish_retirements(&mut self, ctx: &mut Ctx, now: Instant) {
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_mut() else { continue };
            let ConnState::Retiring { deadline } = c.state else { continue };
            if c.pending() && now < deadline {
                continue;
            }
            // The queue is written: keep reading a while, so replies the
            // backend still sends are handled (and counted) rather than lost
            // with the socket.
            let read_until = *c.retire_read_until.get_or_insert(now + RETIRE_READ_GRACE);
            if now < read_until.min(deadline + RETIRE_READ_GRACE) {
                continue;
            }
            let left = c.queued_frames;
            ctx.drop_frames(DropReason::BackendLost, left);
            tracing::info!(worker = ctx.index, backend = %c.endpoint, slot = c.slot, "backend connection retired: no route lists it");
            ctx.actions.push(Action::CloseBackend { conn: ConnId(i as u32), generation: c.generation, graceful: true });
            self.free_slot(&mut ctx.stats, ConnId(i as u32));
        }
    }

    fn free_slot(&mut self, stats: &mut WorkerStats, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id.0 as usize).and_then(Option::take) {
            c.counters.add_to(stats.backend(&c.endpoint.name));
            self.free.push(id.0);
        }
    }

    /// Drops a seed_tcp connection from its pool and frees its slot (a lost
    /// per-session connection is never redialed: its session ended with it).
    fn forget_seed(&mut self, stats: &mut WorkerStats, id: ConnId) {
        let Some(c) = self.conn(id) else { return };
        if c.protocol != BackendProtocol::SeedTcp {
            return;
        }
        let key = (c.endpoint.addr, c.protocol);
        if let Some(p) = self.pools.get_mut(&key) {
            p.conns.retain(|c| *c != id);
        }
        self.free_slot(stats, id);
    }

    /// Closes seed_tcp connections idle for longer than `seed_idle_timeout`.
    pub(super) fn close_idle_seed(&mut self, ctx: &mut Ctx, now: Instant) {
        let timeout = ctx.cfg.backend.seed_idle_timeout;
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_ref() else { continue };
            let expired = c.protocol == BackendProtocol::SeedTcp
                && c.sessions.is_empty()
                && !c.pending()
                && c.idle_since.is_some_and(|t| now.saturating_duration_since(t) >= timeout);
            if expired {
                tracing::debug!(worker = ctx.index, backend = %c.endpoint, "idle seed_tcp connection closed");
                ctx.actions.push(Action::CloseBackend {
                    conn: ConnId(i as u32),
                    generation: c.generation,
                    graceful: true,
                });
                self.forget_seed(&mut ctx.stats, ConnId(i as u32));
            }
        }
    }

    /// Applies reloaded breaker settings to the live pools.
    pub(super) fn reconfigure(&mut self, b: &BackendConfig) {
        for p in self.pools.values_mut() {
            p.breaker.reconfigure(b.circuit_failure_threshold, b.circuit_open_duration);
        }
    }

    pub(super) fn any_pending(&self) -> bool {
        self.conns.iter().flatten().any(BackendConn::pending)
    }

    pub(super) fn close_all(&mut self, ctx: &mut Ctx) {
        for (i, c) in self.conns.iter().enumerate() {
            if let Some(c) = c.as_ref().filter(|c| c.live()) {
                ctx.actions.push(Action::CloseBackend {
                    conn: ConnId(i as u32),
                    generation: c.generation,
                    graceful: true,
                });
            }
        }
        self.pools.clear();
        for c in self.conns.drain(..).flatten() {
            c.counters.add_to(ctx.stats.backend(&c.endpoint.name));
        }
        self.free.clear();
    }

    pub(super) fn fill_stats(&self, s: &mut WorkerStats, now: Instant) {
        for c in self.conns.iter().flatten() {
            c.counters.add_to(s.backend(&c.endpoint.name));
        }
        for pool in self.pools.values() {
            let conns = pool.conns.iter().filter_map(|id| self.conn(*id));
            let (mut up, mut bound) = (0, 0);
            for c in conns {
                up += (c.state == ConnState::Up) as u64;
                bound += c.sessions.len() as u64;
            }
            let b = s.backend(&pool.endpoint.name);
            b.connections_active = up;
            b.sessions_bound = bound;
            // An open circuit that is due for a probe reports half-open.
            b.circuit_state = match pool.breaker.state() {
                CircuitState::Open { until } if now >= until => 2,
                st => st.gauge(),
            };
        }
    }

    /// The stream of `generation` failed: back off, count what was queued as
    /// lost, and close or unbind every session bound to it. Runs once per
    /// generation; returns the sessions bound to it, the queue that was not
    /// written, and how many frames it holds.
    fn lost(
        &mut self,
        ctx: &mut Ctx,
        id: ConnId,
        generation: u64,
        kind: LossKind,
        err: &dyn std::fmt::Display,
        now: Instant,
    ) -> (Vec<SessionId>, BytesMut, u64) {
        let Some(c) = self.conns.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return (Vec::new(), BytesMut::new(), 0);
        };
        if c.generation != generation || !matches!(c.state, ConnState::Up | ConnState::Connecting) {
            return (Vec::new(), BytesMut::new(), 0);
        }
        let was_up = c.state == ConnState::Up;
        // A seed_tcp connection that was up ends with its session (the server
        // closing it is normal play, a kick); only failed dials say the
        // backend is unwell.
        let counts = !(was_up && c.protocol == BackendProtocol::SeedTcp);
        if let Some(p) = self.pools.get_mut(&(c.endpoint.addr, c.protocol)).filter(|_| counts) {
            if p.breaker.on_failure(now) {
                bump(&mut ctx.stats.backend(&c.endpoint.name).errors, "circuit_opened", 1);
                tracing::warn!(worker = ctx.index, backend = %c.endpoint, "circuit opened: routing skips this backend until a probe succeeds");
            }
        }
        c.ping_sent = None;
        c.failures = if was_up { 1 } else { c.failures.saturating_add(1) };
        let backoff = {
            // +-20% jitter so that workers and nodes do not redial in lockstep.
            let jitter = (ctx.random() % 401) as f64 / 1000.0 + 0.8;
            let (lo, hi) = (ctx.cfg.backend.reconnect_backoff_min, ctx.cfg.backend.reconnect_backoff_max);
            lo.saturating_mul(1u32 << (c.failures - 1).min(16)).min(hi).mul_f64(jitter).min(hi)
        };
        c.state = ConnState::Backoff(now + backoff);
        let lost_frames = std::mem::take(&mut c.queued_frames);
        let queue = std::mem::take(&mut c.out);
        c.oldest = None;
        c.writing = false;
        let sessions: Vec<SessionId> = c.sessions.drain().collect();
        for key in c.paused.drain(..) {
            ctx.actions.push(Action::ResumeClient(key));
        }
        {
            let b = ctx.stats.backend(&c.endpoint.name);
            bump(&mut b.errors, kind.as_str(), 1);
            if kind.is_timeout() {
                b.timeouts += 1;
            }
        }
        tracing::warn!(
            worker = ctx.index,
            backend = %c.endpoint,
            slot = c.slot,
            kind = kind.as_str(),
            error = %err,
            sessions = sessions.len(),
            lost_frames,
            retry_in_ms = backoff.as_millis() as u64,
            "backend connection lost"
        );
        ctx.actions.push(Action::CloseBackend { conn: id, generation, graceful: false });
        (sessions, queue, lost_frames)
    }

    /// Keep-alive, run once a second: a connection silent for
    /// `keepalive_interval` gets a `PING`; one whose `PING` is unanswered after
    /// `keepalive_timeout` is dead (handled as a loss). Any bytes from the
    /// backend count as life, so busy connections are never pinged.
    pub(super) fn keepalive(&mut self, ctx: &mut Ctx, sessions: &mut SessionTable, now: Instant) {
        let (interval, timeout) = (ctx.cfg.backend.keepalive_interval, ctx.cfg.backend.keepalive_timeout);
        if interval.is_zero() {
            return;
        }
        for i in 0..self.conns.len() {
            let id = ConnId(i as u32);
            // Gate only: grpc streams have HTTP/2 pings (in the driver), and
            // seed_tcp backends know no keep-alive frame.
            let Some(c) =
                self.conns[i].as_ref().filter(|c| c.state == ConnState::Up && c.protocol == BackendProtocol::Gate)
            else {
                continue;
            };
            let generation = c.generation;
            match c.ping_sent {
                Some(sent) if now.saturating_duration_since(sent) >= timeout => {
                    let err = format!("no PONG within {timeout:?}");
                    let (bound, queue, frames) = self.lost(ctx, id, generation, LossKind::KeepaliveTimeout, &err, now);
                    after_loss(ctx, self, sessions, id, bound, queue, frames, now);
                }
                Some(_) => {}
                None if now.saturating_duration_since(c.last_rx) >= interval => {
                    // The timeout starts even when the PING cannot be queued
                    // (queue full): a backend that neither reads nor sends
                    // anything is hung either way.
                    self.enqueue(ctx, id, generation, now, |out| bproto::encode_ping(out, Opcode::Ping, 0));
                    if let Some(c) = self.conn_mut(id) {
                        c.ping_sent = Some(now);
                    }
                }
                None => {}
            }
        }
    }
}

/// Applies each bound session's loss policy after its connection was lost:
/// `close` closes it (reason 7), `rebind` lets its next frame bind again,
/// `hold` keeps its binding waiting for this connection to be redialed. The
/// queue that was not written is replayed for held sessions (their frames
/// go into their hold buffers, in order) and counted as lost for the rest.
#[allow(clippy::too_many_arguments)]
fn after_loss(
    ctx: &mut Ctx,
    backends: &mut Backends,
    sessions: &mut SessionTable,
    conn: ConnId,
    bound: Vec<SessionId>,
    queue: BytesMut,
    queued_frames: u64,
    now: Instant,
) {
    let endpoint = backends.endpoint(conn).map(|e| e.to_string()).unwrap_or_default();
    let mut held = Vec::new();
    for id in bound {
        let Some(s) = sessions.by_id_mut(id) else { continue };
        // Every server type bound on the lost stream goes (or is held); one
        // that says `close` closes the session.
        let before = s.bindings.len();
        let mut close = false;
        let mut hold = false;
        s.bindings.retain_mut(|b| {
            if b.conn != conn {
                return true;
            }
            close |= b.on_loss == OnBackendLoss::Close;
            if b.on_loss == OnBackendLoss::Hold {
                b.held = true;
                hold = true;
                return true;
            }
            false
        });
        if close {
            s.bindings.retain(|b| b.conn != conn);
            tracing::info!(session_id = id, trace_id = %s.trace_id(), backend = %endpoint, "backend lost, closing session");
            s.begin_close(ctx, DisconnectReason::BackendLost, Shut::Read);
        } else if hold {
            s.hold_since.get_or_insert(now);
            held.push(id);
            tracing::info!(session_id = id, trace_id = %s.trace_id(), backend = %endpoint, "backend lost, session held until it is back");
        } else if s.bindings.len() != before {
            if let Some(name) = backends.endpoint(conn).map(|e| e.name.clone()) {
                bump(&mut ctx.stats.backend(&name).errors, "session_rebind", 1);
            }
            tracing::info!(session_id = id, trace_id = %s.trace_id(), backend = %endpoint, "backend lost, session will rebind on its next frame");
        }
    }
    // The frames that never left: held sessions keep theirs, in order. A
    // session whose frames do not fit its hold bounds is closed.
    let mut replayed = 0u64;
    let grpc = backends.conn(conn).is_some_and(|c| c.protocol == BackendProtocol::Grpc);
    if !held.is_empty() {
        let mut rest = queue;
        let mut overflow = Vec::new();
        let mut keep = |sessions: &mut SessionTable, sid: i64, msg_id: u16, server_id: u32, payload: &[u8]| {
            let Some(s) = sessions.by_id_mut(sid) else { return false };
            if overflow.contains(&sid) {
                return false;
            }
            if s.hold_frame(ctx, msg_id, server_id, payload) {
                return true;
            }
            overflow.push(sid);
            false
        };
        if grpc {
            while let Ok(Some(len)) = grpc::check(&rest, usize::MAX) {
                if let Ok(p) = grpc::decode(&rest[..len]) {
                    if !p.metadata.contains_key("packet_type") && held.contains(&p.session_id) {
                        replayed += keep(sessions, p.session_id, p.msg_id as u16, 0, &p.payload) as u64;
                    }
                }
                rest.advance(len);
            }
        } else {
            while let Ok(Some(h)) = bproto::check(&rest, usize::MAX) {
                let len = h.frame_len();
                if h.opcode == Opcode::Trans && held.contains(&h.session_id) {
                    // Frames of a route with trace propagation carry the
                    // trace extension before the payload.
                    let trace = sessions
                        .by_id_mut(h.session_id)
                        .is_some_and(|s| s.bindings.iter().any(|b| b.conn == conn && b.trace));
                    if let Ok(Body::Trans { payload, .. }) = bproto::parse(&h, &rest[..len], trace) {
                        replayed += keep(sessions, h.session_id, h.msg_type as u16, h.server_id, payload) as u64;
                    }
                }
                rest.advance(len);
            }
        }
        for sid in overflow {
            held.retain(|h| *h != sid);
            if let Some(s) = sessions.by_id_mut(sid) {
                tracing::info!(session_id = sid, trace_id = %s.trace_id(), "frames at the loss exceed the hold bounds, closing session");
                s.drop_hold(ctx);
                s.begin_close(ctx, DisconnectReason::BackendLost, Shut::Read);
            }
        }
    }
    ctx.drop_frames(DropReason::BackendLost, queued_frames.saturating_sub(replayed));
    if let Some(c) = backends.conn_mut(conn) {
        for id in held {
            if !c.held.contains(&id) {
                c.held.push(id);
            }
        }
    }
}

/// The session `sid` if it is bound to connection `id`; otherwise counts the
/// drop (a backend can only reach the sessions bound to it).
fn bound_session<'a>(
    ctx: &mut Ctx,
    backends: &Backends,
    sessions: &'a mut SessionTable,
    id: ConnId,
    sid: SessionId,
    now: Instant,
) -> Option<&'a mut Session> {
    session_for(ctx, backends, sessions, id, sid, now, false)
}

/// The session a reply from connection `id` is for: bound to it, or
/// released from it by a route change less than [`RELEASED_REPLY_GRACE`]
/// ago (the reply answers a frame sent before the release); otherwise
/// counts the drop.
fn reply_session<'a>(
    ctx: &mut Ctx,
    backends: &Backends,
    sessions: &'a mut SessionTable,
    id: ConnId,
    sid: SessionId,
    now: Instant,
) -> Option<&'a mut Session> {
    session_for(ctx, backends, sessions, id, sid, now, true)
}

fn session_for<'a>(
    ctx: &mut Ctx,
    backends: &Backends,
    sessions: &'a mut SessionTable,
    id: ConnId,
    sid: SessionId,
    now: Instant,
    reply: bool,
) -> Option<&'a mut Session> {
    let bound = backends.conn(id).is_some_and(|c| {
        c.sessions.contains(&sid)
            || reply && c.released.get(&sid).is_some_and(|at| now.saturating_duration_since(*at) < RELEASED_REPLY_GRACE)
    });
    if bound {
        if let Some(s) = sessions.by_id_mut(sid) {
            return Some(s);
        }
    }
    ctx.drop_frames(DropReason::UnboundSession, 1);
    if let Some(n) = ctx.logs.allow("unbound_session", now) {
        let backend = backends.endpoint(id).map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(session_id = sid, backend = %backend, suppressed = n, "backend frame for a session not bound to this connection, dropped");
    }
    None
}

impl Shard {
    /// Held sessions: those past `hold_timeout` are closed (reason 7, their
    /// buffered frames counted as lost); connections that held sessions wait
    /// for are redialed as soon as their backoff and breaker allow.
    pub(super) fn hold_tick(&mut self, now: Instant) {
        if self.ctx.held_bytes == 0 && self.backends.conns.iter().flatten().all(|c| c.held.is_empty()) {
            return;
        }
        let timeout = self.ctx.cfg.backend.hold_timeout;
        for s in self.sessions.iter_mut() {
            if s.hold_since.is_some_and(|t| now.saturating_duration_since(t) >= timeout)
                && s.info.close_reason.is_none()
            {
                tracing::info!(session_id = s.info.id, trace_id = %s.trace_id(), "backend not back within hold_timeout, closing session");
                s.drop_hold(&mut self.ctx);
                s.begin_close(&mut self.ctx, DisconnectReason::BackendLost, Shut::Read);
            }
        }
        for i in 0..self.backends.conns.len() {
            let Some(c) = self.backends.conns[i].as_ref() else { continue };
            if c.held.is_empty() || !matches!(c.state, ConnState::Backoff(until) if now >= until) {
                continue;
            }
            let key = (c.endpoint.addr, c.protocol);
            let allowed = self.backends.pools.get_mut(&key).is_some_and(|p| p.breaker.allows(now));
            if allowed {
                self.backends.ensure_dialing(&mut self.ctx, ConnId(i as u32), now);
            }
        }
    }

    /// The connection came back: every session held on it resumes. Its
    /// binding moves to the new stream, a `CONNECT` marked as a resume goes
    /// first, then the frames it buffered, in order.
    fn resume_held(&mut self, id: ConnId, generation: u64, now: Instant) {
        let Some(c) = self.backends.conn_mut(id) else { return };
        let held = std::mem::take(&mut c.held);
        let protocol = c.protocol;
        for sid in held {
            let Some(s) = self.sessions.by_id_mut(sid) else { continue };
            let mut resumed = None;
            for b in s.bindings.iter_mut().filter(|b| b.conn == id && b.held) {
                b.held = false;
                b.generation = generation;
                b.queued = 0;
                resumed = Some(*b);
            }
            let Some(b) = resumed else { continue };
            let (peer, transport) = (s.info.peer, s.info.transport);
            let frames = s.take_hold(&mut self.ctx);
            let trace_id = s.info.trace_id;
            tracing::info!(session_id = sid, trace_id = %s.trace_id(), "backend back, session resumed");
            self.backends.bind(id, generation, sid);
            if b.notify {
                self.backends.enqueue(&mut self.ctx, id, generation, now, |out| match protocol {
                    BackendProtocol::Grpc => {
                        grpc::encode_connect_as(out, sid, peer.ip(), transport == bproto::Transport::WebSocket, true)
                    }
                    _ => bproto::encode_connect_as(out, sid, transport, peer, true),
                });
            }
            let mut rest = &frames[..];
            while let Ok(Some(h)) = crate::protocol::client::check(rest, usize::MAX) {
                let payload = &rest[crate::protocol::client::HEADER_LEN..h.frame_len()];
                let trace =
                    b.trace.then(|| bproto::TraceContext { trace_id, span_id: self.ctx.random().to_le_bytes() });
                self.backends.enqueue(&mut self.ctx, id, generation, now, |out| match protocol {
                    BackendProtocol::Grpc => grpc::encode_data(
                        out,
                        sid,
                        h.msg_id,
                        payload,
                        trace.as_ref().map(|t| (&t.trace_id[..], &t.span_id[..])),
                    ),
                    _ => bproto::encode_trans(out, h.msg_id as i32, h.server_id.0, sid, trace.as_ref(), payload),
                });
                rest = &rest[h.frame_len()..];
            }
        }
    }

    /// (interval, timeout) of backend keep-alive, for drivers that ping at
    /// their own layer (HTTP/2).
    pub(crate) fn config_backend_keepalive(&self) -> (Duration, Duration) {
        (self.ctx.cfg.backend.keepalive_interval, self.ctx.cfg.backend.keepalive_timeout)
    }

    /// Whether stream `generation` of `id` is still the live one.
    pub(crate) fn backend_live(&self, id: ConnId, generation: u64) -> bool {
        self.backends.conn(id).is_some_and(|c| c.generation == generation && c.live())
    }

    /// The dial of `generation` succeeded. `false`: that generation is over
    /// (retired or replaced while dialing); the driver drops the stream.
    pub(crate) fn backend_connected(&mut self, id: ConnId, generation: u64, dial_time: Duration, now: Instant) -> bool {
        let ctx = &mut self.ctx;
        let Some(c) = self.backends.current(id, generation) else { return false };
        if c.state != ConnState::Connecting && !matches!(c.state, ConnState::Retiring { .. }) {
            return false;
        }
        ctx.stats.dial_latency.record(dial_time);
        if c.state == ConnState::Connecting {
            c.state = ConnState::Up;
        }
        c.failures = 0;
        c.last_rx = now;
        c.ping_sent = None;
        let endpoint = c.endpoint.clone();
        let slot = c.slot;
        let protocol = c.protocol;
        // gRPC: an HTTP/2 connection and a sent call prove nothing yet (a
        // server may accept both and reset every stream): traffic flows, but
        // the failures in a row are cleared only by the answer
        // ([`Shard::backend_confirmed`]).
        if let Some(p) = self.backends.pools.get_mut(&(endpoint.addr, protocol)) {
            let closed =
                if protocol == BackendProtocol::Grpc { p.breaker.on_connected() } else { p.breaker.on_success() };
            if closed {
                tracing::info!(worker = ctx.index, backend = %endpoint, "circuit closed: backend answered");
            }
        }
        tracing::info!(worker = ctx.index, backend = %endpoint, slot, "backend connected");
        self.resume_held(id, generation, now);
        true
    }

    /// The stream of `generation` is lost (dial failure, read or write error).
    /// gRPC: the server answered the `StreamPackets` call (status 200, not a
    /// trailers-only error): only now does the circuit breaker count the
    /// backend as well. A server that accepts connections and calls but
    /// resets every stream thus opens the breaker like one that refuses.
    pub(crate) fn backend_confirmed(&mut self, id: ConnId, generation: u64) {
        let ctx = &mut self.ctx;
        let Some(c) = self.backends.current(id, generation) else { return };
        let (endpoint, protocol) = (c.endpoint.clone(), c.protocol);
        if let Some(p) = self.backends.pools.get_mut(&(endpoint.addr, protocol)) {
            if p.breaker.on_success() {
                tracing::info!(worker = ctx.index, backend = %endpoint, "circuit closed: backend answered");
            }
        }
    }

    pub(crate) fn backend_lost(
        &mut self,
        id: ConnId,
        generation: u64,
        kind: LossKind,
        err: &dyn std::fmt::Display,
        now: Instant,
    ) {
        let (bound, queue, frames) = self.backends.lost(&mut self.ctx, id, generation, kind, err, now);
        after_loss(&mut self.ctx, &mut self.backends, &mut self.sessions, id, bound, queue, frames, now);
        if self
            .backends
            .conn(id)
            .is_some_and(|c| c.generation == generation && matches!(c.state, ConnState::Backoff(_)))
        {
            self.backends.forget_seed(&mut self.ctx.stats, id);
        }
    }

    /// The writer reports its last completed write (`done`), then takes the
    /// whole queue of stream `generation`, swapped with its (empty) buffer.
    pub(crate) fn take_backend_out(
        &mut self,
        id: ConnId,
        generation: u64,
        buf: &mut BytesMut,
        done: Option<(WriteDone, Instant)>,
    ) -> BackendOut {
        if let Some((d, now)) = done {
            self.backend_written(id, generation, d, now);
        }
        let Some(c) = self.backends.current(id, generation) else { return BackendOut::Stale };
        if !c.live() {
            return BackendOut::Stale;
        }
        if c.out.is_empty() || c.state == ConnState::Connecting {
            return BackendOut::Empty;
        }
        c.writing = true;
        std::mem::swap(&mut c.out, buf);
        c.epoch += 1;
        for key in c.paused.drain(..) {
            self.ctx.actions.push(Action::ResumeClient(key));
        }
        BackendOut::Write(WriteDone {
            bytes: buf.len() as u64,
            frames: std::mem::take(&mut c.queued_frames),
            oldest: c.oldest.take(),
        })
    }

    /// A write completed.
    fn backend_written(&mut self, id: ConnId, generation: u64, done: WriteDone, now: Instant) {
        let ctx = &mut self.ctx;
        let Some(c) = self.backends.current(id, generation) else { return };
        c.writing = false;
        c.counters.bytes_sent += done.bytes;
        c.counters.frames_sent += done.frames;
        if let Some(t) = done.oldest {
            ctx.stats.forward_c2b.record_n(now.saturating_duration_since(t), done.frames);
        }
        if matches!(c.state, ConnState::Retiring { .. }) && c.out.is_empty() {
            self.backends.finish_retirements(&mut self.ctx, now);
        }
    }

    /// A write failed: the frames of this write are lost with the stream.
    pub(crate) fn backend_write_failed(
        &mut self,
        id: ConnId,
        generation: u64,
        frames: u64,
        err: &dyn std::fmt::Display,
        now: Instant,
    ) {
        match self.backends.current(id, generation) {
            Some(c) if c.live() => {
                c.writing = false;
                c.queued_frames += frames;
            }
            // The stream was already declared lost (or is gone): the frames
            // of this write are lost with it.
            Some(c) => {
                c.writing = false;
                self.ctx.drop_frames(DropReason::BackendLost, frames);
                return;
            }
            None => {
                self.ctx.drop_frames(DropReason::BackendLost, frames);
                return;
            }
        }
        if matches!(self.backends.conn(id).map(|c| c.state), Some(ConnState::Retiring { .. })) {
            self.backends.finish_retirements(&mut self.ctx, now);
            return;
        }
        self.backend_lost(id, generation, LossKind::WriteFailed, err, now);
    }

    /// Bytes read from stream `generation`: every complete frame in `buf` is
    /// handled (at most [`MAX_FRAMES_PER_READ`] per call) and consumed.
    pub(crate) fn backend_data(
        &mut self,
        id: ConnId,
        generation: u64,
        buf: &mut BytesMut,
        read: usize,
        now: Instant,
    ) -> BackendRead {
        let Some(c) = self.backends.current(id, generation) else { return BackendRead::Stop };
        if !c.live() {
            return BackendRead::Stop;
        }
        if read > 0 {
            c.last_rx = now;
            c.counters.bytes_received += read as u64;
        }
        let max = self.ctx.cfg.backend.max_frame_size;
        let protocol = c.protocol;
        for _ in 0..MAX_FRAMES_PER_READ {
            let r = match protocol {
                BackendProtocol::Gate => self.gate_frame(id, buf, max, now),
                BackendProtocol::SeedTcp => self.seed_frame(id, buf, max, now),
                BackendProtocol::Grpc => self.grpc_message(id, buf, max, now),
            };
            match r {
                Ok(true) => {}
                Ok(false) => return BackendRead::Continue,
                Err((kind, err)) => {
                    bump(&mut self.ctx.stats.protocol_errors, "backend_frame", 1);
                    self.backend_lost(id, generation, kind, &err, now);
                    return BackendRead::Stop;
                }
            }
            if self.backends.current(id, generation).is_none() {
                return BackendRead::Stop;
            }
        }
        BackendRead::Yield
    }

    /// One gate frame from the front of `buf`: `Ok(false)` when incomplete.
    fn gate_frame(
        &mut self,
        id: ConnId,
        buf: &mut BytesMut,
        max: usize,
        now: Instant,
    ) -> Result<bool, (LossKind, String)> {
        let h = match bproto::check(buf, max) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(false),
            Err(bproto::BackendFrameError::UnknownOpcode(op)) => {
                // The length is good, so the stream stays in sync: drop this
                // frame only (a newer backend, or a bug on its side).
                let Some((_, len)) = bproto::check_seed(buf, max).ok().flatten() else { return Ok(false) };
                self.drop_malformed(&format_args!("unknown backend opcode {op}"), now);
                buf.advance(len);
                return Ok(true);
            }
            // A bad length: the stream cannot be re-synchronised.
            Err(e) => return Err((LossKind::ProtocolError, e.to_string())),
        };
        let len = h.frame_len();
        match bproto::parse(&h, &buf[..len], false) {
            Ok(body) => self.on_backend_frame(id, &h, body, now),
            Err(e) => self.drop_malformed(&e, now),
        }
        buf.advance(len);
        Ok(true)
    }

    /// A backend frame (or message) with a good length and a bad body:
    /// dropped alone, counted, logged (rate-limited).
    fn drop_malformed(&mut self, err: &dyn std::fmt::Display, now: Instant) {
        self.ctx.drop_frames(DropReason::Malformed, 1);
        bump(&mut self.ctx.stats.protocol_errors, "backend_frame", 1);
        if let Some(n) = self.ctx.logs.allow("backend_malformed", now) {
            tracing::warn!(error = %err, suppressed = n, "backend frame malformed, dropped");
        }
    }

    /// One seed_tcp frame: whatever arrives on the connection is for the one
    /// session it serves; the opcode and ids are ignored, the client frame
    /// gets `msg_id` = the frame's type and `server_id` 0.
    fn seed_frame(
        &mut self,
        id: ConnId,
        buf: &mut BytesMut,
        max: usize,
        now: Instant,
    ) -> Result<bool, (LossKind, String)> {
        let (msg_type, len) = match bproto::check_seed(buf, max) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(false),
            Err(e) => return Err((LossKind::ProtocolError, e.to_string())),
        };
        let payload = &buf[bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN..len];
        let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
        let session = self.backends.conn_mut(id).and_then(|c| {
            c.counters.frames_received += 1;
            c.sessions.iter().next().copied()
        });
        match session.and_then(|sid| self.sessions.by_id_mut(sid)) {
            Some(s) => {
                let st = s.info.first_server_type.unwrap_or(0) as usize;
                if s.deliver(&mut self.ctx, msg_type as u16, 0, payload, max_queued, now) {
                    self.ctx.stats.messages_out[st] += 1;
                }
            }
            None => {
                // A reply after its session ended, on an idle connection.
                self.ctx.drop_frames(DropReason::UnboundSession, 1);
            }
        }
        buf.advance(len);
        Ok(true)
    }

    /// One gRPC message (a `GamePacket`) from the stream's DATA bytes.
    fn grpc_message(
        &mut self,
        id: ConnId,
        buf: &mut BytesMut,
        max: usize,
        now: Instant,
    ) -> Result<bool, (LossKind, String)> {
        let len = match grpc::check(buf, max) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(false),
            Err(e) => return Err((LossKind::ProtocolError, e.to_string())),
        };
        let packet = grpc::decode(&buf[..len]);
        buf.advance(len);
        let p = match packet {
            Ok(p) => p,
            Err(e) => {
                // The stream stays in sync (the length was good): drop this
                // message only.
                self.drop_malformed(&e, now);
                return Ok(true);
            }
        };
        if let Some(c) = self.backends.conn_mut(id) {
            c.counters.frames_received += 1;
        }
        let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
        match p.kind() {
            ServerPacket::ServerConnect => {
                // Login accepted: the session is authenticated.
                if let Some(s) = bound_session(&mut self.ctx, &self.backends, &mut self.sessions, id, p.session_id, now)
                {
                    s.authenticated = true;
                    if let Some(u) = p.metadata.get("user_id").filter(|u| !u.is_empty()) {
                        s.user = Some(u.as_bytes().into());
                    }
                    if let Some(t) = p.metadata.get("tags") {
                        s.tags = t.split(',').filter(|t| !t.is_empty()).map(|t| t.as_bytes().into()).collect();
                    }
                }
            }
            ServerPacket::Pong => {}
            ServerPacket::ServerDisconnect => {
                if let Some(s) = bound_session(&mut self.ctx, &self.backends, &mut self.sessions, id, p.session_id, now)
                {
                    let reason = p.metadata.get("reason").map(String::as_str).unwrap_or("");
                    tracing::info!(session_id = p.session_id, trace_id = %s.trace_id(), reason, "session closed by the gRPC backend");
                    s.begin_close(&mut self.ctx, DisconnectReason::Kicked, Shut::Read);
                }
            }
            ServerPacket::Data => {
                // A reply to one session may follow it past a route change
                // (see `reply_session`); a fan-out reaches bound sessions only.
                let (targets, reply): (&[i64], bool) = if p.target_session_ids.is_empty() {
                    (std::slice::from_ref(&p.session_id), true)
                } else {
                    (&p.target_session_ids, false)
                };
                for &sid in targets {
                    if let Some(s) = session_for(&mut self.ctx, &self.backends, &mut self.sessions, id, sid, now, reply)
                    {
                        let st = s.info.first_server_type.unwrap_or(0) as usize;
                        if s.deliver(&mut self.ctx, p.msg_id as u16, 0, &p.payload, max_queued, now) {
                            self.ctx.stats.messages_out[st] += 1;
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn on_backend_frame(&mut self, id: ConnId, h: &bproto::Header, body: Body<'_>, now: Instant) {
        if let Some(c) = self.backends.conn_mut(id) {
            c.counters.frames_received += 1;
        }
        let msg_id = h.msg_type as u16;
        let st = (h.server_id >> 8) as u8 as usize;
        match body {
            Body::Trans { payload, .. } => {
                let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
                let Some(s) = reply_session(&mut self.ctx, &self.backends, &mut self.sessions, id, h.session_id, now)
                else {
                    return;
                };
                if s.deliver(&mut self.ctx, msg_id, h.server_id, payload, max_queued, now) {
                    self.ctx.stats.messages_out[st] += 1;
                }
            }
            Body::Kick { payload } => {
                let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
                let backend = self.backends.endpoint(id).map(|e| e.to_string()).unwrap_or_default();
                let Some(s) = bound_session(&mut self.ctx, &self.backends, &mut self.sessions, id, h.session_id, now)
                else {
                    return;
                };
                if !payload.is_empty() {
                    s.deliver(&mut self.ctx, msg_id, h.server_id, payload, max_queued, now);
                }
                tracing::info!(session_id = h.session_id, trace_id = %s.trace_id(), backend = %backend, "session kicked by backend");
                s.begin_close(&mut self.ctx, DisconnectReason::Kicked, Shut::Read);
            }
            Body::Multicast { sessions, payload } => {
                let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
                // Each listed session gets the payload once, however often
                // it is listed.
                let mut ids: Vec<i64> = sessions.iter().collect();
                ids.sort_unstable();
                ids.dedup();
                for sid in ids {
                    if let Some(s) = bound_session(&mut self.ctx, &self.backends, &mut self.sessions, id, sid, now) {
                        if s.deliver(&mut self.ctx, msg_id, h.server_id, payload, max_queued, now) {
                            self.ctx.stats.messages_out[st] += 1;
                        }
                    }
                }
            }
            Body::Broadcast { payload } => {
                let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
                let Some(c) = self.backends.conn(id) else { return };
                for sid in c.sessions.iter() {
                    if let Some(s) = self.sessions.by_id_mut(*sid) {
                        if s.deliver(&mut self.ctx, msg_id, h.server_id, payload, max_queued, now) {
                            self.ctx.stats.messages_out[st] += 1;
                        }
                    }
                }
            }
            Body::Ping => {
                let Some(generation) = self.backends.generation(id) else { return };
                let sid = h.session_id;
                self.backends
                    .enqueue(&mut self.ctx, id, generation, now, |out| bproto::encode_ping(out, Opcode::Pong, sid));
            }
            Body::Pong => {
                if let Some(c) = self.backends.conn_mut(id) {
                    if let Some(sent) = c.ping_sent.take() {
                        let name = c.endpoint.name.clone();
                        self.ctx.stats.backend(&name).rtt.record(now.saturating_duration_since(sent));
                    }
                }
            }
            Body::SessionAttrs { authenticated, user, tags } => {
                if let Some(s) = bound_session(&mut self.ctx, &self.backends, &mut self.sessions, id, h.session_id, now)
                {
                    s.authenticated = authenticated;
                    s.user = (!user.is_empty()).then(|| user.into());
                    s.tags = tags.iter().map(Box::from).collect();
                    tracing::debug!(session_id = h.session_id, trace_id = %s.trace_id(), authenticated, "session attributes from backend");
                }
            }
            Body::Announce { filter, payload } => {
                // For every session of the gateway, on every core: through
                // the driver to each worker, once per core.
                let target = match filter {
                    bproto::AnnounceFilter::All => super::AnnounceTarget::All,
                    bproto::AnnounceFilter::World(w) => super::AnnounceTarget::World(w),
                    bproto::AnnounceFilter::ServerType(t) => super::AnnounceTarget::ServerType(t),
                    bproto::AnnounceFilter::Tag(t) => super::AnnounceTarget::Tag(t.into()),
                };
                let a = super::Announcement { msg_id, payload: bytes::Bytes::copy_from_slice(payload), target };
                self.ctx.actions.push(Action::Announce(std::sync::Arc::new(a)));
            }
            Body::Connect { .. } | Body::Disconnect { .. } => {
                self.ctx.drop_frames(DropReason::UnexpectedOpcode, 1);
                if let Some(n) = self.ctx.logs.allow("unexpected_opcode", now) {
                    let backend = self.backends.endpoint(id).map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(backend = %backend, opcode = ?h.opcode, suppressed = n, "backend sent a gateway-only opcode, dropped");
                }
            }
        }
    }
}

impl Backends {
    /// The streams a live upgrade carries (gate and seed_tcp: every state;
    /// gRPC streams are not carried), in snapshot order, and each one's
    /// index by slot. `carried(id)`: whether session `id` is carried; a
    /// seed_tcp stream that serves only sessions that are not is not either.
    pub(super) fn snapshot(
        &self,
        carried: impl Fn(SessionId) -> bool,
        now: Instant,
    ) -> (Vec<handoff::ConnSnap>, AHashMap<ConnId, (u64, u32)>) {
        use handoff::{ago, until, ConnStateSnap};
        let mut out = Vec::new();
        let mut index = AHashMap::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            let protocol = match c.protocol {
                BackendProtocol::Gate => 0,
                BackendProtocol::SeedTcp => 1,
                BackendProtocol::Grpc => continue,
            };
            let sessions: Vec<SessionId> = c.sessions.iter().copied().filter(|&id| carried(id)).collect();
            if protocol == 1 && sessions.is_empty() && !c.sessions.is_empty() {
                continue;
            }
            let state = match c.state {
                ConnState::Up => ConnStateSnap::Up,
                ConnState::Idle | ConnState::Connecting => ConnStateSnap::Idle,
                ConnState::Backoff(t) => ConnStateSnap::Backoff { left_us: until(now, t) },
                ConnState::Retiring { deadline } => ConnStateSnap::Retiring { left_us: until(now, deadline) },
            };
            index.insert(ConnId(slot as u32), (c.generation, out.len() as u32));
            out.push(handoff::ConnSnap {
                fd: None,
                addr: c.endpoint.addr,
                name: c.endpoint.name.to_string(),
                hash: c.endpoint.hash,
                protocol,
                pool_slot: c.slot as u64,
                state,
                out: c.out.to_vec(),
                out_frames: c.queued_frames,
                input: Vec::new(),
                sessions,
                held: c.held.iter().copied().filter(|&id| carried(id)).collect(),
                failures: c.failures,
                idle_ago_us: c.idle_since.map(|t| ago(now, t)),
                last_rx_ago_us: ago(now, c.last_rx),
                ping_ago_us: c.ping_sent.map(|t| ago(now, t)),
                retire_read_in_us: c.retire_read_until.map(|t| until(now, t)),
                released: c
                    .released
                    .iter()
                    .filter(|(id, _)| carried(**id))
                    .map(|(id, t)| (*id, ago(now, *t)))
                    .collect(),
                disconnect: Vec::new(),
            });
        }
        (out, index)
    }

    /// Streams a live upgrade carried, in snapshot order: each one's slot
    /// and generation here. Connected ones keep their socket (the driver
    /// starts their tasks); the others wait, or are dialed at once when
    /// sessions or frames wait for them.
    pub(super) fn import(&mut self, ctx: &mut Ctx, conns: Vec<handoff::ConnSnap>, now: Instant) -> Vec<(ConnId, u64)> {
        use handoff::{ahead, back, ConnStateSnap};
        let mut ids = Vec::with_capacity(conns.len());
        for snap in conns {
            let protocol = if snap.protocol == 1 { BackendProtocol::SeedTcp } else { BackendProtocol::Gate };
            let endpoint =
                Endpoint { addr: snap.addr, name: std::sync::Arc::from(snap.name.as_str()), hash: snap.hash };
            let key = (endpoint.addr, protocol);
            if !self.pools.contains_key(&key) {
                let b = &ctx.cfg.backend;
                let breaker = CircuitBreaker::new(b.circuit_failure_threshold, b.circuit_open_duration);
                self.pools.insert(key, Pool { endpoint: endpoint.clone(), conns: Vec::new(), breaker });
            }
            let id = self.insert(endpoint, protocol, snap.pool_slot as usize, now);
            if let Some(p) = self.pools.get_mut(&key) {
                p.conns.push(id);
            }
            self.last_generation += 1;
            let generation = self.last_generation;
            let c = self.conns[id.0 as usize].as_mut().expect("just inserted");
            c.generation = generation;
            c.state = match snap.state {
                ConnStateSnap::Up => ConnState::Up,
                ConnStateSnap::Idle => ConnState::Idle,
                ConnStateSnap::Backoff { left_us } => ConnState::Backoff(ahead(now, left_us)),
                ConnStateSnap::Retiring { left_us } => ConnState::Retiring { deadline: ahead(now, left_us) },
            };
            c.out = BytesMut::from(&snap.out[..]);
            c.queued_frames = snap.out_frames;
            c.oldest = (!c.out.is_empty()).then_some(now);
            c.sessions = snap.sessions.iter().copied().collect();
            c.held = snap.held;
            c.failures = snap.failures;
            c.idle_since = snap.idle_ago_us.map(|us| back(now, us));
            c.last_rx = back(now, snap.last_rx_ago_us);
            c.ping_sent = snap.ping_ago_us.map(|us| back(now, us));
            c.retire_read_until = snap.retire_read_in_us.map(|us| ahead(now, us));
            c.released = snap.released.into_iter().map(|(s, us)| (s, back(now, us))).collect();
            let waiting = !c.sessions.is_empty() || !c.out.is_empty();
            let state = c.state;
            // Sessions the old process could not carry (TLS) are gone: tell
            // the backend, as a drain would.
            for gone in snap.disconnect {
                if state == ConnState::Up && protocol == BackendProtocol::Gate {
                    self.enqueue(ctx, id, generation, now, |out| {
                        bproto::encode_disconnect(out, gone, DisconnectReason::Shutdown)
                    });
                }
            }
            if state == ConnState::Idle && waiting {
                // A dial was in flight in the old process: dial again.
                self.ensure_dialing(ctx, id, now);
            }
            ids.push((id, self.conns[id.0 as usize].as_ref().map_or(generation, |c| c.generation)));
        }
        ids
    }
}

impl Backends {
    /// What stream `id` speaks.
    pub(super) fn protocol(&self, id: ConnId) -> Option<BackendProtocol> {
        self.conn(id).map(|c| c.protocol)
    }

    /// Whether stream `id` is connected.
    pub(super) fn is_up(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.state == ConnState::Up)
    }
}

impl Backends {
    /// Moves every stream's keep-alive clocks on by `d` (at most to `now`):
    /// a live upgrade's abandoned pause.
    pub(super) fn shift_clocks(&mut self, d: Duration, now: Instant) {
        for c in self.conns.iter_mut().flatten() {
            c.last_rx = (c.last_rx + d).min(now);
            c.ping_sent = c.ping_sent.map(|t| (t + d).min(now));
        }
    }
}
