//! The node-wide overload manager: one budget for the bytes queued towards
//! clients (the gateway's per-session queues, the bytes a writer holds, and
//! what the kernel holds in the send queues of sockets whose writer waits),
//! shared by every worker, with actions at thresholds.
//!
//! Each worker measures its own share every [`MEASURE_EVERY`] (one pass over
//! its sessions; the kernel's queue is read only for the sockets whose writer
//! is waiting for room) and stores it in its slot; the node's total is the
//! sum of the slots. From the total against the budget:
//! - at [`REFUSE_AT`] of the budget new connections are refused
//!   (`connection_rejected_total{refusal="overload"}`);
//! - at [`SHED_AT`] each worker closes its slowest readers first (the
//!   sessions with the most bytes queued, `DISCONNECT` reason 3 to their
//!   backends, as any slow reader) until its share is back to [`SHED_TO`] of
//!   the budget; and it caps the kernel send buffer of the sockets it keeps
//!   that wait for room ([`SHRUNK_SNDBUF`]), so the kernel cannot queue more
//!   for them.
//!
//! The default budget is a quarter of the memory the process may use: the
//! cgroup's limit (a container's `resources.limits.memory`), else the host's
//! memory. Metrics: `game_gateway_overload_*`; alert `GameGatewayOverloaded`.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// How often a worker measures its share and acts.
pub const MEASURE_EVERY: Duration = Duration::from_millis(200);
/// Refuse new connections from this share of the budget.
pub const REFUSE_AT: f64 = 0.85;
/// Close the slowest readers from this share of the budget,
pub const SHED_AT: f64 = 0.95;
/// down to this share.
pub const SHED_TO: f64 = 0.75;
/// Kernel send buffer given to a socket whose writer waits, once shedding
/// (the kernel doubles it for its own bookkeeping).
pub const SHRUNK_SNDBUF: i32 = 64 * 1024;
/// The default budget: this share of the memory limit,
const AUTO_SHARE: u64 = 4;
/// and never less than this.
const AUTO_MIN: u64 = 64 << 20;

/// Where the node stands against its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Normal = 0,
    /// New connections refused.
    Refusing = 1,
    /// New connections refused and the slowest readers closed.
    Shedding = 2,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Refusing => "refusing",
            State::Shedding => "shedding",
        }
    }
}

/// Shared by every worker and read by `/metrics`.
pub struct Overload {
    /// The budget in bytes.
    pub budget: u64,
    /// Where the budget came from (for `/status` and the start log).
    pub budget_source: String,
    /// Each worker's last measured share.
    per_worker: Vec<AtomicU64>,
    state: AtomicU8,
    /// Sessions closed as the slowest readers.
    pub closed: AtomicU64,
    /// Connections refused.
    pub refused: AtomicU64,
    /// Sockets whose send buffer was capped.
    pub shrunk: AtomicU64,
}

impl Overload {
    /// `configured` bytes, or (0) a quarter of the memory limit.
    pub fn new(workers: usize, configured: u64) -> Overload {
        let (budget, budget_source) = if configured > 0 {
            (configured, "limits.overload_queued_bytes".to_string())
        } else {
            let (mem, from) = memory_limit();
            ((mem / AUTO_SHARE).max(AUTO_MIN), format!("a quarter of {from} ({mem} bytes)"))
        };
        Overload {
            budget,
            budget_source,
            per_worker: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            state: AtomicU8::new(State::Normal as u8),
            closed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            shrunk: AtomicU64::new(0),
        }
    }

    /// Worker `i` measured `bytes`: stores it and returns the node's total.
    pub fn report(&self, i: usize, bytes: u64) -> u64 {
        if let Some(slot) = self.per_worker.get(i) {
            slot.store(bytes, Ordering::Relaxed);
        }
        self.total()
    }

    pub fn total(&self) -> u64 {
        self.per_worker.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    /// The state `total` puts the node in; stored for every worker to see.
    pub fn judge(&self, total: u64) -> State {
        let share = total as f64 / self.budget.max(1) as f64;
        let s = if share >= SHED_AT {
            State::Shedding
        } else if share >= REFUSE_AT {
            State::Refusing
        } else {
            State::Normal
        };
        let was = self.state.swap(s as u8, Ordering::Relaxed);
        if was != s as u8 {
            tracing::warn!(
                state = s.as_str(),
                queued_bytes = total,
                budget_bytes = self.budget,
                "overload: {}",
                match s {
                    State::Normal => "back under the budget; accepting again",
                    State::Refusing => "queued bytes near the budget; refusing new connections",
                    State::Shedding => "queued bytes at the budget; closing the slowest readers",
                }
            );
        }
        s
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Normal,
            1 => State::Refusing,
            _ => State::Shedding,
        }
    }

    /// How many bytes worker `i`, holding `mine`, sheds so that the node
    /// comes back to [`SHED_TO`]: its proportional part of the excess.
    pub fn shed_target(&self, mine: u64, total: u64) -> u64 {
        let target = (self.budget as f64 * SHED_TO) as u64;
        if total <= target || total == 0 {
            return 0;
        }
        ((total - target) as u128 * mine as u128 / total as u128) as u64
    }
}

/// The memory this process may use, and where that figure came from: the
/// cgroup v2 `memory.max` (or v1 `memory.limit_in_bytes`) of this process,
/// else the host's `MemTotal`.
pub fn memory_limit() -> (u64, &'static str) {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    // cgroup v2: the process's own group (`0::/path`).
    let v2 = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|s| {
        let path = s.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
        read(&format!("/sys/fs/cgroup{path}/memory.max")).or_else(|| read("/sys/fs/cgroup/memory.max"))
    });
    // Unlimited groups say "max" (not a number) or a huge v1 figure.
    let host = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb = s
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(1 << 30);
    if let Some(v) = v2.filter(|v| *v < host) {
        return (v, "the cgroup memory limit");
    }
    if let Some(v) = read("/sys/fs/cgroup/memory/memory.limit_in_bytes").filter(|v| *v < host) {
        return (v, "the cgroup memory limit");
    }
    (host, "the host's memory")
}

/// Bytes the kernel holds in `fd`'s send queue (`SIOCOUTQ`).
pub fn send_queue(fd: std::os::fd::RawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is a socket the caller owns for the call; `n` is a valid
    // int for TIOCOUTQ (= SIOCOUTQ) to write.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as u64
    } else {
        0
    }
}

/// Caps `fd`'s kernel send buffer at [`SHRUNK_SNDBUF`].
pub fn shrink_send_buffer(fd: std::os::fd::RawFd) -> bool {
    let v: libc::c_int = SHRUNK_SNDBUF;
    // SAFETY: as above; `v` is a valid int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_share_of_the_budget_and_shedding_is_proportional() {
        let o = Overload::new(2, 1000);
        assert_eq!(o.judge(o.report(0, 400)), State::Normal);
        assert_eq!(o.judge(o.report(1, 450)), State::Refusing);
        assert_eq!(o.judge(o.report(1, 600)), State::Shedding);
        // 1000 queued, target 750: 250 to shed, split 400:600.
        assert_eq!(o.shed_target(400, 1000), 100);
        assert_eq!(o.shed_target(600, 1000), 150);
        assert_eq!(o.judge(o.report(1, 100)), State::Normal);
    }

    #[test]
    fn the_default_budget_is_a_quarter_of_the_memory_limit() {
        let (mem, _) = memory_limit();
        let o = Overload::new(1, 0);
        assert_eq!(o.budget, (mem / 4).max(AUTO_MIN));
    }
}
