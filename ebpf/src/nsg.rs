//! Network-security-group classification of a flow's first packet.
//!
//! Per table, five LPM lookups (source, destination, source port, destination port,
//! protocol) each return the bitmap of rules matching that field; the lowest bit set in all
//! five is the highest-priority matching rule. The cost depends on the bitmap width, not on
//! how many rules there are or how many match.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop, maps::lpm_trie::Key};
use xdpgate_common::{
    flow::NO_RULES,
    nsg::{
        ACCESS_DENY, BITMAP_WORDS, DIR_INBOUND, DIR_OUTBOUND, FIELD_DPORT, FIELD_DST4, FIELD_DST6,
        FIELD_PROTO, FIELD_SPORT, FIELD_SRC4, FIELD_SRC6, FieldKey, KEY_HEADER_BITS, LAYER_HOST,
        LAYER_SUBNET, MAX_RULES, PolicyConfig, RuleBitmap, TABLES_PER_SLOT, proto_value,
        table_in_slot,
    },
};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{ACTIVE_SLOT, LPM_KEY, NSG_FIELDS, NSG_HITS, NSG_RULES, OPAQUE, POLICY_CONFIG},
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
/// new-flow stage (with `match_table` and the scan below it), which the verifier caps at
/// 512 bytes.
#[inline(always)]
pub fn classify(active: &Active<'_>, meta: &PacketMeta) -> Decision {
    let mut decision = Decision { allowed: true, rules: NO_RULES, unfiltered: true };
    for (dir, layer) in LAYERS {
        let t = table_in_slot(dir, layer);
        let count = active.config.rule_counts[(t % TABLES_PER_SLOT) as usize];
        if count == 0 {
            continue;
        }
        let table = active.slot * TABLES_PER_SLOT + t;
        let wildcards = active.config.wildcard_fields >> (t % TABLES_PER_SLOT * 8) & 0xff;
        let Some(bit) = match_table(table, count, wildcards, meta) else { continue };
        let rule = table * MAX_RULES + bit;
        count_hit(rule);
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

/// The highest-priority rule of `table` matching the packet. A subprogram of its own so that
/// its frame (the scan's state) is not added to the classifier's.
///
/// `wildcards`: the port and protocol fields every rule of the table leaves `*` (bit
/// `1 << field`), not looked up: the local address's bitmap stands in for theirs (ANDing it
/// twice changes nothing).
#[inline(never)]
fn match_table(table: u32, count: u32, wildcards: u32, meta: &PacketMeta) -> Option<u32> {
    let (fs, fd) =
        if meta.family == 4 { (FIELD_SRC4, FIELD_DST4) } else { (FIELD_SRC6, FIELD_DST6) };
    let addr_bits = if meta.family == 4 { 32 } else { 128 };
    // The local address first (the destination in inbound tables, the source in outbound
    // ones): narrowed to the prefixes of the table's NSGs, it is the field that most often
    // has no entry, and that ends the table's lookups at the first.
    let inbound = table % TABLES_PER_SLOT / 2 == DIR_INBOUND;
    let (local, remote) = if inbound {
        let dst = lookup(table, fd, &meta.dst, addr_bits)?;
        (dst, lookup(table, fs, &meta.src, addr_bits)?)
    } else {
        let src = lookup(table, fs, &meta.src, addr_bits)?;
        (src, lookup(table, fd, &meta.dst, addr_bits)?)
    };
    let wild = |field: u8| wildcards & (1 << field) != 0;
    // Ports exist for TCP and UDP, except in non-first fragments; other packets match only
    // rules whose ports are `*` (a field's /0 entry).
    let port_bits = if has_ports(meta) { 16 } else { 0 };
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

    let words = count.div_ceil(64).min(BITMAP_WORDS as u32);
    let mut scan = Scan { maps: [local, remote, sport, dport, proto], words, found: NOT_FOUND };
    // bpf_loop: the verifier checks the scan's body once, not once per word (64) at every
    // layer of every call site, which is what the program's complexity limit allows.
    unsafe {
        bpf_loop(
            words.div_ceil(SCAN_STRIDE as u32),
            scan_words as *mut c_void,
            &mut scan as *mut Scan as *mut c_void,
            0,
        );
    }
    (scan.found != NOT_FOUND).then(|| opaque(scan.found))
}

const NOT_FOUND: u32 = u32::MAX;

/// Words of the bitmaps one `bpf_loop` iteration scans: an iteration (an indirect call)
/// cost about as much as the five loads of a word, and a rule matched only by the table's
/// last rule (a denied packet) walks every word.
const SCAN_STRIDE: usize = 8;

/// The five field bitmaps of a table lookup, the words in use, and the first rule set in all
/// of them.
#[repr(C)]
struct Scan {
    maps: [&'static RuleBitmap; 5],
    words: u32,
    found: u32,
}

/// `SCAN_STRIDE` words of the bitmap scan (a `bpf_loop` body): stops at the first word with
/// a rule set in all five bitmaps.
extern "C" fn scan_words(index: u64, ctx: *mut c_void) -> i64 {
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    let [a, b, c, d, e] = scan.maps;
    let words = (scan.words as usize).min(BITMAP_WORDS);
    let base = index as usize * SCAN_STRIDE;
    for j in 0..SCAN_STRIDE {
        let i = base + j;
        if i >= words {
            return 1;
        }
        let w = a.words[i] & b.words[i] & c.words[i] & d.words[i] & e.words[i];
        if w != 0 {
            scan.found = i as u32 * 64 + w.trailing_zeros();
            return 1;
        }
    }
    0
}

/// Hides a value from the verifier's range tracking (a volatile round trip through a
/// per-CPU map). Each iteration of the bitmap scan returns a different known rule number, and
/// the verifier would explore the rest of the program once per number.
#[inline(always)]
fn opaque(v: u32) -> u32 {
    match OPAQUE.get_ptr_mut(0) {
        Some(p) => unsafe {
            core::ptr::write_volatile(p, v);
            core::ptr::read_volatile(p)
        },
        None => v,
    }
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
    // the callers' frames.
    let key = unsafe { &mut *LPM_KEY.get_ptr_mut(0)? };
    *key = Key::new(
        KEY_HEADER_BITS + bits,
        FieldKey { table: table as u8, field, _pad: [0; 2], value: *value },
    );
    NSG_FIELDS.get(&*key)
}

#[inline(always)]
fn count_hit(rule: u32) {
    if let Some(c) = NSG_HITS.get_ptr_mut(rule) {
        unsafe { *c += 1 };
    }
}
