//! gw-load: a load generator that speaks the client protocol (to a gateway,
//! over TCP or WebSocket), raw client frames to any TCP proxy or echo (or, with
//! `--ws`, WebSocket messages to a WebSocket proxy or echo), or the backend
//! protocol straight to a backend (the baseline).
//!
//! Workloads:
//! - closed loop (default): each session keeps `--inflight` frames
//!   outstanding and sends a new one per reply;
//! - open loop (`--rate R`): each session sends R frames per second on a
//!   fixed schedule; latency is timed from the *intended* send time, so a
//!   stall is charged to every frame it delayed (coordinated omission
//!   corrected);
//! - churn (`--churn`): each session repeatedly connects, sends one frame,
//!   reads the reply and closes; reports sessions per second;
//! - idle (`--idle`): sessions connect, bind with one frame, then hold still
//!   (memory measurements).
//!
//! Latency is recorded with HdrHistogram (µs). Every reply expected and not
//! received is counted as missing; a progress line is printed every second;
//! the summary is printed as text and, with `--json`, as one JSON line.

use bytes::{Buf, BufMut, BytesMut};
use clap::{Parser, ValueEnum};
use gate_protocol::backend as bproto;
use gate_protocol::{client as cproto, ServerId};
use hdrhistogram::Histogram;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Mode {
    /// Client frames (to a gateway, or through any byte proxy to an echo).
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
    /// Speak WebSocket: each client frame goes out as one masked binary
    /// message, each reply must come back as one binary message holding one
    /// client frame. Works against the gateway and against a WebSocket proxy
    /// in front of `gw-echo --mode ws` (which returns the client frame).
    #[arg(long)]
    ws: bool,
    /// Speak TLS (rustls) to the target; the CA that signed its certificate
    /// is `--tls-ca`.
    #[arg(long)]
    tls: bool,
    /// PEM file of the CA certificate(s) the target's chain ends in.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Server name sent in the ClientHello (SNI) and verified.
    #[arg(long, default_value = "localhost")]
    tls_sni: String,
    /// Resume TLS sessions (tickets) on reconnect; by default every
    /// connection makes a full handshake (churn then counts handshakes).
    #[arg(long)]
    tls_resume: bool,
    /// Concurrent sessions (connections).
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Frames in flight per session (closed loop).
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Open loop: frames per second per session (0 = closed loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Churn: connect, one frame, reply, close, repeat.
    #[arg(long)]
    churn: bool,
    /// Idle: bind with one frame, then hold the connection still.
    #[arg(long)]
    idle: bool,
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
    /// The load generator's io_uring setup (env GW_LOAD_RING).
    #[arg(long, value_enum, env = "GW_LOAD_RING", default_value = "plain")]
    ring: Ring,
}

/// How long a session waits for any reply before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    replies: AtomicU64,
    errors: AtomicU64,
    sessions_done: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn error(&self, r: &mut Outcome) {
        r.errors += 1;
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

struct Outcome {
    hist: Histogram<u64>,
    replies: u64,
    missing: u64,
    errors: u64,
    sessions: u64,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            replies: 0,
            missing: 0,
            errors: 0,
            sessions: 0,
        }
    }
    fn add(&mut self, o: &Outcome) {
        self.hist.add(&o.hist).unwrap();
        self.replies += o.replies;
        self.missing += o.missing;
        self.errors += o.errors;
        self.sessions += o.sessions;
    }
}

/// Encodes one request carrying `t_ns` in its first payload bytes.
fn encode(args: &Args, out: &mut BytesMut, session: i64, t_ns: u64) {
    let mut payload = [0u8; 65_535];
    let n = args.payload.max(8);
    payload[..8].copy_from_slice(&t_ns.to_le_bytes());
    let sid = ServerId::new(false, args.world, args.server_type, args.inst);
    match args.mode {
        Mode::Direct => bproto::encode_trans(out, 1, sid.0, session, None, &payload[..n]),
        Mode::Gateway if args.ws => {
            // A masked binary frame, as a client must send.
            let mut frame = BytesMut::new();
            cproto::encode(&mut frame, 1, sid, &payload[..n]);
            let mask = (t_ns as u32 ^ session as u32).to_le_bytes();
            let h = tungstenite::protocol::frame::FrameHeader {
                opcode: tungstenite::protocol::frame::coding::OpCode::Data(
                    tungstenite::protocol::frame::coding::Data::Binary,
                ),
                mask: Some(mask),
                ..Default::default()
            };
            let _ = h.format(frame.len() as u64, &mut out.writer());
            out.extend(frame.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        Mode::Gateway => {
            cproto::encode(out, 1, sid, &payload[..n]);
        }
    }
}

/// One reply at the front of `buf`: `Some(Some(sent_ns))`, `Some(None)` when
/// incomplete, `None` on a protocol error.
///
/// Every reply must be exactly one client frame: on TCP the next frame of the
/// stream, on WebSocket the whole payload of one unmasked, final binary
/// message (the gateway sends each reply as one; a WebSocket echo behind a
/// proxy sends back the client's message). Pings and pongs are skipped.
fn decode(args: &Args, buf: &mut BytesMut) -> Option<Option<u64>> {
    let (start, len) = match args.mode {
        Mode::Gateway if args.ws => loop {
            use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
            let mut cur = std::io::Cursor::new(&buf[..]);
            let (h, plen) = match tungstenite::protocol::frame::FrameHeader::parse(&mut cur) {
                Ok(Some(x)) => x,
                Ok(None) => return Some(None),
                Err(_) => return None,
            };
            let (hl, plen) = (cur.position() as usize, plen as usize);
            if buf.len() < hl + plen {
                return Some(None);
            }
            match h.opcode {
                OpCode::Control(Control::Ping | Control::Pong) => {
                    buf.advance(hl + plen);
                    continue;
                }
                OpCode::Data(Data::Binary) if h.is_final && h.mask.is_none() => {}
                _ => return None,
            }
            match cproto::check(&buf[hl..hl + plen], cproto::MAX_PAYLOAD) {
                Ok(Some(c)) if c.frame_len() == plen => break (hl + cproto::HEADER_LEN, hl + plen),
                _ => return None,
            }
        },
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
    let t = if len >= start + 8 { u64::from_le_bytes(buf[start..start + 8].try_into().unwrap()) } else { 0 };
    buf.advance(len);
    Some(Some(t))
}

/// A connection to the target: plain TCP or TLS over it.
enum Conn {
    Plain(monoio::net::TcpStream),
    Tls(Box<monoio_rustls::ClientTlsStream<monoio::net::TcpStream>>),
}

// SAFETY: both variants are `Split` (a TCP stream, and monoio-rustls' stream
// over one); the enum adds no shared state of its own.
unsafe impl monoio::io::Split for Conn {}

impl AsyncReadRent for Conn {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
        }
    }
    async fn readv<T: monoio::buf::IoVecBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.readv(buf).await,
            Conn::Tls(s) => s.readv(buf).await,
        }
    }
}

impl monoio::io::AsyncWriteRent for Conn {
    async fn write<T: monoio::buf::IoBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.write(buf).await,
            Conn::Tls(s) => s.write(buf).await,
        }
    }
    async fn writev<T: monoio::buf::IoVecBuf>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        match self {
            Conn::Plain(s) => s.writev(buf).await,
            Conn::Tls(s) => s.writev(buf).await,
        }
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush().await,
            Conn::Tls(s) => s.flush().await,
        }
    }
    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
        }
    }
}

/// The TLS client configuration, built once from the arguments.
static TLS: std::sync::OnceLock<Option<monoio_rustls::TlsConnector>> = std::sync::OnceLock::new();

fn tls_connector(args: &Args) -> Result<Option<monoio_rustls::TlsConnector>, String> {
    if !args.tls {
        return Ok(None);
    }
    use rustls::pki_types::pem::PemObject;
    let path = args.tls_ca.as_ref().ok_or("--tls needs --tls-ca FILE")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !args.tls_resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    if args.ws {
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Some(monoio_rustls::TlsConnector::from(cfg)))
}

async fn connect(args: &Args) -> std::io::Result<Conn> {
    let tcp = monoio::net::TcpStream::connect_addr(args.target).await?;
    let _ = tcp.set_nodelay(true);
    let mut s = match TLS.get().and_then(|t| t.as_ref()) {
        None => Conn::Plain(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(args.tls_sni.clone())
                .map_err(|e| std::io::Error::other(format!("--tls-sni: {e}")))?;
            Conn::Tls(Box::new(tls.connect(name, tcp).await.map_err(std::io::Error::other)?))
        }
    };
    if args.ws {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            args.target
        );
        let (r, _) = s.write_all(req.into_bytes()).await;
        r?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let (r, b) = s.read(vec![0u8; 1]).await;
            if r? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(std::io::Error::other("websocket upgrade refused"));
        }
    }
    Ok(s)
}

/// Connects, or reports and counts the failure.
async fn connect_or_count(args: &Args, shared: &Shared, r: &mut Outcome, id: i64) -> Option<Conn> {
    match connect(args).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("session {id}: connect {}: {e}", args.target);
            shared.error(r);
            None
        }
    }
}

/// Reads more bytes into `buf`; `false` on end, error or timeout.
async fn fill<R: AsyncReadRent>(rd: &mut R, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let b = std::mem::take(buf);
    match monoio::time::timeout(REPLY_TIMEOUT, rd.read(b.slice_mut(len..cap))).await {
        Ok((Ok(n), s)) => {
            *buf = s.into_inner();
            n > 0
        }
        Ok((Err(_), s)) => {
            *buf = s.into_inner();
            false
        }
        Err(_) => false,
    }
}

fn record(shared: &Shared, r: &mut Outcome, sent_ns: u64) {
    if shared.measuring.load(Ordering::Relaxed) {
        r.replies += 1;
        let _ = r.hist.record((shared.now_ns().saturating_sub(sent_ns) / 1000).max(1));
        shared.replies.fetch_add(1, Ordering::Relaxed);
    }
}

/// Closed loop (or idle when `args.idle`).
async fn closed_loop(args: Arc<Args>, shared: Arc<Shared>, id: i64) -> Outcome {
    let mut r = Outcome::new();
    let Some(mut stream) = connect_or_count(&args, &shared, &mut r, id).await else { return r };
    let mut out = BytesMut::with_capacity(4096);
    let mut inbuf = BytesMut::with_capacity(if args.idle { 256 } else { 64 * 1024 });
    let inflight = if args.idle { 1 } else { args.inflight };
    for _ in 0..inflight {
        encode(&args, &mut out, id, shared.now_ns());
    }
    let mut outstanding = inflight as u64;
    loop {
        if !out.is_empty() {
            let (res, b) = stream.write_all(out).await;
            out = b;
            out.clear();
            if res.is_err() {
                shared.error(&mut r);
                break;
            }
        }
        let stopping = shared.stop.load(Ordering::Relaxed);
        if outstanding == 0 {
            if stopping {
                break;
            }
            if args.idle {
                // Bound; hold still until the end.
                while !shared.stop.load(Ordering::Relaxed) {
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
                break;
            }
        }
        if !fill(&mut stream, &mut inbuf).await {
            if !shared.stop.load(Ordering::Relaxed) {
                shared.error(&mut r);
            }
            break;
        }
        let stopping = shared.stop.load(Ordering::Relaxed);
        loop {
            match decode(&args, &mut inbuf) {
                None => {
                    shared.error(&mut r);
                    return r;
                }
                Some(None) => break,
                Some(Some(t)) => {
                    outstanding -= 1;
                    record(&shared, &mut r, t);
                    if !stopping && !args.idle {
                        encode(&args, &mut out, id, shared.now_ns());
                        outstanding += 1;
                    }
                }
            }
        }
    }
    r.missing = outstanding;
    r
}

/// Open loop: a writer on a fixed schedule, a reader timing from the
/// intended send time.
async fn open_loop(args: Arc<Args>, shared: Arc<Shared>, id: i64) -> Outcome {
    let mut r = Outcome::new();
    let Some(stream) = connect_or_count(&args, &shared, &mut r, id).await else { return r };
    let (mut rd, mut wr) = stream.into_split();
    let sent = Rc::new(Cell::new(0u64));
    let writer_done = Rc::new(Cell::new(false));
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let (a2, s2, sent2, done2) = (args.clone(), shared.clone(), sent.clone(), writer_done.clone());
    let writer = monoio::spawn(async move {
        // Sessions start spread over one interval, not all at once.
        let start = s2.epoch.elapsed() + interval.mul_f64((id as f64 * 0.618_034) % 1.0);
        let mut n = 0u64;
        let mut out = BytesMut::with_capacity(4096);
        while !s2.stop.load(Ordering::Relaxed) {
            let intended = start + interval.mul_f64(n as f64);
            let now = s2.epoch.elapsed();
            if intended > now {
                monoio::time::sleep(intended - now).await;
            }
            encode(&a2, &mut out, id, intended.as_nanos() as u64);
            let (res, b) = wr.write_all(out).await;
            out = b;
            out.clear();
            if res.is_err() {
                break;
            }
            n += 1;
            sent2.set(n);
        }
        done2.set(true);
        // Returned, not dropped: dropping the write half would half-close
        // the connection, which ends the session before its last replies.
        wr
    });
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut got = 0u64;
    loop {
        if writer_done.get() && got >= sent.get() {
            break;
        }
        if !fill(&mut rd, &mut inbuf).await {
            if !shared.stop.load(Ordering::Relaxed) {
                shared.error(&mut r);
            }
            break;
        }
        loop {
            match decode(&args, &mut inbuf) {
                None => {
                    shared.error(&mut r);
                    return r;
                }
                Some(None) => break,
                Some(Some(t)) => {
                    got += 1;
                    record(&shared, &mut r, t);
                }
            }
        }
    }
    let _wr = writer.await;
    r.missing = sent.get().saturating_sub(got);
    r
}

/// Churn: connect, one frame, reply, close; repeat until the end.
async fn churn(args: Arc<Args>, shared: Arc<Shared>, id: i64) -> Outcome {
    let mut r = Outcome::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut s = match connect(&args).await {
            Ok(s) => s,
            Err(_) => {
                shared.error(&mut r);
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut out = BytesMut::new();
        let t = shared.now_ns();
        encode(&args, &mut out, id, t);
        let (res, _) = s.write_all(out).await;
        if res.is_err() {
            shared.error(&mut r);
            continue;
        }
        let mut inbuf = BytesMut::with_capacity(1024);
        let ok = loop {
            if !fill(&mut s, &mut inbuf).await {
                break false;
            }
            match decode(&args, &mut inbuf) {
                Some(Some(t)) => {
                    record(&shared, &mut r, t);
                    break true;
                }
                Some(None) => continue,
                None => break false,
            }
        };
        if !ok {
            shared.error(&mut r);
        } else if shared.measuring.load(Ordering::Relaxed) {
            r.sessions += 1;
            shared.sessions_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

fn run_thread(args: Arc<Args>, shared: Arc<Shared>, ids: std::ops::Range<usize>) -> Outcome {
    let ring = args.ring;
    let work = async move {
        let handles: Vec<_> = ids
            .map(|i| {
                let (a, s, id) = (args.clone(), shared.clone(), i as i64 + 1);
                monoio::spawn(async move {
                    if a.churn {
                        churn(a, s, id).await
                    } else if a.rate > 0.0 && !a.idle {
                        open_loop(a, s, id).await
                    } else {
                        closed_loop(a, s, id).await
                    }
                })
            })
            .collect();
        let mut total = Outcome::new();
        for h in handles {
            total.add(&h.await);
        }
        total
    };
    match ring {
        Ring::Plain => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(work),
        Ring::Tuned => {
            let mut b = io_uring::IoUring::builder();
            b.setup_single_issuer().setup_coop_taskrun().setup_defer_taskrun();
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .uring_builder(b)
                .build()
                .expect("io_uring runtime with COOP_TASKRUN | DEFER_TASKRUN (Linux 6.1+)")
                .block_on(work)
        }
    }
}

/// The load generator's own io_uring setup.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Ring {
    /// monoio's default ring (io_uring, epoll where refused).
    Plain,
    /// `SINGLE_ISSUER | COOP_TASKRUN | DEFER_TASKRUN`, as the gateway's
    /// workers: completions for this thread's sockets run when it asks for
    /// them, so a server's `send` does not interrupt it (no IPI to run the
    /// task work).
    Tuned,
}

fn main() {
    let args = Arc::new(Args::parse());
    match tls_connector(&args) {
        Ok(t) => {
            let _ = TLS.set(t);
        }
        Err(e) => {
            eprintln!("gw-load: {e}");
            std::process::exit(2);
        }
    }
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        replies: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        sessions_done: AtomicU64::new(0),
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
    let (mut last, mut last_s) = (0, 0);
    while t0.elapsed().as_secs_f64() < args.duration {
        let left = (args.duration - t0.elapsed().as_secs_f64()).max(0.0);
        std::thread::sleep(Duration::from_secs(1).min(Duration::from_secs_f64(left)));
        let n = shared.replies.load(Ordering::Relaxed);
        let s = shared.sessions_done.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] {:>10} msgs/s {:>8} sessions/s  errors {}",
            t0.elapsed().as_secs_f64(),
            n - last,
            s - last_s,
            shared.errors.load(Ordering::Relaxed)
        );
        (last, last_s) = (n, s);
    }
    shared.measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::SeqCst);
    let mut total = Outcome::new();
    for t in threads {
        total.add(&t.join().unwrap());
    }
    let rate = total.replies as f64 / elapsed;
    let churn_rate = total.sessions as f64 / elapsed;
    let h = &total.hist;
    let q = |p: f64| h.value_at_quantile(p);
    let kind = if args.churn {
        "churn"
    } else if args.idle {
        "idle"
    } else if args.rate > 0.0 {
        "open"
    } else {
        "closed"
    };
    println!(
        "{}: {kind} mode={:?}{} sessions={} inflight={} rate={} payload={} => {:.0} msgs/s {:.0} sessions/s  p50={}us p90={}us p99={}us p99.9={}us max={}us  replies={} missing={} errors={}",
        args.label,
        args.mode,
        match (args.ws, args.tls) {
            (true, true) => "+wss",
            (true, false) => "+ws",
            (false, true) => "+tls",
            (false, false) => "",
        },
        args.sessions,
        args.inflight,
        args.rate,
        args.payload,
        rate,
        churn_rate,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        h.max(),
        total.replies,
        total.missing,
        total.errors
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "label": args.label, "kind": kind, "mode": format!("{:?}", args.mode).to_lowercase(), "ws": args.ws, "tls": args.tls,
                "sessions": args.sessions, "inflight": args.inflight, "rate": args.rate, "payload": args.payload,
                "seconds": elapsed, "msgs_per_sec": rate, "sessions_per_sec": churn_rate,
                "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": h.max(),
                "replies": total.replies, "missing": total.missing, "errors": total.errors,
            })
        );
    }
    if total.errors > 0 || total.missing > 0 {
        std::process::exit(1);
    }
}
