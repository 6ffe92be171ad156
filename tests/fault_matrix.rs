//! Fault matrix: the real gateway binary (2 workers) between tagged clients
//! and ledger backends, one fault per case, over loopback sockets.
//!
//! Every case checks the frame ledger (`faultproxy/observe.rs`):
//! - no frame lost without being counted: every client frame the gateway
//!   read reached a backend, or is counted in `frames_dropped_total`, or was
//!   lost inside a backend that crashed / a path that was cut (only where the
//!   case allows it: no gateway can know those); every reply a backend wrote
//!   reached the client's queue or is counted; per session, a client that
//!   closed by itself had everything it sent read, and a client that read to
//!   the end got every reply the gateway queued for it;
//! - nothing delivered to the wrong session: payloads carry the session's
//!   tag and a sequence number, checked by every client and every backend;
//! - memory bounded (the gateway's VmRSS, sampled every 50 ms) and
//!   descriptors returned;
//! - detection / recovery times measured and printed, one row per case:
//!   `cargo test --test fault_matrix -- --nocapture 2>&1 | grep FAULT-MATRIX`.
//!
//! A case that finds a gateway bug keeps asserting the right behaviour and is
//! `#[ignore = "BUG: ..."]`.

mod common;
mod faultproxy;

use common::{config_text, route, sid, GatewayProcess, RedisServer as Redis};
use faultproxy::backend::{BackendCounts, BackendProc, LedgerBackend, C};
use faultproxy::load::{self, Case, End, Load, SessionLedger, Spec};
use faultproxy::observe::{self, metrics, ms, wait, Allow, Sampler, Tally, Timing};
use faultproxy::proxy::FaultProxy;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The test that, in a re-executed copy of this binary, is the backend process.
const ROLE_TEST: &str = "zz_backend_process_role";

/// Not a case: the body of the child process of [`BackendProc`] (a no-op
/// when run as a test).
#[test]
fn zz_backend_process_role() {
    faultproxy::backend::child_role();
}

/// Fast failure detection and redial, so cases stay short.
const FAST: &str = "[backend]\nreconnect_backoff_min = \"20ms\"\nreconnect_backoff_max = \"200ms\"\ndial_timeout = \"300ms\"\nkeepalive_interval = \"500ms\"\nkeepalive_timeout = \"500ms\"\ncircuit_failure_threshold = 5\ncircuit_open_duration = \"500ms\"\n";
const REBIND: &str = "on_backend_loss = \"rebind\"";

fn sid10() -> u32 {
    sid(1, 10, 0)
}

fn sleep_ms(n: u64) {
    std::thread::sleep(Duration::from_millis(n));
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Time (ms) until `f` holds, polling, up to `within`.
fn until(within: Duration, f: impl FnMut() -> bool) -> Option<f64> {
    let t0 = Instant::now();
    wait(within, f).then(|| ms(t0.elapsed()))
}

fn sum_where(mm: &std::collections::HashMap<String, f64>, name: &str, labels: &[&str]) -> u64 {
    mm.iter()
        .filter(|(k, _)| {
            k.strip_prefix(name).is_some_and(|r| r.starts_with('{')) && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

fn backend_errors(admin: SocketAddr, kind: &str) -> u64 {
    sum_where(&metrics(admin), "game_gateway_backend_errors_total", &[&format!("type=\"{kind}\"")])
}

fn any_backend_loss(admin: SocketAddr) -> u64 {
    ["closed_by_backend", "read_failed", "write_failed", "keepalive_timeout", "dial_failed", "dial_timeout"]
        .iter()
        .map(|k| backend_errors(admin, k))
        .sum()
}

fn ready(admin: SocketAddr) -> u16 {
    observe::try_get(admin, "/ready").map(|x| x.0).unwrap_or(0)
}

/// A gateway process under a case, with its RSS/fd sampler.
struct Rig {
    gw: GatewayProcess,
    case: Arc<Case>,
    sampler: Sampler,
}

impl Rig {
    fn start(name: &'static str, extra: &str, routes: &str) -> Rig {
        Self::with_config(name, &config_text(2, extra, routes))
    }

    fn with_config(name: &'static str, cfg: &str) -> Rig {
        let gw = GatewayProcess::spawn(cfg, &[]);
        assert!(wait(Duration::from_secs(5), || ready(gw.admin) == 200), "gateway not ready: {}", gw.stderr());
        let sampler = Sampler::start(gw.child.id());
        Rig { gw, case: Case::new(name), sampler }
    }

    fn admin(&self) -> SocketAddr {
        self.gw.admin
    }

    fn now_ns(&self) -> u64 {
        self.case.now_ns()
    }

    /// Settles, tallies and prints the case's row; returns the tally (the
    /// caller asserts) and the gateway (kept alive until then).
    fn finish(
        self,
        backends: &dyn Fn() -> BackendCounts,
        timing: Timing,
        allow: Allow,
        note: &str,
    ) -> (Tally, GatewayProcess) {
        let Rig { gw, case, sampler } = self;
        let pid = gw.child.id();
        let out = || gw.stdout_text();
        let mut t = observe::tally(&case, gw.admin, pid, &out, backends, sampler, timing, allow);
        t.note = note.to_string();
        eprintln!("{}", t.row());
        (t, gw)
    }
}

/// Fails the case with its problems (and the gateway's last log lines).
fn check(t: &Tally, gw: &GatewayProcess) {
    ensure(t.problems.is_empty(), &format!("case {}: {}\n{}", t.case, t.problems.join("\n"), t.row()), gw);
}

/// Asserts `ok`; on failure prints the gateway's log (the last lines, or all
/// of it with FAULT_MATRIX_LOG=1).
fn ensure(ok: bool, what: &str, gw: &GatewayProcess) {
    if !ok {
        let err = gw.stderr();
        let n = if std::env::var("FAULT_MATRIX_LOG").is_ok() { usize::MAX } else { 20 };
        let tail: Vec<&str> = err.lines().rev().take(n).collect();
        panic!(
            "{what}\n--- gateway stderr (last lines) ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

fn resume_after(case: &Case, heal_ns: u64) -> Option<f64> {
    load::first_reply_after(&case.sessions(), heal_ns).map(|r| (r - heal_ns) as f64 / 1e6)
}

fn since(t: Instant, at: Option<Instant>) -> Option<f64> {
    at.map(|a| ms(a.saturating_duration_since(t)))
}

// ---------------------------------------------------------------------------
// Backend faults
// ---------------------------------------------------------------------------

/// A backend process SIGKILLed under load, restarted 600 ms later on the same
/// port. Sessions (rebind) survive; frames queued for it are counted
/// `backend_lost`, frames sent while it is down are `routing_error`.
#[test]
fn backend_killed() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut be1 = BackendProc::spawn(addr, ROLE_TEST);
    let rig = Rig::start("backend_killed", FAST, &route(10, 0, "round_robin", &[addr], REBIND));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let t_fault = Instant::now();
    be1.kill9();
    let detect = until(Duration::from_secs(5), || any_backend_loss(admin) > 0);
    sleep_until(t_fault + Duration::from_millis(600));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    let be2 = BackendProc::spawn(addr, ROLE_TEST);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be1.counts() + be2.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow { pipe_loss: true, ..Default::default() },
        "SIGKILL backend, restart after 600 ms (rebind)",
    );
    check(&t, &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back after the restart", &gw);
}

/// The same crash under the default `on_backend_loss = "close"`: bound
/// sessions are closed (reason 7) with frames in flight; clients reconnect.
/// A closed session's replies already queued still reach its client before
/// the FIN.
#[test]
fn backend_killed_close() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut be1 = BackendProc::spawn(addr, ROLE_TEST);
    let rig = Rig::start("backend_killed_close", FAST, &route(10, 0, "round_robin", &[addr], ""));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let t_fault = Instant::now();
    be1.kill9();
    let detect = until(Duration::from_secs(5), || {
        observe::m(&metrics(admin), "game_gateway_sessions_closed_total{reason=\"backend_lost\"}") > 0
    });
    sleep_until(t_fault + Duration::from_millis(600));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    let be2 = BackendProc::spawn(addr, ROLE_TEST);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let closed = observe::m(&metrics(admin), "game_gateway_sessions_closed_total{reason=\"backend_lost\"}");
    let (t, gw) = rig.finish(
        &|| be1.counts() + be2.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow { pipe_loss: true, ..Default::default() },
        &format!(
            "SIGKILL backend, restart after 600 ms (close): {closed} sessions closed backend_lost, clients reconnect"
        ),
    );
    check(&t, &gw);
    ensure(detect.is_some() && t.closed_by_gw > 0, "no session was closed on the loss", &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back after the restart", &gw);
}

/// A backend process SIGSTOPped for 2.5 s, then SIGCONT. Keep-alive finds the
/// silent connection; sessions rebind and carry on after SIGCONT.
#[test]
fn backend_hung() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let be = BackendProc::spawn(addr, ROLE_TEST);
    let rig = Rig::start("backend_hung", FAST, &route(10, 0, "round_robin", &[addr], REBIND));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let t_fault = Instant::now();
    be.signal(libc::SIGSTOP);
    let detect = until(Duration::from_secs(5), || backend_errors(admin, "keepalive_timeout") > 0);
    sleep_until(t_fault + Duration::from_millis(2500));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    be.signal(libc::SIGCONT);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        // Frames written to the stopped backend's socket before the gateway
        // gave up on it are processed after SIGCONT; their replies go to a
        // closed connection.
        Allow { pipe_loss: true, reorder: true, ..Default::default() },
        "SIGSTOP 2.5 s, SIGCONT; keepalive 500ms/500ms",
    );
    check(&t, &gw);
    ensure(detect.is_some(), "the hung backend was not detected", &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back after SIGCONT", &gw);
}

/// A backend that reads ~100 KB/s for 2 s under ~1.5 MB/s of load: the
/// gateway's queue stays bounded (sessions pause, or frames are counted
/// `backend_queue_full`); nothing vanishes; the backlog drains after.
#[test]
fn backend_slow_reader() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let extra = format!("{FAST}max_queued_bytes = 262144\n");
    let rig = Rig::start("backend_slow_reader", &extra, &route(10, 0, "round_robin", &[be.addr], REBIND));
    let spec = Spec { window: 8, interval: Duration::from_millis(5), payload: 512, ..Spec::new(16, sid10()) };
    let load = Load::start(&rig.case, rig.gw.addr, spec);
    sleep_ms(600);
    let fault_ns = rig.now_ns();
    be.shm().set(C::ReadChunk, 1024);
    be.shm().set(C::ReadDelayMs, 10);
    sleep_ms(2000);
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    be.shm().set(C::ReadDelayMs, 0);
    be.shm().set(C::ReadChunk, 0);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(1000);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let slow_p99 = load::percentile_ms(&rig.case.sessions(), fault_ns, heal_ns, 0.99);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: None, recover_ms: recover, resume_ms: resume },
        Allow::default(),
        &format!("100 KB/s reader for 2 s, backend queue 256 KiB; p99 while slow {:.0} ms", slow_p99.unwrap_or(0.0)),
    );
    check(&t, &gw);
    ensure(recover.is_some(), "no new session served after the backend sped up", &gw);
}

/// A socket bound but not listening: every dial is refused. Then it listens
/// and serves.
#[test]
fn backend_refusing() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let rig = Rig::start("backend_refusing", FAST, &route(10, 0, "round_robin", &[addr], REBIND));
    let admin = rig.admin();
    let t_fault = Instant::now();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let detect = until(Duration::from_secs(5), || backend_errors(admin, "dial_failed") > 0);
    sleep_until(t_fault + Duration::from_millis(1500));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    sock.listen(128).unwrap();
    let be = LedgerBackend::on(sock.into());
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow::default(),
        "bound, not listening (refused) for 1.5 s, then serving",
    );
    check(&t, &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back once it listened", &gw);
}

/// A listening socket whose accept queue is full and that never accepts:
/// dials time out (SYNs dropped). Then it accepts and serves.
#[test]
fn backend_backlog_full() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue (bounded: 8 tries).
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(150)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(150)).is_err(),
        "the accept queue is not full after {} connects",
        fillers.len()
    );
    let rig = Rig::start("backend_backlog_full", FAST, &route(10, 0, "round_robin", &[addr], REBIND));
    let admin = rig.admin();
    let t_fault = Instant::now();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let detect = until(Duration::from_secs(5), || backend_errors(admin, "dial_timeout") > 0);
    sleep_until(t_fault + Duration::from_millis(1500));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    drop(fillers);
    sock.listen(128).unwrap();
    let be = LedgerBackend::on(sock.into());
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow::default(),
        "accept queue full, never accepting, 1.5 s; dial_timeout 300ms",
    );
    check(&t, &gw);
    ensure(detect.is_some(), "dial timeouts not counted", &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back once it accepted", &gw);
}

// ---------------------------------------------------------------------------
// Network faults between gateway and backend (the fault proxy)
// ---------------------------------------------------------------------------

/// 50 ms each way, then 200 ms each way for 1.5 s, then none: latency
/// follows the path and comes back, nothing is lost on the way.
#[test]
fn net_delay() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let px = FaultProxy::start(be.addr);
    px.set_delay(Duration::from_millis(50));
    let rig = Rig::start("net_delay", FAST, &route(10, 0, "round_robin", &[px.addr], REBIND));
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let slow_ns = rig.now_ns();
    px.set_delay(Duration::from_millis(200));
    sleep_ms(1500);
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    px.set_delay(Duration::ZERO);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(800);
    load.stop();
    let s = rig.case.sessions();
    let p50_50 = load::percentile_ms(&s, 200_000_000, slow_ns, 0.5).unwrap_or(0.0);
    // Frames sent and answered entirely at 200 ms/way: sent after the
    // in-flight ones came back, answered before the heal.
    let p50_200 = load::percentile_ms(&s, slow_ns + 500_000_000, heal_ns - 450_000_000, 0.5).unwrap_or(0.0);
    // Back to normal: frames sent 500 ms after the heal.
    let p99_after = load::percentile_ms(&s, heal_ns + 500_000_000, u64::MAX, 0.99).unwrap_or(f64::MAX);
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: None, recover_ms: recover, resume_ms: resume },
        Allow::default(),
        &format!("p50 {p50_50:.0} ms at 50ms/way, {p50_200:.0} ms at 200ms/way, p99 {p99_after:.0} ms after"),
    );
    check(&t, &gw);
    ensure(p50_50 >= 100.0 && p50_200 >= 400.0, &format!("the delay did not apply: {p50_50} {p50_200}"), &gw);
    ensure(p99_after < 100.0, &format!("latency did not come back: p99 {p99_after} ms"), &gw);
}

/// Every gateway -> backend connection cut mid-stream; then 1 s of cuts with
/// probability 2% per forwarded chunk.
#[test]
fn net_cut() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let px = FaultProxy::start(be.addr);
    let rig = Rig::start("net_cut", FAST, &route(10, 0, "round_robin", &[px.addr], REBIND));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let (t_fault, fault_ns) = (Instant::now(), rig.now_ns());
    let cut = px.cut_all();
    let detect = until(Duration::from_secs(5), || any_backend_loss(admin) > 0);
    let recover = since(t_fault, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(300);
    px.set_cut_probability(0.02);
    sleep_ms(1000);
    px.set_cut_probability(0.0);
    let heal_ns = rig.now_ns();
    sleep_ms(800);
    load.stop();
    let resume = resume_after(&rig.case, fault_ns);
    let after = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow { pipe_loss: true, ..Default::default() },
        &format!("cut {cut} connections at once, then 2%/chunk for 1 s: {} cuts in all", px.cuts()),
    );
    check(&t, &gw);
    ensure(cut > 0 && resume.is_some() && after.is_some(), "traffic did not come back after the cuts", &gw);
}

/// The path stalls (no bytes either way, no error) for 2.5 s.
#[test]
fn net_stall() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let px = FaultProxy::start(be.addr);
    let rig = Rig::start("net_stall", FAST, &route(10, 0, "round_robin", &[px.addr], REBIND));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(800);
    let t_fault = Instant::now();
    px.stall(true);
    let detect = until(Duration::from_secs(5), || backend_errors(admin, "keepalive_timeout") > 0);
    sleep_until(t_fault + Duration::from_millis(2500));
    let (t_heal, heal_ns) = (Instant::now(), rig.now_ns());
    px.stall(false);
    let recover = since(t_heal, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(5)));
    sleep_ms(700);
    load.stop();
    let resume = resume_after(&rig.case, heal_ns);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: resume },
        Allow { pipe_loss: true, reorder: true, ..Default::default() },
        "black-holed path 2.5 s; keepalive 500ms/500ms",
    );
    check(&t, &gw);
    ensure(detect.is_some(), "the stalled path was not detected", &gw);
    ensure(recover.is_some() && resume.is_some(), "traffic did not come back after the stall", &gw);
}

// ---------------------------------------------------------------------------
// Redis faults: the gateway keeps the last good routes, stays ready, and
// traffic flows.
// ---------------------------------------------------------------------------

fn rules_json(eps: &[SocketAddr]) -> String {
    let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "{{\"10\": {{\"server_type\": 10, \"service_name\": \"svc\", \"strategy\": \"round_robin\", \"endpoints\": [{}], \"on_backend_loss\": \"rebind\"}}}}",
        eps.join(",")
    )
}

/// Polls /ready every 50 ms in the background; counts answers other than 200.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    bad: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReadyWatch {
    fn start(admin: SocketAddr) -> ReadyWatch {
        let (stop, bad, polls) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s2, b2, p2) = (stop.clone(), bad.clone(), polls.clone());
        let thread = Some(std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s2.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(40) {
                if ready(admin) != 200 {
                    b2.fetch_add(1, Ordering::Relaxed);
                }
                p2.fetch_add(1, Ordering::Relaxed);
                sleep_ms(50);
            }
        }));
        ReadyWatch { stop, bad, polls, thread }
    }

    /// (not-200 answers, polls).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.bad.load(Ordering::Relaxed), self.polls.load(Ordering::Relaxed))
    }
}

/// A gateway reading routes from `redis` (refresh every 1 s) with a static
/// fallback rule for type 10 to `fallback` (if any).
fn redis_rig(name: &'static str, redis: &Redis, fallback: Option<SocketAddr>) -> Rig {
    let routes = fallback.map(|a| route(10, 0, "round_robin", &[a], REBIND)).unwrap_or_default();
    let extra = format!("{FAST}[redis]\nurl = \"{}\"\nrefresh_interval = \"1s\"\n", redis.url());
    let rig = Rig::start(name, &extra, &routes);
    assert!(
        wait(Duration::from_secs(5), || {
            let (_, body) = observe::try_get(rig.admin(), "/status").unwrap_or_default();
            body.contains("static+redis")
        }),
        "routes from redis not loaded"
    );
    rig
}

fn redis_up(admin: SocketAddr) -> Option<u64> {
    metrics(admin).get("game_gateway_redis_up").map(|v| *v as u64)
}

/// Redis killed for 2 s, then restarted with the same rules.
#[test]
fn redis_down() {
    let mut redis = Redis::start();
    let (a, b) = (LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"));
    redis.set_rules(&rules_json(&[b.addr]));
    let rig = redis_rig("redis_down", &redis, Some(a.addr));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let watch = ReadyWatch::start(admin);
    sleep_ms(600);
    let t_fault = Instant::now();
    redis.kill();
    let b_before = b.counts().trans;
    let detect = until(Duration::from_secs(5), || redis_up(admin) == Some(0));
    sleep_until(t_fault + Duration::from_millis(2000));
    // New sessions during the outage still go to the Redis route.
    let probe = load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(2));
    let b_during = b.counts().trans - b_before;
    let t_heal = Instant::now();
    redis.restart();
    redis.set_rules(&rules_json(&[b.addr]));
    let recover = until(Duration::from_secs(8), || redis_up(admin) == Some(1)).map(|_| ms(t_heal.elapsed()));
    sleep_ms(300);
    load.stop();
    let (not_ready, polls) = watch.finish();
    let (t, gw) = rig.finish(
        &|| a.counts() + b.counts(),
        Timing { detect_ms: detect, recover_ms: recover, resume_ms: None },
        Allow::default(),
        &format!("redis killed 2 s; /ready not 200 {not_ready}/{polls}; {b_during} frames to the redis route while down; recover = redis_up again"),
    );
    check(&t, &gw);
    ensure(not_ready == 0, "/ready left 200 while Redis was down", &gw);
    ensure(probe.is_some() && b_during > 0, "traffic stopped while Redis was down", &gw);
    ensure(a.counts().trans == 0, "the last good (Redis) routes were not kept", &gw);
}

/// (published snapshot version, lowest version a worker runs), from /status.
fn route_versions(admin: SocketAddr) -> (u64, u64) {
    let Some((_, body)) = observe::try_get(admin, "/status") else { return (0, 0) };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let published = v["routes"]["version"].as_u64().unwrap_or(0);
    let lowest =
        v["workers"].as_array().into_iter().flatten().filter_map(|w| w["route_version"].as_u64()).min().unwrap_or(0);
    (published, lowest)
}

/// Publishes new rules (the load is stopped first: a route change under
/// load is its own case, `route_change_under_load`) and returns the time
/// until every worker runs them, checked by a probe landing on `to`.
fn change_routes_and_probe(rig: &Rig, redis: &Redis, to: &LedgerBackend) -> Option<f64> {
    let before = route_versions(rig.admin()).0;
    let t0 = Instant::now();
    redis.set_rules(&rules_json(&[to.addr]));
    redis.publish_rules();
    let applied = wait(Duration::from_secs(8), || {
        let (published, lowest) = route_versions(rig.admin());
        published > before && lowest == published
    });
    let took = ms(t0.elapsed());
    let landed =
        load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(2)).is_some() && to.counts().trans > 0;
    (applied && landed).then_some(took)
}

/// Redis SIGSTOPped for 3.5 s (longer than the gateway's 2 s Redis I/O
/// timeout), then SIGCONT; a route change published after that applies.
#[test]
fn redis_hung() {
    let redis = Redis::start();
    let (a, b, c) =
        (LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"));
    redis.set_rules(&rules_json(&[b.addr]));
    let rig = redis_rig("redis_hung", &redis, Some(a.addr));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let watch = ReadyWatch::start(admin);
    sleep_ms(600);
    let t_fault = Instant::now();
    redis.signal(libc::SIGSTOP);
    let b_before = b.counts().trans;
    let detect = until(Duration::from_secs(6), || redis_up(admin) == Some(0));
    sleep_until(t_fault + Duration::from_millis(3500));
    let probe = load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(2));
    let b_during = b.counts().trans - b_before;
    let t_heal = Instant::now();
    redis.signal(libc::SIGCONT);
    let reachable = until(Duration::from_secs(8), || redis_up(admin) == Some(1)).map(|_| ms(t_heal.elapsed()));
    load.stop();
    let applied = change_routes_and_probe(&rig, &redis, &c);
    let (not_ready, polls) = watch.finish();
    let (t, gw) = rig.finish(
        &|| a.counts() + b.counts() + c.counts(),
        Timing { detect_ms: detect, recover_ms: reachable, resume_ms: applied },
        Allow::default(),
        &format!("redis SIGSTOP 3.5 s; /ready not 200 {not_ready}/{polls}; {b_during} frames while hung; recover = redis_up again, resume = a new route applied everywhere"),
    );
    check(&t, &gw);
    ensure(not_ready == 0, "/ready left 200 while Redis hung", &gw);
    ensure(probe.is_some() && b_during > 0, "traffic stopped while Redis hung", &gw);
    ensure(a.counts().trans == 0, "fell back to the static route", &gw);
    ensure(
        reachable.is_some() && applied.is_some(),
        "Redis not read again / a route change after SIGCONT not applied",
        &gw,
    );
}

/// Redis restarted empty (no persistence) while its rules are the only
/// rules: the gateway must keep the last good routes, stay ready, and
/// traffic must flow on.
/// (Found failing on c0f1769: the missing rules key was read as an empty
/// rule list; fixed in 0d48ff2.)
#[test]
fn redis_restarted_empty() {
    let mut redis = Redis::start();
    let b = LedgerBackend::start("127.0.0.1:0");
    redis.set_rules(&rules_json(&[b.addr]));
    let rig = redis_rig("redis_restarted_empty", &redis, None);
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let watch = ReadyWatch::start(admin);
    sleep_ms(600);
    let t_fault = Instant::now();
    redis.restart();
    // Two refreshes (1 s each) read the empty Redis.
    let reachable = until(Duration::from_secs(8), || redis_up(admin) == Some(1) && ms(t_fault.elapsed()) > 2200.0);
    let before = b.counts().trans;
    let probe = since(t_fault, load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(2)));
    sleep_ms(500);
    let flow = b.counts().trans - before;
    load.stop();
    let (not_ready, polls) = watch.finish();
    let no_rule = sum_where(&metrics(admin), "game_gateway_routing_errors_total", &["type=\"no_rule\""]);
    let (t, gw) = rig.finish(
        &|| b.counts(),
        Timing { detect_ms: reachable, recover_ms: probe, resume_ms: None },
        Allow::default(),
        &format!("redis restarted empty, no static rule; /ready not 200 {not_ready}/{polls}; {flow} frames to the redis route after, {no_rule} no_rule"),
    );
    check(&t, &gw);
    ensure(not_ready == 0, "/ready left 200", &gw);
    ensure(
        flow > 0 && probe.is_some(),
        &format!("traffic stopped after Redis came back empty ({no_rule} frames: no_rule)"),
        &gw,
    );
}

/// Bad data in Redis (unparsable, then an unknown strategy): rejected whole,
/// the last good routes serve; then good data applies.
#[test]
fn redis_bad_data() {
    let redis = Redis::start();
    let (a, b, c) =
        (LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"));
    redis.set_rules(&rules_json(&[b.addr]));
    let rig = redis_rig("redis_bad_data", &redis, Some(a.addr));
    let admin = rig.admin();
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(8, sid10()));
    let watch = ReadyWatch::start(admin);
    sleep_ms(600);
    let rejected = || observe::m(&metrics(admin), "game_gateway_route_snapshots_rejected_total");
    redis.set_rules("{this is not json");
    redis.publish_rules();
    let detect = until(Duration::from_secs(5), || rejected() >= 1);
    redis.set_rules(r#"{"10": {"server_type": 10, "strategy": "fastest", "endpoints": []}}"#);
    redis.publish_rules();
    wait(Duration::from_secs(5), || rejected() >= 2);
    let b_before = b.counts().trans;
    let probe = load::probe_until(&rig.case, rig.gw.addr, sid10(), Duration::from_secs(2));
    sleep_ms(300);
    let b_during = b.counts().trans - b_before;
    load.stop();
    let applied = change_routes_and_probe(&rig, &redis, &c);
    let (not_ready, polls) = watch.finish();
    let n_rejected = rejected();
    let (t, gw) = rig.finish(
        &|| a.counts() + b.counts() + c.counts(),
        Timing { detect_ms: detect, recover_ms: applied, resume_ms: None },
        Allow::default(),
        &format!("2 bad documents rejected ({n_rejected}); /ready not 200 {not_ready}/{polls}; recover = good data applied everywhere"),
    );
    check(&t, &gw);
    ensure(not_ready == 0, "/ready left 200", &gw);
    ensure(n_rejected == 2, "bad documents not counted as rejected", &gw);
    ensure(probe.is_some() && b_during > 0, "the last good routes stopped serving", &gw);
    ensure(a.counts().trans == 0, "bad data made the gateway drop the Redis routes", &gw);
    ensure(applied.is_some(), "good data after bad was not applied", &gw);
}

/// Static routes flipped between two backends (each 20 ms away each way)
/// by config reload (SIGHUP) every 400 ms under load. Sessions move
/// (DISCONNECT reason 8, rebind on the next frame); a reply still in flight
/// from the old backend is delivered (within 1 s of the release; later it
/// would be dropped, and counted).
#[test]
fn route_change_under_load() {
    let (a, b) = (LedgerBackend::start("127.0.0.1:0"), LedgerBackend::start("127.0.0.1:0"));
    let (pa, pb) = (FaultProxy::start(a.addr), FaultProxy::start(b.addr));
    pa.set_delay(Duration::from_millis(20));
    pb.set_delay(Duration::from_millis(20));
    let cfg = |to: SocketAddr| config_text(2, FAST, &route(10, 0, "round_robin", &[to], REBIND));
    let rig = Rig::with_config("route_change_under_load", &cfg(pa.addr));
    let path = rig.gw.stderr_path.with_file_name("gateway.toml");
    let load = Load::start(&rig.case, rig.gw.addr, Spec::new(16, sid10()));
    sleep_ms(500);
    let mut flips = 0;
    for i in 0..4 {
        std::fs::write(&path, cfg(if i % 2 == 0 { pb.addr } else { pa.addr })).unwrap();
        rig.gw.signal(libc::SIGHUP);
        flips += 1;
        sleep_ms(400);
    }
    load.stop();
    let (t, gw) = rig.finish(
        &|| a.counts() + b.counts(),
        Timing::default(),
        Allow::default(),
        &format!("{flips} SIGHUP route flips a<->b under load, 20 ms/way to each"),
    );
    check(&t, &gw);
}

/// The drain's FIN goes out while replies are still on their way from the
/// backend (300 ms each way): they cannot reach their clients any more, so
/// they must be counted as dropped, not as delivered. (12 clients, so that
/// both workers hold sessions through the read grace and /metrics answers.)
/// Found failing on 683dd7c (queued, counted as delivered, then lost);
/// since 5bd7fe1 they are counted as `frames_dropped{reason="after_close"}`.
#[test]
fn drain_reply_after_fin_is_counted() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let px = FaultProxy::start(be.addr);
    px.set_delay(Duration::from_millis(300));
    let cfg = config_text(2, FAST, &route(10, 0, "round_robin", &[px.addr], REBIND))
        .replace("drain_timeout = \"1s\"", "drain_timeout = \"100ms\"");
    let rig = Rig::with_config("drain_reply_after_fin", &cfg);
    let admin = rig.admin();
    // Bind each session first (one round trip), then the frame whose reply
    // will come after the FIN.
    let mut clients: Vec<(TcpStream, u32)> =
        (0..12).map(|_| (TcpStream::connect(rig.gw.addr).unwrap(), rig.case.tag())).collect();
    for (c, tag) in clients.iter_mut() {
        c.write_all(&load::frame(&rig.case, *tag, 1, sid10(), 32)).unwrap();
    }
    for (c, _) in clients.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut first = [0u8; 40];
        c.read_exact(&mut first).unwrap();
    }
    for (c, tag) in clients.iter_mut() {
        c.write_all(&load::frame(&rig.case, *tag, 2, sid10(), 32)).unwrap();
    }
    let t_sent = Instant::now();
    sleep_ms(50);
    let mut s = TcpStream::connect(admin).unwrap();
    write!(s, "POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
    drop(s);
    // Each client reads to the gateway's FIN (~150 ms) and keeps its end
    // open; the replies reach the gateway at ~600 ms; it waits for our end of
    // stream (read grace) until ~1.1 s.
    let mut late = 0u64;
    for (c, _) in clients.iter_mut() {
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        late += (got.len() / 40) as u64;
    }
    let fin_at = ms(t_sent.elapsed());
    sleep_until(t_sent + Duration::from_millis(800));
    let mm = metrics(admin);
    let scraped_at = ms(t_sent.elapsed());
    let counted_delivered =
        sum_where(&mm, "game_gateway_messages_processed_total", &["direction=\"backend_to_client\""]);
    let dropped: u64 = observe::B2C.iter().map(|r| observe::dropped(&mm, r)).sum();
    let echoed = be.counts().echoes;
    let client_got = clients.len() as u64 + late;
    drop(clients);
    let (_t, gw) = rig.finish(
        &|| be.counts(),
        Timing::default(),
        Allow { exited: true, ..Default::default() },
        &format!("FIN at {fin_at:.0} ms, scraped at {scraped_at:.0} ms: backend echoed {echoed}; clients got {client_got}; gateway: delivered {counted_delivered}, dropped {dropped}"),
    );
    ensure(
        echoed == 24 && mm.contains_key("game_gateway_sessions_active") && scraped_at < 1100.0,
        "the scenario did not happen (12 late echoes, /metrics during the read grace)",
        &gw,
    );
    ensure(
        client_got + dropped == echoed && counted_delivered == client_got,
        &format!("replies lost without being counted: echoed {echoed}, clients got {client_got}, dropped {dropped}, counted as delivered {counted_delivered}"),
        &gw,
    );
}

// ---------------------------------------------------------------------------
// Client faults
// ---------------------------------------------------------------------------

/// Two clients flood frames as fast as the gateway reads them (over
/// `messages_per_second`), and 400 connections open and close at once, while
/// eight normal clients talk at 100 frames/s each.
#[test]
fn client_flood() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let extra = format!("{FAST}[limits]\nmessages_per_second = 300\nmessages_burst = 300\n");
    let rig = Rig::start("client_flood", &extra, &route(10, 0, "round_robin", &[be.addr], REBIND));
    let admin = rig.admin();
    let gw_addr = rig.gw.addr;
    let normal = Load::start(&rig.case, gw_addr, Spec::new(8, sid10()));
    sleep_ms(500);
    let fault_ns = rig.now_ns();
    let flood_spec = Spec {
        window: 1_000_000,
        interval: Duration::ZERO,
        payload: 64,
        group: 1,
        reply_timeout: Duration::from_secs(60),
        ..Spec::new(2, sid10())
    };
    let flood = Load::start(&rig.case, gw_addr, flood_spec);
    let churn = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut n = 0;
        while n < 400 && t0.elapsed() < Duration::from_secs(3) {
            if let Ok(s) = TcpStream::connect_timeout(&gw_addr, Duration::from_millis(200)) {
                drop(s);
                n += 1;
            }
        }
        n
    });
    let detect = until(Duration::from_secs(5), || observe::dropped(&metrics(admin), "rate_limited") > 0);
    sleep_ms(1500);
    flood.stop();
    let churned = churn.join().unwrap();
    let heal_ns = rig.now_ns();
    sleep_ms(500);
    normal.stop();
    let s = rig.case.sessions();
    let normal_s: Vec<SessionLedger> = s.iter().filter(|l| l.group == 0).cloned().collect();
    let p99_before = load::percentile_ms(&normal_s, 0, fault_ns, 0.99).unwrap_or(0.0);
    let p99_flood = load::percentile_ms(&normal_s, fault_ns, heal_ns, 0.99).unwrap_or(f64::MAX);
    let flood_sent: u64 = s.iter().filter(|l| l.group == 1).map(|l| l.sent).sum();
    let mm = metrics(admin);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: None, resume_ms: None },
        Allow::default(),
        &format!(
            "{flood_sent} flood frames, {churned} connects; normal clients p99 {p99_before:.0} ms before, {p99_flood:.0} ms during"
        ),
    );
    check(&t, &gw);
    let lost: u64 = normal_s.iter().map(|l| l.sent - l.delivered).sum();
    ensure(lost == 0, "normal clients lost replies to the flood", &gw);
    // Starvation, judged against controls of the same run rather than a
    // wall-clock bound (the load threads share the gateway's two cores):
    // - the gateway's own view: no frame waited half a second inside it
    //   (client read to backend write, backend read to client write); a
    //   core monopolised by the flooders held its other sessions' frames for
    //   0.3-1.2 s;
    // - the clients' view: every normal client kept at least half the reply
    //   rate it had before the flood (a stalled one fell to a third).
    for dir in ["client_to_backend", "backend_to_client"] {
        let key = |le: &str| format!("game_gateway_forward_latency_seconds_bucket{{direction=\"{dir}\",le=\"{le}\"}}");
        let at = |k: String| mm.get(&k).copied().unwrap_or(0.0);
        let (fast, all) = (at(key("0.5")), at(key("+Inf")));
        ensure(fast == all, &format!("{dir}: {} of {all} frames waited over 0.5 s in the gateway", all - fast), &gw);
    }
    let rate = |l: &SessionLedger, from: u64, to: u64| {
        l.lat.iter().filter(|(s, _)| *s >= from && *s < to).count() as f64 / ((to - from) as f64 / 1e9)
    };
    let before_from = fault_ns.saturating_sub(400_000_000);
    for l in &normal_s {
        let (before, during) = (rate(l, before_from, fault_ns), rate(l, fault_ns, heal_ns));
        ensure(
            during >= before / 2.0,
            &format!("normal client {:?} starved: {during:.0} replies/s during the flood, {before:.0} before", l.local),
            &gw,
        );
    }
}

/// 50 connections dribble a frame header a byte every 200 ms (never a whole
/// frame), 10 sessions send one frame then dribble the next: closed by the
/// handshake / idle timeouts, counted; normal clients unaffected.
#[test]
fn slowloris() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let extra = format!("{FAST}[limits]\nhandshake_timeout = \"1s\"\nidle_timeout = \"2s\"\n");
    let rig = Rig::start("slowloris", &extra, &route(10, 0, "round_robin", &[be.addr], REBIND));
    let admin = rig.admin();
    let gw_addr = rig.gw.addr;
    let normal = Load::start(&rig.case, gw_addr, Spec::new(8, sid10()));
    sleep_ms(300);
    let t_fault = Instant::now();
    // Both kinds in one thread, nonblocking, bounded 5 s: (socket, when
    // closed, ledger of the ones that sent a whole frame, bytes received).
    let mut lorises: Vec<Loris> = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(gw_addr).unwrap();
        let ledger = if i >= 50 {
            let tag = rig.case.tag();
            s.write_all(&load::frame(&rig.case, tag, 1, sid10(), 32)).unwrap();
            Some(SessionLedger {
                tag,
                local: s.local_addr().ok(),
                sent: 1,
                delivered: 0,
                wrong_tag: 0,
                order: 0,
                end: End::GatewayClosed,
                group: 2,
                lat: Vec::new(),
            })
        } else {
            None
        };
        s.set_nonblocking(true).unwrap();
        lorises.push((s, None, ledger, Vec::new()));
    }
    // A header whose body never comes (7 of its 8 bytes, cycled: at one byte
    // per 200 ms no frame can complete within the 5 s bound).
    let header = dribble_header();
    let mut byte = 0usize;
    let mut chunk = vec![0u8; 4096];
    while t_fault.elapsed() < Duration::from_secs(5) && lorises.iter().any(|l| l.1.is_none()) {
        for (s, closed, _, got) in lorises.iter_mut().filter(|l| l.1.is_none()) {
            let _ = s.write(&header[byte % 7..byte % 7 + 1]);
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => {
                        *closed = Some(Instant::now());
                        break;
                    }
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        *closed = Some(Instant::now());
                        break;
                    }
                }
            }
        }
        byte += 1;
        sleep_ms(200);
    }
    let handshake_closed: Vec<f64> = lorises[..50].iter().filter_map(|l| since(t_fault, l.1)).collect();
    let idle_closed: Vec<f64> = lorises[50..].iter().filter_map(|l| since(t_fault, l.1)).collect();
    for (_, _, l, got) in lorises.drain(..) {
        if let Some(mut l) = l {
            let mut off = 0;
            while off + 8 <= got.len() {
                let len = u16::from_le_bytes([got[off], got[off + 1]]) as usize;
                if off + 8 + len > got.len() {
                    break;
                }
                if faultproxy::backend::tag_seq(&got[off + 8..off + 8 + len]).0 == l.tag {
                    l.delivered += 1;
                } else {
                    l.wrong_tag += 1;
                }
                off += 8 + len;
            }
            rig.case.record(l);
        }
    }
    sleep_ms(300);
    normal.stop();
    let case = rig.case.clone();
    let mm = metrics(admin);
    let hs = sum_where(&mm, "game_gateway_protocol_errors_total", &["kind=\"handshake_timeout\""]);
    let idle = sum_where(&mm, "game_gateway_protocol_errors_total", &["kind=\"idle_timeout\""]);
    let worst = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: Some(worst(&handshake_closed)), recover_ms: None, resume_ms: None },
        Allow::default(),
        &format!(
            "50 header dribblers closed by {:.0} ms (handshake_timeout 1s, counted {hs}); 10 mid-frame dribblers by {:.0} ms (idle_timeout 2s, counted {idle})",
            worst(&handshake_closed),
            worst(&idle_closed)
        ),
    );
    check(&t, &gw);
    ensure(handshake_closed.len() == 50, "slowloris connections left open", &gw);
    ensure(idle_closed.len() == 10, "mid-frame dribblers left open", &gw);
    ensure(worst(&handshake_closed) < 4000.0, "handshake_timeout 1 s took over 4 s", &gw);
    ensure(hs >= 50 && idle >= 10, &format!("timeouts not counted: handshake {hs} idle {idle}"), &gw);
    let lost: u64 = case.sessions().iter().filter(|l| l.group == 0).map(|l| l.sent - l.delivered).sum();
    ensure(lost == 0, "normal clients lost replies", &gw);
}

/// A slowloris connection: its socket, when it was closed, the ledger of
/// one that sent a whole frame first, the bytes it received.
type Loris = (TcpStream, Option<Instant>, Option<SessionLedger>, Vec<u8>);

fn dribble_header() -> [u8; 8] {
    // len 32, msg 1, server id 1.10.0: a header that never gets its body.
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&32u16.to_le_bytes());
    h[2..4].copy_from_slice(&1u16.to_le_bytes());
    h[4..8].copy_from_slice(&sid10().to_le_bytes());
    h
}

/// Clients pipeline 20 frames, half-close at once, and read: every reply
/// still arrives (backend 150 ms away each way), then the gateway's FIN.
#[test]
fn half_close() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let px = FaultProxy::start(be.addr);
    px.set_delay(Duration::from_millis(150));
    let rig = Rig::start("half_close", FAST, &route(10, 0, "round_robin", &[px.addr], REBIND));
    let (case, gw_addr) = (rig.case.clone(), rig.gw.addr);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let case = case.clone();
            std::thread::spawn(move || {
                let tag = case.tag();
                let mut s = TcpStream::connect(gw_addr).unwrap();
                let mut burst = Vec::new();
                for seq in 1..=20 {
                    burst.extend(load::frame(&case, tag, seq, sid10(), 32));
                }
                s.write_all(&burst).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let mut l = SessionLedger {
                    tag,
                    local: s.local_addr().ok(),
                    sent: 20,
                    delivered: 0,
                    wrong_tag: 0,
                    order: 0,
                    end: End::ClientClosed,
                    group: 0,
                    lat: Vec::new(),
                };
                s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all);
                let mut off = 0;
                while off + 8 <= all.len() {
                    let len = u16::from_le_bytes([all[off], all[off + 1]]) as usize;
                    if off + 8 + len > all.len() {
                        break;
                    }
                    let (t, _) = faultproxy::backend::tag_seq(&all[off + 8..off + 8 + len]);
                    if t == tag {
                        l.delivered += 1;
                    } else {
                        l.wrong_tag += 1;
                    }
                    off += 8 + len;
                }
                case.record(l);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let done = ms(t0.elapsed());
    let short: Vec<(u32, u64)> =
        case.sessions().iter().filter(|l| l.delivered < l.sent).map(|l| (l.tag, l.delivered)).collect();
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: None, recover_ms: Some(done), resume_ms: None },
        Allow::default(),
        &format!("20 clients x 20 frames then FIN, RTT 300 ms; {} clients short of replies", short.len()),
    );
    check(&t, &gw);
    ensure(short.is_empty(), &format!("half-closed clients did not get all their replies: (tag, got) {short:?}"), &gw);
}

/// 3 rounds of 30 clients that pipeline 20 frames and reset (SO_LINGER 0)
/// without reading, while 8 normal clients talk.
#[test]
fn client_rst() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let rig = Rig::start("client_rst", FAST, &route(10, 0, "round_robin", &[be.addr], REBIND));
    let admin = rig.admin();
    let (case, gw_addr) = (rig.case.clone(), rig.gw.addr);
    let normal = Load::start(&case, gw_addr, Spec::new(8, sid10()));
    sleep_ms(300);
    for _round in 0..3 {
        let threads: Vec<_> = (0..30)
            .map(|i| {
                let case = case.clone();
                std::thread::spawn(move || {
                    let tag = case.tag();
                    let s = TcpStream::connect(gw_addr).unwrap();
                    let mut burst = Vec::new();
                    for seq in 1..=20 {
                        burst.extend(load::frame(&case, tag, seq, sid10(), 32));
                    }
                    let sent = if (&s).write_all(&burst).is_ok() { 20 } else { 0 };
                    // Some reset at once, some after the replies start coming.
                    sleep_ms((i % 3) * 5);
                    let local = s.local_addr().ok();
                    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                    case.record(SessionLedger {
                        tag,
                        local,
                        sent,
                        delivered: 0,
                        wrong_tag: 0,
                        order: 0,
                        end: End::ClientReset,
                        group: 1,
                        lat: Vec::new(),
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sleep_ms(200);
    }
    let reset_sessions = 90;
    let detect = until(Duration::from_secs(5), || observe::m(&metrics(admin), "game_gateway_sessions_active") <= 8);
    sleep_ms(300);
    normal.stop();
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: detect, recover_ms: None, resume_ms: None },
        Allow::default(),
        &format!("{reset_sessions} clients reset (SO_LINGER 0) with replies outstanding"),
    );
    check(&t, &gw);
    let bc = be.counts();
    ensure(bc.connects == bc.disconnects, "a reset session was never announced gone to its backend", &gw);
    let normal_lost: u64 = case.sessions().iter().filter(|l| l.group == 0).map(|l| l.sent - l.delivered).sum();
    ensure(normal_lost == 0, "normal clients lost replies", &gw);
}

/// SIGTERM under load (drain_timeout 500 ms): every frame a client wrote
/// before it saw the gateway's FIN reaches the backend, per session; the
/// process exits 0 in time.
#[test]
fn drain_under_load() {
    let be = LedgerBackend::start("127.0.0.1:0");
    let cfg = config_text(2, FAST, &route(10, 0, "round_robin", &[be.addr], REBIND))
        .replace("drain_timeout = \"1s\"", "drain_timeout = \"500ms\"");
    let mut rig = Rig::with_config("drain_under_load", &cfg);
    let spec = Spec { reconnect: false, ..Spec::new(16, sid10()) };
    let load = Load::start(&rig.case, rig.gw.addr, spec);
    sleep_ms(800);
    let t_fault = Instant::now();
    rig.gw.signal(libc::SIGTERM);
    let code = rig.gw.wait_exit(Duration::from_secs(6));
    let exit_ms = ms(t_fault.elapsed());
    load.stop();
    let case = rig.case.clone();
    let (t, gw) = rig.finish(
        &|| be.counts(),
        Timing { detect_ms: None, recover_ms: Some(exit_ms), resume_ms: None },
        Allow { exited: true, ..Default::default() },
        &format!("SIGTERM, drain_timeout 500 ms; exit {code:?} after {exit_ms:.0} ms (recover = exit)"),
    );
    check(&t, &gw);
    ensure(code == Some(0), &format!("exit code {code:?}"), &gw);
    ensure(exit_ms < 3500.0, &format!("drain took {exit_ms} ms"), &gw);
    ensure(t.read == t.at_backend, "frames read during the drain did not all reach the backend", &gw);
    // Per session: what the client sent = what the gateway read = what the
    // backend got.
    let per_backend = be.per_session();
    let recs: std::collections::HashMap<SocketAddr, observe::Access> =
        observe::access_records(&gw.stdout_text()).into_iter().map(|a| (a.client, a)).collect();
    for l in case.sessions() {
        let Some(a) = l.local.and_then(|local| recs.get(&local)) else { continue };
        let got = per_backend.get(&a.session).copied().unwrap_or(0);
        assert_eq!(
            (a.frames_in, got),
            (l.sent, l.sent),
            "session {} ({:?}, {}): sent {}",
            a.session,
            l.end,
            a.reason,
            l.sent
        );
    }
}
