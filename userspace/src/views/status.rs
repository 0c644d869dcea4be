//! `xdpgate status`: the pin directory, the running policy, the flow table's size, the sizes
//! of the flow and NAT tables with their memory, and the agent, then a table of the
//! interfaces the dataplane is attached to, with the hook of each (xdp or tc).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;

use xdpgate_dataplane::tables::{TableStatus, TablesStatus, thousands};

use crate::{
    bgp::{announce, report::BgpReport},
    status::{AgentStatus, Status},
};

use super::{Grid, View};

impl View for Status {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    fn text(&self) -> String {
        let s = self;
        let mut out = format!("pin directory  {}\n", s.pin_dir.display());
        match &s.policy {
            Some(p) if p.generation > 0 => {
                out += &format!("policy         generation {} (slot {})", p.generation, p.slot);
                if let (Some(at), Some(unix)) = (&p.applied_at, p.applied_unix) {
                    let now =
                        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    out += &format!(", applied {at} ({}s ago)", now.saturating_sub(unix));
                }
                out.push('\n');
                if let Some(path) = &p.applied_path {
                    out += &format!("               {}\n", path.display());
                }
                if p.set_change_unfinished {
                    out += "               an `xdpgate set` change is running or was killed: \
                            flows are judged on each packet (with reevaluate_flows) until \
                            the next set change or apply\n";
                }
            }
            Some(_) => {
                out += "policy         none applied yet: every packet passes unfiltered\n";
            }
            None => out += "policy         - (no pinned maps: is xdpgate attached?)\n",
        }
        match s.flow_entries {
            Some(n) => out += &format!("flow table     {n} entries\n"),
            None => out += "flow table     -\n",
        }
        if let Some(t) = &s.tables {
            out += &tables(t);
        }
        match (&s.agent, s.agent_without_state) {
            (_, Some(pid)) => {
                out += &format!(
                    "agent          pid {pid}: no state file (not yet, or it could not write \
                     one, or it is stopped: see its log; it writes it every {} s, and one older \
                     than {} s is not taken for its state); how its last reload went is not \
                     known here\n",
                    crate::agent_state::REWRITE_SECS,
                    crate::agent_state::STALE_SECS
                );
            }
            (Some(a), None) => out += &agent(a),
            (None, None) => {}
        }
        if let Some(b) = &s.bgp {
            out += &bgp(b);
        }
        if s.interfaces.is_empty() {
            out += "\nnot attached to any interface\n";
            return out;
        }
        let mut g =
            Grid::new(&["INTERFACE", "IFINDEX", "ROLE", "HOOK", "XDP", "PROGRAM", "EGRESS"]);
        for i in &s.interfaces {
            let name = match (i.place, &i.netns) {
                ("netns", Some(ns)) => format!("{} in netns {ns}", i.name),
                ("unnamed-netns", _) => format!("{} in an unnamed netns", i.name),
                _ => i.name.clone(),
            };
            g.row([
                name,
                i.ifindex.map_or("gone".into(), |n| n.to_string()),
                i.role.unwrap_or("-").into(),
                i.hook.map_or("-", |h| h.name()).into(),
                i.xdp_mode.clone(),
                match (&i.program, i.program_id) {
                    (Some(n), Some(id)) => format!("{n} (id {id})"),
                    (None, Some(id)) => format!("id {id}"),
                    _ => "-".into(),
                },
                match (i.egress_program_id, i.ifindex) {
                    (Some(id), _) => format!("tcx (id {id})"),
                    // Attached by a build without the egress program.
                    (None, Some(_)) => "none (xdpgate upgrade adds it)".into(),
                    (None, None) => "-".into(),
                },
            ]);
        }
        out.push('\n');
        out += &g.render();
        out
    }
}

/// The sized tables, one line each: what they hold, their entries and kernel memory.
fn tables(t: &TablesStatus) -> String {
    let line = |what: &str, t: &TableStatus| {
        let mem = t.bytes.map_or("-".into(), super::bytes);
        format!(
            "{} {what} ({}: {} entries, {mem})",
            thousands(t.capacity.into()),
            t.map,
            thousands(t.entries.into())
        )
    };
    let total: Option<u64> =
        [&t.flows, &t.embryonic, &t.nat_translations].iter().map(|t| t.bytes).sum();
    let mut out = format!("tables         {}\n", line("flows", &t.flows));
    out += &format!("               {}\n", line("embryonic flows", &t.embryonic));
    out += &format!("               {}\n", line("NAT translations", &t.nat_translations));
    if let Some(b) = total {
        out += &format!("               {} in all\n", super::bytes(b));
    }
    out
}

/// The agent's lines: pid, and the last reload with every error when it failed.
fn agent(a: &AgentStatus) -> String {
    let st = &a.state;
    let r = &st.last_reload;
    if !a.running {
        return format!("agent          not running (pid {} gone)\n", st.pid);
    }
    let mut out = format!("agent          pid {}, {}\n", st.pid, st.policy_file.display());
    if r.successful {
        out += &format!("               last reload {} ok (generation {})\n", r.at, st.generation);
    } else {
        out += &format!(
            "               reload failed at {}; generation {} stays in force:\n",
            r.at, st.generation
        );
        for e in &r.errors {
            out += &format!("                 {e}\n");
        }
    }
    for f in &st.failing {
        out += &format!("               failing: {f}\n");
    }
    out
}

/// The BGP line: what the node announces, and whether it is drained.
fn bgp(b: &BgpReport) -> String {
    let drained = if b.node_drained { "; node drained (xdpgate undrain)" } else { "" };
    let table = b.agent.as_ref().map_or(String::new(), |a| format!(" (table {})", a.table));
    format!("bgp            announced {}{table}{drained}\n", announce::list(&b.routes))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use xdpgate_dataplane::Hook;

    use crate::status::{IfaceStatus, PolicyStatus};

    use super::*;

    fn iface(
        name: &str,
        place: &'static str,
        netns: Option<&str>,
        ifindex: Option<u32>,
    ) -> IfaceStatus {
        IfaceStatus {
            name: name.into(),
            place,
            netns: netns.map(str::to_string),
            ifindex,
            role: Some("external"),
            slot: Some(1),
            hook: ifindex.map(|i| if i == 9 { Hook::Tc } else { Hook::Xdp }),
            xdp_mode: if ifindex.is_some() { "native" } else { "none" }.into(),
            program: ifindex.map(|_| "xdpgate".into()),
            program_id: ifindex.map(|_| 42),
            link_id: ifindex.map(|_| 7),
            egress_program_id: ifindex.filter(|&i| i == 2).map(|_| 43),
            egress_link_id: ifindex.filter(|&i| i == 2).map(|_| 8),
        }
    }

    #[test]
    fn summary_then_one_line_per_interface() {
        let mut status = Status {
            pin_dir: PathBuf::from("/sys/fs/bpf/xdpgate"),
            interfaces: vec![
                iface("eth0", "here", None, Some(2)),
                iface("veth1", "netns", Some("blue"), Some(5)),
                iface("old0", "gone", None, None),
                iface("veth9", "here", None, Some(9)),
            ],
            policy: Some(PolicyStatus {
                generation: 3,
                slot: 1,
                applied_path: Some("/run/xdpgate/generations/3.json".into()),
                applied_at: Some("2026-11-29T21:00:00Z".into()),
                applied_unix: Some(1),
                set_change_unfinished: false,
            }),
            flow_entries: Some(12),
            tables: Some(TablesStatus {
                flows: TableStatus {
                    map: "FLOWS",
                    entries: 2_097_152,
                    capacity: 1_048_576,
                    bytes: Some(369_099_984),
                },
                embryonic: TableStatus {
                    map: "EMBRYOS",
                    entries: 524_288,
                    capacity: 262_144,
                    bytes: Some(92_275_584),
                },
                nat_translations: TableStatus {
                    map: "NAT_MAP",
                    entries: 524_288,
                    capacity: 262_144,
                    bytes: Some(71_304_320),
                },
            }),
            agent: None,
            agent_without_state: None,
            bgp: None,
        };
        let text = status.text();
        assert!(
            text.contains("policy         generation 3 (slot 1), applied 2026-11-29T21:00:00Z"),
            "{text}"
        );
        assert!(text.contains("flow table     12 entries"), "{text}");
        assert!(
            text.contains(
                "tables         1,048,576 flows (FLOWS: 2,097,152 entries, 352.0 MiB)\n               \
                 262,144 embryonic flows (EMBRYOS: 524,288 entries, 88.0 MiB)\n               \
                 262,144 NAT translations (NAT_MAP: 524,288 entries, 68.0 MiB)\n               \
                 508.0 MiB in all\n"
            ),
            "{text}"
        );
        let json = status.json().unwrap();
        assert_eq!(json["tables"]["flows"]["capacity"], 1_048_576, "{json}");
        assert_eq!(json["tables"]["nat_translations"]["bytes"], 71_304_320, "{json}");
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let table: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("INTERFACE")).collect();
        assert_eq!(table.len(), 5, "{text}");
        assert_eq!(
            words(table[1]),
            [
                "eth0", "2", "external", "xdp", "native", "xdpgate", "(id", "42)", "tcx", "(id",
                "43)"
            ]
        );
        assert!(table[2].starts_with("veth1 in netns blue "), "{text}");
        assert!(table[2].ends_with("none (xdpgate upgrade adds it)"), "{text}");
        assert_eq!(words(table[3]), ["old0", "gone", "external", "-", "none", "-", "-"]);
        assert_eq!(words(table[4])[..4], ["veth9", "9", "external", "tc"]);
        let json = status.json().unwrap();
        assert_eq!(json["interfaces"][1]["netns"], "blue");
        assert_eq!(json["interfaces"][1]["interface"], "veth1");
        assert_eq!([&json["interfaces"][0]["hook"], &json["interfaces"][3]["hook"]], ["xdp", "tc"]);
        // Attached, no policy yet: every port is open, which it says.
        status.policy.as_mut().expect("set above").generation = 0;
        let text = status.text();
        assert!(text.contains("none applied yet: every packet passes unfiltered"), "{text}");

        let none =
            Status { interfaces: vec![], policy: None, flow_entries: None, tables: None, ..status };
        let text = none.text();
        assert!(
            text.contains("no pinned maps") && text.ends_with("not attached to any interface\n"),
            "{text}"
        );
    }
}
