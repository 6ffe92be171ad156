//! gw-routeprop: route propagation under load, measured from outside the
//! gateway (the driver of perf/route-propagation.sh).
//!
//! It keeps `--sessions` client sessions sending `--rate` frames per second
//! each (open loop) for server type `--server-type` through the gateway, to
//! backends that append their identity to every echoed payload
//! (`mock-backend --tag ADDR`), while it switches that server type's rule
//! between two backend groups `--changes` times in Redis: each change is one
//! `MULTI; SET {prefix}routing:rules; PUBLISH {prefix}routing:rules:notify;
//! EXEC`, so the gateway cannot see the new rules before the notification.
//!
//! Per change, the driver notes the wall-clock time it sent the `EXEC` (the
//! publish time), then polls `/status` until every worker reports the new
//! snapshot version, and takes each worker's own `route_applied_at_unix_us`
//! (same machine, same clock): propagation = the last worker's apply time -
//! the publish time. The next change waits for that (and for a random 20-50
//! ms pace from the previous publish, plus a random 0-20 ms after the
//! confirmation so that publishes do not lock to the workers' tick phase).
//!
//! Every frame carries its sequence number and send time; every reply says
//! which backend answered. At the end:
//! - lost: frames sent without a reply (after a grace period);
//! - misrouted: a frame was routed at some instant between its send and its
//!   reply. Snapshot k may have been in force on some worker from its publish
//!   P_k until the last worker applied snapshot k+1 (C_k+1). A reply is
//!   misrouted when no snapshot possibly in force during [sent, replied]
//!   routes to the group that answered. Frames sent after C_k and answered
//!   before P_k+1 ("steady") must hit snapshot k's group; frames whose window
//!   overlaps a change ("in transition") may hit either group, except that a
//!   session's frames are routed in send order by one worker whose snapshot
//!   only moves forward: once one of its frames reached the new group, a
//!   later one reaching the old group is misrouted too.
//! - a client-side cross-check of the propagation: per change, for every
//!   session, the first frame sent after the publish that reached the new
//!   group; the slowest session bounds when every worker served it (to within
//!   one send interval).
//!
//! Prints a summary; with `--out DIR` writes DIR/changes.csv and
//! DIR/result.json.

use bytes::{Buf, BytesMut};
use clap::Parser;
use gate_protocol::{client as cproto, ServerId};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug, Clone)]
#[command(about = "Route propagation under load: Redis changes vs. what the gateway's workers and clients see")]
struct Args {
    /// The gateway's client listener.
    #[arg(long)]
    gateway: SocketAddr,
    /// The gateway's admin listener (`/status`, `/metrics`).
    #[arg(long)]
    admin: SocketAddr,
    /// The Redis server the gateway reads its routes from.
    #[arg(long)]
    redis: SocketAddr,
    #[arg(long, default_value = "game-gateway:")]
    prefix: String,
    /// Backend group A (`host:port,...`; each backend tags its replies with its address).
    #[arg(long, value_delimiter = ',', required = true)]
    group_a: Vec<String>,
    /// Backend group B.
    #[arg(long, value_delimiter = ',', required = true)]
    group_b: Vec<String>,
    #[arg(long, default_value_t = 10)]
    server_type: u8,
    /// Route changes (alternately to B and to A).
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Least and most time from one publish to the next (uniform).
    #[arg(long, default_value_t = 20)]
    min_interval_ms: u64,
    #[arg(long, default_value_t = 50)]
    max_interval_ms: u64,
    /// Client sessions of the driver.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// Frames per second per session.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Payload bytes per frame (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// Seconds of load before the first change.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Bound on the change phase (seconds); the run stops changing after it.
    #[arg(long, default_value_t = 200.0)]
    max_seconds: f64,
    /// How long one change may take to reach every worker before the run fails.
    #[arg(long, default_value_t = 2000)]
    change_timeout_ms: u64,
    /// Directory for changes.csv and result.json.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// A small xorshift generator (pacing jitter only).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi] microseconds.
    fn us(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------- Redis ---

enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// A bulk string (read and ignored: nothing here needs one).
    Bulk,
    Array(Vec<Resp>),
}

struct Redis {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Redis {
    fn connect(addr: SocketAddr) -> std::io::Result<Redis> {
        let w = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        w.set_nodelay(true)?;
        w.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Redis { r: BufReader::new(w.try_clone()?), w })
    }

    fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn read(&mut self) -> std::io::Result<Resp> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        let bad = || std::io::Error::other(format!("bad RESP line {line:?}"));
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Resp::Simple(rest.into()),
            "-" => Resp::Error(rest.into()),
            ":" => Resp::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n >= 0 {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                }
                Resp::Bulk
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                let mut v = Vec::new();
                for _ in 0..n.max(0) {
                    v.push(self.read()?);
                }
                Resp::Array(v)
            }
            _ => return Err(bad()),
        })
    }

    /// One command; its reply.
    fn cmd(&mut self, args: &[&[u8]]) -> std::io::Result<Resp> {
        let mut out = Vec::new();
        Self::encode(&mut out, args);
        self.w.write_all(&out)?;
        self.read()
    }

    /// `SET rules; PUBLISH notify` in one transaction. Returns the wall-clock
    /// time just before the `EXEC` left, and how many subscribers got the
    /// notification.
    fn change(&mut self, keys: &(String, String), rules: &str) -> std::io::Result<(u64, i64)> {
        let mut queued = Vec::new();
        Self::encode(&mut queued, &[b"MULTI"]);
        Self::encode(&mut queued, &[b"SET", keys.0.as_bytes(), rules.as_bytes()]);
        Self::encode(&mut queued, &[b"PUBLISH", keys.1.as_bytes(), b"routeprop"]);
        self.w.write_all(&queued)?;
        for _ in 0..3 {
            match self.read()? {
                Resp::Simple(_) => {}
                Resp::Error(e) => return Err(std::io::Error::other(e)),
                _ => return Err(std::io::Error::other("unexpected reply to MULTI/SET/PUBLISH")),
            }
        }
        let mut exec = Vec::new();
        Self::encode(&mut exec, &[b"EXEC"]);
        let at = now_us();
        self.w.write_all(&exec)?;
        match self.read()? {
            Resp::Array(v) => match v.get(1) {
                Some(Resp::Int(n)) => Ok((at, *n)),
                _ => Err(std::io::Error::other("EXEC: unexpected result")),
            },
            Resp::Error(e) => Err(std::io::Error::other(e)),
            _ => Err(std::io::Error::other("EXEC: unexpected reply")),
        }
    }
}

// ---------------------------------------------------------------- admin ---

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: routeprop\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("GET {path}: {}", out.lines().next().unwrap_or("")))),
    }
}

/// One worker as `/status` shows it.
#[derive(Debug, Clone, Copy)]
struct WorkerView {
    version: u64,
    applied_us: u64,
    delay_ms: f64,
}

/// Every worker's view, and the control side's version.
fn status(admin: SocketAddr) -> std::io::Result<(u64, Vec<WorkerView>)> {
    let v: serde_json::Value = serde_json::from_str(&http_get(admin, "/status")?).map_err(std::io::Error::other)?;
    let control = v["routes"]["version"].as_u64().unwrap_or(0);
    let workers = v["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| WorkerView {
                    version: w["route_version"].as_u64().unwrap_or(0),
                    applied_us: w["route_applied_at_unix_us"].as_u64().unwrap_or(0),
                    delay_ms: w["route_apply_delay_ms"].as_f64().unwrap_or(f64::NAN),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((control, workers))
}

/// `/metrics` as (series, value).
fn metrics(admin: SocketAddr) -> std::io::Result<Vec<(String, f64)>> {
    let text = http_get(admin, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

fn series(m: &[(String, f64)], name: &str) -> f64 {
    m.iter().filter(|(k, _)| k == name).map(|(_, v)| v).sum()
}

/// The propagation histogram's cumulative buckets (le, count).
fn prop_buckets(m: &[(String, f64)]) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, n)| {
            let le = k.strip_prefix("game_gateway_route_propagation_seconds_bucket{le=\"")?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *n))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Frames dropped by reason.
fn drops(m: &[(String, f64)]) -> Vec<(String, f64)> {
    m.iter()
        .filter_map(|(k, n)| {
            let r = k.strip_prefix("game_gateway_frames_dropped_total{reason=\"")?.strip_suffix("\"}")?;
            Some((r.to_string(), *n))
        })
        .collect()
}

// ------------------------------------------------------------- sessions ---

/// One answered frame.
#[derive(Debug, Clone, Copy)]
struct Rec {
    seq: u64,
    sent_us: u64,
    recv_us: u64,
    /// 0: group A, 1: group B, 2: an unknown tag.
    group: u8,
}

struct SessionResult {
    sent: u64,
    recs: Vec<Rec>,
    errors: Vec<String>,
}

fn group_of(tag: &[u8], a: &[String], b: &[String]) -> u8 {
    let t = std::str::from_utf8(tag).unwrap_or("");
    if a.iter().any(|x| x == t) {
        0
    } else if b.iter().any(|x| x == t) {
        1
    } else {
        2
    }
}

/// Runs one session until `stop`, then waits up to `grace` for the replies
/// still due.
fn run_session(args: Arc<Args>, idx: usize, stop: Arc<AtomicBool>, grace: Duration) -> SessionResult {
    let mut res = SessionResult { sent: 0, recs: Vec::new(), errors: Vec::new() };
    let s = match TcpStream::connect_timeout(&args.gateway, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            res.errors.push(format!("session {idx}: connect: {e}"));
            return res;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let sent = Arc::new(AtomicU64::new(0));
    let writer_done = Arc::new(AtomicBool::new(false));
    let mut w = s.try_clone().expect("clone the client socket");
    let (a2, stop2, sent2, done2) = (args.clone(), stop.clone(), sent.clone(), writer_done.clone());
    let writer = std::thread::Builder::new()
        .name(format!("rp-w{idx}"))
        .spawn(move || {
            let interval = Duration::from_secs_f64(1.0 / a2.rate);
            // Sessions start spread over one interval.
            let start = Instant::now() + interval.mul_f64((idx as f64 * 0.618_034) % 1.0);
            let sid = ServerId::new(false, 1, a2.server_type, 0);
            let mut payload = vec![0u8; a2.payload.max(16)];
            let mut frame = BytesMut::with_capacity(64 + payload.len());
            let mut n = 0u64;
            let mut err = None;
            while !stop2.load(Ordering::Relaxed) {
                let due = start + interval.mul_f64(n as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                payload[..8].copy_from_slice(&n.to_le_bytes());
                payload[8..16].copy_from_slice(&now_us().to_le_bytes());
                frame.clear();
                cproto::encode(&mut frame, n as u16, sid, &payload);
                if let Err(e) = w.write_all(&frame) {
                    err = Some(format!("session {idx}: write: {e}"));
                    break;
                }
                n += 1;
                sent2.store(n, Ordering::Release);
            }
            done2.store(true, Ordering::Release);
            // The socket stays open (no half-close) until the reader is done.
            (w, err)
        })
        .expect("spawn a writer");
    let mut r = s;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut stopped_at: Option<Instant> = None;
    loop {
        if writer_done.load(Ordering::Acquire) {
            let t = *stopped_at.get_or_insert_with(Instant::now);
            if res.recs.len() as u64 >= sent.load(Ordering::Acquire) || t.elapsed() > grace {
                break;
            }
        }
        match r.read(&mut chunk) {
            Ok(0) => {
                res.errors.push(format!("session {idx}: the gateway closed the connection"));
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let recv_us = now_us();
                loop {
                    match cproto::check(&buf, cproto::MAX_PAYLOAD) {
                        Ok(Some(h)) => {
                            let len = h.frame_len();
                            let p = &buf[cproto::HEADER_LEN..len];
                            if p.len() < 16 {
                                res.errors.push(format!("session {idx}: short reply ({} bytes)", p.len()));
                            } else {
                                let seq = u64::from_le_bytes(p[..8].try_into().unwrap());
                                let sent_us = u64::from_le_bytes(p[8..16].try_into().unwrap());
                                let tag = p.get(args.payload.max(16)..).unwrap_or(&[]);
                                let group = group_of(tag, &args.group_a, &args.group_b);
                                res.recs.push(Rec { seq, sent_us, recv_us, group });
                            }
                            buf.advance(len);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            res.errors.push(format!("session {idx}: bad frame from the gateway: {e}"));
                            return res;
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => {
                res.errors.push(format!("session {idx}: read: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (_w, err) = writer.join().expect("writer thread");
    res.errors.extend(err);
    res.sent = sent.load(Ordering::Acquire);
    res
}

// -------------------------------------------------------------- changes ---

#[derive(Debug, Clone)]
struct Change {
    /// 1-based; change k puts the rule on group k % 2 (1: B, 0: A).
    n: usize,
    version: u64,
    published_us: u64,
    /// Per worker: when it applied the snapshot (its own clock).
    applied_us: Vec<u64>,
    /// Per worker: the gateway's own measure, from the notify reaching it.
    gateway_ms: Vec<f64>,
    /// When the driver saw every worker on it.
    confirmed_us: u64,
    subscribers: i64,
}

impl Change {
    fn group(&self) -> u8 {
        (self.n % 2) as u8
    }
    fn last_applied_us(&self) -> u64 {
        self.applied_us.iter().copied().max().unwrap_or(0)
    }
    fn propagation_ms(&self) -> f64 {
        self.last_applied_us().saturating_sub(self.published_us) as f64 / 1e3
    }
}

fn rules_json(st: u8, endpoints: &[String]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[{{\"server_type\": {st}, \"service_name\": \"routeprop\", \"strategy\": \"round_robin\", \"endpoints\": [{}]}}]",
        eps.join(", ")
    )
}

/// Polls `/status` until the control side and every worker run the same
/// version (and, with `at_least`, at least that one); their views.
fn wait_applied(admin: SocketAddr, at_least: u64, timeout: Duration) -> Result<(u64, Vec<WorkerView>), String> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match status(admin) {
            Ok((control, ws)) if !ws.is_empty() && control >= at_least && ws.iter().all(|w| w.version == control) => {
                return Ok((control, ws));
            }
            Ok((control, ws)) => {
                last = format!("control {control}, workers {:?}", ws.iter().map(|w| w.version).collect::<Vec<_>>())
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("not every worker reached version {at_least} within {timeout:?} (last: {last})"))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(v: &[f64]) -> serde_json::Value {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "n": s.len(),
        "p50_ms": r(percentile(&s, 0.5)),
        "p90_ms": r(percentile(&s, 0.9)),
        "p99_ms": r(percentile(&s, 0.99)),
        "max_ms": r(s.last().copied().unwrap_or(f64::NAN)),
        "mean_ms": r(if s.is_empty() { f64::NAN } else { s.iter().sum::<f64>() / s.len() as f64 }),
    })
}

fn main() {
    let args = Arc::new(Args::parse());
    if args.min_interval_ms > args.max_interval_ms || args.rate <= 0.0 || args.sessions == 0 {
        eprintln!("gw-routeprop: need min-interval <= max-interval, rate > 0, sessions > 0");
        std::process::exit(2);
    }
    let keys = (format!("{}routing:rules", args.prefix), format!("{}routing:rules:notify", args.prefix));
    let mut redis = Redis::connect(args.redis).unwrap_or_else(|e| {
        eprintln!("gw-routeprop: redis {}: {e}", args.redis);
        std::process::exit(1);
    });
    let fail = |what: String| -> ! {
        eprintln!("gw-routeprop: {what}");
        std::process::exit(1);
    };
    match redis.cmd(&[b"PING"]) {
        Ok(Resp::Simple(s)) if s == "PONG" => {}
        Ok(_) => fail("redis PING: unexpected reply".into()),
        Err(e) => fail(format!("redis PING: {e}")),
    }
    let groups = [args.group_a.clone(), args.group_b.clone()];
    let mut rng = Rng(now_us() | 1);

    // Start on group A, whatever the gateway held.
    if let Err(e) = redis.change(&keys, &rules_json(args.server_type, &groups[0])) {
        fail(format!("redis: {e}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (v0, ws0) = wait_applied(args.admin, 0, Duration::from_secs(5)).unwrap_or_else(|e| fail(e));
    eprintln!(
        "gw-routeprop: {} workers on route version {v0} (group A); starting {} sessions",
        ws0.len(),
        args.sessions
    );

    let stop = Arc::new(AtomicBool::new(false));
    let grace = Duration::from_secs(3);
    let sessions: Vec<_> = (0..args.sessions)
        .map(|i| {
            let (a, s) = (args.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("rp-r{i}"))
                .spawn(move || run_session(a, i, s, grace))
                .expect("spawn a session")
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let before = metrics(args.admin).unwrap_or_else(|e| fail(format!("/metrics: {e}")));

    let t0 = Instant::now();
    let mut changes: Vec<Change> = Vec::with_capacity(args.changes);
    let mut waited_for_confirmation = 0usize;
    let mut failure: Option<String> = None;
    let log = Mutex::new(());
    for n in 1..=args.changes {
        if t0.elapsed().as_secs_f64() > args.max_seconds {
            failure = Some(format!("stopped after {} changes: --max-seconds {} reached", n - 1, args.max_seconds));
            break;
        }
        if stop.load(Ordering::Relaxed) {
            failure = Some("a session ended early".into());
            break;
        }
        let group = &groups[n % 2];
        let (published_us, subscribers) = match redis.change(&keys, &rules_json(args.server_type, group)) {
            Ok(x) => x,
            Err(e) => {
                failure = Some(format!("change {n}: redis: {e}"));
                break;
            }
        };
        let want = v0 + n as u64;
        let (version, ws) = match wait_applied(args.admin, want, Duration::from_millis(args.change_timeout_ms)) {
            Ok(x) => x,
            Err(e) => {
                failure = Some(format!("change {n}: {e}"));
                break;
            }
        };
        let confirmed_us = now_us();
        if version != want {
            failure = Some(format!("change {n}: the gateway is on version {version}, expected {want}"));
            break;
        }
        let c = Change {
            n,
            version,
            published_us,
            applied_us: ws.iter().map(|w| w.applied_us).collect(),
            gateway_ms: ws.iter().map(|w| w.delay_ms).collect(),
            confirmed_us,
            subscribers,
        };
        if n % 100 == 0 {
            let _g = log.lock();
            eprintln!(
                "gw-routeprop: change {n}/{}: version {version}, every worker after {:.1} ms",
                args.changes,
                c.propagation_ms()
            );
        }
        changes.push(c);
        // Pace: 20-50 ms from publish to publish, and a random 0-20 ms
        // after the confirmation (which arrives on a worker tick).
        let paced = published_us + rng.us(args.min_interval_ms * 1000, args.max_interval_ms * 1000);
        let dephased = confirmed_us + rng.us(0, 20_000);
        if dephased > paced {
            waited_for_confirmation += 1;
        }
        let next = paced.max(dephased);
        let now = now_us();
        if next > now {
            std::thread::sleep(Duration::from_micros(next - now));
        }
    }
    let change_secs = t0.elapsed().as_secs_f64();
    // Load on the last snapshot for a while, then stop and collect.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<SessionResult> = sessions.into_iter().map(|h| h.join().expect("session thread")).collect();
    let after = metrics(args.admin).unwrap_or_else(|e| fail(format!("/metrics: {e}")));

    // ------------------------------------------------------------ analysis
    let workers = ws0.len();
    let prop: Vec<f64> = changes.iter().map(Change::propagation_ms).collect();
    let gw_last: Vec<f64> = changes.iter().map(|c| c.gateway_ms.iter().copied().fold(f64::NAN, f64::max)).collect();
    let per_worker: Vec<f64> = changes
        .iter()
        .flat_map(|c| c.applied_us.iter().map(move |a| a.saturating_sub(c.published_us) as f64 / 1e3))
        .collect();
    let not_subscribed = changes.iter().filter(|c| c.subscribers < 1).count();

    // Snapshot k (0: the start, group A) may be in force on some worker from
    // P_k to C_k+1 (the last worker applying k+1).
    let p: Vec<u64> = std::iter::once(0).chain(changes.iter().map(|c| c.published_us)).collect();
    let c_next: Vec<u64> = changes.iter().map(Change::last_applied_us).chain(std::iter::once(u64::MAX)).collect();
    let group_k = |k: usize| (k % 2) as u8;
    let (mut sent, mut replies, mut dups, mut lost, mut misrouted, mut unknown) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut steady, mut transition, mut transition_new, mut transition_old) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut misrouted_examples: Vec<String> = Vec::new();
    // Client-side view: per change, per session, the first frame sent after
    // the publish that reached the new group.
    let mut first_new: Vec<Vec<Option<u64>>> = vec![vec![None; results.len()]; changes.len()];
    for (si, r) in results.iter().enumerate() {
        errors.extend(r.errors.iter().cloned());
        sent += r.sent;
        let mut seen = vec![false; r.sent as usize];
        // A session's frames are routed in send order, by one worker whose
        // snapshot only moves forward: once a frame was routed under
        // snapshot j, no later frame of the session is routed under an
        // older one (`floor`).
        let mut recs = r.recs.clone();
        recs.sort_by_key(|r| r.seq);
        let mut floor = 0usize;
        for rec in &recs {
            replies += 1;
            match seen.get_mut(rec.seq as usize) {
                Some(s) if !*s => *s = true,
                Some(_) => dups += 1,
                None => errors.push(format!("session {si}: reply to a frame never sent (seq {})", rec.seq)),
            }
            if rec.group == 2 {
                unknown += 1;
                misrouted += 1;
                continue;
            }
            // Possible snapshots: P_k <= replied, C_k+1 >= sent, and not
            // older than one an earlier frame of the session was routed by.
            let k_hi = p.partition_point(|&x| x <= rec.recv_us).saturating_sub(1);
            let k_lo = c_next.partition_point(|&x| x < rec.sent_us).max(floor);
            // The oldest possible snapshot routing to the group that answered.
            let by = if group_k(k_lo) == rec.group { k_lo } else { k_lo + 1 };
            if by > k_hi {
                misrouted += 1;
                if misrouted_examples.len() < 10 {
                    misrouted_examples.push(format!(
                        "session {si} seq {}: sent {} replied {} by group {}; possible snapshots {k_lo}..={k_hi}",
                        rec.seq, rec.sent_us, rec.recv_us, rec.group
                    ));
                }
                continue;
            }
            floor = by;
            if k_lo >= k_hi {
                steady += 1;
            } else {
                transition += 1;
                if rec.group == group_k(k_hi) {
                    transition_new += 1;
                } else {
                    transition_old += 1;
                }
            }
            // First new-group frame after publish k (k >= 1), sent before P_k+1.
            let k = p.partition_point(|&x| x <= rec.sent_us).saturating_sub(1);
            if k >= 1 && rec.group == group_k(k) {
                let slot = &mut first_new[k - 1][si];
                if slot.is_none_or(|t| rec.sent_us < t) {
                    *slot = Some(rec.sent_us);
                }
            }
        }
        lost += seen.iter().filter(|s| !**s).count() as u64;
    }
    let client_view: Vec<f64> = first_new
        .iter()
        .zip(&changes)
        .filter_map(|(per, c)| {
            let all: Option<Vec<u64>> = per.iter().copied().collect();
            all.map(|v| v.into_iter().max().unwrap_or(0).saturating_sub(c.published_us) as f64 / 1e3)
        })
        .collect();

    let hist_before = prop_buckets(&before);
    let hist_after = prop_buckets(&after);
    let hist: Vec<serde_json::Value> = hist_after
        .iter()
        .map(|(le, n)| {
            let b = hist_before.iter().find(|(l, _)| l == le).map(|x| x.1).unwrap_or(0.0);
            serde_json::json!({"le": if le.is_finite() { le.to_string() } else { "+Inf".into() }, "count": n - b})
        })
        .collect();
    let hist_count = series(&after, "game_gateway_route_propagation_seconds_count")
        - series(&before, "game_gateway_route_propagation_seconds_count");
    let hist_sum = series(&after, "game_gateway_route_propagation_seconds_sum")
        - series(&before, "game_gateway_route_propagation_seconds_sum");
    let drops_before = drops(&before);
    let drop_delta: serde_json::Map<String, serde_json::Value> = drops(&after)
        .into_iter()
        .filter_map(|(r, n)| {
            let b = drops_before.iter().find(|(x, _)| *x == r).map(|x| x.1).unwrap_or(0.0);
            (n - b > 0.0).then(|| (r, serde_json::json!(n - b)))
        })
        .collect();

    let result = serde_json::json!({
        "changes_requested": args.changes,
        "changes_done": changes.len(),
        "change_phase_seconds": (change_secs * 10.0).round() / 10.0,
        "changes_per_second": (changes.len() as f64 / change_secs * 10.0).round() / 10.0,
        "paced_by_confirmation": waited_for_confirmation,
        "workers": workers,
        "failure": failure,
        "notifications_without_subscriber": not_subscribed,
        "propagation_from_publish_last_worker": summary(&prop),
        "propagation_from_publish_per_worker": summary(&per_worker),
        "gateway_measure_last_worker": summary(&gw_last),
        "client_view_slowest_session": summary(&client_view),
        "gateway_histogram": {"count": hist_count, "sum_seconds": hist_sum, "buckets": hist},
        "frames": {
            "sessions": results.len(), "rate_per_session": args.rate,
            "sent": sent, "replies": replies, "lost": lost, "duplicates": dups,
            "misrouted": misrouted, "unknown_backend": unknown,
            "steady": steady, "in_transition": transition,
            "in_transition_new_group": transition_new, "in_transition_old_group": transition_old,
            "misrouted_examples": misrouted_examples,
        },
        "gateway_drops_during_run": drop_delta,
        "errors": errors.iter().take(20).collect::<Vec<_>>(),
        "error_count": errors.len(),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    if let Some(dir) = &args.out {
        let _ = std::fs::create_dir_all(dir);
        let mut csv = String::from(
            "change,version,group,published_unix_us,last_applied_unix_us,propagation_ms,gateway_ms_last_worker,confirmed_after_ms",
        );
        for w in 0..workers {
            csv.push_str(&format!(",worker{w}_ms"));
        }
        csv.push('\n');
        for (c, g) in changes.iter().zip(&gw_last) {
            csv.push_str(&format!(
                "{},{},{},{},{},{:.3},{:.3},{:.3}",
                c.n,
                c.version,
                if c.group() == 0 { "A" } else { "B" },
                c.published_us,
                c.last_applied_us(),
                c.propagation_ms(),
                g,
                c.confirmed_us.saturating_sub(c.published_us) as f64 / 1e3
            ));
            for a in &c.applied_us {
                csv.push_str(&format!(",{:.3}", a.saturating_sub(c.published_us) as f64 / 1e3));
            }
            csv.push('\n');
        }
        let _ = std::fs::write(dir.join("changes.csv"), csv);
        let _ = std::fs::write(dir.join("result.json"), serde_json::to_string_pretty(&result).unwrap() + "\n");
    }
    let ok = result["failure"].is_null() && lost == 0 && misrouted == 0 && errors.is_empty();
    std::process::exit(if ok { 0 } else { 1 });
}
