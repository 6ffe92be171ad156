//! fwd-monoio: one thread pinned to `--cpu`, accepts TCP clients on
//! `--listen`, opens one backend connection per client to `--backend`
//! (HAProxy tcp mode), and copies bytes both ways: one task per direction,
//! read into a 16 KiB buffer, write_all. TCP_NODELAY on both sockets.
//!
//! The ring is set up as the gateway's workers do (src/worker/mod.rs): 4096
//! entries, SINGLE_ISSUER | COOP_TASKRUN | DEFER_TASKRUN, falling back to a
//! plain ring on older kernels; `FWD_PLAIN_RING=1` forces the plain ring and
//! `FWD_EPOLL=1` the epoll (legacy) driver.
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};

include!("common.rs");

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds
    // for cpu < 1024 (CPU_SETSIZE), checked by the kernel call failing otherwise.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            eprintln!("fwd-monoio: could not pin to cpu {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

async fn pump<R: AsyncReadRent, W: AsyncWriteRent>(mut r: R, mut w: W) {
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    loop {
        let (res, b) = r.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let (res, b) = w.write_all(buf).await;
        buf = b;
        if res.is_err() {
            break;
        }
        buf.clear();
    }
    let _ = w.shutdown().await; // FIN to the peer (shutdown(SHUT_WR))
}

async fn client(c: TcpStream, backend: std::net::SocketAddr) {
    let Ok(b) = TcpStream::connect(backend).await else { return };
    let _ = c.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (cr, cw) = c.into_split();
    let (br, bw) = b.into_split();
    monoio::spawn(pump(br, cw));
    pump(cr, bw).await;
}

async fn serve(a: Args) {
    let l = TcpListener::bind(a.listen).expect("bind");
    eprintln!("fwd-monoio: {} -> {} on cpu {}", a.listen, a.backend, a.cpu);
    loop {
        match l.accept().await {
            Ok((c, _)) => {
                monoio::spawn(client(c, a.backend));
            }
            Err(e) => eprintln!("fwd-monoio: accept: {e}"),
        }
    }
}

fn main() {
    let a = args();
    pin(a.cpu);
    if std::env::var_os("FWD_EPOLL").is_some() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().expect("epoll runtime");
        eprintln!("fwd-monoio: driver epoll");
        return rt.block_on(serve(a));
    }
    let build = |urb: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).uring_builder(urb).build()
    };
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_single_issuer().setup_coop_taskrun().setup_defer_taskrun();
    let (mut rt, kind) = match std::env::var_os("FWD_PLAIN_RING") {
        Some(_) => (build(io_uring::IoUring::builder()).expect("io_uring runtime"), "plain"),
        None => match build(tuned) {
            Ok(rt) => (rt, "tuned"),
            Err(_) => (build(io_uring::IoUring::builder()).expect("io_uring runtime"), "plain"),
        },
    };
    eprintln!("fwd-monoio: driver io_uring ({kind} ring)");
    rt.block_on(serve(a));
}
