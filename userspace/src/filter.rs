//! The filter flags shared by the commands that select flows, packets or events (`observe`,
//! `capture`, `flows delete`): one set of flags, one meaning.
//!
//! A command describes what it looks at as a [`Subject`] and asks [`FlowFilter::matches`].
//! A subject that lacks what a flag asks about (no drop reason on an allowed flow, no rule
//! where no NSG applied) does not match that flag.

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::Serialize;
use xdpgate_common::{is_icmp, stats::DROP_REASON_TABLE};
use xdpgate_dataplane::flows::{Flow, RuleName};

/// Which flows, packets or events to select; every flag given must match.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FlowFilter {
    /// Only with this source address, or an address in this prefix (198.51.100.0/24,
    /// 2001:db8::/32); the source after translation counts too.
    #[arg(long, value_name = "ADDR[/LEN]", value_parser = parse_net)]
    pub src: Option<IpNet>,
    /// Only with this destination address or prefix; the destination after translation
    /// (a load balancer's backend, say) counts too.
    #[arg(long, value_name = "ADDR[/LEN]", value_parser = parse_net)]
    pub dst: Option<IpNet>,
    /// Only with this port at either end, before or after translation.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Only this protocol: tcp, udp, icmp (either family's), icmpv6, esp, ah, sctp or a
    /// protocol number.
    #[arg(long, value_name = "PROTO", value_parser = Protocol::from_str)]
    pub protocol: Option<Protocol>,
    /// Only decided by this rule: RULE, or NSG/RULE.
    #[arg(long, value_name = "NAME")]
    pub rule: Option<String>,
    /// Only with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    /// Only dropped for this reason (the drop reasons of `xdpgate stats`).
    #[arg(long, value_name = "REASON", value_parser = reasons())]
    pub reason: Option<String>,
}

/// `--reason`'s values: `DROP_REASON_TABLE`'s names, each with its line of help.
fn reasons() -> clap::builder::PossibleValuesParser {
    DROP_REASON_TABLE
        .iter()
        .map(|(name, help)| clap::builder::PossibleValue::new(*name).help(*help))
        .collect::<Vec<_>>()
        .into()
}

/// What the dataplane did with a packet or flow.
#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed, addresses unchanged.
    Allowed,
    /// Denied by a network security group rule.
    Denied,
    /// Dropped for another reason (see --reason).
    Dropped,
    /// Allowed and rewritten: load balancing or NAT.
    Translated,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Dropped => "dropped",
            Verdict::Translated => "translated",
        }
    }
}

/// A protocol as the flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `icmp`: ICMP for IPv4, ICMPv6 for IPv6.
    AnyIcmp,
    /// A protocol number (`icmpv6` is 58).
    Number(u8),
}

impl Protocol {
    /// Whether a packet of `proto` in address family `family` (4 or 6) is this protocol.
    pub fn matches(self, family: u8, proto: u8) -> bool {
        match self {
            Protocol::AnyIcmp => is_icmp(family, proto),
            Protocol::Number(n) => n == proto,
        }
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "icmp" => Protocol::AnyIcmp,
            "tcp" => Protocol::Number(6),
            "udp" => Protocol::Number(17),
            "icmpv6" => Protocol::Number(58),
            "esp" => Protocol::Number(50),
            "ah" => Protocol::Number(51),
            "sctp" => Protocol::Number(132),
            n => Protocol::Number(n.parse().map_err(|_| {
                format!(
                    "unknown protocol {s:?} (tcp, udp, icmp, icmpv6, esp, ah, sctp or a \
                     number 0-255)"
                )
            })?),
        })
    }
}

/// An address, or a prefix without host bits (a typo's prefix read as its network would
/// widen a deletion or a trust); a bare address is its own host prefix.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net != net.trunc() {
            return Err(format!(
                "{s:?}: host bits set; did you mean {}? (or {} for the one address)",
                net.trunc(),
                net.addr()
            ));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or prefix (ADDR or ADDR/LEN)"))
}

/// What a filter is asked about: a packet, an event or a flow as its first packet saw it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub src: IpAddr,
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: Option<u16>,
    /// IP protocol number.
    pub proto: u8,
    /// Source and destination after translation, where a translation changed them.
    pub translated_src: Option<(IpAddr, Option<u16>)>,
    pub translated_dst: Option<(IpAddr, Option<u16>)>,
    /// The deciding rule of each side (outbound, inbound), where an NSG applied.
    pub rules: [Option<&'a RuleName>; 2],
    pub verdict: Option<Verdict>,
    /// A drop's reason, as `DROP_REASON_TABLE` names it.
    pub reason: Option<&'a str>,
}

impl<'a> Subject<'a> {
    /// A flow of the flow table: allowed, or translated when it has a NAT or backend.
    pub fn of_flow(f: &'a Flow) -> Self {
        // A translated ping's identifier (its rewrite's `port`) is no port.
        let nat = f.nat.as_ref().map(|n| (n.kind, (n.address, n.port.filter(|_| f.has_ports()))));
        let translated = f.nat.is_some() || f.load_balancer.is_some();
        Subject {
            src: f.src,
            src_port: f.src_port,
            dst: f.dst,
            dst_port: f.dst_port,
            // 255 (reserved) for a name no parser knows.
            proto: protocol_number(&f.protocol, if f.src.is_ipv6() { 6 } else { 4 }).unwrap_or(255),
            translated_src: nat.filter(|(k, _)| *k == "snat").map(|(_, t)| t),
            translated_dst: nat.filter(|(k, _)| *k != "snat").map(|(_, t)| t).or_else(|| {
                f.load_balancer.as_ref().and_then(|lb| lb.backend).map(|b| (b, f.dst_port))
            }),
            rules: [f.rules.outbound.as_ref(), f.rules.inbound.as_ref()],
            verdict: Some(if translated { Verdict::Translated } else { Verdict::Allowed }),
            reason: None,
        }
    }

    fn family(&self) -> u8 {
        if self.src.is_ipv6() { 6 } else { 4 }
    }
}

/// The number of protocol `name` in address family `family` (4 or 6): the one reading of
/// a protocol's name or number for every command that takes one (`icmp` is the family's
/// ICMP), accepting every name `flows::protocol_name` prints.
pub fn protocol_number(name: &str, family: u8) -> Result<u8, String> {
    Ok(match name.parse::<Protocol>()? {
        Protocol::Number(n) => n,
        Protocol::AnyIcmp => xdpgate_common::icmp_proto(family),
    })
}

/// Whether `--rule want` names rule `rule` of NSG `nsg`: RULE, or NSG/RULE.
pub fn named(want: &str, nsg: &str, rule: &str) -> bool {
    rule == want || want.split_once('/').is_some_and(|(n, x)| n == nsg && x == rule)
}

impl FlowFilter {
    /// Whether no flag was given.
    pub fn is_empty(&self) -> bool {
        self.src.is_none()
            && self.dst.is_none()
            && self.port.is_none()
            && self.protocol.is_none()
            && self.rule.is_none()
            && self.verdict.is_none()
            && self.reason.is_none()
    }

    pub fn matches(&self, s: &Subject) -> bool {
        let addr_in = |net: &IpNet, a: IpAddr, t: Option<(IpAddr, Option<u16>)>| {
            net.contains(&a) || t.is_some_and(|(t, _)| net.contains(&t))
        };
        let ports = [
            s.src_port,
            s.dst_port,
            s.translated_src.and_then(|t| t.1),
            s.translated_dst.and_then(|t| t.1),
        ];
        self.src.as_ref().is_none_or(|n| addr_in(n, s.src, s.translated_src))
            && self.dst.as_ref().is_none_or(|n| addr_in(n, s.dst, s.translated_dst))
            && self.port.is_none_or(|p| ports.contains(&Some(p)))
            && self.protocol.is_none_or(|p| p.matches(s.family(), s.proto))
            && self
                .rule
                .as_deref()
                .is_none_or(|want| s.rules.iter().flatten().any(|r| named(want, &r.nsg, &r.rule)))
            && self.verdict.is_none_or(|v| s.verdict == Some(v))
            && self.reason.as_deref().is_none_or(|want| s.reason == Some(want))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use xdpgate_policy::Layer;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        filter: FlowFilter,
    }

    fn filter(args: &[&str]) -> Result<FlowFilter, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.filter)
    }

    fn rule() -> RuleName {
        RuleName { nsg: "web".into(), rule: "deny-ssh".into(), layer: Layer::Subnet }
    }

    fn denied(rule: &RuleName) -> Subject<'_> {
        Subject {
            src: "203.0.113.7".parse().unwrap(),
            src_port: Some(40000),
            dst: "198.51.100.10".parse().unwrap(),
            dst_port: Some(22),
            proto: 6,
            translated_src: None,
            translated_dst: None,
            rules: [None, Some(rule)],
            verdict: Some(Verdict::Denied),
            reason: Some("policy"),
        }
    }

    /// A prefix with host bits set is refused, as everywhere else: read as its network it
    /// widened what `flows delete` deletes (`--src 203.0.113.77/24` deleted every flow of
    /// the /24, `/0` every IPv4 flow) and what `decap attach --gateway` trusts (seen
    /// failing: both accepted).
    #[test]
    fn prefixes_with_host_bits_are_refused() {
        for (arg, says) in [
            ("203.0.113.77/24", "host bits set; did you mean 203.0.113.0/24?"),
            ("203.0.113.10/0", "host bits set; did you mean 0.0.0.0/0?"),
            ("2001:db8::1/64", "host bits set; did you mean 2001:db8::/64?"),
            ("203.0.113.300", "is not an address or prefix"),
        ] {
            let err = filter(&["--src", arg]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(says), "{arg}: {err}");
        }
        for (arg, net) in
            [("203.0.113.0/24", "203.0.113.0/24"), ("203.0.113.77", "203.0.113.77/32")]
        {
            assert_eq!(parse_net(arg), Ok(net.parse().unwrap()));
        }
    }

    #[test]
    fn each_flag_selects() {
        let r = rule();
        let s = denied(&r);
        for (args, want) in [
            (&[][..], true),
            (&["--src", "203.0.113.0/24"], true),
            (&["--src", "203.0.113.8"], false),
            (&["--dst", "198.51.100.10"], true),
            (&["--dst", "203.0.113.7"], false),
            (&["--port", "22"], true),
            (&["--port", "80"], false),
            (&["--protocol", "TCP"], true),
            (&["--protocol", "udp"], false),
            (&["--protocol", "6"], true),
            (&["--rule", "deny-ssh"], true),
            (&["--rule", "web/deny-ssh"], true),
            (&["--rule", "db/deny-ssh"], false),
            (&["--verdict", "denied"], true),
            (&["--verdict", "allowed"], false),
            (&["--reason", "policy"], true),
            (&["--reason", "no_flow"], false),
            (&["--src", "203.0.113.7", "--port", "22", "--verdict", "denied"], true),
            (&["--src", "203.0.113.7", "--port", "23"], false),
        ] {
            assert_eq!(filter(args).unwrap().matches(&s), want, "{args:?}");
        }
    }

    #[test]
    fn translated_addresses_and_ports_count() {
        let r = rule();
        let mut s = denied(&r);
        s.verdict = Some(Verdict::Translated);
        s.reason = None;
        s.translated_dst = Some(("10.0.0.5".parse().unwrap(), Some(8080)));
        assert!(filter(&["--dst", "10.0.0.0/8"]).unwrap().matches(&s));
        assert!(filter(&["--port", "8080"]).unwrap().matches(&s));
        assert!(!filter(&["--src", "10.0.0.5"]).unwrap().matches(&s));
        // Nothing to match a reason against.
        assert!(!filter(&["--reason", "policy"]).unwrap().matches(&s));
    }

    /// A translated ping's identifier is no port: `--port` does not select it, nor would
    /// `flows delete --port` delete it (found by an outside review: it did).
    #[test]
    fn a_translated_pings_identifier_is_no_port() {
        let ping = Flow {
            state: xdpgate_dataplane::flows::FlowState::Established,
            protocol: "icmp".into(),
            src: "198.51.100.10".parse().unwrap(),
            src_port: None,
            dst: "203.0.113.7".parse().unwrap(),
            dst_port: None,
            icmp_id: Some(7),
            icmp_type: None,
            direction: "outbound",
            generation: 1,
            nsg: None,
            rule: None,
            layer: None,
            rule_index: None,
            rules: Default::default(),
            nat: Some(xdpgate_dataplane::flows::Nat {
                kind: "snat",
                address: "192.0.2.100".parse().unwrap(),
                port: Some(40000),
            }),
            load_balancer: None,
            forward: Default::default(),
            reply: Default::default(),
            idle_seconds: 0.0,
            expired: false,
            incomplete: false,
            tcp_state: None,
        };
        let s = Subject::of_flow(&ping);
        assert!(!filter(&["--port", "40000"]).unwrap().matches(&s));
        assert!(filter(&["--src", "192.0.2.100"]).unwrap().matches(&s), "its public address");
    }

    #[test]
    fn icmp_names_either_family() {
        let r = rule();
        let mut s = denied(&r);
        s.proto = 58;
        s.src = "2001:db8::1".parse().unwrap();
        assert!(filter(&["--protocol", "icmp"]).unwrap().matches(&s));
        assert!(filter(&["--protocol", "icmpv6"]).unwrap().matches(&s));
        s.src = "203.0.113.7".parse().unwrap();
        s.proto = 1;
        assert!(filter(&["--protocol", "icmp"]).unwrap().matches(&s));
        assert!(!filter(&["--protocol", "icmpv6"]).unwrap().matches(&s));
    }

    #[test]
    fn bad_values_are_named() {
        let e = filter(&["--src", "300.1.1.1"]).unwrap_err().to_string();
        assert!(e.contains("\"300.1.1.1\" is not an address or prefix"), "{e}");
        let e = filter(&["--protocol", "gre"]).unwrap_err().to_string();
        assert!(e.contains("unknown protocol \"gre\""), "{e}");
        let e = filter(&["--reason", "bogus"]).unwrap_err().to_string();
        assert!(e.contains("nat_unmatched"), "{e}");
        let e = filter(&["--verdict", "maybe"]).unwrap_err().to_string();
        assert!(e.contains("translated"), "{e}");
    }

    /// Every name a command prints for a protocol reads back as that protocol, in either
    /// family: `flows --json` and `verify-flow`'s answers are input for `verify-flow
    /// --batch`, `next-hop` and the filters (before, `verify-flow` refused `icmpv6` and
    /// `next-hop` `esp`, both of which they print).
    #[test]
    fn every_printed_protocol_name_reads_back() {
        for family in [4, 6] {
            for n in 0..=255u8 {
                let name = xdpgate_dataplane::flows::protocol_name(family, n);
                assert_eq!(protocol_number(&name, family), Ok(n), "{name} (IPv{family})");
            }
        }
        assert_eq!(protocol_number("ICMP", 6), Ok(58));
        assert!(protocol_number("gre", 4).unwrap_err().contains("unknown protocol \"gre\""));
    }
}
