//! The per-core driver: monoio tasks that move bytes and timers for one
//! [`Shard`], and nothing else.
//!
//! One [`Worker`] per core, on its own named, pinned OS thread with its own
//! monoio runtime (io_uring, or epoll where io_uring is refused). It owns its
//! SO_REUSEPORT listener and every client and backend socket; the shard owns
//! every decision. After each event the driver carries out the shard's
//! [`Action`]s in order ([`Worker::with_shard`]).
//!
//! Tasks inside a worker:
//! - `accept_loop`: accepts clients and asks the shard to admit them; spawns
//!   the two tasks of each session (see [`client`]). It alone owns the
//!   listener and closes it when the drain begins.
//! - per session: a reader (client bytes -> shard) and a writer (the
//!   session's queue -> socket, one write per wake-up).
//! - per backend stream: a dialer/writer and a reader (see [`backend`]).
//! - `tick_loop`: every [`TICK`] drains the command channel (route snapshots,
//!   config, stats requests, stop) and ticks the shard's clock.
//!
//! Commands are picked up by `try_recv` on that tick rather than by an eventfd
//! wake-up: a 20 ms delay is irrelevant for control traffic, a timer costs
//! nothing measurable, and it keeps the data path free of cross-thread
//! wake-ups entirely. Measured for route changes (perf/route-propagation.sh,
//! 1,000 Redis changes under load, 2 workers): from the `PUBLISH` to the last
//! worker serving the snapshot, p50 16 ms, p99 23 ms, max 36 ms, against a
//! 50 ms goal; each snapshot's time is `game_gateway_route_propagation_seconds`
//! (recorded here, on the tick, by the last worker to apply it).
//!
//! # Borrows
//! `Worker::shard` is borrowed only inside [`Worker::with_shard`] and for a
//! stats copy, never across an `.await`; actions run after that borrow ends,
//! and no action handler borrows the shard again except to report the access
//! log hand-over, which queues nothing. `clients` and `backends` (the I/O
//! handles) are borrowed only for a lookup or an insert, never across an
//! `.await` either.

mod backend;
mod client;
mod grpc;
pub mod handoff;
mod sys;

use crate::config::{Config, IoDriver};
use crate::limits::IP_EVICT_EVERY;
use crate::notify::Notify;
use crate::protocol::backend::DisconnectReason;
use crate::routing::{BackendProtocol, RouteTable};
use crate::shard::{Action, SessionKey, Shard, ShardSetup, Shut};
use crate::stats::WorkerStats;
use crossbeam_channel::{Receiver, Sender};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often a worker looks at its command channel and clock.
pub const TICK: Duration = Duration::from_millis(20);
/// The tick while a live upgrade is in progress (see `crate::upgrade`).
pub const UPGRADE_TICK: Duration = Duration::from_millis(1);
/// How often sessions are checked against idle and handshake timeouts.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Commands handled per tick, so a burst of control traffic cannot stall I/O.
pub const MAX_COMMANDS_PER_TICK: usize = 64;
/// Depth of each worker's command channel.
pub const COMMAND_CHANNEL_DEPTH: usize = 256;

/// A routing snapshot on its way to the workers, with what measuring its
/// propagation takes: when its cause reached the gateway, and how many
/// workers applied it so far (one atomic add per worker per snapshot, on the
/// tick; nothing on the data path).
#[derive(Clone)]
pub struct RouteUpdate {
    pub table: Arc<RouteTable>,
    propagation: Arc<Propagation>,
}

struct Propagation {
    /// When the change reached the control side: the Redis notify's arrival
    /// at the subscriber, the start of a periodic refresh, of a config
    /// reload, or the Consul answer or name lookup's arrival.
    origin: Instant,
    /// Workers the snapshot is sent to.
    workers: usize,
    /// Workers that applied it so far.
    applied: AtomicUsize,
}

impl RouteUpdate {
    /// `table`, caused at `origin`, for `workers` workers.
    pub fn new(table: Arc<RouteTable>, origin: Instant, workers: usize) -> RouteUpdate {
        RouteUpdate {
            table,
            propagation: Arc::new(Propagation { origin, workers: workers.max(1), applied: AtomicUsize::new(0) }),
        }
    }

    /// When the change reached the control side.
    pub fn origin(&self) -> Instant {
        self.propagation.origin
    }

    /// One more worker applied the snapshot: true for the last of them.
    pub fn applied_by_one(&self) -> bool {
        let p = &self.propagation;
        p.applied.fetch_add(1, Ordering::AcqRel) + 1 == p.workers
    }
}

/// What the control side can ask of a worker.
pub enum WorkerCommand {
    /// A new routing snapshot: swap it in between events.
    Routes(RouteUpdate),
    /// A new (reloaded) configuration: reloadable keys apply at once.
    Config(Arc<Config>),
    /// Reply with a copy of the counters.
    Stats(Sender<WorkerStats>),
    /// Stop accepting; let sessions end by themselves until `drain_until`;
    /// then close the rest with `DISCONNECT` reason 6, flush backend queues
    /// and exit; whatever is left at `deadline` is dropped. A second `Stop`
    /// during a drain moves both instants earlier (hard stop).
    Stop { drain_until: Instant, deadline: Instant },
    /// Live upgrade, old process: stop every socket where it is and export
    /// the shard (see [`handoff`]).
    /// The number names the handover (a later `Thaw` carries it too).
    Freeze(u64, Sender<Result<handoff::WorkerExport, String>>),
    /// Start accepting on these listeners (a gateway started with deferred
    /// accepting, after a live upgrade).
    Listen(Vec<std::net::TcpListener>),
    /// Live upgrade abandoned: go on, accepting on these listeners again.
    Thaw(u64, Vec<std::net::TcpListener>),
    /// Live upgrade done: end at once, touching no socket. The counts are
    /// this worker's sessions handed over and left behind.
    Retire { handed: u64, not_carried: u64 },
    /// Live upgrade, new process: take in one old worker's shard.
    Adopt(Box<crate::shard::handoff::ShardSnapshot>, Vec<std::os::fd::OwnedFd>, Sender<handoff::AdoptReport>),
}

/// Facts a worker reports once its runtime is up.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub index: usize,
    pub cpu: Option<usize>,
    /// NUMA node of `cpu`, when the kernel says.
    pub numa_node: Option<u32>,
    pub io_driver: &'static str,
}

/// One core's driver state.
pub(crate) struct Worker {
    index: usize,
    /// Every decision; see the module docs for when it is borrowed.
    shard: RefCell<Shard>,
    /// Actions taken from the shard, reused between events.
    actions: RefCell<Vec<Action>>,
    /// I/O handles of live sessions, by the shard's slot: the writer's
    /// wake-up, the socket's shutdown handle and, once closed, the tail.
    clients: RefCell<Vec<Option<Rc<client::ClientIo>>>>,
    /// I/O handles of backend streams, by the shard's slot (the current
    /// generation's).
    backends: RefCell<Vec<Option<Rc<backend::ConnIo>>>>,
    /// Set when the stop sequence starts (a second Stop is a hard stop).
    stopping: Cell<bool>,
    /// Tells the accept loop to drop the listener.
    /// Each accept loop's stop (a worker may have several listeners).
    accept_stops: RefCell<Vec<Rc<client::AcceptStop>>>,
    /// Accept loops still running (a freeze waits for none).
    accept_loops: Cell<usize>,
    /// Wakes the stop sequence when the last session is gone.
    sessions_gone: Notify,
    /// Wakes the worker's main future when the stop sequence is finished.
    stop_done: Notify,
    /// The stop sequence's two instants (see [`WorkerCommand::Stop`]).
    drain_until: Cell<Instant>,
    stop_deadline: Cell<Instant>,
    /// The access-log writer; taken at the end of the stop so it can finish.
    access_tx: RefCell<Option<Sender<Vec<u8>>>>,
    /// Announcements from this worker's backends go to every worker's queue.
    announcer: crate::relay::Announcer,
    /// This worker's queue of announcements, taken on its tick.
    announcements: Receiver<Arc<crate::shard::Announcement>>,
    /// Stamped on every tick (liveness, `/health`).
    heartbeats: crate::relay::Heartbeats,
    /// The overload manager: this worker measures its share and acts.
    pub(super) overload: Arc<crate::overload::Overload>,
    /// Span batches for the OTLP exporter (when on).
    spans_tx: Option<Sender<Vec<crate::otlp::SpanRecord>>>,
    /// Streams ending themselves gracefully (HTTP/2) that the stop waits for.
    finishing: Cell<usize>,
    /// How this worker names itself to gRPC backends (`gateway-name`):
    /// the node name and the worker index.
    grpc_name: Rc<str>,
    /// Every session's reads land here first (see `client::read_loop`):
    /// an idle session holds no read buffer of its own.
    read_buf: RefCell<bytes::BytesMut>,
    /// A live upgrade froze this worker: the shard is not ticked (no
    /// timeout, keep-alive or close may touch a socket the new process may
    /// own by now).
    frozen: Cell<bool>,
    /// `[server] upgrade_socket` is set: backend reads are cancellable so a
    /// live upgrade can stop them (a restart-only key).
    live_upgrade: bool,
    /// The runtime is io_uring (else epoll).
    uring: bool,
    /// Socket actions that came while frozen, for the thaw.
    deferred: RefCell<Vec<Action>>,
    /// The command channel (taken by the tick loop; dropped when the worker
    /// retires, so the control side's requests fail at once).
    commands: RefCell<Option<Receiver<WorkerCommand>>>,
    /// Routes, config and announcements that came while frozen.
    deferred_cmds: RefCell<Vec<WorkerCommand>>,
    /// The last handover the control side thawed this worker for, and the
    /// listeners of a thaw that came before its freeze finished.
    thawed_epoch: Cell<u64>,
    stashed_thaw: RefCell<Option<Vec<std::net::TcpListener>>>,
    /// When the current freeze began.
    frozen_at: Cell<Option<Instant>>,
}

impl Worker {
    /// Runs `f` on the shard, then carries out the actions it queued.
    #[inline]
    fn with_shard<R>(self: &Rc<Self>, f: impl FnOnce(&mut Shard) -> R) -> R {
        let mut shard = self.shard.borrow_mut();
        let r = f(&mut shard);
        if shard.has_actions() {
            let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
            shard.drain_actions(&mut actions);
            drop(shard);
            for a in actions.drain(..) {
                self.run_action(a);
            }
            *self.actions.borrow_mut() = actions;
        }
        r
    }

    /// Tells every accept loop to drop its listener.
    fn stop_accepting(&self) {
        let stops: Vec<_> = self.accept_stops.borrow_mut().drain(..).collect();
        for stop in stops {
            stop.stop();
        }
    }

    fn client(&self, key: SessionKey) -> Option<Rc<client::ClientIo>> {
        self.clients.borrow().get(key.slot as usize)?.as_ref().filter(|io| io.key == key).cloned()
    }

    fn insert_client(&self, io: Rc<client::ClientIo>) {
        let mut clients = self.clients.borrow_mut();
        let slot = io.key.slot as usize;
        if clients.len() <= slot {
            clients.resize(slot + 1, None);
        }
        clients[slot] = Some(io);
    }

    fn remove_client(&self, key: SessionKey) {
        if let Some(slot) = self.clients.borrow_mut().get_mut(key.slot as usize) {
            if slot.as_ref().is_some_and(|io| io.key == key) {
                *slot = None;
            }
        }
    }

    fn run_action(self: &Rc<Self>, a: Action) {
        if self.frozen.get() && a.touches_sockets() {
            // Frozen for a live upgrade: no socket is written, shut down or
            // closed (the new process may own it by now); these run on the
            // thaw, or never once the worker retires.
            self.deferred.borrow_mut().push(a);
            return;
        }
        match a {
            Action::WakeClient(key) => {
                if let Some(io) = self.client(key) {
                    self.flush_client(&io);
                }
            }
            Action::ShutdownClient(key, how) => {
                if let Some(io) = self.client(key) {
                    if how == Shut::Write {
                        // Drain: the FIN follows what is queued.
                        io.fin.set(true);
                        self.flush_client(&io);
                    }
                    io.shutdown(how);
                    // A paused reader must see the close too.
                    io.resume.notify();
                }
            }
            Action::ResumeClient(key) => {
                if let Some(io) = self.client(key) {
                    io.resume.notify();
                }
            }
            Action::Closed { key, tail } => {
                if let Some(io) = self.client(key) {
                    self.close_client(&io, tail);
                }
            }
            Action::Dial { conn, generation, addr, protocol, timeout } => {
                let io = backend::ConnIo::new(generation);
                // Frozen for a live upgrade: it may connect, but it sends
                // nothing until thawed (the new process dials on its own).
                io.frozen.set(self.frozen.get());
                let mut backends = self.backends.borrow_mut();
                let slot = conn.0 as usize;
                if backends.len() <= slot {
                    backends.resize(slot + 1, None);
                }
                backends[slot] = Some(io.clone());
                drop(backends);
                match protocol {
                    BackendProtocol::Grpc => {
                        let name = self.grpc_name.clone();
                        monoio::spawn(grpc::run(self.clone(), io, conn, addr, timeout, name));
                    }
                    _ => {
                        monoio::spawn(backend::run(self.clone(), io, conn, addr, timeout));
                    }
                }
            }
            Action::WakeBackend(conn) => {
                if let Some(Some(io)) = self.backends.borrow().get(conn.0 as usize) {
                    io.wake.notify();
                }
            }
            Action::CloseBackend { conn, generation, graceful } => {
                let mut backends = self.backends.borrow_mut();
                if let Some(slot) = backends.get_mut(conn.0 as usize) {
                    if slot.as_ref().is_some_and(|io| io.generation == generation) {
                        if let Some(io) = slot.take() {
                            if graceful && io.finishes_itself() {
                                self.finishing.set(self.finishing.get() + 1);
                                io.closing_gracefully.set(true);
                                io.wake.notify();
                            } else {
                                io.close();
                            }
                        }
                    }
                }
            }
            Action::AccessLog { buf, records } => {
                let r = match &*self.access_tx.borrow() {
                    Some(tx) => crate::access_log::hand_over(tx, buf, records),
                    None => Err(records),
                };
                self.shard.borrow_mut().access_log_handed(r, Instant::now());
            }
            Action::SessionsGone => self.sessions_gone.notify(),
            Action::Spans(batch) => {
                let n = batch.len() as u64;
                let sent = self.spans_tx.as_ref().is_some_and(|tx| tx.try_send(batch).is_ok());
                if !sent {
                    self.shard.borrow_mut().spans_dropped(n);
                }
            }
            Action::Announce(a) => {
                self.announcer.announce(a, crate::relay::Source::Backend);
            }
        }
    }

    fn handle_command(self: &Rc<Self>, cmd: WorkerCommand) {
        if self.frozen.get() && matches!(cmd, WorkerCommand::Routes(_) | WorkerCommand::Config(_)) {
            // Frozen for a live upgrade: the shard may be exported already.
            // Applied on the thaw; after a completed upgrade the new
            // process has its own control plane (an announcement sent in
            // the pause reaches only what it reaches from there).
            self.deferred_cmds.borrow_mut().push(cmd);
            return;
        }
        match cmd {
            WorkerCommand::Routes(u) => {
                self.with_shard(|sh| sh.apply_routes(u.table.clone(), Instant::now()));
                // Serving it from here on: the swap and the release of the
                // bindings it ends are done.
                let delay = Instant::now().saturating_duration_since(u.origin());
                let last = u.applied_by_one();
                let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                self.shard.borrow_mut().routes_propagated(delay, at, last);
            }
            WorkerCommand::Config(c) => self.with_shard(|sh| sh.apply_config(c)),
            WorkerCommand::Stats(tx) => {
                let s = self.shard.borrow().stats(Instant::now());
                let _ = tx.send(s);
            }
            WorkerCommand::Freeze(epoch, reply) => {
                let me = self.clone();
                monoio::spawn(async move {
                    let r = me.clone().freeze().await;
                    if r.is_err() {
                        // Not exported: nothing moved, go on.
                        tracing::warn!(
                            worker = me.index,
                            "live upgrade: freeze failed; the control side thaws this worker"
                        );
                    }
                    // The control side gave up on this handover before the
                    // freeze finished (its thaw came first, or nobody waits
                    // for the answer any more): thaw now.
                    if reply.send(r).is_err() || me.thawed_epoch.get() >= epoch {
                        let listeners = me.stashed_thaw.borrow_mut().take().unwrap_or_default();
                        me.thaw(epoch, listeners);
                    }
                });
            }
            WorkerCommand::Thaw(epoch, listeners) => self.thaw(epoch, listeners),
            WorkerCommand::Listen(listeners) => {
                for l in listeners {
                    match monoio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            monoio::spawn(client::accept_loop(self.clone(), l));
                        }
                        Err(e) => tracing::error!(worker = self.index, error = %e, "cannot accept on a listener"),
                    }
                }
            }
            WorkerCommand::Retire { handed, not_carried } => self.retire(handed, not_carried),
            WorkerCommand::Adopt(snap, fds, reply) => {
                let _ = reply.send(self.adopt(*snap, fds));
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
        while self.shard.borrow().session_count() > 0 && Instant::now() < until() {
            let left = until().saturating_duration_since(Instant::now());
            let _ = monoio::time::timeout(left.min(TICK), self.sessions_gone.notified()).await;
        }
    }

    /// The stop sequence, in order: (1) refuse new sessions and close the
    /// listener; (2) drain: sessions end by themselves until `drain_until`;
    /// (3) close the rest with reason 6 (their `DISCONNECT`s queued behind
    /// every frame they sent); (4) flush backend queues; (5) exit. Each phase
    /// is logged.
    async fn stop(self: Rc<Self>) {
        let until = self.drain_until.get();
        self.with_shard(|sh| sh.begin_drain(Instant::now(), until));
        self.stop_accepting();
        tracing::info!(
            worker = self.index,
            sessions = self.shard.borrow().session_count(),
            "drain: listener closed, waiting for sessions to end"
        );
        self.wait_sessions_gone(|| self.drain_until.get()).await;
        let left = self.with_shard(|sh| sh.close_all(DisconnectReason::Shutdown));
        tracing::info!(
            worker = self.index,
            sessions = left,
            "drain deadline: closing remaining sessions (reason 6): replies flushed, FIN sent, reading until their end"
        );
        // Clients get half of what is left to answer the FIN with their own
        // end of stream (their last frames are forwarded); then reading stops.
        let read_grace = Instant::now() + self.stop_deadline.get().saturating_duration_since(Instant::now()) / 2;
        self.wait_sessions_gone(|| read_grace.min(self.stop_deadline.get())).await;
        let left = self.with_shard(|sh| sh.force_close_all());
        if left > 0 {
            tracing::info!(
                worker = self.index,
                sessions = left,
                "drain: closing sessions that did not end their stream"
            );
        }
        self.wait_sessions_gone(|| self.stop_deadline.get()).await;
        tracing::info!(
            worker = self.index,
            left = self.shard.borrow().session_count(),
            "sessions closed, flushing backend queues"
        );
        while self.shard.borrow().backends_pending() && Instant::now() < self.stop_deadline.get() {
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
        self.with_shard(|sh| sh.close_backends());
        // HTTP/2 streams flush what they buffered and end their calls.
        let until = Instant::now() + grpc::GRACEFUL_CLOSE;
        while self.finishing.get() > 0 && Instant::now() < until {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        self.access_tx.borrow_mut().take();
        tracing::info!(worker = self.index, "stopped");
        self.stop_done.notify();
    }
}

/// Everything a worker thread needs to start.
pub struct WorkerSetup {
    pub index: usize,
    pub cpu: Option<usize>,
    pub cfg: Arc<Config>,
    pub routes: Arc<RouteTable>,
    /// Its listening sockets: one, or more after a live upgrade from a
    /// process with more workers.
    pub listeners: Vec<std::net::TcpListener>,
    pub commands: Receiver<WorkerCommand>,
    pub ready: Sender<Result<WorkerInfo, String>>,
    /// Admission shared by every worker (per-IP limits, connection cap).
    pub admission: Arc<crate::limits::SharedAdmission>,
    /// The access-log writer.
    pub access_tx: Sender<Vec<u8>>,
    /// Every worker's announcement queue (see [`crate::relay`]).
    pub announcer: crate::relay::Announcer,
    /// This worker's own announcement queue (bounded; see [`crate::relay`]).
    pub announcements: Receiver<Arc<crate::shard::Announcement>>,
    /// Where this worker stamps each turn of its loop.
    pub heartbeats: crate::relay::Heartbeats,
    /// The node-wide budget of bytes queued towards clients.
    pub overload: Arc<crate::overload::Overload>,
    /// The OTLP exporter, when trace export is on.
    pub(crate) spans_tx: Option<Sender<Vec<crate::otlp::SpanRecord>>>,
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
    let WorkerSetup {
        index,
        cpu,
        cfg,
        routes,
        listeners,
        commands,
        ready,
        admission,
        access_tx,
        announcer,
        announcements,
        heartbeats,
        overload,
        spans_tx,
    } = setup;
    let mut monoio_listeners = Vec::with_capacity(listeners.len());
    for listener in listeners {
        match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => monoio_listeners.push(l),
            Err(e) => {
                let _ = ready.send(Err(format!("worker {index}: listener: {e}")));
                return;
            }
        }
    }
    let info = WorkerInfo { index, cpu, numa_node: cpu.and_then(crate::cpu::numa_node), io_driver };
    let node_name = cfg.server.node_name.clone();
    let live_upgrade = cfg.server.upgrade_socket.is_some();
    // Seeded from the clock, pid and worker so trace ids and jitter differ
    // across workers, restarts and nodes.
    let clock =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let seed = xxhash_rust::xxh3::xxh3_64(
        &[clock.to_le_bytes(), (std::process::id() as u64).to_le_bytes(), (index as u64).to_le_bytes()].concat(),
    );
    let w = Rc::new(Worker {
        index,
        shard: RefCell::new(Shard::new(ShardSetup { index, cfg, routes, admission, seed })),
        actions: RefCell::new(Vec::new()),
        clients: RefCell::new(Vec::new()),
        backends: RefCell::new(Vec::new()),
        stopping: Cell::new(false),
        accept_stops: RefCell::new(Vec::new()),
        accept_loops: Cell::new(0),
        sessions_gone: Notify::new(),
        stop_done: Notify::new(),
        drain_until: Cell::new(Instant::now()),
        stop_deadline: Cell::new(Instant::now()),
        access_tx: RefCell::new(Some(access_tx)),
        finishing: Cell::new(0),
        announcer,
        announcements,
        heartbeats,
        overload,
        spans_tx,
        grpc_name: Rc::from(format!("{}-{index}", node_name)),
        read_buf: RefCell::new(bytes::BytesMut::with_capacity(client::WORKER_READ_BUF)),
        frozen: Cell::new(false),
        live_upgrade,
        uring: io_driver == "io_uring",
        deferred: RefCell::new(Vec::new()),
        deferred_cmds: RefCell::new(Vec::new()),
        commands: RefCell::new(None),
        thawed_epoch: Cell::new(0),
        stashed_thaw: RefCell::new(None),
        frozen_at: Cell::new(None),
    });
    match cpu {
        Some(cpu) => tracing::info!(worker = index, cpu, io_driver, "worker started"),
        None => tracing::info!(worker = index, io_driver, "worker started (not pinned)"),
    }
    let _ = ready.send(Ok(info));
    for listener in monoio_listeners {
        monoio::spawn(client::accept_loop(w.clone(), listener));
    }
    monoio::spawn(tick_loop(w.clone(), commands));
    w.stop_done.notified().await;
}

async fn tick_loop(w: Rc<Worker>, commands: Receiver<WorkerCommand>) {
    *w.commands.borrow_mut() = Some(commands);
    let mut last_sweep = Instant::now();
    let mut last_evict = Instant::now();
    let mut last_overload = Instant::now();
    loop {
        // While a live upgrade runs, commands (freeze, adopt) are picked up
        // every millisecond: each tick of delay is pause for every session.
        let tick = if crate::upgrade::in_progress() { UPGRADE_TICK } else { TICK };
        monoio::time::sleep(tick).await;
        w.heartbeats.beat(w.index);
        for _ in 0..MAX_COMMANDS_PER_TICK {
            // Borrowed for the receive only: a command may drop the channel
            // (a retired worker answers nothing any more).
            let next = w.commands.borrow().as_ref().map(|rx| rx.try_recv());
            let Some(next) = next else { return };
            match next {
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
        let sweep = now.duration_since(last_sweep) >= SWEEP_EVERY;
        if sweep {
            last_sweep = now;
        }
        let evict = now.duration_since(last_evict) >= IP_EVICT_EVERY;
        if evict {
            last_evict = now;
        }
        if !w.frozen.get() {
            // Announcements after commands: a storm of them never delays a
            // route, config, stats or stop command. Frozen for a live
            // upgrade, they wait in the (bounded) queue.
            for _ in 0..crate::relay::MAX_PER_TICK {
                let Ok(a) = w.announcements.try_recv() else { break };
                w.with_shard(|sh| sh.announce(&a, now));
            }
            w.with_shard(|sh| sh.tick(now, sweep, evict));
            if now.duration_since(last_overload) >= crate::overload::MEASURE_EVERY {
                last_overload = now;
                w.overload_turn(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_worker_to_apply_a_snapshot_is_told_it_was_the_last() {
        let u = RouteUpdate::new(Arc::new(RouteTable::default()), Instant::now(), 3);
        let copies: Vec<RouteUpdate> = (0..3).map(|_| u.clone()).collect();
        let last: Vec<bool> = copies.iter().map(|c| c.applied_by_one()).collect();
        assert_eq!(last, [false, false, true]);
        // A single worker is always the last.
        assert!(RouteUpdate::new(Arc::new(RouteTable::default()), Instant::now(), 1).applied_by_one());
    }

    /// The most a busy task yields in the starvation test: far more than
    /// the rounds a fair runtime needs to serve a socket (and far longer
    /// than the writer thread's 10 ms pause).
    const BUSY_YIELDS: u32 = 5_000_000;

    /// A task that keeps the run queue non-empty (it yields in a loop, as a
    /// reader of a flooding client does) must not starve sockets: bytes that
    /// arrive while it is busy are read while it is still busy, on a
    /// readiness-mode socket (clients) and a completion-mode one (backends).
    /// Upstream monoio put a self-woken task in front of the queue and, on
    /// io_uring with DEFER_TASKRUN, collected no completion until the queue
    /// emptied: the reads completed only once the busy task ended
    /// (`fault_matrix::client_flood` flaked on it).
    async fn busy_task_does_not_starve_sockets() {
        use monoio::io::AsyncReadRentExt;
        use tokio::io::AsyncReadExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut peers, mut socks) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            peers.push(std::net::TcpStream::connect(addr).unwrap());
            let (s, _) = listener.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            socks.push(monoio::net::TcpStream::from_std(s).unwrap());
        }
        let mut completion = socks.pop().unwrap();
        let mut readiness = socks.pop().unwrap().try_into_poll_io().map_err(|(e, _)| e).unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            for p in &mut peers {
                std::io::Write::write_all(p, b"ping").unwrap();
            }
            peers
        });
        let yields = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let done = std::rc::Rc::new(std::cell::Cell::new(0u8));
        let (y, d) = (yields.clone(), done.clone());
        let busy = monoio::spawn(async move {
            while y.get() < BUSY_YIELDS && d.get() < 2 {
                y.set(y.get() + 1);
                crate::notify::yield_now().await;
            }
        });
        let (y, d) = (yields.clone(), done.clone());
        let a = monoio::spawn(async move {
            let mut buf = [0u8; 4];
            readiness.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            d.set(d.get() + 1);
            y.get()
        });
        let (y, d) = (yields.clone(), done.clone());
        let b = monoio::spawn(async move {
            let (res, buf) = completion.read_exact(vec![0u8; 4]).await;
            res.unwrap();
            assert_eq!(&buf[..], b"ping");
            d.set(d.get() + 1);
            y.get()
        });
        let (at_a, at_b) = (a.await, b.await);
        busy.await;
        let _peers = writer.join().unwrap();
        assert!(at_a < BUSY_YIELDS, "readiness-mode read starved: done after all {at_a} yields of a busy task");
        assert!(at_b < BUSY_YIELDS, "completion-mode read starved: done after all {at_b} yields of a busy task");
    }

    #[test]
    fn a_busy_task_does_not_starve_sockets_on_io_uring() {
        let mut rt = uring_runtime().expect("io_uring runtime (the test machine has it)");
        rt.block_on(busy_task_does_not_starve_sockets());
    }

    #[test]
    fn a_busy_task_does_not_starve_sockets_on_epoll() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(busy_task_does_not_starve_sockets());
    }
}
