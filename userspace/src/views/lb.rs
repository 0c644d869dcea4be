//! `xdpgate lb`: each load-balancing rule with its frontends and counters, then its
//! backends with their health (and whether an operator drained them), live flows and
//! counters.

use anyhow::Result;
use xdpgate_dataplane::lb::{BackendReport, MaglevReport, ServiceReport, SlotShare};

use super::{Grid, View};

impl View for [ServiceReport] {
    /// Each service's and backend's counters as `"traffic": {"packets", "bytes"}`.
    fn json(&self) -> Result<serde_json::Value> {
        let mut json = super::to_json(&self)?;
        for service in json.as_array_mut().into_iter().flatten() {
            super::group_traffic(service);
            for backend in service["backends"].as_array_mut().into_iter().flatten() {
                super::group_traffic(backend);
            }
        }
        Ok(json)
    }

    fn text(&self) -> String {
        let mut g =
            Grid::new(&["SERVICE", "FRONTENDS / BACKEND", "HEALTH", "FLOWS", "PACKETS", "BYTES"])
                .right(&[3, 4, 5]);
        for s in self {
            g.row([
                format!("{}/{}", s.load_balancer, s.rule),
                s.frontends.join(" "),
                String::new(),
                String::new(),
                s.packets.to_string(),
                super::bytes(s.bytes),
            ]);
            if let Some(source) = s.outer_source {
                g.row([
                    String::new(),
                    format!("  ipip from {source}"),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
            if let Some(m) = &s.maglev {
                g.row([
                    String::new(),
                    format!("  maglev {} ({})", m.digest, shares(m)),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
            for b in &s.backends {
                // Counted per backend: over every rule it serves, marked where that is more.
                let mark = if b.rules_sending.len() > 1 { "*" } else { "" };
                g.row([
                    String::new(),
                    format!("  {}", b.address),
                    health(s, b),
                    b.flows.to_string(),
                    format!("{}{mark}", b.packets),
                    format!("{}{mark}", super::bytes(b.bytes)),
                ]);
            }
        }
        let mut out = g.render();
        let shared: std::collections::BTreeMap<_, _> = self
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.rules_sending.len() > 1)
            .map(|b| (b.address, b.rules_sending.join(", ")))
            .collect();
        if !shared.is_empty() {
            out += "* a backend's packets and bytes over every rule sending to it (and any \
                    removed since):\n";
            for (address, rules) in shared {
                out += &format!("  {address}: {rules}\n");
            }
        }
        if self.is_empty() {
            out += "(no load balancers)\n";
        }
        out
    }
}

/// Each backend's share of the table's slots, in percent.
fn shares(m: &MaglevReport) -> String {
    let total: u32 = m.slots.iter().map(|s| s.slots).sum();
    let share = |s: &SlotShare| {
        format!("{} {:.1}%", s.address, 100.0 * f64::from(s.slots) / f64::from(total.max(1)))
    };
    m.slots.iter().map(share).collect::<Vec<_>>().join(", ")
}

/// The backend as rule `s` sees it: by the rule's own probe, or `unprobed` for a rule
/// without one, which sends it new flows whatever the probes of others say (seen shown
/// UNHEALTHY, by the backend's one flag, while it took half the new flows). A drained
/// backend takes no new flows whatever its probes say; its flows finish.
fn health(s: &ServiceReport, b: &BackendReport) -> String {
    let state = match (&s.probe, b.healthy_in_rule) {
        (None, _) => "unprobed",
        (Some(_), true) => "healthy",
        (Some(_), false) => "UNHEALTHY",
    };
    match (state, b.drained) {
        (state, false) => state.to_string(),
        ("healthy", true) => "drained".to_string(),
        (state, true) => format!("{state},drained"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_then_their_backends() {
        let report = [ServiceReport {
            load_balancer: "edge".into(),
            rule: "http".into(),
            frontends: vec!["192.0.2.10:80/tcp".into(), "[2001:db8::10]:80/tcp".into()],
            probe: Some("http".into()),
            packets: 30,
            bytes: 3000,
            backends: vec![
                BackendReport {
                    address: "198.51.100.10".parse().unwrap(),
                    healthy: true,
                    healthy_in_rule: true,
                    drained: false,
                    flows: 2,
                    packets: 20,
                    bytes: 2000,
                    rules_sending: vec!["edge/http".into()],
                },
                BackendReport {
                    address: "198.51.100.11".parse().unwrap(),
                    healthy: true,
                    healthy_in_rule: true,
                    drained: true,
                    flows: 1,
                    packets: 10,
                    bytes: 1000,
                    rules_sending: vec!["edge/http".into(), "edge/ssh".into()],
                },
            ],
            outer_source: Some("10.0.1.2".parse().unwrap()),
            maglev: Some(MaglevReport {
                digest: "0123456789abcdef".into(),
                slots: vec![
                    SlotShare { address: "198.51.100.10".parse().unwrap(), slots: 3 },
                    SlotShare { address: "198.51.100.11".parse().unwrap(), slots: 1 },
                ],
            }),
        }];
        let text = report.text();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.remove(2).trim(), "ipip from 10.0.1.2", "{text}");
        assert_eq!(
            lines.remove(2).trim(),
            "maglev 0123456789abcdef (198.51.100.10 75.0%, 198.51.100.11 25.0%)",
            "{text}"
        );
        // A backend two rules send to: its counters are marked, and the note says over what.
        assert_eq!(
            lines.split_off(4),
            [
                "* a backend's packets and bytes over every rule sending to it (and any \
                 removed since):",
                "  198.51.100.11: edge/http, edge/ssh"
            ],
            "{text}"
        );
        assert!(
            lines[1].starts_with("edge/http")
                && lines[1].contains("192.0.2.10:80/tcp [2001:db8::10]:80/tcp"),
            "{text}"
        );
        assert!(
            lines[2].contains("198.51.100.10")
                && lines[2].contains("healthy")
                && lines[2].ends_with("20  2.0 KiB"),
            "{text}"
        );
        assert!(lines[3].contains("198.51.100.11") && lines[3].contains(" drained "), "{text}");
        assert!(lines[3].ends_with("10*  1000 B*"), "{text}");
        let json = report.json().unwrap();
        assert_eq!(json[0]["backends"][1]["drained"], true);
        assert_eq!(json[0]["backends"][1]["flows"], 1);
        assert_eq!(json[0]["backends"][0]["address"], "198.51.100.10");
        assert_eq!(json[0]["traffic"], serde_json::json!({"packets": 30, "bytes": 3000}));
        assert_eq!(json[0]["backends"][1]["traffic"]["bytes"], 1000);
        assert_eq!(json[0]["backends"][1]["rules_sending"][1], "edge/ssh");
        assert!(json[0].get("packets").is_none(), "{json}");
        assert_eq!(
            json[0]["maglev"]["slots"][1],
            serde_json::json!({"address": "198.51.100.11", "slots": 1})
        );
    }
}
