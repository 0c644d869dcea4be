//! Addresses are network-order bytes held in `u32` words (for alignment); IPv4 uses the
//! first word.
//!
//! The flow table: one entry per direction of every allowed flow, so later packets and
//! replies cost one lookup.

use crate::pod;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// An ICMP message's kind of flow: its type, or that of the request it answers; 0 for
    /// echo (whose identifier is the key's ports) and any other protocol. Messages other
    /// than echo have ports 0 alike: kept apart by this, as conntrack's ICMP tuple keeps
    /// them by type. 0 in every key of a build before 2026-12-07.
    pub kind: u8,
    pub _pad: u8,
}

/// See `FlowKey::icmp_flow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpFlow {
    Echo(u16),
    Type(u8),
}

impl IcmpFlow {
    /// An echo's identifier.
    pub fn identifier(self) -> Option<u16> {
        match self {
            IcmpFlow::Echo(id) => Some(id),
            IcmpFlow::Type(_) => None,
        }
    }

    /// Another message's type.
    pub fn message_type(self) -> Option<u8> {
        match self {
            IcmpFlow::Type(t) => Some(t),
            IcmpFlow::Echo(_) => None,
        }
    }
}

impl FlowKey {
    /// What an ICMP flow is kept by, as people name it: `Echo(identifier)`, or `Type(t)` for
    /// another message, `kind` (ICMPv6's reserved type 0, whose kind is 128, is 0 again);
    /// `None` for other protocols.
    pub fn icmp_flow(&self) -> Option<IcmpFlow> {
        if !crate::is_icmp(self.family, self.proto) {
            return None;
        }
        Some(match self.kind {
            0 => IcmpFlow::Echo(self.sport),
            128 if self.family == 6 => IcmpFlow::Type(0),
            kind => IcmpFlow::Type(kind),
        })
    }

    /// The key of the other direction of `entry`'s flow: the reverse of this direction's
    /// packet as it leaves, after the entry's rewrite. (An echo flow's "ports" are both its
    /// identifier, which a translation rewrites.)
    #[inline(always)]
    pub fn twin(&self, entry: &FlowValue) -> Self {
        let mut k = *self;
        let echo = crate::is_icmp(self.family, self.proto);
        if entry.nat == NAT_DST {
            k.dst = entry.nat_addr;
            k.dport = entry.nat_port;
            if echo {
                k.sport = entry.nat_port;
            }
        } else if entry.nat == NAT_SRC {
            k.src = entry.nat_addr;
            k.sport = entry.nat_port;
            if echo {
                k.dport = entry.nat_port;
            }
        }
        k.reversed()
    }

    /// The key of the other direction.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            kind: self.kind,
            _pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Policy generation that allowed the flow.
    pub generation: u64,
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The deciding rule of each side, indexed by `DIR_*`: `[DIR_INBOUND]` the destination's
    /// inbound layers, `[DIR_OUTBOUND]` the source's outbound layers. A global rule index
    /// (table * MAX_RULES + bit), or `NO_RULE` where no NSG applied on that side.
    pub rules: [u16; 2],
    /// Direction (`DIR_*`) of the packet that created the flow.
    pub direction: u8,
    /// 1 when this entry is the reply direction.
    pub reply: u8,
    /// `TCP_*` state bits, and `ASSURED`.
    pub tcp: u8,
    /// `NAT_*`: which address and port of this direction's packets `nat_addr`/`nat_port`
    /// replace.
    pub nat: u8,
    pub nat_addr: [u32; 4],
    pub nat_port: u16,
    /// Idle timeout in seconds of the load-balancing rule that chose the backend; 0: the
    /// policy's timeout for the protocol.
    pub idle_s: u16,
    /// Load-balancer service and backend of the flow, or `NO_BACKEND`.
    pub service: u32,
    pub backend: u32,
    /// A TCP sequence number. Embryonic flows opened by a SYN (forward entry): the SYN's
    /// sequence number + 1, which its answer or a reset must acknowledge; once answered,
    /// the one the initiator's ACK must acknowledge to confirm the flow (the responder's
    /// SYN-ACK sequence number + 1; see `TCP_ANSWERED`), the SYN's then kept in the
    /// reply entry's `seq` (a lone flow's in `hop.generation`; the dataplane's
    /// `flow::kept_syn`). 0 in an entry of a build before 2026-12-06, which kept no
    /// number until the answer. Established flows, with `TCP_SEQ`: the one this
    /// direction's sender was last seen at, near which its RST and FIN are believed. ICMP
    /// flows: the ICMP type this direction carries, + 1 (requests and replies share a
    /// key), or `ICMP_NO_ANSWER`; 0 in an entry of a build before 2026-12-07 that was no
    /// echo, which no ICMP packet is taken for.
    pub seq: u32,
    /// Where this direction's packets were last forwarded (flows the dataplane forwards
    /// itself: load-balanced and translated ones), so that the FIB need not be asked again.
    /// A lone flow (`TCP_LONE`), never forwarded by the dataplane, keeps its SYN's number
    /// here once answered (`generation`; see `seq`).
    pub hop: NextHop,
}

impl FlowValue {
    /// An entry of a flow whose answers bypass the gateway (`floating_ip`, `ipip`): the
    /// forward entry, which forwards to the backend untranslated, or its reply entry (a
    /// backend's, with no rewrite to undo). Never confirmed (no SYN-ACK or answer passes),
    /// such a flow stays embryonic for life.
    #[inline(always)]
    pub fn replies_direct(&self) -> bool {
        matches!(self.nat, NAT_NEXT_HOP | NAT_ENCAP)
            || (self.reply != 0 && self.nat == NAT_NONE && self.service != crate::lb::NO_BACKEND)
    }

    /// Whether a new flow's forward entry may wait alone (`TCP_LONE`): a TCP flow opened by
    /// a SYN that nothing rewrites. `proto`: the key's.
    #[inline(always)]
    pub fn may_wait_alone(&self, proto: u8) -> bool {
        proto == 6
            && self.reply == 0
            && self.nat == NAT_NONE
            && self.service == crate::lb::NO_BACKEND
            && self.tcp & (TCP_MIDSTREAM | TCP_ANSWERED | ASSURED) == 0
    }

    /// The entry of a flow waiting alone (see `TCP_LONE`).
    #[inline(always)]
    pub fn lone(&self) -> bool {
        self.reply == 0 && self.tcp & TCP_LONE != 0
    }

    /// The packets, bytes and last-seen time of a lone flow's reply direction (see
    /// `TCP_LONE`), kept in `nat_addr`, which a flow nothing rewrites does not use.
    #[inline(always)]
    pub fn answers(&self) -> (u32, u32, u64) {
        let a = &self.nat_addr;
        (a[0], a[1], u64::from(a[2]) | u64::from(a[3]) << 32)
    }

    /// Counts a packet of a lone flow's reply direction, `len` bytes long, seen at `now`.
    #[inline(always)]
    pub fn count_answer(&mut self, len: u64, now: u64) {
        let a = &mut self.nat_addr;
        a[0] = a[0].wrapping_add(1);
        a[1] = a[1].wrapping_add(len as u32);
        (a[2], a[3]) = (now as u32, (now >> 32) as u32);
    }

    /// Writes the reply entry of the flow whose entry of the other direction is `self`
    /// into `reply`, before a rewrite is undone in it: the same decision, and the packets
    /// of that direction so far (none, but a lone flow's answers).
    #[inline(always)]
    pub fn reply_into(&self, reply: &mut FlowValue) {
        *reply = *self;
        reply.reply = 1 - self.reply;
        reply.packets = 0;
        reply.bytes = 0;
        reply.nat = NAT_NONE;
        if self.lone() {
            let (packets, bytes, seen) = self.answers();
            (reply.packets, reply.bytes, reply.last_seen_ns) = (packets.into(), bytes.into(), seen);
            reply.nat_addr = [0; 4];
            // An answered flow's SYN number moves to where a flow of two entries keeps it.
            if self.tcp & TCP_ANSWERED != 0 {
                reply.seq = self.hop.generation;
            }
            reply.hop = NextHop::NONE;
            reply.tcp &= !(TCP_LONE | TCP_ANSWERED);
        }
    }

    /// A lone flow whose reply entry is made: no longer lone, its answers counted there.
    #[inline(always)]
    pub fn not_lone(&mut self) {
        self.tcp &= !TCP_LONE;
        self.nat_addr = [0; 4];
        self.hop = NextHop::NONE;
    }

    /// An embryonic entry judged as established (see `ASSURED`).
    #[inline(always)]
    pub fn assured(&self) -> bool {
        self.tcp & ASSURED != 0
    }
}

/// A forwarded flow direction's next hop, as the kernel's FIB gave it. Used while the
/// agent's route generation is what it was (the agent bumps it on every route, neighbour and
/// link change it hears) and for at most `HOP_MAX_AGE_JIFFIES` (so a change the agent does
/// not see, as when none runs, is followed too), for packets no longer than the FIB passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The route generation it was looked up in.
    pub generation: u32,
    /// The low 32 bits of `jiffies` when it was looked up.
    pub jiffies: u32,
    /// The interface it leaves by; 0: none cached.
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The interface the packets arrived by when it was looked up (the FIB's answer may
    /// depend on it: VRFs, `iif` rules).
    pub iif: u32,
    /// The longest packet (from the IP header on) the FIB has passed to it.
    pub max_len: u16,
    /// Rounds `FlowValue` to its 8-byte alignment with no hidden padding.
    pub _pad: [u8; 2],
}

/// A neighbour entry the dataplane needed and found missing (`bpf_fib_lookup` reads the
/// neighbour table, never fills it): the next hop's address (network-order words, IPv4 in
/// the first) on interface `ifindex`, for the agent to resolve (`maps::NEIGHBOURS_WANTED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourKey {
    pub addr: [u32; 4],
    pub ifindex: u32,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

crate::pod!(NeighbourKey);

impl NextHop {
    pub const NONE: NextHop = NextHop {
        generation: 0,
        jiffies: 0,
        ifindex: 0,
        dmac: [0; 6],
        smac: [0; 6],
        iif: 0,
        max_len: 0,
        _pad: [0; 2],
    };
}

/// How long a cached next hop is used without asking the FIB again: 100 ms to 1 s, as the
/// kernel's tick is 1,000 to 100 per second.
pub const HOP_MAX_AGE_JIFFIES: u32 = 100;

/// The mark (`FlowValue::seq`) of an ICMP flow's reply entry whose first message asks for
/// no answer (an echo reply, say): no message carries it (marks are types + 1).
pub const ICMP_NO_ANSWER: u32 = 0x1_0000;

pub const NAT_NONE: u8 = 0;
/// Rewrite the destination (the client's packets to a frontend, DNAT to the backend).
pub const NAT_DST: u8 = 1;
/// Rewrite the source (the backend's replies, back to the frontend address).
pub const NAT_SRC: u8 = 2;
/// Leave the addresses, forward to `nat_addr` (floating IP: direct server return).
pub const NAT_NEXT_HOP: u8 = 3;
/// Leave the packet as it is and wrap it in one outer IP header to `nat_addr` (the backend),
/// from this node's `ENCAP_SOURCES` address: IP-in-IP (IPv4) or IPv6-in-IPv6. (4 to 7 are
/// the dataplane's own actions, never in a flow entry.)
pub const NAT_ENCAP: u8 = 8;

/// No NSG applied: the rule index of a side no layer filtered. (Global rule indexes are below
/// `TABLES * MAX_RULES` = 32,768, so they fit 16 bits.)
pub const NO_RULE: u16 = u16::MAX;
/// Neither side had a rule.
pub const NO_RULES: [u16; 2] = [NO_RULE; 2];
/// This direction sent a FIN. (A direct-reply flow's forward entry: the client half closed
/// it; a SYN on its tuple is then a new connection.)
pub const TCP_FIN: u8 = 1;
/// RST seen, or FIN both ways: the flow expires after `TCP_CLOSED_TIMEOUT_NS`.
pub const TCP_CLOSED: u8 = 2;
/// Embryonic TCP flow (forward entry): the responder answered with a SYN-ACK that
/// acknowledges the SYN, whose sequence number + 1 is now in `seq`.
pub const TCP_ANSWERED: u8 = 4;
/// The flow was taken up from a TCP segment other than a SYN: an answer confirms it.
pub const TCP_MIDSTREAM: u8 = 8;
/// Established TCP flows: `seq` holds this direction's sequence number (an entry without it,
/// established by a build before, takes its next segment's).
pub const TCP_SEQ: u8 = 16;
/// Any protocol (in the `tcp` bits): an embryonic flow both ends took part in, which the
/// full established table had no room for. It is judged as an established flow (its idle
/// timeout; resets and FINs believed only in sequence; the agent logs and sweeps it), and
/// each of its packets tries the move again.
pub const ASSURED: u8 = 32;
/// Embryonic TCP flow (forward entry): opened by a SYN that nothing rewrites, it waits with
/// this one entry, and no reply entry, until confirmed: a flood of SYNs costs one insert
/// and one entry each, answered or not. A packet that comes back finds it by the reversed
/// key and counts in it (`FlowValue::answers`); the reply entry is made when the flow is
/// confirmed, or when such a packet needs more than counting.
pub const TCP_LONE: u8 = 64;

/// `FLOW_STATS` counters. An embryonic flow ends in one of three ways: confirmed (moved to
/// the established table), expired (a packet of it found it idle past its timeout) or
/// closed (RST, or denied after a policy change, before confirmation); the rest were evicted
/// by newer embryonic flows, or are still in the table. Refused counts the flows the full
/// established table had no room for as they were confirmed (`ASSURED`): no outcome, as
/// they stay embryonic until one of those.
pub const FLOW_STAT_EMBRYOS_CREATED: u32 = 0;
pub const FLOW_STAT_EMBRYOS_CONFIRMED: u32 = 1;
pub const FLOW_STAT_EMBRYOS_EXPIRED: u32 = 2;
pub const FLOW_STAT_EMBRYOS_REFUSED: u32 = 3;
pub const FLOW_STAT_EMBRYOS_CLOSED: u32 = 4;
/// Established flows rebuilt from a live NAT translation after their entries were gone.
pub const FLOW_STAT_REBUILT: u32 = 5;
/// TCP segments other than SYNs, without a flow, taken up for classification as new flows
/// (mid-stream pickup; the policy may still deny them). Not the host's own connections.
pub const FLOW_STAT_PICKED_UP: u32 = 6;
pub const FLOW_STATS_LEN: u32 = 7;

/// Non-first fragments pass only when their first fragment was allowed (it carries the ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the first fragment of an allowed datagram became, applied to its later fragments:
/// the address rewrite (`NAT_*`, `addr`) of its flow. Ports and L4 checksums live in the
/// first fragment only, so the address is all a later fragment needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub addr: [u32; 4],
    pub nat: u8,
    pub _pad: [u8; 3],
}

pod!(FlowKey, FlowValue, NextHop, FragKey, FragValue);
