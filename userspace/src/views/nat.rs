//! `xdpgate nat`: each NAT gateway's public addresses with the ports in use on each,
//! active translations and failed allocations; the packets and bytes it translated each way
//! and the packets dropped for it.

use anyhow::Result;
use xdpgate_dataplane::nat::{GatewayReport, GatewayTraffic};

use super::{Grid, View};

/// The GATEWAY of translations on public addresses no gateway of the running policy has.
const NO_GATEWAY: &str = "(none)";

impl View for [GatewayReport] {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(&self)
    }

    fn text(&self) -> String {
        let mut g = Grid::new(&[
            "GATEWAY",
            "PUBLIC ADDRESS",
            "PORTS IN USE",
            "TRANSLATIONS",
            "FAILED ALLOCATIONS",
        ])
        .right(&[2, 3, 4]);
        for gw in self {
            // Translations no gateway has: no allocations of their own to fail.
            let name = gw.name.clone().unwrap_or_else(|| NO_GATEWAY.into());
            let failed =
                if gw.name.is_some() { gw.failed_allocations.to_string() } else { "-".into() };
            // The gateway's own figures on its first line; one line per address.
            let mut first = true;
            for (addr, ports) in &gw.addresses {
                let (name, translations, failed) = if first {
                    (name.clone(), gw.translations.to_string(), failed.clone())
                } else {
                    Default::default()
                };
                first = false;
                g.row([name, addr.to_string(), ports.to_string(), translations, failed]);
            }
            if first {
                g.row([name, "-".into(), "-".into(), gw.translations.to_string(), failed]);
            }
        }
        let mut out = g.render();
        if self.is_empty() {
            out += "(no NAT gateways)\n";
            return out;
        }
        if self.iter().any(|gw| gw.name.is_none()) {
            out += &format!(
                "{NO_GATEWAY}: translations on addresses no NAT gateway has since a reload; each \
                 ends as its flow idles out\n"
            );
        }
        let traffic: Vec<_> = self
            .iter()
            .filter_map(|gw| Some((gw.name.as_deref()?, gw.traffic.as_ref()?)))
            .collect();
        if !traffic.is_empty() {
            out += "\n";
            out += &traffic_table(&traffic);
        }
        out
    }
}

/// Each gateway's translated packets and bytes each way and its drops by reason, one line
/// per gateway (also in `xdpgate stats`).
pub fn traffic_table(gateways: &[(&str, &GatewayTraffic)]) -> String {
    let mut g = Grid::new(&[
        "GATEWAY",
        "OUT PACKETS",
        "OUT BYTES",
        "IN PACKETS",
        "IN BYTES",
        "PORTS EXHAUSTED",
        "UNMATCHED",
    ])
    .right(&[1, 2, 3, 4, 5, 6]);
    for (name, t) in gateways {
        g.row([
            name.to_string(),
            t.outbound.packets.to_string(),
            super::bytes(t.outbound.bytes),
            t.inbound.packets.to_string(),
            super::bytes(t.inbound.bytes),
            t.dropped("nat_exhausted").to_string(),
            t.dropped("nat_unmatched").to_string(),
        ]);
    }
    g.render()
}

#[cfg(test)]
mod tests {
    use xdpgate_dataplane::counts::Traffic;

    use super::*;

    #[test]
    fn one_line_per_public_address() {
        let report = [GatewayReport {
            name: Some("egress".into()),
            addresses: vec![("192.0.2.1".parse().unwrap(), 7), ("192.0.2.2".parse().unwrap(), 3)],
            translations: 9,
            created: Some(40),
            failed_allocations: 2,
            ports_per_address: 64_512,
            traffic: Some(GatewayTraffic {
                outbound: Traffic { packets: 12, bytes: 1_500 },
                inbound: Traffic { packets: 10, bytes: 900 },
                dropped: vec![("nat_exhausted", 2), ("nat_unmatched", 4)],
            }),
        }];
        let text = report.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines.iter().all(|l| l.len() <= 100), "{text}");
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(lines[1]), ["egress", "192.0.2.1", "7", "9", "2"], "{text}");
        assert_eq!(words(lines[2]), ["192.0.2.2", "3"], "{text}");
        assert_eq!(
            words(lines[5]),
            ["egress", "12", "1.5", "KiB", "10", "900", "B", "2", "4"],
            "{text}"
        );
        let json = report.json().unwrap();
        assert_eq!(
            json[0]["traffic"],
            serde_json::json!({
                "outbound": {"packets": 12, "bytes": 1500},
                "inbound": {"packets": 10, "bytes": 900},
                "dropped": {"nat_exhausted": {"packets": 2}, "nat_unmatched": {"packets": 4}},
            })
        );
        assert_eq!(json[0]["nat_gateway"], "egress");
        assert_eq!(
            json[0]["addresses"][1],
            serde_json::json!({"address": "192.0.2.2", "ports_in_use": 3})
        );
    }

    /// Translations no gateway has: a row of their own under `(none)`, with a note.
    #[test]
    fn translations_no_gateway_has_are_shown_last() {
        let report = [GatewayReport {
            name: None,
            addresses: vec![("192.0.2.1".parse().unwrap(), 2)],
            translations: 1,
            created: None,
            failed_allocations: 0,
            ports_per_address: 0,
            traffic: None,
        }];
        let text = report.text();
        let lines: Vec<&str> = text.lines().collect();
        let words: Vec<_> = lines[1].split_whitespace().collect();
        assert_eq!(words, ["(none)", "192.0.2.1", "2", "1", "-"], "{text}");
        assert!(lines[2].starts_with("(none): translations on addresses no NAT gateway"), "{text}");
        assert!(lines.iter().all(|l| l.len() <= 100), "{text}");
        assert_eq!(report.json().unwrap()[0]["nat_gateway"], serde_json::Value::Null);
    }
}
