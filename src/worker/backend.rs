//! Backend connections inside a worker: pools, dialing, multiplexed writes,
//! demultiplexed reads, loss.
//!
//! Each endpoint a worker routes to gets an [`EndpointPool`] of
//! `connections_per_endpoint` [`BackendConn`]s, created on first use.
//!
//! # Connection lifecycle
//! ```text
//! Idle --first bind--> Connecting --ok--> Up --read/write error, bad frame--> Backoff(until)
//!                          |                                                    |
//!                          +--dial error/timeout----------------------------> Backoff(until)
//! Backoff --until passed and a new bind--> Connecting (generation + 1)
//! ```
//! Frames queue in `out` while Connecting or Up; the writer takes the whole
//! queue per wake-up (one `write` for every frame queued since the last).
//! On loss, queued frames are counted as lost, each bound session is closed
//! (reason 7) or, where its rule says `rebind`, unbound to rebind on its next
//! frame. The backoff doubles per consecutive failure between
//! `reconnect_backoff_min` and `reconnect_backoff_max`, with +-20% jitter;
//! routing skips an endpoint whose connections are all backing off.

use super::client::ClientSession;
use super::Worker;
use crate::notify::Notify;
use crate::protocol::backend::{self as bproto, Body, DisconnectReason, Opcode};
use crate::resilience::{CircuitBreaker, CircuitState};
use crate::routing::{Endpoint, OnBackendLoss};
use crate::stats::bump;
use ahash::AHashSet;
use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Instant;

/// Read buffer per backend connection: many sessions' replies arrive here.
pub const BACKEND_READ_BUF: usize = 64 * 1024;
/// Longest a retired connection may take to write its last queue.
pub const RETIRE_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// Frames handled per backend read before yielding to other tasks, so one
/// busy backend cannot starve the core's other connections.
pub const MAX_FRAMES_PER_READ: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Idle,
    Connecting,
    Up,
    Backoff(Instant),
}

pub struct EndpointPool {
    pub endpoint: Endpoint,
    pub conns: Vec<Rc<BackendConn>>,
    /// Shared by the pool's connections: failures of any open it.
    pub breaker: Rc<RefCell<CircuitBreaker>>,
}

impl EndpointPool {
    pub fn circuit_gauge(&self, now: Instant) -> u64 {
        let b = self.breaker.borrow();
        // Report an open circuit that is due for a probe as half-open.
        match b.state() {
            CircuitState::Open { until } if now >= until => 2,
            s => s.gauge(),
        }
    }
}

pub struct BackendConn {
    pub endpoint: Endpoint,
    /// Index in the pool, for logs.
    pub slot: usize,
    state: Cell<ConnState>,
    /// Bumped on every dial; bindings and tasks of an older generation are stale.
    generation: Cell<u64>,
    /// Frames waiting for the writer, and how many.
    out: RefCell<BytesMut>,
    queued_frames: Cell<u64>,
    /// A write is in progress (its bytes left `out`).
    writing: Cell<bool>,
    wake: Notify,
    /// Sessions bound to this connection (its current generation).
    pub sessions: RefCell<AHashSet<i64>>,
    failures: Cell<u32>,
    fd: Cell<i32>,
    breaker: Rc<RefCell<CircuitBreaker>>,
    /// Enqueue time of the oldest frame waiting in `out` (forward latency).
    oldest: Cell<Option<Instant>>,
    /// Last bytes from the backend; drives the keep-alive PING.
    last_rx: Cell<Instant>,
    /// When the outstanding keep-alive PING went out.
    ping_sent: Cell<Option<Instant>>,
}

/// Is any connection of `ep` usable now (not backing off)?
pub fn endpoint_available(w: &Worker, ep: &Endpoint, now: Instant) -> bool {
    match w.pools.borrow().get(&ep.addr) {
        None => true,
        Some(p) => p.breaker.borrow_mut().allows(now) && p.conns.iter().any(|c| c.available(now)),
    }
}

/// The connection a session binds to on `ep`: starting from its id's slot,
/// the first one not backing off. Starts dialing it if needed.
pub fn conn_for(w: &Rc<Worker>, ep: &Endpoint, session_id: i64, now: Instant) -> Option<Rc<BackendConn>> {
    let pool = {
        let mut pools = w.pools.borrow_mut();
        pools
            .entry(ep.addr)
            .or_insert_with(|| {
                let b = &w.cfg.borrow().backend;
                let breaker =
                    Rc::new(RefCell::new(CircuitBreaker::new(b.circuit_failure_threshold, b.circuit_open_duration)));
                Rc::new(EndpointPool {
                    endpoint: ep.clone(),
                    conns: (0..b.connections_per_endpoint)
                        .map(|i| Rc::new(BackendConn::new(ep.clone(), i, breaker.clone())))
                        .collect(),
                    breaker,
                })
            })
            .clone()
    };
    let n = pool.conns.len();
    let start = (session_id as u64 % n as u64) as usize;
    let conn = (0..n).map(|i| &pool.conns[(start + i) % n]).find(|c| c.available(now))?.clone();
    conn.ensure_dialing(w, now);
    Some(conn)
}

impl BackendConn {
    fn new(endpoint: Endpoint, slot: usize, breaker: Rc<RefCell<CircuitBreaker>>) -> BackendConn {
        BackendConn {
            endpoint,
            slot,
            state: Cell::new(ConnState::Idle),
            generation: Cell::new(0),
            out: RefCell::new(BytesMut::new()),
            queued_frames: Cell::new(0),
            writing: Cell::new(false),
            wake: Notify::new(),
            sessions: RefCell::new(AHashSet::new()),
            failures: Cell::new(0),
            fd: Cell::new(-1),
            breaker,
            oldest: Cell::new(None),
            last_rx: Cell::new(Instant::now()),
            ping_sent: Cell::new(None),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.get()
    }

    pub fn is_up(&self) -> bool {
        self.state.get() == ConnState::Up
    }

    pub fn has_pending(&self) -> bool {
        matches!(self.state.get(), ConnState::Up | ConnState::Connecting)
            && (!self.out.borrow().is_empty() || self.writing.get())
    }

    fn available(&self, now: Instant) -> bool {
        match self.state.get() {
            ConnState::Backoff(until) => now >= until,
            _ => true,
        }
    }

    fn ensure_dialing(self: &Rc<Self>, w: &Rc<Worker>, now: Instant) {
        match self.state.get() {
            ConnState::Idle => {}
            ConnState::Backoff(until) if now >= until => {}
            _ => return,
        }
        self.breaker.borrow_mut().on_attempt();
        self.generation.set(self.generation.get() + 1);
        self.state.set(ConnState::Connecting);
        monoio::spawn(run(w.clone(), self.clone(), self.generation.get()));
    }

    pub fn bind(&self, session_id: i64) {
        self.sessions.borrow_mut().insert(session_id);
    }

    /// Unbinds a session; `notify` queues a `DISCONNECT` with that reason when
    /// the binding is still on the live stream.
    pub fn unbind(&self, w: &Worker, session_id: i64, generation: u64, notify: Option<DisconnectReason>) {
        if generation != self.generation.get() {
            return;
        }
        self.sessions.borrow_mut().remove(&session_id);
        if let Some(reason) = notify {
            self.enqueue(w, |out| bproto::encode_disconnect(out, session_id, reason));
        }
    }

    /// Appends one frame (written by `f`) to the queue and wakes the writer.
    /// Refused (and counted) when the connection is not live or the queue is
    /// over `max_queued_bytes`.
    pub fn enqueue(&self, w: &Worker, f: impl FnOnce(&mut BytesMut)) -> bool {
        let reason = match self.state.get() {
            ConnState::Up | ConnState::Connecting => {
                let mut out = self.out.borrow_mut();
                if out.len() <= w.cfg.borrow().backend.max_queued_bytes {
                    f(&mut out);
                    drop(out);
                    if self.oldest.get().is_none() {
                        self.oldest.set(Some(Instant::now()));
                    }
                    self.queued_frames.set(self.queued_frames.get() + 1);
                    self.wake.notify();
                    return true;
                }
                "backend_queue_full"
            }
            _ => "backend_unavailable",
        };
        let mut stats = w.stats.borrow_mut();
        bump(&mut stats.frames_dropped, reason, 1);
        bump(&mut stats.backend(&self.endpoint.name).errors, reason, 1);
        drop(stats);
        if let Some(n) = w.logs.borrow_mut().allow(reason, Instant::now()) {
            tracing::warn!(backend = %self.endpoint, reason, suppressed = n, "frame to backend dropped");
        }
        false
    }

    /// Closes a connection whose endpoint left the routes, after its queue
    /// drained (bounded by [`RETIRE_DRAIN_MAX`]). Its tasks see the generation
    /// change and exit without reporting a loss.
    pub async fn retire(self: Rc<Self>, w: Rc<Worker>) {
        let deadline = Instant::now() + RETIRE_DRAIN_MAX;
        while self.has_pending() && Instant::now() < deadline {
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let was_up = self.is_up();
        self.generation.set(self.generation.get() + 1);
        self.state.set(ConnState::Idle);
        self.out.borrow_mut().clear();
        self.queued_frames.set(0);
        self.shutdown_socket();
        self.fd.set(-1);
        self.wake.notify();
        if was_up {
            tracing::info!(worker = w.index, backend = %self.endpoint, slot = self.slot, "backend connection retired: no route lists it");
        }
    }

    pub fn shutdown_socket(&self) {
        let fd = self.fd.get();
        if fd >= 0 {
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// The stream of `generation` failed: back off, count what was queued as
    /// lost, and close or unbind every session bound to it. Runs once per
    /// generation.
    fn lost(&self, w: &Worker, generation: u64, kind: &'static str, err: &dyn std::fmt::Display) {
        if generation != self.generation.get() || matches!(self.state.get(), ConnState::Backoff(_) | ConnState::Idle) {
            return;
        }
        let was_up = self.state.get() == ConnState::Up;
        if self.breaker.borrow_mut().on_failure(Instant::now()) {
            bump(&mut w.stats.borrow_mut().backend(&self.endpoint.name).errors, "circuit_opened", 1);
            tracing::warn!(worker = w.index, backend = %self.endpoint, "circuit opened: routing skips this backend until a probe succeeds");
        }
        self.ping_sent.set(None);
        self.shutdown_socket();
        self.fd.set(-1);
        let failures = if was_up { 1 } else { self.failures.get().saturating_add(1) };
        self.failures.set(failures);
        let backoff = {
            let cfg = w.cfg.borrow();
            let (lo, hi) = (cfg.backend.reconnect_backoff_min, cfg.backend.reconnect_backoff_max);
            let base = lo.saturating_mul(1u32 << (failures - 1).min(16)).min(hi);
            // +-20% jitter so that workers and nodes do not redial in lockstep.
            let jitter = (w.random() % 401) as f64 / 1000.0 + 0.8;
            base.mul_f64(jitter).min(hi)
        };
        self.state.set(ConnState::Backoff(Instant::now() + backoff));
        let lost_frames = self.queued_frames.replace(0);
        self.out.borrow_mut().clear();
        self.oldest.set(None);
        let sessions: Vec<i64> = self.sessions.borrow_mut().drain().collect();
        {
            let mut stats = w.stats.borrow_mut();
            let b = stats.backend(&self.endpoint.name);
            bump(&mut b.errors, kind, 1);
            if kind == "dial_timeout" || kind == "keepalive_timeout" {
                b.timeouts += 1;
            }
            bump(&mut stats.frames_dropped, "backend_lost", lost_frames);
        }
        tracing::warn!(
            worker = w.index,
            backend = %self.endpoint,
            slot = self.slot,
            kind,
            error = %err,
            sessions = sessions.len(),
            lost_frames,
            retry_in_ms = backoff.as_millis() as u64,
            "backend connection lost"
        );
        for id in sessions {
            let Some(s) = w.sessions.borrow().get(&id).cloned() else {
                continue;
            };
            let policy = {
                let mut bindings = s.bindings.borrow_mut();
                bindings
                    .iter()
                    .position(|b| std::ptr::eq(Rc::as_ptr(&b.conn), self))
                    .map(|i| bindings.swap_remove(i).on_loss)
            };
            match policy {
                Some(OnBackendLoss::Rebind) => {
                    bump(&mut w.stats.borrow_mut().backend(&self.endpoint.name).errors, "session_rebind", 1);
                    tracing::info!(session_id = id, trace_id = %s.trace_id(), backend = %self.endpoint, "backend lost, session will rebind on its next frame");
                }
                Some(OnBackendLoss::Close) => {
                    tracing::info!(session_id = id, trace_id = %s.trace_id(), backend = %self.endpoint, "backend lost, closing session");
                    s.begin_close(DisconnectReason::BackendLost, false);
                }
                None => {}
            }
        }
        self.wake.notify();
    }
}

/// Dials, then writes queued frames until the stream fails or is replaced.
async fn run(w: Rc<Worker>, c: Rc<BackendConn>, generation: u64) {
    let (dial_timeout, addr) = (w.cfg.borrow().backend.dial_timeout, c.endpoint.addr);
    {
        let mut stats = w.stats.borrow_mut();
        let b = stats.backend(&c.endpoint.name);
        b.dials += 1;
        if c.failures.get() > 0 {
            b.retries += 1;
        }
    }
    let dial_start = Instant::now();
    let stream = match monoio::time::timeout(dial_timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return c.lost(&w, generation, "dial_failed", &e),
        Err(_) => return c.lost(&w, generation, "dial_timeout", &format_args!("no answer within {dial_timeout:?}")),
    };
    if c.generation.get() != generation {
        return;
    }
    w.stats.borrow_mut().dial_latency.record(dial_start.elapsed());
    let _ = stream.set_nodelay(true);
    c.fd.set(stream.as_raw_fd());
    c.state.set(ConnState::Up);
    c.failures.set(0);
    c.last_rx.set(Instant::now());
    c.ping_sent.set(None);
    if c.breaker.borrow_mut().on_success() {
        tracing::info!(worker = w.index, backend = %c.endpoint, "circuit closed: backend answered");
    }
    tracing::info!(worker = w.index, backend = %c.endpoint, slot = c.slot, "backend connected");
    let (rd, mut wr) = stream.into_split();
    monoio::spawn(read_loop(w.clone(), c.clone(), generation, rd));
    let mut spare = BytesMut::new();
    loop {
        if c.generation.get() != generation || c.state.get() != ConnState::Up {
            return;
        }
        if c.out.borrow().is_empty() {
            c.wake.notified().await;
            continue;
        }
        let buf = std::mem::replace(&mut *c.out.borrow_mut(), spare);
        let frames = c.queued_frames.replace(0);
        let oldest = c.oldest.take();
        let len = buf.len() as u64;
        c.writing.set(true);
        let (res, mut b) = wr.write_all(buf).await;
        c.writing.set(false);
        if let Err(e) = res {
            // The frames of this write are lost with the stream.
            c.queued_frames.set(c.queued_frames.get() + frames);
            return c.lost(&w, generation, "write_failed", &e);
        }
        {
            let mut stats = w.stats.borrow_mut();
            let bs = stats.backend(&c.endpoint.name);
            bs.bytes_sent += len;
            bs.frames_sent += frames;
            if let Some(t) = oldest {
                stats.forward_c2b.record_n(t.elapsed(), frames);
            }
        }
        b.clear();
        spare = if b.capacity() > 4 * BACKEND_READ_BUF { BytesMut::new() } else { b };
    }
}

async fn read_loop<R: AsyncReadRent>(w: Rc<Worker>, c: Rc<BackendConn>, generation: u64, mut rd: R) {
    let mut buf = BytesMut::with_capacity(BACKEND_READ_BUF);
    loop {
        if buf.capacity() - buf.len() < BACKEND_READ_BUF / 4 {
            buf.reserve(BACKEND_READ_BUF);
        }
        // monoio reads at the start of the buffer it is given, so hand it
        // the spare capacity only.
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        if c.generation.get() != generation {
            return;
        }
        match res {
            Ok(0) => return c.lost(&w, generation, "closed_by_backend", &"end of stream"),
            Ok(n) => {
                c.last_rx.set(Instant::now());
                w.stats.borrow_mut().backend(&c.endpoint.name).bytes_received += n as u64;
            }
            Err(e) => return c.lost(&w, generation, "read_failed", &e),
        }
        let max = w.cfg.borrow().backend.max_frame_size;
        let mut handled = 0;
        loop {
            let h = match bproto::check(&buf, max) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    bump(&mut w.stats.borrow_mut().protocol_errors, "backend_frame", 1);
                    return c.lost(&w, generation, "protocol_error", &e);
                }
            };
            let len = h.frame_len();
            match bproto::parse(&h, &buf[..len], false) {
                Ok(body) => on_backend_frame(&w, &c, &h, body),
                Err(e) => {
                    bump(&mut w.stats.borrow_mut().protocol_errors, "backend_frame", 1);
                    return c.lost(&w, generation, "protocol_error", &e);
                }
            }
            buf.advance(len);
            handled += 1;
            if handled >= MAX_FRAMES_PER_READ {
                handled = 0;
                crate::notify::yield_now().await;
                if c.generation.get() != generation {
                    return;
                }
            }
        }
    }
}

/// The session `id` if it is bound to `c`; otherwise counts the drop.
fn bound_session(w: &Worker, c: &BackendConn, id: i64) -> Option<Rc<ClientSession>> {
    if c.sessions.borrow().contains(&id) {
        if let Some(s) = w.sessions.borrow().get(&id) {
            return Some(s.clone());
        }
    }
    bump(&mut w.stats.borrow_mut().frames_dropped, "unbound_session", 1);
    if let Some(n) = w.logs.borrow_mut().allow("unbound_session", Instant::now()) {
        tracing::warn!(session_id = id, backend = %c.endpoint, suppressed = n, "backend frame for a session not bound to this connection, dropped");
    }
    None
}

fn on_backend_frame(w: &Worker, c: &BackendConn, h: &bproto::Header, body: Body<'_>) {
    w.stats.borrow_mut().backend(&c.endpoint.name).frames_received += 1;
    let msg_id = h.msg_type as u16;
    let st = (h.server_id >> 8) as u8 as usize;
    match body {
        Body::Trans { payload, .. } => {
            if let Some(s) = bound_session(w, c, h.session_id) {
                if s.deliver(w, msg_id, h.server_id, payload) {
                    w.stats.borrow_mut().messages_out[st] += 1;
                }
            }
        }
        Body::Kick { payload } => {
            if let Some(s) = bound_session(w, c, h.session_id) {
                if !payload.is_empty() {
                    s.deliver(w, msg_id, h.server_id, payload);
                }
                tracing::info!(session_id = h.session_id, trace_id = %s.trace_id(), backend = %c.endpoint, "session kicked by backend");
                s.begin_close(DisconnectReason::Kicked, false);
            }
        }
        Body::Multicast { sessions, payload } => {
            for id in sessions.iter() {
                if let Some(s) = bound_session(w, c, id) {
                    if s.deliver(w, msg_id, h.server_id, payload) {
                        w.stats.borrow_mut().messages_out[st] += 1;
                    }
                }
            }
        }
        Body::Broadcast { payload } => {
            let ids: Vec<i64> = c.sessions.borrow().iter().copied().collect();
            for id in ids {
                let s = w.sessions.borrow().get(&id).cloned();
                if let Some(s) = s {
                    if s.deliver(w, msg_id, h.server_id, payload) {
                        w.stats.borrow_mut().messages_out[st] += 1;
                    }
                }
            }
        }
        Body::Ping => {
            c.enqueue(w, |out| bproto::encode_ping(out, Opcode::Pong, h.session_id));
        }
        Body::Pong => {
            if let Some(sent) = c.ping_sent.take() {
                w.stats.borrow_mut().backend(&c.endpoint.name).rtt.record(sent.elapsed());
            }
        }
        Body::Connect { .. } | Body::Disconnect { .. } => {
            bump(&mut w.stats.borrow_mut().frames_dropped, "unexpected_opcode", 1);
            if let Some(n) = w.logs.borrow_mut().allow("unexpected_opcode", Instant::now()) {
                tracing::warn!(backend = %c.endpoint, opcode = ?h.opcode, suppressed = n, "backend sent a gateway-only opcode, dropped");
            }
        }
    }
}

/// Keep-alive, run once a second: a connection silent for
/// `keepalive_interval` gets a `PING`; one whose `PING` is unanswered after
/// `keepalive_timeout` is dead (handled as a loss). Any bytes from the backend
/// count as life, so busy connections are never pinged.
pub fn keepalive(w: &Worker, now: Instant) {
    let (interval, timeout) = {
        let b = &w.cfg.borrow().backend;
        (b.keepalive_interval, b.keepalive_timeout)
    };
    if interval.is_zero() {
        return;
    }
    let conns: Vec<Rc<BackendConn>> = w.pools.borrow().values().flat_map(|p| p.conns.iter().cloned()).collect();
    for c in conns {
        if !c.is_up() {
            continue;
        }
        match c.ping_sent.get() {
            Some(sent) if now.saturating_duration_since(sent) >= timeout => {
                c.lost(w, c.generation.get(), "keepalive_timeout", &format_args!("no PONG within {timeout:?}"));
            }
            Some(_) => {}
            None if now.saturating_duration_since(c.last_rx.get()) >= interval => {
                if c.enqueue(w, |out| bproto::encode_ping(out, Opcode::Ping, 0)) {
                    c.ping_sent.set(Some(now));
                }
            }
            None => {}
        }
    }
}
