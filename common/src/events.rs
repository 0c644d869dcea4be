//! Flow events the dataplane sends the agent through a ring buffer, for flow logs.

use crate::{flow::FlowKey, pod};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` when it happened.
    pub time_ns: u64,
    /// Policy generation that decided it.
    pub generation: u64,
    /// The flow's first packet, as it arrived.
    pub key: FlowKey,
    /// The deciding rule of each side (see `FlowValue::rules`).
    pub rules: [u16; 2],
    /// `EVENT_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// An allowed flow began.
pub const EVENT_BEGIN: u8 = 1;
/// A flow was denied (rate-limited per CPU so a flood cannot drown the agent).
pub const EVENT_DENY: u8 = 2;

/// Ring buffer size in bytes.
pub const EVENT_RING_BYTES: u32 = 1 << 20;
/// Filled past this many bytes, the ring wakes its reader with each event; below it, the
/// reader polls every `EVENT_POLL_MS`. A quarter of the ring: at a 64-byte event (72 with the
/// ring's header) about 3,640 events, which new flows fill in the poll interval only above
/// 36,000 per second.
pub const EVENT_WAKE_BYTES: u32 = EVENT_RING_BYTES / 4;
/// How often the agent reads the ring without being woken.
pub const EVENT_POLL_MS: u64 = 100;
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

pod!(FlowEvent, Bucket);
