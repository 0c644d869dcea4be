//! The node file's `bgp:` section: this node's values for announcing the frontends over
//! BGP (issue 16). The policy is the same on every node of a fleet; these are not.
//!
//! ```yaml
//! bgp:
//!   table: 4242              # kernel table the agent keeps the announced routes in
//!   router_id: 10.0.1.2      # this node's BGP identifier
//!   local_as: 65001          # this node's AS (the same on every gateway of a fleet)
//!   hold_time: 9             # seconds; keepalives every third of it (default 9)
//!   peers:
//!     - {address: 10.0.1.1, as: 65000}
//! ```

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Result, anyhow, bail};
use xdpgate_dataplane::host_routes::DEFAULT_TABLE;
use xdpgate_policy::tree::{self, Kind, Value};

use super::{Problems, at, text_of};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bgp {
    /// The kernel routing table the agent writes and the daemon learns.
    pub table: u32,
    pub router_id: Ipv4Addr,
    pub local_as: u32,
    /// BGP hold time in seconds: how long peers keep this node's routes after its daemon
    /// (or its link) goes silent.
    pub hold_time: u16,
    pub peers: Vec<Peer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub address: IpAddr,
    pub asn: u32,
}

/// The default hold time: a dead node's routes go within 9 s (keepalives every 3 s).
pub const DEFAULT_HOLD_TIME: u16 = 9;

/// Tables the kernel uses itself: `unspec`, `default`, `main`, `local`.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

fn number(v: &tree::Node, what: &str, lo: u64, hi: u64) -> Result<u64> {
    let Some(Value::Int(Some(n))) = v.value() else {
        bail!("{}: bgp: {what}: expected a number, found {}", at(v.pos), v.describe());
    };
    u64::try_from(n).ok().filter(|n| (lo..=hi).contains(n)).ok_or_else(|| {
        anyhow!("{}: bgp: {what}: {n} is out of range (between {lo} and {hi})", at(v.pos))
    })
}

fn address<T: std::str::FromStr>(v: &tree::Node, what: &str, kind: &str) -> Result<T> {
    match v.value() {
        Some(Value::Str(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| anyhow!("{}: bgp: {what}: expected {kind}, found {}", at(v.pos), v.describe()))
}

fn key(k: &tree::Node) -> String {
    text_of(k).unwrap_or_default()
}

/// Reads the `bgp:` mapping: `router_id`, `local_as` and `peers` (at least one) are
/// required, `table` and `hold_time` optional. Each problem is noted in `problems`, the
/// fields and peers read apart; `None` when there was one.
pub fn read(v: &tree::Node, problems: &mut Problems) -> Option<Bgp> {
    let Kind::Map(fields) = &v.kind else {
        problems.push(anyhow!("{}: bgp: expected a mapping, found {}", at(v.pos), v.describe()));
        return None;
    };
    let before = problems.len();
    let (mut table, mut router_id, mut local_as, mut hold_time, mut peers) =
        (None, None, None, None, None);
    let mut written = HashSet::new();
    for (k, v) in fields {
        written.insert(key(k));
        let read = match key(k).as_str() {
            "table" => table_number(v).map(|n| table = Some(n)),
            "router_id" => router(v).map(|id| router_id = Some(id)),
            "local_as" => {
                number(v, "local_as", 1, u32::MAX.into()).map(|n| local_as = Some(n as u32))
            }
            "hold_time" => number(v, "hold_time", 3, 65535).map(|n| hold_time = Some(n as u16)),
            "peers" => {
                let noted = problems.len();
                let list = read_peers(v, problems);
                if list.is_empty() && problems.len() == noted {
                    problems.push(anyhow!("{}: bgp: peers: lists no peer", at(v.pos)));
                }
                peers = Some(list);
                Ok(())
            }
            other => Err(anyhow!(
                "{}: bgp: unknown field {:?} (known: table, router_id, local_as, hold_time, \
                 peers)",
                at(k.pos),
                tree::elide(other)
            )),
        };
        if let Err(e) = read {
            problems.push(e);
        }
    }
    // Those not written at all (a wrong value has its own error).
    for required in ["router_id", "local_as", "peers"] {
        if !written.contains(required) {
            problems.push(anyhow!("{}: bgp: {required} is missing", at(v.pos)));
        }
    }
    if problems.len() != before {
        return None;
    }
    Some(Bgp {
        table: table.unwrap_or(DEFAULT_TABLE),
        router_id: router_id?,
        local_as: local_as?,
        hold_time: hold_time.unwrap_or(DEFAULT_HOLD_TIME),
        peers: peers?,
    })
}

/// `table:`, not one of the kernel's own.
fn table_number(v: &tree::Node) -> Result<u32> {
    let n = number(v, "table", 1, u32::MAX.into())? as u32;
    if RESERVED_TABLES.contains(&n) {
        bail!(
            "{}: bgp: table: {n} is one of the kernel's own tables (default, main, local): \
             choose another, e.g. {DEFAULT_TABLE}",
            at(v.pos)
        );
    }
    Ok(n)
}

/// `router_id:`, an IPv4 address other than 0.0.0.0.
fn router(v: &tree::Node) -> Result<Ipv4Addr> {
    let id: Ipv4Addr = address(v, "router_id", "an IPv4 address")?;
    if id.is_unspecified() {
        bail!(
            "{}: bgp: router_id: 0.0.0.0 is not a router ID (BGP needs one other than 0.0.0.0)",
            at(v.pos)
        );
    }
    Ok(id)
}

/// `peers:`, each peer read apart; the problems noted.
fn read_peers(v: &tree::Node, problems: &mut Problems) -> Vec<Peer> {
    let Kind::Seq(items) = &v.kind else {
        problems.push(anyhow!(
            "{}: bgp: peers: expected a list, found {}",
            at(v.pos),
            v.describe()
        ));
        return Vec::new();
    };
    let mut peers: Vec<Peer> = Vec::new();
    // A set, not a scan of those before: 200,000 peers took 6 s that way.
    let mut seen = HashSet::new();
    for item in items {
        match read_peer(item) {
            Ok(peer) if !seen.insert(peer.address) => problems.push(anyhow!(
                "{}: bgp: peers: {} is listed twice",
                at(item.pos),
                peer.address
            )),
            Ok(peer) => peers.push(peer),
            Err(e) => problems.push(e),
        }
    }
    peers
}

fn read_peer(item: &tree::Node) -> Result<Peer> {
    let Kind::Map(fields) = &item.kind else {
        bail!("{}: bgp: peers: expected a mapping, found {}", at(item.pos), item.describe());
    };
    let (mut address_of, mut asn) = (None, None);
    for (k, v) in fields {
        match key(k).as_str() {
            "address" => address_of = Some(address(v, "peers: address", "an IP address")?),
            "as" => asn = Some(number(v, "peers: as", 1, u32::MAX.into())? as u32),
            other => bail!(
                "{}: bgp: peers: unknown field {:?} (known: address, as)",
                at(k.pos),
                tree::elide(other)
            ),
        }
    }
    let missing = |what: &str| anyhow!("{}: bgp: peers: {what} is missing", at(item.pos));
    let peer = Peer {
        address: address_of.ok_or_else(|| missing("address"))?,
        asn: asn.ok_or_else(|| missing("as"))?,
    };
    if let Some(why) = no_neighbour(peer.address) {
        bail!("{}: bgp: peers: {} {why}", at(item.pos), peer.address);
    }
    Ok(peer)
}

/// Why `addr` cannot be a BGP neighbour in the configuration written for BIRD, which
/// would refuse it (a link-local one needs an interface the node file does not name).
fn no_neighbour(addr: IpAddr) -> Option<&'static str> {
    let mapped = matches!(addr, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
    // IPv6's only: BIRD takes an IPv4 one (169.254.0.0/16) as it is, and VPN tunnels to
    // clouds peer on such addresses.
    let link_local = matches!(addr, IpAddr::V6(a) if a.is_unicast_link_local());
    let broadcast = matches!(addr, IpAddr::V4(a) if a.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || broadcast {
        Some("is not a neighbour's address (unspecified, multicast or broadcast)")
    } else if mapped {
        Some("is an IPv4-mapped IPv6 address: write the IPv4 address")
    } else if link_local {
        Some("is link-local: the session would need an interface; use a global address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "interfaces:\n  - {name: eth0, role: external}\n";

    fn parse(bgp: &str) -> Result<Option<Bgp>> {
        crate::node::parse(&format!("{NODE}{bgp}\n")).map(|n| n.bgp)
    }

    #[test]
    fn bgp_sections() {
        assert_eq!(parse("").unwrap(), None);
        let b = parse(
            "bgp: {router_id: 203.0.113.2, local_as: 4200000001, peers: [{address: 203.0.113.1, \
             as: 65000}, {address: '2001:db8::1', as: 65000}]}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(b.table, DEFAULT_TABLE);
        assert_eq!(b.hold_time, DEFAULT_HOLD_TIME);
        assert_eq!(b.local_as, 4_200_000_001);
        assert_eq!(b.peers[1].address, "2001:db8::1".parse::<IpAddr>().unwrap());
        // An IPv4 link-local peer, as cloud VPN tunnels have, is BIRD's to take.
        let apipa = "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: 169.254.21.1, \
                     as: 65515}]}";
        assert!(parse(apipa).unwrap().is_some());
        let ok = "router_id: 203.0.113.2, local_as: 65001, peers: [{address: 203.0.113.1, as: 1}]";
        for (bad, why) in [
            ("bgp: 4242", "line 3, column 6: bgp: expected a mapping, found integer 4242"),
            (&format!("bgp: {{table: 255, {ok}}}"), "table: 255 is one of the kernel's own"),
            (&format!("bgp: {{table: 0, {ok}}}"), "table: 0 is out of range"),
            (&format!("bgp: {{hold_time: 2, {ok}}}"), "hold_time: 2 is out of range (between 3"),
            (&format!("bgp: {{asn: 2, {ok}}}"), "bgp: unknown field \"asn\" (known: table,"),
            ("bgp: {local_as: 1, peers: [{address: 203.0.113.1, as: 1}]}", "router_id is missing"),
            ("bgp: {router_id: 203.0.113.2, local_as: 1, peers: []}", "peers: lists no peer"),
            (
                "bgp: {router_id: '2001:db8::2', local_as: 1, peers: [{address: 203.0.113.1, as: 1}]}",
                "router_id: expected an IPv4 address, found string \"2001:db8::2\"",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 0, peers: [{address: 203.0.113.1, as: 1}]}",
                "local_as: 0 is out of range",
            ),
            // BIRD refuses router ID 0 (seen failing: `check` said ok).
            (
                "bgp: {router_id: 0.0.0.0, local_as: 1, peers: [{address: 203.0.113.1, as: 1}]}",
                "line 3, column 18: bgp: router_id: 0.0.0.0 is not a router ID (BGP needs one \
                 other than 0.0.0.0)",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: 203.0.113.1}]}",
                "bgp: peers: as is missing",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: 203.0.113.1, as: 1}, \
                 {address: 203.0.113.1, as: 2}]}",
                "203.0.113.1 is listed twice",
            ),
            // Addresses BIRD refuses as neighbours: `check` said ok, then the node announced
            // nothing (seen failing: accepted).
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: 'fe80::1', as: 1}]}",
                "fe80::1 is link-local",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: '::', as: 1}]}",
                ":: is not a neighbour's address",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: 224.0.0.5, as: 1}]}",
                "224.0.0.5 is not a neighbour's address",
            ),
            (
                "bgp: {router_id: 203.0.113.2, local_as: 1, peers: [{address: '::ffff:203.0.113.1', \
                 as: 1}]}",
                "IPv4-mapped",
            ),
        ] {
            let e = format!("{:#}", parse(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// deploy/bird/bird.conf is what `xdpgate bgp bird-config` writes for
    /// deploy/bird/node.yaml (regenerate it with that command when this fails).
    #[test]
    fn the_shipped_bird_conf_is_the_generated_one() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/bird/");
        let node = crate::node::load(std::path::Path::new(&format!("{dir}node.yaml"))).unwrap();
        let shipped = std::fs::read_to_string(format!("{dir}bird.conf")).unwrap();
        assert_eq!(crate::bgp::bird::config(&node.bgp.unwrap()), shipped);
    }
}
