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

/// Prefixes joined by ", " (so a fitted table wraps between them); both families' whole
/// space is `*`.
fn prefixes(nets: &[IpNet]) -> String {
    let all = |s: &str| nets.iter().any(|n| n.to_string() == s);
    match nets.len() {
        0 => "(none)".into(),
        2 if all("0.0.0.0/0") && all("::/0") => "*".into(),
        n if n > SHOWN_PREFIXES => {
            let shown: Vec<String> =
                nets[..SHOWN_PREFIXES].iter().map(ToString::to_string).collect();
            format!("{}, ... ({n} prefixes)", shown.join(", "))
        }
        _ => nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    }
}

/// One side of a rule: its prefixes, then its ports unless any port goes.
fn side(nets: &[IpNet], p: &Ports) -> String {
    match p {
        None => prefixes(nets),
        Some(_) => format!("{} port {}", prefixes(nets), ports(p)),
    }
}

/// `in` or `out`: the direction column kept narrow.
fn short(d: xdpgate_policy::Direction) -> &'static str {
    match d {
        xdpgate_policy::Direction::Inbound => "in",
        xdpgate_policy::Direction::Outbound => "out",
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

    /// Every NSG's effective rules in evaluation order under the NSG's name, one per rule,
    /// fitted to 100 columns (long address lists wrap; `--json` has everything).
    fn text(&self) -> String {
        let mut out = String::new();
        for nsg in &self.nsgs {
            let mut g =
                Grid::new(&["DIR", "PRIO", "RULE", "ACCESS", "PROTO", "SOURCE", "DESTINATION"])
                    .right(&[1])
                    .fit(&[5, 6]);
            for r in &nsg.rules {
                g.row([
                    short(r.direction).into(),
                    r.priority.to_string(),
                    r.name.clone(),
                    lower(r.access),
                    lower(r.protocol),
                    side(&r.source, &r.source_ports),
                    side(&r.destination, &r.destination_ports),
                ]);
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out += &format!("NSG {}\n", nsg.name);
            out += &g.render();
        }
        out
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
    fn effective_rules_under_their_nsg_fit_100_columns() {
        let src = "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
                   subnets: [198.51.100.0/24]\n    rules:\n      - {name: allow-web, priority: 100, \
                   direction: inbound, access: allow, protocol: tcp, source: [192.0.2.1, 192.0.2.2, \
                   192.0.2.3, 192.0.2.4], destination: [\"*\"], destination_ports: [80, 8000-8080]}\n";
        let policy = xdpgate_policy::load_str(src, "t.yaml").unwrap();
        let text = policy.text();
        assert!(text.starts_with("NSG web\nDIR"), "{text}");
        assert!(text.contains("AllowAzureLoadBalancerInBound "), "names do not wrap: {text}");
        let line = text.lines().find(|l| l.contains("allow-web")).expect(&text);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &words[..6],
            ["in", "100", "allow-web", "allow", "tcp", "192.0.2.1/32,"],
            "{text}"
        );
        assert!(
            text.contains("192.0.2.3/32, ... (4") && text.contains("* port 80,8000-8080"),
            "{text}"
        );
        // Default rules follow, in evaluation order.
        assert!(text.contains("DenyAllInBound"), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= super::super::WIDTH as usize, "too wide: {line}");
        }
        assert_eq!(policy.json().unwrap()["nsgs"][0]["name"], "web");
    }
}
