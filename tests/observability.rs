//! Metrics merged over workers, /status, the access log and trace ids.

mod common;
use common::*;
use std::time::Duration;

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn exact_counters_after_a_known_exchange_over_two_workers() {
    let mb = mock();
    let cfg = config_text(2, "[limits]\nmax_connections_per_ip = 2\n", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let gw = GatewayProcess::spawn(&cfg, &[]);
    // 8 sessions from 4 source addresses: with IP steering, 2 land on each
    // worker's share of addresses, so both workers take part.
    let mut clients: Vec<(Client, i64)> = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..2 {
            let mut c = Client::from(ip, gw.addr);
            for n in 0..3u16 {
                c.echo(n, sid(1, 10, 0), b"frame");
            }
            let s = session_of(&mb, c.local());
            clients.push((c, s));
        }
    }
    // One rejected connection (a third from 127.0.0.1), one routing error,
    // one kicked session.
    let mut rejected = Client::from("127.0.0.1", gw.addr);
    assert!(rejected.closed());
    clients[1].0.send(9, sid(1, 99, 0), b"unrouted");
    let (mut kicked, kicked_id) = clients.remove(0);
    mb.kick(kicked_id, 5, b"").unwrap();
    assert!(kicked.closed());
    let per_worker = {
        let (_, body) = http_get(gw.admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["workers"].as_array().unwrap().iter().map(|w| w["connections_total"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    assert!(per_worker.iter().all(|n| *n > 0), "both workers served sessions: {per_worker:?}");
    drop(clients);
    eventually("all sessions ended", || {
        metric(&http_get(gw.admin, "/metrics").1, "game_gateway_sessions_active") == Some(0.0)
    });
    let m = http_get(gw.admin, "/metrics").1;
    let want = [
        ("game_gateway_connections_total", 8.0),
        ("game_gateway_connection_rejected_total{reason=\"ip_rate_limit\",refusal=\"max_connections_per_ip\"}", 1.0),
        ("game_gateway_rate_limit_rejected_total{limit=\"max_connections_per_ip\"}", 1.0),
        ("game_gateway_messages_processed_total{direction=\"client_to_backend\",server_type=\"10\",service_type=\"10\"}", 24.0),
        ("game_gateway_messages_processed_total{direction=\"backend_to_client\",server_type=\"10\",service_type=\"10\"}", 24.0),
        ("game_gateway_routing_errors_total{type=\"no_rule\",error_type=\"not_found\"}", 1.0),
        ("game_gateway_sessions_closed_total{reason=\"kicked\"}", 1.0),
        ("game_gateway_sessions_closed_total{reason=\"client_closed\"}", 7.0),
        ("game_gateway_connections_active", 0.0),
        ("game_gateway_connection_setup_latency_seconds_count", 8.0),
        ("game_gateway_workers_responsive", 2.0),
    ];
    for (series, v) in want {
        assert_eq!(metric(&m, series), Some(v), "{series}\n{m}");
    }
    assert_eq!(
        m.lines().filter(|l| l.starts_with("game_gateway_worker_info{") && l.contains("io_driver=")).count(),
        2,
        "{m}"
    );
    assert!(metric(&m, "game_gateway_forward_latency_seconds_count{direction=\"client_to_backend\"}").unwrap() >= 1.0);
    assert!(metric(&m, "game_gateway_backend_connection_latency_seconds_count").unwrap() >= 2.0, "one dial per worker");

    // /status reflects the same counts.
    let (_, body) = http_get(gw.admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sum = |k: &str| v["workers"].as_array().unwrap().iter().map(|w| w[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("connections_total"), sum("messages_in"), sum("routing_errors"), sum("sessions")), (8, 24, 1, 0));
    assert_eq!(v["routes"]["source"], "static");

    // The access log: one JSON record per session, with the original fields.
    eventually("8 access-log records", || {
        gw.stdout_text().lines().filter(|l| l.contains("\"session.id\"")).count() == 8
    });
    let records: Vec<serde_json::Value> = gw
        .stdout_text()
        .lines()
        .filter(|l| l.contains("\"session.id\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids: Vec<i64> = records.iter().map(|r| r["session.id"].as_i64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "one record per session");
    for r in &records {
        for k in [
            "timestamp",
            "duration_ns",
            "trace_id",
            "client.address",
            "server.address",
            "server.type",
            "world.id",
            "network.io.receive",
            "network.io.send",
            "status",
            "error.message",
            "frames.in",
            "frames.out",
            "close.reason",
        ] {
            assert!(r.get(k).is_some(), "missing {k} in {r}");
        }
        assert_eq!(r["server.address"], mb.addr().to_string());
        assert_eq!(r["trace_id"].as_str().unwrap().len(), 32);
    }
    let k = records.iter().find(|r| r["session.id"] == kicked_id).unwrap();
    assert_eq!(
        (k["close.reason"].as_str(), k["status"].as_str(), k["frames.in"].as_u64()),
        (Some("kicked"), Some("ok"), Some(3))
    );
}

#[test]
fn backend_sees_the_session_trace_id_which_is_in_its_log_lines() {
    let mb = mock_with(Options { record_trans: true, trace: true, ..Default::default() });
    let cfg = config_text(1, "", &route(10, 0, "round_robin", &[mb.addr()], "trace_propagation = true"));
    let gw = GatewayProcess::spawn_env(&cfg, &[], &[("LOG_LEVEL", "debug")]);
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"traced");
    let (session, trace) = match mb.wait_for(T, |e| matches!(e, Event::Trans { .. })) {
        Some(Event::Trans { session, trace: Some(t), .. }) => (session, t.trace_id),
        other => panic!("{other:?}"),
    };
    let hex: String = trace.iter().map(|b| format!("{b:02x}")).collect();
    drop(c);
    eventually("the session's log lines carry its trace id", || {
        let log = gw.stderr();
        log.lines()
            .filter(|l| l.contains(&format!("session_id={session}")) && l.contains(&format!("trace_id={hex}")))
            .count()
            >= 2
    });
    eventually("the access log carries it too", || gw.stdout_text().contains(&hex));
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn access_log_off_writes_nothing_and_json_logs_parse() {
    let mb = mock();
    let cfg = config_text(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""))
        .replace("format = \"text\"", "format = \"json\"\naccess_log = false");
    let gw = GatewayProcess::spawn(&cfg, &[]);
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), b"x");
    drop(c);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!gw.stdout_text().contains("session.id"), "{}", gw.stdout_text());
    for line in gw.stderr().lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{line}");
    }
}

#[test]
fn a_fresh_gateway_exports_known_label_values_at_zero() {
    use game_gateway::admin::{serve, AdminState};
    use game_gateway::state::ControlStats;
    use std::sync::Arc;
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let state = Arc::new(AdminState::new(gw.handle(), "test.toml".into(), Arc::new(ControlStats::default()), None));
    let admin = serve("127.0.0.1:0".parse().unwrap(), state).unwrap();
    let m = http_get(admin, "/metrics").1;
    let zero = |family: &str, label: &str, values: &[&str]| {
        for v in values {
            let series = format!("game_gateway_{family}{{{label}=\"{v}\"}}");
            assert_eq!(metric(&m, &series), Some(0.0), "{series}\n{m}");
        }
    };
    // Our value beside the Go gateway's (`reason`, `error_type`).
    for (refusal, reason) in [
        ("max_connections", "global_rate_limit"),
        ("max_connections_per_ip", "ip_rate_limit"),
        ("connection_rate_per_ip", "ip_rate_limit"),
        ("ip_table_full", "ip_rate_limit"),
        ("accept_error", "accept_error"),
    ] {
        let series = format!("game_gateway_connection_rejected_total{{reason=\"{reason}\",refusal=\"{refusal}\"}}");
        assert_eq!(metric(&m, &series), Some(0.0), "{series}\n{m}");
    }
    for (t, go) in
        [("no_rule", "not_found"), ("no_endpoints", "not_found"), ("backend_unavailable", "circuit_breaker_open")]
    {
        let series = format!("game_gateway_routing_errors_total{{type=\"{t}\",error_type=\"{go}\"}}");
        assert_eq!(metric(&m, &series), Some(0.0), "{series}\n{m}");
    }
    zero(
        "rate_limit_rejected_total",
        "limit",
        &["max_connections_per_ip", "connection_rate_per_ip", "ip_table_full", "messages_per_second"],
    );
    zero(
        "frames_dropped_total",
        "reason",
        &["rate_limited", "routing_error", "backend_lost", "backend_queue_full", "backend_unavailable"],
    );
    zero(
        "sessions_closed_total",
        "reason",
        &["client_closed", "idle_timeout", "protocol_error", "rate_limited", "kicked", "shutdown", "backend_lost"],
    );
    // Counting still works on top of the zeros.
    let mut c = Client::connect(gw.local_addr());
    c.send(1, sid(1, 99, 0), b"unrouted");
    eventually("the routing error is counted", || {
        metric(
            &http_get(admin, "/metrics").1,
            "game_gateway_routing_errors_total{type=\"no_rule\",error_type=\"not_found\"}",
        ) == Some(1.0)
    });
    let m = http_get(admin, "/metrics").1;
    assert_eq!(
        metric(&m, "game_gateway_routing_errors_total{type=\"no_endpoints\",error_type=\"not_found\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        m.matches("game_gateway_routing_errors_total{type=\"no_rule\",error_type=\"not_found\"}").count(),
        1,
        "one series per value"
    );
}
