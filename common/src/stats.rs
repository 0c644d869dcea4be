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

/// Why the dataplane dropped a packet: the index into `DROP_STATS`. `DROP_REASON_TABLE`
/// holds each reason's name and its one line of help.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Malformed = 0,
    TooDeep = 1,
    Policy = 2,
    Fragment = 3,
    /// Fails closed: a missing map entry or program never lets a packet through.
    Internal = 4,
    /// Only with "no new flows" for all-unhealthy backends.
    NoBackend = 5,
    /// A connection only starts with a SYN, so a cut or expired flow cannot be reopened
    /// from the middle.
    NoFlow = 6,
    NatExhausted = 7,
    NatUnmatched = 8,
    /// No longer counted: builds before 2026-12-05 dropped a new flow's confirming packet
    /// when the established table was full; a flow now stays embryonic instead. Kept so
    /// that the indexes after it, and the counts of pinned arrays, keep their meaning.
    FlowTableFull = 9,
    /// An encapsulated packet would exceed the route's MTU towards its backend: counted
    /// whether or not it is answered with ICMP "too big" (see `too_big.rs` in the dataplane).
    EncapTooBig = 10,
    /// An encapsulating rule's packet, on a node without an outer source address of its
    /// family (`ENCAP_SOURCES`).
    EncapNoSource = 11,
    /// The FIB gave no next hop this hook can send to for an encapsulating rule's backend
    /// (no route, no neighbour entry yet, an interface not under xdpgate); the outer packet
    /// cannot go to the stack instead, which refuses its own source address on arrival.
    EncapUnreachable = 12,
    /// A new flow from a NAT gateway's subnet of a protocol it cannot translate (not TCP,
    /// UDP or ICMP echo: ESP, GRE, an ICMP timestamp request).
    NatUntranslatable = 13,
    /// To a load balancer's frontend address on a port or protocol no rule serves, routed
    /// on from here (not this host's address): back to the router that sent it, which
    /// sends it here again until its TTL runs out.
    NoLbRule = 14,
    /// The FIB gave no next hop this hook can send to for a floating-IP rule's backend (no
    /// neighbour entry yet, no route, an interface not under xdpgate): the packet, its
    /// destination the frontend's, cannot go to the stack instead, which has no route to
    /// the frontend (it answered "network unreachable").
    DirectUnreachable = 15,
    /// A floating-IP rule's packet longer than the route's MTU to its backend: counted
    /// whether or not it is answered with ICMP "too big", as `EncapTooBig` (the stack, with
    /// no route to the frontend, cannot answer it).
    DirectTooBig = 16,
    /// Sent to a link-layer broadcast or multicast address, to a unicast address the FIB
    /// routes on from here (before the policy judges it; also on a translated flow, where
    /// it would be forwarded): routers do not forward those, nor answer them with ICMP
    /// errors (RFC 1812 5.3.4, 4.3.2.7), and the stack's forwarding drops them as not
    /// addressed to it.
    LinkBroadcast = 17,
    /// An IPv4 packet with a source-route option (LSRR or SSRR), or an IPv6 packet with a
    /// routing header whose segments left are not 0: judged by the address in its
    /// destination field, where a kernel that accepts source routing or segment routing
    /// (off by default) would then forward it to the next address of its route, past the
    /// policy. Routers drop IPv4's by default (RFC 7126 4.4.3, 4.4.4).
    SourceRoute = 18,
    /// A new flow's first packet from an address of the virtual network that arrived where
    /// that address cannot be: the FIB reaches it by another interface xdpgate is attached
    /// to, or, on an external interface, at this host itself or not at all (a strict
    /// reverse-path check, as the kernel's `rp_filter` makes for IPv4 only). Judged as from
    /// the virtual network, it would pass `AllowVnetInBound`.
    Spoofed = 19,
}

pub const DROP_REASONS: u32 = 20;

/// Entries of the pinned drop counters: room for reasons to come, so that adding one needs
/// no new layout (and no `upgrade` that starts the counts again at zero).
pub const DROP_SLOTS: u32 = 32;
const _: () = assert!(DROP_REASONS <= DROP_SLOTS, "more drop reasons than counters");

/// Each `DropReason`'s name (in JSON, metrics and `--reason`) and help, in index order.
pub const DROP_REASON_TABLE: [(&str, &str); DROP_REASONS as usize] = [
    ("malformed", "a truncated header or an impossible length field"),
    ("too_deep", "more VLAN tags or IPv6 extension headers than the parser follows"),
    ("policy", "an NSG rule denied it"),
    ("fragment", "a later fragment whose first fragment was not allowed (or not seen)"),
    ("internal", "a stage could not run (fails closed)"),
    ("no_backend", "a frontend with no healthy backend"),
    ("no_flow", "a TCP segment other than a SYN that belongs to no flow"),
    ("nat_exhausted", "a NAT gateway found no free public port"),
    ("nat_unmatched", "a packet to a NAT public address that matches no translation"),
    ("flow_table_full", "the established flow table was full (builds before 2026-12-05)"),
    ("encap_too_big", "longer than the route's MTU to its backend once encapsulated"),
    ("encap_no_source", "an encapsulating rule's packet on a node without an outer source"),
    ("encap_unreachable", "no route or neighbour entry (yet) towards an encapsulated backend"),
    ("nat_untranslatable", "a NAT gateway cannot translate its protocol (not TCP, UDP, echo)"),
    ("no_lb_rule", "to a frontend address on a port or protocol no load-balancing rule serves"),
    ("direct_unreachable", "no neighbour entry (yet) or route towards a floating-IP backend"),
    ("direct_too_big", "longer than the route's MTU to its floating-IP backend"),
    ("link_broadcast", "to be forwarded, but sent to a link-layer broadcast or multicast address"),
    (
        "source_route",
        "an IPv4 source route (LSRR, SSRR) or an IPv6 routing header with segments left",
    ),
    ("spoofed", "from a virtual network address that lies behind another interface, or nowhere"),
];

pub const DROP_REASON_NAMES: [&str; DROP_REASONS as usize] = {
    let mut names = [""; DROP_REASONS as usize];
    let mut i = 0;
    while i < names.len() {
        names[i] = DROP_REASON_TABLE[i].0;
        i += 1;
    }
    names
};
