//! The Redis route source (control side only; never on a worker core).
//!
//! Keys are the original gateway's, under `key_prefix`:
//! - `{prefix}routing:rules` (string, JSON; see [`super::routes`]),
//! - `{prefix}realm:mapping` (hash, realm id -> `host:port`),
//! - pub/sub `{prefix}routing:rules:notify` and `{prefix}realm:mapping:notify`:
//!   any message triggers an immediate reload.
//!
//! [`RedisSource::fetch`] reads both keys on a kept connection (reconnecting
//! when it broke); the subscriber thread ([`spawn_subscriber`]) turns notify
//! messages into control events, and after every (re)subscribe asks for a
//! reload too, so a notification missed while disconnected heals at once.

use super::routes::{parse_redis, RouteSet};
use crate::config::RedisConfig;
use crate::routing::{Resolution, Resolve};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connect, read and write timeout for every Redis operation.
pub(crate) const REDIS_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the subscriber blocks per read before checking its stop flag.
const SUBSCRIBER_POLL: Duration = Duration::from_millis(500);
/// Reconnect backoff bounds for the subscriber.
const SUB_BACKOFF_MIN: Duration = Duration::from_millis(100);
const SUB_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The four key names for a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub rules: String,
    pub realms: String,
    pub rules_notify: String,
    pub realms_notify: String,
    /// Realm-wide announcements (JSON, see `state::parse_announcement`).
    pub broadcast: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            rules: format!("{prefix}routing:rules"),
            realms: format!("{prefix}realm:mapping"),
            rules_notify: format!("{prefix}routing:rules:notify"),
            realms_notify: format!("{prefix}realm:mapping:notify"),
            broadcast: format!("{prefix}broadcast"),
        }
    }
}

/// Why a read of the route keys gave no new routes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// Connecting or reading failed: keep the last good routes, retry.
    #[error("redis unavailable: {0}")]
    Unavailable(redis::RedisError),
    /// Redis answered with data that does not validate (every reason).
    #[error("redis route data rejected: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Redis problems outside the control loop's reads: a bad URL, the
/// subscriber thread, and the `routes push` / `routes show` tools.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis.url {url:?}: {source}")]
    Url { url: String, source: redis::RedisError },
    #[error("{url}: {source}")]
    Command { url: String, source: redis::RedisError },
    #[error("cannot start the redis subscriber thread: {0}")]
    Thread(std::io::Error),
}

pub(crate) struct RedisSource {
    client: redis::Client,
    keys: Keys,
    conn: Option<redis::Connection>,
}

fn open(url: &str) -> Result<redis::Client, RedisError> {
    redis::Client::open(url).map_err(|source| RedisError::Url { url: url.into(), source })
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(REDIS_IO_TIMEOUT)?;
    c.set_read_timeout(Some(REDIS_IO_TIMEOUT))?;
    c.set_write_timeout(Some(REDIS_IO_TIMEOUT))?;
    Ok(c)
}

/// What Redis holds: the rules text (if set) and the realm hash pairs.
pub type RawRoutes = (Option<String>, Vec<(String, String)>);

/// Reads the raw rules text and realm pairs.
pub(crate) fn read_raw(conn: &mut redis::Connection, keys: &Keys) -> redis::RedisResult<RawRoutes> {
    let rules: Option<String> = redis::cmd("GET").arg(&keys.rules).query(conn)?;
    let realms: Vec<(String, String)> = redis::cmd("HGETALL").arg(&keys.realms).query(conn)?;
    Ok((rules, realms))
}

/// Validates what Redis holds into a route set (host names go to `resolver`).
pub fn validate_raw(
    rules: Option<&str>,
    realms: &[(String, String)],
    resolver: &mut dyn Resolve,
    resolution: Resolution,
) -> Result<RouteSet, Vec<String>> {
    parse_redis(rules, realms, resolver, resolution)
}

impl RedisSource {
    pub(crate) fn new(cfg: &RedisConfig) -> Result<RedisSource, RedisError> {
        let client = open(&cfg.url)?;
        Ok(RedisSource { client, keys: Keys::new(&cfg.key_prefix), conn: None })
    }

    /// Reads and validates both keys. A missing rules key is "no data":
    /// [`RedisRead::rules`] is `None` and the control loop keeps its last
    /// good Redis routes (an explicit empty document, `[]` or `{}`, clears
    /// them). A host name that does not resolve is a warning (the name waits
    /// in [`RouteSet::pending`]), not a rejection.
    pub(crate) fn fetch(&mut self, resolver: &mut dyn Resolve) -> Result<RedisRead, FetchError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.client).map_err(FetchError::Unavailable)?);
        }
        let conn = self.conn.as_mut().unwrap();
        let (rules, realms) = match read_raw(conn, &self.keys) {
            Ok(x) => x,
            Err(e) => {
                self.conn = None;
                return Err(FetchError::Unavailable(e));
            }
        };
        let set =
            validate_raw(rules.as_deref(), &realms, resolver, Resolution::Deferred).map_err(FetchError::Invalid)?;
        let has_rules = rules.is_some();
        Ok(RedisRead {
            rules: has_rules.then_some(set.rules),
            realms: set.realms,
            pending: set.pending,
            warnings: set.warnings,
        })
    }

    /// The rules key's name, for logs.
    pub(crate) fn rules_key(&self) -> &str {
        &self.keys.rules
    }
}

/// One good read of the route keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisRead {
    /// The rules document; `None` when the key does not exist (Redis
    /// restarted empty, flushed, or never written).
    pub(crate) rules: Option<Vec<crate::routing::RouteRule>>,
    /// The realm mapping (empty when the hash does not exist: Redis has no
    /// empty hashes).
    pub(crate) realms: Vec<(u16, crate::routing::Endpoint)>,
    /// Names that did not resolve yet (see [`RouteSet::pending`]).
    pub(crate) pending: Vec<super::routes::Pending>,
    /// Problems that did not reject the data.
    pub(crate) warnings: Vec<String>,
}

/// Runs the notify subscriber until `stop`; every message (and every
/// successful subscribe) sends `event()` to the control loop, unless one is
/// still `pending` there (the loop clears the flag as it takes the event);
/// every `{prefix}broadcast` message goes to `announce`.
pub(crate) fn spawn_subscriber<E: Send + 'static>(
    cfg: &RedisConfig,
    tx: Sender<E>,
    event: impl Fn() -> E + Send + 'static,
    announce: impl Fn(Vec<u8>) + Send + 'static,
    pending: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, RedisError> {
    let client = open(&cfg.url)?;
    let keys = Keys::new(&cfg.key_prefix);
    let thread = std::thread::Builder::new().name("gw-redis-sub".into());
    thread.spawn(move || {
        let mut backoff = SUB_BACKOFF_MIN;
        while !stop.load(Ordering::Relaxed) {
            let mut conn = match connect(&client) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, retry_ms = backoff.as_millis() as u64, "redis subscriber cannot connect");
                    sleep_unless_stopped(backoff, &stop);
                    backoff = (backoff * 2).min(SUB_BACKOFF_MAX);
                    continue;
                }
            };
            let mut ps = conn.as_pubsub();
            if ps.subscribe(&[&keys.rules_notify, &keys.realms_notify, &keys.broadcast]).is_err()
                || ps.set_read_timeout(Some(SUBSCRIBER_POLL)).is_err()
            {
                sleep_unless_stopped(backoff, &stop);
                backoff = (backoff * 2).min(SUB_BACKOFF_MAX);
                continue;
            }
            backoff = SUB_BACKOFF_MIN;
            tracing::debug!("redis subscriber listening for notifications");
            if !pending.swap(true, Ordering::AcqRel) && tx.send(event()).is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                match ps.get_message() {
                    Ok(msg) if msg.get_channel_name() == keys.broadcast => {
                        announce(msg.get_payload_bytes().to_vec());
                    }
                    Ok(msg) => {
                        tracing::debug!(channel = msg.get_channel_name(), "route notification");
                        // At most one notification waits in the control
                        // loop's channel (it reads everything anyway): a
                        // storm of them is one event, not a backlog.
                        if !pending.swap(true, Ordering::AcqRel) && tx.send(event()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "redis subscriber connection lost");
                        break;
                    }
                }
            }
        }
    })
    .map_err(RedisError::Thread)
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(std::time::Instant::now())));
    }
}

/// Writes a route set to Redis and publishes both notifications (the
/// `routes push` tool).
pub fn push(url: &str, prefix: &str, rules_json: &str, realms: &[(u16, String)]) -> Result<(), RedisError> {
    let command = |source| RedisError::Command { url: url.into(), source };
    let client = redis::Client::open(url).map_err(command)?;
    let mut conn = connect(&client).map_err(command)?;
    let keys = Keys::new(prefix);
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("SET").arg(&keys.rules).arg(rules_json).ignore();
    if !realms.is_empty() {
        pipe.cmd("DEL").arg(&keys.realms).ignore();
        for (r, ep) in realms {
            pipe.cmd("HSET").arg(&keys.realms).arg(r.to_string()).arg(ep).ignore();
        }
    }
    pipe.cmd("PUBLISH").arg(&keys.rules_notify).arg("push").ignore();
    pipe.cmd("PUBLISH").arg(&keys.realms_notify).arg("push").ignore();
    pipe.query::<()>(&mut conn).map_err(command)
}

/// Reads what Redis holds (the `routes show` tool).
pub fn show(url: &str, prefix: &str) -> Result<RawRoutes, RedisError> {
    let command = |source| RedisError::Command { url: url.into(), source };
    let client = redis::Client::open(url).map_err(command)?;
    let mut conn = connect(&client).map_err(command)?;
    read_raw(&mut conn, &Keys::new(prefix)).map_err(command)
}
