//! The front door of the game port, sans-IO: what the first bytes of a
//! connection are, the PROXY protocol header, and the HTTP request that may
//! be a WebSocket upgrade.
//!
//! Nothing here consumes bytes it does not understand: [`sniff`] only looks,
//! and the parsers report how many bytes their header took, so the bytes
//! after it (the game stream) stay in the caller's buffer.

use std::net::{IpAddr, SocketAddr};

/// What a connection starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to tell yet.
    NeedMore,
    /// A PROXY protocol v1 or v2 header.
    Proxy,
    /// An HTTP request (a WebSocket upgrade or not).
    Http,
    /// Anything else is read as client frames (which reject garbage).
    Game,
}

/// Whether `buf` starts like a TLS ClientHello record: content type 22
/// (handshake), version 3.x, then handshake type 1. `None`: not enough bytes
/// to tell. (A first game frame of exactly 790 payload bytes whose msg_id and
/// server id happen to continue the pattern would be mistaken for one; with
/// `[tls] mode = "required"` there is no ambiguity.)
pub fn looks_like_tls(buf: &[u8]) -> Option<bool> {
    const PATTERN: [Option<u8>; 6] = [Some(0x16), Some(0x03), None, None, None, Some(0x01)];
    for (i, p) in PATTERN.iter().enumerate() {
        match (buf.get(i), p) {
            (None, _) => return None,
            (Some(b), Some(want)) if b != want => return Some(false),
            (Some(b), None) if i == 2 && *b > 0x04 => return Some(false),
            _ => {}
        }
    }
    Some(true)
}

/// PROXY protocol v2 signature.
pub const PROXY_V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const PROXY_V1_SIG: &[u8] = b"PROXY ";
const HTTP_METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// Decides from the first bytes. A buffer that is a strict prefix of a
/// signature needs more bytes; anything that cannot become one is game data.
pub fn sniff(buf: &[u8]) -> Sniff {
    let matches = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    let complete = |sig: &[u8]| buf.len() >= sig.len();
    let mut undecided = false;
    for (sig, kind) in [(&PROXY_V2_SIG[..], Sniff::Proxy), (PROXY_V1_SIG, Sniff::Proxy)] {
        if matches(sig) {
            if complete(sig) {
                return kind;
            }
            undecided = true;
        }
    }
    for m in HTTP_METHODS {
        if matches(m) {
            if complete(m) {
                return Sniff::Http;
            }
            undecided = true;
        }
    }
    if undecided || buf.is_empty() {
        Sniff::NeedMore
    } else {
        Sniff::Game
    }
}

/// A parsed PROXY header: the client it announces (`None` for `LOCAL` /
/// `UNKNOWN`: use the connection's own peer) and the header's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub client: Option<SocketAddr>,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header from {0}, which is not a trusted source")]
    Untrusted(IpAddr),
    #[error("PROXY header on a listener without proxy_protocol")]
    NotEnabled,
}

impl ProxyError {
    /// Label of `protocol_errors` / log kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Malformed(_) => "proxy_malformed",
            ProxyError::Untrusted(_) => "proxy_untrusted",
            ProxyError::NotEnabled => "proxy_not_enabled",
        }
    }
}

/// Parses a PROXY v1 or v2 header at the front of `buf` (HAProxy's spec,
/// via the `ppp` crate). `Ok(None)`: incomplete.
pub fn parse_proxy(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    use ppp::PartialResult;
    if buf.starts_with(PROXY_V2_SIG) {
        let r = ppp::v2::Header::try_from(buf);
        if r.is_incomplete() {
            return Ok(None);
        }
        let h = r.map_err(|e| ProxyError::Malformed(e.to_string()))?;
        let client = match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            (_, ppp::v2::Addresses::Unspecified) | (_, ppp::v2::Addresses::Unix(_)) => None,
        };
        return Ok(Some(ProxyHeader { client, len: h.len() }));
    }
    // A v1 header is one line of at most 107 bytes. Nothing is parsed until
    // its CRLF is in: a read can end anywhere inside it (after a port, inside
    // a UTF-8 character), and a prefix must not be judged as a header.
    const V1_MAX: usize = 107;
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed(format!("no CRLF within {V1_MAX} bytes of a PROXY v1 header")))
        } else {
            Ok(None)
        };
    };
    let line = &buf[..end + 2];
    let h = ppp::v1::Header::try_from(line).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    let client = match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Some(ProxyHeader { client, len: line.len() }))
}

/// WebSocket settings the handshake needs.
#[derive(Debug, Clone, Default)]
pub struct UpgradePolicy {
    /// Allowed `Origin` values; empty = any origin.
    pub allowed_origins: Vec<String>,
    /// Subprotocols the gateway speaks, in order of preference.
    pub subprotocols: Vec<String>,
}

/// What to do with an HTTP request on the game port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpDecision {
    /// A valid upgrade: send `response` (101) and switch to WebSocket.
    Upgrade { response: String, subprotocol: Option<String> },
    /// Answer with the refusal's response and close.
    Refuse(HttpRefusal),
}

/// Every answer the game port gives an HTTP request it does not upgrade.
/// The responses are constants, built once at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpRefusal {
    /// Plain HTTP, not an upgrade: 426.
    UpgradeRequired,
    /// An upgrade that is not GET over HTTP/1.1: 400.
    BadMethod,
    /// No `Connection: upgrade`: 400.
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` other than 13: 400.
    BadVersion,
    /// No `Sec-WebSocket-Key`: 400.
    MissingKey,
    /// A `Sec-WebSocket-Key` that is not 16 bytes in base64 (RFC 6455 4.1): 400.
    BadKey,
    /// A head that does not parse: 400.
    Malformed,
    /// `Origin` not in the allow-list: 403.
    OriginRefused,
    /// A head longer than [`MAX_REQUEST_HEAD`]: 431.
    HeadTooLarge,
    /// A valid upgrade while `[websocket] enabled = false`: 404.
    WebSocketDisabled,
}

/// A complete `text/plain` response with `Connection: close`. The length is
/// written by hand (a macro cannot count); a unit test checks every one.
macro_rules! response {
    ($status:literal, $extra:literal, $len:literal, $body:literal) => {
        concat!(
            "HTTP/1.1 ",
            $status,
            "\r\n",
            $extra,
            "Content-Type: text/plain\r\nContent-Length: ",
            $len,
            "\r\nConnection: close\r\n\r\n",
            $body
        )
    };
}

impl HttpRefusal {
    pub fn status(self) -> u16 {
        match self {
            HttpRefusal::UpgradeRequired => 426,
            HttpRefusal::OriginRefused => 403,
            HttpRefusal::HeadTooLarge => 431,
            HttpRefusal::WebSocketDisabled => 404,
            _ => 400,
        }
    }

    /// Label of `protocol_errors` / log kind.
    pub fn metric_kind(self) -> &'static str {
        match self.status() {
            426 => "http_426",
            403 => "http_403",
            431 => "http_431",
            404 => "http_404",
            _ => "http_400",
        }
    }

    /// The whole response, `Connection: close` included.
    pub fn response(self) -> &'static str {
        match self {
            HttpRefusal::UpgradeRequired => response!(
                "426 Upgrade Required",
                "Upgrade: websocket\r\n",
                "65",
                "this port speaks game frames and WebSocket; upgrade to websocket\n"
            ),
            HttpRefusal::BadMethod => {
                response!("400 Bad Request", "", "46", "a WebSocket upgrade must be GET over HTTP/1.1\n")
            }
            HttpRefusal::MissingConnectionUpgrade => {
                response!("400 Bad Request", "", "28", "missing Connection: upgrade\n")
            }
            HttpRefusal::BadVersion => response!("400 Bad Request", "", "33", "Sec-WebSocket-Version must be 13\n"),
            HttpRefusal::MissingKey => response!("400 Bad Request", "", "26", "missing Sec-WebSocket-Key\n"),
            HttpRefusal::BadKey => {
                response!("400 Bad Request", "", "50", "Sec-WebSocket-Key must be 16 bytes base64-encoded\n")
            }
            HttpRefusal::Malformed => response!("400 Bad Request", "", "23", "malformed HTTP request\n"),
            HttpRefusal::OriginRefused => response!("403 Forbidden", "", "19", "origin not allowed\n"),
            HttpRefusal::HeadTooLarge => {
                response!("431 Request Header Fields Too Large", "", "23", "request head too large\n")
            }
            HttpRefusal::WebSocketDisabled => {
                response!("404 Not Found", "", "38", "websocket is disabled on this gateway\n")
            }
        }
    }
}

/// Largest request head read before answering 431.
pub const MAX_REQUEST_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;

/// RFC 6455 4.1: the key is 16 random bytes, base64-encoded: 22 characters
/// of the base64 alphabet then `==`.
fn valid_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        // The last character before the padding carries 2 bits: A, Q, g or w.
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
}

/// Parses the request head at the front of `buf` (with `httparse`).
/// `Ok(None)`: incomplete. On a decision, also returns the head's length.
pub fn parse_http(buf: &[u8], policy: &UpgradePolicy) -> Option<(HttpDecision, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => return None,
        Ok(httparse::Status::Partial) => return Some((HttpDecision::Refuse(HttpRefusal::HeadTooLarge), buf.len())),
        Err(_) => return Some((HttpDecision::Refuse(HttpRefusal::Malformed), buf.len())),
    };
    let header = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("Upgrade", "websocket") {
        return Some((HttpDecision::Refuse(HttpRefusal::UpgradeRequired), len));
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return Some((HttpDecision::Refuse(HttpRefusal::BadMethod), len));
    }
    if !has_token("Connection", "upgrade") {
        return Some((HttpDecision::Refuse(HttpRefusal::MissingConnectionUpgrade), len));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Some((HttpDecision::Refuse(HttpRefusal::BadVersion), len));
    }
    let Some(key) = header("Sec-WebSocket-Key").filter(|k| !k.trim().is_empty()) else {
        return Some((HttpDecision::Refuse(HttpRefusal::MissingKey), len));
    };
    if !valid_websocket_key(key.trim()) {
        return Some((HttpDecision::Refuse(HttpRefusal::BadKey), len));
    }
    if !policy.allowed_origins.is_empty() {
        let origin = header("Origin").unwrap_or("");
        if !policy.allowed_origins.iter().any(|o| o == origin) {
            return Some((HttpDecision::Refuse(HttpRefusal::OriginRefused), len));
        }
    }
    let offered: Vec<&str> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let subprotocol = policy.subprotocols.iter().find(|p| offered.contains(&p.as_str())).cloned();
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let proto_line = subprotocol.as_ref().map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{proto_line}\r\n"
    );
    Some((HttpDecision::Upgrade { response, subprotocol }, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http);
        assert_eq!(sniff(b"PROX"), Sniff::NeedMore);
        assert_eq!(sniff(b"PROXY TCP4 "), Sniff::Proxy);
        assert_eq!(sniff(b"\r\n\r\n\0\r\nQUIT\n\x21"), Sniff::Proxy);
        assert_eq!(sniff(b"\r\n\r\n"), Sniff::NeedMore);
        assert_eq!(sniff(&[5, 0, 1, 0, 2, 10, 1, 0]), Sniff::Game);
        assert_eq!(sniff(b"GEX"), Sniff::Game);
    }

    #[test]
    fn proxy_v1_and_v2() {
        let v1 = b"PROXY TCP4 10.1.2.3 10.0.0.1 4567 8080\r\nrest";
        assert_eq!(parse_proxy(&v1[..20]), Ok(None));
        let h = parse_proxy(v1).unwrap().unwrap();
        assert_eq!(h.client, Some("10.1.2.3:4567".parse().unwrap()));
        assert_eq!(&v1[h.len..], b"rest");
        assert_eq!(parse_proxy(b"PROXY UNKNOWN\r\n").unwrap().unwrap().client, None);
        assert!(parse_proxy(b"PROXY TCP4 nonsense\r\n").is_err());

        let mut v2 = PROXY_V2_SIG.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 168, 1, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x00, 0x50]);
        assert_eq!(parse_proxy(&v2[..14]), Ok(None));
        v2.extend_from_slice(b"game");
        let h = parse_proxy(&v2).unwrap().unwrap();
        assert_eq!(h.client, Some("192.168.1.9:8080".parse().unwrap()));
        assert_eq!(&v2[h.len..], b"game");
    }

    const UPGRADE: &str = "GET /play HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://game.example\r\nSec-WebSocket-Protocol: chat, game.v1\r\n\r\n";

    #[test]
    fn upgrade_accept_key_and_subprotocol() {
        let policy = UpgradePolicy { allowed_origins: vec![], subprotocols: vec!["game.v1".into()] };
        let (d, len) = parse_http(UPGRADE.as_bytes(), &policy).unwrap();
        assert_eq!(len, UPGRADE.len());
        match d {
            HttpDecision::Upgrade { response, subprotocol } => {
                // The RFC 6455 sample key.
                assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{response}");
                assert_eq!(subprotocol.as_deref(), Some("game.v1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_http(&UPGRADE.as_bytes()[..40], &policy).is_none());
    }

    #[test]
    fn refusals() {
        let p = UpgradePolicy::default();
        let status = |req: &str, p: &UpgradePolicy| match parse_http(req.as_bytes(), p).unwrap().0 {
            HttpDecision::Refuse(r) => {
                let response = r.response();
                assert!(response.contains("Connection: close"));
                let len: usize =
                    response.split("Content-Length: ").nth(1).unwrap().split('\r').next().unwrap().parse().unwrap();
                assert_eq!(len, response.split("\r\n\r\n").nth(1).unwrap().len(), "{response}");
                r.status()
            }
            d => panic!("{d:?}"),
        };
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\r\n", &p), 426);
        assert_eq!(status(&UPGRADE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""), &p), 400);
        assert_eq!(status(&UPGRADE.replace("Version: 13", "Version: 8"), &p), 400);
        assert_eq!(status(&UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "not-a-key"), &p), 400);
        assert_eq!(status(&UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ"), &p), 400);
        let strict = UpgradePolicy { allowed_origins: vec!["https://other".into()], subprotocols: vec![] };
        assert_eq!(status(UPGRADE, &strict), 403);
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(status(&huge, &p), 431);
    }

    #[test]
    fn a_v1_header_split_anywhere_is_need_more_until_its_crlf() {
        // Found by fuzzing: a read ending after a port, or inside a UTF-8
        // character, was refused as malformed.
        for full in [
            &b"PROXY TCP4 10.1.2.3 10.0.0.1 4567 8080\r\n"[..],
            b"PROXY TCP6 :: :: 4 0\r\n",
            "PROXY UNKNOWN é\r\n".as_bytes(),
        ] {
            for cut in 6..full.len() {
                assert_eq!(parse_proxy(&full[..cut]), Ok(None), "{:?}", String::from_utf8_lossy(&full[..cut]));
            }
            assert_eq!(parse_proxy(full).unwrap().unwrap().len, full.len());
        }
        let long = format!("PROXY TCP4 {}", "1".repeat(120));
        assert!(parse_proxy(long.as_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = sniff(&bytes);
            let _ = parse_proxy(&bytes);
            let _ = parse_http(&bytes, &UpgradePolicy::default());
        }
    }
}
