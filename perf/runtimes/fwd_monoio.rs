//! fwd-monoio: one thread pinned to `--cpu`, accepts TCP clients on
//! `--listen`, opens one backend connection per client to `--backend`
//! (HAProxy tcp mode), and copies bytes both ways: one task per direction,
//! read into a 16 KiB buffer, write_all. TCP_NODELAY on both sockets.
//!
//! The runtime is set up as the gateway's workers do (src/worker/mod.rs): an
//! io_uring with 4096 entries and SINGLE_ISSUER | COOP_TASKRUN |
//! DEFER_TASKRUN, else a plain ring (kernels before 6.1), else, where the
//! kernel refuses io_uring (EPERM/ENOSYS/EACCES/ENOMEM: seccomp,
//! kernel.io_uring_disabled, memlock), the epoll (legacy) driver.
//! `FWD_PLAIN_RING=1` forces the plain ring and `FWD_EPOLL=1` epoll.
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
    let epoll = |a: Args, why: &str| {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().expect("epoll runtime");
        eprintln!("fwd-monoio: driver epoll{why}");
        rt.block_on(serve(a))
    };
    if std::env::var_os("FWD_EPOLL").is_some() {
        return epoll(a, "");
    }
    let build = |urb: io_uring::Builder| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).uring_builder(urb).build()
    };
    let mut tuned = io_uring::IoUring::builder();
    tuned.setup_single_issuer().setup_coop_taskrun().setup_defer_taskrun();
    let plain = std::env::var_os("FWD_PLAIN_RING").is_some();
    let (rt, kind) = match if plain { None } else { build(tuned).ok() } {
        Some(rt) => (Ok(rt), "tuned"),
        None => (build(io_uring::IoUring::builder()), "plain"),
    };
    match rt {
        Ok(mut rt) => {
            eprintln!("fwd-monoio: driver io_uring ({kind} ring)");
            rt.block_on(serve(a))
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS | libc::EACCES | libc::ENOMEM)) => {
            epoll(a, &format!(" (io_uring refused: {e})"))
        }
        Err(e) => panic!("io_uring runtime: {e}"),
    }
}
