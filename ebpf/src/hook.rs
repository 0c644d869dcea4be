//! The hook the ingress pipeline runs at: XDP (a frame, before any socket buffer exists) or
//! tc ingress (a socket buffer, possibly a GRO aggregate or a CHECKSUM_PARTIAL packet of a
//! local sender across a veth). One copy of every stage serves both; what differs is here:
//! where the arrival interface is read, the stage array, how a header field is rewritten
//! (in place with RFC 1624 updates on a frame; with the kernel's checksum helpers on a
//! socket buffer, which keep CHECKSUM_PARTIAL and CHECKSUM_COMPLETE right), which
//! interfaces the packet may be forwarded to, and how it is sent there.
//!
//! Stages speak XDP verdicts (`xdp_action`) for both hooks, which is also how `IFACE_STATS`
//! counts them; the tc entry points turn them into tc verdicts at the very end
//! ([`tc_verdict`]).

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::generated::bpf_redirect,
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use xdpgate_common::{flow::NextHop, maps::TC_PARSE, stats::DropReason};

use crate::{
    encap, forward,
    headers::{EthHdr, IPPROTO_TCP, IPPROTO_UDP},
    maps::{EGRESS, PIPELINE, TC_PIPELINE, count_drop_reason, iface_config},
    nat,
    parse::{Packet, PacketMeta, ptr_at},
    too_big, trace,
};

/// Headers are pulled into a socket buffer's linear area this far (a short packet, to its
/// end) when they do not lie there already: past the deepest the parser follows and an
/// ICMP error's quote (as `EGRESS_PULL`).
const TC_PULL: u32 = 1024;

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

#[inline(always)]
fn set_macs(ctx: &impl Packet, hop: &NextHop) -> Result<(), DropReason> {
    let eth = unsafe { &mut *(ptr_at::<EthHdr>(ctx, 0)? as *mut EthHdr) };
    eth.dst = hop.dmac;
    eth.src = hop.smac;
    Ok(())
}

impl Hook for XdpContext {
    /// The marker is in the frame's metadata (which an XDP program before this one could
    /// also write: only the armed marker is trusted).
    #[inline(always)]
    fn traced(&self) -> bool {
        let meta = unsafe { (*self.ctx).data_meta } as usize;
        // Metadata is 4-byte aligned: two word loads, no copy through the stack.
        if meta + 8 > XdpContext::data(self) {
            return false;
        }
        let (lo, hi) = unsafe { (*(meta as *const u32), *((meta + 4) as *const u32)) };
        // The call only for a marker at all.
        (lo | hi) != 0 && trace::armed(lo, hi)
    }

    #[inline(always)]
    fn arrival(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn stages() -> &'static ProgramArray {
        &PIPELINE
    }

    #[inline(always)]
    fn rewrite(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
    ) -> Result<(), DropReason> {
        nat::rewrite(self, meta, kind, addr, port)
    }

    #[inline(always)]
    fn rewrite_icmp_error(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
        outer: bool,
    ) -> Result<(), DropReason> {
        nat::rewrite_icmp_error(self, meta, kind, addr, port, outer)
    }

    #[inline(always)]
    fn decrement_ttl(&self, meta: &PacketMeta) -> Result<bool, DropReason> {
        nat::decrement_ttl(self, meta)
    }

    /// A frame is what leaves.
    #[inline(always)]
    fn wire_len(&self, _meta: &PacketMeta, ip_len: u16) -> u16 {
        ip_len
    }

    /// A frame is what leaves.
    #[inline(always)]
    fn encap_wire_overhead(&self, _meta: &PacketMeta, overhead: u16) -> u16 {
        overhead
    }

    #[inline(always)]
    fn encapsulate(
        &self,
        meta: &PacketMeta,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> Result<(), DropReason> {
        encap::encapsulate_xdp(self, meta, src, dst)
    }

    /// A frame is all there is.
    #[inline(always)]
    fn parse_again(&self) -> Result<(), DropReason> {
        Ok(())
    }

    /// A devmap redirect needs the target in `EGRESS` (the interfaces XDP is attached to).
    #[inline(always)]
    fn may_send_to(ifindex: u32) -> bool {
        EGRESS.get_ifindex(ifindex).is_some()
    }

    #[inline(always)]
    fn send(&self, hop: &NextHop) -> Result<u32, DropReason> {
        set_macs(self, hop)?;
        Ok(EGRESS.redirect(hop.ifindex, 0).unwrap_or(xdp_action::XDP_PASS))
    }

    /// Routed back to the sender by the FIB (its MACs and interface, not the arriving
    /// frame's: those a sender chooses), and sent by devmap redirect. The packet still
    /// counts as dropped for `reason`: it goes no further, as a router counts its own.
    #[inline(always)]
    fn too_big(&self, meta: &PacketMeta, mtu: u16, reason: DropReason) -> Result<u32, DropReason> {
        let hop = forward::back_to_sender(self, meta, too_big::answer_len(meta)).ok_or(reason)?;
        too_big::answer(self, meta, mtu).ok_or(reason)?;
        count_drop_reason(reason);
        self.send(&hop)
    }
}

impl Hook for TcContext {
    /// The marker is in the control block (`cb[0]`, `cb[1]`), which `BPF_PROG_TEST_RUN`
    /// fills from its context, but also another tcx program before ours or the device a
    /// packet was redirected from: only the armed marker is trusted.
    #[inline(always)]
    fn traced(&self) -> bool {
        let cb = unsafe { (*self.skb.skb).cb };
        // The call only for a marker at all (most packets' `cb` is zero here).
        (cb[0] | cb[1]) != 0 && trace::armed(cb[0], cb[1])
    }

    /// At tc ingress the socket buffer's device is the one it arrived by.
    #[inline(always)]
    fn arrival(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn stages() -> &'static ProgramArray {
        &TC_PIPELINE
    }

    #[inline(always)]
    fn rewrite(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
    ) -> Result<(), DropReason> {
        nat::rewrite_skb(self, meta, kind, addr, port)
    }

    #[inline(always)]
    fn rewrite_icmp_error(
        &self,
        meta: &PacketMeta,
        kind: u8,
        addr: &[u32; 4],
        port: u16,
        outer: bool,
    ) -> Result<(), DropReason> {
        nat::rewrite_icmp_error_skb(self, meta, kind, addr, port, outer)
    }

    #[inline(always)]
    fn decrement_ttl(&self, meta: &PacketMeta) -> Result<bool, DropReason> {
        nat::decrement_ttl_skb(self, meta)
    }

    /// A GSO aggregate leaves as segments of `gso_size` bytes of payload behind copies of
    /// its headers: that is the length to check against the route's MTU (its whole length,
    /// up to 64 KiB and more, would always be "fragmentation needed"; and 0, the FIB's other
    /// choice for a socket buffer, checks only the device's MTU with `is_skb_forwardable`,
    /// which passes every GSO aggregate unchecked).
    #[inline(always)]
    fn wire_len(&self, meta: &PacketMeta, ip_len: u16) -> u16 {
        let gso = unsafe { (*self.skb.skb).gso_size };
        if gso == 0 {
            return ip_len;
        }
        let l4_hdr = match meta.proto {
            // The TCP header's length, from its data offset (in the linear area with the
            // rest of the headers); the longest possible when it cannot be read.
            IPPROTO_TCP => ptr_at::<[u8; 13]>(self, meta.l4())
                .map_or(60, |h| u32::from(unsafe { (*h)[12] } >> 4) * 4),
            IPPROTO_UDP => 8,
            _ => 60,
        };
        let hdrs = (meta.l4() - meta.l3()) as u32 + l4_hdr;
        (gso + hdrs).min(u32::from(u16::MAX)) as u16
    }

    #[inline(always)]
    fn encap_wire_overhead(&self, meta: &PacketMeta, overhead: u16) -> u16 {
        encap::skb_wire_overhead(self, meta, overhead)
    }

    #[inline(always)]
    fn encapsulate(
        &self,
        meta: &PacketMeta,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> Result<(), DropReason> {
        encap::encapsulate_skb(self, meta, src, dst)
    }

    /// A GRO aggregate from a veth has its headers in the linear area, but a packet a local
    /// sender built from pages, or one from a driver that builds skbs from fragments, may
    /// not: pull them there and parse once more (after the pull the linear area holds what
    /// it can, so this happens once).
    #[inline(always)]
    fn parse_again(&self) -> Result<(), DropReason> {
        let want = TcContext::len(self).min(TC_PULL);
        if ((TcContext::data_end(self) - TcContext::data(self)) as u32) < want
            && self.pull_data(want).is_ok()
        {
            unsafe { TC_PIPELINE.tail_call(self, TC_PARSE) };
            return Err(DropReason::Internal);
        }
        Ok(())
    }

    /// The interfaces registered with xdpgate, by either hook: a redirect from tc reaches
    /// any device, and the packet is handed to its transmit path (the kernel segments a
    /// GSO aggregate there if the device cannot). Packets for other interfaces go through
    /// the stack, as from XDP, so what the operator did not put under xdpgate keeps the
    /// stack's forwarding path (netfilter included).
    #[inline(always)]
    fn may_send_to(ifindex: u32) -> bool {
        iface_config(ifindex).is_some_and(|c| c.slot != 0)
    }

    /// MACs from the cached FIB answer and a plain redirect to the egress device: the
    /// neighbour was resolved when the FIB answered (`bpf_redirect_neigh` would resolve it
    /// again per packet).
    #[inline(always)]
    fn send(&self, hop: &NextHop) -> Result<u32, DropReason> {
        set_macs(self, hop)?;
        let rc = unsafe { bpf_redirect(hop.ifindex, 0) };
        Ok(if rc == i64::from(TC_ACT_REDIRECT) {
            xdp_action::XDP_REDIRECT
        } else {
            xdp_action::XDP_DROP
        })
    }

    /// A socket buffer may be a GSO aggregate or carry a local sender's partial checksum
    /// (see `too_big`): dropped.
    #[inline(always)]
    fn too_big(
        &self,
        _meta: &PacketMeta,
        _mtu: u16,
        reason: DropReason,
    ) -> Result<u32, DropReason> {
        Err(reason)
    }
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
