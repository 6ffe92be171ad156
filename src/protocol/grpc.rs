//! The Go gateway's gRPC streaming backend mode: `GamePacket` messages on the
//! `gateway.GameGatewayService/StreamPackets` bidirectional stream
//! (`proto/gateway.proto`), sans-IO. The HTTP/2 transport lives in the
//! driver; this module only frames and encodes messages.
//!
//! gRPC message framing (the stream's DATA bytes): 1 byte compressed flag
//! (always 0 here), 4 bytes big-endian length, then the protobuf message.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use std::collections::HashMap;
use std::net::IpAddr;

/// The full method path of the streaming call.
pub const METHOD_PATH: &str = "/gateway.GameGatewayService/StreamPackets";
/// Bytes before each message: compressed flag and length.
pub const MESSAGE_PREFIX_LEN: usize = 5;

/// `gateway.GamePacket`, field for field as in `proto/gateway.proto`.
#[derive(Clone, PartialEq, Message)]
pub struct GamePacket {
    #[prost(int64, tag = "1")]
    pub session_id: i64,
    #[prost(int32, tag = "2")]
    pub msg_id: i32,
    #[prost(bytes = "bytes", tag = "3")]
    pub payload: Bytes,
    #[prost(map = "string, string", tag = "4")]
    pub metadata: HashMap<String, String>,
    #[prost(int64, repeated, tag = "5")]
    pub target_session_ids: Vec<i64>,
}

/// Why a message on the stream cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcFrameError {
    #[error("compressed gRPC messages are not supported (no compression was negotiated)")]
    Compressed,
    #[error("gRPC message of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("GamePacket does not decode: {0}")]
    Decode(String),
}

/// The length of the whole first message in `buf` (prefix included), once it
/// is all there.
pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, GrpcFrameError> {
    if buf.len() < MESSAGE_PREFIX_LEN {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(GrpcFrameError::Compressed);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(GrpcFrameError::TooLarge { len, max });
    }
    let total = MESSAGE_PREFIX_LEN + len;
    Ok((buf.len() >= total).then_some(total))
}

/// Decodes one message found by [`check`] (`frame` includes the prefix).
pub fn decode(frame: &[u8]) -> Result<GamePacket, GrpcFrameError> {
    GamePacket::decode(&frame[MESSAGE_PREFIX_LEN..]).map_err(|e| GrpcFrameError::Decode(e.to_string()))
}

/// Appends `p` as one gRPC message.
pub fn encode(dst: &mut BytesMut, p: &GamePacket) {
    let len = p.encoded_len();
    dst.reserve(MESSAGE_PREFIX_LEN + len);
    dst.put_u8(0);
    dst.put_u32(len as u32);
    // Cannot fail: the capacity was reserved above.
    let _ = p.encode(dst);
}

/// What `packet_type` says a packet from the server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerPacket {
    /// Login accepted for `session_id`.
    ServerConnect,
    /// Close `session_id` (its `reason` is in the metadata).
    ServerDisconnect,
    /// Heartbeat answer.
    Pong,
    /// Anything else: data for `target_session_ids`, or else `session_id`.
    Data,
}

impl GamePacket {
    /// How a packet from the server is to be handled.
    pub fn kind(&self) -> ServerPacket {
        match self.metadata.get("packet_type").map(String::as_str) {
            Some("server_connect") => ServerPacket::ServerConnect,
            Some("server_disconnect") => ServerPacket::ServerDisconnect,
            Some("pong") => ServerPacket::Pong,
            _ => ServerPacket::Data,
        }
    }
}

fn unix_ms() -> String {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0).to_string()
}

/// `packet_type = "connect"`, sent before a session's first data packet.
pub fn encode_connect(dst: &mut BytesMut, session_id: i64, client_ip: IpAddr, websocket: bool) {
    encode_connect_as(dst, session_id, client_ip, websocket, false);
}

/// `connect`, with `resume = "true"` in the metadata when the session was
/// held while the stream was away (`on_backend_loss = "hold"`): the frames it
/// sent meanwhile follow.
pub fn encode_connect_as(dst: &mut BytesMut, session_id: i64, client_ip: IpAddr, websocket: bool, resume: bool) {
    let mut metadata = HashMap::with_capacity(5);
    if resume {
        metadata.insert("resume".to_string(), "true".to_string());
    }
    metadata.insert("packet_type".to_string(), "connect".to_string());
    metadata.insert("client_ip".to_string(), client_ip.to_canonical().to_string());
    metadata.insert("protocol".to_string(), if websocket { "websocket" } else { "tcp" }.to_string());
    metadata.insert("connect_time".to_string(), unix_ms());
    encode(dst, &GamePacket { session_id, metadata, ..Default::default() });
}

/// `packet_type = "disconnect"`, when the session ends (or leaves the backend).
pub fn encode_disconnect(dst: &mut BytesMut, session_id: i64, reason: &str) {
    let mut metadata = HashMap::with_capacity(3);
    metadata.insert("packet_type".to_string(), "disconnect".to_string());
    metadata.insert("reason".to_string(), reason.to_string());
    metadata.insert("disconnect_time".to_string(), unix_ms());
    encode(dst, &GamePacket { session_id, metadata, ..Default::default() });
}

/// A data packet: one client frame for the server; `trace` adds `trace_id`
/// and `span_id` (hex) to the metadata.
pub fn encode_data(dst: &mut BytesMut, session_id: i64, msg_id: u16, payload: &[u8], trace: Option<(&[u8], &[u8])>) {
    let mut metadata = HashMap::new();
    if let Some((trace_id, span_id)) = trace {
        metadata.insert("trace_id".to_string(), super::Hex(trace_id).to_string());
        metadata.insert("span_id".to_string(), super::Hex(span_id).to_string());
    }
    let p = GamePacket {
        session_id,
        msg_id: msg_id as i32,
        payload: Bytes::copy_from_slice(payload),
        metadata,
        target_session_ids: Vec::new(),
    };
    encode(dst, &p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_prefix() {
        let mut b = BytesMut::new();
        encode_data(&mut b, 7, 3, b"abc", Some((&[0xab; 16], &[0xcd; 8])));
        let n = check(&b, 1 << 20).unwrap().unwrap();
        assert_eq!(n, b.len());
        let p = decode(&b[..n]).unwrap();
        assert_eq!((p.session_id, p.msg_id, &p.payload[..]), (7, 3, &b"abc"[..]));
        assert_eq!(p.metadata["trace_id"], "ab".repeat(16));
        assert_eq!(p.kind(), ServerPacket::Data);
        assert_eq!(check(&b[..n - 1], 1 << 20).unwrap(), None);
        assert!(check(&b, 2).is_err());
    }

    #[test]
    fn known_bytes_of_a_packet() {
        // session_id=1, msg_id=2, payload "x", target_session_ids [5, 6]:
        // 08 01 | 10 02 | 1a 01 78 | 2a 02 05 06 (packed repeated int64).
        let p = GamePacket {
            session_id: 1,
            msg_id: 2,
            payload: Bytes::from_static(b"x"),
            target_session_ids: vec![5, 6],
            ..Default::default()
        };
        let mut b = BytesMut::new();
        encode(&mut b, &p);
        assert_eq!(&b[..], &[0, 0, 0, 0, 11, 0x08, 1, 0x10, 2, 0x1a, 1, b'x', 0x2a, 2, 5, 6]);
    }

    #[test]
    fn lifecycle_packets() {
        let mut b = BytesMut::new();
        encode_connect(&mut b, 9, "10.1.2.3".parse().unwrap(), true);
        let p = decode(&b).unwrap();
        assert_eq!(p.metadata["packet_type"], "connect");
        assert_eq!(p.metadata["client_ip"], "10.1.2.3");
        assert_eq!(p.metadata["protocol"], "websocket");
        let mut server = GamePacket { session_id: 9, ..Default::default() };
        server.metadata.insert("packet_type".into(), "server_disconnect".into());
        assert_eq!(server.kind(), ServerPacket::ServerDisconnect);
    }
}
