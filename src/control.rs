//! The control side: logging setup, signals, config reload and stop.
//!
//! It runs on the main thread, never on a worker core. Signals arrive through
//! signal-hook's iterator; SIGINT/SIGTERM start the stop (a second one exits
//! at once), SIGHUP reloads the config file.

use crate::admin::AdminState;
use crate::config::{Config, LogFormat};
use crate::gateway::Gateway;
use crate::routing::RouteTable;
use crate::worker::WorkerCommand;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Installs the global tracing subscriber per `[log]`.
pub fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&cfg.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The route snapshot the static config describes.
pub fn static_routes(cfg: &Config, version: u64) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(version, cfg.routes.clone(), vec![]))
}

/// Keys that only take effect on restart, with their running and new values.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if old.server.listen != new.server.listen {
        v.push(format!(
            "server.listen ({} -> {})",
            old.server.listen, new.server.listen
        ));
    }
    if old.server.admin_listen != new.server.admin_listen {
        v.push(format!(
            "server.admin_listen ({} -> {})",
            old.server.admin_listen, new.server.admin_listen
        ));
    }
    if old.server.workers != new.server.workers {
        v.push(format!(
            "server.workers ({} -> {})",
            old.server.workers, new.server.workers
        ));
    }
    if old.server.cpus != new.server.cpus {
        v.push(format!(
            "server.cpus ({:?} -> {:?})",
            old.server.cpus, new.server.cpus
        ));
    }
    if old.server.io_driver != new.server.io_driver {
        v.push(format!(
            "server.io_driver ({} -> {})",
            old.server.io_driver.as_str(),
            new.server.io_driver.as_str()
        ));
    }
    if old.server.node_id != new.server.node_id {
        v.push(format!(
            "server.node_id ({} -> {})",
            old.server.node_id, new.server.node_id
        ));
    }
    v
}

/// Re-reads the config file; applies reloadable keys and static routes, keeps
/// restart-only keys at their running values. Returns the config now running.
pub fn reload(
    path: &Path,
    running: &Arc<Config>,
    gw: &Gateway,
    route_version: &mut u64,
) -> Arc<Config> {
    match Config::load(path) {
        Err(errs) => {
            for e in &errs.0 {
                tracing::error!(error = %e, "config reload rejected");
            }
            running.clone()
        }
        Ok(mut new) => {
            for k in needs_restart(running, &new) {
                tracing::warn!(key = %k, "config change needs a restart; keeping the running value");
            }
            new.server = running.server.clone();
            let new = Arc::new(new);
            let c = new.clone();
            gw.broadcast(move || WorkerCommand::Config(c.clone()));
            *route_version += 1;
            let table = static_routes(&new, *route_version);
            gw.broadcast(move || WorkerCommand::Routes(table.clone()));
            tracing::info!(source = %new.source, "config reloaded");
            new
        }
    }
}

/// Waits for signals; returns after a clean stop.
pub fn run_until_signalled(
    gw: Gateway,
    path: &Path,
    admin: Option<Arc<AdminState>>,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let mut running = gw.cfg.clone();
    let mut route_version = 1;
    for sig in signals.forever() {
        match sig {
            SIGHUP => {
                tracing::info!("SIGHUP: reloading config");
                running = reload(path, &running, &gw, &mut route_version);
            }
            _ => {
                tracing::info!(
                    signal = sig,
                    "stop requested: no new connections, closing sessions"
                );
                if let Some(a) = &admin {
                    a.ready.store(false, Ordering::Relaxed);
                }
                // A second INT/TERM during the stop exits at once.
                let mut again = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
                std::thread::Builder::new()
                    .name("gw-hard-stop".into())
                    .spawn(move || {
                        if again.forever().next().is_some() {
                            eprintln!("second stop signal: exiting now");
                            std::process::exit(0);
                        }
                    })?;
                let timeout = running.server.drain_timeout.max(Duration::from_millis(100));
                gw.stop(timeout);
                tracing::info!("stopped");
                return Ok(());
            }
        }
    }
    Ok(())
}
