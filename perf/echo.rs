//! gw-echo: echo backends (one monoio thread) for the load runs.
//!
//! - `--mode raw` (default): a raw byte echo, the backend for proxies that
//!   pass bytes through (HAProxy, nginx) and for the direct baseline: every
//!   byte read is written back on the same connection.
//! - `--mode seed_tcp`: a per-session TCP game server as the Go gateway's TCP
//!   mode expects (the gateway's `backend_protocol = "seed_tcp"`): each frame
//!   (20-byte header, 9-byte gate header, payload) is answered with the same
//!   payload and type, server_id 0, and a plain 9-byte gate header.
//! - `--mode grpc`: `gateway.GameGatewayService/StreamPackets` over HTTP/2
//!   (`backend_protocol = "grpc"`): every data packet is echoed on its
//!   stream (same session_id, msg_id, payload); lifecycle packets are not
//!   answered. See `echo_grpc.rs`.
//! - `--mode ws`: a WebSocket echo (RFC 6455, any request path): every binary
//!   message is sent back unchanged as one binary message, the backend behind
//!   a WebSocket-proxying nginx. See `echo_ws.rs`.

use bytes::{Buf, BufMut, BytesMut};
use clap::{Parser, ValueEnum};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

mod echo_grpc;
mod echo_ws;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Mode {
    /// Raw bytes: whatever arrives goes back.
    Raw,
    /// The Go gateway's per-session TCP mode (one connection = one session).
    #[value(name = "seed_tcp")]
    SeedTcp,
    /// gRPC StreamPackets (HTTP/2).
    Grpc,
    /// WebSocket: binary messages echoed unchanged.
    Ws,
}

#[derive(Parser)]
#[command(about = "Echo backends: raw TCP, seed_tcp game frames, gRPC StreamPackets, WebSocket")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:19800")]
    listen: std::net::SocketAddr,
    #[arg(long, value_enum, default_value = "raw")]
    mode: Mode,
    /// seed_tcp: the gateway sends the 24 trace bytes after the gate header
    /// (a route with `trace_propagation = true`); replies never carry them.
    #[arg(long)]
    trace: bool,
}

/// Read size per connection.
const CHUNK: usize = 16 * 1024;

fn main() {
    let a = Args::parse();
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().expect("runtime");
    rt.block_on(async move {
        let l = monoio::net::TcpListener::bind(a.listen).unwrap_or_else(|e| panic!("listen {}: {e}", a.listen));
        println!("gw-echo ({:?}) listening on {}", a.mode, a.listen);
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            match a.mode {
                Mode::Raw => {
                    monoio::spawn(raw(s));
                }
                Mode::SeedTcp => {
                    monoio::spawn(seed(s, a.trace));
                }
                Mode::Grpc => {
                    monoio::spawn(echo_grpc::serve(s));
                }
                Mode::Ws => {
                    monoio::spawn(echo_ws::serve(s));
                }
            }
        }
    });
}

async fn raw(mut s: monoio::net::TcpStream) {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        let cap = buf.capacity();
        let (r, b) = s.read(buf.slice_mut(0..cap)).await;
        buf = b.into_inner();
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (r, b) = s.write_all(buf).await;
        buf = b;
        buf.clear();
        if r.is_err() {
            return;
        }
    }
}

/// The 20-byte server header: i32 length (bytes after it), i32 type, u32
/// server_id, i64 object_id; little-endian.
const SERVER_HEADER: usize = 20;
/// The gate header: u8 opcode (1), i64 session id.
const GATE_HEADER: usize = 9;
const TRACE_LEN: usize = 24;
/// Largest frame accepted (bytes after the server header).
const MAX_FRAME: usize = 1 << 20;

/// One session per connection: every complete frame of a read is answered,
/// the replies of one read go out in one write.
async fn seed(mut s: monoio::net::TcpStream, trace: bool) {
    let gate_in = GATE_HEADER + if trace { TRACE_LEN } else { 0 };
    let mut inbuf = BytesMut::with_capacity(CHUNK);
    let mut out = BytesMut::with_capacity(CHUNK);
    loop {
        if inbuf.capacity() - inbuf.len() < CHUNK / 4 {
            inbuf.reserve(CHUNK);
        }
        let (len, cap) = (inbuf.len(), inbuf.capacity());
        let (r, b) = s.read(inbuf.slice_mut(len..cap)).await;
        inbuf = b.into_inner();
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while inbuf.len() >= SERVER_HEADER {
            let length = i32::from_le_bytes(inbuf[0..4].try_into().unwrap());
            if length < gate_in as i32 || length as usize > MAX_FRAME {
                eprintln!("gw-echo seed_tcp: bad frame length {length}; closing");
                return;
            }
            let total = SERVER_HEADER + length as usize;
            if inbuf.len() < total {
                if inbuf.capacity() < total {
                    inbuf.reserve(total - inbuf.len());
                }
                break;
            }
            let msg_type = i32::from_le_bytes(inbuf[4..8].try_into().unwrap());
            let object_id = i64::from_le_bytes(inbuf[12..20].try_into().unwrap());
            let payload = &inbuf[SERVER_HEADER + gate_in..total];
            out.reserve(SERVER_HEADER + GATE_HEADER + payload.len());
            out.put_i32_le((GATE_HEADER + payload.len()) as i32);
            out.put_i32_le(msg_type);
            out.put_u32_le(0);
            out.put_i64_le(object_id);
            out.put_u8(1);
            out.put_i64_le(object_id);
            out.put_slice(payload);
            inbuf.advance(total);
        }
        if !out.is_empty() {
            let (r, b) = s.write_all(out).await;
            out = b;
            out.clear();
            if r.is_err() {
                return;
            }
        }
    }
}
