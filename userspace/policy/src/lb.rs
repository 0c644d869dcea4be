//! Compiles the load balancers of a policy into images of the dataplane's frontend,
//! service, backend and Maglev tables (Maglev over the healthy members of each pool).

use std::{collections::HashMap as StdHashMap, net::IpAddr};

use anyhow::{Result, bail};
use xdpgate_common::{
    family_bytes,
    lb::{
        ADDRESS_PROTO, DIST_FIVE_TUPLE, DIST_SOURCE_IP, DIST_SOURCE_IP_PROTOCOL, FrontendKey,
        MAGLEV_SIZE, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, NO_BACKEND, SVC_ENCAP,
        SVC_FLOATING_IP, SVC_HA_PORTS, SVC_MIDSTREAM, SVC_NO_RULE,
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
    /// Each frontend address's own entry (`lb::ADDRESS_PROTO`) and what it says:
    /// `SVC_HA_PORTS`, or `SVC_NO_RULE` (packets to the address on a port no rule serves
    /// are the load balancer's to drop; no NAT gateway has a frontend's address).
    pub addresses: Vec<(FrontendKey, u8)>,
}

impl CompiledLb {
    /// These load balancers numbered so that each backend (by address) and service (by load
    /// balancer and rule) of the running generation (`backends`, `services`, its record's)
    /// keeps its id: flow entries and counters name them by id. One the running generation
    /// had and these lack stays, retired (a backend in no pool, a service with no frontend
    /// and no backend), so that the flows it still has are named; a new one takes the next
    /// id, or once the table is full, the lowest id of a retired one.
    pub fn carried(self, backends: &[IpAddr], services: &[ServiceName]) -> Result<Self> {
        let backend_ids = carry(&self.backends, backends, MAX_BACKENDS, "backends")?;
        let name = |s: &ServiceSpec| (s.lb.clone(), s.rule.clone());
        let before: Vec<_> = services.iter().map(|s| (s.lb.clone(), s.rule.clone())).collect();
        let now: Vec<_> = self.services.iter().map(name).collect();
        let service_ids = carry(&now, &before, MAX_SERVICES, "services")?;
        let mut out = CompiledLb::default();
        for (id, addr) in backend_ids.table.iter().enumerate() {
            out.backends.push(match addr {
                Some(i) => self.backends[*i],
                None => backends[id],
            });
        }
        let new_backend = |b: u32| backend_ids.of[b as usize];
        for (id, at) in service_ids.table.iter().enumerate() {
            out.services.push(match at {
                Some(i) => {
                    let spec = &self.services[*i];
                    let pool = spec.pool.iter().map(|(b, w)| (new_backend(*b), *w)).collect();
                    ServiceSpec { pool, ..spec.clone() }
                }
                None => ServiceSpec {
                    lb: before[id].0.clone(),
                    rule: before[id].1.clone(),
                    pool: Vec::new(),
                    probe: None,
                    flags: 0,
                    all_down: AllDown::NoNewFlows,
                    idle_timeout_s: 0,
                },
            });
        }
        out.frontends = self
            .frontends
            .iter()
            .map(|&(key, service, backend, port)| {
                let backend = if backend == NO_BACKEND { backend } else { new_backend(backend) };
                (key, service_ids.of[service as usize], backend, port)
            })
            .collect();
        out.addresses = self.addresses;
        Ok(out)
    }

    /// The backend ids some service of these load balancers can send flows to (the others
    /// are retired).
    pub fn in_use(&self) -> std::collections::HashSet<u32> {
        let pools = self.services.iter().flat_map(|s| s.pool.iter().map(|(b, _)| *b));
        pools.chain(self.frontends.iter().map(|f| f.2).filter(|b| *b != NO_BACKEND)).collect()
    }
}

/// Ids for `now`'s items keeping those of `before` (`of`: the id of each of `now`), and
/// what each id holds (`table`: `now`'s index, or `None`: `before`'s item, retired).
struct Carried {
    of: Vec<u32>,
    table: Vec<Option<usize>>,
}

fn carry<T: Eq + std::hash::Hash + Clone>(
    now: &[T],
    before: &[T],
    max: u32,
    what: &str,
) -> Result<Carried> {
    let had: StdHashMap<&T, u32> =
        before.iter().enumerate().rev().map(|(id, item)| (item, id as u32)).collect();
    let mut table: Vec<Option<usize>> = vec![None; before.len()];
    let mut of = vec![u32::MAX; now.len()];
    for (i, item) in now.iter().enumerate() {
        if let Some(&id) = had.get(item) {
            table[id as usize] = Some(i);
            of[i] = id;
        }
    }
    // Retired ids, lowest first, for when the table is full.
    let mut retired =
        (0..table.len()).filter(|&id| table[id].is_none()).collect::<Vec<_>>().into_iter();
    let new: Vec<usize> = (0..now.len()).filter(|&i| of[i] == u32::MAX).collect();
    for i in new {
        let id = if table.len() < max as usize {
            table.push(None);
            table.len() - 1
        } else {
            retired.next().ok_or_else(|| {
                anyhow::anyhow!("{} {what} exceed the table size {max}", now.len())
            })?
        };
        table[id] = Some(i);
        of[i] = id as u32;
    }
    Ok(Carried { of, table })
}

pub fn frontend_key(addr: IpAddr, port: u16, proto: u8) -> FrontendKey {
    let (family, bytes) = family_bytes(addr);
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
    // Before each rule copies its pool: 20,000 rules of a 65,000-backend pool took 10 GB.
    let services: usize =
        policy.load_balancers.iter().map(|lb| lb.rules.len() + lb.inbound_nat_rules.len()).sum();
    if services > MAX_SERVICES as usize {
        bail!(
            "{services} load-balancing and inbound NAT rules exceed the table size {MAX_SERVICES}"
        );
    }
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
            // Before the next rule copies its pool too.
            if out.backends.len() > MAX_BACKENDS as usize {
                bail!("{} backends exceed the table size {MAX_BACKENDS}", out.backends.len());
            }
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
    if out.backends.len() > MAX_BACKENDS as usize {
        bail!("{} backends exceed the table size {MAX_BACKENDS}", out.backends.len());
    }
    let addresses = policy.load_balancers.iter().flat_map(|lb| lb.frontends.iter());
    out.addresses = address_entries(&out.frontends, addresses.map(|f| f.address));
    let entries = out.frontends.len() + out.addresses.len();
    if entries > MAX_FRONTENDS as usize {
        bail!("{entries} frontend ports and addresses exceed the table size {MAX_FRONTENDS}");
    }
    Ok(out)
}

/// [`CompiledLb::addresses`]: of every frontend address (one no rule uses is a frontend all
/// the same, whose every port no rule serves), HA ports where a key of `frontends` says so.
fn address_entries(
    frontends: &[(FrontendKey, u32, u32, u16)],
    addresses: impl Iterator<Item = IpAddr>,
) -> Vec<(FrontendKey, u8)> {
    let every_port = |k: &FrontendKey| k.port == 0 && k.proto == 0;
    let ha: std::collections::HashSet<IpAddr> =
        frontends.iter().filter(|f| every_port(&f.0)).map(|f| frontend_addr(&f.0)).collect();
    let addresses: std::collections::BTreeSet<IpAddr> = addresses.collect();
    let flag = |a: &IpAddr| if ha.contains(a) { SVC_HA_PORTS } else { SVC_NO_RULE };
    addresses.into_iter().map(|a| (frontend_key(a, 0, ADDRESS_PROTO), flag(&a))).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lbs(pool: &str, rules: &str) -> CompiledLb {
        let yaml = format!(
            "virtual_network: {{address_space: [198.51.100.0/24]}}
load_balancers:
  - name: edge
    frontends: [{{name: vip, address: 192.0.2.10}}]
    backend_pools: [{{name: web, backends: [{pool}]}}]
    rules:
{rules}
    inbound_nat_rules:
      - {{name: admin, frontend: vip, protocol: tcp, frontend_port: 2201,
         backend: 198.51.100.12, backend_port: 22}}
"
        );
        compile(&crate::load_str(&yaml, "lb.yaml").unwrap()).unwrap()
    }

    fn rule(name: &str, port: u16) -> String {
        format!(
            "      - {{name: {name}, frontend: vip, protocol: tcp, frontend_port: {port}, \
             backend_port: 80, backend_pool: web}}\n"
        )
    }

    /// Each frontend address has its own entry: `SVC_NO_RULE`, or `SVC_HA_PORTS` with HA
    /// ports.
    #[test]
    fn each_frontend_address_has_its_own_entry() {
        let vip = frontend_key("192.0.2.10".parse().unwrap(), 0, ADDRESS_PROTO);
        assert_eq!(lbs("198.51.100.11", &rule("http", 80)).addresses, [(vip, SVC_NO_RULE)]);
        let yaml = "virtual_network: {address_space: [198.51.100.0/24]}
load_balancers:
  - name: edge
    frontends: [{name: vip, address: 192.0.2.10}]
    backend_pools: [{name: web, backends: [198.51.100.11]}]
    rules: [{name: ha, frontend: vip, protocol: all, frontend_port: 0, backend_pool: web}]
";
        let compiled = compile(&crate::load_str(yaml, "lb.yaml").unwrap()).unwrap();
        assert_eq!(compiled.addresses, [(vip, SVC_HA_PORTS)]);
    }

    /// Each frontend as (key, load balancer/rule, fixed backend address) and each service's
    /// pool as addresses: what ids stand for, whatever they are.
    type Meaning = (Vec<(FrontendKey, String, Option<IpAddr>)>, Vec<Vec<IpAddr>>);

    fn meaning(l: &CompiledLb) -> Meaning {
        let frontends = l
            .frontends
            .iter()
            .map(|(k, s, b, _)| {
                let spec = &l.services[*s as usize];
                let fixed = (*b != NO_BACKEND).then(|| l.backends[*b as usize]);
                (*k, format!("{}/{}", spec.lb, spec.rule), fixed)
            })
            .collect();
        let pools = l
            .services
            .iter()
            .filter(|s| !s.pool.is_empty())
            .map(|s| s.pool.iter().map(|(b, _)| l.backends[*b as usize]).collect())
            .collect();
        (frontends, pools)
    }

    /// A reload that drops a backend and a rule and adds others keeps the ids of what
    /// stays (seen failing as compiled: every id shifted down), keeps what went retired
    /// at its id, and gives the new ones new ids; the frontends and pools mean what the new
    /// policy says.
    #[test]
    fn a_reload_keeps_the_ids_of_what_stays() {
        let (a, b, c, d): (IpAddr, IpAddr, IpAddr, IpAddr) = (
            "198.51.100.10".parse().unwrap(),
            "198.51.100.11".parse().unwrap(),
            "198.51.100.12".parse().unwrap(),
            "198.51.100.13".parse().unwrap(),
        );
        let before = lbs(
            "198.51.100.10, 198.51.100.11, 198.51.100.12",
            &(rule("http", 80) + &rule("https", 443)),
        );
        assert_eq!(before.backends, [a, b, c]);
        let names: Vec<_> = before.services.iter().map(|s| s.rule.as_str()).collect();
        assert_eq!(names, ["http", "https", "admin"]);
        let after = lbs(
            "198.51.100.11, 198.51.100.12, 198.51.100.13",
            &(rule("https", 443) + &rule("alt", 8080)),
        );
        let carried = after.clone().carried(&before.backends, &service_names(&before)).unwrap();
        assert_eq!(carried.backends, [a, b, c, d], "b and c keep 1 and 2, a stays retired");
        assert_eq!(carried.in_use(), [1, 2, 3].into());
        let names: Vec<_> = carried.services.iter().map(|s| s.rule.as_str()).collect();
        assert_eq!(names, ["http", "https", "admin", "alt"]);
        let retired = &carried.services[0];
        assert!(retired.pool.is_empty() && retired.probe.is_none() && retired.flags == 0);
        assert!(carried.frontends.iter().all(|f| f.1 != 0), "no frontend of a retired rule");
        assert_eq!(meaning(&carried), meaning(&after));
        // Carried onto itself: nothing moves.
        let again = carried.clone().carried(&carried.backends, &service_names(&carried)).unwrap();
        assert_eq!(again, carried);
    }

    /// Once a table is full, a new item takes a retired item's id.
    #[test]
    fn a_full_table_reuses_a_retired_id() {
        let ids = carry(&["x", "y"], &["a", "x"], 2, "backends").unwrap();
        assert_eq!(ids.of, [1, 0]);
        assert_eq!(ids.table, [Some(1), Some(0)]);
        assert!(carry(&["x", "y", "z"], &["a", "x"], 2, "backends").is_err());
    }
}
