//! Regression tests for what a hostile test once broke, over real sockets:
//! each failed on the gateway before its fix.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn stat(map: &ahash::AHashMap<&'static str, u64>, k: &str) -> u64 {
    map.get(k).copied().unwrap_or(0)
}

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A WebSocket client that sends pings and never reads must not grow the
/// gateway's memory without bound: it is closed as a slow reader.
#[test]
fn websocket_pings_from_a_client_that_never_reads_are_cut_off() {
    let gw = start(1, "[limits]\nmax_queued_bytes_per_session = 65544\n", "");
    let mut s = TcpStream::connect(gw.local_addr()).unwrap();
    s.write_all(UPGRADE).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // Masked pings with 125-byte payloads; the socket buffers fill first,
    // then the gateway's queue for this client.
    let mut ping = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    ping.extend(std::iter::repeat_n(0u8, 125));
    let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 512).collect();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let t0 = Instant::now();
    let mut cut = false;
    while t0.elapsed() < Duration::from_secs(20) {
        if s.write_all(&burst).is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the gateway closed the connection");
    eventually("counted as a slow reader", || stat(&gw.stats().protocol_errors, "slow_reader") == 1);
}

/// A backend that accepts and never reads again, under load: its queue is
/// full, yet the keep-alive still times it out and its sessions are closed.
#[test]
fn a_hung_backend_under_load_is_detected() {
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let holder = std::thread::spawn(move || {
        // Accept, hold the sockets without reading, for the test's length.
        let mut held = Vec::new();
        hung.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = hung.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let extra = "[backend]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\nmax_queued_bytes = 65536\n[limits]\nmax_message_size = 65535\n";
    let gw = start(1, extra, &route(10, 0, "round_robin", &[addr], ""));
    let mut c = Client::connect(gw.local_addr());
    c.s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let big = Client::frame(1, sid(1, 10, 0), &[7u8; 60_000]);
    let t0 = Instant::now();
    // Fill every buffer on the way (bounded).
    for _ in 0..400 {
        if c.s.write_all(&big).is_err() {
            break;
        }
    }
    eventually("keep-alive timeout on the hung backend", || {
        gw.stats().backends.get(addr.to_string().as_str()).is_some_and(|b| stat(&b.errors, "keepalive_timeout") >= 1)
    });
    assert!(t0.elapsed() < Duration::from_secs(12));
    assert!(c.closed(), "its session is closed (reason 7)");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(gw);
    holder.join().unwrap();
}

/// Behind a trusted PROXY-protocol balancer, per-IP limits apply to the
/// clients in the headers, not to the balancer: 60 clients at one connect a
/// second each all get in; the same client twice within the second does not.
#[test]
fn per_ip_limits_behind_a_trusted_balancer_charge_the_real_clients() {
    let mb = mock();
    let extra = "proxy_protocol = true\nproxy_trusted = [\"127.0.0.0/8\"]\n[limits]\nconnection_rate_per_ip = 1\n";
    let gw = start(2, extra, &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut clients = Vec::new();
    for i in 0..60 {
        let mut c = Client::connect(gw.local_addr());
        c.send_raw(format!("PROXY TCP4 10.9.0.{i} 127.0.0.1 40000 8080\r\n").as_bytes()).unwrap();
        c.echo(1, sid(1, 10, 0), format!("client {i}").as_bytes());
        clients.push(c);
    }
    let mut again = Client::connect(gw.local_addr());
    again.send_raw(b"PROXY TCP4 10.9.0.7 127.0.0.1 40001 8080\r\n").unwrap();
    again.send(1, sid(1, 10, 0), b"too soon");
    assert!(again.closed(), "the same client twice in a second is refused");
    assert_eq!(stat(&gw.stats().rate_limit_rejected, "connection_rate_per_ip"), 1);
}

/// Every connection from one source address (a balancer, a NAT) still
/// spreads over the workers, and the node-wide caps stay exact.
#[test]
fn one_source_address_spreads_over_workers_and_caps_stay_exact() {
    let mb = mock();
    let cfg = config_text(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""))
        .replace("[log]", "[limits]\nmax_connections = 100\n\n[log]");
    let gw = GatewayProcess::spawn(&cfg, &[]);
    let mut clients: Vec<Client> = (0..100).map(|_| Client::connect(gw.addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.echo(1, sid(1, 10, 0), format!("{i}").as_bytes());
    }
    let (_, status) = http_get(gw.admin, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let per: Vec<u64> = v["workers"].as_array().unwrap().iter().map(|w| w["sessions"].as_u64().unwrap()).collect();
    assert_eq!(per.iter().sum::<u64>(), 100, "{per:?}");
    assert!(per.iter().all(|n| *n >= 20), "both workers serve: {per:?}");
    // The 101st connection is over the node's cap, whichever worker takes it.
    let mut extra = Client::connect(gw.addr);
    extra.send(1, sid(1, 10, 0), b"x");
    assert!(extra.closed(), "max_connections is node-wide");
}

/// A per-IP cap holds across workers.
#[test]
fn max_connections_per_ip_is_exact_across_workers() {
    let mb = mock();
    let gw = start(2, "[limits]\nmax_connections_per_ip = 3\n", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let mut ok: Vec<Client> = (0..3).map(|_| Client::connect(gw.local_addr())).collect();
    for c in ok.iter_mut() {
        c.echo(1, sid(1, 10, 0), b"in");
    }
    for _ in 0..4 {
        let mut c = Client::connect(gw.local_addr());
        c.send(1, sid(1, 10, 0), b"over");
        assert!(c.closed());
    }
    assert_eq!(stat(&gw.stats().connection_rejected, "max_connections_per_ip"), 4);
}

/// A client that sends its last request and half-closes still gets the reply.
#[test]
fn a_half_closed_client_gets_its_reply() {
    let mb = mock();
    let gw = start(1, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    for i in 0..20 {
        let mut c = Client::connect(gw.local_addr());
        c.send(1, sid(1, 10, 0), format!("last words {i}").as_bytes());
        c.s.shutdown(Shutdown::Write).unwrap();
        let r = c.recv();
        assert_eq!(r.payload, format!("last words {i}").as_bytes());
        assert!(c.closed());
    }
}

/// Drain closes gracefully: replies flushed, then FIN; what a client writes
/// until it sees that FIN still reaches the backend, before its DISCONNECT.
#[test]
fn drain_forwards_what_clients_send_until_they_see_the_close() {
    let mb = mock_with(mock_backend::Options { record_trans: true, no_echo: true, ..Default::default() });
    let cfg = config_text(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""))
        .replace("drain_timeout = \"1s\"", "drain_timeout = \"300ms\"");
    let mut gw = GatewayProcess::spawn(&cfg, &[]);
    let addr = gw.addr;
    let senders: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let local = c.local();
                c.s.set_nonblocking(true).unwrap();
                let mut sent = 0u32;
                let t0 = Instant::now();
                let mut buf = [0u8; 64];
                // 200 frames a second until the gateway's FIN (bounded).
                while t0.elapsed() < Duration::from_secs(8) {
                    let f = Client::frame(1, sid(1, 10, 0), format!("c{i}-{sent}").as_bytes());
                    if c.s.write_all(&f).is_err() {
                        break;
                    }
                    sent += 1;
                    match c.s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (local, sent)
            })
        })
        .collect();
    eventually("40 sessions bound", || mb.sessions().len() == 40);
    std::thread::sleep(Duration::from_millis(100));
    gw.signal(libc::SIGTERM);
    let results: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let events = mb.drain();
    for (local, sent) in results {
        let session = events
            .iter()
            .find_map(|e| match e {
                mock_backend::Event::Connect { session, addr, .. } if *addr == local => Some(*session),
                _ => None,
            })
            .expect("connected");
        let mut got = 0u32;
        let mut disconnected = false;
        for e in &events {
            match e {
                mock_backend::Event::Trans { session: s, .. } if *s == session => {
                    assert!(!disconnected, "a frame after the DISCONNECT");
                    got += 1;
                }
                mock_backend::Event::Disconnect { session: s, reason, .. } if *s == session => {
                    assert_eq!(*reason, 6);
                    disconnected = true;
                }
                _ => {}
            }
        }
        assert!(disconnected);
        assert_eq!(got, sent, "every frame client {local} wrote before it saw the close arrived");
    }
}

/// A refused connection leaves an access-log record with the refusal reason.
#[test]
fn refused_connections_are_in_the_access_log() {
    let mb = mock();
    let dir = TempDir::new("refused-access");
    let log = dir.0.join("access.log");
    let cfg = config_text(1, "[limits]\nmax_connections_per_ip = 1\n", &route(10, 0, "round_robin", &[mb.addr()], ""))
        .replace("[log]\n", &format!("[log]\naccess_log = true\naccess_log_path = \"{}\"\n", log.display()));
    let gw = GatewayProcess::spawn(&cfg, &[]);
    let mut first = Client::connect(gw.addr);
    first.echo(1, sid(1, 10, 0), b"in");
    let mut second = Client::connect(gw.addr);
    second.send(1, sid(1, 10, 0), b"over");
    assert!(second.closed());
    eventually("the refusal is in the access log", || {
        std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["status"] == "refused" && v["close.reason"] == "max_connections_per_ip"
        })
    });
}
