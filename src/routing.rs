//! Routing: rules, the immutable [`RouteTable`] snapshot, and the strategies.
//!
//! Pure: no I/O except name resolution at validation time. The control side
//! validates [`RawRule`]s (from TOML or, later, Redis JSON) into
//! [`RouteRule`]s and freezes them into a versioned `RouteTable`; a worker
//! holds an `Arc<RouteTable>` and calls [`RouteTable::lookup`] then
//! [`RouteTable::pick`] when a session first sends a frame for a server type.
//! The worker keeps the per-rule round-robin cursors, so the table itself is
//! shared read-only between cores.

use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// A rule as written in config or Redis, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub server_type: i64,
    #[serde(default)]
    pub world_id: i64,
    #[serde(default)]
    pub service_name: String,
    pub strategy: String,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub hash_key: Option<String>,
    #[serde(default)]
    pub notify_sessions: Option<bool>,
    #[serde(default)]
    pub trace_propagation: Option<bool>,
    #[serde(default)]
    pub on_backend_loss: Option<String>,
    /// `gate` (default), `seed_tcp` or `grpc`: what the rule's backends speak.
    #[serde(default)]
    pub backend_protocol: Option<String>,
    /// `frame` (default) or `connection`: whether each frame is routed by its
    /// own server id, or the whole client connection follows its first frame.
    #[serde(default)]
    pub binding: Option<String>,
}

impl RawRule {
    /// Every field a rule may carry, as spelled in TOML and JSON. Route JSON
    /// (Redis, rule files) warns about and drops any other key; the TOML
    /// config refuses it (`deny_unknown_fields`).
    pub const FIELDS: [&'static str; 11] = [
        "server_type",
        "world_id",
        "service_name",
        "strategy",
        "endpoints",
        "hash_key",
        "notify_sessions",
        "trace_propagation",
        "on_backend_loss",
        "backend_protocol",
        "binding",
    ];

    /// A rule with the given key, strategy and endpoints, every other field
    /// at its default.
    pub fn new(server_type: i64, world_id: i64, strategy: &str, endpoints: &[String]) -> RawRule {
        RawRule {
            server_type,
            world_id,
            service_name: String::new(),
            strategy: strategy.into(),
            endpoints: endpoints.to_vec(),
            hash_key: None,
            notify_sessions: None,
            trace_propagation: None,
            on_backend_loss: None,
            backend_protocol: None,
            binding: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    RoundRobin,
    ConsistentHash,
    RealmBased,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::RealmBased => "realm_based",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// (`world_id`, `inst_id`) of the binding frame: one game instance, one backend.
    InstId,
    Session,
    ClientIp,
}

impl HashKey {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            HashKey::InstId => "inst_id",
            HashKey::Session => "session",
            HashKey::ClientIp => "client_ip",
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to sessions bound to a backend connection that is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnBackendLoss {
    Close,
    Rebind,
    /// Keep the session, buffer its frames (bounded) and replay them, after
    /// a `CONNECT` marked as a resume, when the backend is back.
    Hold,
}

impl OnBackendLoss {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnBackendLoss::Close => "close",
            OnBackendLoss::Rebind => "rebind",
            OnBackendLoss::Hold => "hold",
        }
    }
}

impl fmt::Display for OnBackendLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a rule's backends speak (see docs/BACKENDS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendProtocol {
    /// Ours: multiplexed streams, CONNECT / DISCONNECT / KICK / MULTICAST /
    /// BROADCAST / PING (docs/PROTOCOL.md).
    Gate,
    /// The Go gateway's TCP mode: one backend connection per client session,
    /// opcode 1 only, pooled for reuse after the session.
    SeedTcp,
    /// The Go gateway's gRPC mode: `gateway.GameGatewayService/StreamPackets`,
    /// one bidirectional stream per endpoint per worker.
    Grpc,
}

impl BackendProtocol {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendProtocol::Gate => "gate",
            BackendProtocol::SeedTcp => "seed_tcp",
            BackendProtocol::Grpc => "grpc",
        }
    }
}

impl fmt::Display for BackendProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a client connection's frames follow a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindingMode {
    /// Every frame is routed by its own server id (one binding per server type).
    Frame,
    /// The first frame's rule picks a backend, and every later frame of the
    /// connection goes there whatever its server id (the Go gateway's way).
    Connection,
}

impl BindingMode {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingMode::Frame => "frame",
            BindingMode::Connection => "connection",
        }
    }
}

impl fmt::Display for BindingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backend address; `name` is how it was written (used for hashing, so
/// every node agrees on placement whatever the name resolves to).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub name: Arc<str>,
    /// xxh3 of `name`, precomputed for rendezvous hashing.
    pub hash: u64,
}

/// Resolves a host name and port to its addresses (the system resolver, or
/// the control side's cache that keeps an address stable across lookups).
pub trait Resolve {
    /// One address for `host:port`; `Err` is the reason it does not resolve.
    fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, String>;
}

/// `getaddrinfo`, first address returned.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, String> {
        (host, port).to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or_else(|| "no address".to_string())
    }
}

/// Whether a host name that does not resolve is an error or a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The config file and `routes check --resolve`: every name must resolve.
    Required,
    /// Route data read at run time (Redis, Consul) and `routes check`: a
    /// name that does not resolve is left out of its rule, reported, and
    /// tried again until it resolves.
    Deferred,
}

/// Why an endpoint string gave no endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// Not `host:port`, or port 0: wrong whatever DNS says.
    Invalid(String),
    /// Well-formed, but the host name does not resolve (now).
    Unresolved(String),
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointError::Invalid(r) | EndpointError::Unresolved(r) => f.write_str(r),
        }
    }
}

impl Endpoint {
    /// Parses `host:port`, resolving a host name with the system resolver.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        Endpoint::parse_with(s, &mut SystemResolver).map_err(|e| e.to_string())
    }

    /// Parses `host:port`; a host name goes to `resolver`.
    pub fn parse_with(s: &str, resolver: &mut dyn Resolve) -> Result<Endpoint, EndpointError> {
        let addr = match Endpoint::literal(s)? {
            Some(a) => a,
            None => {
                let (host, port) = s.rsplit_once(':').expect("checked by literal");
                let port: u16 = port.parse().expect("checked by literal");
                resolver
                    .resolve(host, port)
                    .map_err(|e| EndpointError::Unresolved(format!("{s:?} does not resolve: {e}")))?
            }
        };
        Ok(Endpoint::with_addr(s, addr))
    }

    /// Checks the syntax of `host:port` without resolving: the address for an
    /// IP literal, `None` for a well-formed host name.
    pub fn literal(s: &str) -> Result<Option<SocketAddr>, EndpointError> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(EndpointError::Invalid(format!("{s:?} has port 0")));
            }
            return Ok(Some(a));
        }
        let (host, port) =
            s.rsplit_once(':').ok_or_else(|| EndpointError::Invalid(format!("{s:?} is not host:port")))?;
        match port.parse::<u16>() {
            _ if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') => {
                Err(EndpointError::Invalid(format!("{s:?} is not host:port with a port 1..=65535")))
            }
            Ok(0) => Err(EndpointError::Invalid(format!("{s:?} has port 0"))),
            Ok(_) => Ok(None),
            Err(_) => Err(EndpointError::Invalid(format!("{s:?} is not host:port with a port 1..=65535"))),
        }
    }

    /// An endpoint named `name` (as written) at `addr`.
    pub fn with_addr(name: &str, addr: SocketAddr) -> Endpoint {
        Endpoint { addr, name: Arc::from(name), hash: xxhash_rust::xxh3::xxh3_64(name.as_bytes()) }
    }

    /// Whether the name is an IP literal (nothing to resolve).
    pub fn is_literal(&self) -> bool {
        self.name.parse::<SocketAddr>().is_ok()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A validated rule. Equality and hashing cover every field, so a changed
/// rule is a changed route set (see `control::routes::fingerprint`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteRule {
    pub server_type: u8,
    /// 0 = any world.
    pub world_id: u16,
    pub service_name: Arc<str>,
    pub strategy: Strategy,
    pub endpoints: Vec<Endpoint>,
    pub hash_key: HashKey,
    pub notify_sessions: bool,
    pub trace_propagation: bool,
    pub on_backend_loss: OnBackendLoss,
    pub backend_protocol: BackendProtocol,
    pub binding: BindingMode,
}

impl RouteRule {
    pub fn key(&self) -> (u8, u16) {
        (self.server_type, self.world_id)
    }
}

impl fmt::Display for RouteRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type={} world={} service={} strategy={} endpoints=[",
            self.server_type,
            if self.world_id == 0 { "*".to_string() } else { self.world_id.to_string() },
            self.service_name,
            self.strategy
        )?;
        for (i, e) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        write!(
            f,
            "] hash_key={} notify={} trace={} on_backend_loss={} backend_protocol={} binding={}",
            self.hash_key,
            self.notify_sessions,
            self.trace_propagation,
            self.on_backend_loss,
            self.backend_protocol,
            self.binding
        )
    }
}

/// A rule that validated, and the endpoint names left out of it because
/// they do not resolve yet ([`Resolution::Deferred`]), each with its reason.
#[derive(Debug, Clone)]
pub struct ValidRule {
    pub rule: RouteRule,
    pub unresolved: Vec<(Arc<str>, String)>,
}

impl RawRule {
    /// Checks every field, resolving host names with the system resolver;
    /// every name must resolve. Returns all problems as (field, reason).
    pub fn validate(&self) -> Result<RouteRule, Vec<(&'static str, String)>> {
        self.validate_with(&mut SystemResolver, Resolution::Required).map(|v| v.rule)
    }

    /// Checks every field; host names go to `resolver`. With
    /// [`Resolution::Deferred`] a name that does not resolve is left out of
    /// the rule and returned in [`ValidRule::unresolved`] instead of failing.
    pub fn validate_with(
        &self,
        resolver: &mut dyn Resolve,
        resolution: Resolution,
    ) -> Result<ValidRule, Vec<(&'static str, String)>> {
        let mut errs = Vec::new();
        let mut unresolved: Vec<(Arc<str>, String)> = Vec::new();
        if !(0..=255).contains(&self.server_type) {
            errs.push(("server_type", format!("{} is out of range 0..=255", self.server_type)));
        }
        if !(0..=32767).contains(&self.world_id) {
            errs.push(("world_id", format!("{} is out of range 0..=32767", self.world_id)));
        }
        let strategy = match self.strategy.as_str() {
            "round_robin" => Strategy::RoundRobin,
            "consistent_hash" => Strategy::ConsistentHash,
            "realm_based" => Strategy::RealmBased,
            other => {
                errs.push((
                    "strategy",
                    format!("unknown strategy {other:?} (expected round_robin, consistent_hash or realm_based)"),
                ));
                Strategy::RoundRobin
            }
        };
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, e) in self.endpoints.iter().enumerate() {
            if self.endpoints[..i].contains(e) {
                errs.push(("endpoints", format!("{e:?} is listed twice")));
                continue;
            }
            match Endpoint::parse_with(e, resolver) {
                Ok(ep) => endpoints.push(ep),
                Err(EndpointError::Unresolved(r)) if resolution == Resolution::Deferred => {
                    unresolved.push((Arc::from(e.as_str()), r))
                }
                Err(r) => errs.push(("endpoints", r.to_string())),
            }
        }
        let hash_key = match self.hash_key.as_deref().unwrap_or("inst_id") {
            "inst_id" => HashKey::InstId,
            "session" => HashKey::Session,
            "client_ip" => HashKey::ClientIp,
            other => {
                errs.push(("hash_key", format!("{other:?} is not one of inst_id, session, client_ip")));
                HashKey::InstId
            }
        };
        let on_backend_loss = match self.on_backend_loss.as_deref().unwrap_or("close") {
            "close" => OnBackendLoss::Close,
            "rebind" => OnBackendLoss::Rebind,
            "hold" => OnBackendLoss::Hold,
            other => {
                errs.push(("on_backend_loss", format!("{other:?} is not one of close, rebind, hold")));
                OnBackendLoss::Close
            }
        };
        let backend_protocol = match self.backend_protocol.as_deref().unwrap_or("gate") {
            "gate" => BackendProtocol::Gate,
            "seed_tcp" => BackendProtocol::SeedTcp,
            "grpc" => BackendProtocol::Grpc,
            other => {
                errs.push(("backend_protocol", format!("{other:?} is not one of gate, seed_tcp, grpc")));
                BackendProtocol::Gate
            }
        };
        let binding = match self.binding.as_deref().unwrap_or("frame") {
            "frame" => BindingMode::Frame,
            "connection" => BindingMode::Connection,
            other => {
                errs.push(("binding", format!("{other:?} is not one of frame, connection")));
                BindingMode::Frame
            }
        };
        if backend_protocol == BackendProtocol::SeedTcp
            && matches!(self.on_backend_loss.as_deref(), Some("rebind" | "hold"))
        {
            errs.push((
                "on_backend_loss",
                "seed_tcp sessions end with their backend connection; rebind and hold are not possible".to_string(),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let service_name =
            if self.service_name.is_empty() { format!("type{}", self.server_type) } else { self.service_name.clone() };
        let rule = RouteRule {
            server_type: self.server_type as u8,
            world_id: self.world_id as u16,
            service_name: Arc::from(service_name),
            strategy,
            endpoints,
            hash_key,
            notify_sessions: self.notify_sessions.unwrap_or(true),
            trace_propagation: self.trace_propagation.unwrap_or(false),
            on_backend_loss,
            backend_protocol,
            binding,
        };
        Ok(ValidRule { rule, unresolved })
    }
}

/// Why a frame could not be routed. Each is a counted routing error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no rule for the server type")]
    NoRule,
    #[error("the rule lists no endpoints")]
    NoEndpoints,
    #[error("every endpoint of the rule is unavailable")]
    AllUnavailable,
}

impl RouteError {
    /// Every routing error, for metrics exported at zero from the start.
    pub const ALL: [RouteError; 3] = [RouteError::NoRule, RouteError::NoEndpoints, RouteError::AllUnavailable];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteError::NoRule => "no_rule",
            RouteError::NoEndpoints => "no_endpoints",
            RouteError::AllUnavailable => "backend_unavailable",
        }
    }
}

/// What a strategy may key on, from the binding frame and the session.
#[derive(Debug, Clone, Copy)]
pub struct PickInput {
    pub session_id: i64,
    pub world_id: u16,
    pub inst_id: u8,
    pub client_ip: IpAddr,
}

/// An immutable, validated, versioned routing snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    rules: ahash::AHashMap<(u8, u16), Arc<RouteRule>>,
    /// Realm (world) id -> endpoint, for `realm_based`.
    realms: ahash::AHashMap<u16, Endpoint>,
}

/// splitmix64 finaliser: turns (key ^ endpoint hash) into a well-spread score.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous (highest random weight) hashing: each key goes to the endpoint
/// with the highest `mix(key ^ endpoint)`; removing one of N endpoints moves
/// only the keys that were on it (about 1/N). Unavailable endpoints are
/// skipped, so their keys fall to their second choice and return afterwards.
pub(crate) fn rendezvous<'a>(
    key: u64,
    endpoints: &'a [Endpoint],
    available: &dyn Fn(&Endpoint) -> bool,
) -> Option<&'a Endpoint> {
    let k = mix(key);
    endpoints.iter().filter(|e| available(e)).max_by_key(|e| mix(k ^ e.hash))
}

impl RouteTable {
    pub fn new(version: u64, rules: Vec<RouteRule>, realms: Vec<(u16, Endpoint)>) -> RouteTable {
        RouteTable {
            version,
            rules: rules.into_iter().map(|r| (r.key(), Arc::new(r))).collect(),
            realms: realms.into_iter().collect(),
        }
    }

    pub fn rules(&self) -> impl Iterator<Item = &Arc<RouteRule>> {
        self.rules.values()
    }

    pub fn realms(&self) -> impl Iterator<Item = (&u16, &Endpoint)> {
        self.realms.iter()
    }

    /// The rule for (type, world), else the wildcard rule (type, 0).
    #[inline]
    pub fn lookup(&self, server_type: u8, world_id: u16) -> Option<&Arc<RouteRule>> {
        self.rules.get(&(server_type, world_id)).or_else(|| self.rules.get(&(server_type, 0)))
    }

    /// Whether the rule for (type, world) can still pick `addr` speaking
    /// `protocol`: one of its endpoints, or for `realm_based` the realm
    /// mapping of that world.
    pub fn routes_to(&self, server_type: u8, world_id: u16, addr: &SocketAddr, protocol: BackendProtocol) -> bool {
        let Some(rule) = self.lookup(server_type, world_id) else { return false };
        rule.backend_protocol == protocol && rule.endpoints.iter().any(|e| e.addr == *addr)
            || (rule.strategy == Strategy::RealmBased && self.realms.get(&world_id).is_some_and(|e| e.addr == *addr))
    }

    /// Whether some rule speaking `protocol` can still pick `addr` (one of its
    /// endpoints, or a realm mapping for a `realm_based` rule).
    pub fn lists_with(&self, addr: &SocketAddr, protocol: BackendProtocol) -> bool {
        self.rules.values().any(|r| {
            r.backend_protocol == protocol
                && (r.endpoints.iter().any(|e| e.addr == *addr)
                    || (r.strategy == Strategy::RealmBased && self.realms.values().any(|e| e.addr == *addr)))
        })
    }

    /// Whether `addr` is an endpoint some rule or realm can still pick.
    pub fn lists(&self, addr: &SocketAddr) -> bool {
        self.rules.values().any(|r| r.endpoints.iter().any(|e| e.addr == *addr))
            || self.realms.values().any(|e| e.addr == *addr)
    }

    /// Picks an endpoint for a new binding. `rr` is the worker's round-robin
    /// cursor for this rule.
    pub fn pick<'a>(
        &'a self,
        rule: &'a RouteRule,
        input: &PickInput,
        rr: &mut usize,
        available: &dyn Fn(&Endpoint) -> bool,
    ) -> Result<&'a Endpoint, RouteError> {
        let inst_key = ((input.world_id as u64) << 8) | input.inst_id as u64;
        match rule.strategy {
            Strategy::RoundRobin => {
                let n = rule.endpoints.len();
                if n == 0 {
                    return Err(RouteError::NoEndpoints);
                }
                for _ in 0..n {
                    let e = &rule.endpoints[*rr % n];
                    *rr = rr.wrapping_add(1);
                    if available(e) {
                        return Ok(e);
                    }
                }
                Err(RouteError::AllUnavailable)
            }
            Strategy::ConsistentHash => {
                if rule.endpoints.is_empty() {
                    return Err(RouteError::NoEndpoints);
                }
                let key = match rule.hash_key {
                    HashKey::InstId => inst_key,
                    HashKey::Session => input.session_id as u64,
                    HashKey::ClientIp => match input.client_ip {
                        IpAddr::V4(v4) => u32::from(v4) as u64,
                        IpAddr::V6(v6) => xxhash_rust::xxh3::xxh3_64(&v6.octets()),
                    },
                };
                rendezvous(key, &rule.endpoints, available).ok_or(RouteError::AllUnavailable)
            }
            Strategy::RealmBased => {
                if let Some(e) = self.realms.get(&input.world_id) {
                    if available(e) {
                        return Ok(e);
                    }
                }
                if rule.endpoints.is_empty() {
                    return Err(if self.realms.contains_key(&input.world_id) {
                        RouteError::AllUnavailable
                    } else {
                        RouteError::NoEndpoints
                    });
                }
                rendezvous(inst_key, &rule.endpoints, available).ok_or(RouteError::AllUnavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(t: i64, w: i64, strategy: &str, eps: &[&str]) -> RouteRule {
        let eps: Vec<String> = eps.iter().map(|s| s.to_string()).collect();
        RawRule::new(t, w, strategy, &eps).validate().unwrap()
    }

    fn input(inst: u8) -> PickInput {
        PickInput { session_id: 1, world_id: 1, inst_id: inst, client_ip: "127.0.0.1".parse().unwrap() }
    }

    const ALL: &dyn Fn(&Endpoint) -> bool = &|_| true;

    #[test]
    fn world_rule_beats_wildcard() {
        let t = RouteTable::new(
            1,
            vec![rule(10, 0, "round_robin", &["127.0.0.1:1"]), rule(10, 7, "round_robin", &["127.0.0.1:2"])],
            vec![],
        );
        assert_eq!(t.lookup(10, 7).unwrap().world_id, 7);
        assert_eq!(t.lookup(10, 8).unwrap().world_id, 0);
        assert!(t.lookup(11, 7).is_none());
    }

    #[test]
    fn round_robin_cycles_and_skips_unavailable() {
        let r = rule(10, 0, "round_robin", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let t = RouteTable::new(1, vec![], vec![]);
        let mut rr = 0;
        let picks: Vec<u16> = (0..6).map(|_| t.pick(&r, &input(0), &mut rr, ALL).unwrap().addr.port()).collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        let not2 = |e: &Endpoint| e.addr.port() != 2;
        let picks: Vec<u16> = (0..4).map(|_| t.pick(&r, &input(0), &mut rr, &not2).unwrap().addr.port()).collect();
        assert!(!picks.contains(&2));
        assert_eq!(t.pick(&r, &input(0), &mut rr, &|_| false), Err(RouteError::AllUnavailable));
    }

    #[test]
    fn empty_endpoints_is_a_routing_error_not_a_config_error() {
        let r = rule(200, 0, "round_robin", &[]);
        let t = RouteTable::new(1, vec![], vec![]);
        assert_eq!(t.pick(&r, &input(0), &mut 0, ALL), Err(RouteError::NoEndpoints));
    }

    #[test]
    fn consistent_hash_moves_about_one_nth_when_one_endpoint_goes() {
        let names: Vec<String> = (1..=10).map(|i| format!("127.0.0.1:{}", 1000 + i)).collect();
        let eps: Vec<Endpoint> = names.iter().map(|n| Endpoint::parse(n).unwrap()).collect();
        let keys = 100_000u64;
        let before: Vec<&Endpoint> = (0..keys).map(|k| rendezvous(k, &eps, ALL).unwrap()).collect();
        // Spread: each of 10 endpoints gets 10% +- 1.5%.
        for e in &eps {
            let n = before.iter().filter(|b| **b == e).count() as f64 / keys as f64;
            assert!((0.085..0.115).contains(&n), "{e}: {n}");
        }
        let removed = &eps[3];
        let fewer: Vec<Endpoint> = eps.iter().filter(|e| *e != removed).cloned().collect();
        let mut moved = 0;
        for k in 0..keys {
            let after = rendezvous(k, &fewer, ALL).unwrap();
            if after.addr != before[k as usize].addr {
                moved += 1;
                assert_eq!(before[k as usize], removed, "only keys of the removed endpoint move");
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((0.085..0.115).contains(&frac), "moved {frac}");
    }

    #[test]
    fn consistent_hash_keeps_an_instance_on_one_endpoint() {
        let r = rule(10, 0, "consistent_hash", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let t = RouteTable::new(1, vec![], vec![]);
        for inst in 0..=255u8 {
            let first = t.pick(&r, &input(inst), &mut 0, ALL).unwrap().addr;
            for s in 0..5 {
                let mut i = input(inst);
                i.session_id = s;
                assert_eq!(t.pick(&r, &i, &mut 0, ALL).unwrap().addr, first);
            }
        }
    }

    #[test]
    fn realm_mapping_then_fallback() {
        let r = rule(30, 0, "realm_based", &["127.0.0.1:1", "127.0.0.1:2"]);
        let t = RouteTable::new(1, vec![], vec![(7, Endpoint::parse("127.0.0.1:77").unwrap())]);
        let mut i = input(0);
        i.world_id = 7;
        assert_eq!(t.pick(&r, &i, &mut 0, ALL).unwrap().addr.port(), 77);
        i.world_id = 8;
        assert_ne!(t.pick(&r, &i, &mut 0, ALL).unwrap().addr.port(), 77);
        let empty = rule(30, 0, "realm_based", &[]);
        i.world_id = 9;
        assert_eq!(t.pick(&empty, &i, &mut 0, ALL), Err(RouteError::NoEndpoints));
    }

    #[test]
    fn endpoint_syntax_is_checked_before_any_lookup() {
        assert_eq!(Endpoint::literal("127.0.0.1:5"), Ok(Some("127.0.0.1:5".parse().unwrap())));
        assert_eq!(Endpoint::literal("[2001:db8::1]:5"), Ok(Some("[2001:db8::1]:5".parse().unwrap())));
        assert_eq!(Endpoint::literal("account.game.svc.cluster.local:9000"), Ok(None));
        for bad in ["nohost", "host:0", "127.0.0.1:0", ":80", "a b:1", "host:http", "host:70000"] {
            assert!(matches!(Endpoint::literal(bad), Err(EndpointError::Invalid(_))), "{bad}");
        }
        struct Fixed;
        impl Resolve for Fixed {
            fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, String> {
                if host == "known" {
                    Ok(SocketAddr::from(([10, 0, 0, 1], port)))
                } else {
                    Err("unknown".into())
                }
            }
        }
        let e = Endpoint::parse_with("known:7", &mut Fixed).unwrap();
        assert_eq!((e.addr.to_string().as_str(), e.name.as_ref(), e.is_literal()), ("10.0.0.1:7", "known:7", false));
        assert!(matches!(Endpoint::parse_with("other:7", &mut Fixed), Err(EndpointError::Unresolved(_))));
        let raw = RawRule::new(10, 0, "round_robin", &["known:1".into(), "other:2".into(), "other:2".into()]);
        let errs = raw.validate_with(&mut Fixed, Resolution::Deferred).unwrap_err();
        assert_eq!(errs, vec![("endpoints", "\"other:2\" is listed twice".to_string())]);
        let raw = RawRule::new(10, 0, "round_robin", &["known:1".into(), "other:2".into()]);
        let v = raw.validate_with(&mut Fixed, Resolution::Deferred).unwrap();
        assert_eq!((v.rule.endpoints.len(), v.unresolved[0].0.as_ref()), (1, "other:2"));
        assert!(raw.validate_with(&mut Fixed, Resolution::Required).is_err());
    }

    #[test]
    fn validation_lists_every_problem() {
        let raw = RawRule {
            server_type: 300,
            world_id: -1,
            service_name: String::new(),
            strategy: "random".into(),
            endpoints: vec!["nohost".into(), "127.0.0.1:0".into()],
            hash_key: Some("x".into()),
            notify_sessions: None,
            trace_propagation: None,
            on_backend_loss: Some("pray".into()),
            backend_protocol: Some("smtp".into()),
            binding: Some("glue".into()),
        };
        let errs = raw.validate().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.0).collect();
        assert_eq!(
            fields,
            vec![
                "server_type",
                "world_id",
                "strategy",
                "endpoints",
                "endpoints",
                "hash_key",
                "on_backend_loss",
                "backend_protocol",
                "binding"
            ]
        );
        let mut seed = RawRule::new(10, 0, "round_robin", &["127.0.0.1:1".into()]);
        seed.backend_protocol = Some("seed_tcp".into());
        seed.on_backend_loss = Some("rebind".into());
        assert_eq!(seed.validate().unwrap_err()[0].0, "on_backend_loss", "seed_tcp sessions cannot rebind");
    }
}
