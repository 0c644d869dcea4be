//! `verify-flow`: answers from the running dataplane's own tables (or a policy file compiled
//! here), with [`xdpgate_policy::evaluate::decide`] over the active slot's pinned maps.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use xdpgate_common::{
    maps::{NSG_ADDR4_RANGES, NSG_CLASS_IDS, NSG_CLASSES, NSG_FIELDS, NSG_RULES, NSG_SCOPES},
    nsg::{
        Addr4Ranges, CLASSES_PER_SLOT, FIELD_DPORT, FIELD_DST4, FIELD_PROTO, FIELD_SPORT,
        FIELD_SRC4, FieldClass, FieldKey, KEY_HEADER_BITS, MAX_RULES, NO_PORT, PolicyConfig,
        RuleBitmap, TABLES_PER_SLOT, TableScope, addr4_index, class_bit, class_index, local_fields,
        proto_class_value, table_in_slot,
    },
    words,
};
use xdpgate_policy::{
    Direction, Layer,
    compile::{self, Compiled, FieldEntry, access_code, dir_index, layer_index, mask},
    evaluate::{Decision, Hit, NsgTables, decide, name},
    names::Record,
    reference::{Packet, RuleRef},
};

use crate::{PinDir, apply, state};

/// The active slot of a running dataplane, read through its pinned maps. Lookups on the LPM
/// trie are the kernel's own longest-prefix match; nothing runs the program, so no flow is
/// created and no counter moves.
pub struct PinnedTables {
    pub slot: u32,
    pub config: PolicyConfig,
    /// The slot's generation as written, a set change's mark included (`config` has the
    /// generation flows are decided under).
    written: u64,
    fields: LpmTrie<MapData, FieldKey, RuleBitmap>,
    rules: Array<MapData, u32>,
    /// `NSG_CLASS_IDS` and `NSG_CLASSES`, where the ports and protocols of the tables whose
    /// `class_bit` is set are looked up (absent under a dataplane from before them).
    classes: Option<ClassMaps>,
    /// By table within the slot: the `NSG_ADDR4_RANGES` entries (source, destination) the
    /// kernel searches for its IPv4 addresses, if they were written for the slot's
    /// generation as it stands, a set change's mark included. Read once: an apply writes
    /// them into the slot not running. (An apply, at its start or by its guard when it
    /// fails, can also turn off the running slot's, after a writer ignoring the lock
    /// switched that slot on under the same generation; an xdpgate from before the ranges,
    /// see the README.)
    ranges: [Option<[Box<Addr4Ranges>; 2]>; TABLES_PER_SLOT as usize],
    /// `NSG_SCOPES`: a table whose scope leaves the local address out is skipped, as the
    /// kernel skips it (absent under a dataplane from before scopes).
    scopes: Option<Array<MapData, TableScope>>,
}

/// `NSG_CLASS_IDS` and `NSG_CLASSES`.
type ClassMaps = (Array<MapData, [u16; 4]>, Array<MapData, FieldClass>);

impl PinnedTables {
    pub fn open(pins: &PinDir) -> Result<Self> {
        let (slot, written) =
            apply::active_as_written(pins).context("reading the active policy slot")?;
        let mut ranges = [const { None }; TABLES_PER_SLOT as usize];
        // None pinned under a dataplane from before them.
        if let Ok(map) = pins.open_map(NSG_ADDR4_RANGES) {
            let map: Array<_, Addr4Ranges> = map.try_into()?;
            for (t, table_ranges) in ranges.iter_mut().enumerate() {
                let read = |field| -> Result<Box<Addr4Ranges>> {
                    let entry = addr4_index(slot * TABLES_PER_SLOT + t as u32, field);
                    Ok(Box::new(map.get(&entry, 0).context("reading NSG_ADDR4_RANGES")?))
                };
                // The source's stamp stands for both fields.
                let src = read(FIELD_SRC4)?;
                if src.generation == written.generation {
                    *table_ranges = Some([src, read(FIELD_DST4)?]);
                }
            }
        }
        Ok(Self {
            slot,
            config: written.as_decided(),
            written: written.generation,
            fields: pins.open_map(NSG_FIELDS)?.try_into()?,
            rules: pins.open_map(NSG_RULES)?.try_into()?,
            classes: match (pins.open_map(NSG_CLASS_IDS), pins.open_map(NSG_CLASSES)) {
                (Ok(ids), Ok(bitmaps)) => Some((ids.try_into()?, bitmaps.try_into()?)),
                _ => None,
            },
            ranges,
            scopes: pins.open_map(NSG_SCOPES).ok().map(TryInto::try_into).transpose()?,
        })
    }

    pub fn generation(&self) -> u64 {
        self.config.generation
    }

    /// Whether the kernel searches the IPv4 ranges of table `t` of this slot rather than
    /// the trie.
    pub fn ranged(&self, t: u32) -> bool {
        self.ranges[t as usize].is_some()
    }

    fn table_id(&self, t: u32) -> u32 {
        self.slot * TABLES_PER_SLOT + t
    }

    /// Where the tables of this slot differ from `compiled` (rule counts, access codes and
    /// every field entry), or `None` when they hold the same rules in the same order.
    /// Names are not in the kernel: two policies that differ only in names compare equal.
    /// The cheap checks come first; the field entries are read only when those agree.
    pub fn differs_from(&self, compiled: &Compiled) -> Result<Option<String>> {
        let tables = || {
            [Direction::Inbound, Direction::Outbound].into_iter().flat_map(|dir| {
                [Layer::Subnet, Layer::Host].map(|layer| {
                    let t = table_in_slot(dir_index(dir), layer_index(layer));
                    (t, format!("{} {} table", lower(dir), lower(layer)))
                })
            })
        };
        for (t, what) in tables() {
            let (have, want) = (self.rule_count(t)?, compiled.rule_count(t)?);
            if have != want {
                return Ok(Some(format!("its {what} has {want} rules, the kernel's {have}")));
            }
            for bit in 0..have {
                if self.access(t, bit)? != compiled.access(t, bit)? {
                    return Ok(Some(format!("rule #{bit} of its {what} differs in access")));
                }
            }
        }
        let kernel = self.field_entries()?;
        for (t, what) in tables() {
            let (have, want) = (&kernel[t as usize], &compiled.tables[t as usize].fields);
            if have.len() != want.len() {
                return Ok(Some(format!(
                    "its {what} has {} field entries, the kernel's {}",
                    want.len(),
                    have.len()
                )));
            }
            if let Some(((field, value, len), _)) =
                want.iter().find(|(e, b)| have.get(&(e.0, mask(e.1, e.2), e.2)) != Some(b))
            {
                return Ok(Some(format!(
                    "its {what} differs in the entry for field {field}, prefix {value:02x?}/{len}"
                )));
            }
            // A scope of the running generation must be the tables' (one of another skips
            // nothing).
            if let Some(scopes) = &self.scopes {
                let have = scopes.get(&self.table_id(t), 0).context("reading NSG_SCOPES")?;
                let want = compiled.scope(t, self.config.generation);
                if have.generation == want.generation && have != want {
                    return Ok(Some(format!("its {what} differs in its scope")));
                }
            }
        }
        Ok(None)
    }

    /// Every field entry of this slot's tables, by table within the slot.
    fn field_entries(&self) -> Result<Vec<HashMap<FieldEntry, RuleBitmap>>> {
        let mut out: Vec<HashMap<FieldEntry, RuleBitmap>> =
            (0..TABLES_PER_SLOT).map(|_| HashMap::new()).collect();
        let first = self.table_id(0);
        for key in self.fields.keys() {
            let key = key.context("listing NSG field entries")?;
            let data = key.data();
            let table = u32::from(data.table);
            if !(first..first + TABLES_PER_SLOT).contains(&table) {
                continue;
            }
            let len = (key.prefix_len() - KEY_HEADER_BITS) as u8;
            let mut value = [0u8; 16];
            for (chunk, w) in value.chunks_mut(4).zip(data.value) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            let bitmap = match self.fields.get(&key, 0) {
                Ok(b) => b,
                // Removed between listing and reading: only a writer of this very slot does
                // that, and the caller's generation check sees it.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("reading an NSG field entry"),
            };
            out[(table - first) as usize].insert((data.field, mask(value, len), len), bitmap);
        }
        Ok(out)
    }
}

impl NsgTables for PinnedTables {
    fn rule_count(&self, t: u32) -> Result<u32> {
        Ok(self.config.rule_counts.get(t as usize).copied().unwrap_or(0))
    }

    fn lookup(&self, t: u32, field: u8, value: [u8; 16], bits: u8) -> Result<Option<RuleBitmap>> {
        // The local address outside the table's scope: the kernel skips the table.
        if let Some(scopes) = &self.scopes
            && let Some(family) = [4, 6].into_iter().zip(local_fields(t)).find(|(_, f)| *f == field)
            && !scopes.get(&self.table_id(t), 0).context("reading NSG_SCOPES")?.holds(
                self.config.generation,
                family.0,
                &words(&value),
            )
        {
            return Ok(None);
        }
        // The class arrays the kernel reads for this table's ports and protocol, as it does.
        if let Some((ids, bitmaps)) = &self.classes
            && self.config.flags & class_bit(t) != 0
            && [FIELD_SPORT, FIELD_DPORT, FIELD_PROTO].contains(&field)
        {
            let v = match (field, bits) {
                (FIELD_PROTO, _) => proto_class_value(value[1], value[0]),
                (_, 0) => NO_PORT,
                _ => u32::from(u16::from_be_bytes([value[0], value[1]])),
            };
            let (entry, id) = class_index(self.table_id(t), field, v);
            let class = ids.get(&entry, 0).context("reading NSG_CLASS_IDS")?[id as usize];
            let index = self.slot * CLASSES_PER_SLOT + u32::from(class);
            return Ok(Some(bitmaps.get(&index, 0).context("reading NSG_CLASSES")?.bitmap));
        }
        // The ranges the kernel searches for this table's IPv4 addresses.
        if let (Some((_, bitmaps)), Some([src, dst])) = (&self.classes, &self.ranges[t as usize])
            && [FIELD_SRC4, FIELD_DST4].contains(&field)
        {
            let ranges = if field == FIELD_SRC4 { src } else { dst };
            let addr = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            let i = ranges.starts.partition_point(|&s| s <= addr) - 1;
            let index = self.slot * CLASSES_PER_SLOT + u32::from(ranges.classes[i]);
            return Ok(Some(bitmaps.get(&index, 0).context("reading NSG_CLASSES")?.bitmap));
        }
        let key =
            FieldKey { table: self.table_id(t) as u8, field, _pad: [0; 2], value: words(&value) };
        match self.fields.get(&Key::new(KEY_HEADER_BITS + u32::from(bits), key), 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("looking up NSG_FIELDS"),
        }
    }

    fn access(&self, t: u32, bit: u32) -> Result<u32> {
        let index = self.table_id(t) * MAX_RULES + bit;
        match self.rules.get(&index, 0) {
            Ok(a) => Ok(a),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e).context("reading NSG_RULES"),
        }
    }
}

fn lower(v: impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

/// Which tables answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The running dataplane's active slot.
    Kernel { generation: u64, slot: u32 },
    /// A policy file, compiled here.
    File(PathBuf),
}

/// What `verify-flow` says.
#[derive(Clone, Debug)]
pub struct Answer {
    pub source: Source,
    pub decision: Decision,
    /// Per hit, its rule's name when known.
    pub names: Vec<Option<RuleRef>>,
    /// Why rules are not named (names unknown for the kernel's generation).
    pub unnamed: Option<String>,
}

/// Rule names for the kernel's running tables: the record saved with its generation (under
/// the write lock, before the flip). Its rule counts and access codes must be the kernel's:
/// a record that does not fit the tables names nothing. This is the one place that knows
/// where names come from.
pub fn kernel_names(pins: &PinDir, kernel: &PinnedTables) -> Result<Record, String> {
    let generation = kernel.generation();
    let record =
        state::record(pins, generation).map_err(|e| format!("{e:#}"))?.ok_or_else(|| {
            format!("no record of generation {generation} under {}", state::dir(pins).display())
        })?;
    for (t, rules) in record.tables.iter().enumerate() {
        let t = t as u32;
        let have = kernel.rule_count(t).map_err(|e| format!("{e:#}"))?;
        if have as usize != rules.len() {
            return Err(format!(
                "the record of generation {generation} has {} rules in table {t}, the kernel {have}",
                rules.len()
            ));
        }
        for (bit, r) in rules.iter().enumerate() {
            if kernel.access(t, bit as u32).map_err(|e| format!("{e:#}"))? != access_code(r.access)
            {
                return Err(format!(
                    "rule {}/{} of the record of generation {generation} differs from the \
                     kernel's in access",
                    r.nsg, r.rule
                ));
            }
        }
    }
    Ok(record)
}

/// The rule behind a hit, by a generation's record.
fn recorded(record: &Record, hit: &Hit) -> Option<RuleRef> {
    let r = record.tables.get(hit.table as usize)?.get(hit.bit as usize)?;
    Some(RuleRef {
        direction: hit.direction,
        layer: hit.layer,
        nsg: r.nsg.clone(),
        rule: r.rule.clone(),
        priority: r.priority,
        access: hit.access,
    })
}

/// Times the kernel's tables are read again when a policy is applied meanwhile.
const ATTEMPTS: usize = 5;

/// Answers many flows from one reading of the policy: a file is parsed and compiled once,
/// the kernel's tables are opened and their rule names read once (again only when an apply
/// switches the generation between two answers).
pub enum Verifier<'a> {
    File { path: PathBuf, compiled: Compiled },
    // Boxed: the tables' map handles are large beside a compiled policy's vectors.
    Kernel { pins: &'a PinDir, tables: Box<PinnedTables>, names: Option<Result<Record, String>> },
}

impl<'a> Verifier<'a> {
    /// The kernel's active slot, or with `file` that policy compiled here.
    pub fn new(pins: &'a PinDir, file: Option<&Path>) -> Result<Self> {
        if let Some(file) = file {
            let (policy, _) = xdpgate_policy::load(file)?;
            let compiled = compile::compile(&policy)?;
            return Ok(Self::File { path: file.to_owned(), compiled });
        }
        let tables = PinnedTables::open(pins)?;
        if tables.generation() == 0 {
            bail!(
                "no policy applied to {} yet; name one with --policy FILE",
                pins.path().display()
            );
        }
        Ok(Self::Kernel { pins, tables: Box::new(tables), names: None })
    }

    /// Answers `pkt`.
    pub fn answer(&mut self, pkt: &Packet) -> Result<Answer> {
        let (pins, tables, names) = match self {
            Self::File { path, compiled } => {
                let decision = decide(compiled, pkt)?;
                let names = decision.decided_by.iter().map(|h| name(compiled, h)).collect();
                let source = Source::File(path.clone());
                return Ok(Answer { source, decision, names, unnamed: None });
            }
            Self::Kernel { pins, tables, names } => (*pins, tables, names),
        };
        for _ in 0..ATTEMPTS {
            let decision = decide(&**tables, pkt)?;
            if !decision.decided_by.is_empty() && names.is_none() {
                *names = Some(kernel_names(pins, tables));
            }
            // Only an apply switches slots; the slot read stays whole while it stays active,
            // so an unchanged generation means every lookup saw that generation.
            // As written: a set change's mark turns the ranges off.
            let (slot, config) = apply::active_as_written(pins)?;
            if (slot, config.generation) != (tables.slot, tables.written) {
                **tables = PinnedTables::open(pins)?;
                *names = None;
                continue;
            }
            let (names, unnamed) = match (&*names, decision.decided_by.is_empty()) {
                (_, true) | (None, _) => (Vec::new(), None),
                (Some(Ok(r)), false) => {
                    (decision.decided_by.iter().map(|h| recorded(r, h)).collect(), None)
                }
                (Some(Err(why)), false) => {
                    (vec![None; decision.decided_by.len()], Some(why.clone()))
                }
            };
            let source = Source::Kernel { generation: tables.generation(), slot: tables.slot };
            return Ok(Answer { source, decision, names, unnamed });
        }
        Err(anyhow!("the policy changed {ATTEMPTS} times while it was read; ask again"))
    }
}

/// Answers `pkt`: from the kernel's active slot, or with `file` from that policy compiled.
pub fn verify_flow(pins: &PinDir, file: Option<&Path>, pkt: &Packet) -> Result<Answer> {
    Verifier::new(pins, file)?.answer(pkt)
}
