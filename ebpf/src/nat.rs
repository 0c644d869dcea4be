//! Header rewrites with incremental checksum updates (RFC 1624): the address and port of
//! one side of a packet, and the TTL of a forwarded packet; on a frame (XDP) in place, on a
//! socket buffer (tc) with the kernel's checksum helpers (`*_skb`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use xdpgate_common::{flow::NAT_DST, stats::DropReason};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr},
    icmp::{inner_offsets, quoted_check},
    parse::{FRAG_LATER, PacketMeta, is_echo, ptr_at},
};

/// `check` after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!check) + u32::from(!old) + u32::from(new);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The same for a 32-bit word given as network-order bytes.
#[inline(always)]
fn csum_replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = csum_replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    csum_replace16(c, u16::from_be_bytes([old[2], old[3]]), u16::from_be_bytes([new[2], new[3]]))
}

/// `check` after an IPv6 address it covers changed from `old` to `new`.
#[inline(always)]
fn csum_replace_addr6(mut check: u16, old: &[u8; 16], new: &[u32; 4]) -> u16 {
    for (i, w) in new.iter().enumerate() {
        let old = [old[i * 4], old[i * 4 + 1], old[i * 4 + 2], old[i * 4 + 3]];
        check = csum_replace32(check, old, w.to_ne_bytes());
    }
    check
}

/// Writes `addr` into an IPv6 address field; returns `check` updated for the change.
#[inline(always)]
fn replace_addr6(field: &mut [u8; 16], addr: &[u32; 4], check: u16) -> u16 {
    let old = *field;
    for (i, w) in addr.iter().enumerate() {
        field[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    csum_replace_addr6(check, &old, addr)
}

#[inline(always)]
fn mut_at<T>(ctx: &XdpContext, off: usize) -> Result<&mut T, DropReason> {
    Ok(unsafe { &mut *(ptr_at::<T>(ctx, off)? as *mut T) })
}

/// Where a packet's L4 checksum sits (0: none to keep up to date), and whether it covers
/// the addresses (a pseudo-header: TCP, UDP, ICMPv6; not ICMP).
#[inline(always)]
fn l4_check(meta: &PacketMeta) -> (usize, bool) {
    if meta.frag == FRAG_LATER {
        return (0, false);
    }
    let off = meta.l4();
    match meta.proto {
        IPPROTO_TCP => (off + 16, true),
        IPPROTO_UDP => (off + 6, true),
        _ if meta.is_icmp() => (off + 2, meta.family == 6),
        _ => (0, false),
    }
}

/// Replaces the destination (`NAT_DST`) or source address and port of the packet: the TCP
/// or UDP port, or an echo's identifier (the "port" of an ICMP flow).
// Plain values rather than an Option for the checksum: an Option's payload is undefined
// when None, and the verifier rejects the uninitialised register the compiler may copy.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    meta: &PacketMeta,
    kind: u8,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), DropReason> {
    let dst = kind == NAT_DST;
    let (check_off, pseudo) = l4_check(meta);
    let mut check =
        if check_off != 0 { u16::from_be_bytes(*mut_at::<[u8; 2]>(ctx, check_off)?) } else { 0 };
    // UDP over IPv4 without a checksum stays without one.
    let update_l4 =
        check_off != 0 && !(meta.family == 4 && meta.proto == IPPROTO_UDP && check == 0);

    if meta.family == 4 {
        let ip: &mut Ipv4Hdr = mut_at(ctx, meta.l3())?;
        let new = addr[0].to_ne_bytes();
        let field = if dst { &mut ip.dst } else { &mut ip.src };
        let old = *field;
        *field = new;
        ip.check = csum_replace32(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
        if pseudo {
            check = csum_replace32(check, old, new);
        }
    } else {
        let ip: &mut Ipv6Hdr = mut_at(ctx, meta.l3())?;
        let field = if dst { &mut ip.dst } else { &mut ip.src };
        check = replace_addr6(field, addr, check);
    }

    if meta.frag != FRAG_LATER {
        let at = match meta.proto {
            IPPROTO_TCP | IPPROTO_UDP if dst => 2,
            IPPROTO_TCP | IPPROTO_UDP => 0,
            _ if meta.is_icmp() && is_echo(meta.family, meta.icmp_type) => 4,
            _ => usize::MAX,
        };
        if at != usize::MAX {
            let field: &mut [u8; 2] = mut_at(ctx, meta.l4() + at)?;
            let old = u16::from_be_bytes(*field);
            *field = port.to_be_bytes();
            check = csum_replace16(check, old, port);
        }
    }

    if update_l4 {
        // A UDP checksum that comes out 0 is sent as all ones (RFC 768).
        if meta.proto == IPPROTO_UDP && check == 0 {
            check = 0xffff;
        }
        *mut_at::<[u8; 2]>(ctx, check_off)? = check.to_be_bytes();
    }
    Ok(())
}

/// Decrements the TTL (hop limit) of a packet XDP forwards itself; false when it would
/// reach zero, so the kernel can send the ICMP time-exceeded.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, meta: &PacketMeta) -> Result<bool, DropReason> {
    if meta.family == 4 {
        let ip: &mut Ipv4Hdr = mut_at(ctx, meta.l3())?;
        if ip.ttl <= 1 {
            return Ok(false);
        }
        let old = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.check = csum_replace16(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    } else {
        let ip: &mut Ipv6Hdr = mut_at(ctx, meta.l3())?;
        if ip.hop_limit <= 1 {
            return Ok(false);
        }
        ip.hop_limit -= 1;
    }
    Ok(true)
}

/// Where an ICMP error's rewrite of `kind` writes, as offsets into the outer and the quoted
/// IP header and the quoted L4 header: an error coming back to a flow's host (`NAT_DST`)
/// gets a new outer destination and quoted source, one going out from the host's side
/// (`NAT_SRC`) a new outer source and quoted destination; the quoted port (or echo
/// identifier) is the one of the quoted side.
#[inline(always)]
fn icmp_error_fields(family: u8, kind: u8, proto: u8) -> (usize, usize, usize) {
    let dst = kind == NAT_DST;
    let port = match proto {
        IPPROTO_TCP | IPPROTO_UDP if dst => 0,
        IPPROTO_TCP | IPPROTO_UDP => 2,
        _ => 4,
    };
    (addr_offset(family, dst), addr_offset(family, !dst), port)
}

/// Where the destination (`dst`) or the source address lies in an IP header of `family`.
#[inline(always)]
fn addr_offset(family: u8, dst: bool) -> usize {
    match (family, dst) {
        (4, true) => 16,
        (4, false) => 12,
        (_, true) => 24,
        (_, false) => 8,
    }
}

/// Translates an ICMP error about a translated flow as that flow's packets are: the
/// quoted packet's address and port (or echo identifier) on the translated side become
/// `addr` and `port` (see [`icmp_error_fields`]), and, when `outer`, the outer address on
/// that side too (not for the host's own errors, which come from its address). The quote's
/// checksums follow (its IPv4 header's, and its L4 one where the quote holds it: the
/// quote is then the packet as its sender sent it), and so does the ICMP checksum, which
/// covers the quote.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &XdpContext,
    meta: &PacketMeta,
    kind: u8,
    addr: &[u32; 4],
    port: u16,
    outer: bool,
) -> Result<(), DropReason> {
    let (l3, l4, proto) = inner_offsets(ctx, meta).ok_or(DropReason::Malformed)?;
    let (q_off, q_pseudo) = quoted_check(ctx, meta, l4, proto).ok_or(DropReason::Malformed)?;
    let (outer_at, inner_at, port_at) = icmp_error_fields(meta.family, kind, proto);
    let check_off = meta.l4() + 2;
    let mut check = u16::from_be_bytes(*mut_at::<[u8; 2]>(ctx, check_off)?);
    let old_q = if q_off != 0 { u16::from_be_bytes(*mut_at::<[u8; 2]>(ctx, q_off)?) } else { 0 };
    let mut q = old_q;
    if meta.family == 4 {
        let new = addr[0].to_ne_bytes();
        if outer {
            let field: &mut [u8; 4] = mut_at(ctx, meta.l3() + outer_at)?;
            let old = *field;
            *field = new;
            let ip: &mut Ipv4Hdr = mut_at(ctx, meta.l3())?;
            ip.check = csum_replace32(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
        }
        let field: &mut [u8; 4] = mut_at(ctx, l3 + inner_at)?;
        let old = *field;
        *field = new;
        let inner: &mut Ipv4Hdr = mut_at(ctx, l3)?;
        let old_inner_check = u16::from_be_bytes(inner.check);
        let new_inner_check = csum_replace32(old_inner_check, old, new);
        inner.check = new_inner_check.to_be_bytes();
        check = csum_replace32(check, old, new);
        check = csum_replace16(check, old_inner_check, new_inner_check);
        if q_pseudo {
            q = csum_replace32(q, old, new);
        }
    } else {
        // ICMPv6 covers the outer pseudo-header.
        if outer {
            check = replace_addr6(mut_at(ctx, meta.l3() + outer_at)?, addr, check);
        }
        let field: &mut [u8; 16] = mut_at(ctx, l3 + inner_at)?;
        let old = *field;
        check = replace_addr6(field, addr, check);
        if q_pseudo {
            q = csum_replace_addr6(q, &old, addr);
        }
    }
    let field: &mut [u8; 2] = mut_at(ctx, l4 + port_at)?;
    let old = u16::from_be_bytes(*field);
    *field = port.to_be_bytes();
    check = csum_replace16(check, old, port);
    q = csum_replace16(q, old, port);
    if let Some(q) = quoted_check_value(meta, proto, q_off, old_q, q) {
        *mut_at::<[u8; 2]>(ctx, q_off)? = q.to_be_bytes();
        check = csum_replace16(check, old_q, q);
    }
    *mut_at::<[u8; 2]>(ctx, check_off)? = check.to_be_bytes();
    Ok(())
}

/// What to write over the quoted L4 checksum at `q_off` (0: not in the quote), `old_q`,
/// now `q`: nothing for a quoted UDP datagram over IPv4 without one, which stays without,
/// and all ones for a UDP checksum that comes out 0 (RFC 768).
#[inline(always)]
fn quoted_check_value(
    meta: &PacketMeta,
    proto: u8,
    q_off: usize,
    old_q: u16,
    q: u16,
) -> Option<u16> {
    if q_off == 0 || (meta.family == 4 && proto == IPPROTO_UDP && old_q == 0) {
        return None;
    }
    Some(if proto == IPPROTO_UDP && q == 0 { 0xffff } else { q })
}

// The same rewrites on a socket buffer (the tc hook). Its L4 checksum may be
// CHECKSUM_PARTIAL (a GRO aggregate, or a local sender's packet across a veth: the field
// holds only the pseudo-header's sum, the device or GSO completes it) or CHECKSUM_COMPLETE
// (`skb->csum` sums the packet), where the frame's in-place RFC 1624 update would be wrong.
// The kernel's helpers know the state: `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` for
// a word of the pseudo-header (the addresses), without it for a word of the segment (a
// port), and `BPF_F_MARK_MANGLED_0` keeps a UDP checksum of 0 ("none") as it is. They
// invalidate packet pointers: every access below derives its pointer afresh.

/// `bpf_l4_csum_replace`'s size flag for a 16-bit and a 32-bit word.
const CSUM_16: u64 = 2;
const CSUM_32: u64 = 4;

/// Reads by `bpf_skb_load_bytes`: the writes here are helpers too, and direct reads between
/// them made the compiler merge bounds checks into ones the verifier cannot follow.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, DropReason> {
    ctx.load::<T>(off).map_err(|_| DropReason::Malformed)
}

/// Writes `new` (network-order bytes) over the 32-bit word at `off`, updating the IPv4
/// header checksum at `ip_check` (0: none) and the L4 checksum at `l4_check` (0: none) with
/// `l4_flags`.
#[inline(always)]
fn replace32(
    ctx: &TcContext,
    off: usize,
    new: u32,
    ip_check: usize,
    l4_check: usize,
    l4_flags: u64,
) -> Result<(), DropReason> {
    let old: u32 = read(ctx, off)?;
    ctx.store(off, &new, 0).map_err(|_| DropReason::Malformed)?;
    if ip_check != 0 {
        ctx.l3_csum_replace(ip_check, u64::from(old), u64::from(new), CSUM_32)
            .map_err(|_| DropReason::Malformed)?;
    }
    if l4_check != 0 {
        ctx.l4_csum_replace(l4_check, u64::from(old), u64::from(new), l4_flags | CSUM_32)
            .map_err(|_| DropReason::Malformed)?;
    }
    Ok(())
}

/// The same for a 16-bit word (`new` in host order); returns the old value (host order).
#[inline(always)]
fn replace16(
    ctx: &TcContext,
    off: usize,
    new: u16,
    l4_check: usize,
    l4_flags: u64,
) -> Result<u16, DropReason> {
    let old: [u8; 2] = read(ctx, off)?;
    let new = new.to_be_bytes();
    ctx.store(off, &new, 0).map_err(|_| DropReason::Malformed)?;
    if l4_check != 0 {
        let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        ctx.l4_csum_replace(l4_check, u64::from(old), u64::from(new), l4_flags | CSUM_16)
            .map_err(|_| DropReason::Malformed)?;
    }
    Ok(u16::from_be_bytes(old))
}

/// [`rewrite`] on a socket buffer.
#[inline(always)]
pub fn rewrite_skb(
    ctx: &TcContext,
    meta: &PacketMeta,
    kind: u8,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), DropReason> {
    let dst = kind == NAT_DST;
    let (check_off, pseudo) = l4_check(meta);
    let mangled = if meta.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let addr_check = if pseudo { check_off } else { 0 };
    let addr_flags = BPF_F_PSEUDO_HDR as u64 | mangled;
    let l3 = meta.l3();
    if meta.family == 4 {
        let off = l3 + addr_offset(4, dst);
        replace32(ctx, off, addr[0], l3 + 10, addr_check, addr_flags)?;
    } else {
        let off = l3 + addr_offset(6, dst);
        for (i, w) in addr.iter().enumerate() {
            replace32(ctx, off + 4 * i, *w, 0, addr_check, addr_flags)?;
        }
    }
    if meta.frag != FRAG_LATER {
        let at = match meta.proto {
            IPPROTO_TCP | IPPROTO_UDP if dst => 2,
            IPPROTO_TCP | IPPROTO_UDP => 0,
            _ if meta.is_icmp() && is_echo(meta.family, meta.icmp_type) => 4,
            _ => usize::MAX,
        };
        if at != usize::MAX {
            replace16(ctx, meta.l4() + at, port, check_off, mangled)?;
        }
    }
    Ok(())
}

/// [`decrement_ttl`] on a socket buffer.
#[inline(always)]
pub fn decrement_ttl_skb(ctx: &TcContext, meta: &PacketMeta) -> Result<bool, DropReason> {
    let l3 = meta.l3();
    if meta.family == 4 {
        // TTL and protocol: the 16-bit word the header checksum sees change.
        let old: [u8; 2] = read(ctx, l3 + 8)?;
        if old[0] <= 1 {
            return Ok(false);
        }
        let new = [old[0] - 1, old[1]];
        ctx.store(l3 + 8, &new, 0).map_err(|_| DropReason::Malformed)?;
        let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), CSUM_16)
            .map_err(|_| DropReason::Malformed)?;
    } else {
        let hop: u8 = read(ctx, l3 + 7)?;
        if hop <= 1 {
            return Ok(false);
        }
        ctx.store(l3 + 7, &(hop - 1), 0).map_err(|_| DropReason::Malformed)?;
    }
    Ok(true)
}

/// [`rewrite_icmp_error`] on a socket buffer. Every word changed inside the quote is ICMP
/// payload (no pseudo-header); the outer IPv6 addresses are in ICMPv6's pseudo-header.
#[inline(always)]
pub fn rewrite_icmp_error_skb(
    ctx: &TcContext,
    meta: &PacketMeta,
    kind: u8,
    addr: &[u32; 4],
    port: u16,
    outer: bool,
) -> Result<(), DropReason> {
    let (l3, l4, proto) = inner_offsets(ctx, meta).ok_or(DropReason::Malformed)?;
    let (q_off, q_pseudo) = quoted_check(ctx, meta, l4, proto).ok_or(DropReason::Malformed)?;
    let (outer_at, inner_at, port_at) = icmp_error_fields(meta.family, kind, proto);
    let check = meta.l4() + 2;
    let ip = meta.l3();
    let old_q = if q_off != 0 { u16::from_be_bytes(read::<[u8; 2]>(ctx, q_off)?) } else { 0 };
    let mut q = old_q;
    if meta.family == 4 {
        if outer {
            replace32(ctx, ip + outer_at, addr[0], ip + 10, 0, 0)?;
        }
        // The quoted header's checksum is ICMP payload too: computed here, then replaced
        // like any other word of it.
        // TTL, protocol, checksum and both addresses in one read.
        let h = read::<[u8; 12]>(ctx, l3 + 8)?;
        let old =
            if inner_at == 12 { [h[4], h[5], h[6], h[7]] } else { [h[8], h[9], h[10], h[11]] };
        let new = addr[0].to_ne_bytes();
        let new_inner_check = csum_replace32(u16::from_be_bytes([h[2], h[3]]), old, new);
        replace32(ctx, l3 + inner_at, addr[0], 0, check, 0)?;
        replace16(ctx, l3 + 10, new_inner_check, check, 0)?;
        if q_pseudo {
            q = csum_replace32(q, old, new);
        }
    } else {
        if outer {
            for (i, w) in addr.iter().enumerate() {
                replace32(ctx, ip + outer_at + 4 * i, *w, 0, check, BPF_F_PSEUDO_HDR as u64)?;
            }
        }
        let old = read::<[u8; 16]>(ctx, l3 + inner_at)?;
        for (i, w) in addr.iter().enumerate() {
            replace32(ctx, l3 + inner_at + 4 * i, *w, 0, check, 0)?;
        }
        if q_pseudo {
            q = csum_replace_addr6(q, &old, addr);
        }
    }
    let old = replace16(ctx, l4 + port_at, port, check, 0)?;
    q = csum_replace16(q, old, port);
    if let Some(q) = quoted_check_value(meta, proto, q_off, old_q, q) {
        replace16(ctx, q_off, q, check, 0)?;
    }
    Ok(())
}
