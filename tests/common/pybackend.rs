//! Game servers written for the Go gateway's backend modes, run as Python
//! child processes (`tests/backends/`): `seed_tcp_backend.py` and
//! `grpc_backend.py`. Each logs what it receives to a file and is killed
//! when dropped.

use super::TempDir;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longer than the usual wait: backends are Python processes and a gRPC
/// stream may take a reconnect to come up.
pub const LONG: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SeedTcp,
    Grpc,
}

impl Kind {
    pub fn script(self) -> &'static str {
        match self {
            Kind::SeedTcp => "seed_tcp_backend.py",
            Kind::Grpc => "grpc_backend.py",
        }
    }
}

/// A Python game server on a loopback port, killed by PID when dropped.
pub struct PyBackend {
    pub kind: Kind,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub stderr: PathBuf,
    pub _dir: TempDir,
}

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn backends_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("backends")
}

impl PyBackend {
    pub fn start(kind: Kind) -> PyBackend {
        Self::start_with(kind, &[])
    }

    pub fn start_with(kind: Kind, args: &[&str]) -> PyBackend {
        let dir = TempDir::new(match kind {
            Kind::SeedTcp => "seedtcp",
            Kind::Grpc => "grpc",
        });
        let log = dir.0.join("backend.log");
        let stderr = dir.0.join("stderr.log");
        let mut b = PyBackend {
            kind,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            stderr,
            _dir: dir,
        };
        b.spawn("127.0.0.1:0");
        b
    }

    pub fn spawn(&mut self, listen: &str) {
        let script = backends_dir().join(self.kind.script());
        let mut child = Command::new(python())
            .arg(&script)
            .arg("--listen")
            .arg(listen)
            .arg("--log")
            .arg(&self.log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python(), script.display()));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line.clone());
            // Keep draining so the child never blocks on a full pipe.
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                line.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(addr) = line.strip_prefix("LISTENING ").and_then(|a| a.trim().parse::<SocketAddr>().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not start (first line {line:?}); stderr:\n{}\n(needs: pip install -r tests/backends/requirements.txt)",
                self.kind.script(),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        };
        self.addr = addr;
        self.child = Some(child);
    }

    /// SIGKILL: the backend vanishes without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address; the log continues after a
    /// `# restarted` line.
    pub fn restart(&mut self) {
        self.kill();
        writeln!(std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap(), "# restarted")
            .unwrap();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + LONG;
        loop {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn(&listen)));
            if r.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "could not restart {} on {listen}", self.kind.script());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(String::from).collect()
    }

    /// Log lines after the last restart.
    pub fn lines_since_restart(&self) -> Vec<String> {
        let all = self.lines();
        let from = all.iter().rposition(|l| l == "# restarted").map(|i| i + 1).unwrap_or(0);
        all[from..].to_vec()
    }

    pub fn dump(&self) -> String {
        format!(
            "--- {} log ---\n{}\n--- stderr ---\n{}",
            self.kind.script(),
            self.lines().iter().map(|l| truncate(l)).collect::<Vec<_>>().join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until `f` holds on the log lines; panics with the log after `LONG`.
    pub fn wait_log(&self, what: &str, mut f: impl FnMut(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + LONG;
        loop {
            let lines = self.lines();
            if f(&lines) {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for: {what}\n{}", self.dump());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PyBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn truncate(l: &str) -> String {
    if l.len() > 300 {
        format!("{}...", &l[..300])
    } else {
        l.to_string()
    }
}

/// `key=value` fields of a log line.
pub fn kv(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().filter_map(|t| t.split_once('=')).collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
