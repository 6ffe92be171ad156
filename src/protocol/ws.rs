//! WebSocket sessions: the bytes of binary messages form the client frame
//! stream (`PROTOCOL.md` §1); replies go out one client frame per binary
//! message. Frame parsing, masking, fragmentation, ping/pong and the close
//! handshake are tungstenite's (its sans-IO `WebSocketContext`, fed from the
//! session's read buffer through an in-memory pipe); only the 2..10-byte
//! header of outgoing binary frames is written here, with tungstenite's
//! `FrameHeader`.

use crate::protocol::backend::DisconnectReason;
use bytes::{Buf, BufMut, BytesMut};
use std::io::{Read, Write};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// tungstenite's read chunk per session: sized for many small game messages,
/// not its 128 KiB default.
pub const WS_READ_CHUNK: usize = 4096;
/// Bytes tungstenite may hold for control replies before refusing more.
pub const WS_MAX_WRITE_BUFFER: usize = 256 * 1024;

pub struct WsState {
    ctx: WebSocketContext,
    /// Client frame bytes from binary messages, not yet framed.
    pub stream: BytesMut,
    /// A close frame went out (ours or the reply to the client's).
    pub closed: bool,
}

/// Moves bytes between the session buffers and tungstenite.
struct Pipe<'a> {
    input: &'a mut BytesMut,
    output: &'a mut BytesMut,
}

impl Read for Pipe<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        if self.input.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = b.len().min(self.input.len());
        b[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a WebSocket session ends, from its own frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsEnd {
    /// The client closed (close frame or end of stream).
    ClientClosed,
    /// The client broke the protocol; a close frame with this code was sent.
    Violation(u16, &'static str),
}

impl WsState {
    pub fn new(max_message_size: usize) -> WsState {
        let mut c = WebSocketConfig::default();
        c.read_buffer_size = WS_READ_CHUNK;
        c.write_buffer_size = 0;
        c.max_write_buffer_size = WS_MAX_WRITE_BUFFER;
        c.max_message_size = Some(max_message_size);
        c.max_frame_size = Some(max_message_size);
        c.accept_unmasked_frames = false;
        WsState { ctx: WebSocketContext::new(Role::Server, Some(c)), stream: BytesMut::new(), closed: false }
    }

    /// Feeds `input` (all of it) to tungstenite; binary payloads are appended
    /// to `self.stream`, control replies and close frames to `out`.
    pub fn on_bytes(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), WsEnd> {
        let mut pipe = Pipe { input, output: out };
        let result = loop {
            match self.ctx.read(&mut pipe) {
                Ok(Message::Binary(b)) => self.stream.extend_from_slice(&b),
                Ok(Message::Text(_)) => break Err((CloseCode::Unsupported, "text frames are not accepted")),
                Ok(Message::Close(_)) => {
                    self.closed = true;
                    break Ok(Some(WsEnd::ClientClosed));
                }
                Ok(_) => {}
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(None),
                Err(Error::Capacity(_)) => break Err((CloseCode::Size, "message too large")),
                Err(Error::Protocol(_)) => break Err((CloseCode::Protocol, "protocol error")),
                Err(Error::Utf8(_)) => break Err((CloseCode::Invalid, "invalid UTF-8")),
                Err(Error::ConnectionClosed) | Err(Error::AlreadyClosed) => break Ok(Some(WsEnd::ClientClosed)),
                Err(_) => break Err((CloseCode::Error, "internal error")),
            }
        };
        match result {
            Ok(end) => {
                // Pongs (and the reply to a client's close) go out now.
                let _ = self.ctx.flush(&mut pipe);
                end.map_or(Ok(()), Err)
            }
            Err((code, why)) => {
                self.close_into(pipe.output, code, why);
                Err(WsEnd::Violation(u16::from(code), why))
            }
        }
    }

    /// Queues a close frame (once).
    pub fn close_into(&mut self, out: &mut BytesMut, code: CloseCode, reason: &'static str) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut empty = BytesMut::new();
        let mut pipe = Pipe { input: &mut empty, output: out };
        let _ = self.ctx.close(&mut pipe, Some(CloseFrame { code, reason: reason.into() }));
        let _ = self.ctx.flush(&mut pipe);
    }
}

impl WsState {
    /// Queues the close frame that tells the client why its session ended.
    pub fn close_for(&mut self, out: &mut BytesMut, reason: DisconnectReason) {
        let (code, why) = match reason {
            DisconnectReason::Kicked => (CloseCode::Normal, "kicked"),
            DisconnectReason::Shutdown => (CloseCode::Away, "gateway shutting down"),
            DisconnectReason::IdleTimeout => (CloseCode::Away, "idle"),
            DisconnectReason::RateLimited => (CloseCode::Policy, "rate limited"),
            DisconnectReason::BackendLost => (CloseCode::Again, "backend unavailable"),
            DisconnectReason::ProtocolError => (CloseCode::Protocol, "protocol error"),
            DisconnectReason::ClientClosed | DisconnectReason::RouteChanged => (CloseCode::Normal, ""),
        };
        self.close_into(out, code, why);
    }
}

/// Header of one outgoing (server, unmasked) binary frame of `len` bytes.
#[inline]
pub fn put_binary_header(out: &mut BytesMut, len: usize) {
    let h = FrameHeader { is_final: true, opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
    let _ = h.format(len as u64, &mut out.writer());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut v = vec![0x80 | opcode];
        let mask = [1u8, 2, 3, 4];
        let m = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            v.push(m | payload.len() as u8);
        } else {
            v.push(m | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        if masked {
            v.extend_from_slice(&mask);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            v.extend_from_slice(payload);
        }
        v
    }

    #[test]
    fn binary_messages_feed_the_stream_and_pings_are_answered() {
        let mut ws = WsState::new(1024);
        let mut input = BytesMut::new();
        input.extend_from_slice(&client_frame(0x2, b"abc", true));
        input.extend_from_slice(&client_frame(0x9, b"hi", true));
        input.extend_from_slice(&client_frame(0x2, b"def", true)[..4]);
        let mut out = BytesMut::new();
        ws.on_bytes(&mut input, &mut out).unwrap();
        assert_eq!(&ws.stream[..], b"abc");
        assert_eq!(&out[..], &[0x8a, 2, b'h', b'i'], "pong echoes the ping");
        let mut rest = BytesMut::from(&client_frame(0x2, b"def", true)[4..]);
        ws.on_bytes(&mut rest, &mut out).unwrap();
        assert_eq!(&ws.stream[..], b"abcdef");
    }

    #[test]
    fn violations_close_with_the_right_code() {
        for (frame, code) in [
            (client_frame(0x1, b"text", true), 1003u16),
            (client_frame(0x2, b"unmasked", false), 1002),
            (client_frame(0x2, &[0u8; 300], true), 1009),
            // A close frame whose reason is not UTF-8.
            (client_frame(0x8, &[0x03, 0xe8, 0xff, 0xfe], true), 1007),
        ] {
            let mut ws = WsState::new(256);
            let mut out = BytesMut::new();
            let end = ws.on_bytes(&mut BytesMut::from(&frame[..]), &mut out).unwrap_err();
            assert!(matches!(end, WsEnd::Violation(c, _) if c == code), "{end:?}");
            assert_eq!(out[0], 0x88, "a close frame went out");
            assert_eq!(u16::from_be_bytes([out[2], out[3]]), code);
        }
    }

    #[test]
    fn outgoing_header() {
        let mut out = BytesMut::new();
        put_binary_header(&mut out, 5);
        assert_eq!(&out[..], &[0x82, 5]);
        out.clear();
        put_binary_header(&mut out, 70_000);
        assert_eq!(&out[..2], &[0x82, 127]);
    }
}
