//! game-gateway: a thread-per-core, shared-nothing game gateway.
//!
//! Layers, bottom up (see `ARCHITECTURE.md`):
//! - [`protocol`]: sans-IO codecs for client and backend frames.
//! - [`session`]: session ids and per-session state.
//! - [`routing`]: rules, the immutable `RouteTable` snapshot, strategies.
//! - [`config`]: the TOML config, validated into typed sections.
//! - `shard`: the per-core session and backend state machine (no I/O).
//! - [`worker`]: the per-core I/O driver (monoio; io_uring or epoll) that
//!   moves bytes and timers for its shard.
//! - [`gateway`]: starts the workers and is the control side's handle on them.
//! - [`control`]: signals, config reload, stop; [`admin`]: health, readiness,
//!   metrics and status over HTTP; [`metrics`] and [`stats`]: counters.
//! - [`mock_backend`]: a reference game backend for tests, demos and perf.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod control;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod mock_backend;
pub mod notify;
pub mod protocol;
pub mod redis_source;
pub mod resilience;
pub mod route_source;
pub mod routing;
pub mod session;
pub(crate) mod shard;
pub mod stats;
pub mod worker;
