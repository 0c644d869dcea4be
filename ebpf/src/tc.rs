//! The pipeline at tc ingress: a socket buffer, rewritten with the kernel's checksum helpers
//! and sent by `bpf_redirect`.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, xdp_action},
    helpers::generated::bpf_redirect,
    maps::ProgramArray,
    programs::TcContext,
};
use xdpgate_common::{flow::NextHop, maps::TC_PARSE, stats::DropReason};

use crate::{
    encap, forward,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    hook::Hook,
    maps::{TC_PIPELINE, iface_config},
    nat,
    parse::{PacketMeta, ptr_at},
    trace,
};

/// Headers are pulled into a socket buffer's linear area this far (a short packet, to its
/// end) when they do not lie there already: past the deepest the parser follows and an
/// ICMP error's quote (as `EGRESS_PULL`).
const TC_PULL: u32 = 1024;

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
        forward::set_macs(self, hop)?;
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
