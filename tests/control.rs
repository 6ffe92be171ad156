//! The control plane against a real redis-server: live routes, realm mapping,
//! Redis loss, bad data, config reload, snapshot broadcast.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn redis_config(redis: &RedisServer, workers: usize, refresh: &str, routes: &str) -> String {
    config_text(workers, &format!("[redis]\nurl = \"{}\"\nrefresh_interval = \"{refresh}\"\n", redis.url()), routes)
}

fn rules_json(server_type: u8, strategy: &str, eps: &[SocketAddr]) -> String {
    let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
    format!("{{\"{server_type}\": {{\"server_type\": {server_type}, \"service_name\": \"svc\", \"strategy\": \"{strategy}\", \"endpoints\": [{}]}}}}", eps.join(","))
}

/// Opens a new session for `server_type` and says which mock answered it.
fn lands_on(gw: SocketAddr, st: u8, world: u16, mbs: &[&MockBackend]) -> Option<usize> {
    let mut c = Client::connect(gw);
    c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    c.send(1, sid(world, st, 0), b"where");
    c.try_recv()?;
    let me = c.local();
    mbs.iter().position(|m| {
        !m.sessions().is_empty() && m.drain().iter().any(|e| matches!(e, Event::Connect { addr, .. } if *addr == me))
    })
}

fn wait_lands(gw: SocketAddr, st: u8, world: u16, mbs: &[&MockBackend], want: usize, within: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if lands_on(gw, st, world, mbs) == Some(want) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("sessions did not reach backend {want} within {within:?}");
}

#[test]
fn pushed_routes_take_effect_on_publish_and_on_refresh() {
    let redis = RedisServer::start();
    let (a, b, c) = (mock(), mock(), mock());
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "60s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &b, &c]), Some(0), "static rule serves before Redis has rules");
    redis.set_rules(&rules_json(10, "round_robin", &[b.addr()]));
    redis.publish_rules();
    let took = wait_lands(gw.addr, 10, 1, &[&a, &b, &c], 1, Duration::from_secs(1));
    eprintln!("publish to new backend: {took:?}");
    drop(gw);

    // Without a publish, the periodic refresh picks a change up.
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "1s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    wait_lands(gw.addr, 10, 1, &[&a, &b, &c], 1, Duration::from_secs(2));
    redis.set_rules(&rules_json(10, "round_robin", &[c.addr()]));
    wait_lands(gw.addr, 10, 1, &[&a, &b, &c], 2, Duration::from_secs(3));
}

#[test]
fn realm_based_rule_sends_world_7_to_the_mapped_address() {
    let redis = RedisServer::start();
    let (fallback, realm7) = (mock(), mock());
    let gw = GatewayProcess::spawn(
        &redis_config(&redis, 2, "60s", &route(30, 0, "realm_based", &[fallback.addr()], "")),
        &[],
    );
    redis.cmd(&["HSET", "game-gateway:realm:mapping", "7", &realm7.addr().to_string()]).unwrap();
    redis.cmd(&["PUBLISH", "game-gateway:realm:mapping:notify", "x"]).unwrap();
    wait_lands(gw.addr, 30, 7, &[&fallback, &realm7], 1, Duration::from_secs(2));
    assert_eq!(lands_on(gw.addr, 30, 8, &[&fallback, &realm7]), Some(0), "unmapped realm falls back to the endpoints");
}

#[test]
fn redis_killed_while_traffic_flows_then_restarted_with_new_rules() {
    let mut redis = RedisServer::start();
    let (a, b, c) = (mock(), mock(), mock());
    redis.set_rules(&rules_json(10, "round_robin", &[b.addr()]));
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "1s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    wait_lands(gw.addr, 10, 1, &[&a, &b, &c], 1, Duration::from_secs(2));
    let mut live: Vec<Client> = (0..5).map(|_| Client::connect(gw.addr)).collect();
    for cl in live.iter_mut() {
        cl.echo(1, sid(1, 10, 0), b"before");
    }
    redis.kill();
    let until = Instant::now() + Duration::from_millis(2500);
    let mut n = 0u16;
    while Instant::now() < until {
        for cl in live.iter_mut() {
            cl.echo(n, sid(1, 10, 0), b"during");
        }
        n = n.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(gw.admin, "/ready").0, 200, "stays ready without Redis");
    assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &b, &c]), Some(1), "routes from Redis stay");
    eventually("redis down in metrics", || http_get(gw.admin, "/metrics").1.contains("game_gateway_redis_up 0"));
    // One warning for the state change, not one per retry.
    let warnings = gw.stderr().matches("redis unreachable").count();
    assert_eq!(warnings, 1, "{}", gw.stderr());
    redis.restart();
    redis.set_rules(&rules_json(10, "round_robin", &[c.addr()]));
    wait_lands(gw.addr, 10, 1, &[&a, &b, &c], 2, Duration::from_secs(8));
    // Let every worker switch before the live sessions talk again (a reply
    // in flight from the old backend would still reach them within 1 s).
    all_workers_on_latest(gw.admin);
    for cl in live.iter_mut() {
        cl.echo(9, sid(1, 10, 0), b"after");
    }
}

#[test]
fn bad_redis_data_is_rejected_whole_and_the_last_good_stays() {
    let redis = RedisServer::start();
    let (a, b) = (mock(), mock());
    redis.set_rules(&rules_json(10, "round_robin", &[b.addr()]));
    let gw = GatewayProcess::spawn(&redis_config(&redis, 1, "60s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    wait_lands(gw.addr, 10, 1, &[&a, &b], 1, Duration::from_secs(2));
    let bad = [
        ("{this is not json", "invalid JSON"),
        (r#"{"10": {"server_type": 10, "strategy": "fastest", "endpoints": []}}"#, "unknown strategy"),
        (
            r#"{"10": {"server_type": 10, "strategy": "round_robin", "endpoints": ["not-an-address"]}}"#,
            "not-an-address",
        ),
        (
            r#"[{"server_type": 10, "strategy": "round_robin"}, {"server_type": 10, "strategy": "round_robin"}]"#,
            "duplicate rule",
        ),
    ];
    for (i, (doc, reason)) in bad.iter().enumerate() {
        redis.set_rules(doc);
        redis.publish_rules();
        eventually(&format!("rejection of {reason:?} logged"), || {
            gw.stderr().contains(reason) && gw.stderr().matches("rejected").count() > i
        });
        assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &b]), Some(1), "last good snapshot kept after {reason}");
    }
    let m = http_get(gw.admin, "/metrics").1;
    assert!(m.contains("game_gateway_route_snapshots_rejected_total 4"), "{m}");
}

#[test]
fn original_gateway_sample_data_loads() {
    let redis = RedisServer::start();
    let (a, b) = (mock(), mock());
    let sample = format!(
        r#"{{"10": {{"server_type": 10, "service_name": "account", "strategy": "round_robin", "endpoints": ["{}"]}},
             "15": {{"server_type": 15, "service_name": "version", "strategy": "round_robin", "endpoints": ["{}"]}},
             "200": {{"server_type": 200, "service_name": "game", "strategy": "consistent_hash", "endpoints": []}}}}"#,
        a.addr(),
        b.addr()
    );
    redis.set_rules(&sample);
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "60s", ""), &[]);
    wait_lands(gw.addr, 10, 1, &[&a, &b], 0, Duration::from_secs(2));
    wait_lands(gw.addr, 15, 1, &[&a, &b], 1, Duration::from_secs(2));
    let mut c = Client::connect(gw.addr);
    c.send(1, sid(1, 200, 0), b"no endpoints yet");
    c.echo(2, sid(1, 10, 0), b"ok");
    eventually("no_endpoints counted", || {
        http_get(gw.admin, "/metrics")
            .1
            .contains("game_gateway_routing_errors_total{type=\"no_endpoints\",error_type=\"not_found\"} 1")
    });
    // The operator tool shows the same, resolved.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_game-gateway"))
        .args(["routes", "show", "--redis", &redis.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("rules: 3") && text.contains("type=200"), "{text}");
}

#[test]
fn routes_tool_checks_and_pushes() {
    let redis = RedisServer::start();
    let (a, b) = (mock(), mock());
    let gw = GatewayProcess::spawn(&redis_config(&redis, 1, "60s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    let dir = TempDir::new("rules");
    let good = dir.0.join("good.json");
    std::fs::write(&good, format!(r#"{{"rules": [{{"server_type": 10, "strategy": "round_robin", "endpoints": ["{}"]}}], "realm_mapping": {{"7": "{}"}}}}"#, b.addr(), b.addr())).unwrap();
    let bad = dir.0.join("bad.json");
    std::fs::write(&bad, r#"[{"server_type": 10, "strategy": "nope"}]"#).unwrap();
    let bin = env!("CARGO_BIN_EXE_game-gateway");
    let out = std::process::Command::new(bin).args(["routes", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown strategy"));
    let out = std::process::Command::new(bin).args(["routes", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(bin)
        .args(["routes", "push"])
        .arg(&good)
        .args(["--redis", &redis.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_lands(gw.addr, 10, 1, &[&a, &b], 1, Duration::from_secs(1));
}

#[test]
fn config_file_edit_reloads_without_a_signal_and_reports_restart_keys() {
    let mb = mock();
    let text = config_text(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let gw = GatewayProcess::spawn(&text, &[]);
    let path = gw.stderr_path.with_file_name("gateway.toml");
    let mut c = Client::connect(gw.addr);
    c.echo(1, sid(1, 10, 0), &[0u8; 1500]);
    std::thread::sleep(Duration::from_millis(1100)); // a distinct mtime
    let edited = text
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace("[log]", "[limits]\nmax_message_size = 1000\n\n[log]");
    std::fs::write(&path, edited).unwrap();
    eventually("reload noticed", || gw.stderr().contains("config reloaded"));
    assert!(gw.stderr().contains("server.listen (127.0.0.1:0 -> 127.0.0.1:1)"), "{}", gw.stderr());
    eventually("the lowered max_message_size applies to new frames", || {
        let mut d = Client::connect(gw.addr);
        d.s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let _ = d.send_raw(&Client::frame(1, sid(1, 10, 0), &[0u8; 1500]));
        d.closed()
    });
    c.echo(2, sid(1, 10, 0), &[0u8; 900]);
}

fn all_workers_on_latest(admin: SocketAddr) {
    eventually("every worker runs the latest snapshot", || {
        let (_, body) = http_get(admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let want = v["routes"]["version"].as_u64().unwrap();
        want >= 2 && v["workers"].as_array().unwrap().iter().all(|w| w["route_version"].as_u64() == Some(want))
    });
}

#[test]
fn snapshot_reaches_every_worker() {
    let redis = RedisServer::start();
    let (a, b) = (mock(), mock());
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "60s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    redis.set_rules(&rules_json(10, "round_robin", &[b.addr()]));
    redis.publish_rules();
    all_workers_on_latest(gw.admin);
    // And sessions on both workers use it: open enough to land on each.
    for _ in 0..8 {
        assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &b]), Some(1));
    }
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn route_propagation_is_measured_per_snapshot_and_per_worker() {
    let redis = RedisServer::start();
    let (a, b) = (mock(), mock());
    let gw = GatewayProcess::spawn(&redis_config(&redis, 2, "60s", &route(10, 0, "round_robin", &[a.addr()], "")), &[]);
    eventually("ready", || http_get(gw.admin, "/ready").0 == 200);
    let status = || -> serde_json::Value { serde_json::from_str(&http_get(gw.admin, "/status").1).unwrap() };
    let count = "game_gateway_route_propagation_seconds_count";
    // Redis holds no rules yet: the static snapshot (version 1) serves,
    // and nothing propagated yet (the family exists at zero).
    let v0 = status()["routes"]["version"].as_u64().unwrap();
    assert_eq!(v0, 1);
    assert_eq!(metric_value(&http_get(gw.admin, "/metrics").1, count), Some(0.0));
    let mut applied_before = [0u64; 2];
    for i in 1..=3u64 {
        let to = if i % 2 == 1 { b.addr() } else { a.addr() };
        redis.set_rules(&rules_json(10, "round_robin", &[to]));
        let published = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        redis.publish_rules();
        let want = v0 + i;
        let mut workers = vec![];
        eventually("every worker serves the new snapshot", || {
            let s = status();
            workers = s["workers"].as_array().unwrap().clone();
            s["routes"]["version"].as_u64() == Some(want)
                && workers.iter().all(|w| w["route_version"].as_u64() == Some(want))
        });
        assert_eq!(workers.len(), 2);
        for (w, before) in workers.iter().zip(applied_before.iter_mut()) {
            // Each worker says when it applied the snapshot (after the
            // PUBLISH: the clock is the same machine's) and how long after
            // the notify reached the gateway.
            let at = w["route_applied_at_unix_us"].as_u64().unwrap();
            let delay = w["route_apply_delay_ms"].as_f64().unwrap();
            assert!(at > *before && at as u128 >= published.as_micros(), "{w}");
            assert!(delay > 0.0 && delay < 1000.0, "{w}");
            *before = at;
        }
        // One observation per snapshot, once the last worker applied it.
        eventually("the propagation histogram counts the snapshot", || {
            metric_value(&http_get(gw.admin, "/metrics").1, count) == Some(i as f64)
        });
    }
    let m = http_get(gw.admin, "/metrics").1;
    assert_eq!(metric_value(&m, "game_gateway_route_snapshot_version"), Some((v0 + 3) as f64));
    // Every one of them well under a second (the worker tick is 20 ms).
    assert_eq!(metric_value(&m, "game_gateway_route_propagation_seconds_bucket{le=\"1\"}"), Some(3.0), "{m}");
    let sum = metric_value(&m, "game_gateway_route_propagation_seconds_sum").unwrap();
    assert!(sum > 0.0 && sum < 3.0, "{sum}");
    // And traffic follows the last snapshot (to b).
    assert_eq!(lands_on(gw.addr, 10, 1, &[&a, &b]), Some(1));
}
