//! Wire protocols. The client and backend codecs and [`ServerId`] live in the
//! `gate-protocol` crate (shared with the mock backend and the load tools) and
//! are re-exported here, so `crate::protocol::backend` etc. work everywhere.
//!
//! - [`client`]: the 8-byte-header client frame (client <-> gateway).
//! - [`backend`]: the backend frame (gateway <-> backend), every opcode.
//! - [`frontdoor`]: sniffing the first bytes, HTTP upgrade (and the refusals,
//!   built once), PROXY headers.
//! - [`ws`]: WebSocket framing state of an upgraded session.
//! - [`grpc`]: `GamePacket` messages of the Go gateway's gRPC backend mode.

pub use gate_protocol::{backend, client, ServerId};
pub mod frontdoor;
pub mod grpc;
pub mod ws;

/// Hex text of an id, without allocating.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
