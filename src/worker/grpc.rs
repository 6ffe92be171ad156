//! gRPC backend streams (the Go gateway's streaming mode) on the worker's own
//! reactor: HTTP/2 by the `h2` crate over monoio's tokio-I/O compatibility
//! wrapper, so no second runtime and no cross-core hop.
//!
//! One task owns the HTTP/2 connection (it reads and writes the socket); the
//! stream's writer task moves the shard's queue (already gRPC-framed
//! `GamePacket`s) into DATA frames within the flow-control window; its reader
//! task hands received DATA to the shard and returns the window; a keep-alive
//! task sends HTTP/2 PINGs every `backend.keepalive_interval` and declares
//! the stream dead when one is not acknowledged within
//! `backend.keepalive_timeout`. The end of the response (trailers, reset,
//! connection error) is a loss: the shard closes or unbinds the sessions and
//! a later bind redials with backoff.

use super::backend::ConnIo;
use super::sys::{HalfGuard, SocketShutdown};
use super::Worker;
use crate::protocol::grpc::METHOD_PATH;
use crate::shard::{BackendOut, BackendRead, ConnId, LossKind};
use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Flow-control window we grant the server, per stream and per connection:
/// large enough that replies for a worker's sessions never wait on it.
const WINDOW: u32 = 4 << 20;
/// Longest a retired or stopping stream waits for the server to end the call
/// after we ended our side.
pub(super) const GRACEFUL_CLOSE: Duration = Duration::from_secs(2);

pub(super) async fn run(
    w: Rc<Worker>,
    io: Rc<ConnIo>,
    conn: ConnId,
    addr: SocketAddr,
    dial_timeout: Duration,
    gateway_name: Rc<str>,
) {
    let generation = io.generation;
    let lost = |w: &Rc<Worker>, kind: LossKind, err: &dyn std::fmt::Display| {
        w.with_shard(|sh| sh.backend_lost(conn, generation, kind, err, Instant::now()))
    };
    let start = Instant::now();
    let tcp = match monoio::time::timeout(dial_timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return lost(&w, LossKind::DialFailed, &e),
        Err(_) => return lost(&w, LossKind::DialTimeout, &format_args!("no answer within {dial_timeout:?}")),
    };
    let _ = tcp.set_nodelay(true);
    let sock = SocketShutdown::single(&tcp);
    let handshake = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, Bytes>(monoio_compat::StreamWrapper::new(tcp));
    let (client, mut connection) = match monoio::time::timeout(dial_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return lost(&w, LossKind::DialFailed, &format_args!("HTTP/2 handshake: {e}")),
        Err(_) => return lost(&w, LossKind::DialTimeout, &format_args!("no HTTP/2 handshake within {dial_timeout:?}")),
    };
    let ping = connection.ping_pong();
    *io.sock.borrow_mut() = Some(sock.clone());
    {
        // The connection task owns the socket; its end (error or close) fails
        // the stream, which the reader reports.
        let guard = HalfGuard(sock);
        monoio::spawn(async move {
            let _owner = guard;
            let _ = connection.await;
        });
    }
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{METHOD_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "game-gateway")
        .header("gateway-name", &*gateway_name)
        .body(());
    let request = match request {
        Ok(r) => r,
        Err(e) => return lost(&w, LossKind::DialFailed, &e),
    };
    let mut client = match client.ready().await {
        Ok(c) => c,
        Err(e) => return lost(&w, LossKind::DialFailed, &format_args!("HTTP/2 not ready: {e}")),
    };
    let (response, mut send) = match client.send_request(request, false) {
        Ok(pair) => pair,
        Err(e) => return lost(&w, LossKind::DialFailed, &format_args!("StreamPackets call: {e}")),
    };
    if !w.with_shard(|sh| sh.backend_connected(conn, generation, start.elapsed(), Instant::now())) {
        send.send_reset(h2::Reason::CANCEL);
        io.close();
        return;
    }
    io.self_finishing.set(true);
    monoio::spawn(read_loop(w.clone(), io.clone(), conn, generation, response));
    if let Some(ping) = ping {
        monoio::spawn(keepalive(w.clone(), conn, generation, ping));
    }
    let mut buf = BytesMut::new();
    let mut done = None;
    loop {
        match w.with_shard(|sh| sh.take_backend_out(conn, generation, &mut buf, done.take())) {
            BackendOut::Stale => {
                // Lost: the socket is already shut. Retired or stopping: end
                // the call so HTTP/2 flushes what it buffered, give the server
                // a bounded moment to answer with its trailers, then close.
                if send.send_data(Bytes::new(), true).is_ok() {
                    let deadline = Instant::now() + GRACEFUL_CLOSE;
                    while !io.reader_done.get() && Instant::now() < deadline {
                        let _ = monoio::time::timeout(Duration::from_millis(20), io.wake.notified()).await;
                    }
                }
                io.close();
                if io.closing_gracefully.get() {
                    w.finishing.set(w.finishing.get().saturating_sub(1));
                }
                return;
            }
            BackendOut::Empty => io.wake.notified().await,
            BackendOut::Write(write) => {
                let mut data = std::mem::take(&mut buf).freeze();
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(0)) => continue,
                        Some(Ok(n)) => {
                            let chunk = data.split_to(n.min(data.len()));
                            if let Err(e) = send.send_data(chunk, false) {
                                let frames = write.frames;
                                return w.with_shard(|sh| {
                                    sh.backend_write_failed(conn, generation, frames, &e, Instant::now())
                                });
                            }
                        }
                        Some(Err(e)) => {
                            let frames = write.frames;
                            return w.with_shard(|sh| {
                                sh.backend_write_failed(conn, generation, frames, &e, Instant::now())
                            });
                        }
                        None => {
                            let frames = write.frames;
                            let e = "the server ended the stream";
                            return w.with_shard(|sh| {
                                sh.backend_write_failed(conn, generation, frames, &e, Instant::now())
                            });
                        }
                    }
                }
                done = Some((write, Instant::now()));
            }
        }
    }
}

/// Marks the reader's end for a writer that waits on it.
struct ReaderDone(Rc<ConnIo>);

impl Drop for ReaderDone {
    fn drop(&mut self) {
        self.0.reader_done.set(true);
        self.0.wake.notify();
    }
}

async fn read_loop(w: Rc<Worker>, io: Rc<ConnIo>, conn: ConnId, generation: u64, response: h2::client::ResponseFuture) {
    let _done = ReaderDone(io);
    let lost = |w: &Rc<Worker>, kind: LossKind, err: &dyn std::fmt::Display| {
        w.with_shard(|sh| sh.backend_lost(conn, generation, kind, err, Instant::now()))
    };
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return lost(&w, LossKind::ReadFailed, &format_args!("StreamPackets response: {e}")),
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return lost(&w, LossKind::ProtocolError, &format_args!("StreamPackets answered HTTP {}", parts.status));
    }
    if let Some(status) = parts.headers.get("grpc-status") {
        // A trailers-only response: the call ended before any message.
        let msg = parts.headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
        return lost(
            &w,
            LossKind::ClosedByBackend,
            &format_args!("call ended: grpc-status {} {msg}", status.to_str().unwrap_or("?")),
        );
    }
    // Answered: the breaker counts the backend as well from here.
    w.with_shard(|sh| sh.backend_confirmed(conn, generation));
    let mut buf = BytesMut::with_capacity(super::backend::BACKEND_READ_BUF);
    loop {
        let chunk = match body.data().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return lost(&w, LossKind::ReadFailed, &e),
            None => {
                let trailers = body.trailers().await.ok().flatten();
                let status = trailers
                    .as_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|s| s.to_str().ok())
                    .unwrap_or("none")
                    .to_string();
                return lost(&w, LossKind::ClosedByBackend, &format_args!("call ended: grpc-status {status}"));
            }
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        let mut read = chunk.len();
        loop {
            match w.with_shard(|sh| sh.backend_data(conn, generation, &mut buf, read, Instant::now())) {
                BackendRead::Continue => break,
                BackendRead::Stop => return,
                BackendRead::Yield => {
                    read = 0;
                    crate::notify::yield_now().await;
                }
            }
        }
    }
}

/// HTTP/2 PINGs while the stream lives (allowed without active calls too).
async fn keepalive(w: Rc<Worker>, conn: ConnId, generation: u64, mut ping: h2::PingPong) {
    loop {
        let (interval, timeout) = {
            let cfg = w.shard.borrow().config_backend_keepalive();
            (cfg.0, cfg.1)
        };
        if interval.is_zero() {
            // Off for now (a reload may turn it on): keep watching the stream.
            monoio::time::sleep(super::SWEEP_EVERY).await;
            if !w.shard.borrow().backend_live(conn, generation) {
                return;
            }
            continue;
        }
        monoio::time::sleep(interval).await;
        if !w.shard.borrow().backend_live(conn, generation) {
            return;
        }
        match monoio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                return w.with_shard(|sh| sh.backend_lost(conn, generation, LossKind::ReadFailed, &e, Instant::now()));
            }
            Err(_) => {
                let e = format!("no HTTP/2 PING ack within {timeout:?}");
                return w.with_shard(|sh| {
                    sh.backend_lost(conn, generation, LossKind::KeepaliveTimeout, &e, Instant::now())
                });
            }
        }
    }
}
