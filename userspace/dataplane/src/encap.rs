//! This node's outer source addresses for load-balancing rules with `forwarding: ipip`
//! (`ENCAP_SOURCES`). Node-specific, so not in the policy that every node shares: given in
//! the node file (`encapsulation: {source4, source6}`); at `xdpgate apply`, the source the
//! dataplane has while it is still an address of this host (what the agent set from the
//! node file survives a one-shot apply); or else the first usable global address of the
//! family on the interfaces xdpgate is attached to (in name order), read over netlink at
//! each apply. Never a frontend of the policy (the backends hold those: the outer packets
//! would come from their own address) nor a temporary, deprecated or tentative address. An
//! apply whose policy encapsulates a family this node has no source for is refused before
//! anything changes; the sources chosen are logged, and `xdpgate lb` shows them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};
use xdpgate_common::{
    lb::SVC_ENCAP,
    maps::{ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, ENCAP_SOURCES},
    words,
};
use xdpgate_policy::lb::CompiledLb;

use crate::{
    PinDir,
    rtnetlink::{self, NLM_F_DUMP, NLM_F_REQUEST, attributes, header},
};

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const RT_SCOPE_UNIVERSE: u8 = 0;
/// `IFA_F_TEMPORARY` (a privacy address: it rotates), `IFA_F_DADFAILED`,
/// `IFA_F_DEPRECATED`, `IFA_F_TENTATIVE`: not to send from.
const UNUSABLE: u32 = 0x01 | 0x08 | 0x20 | 0x40;

/// The outer source of each family; `None`: not given (then found) or not found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// The outer sources an apply writes, with where each came from (for the log).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chosen {
    pub sources: Sources,
    /// IPv4's and IPv6's origin: "node file", "kept", or "found on <interface>".
    pub from: [String; 2],
}

/// Who applies: what its refusal tells it to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applier {
    /// `xdpgate run`, with or without a node file.
    Agent,
    /// `xdpgate apply`, which has no node file.
    Cli,
}

impl Chosen {
    /// `given`, each family it has coming `from` there.
    pub fn given(given: Sources, from: &str) -> Self {
        let label = |set: bool| if set { from.to_owned() } else { String::new() };
        Self { sources: given, from: [label(given.v4.is_some()), label(given.v6.is_some())] }
    }

    /// What `ENCAP_SOURCES` holds (none from a dataplane without it), each family only
    /// while it is still a usable address of this host (any interface) and not in `avoid`.
    pub fn kept(pins: &PinDir, avoid: &[IpAddr]) -> Result<Self> {
        let Ok(held) = read(pins) else { return Ok(Self::default()) };
        let host = usable_addresses(None)?;
        let keep = |a: IpAddr| host.contains(&a) && !avoid.contains(&a);
        let held = Sources {
            v4: held.v4.filter(|&a| keep(a.into())),
            v6: held.v6.filter(|&a| keep(a.into())),
        };
        Ok(Self::given(held, "kept"))
    }

    /// Completes each family missing with the first usable global address of the
    /// interfaces `names` (in that order; one missing is skipped) not in `avoid`.
    pub fn complete_on(mut self, names: &[String], avoid: &[IpAddr]) -> Result<Self> {
        for name in names {
            if self.sources.v4.is_some() && self.sources.v6.is_some() {
                break;
            }
            let Ok(index) = crate::ifindex(name) else { continue };
            for addr in usable_addresses(Some(index))? {
                match addr {
                    _ if avoid.contains(&addr) => {}
                    IpAddr::V4(a) if self.sources.v4.is_none() => {
                        self.sources.v4 = Some(a);
                        self.from[0] = format!("found on {name}");
                    }
                    IpAddr::V6(a) if self.sources.v6.is_none() => {
                        self.sources.v6 = Some(a);
                        self.from[1] = format!("found on {name}");
                    }
                    _ => {}
                }
            }
        }
        Ok(self)
    }
}

impl fmt::Display for Chosen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one = |a: Option<IpAddr>, from: &str| match a {
            Some(a) => format!("{a} ({from})"),
            None => "none".to_owned(),
        };
        write!(
            f,
            "IPv4 {}, IPv6 {}",
            one(self.sources.v4.map(IpAddr::from), &self.from[0]),
            one(self.sources.v6.map(IpAddr::from), &self.from[1])
        )
    }
}

/// The frontend addresses of `lbs`: never an outer source.
pub fn frontends(lbs: &CompiledLb) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> =
        lbs.frontends.iter().map(|(key, ..)| crate::flows::addr(&key.addr, key.family)).collect();
    out.sort();
    out.dedup();
    out
}

/// `ENCAP_SOURCES`, as [`check`] opened it for [`install`].
pub type SourcesMap = Array<MapData, [u32; 4]>;

/// Refuses `lbs` when one of its encapsulating rules has a frontend of a family `chosen`
/// lacks, naming the rule and what `applier` can do, when a source is one of its
/// frontends, or when it needs `ENCAP_SOURCES` and the dataplane was loaded before the map.
/// Writes nothing: [`install`] writes the map it returns (none pinned: a dataplane loaded
/// before it, whose policy needs none) once the policy is sure to be applied.
pub fn check(
    pins: &PinDir,
    lbs: &CompiledLb,
    chosen: &Chosen,
    applier: Applier,
) -> Result<Option<SourcesMap>> {
    let sources = chosen.sources;
    let frontends = frontends(lbs);
    for (source, from) in [
        (sources.v4.map(IpAddr::from), &chosen.from[0]),
        (sources.v6.map(IpAddr::from), &chosen.from[1]),
    ] {
        if let Some(a) = source.filter(|a| frontends.contains(a)) {
            bail!(
                "the outer source {a} ({from}) is a frontend of this policy: the backends hold \
                 the frontends and would drop outer packets from their own address; give \
                 another address of this node. Nothing changed"
            );
        }
    }
    for (key, service, _, _) in &lbs.frontends {
        let spec = &lbs.services[*service as usize];
        if spec.flags & SVC_ENCAP == 0 {
            continue;
        }
        let (missing, family, field) = match key.family {
            4 => (sources.v4.is_none(), "IPv4", "source4"),
            _ => (sources.v6.is_none(), "IPv6", "source6"),
        };
        if missing {
            let remedy = match applier {
                Applier::Agent => {
                    format!("give it in the node file (encapsulation: {{{field}: ...}})")
                }
                Applier::Cli => format!(
                    "add one to an attached interface, or run the agent with a node file that \
                     gives it (encapsulation: {{{field}: ...}}): xdpgate apply keeps the source \
                     the dataplane has"
                ),
            };
            bail!(
                "load balancer {}, rule {}: forwarding: ipip needs an {family} address of this \
                 node to send from; none was set, and none of the attached interfaces ({}) has \
                 a usable global one (frontends and temporary, deprecated or tentative \
                 addresses do not count); {remedy}. Nothing changed",
                spec.lb,
                spec.rule,
                pins.attached()?.join(", ")
            );
        }
    }
    match pins.open_map(ENCAP_SOURCES) {
        Ok(map) => Ok(Some(map.try_into()?)),
        Err(e) if lbs.services.iter().any(|s| s.flags & SVC_ENCAP != 0) => Err(e.context(
            "this dataplane was loaded by a build without encapsulation: attach again \
             (xdpgate upgrade) before applying a policy with forwarding: ipip",
        )),
        Err(_) => Ok(None),
    }
}

/// Writes the sources `chosen` into `map`, [`check`]'s, and logs them. With the load
/// balancers' tables: a policy that fails before them leaves the sources its running
/// policy sends from.
pub fn install(map: Option<&mut SourcesMap>, lbs: &CompiledLb, chosen: &Chosen) -> Result<()> {
    let sources = chosen.sources;
    let Some(map) = map else { return Ok(()) };
    let v4 = sources.v4.map_or([0; 4], |a| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        words(&b)
    });
    let v6 = sources.v6.map_or([0; 4], |a| words(&a.octets()));
    map.set(ENCAP_SOURCE_V4, v4, 0).context("writing the outer IPv4 source")?;
    map.set(ENCAP_SOURCE_V6, v6, 0).context("writing the outer IPv6 source")?;
    if lbs.services.iter().any(|s| s.flags & SVC_ENCAP != 0) {
        log::info!("outer sources of forwarding: ipip: {chosen}");
    }
    Ok(())
}

/// What `ENCAP_SOURCES` holds.
pub fn read(pins: &PinDir) -> Result<Sources> {
    let map: Array<_, [u32; 4]> = pins.open_map(ENCAP_SOURCES)?.try_into()?;
    let bytes = |w: [u32; 4]| -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
        }
        b
    };
    let v4 = bytes(map.get(&ENCAP_SOURCE_V4, 0)?);
    let v6 = bytes(map.get(&ENCAP_SOURCE_V6, 0)?);
    Ok(Sources {
        v4: (v4 != [0; 16]).then(|| Ipv4Addr::new(v4[0], v4[1], v4[2], v4[3])),
        v6: (v6 != [0; 16]).then(|| Ipv6Addr::from(v6)),
    })
}

/// The usable global addresses of interface `index` (of every interface: `None`), in the
/// kernel's order.
fn usable_addresses(index: Option<u32>) -> Result<Vec<IpAddr>> {
    let mut found = Vec::new();
    let req = {
        let mut req = header(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        // struct ifaddrmsg, every family.
        req.extend_from_slice(&[0, 0, 0, 0]);
        req.extend_from_slice(&0u32.to_ne_bytes());
        req
    };
    rtnetlink::request(req, "listing the interfaces' addresses", |kind, body| {
        if kind != RTM_NEWADDR || body.len() < 8 {
            return;
        }
        let (family, mut flags, scope) = (body[0], u32::from(body[2]), body[3]);
        let at = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        if index.is_some_and(|i| i != at) || scope != RT_SCOPE_UNIVERSE {
            return;
        }
        let (mut address, mut local) = (None, None);
        for (kind, value) in attributes(body, 8) {
            match kind {
                IFA_ADDRESS => address = ip(family, value),
                IFA_LOCAL => local = ip(family, value),
                IFA_FLAGS if value.len() == 4 => {
                    flags = u32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
                }
                _ => {}
            }
        }
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
        // point-to-point link); IPv6 sends IFA_ADDRESS alone.
        if let Some(addr) = local.or(address).filter(|_| flags & UNUSABLE == 0) {
            found.push(addr);
        }
    })?;
    Ok(found)
}

fn ip(family: u8, value: &[u8]) -> Option<IpAddr> {
    match (family, value.len()) {
        (2, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
        (10, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
        _ => None,
    }
}
