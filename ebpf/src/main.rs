//! The xdpgate dataplane: parse -> flow lookup (-> new flow) (-> SNAT) (-> act) -> count, at
//! XDP or, on interfaces attached with the tc hook, at tc ingress (one copy of the stages,
//! generic over `hook::Hook`); and beside it on tc egress, for the packets the host itself
//! sends: parse -> flow lookup (-> new flow of the host's) -> count.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod action;
mod capture;
mod clock;
mod encap;
mod events;
mod flow;
mod forward;
mod headers;
mod hook;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nsg;
mod parse;
mod snat;
mod tc;
mod too_big;
mod trace;
mod xdp;

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::error;
use xdpgate_common::{
    events::{EVENT_AT_EGRESS, EVENT_AT_INGRESS},
    flow::{FlowKey, NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_NONE, NAT_SRC, NextHop},
    iface::{IfaceConfig, Role},
    maps::{
        EGRESS_NEW, EGRESS_PARSE, EGRESS_POLICY, PIPELINE_ACT, PIPELINE_NEW, PIPELINE_POLICY,
        PIPELINE_SNAT,
    },
    nsg::{DIR_INBOUND, DIR_OUTBOUND},
    stats::{DropReason, egress_stat_index, iface_stat_index},
    trace::{STAGE_ACT, STAGE_SNAT},
};

use crate::{
    action::{
        Action, JUDGED, NAT_ICMP_ERROR_DST, NAT_ICMP_ERROR_SRC, NAT_PENDING_SNAT, NOT_ESTABLISHED,
        RECLASSIFY, TO_STACK,
    },
    flow::Lookup,
    hook::{Hook, tc_verdict},
    maps::{
        ACTION, EGRESS_PIPELINE, EGRESS_STATS, EMBRYOS, FLOW_SCRATCH, FLOWS, IFACE_STATS, SCRATCH,
        count_drop_reason, iface_config,
    },
    nsg::Active,
    parse::{
        FRAG_FIRST, FRAG_LATER, FRAG_NONE, Packet, PacketMeta, Parsed, is_icmp_error,
        is_link_control, parse,
    },
};

// `#[inline(always)]` below aya's attribute lands on the inner function its macro wraps
// each stage's body in: LLVM had left seven of these bodies out of line, a BPF-to-BPF call
// and return per stage (costly where returns go through SRSO's "Safe RET" thunk).

/// Stage one: parse, and the established table. IP packets without an established flow go
/// on by tail call (to the new-flow stage, or for fragments and ICMP errors the policy
/// stage) once a policy is applied; the split keeps each program small enough for the
/// verifier to check every path (each parse path would otherwise be explored again through
/// classification).
#[xdp]
#[inline(always)]
pub fn xdpgate(ctx: XdpContext) -> u32 {
    let iface = iface_config(ctx.ingress_ifindex() as u32);
    finish(&ctx, iface.map_or(0, |c| c.slot), false, parse_stage(&ctx, iface))
}

/// Stage two, for what the entry stage does not look up itself: later fragments, ICMP
/// errors, a flow judged again (hit: done; miss: the new-flow stage).
#[xdp]
#[inline(always)]
pub fn xdpgate_policy(ctx: XdpContext) -> u32 {
    let result = policy_stage(&ctx);
    finish(&ctx, parsed_slot(), true, result)
}

/// Stage two, for a packet without an established flow: its embryonic flow's, else load
/// balancing, NSG classification, a new flow.
#[xdp]
#[inline(always)]
pub fn xdpgate_new_flow(ctx: XdpContext) -> u32 {
    let result = new_flow_stage(&ctx);
    finish(&ctx, parsed_slot(), true, result)
}

/// Stage two and a half, for new flows through a NAT gateway: claim a public port.
#[xdp]
#[inline(always)]
pub fn xdpgate_snat(ctx: XdpContext) -> u32 {
    let result = snat_stage(&ctx);
    finish(&ctx, parsed_slot(), true, result)
}

/// Stage three, for flows that rewrite headers: NAT and forwarding.
#[xdp]
#[inline(always)]
pub fn xdpgate_act(ctx: XdpContext) -> u32 {
    let result = act_stage(&ctx);
    finish(&ctx, parsed_slot(), true, result)
}

// The tc attach mode: the same pipeline at tc ingress (tcx), for interfaces where XDP is the
// wrong hook (veth, drivers without native XDP): it runs once per GRO aggregate rather than
// per frame, on the socket buffer the stack already has (XDP on a veth copies every cloned
// one into a page), and a redirect keeps the buffer's checksum state (an XDP redirect loses
// CHECKSUM_PARTIAL). The stages are the XDP ones, generic over `hook::Hook`. They share the
// per-CPU SCRATCH and ACTION with the XDP and egress stages: tc ingress runs in the receive
// softirq (or with bottom halves disabled, for a packet a local sender hands a veth), as
// XDP does, so no other pipeline starts on this CPU between a stage writing them and the
// next one reading them.

/// tc stage one: parse (see `xdpgate`).
#[classifier]
#[inline(always)]
pub fn xdpgate_tc(ctx: TcContext) -> i32 {
    let iface = iface_config(ctx.arrival());
    tc_verdict(finish(&ctx, iface.map_or(0, |c| c.slot), false, parse_stage(&ctx, iface)))
}

/// tc stage two: flow lookup (see `xdpgate_policy`).
#[classifier]
#[inline(always)]
pub fn xdpgate_tc_policy(ctx: TcContext) -> i32 {
    let result = policy_stage(&ctx);
    tc_verdict(finish(&ctx, parsed_slot(), true, result))
}

/// tc new-flow stage (see `xdpgate_new_flow`).
#[classifier]
#[inline(always)]
pub fn xdpgate_tc_new_flow(ctx: TcContext) -> i32 {
    let result = new_flow_stage(&ctx);
    tc_verdict(finish(&ctx, parsed_slot(), true, result))
}

/// tc SNAT stage (see `xdpgate_snat`).
#[classifier]
#[inline(always)]
pub fn xdpgate_tc_snat(ctx: TcContext) -> i32 {
    let result = snat_stage(&ctx);
    tc_verdict(finish(&ctx, parsed_slot(), true, result))
}

/// tc act stage: NAT and forwarding (see `xdpgate_act`).
#[classifier]
#[inline(always)]
pub fn xdpgate_tc_act(ctx: TcContext) -> i32 {
    let result = act_stage(&ctx);
    tc_verdict(finish(&ctx, parsed_slot(), true, result))
}

/// A program that passes everything: the baseline benchmarks divide by.
#[xdp]
pub fn xdp_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Sends every frame back out of the interface it came in on: run with
/// BPF_PROG_TEST_RUN in live-frames mode, it makes a traffic generator (`xdpgate-pktgen`).
#[xdp]
pub fn xdp_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[inline(always)]
fn parse_stage<H: Hook>(ctx: &H, iface: Option<&IfaceConfig>) -> Result<u32, DropReason> {
    let parsed = match parse(ctx) {
        Ok(parsed) => parsed,
        Err(e) => {
            ctx.parse_again()?;
            return Err(e);
        }
    };
    let Parsed::Ip(mut meta) = parsed else { return Ok(xdp_action::XDP_PASS) };
    // Neighbour discovery to this host's own address (a neighbour's reachability probe):
    // the kernel's. Routed on, the policy judges it.
    if is_link_control(&meta) && forward::to_this_host(ctx, &meta) {
        return Ok(xdp_action::XDP_PASS);
    }
    meta.iface_slot = iface.map_or(0, |c| c.slot) as u8;
    meta.dir = direction(iface) as u8;
    if ctx.traced() {
        trace::begin(meta.dir);
    } else {
        capture::arrived(ctx, &meta, ctx.arrival());
    }
    // Until the first policy is applied there is nothing to enforce.
    let Some(active) = nsg::active().filter(|a| a.config.generation != 0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    if ctx.traced() {
        return traced_entry(ctx, &active, &meta);
    }
    // A frame sent to the whole link (a broadcast or multicast MAC) to a unicast address
    // touches no flow (it counts in, confirms and remembers nothing of one): routed on from
    // here it is dropped (no router forwards it, RFC 1812 5.3.4); else it is judged as a new
    // flow's packet and left to the stack, with no flow (`flow::create`). (To a multicast or
    // broadcast address it is the link's own traffic: DHCP, mDNS, VRRP.)
    if meta.link_group != 0 && meta.routed_dst() {
        if forward::routed_on(ctx, &meta) {
            return Err(DropReason::LinkBroadcast);
        }
        let slot = SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)?;
        unsafe { *slot = meta };
        request(Action::PASS)?;
        return enter(ctx, H::stages(), PIPELINE_NEW);
    }
    // Most packets belong to an established flow: decided here, without the policy stage.
    let looked = meta.frag == FRAG_NONE && !is_icmp_error(&meta);
    let found = if looked {
        let len = Packet::len(ctx) as u64;
        flow::lookup_established(&active, &meta, len)
    } else {
        None
    };
    if let Some((Lookup::Hit(action), _)) = &found
        && action.nat == NAT_NONE
    {
        return Ok(xdp_action::XDP_PASS);
    }
    let slot = SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    unsafe { *slot = meta };
    if let Some((Lookup::Hit(action), hop)) = &found {
        // The packet as read back from the map, not the parser's copy: the verifier knows
        // nothing of a map's contents, so every way through the parser reaches the
        // forwarding code as one. Each with its own known offsets and family, they took the
        // entry stage to 939,000 of the 1,000,000 instructions it may verify
        // (`testrun_programs`).
        if let Some(verdict) = act_cached(ctx, unsafe { &*slot }, action, hop) {
            return verdict;
        }
    }
    match found {
        Some((Lookup::Hit(action), _)) => decided(ctx, &meta, action),
        Some((Lookup::Stale, _)) => {
            request_reclassify()?;
            enter(ctx, H::stages(), PIPELINE_NEW)
        }
        // Straight to the new-flow stage, which asks the embryonic table first: a packet of
        // no flow takes one tail call fewer than by way of the policy stage.
        _ if looked => {
            request(NOT_ESTABLISHED)?;
            enter(ctx, H::stages(), PIPELINE_NEW)
        }
        _ => {
            request(Action::PASS)?;
            enter(ctx, H::stages(), PIPELINE_POLICY)
        }
    }
}

/// The entry stage for `xdpgate trace`'s packet: the flow tables asked without touching an
/// entry (no counters, state or clock moved); a packet with a flow is reported as its flow
/// and goes no further, one without goes to the new-flow stage.
#[inline(always)]
fn traced_entry<H: Hook>(
    ctx: &H,
    active: &Active<'_>,
    meta: &PacketMeta,
) -> Result<u32, DropReason> {
    let key = flow::key(meta);
    // As the lookups judge it: an entry of another ICMP message, or one idled out, is not the
    // packet's flow.
    let established = unsafe { FLOWS.get(&key) }
        .filter(|e| !flow::other_message(meta, e) && !flow::idled_out::<true>(active, &key, e));
    let entry = established.or_else(|| {
        unsafe { EMBRYOS.get(&key) }
            .or_else(|| flow::waiting_for(meta, &key).map(|e| unsafe { &*e }))
            .filter(|e| !flow::other_message(meta, e) && !flow::idled_out::<false>(active, &key, e))
    });
    trace::lookup(entry, established.is_some());
    let again = entry.is_some_and(|e| flow::judged_again(active, e));
    if entry.is_some() && !again {
        return Ok(xdp_action::XDP_PASS);
    }
    let slot = SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    unsafe { *slot = *meta };
    // A flow decided under an older policy: classified again, as its next packet would
    // have it, the verdict recorded, the entry left as it is.
    if again {
        request_reclassify()?;
    } else {
        let slot = ACTION.get_ptr_mut(0).ok_or(DropReason::Internal)?;
        unsafe { *slot = Action::PASS };
    }
    enter(ctx, H::stages(), PIPELINE_NEW)
}

#[inline(always)]
fn policy_stage<H: Hook>(ctx: &H) -> Result<u32, DropReason> {
    // Written by the parse stage on this CPU just before the tail call.
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    let active = nsg::active().ok_or(DropReason::Internal)?;
    let judged = take_request(JUDGED);
    if meta.frag == FRAG_LATER {
        let Some(action) = flow::later_fragment(meta) else {
            return enter(ctx, H::stages(), PIPELINE_NEW);
        };
        if action.nat == NAT_NONE {
            return Ok(xdp_action::XDP_PASS);
        }
        return hand_on(ctx, action, PIPELINE_ACT);
    }
    let len = Packet::len(ctx) as u64;
    let error = is_icmp_error(meta);
    let action = match error.then(|| icmp::related(ctx, &active, meta)).flatten() {
        Some(action) => action,
        // An error about no flow is judged as new (and makes none), not looked up by its
        // own key (an earlier build's ICMP flow of a message other than echo has the key
        // of every such error between its two hosts).
        None if error => return enter(ctx, H::stages(), PIPELINE_NEW),
        None => match flow::lookup(&active, meta, len, judged) {
            Lookup::Hit(action) => action,
            Lookup::Miss => return enter(ctx, H::stages(), PIPELINE_NEW),
            Lookup::Stale => {
                request_reclassify()?;
                return enter(ctx, H::stages(), PIPELINE_NEW);
            }
        },
    };
    decided(ctx, meta, action)
}

/// A packet the entry stage found no established flow for (its embryonic flow's, if it has
/// one), and whatever needs the NSG classifier: a new flow, a flow decided under an older
/// policy (it goes back to the policy stage once classified again), a later fragment of an
/// unknown datagram.
#[inline(always)]
fn new_flow_stage<H: Hook>(ctx: &H) -> Result<u32, DropReason> {
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    let active = nsg::active().ok_or(DropReason::Internal)?;
    let len = Packet::len(ctx) as u64;
    // One key for the embryonic table's lookup and the new flow: two would not fit the
    // stack.
    let key = flow::key(meta);
    let found = embryo(&active, meta, &key, len);
    let action = match found {
        Some(Lookup::Hit(action)) => action,
        _ => {
            events::set_origin(ctx.arrival(), len as u32, EVENT_AT_INGRESS, meta.tcp_flags);
            if meta.frag == FRAG_LATER {
                flow::untranslated_fragment(ctx, &active, meta)?;
                flow::unknown_fragment(&active, meta)?;
                return Ok(xdp_action::XDP_PASS);
            }
            if judge_again(&found) {
                flow::reclassify(&active, meta, len)?;
                if ctx.traced() {
                    return Ok(xdp_action::XDP_PASS);
                }
                request(JUDGED)?;
                return enter(ctx, H::stages(), PIPELINE_POLICY);
            }
            flow::create(ctx, &active, meta, &key, u32::from(meta.dir), len)?
        }
    };
    decided(ctx, meta, action)
}

/// The embryonic table's answer for a packet the entry stage sent with `NOT_ESTABLISHED`
/// (it found no established flow); `None` for any other.
#[inline(always)]
fn embryo(active: &Active<'_>, meta: &PacketMeta, key: &FlowKey, len: u64) -> Option<Lookup> {
    take_request(NOT_ESTABLISHED)
        .then(|| flow::lookup_embryo(active, meta, key, clock::now_ns(), len, false))
}

/// Whether the new-flow stage classifies the packet's flow again, by what [`embryo`] found:
/// an embryonic flow decided under an older policy, or the stage before asked
/// (`RECLASSIFY`).
#[inline(always)]
fn judge_again(found: &Option<Lookup>) -> bool {
    match found {
        Some(Lookup::Stale) => true,
        Some(_) => false,
        None => take_reclassify(),
    }
}

/// Asks the new-flow stage entered next to classify the packet's flow again.
#[inline(always)]
fn request_reclassify() -> Result<(), DropReason> {
    request(RECLASSIFY)
}

/// Leaves `request` in `ACTION` for the stage entered next.
#[inline(always)]
fn request(request: Action) -> Result<(), DropReason> {
    let slot = ACTION.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    unsafe { *slot = request };
    Ok(())
}

/// Whether the policy stage handed this packet over to have its flow classified again
/// (`RECLASSIFY` in `ACTION`); clears the request.
#[inline(always)]
fn take_reclassify() -> bool {
    take_request(RECLASSIFY)
}

/// Whether the stage before left `request` in `ACTION`; clears it.
#[inline(always)]
fn take_request(request: Action) -> bool {
    match ACTION.get_ptr_mut(0) {
        Some(a) if unsafe { (*a).nat } == request.nat => {
            unsafe { (*a).nat = NAT_NONE };
            true
        }
        _ => false,
    }
}

/// Passes a packet whose flow needs no rewrite, or hands it to the stage that rewrites it.
#[inline(always)]
fn decided<H: Hook>(ctx: &H, meta: &PacketMeta, action: Action) -> Result<u32, DropReason> {
    if action.nat == TO_STACK.nat {
        return Ok(xdp_action::XDP_PASS);
    }
    if action.nat == NAT_NONE {
        if meta.frag == FRAG_FIRST {
            flow::remember_first_fragment(meta, &action);
        }
        return Ok(xdp_action::XDP_PASS);
    }
    let next = if action.nat == NAT_PENDING_SNAT { PIPELINE_SNAT } else { PIPELINE_ACT };
    hand_on(ctx, action, next)
}

/// Leaves the action for the next stage on this CPU and tail-calls it.
#[inline(always)]
fn hand_on<H: Hook>(ctx: &H, action: Action, next: u32) -> Result<u32, DropReason> {
    let slot = ACTION.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    unsafe { *slot = action };
    enter(ctx, H::stages(), next)
}

/// Tail-calls stage `index` of `stages`. Returns only when that stage is missing: fail
/// closed.
#[inline(always)]
fn enter<R>(ctx: &impl EbpfContext, stages: &ProgramArray, index: u32) -> Result<R, DropReason> {
    unsafe { stages.tail_call(ctx, index) };
    Err(DropReason::Internal)
}

#[inline(always)]
fn snat_stage<H: Hook>(ctx: &H) -> Result<u32, DropReason> {
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    events::set_origin(ctx.arrival(), Packet::len(ctx) as u32, EVENT_AT_INGRESS, meta.tcp_flags);
    let gw = u32::from(ACTION.get(0).ok_or(DropReason::Internal)?.port);
    if trace::active() {
        // No port is claimed for a trace: the flow ends here, its rewrite unknown.
        if let Some(pair) = FLOW_SCRATCH.get(0) {
            trace::flow(&pair[0]);
        }
        trace::stage(STAGE_SNAT);
        trace::snat(gw);
        return Ok(xdp_action::XDP_PASS);
    }
    let action = flow::commit_snat(meta, gw, Packet::len(ctx) as u64)?;
    hand_on(ctx, action, PIPELINE_ACT)
}

/// Applies a flow's rewrite and forwards the packet; a program of its own so that its stack
/// and paths do not add to the policy stage's.
#[inline(always)]
fn act_stage<H: Hook>(ctx: &H) -> Result<u32, DropReason> {
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    let action = ACTION.get(0).ok_or(DropReason::Internal)?;
    trace::stage(STAGE_ACT);
    trace::action(action);
    // Here, after the SNAT stage, the first fragment's rewrite is final.
    if meta.frag == FRAG_FIRST {
        flow::remember_first_fragment(meta, action);
    }
    let hop = match action.nat {
        NAT_NONE | NAT_ICMP_ERROR_DST | NAT_ICMP_ERROR_SRC => None,
        _ => flow::next_hop_cache(meta),
    };
    act(ctx, meta, action, hop)
}

/// A translated flow's established packet, rewritten and forwarded in the entry stage by
/// its entry's cached next hop: no tail call and no second lookup for the hop. `None`: the
/// act stage's way.
#[inline(always)]
fn act_cached<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    action: &Action,
    hop: &NextHop,
) -> Option<Result<u32, DropReason>> {
    let len = Packet::len(ctx) as u64;
    match action.nat {
        NAT_NEXT_HOP => forward::by_cache(ctx, meta, len, hop, || Ok(())),
        NAT_DST => forward::by_cache(ctx, meta, len, hop, || {
            ctx.rewrite(meta, NAT_DST, &action.addr, action.port)
        }),
        NAT_SRC => forward::by_cache(ctx, meta, len, hop, || {
            ctx.rewrite(meta, NAT_SRC, &action.addr, action.port)
        }),
        _ => None,
    }
}

/// Applies the rewrite of `action` and forwards the packet, by the flow direction's cached
/// next hop `hop` while it holds.
#[inline(always)]
fn act<H: Hook>(
    ctx: &H,
    meta: &PacketMeta,
    action: &Action,
    hop: Option<&mut NextHop>,
) -> Result<u32, DropReason> {
    let len = Packet::len(ctx) as u64;
    match action.nat {
        NAT_NONE => Ok(xdp_action::XDP_PASS),
        NAT_NEXT_HOP => forward::direct(ctx, meta, &action.addr, len, hop),
        // A packet the stack answers with an error of its own goes to it translated too (a
        // load balancer's frontend may be this host's address, which the stack would take
        // for its own); the egress stage translates that error on its way out.
        NAT_DST => forward::forward(ctx, meta, &meta.src, &action.addr, len, hop, false, || {
            ctx.rewrite(meta, NAT_DST, &action.addr, action.port)
        }),
        // Its flow stays embryonic (the backend answers the client directly), so it never
        // takes the entry stage's cached way.
        NAT_ENCAP => encap::forward(ctx, meta, &action.addr, len, hop),
        // Not a flow's own packet: no flow entry to keep its next hop in. An error going
        // back to the flow's host travels to the translated address, one going out leaves
        // from it.
        NAT_ICMP_ERROR_DST | NAT_ICMP_ERROR_SRC => {
            let (kind, src, to) = if action.nat == NAT_ICMP_ERROR_DST {
                (NAT_DST, &meta.src, &action.addr)
            } else {
                (NAT_SRC, &action.addr, &meta.dst)
            };
            forward::forward(ctx, meta, src, to, len, None, false, || {
                ctx.rewrite_icmp_error(meta, kind, &action.addr, action.port, true)
            })
        }
        _ => forward::forward(ctx, meta, &action.addr, &meta.dst, len, hop, true, || {
            ctx.rewrite(meta, NAT_SRC, &action.addr, action.port)
        }),
    }
}

/// The arrival interface's counter slot, as the parse stage found it for this packet. Read
/// after the stage has run: a value held across it takes a register the stage needs, and
/// the verifier's path count explodes.
#[inline(always)]
fn parsed_slot() -> u32 {
    SCRATCH.get(0).map_or(0, |m| u32::from(m.iface_slot))
}

/// The single exit of every stage: count the verdict per interface `slot` (and the drop
/// reason); the capture's `post` copy. `parsed`: a later stage, which finds the packet in
/// `SCRATCH`.
#[inline(always)]
fn finish<H: Hook>(ctx: &H, slot: u32, parsed: bool, result: Result<u32, DropReason>) -> u32 {
    // A traced packet moves no counter, sends no event and is not captured.
    let traced = ctx.traced();
    let (action, reason) = match result {
        Ok(action) => (action, 0),
        Err(reason) => {
            if !traced {
                count_drop(ctx, reason, parsed, EVENT_AT_INGRESS);
            }
            (xdp_action::XDP_DROP, reason as u8)
        }
    };
    if traced {
        trace::end(action, reason);
        return action;
    }
    count_verdict(ctx, slot, action);
    capture::leaving(ctx, action, reason);
    action
}

/// Packets arriving on an internal interface are outbound, all others inbound.
#[inline(always)]
fn direction(iface: Option<&IfaceConfig>) -> u32 {
    match iface {
        Some(c) if c.role == Role::Internal as u32 => DIR_OUTBOUND,
        _ => DIR_INBOUND,
    }
}

#[inline(always)]
fn count_verdict(ctx: &impl Packet, slot: u32, action: u32) {
    if let Some(c) = IFACE_STATS.get_ptr_mut(iface_stat_index(slot, action)) {
        // Per-CPU slot: no other CPU writes it, so plain adds are exact.
        unsafe {
            (*c).packets += 1;
            // A frame's length; a socket buffer's whole length (a GRO aggregate's bytes).
            (*c).bytes += ctx.len() as u64;
        }
    }
}

/// Counts a drop, and reports it (see `events::dropped`); `parsed`: the packet is in
/// `SCRATCH`.
#[inline(always)]
fn count_drop<H: Hook>(ctx: &H, reason: DropReason, parsed: bool, point: u8) {
    count_drop_reason(reason);
    events::dropped(reason as u32, parsed, point, ctx.arrival(), Packet::len(ctx) as u32);
    if reason == DropReason::Internal {
        // Rare by construction (a missing stage or scratch map), so worth a log line; never
        // logged per packet on a normal path.
        error!(ctx, "xdpgate: pipeline stage or scratch map missing; dropping (fail closed)");
    }
}

// The host's own packets, on tc egress. XDP sees only arriving packets: without this, the
// outbound rules would never judge what the host sends, and the answers to the host's own
// connections would arrive as new inbound flows. Forwarded packets were judged by XDP on
// arrival and pass untouched. The stages share the per-CPU scratch maps with the XDP
// stages: tc egress runs with bottom halves disabled, so no XDP program (NAPI softirq) runs
// on this CPU in the middle of an egress pipeline, and an egress program never runs in the
// middle of an XDP one (XDP transmits through devmaps, past tc).

/// Egress stage one: parse the host's own IP packets and look in the established table,
/// then (without an established flow) the new-flow stage, or the policy stage.
#[classifier]
#[inline(always)]
pub fn xdpgate_egress(ctx: TcContext) -> i32 {
    let slot = iface_config(unsafe { (*ctx.skb.skb).ifindex }).map_or(0, |c| c.slot);
    finish_egress(&ctx, slot, false, egress_parse_stage(&ctx, slot))
}

/// Egress stage two, for fragments, ICMP errors and a flow judged again: flow lookup (hit:
/// done; miss: the new-flow stage).
#[classifier]
#[inline(always)]
pub fn xdpgate_egress_policy(ctx: TcContext) -> i32 {
    let result = egress_policy_stage(&ctx);
    finish_egress(&ctx, parsed_slot(), true, result)
}

/// Egress stage three, for a packet of the host's without an established flow: its
/// embryonic flow's, else NSG classification, a new flow.
#[classifier]
#[inline(always)]
pub fn xdpgate_egress_new(ctx: TcContext) -> i32 {
    let result = egress_new_stage(&ctx);
    finish_egress(&ctx, parsed_slot(), true, result)
}

/// Headers are pulled into the linear area of the socket buffer this far (a short packet, to
/// its end) when they do not lie there already: past the deepest the parser follows
/// (`MAX_HDR_OFF`) and an ICMP error's quote.
const EGRESS_PULL: u32 = 1024;

/// `Ok(None)`: not the host's own packet, or nothing to enforce yet: passed untouched.
#[inline(always)]
fn egress_parse_stage(ctx: &TcContext, slot: u32) -> Result<Option<()>, DropReason> {
    // skb_iif: the interface a forwarded packet arrived on; 0 for a packet built by this
    // host (skb_scrub_packet zeroes it too when a tunnel or veth hands a packet on, so the
    // outer packet of a tunnel this host encapsulates is judged as the host's own).
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return Ok(None);
    }
    let meta = match parse(ctx) {
        // The host's own neighbour discovery, also to a neighbour's unicast address.
        Ok(Parsed::Ip(meta)) if is_link_control(&meta) => return Ok(None),
        Ok(Parsed::Ip(meta)) => meta,
        Ok(Parsed::LinkControl) => return Ok(None),
        Err(e) => {
            // The host builds its headers in the linear area, but a packet from a raw or
            // packet socket may not: pull them there and parse once more (after the pull
            // the linear area holds what it can, so this happens once).
            let want = ctx.len().min(EGRESS_PULL);
            if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_ok() {
                return enter(ctx, &EGRESS_PIPELINE, EGRESS_PARSE);
            }
            return Err(e);
        }
    };
    let Some(active) = nsg::active().filter(|a| a.config.generation != 0) else {
        return Ok(None);
    };
    let mut meta = meta;
    meta.iface_slot = slot as u8;
    meta.dir = DIR_OUTBOUND as u8;
    // As on arrival: a packet of an established flow is decided here, without the policy
    // stage.
    let looked = meta.frag == FRAG_NONE && !is_icmp_error(&meta);
    let found =
        if looked { flow::lookup_established(&active, &meta, u64::from(ctx.len())) } else { None };
    if let Some((Lookup::Hit(_), _)) = found {
        return Ok(Some(()));
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    unsafe { *scratch = meta };
    if let Some((Lookup::Stale, _)) = found {
        request_reclassify()?;
        return enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW);
    }
    // As on arrival: without an established flow, to the new-flow stage, which asks the
    // embryonic table first.
    if looked {
        request(NOT_ESTABLISHED)?;
        return enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW);
    }
    request(Action::PASS)?;
    enter(ctx, &EGRESS_PIPELINE, EGRESS_POLICY)
}

/// The host's packet passes as part of a known flow: a later fragment, an ICMP error
/// quoting it, a hit in the flow tables (their TCP tracking and confirmation run as on
/// arrival). Without one, the new-flow stage.
#[inline(always)]
fn egress_policy_stage(ctx: &TcContext) -> Result<Option<()>, DropReason> {
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    let active = nsg::active().ok_or(DropReason::Internal)?;
    let judged = take_request(JUDGED);
    if meta.frag == FRAG_LATER {
        return match flow::later_fragment(meta) {
            Some(_) => Ok(Some(())),
            None => enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW),
        };
    }
    if is_icmp_error(meta) {
        // As on arrival: an error about no flow is judged as new, not looked up by its key.
        return match icmp::related(ctx, &active, meta) {
            // The stack's own error about a packet it got translated (a load balancer's
            // client's packet too long for the route to the backend, say) quotes what the
            // sender sent, so that the sender takes it for its own; it comes from this
            // host's address, as a router's does (traceroute shows this hop). (An
            // unfragmented error: the stack's never are.)
            Some(a) if a.nat == NAT_ICMP_ERROR_SRC && meta.frag == FRAG_NONE => {
                ctx.rewrite_icmp_error(meta, NAT_SRC, &a.addr, a.port, false)?;
                Ok(Some(()))
            }
            Some(_) => Ok(Some(())),
            None => enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW),
        };
    }
    match flow::lookup(&active, meta, u64::from(ctx.len()), judged) {
        Lookup::Hit(_) => Ok(egress_passed(meta)),
        Lookup::Miss => enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW),
        Lookup::Stale => {
            request_reclassify()?;
            enter(ctx, &EGRESS_PIPELINE, EGRESS_NEW)
        }
    }
}

/// A packet of the host's without a flow, judged by the outbound rules as a new flow.
#[inline(always)]
fn egress_new_stage(ctx: &TcContext) -> Result<Option<()>, DropReason> {
    let meta = SCRATCH.get(0).ok_or(DropReason::Internal)?;
    let active = nsg::active().ok_or(DropReason::Internal)?;
    let len = ctx.len();
    let key = flow::key(meta);
    let found = embryo(&active, meta, &key, u64::from(len));
    if let Some(Lookup::Hit(_)) = found {
        return Ok(egress_passed(meta));
    }
    events::set_origin(ctx.arrival(), len, EVENT_AT_EGRESS, meta.tcp_flags);
    if meta.frag == FRAG_LATER {
        flow::unknown_fragment(&active, meta)?;
        return Ok(Some(()));
    }
    if judge_again(&found) {
        flow::reclassify(&active, meta, u64::from(len))?;
        request(JUDGED)?;
        return enter(ctx, &EGRESS_PIPELINE, EGRESS_POLICY);
    }
    flow::create_host(ctx, &active, meta, &key, u32::from(meta.dir), u64::from(len))?;
    Ok(egress_passed(meta))
}

/// The host's packet passes: its later fragments will follow it.
#[inline(always)]
fn egress_passed(meta: &PacketMeta) -> Option<()> {
    if meta.frag == FRAG_FIRST {
        flow::remember_first_fragment(meta, &Action::PASS);
    }
    Some(())
}

/// The single exit of the egress stages: `Some` is a verdict on a packet of the host's,
/// counted per interface `slot`. Passing leaves the packet to whatever runs after this
/// program (`TCX_NEXT`).
#[inline(always)]
fn finish_egress(
    ctx: &TcContext,
    slot: u32,
    parsed: bool,
    result: Result<Option<()>, DropReason>,
) -> i32 {
    let dropped = match result {
        Ok(None) => return TC_ACT_UNSPEC,
        Ok(Some(())) => false,
        Err(reason) => {
            count_drop(ctx, reason, parsed, EVENT_AT_EGRESS);
            true
        }
    };
    if let Some(c) = EGRESS_STATS.get_ptr_mut(egress_stat_index(slot, dropped)) {
        // Per-CPU slot: plain adds are exact.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    if dropped { TC_ACT_SHOT as i32 } else { TC_ACT_UNSPEC }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
