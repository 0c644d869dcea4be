//! The flow tables read as flows (what `xdpgate flows` shows), and the agent's sweep of idle
//! established flows. Deleting flows is `delete`'s (it ends NAT translations too).
//!
//! The dataplane keeps one entry per direction of each flow, in `FLOWS` once the flow is
//! established and in `EMBRYOS` until then; here the two are paired again and described as
//! the flow's first packet saw it, with the rule that decided it (named from the applied
//! policy), its NAT or load-balancer backend, and traffic each way.

use std::{
    collections::HashMap,
    net::IpAddr,
    str::FromStr,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use serde::Serialize;
use xdpgate_common::{
    flow::{
        FlowKey, FlowValue, IcmpFlow, NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_SRC, NO_RULE,
        TCP_CLOSED, TCP_FIN,
    },
    is_icmp,
    lb::NO_BACKEND,
    maps::{EMBRYOS, FLOWS, NAT_MAP},
    nat::NatEntry,
    nsg::{DIR_INBOUND, DIR_OUTBOUND, MAX_RULES, PolicyConfig, TABLES_PER_SLOT},
};

use xdpgate_policy::{
    Layer,
    names::{Record, ServiceName},
};

use crate::{PinDir, apply, counts::Traffic, monotonic_ns, state, table};

/// Where a flow is in its life, and so in which table.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// Not confirmed yet (TCP: no handshake seen through; UDP and ICMP: no reply yet, or a
    /// lone exchange: no packet since the reply), in `EMBRYOS`: a flood of new flows evicts
    /// these first.
    Embryonic,
    /// Confirmed, but the full established table had no room for it: judged as established,
    /// it waits in `EMBRYOS` (marked `ASSURED`), where a flood can still push it out.
    Assured,
    /// Confirmed, in `FLOWS`.
    Established,
}

impl FlowState {
    pub fn name(self) -> &'static str {
        match self {
            FlowState::Embryonic => "embryonic",
            FlowState::Assured => "assured",
            FlowState::Established => "established",
        }
    }

    /// Whether the flow's entries are in `EMBRYOS` (else `FLOWS`).
    pub(crate) fn in_embryos(self) -> bool {
        self != FlowState::Established
    }

    /// The state of a flow whose entries are in `EMBRYOS`.
    fn of_embryo(forward: Option<FlowValue>, reply: Option<FlowValue>) -> FlowState {
        if forward.iter().chain(reply.iter()).any(FlowValue::assured) {
            FlowState::Assured
        } else {
            FlowState::Embryonic
        }
    }
}

impl FromStr for FlowState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embryonic" => Ok(FlowState::Embryonic),
            "assured" => Ok(FlowState::Assured),
            "established" => Ok(FlowState::Established),
            _ => Err(format!("{s:?} is not a flow state (embryonic, assured or established)")),
        }
    }
}

/// One flow as its first packet arrived.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Flow {
    pub state: FlowState,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    pub src: IpAddr,
    /// Ports of TCP and UDP flows.
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: Option<u16>,
    /// Identifier of an ICMP echo flow.
    pub icmp_id: Option<u16>,
    /// The kind of another ICMP flow (`FlowKey::icmp_flow`): its request's type (13, a
    /// timestamp request, for the request and its reply), or its own message's type for a
    /// message that has no answer.
    pub icmp_type: Option<u8>,
    /// `inbound` (arrived on an external interface) or `outbound`.
    pub direction: &'static str,
    /// Policy generation that decided the flow.
    pub generation: u64,
    /// NSG and rule that decided the flow (of the last layer that had an NSG: the
    /// destination's when an NSG applied there, else the source's); none when no NSG
    /// applied, or when the names of the generation that decided it are gone.
    pub nsg: Option<String>,
    pub rule: Option<String>,
    pub layer: Option<Layer>,
    /// Global rule index (`table * 4096 + bit`) of that rule as the dataplane recorded it.
    pub rule_index: Option<u16>,
    /// The deciding rule of each side: a flow between two protected addresses (east-west)
    /// passed both.
    pub rules: SideRules,
    /// Rewrite of the flow's first-direction packets: load balancing (`dnat` to the
    /// backend), direct server return (`floating_ip`: forwarded to the backend unchanged),
    /// or a NAT gateway (`snat` to its public address and port).
    pub nat: Option<Nat>,
    pub load_balancer: Option<LbFlow>,
    /// Traffic in the first packet's direction, and back.
    pub forward: Traffic,
    pub reply: Traffic,
    /// Seconds since the last packet either way.
    pub idle_seconds: f64,
    /// Idle past its timeout: the next packet starts a new flow.
    pub expired: bool,
    /// Only one direction's entry is in the table (the other was evicted, or replaced by a
    /// newer flow's). Not a TCP flow that waits with one entry until confirmed.
    pub incomplete: bool,
    /// A TCP flow's close as the dataplane tracks it: `open`, `closing` (a FIN one way) or
    /// `closed` (FINs both ways, or a reset; its entries linger 10 s); none for others.
    pub tcp_state: Option<&'static str>,
}

/// A rule as the generation that decided a flow names it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleName {
    pub nsg: String,
    pub rule: String,
    pub layer: Layer,
}

/// The rule that decided each side of a flow: the source's outbound layers and the
/// destination's inbound layers; none where no NSG applied (or its names are gone).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SideRules {
    pub outbound: Option<RuleName>,
    pub inbound: Option<RuleName>,
}

impl SideRules {
    /// The rule that decided last: the destination's, else the source's.
    pub fn deciding(&self) -> Option<&RuleName> {
        self.inbound.as_ref().or(self.outbound.as_ref())
    }
}

/// The global rule index that decided last among a flow's `rules` (see [`SideRules::deciding`]).
pub fn deciding_index(rules: [u16; 2]) -> Option<u16> {
    [rules[DIR_INBOUND as usize], rules[DIR_OUTBOUND as usize]].into_iter().find(|&r| r != NO_RULE)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Nat {
    pub kind: &'static str,
    pub address: IpAddr,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LbFlow {
    pub name: Option<String>,
    pub rule: Option<String>,
    pub backend: Option<IpAddr>,
}

impl Flow {
    pub fn bytes(&self) -> u64 {
        self.forward.bytes + self.reply.bytes
    }

    pub fn packets(&self) -> u64 {
        self.forward.packets + self.reply.packets
    }

    /// Whether the flow's protocol has ports (`has_ports`): else a rewrite's `port` is an
    /// echo's identifier, no port.
    pub fn has_ports(&self) -> bool {
        self.src_port.is_some()
    }
}

/// Which flows to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Either end (the backend of a load-balanced flow counts as an end).
    pub addr: Option<IpAddr>,
    /// Either end's port, as for `addr`.
    pub port: Option<u16>,
    /// Rule name, or `NSG/RULE`.
    pub rule: Option<String>,
    pub state: Option<FlowState>,
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        let nat_addr = f.nat.as_ref().map(|n| n.address);
        let nat_port = f.nat.as_ref().and_then(|n| n.port);
        self.state.is_none_or(|s| f.state == s)
            && self.addr.is_none_or(|a| f.src == a || f.dst == a || nat_addr == Some(a))
            && self.port.is_none_or(|p| {
                f.has_ports()
                    && (f.src_port == Some(p) || f.dst_port == Some(p) || nat_port == Some(p))
            })
            && self.rule.as_ref().is_none_or(|want| {
                [&f.rules.outbound, &f.rules.inbound].into_iter().flatten().any(|r| {
                    &r.rule == want
                        || want.split_once('/').is_some_and(|(n, x)| n == r.nsg && x == r.rule)
                })
            })
    }
}

pub(crate) fn open(pins: &PinDir, name: &str) -> Result<BpfHashMap<MapData, FlowKey, FlowValue>> {
    Ok(pins.open_map(name)?.try_into()?)
}

/// Entries in the table of established flows (`FLOWS`: one per direction of each flow).
pub fn count(pins: &PinDir) -> Result<u64> {
    table::count(&open(pins, FLOWS)?)
}

/// Every entry of a flow table, read once and sorted by key: found by binary search, in
/// less than half the memory of a hash map of them (a million flows' two million entries
/// take about 275 MiB).
#[derive(Default)]
struct Entries(Vec<(FlowKey, FlowValue)>);

impl Entries {
    fn read(pins: &PinDir, name: &str) -> Result<Self> {
        Self::read_where(pins, name, |_| true)
    }

    /// The entries of table `name` that `keep` keeps.
    fn read_where(pins: &PinDir, name: &str, keep: impl Fn(&FlowValue) -> bool) -> Result<Self> {
        let mut all = Vec::new();
        table::for_each(&open(pins, name)?, |k, v| {
            if keep(v) {
                all.push((*k, *v));
            }
            Ok(())
        })?;
        Ok(Self::of(all))
    }

    fn of(mut all: Vec<(FlowKey, FlowValue)>) -> Self {
        // A walk that races the dataplane's inserts and removals may meet a key twice: the
        // entry last used is kept (first of its key).
        all.sort_unstable_by(|(a, x), (b, y)| a.cmp(b).then(y.last_seen_ns.cmp(&x.last_seen_ns)));
        all.dedup_by_key(|(k, _)| *k);
        Self(all)
    }

    /// The index and value of `key`'s entry.
    fn find(&self, key: &FlowKey) -> Option<(usize, &FlowValue)> {
        let i = self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some((i, &self.0[i].1))
    }

    fn contains(&self, key: &FlowKey) -> bool {
        self.find(key).is_some()
    }

    fn iter(&self) -> impl Iterator<Item = &(FlowKey, FlowValue)> {
        self.0.iter()
    }
}

/// A `FlowKey` address (network-order bytes in words).
pub fn addr(words: &[u32; 4], family: u8) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if family == 6 { IpAddr::from(b) } else { IpAddr::from([b[0], b[1], b[2], b[3]]) }
}

/// A protocol as the views name it: tcp, udp, icmp (icmpv6 in IPv6), esp, ah, sctp, or its
/// number.
pub fn protocol_name(family: u8, proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        // The other family's ICMP number is a plain protocol, named by its number.
        p if is_icmp(family, p) => if family == 6 { "icmpv6" } else { "icmp" }.into(),
        50 => "esp".into(),
        51 => "ah".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Whether the dataplane reads the ports of `proto`'s packets: TCP's and UDP's. Others'
/// (SCTP's among them) are 0 in their keys: their flows are kept by address alone.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17)
}

/// What names the numbers in flow entries: the records of the running generation and of
/// the ones before it (a flow keeps the generation that decided it until its next packet).
#[derive(Clone)]
pub struct Names {
    config: PolicyConfig,
    /// Newest first.
    records: Vec<Record>,
}

impl Names {
    pub fn read(pins: &PinDir) -> Result<Self> {
        let (_, config) = apply::active(pins)?;
        Ok(Self { config, records: state::recent(pins, config.generation)? })
    }

    /// The rule of a global rule index recorded under `generation` for side `dir`
    /// (`DIR_*`).
    pub fn rule(&self, index: u16, generation: u64, dir: u32) -> Option<RuleName> {
        if index == NO_RULE {
            return None;
        }
        let record = self.records.iter().find(|r| r.generation == generation)?;
        let (table, bit) = (u32::from(index) / MAX_RULES, u32::from(index) % MAX_RULES);
        // The index names a table of that side in the slot that generation was written to.
        let t = table % TABLES_PER_SLOT;
        if table / TABLES_PER_SLOT != record.slot || t / 2 != dir {
            return None;
        }
        let r = record.tables.get(t as usize)?.get(bit as usize)?;
        Some(RuleName { nsg: r.nsg.clone(), rule: r.rule.clone(), layer: r.layer })
    }

    /// Every rule of the kept generations (a rule twice when several have it).
    pub fn all_rules(&self) -> impl Iterator<Item = &xdpgate_policy::names::RuleName> {
        self.records.iter().flat_map(|r| r.tables.iter().flatten())
    }

    /// The running generation when these names were read.
    pub fn generation(&self) -> u64 {
        self.config.generation
    }

    /// The records read, newest first.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The rules of both sides of a flow decided under `generation`.
    pub fn rules(&self, rules: [u16; 2], generation: u64) -> SideRules {
        let side = |dir: u32| self.rule(rules[dir as usize], generation, dir);
        SideRules { outbound: side(DIR_OUTBOUND), inbound: side(DIR_INBOUND) }
    }

    /// The running generation's load-balancing service (load balancer, rule) and backend
    /// address, by id.
    pub fn service(&self, id: u32) -> Option<&ServiceName> {
        self.records.first()?.services.get(id as usize)
    }

    pub fn backend(&self, id: u32) -> Option<IpAddr> {
        self.records.first()?.backends.get(id as usize).copied()
    }

    /// Idle timeout of an established flow's entry.
    pub fn timeout_ns(&self, family: u8, proto: u8, tcp: u8, rule_idle_s: u16) -> u64 {
        self.config.idle_timeout_ns(family, proto, tcp, rule_idle_s)
    }

    /// Idle timeout of an embryonic flow's entry (`settings.embryonic_timeout`, or the
    /// idle timeout of a flow whose answers bypass the gateway).
    pub fn embryo_timeout_ns(&self, family: u8, proto: u8, entry: &FlowValue) -> u64 {
        self.config.embryo_timeout_ns(family, proto, entry)
    }
}

/// A flow's entries in the established table as one read found them (the sweep's, as it
/// removed the flow, or a walk's): the key of its first packet's direction and each
/// direction's entry. Either may be missing: the read fell between the two inserts or the
/// two removals of the flow's entries, or one was gone for another reason.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowEntries {
    pub key: FlowKey,
    pub forward: Option<FlowValue>,
    pub reply: Option<FlowValue>,
}

impl FlowEntries {
    /// The flow of `value` (under `key`) and its twin (under `twin_key`, if read).
    pub(crate) fn of(
        key: FlowKey,
        value: FlowValue,
        twin_key: FlowKey,
        twin: Option<FlowValue>,
    ) -> Self {
        match (value.reply, twin) {
            (0, _) => Self { key, forward: Some(value), reply: twin },
            (_, Some(t)) if t.reply == 0 => {
                Self { key: twin_key, forward: Some(t), reply: Some(value) }
            }
            _ => Self { key: twin_key, forward: None, reply: Some(value) },
        }
    }

    /// The entry that names the flow's rule, direction and generation.
    pub fn main(&self) -> FlowValue {
        self.forward.or(self.reply).expect("a read flow has an entry")
    }

    /// The flow as `xdpgate flows` would have shown it last, but always `established`: an
    /// `assured` flow among them is judged as one (the flow log writes no state).
    pub fn describe(&self, names: &Names) -> Flow {
        describe(names, monotonic_ns(), FlowState::Established, self.key, self.forward, self.reply)
    }
}

/// What one pass of the sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Entries the pass looked at.
    pub seen: u64,
    /// Entries it removed.
    pub removed: u64,
}

/// Removes the established flows idle past their timeout from `FLOWS` (not LRU: nothing
/// else frees these entries), and the embryonic flows of other protocols than TCP that
/// were answered and are idle past theirs from `EMBRYOS` (a lone exchange, a DNS query and
/// its answer, is never confirmed: its end is written here, not left to the table's LRU,
/// which would lose it), as are the `ASSURED` ones (established flows waiting for room);
/// and hands each one to `on_end` (for the flow log). Setting `stop`,
/// or an error from `on_end`, ends the pass early. The dataplane already treats an idle
/// entry as gone (its next packet starts a new flow), so removing one changes no verdict.
///
/// An entry is removed once it and the other direction's entry are both idle (an entry
/// whose other direction is still used stays, so the flow is seen and logged whole); an
/// established entry alone, its other direction gone, once it is idle. The tables are read
/// in batches; each idle entry is read again, with its twin, just before it is removed, so
/// one that a packet used meanwhile stays. A flow through a NAT gateway stays while it has
/// a translation: the NAT expiry (`nat::expire`) removes the two together, and measures the
/// translation's idle time from these entries. A flow another remover took meanwhile is
/// not handed on (its end is not the sweep's). Cost: a bpf() call per 4,096 entries, and
/// four per removed flow.
pub fn remove_idle(
    pins: &PinDir,
    names: &Names,
    stop: &AtomicBool,
    mut on_end: impl FnMut(FlowEntries) -> Result<()>,
) -> Result<Swept> {
    crate::migrate::ensure_done(pins)?;
    let translations: BpfHashMap<MapData, FlowKey, NatEntry> =
        pins.open_map(NAT_MAP)?.try_into()?;
    // Either direction's tuple names a translation of a NAT gateway's flow (not a load
    // balancer's rewrite, which has no translation). A cooling one too: the NAT expiry
    // marks it so just before it removes the flow itself (and writes its end).
    let translated = |key: &FlowKey, v: &FlowValue| {
        v.service == NO_BACKEND
            && matches!(v.nat, NAT_SRC | NAT_DST)
            && translations.get(key, 0).is_ok()
    };
    let mut swept = Swept::default();
    // Lone exchanges ended (see `counts::add_ended_embryos`).
    let mut lone = 0;
    let now = monotonic_ns();
    let established = |key: &FlowKey, v: &FlowValue| {
        now.saturating_sub(v.last_seen_ns)
            > names.timeout_ns(key.family, key.proto, v.tcp, v.idle_s)
    };
    // The protocol first: a flood's TCP embryos are not read again one by one.
    let embryo = |key: &FlowKey, v: &FlowValue| {
        (lone_protocol(key.proto) || v.assured())
            && now.saturating_sub(v.last_seen_ns)
                > names.embryo_timeout_ns(key.family, key.proto, v)
    };
    let mut sweep = |name, idle: &dyn Fn(&FlowKey, &FlowValue) -> bool| -> Result<()> {
        let walk = open(pins, name)?;
        let mut map = open(pins, name)?;
        // An embryo is ended here only as a lone exchange or an `ASSURED` flow (an
        // established one waiting for room): one never answered (and TCP's) is left to
        // the table's LRU.
        let embryos = name == EMBRYOS;
        table::for_each(&walk, |key, seen| {
            if stop.load(Ordering::Relaxed) {
                bail!("stopped");
            }
            swept.seen += 1;
            if !idle(key, seen) {
                return Ok(());
            }
            // Read again: gone (removed with its twin earlier in this pass) or used since.
            let Ok(value) = map.get(key, 0) else { return Ok(()) };
            if !idle(key, &value) || translated(key, &value) {
                return Ok(());
            }
            let twin_key = key.twin(&value);
            let twin = map.get(&twin_key, 0).ok();
            if twin.is_some_and(|t| !idle(&twin_key, &t) || translated(&twin_key, &t)) {
                return Ok(());
            }
            let reply = if value.reply != 0 { Some(&value) } else { twin.as_ref() };
            let assured = value.assured();
            if embryos && !(twin.is_some() && (assured || lone_exchange(key.proto, reply))) {
                return Ok(());
            }
            let removed = u64::from(map.remove(key).is_ok())
                + u64::from(twin.is_some() && map.remove(&twin_key).is_ok());
            swept.removed += removed;
            // None: another remover (`flows delete`, the dataplane) took it, and its end.
            if removed == 0 {
                return Ok(());
            }
            lone += u64::from(embryos);
            on_end(FlowEntries::of(*key, value, twin_key, twin))
        })
    };
    let result = sweep(FLOWS, &established).and_then(|()| sweep(EMBRYOS, &embryo));
    // Counted however the pass ended: these embryos are gone.
    crate::counts::add_ended_embryos(pins, lone)?;
    result.map(|()| swept)
}

/// Whether an embryonic flow of protocol `proto`, whose reply entry is `reply`, is a lone
/// exchange: answered (its reply entry has a packet) and not TCP (whose answered, never
/// acknowledged handshake is a flood's, left to the table's LRU). The dataplane confirms
/// these only when they go on (`exchanged_again`), so the agent ends them once idle: the
/// sweep, or the NAT expiry with their translation.
pub(crate) fn lone_exchange(proto: u8, reply: Option<&FlowValue>) -> bool {
    lone_protocol(proto) && reply.is_some_and(|r| r.packets > 0)
}

/// Whether a flow of protocol `proto` can be a lone exchange ([`lone_exchange`]): not TCP.
pub(crate) fn lone_protocol(proto: u8) -> bool {
    proto != 6
}

/// Pairs the two entries of each flow, handing each to `each`: the key of the first
/// packet's direction, the entries, and the key the reply entry has (or would have).
/// `forward` is the entry of the first packet's direction when present.
fn pair(entries: &Entries, mut each: impl FnMut(Paired)) {
    // The reply entries paired with a forward one, by index.
    let mut used = vec![false; entries.0.len()];
    for (key, value) in entries.iter().filter(|(_, v)| v.reply == 0) {
        let back = key.twin(value);
        let reply = entries.find(&back).filter(|(_, v)| v.reply != 0);
        if let Some((i, _)) = reply {
            used[i] = true;
        }
        // A lone flow's answers are its reply direction's (see `TCP_LONE`).
        let answered = || {
            let mut r = FlowValue::default();
            value.reply_into(&mut r);
            (value.lone() && r.packets > 0).then_some(r)
        };
        each((*key, Some(*value), reply.map(|(_, v)| *v).or_else(answered), back));
    }
    for (i, (key, value)) in entries.iter().enumerate() {
        if value.reply != 0 && !used[i] {
            // A reply entry alone: its twin is the key of the first packet's direction.
            each((key.twin(value), None, Some(*value), *key));
        }
    }
}

/// A flow's first-direction key, its entries, and its reply entry's key.
type Paired = (FlowKey, Option<FlowValue>, Option<FlowValue>, FlowKey);

fn describe(
    names: &Names,
    now: u64,
    state: FlowState,
    key: FlowKey,
    forward: Option<FlowValue>,
    reply: Option<FlowValue>,
) -> Flow {
    let main = forward.or(reply).expect("a flow has an entry");
    let ports = has_ports(key.proto);
    let icmp = key.icmp_flow();
    let icmp_echo = matches!(icmp, Some(IcmpFlow::Echo(_)));
    let traffic = |v: Option<FlowValue>| v.as_ref().map(Traffic::from).unwrap_or_default();
    let (idle_ns, timeout) = idle(names, now, state, &key, forward, reply);
    let rules = names.rules(main.rules, main.generation);
    let resolved = rules.deciding().cloned();
    // The rewrite lives in the forward entry (a lone reply entry still names a load
    // balancer's backend by index).
    let nat = forward.and_then(|f| {
        let kind = match f.nat {
            NAT_DST => "dnat",
            NAT_NEXT_HOP => "floating_ip",
            NAT_ENCAP => "ipip",
            NAT_SRC => "snat",
            _ => return None,
        };
        Some(Nat {
            kind,
            address: addr(&f.nat_addr, key.family),
            // An echo flow's identifier stands for its port (a NAT gateway claims one).
            port: ((ports || icmp_echo) && f.nat != NAT_NEXT_HOP && f.nat != NAT_ENCAP)
                .then_some(f.nat_port),
        })
    });
    let load_balancer = (main.service != NO_BACKEND).then(|| {
        let spec = names.service(main.service);
        LbFlow {
            name: spec.map(|s| s.lb.clone()),
            rule: spec.map(|s| s.rule.clone()),
            backend: names.backend(main.backend).or_else(|| nat.as_ref().map(|n| n.address)),
        }
    });
    Flow {
        state,
        protocol: protocol_name(key.family, key.proto),
        src: addr(&key.src, key.family),
        src_port: ports.then_some(key.sport),
        dst: addr(&key.dst, key.family),
        dst_port: ports.then_some(key.dport),
        icmp_id: icmp.and_then(IcmpFlow::identifier),
        icmp_type: icmp.and_then(IcmpFlow::message_type),
        direction: if u32::from(main.direction) == DIR_OUTBOUND { "outbound" } else { "inbound" },
        generation: main.generation,
        nsg: resolved.as_ref().map(|r| r.nsg.clone()),
        rule: resolved.as_ref().map(|r| r.rule.clone()),
        layer: resolved.map(|r| r.layer),
        rule_index: deciding_index(main.rules),
        rules,
        nat,
        load_balancer,
        forward: traffic(forward),
        reply: traffic(reply),
        idle_seconds: idle_ns as f64 / 1e9,
        expired: idle_ns > timeout,
        // A lone flow (`TCP_LONE`) is whole with its one entry.
        incomplete: forward.is_none() || (reply.is_none() && !forward.is_some_and(|f| f.lone())),
        tcp_state: (key.proto == 6).then(|| {
            let tcp = tcp_flags(forward, reply);
            if tcp & TCP_CLOSED != 0 {
                "closed"
            } else if tcp & TCP_FIN != 0 {
                "closing"
            } else {
                "open"
            }
        }),
    }
}

/// How long a flow has been idle at `now`, and the timeout its entries give it (both ns):
/// past it, the next packet finds no flow, and the sweep removes it.
fn idle(
    names: &Names,
    now: u64,
    state: FlowState,
    key: &FlowKey,
    forward: Option<FlowValue>,
    reply: Option<FlowValue>,
) -> (u64, u64) {
    let main = forward.or(reply).expect("a flow has an entry");
    let last_seen = forward.iter().chain(reply.iter()).map(|v| v.last_seen_ns).max().unwrap_or(0);
    let tcp = tcp_flags(forward, reply);
    let timeout = if state.in_embryos() {
        names.embryo_timeout_ns(key.family, key.proto, &FlowValue { tcp, ..main })
    } else {
        names.timeout_ns(key.family, key.proto, tcp, main.idle_s)
    };
    (now.saturating_sub(last_seen), timeout)
}

/// The TCP state flags of a flow's entries together (either direction's FIN or close).
fn tcp_flags(forward: Option<FlowValue>, reply: Option<FlowValue>) -> u8 {
    forward.iter().chain(reply.iter()).fold(0, |a, v| a | v.tcp)
}

/// A flow as the tables hold it: the key of its first packet's direction and its entries,
/// with its description.
pub(crate) struct Held {
    pub(crate) key: FlowKey,
    pub(crate) reply_key: FlowKey,
    pub(crate) flow: Flow,
}

/// The flows in `state` (none: every state) for which `keep` holds, unordered. Each table is read
/// in one walk, the embryonic one first: a flow confirmed during the read (put into the
/// established table, then taken out of the embryonic one) is seen in both, and is then
/// taken once, as established. (Read the other way round, it could be missed in both.)
pub(crate) fn matching(
    pins: &PinDir,
    state: Option<FlowState>,
    keep: impl Fn(&Flow) -> bool,
) -> Result<Vec<Held>> {
    let names = Names::read(pins)?;
    let want = |s: FlowState| state.is_none_or(|f| f == s);
    let read = |table: bool, name| {
        if table { Entries::read(pins, name) } else { Ok(Entries::default()) }
    };
    let embryos = read(state.is_none_or(FlowState::in_embryos), EMBRYOS)?;
    let established = read(want(FlowState::Established), FLOWS)?;
    let now = monotonic_ns();
    let mut held = Vec::new();
    let mut hold = |state, (key, forward, reply, reply_key): Paired| {
        let flow = describe(&names, now, state, key, forward, reply);
        if keep(&flow) {
            held.push(Held { key, reply_key, flow });
        }
    };
    pair(&established, |p| hold(FlowState::Established, p));
    pair(&embryos, |p| {
        let state = FlowState::of_embryo(p.1, p.2);
        if want(state) && !established.contains(&p.0) {
            hold(state, p)
        }
    });
    Ok(held)
}

/// The flows matching `filter`, most bytes first; at most `top` of them (0: all).
pub fn list(pins: &PinDir, filter: &Filter, top: usize) -> Result<Vec<Flow>> {
    list_where(pins, filter.state, |f| filter.matches(f), top)
}

/// The flows in `state` (none: every state) for which `keep` holds, most bytes first; at most
/// `top` of them (0: all).
pub fn list_where(
    pins: &PinDir,
    state: Option<FlowState>,
    keep: impl Fn(&Flow) -> bool,
    top: usize,
) -> Result<Vec<Flow>> {
    let mut flows: Vec<Flow> = matching(pins, state, keep)?.into_iter().map(|h| h.flow).collect();
    flows.sort_by(|a, b| {
        b.bytes().cmp(&a.bytes()).then(b.packets().cmp(&a.packets())).then_with(|| {
            (a.src, a.src_port, a.dst, a.dst_port).cmp(&(b.src, b.src_port, b.dst, b.dst_port))
        })
    });
    if top > 0 {
        flows.truncate(top);
    }
    Ok(flows)
}

/// Flows per load-balancing service and backend (ids), counted once each (by the entry of
/// the first packet's direction): what `xdpgate lb` shows, without naming every flow.
/// Flows idle past their timeout are not counted: the next packet finds none, the sweep
/// removes them.
pub fn per_backend(pins: &PinDir) -> Result<HashMap<(u32, u32), u64>> {
    let names = Names::read(pins)?;
    let established = Entries::read(pins, FLOWS)?;
    let embryos = Entries::read(pins, EMBRYOS)?;
    let now = monotonic_ns();
    let mut out = HashMap::new();
    let mut count = |state, (key, forward, reply, _): Paired| {
        let (idle_ns, timeout) = idle(&names, now, state, &key, forward, reply);
        if let Some(v) = forward.filter(|v| v.service != NO_BACKEND && idle_ns <= timeout) {
            *out.entry((v.service, v.backend)).or_default() += 1;
        }
    };
    pair(&established, |p| count(FlowState::Established, p));
    pair(&embryos, |p| {
        if !established.contains(&p.0) {
            count(FlowState::of_embryo(p.1, p.2), p)
        }
    });
    Ok(out)
}

/// Every established flow's entries, handed to `each` one at a time (one walk of `FLOWS`,
/// then of `EMBRYOS` for the `ASSURED` flows, which wait there for room in it; for the flow
/// log's interim records). Only the tables' entries are held, not the flows.
pub fn established(pins: &PinDir, mut each: impl FnMut(FlowEntries)) -> Result<()> {
    pair(&Entries::read(pins, FLOWS)?, |(key, forward, reply, _)| {
        each(FlowEntries { key, forward, reply })
    });
    let assured = Entries::read_where(pins, EMBRYOS, FlowValue::assured)?;
    pair(&assured, |(key, forward, reply, _)| each(FlowEntries { key, forward, reply }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use xdpgate_common::{
        flow::{NAT_NONE, NO_RULES},
        words,
    };

    use super::*;

    #[test]
    fn icmp_is_named_in_its_own_family_only() {
        assert_eq!(protocol_name(4, 1), "icmp");
        assert_eq!(protocol_name(6, 58), "icmpv6");
        assert_eq!(protocol_name(4, 58), "58");
        assert_eq!(protocol_name(6, 1), "1");
        assert_eq!(protocol_name(6, 6), "tcp");
    }
    use xdpgate_policy::{self as policy, compile, lb};

    fn v4(a: [u8; 4]) -> [u32; 4] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a);
        words(&b)
    }

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey { src: v4(src), dst: v4(dst), sport, dport, proto: 6, family: 4, kind: 0, _pad: 0 }
    }

    fn value(reply: u8, packets: u64) -> FlowValue {
        FlowValue {
            generation: 1,
            packets,
            bytes: packets * 100,
            rules: NO_RULES,
            direction: DIR_INBOUND as u8,
            reply,
            service: NO_BACKEND,
            backend: NO_BACKEND,
            ..Default::default()
        }
    }

    #[test]
    fn an_ended_flow_is_told_from_its_first_packets_direction() {
        let (client, server) = ([203, 0, 113, 10], [198, 51, 100, 10]);
        let fwd_key = key(client, 40000, server, 80);
        let back_key = key(server, 80, client, 40000);
        let (fwd, back) = (value(0, 5), value(1, 4));
        // Found from either entry, the flow is the same.
        let want = FlowEntries { key: fwd_key, forward: Some(fwd), reply: Some(back) };
        assert_eq!(FlowEntries::of(fwd_key, fwd, back_key, Some(back)), want);
        assert_eq!(FlowEntries::of(back_key, back, fwd_key, Some(fwd)), want);
        // One entry alone.
        assert_eq!(
            FlowEntries::of(fwd_key, fwd, back_key, None),
            FlowEntries { key: fwd_key, forward: Some(fwd), reply: None }
        );
        let lone = FlowEntries::of(back_key, back, fwd_key, None);
        assert_eq!(lone, FlowEntries { key: fwd_key, forward: None, reply: Some(back) });
        assert_eq!(lone.main(), back);
    }

    #[test]
    fn states_parse_and_filter() {
        assert_eq!("embryonic".parse(), Ok(FlowState::Embryonic));
        assert_eq!("assured".parse(), Ok(FlowState::Assured));
        assert_eq!("established".parse(), Ok(FlowState::Established));
        let err = "syn_sent".parse::<FlowState>().unwrap_err();
        assert!(err.contains("embryonic, assured or established"), "{err}");
        let names = names();
        let k = key([203, 0, 113, 10], 40000, [198, 51, 100, 10], 80);
        let embryo = describe(&names, 2, FlowState::Embryonic, k, Some(value(0, 1)), None);
        let only = |state| Filter { state: Some(state), ..Default::default() };
        assert!(only(FlowState::Embryonic).matches(&embryo));
        assert!(!only(FlowState::Established).matches(&embryo));
        assert!(Filter::default().matches(&embryo));
    }

    #[test]
    fn embryos_expire_after_the_embryonic_timeout() {
        let mut names = names();
        names.config.embryonic_timeout_ns = 5_000_000_000;
        let k = key([203, 0, 113, 10], 40000, [198, 51, 100, 10], 80);
        let at = |state, now| describe(&names, now, state, k, Some(value(0, 1)), None).expired;
        // The TCP timeout is 60 s: 6 s idle is past an embryo's timeout only.
        assert!(at(FlowState::Embryonic, 6_000_000_000));
        assert!(!at(FlowState::Embryonic, 4_000_000_000));
        assert!(!at(FlowState::Established, 6_000_000_000));
        // A flow whose answers bypass the gateway stays embryonic for life: its idle
        // timeout (TCP's 60 s here) applies, whichever of its entries is left.
        let mut direct = value(0, 1);
        (direct.nat, direct.service, direct.backend) = (NAT_ENCAP, 0, 1);
        let mut reply = direct;
        (reply.reply, reply.nat) = (1, NAT_NONE);
        // Closed or not: the client's FIN is only a half close (the server's is never seen),
        // so a half-closed flow is not over 10 s later (an entry of an older dataplane may
        // say closed).
        let mut closed = direct;
        closed.tcp = TCP_FIN | TCP_CLOSED;
        for (f, r) in
            [(Some(direct), Some(reply)), (None, Some(reply)), (Some(closed), Some(reply))]
        {
            let at = |now| describe(&names, now, FlowState::Embryonic, k, f, r).expired;
            assert!(!at(11_000_000_000) && at(61_000_000_000), "{f:?} {r:?}");
        }
    }

    /// A TCP flow's close as its entries record it, for `flows` (an outside review saw a
    /// closed connection shown as a live one until its entries went, 10 s later).
    #[test]
    fn a_tcp_flows_close_is_shown() {
        let names = names();
        let k = key([203, 0, 113, 10], 40000, [198, 51, 100, 10], 80);
        let state = |tcp| {
            let mut v = value(1, 1);
            v.tcp = tcp;
            describe(&names, 2, FlowState::Established, k, Some(value(0, 1)), Some(v)).tcp_state
        };
        assert_eq!(state(0), Some("open"));
        assert_eq!(state(TCP_FIN), Some("closing"));
        assert_eq!(state(TCP_FIN | TCP_CLOSED), Some("closed"));
        assert_eq!(state(TCP_CLOSED), Some("closed"), "a reset");
        let udp = FlowKey { proto: 17, ..k };
        let v = Some(value(0, 1));
        assert_eq!(describe(&names, 2, FlowState::Established, udp, v, None).tcp_state, None);
    }

    /// A translated echo flow shows the identifier it has outside, as a port (an outside
    /// review found only the inside one, with no way to match an outside capture).
    #[test]
    fn a_translated_echo_flow_shows_its_outside_identifier() {
        let names = names();
        let k =
            FlowKey { proto: 1, dport: 0, ..key([198, 51, 100, 10], 14785, [203, 0, 113, 10], 0) };
        let mut v = value(0, 1);
        (v.nat, v.nat_addr, v.nat_port) = (NAT_SRC, v4([192, 0, 2, 100]), 27205);
        let flow = describe(&names, 2, FlowState::Established, k, Some(v), None);
        assert_eq!(flow.icmp_id, Some(14785));
        let nat = flow.nat.expect("translated");
        assert_eq!((nat.kind, nat.port), ("snat", Some(27205)));
    }

    /// A flow of another ICMP message shows its kind, not an identifier: a timestamp flow and
    /// a ping of identifier 0 to one peer looked alike (both `id 0`) before.
    #[test]
    fn an_icmp_flow_other_than_echo_shows_its_type() {
        let names = names();
        let ping = FlowKey {
            proto: 1,
            sport: 0,
            dport: 0,
            ..key([198, 51, 100, 10], 0, [203, 0, 113, 10], 0)
        };
        let v = Some(value(0, 1));
        let flow = describe(&names, 2, FlowState::Established, ping, v, None);
        assert_eq!((flow.icmp_id, flow.icmp_type), (Some(0), None));
        let timestamp = FlowKey { kind: 13, ..ping };
        let flow = describe(&names, 2, FlowState::Established, timestamp, v, None);
        assert_eq!((flow.icmp_id, flow.icmp_type), (None, Some(13)));
        // SCTP's ports are not read: shown as none, not as port 0 (until 2026-12-07).
        let sctp = FlowKey { proto: 132, ..key([198, 51, 100, 10], 0, [203, 0, 113, 10], 0) };
        let flow = describe(&names, 2, FlowState::Established, sctp, v, None);
        assert_eq!((flow.src_port, flow.dst_port, flow.icmp_id), (None, None, None));
        // ICMPv6's reserved type 0 is kept as kind 128, no echo's.
        let reserved = FlowKey { family: 6, proto: 58, kind: 128, ..ping };
        let flow = describe(&names, 2, FlowState::Established, reserved, v, None);
        assert_eq!((flow.icmp_id, flow.icmp_type), (None, Some(0)));
        let udp = FlowKey { proto: 17, ..ping };
        let flow = describe(&names, 2, FlowState::Established, udp, v, None);
        assert_eq!((flow.icmp_id, flow.icmp_type), (None, None));
    }

    #[test]
    fn addresses_round_trip_through_words() {
        assert_eq!(addr(&v4([203, 0, 113, 10]), 4), "203.0.113.10".parse::<IpAddr>().unwrap());
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(addr(&words(&v6.octets()), 6), IpAddr::V6(v6));
    }

    #[test]
    fn both_directions_pair_into_one_flow_and_a_lone_reply_is_reoriented() {
        let client = [203, 0, 113, 10];
        let (frontend, backend) = ([192, 0, 2, 10], [198, 51, 100, 10]);
        // A plain flow: client -> server:80 and its reply.
        let mut entries = vec![
            (key(client, 40000, backend, 80), value(0, 5)),
            (key(backend, 80, client, 40000), value(1, 4)),
        ];
        // A load-balanced flow: client -> frontend:8080, DNAT to backend:8080.
        let mut fwd = value(0, 3);
        fwd.nat = NAT_DST;
        fwd.nat_addr = v4(backend);
        fwd.nat_port = 8080;
        entries.push((key(client, 40001, frontend, 8080), fwd));
        let mut back = value(1, 2);
        back.nat = NAT_SRC;
        back.nat_addr = v4(frontend);
        back.nat_port = 8080;
        entries.push((key(backend, 8080, client, 40001), back));
        // The reply of a flow whose forward entry was evicted.
        entries.push((key(backend, 80, client, 40002), value(1, 1)));

        // Met twice by a walk that raced a change of the table: paired once, as last used.
        let mut used = entries[0];
        (used.1.packets, used.1.last_seen_ns) = (6, used.1.last_seen_ns + 1);
        entries.push(used);
        let mut flows = Vec::new();
        pair(&Entries::of(entries), |p| flows.push(p));
        flows.sort_by_key(|(k, _, _, _)| k.sport);
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[0].0, key(client, 40000, backend, 80));
        assert_eq!((flows[0].1.unwrap().packets, flows[0].2.unwrap().packets), (6, 4));
        assert_eq!(flows[1].0, key(client, 40001, frontend, 8080));
        assert_eq!(flows[1].2.unwrap().packets, 2);
        assert_eq!(flows[2].0, key(client, 40002, backend, 80));
        assert!(flows[2].1.is_none());
    }

    fn names() -> Names {
        let src = "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
                   subnets: [198.51.100.0/24]\n    rules:\n      - {name: allow-web, priority: 100, \
                   direction: inbound, access: allow, protocol: tcp, source: [Internet], \
                   destination: [\"*\"], destination_ports: [80]}\n";
        let policy = policy::load_str(src, "t.yaml").unwrap();
        let record = |generation, slot| {
            let lbs = lb::compile(&policy).unwrap();
            let tables = compile::compile(&policy).unwrap();
            let services = lb::service_names(&lbs);
            Record::new(generation, slot, src, &policy, &tables, services, lbs.backends)
        };
        Names {
            config: PolicyConfig {
                generation: 3,
                tcp_timeout_ns: 60_000_000_000,
                ..Default::default()
            },
            records: vec![record(3, 1), record(1, 1)],
        }
    }

    #[test]
    fn rules_are_named_by_the_generation_slot_and_side_that_decided() {
        let names = names();
        // Inbound subnet table of slot 1 is table 4; bit 0 is the highest-priority rule.
        let index = (TABLES_PER_SLOT * MAX_RULES) as u16;
        let r = names.rule(index, 3, DIR_INBOUND).expect("named");
        assert_eq!((r.nsg.as_str(), r.rule.as_str(), r.layer), ("web", "allow-web", Layer::Subnet));
        assert!(names.rule(index, 1, DIR_INBOUND).is_some(), "a kept older generation");
        assert!(names.rule(index, 2, DIR_INBOUND).is_none(), "a generation without a record");
        assert!(names.rule(0, 3, DIR_INBOUND).is_none(), "a table of the other slot");
        assert!(names.rule(index, 3, DIR_OUTBOUND).is_none(), "an inbound table is no source side");
        assert!(names.rule(NO_RULE, 3, DIR_INBOUND).is_none());
        // Outbound subnet table of slot 1 (table 6): the web NSG's AllowVnetOutBound etc.
        let out = (6 * MAX_RULES) as u16;
        let both = names.rules([index, out], 3);
        assert_eq!(both.inbound.as_ref().map(|r| r.rule.as_str()), Some("allow-web"));
        assert!(both.outbound.is_some());
        assert_eq!(both.deciding().map(|r| r.rule.as_str()), Some("allow-web"));
        assert_eq!(deciding_index([NO_RULE, out]), Some(out));
        assert_eq!(deciding_index([NO_RULE, NO_RULE]), None);
    }

    #[test]
    fn flows_are_described_and_filtered() {
        let names = names();
        let mut fwd = value(0, 5);
        fwd.generation = 3;
        fwd.rules = [(TABLES_PER_SLOT * MAX_RULES) as u16, NO_RULE];
        fwd.last_seen_ns = 1_000_000_000;
        let mut back = value(1, 4);
        back.generation = 3;
        back.last_seen_ns = 2_000_000_000;
        let k = key([203, 0, 113, 10], 40000, [198, 51, 100, 10], 80);
        let f = describe(&names, 4_500_000_000, FlowState::Established, k, Some(fwd), Some(back));
        assert_eq!(f.rule.as_deref(), Some("allow-web"));
        assert_eq!((f.forward.packets, f.reply.bytes), (5, 400));
        assert!((f.idle_seconds - 2.5).abs() < 1e-9 && !f.expired && !f.incomplete);
        let some = |addr: Option<&str>, port, rule: Option<&str>| Filter {
            addr: addr.map(|a| a.parse().unwrap()),
            port,
            rule: rule.map(str::to_string),
            state: None,
        };
        assert!(some(Some("198.51.100.10"), Some(80), Some("allow-web")).matches(&f));
        assert!(some(Some("203.0.113.10"), Some(40000), Some("web/allow-web")).matches(&f));
        assert!(!some(Some("203.0.113.11"), None, None).matches(&f));
        assert!(!some(None, Some(81), None).matches(&f));
        assert!(!some(None, None, Some("deny-ssh")).matches(&f));
        assert!(!some(None, None, Some("other/allow-web")).matches(&f));
    }
}
