//! The flow table read as flows (what `xdpgate flows` shows).
//!
//! The dataplane keeps one `FLOWS` entry per direction of each flow; here the two are paired
//! again and described as the flow's first packet saw it, with the rule that decided it (named
//! from the applied policy), its NAT or load-balancer backend, and traffic each way.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use serde::Serialize;
use xdpgate_common::{
    flow::{FlowKey, FlowValue, NAT_DST, NAT_NEXT_HOP, NAT_SRC, NO_RULE},
    lb::NO_BACKEND,
    maps::{FLOW_ENTRIES, FLOWS},
    nsg::{DIR_OUTBOUND, MAX_RULES, PolicyConfig, TABLES_PER_SLOT},
};

use xdpgate_policy::{
    Layer,
    names::{Record, ServiceName},
};

use crate::{PinDir, apply, monotonic_ns, state, stats::Traffic};

/// Keys a walk of the flow table reads at most: it gives up on a walk that keeps restarting
/// (entries removed under it). Four times the pinned table's size.
fn max_walk(pins: &PinDir) -> usize {
    let entries = crate::tables::pinned_entries(pins, FLOWS).ok().flatten();
    4 * entries.unwrap_or(FLOW_ENTRIES) as usize
}

/// One flow as its first packet arrived.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Flow {
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    pub src: IpAddr,
    /// Ports of TCP and UDP flows.
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: Option<u16>,
    /// Identifier of an ICMP echo flow.
    pub icmp_id: Option<u16>,
    /// `inbound` (arrived on an external interface) or `outbound`.
    pub direction: &'static str,
    /// Policy generation that decided the flow.
    pub generation: u64,
    /// NSG and rule that decided the flow (of the last layer that had an NSG); none when no
    /// NSG applied, or when the flow was decided by an earlier policy than the applied one.
    pub nsg: Option<String>,
    pub rule: Option<String>,
    pub layer: Option<Layer>,
    /// Global rule index (`table * 4096 + bit`) as the dataplane recorded it.
    pub rule_index: Option<u32>,
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
    /// Only one direction's entry is in the table (the other was evicted).
    pub incomplete: bool,
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

    fn has_ports(&self) -> bool {
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
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        let nat_addr = f.nat.as_ref().map(|n| n.address);
        let nat_port = f.nat.as_ref().and_then(|n| n.port);
        self.addr.is_none_or(|a| f.src == a || f.dst == a || nat_addr == Some(a))
            && self.port.is_none_or(|p| {
                f.has_ports()
                    && (f.src_port == Some(p) || f.dst_port == Some(p) || nat_port == Some(p))
            })
            && self.rule.as_ref().is_none_or(|want| match (&f.nsg, &f.rule) {
                (Some(nsg), Some(rule)) => {
                    rule == want || want.split_once('/').is_some_and(|(n, r)| n == nsg && r == rule)
                }
                _ => false,
            })
    }
}

/// Entries in the flow table.
pub fn count(pins: &PinDir) -> Result<u64> {
    let map: BpfHashMap<MapData, FlowKey, FlowValue> = pins.open_map(FLOWS)?.try_into()?;
    let max_walk = max_walk(pins);
    let mut seen = HashSet::new();
    for (i, key) in map.keys().enumerate() {
        if i >= max_walk {
            break;
        }
        seen.insert(key?);
    }
    Ok(seen.len() as u64)
}

/// Every entry of the flow table.
fn entries(pins: &PinDir) -> Result<HashMap<FlowKey, FlowValue>> {
    let map: BpfHashMap<MapData, FlowKey, FlowValue> = pins.open_map(FLOWS)?.try_into()?;
    let max_walk = max_walk(pins);
    let mut out = HashMap::new();
    for (i, key) in map.keys().enumerate() {
        if i >= max_walk {
            break;
        }
        let key = key?;
        // Gone since the walk found it: skip.
        if let Ok(v) = map.get(&key, 0) {
            out.insert(key, v);
        }
    }
    Ok(out)
}

/// A `FlowKey` address (network-order bytes in words).
pub fn addr(words: &[u32; 4], family: u8) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if family == 6 { IpAddr::from(b) } else { IpAddr::from([b[0], b[1], b[2], b[3]]) }
}

fn protocol_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// What names the numbers in flow entries: the records of the running generation and of
/// the ones before it (a flow keeps the generation that decided it until its next packet).
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

    /// NSG, rule and layer of a global rule index recorded under `generation`.
    pub fn rule(&self, index: u32, generation: u64) -> Option<(String, String, Layer)> {
        if index == NO_RULE {
            return None;
        }
        let record = self.records.iter().find(|r| r.generation == generation)?;
        let (table, bit) = (index / MAX_RULES, index % MAX_RULES);
        // The index names a table of the slot that generation was written to.
        if table / TABLES_PER_SLOT != record.slot {
            return None;
        }
        let r = record.tables.get((table % TABLES_PER_SLOT) as usize)?.get(bit as usize)?;
        Some((r.nsg.clone(), r.rule.clone(), r.layer))
    }

    /// The running generation's load-balancing service (load balancer, rule) and backend
    /// address, by id.
    fn service(&self, id: u32) -> Option<&ServiceName> {
        self.records.first()?.services.get(id as usize)
    }

    fn backend(&self, id: u32) -> Option<IpAddr> {
        self.records.first()?.backends.get(id as usize).copied()
    }

    pub fn timeout_ns(&self, proto: u8, tcp: u8, rule_idle_s: u16) -> u64 {
        self.config.idle_timeout_ns(proto, tcp, rule_idle_s)
    }
}

/// Removes flows idle past their timeout from the flow table; returns each one's key and
/// entries (forward, and reply when present). The dataplane already treats them as gone;
/// this frees the entries and lets the flow log show their end.
pub fn remove_idle(
    pins: &PinDir,
    names: &Names,
) -> Result<Vec<(FlowKey, FlowValue, Option<FlowValue>)>> {
    let mut map: BpfHashMap<MapData, FlowKey, FlowValue> = pins.open_map(FLOWS)?.try_into()?;
    let now = monotonic_ns();
    let keys: Vec<FlowKey> = map.keys().filter_map(|k| k.ok()).collect();
    let mut out = Vec::new();
    for key in keys {
        let Ok(fwd) = map.get(&key, 0) else { continue };
        if fwd.reply != 0 {
            continue;
        }
        let twin = key.twin(&fwd);
        let back = map.get(&twin, 0).ok();
        let last = fwd.last_seen_ns.max(back.map_or(0, |b| b.last_seen_ns));
        let closed = fwd.tcp | back.map_or(0, |b| b.tcp);
        if now.saturating_sub(last) <= names.timeout_ns(key.proto, closed, fwd.idle_s) {
            continue;
        }
        let _ = map.remove(&key);
        let _ = map.remove(&twin);
        out.push((key, fwd, back));
    }
    Ok(out)
}

/// Pairs the two entries of each flow. `forward` is the entry of the first packet's
/// direction when present.
fn pair(
    entries: &HashMap<FlowKey, FlowValue>,
) -> Vec<(FlowKey, Option<FlowValue>, Option<FlowValue>)> {
    let mut used: HashSet<FlowKey> = HashSet::new();
    let mut out = Vec::new();
    for (key, value) in entries.iter().filter(|(_, v)| v.reply == 0) {
        let back = key.twin(value);
        let reply = entries.get(&back).filter(|v| v.reply != 0).copied();
        if reply.is_some() {
            used.insert(back);
        }
        out.push((*key, Some(*value), reply));
    }
    for (key, value) in entries.iter().filter(|(k, v)| v.reply != 0 && !used.contains(k)) {
        // A reply entry alone: its twin is the key of the first packet's direction.
        out.push((key.twin(value), None, Some(*value)));
    }
    out
}

fn describe(
    names: &Names,
    now: u64,
    key: FlowKey,
    forward: Option<FlowValue>,
    reply: Option<FlowValue>,
) -> Flow {
    let main = forward.or(reply).expect("a flow has an entry");
    let ports = has_ports(key.proto);
    let icmp_echo = matches!(key.proto, 1 | 58);
    let traffic = |v: Option<FlowValue>| {
        v.map_or_else(Traffic::default, |v| Traffic { packets: v.packets, bytes: v.bytes })
    };
    let last_seen = forward.iter().chain(reply.iter()).map(|v| v.last_seen_ns).max().unwrap_or(0);
    let idle_ns = now.saturating_sub(last_seen);
    let tcp = forward.iter().chain(reply.iter()).fold(0, |a, v| a | v.tcp);
    let resolved = names.rule(main.rule, main.generation);
    // The rewrite lives in the forward entry (a lone reply entry still names a load
    // balancer's backend by index).
    let nat = forward.and_then(|f| {
        let kind = match f.nat {
            NAT_DST => "dnat",
            NAT_NEXT_HOP => "floating_ip",
            NAT_SRC => "snat",
            _ => return None,
        };
        Some(Nat {
            kind,
            address: addr(&f.nat_addr, key.family),
            port: (ports && f.nat != NAT_NEXT_HOP).then_some(f.nat_port),
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
        protocol: protocol_name(key.proto),
        src: addr(&key.src, key.family),
        src_port: ports.then_some(key.sport),
        dst: addr(&key.dst, key.family),
        dst_port: ports.then_some(key.dport),
        icmp_id: icmp_echo.then_some(key.sport),
        direction: if u32::from(main.direction) == DIR_OUTBOUND { "outbound" } else { "inbound" },
        generation: main.generation,
        nsg: resolved.as_ref().map(|r| r.0.clone()),
        rule: resolved.as_ref().map(|r| r.1.clone()),
        layer: resolved.map(|r| r.2),
        rule_index: (main.rule != NO_RULE).then_some(main.rule),
        nat,
        load_balancer,
        forward: traffic(forward),
        reply: traffic(reply),
        idle_seconds: idle_ns as f64 / 1e9,
        expired: idle_ns > names.timeout_ns(key.proto, tcp, main.idle_s),
        incomplete: forward.is_none() || reply.is_none(),
    }
}

/// The flows matching `filter`, most bytes first; at most `top` of them (0: all).
pub fn list(pins: &PinDir, filter: &Filter, top: usize) -> Result<Vec<Flow>> {
    let names = Names::read(pins)?;
    let entries = entries(pins)?;
    let now = monotonic_ns();
    let mut flows: Vec<Flow> = pair(&entries)
        .into_iter()
        .map(|(k, f, r)| describe(&names, now, k, f, r))
        .filter(|f| filter.matches(f))
        .collect();
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

#[cfg(test)]
mod tests {
    use xdpgate_common::{nsg::DIR_INBOUND, words};

    use super::*;
    use xdpgate_policy::{self as policy, compile, lb};

    fn v4(a: [u8; 4]) -> [u32; 4] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a);
        words(&b)
    }

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey { src: v4(src), dst: v4(dst), sport, dport, proto: 6, family: 4, _pad: [0; 2] }
    }

    fn value(reply: u8, packets: u64) -> FlowValue {
        FlowValue {
            generation: 1,
            packets,
            bytes: packets * 100,
            rule: NO_RULE,
            direction: DIR_INBOUND as u8,
            reply,
            service: NO_BACKEND,
            backend: NO_BACKEND,
            ..Default::default()
        }
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
        let mut entries = HashMap::new();
        // A plain flow: client -> server:80 and its reply.
        entries.insert(key(client, 40000, backend, 80), value(0, 5));
        entries.insert(key(backend, 80, client, 40000), value(1, 4));
        // A load-balanced flow: client -> frontend:8080, DNAT to backend:8080.
        let mut fwd = value(0, 3);
        fwd.nat = NAT_DST;
        fwd.nat_addr = v4(backend);
        fwd.nat_port = 8080;
        entries.insert(key(client, 40001, frontend, 8080), fwd);
        let mut back = value(1, 2);
        back.nat = NAT_SRC;
        back.nat_addr = v4(frontend);
        back.nat_port = 8080;
        entries.insert(key(backend, 8080, client, 40001), back);
        // The reply of a flow whose forward entry was evicted.
        entries.insert(key(backend, 80, client, 40002), value(1, 1));

        let mut flows = pair(&entries);
        flows.sort_by_key(|(k, _, _)| k.sport);
        assert_eq!(flows.len(), 3);
        assert_eq!(flows[0].0, key(client, 40000, backend, 80));
        assert_eq!((flows[0].1.unwrap().packets, flows[0].2.unwrap().packets), (5, 4));
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
    fn rules_are_named_by_the_generation_and_slot_that_decided() {
        let names = names();
        // Inbound subnet table of slot 1 is table 4; bit 0 is the highest-priority rule.
        let index = TABLES_PER_SLOT * MAX_RULES;
        let (nsg, rule, layer) = names.rule(index, 3).expect("named");
        assert_eq!((nsg.as_str(), rule.as_str(), layer), ("web", "allow-web", Layer::Subnet));
        assert!(names.rule(index, 1).is_some(), "a kept older generation keeps its names");
        assert!(names.rule(index, 2).is_none(), "a generation without a record is not guessed");
        assert!(names.rule(0, 3).is_none(), "a table of the other slot");
        assert!(names.rule(NO_RULE, 3).is_none());
    }

    #[test]
    fn flows_are_described_and_filtered() {
        let names = names();
        let mut fwd = value(0, 5);
        fwd.generation = 3;
        fwd.rule = TABLES_PER_SLOT * MAX_RULES;
        fwd.last_seen_ns = 1_000_000_000;
        let mut back = value(1, 4);
        back.generation = 3;
        back.last_seen_ns = 2_000_000_000;
        let k = key([203, 0, 113, 10], 40000, [198, 51, 100, 10], 80);
        let f = describe(&names, 4_500_000_000, k, Some(fwd), Some(back));
        assert_eq!(f.rule.as_deref(), Some("allow-web"));
        assert_eq!((f.forward.packets, f.reply.bytes), (5, 400));
        assert!((f.idle_seconds - 2.5).abs() < 1e-9 && !f.expired && !f.incomplete);
        let some = |addr: Option<&str>, port, rule: Option<&str>| Filter {
            addr: addr.map(|a| a.parse().unwrap()),
            port,
            rule: rule.map(str::to_string),
        };
        assert!(some(Some("198.51.100.10"), Some(80), Some("allow-web")).matches(&f));
        assert!(some(Some("203.0.113.10"), Some(40000), Some("web/allow-web")).matches(&f));
        assert!(!some(Some("203.0.113.11"), None, None).matches(&f));
        assert!(!some(None, Some(81), None).matches(&f));
        assert!(!some(None, None, Some("deny-ssh")).matches(&f));
        assert!(!some(None, None, Some("other/allow-web")).matches(&f));
    }
}
