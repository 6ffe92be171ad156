//! Tagged load: client threads, each running sessions one after another
//! (reconnecting when the gateway closes one, if asked). Every frame's
//! payload starts with the session's tag, a sequence number and its send
//! time, so a client can tell a reply that is not its own, a duplicate or a
//! reordering, and the latency. Each ended session leaves a [`SessionLedger`]
//! in the case's registry.

use bytes::BytesMut;
use game_gateway::protocol::{client as cproto, ServerId};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// We closed it after its replies were in (or went quiet): FIN.
    ClientClosed,
    /// The gateway closed it: we read until its end of stream.
    GatewayClosed,
    /// The gateway's side reset it (we may have missed queued replies).
    GatewayReset,
    /// We reset it ourselves (SO_LINGER 0), not reading replies.
    ClientReset,
    /// The connect failed (no session).
    ConnectFailed,
}

#[derive(Debug, Clone)]
pub struct SessionLedger {
    pub tag: u32,
    pub local: Option<SocketAddr>,
    /// Frames fully written to the socket.
    pub sent: u64,
    /// Replies with our own tag.
    pub delivered: u64,
    /// Replies with another tag (isolation broken).
    pub wrong_tag: u64,
    /// Replies whose sequence number did not increase (duplicate/reorder).
    pub order: u64,
    pub end: End,
    /// The load that made it (to tell normal clients from attackers).
    pub group: u8,
    /// (send time, receive time), ns since the case epoch.
    pub lat: Vec<(u64, u64)>,
}

/// What every client of a case shares: the clock, tags, the registry.
pub struct Case {
    pub name: &'static str,
    pub epoch: Instant,
    next_tag: AtomicU32,
    pub registry: Mutex<Vec<SessionLedger>>,
    pub replies: AtomicU64,
}

impl Case {
    pub fn new(name: &'static str) -> Arc<Case> {
        Arc::new(Case {
            name,
            epoch: Instant::now(),
            next_tag: AtomicU32::new(1),
            registry: Mutex::new(Vec::new()),
            replies: AtomicU64::new(0),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn tag(&self) -> u32 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    pub fn sessions(&self) -> Vec<SessionLedger> {
        self.registry.lock().unwrap().clone()
    }

    pub fn record(&self, l: SessionLedger) {
        self.registry.lock().unwrap().push(l);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub clients: usize,
    /// Frames outstanding at most per session (sent or queued, not replied).
    pub window: usize,
    /// Between two sends of one session (0: as fast as the socket takes).
    pub interval: Duration,
    pub payload: usize,
    pub server_id: u32,
    /// Open a new session when the gateway closes one.
    pub reconnect: bool,
    /// Outstanding frames with no reply for this long are written off (so
    /// the window does not stay full forever after a loss).
    pub reply_timeout: Duration,
    /// When stopping, wait this long without a reply before closing.
    pub quiet: Duration,
    /// Recorded in each session's ledger.
    pub group: u8,
}

impl Spec {
    pub fn new(clients: usize, server_id: u32) -> Spec {
        Spec {
            clients,
            window: 4,
            interval: Duration::from_millis(10),
            payload: 32,
            server_id,
            reconnect: true,
            reply_timeout: Duration::from_millis(800),
            quiet: Duration::from_millis(600),
            group: 0,
        }
    }
}

/// A running load; [`Load::stop`] ends it gracefully and waits.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

/// Longest any client thread runs (the case's own bound comes first).
const CLIENT_LIFETIME: Duration = Duration::from_secs(40);

impl Load {
    pub fn start(case: &Arc<Case>, gw: SocketAddr, spec: Spec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..spec.clients)
            .map(|i| {
                let (case, stop) = (case.clone(), stop.clone());
                std::thread::spawn(move || {
                    // Clients start spread over one interval.
                    std::thread::sleep(spec.interval.mul_f64(i as f64 / spec.clients as f64));
                    let t0 = Instant::now();
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < CLIENT_LIFETIME {
                        let l = run_session(&case, gw, &spec, &stop, t0);
                        let again = l.end != End::ClientClosed && spec.reconnect;
                        let failed = l.end == End::ConnectFailed;
                        case.record(l);
                        if !again {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(if failed { 50 } else { 20 }));
                    }
                })
            })
            .collect();
        Load { stop, handles }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

pub fn frame(case: &Case, tag: u32, seq: u32, server_id: u32, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; payload.max(16)];
    p[0..4].copy_from_slice(&tag.to_le_bytes());
    p[4..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&case.now_ns().to_le_bytes());
    let mut b = BytesMut::new();
    assert!(cproto::encode(&mut b, seq as u16, ServerId(server_id), &p));
    b.to_vec()
}

/// Parses replies at the front of `buf` into the ledger.
fn take_replies(case: &Case, buf: &mut Vec<u8>, l: &mut SessionLedger, last_seq: &mut u32) -> bool {
    let mut off = 0;
    let mut any = false;
    while let Ok(Some(h)) = cproto::check(&buf[off..], cproto::MAX_PAYLOAD) {
        let p = &buf[off + cproto::HEADER_LEN..off + h.frame_len()];
        let (tag, seq) = super::backend::tag_seq(p);
        if tag != l.tag {
            l.wrong_tag += 1;
        } else {
            l.delivered += 1;
            if seq <= *last_seq {
                l.order += 1;
            }
            *last_seq = seq;
            if p.len() >= 16 {
                let sent = u64::from_le_bytes(p[8..16].try_into().unwrap());
                l.lat.push((sent, case.now_ns()));
            }
            case.replies.fetch_add(1, Ordering::Relaxed);
        }
        off += h.frame_len();
        any = true;
    }
    buf.drain(..off);
    any
}

/// One session until stopped (then closed gracefully) or closed by the gateway.
pub fn run_session(case: &Case, gw: SocketAddr, spec: &Spec, stop: &AtomicBool, t0: Instant) -> SessionLedger {
    let mut l = SessionLedger {
        tag: case.tag(),
        local: None,
        sent: 0,
        delivered: 0,
        wrong_tag: 0,
        order: 0,
        end: End::ConnectFailed,
        group: spec.group,
        lat: Vec::new(),
    };
    let Ok(mut s) = TcpStream::connect_timeout(&gw, Duration::from_secs(1)) else { return l };
    let _ = s.set_nodelay(true);
    l.local = s.local_addr().ok();
    s.set_nonblocking(true).unwrap();
    let mut out: Vec<u8> = Vec::new();
    // Byte offsets (in `out`) where queued frames end, oldest first.
    let mut ends: std::collections::VecDeque<usize> = Default::default();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut seq, mut last_seq, mut written_off) = (0u32, 0u32, 0u64);
    let mut next_send = Instant::now();
    let mut progress = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let stopping = stop.load(Ordering::Relaxed) || t0.elapsed() >= CLIENT_LIFETIME;
        if stopping && stopping_since.is_none() {
            stopping_since = Some(now);
            progress = now;
        }
        let queued = ends.len() as u64;
        let outstanding = (l.sent + queued).saturating_sub(l.delivered + written_off);
        if let Some(since) = stopping_since {
            let done = queued == 0 && l.delivered + written_off >= l.sent;
            if (done && now.duration_since(progress) >= Duration::from_millis(50))
                || now.duration_since(progress) >= spec.quiet
                || now.duration_since(since) >= Duration::from_secs(5)
            {
                l.end = close_and_drain(case, &mut s, &mut inbuf, &mut chunk, &mut l, &mut last_seq);
                return l;
            }
        } else {
            // Paced clients queue at most one frame a turn. An unpaced one
            // (a flood) fills its buffer in one go, so that it costs one write
            // per 64 KiB rather than a write and a read per frame: the load
            // threads share the gateway's cores, and a flooder that spent a
            // core on system calls would delay the normal clients' threads,
            // not the gateway, and the test would measure the harness.
            let mut queued_now = 0u64;
            while (outstanding + queued_now) < spec.window as u64 && now >= next_send && out.len() < 64 * 1024 {
                seq += 1;
                queued_now += 1;
                out.extend(frame(case, l.tag, seq, spec.server_id, spec.payload));
                ends.push_back(out.len());
                if !spec.interval.is_zero() {
                    next_send = (next_send + spec.interval).max(now - spec.interval);
                    break;
                }
            }
        }
        let mut busy = false;
        if !out.is_empty() {
            match s.write(&out) {
                Ok(n) => {
                    out.drain(..n);
                    while let Some(e) = ends.front_mut() {
                        if *e <= n {
                            ends.pop_front();
                            l.sent += 1;
                        } else {
                            break;
                        }
                    }
                    for e in ends.iter_mut() {
                        *e -= n;
                    }
                    busy = n > 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    // The gateway is gone; read what it left.
                    l.end = finish_read(case, &mut s, &mut inbuf, &mut chunk, &mut l, &mut last_seq);
                    return l;
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                l.end = End::GatewayClosed;
                take_replies(case, &mut inbuf, &mut l, &mut last_seq);
                return l;
            }
            Ok(n) => {
                inbuf.extend_from_slice(&chunk[..n]);
                if take_replies(case, &mut inbuf, &mut l, &mut last_seq) {
                    progress = Instant::now();
                }
                busy = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                l.end = End::GatewayReset;
                take_replies(case, &mut inbuf, &mut l, &mut last_seq);
                return l;
            }
        }
        if stopping_since.is_none() && outstanding > 0 && now.duration_since(progress) >= spec.reply_timeout {
            written_off = l.sent.saturating_sub(l.delivered);
            progress = now;
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn finish_read(
    case: &Case,
    s: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    chunk: &mut [u8],
    l: &mut SessionLedger,
    last_seq: &mut u32,
) -> End {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let dl = Instant::now() + Duration::from_secs(3);
    let mut end = End::GatewayReset;
    while Instant::now() < dl {
        match s.read(chunk) {
            Ok(0) => {
                end = End::GatewayClosed;
                break;
            }
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    take_replies(case, inbuf, l, last_seq);
    end
}

/// Opens fresh sessions (one frame each, `timeout` for its reply) until one
/// is answered or `within` passes; returns when it was answered.
pub fn probe_until(case: &Case, gw: SocketAddr, server_id: u32, within: Duration) -> Option<Instant> {
    let t0 = Instant::now();
    let spec = Spec { window: 1, reconnect: false, quiet: Duration::from_millis(300), ..Spec::new(1, server_id) };
    while t0.elapsed() < within {
        let l = probe_once(case, gw, &spec);
        let ok = l.delivered > 0;
        case.record(l);
        if ok {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One probe session: one frame, its reply awaited up to `spec.quiet`, closed.
pub fn probe_once(case: &Case, gw: SocketAddr, spec: &Spec) -> SessionLedger {
    let mut l = SessionLedger {
        tag: case.tag(),
        local: None,
        sent: 0,
        delivered: 0,
        wrong_tag: 0,
        order: 0,
        end: End::ConnectFailed,
        group: spec.group,
        lat: Vec::new(),
    };
    let Ok(mut s) = TcpStream::connect_timeout(&gw, Duration::from_millis(500)) else { return l };
    let _ = s.set_nodelay(true);
    l.local = s.local_addr().ok();
    let (mut inbuf, mut chunk, mut last_seq) = (Vec::new(), vec![0u8; 4096], 0u32);
    if s.write_all(&frame(case, l.tag, 1, spec.server_id, spec.payload)).is_err() {
        l.end = finish_read(case, &mut s, &mut inbuf, &mut chunk, &mut l, &mut last_seq);
        return l;
    }
    l.sent = 1;
    let _ = s.set_read_timeout(Some(spec.quiet));
    let dl = Instant::now() + spec.quiet;
    while l.delivered == 0 && Instant::now() < dl {
        match s.read(&mut chunk) {
            Ok(0) => {
                l.end = End::GatewayClosed;
                take_replies(case, &mut inbuf, &mut l, &mut last_seq);
                return l;
            }
            Ok(n) => {
                inbuf.extend_from_slice(&chunk[..n]);
                take_replies(case, &mut inbuf, &mut l, &mut last_seq);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(_) => {
                l.end = End::GatewayReset;
                return l;
            }
        }
    }
    l.end = close_and_drain(case, &mut s, &mut inbuf, &mut chunk, &mut l, &mut last_seq);
    l
}

/// Half-closes, then reads until the gateway's end of stream (it lingers up
/// to 2 s for a reply still outstanding), so every reply it queued for us is
/// read: what the gateway counted as delivered is what we got.
fn close_and_drain(
    case: &Case,
    s: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    chunk: &mut [u8],
    l: &mut SessionLedger,
    last_seq: &mut u32,
) -> End {
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(3000)));
    let dl = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < dl {
        match s.read(chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                inbuf.extend_from_slice(&chunk[..n]);
                take_replies(case, inbuf, l, last_seq);
            }
        }
    }
    take_replies(case, inbuf, l, last_seq);
    End::ClientClosed
}

/// Latency percentile (ms) of replies whose send time is within [from, to) ns.
pub fn percentile_ms(sessions: &[SessionLedger], from: u64, to: u64, q: f64) -> Option<f64> {
    let mut v: Vec<u64> =
        sessions.iter().flat_map(|l| l.lat.iter()).filter(|(s, _)| *s >= from && *s < to).map(|(s, r)| r - s).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i] as f64 / 1e6)
}

/// First reply received at or after `t` (ns) for a frame sent at or after
/// `t`: when existing traffic flows again.
pub fn first_reply_after(sessions: &[SessionLedger], t: u64) -> Option<u64> {
    sessions.iter().flat_map(|l| l.lat.iter()).filter(|(s, _)| *s >= t).map(|(_, r)| *r).min()
}
