//! The control side: logging, the control loop, config reload, Redis routes,
//! snapshots, stop.
//!
//! It runs on the main thread (plus a signal thread and, with Redis, a
//! subscriber thread), never on a worker core. The loop waits on one channel
//! of [`ControlEvent`]s with a timeout that serves as its clock:
//! - SIGHUP, or a changed config file mtime (polled every [`FILE_POLL`]):
//!   reload the config; reloadable keys and static routes apply live,
//!   restart-only keys are reported and keep their running value;
//! - a Redis notify (or the periodic `refresh_interval`): re-read Redis;
//! - SIGINT / SIGTERM: stop (the signal thread exits at once on a second one).
//!
//! Every route change goes through [`Control::publish`]: static rules
//! overlaid with the last good Redis data, published as a new versioned
//! snapshot to every worker only when its content changed. Invalid Redis data
//! is rejected whole (logged with every reason, counted) and the last good
//! data stays; Redis unreachable keeps the last good snapshot too, retried
//! with capped backoff, logged once per state change.

use crate::admin::AdminState;
use crate::config::{Config, LogFormat};
use crate::gateway::Gateway;
use crate::redis_source::{FetchError, RedisSource};
use crate::route_source::{fingerprint, merge, RouteSet};
use crate::routing::RouteTable;
use crate::worker::WorkerCommand;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// How often the config file's mtime is checked.
pub const FILE_POLL: Duration = Duration::from_secs(1);
/// Redis retry backoff while it is unreachable (doubles, capped).
pub const REDIS_RETRY_MIN: Duration = Duration::from_millis(200);
pub const REDIS_RETRY_MAX: Duration = Duration::from_secs(5);

type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LEVEL: OnceLock<LevelSetter> = OnceLock::new();

/// Installs the global tracing subscriber per `[log]`; its level can later be
/// changed by [`set_log_level`] (config reload).
pub fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&cfg.log.level);
    // Colours only on a terminal: log files and collectors get plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_thread_names(true);
    match cfg.log.format {
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = LEVEL
                    .set(Box::new(move |l| h.reload(tracing_subscriber::EnvFilter::new(l)).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = LEVEL
                    .set(Box::new(move |l| h.reload(tracing_subscriber::EnvFilter::new(l)).map_err(|e| e.to_string())));
            }
        }
    }
}

pub fn set_log_level(level: &str) {
    if let Some(f) = LEVEL.get() {
        if let Err(e) = f(level) {
            tracing::warn!(error = %e, "log level not changed");
        }
    }
}

/// Control-side counters and facts for `/metrics` and `/status` (control
/// thread only; the data path never touches these).
#[derive(Debug, Default)]
pub struct ControlStats {
    pub refresh_success: AtomicU64,
    pub refresh_errors: AtomicU64,
    pub snapshots_rejected: AtomicU64,
    pub route_version: AtomicU64,
    /// 0 not configured, 1 up, 2 down.
    pub redis_state: AtomicU8,
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
    /// Unix seconds of the last successful config load.
    pub config_loaded_at: AtomicU64,
    pub route_source: Mutex<String>,
    pub last_error: Mutex<String>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The route snapshot the static config describes.
pub fn static_routes(cfg: &Config, version: u64) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(version, cfg.routes.clone(), vec![]))
}

/// Keys that only take effect on restart, as "key (running -> new)".
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut v = Vec::new();
    let mut check = |key: &str, a: String, b: String| {
        if a != b {
            v.push(format!("{key} ({a} -> {b})"));
        }
    };
    check("server.listen", o.listen.to_string(), n.listen.to_string());
    check("server.admin_listen", o.admin_listen.to_string(), n.admin_listen.to_string());
    check("server.workers", o.workers.to_string(), n.workers.to_string());
    check("server.cpus", format!("{:?}", o.cpus), format!("{:?}", n.cpus));
    check("server.io_driver", o.io_driver.as_str().into(), n.io_driver.as_str().into());
    check("server.node_id", o.node_id.to_string(), n.node_id.to_string());
    let redis =
        |c: &Config| c.redis.as_ref().map(|r| format!("{} {}", r.url, r.key_prefix)).unwrap_or_else(|| "off".into());
    check("redis", redis(old), redis(new));
    check("log.format", format!("{:?}", old.log.format), format!("{:?}", new.log.format));
    v
}

/// What reaches the control loop.
pub enum ControlEvent {
    Signal(i32),
    RedisNotify,
    /// The admin drain call (same as SIGTERM).
    Drain,
}

pub struct Control {
    path: PathBuf,
    running: Arc<Config>,
    gw: Gateway,
    admin: Arc<AdminState>,
    redis: Option<RedisSource>,
    /// Last good Redis data (None until the first good read).
    redis_set: Option<RouteSet>,
    redis_up: Option<bool>,
    next_fetch: Instant,
    fetch_backoff: Duration,
    version: u64,
    published: u64,
    mtime: Option<SystemTime>,
    stop_sub: Arc<AtomicBool>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Control {
    /// Takes over the calling thread until the gateway stopped.
    /// The channel the control loop reads; hand its sender to the admin
    /// server (drain calls) before calling [`Control::run`].
    pub fn channel() -> (Sender<ControlEvent>, Receiver<ControlEvent>) {
        unbounded()
    }

    pub fn run(
        gw: Gateway,
        path: &Path,
        admin: Arc<AdminState>,
        (tx, rx): (Sender<ControlEvent>, Receiver<ControlEvent>),
    ) -> std::io::Result<()> {
        let running = gw.cfg.clone();
        let sig_tx = tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
        let hard = gw.handle();
        std::thread::Builder::new().name("gw-signals".into()).spawn(move || {
            let mut stops = 0;
            for sig in signals.forever() {
                if sig != libc::SIGHUP {
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
        })?;
        let stop_sub = Arc::new(AtomicBool::new(false));
        let redis = match &running.redis {
            Some(rc) => {
                let src = RedisSource::new(rc).map_err(std::io::Error::other)?;
                crate::redis_source::spawn_subscriber(rc, tx.clone(), || ControlEvent::RedisNotify, stop_sub.clone())?;
                admin.control.redis_state.store(2, Ordering::Relaxed);
                Some(src)
            }
            None => None,
        };
        let mut c = Control {
            path: path.to_path_buf(),
            mtime: mtime(path),
            running,
            gw,
            admin,
            redis,
            redis_set: None,
            redis_up: None,
            next_fetch: Instant::now(),
            fetch_backoff: REDIS_RETRY_MIN,
            version: 1,
            published: 0,
            stop_sub,
        };
        c.published = fingerprint(&merge(&c.running.routes, None));
        c.admin.control.route_version.store(1, Ordering::Relaxed);
        c.admin.control.config_loaded_at.store(unix_now(), Ordering::Relaxed);
        *c.admin.control.route_source.lock().unwrap() = "static".into();
        if c.redis.is_some() {
            c.fetch_redis();
        }
        c.admin.ready.store(true, Ordering::Relaxed);
        let mut last_poll = Instant::now();
        loop {
            let now = Instant::now();
            let mut wait = FILE_POLL.saturating_sub(now.duration_since(last_poll));
            if c.redis.is_some() {
                wait = wait.min(c.next_fetch.saturating_duration_since(now));
            }
            match rx.recv_timeout(wait) {
                Ok(ControlEvent::Signal(libc::SIGHUP)) => {
                    tracing::info!("SIGHUP: reloading config");
                    c.reload();
                }
                Ok(ControlEvent::Signal(sig)) => {
                    c.stop(&format!("signal {sig}"));
                    return Ok(());
                }
                Ok(ControlEvent::Drain) => {
                    c.stop("admin drain call");
                    return Ok(());
                }
                Ok(ControlEvent::RedisNotify) => c.fetch_redis(),
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
                }
            }
            if c.redis.is_some() && now >= c.next_fetch {
                c.fetch_redis();
            }
        }
    }

    /// Drain, then stop. Phases, logged in order: readiness off, listeners
    /// closed, sessions drain until `drain_timeout`, the rest closed with
    /// reason 6, queues flushed, exit.
    fn stop(self, why: &str) {
        self.admin.ready.store(false, Ordering::Relaxed);
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

    /// Re-reads the config file; rejects it whole when invalid.
    fn reload(&mut self) {
        let stats = &self.admin.control;
        match Config::load(&self.path) {
            Err(errs) => {
                stats.config_reload_errors.fetch_add(1, Ordering::Relaxed);
                for e in &errs.0 {
                    tracing::error!(error = %e, "config reload rejected; the running config stays");
                }
                *stats.last_error.lock().unwrap() = errs.to_string();
            }
            Ok(mut new) => {
                for k in needs_restart(&self.running, &new) {
                    tracing::warn!(key = %k, "config change needs a restart; keeping the running value");
                }
                new.server = self.running.server.clone();
                new.redis = self.running.redis.clone();
                new.log.format = self.running.log.format;
                if new.log.level != self.running.log.level {
                    set_log_level(&new.log.level);
                }
                let new = Arc::new(new);
                let c = new.clone();
                self.gw.broadcast(move || WorkerCommand::Config(c.clone()));
                self.running = new;
                stats.config_reloads.fetch_add(1, Ordering::Relaxed);
                stats.config_loaded_at.store(unix_now(), Ordering::Relaxed);
                tracing::info!(source = %self.running.source, "config reloaded");
                self.publish("config reload");
            }
        }
    }

    /// Reads Redis; keeps the last good data on any failure.
    fn fetch_redis(&mut self) {
        let Some(src) = self.redis.as_mut() else {
            return;
        };
        let refresh = self.running.redis.as_ref().map(|r| r.refresh_interval).unwrap_or(Duration::from_secs(10));
        let stats = self.admin.control.clone();
        match src.fetch() {
            Ok(set) => {
                if self.redis_up != Some(true) {
                    tracing::info!("redis reachable: routes from redis");
                }
                self.redis_up = Some(true);
                stats.redis_state.store(1, Ordering::Relaxed);
                stats.refresh_success.fetch_add(1, Ordering::Relaxed);
                self.fetch_backoff = REDIS_RETRY_MIN;
                self.next_fetch = Instant::now() + refresh;
                self.redis_set = Some(set);
                self.publish("redis");
            }
            Err(FetchError::Invalid(reasons)) => {
                // Reachable but bad data: reject whole, keep the last good.
                self.redis_up = Some(true);
                stats.redis_state.store(1, Ordering::Relaxed);
                stats.refresh_errors.fetch_add(1, Ordering::Relaxed);
                stats.snapshots_rejected.fetch_add(1, Ordering::Relaxed);
                for r in &reasons {
                    tracing::error!(reason = %r, "route snapshot from redis rejected; keeping the last good one");
                }
                *stats.last_error.lock().unwrap() = reasons.join("; ");
                self.next_fetch = Instant::now() + refresh;
            }
            Err(FetchError::Unavailable(e)) => {
                if self.redis_up != Some(false) {
                    tracing::warn!(error = %e, "redis unreachable: keeping the last good routes, retrying with backoff");
                }
                self.redis_up = Some(false);
                stats.redis_state.store(2, Ordering::Relaxed);
                stats.refresh_errors.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().unwrap() = e;
                self.next_fetch = Instant::now() + self.fetch_backoff;
                self.fetch_backoff = (self.fetch_backoff * 2).min(REDIS_RETRY_MAX).min(refresh.max(REDIS_RETRY_MIN));
            }
        }
    }

    /// Publishes static + last good Redis routes when they changed.
    fn publish(&mut self, why: &str) {
        let set = merge(&self.running.routes, self.redis_set.as_ref());
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
        let stats = &self.admin.control;
        stats.route_version.store(self.version, Ordering::Relaxed);
        *stats.route_source.lock().unwrap() =
            if self.redis_set.is_some() { "static+redis".into() } else { "static".into() };
        self.gw.broadcast(move || WorkerCommand::Routes(table.clone()));
    }
}
