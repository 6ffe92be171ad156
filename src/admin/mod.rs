//! Admin HTTP on `server.admin_listen`: `/health`, `/ready`, `/metrics`,
//! `/status`, `POST /drain`. Runs on its own thread, never on a worker core;
//! each request asks the workers for their counters over their command
//! channels and reads the control side's facts from the shared
//! [`ControlStats`]. [`metrics`] turns both into Prometheus families.
//!
//! Arrows: this module reads `state` (shared with `control`) and the gateway
//! handle; it never imports `control`. A drain call is a [`ControlEvent`] on
//! the control loop's channel.

pub(crate) mod metrics;

use crate::gateway::GatewayHandle;
use crate::state::{ControlEvent, ControlSender, ControlStats};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Largest admin request head we read.
const MAX_REQUEST_BYTES: usize = 8192;

/// What the admin endpoints report from and where `POST /drain` goes.
pub struct AdminState {
    handle: GatewayHandle,
    /// The config file, for `/status`.
    config_source: String,
    /// Written by the control loop (readiness, routes, Redis, reloads).
    control: Arc<ControlStats>,
    /// Holds the [`metrics::GatewayCollector`].
    registry: prometheus::Registry,
    /// Where `POST /drain` goes; `None` without a control loop.
    control_tx: Option<ControlSender>,
}

impl AdminState {
    pub fn new(
        handle: GatewayHandle,
        config_source: String,
        control: Arc<ControlStats>,
        control_tx: Option<ControlSender>,
    ) -> AdminState {
        let registry = prometheus::Registry::new();
        let collector = metrics::GatewayCollector { handle: handle.clone(), control: control.clone() };
        if let Err(e) = registry.register(Box::new(collector)) {
            tracing::error!(error = %e, "metrics collector not registered");
        }
        AdminState { handle, config_source, control, registry, control_tx }
    }
}

/// Binds and serves on a background thread; returns the bound address.
pub fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("gw-admin".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(c) => {
                    if let Err(e) = handle(c, &state) {
                        tracing::debug!(error = %e, "admin request failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    })?;
    tracing::info!(admin = %local, "admin endpoints listening");
    Ok(local)
}

fn handle(mut c: TcpStream, state: &AdminState) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut n = 0;
    let (method, path) = loop {
        let r = c.read(&mut buf[n..])?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                break (req.method.unwrap_or("GET").to_string(), req.path.unwrap_or("/").to_string())
            }
            Ok(httparse::Status::Partial) if n < buf.len() => continue,
            _ => return respond(&mut c, 400, "text/plain", "bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("/");
    match path {
        "/drain" if method == "POST" => match &state.control_tx {
            Some(tx) if tx.send(ControlEvent::Drain).is_ok() => respond(&mut c, 202, "text/plain", "draining\n"),
            _ => respond(&mut c, 503, "text/plain", "no control loop\n"),
        },
        "/drain" => respond(&mut c, 405, "text/plain", "use POST\n"),
        "/health" => {
            let answered = state.handle.worker_stats().iter().filter(|s| s.is_some()).count();
            if answered == state.handle.workers().len() {
                respond(&mut c, 200, "text/plain", "ok\n")
            } else {
                respond(&mut c, 503, "text/plain", "worker unresponsive\n")
            }
        }
        "/ready" => {
            if state.control.ready.load(Ordering::Relaxed) {
                respond(&mut c, 200, "text/plain", "ready\n")
            } else {
                respond(&mut c, 503, "text/plain", "not ready\n")
            }
        }
        "/metrics" => {
            let body = metrics::encode(&state.registry.gather());
            respond(&mut c, 200, prometheus::TEXT_FORMAT, &body)
        }
        "/status" => {
            let per = state.handle.worker_stats();
            let workers: Vec<_> = state
                .handle
                .workers()
                .iter()
                .zip(per.iter())
                .map(|(i, s)| {
                    serde_json::json!({
                        "worker": i.index,
                        "cpu": i.cpu,
                        "io_driver": i.io_driver,
                        "responsive": s.is_some(),
                        "sessions": s.as_ref().map(|s| s.sessions_active),
                        "connections_total": s.as_ref().map(|s| s.connections_total),
                        "connections_rejected": s.as_ref().map(|s| s.connection_rejected.values().sum::<u64>()),
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
                    })
                })
                .collect();
            let ctl = &state.control;
            let body = serde_json::json!({
                "ready": ctl.ready.load(Ordering::Relaxed),
                "config": { "file": state.config_source, "loaded_at_unix": ctl.config_loaded_at.load(Ordering::Relaxed),
                            "reloads": ctl.config_reloads.load(Ordering::Relaxed), "reload_errors": ctl.config_reload_errors.load(Ordering::Relaxed) },
                "routes": { "version": ctl.route_version.load(Ordering::Relaxed), "source": ctl.route_source.lock().unwrap().to_string(),
                            "redis": ctl.redis_state.load().as_str(),
                            "last_error": ctl.last_error.lock().unwrap().clone() },
                "workers": workers,
            });
            respond(&mut c, 200, "application/json", &format!("{body:#}\n"))
        }
        _ => respond(&mut c, 404, "text/plain", "not found\n"),
    }
}

fn respond(c: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    write!(
        c,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}
