//! Answers "would this packet be allowed, and by which rule?" the way the dataplane's
//! classifier (`ebpf/src/nsg.rs`) does: per table, a longest-prefix match per field, the AND
//! of the five bitmaps, the lowest bit; inbound subnet then host layer, outbound host then
//! subnet; a layer's rule denies when `NSG_RULES` says deny.
//!
//! [`decide`] is written once over [`NsgTables`], which both a compiled image ([`Compiled`])
//! and the kernel's pinned maps ([`PinnedTables`]) implement. So `verify-flow` answers from
//! the very tables packets use, and `--policy FILE` from the tables that file compiles to,
//! with the same code.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use xdpgate_common::{
    maps::{NSG_FIELDS, NSG_RULES},
    nsg::{
        ACCESS_DENY, BITMAP_WORDS, FIELD_DPORT, FIELD_DST4, FIELD_DST6, FIELD_PROTO, FIELD_SPORT,
        FIELD_SRC4, FIELD_SRC6, FieldKey, KEY_HEADER_BITS, MAX_RULES, PolicyConfig, RuleBitmap,
        TABLES_PER_SLOT, table_in_slot,
    },
    words,
};

use crate::{
    agent, apply,
    compile::{self, Compiled, FieldEntry, access_code, dir_index, layer_index, mask},
    dataplane::PinDir,
    policy::{
        self, Access, Direction, Layer,
        reference::{Packet, RuleRef, Verdict},
    },
};

/// The NSG tables of one policy slot, wherever they are kept. Tables are numbered within
/// the slot (`table_in_slot`).
pub trait NsgTables {
    /// Rules in table `t`; 0 when no NSG applies at that layer in that direction.
    fn rule_count(&self, t: u32) -> Result<u32>;
    /// The bitmap of the longest entry of `field` in table `t` covering the first `bits`
    /// bits of `value` (left-aligned bytes).
    fn lookup(&self, t: u32, field: u8, value: [u8; 16], bits: u8) -> Result<Option<RuleBitmap>>;
    /// The access code (`ACCESS_ALLOW`, `ACCESS_DENY`) of rule `bit` of table `t`.
    fn access(&self, t: u32, bit: u32) -> Result<u32>;
}

/// The rule that decided at one layer, as the dataplane knows it: a table and a bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub layer: Layer,
    /// Table within the slot (`table_in_slot(dir, layer)`).
    pub table: u32,
    /// Rule number in the table: its rank by priority.
    pub bit: u32,
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// One hit per layer that had a matching rule, in evaluation order; a deny ends it.
    pub decided_by: Vec<Hit>,
}

/// Decides `pkt` over `tables` exactly as the classifier does.
pub fn decide(tables: &impl NsgTables, pkt: &Packet) -> Result<Decision> {
    let dir = dir_index(pkt.direction);
    let layers = match pkt.direction {
        Direction::Inbound => [Layer::Subnet, Layer::Host],
        Direction::Outbound => [Layer::Host, Layer::Subnet],
    };
    let mut decided_by = Vec::new();
    for layer in layers {
        let t = table_in_slot(dir, layer_index(layer));
        let count = tables.rule_count(t)?;
        if count == 0 {
            continue;
        }
        let Some(bit) = match_table(tables, t, count, pkt)? else { continue };
        // As in the kernel: only an explicit deny code denies.
        let access =
            if tables.access(t, bit)? == ACCESS_DENY { Access::Deny } else { Access::Allow };
        decided_by.push(Hit { layer, table: t, bit, access });
        if access == Access::Deny {
            return Ok(Decision { allowed: false, decided_by });
        }
    }
    Ok(Decision { allowed: true, decided_by })
}

fn match_table(tables: &impl NsgTables, t: u32, count: u32, pkt: &Packet) -> Result<Option<u32>> {
    let (fs, fd, bits, src, dst) = match (pkt.src, pkt.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            (FIELD_SRC4, FIELD_DST4, 32, v4(s.octets()), v4(d.octets()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => (FIELD_SRC6, FIELD_DST6, 128, s.octets(), d.octets()),
        _ => bail!("source and destination must be of the same address family"),
    };
    // Ports count only for TCP and UDP; other packets look up a port field's /0 entry.
    let port = |p: Option<u16>| match p {
        Some(p) if pkt.proto == 6 || pkt.proto == 17 => (port_value(p), 16),
        _ => ([0; 16], 0),
    };
    let (sp, sp_bits) = port(pkt.sport);
    let (dp, dp_bits) = port(pkt.dport);
    let mut proto = [0u8; 16];
    proto[0] = pkt.proto;
    let mut maps = Vec::with_capacity(5);
    for (field, value, bits) in [
        (fs, src, bits),
        (fd, dst, bits),
        (FIELD_SPORT, sp, sp_bits),
        (FIELD_DPORT, dp, dp_bits),
        (FIELD_PROTO, proto, 8),
    ] {
        match tables.lookup(t, field, value, bits)? {
            Some(b) => maps.push(b),
            None => return Ok(None),
        }
    }
    let words = (count.div_ceil(64) as usize).min(BITMAP_WORDS);
    for i in 0..words {
        let w = maps.iter().fold(!0u64, |acc, m| acc & m.words[i]);
        if w != 0 {
            return Ok(Some(i as u32 * 64 + w.trailing_zeros()));
        }
    }
    Ok(None)
}

fn v4(o: [u8; 4]) -> [u8; 16] {
    let mut v = [0; 16];
    v[..4].copy_from_slice(&o);
    v
}

fn port_value(p: u16) -> [u8; 16] {
    let mut v = [0; 16];
    v[..2].copy_from_slice(&p.to_be_bytes());
    v
}

/// A compiled image's tables: what `apply` would write into a slot.
impl NsgTables for Compiled {
    fn rule_count(&self, t: u32) -> Result<u32> {
        Ok(self.tables.get(t as usize).map_or(0, |t| t.rules.len() as u32))
    }

    fn lookup(&self, t: u32, field: u8, value: [u8; 16], bits: u8) -> Result<Option<RuleBitmap>> {
        let Some(table) = self.tables.get(t as usize) else { return Ok(None) };
        // Entries are sorted by (field, value, length): a binary search per candidate length.
        Ok((0..=bits).rev().find_map(|len| {
            let key: FieldEntry = (field, mask(value, len), len);
            table.fields.binary_search_by(|(e, _)| e.cmp(&key)).ok().map(|i| table.fields[i].1)
        }))
    }

    fn access(&self, t: u32, bit: u32) -> Result<u32> {
        let rule = self.tables.get(t as usize).and_then(|t| t.rules.get(bit as usize));
        Ok(rule.map_or(0, |r| access_code(r.rule.access)))
    }
}

/// The active slot of a running dataplane, read through its pinned maps. Lookups on the LPM
/// trie are the kernel's own longest-prefix match; nothing runs the program, so no flow is
/// created and no counter moves.
pub struct PinnedTables {
    pub slot: u32,
    pub config: PolicyConfig,
    fields: LpmTrie<MapData, FieldKey, RuleBitmap>,
    rules: Array<MapData, u32>,
}

impl PinnedTables {
    pub fn open(pins: &PinDir) -> Result<Self> {
        let (slot, config) = apply::active(pins).context("reading the active policy slot")?;
        Ok(Self {
            slot,
            config,
            fields: pins.open_map(NSG_FIELDS)?.try_into()?,
            rules: pins.open_map(NSG_RULES)?.try_into()?,
        })
    }

    pub fn generation(&self) -> u64 {
        self.config.generation
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

/// The rule behind a hit, by the names of `names`.
pub fn name(names: &Compiled, hit: &Hit) -> Option<RuleRef> {
    let r = names.tables.get(hit.table as usize)?.rules.get(hit.bit as usize)?;
    Some(RuleRef {
        layer: hit.layer,
        nsg: r.nsg.clone(),
        rule: r.rule.name.clone(),
        priority: r.rule.priority,
        access: hit.access,
    })
}

/// Evaluates `pkt` against compiled tables, naming the deciding rules.
pub fn evaluate(compiled: &Compiled, pkt: &Packet) -> Verdict {
    let d = decide(compiled, pkt).expect("a compiled image has every table");
    Verdict {
        allowed: d.allowed,
        decided_by: d.decided_by.iter().filter_map(|h| name(compiled, h)).collect(),
    }
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

/// Rule names for the kernel's running tables: the saved policy compiled, if its tables are
/// the kernel's. This is the one place that knows where names come from.
pub fn kernel_names(pins: &PinDir, kernel: &PinnedTables) -> Result<Compiled, String> {
    let generation = kernel.generation();
    let (path, source) = apply::applied_source(pins)
        .ok_or_else(|| format!("no saved policy under {}", apply::state_dir(pins).display()))?;
    let saved = policy::load_str(&source, &path.display().to_string())
        .map_err(|e| format!("the saved policy {} is invalid: {e}", path.display()))
        .and_then(|p| compile::compile(&p).map_err(|e| format!("{e:#}")))?;
    match kernel.differs_from(&saved) {
        Ok(None) => Ok(saved),
        Ok(Some(diff)) => Err(format!(
            "the saved policy {} is not generation {generation}'s: {diff}",
            path.display()
        )),
        Err(e) => Err(format!("comparing with the saved policy: {e:#}")),
    }
}

/// Times the kernel's tables are read again when a policy is applied meanwhile.
const ATTEMPTS: usize = 5;

/// Answers `pkt`: from the kernel's active slot, or with `file` from that policy compiled.
pub fn verify_flow(pins: &PinDir, file: Option<&Path>, pkt: &Packet) -> Result<Answer> {
    if let Some(file) = file {
        let (policy, _) = agent::load(file)?;
        let compiled = compile::compile(&policy)?;
        let decision = decide(&compiled, pkt)?;
        let names = decision.decided_by.iter().map(|h| name(&compiled, h)).collect();
        return Ok(Answer {
            source: Source::File(file.to_owned()),
            decision,
            names,
            unnamed: None,
        });
    }
    for _ in 0..ATTEMPTS {
        let kernel = PinnedTables::open(pins)?;
        if kernel.generation() == 0 {
            bail!(
                "no policy applied to {} yet; name one with --policy FILE",
                pins.path().display()
            );
        }
        let decision = decide(&kernel, pkt)?;
        // Names are needed only when some rule decided (and cost a compile of the saved policy).
        let names = if decision.decided_by.is_empty() {
            Ok(None)
        } else {
            kernel_names(pins, &kernel).map(Some)
        };
        // Only an apply switches slots; the slot read stays whole while it stays active, so
        // an unchanged generation means every lookup saw that generation.
        let (slot, config) = apply::active(pins)?;
        if (slot, config.generation) != (kernel.slot, kernel.generation()) {
            continue;
        }
        let (names, unnamed) = match names {
            Ok(None) => (Vec::new(), None),
            Ok(Some(c)) => (decision.decided_by.iter().map(|h| name(&c, h)).collect(), None),
            Err(why) => (vec![None; decision.decided_by.len()], Some(why)),
        };
        let source = Source::Kernel { generation: kernel.generation(), slot: kernel.slot };
        return Ok(Answer { source, decision, names, unnamed });
    }
    Err(anyhow!("the policy changed {ATTEMPTS} times while it was read; ask again"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile::compile, policy::load_str, policy::reference};

    const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
application_security_groups:
  web: [198.51.100.10]
nsgs:
  - name: subnet
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: [Internet], destination: [web], destination_ports: [80, "8000-8080"]}
      - {name: no-ssh, priority: 110, direction: inbound, access: deny, protocol: tcp,
         source: ["*"], destination: ["*"], destination_ports: [22]}
  - name: host
    hosts: [198.51.100.10]
    rules:
      - {name: no-8080, priority: 100, direction: inbound, access: deny, protocol: tcp,
         source: ["*"], destination: ["*"], destination_ports: [8080]}
"#;

    fn pkt(
        direction: Direction,
        proto: u8,
        src: &str,
        sport: Option<u16>,
        dst: &str,
        dport: Option<u16>,
    ) -> Packet {
        Packet {
            direction,
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
        }
    }

    #[test]
    fn compiled_tables_agree_with_the_reference() {
        let policy = load_str(POLICY, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        use Direction::*;
        let cases = [
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(80)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(8080)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(8079)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.11", Some(80)),
            pkt(Inbound, 6, "198.51.100.20", Some(40000), "198.51.100.10", Some(22)),
            pkt(Inbound, 6, "198.51.100.20", Some(40000), "198.51.100.10", Some(23)),
            pkt(Inbound, 1, "203.0.113.7", None, "198.51.100.10", None),
            pkt(Outbound, 17, "198.51.100.10", Some(5000), "203.0.113.7", Some(53)),
            pkt(Outbound, 17, "198.51.100.10", Some(5000), "192.0.2.1", Some(53)),
            pkt(Inbound, 6, "2001:db8:2::7", Some(1), "2001:db8:1::10", Some(80)),
            pkt(Inbound, 6, "203.0.113.7", Some(1), "192.0.2.9", Some(80)),
        ];
        for p in &cases {
            assert_eq!(evaluate(&compiled, p), reference::evaluate(&policy, p), "{p:?}");
        }
        // And the expected answers, so agreement is not agreement on nonsense.
        let names = |p: &Packet| {
            let v = evaluate(&compiled, p);
            (v.allowed, v.decided_by.iter().map(|r| r.rule.as_str().to_owned()).collect::<Vec<_>>())
        };
        // The host NSG has no rule for port 80 but its defaults: DenyAllInBound.
        assert_eq!(names(&cases[0]), (false, vec!["web".to_owned(), "DenyAllInBound".to_owned()]));
        assert_eq!(names(&cases[1]), (false, vec!["web".to_owned(), "no-8080".to_owned()]));
        assert_eq!(names(&cases[3]), (false, vec!["DenyAllInBound".to_owned()]));
        assert_eq!(names(&cases[4]), (false, vec!["no-ssh".to_owned()]));
        assert_eq!(names(&cases[10]), (true, vec![]));
    }
}
