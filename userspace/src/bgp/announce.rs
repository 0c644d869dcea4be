//! What this node announces over BGP, and why not the rest (issue 16 item 1): a frontend's
//! address while the node is attached (every interface of the node file), not drained
//! (`xdpgate drain`), a policy is in force (the agent's) and at least one of the
//! frontend's services has a healthy, non-drained backend (an inbound NAT mapping's when no
//! probe says it is down). The agent keeps one host route per such address in its table
//! (`host_routes`), checked every second and after every health change (a probed backend
//! counts once its probe has answered, [`Answered`], and the load-balancing tables hold
//! it: the agent's health as its tables have it); it removes them
//! all before it stops on purpose. `bgp.json` records the outcome for `status` and `bgp`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use log::info;
use serde::{Deserialize, Serialize};
use xdpgate_common::lb::NO_BACKEND;
use xdpgate_dataplane::{PinDir, apply, host_routes, probes::ProbeKey, state};
use xdpgate_policy::lb::{AllHealthy, BackendHealth, CompiledLb, ServiceSpec, frontend_addr};

use super::node_drain;
use crate::node::{self, Node};

const FILE: &str = "bgp.json";

/// The agent's last word on its announcements.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcements {
    /// The agent that wrote it.
    pub pid: u32,
    /// The kernel table the routes are in.
    pub table: u32,
    /// Whether the node was drained (`xdpgate drain`) when it was written.
    pub node_drained: bool,
    /// Frontend addresses with a route in the table.
    pub announced: Vec<IpAddr>,
    /// Frontend addresses without one, and why.
    pub withheld: Vec<Withheld>,
    /// Of `announced`, those of a family the node file names no peer of: a BIRD configured
    /// by `xdpgate bgp bird-config` does not announce them (a daemon set up otherwise may,
    /// over a session of the other family).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_peer: Vec<IpAddr>,
    /// When the agent last changed the table or this record (seconds since the epoch).
    pub time_unix_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    pub address: IpAddr,
    pub reason: String,
}

impl Announcements {
    /// Whether the agent that wrote this still runs (a record left by one that stopped or
    /// crashed is history).
    pub fn agent_running(&self, pins: &PinDir) -> bool {
        // The agent lock's holder, not any process with the pid (reused after a crash).
        state::agent_pid(pins) == Some(self.pid)
    }
}

/// The agent's record, if an agent with a `bgp:` section ran here.
pub fn read(pins: &PinDir) -> Result<Option<Announcements>> {
    state::read_json(pins, FILE)
}

/// Whether the node is drained (`node_drain`), for what must go on when its file cannot be
/// read (broken by hand): then as the agent's record last had it (drained without one: a
/// node whose state is unknown is not announced), with the error.
pub fn drained_or_last(pins: &PinDir) -> (bool, Option<anyhow::Error>) {
    match node_drain::read(pins) {
        Ok(d) => (d.drained, None),
        Err(e) => {
            let last = read(pins).ok().flatten();
            (last.is_none_or(|l| l.node_drained), Some(e))
        }
    }
}

/// The kernel table a running agent announces from, and in which network namespace
/// (`net:[inode]`, read from its own `/proc/self/ns/net`: no other process's is read).
#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    pid: u32,
    table: u32,
    netns: String,
}

const CLAIM: &str = "bgp_table.json";

/// Serializes the claims of agents starting at once.
const CLAIMS_LOCK: &str = "bgp_tables.lock";

fn netns_here() -> Result<String> {
    let link = std::fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    Ok(link.to_string_lossy().into_owned())
}

/// At the agent's start (holding its agent lock): claims `table` for this agent, or fails
/// naming the running agent of another pin directory that announces from it in this
/// network namespace: each would withdraw the other's routes. Under a lock, so of two
/// agents starting at once one sees the other's claim.
pub fn claim_table(pins: &PinDir, table: u32) -> Result<()> {
    let path = Path::new(state::ROOT).join(CLAIMS_LOCK);
    let _lock = match state::pid_lock(pins, &path, state::LOCK_WAIT)? {
        Ok(lock) => lock,
        Err(holder) => bail!(
            "the process {holder} held {} for {} s",
            path.display(),
            state::LOCK_WAIT.as_secs()
        ),
    };
    if let Some((pid, dir)) = table_user(pins, table)? {
        bail!(
            "bgp: table {table} is the announcement table of the agent {pid} (state {}) in \
             this network namespace: each would withdraw the other's routes; give this node \
             file another `table:`",
            dir.display()
        );
    }
    let claim = Claim { pid: std::process::id(), table, netns: netns_here()? };
    state::write_json(pins, CLAIM, &claim)
}

/// At the start of an agent without a `bgp:` section: its directory claims no table.
pub fn drop_claim(pins: &PinDir) -> Result<()> {
    let path = state::dir(pins).join(CLAIM);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The running agent of another pin directory that claims kernel table `table` in this
/// network namespace (see [`claim_table`]): its pid and state directory.
pub fn table_user(pins: &PinDir, table: u32) -> Result<Option<(u32, PathBuf)>> {
    let here = netns_here()?;
    let ours = state::dir(pins);
    let entries = match std::fs::read_dir(state::ROOT) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state::ROOT)),
    };
    Ok(entries.flatten().map(|e| e.path()).filter(|dir| *dir != ours).find_map(|dir| {
        // The claim of the agent lock's holder only: one a stopped agent left is void.
        let pid = state::agent_pid_in(&dir)?;
        let claim: Claim = serde_json::from_slice(&std::fs::read(dir.join(CLAIM)).ok()?).ok()?;
        (claim.pid == pid && claim.table == table && claim.netns == here).then_some((pid, dir))
    }))
}

/// Whether `a` and `b` hold the same addresses.
pub fn same(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// Addresses for a message: `a, b` or `none`.
pub fn list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "none".into();
    }
    addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

/// The frontend addresses of `lbs`, each with whether it may be announced: at least one of
/// its services can take new flows.
pub fn frontends(lbs: &CompiledLb, health: &dyn BackendHealth) -> BTreeMap<IpAddr, bool> {
    let mut out = BTreeMap::new();
    for (key, service, fixed, _) in &lbs.frontends {
        let spec = &lbs.services[*service as usize];
        let up = if *fixed == NO_BACKEND {
            spec.pool.iter().any(|(b, _)| health.healthy_in(spec, lbs.backends[*b as usize]))
        } else {
            health.healthy(lbs.backends[*fixed as usize])
        };
        *out.entry(frontend_addr(key)).or_insert(false) |= up;
    }
    out
}

/// The frontend addresses no rule uses (`serving`: [`frontends`]), never announced: they
/// would draw traffic the gateway drops (`no_lb_rule`). Listed, so that `xdpgate bgp` says
/// why.
fn unused<'a>(
    lbs: &'a CompiledLb,
    serving: &'a BTreeMap<IpAddr, bool>,
) -> impl Iterator<Item = Withheld> + 'a {
    (lbs.addresses.iter().map(|(key, _)| frontend_addr(key)))
        .filter(|address| !serving.contains_key(address))
        .map(|address| Withheld { address, reason: "no load-balancing rule uses it".to_owned() })
}

/// `health` for announcing: a probed backend counts only once its probe has answered (since
/// the agent started), so a starting agent does not announce a frontend and withdraw it
/// again when the first probes fail.
pub struct Answered<'a> {
    pub health: &'a dyn BackendHealth,
    /// Backends under probes with at least one successful probe.
    pub answered: &'a HashSet<ProbeKey>,
}

impl BackendHealth for Answered<'_> {
    fn healthy(&self, backend: IpAddr) -> bool {
        self.health.healthy(backend)
    }

    fn healthy_in(&self, service: &ServiceSpec, backend: IpAddr) -> bool {
        self.health.healthy_in(service, backend)
            && ProbeKey::of(service, backend).is_none_or(|k| self.answered.contains(&k))
    }
}

/// What the node should announce: the frontends that may be, unless `blocked` says why
/// none may.
pub fn plan(
    frontends: &BTreeMap<IpAddr, bool>,
    blocked: Option<&str>,
) -> (Vec<IpAddr>, Vec<Withheld>) {
    let (mut announce, mut withheld) = (Vec::new(), Vec::new());
    for (&address, &up) in frontends {
        match (blocked, up) {
            (Some(why), _) => withheld.push(Withheld { address, reason: why.to_owned() }),
            (None, true) => announce.push(address),
            (None, false) => withheld
                .push(Withheld { address, reason: "no healthy, non-drained backend".to_owned() }),
        }
    }
    (announce, withheld)
}

/// Brings the table of `node`'s `bgp:` section in line with the node's state: nothing while
/// it is drained or not attached to every interface of its node file, else the frontends of
/// `lbs` that `health` (probes and `lb drain`, as the load-balancing tables hold them) lets
/// take new flows. `probed`: the same as the probes have it now, to say why a frontend whose
/// backends answer again waits.
pub fn update(
    pins: &PinDir,
    node: &Node,
    lbs: &CompiledLb,
    health: &dyn BackendHealth,
    probed: &dyn BackendHealth,
) -> Result<()> {
    let Some(bgp) = &node.bgp else { return Ok(()) };
    // A drain file that cannot be read: the node stays drained or not as it was, and the
    // rest (a frontend whose backends fail, a detach) is still withdrawn; the error is
    // returned after.
    let (drained, unread) = drained_or_last(pins);
    let missing: Vec<&str> = node::missing(pins, node).iter().map(|i| i.name.as_str()).collect();
    // A dataplane made anew (no policy applied to its maps) passes everything: no traffic
    // is drawn to it until the agent has its policy in force again.
    let no_policy = apply::active(pins).map_or(true, |(_, config)| config.generation == 0);
    let blocked = if drained && unread.is_some() {
        Some("the node's drain state cannot be read (xdpgate drain or undrain sets it)".to_owned())
    } else if drained {
        Some("the node is drained (xdpgate undrain announces it again)".to_owned())
    } else if !missing.is_empty() {
        Some(format!("not attached to {}", missing.join(", ")))
    } else {
        no_policy.then(|| "no policy in force (the agent applies it again)".to_owned())
    };
    let serving = frontends(lbs, health);
    let (announce, mut withheld) = plan(&serving, blocked.as_deref());
    if blocked.is_none() {
        let answering = frontends(lbs, probed);
        for w in withheld.iter_mut().filter(|w| answering.get(&w.address) == Some(&true)) {
            w.reason = WAITING_FOR_TABLES.to_owned();
        }
    }
    withheld.extend(unused(lbs, &serving));
    let no_peer = announce
        .iter()
        .filter(|a| !bgp.peers.iter().any(|p| p.address.is_ipv4() == a.is_ipv4()))
        .copied()
        .collect();
    // Both errors, when there are two: neither hides the other in `status`.
    let agent = std::process::id();
    match (sync(pins, agent, bgp.table, drained, (announce, no_peer), withheld), unread) {
        (Ok(_), None) => Ok(()),
        (Err(e), None) | (Ok(_), Some(e)) => Err(e),
        (Err(synced), Some(e)) => Err(anyhow::anyhow!("{e:#}; {synced:#}")),
    }
}

/// Why a frontend whose backends answer their probes again is not announced yet.
pub const WAITING_FOR_TABLES: &str = "its backends answer again; the load-balancing tables have not taken them yet (the write \
     lock is busy, or the rebuild failed)";

/// Makes the table hold exactly the routes of `announce`, and records it (`bgp.json`, written
/// only when something changed) as agent `agent`'s. How many routes it withdrew. Each route is changed on its
/// own, withdrawals first: one the kernel refuses (an IPv6 route with IPv6 off on the host)
/// holds back no other, least of all a withdrawal. The record keeps what the agent wants
/// announced (`drain --wait` compares the table with it), less an add refused, which is
/// withheld with the kernel's reason, as is a route whose withdrawal was, and a route
/// another's in the table hides from the daemon ([`host_routes::Listing::hiding`]); the
/// error is returned once the rest is done.
fn sync(
    pins: &PinDir,
    agent: u32,
    table: u32,
    node_drained: bool,
    (mut announce, mut no_peer): (Vec<IpAddr>, Vec<IpAddr>),
    mut withheld: Vec<Withheld>,
) -> Result<usize> {
    let listing = host_routes::read(table)?;
    let now = listing.ours();
    let mut failed = Vec::new();
    let mut withdrawn = 0;
    for addr in now.iter().filter(|a| !announce.contains(a)) {
        let why = withheld.iter_mut().find(|w| w.address == *addr);
        if let Err(e) = host_routes::remove(table, *addr) {
            let reason = format!("its route could not be withdrawn: {e:#}");
            match why {
                Some(w) => w.reason = reason,
                None => withheld.push(Withheld { address: *addr, reason }),
            }
            failed.push(format!("{e:#}"));
            continue;
        }
        withdrawn += 1;
        info!(
            "bgp: withdrawing {addr} (table {table}): {}",
            why.map_or("no longer a frontend of the policy", |w| w.reason.as_str())
        );
    }
    let mut refused = Vec::new();
    for &addr in &announce {
        if let Err((reason, error)) = put(table, &listing, addr) {
            refused.push((addr, reason, error));
        }
    }
    if !refused.is_empty() {
        // A refused add whose route is there now, and seen, is announced (another agent's
        // add, as one takes over from the other, came first).
        if let Ok(held) = host_routes::read(table) {
            let ours = held.ours();
            refused.retain(|(a, ..)| !ours.contains(a) || held.hiding(*a).is_some());
        }
    }
    for (address, reason, error) in refused {
        announce.retain(|a| *a != address);
        withheld.push(Withheld { address, reason });
        failed.push(error);
    }
    let record = Announcements {
        pid: agent,
        table,
        node_drained,
        no_peer: {
            no_peer.retain(|a| announce.contains(a));
            no_peer
        },
        announced: announce,
        withheld,
        time_unix_seconds: 0,
    };
    let last = read(pins)?;
    if last.as_ref().map(|l| Announcements { time_unix_seconds: 0, ..l.clone() })
        != Some(record.clone())
    {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        state::write_json(pins, FILE, &Announcements { time_unix_seconds: time, ..record })?;
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(withdrawn)
}

/// At the agent's start: the routes an earlier agent left in a table this one does not
/// keep (its node file has no `bgp:` section now, or names another table) are removed, so
/// nothing stays announced that no agent looks after.
pub fn forget_other_table(pins: &PinDir, table: Option<u32>) -> Result<()> {
    let Some(last) = read(pins)? else { return Ok(()) };
    if Some(last.table) == table {
        return Ok(());
    }
    // Another agent's table now: its routes are not ours to remove.
    match table_user(pins, last.table)? {
        Some((pid, dir)) => info!(
            "bgp: left the routes in table {}: the agent {pid} ({}) claims it now",
            last.table,
            dir.display()
        ),
        None => {
            withdraw_all(pins, last.pid, last.table, "this agent does not keep the table")?;
        }
    }
    let path = state::dir(pins).join(FILE);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
}

/// The record of the agent that ran here last, when it runs no more and no other agent
/// claims its table (then it says so): routes no agent looks after.
fn unattended(pins: &PinDir) -> Result<Option<Announcements>> {
    let Some(last) = read(pins)?.filter(|last| !last.agent_running(pins)) else { return Ok(None) };
    // Another agent's table now: its routes are not ours to remove.
    if let Some((pid, dir)) = table_user(pins, last.table)? {
        eprintln!(
            "left the routes in table {}: the agent {pid} ({}) claims it now",
            last.table,
            dir.display()
        );
        return Ok(None);
    }
    Ok(Some(last))
}

/// With no agent running to do it, removes the routes an earlier one left announced (a
/// drain or a detach must not leave a route to a node that no longer takes the traffic);
/// how many it removed.
pub fn withdraw_without_agent(pins: &PinDir, why: &str) -> Result<usize> {
    let Some(last) = unattended(pins)? else { return Ok(0) };
    withdraw_all(pins, last.pid, last.table, why)
}

/// After an apply with no agent running: the routes an earlier agent left for frontends
/// the policy no longer has are removed (nothing takes their traffic now, and no agent
/// would withdraw them); the others stay, as after a crash. How many it removed. The
/// caller holds the write lock, so an agent starting now waits for it to finish.
pub fn withdraw_removed_without_agent(pins: &PinDir, lbs: &CompiledLb) -> Result<usize> {
    // Any agent: one that has not written its record yet looks after the table itself.
    if state::agent_pid(pins).is_some() {
        return Ok(0);
    }
    let Some(last) = unattended(pins)? else { return Ok(0) };
    let kept = frontends(lbs, &AllHealthy);
    let (announce, removed): (Vec<IpAddr>, Vec<IpAddr>) =
        host_routes::list(last.table)?.into_iter().partition(|a| kept.contains_key(a));
    if removed.is_empty() {
        return Ok(0);
    }
    // What the record held back before, of frontends the policy still has, stays said.
    let withheld = (last.withheld.into_iter().filter(|w| kept.contains_key(&w.address)))
        .chain(
            (removed.into_iter())
                .map(|address| Withheld { address, reason: "removed from the policy".to_owned() }),
        )
        .collect();
    let (drained, _) = drained_or_last(pins);
    sync(pins, last.pid, last.table, drained, (announce, last.no_peer), withheld)
}

/// Puts the agent's route of `addr` in `table` (`listing`: the table as it was) where the
/// daemon learns it, unless another's hides it; else why not, and the error.
fn put(table: u32, listing: &host_routes::Listing, addr: IpAddr) -> Result<(), (String, String)> {
    let mut there = listing.ours().contains(&addr);
    if let Some(other) = listing.hiding(addr) {
        // Taken out, to be added again at the agent's metric (below the other's), or else
        // once the other goes: the daemon hears of that add at once, where it would learn
        // a route left in place only at its next scan of the table.
        let why = hidden(table, other);
        host_routes::remove(table, addr)
            .map_err(|e| (format!("{why}; {e:#}"), format!("{addr}: {why}; {e:#}")))?;
        info!("bgp: took out the route of {addr} (table {table}): {why}");
        there = false;
    }
    if there {
        return Ok(());
    }
    if let Some(other) = listing.blocking(addr) {
        let why = hidden(table, other);
        return Err((why.clone(), format!("{addr}: {why}")));
    }
    host_routes::add(table, addr)
        .map_err(|e| (format!("its route could not be added: {e:#}"), format!("{e:#}")))?;
    info!("bgp: announcing {addr} (table {table})");
    Ok(())
}

/// Why the agent's route of an address is not in `table`, or is and the daemon does not
/// learn it: `other`, of another protocol, hides it, and is not the agent's to remove.
pub fn hidden(table: u32, other: host_routes::Route) -> String {
    format!(
        "another's route for it in table {table} hides the agent's from the BGP daemon \
         ({other}: the daemon learns one route per address, the lowest metric's); the agent \
         neither replaces nor removes it"
    )
}

/// Removes every route of the table (before the agent stops on purpose, or for it once it
/// has); how many. `agent`: the agent whose table it is, which the record goes on naming.
pub fn withdraw_all(pins: &PinDir, agent: u32, table: u32, why: &str) -> Result<usize> {
    let frontends: Vec<Withheld> = host_routes::list(table)?
        .into_iter()
        .map(|address| Withheld { address, reason: why.to_owned() })
        .collect();
    // Only for the record: a drain file that cannot be read must not keep the routes.
    let (drained, _) = drained_or_last(pins);
    sync(pins, agent, table, drained, Default::default(), frontends)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "
virtual_network: {address_space: [198.51.100.0/24]}
load_balancers:
  - name: edge
    frontends:
      - {name: vip, address: 192.0.2.10}
      - {name: ssh, address: 192.0.2.11}
      - {name: spare, address: 192.0.2.12}
    backend_pools:
      - {name: web, backends: [198.51.100.11, 198.51.100.12]}
    probes:
      - {name: up, protocol: tcp, port: 80}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 80,
         backend_pool: web, probe: up}
    inbound_nat_rules:
      - {name: admin, frontend: ssh, protocol: tcp, frontend_port: 2201,
         backend: 198.51.100.11, backend_port: 22}
";

    #[test]
    fn a_frontend_is_announced_while_one_backend_can_take_it() {
        let policy = xdpgate_policy::load_str(POLICY, "test").unwrap();
        let lbs = xdpgate_policy::lb::compile(&policy).unwrap();
        let (vip, ssh): (IpAddr, IpAddr) =
            ("192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap());
        let b1: IpAddr = "198.51.100.11".parse().unwrap();
        let all = |_: IpAddr| true;
        assert_eq!(frontends(&lbs, &all), BTreeMap::from([(vip, true), (ssh, true)]));
        // One backend down: the other carries the rule; the NAT mapping's own is down.
        let one = |b: IpAddr| b != b1;
        assert_eq!(frontends(&lbs, &one), BTreeMap::from([(vip, true), (ssh, false)]));
        let none = |_: IpAddr| false;
        let up = frontends(&lbs, &none);
        assert_eq!(up, BTreeMap::from([(vip, false), (ssh, false)]));
        let (announce, withheld) = plan(&up, None);
        assert!(announce.is_empty());
        assert_eq!(withheld[0].reason, "no healthy, non-drained backend");
        let (announce, withheld) = plan(&frontends(&lbs, &all), Some("drained"));
        assert!(announce.is_empty());
        assert_eq!(withheld.len(), 2);
        assert_eq!(plan(&frontends(&lbs, &one), None).0, [vip]);
        // A frontend no rule uses is listed as such (seen failing: not listed at all).
        let spare: Vec<_> = unused(&lbs, &up).map(|w| (w.address, w.reason)).collect();
        let why = "no load-balancing rule uses it".to_owned();
        assert_eq!(spare, [("192.0.2.12".parse::<IpAddr>().unwrap(), why)]);
        // Before its probe has answered, a probed backend does not count; the NAT mapping's
        // (unprobed) does.
        let answered = HashSet::new();
        let starting = Answered { health: &all, answered: &answered };
        assert_eq!(frontends(&lbs, &starting), BTreeMap::from([(vip, false), (ssh, true)]));
        let answered =
            HashSet::from([ProbeKey { backend: b1, lb: "edge".into(), probe: "up".into() }]);
        let probed = Answered { health: &all, answered: &answered };
        assert_eq!(frontends(&lbs, &probed), BTreeMap::from([(vip, true), (ssh, true)]));
    }
}
