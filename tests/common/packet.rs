//! Builds test frames with etherparse (correct lengths and checksums), plus the raw
//! surgery malformed cases need.

use std::net::IpAddr;

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpHeaders, PacketBuilder, PacketBuilderStep, VlanId, icmpv4, icmpv6,
};
use xdpgate_common::flow::FlowKey;

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];
pub const ETH_LEN: usize = 14;

/// The L4 part of a test packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    /// TCP with the given flags byte (e.g. SYN = 0x02).
    Tcp(u16, u16, u8),
    Udp(u16, u16),
    /// ICMP or ICMPv6 echo request with this identifier.
    Echo(u16),
    /// ICMP or ICMPv6 echo reply with this identifier.
    EchoReply(u16),
    /// An ICMP or ICMPv6 port unreachable; the payload is the packet it quotes, from its IP
    /// header on.
    PortUnreachable,
    /// An ICMP fragmentation needed or ICMPv6 packet too big with this MTU; the payload is
    /// the packet it quotes.
    TooBig(u16),
    /// No L4 header built: the payload follows the IP header as protocol (next header) `n`.
    Raw(u8),
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

fn ip(src: IpAddr, dst: IpAddr, vlans: &[u16]) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let vid = |v: u16| VlanId::try_new(v).expect("vlan id");
    match (src, dst, vlans) {
        (IpAddr::V4(s), IpAddr::V4(d), []) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V4(s), IpAddr::V4(d), [v]) => {
            eth.single_vlan(vid(*v)).ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V4(s), IpAddr::V4(d), [o, i]) => {
            eth.double_vlan(vid(*o), vid(*i)).ipv4(s.octets(), d.octets(), 64)
        }
        (IpAddr::V6(s), IpAddr::V6(d), []) => eth.ipv6(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d), [v]) => {
            eth.single_vlan(vid(*v)).ipv6(s.octets(), d.octets(), 64)
        }
        _ => panic!("mixed address families or too many VLANs"),
    }
}

/// A complete frame: Ethernet, optional VLAN tags, IPv4 or IPv6, L4 and `payload`.
pub fn frame_vlan(src: &str, dst: &str, l4: L4, vlans: &[u16], payload: &[u8]) -> Vec<u8> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let ip = ip(src, dst, vlans);
    let mut out = Vec::new();
    let v6 = src.is_ipv6();
    match l4 {
        L4::Tcp(sp, dp, flags) => {
            let mut b = ip.tcp(sp, dp, 1000, 64240);
            if flags & SYN != 0 {
                b = b.syn();
            }
            if flags & ACK != 0 {
                b = b.ack(1);
            }
            if flags & FIN != 0 {
                b = b.fin();
            }
            if flags & RST != 0 {
                b = b.rst();
            }
            b.write(&mut out, payload)
        }
        L4::Udp(sp, dp) => ip.udp(sp, dp).write(&mut out, payload),
        L4::Echo(id) if v6 => ip.icmpv6_echo_request(id, 1).write(&mut out, payload),
        L4::Echo(id) => ip.icmpv4_echo_request(id, 1).write(&mut out, payload),
        L4::EchoReply(id) if v6 => ip.icmpv6_echo_reply(id, 1).write(&mut out, payload),
        L4::EchoReply(id) => ip.icmpv4_echo_reply(id, 1).write(&mut out, payload),
        L4::PortUnreachable if v6 => ip
            .icmpv6(Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port))
            .write(&mut out, payload),
        L4::PortUnreachable => ip
            .icmpv4(Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port))
            .write(&mut out, payload),
        L4::TooBig(mtu) if v6 => {
            ip.icmpv6(Icmpv6Type::PacketTooBig { mtu: mtu.into() }).write(&mut out, payload)
        }
        L4::TooBig(mtu) => ip
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
            ))
            .write(&mut out, payload),
        L4::Raw(n) => ip.write(&mut out, n.into(), payload),
    }
    .expect("build packet");
    out
}

pub fn frame(src: &str, dst: &str, l4: L4) -> Vec<u8> {
    frame_vlan(src, dst, l4, &[], b"xdpgate")
}

/// `inner` (a frame as [`frame`] builds it) as a gateway's encapsulating forwarding mode
/// sends it: its IP packet behind one more Ethernet and IP header from `outer_src` to
/// `outer_dst` (IPv4: protocol 4, IPIP; IPv6: next header 41, or for an inner packet of the
/// other family, 41 in IPv4 and 4 in IPv6).
pub fn encapsulate(outer_src: &str, outer_dst: &str, inner: &[u8]) -> Vec<u8> {
    let proto = match u16::from_be_bytes([inner[12], inner[13]]) {
        0x0800 => 4,
        0x86dd => 41,
        t => panic!("not an IP frame (ethertype {t:#06x})"),
    };
    frame_vlan(outer_src, outer_dst, L4::Raw(proto), &[], &inner[ETH_LEN..])
}

/// Recomputes the IPv4 header checksum after surgery on the header at `off`.
pub fn fix_ipv4_checksum(p: &mut [u8], off: usize) {
    let ihl = ((p[off] & 0xf) as usize) * 4;
    p[off + 10] = 0;
    p[off + 11] = 0;
    let mut sum = 0u32;
    for c in p[off..off + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[off + 10..off + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Inserts IPv4 options into the header at `ip` (IHL grows), fixing total length and
/// checksum.
pub fn with_ipv4_options(p: &[u8], ip: usize, options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "options are 32-bit words");
    let mut out = p.to_vec();
    out.splice(ip + 20..ip + 20, options.iter().copied());
    out[ip] = 0x40 | ((20 + options.len()) / 4) as u8;
    let total = (out.len() - ip) as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out, ip);
    out
}

/// Sets the IPv4 total length (and checksum).
pub fn set_ipv4_total_len(p: &mut [u8], off: usize, len: u16) {
    p[off + 2..off + 4].copy_from_slice(&len.to_be_bytes());
    fix_ipv4_checksum(p, off);
}

/// Sets the IPv4 fragment field (flags and offset in 8-byte units).
pub fn set_ipv4_frag(p: &mut [u8], off: usize, more: bool, offset8: u16) {
    let v = offset8 | if more { 0x2000 } else { 0 };
    p[off + 6..off + 8].copy_from_slice(&v.to_be_bytes());
    fix_ipv4_checksum(p, off);
}

/// Sets the TTL (IPv4, its header checksum updated) or hop limit (IPv6) of an untagged frame.
pub fn set_ttl(p: &mut [u8], ttl: u8) {
    if p[ETH_LEN] >> 4 == 4 {
        p[ETH_LEN + 8] = ttl;
        fix_ipv4_checksum(p, ETH_LEN);
    } else {
        p[ETH_LEN + 7] = ttl;
    }
}

/// Inserts IPv6 extension headers (each `(type, 8-byte blocks beyond the first)`) between
/// the IPv6 header and its payload, fixing next-header chain and payload length.
pub fn insert_ipv6_ext(p: &[u8], exts: &[(u8, u8)]) -> Vec<u8> {
    let ip = ETH_LEN;
    let l4 = ip + 40;
    let mut next = p[ip + 6];
    let mut ext_bytes = Vec::new();
    for &(kind, extra) in exts.iter().rev() {
        let len = 8 * (usize::from(extra) + 1);
        let mut h = vec![0u8; len];
        h[0] = next;
        h[1] = extra;
        if kind == 44 {
            assert_eq!(extra, 0, "fragment header is 8 bytes");
        }
        ext_bytes.splice(0..0, h);
        next = kind;
    }
    let mut out = p[..l4].to_vec();
    out[ip + 6] = next;
    let payload_len = u16::from_be_bytes([p[ip + 4], p[ip + 5]]) as usize + ext_bytes.len();
    out[ip + 4..ip + 6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    out.extend_from_slice(&ext_bytes);
    out.extend_from_slice(&p[l4..]);
    out
}

fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn folds_to_ffff(mut sum: u32) -> bool {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Leaves in the L4 checksum of the TCP or UDP packet whose IP header starts at `ip` in
/// `frame` what a sender with checksum offload leaves there: the pseudo-header's folded
/// sum, for the device to complete. Returns where the device starts summing and where in
/// the L4 header the checksum lies (`csum_start`, `csum_offset`).
pub fn offload_checksum(frame: &mut [u8], ip: usize) -> (u16, u16) {
    let p = &frame[ip..];
    let (proto, l4, pseudo) = if p[0] >> 4 == 4 {
        let l4 = ip + usize::from(p[0] & 0xf) * 4;
        (p[9], l4, ones_sum(&p[12..20], 0))
    } else {
        (p[6], ip + 40, ones_sum(&p[8..40], 0))
    };
    let offset = match proto {
        6 => 16,
        17 => 6,
        n => panic!("protocol {n}: not TCP or UDP"),
    };
    let mut sum = pseudo + u32::from(proto) + (frame.len() - l4) as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[l4 + offset..l4 + offset + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    (l4 as u16, offset as u16)
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP(v6) checksum of an untagged frame
/// from scratch (not incrementally, so it can catch a wrong incremental update), and those
/// of the packet an ICMP error quotes: its IPv4 header's, and, when the quote holds all of
/// it, its L4 one.
pub fn checksums_ok(p: &[u8]) -> Result<(), String> {
    if let Some(quote) = quoted(p).filter(|q| q.first().is_some_and(|v| v >> 4 == 4))
        && !quote
            .get(..usize::from(quote[0] & 0xf) * 4)
            .is_some_and(|h| folds_to_ffff(ones_sum(h, 0)))
    {
        return Err("quoted IPv4 header checksum".into());
    }
    if let Some(quote) = quoted(p).filter(|q| whole(q)) {
        checksums_ok(&[&p[..ETH_LEN], quote].concat()).map_err(|e| format!("quoted {e}"))?;
    }
    let ip = &p[ETH_LEN..];
    let (proto, l4, pseudo): (u8, &[u8], u32) = if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if !folds_to_ffff(ones_sum(&ip[..ihl], 0)) {
            return Err("IPv4 header checksum".into());
        }
        let l4 = &ip[ihl..total];
        let pseudo = ones_sum(&ip[12..20], 0) + u32::from(ip[9]) + l4.len() as u32;
        (ip[9], l4, pseudo)
    } else {
        let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let l4 = &ip[40..40 + len];
        let pseudo = ones_sum(&ip[8..40], 0) + u32::from(ip[6]) + l4.len() as u32;
        (ip[6], l4, pseudo)
    };
    let ok = match proto {
        6 | 58 => folds_to_ffff(ones_sum(l4, pseudo)),
        17 if u16::from_be_bytes([l4[6], l4[7]]) == 0 && ip[0] >> 4 == 4 => true,
        17 => folds_to_ffff(ones_sum(l4, pseudo)),
        1 => folds_to_ffff(ones_sum(l4, 0)),
        _ => true,
    };
    if ok { Ok(()) } else { Err(format!("L4 (protocol {proto}) checksum")) }
}

/// The packet an ICMP or ICMPv6 error in an untagged frame quotes, from its IP header on.
pub fn quoted(p: &[u8]) -> Option<&[u8]> {
    let ip = &p[ETH_LEN..];
    let (l4, error) = if ip[0] >> 4 == 4 {
        let l4 = usize::from(ip[0] & 0xf) * 4;
        (l4, ip[9] == 1 && ip.get(l4).is_some_and(|t| matches!(t, 3 | 11 | 12)))
    } else {
        (40, ip[6] == 58 && ip.get(40).is_some_and(|t| matches!(t, 1..=4)))
    };
    ip.get(l4 + 8..).filter(|_| error)
}

/// Whether `ip` holds the whole of the IP packet it starts with (its length field's).
fn whole(ip: &[u8]) -> bool {
    let len = match ip.first().map(|v| v >> 4) {
        Some(4) if ip.len() >= 20 => usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        Some(6) if ip.len() >= 40 => 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
        _ => return false,
    };
    len == ip.len()
}

/// [`endpoints`] of the packet an ICMP or ICMPv6 error quotes.
pub fn quoted_endpoints(p: &[u8]) -> (IpAddr, IpAddr, u16, u16) {
    let quote = quoted(p).expect("an ICMP error");
    endpoints(&[&p[..ETH_LEN], quote].concat())
}

/// (source, destination, source port, destination port) of an untagged TCP/UDP frame.
pub fn endpoints(p: &[u8]) -> (IpAddr, IpAddr, u16, u16) {
    let ip = &p[ETH_LEN..];
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = if ip[0] >> 4 == 4 {
        let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&ip[o..o + 4]).unwrap());
        (a(12), a(16), &ip[usize::from(ip[0] & 0xf) * 4..])
    } else {
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
        (a(8), a(24), &ip[40..])
    };
    (src, dst, u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
}

/// Splits an unfragmented, untagged frame into two fragments of datagram `id`, the first
/// carrying the first `at` bytes (a multiple of 8) of what follows the IP header.
pub fn fragment(p: &[u8], at: usize, id: u32) -> [Vec<u8>; 2] {
    assert_eq!(at % 8, 0, "fragment offsets are in 8-byte units");
    let ip = ETH_LEN;
    if p[ip] >> 4 == 4 {
        let ihl = usize::from(p[ip] & 0xf) * 4;
        let (head, data) = p.split_at(ip + ihl);
        let piece = |bytes: &[u8], more: bool, offset: usize| {
            let mut f = [head, bytes].concat();
            f[ip + 4..ip + 6].copy_from_slice(&(id as u16).to_be_bytes());
            set_ipv4_total_len(&mut f, ip, (ihl + bytes.len()) as u16);
            set_ipv4_frag(&mut f, ip, more, (offset / 8) as u16);
            f
        };
        [piece(&data[..at], true, 0), piece(&data[at..], false, at)]
    } else {
        let (head, data) = p.split_at(ip + 40);
        let piece = |bytes: &[u8], more: bool, offset: usize| {
            let mut f = head.to_vec();
            let next = f[ip + 6];
            f[ip + 6] = 44;
            f[ip + 4..ip + 6].copy_from_slice(&((8 + bytes.len()) as u16).to_be_bytes());
            let field = (offset as u16) | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&field.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(bytes);
            f
        };
        [piece(&data[..at], true, 0), piece(&data[at..], false, at)]
    }
}

/// Joins the two fragments `fragment` made back into one frame, as the receiver would: only
/// fragments with the same addresses (and a valid IPv4 header) belong together.
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let ip = ETH_LEN;
    let addrs = if first[ip] >> 4 == 4 { ip + 12..ip + 20 } else { ip + 8..ip + 40 };
    assert_eq!(first[addrs.clone()], later[addrs], "the fragments' addresses differ");
    if first[ip] >> 4 == 4 {
        let ihl = usize::from(first[ip] & 0xf) * 4;
        assert!(folds_to_ffff(ones_sum(&later[ip..ip + ihl], 0)), "later fragment's IPv4 checksum");
        let mut f = [first, &later[ip + ihl..]].concat();
        let total = (f.len() - ip) as u16;
        set_ipv4_total_len(&mut f, ip, total);
        set_ipv4_frag(&mut f, ip, false, 0);
        f
    } else {
        let mut f = first[..ip + 40].to_vec();
        f[ip + 6] = first[ip + 40];
        let data = [&first[ip + 48..], &later[ip + 48..]].concat();
        f[ip + 4..ip + 6].copy_from_slice(&(data.len() as u16).to_be_bytes());
        f.extend_from_slice(&data);
        f
    }
}

/// A TCP frame with chosen sequence and acknowledgement numbers (the handshake's numbers
/// confirm an embryonic flow).
pub fn tcp_frame(
    src: &str,
    dst: &str,
    ports: (u16, u16),
    flags: u8,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    tcp_segment(src, dst, ports, flags, (seq, ack), b"xdpgate")
}

/// A TCP frame as [`tcp_frame`] builds it, carrying `payload`.
pub fn tcp_segment(
    src: &str,
    dst: &str,
    ports: (u16, u16),
    flags: u8,
    (seq, ack): (u32, u32),
    payload: &[u8],
) -> Vec<u8> {
    let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut b = ip(s, d, &[]).tcp(ports.0, ports.1, seq, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build packet");
    out
}

/// The flow-table key of a packet from `src`:`sport` to `dst`:`dport` with protocol `proto`.
pub fn flow_key(src: &str, dst: &str, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let words = |a: &str| match a.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v.octets());
            xdpgate_common::words(&b)
        }
        IpAddr::V6(v) => xdpgate_common::words(&v.octets()),
    };
    let family = if src.contains(':') { 6 } else { 4 };
    FlowKey { src: words(src), dst: words(dst), sport, dport, proto, family, kind: 0, _pad: 0 }
}
