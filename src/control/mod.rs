//! The control side: the control loop, config reload, Redis routes,
//! snapshots, stop.
//!
//! It runs on the main thread (plus a signal thread, a name lookup thread,
//! with Redis a subscriber thread, with Consul a watcher thread per
//! service), never on a worker core. Parts:
//! - this module: [`Control::run`], the loop;
//! - [`reload`]: config reload and the restart-only keys;
//! - [`redis`]: the Redis reader and notify subscriber;
//! - [`consul`]: Consul discovery with blocking queries, and how its
//!   endpoints fill rules;
//! - [`resolve`]: endpoint host names, cached and looked up again;
//! - [`routes`]: route documents (Redis JSON, realm mapping, rule files),
//!   parsed and validated, merged with the static rules, fingerprinted;
//! - [`logging`]: the tracing subscriber and its live level.
//!
//! The loop waits on one channel of [`ControlEvent`]s with a timeout that
//! serves as its clock:
//! - SIGHUP, or a changed config file mtime (polled every [`FILE_POLL`]):
//!   reload the config;
//! - a Redis notify (or the periodic `refresh_interval`): re-read Redis;
//! - a Consul answer or failure from a watcher: keep the service's answer
//!   (or its last good one) and republish;
//! - a batch of name lookups (every `backend.resolve_interval`, and after a
//!   dial to a named endpoint failed): republish when an address changed;
//! - SIGINT / SIGTERM, or the admin's drain call: stop (the signal thread
//!   ends the drain at once on a second signal, exits on a third).
//!
//! Every route change goes through [`Control::publish`]: static rules
//! overlaid with the last good Redis data, names resolved from the cache,
//! Consul's endpoints in the rules that list none, published as a new versioned
//! snapshot to every worker only when its content changed. Invalid Redis data
//! is rejected whole (logged with every reason, counted) and the last good
//! data stays; Redis unreachable keeps the last good snapshot too, retried
//! with capped backoff, logged once per state change. What the admin side
//! reports is written to the shared [`ControlStats`].

pub mod consul;
pub mod logging;
pub mod redis;
mod reload;
mod resolve;
pub mod routes;

use self::redis::{FetchError, RedisError, RedisRead, RedisSource};
use self::resolve::Names;
use self::routes::{fingerprint, merge, RouteSet};
use crate::config::{Config, Environment};
use crate::gateway::Gateway;
use crate::routing::RouteTable;
use crate::state::{ControlEvent, ControlSender, ControlStats, ErrorSource, RedisState, RouteLabels, RouteSource};
use crate::worker::{RouteUpdate, WorkerCommand};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often the config file's mtime is checked.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Redis retry backoff while it is unreachable (doubles, capped).
const REDIS_RETRY_MIN: Duration = Duration::from_millis(200);
const REDIS_RETRY_MAX: Duration = Duration::from_secs(5);
/// Redis re-read period when no `[redis]` section gives one (never used in
/// practice: without `[redis]` there is nothing to read).
const DEFAULT_REFRESH: Duration = Duration::from_secs(10);
/// With Consul, `/ready` waits this long at most for every watched
/// service's first answer (or failure).
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(3);
/// How often the workers' dial failures to named endpoints are checked
/// (a failure asks for a new lookup of the name).
const DIAL_CHECK: Duration = Duration::from_secs(5);
/// Distinct route-data warnings remembered (each is logged once).
const WARNED_MAX: usize = 4096;

/// Why the control loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the {name} thread: {source}")]
    Thread { name: &'static str, source: std::io::Error },
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl ControlError {
    fn thread(name: &'static str) -> impl FnOnce(std::io::Error) -> ControlError {
        move |source| ControlError::Thread { name, source }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The route snapshot the static config describes.
pub fn static_routes(cfg: &Config, version: u64) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(version, cfg.routes.clone(), vec![]))
}

pub struct Control {
    path: PathBuf,
    /// The environment `main` read, applied again on every reload.
    env: Environment,
    running: Arc<Config>,
    gw: Gateway,
    stats: Arc<ControlStats>,
    redis: Option<RedisSource>,
    /// Last good Redis data (None until the first good read).
    redis_set: Option<RouteSet>,
    redis_up: Option<bool>,
    /// The last read found no rules key while last good Redis routes were
    /// held (logged once per change).
    redis_empty: bool,
    next_fetch: Instant,
    fetch_backoff: Duration,
    version: u64,
    /// Fingerprint of the last published route set.
    published: u64,
    mtime: Option<SystemTime>,
    /// Modification time of `[admin] token_file`: a new token reloads too.
    token_mtime: Option<SystemTime>,
    /// The TLS certificate and key files' modification times.
    tls_mtime: Vec<Option<SystemTime>>,
    stop_sub: Arc<AtomicBool>,
    /// Consul discovery (None without `[consul]`).
    consul: Option<consul::Discovery>,
    /// Endpoint host names -> addresses.
    names: Names,
    /// When the last periodic lookup of every name was asked for.
    last_lookup: Instant,
    /// Host names in the last built route set.
    in_use: BTreeSet<Arc<str>>,
    /// Route-data warnings already logged and counted.
    warned: HashSet<String>,
    /// Dial failures per named endpoint at the last check.
    dial_failures: HashMap<Arc<str>, u64>,
    next_dial_check: Instant,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// What reaches the control loop: its event channel and the stop and reload
/// signals, caught from the moment this exists (a SIGHUP or SIGTERM that
/// arrives while the gateway starts waits here instead of killing it).
pub struct ControlChannel {
    /// Hand a clone to the admin server (drain calls).
    pub tx: ControlSender,
    rx: Receiver<ControlEvent>,
    signals: signal_hook::iterator::Signals,
}

impl Control {
    /// The control loop's channel, with SIGINT, SIGTERM and SIGHUP caught
    /// from now on; create it before starting the gateway, hand its sender
    /// to the admin server, then call [`Control::run`].
    pub fn channel() -> Result<ControlChannel, ControlError> {
        let (tx, rx) = unbounded();
        let signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR2])
            .map_err(ControlError::Signals)?;
        Ok(ControlChannel { tx, rx, signals })
    }

    /// Takes over the calling thread until the gateway stopped.
    pub fn run(
        gw: Gateway,
        path: &Path,
        env: Environment,
        stats: Arc<ControlStats>,
        channel: ControlChannel,
    ) -> Result<(), ControlError> {
        let ControlChannel { tx, rx, mut signals } = channel;
        let running = gw.cfg.clone();
        let sig_tx = tx.clone();
        let hard = gw.handle();
        std::thread::Builder::new()
            .name("gw-signals".into())
            .spawn(move || {
                let mut stops = 0;
                for sig in signals.forever() {
                    if sig != libc::SIGHUP && sig != libc::SIGUSR2 {
                        stops += 1;
                        if stops == 2 {
                            // Second INT/TERM: end the drain now (sessions closed
                            // with DISCONNECT 6, queues flushed), then exit.
                            tracing::warn!(signal = sig, "second stop signal: hard stop");
                            hard.hard_stop();
                            continue;
                        }
                        if stops > 2 {
                            eprintln!("third stop signal: exiting now");
                            std::process::exit(0);
                        }
                    }
                    let _ = sig_tx.send(ControlEvent::Signal(sig));
                }
            })
            .map_err(|source| ControlError::Thread { name: "gw-signals", source })?;
        if let Some(path) = &running.server.upgrade_socket {
            let done_tx = tx.clone();
            let done = move || {
                let _ = done_tx.send(ControlEvent::HandedOver);
            };
            let peer_exe = running.server.upgrade_peer_exe.clone();
            if let Err(e) = crate::upgrade::serve(path, peer_exe, gw.upgrade_source(), done) {
                tracing::error!(socket = %path.display(), error = %e, "live upgrade socket: cannot listen; live upgrade is off");
            }
        }
        let stop_sub = Arc::new(AtomicBool::new(false));
        // A Redis notification waits in this loop's channel (see
        // `redis::spawn_subscriber`).
        let notify_pending = Arc::new(AtomicBool::new(false));
        let redis = match &running.redis {
            Some(rc) => {
                let src = RedisSource::new(rc)?;
                let workers = gw.handle();
                let refused = stats.clone();
                let pending = notify_pending.clone();
                self::redis::spawn_subscriber(
                    rc,
                    tx.clone(),
                    || ControlEvent::RedisNotify { at: Instant::now() },
                    // Straight to the workers' bounded queues, not through
                    // this loop: signals and reloads never wait behind them.
                    move |json| match crate::state::parse_announcement(&json) {
                        Ok(a) => {
                            workers.announce(Arc::new(a), crate::relay::Source::Redis);
                        }
                        Err(e) => {
                            let n = refused.announcements_refused.fetch_add(1, Ordering::Relaxed) + 1;
                            // One line for the first and then every 1000th.
                            if n == 1 || n.is_multiple_of(1000) {
                                tracing::warn!(error = %e, refused = n, "redis broadcast message refused");
                            }
                        }
                    },
                    pending,
                    stop_sub.clone(),
                )?;
                stats.redis_state.store(RedisState::Down);
                Some(src)
            }
            None => None,
        };
        let lookups = resolve::spawn_lookups(tx.clone()).map_err(ControlError::thread("gw-resolve"))?;
        let discovery = match &running.consul {
            Some(cc) => {
                consul::spawn_watchers(cc, tx.clone(), stop_sub.clone()).map_err(ControlError::thread("gw-consul"))?;
                stats.consul_state.store(RedisState::Down);
                stats.discovery.lock().unwrap().consul_address = Some(cc.address.clone());
                Some(consul::Discovery::new(cc.clone()))
            }
            None => None,
        };
        let now = Instant::now();
        let mut c = Control {
            path: path.to_path_buf(),
            env,
            mtime: mtime(path),
            token_mtime: running.admin.token_file.as_deref().and_then(mtime),
            tls_mtime: Vec::new(),
            running,
            gw,
            stats,
            redis,
            redis_set: None,
            redis_up: None,
            redis_empty: false,
            next_fetch: Instant::now(),
            fetch_backoff: REDIS_RETRY_MIN,
            version: 1,
            published: 0,
            stop_sub,
            consul: discovery,
            names: Names::new(Some(lookups)),
            last_lookup: now,
            in_use: BTreeSet::new(),
            warned: HashSet::new(),
            dial_failures: HashMap::new(),
            next_dial_check: now + DIAL_CHECK,
        };
        c.published = fingerprint(&merge(&c.running.routes, None));
        c.tls_mtime = c.tls_mtimes();
        *c.stats.policy_classes.lock().unwrap() = c.running.policy.classes.iter().map(|k| k.name.clone()).collect();
        *c.stats.tls_certificates.lock().unwrap() =
            c.running.tls.certificates.iter().map(|k| (k.name.clone(), k.not_after)).collect();
        let initial = merge(&c.running.routes, None);
        c.names.learn(&initial);
        c.in_use = resolve::host_names(&initial);
        c.stats.route_version.store(1, Ordering::Relaxed);
        c.stats.config_loaded_at.store(unix_now(), Ordering::Relaxed);
        *c.stats.route_source.lock().unwrap() = RouteSource::Static;
        if c.redis.is_some() {
            c.fetch_redis(Instant::now());
        }
        // Ready once the routes are loaded: Redis was read (or found down)
        // above; every Consul service answered or failed once, or
        // FIRST_ANSWER_WAIT passed.
        let ready_by = now + FIRST_ANSWER_WAIT;
        let mut ready = false;
        let mut last_poll = Instant::now();
        loop {
            if !ready && (c.consul.as_ref().is_none_or(|d| d.all_reported()) || Instant::now() >= ready_by) {
                ready = true;
                c.stats.ready.store(true, Ordering::Relaxed);
            }
            let now = Instant::now();
            let mut wait = FILE_POLL.saturating_sub(now.duration_since(last_poll));
            if c.redis.is_some() {
                wait = wait.min(c.next_fetch.saturating_duration_since(now));
            }
            if !ready {
                wait = wait.min(ready_by.saturating_duration_since(now));
            }
            if let Some(due) = c.next_lookup() {
                wait = wait.min(due.saturating_duration_since(now));
            }
            if !c.in_use.is_empty() {
                wait = wait.min(c.next_dial_check.saturating_duration_since(now));
            }
            match rx.recv_timeout(wait) {
                Ok(ControlEvent::Signal(libc::SIGHUP)) => {
                    tracing::info!("SIGHUP: reloading config");
                    c.reload();
                }
                Ok(ControlEvent::Signal(libc::SIGUSR2)) => match &c.running.server.upgrade_socket {
                    Some(path) => match crate::upgrade::reexec(path) {
                        Ok(pid) => {
                            tracing::info!(pid, socket = %path.display(), "SIGUSR2: started a new process to take over")
                        }
                        Err(e) => tracing::error!(error = %e, "SIGUSR2: cannot start a new process"),
                    },
                    None => tracing::warn!("SIGUSR2 ignored: [server] upgrade_socket is not set"),
                },
                Ok(ControlEvent::Signal(sig)) if crate::upgrade::committed() => {
                    // Handed over already (the control loop has not heard
                    // yet): nothing to drain, and the upgrade socket's path
                    // is the successor's now.
                    tracing::info!(signal = sig, "stop signal after the handover committed: exiting");
                    c.handed_over_stop();
                    return Ok(());
                }
                Ok(ControlEvent::Signal(sig)) => {
                    c.stop(&format!("signal {sig}"));
                    return Ok(());
                }
                Ok(ControlEvent::HandedOver) => {
                    c.handed_over(&rx);
                    return Ok(());
                }
                Ok(ControlEvent::Drain) if crate::upgrade::committed() => {
                    tracing::info!("drain call after the handover committed: exiting");
                    c.handed_over_stop();
                    return Ok(());
                }
                Ok(ControlEvent::Drain) => {
                    c.stop("admin drain call");
                    return Ok(());
                }
                Ok(ControlEvent::RedisNotify { at }) => {
                    notify_pending.store(false, Ordering::Release);
                    c.fetch_redis(at)
                }
                Ok(ControlEvent::Discovery { service, result }) => c.on_discovery(service, result),
                Ok(ControlEvent::Resolved(results)) => c.on_resolved(results),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    unreachable!("the control loop holds a sender")
                }
            }
            let now = Instant::now();
            if now.duration_since(last_poll) >= FILE_POLL {
                last_poll = now;
                let m = mtime(&c.path);
                if m.is_some() && m != c.mtime {
                    c.mtime = m;
                    tracing::info!(path = %c.path.display(), "config file changed: reloading");
                    c.reload();
                } else if let Some(token_file) = c.running.admin.token_file.clone() {
                    let m = mtime(&token_file);
                    if m.is_some() && m != c.token_mtime {
                        c.token_mtime = m;
                        tracing::info!(path = %token_file.display(), "admin token file changed: reloading");
                        c.reload();
                    }
                }
                // TLS certificate and key files: a renewal reloads them live.
                let tls_m = c.tls_mtimes();
                if tls_m != c.tls_mtime {
                    c.tls_mtime = tls_m;
                    tracing::info!("TLS certificate files changed: reloading");
                    c.reload();
                }
            }
            if c.redis.is_some() && now >= c.next_fetch {
                c.fetch_redis(now);
            }
            if c.next_lookup().is_some_and(|due| now >= due) {
                c.last_lookup = now;
                c.lookup_all();
            }
            if !c.in_use.is_empty() && now >= c.next_dial_check {
                c.next_dial_check = now + DIAL_CHECK;
                c.check_dial_failures();
            }
        }
    }

    /// Drain, then stop. Phases, logged in order: readiness off, listeners
    /// closed, sessions drain until `drain_timeout`, the rest closed with
    /// reason 6, queues flushed, exit.
    /// A live upgrade gave everything to a new process: the workers are
    /// retiring; wait for them and exit (no drain: nothing is left here).
    fn handed_over(self, rx: &crossbeam_channel::Receiver<ControlEvent>) {
        self.stats.ready.store(false, Ordering::Relaxed);
        self.stats.handed_over.store(true, Ordering::Relaxed);
        self.stop_sub.store(true, Ordering::Relaxed);
        let wait = self.running.server.wait_after_handover;
        self.gw.join();
        if wait {
            // `after_handover = "wait"`: idle, /ready 503, until stopped.
            tracing::info!("live upgrade: everything handed over; idle until stopped (after_handover = \"wait\")");
            for ev in rx.iter() {
                match ev {
                    ControlEvent::Signal(libc::SIGHUP) | ControlEvent::Signal(libc::SIGUSR2) => {}
                    ControlEvent::Signal(_) | ControlEvent::Drain => break,
                    _ => {}
                }
            }
        }
        tracing::info!("live upgrade: everything handed over; exiting");
    }

    /// A stop signal after the handover committed: the workers are retiring
    /// (they touch no socket); wait for them and exit, whatever
    /// `after_handover` says (the signal is the request to end).
    fn handed_over_stop(self) {
        self.stats.ready.store(false, Ordering::Relaxed);
        self.stats.handed_over.store(true, Ordering::Relaxed);
        self.stop_sub.store(true, Ordering::Relaxed);
        self.gw.join();
        tracing::info!("live upgrade: everything handed over; exiting");
    }

    fn stop(self, why: &str) {
        self.stats.ready.store(false, Ordering::Relaxed);
        // A draining gateway hands nothing over: without its socket file a
        // successor started with --takeover-or-start starts on its own at
        // once instead of being refused.
        if let Some(p) = &self.running.server.upgrade_socket {
            let _ = std::fs::remove_file(p);
        }
        self.stats.draining.store(true, Ordering::Relaxed);
        let drain = self.running.server.drain_timeout;
        tracing::info!(
            cause = why,
            drain_timeout_ms = drain.as_millis() as u64,
            "drain started: /ready is 503, no new connections"
        );
        self.stop_sub.store(true, Ordering::Relaxed);
        self.gw.stop(drain);
        tracing::info!("stopped");
    }

    /// Reads Redis; keeps the last good data on any failure. `origin`: when
    /// the cause of the read (a notify, the refresh timer) reached us.
    fn fetch_redis(&mut self, origin: Instant) {
        let Some(src) = self.redis.as_mut() else {
            return;
        };
        let refresh = self.running.redis.as_ref().map(|r| r.refresh_interval).unwrap_or(DEFAULT_REFRESH);
        let stats = self.stats.clone();
        let rules_key = src.rules_key().to_string();
        let fetched = src.fetch(&mut self.names);
        match fetched {
            Ok(read) => {
                if self.redis_up != Some(true) {
                    tracing::info!("redis reachable: routes from redis");
                }
                self.note_warnings("redis", &read.warnings);
                self.redis_up = Some(true);
                stats.redis_state.store(RedisState::Up);
                self.fetch_backoff = REDIS_RETRY_MIN;
                self.next_fetch = Instant::now() + refresh;
                let (set, kept) = resolve_read(self.redis_set.as_ref(), read);
                if kept {
                    // No data is not an empty document: Redis restarted
                    // empty or was flushed. Keep what it last said.
                    stats.refresh_errors.fetch_add(1, Ordering::Relaxed);
                    stats.refresh_empty.fetch_add(1, Ordering::Relaxed);
                    let key = rules_key.as_str();
                    let e = format!(
                        "redis holds no {key} (restarted empty or flushed?): keeping the last good redis routes \
                         ({} rules, {} realms; route version {}); write [] to {key} to clear them",
                        set.rules.len(),
                        set.realms.len(),
                        self.version
                    );
                    if !self.redis_empty {
                        tracing::warn!(key, version = self.version, "{e}");
                    }
                    self.redis_empty = true;
                    stats.set_error(ErrorSource::Redis, e, unix_now());
                } else {
                    if self.redis_empty {
                        tracing::info!(key = rules_key.as_str(), "redis holds route rules again");
                    }
                    self.redis_empty = false;
                    stats.refresh_success.fetch_add(1, Ordering::Relaxed);
                    if stats.clear_error(ErrorSource::Redis, unix_now()) {
                        tracing::info!("redis routes read: the last redis error is cleared");
                    }
                }
                self.redis_set = Some(set);
                self.publish("redis", origin);
            }
            Err(FetchError::Invalid(reasons)) => {
                // Reachable but bad data: reject whole, keep the last good.
                self.redis_up = Some(true);
                stats.redis_state.store(RedisState::Up);
                stats.refresh_errors.fetch_add(1, Ordering::Relaxed);
                stats.snapshots_rejected.fetch_add(1, Ordering::Relaxed);
                for r in &reasons {
                    tracing::error!(reason = %r, "route snapshot from redis rejected; keeping the last good one");
                }
                stats.set_error(ErrorSource::Redis, reasons.join("; "), unix_now());
                self.next_fetch = Instant::now() + refresh;
            }
            Err(FetchError::Unavailable(e)) => {
                if self.redis_up != Some(false) {
                    tracing::warn!(error = %e, "redis unreachable: keeping the last good routes, retrying with backoff");
                }
                self.redis_up = Some(false);
                stats.redis_state.store(RedisState::Down);
                stats.refresh_errors.fetch_add(1, Ordering::Relaxed);
                stats.set_error(ErrorSource::Redis, e.to_string(), unix_now());
                self.next_fetch = Instant::now() + self.fetch_backoff;
                self.fetch_backoff = (self.fetch_backoff * 2).min(REDIS_RETRY_MAX).min(refresh.max(REDIS_RETRY_MIN));
            }
        }
    }

    /// Modification times of the configured TLS files (certificates and keys).
    fn tls_mtimes(&self) -> Vec<Option<SystemTime>> {
        self.running.tls.files.iter().map(|p| mtime(p)).collect()
    }

    /// Logs and counts each route-data warning the first time it is seen
    /// (Redis is re-read every `refresh_interval`; one line per problem, not
    /// one per read).
    fn note_warnings(&mut self, source: &str, warnings: &[String]) {
        if self.warned.len() > WARNED_MAX {
            self.warned.clear();
        }
        for w in warnings {
            if self.warned.insert(w.clone()) {
                tracing::warn!(source, warning = %w, "route data loaded with a warning");
                self.stats.route_warnings.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The route set to publish: static rules overlaid with the last good
    /// Redis data, host names at their cached addresses (names that resolve
    /// by now put in), then Consul's endpoints in the rules that list none.
    fn build(&mut self) -> RouteSet {
        let mut set = merge(&self.running.routes, self.redis_set.as_ref());
        self.names.learn(&set);
        self.names.fill_pending(&mut set);
        self.names.overlay(&mut set);
        let mut wanted = BTreeSet::new();
        if let Some(d) = &self.consul {
            let found = d.endpoints(&self.names, &mut wanted);
            consul::fill(&mut set, &d.cfg.services, &found);
        }
        let mut in_use = resolve::host_names(&set);
        in_use.extend(wanted.iter().cloned());
        // Names never looked up yet (a Consul instance registered by host
        // name): ask now rather than at the next periodic lookup.
        let unknown: Vec<Arc<str>> =
            wanted.into_iter().filter(|n| !self.names.failing().any(|(f, _)| f == n)).collect();
        self.names.request(unknown);
        self.names.retain(&in_use);
        self.in_use = in_use;
        self.dial_failures.retain(|k, _| self.in_use.contains(k));
        let unresolved: Vec<String> =
            self.in_use.iter().filter(|n| self.names.cached(n).is_none()).map(|n| n.to_string()).collect();
        self.stats.discovery.lock().unwrap().unresolved = unresolved;
        set
    }

    /// When the next periodic lookup of every name is due (`None`: none to
    /// do, or `backend.resolve_interval` is 0).
    fn next_lookup(&self) -> Option<Instant> {
        let every = self.running.backend.resolve_interval;
        (!every.is_zero() && !self.in_use.is_empty()).then(|| self.last_lookup + every)
    }

    /// Asks the lookup thread about every host name in use.
    fn lookup_all(&mut self) {
        self.names.request(self.in_use.iter().cloned());
    }

    /// Takes a batch of lookups in; republishes when an address changed or a
    /// waiting name resolved.
    fn on_resolved(&mut self, results: crate::state::Lookups) {
        let origin = Instant::now();
        let r = self.names.apply(results);
        for (name, old, new) in &r.changed {
            tracing::info!(endpoint = %name, old = %old, new = %new, "endpoint address changed");
        }
        for name in &r.fresh {
            tracing::info!(endpoint = %name, "endpoint name resolves now");
        }
        for (name, why) in &r.failing {
            match self.names.cached(name) {
                Some(a) => {
                    tracing::warn!(endpoint = %name, error = %why, keeping = %a, "endpoint name does not resolve; keeping its last address")
                }
                None => {
                    tracing::warn!(endpoint = %name, error = %why, "endpoint name does not resolve; left out of its rule until it does")
                }
            }
        }
        for name in &r.recovered {
            tracing::info!(endpoint = %name, "endpoint name resolves again");
        }
        self.stats.address_changes.fetch_add(r.changed.len() as u64, Ordering::Relaxed);
        if r.routes_changed() {
            self.publish("name lookup", origin);
        }
    }

    /// A dial to a named endpoint failed on some worker since the last
    /// check: its name may point elsewhere now, so look it up again.
    fn check_dial_failures(&mut self) {
        let stats = self.gw.stats();
        let mut again = Vec::new();
        for name in &self.in_use {
            let Some(b) = stats.backends.get(name) else { continue };
            let n = ["dial_failed", "dial_timeout"].iter().map(|k| b.errors.get(k).copied().unwrap_or(0)).sum::<u64>();
            let before = self.dial_failures.insert(name.clone(), n).unwrap_or(0);
            if n > before {
                again.push(name.clone());
            }
        }
        if !again.is_empty() {
            tracing::debug!(names = again.len(), "dials to named endpoints failed: looking the names up again");
            self.names.request(again);
        }
    }

    /// Publishes static + last good Redis routes (+ Consul) when they changed.
    /// `origin`: when the change reached the control side; each worker
    /// measures from there to the moment it serves the snapshot.
    fn publish(&mut self, why: &str, origin: Instant) {
        // What the running config makes known to the metrics.
        *self.stats.policy_classes.lock().unwrap() =
            self.running.policy.classes.iter().map(|c| c.name.clone()).collect();
        *self.stats.tls_certificates.lock().unwrap() =
            self.running.tls.certificates.iter().map(|c| (c.name.clone(), c.not_after)).collect();
        let set = self.build();
        let fp = fingerprint(&set);
        if fp == self.published {
            return;
        }
        self.published = fp;
        self.version += 1;
        let table = Arc::new(RouteTable::new(self.version, set.rules, set.realms));
        tracing::info!(
            version = self.version,
            rules = table.rules().count(),
            realms = table.realms().count(),
            cause = why,
            "publishing route snapshot"
        );
        self.stats.route_version.store(self.version, Ordering::Relaxed);
        *self.stats.route_labels.lock().unwrap() = RouteLabels::of(&table);
        let from_redis = self.redis_set.as_ref().is_some_and(|s| !s.rules.is_empty() || !s.realms.is_empty());
        *self.stats.route_source.lock().unwrap() =
            RouteSource::of(from_redis, self.consul.as_ref().is_some_and(|d| d.has_answers()));
        let update = RouteUpdate::new(table, origin, self.gw.worker_count());
        self.gw.broadcast(move || WorkerCommand::Routes(update.clone()));
    }
}

/// What one good Redis read means, given the last good Redis data: the new
/// Redis route set, and whether last good data was kept because the rules
/// key does not exist.
///
/// - The rules key holds a document (even `[]` or `{}`): it replaces the
///   rules, and the realm hash as it is replaces the realm mapping.
/// - The rules key does not exist: no data. The last good rules stay, and
///   so does the last good realm mapping unless the realm hash has entries.
///   `kept` is true when that kept anything (the read would have dropped it).
pub(crate) fn resolve_read(last: Option<&RouteSet>, read: RedisRead) -> (RouteSet, bool) {
    match read.rules {
        Some(rules) => (RouteSet { rules, realms: read.realms, pending: read.pending, warnings: read.warnings }, false),
        None => {
            let empty = RouteSet::default();
            let last = last.unwrap_or(&empty);
            let keep_realms = read.realms.is_empty() && !last.realms.is_empty();
            let kept = !last.rules.is_empty() || keep_realms;
            let realms = if read.realms.is_empty() { last.realms.clone() } else { read.realms };
            let pending = last.pending.clone();
            (RouteSet { rules: last.rules.clone(), realms, pending, warnings: read.warnings }, kept)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Resolution, SystemResolver};

    fn rules(json: &str) -> Vec<crate::routing::RouteRule> {
        routes::parse_redis(Some(json), &[], &mut SystemResolver, Resolution::Required).unwrap().rules
    }

    fn realms(pairs: &[(&str, &str)]) -> Vec<(u16, crate::routing::Endpoint)> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        routes::parse_redis(None, &pairs, &mut SystemResolver, Resolution::Required).unwrap().realms
    }

    fn read(rules: Option<Vec<crate::routing::RouteRule>>, realms: Vec<(u16, crate::routing::Endpoint)>) -> RedisRead {
        RedisRead { rules, realms, pending: vec![], warnings: vec![] }
    }

    fn set(rules: Vec<crate::routing::RouteRule>, realms: Vec<(u16, crate::routing::Endpoint)>) -> RouteSet {
        RouteSet { rules, realms, ..Default::default() }
    }

    #[test]
    fn a_missing_rules_key_keeps_the_last_good_data_and_an_empty_document_clears_it() {
        let r = rules(r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:1"]}]"#);
        let m = realms(&[("7", "127.0.0.1:7")]);
        let last = set(r.clone(), m.clone());
        // Flushed: nothing under either key.
        let (got, kept) = resolve_read(Some(&last), read(None, vec![]));
        assert!(kept);
        assert_eq!(got, last);
        // An explicit empty document clears rules and realms.
        let (got, kept) = resolve_read(Some(&last), read(Some(vec![]), vec![]));
        assert!(!kept);
        assert_eq!(got, RouteSet::default());
        // Only the realm hash: the rules stay, the realms are the hash's.
        let other = realms(&[("8", "127.0.0.1:8")]);
        let (got, kept) = resolve_read(Some(&last), read(None, other.clone()));
        assert!(kept);
        assert_eq!(got, set(r, other.clone()));
        // Nothing held yet: nothing kept, nothing counted.
        let (got, kept) = resolve_read(None, read(None, vec![]));
        assert!(!kept);
        assert_eq!(got, RouteSet::default());
        let (got, kept) = resolve_read(None, read(None, other.clone()));
        assert!(!kept);
        assert_eq!(got.realms, other);
    }
}
