//! Shared helpers for integration tests: a gateway on port 0 (in-process or
//! as the real binary), blocking game clients, and the mock backend.
#![allow(dead_code)]

pub mod pybackend;
pub mod tls;

use game_gateway::config::Config;
use game_gateway::control::static_routes;
use game_gateway::gateway::Gateway;
use game_gateway::protocol::{client as cproto, ServerId};
pub use mock_backend::{Event, MockBackend, Options};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const T: Duration = Duration::from_secs(5);

/// The I/O driver under test: `GATEWAY_TEST_IO_DRIVER` (auto, io_uring, epoll).
pub fn driver() -> String {
    std::env::var("GATEWAY_TEST_IO_DRIVER").unwrap_or_else(|_| "auto".into())
}

pub fn mock() -> MockBackend {
    MockBackend::start("127.0.0.1:0", Options::default()).unwrap()
}

pub fn mock_with(opts: Options) -> MockBackend {
    MockBackend::start("127.0.0.1:0", opts).unwrap()
}

/// A `[[routes]]` entry.
pub fn route(server_type: u8, world: u16, strategy: &str, eps: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[routes]]\nserver_type = {server_type}\nworld_id = {world}\nservice_name = \"svc{server_type}\"\nstrategy = \"{strategy}\"\nendpoints = [{}]\n{extra}\n",
        eps.join(", ")
    )
}

/// Config text for a test gateway: port 0, `workers`, the driver under test.
pub fn config_text(workers: usize, extra: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nworkers = {workers}\nio_driver = \"{}\"\ndrain_timeout = \"1s\"\n{extra}\n[log]\nlevel = \"warn\"\nformat = \"text\"\n\n{routes}",
        driver()
    )
}

pub fn start(workers: usize, extra: &str, routes: &str) -> Gateway {
    let mut cfg = Config::from_str(&config_text(workers, extra, routes), "test.toml").unwrap_or_else(|e| panic!("{e}"));
    // In-process gateways would print access-log records into the test output.
    cfg.log.access_log = false;
    let table = static_routes(&cfg, 1);
    Gateway::start(cfg, table).unwrap()
}

/// A blocking game client.
pub struct Client {
    pub s: TcpStream,
}

pub fn sid(world: u16, server_type: u8, inst: u8) -> u32 {
    ServerId::new(false, world, server_type, inst).0
}

#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub msg_id: u16,
    pub server_id: u32,
    pub payload: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Client { s }
    }

    pub fn local(&self) -> SocketAddr {
        self.s.local_addr().unwrap()
    }

    pub fn frame(msg_id: u16, server_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        assert!(cproto::encode(&mut b, msg_id, ServerId(server_id), payload));
        b.to_vec()
    }

    pub fn send(&mut self, msg_id: u16, server_id: u32, payload: &[u8]) {
        self.s.write_all(&Self::frame(msg_id, server_id, payload)).unwrap();
    }

    pub fn send_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Next frame, or `None` on EOF / error / timeout.
    pub fn try_recv(&mut self) -> Option<Reply> {
        let mut h = [0u8; 8];
        self.s.read_exact(&mut h).ok()?;
        let len = u16::from_le_bytes([h[0], h[1]]) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).ok()?;
        Some(Reply {
            msg_id: u16::from_le_bytes([h[2], h[3]]),
            server_id: u32::from_le_bytes(h[4..8].try_into().unwrap()),
            payload,
        })
    }

    pub fn recv(&mut self) -> Reply {
        self.try_recv().expect("expected a frame from the gateway")
    }

    /// Round trip of one frame; asserts the echo.
    pub fn echo(&mut self, msg_id: u16, server_id: u32, payload: &[u8]) {
        self.send(msg_id, server_id, payload);
        let r = self.recv();
        assert_eq!((r.msg_id, r.server_id, r.payload.len()), (msg_id, server_id, payload.len()));
        assert_eq!(r.payload, payload);
    }

    /// True when the gateway closes the connection within `T` (EOF or reset),
    /// false when a frame arrives or nothing happens.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }

    /// Asserts nothing arrives within `d`.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 1];
        let r = self.s.read(&mut b);
        self.s.set_read_timeout(Some(T)).unwrap();
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    }
}

/// Waits until `f` holds, polling; panics with `what` after `T`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for: {what}");
}

/// The `CONNECT` events of a mock, as (session, client address).
pub fn connects(events: &[Event]) -> Vec<(i64, SocketAddr)> {
    events
        .iter()
        .filter_map(|e| if let Event::Connect { session, addr, .. } = e { Some((*session, *addr)) } else { None })
        .collect()
}

pub fn disconnects(events: &[Event]) -> Vec<(i64, u8)> {
    events
        .iter()
        .filter_map(
            |e| {
                if let Event::Disconnect { session, reason, .. } = e {
                    Some((*session, *reason))
                } else {
                    None
                }
            },
        )
        .collect()
}

/// The session id the mock saw for a client, found by its address in `CONNECT`.
pub fn session_of(mb: &MockBackend, client: SocketAddr) -> i64 {
    match mb.wait_for(T, |e| matches!(e, Event::Connect { addr, .. } if *addr == client)) {
        Some(Event::Connect { session, .. }) => session,
        _ => panic!("no CONNECT for {client}"),
    }
}

/// Waits for `child` to exit, up to `d`; its exit code (`None`: still
/// running, or killed by a signal).
pub fn wait_exit(child: &mut std::process::Child, d: Duration) -> Option<i32> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A running gateway binary (for signal and CLI tests).
pub struct GatewayProcess {
    /// Everything the process printed on stdout after its first line (the
    /// access log goes there by default).
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stderr_path: std::path::PathBuf,
    _dir: TempDir,
}

pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("gw-test-{tag}-{}-{}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

impl GatewayProcess {
    pub fn spawn(config: &str, args: &[&str]) -> GatewayProcess {
        Self::spawn_env(config, args, &[])
    }

    pub fn spawn_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        Self::spawn_under(&[], config, args, env)
    }

    /// The binary started through `wrapper` (e.g. `["taskset", "-c", "1"]`).
    pub fn spawn_under(wrapper: &[&str], config: &str, args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let dir = TempDir::new("proc");
        let cfg = dir.0.join("gateway.toml");
        std::fs::write(&cfg, config).unwrap();
        let stderr_path = dir.0.join("stderr.log");
        let bin = env!("CARGO_BIN_EXE_game-gateway");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env("LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        use std::io::BufRead;
        out.read_line(&mut line).unwrap();
        // "game-gateway listening on ADDR admin ADDR io_driver D"
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts.len() >= 6,
            "unexpected first line {line:?}: {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        let addr = parts[3].parse().unwrap();
        let admin = parts[5].parse().unwrap();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stdout.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while out.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        GatewayProcess { stdout, child, addr, admin, stderr_path, _dir: dir }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit up to `d`; returns the exit code.
    pub fn wait_exit(&mut self, d: Duration) -> Option<i32> {
        wait_exit(&mut self.child, d)
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on the admin port; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (code, body)
}

/// A real `redis-server` on a free loopback port with its own temp dir,
/// killed by PID when dropped. Panics (fails the test) when it cannot start.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        let mut r = RedisServer { port: free_port(), child: None, dir };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(&self.dir.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install Debian's redis-server): {e}"));
        self.child = Some(child);
        eventually("redis-server answers PING", || self.cmd(&["PING"]).map(|r| r.contains("PONG")).unwrap_or(false));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (a crash: no shutdown save).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs one command over RESP; returns the raw reply text.
    pub fn cmd(&self, args: &[&str]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    }

    pub fn set_rules(&self, json: &str) {
        let r = self.cmd(&["SET", "game-gateway:routing:rules", json]).unwrap();
        assert!(r.starts_with("+OK"), "{r}");
    }

    pub fn publish_rules(&self) {
        self.cmd(&["PUBLISH", "game-gateway:routing:rules:notify", "changed"]).unwrap();
    }

    /// Sends `sig` to the server (SIGSTOP to hang it, SIGCONT to resume).
    #[allow(dead_code)]
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own, unreaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// A client connection from a chosen loopback source address.
pub fn connect_from(src: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&format!("{src}:0").parse::<SocketAddr>().unwrap().into())?;
    sock.connect(&addr.into())?;
    let s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(T))?;
    Ok(s)
}

impl Client {
    pub fn from(src: &str, addr: SocketAddr) -> Client {
        Client { s: connect_from(src, addr).unwrap() }
    }
}

/// The next `DISCONNECT` the mock saw, as (session, reason).
pub fn next_disconnect(mb: &MockBackend) -> (i64, u8) {
    match mb.wait_for(T, |e| matches!(e, Event::Disconnect { .. })) {
        Some(Event::Disconnect { session, reason, .. }) => (session, reason),
        other => panic!("expected a DISCONNECT, got {other:?}"),
    }
}
