//! Client sockets: accept, each session's reader task, and its writes.
//!
//! The reader feeds bytes to the shard and ends the session when the socket
//! ends or the shard says so. Reads are in readiness mode (monoio `poll-io`):
//! the socket is polled for readiness and read into the worker's buffer, so
//! an idle session holds no read buffer and no I/O operation owns memory of
//! its own while it waits.
//!
//! Writes are made where the replies are produced: when the shard queues
//! bytes for a session ([`Action::WakeClient`](crate::shard::Action)), the
//! driver takes the queue and writes it at once, from the task that produced
//! it (usually a backend reader, after a whole read's worth of replies is
//! queued: one write per session per backend read). Only when the socket has
//! no room does a writer task start for that session; it finishes the write,
//! writes what was queued meanwhile, and ends. An idle session therefore has
//! one task (its reader), not two.
//!
//! Ownership: the accept loop alone owns the listener and drops it when the
//! drain begins. A session's socket lives in its [`ClientIo`], shared by the
//! reader, a writer task while one runs, and the worker's table; it is
//! borrowed only inside a poll or a non-blocking write, never across a wait.
//! The worker's table drops its handle when the session is closed and its
//! tail written (or handed to a writer task).

use super::Worker;
use crate::notify::Notify;
use crate::shard::{ClientOut, Flow, HalfClose, SessionKey, Shut};
use bytes::{Buf, BytesMut};
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::{TcpListener, TcpStream};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// A session's own buffer grows by this much at a time (it holds only a
/// frame not yet complete, or frames waiting for queue room).
pub(crate) const READ_BUF_INITIAL: usize = 2048;
/// The worker's read buffer: every session's reads land here first.
pub(crate) const WORKER_READ_BUF: usize = 64 * 1024;
/// A session's reader yields to the core's other tasks after reading this
/// much without once waiting for its socket: one worker buffer's worth. A
/// paced session waits before every read and never reaches it; a flooding
/// one yields once per 64 KiB (about 900 small frames), which bounds how long
/// its neighbours wait to the processing of one buffer
/// (`fault_matrix::client_flood` measured it: without the yield, normal
/// clients' p99 was 111-362 ms during a two-client flood, 1 ms before it).
const READ_BUDGET_PER_TURN: usize = WORKER_READ_BUF;
/// A read is given at least this much room.
const READ_MIN_FREE: usize = 512;
/// Pause after an accept failed for lack of descriptors or memory, instead of
/// spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The driver's handles on one session's socket.
pub(crate) struct ClientIo {
    /// Which session holds the slot (slots are reused).
    pub(super) key: SessionKey,
    /// The socket (readiness mode).
    stream: RefCell<TcpStreamPoll>,
    /// A writer task is finishing a write the socket had no room for; what
    /// is queued meanwhile is its to write.
    writing: Cell<bool>,
    /// Wakes the writer task: more queued, or the session closed.
    wake: Notify,
    /// Set by `Action::Closed` while a writer task runs: what is left to
    /// write before the FIN.
    tail: RefCell<Option<BytesMut>>,
    /// Wakes a reader paused by backpressure.
    pub(super) resume: Notify,
    /// Drain: half-close (FIN) once the queue is written.
    pub(super) fin: Cell<bool>,
    /// The FIN was sent: nothing more is written.
    fin_sent: Cell<bool>,
    /// A write failed: nothing more is written.
    broken: Cell<bool>,
    /// The overload manager capped its kernel send buffer.
    shrunk: Cell<bool>,
    /// The overload manager's last look: the low 32 bits of the session's
    /// bytes out then (compared wrapping), and the kernel's send queue then
    /// (at most the socket's send buffer). 32 bits each: every idle session
    /// carries them.
    seen_out: Cell<u32>,
    kernel_q: Cell<u32>,
    /// The session's own bytes: a frame not yet complete, or frames waiting
    /// for room in their backend queue. Empty (no allocation) most of the
    /// time; while it is, reads go to the worker's buffer.
    pub(super) partial: RefCell<BytesMut>,
    /// Bytes a writer task took from the queue and has not written yet.
    pub(super) pending: RefCell<BytesMut>,
    /// Live upgrade: no read and no write until thawed (or retired).
    pub(super) frozen: Cell<bool>,
    /// Live upgrade done: the socket is the new process's; the tasks end
    /// without touching it.
    pub(super) retired: Cell<bool>,
    /// Wake the reader and a writer task stopped by `frozen` (one each: a
    /// `Notify` keeps one waiter, and a monoio task whose last waker is
    /// dropped is dropped with it).
    pub(super) thaw_rd: Notify,
    pub(super) thaw_wr: Notify,
}

/// What a frozen socket's poll reports: the task waits for the thaw.
fn frozen_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "frozen for a live upgrade")
}

fn is_frozen(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Interrupted && e.to_string() == "frozen for a live upgrade"
}

impl ClientIo {
    /// Shuts down one or both directions (the shard's `ShutdownClient`);
    /// wakes the reader. `Shut::Write` is a drain: the FIN follows the queue.
    pub(super) fn shutdown(&self, how: Shut) {
        let how = match how {
            Shut::Read => std::net::Shutdown::Read,
            Shut::Both => std::net::Shutdown::Both,
            Shut::Write => return,
        };
        // ENOTCONN after the peer left needs no handling.
        let _ = super::sys::shutdown(&*self.stream.borrow(), how);
    }
}

/// Accepts until told to stop. The stop cancels the accept in flight and
/// the loop goes on until that accept completes: a connection the kernel
/// had already accepted is served, never dropped (on io_uring, dropping an
/// accept operation would close such a connection unseen).
pub(super) async fn accept_loop(w: Rc<Worker>, listener: TcpListener) {
    let canceller = monoio::io::Canceller::new();
    let stop = Rc::new(AcceptStop { cancel: RefCell::new(Some(canceller)), stopped: Cell::new(false) });
    w.accept_stops.borrow_mut().push(stop.clone());
    w.accept_loops.set(w.accept_loops.get() + 1);
    loop {
        let handle = match stop.cancel.borrow().as_ref() {
            Some(c) => c.handle(),
            None => break,
        };
        match listener.cancelable_accept(handle).await {
            Ok((stream, peer)) => on_accept(&w, stream, peer),
            Err(_) if stop.stopped.get() => break,
            Err(e) => {
                w.with_shard(|sh| sh.accept_failed(&e, Instant::now()));
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                ) {
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        if stop.stopped.get() {
            break;
        }
    }
    w.accept_loops.set(w.accept_loops.get() - 1);
    // Dropping the listener closes it: the kernel stops routing new
    // connections to this worker.
    drop(listener);
}

/// How a worker stops one accept loop.
pub(super) struct AcceptStop {
    cancel: RefCell<Option<monoio::io::Canceller>>,
    stopped: Cell<bool>,
}

impl AcceptStop {
    /// Cancels the accept in flight; the loop ends once it completes.
    pub(super) fn stop(&self) {
        self.stopped.set(true);
        if let Some(c) = self.cancel.borrow_mut().take() {
            c.cancel();
        }
    }
}

fn on_accept(w: &Rc<Worker>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let stream = match stream.try_into_poll_io() {
        Ok(s) => s,
        Err((e, _)) => {
            // Counted with the accept errors; dropping closes it.
            w.with_shard(|sh| sh.accept_failed(&e, Instant::now()));
            return;
        }
    };
    if w.overload.state() != crate::overload::State::Normal {
        // Over the node's queued-bytes threshold: dropping closes it.
        w.overload.refused.fetch_add(1, Ordering::Relaxed);
        w.with_shard(|sh| sh.refused_overload(peer, Instant::now()));
        return;
    }
    let Ok(key) = w.with_shard(|sh| sh.accept(peer, Instant::now())) else {
        // Refused (counted and logged by the shard): dropping closes it.
        return;
    };
    let io = ClientIo::new(key, stream);
    let sndbuf = w.shard.borrow().client_send_buffer();
    if sndbuf > 0 {
        super::sys::set_send_buffer(io.raw_fd(), sndbuf);
    }
    // Accepted as a live upgrade froze this worker: frozen with the rest.
    io.frozen.set(w.frozen.get());
    w.insert_client(io.clone());
    monoio::spawn(read_loop(w.clone(), io));
}

impl ClientIo {
    pub(super) fn new(key: SessionKey, stream: TcpStreamPoll) -> Rc<ClientIo> {
        Rc::new(ClientIo {
            key,
            stream: RefCell::new(stream),
            writing: Cell::new(false),
            wake: Notify::new(),
            tail: RefCell::new(None),
            resume: Notify::new(),
            fin: Cell::new(false),
            fin_sent: Cell::new(false),
            broken: Cell::new(false),
            shrunk: Cell::new(false),
            seen_out: Cell::new(0),
            kernel_q: Cell::new(0),
            partial: RefCell::new(BytesMut::new()),
            pending: RefCell::new(BytesMut::new()),
            frozen: Cell::new(false),
            retired: Cell::new(false),
            thaw_rd: Notify::new(),
            thaw_wr: Notify::new(),
        })
    }

    /// The socket's descriptor (a live upgrade passes a duplicate of it).
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.borrow().as_raw_fd()
    }

    /// A closed session's last bytes are being written (closed sessions are
    /// never exported: the socket is this process's alone).
    pub(super) fn closing(&self) -> bool {
        self.tail.borrow().is_some()
    }

    /// Writes what a closed session has left (a partial write's rest, then
    /// its tail) as far as the socket takes it now, then the FIN: a retiring
    /// worker does not wait.
    pub(super) fn finish_now(&self) {
        if self.broken.get() || self.fin_sent.get() {
            return;
        }
        let mut rest = std::mem::take(&mut *self.pending.borrow_mut());
        if let Some(tail) = self.tail.borrow_mut().take() {
            rest.extend_from_slice(&tail);
        }
        let _ = write_now(&self.stream, &mut rest);
        send_fin(self);
    }

    /// Waits while frozen; false once retired (the task must end without
    /// touching the socket).
    async fn wait_thaw(&self, thaw: &Notify) -> bool {
        super::handoff::wait_thaw(&self.frozen, &self.retired, thaw).await
    }
}

/// A session a live upgrade brought over: its socket (already a descriptor
/// of this process), and the bytes read but not yet forwarded.
pub(super) fn adopt(
    w: &Rc<Worker>,
    key: SessionKey,
    fd: std::os::fd::OwnedFd,
    input: Vec<u8>,
) -> std::io::Result<Rc<ClientIo>> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    let stream = TcpStream::from_std(std)?.try_into_poll_io().map_err(|(e, _)| e)?;
    let io = ClientIo::new(key, stream);
    *io.partial.borrow_mut() = BytesMut::from(&input[..]);
    w.insert_client(io.clone());
    monoio::spawn(read_loop(w.clone(), io.clone()));
    Ok(io)
}

/// Where a read lands: the session's own buffer, or the worker's.
enum ReadInto<'a> {
    Own(&'a RefCell<BytesMut>),
    /// Borrowed inside each poll only: while this session waits, others
    /// read into it too.
    Worker(&'a RefCell<BytesMut>),
}

/// Waits until the socket has bytes (or its end), then reads what it has;
/// also says whether it had to wait (false: the bytes were already there).
/// The socket and the worker's buffer are borrowed only inside each poll,
/// never across a wait.
async fn read_into(io: &ClientIo, into: ReadInto<'_>) -> (std::io::Result<usize>, bool) {
    let sock = &io.stream;
    let mut waited = false;
    let res = std::future::poll_fn(|cx| {
        let p = read_poll(io, sock, &into, cx);
        waited |= p.is_pending();
        p
    })
    .await;
    (res, waited)
}

fn read_poll(
    io: &ClientIo,
    sock: &RefCell<TcpStreamPoll>,
    into: &ReadInto<'_>,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<usize>> {
    match into {
        // A live upgrade owns the socket now: read nothing.
        _ if io.frozen.get() => Poll::Ready(Err(frozen_error())),
        ReadInto::Own(cell) => poll_read_buf(sock, &mut cell.borrow_mut(), READ_BUF_INITIAL, cx),
        ReadInto::Worker(cell) => {
            let mut buf = cell.borrow_mut();
            debug_assert!(buf.is_empty(), "the worker's read buffer is emptied after every read");
            poll_read_buf(sock, &mut buf, WORKER_READ_BUF, cx)
        }
    }
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
    let asked = rb.remaining();
    let mut sock = sock.borrow_mut();
    match Pin::new(&mut *sock).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let n = rb.filled().len();
            if n > 0 && n < asked {
                // A short read drained the receive queue: wait for the next
                // readiness event instead of a recv that returns EAGAIN.
                sock.clear_read_readiness();
            }
            // SAFETY: `poll_read` filled (initialized) the first `n` bytes of
            // the spare capacity `rb` was made from.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

async fn read_loop(w: Rc<Worker>, io: Rc<ClientIo>) {
    let key = io.key;
    // A session a live upgrade brought over may hold bytes already.
    let mut carried = !io.partial.borrow().is_empty();
    // Bytes read since this task last waited for the socket.
    let mut unwaited = 0usize;
    loop {
        let n = if carried {
            carried = false;
            0
        } else {
            let own = !io.partial.borrow().is_empty();
            // Into the worker's buffer when this session holds nothing: when
            // the read completes nothing else has run, and what was read is
            // processed below before this task waits again.
            let into = if own { ReadInto::Own(&io.partial) } else { ReadInto::Worker(&w.read_buf) };
            let (res, waited) = read_into(&io, into).await;
            if waited {
                unwaited = 0;
            }
            if let Ok(n) = res {
                unwaited += n;
            }
            match res {
                Ok(0) => {
                    // Half-close: a reply still on its way is delivered first.
                    while let HalfClose::Linger(wait) = w.with_shard(|sh| sh.client_eof(key, Instant::now())) {
                        // Boxed: monoio's timer future is 640 bytes with 128-byte
                        // alignment, and held inline it would set the size of
                        // every session's reader task for this rare path.
                        Box::pin(monoio::time::sleep(wait)).await;
                        if io.frozen.get() && !io.wait_thaw(&io.thaw_rd).await {
                            return;
                        }
                    }
                    break;
                }
                Ok(n) => n,
                Err(e) if is_frozen(&e) => {
                    if !io.wait_thaw(&io.thaw_rd).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(session_id = key.id, error = %e, "client read failed");
                    break;
                }
            }
        };
        let own = n == 0 || !io.partial.borrow().is_empty();
        let flow = if own {
            w.with_shard(|sh| sh.client_data(key, &mut io.partial.borrow_mut(), n, Instant::now()))
        } else {
            let mut wb = w.read_buf.borrow_mut();
            let flow = w.with_shard(|sh| sh.client_data(key, &mut wb, n, Instant::now()));
            // What the shard left (a partial frame, or frames waiting for
            // queue room) is the session's own from here on.
            if !wb.is_empty() {
                io.partial.borrow_mut().extend_from_slice(&wb);
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
                    if io.frozen.get() && !io.wait_thaw(&io.thaw_rd).await {
                        return;
                    }
                    flow = w.with_shard(|sh| sh.client_data(key, &mut io.partial.borrow_mut(), 0, Instant::now()));
                }
                Err(_) => {
                    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
                    return;
                }
            }
        }
        {
            let mut partial = io.partial.borrow_mut();
            if partial.is_empty() && partial.capacity() > 0 {
                // Idle again: give the memory back.
                *partial = BytesMut::new();
            }
        }
        if unwaited >= READ_BUDGET_PER_TURN {
            // A sender that keeps the socket full never makes this task
            // wait: without a yield it would hold the core, and every other
            // session on it (and the backend readers carrying their replies)
            // would wait until it paused.
            unwaited = 0;
            crate::notify::yield_now().await;
        }
    }
    w.with_shard(|sh| sh.client_closed(key, Instant::now()));
}

impl Worker {
    /// The overload manager's turn on this core (every
    /// [`crate::overload::MEASURE_EVERY`]): measure the bytes queued towards
    /// this core's clients (the shard's queues, what writers hold, and the
    /// kernel's send queue of sockets whose writer waits for room), report
    /// them, and act on the node's state: shed the slowest readers first, and
    /// cap the kernel send buffer of writers that still wait.
    pub(super) fn overload_turn(self: &Rc<Self>, now: Instant) {
        use crate::overload::{send_queue, shrink_send_buffer, State};
        let o = self.overload.clone();
        let mut heavy: Vec<(u64, Rc<ClientIo>)> = Vec::new();
        let mut mine = 0u64;
        {
            let clients = self.clients.borrow();
            let shard = self.shard.borrow();
            // The kernel's queues are read (one ioctl each) only while some
            // writer waits for room, the node is past a quarter of its
            // budget, or this core queued more than an eighth of the budget
            // since the last look: with every client reading they hold next
            // to nothing, and a paced realm pays no system call for this.
            // Then only the sockets written to since the last look, or
            // holding bytes then.
            let (mut waiting, mut pushed) = (false, 0u64);
            for io in clients.iter().flatten() {
                waiting |= io.writing.get();
                pushed += (shard.queued_out(io.key).1 as u32).wrapping_sub(io.seen_out.get()) as u64;
            }
            let look = waiting || o.total() > o.budget / 4 || pushed > o.budget / 8;
            for io in clients.iter().flatten() {
                let (out, bytes_out) = shard.queued_out(io.key);
                let mut q = out as u64 + io.pending.borrow().len() as u64;
                if let Some(t) = io.tail.borrow().as_ref() {
                    q += t.len() as u64;
                }
                let wrote = io.seen_out.replace(bytes_out as u32) != bytes_out as u32;
                if look && !io.broken.get() && (wrote || io.kernel_q.get() > 0 || io.writing.get()) {
                    io.kernel_q.set(send_queue(io.raw_fd()).min(u32::MAX as u64) as u32);
                } else if !look {
                    io.kernel_q.set(0);
                }
                q += io.kernel_q.get() as u64;
                mine += q;
                if q > 0 {
                    heavy.push((q, io.clone()));
                }
            }
        }
        let total = o.report(self.index, mine);
        if o.judge(total) != State::Shedding {
            return;
        }
        let mut shed = o.shed_target(mine, total);
        heavy.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        for (q, io) in &heavy {
            if shed == 0 {
                break;
            }
            if io.closing() || io.broken.get() {
                continue;
            }
            // Abortive close: the kernel frees what it queued for a client
            // that does not read at once (a FIN would wait behind it).
            super::sys::set_linger_zero(io.raw_fd());
            if self.with_shard(|sh| sh.close_slow_reader(io.key, *q, now)) {
                o.closed.fetch_add(1, Ordering::Relaxed);
                shed = shed.saturating_sub(*q);
            }
        }
        for (_, io) in &heavy {
            if io.writing.get() && !io.shrunk.replace(true) && shrink_send_buffer(io.raw_fd()) {
                o.shrunk.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a write attempt made of the bytes it was given.
enum Wrote {
    All,
    /// The socket had no room for the rest (a writer task finishes it).
    Partly,
    Failed(std::io::Error),
}

/// Writes as much of `buf` as the socket takes now, without waiting;
/// advances `buf` past what was written.
fn write_now(sock: &RefCell<TcpStreamPoll>, buf: &mut BytesMut) -> Wrote {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while !buf.is_empty() {
        match Pin::new(&mut *sock.borrow_mut()).poll_write(&mut cx, buf) {
            Poll::Ready(Ok(0)) => return Wrote::Failed(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => buf.advance(n),
            Poll::Ready(Err(e)) => return Wrote::Failed(e),
            // Full (or its readiness not yet known): a writer task polls it
            // with a real waker, which replaces this no-op one.
            Poll::Pending => return Wrote::Partly,
        }
    }
    Wrote::All
}

/// Writes all of `buf` (borrowed inside each poll only: a live upgrade
/// takes what is left), waiting for room in the socket as needed.
async fn write_all(io: &ClientIo, buf: &RefCell<BytesMut>) -> std::io::Result<()> {
    while !buf.borrow().is_empty() {
        let n = std::future::poll_fn(|cx| {
            if io.frozen.get() {
                return Poll::Ready(Err(frozen_error()));
            }
            Pin::new(&mut *io.stream.borrow_mut()).poll_write(cx, &buf.borrow())
        })
        .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf.borrow_mut().advance(n);
    }
    Ok(())
}

/// Half-closes the sending direction (FIN), once.
fn send_fin(io: &ClientIo) {
    if !io.fin_sent.replace(true) {
        let _ = super::sys::shutdown(&*io.stream.borrow(), std::net::Shutdown::Write);
    }
}

impl Worker {
    /// The shard queued bytes for a session (or asked for the drain's FIN):
    /// write them now, from this task; what the socket has no room for goes
    /// to a writer task.
    pub(super) fn flush_client(self: &Rc<Self>, io: &Rc<ClientIo>) {
        if io.frozen.get() {
            // A live upgrade takes the queue as it is.
            return;
        }
        if io.writing.get() {
            io.wake.notify();
            return;
        }
        if io.broken.get() || io.fin_sent.get() {
            return;
        }
        loop {
            // An empty buffer: the session's queue is swapped into it, and
            // the session keeps no allocation while idle.
            let mut buf = BytesMut::new();
            match self.with_shard(|sh| sh.take_client_out(io.key, &mut buf, None)) {
                ClientOut::Write(write) => match write_now(&io.stream, &mut buf) {
                    Wrote::All => self.with_shard(|sh| sh.client_wrote(write, Instant::now())),
                    Wrote::Partly => {
                        io.writing.set(true);
                        *io.pending.borrow_mut() = buf;
                        monoio::spawn(write_task(self.clone(), io.clone(), Some(write)));
                        return;
                    }
                    Wrote::Failed(e) => {
                        io.broken.set(true);
                        self.with_shard(|sh| sh.client_write_failed(io.key, &e));
                        return;
                    }
                },
                ClientOut::Empty => {
                    if io.fin.get() {
                        send_fin(io);
                    }
                    return;
                }
                // Closed: `Action::Closed` brings the tail.
                ClientOut::Gone => return,
            }
        }
    }

    /// The session is closed (`Action::Closed`): write its tail (last
    /// replies, a WebSocket close frame), half-close, and drop the handle.
    pub(super) fn close_client(self: &Rc<Self>, io: &Rc<ClientIo>, tail: BytesMut) {
        if io.writing.get() {
            // The writer task writes it after what it holds.
            *io.tail.borrow_mut() = Some(tail);
            io.wake.notify();
            return;
        }
        let mut tail = tail;
        if !io.broken.get() && !io.fin_sent.get() && !tail.is_empty() {
            if let Wrote::Partly = write_now(&io.stream, &mut tail) {
                io.writing.set(true);
                *io.tail.borrow_mut() = Some(tail);
                monoio::spawn(write_task(self.clone(), io.clone(), None));
                return;
            }
        }
        send_fin(io);
        self.remove_client(io.key);
    }
}

/// Finishes a write the socket had no room for (`io.pending`), writes what
/// is queued meanwhile, and ends when the queue is empty (or, once the
/// session is closed, after its tail).
async fn write_task(w: Rc<Worker>, io: Rc<ClientIo>, mut write: Option<crate::shard::ClientWrite>) {
    let key = io.key;
    loop {
        if !io.pending.borrow().is_empty() {
            match write_all(&io, &io.pending).await {
                Ok(()) => {}
                Err(e) if is_frozen(&e) => {
                    if !io.wait_thaw(&io.thaw_wr).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    io.broken.set(true);
                    w.with_shard(|sh| sh.client_write_failed(key, &e));
                    break;
                }
            }
            if let Some(write) = write.take() {
                w.with_shard(|sh| sh.client_wrote(write, Instant::now()));
            }
        }
        if io.tail.borrow().is_some() {
            break;
        }
        if io.frozen.get() && !io.wait_thaw(&io.thaw_wr).await {
            return;
        }
        let mut buf = BytesMut::new();
        let out = w.with_shard(|sh| sh.take_client_out(key, &mut buf, None));
        *io.pending.borrow_mut() = buf;
        match out {
            ClientOut::Write(next) => write = Some(next),
            ClientOut::Empty => {
                if io.fin.get() {
                    send_fin(&io);
                }
                break;
            }
            ClientOut::Gone => {
                // Closed: wait for the tail.
                while io.tail.borrow().is_none() {
                    io.wake.notified().await;
                }
            }
        }
    }
    io.writing.set(false);
    // Closed while writing: the tail, the FIN, and the handle go now.
    let tail = io.tail.borrow_mut().take();
    if let Some(tail) = tail {
        if !io.broken.get() && !io.fin_sent.get() && !tail.is_empty() {
            let cell = RefCell::new(tail);
            while let Err(e) = write_all(&io, &cell).await {
                if !is_frozen(&e) {
                    break;
                }
                // Frozen: finish after the thaw; a retiring worker writes it
                // itself (`ClientIo::finish_now`).
                *io.tail.borrow_mut() = Some(std::mem::take(&mut *cell.borrow_mut()));
                if !io.wait_thaw(&io.thaw_wr).await {
                    return;
                }
                *cell.borrow_mut() = io.tail.borrow_mut().take().unwrap_or_default();
            }
        }
        send_fin(&io);
        w.remove_client(key);
    }
}
