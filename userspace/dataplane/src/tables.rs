//! Table sizes the operator chooses when the dataplane is first attached: established flows
//! (`FLOWS` holds two entries per flow, `EMBRYOS` a quarter as many) and NAT translations
//! (`NAT_MAP`, two entries each). The maps are created and pinned at those sizes; every later
//! load (another attach, `upgrade`, the agent) takes the pinned sizes, since a map's size
//! cannot change while it holds state. Resizing means detaching everything and removing the
//! pins.

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, MapInfo};
use serde::Serialize;
use xdpgate_common::{
    flow::{FlowKey, FlowValue},
    maps::{DEFAULT_FLOWS, EMBRYO_DIVISOR, EMBRYOS, EMBRYOS_V1, FLOWS, FLOWS_V1, NAT_MAP},
    nat::{NAT_ENTRIES, NatEntry},
};

use crate::PinDir;

/// The maps whose size the operator chooses (any pinned size passes the layout check).
pub const SIZED_MAPS: [&str; 3] = [FLOWS, EMBRYOS, NAT_MAP];

/// Smallest and largest table the operator may ask for. The smallest keeps the embryonic
/// LRU above a few entries per CPU; the largest keeps the map's buckets within what the
/// kernel's hash map allows (2^28 buckets for 2^28 entries).
pub const MIN_FLOWS: u32 = 64;
pub const MAX_FLOWS: u32 = 1 << 27;
pub const MIN_NAT_TRANSLATIONS: u32 = 64;
pub const MAX_NAT_TRANSLATIONS: u32 = 1 << 27;

/// Sizes of the operator-sized tables, in flows and translations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TableSizes {
    /// Established flows (`FLOWS` entries / 2).
    pub flows: u32,
    /// NAT translations (`NAT_MAP` entries / 2).
    pub nat_translations: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        Self { flows: DEFAULT_FLOWS, nat_translations: NAT_ENTRIES }
    }
}

impl TableSizes {
    /// `FLOWS` entries: one per direction.
    pub fn flow_entries(&self) -> u32 {
        2 * self.flows
    }

    /// `EMBRYOS` entries.
    pub fn embryo_entries(&self) -> u32 {
        self.flow_entries() / EMBRYO_DIVISOR
    }

    /// `NAT_MAP` entries: each translation under both of its tuples.
    pub fn nat_entries(&self) -> u32 {
        2 * self.nat_translations
    }

    /// The sizes of the tables pinned under `pins`; none when `FLOWS` is not pinned (no
    /// dataplane loaded there). A NAT map not pinned counts at its default size.
    pub fn pinned(pins: &PinDir) -> Result<Option<Self>> {
        let made = pinned_entries(pins, FLOWS)?;
        let Some(flows) = previous_or(pins, made, FLOWS_V1)? else { return Ok(None) };
        let nat = pinned_entries(pins, NAT_MAP)?.map_or(NAT_ENTRIES, |n| n / 2);
        Ok(Some(Self { flows: flows / 2, nat_translations: nat }))
    }
}

/// What the operator asked for; `None` keeps the pinned size, or else the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeRequest {
    pub flows: Option<u32>,
    pub nat_translations: Option<u32>,
}

impl SizeRequest {
    /// Refuses sizes outside the limits, naming them as the CLI does.
    pub fn check(&self) -> Result<()> {
        for (what, n, lo, hi) in [
            ("flows", self.flows, MIN_FLOWS, MAX_FLOWS),
            ("nat-translations", self.nat_translations, MIN_NAT_TRANSLATIONS, MAX_NAT_TRANSLATIONS),
        ] {
            if let Some(n) = n
                && !(lo..=hi).contains(&n)
            {
                bail!(
                    "{what} {}: must be between {} and {}",
                    thousands(n.into()),
                    thousands(lo.into()),
                    thousands(hi.into())
                );
            }
        }
        Ok(())
    }
}

/// `max_entries` of the map pinned as `name`, if it is pinned.
pub fn pinned_entries(pins: &PinDir, name: &str) -> Result<Option<u32>> {
    let path = pins.map(name);
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(info.max_entries()))
}

/// The sizes a load under `pins` gives the tables, and each sized map's `max_entries` for
/// the loader: the pinned sizes where the maps are pinned, else the request, else the
/// defaults. A request that differs from a pinned size is refused: the map cannot be
/// resized in place, and silently keeping the old size would hide it.
pub fn plan(pins: &PinDir, req: &SizeRequest) -> Result<(TableSizes, Vec<(&'static str, u32)>)> {
    req.check()?;
    let defaults = TableSizes::default();
    let (made_flows, made_embryos) = (pinned_entries(pins, FLOWS)?, pinned_entries(pins, EMBRYOS)?);
    // Tables of an earlier layout, still to be carried over, give the new ones their sizes.
    let flows = previous_or(pins, made_flows, FLOWS_V1)?;
    let embryos = previous_or(pins, made_embryos, EMBRYOS_V1)?;
    let nat = pinned_entries(pins, NAT_MAP)?;
    let mut wrong = Vec::new();
    if let (Some(want), Some(n)) = (req.flows, flows)
        && want != n / 2
    {
        wrong.push(format!(
            "{} flows asked for, but {FLOWS} is pinned with {} entries ({} flows)",
            thousands(want.into()),
            thousands(n.into()),
            thousands((n / 2).into())
        ));
    }
    if let (Some(want), Some(n)) = (req.nat_translations, nat)
        && want != n / 2
    {
        wrong.push(format!(
            "{} NAT translations asked for, but {NAT_MAP} is pinned with {} entries ({} \
             translations)",
            thousands(want.into()),
            thousands(n.into()),
            thousands((n / 2).into())
        ));
    }
    if !wrong.is_empty() {
        bail!(
            "the tables under {} were sized when the dataplane was first attached: {}. A \
             pinned table keeps its size (upgrade and later attaches use it); to resize, \
             detach every interface (xdpgate detach --all), remove {} (its flows and NAT \
             translations are lost), and attach again with the new size",
            pins.path().display(),
            wrong.join("; "),
            pins.path().display()
        );
    }
    let sizes = TableSizes {
        flows: flows.map_or(req.flows.unwrap_or(defaults.flows), |n| n / 2),
        nat_translations: nat
            .map_or(req.nat_translations.unwrap_or(defaults.nat_translations), |n| n / 2),
    };
    let entries = vec![
        (FLOWS, flows.unwrap_or(sizes.flow_entries())),
        (EMBRYOS, embryos.unwrap_or(sizes.embryo_entries())),
        (NAT_MAP, nat.unwrap_or(sizes.nat_entries())),
    ];
    // The tables to be made are allocated whole at once: refuse sizes the machine cannot
    // hold, before the kernel tries (and squeezes everything else on the gateway).
    let new: u64 = [(FLOWS, made_flows), (EMBRYOS, made_embryos), (NAT_MAP, nat)]
        .iter()
        .zip(&entries)
        .filter(|((_, pinned), _)| pinned.is_none())
        .map(|((name, _), (_, n))| table_bytes(name, *n))
        .sum();
    if let Some(available) = mem_available()
        && new > available
    {
        bail!(
            "tables for {} flows and {} NAT translations need about {} MiB of kernel memory \
             (preallocated), but this machine has {} MiB available: ask for fewer (--flows, \
             --nat-translations)",
            thousands(sizes.flows.into()),
            thousands(sizes.nat_translations.into()),
            thousands(new >> 20),
            thousands(available >> 20)
        );
    }
    Ok((sizes, entries))
}

/// `made`, the entries of a pinned table, or when it is not pinned those of its earlier
/// layout's table `previous`.
fn previous_or(pins: &PinDir, made: Option<u32>, previous: &str) -> Result<Option<u32>> {
    match made {
        Some(n) => Ok(Some(n)),
        None => pinned_entries(pins, previous),
    }
}

/// Kernel memory of a preallocated hash of `entries` (within a few KiB of its `memlock`,
/// measured at 2^20 to 2^22 entries): per element its key and value (each rounded up to 8
/// bytes) and the kernel's 48-byte element header, and a 16-byte bucket per entry rounded
/// up to a power of two.
pub fn table_bytes(map: &str, entries: u32) -> u64 {
    let value = if map == NAT_MAP { size_of::<NatEntry>() } else { size_of::<FlowValue>() };
    let round8 = |n: usize| n.div_ceil(8) as u64 * 8;
    let element = round8(size_of::<FlowKey>()) + round8(value) + 48;
    u64::from(entries) * element + u64::from(entries).next_power_of_two() * 16
}

/// `MemAvailable` of /proc/meminfo in bytes; none if it cannot be read.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One sized table as `status` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TableStatus {
    /// The pinned map.
    pub map: &'static str,
    /// Its `max_entries`.
    pub entries: u32,
    /// Flows (or translations) it holds: two entries each.
    pub capacity: u32,
    /// Kernel memory charged for it (the map's `memlock`, as `bpftool map show` reports
    /// it); none when it could not be read. The tables are preallocated: this is what they
    /// take empty or full.
    pub bytes: Option<u64>,
}

/// The sized tables of a loaded dataplane.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TablesStatus {
    /// Established flows (`FLOWS`).
    pub flows: TableStatus,
    /// Embryonic flows (`EMBRYOS`).
    pub embryonic: TableStatus,
    /// NAT translations (`NAT_MAP`).
    pub nat_translations: TableStatus,
}

impl TablesStatus {
    /// The tables pinned under `pins`; none when no dataplane is loaded there.
    pub fn read(pins: &PinDir) -> Result<Option<Self>> {
        if pinned_entries(pins, FLOWS)?.is_none() {
            return Ok(None);
        }
        let table = |map: &'static str| -> Result<TableStatus> {
            let path = pins.map(map);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let entries = data.info()?.max_entries();
            let bytes = memlock(data.fd()).ok();
            Ok(TableStatus { map, entries, capacity: entries / 2, bytes })
        };
        Ok(Some(Self {
            flows: table(FLOWS)?,
            embryonic: table(EMBRYOS)?,
            nat_translations: table(NAT_MAP)?,
        }))
    }
}

/// The `memlock:` figure of an open bpf object's fdinfo: the kernel's own count of what the
/// map takes.
pub fn memlock(fd: impl std::os::fd::AsFd) -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_fd().as_raw_fd();
    let path = format!("/proc/self/fdinfo/{raw}");
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:").and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("no memlock in {path}"))
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_entries() {
        let d = TableSizes::default();
        assert_eq!((d.flows, d.flow_entries(), d.embryo_entries()), (524_288, 1_048_576, 262_144));
        assert_eq!((d.nat_translations, d.nat_entries()), (NAT_ENTRIES, 2 * NAT_ENTRIES));
        let big = TableSizes { flows: MAX_FLOWS, nat_translations: MAX_NAT_TRANSLATIONS };
        assert_eq!((big.flow_entries(), big.nat_entries()), (1 << 28, 1 << 28));
    }

    #[test]
    fn requests_outside_the_limits_are_refused() {
        assert!(SizeRequest::default().check().is_ok());
        let ok =
            SizeRequest { flows: Some(1_000_000), nat_translations: Some(MIN_NAT_TRANSLATIONS) };
        assert!(ok.check().is_ok());
        let e = SizeRequest { flows: Some(10), ..Default::default() }.check().unwrap_err();
        assert_eq!(e.to_string(), "flows 10: must be between 64 and 134,217,728");
        let e = SizeRequest { nat_translations: Some(u32::MAX), ..Default::default() };
        assert!(e.check().unwrap_err().to_string().starts_with("nat-translations 4,294,967,295"));
    }

    /// Against the `memlock` the kernel reported for these maps (README, "Table sizes").
    #[test]
    fn table_bytes_match_the_kernels_memlock() {
        for (map, entries, memlock) in [
            (FLOWS, 1_048_576, 218_105_104u64),
            (FLOWS, 2_000_000, 417_555_728),
            (FLOWS, 4_194_304, 872_416_528),
            (EMBRYOS, 1_048_576, 218_104_704),
            (NAT_MAP, 524_288, 71_304_320),
            (NAT_MAP, 2_097_152, 285_213_824),
        ] {
            let est = table_bytes(map, entries);
            assert!(est.abs_diff(memlock) < 64 << 10, "{map} {entries}: {est} vs {memlock}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(2_097_152), "2,097,152");
    }
}
