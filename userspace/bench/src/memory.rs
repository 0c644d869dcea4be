//! Memory: what every map of a freshly loaded dataplane takes at its default size (the
//! kernel's `memlock` figure from each map's fdinfo), the flow tables (established and
//! embryonic) at the default size and at 2,097,152 flows, and the agent's resident memory
//! holding a policy of 4,096 rules and a load balancer of 256 backends (measured in a fresh
//! child process).

use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use aya::maps::MapInfo;
use serde::{Deserialize, Serialize};
use xdpgate_common::maps::{EMBRYOS, FLOWS, NAT_MAP, NSG_FIELDS};
use xdpgate_dataplane::{
    ACT_PROGRAM, NEW_FLOW_PROGRAM, NOOP_PROGRAM, POLICY_PROGRAM, PROGRAM, PinDir, SNAT_PROGRAM,
    SizeRequest, tables::memlock,
};

use crate::common::{
    Bench, Family, Machine, bytes, ms, remove_dataplane, thousands, unique_pin_dir,
};

/// The flow-table size of the "2M flows" figure.
const BIG_FLOWS: u32 = 2 << 20;
/// Rules and backends of the resident-memory figure: 4,090 user rules in two NSGs, with
/// their 6 defaults the 4,096 rules the inbound table holds.
pub const RSS_USER_RULES: usize = 4_090;
pub const RSS_TABLE_RULES: usize = 4_096;
pub const RSS_BACKENDS: usize = 256;

/// The flow tables of one size: flows, and each table's entries and memory.
#[derive(Serialize, Clone, Copy)]
pub struct FlowTables {
    pub flows: u32,
    pub flows_entries: u32,
    pub flows_bytes: u64,
    pub embryos_entries: u32,
    pub embryos_bytes: u64,
}

impl FlowTables {
    pub fn bytes(&self) -> u64 {
        self.flows_bytes + self.embryos_bytes
    }

    pub fn per_flow(&self) -> f64 {
        self.bytes() as f64 / f64::from(self.flows)
    }
}

#[derive(Serialize)]
pub struct MapRow {
    pub name: String,
    pub map_type: String,
    pub pinned: bool,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Default)]
pub struct Rss {
    /// VmRSS in KiB: at the start of the probe process, after loading the dataplane, and
    /// after parsing, compiling and applying the policy (still held, as the agent does).
    pub start_kib: u64,
    pub loaded_kib: u64,
    pub applied_kib: u64,
    /// VmHWM (peak) at the end.
    pub peak_kib: u64,
    pub rules: usize,
    pub backends: usize,
    pub apply_ms: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub maps: Vec<MapRow>,
    pub total_bytes: u64,
    /// Programs' memlock (JIT images and metadata), by program.
    pub programs: Vec<(String, u64)>,
    pub flows_default: FlowTables,
    /// The flow tables sized for 2,097,152 flows (or why they could not be).
    pub flows_big: Result<FlowTables, String>,
    pub rss: Result<Rss, String>,
    /// `NSG_FIELDS` (an LPM trie, allocated per entry) after applying the resident-memory
    /// policy once: (LPM entries, bytes).
    pub nsg_fields_applied: Option<(usize, u64)>,
}

impl Report {
    pub fn map_bytes(&self, name: &str) -> u64 {
        self.maps.iter().find(|m| m.name == name).map_or(0, |m| m.bytes)
    }
}

/// What the pinned map `name` takes.
pub fn pinned_bytes(pins: &PinDir, name: &str) -> Result<u64> {
    memlock(MapInfo::from_pin(pins.map(name))?.fd()?)
}

fn map_row(info: &MapInfo, name: String, pinned: bool) -> Result<MapRow> {
    let fd = info.fd()?;
    Ok(MapRow {
        name,
        map_type: info.map_type().map_or_else(|_| "unknown".into(), |t| format!("{t:?}")),
        pinned,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        bytes: memlock(&fd)?,
    })
}

/// Every map of a loaded dataplane: the pinned ones by their pin names, and the ones only
/// the programs reference (per-CPU scratch) by their kernel names.
fn maps_of(bench: &Bench) -> Result<Vec<MapRow>> {
    let mut rows: BTreeMap<u32, MapRow> = BTreeMap::new();
    for entry in fs::read_dir(bench.pins.path())? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let info = MapInfo::from_pin(entry.path())
            .with_context(|| format!("opening pinned map {name}"))?;
        rows.insert(info.id(), map_row(&info, name, true)?);
    }
    for prog in [PROGRAM, POLICY_PROGRAM, NEW_FLOW_PROGRAM, ACT_PROGRAM, SNAT_PROGRAM, NOOP_PROGRAM]
    {
        let ids = bench.prog(prog)?.info()?.map_ids()?.unwrap_or_default();
        for id in ids {
            if rows.contains_key(&id) {
                continue;
            }
            let info = MapInfo::from_id(id)?;
            let name = info.name_as_str().unwrap_or("?").to_string();
            rows.insert(id, map_row(&info, name, false)?);
        }
    }
    let mut rows: Vec<MapRow> = rows.into_values().collect();
    rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    Ok(rows)
}

fn programs_of(bench: &Bench) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for prog in [PROGRAM, POLICY_PROGRAM, NEW_FLOW_PROGRAM, ACT_PROGRAM, SNAT_PROGRAM] {
        out.push((prog.to_string(), memlock(bench.prog(prog)?.fd()?)?));
    }
    Ok(out)
}

/// Loads the object with its flow tables sized for `flows` in a pin directory of its own
/// (maps only: no program is loaded), as `xdpgate attach --flows` does, and returns what
/// the flow tables take.
fn flows_at(flows: u32) -> Result<FlowTables> {
    let pins = PinDir::new(unique_pin_dir("xdpgate-bench-flows"));
    let result = (|| {
        let ebpf = xdpgate_dataplane::load_sized(
            &pins,
            &SizeRequest { flows: Some(flows), ..Default::default() },
        )?;
        let (f, e) = (MapInfo::from_pin(pins.map(FLOWS))?, MapInfo::from_pin(pins.map(EMBRYOS))?);
        if f.max_entries() != 2 * flows {
            bail!("FLOWS has {} entries, want {}", f.max_entries(), 2 * flows);
        }
        let tables = FlowTables {
            flows,
            flows_entries: f.max_entries(),
            flows_bytes: memlock(f.fd()?)?,
            embryos_entries: e.max_entries(),
            embryos_bytes: memlock(e.fd()?)?,
        };
        drop(ebpf);
        Ok(tables)
    })();
    remove_dataplane(&pins);
    result
}

pub fn measure(quick: bool, machine: &Machine) -> Result<Report> {
    eprintln!("  maps of a freshly loaded dataplane ...");
    let bench = Bench::new()?;
    let maps = maps_of(&bench)?;
    let programs = programs_of(&bench)?;
    // The LPM trie grows with the policy: apply the big one once.
    let nsg_fields_applied = bench
        .apply(&rss_policy())
        .and_then(|(.., entries)| Ok((entries, pinned_bytes(&bench.pins, NSG_FIELDS)?)))
        .map_err(|e| eprintln!("  NSG_FIELDS after applying: not measured: {e:#}"))
        .ok();
    drop(bench);
    let total_bytes = maps.iter().map(|m| m.bytes).sum();
    let row = |name: &str| {
        maps.iter().find(|m| m.name == name).map_or((0, 0), |m| (m.max_entries, m.bytes))
    };
    let (flows_entries, flows_bytes) = row(FLOWS);
    let (embryos_entries, embryos_bytes) = row(EMBRYOS);
    let flows_default = FlowTables {
        flows: flows_entries / 2,
        flows_entries,
        flows_bytes,
        embryos_entries,
        embryos_bytes,
    };
    eprintln!("  flow tables at {} flows ...", thousands(u64::from(BIG_FLOWS)));
    let flows_big = flows_at(BIG_FLOWS).map_err(|e| format!("{e:#}"));
    eprintln!("  resident memory of {RSS_USER_RULES} rules and {RSS_BACKENDS} backends ...");
    let rss = rss_in_child().map_err(|e| format!("{e:#}"));
    Ok(Report {
        machine: machine.clone(),
        quick,
        maps,
        total_bytes,
        programs,
        flows_default,
        flows_big,
        rss,
        nsg_fields_applied,
    })
}

// ---------------------------------------------------------------------------------------
// Resident memory, in a child process of this binary (`--memory-probe`)

fn rss_in_child() -> Result<Rss> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe).arg("--memory-probe").output().context("running the probe")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("memory probe failed: {}", err.lines().next().unwrap_or("").trim());
    }
    serde_json::from_slice(&out.stdout).context("reading the probe's output")
}

pub fn status_kib(field: &str) -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?.trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

/// The policy of the resident-memory figure: the NSG benchmark's 4,096 user rules and a
/// load balancer of 256 backends.
pub fn rss_policy() -> String {
    let nsg = crate::nsg::policy_yaml(Family::IPv4, RSS_USER_RULES);
    format!("{nsg}{}", crate::lb::lb_yaml(RSS_BACKENDS))
}

/// The child's side: measure, print JSON, exit. Loads the dataplane, then parses, compiles
/// and applies the policy as `xdpgate apply` does, keeping what the agent keeps.
pub fn probe() -> Result<()> {
    let src = rss_policy();
    let start_kib = status_kib("VmRSS:");
    let bench = Bench::new()?;
    let loaded_kib = status_kib("VmRSS:");
    let t = Instant::now();
    let held = bench.apply_all(&src)?;
    let apply_ms = ms(t.elapsed());
    let applied_kib = status_kib("VmRSS:");
    let rss = Rss {
        start_kib,
        loaded_kib,
        applied_kib,
        peak_kib: status_kib("VmHWM:"),
        rules: RSS_USER_RULES,
        backends: held.1.backends.len(),
        apply_ms,
    };
    println!("{}", serde_json::to_string(&rss)?);
    drop(held);
    drop(bench);
    Ok(())
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Memory\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(
        md,
        "Every map of a freshly loaded dataplane at its configured size (the kernel's \
         `memlock` figure from the map's fdinfo, as `bpftool map show` reports it):\n"
    );
    let _ = writeln!(md, "| map | type | pinned | max entries | key B | value B | memory |");
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
    for m in &r.maps {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            m.name,
            m.map_type,
            if m.pinned { "yes" } else { "no" },
            thousands(u64::from(m.max_entries)),
            m.key_size,
            m.value_size,
            bytes(m.bytes)
        );
    }
    let _ = writeln!(md, "| **total** | | | | | | **{}** |", bytes(r.total_bytes));
    if let Some((entries, b)) = r.nsg_fields_applied {
        let _ = writeln!(
            md,
            "\nThe LPM tries are allocated per entry, so they are empty in a fresh dataplane: \
             `NSG_FIELDS` takes {} once a policy of {} rules ({} LPM entries) is applied.",
            bytes(b),
            thousands(RSS_TABLE_RULES as u64),
            thousands(entries as u64)
        );
    }
    let progs: u64 = r.programs.iter().map(|p| p.1).sum();
    let _ = writeln!(
        md,
        "\nPrograms (JIT images and metadata) add {} ({}).\n",
        bytes(progs),
        r.programs.iter().map(|(n, b)| format!("{n} {}", bytes(*b))).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        md,
        "Flow tables (`FLOWS`, a hash, two entries per established flow; `EMBRYOS`, an LRU \
         hash of a quarter as many entries for embryonic flows; both preallocated), sized at \
         first attach (`xdpgate attach --flows N`):\n"
    );
    let _ = writeln!(
        md,
        "| flows | `FLOWS` entries | `FLOWS` memory | `EMBRYOS` entries | `EMBRYOS` memory | \
         memory in all | per flow |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    let row = |md: &mut String, t: &FlowTables, what: &str| {
        let _ = writeln!(
            md,
            "| {}{what} | {} | {} | {} | {} | {} | {:.0} B |",
            thousands(u64::from(t.flows)),
            thousands(u64::from(t.flows_entries)),
            bytes(t.flows_bytes),
            thousands(u64::from(t.embryos_entries)),
            bytes(t.embryos_bytes),
            bytes(t.bytes()),
            t.per_flow()
        );
    };
    row(&mut md, &r.flows_default, " (default)");
    match &r.flows_big {
        Ok(t) => row(&mut md, t, " (`--flows 2097152`)"),
        Err(e) => {
            let _ =
                writeln!(md, "| {} | not measured: {e} | | | | | |", thousands(BIG_FLOWS.into()));
        }
    }
    let _ = writeln!(
        md,
        "\nThe translation map (`{NAT_MAP}`) likewise holds each translation twice (`xdpgate \
         attach --nat-translations N`).\n"
    );
    match &r.rss {
        Ok(s) => {
            let _ = writeln!(
                md,
                "Agent process state (VmRSS of a fresh child process of the benchmark binary):\n"
            );
            let _ = writeln!(md, "| point | VmRSS | delta |");
            let _ = writeln!(md, "|---|---:|---:|");
            let kib = |k: u64| bytes(k * 1024);
            let _ = writeln!(md, "| process start | {} | |", kib(s.start_kib));
            let _ = writeln!(
                md,
                "| dataplane loaded (object parsed, programs verified and loaded, maps pinned) | {} | +{} |",
                kib(s.loaded_kib),
                kib(s.loaded_kib.saturating_sub(s.start_kib))
            );
            let _ = writeln!(
                md,
                "| policy of {} rules ({} user rules + 6 defaults) and {} backends parsed, compiled, applied and held | {} | +{} |",
                thousands(RSS_TABLE_RULES as u64),
                thousands(s.rules as u64),
                s.backends,
                kib(s.applied_kib),
                kib(s.applied_kib.saturating_sub(s.loaded_kib))
            );
            let _ = writeln!(md, "| peak (VmHWM) | {} | |", kib(s.peak_kib));
            let _ = writeln!(
                md,
                "\nVmRSS counts the process's resident pages: the binary and libraries \
                 touched, the heap the allocator keeps (freed memory is often not returned, \
                 so the peak of compiling stays in it), the parsed policy and its source, the \
                 compiled load balancer, and aya's copy of the eBPF object. It does not count \
                 kernel memory: the maps and programs above are charged to the kernel \
                 (memlock), not to the agent's RSS. Apply took {:.0} ms in the probe.",
                s.apply_ms
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Agent resident memory: not measured: {e}");
        }
    }
    md
}
