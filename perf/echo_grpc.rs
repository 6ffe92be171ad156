//! `gw-echo --mode grpc`: a `gateway.GameGatewayService/StreamPackets`
//! server (proto/gateway.proto) on the echo's monoio thread, HTTP/2 by the
//! `h2` crate over monoio-compat's `StreamWrapper` (the same approach as the
//! gateway's client, src/worker/grpc.rs).
//!
//! Per call: HTTP 200 with `content-type: application/grpc`, then every data
//! packet is echoed (same session_id, msg_id, payload, no metadata).
//! Lifecycle packets (`packet_type` connect / disconnect) get no answer; a
//! `ping` gets a `pong`. Replies to everything that has already arrived are
//! coalesced into one DATA frame. When the client ends its side of the call
//! the server ends its own with the trailers `grpc-status: 0`. Received DATA
//! is released to flow control as it is read.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use std::collections::HashMap;
use std::future::poll_fn;
use std::task::Poll;

/// The full method path of the streaming call.
const METHOD_PATH: &str = "/gateway.GameGatewayService/StreamPackets";
/// Compressed flag and big-endian length before each message.
const PREFIX: usize = 5;
/// Largest message accepted.
const MAX_MESSAGE: usize = 4 << 20;
/// Flow-control window granted to the client, per stream and connection.
const WINDOW: u32 = 4 << 20;
/// StreamWrapper's socket buffers.
const IO_BUF: usize = 64 * 1024;

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

/// One HTTP/2 connection: accepts calls until the client goes away.
pub async fn serve(tcp: monoio::net::TcpStream) {
    let io = monoio_compat::StreamWrapper::new_with_buffer_size(tcp, IO_BUF, IO_BUF);
    let handshake = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(io);
    let mut conn = match handshake.await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gw-echo grpc: HTTP/2 handshake: {e}");
            return;
        }
    };
    // Polling accept drives the connection (reads and writes the socket), so
    // this loop runs for the connection's life; each call gets its own task.
    while let Some(r) = conn.accept().await {
        match r {
            Ok((req, respond)) => {
                monoio::spawn(call(req, respond));
            }
            Err(e) => {
                if !e.is_io() && !e.is_go_away() {
                    eprintln!("gw-echo grpc: connection: {e}");
                }
                return;
            }
        }
    }
}

fn grpc_response() -> http::Response<()> {
    http::Response::builder().status(200).header("content-type", "application/grpc").body(()).expect("static response")
}

fn status_trailers(code: u32, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(v) = http::HeaderValue::from_str(message) {
            t.insert("grpc-message", v);
        }
    }
    t
}

/// What the next step of a call is.
enum Step {
    Data(Bytes),
    /// Nothing more has arrived yet and replies are waiting: send them.
    Flush,
    End,
    Failed,
}

async fn call(req: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    if req.uri().path() != METHOD_PATH {
        // Trailers-only answer: UNIMPLEMENTED.
        let mut rsp = grpc_response();
        rsp.headers_mut().insert("grpc-status", http::HeaderValue::from(12u32));
        let _ = respond.send_response(rsp, true);
        return;
    }
    let mut body = req.into_body();
    let mut send = match respond.send_response(grpc_response(), false) {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        let step = poll_fn(|cx| match body.poll_data(cx) {
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Step::Data(chunk)),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Step::Failed),
            Poll::Ready(None) => Poll::Ready(Step::End),
            Poll::Pending if !out.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match step {
            Step::Data(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                inbuf.extend_from_slice(&chunk);
                if let Err(e) = on_messages(&mut inbuf, &mut out) {
                    let _ = send.send_trailers(status_trailers(13, &e));
                    return;
                }
            }
            Step::Flush => {
                if !flush(&mut send, &mut out).await {
                    return;
                }
            }
            Step::End => {
                if !out.is_empty() && !flush(&mut send, &mut out).await {
                    return;
                }
                let _ = send.send_trailers(status_trailers(0, ""));
                return;
            }
            Step::Failed => return,
        }
    }
}

/// Answers every complete message at the front of `inbuf` into `out`.
fn on_messages(inbuf: &mut BytesMut, out: &mut BytesMut) -> Result<(), String> {
    while inbuf.len() >= PREFIX {
        if inbuf[0] != 0 {
            return Err("compressed messages are not supported".into());
        }
        let len = u32::from_be_bytes([inbuf[1], inbuf[2], inbuf[3], inbuf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(format!("message of {len} bytes is over the limit"));
        }
        if inbuf.len() < PREFIX + len {
            break;
        }
        inbuf.advance(PREFIX);
        let msg = inbuf.split_to(len).freeze();
        let p = GamePacket::decode(msg).map_err(|e| format!("GamePacket does not decode: {e}"))?;
        let reply = match p.metadata.get("packet_type").map(String::as_str) {
            Some("connect" | "disconnect") => continue,
            Some("ping") => {
                let mut metadata = HashMap::with_capacity(1);
                metadata.insert("packet_type".to_string(), "pong".to_string());
                GamePacket { session_id: p.session_id, metadata, ..Default::default() }
            }
            _ => GamePacket { session_id: p.session_id, msg_id: p.msg_id, payload: p.payload, ..Default::default() },
        };
        let n = reply.encoded_len();
        out.reserve(PREFIX + n);
        out.put_u8(0);
        out.put_u32(n as u32);
        let _ = reply.encode(out);
    }
    Ok(())
}

/// Sends `out` as DATA within the stream's flow-control capacity; `false`
/// when the stream is gone.
async fn flush(send: &mut h2::SendStream<Bytes>, out: &mut BytesMut) -> bool {
    let mut data = out.split().freeze();
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let chunk = data.split_to(n.min(data.len()));
                if send.send_data(chunk, false).is_err() {
                    return false;
                }
            }
            Some(Err(_)) | None => return false,
        }
    }
    true
}
