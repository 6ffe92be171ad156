use clap::Parser;
use game_gateway::config::{self, Config, IoDriver};
use game_gateway::{admin, control, gateway::Gateway};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
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
    /// Worker threads (overrides server.workers; 0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// I/O driver (overrides server.io_driver): auto | io_uring | epoll.
    #[arg(long, value_parser = parse_driver)]
    io_driver: Option<IoDriver>,
}

fn parse_driver(s: &str) -> Result<IoDriver, String> {
    IoDriver::parse(s).ok_or_else(|| format!("{s:?} is not one of auto, io_uring, epoll"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match Config::load(&cli.config) {
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
        print!("{}", cfg.summary());
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    control::init_logging(&cfg);
    let routes = control::static_routes(&cfg, 1);
    let gw = match Gateway::start(cfg, routes) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed to start");
            eprintln!("game-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    let state = Arc::new(admin::AdminState {
        handle: gw.handle(),
        ready: AtomicBool::new(true),
        config_source: gw.cfg.source.clone(),
    });
    let admin_addr = match admin::serve(gw.cfg.server.admin_listen, state.clone()) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, addr = %gw.cfg.server.admin_listen, "admin endpoints failed to start");
            eprintln!(
                "game-gateway: admin listener {}: {e}",
                gw.cfg.server.admin_listen
            );
            gw.stop(std::time::Duration::from_secs(1));
            return ExitCode::from(1);
        }
    };
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "game-gateway listening on {} admin {} io_driver {}",
        gw.local_addr(),
        admin_addr,
        gw.workers()[0].io_driver
    );
    match control::run_until_signalled(gw, &cli.config, Some(state)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("game-gateway: signals: {e}");
            ExitCode::from(1)
        }
    }
}
