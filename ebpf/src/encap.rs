//! The encapsulating forwarding mode of load-balancing rules (`NAT_ENCAP`): the packet is
//! left as it arrived (frontend address and port kept, TTL decremented once) and wrapped in
//! one outer IP header from this node's address (`ENCAP_SOURCES`) to the backend, as
//! Katran and Ananta do, so a backend may sit in any subnet and answer the client directly.
//! IPv4 in IPv4 (protocol 4) and IPv6 in IPv6 (next header 41): exactly one outer header,
//! without options or extension headers (the format the backend's decapsulation expects).
//!
//! The FIB is asked about the outer packet (to the backend, `overhead` bytes longer); what
//! it cannot send from here is dropped, counted by reason: the outer packet's source is
//! this node's own address, which the stack would refuse as a martian on arrival.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_RECOMPUTE_CSUM, bpf_adj_room_mode, xdp_action,
    },
    helpers::generated::{bpf_get_smp_processor_id, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use xdpgate_common::{
    flow::NextHop,
    maps::{ENCAP_SOURCE_V4, ENCAP_SOURCE_V6},
    stats::DropReason,
};

use crate::{
    forward::{self, FIB_FRAG_NEEDED},
    headers::{IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP},
    hook::Hook,
    maps::{ENCAP_IDS, ENCAP_SOURCES},
    parse::{PacketMeta, ptr_at},
};

/// The outer header's TTL (hop limit): the path to the backend is a new path.
const OUTER_TTL: u8 = 64;

/// Bytes the outer header adds for a packet of `family`.
#[inline(always)]
pub fn overhead(family: u8) -> u16 {
    if family == 4 { 20 } else { 40 }
}

/// Sends a packet of an encapsulated flow to `backend`, by the flow direction's cached
/// next hop `cache` while it holds, or else by the FIB (whose answer is then cached).
#[inline(always)]
pub fn forward<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    backend: &[u32; 4],
    len: u64,
    cache: Option<&mut NextHop>,
) -> Result<u32, DropReason> {
    // The stack's (it takes the packet if the frontend is its own; else, with no route to
    // the frontend, it answers "network unreachable", not "time exceeded": a known limit).
    if forward::ttl(ctx, meta)? <= 1 {
        return Ok(xdp_action::XDP_PASS);
    }
    let index = if meta.family == 4 { ENCAP_SOURCE_V4 } else { ENCAP_SOURCE_V6 };
    let source = *ENCAP_SOURCES.get(index).ok_or(DropReason::Internal)?;
    if source == [0; 4] {
        return Err(DropReason::EncapNoSource);
    }
    let ip_len = ctx
        .wire_len(meta, (len as u16).wrapping_sub(meta.l3_off))
        .saturating_add(ctx.encap_wire_overhead(meta, overhead(meta.family)));
    let hop = match forward::hop_for(ctx, meta, &source, backend, ip_len, cache, true)? {
        Ok(hop) => hop,
        // What fits inside the outer header.
        Err((FIB_FRAG_NEEDED, mtu)) => {
            let inner = mtu.saturating_sub(overhead(meta.family));
            return ctx.too_big(meta, inner, DropReason::EncapTooBig);
        }
        Err(_) => return Err(DropReason::EncapUnreachable),
    };
    ctx.decrement_ttl(meta)?;
    ctx.encapsulate(meta, &source, backend)?;
    ctx.send(&hop)
}

/// Spreads the CPUs' ID sequences over the 16-bit space (2^16 / the golden ratio): with N
/// CPUs they start about 2^16/N apart, and meet once their counters drift that far.
const ID_CPU_STRIDE: u16 = 0x9e37;

/// The outer IPv4 ID of a packet of `family` whose first 8 IP header bytes are `inner`,
/// taking `count` IDs (a GSO aggregate's segments take consecutive ones). With DF, 0: never
/// fragmented, so the ID is unused (RFC 6864). Without DF the outer packet may be fragmented
/// on the way, and its ID must not be another recent packet's to the same backend: not the
/// inner ID, which each client picks alone, but this node's own, from a per-CPU counter
/// mixed with the CPU's id (as the kernel's `ip_select_ident` counts per destination).
#[inline(always)]
fn outer_id(family: u8, inner: &[u8; 8], count: u16) -> u16 {
    if family != 4 || inner[6] & 0x40 != 0 {
        return 0;
    }
    let Some(next) = ENCAP_IDS.get_ptr_mut(0) else { return 0 };
    // Per-CPU slot: plain adds are exact. This packet takes the `count` IDs after the
    // counter's value (CPU 0's first is 1).
    let last = unsafe {
        let last = *next;
        *next = last.wrapping_add(u32::from(count));
        last
    };
    let cpu = unsafe { bpf_get_smp_processor_id() } as u16;
    (last as u16).wrapping_add(1).wrapping_add(cpu.wrapping_mul(ID_CPU_STRIDE))
}

/// The outer header of a packet of `family` whose first 8 IP header bytes are `inner`
/// (an IPv4 header is the first 20 bytes), with IPv4 ID `id` ([`outer_id`]).
#[inline(always)]
fn outer_header(family: u8, inner: [u8; 8], src: &[u32; 4], dst: &[u32; 4], id: u16) -> [u8; 40] {
    let mut h = [0u8; 40];
    if family == 4 {
        let total = u16::from_be_bytes([inner[2], inner[3]]).wrapping_add(20).to_be_bytes();
        h[0] = 0x45;
        // DSCP and ECN follow the inner packet (RFC 2983, RFC 6040's normal mode).
        h[1] = inner[1];
        h[2] = total[0];
        h[3] = total[1];
        // DF as the inner packet's; the ID (0 with DF) from `outer_id`.
        h[6] = inner[6] & 0x40;
        let id = id.to_be_bytes();
        h[4] = id[0];
        h[5] = id[1];
        h[8] = OUTER_TTL;
        h[9] = IPPROTO_IPIP;
        h[12..16].copy_from_slice(&src[0].to_ne_bytes());
        h[16..20].copy_from_slice(&dst[0].to_ne_bytes());
        let mut sum = 0u32;
        for i in 0..10 {
            sum += u32::from(u16::from_be_bytes([h[2 * i], h[2 * i + 1]]));
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = (!(sum as u16)).to_be_bytes();
        h[10] = check[0];
        h[11] = check[1];
    } else {
        let payload = u16::from_be_bytes([inner[4], inner[5]]).wrapping_add(40).to_be_bytes();
        // Version 6; the inner traffic class; flow label 0.
        h[0] = 0x60 | (inner[0] & 0x0f);
        h[1] = inner[1] & 0xf0;
        h[4] = payload[0];
        h[5] = payload[1];
        h[6] = IPPROTO_IPV6;
        h[7] = OUTER_TTL;
        for i in 0..4 {
            h[8 + 4 * i..12 + 4 * i].copy_from_slice(&src[i].to_ne_bytes());
            h[24 + 4 * i..28 + 4 * i].copy_from_slice(&dst[i].to_ne_bytes());
        }
    }
    h
}

/// [`Hook::encapsulate`] on a frame: the head grows by the outer header, the link-layer
/// header (MACs, VLAN tags, EtherType) moves to the new start, the outer header goes
/// between it and the packet.
#[inline(always)]
pub fn encapsulate_xdp(
    ctx: &XdpContext,
    meta: &PacketMeta,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> Result<(), DropReason> {
    let l3 = meta.l3();
    let inner = unsafe { *ptr_at::<[u8; 8]>(ctx, l3)? };
    let grow = overhead(meta.family) as usize;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return Err(DropReason::Internal);
    }
    // Every pointer is checked afresh: the head moved. The MACs are written by `send`;
    // the rest of the link-layer header moves, two bytes at a time (the parser follows at
    // most two VLAN tags: l3 is 14, 18 or 22).
    for i in 0..5 {
        let at = 12 + 2 * i;
        if at >= l3 {
            break;
        }
        let word = unsafe { *ptr_at::<[u8; 2]>(ctx, at + grow)? };
        unsafe { *(ptr_at::<[u8; 2]>(ctx, at)? as *mut [u8; 2]) = word };
    }
    let h = outer_header(meta.family, inner, src, dst, outer_id(meta.family, &inner, 1));
    if meta.family == 4 {
        let out = ptr_at::<[u8; 20]>(ctx, l3)? as *mut [u8; 20];
        unsafe { (*out).copy_from_slice(&h[..20]) };
    } else {
        unsafe { *(ptr_at::<[u8; 40]>(ctx, l3)? as *mut [u8; 40]) = h };
    }
    Ok(())
}

/// [`Hook::encapsulate`] on a socket buffer: `bpf_skb_adjust_room` makes room after the
/// link-layer header and marks the buffer as encapsulated (a GSO aggregate's segments
/// shrink by the outer header, and are segmented with it), then the outer header is
/// written there.
#[inline(always)]
pub fn encapsulate_skb(
    ctx: &TcContext,
    meta: &PacketMeta,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> Result<(), DropReason> {
    let l3 = meta.l3();
    let inner: [u8; 8] = ctx.load(l3).map_err(|_| DropReason::Malformed)?;
    let flags =
        if meta.family == 4 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 };
    // A UDP aggregate's gso_size delimits its datagrams: the kernel grows one only when
    // its segments keep their payload size (and so grow by the outer header).
    let flags = if udp_aggregate(ctx, meta) { flags | BPF_F_ADJ_ROOM_FIXED_GSO } else { flags };
    let grow = i32::from(overhead(meta.family));
    // Refused for a packet with its VLAN tag still in the data (the kernel takes a tag off
    // before tc ingress; a second, inner tag stays), or an aggregate of another kind (a
    // UDP tunnel's): counted as `malformed`.
    ctx.adjust_room(grow, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, u64::from(flags))
        .map_err(|_| DropReason::Malformed)?;
    // Each segment of an aggregate is an outer packet, whose IDs GSO numbers on from the
    // outer header's: the aggregate takes as many.
    let segments = unsafe { (*ctx.skb.skb).gso_segs }.clamp(1, u32::from(u16::MAX)) as u16;
    let id = outer_id(meta.family, &inner, segments);
    let h = outer_header(meta.family, inner, src, dst, id);
    // A CHECKSUM_COMPLETE buffer's sum follows the bytes written.
    let csum = u64::from(BPF_F_RECOMPUTE_CSUM);
    let stored = if meta.family == 4 {
        let mut v4 = [0u8; 20];
        v4.copy_from_slice(&h[..20]);
        ctx.store(l3, &v4, csum)
    } else {
        ctx.store(l3, &h, csum)
    };
    stored.map_err(|_| DropReason::Internal)
}

/// Bytes of `overhead` the egress interface sees on a packet of this socket buffer: none on
/// a TCP aggregate, whose segments `bpf_skb_adjust_room` shrinks by the outer header (so
/// what leaves is as long as before), all of it otherwise (a UDP aggregate's segments grow).
#[inline(always)]
pub fn skb_wire_overhead(ctx: &TcContext, meta: &PacketMeta, overhead: u16) -> u16 {
    let tcp_aggregate = unsafe { (*ctx.skb.skb).gso_size } != 0 && !udp_aggregate(ctx, meta);
    if tcp_aggregate { 0 } else { overhead }
}

/// A GSO aggregate of UDP datagrams (`SKB_GSO_UDP_L4`: `__sk_buff` has no gso_type, but
/// the only UDP aggregates that can grow are these).
#[inline(always)]
fn udp_aggregate(ctx: &TcContext, meta: &PacketMeta) -> bool {
    meta.proto == IPPROTO_UDP && unsafe { (*ctx.skb.skb).gso_size } != 0
}
