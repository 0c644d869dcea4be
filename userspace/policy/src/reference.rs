//! A deliberately naive evaluator of NSG semantics over an expanded [`Policy`]: the oracle
//! the kernel dataplane is differentially tested against. It scans every NSG and every rule
//! for every packet; keep it that way, readable rather than fast.

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{Access, Direction, Layer, Policy, PortRange, Ports, Rule};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The direction it arrives in (the role of its interface: external inbound, internal
    /// outbound). NSG evaluation does not depend on it; load balancing and NAT do.
    pub direction: Direction,
    /// IP protocol number (IPv6 next header). `icmp` is 1 under IPv4 and 58 under IPv6,
    /// the addresses' family.
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None` for protocols without ports (ICMP, ESP, AH, ...) and non-first fragments.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// The rule that decided a packet at one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// Outbound: a layer of the source; inbound: a layer of the destination.
    pub direction: Direction,
    pub layer: Layer,
    pub nsg: String,
    pub rule: String,
    pub priority: u32,
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// One entry per layer that had an NSG for the packet, in evaluation order.
    pub decided_by: Vec<RuleRef>,
}

/// The layers a packet passes, in Azure's order: the source's outbound layers (its host's
/// NSG, then its subnet's), then the destination's inbound layers (its subnet's NSG, then its
/// host's). Traffic between two protected addresses passes both sides.
pub const PATH: [(Direction, Layer); 4] = [
    (Direction::Outbound, Layer::Host),
    (Direction::Outbound, Layer::Subnet),
    (Direction::Inbound, Layer::Subnet),
    (Direction::Inbound, Layer::Host),
];

/// Evaluates `pkt` as Azure does: each layer of [`PATH`] with an NSG for its address (the
/// source outbound, the destination inbound) must allow it.
pub fn evaluate(policy: &Policy, pkt: &Packet) -> Verdict {
    let mut decided_by = Vec::new();
    for (direction, layer) in PATH {
        let addr = match direction {
            Direction::Outbound => pkt.src,
            Direction::Inbound => pkt.dst,
        };
        let Some(nsg) = policy
            .nsgs
            .iter()
            .find(|nsg| nsg.associated(layer).iter().any(|net| net.contains(&addr)))
        else {
            continue;
        };
        // Loaded policies always end with the DenyAll default rules, so some rule matches;
        // should none match anyway, fail closed.
        let Some(rule) = winning_rule(&nsg.rules, direction, pkt) else {
            return Verdict { allowed: false, decided_by };
        };
        decided_by.push(RuleRef {
            direction,
            layer,
            nsg: nsg.name.clone(),
            rule: rule.name.clone(),
            priority: rule.priority,
            access: rule.access,
        });
        if rule.access == Access::Deny {
            return Verdict { allowed: false, decided_by };
        }
    }
    Verdict { allowed: true, decided_by }
}

/// The matching rule of `direction` with the lowest priority number (independent of the
/// rules' order).
fn winning_rule<'a>(rules: &'a [Rule], direction: Direction, pkt: &Packet) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|rule| rule.direction == direction && rule_matches(rule, pkt))
        .min_by_key(|rule| rule.priority)
}

fn rule_matches(rule: &Rule, pkt: &Packet) -> bool {
    rule.protocol.matches(family(pkt.src), pkt.proto)
        && address_matches(&rule.source, pkt.src)
        && address_matches(&rule.destination, pkt.dst)
        && port_matches(&rule.source_ports, pkt.sport)
        && port_matches(&rule.destination_ports, pkt.dport)
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv6() { 6 } else { 4 }
}

fn address_matches(prefixes: &[IpNet], addr: IpAddr) -> bool {
    prefixes.iter().any(|net| net.contains(&addr))
}

/// `*` matches every packet, even one without ports; a port list only packets with a port
/// inside it.
fn port_matches(spec: &Ports, port: Option<u16>) -> bool {
    match (spec, port) {
        (None, _) => true,
        (Some(ranges), Some(port)) => ranges.iter().any(|r| in_port_range(r, port)),
        (Some(_), None) => false,
    }
}

fn in_port_range(range: &PortRange, port: u16) -> bool {
    range.lo <= port && port <= range.hi
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load_str;

    const POLICY: &str = "\
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
application_security_groups:
  web: [198.51.100.10, 2001:db8:1::10]
nsgs:
  - name: subnet-nsg
    subnets: [198.51.100.0/25, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: web, destination_ports: [80, '8000-8080']}
      - {name: allow-ssh-range, priority: 110, direction: inbound, access: allow,
         protocol: any, source: '203.0.113.10-203.0.113.20', destination: '*',
         destination_ports: 22}
      - {name: no-vnet-smtp, priority: 200, direction: outbound, access: deny, protocol: tcp,
         source: '*', destination: VirtualNetwork, destination_ports: 25}
  - name: host-nsg
    hosts: [198.51.100.10]
    rules:
      - {name: deny-8080, priority: 100, direction: inbound, access: deny, protocol: tcp,
         source: '*', destination: '*', destination_ports: 8080}
";

    fn policy() -> Policy {
        load_str(POLICY, "policy.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn tcp(direction: Direction, src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            direction,
            proto: 6,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: Some(40000),
            dport: Some(dport),
        }
    }

    /// (layer, rule, access) of each deciding rule.
    fn decisions(verdict: &Verdict) -> Vec<(Layer, &str, Access)> {
        verdict.decided_by.iter().map(|r| (r.layer, r.rule.as_str(), r.access)).collect()
    }

    use Access::{Allow, Deny};
    use Direction::{Inbound, Outbound};
    use Layer::{Host, Subnet};

    #[test]
    fn user_rule_overrides_default() {
        let policy = policy();
        // Inbound from the internet is denied by DenyAllInBound (65500)...
        let verdict = evaluate(&policy, &tcp(Inbound, "203.0.113.1", "2001:db8:1::10", 443));
        assert!(!verdict.allowed);
        assert_eq!(decisions(&verdict), [(Subnet, "DenyAllInBound", Deny)]);
        // ...unless a user rule with a lower priority number allows it first.
        let verdict = evaluate(&policy, &tcp(Inbound, "203.0.113.1", "2001:db8:1::10", 80));
        assert!(verdict.allowed);
        assert_eq!(decisions(&verdict), [(Subnet, "allow-web", Allow)]);
        assert_eq!(verdict.decided_by[0].nsg, "subnet-nsg");
        assert_eq!(verdict.decided_by[0].priority, 100);
    }

    #[test]
    fn both_layers_must_allow() {
        let policy = policy();
        // The subnet allows 8080 from the internet; the host's NSG denies it.
        let verdict = evaluate(&policy, &tcp(Inbound, "203.0.113.1", "198.51.100.10", 8080));
        assert!(!verdict.allowed);
        assert_eq!(decisions(&verdict), [(Subnet, "allow-web", Allow), (Host, "deny-8080", Deny)]);
        // The subnet allows 80 from the internet, but the host NSG only has defaults.
        let verdict = evaluate(&policy, &tcp(Inbound, "203.0.113.1", "198.51.100.10", 80));
        assert!(!verdict.allowed);
        assert_eq!(
            decisions(&verdict),
            [(Subnet, "allow-web", Allow), (Host, "DenyAllInBound", Deny)]
        );
        // From inside the virtual network every layer allows by default: the source's
        // subnet outbound, then the destination's subnet and host inbound.
        let verdict = evaluate(&policy, &tcp(Inbound, "198.51.100.20", "198.51.100.10", 80));
        assert!(verdict.allowed);
        assert_eq!(
            decisions(&verdict),
            [
                (Subnet, "AllowVnetOutBound", Allow),
                (Subnet, "AllowVnetInBound", Allow),
                (Host, "AllowVnetInBound", Allow)
            ]
        );
    }

    #[test]
    fn outbound_evaluates_host_first() {
        let verdict = evaluate(&policy(), &tcp(Outbound, "198.51.100.10", "198.51.100.20", 25));
        assert!(!verdict.allowed);
        assert_eq!(
            decisions(&verdict),
            [(Host, "AllowVnetOutBound", Allow), (Subnet, "no-vnet-smtp", Deny)]
        );
    }

    #[test]
    fn east_west_passes_the_source_outbound_then_the_destination_inbound() {
        let policy = policy();
        // 198.51.100.20 (subnet-nsg only) to the host NSG's 198.51.100.10: the destination's
        // host layer denies 8080 whatever the arrival direction says.
        for arrival in [Inbound, Outbound] {
            let verdict = evaluate(&policy, &tcp(arrival, "198.51.100.20", "198.51.100.10", 8080));
            assert!(!verdict.allowed);
            let sides: Vec<_> = verdict
                .decided_by
                .iter()
                .map(|r| (r.direction, r.layer, r.rule.as_str()))
                .collect();
            assert_eq!(
                sides,
                [
                    (Outbound, Subnet, "AllowVnetOutBound"),
                    (Inbound, Subnet, "AllowVnetInBound"),
                    (Inbound, Host, "deny-8080")
                ]
            );
        }
        // The source side decides first: its subnet denies SMTP into the virtual network,
        // and the destination's layers are never reached.
        let verdict = evaluate(&policy, &tcp(Inbound, "198.51.100.20", "198.51.100.10", 25));
        assert_eq!(decisions(&verdict), [(Subnet, "no-vnet-smtp", Deny)]);
        assert_eq!(verdict.decided_by[0].direction, Outbound);
    }

    #[test]
    fn portless_packets_skip_port_restricted_rules() {
        let ping = Packet {
            direction: Inbound,
            proto: 1,
            src: "203.0.113.15".parse().unwrap(),
            dst: "198.51.100.20".parse().unwrap(),
            sport: None,
            dport: None,
        };
        // allow-ssh-range is any-protocol but port 22 only: ICMP carries no port.
        let verdict = evaluate(&policy(), &ping);
        assert!(!verdict.allowed);
        assert_eq!(decisions(&verdict), [(Subnet, "DenyAllInBound", Deny)]);
    }

    #[test]
    fn no_nsg_allows() {
        let verdict = evaluate(&policy(), &tcp(Inbound, "203.0.113.1", "198.51.100.200", 22));
        assert_eq!(verdict, Verdict { allowed: true, decided_by: vec![] });
    }

    #[test]
    fn internet_excludes_the_virtual_network() {
        let policy = policy();
        let verdict = evaluate(&policy, &tcp(Inbound, "2001:db8:2::1", "2001:db8:1::10", 80));
        assert_eq!(decisions(&verdict), [(Subnet, "allow-web", Allow)]);
        // Not from the internet: falls through to AllowVnetInBound, which allows it (after
        // the source's own subnet NSG let it out).
        let verdict = evaluate(&policy, &tcp(Inbound, "2001:db8:1::99", "2001:db8:1::10", 443));
        assert_eq!(
            decisions(&verdict),
            [(Subnet, "AllowVnetOutBound", Allow), (Subnet, "AllowVnetInBound", Allow)]
        );
        // Internet-sourced, but to a port allow-web does not open.
        let verdict = evaluate(&policy, &tcp(Inbound, "2001:db8:2::1", "2001:db8:1::10", 443));
        assert_eq!(decisions(&verdict), [(Subnet, "DenyAllInBound", Deny)]);
    }

    #[test]
    fn address_and_port_ranges() {
        let policy = policy();
        let allowed = |src: &str, dport| {
            evaluate(&policy, &tcp(Inbound, src, "198.51.100.20", dport)).allowed
        };
        assert!(allowed("203.0.113.10", 22));
        assert!(allowed("203.0.113.20", 22));
        assert!(!allowed("203.0.113.21", 22));
        assert!(!allowed("203.0.113.9", 22));
        assert!(!allowed("203.0.113.15", 23));
        // allow-web's range 8000-8080 targets web only.
        let to_web = |dport| {
            evaluate(&policy, &tcp(Inbound, "203.0.113.1", "2001:db8:1::10", dport)).allowed
        };
        assert!(to_web(8000) && to_web(8080) && !to_web(7999) && !to_web(8081));
    }

    #[test]
    fn icmp_is_icmp_of_the_packets_family() {
        use crate::Protocol;
        for family in [4, 6] {
            for proto in 0..=255 {
                let icmp = xdpgate_common::is_icmp(family, proto);
                assert_eq!(Protocol::Icmp.matches(family, proto), icmp, "{family} {proto}");
                assert!(Protocol::Any.matches(family, proto));
                assert_eq!(Protocol::Tcp.matches(family, proto), proto == 6);
            }
        }
        assert!(xdpgate_common::is_icmp(4, 1) && xdpgate_common::is_icmp(6, 58));
        assert!(!xdpgate_common::is_icmp(4, 58) && !xdpgate_common::is_icmp(6, 1));

        let policy = load_str(
            &POLICY.replace(
                "    rules:\n      - {name: allow-web",
                "    rules:\n      - {name: ping, priority: 150, direction: inbound, access: allow, \
                 protocol: icmp, source: '*', destination: '*'}\n      - {name: allow-web",
            ),
            "policy.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ping = |proto, src: &str, dst: &str| {
            let p = Packet {
                direction: Inbound,
                proto,
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                sport: None,
                dport: None,
            };
            decisions(&evaluate(&policy, &p)).iter().map(|d| d.1.to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(ping(1, "203.0.113.1", "198.51.100.20"), ["ping"]);
        assert_eq!(ping(58, "2001:db8:2::1", "2001:db8:1::10"), ["ping"]);
        assert_eq!(ping(58, "203.0.113.1", "198.51.100.20"), ["DenyAllInBound"]);
        assert_eq!(ping(1, "2001:db8:2::1", "2001:db8:1::10"), ["DenyAllInBound"]);
    }
}
