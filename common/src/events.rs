//! Events the dataplane sends through ring buffers: flow events for the agent's flow log
//! (`EVENTS`), and the same records, per dropped packet as well, for `xdpgate observe`
//! (`MONITOR`, written only while an observer holds the lease).

use crate::{
    flow::{FlowKey, NAT_DST, NAT_SRC},
    lb::NO_BACKEND,
    pod,
};

/// One event. The first 64 bytes are the version-1 record (programs before version 2 wrote
/// only those, with `version` and `reason` zero), so a record left in the pinned ring by
/// older programs is still read right: read records with [`FlowEvent::from_record`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_coarse_ns` when it happened.
    pub time_ns: u64,
    /// Policy generation that decided it.
    pub generation: u64,
    /// The packet (a flow's first packet for `EVENT_BEGIN`), as it arrived.
    pub key: FlowKey,
    /// The deciding rule of each side (see `FlowValue::rules`).
    pub rules: [u16; 2],
    /// `EVENT_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub direction: u8,
    /// `EVENT_VERSION` (0 in records of version 1).
    pub version: u8,
    /// The `DropReason` of a deny or drop; `NO_REASON` otherwise.
    pub reason: u8,
    // Version 2 from here on.
    /// The interface the packet arrived by (at egress: the one it leaves by).
    pub ifindex: u32,
    /// The packet's TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// `NAT_*`: which address and port of the flow's first direction `nat_addr`/`nat_port`
    /// replace (`NAT_NEXT_HOP`: forwarded to `nat_addr` unchanged).
    pub nat: u8,
    /// The port and address after translation (host-order port, network-order address).
    pub nat_port: u16,
    pub nat_addr: [u32; 4],
    /// Load-balancer service and backend (ids of the running generation's record), or
    /// `NO_BACKEND`.
    pub service: u32,
    pub backend: u32,
    /// The packet's length.
    pub bytes: u32,
    /// `EVENT_AT_*`: where the dataplane saw the packet.
    pub point: u8,
    pub _pad: [u8; 3],
}

impl Default for FlowEvent {
    fn default() -> Self {
        Self {
            time_ns: 0,
            generation: 0,
            key: FlowKey::default(),
            rules: [u16::MAX; 2],
            kind: 0,
            direction: 0,
            version: 0,
            reason: NO_REASON,
            ifindex: 0,
            tcp_flags: 0,
            nat: 0,
            nat_port: 0,
            nat_addr: [0; 4],
            service: NO_BACKEND,
            backend: NO_BACKEND,
            bytes: 0,
            point: EVENT_AT_INGRESS,
            _pad: [0; 3],
        }
    }
}

/// Bytes of a version-1 record: everything up to `reason`.
pub const EVENT_V1_BYTES: usize = 64;
/// The version this build writes.
pub const EVENT_VERSION: u8 = 2;

impl FlowEvent {
    /// A record as the ring holds it: a whole version-2 event, or a version-1 one (reported
    /// as version 1, with the later fields unknown: zero, `NO_BACKEND`); `None` for anything
    /// shorter.
    pub fn from_record(bytes: &[u8]) -> Option<Self> {
        let mut e = Self::default();
        let whole = bytes.len() >= size_of::<Self>() && bytes[62] >= EVENT_VERSION;
        let n = if whole { size_of::<Self>() } else { EVENT_V1_BYTES };
        if bytes.len() < n {
            return None;
        }
        // SAFETY: plain data with no invalid bit patterns; `n` bytes fit in both.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut e).cast::<u8>(), n);
        }
        if !whole {
            e.version = 1;
            e.reason = if e.kind == EVENT_DENY { 2 } else { NO_REASON };
        }
        Some(e)
    }
}

impl FlowEvent {
    /// Whether the fields after `reason` were written (a version-2 record or later).
    pub fn has_v2(&self) -> bool {
        self.version >= 2
    }

    /// What the dataplane did: `allowed`, `translated` (allowed and rewritten by a load
    /// balancer or NAT gateway; version 2 only), `denied` (by a rule) or `dropped` (see
    /// `reason`).
    pub fn verdict(&self) -> &'static str {
        match self.kind {
            EVENT_BEGIN if self.nat == NAT_DST || self.nat == NAT_SRC => "translated",
            EVENT_BEGIN if self.service != NO_BACKEND => "translated",
            EVENT_BEGIN => "allowed",
            EVENT_DENY => "denied",
            _ => "dropped",
        }
    }
}

/// An allowed flow began.
pub const EVENT_BEGIN: u8 = 1;
/// An NSG rule denied a packet (rate-limited per CPU so a flood cannot drown the agent).
pub const EVENT_DENY: u8 = 2;
/// A packet was dropped for another reason (`reason`). The flow log gets these for
/// `nat_unmatched` drops (rate-limited with the denies); observers for every reason.
pub const EVENT_DROP: u8 = 3;

/// `reason` of an event that is no drop.
pub const NO_REASON: u8 = u8::MAX;

/// `point`: at XDP or tc ingress.
pub const EVENT_AT_INGRESS: u8 = 0;
/// `point`: at the tc egress program that judges the host's own packets.
pub const EVENT_AT_EGRESS: u8 = 1;

/// Ring buffer size in bytes.
pub const EVENT_RING_BYTES: u32 = 1 << 20;
/// Filled past this many bytes, the ring wakes its reader (at most every `EVENT_WAKE_GAP_NS`
/// per CPU); below it, the reader polls every `EVENT_POLL_MS`. A quarter of the ring: at a 104-byte event (112 with
/// the ring's header) about 2,340 events, which new flows fill in the poll interval only
/// above 23,000 per second.
pub const EVENT_WAKE_BYTES: u32 = EVENT_RING_BYTES / 4;
/// How often the agent reads the ring without being woken.
pub const EVENT_POLL_MS: u64 = 100;
/// The least time between two wake-ups a CPU forces on one ring's reader (by the coarse
/// clock, so in effect the longer of this and one tick: 1-10 ms). Each is an interrupt, a VM exit in a guest: a reader that
/// lags behind a flood is awake already, and a wake-up per event would slow the dataplane
/// when it is busiest.
pub const EVENT_WAKE_GAP_NS: u64 = 1_000_000;
/// Denied-flow events each CPU may send per second, and in a burst.
pub const DENY_EVENTS_PER_SEC: u64 = 1_000;

/// Index into `EVENT_STATS`: denied-flow events suppressed by the rate limit.
pub const EVENTS_SUPPRESSED: u32 = 0;
/// Index into `EVENT_STATS`: events lost because the ring buffer was full.
pub const EVENTS_LOST: u32 = 1;

/// Token bucket of the denied-event rate limit (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tokens: u64,
    pub last_ns: u64,
}

/// `MONITOR` ring size in bytes: a second of the rate limit's events on 8 CPUs, about.
pub const MONITOR_RING_BYTES: u32 = 2 << 20;
/// Drop events each CPU may send observers per second, and in a burst (new-flow events
/// are not limited: the flow table bounds them).
pub const MONITOR_DROPS_PER_SEC: u64 = 1_000;
/// Filled past this many bytes, `MONITOR` wakes its reader; below, the observer polls.
pub const MONITOR_WAKE_BYTES: u32 = MONITOR_RING_BYTES / 4;
/// Index into `MONITOR_STATS`: drop events held back by the observers' rate limit.
pub const MONITOR_HELD_BACK: u32 = 0;
/// Index into `MONITOR_STATS`: events lost because `MONITOR` was full.
pub const MONITOR_LOST: u32 = 1;
/// How long an observer's lease lasts (`MONITOR_LEASE` holds its end, coarse-clock ns):
/// the observer renews it every second, so a killed one stops costing within this.
pub const MONITOR_LEASE_NS: u64 = 3_000_000_000;

pod!(FlowEvent, Bucket);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_version_one_in_front() {
        assert_eq!(size_of::<FlowEvent>(), 104);
        assert_eq!(core::mem::offset_of!(FlowEvent, version), 62);
        assert_eq!(core::mem::offset_of!(FlowEvent, ifindex), EVENT_V1_BYTES);
    }

    #[test]
    fn a_version_one_record_reads_as_one() {
        let mut bytes = [0u8; EVENT_V1_BYTES];
        bytes[60] = EVENT_DENY;
        bytes[16] = 203;
        let e = FlowEvent::from_record(&bytes).unwrap();
        assert_eq!((e.version, e.kind, e.reason, e.backend), (1, EVENT_DENY, 2, NO_BACKEND));
        assert_eq!(e.key.src[0].to_ne_bytes()[0], 203);
        assert!(FlowEvent::from_record(&bytes[..63]).is_none());
        // A version-1 record padded by the ring is still version 1.
        let padded = [&bytes[..], &[0u8; 40]].concat();
        assert_eq!(FlowEvent::from_record(&padded).unwrap().version, 1);
    }

    #[test]
    fn a_version_two_record_reads_whole() {
        let e = FlowEvent {
            kind: EVENT_DROP,
            version: EVENT_VERSION,
            reason: 8,
            ifindex: 7,
            bytes: 60,
            ..Default::default()
        };
        let bytes: [u8; 104] = unsafe { core::mem::transmute(e) };
        assert_eq!(FlowEvent::from_record(&bytes), Some(e));
    }
}
