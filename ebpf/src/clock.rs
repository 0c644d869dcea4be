//! The flow tables' clock: `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at tick resolution,
//! the clock the agent's sweeps and flow views read), fetched through the helper only once
//! per tick and CPU. The helper cost an established packet 13-14 ns; `bpf_jiffies64`, which
//! the verifier inlines into one load, tells when the tick has moved on.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::CLOCK;

/// The coarse clock as this CPU read it first in the current tick. It may lag the helper's
/// value by up to one tick (the tick bumps jiffies just before the coarse clock), and two
/// CPUs may disagree by that much: callers compare with `saturating_sub` and never move a
/// stamp back ([`stamp`]).
#[inline(always)]
pub fn now_ns() -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cached) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    let cached = unsafe { &mut *cached };
    // ns 0: never read on this CPU (jiffies may well be 0 then, 5 minutes after boot).
    if cached.jiffies != jiffies || cached.ns == 0 {
        cached.jiffies = jiffies;
        cached.ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
    cached.ns
}

/// Moves a last-seen stamp forward to `now`; never back (another CPU's clock may lag a tick
/// behind the one that stamped it last).
#[inline(always)]
pub fn stamp(last_seen_ns: &mut u64, now: u64) {
    if now > *last_seen_ns {
        *last_seen_ns = now;
    }
}
