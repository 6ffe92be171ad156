//! A real browser: headless Chromium loads `examples/web/index.html`, which
//! opens a WebSocket to the gateway, sends game frames built with DataView
//! and reports the echoed replies back to this test over HTTP.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it); `CHROMIUM` overrides
//! the binary. Fails, rather than skips, when no browser can be started.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

fn chromium() -> String {
    if let Ok(c) = std::env::var("CHROMIUM") {
        return c;
    }
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"] {
        if std::path::Path::new(c).exists() {
            return c.to_string();
        }
    }
    panic!("no Chromium found: install Debian's chromium (the CI script does) or set CHROMIUM");
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
                out.push(h);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Serves the demo page and collects the page's report.
fn page_server() -> (u16, crossbeam_channel::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = crossbeam_channel::unbounded();
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web/index.html")).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut h = String::new();
            while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                h.clear();
            }
            let mut c = conn;
            if path.starts_with("/index.html") {
                let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}", page.len());
            } else if let Some(q) = path.strip_prefix("/report?result=") {
                let _ = tx.send(url_decode(q));
                let _ = write!(c, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            } else {
                let _ = write!(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        }
    });
    (port, rx)
}

#[test]
fn headless_chromium_talks_to_the_gateway_over_websocket() {
    let mb = mock();
    let gw = start(2, "", &route(10, 0, "round_robin", &[mb.addr()], ""));
    let (port, reports) = page_server();
    let profile = TempDir::new("chromium");
    let url = format!(
        "http://127.0.0.1:{port}/index.html?gw=ws://{}/&report=http://127.0.0.1:{port}/report&count=3",
        gw.local_addr()
    );
    let mut child = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let t0 = Instant::now();
    let report = reports.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let report = report.unwrap_or_else(|_| panic!("no report from the page within {:?}", t0.elapsed()));
    let got: serde_json::Value = serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"));
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 3);
    for (i, r) in got.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(r["msg_id"].as_u64(), Some(n));
        assert_eq!(r["server_id"], "1.10.2");
        assert_eq!(r["payload"], format!("hello {n} from the browser"));
    }
    match mb.wait_for(T, |e| matches!(e, Event::Connect { .. })) {
        Some(Event::Connect { transport, .. }) => assert_eq!(transport, 2, "the browser came in over WebSocket"),
        other => panic!("{other:?}"),
    }
}

/// The same page served over HTTPS talks to the gateway over `wss://`: the
/// gateway terminates TLS (rustls) on the game port. Chromium trusts the
/// test certificate through its SPKI pin (`--ignore-certificate-errors-spki-list`).
#[test]
fn headless_chromium_on_an_https_page_talks_to_the_gateway_over_wss() {
    use std::sync::Arc;
    let dir = TempDir::new("wss");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    // base64(sha256(SubjectPublicKeyInfo)), as Chromium pins it.
    let spki = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -pubkey -noout -in {} | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            cert_path.display()
        ))
        .output()
        .expect("openssl");
    let spki = String::from_utf8(spki.stdout).unwrap().trim().to_string();
    assert!(!spki.is_empty(), "could not compute the SPKI pin with openssl");

    let mb = mock();
    let tls = format!(
        "[tls]\nmode = \"required\"\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let gw = start(2, &tls, &route(10, 0, "round_robin", &[mb.addr()], ""));

    // The page server, over TLS with the same certificate.
    let server_cfg = {
        use rustls::pki_types::pem::PemObject;
        let chain = vec![rustls::pki_types::CertificateDer::from_pem_file(&cert_path).unwrap()];
        let k = rustls::pki_types::PrivateKeyDer::from_pem_file(&key_path).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, k)
                .unwrap(),
        )
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, reports) = crossbeam_channel::unbounded();
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web/index.html")).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let tls = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(tls, conn);
            let mut r = BufReader::new(&mut s);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut h = String::new();
            while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                h.clear();
            }
            drop(r);
            if path.starts_with("/index.html") {
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}", page.len());
            } else if let Some(q) = path.strip_prefix("/report?result=") {
                let _ = tx.send(url_decode(q));
                let _ = write!(s, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            } else {
                let _ = write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    let profile = TempDir::new("chromium-wss");
    let url = format!(
        "https://localhost:{port}/index.html?gw=wss://localhost:{}/&report=https://localhost:{port}/report&count=3",
        gw.local_addr().port()
    );
    let mut child = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    let t0 = Instant::now();
    let report = reports.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let report = report.unwrap_or_else(|_| panic!("no report from the HTTPS page within {:?}", t0.elapsed()));
    let got: serde_json::Value = serde_json::from_str(&report).unwrap_or_else(|e| panic!("{e}: {report}"));
    assert_eq!(got.as_array().unwrap().len(), 3, "{report}");
    for (i, r) in got.as_array().unwrap().iter().enumerate() {
        assert_eq!(r["payload"], format!("hello {} from the browser", i + 1));
    }
}
