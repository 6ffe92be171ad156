//! `gw-echo --mode ws`: a WebSocket echo server, the backend behind a
//! WebSocket-proxying nginx (and the "direct" WebSocket baseline).
//!
//! The upgrade request is parsed with httparse and answered with
//! tungstenite's accept key; after that tungstenite's sans-IO
//! `WebSocketContext` does the framing (unmasking, fragments, ping/pong, the
//! close handshake), fed from the connection's read buffer through an
//! in-memory pipe. Every binary message is sent back unchanged as one binary
//! message (server frames are unmasked); the replies to one read go out in
//! one write. Text messages are echoed as text.

use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use std::io::{Read, Write};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// Read size per connection.
const CHUNK: usize = 16 * 1024;
/// Largest upgrade request head.
const MAX_HEAD: usize = 8 * 1024;

/// Moves bytes between the connection buffers and tungstenite.
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

/// The 101 response to a valid upgrade request at the front of `buf`, and
/// the length of that request; `Ok(None)` while incomplete.
pub fn upgrade(buf: &[u8]) -> Result<Option<(String, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("request head too large".into()),
        Err(e) => return Err(format!("bad request: {e}")),
    };
    let header = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if !header("Upgrade").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("websocket"))) {
        return Err("not a websocket upgrade".into());
    }
    let key = header("Sec-WebSocket-Key").map(str::trim).filter(|k| !k.is_empty()).ok_or("no Sec-WebSocket-Key")?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok(Some((
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
        len,
    )))
}

/// Reads more into `buf`; `false` on end of stream or error.
async fn fill(s: &mut monoio::net::TcpStream, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < CHUNK / 4 {
        buf.reserve(CHUNK);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (r, b) = s.read(std::mem::take(buf).slice_mut(len..cap)).await;
    *buf = b.into_inner();
    matches!(r, Ok(n) if n > 0)
}

pub async fn serve(mut s: monoio::net::TcpStream) {
    let mut inbuf = BytesMut::with_capacity(CHUNK);
    // The upgrade.
    let response = loop {
        if !fill(&mut s, &mut inbuf).await {
            return;
        }
        match upgrade(&inbuf) {
            Ok(Some((response, len))) => {
                inbuf.advance(len);
                break response;
            }
            Ok(None) => continue,
            Err(e) => {
                eprintln!("gw-echo ws: {e}; closing");
                let _ = s
                    .write_all(&b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"[..])
                    .await;
                return;
            }
        }
    };
    let (r, _) = s.write_all(response.into_bytes()).await;
    if r.is_err() {
        return;
    }
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = CHUNK;
    c.write_buffer_size = 0;
    let mut ctx = WebSocketContext::new(Role::Server, Some(c));
    let mut out = BytesMut::with_capacity(CHUNK);
    // Bytes that came with the request head are frames already.
    let mut first = true;
    loop {
        if !first && !fill(&mut s, &mut inbuf).await {
            return;
        }
        first = false;
        let mut done = false;
        {
            let mut pipe = Pipe { input: &mut inbuf, output: &mut out };
            loop {
                let echo = match ctx.read(&mut pipe) {
                    Ok(m @ (Message::Binary(_) | Message::Text(_))) => m,
                    Ok(Message::Close(_)) => {
                        done = true;
                        break;
                    }
                    Ok(_) => continue,
                    Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if !matches!(e, Error::ConnectionClosed | Error::AlreadyClosed) {
                            eprintln!("gw-echo ws: {e}; closing");
                        }
                        done = true;
                        break;
                    }
                };
                if let Err(e) = ctx.write(&mut pipe, echo) {
                    eprintln!("gw-echo ws: write: {e}; closing");
                    done = true;
                    break;
                }
            }
            // Pongs and the reply to a close.
            let _ = ctx.flush(&mut pipe);
        }
        if !out.is_empty() {
            let (r, b) = s.write_all(out).await;
            out = b;
            out.clear();
            if r.is_err() {
                return;
            }
        }
        if done {
            return;
        }
    }
}
