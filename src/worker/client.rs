//! Client sessions inside a worker: accept, read, route, write, close.
//!
//! # Session lifecycle
//! ```text
//! accept --cap ok--> open (reader + writer tasks)
//!   reader: bytes -> client frames -> route/bind -> backend queue
//!   writer: session queue -> socket (one write per wake-up)
//! end: the reader returns (client EOF, read error, protocol error, or a
//!      shutdown(SHUT_RD) issued by kick / idle sweep / stop / backend loss)
//!   -> close(): leave the table, DISCONNECT to every bound backend,
//!      wake the writer, which flushes what is queued, sends FIN and exits.
//! ```
//! Whoever wants a session to end calls [`ClientSession::begin_close`] with
//! a reason; only the reader's exit runs the close, so it runs exactly once.

use super::backend::BackendConn;
use super::ws::{WsEnd, WsState};
use super::Worker;
use crate::config::RateLimitAction;
use crate::limits::MessageLimiter;
use crate::notify::Notify;
use crate::protocol::backend::{self as bproto, DisconnectReason, Transport};
use crate::protocol::client as cproto;
use crate::protocol::frontdoor::{parse_http, parse_proxy, sniff, HttpDecision, ProxyError, Sniff};
use crate::protocol::ServerId;
use crate::routing::{OnBackendLoss, PickInput};
use crate::session::SessionInfo;
use crate::stats::bump;
use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

/// Initial read buffer per session: a few small game frames.
pub const READ_BUF_INITIAL: usize = 2048;
/// Buffers grown past this (by a large frame) are released once empty, so an
/// idle session never pins a 64 KiB buffer.
pub const READ_BUF_KEEP_MAX: usize = 16 * 1024;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// First bytes not seen yet (PROXY header, HTTP or game frames).
    Sniffing,
    /// Client frames straight on TCP.
    Game,
    /// Client frames inside WebSocket binary messages.
    WebSocket,
}

/// A W3C-style trace id, displayed as 32 hex digits.
#[derive(Clone, Copy)]
pub struct TraceId(pub [u8; 16]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::access_log::Hex(&self.0).fmt(f)
    }
}

/// A session's binding to one backend connection for one server type.
pub struct Binding {
    pub server_type: u8,
    pub conn: Rc<BackendConn>,
    /// The connection generation this binding was made on; a redialed
    /// connection is a new stream the backend knows nothing about.
    pub generation: u64,
    pub notify: bool,
    pub trace: bool,
    pub on_loss: OnBackendLoss,
}

pub struct ClientSession {
    pub info: RefCell<SessionInfo>,
    pub bindings: RefCell<Vec<Binding>>,
    /// Frames waiting to be written to the client.
    pub out: RefCell<BytesMut>,
    pub writer_wake: Notify,
    /// Set once `close` ran: the writer flushes and exits.
    pub closed: Cell<bool>,
    /// When the oldest frame waiting in `out` was queued (forward latency).
    oldest: Cell<Option<Instant>>,
    /// `frames_out` at the last completed write (frames per write batch).
    written_frames: Cell<u64>,
    /// `messages_per_second` bucket.
    limiter: Cell<MessageLimiter>,
    /// Counted in the per-IP table (released on close).
    ip_counted: Cell<bool>,
    /// What the connection speaks (decided by the front door).
    pub mode: Cell<Mode>,
    /// A PROXY header was already taken.
    proxy_done: Cell<bool>,
    /// WebSocket framing state, once upgraded.
    pub ws: RefCell<Option<Box<WsState>>>,
    fd: RawFd,
}

impl ClientSession {
    pub fn id(&self) -> i64 {
        self.info.borrow().id
    }

    /// The session's trace id, for log lines (hex when displayed).
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.info.borrow().trace_id)
    }

    /// Asks the session to end with `reason` (first reason wins). The reader
    /// is woken by `shutdown(SHUT_RD)` and runs the close; `hard` also shuts
    /// the write side, for a client that does not read (its writer may be
    /// blocked on a full socket buffer).
    /// Returns whether this call decided the reason.
    pub fn begin_close(&self, reason: DisconnectReason, hard: bool) -> bool {
        if self.closed.get() || !self.info.borrow_mut().set_close_reason(reason) {
            return false;
        }
        let how = if hard { libc::SHUT_RDWR } else { libc::SHUT_RD };
        unsafe { libc::shutdown(self.fd, how) };
        true
    }

    /// Queues one client frame towards the client.
    pub fn deliver(&self, w: &Worker, msg_id: u16, server_id: u32, payload: &[u8]) -> bool {
        if self.closed.get() {
            bump(&mut w.stats.borrow_mut().frames_dropped, "session_closed", 1);
            return false;
        }
        let len = {
            let mut out = self.out.borrow_mut();
            if payload.len() <= cproto::MAX_PAYLOAD && self.mode.get() == Mode::WebSocket {
                // One client frame per binary message.
                super::ws::put_binary_header(&mut out, cproto::HEADER_LEN + payload.len());
            }
            if !cproto::encode(&mut out, msg_id, ServerId(server_id), payload) {
                drop(out);
                bump(&mut w.stats.borrow_mut().frames_dropped, "reply_too_large", 1);
                if let Some(n) = w.logs.borrow_mut().allow("reply_too_large", Instant::now()) {
                    tracing::warn!(
                        session_id = self.id(),
                        trace_id = %self.trace_id(),
                        len = payload.len(),
                        suppressed = n,
                        "backend reply larger than a client frame can carry, dropped"
                    );
                }
                return false;
            }
            out.len()
        };
        {
            let mut info = self.info.borrow_mut();
            info.frames_out += 1;
            info.bytes_out += (cproto::HEADER_LEN + payload.len()) as u64;
        }
        if self.oldest.get().is_none() {
            self.oldest.set(Some(Instant::now()));
        }
        self.writer_wake.notify();
        if len > w.cfg.borrow().limits.max_queued_bytes_per_session
            && self.begin_close(DisconnectReason::RateLimited, true)
        {
            bump(&mut w.stats.borrow_mut().protocol_errors, "slow_reader", 1);
            if let Some(n) = w.logs.borrow_mut().allow("slow_reader", Instant::now()) {
                tracing::warn!(
                    session_id = self.id(),
                        trace_id = %self.trace_id(),
                    queued = len,
                    suppressed = n,
                    "client does not read its replies, closing"
                );
            }
        }
        true
    }

    /// Releases bindings whose backend the current route table no longer lists.
    pub fn unbind_unlisted(&self, w: &Worker) {
        let routes = w.routes.borrow().clone();
        let id = self.id();
        self.bindings.borrow_mut().retain(|b| {
            if routes.lists(&b.conn.endpoint.addr) {
                return true;
            }
            b.conn.unbind(w, id, b.generation, b.notify.then_some(DisconnectReason::RouteChanged));
            false
        });
    }
}

/// A freshly accepted client: cap check, session id, tasks.
pub fn on_accept(w: &Rc<Worker>, stream: TcpStream, peer: SocketAddr) {
    let now = Instant::now();
    let active = w.sessions.borrow().len() as u64;
    if active >= w.max_connections_here() {
        bump(&mut w.stats.borrow_mut().connection_rejected, "max_connections", 1);
        if let Some(n) = w.logs.borrow_mut().allow("max_connections", now) {
            tracing::warn!(worker = w.index, client = %peer, active, suppressed = n, "connection refused: max_connections reached");
        }
        return;
    }
    let (max_per_ip, rate_per_ip) = w.per_ip_limits_here();
    let ip_counted = max_per_ip > 0 || rate_per_ip > 0;
    if let Err(refusal) = w.ip_table.borrow_mut().admit(peer.ip(), max_per_ip, rate_per_ip, now) {
        let mut stats = w.stats.borrow_mut();
        bump(&mut stats.connection_rejected, refusal.as_str(), 1);
        bump(&mut stats.rate_limit_rejected, refusal.as_str(), 1);
        drop(stats);
        if let Some(n) = w.logs.borrow_mut().allow(refusal.as_str(), now) {
            tracing::warn!(worker = w.index, client = %peer, limit = refusal.as_str(), suppressed = n, "connection refused by a per-IP limit");
        }
        return;
    }
    let _ = stream.set_nodelay(true);
    let id = w.ids.borrow_mut().next();
    let fd = stream.as_raw_fd();
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&w.random().to_le_bytes());
    trace_id[8..].copy_from_slice(&w.random().to_le_bytes());
    let s = Rc::new(ClientSession {
        info: RefCell::new(SessionInfo::new(id, peer, Transport::Tcp, now, trace_id)),
        bindings: RefCell::new(Vec::new()),
        out: RefCell::new(BytesMut::new()),
        writer_wake: Notify::new(),
        closed: Cell::new(false),
        oldest: Cell::new(None),
        written_frames: Cell::new(0),
        limiter: Cell::new(MessageLimiter::new(w.cfg.borrow().limits.messages_burst, now)),
        ip_counted: Cell::new(ip_counted),
        mode: Cell::new(Mode::Sniffing),
        proxy_done: Cell::new(false),
        ws: RefCell::new(None),
        fd,
    });
    w.sessions.borrow_mut().insert(id, s.clone());
    w.stats.borrow_mut().connections_total += 1;
    tracing::debug!(session_id = id, trace_id = %TraceId(trace_id), client = %peer, "session opened");
    let (rd, wr) = stream.into_split();
    monoio::spawn(write_loop(w.clone(), s.clone(), wr));
    monoio::spawn(read_loop(w.clone(), s, rd));
}

async fn read_loop<R: AsyncReadRent>(w: Rc<Worker>, s: Rc<ClientSession>, mut rd: R) {
    let mut buf = BytesMut::with_capacity(READ_BUF_INITIAL);
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUF_INITIAL);
        }
        // monoio reads at the start of the buffer it is given, so hand it
        // the spare capacity only.
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => break,
            Ok(n) => {
                s.info.borrow_mut().bytes_in += n as u64;
            }
            Err(e) => {
                tracing::debug!(session_id = s.id(), trace_id = %s.trace_id(), error = %e, "client read failed");
                break;
            }
        }
        // Bytes read are forwarded even when the session is closing (drain,
        // kick): they were sent before the close and must not be lost. The
        // close itself arrives as end of stream after the buffered bytes.
        let r = match s.mode.get() {
            Mode::Sniffing => front_door(&w, &s, &mut buf),
            Mode::Game => on_client_bytes(&w, &s, &mut buf),
            Mode::WebSocket => on_ws_bytes(&w, &s, &mut buf),
        };
        if let Err(reason) = r {
            s.info.borrow_mut().set_close_reason(reason);
            break;
        }
        if buf.is_empty() && buf.capacity() > READ_BUF_KEEP_MAX {
            buf = BytesMut::with_capacity(READ_BUF_INITIAL);
        }
    }
    close(&w, &s);
}

/// The first bytes: an optional PROXY header (trusted sources only), then
/// HTTP (a WebSocket upgrade, or plain HTTP answered with 426) or client
/// frames. Bytes after a header stay in `buf` for the next stage.
fn front_door(w: &Rc<Worker>, s: &ClientSession, buf: &mut BytesMut) -> Result<(), DisconnectReason> {
    loop {
        match sniff(buf) {
            Sniff::NeedMore => return Ok(()),
            Sniff::Game => {
                s.mode.set(Mode::Game);
                return on_client_bytes(w, s, buf);
            }
            Sniff::Proxy => {
                let (enabled, trusted) = {
                    let cfg = w.cfg.borrow();
                    let ip = s.info.borrow().peer.ip();
                    (cfg.server.proxy_protocol, cfg.server.proxy_trusted.iter().any(|n| n.contains(&ip)))
                };
                let header = if !enabled {
                    Err(ProxyError::NotEnabled)
                } else if !trusted || s.proxy_done.get() {
                    Err(ProxyError::Untrusted(s.info.borrow().peer.ip()))
                } else {
                    parse_proxy(buf)
                };
                match header {
                    Ok(None) => return Ok(()),
                    Ok(Some(h)) => {
                        buf.advance(h.len);
                        s.proxy_done.set(true);
                        if let Some(client) = h.client {
                            readmit(w, s, client)?;
                        }
                    }
                    Err(e) => {
                        let kind = match e {
                            ProxyError::Malformed(_) => "proxy_malformed",
                            ProxyError::Untrusted(_) => "proxy_untrusted",
                            ProxyError::NotEnabled => "proxy_not_enabled",
                        };
                        bump(&mut w.stats.borrow_mut().protocol_errors, kind, 1);
                        if let Some(n) = w.logs.borrow_mut().allow(kind, Instant::now()) {
                            tracing::warn!(session_id = s.id(), trace_id = %s.trace_id(), client = %s.info.borrow().peer, error = %e, suppressed = n, "PROXY header refused, closing");
                        }
                        return Err(DisconnectReason::ProtocolError);
                    }
                }
            }
            Sniff::Http => {
                let (enabled, policy) = {
                    let cfg = w.cfg.borrow();
                    (cfg.websocket.enabled, cfg.websocket.policy.clone())
                };
                let Some((decision, len)) = parse_http(buf, &policy) else { return Ok(()) };
                buf.advance(len.min(buf.len()));
                match decision {
                    HttpDecision::Upgrade { response, subprotocol } if enabled => {
                        s.out.borrow_mut().extend_from_slice(response.as_bytes());
                        s.writer_wake.notify();
                        let max = w.cfg.borrow().websocket.max_message_size;
                        *s.ws.borrow_mut() = Some(Box::new(WsState::new(max)));
                        s.mode.set(Mode::WebSocket);
                        {
                            let mut info = s.info.borrow_mut();
                            info.transport = Transport::WebSocket;
                            info.handshaken = true;
                        }
                        w.stats.borrow_mut().websocket_upgrades += 1;
                        tracing::debug!(session_id = s.id(), trace_id = %s.trace_id(), subprotocol = ?subprotocol, "websocket upgrade");
                        return on_ws_bytes(w, s, buf);
                    }
                    HttpDecision::Upgrade { .. } => {
                        let body = "websocket is disabled on this gateway\n";
                        let resp = format!("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                        return refuse_http(w, s, 404, &resp);
                    }
                    HttpDecision::Refuse { status, response } => return refuse_http(w, s, status, &response),
                }
            }
        }
    }
}

/// Answers an HTTP request that is not (a valid) upgrade and ends the session.
fn refuse_http(w: &Worker, s: &ClientSession, status: u16, response: &str) -> Result<(), DisconnectReason> {
    s.out.borrow_mut().extend_from_slice(response.as_bytes());
    s.writer_wake.notify();
    let kind = match status {
        426 => "http_426",
        403 => "http_403",
        431 => "http_431",
        404 => "http_404",
        _ => "http_400",
    };
    bump(&mut w.stats.borrow_mut().protocol_errors, kind, 1);
    if let Some(n) = w.logs.borrow_mut().allow(kind, Instant::now()) {
        tracing::info!(session_id = s.id(), trace_id = %s.trace_id(), client = %s.info.borrow().peer, status, suppressed = n, "HTTP request on the game port answered and closed");
    }
    Err(DisconnectReason::ProtocolError)
}

/// The client address from a PROXY header replaces the connection's: it is
/// the one per-IP limits, `CONNECT`, logs and the access log see.
fn readmit(w: &Worker, s: &ClientSession, client: SocketAddr) -> Result<(), DisconnectReason> {
    let old = s.info.borrow().peer;
    if s.ip_counted.get() {
        w.ip_table.borrow_mut().release(old.ip());
        s.ip_counted.set(false);
    }
    s.info.borrow_mut().peer = client;
    let (max, rate) = w.per_ip_limits_here();
    if max > 0 || rate > 0 {
        if let Err(refusal) = w.ip_table.borrow_mut().admit(client.ip(), max, rate, Instant::now()) {
            let mut stats = w.stats.borrow_mut();
            bump(&mut stats.connection_rejected, refusal.as_str(), 1);
            bump(&mut stats.rate_limit_rejected, refusal.as_str(), 1);
            return Err(DisconnectReason::RateLimited);
        }
        s.ip_counted.set(true);
    }
    tracing::debug!(session_id = s.id(), trace_id = %s.trace_id(), proxy = %old, client = %client, "client address from PROXY header");
    Ok(())
}

/// WebSocket bytes: unwrap binary messages into the client frame stream,
/// then frame that stream exactly as on TCP.
fn on_ws_bytes(w: &Rc<Worker>, s: &ClientSession, buf: &mut BytesMut) -> Result<(), DisconnectReason> {
    let mut guard = s.ws.borrow_mut();
    let Some(ws) = guard.as_mut() else { return Err(DisconnectReason::ProtocolError) };
    let r = ws.on_bytes(buf, &mut s.out.borrow_mut());
    let mut stream = std::mem::take(&mut ws.stream);
    drop(guard);
    if !s.out.borrow().is_empty() {
        s.writer_wake.notify();
    }
    // Frames completed before a close still go to their backend.
    let framed = on_client_bytes(w, s, &mut stream);
    if let Some(ws) = s.ws.borrow_mut().as_mut() {
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
            bump(&mut w.stats.borrow_mut().protocol_errors, kind, 1);
            if let Some(n) = w.logs.borrow_mut().allow(kind, Instant::now()) {
                tracing::warn!(session_id = s.id(), trace_id = %s.trace_id(), code, reason = why, suppressed = n, "websocket protocol violation, closing");
            }
            Err(DisconnectReason::ProtocolError)
        }
    }
}

/// Frames and forwards everything complete in `buf`, leaving a partial
/// frame in place. An error ends the session with that reason.
fn on_client_bytes(w: &Rc<Worker>, s: &ClientSession, buf: &mut BytesMut) -> Result<(), DisconnectReason> {
    let (max, rate, burst, action) = {
        let l = &w.cfg.borrow().limits;
        (l.max_message_size, l.messages_per_second, l.messages_burst, l.on_rate_limit)
    };
    let now = Instant::now();
    loop {
        let h = match cproto::check(buf, max) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            Err(e) => {
                bump(&mut w.stats.borrow_mut().protocol_errors, "frame_too_large", 1);
                if let Some(n) = w.logs.borrow_mut().allow("client_protocol_error", now) {
                    let info = s.info.borrow();
                    tracing::warn!(session_id = info.id, trace_id = %TraceId(info.trace_id), client = %info.peer, error = %e, suppressed = n, "client protocol error, closing session");
                }
                return Err(DisconnectReason::ProtocolError);
            }
        };
        let first;
        {
            let mut info = s.info.borrow_mut();
            info.last_active = now;
            info.frames_in += 1;
            info.handshaken = true;
            first = info.first_server_type.is_none();
            if first {
                info.first_server_type = Some(h.server_id.server_type());
                info.first_world = h.server_id.world_id();
            }
        }
        if rate > 0 {
            let mut lim = s.limiter.get();
            let ok = lim.allow(rate, burst, now);
            s.limiter.set(lim);
            if !ok {
                let mut stats = w.stats.borrow_mut();
                bump(&mut stats.rate_limit_rejected, "messages_per_second", 1);
                bump(&mut stats.frames_dropped, "rate_limited", 1);
                drop(stats);
                if let Some(n) = w.logs.borrow_mut().allow("messages_per_second", now) {
                    tracing::warn!(
                        session_id = s.id(),
                        trace_id = %s.trace_id(),
                        rate,
                        burst,
                        suppressed = n,
                        "client frame over messages_per_second"
                    );
                }
                if action == RateLimitAction::Close {
                    return Err(DisconnectReason::RateLimited);
                }
                buf.advance(h.frame_len());
                continue;
            }
        }
        forward(w, s, h, &buf[cproto::HEADER_LEN..h.frame_len()], now);
        buf.advance(h.frame_len());
        if first {
            let started = s.info.borrow().started;
            w.stats.borrow_mut().setup_latency.record(now.saturating_duration_since(started));
        }
    }
}

/// Routes one client frame to its backend connection (binding on first use).
fn forward(w: &Rc<Worker>, s: &ClientSession, h: cproto::ClientHeader, payload: &[u8], now: Instant) {
    let st = h.server_id.server_type();
    let id = s.id();
    let mut bindings = s.bindings.borrow_mut();
    let pos = match bindings.iter().position(|b| b.server_type == st) {
        Some(i) if bindings[i].conn.generation() == bindings[i].generation => Some(i),
        Some(i) => {
            // The connection was lost and redialed since this binding was made.
            let b = bindings.swap_remove(i);
            if b.on_loss == OnBackendLoss::Close {
                drop(bindings);
                bump(&mut w.stats.borrow_mut().frames_dropped, "backend_lost", 1);
                s.begin_close(DisconnectReason::BackendLost, false);
                return;
            }
            None
        }
        None => None,
    };
    let pos = match pos {
        Some(i) => i,
        None => match bind(w, s, id, h) {
            Ok(b) => {
                bindings.push(b);
                bindings.len() - 1
            }
            Err(kind) => {
                drop(bindings);
                let mut stats = w.stats.borrow_mut();
                bump(&mut stats.routing_errors, kind, 1);
                bump(&mut stats.frames_dropped, "routing_error", 1);
                drop(stats);
                if let Some(n) = w.logs.borrow_mut().allow("routing_error", now) {
                    tracing::warn!(session_id = id, trace_id = %s.trace_id(), server_id = %h.server_id, msg_id = h.msg_id, error = kind, suppressed = n, "frame not routed, dropped");
                }
                return;
            }
        },
    };
    let b = &bindings[pos];
    // A fresh span per forwarded frame, under the session's trace.
    let trace =
        b.trace.then(|| bproto::TraceContext { trace_id: s.info.borrow().trace_id, span_id: w.random().to_le_bytes() });
    let conn = b.conn.clone();
    drop(bindings);
    if conn.enqueue(w, |out| bproto::encode_trans(out, h.msg_id as i32, h.server_id.0, id, trace.as_ref(), payload)) {
        w.stats.borrow_mut().messages_in[st as usize] += 1;
    }
}

/// First frame for a server type: pick an endpoint with the rule's strategy,
/// pick one of its connections, announce the session.
fn bind(w: &Rc<Worker>, s: &ClientSession, id: i64, h: cproto::ClientHeader) -> Result<Binding, &'static str> {
    let routes = w.routes.borrow().clone();
    let st = h.server_id.server_type();
    let world = h.server_id.world_id();
    let rule = routes.lookup(st, world).ok_or(crate::routing::RouteError::NoRule.as_str())?;
    let peer = s.info.borrow().peer;
    let input = PickInput { session_id: id, world_id: world, inst_id: h.server_id.inst_id(), client_ip: peer.ip() };
    let now = Instant::now();
    let ep = {
        let mut rr = w.rr.borrow_mut();
        let cursor = rr.entry(rule.key()).or_insert(w.index);
        let available = |e: &crate::routing::Endpoint| super::backend::endpoint_available(w, e, now);
        routes.pick(rule, &input, cursor, &available).map_err(|e| e.as_str())?.clone()
    };
    let conn = super::backend::conn_for(w, &ep, id, now).ok_or("backend_unavailable")?;
    let generation = conn.generation();
    conn.bind(id);
    if rule.notify_sessions {
        conn.enqueue(w, |out| bproto::encode_connect(out, id, s.info.borrow().transport, peer));
    }
    tracing::debug!(session_id = id, trace_id = %s.trace_id(), server_type = st, backend = %ep, "session bound");
    Ok(Binding {
        server_type: st,
        conn,
        generation,
        notify: rule.notify_sessions,
        trace: rule.trace_propagation,
        on_loss: rule.on_backend_loss,
    })
}

/// Runs once per session, when its reader ends.
fn close(w: &Worker, s: &Rc<ClientSession>) {
    if s.closed.replace(true) {
        return;
    }
    let (id, reason) = {
        let info = s.info.borrow();
        (info.id, info.close_reason.unwrap_or(DisconnectReason::ClientClosed))
    };
    w.sessions.borrow_mut().remove(&id);
    if s.ip_counted.get() {
        w.ip_table.borrow_mut().release(s.info.borrow().peer.ip());
    }
    let bindings = std::mem::take(&mut *s.bindings.borrow_mut());
    if w.cfg.borrow().log.access_log {
        let server = bindings.first().map(|b| &*b.conn.endpoint.name).unwrap_or("");
        crate::access_log::append(&mut w.access_buf.borrow_mut(), &s.info.borrow(), reason, server);
        w.access_pending.set(w.access_pending.get() + 1);
        if w.access_buf.borrow().len() >= crate::access_log::FLUSH_BYTES {
            w.flush_access_log();
        }
    }
    for b in bindings {
        b.conn.unbind(w, id, b.generation, b.notify.then_some(reason));
    }
    w.count_closed(reason);
    // A WebSocket client gets a close frame saying why (once).
    if let Some(ws) = s.ws.borrow_mut().as_mut() {
        use tungstenite::protocol::frame::coding::CloseCode;
        let (code, why) = match reason {
            DisconnectReason::Kicked => (CloseCode::Normal, "kicked"),
            DisconnectReason::Shutdown => (CloseCode::Away, "gateway shutting down"),
            DisconnectReason::IdleTimeout => (CloseCode::Away, "idle"),
            DisconnectReason::RateLimited => (CloseCode::Policy, "rate limited"),
            DisconnectReason::BackendLost => (CloseCode::Again, "backend unavailable"),
            DisconnectReason::ProtocolError => (CloseCode::Protocol, "protocol error"),
            DisconnectReason::ClientClosed | DisconnectReason::RouteChanged => (CloseCode::Normal, ""),
        };
        ws.close_into(&mut s.out.borrow_mut(), code, why);
    }
    {
        let info = s.info.borrow();
        tracing::debug!(
            session_id = id,
            trace_id = %s.trace_id(),
            client = %info.peer,
            reason = reason.as_str(),
            frames_in = info.frames_in,
            frames_out = info.frames_out,
            duration_ms = info.started.elapsed().as_millis() as u64,
            "session closed"
        );
    }
    s.writer_wake.notify();
    if w.sessions.borrow().is_empty() {
        w.sessions_gone.notify();
    }
}

async fn write_loop<W: AsyncWriteRent>(w: Rc<Worker>, s: Rc<ClientSession>, mut wr: W) {
    let mut spare = BytesMut::new();
    loop {
        if s.out.borrow().is_empty() {
            if s.closed.get() {
                break;
            }
            s.writer_wake.notified().await;
            continue;
        }
        let buf = std::mem::replace(&mut *s.out.borrow_mut(), spare);
        let oldest = s.oldest.take();
        let frames = s.info.borrow().frames_out;
        let (res, mut b) = wr.write_all(buf).await;
        if let Err(e) = res {
            tracing::debug!(session_id = s.id(), trace_id = %s.trace_id(), error = %e, "client write failed");
            s.out.borrow_mut().clear();
            s.begin_close(DisconnectReason::ClientClosed, true);
            // Wait for the reader to run the close, then exit.
            while !s.closed.get() {
                s.writer_wake.notified().await;
            }
            return;
        }
        if let Some(t) = oldest {
            // Frames in this write: those delivered since the previous write.
            let n = frames - s.written_frames.replace(frames);
            w.stats.borrow_mut().forward_b2c.record_n(t.elapsed(), n.max(1));
        }
        b.clear();
        spare = if b.capacity() > READ_BUF_KEEP_MAX { BytesMut::new() } else { b };
    }
    let _ = wr.shutdown().await;
}

/// Closes sessions past their handshake or idle deadline.
pub fn sweep(w: &Worker, now: Instant) {
    let (hs, idle) = {
        let cfg = w.cfg.borrow();
        (cfg.limits.handshake_timeout, cfg.limits.idle_timeout)
    };
    let mut expired = Vec::new();
    for s in w.sessions.borrow().values() {
        let info = s.info.borrow();
        if info.close_reason.is_some() {
            continue;
        }
        if !info.handshaken && now.duration_since(info.started) >= hs {
            expired.push((s.clone(), "handshake_timeout"));
        } else if now.duration_since(info.last_active) >= idle {
            expired.push((s.clone(), "idle_timeout"));
        }
    }
    for (s, kind) in expired {
        bump(&mut w.stats.borrow_mut().protocol_errors, kind, 1);
        if let Some(n) = w.logs.borrow_mut().allow(kind, now) {
            tracing::info!(session_id = s.id(), trace_id = %s.trace_id(), kind, suppressed = n, "closing session on timeout");
        }
        s.begin_close(DisconnectReason::IdleTimeout, false);
    }
}
