//! Host routes in a kernel routing table of xdpgate's own, over rtnetlink: the addresses the
//! agent wants a BGP daemon to announce (issue 16). The daemon learns the table (BIRD's
//! `kernel` protocol with `learn`, FRR's `redistribute table`), so the routes are what
//! `ip route show table N` shows an operator. Each route is `ADDR/32 dev lo proto 245` (or
//! /128), at the lowest metric ([`metric`]): the table is never consulted for forwarding,
//! only read by the daemon.

use std::net::IpAddr;

use anyhow::{Context, Result};

use crate::rtnetlink::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, attr, attributes, header};

/// The routes' protocol (`ip route ... proto 245`): none of the numbers iproute2 reserves,
/// so the agent removes only its own routes from the table.
pub const PROTO: u8 = 245;

/// The table the agent writes when the node file names none.
pub const DEFAULT_TABLE: u32 = 4242;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PRIORITY: u16 = 6;
const RTA_TABLE: u16 = 15;
/// `RT_TABLE_COMPAT`: what `rtm_table` says of a table above 255 (`RTA_TABLE` has it all).
const RT_TABLE_COMPAT: u8 = 252;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The host routes of protocol [`PROTO`] in `table`, in the current network namespace.
pub fn list(table: u32) -> Result<Vec<IpAddr>> {
    Ok(read(table)?.ours())
}

/// One host route of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub addr: IpAddr,
    /// Its protocol (`proto`): [`PROTO`] for the agent's.
    pub proto: u8,
    /// Its metric (`RTA_PRIORITY`, 0 when the kernel sends none).
    pub metric: u32,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} proto {} metric {}", self.addr, proto_name(self.proto), self.metric)
    }
}

/// What one listing of a table read.
pub struct Listing {
    /// The host routes in the table, of every protocol: the agent's, and any another
    /// program (or the operator) put there.
    pub routes: Vec<Route>,
    /// The route messages the kernel sent to answer: what a listing costs.
    pub messages: usize,
}

impl Listing {
    /// The addresses of the agent's routes (protocol [`PROTO`]).
    pub fn ours(&self) -> Vec<IpAddr> {
        self.routes.iter().filter(|r| r.proto == PROTO).map(|r| r.addr).collect()
    }

    /// The route of another protocol that hides the agent's route of `addr` from the
    /// daemon, if the agent has one here: BIRD's kernel protocol keeps one route per
    /// address, the lowest metric's, and of two at one metric the one it heard of last, so
    /// another's at the agent's metric or below hides it.
    pub fn hiding(&self, addr: IpAddr) -> Option<Route> {
        let ours = self.routes.iter().find(|r| r.addr == addr && r.proto == PROTO)?;
        self.other_at_or_below(addr, ours.metric)
    }

    /// The route of another protocol that would hide the agent's route of `addr` were it
    /// added now (at [`metric`]): the agent does not add it.
    pub fn blocking(&self, addr: IpAddr) -> Option<Route> {
        self.other_at_or_below(addr, metric(addr))
    }

    fn other_at_or_below(&self, addr: IpAddr, at: u32) -> Option<Route> {
        (self.routes.iter())
            .filter(|r| r.addr == addr && r.proto != PROTO && r.metric <= at)
            .min_by_key(|r| r.metric)
            .copied()
    }
}

/// The metric of the agent's routes: the lowest the kernel keeps (IPv4 0; IPv6 1, as it
/// makes 0 its default 1024), so that a route of another protocol at any other metric
/// leaves the agent's the one the daemon learns.
pub fn metric(addr: IpAddr) -> u32 {
    u32::from(addr.is_ipv6())
}

/// iproute2's name of a route protocol (`/etc/iproute2/rt_protos`), else its number.
fn proto_name(proto: u8) -> String {
    let name = match proto {
        2 => "kernel",
        3 => "boot",
        4 => "static",
        9 => "ra",
        11 => "zebra",
        12 => "bird",
        16 => "dhcp",
        186 => "bgp",
        188 => "ospf",
        _ => return proto.to_string(),
    };
    name.to_owned()
}

/// Lists `table`'s host routes (see [`Listing`]), counting what the kernel sent.
pub fn read(table: u32) -> Result<Listing> {
    let mut listing = Listing { routes: Vec::new(), messages: 0 };
    for family in [AF_INET, AF_INET6] {
        // Only this table's routes: the kernel filters (a host with a full BGP table in
        // another does not send it every second); `parse_route` checks again. Every
        // protocol's, to see another's route that hides the agent's: the table is the
        // agent's, so they are few.
        let mut req = header(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
        let compat = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
        req.extend_from_slice(&[family, 0, 0, 0, compat, 0, 0, 0]);
        req.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut req, RTA_TABLE, &table.to_ne_bytes());
        let what = "listing the routes of the announcement table";
        let done = rtnetlink::dump_filtered(req, what, |kind, body| {
            listing.messages += 1;
            if let Some(route) = (kind == RTM_NEWROUTE).then(|| parse_route(body, table)).flatten()
            {
                listing.routes.push(route);
            }
        });
        match done {
            // The kernel has no such table yet: no route was ever added to it.
            Err(e) if no_such_table(&e) => {}
            other => other?,
        }
    }
    Ok(listing)
}

fn no_such_table(e: &anyhow::Error) -> bool {
    errno(e) == Some(libc::ENOENT)
}

/// The kernel's error number behind `e`, if it is one.
fn errno(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error)
}

/// Adds the host route of `addr` to `table`; a route there for the address that is not ours
/// (another program's, the operator's) is an error, not replaced: ours are only those of
/// our protocol.
pub fn add(table: u32, addr: IpAddr) -> Result<()> {
    change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, table, addr).map_err(|e| {
        let held = if errno(&e) == Some(libc::EEXIST) {
            ": a route not the agent's holds the address there (another program's, or the \
             operator's)"
        } else {
            ""
        };
        e.context(format!("adding the route of {addr} to table {table}{held}"))
    })
}

/// Removes the host route of `addr` from `table`.
pub fn remove(table: u32, addr: IpAddr) -> Result<()> {
    change(RTM_DELROUTE, 0, table, addr)
        .with_context(|| format!("removing the route of {addr} from table {table}"))
}

fn change(kind: u16, flags: u16, table: u32, addr: IpAddr) -> Result<()> {
    let lo = crate::fib::ifindex("lo")?;
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    let mut req = header(kind, NLM_F_REQUEST | NLM_F_ACK | flags);
    let prefix = (bytes.len() * 8) as u8;
    let compat = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
    req.extend_from_slice(&[family, prefix, 0, 0, compat, PROTO, RT_SCOPE_LINK, RTN_UNICAST]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut req, RTA_DST, &bytes);
    attr(&mut req, RTA_OIF, &lo.to_ne_bytes());
    attr(&mut req, RTA_TABLE, &table.to_ne_bytes());
    if kind == RTM_NEWROUTE {
        attr(&mut req, RTA_PRIORITY, &metric(addr).to_ne_bytes());
    }
    rtnetlink::request(req, "changing the announcement table", |_, _| {})
}

/// One `RTM_NEWROUTE` body: the route when it is a host route in `table`.
fn parse_route(body: &[u8], table: u32) -> Option<Route> {
    let (family, prefix) = (*body.first()?, *body.get(1)?);
    let (compat, proto) = (*body.get(4)?, *body.get(5)?);
    let (mut dst, mut in_table, mut metric) = (None, u32::from(compat), 0);
    for (kind, value) in attributes(body, 12) {
        match (kind, value.len()) {
            (RTA_DST, 4) => dst = Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
            (RTA_DST, 16) => dst = Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
            (RTA_TABLE, 4) => in_table = u32::from_ne_bytes(value.try_into().ok()?),
            (RTA_PRIORITY, 4) => metric = u32::from_ne_bytes(value.try_into().ok()?),
            _ => {}
        }
    }
    let host = (family == AF_INET && prefix == 32) || (family == AF_INET6 && prefix == 128);
    (host && in_table == table).then_some(Route { addr: dst?, proto, metric })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_route_hides_the_agents_at_its_metric_or_below() {
        let route =
            |addr: &str, proto, metric| Route { addr: addr.parse().unwrap(), proto, metric };
        let (v4, v6) = ("192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap());
        // An earlier agent's IPv6 route at the kernel's default 1024, another's at 100: hidden,
        // but the agent's at its own metric would not be.
        let listing = Listing {
            routes: vec![route("2001:db8::10", PROTO, 1024), route("2001:db8::10", 4, 100)],
            messages: 2,
        };
        assert_eq!(listing.hiding(v6), Some(route("2001:db8::10", 4, 100)));
        assert_eq!(listing.blocking(v6), None);
        // At the agent's metric: hidden either way, and shown as `ip` does.
        let listing = Listing {
            routes: vec![route("192.0.2.10", PROTO, 0), route("192.0.2.10", 4, 0)],
            messages: 2,
        };
        assert_eq!(listing.blocking(v4).unwrap().to_string(), "192.0.2.10 proto static metric 0");
        assert!(listing.hiding(v4).is_some());
        // Above it, or without a route of the agent's: nothing hidden.
        let listing = Listing {
            routes: vec![route("192.0.2.10", PROTO, 0), route("192.0.2.10", 4, 100)],
            messages: 2,
        };
        assert_eq!((listing.hiding(v4), listing.blocking(v4)), (None, None));
        assert_eq!(
            Listing { routes: vec![route("192.0.2.10", 4, 0)], messages: 1 }.hiding(v4),
            None
        );
    }
}
