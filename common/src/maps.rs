//! Map names and sizes. The dataplane declares its maps under these names and the agent
//! opens them (or their pins in bpffs) by the same names.

/// Default directory in bpffs where the agent pins maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdpgate";

/// `HashMap<u32 ifindex, IfaceConfig>`: interfaces xdpgate is attached to.
pub const IFACES: &str = "IFACES";
/// `PerCpuArray<Counter>`: packets and bytes per interface slot and XDP verdict.
pub const IFACE_STATS: &str = "IFACE_STATS";
/// `PerCpuArray<u64>`: dropped packets per [`crate::stats::DropReason`].
pub const DROP_STATS: &str = "DROP_STATS";

/// Interfaces one dataplane can be attached to at once. Slot 0 counts packets seen on an
/// interface the agent did not register (for example `BPF_PROG_TEST_RUN` on `lo`).
pub const MAX_IFACES: u32 = 64;
