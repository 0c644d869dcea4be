//! Host routes in a kernel routing table of xdpgate's own, over rtnetlink: the addresses the
//! agent wants a BGP daemon to announce (issue 16). The daemon learns the table (BIRD's
//! `kernel` protocol with `learn`, FRR's `redistribute table`), so the routes are what
//! `ip route show table N` shows an operator. Each route is `ADDR/32 dev lo proto xdpgate`
//! (or /128): the table is never consulted for forwarding, only read by the daemon.

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
const RTA_TABLE: u16 = 15;
/// `RT_TABLE_COMPAT`: what `rtm_table` says of a table above 255 (`RTA_TABLE` has it all).
const RT_TABLE_COMPAT: u8 = 252;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The host routes of protocol [`PROTO`] in `table`, in the current network namespace.
pub fn list(table: u32) -> Result<Vec<IpAddr>> {
    Ok(read(table)?.routes)
}

/// What one listing of a table read.
pub struct Listing {
    /// The host routes of protocol [`PROTO`] in the table.
    pub routes: Vec<IpAddr>,
    /// The route messages the kernel sent to answer: what a listing costs.
    pub messages: usize,
}

/// Lists `table` (see [`list`]), counting what the kernel sent.
pub fn read(table: u32) -> Result<Listing> {
    let mut listing = Listing { routes: Vec::new(), messages: 0 };
    for family in [AF_INET, AF_INET6] {
        // Only this table's routes of our protocol: the kernel filters (a host with a full
        // BGP table in another does not send it every second); `parse_route` checks again.
        let mut req = header(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
        let compat = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
        req.extend_from_slice(&[family, 0, 0, 0, compat, PROTO, 0, 0]);
        req.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut req, RTA_TABLE, &table.to_ne_bytes());
        let what = "listing the routes of the announcement table";
        let done = rtnetlink::dump_filtered(req, what, |kind, body| {
            listing.messages += 1;
            if let Some(addr) = (kind == RTM_NEWROUTE).then(|| parse_route(body, table)).flatten() {
                listing.routes.push(addr);
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
    rtnetlink::request(req, "changing the announcement table", |_, _| {})
}

/// One `RTM_NEWROUTE` body: its destination when it is a host route of ours in `table`.
fn parse_route(body: &[u8], table: u32) -> Option<IpAddr> {
    let (family, prefix) = (*body.first()?, *body.get(1)?);
    let (compat, proto) = (*body.get(4)?, *body.get(5)?);
    let (mut dst, mut in_table) = (None, u32::from(compat));
    for (kind, value) in attributes(body, 12) {
        match (kind, value.len()) {
            (RTA_DST, 4) => dst = Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
            (RTA_DST, 16) => dst = Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
            (RTA_TABLE, 4) => in_table = u32::from_ne_bytes(value.try_into().ok()?),
            _ => {}
        }
    }
    let host = (family == AF_INET && prefix == 32) || (family == AF_INET6 && prefix == 128);
    (host && proto == PROTO && in_table == table).then_some(dst).flatten()
}
