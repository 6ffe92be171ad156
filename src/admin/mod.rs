//! Admin HTTP on `server.admin_listen`: `/health`, `/ready`, `/metrics`,
//! `/status`, `POST /drain`. Runs on its own thread, never on a worker core;
//! each request asks the workers for their counters over their command
//! channels and reads the control side's facts from the shared
//! [`ControlStats`]. [`metrics`] turns both into Prometheus families.
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
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest admin request head we read.
const MAX_REQUEST_BYTES: usize = 8192;

/// What the admin endpoints report from and where `POST /drain` goes.
pub struct AdminState {
    handle: GatewayHandle,
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
        let collector = metrics::GatewayCollector { handle: handle.clone(), control: control.clone() };
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
            handle,
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
    let (method, path, authorization) = loop {
        let r = c.read(&mut buf[n..])?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                let auth = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("authorization")).map(|h| h.value);
                break (
                    req.method.unwrap_or("GET").to_string(),
                    req.path.unwrap_or("/").to_string(),
                    auth.map(<[u8]>::to_vec),
                );
            }
            Ok(httparse::Status::Partial) if n < buf.len() => continue,
            _ => return respond(&mut c, 400, "text/plain", "bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("/");
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
            state.scrapes_in_flight.inc();
            let body = metrics::encode(&state.registry.gather());
            state.scrapes_in_flight.dec();
            let r = respond(&mut c, 200, prometheus::TEXT_FORMAT, &body);
            state.scrapes.with_label_values(&["200"]).inc();
            r
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
                        "numa_node": i.numa_node,
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
                "draining": ctl.draining.load(Ordering::Relaxed),
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
        _ => "Service Unavailable",
    };
    write!(
        c,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
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
    fn the_token_never_prints() {
        let t = AdminToken::new("s3cret-token");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(t.matches(b"s3cret-token") && !t.matches(b"s3cret-token\n") && !t.matches(b""));
    }
}
