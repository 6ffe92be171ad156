//! The real binary: signals, CLI, config errors, admin endpoints.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn proc_config(mb: &MockBackend, extra: &str) -> String {
    config_text(2, extra, &route(10, 0, "round_robin", &[mb.addr()], ""))
}

#[test]
fn sigterm_disconnects_every_session_with_reason_6_and_exits_0() {
    let mb = mock();
    let mut gw = GatewayProcess::spawn(&proc_config(&mb, ""), &[]);
    // The server keeps SIGPIPE ignored (only the printing commands restore
    // its default): a client that goes away is an error, not a signal.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id())).unwrap();
    let ign = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim();
    let ign = u64::from_str_radix(ign, 16).unwrap();
    assert_ne!(ign & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE not ignored: SigIgn {ign:x}");
    let mut clients: Vec<Client> = (0..6).map(|_| Client::connect(gw.addr)).collect();
    let mut ids = vec![];
    for c in clients.iter_mut() {
        c.echo(1, sid(1, 10, 0), b"hello");
        ids.push(session_of(&mb, c.local()));
    }
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    let code = gw.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "exit code; stderr:\n{}", gw.stderr());
    assert!(t0.elapsed() < Duration::from_secs(5), "stop took {:?}", t0.elapsed());
    let mut got = vec![];
    while let Some(Event::Disconnect { session, reason, .. }) =
        mb.wait_for(Duration::from_secs(2), |e| matches!(e, Event::Disconnect { .. }))
    {
        got.push((session, reason));
        if got.len() == ids.len() {
            break;
        }
    }
    got.sort();
    ids.sort();
    assert_eq!(got, ids.iter().map(|i| (*i, 6u8)).collect::<Vec<_>>());
    for c in clients.iter_mut() {
        assert!(c.closed());
    }
    let log = gw.stderr();
    let phases = [
        "drain started",
        "drain: listener closed",
        "drain deadline: closing remaining",
        "flushing backend queues",
        "all workers stopped",
    ];
    let at: Vec<usize> =
        phases.iter().map(|p| log.find(p).unwrap_or_else(|| panic!("{p:?} not logged:\n{log}"))).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "phases out of order:\n{log}");
}

#[test]
fn invalid_config_exits_2_listing_every_problem() {
    let dir = TempDir::new("badcfg");
    let p = dir.0.join("bad.toml");
    std::fs::write(&p, "[server]\nworkers = 1\nio_driver = \"kqueue\"\n\n[limits]\nidle_timeout = \"soon\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway")).arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = p.display().to_string();
    assert!(err.contains(&format!("{f}:3: server.io_driver: ")), "{err}");
    assert!(err.contains(&format!("{f}:6: limits.idle_timeout: ")), "{err}");
}

#[test]
fn check_config_prints_the_resolved_summary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--check-config", "--workers", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("workers=3"), "{s}");
    assert!(s.contains("redis: off"), "{s}");
    assert!(s.contains("config ok"), "{s}");
    // Values are spelled as the config spells them, never as Rust Debug.
    for want in
        ["io_driver=auto ", "on_rate_limit=drop ", "format=json ", "strategy=round_robin ", "on_backend_loss=close"]
    {
        assert!(s.contains(want), "{want:?} missing in\n{s}");
    }
}

/// `--check-config | head -1`: the summary's reader is gone before the
/// summary is written; the command ends without a panic (it used to print
/// "failed printing to stdout").
#[test]
fn check_config_into_a_closed_pipe_ends_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("--check-config")
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}

#[test]
fn check_config_spells_overrides_and_the_environment_as_the_config_does() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--check-config", "--io-driver", "io_uring"])
        .env("LOG_LEVEL", "debug")
        .env("POD_NAME", "game-gateway-5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    for want in ["io_driver=io_uring ", "node_id=5 ", "level=debug "] {
        assert!(s.contains(want), "{want:?} missing in\n{s}");
    }
    assert!(!s.contains("IoUring") && !s.contains("Json") && !s.contains("Close"), "{s}");
}

#[test]
fn admin_endpoints_answer() {
    let mb = mock();
    let gw = GatewayProcess::spawn(&proc_config(&mb, ""), &[]);
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"x");
    c.send(1, sid(1, 99, 0), b"unrouted");
    assert_eq!(http_get(gw.admin, "/health").0, 200);
    assert_eq!(http_get(gw.admin, "/ready").0, 200);
    let (code, m) = http_get(gw.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(m.contains("game_gateway_connections_total 1"), "{m}");
    eventually("routing error visible", || {
        http_get(gw.admin, "/metrics")
            .1
            .contains("game_gateway_routing_errors_total{type=\"no_rule\",error_type=\"not_found\"} 1")
    });
    let (code, st) = http_get(gw.admin, "/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    assert_eq!(http_get(gw.admin, "/nope").0, 404);
}

#[test]
fn sighup_reload_applies_a_lower_max_message_size() {
    let mb = mock();
    let gw = GatewayProcess::spawn(&proc_config(&mb, ""), &[]);
    let mut before = Client::connect(gw.addr);
    before.echo(1, sid(1, 10, 0), &[1u8; 2000]);
    let cfg_path = gw.stderr_path.with_file_name("gateway.toml");
    std::fs::write(&cfg_path, proc_config(&mb, "[limits]\nmax_message_size = 1000\n")).unwrap();
    gw.signal(libc::SIGHUP);
    eventually("a 2000-byte frame is refused after the reload", || {
        let mut c = Client::connect(gw.addr);
        c.s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let _ = c.send_raw(&Client::frame(1, sid(1, 10, 0), &[1u8; 2000]));
        c.closed()
    });
    // An invalid edit is rejected and the running config stays.
    std::fs::write(&cfg_path, "[limits]\nmax_message_size = \"big\"\n").unwrap();
    gw.signal(libc::SIGHUP);
    eventually("rejection logged", || gw.stderr().contains("config reload rejected"));
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), &[1u8; 500]);
}
