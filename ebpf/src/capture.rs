//! `xdpgate capture`: copies of the packets a capture's filter selects, sent to userspace
//! through a perf event array with the packet as the helper's context data (the xdpdump
//! way: no copy through the stack, any length up to the snapshot length, at XDP and tc).
//! One copy as the packet arrives (`pre`), one as the pipeline leaves it (`post`: rewritten,
//! with its verdict). Without a capture's lease this costs one array lookup per packet.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_ktime_get_ns};
use xdpgate_common::{
    capture::{CaptureConfig, CaptureRecord, POINT_POST, POINT_PRE, PROTO_ICMP_ANY},
    is_icmp,
};

use crate::{
    clock,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{CAPTURE_CONFIG, CAPTURE_PERF, CAPTURE_SCRATCH},
    parse::{Packet, PacketMeta},
};

/// The running capture, while its lease holds.
#[inline(always)]
fn running() -> Option<&'static CaptureConfig> {
    let c = CAPTURE_CONFIG.get(0)?;
    (c.lease_until_ns != 0 && c.lease_until_ns > clock::now_ns()).then_some(c)
}

#[inline(always)]
fn in_prefix(a: &[u32; 4], net: &[u32; 4], mask: &[u32; 4]) -> bool {
    (a[0] ^ net[0]) & mask[0] == 0
        && (a[1] ^ net[1]) & mask[1] == 0
        && (a[2] ^ net[2]) & mask[2] == 0
        && (a[3] ^ net[3]) & mask[3] == 0
}

#[inline(always)]
fn matches(c: &CaptureConfig, meta: &PacketMeta, ifindex: u32) -> bool {
    (c.ifindex == 0 || c.ifindex == ifindex)
        && (c.proto == 0
            || c.proto == meta.proto
            || (c.proto == PROTO_ICMP_ANY && is_icmp(meta.family, meta.proto)))
        && (c.port == 0
            || ((meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP)
                && (c.port == meta.sport || c.port == meta.dport)))
        && (c.family == 0
            || (c.family == meta.family
                && in_prefix(&meta.src, &c.src, &c.src_mask)
                && in_prefix(&meta.dst, &c.dst, &c.dst_mask)))
}

/// Sends the record and the packet's first bytes (up to the snapshot length).
#[inline(always)]
fn send<C: EbpfContext + Packet>(ctx: &C, c: &CaptureConfig, rec: &mut CaptureRecord) {
    let len = ctx.len() as u32;
    let cap = if len < c.snaplen { len } else { c.snaplen };
    rec.len = len;
    rec.cap_len = cap;
    rec.copies += 1;
    // The helper takes the length to copy from the context in the flags' upper half.
    CAPTURE_PERF.output(ctx, &*rec, cap);
}

/// At the entry stage, after parsing: the `pre` copy of a packet the filter selects, and a
/// mark for the `post` copy at the pipeline's end. Every parsed packet clears or sets the
/// mark, so none is left from a packet before.
#[inline(always)]
pub fn arrived<C: EbpfContext + Packet>(ctx: &C, meta: &PacketMeta, ifindex: u32) {
    let Some(c) = running() else { return };
    let Some(rec) = CAPTURE_SCRATCH.get_ptr_mut(0) else { return };
    let rec = unsafe { &mut *rec };
    if !matches(c, meta, ifindex) {
        rec.pending = 0;
        return;
    }
    rec.time_ns = unsafe { bpf_ktime_get_ns() };
    rec.ifindex = ifindex;
    rec.verdict = 0;
    rec.reason = 0;
    if c.points & POINT_PRE != 0 {
        rec.point = POINT_PRE;
        rec.pending = 0;
        send(ctx, c, rec);
    }
    rec.pending = u8::from(c.points & POINT_POST != 0);
}

/// At the end of whichever stage ends the pipeline: the `post` copy of a marked packet,
/// with its verdict (`reason`: the drop reason of a drop).
#[inline(always)]
pub fn leaving<C: EbpfContext + Packet>(ctx: &C, verdict: u32, reason: u8) {
    let Some(c) = running() else { return };
    let Some(rec) = CAPTURE_SCRATCH.get_ptr_mut(0) else { return };
    let rec = unsafe { &mut *rec };
    if rec.pending == 0 {
        return;
    }
    rec.point = POINT_POST;
    rec.verdict = verdict as u8;
    rec.reason = reason;
    rec.pending = 0;
    send(ctx, c, rec);
}
