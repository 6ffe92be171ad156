//! gw-floor-echo: the cheapest server that receives every client message and
//! sends it back: one thread, edge-triggered epoll, direct `recv`/`send`
//! into one buffer, no runtime, no allocation per message.
//!
//! It is the floor for any proxy's client side: a proxy must at least receive
//! each client frame and send each reply, and this does nothing else. On
//! loopback the sender's `send` also runs the receiver's TCP input and its
//! wake-up, so this floor is mostly kernel time. `perf/floor.sh` measures it
//! beside the gateway and HAProxy (and, with `--ws`, nginx's WebSocket proxy):
//! PERFORMANCE.md, "The loopback floor".
//!
//! `--ws`: the same as a WebSocket server. The upgrade request is answered
//! (httparse and tungstenite's accept key, as `gw-echo --mode ws`); then each
//! client frame is unmasked and sent back as an unmasked server frame with
//! the same opcode and FIN bit (so a fragmented message comes back
//! fragmented), a ping is answered with a pong, and a close with a close.
//! The replies to one read go out in one `send`.
//!
//! Usage: gw-floor-echo --listen 127.0.0.1:29743 [--ws]

#[allow(dead_code)]
mod echo_ws;

use clap::Parser;
use std::io::{Error, Result};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Speak WebSocket (RFC 6455) to the clients.
    #[arg(long)]
    ws: bool,
}

/// Largest WebSocket frame payload accepted (a bigger one closes the
/// connection).
const MAX_FRAME: usize = 1 << 20;

/// `Err(last OS error)` when a libc call returned -1.
fn check(r: isize) -> Result<isize> {
    if r < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd, events: u32) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: fd as u64 };
    // SAFETY: plain syscall on descriptors this process owns.
    check(unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } as isize).map(drop)
}

const CONN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Sends `data` on `fd`; returns how much the socket did not take.
fn send_some(fd: RawFd, data: &[u8]) -> Result<usize> {
    let mut pos = 0;
    while pos < data.len() {
        // SAFETY: `data[pos..]` is valid for its length.
        let r = unsafe { libc::send(fd, data[pos..].as_ptr().cast(), data.len() - pos, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        pos += r as usize;
    }
    Ok(data.len() - pos)
}

/// One connection's state (indexed by descriptor).
#[derive(Default)]
struct Conn {
    /// Bytes a full socket did not take (rare: closed-loop load keeps send
    /// buffers nearly empty); while any wait, new replies queue behind them.
    pending: Vec<u8>,
    /// WebSocket: the upgrade is done.
    open: bool,
    /// WebSocket: an unfinished request head or frame.
    input: Vec<u8>,
    /// Closing once `pending` is written (a close reply, or the end of
    /// stream came while replies were queued).
    closing: bool,
}

/// What handling some input decided.
enum Next {
    Go,
    /// Send what is in the output, then close.
    Close,
}

/// WebSocket: answers every complete frame at the front of `input` into
/// `out`; returns how many bytes it used.
fn ws_frames(input: &mut [u8], out: &mut Vec<u8>) -> (usize, Next) {
    let mut at = 0;
    loop {
        let b = &input[at..];
        if b.len() < 2 {
            return (at, Next::Go);
        }
        let (fin_op, masked, len7) = (b[0], b[1] & 0x80 != 0, (b[1] & 0x7f) as usize);
        let (len, mut hdr) = match len7 {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => return (at, Next::Go),
            n => (n, 2),
        };
        let op = fin_op & 0x0f;
        // Client frames are masked (RFC 6455 5.1); no extension is agreed,
        // so RSV bits and reserved opcodes are errors (5.2); control frames
        // are whole and at most 125 bytes (5.5).
        let bad = !masked
            || fin_op & 0x70 != 0
            || matches!(op, 3..=7 | 0xb..=0xf)
            || (op >= 8 && (fin_op & 0x80 == 0 || len > 125));
        if bad || len > MAX_FRAME {
            let code: u16 = if bad { 1002 } else { 1009 };
            out.extend_from_slice(&[0x88, 2]);
            out.extend_from_slice(&code.to_be_bytes());
            return (at, Next::Close);
        }
        if b.len() < hdr + 4 + len {
            return (at, Next::Go);
        }
        let mask = [b[hdr], b[hdr + 1], b[hdr + 2], b[hdr + 3]];
        hdr += 4;
        let payload = &mut input[at + hdr..at + hdr + len];
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= mask[i & 3];
        }
        let reply_op = match op {
            0x9 => 0x8a, // ping -> pong
            0xa => {
                at += hdr + len;
                continue; // pong: nothing to send
            }
            _ => fin_op, // data, continuation or close: echoed as is
        };
        out.push(reply_op);
        match len {
            0..=125 => out.push(len as u8),
            126..=65535 => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        at += hdr + len;
        if op == 0x8 {
            return (at, Next::Close);
        }
    }
}

/// WebSocket: handles `got` (fresh bytes) on a connection; replies go to
/// `out`.
fn ws_input(c: &mut Conn, got: &mut [u8], out: &mut Vec<u8>) -> Next {
    if c.open && c.input.is_empty() {
        // The common case: whole frames, handled in the read buffer.
        let (used, next) = ws_frames(got, out);
        c.input.extend_from_slice(&got[used..]);
        return next;
    }
    c.input.extend_from_slice(got);
    if !c.open {
        match echo_ws::upgrade(&c.input) {
            Ok(None) => return Next::Go,
            Ok(Some((resp, len))) => {
                out.extend_from_slice(resp.as_bytes());
                c.input.drain(..len);
                c.open = true;
            }
            Err(_) => {
                out.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                return Next::Close;
            }
        }
    }
    let mut input = std::mem::take(&mut c.input);
    let (used, next) = ws_frames(&mut input, out);
    input.drain(..used);
    c.input = input;
    next
}

fn main() -> Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(args.listen)?;
    listener.set_nonblocking(true)?;
    let lfd = listener.as_raw_fd();
    // SAFETY: creates a new descriptor.
    let ep = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)? as RawFd;
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    loop {
        // SAFETY: `events` has room for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let (fd, bits) = (ev.u64 as RawFd, ev.events);
            if fd == lfd {
                loop {
                    // SAFETY: accepts on our listener; the address is not wanted.
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        let e = Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EAGAIN) {
                            eprintln!("gw-floor-echo: accept: {e}");
                        }
                        break;
                    }
                    let one: libc::c_int = 1;
                    // SAFETY: sets an option on the new socket.
                    unsafe {
                        libc::setsockopt(c, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&one as *const i32).cast(), 4)
                    };
                    if epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, CONN).is_err() {
                        // SAFETY: closes the socket just accepted.
                        unsafe { libc::close(c) };
                        continue;
                    }
                    if conns.len() <= c as usize {
                        conns.resize_with(c as usize + 1, || None);
                    }
                    conns[c as usize] = Some(Conn::default());
                }
                continue;
            }
            let Some(conn) = conns.get_mut(fd as usize).and_then(Option::as_mut) else { continue };
            let mut close = bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            if !close && bits & libc::EPOLLOUT as u32 != 0 && !conn.pending.is_empty() {
                match send_some(fd, &conn.pending) {
                    Ok(0) => {
                        conn.pending.clear();
                        close = conn.closing;
                        let _ = epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, CONN);
                    }
                    Ok(left) => drop(conn.pending.drain(..conn.pending.len() - left)),
                    Err(_) => close = true,
                }
            }
            // Edge-triggered: read until a short read (the queue is drained).
            // `done`: the end of stream or a close frame; the connection
            // closes once its queued replies are out.
            let mut done = false;
            while !close && !done && !conn.closing && bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0 {
                // SAFETY: `buf` is valid for its length.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r == 0 {
                    done = true;
                    break;
                }
                if r < 0 {
                    match Error::last_os_error().raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN) => {}
                        _ => close = true,
                    }
                    break;
                }
                let n = r as usize;
                let mut next = Next::Go;
                let reply: &[u8] = if args.ws {
                    out.clear();
                    next = ws_input(conn, &mut buf[..n], &mut out);
                    &out
                } else {
                    &buf[..n]
                };
                if !conn.pending.is_empty() {
                    conn.pending.extend_from_slice(reply);
                } else {
                    match send_some(fd, reply) {
                        Ok(0) => {}
                        Ok(left) => {
                            conn.pending.extend_from_slice(&reply[reply.len() - left..]);
                            let _ = epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, CONN | libc::EPOLLOUT as u32);
                        }
                        Err(_) => close = true,
                    }
                }
                if let Next::Close = next {
                    done = true;
                }
                // A short read drained the queue, unless the peer also
                // closed (then read on to the end of stream).
                if n < buf.len() && bits & libc::EPOLLRDHUP as u32 == 0 {
                    break;
                }
            }
            if done && !close {
                if conn.pending.is_empty() {
                    close = true;
                } else {
                    conn.closing = true;
                }
            }
            if close {
                conns[fd as usize] = None;
                // SAFETY: closing removes it from the epoll set too.
                unsafe { libc::close(fd) };
            }
        }
    }
}
