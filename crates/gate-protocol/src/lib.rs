//! gate-protocol: the game gateway's sans-IO wire codecs, pure functions over
//! byte buffers, no sockets. Shared by the gateway, the mock backend and the
//! load tools.
//!
//! - [`client`]: the 8-byte-header client frame (client <-> gateway).
//! - [`backend`]: the 20-byte server header + gate header backend frame
//!   (gateway <-> backend), every opcode of `PROTOCOL.md`.
//!
//! Both follow the same two-pass shape: a cheap `check_*` looks at the header,
//! returns `Ok(None)` when the frame is not all there yet ("need more", never
//! an error), a typed error when a length is out of bounds, and otherwise the
//! parsed header and the frame's total size so the caller can parse the body
//! in place and `advance` past it. Nothing here allocates except the encoders,
//! which append to a caller-owned `BytesMut`.

pub mod backend;
pub mod client;

use std::fmt;

/// The 32-bit routing address carried by every client frame.
///
/// bit 31: `is_zip`; bits 16..=30: `world_id`; bits 8..=15: `server_type`;
/// bits 0..=7: `inst_id`. Written `world.type.inst` in logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServerId(pub u32);

impl ServerId {
    pub const fn new(is_zip: bool, world_id: u16, server_type: u8, inst_id: u8) -> ServerId {
        ServerId(
            ((is_zip as u32) << 31)
                | (((world_id as u32) & 0x7FFF) << 16)
                | ((server_type as u32) << 8)
                | inst_id as u32,
        )
    }
    pub const fn is_zip(self) -> bool {
        self.0 >> 31 == 1
    }
    pub const fn world_id(self) -> u16 {
        ((self.0 >> 16) & 0x7FFF) as u16
    }
    pub const fn server_type(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn inst_id(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.world_id(), self.server_type(), self.inst_id())?;
        if self.is_zip() {
            f.write_str("+zip")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn server_id_fields() {
        let s = ServerId::new(true, 7, 10, 2);
        assert!(s.is_zip());
        assert_eq!((s.world_id(), s.server_type(), s.inst_id()), (7, 10, 2));
        assert_eq!(s.to_string(), "7.10.2+zip");
        assert_eq!(ServerId::new(false, 1, 10, 2).to_string(), "1.10.2");
    }

    proptest! {
        #[test]
        fn server_id_roundtrip(z: bool, w in 0u16..=32767, t: u8, i: u8) {
            let s = ServerId::new(z, w, t, i);
            prop_assert_eq!((s.is_zip(), s.world_id(), s.server_type(), s.inst_id()), (z, w, t, i));
        }
    }
}
