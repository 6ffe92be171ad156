//! Live upgrade: a new gateway process takes over every listener, client
//! socket, backend connection and session of a running one, dropping none.
//! Operators' guide: docs/OPERATIONS.md "Live upgrade".
//!
//! The two processes talk over a Unix stream socket (`[upgrade] socket`):
//! the old process listens on it; the new one is started with
//! `--takeover PATH` (by hand, or by the old process itself on SIGUSR2).
//!
//! ```text
//!  new                                   old
//!  Hello{version} -------------------->  refuses a different version (nothing moved)
//!                 <--------------------  Welcome
//!                 <--------------------  Listeners + their descriptors
//!  starts its workers on them (both accept now: no connection is refused)
//!  ListenersTaken -------------------->  every worker: freeze (stop accepting,
//!                                        stop each socket at an operation boundary,
//!                                        export the shard with the bytes its tasks hold)
//!                 <--------------------  Shard{snapshot} + descriptors (batches), per worker
//!                 <--------------------  Exported{counts, when frozen}
//!  checks it all
//!  Ready -------------------------------> Commit: its workers retire (no socket
//!                 <--------------------   touched) and the process exits
//!  old worker i -> new worker i mod n: import, start the sockets' tasks
//! ```
//! Failure is safe up to `Ready`: if the new process fails, refuses or goes
//! silent before it, the old one thaws every worker and goes on where it
//! stopped (the new process's copies of the descriptors close with it). After
//! `Commit`, the new process owns everything.
//!
//! Messages are postcard-encoded, each behind a 4-byte little-endian length;
//! descriptors travel by SCM_RIGHTS, at most [`FD_BATCH`] per message, each
//! batch announced by an `Fds` message and attached to one marker byte.

use crate::shard::handoff::{ShardSnapshot, HANDOFF_VERSION};
use crate::worker::handoff::{AdoptReport, FREEZE_TIMEOUT};
use crate::worker::WorkerCommand;
use crossbeam_channel::{bounded, Sender};
use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Descriptors per SCM_RIGHTS message (the kernel takes at most 253).
pub const FD_BATCH: usize = 200;
/// Longest wait for the other side's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the new process may take to start its workers.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message the new process accepts (a snapshot of one worker's
/// sessions, from the old process it chose to connect to).
const MAX_MESSAGE: usize = 1 << 30;
/// Largest message the old process accepts: the new process only ever sends
/// small ones (Hello, ListenersTaken, Ready, Abort). A peer that announced
/// 2^30 bytes made the old process allocate them.
const MAX_MESSAGE_FROM_NEW: usize = 64 * 1024;
/// The new process must say Hello this soon after connecting; until it has,
/// nothing else happens (no fast ticks, nothing frozen, nothing passed).
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed handover the old process accepts the next attempt only
/// after this long (doubled per failure in a row, up to
/// [`RETRY_BACKOFF_MAX`]): a peer cannot freeze every session over and over.
const RETRY_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Test hook: `GAME_GATEWAY_TEST_UPGRADE_FAIL=before-ready` makes the new
/// process exit just before it confirms (the old one must resume);
/// `=version` makes it announce another protocol version.
pub const TEST_FAIL_ENV: &str = "GAME_GATEWAY_TEST_UPGRADE_FAIL";

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Hello { version: u32, binary: String, pid: u32, workers: u32 },
    Welcome { version: u32, binary: String, pid: u32, workers: u32 },
    Refused { reason: String },
    Listeners { addr: SocketAddr, count: u32 },
    Fds { count: u32 },
    ListenersTaken,
    Shard { snapshot: Box<ShardSnapshot>, fds: u32 },
    Exported { workers: u32, sessions: u64, conns: u64, not_carried: u64, frozen_at_unix_us: u64 },
    Ready { sessions: u64 },
    Commit,
    Abort { reason: String },
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Welcome { .. } => "Welcome",
            Msg::Refused { .. } => "Refused",
            Msg::Listeners { .. } => "Listeners",
            Msg::Fds { .. } => "Fds",
            Msg::ListenersTaken => "ListenersTaken",
            Msg::Shard { .. } => "Shard",
            Msg::Exported { .. } => "Exported",
            Msg::Ready { .. } => "Ready",
            Msg::Commit => "Commit",
            Msg::Abort { .. } => "Abort",
        }
    }
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The framed, descriptor-carrying channel between the two processes.
struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// The largest message this side accepts.
    max_message: usize,
}

impl Channel {
    fn new(stream: UnixStream, max_message: usize) -> Channel {
        Channel { stream, buf: Vec::new(), fds: VecDeque::new(), max_message }
    }

    fn send(&mut self, m: &Msg) -> Result<(), String> {
        let body = postcard::to_stdvec(m).map_err(|e| format!("encode {}: {e}", m.name()))?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).map_err(|e| format!("send {}: {e}", m.name()))
    }

    /// Sends descriptors, in batches.
    fn send_fds(&mut self, fds: &[RawFd]) -> Result<(), String> {
        for batch in fds.chunks(FD_BATCH) {
            self.send(&Msg::Fds { count: batch.len() as u32 })?;
            let n = self.stream.send_with_fd(&[0u8], batch).map_err(|e| format!("send descriptors: {e}"))?;
            if n != 1 {
                return Err("send descriptors: marker byte not sent".into());
            }
        }
        Ok(())
    }

    /// Reads more bytes (and any descriptors that come with them).
    fn fill(&mut self, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for the other process".into());
        }
        let _ = self.stream.set_read_timeout(Some(left));
        let mut chunk = vec![0u8; 64 * 1024];
        let mut fds = [0 as RawFd; 253];
        match self.stream.recv_with_fd(&mut chunk, &mut fds) {
            Ok((0, _)) => Err("the other process closed the upgrade socket".into()),
            Ok((n, nfds)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                for &fd in &fds[..nfds] {
                    // SAFETY: received by SCM_RIGHTS just now: a new descriptor of
                    // this process that nothing else owns.
                    self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                Ok(())
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err("timed out waiting for the other process".into())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Result<Msg, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if len > self.max_message {
                    return Err(format!("message of {len} bytes: over the {}-byte limit", self.max_message));
                }
                if self.buf.len() >= 4 + len {
                    let m = postcard::from_bytes(&self.buf[4..4 + len]).map_err(|e| format!("decode: {e}"));
                    self.buf.drain(..4 + len);
                    return m;
                }
            }
            self.fill(deadline)?;
        }
    }

    /// Receives `count` descriptors (announced by `Fds` messages).
    fn recv_fds(&mut self, count: usize, timeout: Duration) -> Result<Vec<OwnedFd>, String> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            match self.recv(deadline.saturating_duration_since(Instant::now()))? {
                Msg::Fds { count: n } => {
                    // The marker byte carries them.
                    while self.buf.is_empty() {
                        self.fill(deadline)?;
                    }
                    self.buf.remove(0);
                    if self.fds.len() < n as usize {
                        return Err(format!("{n} descriptors announced, {} arrived", self.fds.len()));
                    }
                    out.extend(self.fds.drain(..n as usize));
                }
                Msg::Abort { reason } => return Err(format!("the old process abandoned the upgrade: {reason}")),
                m => return Err(format!("expected descriptors, got {}", m.name())),
            }
        }
        Ok(out)
    }
}

/// What `/status` shows of the last live upgrade (either side).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpgradeStatus {
    /// "old" (handing over) or "new" (taking over).
    pub role: &'static str,
    /// The current or last phase.
    pub phase: String,
    /// The other process's pid.
    pub peer_pid: u32,
    pub started_unix_ms: u64,
    pub sessions: u64,
    pub conns: u64,
    pub not_carried: u64,
    pub lost: u64,
    /// From the first worker frozen to the last session adopted.
    pub pause_ms: Option<f64>,
    pub error: Option<String>,
}

static STATUS: Mutex<Option<UpgradeStatus>> = Mutex::new(None);

/// A handover is under way in this process: workers look at their command
/// channel every millisecond instead of every tick.
static IN_PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once this process sent Commit: everything is the successor's, the
/// upgrade socket's path included. A stop signal from here on has nothing to
/// drain and must not touch that path.
static COMMITTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process has handed everything over (sent Commit).
pub fn committed() -> bool {
    COMMITTED.load(std::sync::atomic::Ordering::Acquire)
}

/// Whether a handover is under way in this process.
pub fn in_progress() -> bool {
    IN_PROGRESS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Marks a handover under way for as long as it lives.
struct InProgress;

impl InProgress {
    fn start() -> InProgress {
        IN_PROGRESS.store(true, std::sync::atomic::Ordering::Relaxed);
        InProgress
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        IN_PROGRESS.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The last live upgrade's status, if any happened.
pub fn status() -> Option<UpgradeStatus> {
    STATUS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set_status(f: impl FnOnce(&mut UpgradeStatus)) {
    let mut s = STATUS.lock().unwrap_or_else(|e| e.into_inner());
    f(s.get_or_insert_with(UpgradeStatus::default));
}

fn phase(role: &'static str, p: &str) {
    tracing::info!(role, phase = p, "live upgrade");
    set_status(|s| {
        s.role = role;
        s.phase = p.to_string();
    });
}

/// The listening sockets a process serves on, per worker, kept (as
/// duplicates) by the control side for a live upgrade. Dropped when a drain
/// starts, so a stopping gateway's port closes as before.
#[derive(Clone, Default)]
pub struct Listeners(Arc<Mutex<Option<Vec<WorkerListener>>>>);

/// A listening socket and the worker that serves it.
type WorkerListener = (usize, TcpListener);

impl Listeners {
    pub fn new(per_worker: Vec<WorkerListener>) -> Listeners {
        Listeners(Arc::new(Mutex::new(Some(per_worker))))
    }

    /// Drop them (a drain began).
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// A drain began (or the upgrade completed).
    fn is_closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn raw_fds(&self) -> Option<Vec<RawFd>> {
        let l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        l.as_ref().map(|v| v.iter().map(|(_, l)| l.as_raw_fd()).collect())
    }

    /// One more listening socket of `worker` (bound after the start).
    pub fn add(&self, worker: usize, l: TcpListener) {
        if let Some(v) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            v.push((worker, l));
        }
    }

    fn for_worker(&self, worker: usize) -> Vec<TcpListener> {
        let l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().flatten().filter(|(w, _)| *w == worker).filter_map(|(_, l)| l.try_clone().ok()).collect()
    }
}

/// What the old side needs from the gateway.
pub struct Source {
    pub workers: Vec<Sender<WorkerCommand>>,
    pub listeners: Listeners,
    pub local_addr: SocketAddr,
}

/// Old process: listens on `path` for a new process; runs one handover at a
/// time. On success `done` is called (the control loop exits the process).
pub fn serve(
    path: &Path,
    peer_exe: Option<std::path::PathBuf>,
    source: Source,
    done: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    if path.exists() {
        // A stale socket from an earlier process (a live one would have
        // handed over and exited by now, or is this process's parent).
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Only this user may take the sockets over.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    let path = path.to_path_buf();
    std::thread::Builder::new().name("gw-upgrade".into()).spawn(move || {
        tracing::info!(socket = %path.display(), "live upgrade: listening for a new process");
        let mut backoff = RETRY_BACKOFF_MIN;
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "live upgrade: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let peer_pid = match check_peer(&conn, &peer_exe) {
                Ok(pid) => pid,
                Err(e) => {
                    tracing::error!(error = %e, "live upgrade: peer refused");
                    set_status(|s| {
                        s.phase = "refused a peer".into();
                        s.error = Some(e);
                    });
                    continue;
                }
            };
            let result = hand_over(Channel::new(conn, MAX_MESSAGE_FROM_NEW), &source, peer_pid);
            if result.is_ok() {
                backoff = RETRY_BACKOFF_MIN;
            }
            match result {
                Ok(()) => {
                    // The socket file is left alone: the new process binds
                    // its own at the same path (removing this one first).
                    if std::env::var(TEST_FAIL_ENV).as_deref() == Ok("slow-done") {
                        // Test hook: a stop signal lands between Commit and
                        // the control loop hearing of it.
                        std::thread::sleep(Duration::from_secs(3));
                    }
                    done();
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_after_s = backoff.as_secs(), "live upgrade failed: this process goes on serving");
                    set_status(|s| {
                        s.phase = "failed: resumed".into();
                        s.error = Some(e);
                    });
                    // The next attempt waits (connections queue in the
                    // backlog meanwhile).
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    })?;
    Ok(())
}

/// The connecting process must be of this user (SO_PEERCRED; the socket file
/// is 0600 too) and, when `[server] upgrade_peer_exe` is set, run that
/// executable. Checked before anything is said to it.
fn check_peer(conn: &UnixStream, exe: &Option<std::path::PathBuf>) -> Result<u32, String> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for the call; the descriptor is the
    // connection this function borrows.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me {
        return Err(format!("process {} runs as uid {}, this process as {me}", cred.pid, cred.uid));
    }
    if let Some(want) = exe {
        let got = std::fs::read_link(format!("/proc/{}/exe", cred.pid))
            .map_err(|e| format!("process {}: its executable cannot be read: {e}", cred.pid))?;
        if &got != want {
            return Err(format!(
                "process {} runs {}, not {} (server.upgrade_peer_exe)",
                cred.pid,
                got.display(),
                want.display()
            ));
        }
    }
    Ok(cred.pid as u32)
}

/// Old side of one handover.
fn hand_over(mut ch: Channel, src: &Source, peer_pid: u32) -> Result<(), String> {
    let (version, pid) = match ch.recv(HELLO_TIMEOUT)? {
        Msg::Hello { version, binary, pid, workers } => {
            set_status(|s| {
                *s = UpgradeStatus {
                    role: "old",
                    peer_pid: pid,
                    started_unix_ms: unix_us() / 1000,
                    ..Default::default()
                }
            });
            tracing::info!(peer_pid = pid, peer_version = %binary, peer_workers = workers, "live upgrade: a new process asks to take over");
            (version, pid)
        }
        m => return Err(format!("expected Hello, got {}", m.name())),
    };
    if pid != peer_pid {
        let _ = ch.send(&Msg::Refused { reason: "pid does not match the connection's credentials".into() });
        return Err(format!("refused: Hello says pid {pid}, the connection is process {peer_pid}"));
    }
    if version != HANDOFF_VERSION {
        let reason = format!("handoff protocol version {version}, this process speaks {HANDOFF_VERSION}");
        let _ = ch.send(&Msg::Refused { reason: reason.clone() });
        return Err(format!("refused process {pid}: {reason}"));
    }
    // A compatible peer said Hello: from here on the workers look at their
    // commands every millisecond (not for a peer that says nothing).
    let _fast = InProgress::start();
    ch.send(&Msg::Welcome {
        version: HANDOFF_VERSION,
        binary: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        workers: src.workers.len() as u32,
    })?;
    phase("old", "passing listeners");
    let fds = src.listeners.raw_fds().ok_or("this process is draining: nothing to hand over")?;
    ch.send(&Msg::Listeners { addr: src.local_addr, count: fds.len() as u32 })?;
    ch.send_fds(&fds)?;
    match ch.recv(START_TIMEOUT)? {
        Msg::ListenersTaken => {}
        Msg::Abort { reason } => return Err(format!("the new process gave up: {reason}")),
        m => return Err(format!("expected ListenersTaken, got {}", m.name())),
    }
    phase("old", "freezing workers");
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let epoch = EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let frozen_at = unix_us();
    let replies: Vec<_> = src
        .workers
        .iter()
        .map(|tx| {
            let (rtx, rrx) = bounded(1);
            let sent = tx.send_timeout(WorkerCommand::Freeze(epoch, rtx), Duration::from_secs(1)).is_ok();
            (sent, rrx)
        })
        .collect();
    let mut exports: Vec<crate::worker::handoff::WorkerExport> = Vec::new();
    let mut failure = None;
    for (i, (sent, rx)) in replies.into_iter().enumerate() {
        let r = if sent {
            rx.recv_timeout(FREEZE_TIMEOUT + Duration::from_secs(2)).map_err(|_| format!("worker {i} did not answer"))
        } else {
            Err(format!("worker {i}: command channel full"))
        };
        match r.and_then(|r| r) {
            Ok(e) => exports.push(e),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let thaw = || {
        for (i, tx) in src.workers.iter().enumerate() {
            let _ = tx.send_timeout(WorkerCommand::Thaw(epoch, src.listeners.for_worker(i)), Duration::from_secs(1));
        }
    };
    if let Some(e) = failure {
        thaw();
        let _ = ch.send(&Msg::Abort { reason: e.clone() });
        return Err(e);
    }
    phase("old", "sending sessions");
    let handed: Vec<u64> = exports.iter().map(|e| e.snapshot.sessions.len() as u64).collect();
    let sent = (|| {
        let (mut sessions, mut conns, mut not_carried) = (0u64, 0u64, 0u64);
        for e in &exports {
            sessions += e.snapshot.sessions.len() as u64;
            conns += e.snapshot.conns.len() as u64;
            not_carried += e.not_carried as u64;
        }
        for e in exports.iter_mut() {
            let snapshot = Box::new(std::mem::take(&mut e.snapshot));
            ch.send(&Msg::Shard { snapshot, fds: e.fds.len() as u32 })?;
            // The frozen worker keeps them open until it is thawed or
            // retired, both after this (see `WorkerExport::fds`).
            ch.send_fds(&e.fds)?;
        }
        ch.send(&Msg::Exported {
            workers: exports.len() as u32,
            sessions,
            conns,
            not_carried,
            frozen_at_unix_us: frozen_at,
        })?;
        set_status(|s| {
            s.sessions = sessions;
            s.conns = conns;
            s.not_carried = not_carried;
        });
        match ch.recv(STEP_TIMEOUT)? {
            Msg::Ready { sessions: got } if got == sessions => Ok(()),
            Msg::Ready { sessions: got } => Err(format!("the new process took {got} sessions of {sessions}")),
            Msg::Abort { reason } => Err(format!("the new process gave up: {reason}")),
            m => Err(format!("expected Ready, got {}", m.name())),
        }
    })();
    if let Err(e) = sent {
        thaw();
        let _ = ch.send(&Msg::Abort { reason: e.clone() });
        return Err(e);
    }
    // A drain that began meanwhile wins: this process keeps its sessions
    // (and drains them) rather than handing over a half-drained state.
    if src.listeners.is_closed() {
        thaw();
        let _ = ch.send(&Msg::Abort { reason: "the old process began draining".into() });
        return Err("a drain began during the handover".into());
    }
    // From here the new process owns everything: once Commit is sent it
    // adopts whatever happens. If it cannot be sent the new process is gone
    // (it exits without Commit), so this one goes on.
    if let Err(e) = ch.send(&Msg::Commit) {
        thaw();
        return Err(e);
    }
    COMMITTED.store(true, std::sync::atomic::Ordering::Release);
    src.listeners.close();
    for ((tx, e), handed) in src.workers.iter().zip(&exports).zip(handed) {
        let _ = tx
            .send_timeout(WorkerCommand::Retire { handed, not_carried: e.not_carried as u64 }, Duration::from_secs(1));
    }
    phase("old", "handed over");
    Ok(())
}

/// New side: the connection to the old process, between taking its
/// listeners and taking its sessions.
pub struct Takeover {
    ch: Channel,
    pub old_pid: u32,
    /// The old process's listening sockets and their address.
    pub listeners: Vec<TcpListener>,
    pub addr: SocketAddr,
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No gateway listens on the socket (missing, or refused): nothing to
    /// take over.
    #[error("no gateway answers: {0}")]
    NobodyThere(String),
    /// A gateway answered and the takeover failed (nothing moved).
    #[error("{0}")]
    Failed(String),
}

impl From<String> for ConnectError {
    fn from(e: String) -> ConnectError {
        ConnectError::Failed(e)
    }
}

/// New process, step 1: connect, agree on the version, take the listeners.
pub fn connect(path: &Path, workers: usize) -> Result<Takeover, ConnectError> {
    let stream = UnixStream::connect(path).map_err(|e| {
        let msg = format!("{}: {e}", path.display());
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ConnectError::NobodyThere(msg),
            _ => ConnectError::Failed(msg),
        }
    })?;
    let mut ch = Channel::new(stream, MAX_MESSAGE);
    let version =
        if std::env::var(TEST_FAIL_ENV).as_deref() == Ok("version") { HANDOFF_VERSION + 1000 } else { HANDOFF_VERSION };
    ch.send(&Msg::Hello {
        version,
        binary: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        workers: workers as u32,
    })?;
    let old_pid = match ch.recv(STEP_TIMEOUT)? {
        Msg::Welcome { pid, binary, workers, .. } => {
            tracing::info!(old_pid = pid, old_version = %binary, old_workers = workers, "live upgrade: the old process agreed");
            pid
        }
        Msg::Refused { reason } => return Err(format!("the old process refused: {reason}").into()),
        m => return Err(format!("expected Welcome, got {}", m.name()).into()),
    };
    set_status(|s| {
        *s = UpgradeStatus { role: "new", peer_pid: old_pid, started_unix_ms: unix_us() / 1000, ..Default::default() }
    });
    phase("new", "taking listeners");
    let (addr, count) = match ch.recv(STEP_TIMEOUT)? {
        Msg::Listeners { addr, count } => (addr, count as usize),
        Msg::Abort { reason } => return Err(format!("the old process abandoned the upgrade: {reason}").into()),
        m => return Err(format!("expected Listeners, got {}", m.name()).into()),
    };
    let listeners = ch.recv_fds(count, STEP_TIMEOUT)?.into_iter().map(TcpListener::from).collect();
    Ok(Takeover { ch, old_pid, listeners, addr })
}

/// What the new process took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken {
    pub sessions: u64,
    pub conns: u64,
    pub lost: u64,
    pub not_carried: u64,
    pub pause: Duration,
}

impl Takeover {
    /// New process, step 2 (its workers run on the listeners): take every
    /// session and stream, confirm, and adopt them into `workers` (old
    /// worker i goes to new worker i mod n, with its backend streams, so
    /// no session changes stream and backends see nothing).
    pub fn take(mut self, workers: &[Sender<WorkerCommand>]) -> Result<Taken, String> {
        let _fast = InProgress::start();
        let ch = &mut self.ch;
        ch.send(&Msg::ListenersTaken)?;
        phase("new", "receiving sessions");
        let mut shards = Vec::new();
        let (sessions, conns, not_carried, frozen_at) = loop {
            match ch.recv(FREEZE_TIMEOUT + STEP_TIMEOUT)? {
                Msg::Shard { snapshot, fds } => {
                    let fds = ch.recv_fds(fds as usize, STEP_TIMEOUT)?;
                    check(&snapshot, fds.len())?;
                    shards.push((snapshot, fds));
                }
                Msg::Exported { sessions, conns, not_carried, frozen_at_unix_us, .. } => {
                    break (sessions, conns, not_carried, frozen_at_unix_us)
                }
                Msg::Abort { reason } => return Err(format!("the old process abandoned the upgrade: {reason}")),
                m => return Err(format!("expected Shard or Exported, got {}", m.name())),
            }
        };
        let got: u64 = shards.iter().map(|(s, _)| s.sessions.len() as u64).sum();
        if got != sessions {
            let reason = format!("{got} sessions arrived of {sessions}");
            let _ = ch.send(&Msg::Abort { reason: reason.clone() });
            return Err(reason);
        }
        if std::env::var(TEST_FAIL_ENV).as_deref() == Ok("before-ready") {
            tracing::error!("live upgrade: {TEST_FAIL_ENV}=before-ready: exiting before confirming");
            std::process::exit(3);
        }
        ch.send(&Msg::Ready { sessions })?;
        match ch.recv(STEP_TIMEOUT)? {
            Msg::Commit => {}
            Msg::Abort { reason } => return Err(format!("the old process abandoned the upgrade: {reason}")),
            m => return Err(format!("expected Commit, got {}", m.name())),
        }
        // Committed: everything is this process's now, whatever happens
        // next. Nothing below returns an error; what cannot be adopted is
        // counted lost and the process serves the rest.
        phase("new", "adopting sessions");
        let n = workers.len().max(1);
        let mut replies = Vec::new();
        for (snapshot, fds) in shards {
            let to = snapshot.worker as usize % n;
            let (tx, rx) = bounded(1);
            let count = snapshot.sessions.len();
            // Blocking: a worker that is slow to take it still takes it.
            if workers[to].send(WorkerCommand::Adopt(snapshot, fds, tx)).is_err() {
                tracing::error!(worker = to, sessions = count, "live upgrade: worker gone: its sessions are lost");
                continue;
            }
            replies.push(rx);
        }
        let mut report = AdoptReport::default();
        for rx in replies {
            // Adopting is quick (about 10 µs a session); a worker that does
            // not answer in a minute is stuck, and the rest must not wait.
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(r) => {
                    report.sessions += r.sessions;
                    report.conns += r.conns;
                    report.lost += r.lost;
                }
                Err(_) => tracing::error!(
                    "live upgrade: a worker did not report its adoption: its sessions are unaccounted for"
                ),
            }
        }
        let pause = Duration::from_micros(unix_us().saturating_sub(frozen_at));
        let taken = Taken {
            sessions: report.sessions as u64,
            conns: report.conns as u64,
            lost: report.lost as u64 + sessions.saturating_sub(report.sessions as u64 + report.lost as u64),
            not_carried,
            pause,
        };
        set_status(|s| {
            s.phase = "complete".into();
            s.sessions = taken.sessions;
            s.conns = taken.conns;
            s.lost = taken.lost;
            s.not_carried = not_carried;
            s.pause_ms = Some((pause.as_secs_f64() * 1e4).round() / 10.0);
        });
        tracing::info!(
            sessions = taken.sessions,
            backend_streams = taken.conns,
            expected_streams = conns,
            lost = taken.lost,
            not_carried,
            pause_ms = (pause.as_secs_f64() * 1e4).round() / 10.0,
            "live upgrade complete"
        );
        Ok(taken)
    }
}

/// A snapshot's descriptor indices must all name one of the `fds` sent.
fn check(s: &ShardSnapshot, fds: usize) -> Result<(), String> {
    let bad = s
        .sessions
        .iter()
        .map(|x| Some(x.fd))
        .chain(s.conns.iter().map(|c| c.fd))
        .flatten()
        .find(|&i| i as usize >= fds);
    match bad {
        Some(i) => Err(format!("worker {}: descriptor {i} named, {fds} sent", s.worker)),
        None => Ok(()),
    }
}

/// This process's arguments for its successor: the takeover flags a process
/// started by an earlier upgrade carries (`--takeover PATH`,
/// `--takeover-or-start PATH`, or their `=PATH` forms) removed; the caller
/// adds `--takeover`.
fn successor_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--takeover" || s == "--takeover-or-start" {
            it.next();
        } else if !(s.starts_with("--takeover=") || s.starts_with("--takeover-or-start=")) {
            out.push(a);
        }
    }
    out
}

/// Old process, on SIGUSR2: start this binary again, with the same
/// arguments and `--takeover PATH`; it takes everything over and this
/// process exits.
pub fn reexec(socket: &Path) -> std::io::Result<u32> {
    // Replaced on disk (the upgrade's point), the running binary's path
    // reads "... (deleted)": the new file is at the path without it.
    let mut exe = std::env::current_exe()?;
    if let Some(p) = exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        exe = std::path::PathBuf::from(p);
    }
    let args = successor_args(std::env::args_os().skip(1).collect());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).arg("--takeover").arg(socket);
    // Descriptors this process holds without close-on-exec (sockets accepted
    // by io_uring have none) must not reach the new process: it would keep
    // every client connection open after closing its own copy.
    // SAFETY: close_range(2) is async-signal-safe and touches no memory.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let (first, last) = (3 as libc::c_uint, libc::c_uint::MAX);
            if libc::syscall(libc::SYS_close_range, first, last, libc::CLOSE_RANGE_CLOEXEC) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    // Reaped here, so a successor that fails does not linger as a zombie
    // while this process goes on; its exit is logged.
    let _ = std::thread::Builder::new().name("gw-successor".into()).spawn(move || match child.wait() {
        Ok(st) if st.success() => tracing::info!(pid, "successor process exited"),
        Ok(st) => tracing::warn!(pid, status = %st, "successor process exited"),
        Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the successor process"),
    });
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_gets_the_arguments_without_earlier_takeover_flags() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        for given in [
            &["--config", "/etc/g.toml", "--takeover", "/run/a.sock", "--workers", "4"][..],
            &["--config", "/etc/g.toml", "--takeover-or-start", "/run/a.sock", "--workers", "4"],
            &["--config", "/etc/g.toml", "--takeover=/run/a.sock", "--workers", "4"],
            &["--takeover-or-start=/run/a.sock", "--config", "/etc/g.toml", "--workers", "4"],
        ] {
            let got = successor_args(args(given));
            let mut got: Vec<String> = got.iter().map(|a| a.to_string_lossy().into_owned()).collect();
            got.sort();
            assert_eq!(got, ["--config", "--workers", "/etc/g.toml", "4"], "{given:?}");
        }
    }
}
