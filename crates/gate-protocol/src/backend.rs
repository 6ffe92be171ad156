//! Backend frame codec (gateway <-> backend), `PROTOCOL.md` §2.
//!
//! ```text
//! server header (20 bytes)                       gate header (9 or 33 bytes)
//! | length i32 | type i32 | server_id u32 | object_id i64 | opcode u8 | session_id i64 | [trace_id 16 | span_id 8] | payload |
//! ```
//! `length` counts everything after the 20-byte server header. The parse is
//! two-pass: [`check`] validates the header and tells whether the whole frame
//! is buffered; [`parse`] then reads the body of that frame in place, borrowing
//! the payload from the read buffer.

use bytes::{BufMut, BytesMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Bytes in the server header.
pub const SERVER_HEADER_LEN: usize = 20;
/// Bytes in the plain gate header (opcode + session id).
pub const GATE_HEADER_LEN: usize = 9;
/// Extra gate-header bytes when trace propagation is on (trace id + span id).
pub const TRACE_EXT_LEN: usize = 24;
/// Body of a `CONNECT`: transport u8, IPv6 (or mapped IPv4) 16 bytes, port u16.
pub const CONNECT_BODY_LEN: usize = 19;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    Trans = 1,
    Connect = 2,
    Disconnect = 3,
    Kick = 4,
    Multicast = 5,
    Broadcast = 6,
    Ping = 7,
    Pong = 8,
    /// Backend -> gateway: the session's attributes (authenticated, user id,
    /// tags). See [`encode_session_attrs`].
    SessionAttrs = 9,
    /// Backend -> gateway: an announcement for every session of the gateway
    /// (all its cores), optionally filtered. See [`encode_announce`].
    Announce = 10,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Trans,
            2 => Opcode::Connect,
            3 => Opcode::Disconnect,
            4 => Opcode::Kick,
            5 => Opcode::Multicast,
            6 => Opcode::Broadcast,
            7 => Opcode::Ping,
            8 => Opcode::Pong,
            9 => Opcode::SessionAttrs,
            10 => Opcode::Announce,
            _ => return None,
        })
    }
}

/// Client transport, as carried in `CONNECT`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp = 1,
    WebSocket = 2,
}

/// Why a session was unbound; the `DISCONNECT` payload.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    ClientClosed = 1,
    IdleTimeout = 2,
    ProtocolError = 3,
    RateLimited = 4,
    Kicked = 5,
    Shutdown = 6,
    BackendLost = 7,
    RouteChanged = 8,
}

impl DisconnectReason {
    pub fn from_u8(v: u8) -> Option<DisconnectReason> {
        use DisconnectReason::*;
        Some(match v {
            1 => ClientClosed,
            2 => IdleTimeout,
            3 => ProtocolError,
            4 => RateLimited,
            5 => Kicked,
            6 => Shutdown,
            7 => BackendLost,
            8 => RouteChanged,
            _ => return None,
        })
    }
    /// Stable lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        use DisconnectReason::*;
        match self {
            ClientClosed => "client_closed",
            IdleTimeout => "idle_timeout",
            ProtocolError => "protocol_error",
            RateLimited => "rate_limited",
            Kicked => "kicked",
            Shutdown => "shutdown",
            BackendLost => "backend_lost",
            RouteChanged => "route_changed",
        }
    }
}

/// The fixed part of every backend frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes after the server header (gate header + payload).
    pub length: u32,
    /// Client `msg_id` (gateway -> backend) / reply `msg_id` (backend -> gateway).
    pub msg_type: i32,
    pub server_id: u32,
    pub object_id: i64,
    pub opcode: Opcode,
    pub session_id: i64,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        SERVER_HEADER_LEN + self.length as usize
    }
}

/// Trace context carried by the extended gate header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// Why a backend frame cannot be used. A bad length (`TooShort`,
/// `TooLarge`) means the stream cannot be resynchronised; with a good length
/// (`UnknownOpcode`, `BadBody`) a receiver can skip just that frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendFrameError {
    TooShort(i32),
    TooLarge { len: usize, max: usize },
    UnknownOpcode(u8),
    BadBody { opcode: Opcode, what: &'static str },
}

// Written out rather than derived so this crate depends on `bytes` only.
impl std::fmt::Display for BackendFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendFrameError::TooShort(len) => write!(f, "backend frame length {len} is below the 9-byte gate header"),
            BackendFrameError::TooLarge { len, max } => {
                write!(f, "backend frame length {len} exceeds max_frame_size {max}")
            }
            BackendFrameError::UnknownOpcode(op) => write!(f, "unknown backend opcode {op}"),
            BackendFrameError::BadBody { opcode, what } => write!(f, "{opcode:?} body malformed: {what}"),
        }
    }
}

impl std::error::Error for BackendFrameError {}

/// First pass: validates the header; `Ok(None)` until the whole frame is in.
#[inline]
pub fn check(buf: &[u8], max_frame: usize) -> Result<Option<Header>, BackendFrameError> {
    if buf.len() < SERVER_HEADER_LEN + GATE_HEADER_LEN {
        // A length below 9 is detectable from the first 4 bytes; report it early
        // so a broken peer is cut off without waiting for more bytes.
        if buf.len() >= 4 {
            let length = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if length < GATE_HEADER_LEN as i32 {
                return Err(BackendFrameError::TooShort(length));
            }
        }
        return Ok(None);
    }
    let length = i32::from_le_bytes(buf[0..4].try_into().unwrap());
    if length < GATE_HEADER_LEN as i32 {
        return Err(BackendFrameError::TooShort(length));
    }
    if length as usize > max_frame {
        return Err(BackendFrameError::TooLarge { len: length as usize, max: max_frame });
    }
    let opcode = Opcode::from_u8(buf[20]).ok_or(BackendFrameError::UnknownOpcode(buf[20]))?;
    let h = Header {
        length: length as u32,
        msg_type: i32::from_le_bytes(buf[4..8].try_into().unwrap()),
        server_id: u32::from_le_bytes(buf[8..12].try_into().unwrap()),
        object_id: i64::from_le_bytes(buf[12..20].try_into().unwrap()),
        opcode,
        session_id: i64::from_le_bytes(buf[21..29].try_into().unwrap()),
    };
    if buf.len() < h.frame_len() {
        return Ok(None);
    }
    Ok(Some(h))
}

/// The body of one backend frame, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Trans { trace: Option<TraceContext>, payload: &'a [u8] },
    Connect { transport: u8, addr: SocketAddr },
    Disconnect { reason: u8 },
    Kick { payload: &'a [u8] },
    Multicast { sessions: SessionIds<'a>, payload: &'a [u8] },
    Broadcast { payload: &'a [u8] },
    Ping,
    Pong,
    SessionAttrs { authenticated: bool, user: &'a [u8], tags: Tags<'a> },
    Announce { filter: AnnounceFilter<'a>, payload: &'a [u8] },
}

/// The tags of a `SESSION_ATTRS`, read in place: each a u8 length and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tags<'a>(&'a [u8]);

impl<'a> Tags<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (tag, tail) = tail.split_at(len as usize);
            rest = tail;
            Some(tag)
        })
    }
}

/// Which sessions an `ANNOUNCE` reaches: all, or those in a world, bound to
/// a server type, or carrying a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnounceFilter<'a> {
    All,
    World(u16),
    ServerType(u8),
    Tag(&'a [u8]),
}

/// The `count` x i64 session id list of a `MULTICAST`, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionIds<'a>(&'a [u8]);

impl<'a> SessionIds<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = i64> + 'a {
        self.0.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()))
    }
}

/// Second pass: parses the body of a frame that [`check`] accepted.
///
/// `frame` is exactly `h.frame_len()` bytes. `trace_ext` says whether a `TRANS`
/// carries the extended gate header; only the receiving side of a route with
/// trace propagation knows that, so the caller passes it.
pub fn parse<'a>(h: &Header, frame: &'a [u8], trace_ext: bool) -> Result<Body<'a>, BackendFrameError> {
    let body = &frame[SERVER_HEADER_LEN + GATE_HEADER_LEN..h.frame_len()];
    let bad = |what| BackendFrameError::BadBody { opcode: h.opcode, what };
    Ok(match h.opcode {
        Opcode::Trans if trace_ext => {
            if body.len() < TRACE_EXT_LEN {
                return Err(bad("shorter than the trace extension"));
            }
            let trace =
                TraceContext { trace_id: body[..16].try_into().unwrap(), span_id: body[16..24].try_into().unwrap() };
            Body::Trans { trace: Some(trace), payload: &body[TRACE_EXT_LEN..] }
        }
        Opcode::Trans => Body::Trans { trace: None, payload: body },
        Opcode::Connect => {
            if body.len() != CONNECT_BODY_LEN {
                return Err(bad("length is not 19"));
            }
            let ip6 = Ipv6Addr::from(<[u8; 16]>::try_from(&body[1..17]).unwrap());
            let ip = match ip6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip6),
            };
            let port = u16::from_le_bytes([body[17], body[18]]);
            Body::Connect { transport: body[0], addr: SocketAddr::new(ip, port) }
        }
        Opcode::Disconnect => {
            if body.len() != 1 {
                return Err(bad("length is not 1"));
            }
            Body::Disconnect { reason: body[0] }
        }
        Opcode::Kick => Body::Kick { payload: body },
        Opcode::Multicast => {
            if body.len() < 2 {
                return Err(bad("missing count"));
            }
            let count = u16::from_le_bytes([body[0], body[1]]) as usize;
            let ids_end = 2 + count * 8;
            if body.len() < ids_end {
                return Err(bad("count exceeds frame"));
            }
            Body::Multicast { sessions: SessionIds(&body[2..ids_end]), payload: &body[ids_end..] }
        }
        Opcode::Broadcast => Body::Broadcast { payload: body },
        Opcode::Ping => Body::Ping,
        Opcode::Pong => Body::Pong,
        Opcode::SessionAttrs => {
            // flags u8 (bit 0: authenticated), user_len u8, user, tag_count u8,
            // then each tag: len u8, bytes.
            let (&flags, rest) = body.split_first().ok_or(bad("missing flags"))?;
            let (&user_len, rest) = rest.split_first().ok_or(bad("missing user length"))?;
            if rest.len() < user_len as usize {
                return Err(bad("user id exceeds frame"));
            }
            let (user, rest) = rest.split_at(user_len as usize);
            let (&count, tags) = rest.split_first().ok_or(bad("missing tag count"))?;
            let mut t = tags;
            for _ in 0..count {
                let (&len, tail) = t.split_first().ok_or(bad("tag count exceeds frame"))?;
                if tail.len() < len as usize {
                    return Err(bad("tag exceeds frame"));
                }
                t = &tail[len as usize..];
            }
            if !t.is_empty() {
                return Err(bad("bytes after the tags"));
            }
            Body::SessionAttrs { authenticated: flags & 1 == 1, user, tags: Tags(tags) }
        }
        Opcode::Announce => {
            // kind u8 (0 all, 1 world u16, 2 server type u8, 3 tag: len u8 + bytes), then the payload.
            let (&kind, rest) = body.split_first().ok_or(bad("missing filter"))?;
            let (filter, payload) = match kind {
                0 => (AnnounceFilter::All, rest),
                1 if rest.len() >= 2 => (AnnounceFilter::World(u16::from_le_bytes([rest[0], rest[1]])), &rest[2..]),
                2 if !rest.is_empty() => (AnnounceFilter::ServerType(rest[0]), &rest[1..]),
                3 if !rest.is_empty() && rest.len() > rest[0] as usize => {
                    let len = rest[0] as usize;
                    (AnnounceFilter::Tag(&rest[1..1 + len]), &rest[1 + len..])
                }
                _ => return Err(bad("bad filter")),
            };
            Body::Announce { filter, payload }
        }
    })
}

/// `SESSION_ATTRS` (backend -> gateway): the session is authenticated (or
/// not), with an opaque user id and tags (each at most 255 bytes, at most
/// 255 of them).
pub fn encode_session_attrs(dst: &mut BytesMut, session_id: i64, authenticated: bool, user: &[u8], tags: &[&[u8]]) {
    let user = &user[..user.len().min(255)];
    let tags = &tags[..tags.len().min(255)];
    let len = 1 + 1 + user.len() + 1 + tags.iter().map(|t| 1 + t.len().min(255)).sum::<usize>();
    put_header(dst, 0, 0, session_id, Opcode::SessionAttrs, len);
    dst.put_u8(authenticated as u8);
    dst.put_u8(user.len() as u8);
    dst.put_slice(user);
    dst.put_u8(tags.len() as u8);
    for t in tags {
        let t = &t[..t.len().min(255)];
        dst.put_u8(t.len() as u8);
        dst.put_slice(t);
    }
}

/// `ANNOUNCE` (backend -> gateway): `payload` to every session of the
/// gateway that `filter` selects, as a client frame with `msg_type`.
pub fn encode_announce(dst: &mut BytesMut, msg_type: i32, filter: AnnounceFilter<'_>, payload: &[u8]) {
    let flen = match filter {
        AnnounceFilter::All => 1,
        AnnounceFilter::World(_) => 3,
        AnnounceFilter::ServerType(_) => 2,
        AnnounceFilter::Tag(t) => 2 + t.len().min(255),
    };
    put_header(dst, msg_type, 0, 0, Opcode::Announce, flen + payload.len());
    match filter {
        AnnounceFilter::All => dst.put_u8(0),
        AnnounceFilter::World(w) => {
            dst.put_u8(1);
            dst.put_u16_le(w);
        }
        AnnounceFilter::ServerType(t) => {
            dst.put_u8(2);
            dst.put_u8(t);
        }
        AnnounceFilter::Tag(t) => {
            let t = &t[..t.len().min(255)];
            dst.put_u8(3);
            dst.put_u8(t.len() as u8);
            dst.put_slice(t);
        }
    }
    dst.put_slice(payload);
}

/// Writes the server header and gate header for a body of `body_len` bytes.
#[inline]
fn put_header(dst: &mut BytesMut, msg_type: i32, server_id: u32, session_id: i64, opcode: Opcode, body_len: usize) {
    dst.reserve(SERVER_HEADER_LEN + GATE_HEADER_LEN + body_len);
    dst.put_i32_le((GATE_HEADER_LEN + body_len) as i32);
    dst.put_i32_le(msg_type);
    dst.put_u32_le(server_id);
    dst.put_i64_le(session_id);
    dst.put_u8(opcode as u8);
    dst.put_i64_le(session_id);
}

/// `TRANS`: one client frame's payload, stamped with the session id.
#[inline]
pub fn encode_trans(
    dst: &mut BytesMut,
    msg_type: i32,
    server_id: u32,
    session_id: i64,
    trace: Option<&TraceContext>,
    payload: &[u8],
) {
    let ext = if trace.is_some() { TRACE_EXT_LEN } else { 0 };
    put_header(dst, msg_type, server_id, session_id, Opcode::Trans, ext + payload.len());
    if let Some(t) = trace {
        dst.put_slice(&t.trace_id);
        dst.put_slice(&t.span_id);
    }
    dst.put_slice(payload);
}

/// `CONNECT`: the session is bound; tells the backend who the client is.
pub fn encode_connect(dst: &mut BytesMut, session_id: i64, transport: Transport, client: SocketAddr) {
    encode_connect_as(dst, session_id, transport, client, false);
}

/// Bit 7 of a `CONNECT`'s transport byte: a resume. The session was bound to
/// this backend before, the backend connection was lost, and the gateway
/// held the session; the frames it buffered follow this `CONNECT`.
pub const CONNECT_RESUME: u8 = 0x80;

/// `CONNECT`, marked as a resume when `resume` is set ([`CONNECT_RESUME`]).
pub fn encode_connect_as(dst: &mut BytesMut, session_id: i64, transport: Transport, client: SocketAddr, resume: bool) {
    put_header(dst, 0, 0, session_id, Opcode::Connect, CONNECT_BODY_LEN);
    dst.put_u8(transport as u8 | if resume { CONNECT_RESUME } else { 0 });
    let ip6 = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    dst.put_slice(&ip6.octets());
    dst.put_u16_le(client.port());
}

/// `DISCONNECT`: the session is unbound, with why.
pub fn encode_disconnect(dst: &mut BytesMut, session_id: i64, reason: DisconnectReason) {
    put_header(dst, 0, 0, session_id, Opcode::Disconnect, 1);
    dst.put_u8(reason as u8);
}

/// `PING` / `PONG` keep-alive (empty body).
pub fn encode_ping(dst: &mut BytesMut, opcode: Opcode, object_id: i64) {
    debug_assert!(matches!(opcode, Opcode::Ping | Opcode::Pong));
    put_header(dst, 0, 0, object_id, opcode, 0);
}

/// Backend side: a reply / push `TRANS` to one session.
pub fn encode_reply(dst: &mut BytesMut, msg_type: i32, server_id: u32, session_id: i64, payload: &[u8]) {
    encode_trans(dst, msg_type, server_id, session_id, None, payload)
}

/// Backend side: `KICK`, with an optional last frame.
pub fn encode_kick(dst: &mut BytesMut, msg_type: i32, server_id: u32, session_id: i64, payload: &[u8]) {
    put_header(dst, msg_type, server_id, session_id, Opcode::Kick, payload.len());
    dst.put_slice(payload);
}

/// Backend side: `MULTICAST` of one payload to listed sessions.
///
/// Panics if more than `u16::MAX` sessions are listed (a backend bug).
pub fn encode_multicast(dst: &mut BytesMut, msg_type: i32, server_id: u32, sessions: &[i64], payload: &[u8]) {
    let count = u16::try_from(sessions.len()).expect("multicast lists at most 65535 sessions");
    put_header(dst, msg_type, server_id, 0, Opcode::Multicast, 2 + sessions.len() * 8 + payload.len());
    dst.put_u16_le(count);
    for s in sessions {
        dst.put_i64_le(*s);
    }
    dst.put_slice(payload);
}

/// Backend side: `BROADCAST` to every session bound to the connection.
pub fn encode_broadcast(dst: &mut BytesMut, msg_type: i32, server_id: u32, payload: &[u8]) {
    put_header(dst, msg_type, server_id, 0, Opcode::Broadcast, payload.len());
    dst.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn one(buf: &[u8], trace: bool) -> (Header, Body<'_>) {
        let h = check(buf, MAX).unwrap().unwrap();
        assert_eq!(h.frame_len(), buf.len());
        let b = parse(&h, buf, trace).unwrap();
        (h, b)
    }

    #[test]
    fn header_is_twenty_bytes_and_trans_roundtrips() {
        let mut b = BytesMut::new();
        encode_trans(&mut b, 42, 0x000A_0A02, 77, None, b"abc");
        assert_eq!(b.len(), 20 + 9 + 3);
        assert_eq!(i32::from_le_bytes(b[0..4].try_into().unwrap()), 12);
        let (h, body) = one(&b, false);
        assert_eq!((h.msg_type, h.server_id, h.object_id, h.session_id), (42, 0x000A_0A02, 77, 77));
        assert_eq!(body, Body::Trans { trace: None, payload: b"abc" });
    }

    #[test]
    fn trace_extension() {
        let t = TraceContext { trace_id: [7; 16], span_id: [9; 8] };
        let mut b = BytesMut::new();
        encode_trans(&mut b, 1, 2, 3, Some(&t), b"xy");
        assert_eq!(b.len(), 20 + 33 + 2);
        let (_, body) = one(&b, true);
        assert_eq!(body, Body::Trans { trace: Some(t), payload: b"xy" });
    }

    #[test]
    fn connect_v4_and_v6() {
        for addr in ["10.1.2.3:4567", "[2001:db8::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut b = BytesMut::new();
            encode_connect(&mut b, 5, Transport::WebSocket, addr);
            let (h, body) = one(&b, false);
            assert_eq!(h.opcode, Opcode::Connect);
            assert_eq!(body, Body::Connect { transport: 2, addr });
        }
    }

    #[test]
    fn control_opcodes() {
        let mut b = BytesMut::new();
        encode_disconnect(&mut b, 5, DisconnectReason::Kicked);
        assert_eq!(one(&b, false).1, Body::Disconnect { reason: 5 });
        b.clear();
        encode_kick(&mut b, 3, 0, 5, b"bye");
        assert_eq!(one(&b, false).1, Body::Kick { payload: b"bye" });
        b.clear();
        encode_multicast(&mut b, 3, 0, &[1, 2, 3], b"hi");
        match one(&b, false).1 {
            Body::Multicast { sessions, payload } => {
                assert_eq!(sessions.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
                assert_eq!(payload, b"hi");
            }
            other => panic!("{other:?}"),
        }
        b.clear();
        encode_broadcast(&mut b, 3, 0, b"all");
        assert_eq!(one(&b, false).1, Body::Broadcast { payload: b"all" });
        b.clear();
        encode_ping(&mut b, Opcode::Ping, 9);
        assert_eq!(one(&b, false).1, Body::Ping);
    }

    #[test]
    fn length_errors() {
        let mut b = BytesMut::new();
        encode_ping(&mut b, Opcode::Ping, 9);
        b[0..4].copy_from_slice(&8i32.to_le_bytes());
        assert_eq!(check(&b[..4], MAX), Err(BackendFrameError::TooShort(8)));
        b[0..4].copy_from_slice(&(-1i32).to_le_bytes());
        assert_eq!(check(&b, MAX), Err(BackendFrameError::TooShort(-1)));
        b[0..4].copy_from_slice(&100i32.to_le_bytes());
        assert_eq!(check(&b, 99), Err(BackendFrameError::TooLarge { len: 100, max: 99 }));
        b[0..4].copy_from_slice(&9i32.to_le_bytes());
        b[20] = 99;
        assert_eq!(check(&b, MAX), Err(BackendFrameError::UnknownOpcode(99)));
    }

    #[test]
    fn multicast_count_beyond_frame_is_an_error() {
        let mut b = BytesMut::new();
        encode_multicast(&mut b, 3, 0, &[1], b"");
        b[29..31].copy_from_slice(&5u16.to_le_bytes());
        let h = check(&b, MAX).unwrap().unwrap();
        assert!(matches!(parse(&h, &b, false), Err(BackendFrameError::BadBody { .. })));
    }

    proptest! {
        #[test]
        fn trans_roundtrip(t: i32, s: u32, sid: i64, p in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut b = BytesMut::new();
            encode_trans(&mut b, t, s, sid, None, &p);
            for cut in [0, 3, 20, 28, b.len() - 1] {
                prop_assert_eq!(check(&b[..cut], MAX), Ok(None));
            }
            let (h, body) = one(&b, false);
            prop_assert_eq!((h.msg_type, h.server_id, h.session_id), (t, s, sid));
            prop_assert_eq!(body, Body::Trans { trace: None, payload: &p[..] });
        }

        #[test]
        fn multicast_roundtrip(ids in proptest::collection::vec(any::<i64>(), 0..64), p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::new();
            encode_multicast(&mut b, 1, 2, &ids, &p);
            match one(&b, false).1 {
                Body::Multicast { sessions, payload } => {
                    prop_assert_eq!(sessions.iter().collect::<Vec<_>>(), ids);
                    prop_assert_eq!(payload, &p[..]);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), trace: bool) {
            let mut rest: &[u8] = &bytes;
            while let Ok(Some(h)) = check(rest, 4096) {
                let _ = parse(&h, &rest[..h.frame_len()], trace);
                rest = &rest[h.frame_len()..];
            }
        }
    }
}

/// A frame of the Go gateway's per-session TCP mode ("seed TCP"), from the
/// backend: the 20-byte server header, a 9-byte gate header whose opcode and
/// ids are ignored (the connection itself names the session), then the
/// payload. Returns `(type, frame length)`; the payload is
/// `frame[SERVER_HEADER_LEN + GATE_HEADER_LEN..frame_len]`.
pub fn check_seed(buf: &[u8], max_frame: usize) -> Result<Option<(i32, usize)>, BackendFrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if length < GATE_HEADER_LEN as i32 {
        return Err(BackendFrameError::TooShort(length));
    }
    if length as usize > max_frame {
        return Err(BackendFrameError::TooLarge { len: length as usize, max: max_frame });
    }
    let frame_len = SERVER_HEADER_LEN + length as usize;
    if buf.len() < frame_len {
        return Ok(None);
    }
    Ok(Some((i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]), frame_len)))
}

#[cfg(test)]
mod seed_tests {
    use super::*;

    #[test]
    fn session_attrs_and_announce_roundtrip() {
        let mut b = BytesMut::new();
        encode_session_attrs(&mut b, 7, true, b"user-42", &[b"vip", b"guild:3"]);
        let h = check(&b, 1024).unwrap().unwrap();
        match parse(&h, &b, false).unwrap() {
            Body::SessionAttrs { authenticated, user, tags } => {
                assert!(authenticated);
                assert_eq!(user, b"user-42");
                assert_eq!(tags.iter().collect::<Vec<_>>(), vec![&b"vip"[..], &b"guild:3"[..]]);
            }
            other => panic!("{other:?}"),
        }
        for f in
            [AnnounceFilter::All, AnnounceFilter::World(3), AnnounceFilter::ServerType(10), AnnounceFilter::Tag(b"vip")]
        {
            let mut b = BytesMut::new();
            encode_announce(&mut b, 5, f, b"hello realm");
            let h = check(&b, 1024).unwrap().unwrap();
            assert_eq!(parse(&h, &b, false).unwrap(), Body::Announce { filter: f, payload: b"hello realm" });
        }
        let mut bad = BytesMut::new();
        encode_session_attrs(&mut bad, 7, true, b"u", &[b"t"]);
        bad[29 + 3] = 9; // tag count larger than the frame
        let h = check(&bad, 1024).unwrap().unwrap();
        assert!(parse(&h, &bad, false).is_err());
    }

    #[test]
    fn seed_frames_ignore_opcode_and_ids() {
        let mut b = BytesMut::new();
        encode_reply(&mut b, 42, 0, 7, b"hello");
        b[20] = 99; // an opcode the gate protocol does not know
        assert_eq!(check_seed(&b, 1024).unwrap(), Some((42, b.len())));
        assert_eq!(&b[SERVER_HEADER_LEN + GATE_HEADER_LEN..], b"hello");
        assert_eq!(check_seed(&b[..b.len() - 1], 1024).unwrap(), None);
        let mut short = b.clone();
        short[0..4].copy_from_slice(&8i32.to_le_bytes());
        assert!(check_seed(&short, 1024).is_err());
        assert!(check_seed(&b, 8).is_err());
    }
}
