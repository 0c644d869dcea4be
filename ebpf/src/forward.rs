//! Forwarding in XDP: the kernel's FIB says the next hop and its MAC, and the frame leaves
//! through a devmap redirect. Whatever the FIB cannot answer yet (no neighbour entry, a
//! local destination, an interface outside `EGRESS`) goes to the kernel stack instead, which
//! forwards the already rewritten packet and learns the neighbour for the next one.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use xdpgate_common::stats::DropReason;

use crate::{
    headers::EthHdr,
    maps::{EGRESS, FIB_PARAMS},
    nat::decrement_ttl,
    parse::{PacketMeta, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
/// Look up in the main table only, skipping the policy rules (and with them the local table).
const BPF_FIB_LOOKUP_DIRECT: u32 = 1;

/// Asks the kernel's FIB where a packet from `src` to `dst` goes. The parameters live in
/// per-CPU scratch, not on the stack, which the callers' stages need.
#[inline(always)]
fn lookup(
    ctx: &XdpContext,
    meta: &PacketMeta,
    src: &[u32; 4],
    dst: &[u32; 4],
    len: u64,
    flags: u32,
) -> Result<(i64, &'static mut bpf_fib_lookup), DropReason> {
    let p = unsafe { &mut *FIB_PARAMS.get_ptr_mut(0).ok_or(DropReason::Internal)? };
    *p = unsafe { zeroed() };
    p.l4_protocol = meta.proto;
    p.sport = meta.sport.to_be();
    p.dport = meta.dport.to_be();
    p.ifindex = ctx.ingress_ifindex() as u32;
    // Host order, unlike the addresses: the kernel compares it with the route's MTU.
    p.__bindgen_anon_1.tot_len = (len as u16).wrapping_sub(meta.l3_off);
    if meta.family == 4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    let rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, flags) };
    Ok((rc, p))
}

/// Whether the packet is for this host itself (the kernel would deliver it, not forward it).
/// The FIB says "not forwarded" both for one of this host's addresses and for no route at
/// all; only the first is local: a destination the main table routes, which the full lookup
/// (local table first) does not forward, is this host's.
#[inline(always)]
pub fn is_local(ctx: &XdpContext, meta: &PacketMeta, len: u64) -> bool {
    matches!(lookup(ctx, meta, &meta.src, &meta.dst, len, 0), Ok((BPF_FIB_LKUP_RET_NOT_FWDED, _)))
        && !matches!(
            lookup(ctx, meta, &meta.src, &meta.dst, len, BPF_FIB_LOOKUP_DIRECT),
            Ok((BPF_FIB_LKUP_RET_NOT_FWDED, _)) | Err(_)
        )
}

/// Sends the packet towards `next_hop` (its destination, or the backend of a floating-IP
/// flow). Returns the XDP action.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    meta: &PacketMeta,
    src: &[u32; 4],
    next_hop: &[u32; 4],
    len: u64,
) -> Result<u32, DropReason> {
    let (rc, p) = lookup(ctx, meta, src, next_hop, len, 0)?;
    if rc != BPF_FIB_LKUP_RET_SUCCESS || EGRESS.get_ifindex(p.ifindex).is_none() {
        return Ok(xdp_action::XDP_PASS);
    }
    if !decrement_ttl(ctx, meta)? {
        return Ok(xdp_action::XDP_PASS);
    }
    let eth = unsafe { &mut *(ptr_at::<EthHdr>(ctx, 0)? as *mut EthHdr) };
    eth.dst = p.dmac;
    eth.src = p.smac;
    Ok(EGRESS.redirect(p.ifindex, 0).unwrap_or(xdp_action::XDP_PASS))
}
