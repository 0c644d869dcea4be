//! `xdpgate flows`: one line per flow, most bytes first, embryonic and established.

use std::net::IpAddr;

use anyhow::Result;
use xdpgate_dataplane::flows::{Flow, RuleName};

use super::{Grid, View};

/// `ADDR:PORT` (`[v6]:PORT`), or the address alone.
pub fn endpoint(a: IpAddr, port: Option<u16>) -> String {
    match (a, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

/// The deciding rule as `NSG/RULE` (east-west: the source side's, `>`, the destination
/// side's), or its index when the generation's names are gone; marked when a policy other
/// than the `running` one decided it (its next packet has it judged again, or renumbered).
fn rule(f: &Flow, running: u64) -> String {
    let name = |r: &RuleName| format!("{}/{}", r.nsg, r.rule);
    let rule = match (&f.rules.outbound, &f.rules.inbound, f.rule_index) {
        (Some(o), Some(i), _) => format!("{} > {}", name(o), name(i)),
        (Some(r), None, _) | (None, Some(r), _) => name(r),
        (None, None, Some(i)) => return format!("#{i} (generation {})", f.generation),
        (None, None, None) => "-".into(),
    };
    if running != 0 && f.generation != running { format!("{rule} {OLDER}") } else { rule }
}

/// The mark of a flow decided under an older policy, explained under the table.
const OLDER: &str = "(older policy)";

/// The rewrite: a load balancer's rule and backend, or a NAT.
fn via(f: &Flow) -> String {
    let lb_name = |lb: &xdpgate_dataplane::flows::LbFlow| {
        format!("{}/{}", lb.name.as_deref().unwrap_or("?"), lb.rule.as_deref().unwrap_or("?"))
    };
    match (&f.nat, &f.load_balancer) {
        (Some(n), Some(lb)) => format!("{} -> {}", lb_name(lb), endpoint(n.address, n.port)),
        (Some(n), None) => format!("{} {}", n.kind, endpoint(n.address, n.port)),
        (None, Some(lb)) => lb_name(lb),
        (None, None) => "-".into(),
    }
}

/// Flows the table shows unless --top says otherwise (JSON has them all).
pub const TABLE_TOP: usize = 20;

/// The flows shown, out of how many matched, and the generation of the running policy
/// (0: none known).
pub struct Listed {
    pub flows: Vec<Flow>,
    pub total: usize,
    pub running: u64,
}

impl Listed {
    /// `all` (most bytes first) cut to `top` (0: all; none given: [`TABLE_TOP`] in a table,
    /// all in JSON).
    pub fn new(
        mut all: Vec<Flow>,
        top: Option<usize>,
        format: super::Format,
        running: u64,
    ) -> Self {
        let total = all.len();
        let top = top.unwrap_or(if format == super::Format::Json { 0 } else { TABLE_TOP });
        if top > 0 {
            all.truncate(top);
        }
        Self { flows: all, total, running }
    }
}

impl View for Listed {
    fn json(&self) -> Result<serde_json::Value> {
        self.flows.json()
    }

    fn text(&self) -> String {
        let mut out = table(&self.flows, self.running);
        if self.running != 0 && self.flows.iter().any(|f| f.generation != self.running) {
            out += &format!(
                "{OLDER}: decided before the running policy (generation {}); its next packet \
                 has it judged again (reevaluate_flows), or counted under the rule's new number\n",
                self.running
            );
        }
        if self.flows.len() < self.total {
            out += &format!(
                "showing {} of {} flows (--top N for more, --top 0 for all)\n",
                self.flows.len(),
                self.total
            );
        }
        out
    }
}

/// Two rows a flow, as conntrack pairs a flow's tuples: the first for the direction of its
/// first packet (source, deciding rule, packets and bytes sent), the second for the replies
/// (destination, rewrite, packets and bytes back). Addresses and the rule or rewrite wrap,
/// each within its row, where a row with IPv6 addresses would pass 100 columns.
impl View for [Flow] {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(&self)
    }

    fn text(&self) -> String {
        table(self, 0)
    }
}

/// The rows of `flows`, their rules marked when not decided by the `running` generation.
fn table(flows: &[Flow], running: u64) -> String {
    let mut g = Grid::new(&[
        "STATE\nDIR",
        "PROTO",
        "SOURCE\nDESTINATION",
        "RULE\nNAT/BACKEND",
        "PACKETS\nREPLY",
        "BYTES\nREPLY",
        "IDLE",
    ])
    .right(&[4, 5, 6])
    .fit(&[2, 3]);
    for f in flows {
        g.row([
            f.state.name().to_string(),
            f.protocol.clone(),
            endpoint(f.src, f.src_port),
            rule(f, running),
            f.forward.packets.to_string(),
            super::bytes(f.forward.bytes),
            format!("{:.1}s", f.idle_seconds),
        ]);
        g.row([
            f.direction.to_string(),
            match (f.icmp_id, f.icmp_type) {
                (Some(id), _) => format!("id {id}"),
                (None, Some(kind)) => format!("type {kind}"),
                (None, None) => String::new(),
            },
            endpoint(f.dst, f.dst_port),
            via(f),
            f.reply.packets.to_string(),
            super::bytes(f.reply.bytes),
            // A closed connection's entries linger: said, or it looks like a live one.
            match (f.expired, f.tcp_state) {
                (true, _) => "expired".into(),
                (false, Some(s)) if s != "open" => s.into(),
                _ => String::new(),
            },
        ]);
    }
    let mut out = g.render();
    if flows.is_empty() {
        out += "(no flows)\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use xdpgate_dataplane::{
        counts::Traffic,
        flows::{FlowState, LbFlow, Nat, SideRules},
    };
    use xdpgate_policy::Layer;

    use super::*;

    fn flow() -> Flow {
        Flow {
            state: FlowState::Established,
            protocol: "tcp".into(),
            src: "203.0.113.10".parse().unwrap(),
            src_port: Some(40000),
            dst: "198.51.100.10".parse().unwrap(),
            dst_port: Some(80),
            icmp_id: None,
            icmp_type: None,
            direction: "inbound",
            generation: 3,
            nsg: Some("web".into()),
            rule: Some("allow-web".into()),
            layer: Some(Layer::Subnet),
            rule_index: Some(4 * 4096),
            rules: SideRules {
                outbound: None,
                inbound: Some(RuleName {
                    nsg: "web".into(),
                    rule: "allow-web".into(),
                    layer: Layer::Subnet,
                }),
            },
            nat: None,
            load_balancer: None,
            forward: Traffic { packets: 5, bytes: 500 },
            reply: Traffic { packets: 4, bytes: 400 },
            idle_seconds: 2.5,
            expired: false,
            incomplete: false,
            tcp_state: None,
        }
    }

    #[test]
    fn a_flow_is_two_lines_under_the_header() {
        let text = [flow()].text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("STATE") && lines[0].ends_with("IDLE"), "{text}");
        assert!(lines[1].starts_with("DIR") && lines[1].ends_with("REPLY"), "{text}");
        // The first packet's direction, then the replies.
        for want in ["established", "tcp", "203.0.113.10:40000", "web/allow-web", "5", "500 B"] {
            assert!(lines[2].contains(want), "{want} missing from line 3 of {text}");
        }
        assert!(lines[2].ends_with("2.5s"), "{text}");
        for want in ["inbound", "198.51.100.10:80", "-", "4", "400 B"] {
            assert!(lines[3].contains(want), "{want} missing from line 4 of {text}");
        }
        let json = [flow()].json().unwrap();
        assert_eq!(json[0]["rule"], "allow-web");
        assert_eq!(json[0]["forward"]["bytes"], 500);
        assert_eq!(json[0]["state"], "established");
    }

    /// A flow an older policy decided says so: its rule may be one the running policy no
    /// longer has, or denies the flow at its next packet. (Before: shown as any other.)
    #[test]
    fn a_flow_of_an_older_policy_is_marked() {
        let listed =
            |running| Listed::new(vec![flow()], None, crate::views::Format::Table, running);
        let older = listed(4).text();
        assert!(older.contains("web/allow-web (older policy)"), "{older}");
        assert!(older.contains("before the running policy (generation 4)"), "{older}");
        for running in [3, 0] {
            let text = listed(running).text();
            assert!(!text.contains("older policy"), "running {running}: {text}");
        }
    }

    /// A closed connection's entries linger 10 s: its row says so, where `expired` goes.
    #[test]
    fn a_closing_or_closed_connection_says_so() {
        for (state, shown) in [("open", false), ("closing", true), ("closed", true)] {
            let f = Flow { tcp_state: Some(state), ..flow() };
            let text = [f].text();
            let second = text.lines().nth(3).unwrap();
            assert_eq!(second.trim_end().ends_with(state), shown, "{text}");
        }
    }

    #[test]
    fn an_east_west_flow_names_both_sides() {
        let mut f = flow();
        f.rules.outbound =
            Some(RuleName { nsg: "a".into(), rule: "allow-out".into(), layer: Layer::Subnet });
        let text = [f].text();
        assert!(text.contains("a/allow-out > web/allow-web"), "{text}");
    }

    #[test]
    fn unnamed_rules_rewrites_and_no_flows() {
        let mut f = flow();
        (f.nsg, f.rule, f.expired, f.state) = (None, None, true, FlowState::Embryonic);
        f.rules = SideRules::default();
        f.src = "2001:db8::1".parse().unwrap();
        f.nat =
            Some(Nat { kind: "dnat", address: "198.51.100.20".parse().unwrap(), port: Some(8080) });
        f.load_balancer = Some(LbFlow {
            name: Some("edge".into()),
            rule: Some("http".into()),
            backend: "198.51.100.20".parse().ok(),
        });
        let text = [f].text();
        for want in [
            "#16384 (generation 3)",
            "edge/http -> 198.51.100.20:8080",
            "[2001:db8::1]:40000",
            "expired",
            "embryonic",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        let none: [Flow; 0] = [];
        assert!(none.text().ends_with("(no flows)\n"));
        assert_eq!(none.json().unwrap(), serde_json::json!([]));
    }

    /// The widest row a gateway meets: an IPv6 client's full (SLAAC) address, a load
    /// balancer's rule with its backend, long names, big counters, an expired flow.
    fn widest() -> Flow {
        let mut f = flow();
        f.src = "2a02:8071:b85:2c00:1d2e:3f4a:5b6c:7d8e".parse().unwrap();
        f.src_port = Some(51234);
        f.dst = "2001:db8:ffff::10".parse().unwrap();
        f.dst_port = Some(443);
        f.rules.inbound = Some(RuleName {
            nsg: "frontends".into(),
            rule: "allow-https-from-internet".into(),
            layer: Layer::Subnet,
        });
        f.nat = Some(Nat {
            kind: "dnat",
            address: "2001:db8:1::11".parse().unwrap(),
            port: Some(8443),
        });
        f.load_balancer = Some(LbFlow {
            name: Some("edge".into()),
            rule: Some("https".into()),
            backend: "2001:db8:1::11".parse().ok(),
        });
        f.forward = Traffic { packets: 1_234_567, bytes: 1_300_000_000 };
        f.reply = Traffic { packets: 2_345_678, bytes: 3_400_000_000 };
        (f.idle_seconds, f.expired) = (123.4, true);
        f
    }

    #[test]
    fn the_widest_row_fits_100_columns() {
        let mut icmp = widest();
        (icmp.protocol, icmp.icmp_id, icmp.src_port, icmp.dst_port) =
            ("icmpv6".into(), Some(65535), None, None);
        let text = [widest(), icmp].text();
        for line in text.lines() {
            let width = line.chars().count();
            assert!(width <= 100, "{width} columns: {line}\n{text}");
        }
        // The addresses and the rewrite wrap, each within its own row (the reply row still
        // starts with the direction), and nothing is cut: a column's lines read in order.
        let column = |from: &str, to: &str| -> String {
            let header = text.lines().next().unwrap();
            let (a, b) = (header.find(from).unwrap(), header.find(to).unwrap());
            text.lines().skip(2).map(|l| l.get(a..b.min(l.len())).unwrap_or("").trim()).collect()
        };
        let endpoints = column("SOURCE", "RULE");
        for want in [
            "[2a02:8071:b85:2c00:1d2e:3f4a:5b6c:7d8e]:51234[2001:db8:ffff::10]:443",
            "2a02:8071:b85:2c00:1d2e:3f4a:5b6c:7d8e2001:db8:ffff::10",
        ] {
            assert!(endpoints.contains(want), "{want} missing from {endpoints}: {text}");
        }
        let rewrites = column("RULE", "PACKETS");
        let want = "frontends/allow-https-from-internetedge/https ->[2001:db8:1::11]:8443";
        assert_eq!(rewrites.matches(want).count(), 2, "{rewrites}: {text}");
        for want in ["1234567", "2345678", "expired", "id 65535"] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        assert!(text.lines().filter(|l| l.starts_with("inbound")).count() == 2, "{text}");
    }

    /// Rows an IPv4 load balancer and an IPv6 NAT gateway show take two lines each: no
    /// column wraps.
    #[test]
    fn common_rows_take_two_lines_each() {
        let mut lb = flow();
        lb.dst = "192.0.2.10".parse().unwrap();
        lb.nat =
            Some(Nat { kind: "dnat", address: "198.51.100.20".parse().unwrap(), port: Some(8080) });
        lb.load_balancer =
            Some(LbFlow { name: Some("edge".into()), rule: Some("http".into()), backend: None });
        let mut nat = flow();
        (nat.src, nat.src_port) = ("2001:db8:1::10".parse().unwrap(), Some(40000));
        (nat.dst, nat.dst_port) = ("2001:db8:ffff::20".parse().unwrap(), Some(443));
        nat.direction = "outbound";
        nat.nat = Some(Nat {
            kind: "snat",
            address: "2001:db8::100".parse().unwrap(),
            port: Some(40001),
        });
        let text = [lb, nat].text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + 2 * 2, "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 100), "{text}");
        assert!(
            lines[3].contains("192.0.2.10:80")
                && lines[3].contains("edge/http -> 198.51.100.20:8080"),
            "{text}"
        );
        assert!(lines[4].contains("[2001:db8:1::10]:40000"), "{text}");
        assert!(
            lines[5].contains("[2001:db8:ffff::20]:443")
                && lines[5].contains("snat [2001:db8::100]:40001"),
            "{text}"
        );
    }
}
