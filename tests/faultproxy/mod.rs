//! Fault-injection helpers for `tests/fault_matrix.rs`: a ledger backend
//! (in-process or a separate process), a TCP fault proxy, tagged load
//! clients, and what the gateway process reports about itself.
#![allow(dead_code)]

pub mod backend;
pub mod load;
pub mod observe;
pub mod proxy;

/// A process-unique number (temp file names, ports).
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 48)
}
