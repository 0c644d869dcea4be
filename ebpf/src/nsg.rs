//! Network-security-group classification of a flow's first packet.
//!
//! Per table, five LPM lookups (source, destination, source port, destination port,
//! protocol) each return the bitmap of rules matching that field; the lowest bit set in all
//! five is the highest-priority matching rule. The cost depends on the bitmap width, not on
//! how many rules there are or how many match.

use aya_ebpf::maps::lpm_trie::Key;
use xdpgate_common::{
    flow::NO_RULES,
    nsg::{
        ACCESS_DENY, ADDR4_RANGES, Addr4Ranges, BITMAP_WORDS, CLASSES_PER_SLOT, DIR_INBOUND,
        DIR_OUTBOUND, FIELD_DPORT, FIELD_DST4, FIELD_DST6, FIELD_PROTO, FIELD_SPORT, FIELD_SRC4,
        FIELD_SRC6, FieldClass, FieldKey, KEY_HEADER_BITS, LAYER_HOST, LAYER_SUBNET, MAX_RULES,
        NO_PORT, PolicyConfig, RuleBitmap, TABLES_PER_SLOT, addr4_index, class_bit, class_index,
        proto_class_value, proto_value, table_in_slot,
    },
};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{
        ACTIVE_SLOT, LPM_KEY, NSG_ADDR4_RANGES, NSG_CLASS_IDS, NSG_CLASSES, NSG_FIELDS, NSG_HITS,
        NSG_RULES, NSG_SCOPES, POLICY_CONFIG,
    },
    parse::{FRAG_LATER, PacketMeta},
};

/// The policy packets use right now.
pub struct Active<'a> {
    pub slot: u32,
    pub config: &'a PolicyConfig,
}

#[inline(always)]
pub fn active() -> Option<Active<'static>> {
    let slot = *ACTIVE_SLOT.get(0)? & 1;
    let config = POLICY_CONFIG.get(slot)?;
    Some(Active { slot, config })
}

pub struct Decision {
    pub allowed: bool,
    /// The deciding rule of each side, indexed by `DIR_*` (see `FlowValue::rules`): of the
    /// last layer of that side that had one, or the denying rule.
    pub rules: [u16; 2],
    /// No NSG applied at any layer.
    pub unfiltered: bool,
}

/// The layers every new flow passes, in Azure's order: the source's outbound layers (host,
/// then subnet), then the destination's inbound layers (subnet, then host). Each table is
/// narrowed to the addresses its NSGs are associated with, so only the layers that have an
/// NSG for the source (outbound) or the destination (inbound) filter: a flow between two
/// protected subnets (east-west) passes both sides, one from or to outside only one. Each
/// must allow.
const LAYERS: [(u32, u32); 4] = [
    (DIR_OUTBOUND, LAYER_HOST),
    (DIR_OUTBOUND, LAYER_SUBNET),
    (DIR_INBOUND, LAYER_SUBNET),
    (DIR_INBOUND, LAYER_HOST),
];

/// Inlined into its callers: a frame of its own would add to the chain of frames under the
/// new-flow stage (with `xdpgate_match_table` below it), which the verifier caps at 512
/// bytes.
#[inline(always)]
pub fn classify(active: &Active<'_>, meta: &PacketMeta, count_hits: bool) -> Decision {
    let mut decision = Decision { allowed: true, rules: NO_RULES, unfiltered: true };
    for (dir, layer) in LAYERS {
        let t = table_in_slot(dir, layer);
        let count = active.config.rule_counts[(t % TABLES_PER_SLOT) as usize];
        if count == 0 {
            continue;
        }
        let table = active.slot * TABLES_PER_SLOT + t;
        let local = if dir == DIR_INBOUND { &meta.dst } else { &meta.src };
        if !NSG_SCOPES
            .get(table)
            .is_none_or(|s| s.holds(active.config.generation, meta.family, local))
        {
            continue;
        }
        let t_in = t % TABLES_PER_SLOT;
        // One argument for all three (a subprogram takes five): the wildcard fields in the
        // low byte, and whether the table has its port and protocol classes (`class_bit`)
        // and whether its IPv4 address ranges are current.
        let fields = active.config.wildcard_fields >> (t_in * 8) & 0xff
            | if active.config.flags & class_bit(t_in) != 0 { CLASSES } else { 0 }
            | if meta.family == 4 && ranges_current(table, active.config.generation) {
                ADDR4
            } else {
                0
            };
        let Ok(bit) = u32::try_from(xdpgate_match_table(table, count, fields, meta)) else {
            continue;
        };
        let rule = table * MAX_RULES + bit;
        if count_hits {
            count_hit(rule);
        }
        // Two branches, not an index: the compiler would turn an indexed store into pointer
        // arithmetic the verifier refuses on the stack.
        if dir == DIR_INBOUND {
            decision.rules[DIR_INBOUND as usize] = rule as u16;
        } else {
            decision.rules[DIR_OUTBOUND as usize] = rule as u16;
        }
        decision.unfiltered = false;
        if NSG_RULES.get(rule).is_some_and(|a| *a == ACCESS_DENY) {
            decision.allowed = false;
            return decision;
        }
    }
    decision
}

/// The highest-priority rule of `table` matching the packet, or -1.
///
/// A global function (exported, so its BTF linkage is global): the verifier checks it once
/// per program, with its arguments unknown, not once per call site and per path into each
/// (a static subprogram's lot). The new-flow stages call it from three classifications of
/// four layers; checked per call, they took 965,000 of the 1,000,000 instructions the
/// verifier allows, and a kernel update took the egress one past it. Its arguments are
/// what a global function may take: scalars, and `meta` as a pointer the verifier only
/// knows as possibly null.
///
/// `fields`: the port and protocol fields every rule of the table leaves `*` (bit
/// `1 << field`), not looked up: the local address's bitmap stands in for theirs (ANDing it
/// twice changes nothing); and `CLASSES`: the ports and the protocol are found through
/// the table's class arrays instead of the trie (wildcards or not); `ADDR4`: IPv4
/// addresses are found in the table's ranges.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdpgate_match_table(
    table: u32,
    count: u32,
    fields: u32,
    meta: *const PacketMeta,
) -> i64 {
    match unsafe { meta.as_ref() }.and_then(|meta| match_table_of(table, count, fields, meta)) {
        Some(bit) => i64::from(bit),
        None => -1,
    }
}

#[inline(always)]
fn match_table_of(table: u32, count: u32, fields: u32, meta: &PacketMeta) -> Option<u32> {
    let (fs, fd) =
        if meta.family == 4 { (FIELD_SRC4, FIELD_DST4) } else { (FIELD_SRC6, FIELD_DST6) };
    let addr_bits = if meta.family == 4 { 32 } else { 128 };
    let ranges = meta.family == 4 && fields & ADDR4 != 0;
    // The local address first (the destination in inbound tables, the source in outbound
    // ones): narrowed to the prefixes of the table's NSGs, it is the field that most often
    // has no rule, and that ends the table's lookups at the first.
    let inbound = table % TABLES_PER_SLOT / 2 == DIR_INBOUND;
    let ((lf, lv), (rf, rv)) = if inbound {
        ((fd, &meta.dst), (fs, &meta.src))
    } else {
        ((fs, &meta.src), (fd, &meta.dst))
    };
    // A local address whose class has no rule ends the table at the first search, as a
    // missing trie entry does.
    let (local, remote, addr_words) = if ranges {
        let local = addr4_class(table, lf, lv)?;
        if local.summary == 0 {
            return None;
        }
        let remote = addr4_class(table, rf, rv)?;
        (&local.bitmap, &remote.bitmap, local.summary & remote.summary)
    } else {
        (lookup(table, lf, lv, addr_bits)?, lookup(table, rf, rv, addr_bits)?, u64::MAX)
    };
    let words = count.div_ceil(64).min(BITMAP_WORDS as u32);
    // The words the scan reads: those of the rules in use where both addresses have rules.
    let in_use = (if words >= 64 { u64::MAX } else { (1u64 << words) - 1 }) & addr_words;
    // Ports exist for TCP and UDP, except in non-first fragments; other packets match only
    // rules whose ports are `*` (a field's /0 entry, or the `NO_PORT` class).
    let ports = has_ports(meta);
    let (sport, dport, proto, todo) = if fields & CLASSES != 0 {
        // Two array reads per field instead of a trie lookup, and each class's summary
        // narrows the words to scan to those where it has rules.
        let (sp, dp) =
            if ports { (u32::from(meta.sport), u32::from(meta.dport)) } else { (NO_PORT, NO_PORT) };
        let s = class(table, FIELD_SPORT, sp)?;
        let d = class(table, FIELD_DPORT, dp)?;
        let p = class(table, FIELD_PROTO, proto_class_value(meta.family, meta.proto))?;
        (&s.bitmap, &d.bitmap, &p.bitmap, in_use & s.summary & d.summary & p.summary)
    } else {
        let wild = |field: u8| fields & (1 << field) != 0;
        let port_bits = if ports { 16 } else { 0 };
        let sport = if wild(FIELD_SPORT) {
            local
        } else {
            lookup(table, FIELD_SPORT, &port_value(meta.sport), port_bits)?
        };
        let dport = if wild(FIELD_DPORT) {
            local
        } else {
            lookup(table, FIELD_DPORT, &port_value(meta.dport), port_bits)?
        };
        let [p, f] = proto_value(meta.family, meta.proto);
        let proto = if wild(FIELD_PROTO) {
            local
        } else {
            lookup(table, FIELD_PROTO, &[u32::from_ne_bytes([p, f, 0, 0]), 0, 0, 0], 16)?
        };
        (sport, dport, proto, in_use)
    };

    scan(&[local, remote, sport, dport, proto], todo)
}

/// `xdpgate_match_table`'s `fields` bit for a table with classes.
const CLASSES: u32 = 1 << 8;
/// `xdpgate_match_table`'s `fields` bit for a table with IPv4 address ranges.
const ADDR4: u32 = 1 << 9;

/// Whether `table`'s IPv4 ranges were written for `generation` (see `Addr4Ranges`: the
/// apply writes the source's last, so its stamp stands for both).
#[inline(always)]
fn ranges_current(table: u32, generation: u64) -> bool {
    NSG_ADDR4_RANGES.get(addr4_index(table, FIELD_SRC4)).is_some_and(|r| r.generation == generation)
}

/// The class of IPv4 address `value` in `field` of `table`.
#[inline(always)]
fn addr4_class(table: u32, field: u8, value: &[u32; 4]) -> Option<&'static FieldClass> {
    let ranges = NSG_ADDR4_RANGES.get_ptr(addr4_index(table, field))?;
    let class = u32::try_from(xdpgate_addr4_class(ranges, u32::from_be(value[0]))).ok()?;
    NSG_CLASSES.get(table / TABLES_PER_SLOT * CLASSES_PER_SLOT + class)
}

/// The class id of IPv4 address `addr` (host order) in `ranges`, an `NSG_ADDR4_RANGES`
/// entry: that of the last range starting at or before it, found in six quarterings (three
/// independent compares a step, where halving makes twelve steps of one, each waiting for
/// the last); -1 for a null `ranges`. A global function, as `xdpgate_match_table`: checked
/// once, with its arguments unknown. Inlined, the search's index, which the verifier
/// tracks exactly, multiplied the states of the scan after it: the new-flow stages took
/// 334,000-408,000 instructions to verify (53,000 before the ranges; 98,000 with this
/// function, 125,000 since the stage does the embryonic lookup too). It is given the entry,
/// not its index: a lookup here would take stack for its key, and this frame counts in the
/// deepest chain of calls (the new-flow stage, the match, this), which fills the
/// verifier's 512 bytes (the stage 432, the match 80, this 0).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdpgate_addr4_class(ranges: *const Addr4Ranges, addr: u32) -> i64 {
    let Some(ranges) = (unsafe { ranges.as_ref() }) else { return -1 };
    // Opaque (see `opaque`): knowing `addr` below 2^32 the optimizer makes the sign test a
    // compare, which BPF makes with a branch, and the verifier would walk both ways of
    // every compare.
    let addr = opaque(u64::from(addr));
    // 1 when the start at `at` is at or before `addr`.
    let reached =
        |at: usize| 1 ^ (addr.wrapping_sub(u64::from(ranges.starts[at % ADDR4_RANGES])) >> 63);
    const _: () = assert!(ADDR4_RANGES == 1 << 12, "six quarterings");
    let mut i = 0;
    let mut step = ADDR4_RANGES / 4;
    while step > 0 {
        // Starts are sorted: how many of the three quarter marks are reached says which
        // quarter holds `addr`.
        let n = reached(i + step) + reached(i + 2 * step) + reached(i + 3 * step);
        i += step * n as usize;
        step /= 4;
    }
    i64::from(ranges.classes[i % ADDR4_RANGES])
}

/// The class of `value` in `field` of `table`, with its rules.
#[inline(always)]
fn class(table: u32, field: u8, value: u32) -> Option<&'static FieldClass> {
    let (entry, id) = class_index(table, field, value);
    let class = NSG_CLASS_IDS.get(entry)?[id as usize & 3];
    NSG_CLASSES.get(table / TABLES_PER_SLOT * CLASSES_PER_SLOT + u32::from(class))
}

/// The first rule set in all five bitmaps `[local, remote, sport, dport, proto]`, among
/// the words set in `todo` (bit `i`: word `i`).
///
/// Bounded loops, checked by the verifier once per program as part of the global function,
/// with no call at all (a `bpf_loop` callback, eight words a call, cost about 20 ns a call
/// on a VM whose kernel routes every return through AMD's return-stack mitigation).
/// The remote address and the destination port come first: they are what tells a table's
/// rules apart (the local address is narrowed to the table's NSGs, the source port and the
/// protocol are mostly `*`), so most words end at two loads.
#[inline(always)]
fn scan(maps: &[&RuleBitmap; 5], todo: u64) -> Option<u32> {
    let [local, remote, sport, dport, proto] = *maps;
    // Eight words a trip, by a counter the verifier sees bounded: eight words `todo`
    // leaves out cost one trip (the class summaries often leave all but the last out).
    const _: () = assert!(BITMAP_WORDS % 8 == 0 && BITMAP_WORDS <= 64, "todo has a bit a word");
    let mut base = 0;
    while base < BITMAP_WORDS {
        let left = todo >> base;
        if left == 0 {
            return None;
        }
        let byte = left & 0xff;
        if byte != 0 {
            for j in 0..8 {
                if byte & (1 << j) == 0 {
                    continue;
                }
                let i = base + j;
                let w = remote.words[i] & dport.words[i];
                if w == 0 {
                    continue;
                }
                let w = w & local.words[i] & sport.words[i] & proto.words[i];
                if w != 0 {
                    return Some(i as u32 * 64 + w.trailing_zeros());
                }
            }
        }
        base += 8;
    }
    None
}

/// `x`, which the optimizer cannot see into: a move to itself in `asm!` (one instruction;
/// an empty one would leave two line-info records at one offset, which the kernel refuses).
#[inline(always)]
fn opaque(mut x: u64) -> u64 {
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack)) };
    x
}

#[inline(always)]
fn has_ports(meta: &PacketMeta) -> bool {
    (meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP) && meta.frag != FRAG_LATER
}

#[inline(always)]
fn port_value(port: u16) -> [u32; 4] {
    let [hi, lo] = port.to_be_bytes();
    [u32::from_ne_bytes([hi, lo, 0, 0]), 0, 0, 0]
}

#[inline(always)]
fn lookup(table: u32, field: u8, value: &[u32; 4], bits: u32) -> Option<&'static RuleBitmap> {
    // The key is built in per-CPU scratch: five of them on the stack would not fit beside
    // the callers' frames. Written as six words: `Key` is packed, and a write through it
    // is made one byte at a time (24 stores at every lookup).
    let key = LPM_KEY.get_ptr_mut(0)?;
    let [a, b, c, d] = *value;
    unsafe {
        *key.cast::<[u32; 6]>() =
            [KEY_HEADER_BITS + bits, u32::from_ne_bytes([table as u8, field, 0, 0]), a, b, c, d];
        NSG_FIELDS.get(&*key)
    }
}

// The word view above is the key's layout.
const _: () = assert!(size_of::<Key<FieldKey>>() == size_of::<[u32; 6]>());

/// A function of its own (a BPF-to-BPF call): the trace check inlined in each layer of the
/// unrolled loop would cost the new-flow stage stack it does not have.
#[inline(never)]
fn count_hit(rule: u32) {
    if !crate::trace::counting() {
        return;
    }
    if let Some(c) = NSG_HITS.get_ptr_mut(rule) {
        unsafe { *c += 1 };
    }
}
