//! The checked configuration: one typed struct per TOML section, what the
//! rest of the gateway reads. Values here have passed [`super::validate`];
//! enums print as the config spells them.

use crate::routing::RouteRule;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Largest node id: 12 bits of the session id.
pub const MAX_NODE_ID: u16 = 4095;
/// Largest worker count: 7 bits of the session id.
pub const MAX_WORKERS: usize = 128;

/// WebSocket on the game port.
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    pub enabled: bool,
    pub policy: crate::protocol::frontdoor::UpgradePolicy,
    /// Largest WebSocket message (and frame) accepted; larger closes with 1009.
    pub max_message_size: usize,
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

impl fmt::Display for IoDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub node_id: u16,
    /// Resolved worker count (0 in the file means one per CPU the process
    /// may use).
    pub workers: usize,
    /// CPU id for each worker, `cpus[i]` for worker `i`; empty = no pinning.
    pub cpus: Vec<usize>,
    /// The CPUs the placement was chosen from (the process's affinity mask).
    pub cpu_budget: crate::cpu::CpuBudget,
    pub io_driver: IoDriver,
    pub drain_timeout: Duration,
    /// Accept PROXY protocol v1/v2 headers ...
    pub proxy_protocol: bool,
    /// ... only from these source networks.
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// This gateway's name towards backends (gRPC `gateway-name`, with the
    /// worker index): `POD_NAME`, else the host name.
    pub node_name: String,
    /// Live upgrade: the Unix socket this process hands over on (listens
    /// on, for a `--takeover` process or after SIGUSR2); `None` = off.
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// Live upgrade: when set, a process taking over must run this
    /// executable (checked by `/proc/PID/exe` of the socket's peer).
    pub upgrade_peer_exe: Option<std::path::PathBuf>,
    /// After handing everything to a new process: `false` exit at once;
    /// `true` stay up, idle and not ready, until stopped (for orchestrators
    /// that restart a container whose process exits).
    pub wait_after_handover: bool,
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
    /// The node-wide budget of bytes queued towards clients (the overload
    /// manager, `crate::overload`); 0 = a quarter of the memory limit.
    /// Restart-only: the workers share it from their start.
    pub overload_queued_bytes: u64,
    /// `SO_SNDBUF` of client sockets; 0 = the kernel's own sizing.
    pub client_send_buffer: usize,
    /// Frames a session may send at once above `messages_per_second`.
    pub messages_burst: u32,
    /// What happens to a frame over `messages_per_second`.
    pub on_rate_limit: RateLimitAction,
    /// Until its backend authenticates a session, only message classes with
    /// `before_auth` are forwarded.
    pub require_auth: bool,
}

/// What happens to a client frame over the session's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitAction {
    /// Drop the frame, count it, keep the session.
    Drop,
    /// Close the session (reason 4).
    Close,
}

impl RateLimitAction {
    pub(crate) fn parse(s: &str) -> Option<RateLimitAction> {
        match s {
            "drop" => Some(RateLimitAction::Drop),
            "close" => Some(RateLimitAction::Close),
            _ => None,
        }
    }

    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitAction::Drop => "drop",
            RateLimitAction::Close => "close",
        }
    }
}

impl fmt::Display for RateLimitAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub connections_per_endpoint: usize,
    pub dial_timeout: Duration,
    /// Endpoint host names are looked up again this often (control side;
    /// zero = only when route data is read).
    pub resolve_interval: Duration,
    pub max_frame_size: usize,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    pub max_queued_bytes: usize,
    pub circuit_failure_threshold: u32,
    pub circuit_open_duration: Duration,
    /// Zero disables keep-alive pings.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// seed_tcp: per-session connections per endpoint per worker, busy and idle.
    pub seed_pool_max: usize,
    /// seed_tcp: how long an unused connection waits in the idle pool.
    pub seed_idle_timeout: Duration,
    /// seed_tcp: a connection whose session ended goes back to the idle pool
    /// (true) or is closed (false, the default: a reply the server sends late
    /// for the ended session could otherwise reach the next session).
    pub seed_reuse: bool,
    /// `on_backend_loss = "hold"`: how long a session waits for its backend,
    pub hold_timeout: Duration,
    /// the bytes of client frames it may buffer meanwhile,
    pub hold_max_bytes_per_session: usize,
    /// and the bytes all held sessions of a worker may buffer.
    pub hold_max_bytes_per_worker: usize,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub refresh_interval: Duration,
}

/// `[consul]`: which services fill which rules, and how to ask the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// The agent's `host:port` (plain HTTP).
    pub address: String,
    /// Server type -> Consul service whose passing instances fill that
    /// type's rules that list no endpoints.
    pub services: BTreeMap<u8, String>,
    /// Instance filter on the `namespace` (else `pod_namespace`) service
    /// meta; empty = no filter.
    pub namespace: String,
    /// `dc` query parameter; `None` = the agent's own datacenter.
    pub datacenter: Option<String>,
    /// `X-Consul-Token` header; `None` = no token.
    pub token: Option<String>,
    /// Blocking query wait (Consul adds up to 1/16 of it).
    pub wait: Duration,
}

impl ConsulConfig {
    /// The distinct services to watch, in name order.
    pub fn service_names(&self) -> Vec<&str> {
        let set: std::collections::BTreeSet<&str> = self.services.values().map(String::as_str).collect();
        set.into_iter().collect()
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("services", &self.services)
            .field("namespace", &self.namespace)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("wait", &self.wait)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
    /// JSON with the Go gateway's (OpenTelemetry log data model) field
    /// names: `timestamp` in epoch nanoseconds, `severity_text`,
    /// `severity_number`, `body`, `caller`, `service.*`.
    Otel,
}

impl LogFormat {
    pub(crate) fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            "otel" => Some(LogFormat::Otel),
            _ => None,
        }
    }

    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
            LogFormat::Otel => "otel",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    /// Where access-log records go; `None` = stdout.
    pub access_log_path: Option<std::path::PathBuf>,
    /// `service.name` of `otel` log lines: `OTEL_SERVICE_NAME`, else
    /// `[log] service_name`.
    pub service_name: String,
    /// `service.namespace` of `otel` log lines: `POD_NAMESPACE`, else
    /// `[log] service_namespace` (may be empty).
    pub service_namespace: String,
}

/// The admin port's bearer token (`[admin] token_file`, trailing whitespace
/// trimmed). Never printed: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(std::sync::Arc<str>);

impl AdminToken {
    /// A token from its text (not empty; the config checks that).
    pub fn new(token: &str) -> AdminToken {
        AdminToken(token.into())
    }

    /// Whether `presented` is this token, compared in constant time: the
    /// time depends on the length of `presented` only, never on where the
    /// bytes differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        if secret.is_empty() {
            return false;
        }
        let mut diff = u8::from(presented.len() != secret.len());
        for (i, b) in presented.iter().enumerate() {
            diff |= b ^ secret[i % secret.len()];
        }
        std::hint::black_box(diff) == 0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(<{} bytes, redacted>)", self.0.len())
    }
}

/// `[admin]`: access to the admin port's state-changing endpoints.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Where the token was read from.
    pub token_file: Option<std::path::PathBuf>,
    /// The token `POST /drain` (and any other state-changing admin call)
    /// must present as `Authorization: Bearer <token>`; `None` = no check
    /// (only allowed on a loopback `admin_listen`).
    pub token: Option<AdminToken>,
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
    pub consul: Option<ConsulConfig>,
    pub routes: Vec<RouteRule>,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
    pub admin: AdminConfig,
    pub drain: DrainConfig,
    pub policy: std::sync::Arc<MessagePolicy>,
    pub tls: super::tls::TlsConfig,
    pub otlp: OtlpConfig,
}

/// `[otlp]` with the `OTEL_*` environment applied.
#[derive(Debug, Clone, Default)]
pub struct OtlpConfig {
    /// OTLP/HTTP base URL; `None` = no trace export.
    pub endpoint: Option<String>,
    /// Share of sessions traced.
    pub sample_ratio: f64,
    /// Resource attributes: service.name, service.version, k8s.* from the pod.
    pub resource: Vec<(String, String)>,
}

/// One class of client messages (`[[message_policy]]`).
#[derive(Debug, Clone)]
pub struct MessageClass {
    /// Its metric label.
    pub name: std::sync::Arc<str>,
    pub before_auth: bool,
    /// 0 = only `max_message_size`.
    pub max_payload: usize,
    /// Per session per second; 0 = unlimited.
    pub rate: u32,
    pub burst: u32,
    /// Close the session (reason 4) on a violation, instead of dropping.
    pub close: bool,
}

/// A class's scope (`None` = every route) and its inclusive msg_id ranges.
pub(crate) type ClassMembers = (Option<u8>, Vec<(u16, u16)>);

/// No class for a msg_id.
pub const NO_CLASS: u8 = u8::MAX;

/// The compiled message policy: msg_id -> class, globally and per server
/// type, looked up in O(1) per frame.
#[derive(Debug, Default)]
pub struct MessagePolicy {
    pub classes: Vec<MessageClass>,
    /// msg_id -> class index (or [`NO_CLASS`]) for every route.
    global: Option<Box<[u8]>>,
    /// The same for frames routed to one server type (overrides `global`).
    scoped: ahash::AHashMap<u8, Box<[u8]>>,
}

impl MessagePolicy {
    /// `members[i]`: class `i`'s scope (a server type, or every route) and
    /// its msg_id ranges.
    pub(crate) fn new(classes: Vec<MessageClass>, members: Vec<ClassMembers>) -> MessagePolicy {
        let mut p = MessagePolicy { classes, global: None, scoped: Default::default() };
        for (i, (scope, ranges)) in members.into_iter().enumerate() {
            let table = match scope {
                None => p.global.get_or_insert_with(|| vec![NO_CLASS; 65536].into_boxed_slice()),
                Some(st) => p.scoped.entry(st).or_insert_with(|| vec![NO_CLASS; 65536].into_boxed_slice()),
            };
            for (lo, hi) in ranges {
                for id in lo..=hi {
                    table[id as usize] = i as u8;
                }
            }
        }
        p
    }

    /// Whether any class exists (the per-frame check is skipped otherwise).
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// The class of `msg_id` in a frame routed to `server_type`.
    #[inline]
    pub fn class(&self, server_type: u8, msg_id: u16) -> Option<usize> {
        let scoped = self.scoped.get(&server_type).map(|t| t[msg_id as usize]).filter(|c| *c != NO_CLASS);
        let c = scoped.or_else(|| self.global.as_ref().map(|t| t[msg_id as usize]))?;
        (c != NO_CLASS).then_some(c as usize)
    }
}

/// `[drain]`: what clients see when the gateway drains.
#[derive(Debug, Clone, Default)]
pub struct DrainConfig {
    /// The notice frame every client gets when the drain begins:
    /// (msg_id, payload); `None` = no notice.
    pub notice: Option<(u16, bytes::Bytes)>,
    /// Close sessions spread over `drain_timeout` (each at a random moment
    /// of it) instead of all at its end.
    pub paced: bool,
}
