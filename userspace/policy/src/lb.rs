//! Compiles the load balancers of a policy into images of the dataplane's frontend,
//! service, backend and Maglev tables (Maglev over the healthy members of each pool).

use std::{collections::HashMap as StdHashMap, net::IpAddr};

use anyhow::{Result, bail};
use xdpgate_common::{
    lb::{
        DIST_FIVE_TUPLE, DIST_SOURCE_IP, DIST_SOURCE_IP_PROTOCOL, FrontendKey, MAGLEV_SIZE,
        MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, NO_BACKEND, SVC_ENCAP, SVC_FLOATING_IP,
        SVC_MIDSTREAM,
    },
    words,
};

use crate::{
    AllDown, Distribution, Forwarding, LbProtocol, Policy, Probe, maglev, names::ServiceName,
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

pub fn frontend_key(addr: IpAddr, port: u16, proto: u8) -> FrontendKey {
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
                flags: dist
                    | match rule.forwarding {
                        Forwarding::Dnat => 0,
                        Forwarding::FloatingIp => SVC_FLOATING_IP,
                        Forwarding::Ipip => SVC_FLOATING_IP | SVC_ENCAP,
                    }
                    | if rule.midstream_pickup { SVC_MIDSTREAM } else { 0 },
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

/// The frontend address of a key (as [`frontend_key`] wrote it).
pub fn frontend_addr(k: &FrontendKey) -> IpAddr {
    let bytes: Vec<u8> = k.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if k.family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).expect("4 bytes"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).expect("16 bytes"))
    }
}

fn frontend_name(k: &FrontendKey) -> String {
    let addr = frontend_addr(k);
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
                probe: spec.probe.as_ref().map(|p| p.name.clone()),
            }
        })
        .collect()
}
