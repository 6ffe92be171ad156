//! Client sockets: accept, and each session's reader and writer tasks.
//!
//! The reader feeds bytes to the shard and ends the session when the socket
//! ends or the shard says so; the writer writes whatever the shard queued for
//! the session, one write per wake-up, and after the close writes the tail
//! (last replies, a WebSocket close frame), half-closes and exits.
//!
//! Ownership: the accept loop alone owns the listener and drops it when the
//! drain begins. A session's socket is split between its reader (read half)
//! and writer (write half); [`ClientIo::sock`] lets the shard's
//! `ShutdownClient` actions reach it while either half is alive. The writer
//! removes the session's [`ClientIo`] when it exits, which is always after
//! the reader has reported the close.

use super::sys::{HalfGuard, SocketShutdown};
use super::Worker;
use crate::notify::Notify;
use crate::shard::{ClientOut, Flow, HalfClose, SessionKey};
use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Initial read buffer per session: a few small game frames.
pub(crate) const READ_BUF_INITIAL: usize = 2048;
/// Buffers grown past this (by a large frame) are released once empty, so an
/// idle session never pins a 64 KiB buffer.
pub(crate) const READ_BUF_KEEP_MAX: usize = 16 * 1024;
/// Pause after an accept failed for lack of descriptors or memory, instead of
/// spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The driver's handles on one session's socket.
pub(crate) struct ClientIo {
    /// Which session holds the slot (slots are reused).
    pub(super) key: SessionKey,
    /// Wakes the writer: bytes queued, or the session closed.
    pub(super) wake: Notify,
    pub(super) sock: Rc<SocketShutdown>,
    /// Set by `Action::Closed`: what is left to write before the FIN.
    pub(super) tail: RefCell<Option<BytesMut>>,
    /// Wakes a reader paused by backpressure.
    pub(super) resume: Notify,
    /// Drain: half-close (FIN) once the queue is written.
    pub(super) fin: std::cell::Cell<bool>,
}

pub(super) async fn accept_loop(w: Rc<Worker>, listener: TcpListener) {
    loop {
        monoio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => on_accept(&w, stream, peer),
                Err(e) => {
                    w.with_shard(|sh| sh.accept_failed(&e, Instant::now()));
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                    ) {
                        monoio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
            _ = w.stop_accept.notified() => break,
        }
    }
    // Dropping the listener closes it: the kernel stops routing new
    // connections to this worker.
    drop(listener);
}

fn on_accept(w: &Rc<Worker>, stream: TcpStream, peer: SocketAddr) {
    let Ok(key) = w.with_shard(|sh| sh.accept(peer, Instant::now())) else {
        // Refused (counted and logged by the shard): dropping closes it.
        return;
    };
    let _ = stream.set_nodelay(true);
    let io = Rc::new(ClientIo {
        key,
        wake: Notify::new(),
        sock: SocketShutdown::new(&stream),
        tail: RefCell::new(None),
        resume: Notify::new(),
        fin: std::cell::Cell::new(false),
    });
    w.insert_client(io.clone());
    let (rd, wr) = stream.into_split();
    monoio::spawn(write_loop(w.clone(), io.clone(), wr));
    monoio::spawn(read_loop(w.clone(), io, rd));
}

async fn read_loop<R: AsyncReadRent>(w: Rc<Worker>, io: Rc<ClientIo>, rd: R) {
    let key = io.key;
    let _half = HalfGuard(io.sock.clone());
    let mut rd = rd;
    let mut buf = BytesMut::with_capacity(READ_BUF_INITIAL);
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUF_INITIAL);
        }
        // monoio reads at the start of the buffer it is given, so hand it
        // the spare capacity only.
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        let n = match res {
            Ok(0) => {
                // Half-close: a reply still on its way is delivered first.
                while let HalfClose::Linger(wait) = w.with_shard(|sh| sh.client_eof(key, Instant::now())) {
                    monoio::time::sleep(wait).await;
                }
                break;
            }
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(session_id = key.id, error = %e, "client read failed");
                break;
            }
        };
        let mut read = n;
        loop {
            match w.with_shard(|sh| sh.client_data(key, &mut buf, read, Instant::now())) {
                Ok(Flow::Read) => break,
                // Backpressure: read nothing more until the backend queue
                // this session waits on has room.
                Ok(Flow::Paused) => {
                    io.resume.notified().await;
                    read = 0;
                }
                Err(_) => {
                    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
                    return;
                }
            }
        }
        if buf.is_empty() && buf.capacity() > READ_BUF_KEEP_MAX {
            buf = BytesMut::with_capacity(READ_BUF_INITIAL);
        }
    }
    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
}

async fn write_loop<W: AsyncWriteRent>(w: Rc<Worker>, io: Rc<ClientIo>, wr: W) {
    let key = io.key;
    let _half = HalfGuard(io.sock.clone());
    let mut wr = wr;
    let mut buf = BytesMut::new();
    let mut done = None;
    let mut fin_sent = false;
    loop {
        let out = w.with_shard(|sh| sh.take_client_out(key, &mut buf, done.take()));
        match out {
            ClientOut::Write(write) => {
                let (res, b) = wr.write_all(std::mem::take(&mut buf)).await;
                if let Err(e) = res {
                    w.with_shard(|sh| sh.client_write_failed(key, &e));
                    // Wait for the reader to run the close, then exit.
                    while io.tail.borrow().is_none() {
                        io.wake.notified().await;
                    }
                    w.remove_client(key);
                    return;
                }
                done = Some((write, Instant::now()));
                buf = b;
                buf.clear();
                if buf.capacity() > READ_BUF_KEEP_MAX {
                    buf = BytesMut::new();
                }
            }
            ClientOut::Empty => {
                if io.fin.get() && !fin_sent {
                    // Drain: everything queued is written; half-close.
                    fin_sent = true;
                    let _ = wr.shutdown().await;
                    continue;
                }
                io.wake.notified().await
            }
            ClientOut::Gone => {
                let tail = io.tail.borrow_mut().take();
                match tail {
                    Some(tail) => {
                        if !tail.is_empty() && !fin_sent {
                            let _ = wr.write_all(tail).await;
                        }
                        break;
                    }
                    None => io.wake.notified().await,
                }
            }
        }
    }
    w.remove_client(key);
    let _ = wr.shutdown().await;
}
