//! TLS on the game port over real sockets: native rustls clients (game
//! frames over TLS), plaintext beside TLS, TLS-only refusal, SNI selection,
//! `openssl s_client`, and certificates reloaded live while a session stays.

mod common;

use common::tls::*;
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

fn tls_echo(t: &mut TlsStream, payload: &[u8]) {
    t.write_all(&Client::frame(3, sid(1, 10, 0), payload)).unwrap();
    let mut head = [0u8; 8];
    t.read_exact(&mut head).unwrap();
    let len = u16::from_le_bytes([head[0], head[1]]) as usize;
    let mut body = vec![0u8; len];
    t.read_exact(&mut body).unwrap();
    assert_eq!(body, payload);
}

fn peer_leaf(t: &TlsStream) -> CertificateDer<'static> {
    t.conn.peer_certificates().unwrap()[0].clone().into_owned()
}

fn config_with(tls: &str, mb: &mock_backend::MockBackend) -> String {
    config_text(2, "", &route(10, 0, "round_robin", &[mb.addr()], "")).replace("[log]", &format!("{tls}\n[log]"))
}

#[test]
fn game_frames_over_tls_beside_plaintext_and_sni_selects_the_certificate() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.game.test"]);
    let b = pki.leaf("b", &["b.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("optional", &[a.clone(), b.clone()]), &mb), &[]);
    let mut ta = tls_connect(&pki, gw.addr, "a.game.test");
    tls_echo(&mut ta, b"over tls");
    let mut tb = tls_connect(&pki, gw.addr, "b.game.test");
    tls_echo(&mut tb, b"other name");
    assert_ne!(peer_leaf(&ta), peer_leaf(&tb), "each name gets its own certificate");
    // Plaintext still works on the same port (optional).
    let mut plain = Client::connect(gw.addr);
    plain.echo(1, sid(1, 10, 0), b"plain");
    // WebSocket upgrade inside TLS.
    let mut tw = tls_connect(&pki, gw.addr, "a.game.test");
    tw.write_all(b"GET / HTTP/1.1\r\nHost: a.game.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    tw.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
}

#[test]
fn a_tls_only_port_refuses_plaintext() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("required", &[a]), &mb), &[]);
    let mut plain = Client::connect(gw.addr);
    plain.send(1, sid(1, 10, 0), b"plain");
    assert!(plain.closed());
    let mut t = tls_connect(&pki, gw.addr, "a.game.test");
    tls_echo(&mut t, b"ok");
    let (_, metrics) = http_get(gw.admin, "/metrics");
    assert!(metrics.contains("game_gateway_tls_certificate_expiry_seconds{name=\"a.game.test\"}"), "{metrics}");
}

#[test]
fn openssl_s_client_completes_a_handshake() {
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        panic!("openssl is not installed (Debian package openssl)");
    }
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("required", &[a]), &mb), &[]);
    let out = std::process::Command::new("timeout")
        .args(["10", "openssl", "s_client", "-brief", "-servername", "a.game.test", "-CAfile"])
        .arg(pki.path("ca.pem"))
        .arg("-connect")
        .arg(gw.addr.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verification: OK"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
}

#[test]
fn certificates_reload_live_on_file_change_while_a_session_stays_up() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("live", &["live.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("required", &[(cert.clone(), key.clone())]), &mb), &[]);
    let mut old = tls_connect(&pki, gw.addr, "live.game.test");
    tls_echo(&mut old, b"before");
    let before = peer_leaf(&old);
    // A new certificate in the same files; a broken one first must be refused.
    std::fs::write(&cert, "not a certificate").unwrap();
    // The file watch (every second) tries the broken file, refuses it.
    std::thread::sleep(Duration::from_millis(1500));
    let mut still = tls_connect(&pki, gw.addr, "live.game.test");
    tls_echo(&mut still, b"bad file rejected, running certificate kept");
    assert_eq!(peer_leaf(&still), before);
    let (c2, k2) = pki.leaf("next", &["live.game.test"]);
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    // No signal: the certificate files' change is enough.
    eventually("new handshakes get the new certificate", || {
        let t = tls_connect(&pki, gw.addr, "live.game.test");
        let mut t = t;
        tls_echo(&mut t, b"probe");
        peer_leaf(&t) != before
    });
    tls_echo(&mut old, b"the old session is still up");
}

/// Session resumption (tickets) on TLS 1.3 and TLS 1.2, and ALPN: a client
/// that keeps its session cache resumes on its next connection; one that
/// offers `http/1.1` gets it.
#[test]
fn sessions_resume_with_tickets_on_tls13_and_tls12_and_alpn_picks_http11() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("required", &[a]), &mb), &[]);
    let versions: [(&str, &[&rustls::SupportedProtocolVersion]); 2] =
        [("TLS 1.3", &[&rustls::version::TLS13]), ("TLS 1.2", &[&rustls::version::TLS12])];
    for (name, version) in versions {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der().clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(version)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        let kinds: Vec<_> = (0..3)
            .map(|_| {
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("a.game.test").unwrap()).unwrap();
                let s = TcpStream::connect(gw.addr).unwrap();
                s.set_read_timeout(Some(T)).unwrap();
                let mut t = rustls::StreamOwned::new(conn, s);
                // The echo also reads the TLS 1.3 tickets sent after the handshake.
                tls_echo(&mut t, name.as_bytes());
                assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "{name}: ALPN");
                t.conn.send_close_notify();
                let _ = t.conn.complete_io(&mut t.sock);
                t.conn.handshake_kind()
            })
            .collect();
        assert_eq!(kinds[0], Some(rustls::HandshakeKind::Full), "{name}: first connection");
        assert_eq!(kinds[1], Some(rustls::HandshakeKind::Resumed), "{name}: second connection resumes");
        assert_eq!(kinds[2], Some(rustls::HandshakeKind::Resumed), "{name}: third connection resumes");
    }
}

/// Reads one client frame: (msg_id, payload).
fn tls_frame(t: &mut TlsStream) -> (u16, Vec<u8>) {
    let mut head = [0u8; 8];
    t.read_exact(&mut head).unwrap();
    let len = u16::from_le_bytes([head[0], head[1]]) as usize;
    let mut body = vec![0u8; len];
    t.read_exact(&mut body).unwrap();
    (u16::from_le_bytes([head[2], head[3]]), body)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) + seed) as u8).collect()
}

/// Issue 24, 1: more than rustls' 64 KiB send buffer queued for one TLS
/// session (a 65,535-byte reply, a burst of 64 x 8 KB while the client does
/// not read, then a kick whose last frame goes out in the close tail) arrives
/// whole and in order, then the close_notify. Before the fix rustls took part
/// of the queue and the rest was cleared: bytes lost, framing out of step.
#[test]
fn tls_replies_past_the_rustls_buffer_arrive_whole_and_in_order() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.game.test"]);
    let mb = mock();
    let gw = GatewayProcess::spawn(&config_with(&tls_section("required", &[a]), &mb), &[]);
    let mut t = tls_connect(&pki, gw.addr, "a.game.test");
    tls_echo(&mut t, b"bind");
    let session = *mb.sessions().last().expect("a session on the backend");
    let mut sent = vec![(9u16, pattern(0, 65_535))];
    for i in 1..=64 {
        sent.push((9, pattern(i, 8_000)));
    }
    for (msg, p) in &sent {
        mb.push(session, *msg as i32, sid(1, 10, 0), p).unwrap();
    }
    // The client does not read for a second: everything queues.
    std::thread::sleep(Duration::from_secs(1));
    let last = pattern(99, 60_000);
    mb.kick(session, 11, &last).unwrap();
    for (i, (msg, p)) in sent.iter().enumerate() {
        let (got_msg, got) = tls_frame(&mut t);
        assert_eq!((got_msg, got.len()), (*msg, p.len()), "frame {i}");
        assert!(got == *p, "frame {i}: payload differs");
    }
    let (got_msg, got) = tls_frame(&mut t);
    assert_eq!(got_msg, 11, "the kick's last frame");
    assert!(got == last, "the kick's last frame differs");
    let mut rest = Vec::new();
    assert_eq!(t.read_to_end(&mut rest).unwrap(), 0, "close_notify after the last frame");
}
