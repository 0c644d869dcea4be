//! Keys, values and constants shared by the xdpgate dataplane (`ebpf/`) and agent
//! (`userspace/`). Every type is `#[repr(C)]` without implicit padding so both sides read
//! the same bytes; the `user` feature adds `aya::Pod` for the agent.
#![no_std]

pub mod events;
pub mod flow;
pub mod iface;
pub mod lb;
pub mod maps;
pub mod nat;
pub mod nsg;
pub mod stats;

/// Marks types as plain old data for aya's typed maps, on the agent side only.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), no padding, every bit pattern valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;

/// Network-order address (or value) bytes as the `u32` words keys hold them: the same bytes
/// in memory, with the alignment that spares the dataplane byte-wise copies.
#[inline(always)]
pub fn words(b: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}
