//! Packet capture at the ingress hook (`xdpgate capture`): the filter the capture writes, the
//! header the dataplane sends before each copied packet.
//!
//! Nothing is copied unless a capture holds a lease (`CaptureConfig::lease_until_ns` in the
//! future): the capture refreshes it while it runs, so a killed capture stops costing once
//! its lease runs out.

use crate::pod;

/// `Array<CaptureConfig>` of one entry: the running capture's lease and filter.
pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
/// `PerfEventArray`: a `CaptureRecord` followed by the packet's first `cap_len` bytes.
pub const CAPTURE_PERF: &str = "CAPTURE_PERF";
/// `PerCpuArray<CaptureRecord>`: the record of the packet a stage on this CPU is working on
/// (`pending`: its first copy was sent, its second is due when the pipeline ends).
pub const CAPTURE_SCRATCH: &str = "CAPTURE_SCRATCH";

/// Copy the packet as it arrived, before any rewrite.
pub const POINT_PRE: u8 = 1;
/// Copy the packet as the pipeline leaves it: rewritten (NAT, load balancing, new MACs when
/// forwarded), with its verdict.
pub const POINT_POST: u8 = 2;

/// `CaptureConfig::proto` for ICMP of either family (ICMP under IPv4, ICMPv6 under IPv6).
pub const PROTO_ICMP_ANY: u8 = 255;

/// Longest snapshot a capture takes of each packet.
pub const MAX_SNAPLEN: u32 = 65_535;

/// The running capture's lease and filter (`CAPTURE_CONFIG`). Zero fields match anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// CLOCK_MONOTONIC (coarse) until which the capture runs; 0: no capture.
    pub lease_until_ns: u64,
    /// Network-order address words (IPv4 in the first word) and a prefix's mask: the source
    /// must have `src` under `src_mask`, the destination `dst` under `dst_mask` (a zero mask
    /// matches any address of `family`).
    pub src: [u32; 4],
    pub src_mask: [u32; 4],
    pub dst: [u32; 4],
    pub dst_mask: [u32; 4],
    /// Arrival interface (0: any).
    pub ifindex: u32,
    /// Snapshot length: bytes copied of each packet.
    pub snaplen: u32,
    /// Source or destination port (0: any).
    pub port: u16,
    /// IP protocol (0: any; `PROTO_ICMP_ANY`: ICMP of the packet's family).
    pub proto: u8,
    /// 4 or 6 with an address; 0: any family.
    pub family: u8,
    /// `POINT_*` bits: which copies to take.
    pub points: u8,
    pub _pad: [u8; 3],
}

/// The header of each copied packet (and the per-CPU record between the two copies).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureRecord {
    /// `bpf_ktime_get_ns` when the packet arrived.
    pub time_ns: u64,
    /// Arrival interface.
    pub ifindex: u32,
    /// The packet's whole length at this point.
    pub len: u32,
    /// Bytes of it that follow the header.
    pub cap_len: u32,
    /// `POINT_PRE` or `POINT_POST`.
    pub point: u8,
    /// The XDP verdict (`xdp_action`) of the post copy: 1 drop, 2 pass, 4 redirect.
    pub verdict: u8,
    /// The drop reason (`stats::DropReason`) of a dropped packet.
    pub reason: u8,
    /// Set between the pre copy and the post copy (never set in a sent header).
    pub pending: u8,
    /// Copies this CPU has sent since the capture began (each capture zeroes it): how a
    /// test sees that a lapsed lease stops the copying.
    pub copies: u64,
}

pod!(CaptureConfig, CaptureRecord);
