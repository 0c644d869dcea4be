//! Map names and sizes. The dataplane declares its maps under these names and the agent
//! opens them (or their pins in bpffs) by the same names.

/// Default directory in bpffs where the agent pins maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdpgate";

/// `HashMap<u32 ifindex, IfaceConfig>`: interfaces xdpgate is attached to.
pub const IFACES: &str = "IFACES";
/// `Array<IfaceConfig>` indexed by ifindex, for ifindexes below [`IFACE_INDEX_ENTRIES`]: the
/// same registrations as `IFACES` (the agent writes both), found by the programs without
/// hashing (a hash lookup was a quarter of an established packet's cost). An entry with slot
/// 0 is an interface not registered. `IFACES` stays the list the agent reads, and the
/// programs' answer for larger ifindexes.
pub const IFACE_INDEX: &str = "IFACE_INDEX";
/// Ifindexes the `IFACE_INDEX` array covers (32 KiB). A namespace numbers its devices from
/// 1, so a gateway's NICs lie far below; only a host that has created thousands of devices
/// (container churn) reaches past it, and its interfaces there cost a hash lookup again.
pub const IFACE_INDEX_ENTRIES: u32 = 4_096;
/// `PerCpuArray<Counter>`: packets and bytes per interface slot and XDP verdict.
pub const IFACE_STATS: &str = "IFACE_STATS";
/// `PerCpuArray<u64>`: dropped packets per [`crate::stats::DropReason`], with room for more
/// (`DROP_SLOTS`). The name carries the layout's version: a build with a longer array pins
/// it beside the old one (whose pin `check_pinned_layouts` would refuse).
pub const DROP_STATS: &str = "DROP_STATS_V3";
/// The drop counters of earlier builds (10 reasons, then 13 with the encapsulation ones,
/// numbered as this build's): left pinned by `upgrade`, and added to this build's by
/// `stats`, so that drop counts never go down across an upgrade or a downgrade.
pub const EARLIER_DROP_STATS: [&str; 2] = ["DROP_STATS", "DROP_STATS_V2"];

/// Interfaces one dataplane can be attached to at once. Slot 0 counts packets seen on an
/// interface the agent did not register (for example `BPF_PROG_TEST_RUN` on `lo`).
pub const MAX_IFACES: u32 = 64;

/// `LpmTrie<FieldKey, RuleBitmap>`: every field of every NSG table.
pub const NSG_FIELDS: &str = "NSG_FIELDS";
/// `Array<u32>`: access (`ACCESS_*`) of rule `table * MAX_RULES + bit`.
pub const NSG_RULES: &str = "NSG_RULES";
/// `Array<[u16; 4]>`: the class of every port of the port fields of every NSG table
/// (`nsg::class_index`), for the fields whose `nsg::class_bit` is set.
pub const NSG_CLASS_IDS: &str = "NSG_CLASS_IDS";
/// `Array<FieldClass>`: the port classes' rules, `nsg::CLASSES_PER_SLOT` per slot.
pub const NSG_CLASSES: &str = "NSG_CLASSES";
/// `Array<nsg::Addr4Ranges>`: the IPv4 address fields of every NSG table as ranges
/// (`nsg::addr4_index`), searched while their generation is their slot's. A new map: pin sets
/// from before it get it on their next load.
pub const NSG_ADDR4_RANGES: &str = "NSG_ADDR4_RANGES";
/// `PerCpuArray<u64>`: flows decided by rule `table * MAX_RULES + bit`.
pub const NSG_HITS: &str = "NSG_HITS";
/// `PerCpuArray<stats::Counter>`: packets and bytes by rule `table * MAX_RULES + bit`: every
/// packet of the flows the rule decided (both ways), and every packet it denied. A new map:
/// pin sets from before it get it on their next load.
pub const NSG_TRAFFIC: &str = "NSG_TRAFFIC";
/// `Array<u16>`: where rule `table * MAX_RULES + bit` of the slot the last apply retired sits
/// in the slot it switched on, plus one (0: gone, as the map is made, so a map new to an
/// upgraded dataplane moves no rule anywhere wrong). A flow kept across that apply without
/// re-evaluation takes its rules from here, so its packets count under the same rules. Only
/// the retired slot's part is meaningful. A new map: pin sets from before it get it on
/// their next load.
pub const NSG_RULE_MOVES: &str = "NSG_RULE_MOVES";
/// `Array<nsg::TableScope>`, one per table (both slots): where each table's local address
/// can match, so the classifier skips a table without a lookup for addresses outside. A new
/// map: pin sets from before it get it, empty, on their next load, and an empty scope is
/// of no generation (every table looked up).
pub const NSG_SCOPES: &str = "NSG_SCOPES";
/// `Array<u32>` of one entry: the slot packets use.
pub const ACTIVE_SLOT: &str = "ACTIVE_SLOT";
/// `Array<PolicyConfig>`, one per slot.
pub const POLICY_CONFIG: &str = "POLICY_CONFIG";
/// `HashMap<FlowKey, FlowValue>`: established (confirmed) flows, one entry per direction.
/// Not LRU: a full table evicts no live flow for a new one (which waits `ASSURED` among the
/// embryos); the agent removes idle entries. The name carries the layout's version: a build
/// with another layout pins its own table beside the old one, and `upgrade` copies the
/// flows over (see `FLOWS_V1`).
pub const FLOWS: &str = "FLOWS_V2";
/// `LruHashMap<FlowKey, FlowValue>`: embryonic (unconfirmed) flows, one entry per direction.
/// A flood of new flows evicts only other embryonic ones. Versioned as `FLOWS` is.
pub const EMBRYOS: &str = "EMBRYOS_V2";
/// The flow tables of builds before the next-hop cache (`FlowValue` without `hop`), which
/// `upgrade` carries over.
pub const FLOWS_V1: &str = "FLOWS";
pub const EMBRYOS_V1: &str = "EMBRYOS";
/// Their pipelines, unpinned once the tables are carried over.
pub const PIPELINE_V1: &str = "PIPELINE";
pub const EGRESS_PIPELINE_V1: &str = "EGRESS_PIPELINE";
/// `Array<u32>`, one entry: the route generation next hops are cached under
/// (`flow::NextHop`). The agent bumps it on route, neighbour and link changes; 0 (no agent
/// has run) keeps the cache to its age limit alone.
pub const ROUTE_GENERATION: &str = "ROUTE_GEN";
/// `Array<[u32; 4]>` of two entries (`ENCAP_SOURCE_V4`, `ENCAP_SOURCE_V6`): this node's
/// outer source address for encapsulated flows (`flow::NAT_ENCAP`), network-order words
/// (IPv4 in the first); all zero: none. Node-specific, so not in the policy: the agent and
/// `apply` write it. A new map: pin sets from before it get it on their next load.
pub const ENCAP_SOURCES: &str = "ENCAP_SOURCES";
/// `LruHashMap<flow::NeighbourKey, u64>`: next hops the FIB found no neighbour entry for,
/// with the time (ns) last wanted; the agent resolves each (a floating-IP or encapsulated
/// packet cannot go to the stack, which would resolve it) and removes it. A new map: pin
/// sets from before it get it on their next load.
pub const NEIGHBOURS_WANTED: &str = "NEIGH_WANTED";
/// Its size: next hops wanted within one of the agent's ticks.
pub const MAX_NEIGHBOURS_WANTED: u32 = 256;
pub const ENCAP_SOURCE_V4: u32 = 0;
pub const ENCAP_SOURCE_V6: u32 = 1;
/// `PerCpuArray<u64>`: flow-table counters, indexed by `flow::FLOW_STAT_*`.
pub const FLOW_STATS: &str = "FLOW_STATS";
/// `LruHashMap<FragKey, FragValue>`: datagrams whose first fragment was allowed.
pub const FRAGS: &str = "FRAGS";

pub const NSG_FIELD_ENTRIES: u32 = 262_144;
/// Flows the established table holds unless the operator sizes it at first attach (Azure
/// allows 500,000 flows per NIC; Cilium's TCP conntrack default is 524,288 entries).
pub const DEFAULT_FLOWS: u32 = 524_288;
/// `FLOWS` entries as declared: two per flow. The loader resizes it.
pub const FLOW_ENTRIES: u32 = 2 * DEFAULT_FLOWS;
/// `EMBRYOS` entries per `FLOWS` entry: the embryonic table holds a quarter as many flows.
pub const EMBRYO_DIVISOR: u32 = 4;
pub const EMBRYO_ENTRIES: u32 = FLOW_ENTRIES / EMBRYO_DIVISOR;
pub const FRAG_ENTRIES: u32 = 16_384;
/// `ProgramArray`: later pipeline stages, entered by tail call. Versioned with the flow
/// tables (`FLOWS`): the running entry programs tail-call through it, so a build whose stages
/// use other flow tables must not put them there; it fills its own, which its entry programs
/// use once they replace the old ones.
pub const PIPELINE: &str = "PIPELINE_V2";
/// Index of the policy stage in `PIPELINE`.
pub const PIPELINE_POLICY: u32 = 0;
/// Index of the act stage (rewrite and forward) in `PIPELINE`.
pub const PIPELINE_ACT: u32 = 1;
/// Index of the SNAT stage (port claim for new flows through a NAT gateway).
pub const PIPELINE_SNAT: u32 = 2;
/// Index of the new-flow stage (NSG classification, load balancing, flow creation): entered
/// when a packet has no flow, so the lookup stage stays small for the verifier.
pub const PIPELINE_NEW: u32 = 3;
pub const PIPELINE_STAGES: u32 = 4;

/// `ProgramArray` of the tc egress pipeline (the host's own packets): a program array holds
/// programs of one type, and these are classifiers, not XDP programs.
/// Versioned as `PIPELINE` is.
pub const EGRESS_PIPELINE: &str = "EGRESS_PIPE_V2";
/// Index of the egress entry (parse) stage, which enters itself again once after pulling
/// headers into the linear area of the socket buffer.
pub const EGRESS_PARSE: u32 = 0;
/// Index of the egress policy stage (flow lookup).
pub const EGRESS_POLICY: u32 = 1;
/// Index of the egress new-flow stage (a packet of the host's without a flow), apart so
/// that the lookup stage stays small for the verifier.
pub const EGRESS_NEW: u32 = 2;
pub const EGRESS_STAGES: u32 = 3;
/// `ProgramArray` of the tc ingress pipeline (the tc attach mode, for interfaces where XDP is
/// the wrong hook): the same stages as `PIPELINE`, as classifiers, at the same indices
/// (`PIPELINE_POLICY`, `PIPELINE_ACT`, `PIPELINE_SNAT`, `PIPELINE_NEW`). A program array holds
/// programs of one type, so it cannot share `PIPELINE`. Versioned as `PIPELINE` is.
pub const TC_PIPELINE: &str = "TC_PIPE_V2";
/// Index of the tc entry (parse) stage itself in `TC_PIPELINE`, beyond `PIPELINE`'s: it
/// enters itself again once after pulling headers into the linear area of the socket
/// buffer (as `EGRESS_PARSE` does).
pub const TC_PARSE: u32 = PIPELINE_STAGES;
pub const TC_STAGES: u32 = PIPELINE_STAGES + 1;
/// `PerCpuArray<Counter>`: the host's own packets passed and dropped by the egress program,
/// per interface slot (`stats::egress_stat_index`).
pub const EGRESS_STATS: &str = "EGRESS_STATS";

/// `HashMap<FrontendKey, Service>`.
pub const FRONTENDS: &str = "FRONTENDS";
/// `Array<u32>`: backend index per Maglev slot, `maglev_index(service, table, slot)`.
pub const MAGLEV: &str = "MAGLEV";
/// `Array<BackendInfo>`.
pub const BACKENDS: &str = "BACKENDS";
/// `PerCpuArray<Counter>` per service id, and per backend index.
pub const SERVICE_STATS: &str = "SERVICE_STATS";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
/// `DevMapHash`: interfaces XDP may redirect to, keyed by ifindex.
pub const EGRESS: &str = "EGRESS";
pub const MAX_EGRESS: u32 = 64;

/// `LpmTrie<AddrKey, u32>`: subnet prefix to NAT gateway index.
pub const NAT_SUBNETS: &str = "NAT_SUBNETS";
/// `LpmTrie<AddrKey, u32>`: the virtual network; destinations inside it are not translated.
pub const VNET: &str = "VNET";
/// `HashMap<AddrKey, u32>`: public address to NAT gateway index.
pub const NAT_PUBLIC: &str = "NAT_PUBLIC";
/// `Array<u64>`, one entry: bumped after every change of `NAT_PUBLIC`, whose answers the
/// programs remember per CPU while it holds. Created by a load of programs that have it (a
/// dataplane from before has none, and remembers nothing).
pub const NAT_PUBLIC_VERSION: &str = "NAT_PUBLIC_VERSION";
/// `Array<NatGatewayConfig>`.
pub const NAT_GATEWAYS: &str = "NAT_GATEWAYS";
/// `HashMap<FlowKey, NatEntry>`: translations under both of their tuples.
pub const NAT_MAP: &str = "NAT_MAP";
/// `PerCpuArray<u64>` per gateway: new flows that found no free port.
pub const NAT_FAILURES: &str = "NAT_FAILURES";
/// `PerCpuArray<u64>` per gateway: new flows that got a public port. Created by a load of
/// programs that have it (a dataplane from before has none).
pub const NAT_CREATED: &str = "NAT_CREATED";
/// `PerCpuArray<nat::NatTraffic>` per gateway: packets and bytes translated each way,
/// packets dropped. A new map: pin sets from before it get it on their next load.
pub const NAT_TRAFFIC: &str = "NAT_TRAFFIC";
pub const NAT_PREFIXES: u32 = 1_024;

/// `RingBuf` of `FlowEvent`s.
pub const EVENTS: &str = "EVENTS";
/// `PerCpuArray<u64>`: `EVENTS_SUPPRESSED`, `EVENTS_LOST`.
pub const EVENT_STATS: &str = "EVENT_STATS";
/// `RingBuf` of `FlowEvent`s for `xdpgate observe`, written while `MONITOR_LEASE` runs.
pub const MONITOR: &str = "MONITOR";
/// `PerCpuArray<u64>`: `MONITOR_HELD_BACK`, `MONITOR_LOST`.
pub const MONITOR_STATS: &str = "MONITOR_STATS";
/// `Array<u64>` of one: when the observer's lease ends (coarse-clock ns); 0: none.
pub const MONITOR_LEASE: &str = "MONITOR_LEASE";

/// `PerCpuArray` handing the parsed packet from stage to stage; every program of one
/// dataplane uses it, which is how the agent finds them (for their aya-log records).
pub const SCRATCH: &str = "SCRATCH";
