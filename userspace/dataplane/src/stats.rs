//! Reading the dataplane's counters from their pins.

use std::collections::HashSet;

use anyhow::{Context, Result, anyhow};
use aya::maps::{HashMap, MapData, PerCpuArray};
use serde::Serialize;
use xdpgate_common::{
    events::{EVENTS_LOST, EVENTS_SUPPRESSED},
    flow::{
        FLOW_STAT_EMBRYOS_CLOSED, FLOW_STAT_EMBRYOS_CONFIRMED, FLOW_STAT_EMBRYOS_CREATED,
        FLOW_STAT_EMBRYOS_EXPIRED, FLOW_STAT_EMBRYOS_REFUSED, FLOW_STAT_PICKED_UP,
        FLOW_STAT_REBUILT, FlowKey, FlowValue,
    },
    iface::{IfaceConfig, Role},
    maps::{
        DROP_STATS, EARLIER_DROP_STATS, EGRESS_STATS, EMBRYOS, EVENT_STATS, FLOW_STATS, FLOWS,
        IFACE_STATS, IFACES, NSG_HITS, NSG_TRAFFIC,
    },
    nsg::{MAX_RULES, TABLES_PER_SLOT},
    stats::{
        Counter, DROP_REASON_NAMES, DROP_REASONS, EGRESS_VERDICT_NAMES, EGRESS_VERDICTS,
        VERDICT_NAMES, VERDICTS, egress_stat_index, iface_stat_index,
    },
};

use xdpgate_policy::{Direction, Layer};

use crate::{
    PinDir, apply, carried,
    counts::{DELETED, ENDED, Traffic, drops_by_reason, embryo_count},
    nat, state, table, tables,
};

/// `[(name, counter)]` as one JSON object keyed by name: JSON has no `[name, value]` pairs.
fn by_name<S: serde::Serializer, T: Serialize>(
    pairs: &[(&'static str, T)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(name, v)| (name, v)))
}

#[derive(Debug, Serialize)]
pub struct IfaceStats {
    /// Interface name, or `ifindex N` when it no longer exists; `(unregistered)` for slot 0.
    #[serde(rename = "interface")]
    pub iface: String,
    pub role: Option<&'static str>,
    /// Verdict name to traffic, every verdict listed.
    #[serde(serialize_with = "by_name")]
    pub verdicts: Vec<(&'static str, Traffic)>,
    /// The egress program's verdicts (`pass`, `drop`) on the packets the host itself sent
    /// out of the interface; forwarded packets are not counted here.
    #[serde(serialize_with = "by_name")]
    pub egress: Vec<(&'static str, Traffic)>,
}

impl IfaceStats {
    pub fn verdict(&self, name: &str) -> Traffic {
        self.verdicts.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).unwrap_or_default()
    }

    pub fn egress_verdict(&self, name: &str) -> Traffic {
        self.egress.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).unwrap_or_default()
    }
}

/// What one rule decided: flows (the packets the rules classify, one per flow), and the
/// packets and bytes of those flows, both ways, or the packets it denied.
#[derive(Debug, Serialize)]
pub struct RuleHits {
    pub nsg: String,
    pub rule: String,
    pub direction: Direction,
    pub layer: Layer,
    pub priority: u32,
    pub flows: u64,
    pub traffic: Traffic,
}

#[derive(Debug, Serialize)]
pub struct PolicyStats {
    pub generation: u64,
    pub rules: Vec<RuleHits>,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub interfaces: Vec<IfaceStats>,
    /// Drop reason to packets (JSON: `{"policy": {"packets": n}, ...}`).
    #[serde(serialize_with = "drops_by_reason")]
    pub drops: Vec<(&'static str, u64)>,
    /// Rule hits of the running policy, when one was applied.
    pub policy: Option<PolicyStats>,
    /// Flow events held back: denied-flow events over the rate limit, and events lost to a
    /// full ring buffer (no agent reading it, or one too slow).
    pub flow_events_rate_limited: u64,
    pub flow_events_lost: u64,
    pub flow_table: FlowTable,
    /// Each NAT gateway's packets and bytes translated each way and packets dropped.
    pub nat_gateways: Vec<nat::NamedTraffic>,
}

/// The flow tables: established flows (`FLOWS`) and embryonic ones (`EMBRYOS`).
#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct FlowTable {
    pub flows: EstablishedTable,
    pub embryonic: EmbryonicTable,
    /// Established flows rebuilt from a live NAT translation after their entries were gone.
    pub rebuilt: u64,
    /// TCP segments other than a SYN taken up as new flows (mid-stream pickup).
    pub picked_up: u64,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct EstablishedTable {
    /// Flows the table holds (two entries each).
    pub capacity: u64,
    /// Entries in it: one per direction of each flow.
    pub entries: u64,
}

/// Embryonic flows: how many the table holds and holds now, and how they ended.
#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct EmbryonicTable {
    /// Flows the table holds at two entries each (a lone TCP flow, `TCP_LONE`, takes one:
    /// twice as many of those fit).
    pub capacity: u64,
    /// Embryonic flows in the table now with both their entries, or lone with one.
    pub live: u64,
    /// Entries in the table (one per direction; an evicted flow may leave one behind).
    /// Shown in the metrics; `stats --json` keeps to the agreed fields.
    #[serde(skip)]
    pub entries: u64,
    pub created: u64,
    pub confirmed: u64,
    pub expired: u64,
    /// Flows the full established table had no room for as they were confirmed (`ASSURED`,
    /// each counted once): they wait in the embryonic table until there is room, so this is
    /// no outcome. (Builds before 2026-12-05 forgot such a flow; their refusals show as
    /// evicted here.)
    pub refused: u64,
    pub closed: u64,
    /// Removed by `xdpgate flows delete` with both their entries.
    pub deleted: u64,
    /// Pushed out of the table, wholly or by half, by newer embryonic flows: what was
    /// created and neither ended another way nor is still live. Derived, so it can be off by the flows created or ended
    /// while the table was read.
    pub evicted: u64,
}

impl EmbryonicTable {
    /// Fills in `evicted` from the others.
    fn derive_evicted(mut self) -> Self {
        self.evicted = self
            .created
            .saturating_sub(self.confirmed + self.expired + self.closed + self.deleted + self.live);
        self
    }
}

impl Stats {
    pub fn iface(&self, name: &str) -> Option<&IfaceStats> {
        self.interfaces.iter().find(|i| i.iface == name)
    }

    pub fn drops(&self, reason: &str) -> u64 {
        self.drops.iter().find(|(n, _)| *n == reason).map_or(0, |(_, v)| *v)
    }
}

/// Sums the per-CPU counters of every registered interface, plus slot 0.
pub fn read(pins: &PinDir) -> Result<Stats> {
    let ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
    let counters: PerCpuArray<_, Counter> = pins.open_map(IFACE_STATS)?.try_into()?;
    // Programs of an earlier build count into its shorter array until `xdpgate upgrade`
    // replaces them (and again after a downgrade); the array stays pinned, its counts part
    // of the totals, which then never go down: all pinned arrays are added.
    let mut arrays: Vec<PerCpuArray<_, u64>> = Vec::new();
    for name in [DROP_STATS].iter().chain(&EARLIER_DROP_STATS) {
        match pins.open_map(name) {
            Ok(map) => arrays.push(map.try_into()?),
            // Not pinned (an upgrade may unpin the earlier one between two reads).
            Err(_) if !pins.map(name).exists() => {}
            Err(e) => return Err(e),
        }
    }
    if arrays.is_empty() {
        // Neither is pinned: the error names this build's.
        pins.open_map(DROP_STATS)?;
    }
    // Pinned by the first attach of a build with the egress program; none before.
    let egress: Option<PerCpuArray<_, Counter>> =
        pins.open_map(EGRESS_STATS).ok().map(TryInto::try_into).transpose()?;

    let slot_stats = |slot: u32| -> Result<Vec<(&'static str, Traffic)>> {
        (0..VERDICTS)
            .map(|action| {
                let mut sum = Counter::default();
                for c in counters.get(&iface_stat_index(slot, action), 0)?.iter() {
                    sum.add(c);
                }
                Ok((VERDICT_NAMES[action as usize], sum.into()))
            })
            .collect()
    };
    let egress_stats = |slot: u32| -> Result<Vec<(&'static str, Traffic)>> {
        (0..EGRESS_VERDICTS)
            .map(|v| {
                let mut sum = Counter::default();
                if let Some(egress) = &egress {
                    for c in egress.get(&egress_stat_index(slot, v == 1), 0)?.iter() {
                        sum.add(c);
                    }
                }
                Ok((EGRESS_VERDICT_NAMES[v as usize], sum.into()))
            })
            .collect()
    };

    // Attached interfaces by the names they were attached under (their pins): the ifindex
    // may name another device here when they live in another network namespace.
    let attached: std::collections::HashMap<u32, String> = pins
        .attached()?
        .into_iter()
        .filter_map(|name| Some((crate::link_info(pins, &name).ok()?.ifindex, name)))
        .filter(|(ifindex, _)| *ifindex != 0)
        .collect();
    let mut interfaces = Vec::new();
    let mut registered: Vec<(u32, IfaceConfig)> = ifaces.iter().collect::<Result<_, _>>()?;
    registered.sort_by_key(|(_, c)| c.slot);
    for (ifindex, cfg) in registered {
        let role = match Role::from_u32(cfg.role) {
            Role::External => "external",
            Role::Internal => "internal",
        };
        interfaces.push(IfaceStats {
            iface: attached
                .get(&ifindex)
                .cloned()
                .or_else(|| ifname(ifindex))
                .unwrap_or_else(|| format!("ifindex {ifindex}")),
            role: Some(role),
            verdicts: slot_stats(cfg.slot)?,
            egress: egress_stats(cfg.slot)?,
        });
    }
    interfaces.push(IfaceStats {
        iface: "(unregistered)".into(),
        role: None,
        verdicts: slot_stats(0)?,
        egress: egress_stats(0)?,
    });

    let drops = (0..DROP_REASONS)
        .map(|r| {
            let mut n = 0;
            for a in arrays.iter().filter(|a| r < a.len()) {
                n += a.get(&r, 0)?.iter().sum::<u64>();
            }
            Ok((DROP_REASON_NAMES[r as usize], n))
        })
        .collect::<Result<_>>()?;
    let (flow_events_rate_limited, flow_events_lost) = event_losses(pins)?;
    let (_, running) = apply::active(pins)?;
    let nat_gateways = match state::record(pins, running.generation)? {
        Some(record) => nat::traffic(pins, &record)?,
        None => Vec::new(),
    };
    Ok(Stats {
        interfaces,
        drops,
        policy: policy_stats(pins)?,
        flow_events_rate_limited,
        flow_events_lost,
        flow_table: flow_table(pins).context("reading the flow tables")?,
        nat_gateways,
    })
}

/// Sizes, fill and counters of the flow tables. The counters are read before the embryonic
/// table, so that an embryonic flow created during the read makes `evicted` too low for the
/// moment rather than too high.
pub fn flow_table(pins: &PinDir) -> Result<FlowTable> {
    let stats: PerCpuArray<_, u64> = pins.open_map(FLOW_STATS)?.try_into()?;
    let sum = |i: u32| -> Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
    // Flows: two entries each.
    let capacity = |name: &str| -> Result<u64> {
        let entries = tables::pinned_entries(pins, name)?
            .with_context(|| format!("reading the size of {name}: not pinned"))?;
        Ok(u64::from(entries) / 2)
    };
    let mut embryonic = EmbryonicTable {
        capacity: capacity(EMBRYOS)?,
        created: sum(FLOW_STAT_EMBRYOS_CREATED)?,
        confirmed: sum(FLOW_STAT_EMBRYOS_CONFIRMED)?,
        // And the lone exchanges the agent ended, idle past the embryonic timeout.
        expired: sum(FLOW_STAT_EMBRYOS_EXPIRED)? + embryo_count(pins, ENDED),
        deleted: embryo_count(pins, DELETED),
        refused: sum(FLOW_STAT_EMBRYOS_REFUSED)?,
        closed: sum(FLOW_STAT_EMBRYOS_CLOSED)?,
        ..Default::default()
    };
    let (rebuilt, picked_up) = (sum(FLOW_STAT_REBUILT)?, sum(FLOW_STAT_PICKED_UP)?);
    // Live: flows with both entries, and lone ones (see `TCP_LONE`). One that lost either
    // to the LRU cannot be confirmed any more, so it counts as evicted.
    let embryos: HashMap<MapData, FlowKey, FlowValue> = pins.open_map(EMBRYOS)?.try_into()?;
    let (mut replies, mut twins) = (HashSet::new(), Vec::new());
    table::for_each(&embryos, |k, v| {
        embryonic.entries += 1;
        if v.reply == 0 {
            twins.push((k.twin(v), v.lone()));
        } else {
            replies.insert(*k);
        }
        Ok(())
    })?;
    embryonic.live = twins.iter().filter(|(t, lone)| *lone || replies.contains(t)).count() as u64;
    let flows: HashMap<MapData, FlowKey, FlowValue> = pins.open_map(FLOWS)?.try_into()?;
    Ok(FlowTable {
        flows: EstablishedTable { capacity: capacity(FLOWS)?, entries: table::count(&flows)? },
        embryonic: embryonic.derive_evicted(),
        rebuilt,
        picked_up,
    })
}

/// Hits of every rule of the running policy, named from its generation's record.
fn policy_stats(pins: &PinDir) -> Result<Option<PolicyStats>> {
    let (slot, config) = apply::active(pins)?;
    let Some(record) = state::record(pins, config.generation)? else { return Ok(None) };
    let hits: PerCpuArray<_, u64> = pins.open_map(NSG_HITS)?.try_into()?;
    // Pinned by the first load of a build with it; none before (zeros until `upgrade`).
    let traffic: Option<PerCpuArray<_, Counter>> =
        pins.open_map(NSG_TRAFFIC).ok().map(TryInto::try_into).transpose()?;
    let mut rules = Vec::new();
    for (t, table) in record.tables.iter().enumerate() {
        let table_id = slot * TABLES_PER_SLOT + t as u32;
        for (bit, r) in table.iter().enumerate() {
            let index = table_id * MAX_RULES + bit as u32;
            let flows = hits.get(&index, 0)?.iter().sum();
            let mut sum = Counter::default();
            if let Some(traffic) = &traffic {
                traffic.get(&index, 0)?.iter().for_each(|c| sum.add(c));
            }
            rules.push(RuleHits {
                nsg: r.nsg.clone(),
                rule: r.rule.clone(),
                direction: r.direction,
                layer: r.layer,
                priority: r.priority,
                flows,
                traffic: sum.into(),
            });
        }
    }
    Ok(Some(PolicyStats { generation: config.generation, rules }))
}

/// The name of `ifindex` in the current network namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Denied-flow events the rate limit held back, and events lost to a full ring buffer.
pub fn event_losses(pins: &PinDir) -> Result<(u64, u64)> {
    let stats: PerCpuArray<_, u64> = pins.open_map(EVENT_STATS)?.try_into()?;
    let sum = |i: u32| -> Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
    Ok((sum(EVENTS_SUPPRESSED)?, sum(EVENTS_LOST)?))
}

/// Zeroes interface slot `slot`'s counters (ingress verdicts, and egress where the object
/// has them) before an interface takes it: a slot freed by a detach still holds the counts
/// of the interface that had it.
pub(crate) fn clear_slot(ebpf: &mut aya::Ebpf, slot: u32) -> Result<()> {
    let map = ebpf.map_mut(IFACE_STATS).ok_or_else(|| anyhow!("map {IFACE_STATS} missing"))?;
    let mut counters: PerCpuArray<_, Counter> = map.try_into()?;
    for action in 0..VERDICTS {
        counters.set(iface_stat_index(slot, action), carried::zeros()?, 0)?;
    }
    if let Some(map) = ebpf.map_mut(EGRESS_STATS) {
        let mut egress: PerCpuArray<_, Counter> = map.try_into()?;
        for drop in [false, true] {
            egress.set(egress_stat_index(slot, drop), carried::zeros()?, 0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicted_is_what_no_other_outcome_accounts_for() {
        let t = EmbryonicTable {
            created: 100,
            confirmed: 50,
            expired: 10,
            refused: 5,
            closed: 3,
            live: 12,
            ..Default::default()
        };
        // Refusals leave flows embryonic: no outcome.
        assert_eq!(t.derive_evicted().evicted, 25);
        // Created during the read but seen live: never below zero.
        let t = EmbryonicTable { created: 10, confirmed: 8, live: 5, ..Default::default() };
        assert_eq!(t.derive_evicted().evicted, 0);
    }
}
