//! The engine: binds the listeners, starts one worker per core, and gives the
//! control side a handle to talk to them.
//!
//! [`Gateway::start`] binds every worker's SO_REUSEPORT listener up front (so
//! a bad address fails the start, not a worker), spawns the named worker
//! threads and waits until each reports its runtime up. The handle then
//! broadcasts commands ([`Gateway::broadcast`]), merges counters
//! ([`Gateway::stats`]) and stops the workers ([`Gateway::stop`]).

use crate::config::Config;
use crate::routing::RouteTable;
use crate::stats::WorkerStats;
use crate::worker::{self, WorkerCommand, WorkerInfo, WorkerSetup};
use crossbeam_channel::{bounded, Sender};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Listen backlog per worker socket.
pub(crate) const LISTEN_BACKLOG: i32 = 4096;
/// How long a worker may take to report its runtime up.
pub(crate) const WORKER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain: time to close the remaining sessions and flush queues.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a stats request waits for each worker.
pub(crate) const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Descriptors kept free of client connections and backend connections:
/// 64 for the process's own (admin listener, Redis, log files, stdio, the
/// runtime) and 64 for the admin server's connections (its cap).
pub const FD_RESERVE: u64 = 128;
/// Per worker on top: its listener, its io_uring or epoll instance, eventfds.
pub const FD_RESERVE_PER_WORKER: u64 = 4;

/// How `max_connections` fits the open-file limit (`RLIMIT_NOFILE`): what
/// the limit is, whether the start raised it, and the cap the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft limit in force (after raising, when it was raised).
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before the start raised it.
    pub raised_from: Option<u64>,
    /// `limits.max_connections` as the config gives it.
    pub configured_max_connections: u64,
    /// What the workers enforce: the configured value, or lower so that it fits.
    pub effective_max_connections: u64,
    /// Backend connections the static routes may open (every worker, every
    /// endpoint: `connections_per_endpoint` for gate, 1 for grpc,
    /// `seed_pool_max` for seed_tcp). Redis routes add to it at run time.
    pub backend_estimate: u64,
    /// [`FD_RESERVE`] plus [`FD_RESERVE_PER_WORKER`] per worker.
    pub reserve: u64,
}

impl FdBudget {
    /// Descriptors the configured cap needs.
    pub fn needed(&self) -> u64 {
        self.configured_max_connections.saturating_add(self.backend_estimate).saturating_add(self.reserve)
    }

    /// Whether the cap had to be lowered.
    pub fn lowered(&self) -> bool {
        self.effective_max_connections < self.configured_max_connections
    }
}

/// Backend connections `cfg`'s static routes may open, over all workers.
fn backend_estimate(cfg: &Config) -> u64 {
    use crate::routing::BackendProtocol;
    let mut seen = std::collections::HashSet::new();
    let mut per_worker = 0u64;
    for r in &cfg.routes {
        for e in &r.endpoints {
            if seen.insert((e.addr, r.backend_protocol)) {
                per_worker += match r.backend_protocol {
                    BackendProtocol::Gate => cfg.backend.connections_per_endpoint.max(1) as u64,
                    BackendProtocol::Grpc => 1,
                    BackendProtocol::SeedTcp => cfg.backend.seed_pool_max as u64,
                };
            }
        }
    }
    per_worker.saturating_mul(cfg.server.workers.max(1) as u64)
}

/// `(soft, hard)` `RLIMIT_NOFILE`.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
fn nofile() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur as u64, l.rlim_max as u64))
}

fn set_nofile_soft(soft: u64, hard: u64) -> std::io::Result<()> {
    let l = libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: hard as libc::rlim_t };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The budget for `cfg` under the limits `(soft, hard)`: the effective cap
/// fits the soft limit, never below 1.
pub fn fd_budget_for(cfg: &Config, soft: u64, hard: u64) -> FdBudget {
    let reserve = FD_RESERVE + FD_RESERVE_PER_WORKER * cfg.server.workers.max(1) as u64;
    let backend_estimate = backend_estimate(cfg);
    let room = soft.saturating_sub(reserve).saturating_sub(backend_estimate);
    let configured = cfg.limits.max_connections;
    FdBudget {
        soft,
        hard,
        raised_from: None,
        configured_max_connections: configured,
        effective_max_connections: configured.min(room).max(1),
        backend_estimate,
        reserve,
    }
}

/// Fits `cfg.limits.max_connections` to the open-file limit: when the
/// configured cap, the backend connections and the reserve need more than
/// the soft limit, raises the soft limit towards the hard one (`raise`; the
/// start does, `--check-config` only tells what the start would do), then
/// lowers the cap to what fits. Logs what it did. `None` when the limit
/// cannot be read (nothing changes).
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
pub fn fit_fd_limit(cfg: &Config, raise: bool) -> Option<FdBudget> {
    let (soft, hard) = match nofile() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; max_connections is not checked against it");
            return None;
        }
    };
    let mut b = fd_budget_for(cfg, soft, hard);
    let needed = b.needed();
    if needed > soft && hard > soft {
        // Up to the hard limit (RLIM_INFINITY is not allowed for descriptors:
        // then only as far as needed).
        let target = if hard == libc::RLIM_INFINITY as u64 { needed } else { hard };
        let result = if raise { set_nofile_soft(target, hard) } else { Ok(()) };
        match result {
            Ok(()) => {
                b = FdBudget { raised_from: Some(soft), ..fd_budget_for(cfg, target, hard) };
                if raise {
                    tracing::info!(
                        from = soft,
                        to = target,
                        hard,
                        max_connections = b.configured_max_connections,
                        needed,
                        "raised the open-file soft limit (RLIMIT_NOFILE) for max_connections"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-file soft limit (RLIMIT_NOFILE)"),
        }
    }
    Some(b)
}

/// Warns when `max_connections` had to be lowered to fit the open-file limit
/// (at start, and on a reload that changes the outcome: not on every reload).
pub fn report_fd_fit(b: &FdBudget) {
    if b.lowered() {
        tracing::warn!(
            max_connections = b.configured_max_connections,
            open_file_limit = b.soft,
            hard_limit = b.hard,
            backend_estimate = b.backend_estimate,
            reserve = b.reserve,
            effective_max_connections = b.effective_max_connections,
            "limits.max_connections {} does not fit the open-file limit {} (RLIMIT_NOFILE; {} backend connections and {} reserved): \
             lowered to {}; raise the limit (ulimit -n, LimitNOFILE=) to serve more",
            b.configured_max_connections,
            b.soft,
            b.backend_estimate,
            b.reserve,
            b.effective_max_connections
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start worker thread: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Worker(String),
}

struct WorkerHandle {
    tx: Sender<WorkerCommand>,
    join: Option<JoinHandle<()>>,
    info: WorkerInfo,
}

pub struct Gateway {
    workers: Vec<WorkerHandle>,
    /// Every worker's announcement queue.
    announcer: crate::relay::Announcer,
    /// Every worker's last loop turn (liveness).
    heartbeats: crate::relay::Heartbeats,
    /// The node-wide budget of bytes queued towards clients.
    overload: Arc<crate::overload::Overload>,
    /// Ends once every worker (holding the senders) is gone.
    access_writer: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    pub cfg: Arc<Config>,
    /// How `max_connections` fits the open-file limit (checked at start;
    /// `cfg.limits.max_connections` holds the effective cap).
    pub fd_budget: Option<FdBudget>,
    /// The listening sockets, kept for a live upgrade.
    listeners: crate::upgrade::Listeners,
    /// Each worker's listeners, until [`Gateway::start_accepting`].
    deferred: std::sync::Mutex<Vec<Vec<std::net::TcpListener>>>,
}

/// A cloneable way to reach the workers (for the admin server and tools).
#[derive(Clone)]
pub struct GatewayHandle {
    txs: Vec<Sender<WorkerCommand>>,
    infos: Vec<WorkerInfo>,
    announcer: crate::relay::Announcer,
    heartbeats: crate::relay::Heartbeats,
    overload: Arc<crate::overload::Overload>,
}

/// One SO_REUSEPORT listener socket.
pub(crate) fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock.into())
}

impl Gateway {
    pub fn start(cfg: Config, routes: Arc<RouteTable>) -> Result<Gateway, StartError> {
        Gateway::start_with(cfg, routes, Vec::new(), false)
    }

    /// Starts on `inherited` listening sockets (a live upgrade's, all
    /// bound to one address; `[server] listen` is then not bound): worker
    /// `j` of `n` serves sockets `j`, `j + n`, ...; workers beyond them bind
    /// more SO_REUSEPORT sockets on the same address. With `defer_accept`
    /// the workers start without accepting until [`Gateway::start_accepting`]
    /// (a live upgrade takes the old process's sessions first; connections
    /// meanwhile wait in the sockets' backlog, refused by nobody).
    pub fn start_with(
        mut cfg: Config,
        routes: Arc<RouteTable>,
        inherited: Vec<std::net::TcpListener>,
        defer_accept: bool,
    ) -> Result<Gateway, StartError> {
        // Startup check: max_connections must fit the open-file limit, or
        // connections past it would sit unserved (accept fails with EMFILE).
        let fd_budget = fit_fd_limit(&cfg, true);
        if let Some(b) = &fd_budget {
            report_fd_fit(b);
            cfg.limits.max_connections = b.effective_max_connections;
        }
        let cfg = Arc::new(cfg);
        let n = cfg.server.workers.max(1);
        // The first bind resolves port 0; the rest join its SO_REUSEPORT group.
        let mut listeners: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
        let local_addr = match inherited.first() {
            Some(l) => l.local_addr().map_err(|source| StartError::Listen { addr: cfg.server.listen, source })?,
            None => {
                let first = reuseport_listener(cfg.server.listen)
                    .map_err(|source| StartError::Listen { addr: cfg.server.listen, source })?;
                let addr =
                    first.local_addr().map_err(|source| StartError::Listen { addr: cfg.server.listen, source })?;
                listeners[0].push(first);
                addr
            }
        };
        for (i, l) in inherited.into_iter().enumerate() {
            listeners[i % n].push(l);
        }
        // Workers beyond the inherited sockets bind their own; a takeover
        // binds them only once it has committed (`start_accepting`), so a
        // failed one leaves no socket the kernel routed connections to.
        if !defer_accept {
            for l in listeners.iter_mut().filter(|l| l.is_empty()) {
                l.push(
                    reuseport_listener(local_addr).map_err(|source| StartError::Listen { addr: local_addr, source })?,
                );
            }
        }
        // Duplicates kept for a live upgrade (dropped when a drain begins).
        let mut dups = Vec::new();
        for (i, ls) in listeners.iter().enumerate() {
            for l in ls {
                dups.push((i, l.try_clone().map_err(|source| StartError::Listen { addr: local_addr, source })?));
            }
        }
        let kept = crate::upgrade::Listeners::new(dups);
        let mut deferred = Vec::new();
        if defer_accept {
            deferred = std::mem::take(&mut listeners);
            listeners = (0..n).map(|_| Vec::new()).collect();
        }
        // Connections spread by the kernel's 4-tuple hash; per-IP limits and
        // the connection cap are exact through the shared admission table.
        let admission = Arc::new(crate::limits::SharedAdmission::default());
        let (access_tx, access_writer) =
            crate::access_log::spawn_writer(cfg.log.access_log_path.clone()).map_err(|e| {
                let path = cfg.log.access_log_path.as_ref().map(|p| p.display().to_string());
                StartError::Worker(format!("access log {}: {e}", path.as_deref().unwrap_or("stdout")))
            })?;
        let (ready_tx, ready_rx) = bounded(n);
        // Announcements a backend sends to one worker reach every worker's
        // own bounded queue.
        let (announcer, mut announce_queues) = crate::relay::Announcer::new(n);
        announce_queues.reverse();
        let heartbeats = crate::relay::Heartbeats::new(n);
        let overload = Arc::new(crate::overload::Overload::new(n, cfg.limits.overload_queued_bytes));
        tracing::info!(
            budget_bytes = overload.budget,
            from = %overload.budget_source,
            "overload: bytes queued towards clients are budgeted"
        );
        // Trace export, off the data path, when an OTLP endpoint is set.
        let otlp_stats = Arc::new(crate::otlp::ExportStats::default());
        let spans_tx = match &cfg.otlp.endpoint {
            Some(endpoint) => Some(
                crate::otlp::spawn_exporter(endpoint.clone(), cfg.otlp.resource.clone(), otlp_stats.clone())
                    .map_err(StartError::Spawn)?,
            ),
            None => None,
        };
        let mut workers = Vec::with_capacity(n);
        for (index, listener) in listeners.into_iter().enumerate() {
            let (tx, rx) = bounded(worker::COMMAND_CHANNEL_DEPTH);
            let cpu = cfg.server.cpus.get(index).copied();
            let setup = WorkerSetup {
                index,
                cpu,
                cfg: cfg.clone(),
                routes: routes.clone(),
                listeners: listener,
                commands: rx,
                ready: ready_tx.clone(),
                admission: admission.clone(),
                access_tx: access_tx.clone(),
                announcer: announcer.clone(),
                announcements: announce_queues.pop().expect("one announcement queue per worker"),
                heartbeats: heartbeats.clone(),
                overload: overload.clone(),
                spans_tx: spans_tx.clone(),
            };
            let join = std::thread::Builder::new()
                .name(format!("gw-worker-{index}"))
                .spawn(move || worker::run(setup))
                .map_err(StartError::Spawn)?;
            workers.push(WorkerHandle {
                tx,
                join: Some(join),
                info: WorkerInfo { index, cpu, numa_node: None, io_driver: "starting" },
            });
        }
        let deadline = Instant::now() + WORKER_START_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(Ok(info)) => {
                    let i = info.index;
                    workers[i].info = info;
                }
                Ok(Err(e)) => {
                    drop(access_tx);
                    let gw = Gateway {
                        workers,
                        announcer,
                        heartbeats,
                        overload,
                        access_writer: Some(access_writer),
                        local_addr,
                        cfg,
                        fd_budget,
                        listeners: kept.clone(),
                        deferred: std::sync::Mutex::new(deferred),
                    };
                    gw.stop(Duration::from_secs(1));
                    return Err(StartError::Worker(e));
                }
                Err(_) => return Err(StartError::Worker("a worker did not start in time".into())),
            }
        }
        drop(spans_tx);
        tracing::info!(listen = %local_addr, workers = n, io_driver = workers[0].info.io_driver, "gateway listening");
        drop(access_tx);
        Ok(Gateway {
            workers,
            announcer,
            heartbeats,
            overload,
            access_writer: Some(access_writer),
            local_addr,
            cfg,
            fd_budget,
            listeners: kept.clone(),
            deferred: std::sync::Mutex::new(deferred),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.iter().map(|w| w.info.clone()).collect()
    }

    /// How many workers run.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            txs: self.workers.iter().map(|w| w.tx.clone()).collect(),
            infos: self.workers(),
            announcer: self.announcer.clone(),
            heartbeats: self.heartbeats.clone(),
            overload: self.overload.clone(),
        }
    }

    pub fn broadcast(&self, make: impl Fn() -> WorkerCommand) {
        self.handle().broadcast(make)
    }

    pub fn stats(&self) -> WorkerStats {
        self.handle().stats()
    }

    /// Stops every worker (sessions get `DISCONNECT` reason 6) and joins them,
    /// waiting at most `timeout` for sessions and queues to finish.
    /// Stops every worker and joins them: no new connections, sessions get
    /// `drain` to end by themselves, then the rest are closed (`DISCONNECT`
    /// reason 6) and backend queues flushed within [`STOP_GRACE`].
    pub fn stop(mut self, drain: Duration) {
        self.stop_and_join(drain);
        tracing::info!("all workers stopped");
    }

    /// Workers started with `defer_accept` begin accepting.
    pub fn start_accepting(&self) {
        let deferred = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for (i, (w, mut ls)) in self.workers.iter().zip(deferred).enumerate() {
            if ls.is_empty() {
                // More workers than inherited sockets: this one binds its own.
                match reuseport_listener(self.local_addr) {
                    Ok(l) => {
                        if let Ok(dup) = l.try_clone() {
                            self.listeners.add(i, dup);
                        }
                        ls.push(l);
                    }
                    Err(e) => {
                        tracing::error!(worker = i, addr = %self.local_addr, error = %e, "cannot listen: this worker takes no new connections");
                        continue;
                    }
                }
            }
            if w.tx.send_timeout(WorkerCommand::Listen(ls), Duration::from_secs(1)).is_err() {
                tracing::error!(worker = w.info.index, "worker command channel full: it does not accept");
            }
        }
    }

    /// Each worker's command channel.
    pub fn worker_senders(&self) -> Vec<Sender<WorkerCommand>> {
        self.workers.iter().map(|w| w.tx.clone()).collect()
    }

    /// What a live upgrade hands over from this process.
    pub fn upgrade_source(&self) -> crate::upgrade::Source {
        crate::upgrade::Source {
            workers: self.workers.iter().map(|w| w.tx.clone()).collect(),
            listeners: self.listeners.clone(),
            local_addr: self.local_addr,
        }
    }

    /// Waits for every worker thread to end (after a live upgrade retired them).
    pub fn join(mut self) {
        self.listeners.close();
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
        }
        // The access-log writer ends with its last sender (the workers').
        if let Some(j) = self.access_writer.take() {
            let _ = j.join();
        }
    }

    fn stop_and_join(&mut self, drain: Duration) {
        // The port closes with the workers' listeners, as before.
        self.listeners.close();
        let drain_until = Instant::now() + drain;
        let deadline = drain_until + STOP_GRACE;
        for w in &self.workers {
            if w.join.is_some() {
                let _ = w.tx.send_timeout(WorkerCommand::Stop { drain_until, deadline }, Duration::from_secs(1));
            }
        }
        for w in &mut self.workers {
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
        }
        if let Some(j) = self.access_writer.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Gateway {
    /// A gateway dropped without `stop` (tests, start errors) still stops its
    /// workers, with a short deadline.
    fn drop(&mut self) {
        self.stop_and_join(Duration::ZERO);
    }
}

impl GatewayHandle {
    /// Queues an announcement for every worker, without waiting; returns
    /// how many workers took it (a full queue drops it there, counted).
    pub fn announce(&self, a: Arc<crate::shard::Announcement>, source: crate::relay::Source) -> usize {
        self.announcer.announce(a, source)
    }

    pub fn announce_stats(&self) -> &crate::relay::AnnounceStats {
        &self.announcer.stats
    }

    /// Every worker's last loop turn.
    pub fn heartbeats(&self) -> &crate::relay::Heartbeats {
        &self.heartbeats
    }

    /// The overload manager's budget, state and counters.
    pub fn overload(&self) -> &crate::overload::Overload {
        &self.overload
    }

    pub fn workers(&self) -> &[WorkerInfo] {
        &self.infos
    }

    /// Ends a drain now: remaining sessions are closed (reason 6) at once.
    pub fn hard_stop(&self) {
        let now = Instant::now();
        for tx in &self.txs {
            let _ = tx.try_send(WorkerCommand::Stop { drain_until: now, deadline: now + STOP_GRACE });
        }
    }

    /// Sends a command built by `make` to every worker.
    pub fn broadcast(&self, make: impl Fn() -> WorkerCommand) {
        for (i, tx) in self.txs.iter().enumerate() {
            if tx.send_timeout(make(), Duration::from_secs(1)).is_err() {
                tracing::error!(worker = i, "worker command channel full or closed");
            }
        }
    }

    /// Per-worker counters (in worker order); a worker that does not answer
    /// in time is reported as `None`.
    pub fn worker_stats(&self) -> Vec<Option<WorkerStats>> {
        let rxs: Vec<_> = self
            .txs
            .iter()
            .map(|tx| {
                let (rtx, rx) = bounded(1);
                let _ = tx.try_send(WorkerCommand::Stats(rtx));
                rx
            })
            .collect();
        let deadline = Instant::now() + STATS_TIMEOUT;
        rxs.into_iter().map(|rx| rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()).collect()
    }

    /// Counters merged over all workers.
    pub fn stats(&self) -> WorkerStats {
        merge_stats(self.worker_stats().iter().flatten())
    }
}

/// Adds per-worker counters together (`workers` counts the inputs).
pub(crate) fn merge_stats<'a>(per: impl IntoIterator<Item = &'a WorkerStats>) -> WorkerStats {
    let mut total = WorkerStats { workers: 0, route_version: u64::MAX, ..Default::default() };
    for s in per {
        total.merge(s);
        total.workers += 1;
    }
    if total.workers == 0 {
        total.route_version = 0;
    }
    total
}

#[cfg(test)]
mod fd_tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_str(text, "t.toml").unwrap()
    }

    #[test]
    fn max_connections_is_lowered_to_fit_the_soft_limit() {
        let c = cfg("[server]\nworkers = 2\n[limits]\nmax_connections = 1000\n[[routes]]\nserver_type = 10\nstrategy = \"round_robin\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n");
        let b = fd_budget_for(&c, 256, 256);
        assert_eq!(b.backend_estimate, 4, "2 endpoints x 1 connection x 2 workers");
        assert_eq!(b.reserve, FD_RESERVE + 2 * FD_RESERVE_PER_WORKER);
        assert_eq!(b.effective_max_connections, 256 - 4 - b.reserve);
        assert!(b.lowered() && b.needed() == 1000 + 4 + b.reserve);
        let roomy = fd_budget_for(&c, 1 << 20, 1 << 20);
        assert_eq!(roomy.effective_max_connections, 1000);
        assert!(!roomy.lowered());
        assert_eq!(fd_budget_for(&c, 10, 10).effective_max_connections, 1, "never below 1");
    }
}
