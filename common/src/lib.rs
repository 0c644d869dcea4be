//! Keys, values and constants shared by the xdpgate dataplane (`ebpf/`) and agent
//! (`userspace/`). Every type is `#[repr(C)]` without implicit padding so both sides read
//! the same bytes; the `user` feature adds `aya::Pod` for the agent.
#![no_std]

pub mod capture;
pub mod decap;
pub mod events;
pub mod flow;
pub mod iface;
pub mod lb;
pub mod maps;
pub mod nat;
pub mod nsg;
pub mod stats;
pub mod trace;

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

/// ICMP's protocol number under IPv4, and ICMPv6's next header under IPv6.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// ICMP's number in address family `family` (4 or 6).
#[inline(always)]
pub const fn icmp_proto(family: u8) -> u8 {
    if family == 6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }
}

/// Whether `proto` is ICMP of its packet's address family: protocol 1 under IPv4, next
/// header 58 under IPv6. The other family's number is a plain protocol there (no ICMP
/// type, echo identifier or error), as the kernel's own stack treats it.
#[inline(always)]
pub const fn is_icmp(family: u8, proto: u8) -> bool {
    (family == 4 && proto == IPPROTO_ICMP) || (family == 6 && proto == IPPROTO_ICMPV6)
}

/// Network-order address (or value) bytes as the `u32` words keys hold them: the same bytes
/// in memory, with the alignment that spares the dataplane byte-wise copies.
#[inline(always)]
pub fn words(b: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}
