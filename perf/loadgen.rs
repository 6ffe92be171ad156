//! gw-load: a load generator that speaks the client protocol (through the
//! gateway) or the backend protocol (straight to a backend, the baseline).
//!
//! Closed loop: each session keeps `--inflight` frames outstanding and sends a
//! new one per reply. Latency is timed from send to reply with HdrHistogram
//! (microsecond resolution); every reply expected and not received by the end
//! is counted as missing. A progress line is printed every second; the summary
//! is printed as text and, with `--json`, as one JSON line.

use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use game_gateway::protocol::backend as bproto;
use game_gateway::protocol::{client as cproto, ServerId};
use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Mode {
    /// Client frames to a gateway.
    Gateway,
    /// Backend `TRANS` frames straight to a backend (no gateway).
    Direct,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for game-gateway")]
struct Args {
    /// Address to load.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    #[arg(long, value_enum, default_value = "gateway")]
    mode: Mode,
    /// Concurrent sessions (connections).
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Frames in flight per session (closed loop).
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Payload bytes per frame (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    #[arg(long, default_value_t = 10)]
    server_type: u8,
    #[arg(long, default_value_t = 1)]
    world: u16,
    #[arg(long, default_value_t = 0)]
    inst: u8,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Load threads (each its own runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the summary as one JSON line too.
    #[arg(long)]
    json: bool,
    /// Label for the summary.
    #[arg(long, default_value = "run")]
    label: String,
}

/// How long a session waits for any reply before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    replies: AtomicU64,
    errors: AtomicU64,
    epoch: Instant,
}

struct ThreadResult {
    hist: Histogram<u64>,
    replies: u64,
    sent: u64,
    missing: u64,
    errors: u64,
}

fn encode(args: &Args, out: &mut BytesMut, session: i64, t_ns: u64) {
    let mut payload = vec![0u8; args.payload.max(8)];
    payload[..8].copy_from_slice(&t_ns.to_le_bytes());
    let sid = ServerId::new(false, args.world, args.server_type, args.inst);
    match args.mode {
        Mode::Gateway => {
            cproto::encode(out, 1, sid, &payload);
        }
        Mode::Direct => bproto::encode_trans(out, 1, sid.0, session, None, &payload),
    }
}

/// Parses one reply at the front of `buf`: `Some(Some(sent_ns))`, `Some(None)`
/// when incomplete, `None` on a protocol error.
fn decode(mode: Mode, buf: &mut BytesMut) -> Option<Option<u64>> {
    let (start, len) = match mode {
        Mode::Gateway => match cproto::check(buf, cproto::MAX_PAYLOAD) {
            Ok(Some(h)) => (cproto::HEADER_LEN, h.frame_len()),
            Ok(None) => return Some(None),
            Err(_) => return None,
        },
        Mode::Direct => match bproto::check(buf, 1 << 20) {
            Ok(Some(h)) => (bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN, h.frame_len()),
            Ok(None) => return Some(None),
            Err(_) => return None,
        },
    };
    let t = if len - start >= 8 { u64::from_le_bytes(buf[start..start + 8].try_into().unwrap()) } else { 0 };
    buf.advance(len);
    Some(Some(t))
}

async fn session(args: Arc<Args>, shared: Arc<Shared>, id: i64) -> ThreadResult {
    let mut r = ThreadResult {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        replies: 0,
        sent: 0,
        missing: 0,
        errors: 0,
    };
    let stream = match monoio::net::TcpStream::connect_addr(args.target).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("session {id}: connect {}: {e}", args.target);
            r.errors += 1;
            shared.errors.fetch_add(1, Ordering::Relaxed);
            return r;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let mut out = BytesMut::with_capacity(4096);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let now_ns = |s: &Shared| s.epoch.elapsed().as_nanos() as u64;
    for _ in 0..args.inflight {
        encode(&args, &mut out, id, now_ns(&shared));
    }
    let mut outstanding = args.inflight as u64;
    let mut measured_sent = 0u64;
    loop {
        if !out.is_empty() {
            let (res, b) = stream.write_all(out).await;
            out = b;
            if res.is_err() {
                r.errors += 1;
                break;
            }
            out.clear();
        }
        if shared.stop.load(Ordering::Relaxed) && outstanding == 0 {
            break;
        }
        let (len, cap) = (inbuf.len(), inbuf.capacity());
        if cap - len < 4096 {
            inbuf.reserve(64 * 1024);
        }
        let (len, cap) = (inbuf.len(), inbuf.capacity());
        // A reply that takes over REPLY_TIMEOUT ends the session: counted as
        // an error while measuring, as missing replies at the end.
        let (res, s) = match monoio::time::timeout(REPLY_TIMEOUT, stream.read(inbuf.slice_mut(len..cap))).await {
            Ok(x) => x,
            Err(_) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    r.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
        };
        inbuf = s.into_inner();
        match res {
            Ok(0) | Err(_) => {
                r.errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(_) => {}
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let stopping = shared.stop.load(Ordering::Relaxed);
        loop {
            match decode(args.mode, &mut inbuf) {
                None => {
                    r.errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return r;
                }
                Some(None) => break,
                Some(Some(t)) => {
                    outstanding -= 1;
                    let now = now_ns(&shared);
                    if measuring {
                        r.replies += 1;
                        let _ = r.hist.record(((now.saturating_sub(t)) / 1000).max(1));
                        shared.replies.fetch_add(1, Ordering::Relaxed);
                    }
                    if !stopping {
                        encode(&args, &mut out, id, now);
                        outstanding += 1;
                        if measuring {
                            measured_sent += 1;
                        }
                    }
                }
            }
        }
        if stopping && outstanding == 0 {
            break;
        }
    }
    r.sent = measured_sent;
    r.missing = outstanding;
    r
}

fn run_thread(args: Arc<Args>, shared: Arc<Shared>, ids: std::ops::Range<usize>) -> ThreadResult {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().expect("runtime");
    rt.block_on(async move {
        let handles: Vec<_> = ids.map(|i| monoio::spawn(session(args.clone(), shared.clone(), i as i64 + 1))).collect();
        let mut total = ThreadResult {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            replies: 0,
            sent: 0,
            missing: 0,
            errors: 0,
        };
        for h in handles {
            let r = h.await;
            total.hist.add(&r.hist).unwrap();
            total.replies += r.replies;
            total.sent += r.sent;
            total.missing += r.missing;
            total.errors += r.errors;
        }
        total
    })
}

fn main() {
    let args = Arc::new(Args::parse());
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        replies: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let per = args.sessions.div_ceil(args.threads.max(1));
    let mut threads = Vec::new();
    for t in 0..args.threads.max(1) {
        let lo = t * per;
        let hi = ((t + 1) * per).min(args.sessions);
        if lo >= hi {
            break;
        }
        let (a, s) = (args.clone(), shared.clone());
        threads.push(std::thread::spawn(move || run_thread(a, s, lo..hi)));
    }
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    shared.measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let mut last = 0;
    while t0.elapsed().as_secs_f64() < args.duration {
        std::thread::sleep(
            Duration::from_secs(1).min(Duration::from_secs_f64((args.duration - t0.elapsed().as_secs_f64()).max(0.0))),
        );
        let n = shared.replies.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] {:>10} msgs/s  errors {}",
            t0.elapsed().as_secs_f64(),
            n - last,
            shared.errors.load(Ordering::Relaxed)
        );
        last = n;
    }
    shared.measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::SeqCst);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut replies, mut missing, mut errors) = (0, 0, 0);
    for t in threads {
        let r = t.join().unwrap();
        hist.add(&r.hist).unwrap();
        replies += r.replies;
        missing += r.missing;
        errors += r.errors;
    }
    let rate = replies as f64 / elapsed;
    let q = |p: f64| hist.value_at_quantile(p);
    println!(
        "{}: mode={:?} sessions={} inflight={} payload={} => {:.0} msgs/s  p50={}us p90={}us p99={}us p99.9={}us max={}us  replies={} missing={} errors={}",
        args.label, args.mode, args.sessions, args.inflight, args.payload, rate, q(0.5), q(0.9), q(0.99), q(0.999), hist.max(), replies, missing, errors
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "label": args.label, "mode": format!("{:?}", args.mode).to_lowercase(), "sessions": args.sessions,
                "inflight": args.inflight, "payload": args.payload, "seconds": elapsed, "msgs_per_sec": rate,
                "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": hist.max(),
                "replies": replies, "missing": missing, "errors": errors,
            })
        );
    }
    if errors > 0 || missing > 0 {
        std::process::exit(1);
    }
}
