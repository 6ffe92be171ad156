//! gw-announce: measures one realm-wide announcement fanned out to N idle
//! sessions, end to end, on loopback.
//!
//! This process is the client side (N sessions on one monoio thread) and,
//! with `--trigger backend`, also the game backend the gateway routes to
//! (plain threads: it echoes the bind frame, answers PING and sends the
//! ANNOUNCE). With `--trigger raw` the target is `gw-rawcast`, the raw
//! writer ceiling, told to write through its control port.
//!
//! 1. Opens `--sessions` connections to `--target` (at most
//!    `--connect-concurrency` handshakes at a time); each sends one bind frame
//!    and waits for its reply, whose first payload byte names the group (the
//!    backend connection it came on = the gateway worker; 0 for gw-rawcast).
//! 2. Measures the target process's idle CPU over `--idle-ms`.
//! 3. `--rounds` times: reads the target's CPU, sends one announcement (its
//!    payload starts with the round number), waits until every session has
//!    received it (at most `--round-timeout` s), waits `--settle-ms`, reads
//!    the CPU again. Per group it records the first and last receipt.
//! 4. Prints one JSON line per round and a summary line (medians over the
//!    measured rounds, and the best round).
//!
//! CPU time is read from /proc/PID/stat (utime+stime, clock ticks) and, at
//! ns resolution, from the sum of /proc/PID/task/*/schedstat.

use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use gate_protocol::backend::{self as bproto, AnnounceFilter, Body, Opcode};
use gate_protocol::{client as cproto, ServerId};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// msg_id of the announcement client frame (the ANNOUNCE's `type`).
pub const ANNOUNCE_MSG_ID: u16 = 4242;
/// Groups (gateway workers) told apart.
const MAX_GROUPS: usize = 16;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Trigger {
    /// Be the gateway's backend and send opcode 10 ANNOUNCE.
    Backend,
    /// Tell gw-rawcast (its `--control` port) to write the frame.
    Raw,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Times one announcement fanned out to N idle sessions")]
struct Args {
    /// Where the sessions connect (the gateway, or gw-rawcast).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum, default_value = "backend")]
    trigger: Trigger,
    /// `--trigger backend`: the address the gateway's route points at.
    #[arg(long, default_value = "127.0.0.1:29750")]
    backend_listen: SocketAddr,
    /// `--trigger raw`: gw-rawcast's control port.
    #[arg(long, default_value = "127.0.0.1:29751")]
    control: SocketAddr,
    /// Process whose CPU time is measured (the gateway or gw-rawcast).
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Measured announcements.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Announcements before those, reported but left out of the medians
    /// (the first one grows every session's buffers).
    #[arg(long, default_value_t = 1)]
    warmup_rounds: u32,
    /// Announcement payload bytes (at least 4: the round number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Seconds allowed for all sessions to connect and bind.
    #[arg(long, default_value_t = 180.0)]
    bind_timeout: f64,
    /// Seconds allowed for one connect. Past about 14,000 connections to one
    /// address the kernel's ephemeral port search gets slow (it scans the
    /// half of the port range connect() prefers, all taken, on every call).
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Seconds allowed for one announcement to reach every session.
    #[arg(long, default_value_t = 20.0)]
    round_timeout: f64,
    /// Pause between the last receipt and the CPU reading (ms).
    #[arg(long, default_value_t = 30)]
    settle_ms: u64,
    /// Quiet time before each round (ms).
    #[arg(long, default_value_t = 300)]
    gap_ms: u64,
    /// Window over which the target's idle CPU is measured (ms).
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
    /// Workers of the target (for the per-core figures).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value = "run")]
    label: String,
    /// Sessions stop reading once bound: the announcement lands in their
    /// socket buffers with no reader to wake, so the target's CPU is the
    /// sender's share alone (loopback receive processing still runs on the
    /// sender's CPU). After `--passive-wait-ms` the CPU is read and every
    /// socket is read once to count the frames. No timings in this mode.
    #[arg(long)]
    passive: bool,
    #[arg(long, default_value_t = 1000)]
    passive_wait_ms: u64,
}

struct Group {
    sessions: AtomicU64,
    count: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

impl Group {
    fn new() -> Group {
        Group {
            sessions: AtomicU64::new(0),
            count: AtomicU64::new(0),
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
        }
    }
    fn reset(&self) {
        self.count.store(0, Ordering::SeqCst);
        self.first.store(u64::MAX, Ordering::SeqCst);
        self.last.store(0, Ordering::SeqCst);
    }
}

struct Shared {
    epoch: Instant,
    groups: Vec<Group>,
    bound: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    /// The round sessions should count; frames of other rounds are counted
    /// in `stray`.
    round: AtomicU64,
    stray: AtomicU64,
    /// Connects that took over a second (a dropped SYN is retried after 1 s).
    slow_connects: AtomicU64,
    /// Sum and maximum of connect times (ns), and of connect-to-bound times.
    connect_ns: AtomicU64,
    connect_max_ns: AtomicU64,
    bind_rtt_ns: AtomicU64,
    /// Passive mode: the round whose frames the client thread should read
    /// from the held sockets, and the last round it has read.
    drain_req: AtomicU64,
    drain_done: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn received(&self) -> u64 {
        self.groups.iter().map(|g| g.count.load(Ordering::Relaxed)).sum()
    }
}

// ---------------------------------------------------------------- CPU time

/// CPU time of a process, summed over its threads.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// utime + stime from /proc/PID/stat (clock ticks).
    ticks: u64,
    /// On CPU, ns (/proc/PID/task/*/schedstat, field 1).
    run_ns: u64,
    /// Runnable but waiting for a CPU, ns (field 2): time other load took.
    wait_ns: u64,
}

fn cpu_of(pid: u32) -> Cpu {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the ")" of the command name; utime is field 14.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let mut c = Cpu { ticks, ..Cpu::default() };
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
                c.run_ns += f.next().unwrap_or(0);
                c.wait_ns += f.next().unwrap_or(0);
            }
        }
    }
    c
}

/// The 1-minute load average (the machine is shared).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// ----------------------------------------------------------------- backend

/// The gateway's backend: echoes each TRANS with the connection's index as
/// the payload, answers PING; `announce` writes on the first connection.
struct Backend {
    conns: Mutex<Vec<Arc<Mutex<TcpStream>>>>,
}

impl Backend {
    fn start(addr: SocketAddr) -> std::io::Result<Arc<Backend>> {
        let l = TcpListener::bind(addr)?;
        let b = Arc::new(Backend { conns: Mutex::new(Vec::new()) });
        let b2 = b.clone();
        std::thread::Builder::new().name("ann-backend".into()).spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let _ = s.set_nodelay(true);
                let Ok(w) = s.try_clone() else { continue };
                let w = Arc::new(Mutex::new(w));
                let idx = {
                    let mut c = b2.conns.lock().unwrap();
                    c.push(w.clone());
                    c.len() - 1
                };
                let _ = std::thread::Builder::new()
                    .name(format!("ann-conn-{idx}"))
                    .spawn(move || backend_conn(s, w, idx as u8));
            }
        })?;
        Ok(b)
    }

    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn announce(&self, frame: &[u8]) -> std::io::Result<()> {
        let c = self.conns.lock().unwrap().first().cloned();
        let c = c.ok_or_else(|| std::io::Error::other("no gateway connection"))?;
        let mut s = c.lock().unwrap();
        s.write_all(frame)
    }
}

fn backend_conn(mut s: TcpStream, w: Arc<Mutex<TcpStream>>, idx: u8) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let h = match bproto::check(&buf, 1 << 20) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("gw-announce backend: bad frame: {e}");
                    return;
                }
            };
            let len = h.frame_len();
            match bproto::parse(&h, &buf[..len], false) {
                Ok(Body::Trans { .. }) => bproto::encode_reply(&mut out, h.msg_type, h.server_id, h.session_id, &[idx]),
                Ok(Body::Ping) => bproto::encode_ping(&mut out, Opcode::Pong, h.object_id),
                Ok(_) => {}
                Err(e) => eprintln!("gw-announce backend: bad body: {e}"),
            }
            buf.advance(len);
        }
        if !out.is_empty() {
            let r = w.lock().unwrap().write_all(&out);
            out.clear();
            if r.is_err() {
                return;
            }
        }
    }
}

// ----------------------------------------------------------------- clients

async fn session(args: Arc<Args>, sh: Arc<Shared>) {
    let t = Instant::now();
    let s = monoio::time::timeout(
        Duration::from_secs_f64(args.connect_timeout),
        monoio::net::TcpStream::connect_addr(args.target),
    )
    .await;
    let mut s = match s {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if sh.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("connect {}: {e}", args.target);
            }
            return;
        }
        Err(_) => {
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let took = t.elapsed();
    if took > Duration::from_secs(1) {
        sh.slow_connects.fetch_add(1, Ordering::Relaxed);
    }
    sh.connect_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    sh.connect_max_ns.fetch_max(took.as_nanos() as u64, Ordering::Relaxed);
    let connected = Instant::now();
    let _ = s.set_nodelay(true);
    let mut out = BytesMut::new();
    cproto::encode(&mut out, 1, ServerId::new(false, 1, 10, 0), &[0u8; 8]);
    let (r, _) = s.write_all(out).await;
    if r.is_err() {
        sh.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = BytesMut::with_capacity(512);
    let mut group: Option<usize> = None;
    loop {
        // Parse whatever is buffered.
        loop {
            match cproto::check(&buf, cproto::MAX_PAYLOAD) {
                Ok(Some(h)) => {
                    let p = &buf[cproto::HEADER_LEN..h.frame_len()];
                    match group {
                        None => {
                            let g = (p.first().copied().unwrap_or(0) as usize).min(MAX_GROUPS - 1);
                            group = Some(g);
                            sh.groups[g].sessions.fetch_add(1, Ordering::Relaxed);
                            sh.bind_rtt_ns.fetch_add(connected.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            sh.bound.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(g) if h.msg_id == ANNOUNCE_MSG_ID && p.len() >= 4 => {
                            let round = u32::from_le_bytes(p[..4].try_into().unwrap()) as u64;
                            if round == sh.round.load(Ordering::Relaxed) {
                                let t = sh.now_ns();
                                let gr = &sh.groups[g];
                                gr.count.fetch_add(1, Ordering::Relaxed);
                                gr.first.fetch_min(t, Ordering::Relaxed);
                                gr.last.fetch_max(t, Ordering::Relaxed);
                            } else {
                                sh.stray.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(_) => {
                            sh.stray.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    buf.advance(h.frame_len());
                }
                Ok(None) => break,
                Err(_) => {
                    sh.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        if let (true, Some(g)) = (args.passive, group) {
            HELD.with(|h| h.borrow_mut().push((s, g)));
            return;
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(512);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, b) = s.read(std::mem::take(&mut buf).slice_mut(len..cap)).await;
        buf = b.into_inner();
        match r {
            Ok(n) if n > 0 => {}
            _ => {
                if !sh.stop.load(Ordering::Relaxed) {
                    if group.is_none() {
                        sh.failed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        sh.closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
        }
    }
}

thread_local! {
    /// Passive mode: the bound sessions' sockets, with their group.
    static HELD: std::cell::RefCell<Vec<(monoio::net::TcpStream, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Passive mode: reads every held socket once (what the announcement left
/// in it) and counts the frames of the current round.
async fn drain_held(sh: &Shared) {
    let mut held = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
    let round = sh.round.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = BytesMut::with_capacity(4096);
    for (s, g) in held.iter_mut() {
        if Instant::now() > deadline {
            break;
        }
        buf.clear();
        let cap = buf.capacity();
        let r =
            monoio::time::timeout(Duration::from_millis(20), s.read(std::mem::take(&mut buf).slice_mut(0..cap))).await;
        match r {
            Ok((res, b)) => {
                buf = b.into_inner();
                if !matches!(res, Ok(n) if n > 0) {
                    continue;
                }
            }
            Err(_) => {
                buf = BytesMut::with_capacity(4096);
                continue;
            }
        }
        let mut rest = &buf[..];
        while let Ok(Some(h)) = cproto::check(rest, cproto::MAX_PAYLOAD) {
            let p = &rest[cproto::HEADER_LEN..h.frame_len()];
            if h.msg_id == ANNOUNCE_MSG_ID
                && p.len() >= 4
                && u32::from_le_bytes(p[..4].try_into().unwrap()) as u64 == round
            {
                sh.groups[*g].count.fetch_add(1, Ordering::Relaxed);
            } else {
                sh.stray.fetch_add(1, Ordering::Relaxed);
            }
            rest = &rest[h.frame_len()..];
        }
    }
    HELD.with(|h| *h.borrow_mut() = held);
}

/// Starts the sessions with at most `connect_concurrency` unbound at once.
fn client_thread(args: Arc<Args>, sh: Arc<Shared>) {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().expect("runtime");
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs_f64(args.bind_timeout);
        let mut started = 0usize;
        while started < args.sessions && Instant::now() < deadline {
            let settled = (sh.bound.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed)) as usize;
            let room = args.connect_concurrency.saturating_sub(started - settled);
            for _ in 0..room.min(args.sessions - started) {
                monoio::spawn(session(args.clone(), sh.clone()));
                started += 1;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        // Keep the runtime (and the sessions) alive until told to stop.
        while !sh.stop.load(Ordering::Relaxed) {
            let want = sh.drain_req.load(Ordering::SeqCst);
            if want > sh.drain_done.load(Ordering::SeqCst) {
                drain_held(&sh).await;
                sh.drain_done.store(want, Ordering::SeqCst);
            }
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

// -------------------------------------------------------------------- main

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() {
    let args = Arc::new(Args::parse());
    let payload_len = args.payload.max(4);
    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        groups: (0..MAX_GROUPS).map(|_| Group::new()).collect(),
        bound: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        round: AtomicU64::new(0),
        stray: AtomicU64::new(0),
        slow_connects: AtomicU64::new(0),
        connect_ns: AtomicU64::new(0),
        connect_max_ns: AtomicU64::new(0),
        bind_rtt_ns: AtomicU64::new(0),
        drain_req: AtomicU64::new(0),
        drain_done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let backend = match args.trigger {
        Trigger::Backend => match Backend::start(args.backend_listen) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("gw-announce: backend cannot listen on {}: {e}", args.backend_listen);
                std::process::exit(2);
            }
        },
        Trigger::Raw => None,
    };
    let t_bind = Instant::now();
    {
        let (a, s) = (args.clone(), sh.clone());
        std::thread::Builder::new().name("ann-clients".into()).spawn(move || client_thread(a, s)).expect("thread");
    }
    // Wait for every session to bind (bounded).
    let bind_deadline = t_bind + Duration::from_secs_f64(args.bind_timeout + 5.0);
    let mut last_print = Instant::now();
    loop {
        let (b, f) = (sh.bound.load(Ordering::Relaxed) as usize, sh.failed.load(Ordering::Relaxed) as usize);
        if b + f >= args.sessions || Instant::now() > bind_deadline {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("[{}] bound {b}/{} failed {f}", args.label, args.sessions);
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bound = sh.bound.load(Ordering::Relaxed);
    let failed = sh.failed.load(Ordering::Relaxed);
    let bind_secs = t_bind.elapsed().as_secs_f64();
    let groups: Vec<u64> = sh.groups.iter().map(|g| g.sessions.load(Ordering::Relaxed)).collect();
    eprintln!(
        "[{}] bound {bound}/{} in {bind_secs:.1}s (failed {failed}; connect mean {:.2} ms, max {:.0} ms, over 1 s {}; bind frame round trip mean {:.2} ms); per group {:?}",
        args.label,
        args.sessions,
        sh.connect_ns.load(Ordering::Relaxed) as f64 / 1e6 / (bound + failed).max(1) as f64,
        sh.connect_max_ns.load(Ordering::Relaxed) as f64 / 1e6,
        sh.slow_connects.load(Ordering::Relaxed),
        sh.bind_rtt_ns.load(Ordering::Relaxed) as f64 / 1e6 / bound.max(1) as f64,
        groups.iter().filter(|&&n| n > 0).collect::<Vec<_>>()
    );
    if bound as usize != args.sessions {
        eprintln!("gw-announce: not every session bound; giving up");
        std::process::exit(1);
    }
    if let Some(b) = &backend {
        eprintln!("[{}] gateway backend connections: {}", args.label, b.connections());
    }
    let mut control = match args.trigger {
        Trigger::Raw => match TcpStream::connect(args.control) {
            Ok(c) => {
                let _ = c.set_nodelay(true);
                Some(c)
            }
            Err(e) => {
                eprintln!("gw-announce: control {}: {e}", args.control);
                std::process::exit(2);
            }
        },
        Trigger::Backend => None,
    };
    let tck = clk_tck();
    let me = std::process::id();

    // Idle CPU of the target (timers, sweeps over the sessions).
    std::thread::sleep(Duration::from_millis(args.gap_ms));
    let Cpu { ticks: it0, run_ns: in0, .. } = cpu_of(args.pid);
    let i0 = Instant::now();
    std::thread::sleep(Duration::from_millis(args.idle_ms));
    let Cpu { ticks: it1, run_ns: in1, .. } = cpu_of(args.pid);
    let idle_ns_per_ms = (in1 - in0) as f64 / (i0.elapsed().as_secs_f64() * 1e3);
    let idle_ticks = it1 - it0;

    let n = args.sessions as f64;
    let mut rows = Vec::new();
    let load_before = loadavg();
    let mut missing_total = 0u64;
    for round in 1..=args.rounds + args.warmup_rounds {
        let warmup = round <= args.warmup_rounds;
        for g in &sh.groups {
            g.reset();
        }
        sh.round.store(round as u64, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(args.gap_ms));
        let mut payload = vec![0x5a; payload_len];
        payload[..4].copy_from_slice(&round.to_le_bytes());
        let c0 = cpu_of(args.pid);
        let m0 = cpu_of(me);
        let w0 = Instant::now();
        let t0 = sh.now_ns();
        let sent = match (&backend, &mut control) {
            (Some(b), _) => {
                let mut f = BytesMut::new();
                bproto::encode_announce(&mut f, ANNOUNCE_MSG_ID as i32, AnnounceFilter::All, &payload);
                b.announce(&f)
            }
            (None, Some(c)) => {
                let mut m = round.to_le_bytes().to_vec();
                m.extend_from_slice(&(payload_len as u32).to_le_bytes());
                c.write_all(&m)
            }
            _ => unreachable!(),
        };
        if let Err(e) = sent {
            eprintln!("gw-announce: send: {e}");
            std::process::exit(1);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(args.round_timeout);
        if args.passive {
            std::thread::sleep(Duration::from_millis(args.passive_wait_ms));
        } else {
            while (sh.received() as usize) < args.sessions && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
            std::thread::sleep(Duration::from_millis(args.settle_ms));
        }
        let c1 = cpu_of(args.pid);
        let m1 = cpu_of(me);
        if args.passive {
            sh.drain_req.store(round as u64, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(40);
            while sh.drain_done.load(Ordering::SeqCst) < round as u64 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let (ct0, cn0, ct1, cn1) = (c0.ticks, c0.run_ns, c1.ticks, c1.run_ns);
        let (my0, my1) = (m0.run_ns, m1.run_ns);
        let window_ms = w0.elapsed().as_secs_f64() * 1e3;
        let received = sh.received();
        let ms = |ns: u64| ns.saturating_sub(t0) as f64 / 1e6;
        // Passive sessions record no receipt times.
        let tv = |v: f64| if args.passive { f64::NAN } else { v };
        let mut first = u64::MAX;
        let mut last = 0;
        let mut per = Vec::new();
        for (i, g) in sh.groups.iter().enumerate() {
            let sess = g.sessions.load(Ordering::Relaxed);
            if sess == 0 {
                continue;
            }
            let (c, f, l) =
                (g.count.load(Ordering::Relaxed), g.first.load(Ordering::Relaxed), g.last.load(Ordering::Relaxed));
            first = first.min(f);
            last = last.max(l);
            let span_ms = (l.saturating_sub(f)) as f64 / 1e6;
            per.push(serde_json::json!({
                "group": i, "sessions": sess, "received": c,
                "send_to_first_ms": tv(ms(f)), "send_to_last_ms": tv(ms(l)), "fanout_ms": tv(span_ms),
                "frames_per_sec": tv(c as f64 / (ms(l) / 1e3)),
                "fanout_frames_per_sec": tv(if span_ms > 0.0 { c as f64 / (span_ms / 1e3) } else { f64::NAN }),
            }));
        }
        let cpu_ns = cn1 - cn0;
        let net_ns = cpu_ns as f64 - idle_ns_per_ms * window_ms;
        let row = serde_json::json!({
            "label": args.label, "round": round, "warmup": warmup, "sessions": args.sessions, "received": received,
            "missing": args.sessions as u64 - received.min(args.sessions as u64), "stray": sh.stray.load(Ordering::Relaxed),
            "closed": sh.closed.load(Ordering::Relaxed),
            "passive": args.passive,
            "send_to_first_ms": tv(ms(first)), "send_to_last_ms": tv(ms(last)), "fanout_ms": tv((last.saturating_sub(first)) as f64 / 1e6),
            "frames_per_sec": tv(received as f64 / (ms(last) / 1e3)),
            "frames_per_sec_per_core": tv(received as f64 / (ms(last) / 1e3) / args.workers as f64),
            "window_ms": window_ms, "cpu_ticks": ct1 - ct0, "cpu_ms_ticks": (ct1 - ct0) as f64 * 1e3 / tck as f64,
            "cpu_ms": cpu_ns as f64 / 1e6, "cpu_ms_net_idle": net_ns / 1e6,
            "cpu_us_per_frame": cpu_ns as f64 / 1e3 / n, "cpu_us_per_frame_net_idle": net_ns / 1e3 / n,
            "cpu_us_per_frame_ticks": (ct1 - ct0) as f64 * 1e6 / tck as f64 / n,
            "frames_per_cpu_sec": n * 1e9 / net_ns,
            "client_cpu_ms": (my1 - my0) as f64 / 1e6,
            "target_wait_ms": (c1.wait_ns - c0.wait_ns) as f64 / 1e6,
            "client_wait_ms": (m1.wait_ns - m0.wait_ns) as f64 / 1e6,
            "groups": per,
        });
        let timing = if args.passive {
            format!(
                "{received}/{} read back after {} ms (passive: no receipt times)",
                args.sessions, args.passive_wait_ms
            )
        } else {
            format!(
                "{received}/{} in {:.1} ms (first at {:.1} ms, fan-out {:.1} ms) => {:.0} frames/s",
                args.sessions,
                ms(last),
                ms(first),
                (last.saturating_sub(first)) as f64 / 1e6,
                received as f64 / (ms(last) / 1e3)
            )
        };
        eprintln!(
            "[{}] round {round}{}: {timing}; target CPU {:.1} ms = {:.2} us/frame (net of idle {:.2}), waited for a CPU {:.1} ms; client CPU {:.1} ms, waited {:.1} ms",
            args.label,
            if warmup { " (warm-up)" } else { "" },
            cpu_ns as f64 / 1e6,
            cpu_ns as f64 / 1e3 / n,
            net_ns / 1e3 / n,
            (c1.wait_ns - c0.wait_ns) as f64 / 1e6,
            (my1 - my0) as f64 / 1e6,
            (m1.wait_ns - m0.wait_ns) as f64 / 1e6,
        );
        println!("{row}");
        missing_total += row["missing"].as_u64().unwrap_or(0);
        if !warmup {
            rows.push(row);
        }
    }
    let load_after = loadavg();
    let col = |k: &str| -> f64 {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
        median(&mut v)
    };
    let best = |k: &str, max: bool| -> f64 {
        let v = rows.iter().filter_map(|r| r[k].as_f64());
        if max {
            v.fold(f64::NAN, f64::max)
        } else {
            v.fold(f64::NAN, f64::min)
        }
    };
    let gcol = |gi: usize, k: &str| -> f64 {
        let mut v: Vec<f64> = rows.iter().filter_map(|r| r["groups"].get(gi).and_then(|g| g[k].as_f64())).collect();
        median(&mut v)
    };
    let ngroups = rows.first().and_then(|r| r["groups"].as_array().map(|a| a.len())).unwrap_or(0);
    let per_group: Vec<_> = (0..ngroups)
        .map(|gi| {
            serde_json::json!({
                "sessions": rows[0]["groups"][gi]["sessions"],
                "send_to_last_ms": gcol(gi, "send_to_last_ms"), "fanout_ms": gcol(gi, "fanout_ms"),
                "frames_per_sec": gcol(gi, "frames_per_sec"), "fanout_frames_per_sec": gcol(gi, "fanout_frames_per_sec"),
            })
        })
        .collect();
    let all_delivered = !rows.is_empty() && missing_total == 0;
    let summary = serde_json::json!({
        "label": args.label, "summary": true, "passive": args.passive, "sessions": args.sessions, "rounds": args.rounds, "workers": args.workers,
        "payload": payload_len, "all_delivered": all_delivered, "bind_secs": bind_secs,
        "idle_cpu_us_per_ms": idle_ns_per_ms / 1e3, "idle_ticks_per_s": idle_ticks as f64 / (args.idle_ms as f64 / 1e3),
        "send_to_first_ms": col("send_to_first_ms"), "send_to_last_ms": col("send_to_last_ms"), "fanout_ms": col("fanout_ms"),
        "frames_per_sec": col("frames_per_sec"), "frames_per_sec_per_core": col("frames_per_sec_per_core"),
        "cpu_us_per_frame": col("cpu_us_per_frame"), "cpu_us_per_frame_net_idle": col("cpu_us_per_frame_net_idle"),
        "cpu_us_per_frame_ticks": col("cpu_us_per_frame_ticks"), "client_cpu_ms": col("client_cpu_ms"),
        "frames_per_cpu_sec": col("frames_per_cpu_sec"),
        "target_wait_ms": col("target_wait_ms"), "client_wait_ms": col("client_wait_ms"), "window_ms": col("window_ms"),
        "cpu_ms": col("cpu_ms"), "slow_connects": sh.slow_connects.load(Ordering::Relaxed),
        "connect_mean_ms": sh.connect_ns.load(Ordering::Relaxed) as f64 / 1e6 / (bound + failed).max(1) as f64,
        "connect_max_ms": sh.connect_max_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "best_frames_per_sec": best("frames_per_sec", true), "best_send_to_last_ms": best("send_to_last_ms", false),
        "best_cpu_us_per_frame_net_idle": best("cpu_us_per_frame_net_idle", false),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "groups": per_group,
    });
    println!("{summary}");
    sh.stop.store(true, Ordering::SeqCst);
    // The sessions close with the process.
    std::process::exit(if all_delivered { 0 } else { 1 });
}
