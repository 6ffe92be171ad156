//! fwd-glommio: the same forwarder as fwd-monoio on glommio. One executor
//! pinned to `--cpu` (Placement::Fixed), accepts TCP clients on `--listen`,
//! one backend connection per client to `--backend`, bytes copied both ways
//! by one task per direction (read into a 16 KiB buffer, write_all),
//! TCP_NODELAY on both sockets.
//!
//! glommio refuses to start unless RLIMIT_MEMLOCK is at least 512 KiB, and
//! registers its I/O buffer area (`io_memory`, 10 MiB by default) with
//! io_uring, which a process without CAP_IPC_LOCK pays from that limit. So
//! the binary raises the limit to MEMLOCK_WANT before starting the executor
//! (as root, or within the hard limit), and says what it found.
//!
//! glommio streams are poll-based (futures AsyncRead/AsyncWrite), not owned
//! halves: each direction's task holds one half of `futures_lite::io::split`
//! (an uncontended mutex around the stream, taken per poll).
use futures_lite::io::{split, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::{TcpListener, TcpStream};
use glommio::{spawn_local, LocalExecutorBuilder, Placement};

include!("common.rs");

const MEMLOCK_WANT: u64 = 64 << 20;

fn raise_memlock() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r);
        let before = r.rlim_cur;
        if r.rlim_cur != libc::RLIM_INFINITY && r.rlim_cur < MEMLOCK_WANT {
            let want = libc::rlimit { rlim_cur: MEMLOCK_WANT, rlim_max: r.rlim_max.max(MEMLOCK_WANT) };
            let fallback = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) != 0 {
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &fallback); // as far as the hard limit allows
            }
        }
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r);
        eprintln!("fwd-glommio: RLIMIT_MEMLOCK soft {} KiB -> {} KiB", before / 1024, r.rlim_cur / 1024);
    }
}

async fn pump(mut r: ReadHalf<TcpStream>, mut w: WriteHalf<TcpStream>) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.close().await; // FIN to the peer (shutdown(SHUT_WR))
}

async fn client(c: TcpStream, backend: std::net::SocketAddr) {
    let Ok(b) = TcpStream::connect(backend).await else { return };
    let _ = c.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (cr, cw) = split(c);
    let (br, bw) = split(b);
    spawn_local(pump(br, cw)).detach();
    pump(cr, bw).await;
}

async fn serve(a: Args) {
    let l = TcpListener::bind(a.listen).expect("bind");
    eprintln!("fwd-glommio: {} -> {} on cpu {}", a.listen, a.backend, a.cpu);
    loop {
        match l.accept().await {
            Ok(c) => {
                spawn_local(client(c, a.backend)).detach();
            }
            Err(e) => eprintln!("fwd-glommio: accept: {e}"),
        }
    }
}

fn main() {
    let a = args();
    if std::env::var_os("FWD_KEEP_MEMLOCK").is_none() {
        raise_memlock();
    }
    let cpu = a.cpu;
    // Same submission depth as fwd-monoio and the gateway (glommio's default
    // is 128); FWD_RING_DEPTH overrides it.
    let depth = std::env::var("FWD_RING_DEPTH").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let ex = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name("fwd-glommio")
        .ring_depth(depth)
        .spawn(move || serve(a));
    // The executor (and its io_uring reactor) is built inside the spawned
    // thread: a reactor error comes back from join.
    if let Err(e) = ex.map_err(|e| e.to_string()).and_then(|h| h.join().map_err(|e| e.to_string())) {
        eprintln!("fwd-glommio: executor failed: {e}");
        std::process::exit(1);
    }
}
