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
//! decapsulate it. Everything else passes untouched. The outer destination is not checked: a frame
//! not sent to this host's MAC is dropped by the stack all the same (PACKET_OTHERHOST), and
//! the inner packet goes to a local address whoever the outer header named.
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
use headers::{EthHdr, Ipv4Hdr, Ipv6Hdr};
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
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
const IPV4_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();

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
}

/// Both contexts name their bounds alike.
macro_rules! bytes {
    ($($ctx:ty),*) => {$(
        impl Bytes for $ctx {
            #[inline(always)]
            fn start(&self) -> usize {
                self.data()
            }
            #[inline(always)]
            fn end(&self) -> usize {
                self.data_end()
            }
        }
    )*};
}
bytes!(XdpContext, TcContext);

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
    // The outer header's length and the protocol it carries.
    let (outer_len, inner_proto, trusted) = if outer_type == ETH_P_IP {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(DecapCounter::NotTunnel)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.proto != IPPROTO_IPIP && ip.proto != IPPROTO_IPV6 {
            return Err(DecapCounter::NotTunnel.into());
        }
        // Options would need another length; a fragment is the stack's to reassemble.
        let fragment = u16::from_be_bytes(ip.frag_off) & 0x3fff != 0;
        if ip.version_ihl != 0x45 || fragment {
            return Err(DecapCounter::Passed.into());
        }
        let trusted = gateway(4, [u32::from_ne_bytes(ip.src), 0, 0, 0]);
        (IPV4_LEN, ip.proto, trusted)
    } else if outer_type == ETH_P_IPV6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(DecapCounter::NotTunnel)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let next = ip.next_hdr;
        // Extension headers (and so fragments) are not followed: passed to the stack.
        if next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
            return Err(DecapCounter::NotTunnel.into());
        }
        let trusted = gateway(6, xdpgate_common::words(&ip.src));
        (IPV6_LEN, next, trusted)
    } else {
        return Err(DecapCounter::NotTunnel.into());
    };
    // What a packet passed untouched counts as: from no gateway, `untrusted` whatever else.
    let passed = if trusted { DecapCounter::Passed } else { DecapCounter::Untrusted };
    let inner = ETH_LEN + outer_len;
    let (key, inner_type) = if inner_proto == IPPROTO_IPIP {
        let ip = ptr_at::<Ipv4Hdr>(ctx, inner).ok_or(passed)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.version_ihl >> 4 != 4 {
            return Err(passed.into());
        }
        (DecapKey { family: 4, addr: [u32::from_ne_bytes(ip.dst), 0, 0, 0] }, ETH_P_IP)
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, inner).ok_or(passed)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.vtc_flow[0] >> 4 != 6 {
            return Err(passed.into());
        }
        (DecapKey { family: 6, addr: xdpgate_common::words(&ip.dst) }, ETH_P_IPV6)
    };
    // SAFETY: a lookup by value.
    if unsafe { DECAP_FRONTENDS.get(&key) }.is_none() {
        // Maybe another tunnel's: not this program's to judge.
        return Err(passed.into());
    }
    if !trusted {
        // A stranger's way past the gateways' policy to a frontend's port.
        return Err(Verdict { counter: DecapCounter::Untrusted, drop: true });
    }
    Ok(Tunnel { outer_len, inner_type })
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
