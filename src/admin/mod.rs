//! Admin HTTP on `server.admin_listen`: `/health`, `/ready`, `/metrics`,
//! `/status`, `POST /drain`. Runs on its own threads, never on a worker core;
//! requests ask the workers for their counters over their command channels
//! and read the control side's facts from the shared [`ControlStats`].
//! [`metrics`] turns both into Prometheus families.
//!
//! Serving: an accept thread hands every connection to a thread of its own,
//! at most [`MAX_CONNECTIONS`] at once (over that, after a short wait for a
//! free slot during a burst, and at once while the cap stays reached: `503`
//! and close). A request must arrive whole (head
//! and body) within [`REQUEST_DEADLINE`], not per read, and within
//! [`MAX_HEAD_BYTES`] / [`MAX_BODY_BYTES`], so a slow or huge client holds
//! one slot for a bounded time and never delays `/health` or `/ready`.
//! Worker counters are collected one request at a time ([`Flight`]): requests
//! arriving while a collection runs share its result, and concurrent
//! `/metrics` scrapes share one encoded body, so scrapes do not pile up on
//! the workers.
//!
//! Access: reads (`GET`, `HEAD`) are open. Any other method changes state
//! (today `POST /drain`); when `[admin] token_file` gives a token (required
//! off loopback) such a call needs `Authorization: Bearer <token>`: 401
//! without one, 403 with a wrong one, on every bind address. The token lives
//! in [`ControlStats`] so that a config reload replaces it.
//!
//! Arrows: this module reads `state` (shared with `control`) and the gateway
//! handle; it never imports `control`. A drain call is a [`ControlEvent`] on
//! the control loop's channel.

pub(crate) mod metrics;

use crate::config::AdminToken;
use crate::gateway::GatewayHandle;
use crate::state::{ControlEvent, ControlSender, ControlStats};
use crate::stats::WorkerStats;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Largest admin request head (request line and headers).
pub(crate) const MAX_HEAD_BYTES: usize = 8192;
/// Largest request body (read and ignored: no endpoint takes one).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// The whole request, head and body, must arrive within this.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Writing the answer may take at most this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once (one thread each). Counted in
/// [`crate::gateway::FD_RESERVE`].
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long a connection over the cap waits for a free slot before it goes
/// to the probe lane (not while the cap has been reached for a while: then
/// at once).
const SLOT_WAIT: Duration = Duration::from_millis(200);
/// Slots one peer address may hold at once: 64 slow clients from one address
/// took every slot, and `/health` answered 200 13 % of the time.
pub(crate) const MAX_PER_PEER: usize = 16;
/// Connections that find no slot get this long to send their request head
/// in the probe lane: a probe's request follows its handshake at once; a slow
/// client holds nothing there but an entry.
const PROBE_LANE_WAIT: Duration = Duration::from_millis(200);
/// Connections waiting in the probe lane at once; over it, `503` at once.
const PROBE_LANE_MAX: usize = 512;
/// The probe lane's poll turn: how long a new connection may wait to join.
const PROBE_LANE_TURN: Duration = Duration::from_millis(10);
/// Listen backlog of the admin port (a burst of scrapes waits here).
const ADMIN_BACKLOG: i32 = 1024;
/// Stack of a connection thread.
const CONN_STACK: usize = 256 * 1024;
/// An accept error counted this recently makes `/status` say the accepts fail.
const ACCEPT_ERROR_RECENT: Duration = Duration::from_secs(60);

/// One computation at a time: a caller arriving while one runs waits for it
/// and shares its result instead of starting another.
pub(crate) struct Flight<T> {
    state: Mutex<FlightState<T>>,
    done: Condvar,
}

struct FlightState<T> {
    running: bool,
    /// Completed computations.
    generation: u64,
    last: Option<Arc<T>>,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Flight { state: Mutex::new(FlightState { running: false, generation: 0, last: None }), done: Condvar::new() }
    }
}

impl<T> Flight<T> {
    /// The result of `f`, or of the run in flight when this was called.
    pub(crate) fn get(&self, f: impl FnOnce() -> T) -> Arc<T> {
        let mut s = self.state.lock().unwrap();
        if s.running {
            let seen = s.generation;
            s = self.done.wait_while(s, |s| s.running && s.generation == seen).unwrap();
            if s.generation != seen {
                if let Some(v) = &s.last {
                    return v.clone();
                }
            }
            // The run in flight failed (panicked): run our own.
        }
        s.running = true;
        drop(s);
        /// Ends the run even when `f` panics, so waiters never hang.
        struct Running<'a, T>(&'a Flight<T>, Option<Arc<T>>);
        impl<T> Drop for Running<'_, T> {
            fn drop(&mut self) {
                let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
                s.running = false;
                if let Some(v) = self.1.take() {
                    s.generation += 1;
                    s.last = Some(v);
                }
                self.0.done.notify_all();
            }
        }
        let mut run = Running(self, None);
        let v = Arc::new(f());
        run.1 = Some(v.clone());
        v
    }
}

/// The workers' counters for every admin request, collected one request at
/// a time; also notes when `accept_error` last went up (descriptors
/// exhausted), for `/status`.
pub(crate) struct WorkerStatsSource {
    pub(crate) handle: GatewayHandle,
    flight: Flight<Vec<Option<WorkerStats>>>,
    /// Accept errors over all workers, and when the count last went up.
    accept_errors: Mutex<(u64, Option<SystemTime>)>,
}

impl WorkerStatsSource {
    fn new(handle: GatewayHandle) -> WorkerStatsSource {
        WorkerStatsSource { handle, flight: Flight::default(), accept_errors: Mutex::new((0, None)) }
    }

    /// Per-worker counters (in worker order; `None`: did not answer in time).
    pub(crate) fn get(&self) -> Arc<Vec<Option<WorkerStats>>> {
        self.flight.get(|| {
            let per = self.handle.worker_stats();
            let total: u64 =
                per.iter().flatten().map(|s| WorkerStats::get(&s.connection_rejected, "accept_error")).sum();
            let mut seen = self.accept_errors.lock().unwrap();
            if total > seen.0 {
                *seen = (total, Some(SystemTime::now()));
            }
            per
        })
    }

    /// Accept errors so far and when the count last went up.
    fn accept_errors(&self) -> (u64, Option<SystemTime>) {
        *self.accept_errors.lock().unwrap()
    }
}

/// Free connection slots.
struct Slots {
    /// Slots taken, in all and per peer address.
    active: Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
    freed: Condvar,
}

/// One slot, given back when the connection's thread ends.
struct Slot(Arc<Slots>, std::net::IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.0.active.lock().unwrap_or_else(|p| p.into_inner());
        a.0 -= 1;
        if let Some(n) = a.1.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                a.1.remove(&self.1);
            }
        }
        drop(a);
        self.0.freed.notify_one();
    }
}

impl Slots {
    fn new() -> Arc<Slots> {
        Arc::new(Slots { active: Mutex::new((0, Default::default())), freed: Condvar::new() })
    }

    /// A slot for `peer`, waiting up to `wait` for one: at most
    /// [`MAX_CONNECTIONS`] in all and [`MAX_PER_PEER`] for one address.
    fn take(self: &Arc<Slots>, peer: std::net::IpAddr, wait: Duration) -> Option<Slot> {
        let full = |a: &mut (usize, std::collections::HashMap<std::net::IpAddr, usize>)| {
            a.0 >= MAX_CONNECTIONS || a.1.get(&peer).is_some_and(|n| *n >= MAX_PER_PEER)
        };
        let active = self.active.lock().unwrap();
        let (mut active, _) = self.freed.wait_timeout_while(active, wait, |a| full(a)).unwrap();
        if full(&mut active) {
            return None;
        }
        active.0 += 1;
        *active.1.entry(peer).or_default() += 1;
        Some(Slot(self.clone(), peer))
    }
}

/// What the admin endpoints report from and where `POST /drain` goes.
pub struct AdminState {
    workers: Arc<WorkerStatsSource>,
    /// Concurrent `/metrics` scrapes share one encoded body.
    metrics_body: Flight<String>,
    /// The config file, for `/status`.
    config_source: String,
    /// Written by the control loop (readiness, routes, Redis, reloads).
    control: Arc<ControlStats>,
    /// Holds the [`metrics::GatewayCollector`], the process collector
    /// (`process_*`) and the handler's own metrics below.
    registry: prometheus::Registry,
    /// `promhttp_metric_handler_requests_total{code}`: `/metrics` responses
    /// served, as the Go client library counts them (after the response, so
    /// a scrape does not count itself).
    scrapes: prometheus::IntCounterVec,
    /// `promhttp_metric_handler_requests_in_flight`: scrapes being served
    /// (1 in any single scrape's own output).
    scrapes_in_flight: prometheus::IntGauge,
    /// Where `POST /drain` goes; `None` without a control loop.
    control_tx: Option<ControlSender>,
    /// Refused admin calls: when one was last logged, and how many since.
    refusals_logged: Mutex<(Option<Instant>, u64)>,
}

impl AdminState {
    pub fn new(
        handle: GatewayHandle,
        config_source: String,
        control: Arc<ControlStats>,
        control_tx: Option<ControlSender>,
    ) -> AdminState {
        let registry = prometheus::Registry::new();
        let workers = Arc::new(WorkerStatsSource::new(handle));
        let collector = metrics::GatewayCollector { workers: workers.clone(), control: control.clone() };
        let scrapes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(metrics::PROMHTTP_REQUESTS_TOTAL, "Total number of scrapes by HTTP status code."),
            &["code"],
        )
        .expect("valid metric");
        // The codes the Go client library pre-creates at zero.
        for code in ["200", "500", "503"] {
            scrapes.with_label_values(&[code]);
        }
        let scrapes_in_flight =
            prometheus::IntGauge::new(metrics::PROMHTTP_REQUESTS_IN_FLIGHT, "Current number of scrapes being served.")
                .expect("valid metric");
        let process = prometheus::process_collector::ProcessCollector::for_self();
        let collectors: [Box<dyn prometheus::core::Collector>; 4] =
            [Box::new(collector), Box::new(process), Box::new(scrapes.clone()), Box::new(scrapes_in_flight.clone())];
        for c in collectors {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "metrics collector not registered");
            }
        }
        AdminState {
            workers,
            metrics_body: Flight::default(),
            config_source,
            control,
            registry,
            scrapes,
            scrapes_in_flight,
            control_tx,
            refusals_logged: Mutex::new((None, 0)),
        }
    }

    /// Logs a refused state-changing call, at most once a second (the rest
    /// are counted in the next line's `suppressed`).
    fn log_refusal(&self, refusal: AuthRefusal, method: &str, path: &str, peer: Option<SocketAddr>) {
        let mut last = self.refusals_logged.lock().unwrap();
        let now = Instant::now();
        if last.0.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            last.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut last.1);
        last.0 = Some(now);
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::warn!(method, path, peer, reason = refusal.as_str(), suppressed, "admin call refused");
    }
}

/// Binds and serves on background threads; returns the bound address.
pub fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<SocketAddr> {
    let listener = bind(addr)?;
    let local = listener.local_addr()?;
    let slots = Slots::new();
    let (lane_tx, lane_rx) = crossbeam_channel::bounded::<TcpStream>(PROBE_LANE_MAX);
    {
        let state = state.clone();
        std::thread::Builder::new().name("gw-admin-probes".into()).spawn(move || probe_lane(lane_rx, &state))?;
    }
    std::thread::Builder::new().name("gw-admin".into()).spawn(move || {
        let mut busy_logged: Option<Instant> = None;
        let mut last_refusal: Option<Instant> = None;
        for conn in listener.incoming() {
            let c = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // A burst waits briefly for a slot; while the cap stays reached
            // (a refusal in the last second) the answer is 503 at once.
            let saturated = last_refusal.is_some_and(|t: Instant| t.elapsed() < Duration::from_secs(1));
            let peer = c.peer_addr().map(|p| p.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            let Some(slot) = slots.take(peer, if saturated { Duration::ZERO } else { SLOT_WAIT }) else {
                last_refusal = Some(Instant::now());
                if busy_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    busy_logged = Some(Instant::now());
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        per_peer = MAX_PER_PEER,
                        peer = %peer,
                        "admin connections at their cap: probes answered in the probe lane, the rest 503"
                    );
                }
                // Probes still get through: /health and /ready are answered
                // there from memory; anything else gets its 503.
                if let Err(e) = lane_tx.try_send(c) {
                    refuse_busy(e.into_inner());
                }
                continue;
            };
            let state = state.clone();
            let handed_over = state.control.handed_over.load(Ordering::Relaxed);
            let spawned =
                std::thread::Builder::new().name("gw-admin-conn".into()).stack_size(CONN_STACK).spawn(move || {
                    let _slot = slot;
                    if let Err(e) = handle(c, &state) {
                        tracing::debug!(error = %e, "admin request failed");
                    }
                });
            if let Err(e) = spawned {
                // The connection (and its slot) went with the closure.
                tracing::warn!(error = %e, "cannot start an admin connection thread");
            }
            if handed_over {
                // A live upgrade's successor answers on this port now (it
                // shares it with SO_REUSEPORT): stop taking connections.
                tracing::info!("live upgrade: admin listener closed; the new process answers");
                break;
            }
        }
    })?;
    tracing::info!(admin = %local, "admin endpoints listening");
    Ok(local)
}

/// The admin listener, with a backlog for bursts of scrapes.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    // A new process taking over in a live upgrade binds the same port while
    // the old one still answers (the health checks never see it closed).
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(ADMIN_BACKLOG)?;
    Ok(sock.into())
}

/// Over the connection cap: `503` at once, then close.
fn refuse_busy(mut c: TcpStream) {
    // Never blocks the accept thread: a full send buffer drops the answer.
    let _ = c.set_nonblocking(true);
    let _ = respond_with(&mut c, 503, "text/plain", "Retry-After: 1\r\n", "admin busy\n");
    let _ = c.shutdown(Shutdown::Write);
    // Take what the request already sent, so closing does not reset the answer.
    let _ = c.read(&mut [0u8; 4096]);
}

/// Why a request was not read whole.
enum ReadError {
    /// The peer closed (or reset) first: nothing to answer.
    Closed,
    /// Not whole within [`REQUEST_DEADLINE`]: 408.
    Timeout,
    /// Head over [`MAX_HEAD_BYTES`]: 431.
    HeadTooLarge,
    /// Body over [`MAX_BODY_BYTES`]: 413.
    BodyTooLarge,
    /// Not HTTP, or a body we do not take (chunked): 400.
    Bad,
}

/// A request read whole.
struct Request {
    method: String,
    path: String,
    authorization: Option<Vec<u8>>,
}

/// One read before `deadline`; `Ok(0)` at EOF.
fn read_until(c: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Timeout);
    }
    c.set_read_timeout(Some(left)).map_err(|_| ReadError::Closed)?;
    match c.read(buf) {
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(ReadError::Timeout)
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(read_until(c, buf, deadline)?),
        Err(_) => Err(ReadError::Closed),
    }
}

/// Reads the head and any body, all before `deadline`.
fn read_request(c: &mut TcpStream, deadline: Instant) -> Result<Request, ReadError> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Err(ReadError::HeadTooLarge);
        }
        let r = read_until(c, &mut buf[n..], deadline)?;
        if r == 0 {
            return Err(ReadError::Closed);
        }
        n += r;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
            Err(_) => return Err(ReadError::Bad),
        };
        let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        if header("transfer-encoding").is_some() {
            return Err(ReadError::Bad);
        }
        let body_len = match header("content-length") {
            None => 0,
            Some(v) => {
                std::str::from_utf8(v).ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or(ReadError::Bad)?
            }
        };
        if body_len > MAX_BODY_BYTES {
            return Err(ReadError::BodyTooLarge);
        }
        let request = Request {
            method: req.method.unwrap_or("GET").to_string(),
            path: req.path.unwrap_or("/").to_string(),
            authorization: header("authorization").map(<[u8]>::to_vec),
        };
        // The body is read (so that closing does not reset the answer) and ignored.
        let mut left = body_len.saturating_sub(n - head_len);
        while left > 0 {
            let r = read_until(c, &mut buf[..left.min(MAX_HEAD_BYTES)], deadline)?;
            if r == 0 {
                return Err(ReadError::Closed);
            }
            left -= r;
        }
        return Ok(request);
    }
}

/// `%XX` and `+` decoding of a query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(h) => {
                        out.push(h);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The probes' answers, from memory only (no worker is asked): what both the
/// connection threads and the probe lane serve.
/// - `/health`, liveness: every worker turned its loop recently (its
///   heartbeat); no command channel or queue is involved, so a storm of
///   announcements or a slow scrape cannot make it lie;
/// - `/ready`: routes loaded and not draining.
fn probe_answer(path: &str, state: &AdminState) -> Option<(u16, String)> {
    match path {
        "/health" if state.control.handed_over.load(Ordering::Relaxed) => Some((200, "handed over\n".into())),
        "/health" => {
            let stuck = state.workers.handle.heartbeats().stuck();
            if stuck.is_empty() {
                Some((200, "ok\n".into()))
            } else {
                let which: Vec<String> = stuck
                    .iter()
                    .map(|(w, age)| format!("worker {w}: no loop turn for {:.1} s", age.as_secs_f64()))
                    .collect();
                Some((503, format!("{}\n", which.join("; "))))
            }
        }
        "/ready" if state.control.ready.load(Ordering::Relaxed) => Some((200, "ready\n".into())),
        "/ready" => Some((503, "not ready\n".into())),
        _ => None,
    }
}

/// Serves connections that found no slot: each gets [`PROBE_LANE_WAIT`] to
/// send a whole request head; `GET`/`HEAD` `/health` or `/ready` is answered
/// here (tiny answers, written without waiting), anything else `503 admin
/// busy`. One thread polls them all, so a slow client costs it an entry,
/// never a wait: probes get through however many slow clients hold slots.
fn probe_lane(rx: crossbeam_channel::Receiver<TcpStream>, state: &AdminState) {
    use std::os::fd::AsRawFd;
    let mut pending: Vec<(TcpStream, Instant, Vec<u8>)> = Vec::new();
    let join = |pending: &mut Vec<(TcpStream, Instant, Vec<u8>)>, c: TcpStream| {
        if pending.len() >= PROBE_LANE_MAX || c.set_nonblocking(true).is_err() {
            refuse_busy(c);
        } else {
            pending.push((c, Instant::now() + PROBE_LANE_WAIT, Vec::new()));
        }
    };
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(c) => join(&mut pending, c),
                Err(_) => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            join(&mut pending, c);
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(c, ..)| libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is an array of `fds.len()` pollfd entries whose
        // descriptors `pending` owns (open) for the whole call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, PROBE_LANE_TURN.as_millis() as i32) };
        let now = Instant::now();
        let mut keep = Vec::with_capacity(pending.len());
        for ((mut c, deadline, mut buf), fd) in pending.drain(..).zip(&fds) {
            if fd.revents != 0 {
                let mut chunk = [0u8; 2048];
                match c.read(&mut chunk) {
                    // Gone: nothing to answer.
                    Ok(0) => continue,
                    Ok(n) if buf.len() + n <= MAX_HEAD_BYTES => buf.extend_from_slice(&chunk[..n]),
                    Ok(_) => {
                        refuse_busy(c);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => continue,
                }
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(_)) => {
                        let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
                        let probe = matches!(req.method, Some("GET") | Some("HEAD"));
                        match probe.then(|| probe_answer(path, state)).flatten() {
                            Some((code, body)) => {
                                let _ = respond_with(&mut c, code, "text/plain", "", &body);
                                let _ = c.shutdown(Shutdown::Write);
                            }
                            None => refuse_busy(c),
                        }
                        continue;
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => {
                        refuse_busy(c);
                        continue;
                    }
                }
            }
            if now >= deadline {
                refuse_busy(c);
            } else {
                keep.push((c, deadline, buf));
            }
        }
        pending = keep;
    }
}

fn handle(mut c: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let Request { method, path, authorization } = match read_request(&mut c, deadline) {
        Ok(r) => r,
        Err(ReadError::Closed) => return Ok(()),
        Err(e) => {
            let (code, body) = match e {
                ReadError::Closed => return Ok(()),
                ReadError::Timeout => (408, "request not complete in time\n"),
                ReadError::HeadTooLarge => (431, "request head too large\n"),
                ReadError::BodyTooLarge => (413, "request body too large\n"),
                ReadError::Bad => (400, "bad request\n"),
            };
            respond(&mut c, code, "text/plain", body)?;
            // What the client still sends is read (briefly, boundedly) and
            // dropped, so that closing does not reset the answer away.
            let _ = c.shutdown(Shutdown::Write);
            let until = Instant::now() + Duration::from_millis(200);
            let mut sink = [0u8; 8192];
            let mut budget = MAX_BODY_BYTES;
            while budget > 0 {
                match read_until(&mut c, &mut sink, until) {
                    Ok(n) if n > 0 => budget = budget.saturating_sub(n),
                    _ => break,
                }
            }
            return Ok(());
        }
    };
    let (path, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    if changes_state(&method) {
        let token = state.control.admin_token.lock().unwrap().clone();
        if let Some(token) = token {
            match authorize(&token, authorization.as_deref()) {
                Ok(()) => {}
                Err(refusal) => {
                    state.log_refusal(refusal, &method, path, c.peer_addr().ok());
                    return match refusal {
                        AuthRefusal::Missing => respond_with(
                            &mut c,
                            401,
                            "text/plain",
                            "WWW-Authenticate: Bearer realm=\"game-gateway admin\"\r\n",
                            "bearer token required\n",
                        ),
                        AuthRefusal::Wrong => respond(&mut c, 403, "text/plain", "wrong token\n"),
                    };
                }
            }
        }
    }
    if path == "/broadcast" {
        if method != "POST" {
            return respond(&mut c, 405, "text/plain", "use POST\n");
        }
        // POST /broadcast?msg_id=900&payload=text[&world=3|&server_type=10|&tag=vip]
        let mut fields = serde_json::Map::new();
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let v = percent_decode(v);
            let value = match k {
                "payload" | "tag" => serde_json::Value::String(v),
                _ => v.parse::<u64>().map(serde_json::Value::from).unwrap_or(serde_json::Value::String(v)),
            };
            fields.insert(k.to_string(), value);
        }
        let json = serde_json::Value::Object(fields).to_string();
        return match crate::state::parse_announcement(json.as_bytes()) {
            Ok(a) => {
                let all = state.workers.handle.workers().len();
                let taken = state.workers.handle.announce(Arc::new(a), crate::relay::Source::Admin);
                tracing::debug!(workers = taken, "announcement from the admin port");
                if taken == all {
                    respond(&mut c, 202, "text/plain", "announced\n")
                } else {
                    // Some workers' queues were full: said, not silent.
                    respond(
                        &mut c,
                        503,
                        "text/plain",
                        &format!("announced on {taken} of {all} workers: announcement queues full\n"),
                    )
                }
            }
            Err(e) => respond(&mut c, 400, "text/plain", &format!("{e}\n")),
        };
    }
    match path {
        "/drain" if method == "POST" => match &state.control_tx {
            Some(tx) if tx.send(ControlEvent::Drain).is_ok() => respond(&mut c, 202, "text/plain", "draining\n"),
            _ => respond(&mut c, 503, "text/plain", "no control loop\n"),
        },
        "/drain" => respond(&mut c, 405, "text/plain", "use POST\n"),
        "/health" | "/ready" => {
            let (code, body) = probe_answer(path, state).unwrap_or((404, "not found\n".into()));
            respond(&mut c, code, "text/plain", &body)
        }
        "/metrics" => {
            state.scrapes_in_flight.inc();
            let body = state.metrics_body.get(|| metrics::encode(&state.registry.gather()));
            state.scrapes_in_flight.dec();
            let r = respond(&mut c, 200, prometheus::TEXT_FORMAT, &body);
            state.scrapes.with_label_values(&["200"]).inc();
            r
        }
        "/status" => {
            let per = state.workers.get();
            let workers: Vec<_> = state
                .workers
                .handle
                .workers()
                .iter()
                .zip(per.iter())
                .map(|(i, s)| {
                    serde_json::json!({
                        "worker": i.index,
                        "cpu": i.cpu,
                        "numa_node": i.numa_node,
                        "io_driver": i.io_driver,
                        "responsive": s.is_some(),
                        "sessions": s.as_ref().map(|s| s.sessions_active),
                        "connections_total": s.as_ref().map(|s| s.connections_total),
                        "connections_rejected": s.as_ref().map(|s| s.connection_rejected.values().sum::<u64>()),
                        "accept_errors": s.as_ref().map(|s| WorkerStats::get(&s.connection_rejected, "accept_error")),
                        "messages_in": s.as_ref().map(|s| s.messages_in.iter().sum::<u64>()),
                        "messages_out": s.as_ref().map(|s| s.messages_out.iter().sum::<u64>()),
                        "routing_errors": s.as_ref().map(|s| s.routing_errors.values().sum::<u64>()),
                        "sessions_closed": s.as_ref().map(|s| s.sessions_closed.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>()),
                        "backends": s.as_ref().map(|s| s.backends.iter().map(|(k, b)| (k.to_string(), serde_json::json!({
                            "connections_up": b.connections_active,
                            "sessions_bound": b.sessions_bound,
                            "circuit": metrics::circuit_name(b.circuit_state),
                            "frames_sent": b.frames_sent,
                            "frames_received": b.frames_received,
                        }))).collect::<serde_json::Map<_, _>>()),
                        "route_version": s.as_ref().map(|s| s.route_version),
                        "route_applied_at_unix_us": s.as_ref().map(|s| s.route_applied_unix_us).filter(|t| *t != 0),
                        "route_apply_delay_ms": s.as_ref().filter(|s| s.route_applied_unix_us != 0).map(|s| s.route_apply_delay_us as f64 / 1e3),
                    })
                })
                .collect();
            let ctl = &state.control;
            let last_error = ctl.last_error.lock().unwrap().clone();
            let unix = |t: u64| if t == 0 { serde_json::Value::Null } else { t.into() };
            let (accept_errors, accept_error_at) = state.workers.accept_errors();
            let accept_error_at = accept_error_at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
            let recent = accept_error_at.is_some_and(|t| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .is_ok_and(|now| now.saturating_sub(t) < ACCEPT_ERROR_RECENT)
            });
            let fd = *ctl.fd_budget.lock().unwrap();
            let connections = serde_json::json!({
                "max_connections": fd.map(|b| b.configured_max_connections),
                "effective_max_connections": fd.map(|b| b.effective_max_connections),
                "lowered_to_fit_open_file_limit": fd.map(|b| b.lowered()),
                "open_file_limit": fd.map(|b| b.soft),
                "open_file_limit_hard": fd.map(|b| b.hard),
                "open_file_limit_raised_from": fd.and_then(|b| b.raised_from),
                "backend_connections_estimate": fd.map(|b| b.backend_estimate),
                "reserved_descriptors": fd.map(|b| b.reserve),
                "open_descriptors": open_descriptors(),
                "accept_errors": accept_errors,
                "accept_error_last_unix": accept_error_at.map(|t| t.as_secs()),
                "accept_failing": recent,
            });
            let body = serde_json::json!({
                "ready": ctl.ready.load(Ordering::Relaxed),
                "draining": ctl.draining.load(Ordering::Relaxed),
                "config": { "file": state.config_source, "loaded_at_unix": ctl.config_loaded_at.load(Ordering::Relaxed),
                            "reloads": ctl.config_reloads.load(Ordering::Relaxed), "reload_errors": ctl.config_reload_errors.load(Ordering::Relaxed) },
                "routes": { "version": ctl.route_version.load(Ordering::Relaxed), "source": ctl.route_source.lock().unwrap().to_string(),
                            "redis": ctl.redis_state.load().as_str(),
                            "redis_empty_reads": ctl.refresh_empty.load(Ordering::Relaxed),
                            "last_error": last_error.message,
                            "last_error_source": (last_error.at_unix != 0).then(|| last_error.source.as_str()),
                            "last_error_at_unix": unix(last_error.at_unix),
                            "last_error_cleared_at_unix": unix(last_error.cleared_at_unix) },
                "connections": connections,
                "discovery": ctl.discovery_json(),
                "workers": workers,
                "upgrade": crate::upgrade::status(),
            });
            respond(&mut c, 200, "application/json", &format!("{body:#}\n"))
        }
        _ => respond(&mut c, 404, "text/plain", "not found\n"),
    }
}

/// Descriptors the process has open now (`/proc/self/fd`), when readable.
fn open_descriptors() -> Option<u64> {
    // The directory handle itself is one of the entries.
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count().saturating_sub(1) as u64)
}

/// Requests that change the gateway's state (anything but reads): with a
/// token configured they need `Authorization: Bearer <token>`.
fn changes_state(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD")
}

/// Why a state-changing request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthRefusal {
    /// No `Authorization: Bearer` header: 401.
    Missing,
    /// A bearer token that is not the configured one: 403.
    Wrong,
}

impl AuthRefusal {
    fn as_str(self) -> &'static str {
        match self {
            AuthRefusal::Missing => "no bearer token",
            AuthRefusal::Wrong => "wrong bearer token",
        }
    }
}

/// Checks an `Authorization` header value against the token (the scheme is
/// case-insensitive; the token is compared in constant time).
fn authorize(token: &AdminToken, header: Option<&[u8]>) -> Result<(), AuthRefusal> {
    let value = header.map(<[u8]>::trim_ascii).ok_or(AuthRefusal::Missing)?;
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthRefusal::Missing);
    }
    let presented = rest.trim_ascii();
    if presented.is_empty() {
        return Err(AuthRefusal::Missing);
    }
    if token.matches(presented) {
        Ok(())
    } else {
        Err(AuthRefusal::Wrong)
    }
}

fn respond(c: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    respond_with(c, code, ctype, "", body)
}

/// An answer with `extra` header lines (each ending in CRLF).
fn respond_with(c: &mut TcpStream, code: u16, ctype: &str, extra: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    // The whole answer within WRITE_TIMEOUT, however slowly the client reads.
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut part = &out[..];
    while !part.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        c.set_write_timeout(Some(left))?;
        match c.write(part) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => part = &part[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let t = AdminToken::new("s3cret-token");
        assert_eq!(authorize(&t, None), Err(AuthRefusal::Missing));
        assert_eq!(authorize(&t, Some(b"")), Err(AuthRefusal::Missing));
        assert_eq!(authorize(&t, Some(b"Basic czNjcmV0")), Err(AuthRefusal::Missing));
        assert_eq!(authorize(&t, Some(b"Bearer")), Err(AuthRefusal::Missing));
        assert_eq!(authorize(&t, Some(b"Bearer  ")), Err(AuthRefusal::Missing));
        assert_eq!(authorize(&t, Some(b"Bearer s3cret-tokeN")), Err(AuthRefusal::Wrong));
        assert_eq!(authorize(&t, Some(b"Bearer s3cret-token-and-more")), Err(AuthRefusal::Wrong));
        assert_eq!(authorize(&t, Some(b"Bearer s3cret")), Err(AuthRefusal::Wrong));
        assert_eq!(authorize(&t, Some(b"Bearer s3cret-token")), Ok(()));
        assert_eq!(authorize(&t, Some(b"bearer s3cret-token ")), Ok(()), "scheme is case-insensitive");
        assert!(changes_state("POST") && changes_state("DELETE") && changes_state("PUT"));
        assert!(!changes_state("GET") && !changes_state("HEAD"));
    }

    #[test]
    fn a_flight_shares_one_run_between_concurrent_callers() {
        let f = Arc::new(Flight::<u64>::default());
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (f, runs) = (f.clone(), runs.clone());
                std::thread::spawn(move || {
                    *f.get(|| {
                        std::thread::sleep(Duration::from_millis(200));
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Callers that arrive while a run is in flight share it; only one
        // that comes after it ended starts another.
        assert!(runs.load(Ordering::SeqCst) <= 2, "{} runs for 16 concurrent callers", runs.load(Ordering::SeqCst));
        // A panicking run does not wedge the next caller.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.get(|| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(*f.get(|| 7), 7);
    }

    #[test]
    fn admin_connections_fit_the_descriptor_reserve() {
        assert!(MAX_CONNECTIONS as u64 + 64 <= crate::gateway::FD_RESERVE);
    }

    #[test]
    fn the_token_never_prints() {
        let t = AdminToken::new("s3cret-token");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(t.matches(b"s3cret-token") && !t.matches(b"s3cret-token\n") && !t.matches(b""));
    }
}
