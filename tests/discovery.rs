//! Drop-in operations: Consul discovery (against a double of Consul's
//! documented HTTP API, blocking queries included), route data written for
//! the Go gateway (unknown fields, names that do not resolve), and endpoint
//! names looked up again (in a private mount namespace whose /etc/hosts the
//! test rewrites).

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// A Consul agent double: `GET /v1/health/service/:service` with `passing`,
// `dc`, `index`, `wait` and `X-Consul-Token`, answering in the shape of
// HashiCorp's consul-api-double fixtures (Node / Service / Checks), with
// blocking-query semantics: a request whose `index` is not below the current
// index is held until the index moves past it or `wait` elapses; every answer
// carries `X-Consul-Index`.

#[derive(Clone, Debug)]
struct Inst {
    id: String,
    addr: String,
    port: u16,
    meta: Vec<(&'static str, String)>,
    passing: bool,
}

fn inst(id: &str, at: SocketAddr, meta: &[(&'static str, &str)], passing: bool) -> Inst {
    Inst {
        id: id.into(),
        addr: at.ip().to_string(),
        port: at.port(),
        meta: meta.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        passing,
    }
}

#[derive(Clone, Debug)]
struct Request {
    path: String,
    params: HashMap<String, String>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    index: u64,
    services: HashMap<String, Vec<Inst>>,
    requests: Vec<Request>,
    token: Option<String>,
    up: bool,
}

struct ConsulDouble {
    addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl ConsulDouble {
    fn start() -> ConsulDouble {
        let shared = Arc::new((Mutex::new(State { index: 10, up: true, ..Default::default() }), Condvar::new()));
        let mut d = ConsulDouble { addr: "127.0.0.1:0".parse().unwrap(), shared, stop: Arc::default(), accept: None };
        d.listen();
        d
    }

    fn listen(&mut self) {
        let l = TcpListener::bind(self.addr).unwrap();
        self.addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        self.stop = Arc::new(AtomicBool::new(false));
        self.shared.0.lock().unwrap().up = true;
        let (stop, shared) = (self.stop.clone(), self.shared.clone());
        self.accept = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let shared = shared.clone();
                        std::thread::spawn(move || serve(s, &shared));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// The agent dies: the port refuses connections and held queries are
    /// cut without an answer.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(j) = self.accept.take() {
            j.join().unwrap();
        }
        self.shared.0.lock().unwrap().up = false;
        self.shared.1.notify_all();
    }

    /// Back on the same port.
    fn restart(&mut self) {
        self.listen();
    }

    /// Changes a service's instances (a registration, deregistration or a
    /// check changing state): the index moves and held queries answer.
    fn update(&self, service: &str, f: impl FnOnce(&mut Vec<Inst>)) {
        let mut st = self.shared.0.lock().unwrap();
        f(st.services.entry(service.into()).or_default());
        st.index += 1;
        self.shared.1.notify_all();
    }

    fn require_token(&self, token: &str) {
        self.shared.0.lock().unwrap().token = Some(token.into());
    }

    fn requests(&self) -> Vec<Request> {
        self.shared.0.lock().unwrap().requests.clone()
    }

    fn address(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse_wait(s: &str) -> Duration {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().unwrap_or(300);
    match &s[split..] {
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        _ => Duration::from_secs(n),
    }
}

fn entry(service: &str, i: &Inst) -> serde_json::Value {
    let node = format!("node-{}", i.id);
    let meta: serde_json::Map<String, serde_json::Value> =
        i.meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
    serde_json::json!({
        "Node": {
            "ID": "7037e928-d9e8-3b58-4712-6f5ded209002", "Node": node, "Address": "10.255.0.1", "Datacenter": "dc1",
            "TaggedAddresses": {"lan": "10.255.0.1", "wan": "10.255.0.1"}, "Meta": {"consul-network-segment": ""},
            "CreateIndex": 5, "ModifyIndex": 6
        },
        "Service": {
            "ID": i.id, "Service": service, "Tags": ["v1"], "Meta": meta, "Address": i.addr, "Port": i.port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false, "Proxy": {},
            "CreateIndex": 5, "ModifyIndex": 5
        },
        "Checks": [
            {"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
             "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
             "ServiceTags": [], "Type": "", "Definition": {}, "CreateIndex": 5, "ModifyIndex": 5},
            {"Node": node, "CheckID": format!("service:{}", i.id), "Name": "Service check",
             "Status": if i.passing { "passing" } else { "critical" }, "Notes": "", "Output": "",
             "ServiceID": i.id, "ServiceName": service, "ServiceTags": ["v1"], "Type": "tcp", "Definition": {},
             "CreateIndex": 5, "ModifyIndex": 5}
        ]
    })
}

fn serve(mut s: TcpStream, shared: &(Mutex<State>, Condvar)) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let target = lines.next().unwrap_or("").split_whitespace().nth(1).unwrap_or("/").to_string();
    let token = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("x-consul-token"))
        .map(|(_, v)| v.trim().to_string());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: HashMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap_or((p.to_string(), String::new()))
        })
        .collect();
    let (lock, cv) = shared;
    let mut st = lock.lock().unwrap();
    st.requests.push(Request { path: path.to_string(), params: params.clone(), token: token.clone() });
    let reply = |s: &mut TcpStream, code: &str, index: u64, body: &str| {
        // Larger bodies go chunked, as Consul's HTTP server sends them.
        let head = if body.len() > 512 {
            format!("HTTP/1.1 {code}\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\nX-Consul-Knownleader: true\r\nTransfer-Encoding: chunked\r\n\r\n")
        } else {
            format!("HTTP/1.1 {code}\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\nContent-Length: {}\r\n\r\n", body.len())
        };
        let mut out = head.into_bytes();
        if body.len() > 512 {
            for part in body.as_bytes().chunks(300) {
                out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                out.extend_from_slice(part);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            out.extend_from_slice(body.as_bytes());
        }
        let _ = s.write_all(&out);
    };
    let Some(service) = path.strip_prefix("/v1/health/service/") else {
        reply(&mut s, "404 Not Found", st.index, "");
        return;
    };
    if st.token.is_some() && token != st.token {
        reply(&mut s, "403 Forbidden", st.index, "ACL not found");
        return;
    }
    if let Some(index) = params.get("index").and_then(|i| i.parse::<u64>().ok()) {
        let deadline = Instant::now() + params.get("wait").map(|w| parse_wait(w)).unwrap_or(Duration::from_secs(300));
        while st.up && st.index <= index && Instant::now() < deadline {
            st = cv.wait_timeout(st, deadline.saturating_duration_since(Instant::now())).unwrap().0;
        }
    }
    if !st.up {
        return; // the agent died while holding the query: no answer at all
    }
    let passing_only = params.get("passing").is_some_and(|v| v != "false");
    let insts = st.services.get(service).cloned().unwrap_or_default();
    let body: Vec<serde_json::Value> =
        insts.iter().filter(|i| i.passing || !passing_only).map(|i| entry(service, i)).collect();
    let index = st.index;
    drop(st);
    reply(&mut s, "200 OK", index, &serde_json::to_string(&body).unwrap());
}

// ---------------------------------------------------------------------------
// Helpers.

/// Opens a new session for (`server_type`, `world`) and says which mock
/// answered it.
fn lands_on(gw: SocketAddr, st: u8, world: u16, mbs: &[&MockBackend]) -> Option<usize> {
    let mut c = Client::connect(gw);
    c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    c.send(1, sid(world, st, 0), b"where");
    c.try_recv()?;
    let me = c.local();
    mbs.iter().position(|m| m.drain().iter().any(|e| matches!(e, Event::Connect { addr, .. } if *addr == me)))
}

fn wait_lands(gw: SocketAddr, st: u8, world: u16, mbs: &[&MockBackend], want: usize, within: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if lands_on(gw, st, world, mbs) == Some(want) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("sessions for type {st} world {world} did not reach backend {want} within {within:?}");
}

fn status(gw: &GatewayProcess) -> serde_json::Value {
    serde_json::from_str(&http_get(gw.admin, "/status").1).unwrap()
}

fn metric(gw: &GatewayProcess, name: &str) -> f64 {
    let text = http_get(gw.admin, "/metrics").1;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn consul_config(consul: &ConsulDouble, extra: &str, routes: &str) -> String {
    config_text(
        2,
        &format!("[consul]\naddress = \"{}\"\nnamespace = \"hgame\"\nwait = \"30s\"\n{extra}\n", consul.address()),
        routes,
    )
}

/// A rule with no endpoints (Consul fills it).
fn empty_rule(server_type: u8, world: u16) -> String {
    route(server_type, world, "round_robin", &[], "")
}

// ---------------------------------------------------------------------------
// Consul.

#[test]
fn consul_fills_empty_rules_and_a_check_turning_passing_applies_at_once() {
    let consul = ConsulDouble::start();
    consul.require_token("s3cret");
    let (a, b, c, st) = (mock(), mock(), mock(), mock());
    let ns = ("namespace", "hgame");
    consul.update("game", |v| v.push(inst("g1", a.addr(), &[("world_id", "1"), ns], true)));
    let routes = format!("{}{}", empty_rule(200, 0), route(10, 0, "round_robin", &[st.addr()], ""));
    let gw = GatewayProcess::spawn(
        &consul_config(
            &consul,
            "token = \"s3cret\"\ndatacenter = \"dc1\"\nservices = { 200 = \"game\", 10 = \"game\" }",
            &routes,
        ),
        &[],
    );
    // Ready once the first answer is in: the discovered routes are loaded.
    eventually("ready", || http_get(gw.admin, "/ready").0 == 200);
    wait_lands(gw.addr, 200, 1, &[&a, &b, &c], 0, Duration::from_secs(1));
    assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &st]), Some(1), "a rule with endpoints of its own is not filled");
    assert_eq!(lands_on(gw.addr, 200, 2, &[&a, &b, &c]), None, "no instance in world 2 yet");

    // A new instance whose check fails is not routed to ...
    consul.update("game", |v| v.push(inst("g2", b.addr(), &[("world_id", "1"), ns], false)));
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..6 {
        assert_eq!(lands_on(gw.addr, 200, 1, &[&a, &b]), Some(0));
    }
    // ... until its check passes: the held blocking query answers at once,
    // far sooner than the 30 s wait.
    consul.update("game", |v| v[1].passing = true);
    let took = wait_lands(gw.addr, 200, 1, &[&a, &b], 1, Duration::from_secs(3));
    eprintln!("check passing -> routed: {took:?}");
    consul.update("game", |v| v.push(inst("g3", c.addr(), &[("world_id", "2"), ns], true)));
    wait_lands(gw.addr, 200, 2, &[&a, &b, &c], 2, Duration::from_secs(3));

    let reqs = consul.requests();
    assert!(reqs.iter().all(|r| r.path == "/v1/health/service/game"), "{reqs:?}");
    assert!(reqs
        .iter()
        .all(|r| r.token.as_deref() == Some("s3cret") && r.params.get("dc").map(String::as_str) == Some("dc1")));
    assert!(reqs.iter().all(|r| r.params.get("passing").map(String::as_str) == Some("true")));
    let blocking = reqs.iter().filter(|r| r.params.contains_key("index")).count();
    assert!(blocking >= 3 && reqs.iter().filter(|r| r.params.contains_key("index")).all(|r| r.params["wait"] == "30s"));
    assert!(reqs.len() < 12, "one query per change, no polling: {}", reqs.len());

    let s = status(&gw);
    let d = &s["discovery"];
    assert_eq!(d["consul"], "up", "{s:#}");
    assert_eq!(d["services"]["game"]["worlds"]["1"].as_array().unwrap().len(), 2, "{s:#}");
    assert_eq!(s["routes"]["source"], "static+consul");
    assert!(d["consul_answers"].as_u64().unwrap() >= 4);
    assert_eq!(metric(&gw, "game_gateway_consul_errors_total"), 0.0);

    // Deregistered: new sessions go to the instances left.
    consul.update("game", |v| v.retain(|i| i.id != "g1"));
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        assert_eq!(lands_on(gw.addr, 200, 1, &[&a, &b]), Some(1));
    }
}

#[test]
fn instances_are_filtered_by_namespace_and_grouped_by_world_id() {
    let consul = ConsulDouble::start();
    let (a, b, other, w2, w3) = (mock(), mock(), mock(), mock(), mock());
    consul.update("game", |v| {
        v.push(inst("a", a.addr(), &[("world_id", "1"), ("namespace", "hgame")], true));
        // `pod_namespace` counts when `namespace` is missing.
        v.push(inst("b", b.addr(), &[("world_id", "1"), ("pod_namespace", "hgame")], true));
        v.push(inst("other", other.addr(), &[("world_id", "1"), ("namespace", "staging")], true));
        v.push(inst("w2", w2.addr(), &[("world_id", "2"), ("namespace", "hgame")], true));
        v.push(inst("w3", w3.addr(), &[("world_id", "3"), ("namespace", "hgame")], true));
        v.push(inst("nowld", other.addr(), &[("namespace", "hgame")], true));
        v.push(inst("badwld", other.addr(), &[("world_id", "seven"), ("namespace", "hgame")], true));
    });
    // A wildcard rule and an explicit world-2 rule, both empty; world 3 has
    // an explicit rule with its own endpoint.
    let routes = format!(
        "{}{}{}",
        empty_rule(200, 0),
        route(200, 2, "consistent_hash", &[], ""),
        route(200, 3, "round_robin", &[a.addr()], "")
    );
    let gw = GatewayProcess::spawn(&consul_config(&consul, "services = { 200 = \"game\" }", &routes), &[]);
    let mbs = [&a, &b, &other, &w2, &w3];
    let mut seen = [0usize; 5];
    let t0 = Instant::now();
    while (seen[0] == 0 || seen[1] == 0) && t0.elapsed() < Duration::from_secs(5) {
        if let Some(i) = lands_on(gw.addr, 200, 1, &mbs) {
            seen[i] += 1;
        }
    }
    assert!(seen[0] > 0 && seen[1] > 0 && seen[2] + seen[3] + seen[4] == 0, "world 1 on a and b only: {seen:?}");
    assert_eq!(lands_on(gw.addr, 200, 2, &mbs), Some(3), "the explicit world-2 rule is filled");
    assert_eq!(lands_on(gw.addr, 200, 3, &mbs), Some(0), "a rule with its own endpoints keeps them");
    assert_eq!(lands_on(gw.addr, 200, 9, &mbs), None, "no world 9 instance, no world 0 instance");
    let s = status(&gw);
    assert_eq!(s["discovery"]["services"]["game"]["skipped"], 3, "{s:#}");
    assert!(
        gw.stderr().contains("world_id \\\"seven\\\"") || gw.stderr().contains("world_id \"seven\""),
        "{}",
        gw.stderr()
    );
}

#[test]
fn consul_down_keeps_the_last_good_routes_and_counts_failures() {
    let mut consul = ConsulDouble::start();
    let (a, b) = (mock(), mock());
    consul.update("game", |v| v.push(inst("a", a.addr(), &[("world_id", "1"), ("namespace", "hgame")], true)));
    let gw = GatewayProcess::spawn(&consul_config(&consul, "services = { 200 = \"game\" }", &empty_rule(200, 0)), &[]);
    wait_lands(gw.addr, 200, 1, &[&a, &b], 0, Duration::from_secs(3));
    consul.kill();
    eventually("consul failures counted", || metric(&gw, "game_gateway_consul_errors_total") >= 3.0);
    let s = status(&gw);
    assert_eq!(s["discovery"]["consul"], "down", "{s:#}");
    assert!(!s["discovery"]["services"]["game"]["last_error"].as_str().unwrap().is_empty());
    assert_eq!(s["discovery"]["services"]["game"]["worlds"]["1"][0], a.addr().to_string(), "last good answer kept");
    assert_eq!(http_get(gw.admin, "/ready").0, 200, "stays ready without Consul");
    for _ in 0..4 {
        assert_eq!(lands_on(gw.addr, 200, 1, &[&a, &b]), Some(0), "last good routes serve");
    }
    assert_eq!(gw.stderr().matches("consul query failed").count(), 1, "one warning per state change\n{}", gw.stderr());

    // Back with other instances: applied as soon as it answers.
    consul.update("game", |v| v[0] = inst("b", b.addr(), &[("world_id", "1"), ("namespace", "hgame")], true));
    consul.restart();
    wait_lands(gw.addr, 200, 1, &[&a, &b], 1, Duration::from_secs(12));
    eventually("state up again", || status(&gw)["discovery"]["consul"] == "up");
    assert!(gw.stderr().contains("consul answers again"));
}

#[test]
fn consul_unreachable_at_start_is_not_fatal() {
    let mut consul = ConsulDouble::start();
    let a = mock();
    consul.update("game", |v| v.push(inst("a", a.addr(), &[("world_id", "4"), ("namespace", "hgame")], true)));
    consul.kill();
    let t0 = Instant::now();
    let gw = GatewayProcess::spawn(&consul_config(&consul, "services = { 200 = \"game\" }", &empty_rule(200, 0)), &[]);
    eventually("ready without consul", || http_get(gw.admin, "/ready").0 == 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(lands_on(gw.addr, 200, 4, &[&a]), None);
    consul.restart();
    wait_lands(gw.addr, 200, 4, &[&a], 0, Duration::from_secs(12));
}

// ---------------------------------------------------------------------------
// Route data written for the Go gateway.

#[test]
fn unknown_fields_in_redis_rules_are_a_warning_logged_once_and_counted() {
    let redis = RedisServer::start();
    let a = mock();
    redis.set_rules(&format!(
        r#"{{"10": {{"server_type": 10, "service_name": "account", "strategy": "round_robin", "endpoints": ["{}"], "weight": 3, "owner": "team-a"}}}}"#,
        a.addr()
    ));
    let gw = GatewayProcess::spawn(
        &config_text(1, &format!("[redis]\nurl = \"{}\"\nrefresh_interval = \"500ms\"\n", redis.url()), ""),
        &[],
    );
    wait_lands(gw.addr, 10, 1, &[&a], 0, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1600)); // three more reads of the same data
    let err = gw.stderr();
    assert_eq!(
        err.matches("unknown field \\\"weight\\\" ignored").count()
            + err.matches("unknown field \"weight\" ignored").count(),
        1,
        "{err}"
    );
    assert_eq!(metric(&gw, "game_gateway_route_data_warnings_total"), 2.0);
    assert_eq!(metric(&gw, "game_gateway_route_snapshots_rejected_total"), 0.0);
    assert_eq!(status(&gw)["discovery"]["route_warnings"], 2);
}

fn gateway_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway"))
}

#[test]
fn routes_check_loads_the_go_gateways_example_with_warnings() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/routes/seed-example.json");
    let resolvable = {
        use std::net::ToSocketAddrs;
        ("hgame-account.hgame.svc.cluster.local", 19711).to_socket_addrs().is_ok()
    };
    let out = gateway_bin().args(["routes", "check"]).arg(&example).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("rules: 3") && stdout.contains("type=200 world=1 service=game"), "{stdout}");
    if !resolvable {
        assert!(stdout.contains("rules ok, 2 warning(s)"), "{stdout}");
        assert!(stdout.contains("unresolved names (left out until they resolve): 2"), "{stdout}");
        assert!(
            stderr.contains(
                "warning: rules[\"10\"].endpoints: \"hgame-account.hgame.svc.cluster.local:19711\" does not resolve"
            ),
            "{stderr}"
        );
        let strict = gateway_bin().args(["routes", "check", "--resolve"]).arg(&example).output().unwrap();
        assert_eq!(strict.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&strict.stderr).contains("does not resolve"));
    }
    // Unknown fields: a warning, exit 0.
    let dir = TempDir::new("check");
    let f = dir.0.join("extra.json");
    std::fs::write(
        &f,
        r#"[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:9"], "weight": 2}]"#,
    )
    .unwrap();
    let out = gateway_bin().args(["routes", "check"]).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: rules[0]: unknown field \"weight\" ignored"));
    // The config file stays strict.
    let toml = dir.0.join("gw.toml");
    std::fs::write(&toml, "[[routes]]\nserver_type = 10\nstrategy = \"round_robin\"\nweight = 2\n").unwrap();
    let out = gateway_bin().arg("--config").arg(&toml).arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------
// Names looked up again. The gateway runs in its own user and mount
// namespace with a private /etc/hosts the test rewrites (glibc reads it on
// every lookup). Skipped where unprivileged namespaces are not allowed.

struct Hosts {
    file: std::path::PathBuf,
    _dir: TempDir,
}

impl Hosts {
    fn new(lines: &str) -> Option<Hosts> {
        let ok = std::process::Command::new("unshare")
            .args(["-rm", "sh", "-c", "mount --bind /dev/null /etc/hostname"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: unshare -rm with a bind mount is not allowed here");
            return None;
        }
        let dir = TempDir::new("hosts");
        let file = dir.0.join("hosts");
        let h = Hosts { file, _dir: dir };
        h.set(lines);
        Some(h)
    }

    /// Rewrites the file in place (same inode, so the bind mount sees it).
    fn set(&self, lines: &str) {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&self.file).unwrap();
        f.write_all(format!("127.0.0.1 localhost\n{lines}\n").as_bytes()).unwrap();
    }

    fn spawn(&self, config: &str) -> GatewayProcess {
        let script = format!("mount --bind {} /etc/hosts && exec \"$0\" \"$@\"", self.file.display());
        GatewayProcess::spawn_under(&["unshare", "-rm", "sh", "-c", &script], config, &[], &[])
    }
}

/// Two mocks on the same port, at 127.0.0.1 and 127.0.0.2.
fn twin_mocks() -> (MockBackend, MockBackend) {
    loop {
        let a = mock();
        if let Ok(b) = MockBackend::start(&format!("127.0.0.2:{}", a.addr().port()), Options::default()) {
            return (a, b);
        }
    }
}

#[test]
fn a_changed_address_is_applied_like_a_route_change() {
    let (a, b) = twin_mocks();
    let Some(hosts) = Hosts::new("127.0.0.1 backend.gw-test") else { return };
    let name = format!("backend.gw-test:{}", a.addr().port());
    let routes = format!(
        "[[routes]]\nserver_type = 10\nstrategy = \"round_robin\"\nendpoints = [\"{name}\"]\non_backend_loss = \"rebind\"\n"
    );
    let gw = hosts.spawn(&config_text(1, "[backend]\nresolve_interval = \"1s\"\n", &routes));
    wait_lands(gw.addr, 10, 1, &[&a, &b], 0, Duration::from_secs(3));
    let mut live = Client::connect(gw.addr);
    live.send(1, sid(1, 10, 0), b"bound");
    live.recv();
    let t0 = Instant::now();
    hosts.set("127.0.0.2 backend.gw-test");
    let released = a.wait_for(Duration::from_secs(4), |e| matches!(e, Event::Disconnect { reason: 8, .. }));
    assert!(released.is_some(), "the bound session is released like on a route change");
    eprintln!("address change applied after {:?}", t0.elapsed());
    wait_lands(gw.addr, 10, 1, &[&a, &b], 1, Duration::from_secs(2));
    assert!(gw.stderr().contains("endpoint address changed"), "{}", gw.stderr());
    let s = status(&gw);
    assert_eq!(s["discovery"]["address_changes"], 1, "{s:#}");
    let metrics = http_get(gw.admin, "/metrics").1;
    assert!(metrics.contains(&format!("backend=\"{name}\"")), "metrics keep the name as written");
    // The session keeps working on the new address (rebind on its next frame).
    live.echo(2, sid(1, 10, 0), b"after");
}

#[test]
fn a_name_that_does_not_resolve_yet_joins_its_rule_when_it_does() {
    let (a, _b) = twin_mocks();
    let Some(hosts) = Hosts::new("") else { return };
    let redis = RedisServer::start();
    let name = format!("later.gw-test:{}", a.addr().port());
    redis.set_rules(&format!(r#"[{{"server_type": 10, "strategy": "round_robin", "endpoints": ["{name}"]}}]"#));
    let gw = hosts.spawn(&config_text(
        1,
        &format!(
            "[backend]\nresolve_interval = \"1s\"\n\n[redis]\nurl = \"{}\"\nrefresh_interval = \"60s\"\n",
            redis.url()
        ),
        "",
    ));
    eventually("loaded with a warning", || gw.stderr().contains("left out until it resolves"));
    assert_eq!(lands_on(gw.addr, 10, 1, &[&a]), None, "no endpoint yet");
    assert_eq!(status(&gw)["discovery"]["unresolved"][0], name.as_str());
    assert_eq!(metric(&gw, "game_gateway_route_snapshots_rejected_total"), 0.0, "not a rejection");
    hosts.set("127.0.0.1 later.gw-test");
    wait_lands(gw.addr, 10, 1, &[&a], 0, Duration::from_secs(4));
    assert!(gw.stderr().contains("endpoint name resolves now"));
    assert_eq!(status(&gw)["discovery"]["unresolved"].as_array().unwrap().len(), 0);
}

#[test]
fn a_dial_failure_looks_the_name_up_again() {
    let (a, b) = twin_mocks();
    let Some(hosts) = Hosts::new("127.0.0.1 moving.gw-test") else { return };
    let routes = format!(
        "[[routes]]\nserver_type = 10\nstrategy = \"round_robin\"\nendpoints = [\"moving.gw-test:{}\"]\non_backend_loss = \"rebind\"\n",
        a.addr().port()
    );
    // No periodic lookups: only the dial failure can trigger one.
    let gw = hosts.spawn(&config_text(
        1,
        "[backend]\nresolve_interval = \"0s\"\nreconnect_backoff_min = \"50ms\"\n",
        &routes,
    ));
    wait_lands(gw.addr, 10, 1, &[&a, &b], 0, Duration::from_secs(3));
    hosts.set("127.0.0.2 moving.gw-test");
    a.kill();
    let took = wait_lands(gw.addr, 10, 1, &[&a, &b], 1, Duration::from_secs(12));
    eprintln!("dial failure -> new address after {took:?}");
    assert_eq!(status(&gw)["discovery"]["address_changes"], 1);
}
