//! game-gateway: a thread-per-core, shared-nothing game gateway.
//!
//! Layers, bottom up (see `ARCHITECTURE.md`):
//! - [`protocol`]: sans-IO codecs for client and backend frames (the
//!   `gate-protocol` crate) and the front door.
//! - [`session`]: session ids and per-session state.
//! - [`routing`]: rules, the immutable `RouteTable` snapshot, strategies.
//! - [`config`]: the TOML config, validated into typed sections.
//! - `shard`: the per-core session and backend state machine (no I/O).
//! - [`worker`]: the per-core I/O driver (monoio; io_uring or epoll) that
//!   moves bytes and timers for its shard; [`stats`]: its counters.
//! - [`gateway`]: starts the workers and is the control side's handle on them;
//!   [`cpu`]: the process's CPU set and NUMA nodes their placement uses.
//!
//! On the side, wired by `main`: [`control`] (signals, config reload, Redis
//! routes, stop) and [`admin`] (health, readiness, metrics and status over
//! HTTP), which share only [`state`]; neither imports the other.
//! [`otel_log`] is the `otel` log format, shared by the logger and the
//! [`access_log`].

pub mod access_log;
pub mod admin;
pub mod config;
pub mod control;
pub mod cpu;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod limits;
pub mod notify;
pub mod otel_log;
pub(crate) mod otlp;
pub mod overload;
pub mod protocol;
pub mod relay;
pub mod resilience;
pub mod routing;
pub mod session;
pub(crate) mod shard;
pub mod state;
pub mod stats;
pub mod upgrade;
pub mod worker;
