//! Consul service discovery (control side; never on a worker core).
//!
//! One watcher thread per watched service asks the agent's health endpoint
//! for the service's instances whose every check passes, as the Go gateway
//! did, but with Consul blocking queries instead of a fixed poll:
//!
//! ```text
//! GET /v1/health/service/{service}?passing=true[&dc=DC][&index=I&wait=W]
//! X-Consul-Token: TOKEN            (when configured)
//! ```
//!
//! The first query (and the first after a failure) has no `index` and is
//! answered at once; each later one carries the `X-Consul-Index` of the last
//! answer and is held by the agent until the result changes or `wait` (plus
//! Consul's jitter of up to `wait / 16`) has passed. An index that goes
//! backwards starts over from no index; an index of 0 is taken as 1; queries
//! never start more often than every [`MIN_QUERY_INTERVAL`], whatever the
//! agent answers. A failed query (agent unreachable, timeout, HTTP error,
//! body that is not the documented JSON) is reported and retried with a
//! backoff from [`RETRY_MIN`] doubling to [`RETRY_MAX`]; the control loop
//! keeps that service's last good answer meanwhile.
//!
//! Each answer goes to the control loop as a [`ControlEvent::Discovery`]:
//! the instances kept after the namespace filter (`namespace` meta, else
//! `pod_namespace`, must equal `consul.namespace` when that is set), grouped
//! by their `world_id` meta. [`fill`] then puts them into the rules whose
//! server type `consul.services` maps to the service and that list no
//! endpoints of their own.

use super::resolve::Names;
use super::routes::RouteSet;
use super::Control;
use crate::config::ConsulConfig;
use crate::routing::{Endpoint, RouteRule};
use crate::state::{ControlEvent, ControlSender, DiscoveryAnswer, RedisState, ServiceStatus};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// TCP connect and request write timeout towards the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra read time on top of `wait` and Consul's `wait / 16` jitter.
const READ_SLACK: Duration = Duration::from_secs(5);
/// Retry backoff after a failed query (doubles, capped).
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(250);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(10);
/// Queries of one service never start closer together than this (Consul's
/// advice for blocking-query loops: an agent that answers at once, e.g.
/// after an index reset, must not be hammered).
pub(crate) const MIN_QUERY_INTERVAL: Duration = Duration::from_millis(100);
/// Largest answer accepted.
const MAX_BODY: usize = 32 << 20;
/// The service meta key instances are grouped by.
pub const WORLD_META: &str = "world_id";

/// Starts one watcher thread per watched service; they run until `stop`.
pub(crate) fn spawn_watchers(cfg: &ConsulConfig, tx: ControlSender, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    for service in cfg.service_names() {
        let (cfg, service, tx, stop) = (cfg.clone(), service.to_string(), tx.clone(), stop.clone());
        std::thread::Builder::new().name("gw-consul".into()).spawn(move || watch(&cfg, &service, &tx, &stop))?;
    }
    Ok(())
}

/// One service's query loop.
fn watch(cfg: &ConsulConfig, service: &str, tx: &ControlSender, stop: &AtomicBool) {
    let mut index = 0u64;
    let mut backoff = RETRY_MIN;
    let mut logged: HashSet<String> = HashSet::new();
    let mut last_start: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(t) = last_start {
            sleep_unless_stopped(MIN_QUERY_INTERVAL.saturating_sub(t.elapsed()), stop);
        }
        last_start = Some(Instant::now());
        let result = query(cfg, service, index).and_then(|(new_index, body)| {
            parse_health(&body, &cfg.namespace).map(|mut a| {
                a.index = new_index;
                a
            })
        });
        let result = match result {
            Ok(answer) => {
                // Consul's rules for the next index: start over when it went
                // backwards, never block on 0.
                index = if answer.index < index { 0 } else { answer.index.max(1) };
                backoff = RETRY_MIN;
                if logged.len() > 4096 {
                    logged.clear();
                }
                for why in &answer.skipped {
                    if logged.insert(why.clone()) {
                        if why.contains(WORLD_META) && !why.ends_with("no world_id meta") {
                            tracing::warn!(service, instance = %why, "consul instance skipped");
                        } else {
                            tracing::debug!(service, instance = %why, "consul instance skipped");
                        }
                    }
                }
                Ok(answer)
            }
            Err(e) => {
                index = 0;
                Err(e)
            }
        };
        let failed = result.is_err();
        if tx.send(ControlEvent::Discovery { service: service.to_string(), result }).is_err() {
            return;
        }
        if failed {
            sleep_unless_stopped(backoff, stop);
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The request path and query of one health query.
pub(crate) fn request_path(cfg: &ConsulConfig, service: &str, index: u64) -> String {
    let mut p = format!("/v1/health/service/{service}?passing=true");
    if let Some(dc) = &cfg.datacenter {
        p.push_str(&format!("&dc={dc}"));
    }
    if index > 0 {
        let w = cfg.wait;
        let wait = if w.subsec_millis() == 0 { format!("{}s", w.as_secs()) } else { format!("{}ms", w.as_millis()) };
        p.push_str(&format!("&index={index}&wait={wait}"));
    }
    p
}

/// One health query: the answer's `X-Consul-Index` and body.
pub(crate) fn query(cfg: &ConsulConfig, service: &str, index: u64) -> Result<(u64, Vec<u8>), String> {
    let path = request_path(cfg, service, index);
    // Consul holds a blocking query up to wait + wait/16.
    let read_timeout = if index > 0 { cfg.wait + cfg.wait / 16 + READ_SLACK } else { READ_SLACK * 2 };
    let resp = http_get(&cfg.address, &path, cfg.token.as_deref(), read_timeout)?;
    if resp.status != 200 {
        let body = String::from_utf8_lossy(&resp.body);
        let body: String = body.trim().chars().take(200).collect();
        return Err(format!("http://{}{path}: HTTP {} {body}", cfg.address, resp.status));
    }
    let index = resp
        .header("x-consul-index")
        .ok_or_else(|| format!("http://{}{path}: no X-Consul-Index header", cfg.address))?
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("http://{}{path}: X-Consul-Index is not a number", cfg.address))?;
    Ok((index, resp.body))
}

/// An HTTP answer.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 GET on a fresh connection (`Connection: close`): the
/// agent is local and a blocking query lasts up to `wait`, so keeping
/// connections alive would buy nothing.
pub(crate) fn http_get(
    hostport: &str,
    path: &str,
    token: Option<&str>,
    read_timeout: Duration,
) -> Result<Response, String> {
    let at = |e: &dyn std::fmt::Display| format!("http://{hostport}{path}: {e}");
    let addr = hostport.to_socket_addrs().map_err(|e| at(&e))?.next().ok_or_else(|| at(&"no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| at(&e))?;
    s.set_read_timeout(Some(read_timeout)).map_err(|e| at(&e))?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| at(&e))?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: game-gateway/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        req.push_str(&format!("X-Consul-Token: {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| at(&e))?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(at(&format!("no answer within {}s", read_timeout.as_secs())))
            }
            Err(e) => return Err(at(&e)),
        };
        if n > 0 {
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_BODY {
                return Err(at(&"answer larger than 32 MiB"));
            }
        }
        if let Some(resp) = parse_response(&buf, n == 0).map_err(|e| at(&e))? {
            return Ok(resp);
        }
        if n == 0 {
            return Err(at(&"connection closed before a complete answer"));
        }
    }
}

/// A complete response in `buf`, `None` while more bytes are needed. `eof`:
/// the peer closed, so a body without a length ends here.
pub(crate) fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(buf).map_err(|e| format!("bad HTTP answer: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = r.code.unwrap_or(0);
    let headers: Vec<(String, String)> =
        r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string())).collect();
    let find = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    let rest = &buf[head_len..];
    let body = if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        match dechunk(rest)? {
            Some(b) => b,
            None => return Ok(None),
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad Content-Length {len:?}"))?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response { status, headers, body }))
}

/// Decodes a chunked body; `None` while incomplete.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size".to_string())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The instances of a `/v1/health/service` answer worth routing to: every
/// check passing (the query asks for that; checked again here), the
/// namespace filter, a `world_id` meta 0..=32767, an address
/// (`Service.Address`, else `Node.Address`, as Consul documents) and a port.
pub(crate) fn parse_health(body: &[u8], namespace: &str) -> Result<DiscoveryAnswer, String> {
    let entries: Vec<Value> =
        serde_json::from_slice(body).map_err(|e| format!("answer is not the health endpoint's JSON array: {e}"))?;
    let mut answer = DiscoveryAnswer::default();
    for (i, entry) in entries.iter().enumerate() {
        let svc = &entry["Service"];
        let id = svc["ID"].as_str().filter(|s| !s.is_empty()).map(str::to_string).unwrap_or_else(|| format!("#{i}"));
        let node = entry["Node"]["Node"].as_str().unwrap_or("?");
        let who = format!("{id} on {node}");
        if let Some(c) = entry["Checks"].as_array().and_then(|cs| cs.iter().find(|c| c["Status"] != "passing")) {
            answer.skipped.push(format!("{who}: check {} is {}", c["CheckID"], c["Status"]));
            continue;
        }
        let meta = |k: &str| svc["Meta"][k].as_str().filter(|s| !s.is_empty());
        if !namespace.is_empty() {
            let ns = meta("namespace").or_else(|| meta("pod_namespace"));
            if ns != Some(namespace) {
                answer.skipped.push(format!("{who}: namespace {:?} is not {namespace:?}", ns.unwrap_or("")));
                continue;
            }
        }
        let world = match meta(WORLD_META) {
            None => {
                answer.skipped.push(format!("{who}: no world_id meta"));
                continue;
            }
            Some(w) => match w.trim().parse::<u16>() {
                Ok(w) if w <= 32767 => w,
                _ => {
                    answer.skipped.push(format!("{who}: world_id {w:?} is not 0..=32767"));
                    continue;
                }
            },
        };
        let addr = svc["Address"].as_str().filter(|a| !a.is_empty()).or_else(|| entry["Node"]["Address"].as_str());
        let Some(addr) = addr.filter(|a| !a.is_empty()) else {
            answer.skipped.push(format!("{who}: no address"));
            continue;
        };
        let port = match svc["Port"].as_u64() {
            Some(p @ 1..=65535) => p,
            _ => {
                answer.skipped.push(format!("{who}: port {} is not 1..=65535", svc["Port"]));
                continue;
            }
        };
        let name = match addr.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]:{port}"),
            _ => format!("{addr}:{port}"),
        };
        answer.worlds.entry(world).or_default().push(name);
    }
    for eps in answer.worlds.values_mut() {
        eps.sort();
        eps.dedup();
    }
    Ok(answer)
}

/// Puts discovered endpoints into the rules `services` maps to a service
/// and that list no endpoints of their own (none resolved, none waiting to
/// resolve). `found` holds, per service, the last good answer's endpoints by
/// world; a service with no answer yet leaves its rules as they are.
///
/// - A rule for world `W` > 0 gets the instances whose `world_id` is `W`.
/// - A wildcard rule (world 0) gets the instances whose `world_id` is 0,
///   and, for every other world `w` that has instances and no rule
///   (`T`, `w`) of its own, a copy of it is added as (`T`, `w`) with those
///   instances, so each world's sessions stay on that world's servers.
/// - A world with no passing instance leaves its rule with no endpoints
///   (frames fail with `no_endpoints`): Consul's answer is taken as it is.
pub(crate) fn fill(
    set: &mut RouteSet,
    services: &BTreeMap<u8, String>,
    found: &BTreeMap<String, BTreeMap<u16, Vec<Endpoint>>>,
) {
    let keys: HashSet<(u8, u16)> = set.rules.iter().map(RouteRule::key).collect();
    let mut added = Vec::new();
    let targets: Vec<usize> = (0..set.rules.len())
        .filter(|&i| services.contains_key(&set.rules[i].server_type) && !set.lists_endpoints(&set.rules[i]))
        .collect();
    for i in targets {
        let rule = &mut set.rules[i];
        let Some(worlds) = found.get(&services[&rule.server_type]) else { continue };
        rule.endpoints = worlds.get(&rule.world_id).cloned().unwrap_or_default();
        if rule.world_id != 0 {
            continue;
        }
        for (w, eps) in worlds {
            if *w != 0 && !keys.contains(&(rule.server_type, *w)) {
                added.push(RouteRule { world_id: *w, endpoints: eps.clone(), ..rule.clone() });
            }
        }
    }
    if !added.is_empty() {
        set.rules.extend(added);
        set.rules.sort_by_key(RouteRule::key);
    }
}

/// The control loop's view of discovery: each service's last good answer.
pub(crate) struct Discovery {
    pub(crate) cfg: ConsulConfig,
    answers: BTreeMap<String, DiscoveryAnswer>,
    /// Whether each service's last query answered (absent: no report yet).
    up: BTreeMap<String, bool>,
}

impl Discovery {
    pub(crate) fn new(cfg: ConsulConfig) -> Discovery {
        Discovery { cfg, answers: BTreeMap::new(), up: BTreeMap::new() }
    }

    /// Every watched service answered or failed at least once.
    pub(crate) fn all_reported(&self) -> bool {
        self.cfg.service_names().iter().all(|s| self.up.contains_key(*s))
    }

    /// Some service answered at least once.
    pub(crate) fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }

    /// Each service's last good answer as endpoints by world. A host name
    /// the cache does not know yet is left out and added to `wanted` (it is
    /// looked up off the control thread, and the routes republished then).
    pub(crate) fn endpoints(
        &self,
        names: &Names,
        wanted: &mut BTreeSet<Arc<str>>,
    ) -> BTreeMap<String, BTreeMap<u16, Vec<Endpoint>>> {
        let mut out = BTreeMap::new();
        for (service, answer) in &self.answers {
            let mut worlds = BTreeMap::new();
            for (w, list) in &answer.worlds {
                let mut eps = Vec::with_capacity(list.len());
                for name in list {
                    if Endpoint::literal(name).is_err() {
                        continue;
                    }
                    match names.cached(name) {
                        Some(addr) => eps.push(Endpoint::with_addr(name, addr)),
                        None => {
                            wanted.insert(Arc::from(name.as_str()));
                        }
                    }
                }
                worlds.insert(*w, eps);
            }
            out.insert(service.clone(), worlds);
        }
        out
    }
}

impl Control {
    /// A watcher's report: keep the answer (a failure keeps the last good
    /// one), update `/status`, republish.
    pub(super) fn on_discovery(&mut self, service: String, result: Result<DiscoveryAnswer, String>) {
        let origin = std::time::Instant::now();
        let Some(d) = self.consul.as_mut() else { return };
        let stats = self.stats.clone();
        let changed = match result {
            Ok(answer) => {
                stats.consul_answers.fetch_add(1, Ordering::Relaxed);
                if d.up.insert(service.clone(), true) == Some(false) {
                    tracing::info!(service, "consul answers again");
                }
                let old = d.answers.get(&service).map(|a| &a.worlds);
                let changed = old != Some(&answer.worlds);
                if changed {
                    let instances: usize = answer.worlds.values().map(Vec::len).sum();
                    tracing::info!(
                        service,
                        index = answer.index,
                        instances,
                        worlds = answer.worlds.len(),
                        skipped = answer.skipped.len(),
                        "consul: passing instances changed"
                    );
                }
                let mut st = stats.discovery.lock().unwrap();
                st.services.insert(
                    service.clone(),
                    ServiceStatus {
                        state: "up",
                        index: answer.index,
                        worlds: answer.worlds.clone(),
                        skipped: answer.skipped.len(),
                        last_error: String::new(),
                    },
                );
                d.answers.insert(service, answer);
                changed
            }
            Err(e) => {
                stats.consul_errors.fetch_add(1, Ordering::Relaxed);
                if d.up.insert(service.clone(), false) != Some(false) {
                    tracing::warn!(service, error = %e, "consul query failed: keeping the last good answer, retrying with backoff");
                }
                let mut st = stats.discovery.lock().unwrap();
                let s = st.services.entry(service).or_default();
                s.state = "down";
                s.last_error = e;
                false
            }
        };
        let all_up = d.all_reported() && d.up.values().all(|u| *u);
        stats.consul_state.store(if all_up { RedisState::Up } else { RedisState::Down });
        if changed {
            self.publish("consul", origin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::routes::{Pending, Slot};
    use crate::routing::RawRule;

    fn rule(t: i64, w: i64, eps: &[&str]) -> RouteRule {
        let eps: Vec<String> = eps.iter().map(|s| s.to_string()).collect();
        RawRule::new(t, w, "round_robin", &eps).validate().unwrap()
    }

    fn entry(id: &str, addr: &str, port: u16, meta: &[(&str, &str)], status: &str) -> Value {
        let meta: serde_json::Map<String, Value> = meta.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        serde_json::json!({
            "Node": {"Node": "node-1", "Address": "10.9.9.9", "Datacenter": "dc1"},
            "Service": {"ID": id, "Service": "game", "Tags": [], "Meta": meta, "Address": addr, "Port": port},
            "Checks": [
                {"Node": "node-1", "CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
                {"Node": "node-1", "CheckID": format!("service:{id}"), "Status": status, "ServiceID": id}
            ]
        })
    }

    #[test]
    fn health_answer_is_filtered_and_grouped_by_world() {
        let body = serde_json::to_vec(&Value::Array(vec![
            entry("g1", "10.0.0.1", 7000, &[("world_id", "1"), ("namespace", "hgame")], "passing"),
            entry("g2", "10.0.0.2", 7000, &[("world_id", "1"), ("pod_namespace", "hgame")], "passing"),
            entry("g3", "10.0.0.3", 7000, &[("world_id", "2"), ("namespace", "hgame")], "passing"),
            entry("other", "10.0.0.4", 7000, &[("world_id", "1"), ("namespace", "staging")], "passing"),
            entry("nowld", "10.0.0.5", 7000, &[("namespace", "hgame")], "passing"),
            entry("badwld", "10.0.0.6", 7000, &[("world_id", "x"), ("namespace", "hgame")], "passing"),
            entry("sick", "10.0.0.7", 7000, &[("world_id", "1"), ("namespace", "hgame")], "critical"),
            entry("nodeaddr", "", 7001, &[("world_id", "2"), ("namespace", "hgame")], "passing"),
            entry(
                "v6",
                "2001:db8::1",
                7002,
                &[("world_id", "2"), ("namespace", "hgame"), ("pod_namespace", "x")],
                "passing",
            ),
        ]))
        .unwrap();
        let a = parse_health(&body, "hgame").unwrap();
        assert_eq!(a.worlds[&1], vec!["10.0.0.1:7000", "10.0.0.2:7000"]);
        assert_eq!(a.worlds[&2], vec!["10.0.0.3:7000", "10.9.9.9:7001", "[2001:db8::1]:7002"]);
        assert_eq!(a.skipped.len(), 4, "{:?}", a.skipped);
        for want in ["namespace \"staging\"", "no world_id meta", "world_id \"x\"", "is \"critical\""] {
            assert!(a.skipped.iter().any(|s| s.contains(want)), "{want}: {:?}", a.skipped);
        }
        let all = parse_health(&body, "").unwrap();
        assert_eq!(all.worlds[&1].len(), 3, "no namespace filter: staging counts too");
        assert!(parse_health(b"{\"not\": \"an array\"}", "").is_err());
    }

    #[test]
    fn fill_targets_only_empty_mapped_rules_and_splits_the_wildcard_by_world() {
        let mut set = RouteSet {
            rules: vec![
                rule(10, 0, &["127.0.0.1:1"]),
                rule(11, 0, &[]),
                rule(200, 0, &[]),
                rule(200, 2, &[]),
                rule(200, 3, &["127.0.0.1:3"]),
                rule(201, 1, &[]),
            ],
            ..Default::default()
        };
        set.pending.push(Pending { slot: Slot::Rule(11, 0), name: "later.example:1".into() });
        let services: BTreeMap<u8, String> =
            [(10, "game"), (11, "game"), (200, "game"), (201, "game")].map(|(t, s)| (t, s.to_string())).into();
        let ep = |s: &str| Endpoint::parse(s).unwrap();
        let worlds: BTreeMap<u16, Vec<Endpoint>> = [
            (1, vec![ep("10.0.0.1:7000"), ep("10.0.0.2:7000")]),
            (2, vec![ep("10.0.0.3:7000")]),
            (3, vec![ep("10.0.0.4:7000")]),
        ]
        .into();
        fill(&mut set, &services, &[("game".to_string(), worlds)].into());
        let view: Vec<((u8, u16), usize)> = set.rules.iter().map(|r| (r.key(), r.endpoints.len())).collect();
        assert_eq!(
            view,
            vec![
                ((10, 0), 1),  // has its own endpoints
                ((11, 0), 0),  // lists a name that does not resolve yet: not a target
                ((200, 0), 0), // no instance with world_id 0
                ((200, 1), 2), // added from the wildcard
                ((200, 2), 1), // its own rule, filled
                ((200, 3), 1), // its own endpoints win
                ((201, 1), 2),
            ]
        );
        assert_eq!(set.rules[4].endpoints[0].name.as_ref(), "10.0.0.3:7000");
        assert_eq!(set.rules[5].endpoints[0].name.as_ref(), "127.0.0.1:3");
    }

    #[test]
    fn no_answer_yet_leaves_rules_alone() {
        let mut set = RouteSet { rules: vec![rule(200, 1, &[])], ..Default::default() };
        fill(&mut set, &[(200, "game".to_string())].into(), &BTreeMap::new());
        assert!(set.rules[0].endpoints.is_empty());
    }

    #[test]
    fn responses_with_length_chunks_or_eof() {
        let cl = b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\n\r\n[]";
        let r = parse_response(cl, false).unwrap().unwrap();
        assert_eq!((r.status, r.header("x-consul-index"), r.body.as_slice()), (200, Some("7"), &b"[]"[..]));
        assert!(parse_response(&cl[..cl.len() - 1], false).unwrap().is_none());
        let ch = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n1;x=y\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(ch, false).unwrap().unwrap().body, b"[]");
        assert!(parse_response(&ch[..ch.len() - 7], false).unwrap().is_none());
        let eof = b"HTTP/1.0 500 Oops\r\n\r\nboom";
        assert!(parse_response(eof, false).unwrap().is_none());
        assert_eq!(parse_response(eof, true).unwrap().unwrap().status, 500);
    }

    #[test]
    fn request_paths() {
        let mut cfg = ConsulConfig {
            address: "127.0.0.1:8500".into(),
            services: [(200, "game".to_string())].into(),
            namespace: String::new(),
            datacenter: None,
            token: None,
            wait: Duration::from_secs(30),
        };
        assert_eq!(request_path(&cfg, "game", 0), "/v1/health/service/game?passing=true");
        cfg.datacenter = Some("dc2".into());
        assert_eq!(request_path(&cfg, "game", 42), "/v1/health/service/game?passing=true&dc=dc2&index=42&wait=30s");
    }
}
