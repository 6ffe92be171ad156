//! Core-pinned, host-network realms, through the real binary: CPU placement
//! from the affinity mask (`taskset`), admin access with a bearer token, the
//! drain gauge, and every family the dashboard and alerts use on a fresh
//! gateway.

mod common;
use common::*;
use game_gateway::cpu::CpuSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_game-gateway");

/// An HTTP request on the admin port; returns (status, head, body).
fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let addr = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (code, head.to_string(), body.to_string())
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Two CPUs of this test process's mask, `(run_on, other)`, or `None` (and a
/// note) on a one-CPU machine.
fn two_cpus() -> Option<(usize, usize)> {
    let set = CpuSet::of_process();
    match set.ids() {
        [.., a, b] => Some((*b, *a)),
        _ => {
            eprintln!("skipped: needs two CPUs in the test's affinity mask, has {set}");
            None
        }
    }
}

fn write_config(dir: &TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.0.join("gateway.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn taskset(cpu: usize, args: &[&str]) -> std::process::Output {
    Command::new("taskset")
        .args(["-c", &cpu.to_string(), BIN])
        .args(args)
        .env("LOG_LEVEL", "warn")
        .output()
        .expect("taskset (util-linux) runs")
}

#[test]
fn check_config_under_taskset_takes_cpus_from_the_mask() {
    let Some((cpu, other)) = two_cpus() else { return };
    let dir = TempDir::new("taskset-check");
    let ok = write_config(&dir, &config_text(0, &format!("cpus = [{cpu}]"), ""));
    let out = taskset(cpu, &["--check-config", "--config", ok.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("workers=1 cpus=[{cpu}] cpu_set={cpu} ")), "{stdout}");

    // Default placement: worker 0 on the mask's CPU, not on CPU 0.
    let auto = write_config(&dir, &config_text(0, "", ""));
    let out = taskset(cpu, &["--check-config", "--config", auto.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("workers=1 cpus=[{cpu}] cpu_set={cpu} ")), "{stdout}");

    // A CPU outside the mask: refused, naming the mask; exit 1 for
    // --check-config, 2 when starting.
    let bad = write_config(&dir, &config_text(0, &format!("cpus = [{other}]"), ""));
    let out = taskset(cpu, &["--check-config", "--config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let want = format!("server.cpus: CPU {other} is not in this process's CPU set {cpu}");
    assert!(stderr.contains(&want), "{want:?} not in\n{stderr}");
    let out = taskset(cpu, &["--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&want));
}

/// `Cpus_allowed_list` of the process's thread called `name`.
fn thread_cpus(pid: u32, name: &str) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string());
        }
    }
    None
}

#[test]
fn a_gateway_under_taskset_runs_one_worker_on_the_mask_cpu() {
    let Some((cpu, _)) = two_cpus() else { return };
    let mb = mock();
    let cfg = config_text(0, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let gw = GatewayProcess::spawn_under(&["taskset", "-c", &cpu.to_string()], &cfg, &[], &[]);
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"pinned");
    let (code, _, body) = http(gw.admin, "GET", "/status", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{body}");
    assert_eq!(workers[0]["cpu"], cpu, "{body}");
    let numa = game_gateway::cpu::numa_node(cpu);
    assert_eq!(workers[0]["numa_node"], serde_json::json!(numa), "{body}");
    assert_eq!(thread_cpus(gw.child.id(), "gw-worker-0").as_deref(), Some(cpu.to_string().as_str()));
    let m = http(gw.admin, "GET", "/metrics", None).2;
    assert!(m.contains(&format!("game_gateway_worker_info{{worker=\"0\",cpu=\"{cpu}\",")), "{m}");
}

#[test]
fn numa_nodes_are_reported_per_worker() {
    let gw = GatewayProcess::spawn(&config_text(2, "", ""), &[]);
    let body = http(gw.admin, "GET", "/status", None).2;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for w in v["workers"].as_array().unwrap() {
        let cpu = w["cpu"].as_u64().unwrap() as usize;
        assert_eq!(w["numa_node"], serde_json::json!(game_gateway::cpu::numa_node(cpu)), "{body}");
    }
    if Path::new("/sys/devices/system/node/node0").exists() {
        assert!(v["workers"][0]["numa_node"].is_u64(), "this machine has NUMA info: {body}");
    }
}

// --- admin access --------------------------------------------------------------------------

#[test]
fn a_non_loopback_admin_port_without_a_token_refuses_to_start() {
    let dir = TempDir::new("admin-open");
    let cfg = config_text(1, "", "").replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"0.0.0.0:0\"");
    let p = write_config(&dir, &cfg);
    let out = Command::new(BIN).arg("--config").arg(&p).env("LOG_LEVEL", "warn").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("server.admin_listen: 0.0.0.0:0 is not a loopback address and [admin] token_file is not set"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing listened: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn an_unreadable_token_file_is_a_config_error_naming_it() {
    let dir = TempDir::new("admin-missing");
    let missing = dir.0.join("no-such-token");
    let cfg = format!("{}\n[admin]\ntoken_file = \"{}\"\n", config_text(1, "", ""), missing.display());
    let p = write_config(&dir, &cfg);
    let out = Command::new(BIN).arg("--config").arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("admin.token_file: {}: cannot read: ", missing.display())), "{stderr}");
}

/// A config whose admin port has a token (`listen` its address).
fn with_token(listen: &str, token_file: &Path, routes: &str) -> String {
    let cfg = config_text(1, "", routes)
        .replace("admin_listen = \"127.0.0.1:0\"", &format!("admin_listen = \"{listen}\""))
        .replace("drain_timeout = \"1s\"", "drain_timeout = \"3s\"");
    format!("{cfg}\n[admin]\ntoken_file = \"{}\"\n", token_file.display())
}

#[test]
fn drain_needs_the_bearer_token_off_loopback_and_reads_stay_open() {
    let dir = TempDir::new("admin-token");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "0123456789abcdef\n").unwrap();
    let mb = mock();
    let mut gw = GatewayProcess::spawn(
        &with_token("0.0.0.0:0", &token_file, &route(10, 0, "round_robin", &[mb.addr()], "")),
        &[],
    );
    assert!(gw.admin.ip().is_unspecified(), "bound {}", gw.admin);
    for path in ["/health", "/ready", "/metrics", "/status"] {
        assert_eq!(http(gw.admin, "GET", path, None).0, 200, "GET {path} without a token");
    }
    let m = http(gw.admin, "GET", "/metrics", None).2;
    assert_eq!(metric(&m, "game_gateway_draining"), Some(0.0), "{m}");
    let (code, head, _) = http(gw.admin, "POST", "/drain", None);
    assert_eq!(code, 401, "{head}");
    assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    assert_eq!(http(gw.admin, "POST", "/drain", Some("Basic MDEyMzQ1Njc4OWFiY2RlZg==")).0, 401);
    assert_eq!(http(gw.admin, "POST", "/drain", Some("Bearer 0123456789abcdeX")).0, 403);
    assert_eq!(http(gw.admin, "POST", "/drain", Some("Bearer 0123456789abcde")).0, 403);
    assert_eq!(http(gw.admin, "POST", "/drain", Some("Bearer 0123456789abcdef0")).0, 403);
    assert_eq!(http(gw.admin, "GET", "/ready", None).0, 200, "refused calls changed nothing");
    eventually("refusals logged", || gw.stderr().contains("admin call refused"));
    assert!(!gw.stderr().contains("0123456789abcdef"), "the token is never logged");

    // A session keeps the drain going for its drain_timeout (3s).
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"held");
    let (code, _, body) = http(gw.admin, "POST", "/drain", Some("Bearer 0123456789abcdef"));
    assert_eq!((code, body.as_str()), (202, "draining\n"));
    eventually("/ready 503 and game_gateway_draining 1 while draining", || {
        http(gw.admin, "GET", "/ready", None).0 == 503
            && metric(&http(gw.admin, "GET", "/metrics", None).2, "game_gateway_draining") == Some(1.0)
    });
    let v: serde_json::Value = serde_json::from_str(&http(gw.admin, "GET", "/status", None).2).unwrap();
    assert_eq!(v["draining"], true);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0), "{}", gw.stderr());
    assert!(c.closed());
}

#[test]
fn a_token_applies_on_loopback_too_and_a_new_token_file_is_picked_up() {
    let dir = TempDir::new("admin-reload");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "first-token").unwrap();
    let gw = GatewayProcess::spawn(&with_token("127.0.0.1:0", &token_file, ""), &[]);
    assert!(gw.admin.ip().is_loopback());
    assert_eq!(http(gw.admin, "POST", "/drain", None).0, 401, "loopback is no exception");
    assert_eq!(http(gw.admin, "POST", "/drain", Some("Bearer second-token")).0, 403);
    // Any state-changing method is checked before routing: the right token
    // on an unknown path gets 404, a wrong one 403.
    assert_eq!(http(gw.admin, "POST", "/nope", Some("Bearer first-token")).0, 404);
    assert_eq!(http(gw.admin, "GET", "/drain", None).0, 405, "reads are open");

    // The token file changes (as a Kubernetes Secret update does): the
    // gateway notices and reloads; the old token stops working.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&token_file, "second-token\n").unwrap();
    eventually("the new token is accepted", || http(gw.admin, "POST", "/nope", Some("Bearer second-token")).0 == 404);
    assert_eq!(http(gw.admin, "POST", "/nope", Some("Bearer first-token")).0, 403);
    assert!(gw.stderr().contains("admin token file changed: reloading"), "{}", gw.stderr());

    // An emptied file is rejected like any bad config: the running token stays.
    std::fs::write(&token_file, "\n").unwrap();
    eventually("rejection logged", || gw.stderr().contains("is empty"));
    assert_eq!(http(gw.admin, "POST", "/nope", Some("Bearer second-token")).0, 404);
    assert_eq!(http(gw.admin, "GET", "/ready", None).0, 200);
}

// --- metrics on a fresh gateway ------------------------------------------------------------

#[test]
fn a_fresh_gateway_exports_every_dashboard_family_with_its_configured_backends_at_zero() {
    let mb = mock();
    let routes = route(10, 0, "round_robin", &[mb.addr()], "")
        + &route(30, 2, "round_robin", &["127.0.0.1:9".parse().unwrap()], "");
    let gw = GatewayProcess::spawn(&config_text(2, "", &routes), &[]);
    let m = http(gw.admin, "GET", "/metrics", None).2;
    for b in [mb.addr().to_string(), "127.0.0.1:9".to_string()] {
        for family in [
            "circuit_breaker_state",
            "backend_connections_active",
            "backend_dials_total",
            "backend_retries_total",
            "backend_timeouts_total",
            "backend_rtt_seconds_count",
        ] {
            let series = format!("game_gateway_{family}{{backend=\"{b}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series}\n{m}");
        }
        for dir in ["request", "response"] {
            let series = format!("game_gateway_backend_bytes_transmitted_total{{backend=\"{b}\",direction=\"{dir}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series}");
        }
        for t in ["dial_failed", "closed_by_backend", "keepalive_timeout", "circuit_opened", "backend_queue_full"] {
            let go = match t {
                "dial_failed" => "connection_failed",
                "keepalive_timeout" => "timeout",
                t => t,
            };
            let series =
                format!("game_gateway_backend_errors_total{{backend=\"{b}\",type=\"{t}\",error_type=\"{go}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series}");
        }
    }
    for t in ["10", "30"] {
        for dir in ["client_to_backend", "backend_to_client"] {
            let series = format!(
                "game_gateway_messages_processed_total{{direction=\"{dir}\",server_type=\"{t}\",service_type=\"{t}\"}}"
            );
            assert_eq!(metric(&m, &series), Some(0.0), "{series}");
        }
    }
    for kind in ["frame_too_large", "slow_reader", "handshake_timeout", "http_426", "backend_frame"] {
        let series = format!("game_gateway_protocol_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&m, &series), Some(0.0), "{series}");
    }
    assert_eq!(metric(&m, "game_gateway_draining"), Some(0.0));
    // Real traffic counts on top of the zeros, one series per label set.
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"x");
    eventually("the echo is counted", || {
        let m = http(gw.admin, "GET", "/metrics", None).2;
        metric(
            &m,
            "game_gateway_messages_processed_total{direction=\"client_to_backend\",server_type=\"10\",service_type=\"10\"}"
        )
            == Some(1.0)
            && metric(&m, &format!("game_gateway_backend_dials_total{{backend=\"{}\"}}", mb.addr())).unwrap_or(0.0)
                >= 1.0
    });
    let m = http(gw.admin, "GET", "/metrics", None).2;
    let series = format!("game_gateway_backend_connections_active{{backend=\"{}\"}}", mb.addr());
    assert_eq!(m.lines().filter(|l| l.starts_with(&series)).count(), 1, "{m}");
}

#[test]
fn a_reload_cannot_drop_the_token_the_running_admin_port_needs() {
    let dir = TempDir::new("admin-keep");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "kept-token").unwrap();
    let gw = GatewayProcess::spawn(&with_token("0.0.0.0:0", &token_file, ""), &[]);
    // The edited file is valid on its own (loopback, no token), but
    // admin_listen needs a restart: the running port stays on 0.0.0.0.
    let cfg_path = gw.stderr_path.with_file_name("gateway.toml");
    std::fs::write(&cfg_path, config_text(1, "", "")).unwrap();
    gw.signal(libc::SIGHUP);
    eventually("the reload is rejected", || gw.stderr().contains("not set, but the running admin port"));
    assert_eq!(http(gw.admin, "POST", "/drain", None).0, 401);
    assert_eq!(http(gw.admin, "POST", "/nope", Some("Bearer kept-token")).0, 404);
    let m = http(gw.admin, "GET", "/metrics", None).2;
    assert!(metric(&m, "game_gateway_config_reload_errors_total").unwrap() >= 1.0, "{m}");
}

#[test]
fn a_sighup_right_after_start_reloads_instead_of_killing() {
    for _ in 0..5 {
        let mut gw = GatewayProcess::spawn(&config_text(1, "", ""), &[]);
        gw.signal(libc::SIGHUP);
        eventually("the reload is logged", || gw.stderr().contains("SIGHUP: reloading config"));
        assert_eq!(gw.child.try_wait().unwrap(), None, "{}", gw.stderr());
    }
}
