//! Network-security-group classification of a flow's first packet.
//!
//! Per table, five LPM lookups (source, destination, source port, destination port,
//! protocol) each return the bitmap of rules matching that field; the lowest bit set in all
//! five is the highest-priority matching rule. The cost depends on the bitmap width, not on
//! how many rules there are or how many match.

use aya_ebpf::maps::lpm_trie::Key;
use xdpgate_common::{
    flow::NO_RULE,
    nsg::{
        ACCESS_DENY, BITMAP_WORDS, DIR_INBOUND, FIELD_DPORT, FIELD_DST4, FIELD_DST6, FIELD_PROTO,
        FIELD_SPORT, FIELD_SRC4, FIELD_SRC6, FieldKey, KEY_HEADER_BITS, LAYER_HOST, LAYER_SUBNET,
        MAX_RULES, PolicyConfig, RuleBitmap, TABLES_PER_SLOT, proto_value, table_in_slot,
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
    /// The deciding rule of the last layer that had one (the denying rule when denied).
    pub rule: u32,
    /// No NSG applied at any layer.
    pub unfiltered: bool,
}

/// Evaluates every layer that has an NSG for the packet's local address: inbound subnet
/// then host, outbound host then subnet. Each must allow.
#[inline(always)]
pub fn classify(active: &Active<'_>, meta: &PacketMeta, dir: u32) -> Decision {
    let packed = classify_call(active.slot, active.config, meta, dir);
    Decision { allowed: packed & 1 != 0, unfiltered: packed & 2 != 0, rule: (packed >> 32) as u32 }
}

/// A BPF subprogram of its own (not inlined) so its stack frame is not added to each of its
/// callers' frames; the decision comes back packed in a register.
#[inline(never)]
fn classify_call(slot: u32, config: &PolicyConfig, meta: &PacketMeta, dir: u32) -> u64 {
    let d = classify_inline(&Active { slot, config }, meta, dir);
    (u64::from(d.rule) << 32) | u64::from(d.allowed) | (u64::from(d.unfiltered) << 1)
}

#[inline(always)]
fn classify_inline(active: &Active<'_>, meta: &PacketMeta, dir: u32) -> Decision {
    let (first, second) =
        if dir == DIR_INBOUND { (LAYER_SUBNET, LAYER_HOST) } else { (LAYER_HOST, LAYER_SUBNET) };
    let mut decision = Decision { allowed: true, rule: NO_RULE, unfiltered: true };
    for layer in [first, second] {
        let t = table_in_slot(dir, layer);
        let count = active.config.rule_counts[(t % TABLES_PER_SLOT) as usize];
        if count == 0 {
            continue;
        }
        let table = active.slot * TABLES_PER_SLOT + t;
        let Some(bit) = match_table(table, count, meta) else { continue };
        let rule = table * MAX_RULES + bit;
        count_hit(rule);
        decision.rule = rule;
        decision.unfiltered = false;
        if NSG_RULES.get(rule).is_some_and(|a| *a == ACCESS_DENY) {
            decision.allowed = false;
            return decision;
        }
    }
    decision
}

/// The highest-priority rule of `table` matching the packet.
#[inline(always)]
fn match_table(table: u32, count: u32, meta: &PacketMeta) -> Option<u32> {
    let (fs, fd) =
        if meta.family == 4 { (FIELD_SRC4, FIELD_DST4) } else { (FIELD_SRC6, FIELD_DST6) };
    let addr_bits = if meta.family == 4 { 32 } else { 128 };
    let src = lookup(table, fs, &meta.src, addr_bits)?;
    let dst = lookup(table, fd, &meta.dst, addr_bits)?;
    // Ports exist for TCP and UDP, except in non-first fragments; other packets match only
    // rules whose ports are `*` (a field's /0 entry).
    let port_bits = if has_ports(meta) { 16 } else { 0 };
    let sport = lookup(table, FIELD_SPORT, &port_value(meta.sport), port_bits)?;
    let dport = lookup(table, FIELD_DPORT, &port_value(meta.dport), port_bits)?;
    let [p, f] = proto_value(meta.family, meta.proto);
    let proto = lookup(table, FIELD_PROTO, &[u32::from_ne_bytes([p, f, 0, 0]), 0, 0, 0], 16)?;

    let words = count.div_ceil(64) as usize;
    for i in 0..BITMAP_WORDS {
        if i >= words {
            break;
        }
        let w = src.words[i] & dst.words[i] & sport.words[i] & dport.words[i] & proto.words[i];
        if w != 0 {
            return Some(opaque(i as u32 * 64 + w.trailing_zeros()));
        }
    }
    None
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
