//! Every map of the dataplane, in one place. Names come from `xdpgate_common::maps`; all are
//! pinned by name so a restarted agent finds the running state.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use xdpgate_common::{
    iface::IfaceConfig,
    maps::MAX_IFACES,
    stats::{Counter, DROP_REASONS, VERDICTS},
};

/// Interfaces xdpgate is attached to, by ifindex: counter slot and role.
#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, IfaceConfig> = HashMap::pinned(MAX_IFACES, 0);

/// Packets and bytes per interface slot and verdict.
#[map(name = "IFACE_STATS")]
pub static IFACE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_IFACES * VERDICTS, 0);

/// Dropped packets per reason.
#[map(name = "DROP_STATS")]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);
