//! End-to-end behaviour of the engine over real sockets: gateway on port 0,
//! mock backends, blocking clients. Run once per I/O driver
//! (`GATEWAY_TEST_IO_DRIVER=io_uring|epoll`).

mod common;
use common::*;
use game_gateway::protocol::backend as bproto;
use std::time::Duration;

fn stat(map: &ahash::AHashMap<&'static str, u64>, k: &str) -> u64 {
    map.get(k).copied().unwrap_or(0)
}

#[test]
fn echo_payload_sizes_on_two_workers() {
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    for size in [0usize, 1, 8 * 1024, 65_535] {
        let mut c = Client::connect(gw.local_addr());
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        c.echo(3, sid(1, 10, 2), &payload);
        c.echo(4, sid(1, 10, 2), &payload);
    }
}

#[test]
fn echo_1000_concurrent_sessions() {
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let addr = gw.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = (0..125).map(|_| Client::connect(addr)).collect();
                for (i, c) in clients.iter_mut().enumerate() {
                    c.send(1, sid(1, 10, 0), format!("t{t}-c{i}").as_bytes());
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    assert_eq!(c.recv().payload, format!("t{t}-c{i}").as_bytes());
                }
                clients
            })
        })
        .collect();
    let all: Vec<Vec<Client>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let s = gw.stats();
    assert_eq!(s.sessions_active, 1000);
    assert_eq!(s.messages_in[10], 1000);
    assert_eq!(s.messages_out[10], 1000);
    drop(all);
    eventually("all sessions closed", || gw.stats().sessions_active == 0);
}

#[test]
fn isolation_200_sessions_over_one_backend_connection() {
    let mb = mock();
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut clients: Vec<Client> = (0..200).map(|_| Client::connect(gw.local_addr())).collect();
    // Pipelined: every session sends 20 frames before anyone reads.
    for round in 0..20 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(round, sid(1, 10, 0), format!("s{i}-r{round}").as_bytes());
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for round in 0..20 {
            let r = c.recv();
            assert_eq!(r.msg_id, round);
            assert_eq!(
                r.payload,
                format!("s{i}-r{round}").as_bytes(),
                "session {i} got someone else's frame or out of order"
            );
        }
        assert!(c.silent_for(Duration::from_millis(1)));
    }
    assert_eq!(mb.connections(), 1, "all sessions share one backend connection");
    assert_eq!(mb.trans_seen(), 4000);
}

#[test]
fn round_robin_spreads_evenly_over_three_backends() {
    let mbs = [mock(), mock(), mock()];
    let eps: Vec<_> = mbs.iter().map(|m| m.addr()).collect();
    let gw = start(1, "", &route(10, 0, "round_robin", &eps, ""));
    let mut clients = Vec::new();
    for _ in 0..30 {
        let mut c = Client::connect(gw.local_addr());
        c.echo(1, sid(1, 10, 0), b"x");
        clients.push(c);
    }
    for m in &mbs {
        eventually("10 sessions per backend", || m.sessions().len() == 10);
    }
}

#[test]
fn consistent_hash_keeps_an_instance_on_one_backend() {
    let mbs = [mock(), mock(), mock()];
    let eps: Vec<_> = mbs.iter().map(|m| m.addr()).collect();
    let gw = start(2, "", &route(20, 0, "consistent_hash", &eps, "hash_key = \"inst_id\""));
    let mut clients = Vec::new();
    for inst in [3u8, 3, 3, 3, 3, 3, 3, 3, 9, 9, 9, 9] {
        let mut c = Client::connect(gw.local_addr());
        c.echo(1, sid(5, 20, inst), b"x");
        clients.push((inst, c));
    }
    // Count by which backend holds how many sessions: inst 3 (8 sessions) and
    // inst 9 (4 sessions) must each sit entirely on one backend.
    eventually("12 CONNECTs seen", || mbs.iter().map(|m| m.sessions().len()).sum::<usize>() == 12);
    let counts: Vec<usize> = mbs.iter().map(|m| m.sessions().len()).collect();
    let mut sorted = counts.clone();
    sorted.sort();
    assert!(sorted == vec![0, 4, 8] || sorted == vec![0, 0, 12], "sessions per backend {counts:?}");
}

#[test]
fn world_rule_beats_wildcard() {
    let any = mock();
    let w7 = mock();
    let routes = route(10, 0, "round_robin", &[any.addr()], "") + &route(10, 7, "round_robin", &[w7.addr()], "");
    let gw = start(2, "", &routes);
    let mut a = Client::connect(gw.local_addr());
    a.echo(1, sid(7, 10, 1), b"w7");
    let mut b = Client::connect(gw.local_addr());
    b.echo(1, sid(3, 10, 1), b"w3");
    assert!(session_of(&w7, a.local()) > 0);
    assert!(session_of(&any, b.local()) > 0);
    assert!(w7.sessions().len() == 1 && any.sessions().len() == 1);
}

#[test]
fn unrouted_server_type_is_counted_and_the_session_continues() {
    let mb = mock();
    let gw = start(2, "", &(route(10, 0, "round_robin", &[mb.addr()], "") + &route(11, 0, "round_robin", &[], "")));
    let mut c = Client::connect(gw.local_addr());
    c.send(1, sid(1, 99, 0), b"nobody home");
    c.send(1, sid(1, 11, 0), b"no endpoints");
    c.echo(2, sid(1, 10, 0), b"still here");
    assert!(c.silent_for(Duration::from_millis(100)), "the client sees nothing for an unrouted frame");
    let s = gw.stats();
    assert_eq!(stat(&s.routing_errors, "no_rule"), 1);
    assert_eq!(stat(&s.routing_errors, "no_endpoints"), 1);
    assert_eq!(s.messages_in[10], 1);
}

#[test]
fn connect_carries_client_address_and_disconnect_says_client_closed() {
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut c = Client::connect(gw.local_addr());
    c.echo(1, sid(1, 10, 0), b"hi");
    let me = c.local();
    let session = match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { session, transport, addr, .. }) => {
            assert_eq!(addr, me, "CONNECT carries the client's real address and port");
            assert_eq!(transport, 1);
            session
        }
        other => panic!("{other:?}"),
    };
    assert!(session > 0);
    assert!(game_gateway::session::owner_worker(session) < 2);
    drop(c);
    match mb.wait_for(T, |e| matches!(e, Event::Disconnect { .. })) {
        Some(Event::Disconnect { session: s, reason, .. }) => assert_eq!((s, reason), (session, 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn notify_sessions_off_sends_no_connect() {
    let mb = mock_with(Options { record_trans: true, ..Default::default() });
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], "notify_sessions = false"));
    let mut c = Client::connect(gw.local_addr());
    c.echo(1, sid(1, 10, 0), b"hi");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let ev = mb.drain();
    assert!(connects(&ev).is_empty() && disconnects(&ev).is_empty(), "{ev:?}");
    assert!(ev.iter().any(|e| matches!(e, Event::Trans { .. })));
}

#[test]
fn kick_with_and_without_last_frame() {
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut a = Client::connect(gw.local_addr());
    a.echo(1, sid(1, 10, 0), b"a");
    let sa = session_of(&mb, a.local());
    let mut b = Client::connect(gw.local_addr());
    b.echo(1, sid(1, 10, 0), b"b");
    let sb = session_of(&mb, b.local());

    mb.kick(sa, 77, b"you are kicked").unwrap();
    let last = a.recv();
    assert_eq!((last.msg_id, last.payload.as_slice()), (77, &b"you are kicked"[..]));
    assert!(a.closed());
    mb.kick(sb, 0, b"").unwrap();
    assert!(b.closed());
    let mut reasons = vec![];
    for _ in 0..2 {
        if let Some(Event::Disconnect { session, reason, .. }) =
            mb.wait_for(T, |e| matches!(e, Event::Disconnect { .. }))
        {
            reasons.push((session, reason));
        }
    }
    reasons.sort();
    let mut want = vec![(sa, 5), (sb, 5)];
    want.sort();
    assert_eq!(reasons, want);
    assert_eq!(stat(&gw.stats().sessions_closed, "kicked"), 2);
}

#[test]
fn multicast_to_three_of_ten_and_broadcast_to_all() {
    let mb = mock();
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut clients: Vec<(Client, i64)> = (0..10)
        .map(|i| {
            let mut c = Client::connect(gw.local_addr());
            c.echo(1, sid(1, 10, 0), format!("{i}").as_bytes());
            let s = session_of(&mb, c.local());
            (c, s)
        })
        .collect();
    let chosen: Vec<i64> = clients.iter().step_by(3).take(3).map(|c| c.1).collect();
    mb.multicast(&chosen, 55, b"team").unwrap();
    for (c, s) in clients.iter_mut() {
        if chosen.contains(s) {
            let r = c.recv();
            assert_eq!((r.msg_id, r.payload.as_slice()), (55, &b"team"[..]));
        } else {
            assert!(c.silent_for(Duration::from_millis(50)), "session {s} was not in the multicast");
        }
    }
    mb.broadcast(66, b"everyone").unwrap();
    for (c, _) in clients.iter_mut() {
        let r = c.recv();
        assert_eq!((r.msg_id, r.payload.as_slice()), (66, &b"everyone"[..]));
    }
}

#[test]
fn backend_frame_for_unbound_session_is_dropped_and_counted() {
    let mb = mock();
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut a = Client::connect(gw.local_addr());
    a.echo(1, sid(1, 10, 0), b"a");
    let sa = session_of(&mb, a.local());
    let mut frame = bytes::BytesMut::new();
    bproto::encode_reply(&mut frame, 1, 0, sa + 12345, b"forged");
    mb.send_raw_for(sa, &frame).unwrap();
    a.echo(2, sid(1, 10, 0), b"after");
    eventually("unbound_session counted", || stat(&gw.stats().frames_dropped, "unbound_session") == 1);
}

#[test]
fn backend_killed_closes_its_sessions_only_and_recovers() {
    let a = mock();
    let b = mock();
    let a_addr = a.addr();
    let routes = route(10, 0, "round_robin", &[a_addr], "") + &route(20, 0, "round_robin", &[b.addr()], "");
    let gw = start(2, "[backend]\nreconnect_backoff_min = \"50ms\"\nreconnect_backoff_max = \"200ms\"\n", &routes);
    let mut on_a: Vec<Client> = (0..5).map(|_| Client::connect(gw.local_addr())).collect();
    let mut on_b: Vec<Client> = (0..5).map(|_| Client::connect(gw.local_addr())).collect();
    for c in on_a.iter_mut() {
        c.echo(1, sid(1, 10, 0), b"a");
    }
    for c in on_b.iter_mut() {
        c.echo(1, sid(1, 20, 0), b"b");
    }
    a.kill();
    drop(a);
    for c in on_a.iter_mut() {
        assert!(c.closed(), "a session bound to the dead backend is closed");
    }
    for c in on_b.iter_mut() {
        c.echo(2, sid(1, 20, 0), b"b still fine");
    }
    let s = gw.stats();
    assert_eq!(stat(&s.sessions_closed, "backend_lost"), 5);
    // The backend comes back on the same port: new sessions work again.
    let a2 = MockBackend::start(&a_addr.to_string(), Options::default()).unwrap();
    eventually("new session served by the restarted backend", || {
        let mut c = Client::connect(gw.local_addr());
        c.s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        c.send(1, sid(1, 10, 0), b"again");
        matches!(c.try_recv(), Some(r) if r.payload == b"again")
    });
    assert!(a2.connections() > 0);
}

#[test]
fn rebind_policy_keeps_the_session_and_binds_again() {
    let a = mock();
    let a_addr = a.addr();
    let gw = start(
        1,
        "[backend]\nreconnect_backoff_min = \"10ms\"\nreconnect_backoff_max = \"50ms\"\n",
        &route(10, 0, "round_robin", &[a_addr], "on_backend_loss = \"rebind\""),
    );
    let mut c = Client::connect(gw.local_addr());
    c.echo(1, sid(1, 10, 0), b"before");
    a.kill();
    drop(a);
    let a2 = MockBackend::start(&a_addr.to_string(), Options::default()).unwrap();
    eventually("the session rebinds to the restarted backend", || {
        c.send(1, sid(1, 10, 0), b"after");
        c.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        matches!(c.try_recv(), Some(r) if r.payload == b"after")
    });
    c.s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(a2.sessions().len(), 1, "re-announced with CONNECT on the new connection");
}

#[test]
fn bad_client_input_closes_only_that_session() {
    let mb = mock();
    let gw = start(2, "[limits]\nmax_message_size = 1024\n", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut good = Client::connect(gw.local_addr());
    good.echo(1, sid(1, 10, 0), b"good");

    // Over max_message_size: refused from the header alone.
    let mut big = Client::connect(gw.local_addr());
    let _ = big.send_raw(&Client::frame(1, sid(1, 10, 0), &vec![0u8; 2000]));
    assert!(big.closed());

    // Truncated frame then close.
    let mut trunc = Client::connect(gw.local_addr());
    let f = Client::frame(1, sid(1, 10, 0), b"0123456789");
    trunc.send_raw(&f[..12]).unwrap();
    drop(trunc);

    // Random garbage (a length field far over the limit).
    let mut junk = Client::connect(gw.local_addr());
    let _ = junk.send_raw(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert!(junk.closed());

    good.echo(2, sid(1, 10, 0), b"still good");
    eventually("protocol errors counted", || {
        let s = gw.stats();
        stat(&s.protocol_errors, "frame_too_large") == 2 && stat(&s.sessions_closed, "protocol_error") == 2
    });
    eventually("truncated session closed as client_closed", || stat(&gw.stats().sessions_closed, "client_closed") >= 1);
}

#[test]
fn slow_reader_is_closed_not_buffered_forever() {
    let mb = mock();
    let gw =
        start(1, "[limits]\nmax_queued_bytes_per_session = 65544\n", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut c = Client::connect(gw.local_addr());
    c.echo(1, sid(1, 10, 0), b"x");
    let s = session_of(&mb, c.local());
    // Push far more than the socket buffers and the per-session cap hold.
    let payload = vec![7u8; 60_000];
    for _ in 0..200 {
        if mb.push(s, 1, 0, &payload).is_err() {
            break;
        }
    }
    eventually("slow reader closed", || stat(&gw.stats().protocol_errors, "slow_reader") == 1);
    eventually("session gone", || gw.stats().sessions_active == 0);
}

#[test]
fn idle_and_handshake_timeouts_close_sessions() {
    let mb = mock();
    let gw = start(
        1,
        "[limits]\nidle_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n",
        &route(10, 0, "round_robin", &[mb.addr()], ""),
    );
    let mut idle = Client::connect(gw.local_addr());
    idle.echo(1, sid(1, 10, 0), b"x");
    let mut silent = Client::connect(gw.local_addr());
    assert!(idle.closed());
    assert!(silent.closed());
    let sid_idle = session_of(&mb, idle.local());
    assert_eq!(next_disconnect(&mb), (sid_idle, 2));
}

#[test]
fn max_connections_refuses_past_the_cap() {
    let mb = mock();
    let gw = start(1, "[limits]\nmax_connections = 3\n", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut ok: Vec<Client> = (0..3).map(|_| Client::connect(gw.local_addr())).collect();
    for c in ok.iter_mut() {
        c.echo(1, sid(1, 10, 0), b"in");
    }
    let mut over = Client::connect(gw.local_addr());
    assert!(over.closed());
    assert_eq!(stat(&gw.stats().connection_rejected, "max_connections"), 1);
    drop(ok.pop());
    eventually("a slot frees up", || {
        let mut c = Client::connect(gw.local_addr());
        c.send(1, sid(1, 10, 0), b"again");
        c.try_recv().is_some()
    });
}

#[test]
fn trace_propagation_sends_the_session_trace_id_in_the_extended_header() {
    let mb = mock_with(Options { record_trans: true, trace: true, ..Default::default() });
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], "trace_propagation = true"));
    let mut traces = vec![];
    for _ in 0..2 {
        let mut c = Client::connect(gw.local_addr());
        c.echo(1, sid(1, 10, 0), b"one");
        c.echo(2, sid(1, 10, 0), b"two");
        let mut per_session = vec![];
        for _ in 0..2 {
            match mb.wait_for(T, |e| matches!(e, Event::Trans { .. })) {
                Some(Event::Trans { trace: Some(t), payload, .. }) => per_session.push((t, payload)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(per_session[0].1, b"one", "payload follows the 24 trace bytes");
        assert_eq!(per_session[0].0.trace_id, per_session[1].0.trace_id, "one trace per session");
        assert_ne!(per_session[0].0.span_id, per_session[1].0.span_id, "one span per frame");
        assert_ne!(per_session[0].0.trace_id, [0u8; 16]);
        traces.push(per_session[0].0.trace_id);
    }
    assert_ne!(traces[0], traces[1]);
}

#[test]
fn new_snapshot_rebinds_sessions_off_unlisted_backends_and_retires_the_connection() {
    use game_gateway::config::Config;
    use game_gateway::routing::RouteTable;
    use game_gateway::worker::{RouteUpdate, WorkerCommand};
    use std::sync::Arc;
    let (a, b) = (mock(), mock());
    let gw = start(2, "", &route(10, 0, "round_robin", &[a.addr()], ""));
    let mut c = Client::connect(gw.local_addr());
    c.echo(1, sid(1, 10, 0), b"on a");
    let s = session_of(&a, c.local());
    let cfg = Config::from_str(&config_text(2, "", &route(10, 0, "round_robin", &[b.addr()], "")), "new.toml").unwrap();
    let table = Arc::new(RouteTable::new(2, cfg.routes.clone(), vec![]));
    let sent = std::time::Instant::now();
    let update = RouteUpdate::new(table, sent, gw.worker_count());
    gw.broadcast(move || WorkerCommand::Routes(update.clone()));
    assert_eq!(next_disconnect(&a), (s, 8));
    c.echo(2, sid(1, 10, 0), b"on b");
    assert_eq!(session_of(&b, c.local()), s, "same session, rebound with a new CONNECT");
    eventually("the connection to the unlisted backend is closed", || a.connections() == 0);
    eventually("all workers on version 2", || gw.stats().route_version == 2);
    // Propagation: one observation for the snapshot (by the last worker to
    // apply it), no longer than it took to see it everywhere; each worker
    // says when it applied it and after how long.
    let bound = sent.elapsed();
    let s = gw.stats();
    assert_eq!(s.route_propagation.count, 1, "one observation per snapshot, not per worker");
    assert!(s.route_propagation.sum_ns <= bound.as_nanos(), "{} ns > {bound:?}", s.route_propagation.sum_ns);
    for w in gw.handle().worker_stats().into_iter().map(Option::unwrap) {
        assert!(w.route_applied_unix_us > 0 && w.route_apply_delay_us as u128 <= bound.as_micros(), "{w:?}");
        assert!(w.route_apply_delay_us as u128 * 1000 <= s.route_propagation.sum_ns, "no worker after the last");
    }
}
