//! The node file (`xdpgate run --node /etc/xdpgate/node.yaml`): which interfaces of this
//! machine xdpgate guards, in which role and on which hook (XDP in a mode, or tc). It is kept apart from the policy
//! because the policy says what traffic is allowed and may be shared by several gateways,
//! while interface names belong to one machine. After a reboot bpffs is empty; the agent
//! attaches every interface listed here that has no pinned link, and leaves the others alone.
//!
//! ```yaml
//! interfaces:
//!   - {name: eth0, role: external}              # mode: native (default) or skb
//!   - {name: eth1, role: internal, mode: skb}
//!   - {name: veth0, role: internal, hook: tc}   # hook: xdp (default) or tc; no mode
//! tables:                                       # optional, as `xdpgate attach --flows`
//!   flows: 1000000                              # established flows (default 524,288)
//!   nat_translations: 262144                    # NAT translations (default 262,144)
//! bgp: {router_id: 10.0.1.2, local_as: 65001, peers: [{address: 10.0.1.1, as: 65000}]}
//! encapsulation: {source4: 10.0.1.2, source6: "2001:db8:1::2"}   # optional
//! ```
//!
//! `encapsulation:` (optional) gives the outer source addresses of `forwarding: ipip`
//! rules; a family not given takes the first global address of the listed interfaces
//! (see `xdpgate_dataplane::encap`).
//!
//! `bgp:` (optional, [`bgp`]) makes the agent announce the frontends.
//!
//! `tables:` sizes the flow and NAT tables when the agent creates them (the first attach
//! after a reboot); while they are pinned a different size is reported as failing (`status`)
//! and the pinned size stays.

pub mod bgp;

use std::{collections::HashSet, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use xdpgate_common::iface::Role;
use xdpgate_policy::tree::{self, Kind, Value};

use xdpgate_dataplane::{
    self as dataplane, Hook, Ingress, Mode, PinDir,
    tables::{MAX_FLOWS, MAX_NAT_TRANSLATIONS, MIN_FLOWS, MIN_NAT_TRANSLATIONS, thousands},
};

#[derive(Debug)]
pub struct Node {
    pub interfaces: Vec<Interface>,
    /// Table sizes for the first attach (`tables:`); none asked: the defaults.
    pub tables: dataplane::SizeRequest,
    /// This node's BGP values (`bgp:`); none: the agent announces nothing.
    pub bgp: Option<bgp::Bgp>,
    /// Outer source addresses given for encapsulation (`encapsulation:`).
    pub encapsulation: dataplane::encap::Sources,
}

impl Node {
    /// The outer sources of encapsulation: the node file's, else the first usable global
    /// address of each family on the node's interfaces (attached or not yet: the agent
    /// applies the policy before the first attach after a reboot) that is not in `avoid`
    /// (the policy's frontends).
    pub fn encap_sources(&self, avoid: &[IpAddr]) -> Result<dataplane::encap::Chosen> {
        let names: Vec<String> = self.interfaces.iter().map(|i| i.name.clone()).collect();
        dataplane::encap::Chosen::given(self.encapsulation, "node file").complete_on(&names, avoid)
    }
}

#[derive(Debug)]
pub struct Interface {
    pub name: String,
    pub role: RoleName,
    /// `hook:`; without it, XDP when a `mode:` is given, or else the interface driver's
    /// default ([`Hook::default_for`]).
    pub hook: Option<Hook>,
    /// `mode:`; only with `hook: xdp`.
    pub mode: Option<ModeName>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleName {
    External,
    Internal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeName {
    #[default]
    Native,
    Skb,
}

impl Interface {
    pub fn role(&self) -> Role {
        match self.role {
            RoleName::External => Role::External,
            RoleName::Internal => Role::Internal,
        }
    }

    /// Where the interface's pipeline goes; the default hook needs the interface present.
    pub fn ingress(&self) -> Result<Ingress> {
        let hook = match (self.hook, self.mode) {
            (Some(hook), _) => hook,
            (None, Some(_)) => Hook::Xdp,
            (None, None) => Hook::default_for(&self.name)?,
        };
        Ok(match (hook, self.mode.unwrap_or_default()) {
            (Hook::Tc, _) => Ingress::Tc,
            (Hook::Xdp, ModeName::Native) => Ingress::Xdp(Mode::Native),
            (Hook::Xdp, ModeName::Skb) => Ingress::Xdp(Mode::Skb),
        })
    }
}

/// Reads and checks a node file.
pub fn load(file: &Path) -> Result<Node> {
    let text = xdpgate_policy::read_source(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    parse(&text).with_context(|| format!("node file {}", file.display()))
}

/// What a node file gets wrong, every problem of it: an operator fixes them in one round,
/// as with a policy file.
pub(crate) type Problems = Vec<anyhow::Error>;

/// The value of `result`, or `None` with its error noted.
fn noted<T>(problems: &mut Problems, result: Result<T>) -> Option<T> {
    result.map_err(|e| problems.push(e)).ok()
}

/// Problems listed; the rest are counted (a generated file can be wrong a million times).
const MAX_SHOWN: usize = 1000;

/// One error of all `problems` (there is at least one), one per line.
fn combined(mut problems: Problems) -> anyhow::Error {
    if problems.len() == 1 {
        return problems.remove(0);
    }
    let mut lines: Vec<String> =
        problems.iter().take(MAX_SHOWN).map(|e| format!("  {e:#}")).collect();
    if problems.len() > MAX_SHOWN {
        lines.push(format!("  {} more problems not shown", problems.len() - MAX_SHOWN));
    }
    anyhow::anyhow!("{} problems:\n{}", problems.len(), lines.join("\n"))
}

/// Where in the file a node is, as the errors say it.
pub(crate) fn at(pos: tree::Pos) -> String {
    format!("line {}, column {}", pos.line, pos.column)
}

/// A node's text, if it is a string.
pub(crate) fn text_of(n: &tree::Node) -> Option<String> {
    match n.value() {
        Some(Value::Str(s)) => Some(s.to_owned()),
        _ => None,
    }
}

/// Notes each key written twice in any mapping of the document: reading it would keep one
/// and drop the other unseen (a node file put together from two, whose first
/// `interfaces:` would go unattached).
fn no_key_twice(node: &tree::Node, problems: &mut Problems) {
    match &node.kind {
        Kind::Scalar { .. } => {}
        Kind::Seq(items) => items.iter().for_each(|i| no_key_twice(i, problems)),
        Kind::Map(entries) => {
            // Each key's first line, by name: a search of the earlier keys for each took
            // minutes on a file of 80,000 keys.
            let mut first_lines = std::collections::HashMap::new();
            for (k, v) in entries {
                let name = match &k.kind {
                    Kind::Scalar { text, .. } => text.clone(),
                    _ => k.describe(),
                };
                if let Some(first) = first_lines.get(&name) {
                    problems.push(anyhow::anyhow!(
                        "{}: {name} is written twice (first on line {first})",
                        at(k.pos),
                    ));
                } else {
                    first_lines.insert(name, k.pos.line);
                }
                no_key_twice(v, problems);
            }
        }
    }
}

/// Reads the document with the policy's positioned YAML reader: `interfaces:`, a list of
/// `{name, role, hook, mode}` (hook and mode optional, mode only with `hook: xdp`), and
/// optionally `tables:`, `bgp:` and `encapsulation:`; nothing else. Every problem is noted,
/// not only the first.
fn read(text: &str, problems: &mut Problems) -> Option<Node> {
    let doc = match tree::parse(text) {
        Ok(Some(doc)) => doc,
        Ok(None) => {
            problems.push(anyhow::anyhow!("the file is empty: expected `interfaces:`"));
            return None;
        }
        Err(e) => {
            problems.push(anyhow::anyhow!("{}: {}", at(e.pos), e.reason));
            return None;
        }
    };
    no_key_twice(&doc, problems);
    let Kind::Map(entries) = &doc.kind else {
        problems.push(anyhow::anyhow!(
            "{}: expected a mapping with `interfaces:`, found {}",
            at(doc.pos),
            doc.describe()
        ));
        return None;
    };
    let mut node = Node {
        interfaces: Vec::new(),
        tables: dataplane::SizeRequest::default(),
        bgp: None,
        encapsulation: dataplane::encap::Sources::default(),
    };
    let mut listed = false;
    for (k, v) in entries {
        match text_of(k).as_deref() {
            Some("interfaces") => {
                listed = true;
                node.interfaces = read_interfaces(v, problems);
            }
            Some("tables") => read_tables(v, &mut node.tables, problems),
            Some("bgp") => node.bgp = bgp::read(v, problems),
            Some("encapsulation") => node.encapsulation = read_encapsulation(v, problems),
            _ => problems.push(anyhow::anyhow!(
                "{}: unknown field {:?} (known: interfaces, tables, bgp, encapsulation)",
                at(k.pos),
                tree::elide(&text_of(k).unwrap_or_default())
            )),
        }
    }
    if !listed {
        problems.push(anyhow::anyhow!("interfaces: lists no interface"));
    }
    Some(node)
}

/// `interfaces:`, each item read apart.
fn read_interfaces(v: &tree::Node, problems: &mut Problems) -> Vec<Interface> {
    let Kind::Seq(items) = &v.kind else {
        problems.push(anyhow::anyhow!(
            "{}: interfaces: expected a list, found {}",
            at(v.pos),
            v.describe()
        ));
        return Vec::new();
    };
    if items.is_empty() {
        problems.push(anyhow::anyhow!("interfaces: lists no interface"));
    }
    let mut seen = HashSet::new();
    items
        .iter()
        .filter_map(|item| {
            let i = read_interface(item, problems)?;
            if !seen.insert(i.name.clone()) {
                let at = at(item.pos);
                problems.push(anyhow::anyhow!("{at}: interfaces: {} is listed twice", i.name));
                return None;
            }
            Some(i)
        })
        .collect()
}

/// Why `name` cannot name a Linux interface, if it cannot: at most IFNAMSIZ - 1 bytes, no
/// '/', ':' or whitespace, not "." or ".." ('/' would also escape `links/`); a control
/// character would be printed raw by the views.
fn not_an_interface_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name.contains(['/', ':']) {
        Some("'/' and ':' are not allowed")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("whitespace and control characters are not allowed")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not allowed")
    } else {
        None
    }
}

/// One interface item, every problem of it noted (a field written wrong is not also
/// missing).
fn read_interface(item: &tree::Node, problems: &mut Problems) -> Option<Interface> {
    let Kind::Map(fields) = &item.kind else {
        problems.push(anyhow::anyhow!(
            "{}: interfaces: expected a mapping, found {}",
            at(item.pos),
            item.describe()
        ));
        return None;
    };
    let before = problems.len();
    let (mut name, mut role, mut mode, mut hook) = (None, None, None, None);
    let mut written = Vec::new();
    for (k, v) in fields {
        let key = text_of(k).unwrap_or_default();
        let value = text_of(v);
        match (key.as_str(), value.as_deref()) {
            ("name", Some(n)) => match not_an_interface_name(n) {
                None => name = Some(n.to_owned()),
                Some(why) => problems.push(anyhow::anyhow!(
                    "{}: name: {:?} is not an interface name: {why}",
                    at(v.pos),
                    tree::elide(n)
                )),
            },
            ("role", Some("external")) => role = Some(RoleName::External),
            ("role", Some("internal")) => role = Some(RoleName::Internal),
            ("mode", Some("native")) => mode = Some((ModeName::Native, v.pos)),
            ("mode", Some("skb")) => mode = Some((ModeName::Skb, v.pos)),
            ("hook", Some("xdp")) => hook = Some(Hook::Xdp),
            ("hook", Some("tc")) => hook = Some(Hook::Tc),
            // A name YAML reads as a number or a boolean (`12`, `0x10`, `true`): quoted, it is
            // a name (seen: the values of role, hook and mode offered instead).
            ("name", None) => {
                let quote = match &v.kind {
                    Kind::Scalar { text, plain: true } => {
                        format!(": quote it (name: \"{}\")", tree::elide(text))
                    }
                    _ => String::new(),
                };
                problems.push(anyhow::anyhow!(
                    "{}: name: expected an interface name, found {}{quote}",
                    at(v.pos),
                    v.describe()
                ))
            }
            ("role" | "mode" | "hook", _) => problems.push(anyhow::anyhow!(
                "{}: {key}: {} is not valid here (role: external or internal; hook: xdp or tc; \
                 mode: native or skb)",
                at(v.pos),
                v.describe()
            )),
            _ => problems.push(anyhow::anyhow!(
                "{}: unknown field {:?} (known: name, role, hook, mode)",
                at(k.pos),
                tree::elide(&key)
            )),
        }
        written.push(key);
    }
    for field in ["name", "role"] {
        if !written.iter().any(|k| k == field) {
            problems.push(anyhow::anyhow!("{}: {field} is missing", at(item.pos)));
        }
    }
    if let (Some(Hook::Tc), Some((_, pos))) = (hook, mode) {
        problems.push(anyhow::anyhow!(
            "{}: mode: applies to XDP only; hook: tc attaches at tc ingress (tcx), which has \
             no modes",
            at(pos)
        ));
    }
    if problems.len() > before {
        return None;
    }
    Some(Interface { name: name?, role: role?, hook, mode: mode.map(|(m, _)| m) })
}

/// `tables: {flows, nat_translations}`, each field read apart.
fn read_tables(v: &tree::Node, tables: &mut dataplane::SizeRequest, problems: &mut Problems) {
    let Kind::Map(fields) = &v.kind else {
        problems.push(anyhow::anyhow!(
            "{}: tables: expected a mapping, found {}",
            at(v.pos),
            v.describe()
        ));
        return;
    };
    for (k, v) in fields {
        let key = text_of(k).unwrap_or_default();
        let (slot, lo, hi) = match key.as_str() {
            "flows" => (&mut tables.flows, MIN_FLOWS, MAX_FLOWS),
            "nat_translations" => {
                (&mut tables.nat_translations, MIN_NAT_TRANSLATIONS, MAX_NAT_TRANSLATIONS)
            }
            _ => {
                problems.push(anyhow::anyhow!(
                    "{}: tables: unknown field {:?} (known: flows, nat_translations)",
                    at(k.pos),
                    tree::elide(&key)
                ));
                continue;
            }
        };
        let size = match v.value() {
            Some(Value::Int(Some(n))) => {
                u32::try_from(n).ok().filter(|n| (lo..=hi).contains(n)).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: tables: {key}: {n} is out of range (between {} and {})",
                        at(v.pos),
                        thousands(lo.into()),
                        thousands(hi.into())
                    )
                })
            }
            _ => Err(anyhow::anyhow!(
                "{}: tables: {key}: expected a number, found {}",
                at(v.pos),
                v.describe()
            )),
        };
        if let Some(n) = noted(problems, size) {
            *slot = Some(n);
        }
    }
}

/// `encapsulation: {source4: ADDR, source6: ADDR}`, either optional, each read apart.
fn read_encapsulation(v: &tree::Node, problems: &mut Problems) -> dataplane::encap::Sources {
    let mut sources = dataplane::encap::Sources::default();
    let Kind::Map(fields) = &v.kind else {
        problems.push(anyhow::anyhow!(
            "{}: encapsulation: expected a mapping, found {}",
            at(v.pos),
            v.describe()
        ));
        return sources;
    };
    for (k, v) in fields {
        let _ = noted(problems, read_source(k, v, &mut sources));
    }
    sources
}

/// One field of `encapsulation:` into `sources`.
fn read_source(
    k: &tree::Node,
    v: &tree::Node,
    sources: &mut dataplane::encap::Sources,
) -> Result<()> {
    let key = text_of(k).unwrap_or_default();
    let text = text_of(v);
    let bad = |kind: &str, note: &str| {
        anyhow::anyhow!(
            "{}: encapsulation: {key}: expected {kind}, found {}{note}",
            at(v.pos),
            v.describe()
        )
    };
    // The outer source of every packet sent: the dataplane takes 0.0.0.0 for none.
    let usable = |a: IpAddr| match xdpgate_policy::unforwardable(a) {
        Some(what) => Err(anyhow::anyhow!(
            "{}: encapsulation: {key}: {a} is {what}: unusable as an outer source",
            at(v.pos)
        )),
        None => Ok(()),
    };
    match key.as_str() {
        "source4" => {
            let a = text.and_then(|t| t.parse().ok()).ok_or_else(|| bad("an IPv4 address", ""))?;
            usable(IpAddr::V4(a))?;
            sources.v4 = Some(a);
        }
        "source6" => {
            let a: std::net::Ipv6Addr =
                text.and_then(|t| t.parse().ok()).ok_or_else(|| bad("an IPv6 address", ""))?;
            if let Some(v4) = a.to_ipv4_mapped() {
                bail!(bad("an IPv6 address", &format!(" (IPv4-mapped: write source4: {v4})")));
            }
            usable(IpAddr::V6(a))?;
            sources.v6 = Some(a);
        }
        _ => bail!(
            "{}: encapsulation: unknown field {:?} (known: source4, source6)",
            at(k.pos),
            tree::elide(&key)
        ),
    }
    Ok(())
}

/// Reads and checks a node file's text; the error lists every problem.
pub fn parse(text: &str) -> Result<Node> {
    let mut problems = Problems::new();
    let node = read(text, &mut problems);
    match node {
        Some(node) if problems.is_empty() => Ok(node),
        _ => Err(combined(problems)),
    }
}

/// The interfaces of `node` with no pinned link (not attached by this pin directory), or
/// with the link of a device of that name that was deleted (attached again as a new one).
pub fn missing<'a>(pins: &PinDir, node: &'a Node) -> Vec<&'a Interface> {
    node.interfaces
        .iter()
        .filter(|i| !pins.link(&i.name).exists() || dataplane::link_gone(pins, &i.name))
        .collect()
}

/// Attaches every interface of `node` that has no pinned link, creating the tables at the
/// node's sizes if they are not pinned yet; returns the ones attached, and an error for each
/// that could not be. Table sizes that differ from the pinned ones are an error too, so that
/// `status` shows the node file is not in force, but the interfaces are attached all the
/// same, with the pinned tables: an interface left unattached would pass traffic unfiltered.
///
/// Under the write lock, as `xdpgate attach` takes it, waiting at most `wait` for it (the
/// agent's periodic retry does not wait: `None` means another writer has it, try again
/// later): an attach of the operator's beside this one would otherwise find the link
/// unpinned too, and the loser's cleanup take the winner's egress link and registration.
pub fn attach_missing(
    pins: &PinDir,
    node: &Node,
    wait: std::time::Duration,
) -> Option<(Vec<String>, Vec<anyhow::Error>)> {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let _lock = match dataplane::state::WriteLock::try_acquire_within(pins, wait) {
        Ok(Some(lock)) => lock,
        Ok(None) if wait.is_zero() => return None,
        Ok(None) => {
            return Some((done, vec![dataplane::state::WriteLock::busy(pins, wait)]));
        }
        Err(e) => return Some((done, vec![e])),
    };
    let mut sizes = node.tables;
    if let Err(e) = dataplane::tables::plan(pins, &sizes) {
        failed.push(e.context("tables"));
        sizes = dataplane::SizeRequest::default();
    }
    for i in missing(pins, node) {
        let attached = i
            .ingress()
            .and_then(|ingress| dataplane::attach_sized(pins, &i.name, i.role(), ingress, &sizes));
        match attached {
            Ok(()) => done.push(i.name.clone()),
            Err(e) => failed.push(e.context(format!("attaching {} ({:?})", i.name, i.role))),
        }
    }
    failed.extend(other_hook(pins, node));
    Some((done, failed))
}

/// An error for each interface of `node` attached with another hook than the node file's
/// (attached by hand, or under an earlier node file): it stays on that hook, as switching
/// means a moment without the filter, but the operator who wrote `hook: tc` must not
/// believe it is in force (on a veth, XDP breaks NAT of TSO traffic). Only for a hook the
/// node file names: an interface attached before the per-driver default stays as it is.
fn other_hook(pins: &PinDir, node: &Node) -> Vec<anyhow::Error> {
    node.interfaces
        .iter()
        .filter(|i| pins.link(&i.name).exists())
        .filter_map(|i| {
            let wanted = i.hook?;
            let running = dataplane::link_info(pins, &i.name).ok()?.hook;
            (running != wanted).then(|| {
                anyhow::anyhow!(
                    "{} is attached with hook {}, the node file says hook: {}: it stays on {} \
                     until detached (xdpgate detach --iface {}), then the agent attaches it as \
                     the node file says",
                    i.name,
                    running.name(),
                    wanted.name(),
                    running.name(),
                    i.name
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encapsulation:` gives either family's outer source; bad values name their place.
    #[test]
    fn encapsulation_sources() {
        let base = "interfaces:\n  - {name: eth0, role: external}\n";
        let n = parse(base).unwrap();
        assert_eq!(n.encapsulation, dataplane::encap::Sources::default());
        let n = parse(&format!(
            "{base}encapsulation: {{source4: 10.0.1.2, source6: \"2001:db8:a::2\"}}\n"
        ))
        .unwrap();
        assert_eq!(n.encapsulation.v4, Some("10.0.1.2".parse().unwrap()));
        assert_eq!(n.encapsulation.v6, Some("2001:db8:a::2".parse().unwrap()));
        let n = parse(&format!("{base}encapsulation: {{source6: \"2001:db8:a::2\"}}\n")).unwrap();
        assert_eq!(n.encapsulation.v4, None);
        for (bad, why) in [
            (
                "encapsulation: {source4: \"2001:db8::1\"}",
                "line 3, column 26: encapsulation: source4: expected an IPv4 address",
            ),
            (
                "encapsulation: {source6: 10.0.0.1}",
                "line 3, column 26: encapsulation: source6: expected an IPv6 address",
            ),
            (
                "encapsulation: {src: 10.0.0.1}",
                "line 3, column 17: encapsulation: unknown field \"src\"",
            ),
            ("encapsulation: 10.0.0.1", "line 3, column 16: encapsulation: expected a mapping"),
            // Outer sources a reply cannot come back to: the dataplane takes 0.0.0.0 for "no
            // source" and drops every packet to send (seen failing: `check` said ok).
            (
                "encapsulation: {source4: 0.0.0.0}",
                "line 3, column 26: encapsulation: source4: 0.0.0.0 is the unspecified address: \
                 unusable as an outer source",
            ),
            (
                "encapsulation: {source4: 127.0.0.1}",
                "source4: 127.0.0.1 is a loopback address: unusable as an outer source",
            ),
            (
                "encapsulation: {source6: \"ff02::1\"}",
                "source6: ff02::1 is a multicast address: unusable as an outer source",
            ),
            (
                "encapsulation: {source6: \"::ffff:10.0.0.1\"}",
                "source6: expected an IPv6 address, found string \"::ffff:10.0.0.1\" (IPv4-mapped: \
                 write source4: 10.0.0.1)",
            ),
        ] {
            let err = format!("{:#}", parse(&format!("{base}{bad}\n")).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// Every problem of a node file is reported, each at its place, in one run (until
    /// 2026-12-04 `check --node` and the agent stopped at the first: seen with this file,
    /// only the role). A field, an interface and a peer are read apart; a wrong value is
    /// not also reported missing.
    #[test]
    fn every_problem_of_a_node_file() {
        let text = "interfaces:\n  - {name: eth0, role: outside}\n  - {name: eth1, role: \
                    internal, mtu: 9000}\n  - {name: eth2, role: external}\n  - {name: eth2, \
                    role: internal}\ntables: {flows: 10, embryos: 4}\nbgp: {router_id: 0.0.0.0, \
                    local_as: 1, peers: [{address: 'fe80::1', as: 1}, {address: 203.0.113.1}]}\n\
                    encapsulation: {source4: 127.0.0.1}\n";
        let e = format!("{:#}", parse(text).unwrap_err());
        let expected = [
            "9 problems:",
            "line 2, column 24: role: string \"outside\" is not valid here",
            "line 3, column 34: unknown field \"mtu\"",
            "line 5, column 5: interfaces: eth2 is listed twice",
            "line 6, column 17: tables: flows: 10 is out of range",
            "line 6, column 21: tables: unknown field \"embryos\"",
            "line 7, column 18: bgp: router_id: 0.0.0.0 is not a router ID",
            "line 7, column 48: bgp: peers: fe80::1 is link-local",
            "line 7, column 77: bgp: peers: as is missing",
            "line 8, column 26: encapsulation: source4: 127.0.0.1 is a loopback address",
        ];
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), expected.len(), "{e}");
        for (line, want) in lines.iter().zip(expected) {
            assert!(line.contains(want), "{line:?} lacks {want:?}\n{e}");
        }
        // A required field written wrong is not also missing; one not written is.
        let e = format!(
            "{:#}",
            parse("interfaces: [{name: a, role: external}]\nbgp: {router_id: x, peers: []}\n")
                .unwrap_err()
        );
        assert!(e.starts_with("3 problems:"), "{e}");
        assert!(e.contains("router_id: expected an IPv4 address"), "{e}");
        assert!(e.contains("peers: lists no peer") && e.contains("local_as is missing"), "{e}");
        assert!(!e.contains("router_id is missing"), "{e}");
        // Every problem of one interface item (seen failing: only the first, the role).
        let e = format!(
            "{:#}",
            parse("interfaces: [{role: outside, mtu: 1, hook: tc, mode: skb}]\n").unwrap_err()
        );
        let lines: Vec<&str> = e.lines().collect();
        let expected = [
            "4 problems:",
            "column 21: role: string \"outside\" is not valid here",
            "column 30: unknown field \"mtu\"",
            "line 1, column 14: name is missing",
            "column 54: mode: applies to XDP only",
        ];
        assert_eq!(lines.len(), expected.len(), "{e}");
        for (line, want) in lines.iter().zip(expected) {
            assert!(line.contains(want), "{line:?} lacks {want:?}\n{e}");
        }
        // A generated file wrong everywhere lists the first thousand.
        let peers: String =
            (0..1500).map(|i| format!("{{address: 192.0.2.{}}}, ", i % 250)).collect();
        let text = format!(
            "interfaces: [{{name: a, role: external}}]\nbgp: {{router_id: 192.0.2.1, local_as: 1, \
             peers: [{peers}]}}\n"
        );
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(e.starts_with("1500 problems:"), "{}", &e[..200]);
        assert_eq!(e.lines().count(), 1 + 1000 + 1);
        assert!(e.ends_with("  500 more problems not shown"), "{}", &e[e.len() - 200..]);
    }

    #[test]
    fn node_files() {
        let n = parse(
            "interfaces:\n  - {name: eth0, role: external}\n  - {name: eth1, role: internal, mode: skb}\n  \
             - {name: veth0, role: internal, hook: tc}\n  - {name: eth2, role: external, hook: xdp}\n",
        )
        .unwrap();
        assert_eq!(n.interfaces.len(), 4);
        // Without hook: or mode:, the driver's default, asked when attaching.
        assert_eq!((n.interfaces[0].hook, n.interfaces[0].mode), (None, None));
        let ingress: Vec<_> = n.interfaces[1..].iter().map(|i| i.ingress().unwrap()).collect();
        assert_eq!(ingress, [Ingress::Xdp(Mode::Skb), Ingress::Tc, Ingress::Xdp(Mode::Native)]);
        assert_eq!(n.interfaces[1].role(), Role::Internal);
        assert_eq!(n.tables, dataplane::SizeRequest::default());
        let sized = parse(
            "interfaces:\n  - {name: eth0, role: external}\ntables:\n  flows: 1000000\n  \
             nat_translations: 65536\n",
        )
        .unwrap();
        assert_eq!(
            sized.tables,
            dataplane::SizeRequest { flows: Some(1_000_000), nat_translations: Some(65_536) }
        );
        for (bad, why) in [
            ("interfaces: []", "lists no interface"),
            (
                "interfaces:\n  - {name: eth0, role: outside}",
                "line 2, column 24: role: string \"outside\" is not valid",
            ),
            (
                "interfaces:\n  - {name: eth0, role: external, mtu: 9000}",
                "column 34: unknown field \"mtu\"",
            ),
            // At its place, saying why (seen failing: no line, no reason, listed last).
            (
                "interfaces:\n  - {name: ../x, role: external}",
                "line 2, column 12: name: \"../x\" is not an interface name: '/' and ':' are not \
                 allowed",
            ),
            // Linux refuses ':' in a name, and xdpgate prints names raw (seen failing: both
            // accepted, and the agent would wait for the first forever).
            ("interfaces:\n  - {name: \"eth0:1\", role: external}", "not an interface name"),
            ("interfaces:\n  - {name: \"e\\e[31mx\", role: external}", "not an interface name"),
            (
                "interfaces:\n  - {name: v, role: external, hook: tc, mode: skb}",
                "line 2, column 47: mode: applies to XDP only",
            ),
            ("interfaces:\n  - {name: v, role: external, hook: ebpf}", "hook: xdp or tc"),
            (
                "interfaces:\n  - {name: 12, role: external}",
                "line 2, column 12: name: expected an interface name, found integer 12: quote it \
                 (name: \"12\")",
            ),
            (
                "interfaces:\n  - {name: averyveryverylongname, role: external}",
                "line 2, column 12: name: \"averyveryverylongname\" is not an interface name: \
                 longer than 15 bytes",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\n  - {name: a, role: internal}",
                "line 3, column 5: interfaces: a is listed twice",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\ntables: {flows: 10}",
                "line 3, column 17: tables: flows: 10 is out of range (between 64 and \
                 134,217,728)",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\ntables: {flows: 5000000000}",
                "flows: 5000000000 is out of range",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\ntables: {flows: lots}",
                "tables: flows: expected a number, found string \"lots\"",
            ),
            // A key written twice (files put together): the first would be dropped unseen,
            // and its interfaces left unfiltered (seen failing: the last one won).
            (
                "interfaces:\n  - {name: a, role: external}\ninterfaces:\n  - {name: b, role: internal}",
                "line 3, column 1: interfaces is written twice (first on line 1)",
            ),
            (
                "interfaces:\n  - {name: a, role: external, role: internal}",
                "line 2, column 31: role is written twice",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\nbgp: {router_id: 203.0.113.2, \
                 local_as: 1, local_as: 2, peers: [{address: 203.0.113.1, as: 1}]}",
                "local_as is written twice",
            ),
            (
                "interfaces:\n  - {name: a, role: external}\ntables: {embryos: 4}",
                "tables: unknown field \"embryos\" (known: flows, nat_translations)",
            ),
        ] {
            let e = format!("{:#}", parse(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
