//! Compiled network-security-group tables.
//!
//! Each direction of each layer (subnet, host) of each of the two policy slots is one
//! *table*. A table's rules are numbered by priority (bit 0 = highest). For every field the
//! table holds longest-prefix-match entries whose value is the bitmap of rules matching every
//! value under that prefix; the dataplane ANDs the five field bitmaps and the lowest set bit
//! is the winning rule. One LPM map serves every field: the key starts with (table, field).

use crate::pod;

/// Rules one table holds; the width of every rule bitmap.
pub const MAX_RULES: u32 = 4096;
pub const BITMAP_WORDS: usize = (MAX_RULES / 64) as usize;

/// Two slots (active and staging) x two directions x two layers.
pub const SLOTS: u32 = 2;
pub const TABLES_PER_SLOT: u32 = 4;
pub const TABLES: u32 = SLOTS * TABLES_PER_SLOT;

pub const DIR_INBOUND: u32 = 0;
pub const DIR_OUTBOUND: u32 = 1;
pub const LAYER_SUBNET: u32 = 0;
pub const LAYER_HOST: u32 = 1;

/// Index of a table within a slot.
#[inline(always)]
pub const fn table_in_slot(dir: u32, layer: u32) -> u32 {
    dir * 2 + layer
}

#[inline(always)]
pub const fn table(slot: u32, dir: u32, layer: u32) -> u32 {
    slot * TABLES_PER_SLOT + table_in_slot(dir, layer)
}

/// Fields of the LPM key. Ports are matched as 16-bit prefixes, the protocol as the 16-bit
/// `proto_value`.
pub const FIELD_SRC4: u8 = 0;
pub const FIELD_DST4: u8 = 1;
pub const FIELD_SRC6: u8 = 2;
pub const FIELD_DST6: u8 = 3;
pub const FIELD_SPORT: u8 = 4;
pub const FIELD_DPORT: u8 = 5;
pub const FIELD_PROTO: u8 = 6;

/// The protocol field's value: the protocol number, then the address family (4 or 6). A
/// rule for a protocol of either family holds the 8-bit prefix `[proto]`; `icmp` holds
/// `[1, 4]` and `[58, 6]` (`crate::is_icmp`), so the other family's number matches only
/// `any` (the /0).
#[inline(always)]
pub const fn proto_value(family: u8, proto: u8) -> [u8; 2] {
    [proto, family]
}

/// Bits of the key before `value`: table, field and padding. A lookup with exactly this
/// prefix length finds only a field's `/0` entry: the rules that match any value, which is
/// what a packet without ports matches.
pub const KEY_HEADER_BITS: u32 = 32;

/// The data part of an LPM key (the kernel prepends `prefix_len`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FieldKey {
    pub table: u8,
    pub field: u8,
    pub _pad: [u8; 2],
    /// Network-order bytes (stored as words for alignment): an address, a big-endian port,
    /// or the `proto_value`, left-aligned.
    pub value: [u32; 4],
}

/// Rules matching a field value, bit `i` for rule `i` of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleBitmap {
    pub words: [u64; BITMAP_WORDS],
}

/// A field class's rules: the rules whose field (a port, or the protocol) matches every
/// value of the class, with a summary bit per word (bit `i`: `bitmap.words[i]` has a rule).
/// The classifier scans only the words every class it looked up has rules in: a denied
/// packet that only the table's last rule matches reads one word instead of every word.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldClass {
    pub summary: u64,
    pub bitmap: RuleBitmap,
}

/// Values of a port field in the class arrays: every port, then `NO_PORT` (and padding to
/// a whole `NSG_CLASS_IDS` entry).
pub const PORT_VALUES: u32 = 65_540;
/// The port value of a packet without ports (not TCP or UDP, or a non-first fragment): it
/// matches only rules whose ports are `*`.
pub const NO_PORT: u32 = 65_536;
/// Protocol values: the protocol number, and 256 more for IPv6's (`proto_class_value`).
pub const PROTO_VALUES: u32 = 512;
/// Class ids (`u16`) per `NSG_CLASS_IDS` entry: an array's entries take 8 bytes however
/// small the value, so four ids share one.
pub const CLASSES_PER_ENTRY: u32 = 4;
/// `NSG_CLASS_IDS` entries: the values of both port fields, then the protocol values, of
/// every table of both slots.
pub const CLASS_ID_ENTRIES: u32 = TABLES * (2 * PORT_VALUES + PROTO_VALUES) / CLASSES_PER_ENTRY;
/// Classes (distinct bitmaps) one slot holds for all its tables' fields; a table whose
/// classes do not fit is looked up in the trie as before (its `class_bit` clear).
pub const CLASSES_PER_SLOT: u32 = 4_096;

/// The protocol field's value in the class arrays: the family matters only to ICMP, but
/// the rules of a protocol number may differ by family (`proto_value`).
#[inline(always)]
pub const fn proto_class_value(family: u8, proto: u8) -> u32 {
    (if family == 6 { 256 } else { 0 }) + proto as u32
}

/// The `NSG_CLASS_IDS` entry and the id within it of `value` (a port or `NO_PORT`, or a
/// `proto_class_value`) in `field` (`FIELD_SPORT`, `FIELD_DPORT` or `FIELD_PROTO`) of
/// `table` (a global table id, slot included).
#[inline(always)]
pub const fn class_index(table: u32, field: u8, value: u32) -> (u32, u32) {
    let i = if field == FIELD_PROTO {
        TABLES * 2 * PORT_VALUES + table * PROTO_VALUES + value
    } else {
        (table * 2 + (field - FIELD_SPORT) as u32) * PORT_VALUES + value
    };
    (i / CLASSES_PER_ENTRY, i % CLASSES_PER_ENTRY)
}

/// The `PolicyConfig::flags` bit saying that the table at `table_in_slot` finds its port
/// and protocol fields through `NSG_CLASS_IDS` rather than the trie (bits 16-19). A
/// configuration written by an agent from before the arrays has none set: the trie, which
/// every apply still fills, answers.
#[inline(always)]
pub const fn class_bit(table_in_slot: u32) -> u32 {
    1 << (16 + table_in_slot)
}

/// Boundaries one table's IPv4 address field holds in `NSG_ADDR4_RANGES` (4^6: the search
/// quarters it six times, asserted in the eBPF crate). A table with more in a field (over
/// about 2,000 prefixes) is looked up in the trie.
pub const ADDR4_RANGES: usize = 4096;

/// An IPv4 address field of one table as sorted ranges: range `i` runs from `starts[i]`
/// (a host-order address) to the next start, and its addresses match the rules of class
/// `classes[i]` (an index into the slot's part of `NSG_CLASSES`, as a port's). `starts[0]`
/// is 0; after the last range, padding starts at 255.255.255.255 with the last range's
/// class. A search reads 18 entries, in six steps of three independent reads, where a
/// trie walk visits every node on the address's path.
///
/// The dataplane searches a table's ranges only while its slot's `PolicyConfig::generation`
/// is `generation`, the one of the apply that wrote them (the destination's, then the
/// source's, whose stamp it reads, before the configuration): any writer that moves the
/// generation on without writing ranges (`xdpgate set`, which rewrites only the trie; an
/// xdpgate from before the ranges) turns them off until the next apply, without knowing of
/// them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr4Ranges {
    pub generation: u64,
    pub starts: [u32; ADDR4_RANGES],
    pub classes: [u16; ADDR4_RANGES],
}

/// `NSG_ADDR4_RANGES` entries: the source and destination fields of every table of both
/// slots.
pub const ADDR4_RANGE_ENTRIES: u32 = TABLES * 2;

/// The `NSG_ADDR4_RANGES` entry of `field` (`FIELD_SRC4` or `FIELD_DST4`) of `table` (a
/// global table id, slot included).
#[inline(always)]
pub const fn addr4_index(table: u32, field: u8) -> u32 {
    table * 2 + (field - FIELD_SRC4) as u32
}

pub const ACCESS_ALLOW: u32 = 1;
pub const ACCESS_DENY: u32 = 2;

/// Per-slot settings; the `ACTIVE_SLOT` map says which slot packets use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Incremented by every apply; flows remember the generation that decided them. With
    /// `GENERATION_CHANGING` set, a set change is rewriting this slot's trie (or was killed
    /// doing so): see [`PolicyConfig::decided`].
    pub generation: u64,
    /// Rules per table of this slot (0: no NSG at that layer for that direction).
    pub rule_counts: [u32; TABLES_PER_SLOT as usize],
    /// `FLAG_*`.
    pub flags: u32,
    /// Port and protocol fields every rule of a table leaves `*`, which classification does
    /// not look up: bit `wildcard_bit(table_in_slot, field)`. Never an address field. (Was padding: 0,
    /// as an older agent leaves it, skips nothing.)
    pub wildcard_fields: u32,
    pub tcp_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    pub icmp_timeout_ns: u64,
    /// How long an embryonic (unconfirmed) flow may idle.
    pub embryonic_timeout_ns: u64,
}

/// Set in `PolicyConfig::generation` while `xdpgate set` rewrites the running slot's trie in
/// place. Flows are stamped with the generation without it, so none equals the slot's: every
/// flow is judged again on each of its packets, against the trie as it is, until the writer
/// moves the generation on. A writer killed before that leaves it set, and no flow keeps a
/// verdict from before its change (at the cost of a classification per packet) until the
/// next writer finishes the change or undoes it.
pub const GENERATION_CHANGING: u64 = 1 << 63;

impl PolicyConfig {
    /// The generation a flow decided now is stamped with, and its events named by (the
    /// records are kept under it): `generation` without `GENERATION_CHANGING`.
    #[inline(always)]
    pub const fn decided(&self) -> u64 {
        self.generation & !GENERATION_CHANGING
    }

    /// This configuration with the generation flows are decided under (`decided`).
    pub const fn as_decided(&self) -> Self {
        Self { generation: self.decided(), ..*self }
    }

    /// Whether a set change is rewriting this slot's trie, or was killed doing so.
    #[inline(always)]
    pub const fn changing(&self) -> bool {
        self.generation & GENERATION_CHANGING != 0
    }

    /// How long a flow may idle: a closed TCP connection briefly; a flow of a load-balancing
    /// rule with an idle timeout of its own (`rule_idle_s`, 0: none) that long; any other
    /// flow the policy's timeout for its protocol (ICMP's in its own family only).
    #[inline(always)]
    pub fn idle_timeout_ns(&self, family: u8, proto: u8, tcp: u8, rule_idle_s: u16) -> u64 {
        match proto {
            6 if tcp & crate::flow::TCP_CLOSED != 0 => TCP_CLOSED_TIMEOUT_NS,
            _ if rule_idle_s != 0 => u64::from(rule_idle_s) * 1_000_000_000,
            6 => self.tcp_timeout_ns,
            p if crate::is_icmp(family, p) => self.icmp_timeout_ns,
            _ => self.udp_timeout_ns,
        }
    }

    /// How long an embryonic flow's `entry` may idle: the embryonic timeout, never longer
    /// than the flow's idle timeout; a flow whose answers bypass the gateway, which stays
    /// embryonic for life, its idle timeout (its forward packets keep it), closed or not:
    /// the server's FIN is never seen, so the client's is only a half close (and the
    /// client's RST removes the flow at once); an `ASSURED` one, as established, its idle
    /// timeout.
    #[inline(always)]
    pub fn embryo_timeout_ns(&self, family: u8, proto: u8, entry: &crate::flow::FlowValue) -> u64 {
        if entry.replies_direct() {
            return self.idle_timeout_ns(family, proto, 0, entry.idle_s);
        }
        if entry.assured() {
            return self.idle_timeout_ns(family, proto, entry.tcp, entry.idle_s);
        }
        self.idle_timeout_ns(family, proto, entry.tcp, entry.idle_s).min(self.embryonic_timeout_ns)
    }
}

/// Where a table's local address field (the destination inbound, the source outbound) can
/// match at all: the smallest prefix per family covering every entry of the field, which the
/// policy compiler narrows to the prefixes the table's NSGs are associated with. A packet
/// whose local address lies outside meets no rule of the table, and the classifier skips
/// it without its trie lookup: a flow from or to outside the protected addresses (most of a
/// gateway's) is judged by the one side that has an NSG for it, without a miss on the other
/// (when the NSGs' prefixes are near enough that their covering prefix leaves it out).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableScope {
    /// The `PolicyConfig::generation` it was written for. Any other (an agent from before
    /// scopes, a slot or generation being rewritten) and the table is looked up whatever
    /// the address: a scope from another policy could skip a table that has the address.
    pub generation: u64,
    /// Per family (0: IPv4, 1: IPv6), in the addresses' own layout (network-order bytes in
    /// words): an address `a` is in scope when `a & mask == net`, word by word.
    pub net: [[u32; 4]; 2],
    pub mask: [[u32; 4]; 2],
}

impl TableScope {
    /// The scope of `generation` whose prefixes (left-aligned bytes, length in bits) are
    /// `v4` and `v6`.
    pub fn new(generation: u64, v4: ([u8; 16], u8), v6: ([u8; 16], u8)) -> Self {
        let mut scope = TableScope { generation, ..Default::default() };
        for (f, (value, len)) in [v4, v6].into_iter().enumerate() {
            scope.net[f] = crate::words(&mask(value, len));
            scope.mask[f] = crate::words(&mask([0xff; 16], len));
        }
        scope
    }

    /// Whether `addr` of `family` may match the table (see [`TableScope`]); any address
    /// when the scope is not of `generation`.
    #[inline(always)]
    pub fn holds(&self, generation: u64, family: u8, addr: &[u32; 4]) -> bool {
        let f = usize::from(family == 6);
        self.generation != generation || (0..4).all(|i| addr[i] & self.mask[f][i] == self.net[f][i])
    }
}

/// `value` with only its first `len` bits kept.
pub fn mask(mut value: [u8; 16], len: u8) -> [u8; 16] {
    for (i, byte) in value.iter_mut().enumerate() {
        let start = i as u32 * 8;
        let keep = (u32::from(len).saturating_sub(start)).min(8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    value
}

/// The local address fields (IPv4, IPv6) of the table at `table_in_slot`: the destination
/// in an inbound table, the source in an outbound one.
#[inline(always)]
pub const fn local_fields(table_in_slot: u32) -> [u8; 2] {
    if table_in_slot / 2 == DIR_INBOUND {
        [FIELD_DST4, FIELD_DST6]
    } else {
        [FIELD_SRC4, FIELD_SRC6]
    }
}

/// The bit of `PolicyConfig::wildcard_fields` for `field` of the table at `table_in_slot`.
#[inline(always)]
pub const fn wildcard_bit(table_in_slot: u32, field: u8) -> u32 {
    1 << (table_in_slot * 8 + field as u32)
}

/// Flows decided under an older generation are classified again.
pub const FLAG_REEVALUATE: u32 = 1;
/// Mid-stream pickup for every flow: a TCP segment other than a SYN with no flow is
/// classified as a new flow (conntrack's `nf_conntrack_tcp_loose`). Per load-balancing rule:
/// `lb::SVC_MIDSTREAM`.
pub const FLAG_MIDSTREAM: u32 = 2;
/// No load balancer or inbound NAT rule: a new flow looks up no frontend. The agent sets
/// it when the policy it applies has none. A skip rather than a presence flag, so that a
/// configuration written without it (by an older agent, kept across an upgrade) keeps
/// every lookup.
pub const FLAG_NO_FRONTENDS: u32 = 4;
/// No NAT gateway and no translation: a new flow looks up no translation, public address
/// or NAT subnet. Set when the policy has no gateway and no translation is left (those of a
/// removed gateway are rebuilt into flows until they idle out). A skip, as above.
pub const FLAG_NO_NAT: u32 = 8;
/// Every frontend address has its own entry (`lb::ADDRESS_PROTO`): a new flow that no
/// (address, protocol, port) entry takes looks that one up instead of the HA-ports entry.
/// A presence flag: set with the entries by the agent that writes them, so that entries
/// an older agent writes (without them) keep the older lookup.
pub const FLAG_FRONTEND_ADDRESSES: u32 = 16;
/// Idle timeout of a TCP flow after RST, or FIN both ways.
pub const TCP_CLOSED_TIMEOUT_NS: u64 = 10_000_000_000;

pod!(FieldKey, RuleBitmap, FieldClass, Addr4Ranges, PolicyConfig, TableScope);
