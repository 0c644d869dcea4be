//! Flow events for the agent's flow log: one when an allowed flow begins, one when a flow
//! is denied. Denied-flow events go through a per-CPU token bucket, so a flood of denied
//! packets costs the agent a bounded number of events; what the bucket or a full ring
//! buffer holds back is counted.

use xdpgate_common::{
    events::{DENY_EVENTS_PER_SEC, EVENT_DENY, EVENTS_LOST, EVENTS_SUPPRESSED, FlowEvent},
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
    entry.submit(0);
}
