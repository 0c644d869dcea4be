//! Swapping a compiled policy into the running dataplane atomically: write the inactive slot
//! completely, then flip `ACTIVE_SLOT` (one 4-byte write). A packet reads the slot once and
//! sees either the whole old policy or the whole new one.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, anyhow};
use aya::maps::{
    Array, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use xdpgate_common::{
    maps::{ACTIVE_SLOT, NSG_FIELDS, NSG_HITS, NSG_RULES, POLICY_CONFIG},
    nsg::{
        FLAG_REEVALUATE, FieldKey, KEY_HEADER_BITS, MAX_RULES, PolicyConfig, RuleBitmap,
        TABLES_PER_SLOT,
    },
    words,
};

use crate::{
    compile::{Compiled, access_code, check_nsg_fields},
    dataplane::PinDir,
    policy::Settings,
};

/// What is running: the slot packets use and its settings.
pub fn active(pins: &PinDir) -> Result<(u32, PolicyConfig)> {
    let slot_map: Array<_, u32> = pins.open_map(ACTIVE_SLOT)?.try_into()?;
    let configs: Array<_, PolicyConfig> = pins.open_map(POLICY_CONFIG)?.try_into()?;
    let slot = slot_map.get(&0, 0)? & 1;
    Ok((slot, configs.get(&slot, 0)?))
}

/// Writes `compiled` into the inactive slot and makes it active. Returns the new generation.
pub fn apply(pins: &PinDir, compiled: &Compiled, settings: &Settings) -> Result<u64> {
    let (active_slot, active_config) = active(pins)?;
    let slot = 1 - active_slot;
    let mut fields: LpmTrie<_, FieldKey, RuleBitmap> = pins.open_map(NSG_FIELDS)?.try_into()?;
    let mut rules: Array<_, u32> = pins.open_map(NSG_RULES)?.try_into()?;
    let mut hits: PerCpuArray<_, u64> = pins.open_map(NSG_HITS)?.try_into()?;
    let mut configs: Array<_, PolicyConfig> = pins.open_map(POLICY_CONFIG)?.try_into()?;
    let mut slot_map: Array<_, u32> = pins.open_map(ACTIVE_SLOT)?.try_into()?;

    // What the trie holds: the running policy's entries and what an earlier policy left in
    // the inactive slot. The new policy must fit beside the running one; checked before
    // anything is written, so a policy that cannot fit changes nothing.
    let first = (slot * TABLES_PER_SLOT) as u8;
    let last = first + TABLES_PER_SLOT as u8;
    let (stale, running): (Vec<Key<FieldKey>>, Vec<Key<FieldKey>>) =
        fields.keys().filter_map(|k| k.ok()).partition(|k| (first..last).contains(&k.data().table));
    check_nsg_fields(compiled.field_entries(), Some(running.len()))?;
    for k in stale {
        fields.remove(&k).context("clearing the inactive policy slot")?;
    }

    let nr_cpus = aya::util::nr_cpus().map_err(|(m, e)| anyhow!("{m}: {e}"))?;
    let mut rule_counts = [0u32; TABLES_PER_SLOT as usize];
    for (t, table) in compiled.tables.iter().enumerate() {
        let table_id = slot * TABLES_PER_SLOT + t as u32;
        rule_counts[t] = table.rules.len() as u32;
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
            hits.set(index, PerCpuValues::try_from(vec![0u64; nr_cpus])?, 0)?;
        }
    }

    let generation = active_config.generation + 1;
    let s = |secs: u32| u64::from(secs) * 1_000_000_000;
    let config = PolicyConfig {
        generation,
        rule_counts,
        flags: if settings.reevaluate_flows { FLAG_REEVALUATE } else { 0 },
        _pad: 0,
        tcp_timeout_ns: s(settings.tcp_idle_timeout),
        udp_timeout_ns: s(settings.udp_idle_timeout),
        icmp_timeout_ns: s(settings.icmp_idle_timeout),
    };
    configs.set(slot, config, 0)?;
    // The flip: from here on, new packets use the new slot.
    slot_map.set(0, slot, 0)?;
    Ok(generation)
}

/// Where the agent keeps the source of the applied policy, so `rules`, `stats` and
/// `verify-flow` can name rules later (bpffs holds only maps and links).
pub fn state_dir(pins: &PinDir) -> PathBuf {
    let name = pins.path().to_string_lossy().trim_matches('/').replace('/', "_");
    PathBuf::from("/run/xdpgate").join(name)
}

pub fn save_applied(pins: &PinDir, source: &str) -> Result<()> {
    let dir = state_dir(pins);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(dir.join("policy.yaml"), source).context("saving the applied policy")
}

pub fn applied_source(pins: &PinDir) -> Option<(PathBuf, String)> {
    let path = state_dir(pins).join("policy.yaml");
    fs::read_to_string(&path).ok().map(|s| (path, s))
}
