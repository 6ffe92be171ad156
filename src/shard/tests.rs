//! The shard's rules, tested without sockets: events in, actions and queued
//! bytes out.

use super::*;
use crate::protocol::backend::{self as bproto, Body, Opcode};
use crate::protocol::{client as cproto, ServerId};
use std::net::SocketAddr;

const A: &str = "127.0.0.1:7001";
const B: &str = "127.0.0.1:7002";

fn route(st: u8, ep: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nserver_type = {st}\nworld_id = 0\nservice_name = \"s{st}\"\nstrategy = \"round_robin\"\nendpoints = [\"{ep}\"]\n{extra}\n"
    )
}

fn config(limits: &str, backend: &str, routes: &str) -> Arc<Config> {
    let text = format!(
        "[server]\nworkers = 1\n[limits]\n{limits}\n[backend]\nconnections_per_endpoint = 1\n{backend}\n[log]\naccess_log = false\n{routes}"
    );
    Arc::new(Config::from_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}")))
}

fn table(cfg: &Config, version: u64) -> Arc<RouteTable> {
    Arc::new(RouteTable::new(version, cfg.routes.clone(), vec![]))
}

/// A decoded frame from a backend queue.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    Connect(i64),
    Trans(i64, Vec<u8>),
    Disconnect(i64, u8),
    Ping,
    Pong,
}

struct Harness {
    sh: Shard,
    now: Instant,
    /// Every action seen, in order.
    log: Vec<Action>,
    /// Live backend streams by address (from Dial actions).
    streams: AHashMap<SocketAddr, (ConnId, u64)>,
}

impl Harness {
    fn new(cfg: Arc<Config>) -> Harness {
        let routes = table(&cfg, 1);
        let sh = Shard::new(ShardSetup { index: 0, cfg, routes, admission: Default::default(), seed: 42 });
        Harness { sh, now: Instant::now(), log: Vec::new(), streams: AHashMap::new() }
    }

    /// Collects actions; dials "succeed" at once unless `connect` is false.
    fn pump(&mut self) {
        let mut acts = Vec::new();
        self.sh.drain_actions(&mut acts);
        for a in &acts {
            if let Action::Dial { conn, generation, addr, .. } = a {
                self.streams.insert(*addr, (*conn, *generation));
                assert!(self.sh.backend_connected(*conn, *generation, Duration::ZERO, self.now));
            }
        }
        self.log.extend(acts);
        let mut more = Vec::new();
        self.sh.drain_actions(&mut more);
        self.log.extend(more);
    }

    fn take_log(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.log)
    }

    fn accept(&mut self, port: u16) -> SessionKey {
        let id = self.sh.accept(SocketAddr::from(([10, 0, 0, 1], port)), self.now).unwrap();
        self.pump();
        id
    }

    fn send(&mut self, id: SessionKey, st: u8, payload: &[u8]) -> Result<(), DisconnectReason> {
        let mut buf = BytesMut::new();
        assert!(cproto::encode(&mut buf, 7, ServerId::new(false, 1, st, 0), payload));
        let n = buf.len();
        let r = self.sh.client_data(id, &mut buf, n, self.now);
        self.pump();
        r.map(|_| ())
    }

    fn stream(&self, addr: &str) -> (ConnId, u64) {
        self.streams[&addr.parse::<SocketAddr>().unwrap()]
    }

    /// What the gateway queued on the stream to `addr`, decoded.
    fn backend_out(&mut self, addr: &str) -> Vec<Sent> {
        let (c, g) = self.stream(addr);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        if let BackendOut::Write(done) = self.sh.take_backend_out(c, g, &mut buf, None) {
            let mut empty = BytesMut::new();
            self.sh.take_backend_out(c, g, &mut empty, Some((done, self.now)));
        }
        self.pump();
        while let Some(h) = bproto::check(&buf, 1 << 20).unwrap() {
            let len = h.frame_len();
            out.push(match bproto::parse(&h, &buf[..len], false).unwrap() {
                Body::Connect { .. } => Sent::Connect(h.session_id),
                Body::Trans { payload, .. } => Sent::Trans(h.session_id, payload.to_vec()),
                Body::Disconnect { reason, .. } => Sent::Disconnect(h.session_id, reason),
                Body::Ping => Sent::Ping,
                Body::Pong => Sent::Pong,
                other => panic!("unexpected {other:?}"),
            });
            bytes::Buf::advance(&mut buf, len);
        }
        out
    }

    /// The backend at `addr` sends `frame`.
    fn backend_send(&mut self, addr: &str, frame: BytesMut) -> BackendRead {
        let (c, g) = self.stream(addr);
        let mut buf = frame;
        let n = buf.len();
        let r = self.sh.backend_data(c, g, &mut buf, n, self.now);
        self.pump();
        r
    }

    /// Client frames queued for session `id`: (msg_id, payload).
    fn client_out(&mut self, id: SessionKey) -> Vec<(u16, Vec<u8>)> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        if let ClientOut::Write(_) = self.sh.take_client_out(id, &mut buf, None) {
            while let Some(h) = cproto::check(&buf, cproto::MAX_PAYLOAD).unwrap() {
                out.push((h.msg_id, buf[cproto::HEADER_LEN..h.frame_len()].to_vec()));
                bytes::Buf::advance(&mut buf, h.frame_len());
            }
        }
        out
    }

    fn close(&mut self, id: SessionKey) {
        self.sh.client_closed(id, self.now);
        self.pump();
    }

    fn dropped(&self, reason: &str) -> u64 {
        WorkerStats::get(&self.sh.stats(self.now).frames_dropped, reason)
    }

    fn shutdowns(&mut self) -> Vec<(SessionKey, Shut)> {
        self.take_log()
            .into_iter()
            .filter_map(|a| match a {
                Action::ShutdownClient(id, how) => Some((id, how)),
                _ => None,
            })
            .collect()
    }
}

fn trans(session: i64, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    bproto::encode_reply(&mut b, 9, ServerId::new(false, 1, 10, 0).0, session, payload);
    b
}

#[test]
fn first_frame_binds_with_connect_then_replies_reach_the_session() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"hi").unwrap();
    assert!(h.take_log().iter().any(|a| matches!(a, Action::Dial { .. } | Action::WakeBackend(_))));
    assert_eq!(h.backend_out(A), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"hi".to_vec())]);
    h.send(s, 10, b"again").unwrap();
    assert_eq!(h.backend_out(A), vec![Sent::Trans(s.id, b"again".to_vec())], "bound once");
    h.backend_send(A, trans(s.id, b"reply"));
    assert!(h.take_log().iter().any(|a| matches!(a, Action::WakeClient(id) if *id == s)));
    assert_eq!(h.client_out(s), vec![(9, b"reply".to_vec())]);
    h.close(s);
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::ClientClosed as u8)]);
    assert!(h.take_log().iter().any(|a| matches!(a, Action::SessionsGone)));
}

#[test]
fn a_backend_reaches_only_sessions_bound_to_it() {
    let mut h = Harness::new(config("", "", &(route(10, A, "") + &route(11, B, ""))));
    let s1 = h.accept(1);
    let s2 = h.accept(2);
    h.send(s1, 10, b"a").unwrap();
    h.send(s2, 11, b"b").unwrap();
    h.backend_out(A);
    h.backend_out(B);
    // B answers for s1 (bound to A only), and for an id nobody has.
    h.backend_send(B, trans(s1.id, b"intrusion"));
    h.backend_send(B, trans(0x7777, b"unknown"));
    assert!(h.client_out(s1).is_empty());
    assert_eq!(h.dropped("unbound_session"), 2);
    // A multicast from B may only reach B's sessions.
    let mut m = BytesMut::new();
    bproto::encode_multicast(&mut m, 9, 0, &[s1.id, s2.id], b"mc");
    h.backend_send(B, m);
    assert!(h.client_out(s1).is_empty());
    assert_eq!(h.client_out(s2), vec![(9, b"mc".to_vec())]);
    assert_eq!(h.dropped("unbound_session"), 3);
}

#[test]
fn multicast_and_broadcast_fan_out_to_bound_sessions() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let ids: Vec<SessionKey> = (1..=3).map(|p| h.accept(p)).collect();
    let other = h.accept(9); // never bound
    for &s in &ids {
        h.send(s, 10, b"x").unwrap();
    }
    h.backend_out(A);
    let mut m = BytesMut::new();
    bproto::encode_multicast(&mut m, 9, 0, &[ids[0].id, ids[2].id], b"some");
    h.backend_send(A, m);
    assert_eq!(h.client_out(ids[0]), vec![(9, b"some".to_vec())]);
    assert!(h.client_out(ids[1]).is_empty());
    assert_eq!(h.client_out(ids[2]), vec![(9, b"some".to_vec())]);
    let mut b = BytesMut::new();
    bproto::encode_broadcast(&mut b, 9, 0, b"all");
    h.backend_send(A, b);
    for &s in &ids {
        assert_eq!(h.client_out(s), vec![(9, b"all".to_vec())]);
    }
    assert!(h.client_out(other).is_empty(), "broadcast reaches the connection's sessions only");
}

#[test]
fn kick_delivers_its_payload_then_closes_with_reason_5() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let mut k = BytesMut::new();
    bproto::encode_kick(&mut k, 9, 0, s.id, b"bye");
    h.backend_send(A, k);
    assert_eq!(h.client_out(s), vec![(9, b"bye".to_vec())]);
    assert_eq!(h.shutdowns(), vec![(s, Shut::Read)]);
    // Bytes the client sent before the close are still forwarded.
    h.send(s, 10, b"last").unwrap();
    h.close(s);
    assert_eq!(
        h.backend_out(A),
        vec![Sent::Trans(s.id, b"last".to_vec()), Sent::Disconnect(s.id, DisconnectReason::Kicked as u8)]
    );
}

#[test]
fn backend_loss_closes_sessions_by_default_and_counts_queued_frames() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.send(s, 10, b"y").unwrap(); // queued, never written
    let (c, g) = h.stream(A);
    h.take_log();
    h.sh.backend_lost(c, g, LossKind::ReadFailed, &"test", h.now);
    h.pump();
    let log = h.take_log();
    assert!(log
        .iter()
        .any(|a| matches!(a, Action::CloseBackend { conn, generation, .. } if *conn == c && *generation == g)));
    assert!(log.iter().any(|a| matches!(a, Action::ShutdownClient(id, Shut::Read) if *id == s)));
    assert_eq!(h.dropped("backend_lost"), 3, "CONNECT and two frames were queued");
    h.close(s);
    let st = h.sh.stats(h.now);
    assert_eq!(WorkerStats::get(&st.sessions_closed, "backend_lost"), 1);
    // A second report of the same loss changes nothing.
    h.sh.backend_lost(c, g, LossKind::WriteFailed, &"again", h.now);
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).backends[&Arc::from(A)].errors, "write_failed"), 0);
}

#[test]
fn backend_loss_with_rebind_keeps_the_session_and_rebinds_on_its_next_frame() {
    let mut h = Harness::new(config("", "", &route(10, A, "on_backend_loss = \"rebind\"")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let (c, g) = h.stream(A);
    h.sh.backend_lost(c, g, LossKind::ClosedByBackend, &"eof", h.now);
    h.pump();
    assert!(h.shutdowns().is_empty(), "the session stays open");
    // While the connection backs off, frames are routing errors.
    h.send(s, 10, b"during").unwrap();
    assert_eq!(h.dropped("routing_error"), 1);
    // After the backoff the next frame redials and announces the session again.
    h.now += Duration::from_secs(6);
    h.send(s, 10, b"after").unwrap();
    let (c2, g2) = h.stream(A);
    assert_eq!((c2, g2 > g), (c, true), "same slot, new generation");
    assert_eq!(h.backend_out(A), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"after".to_vec())]);
    // A reply on the old generation cannot reach anyone.
    assert_eq!(h.sh.backend_data(c, g, &mut trans(s.id, b"old"), 0, h.now), BackendRead::Stop);
}

#[test]
fn route_change_unbinds_with_reason_8_and_retires_the_old_connection() {
    let cfg = config("", "", &route(10, A, ""));
    let mut h = Harness::new(cfg);
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let (ca, ga) = h.stream(A);
    let moved = config("", "", &route(10, B, ""));
    h.sh.apply_routes(table(&moved, 2), h.now);
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::RouteChanged as u8)]);
    // Its queue written, the connection nobody routes to is read a little
    // longer (replies in flight), then closed.
    h.sh.tick(h.now, false, false);
    h.pump();
    assert!(!h.take_log().iter().any(|a| matches!(a, Action::CloseBackend { .. })));
    h.now += Duration::from_millis(1100);
    h.sh.tick(h.now, false, false);
    h.pump();
    assert!(h
        .take_log()
        .iter()
        .any(|a| matches!(a, Action::CloseBackend { conn, generation, .. } if *conn == ca && *generation == ga)));
    h.send(s, 10, b"y").unwrap();
    assert_eq!(h.backend_out(B), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"y".to_vec())]);
    assert_eq!(h.sh.stats(h.now).route_version, 2);
}

#[test]
fn route_propagation_is_recorded_by_the_last_worker_only() {
    let cfg = config("", "", &route(10, A, ""));
    let mut h = Harness::new(cfg);
    h.sh.apply_routes(table(&config("", "", &route(10, B, "")), 2), h.now);
    // Not the last worker: its own delay and time, no observation.
    h.sh.routes_propagated(Duration::from_millis(7), Duration::from_secs(1_700_000_000), false);
    let s = h.sh.stats(h.now);
    assert_eq!((s.route_apply_delay_us, s.route_applied_unix_us), (7_000, 1_700_000_000_000_000));
    assert_eq!(s.route_propagation.count, 0);
    // The last one: the snapshot's propagation time is observed.
    h.sh.routes_propagated(Duration::from_millis(30), Duration::from_secs(1_700_000_001), true);
    let s = h.sh.stats(h.now);
    assert_eq!((s.route_propagation.count, s.route_propagation.sum_ns), (1, 30_000_000));
}

#[test]
fn reload_applies_breaker_and_backoff_settings_to_live_pools() {
    let slow = "circuit_failure_threshold = 5\nreconnect_backoff_min = \"10ms\"\nreconnect_backoff_max = \"10ms\"";
    let mut h = Harness::new(config("", slow, &route(10, A, "on_backend_loss = \"rebind\"")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    let strict = "circuit_failure_threshold = 1\ncircuit_open_duration = \"60s\"\nreconnect_backoff_min = \"30s\"\nreconnect_backoff_max = \"30s\"";
    h.sh.apply_config(config("", strict, &route(10, A, "on_backend_loss = \"rebind\"")));
    let (c, g) = h.stream(A);
    h.sh.backend_lost(c, g, LossKind::ReadFailed, &"x", h.now);
    h.pump();
    // One failure opened the live pool's breaker (threshold 1, not 5) ...
    assert_eq!(h.sh.stats(h.now).backends[&Arc::from(A)].circuit_state, 1);
    // ... and the redial waits the new backoff, not 10 ms.
    h.now += Duration::from_secs(1);
    h.send(s, 10, b"y").unwrap();
    assert_eq!(h.dropped("routing_error"), 1);
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).routing_errors, "backend_unavailable"), 1);
}

/// Issue 24 (minor): a gRPC server that accepts the connection and the call
/// and then resets every stream opens the circuit breaker; before, each new
/// connection counted as a success and reset the failure count. An answered
/// call (`backend_confirmed`) is what closes it.
#[test]
fn a_grpc_server_that_resets_every_stream_opens_the_breaker() {
    let b = "circuit_failure_threshold = 3\ncircuit_open_duration = \"60s\"\nreconnect_backoff_min = \"10ms\"\nreconnect_backoff_max = \"10ms\"";
    let routes = route(12, A, "backend_protocol = \"grpc\"\non_backend_loss = \"rebind\"");
    let mut h = Harness::new(config("", b, &routes));
    let state = |h: &mut Harness| h.sh.stats(h.now).backends[&Arc::from(A)].circuit_state;
    for i in 0..3 {
        let s = h.accept(10 + i);
        h.send(s, 12, b"x").unwrap();
        let (c, g) = h.stream(A);
        assert_eq!(state(&mut h), 0, "closed before failure {i}");
        // Connected and called, then reset before any answer.
        h.sh.backend_lost(c, g, LossKind::ReadFailed, &"stream reset", h.now);
        h.pump();
        h.now += Duration::from_millis(50);
    }
    assert_eq!(state(&mut h), 1, "three resets in a row open the breaker");
    // Once open, nothing is dialed: frames fail fast.
    let s = h.accept(20);
    assert!(h.send(s, 12, b"y").is_ok());
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).routing_errors, "backend_unavailable"), 1);
}

/// The control: a gRPC stream whose calls are answered keeps the breaker
/// closed across losses (each answer clears the count).
#[test]
fn answered_grpc_calls_keep_the_breaker_closed() {
    let b = "circuit_failure_threshold = 3\ncircuit_open_duration = \"60s\"\nreconnect_backoff_min = \"10ms\"\nreconnect_backoff_max = \"10ms\"";
    let routes = route(12, A, "backend_protocol = \"grpc\"\non_backend_loss = \"rebind\"");
    let mut h = Harness::new(config("", b, &routes));
    for i in 0..5 {
        let s = h.accept(10 + i);
        h.send(s, 12, b"x").unwrap();
        let (c, g) = h.stream(A);
        h.sh.backend_confirmed(c, g);
        h.sh.backend_lost(c, g, LossKind::ReadFailed, &"stream reset", h.now);
        h.pump();
        h.now += Duration::from_millis(50);
    }
    assert_eq!(h.sh.stats(h.now).backends[&Arc::from(A)].circuit_state, 0);
}

#[test]
fn drain_refuses_new_sessions_closes_the_rest_and_disconnects_after_their_frames() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s1 = h.accept(1);
    let s2 = h.accept(2);
    h.send(s1, 10, b"a").unwrap();
    h.backend_out(A);
    h.sh.begin_drain(h.now, h.now + Duration::from_secs(1));
    assert_eq!(h.sh.accept(SocketAddr::from(([10, 0, 0, 2], 1)), h.now), Err(AcceptRefusal::Draining));
    assert_eq!(h.sh.close_all(DisconnectReason::Shutdown), 2);
    h.pump();
    let mut shut = h.shutdowns();
    shut.sort_by_key(|(k, _)| k.id);
    assert_eq!(shut, vec![(s1, Shut::Write), (s2, Shut::Write)], "graceful: FIN after the queue, reading on");
    // A frame the client wrote before the close still goes out, before DISCONNECT.
    h.send(s1, 10, b"late").unwrap();
    h.close(s1);
    assert_eq!(
        h.backend_out(A),
        vec![Sent::Trans(s1.id, b"late".to_vec()), Sent::Disconnect(s1.id, DisconnectReason::Shutdown as u8)]
    );
    assert!(!h.take_log().iter().any(|a| matches!(a, Action::SessionsGone)));
    h.close(s2);
    assert!(h.take_log().iter().any(|a| matches!(a, Action::SessionsGone)));
    assert!(!h.sh.backends_pending());
    h.sh.close_backends();
    h.pump();
    assert!(h.take_log().iter().any(|a| matches!(a, Action::CloseBackend { .. })));
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).sessions_closed, "shutdown"), 2);
}

#[test]
fn connection_limits_are_enforced_and_counted() {
    let mut h = Harness::new(config("max_connections = 2\nmax_connections_per_ip = 1", "", ""));
    assert!(h.sh.accept(SocketAddr::from(([10, 0, 0, 1], 1)), h.now).is_ok());
    let again = h.sh.accept(SocketAddr::from(([10, 0, 0, 1], 2)), h.now);
    assert_eq!(again, Err(AcceptRefusal::PerIp(crate::limits::Refusal::PerIpConnections)));
    assert!(h.sh.accept(SocketAddr::from(([10, 0, 0, 2], 1)), h.now).is_ok());
    assert_eq!(h.sh.accept(SocketAddr::from(([10, 0, 0, 3], 1)), h.now), Err(AcceptRefusal::MaxConnections));
    let st = h.sh.stats(h.now);
    assert_eq!(WorkerStats::get(&st.connection_rejected, "max_connections"), 1);
    assert_eq!(WorkerStats::get(&st.connection_rejected, "max_connections_per_ip"), 1);
    assert_eq!(WorkerStats::get(&st.rate_limit_rejected, "max_connections_per_ip"), 1);
}

#[test]
fn message_rate_drops_or_closes() {
    let mut h = Harness::new(config("messages_per_second = 2\nmessages_burst = 2", "", &route(10, A, "")));
    let s = h.accept(1);
    for _ in 0..3 {
        h.send(s, 10, b"m").unwrap();
    }
    assert_eq!(h.dropped("rate_limited"), 1);
    assert_eq!(h.backend_out(A).len(), 3, "CONNECT and two frames");
    let mut h = Harness::new(config(
        "messages_per_second = 1\nmessages_burst = 1\non_rate_limit = \"close\"",
        "",
        &route(10, A, ""),
    ));
    let s = h.accept(1);
    h.send(s, 10, b"m").unwrap();
    assert_eq!(h.send(s, 10, b"m"), Err(DisconnectReason::RateLimited));
}

#[test]
fn a_client_that_does_not_read_is_closed_on_both_sides() {
    let mut h = Harness::new(config("max_queued_bytes_per_session = 65544", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    h.take_log();
    for _ in 0..5 {
        h.backend_send(A, trans(s.id, &[0u8; 16 * 1024]));
    }
    assert_eq!(h.shutdowns(), vec![(s, Shut::Both)]);
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).protocol_errors, "slow_reader"), 1);
}

#[test]
fn frames_too_large_and_unframeable_streams_end_the_session() {
    let mut h = Harness::new(config("max_message_size = 16", "", &route(10, A, "")));
    let s = h.accept(1);
    assert_eq!(h.send(s, 10, &[0u8; 17]), Err(DisconnectReason::ProtocolError));
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).protocol_errors, "frame_too_large"), 1);
}

#[test]
fn handshake_and_idle_timeouts_are_swept() {
    let mut h = Harness::new(config("handshake_timeout = \"1s\"\nidle_timeout = \"10s\"", "", &route(10, A, "")));
    let silent = h.accept(1);
    let active = h.accept(2);
    h.send(active, 10, b"x").unwrap();
    h.take_log();
    h.sh.tick(h.now + Duration::from_secs(2), true, false);
    h.pump();
    assert_eq!(h.shutdowns(), vec![(silent, Shut::Read)]);
    h.sh.tick(h.now + Duration::from_secs(11), true, false);
    h.pump();
    assert_eq!(h.shutdowns(), vec![(active, Shut::Read)]);
}

#[test]
fn keepalive_pings_a_silent_connection_and_declares_it_dead_without_pong() {
    let mut h = Harness::new(config(
        "",
        "keepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"",
        &route(10, A, "on_backend_loss = \"rebind\""),
    ));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    h.now += Duration::from_secs(2);
    h.sh.tick(h.now, true, false);
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Ping]);
    h.now += Duration::from_secs(2);
    h.sh.tick(h.now, true, false);
    h.pump();
    let st = h.sh.stats(h.now);
    assert_eq!(WorkerStats::get(&st.backends[&Arc::from(A)].errors, "keepalive_timeout"), 1);
    assert!(h.take_log().iter().any(|a| matches!(a, Action::CloseBackend { .. })));
}

#[test]
fn backend_ping_is_answered_and_gateway_only_opcodes_are_dropped() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let mut p = BytesMut::new();
    bproto::encode_ping(&mut p, Opcode::Ping, 5);
    h.backend_send(A, p);
    assert_eq!(h.backend_out(A), vec![Sent::Pong]);
    let mut c = BytesMut::new();
    bproto::encode_disconnect(&mut c, s.id, DisconnectReason::Kicked);
    h.backend_send(A, c);
    assert_eq!(h.dropped("unexpected_opcode"), 1);
    assert!(h.shutdowns().is_empty());
}

#[test]
fn websocket_upgrade_then_frames_in_binary_messages() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    let req = "GET / HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut buf = BytesMut::from(req.as_bytes());
    let n = buf.len();
    h.sh.client_data(s, &mut buf, n, h.now).unwrap();
    h.pump();
    let mut frame = BytesMut::new();
    cproto::encode(&mut frame, 7, ServerId::new(false, 1, 10, 0), b"ws");
    let mask = [1u8, 2, 3, 4];
    let mut msg = vec![0x82, 0x80 | frame.len() as u8];
    msg.extend_from_slice(&mask);
    msg.extend(frame.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut buf = BytesMut::from(&msg[..]);
    let n = buf.len();
    h.sh.client_data(s, &mut buf, n, h.now).unwrap();
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"ws".to_vec())]);
}

#[test]
fn plain_http_is_answered_and_closed() {
    let mut h = Harness::new(config("", "", ""));
    let s = h.accept(1);
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
    let n = buf.len();
    assert_eq!(h.sh.client_data(s, &mut buf, n, h.now).map(|_| ()), Err(DisconnectReason::ProtocolError));
    let mut out = BytesMut::new();
    assert!(matches!(h.sh.take_client_out(s, &mut out, None), ClientOut::Write(_)));
    assert!(out.starts_with(b"HTTP/1.1 426 "));
}

#[test]
fn log_limiter_allows_a_burst_per_kind_then_counts_what_it_suppressed() {
    let t0 = Instant::now();
    let mut l = LogLimiter::default();
    let allowed = (0..100).filter(|_| l.allow("flood", t0).is_some()).count();
    assert_eq!(allowed, LOG_BURST as usize);
    assert_eq!(l.allow("other", t0), Some(0), "kinds are limited separately");
    assert_eq!(l.allow("flood", t0 + Duration::from_secs(1)), Some(100 - LOG_BURST as u64));
}

#[test]
fn a_hung_backend_with_a_full_queue_is_still_declared_dead() {
    let mut h = Harness::new(config(
        "max_message_size = 65535",
        "keepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\nmax_queued_bytes = 65536",
        &route(10, A, "on_backend_loss = \"rebind\""),
    ));
    let s = h.accept(1);
    // The backend reads nothing: the queue fills up.
    for _ in 0..8 {
        h.send(s, 10, &[0u8; 16 * 1024]).unwrap();
    }
    assert!(h.dropped("backend_queue_full") > 0);
    h.now += Duration::from_secs(2);
    h.sh.tick(h.now, true, false);
    h.now += Duration::from_secs(2);
    h.sh.tick(h.now, true, false);
    h.pump();
    let st = h.sh.stats(h.now);
    assert_eq!(WorkerStats::get(&st.backends[&Arc::from(A)].errors, "keepalive_timeout"), 1);
}

#[test]
fn a_connect_refused_by_a_full_queue_leaves_the_session_unbound_and_the_next_frame_binds() {
    let mut h = Harness::new(config(
        "max_message_size = 65535\nmax_queued_bytes_per_session = 1048576",
        "max_queued_bytes = 65536",
        &route(10, A, ""),
    ));
    let s1 = h.accept(1);
    while h.dropped("backend_queue_full") == 0 {
        let _ = h.send(s1, 10, &[0u8; 16 * 1024]);
    }
    let s2 = h.accept(2);
    let _ = h.send(s2, 10, b"lost");
    assert_eq!(h.dropped("backend_queue_full"), 2, "s1's frame, then s2's CONNECT");
    assert_eq!(h.dropped("routing_error"), 1, "s2's frame: backend_unavailable");
    // The backend reads its queue; s2 never appears in it.
    let sent = h.backend_out(A);
    assert!(!sent.iter().any(|f| matches!(f, Sent::Connect(id) | Sent::Trans(id, _) if *id == s2.id)), "{sent:?}");
    // s2's next frame binds it: CONNECT first, then the frame.
    h.send(s2, 10, b"again").unwrap();
    let sent: Vec<Sent> = h.backend_out(A).into_iter().filter(|f| !matches!(f, Sent::Ping)).collect();
    assert_eq!(sent, [Sent::Connect(s2.id), Sent::Trans(s2.id, b"again".to_vec())]);
}

#[test]
fn route_change_unbinds_by_the_rule_of_the_binding_even_when_another_rule_lists_the_backend() {
    let mut h = Harness::new(config("", "", &(route(10, A, "") + &route(11, A, ""))));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let moved = config("", "", &(route(10, B, "") + &route(11, A, "")));
    h.sh.apply_routes(table(&moved, 2), h.now);
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::RouteChanged as u8)]);
    h.send(s, 10, b"y").unwrap();
    assert_eq!(h.backend_out(B), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"y".to_vec())]);
}

#[test]
fn replies_in_flight_when_a_route_change_releases_a_session_still_reach_it_for_a_second() {
    // A stays listed (type 11), so its connection is not retired.
    let mut h = Harness::new(config("", "", &(route(10, A, "") + &route(11, A, ""))));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let moved = config("", "", &(route(10, B, "") + &route(11, A, "")));
    h.sh.apply_routes(table(&moved, 2), h.now);
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::RouteChanged as u8)]);
    // A answers "x" after the release (before it read the DISCONNECT): the
    // reply is delivered, not dropped.
    h.backend_send(A, trans(s.id, b"reply to x"));
    assert_eq!(h.client_out(s), vec![(9, b"reply to x".to_vec())]);
    assert_eq!(h.dropped("unbound_session"), 0);
    // Only replies: a kick or a multicast from A no longer reaches it.
    let mut kick = BytesMut::new();
    bproto::encode_kick(&mut kick, 9, 0, s.id, b"bye");
    h.backend_send(A, kick);
    let mut m = BytesMut::new();
    bproto::encode_multicast(&mut m, 9, 0, &[s.id], b"mc");
    h.backend_send(A, m);
    assert!(h.client_out(s).is_empty() && h.shutdowns().is_empty());
    assert_eq!(h.dropped("unbound_session"), 2);
    // Its next frame goes to B.
    h.send(s, 10, b"y").unwrap();
    assert_eq!(h.backend_out(B), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"y".to_vec())]);
    // A second later, A reaches it no more.
    h.now += Duration::from_millis(1001);
    h.sh.tick(h.now, false, false);
    h.pump();
    h.backend_send(A, trans(s.id, b"too late"));
    assert!(h.client_out(s).is_empty());
    assert_eq!(h.dropped("unbound_session"), 3);
}

#[test]
fn two_server_types_on_one_stream_share_the_binding() {
    let mut h = Harness::new(config("", "", &(route(10, A, "") + &route(11, A, ""))));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.send(s, 11, b"y").unwrap();
    assert_eq!(
        h.backend_out(A),
        vec![Sent::Connect(s.id), Sent::Trans(s.id, b"x".to_vec()), Sent::Trans(s.id, b"y".to_vec())]
    );
    // Type 10 moves away; the session stays bound on A for type 11.
    let moved = config("", "", &(route(10, B, "") + &route(11, A, "")));
    h.sh.apply_routes(table(&moved, 2), h.now);
    h.pump();
    assert_eq!(h.backend_out(A), vec![]);
    h.backend_send(A, trans(s.id, b"still"));
    assert_eq!(h.client_out(s), vec![(9, b"still".to_vec())]);
    h.close(s);
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::ClientClosed as u8)]);
}

fn seed_route(st: u8, ep: &str, extra: &str) -> String {
    route(st, ep, &format!("backend_protocol = \"seed_tcp\"\n{extra}"))
}

/// Seed frames as a seed backend sees them: (object_id, server_id, type, payload).
fn seed_frames(mut buf: BytesMut) -> Vec<(i64, u32, i32, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some((t, len)) = bproto::check_seed(&buf, 1 << 20).unwrap() {
        let object_id = i64::from_le_bytes(buf[12..20].try_into().unwrap());
        let server_id = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        assert_eq!(buf[20], 1, "opcode 1 only");
        v.push((object_id, server_id, t, buf[29..len].to_vec()));
        bytes::Buf::advance(&mut buf, len);
    }
    v
}

impl Harness {
    /// Streams dialed to `addr` since the harness started, in order.
    fn dials(&self, addr: &str) -> Vec<(ConnId, u64)> {
        let addr: SocketAddr = addr.parse().unwrap();
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Dial { conn, generation, addr: a, .. } if *a == addr => Some((*conn, *generation)),
                _ => None,
            })
            .collect()
    }

    fn raw_out(&mut self, c: ConnId, g: u64) -> BytesMut {
        let mut buf = BytesMut::new();
        self.sh.take_backend_out(c, g, &mut buf, None);
        buf
    }
}

#[test]
fn seed_tcp_gives_each_session_its_own_connection_and_reuses_it_after() {
    let mut h = Harness::new(config("", "seed_reuse = true\n", &seed_route(11, A, "")));
    let s1 = h.accept(1);
    let s2 = h.accept(2);
    h.send(s1, 11, b"one").unwrap();
    h.send(s2, 11, b"two").unwrap();
    let dials = h.dials(A);
    assert_eq!(dials.len(), 2, "one connection per session");
    let (c1, g1) = dials[0];
    let (c2, g2) = dials[1];
    assert_eq!(seed_frames(h.raw_out(c1, g1)), vec![(s1.id, 0, 7, b"one".to_vec())], "no CONNECT, server_id 0");
    assert_eq!(seed_frames(h.raw_out(c2, g2)), vec![(s2.id, 0, 7, b"two".to_vec())]);
    // Whatever arrives on a connection is for its session, ids ignored.
    let mut reply = BytesMut::new();
    bproto::encode_reply(&mut reply, 33, 0x0a0b, 999, b"r1");
    let n = reply.len();
    h.sh.backend_data(c1, g1, &mut reply, n, h.now);
    assert_eq!(h.client_out(s1), vec![(33, b"r1".to_vec())]);
    // s1 leaves: no DISCONNECT; the next session gets its connection.
    h.close(s1);
    assert!(h.raw_out(c1, g1).is_empty());
    let s3 = h.accept(3);
    h.send(s3, 11, b"three").unwrap();
    assert_eq!(h.dials(A).len(), 2, "reused, not dialed");
    assert_eq!(seed_frames(h.raw_out(c1, g1)), vec![(s3.id, 0, 7, b"three".to_vec())]);
}

/// By default a seed_tcp connection ends with its session: the next session
/// dials its own, and a late reply on the old one is dropped (counted as for
/// an unbound session), never delivered to anyone.
#[test]
fn seed_tcp_connection_ends_with_its_session_by_default() {
    let mut h = Harness::new(config("", "", &seed_route(11, A, "")));
    let s1 = h.accept(1);
    h.send(s1, 11, b"one").unwrap();
    let (c1, g1) = h.dials(A)[0];
    assert_eq!(seed_frames(h.raw_out(c1, g1)), vec![(s1.id, 0, 7, b"one".to_vec())]);
    h.close(s1);
    let s2 = h.accept(2);
    h.send(s2, 11, b"two").unwrap();
    let dials = h.dials(A);
    assert_eq!(dials.len(), 2, "the next session dials its own connection");
    let (c2, g2) = dials[1];
    assert_ne!((c1, g1), (c2, g2));
    let mut late = BytesMut::new();
    bproto::encode_reply(&mut late, 33, 0, s1.id, b"late for s1");
    let n = late.len();
    h.sh.backend_data(c1, g1, &mut late, n, h.now);
    assert!(h.client_out(s2).is_empty(), "the late reply reached no other session");
    assert_eq!(h.sh.ctx.stats.frames_dropped.get("unbound_session").copied(), Some(1), "counted");
    // Once its write is done (here: the drain deadline, as the harness never
    // reports the write) and the read grace is over, it is closed.
    h.take_log();
    for _ in 0..2 {
        h.now += super::backend::RETIRE_DRAIN_MAX + super::backend::RETIRE_READ_GRACE;
        h.sh.tick(h.now, false, false);
    }
    h.pump();
    assert!(
        h.take_log().iter().any(|a| matches!(a, Action::CloseBackend { conn, .. } if *conn == c1)),
        "the ended session's connection is closed"
    );
}

#[test]
fn seed_tcp_loss_ends_its_session_and_the_connection_is_not_redialed() {
    let mut h = Harness::new(config("", "", &seed_route(11, A, "")));
    let s = h.accept(1);
    h.send(s, 11, b"x").unwrap();
    let (c, g) = h.dials(A)[0];
    h.take_log();
    h.sh.backend_lost(c, g, LossKind::ClosedByBackend, &"eof", h.now);
    h.pump();
    assert_eq!(h.shutdowns(), vec![(s, Shut::Read)]);
    h.close(s);
    let s2 = h.accept(2);
    h.send(s2, 11, b"y").unwrap();
    assert_eq!(h.dials(A).len(), 1, "a new connection for the new session");
}

#[test]
fn seed_tcp_pool_is_bounded_per_endpoint() {
    let mut h = Harness::new(config("", "seed_pool_max = 2", &seed_route(11, A, "")));
    let ids: Vec<SessionKey> = (1..=3).map(|p| h.accept(p)).collect();
    for &s in &ids {
        h.send(s, 11, b"x").unwrap();
    }
    assert_eq!(h.dials(A).len(), 2);
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).routing_errors, "backend_unavailable"), 1);
}

#[test]
fn connection_binding_sends_every_frame_where_the_first_went() {
    let mut h = Harness::new(config("", "", &(seed_route(11, A, "binding = \"connection\"") + &route(12, B, ""))));
    let s = h.accept(1);
    h.send(s, 11, b"first").unwrap();
    h.send(s, 12, b"second").unwrap();
    h.send(s, 99, b"third").unwrap();
    let (c, g) = h.dials(A)[0];
    let got: Vec<Vec<u8>> = seed_frames(h.raw_out(c, g)).into_iter().map(|f| f.3).collect();
    assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]);
    assert!(h.dials(B).is_empty());
}

#[test]
fn grpc_sends_connect_data_and_disconnect_and_fans_out_only_to_its_sessions() {
    use crate::protocol::grpc;
    let routes = route(12, A, "backend_protocol = \"grpc\"") + &route(13, B, "backend_protocol = \"grpc\"");
    let mut h = Harness::new(config("", "", &routes));
    let s1 = h.accept(1);
    let s2 = h.accept(2);
    let other = h.accept(3);
    h.send(s1, 12, b"a").unwrap();
    h.send(s2, 12, b"b").unwrap();
    h.send(other, 13, b"c").unwrap();
    assert_eq!(h.dials(A).len(), 1, "one stream per endpoint per worker");
    let (c, g) = h.dials(A)[0];
    let mut out = h.raw_out(c, g);
    let mut packets = Vec::new();
    while let Some(n) = grpc::check(&out, 1 << 20).unwrap() {
        packets.push(grpc::decode(&out[..n]).unwrap());
        bytes::Buf::advance(&mut out, n);
    }
    let kinds: Vec<(i64, String)> = packets
        .iter()
        .map(|p| (p.session_id, p.metadata.get("packet_type").cloned().unwrap_or_else(|| "data".into())))
        .collect();
    assert_eq!(
        kinds,
        vec![(s1.id, "connect".into()), (s1.id, "data".into()), (s2.id, "connect".into()), (s2.id, "data".into())]
    );
    // A fan-out that lists a session of another stream reaches only its own.
    let mut fan = BytesMut::new();
    let p = grpc::GamePacket {
        msg_id: 5,
        payload: bytes::Bytes::from_static(b"all"),
        target_session_ids: vec![s1.id, s2.id, other.id],
        ..Default::default()
    };
    grpc::encode(&mut fan, &p);
    let n = fan.len();
    h.sh.backend_data(c, g, &mut fan, n, h.now);
    assert_eq!(h.client_out(s1), vec![(5, b"all".to_vec())]);
    assert_eq!(h.client_out(s2), vec![(5, b"all".to_vec())]);
    assert!(h.client_out(other).is_empty());
    assert_eq!(h.dropped("unbound_session"), 1);
    // server_disconnect closes that session only.
    let mut kick = BytesMut::new();
    let mut p = grpc::GamePacket { session_id: s2.id, ..Default::default() };
    p.metadata.insert("packet_type".into(), "server_disconnect".into());
    grpc::encode(&mut kick, &p);
    let n = kick.len();
    h.take_log();
    h.sh.backend_data(c, g, &mut kick, n, h.now);
    h.pump();
    assert_eq!(h.shutdowns(), vec![(s2, Shut::Read)]);
    h.close(s2);
    let mut out = h.raw_out(c, g);
    let n = grpc::check(&out, 1 << 20).unwrap().unwrap();
    let p = grpc::decode(&out[..n]).unwrap();
    assert_eq!(
        (p.session_id, p.metadata["packet_type"].as_str(), p.metadata["reason"].as_str()),
        (s2.id, "disconnect", "kicked")
    );
    bytes::Buf::advance(&mut out, n);
    // A message that does not decode is dropped alone; the stream goes on.
    let mut bad = BytesMut::from(&[0u8, 0, 0, 0, 2, 0xff, 0xff][..]);
    let n = bad.len();
    assert_eq!(h.sh.backend_data(c, g, &mut bad, n, h.now), BackendRead::Continue);
    assert_eq!(h.dropped("malformed"), 1);
}

#[test]
fn an_unknown_opcode_or_a_malformed_body_drops_that_frame_only() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let mut unknown = trans(s.id, b"future");
    unknown[20] = 42;
    assert_eq!(h.backend_send(A, unknown), BackendRead::Continue);
    // A MULTICAST whose count says more ids than the body holds.
    let mut bad = BytesMut::new();
    bproto::encode_multicast(&mut bad, 9, 0, &[s.id], b"");
    bad[29] = 200;
    assert_eq!(h.backend_send(A, bad), BackendRead::Continue);
    assert_eq!(h.dropped("malformed"), 2);
    // The stream is still up and serving.
    h.backend_send(A, trans(s.id, b"still"));
    assert_eq!(h.client_out(s), vec![(9, b"still".to_vec())]);
}

#[test]
fn a_session_listed_twice_in_a_multicast_gets_it_once() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let mut m = BytesMut::new();
    bproto::encode_multicast(&mut m, 9, 0, &[s.id, s.id, s.id], b"once");
    h.backend_send(A, m);
    assert_eq!(h.client_out(s), vec![(9, b"once".to_vec())]);
}

#[test]
fn a_flooding_session_pauses_at_its_share_and_its_neighbours_get_through() {
    let mut h = Harness::new(config("max_message_size = 65535", "max_queued_bytes = 262144", &route(10, A, "")));
    let flood = h.accept(1);
    let quiet = h.accept(2);
    h.send(quiet, 10, b"hi").unwrap();
    // Nothing is written meanwhile: the flooder fills its share, then pauses.
    let mut paused = false;
    for _ in 0..40 {
        let mut buf = BytesMut::new();
        cproto::encode(&mut buf, 7, ServerId::new(false, 1, 10, 0), &[1u8; 16 * 1024]);
        let n = buf.len();
        let flow = h.sh.client_data(flood, &mut buf, n, h.now).unwrap();
        h.pump();
        if flow == Flow::Paused {
            assert!(!buf.is_empty(), "the frame that does not fit stays buffered");
            paused = true;
            break;
        }
    }
    assert!(paused, "the flooder pauses");
    assert_eq!(h.dropped("backend_queue_full"), 0, "nothing dropped");
    // The quiet session still gets its frame queued.
    h.send(quiet, 10, b"again").unwrap();
    let out = h.backend_out(A);
    assert!(out.contains(&Sent::Trans(quiet.id, b"again".to_vec())));
    assert!(
        h.take_log().iter().any(|a| matches!(a, Action::ResumeClient(k) if *k == flood)),
        "resumed after the write"
    );
}

#[test]
fn a_half_closed_client_still_gets_the_reply_it_is_waiting_for() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"question").unwrap();
    h.backend_out(A);
    h.now += Duration::from_millis(1);
    assert!(matches!(h.sh.client_eof(s, h.now), HalfClose::Linger(_)), "a reply is outstanding");
    h.now += Duration::from_millis(5);
    h.backend_send(A, trans(s.id, b"answer"));
    assert_eq!(h.client_out(s), vec![(9, b"answer".to_vec())]);
    h.now += Duration::from_millis(300);
    assert_eq!(h.sh.client_eof(s, h.now), HalfClose::Close);
    // Nothing outstanding: closes at once.
    let t = h.accept(2);
    assert_eq!(h.sh.client_eof(t, h.now), HalfClose::Close);
}

#[test]
fn websocket_pings_from_a_client_that_never_reads_are_bounded() {
    let mut h = Harness::new(config("max_queued_bytes_per_session = 65544", "", ""));
    let s = h.accept(1);
    let req = "GET / HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut buf = BytesMut::from(req.as_bytes());
    let n = buf.len();
    h.sh.client_data(s, &mut buf, n, h.now).unwrap();
    h.pump();
    h.take_log();
    let mut ping = vec![0x89, 0x80 | 100, 1, 2, 3, 4];
    ping.extend(std::iter::repeat_n(0u8, 100));
    for _ in 0..2000 {
        let mut buf = BytesMut::from(&ping[..]);
        let n = buf.len();
        if h.sh.client_data(s, &mut buf, n, h.now).is_err() {
            break;
        }
        h.pump();
    }
    assert!(h.shutdowns().contains(&(s, Shut::Both)), "closed as a slow reader");
    assert_eq!(WorkerStats::get(&h.sh.stats(h.now).protocol_errors, "slow_reader"), 1);
}

#[test]
fn changing_a_rules_protocol_at_the_same_address_unbinds_with_reason_8() {
    let mut h = Harness::new(config("", "", &route(10, A, "")));
    let s = h.accept(1);
    h.send(s, 10, b"x").unwrap();
    h.backend_out(A);
    let moved = config("", "", &route(10, A, "backend_protocol = \"grpc\""));
    h.sh.apply_routes(table(&moved, 2), h.now);
    h.pump();
    assert_eq!(h.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::RouteChanged as u8)]);
    assert!(h.shutdowns().is_empty(), "the session stays and rebinds");
}

#[test]
fn hold_keeps_the_session_and_replays_every_frame_in_order_after_a_resume_connect() {
    let backend = "reconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"100ms\"\nhold_timeout = \"5s\"";
    let mut h = Harness::new(config("", backend, &route(10, A, "on_backend_loss = \"hold\"")));
    let s = h.accept(1);
    h.send(s, 10, b"0").unwrap();
    h.backend_out(A);
    // Two frames queued but never written when the stream is lost.
    h.send(s, 10, b"1").unwrap();
    h.send(s, 10, b"2").unwrap();
    let (c, g) = h.stream(A);
    h.take_log();
    h.sh.backend_lost(c, g, LossKind::ClosedByBackend, &"restart", h.now);
    h.pump();
    assert!(h.shutdowns().is_empty(), "the session is held, not closed");
    // Frames sent while the backend is away are buffered.
    h.send(s, 10, b"3").unwrap();
    h.send(s, 10, b"4").unwrap();
    assert_eq!(h.dropped("backend_lost"), 0);
    // After the backoff the tick redials; on connect the session resumes.
    h.now += Duration::from_millis(200);
    h.sh.tick(h.now, false, false);
    h.pump();
    let (c2, g2) = h.stream(A);
    assert_eq!(c2, c);
    assert!(g2 > g);
    let mut out = h.raw_out(c2, g2);
    let first = bproto::check(&out, 1 << 20).unwrap().unwrap();
    assert_eq!(first.opcode, bproto::Opcode::Connect);
    assert_eq!(out[20 + 9] & bproto::CONNECT_RESUME, bproto::CONNECT_RESUME, "marked as a resume");
    bytes::Buf::advance(&mut out, first.frame_len());
    let mut payloads = Vec::new();
    while let Some(f) = bproto::check(&out, 1 << 20).unwrap() {
        if let Body::Trans { payload, .. } = bproto::parse(&f, &out[..f.frame_len()], false).unwrap() {
            payloads.push(payload.to_vec());
        }
        bytes::Buf::advance(&mut out, f.frame_len());
    }
    assert_eq!(payloads, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec(), b"4".to_vec()], "exactly once, in order");
    // Replies reach the session on the new stream.
    let mut r = trans(s.id, b"welcome back");
    let n = r.len();
    h.sh.backend_data(c2, g2, &mut r, n, h.now);
    assert_eq!(h.client_out(s), vec![(9, b"welcome back".to_vec())]);
}

#[test]
fn hold_is_bounded_in_time_and_bytes() {
    let backend = "reconnect_backoff_min = \"60s\"\nreconnect_backoff_max = \"60s\"\nhold_timeout = \"1s\"\nhold_max_bytes_per_session = 65543";
    let mut h = Harness::new(config(
        "max_message_size = 65535",
        backend,
        &(route(10, A, "on_backend_loss = \"hold\"") + &route(11, B, "on_backend_loss = \"hold\"")),
    ));
    let timed = h.accept(1);
    let big = h.accept(2);
    h.send(timed, 10, b"x").unwrap();
    h.send(big, 11, b"x").unwrap();
    for addr in [A, B] {
        let (c, g) = h.stream(addr);
        h.sh.backend_lost(c, g, LossKind::ReadFailed, &"gone", h.now);
    }
    h.pump();
    h.take_log();
    // Over the byte bound: closed at once, the frames counted.
    h.send(big, 11, &[0u8; 40_000]).unwrap();
    h.send(big, 11, &[0u8; 40_000]).unwrap();
    assert_eq!(h.shutdowns(), vec![(big, Shut::Read)]);
    // Past the time bound: closed by the tick.
    h.now += Duration::from_secs(2);
    h.sh.tick(h.now, false, false);
    h.pump();
    assert_eq!(h.shutdowns(), vec![(timed, Shut::Read)]);
    // Counted: the two CONNECTs that were never written, the big session's
    // held frames and the one over the bound (3), the timed-out one (1).
    assert_eq!(h.dropped("backend_lost"), 6);
}

fn drain_config(extra: &str) -> Arc<Config> {
    let text =
        format!("[server]\nworkers = 1\n[limits]\n[log]\naccess_log = false\n[drain]\n{extra}\n{}", route(10, A, ""));
    Arc::new(Config::from_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn drain_sends_the_notice_and_paces_the_closes_over_the_window() {
    let mut h =
        Harness::new(drain_config("notice_msg_id = 77\nnotice_payload = \"reconnect elsewhere\"\npaced = true"));
    let keys: Vec<SessionKey> = (0..1000).map(|i| h.accept(i as u16)).collect();
    for &k in &keys {
        h.send(k, 10, b"hello").unwrap();
    }
    let t0 = h.now;
    h.sh.begin_drain(t0, t0 + Duration::from_secs(10));
    h.pump();
    for &k in &keys[..3] {
        assert_eq!(h.client_out(k), vec![(77, b"reconnect elsewhere".to_vec())]);
    }
    h.take_log();
    let mut per_second = [0usize; 10];
    for step in 1..=100 {
        h.now = t0 + Duration::from_millis(100 * step);
        h.sh.tick(h.now, false, false);
        h.pump();
        let closed = h.shutdowns().iter().filter(|(_, how)| *how == Shut::Write).count();
        per_second[((step - 1) / 10) as usize] += closed;
    }
    assert_eq!(per_second.iter().sum::<usize>(), 1000, "every session closed within the window");
    assert!(per_second.iter().all(|n| *n <= 200), "no second holds more than twice its share: {per_second:?}");
}

#[test]
fn without_pacing_the_drain_closes_nobody_before_its_deadline() {
    let mut h = Harness::new(drain_config(""));
    for i in 0..10 {
        h.accept(i);
    }
    h.sh.begin_drain(h.now, h.now + Duration::from_secs(10));
    h.now += Duration::from_secs(5);
    h.sh.tick(h.now, false, false);
    h.pump();
    assert!(h.shutdowns().is_empty());
}

fn policy_config(limits: &str, policy: &str) -> Arc<Config> {
    let text = format!(
        "[server]\nworkers = 1\n[limits]\n{limits}\n[log]\naccess_log = false\n{policy}\n{}{}",
        route(10, A, ""),
        route(11, B, "")
    );
    Arc::new(Config::from_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}")))
}

fn send_msg(h: &mut Harness, s: SessionKey, st: u8, msg_id: u16, payload: &[u8]) -> Result<(), DisconnectReason> {
    let mut buf = BytesMut::new();
    cproto::encode(&mut buf, msg_id, ServerId::new(false, 1, st, 0), payload);
    let n = buf.len();
    let r = h.sh.client_data(s, &mut buf, n, h.now);
    h.pump();
    r.map(|_| ())
}

#[test]
fn before_authentication_only_allow_listed_messages_reach_the_backend() {
    let policy = "[[message_policy]]\nname = \"login\"\nmsg_ids = [1, \"2-3\"]\nbefore_auth = true\n\n[[message_policy]]\nname = \"game\"\nmsg_ids = [\"100-199\"]\n";
    let mut h = Harness::new(policy_config("require_auth = true", policy));
    let s = h.accept(1);
    send_msg(&mut h, s, 10, 2, b"login").unwrap();
    send_msg(&mut h, s, 10, 150, b"move").unwrap();
    send_msg(&mut h, s, 10, 999, b"other").unwrap();
    assert_eq!(h.backend_out(A), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"login".to_vec())]);
    assert_eq!(h.dropped("policy"), 2);
    // The backend authenticates the session: now game messages pass.
    let mut attrs = BytesMut::new();
    bproto::encode_session_attrs(&mut attrs, s.id, true, b"user-7", &[b"vip"]);
    h.backend_send(A, attrs);
    send_msg(&mut h, s, 10, 150, b"move").unwrap();
    assert_eq!(h.backend_out(A), vec![Sent::Trans(s.id, b"move".to_vec())]);
    let st = h.sh.stats(h.now);
    assert_eq!(st.message_policy.get(&(Arc::from("game"), "unauthenticated")), Some(&1));
    assert_eq!(st.message_policy.get(&(Arc::from("unclassified"), "unauthenticated")), Some(&1));
    assert_eq!(st.message_policy.get(&(Arc::from("game"), "forwarded")), Some(&1));
}

#[test]
fn class_limits_drop_or_close_and_server_type_scopes_override() {
    let policy = "[[message_policy]]\nname = \"chat\"\nmsg_ids = [5]\nmax_payload = 4\nrate = 1\nburst = 2\n\n[[message_policy]]\nname = \"chat-strict\"\nmsg_ids = [5]\nserver_type = 11\nrate = 1\nburst = 1\non_violation = \"close\"\n";
    let mut h = Harness::new(policy_config("", policy));
    let s = h.accept(1);
    send_msg(&mut h, s, 10, 5, b"too long").unwrap();
    send_msg(&mut h, s, 10, 5, b"a").unwrap();
    send_msg(&mut h, s, 10, 5, b"b").unwrap();
    send_msg(&mut h, s, 10, 5, b"c").unwrap();
    assert_eq!(h.dropped("policy"), 2, "one too large, one over the burst");
    let t = h.accept(2);
    send_msg(&mut h, t, 11, 5, b"x").unwrap();
    assert_eq!(send_msg(&mut h, t, 11, 5, b"y"), Err(DisconnectReason::RateLimited), "the scoped class closes");
}

#[test]
fn announcements_reach_the_selected_sessions() {
    let mut h = Harness::new(config("", "", &(route(10, A, "") + &route(11, B, ""))));
    let a = h.accept(1);
    let b = h.accept(2);
    let c = h.accept(3);
    h.send(a, 10, b"x").unwrap();
    h.send(b, 11, b"x").unwrap();
    let mut attrs = BytesMut::new();
    bproto::encode_session_attrs(&mut attrs, b.id, true, b"", &[b"vip"]);
    h.backend_send(B, attrs);
    let ann = |target| Announcement { msg_id: 42, payload: bytes::Bytes::from_static(b"news"), target };
    assert_eq!(h.sh.announce(&ann(AnnounceTarget::All), h.now), 2, "not to a connection still at the front door");
    assert_eq!(h.sh.announce(&ann(AnnounceTarget::ServerType(10)), h.now), 1);
    assert_eq!(h.sh.announce(&ann(AnnounceTarget::Tag(Box::from(&b"vip"[..]))), h.now), 1);
    assert_eq!(h.sh.announce(&ann(AnnounceTarget::World(1)), h.now), 2, "sessions that sent a frame for world 1");
    assert_eq!(h.client_out(a).len(), 3);
    assert_eq!(h.client_out(b).len(), 3);
    let _ = c;
    assert!(h.client_out(c).is_empty());
    // From a backend: one action for the relay, whatever the session count.
    let mut f = BytesMut::new();
    bproto::encode_announce(&mut f, 42, bproto::AnnounceFilter::All, b"from backend");
    h.take_log();
    h.backend_send(A, f);
    assert_eq!(h.take_log().iter().filter(|x| matches!(x, Action::Announce(_))).count(), 1);
}

/// A live upgrade's state transfer without sockets: one shard exports, the
/// snapshot goes through its wire encoding, another shard imports it, and
/// the session goes on as if nothing happened: same id, same binding (no
/// second `CONNECT`), queued bytes in both directions carried, a partial
/// frame completed by the next read, and admission counted again.
#[test]
fn a_live_upgrade_carries_sessions_bindings_and_queues_to_another_shard() {
    let cfg = config("", "", &route(10, A, ""));
    let mut old = Harness::new(cfg.clone());
    let s = old.accept(1);
    old.send(s, 10, b"first").unwrap();
    assert_eq!(old.backend_out(A), vec![Sent::Connect(s.id), Sent::Trans(s.id, b"first".to_vec())]);
    // Queued both ways, not yet written: a reply for the client and a
    // frame for the backend.
    old.backend_send(A, trans(s.id, b"reply-1"));
    old.send(s, 10, b"second").unwrap();
    // Half of a third frame read, not yet forwarded (the driver holds it).
    let mut third = BytesMut::new();
    assert!(cproto::encode(&mut third, 7, ServerId::new(false, 1, 10, 0), b"third"));
    let (head, tail) = third.split_at(5);

    let mut export = old.sh.export(old.now);
    assert_eq!(export.sessions, vec![s]);
    let snap = &mut export.snapshot;
    snap.sessions[0].input = head.to_vec();
    for (i, c) in snap.conns.iter_mut().enumerate() {
        if c.state == handoff::ConnStateSnap::Up {
            c.fd = Some(i as u32 + 1);
        }
    }
    let wire = postcard::to_stdvec(&export.snapshot).unwrap();
    let snap: handoff::ShardSnapshot = postcard::from_bytes(&wire).unwrap();

    let mut new = Harness::new(cfg);
    let imported = new.sh.import(snap, new.now);
    new.pump();
    assert_eq!(imported.conns.len(), 1, "the stream is carried, connected");
    let (conn, generation, _, _) = &imported.conns[0];
    new.streams.insert(A.parse().unwrap(), (*conn, *generation));
    assert!(!new.take_log().iter().any(|a| matches!(a, Action::Dial { .. })), "no dial: the socket came along");
    let (key, _, input, _) = &imported.sessions[0];
    assert_eq!(key.id, s.id);
    assert_eq!(input, &head.to_vec());
    // What was queued goes out on each side.
    assert_eq!(new.client_out(*key), vec![(9, b"reply-1".to_vec())]);
    assert_eq!(new.backend_out(A), vec![Sent::Trans(s.id, b"second".to_vec())]);
    // The rest of the partial frame arrives: forwarded, with no CONNECT.
    let mut buf = BytesMut::from(&input[..]);
    buf.extend_from_slice(tail);
    new.sh.client_data(*key, &mut buf, tail.len(), new.now).unwrap();
    new.pump();
    assert_eq!(new.backend_out(A), vec![Sent::Trans(s.id, b"third".to_vec())]);
    // Replies on the carried stream reach it.
    new.backend_send(A, trans(s.id, b"reply-2"));
    assert_eq!(new.client_out(*key), vec![(9, b"reply-2".to_vec())]);
    assert_eq!(new.sh.stats(new.now).handoff_sessions_in, 1);
    assert_eq!(new.sh.ctx.admission.open(), 1, "counted against the node's connection cap");
    // Ids handed out here from now on are above the carried one.
    let next = new.sh.accept(SocketAddr::from(([10, 0, 0, 2], 9)), new.now).unwrap();
    assert!(next.id > s.id);
    // Its close is a normal one.
    new.close(*key);
    assert_eq!(new.backend_out(A), vec![Sent::Disconnect(s.id, DisconnectReason::ClientClosed as u8)]);
}

/// A session kicked (or timed out) just before a live upgrade took it is
/// still closed by the new process: the shutdown is asked again on import.
#[test]
fn a_session_closing_when_carried_is_shut_down_by_the_new_shard() {
    let cfg = config("", "", &route(10, A, ""));
    let mut old = Harness::new(cfg.clone());
    let s = old.accept(1);
    old.send(s, 10, b"hi").unwrap();
    old.backend_out(A);
    let mut kick = BytesMut::new();
    bproto::encode_kick(&mut kick, 9, 0, s.id, b"bye");
    old.backend_send(A, kick);
    assert_eq!(old.shutdowns(), vec![(s, Shut::Read)]);
    let export = old.sh.export(old.now);
    let mut new = Harness::new(cfg);
    let imported = new.sh.import(export.snapshot, new.now);
    let key = imported.sessions[0].0;
    let mut acts = Vec::new();
    new.sh.drain_actions(&mut acts);
    assert!(acts.iter().any(|a| matches!(a, Action::ShutdownClient(k, Shut::Read) if *k == key)), "{acts:?}");
    // Its last frame is still queued for the client.
    assert_eq!(new.client_out(key), vec![(9, b"bye".to_vec())]);
}
