//! Compiles a validated policy into the dataplane's NSG tables (see `xdpgate_common::nsg`).
//!
//! A table holds the rules of one direction of one layer, numbered in priority order. For
//! each field, every prefix that some rule names becomes an LPM entry whose bitmap is the
//! union of the rules naming that prefix or any prefix covering it; the kernel's longest
//! match then yields exactly the rules that match the value. The local address (destination
//! inbound, source outbound) is narrowed to the prefixes the rule's NSG is associated with,
//! so rules of different NSGs can share one table.

use std::collections::HashMap;

use anyhow::{Result, bail};
use ipnet::IpNet;
use xdpgate_common::icmp_proto;
use xdpgate_common::nsg::{
    ACCESS_ALLOW, ACCESS_DENY, ADDR4_RANGES, BITMAP_WORDS, DIR_INBOUND, DIR_OUTBOUND, FIELD_DPORT,
    FIELD_DST4, FIELD_DST6, FIELD_PROTO, FIELD_SPORT, FIELD_SRC4, FIELD_SRC6, LAYER_HOST,
    LAYER_SUBNET, MAX_RULES, PORT_VALUES, PROTO_VALUES, RuleBitmap, TABLES_PER_SLOT, TableScope,
    local_fields, proto_class_value, proto_value, table_in_slot,
};

use xdpgate_common::maps::NSG_FIELD_ENTRIES;

use crate::{
    Access, Direction, Layer, Nsg, Policy, PortRange, Ports, Protocol, Rule, prefix_set::PrefixSet,
};

/// A rule as placed in a table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TableRule {
    pub nsg: String,
    pub layer: Layer,
    pub rule: Rule,
}

/// A field entry: (field, left-aligned value bytes, prefix length in bits of the value).
pub type FieldEntry = (u8, [u8; 16], u8);

#[derive(Debug, Default)]
pub struct Table {
    /// In bit order (priority order).
    pub rules: Vec<TableRule>,
    pub fields: Vec<(FieldEntry, RuleBitmap)>,
}

impl Table {
    /// The port and protocol fields in which every rule of the table is `*` (bit
    /// `1 << field`): the field holds only its `/0` entry, with every rule's bit, so a
    /// lookup of it narrows nothing and the dataplane skips it. Never an address: the
    /// dataplane always looks both up (the local one, narrowed to the NSGs' prefixes, stands
    /// in for the skipped fields' bitmaps).
    pub fn wildcard_fields(&self) -> u8 {
        let mut all = RuleBitmap { words: [0; BITMAP_WORDS] };
        for bit in 0..self.rules.len() {
            all.words[bit / 64] |= 1 << (bit % 64);
        }
        let mut mask = 0;
        for field in [FIELD_SPORT, FIELD_DPORT, FIELD_PROTO] {
            let mut entries = self.fields.iter().filter(|((f, _, _), _)| *f == field);
            if let (Some(((_, _, 0), bitmap)), None) = (entries.next(), entries.next())
                && *bitmap == all
            {
                mask |= 1 << field;
            }
        }
        mask
    }
}

impl Table {
    /// Per family (IPv4, IPv6), the smallest prefix covering every entry of the table's
    /// local address fields `local` (`nsg::local_fields`), which compilation narrowed to its
    /// NSGs' association prefixes: outside it no rule of the table matches
    /// (`nsg::TableScope`). A family without entries gets `/0`: everything, looked up as
    /// before.
    pub fn scope(&self, local: [u8; 2]) -> [([u8; 16], u8); 2] {
        local.map(|field| {
            let mut prefixes = self.fields.iter().filter(|((f, _, _), _)| *f == field);
            let Some(((_, first, len), _)) = prefixes.next() else { return ([0; 16], 0) };
            prefixes.fold((*first, *len), |(net, len), ((_, value, l), _)| {
                let len = len.min(*l).min(common_bits(&net, value));
                (mask(net, len), len)
            })
        })
    }
}

/// How many leading bits `a` and `b` share.
fn common_bits(a: &[u8; 16], b: &[u8; 16]) -> u8 {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => i as u8 * 8 + (a[i] ^ b[i]).leading_zeros() as u8,
        None => 128,
    }
}

/// A field's classes: the values (ports, or protocols) whose rules are the same share a
/// class. The dataplane finds a value's rules with two array reads instead of a trie lookup.
#[derive(Debug, PartialEq)]
pub struct FieldClasses {
    /// The class of every value, indexed by port (then `NO_PORT` and padding:
    /// `PORT_VALUES`), or by `proto_class_value` (`PROTO_VALUES`).
    pub ids: Vec<u16>,
    /// The rules of each class, by class id.
    pub bitmaps: Vec<RuleBitmap>,
}

/// Class ids for a sequence of bitmaps, equal bitmaps sharing one; `None` past `limit`.
#[derive(Default)]
struct Interner {
    ids: HashMap<[u64; BITMAP_WORDS], u16>,
    bitmaps: Vec<RuleBitmap>,
}

impl Interner {
    fn id(&mut self, bitmap: &RuleBitmap, limit: usize) -> Option<u16> {
        if let Some(&id) = self.ids.get(&bitmap.words) {
            return Some(id);
        }
        if self.bitmaps.len() >= limit.min(usize::from(u16::MAX)) {
            return None;
        }
        let id = self.bitmaps.len() as u16;
        self.bitmaps.push(*bitmap);
        self.ids.insert(bitmap.words, id);
        Some(id)
    }
}

impl Table {
    /// The classes of `field` (`FIELD_SPORT`, `FIELD_DPORT` or `FIELD_PROTO`): for every
    /// value, exactly the rules the field's trie lookup gives it. `None` past `limit`
    /// classes.
    pub fn classes(&self, field: u8, limit: usize) -> Option<FieldClasses> {
        if field == FIELD_PROTO {
            self.proto_classes(limit)
        } else {
            self.port_classes(field, limit)
        }
    }

    /// Every `proto_class_value`'s rules: the longest of the field's entries matching the
    /// value `[proto, family]` (closed over covering prefixes, as the trie holds them).
    fn proto_classes(&self, limit: usize) -> Option<FieldClasses> {
        let trie = self.trie(FIELD_PROTO);
        let mut interner = Interner::default();
        let mut ids = vec![0; PROTO_VALUES as usize];
        for family in [4, 6] {
            for proto in 0..=u8::MAX {
                let mut value = [0; 16];
                value[..2].copy_from_slice(&proto_value(family, proto));
                ids[proto_class_value(family, proto) as usize] =
                    interner.id(&trie.longest(value, 16), limit)?;
            }
        }
        Some(FieldClasses { ids, bitmaps: interner.bitmaps })
    }

    /// A port field's classes: for every port, the rules whose ranges hold it, or whose
    /// ports are `*` (what the trie's longest match gives a port); for `NO_PORT`, the rules
    /// whose ports are `*` (a written full range needs a port).
    fn port_classes(&self, field: u8, limit: usize) -> Option<FieldClasses> {
        // Where each rule's ranges start and end (one past), swept in port order; a count
        // per rule, in case two of its ranges overlap.
        let mut edges: Vec<(u32, bool, usize)> = Vec::new();
        for (bit, r) in self.rules.iter().enumerate() {
            let ports =
                if field == FIELD_SPORT { &r.rule.source_ports } else { &r.rule.destination_ports };
            let full = [PortRange { lo: 0, hi: u16::MAX }];
            for range in ports.as_deref().unwrap_or(&full) {
                edges.push((u32::from(range.lo), true, bit));
                edges.push((u32::from(range.hi) + 1, false, bit));
            }
        }
        edges.sort_unstable();
        let mut counts = vec![0u32; self.rules.len()];
        let mut current = RuleBitmap { words: [0; BITMAP_WORDS] };
        let mut interner = Interner::default();
        let mut ids = Vec::with_capacity(1 << 16);
        let mut next = edges.iter().peekable();
        let mut id = 0;
        for port in 0..1u32 << 16 {
            let mut changed = port == 0;
            while let Some(&&(at, start, bit)) = next.peek() {
                if at != port {
                    break;
                }
                next.next();
                changed = true;
                if start {
                    counts[bit] += 1;
                } else {
                    counts[bit] -= 1;
                }
                let word = &mut current.words[bit / 64];
                if counts[bit] > 0 {
                    *word |= 1 << (bit % 64);
                } else {
                    *word &= !(1 << (bit % 64));
                }
            }
            if changed {
                id = interner.id(&current, limit)?;
            }
            ids.push(id);
        }
        let mut any = RuleBitmap { words: [0; BITMAP_WORDS] };
        for (bit, r) in self.rules.iter().enumerate() {
            let ports =
                if field == FIELD_SPORT { &r.rule.source_ports } else { &r.rule.destination_ports };
            if ports.is_none() {
                set_bit(&mut any, bit);
            }
        }
        let id = interner.id(&any, limit)?;
        ids.resize(PORT_VALUES as usize, id);
        Some(FieldClasses { ids, bitmaps: interner.bitmaps })
    }
}

/// An IPv4 address field as ranges with their classes (see `xdpgate_common::nsg::Addr4Ranges`): range `i`
/// starts at `starts[i]` (host order, the first at 0) and has the rules of class
/// `classes.ids[i]`; two neighbours never share a class.
#[derive(Debug, PartialEq)]
pub struct Addr4Classes {
    pub starts: Vec<u32>,
    pub classes: FieldClasses,
}

impl Table {
    /// The ranges of `field` (`FIELD_SRC4` or `FIELD_DST4`): every address gets exactly
    /// the rules the field's trie lookup gives it (none where the trie has no entry).
    /// `None` past `limit` classes or `ADDR4_RANGES` ranges.
    pub fn addr4_ranges(&self, field: u8, limit: usize) -> Option<Addr4Classes> {
        let trie = self.trie(field);
        // The longest prefix holding an address changes only where one starts or ends.
        let mut edges = vec![0u32];
        for &(net, len) in trie.0.keys() {
            let net = u32::from_be_bytes([net[0], net[1], net[2], net[3]]);
            edges.push(net);
            edges.extend(u32::try_from(u64::from(net) + (1u64 << (32 - len))).ok());
        }
        edges.sort_unstable();
        edges.dedup();
        let mut interner = Interner::default();
        let (mut starts, mut ids) = (Vec::new(), Vec::new());
        for at in edges {
            let mut value = [0; 16];
            value[..4].copy_from_slice(&at.to_be_bytes());
            let id = interner.id(&trie.longest(value, 32), limit)?;
            if ids.last() != Some(&id) {
                if starts.len() == ADDR4_RANGES {
                    return None;
                }
                starts.push(at);
                ids.push(id);
            }
        }
        Some(Addr4Classes { starts, classes: FieldClasses { ids, bitmaps: interner.bitmaps } })
    }
}

/// One field's entries as the kernel's LPM trie holds them: (value, prefix length) to rules.
struct FieldTrie<'a>(HashMap<([u8; 16], u8), &'a RuleBitmap>);

impl FieldTrie<'_> {
    /// The trie's answer for `value`'s first `bits`: the rules of the longest entry covering
    /// it (each entry already holds its covering entries' rules), none if no entry does.
    fn longest(&self, value: [u8; 16], bits: u8) -> RuleBitmap {
        (0..=bits)
            .rev()
            .find_map(|len| self.0.get(&(mask(value, len), len)).copied().copied())
            .unwrap_or(RuleBitmap { words: [0; BITMAP_WORDS] })
    }
}

impl Table {
    /// The entries of `field`, to be looked up as the kernel does.
    fn trie(&self, field: u8) -> FieldTrie<'_> {
        FieldTrie(
            self.fields
                .iter()
                .filter(|((f, _, _), _)| *f == field)
                .map(|((_, value, len), bitmap)| ((*value, *len), bitmap))
                .collect(),
        )
    }
}

#[derive(Debug)]
pub struct Compiled {
    /// Indexed by `table_in_slot(dir, layer)`.
    pub tables: Vec<Table>,
}

impl Compiled {
    /// The scope of the table at `table_in_slot`, for `generation`.
    pub fn scope(&self, table_in_slot: u32, generation: u64) -> TableScope {
        let [v4, v6] = self.tables[table_in_slot as usize].scope(local_fields(table_in_slot));
        TableScope::new(generation, v4, v6)
    }

    /// Entries the policy needs in `NSG_FIELDS`.
    pub fn field_entries(&self) -> usize {
        self.tables.iter().map(|t| t.fields.len()).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Capacity. `xdpgate check` and `apply` use these same numbers.
//
// `NSG_FIELDS` is one LPM trie for both policy slots: a new policy is written into the idle
// slot while the running one stays in the other. A policy can therefore always be applied
// over, and be replaced by, any other only if it takes at most half the trie; that is what
// `check` requires. `apply` knows what the running policy uses and checks exactly.
// Per-slot tables (rules per table) and the load-balancer tables, which are replaced in
// place, are checked against their full size (`compile`, `lb::compile`).

/// `NSG_FIELDS` entries a policy may use so that it can replace, and be replaced by, any
/// other policy that also passes `check`.
pub const NSG_FIELDS_PER_POLICY: usize = NSG_FIELD_ENTRIES as usize / 2;

/// Whether `entries` new entries fit in `NSG_FIELDS` beside `running` entries of the active
/// slot; `None`: whatever policy runs (worst case: one that passed `check`).
pub fn check_nsg_fields(entries: usize, running: Option<usize>) -> Result<()> {
    let total = NSG_FIELD_ENTRIES as usize;
    match running {
        None if entries > NSG_FIELDS_PER_POLICY => bail!(
            "the policy needs {entries} NSG field entries; the table holds {total} for both \
             policy slots, so a policy may use at most {NSG_FIELDS_PER_POLICY} (half: the \
             running policy stays in the other slot while a new one is written)"
        ),
        Some(running) if entries + running > total => bail!(
            "the policy needs {entries} NSG field entries but only {} are free: the table \
             holds {total} for both policy slots and the running policy uses {running}; \
             nothing was changed",
            total.saturating_sub(running)
        ),
        _ => Ok(()),
    }
}

fn too_many_entries() -> String {
    format!(
        "the policy needs more than the {NSG_FIELD_ENTRIES} NSG field entries the table holds \
         for both policy slots, so a policy may use at most {NSG_FIELDS_PER_POLICY}"
    )
}

/// Whether a compiled policy fits every dataplane table whatever policy runs before or
/// after it: what `xdpgate check` requires.
pub fn check_capacity(policy: &Policy, compiled: &Compiled) -> Result<()> {
    let mut problems = Vec::new();
    if let Err(e) = check_nsg_fields(compiled.field_entries(), None) {
        problems.push(e.to_string());
    }
    problems.extend(crate::nat::problems(policy));
    if !problems.is_empty() {
        bail!("the policy does not fit the dataplane's tables:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

pub fn dir_index(d: Direction) -> u32 {
    match d {
        Direction::Inbound => DIR_INBOUND,
        Direction::Outbound => DIR_OUTBOUND,
    }
}

pub fn layer_index(l: Layer) -> u32 {
    match l {
        Layer::Subnet => LAYER_SUBNET,
        Layer::Host => LAYER_HOST,
    }
}

pub fn access_code(a: Access) -> u32 {
    match a {
        Access::Allow => ACCESS_ALLOW,
        Access::Deny => ACCESS_DENY,
    }
}

pub fn compile(policy: &Policy) -> Result<Compiled> {
    let mut tables: Vec<Table> = (0..TABLES_PER_SLOT).map(|_| Table::default()).collect();
    // Entries past the whole trie can never be applied: stop there rather than build them
    // (each takes a 512-byte bitmap; one rule of millions of prefixes took gigabytes).
    let mut room = NSG_FIELD_ENTRIES as usize;
    for dir in [Direction::Inbound, Direction::Outbound] {
        for layer in [Layer::Subnet, Layer::Host] {
            let t = &mut tables[table_in_slot(dir_index(dir), layer_index(layer)) as usize];
            *t = compile_table(policy, dir, layer, room)?;
            room = room.saturating_sub(t.fields.len());
        }
    }
    Ok(Compiled { tables })
}

/// `room`: the NSG field entries left for this table and the rest (an error past it).
fn compile_table(policy: &Policy, dir: Direction, layer: Layer, room: usize) -> Result<Table> {
    // Rules of every NSG associated at this layer, by priority (NSGs never overlap, so the
    // order between NSGs does not matter; ties go by NSG order to stay deterministic).
    let mut rules: Vec<(&Nsg, &Rule)> = policy
        .nsgs
        .iter()
        .filter(|n| !n.associated(layer).is_empty())
        .flat_map(|n| n.rules.iter().filter(|r| r.direction == dir).map(move |r| (n, r)))
        .collect();
    rules.sort_by_key(|(_, r)| r.priority);
    if rules.len() > MAX_RULES as usize {
        bail!("{dir:?} {layer:?}-layer rules: {} exceed the table size {MAX_RULES}", rules.len());
    }

    // Each NSG's subnets or hosts, which its rules' local side is narrowed to, and where each
    // rule's runs of them start and end: every member's entry gets the bits of the runs it
    // is in in one walk at the end, not entry by entry per rule and member (3,990 rules over
    // 60,000 subnets took 37-68 s that way).
    let mut associated: HashMap<&str, (PrefixSet, Vec<RunEdge>)> = HashMap::new();
    for (nsg, _) in &rules {
        associated
            .entry(&nsg.name)
            .or_insert_with(|| (PrefixSet::new(nsg.associated(layer)), Vec::new()));
    }
    let (local_v4, local_v6) = match dir {
        Direction::Inbound => (FIELD_DST4, FIELD_DST6),
        Direction::Outbound => (FIELD_SRC4, FIELD_SRC6),
    };
    let mut fields: HashMap<FieldEntry, RuleBitmap> = HashMap::new();
    let add = |fields: &mut HashMap<FieldEntry, RuleBitmap>, e: FieldEntry, bits: &RuleBitmap| {
        let b = fields.entry(e).or_insert(RuleBitmap { words: [0; BITMAP_WORDS] });
        for (a, w) in b.words.iter_mut().zip(bits.words) {
            *a |= w;
        }
        if fields.len() > room { Err(anyhow::anyhow!(too_many_entries())) } else { Ok(()) }
    };
    for (bit, (nsg, rule)) in rules.iter().enumerate() {
        let (local, edges) = associated.get_mut(nsg.name.as_str()).expect("every rule's NSG");
        let (remote, local_side, remote_fields) = match dir {
            Direction::Inbound => (&rule.source, &rule.destination, (FIELD_SRC4, FIELD_SRC6)),
            Direction::Outbound => (&rule.destination, &rule.source, (FIELD_DST4, FIELD_DST6)),
        };
        let mut entries: Vec<FieldEntry> =
            remote.iter().map(|n| addr_entry(n, remote_fields.0, remote_fields.1)).collect();
        let narrowed = local.narrowed(local_side);
        for run in narrowed.runs {
            edges.push(RunEdge { at: run.start, starts: true, bit });
            edges.push(RunEdge { at: run.end, starts: false, bit });
        }
        entries.extend(narrowed.inside.iter().map(|n| addr_entry(n, local_v4, local_v6)));
        entries.extend(port_entries(FIELD_SPORT, &rule.source_ports));
        entries.extend(port_entries(FIELD_DPORT, &rule.destination_ports));
        entries.extend(proto_entries(rule.protocol));
        let mut bits = RuleBitmap { words: [0; BITMAP_WORDS] };
        set_bit(&mut bits, bit);
        for e in entries {
            add(&mut fields, e, &bits)?;
        }
    }
    for (local, edges) in associated.values_mut() {
        // By member, a run's end before another's start there.
        edges.sort_unstable_by_key(|e| (e.at, e.starts));
        let mut active = RuleBitmap { words: [0; BITMAP_WORDS] };
        let mut edges = edges.iter().peekable();
        for (i, n) in local.members().iter().enumerate() {
            while let Some(e) = edges.next_if(|e| e.at == i) {
                if e.starts { set_bit(&mut active, e.bit) } else { clear_bit(&mut active, e.bit) }
            }
            if active.words.iter().any(|&w| w != 0) {
                add(&mut fields, addr_entry(n, local_v4, local_v6), &active)?;
            }
        }
    }
    close_over_covering_prefixes(&mut fields);
    if fields.len() > room {
        bail!(too_many_entries());
    }

    let mut fields: Vec<_> = fields.into_iter().collect();
    fields.sort_by_key(|(e, _)| *e);
    Ok(Table {
        rules: rules
            .into_iter()
            .map(|(n, r)| TableRule { nsg: n.name.clone(), layer, rule: r.clone() })
            .collect(),
        fields,
    })
}

/// Where a rule's run of an NSG's members ([`PrefixSet::narrowed`]) starts or ends (the
/// member after its last).
struct RunEdge {
    at: usize,
    starts: bool,
    bit: usize,
}

fn set_bit(b: &mut RuleBitmap, bit: usize) {
    b.words[bit / 64] |= 1 << (bit % 64);
}

fn clear_bit(b: &mut RuleBitmap, bit: usize) {
    b.words[bit / 64] &= !(1 << (bit % 64));
}

/// Every entry also gets the rules of each shorter entry of its field that covers it, so the
/// longest match alone answers "which rules match".
fn close_over_covering_prefixes(fields: &mut HashMap<FieldEntry, RuleBitmap>) {
    let keys: Vec<FieldEntry> = fields.keys().copied().collect();
    for &(field, value, len) in &keys {
        let mut acc = fields[&(field, value, len)];
        for shorter in 0..len {
            if let Some(b) = fields.get(&(field, mask(value, shorter), shorter)) {
                for (a, w) in acc.words.iter_mut().zip(b.words) {
                    *a |= w;
                }
            }
        }
        fields.insert((field, value, len), acc);
    }
}

pub use xdpgate_common::nsg::mask;

fn addr_entry(net: &IpNet, f4: u8, f6: u8) -> FieldEntry {
    let mut v = [0u8; 16];
    match net {
        IpNet::V4(n) => {
            v[..4].copy_from_slice(&n.network().octets());
            (f4, v, n.prefix_len())
        }
        IpNet::V6(n) => (f6, n.network().octets(), n.prefix_len()),
    }
}

/// The protocol field's entries (values `[proto, family]`, see `proto_value`): an 8-bit
/// `[proto]` for a protocol of either family, `[1, 4]` and `[58, 6]` for ICMP, /0 for any.
fn proto_entries(protocol: Protocol) -> Vec<FieldEntry> {
    let entry = |value: [u8; 2], len| {
        let mut v = [0; 16];
        v[..2].copy_from_slice(&value);
        (FIELD_PROTO, v, len)
    };
    match (protocol, protocol.number()) {
        (_, Some(n)) => vec![entry([n, 0], 8)],
        (Protocol::Icmp, None) => {
            [4, 6].map(|family| entry(proto_value(family, icmp_proto(family)), 16)).into()
        }
        _ => vec![(FIELD_PROTO, [0; 16], 0)],
    }
}

fn port_entries(field: u8, ports: &Ports) -> Vec<FieldEntry> {
    let Some(ranges) = ports else { return vec![(field, [0; 16], 0)] };
    ranges
        .iter()
        .flat_map(|r| range_prefixes(*r))
        // A written range covering every port still needs a port: its /0 would also be the
        // entry packets without ports (ICMP, ESP, ...) look up, which only "*" may match.
        .flat_map(
            |(port, len)| if len == 0 { vec![(0, 1), (0x8000, 1)] } else { vec![(port, len)] },
        )
        .map(|(port, len)| {
            let mut v = [0u8; 16];
            v[..2].copy_from_slice(&port.to_be_bytes());
            (field, v, len)
        })
        .collect()
}

/// The fewest aligned 16-bit prefixes covering exactly `lo..=hi`.
pub fn range_prefixes(r: PortRange) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(r.lo), u32::from(r.hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 { 1 << 16 } else { 1 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

/// Prefixes of `a` narrowed to those of `b`: nested prefixes intersect as the longer one.
/// Sorted, each once.
pub fn intersect(a: &[IpNet], b: &[IpNet]) -> Vec<IpNet> {
    PrefixSet::new(b).narrow(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xdpgate_common::nsg::NO_PORT;

    #[test]
    fn port_ranges_split_into_aligned_prefixes() {
        let r = |lo, hi| range_prefixes(PortRange { lo, hi });
        assert_eq!(r(0, 65535), vec![(0, 0)]);
        assert_eq!(r(80, 80), vec![(80, 16)]);
        assert_eq!(r(8000, 8080), vec![(8000, 10), (8064, 12), (8080, 16)]);
        // Every port of a range is covered exactly once, and nothing outside it.
        for (lo, hi) in [(1, 1023), (1024, 65535), (8000, 8080), (5, 6), (65535, 65535)] {
            let prefixes = r(lo, hi);
            for p in 0..=65535u32 {
                let hits = prefixes
                    .iter()
                    .filter(|(v, len)| {
                        let m =
                            if *len == 0 { 0 } else { u32::MAX << (32 - u32::from(*len)) >> 16 };
                        p & m == u32::from(*v) & m
                    })
                    .count();
                assert_eq!(
                    hits,
                    usize::from((lo..=hi).contains(&(p as u16))),
                    "port {p} in {lo}-{hi}"
                );
            }
        }
    }

    #[test]
    fn a_full_port_range_is_not_a_wildcard() {
        let full = port_entries(FIELD_DPORT, &Some(vec![PortRange { lo: 0, hi: 65535 }]));
        assert!(full.iter().all(|(_, _, len)| *len > 0), "{full:?}");
        assert_eq!(full.len(), 2);
        assert_eq!(port_entries(FIELD_DPORT, &None), vec![(FIELD_DPORT, [0; 16], 0)]);
    }

    /// A policy needing more field entries than the whole trie holds stops compiling there,
    /// with the capacity error, rather than building them all (seen failing: compiled every
    /// entry, a 512-byte bitmap each, and only `check_capacity` refused it after).
    #[test]
    fn compiling_stops_past_the_trie() {
        let ranges: Vec<String> = (1..=1_200)
            .map(|n| format!("\"{n:x}::1-{n:x}:ffff:ffff:ffff:ffff:ffff:ffff:fffe\""))
            .collect();
        let src = format!(
            "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
             subnets: [198.51.100.0/24]\n    rules:\n      - {{name: a, priority: 100, \
             direction: inbound, access: deny, protocol: tcp, source: [{}], destination: \"*\"}}\n",
            ranges.join(", ")
        );
        let policy = crate::load_str(&src, "t.yaml").unwrap();
        let err = compile(&policy).map(|c| c.field_entries()).unwrap_err().to_string();
        assert_eq!(err, too_many_entries());
    }

    /// A rule's bit reaches its subnets' entries through the one walk per table at the end,
    /// whatever its local side says: `*`, `VirtualNetwork` or a prefix covering the subnets
    /// give the tables of the same rules naming every subnet, and so do two NSGs where only
    /// one is `*`.
    #[test]
    fn rules_to_every_subnet_compile_as_rules_naming_each() {
        let doc = |web: &str, db: &str| {
            r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/26, 198.51.100.64/26, 2001:db8:1::/80]
    rules:
      - {name: a, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: 203.0.113.0/24, destination: WEB, destination_ports: [443]}
      - {name: b, priority: 110, direction: outbound, access: deny, protocol: udp,
         source: WEB, destination: 192.0.2.0/24}
      - {name: c, priority: 120, direction: inbound, access: deny, protocol: tcp,
         source: "*", destination: [198.51.100.70]}
  - name: db
    subnets: [198.51.100.128/25]
    rules:
      - {name: d, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: 198.51.100.0/26, destination: DB}
"#
            .replace("WEB", web)
            .replace("DB", db)
        };
        let tables = |src: &str| -> Vec<Vec<(FieldEntry, RuleBitmap)>> {
            let policy = crate::load_str(src, "t.yaml").unwrap_or_else(|e| panic!("{e}\n{src}"));
            compile(&policy).unwrap().tables.into_iter().map(|t| t.fields).collect()
        };
        let named = tables(&doc(
            "[198.51.100.0/26, 198.51.100.64/26, \"2001:db8:1::/80\"]",
            "[198.51.100.128/25]",
        ));
        assert_eq!(tables(&doc("\"*\"", "\"*\"")), named);
        assert_eq!(tables(&doc("\"*\"", "[198.51.100.128/25]")), named);
        // Sides that cover every subnet without `*` take the same way.
        assert_eq!(tables(&doc("VirtualNetwork", "VirtualNetwork")), named);
        assert_eq!(tables(&doc("[198.51.100.0/25, \"2001:db8:1::/64\"]", "\"*\"")), named);
    }

    #[test]
    fn wildcard_fields_are_those_every_rule_leaves_open() {
        let src = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: a, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: "*", destination: "*", destination_ports: [80]}
      - {name: b, priority: 110, direction: inbound, access: deny, protocol: "*",
         source: 203.0.113.0/24, destination: "*", destination_ports: "*"}
"#;
        let policy = crate::load_str(src, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        let inbound = &compiled.tables[table_in_slot(DIR_INBOUND, LAYER_SUBNET) as usize];
        // Source ports are `*` in every rule, the defaults' included; destination ports and
        // protocols are not (rule a names them). Addresses are never skipped.
        assert_eq!(inbound.wildcard_fields(), 1 << FIELD_SPORT);
        // A table without rules leaves nothing to skip: a lookup of its fields finds no
        // entry, and no rule matches.
        assert_eq!(Table::default().wildcard_fields() & (1 << FIELD_DST4), 0);
    }

    #[test]
    fn a_tables_scope_covers_its_nsgs_local_prefixes() {
        let src = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/48]
nsgs:
  - name: a
    subnets: [198.51.100.0/26, 2001:db8:1:1::/64]
    hosts: [198.51.100.200]
    rules: []
  - name: b
    subnets: [198.51.100.64/27]
    rules: []
"#;
        let policy = crate::load_str(src, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        let table = |dir, layer| &compiled.tables[table_in_slot(dir, layer) as usize];
        let v4 = |a: [u8; 4], len| {
            let mut v = [0u8; 16];
            v[..4].copy_from_slice(&a);
            (v, len)
        };
        let v6: ([u8; 16], u8) =
            ("2001:db8:1:1::".parse::<std::net::Ipv6Addr>().unwrap().octets(), 64);
        // The two subnets' common prefix (/25), inbound (destinations) and outbound
        // (sources) alike; only one NSG has an IPv6 subnet.
        for dir in [DIR_INBOUND, DIR_OUTBOUND] {
            let local = local_fields(table_in_slot(dir, LAYER_SUBNET));
            let subnet = table(dir, LAYER_SUBNET).scope(local);
            assert_eq!(subnet, [v4([198, 51, 100, 0], 25), v6]);
            // The host layer: its one host, and no IPv6 host at all (every address).
            let host = table(dir, LAYER_HOST).scope(local_fields(table_in_slot(dir, LAYER_HOST)));
            assert_eq!(host, [v4([198, 51, 100, 200], 32), ([0; 16], 0)]);
        }
    }

    /// Any set of local-address entries: its scope holds the first and the last address of
    /// every entry, and no address differing from all of them in a bit before the scope's
    /// length.
    #[test]
    fn a_scope_holds_every_address_of_every_entry() {
        use xdpgate_common::{nsg::TableScope, words};
        let mut next = {
            let mut rng = crate::test_rng(0x2545_f491_4f6c_dd1d);
            move || rng(u64::MAX)
        };
        for round in 0..2_000 {
            let mut table = Table::default();
            let (shared, fam6) = (next() as u8 % 129, round % 2 == 1);
            let base: [u8; 16] = core::array::from_fn(|_| next() as u8);
            for _ in 0..1 + next() % 6 {
                let bits = if fam6 { 128 } else { 32 };
                let len = (next() % (bits + 1)) as u8;
                // Entries near each other: `base`'s first `shared` bits, then any.
                let near = mask([0xff; 16], shared);
                let mut value: [u8; 16] =
                    core::array::from_fn(|i| base[i] & near[i] | next() as u8 & !near[i]);
                if !fam6 {
                    value[4..].fill(0);
                }
                let field = if fam6 { FIELD_DST6 } else { FIELD_DST4 };
                table.fields.push((
                    (field, mask(value, len), len),
                    RuleBitmap { words: [0; BITMAP_WORDS] },
                ));
            }
            let [v4, v6] = table.scope([FIELD_DST4, FIELD_DST6]);
            let scope = TableScope::new(7, v4, v6);
            let family = if fam6 { 6 } else { 4 };
            for ((_, value, len), _) in &table.fields {
                let mut last = *value;
                let host = mask([0xff; 16], *len);
                for i in 0..if fam6 { 16 } else { 4 } {
                    last[i] |= !host[i];
                }
                for a in [value, &last] {
                    assert!(
                        scope.holds(7, family, &words(a)),
                        "{round}: {a:?} of {:?}",
                        table.fields
                    );
                }
            }
            // Flipping a bit within the scope's length leaves it.
            let (net, len) = if fam6 { v6 } else { v4 };
            if len > 0 {
                let bit = (next() % u64::from(len)) as usize;
                let mut out = net;
                out[bit / 8] ^= 0x80 >> (bit % 8);
                assert!(!scope.holds(7, family, &words(&out)), "{round}: {out:?}");
            }
        }
    }

    /// The longest of a table's entries for `field` that covers `value`'s first `bits`.
    /// A linear scan of the table's entries, apart from `FieldTrie`'s map (the same
    /// longest-match rule, written again as the oracle the compiler is checked against).
    fn trie_answer(table: &Table, field: u8, value: [u8; 16], bits: u8) -> RuleBitmap {
        (0..=bits)
            .rev()
            .find_map(|len| {
                table.fields.iter().find(|(e, _)| *e == (field, mask(value, len), len)).map(|e| e.1)
            })
            .unwrap_or(RuleBitmap { words: [0; BITMAP_WORDS] })
    }

    #[test]
    fn classes_give_every_value_the_tries_rules() {
        let src = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: a, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: "*", destination: "*", destination_ports: [80, 8000-8080, 0-65535]}
      - {name: b, priority: 110, direction: inbound, access: deny, protocol: udp,
         source: "*", source_ports: [1-1023], destination: "*", destination_ports: [53]}
      - {name: c, priority: 120, direction: inbound, access: allow, protocol: icmp,
         source: "*", destination: "*", destination_ports: "*"}
      - {name: d, priority: 130, direction: inbound, access: deny, protocol: "*",
         source: "*", destination: "*", destination_ports: [8080-9000, 65535]}
"#;
        let policy = crate::load_str(src, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        let table = &compiled.tables[table_in_slot(DIR_INBOUND, LAYER_SUBNET) as usize];
        for field in [FIELD_SPORT, FIELD_DPORT] {
            let classes = table.classes(field, 4096).unwrap();
            assert_eq!(classes.ids.len(), PORT_VALUES as usize);
            for port in 0..=u16::MAX {
                let mut value = [0; 16];
                value[..2].copy_from_slice(&port.to_be_bytes());
                let want = trie_answer(table, field, value, 16);
                let got = classes.bitmaps[usize::from(classes.ids[usize::from(port)])];
                assert_eq!(got, want, "field {field} port {port}");
            }
            // A packet without ports: the field's /0 entry, the rules whose ports are `*`.
            let got = classes.bitmaps[usize::from(classes.ids[NO_PORT as usize])];
            assert_eq!(got, trie_answer(table, field, [0; 16], 0), "field {field} without ports");
        }
        let classes = table.classes(FIELD_PROTO, 4096).unwrap();
        for family in [4, 6] {
            for proto in 0..=u8::MAX {
                let mut value = [0; 16];
                value[..2].copy_from_slice(&proto_value(family, proto));
                let want = trie_answer(table, FIELD_PROTO, value, 16);
                let got = classes.bitmaps
                    [usize::from(classes.ids[proto_class_value(family, proto) as usize])];
                assert_eq!(got, want, "protocol {proto} of IPv{family}");
            }
        }
        // Past the limit, no classes.
        assert!(table.classes(FIELD_DPORT, 2).is_none());
    }

    #[test]
    fn address_ranges_give_every_address_the_tries_rules() {
        // Nested, adjacent and overlapping prefixes, the ends of the address space, and a
        // local field narrowed to the subnets (no entry outside them).
        let src = r#"
virtual_network:
  address_space: [198.51.100.0/24, 203.0.113.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/25, 203.0.113.0/24]
    rules:
      - {name: a, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: [192.0.2.0/24, 192.0.2.128/25, 0.0.0.0/8], destination: "*",
         destination_ports: [80]}
      - {name: b, priority: 110, direction: inbound, access: deny, protocol: "*",
         source: [192.0.2.64/26, 192.0.3.0/24, 255.255.255.255], destination: 198.51.100.7,
         destination_ports: "*"}
      - {name: c, priority: 120, direction: inbound, access: allow, protocol: udp,
         source: "*", destination: [198.51.100.0/26, 203.0.113.128/25],
         destination_ports: [53]}
      - {name: d, priority: 130, direction: inbound, access: deny, protocol: "*",
         source: [192.0.2.65, 10.0.0.0/8], destination: "*", destination_ports: "*"}
"#;
        let policy = crate::load_str(src, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        let table = &compiled.tables[table_in_slot(DIR_INBOUND, LAYER_SUBNET) as usize];
        for field in [FIELD_SRC4, FIELD_DST4] {
            let ranges = table.addr4_ranges(field, 4096).unwrap();
            assert_eq!(ranges.starts[0], 0);
            assert!(ranges.starts.windows(2).all(|w| w[0] < w[1]), "{:?}", ranges.starts);
            assert!(ranges.classes.ids.windows(2).all(|w| w[0] != w[1]));
            let class_of = |addr: u32| {
                let i = ranges.starts.partition_point(|&s| s <= addr) - 1;
                ranges.classes.bitmaps[usize::from(ranges.classes.ids[i])]
            };
            let mut addrs = vec![0, u32::MAX, 0xc000_0241, 0xc633_6407, 0x0a01_0203];
            for &s in &ranges.starts {
                addrs.extend([s, s.wrapping_sub(1), s.wrapping_add(1)]);
            }
            for addr in addrs {
                let mut value = [0; 16];
                value[..4].copy_from_slice(&addr.to_be_bytes());
                let want = trie_answer(table, field, value, 32);
                assert_eq!(class_of(addr), want, "field {field} address {addr:#x}");
            }
            // Past the limit, no ranges.
            assert!(table.addr4_ranges(field, 1).is_none());
        }

        // Past `ADDR4_RANGES`, none either.
        let hosts = |n: u32| {
            let list: Vec<String> =
                (0..n).map(|i| format!("10.{}.{}.1", i / 256, i % 256)).collect();
            let src = format!(
                "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
                 subnets: [198.51.100.0/24]\n    rules:\n      - {{name: a, priority: 100, \
                 direction: inbound, access: allow, protocol: tcp, source: [{}], \
                 destination: \"*\", destination_ports: [80]}}\n",
                list.join(", ")
            );
            let compiled = compile(&crate::load_str(&src, "t.yaml").unwrap()).unwrap();
            let table = &compiled.tables[table_in_slot(DIR_INBOUND, LAYER_SUBNET) as usize];
            table.addr4_ranges(FIELD_SRC4, 4096).map(|r| r.starts.len())
        };
        // The default rules' prefixes add their own; each host more adds two.
        let one = hosts(1).unwrap();
        let most = 1 + (ADDR4_RANGES - one) as u32 / 2;
        assert_eq!(hosts(most), Some(one + 2 * (most as usize - 1)));
        assert_eq!(hosts(most + 1), None);
    }

    #[test]
    fn masks_keep_leading_bits() {
        let v = [0xff; 16];
        assert_eq!(mask(v, 0), [0; 16]);
        assert_eq!(mask(v, 12)[..3], [0xff, 0xf0, 0]);
        assert_eq!(mask(v, 128), v);
    }

    #[test]
    fn intersection_keeps_the_longer_of_nested_prefixes() {
        let p = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            intersect(&[p("0.0.0.0/0")], &[p("198.51.100.0/25")]),
            vec![p("198.51.100.0/25")]
        );
        assert_eq!(
            intersect(&[p("198.51.100.10/32")], &[p("198.51.100.0/25")]),
            vec![p("198.51.100.10/32")]
        );
        assert!(intersect(&[p("203.0.113.0/24")], &[p("198.51.100.0/25")]).is_empty());
    }

    #[test]
    fn intersection_as_every_pair_compared_gives_it() {
        // What the compiler did before it looked prefixes up (100,000 subnets took seconds).
        let by_pairs = |a: &[IpNet], b: &[IpNet]| {
            let mut out: Vec<IpNet> = (a.iter())
                .flat_map(|x| b.iter().map(move |y| (x, y)))
                .filter_map(|(x, y)| {
                    if x.contains(y) {
                        Some(*y)
                    } else if y.contains(x) {
                        Some(*x)
                    } else {
                        None
                    }
                })
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        };
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let prefixes = |next: &mut dyn FnMut(u64) -> u64| -> Vec<IpNet> {
            (0..next(8))
                .map(|_| {
                    let v4 = std::net::Ipv4Addr::from(0x0a00_0000 | (next(256) as u32) << 12);
                    let v6 = std::net::Ipv6Addr::new(0x2001, 0xdb8, next(4) as u16, 0, 0, 0, 0, 1);
                    let len = next(20) as u8;
                    if next(4) == 0 {
                        IpNet::new_assert(v6.into(), 32 + 2 * len).trunc()
                    } else {
                        IpNet::new_assert(v4.into(), 4 + len).trunc()
                    }
                })
                .collect()
        };
        for _ in 0..500 {
            let (a, b) = (prefixes(&mut next), prefixes(&mut next));
            assert_eq!(intersect(&a, &b), by_pairs(&a, &b), "{a:?} {b:?}");
        }
    }
}
