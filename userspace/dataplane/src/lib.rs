//! The dataplane: the only code that opens its maps. Loading, attaching, upgrading and
//! detaching the programs, finding their pinned state again, and changing it as one writer.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/xdpgate`): one pin per map, named as
//! in `xdpgate_common::maps`, and for each attached interface `links/<ifname>` (the ingress
//! pipeline's link: XDP, or tcx ingress with `--hook tc`) and `egress/<ifname>` (the tc
//! egress program, tcx), so the programs stay attached after the agent exits and a later
//! `xdpgate detach` finds them. Both hooks pin their ingress link at the same path, so an
//! interface has one ingress hook, never both, and whatever lists the attached interfaces
//! (the agent, `status`, `stats`, `upgrade`) sees either.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, Map, MapData, MapInfo, ProgramArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use xdpgate_common::{
    iface::{IfaceConfig, Role},
    maps::{
        EGRESS, EGRESS_NEW, EGRESS_PARSE, EGRESS_PIPELINE, EGRESS_POLICY, EVENTS, IFACE_INDEX,
        IFACE_INDEX_ENTRIES, IFACES, MAX_IFACES, PIPELINE, PIPELINE_ACT, PIPELINE_NEW,
        PIPELINE_POLICY, PIPELINE_SNAT, SCRATCH, TC_PARSE, TC_PIPELINE,
    },
};

pub mod apply;
mod carried;
pub mod counts;
pub mod decap;
pub mod delete;
pub mod drain;
pub mod encap;
pub mod fib;
pub mod flows;
pub mod host_routes;
pub mod lb;
pub mod lease;
pub mod migrate;
pub mod monitor;
pub mod nat;
pub mod neighbours;
pub mod netns;
pub mod probes;
pub mod routes;
mod rtnetlink;
pub mod sets;
pub mod state;
pub mod stats;
pub mod table;
pub mod tables;
pub mod transaction;
pub mod verify;

pub use tables::{SizeRequest, TableSizes};

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
pub const NEW_FLOW_PROGRAM: &str = "xdpgate_new_flow";
/// The tc egress program (the host's own packets), attached with tcx beside `PROGRAM`.
pub const EGRESS_PROGRAM: &str = "xdpgate_egress";
/// Its policy stage and new-flow stage, entered by tail call.
pub const EGRESS_POLICY_PROGRAM: &str = "xdpgate_egress_policy";
pub const EGRESS_NEW_PROGRAM: &str = "xdpgate_egress_new";
/// The ingress pipeline at tc (`--hook tc`): entry program, attached with tcx ingress, and
/// its later stages, entered by tail call through `TC_PIPELINE` (indices as in `PIPELINE`).
pub const TC_PROGRAM: &str = "xdpgate_tc";
pub const TC_POLICY_PROGRAM: &str = "xdpgate_tc_policy";
pub const TC_NEW_FLOW_PROGRAM: &str = "xdpgate_tc_new_flow";
pub const TC_SNAT_PROGRAM: &str = "xdpgate_tc_snat";
pub const TC_ACT_PROGRAM: &str = "xdpgate_tc_act";
/// Name of the transmit-everything program (the live-frames traffic generator).
pub const TX_PROGRAM: &str = "xdp_tx";
/// Name of the pass-everything baseline program.
pub const NOOP_PROGRAM: &str = "xdp_noop";

/// Where the maps and links of one xdpgate instance are pinned.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

/// The message of every refusal for want of privileges, so scripts and people see one
/// phrase whatever operation failed.
pub const NEEDS_PRIVILEGES: &str = "permission denied: needs root or CAP_BPF";

/// Why a pin directory is not used. Whoever can unlink a pinned link detaches the filter,
/// so the directory and `links/` must be root's alone.
#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error("{NEEDS_PRIVILEGES}: {what} {}", path.display())]
    PermissionDenied { what: &'static str, path: PathBuf, source: nix::Error },
    #[error(
        "refusing pin directory {}: it is a symbolic link (to {}), which would let its owner \
         redirect the dataplane's pins; name the directory itself (--pin-dir), or remove the \
         link if it is not yours (rm {})",
        path.display(), target.display(), path.display()
    )]
    Symlink { path: PathBuf, target: PathBuf },
    #[error("refusing pin directory {}: not a directory", path.display())]
    NotDirectory { path: PathBuf },
    #[error(
        "refusing pin directory {}: it is owned by uid {uid}, not root, and its owner could \
         unlink pinned links and detach the filter; check its contents, then `chown -R root: \
         {}` (or remove it and attach again)",
        path.display(), path.display()
    )]
    NotRootOwned { path: PathBuf, uid: u32 },
    #[error(
        "refusing pin directory {}: mode {mode:04o} lets group or others write to it, so \
         they could unlink pinned links and detach the filter; `chmod 0700 {}`",
        path.display(), path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "refusing pin directory {}: its parent {} is {}, so someone other than root could \
         replace it; use a pin directory under a root-owned parent",
        path.display(), parent.display(), why
    )]
    UnsafeParent { path: PathBuf, parent: PathBuf, why: String },
    #[error("{what} {}", path.display())]
    Other { what: &'static str, path: PathBuf, source: nix::Error },
}

/// Whether `e` says the kernel refused a bpf() call or the pins for want of privileges
/// (file permissions on the pins, or a missing capability). Only errors from bpf() calls
/// and the pin directory count: a policy file nobody may read is not a missing CAP_BPF.
pub fn is_permission_error(e: &anyhow::Error) -> bool {
    use nix::errno::Errno;
    let mut from_bpf = false;
    for cause in e.chain() {
        if let Some(PinDirError::PermissionDenied { .. }) = cause.downcast_ref() {
            return true;
        }
        from_bpf |= cause.is::<aya::sys::SyscallError>()
            || cause.is::<aya::programs::ProgramError>()
            || cause.is::<aya::maps::MapError>()
            || cause.is::<aya::programs::links::LinkError>()
            || cause.is::<aya::pin::PinError>()
            || cause.is::<aya::EbpfError>();
        let errno = cause.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error());
        if from_bpf && matches!(errno.map(Errno::from_raw), Some(Errno::EACCES | Errno::EPERM)) {
            return true;
        }
    }
    false
}

impl PinDir {
    /// The pin directory at `path`, held as one absolute path however it was spelled
    /// (`/sys/fs/bpf//xdpgate`, `./xdpgate` from `/sys/fs/bpf`, `..`, a symbolic link to
    /// `/sys/fs/bpf` on the way): its state directory is named after it ([`state::dir`]),
    /// and two spellings must not make two, or a writer would miss the agent's lock and the
    /// run-time state beside the same maps. Its directories on the way are resolved as far
    /// as they exist; the last component is left as it is (a link there is refused, see
    /// [`PinDir::check`]).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let path = std::path::absolute(&path).unwrap_or(path);
        let mut normal = PathBuf::new();
        for part in path.components() {
            match part {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    normal.pop();
                }
                part => normal.push(part),
            }
        }
        let Some(name) = normal.file_name().map(ToOwned::to_owned) else { return Self(normal) };
        // The longest existing ancestor, resolved; the rest as written.
        let mut ancestor = normal.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut rest = vec![name];
        while !ancestor.as_os_str().is_empty() {
            if let Ok(real) = fs::canonicalize(&ancestor) {
                return Self(rest.iter().rev().fold(real, |p, c| p.join(c)));
            }
            match ancestor.file_name() {
                Some(c) => rest.push(c.to_owned()),
                None => break,
            }
            ancestor.pop();
        }
        Self(normal)
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

    fn egress_links(&self) -> PathBuf {
        self.0.join("egress")
    }

    /// The pinned tcx link of the egress program on `ifname`.
    pub fn egress_link(&self, ifname: &str) -> PathBuf {
        self.egress_links().join(ifname)
    }

    /// Names of the interfaces with a pinned attachment.
    pub fn attached(&self) -> Result<Vec<String>> {
        if !self.check()? {
            return Ok(Vec::new());
        }
        let dir = match fs::read_dir(self.links()) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("listing {}", self.links().display()));
            }
        };
        let mut names = dir
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// Checks the pin directory, its `links/` and `egress/` before anything is read from or
    /// written to them: each must be a real directory (not a symbolic link), owned by root,
    /// writable by no group or other user, under parents only root can change, and readable
    /// by this process. Returns whether the pin directory exists.
    pub fn check(&self) -> Result<bool, PinDirError> {
        self.check_parents()?;
        if !check_dir(&self.0)? {
            return Ok(false);
        }
        check_dir(&self.links())?;
        check_dir(&self.egress_links())?;
        Ok(true)
    }

    /// Every existing ancestor must be root's, and if others may write to it, sticky (as
    /// bpffs's own 1777 root is), so nobody else can rename the pin directory away and put
    /// their own in its place.
    fn check_parents(&self) -> Result<(), PinDirError> {
        use nix::sys::stat::{Mode, stat};
        for parent in self.0.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            let st = match stat(parent) {
                Ok(st) => st,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(denied_or_other("inspecting", parent, e)),
            };
            let mode = Mode::from_bits_truncate(st.st_mode);
            let why = if st.st_uid != 0 {
                format!("owned by uid {}", st.st_uid)
            } else if mode.intersects(Mode::S_IWGRP | Mode::S_IWOTH)
                && !mode.contains(Mode::S_ISVTX)
            {
                format!("writable by group or others (mode {:04o})", st.st_mode & 0o7777)
            } else {
                continue;
            };
            return Err(PinDirError::UnsafeParent {
                path: self.0.clone(),
                parent: parent.to_path_buf(),
                why,
            });
        }
        Ok(())
    }

    /// Makes sure bpffs is mounted under the pin directory and the directory exists. A
    /// directory that is already there is checked, never adopted: chmod would not take it
    /// from an owner who made it first.
    pub fn ensure(&self) -> Result<()> {
        ensure_bpffs(&self.0)?;
        self.check_parents()?;
        if let Some(parent) = self.0.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        use std::os::unix::fs::PermissionsExt as _;

        use nix::sys::stat::Mode;
        // The pin directory is checked before links/ and egress/ are made in it.
        for dir in [self.0.clone(), self.links(), self.egress_links()] {
            // Maps and links are the dataplane's state: only root may open them.
            match nix::unistd::mkdir(&dir, Mode::S_IRWXU) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(denied_or_other("creating", &dir, e).into()),
            }
            check_dir(&dir)?;
            // Root's own (just checked): tighten what older builds made 0755.
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        Ok(())
    }

    /// The maps and programs pinned in the directory itself (not in `links/`, `egress/` or
    /// the decap program's directory).
    pub fn pinned_files(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in
            fs::read_dir(&self.0).with_context(|| format!("reading {}", self.0.display()))?
        {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                files.push(entry.path());
            }
        }
        Ok(files)
    }

    /// Opens a pinned map by name.
    pub fn open_map(&self, name: &str) -> Result<Map> {
        self.check()?;
        let path = self.map(name);
        let data = MapData::from_pin(&path).with_context(|| {
            if migrate::pending(self) {
                format!(
                    "no pinned map at {}: the dataplane under {} is an earlier build's, whose \
                     flow tables have another layout; run `xdpgate upgrade` to carry them over",
                    path.display(),
                    self.path().display()
                )
            } else {
                format!("no pinned map at {} (is xdpgate attached?)", path.display())
            }
        })?;
        Ok(Map::from_map_data(data)?)
    }
}

/// Checks one directory of the pins (see [`PinDir::check`]); false if it does not exist.
fn check_dir(path: &Path) -> Result<bool, PinDirError> {
    use nix::{
        errno::Errno,
        fcntl::{OFlag, open},
        sys::stat::{Mode, SFlag, lstat},
    };
    // lstat, not stat: a symlink is refused, not followed.
    let st = match lstat(path) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(denied_or_other("inspecting", path, e)),
    };
    let path_buf = || path.to_path_buf();
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFLNK => {
            // Where it leads, resolved (a relative link's target names no directory alone).
            let parent = path.parent().unwrap_or(Path::new("/"));
            let target = fs::read_link(path).map(|t| parent.join(t)).unwrap_or_else(|_| "?".into());
            let target = fs::canonicalize(&target).unwrap_or(target);
            return Err(PinDirError::Symlink { path: path_buf(), target });
        }
        SFlag::S_IFDIR => {}
        _ => return Err(PinDirError::NotDirectory { path: path_buf() }),
    }
    if st.st_uid != 0 {
        return Err(PinDirError::NotRootOwned { path: path_buf(), uid: st.st_uid });
    }
    if Mode::from_bits_truncate(st.st_mode).intersects(Mode::S_IWGRP | Mode::S_IWOTH) {
        return Err(PinDirError::Writable { path: path_buf(), mode: st.st_mode & 0o7777 });
    }
    // Can this process use it? Asked here so that a user without privileges is told so,
    // rather than seeing an empty directory or a missing map.
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    open(path, flags, Mode::empty()).map_err(|e| denied_or_other("opening", path, e))?;
    Ok(true)
}

fn denied_or_other(what: &'static str, path: &Path, e: nix::Error) -> PinDirError {
    match e {
        nix::errno::Errno::EACCES | nix::errno::Errno::EPERM => {
            PinDirError::PermissionDenied { what, path: path.to_path_buf(), source: e }
        }
        _ => PinDirError::Other { what, path: path.to_path_buf(), source: e },
    }
}

/// Mounts bpffs at /sys/fs/bpf when `dir` lies under it and nothing is mounted there. Mode
/// 0700, as systemd mounts it: the kernel's default (1777) lets any user create the pin
/// directory before root does.
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
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting bpffs at {BPFFS}"))?;
    Ok(())
}

/// Loads the eBPF object with its maps pinned in (or reused from) `pins`, the sized tables
/// at their pinned sizes, or at the default sizes when nothing is pinned yet.
pub fn load(pins: &PinDir) -> Result<Ebpf> {
    load_sized(pins, &SizeRequest::default())
}

/// Loads the eBPF object as [`load`] does, creating the tables not pinned yet at the sizes
/// of `sizes` (the defaults where it asks for none). A size that differs from a pinned
/// table's is refused before anything changes.
pub fn load_sized(pins: &PinDir, sizes: &SizeRequest) -> Result<Ebpf> {
    sizes.check()?;
    pins.ensure()?;
    check_pinned_layouts(pins)?;
    let (chosen, entries) = tables::plan(pins, sizes)?;
    // Counters made afresh: so is the count of the embryos the agent ended beside them.
    if !pins.map(xdpgate_common::maps::FLOW_STATS).exists() {
        counts::forget_ended_embryos(pins);
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.path());
    for (name, n) in entries {
        loader.map_max_entries(name, n);
    }
    loader.load(EBPF_OBJ).with_context(|| {
        format!(
            "loading the xdpgate eBPF object (tables for {} flows and {} NAT translations)",
            tables::thousands(chosen.flows.into()),
            tables::thousands(chosen.nat_translations.into())
        )
    })
}

/// The name of a map type as `bpftool` spells it (`hash`, `lru_hash`).
fn map_type_name(t: u32) -> String {
    use aya_obj::generated::bpf_map_type;
    let name = bpf_map_type::try_from(t).map(|t| format!("{t:?}")).unwrap_or_default();
    match name.strip_prefix("BPF_MAP_TYPE_") {
        Some(n) => n.to_ascii_lowercase(),
        None => format!("type {t}"),
    }
}

/// Refuses maps pinned by a build whose layout differs from this one's: another map type
/// (the flow table was an LRU hash before it became a plain hash), key or value size, or
/// number of entries (except for the tables the operator sizes). The loader would reuse
/// them as they are, and the programs would then fail to load with a verifier error, or
/// worse, read their state wrongly or evict what they must keep.
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
        let pinned_type = info_type(&info);
        if pinned_type != map.map_type() {
            wrong.push(format!(
                "{name}: {} pinned; this build needs {}",
                map_type_name(pinned_type),
                map_type_name(map.map_type())
            ));
        }
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let mut wanted = (map.key_size(), map.value_size(), map.max_entries());
        if wanted.2 == 0 || tables::SIZED_MAPS.contains(&name.as_str()) {
            // Sized by the loader (one slot per CPU, say) or by the operator at first
            // attach: any size will do.
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

/// The kernel's `bpf_map_type` of a map (`MapInfo::map_type` gives aya's enum, which has no
/// name for types aya does not know).
fn info_type(info: &MapInfo) -> u32 {
    info.map_type().map_or(u32::MAX, |t| t as u32)
}

/// Loads the dataplane's programs, links the later stages into `PIPELINE` and returns the
/// entry program, ready to attach or test-run.
pub fn dataplane(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    for (index, name) in [
        (PIPELINE_POLICY, POLICY_PROGRAM),
        (PIPELINE_ACT, ACT_PROGRAM),
        (PIPELINE_SNAT, SNAT_PROGRAM),
        (PIPELINE_NEW, NEW_FLOW_PROGRAM),
    ] {
        let fd = program(ebpf, name)?.fd()?.try_clone()?;
        let mut pipeline: ProgramArray<_> =
            ebpf.map_mut(PIPELINE).ok_or_else(|| anyhow!("map {PIPELINE} missing"))?.try_into()?;
        pipeline.set(index, &fd, 0).with_context(|| format!("linking {name} into {PIPELINE}"))?;
    }
    program(ebpf, PROGRAM)
}

/// Loads the tc ingress programs (`--hook tc`), links the later stages (and the entry
/// stage, which enters itself again after pulling headers out of paged data) into
/// `TC_PIPELINE`, and returns the entry program, ready to attach.
pub fn tc_dataplane(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let stages = [
        (PIPELINE_POLICY, TC_POLICY_PROGRAM),
        (PIPELINE_ACT, TC_ACT_PROGRAM),
        (PIPELINE_SNAT, TC_SNAT_PROGRAM),
        (PIPELINE_NEW, TC_NEW_FLOW_PROGRAM),
        (TC_PARSE, TC_PROGRAM),
    ];
    classifier_pipeline(ebpf, TC_PIPELINE, &stages, TC_PROGRAM)
}

/// Loads the egress programs, links the later stages (and the entry stage, which enters
/// itself again after pulling headers) into `EGRESS_PIPELINE`, and returns the entry program.
pub fn egress_dataplane(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let stages = [
        (EGRESS_PARSE, EGRESS_PROGRAM),
        (EGRESS_POLICY, EGRESS_POLICY_PROGRAM),
        (EGRESS_NEW, EGRESS_NEW_PROGRAM),
    ];
    classifier_pipeline(ebpf, EGRESS_PIPELINE, &stages, EGRESS_PROGRAM)
}

/// Loads the tc programs `stages` names, links each into `map` at its index, and returns
/// the `entry` program.
fn classifier_pipeline<'a>(
    ebpf: &'a mut Ebpf,
    map: &str,
    stages: &[(u32, &str)],
    entry: &str,
) -> Result<&'a mut SchedClassifier> {
    for &(_, name) in stages {
        classifier(ebpf, name)?;
    }
    for &(index, name) in stages {
        let prog: &SchedClassifier = ebpf.program(name).expect("loaded above").try_into()?;
        let fd = prog.fd()?.try_clone()?;
        let mut pipeline: ProgramArray<_> =
            ebpf.map_mut(map).ok_or_else(|| anyhow!("map {map} missing"))?.try_into()?;
        pipeline.set(index, &fd, 0).with_context(|| format!("linking {name} into {map}"))?;
    }
    Ok(ebpf.program_mut(entry).ok_or_else(|| anyhow!("program {entry} missing"))?.try_into()?)
}

/// Attaches the egress program to `ifname` (of this network namespace) with tcx, ahead of
/// other tcx programs there, and pins its link.
fn attach_egress(prog: &mut SchedClassifier, pins: &PinDir, ifname: &str) -> Result<()> {
    pin_egress(attach_egress_unpinned(prog, ifname)?, pins, ifname)
}

/// Attaches the egress program as [`attach_egress`] does; its link goes when the returned
/// handle does, at once (a pin's reference would go only after an RCU grace period and a
/// work item, leaving a refused attach's program running for a moment).
fn attach_egress_unpinned(prog: &mut SchedClassifier, ifname: &str) -> Result<FdLink> {
    let id = prog
        .attach_with_options(
            ifname,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .with_context(|| format!("attaching the egress program to {ifname} (tcx)"))?;
    prog.take_link(id)?.try_into().map_err(|e| {
        anyhow!("{ifname}: the kernel attached the egress program without a bpf_link ({e})")
    })
}

fn pin_egress(link: FdLink, pins: &PinDir, ifname: &str) -> Result<()> {
    let pin = pins.egress_link(ifname);
    link.pin(&pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}

/// Loads and verifies one tc program of `ebpf`.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading program {name} into the kernel"))?;
    Ok(prog)
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

/// How to attach XDP: native (driver) mode unless the user asks for generic skb mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// In the driver, before an skb is made (needs the driver's XDP support).
    #[default]
    Native,
    /// Generic XDP, after the skb is made: any driver, slower.
    Skb,
}

/// Where an interface's ingress pipeline runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// XDP: once per frame, before the kernel allocates an skb (physical NICs).
    Xdp,
    /// tc ingress (tcx): once per skb, after GRO (veth and drivers without native XDP).
    Tc,
}

/// Drivers whose interfaces get the tc hook when none is asked: veth, where XDP runs on a
/// copy of every frame, per frame rather than per GRO aggregate, and loses a redirected
/// frame's partial checksum (so NAT and load balancing cannot carry TCP from senders with
/// TSO); and virtual drivers without native XDP, where XDP would be the generic kind.
const TC_DRIVERS: &[&str] =
    &["veth", "bridge", "macvlan", "ipvlan", "802.1Q VLAN Support", "vxlan", "geneve", "dummy"];

impl Hook {
    /// The hook for `ifname` (of the current network namespace) when none is asked: tc for
    /// the drivers in `TC_DRIVERS`, XDP for the rest (physical NICs).
    pub fn default_for(ifname: &str) -> Result<Hook> {
        let driver = driver(ifname)?;
        Ok(if TC_DRIVERS.contains(&driver.as_str()) { Hook::Tc } else { Hook::Xdp })
    }
}

/// The name of `ifname`'s driver, as `ethtool -i` gives it (ETHTOOL_GDRVINFO).
fn driver(ifname: &str) -> Result<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: the command, the driver's name, then fields not read here.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160] };
    let mut req = ifreq(ifname);
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    let sock = inet_socket("SIOCETHTOOL")?;
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the ethtool_drvinfo `info` points to,
    // which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } != 0 {
        let error = std::io::Error::last_os_error();
        // Said plainly where it can be: the ioctl answers "no such device" for an interface
        // that is not there, "operation not supported" for the loopback device.
        ifindex(ifname)?;
        ethernet(ifname)?;
        bail!("reading the driver of {ifname}: {error}");
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// An `ifreq` naming `ifname`.
fn ifreq(ifname: &str) -> libc::ifreq {
    // SAFETY: a zeroed ifreq is valid; the name is copied with room for its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    req
}

/// A socket to ask interface ioctls (`what`) on.
fn inet_socket(what: &str) -> Result<std::os::fd::OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .with_context(|| format!("socket for {what}"))
}

/// How an interface's ingress pipeline is attached: XDP in a mode, or tc ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    Xdp(Mode),
    Tc,
}

impl Ingress {
    pub fn hook(self) -> Hook {
        match self {
            Ingress::Xdp(_) => Hook::Xdp,
            Ingress::Tc => Hook::Tc,
        }
    }
}

impl From<Mode> for Ingress {
    fn from(mode: Mode) -> Self {
        Ingress::Xdp(mode)
    }
}

/// Refuses, before anything is made, what [`attach_sized`] would refuse at its start: an
/// interface that is not there or not Ethernet, and table sizes out of range, other than
/// the pinned ones, or more than the machine's memory. A refused first attach then leaves
/// no pin directory behind (the sizes are checked again under the write lock).
pub fn check_attach(pins: &PinDir, ifname: &str, sizes: &SizeRequest) -> Result<()> {
    ifindex(ifname)?;
    ethernet(ifname)?;
    tables::plan(pins, sizes).map(drop)
}

/// Attaches the dataplane to `ifname` with `role`, pins the link and registers the interface.
/// The tables keep their pinned sizes, or get the default sizes on a first attach.
pub fn attach(pins: &PinDir, ifname: &str, role: Role, ingress: impl Into<Ingress>) -> Result<()> {
    attach_sized(pins, ifname, role, ingress, &SizeRequest::default())
}

/// Attaches as [`attach`] does; a first attach creates the tables at the sizes of `sizes`,
/// a later one refuses sizes that differ from the pinned tables'.
pub fn attach_sized(
    pins: &PinDir,
    ifname: &str,
    role: Role,
    ingress: impl Into<Ingress>,
    sizes: &SizeRequest,
) -> Result<()> {
    let ingress = ingress.into();
    let ifindex = ifindex(ifname)?;
    ethernet(ifname)?;
    let link_pin = pins.link(ifname);
    if link_gone(pins, ifname) {
        // The device this name was attached to was deleted (a veth recreated with its
        // container, say): its links are detached for good, and left pinned they would
        // refuse this attach and leave the new device unfiltered.
        detach(pins, ifname).with_context(|| format!("removing the stale links of {ifname}"))?;
    }
    if link_pin.exists() {
        // One ingress hook per interface: switching is refused rather than done in two
        // steps, where for a moment both pipelines (or neither) would judge its packets.
        let hook = match link_info(pins, ifname) {
            Ok(l) => format!(" with --hook {}", l.hook.name()),
            Err(_) => String::new(),
        };
        bail!(
            "xdpgate is already attached to {ifname}{hook} (pinned at {}); to change its hook, \
             detach it and attach it again",
            link_pin.display()
        );
    }
    // One dataplane tells interfaces apart by ifindex, which is per network namespace: a
    // device of another namespace (or this one under an earlier name) with this ifindex
    // would take over the attached one's registration (its role, counters, forwarding).
    let taken = live_links(pins)?.into_iter().find(|(name, i)| name != ifname && *i == ifindex);
    if let Some((other, _)) = taken {
        bail!(
            "{ifname} has ifindex {ifindex}, as {other} has, which is attached under {} (in \
             another network namespace, or renamed since): one dataplane tells interfaces \
             apart by ifindex, so they cannot share one. Attach {ifname} under a pin \
             directory of its own (--pin-dir), or detach {other} first; nothing was attached",
            pins.path().display()
        );
    }
    // Links whose devices were deleted run nothing: with only those, `upgrade` has nothing
    // to replace, and this attach carries the tables over itself.
    if migrate::pending(pins) && pins.attached()?.iter().any(|n| !link_gone(pins, n)) {
        bail!(
            "the interfaces attached under {} run an earlier build, whose flow tables have \
             another layout: run `xdpgate upgrade` first, which carries their flows over; \
             nothing was attached",
            pins.path().display()
        );
    }
    let mut ebpf = load_sized(pins, sizes)?;
    if migrate::pending(pins) {
        // No program uses the earlier tables any more: carried over in one pass.
        migrate::copy(pins)?;
        migrate::finish(pins)?;
    }
    index_ifaces(pins)?;
    // Both programs are loaded (verified) before anything is attached or registered.
    egress_dataplane(&mut ebpf)?;
    match ingress {
        Ingress::Xdp(_) => drop(dataplane(&mut ebpf)?),
        Ingress::Tc => drop(tc_dataplane(&mut ebpf)?),
    }
    let egress_pin = pins.egress_link(ifname);
    if egress_pin.exists() {
        // Left by a detach that failed half way: the XDP link is gone, so this one goes too.
        fs::remove_file(&egress_pin)
            .with_context(|| format!("removing the stale {}", egress_pin.display()))?;
    }
    register(&mut ebpf, pins, ifindex, role, ingress.hook())?;
    let attached = attach_both(&mut ebpf, pins, ifname, ifindex, ingress);
    if attached.is_err() {
        // Bad input changes nothing: no half attachment, no registration left behind.
        let _ = fs::remove_file(&egress_pin);
        unregister(pins, ifindex);
    }
    attached
}

/// Attaches the egress program, then the ingress program (XDP or tc), and only then pins
/// their links (the ingress link last): a failure before detaches both at once, as their
/// links close with this process. (A removed pin lets its link go only after an RCU grace
/// period.)
fn attach_both(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    ifname: &str,
    ifindex: u32,
    ingress: Ingress,
) -> Result<()> {
    let link_pin = pins.link(ifname);
    let egress: &mut SchedClassifier =
        ebpf.program_mut(EGRESS_PROGRAM).expect("loaded by egress_dataplane").try_into()?;
    let egress_link = attach_egress_unpinned(egress, ifname)?;
    let link = attach_ingress(ebpf, (PROGRAM, TC_PROGRAM), ifname, ifindex, ingress)?;
    pin_egress(egress_link, pins, ifname)?;
    link.pin(&link_pin).with_context(|| format!("pinning link at {}", link_pin.display()))?;
    Ok(())
}

/// Attaches the loaded program `xdp` of `ebpf` (XDP in its mode) or `tc` (tcx ingress, first
/// in the chain), as `ingress` says, to `ifname`; the link goes when the returned handle
/// does, unless it is pinned.
pub(crate) fn attach_ingress(
    ebpf: &mut Ebpf,
    (xdp, tc): (&str, &str),
    ifname: &str,
    ifindex: u32,
    ingress: Ingress,
) -> Result<FdLink> {
    Ok(match ingress {
        Ingress::Xdp(mode) => {
            let prog: &mut Xdp = ebpf
                .program_mut(xdp)
                .ok_or_else(|| anyhow!("program {xdp} missing"))?
                .try_into()?;
            let xdp_mode = match mode {
                Mode::Native => XdpMode::Driver,
                Mode::Skb => XdpMode::Skb,
            };
            let id = prog.attach_to_if_index(ifindex, xdp_mode).map_err(|e| {
                let hint = if mode == Mode::Native {
                    "; the driver may not support native XDP: try --mode skb, or --hook tc"
                } else {
                    ""
                };
                anyhow!("attaching to {ifname} in {mode:?} mode: {e}{hint}")
            })?;
            prog.take_link(id)?.try_into().map_err(|e| {
                anyhow!("{ifname}: the kernel attached without a bpf_link ({e}), cannot pin")
            })?
        }
        Ingress::Tc => {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(tc).ok_or_else(|| anyhow!("program {tc} missing"))?.try_into()?;
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| format!("attaching to {ifname} at tc ingress (tcx)"))?;
            prog.take_link(id)?.try_into().map_err(|e| {
                anyhow!("{ifname}: the kernel attached at tc ingress without a bpf_link ({e})")
            })?
        }
    })
}

/// Points the pinned ingress link `pinned` of `name` (at `hook`) at the loaded program
/// `xdp` or `tc` of `ebpf` (`bpf_link_update`). The link stays pinned; this process's
/// handle on it goes.
pub(crate) fn replace_ingress(
    ebpf: &mut Ebpf,
    (xdp, tc): (&str, &str),
    pinned: PinnedLink,
    hook: Hook,
    name: &str,
) -> Result<()> {
    match hook {
        Hook::Xdp => {
            let prog: &mut Xdp = ebpf
                .program_mut(xdp)
                .ok_or_else(|| anyhow!("program {xdp} missing"))?
                .try_into()?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| anyhow!("{name}: pinned link is not an XDP link: {e}"))?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing the program on {name}"))?;
            let _ = prog.take_link(id)?;
        }
        Hook::Tc => {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(tc).ok_or_else(|| anyhow!("program {tc} missing"))?.try_into()?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| anyhow!("{name}: pinned link is not a tcx link: {e}"))?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing the tc program on {name}"))?;
            let _ = prog.take_link(id)?;
        }
    }
    Ok(())
}

/// Replaces the programs on every attached interface with this build's, in place: each
/// pinned link (XDP and egress) is pointed at the new program (`bpf_link_update`), so there
/// is no moment without a program, and the pinned maps (flows, NAT translations, policy,
/// counters) carry over untouched; flow tables of an earlier layout are copied over
/// (`migrate`). An interface attached by a build without the egress program gets it now.
/// Returns the interfaces upgraded, each with whether its egress program was added.
pub fn upgrade(pins: &PinDir) -> Result<Vec<(String, bool)>> {
    let attached = pins.attached()?;
    if attached.is_empty() {
        bail!("xdpgate is not attached to any interface under {}", pins.path().display());
    }
    // A deleted device's links were detached by the kernel and cannot be updated: they
    // would fail the upgrade half way (`Link has been severed`), after other interfaces'
    // egress programs were replaced. They are left as they are (an attach of the name
    // removes them).
    let names: Vec<String> = attached.into_iter().filter(|n| !link_gone(pins, n)).collect();
    if names.is_empty() {
        bail!(
            "the devices of every interface attached under {} were deleted: nothing to upgrade",
            pins.path().display()
        );
    }
    // Every interface is checked, and every program loaded and verified, before any
    // changes: a refusal leaves all as they were.
    let steps = names.iter().map(|name| egress_step(pins, name)).collect::<Result<Vec<_>>>()?;
    let hooks =
        names.iter().map(|name| Ok(link_info(pins, name)?.hook)).collect::<Result<Vec<_>>>()?;
    let migrating = migrate::pending(pins);
    let prepared = load(pins).and_then(|mut ebpf| {
        // A build without `IFACE_INDEX` registered these interfaces in `IFACES` alone: the
        // new programs find them in the array.
        index_ifaces(pins)?;
        egress_dataplane(&mut ebpf)?;
        dataplane(&mut ebpf)?;
        if hooks.contains(&Hook::Tc) {
            tc_dataplane(&mut ebpf)?;
        }
        if migrating {
            // The flows so far, before the new programs look for them.
            migrate::copy(pins)?;
        }
        Ok(ebpf)
    });
    let mut ebpf = match prepared {
        Ok(ebpf) => ebpf,
        Err(e) => {
            if migrating && !migrate::in_use(pins).unwrap_or(true) {
                // Its new tables hold copies no program uses; left pinned, they would be
                // read as the flows (by views, and by an agent's sweeps and NAT expiry).
                migrate::abandon(pins);
            }
            return Err(e);
        }
    };
    // Each link is replaced in one step, but not all of them at once: a failure (or a kill)
    // between two leaves some interfaces on this build's programs and some on the earlier's,
    // both working; `upgrade` again finishes it.
    let mut replaced = 0;
    let mut added = Vec::new();
    let replace_all = || -> Result<()> {
        let egress: &mut SchedClassifier =
            ebpf.program_mut(EGRESS_PROGRAM).expect("loaded above").try_into()?;
        for (name, step) in names.iter().zip(steps) {
            added.push(upgrade_egress(egress, pins, name, step)?);
            replaced += 1;
        }
        for (name, hook) in names.iter().zip(hooks) {
            let pinned = PinnedLink::from_pin(pins.link(name))
                .with_context(|| format!("opening the pinned link of {name}"))?;
            replace_ingress(&mut ebpf, (PROGRAM, TC_PROGRAM), pinned, hook, name)?;
            replaced += 1;
        }
        Ok(())
    };
    if let Err(e) = replace_all() {
        return Err(if replaced == 0 {
            e.context("nothing was replaced")
        } else {
            e.context(
                "the upgrade stopped half way: some programs are this build's, the others the \
                 earlier build's, and traffic goes on through both; run `xdpgate upgrade` \
                 again to finish it",
            )
        });
    }
    if migrating {
        // The flows the earlier programs made until they were replaced; then their tables go.
        migrate::copy(pins)?;
        migrate::finish(pins)?;
    }
    // The drop counters of builds with shorter arrays stay pinned (see `EARLIER_DROP_STATS`):
    // `stats` adds their counts, and an earlier build's agent still running reads them.
    Ok(names.into_iter().zip(added).collect())
}

/// What `upgrade` does to the egress program of an interface.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EgressStep {
    /// Points its pinned link at the new program.
    Replace,
    /// Attaches it: a build without the egress program attached the interface.
    Add,
    /// Nothing: the interface's device is gone (`detach` clears what is left).
    None,
}

/// Decides what `upgrade` does to the egress program of `name`. Adding one needs the
/// device in this network namespace, as the XDP link says it is.
fn egress_step(pins: &PinDir, name: &str) -> Result<EgressStep> {
    if pins.egress_link(name).exists() {
        return Ok(EgressStep::Replace);
    }
    let xdp = link_info(pins, name)?;
    if xdp.ifindex == 0 {
        return Ok(EgressStep::None);
    }
    // Only builds with the egress program attach at tc, so an ingress link there always has
    // an egress link beside it, unless a detach failed half way (and detach clears that).
    if ifindex(name).ok() != Some(xdp.ifindex)
        || xdp.hook != Hook::Xdp
        || !runs_xdp(name, xdp.prog_id)
    {
        bail!(
            "{name} was attached by a build without the egress program, and its device is not \
             in this network namespace, where the program must be attached: run `xdpgate \
             --netns <its namespace> upgrade`, or detach and attach it again; nothing was \
             upgraded"
        );
    }
    Ok(EgressStep::Add)
}

/// Points the pinned egress link of `name` at `prog`, or attaches `prog` (then returns
/// true), as `step` says.
fn upgrade_egress(
    prog: &mut SchedClassifier,
    pins: &PinDir,
    name: &str,
    step: EgressStep,
) -> Result<bool> {
    match step {
        EgressStep::Replace => {
            let pinned = PinnedLink::from_pin(pins.egress_link(name))
                .with_context(|| format!("opening the pinned egress link of {name}"))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| anyhow!("{name}: pinned egress link is not a tcx link: {e}"))?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("replacing the egress program on {name}"))?;
            // The link stays pinned; this process's handle on it may go.
            let _ = prog.take_link(id)?;
            Ok(false)
        }
        EgressStep::Add => attach_egress(prog, pins, name).map(|()| true),
        EgressStep::None => Ok(false),
    }
}

/// Whether `ifname` of this network namespace runs XDP program `prog_id`, as `ip` lists it
/// (ifindexes repeat across namespaces, program ids do not).
fn runs_xdp(ifname: &str, prog_id: u32) -> bool {
    let Ok(out) =
        std::process::Command::new("ip").args(["-j", "-d", "link", "show", "dev", ifname]).output()
    else {
        return false;
    };
    let Ok(devs) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
    let xdp = &devs[0]["xdp"];
    let ours = |p: &serde_json::Value| p["prog"]["id"].as_u64() == Some(u64::from(prog_id));
    ours(xdp) || xdp["attached"].as_array().is_some_and(|all| all.iter().any(ours))
}

/// Detaches the dataplane from `ifname` and forgets the interface.
pub fn detach(pins: &PinDir, ifname: &str) -> Result<()> {
    pins.check()?;
    let link_pin = pins.link(ifname);
    let link = PinnedLink::from_pin(&link_pin).with_context(|| {
        format!("xdpgate is not attached to {ifname} ({} missing)", link_pin.display())
    })?;
    // The link knows its device's ifindex even when the device lives in another network
    // namespace, where looking `ifname` up here would find nothing, or another device.
    // 0: the device is gone, and with it the way to tell which registration was its.
    let registered = link_info(pins, ifname).map(|l| l.ifindex)?;
    // Unpinning drops the last reference once this handle closes: the kernel detaches. The
    // egress link first: an XDP link without it is what an older build left, and detaches
    // alike.
    let egress_pin = pins.egress_link(ifname);
    match PinnedLink::from_pin(&egress_pin) {
        Ok(egress) => drop(egress.unpin()?),
        Err(_) if !egress_pin.exists() => {}
        Err(e) => {
            return Err(e).with_context(|| format!("opening {}", egress_pin.display()));
        }
    }
    drop(link.unpin()?);
    if registered != 0 {
        let ifindex = registered;
        write_iface(pins, ifindex, None)?;
        let mut egress: DevMapHash<_> = pins.open_map(EGRESS)?.try_into()?;
        let _ = egress.remove(ifindex);
    } else {
        // Its registration is one of those no live link claims.
        forget_dead_registrations(pins)?;
    }
    Ok(())
}

/// Whether `ifname`'s pinned ingress link is left from a device that was deleted (the
/// kernel detached it: its ifindex reads 0), so that a device of that name now is not
/// attached.
pub fn link_gone(pins: &PinDir, ifname: &str) -> bool {
    pins.link(ifname).exists() && link_info(pins, ifname).is_ok_and(|l| l.ifindex == 0)
}

/// Forgets the registrations of deleted devices: those of no live pinned link. A deleted
/// device's link no longer tells its ifindex, so its detach cannot forget it by that; each
/// device deleted and detached, or recreated and attached again (a restarted container's
/// veth), would otherwise hold on to one more of the `MAX_IFACES` slots.
fn forget_dead_registrations(pins: &PinDir) -> Result<()> {
    let live: Vec<u32> = live_links(pins)?.into_iter().map(|(_, ifindex)| ifindex).collect();
    let ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
    let dead: Vec<u32> =
        ifaces.keys().filter_map(|k| k.ok()).filter(|i| !live.contains(i)).collect();
    for ifindex in dead {
        unregister(pins, ifindex);
    }
    Ok(())
}

/// Each attached interface's name with the ifindex its pinned link reports, but those whose
/// device was deleted (their links report 0).
fn live_links(pins: &PinDir) -> Result<Vec<(String, u32)>> {
    Ok(pins
        .attached()?
        .into_iter()
        .filter_map(|name| {
            let ifindex = link_info(pins, &name).ok()?.ifindex;
            (ifindex != 0).then_some((name, ifindex))
        })
        .collect())
}

/// Forgets `ifindex` (after a failed attach).
fn unregister(pins: &PinDir, ifindex: u32) {
    let _ = write_iface(pins, ifindex, None);
    if let Ok(map) = pins.open_map(EGRESS)
        && let Ok(mut egress) = DevMapHash::try_from(map)
    {
        let _ = egress.remove(ifindex);
    }
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

/// Gives `ifindex` a counter slot and a role in the `IFACES` map (and `IFACE_INDEX`), and
/// with `hook` XDP, a place in the `EGRESS` devmap XDP forwards through.
fn register(ebpf: &mut Ebpf, pins: &PinDir, ifindex: u32, role: Role, hook: Hook) -> Result<()> {
    let ifaces: HashMap<_, u32, IfaceConfig> =
        ebpf.map(IFACES).ok_or_else(|| anyhow!("map {IFACES} missing"))?.try_into()?;
    let used: Vec<u32> = ifaces.iter().filter_map(|e| e.ok()).map(|(_, c)| c.slot).collect();
    let slot = match ifaces.get(&ifindex, 0) {
        Ok(existing) => existing.slot,
        Err(_) => {
            let free = (1..MAX_IFACES)
                .find(|s| !used.contains(s))
                .ok_or_else(|| anyhow!("all {} interface slots are in use", MAX_IFACES - 1))?;
            stats::clear_slot(ebpf, free)?;
            free
        }
    };
    write_iface(pins, ifindex, Some(IfaceConfig { slot, role: role as u32 }))?;
    if hook == Hook::Tc {
        // Not a target of XDP redirects: a frame redirected into a veth is dropped unless
        // the peer runs NAPI, and would skip GRO. XDP passes packets routed here to the
        // stack, which forwards them; tc forwards to any registered interface itself.
        return Ok(());
    }
    // XDP may forward out of every interface it is attached to with XDP.
    let mut egress: DevMapHash<_> =
        ebpf.map_mut(EGRESS).ok_or_else(|| anyhow!("map {EGRESS} missing"))?.try_into()?;
    egress
        .insert(ifindex, ifindex, None, 0)
        .context("adding the interface to the egress devmap")?;
    Ok(())
}

/// Registers `ifindex` with `config` (`None`: forgets it) where the programs look: `IFACES`,
/// and `IFACE_INDEX` when the ifindex lies within the array. Every change of a registration
/// goes through here, so the two never disagree.
pub fn write_iface(pins: &PinDir, ifindex: u32, config: Option<IfaceConfig>) -> Result<()> {
    let mut ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
    match config {
        Some(c) => ifaces.insert(ifindex, c, 0)?,
        // Already gone is fine.
        None => drop(ifaces.remove(&ifindex)),
    }
    // A build without the array attached the interface (nothing loaded this build since):
    // there is nothing in it to clear.
    let unindexed = config.is_none() && !pins.map(IFACE_INDEX).exists();
    if ifindex < IFACE_INDEX_ENTRIES && !unindexed {
        let mut index: Array<_, IfaceConfig> = pins.open_map(IFACE_INDEX)?.try_into()?;
        let unregistered = IfaceConfig { slot: 0, role: 0 };
        index.set(ifindex, config.unwrap_or(unregistered), 0)?;
    }
    Ok(())
}

/// Copies every registration of `IFACES` into `IFACE_INDEX` (see [`write_iface`]): after a
/// load, for the interfaces an older build registered in the hash alone.
fn index_ifaces(pins: &PinDir) -> Result<()> {
    let ifaces: HashMap<_, u32, IfaceConfig> = pins.open_map(IFACES)?.try_into()?;
    let mut index: Array<_, IfaceConfig> = pins.open_map(IFACE_INDEX)?.try_into()?;
    for (ifindex, config) in ifaces.iter().filter_map(Result::ok) {
        if ifindex < IFACE_INDEX_ENTRIES {
            index.set(ifindex, config, 0)?;
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns` (flow and translation
/// timestamps).
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The ifindex of `ifname` in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| anyhow!("no interface named {ifname:?} in this network namespace"))
}

/// Refuses an interface whose packets do not start with an Ethernet header (tun, WireGuard,
/// ipip, GRE: an L3 device's packets start at the IP header): the parser would read the IP
/// header as Ethernet and pass every packet as non-IP, unjudged by the NSG, at either hook.
pub(crate) fn ethernet(ifname: &str) -> Result<()> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_LOOPBACK: u16 = 772;
    let sock = inet_socket("SIOCGIFHWADDR")?;
    let mut req = ifreq(ifname);
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        bail!("reading the link type of {ifname}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR sets the hwaddr member.
    let kind = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    if kind == ARPHRD_LOOPBACK {
        bail!(
            "{ifname} is the loopback device, not an Ethernet interface: no packet arrives on \
             it from a network; attach to the interface the traffic arrives by"
        );
    }
    if kind != ARPHRD_ETHER {
        bail!(
            "{ifname} is not an Ethernet interface (link type {kind}: an L3 device such as tun, \
             WireGuard or an IP tunnel): xdpgate parses Ethernet frames and would judge none of \
             its packets; attach it to the Ethernet interface the traffic arrives by"
        );
    }
    Ok(())
}

/// The ids of the pinned egress (tcx) link of `ifname` and of the program it runs; none when
/// an older build attached the interface without one.
pub fn egress_link_info(pins: &PinDir, ifname: &str) -> Result<Option<(u32, u32)>> {
    pins.check()?;
    let path = pins.egress_link(ifname);
    if !path.exists() {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(&path)
        .with_context(|| format!("opening the pinned link {}", path.display()))?;
    let info = FdLink::from(link).info()?;
    Ok(Some((info.id(), info.program_id())))
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// What the kernel says of a pinned ingress link (`bpf_link_info`): XDP, or tcx ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// The device's ifindex in its own network namespace; 0 once the link is detached (its
    /// device deleted). The kernel does not report the namespace of the link.
    pub ifindex: u32,
    /// Which hook the link is: an XDP link, or a tcx link at ingress.
    pub hook: Hook,
}

/// Reads the `bpf_link_info` of the ingress link pinned for `ifname`. aya's `LinkInfo`
/// leaves out the XDP and tcx parts, hence the two bpf() calls here.
pub fn link_info(pins: &PinDir, ifname: &str) -> Result<IngressLinkInfo> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

    pins.check()?;
    let path = pins.link(ifname);
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let bpf = |cmd: bpf_cmd, attr: &mut bpf_attr| {
        // SAFETY: attr is a valid bpf_attr for `cmd`, and the pointers in it (the path, the
        // info buffer) outlive the call.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr, size_of::<bpf_attr>())
        };
        if ret < 0 {
            let call = if matches!(cmd, bpf_cmd::BPF_OBJ_GET) {
                "BPF_OBJ_GET"
            } else {
                "BPF_OBJ_GET_INFO_BY_FD"
            };
            Err(aya::sys::SyscallError { call, io_error: std::io::Error::last_os_error() })
        } else {
            Ok(ret)
        }
    };
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = cpath.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("opening the pinned link {}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: all-zero is a valid bpf_link_info and bpf_attr.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = &mut info as *mut _ as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("reading the link info of {}", path.display()))?;
    let (hook, ifindex) = if info.type_ == bpf_link_type::BPF_LINK_TYPE_XDP as u32 {
        // SAFETY: the xdp member is the one the kernel fills for XDP links.
        (Hook::Xdp, unsafe { info.__bindgen_anon_1.xdp.ifindex })
    } else if info.type_ == bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        // SAFETY: the tcx member is the one the kernel fills for tcx links.
        let tcx = unsafe { info.__bindgen_anon_1.tcx };
        if tcx.attach_type != aya_obj::generated::bpf_attach_type::BPF_TCX_INGRESS as u32 {
            bail!("{} is a tcx link, but not at ingress", path.display());
        }
        (Hook::Tc, tcx.ifindex)
    } else {
        bail!(
            "{} is neither an XDP nor a tcx ingress link (bpf link type {})",
            path.display(),
            info.type_
        );
    };
    Ok(IngressLinkInfo { link_id: info.id, prog_id: info.prog_id, ifindex, hook })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage's body is inlined into its program: none is a function of its own, named
    /// after its program and nested in it as aya's macro makes it, which each packet would
    /// call (seen failing with `#[inline(always)]` taken off the policy stage).
    #[test]
    fn no_stage_calls_its_own_body() {
        let obj = aya_obj::Object::parse(EBPF_OBJ).expect("parse the eBPF object");
        let mut called: Vec<&String> = obj
            .programs
            .keys()
            .filter(|p| {
                let nested = format!("{0}{1}{0}{1}", p.len(), p);
                obj.functions.values().any(|f| f.name.contains(&nested))
            })
            .collect();
        called.sort();
        assert!(obj.programs.contains_key(POLICY_PROGRAM), "no policy stage in the object");
        assert!(called.is_empty(), "stages that call their body: {called:?}");
    }

    #[test]
    fn only_refusals_of_bpf_calls_and_pins_need_privileges() {
        let io = |errno| std::io::Error::from_raw_os_error(errno);
        let bpf = |errno| aya::sys::SyscallError { call: "BPF_OBJ_GET", io_error: io(errno) };
        let denied = anyhow::Error::from(bpf(libc::EACCES)).context("opening map FLOWS");
        assert!(is_permission_error(&denied));
        assert!(is_permission_error(&anyhow::Error::from(bpf(libc::EPERM))));
        assert!(!is_permission_error(&anyhow::Error::from(bpf(libc::ENOENT))));
        let pins = PinDirError::PermissionDenied {
            what: "opening",
            path: "/sys/fs/bpf/xdpgate".into(),
            source: nix::errno::Errno::EACCES,
        };
        assert!(is_permission_error(&anyhow::Error::from(pins).context("status")));
        // A file this user may not read is not a matter of CAP_BPF.
        let file = anyhow::Error::from(io(libc::EACCES)).context("reading policy.yaml");
        assert!(!is_permission_error(&file));
    }

    /// Every spelling of one pin directory has one state directory (seen failing before:
    /// `/sys/fs/bpf//xdpgate` had its own, without the agent's lock).
    #[test]
    fn spellings_of_a_pin_directory_share_its_state() {
        let pins = PinDir::new("/sys/fs/bpf/xdpgate");
        for spelling in
            ["/sys/fs/bpf//xdpgate", "/sys/fs/bpf/./xdpgate/", "/sys/fs/bpf/x/../xdpgate"]
        {
            let other = PinDir::new(spelling);
            assert_eq!((other.path(), state::dir(&other)), (pins.path(), state::dir(&pins)));
        }
        let here = std::env::current_dir().unwrap();
        assert_eq!(PinDir::new("xg/").path(), here.join("xg"));
        // Through a symbolic link to a directory on the way, existing or not past it (seen
        // failing before: a state directory of its own, and an `apply` beside the agent).
        let dir = std::env::temp_dir().join(format!("xgpins{}", std::process::id()));
        fs::create_dir_all(dir.join("real")).unwrap();
        let real = fs::canonicalize(dir.join("real")).unwrap();
        std::os::unix::fs::symlink(&real, dir.join("alias")).unwrap();
        for tail in ["xdpgate", "not/yet/xdpgate"] {
            let through = PinDir::new(dir.join("alias").join(tail));
            assert_eq!(through.path(), real.join(tail));
            assert_eq!(state::dir(&through), state::dir(&PinDir::new(real.join(tail))));
        }
        // The last component is not resolved: a link there is refused, not followed.
        assert_eq!(
            PinDir::new(dir.join("alias")).path(),
            fs::canonicalize(&dir).unwrap().join("alias")
        );
        // Refused naming where it points, for any command (seen failing: "remove it and
        // attach again", to a `status` through a link the user made to the real directory),
        // a relative link's target resolved (seen: "(to real)").
        std::os::unix::fs::symlink("real", dir.join("relative")).unwrap();
        for link in ["alias", "relative"] {
            let err = check_dir(&dir.join(link)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("a symbolic link (to {})", real.display()))
                    && err.contains("name the directory itself (--pin-dir)")
                    && !err.contains("attach again"),
                "{err}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
