//! `xdpgate-decap`: the backend's side of the gateways' encapsulating forwarding mode. A
//! program of its own (no part of the gateway pipeline, as Katran's `decap_kern.c`), at XDP
//! or at tc ingress, that
//! strips the one outer IPv4 or IPv6 header a gateway put in front of a client's packet and
//! passes the inner packet to the stack, which delivers it to the frontend address (on lo)
//! and answers the client directly.
//!
//! Only packets from a gateway (outer source in `DECAP_SOURCES`: else anyone reaching the
//! backend would pass by the gateways' policy) whose inner destination is a frontend this
//! backend serves (`DECAP_FRONTENDS`) are decapsulated, so the host relays nothing it would
//! not accept itself. IP-in-IP from no gateway for such a frontend is dropped: another
//! IP-in-IP receiver on the host (Calico's `tunl0`, a collect-metadata device) would
//! decapsulate it. The source is checked first, so a stranger's packet is judged by its
//! inner header behind outer IPv4 options or IPv6 extension headers and in a first
//! fragment too (one whose datagram does not hold all of it is dropped), and one carrying
//! a tunnel again is dropped. Everything else passes untouched. The outer destination is
//! not checked: a frame not sent to this host's MAC is dropped by the stack all the same
//! (PACKET_OTHERHOST), and the inner packet goes to a local address whoever the outer
//! header named.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod headers;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_ADJ_ROOM_NO_CSUM_RESET, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode, xdp_action,
    },
    helpers::generated::bpf_xdp_adjust_head,
    macros::{classifier, map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use headers::{
    EthHdr, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_IPIP, IPPROTO_IPV6,
    IPPROTO_ROUTING, Ipv4Hdr, Ipv6ExtHdr, Ipv6FragHdr, Ipv6Hdr,
};
use xdpgate_common::{
    decap::{DECAP_COUNTERS, DecapCounter, DecapKey, MAX_DECAP_FRONTENDS, MAX_DECAP_SOURCES},
    nat::{ADDR_KEY_HEADER_BITS, AddrKey},
};

#[map(name = "DECAP_FRONTENDS")]
static DECAP_FRONTENDS: HashMap<DecapKey, u32> = HashMap::pinned(MAX_DECAP_FRONTENDS, 0);

#[map(name = "DECAP_SOURCES")]
static DECAP_SOURCES: LpmTrie<AddrKey, u32> = LpmTrie::pinned(MAX_DECAP_SOURCES, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DECAP_COUNTERS, 0);

const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
const IPV4_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();
/// The IPv6 extension headers followed for a stranger's packet: Linux's ip6_tnl puts one
/// (a destination option, the tunnel encapsulation limit) before the inner header; a
/// stranger's chain longer than this is dropped.
const MAX_EXTENSIONS: usize = 4;

/// At XDP (native or generic): the frame, before the kernel makes a socket buffer of it.
#[xdp]
pub fn xdpgate_decap(ctx: XdpContext) -> u32 {
    let v = decap_xdp(&ctx);
    count(v.counter);
    if v.drop { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

/// At tc ingress (tcx): the socket buffer, possibly a GRO aggregate of many packets, whose
/// offload state (GSO size, checksum) the kernel's helper keeps right.
#[classifier]
pub fn xdpgate_decap_tc(ctx: TcContext) -> i32 {
    let v = decap_tc(&ctx);
    count(v.counter);
    // Else the next tcx program, if any, then the stack.
    if v.drop { TC_ACT_SHOT } else { TC_ACT_UNSPEC }
}

/// What became of a packet: its counter, and whether it is dropped (else passed on).
struct Verdict {
    counter: DecapCounter,
    drop: bool,
}

impl From<DecapCounter> for Verdict {
    #[inline(always)]
    fn from(counter: DecapCounter) -> Self {
        Verdict { counter, drop: false }
    }
}

#[inline(always)]
fn count(c: DecapCounter) {
    if let Some(n) = DECAP_STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe { *n += 1 };
    }
}

/// The packet's bytes as both hooks show them (from the MAC header on).
trait Bytes {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Makes the first `len` bytes (or all, if fewer) readable between `start` and `end`;
    /// pointers into the packet taken before are void.
    fn reach(&self, len: usize);
}

/// Both contexts name their bounds alike; how far the headers can be read differs.
macro_rules! bytes {
    ($ctx:ty, |$this:ident, $len:ident| $reach:block) => {
        impl Bytes for $ctx {
            #[inline(always)]
            fn start(&self) -> usize {
                self.data()
            }
            #[inline(always)]
            fn end(&self) -> usize {
                self.data_end()
            }
            #[inline(always)]
            fn reach(&self, $len: usize) {
                let $this = self;
                $reach
            }
        }
    };
}
// A frame is all there.
bytes!(XdpContext, |_ctx, _len| {});
// A socket buffer's headers may lie beyond its linear area.
bytes!(TcContext, |ctx, len| {
    let all = ctx.len() as usize;
    let _ = ctx.pull_data(if len < all { len } else { all } as u32);
});

/// A pointer to a `T` at `off` in the packet, if the packet holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &impl Bytes, off: usize) -> Option<*mut T> {
    let start = ctx.start() + off;
    (start + core::mem::size_of::<T>() <= ctx.end()).then_some(start as *mut T)
}

/// An IP-in-IP packet for a frontend served here: the outer header's length and the inner
/// packet's EtherType.
struct Tunnel {
    outer_len: usize,
    inner_type: [u8; 2],
}

/// Whether the packet is IP-in-IP from a gateway for a frontend served here (else what
/// becomes of it).
#[inline(always)]
fn classify(ctx: &impl Bytes) -> Result<Tunnel, Verdict> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(DecapCounter::NotTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let outer_type = unsafe { (*eth).ether_type };
    if outer_type == ETH_P_IP {
        outer_ipv4(ctx)
    } else if outer_type == ETH_P_IPV6 {
        outer_ipv6(ctx)
    } else {
        Err(DecapCounter::NotTunnel.into())
    }
}

/// An outer IPv4 header. The source is checked first, whatever the header's options or
/// fragment fields: a gateway sends neither options nor fragments (a router on the way may
/// fragment its packets without DF), and what it sent otherwise is passed to the stack as
/// it came; a stranger's packet is judged by its inner header wherever that starts.
#[inline(always)]
fn outer_ipv4(ctx: &impl Bytes) -> Result<Tunnel, Verdict> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(DecapCounter::NotTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let (version_ihl, proto) = (ip.version_ihl, ip.proto);
    if !tunnel(proto) {
        return Err(DecapCounter::NotTunnel.into());
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    if gateway(4, [u32::from_ne_bytes(ip.src), 0, 0, 0]) {
        // Options would need another length; a fragment is the stack's to reassemble.
        if version_ihl != 0x45 || frag & 0x3fff != 0 {
            return Err(DecapCounter::Passed.into());
        }
        return served(ctx, IPV4_LEN, proto);
    }
    if frag & 0x1fff != 0 {
        // A later fragment holds no inner header. Its first fragment is judged by its own
        // (below): dropped, it leaves the stack nothing to reassemble.
        return Err(DecapCounter::Untrusted.into());
    }
    let ihl = usize::from(version_ihl & 0x0f);
    if version_ihl >> 4 != 4 || ihl < 5 {
        // The stack drops it as well.
        return Err(STRANGER_DROPPED);
    }
    let end = ETH_LEN + usize::from(u16::from_be_bytes(ip.total_len));
    Err(stranger(ctx, ETH_LEN + ihl * 4, proto, end))
}

/// An outer IPv6 header. A gateway's is one fixed header followed by 4 or 41; its packets
/// with extension headers pass to the stack as they came. A stranger's chain is followed
/// (`MAX_EXTENSIONS` headers) to the inner header.
#[inline(always)]
fn outer_ipv6(ctx: &impl Bytes) -> Result<Tunnel, Verdict> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(DecapCounter::NotTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let next = ip.next_hdr;
    if !tunnel(next) && !extension(next) {
        return Err(DecapCounter::NotTunnel.into());
    }
    if gateway(6, xdpgate_common::words(&ip.src)) {
        if !tunnel(next) {
            return Err(DecapCounter::NotTunnel.into());
        }
        return served(ctx, IPV6_LEN, next);
    }
    // A jumbogram (payload length 0) is as long as its frame.
    let end = match usize::from(u16::from_be_bytes(ip.payload_len)) {
        0 => ctx.end() - ctx.start(),
        len => ETH_LEN + IPV6_LEN + len,
    };
    let (off, proto) = extensions(ctx, next, end)?;
    if !tunnel(proto) {
        return Err(DecapCounter::NotTunnel.into());
    }
    Err(stranger(ctx, off, proto, end))
}

/// A stranger's IPv6 extension headers from the first (`next`), within a datagram ending at
/// `end`: where the header after them starts and its protocol, or what becomes of a packet
/// whose chain ends unreadable or past `end` (dropped: cut short, its rest may follow in
/// another fragment), in a later fragment (passed, counted) or longer than
/// `MAX_EXTENSIONS` (dropped, tunnel or not: the stack follows any number of them to one).
#[inline(always)]
fn extensions(ctx: &impl Bytes, mut next: u8, end: usize) -> Result<(usize, u8), Verdict> {
    let mut off = ETH_LEN + IPV6_LEN;
    for _ in 0..MAX_EXTENSIONS {
        if !extension(next) {
            return Ok((off, next));
        }
        // Within the datagram, as `stranger` judges the inner header: bytes after it are
        // trimmed by the stack, and the chain may go on in the next fragment instead.
        if off + core::mem::size_of::<Ipv6FragHdr>() > end {
            return Err(STRANGER_DROPPED);
        }
        ctx.reach(off + core::mem::size_of::<Ipv6FragHdr>());
        if next == IPPROTO_FRAGMENT {
            let frag = ptr_at::<Ipv6FragHdr>(ctx, off).ok_or(STRANGER_DROPPED)?;
            // SAFETY: bounds checked by ptr_at.
            let frag = unsafe { &*frag };
            next = frag.next_hdr;
            off += core::mem::size_of::<Ipv6FragHdr>();
            if u16::from_be_bytes(frag.frag_off) & 0xfff8 != 0 {
                // No inner header here, as for IPv4.
                let c =
                    if tunnel(next) { DecapCounter::Untrusted } else { DecapCounter::NotTunnel };
                return Err(c.into());
            }
        } else {
            let ext = ptr_at::<Ipv6ExtHdr>(ctx, off).ok_or(STRANGER_DROPPED)?;
            // SAFETY: bounds checked by ptr_at.
            let ext = unsafe { &*ext };
            next = ext.next_hdr;
            off += (usize::from(ext.hdr_len) + 1) * 8;
        }
    }
    if extension(next) {
        return Err(STRANGER_DROPPED);
    }
    Ok((off, next))
}

/// IPv4 in IP or IPv6 in IP.
#[inline(always)]
fn tunnel(proto: u8) -> bool {
    proto == IPPROTO_IPIP || proto == IPPROTO_IPV6
}

/// The IPv6 extension headers followed (as the gateway's parser does; others end the chain).
#[inline(always)]
fn extension(next: u8) -> bool {
    matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT)
}

/// A gateway's IP-in-IP behind a plain outer header of `outer_len` bytes: decapsulated when
/// for a frontend served here, else passed (maybe another tunnel's: not this program's to
/// judge).
#[inline(always)]
fn served(ctx: &impl Bytes, outer_len: usize, proto: u8) -> Result<Tunnel, Verdict> {
    match inner(ctx, ETH_LEN + outer_len, proto) {
        Some((key, inner_type, _)) if frontend(&key) => Ok(Tunnel { outer_len, inner_type }),
        _ => Err(DecapCounter::Passed.into()),
    }
}

/// A stranger's IP-in-IP whose inner header starts at `off`, of an outer datagram ending
/// at `end`: dropped when for a frontend served here (a way past the gateways' policy:
/// another IP-in-IP receiver on the host would decapsulate it), when it carries a tunnel
/// again (the host would decapsulate that one too, to a frontend maybe), or when the inner
/// header is not whole within the datagram (its rest may come in a later fragment; judged
/// by the datagram's length, as the stack trims the frame to it: not by padding or bytes
/// after it), else passed.
#[inline(always)]
fn stranger(ctx: &impl Bytes, off: usize, proto: u8, end: usize) -> Verdict {
    let len = if proto == IPPROTO_IPIP { IPV4_LEN } else { IPV6_LEN };
    if off + len > end {
        return STRANGER_DROPPED;
    }
    ctx.reach(off + IPV6_LEN);
    let drop = match inner(ctx, off, proto) {
        Some((key, _, nested)) => nested || frontend(&key),
        None => true,
    };
    Verdict { counter: DecapCounter::Untrusted, drop }
}

/// A stranger's packet dropped.
const STRANGER_DROPPED: Verdict = Verdict { counter: DecapCounter::Untrusted, drop: true };

/// The inner header at `off`, carried as `proto` (4 or 41): its destination's key, its
/// EtherType and whether a tunnel (or, in IPv6, an extension header that may lead to one)
/// follows it; none when it is cut short or of the other version.
#[inline(always)]
fn inner(ctx: &impl Bytes, off: usize, proto: u8) -> Option<(DecapKey, [u8; 2], bool)> {
    if proto == IPPROTO_IPIP {
        let ip = ptr_at::<Ipv4Hdr>(ctx, off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let key = DecapKey { family: 4, addr: [u32::from_ne_bytes(ip.dst), 0, 0, 0] };
        (ip.version_ihl >> 4 == 4).then_some((key, ETH_P_IP, tunnel(ip.proto)))
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, off)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let key = DecapKey { family: 6, addr: xdpgate_common::words(&ip.dst) };
        let nested = tunnel(ip.next_hdr) || extension(ip.next_hdr);
        (ip.vtc_flow[0] >> 4 == 6).then_some((key, ETH_P_IPV6, nested))
    }
}

/// Whether `key` is a frontend served here.
#[inline(always)]
fn frontend(key: &DecapKey) -> bool {
    // SAFETY: a lookup by value.
    unsafe { DECAP_FRONTENDS.get(key) }.is_some()
}

/// Whether an outer source address (network-order words) is a gateway's.
#[inline(always)]
fn gateway(family: u8, addr: [u32; 4]) -> bool {
    let bits = if family == 4 { 32 } else { 128 };
    let key = Key::new(ADDR_KEY_HEADER_BITS + bits, AddrKey { family, _pad: [0; 3], addr });
    DECAP_SOURCES.get(key).is_some()
}

/// Strips the outer header of a frame: the MAC header moves up to sit in front of the
/// inner packet, which stays where it is.
#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> Verdict {
    let t = match classify(ctx) {
        Ok(t) => t,
        Err(v) => return v,
    };
    let (Some(eth), Some(new_eth)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<EthHdr>(ctx, t.outer_len))
    else {
        return DecapCounter::Passed.into();
    };
    // SAFETY: both headers lie within the frame and do not overlap (the outer header is
    // longer than the MAC header).
    unsafe {
        (*new_eth).dst = (*eth).dst;
        (*new_eth).src = (*eth).src;
        (*new_eth).ether_type = t.inner_type;
    }
    // SAFETY: the context is this program's; the helper checks the new start.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, t.outer_len as i32) } != 0 {
        // Cannot happen for a header within the frame; the packet then goes on as it came,
        // save for the overwritten start of its outer header, which the stack drops.
        return DecapCounter::Passed.into();
    }
    DecapCounter::Decapsulated.into()
}

/// The deepest the classification reads: MAC, outer IPv6, inner IPv6 header.
const TC_PULL: u32 = (ETH_LEN + 2 * IPV6_LEN) as u32;

/// Strips the outer header of a socket buffer with `bpf_skb_adjust_room`, which also sets
/// the buffer's protocol to the inner family's; the GSO size stays (it counts the inner
/// segments' payload) and so does a verified checksum (the outer header has none).
#[inline(always)]
fn decap_tc(ctx: &TcContext) -> Verdict {
    // The headers into the linear area (a short packet: all of it).
    let len = ctx.len();
    let _ = ctx.pull_data(if len < TC_PULL { len } else { TC_PULL });
    let t = match classify(ctx) {
        Ok(t) => t,
        Err(v) => return v,
    };
    let family = if t.inner_type == ETH_P_IP {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6
    };
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET | family;
    if ctx
        .adjust_room(-(t.outer_len as i32), bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, flags.into())
        .is_err()
    {
        return DecapCounter::Passed.into();
    }
    // The MAC header's EtherType names the inner family (another for 4-in-6 and 6-in-4).
    if ctx.store(12, &t.inner_type, 0).is_err() {
        return DecapCounter::Passed.into();
    }
    DecapCounter::Decapsulated.into()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
