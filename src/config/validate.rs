//! Validation: [`RawConfig`] -> [`Config`], one function per TOML section.
//!
//! Every problem found is collected, not only the first, and reported as
//! `file:line: key: reason`; lines come from the TOML document's spans
//! ([`Locator`]). A section's function returns its typed section with
//! placeholder values where a key was bad; any problem fails the whole file,
//! so placeholders never reach a running gateway.

use super::error::{ConfigError, ConfigErrors};
use super::raw::{RawAdmin, RawBackend, RawConfig, RawConsul, RawLimits, RawLog, RawRedis, RawServer, RawWebSocket};
use super::sections::{
    AdminConfig, AdminToken, BackendConfig, Config, ConsulConfig, DrainConfig, IoDriver, LimitsConfig, LogConfig,
    LogFormat, MessageClass, MessagePolicy, OtlpConfig, RateLimitAction, RedisConfig, ServerConfig, WebSocketConfig,
    MAX_NODE_ID, MAX_WORKERS, NO_CLASS,
};
use crate::cpu::CpuBudget;
use crate::routing::RouteRule;
use std::net::SocketAddr;
use std::time::Duration;

/// What the config takes from the process environment, read once by `main`
/// (empty values count as unset).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `LOG_LEVEL`: overrides `[log] level`.
    pub log_level: Option<String>,
    /// `POD_NAME`: gives the node id when `server.node_id` is 0.
    pub pod_name: Option<String>,
    /// The CPUs the process may use (its affinity mask); `None` reads the
    /// calling thread's mask when the config is validated.
    pub cpus: Option<CpuBudget>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: overrides `[otlp] endpoint`.
    pub otel_endpoint: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`: overrides `[otlp] sample_ratio`.
    pub otel_sampler_arg: Option<String>,
    /// `OTEL_SERVICE_NAME`: overrides `[otlp] service_name`.
    pub otel_service_name: Option<String>,
    /// `POD_NAMESPACE`, `NODE_NAME`: Kubernetes resource attributes.
    pub pod_namespace: Option<String>,
    pub node_name: Option<String>,
    /// `NODE_IP`: the Consul agent is `NODE_IP:8500` when `consul.address`
    /// is empty (the Go gateway's only way to name its agent).
    pub node_ip: Option<String>,
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("{0:?} is not a duration like \"250ms\", \"5s\", \"2m\"")]
    NotANumber(String),
    #[error("{0:?} has no unit (use ms, s, m or h)")]
    NoUnit(String),
}

/// Parses "250ms", "5s", "2m", "1h" (an integer and a unit).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| DurationError::NotANumber(s.into()))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(DurationError::NoUnit(s.into())),
    };
    Ok(d)
}

/// Maps dotted key paths to line numbers using the document's spans.
pub(crate) struct Locator<'a> {
    src: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Locator { src, doc: toml_edit::ImDocument::parse(src).ok() }
    }

    fn line_at(&self, offset: usize) -> usize {
        self.src[..offset.min(self.src.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }

    /// Line of `section.key` (`key` may be empty for the section itself);
    /// `index` selects an element of an array of tables such as `[[routes]]`.
    fn line(&self, section: &str, index: Option<usize>, key: &str) -> usize {
        let Some(doc) = &self.doc else { return 1 };
        let Some(item) = doc.as_table().get(section) else {
            return 1;
        };
        let table = match (index, item) {
            (Some(i), toml_edit::Item::ArrayOfTables(a)) => a.get(i),
            (None, toml_edit::Item::Table(t)) => Some(t),
            _ => None,
        };
        let Some(table) = table else {
            return item.span().map(|s| self.line_at(s.start)).unwrap_or(1);
        };
        if !key.is_empty() {
            if let Some(span) = table.key(key).and_then(|k| k.span()) {
                return self.line_at(span.start);
            }
        }
        table.span().map(|s| self.line_at(s.start)).unwrap_or(1)
    }
}

/// Collects located errors while validating.
struct Problems<'a> {
    file: &'a str,
    loc: &'a Locator<'a>,
    errors: Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    fn new(file: &'a str, loc: &'a Locator<'a>) -> Self {
        Problems { file, loc, errors: vec![] }
    }

    fn push(&mut self, section: &str, index: Option<usize>, key: &str, reason: impl Into<String>) {
        let line = self.loc.line(section, index, key);
        let name = match index {
            Some(i) if key.is_empty() => format!("{section}[{i}]"),
            Some(i) => format!("{section}[{i}].{key}"),
            None if key.is_empty() => section.to_string(),
            None => format!("{section}.{key}"),
        };
        self.errors.push(ConfigError { file: self.file.to_string(), line, key: name, reason: reason.into() });
    }

    fn duration(&mut self, section: &str, key: &str, v: &str) -> Duration {
        match parse_duration(v) {
            Ok(d) => d,
            Err(e) => {
                self.push(section, None, key, e.to_string());
                // Non-zero so the "above zero" checks do not report it twice.
                Duration::from_secs(1)
            }
        }
    }

    fn int<T: TryFrom<i64> + Default>(&mut self, section: &str, key: &str, v: i64, lo: i64, hi: i64) -> T {
        if v < lo || v > hi {
            self.push(section, None, key, format!("{v} is out of range {lo}..={hi}"));
            return T::default();
        }
        T::try_from(v).unwrap_or_default()
    }

    fn addr(&mut self, section: &str, key: &str, v: &str) -> SocketAddr {
        v.parse().unwrap_or_else(|_| {
            self.push(section, None, key, format!("{v:?} is not an ip:port address"));
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }
}

/// Node id from a pod name: a StatefulSet ordinal suffix (`gw-3` -> 3) when
/// there is one, else a stable hash of the name, so pods never need a per-pod
/// config.
pub(crate) fn node_id_from_pod_name(name: &str) -> u16 {
    if let Some((_, tail)) = name.rsplit_once('-') {
        if let Ok(n) = tail.parse::<u16>() {
            if n <= MAX_NODE_ID {
                return n;
            }
        }
    }
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % (MAX_NODE_ID as u64 + 1)) as u16
}

impl RawConfig {
    pub(crate) fn validate(self, file: &str, loc: &Locator<'_>, env: &Environment) -> Result<Config, ConfigErrors> {
        let mut p = Problems::new(file, loc);
        let server = server(&mut p, &self.server, env);
        let websocket = websocket(&mut p, &self.websocket);
        let limits = limits(&mut p, &self.limits);
        let backend = backend(&mut p, &self.backend);
        let redis = self.redis.as_ref().map(|r| redis(&mut p, r));
        let consul = self.consul.as_ref().map(|c| consul(&mut p, c, env));
        let routes = routes(&mut p, &self.routes);
        let log = log(&mut p, &self.log, env);
        let admin_listen = self.server.admin_listen.parse::<SocketAddr>().ok();
        let admin = admin(&mut p, &self.admin, admin_listen);
        let notice_msg_id: u16 = p.int("drain", "notice_msg_id", self.drain.notice_msg_id, 0, 65535);
        let drain = DrainConfig {
            notice: (notice_msg_id != 0)
                .then(|| (notice_msg_id, bytes::Bytes::from(self.drain.notice_payload.clone().into_bytes()))),
            paced: self.drain.paced,
        };
        let policy = std::sync::Arc::new(message_policy(&mut p, &self.message_policy));
        let tls = match super::tls::TlsMode::parse(&self.tls.mode) {
            None => {
                p.push("tls", None, "mode", format!("{:?} is not one of off, optional, required", self.tls.mode));
                super::tls::TlsConfig::default()
            }
            Some(mode) => {
                let pairs: Vec<_> = self
                    .tls
                    .certificates
                    .iter()
                    .map(|c| (std::path::PathBuf::from(&c.cert), std::path::PathBuf::from(&c.key)))
                    .collect();
                super::tls::build(mode, &pairs, &self.tls.alpn).unwrap_or_else(|e| {
                    p.push("tls", None, "certificates", e);
                    super::tls::TlsConfig::default()
                })
            }
        };
        if !p.errors.is_empty() {
            p.errors.sort_by_key(|e| e.line);
            return Err(ConfigErrors(p.errors));
        }
        let otlp = otlp(&mut p, &self.otlp, env);
        if !p.errors.is_empty() {
            p.errors.sort_by_key(|e| e.line);
            return Err(ConfigErrors(p.errors));
        }
        Ok(Config {
            source: file.to_string(),
            server,
            limits,
            backend,
            redis,
            consul,
            routes,
            log,
            websocket,
            admin,
            drain,
            policy,
            tls,
            otlp,
        })
    }
}

/// The kernel's host name (`gethostname`), or "game-gateway" when unknown.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid, writable buffer of the length passed;
    // gethostname writes at most that many bytes and does not keep the pointer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
        _ => "game-gateway".to_string(),
    }
}

fn server(p: &mut Problems<'_>, s: &RawServer, env: &Environment) -> ServerConfig {
    let listen = p.addr("server", "listen", &s.listen);
    let admin_listen = p.addr("server", "admin_listen", &s.admin_listen);
    let mut node_id: u16 = p.int("server", "node_id", s.node_id, 0, MAX_NODE_ID as i64);
    if node_id == 0 {
        if let Some(pod) = env.pod_name.as_deref().filter(|p| !p.is_empty()) {
            node_id = node_id_from_pod_name(pod);
        }
    }
    let budget = env.cpus.clone().unwrap_or_else(CpuBudget::of_process);
    let workers_raw: usize = p.int("server", "workers", s.workers, 0, MAX_WORKERS as i64);
    let workers = if workers_raw == 0 { budget.usable.min(MAX_WORKERS) } else { workers_raw };
    let cpus = if s.cpus.is_empty() {
        budget.set.placement(workers)
    } else {
        let mut v = Vec::new();
        for c in &s.cpus {
            match usize::try_from(*c) {
                Ok(cpu) if budget.set.contains(cpu) => v.push(cpu),
                Ok(cpu) => {
                    p.push("server", None, "cpus", format!("CPU {cpu} is not in this process's CPU set {}", budget.set))
                }
                Err(_) => p.push("server", None, "cpus", format!("{c} is not a CPU id")),
            }
        }
        if s.cpus.len() < workers {
            let why = if workers_raw == 0 {
                format!(" (workers = 0: one per CPU of this process's CPU set {})", budget.set)
            } else {
                String::new()
            };
            p.push("server", None, "cpus", format!("lists {} CPUs for {} workers{why}", s.cpus.len(), workers));
        }
        v
    };
    let io_driver = IoDriver::parse(&s.io_driver).unwrap_or_else(|| {
        p.push("server", None, "io_driver", format!("{:?} is not one of auto, io_uring, epoll", s.io_driver));
        IoDriver::Auto
    });
    let drain_timeout = p.duration("server", "drain_timeout", &s.drain_timeout);
    let upgrade_socket = (!s.upgrade_socket.is_empty()).then(|| std::path::PathBuf::from(&s.upgrade_socket));
    let wait_after_handover = match s.after_handover.as_str() {
        "exit" => false,
        "wait" => true,
        other => {
            p.push("server", None, "after_handover", format!("{other:?} is not one of exit, wait"));
            false
        }
    };
    if upgrade_socket.as_ref().is_some_and(|p| p.is_relative()) {
        p.push("server", None, "upgrade_socket", format!("{:?} is not an absolute path", s.upgrade_socket));
    }
    let upgrade_peer_exe = (!s.upgrade_peer_exe.is_empty()).then(|| std::path::PathBuf::from(&s.upgrade_peer_exe));
    if upgrade_peer_exe.as_ref().is_some_and(|p| p.is_relative()) {
        p.push("server", None, "upgrade_peer_exe", format!("{:?} is not an absolute path", s.upgrade_peer_exe));
    }
    let mut proxy_trusted = Vec::new();
    for n in &s.proxy_trusted {
        match n.parse::<ipnet::IpNet>().or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
            Ok(net) => proxy_trusted.push(net),
            Err(_) => p.push("server", None, "proxy_trusted", format!("{n:?} is not a network like \"10.0.0.0/8\"")),
        }
    }
    ServerConfig {
        listen,
        admin_listen,
        node_id,
        workers,
        cpus,
        cpu_budget: budget,
        io_driver,
        drain_timeout,
        node_name: env.pod_name.clone().filter(|p| !p.is_empty()).unwrap_or_else(host_name),
        proxy_protocol: s.proxy_protocol,
        proxy_trusted,
        upgrade_socket,
        upgrade_peer_exe,
        wait_after_handover,
    }
}

fn message_policy(p: &mut Problems<'_>, raw: &[super::raw::RawMessagePolicy]) -> MessagePolicy {
    use super::raw::RawMsgIds;
    let mut classes = Vec::new();
    let mut members = Vec::new();
    if raw.len() >= NO_CLASS as usize {
        p.push("message_policy", None, "", format!("at most {} classes", NO_CLASS as usize - 1));
        return MessagePolicy::default();
    }
    for (i, c) in raw.iter().enumerate() {
        let at = |p: &mut Problems<'_>, key: &str, reason: String| p.push("message_policy", Some(i), key, reason);
        if c.name.is_empty() || classes.iter().any(|k: &MessageClass| *k.name == *c.name) {
            at(p, "name", format!("{:?} must be a non-empty name no other class has", c.name));
        }
        let mut ranges = Vec::new();
        for m in &c.msg_ids {
            let r = match m {
                RawMsgIds::One(n) => Some((*n, *n)),
                RawMsgIds::Range(s) => s
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.trim().parse::<i64>().ok()?, b.trim().parse::<i64>().ok()?))),
            };
            match r {
                Some((lo, hi)) if 0 <= lo && lo <= hi && hi <= 65535 => ranges.push((lo as u16, hi as u16)),
                _ => {
                    let shown = match m {
                        RawMsgIds::One(n) => n.to_string(),
                        RawMsgIds::Range(r) => format!("{r:?}"),
                    };
                    at(p, "msg_ids", format!("{shown} is not a msg_id (0..=65535) or a \"first-last\" range"))
                }
            }
        }
        let scope = match c.server_type {
            None => None,
            Some(t) if (0..=255).contains(&t) => Some(t as u8),
            Some(t) => {
                at(p, "server_type", format!("{t} is out of range 0..=255"));
                None
            }
        };
        let close = match c.on_violation.as_deref().unwrap_or("drop") {
            "drop" => false,
            "close" => true,
            other => {
                at(p, "on_violation", format!("{other:?} is not one of drop, close"));
                false
            }
        };
        let clamp = |v: i64, hi: i64| v.clamp(0, hi);
        if c.max_payload < 0 || c.rate < 0 || c.burst < 0 {
            at(p, "", "max_payload, rate and burst must not be negative".to_string());
        }
        let rate = clamp(c.rate, u32::MAX as i64) as u32;
        classes.push(MessageClass {
            name: std::sync::Arc::from(c.name.as_str()),
            before_auth: c.before_auth,
            max_payload: clamp(c.max_payload, 65535) as usize,
            rate,
            burst: if c.burst == 0 { rate } else { clamp(c.burst, u32::MAX as i64) as u32 },
            close,
        });
        members.push((scope, ranges));
    }
    MessagePolicy::new(classes, members)
}

fn otlp(p: &mut Problems<'_>, o: &super::raw::RawOtlp, env: &Environment) -> OtlpConfig {
    let endpoint = env.otel_endpoint.clone().or_else(|| (!o.endpoint.is_empty()).then(|| o.endpoint.clone()));
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            p.push("otlp", None, "endpoint", format!("{e:?} is not an http:// or https:// URL"));
        }
    }
    let ratio = match env.otel_sampler_arg.as_deref().map(str::parse::<f64>) {
        Some(Ok(r)) => r,
        Some(Err(_)) => {
            p.push("otlp", None, "sample_ratio", "OTEL_TRACES_SAMPLER_ARG is not a number");
            o.sample_ratio
        }
        None => o.sample_ratio,
    };
    if !(0.0..=1.0).contains(&ratio) {
        p.push("otlp", None, "sample_ratio", format!("{ratio} is out of range 0.0..=1.0"));
    }
    let service = env.otel_service_name.clone().unwrap_or_else(|| o.service_name.clone());
    let mut resource = vec![
        ("service.name".to_string(), service),
        ("service.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    for (k, v) in
        [("k8s.pod.name", &env.pod_name), ("k8s.namespace.name", &env.pod_namespace), ("k8s.node.name", &env.node_name)]
    {
        if let Some(v) = v {
            resource.push((k.to_string(), v.clone()));
        }
    }
    OtlpConfig { endpoint, sample_ratio: ratio.clamp(0.0, 1.0), resource }
}

fn websocket(p: &mut Problems<'_>, ws: &RawWebSocket) -> WebSocketConfig {
    WebSocketConfig {
        enabled: ws.enabled,
        policy: crate::protocol::frontdoor::UpgradePolicy {
            allowed_origins: ws.allowed_origins.clone(),
            subprotocols: ws.subprotocols.clone(),
        },
        max_message_size: p.int("websocket", "max_message_size", ws.max_message_size, 16, 16 << 20),
    }
}

fn limits(p: &mut Problems<'_>, l: &RawLimits) -> LimitsConfig {
    let messages_per_second = p.int("limits", "messages_per_second", l.messages_per_second, 0, u32::MAX as i64);
    let limits = LimitsConfig {
        max_connections: p.int("limits", "max_connections", l.max_connections, 1, i64::MAX),
        max_connections_per_ip: p.int("limits", "max_connections_per_ip", l.max_connections_per_ip, 0, u32::MAX as i64),
        connection_rate_per_ip: p.int("limits", "connection_rate_per_ip", l.connection_rate_per_ip, 0, u32::MAX as i64),
        max_message_size: p.int("limits", "max_message_size", l.max_message_size, 0, 65_535),
        messages_per_second,
        handshake_timeout: p.duration("limits", "handshake_timeout", &l.handshake_timeout),
        idle_timeout: p.duration("limits", "idle_timeout", &l.idle_timeout),
        max_queued_bytes_per_session: p.int(
            "limits",
            "max_queued_bytes_per_session",
            l.max_queued_bytes_per_session,
            65_544,
            1 << 30,
        ),
        overload_queued_bytes: p.int("limits", "overload_queued_bytes", l.overload_queued_bytes, 0, 1 << 50),
        client_send_buffer: p.int("limits", "client_send_buffer", l.client_send_buffer, 0, 64 << 20),
        messages_burst: match l.messages_burst {
            0 => messages_per_second,
            b => p.int("limits", "messages_burst", b, 1, u32::MAX as i64),
        },
        on_rate_limit: RateLimitAction::parse(&l.on_rate_limit).unwrap_or_else(|| {
            p.push("limits", None, "on_rate_limit", format!("{:?} is not one of drop, close", l.on_rate_limit));
            RateLimitAction::Drop
        }),
        require_auth: l.require_auth,
    };
    if limits.handshake_timeout.is_zero() {
        p.push("limits", None, "handshake_timeout", "must be above zero");
    }
    if limits.idle_timeout.is_zero() {
        p.push("limits", None, "idle_timeout", "must be above zero");
    }
    limits
}

fn backend(p: &mut Problems<'_>, b: &RawBackend) -> BackendConfig {
    let backend = BackendConfig {
        connections_per_endpoint: p.int("backend", "connections_per_endpoint", b.connections_per_endpoint, 1, 64),
        dial_timeout: p.duration("backend", "dial_timeout", &b.dial_timeout),
        resolve_interval: p.duration("backend", "resolve_interval", &b.resolve_interval),
        max_frame_size: p.int("backend", "max_frame_size", b.max_frame_size, 9 + 65_535, 64 << 20),
        reconnect_backoff_min: p.duration("backend", "reconnect_backoff_min", &b.reconnect_backoff_min),
        reconnect_backoff_max: p.duration("backend", "reconnect_backoff_max", &b.reconnect_backoff_max),
        max_queued_bytes: p.int("backend", "max_queued_bytes", b.max_queued_bytes, 1 << 16, 1 << 30),
        circuit_failure_threshold: p.int(
            "backend",
            "circuit_failure_threshold",
            b.circuit_failure_threshold,
            1,
            1_000_000,
        ),
        circuit_open_duration: p.duration("backend", "circuit_open_duration", &b.circuit_open_duration),
        keepalive_interval: p.duration("backend", "keepalive_interval", &b.keepalive_interval),
        keepalive_timeout: p.duration("backend", "keepalive_timeout", &b.keepalive_timeout),
        seed_pool_max: p.int("backend", "seed_pool_max", b.seed_pool_max, 1, 100_000),
        seed_idle_timeout: p.duration("backend", "seed_idle_timeout", &b.seed_idle_timeout),
        seed_reuse: b.seed_reuse,
        hold_timeout: p.duration("backend", "hold_timeout", &b.hold_timeout),
        hold_max_bytes_per_session: p.int(
            "backend",
            "hold_max_bytes_per_session",
            b.hold_max_bytes_per_session,
            65_543,
            1 << 30,
        ),
        hold_max_bytes_per_worker: p.int(
            "backend",
            "hold_max_bytes_per_worker",
            b.hold_max_bytes_per_worker,
            0,
            1 << 34,
        ),
    };
    if !backend.keepalive_interval.is_zero() && backend.keepalive_timeout.is_zero() {
        p.push("backend", None, "keepalive_timeout", "must be above zero when keep-alive is on");
    }
    if backend.dial_timeout.is_zero() {
        p.push("backend", None, "dial_timeout", "must be above zero");
    }
    if backend.reconnect_backoff_min > backend.reconnect_backoff_max {
        p.push("backend", None, "reconnect_backoff_min", "is above reconnect_backoff_max");
    }
    backend
}

fn redis(p: &mut Problems<'_>, r: &RawRedis) -> RedisConfig {
    if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://") || r.url.starts_with("unix://")) {
        p.push("redis", None, "url", format!("{:?} is not a redis:// URL", r.url));
    }
    RedisConfig {
        url: r.url.clone(),
        key_prefix: r.key_prefix.clone(),
        refresh_interval: p.duration("redis", "refresh_interval", &r.refresh_interval),
    }
}

/// Consul's agent port.
const CONSUL_PORT: u16 = 8500;
/// Consul caps a blocking query's wait at 10 minutes.
const CONSUL_MAX_WAIT: Duration = Duration::from_secs(600);

/// A name that can go into a URL path or query unescaped (Consul service
/// and datacenter names are DNS-like).
fn url_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn consul(p: &mut Problems<'_>, c: &RawConsul, env: &Environment) -> ConsulConfig {
    let raw = c.address.trim();
    let address = if raw.is_empty() {
        match env.node_ip.as_deref() {
            Some(ip) if ip.contains(':') => format!("[{ip}]:{CONSUL_PORT}"),
            Some(ip) => format!("{ip}:{CONSUL_PORT}"),
            None => format!("127.0.0.1:{CONSUL_PORT}"),
        }
    } else if raw.starts_with("https://") {
        p.push(
            "consul",
            None,
            "address",
            format!("{raw:?}: https is not supported by this build; use the local agent's http port"),
        );
        String::new()
    } else {
        let hostport = raw.strip_prefix("http://").unwrap_or(raw).trim_end_matches('/');
        let has_port =
            hostport.rsplit_once(':').is_some_and(|(h, port)| !h.ends_with(':') && port.parse::<u16>().is_ok());
        let hostport = if has_port { hostport.to_string() } else { format!("{hostport}:{CONSUL_PORT}") };
        if let Err(e) = crate::routing::Endpoint::literal(&hostport) {
            p.push("consul", None, "address", format!("{raw:?} is not http://host:port ({e})"));
        }
        hostport
    };
    let mut services = std::collections::BTreeMap::new();
    for (k, v) in &c.services {
        match k.trim().parse::<u8>() {
            Ok(t) if url_safe(v) => {
                services.insert(t, v.clone());
            }
            Ok(_) => p.push(
                "consul",
                None,
                "services",
                format!("{k} = {v:?}: a service name is letters, digits, '-', '_' or '.'"),
            ),
            Err(_) => p.push("consul", None, "services", format!("{k:?} is not a server type 0..=255")),
        }
    }
    if c.services.is_empty() {
        p.push(
            "consul",
            None,
            "services",
            "names no service: map server types to Consul services, e.g. services = { 200 = \"game\" }",
        );
    }
    let datacenter = (!c.datacenter.is_empty()).then(|| c.datacenter.clone());
    if datacenter.as_deref().is_some_and(|d| !url_safe(d)) {
        p.push("consul", None, "datacenter", format!("{:?}: letters, digits, '-', '_' or '.'", c.datacenter));
    }
    let token = (!c.token.is_empty()).then(|| c.token.clone());
    if c.token.bytes().any(|b| b.is_ascii_control()) {
        p.push("consul", None, "token", "contains a control character");
    }
    let wait = p.duration("consul", "wait", &c.wait);
    if wait < Duration::from_secs(1) || wait > CONSUL_MAX_WAIT {
        p.push("consul", None, "wait", format!("{:?} is out of range 1s..=10m", c.wait));
    }
    ConsulConfig { address, services, namespace: c.namespace.clone(), datacenter, token, wait }
}

fn routes(p: &mut Problems<'_>, raw: &[crate::routing::RawRule]) -> Vec<RouteRule> {
    let mut routes = Vec::new();
    let mut seen = ahash::AHashMap::new();
    for (i, raw) in raw.iter().enumerate() {
        match raw.validate() {
            Ok(rule) => {
                if let Some(prev) = seen.insert(rule.key(), i) {
                    p.push(
                        "routes",
                        Some(i),
                        "server_type",
                        format!(
                            "duplicate rule for server_type {} world_id {} (also routes[{prev}])",
                            rule.server_type, rule.world_id
                        ),
                    );
                }
                routes.push(rule);
            }
            Err(errs) => {
                for (key, reason) in errs {
                    p.push("routes", Some(i), key, reason);
                }
            }
        }
    }
    routes
}

fn log(p: &mut Problems<'_>, l: &RawLog, env: &Environment) -> LogConfig {
    // LOG_LEVEL wins over the file; it is checked (and reported) as log.level.
    let level = env.log_level.clone().filter(|v| !v.is_empty()).unwrap_or_else(|| l.level.clone());
    if !matches!(level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
        p.push("log", None, "level", format!("{level:?} is not one of error, warn, info, debug, trace"));
    }
    let format = LogFormat::parse(&l.format).unwrap_or_else(|| {
        p.push("log", None, "format", format!("{:?} is not one of json, text, otel", l.format));
        LogFormat::Json
    });
    let set = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let service_name = set(&env.otel_service_name).unwrap_or_else(|| l.service_name.clone());
    if service_name.is_empty() {
        p.push("log", None, "service_name", "must not be empty");
    }
    LogConfig {
        level,
        format,
        access_log: l.access_log,
        access_log_path: (!l.access_log_path.is_empty()).then(|| l.access_log_path.clone().into()),
        service_name,
        service_namespace: set(&env.pod_namespace).unwrap_or_else(|| l.service_namespace.clone()),
    }
}

/// `[admin]`: reads the token file. Without one, the admin port must be on a
/// loopback address (`admin_listen`, when it parsed).
fn admin(p: &mut Problems<'_>, a: &RawAdmin, admin_listen: Option<SocketAddr>) -> AdminConfig {
    if a.token_file.is_empty() {
        if let Some(addr) = admin_listen.filter(|a| !a.ip().is_loopback()) {
            p.push(
                "server",
                None,
                "admin_listen",
                format!(
                    "{addr} is not a loopback address and [admin] token_file is not set: \
                     anyone reaching it could drain the gateway (set token_file, or bind 127.0.0.1)"
                ),
            );
        }
        return AdminConfig::default();
    }
    let path = std::path::PathBuf::from(&a.token_file);
    let token = match std::fs::read_to_string(&path) {
        Err(e) => {
            p.push("admin", None, "token_file", format!("{}: cannot read: {e}", path.display()));
            None
        }
        Ok(text) => {
            let token = text.trim_end();
            if token.is_empty() {
                p.push("admin", None, "token_file", format!("{}: is empty", path.display()));
                None
            } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push(
                    "admin",
                    None,
                    "token_file",
                    format!("{}: the token must be one line without spaces or control characters", path.display()),
                );
                None
            } else {
                Some(AdminToken::new(token))
            }
        }
    };
    AdminConfig { token_file: Some(path), token }
}
