//! Source NAT through a NAT gateway: which new flows are translated, and the claim of a
//! public port. The claim is the no-overwrite insert of the translation under its reply
//! tuple (remote -> public address and port): of two CPUs racing for a port, one insert
//! fails and that CPU probes the next port, so a (public address, port, protocol) is never
//! handed out twice for the same destination, while it may serve many destinations at once.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::maps::lpm_trie::Key;
use xdpgate_common::{
    flow::{FlowKey, FlowValue, NAT_DST, NAT_SRC},
    lb::NO_BACKEND,
    nat::{
        ADDR_KEY_HEADER_BITS, AddrKey, MAX_PUBLIC_ADDRS, NAT_ACTIVE, NAT_DROP_REASONS, NAT_PROBES,
        NatEntry, NatGatewayConfig,
    },
    nsg::{DIR_INBOUND, DIR_OUTBOUND},
    stats::DropReason,
};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    lb,
    maps::{
        NAT_CREATED, NAT_FAILURES, NAT_GATEWAYS, NAT_MAP, NAT_PUBLIC, NAT_PUBLIC_VERSION,
        NAT_SUBNETS, NAT_TRAFFIC, PUBLIC_MEMO, VNET,
    },
    parse::{PacketMeta, is_echo},
};

#[inline(always)]
fn addr_key(family: u8, addr: &[u32; 4]) -> AddrKey {
    AddrKey { family, _pad: [0; 3], addr: *addr }
}

/// Whether `addr` is in the virtual network (its address space and peerings).
#[inline(always)]
pub fn in_virtual_network(family: u8, addr: &[u32; 4]) -> bool {
    in_trie(&VNET, family, addr).is_some()
}

#[inline(always)]
fn in_trie(
    trie: &aya_ebpf::maps::LpmTrie<AddrKey, u32>,
    family: u8,
    addr: &[u32; 4],
) -> Option<u32> {
    let bits = if family == 4 { 32 } else { 128 };
    trie.get(Key::new(ADDR_KEY_HEADER_BITS + bits, addr_key(family, addr))).copied()
}

/// The NAT gateway that translates this new flow: outbound, from one of its subnets, to a
/// destination outside the virtual network.
#[inline(always)]
pub fn gateway(meta: &PacketMeta, dir: u32) -> Option<u32> {
    // Multicast, broadcast and IPv6 link-local destinations are left untranslated.
    if dir != DIR_OUTBOUND || !meta.routed_dst() || in_trie(&VNET, meta.family, &meta.dst).is_some()
    {
        return None;
    }
    in_trie(&NAT_SUBNETS, meta.family, &meta.src)
}

/// How long a flow translated by gateway `gw` may idle: as long as its translation, so the
/// flow table never cuts a connection the gateway still holds.
#[inline(always)]
pub fn idle_s(gw: u32, proto: u8) -> u16 {
    NAT_GATEWAYS
        .get(gw)
        .map_or(0, |c| if proto == IPPROTO_TCP { c.tcp_idle_s } else { c.udp_idle_s })
}

/// The NAT gateway whose public address the packet is addressed to.
#[inline(always)]
pub fn to_public_address(meta: &PacketMeta) -> Option<u32> {
    unsafe { NAT_PUBLIC.get(&addr_key(meta.family, &meta.dst)) }.copied()
}

/// Index in `NatTraffic::dropped` of each of `nat::NAT_DROPS`.
const DROPPED_EXHAUSTED: usize = 0;
const DROPPED_UNMATCHED: usize = 1;

/// Counts a packet of a flow translated by a NAT gateway (`entry`: its direction's entry)
/// under the gateway that owns the public address: the new source of an outbound packet,
/// the destination of a reply. By address rather than the translation's gateway index, so
/// that a gateway's packets follow it when a policy renumbers the gateways. Load-balanced
/// flows translate too, but have a service. Bytes from the IP header on.
#[inline(always)]
pub fn count_translated(meta: &PacketMeta, entry: &FlowValue, len: u64, now: u64) {
    if entry.service != NO_BACKEND {
        return;
    }
    let (public, dir) = match entry.nat {
        NAT_SRC => (&entry.nat_addr, DIR_OUTBOUND),
        NAT_DST => (&meta.dst, DIR_INBOUND),
        _ => return,
    };
    if let Some(gw) = public_gateway(meta.family, public, now) {
        count(gw, dir, meta, len);
    }
}

const NO_GATEWAY: u32 = u32::MAX;

/// How long an answer is used: it is forgotten at once when the version changes, and
/// after this even when it does not (a writer from before the version, one that failed
/// midway, or a CPU that read the map before the version).
const PUBLIC_MEMO_NS: u64 = 1_000_000_000;

/// The gateway whose public address `addr` is: `NAT_PUBLIC`'s answer, remembered per CPU
/// for the last address asked (see `PUBLIC_MEMO_NS`). A translated flow's packets are
/// counted on every packet, and a gateway's flows on a CPU often share an address: then an
/// array read instead of a hash lookup. The version is read first, so an answer read
/// during a change is forgotten after it.
#[inline(always)]
fn public_gateway(family: u8, addr: &[u32; 4], now: u64) -> Option<u32> {
    let version = *NAT_PUBLIC_VERSION.get(0)?;
    let memo = unsafe { &mut *PUBLIC_MEMO.get_ptr_mut(0)? };
    if memo.version != version
        || now.wrapping_sub(memo.read_ns) >= PUBLIC_MEMO_NS
        || memo.key.family != family
        || memo.key.addr != *addr
    {
        let key = addr_key(family, addr);
        memo.gateway = unsafe { NAT_PUBLIC.get(&key) }.copied().unwrap_or(NO_GATEWAY);
        memo.key = key;
        memo.version = version;
        memo.read_ns = now;
    }
    (memo.gateway != NO_GATEWAY).then_some(memo.gateway)
}

/// Counts the first packet of a flow rebuilt from its translation `t` under the gateway
/// that made the translation.
#[inline(always)]
pub fn count_rebuilt(meta: &PacketMeta, t: &NatEntry, len: u64) {
    let dir = if t.kind == NAT_SRC { DIR_OUTBOUND } else { DIR_INBOUND };
    count(u32::from(t.gateway), dir, meta, len);
}

#[inline(always)]
fn count(gw: u32, dir: u32, meta: &PacketMeta, len: u64) {
    if let Some(t) = NAT_TRAFFIC.get_ptr_mut(gw) {
        // Per-CPU slot: plain adds are exact.
        let c = unsafe { &mut (*t).translated[dir as usize & 1] };
        c.packets += 1;
        c.bytes += len.saturating_sub(u64::from(meta.l3_off));
    }
}

/// Counts a packet to gateway `gw`'s public address that matches no active translation
/// (dropped as `NatUnmatched`).
#[inline(always)]
pub fn unmatched(gw: u32) {
    count_dropped(gw, DROPPED_UNMATCHED);
}

#[inline(always)]
fn count_dropped(gw: u32, index: usize) {
    if let Some(t) = NAT_TRAFFIC.get_ptr_mut(gw) {
        unsafe { (*t).dropped[index & (NAT_DROP_REASONS - 1)] += 1 };
    }
}

/// A translation stored under this tuple, if any.
#[inline(always)]
pub fn existing(key: &FlowKey) -> Option<&'static NatEntry> {
    unsafe { NAT_MAP.get(key) }
}

/// Protocols whose flows can share a public address: ports, or the echo identifier.
#[inline(always)]
fn translatable(meta: &PacketMeta) -> bool {
    meta.proto == IPPROTO_TCP
        || meta.proto == IPPROTO_UDP
        || (meta.is_icmp() && is_echo(meta.family, meta.icmp_type))
}

/// The public addresses of `config` of `family`, as bits (bit i: `addrs[i]`). Arithmetic,
/// not branches: the verifier walks it once, not once per combination of outcomes.
#[inline(always)]
fn of_family(config: &NatGatewayConfig, family: u8) -> u32 {
    let mut bits = 0u32;
    for i in 0..MAX_PUBLIC_ADDRS {
        let same = u32::from(config.families[i] ^ family).wrapping_sub(1) >> 31;
        bits |= same << i;
    }
    let n = config.n_addrs.min(MAX_PUBLIC_ADDRS as u32);
    bits & ((1u32 << n) - 1)
}

/// The index of the `k`-th (from 0) set bit of `bits`, which has more than `k`; branch-free
/// as [`of_family`]: the lowest set bit is cleared `k` times.
#[inline(always)]
fn nth_bit(mut bits: u32, k: u32) -> u32 {
    for i in 0..MAX_PUBLIC_ADDRS as u32 - 1 {
        // All ones while i < k (both below 16: the difference's top bit).
        let clear = 0u32.wrapping_sub(i.wrapping_sub(k) >> 31);
        bits &= !(clear & bits & bits.wrapping_neg());
    }
    (bits & bits.wrapping_neg()).trailing_zeros()
}

/// Claims a public address and port of gateway `gw` for a new flow and records the
/// translation both ways. Returns the public address index and port packed as
/// `index << 16 | port`.
#[inline(always)]
pub fn allocate(meta: &PacketMeta, gw: u32, now: u64) -> Result<u32, DropReason> {
    let config = NAT_GATEWAYS.get(gw).ok_or(DropReason::Internal)?;
    // No port to claim: not a failed allocation.
    if !translatable(meta) {
        return Err(DropReason::NatUntranslatable);
    }
    if config.n_addrs == 0 {
        return Err(exhausted(gw));
    }
    let h = lb::hash(meta, 0);
    // The same private host keeps the same public address, and hosts spread evenly over the
    // addresses of their family: the k-th of them, k a hash of the host's address (mixed
    // whole: hosts of one subnet differ only in their last bits).
    let usable = of_family(config, meta.family);
    if usable == 0 {
        return Err(exhausted(gw));
    }
    let k = xdpgate_common::lb::fmix(meta.src[0] ^ meta.src[1] ^ meta.src[2] ^ meta.src[3])
        % usable.count_ones();
    // Masked for the verifier: the k-th of at most 16 bits is below 16.
    let index = nth_bit(usable, k) & (MAX_PUBLIC_ADDRS as u32 - 1);
    let public = config.addrs[index as usize];
    let echo = meta.is_icmp();
    let range = u32::from(config.port_hi).saturating_sub(u32::from(config.port_lo)) + 1;
    let start = h % range;
    for i in 0..NAT_PROBES {
        // Triangular probing: claimed ports do not pile up into long runs.
        let port = (u32::from(config.port_lo) + (start + i * (i + 1) / 2) % range) as u16;
        let reply = FlowKey {
            src: meta.dst,
            dst: public,
            sport: if echo { port } else { meta.dport },
            dport: port,
            proto: meta.proto,
            family: meta.family,
            kind: 0,
            _pad: 0,
        };
        let back = NatEntry {
            addr: meta.src,
            port: meta.sport,
            kind: NAT_DST,
            gateway: gw as u8,
            state: NAT_ACTIVE,
            time_ns: now,
        };
        if NAT_MAP.insert(&reply, &back, u64::from(BPF_NOEXIST)).is_ok() {
            let forward = FlowKey {
                src: meta.src,
                dst: meta.dst,
                sport: meta.sport,
                dport: meta.dport,
                proto: meta.proto,
                family: meta.family,
                kind: 0,
                _pad: 0,
            };
            let out = NatEntry {
                addr: public,
                port,
                kind: NAT_SRC,
                gateway: gw as u8,
                state: NAT_ACTIVE,
                time_ns: now,
            };
            if NAT_MAP.insert(&forward, &out, 0).is_err() {
                let _ = NAT_MAP.remove(&reply);
                return Err(exhausted(gw));
            }
            if let Some(c) = NAT_CREATED.get_ptr_mut(gw) {
                unsafe { *c += 1 };
            }
            return Ok((index << 16) | u32::from(port));
        }
    }
    Err(exhausted(gw))
}

#[inline(always)]
fn exhausted(gw: u32) -> DropReason {
    if let Some(c) = NAT_FAILURES.get_ptr_mut(gw) {
        unsafe { *c += 1 };
    }
    count_dropped(gw, DROPPED_EXHAUSTED);
    DropReason::NatExhausted
}

/// The public address at `index` of gateway `gw`.
#[inline(always)]
pub fn public_address(gw: u32, index: u32) -> Option<[u32; 4]> {
    let config = NAT_GATEWAYS.get(gw)?;
    Some(config.addrs[(index & (MAX_PUBLIC_ADDRS as u32 - 1)) as usize])
}
