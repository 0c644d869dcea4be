//! Parse a frame once into a [`PacketMeta`]. One small function per header, each doing its
//! own bounds check (the verifier needs the `data + off + size <= data_end` comparison
//! right before the access) and returning where the next header starts.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use xdpgate_common::{flow::ICMP_NO_ANSWER, stats::DropReason, words};

use crate::headers::*;

/// 802.1Q tags followed before giving up (QinQ is two).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers followed before giving up.
const MAX_EXT_HDRS: usize = 6;
/// Headers must start within this many bytes of the frame; it also gives the verifier a
/// bound on every variable offset.
const MAX_HDR_OFF: usize = 512;

pub const FRAG_NONE: u8 = 0;
/// First fragment: L4 header present, more fragments follow.
pub const FRAG_FIRST: u8 = 1;
/// Non-first fragment: no L4 header, ports unknown.
pub const FRAG_LATER: u8 = 2;

/// What the pipeline needs to know about an IP packet. Addresses are network-order bytes
/// held in `u32` words; IPv4 uses the first word.
#[derive(Clone, Copy)]
pub struct PacketMeta {
    pub family: u8,
    pub proto: u8,
    pub frag: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// An ICMP message's kind of flow (`FlowKey::kind`, see `icmp_kind`), 0 for any other
    /// packet: worked out once, here. (Until 2026-12-07 this byte held the ICMP code, which
    /// nothing read.)
    pub icmp_kind: u8,
    /// IPv6 hop limit (0 for IPv4).
    pub hop_limit: u8,
    /// The arrival interface's counter slot and the packet's direction (`DIR_*`), looked up
    /// once by the parse stage for every stage.
    pub iface_slot: u8,
    pub dir: u8,
    /// 1: the frame was sent to a link-layer broadcast or multicast address (which the
    /// dataplane never forwards).
    pub link_group: u8,
    /// Source and destination port in host order; for ICMP echo both hold the identifier.
    pub sport: u16,
    pub dport: u16,
    pub l3_off: u16,
    pub l4_off: u16,
    /// IP identification of a fragment (IPv4 id or IPv6 fragment-header id).
    pub frag_id: u32,
    /// TCP sequence and acknowledgement numbers (host order): a SYN-ACK's sequence number
    /// and the ACK that answers it confirm an embryonic flow.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

impl PacketMeta {
    /// Whether the destination is one routed on: not multicast, broadcast or IPv6 link-local
    /// (mDNS, SSDP, neighbour discovery's). (Linux forwards IPv4 link-local, 169.254.0.0/16,
    /// by its routes.)
    #[inline(always)]
    pub fn routed_dst(&self) -> bool {
        // Addresses as they lie in the packet: the first byte is the lowest of `dst[0]`.
        let a = self.dst[0] as u8;
        if self.family == 4 {
            a & 0xf0 != 0xe0 && self.dst[0] != u32::MAX
        } else {
            a != 0xff && !ipv6_link_local(&self.dst)
        }
    }

    /// ICMP of the packet's own family (`xdpgate_common::is_icmp`): only then are there an
    /// ICMP type, an echo identifier or a quoted packet.
    #[inline(always)]
    pub fn is_icmp(&self) -> bool {
        xdpgate_common::is_icmp(self.family, self.proto)
    }

    /// Offset of the IP header. Masked: the meta comes back from a map in later stages, and
    /// the verifier must see a bound on every offset it adds to a packet pointer (the mask
    /// changes nothing, parsing keeps offsets within `MAX_HDR_OFF`).
    #[inline(always)]
    pub fn l3(&self) -> usize {
        usize::from(self.l3_off) & (2 * MAX_HDR_OFF - 1)
    }

    /// Offset of the L4 header, masked likewise.
    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4_off) & (2 * MAX_HDR_OFF - 1)
    }
}

/// What the parser reads a packet from: an XDP frame, or on tc egress a socket buffer, of
/// which only the linear area (`data()..data_end()`) can be read directly.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet, which for a socket buffer goes on past its linear area.
    fn len(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

pub enum Parsed {
    /// Link-level control the dataplane leaves to the kernel: not IP at all (ARP, LLDP, ...),
    /// or IPv6 neighbour discovery and MLD, which are IPv6's ARP and never cross a router.
    LinkControl,
    Ip(PacketMeta),
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Result<*const T, DropReason> {
    if off > MAX_HDR_OFF {
        return Err(DropReason::Malformed);
    }
    // A no-op after the check above, but one the verifier sees: offsets that come from a
    // map are otherwise unbounded to it, and the compiler may fold the comparison away.
    let off = off & (2 * MAX_HDR_OFF - 1);
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return Err(DropReason::Malformed);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &impl Packet) -> Result<Parsed, DropReason> {
    let (ether_type, l3_off, link_group) = parse_eth(ctx)?;
    let mut meta = PacketMeta {
        family: 0,
        proto: 0,
        frag: FRAG_NONE,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_kind: 0,
        hop_limit: 0,
        iface_slot: 0,
        dir: 0,
        link_group,
        sport: 0,
        dport: 0,
        l3_off: l3_off as u16,
        l4_off: 0,
        frag_id: 0,
        tcp_seq: 0,
        tcp_ack: 0,
        src: [0; 4],
        dst: [0; 4],
    };
    let (l4_off, ip_end) = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3_off, &mut meta)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3_off, &mut meta)?,
        _ => return Ok(Parsed::LinkControl),
    };
    meta.l4_off = l4_off as u16;
    if meta.frag != FRAG_LATER {
        parse_l4(ctx, l4_off, ip_end, &mut meta)?;
        // To a unicast address the packet is the pipeline's: a router forwards it (ND's
        // hop limit is checked by receivers, not routers), payload and all, so only the
        // ingress stage can tell (by the route) one to this host's own address.
        if is_link_control(&meta) && !meta.routed_dst() {
            return Ok(Parsed::LinkControl);
        }
    }
    Ok(Parsed::Ip(meta))
}

/// Ethernet and up to [`MAX_VLAN_TAGS`] VLAN tags: returns the inner EtherType, the
/// offset of the L3 header and whether the frame went to a group (broadcast or multicast)
/// address.
#[inline(always)]
fn parse_eth(ctx: &impl Packet) -> Result<(u16, usize, u8), DropReason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let group = unsafe { (*eth).dst[0] } & 1;
    let mut ether_type = be16(unsafe { (*eth).ether_type });
    let mut off = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok((ether_type, off, group));
        }
        let vlan: *const VlanHdr = ptr_at(ctx, off)?;
        ether_type = be16(unsafe { (*vlan).ether_type });
        off += size_of::<VlanHdr>();
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(DropReason::TooDeep);
    }
    Ok((ether_type, off, group))
}

/// The length of the IP packet at `off` whose length field says `field`. A field of 0 on a
/// packet longer than any field can say is a BIG TCP aggregate of the host's stack (on tc
/// egress; GSO sizes past 64 KiB): it runs to the end of the packet.
#[inline(always)]
fn ip_len(ctx: &impl Packet, off: usize, field: usize) -> usize {
    let rest = ctx.len().saturating_sub(off);
    if field == 0 && rest > usize::from(u16::MAX) { rest } else { field }
}

/// Refuses an IPv4 packet whose options (from `off` to `end`) hold a source route (LSRR,
/// SSRR): the policy judges the destination field, and a kernel that accepts source routing
/// would forward the packet on to the route's next address, which nothing judged. Options
/// are rare, so this costs other packets one comparison. Real packets carry one or two
/// options (a router alert, a timestamp, padding); one with more than the parser follows
/// (where a source route could hide) is `TooDeep`, as for IPv6 extension headers.
#[inline(always)]
fn source_routed(ctx: &impl Packet, off: usize, end: usize) -> Result<(), DropReason> {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const LSRR: u8 = 0x83;
    const SSRR: u8 = 0x89;
    let mut at = off;
    for _ in 0..MAX_IPV4_OPTIONS {
        // An option's type and length at once (a source route has both, and more): a
        // single byte at the packet's very end holds none.
        let Ok(option) = ptr_at::<[u8; 2]>(ctx, at) else { return Ok(()) };
        let [kind, len] = unsafe { *option };
        match kind {
            EOL => return Ok(()),
            NOP => at += 1,
            LSRR | SSRR => return Err(DropReason::SourceRoute),
            // A malformed length is the kernel's to refuse (it drops the packet).
            _ if len < 2 => return Ok(()),
            _ => at += usize::from(len),
        }
        if at >= end {
            return Ok(());
        }
    }
    // Past the last option followed: only end-of-list padding, or a byte too short to
    // hold a source route.
    match ptr_at::<[u8; 2]>(ctx, at) {
        Ok(option) if unsafe { (*option)[0] } != EOL => Err(DropReason::TooDeep),
        _ => Ok(()),
    }
}

/// IPv4 options [`source_routed`] follows.
const MAX_IPV4_OPTIONS: usize = 8;

#[inline(always)]
/// Returns the offsets of the L4 header and of the end of the datagram.
fn parse_ipv4(
    ctx: &impl Packet,
    off: usize,
    meta: &mut PacketMeta,
) -> Result<(usize, usize), DropReason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    let ip = unsafe { &*ip };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let total_len = ip_len(ctx, off, be16(ip.total_len) as usize);
    if ip.version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || total_len < ihl {
        return Err(DropReason::Malformed);
    }
    // A packet shorter than its IP length is truncated; trailing Ethernet padding is fine.
    if off + total_len > ctx.len() {
        return Err(DropReason::Malformed);
    }
    if ihl > size_of::<Ipv4Hdr>() {
        source_routed(ctx, off + size_of::<Ipv4Hdr>(), off + ihl)?;
    }
    meta.family = 4;
    meta.proto = ip.proto;
    meta.src[0] = u32::from_ne_bytes(ip.src);
    meta.dst[0] = u32::from_ne_bytes(ip.dst);
    let frag = be16(ip.frag_off);
    meta.frag_id = u32::from(be16(ip.id));
    meta.frag = if frag & 0x1fff != 0 {
        FRAG_LATER
    } else if frag & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    Ok((off + ihl, off + total_len))
}

#[inline(always)]
/// Returns the offsets of the L4 header and of the end of the datagram.
fn parse_ipv6(
    ctx: &impl Packet,
    off: usize,
    meta: &mut PacketMeta,
) -> Result<(usize, usize), DropReason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off)?;
    let ip = unsafe { &*ip };
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let hdr = size_of::<Ipv6Hdr>();
    let len = hdr + be16(ip.payload_len) as usize;
    let end = off + if len == hdr { ip_len(ctx, off, 0).max(hdr) } else { len };
    if end > ctx.len() {
        return Err(DropReason::Malformed);
    }
    meta.family = 6;
    meta.hop_limit = ip.hop_limit;
    meta.src = words(&ip.src);
    meta.dst = words(&ip.dst);
    let chain = ipv6_chain(ctx, off + hdr, ip.next_hdr, end, true)?;
    meta.proto = chain.proto;
    if let Some((id, fo)) = chain.fragment {
        meta.frag_id = id;
        if fo & 0xfff8 != 0 {
            meta.frag = FRAG_LATER;
        } else if fo & 1 != 0 {
            meta.frag = FRAG_FIRST;
        }
    }
    Ok((chain.off, end))
}

/// Where an IPv6 packet's extension headers lead.
pub struct Ipv6Chain {
    /// The header after them (the L4 header; in a later fragment, the fragment's data).
    pub off: usize,
    /// Its protocol.
    pub proto: u8,
    /// The Fragment header's identification and offset field (offset and M flag).
    pub fragment: Option<(u32, u16)>,
}

/// Follows the extension headers from `off` (the first one's type `next`) of an IPv6
/// datagram that ends at `end`: the packet's own (`own`), or one an ICMPv6 error quotes.
/// Stops at a later fragment's Fragment header (what follows is data).
#[inline(always)]
pub fn ipv6_chain(
    ctx: &impl Packet,
    mut off: usize,
    mut next: u8,
    end: usize,
    own: bool,
) -> Result<Ipv6Chain, DropReason> {
    let mut fragment = None;
    // One more round than headers followed: the last finds the L4 protocol. Every header
    // lies inside the datagram: one read past its end (Ethernet padding, or a forger's)
    // would name a protocol the packet does not carry.
    for _ in 0..=MAX_EXT_HDRS {
        if off > end {
            return Err(DropReason::Malformed);
        }
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // Four bytes: every such header has eight at least.
                let ext: *const Ipv6ExtHdr = inside(ctx, off, end)?;
                let ext = unsafe { &*ext };
                // A routing header with segments left: the packet goes on from its
                // destination to another address, which the policy never judged (a source
                // route, as IPv4's LSRR; a kernel with segment routing on forwards it). A
                // quoted packet's is only read.
                if own && next == IPPROTO_ROUTING && ext.segments_left != 0 {
                    return Err(DropReason::SourceRoute);
                }
                next = ext.next_hdr;
                off += (ext.hdr_len as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let frag: *const Ipv6FragHdr = inside(ctx, off, end)?;
                let frag = unsafe { &*frag };
                next = frag.next_hdr;
                off += size_of::<Ipv6FragHdr>();
                let fo = be16(frag.frag_off);
                fragment = Some((u32::from_be_bytes(frag.id), fo));
                if fo & 0xfff8 != 0 {
                    return Ok(Ipv6Chain { off, proto: next, fragment });
                }
            }
            _ => return Ok(Ipv6Chain { off, proto: next, fragment }),
        }
    }
    Err(DropReason::TooDeep)
}

/// Ports, TCP flags and ICMP type. A first fragment too short to hold its L4 header is
/// dropped: it would hide the ports from the rules (RFC 1858).
#[inline(always)]
fn parse_l4(
    ctx: &impl Packet,
    off: usize,
    end: usize,
    meta: &mut PacketMeta,
) -> Result<(), DropReason> {
    match meta.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = inside(ctx, off, end)?;
            let tcp = unsafe { &*tcp };
            if (tcp.doff_res >> 4) < 5 {
                return Err(DropReason::Malformed);
            }
            meta.sport = be16(tcp.sport);
            meta.dport = be16(tcp.dport);
            meta.tcp_flags = tcp.flags;
            meta.tcp_seq = u32::from_be_bytes(tcp.seq);
            meta.tcp_ack = u32::from_be_bytes(tcp.ack);
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = inside(ctx, off, end)?;
            let udp = unsafe { &*udp };
            meta.sport = be16(udp.sport);
            meta.dport = be16(udp.dport);
        }
        _ if meta.is_icmp() => {
            let icmp: *const IcmpHdr = inside(ctx, off, end)?;
            let icmp = unsafe { &*icmp };
            meta.icmp_type = icmp.kind;
            meta.icmp_kind = icmp_kind(meta.family, icmp.kind);
            if is_echo(meta.family, icmp.kind) {
                let id = be16([icmp.rest[0], icmp.rest[1]]);
                meta.sport = id;
                meta.dport = id;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A header after the IP header (an extension header or L4's), which must lie inside the
/// IP datagram: bytes past its end (Ethernet padding of a short frame) are not part of the
/// packet, whatever they look like.
#[inline(always)]
fn inside<T>(ctx: &impl Packet, off: usize, end: usize) -> Result<*const T, DropReason> {
    if off + size_of::<T>() > end {
        return Err(DropReason::Malformed);
    }
    ptr_at(ctx, off)
}

/// Whether an IPv6 address, as it lies in the packet, is link-local (`fe80::/10`).
#[inline(always)]
pub fn ipv6_link_local(addr: &[u32; 4]) -> bool {
    let [a, b] = [addr[0] as u8, (addr[0] >> 8) as u8];
    (a, b & 0xc0) == (0xfe, 0x80)
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem; ICMPv6's
/// packet too big too), whose quote tells which flow it is about.
#[inline(always)]
pub fn is_icmp_error(meta: &PacketMeta) -> bool {
    if meta.frag == FRAG_LATER || !meta.is_icmp() {
        return false;
    }
    if meta.family == 4 {
        matches!(meta.icmp_type, 3 | 11 | 12)
    } else {
        matches!(meta.icmp_type, 1..=4)
    }
}

/// Echo request or reply, the ICMP messages that form a flow by identifier: `kind` is the
/// type of an ICMP message of address family `family`.
#[inline(always)]
pub fn is_echo(family: u8, kind: u8) -> bool {
    if family == 4 { kind == 0 || kind == 8 } else { kind == 128 || kind == 129 }
}

/// An ICMP message's mark for its flow's entries (its type + 1), 0 for any other packet.
/// A request and its answer share a key (an echo's identifier both ways, another
/// message's `icmp_kind`): each entry of an ICMP flow holds the message its direction
/// carries, see `flow::other_message`.
#[inline(always)]
pub fn icmp_mark(meta: &PacketMeta) -> u32 {
    if meta.is_icmp() { u32::from(meta.icmp_type) + 1 } else { 0 }
}

/// The kind of flow an ICMP message of type `kind` belongs to, other than echo, which its
/// flow key holds (`FlowKey::kind`; its ports are 0): its request's type, for a request's
/// answer, else its own. 0 for an echo, keyed by its identifier; ICMPv6's reserved type 0
/// takes 128, the echo request's type, which no other message's kind is.
#[inline(always)]
pub fn icmp_kind(family: u8, kind: u8) -> u8 {
    if is_echo(family, kind) {
        return 0;
    }
    match paired_mark(family, u32::from(kind) + 1) {
        (request, false) if request != ICMP_NO_ANSWER => (request - 1) as u8,
        _ if kind == 0 => 128,
        _ => kind,
    }
}

/// An echo request (ICMP 8, ICMPv6 128).
#[inline(always)]
pub fn is_echo_request(meta: &PacketMeta) -> bool {
    meta.is_icmp() && meta.icmp_type == if meta.family == 4 { 8 } else { 128 }
}

/// The mark of the message paired with one marked `mark`, and whether `mark` is the
/// request's: the requests that ask for an answer and their answers, as conntrack pairs
/// them (echo; IPv4's timestamp, information and address mask; IPv6's node information),
/// and the extended echo of RFC 8335 (`ping -e`). `ICMP_NO_ANSWER` for any other message.
#[inline(always)]
pub fn paired_mark(family: u8, mark: u32) -> (u32, bool) {
    let kind = mark.wrapping_sub(1);
    let (other, request) = match (family == 4, kind) {
        (true, 8) => (0, true),
        (true, 0) => (8, false),
        (true, 13 | 15 | 17 | 42) | (false, 128 | 139 | 160) => (kind + 1, true),
        (true, 14 | 16 | 18 | 43) | (false, 129 | 140 | 161) => (kind - 1, false),
        _ => return (ICMP_NO_ANSWER, false),
    };
    (other + 1, request)
}

/// Neighbour discovery (133-137) with hop limit 255, which receivers require (RFC 4861),
/// and MLD (130-132, 143) with hop limit 1 (RFC 3810): left to the kernel where addressed to
/// the link (multicast, link-local) or to this host. Routed on, a router forwards them (the
/// hop limit then 254; a receiver drops such ND, not its payload's reader), so they are
/// judged as any packet (until 2026-12-05 an NS with any payload passed a deny-all policy
/// both ways, and left a NAT gateway's subnet untranslated).
#[inline(always)]
pub fn is_link_control(meta: &PacketMeta) -> bool {
    meta.family == 6
        && meta.is_icmp()
        && match meta.icmp_type {
            133..=137 => meta.hop_limit == 255,
            130..=132 | 143 => meta.hop_limit == 1,
            _ => false,
        }
}
