//! Configuration: one serde struct per TOML section, then validation.
//!
//! Data flow: file text -> [`raw`] (serde, unknown keys refused) ->
//! [`validate`] (one function per section, every problem collected and
//! located as `file:line: key: reason`) -> [`Config`] (checked, typed,
//! durations parsed). [`summary`] prints what a file resolves to for
//! `--check-config`. The process environment is read once, by `main`, into an
//! [`Environment`] that is passed in here. Each component is handed only its
//! own section.

mod error;
pub mod import_seed;
mod raw;
mod sections;
mod summary;
mod tls;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use raw::DEFAULT_KEY_PREFIX;
pub use sections::*;
pub use tls::{CertInfo, TlsConfig, TlsMode};
pub use validate::Environment;

use std::path::Path;

/// How often a config file caught mid-rewrite (changed during the read, or
/// empty) is read again before the load is refused, and the pause between.
const STABLE_READ_TRIES: u32 = 5;
const STABLE_READ_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Why a config file could not be read as one complete version.
enum Unstable {
    Io(std::io::Error),
    /// Its size or modification time moved during the read, or the bytes read
    /// do not match its size.
    Changing,
    /// Nothing but blank lines and comments.
    Empty,
}

/// Reads `path` as one complete version: its size and mtime the same before
/// and after the read, and not empty. A file being rewritten (truncated, then
/// written) is read again, up to [`STABLE_READ_TRIES`] times.
fn read_stable(path: &Path) -> Result<String, Unstable> {
    let mut why = Unstable::Changing;
    for attempt in 0..STABLE_READ_TRIES {
        if attempt > 0 {
            std::thread::sleep(STABLE_READ_PAUSE);
        }
        let before = std::fs::metadata(path).map_err(Unstable::Io)?;
        let src = std::fs::read_to_string(path).map_err(Unstable::Io)?;
        let after = std::fs::metadata(path).map_err(Unstable::Io)?;
        let changed = before.len() != after.len()
            || before.modified().ok() != after.modified().ok()
            || src.len() as u64 != after.len();
        let empty = !src.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if !changed && !empty {
            return Ok(src);
        }
        why = if changed { Unstable::Changing } else { Unstable::Empty };
    }
    Err(why)
}

/// The documented default config, compiled in so the gateway runs with no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/gateway.toml");
/// Where `--config` points when it is not given.
pub const DEFAULT_PATH: &str = "config/gateway.toml";

impl Config {
    /// Loads and validates `path`; the default path falls back to the embedded
    /// default when the file does not exist.
    pub fn load(path: &Path, env: &Environment) -> Result<Config, ConfigErrors> {
        let whole = |reason: String| {
            Err(ConfigErrors(vec![ConfigError { file: path.display().to_string(), line: 0, key: "-".into(), reason }]))
        };
        match read_stable(path) {
            Ok(src) => Config::from_str_env(&src, &path.display().to_string(), env),
            Err(Unstable::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) => {
                Config::from_str_env(EMBEDDED_DEFAULT, "<embedded>", env)
            }
            Err(Unstable::Io(e)) => whole(format!("cannot read: {e}")),
            Err(Unstable::Changing) => whole(format!(
                "the file changed while being read ({STABLE_READ_TRIES} tries): a writer is still at it; refused, not applied"
            )),
            Err(Unstable::Empty) => whole(
                "the file is empty (no key set): refused, as a file caught mid-rewrite would be (it would remove every \
                 route); to run on the defaults, set at least one key"
                    .into(),
            ),
        }
    }

    /// Parses and validates config text, ignoring the environment; `file`
    /// names it in errors.
    pub fn from_str(src: &str, file: &str) -> Result<Config, ConfigErrors> {
        Config::from_str_env(src, file, &Environment::default())
    }

    /// Parses and validates config text with the environment's overrides.
    pub fn from_str_env(src: &str, file: &str, env: &Environment) -> Result<Config, ConfigErrors> {
        let raw: raw::RawConfig = match toml::from_str(src) {
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
        let loc = validate::Locator::new(src);
        raw.validate(file, &loc, env)
    }

    /// Applies the command-line overrides (they win over the file).
    pub fn apply_overrides(&mut self, workers: Option<usize>, io_driver: Option<IoDriver>) {
        if let Some(w) = workers {
            let w = if w == 0 { self.server.cpu_budget.usable } else { w }.min(MAX_WORKERS);
            self.server.workers = w;
            if self.server.cpus.len() != w {
                self.server.cpus = self.server.cpu_budget.set.placement(w);
            }
        }
        if let Some(d) = io_driver {
            self.server.io_driver = d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::validate::{node_id_from_pod_name, parse_duration};
    use super::*;
    use crate::cpu::{CpuBudget, CpuSet};
    use std::time::Duration;

    /// Issue 24, 6: a file caught mid-rewrite (empty, or not the size it
    /// says) is refused with its reason, never parsed into a config.
    #[test]
    fn a_file_read_mid_rewrite_is_refused() {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = Environment::default();
        let empty = dir.join("empty.toml");
        for text in ["", "\n\n", "# only comments\n   # and blanks\n\n"] {
            std::fs::write(&empty, text).unwrap();
            let e = Config::load(&empty, &env).unwrap_err().to_string();
            assert!(e.contains("the file is empty"), "{text:?}: {e}");
        }
        // The bytes read never match the size the file reports (a procfs
        // file says 0): what a file being written looks like, every try.
        let e = Config::load(Path::new("/proc/self/status"), &env).unwrap_err().to_string();
        assert!(e.contains("changed while being read"), "{e}");
        let good = dir.join("good.toml");
        std::fs::write(&good, "[server]\nworkers = 1\n").unwrap();
        assert!(Config::load(&good, &env).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

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
    fn environment_overrides_and_is_checked() {
        let env = Environment {
            log_level: Some("debug".into()),
            pod_name: Some("gw-7".into()),
            cpus: None,
            ..Default::default()
        };
        let c = Config::from_str_env("[log]\nlevel = \"warn\"\n", "e.toml", &env).unwrap();
        assert_eq!((c.log.level.as_str(), c.server.node_id), ("debug", 7));
        let c = Config::from_str_env("[server]\nnode_id = 3\n", "e.toml", &env).unwrap();
        assert_eq!(c.server.node_id, 3, "an explicit node_id wins over POD_NAME");
        let bad = Environment { log_level: Some("loud".into()), pod_name: None, cpus: None, ..Default::default() };
        let errs = Config::from_str_env("", "e.toml", &bad).unwrap_err();
        assert!(errs.to_string().contains("log.level: \"loud\""), "{errs}");
        assert_eq!(Config::from_str("", "e.toml").unwrap().log.level, "info", "no environment, the file's default");
    }

    fn on_cpus(set: &[usize]) -> Environment {
        Environment { cpus: Some(CpuBudget::of_set(CpuSet::new(set.iter().copied()))), ..Default::default() }
    }

    #[test]
    fn workers_are_placed_on_the_cpus_of_the_process_mask() {
        let env = on_cpus(&[4, 5, 6, 7]);
        let c = Config::from_str_env("", "p.toml", &env).unwrap();
        assert_eq!((c.server.workers, c.server.cpus.clone()), (4, vec![4, 5, 6, 7]), "worker i on the i-th CPU");
        assert!(c.summary().contains("cpus=[4, 5, 6, 7] cpu_set=4-7 "), "{}", c.summary());
        let c = Config::from_str_env("[server]\nworkers = 2\n", "p.toml", &env).unwrap();
        assert_eq!(c.server.cpus, vec![4, 5]);
        let c = Config::from_str_env("[server]\nworkers = 6\n", "p.toml", &env).unwrap();
        assert_eq!(c.server.cpus, vec![4, 5, 6, 7, 4, 5], "more workers than CPUs wrap around");
        let c = Config::from_str_env("[server]\nworkers = 2\ncpus = [7, 6]\n", "p.toml", &env).unwrap();
        assert_eq!(c.server.cpus, vec![7, 6], "explicit CPU ids are kept as written");
        let c = Config::from_str_env("[server]\ncpus = [1]\n", "p.toml", &on_cpus(&[1])).unwrap();
        assert_eq!((c.server.workers, c.server.cpus), (1, vec![1]), "taskset -c 1 with cpus = [1]");
        // A CPU quota below the mask (a CPU limit on a shared pool) caps auto workers.
        let quota = Environment { cpus: Some(CpuBudget { set: CpuSet::new(0..8), usable: 3 }), ..Default::default() };
        let c = Config::from_str_env("", "p.toml", &quota).unwrap();
        assert_eq!((c.server.workers, c.server.cpus), (3, vec![0, 1, 2]));
    }

    #[test]
    fn cpus_outside_the_mask_are_refused_naming_the_mask() {
        let env = on_cpus(&[4, 5, 6, 7]);
        let errs = Config::from_str_env("[server]\nworkers = 2\ncpus = [3, 5, -1]\n", "m.toml", &env).unwrap_err();
        let text = errs.to_string();
        assert!(text.contains("m.toml:3: server.cpus: CPU 3 is not in this process's CPU set 4-7"), "{text}");
        assert!(text.contains("m.toml:3: server.cpus: -1 is not a CPU id"), "{text}");
        assert_eq!(errs.0.len(), 2, "{text}");
        let errs = Config::from_str_env("[server]\ncpus = [6, 7]\n", "m.toml", &env).unwrap_err();
        assert!(
            errs.to_string().contains(
                "server.cpus: lists 2 CPUs for 4 workers (workers = 0: one per CPU of this process's CPU set 4-7)"
            ),
            "{errs}"
        );
        let errs = Config::from_str_env("[server]\ncpus = [0]\n", "m.toml", &on_cpus(&[1])).unwrap_err();
        assert!(errs.to_string().contains("CPU 0 is not in this process's CPU set 1"), "{errs}");
    }

    #[test]
    fn the_workers_override_places_on_the_mask_too() {
        let env = on_cpus(&[2, 3, 8, 9]);
        let mut c = Config::from_str_env("", "o.toml", &env).unwrap();
        c.apply_overrides(Some(2), None);
        assert_eq!((c.server.workers, c.server.cpus.clone()), (2, vec![2, 3]));
        c.apply_overrides(Some(0), None);
        assert_eq!((c.server.workers, c.server.cpus), (4, vec![2, 3, 8, 9]));
    }

    #[test]
    fn admin_token_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("gw-admin-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "s3cret-token\n\n").unwrap();
        let src = |listen: &str, file: &std::path::Path| {
            format!("[server]\nadmin_listen = \"{listen}\"\n\n[admin]\ntoken_file = \"{}\"\n", file.display())
        };
        let c = Config::from_str(&src("0.0.0.0:9090", &token), "a.toml").unwrap();
        let t = c.admin.token.clone().expect("a token");
        assert!(t.matches(b"s3cret-token"), "trailing newlines trimmed");
        assert!(!format!("{c:?}").contains("s3cret"), "the token never prints");
        assert!(!c.summary().contains("s3cret") && c.summary().contains("12-byte token"), "{}", c.summary());
        // Unreadable, empty, or more than one word: config errors naming file, key and reason.
        let missing = dir.join("missing");
        let errs = Config::from_str(&src("127.0.0.1:9090", &missing), "a.toml").unwrap_err().to_string();
        assert!(errs.contains(&format!("a.toml:5: admin.token_file: {}: cannot read: ", missing.display())), "{errs}");
        std::fs::write(&token, " \n").unwrap();
        let errs = Config::from_str(&src("127.0.0.1:9090", &token), "a.toml").unwrap_err().to_string();
        assert!(errs.contains(&format!("a.toml:5: admin.token_file: {}: is empty", token.display())), "{errs}");
        std::fs::write(&token, "two words\n").unwrap();
        let errs = Config::from_str(&src("127.0.0.1:9090", &token), "a.toml").unwrap_err().to_string();
        assert!(errs.contains("admin.token_file:") && errs.contains("one line without spaces"), "{errs}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        for listen in ["0.0.0.0:9090", "10.0.0.5:9090", "[::]:9090"] {
            let errs = Config::from_str(&format!("[server]\nadmin_listen = \"{listen}\"\n"), "l.toml").unwrap_err();
            let text = errs.to_string();
            assert!(
                text.contains(&format!("l.toml:2: server.admin_listen: {listen} is not a loopback address and [admin] token_file is not set")),
                "{text}"
            );
        }
        for listen in ["127.0.0.1:9090", "127.0.0.2:0", "[::1]:9090"] {
            let c = Config::from_str(&format!("[server]\nadmin_listen = \"{listen}\"\n"), "l.toml").unwrap();
            assert!(c.admin.token.is_none());
        }
        // A bad address is reported once, not also as "not loopback".
        let errs = Config::from_str("[server]\nadmin_listen = \"nope\"\n", "l.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
    }

    #[test]
    fn consul_section() {
        let src = "[consul]\naddress = \"http://10.0.0.9:8500/\"\nnamespace = \"hgame\"\nwait = \"20s\"\n\n[consul.services]\n200 = \"game\"\n201 = \"game\"\n10 = \"account\"\n";
        let c = Config::from_str(src, "c.toml").unwrap();
        let k = c.consul.as_ref().unwrap();
        assert_eq!((k.address.as_str(), k.namespace.as_str(), k.wait.as_secs()), ("10.0.0.9:8500", "hgame", 20));
        assert_eq!(k.service_names(), vec!["account", "game"]);
        assert_eq!((k.datacenter.as_deref(), k.token.as_deref()), (None, None));
        assert!(c
            .summary()
            .contains("consul: address=http://10.0.0.9:8500 services=10=account,200=game,201=game namespace=hgame"));
        assert!(Config::from_str("", "c.toml").unwrap().consul.is_none());
        // The agent's address: explicit, else NODE_IP (as the Go gateway), else loopback.
        let minimal = "[consul]\nservices = { 200 = \"game\" }\n";
        let env = Environment { node_ip: Some("10.1.2.3".into()), ..Default::default() };
        assert_eq!(Config::from_str_env(minimal, "c.toml", &env).unwrap().consul.unwrap().address, "10.1.2.3:8500");
        assert_eq!(Config::from_str(minimal, "c.toml").unwrap().consul.unwrap().address, "127.0.0.1:8500");
        let named = "[consul]\naddress = \"consul.local\"\nservices = { 200 = \"game\" }\n";
        assert_eq!(Config::from_str(named, "c.toml").unwrap().consul.unwrap().address, "consul.local:8500");
        let bad = "[consul]\naddress = \"https://c:8501\"\ndatacenter = \"a/b\"\nwait = \"20m\"\nservices = { x = \"game\", 7 = \"a b\" }\n";
        let errs = Config::from_str(bad, "c.toml").unwrap_err().to_string();
        for want in [
            "c.toml:2: consul.address: \"https://c:8501\": https is not supported",
            "c.toml:3: consul.datacenter",
            "c.toml:4: consul.wait: \"20m\" is out of range 1s..=10m",
            "c.toml:5: consul.services: \"x\" is not a server type",
            "consul.services: 7 = \"a b\"",
        ] {
            assert!(errs.contains(want), "{want:?} in\n{errs}");
        }
        let none = Config::from_str("[consul]\n", "c.toml").unwrap_err().to_string();
        assert!(none.contains("consul.services: names no service"), "{none}");
        let typo = Config::from_str("[consul]\nservice_name = \"game\"\n", "c.toml").unwrap_err().to_string();
        assert!(typo.contains("service_name"), "the TOML config stays strict: {typo}");
        // The commented-out example in config/gateway.toml is valid once uncommented.
        let block: String = EMBEDDED_DEFAULT
            .lines()
            .skip_while(|l| *l != "# [consul]")
            .take_while(|l| l.starts_with("# "))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        assert!(block.contains("services ="), "{block}");
        let k = Config::from_str(&block, "gateway.toml").unwrap().consul.unwrap();
        assert_eq!((k.services[&200].as_str(), k.namespace.as_str()), ("game", "hgame"));
    }

    #[test]
    fn pod_name_node_ids() {
        assert_eq!(node_id_from_pod_name("game-gateway-3"), 3);
        let h = node_id_from_pod_name("gw-abcde");
        assert!(h <= MAX_NODE_ID);
        assert_eq!(h, node_id_from_pod_name("gw-abcde"));
    }
}
