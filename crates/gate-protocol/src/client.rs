//! Client frame codec (client <-> gateway), `PROTOCOL.md` §1.
//!
//! ```text
//! 0      2        4            8
//! | len  | msg_id | server_id  | payload (len bytes) |
//! ```
//! All integers little-endian. `len` is the payload size, so a frame is
//! `8 + len` bytes. Over WebSocket the payloads of binary messages form the same
//! byte stream, so this codec serves both transports.

use super::ServerId;
use bytes::{BufMut, BytesMut};

/// Bytes in a client frame header.
pub const HEADER_LEN: usize = 8;
/// The largest payload the 16-bit `len` field can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// A parsed client frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHeader {
    /// Payload bytes after the header.
    pub len: u16,
    /// Opaque message id; becomes the backend frame's `type`.
    pub msg_id: u16,
    /// Routing address (`world.type.inst`, zip bit).
    pub server_id: ServerId,
}

impl ClientHeader {
    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Why a client byte stream cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrameError {
    TooLarge { len: usize, max: usize },
}

// Written out rather than derived so this crate depends on `bytes` only.
impl std::fmt::Display for ClientFrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientFrameError::TooLarge { len, max } => {
                write!(f, "client frame payload of {len} bytes exceeds max_message_size {max}")
            }
        }
    }
}

impl std::error::Error for ClientFrameError {}

/// First pass: is a whole frame at the front of `buf`?
///
/// `Ok(None)`: not yet (need more bytes). `Err`: the declared payload is larger
/// than `max_payload`; the stream cannot be resynchronised and must be closed.
/// The size check runs as soon as the header is in, so an oversize frame is
/// refused before its payload is buffered.
#[inline]
pub fn check(buf: &[u8], max_payload: usize) -> Result<Option<ClientHeader>, ClientFrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u16::from_le_bytes([buf[0], buf[1]]);
    if len as usize > max_payload {
        return Err(ClientFrameError::TooLarge { len: len as usize, max: max_payload });
    }
    if buf.len() < HEADER_LEN + len as usize {
        return Ok(None);
    }
    Ok(Some(ClientHeader {
        len,
        msg_id: u16::from_le_bytes([buf[2], buf[3]]),
        server_id: ServerId(u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]])),
    }))
}

/// Appends one client frame to `dst`.
///
/// Returns `false` (and writes nothing) when `payload` cannot be described by
/// the 16-bit length field; the caller counts that as a dropped frame.
#[inline]
pub fn encode(dst: &mut BytesMut, msg_id: u16, server_id: ServerId, payload: &[u8]) -> bool {
    if payload.len() > MAX_PAYLOAD {
        return false;
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u16_le(payload.len() as u16);
    dst.put_u16_le(msg_id);
    dst.put_u32_le(server_id.0);
    dst.put_slice(payload);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incomplete_is_need_more() {
        let mut b = BytesMut::new();
        encode(&mut b, 1, ServerId::new(false, 1, 10, 2), b"hello");
        for cut in 0..b.len() {
            assert_eq!(check(&b[..cut], MAX_PAYLOAD), Ok(None), "cut at {cut}");
        }
        let h = check(&b, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(h.msg_id, 1);
        assert_eq!(h.server_id.server_type(), 10);
        assert_eq!(&b[HEADER_LEN..h.frame_len()], b"hello");
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let hdr = [0xFF, 0xFF, 0, 0, 0, 0, 0, 0];
        assert_eq!(check(&hdr, 1024), Err(ClientFrameError::TooLarge { len: 65535, max: 1024 }));
    }

    #[test]
    fn encode_refuses_payload_over_u16() {
        let mut b = BytesMut::new();
        assert!(!encode(&mut b, 1, ServerId(0), &vec![0u8; MAX_PAYLOAD + 1]));
        assert!(b.is_empty());
        assert!(encode(&mut b, 1, ServerId(0), &vec![0u8; MAX_PAYLOAD]));
    }

    proptest! {
        #[test]
        fn roundtrip(msg_id: u16, sid: u32, payload in proptest::collection::vec(any::<u8>(), 0..2048), extra in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut b = BytesMut::new();
            prop_assert!(encode(&mut b, msg_id, ServerId(sid), &payload));
            b.extend_from_slice(&extra);
            let h = check(&b, MAX_PAYLOAD).unwrap().unwrap();
            prop_assert_eq!(h.msg_id, msg_id);
            prop_assert_eq!(h.server_id, ServerId(sid));
            prop_assert_eq!(&b[HEADER_LEN..h.frame_len()], &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 0usize..70000) {
            let mut rest: &[u8] = &bytes;
            while let Ok(Some(h)) = check(rest, max) {
                prop_assert!(h.len as usize <= max);
                rest = &rest[h.frame_len()..];
            }
        }
    }
}
