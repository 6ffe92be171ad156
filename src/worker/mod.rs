//! The per-core I/O driver.
//!
//! One [`Worker`] per core, on its own named, pinned OS thread with its own
//! monoio runtime (io_uring, or epoll where io_uring is refused). It owns its
//! SO_REUSEPORT listener, its session table, its backend connection pools and
//! its counters; all per-core state is `Rc`/`RefCell`/`Cell`, never a lock.
//!
//! Tasks inside a worker:
//! - `accept_loop`: accepts clients, applies the connection cap, spawns the
//!   two tasks of each session (see [`client`]).
//! - per session: a reader (client bytes -> frames -> backend queues) and a
//!   writer (session queue -> client socket).
//! - per backend connection: a dialer/writer and a reader (see [`backend`]).
//! - `tick_loop`: every [`TICK`] drains the command channel (route snapshots,
//!   config, stats requests, stop) and once a second sweeps idle sessions.
//!
//! Commands are picked up by `try_recv` on that tick rather than by an eventfd
//! wake-up: a 20 ms delay is irrelevant for control traffic, a timer costs
//! nothing measurable, and it keeps the data path free of cross-thread
//! wake-ups entirely.

pub mod backend;
pub mod client;
pub mod ws;

use crate::config::{Config, IoDriver};
use crate::limits::{PerIpTable, IP_EVICT_EVERY, MAX_IP_ENTRIES};
use crate::notify::Notify;
use crate::protocol::backend::DisconnectReason;
use crate::routing::RouteTable;
use crate::session::SessionIdGen;
use crate::stats::{bump, WorkerStats};
use ahash::AHashMap;
use backend::EndpointPool;
use client::ClientSession;
use crossbeam_channel::{Receiver, Sender};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a worker looks at its command channel and clock.
pub const TICK: Duration = Duration::from_millis(20);
/// How often sessions are checked against idle and handshake timeouts.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Commands handled per tick, so a burst of control traffic cannot stall I/O.
pub const MAX_COMMANDS_PER_TICK: usize = 64;
/// Depth of each worker's command channel.
pub const COMMAND_CHANNEL_DEPTH: usize = 256;

/// What the control side can ask of a worker.
pub enum WorkerCommand {
    /// A new routing snapshot: swap it in between events.
    Routes(Arc<RouteTable>),
    /// A new (reloaded) configuration: reloadable keys apply at once.
    Config(Arc<Config>),
    /// Reply with a copy of the counters.
    Stats(Sender<WorkerStats>),
    /// Stop accepting; let sessions end by themselves until `drain_until`;
    /// then close the rest with `DISCONNECT` reason 6, flush backend queues
    /// and exit; whatever is left at `deadline` is dropped. A second `Stop`
    /// during a drain moves both instants earlier (hard stop).
    Stop { drain_until: Instant, deadline: Instant },
}

/// Facts a worker reports once its runtime is up.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub index: usize,
    pub cpu: Option<usize>,
    pub io_driver: &'static str,
}

/// One core's state.
pub struct Worker {
    pub index: usize,
    pub info: WorkerInfo,
    pub cfg: RefCell<Arc<Config>>,
    pub routes: RefCell<Arc<RouteTable>>,
    /// Round-robin cursor per rule key, per worker (as ROUTING.md says).
    pub rr: RefCell<AHashMap<(u8, u16), usize>>,
    pub sessions: RefCell<AHashMap<i64, Rc<ClientSession>>>,
    pub pools: RefCell<AHashMap<SocketAddr, Rc<EndpointPool>>>,
    pub ids: RefCell<SessionIdGen>,
    pub stats: RefCell<WorkerStats>,
    pub stopping: Cell<bool>,
    listener_fd: RawFd,
    /// xorshift state for backoff jitter.
    rng: Cell<u64>,
    pub logs: RefCell<LogLimiter>,
    /// Wakes the stop sequence when the last session is gone.
    pub sessions_gone: Notify,
    /// Wakes the worker's main future when the stop sequence is finished.
    stop_done: Notify,
    /// The stop sequence's two instants (see [`WorkerCommand::Stop`]).
    drain_until: Cell<Instant>,
    stop_deadline: Cell<Instant>,
    /// Per-IP connection counts and connect-rate buckets.
    pub ip_table: RefCell<PerIpTable>,
    /// The SO_REUSEPORT group steers each client IPv4 address to one worker,
    /// so per-IP limits apply whole here; otherwise this worker's share.
    pub ip_steered: bool,
    /// Access-log records not yet handed to the writer, and how many.
    pub access_buf: RefCell<Vec<u8>>,
    pub access_pending: Cell<u64>,
    /// Taken at the end of the stop so the writer thread can finish.
    access_tx: RefCell<Option<Sender<Vec<u8>>>>,
}

impl Worker {
    /// Hands buffered access-log records to the writer (never blocks).
    pub fn flush_access_log(&self) {
        let n = self.access_pending.replace(0);
        if n == 0 {
            return;
        }
        let buf = std::mem::take(&mut *self.access_buf.borrow_mut());
        let sent = match &*self.access_tx.borrow() {
            Some(tx) => crate::access_log::hand_over(tx, buf, n),
            None => Err(n),
        };
        match sent {
            Ok(n) => self.stats.borrow_mut().access_log_records += n,
            Err(n) => {
                self.stats.borrow_mut().access_log_dropped += n;
                if let Some(s) = self.logs.borrow_mut().allow("access_log_dropped", Instant::now()) {
                    tracing::warn!(
                        worker = self.index,
                        records = n,
                        suppressed = s,
                        "access log writer behind: records dropped"
                    );
                }
            }
        }
    }

    pub fn max_connections_here(&self) -> u64 {
        let cfg = self.cfg.borrow();
        cfg.limits.max_connections.div_ceil(self.info_workers(&cfg) as u64)
    }

    fn info_workers(&self, cfg: &Config) -> usize {
        cfg.server.workers.max(1)
    }

    /// (max connections per IP, connects per second per IP) on this worker.
    pub fn per_ip_limits_here(&self) -> (u32, u32) {
        let cfg = self.cfg.borrow();
        let (max, rate) = (cfg.limits.max_connections_per_ip, cfg.limits.connection_rate_per_ip);
        if self.ip_steered {
            (max, rate)
        } else {
            let n = self.info_workers(&cfg) as u32;
            (max.div_ceil(n), rate.div_ceil(n))
        }
    }

    pub fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }

    pub fn count_closed(&self, reason: DisconnectReason) {
        bump(&mut self.stats.borrow_mut().sessions_closed, reason.as_str(), 1);
    }

    fn apply_routes(self: &Rc<Self>, table: Arc<RouteTable>) {
        tracing::info!(worker = self.index, version = table.version, "route snapshot applied");
        *self.routes.borrow_mut() = table;
        self.stats.borrow_mut().route_version = self.routes.borrow().version;
        // Bindings to a backend that is no longer listed are released
        // (DISCONNECT reason 8); the session rebinds on its next frame.
        let sessions: Vec<Rc<ClientSession>> = self.sessions.borrow().values().cloned().collect();
        for s in sessions {
            s.unbind_unlisted(self);
        }
        // Connections nobody routes to any more are closed once their queue
        // (including the DISCONNECTs just queued) is written.
        let routes = self.routes.borrow().clone();
        let retired: Vec<Rc<EndpointPool>> = {
            let mut pools = self.pools.borrow_mut();
            let gone: Vec<SocketAddr> = pools.keys().filter(|a| !routes.lists(a)).copied().collect();
            gone.into_iter().filter_map(|a| pools.remove(&a)).collect()
        };
        for pool in retired {
            for c in &pool.conns {
                monoio::spawn(c.clone().retire(self.clone()));
            }
        }
    }

    fn handle_command(self: &Rc<Self>, cmd: WorkerCommand) {
        match cmd {
            WorkerCommand::Routes(t) => self.apply_routes(t),
            WorkerCommand::Config(c) => {
                tracing::info!(worker = self.index, source = %c.source, "config applied");
                *self.cfg.borrow_mut() = c;
            }
            WorkerCommand::Stats(tx) => {
                let mut s = self.stats.borrow().clone();
                s.worker = self.index;
                s.sessions_active = self.sessions.borrow().len() as u64;
                s.connections_active = s.sessions_active;
                let now = Instant::now();
                for pool in self.pools.borrow().values() {
                    let up = pool.conns.iter().filter(|c| c.is_up()).count() as u64;
                    s.backend(&pool.endpoint.name).connections_active = up;
                    s.backend(&pool.endpoint.name).circuit_state = pool.circuit_gauge(now);
                    s.backend(&pool.endpoint.name).sessions_bound =
                        pool.conns.iter().map(|c| c.sessions.borrow().len() as u64).sum();
                }
                let _ = tx.send(s);
            }
            WorkerCommand::Stop { drain_until, deadline } => {
                if !self.stopping.replace(true) {
                    self.drain_until.set(drain_until);
                    self.stop_deadline.set(deadline);
                    let me = self.clone();
                    monoio::spawn(async move { me.stop().await });
                } else {
                    tracing::info!(worker = self.index, "hard stop: ending the drain now");
                    self.drain_until.set(self.drain_until.get().min(drain_until));
                    self.stop_deadline.set(self.stop_deadline.get().min(deadline));
                    self.sessions_gone.notify();
                }
            }
        }
    }

    /// Waits until no session is left or `until()` passes.
    async fn wait_sessions_gone(&self, until: impl Fn() -> Instant) {
        while !self.sessions.borrow().is_empty() && Instant::now() < until() {
            let left = until().saturating_duration_since(Instant::now());
            let _ = monoio::time::timeout(left.min(TICK), self.sessions_gone.notified()).await;
        }
    }

    /// The stop sequence, in order: (1) close the listener; (2) drain:
    /// sessions end by themselves until `drain_until`; (3) close the rest with
    /// reason 6 (their `DISCONNECT`s queued behind every frame they sent);
    /// (4) flush backend queues; (5) exit. Each phase is logged.
    async fn stop(self: Rc<Self>) {
        // Wakes a pending accept (it fails with EINVAL) on both drivers.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        tracing::info!(
            worker = self.index,
            sessions = self.sessions.borrow().len(),
            "drain: listener closed, waiting for sessions to end"
        );
        self.wait_sessions_gone(|| self.drain_until.get()).await;
        let left: Vec<Rc<ClientSession>> = self.sessions.borrow().values().cloned().collect();
        tracing::info!(
            worker = self.index,
            sessions = left.len(),
            "drain deadline: closing remaining sessions (reason 6)"
        );
        for s in &left {
            s.begin_close(DisconnectReason::Shutdown, false);
        }
        self.wait_sessions_gone(|| self.stop_deadline.get()).await;
        tracing::info!(
            worker = self.index,
            left = self.sessions.borrow().len(),
            "sessions closed, flushing backend queues"
        );
        loop {
            let busy = self.pools.borrow().values().any(|p| p.conns.iter().any(|c| c.has_pending()));
            if !busy || Instant::now() >= self.stop_deadline.get() {
                break;
            }
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        for pool in self.pools.borrow().values() {
            for c in &pool.conns {
                c.shutdown_socket();
            }
        }
        self.flush_access_log();
        self.access_tx.borrow_mut().take();
        tracing::info!(worker = self.index, "stopped");
        self.stop_done.notify();
    }
}

/// Data-path log lines are limited per kind: at most [`LOG_BURST`] a second,
/// the rest counted and reported in the next line of that kind.
pub const LOG_BURST: u32 = 10;

#[derive(Default)]
pub struct LogLimiter {
    kinds: AHashMap<&'static str, (Instant, u32, u64)>,
}

impl LogLimiter {
    /// `Some(suppressed_since_last)` when a line of `kind` may be logged now.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        let e = self.kinds.entry(kind).or_insert((now, 0, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            e.0 = now;
            e.1 = 0;
        }
        if e.1 < LOG_BURST {
            e.1 += 1;
            Some(std::mem::take(&mut e.2))
        } else {
            e.2 += 1;
            None
        }
    }
}

/// Everything a worker thread needs to start.
pub struct WorkerSetup {
    pub index: usize,
    pub cpu: Option<usize>,
    pub cfg: Arc<Config>,
    pub routes: Arc<RouteTable>,
    pub listener: std::net::TcpListener,
    pub commands: Receiver<WorkerCommand>,
    pub ready: Sender<Result<WorkerInfo, String>>,
    /// Client IPs are steered to workers by the SO_REUSEPORT group's program.
    pub ip_steered: bool,
    /// The access-log writer.
    pub access_tx: Sender<Vec<u8>>,
}

fn io_uring_refused(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) | Some(libc::ENOMEM))
}

/// io_uring submission queue size; in-flight reads do not hold entries, so this
/// only bounds submissions per enter.
const URING_ENTRIES: u32 = 4096;

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// An io_uring runtime. First with `SINGLE_ISSUER | COOP_TASKRUN |
/// DEFER_TASKRUN` (one thread submits and reaps; completions run as task
/// work only when the worker asks for them: fewer interrupts per operation;
/// Linux 6.1+), then without them for older kernels.
fn uring_runtime() -> std::io::Result<UringRuntime> {
    let build = |urb: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(URING_ENTRIES)
            .uring_builder(urb)
            .build()
    };
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_single_issuer().setup_coop_taskrun().setup_defer_taskrun();
    build(tuned).or_else(|_| build(io_uring::IoUring::builder()))
}

/// Thread body: pin, build the runtime (falling back to epoll where io_uring is
/// refused), run until stopped.
pub fn run(setup: WorkerSetup) {
    if let Some(cpu) = setup.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            tracing::warn!(worker = setup.index, cpu, "could not pin worker to core");
        }
    }
    let want = setup.cfg.server.io_driver;
    if want != IoDriver::Epoll {
        match uring_runtime() {
            Ok(mut rt) => {
                rt.block_on(main(setup, "io_uring"));
                return;
            }
            Err(e) if want == IoDriver::Auto && io_uring_refused(&e) => {
                tracing::warn!(worker = setup.index, error = %e, "io_uring refused by the kernel, falling back to epoll");
            }
            Err(e) => {
                let _ = setup.ready.send(Err(format!("worker {}: io_uring runtime: {e}", setup.index)));
                return;
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => rt.block_on(main(setup, "epoll")),
        Err(e) => {
            let _ = setup.ready.send(Err(format!("worker {}: epoll runtime: {e}", setup.index)));
        }
    }
}

async fn main(setup: WorkerSetup, io_driver: &'static str) {
    let WorkerSetup { index, cpu, cfg, routes, listener, commands, ready, ip_steered, access_tx } = setup;
    let listener_fd = listener.as_raw_fd();
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {index}: listener: {e}")));
            return;
        }
    };
    let info = WorkerInfo { index, cpu, io_driver };
    let mut stats = WorkerStats { workers: 1, route_version: routes.version, ..Default::default() };
    stats.route_version = routes.version;
    // Seeded from the clock, pid and worker so trace ids and jitter differ
    // across workers, restarts and nodes.
    let clock =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let seed = xxhash_rust::xxh3::xxh3_64(
        &[clock.to_le_bytes(), (std::process::id() as u64).to_le_bytes(), (index as u64).to_le_bytes()].concat(),
    ) | 1;
    let w = Rc::new(Worker {
        index,
        info: info.clone(),
        ids: RefCell::new(SessionIdGen::new(cfg.server.node_id, index)),
        cfg: RefCell::new(cfg),
        routes: RefCell::new(routes),
        rr: RefCell::new(AHashMap::new()),
        sessions: RefCell::new(AHashMap::new()),
        pools: RefCell::new(AHashMap::new()),
        stats: RefCell::new(stats),
        stopping: Cell::new(false),
        listener_fd,
        rng: Cell::new(seed),
        logs: RefCell::new(LogLimiter::default()),
        sessions_gone: Notify::new(),
        stop_done: Notify::new(),
        drain_until: Cell::new(Instant::now()),
        stop_deadline: Cell::new(Instant::now()),
        ip_table: RefCell::new(PerIpTable::new(MAX_IP_ENTRIES)),
        ip_steered,
        access_buf: RefCell::new(Vec::new()),
        access_pending: Cell::new(0),
        access_tx: RefCell::new(Some(access_tx)),
    });
    tracing::info!(worker = index, cpu = ?cpu, io_driver, "worker started");
    let _ = ready.send(Ok(info));
    monoio::spawn(accept_loop(w.clone(), listener));
    monoio::spawn(tick_loop(w.clone(), commands));
    w.stop_done.notified().await;
}

async fn accept_loop(w: Rc<Worker>, listener: monoio::net::TcpListener) {
    loop {
        let r = listener.accept().await;
        if w.stopping.get() {
            break;
        }
        match r {
            Ok((stream, peer)) => client::on_accept(&w, stream, peer),
            Err(e) => {
                bump(&mut w.stats.borrow_mut().connection_rejected, "accept_error", 1);
                if let Some(n) = w.logs.borrow_mut().allow("accept_error", Instant::now()) {
                    tracing::warn!(worker = w.index, error = %e, suppressed = n, "accept failed");
                }
                // Out of descriptors: back off instead of spinning.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                ) {
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
}

async fn tick_loop(w: Rc<Worker>, commands: Receiver<WorkerCommand>) {
    let mut last_sweep = Instant::now();
    let mut last_evict = Instant::now();
    loop {
        monoio::time::sleep(TICK).await;
        for _ in 0..MAX_COMMANDS_PER_TICK {
            match commands.try_recv() {
                Ok(cmd) => w.handle_command(cmd),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    // The control side is gone: nobody can stop us any more.
                    if !w.stopping.get() {
                        let now = Instant::now();
                        w.handle_command(WorkerCommand::Stop {
                            drain_until: now,
                            deadline: now + Duration::from_secs(5),
                        });
                    }
                    break;
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= SWEEP_EVERY {
            last_sweep = now;
            client::sweep(&w, now);
            backend::keepalive(&w, now);
            w.flush_access_log();
        }
        if now.duration_since(last_evict) >= IP_EVICT_EVERY {
            last_evict = now;
            let rate = w.per_ip_limits_here().1;
            w.ip_table.borrow_mut().evict_idle(rate, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_allows_a_burst_per_kind_then_counts_what_it_suppressed() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.allow("flood", t0).is_some()).count();
        assert_eq!(allowed, LOG_BURST as usize);
        assert_eq!(l.allow("other", t0), Some(0), "kinds are limited separately");
        assert_eq!(l.allow("flood", t0 + Duration::from_secs(1)), Some(100 - LOG_BURST as u64));
    }
}
