//! gw-rawcast: the ceiling for an announcement fan-out. A minimal server on
//! one monoio thread that holds N client sockets (each answers one bind frame
//! with a one-byte frame, as gw-announce expects) and, each time its control
//! port receives `round u32, payload_len u32`, writes the same client frame
//! (8-byte header + payload starting with the round) to every socket.
//!
//! `--style tasks`: one writer task per socket, woken one by one, each doing
//! its own `write_all` through the runtime (io_uring or epoll): the gateway's
//! own shape, without its shard. `--style syscall`: one plain loop of
//! `write(2)` over every descriptor: the floor of one syscall per socket.

use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use gate_protocol::{client as cproto, ServerId};
use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Same msg_id as gw-announce's ANNOUNCE.
const ANNOUNCE_MSG_ID: u16 = 4242;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Style {
    Tasks,
    Syscall,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Driver {
    /// io_uring when the kernel allows it, else epoll (the gateway's auto).
    Auto,
    IoUring,
    Epoll,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Raw fan-out writer: the ceiling for an announcement")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:29760")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:29751")]
    control: SocketAddr,
    #[arg(long, value_enum, default_value = "tasks")]
    style: Style,
    #[arg(long, value_enum, default_value = "auto")]
    driver: Driver,
}

/// A single-waiter wake-up flag (as the gateway's `notify.rs`).
#[derive(Default)]
struct Notify {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.pending.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
    async fn notified(&self) {
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

struct Conn {
    fd: i32,
    wake: Rc<Notify>,
}

struct State {
    style: Style,
    conns: RefCell<Vec<Conn>>,
    frame: RefCell<Bytes>,
    write_errors: Cell<u64>,
}

async fn client(st: Rc<State>, mut s: monoio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    // The bind frame: header, then its payload.
    let (r, hdr) = s.read_exact(vec![0u8; cproto::HEADER_LEN]).await;
    if r.is_err() {
        return;
    }
    let len = u16::from_le_bytes([hdr[0], hdr[1]]) as usize;
    if len > 0 {
        let (r, _) = s.read_exact(vec![0u8; len]).await;
        if r.is_err() {
            return;
        }
    }
    let mut out = BytesMut::new();
    cproto::encode(&mut out, 1, ServerId(0), &[0u8]);
    let (r, _) = s.write_all(out).await;
    if r.is_err() {
        return;
    }
    let wake = Rc::new(Notify::default());
    st.conns.borrow_mut().push(Conn { fd: s.as_raw_fd(), wake: wake.clone() });
    loop {
        wake.notified().await;
        if st.style == Style::Tasks {
            let f = st.frame.borrow().clone();
            let (r, _) = s.write_all(f).await;
            if r.is_err() {
                st.write_errors.set(st.write_errors.get() + 1);
                return;
            }
        }
    }
}

async fn control(st: Rc<State>, mut c: monoio::net::TcpStream) {
    let _ = c.set_nodelay(true);
    loop {
        let (r, m) = c.read_exact(vec![0u8; 8]).await;
        if r.is_err() {
            return;
        }
        let round = u32::from_le_bytes(m[0..4].try_into().unwrap());
        let plen = (u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize).max(4);
        let mut payload = vec![0x5a; plen];
        payload[..4].copy_from_slice(&round.to_le_bytes());
        let mut f = BytesMut::new();
        cproto::encode(&mut f, ANNOUNCE_MSG_ID, ServerId(0), &payload);
        let f = f.freeze();
        *st.frame.borrow_mut() = f.clone();
        match st.style {
            Style::Tasks => {
                for c in st.conns.borrow().iter() {
                    c.wake.notify();
                }
            }
            Style::Syscall => {
                for c in st.conns.borrow().iter() {
                    // SAFETY: `c.fd` is the descriptor of a socket its task
                    // holds open for the life of the process (tasks never end
                    // in this style) with no operation in flight on it; the
                    // borrowed std handle is never dropped, so never closes it.
                    let mut s = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(c.fd) });
                    // One write(2); 72 bytes always fit an idle socket's buffer.
                    if s.write(&f).ok() != Some(f.len()) {
                        st.write_errors.set(st.write_errors.get() + 1);
                    }
                }
            }
        }
        if st.write_errors.get() > 0 {
            eprintln!("gw-rawcast: {} write errors so far", st.write_errors.get());
        }
    }
}

async fn serve(args: Args, driver: &'static str) {
    let st = Rc::new(State {
        style: args.style,
        conns: RefCell::new(Vec::new()),
        frame: RefCell::new(Bytes::new()),
        write_errors: Cell::new(0),
    });
    let l = monoio::net::TcpListener::bind(args.listen).unwrap_or_else(|e| panic!("listen {}: {e}", args.listen));
    let cl = monoio::net::TcpListener::bind(args.control).unwrap_or_else(|e| panic!("listen {}: {e}", args.control));
    println!(
        "gw-rawcast listening on {} (control {}), style {:?}, driver {driver}",
        args.listen, args.control, args.style
    );
    let st2 = st.clone();
    monoio::spawn(async move {
        loop {
            if let Ok((c, _)) = cl.accept().await {
                monoio::spawn(control(st2.clone(), c));
            }
        }
    });
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                monoio::spawn(client(st.clone(), s));
            }
            Err(e) => {
                eprintln!("gw-rawcast: accept: {e}");
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

fn main() {
    let a = Args::parse();
    match a.driver {
        Driver::Epoll => {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("epoll");
            rt.block_on(serve(a, "epoll"))
        }
        Driver::IoUring => {
            let mut rt =
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().expect("io_uring");
            rt.block_on(serve(a, "io_uring"))
        }
        Driver::Auto => match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build() {
            Ok(mut rt) => rt.block_on(serve(a, "io_uring")),
            Err(_) => {
                let mut rt =
                    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("epoll");
                rt.block_on(serve(a, "epoll"))
            }
        },
    }
}
