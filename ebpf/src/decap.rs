//! `xdpgate-decap`: the backend's side of the gateways' encapsulating forwarding mode. An XDP
//! program of its own (no part of the gateway pipeline, as Katran's `decap_kern.c`) that
//! strips the one outer IPv4 or IPv6 header a gateway put in front of a client's packet and
//! passes the inner packet to the stack, which delivers it to the frontend address (on lo)
//! and answers the client directly.
//!
//! Only packets whose inner destination is a frontend this backend serves
//! (`DECAP_FRONTENDS`) are decapsulated, so the host relays nothing it would not accept
//! itself; everything else passes untouched. The outer destination is not checked: a frame
//! not sent to this host's MAC is dropped by the stack all the same (PACKET_OTHERHOST), and
//! the inner packet goes to a local address whoever the outer header named.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod headers;

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use headers::{EthHdr, Ipv4Hdr, Ipv6Hdr};
use xdpgate_common::decap::{DECAP_COUNTERS, DecapCounter, DecapKey, MAX_DECAP_FRONTENDS};

#[map(name = "DECAP_FRONTENDS")]
static DECAP_FRONTENDS: HashMap<DecapKey, u32> = HashMap::pinned(MAX_DECAP_FRONTENDS, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DECAP_COUNTERS, 0);

const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
const IPV4_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();

#[xdp]
pub fn xdpgate_decap(ctx: XdpContext) -> u32 {
    count(decap(&ctx));
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(c: DecapCounter) {
    if let Some(n) = DECAP_STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe { *n += 1 };
    }
}

/// A pointer to a `T` at `off` in the frame, if the frame holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data() + off;
    (start + core::mem::size_of::<T>() <= ctx.data_end()).then_some(start as *mut T)
}

/// Strips the outer header when the packet is IP-in-IP for a frontend served here.
#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapCounter {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return DecapCounter::NotTunnel };
    // SAFETY: bounds checked by ptr_at.
    let outer_type = unsafe { (*eth).ether_type };
    // The outer header's length and the protocol it carries.
    let (outer_len, inner_proto) = if outer_type == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else { return DecapCounter::NotTunnel };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.proto != IPPROTO_IPIP && ip.proto != IPPROTO_IPV6 {
            return DecapCounter::NotTunnel;
        }
        // Options would need another length; a fragment is the stack's to reassemble.
        let fragment = u16::from_be_bytes(ip.frag_off) & 0x3fff != 0;
        if ip.version_ihl != 0x45 || fragment {
            return DecapCounter::Passed;
        }
        (IPV4_LEN, ip.proto)
    } else if outer_type == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else { return DecapCounter::NotTunnel };
        // SAFETY: bounds checked by ptr_at.
        let next = unsafe { (*ip).next_hdr };
        // Extension headers (and so fragments) are not followed: passed to the stack.
        if next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
            return DecapCounter::NotTunnel;
        }
        (IPV6_LEN, next)
    } else {
        return DecapCounter::NotTunnel;
    };
    let inner = ETH_LEN + outer_len;
    let (key, inner_type) = if inner_proto == IPPROTO_IPIP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner) else { return DecapCounter::Passed };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.version_ihl >> 4 != 4 {
            return DecapCounter::Passed;
        }
        (DecapKey { family: 4, addr: [u32::from_ne_bytes(ip.dst), 0, 0, 0] }, ETH_P_IP)
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner) else { return DecapCounter::Passed };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.vtc_flow[0] >> 4 != 6 {
            return DecapCounter::Passed;
        }
        (DecapKey { family: 6, addr: xdpgate_common::words(&ip.dst) }, ETH_P_IPV6)
    };
    // SAFETY: a lookup by value.
    if unsafe { DECAP_FRONTENDS.get(&key) }.is_none() {
        return DecapCounter::Passed;
    }
    // The MAC header moves up to sit in front of the inner packet (the two do not
    // overlap: the outer header is longer than the MAC addresses), with the inner type.
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, outer_len) else { return DecapCounter::Passed };
    // SAFETY: both headers lie within the frame (checked above) and do not overlap.
    unsafe {
        (*new_eth).dst = (*eth).dst;
        (*new_eth).src = (*eth).src;
        (*new_eth).ether_type = inner_type;
    }
    // SAFETY: the context is this program's; the helper checks the new start.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, outer_len as i32) } != 0 {
        // Cannot happen for a header within the frame; the packet then goes on as it came,
        // save for the overwritten start of its outer header, which the stack drops.
        return DecapCounter::Passed;
    }
    DecapCounter::Decapsulated
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
