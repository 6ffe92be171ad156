//! A ledger backend: an echo backend (gate protocol) that counts exactly what
//! it processed, in counters that live in a shared memory file, so they stay
//! readable after the backend's process is SIGKILLed or while it is
//! SIGSTOPped. The same code runs in-process (threads) or as a child process
//! (this test binary re-executed, see [`BackendProc`]).
//!
//! It checks isolation on its side too: every `TRANS` of one session must
//! carry that session's tag, with increasing sequence numbers (no duplicate,
//! no reordering).

use game_gateway::protocol::backend::{self as bproto, Body, Opcode};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counter slots in the shared file.
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub enum C {
    Accepted = 0,
    /// Every frame parsed (any opcode).
    Frames,
    Trans,
    Connects,
    Disconnects,
    Pings,
    /// Frames (echoes and PONGs) whose write completed.
    Written,
    /// Echoes whose write completed.
    Echoes,
    /// A `TRANS` with another session's tag.
    TagViolations,
    /// A `TRANS` whose sequence number did not increase.
    OrderViolations,
    /// Read delay in ms per read (slow reader); 0 = none. Settable live.
    ReadDelayMs,
    /// Bytes per read (0 = 64 KiB). Settable live.
    ReadChunk,
    /// Connections closed (by either side).
    Closed,
}

const SLOTS: usize = 16;

/// Counters in a MAP_SHARED mapping of a small file.
pub struct Shm {
    ptr: *mut AtomicU64,
    pub path: PathBuf,
    owner: bool,
}

unsafe impl Send for Shm {}
unsafe impl Sync for Shm {}

impl Shm {
    /// Creates (zeroed) and maps `path`.
    pub fn create(path: &Path) -> Shm {
        std::fs::write(path, vec![0u8; 4096]).unwrap();
        let mut s = Shm::open(path);
        s.owner = true;
        s
    }

    pub fn open(path: &Path) -> Shm {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a 4096-byte file we keep open for
        // the call; the mapping outlives the descriptor and is unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap {}", path.display());
        Shm { ptr: p as *mut AtomicU64, path: path.to_path_buf(), owner: false }
    }

    fn slot(&self, c: C) -> &AtomicU64 {
        assert!((c as usize) < SLOTS);
        // SAFETY: the mapping is 4096 bytes, page aligned; SLOTS u64s fit.
        unsafe { &*self.ptr.add(c as usize) }
    }

    pub fn get(&self, c: C) -> u64 {
        self.slot(c).load(Ordering::SeqCst)
    }

    pub fn add(&self, c: C, n: u64) {
        self.slot(c).fetch_add(n, Ordering::SeqCst);
    }

    pub fn set(&self, c: C, n: u64) {
        self.slot(c).store(n, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> BackendCounts {
        BackendCounts {
            accepted: self.get(C::Accepted),
            frames: self.get(C::Frames),
            trans: self.get(C::Trans),
            connects: self.get(C::Connects),
            disconnects: self.get(C::Disconnects),
            written: self.get(C::Written),
            echoes: self.get(C::Echoes),
            tag_violations: self.get(C::TagViolations),
            order_violations: self.get(C::OrderViolations),
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 4096) };
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What one backend (or several, added) processed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendCounts {
    pub accepted: u64,
    pub frames: u64,
    pub trans: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub written: u64,
    pub echoes: u64,
    pub tag_violations: u64,
    pub order_violations: u64,
}

impl std::ops::Add for BackendCounts {
    type Output = BackendCounts;
    fn add(self, o: BackendCounts) -> BackendCounts {
        BackendCounts {
            accepted: self.accepted + o.accepted,
            frames: self.frames + o.frames,
            trans: self.trans + o.trans,
            connects: self.connects + o.connects,
            disconnects: self.disconnects + o.disconnects,
            written: self.written + o.written,
            echoes: self.echoes + o.echoes,
            tag_violations: self.tag_violations + o.tag_violations,
            order_violations: self.order_violations + o.order_violations,
        }
    }
}

/// Per session: its tag, last sequence number, `TRANS` count.
type Sessions = Arc<Mutex<HashMap<i64, (u32, u32, u64)>>>;

struct Inner {
    shm: Shm,
    stop: AtomicBool,
    sessions: Sessions,
    conns: Mutex<Vec<TcpStream>>,
}

/// Serves on `listener` until stopped (or `max` passes).
fn serve(listener: TcpListener, inner: Arc<Inner>, max: Duration) {
    listener.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut threads = Vec::new();
    while !inner.stop.load(Ordering::SeqCst) && t0.elapsed() < max {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                inner.shm.add(C::Accepted, 1);
                if let Ok(c) = s.try_clone() {
                    inner.conns.lock().unwrap().push(c);
                }
                let i2 = inner.clone();
                threads.push(std::thread::spawn(move || conn_loop(s, i2, t0 + max)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    drop(listener);
    for c in inner.conns.lock().unwrap().iter() {
        let _ = c.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

fn conn_loop(mut s: TcpStream, inner: Arc<Inner>, deadline: Instant) {
    let shm = &inner.shm;
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut out = bytes::BytesMut::with_capacity(64 * 1024);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    'conn: while Instant::now() < deadline && !inner.stop.load(Ordering::SeqCst) {
        let want = match shm.get(C::ReadChunk) as usize {
            0 => chunk.len(),
            n => n.min(chunk.len()),
        };
        let n = match s.read(&mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        let (mut echoes, mut frames) = (0u64, 0u64);
        loop {
            let h = match bproto::check(&buf[off..], 1 << 20) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => break 'conn,
            };
            let len = h.frame_len();
            let Ok(body) = bproto::parse(&h, &buf[off..off + len], false) else { break 'conn };
            shm.add(C::Frames, 1);
            match body {
                Body::Trans { payload, .. } => {
                    shm.add(C::Trans, 1);
                    let (tag, seq) = tag_seq(payload);
                    {
                        let mut m = inner.sessions.lock().unwrap();
                        let e = m.entry(h.session_id).or_insert((tag, 0, 0));
                        if e.0 != tag {
                            shm.add(C::TagViolations, 1);
                        }
                        if e.2 > 0 && seq <= e.1 {
                            shm.add(C::OrderViolations, 1);
                        }
                        e.1 = seq;
                        e.2 += 1;
                    }
                    bproto::encode_reply(&mut out, h.msg_type, h.server_id, h.session_id, payload);
                    echoes += 1;
                    frames += 1;
                }
                Body::Connect { .. } => shm.add(C::Connects, 1),
                Body::Disconnect { .. } => shm.add(C::Disconnects, 1),
                Body::Ping => {
                    shm.add(C::Pings, 1);
                    bproto::encode_ping(&mut out, Opcode::Pong, h.object_id);
                    frames += 1;
                }
                _ => {}
            }
            off += len;
        }
        buf.drain(..off);
        if !out.is_empty() {
            if s.write_all(&out).is_err() {
                break;
            }
            shm.add(C::Written, frames);
            shm.add(C::Echoes, echoes);
            out.clear();
        }
        let delay = shm.get(C::ReadDelayMs);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
    }
    shm.add(C::Closed, 1);
}

/// The (tag, seq) at the front of a load payload (see `load.rs`).
pub fn tag_seq(p: &[u8]) -> (u32, u32) {
    if p.len() < 8 {
        return (u32::MAX, 0);
    }
    (u32::from_le_bytes(p[0..4].try_into().unwrap()), u32::from_le_bytes(p[4..8].try_into().unwrap()))
}

/// An in-process ledger backend; stops when dropped.
pub struct LedgerBackend {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LedgerBackend {
    pub fn start(addr: &str) -> LedgerBackend {
        Self::on(TcpListener::bind(addr).unwrap())
    }

    /// Serves on a listener made elsewhere (a socket whose backlog was full).
    pub fn on(listener: TcpListener) -> LedgerBackend {
        let addr = listener.local_addr().unwrap();
        let path = std::env::temp_dir().join(format!("fm-backend-{}-{}", std::process::id(), super::unique()));
        let inner = Arc::new(Inner {
            shm: Shm::create(&path),
            stop: AtomicBool::new(false),
            sessions: Default::default(),
            conns: Mutex::new(Vec::new()),
        });
        let i2 = inner.clone();
        let thread = Some(std::thread::spawn(move || serve(listener, i2, Duration::from_secs(120))));
        LedgerBackend { addr, inner, thread }
    }

    pub fn counts(&self) -> BackendCounts {
        self.inner.shm.snapshot()
    }

    pub fn shm(&self) -> &Shm {
        &self.inner.shm
    }

    /// `TRANS` frames seen per session id.
    pub fn per_session(&self) -> HashMap<i64, u64> {
        self.inner.sessions.lock().unwrap().iter().map(|(k, v)| (*k, v.2)).collect()
    }
}

impl Drop for LedgerBackend {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Env vars of the child-process role.
pub const ROLE_LISTEN: &str = "FAULT_MATRIX_BACKEND_LISTEN";
pub const ROLE_SHM: &str = "FAULT_MATRIX_BACKEND_SHM";

/// Runs the backend role when this test binary was re-executed as one
/// (called from a `#[test]` that is otherwise a no-op). Bounded: 90 s.
pub fn child_role() {
    let (Ok(listen), Ok(shm)) = (std::env::var(ROLE_LISTEN), std::env::var(ROLE_SHM)) else { return };
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| panic!("backend child: bind {listen}: {e}"));
    let inner = Arc::new(Inner {
        shm: Shm::open(Path::new(&shm)),
        stop: AtomicBool::new(false),
        sessions: Default::default(),
        conns: Mutex::new(Vec::new()),
    });
    serve(listener, inner, Duration::from_secs(90));
    std::process::exit(0);
}

/// The ledger backend as a separate process (this test binary, re-executed
/// to run only the role test): SIGKILL / SIGSTOP / SIGCONT it.
pub struct BackendProc {
    pub addr: SocketAddr,
    child: Option<std::process::Child>,
    shm: Shm,
}

impl BackendProc {
    /// Starts on `addr` (a concrete port) and waits until it accepts.
    pub fn spawn(addr: SocketAddr, role_test: &str) -> BackendProc {
        let path = std::env::temp_dir().join(format!("fm-proc-{}-{}", std::process::id(), super::unique()));
        let shm = Shm::create(&path);
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([role_test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE_LISTEN, addr.to_string())
            .env(ROLE_SHM, &path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let p = BackendProc { addr, child: Some(child), shm };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            // A probe connection is counted as accepted; that is all it does.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("backend process on {addr} did not start");
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the pid of our own child, which we have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    pub fn counts(&self) -> BackendCounts {
        self.shm.snapshot()
    }
}

impl Drop for BackendProc {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped child must be continued to die promptly on SIGKILL's
            // reaping; SIGKILL works on stopped processes, but be explicit.
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill9();
    }
}
