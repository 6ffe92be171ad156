//! game-gateway: a thread-per-core, shared-nothing game gateway.
//!
//! Layers, bottom up (see `ARCHITECTURE.md`):
//! - [`protocol`]: sans-IO codecs for client and backend frames.
//! - [`session`]: session ids and per-session state.
//! - [`routing`]: rules, the immutable `RouteTable` snapshot, strategies.
//! - [`config`]: the TOML config, validated into typed sections.
//! - [`worker`]: the per-core I/O driver (monoio; io_uring or epoll).
//! - [`gateway`]: starts the workers and is the control side's handle on them.
//! - [`control`]: signals, config reload, stop; [`admin`]: health, readiness,
//!   metrics and status over HTTP; [`metrics`] and [`stats`]: counters.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod control;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod redis_source;
pub mod resilience;
pub mod route_source;
pub mod routing;
pub mod session;
pub mod stats;
pub mod worker;
