//! Configuration: one serde struct per TOML section, then `validate()`.
//!
//! Data flow: file text -> [`RawConfig`] (serde, unknown keys refused) ->
//! [`RawConfig::validate`] -> [`Config`] (checked, typed, durations parsed).
//! Every problem found is collected, not only the first, and reported as
//! `file:line: key: reason`; lines come from the TOML document's spans.
//! Each component is handed only its own section.

use crate::routing::{RawRule, RouteRule};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The documented default config, compiled in so the gateway runs with no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/gateway.toml");
/// Where `--config` points when it is not given.
pub const DEFAULT_PATH: &str = "config/gateway.toml";

// Defaults, with units in the names.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_DRAIN_TIMEOUT: &str = "30s";
pub const DEFAULT_MAX_CONNECTIONS: u64 = 100_000;
pub const DEFAULT_MAX_MESSAGE_SIZE_BYTES: u32 = 65_535;
pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "5s";
pub const DEFAULT_IDLE_TIMEOUT: &str = "120s";
/// Bytes queued towards one client before it counts as a slow reader and is closed.
pub const DEFAULT_MAX_QUEUED_BYTES_PER_SESSION: u64 = 1 << 20;
pub const DEFAULT_CONNECTIONS_PER_ENDPOINT: u32 = 1;
pub const DEFAULT_DIAL_TIMEOUT: &str = "2s";
pub const DEFAULT_BACKEND_MAX_FRAME_SIZE_BYTES: u32 = 1 << 20;
pub const DEFAULT_RECONNECT_BACKOFF_MIN: &str = "100ms";
pub const DEFAULT_RECONNECT_BACKOFF_MAX: &str = "5s";
/// Bytes queued towards one backend connection (while it dials or is slow)
/// before further frames are refused and counted.
pub const DEFAULT_BACKEND_MAX_QUEUED_BYTES: u64 = 8 << 20;
/// Consecutive failures (dials, lost connections) that open an endpoint's circuit.
pub const DEFAULT_CIRCUIT_FAILURE_THRESHOLD: u32 = 5;
/// How long an open circuit refuses traffic before one probe is let through.
pub const DEFAULT_CIRCUIT_OPEN_DURATION: &str = "5s";
/// A backend connection silent this long gets a PING ("0s" disables keep-alive).
pub const DEFAULT_KEEPALIVE_INTERVAL: &str = "10s";
/// An unanswered PING older than this marks the connection dead.
pub const DEFAULT_KEEPALIVE_TIMEOUT: &str = "5s";
/// One largest client frame (8-byte header + 65,535 payload bytes) plus room
/// for a few small ones in the same message.
pub const DEFAULT_WS_MAX_MESSAGE_SIZE: usize = 128 * 1024;
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_KEY_PREFIX: &str = "game-gateway:";
pub const DEFAULT_REFRESH_INTERVAL: &str = "10s";
/// Largest node id: 12 bits of the session id.
pub const MAX_NODE_ID: u16 = 4095;
/// Largest worker count: 7 bits of the session id.
pub const MAX_WORKERS: usize = 128;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub limits: RawLimits,
    pub backend: RawBackend,
    pub redis: Option<RawRedis>,
    pub routes: Vec<RawRule>,
    pub log: RawLog,
    pub websocket: RawWebSocket,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWebSocket {
    pub enabled: bool,
    pub allowed_origins: Vec<String>,
    pub subprotocols: Vec<String>,
    pub max_message_size: i64,
}

impl Default for RawWebSocket {
    fn default() -> Self {
        RawWebSocket {
            enabled: true,
            allowed_origins: vec![],
            subprotocols: vec![],
            max_message_size: DEFAULT_WS_MAX_MESSAGE_SIZE as i64,
        }
    }
}

/// WebSocket on the game port.
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    pub enabled: bool,
    pub policy: crate::protocol::frontdoor::UpgradePolicy,
    /// Largest WebSocket message (and frame) accepted; larger closes with 1009.
    pub max_message_size: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    pub node_id: i64,
    pub workers: i64,
    pub cpus: Vec<i64>,
    pub io_driver: String,
    pub drain_timeout: String,
    pub proxy_protocol: bool,
    pub proxy_trusted: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            node_id: 0,
            workers: 0,
            cpus: vec![],
            io_driver: "auto".into(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT.into(),
            proxy_protocol: false,
            proxy_trusted: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_connections: i64,
    pub max_connections_per_ip: i64,
    pub connection_rate_per_ip: i64,
    pub max_message_size: i64,
    pub messages_per_second: i64,
    pub handshake_timeout: String,
    pub idle_timeout: String,
    pub max_queued_bytes_per_session: i64,
    pub messages_burst: i64,
    pub on_rate_limit: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS as i64,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE_BYTES as i64,
            messages_per_second: 0,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT.into(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT.into(),
            max_queued_bytes_per_session: DEFAULT_MAX_QUEUED_BYTES_PER_SESSION as i64,
            messages_burst: 0,
            on_rate_limit: "drop".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackend {
    pub connections_per_endpoint: i64,
    pub dial_timeout: String,
    pub max_frame_size: i64,
    pub reconnect_backoff_min: String,
    pub reconnect_backoff_max: String,
    pub max_queued_bytes: i64,
    pub circuit_failure_threshold: i64,
    pub circuit_open_duration: String,
    pub keepalive_interval: String,
    pub keepalive_timeout: String,
}

impl Default for RawBackend {
    fn default() -> Self {
        RawBackend {
            connections_per_endpoint: DEFAULT_CONNECTIONS_PER_ENDPOINT as i64,
            dial_timeout: DEFAULT_DIAL_TIMEOUT.into(),
            max_frame_size: DEFAULT_BACKEND_MAX_FRAME_SIZE_BYTES as i64,
            reconnect_backoff_min: DEFAULT_RECONNECT_BACKOFF_MIN.into(),
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX.into(),
            max_queued_bytes: DEFAULT_BACKEND_MAX_QUEUED_BYTES as i64,
            circuit_failure_threshold: DEFAULT_CIRCUIT_FAILURE_THRESHOLD as i64,
            circuit_open_duration: DEFAULT_CIRCUIT_OPEN_DURATION.into(),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL.into(),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    pub key_prefix: String,
    pub refresh_interval: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: DEFAULT_REDIS_URL.into(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            refresh_interval: DEFAULT_REFRESH_INTERVAL.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: String,
    pub format: String,
    pub access_log: bool,
    pub access_log_path: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { level: "info".into(), format: "json".into(), access_log: true, access_log_path: String::new() }
    }
}

/// Which monoio driver a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring, falling back to epoll when the kernel refuses it.
    Auto,
    IoUring,
    Epoll,
}

impl IoDriver {
    pub fn parse(s: &str) -> Option<IoDriver> {
        match s {
            "auto" => Some(IoDriver::Auto),
            "io_uring" | "iouring" => Some(IoDriver::IoUring),
            "epoll" | "legacy" => Some(IoDriver::Epoll),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriver::Auto => "auto",
            IoDriver::IoUring => "io_uring",
            IoDriver::Epoll => "epoll",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub node_id: u16,
    /// Resolved worker count (0 in the file means one per available core).
    pub workers: usize,
    /// Core for each worker, `cpus[i]` for worker `i`; empty = no pinning.
    pub cpus: Vec<usize>,
    pub io_driver: IoDriver,
    pub drain_timeout: Duration,
    /// Accept PROXY protocol v1/v2 headers ...
    pub proxy_protocol: bool,
    /// ... only from these source networks.
    pub proxy_trusted: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_connections: u64,
    pub max_connections_per_ip: u32,
    pub connection_rate_per_ip: u32,
    pub max_message_size: usize,
    pub messages_per_second: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_queued_bytes_per_session: usize,
    /// Frames a session may send at once above `messages_per_second`.
    pub messages_burst: u32,
    /// What happens to a frame over `messages_per_second`.
    pub on_rate_limit: RateLimitAction,
}

/// What happens to a client frame over the session's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitAction {
    /// Drop the frame, count it, keep the session.
    Drop,
    /// Close the session (reason 4).
    Close,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub connections_per_endpoint: usize,
    pub dial_timeout: Duration,
    pub max_frame_size: usize,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    pub max_queued_bytes: usize,
    pub circuit_failure_threshold: u32,
    pub circuit_open_duration: Duration,
    /// Zero disables keep-alive pings.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub refresh_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    /// Where access-log records go; `None` = stdout.
    pub access_log_path: Option<std::path::PathBuf>,
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (`<embedded>` for the compiled-in default).
    pub source: String,
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub backend: BackendConfig,
    pub redis: Option<RedisConfig>,
    pub routes: Vec<RouteRule>,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
}

/// One config problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.file, self.line, self.key, self.reason)
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses "250ms", "5s", "2m", "1h" (an integer and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"250ms\", \"5s\", \"2m\""))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?} has no unit (use ms, s, m or h)")),
    };
    Ok(d)
}

/// Maps dotted key paths to line numbers using the document's spans.
pub struct Locator<'a> {
    src: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    pub fn new(src: &'a str) -> Self {
        Locator { src, doc: toml_edit::ImDocument::parse(src).ok() }
    }

    fn line_at(&self, offset: usize) -> usize {
        self.src[..offset.min(self.src.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }

    /// Line of `section.key` (`key` may be empty for the section itself);
    /// `index` selects an element of an array of tables such as `[[routes]]`.
    pub fn line(&self, section: &str, index: Option<usize>, key: &str) -> usize {
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
pub struct Problems<'a> {
    file: &'a str,
    loc: &'a Locator<'a>,
    pub errors: Vec<ConfigError>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a str, loc: &'a Locator<'a>) -> Self {
        Problems { file, loc, errors: vec![] }
    }
    pub fn push(&mut self, section: &str, index: Option<usize>, key: &str, reason: impl Into<String>) {
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
                self.push(section, None, key, e);
                // Non-zero so the "above zero" checks do not report it twice.
                Duration::from_secs(1)
            }
        }
    }
    fn int<T: TryFrom<i64>>(&mut self, section: &str, key: &str, v: i64, lo: i64, hi: i64) -> T
    where
        T: Default,
    {
        if v < lo || v > hi {
            self.push(section, None, key, format!("{v} is out of range {lo}..={hi}"));
            return T::default();
        }
        T::try_from(v).unwrap_or_default()
    }
}

impl Config {
    /// Loads and validates `path`; the default path falls back to the embedded
    /// default when the file does not exist.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(src) => Config::from_str(&src, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) => {
                Config::from_str(EMBEDDED_DEFAULT, "<embedded>")
            }
            Err(e) => Err(ConfigErrors(vec![ConfigError {
                file: path.display().to_string(),
                line: 0,
                key: "-".into(),
                reason: format!("cannot read: {e}"),
            }])),
        }
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_str(src: &str, file: &str) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = match toml::from_str(src) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map(|s| src[..s.start.min(src.len())].matches('\n').count() + 1).unwrap_or(1);
                let msg = e.message().trim().to_string();
                let key = e
                    .span()
                    .and_then(|s| src.get(s.start..s.end))
                    .map(|t| t.split(['=', '\n']).next().unwrap_or("").trim().trim_matches(['[', ']']).to_string())
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(|| "-".into());
                return Err(ConfigErrors(vec![ConfigError { file: file.into(), line, key, reason: msg }]));
            }
        };
        let loc = Locator::new(src);
        raw.validate(file, &loc)
    }

    /// Applies the command-line and environment overrides (they win over the file).
    pub fn apply_overrides(&mut self, workers: Option<usize>, io_driver: Option<IoDriver>) {
        if let Some(w) = workers {
            let w = if w == 0 { available_cores() } else { w.min(MAX_WORKERS) };
            self.server.workers = w;
            if self.server.cpus.len() != w {
                self.server.cpus = default_cpus(w);
            }
        }
        if let Some(d) = io_driver {
            self.server.io_driver = d;
        }
    }

    /// A human summary for `--check-config`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "config: {}", self.source);
        let _ = writeln!(
            s,
            "server: listen={} admin_listen={} node_id={} workers={} cpus={:?} io_driver={} drain_timeout={:?}",
            self.server.listen,
            self.server.admin_listen,
            self.server.node_id,
            self.server.workers,
            self.server.cpus,
            self.server.io_driver.as_str(),
            self.server.drain_timeout
        );
        let l = &self.limits;
        let _ = writeln!(
            s,
            "limits: max_connections={} per_ip={} rate_per_ip={}/s max_message_size={} messages_per_second={} handshake_timeout={:?} idle_timeout={:?}",
            l.max_connections, l.max_connections_per_ip, l.connection_rate_per_ip, l.max_message_size, l.messages_per_second, l.handshake_timeout, l.idle_timeout
        );
        let b = &self.backend;
        let _ = writeln!(
            s,
            "backend: connections_per_endpoint={} dial_timeout={:?} max_frame_size={} backoff={:?}..{:?}",
            b.connections_per_endpoint,
            b.dial_timeout,
            b.max_frame_size,
            b.reconnect_backoff_min,
            b.reconnect_backoff_max
        );
        match &self.redis {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "redis: url={} key_prefix={} refresh_interval={:?}",
                    r.url, r.key_prefix, r.refresh_interval
                );
            }
            None => {
                let _ = writeln!(s, "redis: off (static routes only)");
            }
        }
        let _ = writeln!(s, "routes: {}", self.routes.len());
        for r in &self.routes {
            let _ = writeln!(s, "  {r}");
        }
        let _ = writeln!(
            s,
            "log: level={} format={:?} access_log={}",
            self.log.level, self.log.format, self.log.access_log
        );
        s
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(MAX_WORKERS)
}

fn default_cpus(workers: usize) -> Vec<usize> {
    let n = available_cores();
    (0..workers).map(|i| i % n).collect()
}

/// Node id from a pod name: a StatefulSet ordinal suffix (`gw-3` -> 3) when
/// there is one, else a stable hash of the name, so pods never need a per-pod
/// config.
pub fn node_id_from_pod_name(name: &str) -> u16 {
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
    pub fn validate(self, file: &str, loc: &Locator<'_>) -> Result<Config, ConfigErrors> {
        let mut p = Problems::new(file, loc);

        let s = &self.server;
        let listen = parse_addr(&mut p, "server", "listen", &s.listen);
        let admin_listen = parse_addr(&mut p, "server", "admin_listen", &s.admin_listen);
        let mut node_id: u16 = p.int("server", "node_id", s.node_id, 0, MAX_NODE_ID as i64);
        if node_id == 0 {
            if let Ok(pod) = std::env::var("POD_NAME") {
                if !pod.is_empty() {
                    node_id = node_id_from_pod_name(&pod);
                }
            }
        }
        let workers_raw: usize = p.int("server", "workers", s.workers, 0, MAX_WORKERS as i64);
        let workers = if workers_raw == 0 { available_cores() } else { workers_raw };
        let cpus = if s.cpus.is_empty() {
            default_cpus(workers)
        } else {
            let ncpu = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(usize::MAX);
            let mut v = Vec::new();
            for c in &s.cpus {
                if *c < 0 || *c as usize >= ncpu.max(1) {
                    p.push("server", None, "cpus", format!("core {c} does not exist (this machine has {ncpu})"));
                } else {
                    v.push(*c as usize);
                }
            }
            if s.cpus.len() < workers {
                p.push("server", None, "cpus", format!("lists {} cores for {} workers", s.cpus.len(), workers));
            }
            v
        };
        let io_driver = IoDriver::parse(&s.io_driver).unwrap_or_else(|| {
            p.push("server", None, "io_driver", format!("{:?} is not one of auto, io_uring, epoll", s.io_driver));
            IoDriver::Auto
        });
        let drain_timeout = p.duration("server", "drain_timeout", &s.drain_timeout);
        let mut proxy_trusted = Vec::new();
        for n in &s.proxy_trusted {
            match n.parse::<ipnet::IpNet>().or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(net) => proxy_trusted.push(net),
                Err(_) => {
                    p.push("server", None, "proxy_trusted", format!("{n:?} is not a network like \"10.0.0.0/8\""))
                }
            }
        }
        let ws = &self.websocket;
        let websocket = WebSocketConfig {
            enabled: ws.enabled,
            policy: crate::protocol::frontdoor::UpgradePolicy {
                allowed_origins: ws.allowed_origins.clone(),
                subprotocols: ws.subprotocols.clone(),
            },
            max_message_size: p.int("websocket", "max_message_size", ws.max_message_size, 16, 16 << 20),
        };

        let l = &self.limits;
        let limits = LimitsConfig {
            max_connections: p.int("limits", "max_connections", l.max_connections, 1, i64::MAX),
            max_connections_per_ip: p.int(
                "limits",
                "max_connections_per_ip",
                l.max_connections_per_ip,
                0,
                u32::MAX as i64,
            ),
            connection_rate_per_ip: p.int(
                "limits",
                "connection_rate_per_ip",
                l.connection_rate_per_ip,
                0,
                u32::MAX as i64,
            ),
            max_message_size: p.int("limits", "max_message_size", l.max_message_size, 0, 65_535),
            messages_per_second: p.int("limits", "messages_per_second", l.messages_per_second, 0, u32::MAX as i64),
            handshake_timeout: p.duration("limits", "handshake_timeout", &l.handshake_timeout),
            idle_timeout: p.duration("limits", "idle_timeout", &l.idle_timeout),
            max_queued_bytes_per_session: p.int(
                "limits",
                "max_queued_bytes_per_session",
                l.max_queued_bytes_per_session,
                65_544,
                1 << 30,
            ),
            messages_burst: 0,
            on_rate_limit: RateLimitAction::Drop,
        };
        let mut limits = limits;
        limits.messages_burst = match l.messages_burst {
            0 => limits.messages_per_second,
            b => p.int("limits", "messages_burst", b, 1, u32::MAX as i64),
        };
        limits.on_rate_limit = match l.on_rate_limit.as_str() {
            "drop" => RateLimitAction::Drop,
            "close" => RateLimitAction::Close,
            other => {
                p.push("limits", None, "on_rate_limit", format!("{other:?} is not one of drop, close"));
                RateLimitAction::Drop
            }
        };
        if limits.handshake_timeout.is_zero() {
            p.push("limits", None, "handshake_timeout", "must be above zero");
        }
        if limits.idle_timeout.is_zero() {
            p.push("limits", None, "idle_timeout", "must be above zero");
        }

        let b = &self.backend;
        let backend = BackendConfig {
            connections_per_endpoint: p.int("backend", "connections_per_endpoint", b.connections_per_endpoint, 1, 64),
            dial_timeout: p.duration("backend", "dial_timeout", &b.dial_timeout),
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

        let redis = self.redis.as_ref().map(|r| {
            if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://") || r.url.starts_with("unix://")) {
                p.push("redis", None, "url", format!("{:?} is not a redis:// URL", r.url));
            }
            RedisConfig {
                url: r.url.clone(),
                key_prefix: r.key_prefix.clone(),
                refresh_interval: p.duration("redis", "refresh_interval", &r.refresh_interval),
            }
        });

        let mut routes = Vec::new();
        let mut seen = ahash::AHashMap::new();
        for (i, raw) in self.routes.iter().enumerate() {
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

        let level = std::env::var("LOG_LEVEL").ok().filter(|v| !v.is_empty()).unwrap_or(self.log.level.clone());
        if !matches!(level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
            p.push("log", None, "level", format!("{level:?} is not one of error, warn, info, debug, trace"));
        }
        let format = match self.log.format.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                p.push("log", None, "format", format!("{other:?} is not one of json, text"));
                LogFormat::Json
            }
        };

        if !p.errors.is_empty() {
            p.errors.sort_by_key(|e| e.line);
            return Err(ConfigErrors(p.errors));
        }
        Ok(Config {
            source: file.to_string(),
            server: ServerConfig {
                listen: listen.unwrap(),
                admin_listen: admin_listen.unwrap(),
                node_id,
                workers,
                cpus,
                io_driver,
                drain_timeout,
                proxy_protocol: s.proxy_protocol,
                proxy_trusted,
            },
            limits,
            backend,
            redis,
            routes,
            websocket,
            log: LogConfig {
                level,
                format,
                access_log: self.log.access_log,
                access_log_path: (!self.log.access_log_path.is_empty())
                    .then(|| self.log.access_log_path.clone().into()),
            },
        })
    }
}

fn parse_addr(p: &mut Problems<'_>, section: &str, key: &str, v: &str) -> Option<SocketAddr> {
    match v.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(section, None, key, format!("{v:?} is not an ip:port address"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_str(EMBEDDED_DEFAULT, "<embedded>").unwrap();
        assert!(c.redis.is_none(), "the default must run without Redis");
        assert!(!c.routes.is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn every_problem_is_listed_with_file_line_and_key() {
        let src = "[server]\nlisten = \"nope\"\nio_driver = \"kqueue\"\n\n[limits]\nidle_timeout = \"forever\"\n\n[[routes]]\nserver_type = 10\nservice_name = \"a\"\nstrategy = \"random\"\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nserver_type = 10\nservice_name = \"b\"\nstrategy = \"round_robin\"\nendpoints = [\"127.0.0.1:99999\"]\n";
        let errs = Config::from_str(src, "gw.toml").unwrap_err();
        let text = errs.to_string();
        assert!(text.contains("gw.toml:2: server.listen:"), "{text}");
        assert!(text.contains("gw.toml:3: server.io_driver:"), "{text}");
        assert!(text.contains("gw.toml:6: limits.idle_timeout:"), "{text}");
        assert!(text.contains("gw.toml:11: routes[0].strategy:"), "{text}");
        assert!(text.contains("gw.toml:18: routes[1].endpoints:"), "{text}");
        assert_eq!(errs.0.len(), 5, "{text}");
    }

    #[test]
    fn unknown_key_is_located() {
        let errs = Config::from_str("[limits]\nmax_conections = 5\n", "x.toml").unwrap_err();
        let e = &errs.0[0];
        assert_eq!((e.line, e.key.as_str()), (2, "max_conections"), "{errs}");
        assert!(e.reason.contains("unknown field"), "{errs}");
    }

    #[test]
    fn duplicate_rule_keys() {
        let src = "[[routes]]\nserver_type = 10\nservice_name = \"a\"\nstrategy = \"round_robin\"\nendpoints = []\n[[routes]]\nserver_type = 10\nservice_name = \"a\"\nstrategy = \"round_robin\"\nendpoints = []\n";
        let errs = Config::from_str(src, "d.toml").unwrap_err();
        assert!(errs.to_string().contains("d.toml:7: routes[1].server_type: duplicate"), "{errs}");
    }

    #[test]
    fn pod_name_node_ids() {
        assert_eq!(node_id_from_pod_name("game-gateway-3"), 3);
        let h = node_id_from_pod_name("gw-abcde");
        assert!(h <= MAX_NODE_ID);
        assert_eq!(h, node_id_from_pod_name("gw-abcde"));
    }
}
