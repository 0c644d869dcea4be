//! Events: for the agent's flow log (`EVENTS`): one when an allowed flow begins, one per
//! denied packet and per `nat_unmatched` drop; for observers (`MONITOR`, only while one holds
//! the lease): the same, and one per dropped packet of every reason. Denies and drops go
//! through per-CPU token buckets (one per ring), so a flood costs the agent and the observer
//! a bounded number of events; what a bucket or a full ring holds back is counted.
//!
//! Events are submitted without waking the reader (a wake-up is an interrupt, and costs the
//! first packet of every flow several microseconds when the reader has caught up): readers
//! poll on a short interval, and are woken only once a ring is filled past its wake mark, so
//! a burst cannot overrun it between polls; then at most once a millisecond per CPU, as a
//! reader behind a flood is awake already.
//!
//! The established fast path emits nothing; a new flow or a drop pays one array lookup (the
//! lease) when no one observes.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::{PerCpuArray, RingBuf},
};
use xdpgate_common::{
    events::{
        Bucket, DENY_EVENTS_PER_SEC, EVENT_BEGIN, EVENT_DROP, EVENT_VERSION, EVENT_WAKE_BYTES,
        EVENT_WAKE_GAP_NS, EVENTS_LOST, EVENTS_SUPPRESSED, FlowEvent, MONITOR_DROPS_PER_SEC,
        MONITOR_HELD_BACK, MONITOR_LOST, MONITOR_WAKE_BYTES, NO_REASON,
    },
    flow::{FlowKey, FlowValue, NAT_NONE, NO_RULES},
    lb::NO_BACKEND,
    stats::DropReason,
};

use crate::{
    clock,
    maps::{
        DENY_BUCKET, EVENT_SCRATCH, EVENT_STATS, EVENT_WAKES, EVENTS, MONITOR, MONITOR_BUCKET,
        MONITOR_LEASE, MONITOR_STATS, SCRATCH,
    },
};

/// Notes where the packet came from in the event being built (`EVENT_SCRATCH`), for the
/// events the stage sends from deeper down (which have no context to ask).
#[inline(always)]
pub fn set_origin(ifindex: u32, bytes: u32, point: u8, tcp_flags: u8) {
    if let Some(e) = EVENT_SCRATCH.get_ptr_mut(0) {
        unsafe {
            (*e).tcp_flags = tcp_flags;
            (*e).ifindex = ifindex;
            (*e).bytes = bytes;
            (*e).point = point;
        }
    }
}

#[inline(always)]
fn count(stats: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = stats.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

/// Takes a token from `bucket`: refilled at `per_sec`, at most that many banked.
#[inline(always)]
fn take_token(bucket: &PerCpuArray<Bucket>, per_sec: u64, now: u64) -> bool {
    let Some(b) = bucket.get_ptr_mut(0) else { return false };
    let b = unsafe { &mut *b };
    let refill = now.saturating_sub(b.last_ns) / (1_000_000_000 / per_sec);
    if refill > 0 {
        b.tokens = (b.tokens + refill).min(per_sec);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Whether an observer's lease runs at `now`.
#[inline(always)]
fn observed(now: u64) -> bool {
    MONITOR_LEASE.get(0).is_some_and(|end| *end > now)
}

/// Whether this CPU's last wake-up of ring `wakes`' reader is `EVENT_WAKE_GAP_NS` old; if
/// so, stamps this one.
#[inline(always)]
fn wake_due(wakes: u32, now: u64) -> bool {
    let Some(last) = EVENT_WAKES.get_ptr_mut(wakes) else { return true };
    let last = unsafe { &mut *last };
    if now.saturating_sub(*last) < EVENT_WAKE_GAP_NS {
        return false;
    }
    *last = now;
    true
}

/// Copies the event built in `EVENT_SCRATCH` into `ring` (built in a map, not on the
/// stack: the stages' stack chain is near its 512 bytes).
#[inline(always)]
fn write(
    ring: &RingBuf,
    stats: &PerCpuArray<u64>,
    lost: u32,
    (wake_bytes, wakes): (u32, u32),
    e: &FlowEvent,
) {
    // Counted with this event (its 8-byte header too), as a reserved one would be.
    let filled = ring.query(BPF_RB_AVAIL_DATA as u64) + size_of::<FlowEvent>() as u64 + 8;
    let wake = if filled >= wake_bytes as u64 && wake_due(wakes, e.time_ns) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if ring.output::<FlowEvent>(e, wake as u64).is_err() {
        count(stats, lost);
    }
}

/// Which rings take an event now: the flow log (when `to_log`) and, while one observes, the
/// observers. A `limited` event (anything but a flow's beginning) takes a token of each
/// ring's bucket; what a bucket holds back is counted. Decided before the event is built,
/// which a flood's held-back events then skip.
#[inline(always)]
fn admit(limited: bool, to_log: bool, now: u64) -> (bool, bool) {
    let mut log = to_log;
    if log && limited && !take_token(&DENY_BUCKET, DENY_EVENTS_PER_SEC, now) {
        count(&EVENT_STATS, EVENTS_SUPPRESSED);
        log = false;
    }
    let mut observe = observed(now);
    if observe && limited && !take_token(&MONITOR_BUCKET, MONITOR_DROPS_PER_SEC, now) {
        count(&MONITOR_STATS, MONITOR_HELD_BACK);
        observe = false;
    }
    (log, observe)
}

/// Sends the event built in `EVENT_SCRATCH` to the rings `admit` chose.
#[inline(always)]
fn send(e: &FlowEvent, (log, observe): (bool, bool)) {
    if log {
        write(&EVENTS, &EVENT_STATS, EVENTS_LOST, (EVENT_WAKE_BYTES, 0), e);
    }
    if observe {
        write(&MONITOR, &MONITOR_STATS, MONITOR_LOST, (MONITOR_WAKE_BYTES, 1), e);
    }
}

/// Fills the event in `EVENT_SCRATCH` but for its key and origin (`set_origin`: interface,
/// length, hook, TCP flags).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined: the facts of one event")]
fn fill(
    e: &mut FlowEvent,
    kind: u8,
    reason: u8,
    rules: [u16; 2],
    direction: u8,
    generation: u64,
    now: u64,
    flow: Option<&FlowValue>,
) {
    e.time_ns = now;
    e.generation = generation;
    e.rules = rules;
    e.kind = kind;
    e.direction = direction;
    e.version = EVENT_VERSION;
    e.reason = reason;
    match flow {
        Some(v) => {
            e.nat = v.nat;
            e.nat_port = v.nat_port;
            e.nat_addr = v.nat_addr;
            e.service = v.service;
            e.backend = v.backend;
        }
        None => {
            e.nat = NAT_NONE;
            e.nat_port = 0;
            e.nat_addr = [0; 4];
            e.service = NO_BACKEND;
            e.backend = NO_BACKEND;
        }
    }
    e._pad = [0; 3];
}

/// A flow event (`EVENT_BEGIN`, `EVENT_DENY`), sent from within a stage that noted the
/// packet's origin: to the flow log and the observers.
#[inline(always)]
pub fn emit(
    kind: u8,
    key: &FlowKey,
    rules: [u16; 2],
    direction: u8,
    generation: u64,
    now: u64,
    flow: Option<&FlowValue>,
) {
    let admitted = admit(kind != EVENT_BEGIN, true, now);
    if admitted == (false, false) {
        return;
    }
    let Some(e) = EVENT_SCRATCH.get_ptr_mut(0) else { return };
    let e = unsafe { &mut *e };
    let reason = if kind == EVENT_BEGIN { NO_REASON } else { DropReason::Policy as u8 };
    e.key = *key;
    fill(e, kind, reason, rules, direction, generation, now, flow);
    send(e, admitted);
}

/// A packet dropped for `reason` (other than a policy deny, which `emit` reported with its
/// rule): the flow log hears of `nat_unmatched` drops, observers of all. `parsed`: the
/// packet is in `SCRATCH` (drops of the entry stage have no addresses). A function of its
/// own (a BPF-to-BPF call): inlined, it took stack the new-flow stages do not have.
#[inline(never)]
pub fn dropped(reason: u32, parsed: bool, point: u8, ifindex: u32, bytes: u32) {
    if reason == DropReason::Policy as u32 {
        return;
    }
    let to_log = reason == DropReason::NatUnmatched as u32;
    let now = clock::now_ns();
    let admitted = admit(true, to_log, now);
    if admitted == (false, false) {
        return;
    }
    let Some(e) = EVENT_SCRATCH.get_ptr_mut(0) else { return };
    let e = unsafe { &mut *e };
    fill(e, EVENT_DROP, reason as u8, NO_RULES, 0, 0, now, None);
    e.key = FlowKey::default();
    e.tcp_flags = 0;
    if let Some(m) = SCRATCH.get(0).filter(|_| parsed) {
        // Field by field: a whole key built first would take 40 bytes of stack.
        e.key.src = m.src;
        e.key.dst = m.dst;
        e.key.sport = m.sport;
        e.key.dport = m.dport;
        e.key.proto = m.proto;
        e.key.family = m.family;
        e.key.kind = m.icmp_kind;
        e.direction = m.dir;
        e.tcp_flags = m.tcp_flags;
    }
    e.ifindex = ifindex;
    e.bytes = bytes;
    e.point = point;
    send(e, admitted);
}
