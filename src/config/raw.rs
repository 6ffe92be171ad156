//! The raw TOML sections as serde reads them: one struct per section, unknown
//! keys refused, every key optional with its documented default. Nothing here
//! is checked; [`super::validate`] turns these into the typed sections.

use crate::routing::RawRule;
use serde::Deserialize;

// Defaults, with units in the names.
pub(crate) const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub(crate) const DEFAULT_DRAIN_TIMEOUT: &str = "30s";
pub(crate) const DEFAULT_MAX_CONNECTIONS: u64 = 100_000;
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE_BYTES: u32 = 65_535;
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: &str = "5s";
pub(crate) const DEFAULT_IDLE_TIMEOUT: &str = "120s";
/// Bytes queued towards one client before it counts as a slow reader and is closed.
pub(crate) const DEFAULT_MAX_QUEUED_BYTES_PER_SESSION: u64 = 1 << 20;
pub(crate) const DEFAULT_CONNECTIONS_PER_ENDPOINT: u32 = 1;
pub(crate) const DEFAULT_DIAL_TIMEOUT: &str = "2s";
pub(crate) const DEFAULT_BACKEND_MAX_FRAME_SIZE_BYTES: u32 = 1 << 20;
pub(crate) const DEFAULT_RECONNECT_BACKOFF_MIN: &str = "100ms";
pub(crate) const DEFAULT_RECONNECT_BACKOFF_MAX: &str = "5s";
/// Bytes queued towards one backend connection (while it dials or is slow)
/// before further frames are refused and counted.
pub(crate) const DEFAULT_BACKEND_MAX_QUEUED_BYTES: u64 = 8 << 20;
/// Consecutive failures (dials, lost connections) that open an endpoint's circuit.
pub(crate) const DEFAULT_CIRCUIT_FAILURE_THRESHOLD: u32 = 5;
/// How long an open circuit refuses traffic before one probe is let through.
pub(crate) const DEFAULT_CIRCUIT_OPEN_DURATION: &str = "5s";
/// A backend connection silent this long gets a PING ("0s" disables keep-alive).
pub(crate) const DEFAULT_KEEPALIVE_INTERVAL: &str = "10s";
/// An unanswered PING older than this marks the connection dead.
pub(crate) const DEFAULT_KEEPALIVE_TIMEOUT: &str = "5s";
/// Per-session (seed_tcp) backend connections per endpoint per worker, as the
/// Go gateway's pool limit per service.
pub(crate) const DEFAULT_SEED_POOL_MAX: u32 = 100;
/// How long an unused seed_tcp connection waits in the idle pool.
pub(crate) const DEFAULT_SEED_IDLE_TIMEOUT: &str = "5m";
/// `SO_SNDBUF` of client sockets: a few dozen game frames in flight, and a
/// bound on what the kernel holds for a client that does not read.
pub(crate) const DEFAULT_CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024;
/// `on_backend_loss = "hold"`: how long a session waits for its backend.
pub(crate) const DEFAULT_HOLD_TIMEOUT: &str = "10s";
/// ... and how many bytes of its frames it may buffer meanwhile,
pub(crate) const DEFAULT_HOLD_MAX_BYTES_PER_SESSION: u32 = 128 * 1024;
/// ... within this many for the whole worker.
pub(crate) const DEFAULT_HOLD_MAX_BYTES_PER_WORKER: u32 = 64 << 20;
/// One largest client frame (8-byte header + 65,535 payload bytes) plus room
/// for a few small ones in the same message.
pub(crate) const DEFAULT_WS_MAX_MESSAGE_SIZE: usize = 128 * 1024;
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_KEY_PREFIX: &str = "game-gateway:";
pub(crate) const DEFAULT_REFRESH_INTERVAL: &str = "10s";
/// How often endpoint host names are looked up again.
pub(crate) const DEFAULT_RESOLVE_INTERVAL: &str = "30s";
/// How long one Consul blocking query may wait for a change.
pub(crate) const DEFAULT_CONSUL_WAIT: &str = "30s";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawConfig {
    pub(crate) server: RawServer,
    pub(crate) limits: RawLimits,
    pub(crate) backend: RawBackend,
    pub(crate) redis: Option<RawRedis>,
    pub(crate) consul: Option<RawConsul>,
    pub(crate) routes: Vec<RawRule>,
    pub(crate) log: RawLog,
    pub(crate) websocket: RawWebSocket,
    pub(crate) admin: RawAdmin,
    pub(crate) drain: RawDrain,
    pub(crate) message_policy: Vec<RawMessagePolicy>,
    pub(crate) tls: RawTls,
    pub(crate) otlp: RawOtlp,
}

/// `[otlp]`: trace export (off unless an endpoint is set here or in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawOtlp {
    /// OTLP/HTTP base URL, e.g. "http://otel-collector:4318"; empty = off.
    pub(crate) endpoint: String,
    /// Share of sessions traced, 0.0..=1.0.
    pub(crate) sample_ratio: f64,
    pub(crate) service_name: String,
}

impl Default for RawOtlp {
    fn default() -> Self {
        RawOtlp { endpoint: String::new(), sample_ratio: 1.0, service_name: "game-gateway".into() }
    }
}

/// `[tls]`: TLS on the game port.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawTls {
    /// off | optional (TLS and plaintext side by side) | required.
    pub(crate) mode: String,
    /// ALPN protocols offered, in order of preference.
    pub(crate) alpn: Vec<String>,
    pub(crate) certificates: Vec<RawCertificate>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls { mode: "off".into(), alpn: vec!["http/1.1".into()], certificates: Vec::new() }
    }
}

/// `[[tls.certificates]]`: one chain and its key, in PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub(crate) cert: String,
    pub(crate) key: String,
}

/// `[[message_policy]]`: one class of client messages, by msg_id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMessagePolicy {
    /// The class's name: its metric label.
    pub(crate) name: String,
    /// msg_ids: numbers, or "first-last" ranges.
    pub(crate) msg_ids: Vec<RawMsgIds>,
    /// Only for frames routed to this server type (overrides the global
    /// classes for it); absent = every route.
    #[serde(default)]
    pub(crate) server_type: Option<i64>,
    /// Forwarded before the backend has authenticated the session
    /// (`[limits] require_auth`).
    #[serde(default)]
    pub(crate) before_auth: bool,
    /// Largest payload in bytes; 0 = only `max_message_size`.
    #[serde(default)]
    pub(crate) max_payload: i64,
    /// Messages of this class per second per session; 0 = unlimited.
    #[serde(default)]
    pub(crate) rate: i64,
    /// Burst above the rate; 0 = the rate.
    #[serde(default)]
    pub(crate) burst: i64,
    /// "drop" (count it, keep the session) or "close" (reason 4).
    #[serde(default)]
    pub(crate) on_violation: Option<String>,
}

/// One msg_id or a "first-last" range.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawMsgIds {
    One(i64),
    Range(String),
}

/// `[drain]`: what clients see when the gateway drains.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawDrain {
    /// msg_id of the notice frame every client gets when the drain begins; 0 = none.
    pub(crate) notice_msg_id: i64,
    /// Its payload (UTF-8 text), e.g. a "reconnect elsewhere" message.
    pub(crate) notice_payload: String,
    /// Close sessions in paced, jittered batches spread over `drain_timeout`
    /// instead of all at its end.
    pub(crate) paced: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAdmin {
    /// Path of the file holding the admin bearer token; empty = no token.
    pub(crate) token_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawWebSocket {
    pub(crate) enabled: bool,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) subprotocols: Vec<String>,
    pub(crate) max_message_size: i64,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawServer {
    pub(crate) listen: String,
    pub(crate) admin_listen: String,
    pub(crate) node_id: i64,
    pub(crate) workers: i64,
    pub(crate) cpus: Vec<i64>,
    pub(crate) io_driver: String,
    pub(crate) drain_timeout: String,
    pub(crate) proxy_protocol: bool,
    pub(crate) proxy_trusted: Vec<String>,
    pub(crate) upgrade_socket: String,
    pub(crate) upgrade_peer_exe: String,
    pub(crate) after_handover: String,
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
            upgrade_socket: String::new(),
            upgrade_peer_exe: String::new(),
            after_handover: "exit".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawLimits {
    pub(crate) max_connections: i64,
    pub(crate) max_connections_per_ip: i64,
    pub(crate) connection_rate_per_ip: i64,
    pub(crate) max_message_size: i64,
    pub(crate) messages_per_second: i64,
    pub(crate) handshake_timeout: String,
    pub(crate) idle_timeout: String,
    pub(crate) max_queued_bytes_per_session: i64,
    pub(crate) overload_queued_bytes: i64,
    pub(crate) client_send_buffer: i64,
    pub(crate) messages_burst: i64,
    pub(crate) on_rate_limit: String,
    pub(crate) require_auth: bool,
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
            overload_queued_bytes: 0,
            client_send_buffer: DEFAULT_CLIENT_SEND_BUFFER_BYTES as i64,
            messages_burst: 0,
            on_rate_limit: "drop".into(),
            require_auth: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawBackend {
    pub(crate) connections_per_endpoint: i64,
    pub(crate) dial_timeout: String,
    pub(crate) resolve_interval: String,
    pub(crate) max_frame_size: i64,
    pub(crate) reconnect_backoff_min: String,
    pub(crate) reconnect_backoff_max: String,
    pub(crate) max_queued_bytes: i64,
    pub(crate) circuit_failure_threshold: i64,
    pub(crate) circuit_open_duration: String,
    pub(crate) keepalive_interval: String,
    pub(crate) keepalive_timeout: String,
    pub(crate) seed_pool_max: i64,
    pub(crate) seed_idle_timeout: String,
    pub(crate) seed_reuse: bool,
    pub(crate) hold_timeout: String,
    pub(crate) hold_max_bytes_per_session: i64,
    pub(crate) hold_max_bytes_per_worker: i64,
}

impl Default for RawBackend {
    fn default() -> Self {
        RawBackend {
            connections_per_endpoint: DEFAULT_CONNECTIONS_PER_ENDPOINT as i64,
            dial_timeout: DEFAULT_DIAL_TIMEOUT.into(),
            resolve_interval: DEFAULT_RESOLVE_INTERVAL.into(),
            max_frame_size: DEFAULT_BACKEND_MAX_FRAME_SIZE_BYTES as i64,
            reconnect_backoff_min: DEFAULT_RECONNECT_BACKOFF_MIN.into(),
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX.into(),
            max_queued_bytes: DEFAULT_BACKEND_MAX_QUEUED_BYTES as i64,
            circuit_failure_threshold: DEFAULT_CIRCUIT_FAILURE_THRESHOLD as i64,
            circuit_open_duration: DEFAULT_CIRCUIT_OPEN_DURATION.into(),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL.into(),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT.into(),
            seed_pool_max: DEFAULT_SEED_POOL_MAX as i64,
            seed_idle_timeout: DEFAULT_SEED_IDLE_TIMEOUT.into(),
            seed_reuse: false,
            hold_timeout: DEFAULT_HOLD_TIMEOUT.into(),
            hold_max_bytes_per_session: DEFAULT_HOLD_MAX_BYTES_PER_SESSION as i64,
            hold_max_bytes_per_worker: DEFAULT_HOLD_MAX_BYTES_PER_WORKER as i64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawRedis {
    pub(crate) url: String,
    pub(crate) key_prefix: String,
    pub(crate) refresh_interval: String,
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

/// `[consul]`: service discovery with blocking queries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawConsul {
    /// `http://host:port` of the agent; "" = `NODE_IP`:8500, else 127.0.0.1:8500.
    pub(crate) address: String,
    /// Server type (as a TOML key) -> Consul service name.
    pub(crate) services: std::collections::BTreeMap<String, String>,
    /// Only instances whose `namespace` (else `pod_namespace`) meta equals
    /// this; "" = every instance.
    pub(crate) namespace: String,
    pub(crate) datacenter: String,
    pub(crate) token: String,
    pub(crate) wait: String,
}

impl Default for RawConsul {
    fn default() -> Self {
        RawConsul {
            address: String::new(),
            services: Default::default(),
            namespace: String::new(),
            datacenter: String::new(),
            token: String::new(),
            wait: DEFAULT_CONSUL_WAIT.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawLog {
    pub(crate) level: String,
    pub(crate) format: String,
    pub(crate) access_log: bool,
    pub(crate) access_log_path: String,
    pub(crate) service_name: String,
    pub(crate) service_namespace: String,
}

/// `service.name` of `otel` log lines when neither `OTEL_SERVICE_NAME` nor
/// `[log] service_name` gives one (the Go gateway's fixed name).
pub(crate) const DEFAULT_SERVICE_NAME: &str = "game-gateway";

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "json".into(),
            access_log: true,
            access_log_path: String::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            service_namespace: String::new(),
        }
    }
}
