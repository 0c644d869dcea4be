//! Swapping a compiled policy into the running dataplane atomically: write the inactive slot
//! completely, then flip `ACTIVE_SLOT` (one 4-byte write). A packet reads the slot once and
//! sees either the whole old policy or the whole new one.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Pod,
    maps::{
        Array, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use xdpgate_common::{
    flow::FlowKey,
    lb::{FrontendKey, Service},
    maps::{
        ACTIVE_SLOT, FRONTENDS, NAT_MAP, NAT_PUBLIC, NSG_ADDR4_RANGES, NSG_CLASS_IDS, NSG_CLASSES,
        NSG_FIELDS, NSG_HITS, NSG_RULE_MOVES, NSG_RULES, NSG_SCOPES, NSG_TRAFFIC, POLICY_CONFIG,
    },
    nat::{AddrKey, NatEntry},
    nsg::{
        ADDR4_RANGES, Addr4Ranges, BITMAP_WORDS, CLASSES_PER_ENTRY, CLASSES_PER_SLOT, FIELD_DPORT,
        FIELD_DST4, FIELD_PROTO, FIELD_SPORT, FIELD_SRC4, FLAG_FRONTEND_ADDRESSES, FLAG_MIDSTREAM,
        FLAG_NO_FRONTENDS, FLAG_NO_NAT, FLAG_REEVALUATE, FieldClass, FieldKey, KEY_HEADER_BITS,
        MAX_RULES, PolicyConfig, RuleBitmap, TABLES_PER_SLOT, TableScope, addr4_index, class_bit,
        class_index, wildcard_bit,
    },
    stats::Counter,
    words,
};

use xdpgate_policy::{
    Settings,
    compile::{Addr4Classes, Compiled, FieldClasses, access_code, check_nsg_fields},
    names::{Record, RuleName},
};

use crate::{
    PinDir,
    carried::carried,
    state::{self, WriteLock},
    table,
};

/// What is running: the slot packets use and its settings, with the generation flows are
/// decided under (`PolicyConfig::decided`: whether a set change is rewriting the trie, or
/// was killed doing so, is [`changing`]'s to say).
pub fn active(pins: &PinDir) -> Result<(u32, PolicyConfig)> {
    let (slot, config) = active_as_written(pins)?;
    Ok((slot, config.as_decided()))
}

/// Whether the running slot's trie is being changed by `xdpgate set`, or was left half
/// changed by one killed (`GENERATION_CHANGING`): flows are then judged on each packet,
/// until the next set change or apply.
pub fn changing(pins: &PinDir) -> Result<bool> {
    Ok(active_as_written(pins)?.1.changing())
}

/// The running slot and its settings as written, a set change's mark included.
pub fn active_as_written(pins: &PinDir) -> Result<(u32, PolicyConfig)> {
    let slot_map: Array<_, u32> = pins.open_map(ACTIVE_SLOT)?.try_into()?;
    let configs: Array<_, PolicyConfig> = pins.open_map(POLICY_CONFIG)?.try_into()?;
    let slot = slot_map.get(&0, 0)? & 1;
    Ok((slot, configs.get(&slot, 0)?))
}

/// What a new flow must look up besides the NSG tables; the rest is skipped
/// (`FLAG_NO_FRONTENDS`, `FLAG_NO_NAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookups {
    /// Load-balancer frontends (and inbound NAT rules).
    pub frontends: bool,
    /// NAT gateways and their translations.
    pub nat: bool,
}

impl Lookups {
    /// For a policy with (or without) load balancers and NAT gateways. Translations left in
    /// `NAT_MAP` (a gateway removed, or being removed by this apply) keep the NAT lookups
    /// on: a flow whose entries are gone is rebuilt from its translation, and the reply to
    /// a cooling port is refused, until an apply finds the map empty.
    pub fn of(pins: &PinDir, load_balancers: bool, nat_gateways: bool) -> Result<Self> {
        let nat = nat_gateways || !map_empty::<FlowKey, NatEntry>(pins, NAT_MAP)?;
        Ok(Self { frontends: load_balancers, nat })
    }

    /// What the maps hold now: for an apply of the NSG tables alone (benchmarks), which
    /// leaves the load balancers and NAT gateways installed as they are.
    pub fn installed(pins: &PinDir) -> Result<Self> {
        let frontends = !map_empty::<FrontendKey, Service>(pins, FRONTENDS)?;
        let gateways = !map_empty::<AddrKey, u32>(pins, NAT_PUBLIC)?;
        Self::of(pins, frontends, gateways)
    }

    fn flags(self) -> u32 {
        // With the frontends, `lb::install` wrote each address's own entry.
        (if self.frontends { FLAG_FRONTEND_ADDRESSES } else { FLAG_NO_FRONTENDS })
            | if self.nat { 0 } else { FLAG_NO_NAT }
    }
}

/// Writes the classes of the port and protocol fields of `slot`'s tables into its part of
/// `NSG_CLASS_IDS` and `NSG_CLASSES`, and their IPv4 address fields as ranges into
/// `NSG_ADDR4_RANGES` (classes in `NSG_CLASSES` too), as long as the slot's classes fit,
/// and returns the `class_bit`s of the tables written. What does not fit is left to the
/// trie, which holds every field as before. Ranges are stamped with `generation`, the one
/// the slot's configuration will have: others are not searched.
fn write_classes(pins: &PinDir, compiled: &Compiled, slot: u32, generation: u64) -> Result<u32> {
    let ids: Array<_, [u16; 4]> = pins.open_map(NSG_CLASS_IDS)?.try_into()?;
    let bitmaps: Array<_, FieldClass> = pins.open_map(NSG_CLASSES)?.try_into()?;
    // None pinned (a dataplane loaded before the map, whose programs read only the trie).
    let ranges_map: Option<Array<_, Addr4Ranges>> =
        pins.open_map(NSG_ADDR4_RANGES).ok().map(TryInto::try_into).transpose()?;
    let mut used = 0u32;
    let mut bits = 0;
    for (t, table) in compiled.tables.iter().enumerate() {
        if table.rules.is_empty() {
            continue;
        }
        let table_id = slot * TABLES_PER_SLOT + t as u32;
        let ports = [FIELD_SPORT, FIELD_DPORT, FIELD_PROTO];
        let Some(fields) = all_fit(&ports, used, |f, left| table.classes(f, left), |c| c) else {
            continue;
        };
        for (field, classes) in fields {
            let first = write_bitmaps(&bitmaps, slot, &mut used, &classes)?;
            let (entry, _) = class_index(table_id, field, 0);
            let entries: Vec<[u16; 4]> = classes
                .ids
                .chunks(CLASSES_PER_ENTRY as usize)
                .map(|chunk| std::array::from_fn(|i| chunk[i] + first))
                .collect();
            table::update_batch(&ids, entry, &entries).context("writing NSG class ids")?;
        }
        bits |= class_bit(t as u32);
    }
    // The addresses after every table's ports: no table has fewer classes than before the
    // ranges.
    let Some(ranges_map) = ranges_map else { return Ok(bits) };
    unstamp_ranges(&ranges_map, slot)?;
    for (t, table) in compiled.tables.iter().enumerate() {
        if table.rules.is_empty() {
            continue;
        }
        let table_id = slot * TABLES_PER_SLOT + t as u32;
        let addrs = [FIELD_SRC4, FIELD_DST4];
        let fits = all_fit(&addrs, used, |f, left| table.addr4_ranges(f, left), |r| &r.classes);
        let Some(fields) = fits else { continue };
        // The source last: its stamp stands for both fields (`Addr4Ranges`).
        for (field, ranges) in fields.into_iter().rev() {
            let first = write_bitmaps(&bitmaps, slot, &mut used, &ranges.classes)?;
            table::update_batch(
                &ranges_map,
                addr4_index(table_id, field),
                &[kernel_ranges(&ranges, first, generation)],
            )
            .context("writing NSG address ranges")?;
        }
    }
    Ok(bits)
}

/// Stamps every table's IPv4 ranges in `slot` with no generation, so none is searched until
/// an apply stamps them again: ranges an apply left when killed or failed before its switch
/// carry the generation the slot's next writer takes (every writer numbers it alike). One
/// write for the slot's entries, which lie together (the destinations' stamps are not read).
fn unstamp_ranges(ranges: &Array<MapData, Addr4Ranges>, slot: u32) -> Result<()> {
    let first = addr4_index(slot * TABLES_PER_SLOT, FIELD_SRC4);
    let none = vec![NO_RANGES; 2 * TABLES_PER_SLOT as usize];
    table::update_batch(ranges, first, &none).context("writing NSG address ranges")
}

/// Every one of `fields` as `build` makes it from what is left of the slot's classes after
/// `used`, or `None` unless all fit: a table searches all its fields' classes or none.
fn all_fit<T>(
    fields: &[u8],
    used: u32,
    build: impl Fn(u8, usize) -> Option<T>,
    classes: impl Fn(&T) -> &FieldClasses,
) -> Option<Vec<(u8, T)>> {
    let mut left = (CLASSES_PER_SLOT - used) as usize;
    let built: Vec<_> = fields
        .iter()
        .map_while(|&field| {
            let made = build(field, left)?;
            left -= classes(&made).bitmaps.len();
            Some((field, made))
        })
        .collect();
    (built.len() == fields.len()).then_some(built)
}

/// Writes `classes` into `slot`'s part of `NSG_CLASSES` after the `used` ones; their first
/// id.
fn write_bitmaps(
    bitmaps: &Array<MapData, FieldClass>,
    slot: u32,
    used: &mut u32,
    classes: &FieldClasses,
) -> Result<u16> {
    let values: Vec<FieldClass> = classes
        .bitmaps
        .iter()
        .map(|bitmap| FieldClass {
            summary: (0..BITMAP_WORDS).filter(|&w| bitmap.words[w] != 0).fold(0, |s, w| s | 1 << w),
            bitmap: *bitmap,
        })
        .collect();
    table::update_batch(bitmaps, slot * CLASSES_PER_SLOT + *used, &values)
        .context("writing NSG classes")?;
    let first = *used as u16;
    *used += values.len() as u32;
    Ok(first)
}

/// Ranges of no generation: never searched.
const NO_RANGES: Addr4Ranges =
    Addr4Ranges { generation: 0, starts: [0; ADDR4_RANGES], classes: [0; ADDR4_RANGES] };

/// `ranges` as the kernel searches them, its class ids from `first`: padded to
/// `ADDR4_RANGES` with the last range (its start at the top: only 255.255.255.255 finds one).
fn kernel_ranges(ranges: &Addr4Classes, first: u16, generation: u64) -> Addr4Ranges {
    let n = ranges.starts.len();
    let last = ranges.classes.ids[n - 1] + first;
    Addr4Ranges {
        generation,
        starts: std::array::from_fn(|i| ranges.starts.get(i).copied().unwrap_or(u32::MAX)),
        classes: std::array::from_fn(|i| ranges.classes.ids.get(i).map_or(last, |id| id + first)),
    }
}

/// Writes where each rule of the running slot goes in the new one (`moved`: old and new
/// global index, found by name as the counters carry over; none for the others): a flow
/// kept across the flip without re-evaluation moves its rules by this at its next packet
/// (`NSG_RULE_MOVES`). Before the flip, nothing reads the running slot's part. None pinned
/// (a dataplane loaded before the map): nothing to write, its programs keep old numbers.
fn write_rule_moves(pins: &PinDir, running_slot: u32, moved: &[(u32, u32)]) -> Result<()> {
    let Ok(map) = pins.open_map(NSG_RULE_MOVES) else { return Ok(()) };
    let moves: Array<_, u16> = map.try_into()?;
    let first = running_slot * TABLES_PER_SLOT * MAX_RULES;
    // Plus one: 0 says gone (`NSG_RULE_MOVES`).
    let mut to = vec![0u16; (TABLES_PER_SLOT * MAX_RULES) as usize];
    for &(old, new) in moved {
        to[(old - first) as usize] = new as u16 + 1;
    }
    table::update_batch(&moves, first, &to).context("writing where the running rules move")
}

fn map_empty<K: Pod, V: Pod>(pins: &PinDir, name: &str) -> Result<bool> {
    let map: aya::maps::HashMap<_, K, V> = pins.open_map(name)?.try_into()?;
    Ok(map.keys().next().is_none())
}

/// A policy written into the inactive slot, not yet switched on. Dropped before [`switch`]
/// succeeds, it makes the slot's scopes and ranges of no generation again (`Unswitched`).
#[must_use = "dropped unswitched, it undoes the slot's scopes and ranges"]
pub struct Prepared<'a> {
    /// The slot and generation running when the write began (what the flip compares).
    running: (u32, u64),
    pub slot: u32,
    pub generation: u64,
    unswitched: Unswitched<'a>,
}

impl Prepared<'_> {
    /// The generation running when the write began (0: no policy yet).
    pub fn running_generation(&self) -> u64 {
        self.running.1
    }
}

/// Writes `compiled` into the inactive slot, without switching it on. The counters (flows,
/// packets and bytes) of rules that the running generation (`running`, its record) also has
/// carry over, so a reload does not reset them; the others start at zero. The caller holds
/// the write lock.
pub fn prepare<'a>(
    pins: &'a PinDir,
    compiled: &Compiled,
    settings: &Settings,
    lookups: Lookups,
    running: Option<&Record>,
) -> Result<Prepared<'a>> {
    let (active_slot, active_config) = active(pins)?;
    let slot = 1 - active_slot;
    let mut fields: LpmTrie<_, FieldKey, RuleBitmap> = pins.open_map(NSG_FIELDS)?.try_into()?;
    let mut rules: Array<_, u32> = pins.open_map(NSG_RULES)?.try_into()?;
    let mut hits: PerCpuArray<_, u64> = pins.open_map(NSG_HITS)?.try_into()?;
    // Pinned by the first load of a build with it; none before (then nothing to carry).
    let mut traffic: Option<PerCpuArray<_, Counter>> =
        pins.open_map(NSG_TRAFFIC).ok().map(TryInto::try_into).transpose()?;
    let mut configs: Array<_, PolicyConfig> = pins.open_map(POLICY_CONFIG)?.try_into()?;

    // What the trie holds: the running policy's entries and what an earlier policy left in
    // the inactive slot. The new policy must fit beside the running one; checked before
    // anything is written, so a policy that cannot fit changes nothing.
    let first = (slot * TABLES_PER_SLOT) as u8;
    let last = first + TABLES_PER_SLOT as u8;
    let (stale, running_entries): (Vec<Key<FieldKey>>, Vec<Key<FieldKey>>) =
        fields.keys().filter_map(|k| k.ok()).partition(|k| (first..last).contains(&k.data().table));
    // Within a policy's half first, as `check` holds it: a policy over it could run, but
    // neither be applied again (a reload of its own file) nor take a set's additions.
    check_nsg_fields(compiled.field_entries(), None)?;
    check_nsg_fields(compiled.field_entries(), Some(running_entries.len()))?;
    for k in stale {
        fields.remove(&k).context("clearing the inactive policy slot")?;
    }

    // Where each rule of the running generation counts its hits, by name.
    let running_rules: HashMap<_, u32> = running
        .filter(|r| r.generation == active_config.generation && r.slot == active_slot)
        .map(|r| {
            r.tables
                .iter()
                .enumerate()
                .flat_map(|(t, rules)| {
                    let table_id = active_slot * TABLES_PER_SLOT + t as u32;
                    rules
                        .iter()
                        .enumerate()
                        .map(move |(bit, n)| (n.id(), table_id * MAX_RULES + bit as u32))
                })
                .collect()
        })
        .unwrap_or_default();

    let mut rule_counts = [0u32; TABLES_PER_SLOT as usize];
    let mut wildcard_fields = 0;
    let mut moved = Vec::new();
    for (t, table) in compiled.tables.iter().enumerate() {
        let table_id = slot * TABLES_PER_SLOT + t as u32;
        rule_counts[t] = table.rules.len() as u32;
        let wildcards = table.wildcard_fields();
        for field in 0..8 {
            if wildcards & (1 << field) != 0 {
                wildcard_fields |= wildcard_bit(t as u32, field);
            }
        }
        for ((field, value, len), bitmap) in &table.fields {
            let key = FieldKey {
                table: table_id as u8,
                field: *field,
                _pad: [0; 2],
                value: words(value),
            };
            fields
                .insert(&Key::new(KEY_HEADER_BITS + u32::from(*len), key), bitmap, 0)
                .context("writing NSG field entries (is the table full?)")?;
        }
        for (bit, r) in table.rules.iter().enumerate() {
            let index = table_id * MAX_RULES + bit as u32;
            rules.set(index, access_code(r.rule.access), 0)?;
            let old = running_rules.get(&RuleName::of(r).id()).copied();
            moved.extend(old.map(|old| (old, index)));
            hits.set(index, carried(&hits, old)?, 0)?;
            if let Some(traffic) = &mut traffic {
                traffic.set(index, carried(traffic, old)?, 0)?;
            }
        }
    }

    let generation = active_config.generation + 1;
    // From the first range stamped with `generation` until `switch`: a failed prepare, or
    // one never switched on, leaves no ranges or scopes of it.
    let unswitched = Unswitched { pins, slot: Some(slot) };
    let classes = write_classes(pins, compiled, slot, generation)?;
    write_rule_moves(pins, active_slot, &moved)?;

    let s = |secs: u32| u64::from(secs) * 1_000_000_000;
    let config = PolicyConfig {
        generation,
        rule_counts,
        flags: if settings.reevaluate_flows { FLAG_REEVALUATE } else { 0 }
            | if settings.midstream_pickup { FLAG_MIDSTREAM } else { 0 }
            | lookups.flags()
            | classes,
        wildcard_fields,
        tcp_timeout_ns: s(settings.tcp_idle_timeout),
        udp_timeout_ns: s(settings.udp_idle_timeout),
        icmp_timeout_ns: s(settings.icmp_idle_timeout),
        embryonic_timeout_ns: s(settings.embryonic_timeout),
    };
    write_scopes(pins, compiled, slot, generation)?;
    configs.set(slot, config, 0)?;
    Ok(Prepared { running: (active_slot, active_config.generation), slot, generation, unswitched })
}

/// Writes the `TableScope`s of `compiled`'s tables into `slot`, for `generation`: written
/// before the slot's configuration takes that generation, so no packet meets a scope of
/// another policy (one of another generation skips nothing). Nothing to write where the
/// dataplane was loaded by a build from before scopes.
pub fn write_scopes(pins: &PinDir, compiled: &Compiled, slot: u32, generation: u64) -> Result<()> {
    let Ok(map) = pins.open_map(NSG_SCOPES) else { return Ok(()) };
    let mut scopes: Array<_, TableScope> = map.try_into()?;
    for t in 0..TABLES_PER_SLOT {
        let scope = compiled.scope(t, generation);
        scopes.set(slot * TABLES_PER_SLOT + t, scope, 0).context("writing NSG_SCOPES")?;
    }
    Ok(())
}

/// The prepared slot's scopes and IPv4 ranges, made of no generation again (scopes then skip
/// nothing, ranges are not searched) unless the slot was switched on: a writer from before
/// them that prepares the slot next takes the same generation number, and would run its
/// tables under this policy's scopes and ranges.
struct Unswitched<'a> {
    pins: &'a PinDir,
    /// `None` once switched on.
    slot: Option<u32>,
}

impl Drop for Unswitched<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot else { return };
        let Ok(map) = self.pins.open_map(NSG_SCOPES) else { return };
        let Ok(mut scopes) = Array::<_, TableScope>::try_from(map) else { return };
        for t in 0..TABLES_PER_SLOT {
            let _ = scopes.set(slot * TABLES_PER_SLOT + t, TableScope::default(), 0);
        }
        let Ok(map) = self.pins.open_map(NSG_ADDR4_RANGES) else { return };
        let Ok(ranges) = Array::<_, Addr4Ranges>::try_from(map) else { return };
        let _ = unstamp_ranges(&ranges, slot);
    }
}

/// Switches the prepared slot on (one 4-byte write: a packet sees the whole old policy or
/// the whole new one), unless the dataplane changed since `prepare` read it: a
/// compare-and-swap on the generation, against writers that ignore the lock.
pub fn switch(pins: &PinDir, prepared: &mut Prepared) -> Result<()> {
    let (slot, config) = active(pins)?;
    if (slot, config.generation) != prepared.running {
        bail!(
            "another writer changed the dataplane during this apply (generation {} in slot {}, \
             was {} in slot {}); nothing was switched",
            config.generation,
            slot,
            prepared.running.1,
            prepared.running.0
        );
    }
    let mut slot_map: Array<_, u32> = pins.open_map(ACTIVE_SLOT)?.try_into()?;
    slot_map.set(0, prepared.slot, 0)?;
    prepared.unswitched.slot = None;
    Ok(())
}

/// Writes and switches on the NSG tables alone, without a record (benchmarks). Returns the
/// new generation.
pub fn apply(pins: &PinDir, compiled: &Compiled, settings: &Settings) -> Result<u64> {
    let _lock = WriteLock::acquire(pins)?;
    let mut prepared = prepare(pins, compiled, settings, Lookups::installed(pins)?, None)?;
    switch(pins, &mut prepared)?;
    Ok(prepared.generation)
}

/// The record of the running generation: `None` before the first apply, or when the
/// record is gone (the state directory was removed).
pub fn running(pins: &PinDir) -> Result<Option<Record>> {
    let (_, config) = active(pins)?;
    state::record(pins, config.generation)
}

/// [`running`], or why there is none: no policy applied yet, or the record of the one in
/// force gone with the state directory (its run-time changes with it), which a reload or
/// an apply of the policy writes again.
pub fn running_record(pins: &PinDir) -> Result<Record> {
    let (_, config) = active(pins)?;
    if config.generation == 0 {
        bail!("no policy applied to {} yet", pins.path().display());
    }
    state::record(pins, config.generation)?.ok_or_else(|| {
        // With an agent, only its reload: it refuses an apply beside it.
        let fix = match state::agent_pid(pins) {
            Some(pid) => format!("reload the agent (kill -HUP {pid})"),
            None => "apply the policy again".to_owned(),
        };
        anyhow!(
            "generation {} is in force at {}, but its record is gone from {} (the state \
             directory was removed?): {fix}",
            config.generation,
            pins.path().display(),
            state::dir(pins).display()
        )
    })
}

/// The running generation's record: its path and policy source. `None` before the first
/// apply, or when the record is gone (the state directory was removed).
pub fn applied_source(pins: &PinDir) -> Option<(PathBuf, String)> {
    let (_, config) = active(pins).ok()?;
    let record = state::record(pins, config.generation).ok()??;
    Some((state::path_of(pins, config.generation), record.source))
}
