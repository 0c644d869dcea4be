//! `xdpgate stats`: packets and bytes per interface and verdict, drops by reason, flow
//! events held back, the flow tables' fill and embryonic flows' outcomes, the NAT gateways'
//! translated traffic and drops, and the flows each rule of the running policy decided.

use anyhow::Result;
use xdpgate_dataplane::stats::Stats;

use super::{Grid, View, lower};

impl View for Stats {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    fn text(&self) -> String {
        let mut g = Grid::new(&["INTERFACE", "ROLE", "VERDICT", "PACKETS", "BYTES"]).right(&[3, 4]);
        for i in &self.interfaces {
            let xdp = i.verdicts.iter().map(|(v, t)| (v.to_string(), t));
            let egress = i.egress.iter().map(|(v, t)| (format!("egress {v}"), t));
            for (verdict, t) in xdp.chain(egress).filter(|(_, t)| t.packets > 0) {
                g.row([
                    i.iface.clone(),
                    i.role.unwrap_or("-").into(),
                    verdict,
                    t.packets.to_string(),
                    super::bytes(t.bytes),
                ]);
            }
        }
        let mut out = g.render();
        let mut g = Grid::new(&["DROP REASON", "PACKETS"]).right(&[1]);
        for (reason, n) in &self.drops {
            g.row([reason.to_string(), n.to_string()]);
        }
        out += "\n";
        out += &g.render();
        out += &format!(
            "\nflow events held back: {} over the denied-flow rate limit, {} lost to a full ring\n",
            self.flow_events_rate_limited, self.flow_events_lost
        );
        let t = &self.flow_table;
        let e = &t.embryonic;
        out += &format!(
            "\nFLOW TABLES\n\
             established: {} entries (two per flow), room for {} flows\n\
             embryonic: {} flows in {} entries, room for {} flows of two entries (a TCP flow \
             nothing rewrites takes one); created {}, confirmed {}, expired {}, closed {}, \
             deleted {}, evicted {}; confirmations refused (established table full) {}\n\
             flows rebuilt from NAT translations {}, picked up mid-stream {}\n",
            t.flows.entries,
            t.flows.capacity,
            e.live,
            e.entries,
            e.capacity,
            e.created,
            e.confirmed,
            e.expired,
            e.closed,
            e.deleted,
            e.evicted,
            e.refused,
            t.rebuilt,
            t.picked_up
        );
        if !self.nat_gateways.is_empty() {
            let gateways: Vec<_> =
                self.nat_gateways.iter().map(|g| (g.nat_gateway.as_str(), &g.traffic)).collect();
            out += "\nNAT GATEWAYS\n";
            out += &super::nat::traffic_table(&gateways);
        }
        if let Some(p) = &self.policy {
            let mut g = Grid::new(&[
                "NSG",
                "DIRECTION",
                "LAYER",
                "PRIO",
                "RULE",
                "FLOWS",
                "PACKETS",
                "BYTES",
            ])
            .right(&[3, 5, 6, 7]);
            for r in &p.rules {
                g.row([
                    r.nsg.clone(),
                    lower(r.direction),
                    lower(r.layer),
                    r.priority.to_string(),
                    r.rule.clone(),
                    r.flows.to_string(),
                    r.traffic.packets.to_string(),
                    super::bytes(r.traffic.bytes),
                ]);
            }
            out += &format!("\nRULE HITS (policy generation {})\n", p.generation);
            out += &g.render();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use xdpgate_dataplane::{
        counts::Traffic,
        nat::{GatewayTraffic, NamedTraffic},
        stats::{EmbryonicTable, EstablishedTable, FlowTable, IfaceStats, PolicyStats, RuleHits},
    };
    use xdpgate_policy::{Direction, Layer};

    use super::*;

    #[test]
    fn sections_and_json_shape() {
        let t = |packets| Traffic { packets, bytes: packets * 100 };
        let stats = Stats {
            interfaces: vec![IfaceStats {
                iface: "eth0".into(),
                role: Some("external"),
                verdicts: vec![("drop", t(0)), ("pass", t(12))],
                egress: vec![("pass", t(0)), ("drop", t(2))],
            }],
            drops: vec![("policy", 3), ("no_backend", 0)],
            policy: Some(PolicyStats {
                generation: 4,
                rules: vec![RuleHits {
                    nsg: "web".into(),
                    rule: "allow-web".into(),
                    direction: Direction::Inbound,
                    layer: Layer::Subnet,
                    priority: 100,
                    flows: 9,
                    traffic: Traffic { packets: 30, bytes: 4_000 },
                }],
            }),
            flow_events_rate_limited: 1,
            flow_events_lost: 2,
            flow_table: FlowTable {
                flows: EstablishedTable { capacity: 524_288, entries: 10 },
                embryonic: EmbryonicTable {
                    capacity: 131_072,
                    live: 3,
                    entries: 6,
                    created: 40,
                    confirmed: 5,
                    expired: 4,
                    refused: 2,
                    closed: 1,
                    deleted: 6,
                    evicted: 25,
                },
                rebuilt: 7,
                picked_up: 8,
            },
            nat_gateways: vec![NamedTraffic {
                nat_gateway: "egress".into(),
                traffic: GatewayTraffic {
                    outbound: t(5),
                    inbound: t(4),
                    dropped: vec![("nat_exhausted", 1), ("nat_unmatched", 3)],
                },
            }],
        };
        let text = stats.text();
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(words(lines[1]), ["eth0", "external", "pass", "12", "1.2", "KiB"], "{text}");
        assert_eq!(
            words(lines[2]),
            ["eth0", "external", "egress", "drop", "2", "200", "B"],
            "{text}"
        );
        let verdict_rows =
            |v: &str| lines.iter().filter(|l| words(l).get(2).is_some_and(|w| w == v)).count();
        assert_eq!(verdict_rows("drop"), 0, "verdicts without packets are left out: {text}");
        assert!(!text.contains("egress pass"), "verdicts without packets are left out: {text}");
        assert!(lines.iter().any(|l| words(l) == ["policy", "3"]), "{text}");
        assert!(text.contains("1 over the denied-flow rate limit, 2 lost"), "{text}");
        for want in [
            "established: 10 entries (two per flow), room for 524288 flows",
            "embryonic: 3 flows in 6 entries, room for 131072 flows of two entries (a TCP flow \
             nothing rewrites takes one); created 40, confirmed 5, expired 4, closed 1, \
             deleted 6, evicted 25; confirmations refused (established table full) 2",
            "rebuilt from NAT translations 7, picked up mid-stream 8",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
        assert!(text.contains("RULE HITS (policy generation 4)"), "{text}");
        let nat = lines.iter().position(|l| *l == "NAT GATEWAYS").expect(&text);
        assert_eq!(
            words(lines[nat + 2]),
            ["egress", "5", "500", "B", "4", "400", "B", "1", "3"],
            "{text}"
        );
        assert_eq!(
            words(lines.last().unwrap()),
            ["web", "inbound", "subnet", "100", "allow-web", "9", "30", "3.9", "KiB"]
        );
        let json = stats.json().unwrap();
        assert_eq!(json["interfaces"][0]["interface"], "eth0");
        assert_eq!(
            json["interfaces"][0]["verdicts"]["pass"],
            serde_json::json!({"packets": 12, "bytes": 1200})
        );
        assert_eq!(json["interfaces"][0]["egress"]["drop"]["packets"], 2);
        assert_eq!(
            json["drops"],
            serde_json::json!({"policy": {"packets": 3}, "no_backend": {"packets": 0}})
        );
        assert_eq!(json["policy"]["rules"][0]["flows"], 9);
        assert_eq!(
            json["policy"]["rules"][0]["traffic"],
            serde_json::json!({"packets": 30, "bytes": 4000})
        );
        assert_eq!(
            json["flow_table"],
            serde_json::json!({
                "flows": {"capacity": 524_288, "entries": 10},
                "embryonic": {"capacity": 131_072, "live": 3, "created": 40, "confirmed": 5,
                              "expired": 4, "refused": 2, "closed": 1, "deleted": 6,
                              "evicted": 25},
                "rebuilt": 7,
                "picked_up": 8,
            })
        );
        assert_eq!(
            json["nat_gateways"][0],
            serde_json::json!({
                "nat_gateway": "egress",
                "outbound": {"packets": 5, "bytes": 500},
                "inbound": {"packets": 4, "bytes": 400},
                "dropped": {"nat_exhausted": {"packets": 1}, "nat_unmatched": {"packets": 3}},
            })
        );
    }
}
