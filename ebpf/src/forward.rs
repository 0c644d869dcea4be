//! Forwarding in XDP or from tc: the kernel's FIB says the next hop and its MAC, and the
//! packet leaves by a redirect (a devmap one from XDP, `bpf_redirect` from tc; see
//! `hook::Hook::send`). Whatever the FIB cannot answer yet (no neighbour entry, a local
//! destination, an interface the hook may not send to, a packet too long for the route)
//! goes to the kernel stack instead, which
//! forwards the already rewritten packet and learns the neighbour for the next one; a
//! packet that cannot go there (floating IP, encapsulated) is dropped, and the agent
//! resolves the neighbour the FIB found missing (`NEIGHBOURS_WANTED`). A flow
//! direction keeps its next hop in its entry, so the FIB is asked once per flow (and again
//! after a route change or a short while), not per packet.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_fib_lookup, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
};
use xdpgate_common::{
    flow::{HOP_MAX_AGE_JIFFIES, NeighbourKey, NextHop},
    stats::DropReason,
};

use crate::{
    headers::{EthHdr, IPPROTO_IPIP, IPPROTO_IPV6},
    hook::Hook,
    maps::{FIB_PARAMS, NEIGHBOURS_WANTED, ROUTE_GENERATION, iface_config},
    parse::{Packet, PacketMeta, ipv6_link_local, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
pub const FIB_SUCCESS: i64 = 0;
pub const FIB_FRAG_NEEDED: i64 = 8;
const FIB_BLACKHOLE: i64 = 1;
const FIB_UNREACHABLE: i64 = 2;
const FIB_PROHIBIT: i64 = 3;
/// One of this host's addresses, a broadcast or multicast route, or no route at all.
const FIB_NOT_FWDED: i64 = 4;
/// Forwarding is off on the interface asked from.
const FIB_FWD_DISABLED: i64 = 5;
const FIB_NO_NEIGH: i64 = 7;
/// `bpf_sock.state` of a listening socket.
const TCP_LISTEN: u32 = 10;

/// Asks the kernel's FIB where a packet from `src` to `dst` goes, as arriving by interface
/// `iif`: `meta`'s own packet, or one of protocol `other` without ports. The parameters
/// live in per-CPU scratch, not on the stack, which the callers' stages need.
#[inline(always)]
fn lookup<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    other: Option<u8>,
    iif: u32,
) -> Result<(i64, &'static mut bpf_fib_lookup), DropReason> {
    let p = unsafe { &mut *FIB_PARAMS.get_ptr_mut(0).ok_or(DropReason::Internal)? };
    *p = unsafe { zeroed() };
    if let Some(proto) = other {
        p.l4_protocol = proto;
    } else {
        p.l4_protocol = meta.proto;
        p.sport = meta.sport.to_be();
        p.dport = meta.dport.to_be();
    }
    p.ifindex = iif;
    // Host order, unlike the addresses: the kernel compares it with the route's MTU. Never
    // 0, which would skip that check (and, on a socket buffer, leave only the device's MTU
    // checked, by `is_skb_forwardable`, which passes any GSO aggregate unchecked): the
    // length of what will leave (`Hook::wire_len`: a GSO aggregate's segments).
    p.__bindgen_anon_1.tot_len = ip_len;
    if meta.family == 4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    let rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    Ok((rc, p))
}

/// Whether the FIB sends a packet to `meta`'s destination on from here: a unicast route
/// out, not one of this host's addresses (nor no route, nor a blackhole: the stack drops
/// those itself).
#[inline(always)]
pub fn routed_on<H: Hook>(ctx: &H, meta: &PacketMeta) -> bool {
    // The route alone is asked: a length any route takes.
    let route = lookup(ctx, meta, &meta.src, &meta.dst, 20, None, ctx.arrival()).map(|(rc, _)| rc);
    matches!(route, Ok(FIB_SUCCESS | FIB_NO_NEIGH | FIB_FRAG_NEEDED))
}

/// Whether `meta`'s destination is this host's own address (or has no route): the FIB
/// asked as from the loopback device, whose `forwarding` follows `all`, where the kernel's
/// IPv6 forwarding looks; the arrival interface's may be off while the kernel forwards (an
/// uplink that takes router advertisements), and the FIB then says only that.
#[inline(always)]
pub fn to_this_host<H: Hook>(ctx: &H, meta: &PacketMeta) -> bool {
    const LOOPBACK: u32 = 1;
    let route = lookup(ctx, meta, &meta.src, &meta.dst, 20, None, LOOPBACK);
    !matches!(route.map(|(rc, _)| rc), Ok(FIB_SUCCESS | FIB_NO_NEIGH | FIB_FRAG_NEEDED))
}

/// Whether `meta`'s source cannot be where the packet came from (see `DropReason::Spoofed`):
/// the FIB, asked for the way back to it, names another attached interface, or, for a
/// packet that came in by an `external` one, this host itself, no route or a rejecting
/// one. Asked as from the loopback device (whose `forwarding` follows `all`), else, where
/// only some interfaces forward, from the arrival one; a host whose forwarding is off
/// cannot be asked (the FIB says only that): no check. None on the loopback device, which
/// carries only this host's own packets, nor for an IPv6 link-local source, which names
/// no place beyond its link (every interface has a route to `fe80::/64`).
#[inline(always)]
pub fn spoofed<H: Hook>(ctx: &H, meta: &PacketMeta, external: bool) -> bool {
    const LOOPBACK: u32 = 1;
    if ctx.arrival() == LOOPBACK || (meta.family == 6 && ipv6_link_local(&meta.src)) {
        return false;
    }
    let back = lookup(ctx, meta, &meta.dst, &meta.src, 20, Some(meta.proto), LOOPBACK);
    let Ok((mut rc, p)) = back else { return false };
    if rc == FIB_FWD_DISABLED {
        // The parameters as asked (the FIB stops before it writes them): only the place.
        p.ifindex = ctx.arrival();
        rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, 0) };
    }
    match rc {
        FIB_SUCCESS | FIB_NO_NEIGH => {
            p.ifindex != ctx.arrival() && iface_config(p.ifindex).is_some_and(|c| c.slot != 0)
        }
        FIB_BLACKHOLE | FIB_UNREACHABLE | FIB_PROHIBIT | FIB_NOT_FWDED => external,
        _ => false,
    }
}

/// Whether a TCP segment belongs to a connection of this host itself: a socket of this
/// namespace other than a listener owns its tuple. (The FIB cannot tell: it answers "not
/// forwarded" alike for one of this host's addresses and for no route at all.)
#[inline(always)]
pub fn host_connection(ctx: &impl EbpfContext, meta: &PacketMeta) -> bool {
    let state =
        tcp_socket_state(ctx, meta.family, (&meta.src, meta.sport), (&meta.dst, meta.dport));
    state.is_some_and(|state| state != TCP_LISTEN)
}

/// Whether the host listens at the local end of segment `meta` (its source when
/// `local_is_src`, the host's own segment; else its destination): then the segment's
/// connection is one the host accepted, which its peer opened. Asked as the peer's segment
/// from port 0, which no connection has: the lookup finds no connected socket and falls
/// through to the listeners.
#[inline(always)]
pub fn host_listens(ctx: &impl EbpfContext, meta: &PacketMeta, local_is_src: bool) -> bool {
    let (local, port, peer) = if local_is_src {
        (&meta.src, meta.sport, &meta.dst)
    } else {
        (&meta.dst, meta.dport, &meta.src)
    };
    tcp_socket_state(ctx, meta.family, (peer, 0), (local, port)) == Some(TCP_LISTEN)
}

/// The state of the TCP socket of this namespace that a segment from address and port
/// `src` to `dst` would reach, if any.
#[inline(always)]
fn tcp_socket_state(
    ctx: &impl EbpfContext,
    family: u8,
    (saddr, sport): (&[u32; 4], u16),
    (daddr, dport): (&[u32; 4], u16),
) -> Option<u32> {
    let mut tuple: bpf_sock_tuple = unsafe { zeroed() };
    let size = if family == 4 {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: saddr[0],
            daddr: daddr[0],
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: *saddr,
            daddr: *daddr,
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    let netns = BPF_F_CURRENT_NETNS as u64;
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, netns, 0) };
    if sk.is_null() {
        return None;
    }
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(state)
}

/// Sends the packet towards `next_hop` (its destination, or the backend of a floating-IP
/// flow), by the flow direction's cached next hop `cache` while it holds, or else by the
/// FIB, whose answer is then cached; `rewrite` translates it first. Returns the XDP action.
///
/// A packet the stack will drop with an ICMP error of its own (its TTL runs out here, or it
/// is longer than the route allows and may not be fragmented) goes to the stack as it
/// arrived when `own_errors` (a source translation): the error then reaches the sender,
/// quoting what it sent (translated, it would go to the public address, where nothing
/// answers; traceroute's first hop and path-MTU discovery through this hop would fail).
/// Every other packet passed to the stack is translated first, so that nothing leaves
/// untranslated.
#[inline(always)]
pub fn forward<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    src: &[u32; 4],
    next_hop: &[u32; 4],
    len: u64,
    cache: Option<&mut NextHop>,
    own_errors: bool,
    rewrite: impl FnOnce() -> Result<(), DropReason>,
) -> Result<u32, DropReason> {
    // Whatever the route: the stack drops such a packet too when it cannot be sent from
    // here (no neighbour entry yet, an egress interface xdpgate is not attached to).
    if own_errors && ttl(ctx, meta)? <= 1 {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip_len = ctx.wire_len(meta, (len as u16).wrapping_sub(meta.l3_off));
    let hop = match hop_for(ctx, meta, src, next_hop, ip_len, cache, false)? {
        Ok(hop) => Some(hop),
        Err((rc, _)) => {
            if own_errors && rc == FIB_FRAG_NEEDED && !fragmentable(ctx, meta)? {
                return Ok(xdp_action::XDP_PASS);
            }
            None
        }
    };
    send(ctx, meta, hop, rewrite)
}

/// Sends a floating-IP packet, unchanged, to its backend `backend` (by the flow direction's
/// cached next hop `cache` while it holds). What the FIB routes and cannot send (no
/// neighbour entry yet, too long for the route, an interface this hook may not send to) is
/// dropped and counted, as an encapsulated packet is: the
/// stack, which would route it by its destination, the frontend's, has no route there and
/// answered "network unreachable", which ends the client's connect at once (the agent
/// resolves the backends' neighbour entries, so a SYN sent again gets through).
#[inline(always)]
pub fn direct<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    backend: &[u32; 4],
    len: u64,
    cache: Option<&mut NextHop>,
) -> Result<u32, DropReason> {
    // The stack's (it takes the packet if the frontend is its own; else, with no route to
    // the frontend, it answers "network unreachable", not "time exceeded": a known limit).
    if ttl(ctx, meta)? <= 1 {
        return Ok(xdp_action::XDP_PASS);
    }
    let ip_len = ctx.wire_len(meta, (len as u16).wrapping_sub(meta.l3_off));
    match hop_for(ctx, meta, &meta.src, backend, ip_len, cache, false)? {
        Ok(hop) => send(ctx, meta, Some(hop), || Ok(())),
        Err((FIB_FRAG_NEEDED, mtu)) => ctx.too_big(meta, mtu, DropReason::DirectTooBig),
        // A route but no neighbour yet, or an interface this hook may not send to.
        Err((FIB_NO_NEIGH | FIB_SUCCESS, _)) => Err(DropReason::DirectUnreachable),
        // No route to the backend, forwarding off here: the stack's, as any packet's.
        Err(_) => Ok(xdp_action::XDP_PASS),
    }
}

/// The next hop of a packet from `src` to `dst` whose `ip_len` bytes leave (from the IP
/// header on): the flow direction's cached one `cache` while it holds, or else the FIB's
/// answer, then cached. `Err`: the FIB's return code, or `FIB_SUCCESS` for an interface
/// this hook may not send to, with the route's MTU (for `FIB_FRAG_NEEDED`).
/// `encapsulated`: asked about as the outer packet.
#[inline(always)]
pub fn hop_for<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    cache: Option<&mut NextHop>,
    encapsulated: bool,
) -> Result<Result<NextHop, (i64, u16)>, DropReason> {
    let generation = ROUTE_GENERATION.get(0).copied().unwrap_or(0);
    // The low bits: ages are told by wrapping differences.
    let now = unsafe { bpf_jiffies64() } as u32;
    let iif = ctx.arrival();
    match cache {
        Some(hop) if holds(hop, generation, now, iif, ip_len) => {
            sent_to_this_host(meta)?;
            Ok(Ok(*hop))
        }
        cache => {
            // An encapsulated packet is asked about as the outer packet it leaves as: IP in
            // IP (of its own family), no ports, as policy routing (`ip rule ... ipproto`)
            // sees it.
            let outer = if meta.family == 4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
            let (rc, p) = lookup(ctx, meta, src, dst, ip_len, encapsulated.then_some(outer), iif)?;
            // Routed on from here (sent, or answered too big): not what the whole link got.
            if matches!(rc, FIB_SUCCESS | FIB_NO_NEIGH | FIB_FRAG_NEEDED) {
                sent_to_this_host(meta)?;
            }
            if rc == FIB_NO_NEIGH {
                want_neighbour(p);
            }
            if rc != FIB_SUCCESS || !H::may_send_to(p.ifindex) {
                return Ok(Err((rc, unsafe { p.__bindgen_anon_1.mtu_result })));
            }
            let hop = NextHop {
                generation,
                jiffies: now,
                ifindex: p.ifindex,
                dmac: p.dmac,
                smac: p.smac,
                iif,
                max_len: ip_len,
                _pad: [0; 2],
            };
            if let Some(cache) = cache {
                *cache = hop;
            }
            Ok(Ok(hop))
        }
    }
}

/// The next hop of an ICMP error of `ip_len` bytes from `meta`'s destination back to its
/// source, routed as a packet forwarded from the arrival interface: `None` for a source no
/// host has (IPv4 multicast, the limited broadcast, 0/8 and 127/8, IPv6 multicast; a
/// default route would take them), the destination itself, or when the FIB has no unicast
/// route out of an interface this hook sends to (this host's own, a subnet broadcast,
/// loopback) or no neighbour entry yet (the agent resolves it, as for forwarding).
#[inline(always)]
pub fn back_to_sender<H: Hook>(ctx: &H, meta: &PacketMeta, ip_len: u16) -> Option<NextHop> {
    // Addresses as they lie in the packet: the first byte is the lowest of `src[0]`.
    let first = meta.src[0] as u8;
    let martian = if meta.family == 4 {
        matches!(first, 0 | 127 | 224..=239) || meta.src[0] == u32::MAX
    } else {
        first == 0xff || meta.src == [0; 4]
    };
    if martian || meta.src == meta.dst {
        return None;
    }
    let icmp = if meta.family == 4 { 1 } else { 58 };
    let (rc, p) =
        lookup(ctx, meta, &meta.dst, &meta.src, ip_len, Some(icmp), ctx.arrival()).ok()?;
    if rc == FIB_NO_NEIGH {
        want_neighbour(p);
    }
    if rc != FIB_SUCCESS || !H::may_send_to(p.ifindex) {
        return None;
    }
    Some(NextHop {
        generation: 0,
        jiffies: 0,
        ifindex: p.ifindex,
        dmac: p.dmac,
        smac: p.smac,
        iif: 0,
        max_len: ip_len,
        _pad: [0; 2],
    })
}

/// Asks the agent to resolve the next hop the FIB just found no neighbour entry for (it
/// filled in the interface and the next hop's address, the gateway's or the destination's):
/// a packet the stack takes instead resolves it itself, but one this hook must send (to a
/// floating-IP or encapsulated backend) cannot go there.
#[inline(never)]
fn want_neighbour(p: &bpf_fib_lookup) {
    // The next hop's family: an IPv4 route may have an IPv6 gateway (RFC 5549), which the
    // FIB then names with its family.
    let (addr, family) = if p.family == AF_INET6 {
        (unsafe { p.__bindgen_anon_4.ipv6_dst }, 6)
    } else {
        ([unsafe { p.__bindgen_anon_4.ipv4_dst }, 0, 0, 0], 4)
    };
    let key = NeighbourKey { addr, ifindex: p.ifindex, family, _pad: [0; 3] };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let _ = NEIGHBOURS_WANTED.insert(&key, &now, 0);
}

/// [`forward`] by the cached next hop alone, for a packet of an established flow in the
/// entry stage: `None` when the cache does not hold or the TTL runs out here, and the
/// packet goes the act stage's way (the FIB and the stack's own errors), which would take
/// the entry stage past its stack limit.
#[inline(always)]
pub fn by_cache<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    len: u64,
    cache: &NextHop,
    rewrite: impl FnOnce() -> Result<(), DropReason>,
) -> Option<Result<u32, DropReason>> {
    if let Err(reason) = sent_to_this_host(meta) {
        return Some(Err(reason));
    }
    if ttl(ctx, meta).ok()? <= 1 {
        return None;
    }
    let ip_len = ctx.wire_len(meta, (len as u16).wrapping_sub(meta.l3_off));
    let generation = ROUTE_GENERATION.get(0).copied().unwrap_or(0);
    let now = unsafe { bpf_jiffies64() } as u32;
    if !holds(cache, generation, now, ctx.arrival(), ip_len) {
        return None;
    }
    Some(send(ctx, meta, Some(*cache), rewrite))
}

/// A frame sent to a link-layer broadcast or multicast address is never forwarded, nor
/// answered with an ICMP error (RFC 1812 5.3.4, 4.3.2.7): everyone on the link got it.
#[inline(always)]
fn sent_to_this_host(meta: &PacketMeta) -> Result<(), DropReason> {
    if meta.link_group != 0 { Err(DropReason::LinkBroadcast) } else { Ok(()) }
}

/// Rewrites the packet and sends it by `hop`; without one (or with its TTL out), to the
/// stack.
#[inline(always)]
fn send<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    hop: Option<NextHop>,
    rewrite: impl FnOnce() -> Result<(), DropReason>,
) -> Result<u32, DropReason> {
    // One call site per caller, so that the rewrite is inlined there.
    rewrite()?;
    let Some(hop) = hop else { return Ok(xdp_action::XDP_PASS) };
    if !ctx.decrement_ttl(meta)? {
        return Ok(xdp_action::XDP_PASS);
    }
    ctx.send(&hop)
}

/// The first 9 bytes of the IP header: IPv4 flags (byte 6) and TTL (8), IPv6 hop limit (7).
#[inline(always)]
fn ip_start(ctx: &impl Packet, meta: &PacketMeta) -> Result<[u8; 9], DropReason> {
    Ok(unsafe { *ptr_at::<[u8; 9]>(ctx, meta.l3())? })
}

/// The packet's TTL (hop limit).
#[inline(always)]
pub fn ttl(ctx: &impl Packet, meta: &PacketMeta) -> Result<u8, DropReason> {
    let h = ip_start(ctx, meta)?;
    Ok(if meta.family == 4 { h[8] } else { h[7] })
}

/// Whether a router may fragment the packet: IPv4 without DF (IPv6 never).
#[inline(always)]
fn fragmentable(ctx: &impl Packet, meta: &PacketMeta) -> Result<bool, DropReason> {
    Ok(meta.family == 4 && ip_start(ctx, meta)?[6] & 0x40 == 0)
}

/// Whether a cached next hop still holds for a packet of `ip_len` bytes arriving by `iif`:
/// looked up under this route generation, recently enough, for a packet that arrived by the
/// same interface and was at least as long (the FIB checked that one against the route's
/// MTU). Another CPU may be writing the entry's hop at the same moment (two packets of one
/// flow direction at once, after a change): a torn copy is at worst a mix of two answers
/// the FIB gave for this flow within a tick, and is asked again after the age limit.
#[inline(always)]
fn holds(hop: &NextHop, generation: u32, now: u32, iif: u32, ip_len: u16) -> bool {
    hop.ifindex != 0
        && hop.generation == generation
        && now.wrapping_sub(hop.jiffies) < HOP_MAX_AGE_JIFFIES
        && hop.iif == iif
        && ip_len <= hop.max_len
}

/// Writes the next hop's MAC addresses into the frame.
#[inline(always)]
pub fn set_macs(ctx: &impl Packet, hop: &NextHop) -> Result<(), DropReason> {
    let eth = unsafe { &mut *(ptr_at::<EthHdr>(ctx, 0)? as *mut EthHdr) };
    eth.dst = hop.dmac;
    eth.src = hop.smac;
    Ok(())
}
