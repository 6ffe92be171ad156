//! Backend sockets: each stream's dialer/writer and reader tasks.
//!
//! The shard asks for a dial with `Action::Dial` and names the stream by its
//! slot and generation; these tasks report what happens to it (connected,
//! bytes read, written, lost) and stop as soon as the shard says the
//! generation is over. Ownership: the writer owns the write half and the
//! reader the read half; [`ConnIo::close`] reaches the socket through
//! [`SocketShutdown`] while either half is alive.

use super::sys::{HalfGuard, SocketShutdown};
use super::Worker;
use crate::notify::{yield_now, Notify};
use crate::shard::{BackendOut, BackendRead, ConnId, LossKind, Shut};
use bytes::BytesMut;
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncWriteRent, CancelableAsyncReadRent, Canceller, Splitable};
use monoio::net::TcpStream;
use std::cell::Cell;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Read buffer per backend stream: many sessions' replies arrive here.
pub(crate) const BACKEND_READ_BUF: usize = 64 * 1024;

/// The driver's handles on one backend stream (one generation).
pub(crate) struct ConnIo {
    /// The stream this handle belongs to.
    pub(super) generation: u64,
    /// Wakes the writer: frames queued, or the stream is over.
    pub(super) wake: Notify,
    /// Set once the dial succeeded and the stream was split.
    pub(super) sock: RefCell<Option<Rc<SocketShutdown>>>,
    /// The writer ends the stream itself on a graceful close (HTTP/2: it
    /// sends END_STREAM and waits, bounded, for the server to finish).
    pub(super) self_finishing: std::cell::Cell<bool>,
    /// The stream's reader has ended.
    pub(super) reader_done: std::cell::Cell<bool>,
    /// The driver left this stream's graceful close to its writer.
    pub(super) closing_gracefully: std::cell::Cell<bool>,
    /// Live upgrade: the reader and the writer stop at the next operation
    /// boundary (in-flight operations are cancelled, and what they did
    /// kept) and wait for the thaw, or end once retired.
    pub(super) frozen: Cell<bool>,
    pub(super) retired: Cell<bool>,
    /// Wake the reader and the writer stopped by `frozen` (one each: a
    /// `Notify` keeps one waiter, and a monoio task whose last waker is
    /// dropped is dropped with it).
    pub(super) thaw_rd: Notify,
    pub(super) thaw_wr: Notify,
    /// Stops the reader's read in flight on epoll (see `read_loop`).
    freeze_rd: Notify,
    /// Cancels the reader's and the writer's in-flight operations.
    canceller: RefCell<Canceller>,
    /// The reader stopped for the upgrade, with the bytes it read and did
    /// not handle yet (a partial frame).
    pub(super) reader_left: RefCell<Option<BytesMut>>,
    /// The writer stopped for the upgrade: the bytes it took and did not
    /// write yet.
    pub(super) writer_left: RefCell<Option<BytesMut>>,
    /// A write is in flight (the writer is not at rest).
    pub(super) writer_busy: Cell<bool>,
    /// The stream's descriptor (a live upgrade passes a duplicate).
    pub(super) fd: Cell<Option<std::os::fd::RawFd>>,
}

impl ConnIo {
    pub(super) fn new(generation: u64) -> Rc<ConnIo> {
        Rc::new(ConnIo {
            generation,
            wake: Notify::new(),
            sock: RefCell::new(None),
            self_finishing: std::cell::Cell::new(false),
            reader_done: std::cell::Cell::new(false),
            closing_gracefully: std::cell::Cell::new(false),
            frozen: Cell::new(false),
            retired: Cell::new(false),
            thaw_rd: Notify::new(),
            thaw_wr: Notify::new(),
            freeze_rd: Notify::new(),
            canceller: RefCell::new(Canceller::new()),
            reader_left: RefCell::new(None),
            writer_left: RefCell::new(None),
            writer_busy: Cell::new(false),
            fd: Cell::new(None),
        })
    }

    /// Live upgrade: stop both tasks at their next boundary.
    pub(super) fn freeze(&self) {
        self.frozen.set(true);
        let c = std::mem::take(&mut *self.canceller.borrow_mut());
        *self.canceller.borrow_mut() = c.cancel();
        self.freeze_rd.notify();
        self.wake.notify();
    }

    /// Both tasks stopped (or never started: a gRPC stream, or not up).
    pub(super) fn at_rest(&self) -> bool {
        self.fd.get().is_none()
            || self.reader_done.get()
            || (self.reader_left.borrow().is_some() && !self.writer_busy.get())
    }

    /// Live upgrade abandoned: go on where the tasks stopped.
    pub(super) fn unfreeze(&self) {
        self.frozen.set(false);
        self.thaw_rd.notify();
        self.thaw_wr.notify();
        self.wake.notify();
    }

    /// Waits while frozen (the reader on `thaw_rd`, the writer on
    /// `thaw_wr`); false once retired.
    async fn wait_thaw(&self, thaw: &Notify) -> bool {
        super::handoff::wait_thaw(&self.frozen, &self.retired, thaw).await
    }

    /// Live upgrade done: both tasks end without touching the socket.
    pub(super) fn retire(&self) {
        self.retired.set(true);
        self.thaw_rd.notify();
        self.thaw_wr.notify();
    }

    /// Whether a graceful close is left to the writer (see `self_finishing`).
    pub(super) fn finishes_itself(&self) -> bool {
        self.self_finishing.get()
    }

    /// The shard ended this generation: shut the socket so the reader's read
    /// fails, and wake the writer so it sees the end.
    pub(super) fn close(&self) {
        if let Some(s) = self.sock.borrow().as_ref() {
            s.shutdown(Shut::Both);
        }
        self.wake.notify();
    }
}

/// Dials, then writes queued frames until the stream fails or is replaced.
pub(super) async fn run(w: Rc<Worker>, io: Rc<ConnIo>, conn: ConnId, addr: SocketAddr, dial_timeout: Duration) {
    let generation = io.generation;
    let start = Instant::now();
    let stream = match monoio::time::timeout(dial_timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return w.with_shard(|sh| sh.backend_lost(conn, generation, LossKind::DialFailed, &e, Instant::now()))
        }
        Err(_) => {
            let err = format!("no answer within {dial_timeout:?}");
            return w.with_shard(|sh| sh.backend_lost(conn, generation, LossKind::DialTimeout, &err, Instant::now()));
        }
    };
    // Connected while frozen for a live upgrade: the new process dials this
    // stream again itself; this one waits, and ends unused once retired.
    if io.frozen.get() && !io.wait_thaw(&io.thaw_wr).await {
        return;
    }
    if !w.with_shard(|sh| sh.backend_connected(conn, generation, start.elapsed(), Instant::now())) {
        return;
    }
    serve(w, io, conn, stream, Vec::new()).await
}

/// A stream a live upgrade brought over: its socket and the bytes read but
/// not yet handled. The shard has it as up already.
pub(super) fn adopt(
    w: &Rc<Worker>,
    conn: ConnId,
    generation: u64,
    fd: std::os::fd::OwnedFd,
    input: Vec<u8>,
) -> std::io::Result<Rc<ConnIo>> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    let stream = TcpStream::from_std(std)?;
    let io = ConnIo::new(generation);
    monoio::spawn(serve(w.clone(), io.clone(), conn, stream, input));
    Ok(io)
}

/// The connected stream: spawns the reader, then writes queued frames until
/// the stream fails or is replaced.
async fn serve(w: Rc<Worker>, io: Rc<ConnIo>, conn: ConnId, stream: TcpStream, input: Vec<u8>) {
    use std::os::fd::AsRawFd;
    let generation = io.generation;
    let _ = stream.set_nodelay(true);
    let sock = SocketShutdown::new(&stream);
    io.fd.set(Some(stream.as_raw_fd()));
    *io.sock.borrow_mut() = Some(sock.clone());
    let _half = HalfGuard(sock.clone());
    let (rd, wr) = stream.into_split();
    let mut wr = WriteHalf { io: io.clone(), wr: std::mem::ManuallyDrop::new(wr) };
    let wr = &mut *wr.wr;
    monoio::spawn(read_loop(w.clone(), io.clone(), conn, HalfGuard(sock), rd, input));
    let mut buf = BytesMut::new();
    let mut done = None;
    loop {
        if io.frozen.get() && !io.wait_thaw(&io.thaw_wr).await {
            return;
        }
        match w.with_shard(|sh| sh.take_backend_out(conn, generation, &mut buf, done.take())) {
            BackendOut::Stale => return,
            BackendOut::Empty => io.wake.notified().await,
            BackendOut::Write(write) => {
                io.writer_busy.set(true);
                let res = write_all(&io, wr, &mut buf).await;
                io.writer_busy.set(false);
                if let Err(e) = res {
                    if io.retired.get() {
                        // Handed over: the socket is the new process's.
                        return;
                    }
                    let frames = write.frames;
                    return w.with_shard(|sh| sh.backend_write_failed(conn, generation, frames, &e, Instant::now()));
                }
                done = Some((write, Instant::now()));
                buf.clear();
                if buf.capacity() > 4 * BACKEND_READ_BUF {
                    buf = BytesMut::new();
                }
            }
        }
    }
}

/// The stream's write half. Dropping monoio's write half shuts the
/// sending direction down (FIN); once a live upgrade handed the stream to a
/// new process that must not happen, so a retired stream's half is left
/// alone (the process exits and its descriptor closes with it, which sends
/// nothing while the new process holds the socket).
struct WriteHalf<W> {
    io: Rc<ConnIo>,
    wr: std::mem::ManuallyDrop<W>,
}

impl<W> Drop for WriteHalf<W> {
    fn drop(&mut self) {
        if !self.io.retired.get() {
            // SAFETY: dropped once, here; never used after.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.wr) };
        }
    }
}

/// Writes all of `buf`. A live upgrade lets the write in flight finish (the
/// freeze waits for it, bounded: a backend that reads nothing fails the
/// upgrade, safely) and the rest waits in `io.writer_left` until the thaw
/// (or goes to the new process). Writes are not cancellable: monoio's
/// cancellable operations cost about 850 instructions each (callgrind,
/// PERFORMANCE.md "Live upgrade").
async fn write_all<W: AsyncWriteRent>(io: &ConnIo, wr: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        if io.frozen.get() {
            *io.writer_left.borrow_mut() = Some(BytesMut::from(&buf[pos..]));
            io.writer_busy.set(false);
            if !io.wait_thaw(&io.thaw_wr).await {
                return Err(std::io::Error::other("handed over"));
            }
            io.writer_busy.set(true);
            let left = io.writer_left.borrow_mut().take().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(&left);
            pos = 0;
            continue;
        }
        let (res, b) = wr.write(std::mem::take(buf).slice(pos..)).await;
        *buf = b.into_inner();
        match res {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => pos += n,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn read_loop<R: CancelableAsyncReadRent>(
    w: Rc<Worker>,
    io: Rc<ConnIo>,
    conn: ConnId,
    half: HalfGuard,
    rd: R,
    input: Vec<u8>,
) {
    let _half = half;
    let generation = io.generation;
    let mut rd = rd;
    let mut buf = BytesMut::with_capacity(BACKEND_READ_BUF.max(input.len()));
    buf.extend_from_slice(&input);
    // Bytes a live upgrade carried are handled first.
    let mut carried = !buf.is_empty();
    loop {
        let mut read = if carried {
            carried = false;
            0
        } else {
            if io.frozen.get() {
                *io.reader_left.borrow_mut() = Some(std::mem::take(&mut buf));
                if !io.wait_thaw(&io.thaw_rd).await {
                    return;
                }
                buf = io.reader_left.borrow_mut().take().unwrap_or_default();
            }
            if buf.capacity() - buf.len() < BACKEND_READ_BUF / 4 {
                buf.reserve(BACKEND_READ_BUF);
            }
            // monoio reads at the start of the buffer it is given, so hand it
            // the spare capacity only.
            let (len, cap) = (buf.len(), buf.capacity());
            // A live upgrade must stop a read in flight without losing what
            // it read. monoio's cancellable reads cost about 730
            // instructions each (a hash-set entry per operation), so they
            // are used only where needed: never without [server]
            // upgrade_socket; on epoll only while the buffer holds a partial
            // frame (an epoll read does its recv when polled, so dropping a
            // pending one loses nothing but the buffer, here empty); always
            // on io_uring (the kernel may have filled the buffer already).
            let (res, slice) = if !w.live_upgrade {
                rd.read(buf.slice_mut(len..cap)).await
            } else if w.uring || len > 0 {
                let handle = io.canceller.borrow().handle();
                rd.cancelable_read(buf.slice_mut(len..cap), handle).await
            } else {
                let read = rd.read(buf.slice_mut(len..cap));
                monoio::select! {
                    r = read => r,
                    _ = io.freeze_rd.notified() => {
                        // Frozen: the read (and its empty buffer) is dropped.
                        buf = BytesMut::with_capacity(BACKEND_READ_BUF);
                        continue;
                    }
                }
            };
            buf = slice.into_inner();
            match res {
                Ok(0) => {
                    let now = Instant::now();
                    io.reader_done.set(true);
                    return w.with_shard(|sh| {
                        sh.backend_lost(conn, generation, LossKind::ClosedByBackend, &"end of stream", now)
                    });
                }
                Ok(n) => n,
                // Cancelled for a live upgrade before anything was read.
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) && io.frozen.get() => continue,
                Err(e) => {
                    io.reader_done.set(true);
                    return w
                        .with_shard(|sh| sh.backend_lost(conn, generation, LossKind::ReadFailed, &e, Instant::now()));
                }
            }
        };
        loop {
            match w.with_shard(|sh| sh.backend_data(conn, generation, &mut buf, read, Instant::now())) {
                BackendRead::Continue => break,
                BackendRead::Stop => {
                    io.reader_done.set(true);
                    return;
                }
                BackendRead::Yield => {
                    read = 0;
                    yield_now().await;
                }
            }
        }
    }
}
