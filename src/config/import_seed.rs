//! `game-gateway config import-seed FILE`: the Go gateway's `config.yaml`
//! as a commented TOML config for this gateway.
//!
//! Every key the Go gateway reads is accounted for: mapped onto one of our
//! keys (a comment above it names the source key and value), or listed in
//! the closing comment block with the reason it is not carried over. The Go
//! gateway applied its default to every key left absent or at zero, so the
//! import does too: the output behaves like the Go gateway did with that
//! file, not like our defaults. Keys the Go gateway does not know are listed
//! as such (it ignored them).
//!
//! Only a file that cannot be read as YAML (or whose top level is not a
//! mapping) is an error. A value of the wrong type or out of the Go
//! gateway's range, which the Go gateway would have refused at start, is
//! reported as a problem (in the output and on stderr) and its default used.

use super::Config;
use std::fmt::Write as _;
use yaml_rust2::{Yaml, YamlLoader};

/// What the command line adds.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Admin bearer token file. With it the admin port listens on every
    /// address, as the Go gateway's health port did (our admin port needs a
    /// token off loopback); without it, on loopback only.
    pub admin_token_file: Option<String>,
}

/// The import's result.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The TOML config, with its comments.
    pub toml: String,
    /// Problems in the input (also written into `toml` as comments).
    pub problems: Vec<String>,
    /// Every Go key, and whether it was mapped (`true`) or listed as not
    /// carried over (`false`).
    pub keys: Vec<(&'static str, bool)>,
}

/// Type of a Go config value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    /// A Go duration: a string like "1m30s", or an integer of nanoseconds.
    Duration,
}

/// Every key of the Go gateway's config, with its type and the default its
/// code applies to an absent or zero value.
const GO_KEYS: &[(&str, Kind, &str)] = &[
    ("server.listen_addr", Kind::Str, ":8080"),
    ("server.health_check_port", Kind::Int, "9090"),
    ("server.metrics_port", Kind::Int, "9091"),
    ("server.gateway_name", Kind::Str, ""),
    ("server.use_grpc", Kind::Bool, "false"),
    ("redis.addr", Kind::Str, "localhost:6379"),
    ("redis.password", Kind::Str, ""),
    ("redis.db", Kind::Int, "0"),
    ("redis.key_prefix", Kind::Str, "game-gateway:"),
    ("redis.pool_size", Kind::Int, "10"),
    ("redis.min_idle_conns", Kind::Int, "5"),
    ("redis.dial_timeout", Kind::Duration, "5s"),
    ("redis.read_timeout", Kind::Duration, "3s"),
    ("redis.write_timeout", Kind::Duration, "3s"),
    ("backend.account_service", Kind::Str, ""),
    ("backend.version_service", Kind::Str, ""),
    ("backend.game_service", Kind::Str, ""),
    ("consul.enabled", Kind::Bool, "false"),
    ("consul.service_name", Kind::Str, ""),
    ("consul.namespace", Kind::Str, ""),
    ("consul.refresh_interval", Kind::Duration, "10s"),
    ("routing.refresh_interval", Kind::Duration, "10s"),
    ("routing.realm_refresh_interval", Kind::Duration, "5s"),
    ("connection_pool.max_connections", Kind::Int, "1000"),
    ("connection_pool.max_connections_per_service", Kind::Int, "100"),
    ("connection_pool.idle_timeout", Kind::Duration, "5m"),
    ("connection_pool.dial_timeout", Kind::Duration, "5s"),
    ("connection_pool.read_timeout", Kind::Duration, "30s"),
    ("connection_pool.write_timeout", Kind::Duration, "30s"),
    ("connection_pool.max_retries", Kind::Int, "3"),
    ("connection_pool.retry_delay", Kind::Duration, "100ms"),
    ("connection_pool.max_goroutines", Kind::Int, "0"),
    ("connection_pool.goroutine_expiry", Kind::Duration, "10s"),
    ("connection_pool.connection_queue_size", Kind::Int, "1000"),
    ("grpc.heartbeat_interval", Kind::Duration, "30s"),
    ("grpc.connection_timeout", Kind::Duration, "10s"),
    ("grpc.reconnect_interval", Kind::Duration, "5s"),
    ("grpc.max_reconnect_attempts", Kind::Int, "0"),
    ("security.max_message_size", Kind::Int, "1048576"),
    ("security.max_connections_per_ip", Kind::Int, "10"),
    ("security.connection_rate_limit", Kind::Int, "5"),
    ("tracing.enable_trace_propagation", Kind::Bool, "false"),
    ("graceful_shutdown_timeout", Kind::Duration, "30s"),
];

/// Every key of the Go gateway's config.
pub fn go_keys() -> impl Iterator<Item = &'static str> {
    GO_KEYS.iter().map(|k| k.0)
}

/// A Go config value after the Go gateway's defaults.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    /// Nanoseconds.
    Duration(i128),
}

impl Value {
    fn str(&self) -> &str {
        match self {
            Value::Str(s) => s,
            _ => "",
        }
    }
    fn int(&self) -> i64 {
        match self {
            Value::Int(i) => *i,
            _ => 0,
        }
    }
    fn bool(&self) -> bool {
        matches!(self, Value::Bool(true))
    }
    fn ns(&self) -> i128 {
        match self {
            Value::Duration(d) => *d,
            _ => 0,
        }
    }
}

/// One Go key as read: its effective value and how the file gave it.
struct Read {
    value: Value,
    /// The value as written (YAML), or `absent`.
    written: String,
    /// Whether the Go gateway's default replaced an absent or zero value.
    defaulted: bool,
}

/// Parses a Go duration ("300ms", "1m30s", "1.5h", "0"); nanoseconds.
pub(crate) fn parse_go_duration(s: &str) -> Option<i128> {
    let s = s.trim();
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return None;
        }
        let n: f64 = num.parse().ok()?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    let ns = total.round() as i128;
    Some(if neg { -ns } else { ns })
}

/// A duration in our syntax (an integer and ms, s, m or h): the largest
/// exact unit; below a millisecond, rounded up to whole milliseconds.
/// Returns the text and whether it was rounded.
fn our_duration(ns: i128) -> (String, bool) {
    const MS: i128 = 1_000_000;
    for (unit, size) in [("h", 3600 * 1000 * MS), ("m", 60 * 1000 * MS), ("s", 1000 * MS), ("ms", MS)] {
        if ns > 0 && ns % size == 0 {
            return (format!("{}{unit}", ns / size), false);
        }
    }
    (format!("{}ms", ((ns + MS - 1) / MS).max(1)), true)
}

/// A YAML scalar as written, for comments.
fn written(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => format!("{s:?}"),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Null => "null".into(),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        Yaml::Alias(_) | Yaml::BadValue => "an unreadable value".into(),
    }
}

fn key_text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        other => written(other),
    }
}

/// Every leaf of the document as (dotted path, value), in file order.
fn leaves<'a>(prefix: &str, y: &'a Yaml, out: &mut Vec<(String, &'a Yaml)>) {
    match y {
        Yaml::Hash(h) if !h.is_empty() => {
            for (k, v) in h {
                let path = if prefix.is_empty() { key_text(k) } else { format!("{prefix}.{}", key_text(k)) };
                // A section the Go gateway knows is walked into; a key it
                // knows is a leaf even when its value is a mapping (a type
                // error reported there).
                if GO_KEYS.iter().any(|g| g.0 == path) {
                    out.push((path, v));
                } else {
                    leaves(&path, v, out);
                }
            }
        }
        // An empty section of the Go gateway's is no key at all.
        Yaml::Null | Yaml::Hash(_) if GO_KEYS.iter().any(|g| g.0.starts_with(&format!("{prefix}."))) => {}
        _ if !prefix.is_empty() => out.push((prefix.to_string(), y)),
        _ => {}
    }
}

/// Reads one Go key: its value, or the Go default when absent or zero.
fn read_key(key: &str, kind: Kind, default: &str, y: Option<&Yaml>, problems: &mut Vec<String>) -> Read {
    let default_value = || match kind {
        Kind::Str => Value::Str(default.into()),
        Kind::Int => Value::Int(default.parse().unwrap_or(0)),
        Kind::Bool => Value::Bool(default == "true"),
        Kind::Duration => Value::Duration(parse_go_duration(default).unwrap_or(0)),
    };
    let Some(y) = y.filter(|y| !matches!(y, Yaml::Null)) else {
        return Read { value: default_value(), written: "absent".into(), defaulted: true };
    };
    let parsed = match (kind, y) {
        (Kind::Str, Yaml::String(s)) => Some(Value::Str(s.clone())),
        // YAML reads `8080` as a number; a Go string field takes it as text.
        (Kind::Str, Yaml::Integer(i)) => Some(Value::Str(i.to_string())),
        (Kind::Int, Yaml::Integer(i)) => Some(Value::Int(*i)),
        (Kind::Bool, Yaml::Boolean(b)) => Some(Value::Bool(*b)),
        (Kind::Duration, Yaml::String(s)) => parse_go_duration(s).map(Value::Duration),
        // An integer is nanoseconds, as Go's YAML decoder reads it.
        (Kind::Duration, Yaml::Integer(i)) => Some(Value::Duration(*i as i128)),
        _ => None,
    };
    let what = written(y);
    match parsed {
        None => {
            let want = match kind {
                Kind::Str => "a string",
                Kind::Int => "an integer",
                Kind::Bool => "true or false",
                Kind::Duration => "a Go duration such as \"5s\" or \"1m30s\"",
            };
            problems.push(format!(
                "{key}: {what} is not {want} (the Go gateway refuses this file); its default {default:?} is used"
            ));
            Read { value: default_value(), written: what, defaulted: true }
        }
        Some(v) => {
            let negative = matches!(v, Value::Int(i) if i < 0) || matches!(v, Value::Duration(d) if d < 0);
            if negative {
                problems.push(format!("{key}: {what} is negative; its default {default:?} is used"));
                return Read { value: default_value(), written: what, defaulted: true };
            }
            let zero = matches!(&v, Value::Str(s) if s.is_empty())
                || matches!(v, Value::Int(0) | Value::Duration(0) | Value::Bool(false));
            if zero {
                Read { value: default_value(), written: what, defaulted: true }
            } else {
                Read { value: v, written: what, defaulted: false }
            }
        }
    }
}

/// Builds the output: sections of `key = value` lines with comments, and
/// the blocks of keys that are not carried over.
struct Out {
    sections: Vec<(&'static str, Vec<String>)>,
    not_carried: Vec<String>,
    keys: Vec<(&'static str, bool)>,
}

impl Out {
    fn section(&mut self, name: &'static str) -> &mut Vec<String> {
        if !self.sections.iter().any(|(n, _)| *n == name) {
            self.sections.push((name, Vec::new()));
        }
        &mut self.sections.iter_mut().find(|(n, _)| *n == name).unwrap().1
    }

    /// `key = value` in `[section]`, with a comment naming the source.
    fn set(&mut self, section: &'static str, key: &str, value: String, comment: String) {
        let lines = self.section(section);
        for c in comment.lines() {
            lines.push(format!("# {c}"));
        }
        lines.push(format!("{key} = {value}"));
    }

    fn mapped(&mut self, go_key: &'static str) {
        self.keys.push((go_key, true));
    }

    fn not_carried(&mut self, go_key: &'static str, written: &str, reason: &str) {
        self.keys.push((go_key, false));
        self.not_carried.push(format!("{go_key} = {written}: {reason}"));
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `from KEY = VALUE` (with the Go default noted when it applied).
fn from(key: &str, r: &Read, shown: &str) -> String {
    // A zero value whose default is zero needs no note.
    let zero_default = matches!(shown, "0" | "" | "false");
    if r.defaulted && (r.written == "absent" || !zero_default) {
        format!("from {key} = {} (the Go gateway's default: {shown})", r.written)
    } else {
        format!("from {key} = {}", r.written)
    }
}

/// An address to listen on from a Go listen address (`:8080`,
/// `0.0.0.0:8080`, `localhost:8080`, `[::]:8080`).
fn listen_addr(go: &str) -> Option<String> {
    let (host, port) = go.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = match host {
        "" => [0, 0, 0, 0].into(),
        "localhost" => [127, 0, 0, 1].into(),
        h => h.parse().ok()?,
    };
    Some(std::net::SocketAddr::new(ip, port).to_string())
}

/// Percent-encodes the userinfo part of a URL.
fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Imports the Go gateway's config text; `source` names it in the output.
/// `Err` only when the text is not YAML or its top level is not a mapping.
pub fn import_seed(text: &str, source: &str, opts: &ImportOptions) -> Result<Imported, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("{source}: not YAML: {e}"))?;
    let root = docs.into_iter().next().unwrap_or(Yaml::Null);
    if !matches!(root, Yaml::Hash(_) | Yaml::Null) {
        return Err(format!("{source}: the top level is {}, not a mapping of config keys", written(&root)));
    }
    let mut all = Vec::new();
    leaves("", &root, &mut all);
    let mut problems = Vec::new();
    let mut read = std::collections::HashMap::new();
    for (key, kind, default) in GO_KEYS {
        let y = all.iter().find(|(k, _)| k == key).map(|(_, y)| *y);
        read.insert(*key, read_key(key, *kind, default, y, &mut problems));
    }
    let r = |k: &str| &read[k];
    let mut out = Out { sections: Vec::new(), not_carried: Vec::new(), keys: Vec::new() };
    let dur = |ns: i128| our_duration(ns).0;
    let rounded = |ns: i128| if our_duration(ns).1 { " (rounded up to whole milliseconds)" } else { "" };

    // --- [server] ---------------------------------------------------------
    let k = "server.listen_addr";
    let listen = r(k).value.str().to_string();
    match listen_addr(&listen) {
        Some(addr) => {
            let note = if listen.starts_with(':') {
                "\nGo's \":port\" is every address; \"[::]:PORT\" takes IPv6 clients too"
            } else {
                ""
            };
            out.set("server", "listen", toml_str(&addr), format!("{}{note}", from(k, r(k), ":8080")));
            out.mapped(k);
        }
        None => out.not_carried(
            k,
            &r(k).written,
            "not an ip:port address (host names are not accepted here); server.listen keeps 0.0.0.0:8080",
        ),
    }
    let k = "server.health_check_port";
    let mut port = r(k).value.int();
    if !(1..=65535).contains(&port) {
        problems.push(format!("{k}: {port} is not a port 1..65535 (the Go gateway refuses this file); 9090 is used"));
        port = 9090;
    }
    match &opts.admin_token_file {
        Some(file) => {
            out.set(
                "server",
                "admin_listen",
                toml_str(&format!("0.0.0.0:{port}")),
                format!(
                    "{}\n/health, /ready and /metrics as on the Go gateway's health port (plus /status, POST /drain)\nevery address, as the Go gateway's; that needs [admin] token_file below",
                    from(k, r(k), "9090")
                ),
            );
            out.set(
                "admin",
                "token_file",
                toml_str(file),
                "given by --admin-token-file: POST /drain needs `Authorization: Bearer <token>`".into(),
            );
        }
        None => out.set(
            "server",
            "admin_listen",
            toml_str(&format!("127.0.0.1:{port}")),
            format!(
                "{}\n/health, /ready and /metrics as on the Go gateway's health port (plus /status, POST /drain).\nThe Go gateway listened on every address; here that needs a bearer token file:\nfor Prometheus or kubelet probes from outside the pod, import again with\n--admin-token-file PATH (admin_listen = \"0.0.0.0:{port}\" and [admin] token_file)",
                from(k, r(k), "9090")
            ),
        ),
    }
    out.mapped(k);
    let k = "graceful_shutdown_timeout";
    let ns = r(k).value.ns();
    out.set(
        "server",
        "drain_timeout",
        toml_str(&dur(ns)),
        format!(
            "{}{}\nhow long sessions may end by themselves after SIGTERM before the rest are closed",
            from(k, r(k), "30s"),
            rounded(ns)
        ),
    );
    out.mapped(k);

    // --- [limits] ---------------------------------------------------------
    let k = "connection_pool.max_connections";
    out.set(
        "limits",
        "max_connections",
        r(k).value.int().to_string(),
        format!("{}\nopen client connections on the node", from(k, r(k), "1000")),
    );
    out.mapped(k);
    let k = "security.max_connections_per_ip";
    out.set(
        "limits",
        "max_connections_per_ip",
        r(k).value.int().min(u32::MAX as i64).to_string(),
        format!("{}\nopen connections per client IP", from(k, r(k), "10")),
    );
    out.mapped(k);
    let k = "security.connection_rate_limit";
    out.set(
        "limits",
        "connection_rate_per_ip",
        r(k).value.int().min(u32::MAX as i64).to_string(),
        format!(
            "{}\nnew connections per second per client IP (a token bucket here, a sliding 1 s window there)",
            from(k, r(k), "5")
        ),
    );
    out.mapped(k);
    let k = "security.max_message_size";
    let size = r(k).value.int();
    out.set(
        "limits",
        "max_message_size",
        size.min(65_535).to_string(),
        format!(
            "{}{}",
            from(k, r(k), "1048576"),
            if size > 65_535 {
                "\nthe client frame's length field is 16-bit, so 65535 is the same limit (as it was in the Go gateway)"
            } else {
                ""
            }
        ),
    );
    out.set(
        "websocket",
        "max_message_size",
        size.clamp(16, 16 << 20).to_string(),
        format!("{}\nthe Go gateway applied it to WebSocket frame payloads too", from(k, r(k), "1048576")),
    );
    out.mapped(k);

    // --- [backend] --------------------------------------------------------
    let k = "connection_pool.dial_timeout";
    let ns = r(k).value.ns();
    out.set("backend", "dial_timeout", toml_str(&dur(ns)), format!("{}{}", from(k, r(k), "5s"), rounded(ns)));
    out.mapped(k);
    let k = "connection_pool.max_connections_per_service";
    out.set(
        "backend",
        "seed_pool_max",
        r(k).value.int().clamp(1, 100_000).to_string(),
        format!(
            "{}\nseed_tcp connections per endpoint, but per worker here (per process there):\nlower it, or pin server.workers, if the servers limit connections",
            from(k, r(k), "100")
        ),
    );
    out.mapped(k);
    let k = "connection_pool.idle_timeout";
    let ns = r(k).value.ns();
    out.set("backend", "seed_idle_timeout", toml_str(&dur(ns)), format!("{}{}", from(k, r(k), "5m"), rounded(ns)));
    out.mapped(k);
    let k = "connection_pool.retry_delay";
    let min_ns = r(k).value.ns();
    out.set(
        "backend",
        "reconnect_backoff_min",
        toml_str(&dur(min_ns)),
        format!(
            "{}{}\nthe wait before a redial, doubling per failure (the Go gateway's retries doubled from it too)",
            from(k, r(k), "100ms"),
            rounded(min_ns)
        ),
    );
    out.mapped(k);
    let k = "grpc.reconnect_interval";
    let max_ns = (r(k).value.ns() * 10).max(our_duration_ns(min_ns));
    out.set(
        "backend",
        "reconnect_backoff_max",
        toml_str(&dur(max_ns)),
        format!(
            "{}{}\nthe Go gateway capped its gRPC reconnect backoff at 10 x this",
            from(k, r(k), "5s"),
            rounded(max_ns)
        ),
    );
    out.mapped(k);
    let k = "grpc.heartbeat_interval";
    let ns = r(k).value.ns();
    out.set(
        "backend",
        "keepalive_interval",
        toml_str(&dur(ns)),
        format!(
            "{}{}\nHTTP/2 PING interval on grpc routes (PING frames on gate routes)",
            from(k, r(k), "30s"),
            rounded(ns)
        ),
    );
    out.set(
        "backend",
        "keepalive_timeout",
        toml_str(&dur(ns / 2)),
        format!("{}\nthe Go gateway waited half the interval for the PING's answer", from(k, r(k), "30s")),
    );
    out.mapped(k);

    // --- [redis] ----------------------------------------------------------
    let (addr, pass, db) = (r("redis.addr").value.str(), r("redis.password").value.str(), r("redis.db").value.int());
    let auth = if pass.is_empty() { String::new() } else { format!(":{}@", url_escape(pass)) };
    let url = format!("redis://{auth}{addr}/{db}");
    out.set(
        "redis",
        "url",
        toml_str(&url),
        format!(
            "{}\n{}\n{}{}",
            from("redis.addr", r("redis.addr"), "localhost:6379"),
            if pass.is_empty() {
                "from redis.password = \"\" (no AUTH)".to_string()
            } else {
                "from redis.password = (set; it is in the URL, as plain as it was in the YAML file)".to_string()
            },
            from("redis.db", r("redis.db"), "0"),
            "\nthe same keys as the Go gateway: {prefix}routing:rules and {prefix}realm:mapping"
        ),
    );
    for k in ["redis.addr", "redis.password", "redis.db"] {
        out.mapped(k);
    }
    let k = "redis.key_prefix";
    out.set("redis", "key_prefix", toml_str(r(k).value.str()), from(k, r(k), "game-gateway:"));
    out.mapped(k);
    let k = "routing.refresh_interval";
    let ns = r(k).value.ns();
    out.set(
        "redis",
        "refresh_interval",
        toml_str(&dur(ns)),
        format!(
            "{}{}\nthe periodic re-read; the :notify channels also reload at once here",
            from(k, r(k), "10s"),
            rounded(ns)
        ),
    );
    out.mapped(k);

    // --- [log] ------------------------------------------------------------
    out.set(
        "log",
        "format",
        toml_str("otel"),
        "the Go gateway's log schema (it had no key for it): timestamp in epoch ns, severity_text,\nseverity_number, body, caller, service.name / service.namespace (POD_NAMESPACE) / service.version".into(),
    );
    out.set(
        "log",
        "service_name",
        toml_str(super::raw::DEFAULT_SERVICE_NAME),
        "the Go gateway's fixed service.name (OTEL_SERVICE_NAME overrides it)".into(),
    );

    // --- per rule ---------------------------------------------------------
    let grpc = r("server.use_grpc").value.bool();
    let trace = r("tracing.enable_trace_propagation").value.bool();
    out.keys.push(("server.use_grpc", true));
    out.keys.push(("tracing.enable_trace_propagation", true));
    let rule_block = format!(
        "Route rules: the Go gateway kept them in Redis ({{prefix}}routing:rules), and so does this gateway,\n\
         but two Go settings are per rule here. Add to every rule (ROUTING.md, BACKENDS.md section 6):\n\
         \x20 from server.use_grpc = {}:\n\
         \x20   \"backend_protocol\": \"{}\", \"binding\": \"connection\"\n\
         \x20 from tracing.enable_trace_propagation = {}:\n\
         \x20   \"trace_propagation\": {}\n\
         Rules without them are `gate` rules: the Go gateway's servers do not speak that.\n\
         Check a rules file with `game-gateway routes check FILE`, then `routes push FILE --redis URL`.",
        r("server.use_grpc").written,
        if grpc { "grpc" } else { "seed_tcp" },
        r("tracing.enable_trace_propagation").written,
        trace
    );

    // --- not carried over ---------------------------------------------------
    let w = |k: &str| read[k].written.clone();
    out.not_carried(
        "server.metrics_port",
        &w("server.metrics_port"),
        "nothing listened on it in the Go gateway; /metrics is on server.admin_listen, as it was on the health port",
    );
    let name = r("server.gateway_name").value.str().to_string();
    out.not_carried(
        "server.gateway_name",
        &w("server.gateway_name"),
        &if name.is_empty() {
            "the gRPC gateway-name is POD_NAME, else the host name, as the Go gateway's fallback (plus -<worker>)".to_string()
        } else {
            format!("no key here: the gRPC gateway-name is POD_NAME, else the host name (plus -<worker>); set POD_NAME={name:?} to keep it")
        },
    );
    for k in ["redis.pool_size", "redis.min_idle_conns"] {
        out.not_carried(
            k,
            &w(k),
            "no pool: the control thread keeps one Redis connection, plus one for the notify channels",
        );
    }
    for k in ["redis.dial_timeout", "redis.read_timeout", "redis.write_timeout"] {
        out.not_carried(k, &w(k), "fixed at 2 s here (connect, read and write)");
    }
    for k in ["backend.account_service", "backend.version_service", "backend.game_service"] {
        out.not_carried(k, &w(k), "never read by the Go gateway; endpoints come from the route rules");
    }
    let consul = r("consul.enabled").value.bool();
    for k in ["consul.enabled", "consul.service_name", "consul.namespace", "consul.refresh_interval"] {
        let reason = if consul {
            "Consul discovery is not in this build: list each world's endpoints in its Redis rules (or [[routes]])"
        } else {
            "Consul discovery was off; it is not in this build"
        };
        out.not_carried(k, &w(k), reason);
    }
    out.not_carried(
        "routing.realm_refresh_interval",
        &w("routing.realm_refresh_interval"),
        "never used by the Go gateway; the realm mapping is read with the rules, every redis.refresh_interval",
    );
    out.not_carried(
        "connection_pool.read_timeout",
        &w("connection_pool.read_timeout"),
        "no per-frame read deadline towards backends: a dead gate or grpc connection is found by keep-alive (backend.keepalive_*), a seed_tcp one when its socket fails",
    );
    out.not_carried(
        "connection_pool.write_timeout",
        &w("connection_pool.write_timeout"),
        "no write deadline: a client that does not read is closed once limits.max_queued_bytes_per_session wait for it; backend queues are bounded by backend.max_queued_bytes",
    );
    out.not_carried(
        "connection_pool.max_retries",
        &w("connection_pool.max_retries"),
        "no attempt count: a failed dial backs off (backend.reconnect_backoff_*) and the circuit opens after backend.circuit_failure_threshold failures in a row",
    );
    for k in
        ["connection_pool.max_goroutines", "connection_pool.goroutine_expiry", "connection_pool.connection_queue_size"]
    {
        out.not_carried(
            k,
            &w(k),
            "no worker pool or accept queue: each worker thread (server.workers, one per CPU) serves all its connections; limits.max_connections is the ceiling",
        );
    }
    out.not_carried(
        "grpc.connection_timeout",
        &w("grpc.connection_timeout"),
        "never used by the Go gateway; backend.dial_timeout bounds a gRPC dial here",
    );
    out.not_carried(
        "grpc.max_reconnect_attempts",
        &w("grpc.max_reconnect_attempts"),
        "the Go gateway never gave up in effect; this gateway redials without a limit too",
    );
    let unknown: Vec<String> = all
        .iter()
        .filter(|(k, _)| !GO_KEYS.iter().any(|g| g.0 == k))
        .map(|(k, y)| format!("{k} = {}: not a Go gateway key (it ignored it)", written(y)))
        .collect();

    // --- the text ---------------------------------------------------------
    let mut t = String::new();
    let _ = writeln!(t, "# game-gateway config imported from the Go gateway's {source}");
    let _ = writeln!(t, "# by `game-gateway config import-seed`. Every key of the Go gateway's config is below:");
    let _ = writeln!(t, "# mapped (the comment above a key names its source) or, at the end, listed with the");
    let _ = writeln!(t, "# reason it is not carried over. Absent or zero keys got the Go gateway's defaults, as");
    let _ = writeln!(t, "# they did there. Check it with: game-gateway --config FILE --check-config");
    let _ = writeln!(t, "# Environment: POD_NAME, POD_NAMESPACE and LOG_LEVEL are read as the Go gateway read them;");
    let _ = writeln!(t, "# NODE_IP (Consul) and OTEL_EXPORTER_OTLP_ENDPOINT (trace export) are not used.");
    if !problems.is_empty() {
        let _ = writeln!(t, "#\n# Problems in {source}:");
        for p in &problems {
            let _ = writeln!(t, "#   {p}");
        }
    }
    for (name, lines) in &out.sections {
        let _ = writeln!(t, "\n[{name}]");
        for l in lines {
            let _ = writeln!(t, "{l}");
        }
    }
    let _ = writeln!(t);
    for l in rule_block.lines() {
        let _ = writeln!(t, "# {l}");
    }
    let _ = writeln!(t, "\n# Not carried over:");
    for l in &out.not_carried {
        let _ = writeln!(t, "#   {l}");
    }
    if !unknown.is_empty() {
        let _ = writeln!(t, "\n# Not Go gateway keys:");
        for l in &unknown {
            let _ = writeln!(t, "#   {l}");
        }
    }
    Ok(Imported { toml: t, problems, keys: out.keys })
}

/// `ns` as the duration [`our_duration`] writes (rounded up to ms).
fn our_duration_ns(ns: i128) -> i128 {
    let (text, _) = our_duration(ns);
    super::validate::parse_duration(&text).map(|d| d.as_nanos() as i128).unwrap_or(ns)
}

/// Whether `toml` is a valid config here (problems as text).
pub fn check(toml: &str) -> Result<(), String> {
    Config::from_str(toml, "<imported>").map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("100ms"), Some(100_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_go_duration("300us"), Some(300_000));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("-5s"), Some(-5_000_000_000));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5 s"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn our_durations_pick_the_largest_exact_unit() {
        let d = |s: &str| our_duration(parse_go_duration(s).unwrap());
        assert_eq!(d("1h"), ("1h".into(), false));
        assert_eq!(d("90s"), ("90s".into(), false));
        assert_eq!(d("2m"), ("2m".into(), false));
        assert_eq!(d("1.5s"), ("1500ms".into(), false));
        assert_eq!(d("300us"), ("1ms".into(), true));
        assert_eq!(d("1500us"), ("2ms".into(), true));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr(":8080").as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(listen_addr("localhost:8080").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(listen_addr("[::]:8080").as_deref(), Some("[::]:8080"));
        assert_eq!(listen_addr("10.1.2.3:80").as_deref(), Some("10.1.2.3:80"));
        assert_eq!(listen_addr("gw.example:80"), None);
        assert_eq!(listen_addr("8080"), None);
    }

    #[test]
    fn an_empty_file_is_the_go_defaults_and_valid() {
        let i = import_seed("", "empty.yaml", &ImportOptions::default()).unwrap();
        assert!(i.problems.is_empty(), "{:?}", i.problems);
        check(&i.toml).unwrap_or_else(|e| panic!("{e}\n{}", i.toml));
        let c = Config::from_str(&i.toml, "x").unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(
            (c.limits.max_connections, c.limits.max_connections_per_ip, c.limits.connection_rate_per_ip),
            (1000, 10, 5)
        );
        assert_eq!(c.redis.as_ref().unwrap().url, "redis://localhost:6379/0");
        assert_eq!(c.backend.keepalive_timeout, std::time::Duration::from_secs(15));
        assert_eq!(c.backend.reconnect_backoff_max, std::time::Duration::from_secs(50));
        assert_eq!(i.keys.len(), GO_KEYS.len());
    }

    #[test]
    fn wrong_types_and_ranges_are_problems_with_defaults() {
        let y = "server:\n  health_check_port: 70000\n  listen_addr: gw.example:8080\nredis:\n  db: two\n  password: \"p@ss word\"\nconnection_pool:\n  dial_timeout: 5\n  retry_delay: -1s\nsecurity:\n  max_message_size: [1]\nextra:\n  thing: 1\n";
        let i = import_seed(y, "bad.yaml", &ImportOptions::default()).unwrap();
        let p = i.problems.join("\n");
        assert!(p.contains("server.health_check_port: 70000 is not a port"), "{p}");
        assert!(p.contains("redis.db: \"two\" is not an integer"), "{p}");
        assert!(p.contains("connection_pool.retry_delay: \"-1s\" is negative"), "{p}");
        assert!(p.contains("security.max_message_size: a list is not an integer"), "{p}");
        assert_eq!(i.problems.len(), 4, "{p}");
        assert!(i.toml.contains("extra.thing = 1: not a Go gateway key"), "{}", i.toml);
        assert!(i.toml.contains("server.listen_addr = \"gw.example:8080\": not an ip:port"), "{}", i.toml);
        let c = Config::from_str(&i.toml, "x").unwrap_or_else(|e| panic!("{e}\n{}", i.toml));
        assert_eq!(c.redis.as_ref().unwrap().url, "redis://:p%40ss%20word@localhost:6379/0");
        // An integer duration is nanoseconds, as Go reads it: 5 ns, rounded up.
        assert_eq!(c.backend.dial_timeout, std::time::Duration::from_millis(1));
    }

    #[test]
    fn only_unreadable_yaml_is_an_error() {
        assert!(import_seed("server: [unclosed", "x.yaml", &ImportOptions::default()).is_err());
        assert!(import_seed("- a\n- b\n", "x.yaml", &ImportOptions::default()).is_err());
        let i = import_seed("server:\nredis: {}\n", "x.yaml", &ImportOptions::default()).unwrap();
        assert!(!i.toml.contains("not a Go gateway key"), "empty sections are no keys: {}", i.toml);
    }
}
