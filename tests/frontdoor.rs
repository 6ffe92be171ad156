//! The game port's front door: WebSocket (with a real WebSocket client),
//! plain HTTP, PROXY protocol v1/v2.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

fn ws_connect(addr: std::net::SocketAddr, extra: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut req = tungstenite::handshake::client::Request::builder()
        .uri(format!("ws://{addr}/play"))
        .header("Host", addr.to_string())
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    tungstenite::client::client(req.body(()).unwrap(), s).map(|(ws, _)| ws).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        other => panic!("{other:?}"),
    })
}

fn next_binary(ws: &mut Ws) -> Reply {
    loop {
        match ws.read().expect("a message") {
            Message::Binary(b) => {
                let len = u16::from_le_bytes([b[0], b[1]]) as usize;
                assert_eq!(b.len(), 8 + len, "one client frame per binary message");
                return Reply {
                    msg_id: u16::from_le_bytes([b[2], b[3]]),
                    server_id: u32::from_le_bytes(b[4..8].try_into().unwrap()),
                    payload: b[8..].to_vec(),
                };
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code.
fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

fn ws_gateway(extra: &str) -> (MockBackend, game_gateway::gateway::Gateway) {
    let mb = mock();
    let gw = start(2, extra, &route(10, 0, "round_robin", &[mb.addr()], ""));
    (mb, gw)
}

#[test]
fn websocket_echo_and_connect_says_transport_2() {
    let (mb, gw) = ws_gateway("");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    ws.send(Message::binary(Client::frame(7, sid(1, 10, 2), b"over websocket"))).unwrap();
    let r = next_binary(&mut ws);
    assert_eq!((r.msg_id, r.server_id, r.payload.as_slice()), (7, sid(1, 10, 2), &b"over websocket"[..]));
    match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { transport, addr, .. }) => {
            assert_eq!(transport, 2);
            assert_eq!(addr, ws.get_ref().local_addr().unwrap());
        }
        other => panic!("{other:?}"),
    }
    ws.close(Some(tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).unwrap();
    assert_eq!(close_code(&mut ws), Some(1000), "the close handshake is answered");
    match mb.wait_for(T, |e| matches!(e, Event::Disconnect { .. })) {
        Some(Event::Disconnect { reason, .. }) => assert_eq!(reason, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(gw.stats().websocket_upgrades, 1);
}

#[test]
fn several_frames_per_message_and_a_frame_split_over_messages() {
    let (_mb, gw) = ws_gateway("");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    let mut two = Client::frame(1, sid(1, 10, 0), b"first");
    two.extend(Client::frame(2, sid(1, 10, 0), b"second"));
    ws.send(Message::binary(two)).unwrap();
    assert_eq!(next_binary(&mut ws).payload, b"first");
    assert_eq!(next_binary(&mut ws).payload, b"second");
    let split = Client::frame(3, sid(1, 10, 0), b"split across three messages");
    ws.send(Message::binary(split[..5].to_vec())).unwrap();
    ws.send(Message::binary(split[5..12].to_vec())).unwrap();
    ws.send(Message::binary(split[12..].to_vec())).unwrap();
    let r = next_binary(&mut ws);
    assert_eq!((r.msg_id, r.payload.as_slice()), (3, &b"split across three messages"[..]));
}

#[test]
fn ping_is_answered_with_pong() {
    let (_mb, gw) = ws_gateway("");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into())).unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn text_frames_are_refused_with_1003() {
    let (_mb, gw) = ws_gateway("");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(close_code(&mut ws), Some(u16::from(CloseCode::Unsupported)));
}

#[test]
fn oversize_messages_are_refused_with_1009() {
    let (_mb, gw) = ws_gateway("[websocket]\nmax_message_size = 1024\n");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    ws.send(Message::binary(Client::frame(1, sid(1, 10, 0), &[0u8; 2000]))).unwrap();
    assert_eq!(close_code(&mut ws), Some(1009));
}

#[test]
fn unmasked_client_frames_are_refused() {
    let (_mb, gw) = ws_gateway("");
    let mut s = TcpStream::connect(gw.local_addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let frame = Client::frame(1, sid(1, 10, 0), b"x");
    let mut ws = vec![0x82, frame.len() as u8];
    ws.extend(frame);
    s.write_all(&ws).unwrap();
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1002);
}

#[test]
fn bad_handshake_gets_400_and_plain_http_gets_426() {
    let (_mb, gw) = ws_gateway("");
    let ask = |req: &str| {
        let mut s = TcpStream::connect(gw.local_addr()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let bad = ask(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    let plain = ask("GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{plain}");
    assert!(plain.contains("Connection: close\r\n") && plain.contains("Upgrade: websocket\r\n"), "{plain}");
}

#[test]
fn origin_allow_list_and_subprotocol_selection() {
    let (_mb, gw) = ws_gateway(
        "[websocket]\nallowed_origins = [\"https://play.example\"]\nsubprotocols = [\"game.v2\", \"game.v1\"]\n",
    );
    match ws_connect(gw.local_addr(), &[("Origin", "https://evil.example")]) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let s = TcpStream::connect(gw.local_addr()).unwrap();
    let req = tungstenite::handshake::client::Request::builder()
        .uri(format!("ws://{}/", gw.local_addr()))
        .header("Host", "x")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
        .header("Origin", "https://play.example")
        .header("Sec-WebSocket-Protocol", "game.v1, chat")
        .body(())
        .unwrap();
    let (_ws, resp) = tungstenite::client::client(req, s).unwrap();
    assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").unwrap(), "game.v1");
}

#[test]
fn kick_over_websocket_sends_last_frame_then_close() {
    let (mb, gw) = ws_gateway("");
    let mut ws = ws_connect(gw.local_addr(), &[]).unwrap();
    ws.send(Message::binary(Client::frame(1, sid(1, 10, 0), b"hi"))).unwrap();
    next_binary(&mut ws);
    let session = match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { session, .. }) => session,
        other => panic!("{other:?}"),
    };
    mb.kick(session, 9, b"bye").unwrap();
    assert_eq!(next_binary(&mut ws).payload, b"bye");
    assert_eq!(close_code(&mut ws), Some(1000));
}

/// A gateway with `proxy_protocol` on, trusting `trusted` (TOML list items).
fn start_proxy(mb: &MockBackend, trusted: &str) -> game_gateway::gateway::Gateway {
    let text = config_text(1, "", &route(10, 0, "round_robin", &[mb.addr()], "")).replacen(
        "[server]\n",
        &format!("[server]\nproxy_protocol = true\nproxy_trusted = [{trusted}]\n"),
        1,
    );
    let mut cfg = game_gateway::config::Config::from_str(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.log.access_log = false;
    let table = game_gateway::control::static_routes(&cfg, 1);
    game_gateway::gateway::Gateway::start(cfg, table).unwrap()
}

#[test]
fn proxy_v1_and_v2_from_a_trusted_source_set_the_client_address() {
    let mb = mock();
    let gw = start_proxy(&mb, "\"127.0.0.0/8\"");
    let mut c = Client::connect(gw.local_addr());
    c.send_raw(b"PROXY TCP4 203.0.113.7 10.0.0.1 40001 8080\r\n").unwrap();
    c.echo(1, sid(1, 10, 0), b"via haproxy v1");
    match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { addr, .. }) => assert_eq!(addr, "203.0.113.7:40001".parse().unwrap()),
        other => panic!("{other:?}"),
    }
    let mut v2 = game_gateway::protocol::frontdoor::PROXY_V2_SIG.to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x42, 0x1f, 0x90]);
    let mut c2 = Client::connect(gw.local_addr());
    v2.extend(Client::frame(1, sid(1, 10, 0), b"via haproxy v2"));
    c2.send_raw(&v2).unwrap();
    assert_eq!(c2.recv().payload, b"via haproxy v2");
    match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { addr, .. }) => assert_eq!(addr, "198.51.100.9:40002".parse().unwrap()),
        other => panic!("{other:?}"),
    }
    // A WebSocket behind a PROXY header works too.
    let mut raw = TcpStream::connect(gw.local_addr()).unwrap();
    raw.write_all(b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 8080\r\n").unwrap();
    let req = tungstenite::handshake::client::Request::builder()
        .uri("ws://x/")
        .header("Host", "x")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    let (mut ws, _) = tungstenite::client::client(req, raw).unwrap();
    ws.send(Message::binary(Client::frame(1, sid(1, 10, 0), b"ws"))).unwrap();
    assert_eq!(next_binary(&mut ws).payload, b"ws");
    match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { addr, transport, .. }) => {
            assert_eq!((addr, transport), ("192.0.2.1:5555".parse().unwrap(), 2))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn proxy_headers_from_untrusted_sources_or_malformed_are_refused() {
    let mb = mock();
    let gw = start_proxy(&mb, "\"10.0.0.0/8\"");
    let mut c = Client::connect(gw.local_addr());
    let _ = c.send_raw(b"PROXY TCP4 203.0.113.7 10.0.0.1 40001 8080\r\n");
    assert!(c.closed(), "untrusted source");
    let gw2 = start_proxy(&mb, "\"127.0.0.1\"");
    let mut bad = Client::connect(gw2.local_addr());
    let _ = bad.send_raw(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n");
    assert!(bad.closed(), "malformed header");
    // Without proxy_protocol a header is refused, not read as a frame.
    let (_mb, plain) = ws_gateway("");
    let mut c3 = Client::connect(plain.local_addr());
    let _ = c3.send_raw(b"PROXY TCP4 203.0.113.7 10.0.0.1 40001 8080\r\n");
    assert!(c3.closed());
    let s = plain.stats();
    assert_eq!(s.protocol_errors.get("proxy_not_enabled").copied(), Some(1));
    std::thread::sleep(Duration::from_millis(1));
}
