//! `xdpgate rules`: the effective rules (tags, groups and defaults expanded) in evaluation
//! order; and `xdpgate verify-flow`'s answer.

use std::fmt::Write as _;

use anyhow::Result;
use ipnet::IpNet;
use xdpgate_dataplane::verify::{Answer, Source};
use xdpgate_policy::{Policy, Ports, reference::RuleRef};

use super::{Grid, View, lower};

/// Prefix lists longer than this are shortened in tables (`--json` has them all).
pub const SHOWN_PREFIXES: usize = 3;

fn prefixes(nets: &[IpNet]) -> String {
    match nets.len() {
        0 => "(none)".into(),
        n if n > SHOWN_PREFIXES => {
            let shown: Vec<String> =
                nets[..SHOWN_PREFIXES].iter().map(ToString::to_string).collect();
            format!("{},... ({n} prefixes)", shown.join(","))
        }
        _ => nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
    }
}

fn ports(p: &Ports) -> String {
    match p {
        None => "*".into(),
        Some(ranges) => ranges
            .iter()
            .map(|r| if r.lo == r.hi { r.lo.to_string() } else { format!("{}-{}", r.lo, r.hi) })
            .collect::<Vec<_>>()
            .join(","),
    }
}

impl View for Policy {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    /// Every NSG's effective rules in evaluation order, one per line.
    fn text(&self) -> String {
        let mut g = Grid::new(&[
            "NSG",
            "DIRECTION",
            "PRIO",
            "RULE",
            "ACCESS",
            "PROTO",
            "SOURCE",
            "SPORTS",
            "DESTINATION",
            "DPORTS",
        ])
        .right(&[2]);
        for nsg in &self.nsgs {
            for r in &nsg.rules {
                g.row([
                    nsg.name.clone(),
                    lower(r.direction),
                    r.priority.to_string(),
                    r.name.clone(),
                    lower(r.access),
                    lower(r.protocol),
                    prefixes(&r.source),
                    ports(&r.source_ports),
                    prefixes(&r.destination),
                    ports(&r.destination_ports),
                ]);
            }
        }
        g.render()
    }
}

fn rule_ref(r: &RuleRef) -> String {
    format!(
        "{}/{} (priority {}, {} {} layer, {})",
        r.nsg,
        r.rule,
        r.priority,
        lower(r.direction),
        lower(r.layer),
        lower(r.access)
    )
}

fn source(s: &Source) -> String {
    match s {
        Source::Kernel { generation, slot } => {
            format!("asked the kernel: generation {generation}, slot {slot}")
        }
        Source::File(f) => format!("asked {} compiled here, not the kernel", f.display()),
    }
}

impl View for Answer {
    fn json(&self) -> Result<serde_json::Value> {
        let source = match &self.source {
            Source::Kernel { generation, slot } => {
                serde_json::json!({"kernel": {"generation": generation, "slot": slot}})
            }
            Source::File(f) => serde_json::json!({"file": f}),
        };
        let refs: Vec<_> = self
            .decision
            .decided_by
            .iter()
            .zip(&self.names)
            .map(|(h, n)| {
                serde_json::json!({"layer": h.layer, "direction": h.direction,
                    "table": h.table, "bit": h.bit, "access": h.access,
                    "nsg": n.as_ref().map(|r| &r.nsg), "rule": n.as_ref().map(|r| &r.rule),
                    "priority": n.as_ref().map(|r| r.priority)})
            })
            .collect();
        Ok(serde_json::json!({"allowed": self.decision.allowed, "source": source,
            "decided_by": refs, "names_unknown": self.unnamed}))
    }

    /// The decision, which tables answered, and the rule that decided at each layer (by
    /// name when the names of those tables are known).
    fn text(&self) -> String {
        let decision = if self.decision.allowed { "Allowed" } else { "Denied" };
        let mut out = if self.decision.decided_by.is_empty() {
            format!("{decision}: no NSG applies to the local address ({})\n", source(&self.source))
        } else {
            format!("{decision} ({})\n", source(&self.source))
        };
        for (hit, name) in self.decision.decided_by.iter().zip(&self.names) {
            let _ = match name {
                Some(r) => writeln!(out, "  {}", rule_ref(r)),
                None => writeln!(
                    out,
                    "  rule #{} of the {} {} table ({})",
                    hit.bit,
                    lower(hit.direction),
                    lower(hit.layer),
                    lower(hit.access)
                ),
            };
        }
        if let Some(why) = &self.unnamed {
            let _ = writeln!(out, "rule names unknown: {why}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_rules_one_per_line_with_long_lists_shortened() {
        let src = "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
                   subnets: [198.51.100.0/24]\n    rules:\n      - {name: allow-web, priority: 100, \
                   direction: inbound, access: allow, protocol: tcp, source: [192.0.2.1, 192.0.2.2, \
                   192.0.2.3, 192.0.2.4], destination: [\"*\"], destination_ports: [80, 8000-8080]}\n";
        let policy = xdpgate_policy::load_str(src, "t.yaml").unwrap();
        let text = policy.text();
        let line = text.lines().find(|l| l.contains("allow-web")).expect(&text);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &words[..7],
            [
                "web",
                "inbound",
                "100",
                "allow-web",
                "allow",
                "tcp",
                "192.0.2.1/32,192.0.2.2/32,192.0.2.3/32,..."
            ],
            "{text}"
        );
        assert!(line.contains("(4 prefixes)") && line.ends_with("80,8000-8080"), "{text}");
        // Default rules follow, in evaluation order.
        assert!(text.contains("DenyAllInBound"), "{text}");
        assert_eq!(policy.json().unwrap()["nsgs"][0]["name"], "web");
    }
}
