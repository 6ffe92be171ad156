//! What the gateway process says about itself (/metrics, /status, the access
//! log on its stdout, /proc), and the frame ledger of a case: every frame a
//! client sent is accounted for, from the client through the gateway to the
//! backend and back.

use super::backend::BackendCounts;
use super::load::{Case, End, SessionLedger};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GET on the admin port; `None` when it does not answer.
pub fn try_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok())?;
    Some((code, out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()))
}

/// Prometheus text as `name{labels}` -> value.
pub fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let body = try_get(admin, "/metrics").map(|x| x.1).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

pub fn m(m: &HashMap<String, f64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0.0) as u64
}

pub fn dropped(mm: &HashMap<String, f64>, reason: &str) -> u64 {
    m(mm, &format!("game_gateway_frames_dropped_total{{reason=\"{reason}\"}}"))
}

/// Drop reasons of client frames (client -> backend).
pub const C2B: [&str; 5] =
    ["routing_error", "rate_limited", "backend_lost", "backend_queue_full", "backend_unavailable"];
/// Drop reasons of backend frames (backend -> client).
pub const B2C: [&str; 5] = ["unbound_session", "reply_too_large", "malformed", "unexpected_opcode", "after_close"];

/// Frames written to / read from backends, summed over workers and endpoints
/// (from /status).
pub fn backend_frames(admin: SocketAddr) -> (u64, u64) {
    let Some((_, body)) = try_get(admin, "/status") else { return (0, 0) };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let (mut sent, mut recv) = (0, 0);
    for w in v["workers"].as_array().into_iter().flatten() {
        for (_, b) in w["backends"].as_object().into_iter().flatten() {
            sent += b["frames_sent"].as_u64().unwrap_or(0);
            recv += b["frames_received"].as_u64().unwrap_or(0);
        }
    }
    (sent, recv)
}

/// One access-log record.
#[derive(Debug, Clone)]
pub struct Access {
    pub client: SocketAddr,
    pub session: i64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub reason: String,
}

pub fn access_records(stdout: &str) -> Vec<Access> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(Access {
                client: v["client.address"].as_str()?.parse().ok()?,
                session: v["session.id"].as_i64()?,
                frames_in: v["frames.in"].as_u64()?,
                frames_out: v["frames.out"].as_u64()?,
                reason: v["close.reason"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect()
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Samples a process's RSS and open fds every 50 ms (bounded: 60 s).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    max_rss: Arc<AtomicU64>,
    max_fds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub start_rss: u64,
    pub start_fds: u64,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let (stop, max_rss, max_fds) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s2, r2, f2) = (stop.clone(), max_rss.clone(), max_fds.clone());
        let thread = Some(std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s2.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                if let Some(r) = rss_kib(pid) {
                    r2.fetch_max(r, Ordering::Relaxed);
                }
                if let Some(f) = fd_count(pid) {
                    f2.fetch_max(f, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        Sampler {
            stop,
            max_rss,
            max_fds,
            thread,
            start_rss: rss_kib(pid).unwrap_or(0),
            start_fds: fd_count(pid).unwrap_or(0),
        }
    }

    /// (max RSS KiB, max fds).
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.max_rss.load(Ordering::Relaxed), self.max_fds.load(Ordering::Relaxed))
    }
}

/// Waits until `f` holds (polling every 20 ms) or `within` passes.
pub fn wait(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Timings of a case, in ms (None: not applicable).
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    /// Fault start -> the gateway noticed (its counters or sessions moved).
    pub detect_ms: Option<f64>,
    /// Fault healed -> a new session is served.
    pub recover_ms: Option<f64>,
    /// Fault healed -> existing sessions' traffic flows again.
    pub resume_ms: Option<f64>,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The frame ledger of one case. Notation (all frames, summed over the
/// case's sessions):
/// - `sent` (S): written by clients; `read` (R): read by the gateway
///   (access log `frames.in`); `unread` = S - R: only on connections the
///   gateway closed (their clients saw the close);
/// - `at_backend` (B): `TRANS` the backends processed; `dropped_c2b` (Dc):
///   the gateway's counted drops of client frames; `pipe_c2b` (Pc): frames
///   the gateway wrote to a backend socket that the backend never processed
///   (it crashed, or the path was cut: no gateway can know these);
/// - `echoed` (E): replies the backends wrote; `queued_out` (O): replies the
///   gateway queued to clients (`frames.out`); `dropped_b2c` (Db);
///   `pipe_b2c` (Pb): replies written by a backend that never reached the
///   gateway;
/// - `delivered` (D): replies clients read, each with its own tag.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub case: String,
    pub sessions: usize,
    pub closed_by_gw: usize,
    pub sent: u64,
    pub read: u64,
    pub at_backend: u64,
    pub dropped_c2b: u64,
    pub pipe_c2b: u64,
    pub echoed: u64,
    pub queued_out: u64,
    pub dropped_b2c: u64,
    pub pipe_b2c: u64,
    pub delivered: u64,
    pub wrong_tag: u64,
    pub order: u64,
    /// `TRANS` with another session's tag, at a backend.
    pub backend_tag_violations: u64,
    /// `TRANS` whose sequence number did not increase, at a backend.
    pub backend_reordered: u64,
    pub drops: Vec<(String, u64)>,
    pub max_rss_kib: u64,
    pub start_rss_kib: u64,
    pub fds_start: u64,
    pub fds_end: u64,
    pub timing: Timing,
    pub p99_ms: Option<f64>,
    /// Problems found; the case asserts this is empty.
    pub problems: Vec<String>,
    pub note: String,
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

impl Tally {
    /// One table row (`eprintln!`ed by every case).
    pub fn row(&self) -> String {
        let drops: Vec<String> = self.drops.iter().filter(|(_, n)| *n > 0).map(|(k, n)| format!("{k}={n}")).collect();
        format!(
            "FAULT-MATRIX | {:<22} | sent {:>6} | delivered {:>6} | dropped {:>5} ({}) | read {:>6} at_backend {:>6} in_pipe {:>4}/{:<4} | reordered {:>3} | sessions {:>4} closed_by_gw {:>4} | rss {:>4}->{:>4} MiB fds {:>3}->{:<3} | p99 {:>5} ms | detect {:>5} ms | recover {:>5} ms | resume {:>5} ms | {}",
            self.case,
            self.sent,
            self.delivered,
            self.dropped_c2b + self.dropped_b2c,
            if drops.is_empty() { "none".to_string() } else { drops.join(",") },
            self.read,
            self.at_backend,
            self.pipe_c2b,
            self.pipe_b2c,
            self.backend_reordered,
            self.sessions,
            self.closed_by_gw,
            self.start_rss_kib / 1024,
            self.max_rss_kib / 1024,
            self.fds_start,
            self.fds_end,
            opt(self.p99_ms),
            opt(self.timing.detect_ms),
            opt(self.timing.recover_ms),
            opt(self.timing.resume_ms),
            self.note,
        )
    }
}

/// What a case allows beyond the strict ledger.
#[derive(Debug, Clone, Copy)]
pub struct Allow {
    /// Frames may be lost inside a crashed backend or a cut path.
    pub pipe_loss: bool,
    /// RSS bound for the gateway process.
    pub max_rss_mib: u64,
    /// The gateway's metrics are gone at the end (it exited: drain).
    pub exited: bool,
    /// After the gateway declared a live path dead and rebound its sessions,
    /// bytes it had already written may still reach the backend, after newer
    /// frames of the same session on the new connection (TCP cannot take
    /// them back). Counted and printed either way.
    pub reorder: bool,
}

impl Default for Allow {
    fn default() -> Self {
        Allow { pipe_loss: false, max_rss_mib: 64, exited: false, reorder: false }
    }
}

/// Settles and checks the ledger of a finished case (load stopped).
/// `stdout` reads the gateway's access log; `backends` the backends' counts.
#[allow(clippy::too_many_arguments)]
pub fn tally(
    case: &Case,
    admin: SocketAddr,
    pid: u32,
    stdout: &dyn Fn() -> String,
    backends: &dyn Fn() -> BackendCounts,
    sampler: Sampler,
    timing: Timing,
    allow: Allow,
) -> Tally {
    let sessions = case.sessions();
    let mut t = Tally { case: case.name.to_string(), timing, ..Default::default() };
    if !allow.exited {
        wait(Duration::from_secs(6), || m(&metrics(admin), "game_gateway_sessions_active") == 0);
    }
    // Every session's access-log record (flushed at least once a second).
    let ours: Vec<&SessionLedger> = sessions.iter().filter(|l| l.local.is_some()).collect();
    let mut recs: HashMap<SocketAddr, Access> = HashMap::new();
    wait(Duration::from_secs(5), || {
        recs = access_records(&stdout()).into_iter().map(|a| (a.client, a)).collect();
        ours.iter().all(|l| recs.contains_key(&l.local.unwrap()))
    });
    // The backends finish what they have.
    let mut last = backends();
    wait(Duration::from_secs(3), || {
        std::thread::sleep(Duration::from_millis(150));
        let now = backends();
        let same = now == last;
        last = now;
        same
    });
    // The gateway's frame counters and the backends' are read as one
    // snapshot: the gateway's before and after the backends', until both of
    // its readings agree. A keep-alive PING sent between two separate reads
    // otherwise showed as a frame "in the pipe" (a false loss).
    let mut gw_frames = if allow.exited { (0, 0) } else { backend_frames(admin) };
    for _ in 0..20 {
        if allow.exited {
            break;
        }
        let before = backend_frames(admin);
        let now = backends();
        let after = backend_frames(admin);
        last = now;
        gw_frames = after;
        if before == after {
            break;
        }
    }
    let b = last;
    let (rss_max, _fds_max) = {
        let start_rss = sampler.start_rss;
        t.fds_start = sampler.start_fds;
        let r = sampler.finish();
        t.start_rss_kib = start_rss;
        r
    };
    t.max_rss_kib = rss_max;
    t.fds_end = fd_count(pid).unwrap_or(0);
    t.sessions = ours.len();
    for l in &sessions {
        t.sent += l.sent;
        t.delivered += l.delivered;
        t.wrong_tag += l.wrong_tag;
        t.order += l.order;
        if matches!(l.end, End::GatewayClosed | End::GatewayReset) {
            t.closed_by_gw += 1;
        }
    }
    let mut missing = 0;
    for l in &ours {
        let Some(a) = recs.get(&l.local.unwrap()) else {
            missing += 1;
            continue;
        };
        t.read += a.frames_in;
        t.queued_out += a.frames_out;
        // Per session: a client that closed by itself had everything it
        // sent read; a client that read until the gateway's end of stream
        // got everything the gateway queued for it.
        if l.end == End::ClientClosed && a.frames_in != l.sent {
            t.problems.push(format!(
                "session {} (tag {}) sent {} frames, the gateway read {} ({})",
                a.session, l.tag, l.sent, a.frames_in, a.reason
            ));
        }
        // (After an exit the drop counters are gone: a reply the gateway
        // queued and then dropped cannot be told from one lost uncounted.)
        if !allow.exited && matches!(l.end, End::ClientClosed | End::GatewayClosed) && a.frames_out != l.delivered {
            t.problems.push(format!(
                "session {} (tag {}, {:?}, {}) was queued {} replies, read {}",
                a.session, l.tag, l.end, a.reason, a.frames_out, l.delivered
            ));
        }
    }
    if missing > 0 {
        t.problems.push(format!("{missing} sessions have no access-log record"));
    }
    t.at_backend = b.trans;
    t.echoed = b.echoes;
    t.backend_tag_violations = b.tag_violations;
    t.backend_reordered = b.order_violations;
    if !allow.exited {
        let mm = metrics(admin);
        for r in C2B {
            let n = dropped(&mm, r);
            t.dropped_c2b += n;
            t.drops.push((r.to_string(), n));
        }
        for r in B2C {
            let n = dropped(&mm, r);
            t.dropped_b2c += n;
            t.drops.push((r.to_string(), n));
        }
        let (gw_sent, gw_recv) = gw_frames;
        t.pipe_c2b = gw_sent.saturating_sub(b.frames);
        t.pipe_b2c = b.written.saturating_sub(gw_recv);
        if t.read > t.at_backend + t.dropped_c2b + t.pipe_c2b {
            t.problems.push(format!(
                "client frames lost without being counted: read {} > at_backend {} + dropped {} + in_pipe {}",
                t.read, t.at_backend, t.dropped_c2b, t.pipe_c2b
            ));
        }
        if t.echoed > t.queued_out + t.dropped_b2c + t.pipe_b2c {
            t.problems.push(format!(
                "replies lost without being counted: echoed {} > queued_out {} + dropped {} + in_pipe {}",
                t.echoed, t.queued_out, t.dropped_b2c, t.pipe_b2c
            ));
        }
        if !allow.pipe_loss && (t.pipe_c2b > 0 || t.pipe_b2c > 0) {
            t.problems.push(format!(
                "frames vanished between the gateway and a healthy backend: c2b {} b2c {}",
                t.pipe_c2b, t.pipe_b2c
            ));
        }
    }
    if t.at_backend > t.read {
        t.problems.push(format!("duplicated frames: backend processed {} > gateway read {}", t.at_backend, t.read));
    }
    if t.read > t.sent {
        t.problems.push(format!("the gateway read {} frames, clients sent {}", t.read, t.sent));
    }
    if t.wrong_tag > 0 || t.backend_tag_violations > 0 {
        t.problems.push(format!(
            "isolation broken: {} replies with another session's tag, {} frames with another session's tag at a backend",
            t.wrong_tag, t.backend_tag_violations
        ));
    }
    if t.backend_reordered > 0 && !allow.reorder {
        t.problems.push(format!("{} frames reached a backend out of order or twice", t.backend_reordered));
    }
    if t.order > 0 {
        t.problems.push(format!("{} replies duplicated or out of order", t.order));
    }
    if t.max_rss_kib > allow.max_rss_mib * 1024 {
        t.problems.push(format!("gateway RSS {} MiB over the bound {} MiB", t.max_rss_kib / 1024, allow.max_rss_mib));
    }
    // Descriptors come back (sessions gone; backend connections may stay).
    if !allow.exited && t.fds_end > t.fds_start + 16 {
        t.problems.push(format!("descriptors leak: {} at start, {} at the end", t.fds_start, t.fds_end));
    }
    let end = case.now_ns();
    t.p99_ms = super::load::percentile_ms(&sessions, 0, end, 0.99);
    t
}
