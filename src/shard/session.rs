//! Client sessions inside the shard: admission, the front door, framing,
//! limits, routing and binding, delivery, close. No I/O.
//!
//! # Session lifecycle
//! ```text
//! accept --admitted--> Sniffing --PROXY header (trusted)--> Sniffing (re-admitted as the header's client)
//!                         |--HTTP upgrade--> WebSocket     |--plain HTTP--> answered, closed
//!                         +--game frame----> Game
//! Game / WebSocket: frames -> limits -> route -> bind (CONNECT) -> backend queue
//! end: begin_close(reason) asks the driver to shut the socket's read side;
//!      the reader forwards what was already read, then reports
//!      client_closed -> DISCONNECT to every binding, access-log record,
//!      the session leaves the table, its queued replies go to the writer.
//! ```
//! Whoever wants a session to end calls `begin_close` (the first reason
//! wins); only [`Shard::client_closed`] removes it, so the close runs once.

use super::{handoff, AcceptRefusal, Action, ConnId, Ctx, DropReason, Phase, SessionKey, Shard, Shut, MIN_QUEUE_SHARE};
use crate::config::RateLimitAction;
use crate::config::TlsMode;
use crate::limits::MessageLimiter;
use crate::protocol::backend::{self as bproto, DisconnectReason, Transport};
use crate::protocol::client as cproto;
use crate::protocol::frontdoor::{
    looks_like_tls, parse_http, parse_proxy, sniff, HttpDecision, HttpRefusal, ProxyError, Sniff,
};
use crate::protocol::grpc;
use crate::protocol::ws::{self, WsEnd, WsState};
use crate::protocol::ServerId;
use crate::routing::{BackendProtocol, BindingMode, OnBackendLoss, PickInput, RouteError};
use crate::session::{SessionInfo, TraceId};
use crate::stats::bump;
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::Instant;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// First bytes not seen yet (PROXY header, HTTP or game frames).
    Sniffing,
    /// Client frames straight on TCP.
    Game,
    /// Client frames inside WebSocket binary messages.
    WebSocket,
}

/// A session's binding to one backend stream for one server type.
#[derive(Debug, Clone, Copy)]
pub(super) struct Binding {
    pub(super) server_type: u8,
    /// The world of the frame that made the binding: with the server type,
    /// the rule that must keep listing the backend.
    pub(super) world: u16,
    pub(super) conn: ConnId,
    /// The stream generation this binding was made on; a redialed connection
    /// is a new stream the backend knows nothing about.
    pub(super) generation: u64,
    /// The rule sends CONNECT / DISCONNECT.
    pub(super) notify: bool,
    /// The rule propagates trace context in every frame.
    pub(super) trace: bool,
    pub(super) on_loss: OnBackendLoss,
    /// What the stream speaks (how frames for it are encoded).
    pub(super) protocol: BackendProtocol,
    /// Bytes this session queued on the stream since the writer last took
    /// the queue (its epoch): checked against the session's fair share.
    pub(super) queued: usize,
    /// The stream's queue epoch `queued` counts in.
    pub(super) epoch: u64,
    /// `on_backend_loss = "hold"`: the stream was lost; frames wait in the
    /// session's hold buffer until it is redialed and the session resumed.
    pub(super) held: bool,
}

/// Why a binding could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum BindError {
    #[error("{0}")]
    Route(RouteError),
    #[error("every connection to the chosen backend is backing off")]
    BackendUnavailable,
}

impl BindError {
    /// Metric label (`routing_errors_total{type}`).
    fn as_str(self) -> &'static str {
        match self {
            BindError::Route(e) => e.as_str(),
            BindError::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// One client connection's state.
pub(super) struct Session {
    /// The driver's name for this session (actions carry it).
    pub(super) key: SessionKey,
    /// Identity, addresses, counters and the close reason.
    pub(super) info: SessionInfo,
    /// At most one per server type the client has talked to.
    pub(super) bindings: Vec<Binding>,
    /// Bytes waiting for the client (frames, HTTP answers, WebSocket frames).
    pub(super) out: BytesMut,
    /// When the oldest frame waiting in `out` was queued (forward latency).
    oldest: Option<Instant>,
    /// `info.frames_out` when the writer last took `out` (frames per write).
    taken_frames: u64,
    /// `messages_per_second` bucket.
    limiter: MessageLimiter,
    /// Counted in the per-IP table (released on close).
    ip_counted: bool,
    /// What the connection speaks (decided by the front door).
    mode: Mode,
    /// A PROXY header was already taken (a second one is refused).
    proxy_done: bool,
    /// WebSocket framing state, once upgraded.
    pub(super) ws: Option<Box<WsState>>,
    /// `binding = "connection"`: the (server type, world) of the first frame,
    /// which every later frame follows.
    sticky: Option<(u8, u16)>,
    /// Reading stopped: the frame at the front of the buffer waits for room
    /// in its backend queue (backpressure, not a drop).
    paused: bool,
    /// A graceful close (FIN after the queue) was decided: no more replies.
    fin_decided: bool,
    /// The frame at the front of the buffer already passed the rate limit
    /// and the message policy (it waited for queue room): not charged twice.
    admitted_front: bool,
    /// The last client frame forwarded and the last reply delivered: a client
    /// that half-closes with a request outstanding still gets its reply.
    last_forward: Option<Instant>,
    last_deliver: Option<Instant>,
    /// When the client's end of stream arrived (half-close).
    eof_at: Option<Instant>,
    /// Since when a binding of this session is held (its backend was lost).
    pub(super) hold_since: Option<Instant>,
    /// Client frames waiting for a held backend, in order, as client frames.
    hold: BytesMut,
    /// Paced drain: when this session is to be closed.
    pub(super) close_at: Option<Instant>,
    /// Its backend said so (`SESSION_ATTRS`, gRPC `server_connect`): with
    /// `[limits] require_auth`, only `before_auth` classes pass before.
    pub(super) authenticated: bool,
    /// An opaque user id from the backend (logs, announcements).
    pub(super) user: Option<Box<[u8]>>,
    /// Tags from the backend: announcements can select by tag.
    pub(super) tags: Vec<Box<[u8]>>,
    /// Per message class rate budgets, created on first use.
    class_buckets: Vec<(u8, crate::limits::TokenBucket)>,
    /// The backend it was last bound to (the access log keeps it after a loss).
    last_backend: Option<std::sync::Arc<str>>,
    /// OTLP: this session is traced (its root span id, and when it began in
    /// Unix ns); `None` when not sampled.
    traced: Option<([u8; 8], u64)>,
    /// TLS on this connection: rustls' state (records in, plaintext out).
    tls: Option<Box<rustls::ServerConnection>>,
    /// Decrypted bytes not yet framed.
    tls_in: BytesMut,
    /// How many frames `hold` holds.
    hold_frames: u64,
}

/// What the message policy says of one client frame.
enum Verdict {
    Pass,
    Drop,
    Close,
}

/// Checks one client frame against `[[message_policy]]` and `require_auth`,
/// counting the outcome per class (`message_policy_total{policy, outcome}`).
fn check_policy(ctx: &mut Ctx, s: &mut Session, h: cproto::ClientHeader, now: Instant) -> Verdict {
    // The shared config is borrowed, not cloned: no reference count that
    // every core touches on every frame.
    let cfg = &*ctx.cfg;
    let st = s.sticky.map_or(h.server_id.server_type(), |(st, _)| st);
    let class = cfg.policy.class(st, h.msg_id).map(|i| (i, &cfg.policy.classes[i]));
    let name_index = class.map_or(cfg.policy.classes.len(), |(i, _)| i);
    let close = class.is_some_and(|(_, c)| c.close);
    let violation = if cfg.limits.require_auth && !s.authenticated && !class.is_some_and(|(_, c)| c.before_auth) {
        Some("unauthenticated")
    } else if let Some((i, c)) = class {
        if c.max_payload > 0 && h.len as usize > c.max_payload {
            Some("too_large")
        } else if c.rate > 0 {
            let b = match s.class_buckets.iter_mut().find(|(k, _)| *k as usize == i) {
                Some((_, b)) => b,
                None => {
                    s.class_buckets.push((i as u8, crate::limits::TokenBucket::full(c.burst.max(1), now)));
                    &mut s.class_buckets.last_mut().expect("just pushed").1
                }
            };
            (!b.try_take(c.rate, c.burst.max(1), now)).then_some("rate_limited")
        } else {
            None
        }
    } else {
        None
    };
    let name = ctx.policy_names[name_index].clone();
    let outcome = violation.unwrap_or("forwarded");
    *ctx.stats.message_policy.entry((name, outcome)).or_default() += 1;
    match violation {
        None => Verdict::Pass,
        Some(why) => {
            ctx.drop_frames(DropReason::Policy, 1);
            if let Some(n) = ctx.logs.allow("message_policy", now) {
                tracing::info!(session_id = s.info.id, trace_id = %s.trace_id(), msg_id = h.msg_id, why, suppressed = n, "client frame refused by the message policy");
            }
            if close {
                Verdict::Close
            } else {
                Verdict::Drop
            }
        }
    }
}

/// What the driver's reader does after [`Shard::client_data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Read more.
    Read,
    /// Stop reading until `Action::ResumeClient`, then call again (with 0
    /// new bytes) to forward what is buffered.
    Paused,
}

/// What the driver does after the client half-closed ([`Shard::client_eof`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HalfClose {
    /// End the session now.
    Close,
    /// A reply is still expected: ask again after this long.
    Linger(std::time::Duration),
}

/// Longest a half-closed client waits for an outstanding reply.
pub(crate) const HALF_CLOSE_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// After a reply reached a half-closed client, how long more replies may follow.
pub(crate) const HALF_CLOSE_QUIET: std::time::Duration = std::time::Duration::from_millis(200);

/// Moves queued plaintext through rustls into `records`, honouring partial
/// acceptance: rustls takes at most its buffer limit (64 KiB) per write, so
/// the records it made are drained between writes and nothing is cleared
/// that was not taken. Before the handshake completes the plaintext stays in
/// `plain` (rustls would otherwise buffer it unbounded); handshake records
/// and alerts still come out. An error means the connection failed (rustls
/// refuses every write after a fatal error); `plain` then keeps what was not
/// taken, for the caller to count.
pub(crate) fn seal_tls(
    tls: &mut rustls::ServerConnection,
    plain: &mut BytesMut,
    records: &mut BytesMut,
) -> std::io::Result<()> {
    use bytes::{Buf, BufMut};
    use std::io::Write;
    loop {
        while tls.wants_write() {
            // Writing into memory cannot fail.
            tls.write_tls(&mut records.writer())?;
        }
        if plain.is_empty() || tls.is_handshaking() {
            return Ok(());
        }
        let n = tls.writer().write(plain)?;
        if n == 0 && !tls.wants_write() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        plain.advance(n);
    }
}

/// What the driver's writer gets from [`Shard::take_client_out`].
pub(crate) enum ClientOut {
    /// The session left the table: the writer waits for its tail.
    Gone,
    /// Nothing queued.
    Empty,
    /// The queue was swapped into the writer's buffer: write it, then hand
    /// this back with the next take.
    Write(ClientWrite),
}

/// One write to a client: `frames` client frames, the oldest queued at
/// `oldest` (forward latency).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientWrite {
    frames: u64,
    oldest: Option<Instant>,
}

impl Session {
    /// What the connection speaks.
    pub(super) fn mode(&self) -> Mode {
        self.mode
    }

    /// Buffers one client frame for a held backend; `false` when the
    /// session's or the worker's hold bound would be exceeded.
    pub(super) fn hold_frame(&mut self, ctx: &mut Ctx, msg_id: u16, server_id: u32, payload: &[u8]) -> bool {
        let size = cproto::HEADER_LEN + payload.len();
        let b = &ctx.cfg.backend;
        if self.hold.len() + size > b.hold_max_bytes_per_session || ctx.held_bytes + size > b.hold_max_bytes_per_worker
        {
            return false;
        }
        cproto::encode(&mut self.hold, msg_id, ServerId(server_id), payload);
        self.hold_frames += 1;
        ctx.held_bytes += size;
        true
    }

    /// Drops the hold buffer, counting its frames as lost.
    pub(super) fn drop_hold(&mut self, ctx: &mut Ctx) {
        ctx.held_bytes -= self.hold.len();
        ctx.drop_frames(DropReason::BackendLost, std::mem::take(&mut self.hold_frames));
        self.hold = BytesMut::new();
        self.hold_since = None;
    }

    /// Takes the hold buffer for replay.
    pub(super) fn take_hold(&mut self, ctx: &mut Ctx) -> BytesMut {
        ctx.held_bytes -= self.hold.len();
        self.hold_frames = 0;
        self.hold_since = None;
        std::mem::take(&mut self.hold)
    }

    pub(super) fn trace_id(&self) -> TraceId {
        TraceId(self.info.trace_id)
    }

    /// Asks the session to end with `reason` (the first reason wins).
    /// Returns whether this call decided the reason.
    pub(super) fn begin_close(&mut self, ctx: &mut Ctx, reason: DisconnectReason, how: Shut) -> bool {
        if !self.info.set_close_reason(reason) {
            return false;
        }
        if how == Shut::Write {
            // Once the FIN is decided, nothing more can be written to the
            // client: later replies are dropped and counted, not queued.
            self.fin_decided = true;
        }
        ctx.actions.push(Action::ShutdownClient(self.key, how));
        true
    }

    fn push_out(&mut self, ctx: &mut Ctx, bytes: &[u8]) {
        if self.out.is_empty() {
            ctx.actions.push(Action::WakeClient(self.key));
        }
        self.out.extend_from_slice(bytes);
    }

    /// Queues one client frame towards the client. A client that lets more
    /// than `max_queued` bytes pile up is closed (it does not read).
    pub(super) fn deliver(
        &mut self,
        ctx: &mut Ctx,
        msg_id: u16,
        server_id: u32,
        payload: &[u8],
        max_queued: usize,
        now: Instant,
    ) -> bool {
        if self.fin_decided {
            ctx.drop_frames(DropReason::AfterClose, 1);
            return false;
        }
        let was_empty = self.out.is_empty();
        if payload.len() <= cproto::MAX_PAYLOAD && self.mode == Mode::WebSocket {
            // One client frame per binary message.
            ws::put_binary_header(&mut self.out, cproto::HEADER_LEN + payload.len());
        }
        if !cproto::encode(&mut self.out, msg_id, ServerId(server_id), payload) {
            ctx.drop_frames(DropReason::ReplyTooLarge, 1);
            if let Some(n) = ctx.logs.allow("reply_too_large", now) {
                tracing::warn!(
                    session_id = self.info.id,
                    trace_id = %self.trace_id(),
                    len = payload.len(),
                    suppressed = n,
                    "backend reply larger than a client frame can carry, dropped"
                );
            }
            return false;
        }
        self.info.frames_out += 1;
        self.info.bytes_out += (cproto::HEADER_LEN + payload.len()) as u64;
        self.last_deliver = Some(now);
        if self.oldest.is_none() {
            self.oldest = Some(now);
        }
        if was_empty {
            ctx.actions.push(Action::WakeClient(self.key));
        }
        let queued = self.out.len();
        if queued > max_queued && self.begin_close(ctx, DisconnectReason::RateLimited, Shut::Both) {
            bump(&mut ctx.stats.protocol_errors, "slow_reader", 1);
            if let Some(n) = ctx.logs.allow("slow_reader", now) {
                tracing::warn!(
                    session_id = self.info.id,
                    trace_id = %self.trace_id(),
                    queued,
                    suppressed = n,
                    "client does not read its replies, closing"
                );
            }
        }
        true
    }
}

impl Shard {
    /// A connection was accepted from `peer`: admission (global cap, per-IP
    /// cap and connect rate), then a new session. Refusals are counted and
    /// logged (rate-limited); the driver drops the socket.
    pub(crate) fn accept(&mut self, peer: SocketAddr, now: Instant) -> Result<SessionKey, AcceptRefusal> {
        let ctx = &mut self.ctx;
        let (max_per_ip, rate_per_ip) = ctx.per_ip_limits();
        // A trusted PROXY-protocol source (a balancer) is not a client: its
        // header's address is admitted instead, once it is read.
        let server = &ctx.cfg.server;
        let from_proxy =
            server.proxy_protocol && server.proxy_trusted.iter().any(|n| n.contains(&peer.ip().to_canonical()));
        let ip_counted = !from_proxy && (max_per_ip > 0 || rate_per_ip > 0);
        let refusal = if self.phase == Phase::Draining {
            Some(AcceptRefusal::Draining)
        } else if !ctx.admission.try_open(ctx.cfg.limits.max_connections) {
            Some(AcceptRefusal::MaxConnections)
        } else if ip_counted {
            let r = ctx.admission.admit_ip(peer.ip(), max_per_ip, rate_per_ip, now).err().map(AcceptRefusal::PerIp);
            if r.is_some() {
                ctx.admission.close_one();
            }
            r
        } else {
            None
        };
        if let Some(r) = refusal {
            bump(&mut ctx.stats.connection_rejected, r.as_str(), 1);
            if let AcceptRefusal::PerIp(p) = r {
                bump(&mut ctx.stats.rate_limit_rejected, p.as_str(), 1);
            }
            if let Some(n) = ctx.logs.allow(r.as_str(), now) {
                tracing::warn!(worker = ctx.index, client = %peer, reason = r.as_str(), suppressed = n, "connection refused: {r}");
            }
            // Refused connections are in the access log too (bounded by the
            // writer: a flood is flushed, or dropped and counted, like any).
            if ctx.cfg.log.access_log {
                crate::access_log::append_refused(&mut self.access_buf, peer, r.as_str());
                self.access_pending += 1;
                if self.access_buf.len() >= crate::access_log::FLUSH_BYTES {
                    self.flush_access_log();
                }
            }
            return Err(r);
        }
        let id = self.ids.next_id();
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&ctx.random().to_le_bytes());
        trace_id[8..].copy_from_slice(&ctx.random().to_le_bytes());
        let limiter = MessageLimiter::new(ctx.cfg.limits.messages_burst, now);
        // Sampled per session, by ratio; only with an exporter configured.
        let traced = (ctx.cfg.otlp.endpoint.is_some()
            && (ctx.random() >> 11) as f64 / (1u64 << 53) as f64 <= ctx.cfg.otlp.sample_ratio)
            .then(|| (ctx.random().to_le_bytes(), crate::otlp::unix_ns()));
        let make = |key| Session {
            key,
            info: SessionInfo::new(id, peer, Transport::Tcp, now, trace_id),
            bindings: Vec::new(),
            out: BytesMut::new(),
            oldest: None,
            taken_frames: 0,
            limiter,
            ip_counted,
            mode: Mode::Sniffing,
            proxy_done: false,
            ws: None,
            sticky: None,
            paused: false,
            fin_decided: false,
            admitted_front: false,
            last_forward: None,
            last_deliver: None,
            eof_at: None,
            hold_since: None,
            hold: BytesMut::new(),
            hold_frames: 0,
            close_at: None,
            authenticated: false,
            user: None,
            tags: Vec::new(),
            class_buckets: Vec::new(),
            tls: None,
            tls_in: BytesMut::new(),
            last_backend: None,
            traced,
        };
        let key = self.sessions.insert(make, id);
        ctx.stats.connections_total += 1;
        tracing::debug!(session_id = id, trace_id = %TraceId(trace_id), client = %peer, "session opened");
        Ok(key)
    }

    /// Bytes read from the client (`read` of them new; the rest of `buf` is a
    /// partial frame kept from before). Complete frames are forwarded and
    /// consumed. `Err(reason)`: the session must end (the driver stops
    /// reading and reports [`Shard::client_closed`]).
    ///
    /// Bytes read are forwarded even when the session is closing (drain,
    /// kick): they were sent before the close and must not be lost.
    pub(crate) fn client_data(
        &mut self,
        key: SessionKey,
        buf: &mut BytesMut,
        read: usize,
        now: Instant,
    ) -> Result<Flow, DisconnectReason> {
        let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
        s.info.bytes_in += read as u64;
        s.paused = false;
        let r = if s.tls.is_some() {
            self.tls_data(key, buf, now)
        } else {
            match s.mode {
                Mode::Sniffing => self.front_door(key, buf, now),
                Mode::Game => self.client_frames(key, buf, now),
                Mode::WebSocket => self.ws_bytes(key, buf, now),
            }
        };
        let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
        if let Err(reason) = r {
            s.info.set_close_reason(reason);
            return Err(reason);
        }
        // A client that keeps sending without reading its replies: its
        // queue (WebSocket pongs and close replies included) is bounded.
        let max_queued = self.ctx.cfg.limits.max_queued_bytes_per_session;
        if s.out.len() > max_queued && s.begin_close(&mut self.ctx, DisconnectReason::RateLimited, Shut::Both) {
            bump(&mut self.ctx.stats.protocol_errors, "slow_reader", 1);
            if let Some(n) = self.ctx.logs.allow("slow_reader", now) {
                tracing::warn!(session_id = key.id, trace_id = %s.trace_id(), queued = s.out.len(), suppressed = n, "client does not read what it is sent, closing");
            }
        }
        Ok(if s.paused { Flow::Paused } else { Flow::Read })
    }

    /// The client half-closed (end of stream). A session that forwarded a
    /// frame after the last reply it got lingers, bounded, so the reply still
    /// reaches it; otherwise it ends now.
    pub(crate) fn client_eof(&mut self, key: SessionKey, now: Instant) -> HalfClose {
        let Some(s) = self.sessions.get_mut(key) else { return HalfClose::Close };
        let eof_at = *s.eof_at.get_or_insert(now);
        let outstanding = match (s.last_forward, s.last_deliver) {
            (Some(f), Some(d)) => f > d || d >= eof_at,
            (Some(_), None) => true,
            _ => false,
        };
        if s.info.close_reason.is_some() || !outstanding || now.saturating_duration_since(eof_at) >= HALF_CLOSE_MAX {
            return HalfClose::Close;
        }
        // After a reply arrived following the end of stream, a short quiet
        // period ends it; before any, the maximum wait.
        match s.last_deliver {
            Some(d) if d >= eof_at => {
                let quiet = now.saturating_duration_since(d);
                if quiet >= HALF_CLOSE_QUIET {
                    HalfClose::Close
                } else {
                    HalfClose::Linger(HALF_CLOSE_QUIET - quiet)
                }
            }
            _ => HalfClose::Linger(std::time::Duration::from_millis(50)),
        }
    }

    /// The first bytes: an optional PROXY header (trusted sources only), then
    /// HTTP (a WebSocket upgrade, or plain HTTP answered and closed) or
    /// client frames. Bytes after a header stay in `buf` for the next stage.
    fn front_door(&mut self, key: SessionKey, buf: &mut BytesMut, now: Instant) -> Result<(), DisconnectReason> {
        let id = key.id;
        loop {
            let ctx = &mut self.ctx;
            let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
            // TLS comes after a PROXY header and before everything else.
            let tls_mode = ctx.cfg.tls.mode;
            if tls_mode != TlsMode::Off && s.tls.is_none() && !matches!(sniff(buf), Sniff::Proxy) {
                match looks_like_tls(buf) {
                    Some(true) => {
                        let Some(server) = ctx.cfg.tls.server.clone() else {
                            return Err(DisconnectReason::ProtocolError);
                        };
                        match rustls::ServerConnection::new(server) {
                            Ok(c) => s.tls = Some(Box::new(c)),
                            Err(e) => {
                                tracing::warn!(session_id = id, error = %e, "TLS session could not start");
                                return Err(DisconnectReason::ProtocolError);
                            }
                        }
                        return self.tls_data(key, buf, now);
                    }
                    None => return Ok(()),
                    Some(false) if tls_mode == TlsMode::Required => {
                        bump(&mut ctx.stats.protocol_errors, "tls_required", 1);
                        if let Some(n) = ctx.logs.allow("tls_required", now) {
                            tracing::info!(session_id = id, client = %s.info.peer, suppressed = n, "plaintext on a TLS-only port, closing");
                        }
                        return Err(DisconnectReason::ProtocolError);
                    }
                    Some(false) => {}
                }
            }
            match sniff(buf) {
                Sniff::NeedMore => return Ok(()),
                Sniff::Game => {
                    s.mode = Mode::Game;
                    return self.client_frames(key, buf, now);
                }
                Sniff::Proxy => {
                    let server = &ctx.cfg.server;
                    let ip = s.info.peer.ip();
                    let header = if !server.proxy_protocol {
                        Err(ProxyError::NotEnabled)
                    } else if s.proxy_done || !server.proxy_trusted.iter().any(|n| n.contains(&ip.to_canonical())) {
                        Err(ProxyError::Untrusted(ip))
                    } else {
                        parse_proxy(buf)
                    };
                    match header {
                        Ok(None) => return Ok(()),
                        Ok(Some(h)) => {
                            buf.advance(h.len);
                            s.proxy_done = true;
                            if let Some(client) = h.client {
                                self.readmit(key, client, now)?;
                            }
                        }
                        Err(e) => {
                            let kind = e.kind();
                            bump(&mut ctx.stats.protocol_errors, kind, 1);
                            if let Some(n) = ctx.logs.allow(kind, now) {
                                tracing::warn!(session_id = id, trace_id = %s.trace_id(), client = %s.info.peer, error = %e, suppressed = n, "PROXY header refused, closing");
                            }
                            return Err(DisconnectReason::ProtocolError);
                        }
                    }
                }
                Sniff::Http => {
                    let Some((decision, len)) = parse_http(buf, &ctx.cfg.websocket.policy) else { return Ok(()) };
                    buf.advance(len.min(buf.len()));
                    let refusal = match decision {
                        HttpDecision::Upgrade { response, subprotocol } if ctx.cfg.websocket.enabled => {
                            s.push_out(ctx, response.as_bytes());
                            s.ws = Some(Box::new(WsState::new(ctx.cfg.websocket.max_message_size)));
                            s.mode = Mode::WebSocket;
                            s.info.transport = Transport::WebSocket;
                            s.info.handshaken = true;
                            ctx.stats.websocket_upgrades += 1;
                            tracing::debug!(session_id = id, trace_id = %s.trace_id(), subprotocol = subprotocol.as_deref().unwrap_or(""), "websocket upgrade");
                            return self.ws_bytes(key, buf, now);
                        }
                        HttpDecision::Upgrade { .. } => HttpRefusal::WebSocketDisabled,
                        HttpDecision::Refuse(r) => r,
                    };
                    // An HTTP request that is not (a valid) upgrade is answered
                    // and the session ends.
                    s.push_out(ctx, refusal.response().as_bytes());
                    let kind = refusal.metric_kind();
                    bump(&mut ctx.stats.protocol_errors, kind, 1);
                    if let Some(n) = ctx.logs.allow(kind, now) {
                        tracing::info!(session_id = id, trace_id = %s.trace_id(), client = %s.info.peer, status = refusal.status(), suppressed = n, "HTTP request on the game port answered and closed");
                    }
                    return Err(DisconnectReason::ProtocolError);
                }
            }
        }
    }

    /// The client address from a PROXY header replaces the connection's: it
    /// is the one per-IP limits, `CONNECT`, logs and the access log see.
    fn readmit(&mut self, key: SessionKey, client: SocketAddr, now: Instant) -> Result<(), DisconnectReason> {
        let id = key.id;
        let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
        let old = s.info.peer;
        if s.ip_counted {
            self.ctx.admission.release_ip(old.ip());
            s.ip_counted = false;
        }
        s.info.peer = client;
        let (max, rate) = self.ctx.per_ip_limits();
        if max > 0 || rate > 0 {
            if let Err(refusal) = self.ctx.admission.admit_ip(client.ip(), max, rate, now) {
                let stats = &mut self.ctx.stats;
                bump(&mut stats.connection_rejected, refusal.as_str(), 1);
                bump(&mut stats.rate_limit_rejected, refusal.as_str(), 1);
                return Err(DisconnectReason::RateLimited);
            }
            s.ip_counted = true;
        }
        tracing::debug!(session_id = id, trace_id = %s.trace_id(), proxy = %old, client = %client, "client address from PROXY header");
        Ok(())
    }

    /// TLS records from the client: decrypted by rustls into the session's
    /// plaintext buffer, which then goes through the front door, framing and
    /// WebSocket exactly as on a plain connection. Handshake answers and
    /// alerts wait in rustls until the writer takes them
    /// ([`Shard::take_client_out`] encrypts on the way out).
    fn tls_data(&mut self, key: SessionKey, buf: &mut BytesMut, now: Instant) -> Result<(), DisconnectReason> {
        use std::io::Read;
        let ctx = &mut self.ctx;
        let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
        let Some(tls) = s.tls.as_mut() else { return Err(DisconnectReason::ProtocolError) };
        let mut peer_closed = false;
        loop {
            if !buf.is_empty() {
                let mut rd: &[u8] = buf;
                match tls.read_tls(&mut rd) {
                    Ok(n) => buf.advance(n),
                    Err(e) => {
                        tracing::debug!(session_id = key.id, error = %e, "TLS input refused");
                        return Err(DisconnectReason::ProtocolError);
                    }
                }
            }
            if let Err(e) = tls.process_new_packets() {
                let kind = match e {
                    rustls::Error::InvalidMessage(_) => "tls_invalid_message",
                    rustls::Error::PeerIncompatible(_) => "tls_incompatible",
                    rustls::Error::AlertReceived(_) => "tls_alert",
                    rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => "tls_certificate",
                    _ => "tls_error",
                };
                bump(&mut ctx.stats.protocol_errors, kind, 1);
                if let Some(n) = ctx.logs.allow(kind, now) {
                    tracing::info!(session_id = key.id, client = %s.info.peer, error = %e, suppressed = n, "TLS failed, closing");
                }
                // The alert rustls queued goes out with the close.
                return Err(DisconnectReason::ProtocolError);
            }
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match tls.reader().read(&mut chunk) {
                    Ok(0) => {
                        peer_closed = true;
                        break;
                    }
                    Ok(n) => s.tls_in.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
            if buf.is_empty() || peer_closed {
                break;
            }
        }
        if tls.wants_write() && s.out.is_empty() {
            ctx.actions.push(Action::WakeClient(key));
        }
        let mut plain = std::mem::take(&mut s.tls_in);
        let r = match s.mode {
            Mode::Sniffing => self.front_door(key, &mut plain, now),
            Mode::Game => self.client_frames(key, &mut plain, now),
            Mode::WebSocket => self.ws_bytes(key, &mut plain, now),
        };
        if let Some(s) = self.sessions.get_mut(key) {
            s.tls_in = plain;
        }
        match r {
            Ok(()) if peer_closed => Err(DisconnectReason::ClientClosed),
            r => r,
        }
    }

    /// WebSocket bytes: unwrap binary messages into the client frame stream,
    /// then frame that stream exactly as on TCP.
    fn ws_bytes(&mut self, key: SessionKey, buf: &mut BytesMut, now: Instant) -> Result<(), DisconnectReason> {
        let id = key.id;
        let ctx = &mut self.ctx;
        let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
        let Some(ws) = s.ws.as_mut() else { return Err(DisconnectReason::ProtocolError) };
        let was_empty = s.out.is_empty();
        let r = ws.on_bytes(buf, &mut s.out);
        let mut stream = std::mem::take(&mut ws.stream);
        if was_empty && !s.out.is_empty() {
            ctx.actions.push(Action::WakeClient(key));
        }
        // Frames completed before a close still go to their backend.
        let framed = self.client_frames(key, &mut stream, now);
        if let Some(ws) = self.sessions.get_mut(key).and_then(|s| s.ws.as_mut()) {
            ws.stream = stream;
        }
        match r {
            Ok(()) => framed,
            Err(WsEnd::ClientClosed) => Err(DisconnectReason::ClientClosed),
            Err(WsEnd::Violation(code, why)) => {
                let kind = match code {
                    1003 => "websocket_text",
                    1009 => "websocket_too_large",
                    _ => "websocket_protocol",
                };
                bump(&mut self.ctx.stats.protocol_errors, kind, 1);
                if let Some(n) = self.ctx.logs.allow(kind, now) {
                    tracing::warn!(
                        session_id = id,
                        code,
                        reason = why,
                        suppressed = n,
                        "websocket protocol violation, closing"
                    );
                }
                Err(DisconnectReason::ProtocolError)
            }
        }
    }

    /// Frames and forwards everything complete in `buf`, leaving a partial
    /// frame in place. An error ends the session with that reason.
    fn client_frames(&mut self, key: SessionKey, buf: &mut BytesMut, now: Instant) -> Result<(), DisconnectReason> {
        let id = key.id;
        let (max, rate, burst, action) = {
            let l = &self.ctx.cfg.limits;
            (l.max_message_size, l.messages_per_second, l.messages_burst, l.on_rate_limit)
        };
        loop {
            let ctx = &mut self.ctx;
            let Some(s) = self.sessions.get_mut(key) else { return Err(DisconnectReason::ClientClosed) };
            let h = match cproto::check(buf, max) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => {
                    bump(&mut ctx.stats.protocol_errors, "frame_too_large", 1);
                    if let Some(n) = ctx.logs.allow("client_protocol_error", now) {
                        tracing::warn!(session_id = id, trace_id = %s.trace_id(), client = %s.info.peer, error = %e, suppressed = n, "client protocol error, closing session");
                    }
                    return Err(DisconnectReason::ProtocolError);
                }
            };
            let first = s.info.first_server_type.is_none();
            s.info.last_active = now;
            s.info.frames_in += 1;
            s.info.handshaken = true;
            if first {
                s.info.first_server_type = Some(h.server_id.server_type());
                s.info.first_world = h.server_id.world_id();
            }
            // A frame that waited for backend queue room was already
            // admitted by the rate limit and the message policy.
            let readmitted = std::mem::take(&mut s.admitted_front);
            if !readmitted && rate > 0 && !s.limiter.allow(rate, burst, now) {
                bump(&mut ctx.stats.rate_limit_rejected, "messages_per_second", 1);
                ctx.drop_frames(DropReason::RateLimited, 1);
                if let Some(n) = ctx.logs.allow("messages_per_second", now) {
                    tracing::warn!(session_id = id, trace_id = %s.trace_id(), rate, burst, suppressed = n, "client frame over messages_per_second");
                }
                if action == RateLimitAction::Close {
                    return Err(DisconnectReason::RateLimited);
                }
                buf.advance(h.frame_len());
                continue;
            }
            if !readmitted && (ctx.cfg.limits.require_auth || !ctx.cfg.policy.is_empty()) {
                match check_policy(ctx, s, h, now) {
                    Verdict::Pass => {}
                    Verdict::Drop => {
                        buf.advance(h.frame_len());
                        continue;
                    }
                    Verdict::Close => return Err(DisconnectReason::RateLimited),
                }
            }
            let started = s.info.started;
            if !self.forward(key, h, &buf[cproto::HEADER_LEN..h.frame_len()], now) {
                // Paused: the frame stays at the front of the buffer. Undo its
                // count; it is counted when it goes.
                if let Some(s) = self.sessions.get_mut(key) {
                    s.info.frames_in -= 1;
                    s.paused = true;
                    s.admitted_front = true;
                }
                return Ok(());
            }
            buf.advance(h.frame_len());
            if first {
                self.ctx.stats.setup_latency.record(now.saturating_duration_since(started));
            }
        }
    }

    /// Routes one client frame to its backend stream (binding on first use).
    /// Routes one client frame to its backend stream (binding on first use).
    /// `false`: the session's share of that stream's queue is full; the frame
    /// is not taken and the session pauses (everything else: `true`, the
    /// frame is gone, forwarded or counted as dropped).
    fn forward(&mut self, key: SessionKey, h: cproto::ClientHeader, payload: &[u8], now: Instant) -> bool {
        let id = key.id;
        let Some(s) = self.sessions.get_mut(key) else { return true };
        // With `binding = "connection"` every frame follows the first one.
        let (st, world) = s.sticky.unwrap_or((h.server_id.server_type(), h.server_id.world_id()));
        let mut index = s.bindings.iter().position(|b| b.server_type == st);
        if let Some(i) = index.filter(|i| s.bindings[*i].held) {
            let _ = i;
            // The backend is away and this session is held: buffer, in order.
            if !s.hold_frame(&mut self.ctx, h.msg_id, h.server_id.0, payload) {
                self.ctx.drop_frames(DropReason::BackendLost, 1);
                s.drop_hold(&mut self.ctx);
                tracing::info!(session_id = id, trace_id = %s.trace_id(), "hold buffer full, closing session");
                s.begin_close(&mut self.ctx, DisconnectReason::BackendLost, Shut::Read);
            }
            return true;
        }
        if let Some(i) = index {
            if self.backends.generation(s.bindings[i].conn) != Some(s.bindings[i].generation) {
                // The connection was lost and redialed since this binding was made.
                let b = s.bindings.swap_remove(i);
                if b.on_loss == OnBackendLoss::Close {
                    self.ctx.drop_frames(DropReason::BackendLost, 1);
                    s.begin_close(&mut self.ctx, DisconnectReason::BackendLost, Shut::Read);
                    return true;
                }
                index = None;
            }
        }
        let index = match index {
            Some(i) => i,
            None => match self.bind(key, st, world, h.server_id.inst_id(), now) {
                Ok(()) => self.sessions.get(key).map_or(0, |s| s.bindings.len() - 1),
                Err(e) => {
                    self.routing_failed(key, st, world, h, e, now);
                    return true;
                }
            },
        };
        let Some(s) = self.sessions.get_mut(key) else { return true };
        let b = &mut s.bindings[index];
        // Fairness: a session may fill only its share of the stream's queue
        // between two writes; past it, its reading pauses (TCP backpressure
        // on that client) instead of crowding out the other sessions.
        let size = cproto::HEADER_LEN + payload.len() + bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN;
        let epoch = self.backends.epoch(b.conn);
        if b.epoch != epoch {
            b.epoch = epoch;
            b.queued = 0;
        }
        if b.queued > 0 && b.queued + size > MIN_QUEUE_SHARE && b.queued + size > self.backends.share(&self.ctx, b.conn)
        {
            let conn = b.conn;
            self.backends.pause(conn, key);
            return false;
        }
        b.queued += size;
        let b = *b;
        // A fresh span per forwarded frame, under the session's trace.
        let trace = if b.trace {
            Some(bproto::TraceContext { trace_id: s.info.trace_id, span_id: self.ctx.random().to_le_bytes() })
        } else {
            None
        };
        let queued = self.backends.enqueue(&mut self.ctx, b.conn, b.generation, now, |out| match b.protocol {
            BackendProtocol::Gate => {
                bproto::encode_trans(out, h.msg_id as i32, h.server_id.0, id, trace.as_ref(), payload)
            }
            // The Go gateway's TCP mode sends server_id 0.
            BackendProtocol::SeedTcp => bproto::encode_trans(out, h.msg_id as i32, 0, id, trace.as_ref(), payload),
            BackendProtocol::Grpc => {
                grpc::encode_data(out, id, h.msg_id, payload, trace.as_ref().map(|t| (&t.trace_id[..], &t.span_id[..])))
            }
        });
        if queued {
            self.ctx.stats.messages_in[st as usize] += 1;
            s.last_forward = Some(now);
            if let Some((root, started)) = s.traced {
                use crate::otlp::Attr;
                let t = crate::otlp::unix_ns();
                if s.info.frames_in == 1 {
                    let span_id = self.ctx.random().to_le_bytes();
                    self.ctx.span(crate::otlp::SpanRecord {
                        trace_id: s.info.trace_id,
                        span_id,
                        parent: Some(root),
                        name: "session.setup",
                        start_ns: started,
                        end_ns: t,
                        attrs: vec![("client.address", Attr::Str(s.info.peer.to_string()))],
                    });
                }
                // The span id the backend got in the trace extension, when
                // the route propagates it.
                let span_id = trace.as_ref().map_or_else(|| self.ctx.random().to_le_bytes(), |t| t.span_id);
                self.ctx.span(crate::otlp::SpanRecord {
                    trace_id: s.info.trace_id,
                    span_id,
                    parent: Some(root),
                    name: "forward",
                    start_ns: t,
                    end_ns: t,
                    attrs: vec![
                        ("msg_id", Attr::Int(h.msg_id as i64)),
                        ("server_type", Attr::Int(st as i64)),
                        ("bytes", Attr::Int(payload.len() as i64)),
                    ],
                });
            }
        }
        true
    }

    /// A frame that could not be routed: counted, logged; a connection that
    /// follows one backend cannot go on without it (the Go gateway closes
    /// the client too).
    fn routing_failed(
        &mut self,
        key: SessionKey,
        st: u8,
        world: u16,
        h: cproto::ClientHeader,
        e: BindError,
        now: Instant,
    ) {
        let ctx = &mut self.ctx;
        bump(&mut ctx.stats.routing_errors, e.as_str(), 1);
        ctx.drop_frames(DropReason::RoutingError, 1);
        let Some(s) = self.sessions.get_mut(key) else { return };
        if let Some(n) = ctx.logs.allow("routing_error", now) {
            tracing::warn!(session_id = key.id, trace_id = %s.trace_id(), server_id = %h.server_id, msg_id = h.msg_id, error = e.as_str(), suppressed = n, "frame not routed, dropped");
        }
        let sticky_rule = ctx.routes.lookup(st, world).is_some_and(|r| r.binding == BindingMode::Connection);
        if s.sticky.is_some() || sticky_rule {
            s.begin_close(ctx, DisconnectReason::BackendLost, Shut::Read);
        }
    }

    /// First frame for a server type: pick an endpoint with the rule's
    /// strategy, pick one of its connections, announce the session.
    fn bind(&mut self, key: SessionKey, st: u8, world: u16, inst: u8, now: Instant) -> Result<(), BindError> {
        let id = key.id;
        let ctx = &mut self.ctx;
        let routes = ctx.routes.clone();
        let rule = routes.lookup(st, world).ok_or(BindError::Route(RouteError::NoRule))?;
        let Some(s) = self.sessions.get_mut(key) else { return Err(BindError::BackendUnavailable) };
        let peer = s.info.peer;
        let input = PickInput { session_id: id, world_id: world, inst_id: inst, client_ip: peer.ip() };
        let backends = &mut self.backends;
        let protocol = rule.backend_protocol;
        let seed_max = ctx.cfg.backend.seed_pool_max;
        let cursor = ctx.rr.entry(rule.key()).or_insert(ctx.index);
        let ep = {
            // `pick` takes a shared closure, and the breaker check may move a
            // breaker from open to half-open: borrow the pools mutably inside.
            let pools = std::cell::RefCell::new(&mut *backends);
            let available = |e: &crate::routing::Endpoint| pools.borrow_mut().available(e, protocol, seed_max, now);
            routes.pick(rule, &input, cursor, &available).map_err(BindError::Route)?.clone()
        };
        let (conn, generation) = backends.conn_for(ctx, &ep, protocol, id, now).ok_or(BindError::BackendUnavailable)?;
        // A second server type routed to a stream the session is already
        // bound on shares that binding: one CONNECT, one DISCONNECT.
        let shared = s.bindings.iter().any(|b| b.conn == conn && b.generation == generation);
        if !shared {
            backends.bind(conn, generation, id);
        }
        // seed_tcp backends know no lifecycle frames.
        let notify = rule.notify_sessions && protocol != BackendProtocol::SeedTcp;
        if notify && !shared {
            let transport = s.info.transport;
            let queued = backends.enqueue(ctx, conn, generation, now, |out| match protocol {
                BackendProtocol::Grpc => grpc::encode_connect(out, id, peer.ip(), transport == Transport::WebSocket),
                _ => bproto::encode_connect(out, id, transport, peer),
            });
            if !queued {
                // The queue refused the CONNECT (counted there): the backend
                // never heard of this session, so it is not bound either; its
                // next frame tries again.
                backends.unbind(ctx, conn, generation, id, None, now);
                return Err(BindError::BackendUnavailable);
            }
        }
        let b = Binding {
            server_type: st,
            world,
            conn,
            generation,
            notify,
            trace: rule.trace_propagation,
            on_loss: if protocol == BackendProtocol::SeedTcp { OnBackendLoss::Close } else { rule.on_backend_loss },
            protocol,
            queued: 0,
            epoch: 0,
            held: false,
        };
        if let Some((root, _)) = s.traced {
            let t = crate::otlp::unix_ns();
            use crate::otlp::Attr;
            let span_id = ctx.random().to_le_bytes();
            ctx.span(crate::otlp::SpanRecord {
                trace_id: s.info.trace_id,
                span_id,
                parent: Some(root),
                name: "route",
                start_ns: t,
                end_ns: t,
                attrs: vec![
                    ("server_type", Attr::Int(st as i64)),
                    ("world_id", Attr::Int(world as i64)),
                    ("backend", Attr::Str(ep.name.to_string())),
                    ("backend_protocol", Attr::Str(protocol.as_str().to_string())),
                    ("strategy", Attr::Str(rule.strategy.as_str().to_string())),
                ],
            });
        }
        // Most sessions talk to one server type: no room for four.
        s.bindings.reserve_exact(1);
        s.bindings.push(b);
        s.last_backend = Some(ep.name.clone());
        if rule.binding == BindingMode::Connection && s.sticky.is_none() {
            s.sticky = Some((st, world));
        }
        tracing::debug!(session_id = id, trace_id = %s.trace_id(), server_type = st, backend = %ep, protocol = %protocol, "session bound");
        Ok(())
    }

    /// Writing to the client failed: it is gone.
    pub(crate) fn client_write_failed(&mut self, key: SessionKey, err: &dyn std::fmt::Display) {
        let id = key.id;
        if let Some(s) = self.sessions.get_mut(key) {
            tracing::debug!(session_id = id, trace_id = %s.trace_id(), error = %err, "client write failed");
            s.out.clear();
            s.begin_close(&mut self.ctx, DisconnectReason::ClientClosed, Shut::Both);
        }
    }

    /// A write to a client completed: its frames' forward latency.
    pub(crate) fn client_wrote(&mut self, write: ClientWrite, now: Instant) {
        if let ClientWrite { frames, oldest: Some(t) } = write {
            self.ctx.stats.forward_b2c.record_n(now.saturating_duration_since(t), frames.max(1));
        }
    }

    /// The writer reports its last completed write (`done`), then takes
    /// everything queued for the client, swapped with its (empty) buffer so
    /// both allocations are reused.
    pub(crate) fn take_client_out(
        &mut self,
        key: SessionKey,
        buf: &mut BytesMut,
        done: Option<(ClientWrite, Instant)>,
    ) -> ClientOut {
        if let Some((write, now)) = done {
            self.client_wrote(write, now);
        }
        let Some(s) = self.sessions.get_mut(key) else { return ClientOut::Gone };
        if let Some(tls) = s.tls.as_mut() {
            // Plaintext goes into rustls once the handshake is done (before
            // it, it stays in `out`, bounded by the queue limit); records
            // come out. What rustls could not take stays queued.
            if let Err(e) = seal_tls(tls, &mut s.out, buf) {
                let unsent = s.out.len() as u64;
                s.out.clear();
                bump(&mut self.ctx.stats.frames_dropped, "tls_unsent", 1);
                tracing::debug!(session_id = key.id, error = %e, unsent, "tls: plaintext not sealed, connection failed");
            }
            if buf.is_empty() {
                return ClientOut::Empty;
            }
            let frames = s.info.frames_out - std::mem::replace(&mut s.taken_frames, s.info.frames_out);
            return ClientOut::Write(ClientWrite { frames, oldest: s.oldest.take() });
        }
        if s.out.is_empty() {
            return ClientOut::Empty;
        }
        let frames = s.info.frames_out - std::mem::replace(&mut s.taken_frames, s.info.frames_out);
        std::mem::swap(&mut s.out, buf);
        ClientOut::Write(ClientWrite { frames, oldest: s.oldest.take() })
    }

    /// The reader ended (end of stream, error, or `Err` from
    /// [`Shard::client_data`]): the session leaves the table, `DISCONNECT`
    /// goes to every binding, one access-log record is written, and the
    /// replies still queued go to the writer with [`Action::Closed`].
    pub(crate) fn client_closed(&mut self, key: SessionKey, now: Instant) {
        let id = key.id;
        let Some(mut s) = self.sessions.remove(key) else { return };
        let ctx = &mut self.ctx;
        let reason = s.info.close_reason.unwrap_or(DisconnectReason::ClientClosed);
        ctx.admission.close_one();
        if s.ip_counted {
            ctx.admission.release_ip(s.info.peer.ip());
        }
        if ctx.cfg.log.access_log {
            let server = s
                .bindings
                .first()
                .and_then(|b| self.backends.endpoint_name(b.conn))
                .or(s.last_backend.as_deref())
                .unwrap_or("");
            crate::access_log::append(&mut self.access_buf, &s.info, reason, server);
            self.access_pending += 1;
        }
        if s.hold_frames > 0 || !s.hold.is_empty() {
            s.drop_hold(ctx);
        }
        let bindings = std::mem::take(&mut s.bindings);
        for (i, b) in bindings.iter().enumerate() {
            if bindings[..i].iter().any(|o| o.conn == b.conn && o.generation == b.generation) {
                continue;
            }
            self.backends.unbind(ctx, b.conn, b.generation, id, b.notify.then_some(reason), now);
        }
        bump(&mut ctx.stats.sessions_closed, reason.as_str(), 1);
        if let Some((root, started)) = s.traced {
            use crate::otlp::Attr;
            ctx.span(crate::otlp::SpanRecord {
                trace_id: s.info.trace_id,
                span_id: root,
                parent: None,
                name: "session",
                start_ns: started,
                end_ns: crate::otlp::unix_ns(),
                attrs: vec![
                    ("session.id", Attr::Int(id)),
                    ("client.address", Attr::Str(s.info.peer.to_string())),
                    ("close.reason", Attr::Str(reason.as_str().to_string())),
                    ("frames.in", Attr::Int(s.info.frames_in as i64)),
                    ("frames.out", Attr::Int(s.info.frames_out as i64)),
                ],
            });
        }
        // A WebSocket client gets a close frame saying why (once).
        if let Some(ws) = s.ws.as_mut() {
            ws.close_for(&mut s.out, reason);
        }
        tracing::debug!(
            session_id = id,
            trace_id = %s.trace_id(),
            client = %s.info.peer,
            reason = reason.as_str(),
            frames_in = s.info.frames_in,
            frames_out = s.info.frames_out,
            duration_ms = now.saturating_duration_since(s.info.started).as_millis() as u64,
            "session closed"
        );
        let tail = match s.tls.as_mut() {
            // TLS: the last plaintext and a close_notify, as records.
            Some(tls) => {
                let mut tail = BytesMut::new();
                let sealed = seal_tls(tls, &mut s.out, &mut tail);
                if sealed.is_err() || !s.out.is_empty() {
                    // A failed connection, or a handshake that never finished:
                    // the plaintext cannot be sent. Counted, not silent.
                    bump(&mut ctx.stats.frames_dropped, "tls_unsent", 1);
                    s.out.clear();
                }
                tls.send_close_notify();
                let _ = seal_tls(tls, &mut s.out, &mut tail);
                tail
            }
            None => std::mem::take(&mut s.out),
        };
        ctx.actions.push(Action::Closed { key, tail });
        if self.access_buf.len() >= crate::access_log::FLUSH_BYTES {
            self.flush_access_log();
        }
        if self.sessions.is_empty() {
            self.ctx.actions.push(Action::SessionsGone);
        }
    }

    /// Releases bindings whose backend the rule for their server type and
    /// world no longer lists (`DISCONNECT` reason 8, once the session has no
    /// other binding on that stream).
    pub(super) fn unbind_unlisted(&mut self, key: SessionKey, now: Instant) {
        let id = key.id;
        let Some(s) = self.sessions.get_mut(key) else { return };
        let routes = self.ctx.routes.clone();
        let backends = &mut self.backends;
        let (kept, gone): (Vec<Binding>, Vec<Binding>) = s.bindings.iter().partition(|b| {
            backends.endpoint(b.conn).is_some_and(|e| routes.routes_to(b.server_type, b.world, &e.addr, b.protocol))
        });
        if gone.is_empty() {
            return;
        }
        if gone.iter().any(|b| b.held) {
            // A held binding whose backend left the routes: its buffered
            // frames cannot go there any more.
            s.drop_hold(&mut self.ctx);
        }
        s.bindings = kept;
        for (i, b) in gone.iter().enumerate() {
            let dup = gone[..i].iter().chain(&s.bindings).any(|o| o.conn == b.conn && o.generation == b.generation);
            if !dup {
                let notify = b.notify.then_some(DisconnectReason::RouteChanged);
                backends.unbind(&mut self.ctx, b.conn, b.generation, id, notify, now);
                // Its replies in flight still reach it.
                backends.released(b.conn, b.generation, id, now);
            }
        }
    }

    /// Closes sessions past their handshake or idle deadline.
    pub(super) fn sweep(&mut self, now: Instant) {
        let (hs, idle) = (self.ctx.cfg.limits.handshake_timeout, self.ctx.cfg.limits.idle_timeout);
        let ctx = &mut self.ctx;
        for s in self.sessions.iter_mut() {
            let id = &s.info.id;
            if s.info.close_reason.is_some() {
                continue;
            }
            let kind = if !s.info.handshaken && now.saturating_duration_since(s.info.started) >= hs {
                "handshake_timeout"
            } else if now.saturating_duration_since(s.info.last_active) >= idle {
                "idle_timeout"
            } else {
                continue;
            };
            bump(&mut ctx.stats.protocol_errors, kind, 1);
            if let Some(n) = ctx.logs.allow(kind, now) {
                tracing::info!(session_id = *id, trace_id = %s.trace_id(), kind, suppressed = n, "closing session on timeout");
            }
            s.begin_close(ctx, DisconnectReason::IdleTimeout, Shut::Read);
        }
    }
}

impl Session {
    /// This session as a live upgrade carries it (see `handoff`): `conn_index`
    /// names each binding's stream in the snapshot (`None`: not carried, so
    /// the binding is not either). The driver adds the socket index and the
    /// bytes its tasks hold.
    pub(super) fn snapshot(
        &self,
        ctx: &Ctx,
        conn_index: impl Fn(ConnId, u64) -> Option<u32>,
        now: Instant,
    ) -> handoff::SessionSnap {
        use handoff::ago;
        let l = &ctx.cfg.limits;
        let classes = &ctx.cfg.policy.classes;
        let bindings = self
            .bindings
            .iter()
            .filter_map(|b| {
                Some(handoff::BindingSnap {
                    server_type: b.server_type,
                    world: b.world,
                    conn: conn_index(b.conn, b.generation)?,
                    notify: b.notify,
                    trace: b.trace,
                    on_loss: match b.on_loss {
                        OnBackendLoss::Close => 0,
                        OnBackendLoss::Rebind => 1,
                        OnBackendLoss::Hold => 2,
                    },
                    held: b.held,
                })
            })
            .collect();
        let info = &self.info;
        handoff::SessionSnap {
            fd: 0,
            id: info.id,
            peer: info.peer,
            websocket_transport: info.transport == Transport::WebSocket,
            age_us: ago(now, info.started),
            idle_us: ago(now, info.last_active),
            close_reason: info.close_reason.map(|r| r as u8),
            handshaken: info.handshaken,
            frames_in: info.frames_in,
            frames_out: info.frames_out,
            bytes_in: info.bytes_in,
            bytes_out: info.bytes_out,
            first_server_type: info.first_server_type,
            first_world: info.first_world,
            trace_id: info.trace_id,
            bindings,
            out: self.out.to_vec(),
            out_frames: info.frames_out.saturating_sub(self.taken_frames),
            input: Vec::new(),
            paused: self.paused,
            limiter_tokens: self.limiter.bucket().tokens_at(l.messages_per_second, l.messages_burst, now),
            class_buckets: self
                .class_buckets
                .iter()
                .map(|(i, b)| {
                    let (rate, burst) = classes.get(*i as usize).map_or((0, 1), |c| (c.rate, c.burst));
                    (*i, b.tokens_at(rate, burst, now))
                })
                .collect(),
            ip_counted: self.ip_counted,
            mode: match self.mode {
                Mode::Sniffing => 0,
                Mode::Game => 1,
                Mode::WebSocket => 2,
            },
            proxy_done: self.proxy_done,
            ws: self.ws.as_ref().map(|w| w.snapshot()),
            sticky: self.sticky,
            fin_decided: self.fin_decided,
            admitted_front: self.admitted_front,
            last_forward_ago_us: self.last_forward.map(|t| ago(now, t)),
            last_deliver_ago_us: self.last_deliver.map(|t| ago(now, t)),
            eof_ago_us: self.eof_at.map(|t| ago(now, t)),
            hold_since_ago_us: self.hold_since.map(|t| ago(now, t)),
            hold: self.hold.to_vec(),
            hold_frames: self.hold_frames,
            close_in_us: self.close_at.map(|t| handoff::until(now, t)),
            authenticated: self.authenticated,
            user: self.user.as_ref().map(|u| u.to_vec()),
            tags: self.tags.iter().map(|t| t.to_vec()).collect(),
            last_backend: self.last_backend.as_deref().map(str::to_owned),
            traced: self.traced,
        }
    }

    /// A session carried by a live upgrade, as `key`, bound by `bindings`
    /// (already mapped onto this shard's streams).
    pub(super) fn restore(
        snap: handoff::SessionSnap,
        key: SessionKey,
        bindings: Vec<Binding>,
        now: Instant,
    ) -> Session {
        use handoff::back;
        let transport = if snap.websocket_transport { Transport::WebSocket } else { Transport::Tcp };
        let mut info = SessionInfo::new(snap.id, snap.peer, transport, back(now, snap.age_us), snap.trace_id);
        info.last_active = back(now, snap.idle_us);
        info.close_reason = snap.close_reason.and_then(DisconnectReason::from_u8);
        info.handshaken = snap.handshaken;
        info.frames_in = snap.frames_in;
        info.frames_out = snap.frames_out;
        info.bytes_in = snap.bytes_in;
        info.bytes_out = snap.bytes_out;
        info.first_server_type = snap.first_server_type;
        info.first_world = snap.first_world;
        let out = BytesMut::from(&snap.out[..]);
        Session {
            key,
            oldest: (!out.is_empty()).then_some(now),
            taken_frames: snap.frames_out.saturating_sub(snap.out_frames),
            info,
            bindings,
            out,
            limiter: MessageLimiter::from_bucket(crate::limits::TokenBucket::with_tokens(snap.limiter_tokens, now)),
            ip_counted: snap.ip_counted,
            mode: match snap.mode {
                1 => Mode::Game,
                2 => Mode::WebSocket,
                _ => Mode::Sniffing,
            },
            proxy_done: snap.proxy_done,
            ws: snap.ws.map(|w| Box::new(WsState::restore(w))),
            sticky: snap.sticky,
            paused: snap.paused,
            fin_decided: snap.fin_decided,
            admitted_front: snap.admitted_front,
            last_forward: snap.last_forward_ago_us.map(|us| back(now, us)),
            last_deliver: snap.last_deliver_ago_us.map(|us| back(now, us)),
            eof_at: snap.eof_ago_us.map(|us| back(now, us)),
            hold_since: snap.hold_since_ago_us.map(|us| back(now, us)),
            hold: BytesMut::from(&snap.hold[..]),
            hold_frames: snap.hold_frames,
            close_at: snap.close_in_us.map(|us| handoff::ahead(now, us)),
            authenticated: snap.authenticated,
            user: snap.user.map(Vec::into_boxed_slice),
            tags: snap.tags.into_iter().map(Vec::into_boxed_slice).collect(),
            class_buckets: snap
                .class_buckets
                .into_iter()
                .map(|(i, t)| (i, crate::limits::TokenBucket::with_tokens(t, now)))
                .collect(),
            last_backend: snap.last_backend.map(|s| std::sync::Arc::from(s.as_str())),
            traced: snap.traced,
            tls: None,
            tls_in: BytesMut::new(),
        }
    }

    /// A close decided and not yet carried out by the driver (a live upgrade
    /// asks the new process's driver again): how much of the socket to shut.
    pub(super) fn close_pending(&self) -> Option<Shut> {
        self.info.close_reason.map(|_| if self.fin_decided { Shut::Write } else { Shut::Read })
    }

    /// Whether a live upgrade can carry this session (TLS ones it cannot:
    /// rustls keeps its keys to itself).
    pub(super) fn carriable(&self) -> bool {
        self.tls.is_none()
    }
}
