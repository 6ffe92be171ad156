//! Fuzzing entry points, compiled only with the `fuzzing` feature.
//!
//! Each `pub fn NAME(data: &[u8])` here is the whole body of the cargo-fuzz
//! target `fuzz/fuzz_targets/NAME.rs` (nightly, libFuzzer). The same bodies
//! run on stable in the tests at the bottom of this file, which replay the
//! committed seed corpora (`fuzz/corpus/NAME/`) and a few hundred random
//! inputs each: `cargo test --features fuzzing --lib fuzzing`. A body panics
//! on a broken invariant (an assertion) and on nothing else: every input is
//! legal, errors are values.
//!
//! | target | what it drives |
//! |---|---|
//! | [`client_frame`] | `gate_protocol::client::check` over a byte stream, at once and in chunks |
//! | [`backend_frame`] | backend `check` / `parse` / `check_seed`; gRPC `check` / `decode` |
//! | [`front_door`] | `sniff`, `parse_proxy`, `parse_http`; `WsState::on_bytes` fed in chunks |
//! | [`route_json`] | the Redis rules JSON, realm mapping and rule-file bundle parsers |
//! | [`config`] | `Config::from_str` on arbitrary UTF-8 |
//! | [`shard`] | the shard state machine, driven by a sequence of events ([`ShardDriver`]) |
//!
//! Names that would resolve: `Endpoint::parse` resolves `host:port` names
//! with the system resolver. The `route_json` and `config` targets skip any
//! input holding a string that would be resolved ([`would_resolve`]), so a
//! fuzzer never sends a DNS query.

use crate::config::{Config, Environment};
use crate::control::redis::validate_raw;
use crate::control::routes::{fingerprint, merge, parse_bundle, parse_redis, RouteSet};
use crate::protocol::backend::{self as bproto, BackendFrameError, Body, DisconnectReason, Opcode};
use crate::protocol::client::{self as cproto, ClientFrameError};
use crate::protocol::frontdoor::{self, HttpDecision, HttpRefusal, Sniff, UpgradePolicy};
use crate::protocol::grpc::{self, GrpcFrameError};
use crate::protocol::ws::{WsEnd, WsState};
use crate::protocol::ServerId;
use crate::routing::{BackendProtocol, Endpoint, Resolution, RouteRule, RouteTable};
use crate::shard::{Action, BackendOut, BackendRead, ClientOut, ConnId, LossKind, SessionKey, Shard, ShardSetup};
use crate::stats::WorkerStats;
use ahash::{AHashMap, AHashSet};
use bytes::{Buf, BytesMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Reads an input front to back; past its end every read is 0, so any input
/// is a complete program.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// Up to `n` bytes of the input (fewer at its end).
    fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
    /// A length byte (below `m`), then that many bytes.
    fn chunk(&mut self, m: usize) -> &'a [u8] {
        let n = self.u8() as usize % m;
        self.take(n)
    }
    /// A payload: mostly short, sometimes large, filled with one byte.
    fn payload(&mut self) -> Vec<u8> {
        let b = self.u8();
        let len = if b < 192 { (b % 48) as usize } else { (b as usize - 192) * 1100 };
        vec![self.u8(); len]
    }
}

/// Deterministic chunk sizes for feeding a stream in pieces.
struct Chunks(u32);

impl Chunks {
    fn next(&mut self) -> usize {
        self.0 = self.0.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        match (self.0 >> 16) % 8 {
            0 => 1,
            1 => 2,
            2..=5 => 1 + ((self.0 >> 20) % 40) as usize,
            _ => 1 + ((self.0 >> 19) % 600) as usize,
        }
    }
}

fn u16le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn i32le(b: &[u8]) -> i32 {
    i32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn i64le(b: &[u8]) -> i64 {
    i64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Checks named in the `FUZZ_KNOWN` environment variable (comma-separated)
/// are skipped: a way to keep fuzzing past a reported, not yet fixed
/// finding. Unset, every check runs. Names: `proxy-v1-split`,
/// `proxy-v1-bare-lf` (fuzz/artifacts-found/README.md).
fn known(name: &str) -> bool {
    static K: OnceLock<Vec<String>> = OnceLock::new();
    K.get_or_init(|| {
        std::env::var("FUZZ_KNOWN").map(|v| v.split(',').map(|s| s.trim().to_string()).collect()).unwrap_or_default()
    })
    .iter()
    .any(|k| k == name)
}

// ---------------------------------------------------------------------------
// client_frame

/// What framing a client stream gave: each frame's header and offset in
/// the stream, in order, then how it ended (`None`: need more; `Some(len)`:
/// refused as too large).
type Framed = (Vec<(cproto::ClientHeader, usize)>, Option<usize>);

/// `client::check` over arbitrary bytes: never panics; every frame's
/// consumed length is the header's; the fields are the header bytes and
/// re-encode to the same bytes; "need more" only while the frame is
/// incomplete; "too large" only for a declared length over the maximum; and
/// the same stream fed in chunks frames identically.
pub fn client_frame(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let max = match data[0] & 3 {
        0 => cproto::MAX_PAYLOAD,
        1 => u16le(&data[1..3]) as usize,
        2 => data[1] as usize,
        _ => 70_000,
    };
    let stream = &data[3..];

    // All at once.
    let mut whole: Framed = (Vec::new(), None);
    let mut off = 0;
    let mut enc = BytesMut::new();
    loop {
        let rest = &stream[off..];
        match cproto::check(rest, max) {
            Ok(Some(h)) => {
                let declared = u16le(rest);
                assert_eq!(h.len, declared);
                assert!(h.len as usize <= max, "{h:?} over max {max}");
                assert_eq!(h.frame_len(), cproto::HEADER_LEN + declared as usize);
                assert!(
                    h.frame_len() <= rest.len(),
                    "frame_len {} beyond the {} bytes buffered",
                    h.frame_len(),
                    rest.len()
                );
                assert_eq!(h.msg_id, u16le(&rest[2..]));
                assert_eq!(h.server_id.0, u32le(&rest[4..]));
                let s = h.server_id;
                assert_eq!(ServerId::new(s.is_zip(), s.world_id(), s.server_type(), s.inst_id()), s);
                if whole.0.is_empty() {
                    let _ = format!("{s} {s:?}");
                }
                enc.clear();
                assert!(cproto::encode(&mut enc, h.msg_id, h.server_id, &rest[cproto::HEADER_LEN..h.frame_len()]));
                assert_eq!(&enc[..], &rest[..h.frame_len()], "re-encoding differs");
                whole.0.push((h, off));
                off += h.frame_len();
            }
            Ok(None) => {
                if rest.len() >= cproto::HEADER_LEN {
                    let declared = u16le(rest) as usize;
                    assert!(declared <= max);
                    assert!(rest.len() < cproto::HEADER_LEN + declared, "need more with a whole frame buffered");
                }
                break;
            }
            Err(ClientFrameError::TooLarge { len, max: m }) => {
                assert!(rest.len() >= cproto::HEADER_LEN, "refused before the header was in");
                assert_eq!(len, u16le(rest) as usize);
                assert!(len > max);
                assert_eq!(m, max);
                let _ = ClientFrameError::TooLarge { len, max: m }.to_string();
                whole.1 = Some(len);
                break;
            }
        }
    }

    // The same bytes as a reader would get them: in chunks into one buffer
    // that keeps a partial frame.
    let mut chunked: Framed = (Vec::new(), None);
    let mut chunks = Chunks(data[0] as u32 | (data[1] as u32) << 8);
    let mut buf = BytesMut::new();
    let (mut fed, mut consumed) = (0, 0);
    'feed: while fed < stream.len() {
        let n = chunks.next().min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            match cproto::check(&buf, max) {
                Ok(Some(h)) => {
                    assert_eq!(&buf[..h.frame_len()], &stream[consumed..consumed + h.frame_len()]);
                    chunked.0.push((h, consumed));
                    consumed += h.frame_len();
                    buf.advance(h.frame_len());
                }
                Ok(None) => break,
                Err(ClientFrameError::TooLarge { len, .. }) => {
                    chunked.1 = Some(len);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(whole, chunked, "framing depends on how the bytes arrived");
    if whole.1.is_none() {
        assert_eq!(&buf[..], &stream[off..], "the partial frame left over differs");
    }
}

// ---------------------------------------------------------------------------
// backend_frame

/// Backend frames (gate `check` + `parse`, seed `check_seed`) and gRPC
/// messages (`check` + `decode`) over arbitrary bytes: never panic; lengths
/// and errors agree with the header bytes; bodies account for every byte and
/// re-encode to the same bytes; gRPC packets survive an encode/decode trip.
pub fn backend_frame(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let trace = data[0] & 1 == 1;
    let max = match (data[0] >> 1) & 3 {
        0 => 1 << 20,
        1 => u16le(&data[1..3]) as usize,
        2 => data[1] as usize,
        _ => 29 + data[1] as usize,
    };
    let stream = &data[3..];
    gate_stream(stream, max, trace);
    seed_stream(stream, max);
    grpc_stream(stream, max);
    // The two framings agree on the first frame where both accept it.
    if let Ok(Some(h)) = bproto::check(stream, max) {
        assert_eq!(bproto::check_seed(stream, max), Ok(Some((h.msg_type, h.frame_len()))));
    }
    if stream.len() >= bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN && bproto::check_seed(stream, max).is_err() {
        assert!(bproto::check(stream, max).is_err(), "seed refuses a length the gate check accepts");
    }
}

fn gate_stream(stream: &[u8], max: usize, trace: bool) {
    let mut rest = stream;
    loop {
        match bproto::check(rest, max) {
            Ok(Some(h)) => {
                let declared = i32le(rest);
                assert!(declared >= bproto::GATE_HEADER_LEN as i32);
                assert_eq!(h.length as i64, declared as i64);
                assert!(h.length as usize <= max);
                assert_eq!(h.frame_len(), bproto::SERVER_HEADER_LEN + declared as usize);
                assert!(h.frame_len() <= rest.len());
                assert_eq!(h.msg_type, i32le(&rest[4..]));
                assert_eq!(h.server_id, u32le(&rest[8..]));
                assert_eq!(h.object_id, i64le(&rest[12..]));
                assert_eq!(h.opcode as u8, rest[20]);
                assert_eq!(h.session_id, i64le(&rest[21..]));
                let frame = &rest[..h.frame_len()];
                match bproto::parse(&h, frame, trace) {
                    Ok(body) => check_body(&h, frame, &body, trace),
                    Err(BackendFrameError::BadBody { opcode, what }) => {
                        assert_eq!(opcode, h.opcode);
                        let body_len = h.length as usize - bproto::GATE_HEADER_LEN;
                        let body = &frame[bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN..];
                        let expected = match h.opcode {
                            Opcode::Trans => trace && body_len < bproto::TRACE_EXT_LEN,
                            Opcode::Connect => body_len != bproto::CONNECT_BODY_LEN,
                            Opcode::Disconnect => body_len != 1,
                            Opcode::Multicast => body_len < 2 || body_len < 2 + 8 * u16le(body) as usize,
                            _ => false,
                        };
                        assert!(expected, "{:?} refused as {what} with a body of {body_len}", h.opcode);
                    }
                    Err(e) => panic!("parse returned a header error after check accepted the header: {e:?}"),
                }
                rest = &rest[h.frame_len()..];
            }
            Ok(None) => {
                if rest.len() >= 4 {
                    assert!(i32le(rest) >= bproto::GATE_HEADER_LEN as i32);
                }
                if rest.len() >= bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN {
                    let declared = i32le(rest) as usize;
                    assert!(declared <= max);
                    assert!(Opcode::from_u8(rest[20]).is_some());
                    assert!(rest.len() < bproto::SERVER_HEADER_LEN + declared, "need more with the frame buffered");
                }
                break;
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(rest.len() >= 4, "{e:?} before the length was in");
                let declared = i32le(rest);
                match e {
                    BackendFrameError::TooShort(l) => {
                        assert_eq!(l, declared);
                        assert!(l < bproto::GATE_HEADER_LEN as i32);
                    }
                    BackendFrameError::TooLarge { len, max: m } => {
                        assert!(rest.len() >= 29);
                        assert_eq!((len, m), (declared as usize, max));
                        assert!(len > max);
                    }
                    BackendFrameError::UnknownOpcode(op) => {
                        assert!(rest.len() >= 29);
                        assert_eq!(op, rest[20]);
                        assert!(Opcode::from_u8(op).is_none());
                        assert!(declared >= 9 && declared as usize <= max);
                    }
                    BackendFrameError::BadBody { .. } => panic!("check looked at a body: {e:?}"),
                }
                break;
            }
        }
    }
}

/// A parsed body accounts for every byte of the frame and re-encodes to it.
fn check_body(h: &bproto::Header, frame: &[u8], body: &Body<'_>, trace: bool) {
    let hdr = bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN;
    let raw = &frame[hdr..];
    assert_eq!(raw.len(), h.length as usize - bproto::GATE_HEADER_LEN);
    // Encoders write the session id into object_id as well: compare the rest.
    let same_but_object_id = |enc: &[u8]| {
        assert_eq!(enc.len(), frame.len(), "re-encoded {:?} has another length", h.opcode);
        assert_eq!(&enc[..12], &frame[..12]);
        assert_eq!(&enc[20..], &frame[20..]);
    };
    let mut enc = BytesMut::new();
    match (h.opcode, body) {
        (Opcode::Trans, Body::Trans { trace: t, payload }) => {
            if trace {
                let t = t.expect("trace context missing");
                assert_eq!(&t.trace_id[..], &raw[..16]);
                assert_eq!(&t.span_id[..], &raw[16..24]);
                assert_eq!(*payload, &raw[bproto::TRACE_EXT_LEN..]);
                bproto::encode_trans(&mut enc, h.msg_type, h.server_id, h.session_id, Some(&t), payload);
            } else {
                assert!(t.is_none());
                assert_eq!(*payload, raw);
                bproto::encode_trans(&mut enc, h.msg_type, h.server_id, h.session_id, None, payload);
            }
            same_but_object_id(&enc);
        }
        (Opcode::Connect, Body::Connect { transport, addr }) => {
            assert_eq!(raw.len(), bproto::CONNECT_BODY_LEN);
            assert_eq!(*transport, raw[0]);
            let ip6 = match addr.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            assert_eq!(&ip6.octets()[..], &raw[1..17]);
            assert_eq!(addr.port(), u16le(&raw[17..]));
        }
        (Opcode::Disconnect, Body::Disconnect { reason }) => {
            assert_eq!(raw, &[*reason][..]);
            if let Some(r) = DisconnectReason::from_u8(*reason) {
                assert_eq!(r as u8, *reason);
                let _ = r.as_str();
            }
        }
        (Opcode::Kick, Body::Kick { payload }) => {
            assert_eq!(*payload, raw);
            bproto::encode_kick(&mut enc, h.msg_type, h.server_id, h.session_id, payload);
            same_but_object_id(&enc);
        }
        (Opcode::Multicast, Body::Multicast { sessions, payload }) => {
            let count = u16le(raw) as usize;
            assert_eq!(sessions.len(), count);
            assert_eq!(sessions.is_empty(), count == 0);
            assert_eq!(2 + 8 * count + payload.len(), raw.len());
            let ids: Vec<i64> = sessions.iter().collect();
            assert_eq!(ids.len(), count);
            bproto::encode_multicast(&mut enc, h.msg_type, h.server_id, &ids, payload);
            assert_eq!(enc.len(), frame.len());
            assert_eq!(&enc[..12], &frame[..12]);
            assert_eq!(enc[20], frame[20]);
            assert_eq!(&enc[hdr..], raw);
        }
        (Opcode::Broadcast, Body::Broadcast { payload }) => {
            assert_eq!(*payload, raw);
            bproto::encode_broadcast(&mut enc, h.msg_type, h.server_id, payload);
            assert_eq!(&enc[..12], &frame[..12]);
            assert_eq!(&enc[20..21], &frame[20..21]);
            assert_eq!(&enc[hdr..], raw);
        }
        (Opcode::Ping, Body::Ping) | (Opcode::Pong, Body::Pong) => {}
        (op, b) => panic!("opcode {op:?} parsed as {b:?}"),
    }
}

fn seed_stream(stream: &[u8], max: usize) {
    let mut rest = stream;
    loop {
        match bproto::check_seed(rest, max) {
            Ok(Some((t, len))) => {
                let declared = i32le(rest);
                assert!(declared >= 9 && declared as usize <= max);
                assert_eq!(len, bproto::SERVER_HEADER_LEN + declared as usize);
                assert!(len <= rest.len());
                assert_eq!(t, i32le(&rest[4..]));
                // The driver slices the payload like this.
                let _payload = &rest[bproto::SERVER_HEADER_LEN + bproto::GATE_HEADER_LEN..len];
                rest = &rest[len..];
            }
            Ok(None) => {
                if rest.len() >= 4 {
                    let declared = i32le(rest);
                    assert!(declared >= 9 && declared as usize <= max);
                    assert!(rest.len() < bproto::SERVER_HEADER_LEN + declared as usize);
                }
                break;
            }
            Err(BackendFrameError::TooShort(l)) => {
                assert!(rest.len() >= 4);
                assert_eq!(l, i32le(rest));
                assert!(l < 9);
                break;
            }
            Err(BackendFrameError::TooLarge { len, max: m }) => {
                assert!(rest.len() >= 4);
                assert_eq!((len, m), (i32le(rest) as usize, max));
                assert!(len > max);
                break;
            }
            Err(e) => panic!("check_seed: unexpected {e:?}"),
        }
    }
}

fn grpc_stream(stream: &[u8], max: usize) {
    let mut rest = stream;
    loop {
        match grpc::check(rest, max) {
            Ok(Some(n)) => {
                assert_eq!(rest[0], 0);
                let declared = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                assert!(declared <= max);
                assert_eq!(n, grpc::MESSAGE_PREFIX_LEN + declared);
                assert!(n <= rest.len());
                match grpc::decode(&rest[..n]) {
                    Ok(p) => {
                        let _ = p.kind();
                        let mut enc = BytesMut::new();
                        grpc::encode(&mut enc, &p);
                        assert_eq!(grpc::check(&enc, usize::MAX), Ok(Some(enc.len())));
                        assert_eq!(grpc::decode(&enc).as_ref(), Ok(&p), "GamePacket changed in an encode/decode trip");
                    }
                    Err(GrpcFrameError::Decode(_)) => {}
                    Err(e) => panic!("decode: unexpected {e:?}"),
                }
                rest = &rest[n..];
            }
            Ok(None) => {
                if rest.len() >= grpc::MESSAGE_PREFIX_LEN {
                    assert_eq!(rest[0], 0);
                    let declared = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    assert!(declared <= max && rest.len() < grpc::MESSAGE_PREFIX_LEN + declared);
                }
                break;
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(rest.len() >= grpc::MESSAGE_PREFIX_LEN);
                match e {
                    GrpcFrameError::Compressed => assert_ne!(rest[0], 0),
                    GrpcFrameError::TooLarge { len, max: m } => {
                        assert_eq!(rest[0], 0);
                        assert_eq!(len, u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize);
                        assert!(len > max && m == max);
                    }
                    GrpcFrameError::Decode(_) => panic!("check decoded"),
                }
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// front_door

/// The front door over arbitrary first bytes: `sniff` decides once and for
/// good; `parse_proxy` and `parse_http` never claim more bytes than they were
/// given, and a header they accept is "need more" on every shorter prefix
/// (so a header split across reads is never refused); upgrades answer 101
/// with an accept key. The same bytes as WebSocket traffic, fed to
/// `WsState::on_bytes` in chunks: every chunk is consumed, the binary
/// stream and the outcome do not depend on the chunking.
pub fn front_door(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let flags = data[0];
    let buf = &data[1..];
    let policy = UpgradePolicy {
        allowed_origins: if flags & 1 == 1 { vec!["https://game.example".into()] } else { vec![] },
        subprotocols: if flags & 2 == 2 { vec!["game.v1".into(), "chat".into()] } else { vec![] },
    };

    // sniff: once decided, longer prefixes keep the decision.
    let full = frontdoor::sniff(buf);
    let mut decided: Option<Sniff> = None;
    for k in 0..=buf.len().min(24) {
        let s = frontdoor::sniff(&buf[..k]);
        match decided {
            Some(d) => assert_eq!(s, d, "sniff changed its mind at {k} bytes"),
            None if s != Sniff::NeedMore => decided = Some(s),
            None => {}
        }
    }
    if let Some(d) = decided {
        assert_eq!(full, d);
    }
    if buf.len() >= frontdoor::PROXY_V2_SIG.len() {
        assert_ne!(full, Sniff::NeedMore, "still undecided after {} bytes", buf.len());
    }

    // PROXY header.
    match frontdoor::parse_proxy(buf) {
        Ok(Some(h)) => {
            assert!(h.len > 0 && h.len <= buf.len(), "PROXY header of {} bytes in a {}-byte buffer", h.len, buf.len());
            assert_eq!(frontdoor::parse_proxy(&buf[..h.len]), Ok(Some(h)), "the header alone parses differently");
            // The shard parses once `sniff` says Proxy. Known, reported
            // findings (fuzz/artifacts-found/README.md): `proxy-v1-split`, a
            // prefix refused; `proxy-v1-bare-lf`, a prefix taken for a whole
            // header of another length.
            for k in prefix_cuts(h.len).into_iter().filter(|&k| frontdoor::sniff(&buf[..k]) == Sniff::Proxy) {
                let prefix = &buf[..k];
                let r = frontdoor::parse_proxy(prefix);
                let split = r.is_err() && !prefix.starts_with(frontdoor::PROXY_V2_SIG);
                let bare_lf =
                    matches!(r, Ok(Some(_))) && prefix.contains(&b'\n') && !prefix.windows(2).any(|w| w == b"\r\n");
                if split && known("proxy-v1-split") || bare_lf && known("proxy-v1-bare-lf") {
                    continue;
                }
                assert_eq!(r, Ok(None), "a {k}-byte prefix of a good header is refused or taken for another");
            }
        }
        Ok(None) => {}
        Err(e) => {
            let _ = (e.kind(), e.to_string());
        }
    }

    // HTTP request head.
    if let Some((decision, len)) = frontdoor::parse_http(buf, &policy) {
        assert!(len <= buf.len(), "HTTP head of {len} bytes in a {}-byte buffer", buf.len());
        match &decision {
            HttpDecision::Upgrade { response, subprotocol } => {
                assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{response}");
                assert!(response.ends_with("\r\n\r\n"));
                let accept = response.split("Sec-WebSocket-Accept: ").nth(1).expect("accept key").split("\r\n").next();
                assert_eq!(accept.map(str::len), Some(28));
                if let Some(p) = subprotocol {
                    assert!(policy.subprotocols.contains(p));
                }
            }
            HttpDecision::Refuse(r) => check_refusal(*r),
        }
        let complete = !matches!(decision, HttpDecision::Refuse(HttpRefusal::Malformed | HttpRefusal::HeadTooLarge));
        if complete {
            assert_eq!(frontdoor::parse_http(&buf[..len], &policy), Some((decision.clone(), len)));
            // The shard parses once `sniff` says Http; a head may take up to
            // MAX_REQUEST_HEAD bytes before it is too large.
            for k in prefix_cuts(len)
                .into_iter()
                .filter(|&k| k < frontdoor::MAX_REQUEST_HEAD && frontdoor::sniff(&buf[..k]) == Sniff::Http)
            {
                assert_eq!(
                    frontdoor::parse_http(&buf[..k], &policy),
                    None,
                    "a {k}-byte prefix of a complete head decided"
                );
            }
        }
    }

    // WebSocket: chunked and at once.
    let max = [16, 256, 4096, 128 * 1024][(flags >> 2 & 3) as usize];
    let chunked = ws_feed(buf, max, Some(Chunks(flags as u32 >> 4)));
    let once = ws_feed(buf, max, None);
    assert_eq!(chunked, once, "WebSocket outcome depends on how the bytes arrived");
}

/// Prefix lengths to try below `len`: all of them for short heads, else a spread.
fn prefix_cuts(len: usize) -> Vec<usize> {
    if len <= 96 {
        (0..len).collect()
    } else {
        let mut v: Vec<usize> = (0..48).collect();
        v.extend((1..=48).map(|i| len - i));
        v.extend((0..32).map(|i| 48 + i * (len - 96) / 32));
        v
    }
}

fn check_refusal(r: HttpRefusal) {
    let response = r.response();
    assert!(response.starts_with(&format!("HTTP/1.1 {} ", r.status())));
    assert!(response.contains("Connection: close\r\n"));
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let len: usize =
        head.split("Content-Length: ").nth(1).and_then(|v| v.split("\r\n").next()).unwrap().parse().unwrap();
    assert_eq!(len, body.len(), "{r:?}: Content-Length");
    let _ = r.metric_kind();
}

/// Feeds `bytes` to a fresh `WsState`: the binary stream, and how it ended.
fn ws_feed(bytes: &[u8], max: usize, chunks: Option<Chunks>) -> (Vec<u8>, Result<(), WsEnd>) {
    let mut ws = WsState::new(max);
    let mut out = BytesMut::new();
    let mut fed = 0;
    let mut chunks = chunks;
    let mut end = Ok(());
    while fed < bytes.len() {
        let n = chunks.as_mut().map_or(bytes.len(), Chunks::next).min(bytes.len() - fed);
        let mut input = BytesMut::from(&bytes[fed..fed + n]);
        fed += n;
        let r = ws.on_bytes(&mut input, &mut out);
        match r {
            Ok(()) => assert!(input.is_empty(), "on_bytes left {} bytes unread", input.len()),
            Err(e) => {
                if let WsEnd::Violation(..) = e {
                    assert!(ws.closed, "a violation without a close frame");
                }
                end = Err(e);
                break;
            }
        }
    }
    // The stream the session frames, and a close that goes out once.
    let mut rest: &[u8] = &ws.stream;
    while let Ok(Some(h)) = cproto::check(rest, cproto::MAX_PAYLOAD) {
        rest = &rest[h.frame_len()..];
    }
    let (before, was_closed) = (out.len(), ws.closed);
    ws.close_for(&mut out, DisconnectReason::Shutdown);
    assert!(ws.closed);
    let after = out.len();
    if was_closed {
        assert_eq!(before, after, "a second close frame");
    }
    ws.close_for(&mut out, DisconnectReason::Kicked);
    assert_eq!(out.len(), after, "close frames go out once");
    (ws.stream.to_vec(), end)
}

// ---------------------------------------------------------------------------
// Names the system resolver would be asked about.

/// Whether `Endpoint::parse` would resolve `s` (or `s.trim()`) with the
/// system resolver: not an `ip:port` literal, but `host:port` with a host
/// and a port.
pub fn would_resolve(s: &str) -> bool {
    [s, s.trim()].iter().any(|c| {
        c.parse::<SocketAddr>().is_err()
            && c.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    })
}

fn json_would_resolve(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => would_resolve(s),
        Value::Array(a) => a.iter().any(json_would_resolve),
        Value::Object(o) => o.iter().any(|(k, v)| would_resolve(k) || json_would_resolve(v)),
        _ => false,
    }
}

fn toml_would_resolve(v: &toml::Value) -> bool {
    use toml::Value;
    match v {
        Value::String(s) => would_resolve(s),
        Value::Array(a) => a.iter().any(toml_would_resolve),
        Value::Table(t) => t.iter().any(|(k, v)| would_resolve(k) || toml_would_resolve(v)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// route_json

/// The route document parsers: the rules JSON (`parse_rules_json`), the
/// realm mapping (`parse_realm_mapping`), both together as read from Redis
/// (`validate_raw`) and the rule-file bundle (`parse_bundle`). Never panic;
/// an error is a non-empty list of reasons; accepted rules are sorted by a
/// unique key, realms by id within 0..=32767; the entry points agree with
/// each other; an accepted set builds a route table that finds every rule.
///
/// Input: the rules text, then optionally a NUL byte and realm pairs, one
/// `id=host:port` per line.
pub fn route_json(data: &[u8]) {
    let (text_bytes, realm_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text_bytes);
    let realm_text = String::from_utf8_lossy(realm_bytes);
    let pairs: Vec<(String, String)> = realm_text
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if json.as_ref().is_some_and(json_would_resolve) || pairs.iter().any(|(k, v)| would_resolve(k) || would_resolve(v))
    {
        return;
    }

    // Every entry point gets the same no-DNS resolver: names are refused
    // (Required) or deferred (Deferred), never looked up.
    for resolution in [Resolution::Required, Resolution::Deferred] {
        let rules = parse_redis(Some(&text), &[], &mut NoDns, resolution).map(|s| s.rules);
        match &rules {
            Ok(r) => check_rules(r),
            Err(e) => check_errors(e),
        }
        let realms = parse_redis(None, &pairs, &mut NoDns, resolution).map(|s| s.realms);
        match &realms {
            Ok(r) => check_realms(r),
            Err(e) => check_errors(e),
        }
        match validate_raw(Some(&text), &pairs, &mut NoDns, resolution) {
            Ok(set) => {
                assert_eq!(rules.as_ref().ok(), Some(&set.rules));
                assert_eq!(realms.as_ref().ok(), Some(&set.realms));
                check_set(&set);
            }
            Err(e) => {
                check_errors(&e);
                assert!(rules.is_err() || realms.is_err(), "validate_raw refused what its parts accept: {e:?}");
            }
        }

        let bundle = parse_bundle(&text, &mut NoDns, resolution);
        let is_bundle = matches!(&json, Some(serde_json::Value::Object(o)) if o.contains_key("rules") || o.contains_key("realm_mapping"));
        match &bundle {
            Ok(set) => {
                check_rules(&set.rules);
                check_realms(&set.realms);
                check_set(set);
                if !is_bundle {
                    assert_eq!(rules.as_ref().ok(), Some(&set.rules), "a plain rules document read two ways");
                    assert!(set.realms.is_empty());
                }
            }
            Err(e) => {
                check_errors(e);
                if !is_bundle {
                    assert!(rules.is_err(), "parse_bundle refused a rules document parse_redis accepts: {e:?}");
                }
            }
        }
        if let Ok(r) = &rules {
            check_set(&RouteSet { rules: r.clone(), realms: realms.clone().unwrap_or_default(), ..Default::default() });
        }
    }
}

/// A resolver for which no name resolves: the fuzzer never sends a DNS query.
struct NoDns;
impl crate::routing::Resolve for NoDns {
    fn resolve(&mut self, host: &str, _: u16) -> Result<SocketAddr, String> {
        Err(format!("{host}: not resolved while fuzzing"))
    }
}

fn check_errors(errs: &[String]) {
    assert!(!errs.is_empty(), "an error without a reason");
    assert!(errs.iter().all(|e| !e.is_empty()));
}

fn check_rules(rules: &[RouteRule]) {
    for w in rules.windows(2) {
        assert!(w[0].key() < w[1].key(), "rules not sorted by a unique key: {:?} then {:?}", w[0].key(), w[1].key());
    }
    for r in rules {
        assert_eq!(r.key(), (r.server_type, r.world_id));
        assert!(r.world_id <= 32767, "world {}", r.world_id);
        assert!(r.endpoints.iter().all(|e| e.addr.port() != 0));
    }
}

fn check_realms(realms: &[(u16, Endpoint)]) {
    for w in realms.windows(2) {
        assert!(w[0].0 <= w[1].0, "realms not sorted");
    }
    for (id, e) in realms {
        assert!(*id <= 32767);
        assert_ne!(e.addr.port(), 0);
    }
}

/// A route set builds a table that finds each of its rules and endpoints.
fn check_set(set: &RouteSet) {
    let fp = fingerprint(set);
    assert_eq!(fp, fingerprint(&set.clone()));
    let merged = merge(&[], Some(set));
    assert_eq!(merged.rules, set.rules);
    assert_eq!(fingerprint(&merged), fp, "merging into nothing changed the set");
    assert_eq!(merge(&set.rules, None).rules, set.rules);
    let table = RouteTable::new(1, set.rules.clone(), set.realms.clone());
    assert_eq!(table.rules().count(), set.rules.len());
    for r in &set.rules {
        let found = table.lookup(r.server_type, r.world_id).expect("rule not found");
        assert_eq!(**found, *r);
        for e in &r.endpoints {
            assert!(table.routes_to(r.server_type, r.world_id, &e.addr, r.backend_protocol));
            assert!(table.lists(&e.addr));
        }
    }
    // A realm id listed twice ("7" and "07") keeps one endpoint in the table.
    let ids: AHashSet<u16> = set.realms.iter().map(|(id, _)| *id).collect();
    assert_eq!(table.realms().count(), ids.len());
}

// ---------------------------------------------------------------------------
// config

/// `Config::from_str` on arbitrary UTF-8: never panics; errors are located
/// on a line of the text; an accepted config is consistent (workers, cores,
/// unique rule keys), summarises, and builds a route table; the environment
/// overrides change the outcome only where they should.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(v) = text.parse::<toml::Table>() {
        if toml_would_resolve(&toml::Value::Table(v)) {
            return;
        }
    }
    let lines = text.matches('\n').count() + 1;
    let r = Config::from_str(text, "fuzz.toml");
    match &r {
        Ok(c) => {
            assert!(c.server.workers >= 1);
            assert!(
                c.server.cpus.len() >= c.server.workers,
                "{} cpus for {} workers",
                c.server.cpus.len(),
                c.server.workers
            );
            check_unique_keys(&c.routes);
            assert!(c.limits.max_message_size <= cproto::MAX_PAYLOAD);
            let _ = c.summary();
            let table = RouteTable::new(1, c.routes.clone(), vec![]);
            for rule in &c.routes {
                assert!(table.lookup(rule.server_type, rule.world_id).is_some());
            }
        }
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an error without a reason");
            for e in &errs.0 {
                assert!(e.line >= 1 && e.line <= lines, "error on line {} of a {lines}-line text: {e}", e.line);
                assert_eq!(e.file, "fuzz.toml");
            }
            let _ = errs.to_string();
        }
    }
    // Valid environment overrides keep a valid config valid, and apply.
    if let Ok(plain) = &r {
        let env = Environment { log_level: Some("debug".into()), pod_name: Some("gw-3".into()), ..Default::default() };
        match Config::from_str_env(text, "fuzz.toml", &env) {
            Ok(c) => {
                assert_eq!(c.log.level, "debug");
                let node = if plain.server.node_id == 0 { 3 } else { plain.server.node_id };
                assert_eq!(c.server.node_id, node);
            }
            Err(e) => panic!("valid environment overrides made a valid config invalid: {e}"),
        }
    }
}

fn check_unique_keys(rules: &[RouteRule]) {
    let mut seen = AHashSet::new();
    for r in rules {
        assert!(seen.insert(r.key()), "duplicate rule key {:?}", r.key());
    }
}

// ---------------------------------------------------------------------------
// shard

/// The shard as a worker drives it, with the fuzz input as the sequence of
/// events: see [`ShardDriver`].
pub fn shard(data: &[u8]) {
    ShardDriver::new().run(data);
}

const EP_A: &str = "127.0.0.1:7001";
const EP_B: &str = "127.0.0.1:7002";
const EP_SEED: &str = "127.0.0.1:7003";
const EP_GRPC: &str = "127.0.0.1:7004";
const EP_GRPC2: &str = "127.0.0.1:7005";
const EP_SEED2: &str = "127.0.0.1:7006";

fn rule(st: u8, world: u16, eps: &[&str], extra: &str) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    let strategy = if extra.contains("strategy") { "" } else { "strategy = \"round_robin\"\n" };
    format!(
        "[[routes]]\nserver_type = {st}\nworld_id = {world}\nservice_name = \"s{st}\"\n{strategy}endpoints = [{}]\n{extra}\n",
        eps.join(", ")
    )
}

/// The route set the shard starts with (and table 0 and 4 of a route change).
fn routes_main() -> String {
    [
        rule(10, 0, &[EP_A, EP_B], ""),
        rule(10, 7, &[EP_B], ""),
        rule(11, 0, &[EP_A], "on_backend_loss = \"rebind\"\ntrace_propagation = true"),
        rule(12, 0, &[EP_SEED], "backend_protocol = \"seed_tcp\""),
        rule(13, 0, &[EP_GRPC], "backend_protocol = \"grpc\""),
        rule(
            14,
            0,
            &[EP_GRPC, EP_GRPC2],
            "strategy = \"consistent_hash\"\nhash_key = \"inst_id\"\nbackend_protocol = \"grpc\"\non_backend_loss = \"rebind\"",
        ),
        rule(15, 0, &[EP_B], "strategy = \"consistent_hash\"\nhash_key = \"client_ip\"\nnotify_sessions = false"),
        rule(16, 0, &[EP_SEED], "backend_protocol = \"seed_tcp\"\nbinding = \"connection\""),
        rule(17, 0, &[], "strategy = \"realm_based\""),
        rule(18, 0, &[], ""),
    ]
    .concat()
}

fn routes_moved() -> String {
    [
        rule(10, 0, &[EP_B], ""),
        rule(12, 0, &[EP_SEED], "backend_protocol = \"seed_tcp\""),
        rule(13, 0, &[EP_GRPC2], "backend_protocol = \"grpc\""),
        rule(14, 0, &[EP_GRPC2], "backend_protocol = \"grpc\"\non_backend_loss = \"rebind\""),
        rule(15, 0, &[EP_A], "notify_sessions = false"),
        rule(17, 0, &[], "strategy = \"realm_based\""),
    ]
    .concat()
}

fn routes_narrow() -> String {
    [
        rule(10, 0, &[EP_A], ""),
        rule(11, 0, &[EP_A], "on_backend_loss = \"rebind\""),
        rule(12, 0, &[EP_SEED2], "backend_protocol = \"seed_tcp\""),
        rule(13, 0, &[EP_GRPC], "backend_protocol = \"grpc\"\non_backend_loss = \"rebind\""),
        rule(16, 0, &[EP_SEED2], "backend_protocol = \"seed_tcp\"\nbinding = \"connection\""),
    ]
    .concat()
}

const SERVER: &str = "[server]\nworkers = 1\nproxy_protocol = true\nproxy_trusted = [\"10.0.0.0/8\", \"::1/128\"]\n";
const LIMITS: &str = "[limits]\nmax_connections = 48\nmax_connections_per_ip = 12\nconnection_rate_per_ip = 40\nmax_message_size = 4096\nmessages_per_second = 200\nmessages_burst = 50\nhandshake_timeout = \"5s\"\nidle_timeout = \"30s\"\nmax_queued_bytes_per_session = 65544\n";
const BACKEND: &str = "[backend]\nconnections_per_endpoint = 1\ndial_timeout = \"2s\"\ncircuit_failure_threshold = 3\ncircuit_open_duration = \"5s\"\nkeepalive_interval = \"10s\"\nkeepalive_timeout = \"5s\"\nmax_frame_size = 65544\nreconnect_backoff_min = \"100ms\"\nreconnect_backoff_max = \"5s\"\nmax_queued_bytes = 65536\nseed_pool_max = 3\nseed_idle_timeout = \"60s\"\n";
const WEBSOCKET: &str = "[websocket]\nenabled = true\nmax_message_size = 4096\nsubprotocols = [\"game.v1\"]\n";

/// The smallest `max_queued_bytes` of the configs below.
const MIN_BACKEND_QUEUE: usize = 65536;

type Realms = Vec<(u16, Endpoint)>;

/// The configs and route tables the driver switches between, parsed once.
struct Fixture {
    configs: Vec<Arc<Config>>,
    tables: Vec<(Vec<RouteRule>, Realms)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let parse = |text: String| Arc::new(Config::from_str(&text, "fuzz-shard.toml").unwrap_or_else(|e| panic!("{e}")));
        let base = parse(format!("{SERVER}{LIMITS}{BACKEND}[log]\naccess_log = true\n{WEBSOCKET}{}", routes_main()));
        let strict = parse(format!(
            "{SERVER}{}{}[log]\naccess_log = false\n[websocket]\nenabled = false\n",
            LIMITS.replace("messages_per_second = 200\nmessages_burst = 50", "messages_per_second = 5\nmessages_burst = 5\non_rate_limit = \"close\"")
                .replace("max_queued_bytes_per_session = 65544", "max_queued_bytes_per_session = 70000"),
            BACKEND
                .replace("circuit_failure_threshold = 3", "circuit_failure_threshold = 1")
                .replace("keepalive_interval = \"10s\"\nkeepalive_timeout = \"5s\"", "keepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"")
                .replace("max_queued_bytes = 65536", "max_queued_bytes = 100000")
                .replace("reconnect_backoff_min = \"100ms\"", "reconnect_backoff_min = \"1s\""),
        ));
        let small = parse(format!(
            "{}{}{}[log]\naccess_log = true\n[websocket]\nenabled = true\nmax_message_size = 64\nallowed_origins = [\"https://ok.example\"]\n",
            SERVER.replace("proxy_protocol = true", "proxy_protocol = false"),
            LIMITS
                .replace("max_message_size = 4096", "max_message_size = 64")
                .replace("handshake_timeout = \"5s\"\nidle_timeout = \"30s\"", "handshake_timeout = \"1s\"\nidle_timeout = \"2s\""),
            BACKEND.replace("keepalive_interval = \"10s\"", "keepalive_interval = \"0s\""),
        ));
        let table = |routes: String| parse(format!("[server]\nworkers = 1\n{routes}")).routes.clone();
        let realm = |id: u16, ep: &str| (id, Endpoint::parse(ep).unwrap());
        let tables = vec![
            (base.routes.clone(), vec![realm(1, EP_A), realm(7, EP_GRPC2)]),
            (table(routes_moved()), vec![realm(1, EP_B)]),
            (table(routes_narrow()), vec![]),
            (vec![], vec![]),
            (base.routes.clone(), vec![realm(1, EP_A), realm(3, EP_SEED)]),
        ];
        Fixture { configs: vec![base, strict, small], tables }
    })
}

/// The driver's view of one client connection.
struct Client {
    key: SessionKey,
    /// The reader's buffer: a partial frame stays in it between reads.
    rbuf: BytesMut,
    /// `client_closed` was reported.
    closed: bool,
    /// The upgrade was answered 101: replies come in WebSocket frames.
    ws: bool,
    /// The writer does not take the queue (a client that does not read).
    hung: bool,
    /// The writer failed: it takes nothing any more.
    writer_dead: bool,
    /// The writer's last take, handed back with the next one.
    last: Option<ClientOut>,
    /// While hung: something that may queue bytes for this client happened.
    may_have_bytes: bool,
    /// Closed, and its queue was found gone.
    gone_checked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Dialing,
    Up,
    /// The shard closed this generation, or its reader was told to stop.
    Over,
}

/// The driver's view of one backend stream (a connection's generation).
struct Stream {
    conn: ConnId,
    generation: u64,
    protocol: BackendProtocol,
    state: StreamState,
    /// The reader's buffer.
    rbuf: BytesMut,
    /// The writer takes a queue but never finishes writing it.
    hung: bool,
    /// The write in flight (a `BackendOut::Write`), handed back when it completes.
    inflight: Option<BackendOut>,
    writer_dead: bool,
    /// The driver's tasks for it ended on their own (dial failed, read
    /// failed): it dials, reads and connects no more.
    driver_done: bool,
    /// Sessions this stream's backend may address: those it saw in a
    /// `CONNECT` / `TRANS` / gRPC packet and no `DISCONNECT` since.
    bound: AHashSet<i64>,
    /// Sessions a route change released from this stream (`DISCONNECT`
    /// reason 8), and when the writer passed that on: the backend's replies
    /// to them still reach them for `RELEASED_REPLY_GRACE` (counted from the
    /// release, which is no later than this).
    released: AHashMap<i64, Instant>,
    /// Bytes taken in the last writer pass (a full queue refuses frames).
    last_take: usize,
}

/// What an event was, for the checks after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Client bytes for this client (index); the session may have been closed with it.
    ClientData(usize),
    ClientClosed(usize),
    /// Backend bytes on this stream (index).
    BackendData(usize),
    Other,
}

/// Drives a [`Shard`] the way the worker does, from a fuzz input, and checks
/// its invariants after every event.
///
/// The shard starts from a fixed config with gate, seed_tcp and grpc routes
/// (several endpoints, world and realm rules, `rebind` and `close` loss
/// policies, notify on and off, trace propagation, connection binding). The
/// input is a sequence of events: accept; client bytes (well-formed frames
/// for routed and unrouted server types, raw bytes, HTTP upgrades and
/// refusals, PROXY headers, WebSocket control frames); client end of stream
/// and write failure; dials that connect or fail; backend bytes crafted per
/// protocol (`TRANS` / `KICK` / `MULTICAST` / `BROADCAST` / `PING` naming live,
/// closed and never-issued session ids; gRPC packets with target lists and
/// lifecycle types; seed frames; corrupt lengths), delivered whole or split;
/// backend loss and write failure; writers that stall; ticks with time
/// moving on; route changes between five tables; config reloads between
/// three configs; drain, `close_all` and the final `close_backends`.
///
/// The driver plays the worker: it carries out every action, dials only
/// what the shard asked for, calls `client_closed` after `client_data`
/// fails, takes client queues after every event (unless that client
/// stalls), and takes backend queues whole (unless that writer stalls; a
/// stalled writer catches up before its backend sends, since a backend
/// answers only what it has received).
///
/// Invariants, after every event:
/// - nothing panics;
/// - isolation, checked from the outside: the driver decodes every byte the
///   gateway writes to each backend stream and keeps, per stream, the
///   sessions that stream's backend was told about (`CONNECT`, `TRANS`, a
///   gRPC packet) and not told to forget (`DISCONNECT`); a client may get
///   bytes during a backend read only if its session is in that stream's
///   set (or, for a frame the shard refused to queue on a full stream, may
///   be bound to it without the backend knowing), and from no other event
///   than its own reads; a session's bytes after it closed are never taken;
/// - the bytes a client gets from backends are whole client frames (or
///   WebSocket binary frames each holding one);
/// - the gateway writes well-formed frames to every backend;
/// - `session_count()` (and `sessions_active`) = accepts - closes, and
///   `SessionsGone` comes exactly when the last one leaves; a session's
///   `Closed` action comes once, from its `client_closed`, with no bytes
///   left but a WebSocket close frame;
/// - every `frames_dropped_total{reason}` only grows (checked on a stats copy
///   after every client read, every 8th event and at the end: a copy is dear);
/// - actions name only sessions and streams that exist; dial generations
///   only increase; access-log hand-overs hold one JSON line per record.
///
/// Deterministic: fixed seed, explicit `now` (time moves only by `tick`
/// events). Session ids come from the wall clock (`SessionIdGen::next_id`);
/// the driver never depends on their values, only on which session is
/// which. Delivery order across sessions may follow hash order, which no
/// check depends on.
pub struct ShardDriver {
    sh: Shard,
    now: Instant,
    clients: Vec<Client>,
    streams: Vec<Stream>,
    /// Live sessions (accepted, not closed).
    live: usize,
    route_version: u64,
    last_generation: u64,
    draining: bool,
    finished: bool,
    dropped: AHashMap<&'static str, u64>,
    accepts: u32,
    actions: Vec<Action>,
    /// Sessions whose close the driver reported during this event.
    closes: usize,
    /// `Closed` and `SessionsGone` actions seen during this event.
    closed_seen: usize,
    gone_seen: bool,
    /// Client takes with backend bytes in them (the seeds' test checks that
    /// deliveries happen at all).
    deliveries: u64,
    /// Events run.
    events: u64,
}

const EVENTS_MAX: usize = 800;

/// `FUZZ_TRACE=1`: the shard driver prints each event and action (to read
/// what a seed or a crash input does).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

impl Default for ShardDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardDriver {
    pub fn new() -> ShardDriver {
        let f = fixture();
        let cfg = f.configs[0].clone();
        let (rules, realms) = f.tables[0].clone();
        let routes = Arc::new(RouteTable::new(1, rules, realms));
        let sh = Shard::new(ShardSetup { index: 0, cfg, routes, admission: Default::default(), seed: 0x5eed_f00d });
        ShardDriver {
            sh,
            now: Instant::now(),
            clients: Vec::new(),
            streams: Vec::new(),
            live: 0,
            route_version: 1,
            last_generation: 0,
            draining: false,
            finished: false,
            dropped: AHashMap::new(),
            accepts: 0,
            actions: Vec::new(),
            closes: 0,
            closed_seen: 0,
            gone_seen: false,
            deliveries: 0,
            events: 0,
        }
    }

    /// Runs the events of `data`, checking after each.
    pub fn run(&mut self, data: &[u8]) {
        let mut inp = Input::new(data);
        let mut n = 0;
        while !inp.done() && !self.finished && n < EVENTS_MAX {
            n += 1;
            if trace() {
                let kind = inp.data[inp.pos] % 32;
                eprintln!(
                    "event {n} at byte {}: kind {kind} (sessions {}, streams {})",
                    inp.pos,
                    self.live,
                    self.streams.len()
                );
            }
            self.event(&mut inp);
        }
        self.check_counters();
    }

    fn event(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 32 {
            0..=2 => self.accept(inp),
            3..=7 => self.client_frames(inp),
            8 => {
                let bytes = inp.chunk(64).to_vec();
                self.client_bytes(inp, bytes)
            }
            9 => {
                let bytes = http_request(inp);
                self.client_bytes(inp, bytes)
            }
            10 => {
                let bytes = proxy_header(inp);
                self.client_bytes(inp, bytes)
            }
            11 => {
                let bytes = ws_control(inp);
                self.client_bytes(inp, bytes)
            }
            12 | 13 => self.client_eof(inp),
            14 | 15 => self.backend_connect(inp),
            16 => self.dial_failed(inp),
            17..=21 => self.backend_frames(inp, false),
            22 => self.backend_frames(inp, true),
            23 => self.backend_lost(inp),
            24 | 25 => self.tick(inp),
            26 => {
                let k = inp.u8() as usize % fixture().tables.len();
                let (rules, realms) = fixture().tables[k].clone();
                self.route_version += 1;
                self.sh.apply_routes(Arc::new(RouteTable::new(self.route_version, rules, realms)), self.now);
                self.after(Event::Other);
            }
            27 => {
                let k = inp.u8() as usize % fixture().configs.len();
                self.sh.apply_config(fixture().configs[k].clone());
                self.after(Event::Other);
            }
            28 => self.drain(inp),
            29 => self.toggle_hung(inp),
            30 => self.write_failed(inp),
            _ => {
                // The end of a drain: only once draining, as the worker does.
                if self.draining && inp.bool() {
                    self.sh.close_backends();
                    self.after(Event::Other);
                    for s in &self.streams {
                        assert_eq!(
                            s.state,
                            StreamState::Over,
                            "close_backends left stream {:?}/{} open",
                            s.conn,
                            s.generation
                        );
                    }
                    self.finished = true;
                } else {
                    self.sh.tick(self.now, true, true);
                    self.after(Event::Other);
                }
            }
        }
    }

    // --- client events -----------------------------------------------------

    fn accept(&mut self, inp: &mut Input<'_>) {
        let ip: IpAddr = match inp.u8() % 6 {
            0 | 1 => [10, 0, 0, 1].into(),
            2 => [10, 0, 0, 2].into(),
            3 => [192, 0, 2, 1].into(),
            4 => Ipv6Addr::LOCALHOST.into(),
            _ => [203, 0, 113, 7].into(),
        };
        self.accepts += 1;
        let peer = SocketAddr::new(ip, 1000 + (self.accepts % 60000) as u16);
        match self.sh.accept(peer, self.now) {
            Ok(key) => {
                assert!(!self.draining, "accepted while draining");
                assert!(self.clients.iter().all(|c| c.key.id != key.id), "session id {} issued twice", key.id);
                assert!(
                    self.clients.iter().all(|c| c.closed || c.key.slot != key.slot),
                    "slot {} of a live session reused",
                    key.slot
                );
                self.clients.push(Client {
                    key,
                    rbuf: BytesMut::new(),
                    closed: false,
                    ws: false,
                    hung: false,
                    writer_dead: false,
                    last: None,
                    may_have_bytes: false,
                    gone_checked: false,
                });
                self.live += 1;
            }
            Err(r) => {
                let _ = r.as_str();
                if self.draining {
                    assert_eq!(r, crate::shard::AcceptRefusal::Draining);
                }
            }
        }
        self.after(Event::Other);
    }

    /// A client, mostly a live one.
    fn pick_client(&self, inp: &mut Input<'_>) -> Option<usize> {
        let b = inp.u8();
        let live: Vec<usize> = (0..self.clients.len()).filter(|&i| !self.clients[i].closed).collect();
        if b >= 248 || live.is_empty() {
            (!self.clients.is_empty()).then(|| b as usize % self.clients.len())
        } else {
            Some(live[b as usize % live.len()])
        }
    }

    fn client_frames(&mut self, inp: &mut Input<'_>) {
        let Some(i) = self.pick_client(inp) else { return self.accept(inp) };
        let mut frames = BytesMut::new();
        for _ in 0..1 + inp.u8() % 4 {
            const TYPES: [u8; 12] = [10, 11, 12, 13, 14, 15, 16, 17, 18, 99, 10, 13];
            let st = TYPES[inp.u8() as usize % TYPES.len()];
            let world = [0, 1, 7, 3][inp.u8() as usize % 4];
            let sid = ServerId::new(inp.u8() >= 250, world, st, inp.u8());
            let msg_id = inp.u16();
            let b = inp.u8();
            let len = if b < 200 { (b % 40) as usize } else { (b as usize - 200) * 64 };
            assert!(cproto::encode(&mut frames, msg_id, sid, &vec![b; len]));
        }
        let bytes = if self.clients[i].ws {
            // One or two binary messages (a frame may span messages).
            let cut = inp.u8() as usize % (frames.len() + 1);
            let mut v = ws_frame(0x2, &frames[..cut], true, true);
            v.extend(ws_frame(0x2, &frames[cut..], true, true));
            v
        } else {
            frames.to_vec()
        };
        self.client_bytes_to(inp, i, bytes);
    }

    fn client_bytes(&mut self, inp: &mut Input<'_>, bytes: Vec<u8>) {
        let Some(i) = self.pick_client(inp) else { return };
        self.client_bytes_to(inp, i, bytes);
    }

    /// The client's bytes arrive in one or two reads; a failed read ends the
    /// session as the reader does.
    fn client_bytes_to(&mut self, inp: &mut Input<'_>, i: usize, bytes: Vec<u8>) {
        let cut = if inp.bool() { inp.u8() as usize % (bytes.len() + 1) } else { bytes.len() };
        let key = self.clients[i].key;
        let was_closed = self.clients[i].closed;
        let parts: Vec<&[u8]> =
            if cut == 0 || cut == bytes.len() { vec![&bytes[..]] } else { vec![&bytes[..cut], &bytes[cut..]] };
        for part in parts {
            let c = &mut self.clients[i];
            c.rbuf.extend_from_slice(part);
            let r = self.sh.client_data(key, &mut c.rbuf, part.len(), self.now);
            if was_closed {
                assert_eq!(r, Err(DisconnectReason::ClientClosed), "a closed session took bytes");
            }
            if r.is_err() {
                if !was_closed {
                    self.sh.client_closed(key, self.now);
                    self.closing(i);
                }
                break;
            }
        }
        self.after(Event::ClientData(i));
    }

    /// The driver's side of a close it reported.
    fn closing(&mut self, i: usize) {
        let c = &mut self.clients[i];
        assert!(!c.closed);
        c.closed = true;
        self.live -= 1;
        self.closes += 1;
        let id = c.key.id;
        for s in &mut self.streams {
            s.bound.remove(&id);
        }
    }

    fn client_eof(&mut self, inp: &mut Input<'_>) {
        let Some(i) = self.pick_client(inp) else { return };
        let key = self.clients[i].key;
        self.sh.client_closed(key, self.now);
        if !self.clients[i].closed {
            self.closing(i);
        }
        self.after(Event::ClientClosed(i));
    }

    // --- backend events ----------------------------------------------------

    /// A stream in one of `states`, mostly; sometimes any stream.
    fn pick_stream(&self, inp: &mut Input<'_>, states: &[StreamState]) -> Option<usize> {
        let b = inp.u8();
        let fit: Vec<usize> = (0..self.streams.len()).filter(|&i| states.contains(&self.streams[i].state)).collect();
        if b >= 248 || fit.is_empty() {
            (!self.streams.is_empty() && b >= 248).then(|| b as usize % self.streams.len())
        } else {
            Some(fit[b as usize % fit.len()])
        }
    }

    fn connect_stream(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if s.state != StreamState::Dialing || s.driver_done {
            return;
        }
        if self.sh.backend_connected(s.conn, s.generation, Duration::from_millis(1), self.now) {
            s.state = StreamState::Up;
        } else {
            // Retired or replaced while dialing: the driver drops the socket.
            s.state = StreamState::Over;
        }
    }

    fn backend_connect(&mut self, inp: &mut Input<'_>) {
        if let Some(i) = self.pick_stream(inp, &[StreamState::Dialing]) {
            self.connect_stream(i);
        }
        self.after(Event::Other);
    }

    fn dial_failed(&mut self, inp: &mut Input<'_>) {
        let Some(i) = self.pick_stream(inp, &[StreamState::Dialing]) else { return };
        let kind = if inp.bool() { LossKind::DialFailed } else { LossKind::DialTimeout };
        let s = &mut self.streams[i];
        if s.state == StreamState::Dialing && !s.driver_done {
            s.driver_done = true;
            self.sh.backend_lost(s.conn, s.generation, kind, &"fuzz: dial failed", self.now);
        }
        self.after(Event::Other);
    }

    fn backend_lost(&mut self, inp: &mut Input<'_>) {
        let Some(i) = self.pick_stream(inp, &[StreamState::Up]) else { return };
        let kind = if inp.bool() { LossKind::ClosedByBackend } else { LossKind::ReadFailed };
        let s = &mut self.streams[i];
        if s.state == StreamState::Up && !s.driver_done {
            // The reader that reports it exits; the writer goes on until the
            // shard ends the generation.
            s.driver_done = true;
            self.sh.backend_lost(s.conn, s.generation, kind, &"fuzz: lost", self.now);
        }
        self.after(Event::Other);
    }

    fn backend_frames(&mut self, inp: &mut Input<'_>, raw: bool) {
        let Some(i) = self.pick_stream(inp, &[StreamState::Up, StreamState::Dialing]) else { return };
        // A dial the backend answers first.
        self.connect_stream(i);
        let bytes = if raw {
            inp.chunk(256).to_vec()
        } else {
            let ids = self.ids();
            match self.streams[i].protocol {
                BackendProtocol::Gate => gate_frames(inp, &ids),
                BackendProtocol::SeedTcp => seed_frames(inp, &ids),
                BackendProtocol::Grpc => grpc_frames(inp, &ids),
            }
        };
        let cut = if inp.bool() { inp.u8() as usize % (bytes.len() + 1) } else { bytes.len() };
        let s = &self.streams[i];
        let closed = s.state == StreamState::Over;
        if !closed && (s.state != StreamState::Up || s.driver_done) {
            // No reader: nothing arrives.
            return self.after(Event::Other);
        }
        // The backend answers what it has received: its writer catches up.
        self.write_pass(i, true);
        // Bound sessions, and those released by a route change within the
        // reply grace (their replies are still delivered).
        let now = self.now;
        let mut snapshot = self.streams[i].bound.clone();
        self.streams[i]
            .released
            .retain(|_, at| now.saturating_duration_since(*at) < crate::shard::RELEASED_REPLY_GRACE);
        snapshot.extend(self.streams[i].released.keys().copied());
        let (conn, generation) = (self.streams[i].conn, self.streams[i].generation);
        let parts: Vec<&[u8]> =
            if cut == 0 || cut == bytes.len() { vec![&bytes[..]] } else { vec![&bytes[..cut], &bytes[cut..]] };
        'parts: for part in parts {
            self.streams[i].rbuf.extend_from_slice(part);
            let mut read = part.len();
            for _ in 0..64 {
                let s = &mut self.streams[i];
                let r = self.sh.backend_data(conn, generation, &mut s.rbuf, read, self.now);
                read = 0;
                if closed {
                    assert_eq!(r, BackendRead::Stop, "backend_data on a closed stream went on");
                }
                match r {
                    BackendRead::Continue => break,
                    BackendRead::Yield => {}
                    BackendRead::Stop => {
                        s.state = StreamState::Over;
                        break 'parts;
                    }
                }
            }
        }
        self.after_backend(i, snapshot);
    }

    fn backend_write_failed_at(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if let Some(BackendOut::Write(w)) = s.inflight.take() {
            s.writer_dead = true;
            self.sh.backend_write_failed(s.conn, s.generation, w.frames, &"fuzz: write failed", self.now);
        }
    }

    /// Session ids a backend may name: issued ones (live or closed), then
    /// ids nobody has.
    fn ids(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.clients.iter().map(|c| c.key.id).collect();
        let top = v.iter().copied().max().unwrap_or(0);
        v.extend([0, -1, 1, i64::MAX, i64::MIN, top.wrapping_add(1), top.wrapping_add(2), 0x7777]);
        v
    }

    // --- other events ------------------------------------------------------

    fn tick(&mut self, inp: &mut Input<'_>) {
        const STEPS: [u64; 10] = [0, 10, 100, 500, 1000, 1000, 2500, 6000, 31_000, 300_000];
        self.now += Duration::from_millis(STEPS[inp.u8() as usize % STEPS.len()]);
        let b = inp.u8();
        self.sh.tick(self.now, b & 1 == 0, b & 2 == 0);
        self.after(Event::Other);
    }

    fn drain(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 3 {
            0 | 1 => {
                self.sh.begin_drain(self.now, self.now + Duration::from_secs(30));
                // Draining sends every session a drain notice (docs/GAME_AWARE.md).
                for c in &mut self.clients {
                    c.may_have_bytes = true;
                }
                self.draining = true;
            }
            _ => {
                const REASONS: [DisconnectReason; 3] =
                    [DisconnectReason::Shutdown, DisconnectReason::Kicked, DisconnectReason::RouteChanged];
                let n = self.sh.close_all(REASONS[inp.u8() as usize % 3]);
                assert_eq!(n, self.live, "close_all saw {n} sessions, {} are live", self.live);
            }
        }
        self.after(Event::Other);
    }

    fn toggle_hung(&mut self, inp: &mut Input<'_>) {
        if inp.bool() {
            if let Some(i) = self.pick_client(inp) {
                let c = &mut self.clients[i];
                c.hung = !c.hung;
            }
        } else if let Some(i) = self.pick_stream(inp, &[StreamState::Up]) {
            let s = &mut self.streams[i];
            s.hung = !s.hung;
        }
        self.after(Event::Other);
    }

    fn write_failed(&mut self, inp: &mut Input<'_>) {
        if inp.bool() {
            if let Some(i) = self.pick_client(inp) {
                let key = self.clients[i].key;
                self.sh.client_write_failed(key, &"fuzz: client write failed");
                self.clients[i].writer_dead = true;
            }
        } else if let Some(i) = self.pick_stream(inp, &[StreamState::Up]) {
            // Only a write in flight can fail: stall the writer to get one.
            if self.streams[i].inflight.is_none() {
                self.streams[i].hung = true;
                self.write_pass(i, false);
            }
            self.backend_write_failed_at(i);
        }
        self.after(Event::Other);
    }

    // --- after every event -------------------------------------------------

    fn after_backend(&mut self, i: usize, snapshot: AHashSet<i64>) {
        self.check_clients(Event::BackendData(i), Some(&snapshot));
        self.finish(Event::BackendData(i));
    }

    fn after(&mut self, ev: Event) {
        self.check_clients(ev, None);
        self.finish(ev);
    }

    /// Takes what each client's writer would, and checks who got bytes.
    fn check_clients(&mut self, ev: Event, bound: Option<&AHashSet<i64>>) {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            let own = ev == Event::ClientData(i);
            // A route change, a reload or a drain may write to any session
            // (a route-loss SERVER_DISCONNECT, a drain notice).
            let legit = own || ev == Event::Other || bound.is_some_and(|b| b.contains(&c.key.id));
            if c.closed {
                if !c.gone_checked {
                    let mut buf = BytesMut::new();
                    assert!(
                        matches!(self.sh.take_client_out(c.key, &mut buf, None), ClientOut::Gone),
                        "a closed session still has a queue"
                    );
                    c.gone_checked = true;
                }
                continue;
            }
            if c.hung || c.writer_dead {
                c.may_have_bytes |= legit;
                continue;
            }
            let mut buf = BytesMut::new();
            let done = match c.last.take() {
                Some(ClientOut::Write(w)) => Some((w, self.now)),
                _ => None,
            };
            let out = self.sh.take_client_out(c.key, &mut buf, done);
            let got = matches!(out, ClientOut::Write(_));
            assert_eq!(got, !buf.is_empty(), "a take with nothing in it, or bytes without a take");
            let held = std::mem::take(&mut c.may_have_bytes);
            if got {
                assert!(
                    legit || held,
                    "session {} got {} bytes during {ev:?}, from no stream it is bound to (bound: {:?})",
                    c.key.id,
                    buf.len(),
                    bound
                );
                // The 101 is the first thing a session ever gets.
                if !c.ws && buf.starts_with(b"HTTP/1.1 101 ") {
                    c.ws = true;
                }
                if let (Event::BackendData(_), false) = (ev, held) {
                    check_client_bytes(&buf, c.ws);
                    self.deliveries += 1;
                }
            }
            c.last = Some(out);
        }
    }

    fn finish(&mut self, ev: Event) {
        // Actions, and the writers' takes (which may end a retirement), until
        // nothing is left to do.
        let queue_full_before = self.dropped.get("backend_queue_full").copied().unwrap_or(0)
            + self.dropped.get("backend_unavailable").copied().unwrap_or(0);
        loop {
            self.sh.drain_actions(&mut self.actions);
            let actions = std::mem::take(&mut self.actions);
            for a in actions {
                self.action(a, ev);
            }
            for i in 0..self.streams.len() {
                self.write_pass(i, false);
            }
            if !self.sh.has_actions() {
                break;
            }
        }
        assert_eq!(self.closed_seen, self.closes, "{} Closed actions for {} closes", self.closed_seen, self.closes);
        assert_eq!(self.gone_seen, self.closes > 0 && self.live == 0, "SessionsGone and the session count disagree");
        (self.closes, self.closed_seen, self.gone_seen) = (0, 0, false);

        // Counters (a full stats copy is dear: after client reads, which the
        // check below needs, and every 8th event).
        assert_eq!(self.sh.session_count(), self.live, "session count is not accepts - closes");
        self.events += 1;
        if !matches!(ev, Event::ClientData(_)) && !self.events.is_multiple_of(8) {
            return;
        }
        self.check_counters();

        // A frame refused on a full (or unwritable) queue leaves its session
        // bound without the backend hearing of it: the backend may still
        // address it. Any stream whose queue may be full counts. (The
        // counters seen before may be some events old: more streams count.)
        if let Event::ClientData(i) = ev {
            let queue_full_after = self.dropped.get("backend_queue_full").copied().unwrap_or(0)
                + self.dropped.get("backend_unavailable").copied().unwrap_or(0);
            if queue_full_after > queue_full_before && !self.clients[i].closed {
                let id = self.clients[i].key.id;
                for s in &mut self.streams {
                    let may_be_full = s.state == StreamState::Dialing
                        || s.hung
                        || s.writer_dead
                        || s.inflight.is_some()
                        || s.last_take > MIN_BACKEND_QUEUE;
                    if s.state != StreamState::Over && may_be_full {
                        s.bound.insert(id);
                    }
                }
            }
        }
    }

    /// Sessions active and drop counters, from a copy of the shard's stats.
    fn check_counters(&mut self) {
        let st = self.sh.stats(self.now);
        assert_eq!(st.sessions_active as usize, self.live);
        for (k, v) in &self.dropped {
            let now = WorkerStats::get(&st.frames_dropped, k);
            assert!(now >= *v, "frames_dropped{{{k}}} went from {v} to {now}");
        }
        self.dropped = st.frames_dropped.iter().map(|(k, v)| (*k, *v)).collect();
    }

    fn action(&mut self, a: Action, ev: Event) {
        if trace() {
            eprintln!("    {ev:?} -> {a:?}");
        }
        match a {
            Action::WakeClient(key) | Action::ShutdownClient(key, _) => {
                assert!(self.clients.iter().any(|c| c.key == key), "action for a session never accepted: {key:?}");
            }
            Action::Closed { key, tail } => {
                self.closed_seen += 1;
                let i = self.clients.iter().position(|c| c.key == key).expect("Closed for an unknown session");
                assert!(
                    matches!(ev, Event::ClientData(j) | Event::ClientClosed(j) if j == i),
                    "session {} closed during {ev:?}",
                    key.id
                );
                let c = &self.clients[i];
                assert!(c.closed, "Closed for a session whose close was not reported");
                if ev == Event::ClientClosed(i) && !c.hung && !c.writer_dead {
                    // Everything else was taken: at most the WebSocket close frame.
                    assert!(tail.is_empty() || c.ws && tail[0] == 0x88, "{} bytes left at close", tail.len());
                }
            }
            Action::Dial { conn, generation, protocol, .. } => {
                assert!(generation > self.last_generation, "generation {generation} after {}", self.last_generation);
                self.last_generation = generation;
                self.streams.push(Stream {
                    conn,
                    generation,
                    protocol,
                    state: StreamState::Dialing,
                    rbuf: BytesMut::new(),
                    hung: false,
                    inflight: None,
                    writer_dead: false,
                    driver_done: false,
                    bound: AHashSet::new(),
                    released: AHashMap::new(),
                    last_take: 0,
                });
            }
            Action::WakeBackend(conn) => {
                // (The stream may have ended later in the same event.)
                assert!(self.streams.iter().any(|s| s.conn == conn), "wake for connection {conn:?} never dialed");
            }
            Action::CloseBackend { conn, generation, .. } => {
                let s = self
                    .streams
                    .iter_mut()
                    .find(|s| s.conn == conn && s.generation == generation)
                    .expect("CloseBackend for a stream never dialed");
                s.state = StreamState::Over;
                s.bound.clear();
            }
            Action::AccessLog { buf, records } => {
                let lines: Vec<&[u8]> = buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
                assert_eq!(lines.len() as u64, records, "access-log records and lines differ");
                for l in lines {
                    serde_json::from_slice::<serde_json::Value>(l).expect("access-log line is not JSON");
                }
                self.sh.access_log_handed(Ok(records), self.now);
            }
            Action::ResumeClient(key) => {
                assert!(self.clients.iter().any(|c| c.key == key), "resume for a session never accepted: {key:?}");
            }
            Action::Announce(_) | Action::Spans(_) => {}
            Action::SessionsGone => {
                assert!(!self.gone_seen, "SessionsGone twice");
                self.gone_seen = true;
            }
        }
    }

    /// The writer of stream `i` takes its queue: whole and at once, or, if
    /// it stalls, one write that never completes (`catch_up`: it completes
    /// now and the next one starts).
    fn write_pass(&mut self, i: usize, catch_up: bool) {
        let now = self.now;
        let s = &mut self.streams[i];
        s.last_take = 0;
        if s.state != StreamState::Up || s.writer_dead {
            return;
        }
        let mut taken = Vec::new();
        loop {
            if s.hung && s.inflight.is_some() && !catch_up {
                break;
            }
            let done = match s.inflight.take() {
                Some(BackendOut::Write(w)) => Some((w, self.now)),
                _ => None,
            };
            let mut buf = BytesMut::new();
            let out = self.sh.take_backend_out(s.conn, s.generation, &mut buf, done);
            match out {
                BackendOut::Write(_) => {
                    assert!(!buf.is_empty(), "an empty write");
                    s.last_take += buf.len();
                    taken.push(buf);
                    s.inflight = Some(out);
                    if s.hung {
                        break;
                    }
                }
                BackendOut::Empty => break,
                BackendOut::Stale => {
                    s.state = StreamState::Over;
                    break;
                }
            }
        }
        for buf in taken {
            if trace() {
                eprintln!("    writer {:?}/{} ({:?}) took {} bytes", s.conn, s.generation, s.protocol, buf.len());
            }
            observe(s, &buf, now);
        }
    }
}

/// What the gateway wrote to a backend: well-formed frames for its protocol;
/// updates the sessions the backend knows.
fn observe(s: &mut Stream, buf: &[u8], now: Instant) {
    let mut rest = buf;
    while !rest.is_empty() {
        match s.protocol {
            BackendProtocol::Gate => {
                let h = match bproto::check(rest, usize::MAX >> 1) {
                    Ok(Some(h)) => h,
                    other => panic!("the gateway wrote a broken gate frame: {other:?}"),
                };
                let frame = &rest[..h.frame_len()];
                match bproto::parse(&h, frame, false).expect("the gateway wrote a gate frame that does not parse") {
                    Body::Connect { .. } | Body::Trans { .. } => {
                        s.bound.insert(h.session_id);
                    }
                    Body::Disconnect { reason } => {
                        assert!(DisconnectReason::from_u8(reason).is_some(), "DISCONNECT reason {reason}");
                        if s.bound.remove(&h.session_id) && reason == DisconnectReason::RouteChanged as u8 {
                            s.released.insert(h.session_id, now);
                        }
                    }
                    Body::Ping | Body::Pong => {}
                    other => panic!("the gateway sent a backend-only frame: {other:?}"),
                }
                rest = &rest[h.frame_len()..];
            }
            BackendProtocol::SeedTcp => {
                let (_, len) = match bproto::check_seed(rest, usize::MAX >> 1) {
                    Ok(Some(f)) => f,
                    other => panic!("the gateway wrote a broken seed frame: {other:?}"),
                };
                assert_eq!(rest[20], Opcode::Trans as u8, "seed_tcp gets TRANS only");
                s.bound.insert(i64le(&rest[21..]));
                rest = &rest[len..];
            }
            BackendProtocol::Grpc => {
                let n = match grpc::check(rest, usize::MAX >> 1) {
                    Ok(Some(n)) => n,
                    other => panic!("the gateway wrote a broken gRPC message: {other:?}"),
                };
                let p = grpc::decode(&rest[..n]).expect("the gateway wrote a GamePacket that does not decode");
                match p.metadata.get("packet_type").map(String::as_str) {
                    Some("disconnect") => {
                        let route = p.metadata.get("reason").map(String::as_str)
                            == Some(DisconnectReason::RouteChanged.as_str());
                        if s.bound.remove(&p.session_id) && route {
                            s.released.insert(p.session_id, now);
                        }
                    }
                    _ => {
                        s.bound.insert(p.session_id);
                    }
                }
                rest = &rest[n..];
            }
        }
    }
}

/// Bytes a client got from backends: whole client frames, each in its own
/// binary message on WebSocket.
fn check_client_bytes(buf: &[u8], ws: bool) {
    let mut rest = buf;
    while !rest.is_empty() {
        if ws {
            assert_eq!(rest[0], 0x82, "not a final binary frame");
            let (len, hdr) = match rest[1] {
                126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                127 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            let frame = &rest[hdr..hdr + len];
            let h = cproto::check(frame, cproto::MAX_PAYLOAD).unwrap().expect("partial client frame");
            assert_eq!(h.frame_len(), len, "one client frame per message");
            rest = &rest[hdr + len..];
        } else {
            let h = cproto::check(rest, cproto::MAX_PAYLOAD).unwrap().expect("partial client frame");
            rest = &rest[h.frame_len()..];
        }
    }
}

/// A WebSocket frame from the client (masked unless `masked` is false).
fn ws_frame(opcode: u8, payload: &[u8], fin: bool, masked: bool) -> Vec<u8> {
    let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        v.push(m | payload.len() as u8);
    } else if payload.len() <= u16::MAX as usize {
        v.push(m | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        v.push(m | 127);
        v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    if masked {
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}

fn ws_control(inp: &mut Input<'_>) -> Vec<u8> {
    let payload = inp.chunk(16).to_vec();
    match inp.u8() % 8 {
        0 => ws_frame(0x9, &payload, true, true),
        1 => ws_frame(0xA, &payload, true, true),
        2 => ws_frame(0x8, &[0x03, 0xe8], true, true),
        3 => ws_frame(0x1, b"text", true, true),
        4 => ws_frame(0x2, &payload, true, false),
        5 => [ws_frame(0x2, &payload, false, true), ws_frame(0x0, &payload, true, true)].concat(),
        6 => ws_frame(0x2, &vec![0u8; 5000], true, true),
        _ => ws_frame(0x0, &payload, true, true),
    }
}

fn http_request(inp: &mut Input<'_>) -> Vec<u8> {
    const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let up = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";
    let s = match inp.u8() % 8 {
        0 | 1 => format!("GET /play HTTP/1.1\r\nHost: g\r\n{up}{KEY}{v13}\r\n"),
        2 => format!("GET /play HTTP/1.1\r\nHost: g\r\n{up}{KEY}{v13}Origin: https://ok.example\r\nSec-WebSocket-Protocol: chat, game.v1\r\n\r\n"),
        3 => "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        4 => format!("POST /play HTTP/1.1\r\n{up}{KEY}{v13}\r\n"),
        5 => format!("GET /play HTTP/1.1\r\n{up}{KEY}Sec-WebSocket-Version: 8\r\n\r\n"),
        6 => format!("GET /play HTTP/1.1\r\n{up}{v13}\r\n"),
        _ => "GET /\x01 HTTP/1.1\r\n\r\n".to_string(),
    };
    s.into_bytes()
}

fn proxy_header(inp: &mut Input<'_>) -> Vec<u8> {
    let port = inp.u16();
    match inp.u8() % 7 {
        0 => format!("PROXY TCP4 10.9.8.7 10.0.0.1 {port} 8080\r\n").into_bytes(),
        1 => format!("PROXY TCP4 192.0.2.{} 10.0.0.1 {port} 8080\r\n", inp.u8()).into_bytes(),
        2 => format!("PROXY TCP6 2001:db8::{:x} ::1 {port} 8080\r\n", inp.u16()).into_bytes(),
        3 => b"PROXY UNKNOWN\r\n".to_vec(),
        4 => b"PROXY TCP4 nonsense\r\n".to_vec(),
        5 => {
            let mut v = frontdoor::PROXY_V2_SIG.to_vec();
            v.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 168, 1, inp.u8(), 10, 0, 0, 1]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&[0x1f, 0x90]);
            v
        }
        _ => {
            let mut v = frontdoor::PROXY_V2_SIG.to_vec();
            v.extend_from_slice(&[0x20, 0x00, 0, 0]);
            v
        }
    }
}

/// A session id a backend names.
fn pick_id(inp: &mut Input<'_>, ids: &[i64]) -> i64 {
    ids[inp.u8() as usize % ids.len()]
}

fn gate_frames(inp: &mut Input<'_>, ids: &[i64]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for _ in 0..1 + inp.u8() % 4 {
        let msg_type = inp.u16() as i32;
        let server_id = ServerId::new(false, 1, [10, 11, 15, 17, 99][inp.u8() as usize % 5], 0).0;
        match inp.u8() % 12 {
            0..=3 => {
                let sid = pick_id(inp, ids);
                bproto::encode_reply(&mut b, msg_type, server_id, sid, &inp.payload());
            }
            4 => {
                let sid = pick_id(inp, ids);
                bproto::encode_kick(&mut b, msg_type, server_id, sid, &inp.payload());
            }
            5 => {
                let list: Vec<i64> = (0..inp.u8() % 6).map(|_| pick_id(inp, ids)).collect();
                bproto::encode_multicast(&mut b, msg_type, server_id, &list, &inp.payload());
            }
            6 => bproto::encode_broadcast(&mut b, msg_type, server_id, &inp.payload()),
            7 => bproto::encode_ping(&mut b, Opcode::Ping, inp.u8() as i64),
            8 => bproto::encode_ping(&mut b, Opcode::Pong, 0),
            9 => {
                let sid = pick_id(inp, ids);
                if inp.bool() {
                    bproto::encode_connect(&mut b, sid, bproto::Transport::Tcp, SocketAddr::from(([10, 0, 0, 1], 1)));
                } else {
                    bproto::encode_disconnect(&mut b, sid, DisconnectReason::Kicked);
                }
            }
            10 => {
                // A header that cannot be framed, or a body that does not parse.
                let start = b.len();
                let sid = pick_id(inp, ids);
                bproto::encode_reply(&mut b, msg_type, server_id, sid, &inp.payload());
                match inp.u8() % 4 {
                    0 => b[start..start + 4].copy_from_slice(&(inp.u8() as i32 % 9).to_le_bytes()),
                    1 => b[start..start + 4].copy_from_slice(&(1i32 << 20).to_le_bytes()),
                    2 => b[start + 20] = 9 + inp.u8() % 200,
                    _ => b[start + 20] = Opcode::Multicast as u8,
                }
            }
            _ => b.extend_from_slice(inp.chunk(48)),
        }
    }
    b.to_vec()
}

fn seed_frames(inp: &mut Input<'_>, ids: &[i64]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for _ in 0..1 + inp.u8() % 4 {
        let start = b.len();
        let sid = pick_id(inp, ids);
        bproto::encode_reply(&mut b, inp.u16() as i32, 0, sid, &inp.payload());
        match inp.u8() % 8 {
            0 => b[start + 20] = inp.u8(),
            1 => b[start..start + 4].copy_from_slice(&(inp.u8() as i32 % 9).to_le_bytes()),
            2 => b.extend_from_slice(inp.chunk(32)),
            _ => {}
        }
    }
    b.to_vec()
}

fn grpc_frames(inp: &mut Input<'_>, ids: &[i64]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for _ in 0..1 + inp.u8() % 4 {
        match inp.u8() % 10 {
            0..=6 => {
                let mut p = grpc::GamePacket {
                    session_id: pick_id(inp, ids),
                    msg_id: inp.u16() as i32 - 100,
                    payload: inp.payload().into(),
                    ..Default::default()
                };
                let kind = ["", "server_connect", "server_disconnect", "pong", "data", "connect", "disconnect"];
                let k = kind[inp.u8() as usize % kind.len()];
                if !k.is_empty() {
                    p.metadata.insert("packet_type".into(), k.into());
                    p.metadata.insert("reason".into(), "fuzz".into());
                }
                for _ in 0..inp.u8() % 5 {
                    p.target_session_ids.push(pick_id(inp, ids));
                }
                grpc::encode(&mut b, &p);
            }
            7 => {
                // A good length around a message that does not decode.
                let body = inp.chunk(24);
                b.extend_from_slice(&[0]);
                b.extend_from_slice(&(body.len() as u32).to_be_bytes());
                b.extend_from_slice(body);
            }
            8 => b.extend_from_slice(&[1, 0, 0, 0, 0]),
            _ => b.extend_from_slice(&[0, 0x7f, 0xff, 0xff, 0xff]),
        }
    }
    b.to_vec()
}

#[cfg(test)]
mod tests {
    //! The fuzz targets' bodies on stable: the committed seed corpora, a few
    //! hundred random inputs each, and the (fixed) findings' reproducers in
    //! `fuzz/artifacts-found/`.
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    type Target = (&'static str, fn(&[u8]));
    const TARGETS: [Target; 6] = [
        ("client_frame", client_frame),
        ("backend_frame", backend_frame),
        ("front_door", front_door),
        ("route_json", route_json),
        ("config", config),
        ("shard", shard),
    ];

    fn replay(root: &str, require: bool) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(root);
        for (name, f) in TARGETS {
            let dir = root.join(name);
            let mut files: Vec<_> = match std::fs::read_dir(&dir) {
                Ok(d) => d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect(),
                Err(_) if !require => continue,
                Err(e) => panic!("{}: {e}", dir.display()),
            };
            files.sort();
            assert!(!require || !files.is_empty(), "{}: no seeds", dir.display());
            for p in &files {
                let data = std::fs::read(p).unwrap();
                if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
                    std::panic::resume_unwind(Box::new(format!("{}: {:?}", p.display(), e.downcast_ref::<String>())));
                }
            }
            println!("{name}: {} inputs replayed from {}", files.len(), dir.display());
        }
    }

    #[test]
    fn seed_corpora_replay() {
        replay("fuzz/corpus", true);
    }

    /// The findings' reproducers (fixed): they stay fixed.
    #[test]
    fn found_crashes_replay() {
        replay("fuzz/artifacts-found", false);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn random_inputs(which in 0usize..6, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            (TARGETS[which].1)(&data);
        }
    }

    /// The shard seeds still do what their names say (the event format and
    /// fuzz/make_seeds.py agree): they dial, deliver and close.
    #[test]
    fn shard_seeds_reach_deliveries() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/shard");
        let run = |name: &str| {
            let mut d = ShardDriver::new();
            d.run(&std::fs::read(dir.join(name)).unwrap());
            d
        };
        let d = run("seed-gate-bind-reply-fanout-kick");
        assert!(d.deliveries >= 2 && d.streams.len() == 2 && d.live == 0, "{} deliveries", d.deliveries);
        for name in ["seed-grpc-lifecycle-fanout", "seed-seed-tcp-pool", "seed-websocket-session"] {
            assert!(run(name).deliveries > 0, "{name}: nothing delivered");
        }
        assert!(run("seed-drain").finished, "drain did not reach close_backends");
    }

    /// The route-change seed was written against the shard before the
    /// session-table and announcement work; it still replays without a
    /// failed check, but no longer reaches a delivery, so it exercises less
    /// than its name says. Regenerate it (fuzz/make_seeds.py) and drop the
    /// ignore.
    #[test]
    #[ignore = "seed-route-changes no longer reaches a delivery; regenerate the seed"]
    fn route_change_seed_reaches_deliveries() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/shard");
        let mut d = ShardDriver::new();
        d.run(&std::fs::read(dir.join("seed-route-changes")).unwrap());
        assert!(d.deliveries > 0, "seed-route-changes: nothing delivered");
    }
}
