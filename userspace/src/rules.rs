//! The operator's view of a policy: the effective rules (tags, groups and defaults expanded)
//! and what `verify-flow` answers.

use std::fmt::Write as _;

use ipnet::IpNet;

use xdpgate_common::nsg::DIR_INBOUND;
use xdpgate_dataplane::verify::{Answer, Source};
use xdpgate_policy::{
    Direction, Policy, Ports, Rule,
    reference::{RuleRef, Verdict},
};

/// Prefix lists longer than this are shortened in tables (`--json` has them all).
const SHOWN_PREFIXES: usize = 3;

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

fn row(out: &mut String, nsg: &str, r: &Rule) {
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:>6} {:<30} {:<6} {:<6} {:<34} {:<12} {:<34} {:<12}",
        nsg,
        format!("{:?}", r.direction).to_lowercase(),
        r.priority,
        r.name,
        format!("{:?}", r.access).to_lowercase(),
        format!("{:?}", r.protocol).to_lowercase(),
        prefixes(&r.source),
        ports(&r.source_ports),
        prefixes(&r.destination),
        ports(&r.destination_ports),
    );
}

/// Every NSG's effective rules in evaluation order, one per line.
pub fn render(policy: &Policy) -> String {
    let mut out = format!(
        "{:<12} {:<9} {:>6} {:<30} {:<6} {:<6} {:<34} {:<12} {:<34} {:<12}\n",
        "NSG",
        "DIRECTION",
        "PRIO",
        "RULE",
        "ACCESS",
        "PROTO",
        "SOURCE",
        "SPORTS",
        "DESTINATION",
        "DPORTS"
    );
    for nsg in &policy.nsgs {
        for r in &nsg.rules {
            row(&mut out, &nsg.name, r);
        }
    }
    out
}

fn rule_ref(r: &RuleRef) -> String {
    format!(
        "{}/{} (priority {}, {} layer, {})",
        r.nsg,
        r.rule,
        r.priority,
        format!("{:?}", r.layer).to_lowercase(),
        format!("{:?}", r.access).to_lowercase()
    )
}

/// "Allowed"/"Denied" and the rule that decided at each layer.
pub fn render_verdict(v: &Verdict) -> String {
    let decision = if v.allowed { "Allowed" } else { "Denied" };
    match v.decided_by.as_slice() {
        [] => format!("{decision}: no NSG applies to the local address\n"),
        refs => {
            let mut out = format!("{decision}\n");
            for r in refs {
                let _ = writeln!(out, "  {}", rule_ref(r));
            }
            out
        }
    }
}

fn source(s: &Source) -> String {
    match s {
        Source::Kernel { generation, slot } => {
            format!("asked the kernel: generation {generation}, slot {slot}")
        }
        Source::File(f) => format!("asked {} compiled here, not the kernel", f.display()),
    }
}

/// `verify-flow`'s answer: the decision, which tables answered, and the rule that decided
/// at each layer (by name when the names of those tables are known).
pub fn render_answer(a: &Answer) -> String {
    let decision = if a.decision.allowed { "Allowed" } else { "Denied" };
    let mut out = if a.decision.decided_by.is_empty() {
        format!("{decision}: no NSG applies to the local address ({})\n", source(&a.source))
    } else {
        format!("{decision} ({})\n", source(&a.source))
    };
    for (hit, name) in a.decision.decided_by.iter().zip(&a.names) {
        let _ = match name {
            Some(r) => writeln!(out, "  {}", rule_ref(r)),
            None => writeln!(
                out,
                "  rule #{} of the {} {} table ({})",
                hit.bit,
                lower(direction_of(hit.table)),
                lower(hit.layer),
                lower(hit.access)
            ),
        };
    }
    if let Some(why) = &a.unnamed {
        let _ = writeln!(out, "rule names unknown: {why}");
    }
    out
}

/// The same answer as JSON.
pub fn answer_json(a: &Answer) -> serde_json::Value {
    let source = match &a.source {
        Source::Kernel { generation, slot } => {
            serde_json::json!({"kernel": {"generation": generation, "slot": slot}})
        }
        Source::File(f) => serde_json::json!({"file": f}),
    };
    let refs: Vec<_> = a
        .decision
        .decided_by
        .iter()
        .zip(&a.names)
        .map(|(h, n)| {
            serde_json::json!({"layer": h.layer, "direction": direction_of(h.table),
                "table": h.table, "bit": h.bit, "access": h.access,
                "nsg": n.as_ref().map(|r| &r.nsg), "rule": n.as_ref().map(|r| &r.rule),
                "priority": n.as_ref().map(|r| r.priority)})
        })
        .collect();
    serde_json::json!({"allowed": a.decision.allowed, "source": source, "decided_by": refs,
        "names_unknown": a.unnamed})
}

fn direction_of(table: u32) -> Direction {
    if table / 2 == DIR_INBOUND { Direction::Inbound } else { Direction::Outbound }
}

fn lower(v: impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}
