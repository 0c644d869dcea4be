//! Compiles the load balancers of a policy into the dataplane's frontend, service, backend
//! and Maglev tables, and rewrites a service's Maglev table when its backends' health
//! changes (written beside the live table, then swapped in with the frontend entries).

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::IpAddr,
};

use anyhow::{Result, bail};
use aya::maps::{Array, HashMap, MapData};
use xdpgate_common::{
    lb::{
        BackendInfo, DIST_FIVE_TUPLE, DIST_SOURCE_IP, DIST_SOURCE_IP_PROTOCOL, FrontendKey,
        MAGLEV_SIZE, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, NO_BACKEND, SVC_FLOATING_IP,
        SVC_NO_BACKEND, Service, maglev_index,
    },
    maps::{BACKENDS, FRONTENDS, MAGLEV},
    words,
};

use crate::{
    dataplane::PinDir,
    maglev,
    policy::{AllDown, Distribution, LbProtocol, Policy, Probe},
    state::{Record, ServiceName},
};

/// One service: a load-balancing rule (Maglev over its pool) or an inbound NAT rule (each
/// frontend port straight to one backend).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    pub lb: String,
    pub rule: String,
    /// Pool members as (backend index, weight); empty for inbound NAT rules.
    pub pool: Vec<(u32, u32)>,
    pub probe: Option<Probe>,
    pub flags: u8,
    pub all_down: AllDown,
    pub idle_timeout_s: u32,
}

/// Which backends may take new flows: overall (the flag `xdpgate lb` shows, which non-TCP
/// flows follow) and in one service (the verdict of that service's probe; a service
/// without a probe takes every backend).
pub trait BackendHealth {
    fn healthy(&self, backend: IpAddr) -> bool;

    fn healthy_in(&self, service: &ServiceSpec, backend: IpAddr) -> bool {
        service.probe.is_none() || self.healthy(backend)
    }
}

impl<F: Fn(IpAddr) -> bool> BackendHealth for F {
    fn healthy(&self, backend: IpAddr) -> bool {
        self(backend)
    }
}

/// Every backend healthy: no probe has said otherwise.
pub struct AllHealthy;

impl BackendHealth for AllHealthy {
    fn healthy(&self, _: IpAddr) -> bool {
        true
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledLb {
    /// Index = backend id in `BACKENDS`.
    pub backends: Vec<IpAddr>,
    /// Index = service id.
    pub services: Vec<ServiceSpec>,
    /// Each frontend key with its service, and the fixed backend of inbound NAT mappings.
    pub frontends: Vec<(FrontendKey, u32, u32, u16)>,
}

fn frontend_key(addr: IpAddr, port: u16, proto: u8) -> FrontendKey {
    let (family, bytes) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (4, b)
        }
        IpAddr::V6(a) => (6, a.octets()),
    };
    FrontendKey { addr: words(&bytes), port, proto, family }
}

fn proto_number(p: LbProtocol) -> u8 {
    match p {
        LbProtocol::Tcp => 6,
        LbProtocol::Udp => 17,
        LbProtocol::All => 0,
    }
}

pub fn compile(policy: &Policy) -> Result<CompiledLb> {
    let mut out = CompiledLb::default();
    let mut backend_ids: StdHashMap<IpAddr, u32> = StdHashMap::new();
    let mut backend = |out: &mut CompiledLb, addr: IpAddr| -> u32 {
        *backend_ids.entry(addr).or_insert_with(|| {
            out.backends.push(addr);
            out.backends.len() as u32 - 1
        })
    };
    for lb in &policy.load_balancers {
        for rule in &lb.rules {
            let id = out.services.len() as u32;
            let pool = lb.pools[rule.pool]
                .backends
                .iter()
                .map(|b| (backend(&mut out, b.address), b.weight))
                .collect();
            let dist = match rule.distribution {
                Distribution::Default => DIST_FIVE_TUPLE,
                Distribution::SourceIp => DIST_SOURCE_IP,
                Distribution::SourceIpProtocol => DIST_SOURCE_IP_PROTOCOL,
            };
            out.services.push(ServiceSpec {
                lb: lb.name.clone(),
                rule: rule.name.clone(),
                pool,
                probe: rule.probe.map(|p| lb.probes[p].clone()),
                flags: dist | if rule.floating_ip { SVC_FLOATING_IP } else { 0 },
                all_down: rule.all_down,
                idle_timeout_s: rule.idle_timeout,
            });
            let addr = lb.frontends[rule.frontend].address;
            let key = frontend_key(addr, rule.frontend_port, proto_number(rule.protocol));
            out.frontends.push((key, id, NO_BACKEND, rule.backend_port));
        }
        for nat in &lb.inbound_nat_rules {
            let id = out.services.len() as u32;
            out.services.push(ServiceSpec {
                lb: lb.name.clone(),
                rule: nat.name.clone(),
                pool: Vec::new(),
                probe: None,
                flags: 0,
                all_down: AllDown::NoNewFlows,
                idle_timeout_s: 0,
            });
            let addr = lb.frontends[nat.frontend].address;
            for &(port, to) in &nat.mappings {
                let b = backend(&mut out, to);
                out.frontends.push((
                    frontend_key(addr, port, proto_number(nat.protocol)),
                    id,
                    b,
                    nat.backend_port,
                ));
            }
        }
    }
    if out.services.len() > MAX_SERVICES as usize {
        bail!(
            "{} load-balancing and inbound NAT rules exceed the table size {MAX_SERVICES}",
            out.services.len()
        );
    }
    if out.backends.len() > MAX_BACKENDS as usize {
        bail!("{} backends exceed the table size {MAX_BACKENDS}", out.backends.len());
    }
    if out.frontends.len() > MAX_FRONTENDS as usize {
        bail!("{} frontend ports exceed the table size {MAX_FRONTENDS}", out.frontends.len());
    }
    Ok(out)
}

/// The Maglev table of a service over the backends `healthy` says can take new flows;
/// `None` when none can and the service sends no new flows then.
pub fn maglev_table(
    spec: &ServiceSpec,
    backends: &[IpAddr],
    healthy: &dyn Fn(u32) -> bool,
) -> Option<Vec<u32>> {
    let mut members: Vec<(u32, u32)> =
        spec.pool.iter().copied().filter(|(b, _)| healthy(*b)).collect();
    if members.is_empty() {
        match spec.all_down {
            AllDown::NoNewFlows => return None,
            AllDown::SendToAll => members = spec.pool.clone(),
        }
    }
    let ids: Vec<(u64, u32)> =
        members.iter().map(|(b, w)| (maglev::backend_id(backends[*b as usize]), *w)).collect();
    let table = maglev::table(&ids, MAGLEV_SIZE as usize);
    Some(table.into_iter().map(|i| members[i as usize].0).collect())
}

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
    /// has), every service's table, then the frontends (removing frontends the policy no
    /// longer has).
    pub fn install(&mut self, lb: &CompiledLb, health: &dyn BackendHealth) -> Result<()> {
        for (i, addr) in lb.backends.iter().enumerate() {
            self.set_backend(i as u32, *addr, health.healthy(*addr))?;
        }
        for i in lb.backends.len() as u32..MAX_BACKENDS {
            if self.backends.get(&i, 0)?.family != 0 {
                self.backends.set(i, BackendInfo::default(), 0)?;
            }
        }
        let wanted: BTreeMap<_, _> = lb.frontends.iter().map(|f| (key_bytes(&f.0), f.0)).collect();
        let stale: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains_key(&key_bytes(k)))
            .collect();
        for k in stale {
            self.frontends.remove(&k)?;
        }
        for (id, spec) in lb.services.iter().enumerate() {
            let healthy = |b: u32| health.healthy_in(spec, lb.backends[b as usize]);
            self.update_service(lb, id as u32, &healthy)?;
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
                    for (slot, b) in table.iter().enumerate() {
                        self.maglev.set(maglev_index(id, u32::from(next), slot as u32), *b, 0)?;
                    }
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
/// until probes say otherwise.
pub fn pinned_unhealthy(pins: &PinDir) -> Result<HashSet<IpAddr>> {
    let backends: Array<_, BackendInfo> = pins.open_map(BACKENDS)?.try_into()?;
    let mut out = HashSet::new();
    for b in backends.iter() {
        let b = b?;
        if b.family != 0 && b.healthy == 0 {
            out.insert(crate::flows::addr(&b.addr, b.family));
        }
    }
    Ok(out)
}

fn key_bytes(k: &FrontendKey) -> ([u32; 4], u16, u8, u8) {
    (k.addr, k.port, k.proto, k.family)
}

/// What `xdpgate lb` shows: each service with its frontends, backends, health and counters.
#[derive(Debug, serde::Serialize)]
pub struct ServiceReport {
    pub load_balancer: String,
    pub rule: String,
    pub frontends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, serde::Serialize)]
pub struct BackendReport {
    pub address: IpAddr,
    pub healthy: bool,
    pub packets: u64,
    pub bytes: u64,
}

fn frontend_name(k: &FrontendKey) -> String {
    let bytes: Vec<u8> = k.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let addr: IpAddr = if k.family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).expect("4 bytes"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).expect("16 bytes"))
    };
    let proto = match k.proto {
        6 => "tcp",
        17 => "udp",
        _ => "all",
    };
    match addr {
        IpAddr::V6(a) => format!("[{a}]:{}/{proto}", k.port),
        IpAddr::V4(a) => format!("{a}:{}/{proto}", k.port),
    }
}

/// The services of `lbs` as the views name them (saved with each generation's record).
pub fn service_names(lbs: &CompiledLb) -> Vec<ServiceName> {
    lbs.services
        .iter()
        .enumerate()
        .map(|(id, spec)| {
            let id = id as u32;
            let mut members: Vec<u32> = spec.pool.iter().map(|(b, _)| *b).collect();
            members.extend(
                lbs.frontends.iter().filter(|f| f.1 == id && f.2 != NO_BACKEND).map(|f| f.2),
            );
            ServiceName {
                lb: spec.lb.clone(),
                rule: spec.rule.clone(),
                frontends: lbs
                    .frontends
                    .iter()
                    .filter(|f| f.1 == id)
                    .map(|f| frontend_name(&f.0))
                    .collect(),
                members,
            }
        })
        .collect()
}

/// Reads the live state of the load balancers of the running generation (`record`).
pub fn report(pins: &PinDir, record: &Record) -> Result<Vec<ServiceReport>> {
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
    let mut out = Vec::new();
    for (id, spec) in record.services.iter().enumerate() {
        let stats = sum(&service_stats, id as u32)?;
        out.push(ServiceReport {
            load_balancer: spec.lb.clone(),
            rule: spec.rule.clone(),
            frontends: spec.frontends.clone(),
            packets: stats.packets,
            bytes: stats.bytes,
            backends: spec
                .members
                .iter()
                .map(|&b| {
                    let c = sum(&backend_stats, b)?;
                    Ok(BackendReport {
                        address: *record.backends.get(b as usize).ok_or_else(|| {
                            anyhow::anyhow!("backend {b} missing from the record")
                        })?,
                        healthy: backends.get(&b, 0)?.healthy != 0,
                        packets: c.packets,
                        bytes: c.bytes,
                    })
                })
                .collect::<Result<_>>()?,
        });
    }
    Ok(out)
}

pub fn render(report: &[ServiceReport]) -> String {
    let mut out = String::new();
    for s in report {
        out += &format!(
            "{}/{}  {}  {} packets, {} bytes\n",
            s.load_balancer,
            s.rule,
            s.frontends.join(" "),
            s.packets,
            s.bytes
        );
        for b in &s.backends {
            out += &format!(
                "    {:<28} {:<9} {:>10} packets {:>12} bytes\n",
                b.address.to_string(),
                if b.healthy { "healthy" } else { "UNHEALTHY" },
                b.packets,
                b.bytes
            );
        }
    }
    out
}
