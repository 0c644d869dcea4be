//! NAT gateways: compiled into the dataplane's subnet, public-address and gateway tables;
//! idle translations expired (their ports cooling down before reuse); ports in use reported.

use std::net::IpAddr;

use anyhow::Result;
use aya::maps::{
    Array, HashMap, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use xdpgate_common::{
    family_bytes,
    flow::{FlowKey, FlowValue, NAT_DST, TCP_ANSWERED, TCP_CLOSED},
    maps::{
        EMBRYOS, FLOWS, NAT_CREATED, NAT_FAILURES, NAT_GATEWAYS, NAT_MAP, NAT_PUBLIC,
        NAT_PUBLIC_VERSION, NAT_SUBNETS, NAT_TRAFFIC, VNET,
    },
    nat::{
        ADDR_KEY_HEADER_BITS, AddrKey, MAX_NAT_GATEWAYS, MAX_PUBLIC_ADDRS, NAT_ACTIVE,
        NAT_COOLDOWN, NAT_DROPS, NatEntry, NatGatewayConfig, NatTraffic,
    },
    nsg::{DIR_INBOUND, DIR_OUTBOUND, TCP_CLOSED_TIMEOUT_NS},
    stats::{Counter, DROP_REASON_NAMES},
    words,
};

use xdpgate_policy::{NatGateway, Policy, names::Record};

use crate::{PinDir, carried::remap, counts::Traffic, flows::FlowEntries};

pub fn addr_key(addr: IpAddr) -> AddrKey {
    let (family, bytes) = family_bytes(addr);
    AddrKey { family, _pad: [0; 3], addr: words(&bytes) }
}

/// The prefix-trie key of `net` (also the decap program's `DECAP_SOURCES`).
pub fn prefix_key(net: &IpNet) -> Key<AddrKey> {
    Key::new(ADDR_KEY_HEADER_BITS + u32::from(net.prefix_len()), addr_key(net.network()))
}

fn gateway_config(gw: &NatGateway) -> NatGatewayConfig {
    let mut c = NatGatewayConfig::default();
    for (i, a) in gw.public_addresses.iter().take(MAX_PUBLIC_ADDRS).enumerate() {
        let k = addr_key(*a);
        c.addrs[i] = k.addr;
        c.families[i] = k.family;
    }
    c.n_addrs = gw.public_addresses.len().min(MAX_PUBLIC_ADDRS) as u32;
    c.port_lo = gw.ports.lo;
    c.port_hi = gw.ports.hi;
    // Policy checks keep both within 7200 s.
    c.tcp_idle_s = gw.tcp_idle_timeout as u16;
    c.udp_idle_s = gw.udp_idle_timeout as u16;
    c
}

/// The dataplane's NAT maps, opened from their pins.
pub struct NatMaps {
    subnets: LpmTrie<MapData, AddrKey, u32>,
    vnet: LpmTrie<MapData, AddrKey, u32>,
    public: HashMap<MapData, AddrKey, u32>,
    /// `None` in a dataplane whose programs predate it (they remember no answer).
    public_version: Option<Array<MapData, u64>>,
    gateways: Array<MapData, NatGatewayConfig>,
}

impl NatMaps {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            subnets: pins.open_map(NAT_SUBNETS)?.try_into()?,
            vnet: pins.open_map(VNET)?.try_into()?,
            public: pins.open_map(NAT_PUBLIC)?.try_into()?,
            public_version: pins.open_map(NAT_PUBLIC_VERSION).ok().and_then(|m| m.try_into().ok()),
            gateways: pins.open_map(NAT_GATEWAYS)?.try_into()?,
        })
    }

    /// Replaces the gateway tables with the policy's: new entries first, then the stale
    /// ones removed, so no packet finds the tables empty in between. Existing translations
    /// stay (their flows keep working) until they idle out. Each gateway's counters follow
    /// it by name from the running generation (`running`, its record; see
    /// [`carry_counters`]).
    pub fn install(
        &mut self,
        pins: &PinDir,
        policy: &Policy,
        running: Option<&Record>,
    ) -> Result<()> {
        xdpgate_policy::nat::check(policy)?;
        if let Some(running) = running {
            carry_counters(pins, policy, running)?;
        }
        for (i, gw) in policy.nat_gateways.iter().enumerate() {
            self.gateways.set(i as u32, gateway_config(gw), 0)?;
        }
        let subnets: Vec<(Key<AddrKey>, u32)> = policy
            .nat_gateways
            .iter()
            .enumerate()
            .flat_map(|(i, gw)| gw.subnets.iter().map(move |n| (prefix_key(n), i as u32)))
            .collect();
        let vnet: Vec<(Key<AddrKey>, u32)> =
            policy.virtual_network.iter().map(|n| (prefix_key(n), 1)).collect();
        let public: Vec<(AddrKey, u32)> = policy
            .nat_gateways
            .iter()
            .enumerate()
            .flat_map(|(i, gw)| gw.public_addresses.iter().map(move |a| (addr_key(*a), i as u32)))
            .collect();
        replace_trie(&mut self.subnets, &subnets)?;
        replace_trie(&mut self.vnet, &vnet)?;
        let written = self.replace_public(&public);
        // After the addresses, written or not: the programs forget what they remember of
        // the old ones.
        if let Some(version) = &mut self.public_version {
            let v = version.get(&0, 0)?;
            version.set(0, v.wrapping_add(1), 0)?;
        }
        written
    }

    fn replace_public(&mut self, public: &[(AddrKey, u32)]) -> Result<()> {
        for (k, v) in public {
            self.public.insert(k, v, 0)?;
        }
        let stale: Vec<AddrKey> = self
            .public
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !public.iter().any(|(p, _)| p == k))
            .collect();
        for k in stale {
            self.public.remove(&k)?;
        }
        Ok(())
    }
}

/// Moves the per-gateway counters (traffic and drops, translations created, failed
/// allocations) from each gateway's index in the running generation to its index in
/// `policy`, by name, as rule counters are kept; a gateway the policy adds starts at zero
/// and one it removes is gone. Indexes whose gateway stays put are left alone, so that an
/// apply of the same policy loses no packet counted during it. (A packet counted under the
/// old numbering after its index was rewritten is lost or counted for the gateway now
/// there: only when the policy renumbers its gateways.)
fn carry_counters(pins: &PinDir, policy: &Policy, running: &Record) -> Result<()> {
    let from: Vec<Option<u32>> = (0..MAX_NAT_GATEWAYS as usize)
        .map(|i| {
            let name = &policy.nat_gateways.get(i)?.name;
            running.nat_gateways.iter().position(|(n, _)| n == name).map(|j| j as u32)
        })
        .collect();
    // Pinned by the first load of a build with it; none before (nothing to carry).
    if let Ok(map) = pins.open_map(NAT_TRAFFIC) {
        remap::<NatTraffic>(&mut map.try_into()?, &from)?;
    }
    remap::<u64>(&mut pins.open_map(NAT_FAILURES)?.try_into()?, &from)?;
    if let Ok(map) = pins.open_map(NAT_CREATED) {
        remap::<u64>(&mut map.try_into()?, &from)?;
    }
    Ok(())
}

/// What a gateway translated each way and the packets the NAT stage dropped for it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayTraffic {
    /// Private hosts' packets to the internet (source translated); bytes from the IP header
    /// on.
    pub outbound: Traffic,
    /// Their replies (destination translated).
    pub inbound: Traffic,
    /// Drop reason (`nat_exhausted`, `nat_unmatched`) to packets; JSON
    /// `{"nat_exhausted": {"packets": n}, ..}`.
    #[serde(serialize_with = "crate::counts::drops_by_reason")]
    pub dropped: Vec<(&'static str, u64)>,
}

impl GatewayTraffic {
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.iter().find(|(n, _)| *n == reason).map_or(0, |(_, v)| *v)
    }
}

/// Each gateway index's traffic, summed over the CPUs; `None` from a dataplane loaded before
/// the counters existed.
fn read_traffic(pins: &PinDir) -> Result<Option<Vec<GatewayTraffic>>> {
    let Ok(map) = pins.open_map(NAT_TRAFFIC) else { return Ok(None) };
    let map: PerCpuArray<_, NatTraffic> = map.try_into()?;
    (0..MAX_NAT_GATEWAYS)
        .map(|i| {
            let (mut outbound, mut inbound) = (Counter::default(), Counter::default());
            let mut dropped = [0u64; NAT_DROPS.len()];
            for t in map.get(&i, 0)?.iter() {
                outbound.add(&t.translated[DIR_OUTBOUND as usize]);
                inbound.add(&t.translated[DIR_INBOUND as usize]);
                dropped.iter_mut().zip(t.dropped).for_each(|(d, n)| *d += n);
            }
            Ok(GatewayTraffic {
                outbound: outbound.into(),
                inbound: inbound.into(),
                dropped: NAT_DROPS
                    .iter()
                    .zip(dropped)
                    .map(|(r, n)| (DROP_REASON_NAMES[*r as usize], n))
                    .collect(),
            })
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// A gateway's traffic under its name (`xdpgate stats`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NamedTraffic {
    pub nat_gateway: String,
    #[serde(flatten)]
    pub traffic: GatewayTraffic,
}

/// The traffic of the NAT gateways of the running generation (`record`); empty from a
/// dataplane loaded before the counters existed.
pub fn traffic(pins: &PinDir, record: &Record) -> Result<Vec<NamedTraffic>> {
    let Some(all) = read_traffic(pins)? else { return Ok(Vec::new()) };
    Ok(record
        .nat_gateways
        .iter()
        .zip(all)
        .map(|((name, _), traffic)| NamedTraffic { nat_gateway: name.clone(), traffic })
        .collect())
}

fn key_bits(k: &Key<AddrKey>) -> (u32, AddrKey) {
    (k.prefix_len(), k.data())
}

/// Inserts `entries` into `trie`, then removes whatever else it held.
fn replace_trie(
    trie: &mut LpmTrie<MapData, AddrKey, u32>,
    entries: &[(Key<AddrKey>, u32)],
) -> Result<()> {
    for (k, v) in entries {
        trie.insert(k, v, 0)?;
    }
    let wanted: Vec<(u32, AddrKey)> = entries.iter().map(|(k, _)| key_bits(k)).collect();
    let stale: Vec<Key<AddrKey>> =
        trie.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains(&key_bits(k))).collect();
    for k in stale {
        trie.remove(&k)?;
    }
    Ok(())
}

pub use crate::monotonic_ns;

/// The forward tuple (private host to remote) of a translation stored under its reply tuple.
fn forward_key(reply: &FlowKey, t: &NatEntry) -> FlowKey {
    let echo = xdpgate_common::is_icmp(reply.family, reply.proto);
    FlowKey {
        src: t.addr,
        dst: reply.src,
        sport: t.port,
        dport: if echo { t.port } else { reply.sport },
        proto: reply.proto,
        family: reply.family,
        kind: 0,
        _pad: 0,
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Translations that idled out (their ports now cooling down).
    pub expired: usize,
    /// Ports whose cooldown ended, free again.
    pub released: usize,
}

/// The public address a translation's claim (its entry under the `reply` tuple) holds.
fn claimed(reply: &FlowKey) -> IpAddr {
    crate::flows::addr(&reply.dst, reply.family)
}

/// The gateway of a translation (its claim under `reply`): the one that owns its address
/// now (the index it was made under belongs to another gateway after a reload that
/// renumbered them); none once a reload took the address from every gateway.
fn gateway_of<'a>(policy: &'a Policy, reply: &FlowKey) -> Option<&'a NatGateway> {
    policy.nat_gateways.iter().find(|g| g.public_addresses.contains(&claimed(reply)))
}

/// Seconds a translation may idle: its gateway's timeout for the protocol. An orphan (its
/// gateway gone, see [`gateway_of`]) idles out as its flow would, by the timeout its
/// entries (`flow`) were given when it began, else by the policy's.
fn idle_timeout_s(policy: &Policy, gw: Option<&NatGateway>, proto: u8, flow: &[FlowValue]) -> u32 {
    let s = &policy.settings;
    match (gw, flow.iter().map(|f| f.idle_s).max().filter(|&t| t > 0)) {
        (Some(gw), _) if proto == 6 => gw.tcp_idle_timeout,
        (Some(gw), _) => gw.udp_idle_timeout,
        (None, Some(t)) => u32::from(t),
        (None, None) if proto == 6 => s.tcp_idle_timeout,
        (None, None) if proto == 17 => s.udp_idle_timeout,
        (None, None) => s.icmp_idle_timeout,
    }
}

/// Seconds a translation's port rests before it serves the same destination again: its
/// gateway's cooldown; an orphan's the default, in case a later reload gives its address
/// back (the remote may still hold the old connection).
fn cooldown_s(gw: Option<&NatGateway>) -> u32 {
    gw.map_or(NatGateway::DEFAULT_PORT_REUSE_COOLDOWN, |gw| gw.port_reuse_cooldown)
}

/// Expires translations idle longer than their timeout (see [`idle_timeout_s`]; a closed
/// TCP flow after 10 s) and releases ports whose cooldown has passed.
/// Activity is the last packet the flow table saw either way. The established flows it
/// removes go to `ended` as they were (for the flow log's `end` lines: the sweep leaves
/// translated flows to this expiry), kept there if a later translation fails.
pub fn expire(
    pins: &PinDir,
    policy: &Policy,
    now: u64,
    ended: &mut Vec<FlowEntries>,
) -> Result<Expired> {
    crate::migrate::ensure_done(pins)?;
    let mut map: HashMap<_, FlowKey, NatEntry> = pins.open_map(NAT_MAP)?.try_into()?;
    // A translated flow's entries are established or still embryonic.
    let mut tables: Vec<HashMap<_, FlowKey, FlowValue>> =
        vec![pins.open_map(FLOWS)?.try_into()?, pins.open_map(EMBRYOS)?.try_into()?];
    // In batches: a bpf() call per 4,096 entries, not two per entry.
    let mut entries: Vec<(FlowKey, NatEntry)> = Vec::new();
    crate::table::for_each(&map, |reply, t| {
        if t.kind == NAT_DST {
            entries.push((*reply, *t));
        }
        Ok(())
    })?;
    let mut out = Expired::default();
    // Embryonic flows ended whole (see `counts::add_ended_embryos`; one missing a half
    // counts as evicted already).
    let mut embryos_ended = 0;
    let result = entries.into_iter().try_for_each(|(reply, t)| -> Result<()> {
        if t.state == NAT_COOLDOWN {
            if now >= t.time_ns {
                let _ = map.remove(&reply);
                out.released += 1;
            }
            return Ok(());
        }
        let gw = gateway_of(policy, &reply);
        let forward = forward_key(&reply, &t);
        // Each table's entries of the flow, forward and reply (the established table's first).
        let reads: Vec<[Option<FlowValue>; 2]> =
            tables.iter().map(|m| [m.get(&forward, 0).ok(), m.get(&reply, 0).ok()]).collect();
        let seen: Vec<FlowValue> = reads.iter().flatten().flatten().copied().collect();
        let last = seen.iter().map(|f| f.last_seen_ns).max().unwrap_or(t.time_ns).max(t.time_ns);
        let timeout = match reply.proto {
            6 if seen.iter().any(|f| f.tcp & TCP_CLOSED != 0) => TCP_CLOSED_TIMEOUT_NS,
            proto => u64::from(idle_timeout_s(policy, gw, proto, &seen)) * 1_000_000_000,
        };
        // Not in the established table (which never drops an entry for room), a translation
        // goes after the embryonic timeout when it is a lone exchange (answered, not TCP), as
        // the sweep ends one without a translation: held for the gateway's, a resolver's
        // queries would crowd the embryonic table (LRU), pushing out handshakes. So does one
        // of such a protocol with no embryo left (pushed out by newer ones, a flood's: a live
        // stream's next packet makes its entries again, from the translation). And when it
        // is a half-open TCP one (see `half_open`), as Azure's half-open timer frees its port.
        // An `ASSURED` flow, which waits among the embryos for room in the established
        // table, is an established one: neither lone nor half-open.
        let embryonic = reads[0] == [None, None];
        let assured = reads[1].iter().flatten().any(FlowValue::assured);
        let pushed_out = reads[1] == [None, None] && crate::flows::lone_protocol(reply.proto);
        let lone = embryonic
            && !assured
            && (pushed_out || crate::flows::lone_exchange(reply.proto, reads[1][1].as_ref()));
        let half_open = embryonic && !assured && reply.proto == 6 && half_open(&reads[1]);
        let timeout = if lone || half_open {
            timeout.min(u64::from(policy.settings.embryonic_timeout) * 1_000_000_000)
        } else {
            timeout
        };
        if now.saturating_sub(last) <= timeout {
            return Ok(());
        }
        // Per table, whether the forward and the reply entry were removed here.
        let mut removed = [[false; 2]; 2];
        let remove_flow = || {
            for (i, m) in tables.iter_mut().enumerate() {
                removed[i] = [m.remove(&forward).is_ok(), m.remove(&reply).is_ok()];
            }
            Ok(())
        };
        out.expired += 1;
        let released = retire(&mut map, &reply, &t, cooldown_s(gw), now, remove_flow)?;
        out.released += usize::from(released);
        // As the table that had it before it went: the established one, or the embryonic
        // one for a lone exchange (answered, never confirmed; not TCP's, as the sweep) or an
        // `ASSURED` flow. Not when another remover took the flow first: its end is theirs.
        let took = |i: usize| removed[i].contains(&true);
        let had = if lone || (embryonic && assured) {
            took(1).then_some(reads[1])
        } else {
            took(0).then_some(reads[0])
        };
        ended.extend(match had {
            Some([Some(f), r]) => Some(FlowEntries::of(forward, f, reply, r)),
            Some([None, Some(r)]) => Some(FlowEntries::of(reply, r, forward, None)),
            _ => None,
        });
        embryos_ended += u64::from(removed[1] == [true, true]);
        Ok(())
    });
    // Counted however the pass ended: these embryos are gone.
    let counted = crate::counts::add_ended_embryos(pins, embryos_ended);
    result?;
    counted?;
    Ok(out)
}

/// Whether a TCP flow not in the established table, with these embryonic entries (forward
/// and reply), is half-open: its SYN never answered, or no embryo left (reset in its
/// handshake, or pushed out by newer ones: a live connection's next segment rebuilds it
/// from the translation). One answered and not acknowledged yet keeps the TCP timeout: a
/// half of its embryo pushed out before the client's ACK leaves a live connection so.
fn half_open(embryo: &[Option<FlowValue>; 2]) -> bool {
    let answered = embryo[0].is_some_and(|f| f.tcp & TCP_ANSWERED != 0)
        || embryo[1].is_some_and(|r| r.packets > 0);
    !answered
}

/// Ends the translation `t` stored under its `reply` tuple and, with `remove_flow`, the
/// entries of its flow, in an order that never frees a port under a live flow: first the
/// forward tuple's translation goes and the port starts cooling down (meanwhile the flow's
/// packets pass by its entries); then its entries go, and its next packet finds no
/// translation to rebuild them from; last, without a cooldown (`cooldown_s` 0), the port is
/// free (then `true`). The other way round, a packet between the entries' removal and the
/// translation's end rebuilt the flow, whose port was then freed under it.
fn retire(
    map: &mut HashMap<MapData, FlowKey, NatEntry>,
    reply: &FlowKey,
    t: &NatEntry,
    cooldown_s: u32,
    now: u64,
    remove_flow: impl FnOnce() -> Result<()>,
) -> Result<bool> {
    let _ = map.remove(&forward_key(reply, t));
    let cooling = NatEntry {
        state: NAT_COOLDOWN,
        time_ns: now + u64::from(cooldown_s) * 1_000_000_000,
        ..*t
    };
    map.insert(reply, cooling, 0)?;
    remove_flow()?;
    if cooldown_s == 0 {
        let _ = map.remove(reply);
        return Ok(true);
    }
    Ok(false)
}

/// Removes a flow through a NAT gateway, whose reply tuple is `reply`, with `remove_flow`,
/// and ends its active translation as the expiry does (see `retire` for the order). `false`
/// when it had none.
pub fn end_translation(
    pins: &PinDir,
    policy: &Policy,
    reply: &FlowKey,
    now: u64,
    remove_flow: impl FnOnce() -> Result<()>,
) -> Result<bool> {
    let mut map: HashMap<_, FlowKey, NatEntry> = pins.open_map(NAT_MAP)?.try_into()?;
    let t = match map.get(reply, 0) {
        Ok(t) if t.kind == NAT_DST && t.state == NAT_ACTIVE => t,
        _ => {
            remove_flow()?;
            return Ok(false);
        }
    };
    retire(&mut map, reply, &t, cooldown_s(gateway_of(policy, reply)), now, remove_flow)?;
    Ok(true)
}

#[derive(Debug, serde::Serialize)]
pub struct GatewayReport {
    /// None (`null`): the translations on public addresses no gateway of the running policy
    /// has (a reload removed their gateway or address); each keeps its flow working until
    /// that idles out.
    #[serde(rename = "nat_gateway")]
    pub name: Option<String>,
    /// Public address and the distinct ports in use on it (cooling-down ports included; a
    /// port serving translations to several destinations counted once); in JSON
    /// `[{"address": .., "ports_in_use": n}]`.
    #[serde(serialize_with = "addresses_json")]
    pub addresses: Vec<(IpAddr, usize)>,
    pub translations: usize,
    /// Translations created (new flows that got a port); none from a dataplane loaded
    /// before the counter existed.
    pub created: Option<u64>,
    pub failed_allocations: u64,
    /// Ports of its range on each public address (each can serve many destinations).
    pub ports_per_address: u32,
    /// Packets and bytes translated each way, packets dropped; none from a dataplane loaded
    /// before the counters existed.
    pub traffic: Option<GatewayTraffic>,
}

/// Reads the live state of the NAT gateways of the running generation (`record`).
fn addresses_json<S: serde::Serializer>(a: &[(IpAddr, usize)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(serde::Serialize)]
    struct Address {
        address: IpAddr,
        ports_in_use: usize,
    }
    s.collect_seq(a.iter().map(|&(address, ports_in_use)| Address { address, ports_in_use }))
}

pub fn report(pins: &PinDir, record: &Record) -> Result<Vec<GatewayReport>> {
    let map: HashMap<_, FlowKey, NatEntry> = pins.open_map(NAT_MAP)?.try_into()?;
    let failures: PerCpuArray<_, u64> = pins.open_map(NAT_FAILURES)?.try_into()?;
    let configs: Array<_, NatGatewayConfig> = pins.open_map(NAT_GATEWAYS)?.try_into()?;
    let created: Option<PerCpuArray<_, u64>> =
        pins.open_map(NAT_CREATED).ok().and_then(|m| m.try_into().ok());
    let claims: Vec<(FlowKey, NatEntry)> =
        map.iter().filter_map(|e| e.ok()).filter(|(_, t)| t.kind == NAT_DST).collect();
    let traffic = read_traffic(pins)?;
    // By address, as `expire` finds a translation's gateway.
    let on = |addresses: &[IpAddr]| -> (Vec<(IpAddr, usize)>, usize) {
        let mine: Vec<_> = claims.iter().filter(|(k, _)| addresses.contains(&claimed(k))).collect();
        // Distinct ports: one serves a translation per destination (endpoint-dependent
        // mapping), and counted per translation it could pass the range's size.
        let ports = addresses
            .iter()
            .map(|a| {
                let on_a = mine.iter().filter(|(k, _)| claimed(k) == *a);
                (*a, on_a.map(|(k, _)| k.dport).collect::<std::collections::HashSet<_>>().len())
            })
            .collect();
        (ports, mine.iter().filter(|(_, t)| t.state == NAT_ACTIVE).count())
    };
    let mut reports = record
        .nat_gateways
        .iter()
        .enumerate()
        .map(|(i, (name, public_addresses))| {
            let (addresses, translations) = on(public_addresses);
            Ok(GatewayReport {
                name: Some(name.clone()),
                addresses,
                translations,
                created: created
                    .as_ref()
                    .and_then(|c| c.get(&(i as u32), 0).ok())
                    .map(|v| v.iter().sum()),
                failed_allocations: failures.get(&(i as u32), 0)?.iter().sum(),
                ports_per_address: configs.get(&(i as u32), 0).map_or(0, |c| {
                    if c.port_hi >= c.port_lo { u32::from(c.port_hi - c.port_lo) + 1 } else { 0 }
                }),
                traffic: traffic.as_ref().and_then(|t| t.get(i).cloned()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let owned = |a: &IpAddr| record.nat_gateways.iter().any(|(_, mine)| mine.contains(a));
    let mut orphaned: Vec<IpAddr> =
        claims.iter().map(|(k, _)| claimed(k)).filter(|a| !owned(a)).collect();
    orphaned.sort();
    orphaned.dedup();
    if !orphaned.is_empty() {
        let (addresses, translations) = on(&orphaned);
        reports.push(GatewayReport {
            name: None,
            addresses,
            translations,
            created: None,
            failed_allocations: 0,
            ports_per_address: 0,
            traffic: None,
        });
    }
    Ok(reports)
}
