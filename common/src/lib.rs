//! Keys, values and constants shared by the xdpgate dataplane (`ebpf/`) and agent
//! (`userspace/`). Every type is `#[repr(C)]` without implicit padding so both sides read
//! the same bytes; the `user` feature adds `aya::Pod` for the agent.
#![no_std]

pub mod iface;
pub mod maps;
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
