//! The hook the ingress pipeline runs at: XDP (a frame, before any socket buffer exists) or
//! tc ingress (a socket buffer, possibly a GRO aggregate or a CHECKSUM_PARTIAL packet of a
//! local sender across a veth). One copy of every stage serves both; what differs is this
//! trait's:
//! where the arrival interface is read, the stage array, how a header field is rewritten
//! (in place with RFC 1624 updates on a frame; with the kernel's checksum helpers on a
//! socket buffer, which keep CHECKSUM_PARTIAL and CHECKSUM_COMPLETE right), which
//! interfaces the packet may be forwarded to, and how it is sent there.
//!
//! Stages speak XDP verdicts (`xdp_action`) for both hooks, which is also how `IFACE_STATS`
//! counts them; the tc entry points turn them into tc verdicts at the very end
//! ([`tc_verdict`]). The trait is here; its two implementations are `xdp.rs` and `tc.rs`,
//! above the stages' modules they call into (`nat`, `forward`, `encap`, `too_big`).

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    maps::ProgramArray,
};
use xdpgate_common::{flow::NextHop, stats::DropReason};

use crate::parse::{Packet, PacketMeta};

pub trait Hook: EbpfContext + Packet + Sized {
    /// Whether this is `xdpgate trace`'s packet: it carries the running trace's marker
    /// (`trace::armed`), which no real packet can know.
    fn traced(&self) -> bool;
    /// The ifindex the packet arrived by.
    fn arrival(&self) -> u32;
    /// The stages of this hook's pipeline (`PIPELINE_*` indices).
    fn stages() -> &'static ProgramArray;
    /// Replaces the destination (`NAT_DST`) or source address and port (see `nat::rewrite`).
    fn rewrite(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
    ) -> Result<(), DropReason>;
    /// Translates an ICMP error about a translated flow as the flow entry it belongs to
    /// (rewriting the destination, `NAT_DST`, or the source) translates its packets; the
    /// outer address too when `outer` (see `nat::rewrite_icmp_error`).
    fn rewrite_icmp_error(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
        outer: bool,
    ) -> Result<(), DropReason>;
    /// Decrements the TTL (hop limit); false when it would reach zero.
    fn decrement_ttl(&self, meta: &PacketMeta) -> Result<bool, DropReason>;
    /// The IP length of what leaves the egress interface for this packet, of `ip_len` bytes
    /// of IP: what the FIB checks against the route's MTU, and a cached next hop must have
    /// been checked for (`NextHop.max_len`).
    fn wire_len(&self, meta: &PacketMeta, ip_len: u16) -> u16;
    /// Of an encapsulation's `overhead` bytes, how many the egress interface sees on this
    /// packet (see `Hook::wire_len`).
    fn encap_wire_overhead(&self, meta: &PacketMeta, overhead: u16) -> u16;
    /// Wraps the packet in one outer IP header from `src` to `dst` (see `encap`); the
    /// packet's offsets in `meta` no longer hold afterwards.
    fn encapsulate(
        &self,
        meta: &PacketMeta,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> Result<(), DropReason>;
    /// After the parser failed: pulls the headers into the linear area and enters the parse
    /// stage again if they may lie past it (returns only when it does not, or with an
    /// error when the stage is missing).
    fn parse_again(&self) -> Result<(), DropReason>;
    /// Whether this hook sends packets out of `ifindex` itself (others go to the stack).
    fn may_send_to(ifindex: u32) -> bool;
    /// Writes the next hop's MACs and sends the packet out of its interface; the XDP
    /// verdict (`XDP_REDIRECT` when sent, `XDP_PASS` to leave it to the stack).
    fn send(&self, hop: &NextHop) -> Result<u32, DropReason>;
    /// A packet the route towards its backend allows only `mtu` bytes of, which the stack
    /// cannot answer: answered with ICMP "too big" where this hook can ([`too_big`]),
    /// else dropped for `reason`.
    fn too_big(&self, meta: &PacketMeta, mtu: u16, reason: DropReason) -> Result<u32, DropReason>;
}

/// The tc verdict for a stage's XDP verdict: pass is `TC_ACT_UNSPEC` (`TCX_NEXT`: later tcx
/// programs and then the stack see the packet), as on egress.
#[inline(always)]
pub fn tc_verdict(action: u32) -> i32 {
    match action {
        xdp_action::XDP_DROP => TC_ACT_SHOT as i32,
        xdp_action::XDP_REDIRECT => TC_ACT_REDIRECT as i32,
        _ => TC_ACT_UNSPEC,
    }
}
