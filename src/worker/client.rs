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
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use std::time::{Duration, Instant};

/// A session's own buffer grows by this much at a time (it holds only a
/// frame not yet complete, or frames waiting for queue room).
pub(crate) const READ_BUF_INITIAL: usize = 2048;
/// The writer's buffer is released when it grew past this (by a burst), so
/// an idle session never pins a large one.
pub(crate) const READ_BUF_KEEP_MAX: usize = 16 * 1024;
/// The worker's read buffer: every session's reads land here first.
pub(crate) const WORKER_READ_BUF: usize = 64 * 1024;
/// A read is given at least this much room.
const READ_MIN_FREE: usize = 512;
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
    let _ = stream.set_nodelay(true);
    // Readiness mode: the socket is polled for readiness and read into the
    // worker's buffer, so an idle session holds no read buffer and no I/O
    // operation owns memory of its own while it waits.
    let stream = match stream.try_into_poll_io() {
        Ok(s) => s,
        Err((e, _)) => {
            // Counted with the accept errors; dropping closes it.
            w.with_shard(|sh| sh.accept_failed(&e, Instant::now()));
            return;
        }
    };
    let Ok(key) = w.with_shard(|sh| sh.accept(peer, Instant::now())) else {
        // Refused (counted and logged by the shard): dropping closes it.
        return;
    };
    let io = Rc::new(ClientIo {
        key,
        wake: Notify::new(),
        sock: SocketShutdown::new(&stream),
        tail: RefCell::new(None),
        resume: Notify::new(),
        fin: std::cell::Cell::new(false),
    });
    w.insert_client(io.clone());
    let sock = Rc::new(RefCell::new(stream));
    monoio::spawn(write_loop(w.clone(), io.clone(), sock.clone()));
    monoio::spawn(read_loop(w.clone(), io, sock));
}

/// Where a read lands: the session's own buffer, or the worker's.
enum ReadInto<'a> {
    Own(&'a mut BytesMut),
    /// Borrowed inside each poll only: while this session waits, others
    /// read into it too.
    Worker(&'a RefCell<BytesMut>),
}

/// Waits until the socket has bytes (or its end), then reads what it has.
/// The socket (shared with the session's writer) and the worker's buffer
/// are borrowed only inside each poll, never across a wait.
async fn read_into(sock: &RefCell<TcpStreamPoll>, mut into: ReadInto<'_>) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| match &mut into {
        ReadInto::Own(buf) => poll_read_buf(sock, buf, READ_BUF_INITIAL, cx),
        ReadInto::Worker(cell) => {
            let mut buf = cell.borrow_mut();
            debug_assert!(buf.is_empty(), "the worker's read buffer is emptied after every read");
            poll_read_buf(sock, &mut buf, WORKER_READ_BUF, cx)
        }
    })
    .await
}

/// One readiness-mode read into `buf`'s spare capacity (grown by `grow`
/// when less than a minimum is free).
fn poll_read_buf(
    sock: &RefCell<TcpStreamPoll>,
    buf: &mut BytesMut,
    grow: usize,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_MIN_FREE {
        buf.reserve(grow);
    }
    let mut rb = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
    match Pin::new(&mut *sock.borrow_mut()).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            // SAFETY: `poll_read` filled (initialized) the first `n` bytes of
            // the spare capacity `rb` was made from.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes all of `buf` (waiting for room in the socket as needed).
async fn write_all(sock: &RefCell<TcpStreamPoll>, buf: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *sock.borrow_mut()).poll_write(cx, &buf[off..])).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    Ok(())
}

/// Half-closes the sending direction (FIN).
async fn shutdown_write(sock: &RefCell<TcpStreamPoll>) {
    let _ = std::future::poll_fn(|cx| Pin::new(&mut *sock.borrow_mut()).poll_shutdown(cx)).await;
}

async fn read_loop(w: Rc<Worker>, io: Rc<ClientIo>, sock: Rc<RefCell<TcpStreamPoll>>) {
    let key = io.key;
    let _half = HalfGuard(io.sock.clone());
    // The session's own bytes: a frame not yet complete, or frames waiting
    // for room in their backend queue. Empty (no allocation) most of the
    // time; while it is, reads go to the worker's buffer.
    let mut partial = BytesMut::new();
    loop {
        let own = !partial.is_empty();
        // Into the worker's buffer when this session holds nothing: when
        // the read completes nothing else has run, and what was read is
        // processed below before this task waits again.
        let into = if own { ReadInto::Own(&mut partial) } else { ReadInto::Worker(&w.read_buf) };
        let res = read_into(&sock, into).await;
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
        let flow = if own {
            w.with_shard(|sh| sh.client_data(key, &mut partial, n, Instant::now()))
        } else {
            let mut wb = w.read_buf.borrow_mut();
            let flow = w.with_shard(|sh| sh.client_data(key, &mut wb, n, Instant::now()));
            // What the shard left (a partial frame, or frames waiting for
            // queue room) is the session's own from here on.
            if !wb.is_empty() {
                partial.extend_from_slice(&wb);
            }
            wb.clear();
            flow
        };
        let mut flow = flow;
        loop {
            match flow {
                Ok(Flow::Read) => break,
                // Backpressure: read nothing more until the backend queue
                // this session waits on has room.
                Ok(Flow::Paused) => {
                    io.resume.notified().await;
                    flow = w.with_shard(|sh| sh.client_data(key, &mut partial, 0, Instant::now()));
                }
                Err(_) => {
                    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
                    return;
                }
            }
        }
        if partial.is_empty() && partial.capacity() > 0 {
            // Idle again: give the memory back.
            partial = BytesMut::new();
        }
    }
    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
}

async fn write_loop(w: Rc<Worker>, io: Rc<ClientIo>, sock: Rc<RefCell<TcpStreamPoll>>) {
    let key = io.key;
    let _half = HalfGuard(io.sock.clone());
    let mut buf = BytesMut::new();
    let mut done = None;
    let mut fin_sent = false;
    loop {
        let out = w.with_shard(|sh| sh.take_client_out(key, &mut buf, done.take()));
        match out {
            ClientOut::Write(write) => {
                let res = write_all(&sock, &buf).await;
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
                buf.clear();
                if buf.capacity() > READ_BUF_KEEP_MAX {
                    buf = BytesMut::new();
                }
            }
            ClientOut::Empty => {
                if io.fin.get() && !fin_sent {
                    // Drain: everything queued is written; half-close.
                    fin_sent = true;
                    shutdown_write(&sock).await;
                    continue;
                }
                io.wake.notified().await
            }
            ClientOut::Gone => {
                let tail = io.tail.borrow_mut().take();
                match tail {
                    Some(tail) => {
                        if !tail.is_empty() && !fin_sent {
                            let _ = write_all(&sock, &tail).await;
                        }
                        break;
                    }
                    None => io.wake.notified().await,
                }
            }
        }
    }
    w.remove_client(key);
    shutdown_write(&sock).await;
}
