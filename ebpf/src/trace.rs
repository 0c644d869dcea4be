//! `xdpgate trace`: the stages' decisions for a traced packet (see
//! `xdpgate_common::trace`). Only a packet with the marker starts a trace (`begin`); the
//! later stages record, and leave state alone, while `active` says one runs on this CPU
//! (stages of one packet run on one CPU, one packet at a time, as for `SCRATCH`).

use xdpgate_common::{
    flow::FlowValue,
    lb::NO_BACKEND,
    trace::{
        LB_SELECTED, LOOKUP_EMBRYONIC, LOOKUP_ESTABLISHED, LOOKUP_MISS, NSG_ALLOWED, NSG_DENIED,
        STAGE_END, STAGE_LOOKUP, STAGE_NEW_FLOW, STAGE_PARSE, TraceRecord,
    },
};

use crate::{
    action::Action,
    maps::{TRACE, TRACE_ARMED},
};

#[inline(always)]
fn record() -> Option<&'static mut TraceRecord> {
    TRACE.get_ptr_mut(0).map(|t| unsafe { &mut *t })
}

/// Whether `lo` and `hi`, read from where a packet carries the trace marker, are the marker
/// of the trace running now (none is 0, which no packet's words make). A function of its
/// own: inlined into each stage's exit it would cost the new-flow stage stack.
#[inline(never)]
pub fn armed(lo: u32, hi: u32) -> bool {
    let marker = u64::from(hi) << 32 | u64::from(lo);
    marker != 0 && TRACE_ARMED.get(0).is_some_and(|m| *m == marker)
}

/// Whether a traced packet's pipeline runs on this CPU.
#[inline(always)]
pub fn active() -> bool {
    TRACE.get(0).is_some_and(|t| t.active != 0)
}

/// Whether the packet on this CPU moves counters (not a traced one): the one check of every
/// counter the stages after the entry move for a new flow (flow statistics such as
/// picked-up flows, rule and load-balancer traffic, NSG rule hits).
#[inline(always)]
pub fn counting() -> bool {
    !active()
}

/// Runs `f` on the record while a trace is active.
#[inline(always)]
fn with(f: impl FnOnce(&mut TraceRecord)) {
    if let Some(t) = record().filter(|t| t.active != 0) {
        f(t)
    }
}

/// The traced packet was parsed, arriving in direction `dir`: the trace begins.
#[inline(never)]
pub fn begin(dir: u8) {
    if let Some(t) = record() {
        t.active = 1;
        t.stages |= STAGE_PARSE;
        t.dir = dir;
        t.snat_gateway = u16::MAX;
    }
}

/// The flow tables' answer, read without touching the entry.
#[inline(never)]
pub fn lookup(entry: Option<&FlowValue>, established: bool) {
    with(|t| {
        t.stages |= STAGE_LOOKUP;
        let Some(e) = entry else {
            t.lookup = LOOKUP_MISS;
            return;
        };
        t.lookup = if established { LOOKUP_ESTABLISHED } else { LOOKUP_EMBRYONIC };
        t.assured = u8::from(!established && e.assured());
        t.generation = e.generation;
        t.rules = e.rules;
        t.nat = e.nat;
        t.nat_addr = e.nat_addr;
        t.nat_port = e.nat_port;
        t.service = e.service;
        t.backend = e.backend;
        t.flow_direction = e.direction;
        t.flow_reply = e.reply;
    })
}

#[inline(never)]
pub fn stage(bit: u8) {
    with(|t| t.stages |= bit)
}

// The new-flow stage's stack is near the verifier's limit: these take plain values (or a
// map value), nothing the stage must build on its stack for them, and are functions of
// their own (BPF-to-BPF calls), so their work adds nothing to the stages' frames.

/// The NSG layers denied the new flow `f` by `rules` (after the load balancer's choice,
/// which the report shows); whether a trace is active (then no event is sent).
#[inline(never)]
pub fn denied(f: &FlowValue, rules: [u16; 2]) -> bool {
    let Some(t) = record().filter(|t| t.active != 0) else { return false };
    t.stages |= STAGE_NEW_FLOW;
    t.nsg = NSG_DENIED;
    t.rules = rules;
    t.generation = f.generation;
    selected(t, f);
    true
}

/// The load balancer's choice for the new flow `f`, if it is a frontend's.
#[inline(always)]
fn selected(t: &mut TraceRecord, f: &FlowValue) {
    if f.service != NO_BACKEND {
        t.lb = LB_SELECTED;
        t.service = f.service;
        t.backend = f.backend;
    }
}

/// The NSG layers judged the traced packet's flow, decided under an older policy, again:
/// allowed or denied by `rules`; whether a trace is active (then the entry is left as it
/// is). The generation stays the entry's, which the report compares with the running one.
#[inline(never)]
pub fn judged_again(allowed: bool, rules: [u16; 2]) -> bool {
    let Some(t) = record().filter(|t| t.active != 0) else { return false };
    t.stages |= STAGE_NEW_FLOW;
    t.nsg = if allowed { NSG_ALLOWED } else { NSG_DENIED };
    t.rules = rules;
    true
}

/// The new flow the NSG layers allowed (and the load balancer's choice, and the SNAT
/// stage's translation), as it would be created; whether a trace is active (then it is
/// not created).
#[inline(never)]
pub fn flow(f: &FlowValue) -> bool {
    let Some(t) = record().filter(|t| t.active != 0) else { return false };
    t.stages |= STAGE_NEW_FLOW;
    t.nsg = NSG_ALLOWED;
    t.rules = f.rules;
    t.generation = f.generation;
    t.nat = f.nat;
    t.nat_addr = f.nat_addr;
    t.nat_port = f.nat_port;
    // A flow rebuilt from a NAT translation's reply tuple is made in its reply direction.
    t.flow_reply = f.reply;
    selected(t, f);
    true
}

/// The rewrite the flow applies (after load balancing or the SNAT stage).
#[inline(never)]
pub fn action(a: &Action) {
    with(|t| {
        t.nat = a.nat;
        t.nat_addr = a.addr;
        t.nat_port = a.port;
    })
}

/// The load balancer found a frontend but chose no backend (`LB_NO_RULE`,
/// `LB_NO_BACKEND`): no flow is made, which the stages below would record.
#[inline(never)]
pub fn lb(outcome: u8) {
    with(|t| t.lb = outcome)
}

#[inline(never)]
pub fn snat(gateway: u32) {
    with(|t| t.snat_gateway = gateway as u16)
}

/// The pipeline's verdict: the trace ends.
#[inline(never)]
pub fn end(verdict: u32, reason: u8) {
    if let Some(t) = record() {
        t.stages |= STAGE_END;
        t.verdict = verdict as u8;
        t.reason = reason;
        t.active = 0;
    }
}
