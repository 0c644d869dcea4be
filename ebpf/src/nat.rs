//! Header rewrites with incremental checksum updates (RFC 1624): the address and port of
//! one side of a packet, and the TTL of a forwarded packet.

use aya_ebpf::programs::XdpContext;
use xdpgate_common::{flow::NAT_DST, stats::DropReason};

use crate::{
    headers::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr},
    parse::{FRAG_LATER, PacketMeta, ptr_at},
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
    let c = csum_replace16(check, u16::from_be_bytes([old[0], old[1]]), u16::from_be_bytes([new[0], new[1]]));
    csum_replace16(c, u16::from_be_bytes([old[2], old[3]]), u16::from_be_bytes([new[2], new[3]]))
}

#[inline(always)]
fn mut_at<T>(ctx: &XdpContext, off: usize) -> Result<&mut T, DropReason> {
    Ok(unsafe { &mut *(ptr_at::<T>(ctx, off)? as *mut T) })
}

/// Where a packet's L4 checksum sits (0: none that covers addresses or ports).
#[inline(always)]
fn l4_check_off(meta: &PacketMeta) -> usize {
    if meta.frag == FRAG_LATER {
        return 0;
    }
    let off = meta.l4_off as usize;
    match meta.proto {
        IPPROTO_TCP => off + 16,
        IPPROTO_UDP => off + 6,
        IPPROTO_ICMPV6 => off + 2,
        _ => 0,
    }
}

/// Replaces the destination (`NAT_DST`) or source address and port of the packet. Ports
/// change only for TCP and UDP.
// Plain values rather than an Option for the checksum: an Option's payload is undefined
// when None, and the verifier rejects the uninitialised register the compiler may copy.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, meta: &PacketMeta, kind: u8, addr: &[u32; 4], port: u16) -> Result<(), DropReason> {
    let dst = kind == NAT_DST;
    let check_off = l4_check_off(meta);
    let mut check = if check_off != 0 { u16::from_be_bytes(*mut_at::<[u8; 2]>(ctx, check_off)?) } else { 0 };
    // UDP over IPv4 without a checksum stays without one.
    let update_l4 = check_off != 0 && !(meta.family == 4 && meta.proto == IPPROTO_UDP && check == 0);

    if meta.family == 4 {
        let ip: &mut Ipv4Hdr = mut_at(ctx, meta.l3_off as usize)?;
        let new = addr[0].to_ne_bytes();
        let field = if dst { &mut ip.dst } else { &mut ip.src };
        let old = *field;
        *field = new;
        ip.check = csum_replace32(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
        check = csum_replace32(check, old, new);
    } else {
        let ip: &mut Ipv6Hdr = mut_at(ctx, meta.l3_off as usize)?;
        let field = if dst { &mut ip.dst } else { &mut ip.src };
        for (i, w) in addr.iter().enumerate() {
            let new = w.to_ne_bytes();
            let old = [field[i * 4], field[i * 4 + 1], field[i * 4 + 2], field[i * 4 + 3]];
            field[i * 4..i * 4 + 4].copy_from_slice(&new);
            check = csum_replace32(check, old, new);
        }
    }

    if (meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP) && meta.frag != FRAG_LATER {
        let ports: &mut [u8; 4] = mut_at(ctx, meta.l4_off as usize)?;
        let at = if dst { 2 } else { 0 };
        let old = u16::from_be_bytes([ports[at], ports[at + 1]]);
        ports[at..at + 2].copy_from_slice(&port.to_be_bytes());
        check = csum_replace16(check, old, port);
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
        let ip: &mut Ipv4Hdr = mut_at(ctx, meta.l3_off as usize)?;
        if ip.ttl <= 1 {
            return Ok(false);
        }
        let old = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.check = csum_replace16(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    } else {
        let ip: &mut Ipv6Hdr = mut_at(ctx, meta.l3_off as usize)?;
        if ip.hop_limit <= 1 {
            return Ok(false);
        }
        ip.hop_limit -= 1;
    }
    Ok(true)
}
