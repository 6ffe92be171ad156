use clap::{Parser, Subcommand};
use game_gateway::admin;
use game_gateway::config::{self, Config, Environment, IoDriver};
use game_gateway::control::routes::{self as route_source, RouteSet, Slot};
use game_gateway::control::{self, redis as redis_source, Control};
use game_gateway::cpu::CpuBudget;
use game_gateway::gateway::{self, Gateway};
use game_gateway::routing::{Resolution, SystemResolver};
use game_gateway::state::{ControlStats, RouteLabels};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Thread-per-core game gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Config file (the compiled-in default is used when the default path is missing).
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the config, print the resolved summary, exit 0 (valid) or 1.
    #[arg(long)]
    check_config: bool,
    /// Worker threads (overrides server.workers; 0 = one per CPU of the affinity mask).
    #[arg(long)]
    workers: Option<usize>,
    /// I/O driver (overrides server.io_driver): auto | io_uring | epoll.
    #[arg(long, value_parser = parse_driver)]
    io_driver: Option<IoDriver>,
    /// Live upgrade: take over every listener, session and backend
    /// connection of the gateway handing over on this Unix socket (its
    /// `[server] upgrade_socket`), then serve them (docs/OPERATIONS.md).
    #[arg(long, value_name = "PATH", conflicts_with = "takeover_or_start")]
    takeover: Option<PathBuf>,
    /// As `--takeover`, but start normally when no gateway answers on PATH
    /// (the socket is missing or nobody listens): for rollouts that start
    /// every new process the same way (a Kubernetes DaemonSet with surge).
    #[arg(long, value_name = "PATH")]
    takeover_or_start: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Config tools.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Operator tools for the routing rules kept in Redis.
    Routes {
        #[command(subcommand)]
        action: RoutesCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the Go gateway's config.yaml as a commented TOML config for this
    /// gateway: every key mapped or listed with the reason it is not.
    ImportSeed {
        /// The Go gateway's YAML config.
        file: PathBuf,
        /// Admin bearer token file: the admin port then listens on every
        /// address (as the Go gateway's health port did), else on loopback.
        #[arg(long)]
        admin_token_file: Option<String>,
    },
}

fn config_cmd(action: ConfigCmd) -> ExitCode {
    quiet_on_closed_pipe();
    match action {
        ConfigCmd::ImportSeed { file, admin_token_file } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let opts = config::import_seed::ImportOptions { admin_token_file };
            match config::import_seed::import_seed(&text, &name, &opts) {
                Ok(imported) => {
                    print!("{}", imported.toml);
                    for p in &imported.problems {
                        eprintln!("{}: {p}", file.display());
                    }
                    // The token file lives on the target machine: not
                    // being able to read it here is expected.
                    if let Err(e) = config::import_seed::check(&imported.toml) {
                        if opts.admin_token_file.is_none() || !e.lines().all(|l| l.contains("admin.token_file")) {
                            eprintln!("warning: the imported config does not validate here:\n{e}");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum RoutesCmd {
    /// Validate a rules file offline (JSON: the object keyed by server type,
    /// an array of rules, or {"rules": ..., "realm_mapping": {...}}).
    /// Unknown rule fields and host names that do not resolve here are
    /// warnings (exit 0).
    Check {
        file: PathBuf,
        /// Every host name must resolve on this machine (else exit 1).
        #[arg(long)]
        resolve: bool,
    },
    /// Validate a rules file, write it to Redis and publish the notifications.
    Push {
        file: PathBuf,
        /// Every host name must resolve on this machine (else nothing is pushed).
        #[arg(long)]
        resolve: bool,
        #[arg(long)]
        redis: String,
        #[arg(long, default_value = config::DEFAULT_KEY_PREFIX)]
        prefix: String,
    },
    /// Print what Redis holds, resolved as the gateway would resolve it.
    Show {
        /// Every host name must resolve on this machine (else exit 1).
        #[arg(long)]
        resolve: bool,
        #[arg(long)]
        redis: String,
        #[arg(long, default_value = config::DEFAULT_KEY_PREFIX)]
        prefix: String,
    },
}

fn parse_driver(s: &str) -> Result<IoDriver, String> {
    IoDriver::parse(s).ok_or_else(|| format!("{s:?} is not one of auto, io_uring, epoll"))
}

fn print_set(set: &RouteSet) {
    println!("rules: {}", set.rules.len());
    for r in &set.rules {
        println!("  {r}");
    }
    println!("realm mapping: {}", set.realms.len());
    for (realm, ep) in &set.realms {
        println!("  {realm} -> {ep} ({})", ep.addr);
    }
    if !set.pending.is_empty() {
        println!("unresolved names (left out until they resolve): {}", set.pending.len());
        for p in &set.pending {
            match p.slot {
                Slot::Rule(t, 0) => println!("  type={t} world=* {}", p.name),
                Slot::Rule(t, w) => println!("  type={t} world={w} {}", p.name),
                Slot::Realm(r) => println!("  realm {r} {}", p.name),
            }
        }
    }
}

fn resolution(resolve: bool) -> Resolution {
    if resolve {
        Resolution::Required
    } else {
        Resolution::Deferred
    }
}

fn print_warnings(file: &std::path::Path, set: &RouteSet) {
    for w in &set.warnings {
        eprintln!("{}: warning: {w}", file.display());
    }
}

fn load_rules_file(file: &PathBuf, resolve: bool) -> Result<(String, RouteSet), ExitCode> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        eprintln!("{}: cannot read: {e}", file.display());
        ExitCode::from(2)
    })?;
    match route_source::parse_bundle(&text, &mut SystemResolver, resolution(resolve)) {
        Ok(set) => {
            print_warnings(file, &set);
            Ok((text, set))
        }
        Err(errs) => {
            for e in errs {
                eprintln!("{}: {e}", file.display());
            }
            Err(ExitCode::from(1))
        }
    }
}

fn routes(action: RoutesCmd) -> ExitCode {
    match action {
        RoutesCmd::Check { file, resolve } => match load_rules_file(&file, resolve) {
            Ok((_, set)) => {
                quiet_on_closed_pipe();
                print_set(&set);
                match set.warnings.len() {
                    0 => println!("rules ok"),
                    n => println!("rules ok, {n} warning(s)"),
                }
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        RoutesCmd::Push { file, resolve, redis, prefix } => {
            let (text, set) = match load_rules_file(&file, resolve) {
                Ok(x) => x,
                Err(c) => return c,
            };
            // Store the rules document exactly as the gateway reads it.
            let v: serde_json::Value = serde_json::from_str(&text).expect("validated above");
            let rules_json = match v.get("rules") {
                Some(r) => r.to_string(),
                None if v.get("realm_mapping").is_some() => "[]".to_string(),
                None => v.to_string(),
            };
            // Realm entries whose name does not resolve here are pushed too:
            // the gateways resolve them on their side.
            let mut realms: Vec<(u16, String)> = set.realms.iter().map(|(r, e)| (*r, e.name.to_string())).collect();
            realms.extend(set.pending.iter().filter_map(|p| match p.slot {
                Slot::Realm(r) => Some((r, p.name.to_string())),
                Slot::Rule(..) => None,
            }));
            realms.sort();
            match redis_source::push(&redis, &prefix, &rules_json, &realms) {
                Ok(()) => {
                    println!("pushed {} rules and {} realm entries to {redis} (prefix {prefix:?}) and published the notifications", set.rules.len(), realms.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("push failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
        RoutesCmd::Show { resolve, redis, prefix } => match redis_source::show(&redis, &prefix) {
            Ok((rules, realms)) => {
                quiet_on_closed_pipe();
                let keys = redis_source::Keys::new(&prefix);
                if rules.is_none() {
                    println!(
                        "{} is not set: a running gateway keeps the last good redis routes it read (a fresh one serves the static rules); write [] to clear them",
                        keys.rules
                    );
                }
                match redis_source::validate_raw(rules.as_deref(), &realms, &mut SystemResolver, resolution(resolve)) {
                    Ok(set) => {
                        for w in &set.warnings {
                            eprintln!("warning: {w}");
                        }
                        print_set(&set);
                        ExitCode::SUCCESS
                    }
                    Err(errs) => {
                        println!("redis holds data the gateway would reject:");
                        for e in errs {
                            println!("  {e}");
                        }
                        ExitCode::from(1)
                    }
                }
            }
            Err(e) => {
                eprintln!("cannot read redis: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// The process environment, read here once and passed in.
fn environment() -> Environment {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    // The affinity mask, read before any worker thread exists.
    Environment {
        log_level: var("LOG_LEVEL"),
        pod_name: var("POD_NAME"),
        cpus: Some(CpuBudget::of_process()),
        otel_endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        otel_sampler_arg: var("OTEL_TRACES_SAMPLER_ARG"),
        otel_service_name: var("OTEL_SERVICE_NAME"),
        pod_namespace: var("POD_NAMESPACE"),
        node_name: var("NODE_NAME"),
        node_ip: var("NODE_IP"),
    }
}

/// The printing commands (`--check-config`, `config import-seed`, `routes
/// check`, and `routes show` once Redis is read) end quietly when their
/// reader goes away (`game-gateway --check-config | head`), as command-line
/// tools do: Rust ignores SIGPIPE, so `println!` into a closed pipe would
/// panic. Called only after any network I/O (a Unix-socket Redis closing
/// must stay an error, not a signal); the gateway itself keeps SIGPIPE
/// ignored (a client that goes away is an error to handle).
fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any
    // thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Routes { action }) => return routes(action),
        Some(Command::Config { action }) => return config_cmd(action),
        None => {}
    }
    let env = environment();
    let mut cfg = match Config::load(&cli.config, &env) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{e}");
            }
            eprintln!("config invalid: {} problem(s)", errs.0.len());
            return ExitCode::from(if cli.check_config { 1 } else { 2 });
        }
    };
    cfg.apply_overrides(cli.workers, cli.io_driver);
    if cli.check_config {
        quiet_on_closed_pipe();
        print!("{}", cfg.summary());
        // What the start would do about the open-file limit (nothing changes here).
        match gateway::fit_fd_limit(&cfg, false) {
            Some(b) => {
                let raise = match b.raised_from {
                    Some(from) => format!(" (the start raises the soft limit from {from})"),
                    None => String::new(),
                };
                println!(
                    "file descriptors: open_file_limit={} hard={}{raise} backend_estimate={} reserve={} max_connections={} effective_max_connections={}",
                    b.soft, b.hard, b.backend_estimate, b.reserve, b.configured_max_connections, b.effective_max_connections
                );
                if b.lowered() {
                    eprintln!(
                        "warning: limits.max_connections {} does not fit the open-file limit {} ({} backend connections and {} reserved): the start lowers it to {}",
                        b.configured_max_connections, b.soft, b.backend_estimate, b.reserve, b.effective_max_connections
                    );
                }
            }
            None => println!("file descriptors: RLIMIT_NOFILE unreadable; max_connections not checked"),
        }
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    control::logging::init_logging(&cfg.log);
    // Signals are caught from here on: one that arrives while the workers
    // start is handled by the control loop, not by the default action.
    let events = match Control::channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("game-gateway: control: {e}");
            return ExitCode::from(1);
        }
    };
    let routes = control::static_routes(&cfg, 1);
    // Live upgrade: the old process's listeners first (its config was
    // validated above; nothing has moved yet if this fails).
    let optional = cli.takeover_or_start.is_some();
    let mut takeover = match cli.takeover.as_ref().or(cli.takeover_or_start.as_ref()) {
        Some(path) => match game_gateway::upgrade::connect(path, cfg.server.workers) {
            Ok(t) => Some(t),
            Err(game_gateway::upgrade::ConnectError::NobodyThere(e)) if optional => {
                tracing::info!(socket = %path.display(), error = %e, "no gateway to take over from: starting normally");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "live upgrade: cannot take over");
                eprintln!("game-gateway: takeover: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let took_over = takeover.is_some();
    let inherited = takeover.as_mut().map(|t| std::mem::take(&mut t.listeners)).unwrap_or_default();
    let gw = match Gateway::start_with(cfg, routes.clone(), inherited, takeover.is_some()) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed to start");
            eprintln!("game-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(t) = takeover {
        // Until the old process commits, it can resume everything: this
        // process exits without having accepted anything.
        match t.take(&gw.worker_senders()) {
            Ok(taken) => {
                if taken.lost > 0 {
                    tracing::error!(lost = taken.lost, "live upgrade: sessions lost");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "live upgrade failed; the old process goes on serving");
                eprintln!("game-gateway: takeover: {e}");
                drop(gw);
                return ExitCode::from(1);
            }
        }
        gw.start_accepting();
    }
    // Not ready until the control loop has loaded its routes.
    let stats = Arc::new(ControlStats::default());
    *stats.admin_token.lock().unwrap() = gw.cfg.admin.token.clone();
    *stats.fd_budget.lock().unwrap() = gw.fd_budget;
    *stats.route_labels.lock().unwrap() = RouteLabels::of(&routes);
    let state =
        Arc::new(admin::AdminState::new(gw.handle(), gw.cfg.source.clone(), stats.clone(), Some(events.tx.clone())));
    let admin_addr = match admin::serve(gw.cfg.server.admin_listen, state.clone()) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, addr = %gw.cfg.server.admin_listen, "admin endpoints failed to start");
            eprintln!("game-gateway: admin listener {}: {e}", gw.cfg.server.admin_listen);
            gw.stop(std::time::Duration::from_secs(1));
            return ExitCode::from(1);
        }
    };
    // systemd (Type=notify): up; after a live upgrade this process is the
    // service's main process from now on (NotifyAccess=all).
    let mut states = vec![sd_notify::NotifyState::Ready];
    if took_over {
        states.push(sd_notify::NotifyState::MainPid(std::process::id()));
    }
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "game-gateway listening on {} admin {} io_driver {}",
        gw.local_addr(),
        admin_addr,
        gw.workers()[0].io_driver
    );
    match Control::run(gw, &cli.config, env, stats, events) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("game-gateway: control: {e}");
            ExitCode::from(1)
        }
    }
}
