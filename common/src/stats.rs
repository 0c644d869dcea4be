//! Counters the dataplane keeps and the agent reads.

use crate::pod;

/// Packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    pub fn add(&mut self, other: &Counter) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

pod!(Counter);

/// XDP verdicts are counted by their action code (`XDP_ABORTED` = 0 .. `XDP_REDIRECT` = 4).
pub const VERDICTS: u32 = 5;
pub const VERDICT_NAMES: [&str; VERDICTS as usize] = ["aborted", "drop", "pass", "tx", "redirect"];

/// Index of an interface slot's verdict counter in `IFACE_STATS`.
#[inline(always)]
pub const fn iface_stat_index(slot: u32, action: u32) -> u32 {
    slot * VERDICTS + action
}

/// Verdicts of the egress program on the host's own packets: passed, dropped.
pub const EGRESS_VERDICTS: u32 = 2;
pub const EGRESS_VERDICT_NAMES: [&str; EGRESS_VERDICTS as usize] = ["pass", "drop"];

/// Index of an interface slot's egress counter in `EGRESS_STATS` (`drop`: the drop counter).
#[inline(always)]
pub const fn egress_stat_index(slot: u32, drop: bool) -> u32 {
    slot * EGRESS_VERDICTS + drop as u32
}

/// Why the dataplane dropped a packet: the index into `DROP_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header is truncated or has an impossible length field.
    Malformed = 0,
    /// More VLAN tags or IPv6 extension headers than the parser follows.
    TooDeep = 1,
    /// A network security group rule denied it.
    Policy = 2,
    /// A non-first fragment whose first fragment was not allowed (or not seen).
    Fragment = 3,
    /// The dataplane could not run a stage (a missing map entry or program); fails closed.
    Internal = 4,
    /// A frontend whose backends are all unhealthy (with "no new flows").
    NoBackend = 5,
    /// A TCP segment other than a SYN that belongs to no flow: a connection only starts
    /// with a SYN, so a cut or expired flow cannot be reopened from the middle.
    NoFlow = 6,
    /// A new outbound flow through a NAT gateway found no free public port (or has no
    /// ports to translate).
    NatExhausted = 7,
    /// A packet to a NAT public address that matches no translation.
    NatUnmatched = 8,
    /// A flow was confirmed while the table of established flows was full: refused, so that
    /// no established flow is evicted for it.
    FlowTableFull = 9,
}

pub const DROP_REASONS: u32 = 10;
pub const DROP_REASON_NAMES: [&str; DROP_REASONS as usize] = [
    "malformed",
    "too_deep",
    "policy",
    "fragment",
    "internal",
    "no_backend",
    "no_flow",
    "nat_exhausted",
    "nat_unmatched",
    "flow_table_full",
];
