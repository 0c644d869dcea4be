//! Per-interface configuration written by the agent at attach time.

use crate::pod;

/// The side of the gateway an interface faces; it decides the direction of packets
/// arriving on it (XDP sees ingress only).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Packets arriving here are inbound.
    External = 0,
    /// Packets arriving here are outbound.
    Internal = 1,
}

impl Role {
    pub const fn from_u32(v: u32) -> Self {
        if v == Role::Internal as u32 { Role::Internal } else { Role::External }
    }
}

/// Value of the `IFACES` map, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Counter slot in `IFACE_STATS`, 1..MAX_IFACES (0 is "unregistered").
    pub slot: u32,
    /// A [`Role`] as `u32`.
    pub role: u32,
}

pod!(IfaceConfig);
