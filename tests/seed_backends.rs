//! The Go gateway's two backend modes (`backend_protocol = "seed_tcp"` and
//! `"grpc"`, see docs/BACKENDS.md) against game servers written
//! for the Go gateway: `tests/backends/seed_tcp_backend.py` (one TCP
//! connection per session, opcode 1 only) and `tests/backends/grpc_backend.py`
//! (`gateway.GameGatewayService/StreamPackets`). Both run as child processes
//! (`python3`, or `$PYTHON`; the gRPC one needs `pip install -r
//! tests/backends/requirements.txt`), log what they receive to a file, and
//! are killed when dropped. The gateway runs in-process.
//!
//! What a client sees in both modes: replies with `server_id` 0 and the
//! backend's `msg_id`. The backends' behaviour is chosen by the payload:
//! anything is echoed; `push:N:` adds N frames (msg_id 100+i, `pushed-<i>`);
//! seed TCP `close` closes the backend connection; gRPC `fanout` sends
//! `fanout-to-all` to every session of its stream by `target_session_ids`,
//! gRPC `kickme` answers `server_disconnect`.

mod common;
use common::pybackend::*;
use common::*;
use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BACKOFF: &str = "[backend]\nreconnect_backoff_min = \"50ms\"\nreconnect_backoff_max = \"200ms\"\n";

// ---------------------------------------------------------------- backends

/// A frame line of the seed TCP backend (`conn=.. object_id=.. type=..`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpFrame {
    conn: u32,
    object_id: i64,
    typ: i32,
    payload_hex: String,
    server_id: u32,
    session_id: i64,
    len: usize,
}

fn tcp_frames(lines: &[String]) -> Vec<TcpFrame> {
    lines
        .iter()
        .filter(|l| l.starts_with("conn="))
        .map(|l| {
            let f = kv(l);
            TcpFrame {
                conn: f["conn"].parse().unwrap(),
                object_id: f["object_id"].parse().unwrap(),
                typ: f["type"].parse().unwrap(),
                payload_hex: f["payload"].to_string(),
                server_id: f["server_id"].parse().unwrap(),
                session_id: f["session_id"].parse().unwrap(),
                len: f["len"].parse().unwrap(),
            }
        })
        .collect()
}

fn frame_with(lines: &[String], payload: &[u8]) -> Option<TcpFrame> {
    let h = hex(payload);
    tcp_frames(lines).into_iter().find(|f| f.payload_hex == h)
}

fn bad_lines(lines: &[String]) -> Vec<String> {
    lines.iter().filter(|l| l.starts_with("BAD")).map(|l| truncate(l)).collect()
}

/// Every frame the seed TCP backend got is a plain TRANS as the Go gateway
/// sends it: opcode 1 only (no BAD line), `server_id` 0, `object_id` equal
/// to the gate header's session id.
fn assert_seed_wire_contract(b: &PyBackend) {
    let lines = b.lines();
    assert!(bad_lines(&lines).is_empty(), "frames other than opcode 1 reached the seed TCP backend\n{}", b.dump());
    for f in tcp_frames(&lines) {
        assert_eq!(f.server_id, 0, "server_id must be 0 in seed TCP mode: {f:?}");
        assert_eq!(f.object_id, f.session_id, "object_id must equal the session id: {f:?}");
        assert_ne!(f.object_id, 0, "a session id: {f:?}");
    }
}

/// A gRPC backend log line, by its first word.
fn grpc_lines<'a>(lines: &'a [String], kind: &str) -> Vec<(usize, HashMap<&'a str, &'a str>)> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.split_whitespace().next() == Some(kind))
        .map(|(i, l)| (i, kv(l)))
        .collect()
}

/// The first DATA line carrying `payload`: (index, stream, session).
fn grpc_data(lines: &[String], payload: &[u8]) -> Option<(usize, String, i64)> {
    let h = hex(payload);
    grpc_lines(lines, "DATA")
        .into_iter()
        .find(|(_, f)| f["payload"] == h)
        .map(|(i, f)| (i, f["stream"].to_string(), f["session"].parse().unwrap()))
}

// ---------------------------------------------------------------- helpers

fn seed_route(server_type: u8, b: &PyBackend, extra: &str) -> String {
    route(server_type, 0, "round_robin", &[b.addr], &format!("backend_protocol = \"seed_tcp\"\n{extra}"))
}

fn grpc_route(server_type: u8, b: &PyBackend, extra: &str) -> String {
    route(server_type, 0, "round_robin", &[b.addr], &format!("backend_protocol = \"grpc\"\n{extra}"))
}

/// Round trip in a seed mode: the reply has the same msg_id and payload and
/// `server_id` 0.
fn seed_echo(c: &mut Client, msg_id: u16, server_id: u32, payload: &[u8]) {
    c.send(msg_id, server_id, payload);
    let r = c.try_recv().unwrap_or_else(|| {
        panic!(
            "no reply from the gateway to {:?} (msg_id {msg_id}, server_id {server_id:#010x})",
            String::from_utf8_lossy(&payload[..payload.len().min(40)])
        )
    });
    assert_eq!((r.msg_id, r.server_id, r.payload.len()), (msg_id, 0, payload.len()), "reply header");
    assert_eq!(r.payload, payload);
}

fn expect(c: &mut Client, msg_id: u16, payload: &[u8]) {
    let r = c.try_recv().unwrap_or_else(|| panic!("expected {:?} (msg_id {msg_id})", String::from_utf8_lossy(payload)));
    assert_eq!(r, Reply { msg_id, server_id: 0, payload: payload.to_vec() });
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Stops an in-process gateway (drain `drain`) on another thread, bounded.
fn stop_bounded(gw: game_gateway::gateway::Gateway, drain: Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        gw.stop(drain);
        let _ = tx.send(());
    });
    rx.recv_timeout(drain + LONG).expect("the gateway did not stop in time");
}

// ---------------------------------------------------------------- seed TCP

fn seed_tcp_echo_two_clients(workers: usize) {
    let b = PyBackend::start(Kind::SeedTcp);
    let gw = start(workers, "", &seed_route(11, &b, ""));
    let mut c1 = Client::connect(gw.local_addr());
    let mut c2 = Client::connect(gw.local_addr());
    seed_echo(&mut c1, 1, sid(1, 11, 0), b"c1-a");
    seed_echo(&mut c2, 1, sid(1, 11, 0), b"c2-a");
    seed_echo(&mut c1, 2, sid(1, 11, 3), b"c1-b");
    seed_echo(&mut c2, 65535, sid(1, 11, 0), b"c2-b");
    let big: Vec<u8> = (0..60_000u32).map(|i| (i * 13 % 251) as u8).collect();
    seed_echo(&mut c1, 3, sid(1, 11, 0), &big);
    seed_echo(&mut c2, 4, sid(1, 11, 0), b"");
    let lines = b.wait_log("6 frames logged", |l| tcp_frames(l).len() >= 6);
    let f1 = [frame_with(&lines, b"c1-a").unwrap(), frame_with(&lines, b"c1-b").unwrap()];
    let f2 = [frame_with(&lines, b"c2-a").unwrap(), frame_with(&lines, b"c2-b").unwrap()];
    assert_eq!((f1[0].conn, f1[0].object_id), (f1[1].conn, f1[1].object_id), "client 1: one connection, one session");
    assert_eq!((f2[0].conn, f2[0].object_id), (f2[1].conn, f2[1].object_id), "client 2: one connection, one session");
    assert_ne!(f1[0].conn, f2[0].conn, "two live sessions never share a backend connection");
    assert_ne!(f1[0].object_id, f2[0].object_id, "two sessions, two ids");
    assert_eq!((f1[0].typ, f1[1].typ, f2[1].typ), (1, 2, 65535), "type = the client's msg_id");
    assert_eq!(f1[0].len, 9 + 4, "plain 9-byte gate header without trace propagation");
    assert_seed_wire_contract(&b);
}

#[test]
fn seed_tcp_echo_two_clients_on_one_worker() {
    seed_tcp_echo_two_clients(1);
}

#[test]
fn seed_tcp_echo_two_clients_on_two_workers() {
    seed_tcp_echo_two_clients(2);
}

#[test]
fn seed_tcp_pushes_reach_the_client_in_order() {
    let b = PyBackend::start(Kind::SeedTcp);
    let gw = start(1, "", &seed_route(11, &b, ""));
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 5, sid(1, 11, 0), b"hello");
    c.send(6, sid(1, 11, 0), b"push:3:x");
    expect(&mut c, 6, b"push:3:x");
    for i in 0..3u16 {
        expect(&mut c, 100 + i, format!("pushed-{i}").as_bytes());
    }
    assert!(c.silent_for(Duration::from_millis(100)), "nothing more than the echo and 3 pushes");
    seed_echo(&mut c, 7, sid(1, 11, 0), b"after pushes");
}

#[test]
fn seed_tcp_connection_is_reused_by_the_next_session_and_only_trans_frames_arrive() {
    let b = PyBackend::start(Kind::SeedTcp);
    // Keep-alive on: a gate backend would get PINGs; a seed TCP one never may.
    let extra = "[backend]\nseed_reuse = true\nkeepalive_interval = \"200ms\"\nkeepalive_timeout = \"1s\"\n";
    let gw = start(1, extra, &seed_route(11, &b, ""));
    let mut c1 = Client::connect(gw.local_addr());
    seed_echo(&mut c1, 1, sid(1, 11, 0), b"first session 1");
    seed_echo(&mut c1, 2, sid(1, 11, 0), b"first session 2");
    drop(c1);
    eventually("session 1 ended", || gw.stats().sessions_active == 0);
    // Idle in the pool for a few keep-alive intervals.
    std::thread::sleep(Duration::from_millis(700));
    let mut c2 = Client::connect(gw.local_addr());
    seed_echo(&mut c2, 3, sid(1, 11, 0), b"second session 1");
    seed_echo(&mut c2, 4, sid(2, 11, 9), b"second session 2");
    std::thread::sleep(Duration::from_millis(500));
    let lines = b.wait_log("4 frames", |l| tcp_frames(l).len() >= 4);
    let a = frame_with(&lines, b"first session 1").unwrap();
    let z = frame_with(&lines, b"second session 2").unwrap();
    assert_eq!(a.conn, z.conn, "the second session reuses the idle backend connection\n{}", b.dump());
    assert_ne!(a.object_id, z.object_id, "a new session id on the reused connection");
    let opens = lines.iter().filter(|l| l.starts_with("OPEN ")).count();
    let closes = lines.iter().filter(|l| l.starts_with("CLOSE ")).count();
    assert_eq!((opens, closes), (1, 0), "one backend connection, never closed\n{}", b.dump());
    assert_eq!(tcp_frames(&lines).len(), 4, "exactly the 4 client frames\n{}", b.dump());
    assert_seed_wire_contract(&b);
}

/// Issue 24, 4: by default a session's seed_tcp connection ends with it, so a
/// reply the server sends late for an ended session can never reach the next
/// session (with reuse, the next session took the pooled connection and got
/// the previous player's reply). The server sees EOF; the late reply is
/// counted as dropped, not delivered.
#[test]
fn seed_tcp_late_reply_for_an_ended_session_never_reaches_the_next_session() {
    let b = PyBackend::start(Kind::SeedTcp);
    let gw = start(1, "", &seed_route(11, &b, ""));
    let mut c1 = Client::connect(gw.local_addr());
    seed_echo(&mut c1, 1, sid(1, 11, 0), b"first");
    c1.send(2, sid(1, 11, 0), b"late:400");
    b.wait_log("the late request reached the server", |l| frame_with(l, b"late:400").is_some());
    drop(c1);
    eventually("session 1 ended", || gw.stats().sessions_active == 0);
    let mut c2 = Client::connect(gw.local_addr());
    seed_echo(&mut c2, 3, sid(1, 11, 0), b"second");
    assert!(c2.silent_for(Duration::from_millis(800)), "the next session got nothing of the previous one's");
    seed_echo(&mut c2, 4, sid(1, 11, 0), b"still served");
    let lines = b.lines();
    let (a, z) = (frame_with(&lines, b"first").unwrap(), frame_with(&lines, b"second").unwrap());
    assert_ne!(a.conn, z.conn, "a new connection for the next session\n{}", b.dump());
    let closed = format!("CLOSE conn={} by=peer", a.conn);
    b.wait_log("the server saw EOF on the ended session's connection", |l| l.contains(&closed));
    assert_seed_wire_contract(&b);
}

#[test]
fn seed_tcp_with_trace_propagation_sends_the_33_byte_gate_header() {
    let b = PyBackend::start_with(Kind::SeedTcp, &["--trace"]);
    let gw = start(1, "", &seed_route(11, &b, "trace_propagation = true"));
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 1, sid(1, 11, 0), b"traced");
    let lines = b.wait_log("1 frame", |l| !tcp_frames(l).is_empty());
    let f = frame_with(&lines, b"traced").unwrap_or_else(|| panic!("payload misplaced\n{}", b.dump()));
    assert_eq!(f.len, 33 + 6, "gate header of 33 bytes (9 + 16 trace id + 8 span id)");
    assert_seed_wire_contract(&b);
}

#[test]
fn seed_tcp_server_closing_the_connection_closes_that_client_only() {
    let b = PyBackend::start(Kind::SeedTcp);
    let gw = start(1, "", &seed_route(11, &b, ""));
    let mut a = Client::connect(gw.local_addr());
    let mut other = Client::connect(gw.local_addr());
    seed_echo(&mut a, 1, sid(1, 11, 0), b"a");
    seed_echo(&mut other, 1, sid(1, 11, 0), b"other");
    a.send(2, sid(1, 11, 0), b"close");
    assert!(a.closed(), "the backend closed the session's connection: the gateway closes the client");
    seed_echo(&mut other, 2, sid(1, 11, 0), b"other still served");
    let mut fresh = Client::connect(gw.local_addr());
    seed_echo(&mut fresh, 1, sid(1, 11, 0), b"a new session works");
    let lines = b.lines();
    let ca = frame_with(&lines, b"a").unwrap().conn;
    let cf = frame_with(&lines, b"a new session works").unwrap().conn;
    assert_ne!(ca, cf, "the closed connection is not reused");
    assert!(lines.iter().any(|l| l == &format!("CLOSE conn={ca} by=server")));
    eventually("two sessions left", || gw.stats().sessions_active == 2);
    assert_seed_wire_contract(&b);
}

#[test]
fn seed_tcp_backend_killed_and_restarted_closes_clients_and_new_clients_work() {
    let mut b = PyBackend::start(Kind::SeedTcp);
    let gw = start(2, BACKOFF, &seed_route(11, &b, ""));
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(gw.local_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        seed_echo(c, 1, sid(1, 11, 0), format!("before {i}").as_bytes());
    }
    b.kill();
    for c in clients.iter_mut() {
        assert!(c.closed(), "a session whose backend connection was lost is closed");
    }
    eventually("sessions gone", || gw.stats().sessions_active == 0);
    b.restart();
    let deadline = Instant::now() + LONG;
    loop {
        let mut c = Client::connect(gw.local_addr());
        c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        c.send(1, sid(1, 11, 0), b"after restart");
        if matches!(c.try_recv(), Some(r) if r.payload == b"after restart" && r.server_id == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "no new session served by the restarted backend\n{}", b.dump());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!b.lines_since_restart().is_empty());
    assert_seed_wire_contract(&b);
}

// ---------------------------------------------------------------- gRPC

#[test]
fn grpc_echo_three_clients_over_two_workers_with_connect_and_disconnect() {
    let b = PyBackend::start(Kind::Grpc);
    let gw = start(2, "", &grpc_route(12, &b, ""));
    let t0 = now_ms();
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(gw.local_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        seed_echo(c, 10 + i as u16, sid(1, 12, 0), format!("g{i}-0").as_bytes());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        seed_echo(c, 20 + i as u16, sid(1, 12, 1), format!("g{i}-1").as_bytes());
    }
    drop(clients);
    let lines = b.wait_log("3 disconnects", |l| grpc_lines(l, "DISCONNECT").len() >= 3);

    let opens = grpc_lines(&lines, "STREAM_OPEN");
    assert!((1..=2).contains(&opens.len()), "one stream per worker at most, got {}\n{}", opens.len(), b.dump());
    for (_, f) in &opens {
        assert!(f.get("gateway-name").is_some_and(|n| *n != "-" && !n.is_empty()), "gateway-name header\n{}", b.dump());
    }
    let mut sessions = vec![];
    for i in 0..3 {
        let (d0, stream, s) = grpc_data(&lines, format!("g{i}-0").as_bytes()).expect("first data packet");
        let (d1, stream1, s1) = grpc_data(&lines, format!("g{i}-1").as_bytes()).expect("second data packet");
        assert_eq!((&stream1, s1), (&stream, s), "one session on one stream");
        assert!(d0 < d1);
        assert_ne!(s, 0, "a session id");
        let connects: Vec<_> = grpc_lines(&lines, "CONNECT")
            .into_iter()
            .filter(|(_, f)| f["session"] == s.to_string().as_str() && f["stream"] == stream.as_str())
            .collect();
        assert_eq!(connects.len(), 1, "one connect for session {s}\n{}", b.dump());
        let (ci, cf) = &connects[0];
        assert!(*ci < d0, "connect before the session's first data packet\n{}", b.dump());
        assert!(cf["client_ip"].starts_with("127.0.0.1"), "client_ip {:?}", cf["client_ip"]);
        assert_eq!(cf["protocol"], "tcp");
        let ct: i64 = cf["connect_time"].parse().unwrap_or_else(|_| panic!("connect_time in Unix ms: {cf:?}"));
        assert!((t0 - 60_000..now_ms() + 60_000).contains(&ct), "connect_time {ct} is Unix ms");
        let disc: Vec<_> = grpc_lines(&lines, "DISCONNECT")
            .into_iter()
            .filter(|(_, f)| f["session"] == s.to_string().as_str() && f["stream"] == stream.as_str())
            .collect();
        assert_eq!(disc.len(), 1, "one disconnect for session {s}\n{}", b.dump());
        assert!(disc[0].0 > d1, "disconnect after the last data packet");
        assert_ne!(disc[0].1["reason"], "-", "disconnect carries a reason");
        sessions.push(s);
    }
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 3, "three sessions");
    assert!(
        grpc_lines(&lines, "DATA").iter().all(|(_, f)| f["known"] == "1"),
        "no data packet before its session's connect\n{}",
        b.dump()
    );
}

#[test]
fn grpc_pushes_reach_the_client_in_order() {
    let b = PyBackend::start(Kind::Grpc);
    let gw = start(1, "", &grpc_route(12, &b, ""));
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 1, sid(1, 12, 0), b"hello");
    c.send(6, sid(1, 12, 0), b"push:3:x");
    expect(&mut c, 6, b"push:3:x");
    for i in 0..3u16 {
        expect(&mut c, 100 + i, format!("pushed-{i}").as_bytes());
    }
    assert!(c.silent_for(Duration::from_millis(100)));
}

#[test]
fn grpc_fanout_by_target_session_ids_reaches_every_listed_client() {
    let b = PyBackend::start(Kind::Grpc);
    let gw = start(1, "", &grpc_route(12, &b, ""));
    let mut clients: Vec<Client> = (0..4).map(|_| Client::connect(gw.local_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        seed_echo(c, 1, sid(1, 12, 0), format!("f{i}").as_bytes());
    }
    // The server answers with target_session_ids = all 4 sessions (and
    // session_id = the sender's, which the gateway must ignore).
    clients[0].send(42, sid(1, 12, 0), b"fanout");
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.try_recv().unwrap_or_else(|| panic!("client {i} got no fan-out\n{}", b.dump()));
        assert_eq!(r, Reply { msg_id: 42, server_id: 0, payload: b"fanout-to-all".to_vec() }, "client {i}");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(c.silent_for(Duration::from_millis(100)), "client {i} got the fan-out exactly once");
    }
}

#[test]
fn grpc_server_disconnect_closes_that_client_only() {
    let b = PyBackend::start(Kind::Grpc);
    let gw = start(1, "", &grpc_route(12, &b, ""));
    let mut a = Client::connect(gw.local_addr());
    let mut other = Client::connect(gw.local_addr());
    seed_echo(&mut a, 1, sid(1, 12, 0), b"a");
    seed_echo(&mut other, 1, sid(1, 12, 0), b"other");
    a.send(2, sid(1, 12, 0), b"kickme");
    assert!(a.closed(), "server_disconnect closes the client");
    seed_echo(&mut other, 2, sid(1, 12, 0), b"other still served");
    let lines = b.lines();
    let (_, _, sa) = grpc_data(&lines, b"a").unwrap();
    b.wait_log("a disconnect for the kicked session", |l| {
        grpc_lines(l, "DISCONNECT").iter().any(|(_, f)| f["session"] == sa.to_string().as_str())
    });
    let (_, _, so) = grpc_data(&b.lines(), b"other").unwrap();
    assert!(
        !grpc_lines(&b.lines(), "DISCONNECT").iter().any(|(_, f)| f["session"] == so.to_string().as_str()),
        "the other session is not disconnected"
    );
    eventually("one session left", || gw.stats().sessions_active == 1);
}

#[test]
fn grpc_server_killed_and_restarted_closes_sessions_and_new_sessions_work() {
    let mut b = PyBackend::start(Kind::Grpc);
    let gw = start(2, BACKOFF, &grpc_route(12, &b, ""));
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(gw.local_addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        seed_echo(c, 1, sid(1, 12, 0), format!("before {i}").as_bytes());
    }
    b.kill();
    for c in clients.iter_mut() {
        assert!(c.closed(), "a session on the lost stream is closed");
    }
    eventually("sessions gone", || gw.stats().sessions_active == 0);
    b.restart();
    let deadline = Instant::now() + LONG;
    loop {
        let mut c = Client::connect(gw.local_addr());
        c.s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        c.send(1, sid(1, 12, 0), b"after restart");
        if matches!(c.try_recv(), Some(r) if r.payload == b"after restart" && r.server_id == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "no new session served after the server came back\n{}", b.dump());
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = b.lines_since_restart();
    let opens = grpc_lines(&lines, "STREAM_OPEN");
    assert!(!opens.is_empty() && opens.iter().all(|(_, f)| f["gateway-name"] != "-"), "reconnected with gateway-name");
    let (d, stream, s) = grpc_data(&lines, b"after restart").unwrap();
    assert!(
        grpc_lines(&lines, "CONNECT")
            .iter()
            .any(|(i, f)| *i < d && f["stream"] == stream.as_str() && f["session"] == s.to_string().as_str()),
        "connect before data on the new stream\n{}",
        b.dump()
    );
}

#[test]
fn grpc_with_trace_propagation_sends_trace_ids_in_metadata() {
    let b = PyBackend::start(Kind::Grpc);
    let gw = start(1, "", &grpc_route(12, &b, "trace_propagation = true"));
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 1, sid(1, 12, 0), b"t1");
    seed_echo(&mut c, 2, sid(1, 12, 0), b"t2");
    let lines = b.lines();
    let data = grpc_lines(&lines, "DATA");
    assert_eq!(data.len(), 2, "{}", b.dump());
    let (t1, t2) = (data[0].1["trace_id"], data[1].1["trace_id"]);
    assert!(t1 != "-" && t1 == t2, "one trace id per session: {t1} {t2}");
    assert!(data[0].1["span_id"] != "-" && data[0].1["span_id"] != data[1].1["span_id"], "one span per packet");
}

// ---------------------------------------------------------------- mixed

#[test]
fn mixed_gate_seed_tcp_and_grpc_routes_in_one_gateway() {
    let mb = mock();
    let st = PyBackend::start(Kind::SeedTcp);
    let gr = PyBackend::start(Kind::Grpc);
    let routes = route(10, 0, "round_robin", &[mb.addr()], "") + &seed_route(11, &st, "") + &grpc_route(12, &gr, "");
    let gw = start(2, "", &routes);
    let mut c10 = Client::connect(gw.local_addr());
    let mut c11 = Client::connect(gw.local_addr());
    let mut c12 = Client::connect(gw.local_addr());
    for round in 0..3u16 {
        c10.echo(round, sid(1, 10, 2), format!("gate {round}").as_bytes());
        seed_echo(&mut c11, round, sid(1, 11, 2), format!("seed {round}").as_bytes());
        seed_echo(&mut c12, round, sid(1, 12, 2), format!("grpc {round}").as_bytes());
    }
    assert!(session_of(&mb, c10.local()) > 0, "the gate backend got CONNECT as before");
    assert_eq!(mb.sessions().len(), 1);
    let tl = st.lines();
    assert_eq!(tcp_frames(&tl).len(), 3, "only the server type 11 frames\n{}", st.dump());
    assert_seed_wire_contract(&st);
    let gl = gr.lines();
    assert_eq!(grpc_lines(&gl, "DATA").len(), 3, "only the server type 12 frames\n{}", gr.dump());
    assert_eq!(grpc_lines(&gl, "CONNECT").len(), 1);
}

#[test]
fn one_client_uses_gate_seed_tcp_and_grpc_routes_with_frame_binding() {
    let mb = mock();
    let st = PyBackend::start(Kind::SeedTcp);
    let gr = PyBackend::start(Kind::Grpc);
    let routes = route(10, 0, "round_robin", &[mb.addr()], "")
        + &seed_route(11, &st, "binding = \"frame\"")
        + &grpc_route(12, &gr, "binding = \"frame\"");
    let gw = start(1, "", &routes);
    let mut c = Client::connect(gw.local_addr());
    for round in 0..2u16 {
        c.echo(round, sid(1, 10, 0), b"to gate");
        seed_echo(&mut c, round, sid(1, 11, 0), b"to seed tcp");
        seed_echo(&mut c, round, sid(1, 12, 0), b"to grpc");
    }
    let s = session_of(&mb, c.local());
    let f = frame_with(&st.lines(), b"to seed tcp").unwrap();
    let (_, _, g) = grpc_data(&gr.lines(), b"to grpc").unwrap();
    assert_eq!((f.object_id, g), (s, s), "one client session, one session id on every backend");
    assert_eq!(tcp_frames(&st.lines()).len(), 2);
    assert_eq!(grpc_lines(&gr.lines(), "DATA").len(), 2);
}

// ---------------------------------------------------------------- drain

#[test]
fn drain_delivers_frames_sent_before_it_to_seed_tcp_and_grpc_backends() {
    const N: u16 = 50;
    let st = PyBackend::start(Kind::SeedTcp);
    let gr = PyBackend::start(Kind::Grpc);
    let gw = start(2, "", &(seed_route(11, &st, "") + &grpc_route(12, &gr, "")));
    let mut seed_clients: Vec<Client> = (0..4).map(|_| Client::connect(gw.local_addr())).collect();
    let mut grpc_clients: Vec<Client> = (0..4).map(|_| Client::connect(gw.local_addr())).collect();
    for (i, c) in seed_clients.iter_mut().enumerate() {
        seed_echo(c, 0, sid(1, 11, 0), format!("s{i}-0").as_bytes());
    }
    for (i, c) in grpc_clients.iter_mut().enumerate() {
        seed_echo(c, 0, sid(1, 12, 0), format!("g{i}-0").as_bytes());
    }
    for (tag, st_, clients) in [("s", 11u8, &mut seed_clients), ("g", 12u8, &mut grpc_clients)] {
        for (i, c) in clients.iter_mut().enumerate() {
            let mut burst = Vec::new();
            for n in 1..=N {
                burst.extend(Client::frame(n, sid(1, st_, 0), format!("{tag}{i}-{n}").as_bytes()));
            }
            c.send_raw(&burst).unwrap();
        }
    }
    stop_bounded(gw, Duration::from_millis(300));

    let tl = st.wait_log("every seed TCP frame", |l| tcp_frames(l).len() >= 4 * (N as usize + 1));
    let frames = tcp_frames(&tl);
    for i in 0..4 {
        let conn = frame_with(&tl, format!("s{i}-0").as_bytes()).unwrap().conn;
        let got: Vec<String> = frames.iter().filter(|f| f.conn == conn).map(|f| f.payload_hex.clone()).collect();
        let want: Vec<String> = (0..=N).map(|n| hex(format!("s{i}-{n}").as_bytes())).collect();
        assert_eq!(got, want, "seed TCP client {i}: every frame, in order, on its connection");
    }
    assert_seed_wire_contract(&st);

    let gl = gr.wait_log("every gRPC data packet and a disconnect per session", |l| {
        grpc_lines(l, "DATA").len() >= 4 * (N as usize + 1) && grpc_lines(l, "DISCONNECT").len() >= 4
    });
    for i in 0..4 {
        let (_, stream, s) = grpc_data(&gl, format!("g{i}-0").as_bytes()).unwrap();
        let mine: Vec<(usize, String)> = grpc_lines(&gl, "DATA")
            .into_iter()
            .filter(|(_, f)| f["session"] == s.to_string().as_str() && f["stream"] == stream.as_str())
            .map(|(idx, f)| (idx, f["payload"].to_string()))
            .collect();
        let want: Vec<String> = (0..=N).map(|n| hex(format!("g{i}-{n}").as_bytes())).collect();
        assert_eq!(
            mine.iter().map(|m| m.1.clone()).collect::<Vec<_>>(),
            want,
            "gRPC client {i}: every frame, in order"
        );
        let disc = grpc_lines(&gl, "DISCONNECT")
            .into_iter()
            .find(|(_, f)| f["session"] == s.to_string().as_str())
            .unwrap_or_else(|| panic!("no disconnect for gRPC session {s}"));
        assert!(disc.0 > mine.last().unwrap().0, "disconnect follows the session's last data packet");
    }
    for c in seed_clients.iter_mut().chain(grpc_clients.iter_mut()) {
        // Drain whatever echoes were delivered, then the close.
        while c.try_recv().is_some() {}
        assert!(c.closed(), "every client is closed by the drain");
    }
}

// ---------------------------------------------------------------- binding

#[test]
fn connection_binding_sends_later_frames_to_the_first_backend_whatever_their_server_id() {
    let st = PyBackend::start(Kind::SeedTcp);
    let gr = PyBackend::start(Kind::Grpc);
    let routes = seed_route(11, &st, "binding = \"connection\"") + &grpc_route(12, &gr, "");
    let gw = start(1, "", &routes);
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 1, sid(1, 11, 0), b"first frame picks the backend");
    seed_echo(&mut c, 2, sid(1, 99, 0), b"server type 99 has no rule");
    seed_echo(&mut c, 3, sid(1, 12, 0), b"server type 12 is a grpc route");
    seed_echo(&mut c, 4, sid(7, 11, 5), b"other world and instance");
    let lines = st.wait_log("4 frames", |l| tcp_frames(l).len() >= 4);
    let frames = tcp_frames(&lines);
    assert_eq!(frames.len(), 4, "{}", st.dump());
    assert!(
        frames.iter().all(|f| (f.conn, f.object_id) == (frames[0].conn, frames[0].object_id)),
        "every frame on the first frame's backend connection and session\n{}",
        st.dump()
    );
    assert!(grpc_lines(&gr.lines(), "DATA").is_empty(), "nothing reached the grpc route\n{}", gr.dump());
    assert_seed_wire_contract(&st);
}

#[test]
fn connection_binding_on_a_grpc_route_keeps_the_session_on_its_stream() {
    let st = PyBackend::start(Kind::SeedTcp);
    let gr = PyBackend::start(Kind::Grpc);
    let routes = grpc_route(12, &gr, "binding = \"connection\"") + &seed_route(11, &st, "");
    let gw = start(1, "", &routes);
    let mut c = Client::connect(gw.local_addr());
    seed_echo(&mut c, 1, sid(1, 12, 0), b"first frame picks grpc");
    seed_echo(&mut c, 2, sid(1, 99, 0), b"no rule for 99");
    seed_echo(&mut c, 3, sid(1, 11, 0), b"11 is a seed tcp route");
    let lines = gr.wait_log("3 data packets", |l| grpc_lines(l, "DATA").len() >= 3);
    let data = grpc_lines(&lines, "DATA");
    assert!(
        data.iter().all(|(_, f)| (f["stream"], f["session"]) == (data[0].1["stream"], data[0].1["session"])),
        "one session on one stream\n{}",
        gr.dump()
    );
    assert_eq!(grpc_lines(&lines, "CONNECT").len(), 1, "one connect for the session");
    assert!(tcp_frames(&st.lines()).is_empty(), "nothing reached the seed TCP route");
}

// ---------------------------------------------------------------- harness
//
// These pass without gateway support: they check that the Python backends
// start, log, and restart on their port, so a failure above is the
// gateway's and not the harness's (or a missing `pip install`).

fn seed_frame(typ: i32, session: i64, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(((9 + payload.len()) as i32).to_le_bytes());
    b.extend(typ.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(session.to_le_bytes());
    b.push(opcode);
    b.extend(session.to_le_bytes());
    b.extend(payload);
    b
}

fn read_seed_frame(s: &mut std::net::TcpStream) -> (i32, u32, i64, u8, i64, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 29];
    s.read_exact(&mut h).unwrap();
    let len = i32::from_le_bytes(h[0..4].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len - 9];
    s.read_exact(&mut p).unwrap();
    (
        i32::from_le_bytes(h[4..8].try_into().unwrap()),
        u32::from_le_bytes(h[8..12].try_into().unwrap()),
        i64::from_le_bytes(h[12..20].try_into().unwrap()),
        h[20],
        i64::from_le_bytes(h[21..29].try_into().unwrap()),
        p,
    )
}

#[test]
fn harness_seed_tcp_backend_speaks_the_go_gateway_framing() {
    let mut b = PyBackend::start(Kind::SeedTcp);
    let mut s = std::net::TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(&seed_frame(7, 1001, 1, b"hello")).unwrap();
    assert_eq!(read_seed_frame(&mut s), (7, 0, 1001, 1, 1001, b"hello".to_vec()));
    s.write_all(&seed_frame(8, 1001, 1, b"push:2:")).unwrap();
    assert_eq!(read_seed_frame(&mut s).5, b"push:2:");
    assert_eq!(read_seed_frame(&mut s), (100, 0, 1001, 1, 1001, b"pushed-0".to_vec()));
    assert_eq!(read_seed_frame(&mut s), (101, 0, 1001, 1, 1001, b"pushed-1".to_vec()));
    // A later session on the same connection.
    s.write_all(&seed_frame(9, -5, 1, b"reused")).unwrap();
    assert_eq!(read_seed_frame(&mut s).2, -5);
    assert_seed_wire_contract(&b);
    s.write_all(&seed_frame(0, 1001, 7, b"")).unwrap();
    let lines = b.wait_log("the PING", |l| !bad_lines(l).is_empty());
    assert!(bad_lines(&lines)[0].starts_with("BAD opcode=7 conn=1"), "{lines:?}");
    let f = frame_with(&lines, b"reused").unwrap();
    assert_eq!((f.conn, f.object_id, f.typ, f.len), (1, -5, 9, 15));
    s.write_all(&seed_frame(1, 1001, 1, b"close")).unwrap();
    let mut one = [0u8; 1];
    assert!(matches!(std::io::Read::read(&mut s, &mut one), Ok(0) | Err(_)), "close closes the connection");
    let port = b.addr.port();
    b.restart();
    assert_eq!(b.addr.port(), port);
    let mut s = std::net::TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(&seed_frame(1, 2, 1, b"again")).unwrap();
    assert_eq!(read_seed_frame(&mut s).5, b"again");
    assert_eq!(tcp_frames(&b.lines_since_restart()).len(), 1);
}

#[test]
fn harness_grpc_backend_starts_and_restarts_on_its_port() {
    let mut b = PyBackend::start(Kind::Grpc);
    let port = b.addr.port();
    assert!(std::net::TcpStream::connect(b.addr).is_ok());
    b.restart();
    assert_eq!(b.addr.port(), port);
    assert!(std::net::TcpStream::connect(b.addr).is_ok());
}
