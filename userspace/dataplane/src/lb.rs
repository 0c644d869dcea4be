//! The load balancers' maps: installs a compiled image into the frontend, service, backend
//! and Maglev tables, and rewrites a service's Maglev table when its backends' health
//! changes (written beside the live table, then swapped in with the frontend entries).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData};
use xdpgate_common::{
    family_bytes,
    lb::{
        ADDRESS_PROTO, BackendInfo, DIST_MASK, FrontendKey, MAGLEV_SIZE, MAX_BACKENDS,
        MAX_FRONTENDS, NO_BACKEND, SVC_ENCAP, SVC_NO_BACKEND, Service, flow_hash, maglev_index,
    },
    maps::{BACKENDS, FRONTENDS, MAGLEV},
    words,
};

use xdpgate_policy::{
    lb::{BackendHealth, CompiledLb, frontend_key, maglev_table},
    names::Record,
};

use crate::{PinDir, encap::Sources, probes::ProbeKey, state::ReadLock, table};

/// The dataplane's load-balancer maps, opened from their pins.
pub struct LbMaps {
    frontends: HashMap<MapData, FrontendKey, Service>,
    maglev: Array<MapData, u32>,
    backends: Array<MapData, BackendInfo>,
}

impl LbMaps {
    pub fn open(pins: &PinDir) -> Result<Self> {
        Ok(Self {
            frontends: pins.open_map(FRONTENDS)?.try_into()?,
            maglev: pins.open_map(MAGLEV)?.try_into()?,
            backends: pins.open_map(BACKENDS)?.try_into()?,
        })
    }

    /// Installs `lb` in full: backends (clearing the slots of backends the policy no longer
    /// has), every service's table and its frontends, each frontend address's own entry,
    /// then the removal of the frontends the policy no longer has: a port both policies
    /// serve is served throughout, and an address's own entry never says HA ports, or no
    /// rule, before the keys it means are in. (The removal goes first when the table could
    /// not hold both, and for a key whose service id now stands for another rule than in
    /// `running`: that id's Maglev table is about to become the other rule's.)
    pub fn install(
        &mut self,
        lb: &CompiledLb,
        health: &dyn BackendHealth,
        running: Option<&Record>,
    ) -> Result<()> {
        // A retired backend (in no pool) takes no flow: the non-TCP flows it has move.
        let in_use = lb.in_use();
        for (i, addr) in lb.backends.iter().enumerate() {
            let healthy = in_use.contains(&(i as u32)) && health.healthy(*addr);
            self.set_backend(i as u32, *addr, healthy)?;
        }
        for i in lb.backends.len() as u32..MAX_BACKENDS {
            if self.backends.get(&i, 0)?.family != 0 {
                self.backends.set(i, BackendInfo::default(), 0)?;
            }
        }
        let keys = lb.frontends.iter().map(|f| f.0).chain(lb.addresses.iter().map(|a| a.0));
        let wanted: BTreeMap<_, _> = keys.map(|k| (key_bytes(&k), k)).collect();
        let present: Vec<FrontendKey> = self.frontends.keys().filter_map(|k| k.ok()).collect();
        let stale: Vec<FrontendKey> =
            present.iter().filter(|k| !wanted.contains_key(&key_bytes(k))).copied().collect();
        // Every wanted key in beside the stale ones, before these go.
        let room = wanted.len() + stale.len() <= MAX_FRONTENDS as usize;
        let reused = |k: &FrontendKey| {
            self.frontends.get(k, 0).is_ok_and(|s| {
                (s.id as usize) < lb.services.len() && !carried(running, lb, s.id as usize)
            })
        };
        let (first, stale): (Vec<_>, Vec<_>) = stale.iter().partition(|k| !room || reused(k));
        self.remove(&first)?;
        for (id, spec) in lb.services.iter().enumerate() {
            let healthy = |b: u32| health.healthy_in(spec, lb.backends[b as usize]);
            self.update_service(lb, id as u32, &healthy)?;
        }
        for &(key, flags) in &lb.addresses {
            // No service's: an id none has.
            let svc = Service { id: NO_BACKEND, backend: NO_BACKEND, flags, ..Service::default() };
            self.frontends.insert(key, svc, 0)?;
        }
        self.remove(&stale)?;
        Ok(())
    }

    fn remove(&mut self, keys: &[FrontendKey]) -> Result<()> {
        for k in keys {
            self.frontends.remove(k)?;
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, addr: IpAddr, healthy: bool) -> Result<()> {
        let key = frontend_key(addr, 0, 0);
        let info = BackendInfo {
            addr: key.addr,
            family: key.family,
            healthy: healthy.into(),
            _pad: [0; 2],
        };
        Ok(self.backends.set(id, info, 0)?)
    }

    /// Rebuilds service `id`'s Maglev table into its idle copy and points its frontends at
    /// it: flows see the old table or the new one, never a mix.
    pub fn update_service(
        &mut self,
        lb: &CompiledLb,
        id: u32,
        healthy: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        let spec = &lb.services[id as usize];
        let mine: Vec<_> = lb.frontends.iter().filter(|f| f.1 == id).collect();
        let live =
            mine.first().and_then(|f| self.frontends.get(&f.0, 0).ok()).map_or(1, |s| s.table & 1);
        let next = 1 - live;
        let mut flags = spec.flags;
        if !spec.pool.is_empty() {
            match maglev_table(spec, &lb.backends, healthy) {
                Some(table) => {
                    let first = maglev_index(id, u32::from(next), 0);
                    table::update_batch(&self.maglev, first, &table)?;
                }
                None => flags |= SVC_NO_BACKEND,
            }
        }
        for (key, _, backend, backend_port) in mine {
            let svc = Service {
                id,
                backend: *backend,
                backend_port: *backend_port,
                flags,
                table: next,
                idle_timeout_s: spec.idle_timeout_s,
            };
            self.frontends.insert(key, svc, 0)?;
        }
        Ok(())
    }
}

/// The backends the running dataplane has taken out, by address: what an apply keeps out
/// until probes say otherwise. Not a retired backend's (in no pool of the running
/// generation: out for that, not for its health).
pub fn pinned_unhealthy(pins: &PinDir) -> Result<HashSet<IpAddr>> {
    let backends: Array<_, BackendInfo> = pins.open_map(BACKENDS)?.try_into()?;
    let in_use: Option<HashSet<u32>> = crate::apply::running(pins)?
        .map(|r| r.services.iter().flat_map(|s| s.members.iter().copied()).collect());
    let mut out = HashSet::new();
    for (id, b) in backends.iter().enumerate() {
        let b = b?;
        let retired = in_use.as_ref().is_some_and(|used| !used.contains(&(id as u32)));
        if b.family != 0 && b.healthy == 0 && !retired {
            out.insert(crate::flows::addr(&b.addr, b.family));
        }
    }
    Ok(out)
}

/// The backend the running tables give a new flow from `src` to frontend `dst` (`proto`,
/// `ports` in host order, both 0 for a protocol without), as the new-flow stage picks it:
/// the frontend's service (its port's key, else its address's HA ports), then the service's
/// fixed backend or its live Maglev table's slot for the flow's hash. `None`: no frontend
/// of that port, or no backend takes new flows.
pub fn pick(
    pins: &PinDir,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ports: (u16, u16),
) -> Result<Option<IpAddr>> {
    let frontends: HashMap<_, FrontendKey, Service> = pins.open_map(FRONTENDS)?.try_into()?;
    // Protocol 255's key is the address's own entry, no service.
    let exact = (proto != ADDRESS_PROTO)
        .then(|| frontends.get(&frontend_key(dst, ports.1, proto), 0).ok())
        .flatten();
    let Some(svc) = exact.or_else(|| frontends.get(&frontend_key(dst, 0, 0), 0).ok()) else {
        return Ok(None);
    };
    if svc.flags & SVC_NO_BACKEND != 0 {
        return Ok(None);
    }
    let backend = if svc.backend != NO_BACKEND {
        svc.backend
    } else {
        let maglev: Array<_, u32> = pins.open_map(MAGLEV)?.try_into()?;
        let (src, dst) = (words(&family_bytes(src).1), words(&family_bytes(dst).1));
        let hash = flow_hash(&src, &dst, proto, ports, svc.flags & DIST_MASK);
        maglev.get(&maglev_index(svc.id, u32::from(svc.table & 1), hash % MAGLEV_SIZE), 0)?
    };
    let backends: Array<_, BackendInfo> = pins.open_map(BACKENDS)?.try_into()?;
    let info = backends.get(&backend, 0)?;
    Ok((info.family != 0).then(|| crate::flows::addr(&info.addr, info.family)))
}

/// Whether service id `i` of `lbs` stands for the rule it stood for in `running`.
fn carried(running: Option<&Record>, lbs: &CompiledLb, i: usize) -> bool {
    let (before, now) = (running.and_then(|r| r.services.get(i)), &lbs.services[i]);
    before.is_some_and(|b| b.lb == now.lb && b.rule == now.rule)
}

fn key_bytes(k: &FrontendKey) -> ([u32; 4], u16, u8, u8) {
    (k.addr, k.port, k.proto, k.family)
}

/// Zeroes the counters of each service and backend id of `lbs` that stands for another
/// one than in the running generation (`running`'s record; all of them without one), so
/// that a new one does not go on from a retired one's totals.
pub fn restart_counters(pins: &PinDir, lbs: &CompiledLb, running: Option<&Record>) -> Result<()> {
    use aya::maps::PerCpuArray;
    use xdpgate_common::{
        maps::{BACKEND_STATS, SERVICE_STATS},
        stats::Counter,
    };
    let kept = |same: bool, i: usize| same.then_some(i as u32);
    let services: Vec<Option<u32>> =
        (0..lbs.services.len()).map(|i| kept(carried(running, lbs, i), i)).collect();
    let backends: Vec<Option<u32>> = (lbs.backends.iter().enumerate())
        .map(|(i, a)| kept(running.and_then(|r| r.backends.get(i)) == Some(a), i))
        .collect();
    let mut stats: PerCpuArray<_, Counter> = pins.open_map(SERVICE_STATS)?.try_into()?;
    crate::carried::remap(&mut stats, &services)?;
    let mut stats: PerCpuArray<_, Counter> = pins.open_map(BACKEND_STATS)?.try_into()?;
    crate::carried::remap(&mut stats, &backends)
}

/// What `xdpgate lb` shows: each service with its frontends, backends, health and counters.
#[derive(Debug, serde::Serialize)]
pub struct ServiceReport {
    pub load_balancer: String,
    pub rule: String,
    pub frontends: Vec<String>,
    /// The rule's health probe; none: its backends' health is not probed.
    pub probe: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendReport>,
    /// This node's address the packets of a `forwarding: ipip` rule leave from (see
    /// `encap`); none for other rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_source: Option<IpAddr>,
    /// The live Maglev table (asked for with `xdpgate lb --maglev`); none for a rule with a
    /// fixed backend or none taking new flows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev: Option<MaglevReport>,
}

/// A service's live Maglev table, as a fleet compares it: gateways that pick the same
/// backend for every flow have the same digest.
#[derive(Debug, serde::Serialize)]
pub struct MaglevReport {
    /// FNV-1a (64 bits, hex) of the backend address of every slot, in slot order: the
    /// same on every node whose table is the same, whatever its backend numbering.
    pub digest: String,
    /// The slots each backend owns (its share of new flows), by address.
    pub slots: Vec<SlotShare>,
}

#[derive(Debug, serde::Serialize)]
pub struct SlotShare {
    pub address: IpAddr,
    pub slots: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct BackendReport {
    pub address: IpAddr,
    /// The backend's one health flag: false once any probe of it fails.
    pub healthy: bool,
    /// What this rule's own probe says, as the running agent last built tables from it
    /// (the flag when no agent runs; true for a rule without a probe).
    pub healthy_in_rule: bool,
    /// Taken out of this load balancer by `xdpgate lb drain`: no new flows.
    pub drained: bool,
    /// Flows of this service pinned to the backend now (established and embryonic): a
    /// drained backend is empty when this reaches 0.
    pub flows: u64,
    /// The backend's packets and bytes since it was added: counted per backend address,
    /// over every rule that sends to it (`rules_sending`) or did (a rule since removed),
    /// not this rule's alone.
    pub packets: u64,
    pub bytes: u64,
    /// The rules in force (`LB/RULE`) that send to this backend.
    pub rules_sending: Vec<String>,
}

/// Reads the live state of the load balancers of the running generation (`record`), with
/// each service's live Maglev table when `maglev` (a bpf() call per slot: 16,381 a service),
/// under the read lock taken before `record` was read: no rebuild tears the tables read,
/// and their backend numbers are the record's. `drained`: whether a load balancer's
/// backend is drained (the drains in force, as `drain::read` reads them).
pub fn report(
    pins: &PinDir,
    record: &Record,
    drained: impl Fn(&str, IpAddr) -> bool,
    maglev: Option<&ReadLock>,
) -> Result<Vec<ServiceReport>> {
    use aya::maps::PerCpuArray;
    use xdpgate_common::{
        maps::{BACKEND_STATS, SERVICE_STATS},
        stats::Counter,
    };
    let backends: Array<_, BackendInfo> = pins.open_map(BACKENDS)?.try_into()?;
    let service_stats: PerCpuArray<_, Counter> = pins.open_map(SERVICE_STATS)?.try_into()?;
    let backend_stats: PerCpuArray<_, Counter> = pins.open_map(BACKEND_STATS)?.try_into()?;
    let sum = |m: &PerCpuArray<MapData, Counter>, i: u32| -> Result<Counter> {
        let mut total = Counter::default();
        for c in m.get(&i, 0)?.iter() {
            total.add(c);
        }
        Ok(total)
    };
    // Unreadable (a build of another format): the flags stand in.
    let probed = crate::probes::ProbeHealth::of_running_agent(pins).ok().flatten();
    // The flow tables are read whole: not for a policy without load balancers.
    let flows = if record.services.is_empty() {
        Default::default()
    } else {
        crate::flows::per_backend(pins)?
    };
    let maps = LbMaps::open(pins)?;
    let outer_sources = maps.outer_sources(crate::encap::read(pins).unwrap_or_default());
    let fixed = maps.fixed_services();
    let mut out = Vec::new();
    for (id, spec) in record.services.iter().enumerate() {
        // A retired service (the running policy dropped it; its id names it for the flows
        // it still has) is not shown.
        if spec.frontends.is_empty() {
            continue;
        }
        let stats = sum(&service_stats, id as u32)?;
        out.push(ServiceReport {
            load_balancer: spec.lb.clone(),
            rule: spec.rule.clone(),
            frontends: spec.frontends.clone(),
            probe: spec.probe.clone(),
            packets: stats.packets,
            bytes: stats.bytes,
            backends: spec
                .members
                .iter()
                .map(|&b| {
                    let c = sum(&backend_stats, b)?;
                    let address = *record
                        .backends
                        .get(b as usize)
                        .ok_or_else(|| anyhow::anyhow!("backend {b} missing from the record"))?;
                    let healthy = backends.get(&b, 0)?.healthy != 0;
                    let healthy_in_rule = match (&probed, &spec.probe) {
                        (Some(p), Some(probe)) => !p.down.contains(&ProbeKey {
                            backend: address,
                            lb: spec.lb.clone(),
                            probe: probe.clone(),
                        }),
                        (None, Some(_)) => healthy,
                        (_, None) => true,
                    };
                    Ok(BackendReport {
                        address,
                        healthy,
                        healthy_in_rule,
                        // An inbound NAT rule's backend is not drained (its rule has no table).
                        drained: !fixed.contains(&(id as u32)) && drained(&spec.lb, address),
                        flows: flows.get(&(id as u32, b)).copied().unwrap_or(0),
                        packets: c.packets,
                        bytes: c.bytes,
                        rules_sending: Vec::new(),
                    })
                })
                .collect::<Result<_>>()?,
            outer_source: outer_sources.get(&(id as u32)).copied(),
            maglev: match maglev {
                Some(_) => maps.live_table(record, id as u32)?,
                None => None,
            },
        });
    }
    let mut rules: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for s in &out {
        for b in &s.backends {
            rules.entry(b.address).or_default().push(format!("{}/{}", s.load_balancer, s.rule));
        }
    }
    for b in out.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        b.rules_sending = rules[&b.address].clone();
    }
    Ok(out)
}

impl LbMaps {
    /// The services with a fixed backend (inbound NAT rules), by id: no drain applies to
    /// them.
    fn fixed_services(&self) -> std::collections::HashSet<u32> {
        self.frontends
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, s)| s.backend != NO_BACKEND)
            .map(|(_, s)| s.id)
            .collect()
    }

    /// The outer source of each service that encapsulates, by id: `sources`' of its
    /// frontends' family.
    fn outer_sources(&self, sources: Sources) -> BTreeMap<u32, IpAddr> {
        if sources == Sources::default() {
            return BTreeMap::new();
        }
        let of = |family: u8| match family {
            4 => sources.v4.map(IpAddr::from),
            _ => sources.v6.map(IpAddr::from),
        };
        let encap = self.frontends.iter().filter_map(|e| e.ok());
        let encap = encap.filter(|(_, s)| s.flags & SVC_ENCAP != 0);
        encap.filter_map(|(key, s)| Some((s.id, of(key.family)?))).collect()
    }

    /// Service `id`'s live Maglev table: the half its frontends point at.
    fn live_table(&self, record: &Record, id: u32) -> Result<Option<MaglevReport>> {
        let mut services = self.frontends.iter().filter_map(|e| e.ok());
        let svc = services.find(|(k, s)| s.id == id && k.proto != ADDRESS_PROTO);
        let Some((_, svc)) = svc else { return Ok(None) };
        if svc.backend != NO_BACKEND || svc.flags & SVC_NO_BACKEND != 0 {
            return Ok(None);
        }
        let mut table = Vec::with_capacity(MAGLEV_SIZE as usize * 16);
        let mut slots: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for slot in 0..MAGLEV_SIZE {
            let b = self.maglev.get(&maglev_index(id, u32::from(svc.table & 1), slot), 0)?;
            let addr = *record
                .backends
                .get(b as usize)
                .ok_or_else(|| anyhow::anyhow!("Maglev slot {slot} names unknown backend {b}"))?;
            table.extend(match addr {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            });
            *slots.entry(addr).or_default() += 1;
        }
        let slots =
            slots.into_iter().map(|(address, slots)| SlotShare { address, slots }).collect();
        let digest = xdpgate_policy::maglev::fnv1a(0, &table);
        Ok(Some(MaglevReport { digest: format!("{digest:016x}"), slots }))
    }
}
