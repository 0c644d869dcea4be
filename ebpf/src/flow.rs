//! The flow table: the first packet of a flow is classified, every later packet of it (and
//! of its reply direction) is one hash lookup. Entries expire by idle time, early once TCP
//! has closed, and are classified again after a policy change when so configured.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use xdpgate_common::{
    flow::{FlowKey, FlowValue, FragKey, TCP_CLOSED, TCP_FIN},
    nsg::{FLAG_REEVALUATE, PolicyConfig, TCP_CLOSED_TIMEOUT_NS},
    stats::DropReason,
};

use crate::{
    headers::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP},
    maps::{FLOWS, FRAGS},
    nsg::{Active, classify},
    parse::PacketMeta,
};

const TH_FIN: u8 = 0x01;
const TH_RST: u8 = 0x04;

#[inline(always)]
pub fn key(meta: &PacketMeta) -> FlowKey {
    FlowKey {
        src: meta.src,
        dst: meta.dst,
        sport: meta.sport,
        dport: meta.dport,
        proto: meta.proto,
        family: meta.family,
        _pad: [0; 2],
    }
}

/// The packet as the flow's first packet saw it: a reply entry is re-checked with the
/// original orientation.
#[inline(always)]
fn reversed(meta: &PacketMeta) -> PacketMeta {
    let mut m = *meta;
    m.src = meta.dst;
    m.dst = meta.src;
    m.sport = meta.dport;
    m.dport = meta.sport;
    m
}

#[inline(always)]
fn timeout_ns(config: &PolicyConfig, proto: u8, tcp: u8) -> u64 {
    match proto {
        IPPROTO_TCP if tcp & TCP_CLOSED != 0 => TCP_CLOSED_TIMEOUT_NS,
        IPPROTO_TCP => config.tcp_timeout_ns,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => config.icmp_timeout_ns,
        _ => config.udp_timeout_ns,
    }
}

/// Decides a packet of a flow: allowed packets return Ok, denied ones the drop reason.
#[inline(always)]
pub fn process(
    active: &Active<'_>,
    meta: &PacketMeta,
    dir: u32,
    len: u64,
) -> Result<(), DropReason> {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = key(meta);
    if let Some(entry) = FLOWS.get_ptr_mut(&key) {
        let entry = unsafe { &mut *entry };
        if now.wrapping_sub(entry.last_seen_ns) <= timeout_ns(active.config, meta.proto, entry.tcp)
        {
            revalidate(active, meta, &key, entry)?;
            entry.last_seen_ns = now;
            entry.packets += 1;
            entry.bytes += len;
            if meta.proto == IPPROTO_TCP && meta.tcp_flags & (TH_FIN | TH_RST) != 0 {
                track_close(&key, entry, meta.tcp_flags);
            }
            return Ok(());
        }
        // Idle too long: a new flow, classified afresh.
    }

    let decision = classify(active, meta, dir);
    if !decision.allowed {
        return Err(DropReason::Policy);
    }
    let forward = FlowValue {
        generation: active.config.generation,
        last_seen_ns: now,
        packets: 1,
        bytes: len,
        rule: decision.rule,
        direction: dir as u8,
        reply: 0,
        tcp: 0,
        _pad: 0,
    };
    let reply = FlowValue { reply: 1, packets: 0, bytes: 0, ..forward };
    // A full table evicts the least recently used flows; a failed insert only means the
    // next packet is classified again.
    let _ = FLOWS.insert(&key, &forward, 0);
    let _ = FLOWS.insert(&key.reversed(), &reply, 0);
    Ok(())
}

/// A flow decided under an older policy is classified again (in the orientation of its first
/// packet) when the policy asks for it; a flow the new policy denies is removed both ways.
#[inline(always)]
fn revalidate(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    entry: &mut FlowValue,
) -> Result<(), DropReason> {
    let generation = active.config.generation;
    if entry.generation == generation {
        return Ok(());
    }
    if active.config.flags & FLAG_REEVALUATE != 0 {
        let original = if entry.reply != 0 { reversed(meta) } else { *meta };
        let decision = classify(active, &original, u32::from(entry.direction));
        if !decision.allowed {
            let _ = FLOWS.remove(key);
            let _ = FLOWS.remove(&key.reversed());
            return Err(DropReason::Policy);
        }
        entry.rule = decision.rule;
    }
    entry.generation = generation;
    Ok(())
}

/// RST closes the flow; FIN closes it once both directions have sent one.
#[inline(always)]
fn track_close(key: &FlowKey, entry: &mut FlowValue, flags: u8) {
    let twin = FLOWS.get_ptr_mut(&key.reversed()).map(|p| unsafe { &mut *p });
    if flags & TH_RST != 0 {
        entry.tcp |= TCP_CLOSED;
        if let Some(t) = twin {
            t.tcp |= TCP_CLOSED;
        }
        return;
    }
    entry.tcp |= TCP_FIN;
    if let Some(t) = twin
        && t.tcp & TCP_FIN != 0
    {
        t.tcp |= TCP_CLOSED;
        entry.tcp |= TCP_CLOSED;
    }
}

#[inline(always)]
fn frag_key(meta: &PacketMeta) -> FragKey {
    FragKey {
        src: meta.src,
        dst: meta.dst,
        id: meta.frag_id,
        proto: meta.proto,
        family: meta.family,
        _pad: [0; 2],
    }
}

/// The first fragment of a datagram was allowed: let its later fragments through.
#[inline(always)]
pub fn remember_first_fragment(meta: &PacketMeta) {
    let _ = FRAGS.insert(&frag_key(meta), &1, 0);
}

/// A non-first fragment carries no ports, so rules on ports cannot judge it: it passes only
/// when its first fragment was allowed, or when no NSG applies to it at all.
#[inline(always)]
pub fn later_fragment(active: &Active<'_>, meta: &PacketMeta, dir: u32) -> Result<(), DropReason> {
    if unsafe { FRAGS.get(&frag_key(meta)) }.is_some() {
        return Ok(());
    }
    if classify(active, meta, dir).unfiltered { Ok(()) } else { Err(DropReason::Fragment) }
}
