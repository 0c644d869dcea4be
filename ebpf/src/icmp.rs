//! ICMP errors (destination unreachable, time exceeded, packet too big, parameter problem)
//! belong to the flow of the packet they quote. An error about an allowed flow passes as
//! part of it, and when that flow is translated the error is translated as its packets are,
//! both ways: one coming in from the translated side reaches the flow's host (outer
//! destination, the quoted source address and port), so path-MTU discovery works through
//! NAT and load balancing; one going out from the host's side (a backend's or a private
//! host's port unreachable) leaves from the translated address and quotes the packet as
//! its sender sent it (outer source, the quoted destination address and port), so the
//! sender's socket sees it and no private address leaves (as RFC 5508 asks of a NAT).

use xdpgate_common::{
    flow::{FlowKey, NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_SRC},
    is_icmp,
    nsg::FLAG_NO_FRONTENDS,
};

use crate::{
    action::{Action, NAT_ICMP_ERROR_DST, NAT_ICMP_ERROR_SRC},
    flow,
    headers::{IPPROTO_TCP, IPPROTO_UDP, IcmpHdr, Ipv4Hdr, Ipv6Hdr, be16},
    lb::{self, Lb},
    maps::{CLASSIFY_SCRATCH, EMBRYOS, FLOWS},
    nsg::Active,
    parse::{Packet, PacketMeta, ipv6_chain, is_echo, paired_mark, ptr_at},
};

/// Offsets of the quoted packet: its IP header and its L4 header, whose first 8 bytes (all
/// an error must quote) lie inside the error's own IP packet. Bytes past its end (Ethernet
/// padding, or a forger's) are no part of it: a receiver trims them, so a quote read there
/// let a first fragment pass as a flow's error and its later fragment carry another quote.
#[inline(always)]
pub fn inner_offsets(ctx: &impl Packet, meta: &PacketMeta) -> Option<(usize, usize, u8)> {
    let l3 = meta.l4() + 8;
    let end = ip_end(ctx, meta)?;
    let (l4, proto) = if meta.family == 4 {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, l3).ok()? };
        let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        (l3 + ihl, ip.proto)
    } else {
        // Past the quoted packet's extension headers (a fragment's among them, which a
        // Packet Too Big about a fragmented datagram quotes): a later fragment quotes no
        // L4 header.
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, l3).ok()? };
        let chain = ipv6_chain(ctx, l3 + 40, ip.next_hdr, end, false).ok()?;
        if chain.fragment.is_some_and(|(_, fo)| fo & 0xfff8 != 0) {
            return None;
        }
        (chain.off, chain.proto)
    };
    (l4 + 8 <= end).then_some((l3, l4, proto))
}

/// Where the quoted packet's own L4 checksum lies, when the quote holds it (0: nothing to
/// keep up to date), and whether it covers the addresses (a pseudo-header: TCP, UDP,
/// ICMPv6; not ICMP, whose checksum covers the echo identifier alone).
#[inline(always)]
pub fn quoted_check(
    ctx: &impl Packet,
    meta: &PacketMeta,
    l4: usize,
    proto: u8,
) -> Option<(usize, bool)> {
    let (off, pseudo) = match proto {
        IPPROTO_TCP => (l4 + 16, true),
        IPPROTO_UDP => (l4 + 6, true),
        p if is_icmp(meta.family, p) => (l4 + 2, meta.family == 6),
        _ => return Some((0, false)),
    };
    Some(if off + 2 <= ip_end(ctx, meta)? { (off, pseudo) } else { (0, false) })
}

/// Where the packet's own IP datagram ends (its length field; ICMP is never GSO).
#[inline(always)]
fn ip_end(ctx: &impl Packet, meta: &PacketMeta) -> Option<usize> {
    let l3 = meta.l3();
    Some(if meta.family == 4 {
        l3 + be16(unsafe { &*ptr_at::<Ipv4Hdr>(ctx, l3).ok()? }.total_len) as usize
    } else {
        l3 + 40 + be16(unsafe { &*ptr_at::<Ipv6Hdr>(ctx, l3).ok()? }.payload_len) as usize
    })
}

/// The action for an ICMP error whose quoted packet belongs to a known flow: the error
/// travels like that flow's replies, so it is looked up as one. A flow the lookups would
/// not pass a packet of as it stands (idled out, or in neither direction judged again
/// under a newer policy, which may deny it) vouches for no error: the error is then one
/// about no flow.
#[inline(always)]
pub fn related(ctx: &impl Packet, active: &Active<'_>, meta: &PacketMeta) -> Option<Action> {
    let (l3, l4, proto) = inner_offsets(ctx, meta)?;
    let mut key = FlowKey {
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        proto,
        family: meta.family,
        kind: 0,
        _pad: 0,
    };
    // The quoted packet went from its source to its destination; a reply to it comes from
    // the destination: that is the entry the error belongs to.
    if meta.family == 4 {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, l3).ok()? };
        key.src[0] = u32::from_ne_bytes(ip.dst);
        key.dst[0] = u32::from_ne_bytes(ip.src);
    } else {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, l3).ok()? };
        key.src = xdpgate_common::words(&ip.dst);
        key.dst = xdpgate_common::words(&ip.src);
    }
    // A quoted echo message's mark (its type + 1, as `parse::icmp_mark`), else 0.
    let mut quoted_echo = 0;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = unsafe { &*ptr_at::<[u8; 4]>(ctx, l4).ok()? };
            key.sport = u16::from_be_bytes([ports[2], ports[3]]);
            key.dport = u16::from_be_bytes([ports[0], ports[1]]);
        }
        // The quoted packet is of the error's family.
        p if is_icmp(meta.family, p) => {
            let icmp = unsafe { &*ptr_at::<IcmpHdr>(ctx, l4).ok()? };
            if !is_echo(meta.family, icmp.kind) {
                return None;
            }
            let id = u16::from_be_bytes([icmp.rest[0], icmp.rest[1]]);
            key.sport = id;
            key.dport = id;
            quoted_echo = u32::from(icmp.kind) + 1;
        }
        _ => return None,
    }
    // An error about a packet goes back to that packet's source: one addressed to anyone
    // else is no part of the flow (it would let ICMP past policy to any host).
    if meta.dst != key.dst {
        return None;
    }
    // Errors about a flow's first packets (an unreachable port, say) belong to an embryo.
    let (entry, vouches) = match unsafe { FLOWS.get(&key) } {
        Some(e) => (e, flow::vouches::<true>(active, &key, e)),
        // A lone flow (`TCP_LONE`) has no reply entry: its own stands in.
        None => match unsafe { EMBRYOS.get(&key) }
            .or_else(|| flow::waiting_first(&key).map(|e| unsafe { &*e }))
        {
            Some(e) => (e, flow::vouches::<false>(active, &key, e)),
            None => return to_direct_backend(active, meta, &key),
        },
    };
    // The quoted echo message must be the one its direction carries, paired with what
    // the entry's direction carries (an error quoting an echo reply the host never sent,
    // on its pings' key, is about no flow; nor is one on an entry without a mark, an
    // earlier build's flow of a message other than echo).
    if !vouches || (quoted_echo != 0 && paired_mark(meta.family, entry.seq).0 != quoted_echo) {
        return None;
    }
    let nat = match entry.nat {
        NAT_DST => NAT_ICMP_ERROR_DST,
        NAT_SRC => NAT_ICMP_ERROR_SRC,
        // About a backend's direct reply (from the frontend address, not through this
        // gateway): the error goes on to the backend as the flow's packets do, which hold
        // the frontend address too. Passed to the stack, which does not hold that address,
        // it went back to the router (path-MTU discovery failed for such flows).
        NAT_ENCAP | NAT_NEXT_HOP if entry.reply == 0 => entry.nat,
        _ => return Some(Action::PASS),
    };
    Some(Action { nat, addr: entry.nat_addr, port: entry.nat_port })
}

/// An error about a backend's direct reply whose flow this gateway does not hold: routers
/// spread errors over the gateways by the error's own addresses, not the flow's. Sent to the
/// backend the load balancer picks for the flow the error quotes, which every gateway picks
/// alike (as Katran does); the backend's stack checks the quote against its own sockets.
#[inline(always)]
fn to_direct_backend(active: &Active<'_>, meta: &PacketMeta, key: &FlowKey) -> Option<Action> {
    if active.config.flags & FLAG_NO_FRONTENDS != 0 {
        return None;
    }
    // The flow's first packet, as the load balancer saw it.
    let m = unsafe { &mut *CLASSIFY_SCRATCH.get_ptr_mut(0)? };
    *m = *meta;
    (m.src, m.dst, m.sport, m.dport, m.proto) = (key.src, key.dst, key.sport, key.dport, key.proto);
    match lb::select(m, active.config.flags) {
        Lb::Selected(s) if s.encap => Some(Action { nat: NAT_ENCAP, addr: s.addr, port: s.port }),
        Lb::Selected(s) if s.floating_ip => {
            Some(Action { nat: NAT_NEXT_HOP, addr: s.addr, port: s.port })
        }
        _ => None,
    }
}
