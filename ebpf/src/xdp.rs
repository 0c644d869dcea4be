//! The pipeline at XDP: a frame, rewritten in place and sent by devmap redirect.

use aya_ebpf::{bindings::xdp_action, maps::ProgramArray, programs::XdpContext};
use xdpgate_common::{flow::NextHop, stats::DropReason};

use crate::{
    encap, forward,
    hook::Hook,
    maps::{EGRESS, PIPELINE, count_drop_reason},
    nat,
    parse::PacketMeta,
    too_big, trace,
};

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
        forward::set_macs(self, hop)?;
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
