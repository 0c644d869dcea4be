//! Header rewrites with incremental checksum updates (RFC 1624): the address and port of
//! one side of a packet, and the TTL of a forwarded packet.

use aya_ebpf::programs::XdpContext;
use xdpgate_common::{flow::NAT_DST, stats::DropReason};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr},
    icmp::inner_offsets,
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

/// Writes `addr` into an IPv6 address field; returns `check` updated for the change.
#[inline(always)]
fn replace_addr6(field: &mut [u8; 16], addr: &[u32; 4], mut check: u16) -> u16 {
    for (i, w) in addr.iter().enumerate() {
        let new = w.to_ne_bytes();
        let old = [field[i * 4], field[i * 4 + 1], field[i * 4 + 2], field[i * 4 + 3]];
        field[i * 4..i * 4 + 4].copy_from_slice(&new);
        check = csum_replace32(check, old, new);
    }
    check
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

/// Translates an ICMP error about a translated flow back to that flow's host: the outer
/// destination, and the quoted packet's source address and port (or echo identifier)
/// become `addr` and `port`. The ICMP checksum covers the quoted bytes, so it follows every
/// word changed there, the quoted IPv4 header checksum included. (The quoted L4 checksum
/// is left as it is: it may not even be in the quote, and no receiver checks it.)
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &XdpContext,
    meta: &PacketMeta,
    addr: &[u32; 4],
    port: u16,
) -> Result<(), DropReason> {
    let (l3, l4, proto) = inner_offsets(ctx, meta).ok_or(DropReason::Malformed)?;
    let check_off = meta.l4() + 2;
    let mut check = u16::from_be_bytes(*mut_at::<[u8; 2]>(ctx, check_off)?);
    if meta.family == 4 {
        let outer: &mut Ipv4Hdr = mut_at(ctx, meta.l3())?;
        let new = addr[0].to_ne_bytes();
        let old = outer.dst;
        outer.dst = new;
        outer.check = csum_replace32(u16::from_be_bytes(outer.check), old, new).to_be_bytes();
        let inner: &mut Ipv4Hdr = mut_at(ctx, l3)?;
        let old = inner.src;
        inner.src = new;
        let old_inner_check = u16::from_be_bytes(inner.check);
        let new_inner_check = csum_replace32(old_inner_check, old, new);
        inner.check = new_inner_check.to_be_bytes();
        check = csum_replace32(check, old, new);
        check = csum_replace16(check, old_inner_check, new_inner_check);
    } else {
        let outer: &mut Ipv6Hdr = mut_at(ctx, meta.l3())?;
        // ICMPv6 covers the outer pseudo-header.
        check = replace_addr6(&mut outer.dst, addr, check);
        let inner: &mut Ipv6Hdr = mut_at(ctx, l3)?;
        check = replace_addr6(&mut inner.src, addr, check);
    }
    let at = match proto {
        IPPROTO_TCP | IPPROTO_UDP => 0,
        _ => 4,
    };
    let field: &mut [u8; 2] = mut_at(ctx, l4 + at)?;
    let old = u16::from_be_bytes(*field);
    *field = port.to_be_bytes();
    check = csum_replace16(check, old, port);
    *mut_at::<[u8; 2]>(ctx, check_off)? = check.to_be_bytes();
    Ok(())
}
