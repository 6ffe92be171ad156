//! A mock game backend: the reference for backend authors, and the peer that
//! tests, the demo and the load harness talk to.
//!
//! It echoes every `TRANS` back to its session (same `type`, `server_id` and
//! payload), answers `PING` with `PONG`, records `CONNECT`/`DISCONNECT` (and,
//! when asked, every `TRANS`) as [`Event`]s, and can be told to `KICK`,
//! `MULTICAST` and `BROADCAST`. It obeys the connection rule: a session's
//! frames go back on the connection its `CONNECT` (or first `TRANS`) came on.
//!
//! Plain blocking threads, one per connection: the gateway multiplexes
//! sessions, so a backend sees few connections.

use bytes::{Buf, BytesMut};
use crossbeam_channel::{unbounded, Receiver, Sender};
use gate_protocol::backend::{self as bproto, Body, Opcode};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the mock backend saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Accepted {
        conn: u64,
    },
    Connect {
        conn: u64,
        session: i64,
        transport: u8,
        addr: SocketAddr,
    },
    Disconnect {
        conn: u64,
        session: i64,
        reason: u8,
    },
    Trans {
        conn: u64,
        session: i64,
        msg_type: i32,
        server_id: u32,
        payload: Vec<u8>,
        trace: Option<bproto::TraceContext>,
    },
    Closed {
        conn: u64,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Record every `TRANS` as an event (tests); off for load runs.
    pub record_trans: bool,
    /// Expect the 33-byte gate header on `TRANS` (route with trace propagation).
    pub trace: bool,
    /// Do not echo `TRANS` (a backend that only records).
    pub no_echo: bool,
    /// Do not answer `PING` (a backend that only knows `TRANS`).
    pub no_pong: bool,
    /// Append these bytes to every echoed `TRANS` payload, so that a client
    /// can tell which backend answered (load runs with several backends).
    pub tag: Option<&'static [u8]>,
}

struct Inner {
    opts: Options,
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// Session -> the connection it arrived on.
    sessions: Mutex<HashMap<i64, u64>>,
    events: Sender<Event>,
    stopped: AtomicBool,
    next_conn: AtomicU64,
    trans_seen: AtomicU64,
}

/// A running mock backend; dropping it stops it.
pub struct MockBackend {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub events: Receiver<Event>,
}

impl MockBackend {
    /// Starts on `addr` (port 0 for any free port).
    pub fn start(addr: &str, opts: Options) -> std::io::Result<MockBackend> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = unbounded();
        let inner = Arc::new(Inner {
            opts,
            conns: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            events: tx,
            stopped: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            trans_seen: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let accept = std::thread::Builder::new().name("mock-accept".into()).spawn(move || accept_loop(listener, i2))?;
        Ok(MockBackend { addr, inner, accept: Mutex::new(Some(accept)), events: rx })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `TRANS` frames received so far.
    pub fn trans_seen(&self) -> u64 {
        self.inner.trans_seen.load(Ordering::Relaxed)
    }

    /// Open gateway connections.
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().unwrap().len()
    }

    /// Sessions seen (by `CONNECT` or `TRANS`) and not yet disconnected.
    pub fn sessions(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.inner.sessions.lock().unwrap().keys().copied().collect();
        v.sort();
        v
    }

    fn send_on(&self, conn: u64, frame: &[u8]) -> std::io::Result<()> {
        let mut conns = self.inner.conns.lock().unwrap();
        let s = conns
            .get_mut(&conn)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such connection"))?;
        s.write_all(frame)
    }

    fn conn_of(&self, session: i64) -> std::io::Result<u64> {
        self.inner
            .sessions
            .lock()
            .unwrap()
            .get(&session)
            .copied()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("unknown session {session}")))
    }

    /// Sends `TRANS` (a push) to one session.
    pub fn push(&self, session: i64, msg_type: i32, server_id: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        bproto::encode_reply(&mut b, msg_type, server_id, session, payload);
        self.send_on(self.conn_of(session)?, &b)
    }

    /// Sends a raw frame on the connection that carries `session` (tests of
    /// the connection rule and of bad frames).
    pub fn send_raw_for(&self, session: i64, frame: &[u8]) -> std::io::Result<()> {
        self.send_on(self.conn_of(session)?, frame)
    }

    /// Sends raw bytes on every connection.
    pub fn send_raw_all(&self, frame: &[u8]) -> std::io::Result<()> {
        for s in self.inner.conns.lock().unwrap().values_mut() {
            s.write_all(frame)?;
        }
        Ok(())
    }

    pub fn kick(&self, session: i64, msg_type: i32, last_frame: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        bproto::encode_kick(&mut b, msg_type, 0, session, last_frame);
        self.send_on(self.conn_of(session)?, &b)
    }

    /// `MULTICAST` to `sessions`, grouped per connection they live on.
    pub fn multicast(&self, sessions: &[i64], msg_type: i32, payload: &[u8]) -> std::io::Result<()> {
        let mut by_conn: HashMap<u64, Vec<i64>> = HashMap::new();
        for s in sessions {
            by_conn.entry(self.conn_of(*s)?).or_default().push(*s);
        }
        for (conn, ids) in by_conn {
            let mut b = BytesMut::new();
            bproto::encode_multicast(&mut b, msg_type, 0, &ids, payload);
            self.send_on(conn, &b)?;
        }
        Ok(())
    }

    /// `BROADCAST` on every connection.
    pub fn broadcast(&self, msg_type: i32, payload: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        bproto::encode_broadcast(&mut b, msg_type, 0, payload);
        self.send_raw_all(&b)
    }

    /// Stops accepting and drops every connection at once (a backend crash).
    /// Returns once the listening socket is closed, so the port can be reused.
    pub fn kill(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for s in self.inner.conns.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(j) = self.accept.lock().unwrap().take() {
            let _ = j.join();
        }
    }

    /// A clean restart's first half: stops accepting, half-closes every
    /// connection (the gateway sees end of stream) and keeps reading (and
    /// recording) until the gateway closes its side, so nothing it wrote is
    /// lost; returns when every connection is done (bounded by 5 s).
    pub fn stop_gracefully(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for s in self.inner.conns.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Write);
        }
        let t0 = std::time::Instant::now();
        while !self.inner.conns.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(j) = self.accept.lock().unwrap().take() {
            let _ = j.join();
        }
    }

    /// Waits up to `timeout` for an event matching `pred`, skipping others.
    pub fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&Event) -> bool) -> Option<Event> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if pred(&e) => return Some(e),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Drains the events that already arrived.
    pub fn drain(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    while !inner.stopped.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
                let Ok(w) = s.try_clone() else { continue };
                inner.conns.lock().unwrap().insert(id, w);
                let _ = inner.events.send(Event::Accepted { conn: id });
                let i2 = inner.clone();
                let _ = std::thread::Builder::new().name(format!("mock-conn-{id}")).spawn(move || conn_loop(s, id, i2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Largest frame the mock accepts (matches the gateway default).
const MAX_FRAME: usize = 1 << 20;

fn conn_loop(mut s: TcpStream, conn: u64, inner: Arc<Inner>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = BytesMut::with_capacity(64 * 1024);
    'outer: loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let h = match bproto::check(&buf, MAX_FRAME) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("mock-backend: conn {conn}: bad frame: {e}");
                    break 'outer;
                }
            };
            let len = h.frame_len();
            match bproto::parse(&h, &buf[..len], inner.opts.trace) {
                Ok(body) => on_frame(&inner, conn, &h, body, &mut out),
                Err(e) => {
                    eprintln!("mock-backend: conn {conn}: bad frame body: {e}");
                    break 'outer;
                }
            }
            buf.advance(len);
        }
        if !out.is_empty() {
            // Replies go out under the connection lock so they never
            // interleave with a kick/multicast written by another thread.
            let mut conns = inner.conns.lock().unwrap();
            let r = match conns.get_mut(&conn) {
                Some(w) => w.write_all(&out),
                None => break,
            };
            drop(conns);
            out.clear();
            if r.is_err() {
                break;
            }
        }
    }
    inner.conns.lock().unwrap().remove(&conn);
    inner.sessions.lock().unwrap().retain(|_, c| *c != conn);
    let _ = inner.events.send(Event::Closed { conn });
}

fn on_frame(inner: &Inner, conn: u64, h: &bproto::Header, body: Body<'_>, out: &mut BytesMut) {
    match body {
        Body::Connect { transport, addr } => {
            inner.sessions.lock().unwrap().insert(h.session_id, conn);
            let _ = inner.events.send(Event::Connect { conn, session: h.session_id, transport, addr });
        }
        Body::Disconnect { reason } => {
            inner.sessions.lock().unwrap().remove(&h.session_id);
            let _ = inner.events.send(Event::Disconnect { conn, session: h.session_id, reason });
        }
        Body::Trans { trace, payload } => {
            inner.trans_seen.fetch_add(1, Ordering::Relaxed);
            if inner.opts.record_trans {
                inner.sessions.lock().unwrap().entry(h.session_id).or_insert(conn);
                let _ = inner.events.send(Event::Trans {
                    conn,
                    session: h.session_id,
                    msg_type: h.msg_type,
                    server_id: h.server_id,
                    payload: payload.to_vec(),
                    trace,
                });
            }
            match (inner.opts.no_echo, inner.opts.tag) {
                (true, _) => {}
                (false, None) => bproto::encode_reply(out, h.msg_type, h.server_id, h.session_id, payload),
                (false, Some(tag)) => {
                    let tagged = [payload, tag].concat();
                    bproto::encode_reply(out, h.msg_type, h.server_id, h.session_id, &tagged);
                }
            }
        }
        Body::Ping if !inner.opts.no_pong => bproto::encode_ping(out, Opcode::Pong, h.object_id),
        Body::Ping => {}
        Body::Pong
        | Body::Kick { .. }
        | Body::Multicast { .. }
        | Body::Broadcast { .. }
        | Body::SessionAttrs { .. }
        | Body::Announce { .. } => {}
    }
}
