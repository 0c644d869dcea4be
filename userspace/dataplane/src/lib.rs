//! The dataplane: the only code that opens its maps. Loading, attaching, upgrading and
//! detaching the programs, finding their pinned state again, and changing it as one writer.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/xdpgate`): one pin per map, named as
//! in `xdpgate_common::maps`, and `links/<ifname>` for each attachment, so the program stays
//! attached after the agent exits and a later `xdpgate detach` finds it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, HashMap, Map, MapData, MapInfo, ProgramArray, RingBuf},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use xdpgate_common::{
    iface::{IfaceConfig, Role},
    maps::{
        EGRESS, EVENTS, IFACES, MAX_IFACES, PIPELINE, PIPELINE_ACT, PIPELINE_POLICY, PIPELINE_SNAT,
        SCRATCH,
    },
};

pub mod apply;
pub mod flows;
pub mod lb;
pub mod nat;
pub mod netns;
pub mod state;
pub mod stats;
pub mod transaction;

/// The compiled eBPF object (built by `build.rs` from `ebpf/`).
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpgate"));

/// Name of the dataplane's XDP program in the object.
pub const PROGRAM: &str = "xdpgate";
/// The policy stage, entered from `PROGRAM` by tail call.
pub const POLICY_PROGRAM: &str = "xdpgate_policy";
/// The act stage (rewrite and forward), entered from the policy stage by tail call.
pub const ACT_PROGRAM: &str = "xdpgate_act";
/// The SNAT stage (port claims), entered from the policy stage by tail call.
pub const SNAT_PROGRAM: &str = "xdpgate_snat";
/// Name of the transmit-everything program (the live-frames traffic generator).
pub const TX_PROGRAM: &str = "xdp_tx";
/// Name of the pass-everything baseline program.
pub const NOOP_PROGRAM: &str = "xdp_noop";

/// Where the maps and links of one xdpgate instance are pinned.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn links(&self) -> PathBuf {
        self.0.join("links")
    }

    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links().join(ifname)
    }

    /// Names of the interfaces with a pinned attachment.
    pub fn attached(&self) -> Result<Vec<String>> {
        let Ok(dir) = fs::read_dir(self.links()) else { return Ok(Vec::new()) };
        let mut names = dir
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// Makes sure bpffs is mounted under the pin directory and the directory exists.
    pub fn ensure(&self) -> Result<()> {
        ensure_bpffs(&self.0)?;
        fs::create_dir_all(self.links())
            .with_context(|| format!("creating pin directory {}", self.0.display()))?;
        // Maps and links are the dataplane's state: only root (or the agent's user) may
        // open them.
        use std::os::unix::fs::PermissionsExt as _;
        for dir in [self.0.clone(), self.links()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        Ok(())
    }

    /// Opens a pinned map by name.
    pub fn open_map(&self, name: &str) -> Result<Map> {
        let path = self.map(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!("no pinned map at {} (is xdpgate attached?)", path.display())
        })?;
        Ok(Map::from_map_data(data)?)
    }
}

/// Mounts bpffs at /sys/fs/bpf when `dir` lies under it and nothing is mounted there.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPFFS: &str = "/sys/fs/bpf";
    if !dir.starts_with(BPFFS) {
        return Ok(());
    }
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(BPFFS)) {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).context("creating /sys/fs/bpf")?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mounting bpffs at {BPFFS} failed");
    }
    Ok(())
}

/// Loads the eBPF object with its maps pinned in (or reused from) `pins`.
pub fn load(pins: &PinDir) -> Result<Ebpf> {
    pins.ensure()?;
    check_pinned_layouts(pins)?;
    EbpfLoader::new()
        .default_map_pin_directory(pins.path())
        .load(EBPF_OBJ)
        .context("loading the xdpgate eBPF object")
}

/// Refuses maps pinned by a build whose layout differs from this one's. The loader would
/// reuse them as they are, and the programs would then fail to load with a verifier error,
/// or worse, read their state wrongly.
fn check_pinned_layouts(pins: &PinDir) -> Result<()> {
    let obj = aya_obj::Object::parse(EBPF_OBJ).context("parsing the eBPF object")?;
    let mut wrong = Vec::new();
    for (name, map) in &obj.maps {
        let path = pins.path().join(name);
        if map.pinning() != aya_obj::maps::PinningType::ByName || !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let mut wanted = (map.key_size(), map.value_size(), map.max_entries());
        if wanted.2 == 0 {
            // Sized by the loader (one slot per CPU, say): any size will do.
            wanted.2 = pinned.2;
        }
        if pinned != wanted {
            wrong.push(format!(
                "{name}: key {} B, value {} B, {} entries pinned; this build needs {} B, {} B, {}",
                pinned.0, pinned.1, pinned.2, wanted.0, wanted.1, wanted.2
            ));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the maps pinned under {} were made by an incompatible build of xdpgate:\n  {}\n\
             Their state (flows, translations) cannot be carried over: detach every interface \
             and remove that directory, then attach this build afresh.",
            pins.path().display(),
            wrong.join("\n  ")
        );
    }
    Ok(())
}

/// Loads the dataplane's programs, links the later stages into `PIPELINE` and returns the
/// entry program, ready to attach or test-run.
pub fn dataplane(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    for (index, name) in [
        (PIPELINE_POLICY, POLICY_PROGRAM),
        (PIPELINE_ACT, ACT_PROGRAM),
        (PIPELINE_SNAT, SNAT_PROGRAM),
    ] {
        let fd = program(ebpf, name)?.fd()?.try_clone()?;
        let mut pipeline: ProgramArray<_> =
            ebpf.map_mut(PIPELINE).ok_or_else(|| anyhow!("map {PIPELINE} missing"))?.try_into()?;
        pipeline.set(index, &fd, 0).with_context(|| format!("linking {name} into {PIPELINE}"))?;
    }
    program(ebpf, PROGRAM)
}

/// Loads and verifies one XDP program of `ebpf`.
pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading program {name} into the kernel"))?;
    Ok(prog)
}

/// How to attach: native (driver) mode unless the user asks for generic skb mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[default]
    Native,
    Skb,
}

/// Attaches the dataplane to `ifname` with `role`, pins the link and registers the interface.
pub fn attach(pins: &PinDir, ifname: &str, role: Role, mode: Mode) -> Result<()> {
    let ifindex = ifindex(ifname)?;
    let link_pin = pins.link(ifname);
    if link_pin.exists() {
        bail!("xdpgate is already attached to {ifname} (pinned at {})", link_pin.display());
    }
    let mut ebpf = load(pins)?;
    register(&mut ebpf, ifindex, role)?;
    let prog = dataplane(&mut ebpf)?;
    let xdp_mode = match mode {
        Mode::Native => XdpMode::Driver,
        Mode::Skb => XdpMode::Skb,
    };
    let id = prog.attach_to_if_index(ifindex, xdp_mode).map_err(|e| {
        let hint = if mode == Mode::Native {
            "; the driver may not support native XDP: try --mode skb"
        } else {
            ""
        };
        anyhow!("attaching to {ifname} in {mode:?} mode: {e}{hint}")
    })?;
    let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| {
        anyhow!("{ifname}: the kernel attached without a bpf_link ({e}), cannot pin")
    })?;
    link.pin(&link_pin).with_context(|| format!("pinning link at {}", link_pin.display()))?;
    Ok(())
}

/// Replaces the programs on every attached interface with this build's, in place: each
/// pinned link is pointed at the new program (`bpf_link_update`), so there is no moment
/// without a program, and the pinned maps (flows, NAT translations, policy, counters) carry
/// over untouched. Returns the interfaces upgraded.
pub fn upgrade(pins: &PinDir) -> Result<Vec<String>> {
    let names = pins.attached()?;
    if names.is_empty() {
        bail!("xdpgate is not attached to any interface under {}", pins.path().display());
    }
    let mut ebpf = load(pins)?;
    let prog = dataplane(&mut ebpf)?;
    for name in &names {
        let pinned = PinnedLink::from_pin(pins.link(name))
            .with_context(|| format!("opening the pinned link of {name}"))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| anyhow!("{name}: pinned link is not an XDP link: {e}"))?;
        let id = prog
            .attach_to_link(link)
            .with_context(|| format!("replacing the program on {name}"))?;
        // The link stays pinned; this process's handle on it may go.
        let _ = prog.take_link(id)?;
    }
    Ok(names)
}

/// Detaches the dataplane from `ifname` and forgets the interface.
pub fn detach(pins: &PinDir, ifname: &str) -> Result<()> {
    let link_pin = pins.link(ifname);
    let link = PinnedLink::from_pin(&link_pin).with_context(|| {
        format!("xdpgate is not attached to {ifname} ({} missing)", link_pin.display())
    })?;
    // Unpinning drops the last reference once this handle closes: the kernel detaches.
    drop(link.unpin()?);
    if let Ok(ifindex) = ifindex(ifname) {
        let mut ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
        let _ = ifaces.remove(&ifindex);
        let mut egress: DevMapHash<_> = pins.open_map(EGRESS)?.try_into()?;
        let _ = egress.remove(ifindex);
    }
    Ok(())
}

/// The interfaces registered in `IFACES`, by ifindex, with their slot and role.
pub fn registered(pins: &PinDir) -> Result<Vec<(u32, IfaceConfig)>> {
    let ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
    Ok(ifaces.iter().filter_map(|e| e.ok()).collect())
}

/// The ids of the loaded programs of this dataplane: those that use its pinned scratch map
/// (programs come and go with attach and upgrade).
pub fn program_ids(pins: &PinDir) -> Result<Vec<u32>> {
    let scratch = MapData::from_pin(pins.map(SCRATCH))?.info()?.id();
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.map_ids().ok().flatten().is_some_and(|ids| ids.contains(&scratch)))
        .map(|info| info.id())
        .collect())
}

/// The dataplane's ring buffer of flow events (`begin` and `deny`).
pub fn event_ring(pins: &PinDir) -> Result<RingBuf<MapData>> {
    Ok(pins.open_map(EVENTS)?.try_into()?)
}

/// Gives `ifindex` a counter slot and a role in the `IFACES` map.
fn register(ebpf: &mut Ebpf, ifindex: u32, role: Role) -> Result<()> {
    let mut ifaces: HashMap<_, u32, IfaceConfig> =
        ebpf.map_mut(IFACES).ok_or_else(|| anyhow!("map {IFACES} missing"))?.try_into()?;
    let used: Vec<u32> = ifaces.iter().filter_map(|e| e.ok()).map(|(_, c)| c.slot).collect();
    let slot = match ifaces.get(&ifindex, 0) {
        Ok(existing) => existing.slot,
        Err(_) => (1..MAX_IFACES)
            .find(|s| !used.contains(s))
            .ok_or_else(|| anyhow!("all {} interface slots are in use", MAX_IFACES - 1))?,
    };
    ifaces.insert(ifindex, IfaceConfig { slot, role: role as u32 }, 0)?;
    // XDP may forward out of every interface it is attached to.
    let mut egress: DevMapHash<_> =
        ebpf.map_mut(EGRESS).ok_or_else(|| anyhow!("map {EGRESS} missing"))?.try_into()?;
    egress
        .insert(ifindex, ifindex, None, 0)
        .context("adding the interface to the egress devmap")?;
    Ok(())
}

/// The ifindex of `ifname` in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname)?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface named {ifname:?} in this network namespace"),
        i => Ok(i),
    }
}
