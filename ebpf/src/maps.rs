//! Every map of the dataplane, in one place. Names come from `xdpgate_common::maps`; all are
//! pinned by name so a restarted agent finds the running state.

use crate::{action::Action, parse::PacketMeta};
use aya_ebpf::{
    macros::map,
    maps::lpm_trie::Key,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerfEventArray, ProgramArray,
        RingBuf,
    },
};
use xdpgate_common::{
    capture::{CaptureConfig, CaptureRecord},
    events::{Bucket, EVENT_RING_BYTES, FlowEvent, MONITOR_RING_BYTES},
    flow::{FLOW_STATS_LEN, FlowKey, FlowValue, FragKey, FragValue, NeighbourKey},
    iface::IfaceConfig,
    lb::{
        BackendInfo, FrontendKey, MAGLEV_SIZE, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, Service,
    },
    maps::{
        EGRESS_STAGES, EMBRYO_ENTRIES, FLOW_ENTRIES, FRAG_ENTRIES, IFACE_INDEX_ENTRIES, MAX_EGRESS,
        MAX_IFACES, MAX_NEIGHBOURS_WANTED, NAT_PREFIXES, NSG_FIELD_ENTRIES, PIPELINE_STAGES,
        TC_STAGES,
    },
    nat::{
        AddrKey, MAX_NAT_GATEWAYS, MAX_PUBLIC_ADDRS, NAT_ENTRIES, NatEntry, NatGatewayConfig,
        NatTraffic,
    },
    nsg::{
        ADDR4_RANGE_ENTRIES, Addr4Ranges, CLASS_ID_ENTRIES, CLASSES_PER_SLOT, FieldClass, FieldKey,
        MAX_RULES, PolicyConfig, RuleBitmap, SLOTS, TABLES, TableScope,
    },
    stats::{Counter, DROP_SLOTS, DropReason, EGRESS_VERDICTS, VERDICTS},
    trace::TraceRecord,
};

/// Interfaces xdpgate is attached to, by ifindex: counter slot and role.
#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, IfaceConfig> = HashMap::pinned(MAX_IFACES, 0);

/// `IFACES` again, as an array indexed by ifindex (below `IFACE_INDEX_ENTRIES`): no hashing
/// on every packet (see `iface_config`).
#[map(name = "IFACE_INDEX")]
pub static IFACE_INDEX: Array<IfaceConfig> = Array::pinned(IFACE_INDEX_ENTRIES, 0);

/// The registration of the interface with `ifindex` (slot 0: none), from the array where it
/// covers the ifindex, else from the hash.
#[inline(always)]
pub fn iface_config(ifindex: u32) -> Option<&'static IfaceConfig> {
    if ifindex < IFACE_INDEX_ENTRIES {
        IFACE_INDEX.get(ifindex)
    } else {
        iface_config_hashed(ifindex)
    }
}

/// Apart, so that LLVM cannot merge the two lookups into one call taking either map: the
/// verifier inlines an array lookup only at a call that always sees the same map, and the
/// merged call cost every packet an indirect call (about 10% of an established packet).
#[inline(never)]
fn iface_config_hashed(ifindex: u32) -> Option<&'static IfaceConfig> {
    unsafe { IFACES.get(ifindex) }
}

/// Packets and bytes per interface slot and verdict.
#[map(name = "IFACE_STATS")]
pub static IFACE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_IFACES * VERDICTS, 0);

/// Dropped packets per reason.
#[map(name = "DROP_STATS_V3")]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_SLOTS, 0);

/// Counts a packet dropped for `reason` (per-CPU slot: a plain add is exact).
#[inline(always)]
pub fn count_drop_reason(reason: DropReason) {
    if let Some(c) = DROP_STATS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

/// Every field of every NSG table: (table, field, value prefix) -> bitmap of matching rules.
#[map(name = "NSG_FIELDS")]
pub static NSG_FIELDS: LpmTrie<FieldKey, RuleBitmap> = LpmTrie::pinned(NSG_FIELD_ENTRIES, 0);

/// The class of every port of every port field of every NSG table (four `u16` ids an entry,
/// see `nsg::class_index`): an array index in place of a trie lookup.
#[map(name = "NSG_CLASS_IDS")]
pub static NSG_CLASS_IDS: Array<[u16; 4]> = Array::pinned(CLASS_ID_ENTRIES, 0);

/// The rules of each port class (with their word summary), `CLASSES_PER_SLOT` per slot.
#[map(name = "NSG_CLASSES")]
pub static NSG_CLASSES: Array<FieldClass> = Array::pinned(SLOTS * CLASSES_PER_SLOT, 0);

/// The IPv4 address fields of every NSG table as sorted ranges, each with its class in
/// `NSG_CLASSES` (see `nsg::addr4_index`): a search of an array in place of a trie walk.
#[map(name = "NSG_ADDR4_RANGES")]
pub static NSG_ADDR4_RANGES: Array<Addr4Ranges> = Array::pinned(ADDR4_RANGE_ENTRIES, 0);

/// Where each table's local address can match (`nsg::TableScope`), by global table id.
#[map(name = "NSG_SCOPES")]
pub static NSG_SCOPES: Array<TableScope> = Array::pinned(TABLES, 0);

/// Access of each rule, by global rule index.
#[map(name = "NSG_RULES")]
pub static NSG_RULES: Array<u32> = Array::pinned(TABLES * MAX_RULES, 0);

/// Flows decided by each rule, by global rule index.
#[map(name = "NSG_HITS")]
pub static NSG_HITS: PerCpuArray<u64> = PerCpuArray::pinned(TABLES * MAX_RULES, 0);

/// Packets and bytes of the flows each rule decided (and the packets it denied), by global
/// rule index.
#[map(name = "NSG_TRAFFIC")]
pub static NSG_TRAFFIC: PerCpuArray<Counter> = PerCpuArray::pinned(TABLES * MAX_RULES, 0);

/// Where each rule of the slot an apply retired went in the slot it switched on, by global
/// rule index (plus one; 0: the rule is gone), for flows kept without re-evaluation.
#[map(name = "NSG_RULE_MOVES")]
pub static NSG_RULE_MOVES: Array<u16> = Array::pinned(TABLES * MAX_RULES, 0);

/// The policy slot packets use; flipped by the agent after it wrote the other slot.
#[map(name = "ACTIVE_SLOT")]
pub static ACTIVE_SLOT: Array<u32> = Array::pinned(1, 0);

/// Generation, rule counts and timeouts of each slot.
#[map(name = "POLICY_CONFIG")]
pub static POLICY_CONFIG: Array<PolicyConfig> = Array::pinned(SLOTS, 0);

/// Established flows, one entry per direction. A plain hash: when full, no live flow is
/// evicted for a new one (which waits `ASSURED` in `EMBRYOS`). Sized by the loader.
#[map(name = "FLOWS_V2")]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::pinned(FLOW_ENTRIES, 0);

/// Embryonic flows, one entry per direction, until confirmed; LRU, so a flood of new flows
/// evicts only its own kind. Sized by the loader.
#[map(name = "EMBRYOS_V2")]
pub static EMBRYOS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(EMBRYO_ENTRIES, 0);

/// Embryonic flows created, confirmed, expired, refused and closed; flows rebuilt and
/// picked up (`flow::FLOW_STAT_*`).
#[map(name = "FLOW_STATS")]
pub static FLOW_STATS: PerCpuArray<u64> = PerCpuArray::pinned(FLOW_STATS_LEN, 0);

/// Datagrams whose first fragment was allowed, so their later fragments may pass.
#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(FRAG_ENTRIES, 0);

/// The parsed packet, handed from the parse stage to the policy stage on the same CPU.
/// Pinned like `PIPELINE`: the entry program attached to one interface may tail-call the
/// policy stage loaded with another, and both must use the same scratch.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<PacketMeta> = PerCpuArray::pinned(1, 0);

/// The flow's action, handed from the policy stage to the act stage on the same CPU.
#[map(name = "ACTION")]
pub static ACTION: PerCpuArray<Action> = PerCpuArray::pinned(1, 0);

/// Per-CPU room to build a new flow's two entries (see `flow::create`).
#[map(name = "FLOW_SCRATCH")]
pub static FLOW_SCRATCH: PerCpuArray<[FlowValue; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for the packet as classification sees it (see `flow::as_classified`).
#[map(name = "CLASSIFY_SCRATCH")]
pub static CLASSIFY_SCRATCH: PerCpuArray<PacketMeta> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for an NSG field key (see `nsg::lookup`).
#[map(name = "LPM_KEY")]
pub static LPM_KEY: PerCpuArray<Key<FieldKey>> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for FIB lookup parameters (see `forward::lookup`).
#[map(name = "FIB_PARAMS")]
pub static FIB_PARAMS: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU cache of the coarse clock for the current tick (see `clock::now_ns`).
#[map(name = "CLOCK")]
pub static CLOCK: PerCpuArray<CachedClock> = PerCpuArray::with_max_entries(1, 0);

/// The coarse clock's value (`ns`) as read in tick `jiffies` on this CPU.
#[repr(C)]
pub struct CachedClock {
    pub jiffies: u64,
    pub ns: u64,
}

/// Per-CPU counter of the outer IPv4 IDs of encapsulated packets without DF (see
/// `encap::outer_id`). Pinned: every interface's programs take IDs from the same one.
#[map(name = "ENCAP_IDS")]
pub static ENCAP_IDS: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// Later stages of the pipeline, entered by tail call. Pinned: the kernel empties a program
/// array when no user reference to it is left, and the pin is that reference once the
/// agent has exited. Its name is versioned with the flow tables' (see `maps::PIPELINE`).
#[map(name = "PIPELINE_V2")]
pub static PIPELINE: ProgramArray = ProgramArray::pinned(PIPELINE_STAGES, 0);

/// The stages of the tc egress program (the host's own packets), entered by tail call; a
/// program array of its own, as one holds programs of a single type. Pinned like `PIPELINE`.
#[map(name = "EGRESS_PIPE_V2")]
pub static EGRESS_PIPELINE: ProgramArray = ProgramArray::pinned(EGRESS_STAGES, 0);

/// The stages of the tc ingress pipeline (the tc attach mode), at `PIPELINE`'s indices.
/// Pinned like `PIPELINE`.
#[map(name = "TC_PIPE_V2")]
pub static TC_PIPELINE: ProgramArray = ProgramArray::pinned(TC_STAGES, 0);

/// The host's own packets passed and dropped by the egress program, per interface slot.
#[map(name = "EGRESS_STATS")]
pub static EGRESS_STATS: PerCpuArray<Counter> =
    PerCpuArray::pinned(MAX_IFACES * EGRESS_VERDICTS, 0);

/// Frontends (VIP, port, protocol; port 0 and protocol 0 for HA ports) to their service.
#[map(name = "FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Service> = HashMap::pinned(MAX_FRONTENDS, 0);

/// Two Maglev tables per service: backend index per slot.
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(MAX_SERVICES * 2 * MAGLEV_SIZE, 0);

/// Backend addresses and health.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::pinned(MAX_BACKENDS, 0);

/// Packets and bytes per service (both directions).
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Packets and bytes per backend (both directions).
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// This node's outer source address per family for encapsulated flows; the agent writes it.
#[map(name = "ENCAP_SOURCES")]
pub static ENCAP_SOURCES: Array<[u32; 4]> = Array::pinned(2, 0);

/// Next hops the FIB found no neighbour entry for (`xdpgate_common::maps::NEIGHBOURS_WANTED`).
#[map(name = "NEIGH_WANTED")]
pub static NEIGHBOURS_WANTED: LruHashMap<NeighbourKey, u64> =
    LruHashMap::pinned(MAX_NEIGHBOURS_WANTED, 0);

/// The route generation next hops are cached under (`flow::NextHop`); the agent bumps it.
#[map(name = "ROUTE_GEN")]
pub static ROUTE_GENERATION: Array<u32> = Array::pinned(1, 0);

/// Interfaces XDP may redirect to, by ifindex (the agent adds each attached interface).
#[map(name = "EGRESS")]
pub static EGRESS: DevMapHash = DevMapHash::pinned(MAX_EGRESS, 0);

/// Subnets translated by a NAT gateway, to the gateway's index.
#[map(name = "NAT_SUBNETS")]
pub static NAT_SUBNETS: LpmTrie<AddrKey, u32> = LpmTrie::pinned(NAT_PREFIXES, 0);

/// The virtual network: traffic to it is never source-NATed.
#[map(name = "VNET")]
pub static VNET: LpmTrie<AddrKey, u32> = LpmTrie::pinned(NAT_PREFIXES, 0);

/// Public addresses of the NAT gateways, to the gateway's index.
#[map(name = "NAT_PUBLIC")]
pub static NAT_PUBLIC: HashMap<AddrKey, u32> =
    HashMap::pinned(MAX_NAT_GATEWAYS * MAX_PUBLIC_ADDRS as u32, 0);

/// Bumped by the writer after every change of `NAT_PUBLIC` (see `snat::public_gateway`).
#[map(name = "NAT_PUBLIC_VERSION")]
pub static NAT_PUBLIC_VERSION: Array<u64> = Array::pinned(1, 0);

/// The last `NAT_PUBLIC` answer on this CPU (`snat::public_gateway`): when it was read,
/// and under which `NAT_PUBLIC_VERSION`.
#[repr(C)]
pub struct PublicMemo {
    pub version: u64,
    pub read_ns: u64,
    pub key: AddrKey,
    /// The gateway's index, or `snat::NO_GATEWAY`.
    pub gateway: u32,
}

/// Per-CPU: the last `NAT_PUBLIC` answer (see `snat::public_gateway`).
#[map(name = "PUBLIC_MEMO")]
pub static PUBLIC_MEMO: PerCpuArray<PublicMemo> = PerCpuArray::with_max_entries(1, 0);

/// Addresses and port range of each NAT gateway.
#[map(name = "NAT_GATEWAYS")]
pub static NAT_GATEWAYS: Array<NatGatewayConfig> = Array::pinned(MAX_NAT_GATEWAYS, 0);

/// Translations, under both their tuples. Not LRU: a translation leaves only when the agent
/// expires it, never to make room, so no port is ever handed out twice.
#[map(name = "NAT_MAP")]
pub static NAT_MAP: HashMap<FlowKey, NatEntry> = HashMap::pinned(NAT_ENTRIES * 2, 0);

/// New flows per gateway that found no free port.
#[map(name = "NAT_FAILURES")]
pub static NAT_FAILURES: PerCpuArray<u64> = PerCpuArray::pinned(MAX_NAT_GATEWAYS, 0);

/// New flows per gateway that got a public port (translations created).
#[map(name = "NAT_CREATED")]
pub static NAT_CREATED: PerCpuArray<u64> = PerCpuArray::pinned(MAX_NAT_GATEWAYS, 0);

/// Packets and bytes each gateway translated each way, and the packets it dropped.
#[map(name = "NAT_TRAFFIC")]
pub static NAT_TRAFFIC: PerCpuArray<NatTraffic> = PerCpuArray::pinned(MAX_NAT_GATEWAYS, 0);

/// Flow events for the agent's flow log.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);

/// Denied-flow events suppressed by the rate limit, and events lost to a full ring.
#[map(name = "EVENT_STATS")]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

/// Per-CPU token bucket of the denied-event rate limit; pinned, so that every loaded object
/// (XDP and tc ingress, tc egress) takes from the one bucket and the limit is per CPU, not
/// per CPU and object.
#[map(name = "DENY_BUCKET")]
pub static DENY_BUCKET: PerCpuArray<Bucket> = PerCpuArray::pinned(1, 0);

/// When each CPU last woke the reader of `EVENTS` (index 0) and `MONITOR` (1), coarse-clock
/// ns; pinned as `DENY_BUCKET`, so that every loaded object keeps to one gap per CPU.
#[map(name = "EVENT_WAKES")]
pub static EVENT_WAKES: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

/// Events for observers (`xdpgate observe`), written only while `MONITOR_LEASE` runs.
#[map(name = "MONITOR")]
pub static MONITOR: RingBuf = RingBuf::pinned(MONITOR_RING_BYTES, 0);

/// Drop events the observers' rate limit held back, and events lost to a full `MONITOR`.
#[map(name = "MONITOR_STATS")]
pub static MONITOR_STATS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

/// When the observer's lease ends (coarse-clock ns): the observer renews it while it runs.
#[map(name = "MONITOR_LEASE")]
pub static MONITOR_LEASE: Array<u64> = Array::pinned(1, 0);

/// Per-CPU token bucket of the observers' drop-event rate limit; pinned, as `DENY_BUCKET`.
#[map(name = "MONITOR_BUCKET")]
pub static MONITOR_BUCKET: PerCpuArray<Bucket> = PerCpuArray::pinned(1, 0);

/// The event being built, with the origin its stage noted (see `events::set_origin`). Not
/// pinned: a tc egress program can run inside an ingress program's packet on the same CPU
/// (a redirect), and must not overwrite the event that one is building.
#[map(name = "EVENT_SCRATCH")]
pub static EVENT_SCRATCH: PerCpuArray<FlowEvent> = PerCpuArray::with_max_entries(1, 0);
/// The running capture's lease and filter (`xdpgate capture`).
#[map(name = "CAPTURE_CONFIG")]
pub static CAPTURE_CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

/// Captured packets, each behind a `CaptureRecord` (one ring per CPU; the loader sizes it).
#[map(name = "CAPTURE_PERF")]
pub static CAPTURE_PERF: PerfEventArray<CaptureRecord> = PerfEventArray::pinned(0);

/// The record of the packet being captured on this CPU, between its two copies.
#[map(name = "CAPTURE_SCRATCH")]
pub static CAPTURE_SCRATCH: PerCpuArray<CaptureRecord> = PerCpuArray::pinned(1, 0);

/// The decisions of the stages for a traced packet (`xdpgate trace`), per CPU.
#[map(name = "TRACE")]
pub static TRACE: PerCpuArray<TraceRecord> = PerCpuArray::pinned(1, 0);

/// The marker of the trace running now (`xdpgate_common::trace::TRACE_ARMED`).
#[map(name = "TRACE_ARMED")]
pub static TRACE_ARMED: Array<u64> = Array::pinned(1, 0);
