//! The answer to a packet too long for the route towards its backend: ICMP "fragmentation
//! needed" (IPv4, only with DF) or "packet too big" (IPv6) back to its sender, naming the
//! MTU it has, as a router on the path would, so that path-MTU discovery works. The stack
//! cannot send it for these packets: floating-IP and encapsulated ones, which it would route
//! by their destination, the frontend, which it has no route to. As Katran does, the frame
//! itself becomes the answer (from the frontend's address, quoting the packet's start),
//! routed back to the sender by a FIB lookup as for a packet forwarded from the arrival
//! interface (`Hook::too_big`). At XDP
//! only: a socket
//! buffer at tc may be a GSO aggregate or carry a local sender's partial checksum, and is
//! dropped.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::{
    headers::EthHdr,
    parse::{FRAG_LATER, PacketMeta, is_icmp_error, ptr_at},
};

/// Bytes of the packet quoted: its IP header (an IPv4 one with any options, IPv6 with
/// extension headers) and the start of what follows, past the 8 bytes RFC 792 asks for.
const QUOTE_V4: usize = 128;
/// RFC 4443 asks for as much as fits in 1,280 bytes; 256 is past any header chain the
/// parser follows and keeps the checksum within one `bpf_csum_diff`.
const QUOTE_V6: usize = 256;
const ETH: usize = 14;
const TTL: u8 = 64;

/// The IP length of the answer to a packet of `meta`'s family.
#[inline(always)]
pub fn answer_len(meta: &PacketMeta) -> u16 {
    (if meta.family == 4 { 20 + 8 + QUOTE_V4 } else { 40 + 8 + QUOTE_V6 }) as u16
}

/// Turns the frame into the ICMP error about it, addressed back to its sender, for a route
/// of `mtu` bytes (what the packet, as it leaves, may be long); its MACs are the sender's
/// to write. `None` where no error is due or none can be made here, and the packet is to
/// be dropped: IPv4 without DF (a router would fragment it), a later fragment, an ICMP
/// error itself, a VLAN-tagged frame, or a packet shorter than the quote.
#[inline(always)]
pub fn answer(ctx: &XdpContext, meta: &PacketMeta, mtu: u16) -> Option<()> {
    if meta.l3() != ETH || meta.frag == FRAG_LATER || is_icmp_error(meta) {
        return None;
    }
    let ether_type = unsafe { &*ptr_at::<EthHdr>(ctx, 0).ok()? }.ether_type;
    let (head, quote) = if meta.family == 4 {
        let flags = unsafe { *ptr_at::<[u8; 8]>(ctx, ETH).ok()? }[6];
        if flags & 0x40 == 0 {
            return None;
        }
        (20 + 8, QUOTE_V4)
    } else {
        (40 + 8, QUOTE_V6)
    };
    // Only the link-layer header and the quote are kept, and the new headers go in front.
    let len = ctx.data_end() - ctx.data();
    if len < ETH + quote {
        return None;
    }
    let trim = (ETH + quote) as i32 - len as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, trim) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(head as i32)) } != 0
    {
        return None;
    }
    // Every pointer afresh: the frame moved.
    unsafe { (*(ptr_at::<EthHdr>(ctx, 0).ok()? as *mut EthHdr)).ether_type = ether_type };
    if meta.family == 4 { v4(ctx, meta, mtu) } else { v6(ctx, meta, mtu) }
}

/// The IPv4 header and ICMP "fragmentation needed" (type 3, code 4) in front of the quote.
#[inline(always)]
fn v4(ctx: &XdpContext, meta: &PacketMeta, mtu: u16) -> Option<()> {
    let total = ((20 + 8 + QUOTE_V4) as u16).to_be_bytes();
    let mut ip = [0u8; 20];
    // Precedence "internetwork control", as the kernel marks its ICMP errors.
    ip[..4].copy_from_slice(&[0x45, 0xc0, total[0], total[1]]);
    ip[8] = TTL;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&meta.dst[0].to_ne_bytes());
    ip[16..20].copy_from_slice(&meta.src[0].to_ne_bytes());
    let check =
        fold(unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, ip.as_mut_ptr() as _, 20, 0) });
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    unsafe { *(ptr_at::<[u8; 20]>(ctx, ETH).ok()? as *mut [u8; 20]) = ip };
    let mtu = mtu.to_be_bytes();
    unsafe {
        *(ptr_at::<[u8; 8]>(ctx, ETH + 20).ok()? as *mut [u8; 8]) =
            [3, 4, 0, 0, 0, 0, mtu[0], mtu[1]]
    };
    let message = ptr_at::<[u8; 8 + QUOTE_V4]>(ctx, ETH + 20).ok()?;
    let sum =
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, message as _, (8 + QUOTE_V4) as u32, 0) };
    unsafe {
        *(ptr_at::<[u8; 2]>(ctx, ETH + 20 + 2).ok()? as *mut [u8; 2]) = fold(sum).to_ne_bytes()
    };
    Some(())
}

/// The IPv6 header and ICMPv6 "packet too big" (type 2) in front of the quote; its checksum
/// covers the pseudo-header: both addresses (in the packet), the length and next header.
#[inline(always)]
fn v6(ctx: &XdpContext, meta: &PacketMeta, mtu: u16) -> Option<()> {
    let payload = ((8 + QUOTE_V6) as u16).to_be_bytes();
    let mut ip = [0u8; 40];
    ip[..8].copy_from_slice(&[0x60, 0, 0, 0, payload[0], payload[1], 58, TTL]);
    for i in 0..4 {
        ip[8 + 4 * i..12 + 4 * i].copy_from_slice(&meta.dst[i].to_ne_bytes());
        ip[24 + 4 * i..28 + 4 * i].copy_from_slice(&meta.src[i].to_ne_bytes());
    }
    unsafe { *(ptr_at::<[u8; 40]>(ctx, ETH).ok()? as *mut [u8; 40]) = ip };
    let mtu = u32::from(mtu).to_be_bytes();
    let head = [2, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
    unsafe { *(ptr_at::<[u8; 8]>(ctx, ETH + 40).ok()? as *mut [u8; 8]) = head };
    // The addresses and the message lie together from the source address on; the length
    // and next header follow.
    let covered = ptr_at::<[u8; 32 + 8 + QUOTE_V6]>(ctx, ETH + 8).ok()?;
    let mut tail = [0u8; 8];
    tail[2..4].copy_from_slice(&payload);
    tail[7] = 58;
    let sum = unsafe {
        let sum =
            bpf_csum_diff(core::ptr::null_mut(), 0, covered as _, (32 + 8 + QUOTE_V6) as u32, 0);
        bpf_csum_diff(core::ptr::null_mut(), 0, tail.as_mut_ptr() as _, 8, sum as u32)
    };
    unsafe {
        *(ptr_at::<[u8; 2]>(ctx, ETH + 40 + 2).ok()? as *mut [u8; 2]) = fold(sum).to_ne_bytes()
    };
    Some(())
}

/// The Internet checksum of a `bpf_csum_diff` sum, in memory order (the sum was of words
/// read in memory order).
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
