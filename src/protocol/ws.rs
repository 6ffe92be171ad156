//! WebSocket sessions: the bytes of binary messages form the client frame
//! stream (`PROTOCOL.md` §1); replies go out one client frame per binary
//! message.
//!
//! The common frame (final, masked, binary, under 64 KiB) and fragmented
//! binary messages are parsed and unmasked here, straight into the stream.
//! Every other frame (ping, pong, close, text, anything unusual) goes whole
//! to tungstenite's sans-IO `WebSocketContext` through an in-memory pipe,
//! which answers pings and runs the close handshake. A frame not complete
//! yet waits in the session's `partial` buffer, so tungstenite never holds
//! bytes between calls: the state is plain data a live upgrade can carry.

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
/// A partial-frame buffer larger than this is freed once emptied.
pub const WS_PARTIAL_KEEP_MAX: usize = 16 * 1024;
/// Bytes tungstenite may hold for control replies before refusing more.
pub const WS_MAX_WRITE_BUFFER: usize = 256 * 1024;

pub struct WsState {
    ctx: WebSocketContext,
    /// Largest frame accepted (tungstenite enforces the same).
    max_frame: usize,
    /// Bytes of a frame not complete yet (the fast path waits for whole frames).
    partial: BytesMut,
    /// A fragmented message is open in tungstenite: every frame goes to it
    /// until the message completes.
    in_fragment: bool,
    /// A fragmented binary message is open (handled here, not by
    /// tungstenite): its payload bytes so far.
    fragment: Option<usize>,
    /// Client frame bytes from binary messages, not yet framed.
    pub stream: BytesMut,
    /// A close frame went out (ours or the reply to the client's).
    pub closed: bool,
}

/// A WebSocket session's state as a live upgrade sends it (see
/// [`WsState::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WsSnapshot {
    pub max_frame: u64,
    pub partial: Vec<u8>,
    pub stream: Vec<u8>,
    pub closed: bool,
    pub fragment: Option<u64>,
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
        WsState {
            ctx: WebSocketContext::new(Role::Server, Some(c)),
            max_frame: max_message_size,
            partial: BytesMut::new(),
            in_fragment: false,
            fragment: None,
            stream: BytesMut::new(),
            closed: false,
        }
    }

    /// What a live upgrade carries of this state to the new process. Every
    /// frame the client sent is either unmasked into `stream`, or waits whole
    /// in `partial`: tungstenite holds no bytes between calls, and no message
    /// state either (fragmented binary messages are handled here). Only a
    /// fragmented *text* message lives in tungstenite; text is refused
    /// anyway, and after the move its continuation is refused as a protocol
    /// error (1002) instead of as text (1003).
    pub fn snapshot(&self) -> WsSnapshot {
        WsSnapshot {
            max_frame: self.max_frame as u64,
            partial: self.partial.to_vec(),
            stream: self.stream.to_vec(),
            closed: self.closed,
            fragment: self.fragment.map(|n| n as u64),
        }
    }

    /// The state a [`WsSnapshot`] describes, in this process.
    pub fn restore(s: WsSnapshot) -> WsState {
        let mut ws = WsState::new(s.max_frame as usize);
        ws.partial = BytesMut::from(&s.partial[..]);
        ws.stream = BytesMut::from(&s.stream[..]);
        ws.closed = s.closed;
        ws.fragment = s.fragment.map(|n| n as usize);
        ws
    }

    /// Feeds `input` (all of it). Whole, final, masked binary frames (the
    /// common case) are unmasked straight into `self.stream`; every other
    /// frame goes to tungstenite, one whole frame at a time, so tungstenite
    /// never holds bytes across calls and the fast path may skip it. A frame
    /// over the size limit, or a header tungstenite must refuse, goes to
    /// tungstenite at once (it refuses from the header alone).
    pub fn on_bytes(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), WsEnd> {
        if self.partial.is_empty() {
            let r = self.frames(input, out);
            if r.is_ok() && !input.is_empty() {
                // The start of a frame: kept until the rest arrives.
                self.partial.extend_from_slice(input);
            }
            input.clear();
            return r;
        }
        self.partial.extend_from_slice(input);
        input.clear();
        let mut buf = std::mem::take(&mut self.partial);
        let r = self.frames(&mut buf, out);
        if r.is_ok() && !buf.is_empty() {
            self.partial = buf;
        } else if buf.capacity() <= WS_PARTIAL_KEEP_MAX {
            // Emptied: its allocation is reused for the next partial frame.
            buf.clear();
            self.partial = buf;
        }
        r
    }

    fn frames(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<(), WsEnd> {
        let mut pos = 0;
        let r = loop {
            let b = &buf[pos..];
            if b.is_empty() {
                break Ok(());
            }
            if !self.in_fragment && self.fragment.is_none() && !self.closed {
                if let Some((hl, len, mask)) = fast_header(b) {
                    if len <= self.max_frame {
                        if b.len() < hl + len {
                            break Ok(());
                        }
                        unmask_into(&mut self.stream, &b[hl..hl + len], mask);
                        pos += hl + len;
                        continue;
                    }
                }
            }
            // Anything else goes to tungstenite, one whole frame at a time
            // (or all that is there when the header already condemns it).
            let mut cur = std::io::Cursor::new(b);
            let (h, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(x)) => x,
                Ok(None) => break Ok(()),
                Err(_) => {
                    buf.advance(pos);
                    return self.on_bytes_slow(buf, out);
                }
            };
            let hl = cur.position() as usize;
            if len > self.max_frame as u64 {
                buf.advance(pos);
                return self.on_bytes_slow(buf, out);
            }
            let total = hl + len as usize;
            if b.len() < total {
                break Ok(());
            }
            // Fragmented binary messages are ours too: their payloads are
            // only more of the byte stream, and keeping them out of
            // tungstenite leaves it no message state (a live upgrade hands
            // a session over between any two frames).
            let plain = !h.rsv1 && !h.rsv2 && !h.rsv3 && !self.closed;
            match (h.opcode, h.mask, self.fragment) {
                (OpCode::Data(Data::Binary), Some(mask), None) if plain && !h.is_final && !self.in_fragment => {
                    unmask_into(&mut self.stream, &b[hl..total], mask);
                    self.fragment = Some(len as usize);
                    pos += total;
                    continue;
                }
                (OpCode::Data(Data::Continue), Some(mask), Some(so_far)) if plain => {
                    if so_far + len as usize > self.max_frame {
                        buf.advance(pos);
                        self.fragment = None;
                        self.close_into(out, CloseCode::Size, "message too large");
                        return Err(WsEnd::Violation(u16::from(CloseCode::Size), "message too large"));
                    }
                    unmask_into(&mut self.stream, &b[hl..total], mask);
                    self.fragment = if h.is_final { None } else { Some(so_far + len as usize) };
                    pos += total;
                    continue;
                }
                (OpCode::Data(_), _, Some(_)) => {
                    buf.advance(pos);
                    self.fragment = None;
                    self.close_into(out, CloseCode::Protocol, "protocol error");
                    return Err(WsEnd::Violation(u16::from(CloseCode::Protocol), "protocol error"));
                }
                _ => {}
            }
            if let OpCode::Data(_) = h.opcode {
                self.in_fragment = !h.is_final;
            }
            buf.advance(pos);
            pos = 0;
            let mut one = buf.split_to(total);
            self.on_bytes_slow(&mut one, out)?;
        };
        buf.advance(pos);
        r
    }

    /// Feeds `input` (all of it) to tungstenite; binary payloads are appended
    /// to `self.stream`, control replies and close frames to `out`.
    fn on_bytes_slow(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), WsEnd> {
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
    if len < 126 {
        out.put_slice(&[0x82, len as u8]);
    } else if len <= u16::MAX as usize {
        out.put_slice(&[0x82, 126]);
        out.put_u16(len as u16);
    } else {
        out.put_slice(&[0x82, 127]);
        out.put_u64(len as u64);
    }
}

/// The header of a final, masked binary frame without extension bits and
/// under 64 KiB at the front of `b`: (header length, payload length, mask).
/// `None` for any other frame, or a header not complete yet.
#[inline]
fn fast_header(b: &[u8]) -> Option<(usize, usize, [u8; 4])> {
    if b.len() < 6 || b[0] != 0x82 || b[1] & 0x80 == 0 {
        return None;
    }
    let (hl, len) = match b[1] & 0x7f {
        127 => return None,
        126 if b.len() < 8 => return None,
        126 => (8, u16::from_be_bytes([b[2], b[3]]) as usize),
        n => (6, n as usize),
    };
    Some((hl, len, [b[hl - 4], b[hl - 3], b[hl - 2], b[hl - 1]]))
}

/// Appends `src` unmasked with `mask` to `dst`, eight bytes at a time.
#[inline]
fn unmask_into(dst: &mut BytesMut, src: &[u8], mask: [u8; 4]) {
    let start = dst.len();
    dst.extend_from_slice(src);
    let m = u32::from_ne_bytes(mask) as u64;
    let m8 = m | (m << 32);
    let mut words = dst[start..].chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes((&*w).try_into().unwrap()) ^ m8;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
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

    /// Binary frames (fast path), fragmented messages and pings (tungstenite)
    /// give the same stream and the same pongs however the bytes are cut.
    #[test]
    fn any_chunking_gives_the_same_stream() {
        let mut all = Vec::new();
        let mut expect = Vec::new();
        for i in 0..40u8 {
            let p: Vec<u8> = (0..(i as usize * 7 % 200)).map(|j| j as u8 ^ i).collect();
            match i % 5 {
                0 => all.extend(client_frame(0x9, &[i], true)),
                1 => {
                    // Fragmented: binary without FIN, then a final continuation.
                    let (a, b) = p.split_at(p.len() / 2);
                    let mut f = client_frame(0x2, a, true);
                    f[0] &= 0x7f;
                    all.extend(f);
                    all.extend(client_frame(0x9, &[i], true));
                    all.extend(client_frame(0x0, b, true));
                    expect.extend_from_slice(&p);
                }
                _ => {
                    all.extend(client_frame(0x2, &p, true));
                    expect.extend_from_slice(&p);
                }
            }
        }
        let mut outs = Vec::new();
        for step in [1usize, 2, 3, 7, 13, 64, 199, 4096] {
            let mut ws = WsState::new(1024);
            let mut out = BytesMut::new();
            for c in all.chunks(step) {
                let mut input = BytesMut::from(c);
                ws.on_bytes(&mut input, &mut out).unwrap();
                assert!(input.is_empty());
            }
            assert_eq!(&ws.stream[..], &expect[..], "chunks of {step}");
            outs.push(out);
        }
        assert!(outs.windows(2).all(|w| w[0] == w[1]), "pongs depend on chunking");
    }

    fn frag(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = client_frame(opcode, payload, true);
        if !fin {
            v[0] &= 0x7f;
        }
        v
    }

    #[test]
    fn fragmented_binary_messages_join_the_stream_with_pings_between() {
        let mut bytes = frag(0x2, false, b"ab");
        bytes.extend(frag(0x9, true, b"p"));
        bytes.extend(frag(0x0, false, b"cd"));
        bytes.extend(frag(0x0, true, b"e"));
        bytes.extend(frag(0x2, true, b"f"));
        // Fed in every split: the same stream, one pong.
        for cut in 0..bytes.len() {
            let mut ws = WsState::new(1024);
            let mut out = BytesMut::new();
            ws.on_bytes(&mut BytesMut::from(&bytes[..cut]), &mut out).unwrap();
            // A live upgrade may move the session between any two reads.
            let mut ws = WsState::restore(ws.snapshot());
            ws.on_bytes(&mut BytesMut::from(&bytes[cut..]), &mut out).unwrap();
            assert_eq!(&ws.stream[..], b"abcdef", "cut at {cut}");
            assert_eq!(&out[..], &[0x8a, 1, b'p'], "cut at {cut}");
        }
    }

    #[test]
    fn fragment_violations_close() {
        // A new data frame while a fragmented message is open.
        let mut bytes = frag(0x2, false, b"ab");
        bytes.extend(frag(0x2, true, b"c"));
        let mut ws = WsState::new(1024);
        let mut out = BytesMut::new();
        let end = ws.on_bytes(&mut BytesMut::from(&bytes[..]), &mut out).unwrap_err();
        assert!(matches!(end, WsEnd::Violation(1002, _)), "{end:?}");
        // A message whose fragments add up to more than the limit.
        let mut bytes = frag(0x2, false, &[0u8; 100]);
        bytes.extend(frag(0x0, true, &[0u8; 100]));
        let mut ws = WsState::new(150);
        let mut out = BytesMut::new();
        let end = ws.on_bytes(&mut BytesMut::from(&bytes[..]), &mut out).unwrap_err();
        assert!(matches!(end, WsEnd::Violation(1009, _)), "{end:?}");
    }

    #[test]
    fn outgoing_header() {
        let mut out = BytesMut::new();
        put_binary_header(&mut out, 5);
        assert_eq!(&out[..], &[0x82, 5]);
        // The same bytes as tungstenite's header, at every length class.
        for len in [0usize, 125, 126, 65_535, 65_536, 70_000] {
            out.clear();
            put_binary_header(&mut out, len);
            let mut t = Vec::new();
            let h = FrameHeader { is_final: true, opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
            h.format(len as u64, &mut t).unwrap();
            assert_eq!(&out[..], &t[..], "{len}");
        }
    }

    #[test]
    fn unmasking_matches_bytewise() {
        for n in 0..40 {
            let src: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut dst = BytesMut::from(&b"x"[..]);
            unmask_into(&mut dst, &src, mask);
            let want: Vec<u8> = src.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(&dst[1..], &want[..]);
        }
    }
}
