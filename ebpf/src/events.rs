//! Flow events for the agent's flow log: one when an allowed flow begins, one when a flow
//! is denied. Denied-flow events go through a per-CPU token bucket, so a flood of denied
//! packets costs the agent a bounded number of events; what the bucket or a full ring
//! buffer holds back is counted.
//!
//! Events are submitted without waking the reader (a wake-up is an interrupt, and costs the
//! first packet of every flow several microseconds when the reader has caught up): the agent
//! polls the ring on a short interval, and is woken only once the ring is filled past
//! `EVENT_WAKE_BYTES`, so a burst cannot overrun it between polls.

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use xdpgate_common::{
    events::{
        DENY_EVENTS_PER_SEC, EVENT_DENY, EVENT_WAKE_BYTES, EVENTS_LOST, EVENTS_SUPPRESSED,
        FlowEvent,
    },
    flow::FlowKey,
};

use crate::maps::{DENY_BUCKET, EVENT_STATS, EVENTS};

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = EVENT_STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

/// Takes a token for a denied-flow event: refilled at `DENY_EVENTS_PER_SEC`, at most that
/// many banked.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(b) = DENY_BUCKET.get_ptr_mut(0) else { return false };
    let b = unsafe { &mut *b };
    let refill = now.saturating_sub(b.last_ns) / (1_000_000_000 / DENY_EVENTS_PER_SEC);
    if refill > 0 {
        b.tokens = (b.tokens + refill).min(DENY_EVENTS_PER_SEC);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Sends a flow event at `now` (the coarse clock); written straight into the ring buffer,
/// not built on the stack.
#[inline(always)]
pub fn emit(kind: u8, key: &FlowKey, rules: [u16; 2], direction: u8, generation: u64, now: u64) {
    if kind == EVENT_DENY && !take_token(now) {
        count(EVENTS_SUPPRESSED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count(EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    unsafe {
        (*e).time_ns = now;
        (*e).generation = generation;
        (*e).key = *key;
        (*e).rules = rules;
        (*e).kind = kind;
        (*e).direction = direction;
        (*e)._pad = [0; 2];
    }
    let wake = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= EVENT_WAKE_BYTES as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}
