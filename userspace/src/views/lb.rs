//! `xdpgate lb`: each load-balancing rule with its frontends and counters, then its
//! backends with their health and counters.

use anyhow::Result;
use xdpgate_dataplane::lb::ServiceReport;

use super::{Grid, View};

impl View for [ServiceReport] {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(&self)
    }

    fn text(&self) -> String {
        let mut g = Grid::new(&["SERVICE", "FRONTENDS / BACKEND", "HEALTH", "PACKETS", "BYTES"])
            .right(&[3, 4]);
        for s in self {
            g.row([
                format!("{}/{}", s.load_balancer, s.rule),
                s.frontends.join(" "),
                String::new(),
                s.packets.to_string(),
                s.bytes.to_string(),
            ]);
            for b in &s.backends {
                g.row([
                    String::new(),
                    format!("  {}", b.address),
                    if b.healthy { "healthy" } else { "UNHEALTHY" }.to_string(),
                    b.packets.to_string(),
                    b.bytes.to_string(),
                ]);
            }
        }
        let mut out = g.render();
        if self.is_empty() {
            out += "(no load balancers)\n";
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use xdpgate_dataplane::lb::BackendReport;

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
                    packets: 20,
                    bytes: 2000,
                },
                BackendReport {
                    address: "198.51.100.11".parse().unwrap(),
                    healthy: false,
                    packets: 10,
                    bytes: 1000,
                },
            ],
        }];
        let text = report.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[1].starts_with("edge/http")
                && lines[1].contains("192.0.2.10:80/tcp [2001:db8::10]:80/tcp"),
            "{text}"
        );
        assert!(
            lines[2].contains("198.51.100.10")
                && lines[2].contains("healthy")
                && lines[2].ends_with("2000"),
            "{text}"
        );
        assert!(lines[3].contains("198.51.100.11") && lines[3].contains("UNHEALTHY"), "{text}");
        let json = report.json().unwrap();
        assert_eq!(json[0]["backends"][1]["healthy"], false);
        assert_eq!(json[0]["backends"][0]["address"], "198.51.100.10");
    }
}
