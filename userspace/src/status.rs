//! What `xdpgate status` reports (`views::status` shows it): where the dataplane is
//! attached, on which hook and in which XDP mode, the pin directory, the running policy, the size of the
//! flow table and the agent's state.

use std::{path::PathBuf, process::Command, time::UNIX_EPOCH};

use serde::Serialize;
use xdpgate_common::iface::Role;

use xdpgate_dataplane::{self as dataplane, PinDir, apply, flows, tables::TablesStatus};

use crate::agent_state::{self, AgentState};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    /// Interfaces with a pinned attachment.
    pub interfaces: Vec<IfaceStatus>,
    /// The running policy; none when the dataplane's maps are not pinned.
    pub policy: Option<PolicyStatus>,
    /// Entries in the flow table (one per direction of each flow).
    pub flow_entries: Option<u64>,
    /// Sizes of the flow, embryonic and NAT tables (chosen at first attach) and the kernel
    /// memory they take; none when the dataplane's maps are not pinned.
    pub tables: Option<TablesStatus>,
    /// What the agent (`xdpgate run`) last wrote about itself; none if it never ran here.
    pub agent: Option<AgentStatus>,
    /// The pid of an agent that runs the dataplane but has no state file (while it starts,
    /// or when it could not write one: a full `/run`), so how its last reload went is not
    /// known here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_without_state: Option<u32>,
    /// BGP announcements (`xdpgate bgp`); none when no agent with a `bgp:` section ran here
    /// and the node is not drained.
    pub bgp: Option<crate::bgp::report::BgpReport>,
}

#[derive(Debug, Serialize)]
pub struct AgentStatus {
    /// Whether its process still exists.
    pub running: bool,
    #[serde(flatten)]
    pub state: AgentState,
}

#[derive(Debug, Serialize)]
pub struct IfaceStatus {
    /// The interface's name when it was attached (the name of its pinned link).
    #[serde(rename = "interface")]
    pub name: String,
    /// Where the pinned link's device is: `here` (this network namespace), `netns` (the
    /// namespace named in `netns`), `unnamed-netns` (a namespace without a name under
    /// /run/netns), `gone` (the link is detached: its device was deleted), or `unknown`
    /// (`ip` could not list the devices).
    pub place: &'static str,
    /// The `ip netns` name of the device's namespace when it is not this one.
    pub netns: Option<String>,
    /// The device's ifindex in its namespace; none once the link is detached.
    pub ifindex: Option<u32>,
    /// `external` or `internal`, as registered in the `IFACES` map.
    pub role: Option<&'static str>,
    /// Counter slot in `IFACE_STATS`.
    pub slot: Option<u32>,
    /// Where the ingress pipeline runs: `xdp` or `tc` (tcx ingress), as its pinned link
    /// says; none when the link cannot be read.
    pub hook: Option<dataplane::Hook>,
    /// `native`, `skb` (generic), `offload`, `none` (no XDP program: so with `hook: tc`),
    /// or `unknown` when `ip` could not tell.
    pub xdp_mode: String,
    /// Name and id of the ingress program the interface runs (XDP, or tc with `hook: tc`).
    pub program: Option<String>,
    pub program_id: Option<u64>,
    /// The bpf_link's id (`bpftool link show id N`).
    pub link_id: Option<u32>,
    /// The tcx egress program judging the host's own packets: its id and its link's; none
    /// when the interface was attached by a build without it (`xdpgate upgrade` adds it).
    pub egress_program_id: Option<u32>,
    pub egress_link_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct PolicyStatus {
    /// 0 before the first apply.
    pub generation: u64,
    /// Policy slot packets use (0 or 1).
    pub slot: u32,
    /// The agent's copy of the applied policy.
    pub applied_path: Option<PathBuf>,
    /// When it was applied: RFC 3339 UTC, and seconds since the Unix epoch.
    pub applied_at: Option<String>,
    #[serde(rename = "applied_unix_seconds")]
    pub applied_unix: Option<u64>,
    /// An `xdpgate set` change is rewriting the running tables, or was killed doing so
    /// (`GENERATION_CHANGING`): every flow is judged again on each packet until the next
    /// set change or apply.
    pub set_change_unfinished: bool,
}

/// The devices of one network namespace, as `ip -j -d link show` lists them (`ip -n NAME`
/// for a named one); none when `ip` fails.
fn devices(netns: Option<&str>) -> Option<Vec<serde_json::Value>> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out =
        cmd.args(["-j", "-d", "link", "show"]).output().ok().filter(|o| o.status.success())?;
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?.as_array().cloned()
}

/// The device of `devices` (of network namespace `netns`, none: this one) that is
/// `link`'s: same ifindex and running the link's program (ifindexes repeat across
/// namespaces, program ids do not).
fn device_of<'a>(
    devices: &'a [serde_json::Value],
    netns: Option<&str>,
    link: &dataplane::IngressLinkInfo,
) -> Option<&'a serde_json::Value> {
    devices.iter().find(|d| {
        d["ifindex"].as_u64() == Some(u64::from(link.ifindex))
            && match link.hook {
                dataplane::Hook::Xdp => xdp_programs(d).contains(&u64::from(link.prog_id)),
                // `ip` does not list tcx programs: the kernel is asked.
                dataplane::Hook::Tc => d["ifname"]
                    .as_str()
                    .is_some_and(|name| tc_ingress_programs(netns, name).contains(&link.prog_id)),
            }
    })
}

/// Ids of the tcx ingress programs of device `ifname` of network namespace `netns` (none:
/// this one); empty when they cannot be read.
fn tc_ingress_programs(netns: Option<&str>, ifname: &str) -> Vec<u32> {
    use aya::programs::{SchedClassifier, tc::TcAttachType};
    let query = || {
        SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
            .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
            .unwrap_or_default()
    };
    match netns {
        None => query(),
        // setns moves the calling thread only: a thread of its own goes there and ends.
        Some(ns) => std::thread::scope(|s| {
            s.spawn(|| {
                if dataplane::netns::enter(ns).is_err() {
                    return Vec::new();
                }
                query()
            })
            .join()
            .unwrap_or_default()
        }),
    }
}

/// Ids of every XDP program attached to one device of `ip -j -d link show`.
fn xdp_programs(link: &serde_json::Value) -> Vec<u64> {
    let xdp = &link["xdp"];
    let mut ids: Vec<u64> = xdp["prog"]["id"].as_u64().into_iter().collect();
    if let Some(all) = xdp["attached"].as_array() {
        ids.extend(all.iter().filter_map(|a| a["prog"]["id"].as_u64()));
    }
    ids
}

/// The named network namespaces (`ip netns` names, /run/netns/*) other than this one.
fn other_named_netns() -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let here = id("/proc/thread-self/ns/net".as_ref());
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return Vec::new() };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| id(&e.path()).is_some_and(|i| Some(i) != here))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Finds where a pinned link's device lives: here, in a named namespace, or neither.
/// Lists each namespace's devices at most once per status.
struct Finder {
    here: Option<Vec<serde_json::Value>>,
    others: Option<Vec<(String, Vec<serde_json::Value>)>>,
}

impl Finder {
    fn new() -> Self {
        Self { here: devices(None), others: None }
    }

    fn find(
        &mut self,
        link: &dataplane::IngressLinkInfo,
    ) -> (&'static str, Option<String>, Option<serde_json::Value>) {
        let Some(here) = &self.here else {
            // Without `ip` nothing can be told apart.
            return ("unknown", None, None);
        };
        if let Some(d) = device_of(here, None, link) {
            return ("here", None, Some(d.clone()));
        }
        let others = self.others.get_or_insert_with(|| {
            other_named_netns()
                .into_iter()
                .filter_map(|ns| Some((ns.clone(), devices(Some(&ns))?)))
                .collect()
        });
        for (ns, devs) in others.iter() {
            if let Some(d) = device_of(devs, Some(ns), link) {
                return ("netns", Some(ns.clone()), Some(d.clone()));
            }
        }
        ("unnamed-netns", None, None)
    }
}

/// Reads the `xdp` object of one link of `ip -j -d link show`: `mode` is the kernel's
/// `XDP_ATTACHED_*` (1 driver, 2 generic, 3 hardware, 4 several), with the program in
/// `prog` or, for several, in `attached`.
fn xdp_from_json(link: &serde_json::Value) -> (String, Option<String>, Option<u64>) {
    let xdp = &link["xdp"];
    if xdp.is_null() {
        return ("none".into(), None, None);
    }
    let mode_name = |m: u64| match m {
        0 => "none",
        1 => "native",
        2 => "skb",
        3 => "offload",
        _ => "unknown",
    };
    let prog_of = |v: &serde_json::Value| {
        let p = &v["prog"];
        (p["name"].as_str().map(str::to_string), p["id"].as_u64())
    };
    match xdp["mode"].as_u64() {
        Some(4) => {
            // Several programs: report ours (the first named xdpgate) or else the first.
            let attached = xdp["attached"].as_array().cloned().unwrap_or_default();
            let pick = attached
                .iter()
                .find(|a| a["prog"]["name"].as_str() == Some(dataplane::PROGRAM))
                .or_else(|| attached.first());
            match pick {
                Some(a) => {
                    let (name, id) = prog_of(a);
                    (mode_name(a["mode"].as_u64().unwrap_or(99)).into(), name, id)
                }
                None => ("unknown".into(), None, None),
            }
        }
        Some(m) => {
            let (name, id) = prog_of(xdp);
            (mode_name(m).into(), name, id)
        }
        None => ("unknown".into(), None, None),
    }
}

/// Reads the status; parts that cannot be read (no pinned maps) are left out.
pub fn read(pins: &PinDir) -> anyhow::Result<Status> {
    let registered = dataplane::registered(pins).unwrap_or_default();
    let mut interfaces = Vec::new();
    let mut finder = Finder::new();
    for name in pins.attached()? {
        let link = match dataplane::link_info(pins, &name) {
            Ok(link) => Some(link),
            // A user without privileges is told so, not shown a detached interface.
            Err(e) if dataplane::is_permission_error(&e) => return Err(e),
            Err(e) => {
                log::warn!("{name}: {e:#}");
                None
            }
        };
        // ifindex 0: the kernel has detached the link (its device was deleted).
        let link = link.filter(|l| l.ifindex != 0);
        let (place, netns, device) = match &link {
            Some(link) => finder.find(link),
            None => ("gone", None, None),
        };
        let ifindex = link.map(|l| l.ifindex);
        let config =
            ifindex.and_then(|i| registered.iter().find(|(k, _)| *k == i)).map(|(_, c)| *c);
        let egress = match dataplane::egress_link_info(pins, &name) {
            Ok(egress) => egress,
            Err(e) if dataplane::is_permission_error(&e) => return Err(e),
            Err(e) => {
                log::warn!("{name}: egress link: {e:#}");
                None
            }
        };
        let (xdp_mode, program, program_id) = match (&device, &link) {
            (Some(d), Some(l)) if l.hook == dataplane::Hook::Tc => {
                // The device's XDP (none, unless another program put some there) and the tc
                // program, named as the kernel names it.
                let name = aya::programs::loaded_programs()
                    .filter_map(Result::ok)
                    .find(|p| p.id() == l.prog_id)
                    .and_then(|p| p.name_as_str().map(str::to_string));
                (xdp_from_json(d).0, name, Some(u64::from(l.prog_id)))
            }
            (Some(d), _) => xdp_from_json(d),
            (None, Some(l)) => ("unknown".into(), None, Some(u64::from(l.prog_id))),
            (None, None) => ("none".into(), None, None),
        };
        interfaces.push(IfaceStatus {
            name,
            place,
            netns,
            ifindex,
            role: config.map(|c| match Role::from_u32(c.role) {
                Role::External => "external",
                Role::Internal => "internal",
            }),
            slot: config.map(|c| c.slot),
            hook: link.map(|l| l.hook),
            xdp_mode,
            program,
            program_id,
            link_id: link.map(|l| l.link_id),
            egress_link_id: egress.map(|(link, _)| link),
            egress_program_id: egress.map(|(_, prog)| prog),
        });
    }
    let unfinished = apply::changing(pins).unwrap_or(false);
    let policy = apply::active(pins).ok().map(|(slot, config)| {
        let path = apply::applied_source(pins).map(|(p, _)| p);
        let unix = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok()?.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        PolicyStatus {
            generation: config.generation,
            slot,
            applied_path: path,
            applied_at: unix.map(crate::dates::rfc3339),
            applied_unix: unix,
            set_change_unfinished: unfinished,
        }
    });
    let agent =
        agent_state::read(pins).map(|state| AgentStatus { running: state.running(pins), state });
    Ok(Status {
        pin_dir: pins.path().to_path_buf(),
        interfaces,
        policy,
        flow_entries: flows::count(pins).ok(),
        tables: TablesStatus::read(pins).unwrap_or_else(|e| {
            log::warn!("table sizes: {e:#}");
            None
        }),
        agent_without_state: match &agent {
            Some(a) if a.running => None,
            _ => dataplane::state::agent_pid(pins),
        },
        agent,
        bgp: crate::bgp::report::report(pins).ok().filter(|r| r.agent.is_some() || r.node_drained),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_matched_by_ifindex_and_program() {
        let devs: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"ifindex":2,"ifname":"a","xdp":{"mode":1,"prog":{"id":10}}},
                {"ifindex":3,"ifname":"b","xdp":{"mode":4,"attached":[{"mode":2,"prog":{"id":11}},
                 {"mode":1,"prog":{"id":12}}]}},
                {"ifindex":4,"ifname":"c"}]"#,
        )
        .unwrap();
        let link = |ifindex, prog_id| dataplane::IngressLinkInfo {
            link_id: 1,
            prog_id,
            ifindex,
            hook: dataplane::Hook::Xdp,
        };
        assert_eq!(device_of(&devs, None, &link(2, 10)).unwrap()["ifname"], "a");
        assert_eq!(device_of(&devs, None, &link(3, 12)).unwrap()["ifname"], "b");
        // The same ifindex running another program is another namespace's device.
        assert!(device_of(&devs, None, &link(2, 12)).is_none());
        assert!(device_of(&devs, None, &link(4, 10)).is_none());
    }

    #[test]
    fn xdp_mode_from_ip_json() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let native = j(
            r#"{"ifname":"eth0","xdp":{"mode":1,"prog":{"id":42,"name":"xdpgate","tag":"ab","jited":1}}}"#,
        );
        assert_eq!(xdp_from_json(&native), ("native".into(), Some("xdpgate".into()), Some(42)));
        let generic = j(r#"{"xdp":{"mode":2,"prog":{"id":7,"name":"xdpgate"}}}"#);
        assert_eq!(xdp_from_json(&generic).0, "skb");
        assert_eq!(xdp_from_json(&j(r#"{"ifname":"eth0"}"#)).0, "none");
        let multi = j(r#"{"xdp":{"mode":4,"attached":[{"mode":2,"prog":{"id":5,"name":"other"}},
                         {"mode":1,"prog":{"id":6,"name":"xdpgate"}}]}}"#);
        assert_eq!(xdp_from_json(&multi), ("native".into(), Some("xdpgate".into()), Some(6)));
    }
}
