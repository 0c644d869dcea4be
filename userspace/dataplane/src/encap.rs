//! This node's outer source addresses for load-balancing rules with `forwarding: ipip`
//! (`ENCAP_SOURCES`). Node-specific, so not in the policy that every node shares: given in
//! the node file (`encapsulation: {source4, source6}`), or else the first global address of
//! the family on the interfaces xdpgate is attached to (in name order), read over netlink at
//! each apply. An apply whose policy encapsulates a family this node has no source for is
//! refused before anything changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use aya::maps::Array;
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
/// `IFA_F_TENTATIVE`, `IFA_F_DADFAILED`, `IFA_F_DEPRECATED`: not to send from.
const UNUSABLE: u32 = 0x40 | 0x08 | 0x20;

/// The outer source of each family; `None`: not given (then found) or not found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Sources {
    /// `given` (the node file's), completed with the first global address of each family
    /// missing there on the attached interfaces.
    pub fn resolve(pins: &PinDir, given: Sources) -> Result<Sources> {
        if given.v4.is_some() && given.v6.is_some() {
            return Ok(given);
        }
        Self::resolve_on(&pins.attached()?, given)
    }

    /// `given`, completed from the interfaces `names` (in that order; one missing is
    /// skipped).
    pub fn resolve_on(names: &[String], given: Sources) -> Result<Sources> {
        if given.v4.is_some() && given.v6.is_some() {
            return Ok(given);
        }
        let mut found = given;
        for name in names {
            let Ok(index) = crate::ifindex(name) else { continue };
            for addr in global_addresses(index)? {
                match addr {
                    IpAddr::V4(a) if found.v4.is_none() => found.v4 = Some(a),
                    IpAddr::V6(a) if found.v6.is_none() => found.v6 = Some(a),
                    _ => {}
                }
            }
        }
        Ok(found)
    }
}

/// Refuses `lbs` when one of its encapsulating rules has a frontend of a family `sources`
/// lacks, naming the rule; otherwise writes `sources` into `ENCAP_SOURCES` (a dataplane
/// loaded before the map has none: only a policy that needs it is refused).
pub fn install(pins: &PinDir, lbs: &CompiledLb, sources: Sources) -> Result<()> {
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
            bail!(
                "load balancer {}, rule {}: forwarding: ipip needs an {family} address of this \
                 node to send from, and none of the attached interfaces ({}) has a global one; \
                 give it in the node file (encapsulation: {{{field}: ...}}). Nothing changed",
                spec.lb,
                spec.rule,
                pins.attached()?.join(", ")
            );
        }
    }
    let map = match pins.open_map(ENCAP_SOURCES) {
        Ok(map) => map,
        Err(e) if lbs.services.iter().any(|s| s.flags & SVC_ENCAP != 0) => {
            return Err(e.context(
                "this dataplane was loaded by a build without encapsulation: attach again \
                 (xdpgate upgrade) before applying a policy with forwarding: ipip",
            ));
        }
        Err(_) => return Ok(()),
    };
    let mut map: Array<_, [u32; 4]> = map.try_into()?;
    let v4 = sources.v4.map_or([0; 4], |a| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        words(&b)
    });
    let v6 = sources.v6.map_or([0; 4], |a| words(&a.octets()));
    map.set(ENCAP_SOURCE_V4, v4, 0).context("writing the outer IPv4 source")?;
    map.set(ENCAP_SOURCE_V6, v6, 0).context("writing the outer IPv6 source")?;
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

/// The usable global addresses of interface `index`, in the kernel's order.
fn global_addresses(index: u32) -> Result<Vec<IpAddr>> {
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
        if at != index || scope != RT_SCOPE_UNIVERSE {
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
