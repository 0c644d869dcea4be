//! The backend's decapsulation program (`ebpf/src/decap.rs`): attaching it to an interface,
//! the gateways it trusts and the frontend addresses it decapsulates for, its counters, and
//! detaching it. Its maps and
//! links live under `<pin dir>/decap/`, apart from the gateway's (whose `links/` lists the
//! gateway's interfaces), so one host may run both.

use std::{fs, net::IpAddr};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray},
    programs::links::PinnedLink,
};
use ipnet::IpNet;
use xdpgate_common::{
    decap::{
        DECAP_COUNTERS, DECAP_DIR, DECAP_FRONTENDS, DECAP_SOURCES, DECAP_STATS, DecapCounter,
        DecapKey, MAX_DECAP_FRONTENDS, MAX_DECAP_SOURCES,
    },
    nat::{ADDR_KEY_HEADER_BITS, AddrKey},
};

use crate::{Hook, Ingress, Mode, PinDir};

/// The decap program (built by `build.rs` from `ebpf/src/decap.rs`).
static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpgate-decap"));

/// Name of the decap program (XDP) in its object.
pub const DECAP_PROGRAM: &str = "xdpgate_decap";
/// Its tc ingress twin.
pub const DECAP_TC_PROGRAM: &str = "xdpgate_decap_tc";
const PROGRAMS: (&str, &str) = (DECAP_PROGRAM, DECAP_TC_PROGRAM);

/// Where the decap program's maps and links are pinned, under the pin directory `pins`.
pub fn dir(pins: &PinDir) -> PinDir {
    PinDir::new(pins.path().join(DECAP_DIR))
}

/// The map key of a frontend address.
pub fn key(addr: IpAddr) -> DecapKey {
    match addr {
        IpAddr::V4(a) => DecapKey { family: 4, addr: [u32::from_ne_bytes(a.octets()), 0, 0, 0] },
        IpAddr::V6(a) => DecapKey { family: 6, addr: xdpgate_common::words(&a.octets()) },
    }
}

fn addr(key: &DecapKey) -> IpAddr {
    let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if key.family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).expect("four bytes"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).expect("sixteen bytes"))
    }
}

/// What `attach` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Attached {
    /// False when the program was attached there already (and was replaced in place).
    pub attached: bool,
    /// The frontends newly added (the others were served already).
    pub added: Vec<IpAddr>,
    /// The gateways' sources newly trusted.
    pub trusted: Vec<IpNet>,
}

/// Attaches the decap program to `ifname` (of the current network namespace) at `ingress`
/// (XDP in a mode, or tc ingress with tcx, first in the chain), pins its link, and adds
/// `frontends` to those it decapsulates for and `gateways` (the gateways' outer source
/// addresses or prefixes) to those it decapsulates from. On an interface it is attached to already, at
/// that hook and mode, its link is pointed at this build's program
/// (`bpf_link_update`: no moment without one, frontends, gateways and counters kept) and
/// the frontends and gateways are added. A refusal (no such interface, not Ethernet, another XDP program
/// there) changes nothing.
pub fn attach(
    pins: &PinDir,
    ifname: &str,
    frontends: &[IpAddr],
    gateways: &[IpNet],
    ingress: Ingress,
) -> Result<Attached> {
    if frontends.is_empty() {
        bail!("no frontend address given: the program would decapsulate nothing (--frontend)");
    }
    if gateways.is_empty() {
        bail!(
            "no gateway given: name the outer source addresses of the gateways' IP-in-IP \
             (--gateway ADDR|PREFIX; --gateway 0.0.0.0/0 --gateway ::/0 trusts any host)"
        );
    }
    refuse_unusable(frontends, gateways)?;
    let ifindex = crate::ifindex(ifname)?;
    crate::ethernet(ifname)?;
    let dir = dir(pins);
    dir.ensure()?;
    let _lock = crate::state::WriteLock::acquire(&dir)?;
    if dir.link(ifname).exists() {
        let link = crate::link_info(&dir, ifname)?;
        if link.ifindex == 0 {
            // Its device was deleted (and the kernel detached the program): a new one may
            // carry the name now.
            fs::remove_file(dir.link(ifname)).context("removing a deleted device's link")?;
        } else if link.ifindex != ifindex {
            bail!(
                "the decap program under {} is attached to another interface named {ifname} \
                 (ifindex {}, in another network namespace?); give this one its own --pin-dir",
                dir.path().display(),
                link.ifindex
            );
        } else {
            let running = match link.hook {
                Hook::Xdp => xdp_mode(ifname).map(Ingress::Xdp),
                Hook::Tc => Some(Ingress::Tc),
            };
            if let Some(running) = running.filter(|&r| r != ingress) {
                bail!(
                    "the decap program runs on {ifname} {} already; detach it (xdpgate decap \
                     detach {ifname}) to attach it {}",
                    ingress_name(running),
                    ingress_name(ingress)
                );
            }
            let trusted = replace(pins, ifname, link.hook, gateways)?;
            let added =
                add_frontends(pins, frontends).map_err(|e| take_back(pins, &trusted, &[], e))?;
            return Ok(Attached { attached: false, added, trusted });
        }
    }
    let created = !dir.map(DECAP_FRONTENDS).exists();
    let attached = attach_new(pins, ifname, ifindex, (frontends, gateways), ingress);
    if attached.is_err() && created {
        // Nothing was attached: the maps this attach made go too.
        let _ = remove_pins(pins);
    }
    attached
}

/// Loads the decap object with its maps pinned in (or reused from) the decap directory of
/// `pins`, and its programs (XDP and tc) into the kernel (verified), ready to attach or
/// test-run.
pub fn load(pins: &PinDir) -> Result<Ebpf> {
    let dir = dir(pins);
    dir.ensure()?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir.path())
        .load(DECAP_OBJ)
        .context("loading the decap eBPF object")?;
    crate::program(&mut ebpf, DECAP_PROGRAM)?;
    crate::classifier(&mut ebpf, DECAP_TC_PROGRAM)?;
    Ok(ebpf)
}

fn attach_new(
    pins: &PinDir,
    ifname: &str,
    ifindex: u32,
    (frontends, gateways): (&[IpAddr], &[IpNet]),
    ingress: Ingress,
) -> Result<Attached> {
    let mut ebpf = load(pins)?;
    let trusted = add_gateways(pins, gateways)?;
    let mut added = Vec::new();
    let mut attach = || -> Result<()> {
        // At tc, first in the chain: a gateway's tc pipeline on the same interface sees the
        // inner packet.
        let link = crate::attach_ingress(&mut ebpf, PROGRAMS, ifname, ifindex, ingress)
            .context("attaching the decap program")?;
        // Until the link is pinned, a failure detaches it (its last handle closes).
        added = add_frontends(pins, frontends)?;
        let pin = dir(pins).link(ifname);
        link.pin(&pin).with_context(|| format!("pinning the decap link at {}", pin.display()))?;
        Ok(())
    };
    if let Err(e) = attach() {
        return Err(take_back(pins, &trusted, &added, e));
    }
    Ok(Attached { attached: true, added, trusted })
}

/// Points the pinned link of `ifname` (at `hook`) at a newly loaded program of this build,
/// adding `gateways` first (returns those new): a program from before the gateways were
/// checked gets them with no moment of dropping theirs.
fn replace(pins: &PinDir, ifname: &str, hook: Hook, gateways: &[IpNet]) -> Result<Vec<IpNet>> {
    let mut ebpf = load(pins)?;
    let trusted = add_gateways(pins, gateways)?;
    let replaced = PinnedLink::from_pin(dir(pins).link(ifname))
        .with_context(|| format!("opening the pinned decap link of {ifname}"))
        .and_then(|pinned| {
            crate::replace_ingress(&mut ebpf, PROGRAMS, pinned, hook, ifname)
                .context("replacing the decap program")
        });
    replaced.map_err(|e| take_back(pins, &trusted, &[], e))?;
    Ok(trusted)
}

/// Takes back the gateways and frontends an attach added before a later step of it failed,
/// so that a refusal changes nothing: a gateway left in would be decapsulated from on the
/// interfaces attached already. Returns `error`, saying what could not be taken back.
fn take_back(
    pins: &PinDir,
    gateways: &[IpNet],
    frontends: &[IpAddr],
    error: anyhow::Error,
) -> anyhow::Error {
    let dir = dir(pins);
    let mut sources: Option<LpmTrie<_, AddrKey, u32>> =
        dir.open_map(DECAP_SOURCES).ok().and_then(|m| m.try_into().ok());
    let mut served: Option<HashMap<_, DecapKey, u32>> =
        dir.open_map(DECAP_FRONTENDS).ok().and_then(|m| m.try_into().ok());
    let left: Vec<String> = gateways
        .iter()
        .filter(|g| sources.as_mut().is_none_or(|m| m.remove(&crate::nat::prefix_key(g)).is_err()))
        .map(|g| format!("gateway {g}"))
        .chain(
            frontends
                .iter()
                .filter(|f| served.as_mut().is_none_or(|m| m.remove(&key(**f)).is_err()))
                .map(|f| format!("frontend {f}")),
        )
        .collect();
    if left.is_empty() {
        error
    } else {
        error.context(format!(
            "and {} could not be taken back: they stay in force (xdpgate decap remove)",
            left.join(", ")
        ))
    }
}

/// Adds `frontends` to those the program decapsulates for; returns those not there before.
/// All or none: a failure takes back those added.
pub fn add_frontends(pins: &PinDir, frontends: &[IpAddr]) -> Result<Vec<IpAddr>> {
    let mut map: HashMap<_, DecapKey, u32> = dir(pins).open_map(DECAP_FRONTENDS)?.try_into()?;
    let mut added = Vec::new();
    for &f in frontends {
        if map.get(&key(f), 0).is_ok() {
            continue;
        }
        if let Err(e) = map.insert(key(f), 1, 0) {
            let e = anyhow::Error::new(e)
                .context(format!("adding frontend {f} (at most {MAX_DECAP_FRONTENDS} frontends)"));
            return Err(take_back(pins, &[], &added, e));
        }
        added.push(f);
    }
    Ok(added)
}

/// Refuses a frontend no client sends to (unspecified, loopback, multicast, broadcast) and
/// a frontend or gateway written IPv4-mapped (`::ffff:192.0.2.10`), which the packets do
/// not carry (they carry the IPv4 address): the program would decapsulate nothing for it,
/// or from it. Until 2026-12-04 they were accepted.
fn refuse_unusable(frontends: &[IpAddr], gateways: &[IpNet]) -> Result<()> {
    for f in frontends {
        if let IpAddr::V6(a) = f
            && let Some(v4) = a.to_ipv4_mapped()
        {
            bail!("frontend {f} is IPv4-mapped: packets to it carry {v4}; write --frontend {v4}");
        }
        if let Some(what) = xdpgate_policy::unreachable(*f) {
            bail!("frontend {f} is {what}, which no client sends to");
        }
    }
    for g in gateways {
        if let IpNet::V6(n) = g
            && n.prefix_len() >= 96
            && let Some(v4) = n.network().to_ipv4_mapped()
        {
            let write =
                if n.prefix_len() == 128 { v4.to_string() } else { "its IPv4 prefix".into() };
            bail!("gateway {g} is IPv4-mapped: an outer IPv4 header carries {v4}; write {write}");
        }
    }
    Ok(())
}

/// Adds `gateways` (outer source prefixes) to those the program decapsulates from; returns
/// those not there before.
pub fn add_gateways(pins: &PinDir, gateways: &[IpNet]) -> Result<Vec<IpNet>> {
    let mut map: LpmTrie<_, AddrKey, u32> = dir(pins).open_map(DECAP_SOURCES)?.try_into()?;
    let mut added = Vec::new();
    for g in gateways {
        let key = crate::nat::prefix_key(&g.trunc());
        // An exact match (not the longest prefix): a narrower gateway within a trusted
        // prefix is added in its own right.
        if map
            .keys()
            .filter_map(Result::ok)
            .any(|k| k.prefix_len() == key.prefix_len() && k.data() == key.data())
        {
            continue;
        }
        if let Err(e) = map.insert(&key, 1, 0) {
            let e = anyhow::Error::new(e)
                .context(format!("adding gateway {g} (at most {MAX_DECAP_SOURCES} gateways)"));
            return Err(take_back(pins, &added, &[], e));
        }
        added.push(g.trunc());
    }
    Ok(added)
}

/// The gateways' prefixes the program decapsulates from.
fn trusted(map: &LpmTrie<MapData, AddrKey, u32>) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = map
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| {
            let (len, data) = (k.prefix_len() - ADDR_KEY_HEADER_BITS, k.data());
            let addr = addr(&DecapKey { family: u32::from(data.family), addr: data.addr });
            IpNet::new(addr, len as u8).ok()
        })
        .collect();
    nets.sort();
    nets
}

/// What [`remove`] removed.
#[derive(Debug)]
pub struct Removed {
    pub gateways: Vec<IpNet>,
    pub frontends: Vec<IpAddr>,
    /// Frontends left out as not decapsulated for (`missing_ok`).
    pub missing: Vec<IpAddr>,
}

/// Stops decapsulating from `gateways` (as `attach` added them, address or prefix: not the
/// gateways they contain) and for `frontends`. Everything is checked before anything is
/// removed: a gateway it does not decapsulate from, removing the last (`attach` requires
/// one; [`detach`] stops it all), or a frontend it does not decapsulate for (a misspelt
/// address would leave the intended one served; left out instead when `missing_ok`) is
/// refused, and nothing changes.
pub fn remove(
    pins: &PinDir,
    gateways: &[IpNet],
    frontends: &[IpAddr],
    missing_ok: bool,
) -> Result<Removed> {
    let dir = dir(pins);
    if !dir.check()? || !dir.map(DECAP_SOURCES).exists() {
        bail!(
            "the decap program is attached to no interface (under {}): nothing to remove",
            dir.path().display()
        );
    }
    let _lock = crate::state::WriteLock::acquire(&dir)?;
    let mut sources: LpmTrie<_, AddrKey, u32> = dir.open_map(DECAP_SOURCES)?.try_into()?;
    let mut served: HashMap<_, DecapKey, u32> = dir.open_map(DECAP_FRONTENDS)?.try_into()?;
    let names = |all: &[String]| if all.is_empty() { "none".into() } else { all.join(", ") };

    let trusted = trusted(&sources);
    let gateways = sorted(gateways.iter().map(IpNet::trunc));
    if let Some(g) = gateways.iter().find(|g| !trusted.contains(g)) {
        bail!(
            "{g} is not a gateway the decap program decapsulates from (its gateways: {}); \
             nothing was removed",
            names(&strings(&trusted))
        );
    }
    if !gateways.is_empty() && trusted.iter().all(|g| gateways.contains(g)) {
        bail!(
            "removing {} would leave no gateway: the program would decapsulate from no one \
             and drop every IP-in-IP packet for its frontends. Add the new gateway first \
             (xdpgate decap attach IFACE --frontend ADDR --gateway ADDR|PREFIX), or detach \
             the program (xdpgate decap detach --all); nothing was removed",
            strings(&gateways).join(", ")
        );
    }
    let (frontends, missing): (Vec<IpAddr>, Vec<IpAddr>) = sorted(frontends.iter().copied())
        .into_iter()
        .partition(|f| served.get(&key(*f), 0).is_ok());
    if let Some(f) = missing.first().filter(|_| !missing_ok) {
        let all = sorted(served.keys().filter_map(Result::ok).map(|k| addr(&k)));
        bail!(
            "{f} is not a frontend the decap program decapsulates for (its frontends: {}); \
             nothing was removed",
            names(&strings(&all))
        );
    }

    // All or nothing: a failure puts back what was removed (as `attach` writes it).
    let steps: Vec<Entry> = gateways
        .iter()
        .map(|g| Entry::Gateway(*g))
        .chain(frontends.iter().map(|f| Entry::Frontend(*f)))
        .collect();
    for (i, entry) in steps.iter().enumerate() {
        let Err(e) = entry.remove(&mut sources, &mut served) else { continue };
        let lost: Vec<String> = steps[..i]
            .iter()
            .filter(|r| !r.put_back(&mut sources, &mut served))
            .map(ToString::to_string)
            .collect();
        let left = if lost.is_empty() {
            "nothing was removed".to_string()
        } else {
            format!("could not put back {}: they are removed", lost.join(", "))
        };
        return Err(anyhow::Error::new(e).context(format!("removing {entry}; {left}")));
    }
    Ok(Removed { gateways, frontends, missing })
}

/// A gateway or a frontend of the decap program's maps.
enum Entry {
    Gateway(IpNet),
    Frontend(IpAddr),
}

impl Entry {
    fn remove(
        &self,
        sources: &mut LpmTrie<MapData, AddrKey, u32>,
        served: &mut HashMap<MapData, DecapKey, u32>,
    ) -> Result<(), aya::maps::MapError> {
        match self {
            Entry::Gateway(g) => sources.remove(&crate::nat::prefix_key(g)),
            Entry::Frontend(f) => served.remove(&key(*f)),
        }
    }

    /// Writes it back as `attach` does; whether that worked.
    fn put_back(
        &self,
        sources: &mut LpmTrie<MapData, AddrKey, u32>,
        served: &mut HashMap<MapData, DecapKey, u32>,
    ) -> bool {
        match self {
            Entry::Gateway(g) => sources.insert(&crate::nat::prefix_key(g), 1, 0).is_ok(),
            Entry::Frontend(f) => served.insert(key(*f), 1, 0).is_ok(),
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Entry::Gateway(g) => write!(f, "gateway {g}"),
            Entry::Frontend(a) => write!(f, "frontend {a}"),
        }
    }
}

fn sorted<T: Ord>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = items.collect();
    v.sort();
    v.dedup();
    v
}

fn strings(items: &[impl ToString]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// Detaches the decap program from `ifname`. The last detach removes its maps (frontends,
/// counters) and directories too, so that nothing of it is left pinned.
pub fn detach(pins: &PinDir, ifname: &str) -> Result<()> {
    let dir = dir(pins);
    let pin = dir.link(ifname);
    if !dir.check()? || !pin.exists() {
        bail!("the decap program is not attached to {ifname} ({} missing)", pin.display());
    }
    let _lock = crate::state::WriteLock::acquire(&dir)?;
    let link = PinnedLink::from_pin(&pin)
        .with_context(|| format!("opening the pinned link {}", pin.display()))?;
    // Unpinned, the link goes with this handle: the kernel detaches the program.
    drop(link.unpin()?);
    if dir.attached()?.is_empty() {
        remove_pins(pins)?;
    }
    Ok(())
}

/// The interfaces the decap program is attached to (by their pinned links).
pub fn attached(pins: &PinDir) -> Result<Vec<String>> {
    dir(pins).attached()
}

/// Removes the decap directory with its maps (no link may be left in it), and the pin
/// directory itself when that leaves it empty.
fn remove_pins(pins: &PinDir) -> Result<()> {
    let dir = dir(pins);
    for name in [DECAP_FRONTENDS, DECAP_SOURCES, DECAP_STATS] {
        match fs::remove_file(dir.map(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", dir.map(name).display()));
            }
        }
    }
    for sub in ["links", "egress", ""] {
        let path = dir.path().join(sub);
        fs::remove_dir(&path).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e).with_context(|| format!("removing {}", path.display())),
        })?;
    }
    // Only if empty: a gateway's pins stay.
    let _ = fs::remove_dir(pins.path());
    Ok(())
}

/// The decap program's state: where it runs, for which frontends, and what it did.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub interfaces: Vec<Interface>,
    pub frontends: Vec<IpAddr>,
    /// The outer sources (the gateways') IP-in-IP is decapsulated from.
    pub gateways: Vec<IpNet>,
    /// Packets stripped of their outer header and passed to the stack.
    pub decapsulated: u64,
    /// IP-in-IP packets left as they came: not for a frontend served here, or malformed.
    pub passed: u64,
    /// Packets that were not IP-in-IP (passed untouched).
    pub not_tunnel: u64,
    /// IP-in-IP packets from an outer source that is no gateway's: dropped when for a
    /// frontend served here, else passed untouched.
    pub untrusted: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct Interface {
    pub interface: String,
    pub hook: Hook,
    /// XDP's mode, native or skb; none at tc, and when the device is not in this network
    /// namespace.
    pub mode: Option<&'static str>,
    pub program_id: u32,
    /// False when its device was deleted (the kernel detached the program).
    pub live: bool,
}

/// Reads the decap program's state (empty when it is attached nowhere).
pub fn status(pins: &PinDir) -> Result<Status> {
    let dir = dir(pins);
    let mut status = Status {
        pin_dir: dir.path().display().to_string(),
        interfaces: Vec::new(),
        frontends: Vec::new(),
        gateways: Vec::new(),
        decapsulated: 0,
        passed: 0,
        not_tunnel: 0,
        untrusted: 0,
    };
    if !dir.check()? || !dir.map(DECAP_FRONTENDS).exists() {
        return Ok(status);
    }
    for name in dir.attached()? {
        let link = crate::link_info(&dir, &name)?;
        let here = crate::ifindex(&name).ok() == Some(link.ifindex);
        let xdp = here && link.hook == Hook::Xdp;
        status.interfaces.push(Interface {
            hook: link.hook,
            mode: xdp.then(|| xdp_mode(&name).map(mode_name)).flatten(),
            interface: name,
            program_id: link.prog_id,
            live: link.ifindex != 0,
        });
    }
    let map: HashMap<_, DecapKey, u32> = dir.open_map(DECAP_FRONTENDS)?.try_into()?;
    status.frontends = map.keys().filter_map(Result::ok).map(|k| addr(&k)).collect();
    status.frontends.sort();
    // Pinned by a build from before the gateways were checked: none (the program then
    // decapsulates from any source) until the next attach.
    if dir.map(DECAP_SOURCES).exists() {
        status.gateways = trusted(&dir.open_map(DECAP_SOURCES)?.try_into()?);
    }
    let stats: PerCpuArray<MapData, u64> = dir.open_map(DECAP_STATS)?.try_into()?;
    let read = |c: DecapCounter| -> Result<u64> {
        debug_assert!((c as u32) < DECAP_COUNTERS);
        Ok(stats.get(&(c as u32), 0)?.iter().sum())
    };
    status.decapsulated = read(DecapCounter::Decapsulated)?;
    status.passed = read(DecapCounter::Passed)?;
    status.not_tunnel = read(DecapCounter::NotTunnel)?;
    // A DECAP_STATS pinned by a build from before has no slot for it.
    status.untrusted = read(DecapCounter::Untrusted).unwrap_or(0);
    Ok(status)
}

/// The XDP mode the program on `ifname` runs in, as `ip -d link` reports it.
fn xdp_mode(ifname: &str) -> Option<Mode> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", ifname])
        .output()
        .ok()?;
    let devs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    // XDP_ATTACHED_DRV and XDP_ATTACHED_SKB of if_link.h.
    match devs[0]["xdp"]["mode"].as_u64()? {
        1 => Some(Mode::Native),
        2 => Some(Mode::Skb),
        _ => None,
    }
}

/// Where a program runs, as a person reads it: `in native mode`, `at tc ingress`.
pub fn ingress_name(ingress: Ingress) -> String {
    match ingress {
        Ingress::Xdp(mode) => format!("in {} mode", mode_name(mode)),
        Ingress::Tc => "at tc ingress".into(),
    }
}

/// A mode as `--mode` spells it.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Native => "native",
        Mode::Skb => "skb",
    }
}
