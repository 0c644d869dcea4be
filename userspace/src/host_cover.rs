//! Host mode's blind spot, said at every apply: a host NSG covers the addresses it lists,
//! while the kernel takes a packet for any of its addresses (and an IPv6 link-local one for
//! its own interface) whatever interface it arrives on. Where an attached interface carries
//! an address a host NSG covers (host mode), the host's addresses no NSG covers are open
//! through it: its automatic IPv6 link-local address above all.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use xdpgate_dataplane::PinDir;
use xdpgate_policy::{Layer, Policy};

/// One warning per attached interface in host mode with addresses of this host (in the
/// dataplane's namespace) that no NSG covers.
pub fn warnings(pins: &PinDir, policy: &Policy) -> Result<Vec<String>> {
    // The attached interfaces of this namespace: without `--netns`, another one's of the
    // same name would be judged by this namespace's addresses.
    let attached: Vec<String> = pins
        .attached()?
        .into_iter()
        .filter(|name| {
            let here = nix::net::if_::if_nametoindex(name.as_str()).ok();
            xdpgate_dataplane::link_info(pins, name).is_ok_and(|l| Some(l.ifindex) == here)
        })
        .collect();
    let mut by_iface: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for a in crate::host_addrs::list()?.into_iter().filter(|a| !a.ip.is_loopback()) {
        by_iface.entry(a.interface).or_default().push(a.ip);
    }
    Ok(uncovered(policy, &attached, &by_iface))
}

/// [`warnings`] for the host's addresses `by_iface`.
fn uncovered(
    policy: &Policy,
    attached: &[String],
    by_iface: &BTreeMap<String, Vec<IpAddr>>,
) -> Vec<String> {
    let covered_at = |layer, ip: &IpAddr| {
        policy.nsgs.iter().any(|n| n.associated(layer).iter().any(|net| net.contains(ip)))
    };
    let covered = |ip: &IpAddr| covered_at(Layer::Host, ip) || covered_at(Layer::Subnet, ip);
    let mut out = Vec::new();
    for iface in attached {
        let own = by_iface.get(iface).map(Vec::as_slice).unwrap_or_default();
        if !own.iter().any(|ip| covered_at(Layer::Host, ip)) {
            continue;
        }
        // Its own addresses, and the others of the host but their IPv6 link-local ones,
        // which the kernel takes only on their interface (IPv4's it takes on any).
        let mut open: Vec<String> = by_iface
            .iter()
            .flat_map(|(name, ips)| ips.iter().map(move |ip| (name, ip)))
            .filter(|(name, ip)| (*name == iface || !ipv6_link_local(ip)) && !covered(ip))
            .map(|(_, ip)| ip.to_string())
            .collect();
        open.sort();
        open.dedup();
        if !open.is_empty() {
            out.push(format!(
                "{iface} is in host mode (a host NSG covers its address), but no NSG covers this \
                 host's {}: packets to {} arriving on {iface} pass unfiltered; list {} under the \
                 NSG's `hosts`",
                open.join(", "),
                if open.len() == 1 { "it" } else { "them" },
                if open.len() == 1 { "it" } else { "them" },
            ));
        }
    }
    out
}

fn ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: host
    hosts: [198.51.100.10, "2001:db8:1::10"]
  - name: lan
    subnets: [10.1.0.0/24]
"#;

    fn addrs(list: &[(&str, &str)]) -> BTreeMap<String, Vec<IpAddr>> {
        let mut m: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (iface, ip) in list {
            m.entry(iface.to_string()).or_default().push(ip.parse().unwrap());
        }
        m
    }

    /// The attached interface's link-local address and the host's uncovered addresses (an
    /// IPv4 link-local one of another interface too: seen left out after a review) are
    /// named, as the policy spells them; covered ones, another interface's IPv6 link-local
    /// one and a gateway's interfaces (no host NSG covers their addresses) are not.
    #[test]
    fn names_what_no_nsg_covers_in_host_mode() {
        let policy = xdpgate_policy::yaml::load_str(POLICY, "policy.yaml").unwrap();
        let host = addrs(&[
            ("eth0", "198.51.100.10"),
            ("eth0", "2001:db8:1::10"),
            ("eth0", "fe80::1"),
            ("docker0", "172.17.0.1"),
            ("docker0", "169.254.5.5"),
            ("docker0", "fe80::2"),
            ("eth1", "10.1.0.5"),
        ]);
        let w = uncovered(&policy, &["eth0".into()], &host);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("eth0 is in host mode"), "{w:?}");
        // IPv4 link-local included: the kernel takes it on any interface.
        let named = "this host's 169.254.5.5, 172.17.0.1, fe80::1: packets to them";
        assert!(w[0].contains(named), "{w:?}");
        let gateway = addrs(&[("eth0", "203.0.113.1"), ("eth0", "fe80::1")]);
        assert!(uncovered(&policy, &["eth0".into()], &gateway).is_empty());
        let covered = addrs(&[("eth0", "198.51.100.10"), ("eth1", "10.1.0.5")]);
        assert!(uncovered(&policy, &["eth0".into()], &covered).is_empty());
    }
}
