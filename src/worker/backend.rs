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
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
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
        })
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
    if !w.with_shard(|sh| sh.backend_connected(conn, generation, start.elapsed(), Instant::now())) {
        return;
    }
    let _ = stream.set_nodelay(true);
    let sock = SocketShutdown::new(&stream);
    *io.sock.borrow_mut() = Some(sock.clone());
    let _half = HalfGuard(sock.clone());
    let (rd, mut wr) = stream.into_split();
    monoio::spawn(read_loop(w.clone(), conn, generation, HalfGuard(sock), rd));
    let mut buf = BytesMut::new();
    let mut done = None;
    loop {
        match w.with_shard(|sh| sh.take_backend_out(conn, generation, &mut buf, done.take())) {
            BackendOut::Stale => return,
            BackendOut::Empty => io.wake.notified().await,
            BackendOut::Write(write) => {
                let (res, b) = wr.write_all(std::mem::take(&mut buf)).await;
                if let Err(e) = res {
                    let frames = write.frames;
                    return w.with_shard(|sh| sh.backend_write_failed(conn, generation, frames, &e, Instant::now()));
                }
                done = Some((write, Instant::now()));
                buf = b;
                buf.clear();
                if buf.capacity() > 4 * BACKEND_READ_BUF {
                    buf = BytesMut::new();
                }
            }
        }
    }
}

async fn read_loop<R: AsyncReadRent>(w: Rc<Worker>, conn: ConnId, generation: u64, half: HalfGuard, rd: R) {
    let _half = half;
    let mut rd = rd;
    let mut buf = BytesMut::with_capacity(BACKEND_READ_BUF);
    loop {
        if buf.capacity() - buf.len() < BACKEND_READ_BUF / 4 {
            buf.reserve(BACKEND_READ_BUF);
        }
        // monoio reads at the start of the buffer it is given, so hand it
        // the spare capacity only.
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = rd.read(buf.slice_mut(len..cap)).await;
        buf = slice.into_inner();
        let mut read = match res {
            Ok(0) => {
                let now = Instant::now();
                return w.with_shard(|sh| {
                    sh.backend_lost(conn, generation, LossKind::ClosedByBackend, &"end of stream", now)
                });
            }
            Ok(n) => n,
            Err(e) => {
                return w.with_shard(|sh| sh.backend_lost(conn, generation, LossKind::ReadFailed, &e, Instant::now()))
            }
        };
        loop {
            match w.with_shard(|sh| sh.backend_data(conn, generation, &mut buf, read, Instant::now())) {
                BackendRead::Continue => break,
                BackendRead::Stop => return,
                BackendRead::Yield => {
                    read = 0;
                    yield_now().await;
                }
            }
        }
    }
}
