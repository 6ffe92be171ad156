//! State the control loop and the admin server share, wired by `main`.
//!
//! [`ControlStats`] holds the control side's counters and facts (readiness,
//! route version and source, Redis state, config reloads); the control loop
//! writes them, the admin endpoints (`/ready`, `/status`, `/metrics`) read
//! them. [`ControlEvent`] is what reaches the control loop, including the
//! admin's `POST /drain`. Arrows one way: `control` and `admin` import this
//! module, it imports neither.

use crate::config::AdminToken;
use crate::gateway::FdBudget;
use crate::routing::RouteTable;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Whether the routes' Redis source (or Consul) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisState {
    /// No `[redis]` section.
    #[default]
    Off,
    /// The last read got an answer (valid data or not).
    Up,
    /// Unreachable (or not read yet): the last good routes stay.
    Down,
}

impl RedisState {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Off => "off",
            RedisState::Up => "up",
            RedisState::Down => "down",
        }
    }

    fn from_u8(v: u8) -> RedisState {
        match v {
            1 => RedisState::Up,
            2 => RedisState::Down,
            _ => RedisState::Off,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            RedisState::Off => 0,
            RedisState::Up => 1,
            RedisState::Down => 2,
        }
    }
}

impl fmt::Display for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`RedisState`] readable from any thread without a lock.
#[derive(Debug, Default)]
pub struct AtomicRedisState(AtomicU8);

impl AtomicRedisState {
    pub fn load(&self) -> RedisState {
        RedisState::from_u8(self.0.load(Ordering::Relaxed))
    }

    pub fn store(&self, s: RedisState) {
        self.0.store(s.to_u8(), Ordering::Relaxed)
    }
}

/// Where the published routes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteSource {
    /// The config file's `[[routes]]` only.
    #[default]
    Static,
    /// The config file's rules overlaid with the last good Redis data.
    StaticAndRedis,
    /// The config file's rules, endpoints from Consul.
    StaticAndConsul,
    /// The config file's rules overlaid with Redis, endpoints from Consul.
    StaticRedisAndConsul,
}

impl RouteSource {
    /// The source given which of Redis and Consul contributed.
    pub fn of(redis: bool, consul: bool) -> RouteSource {
        match (redis, consul) {
            (false, false) => RouteSource::Static,
            (true, false) => RouteSource::StaticAndRedis,
            (false, true) => RouteSource::StaticAndConsul,
            (true, true) => RouteSource::StaticRedisAndConsul,
        }
    }
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteSource::Static => "static",
            RouteSource::StaticAndRedis => "static+redis",
            RouteSource::StaticAndConsul => "static+consul",
            RouteSource::StaticRedisAndConsul => "static+redis+consul",
        })
    }
}

/// Control-side counters and facts for `/ready`, `/metrics` and `/status`
/// (written by the control thread only; the data path never touches these).
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Routes loaded and not draining: what `/ready` answers.
    pub ready: AtomicBool,
    /// Redis `{prefix}broadcast` messages refused (not an announcement).
    pub announcements_refused: AtomicU64,
    /// Good reads from Redis.
    pub refresh_success: AtomicU64,
    /// Failed or rejected reads from Redis (every kind, the empty ones too).
    pub refresh_errors: AtomicU64,
    /// Reads that found no rules key in Redis (restarted empty, flushed)
    /// while the last good Redis routes were kept.
    pub refresh_empty: AtomicU64,
    /// Route data from Redis rejected by validation.
    pub snapshots_rejected: AtomicU64,
    /// Version of the last published route snapshot.
    pub route_version: AtomicU64,
    pub redis_state: AtomicRedisState,
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
    /// Unix seconds of the last successful config load.
    pub config_loaded_at: AtomicU64,
    pub route_source: Mutex<RouteSource>,
    /// The last config or Redis problem, for `/status`; cleared by the next
    /// success of the same source.
    pub last_error: Mutex<LastError>,
    /// The descriptor budget and the effective `max_connections` (set at
    /// start, updated on config reload).
    pub fd_budget: Mutex<Option<FdBudget>>,
    /// From the start of a drain until the process exits.
    pub draining: AtomicBool,
    /// A live upgrade handed everything to a new process: `/health` says so
    /// (200) and the admin listener closes after its next connection, so
    /// probes on the shared port reach the new process.
    pub handed_over: AtomicBool,
    /// The bearer token state-changing admin calls need (`[admin]
    /// token_file`, re-read on every config reload); `None` = no check.
    pub admin_token: Mutex<Option<AdminToken>>,
    /// Label values of the published routes, exported at zero by `/metrics`.
    pub route_labels: Mutex<RouteLabels>,
    /// The configured message class names (`[[message_policy]]`): exported
    /// at zero from the start.
    pub policy_classes: Mutex<Vec<Arc<str>>>,
    /// The loaded TLS certificates: (name, NotAfter in Unix seconds).
    pub tls_certificates: Mutex<Vec<(String, i64)>>,
    /// Consul discovery: `Off` without `[consul]`, `Up` while the last query
    /// of every watched service answered, `Down` when one did not (its last
    /// good answer stays in force).
    pub consul_state: AtomicRedisState,
    /// Consul answers received (one per blocking query that returned).
    pub consul_answers: AtomicU64,
    /// Consul queries that failed (unreachable, timeout, HTTP error, bad body).
    pub consul_errors: AtomicU64,
    /// Warnings about route data that was still loaded (an unknown rule
    /// field, a host name that does not resolve), each distinct one counted
    /// once when first seen.
    pub route_warnings: AtomicU64,
    /// Endpoint addresses changed by a new lookup of their host name (each
    /// applied as a route change).
    pub address_changes: AtomicU64,
    /// Details for `/status` (`discovery`).
    pub discovery: Mutex<DiscoveryStatus>,
}

/// One watched Consul service, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ServiceStatus {
    /// `up` when its last query answered, else `down`.
    pub state: &'static str,
    /// `X-Consul-Index` of the answer in force.
    pub index: u64,
    /// World id -> endpoints of the answer in force.
    pub worlds: BTreeMap<u16, Vec<String>>,
    /// Instances of that answer passed over (namespace, `world_id` meta).
    pub skipped: usize,
    /// Why its last query failed ("" after an answer).
    pub last_error: String,
}

/// What `/status` shows under `discovery` besides the counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiscoveryStatus {
    /// The agent asked (`host:port`); `None` without `[consul]`.
    pub consul_address: Option<String>,
    /// Per watched service.
    pub services: BTreeMap<String, ServiceStatus>,
    /// Endpoint names waiting to resolve (left out of their rules).
    pub unresolved: Vec<String>,
}

impl ControlStats {
    /// The `discovery` object of `/status`: Consul state and counters, the
    /// route-data warning and address-change counters, names not resolved.
    pub fn discovery_json(&self) -> serde_json::Value {
        let d = self.discovery.lock().unwrap().clone();
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "consul": self.consul_state.load().as_str(),
            "consul_address": d.consul_address,
            "consul_answers": ld(&self.consul_answers),
            "consul_errors": ld(&self.consul_errors),
            "services": d.services,
            "route_warnings": ld(&self.route_warnings),
            "address_changes": ld(&self.address_changes),
            "unresolved": d.unresolved,
        })
    }
}

/// One Consul watcher's answer for its service: the passing instances,
/// filtered by namespace and grouped by their `world_id` meta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryAnswer {
    /// `X-Consul-Index` of the answer.
    pub index: u64,
    /// World id -> endpoint names (`host:port`), sorted, without duplicates.
    pub worlds: BTreeMap<u16, Vec<String>>,
    /// Instances passed over, each with why.
    pub skipped: Vec<String>,
}

/// Where a [`LastError`] came from: a success of the same source clears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorSource {
    /// A config reload was rejected.
    #[default]
    Config,
    /// A Redis read failed, was rejected, or found no route data.
    Redis,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Config => "config",
            ErrorSource::Redis => "redis",
        }
    }
}

/// The last config or Redis problem, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastError {
    /// Empty when there was none, or once it was cleared.
    pub message: String,
    pub source: ErrorSource,
    /// Unix seconds of the last error (0: none since the start).
    pub at_unix: u64,
    /// Unix seconds when a later success cleared it (0: not cleared).
    pub cleared_at_unix: u64,
}

impl ControlStats {
    /// Records a problem for `/status`.
    pub fn set_error(&self, source: ErrorSource, message: String, now_unix: u64) {
        *self.last_error.lock().unwrap() = LastError { message, source, at_unix: now_unix, cleared_at_unix: 0 };
    }

    /// A success of `source`: clears the last error when it came from there
    /// (an error of the other source stays). True when it cleared one.
    pub fn clear_error(&self, source: ErrorSource, now_unix: u64) -> bool {
        let mut e = self.last_error.lock().unwrap();
        if e.source == source && !e.message.is_empty() {
            e.message.clear();
            e.cleared_at_unix = now_unix;
            return true;
        }
        false
    }
}

/// Label values a route snapshot makes known in advance: its endpoints (the
/// `backend` label, spelled as in the rules) and its server types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteLabels {
    /// Every endpoint of every rule and of the realm mapping, sorted, once each.
    pub endpoints: Vec<Arc<str>>,
    /// Every rule's server type, sorted, once each.
    pub server_types: Vec<u8>,
}

impl RouteLabels {
    pub fn of(table: &RouteTable) -> RouteLabels {
        let mut endpoints: Vec<Arc<str>> = table
            .rules()
            .flat_map(|r| r.endpoints.iter().map(|e| e.name.clone()))
            .chain(table.realms().map(|(_, e)| e.name.clone()))
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let mut server_types: Vec<u8> = table.rules().map(|r| r.server_type).collect();
        server_types.sort_unstable();
        server_types.dedup();
        RouteLabels { endpoints, server_types }
    }
}

/// What reaches the control loop.
#[derive(Debug)]
pub enum ControlEvent {
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    /// A message on a Redis notify channel (or a fresh subscription),
    /// received `at` (by the subscriber thread: the start of the route
    /// change's propagation, `game_gateway_route_propagation_seconds`).
    RedisNotify { at: std::time::Instant },
    /// The admin's `POST /drain` (same as SIGTERM).
    Drain,
    /// A Consul watcher's answer for `service`, or why its query failed.
    Discovery { service: String, result: Result<DiscoveryAnswer, String> },
    /// Endpoint host names looked up again (the resolver thread): every
    /// address of each, or why it did not resolve.
    Resolved(Lookups),
    /// A live upgrade handed everything to a new process: exit.
    HandedOver,
}

/// Name lookups of endpoint host names: every address of each, or why it did
/// not resolve.
pub type Lookups = Vec<(Arc<str>, Result<Vec<SocketAddr>, String>)>;

/// The sending side of the control loop's channel.
pub type ControlSender = crossbeam_channel::Sender<ControlEvent>;

/// A realm-wide announcement from an operator: JSON
/// `{"msg_id": 900, "payload": "text", "world": 3, "server_type": 10, "tag": "vip"}`
/// (`msg_id` and `payload` required; at most one of the filters). Used by
/// the admin `POST /broadcast` and the Redis `{prefix}broadcast` channel.
pub fn parse_announcement(json: &[u8]) -> Result<crate::shard::Announcement, String> {
    use crate::shard::{AnnounceTarget, Announcement};
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let msg_id = v["msg_id"].as_u64().filter(|n| *n <= 65535).ok_or("msg_id: a number 0..=65535 is required")?;
    let payload = v["payload"].as_str().ok_or("payload: a string is required")?;
    if payload.len() > 65535 {
        return Err("payload: at most 65535 bytes".into());
    }
    let target = match (&v["world"], &v["server_type"], &v["tag"]) {
        (serde_json::Value::Null, serde_json::Value::Null, serde_json::Value::Null) => AnnounceTarget::All,
        (w, serde_json::Value::Null, serde_json::Value::Null) => {
            AnnounceTarget::World(w.as_u64().filter(|n| *n <= 32767).ok_or("world: 0..=32767")? as u16)
        }
        (serde_json::Value::Null, t, serde_json::Value::Null) => {
            AnnounceTarget::ServerType(t.as_u64().filter(|n| *n <= 255).ok_or("server_type: 0..=255")? as u8)
        }
        (serde_json::Value::Null, serde_json::Value::Null, t) => {
            AnnounceTarget::Tag(t.as_str().ok_or("tag: a string")?.as_bytes().into())
        }
        _ => return Err("at most one of world, server_type, tag".into()),
    };
    Ok(Announcement { msg_id: msg_id as u16, payload: bytes::Bytes::copy_from_slice(payload.as_bytes()), target })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_state_round_trips_through_the_atomic() {
        let a = AtomicRedisState::default();
        assert_eq!(a.load(), RedisState::Off);
        for s in [RedisState::Up, RedisState::Down, RedisState::Off] {
            a.store(s);
            assert_eq!(a.load(), s);
        }
        assert_eq!(RedisState::Down.to_string(), "down");
        assert_eq!(RouteSource::StaticAndRedis.to_string(), "static+redis");
        assert_eq!(RouteSource::of(true, true).to_string(), "static+redis+consul");
        assert_eq!(RouteSource::of(false, true).to_string(), "static+consul");
    }

    #[test]
    fn discovery_status_for_the_admin() {
        let s = ControlStats::default();
        let v = s.discovery_json();
        assert_eq!((v["consul"].as_str(), v["consul_errors"].as_u64()), (Some("off"), Some(0)));
        s.consul_state.store(RedisState::Down);
        s.consul_errors.fetch_add(2, Ordering::Relaxed);
        s.discovery.lock().unwrap().services.insert(
            "game".into(),
            ServiceStatus {
                state: "down",
                index: 7,
                worlds: [(1, vec!["10.0.0.1:7000".into()])].into(),
                ..Default::default()
            },
        );
        let v = s.discovery_json();
        assert_eq!((v["consul"].as_str(), v["consul_errors"].as_u64()), (Some("down"), Some(2)));
        assert_eq!(v["services"]["game"]["worlds"]["1"][0], "10.0.0.1:7000");
    }

    #[test]
    fn a_success_clears_only_its_own_sources_error() {
        let s = ControlStats::default();
        assert!(!s.clear_error(ErrorSource::Redis, 5));
        s.set_error(ErrorSource::Redis, "redis down".into(), 10);
        assert!(!s.clear_error(ErrorSource::Config, 11), "a config reload does not clear a redis error");
        assert_eq!(s.last_error.lock().unwrap().message, "redis down");
        assert!(s.clear_error(ErrorSource::Redis, 12));
        let e = s.last_error.lock().unwrap().clone();
        assert_eq!((e.message.as_str(), e.at_unix, e.cleared_at_unix), ("", 10, 12));
        assert!(!s.clear_error(ErrorSource::Redis, 13), "already cleared: the time stays");
        assert_eq!(s.last_error.lock().unwrap().cleared_at_unix, 12);
    }
}
