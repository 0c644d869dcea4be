//! `xdpgate set add|del|reset`: a named address set of the running policy changed in the
//! kernel without a re-apply. The changes are kept in `sets.json` in the state directory
//! (`xdpgate_policy::sets::SetChanges`); every load of a policy for this dataplane (apply,
//! the agent's start and reload) lays them over the file's elements.
//!
//! A change recompiles the NSG tables of the running policy with the new elements and
//! writes only the trie entries that differ from what the active slot holds (read back from
//! the kernel, so a writer killed half-way is made whole by the next one), longest prefixes
//! first and removals last (put back, newest first, when one fails); then it moves the
//! running generation on (its record copied), so flows decided before the change are
//! classified again as after an apply. While it writes, the generation is marked changing
//! (`GENERATION_CHANGING`): every flow is judged again on each packet, so a writer killed
//! before it moves the generation on leaves no flow a verdict from before its entries.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{
    Array, MapData,
    lpm_trie::{Key, LpmTrie},
};
use serde::Serialize;
use xdpgate_common::{
    maps::{NSG_FIELDS, POLICY_CONFIG},
    nsg::{
        FieldKey, GENERATION_CHANGING, KEY_HEADER_BITS, PolicyConfig, RuleBitmap, TABLES_PER_SLOT,
    },
    words,
};
use xdpgate_policy::{
    compile,
    names::{Record, RuleName},
    sets::{Element, SetChanges},
};

use crate::{
    PinDir, apply,
    state::{self, WriteLock},
};

const FILE: &str = "sets.json";

/// The run-time changes to the sets of the policy running at `pins` (none when the file is
/// absent).
pub fn changes(pins: &PinDir) -> Result<SetChanges> {
    state::read_json(pins, FILE).map_err(|e| {
        if !e.root_cause().is::<serde_json::Error>() {
            return e;
        }
        // Written whole by a rename: only a hand edit or a damaged disk breaks it.
        e.context(format!(
            "the sets' run-time changes ({}) do not read: mend the file, or remove it to go \
             back to the policy file's elements (`xdpgate set add` puts changes back)",
            state::dir(pins).join(FILE).display()
        ))
    })
}

/// Keeps `changes` as the run-time changes of the running policy's sets.
pub fn save(pins: &PinDir, changes: &SetChanges) -> Result<()> {
    state::write_json(pins, FILE, changes)
}

/// One set as it runs: the file's elements with the run-time changes.
#[derive(Debug, Serialize)]
pub struct SetReport {
    pub name: String,
    pub elements: Vec<Element>,
    /// Elements added at run time (not in the file).
    pub added: Vec<Element>,
    /// File elements removed at run time.
    pub removed: Vec<Element>,
}

/// The sets of the running policy.
pub fn list(pins: &PinDir) -> Result<Vec<SetReport>> {
    let record = apply::running_record(pins)?;
    let changes = changes(pins)?;
    let policy = load(&record, &changes)?;
    Ok(policy
        .sets
        .keys()
        .map(|name| {
            let delta = changes.0.get(name).cloned().unwrap_or_default();
            SetReport {
                name: name.clone(),
                elements: policy.set_elements(name).unwrap_or_default(),
                added: delta.added.into_iter().collect(),
                removed: delta.removed.into_iter().collect(),
            }
        })
        .collect())
}

/// What one change asks.
pub enum Change<'a> {
    Add(&'a [Element]),
    Del(&'a [Element]),
    /// Back to the file's elements.
    Reset,
}

/// What [`change`] did.
#[derive(Debug, Serialize)]
pub struct Changed {
    pub set: String,
    /// Elements asked to be added that the set held already (as written).
    pub already: Vec<Element>,
    /// Trie entries written (new or with other rules) and removed.
    pub entries_written: usize,
    pub entries_removed: usize,
    /// The generation flows now compare with (moved on by one, unless no entry changed).
    pub generation: u64,
    /// Recompiling and computing the difference, and writing it.
    pub compile: Duration,
    pub write: Duration,
}

/// Changes set `name` of the running policy in the kernel, as the dataplane's one writer.
/// A change that cannot be made (unknown set, an element it does not have, tables that do
/// not fit) changes nothing.
pub fn change(pins: &PinDir, name: &str, what: Change) -> Result<Changed> {
    let _lock = WriteLock::acquire(pins)?;
    let started = Instant::now();
    let record = apply::running_record(pins)?;
    let old = changes(pins)?;
    let mut new = old.clone();
    match what {
        Change::Add(nets) => new.add(name, nets),
        Change::Del(nets) => new.del(name, nets),
        Change::Reset => new.reset(name),
    }
    // One parse, with the changes asked for; checked before anything is written.
    let policy = load(&record, &new)?;
    let Some(file) = policy.sets.get(name) else {
        let names: Vec<&str> = policy.sets.keys().map(String::as_str).collect();
        bail!(
            "no set {name:?} in the applied policy (it has: {}); sets are declared under \
             `sets:` in the policy file",
            if names.is_empty() { "none".to_owned() } else { names.join(", ") }
        );
    };
    let already = match what {
        Change::Add(nets) => {
            let held = old.effective(name, file);
            nets.iter().filter(|n| held.contains(n)).copied().collect()
        }
        Change::Del(nets) => {
            old.check_elements(name, nets, file)?;
            Vec::new()
        }
        Change::Reset => Vec::new(),
    };
    // Only what still differs from the file is kept: an element deleted twice in one command
    // (or as X and X/32) was recorded as a removed file element the file never listed, and
    // kept that address out once the file listed it.
    let new = new.pruned(&policy.sets);
    let compiled = compile::compile(&policy)?;
    let (slot, config) = apply::active(pins)?;
    // The bits of the live tables are the record's rules: a set changes which addresses
    // match, never which rules there are or their order.
    for (t, table) in compiled.tables.iter().enumerate() {
        let names: Vec<RuleName> = table.rules.iter().map(RuleName::of).collect();
        if record.slot != slot
            || record.tables.get(t) != Some(&names)
            || config.rule_counts[t] as usize != names.len()
        {
            bail!(
                "the running tables are not those of the applied policy's record; apply it again"
            );
        }
    }
    let mut fields: LpmTrie<_, FieldKey, RuleBitmap> = pins.open_map(NSG_FIELDS)?.try_into()?;
    let first = (slot * TABLES_PER_SLOT) as u8;
    let mut live: HashMap<EntryId, RuleBitmap> = HashMap::new();
    for item in fields.iter() {
        let (key, bitmap) = item.context("reading the NSG field entries")?;
        let k = key.data();
        if (first..first + TABLES_PER_SLOT as u8).contains(&k.table) {
            live.insert((k.table, k.field, k.value, key.prefix_len()), bitmap);
        }
    }
    let mut wanted: HashMap<EntryId, RuleBitmap> = HashMap::new();
    for (t, table) in compiled.tables.iter().enumerate() {
        for ((field, value, len), bitmap) in &table.fields {
            let id = (first + t as u8, *field, words(value), KEY_HEADER_BITS + u32::from(*len));
            wanted.insert(id, *bitmap);
        }
    }
    let mut writes: Vec<(&EntryId, &RuleBitmap)> =
        wanted.iter().filter(|(id, b)| live.get(*id) != Some(*b)).collect();
    let removals: Vec<&EntryId> = live.keys().filter(|id| !wanted.contains_key(*id)).collect();
    // A policy's share of the table, as `check` and `apply` hold it to: grown past it, the
    // next apply or reload of the same file could not be written beside it. A change that
    // does not grow the policy is never refused for it (one over it, of an earlier build,
    // can still lose elements).
    if wanted.len() > live.len() {
        compile::check_nsg_fields(wanted.len(), None)
            .with_context(|| format!("set {name}: nothing was changed"))?;
    }
    // Nothing the kernel holds differs (elements it had already, or inside others): no
    // verdict can change, so no flow is judged again; only the change is kept. Unless a
    // change killed half-way left its mark, which only a new generation takes away.
    if writes.is_empty() && removals.is_empty() && !apply::changing(pins)? {
        save(pins, &new)?;
        return Ok(Changed {
            set: name.to_owned(),
            already,
            entries_written: 0,
            entries_removed: 0,
            generation: config.generation,
            compile: started.elapsed(),
            write: Duration::ZERO,
        });
    }
    // Longest prefixes first: an address inside a new prefix never meets the new shorter
    // entry while its own longer one still has the old rules.
    writes.sort_by_key(|(id, _)| std::cmp::Reverse(id.3));
    let compile_took = started.elapsed();
    let writing = Instant::now();
    // The record of the generation this change moves on to (the running one's, renumbered:
    // a set changes no rule) first, so that moving on is one map write, and its fsync does
    // not lengthen the time every flow is judged on each packet. One that cannot be saved
    // (/run full or read-only) stops the change here, before anything else is written.
    let generation = config.generation + 1;
    state::save(pins, &Record { generation, ..record.clone() })
        .with_context(|| format!("set {name}: nothing was changed"))?;
    // The running slot's scopes stop skipping (generation 0 is none's) before its trie
    // changes, so no packet meets a scope older than the entries, whenever this writer
    // dies; they skip again from the generation this change moves on to.
    apply::write_scopes(pins, &compiled, slot, 0)?;
    // From here until the generation moves on, flows are judged on each packet: one judged
    // while the entries change could otherwise keep a verdict from entries half written
    // (or put back), and a flow from before the change its old one, should this writer be
    // killed before the end.
    let changing = PolicyConfig { generation: config.generation | GENERATION_CHANGING, ..config };
    write_config(pins, slot, changing)?;
    let moved = PolicyConfig { generation, ..config };
    if let Err(f) = write_all_or_nothing(&mut fields, &live, &writes, &removals) {
        // Half changed (what it had written could not all be put back): the mark stays.
        let moved = if f.restored { moved_on(pins, &compiled, slot, moved) } else { MARKED.into() };
        return Err(f.error.context(format!("set {name}{moved}")));
    }
    let mut saved = false;
    let recorded = (|| {
        save(pins, &new)?;
        saved = true;
        apply::write_scopes(pins, &compiled, slot, generation)?;
        write_config(pins, slot, moved)
    })();
    // Recorded and moved on, or put back: a change the state directory does not hold (/run
    // full or read-only) was enforced while `set list` denied it, the flows open before it
    // were not judged again, and the next apply undid it.
    if let Err(e) = recorded {
        let restored = if saved { save(pins, &old) } else { Ok(()) };
        let (writes, removals) = undoing(&live, &writes, &removals);
        let writes: Vec<_> = writes.iter().map(|(id, b)| (*id, b)).collect();
        let undone =
            write_all_or_nothing(&mut fields, &wanted, &writes, &removals).map_err(|f| f.error);
        // Moved on only with the old entries back; else the mark stays.
        let moved =
            if undone.is_ok() { moved_on(pins, &compiled, slot, moved) } else { MARKED.into() };
        let left = match (undone, restored) {
            (Ok(()), Ok(())) => {
                "nothing was changed (the kernel's entries were put back)".to_string()
            }
            (Ok(()), Err(r)) => format!(
                "the kernel's entries were put back, but the saved run-time changes were \
                     not ({r:#}): the next apply would make the change"
            ),
            (Err(u), _) => format!("and putting the kernel's entries back failed: {u:#}"),
        };
        return Err(e.context(format!("set {name}: the change was not recorded; {left}{moved}")));
    }
    Ok(Changed {
        set: name.to_owned(),
        already,
        entries_written: writes.len(),
        entries_removed: removals.len(),
        generation,
        compile: compile_took,
        write: writing.elapsed(),
    })
}

/// What a change that keeps its mark says (`GENERATION_CHANGING`).
const MARKED: &str = "; flows are judged again on each packet until the next set change or apply";

/// A failed [`write_all_or_nothing`]: why, and whether it put back all it had done.
struct Failed {
    error: anyhow::Error,
    restored: bool,
}

/// Writes `writes`, then removes `removals`; when one fails (the table full: the kernel's
/// answer, as another writer may have filled it), puts back in reverse order what was done,
/// from `live` (the entries as they were), so a failed command leaves the tables as it found
/// them. The error says which it was.
fn write_all_or_nothing<T: std::borrow::BorrowMut<MapData>>(
    fields: &mut LpmTrie<T, FieldKey, RuleBitmap>,
    live: &HashMap<EntryId, RuleBitmap>,
    writes: &[(&EntryId, &RuleBitmap)],
    removals: &[&EntryId],
) -> Result<(), Failed> {
    let mut done: Vec<&EntryId> = Vec::new();
    let mut failed = None;
    for (id, bitmap) in writes {
        if let Err(e) = fields.insert(&entry_key(id), **bitmap, 0) {
            failed = Some(anyhow::Error::new(e).context(format!(
                "writing NSG field entry {} of {}{}",
                done.len() + 1,
                writes.len(),
                if live.contains_key(*id) { "" } else { " (a new one: is the table full?)" }
            )));
            break;
        }
        done.push(id);
    }
    if failed.is_none() {
        for id in removals {
            if let Err(e) = fields.remove(&entry_key(id)) {
                failed = Some(anyhow::Error::new(e).context("removing NSG field entries"));
                break;
            }
            done.push(id);
        }
    }
    let Some(failed) = failed else { return Ok(()) };
    // Undone newest first: the reverse of the order that keeps packets consistent.
    let mut lost = 0usize;
    for id in done.iter().rev() {
        let undone = match live.get(*id) {
            Some(bitmap) => fields.insert(&entry_key(id), *bitmap, 0),
            None => fields.remove(&entry_key(id)),
        };
        lost += usize::from(undone.is_err());
    }
    let error = if lost == 0 {
        failed.context(format!(
            "nothing was changed (the {} entries changed before it were restored)",
            done.len()
        ))
    } else {
        failed.context(format!(
            "the set is half changed: {lost} of the {} entries changed before it could not be \
             restored, so the running tables differ from both the old and the new set (the \
             next `xdpgate set` or apply rewrites what differs)",
            done.len()
        ))
    };
    Err(Failed { error, restored: lost == 0 })
}

/// What puts back the entries as `live` had them after `writes` and `removals` were made:
/// the writes and removals that undo them (longest prefixes first, as every write).
fn undoing<'a>(
    live: &HashMap<EntryId, RuleBitmap>,
    writes: &[(&'a EntryId, &RuleBitmap)],
    removals: &[&'a EntryId],
) -> (Vec<(&'a EntryId, RuleBitmap)>, Vec<&'a EntryId>) {
    let changed = writes.iter().map(|(id, _)| *id).chain(removals.iter().copied());
    let mut back: Vec<_> = changed.filter_map(|id| live.get(id).map(|b| (id, *b))).collect();
    back.sort_by_key(|(id, _)| std::cmp::Reverse(id.3));
    let added = writes.iter().map(|(id, _)| *id).filter(|id| !live.contains_key(*id)).collect();
    (back, added)
}

/// (table, field, value, prefix length in the key): one trie entry.
type EntryId = (u8, u8, [u32; 4], u32);

fn entry_key(id: &EntryId) -> Key<FieldKey> {
    Key::new(id.3, FieldKey { table: id.0, field: id.1, _pad: [0; 2], value: id.2 })
}

/// After a change that failed and was put back: the generation moved on to `moved` (its
/// record saved before the change began; the scopes made of none, skipping nothing, as
/// they may be the new entries'), so that the flows judged while the entries changed are
/// judged again. Empty when it did; else what it leaves: every flow judged on each packet
/// until the next writer.
fn moved_on(pins: &PinDir, compiled: &compile::Compiled, slot: u32, moved: PolicyConfig) -> String {
    let result =
        apply::write_scopes(pins, compiled, slot, 0).and_then(|()| write_config(pins, slot, moved));
    match result {
        Ok(()) => String::new(),
        Err(e) => format!("{MARKED} (the generation could not move on: {e:#})"),
    }
}

fn write_config(pins: &PinDir, slot: u32, config: PolicyConfig) -> Result<()> {
    let mut configs: Array<_, PolicyConfig> = pins.open_map(POLICY_CONFIG)?.try_into()?;
    Ok(configs.set(slot, config, 0)?)
}

fn load(record: &Record, changes: &SetChanges) -> Result<xdpgate_policy::Policy> {
    xdpgate_policy::load_str_with_sets(&record.source, "the applied policy", changes)
        .map_err(|e| anyhow!("the applied policy with the sets' changes does not load: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sets.json` that does not parse (a hand edit) stops every writer: the error says
    /// which file and what to do (before: only the parser's "EOF while parsing").
    #[test]
    fn a_broken_changes_file_says_how_to_go_on() {
        let pins = PinDir::new(format!("/tmp/xgtest-sets-{}", std::process::id()));
        let dir = state::ensure_dir(&pins).unwrap();
        std::fs::write(dir.join(FILE), "{\"blocklist\": {\"added\": [").unwrap();
        let error = format!("{:#}", changes(&pins).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(error.contains("sets.json") && error.contains("remove it to go back"), "{error}");
    }
}
