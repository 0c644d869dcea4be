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
/// side's), or its index when the generation's names are gone.
fn rule(f: &Flow) -> String {
    let name = |r: &RuleName| format!("{}/{}", r.nsg, r.rule);
    match (&f.rules.outbound, &f.rules.inbound, f.rule_index) {
        (Some(o), Some(i), _) => format!("{} > {}", name(o), name(i)),
        (Some(r), None, _) | (None, Some(r), _) => name(r),
        (None, None, Some(i)) => format!("#{i} (generation {})", f.generation),
        (None, None, None) => "-".into(),
    }
}

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

/// The flows shown, out of how many matched.
pub struct Listed {
    pub flows: Vec<Flow>,
    pub total: usize,
}

impl Listed {
    /// `all` (most bytes first) cut to `top` (0: all; none given: [`TABLE_TOP`] in a table,
    /// all in JSON).
    pub fn new(mut all: Vec<Flow>, top: Option<usize>, format: super::Format) -> Self {
        let total = all.len();
        let top = top.unwrap_or(if format == super::Format::Json { 0 } else { TABLE_TOP });
        if top > 0 {
            all.truncate(top);
        }
        Self { flows: all, total }
    }
}

impl View for Listed {
    fn json(&self) -> Result<serde_json::Value> {
        self.flows.json()
    }

    fn text(&self) -> String {
        let mut out = self.flows.text();
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

impl View for [Flow] {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(&self)
    }

    fn text(&self) -> String {
        let mut g = Grid::new(&[
            "STATE",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "DIR",
            "RULE",
            "NAT/BACKEND",
            "PACKETS FWD/REPLY",
            "BYTES FWD/REPLY",
            "IDLE",
        ])
        .right(&[7, 8, 9]);
        for f in self {
            let proto = match f.icmp_id {
                Some(id) => format!("{} id {id}", f.protocol),
                None => f.protocol.clone(),
            };
            let mut idle = format!("{:.1}s", f.idle_seconds);
            if f.expired {
                idle += " (expired)";
            }
            g.row([
                f.state.name().to_string(),
                proto,
                endpoint(f.src, f.src_port),
                endpoint(f.dst, f.dst_port),
                f.direction.to_string(),
                rule(f),
                via(f),
                format!("{}/{}", f.forward.packets, f.reply.packets),
                format!("{}/{}", super::bytes(f.forward.bytes), super::bytes(f.reply.bytes)),
                idle,
            ]);
        }
        let mut out = g.render();
        if self.is_empty() {
            out += "(no flows)\n";
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use xdpgate_dataplane::{
        flows::{FlowState, LbFlow, Nat, SideRules},
        stats::Traffic,
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
        }
    }

    #[test]
    fn a_flow_is_one_line_under_the_header() {
        let text = [flow()].text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("STATE") && lines[0].ends_with("IDLE"), "{text}");
        for want in [
            "established",
            "tcp",
            "203.0.113.10:40000",
            "198.51.100.10:80",
            "inbound",
            "web/allow-web",
            "5/4",
            "500 B/400 B",
            "2.5s",
        ] {
            assert!(lines[1].contains(want), "{want} missing from {text}");
        }
        let json = [flow()].json().unwrap();
        assert_eq!(json[0]["rule"], "allow-web");
        assert_eq!(json[0]["forward"]["bytes"], 500);
        assert_eq!(json[0]["state"], "established");
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
            "(expired)",
            "embryonic",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        let none: [Flow; 0] = [];
        assert!(none.text().ends_with("(no flows)\n"));
        assert_eq!(none.json().unwrap(), serde_json::json!([]));
    }
}
