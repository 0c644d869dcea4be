//! The flow tables: the first packet of a flow is classified, every later packet of it (and
//! of its reply direction) is one hash lookup. A new flow is embryonic until both ends have
//! taken part, then established; a flood of new flows can evict only embryos, and a flow a
//! full established table has no room for stays embryonic. Entries expire by idle time,
//! early once TCP has closed, and are classified again after a policy change when so
//! configured.

use aya_ebpf::{EbpfContext, bindings::BPF_NOEXIST};
use xdpgate_common::{
    events::{EVENT_BEGIN, EVENT_DENY},
    flow::{
        ASSURED, FLOW_STAT_EMBRYOS_CLOSED, FLOW_STAT_EMBRYOS_CONFIRMED, FLOW_STAT_EMBRYOS_CREATED,
        FLOW_STAT_EMBRYOS_EXPIRED, FLOW_STAT_EMBRYOS_REFUSED, FLOW_STAT_PICKED_UP,
        FLOW_STAT_REBUILT, FlowKey, FlowValue, FragKey, FragValue, ICMP_NO_ANSWER, NAT_DST,
        NAT_ENCAP, NAT_NEXT_HOP, NAT_NONE, NAT_SRC, NO_RULE, NO_RULES, NextHop, TCP_ANSWERED,
        TCP_CLOSED, TCP_FIN, TCP_LONE, TCP_MIDSTREAM, TCP_SEQ,
    },
    lb::NO_BACKEND,
    nat::NAT_ACTIVE,
    nsg::{
        DIR_INBOUND, DIR_OUTBOUND, FLAG_MIDSTREAM, FLAG_NO_FRONTENDS, FLAG_NO_NAT, FLAG_REEVALUATE,
        MAX_RULES, TABLES_PER_SLOT,
    },
    stats::DropReason,
    trace::{LB_NO_BACKEND, LB_NO_RULE},
};

use crate::{
    action::{Action, NAT_ICMP_ERROR_DST, NAT_ICMP_ERROR_SRC, NAT_PENDING_SNAT, TO_STACK},
    clock, events, forward,
    headers::IPPROTO_TCP,
    hook::Hook,
    lb::{self, Lb},
    maps::{
        BACKEND_STATS, BACKENDS, CLASSIFY_SCRATCH, EMBRYOS, FLOW_SCRATCH, FLOW_STATS, FLOWS, FRAGS,
        NSG_RULE_MOVES, NSG_TRAFFIC, SERVICE_STATS,
    },
    nsg::{Active, classify},
    parse::{PacketMeta, icmp_mark, is_echo_request, is_icmp_error, paired_mark},
    snat, trace,
};

const TH_FIN: u8 = 0x01;
const TH_SYN: u8 = 0x02;
const TH_RST: u8 = 0x04;
const TH_ACK: u8 = 0x10;

#[inline(always)]
pub fn key(meta: &PacketMeta) -> FlowKey {
    FlowKey {
        src: meta.src,
        dst: meta.dst,
        sport: meta.sport,
        dport: meta.dport,
        proto: meta.proto,
        family: meta.family,
        kind: meta.icmp_kind,
        _pad: 0,
    }
}

/// The cached next hop of the flow direction `meta` belongs to, established or embryonic
/// (a floating-IP flow, whose answers bypass the gateway, stays embryonic).
#[inline(always)]
pub fn next_hop_cache(meta: &PacketMeta) -> Option<&'static mut NextHop> {
    let key = key(meta);
    let entry = FLOWS.get_ptr_mut(&key).or_else(|| EMBRYOS.get_ptr_mut(&key))?;
    Some(unsafe { &mut (*entry).hop })
}

/// The packet as policy judged the flow's first packet: oriented as the first packet, after
/// load-balancing DNAT (NSG rules name backends, not frontends). Built in per-CPU scratch
/// to spare the stack.
#[inline(always)]
fn as_classified(meta: &PacketMeta, entry: &FlowValue) -> Result<&'static PacketMeta, DropReason> {
    let m = unsafe { &mut *CLASSIFY_SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)? };
    *m = *meta;
    if entry.reply != 0 {
        m.src = meta.dst;
        m.dst = meta.src;
        m.sport = meta.dport;
        m.dport = meta.sport;
        if entry.nat == NAT_DST {
            // The reply of a source-NATed flow: its first packet came from the private host.
            m.src = entry.nat_addr;
            m.sport = entry.nat_port;
            if m.is_icmp() {
                m.dport = entry.nat_port;
            }
        }
    } else if matches!(entry.nat, NAT_DST | NAT_NEXT_HOP | NAT_ENCAP) {
        m.dst = entry.nat_addr;
        m.dport = entry.nat_port;
    }
    Ok(m)
}

/// What the flow tables say of a packet.
pub enum Lookup {
    /// A packet of a known flow, passed with the flow's action.
    Hit(Action),
    /// No flow: decided as a new one ([`create`]).
    Miss,
    /// A flow decided under an older policy, to be classified again ([`reclassify`])
    /// before its packet is decided.
    Stale,
}

/// Decides a packet of a known flow: established flows are one lookup; a miss looks among
/// the embryonic flows. Never classifies: that is the new-flow stage's work, which keeps
/// this stage small. `judged`: that stage has just classified this packet's flow again, so
/// it is not stale (while a set change runs, every flow would be, and the packet would go
/// round between the two stages).
#[inline(always)]
pub fn lookup(active: &Active<'_>, meta: &PacketMeta, len: u64, judged: bool) -> Lookup {
    // The coarse clock (tick resolution) is plenty for timeouts counted in seconds, and
    // the precise one cost a third of an established packet here (100 vs 68 ns).
    let now = clock::now_ns();
    let key = key(meta);
    if let Some(found) = established(active, meta, &key, now, len, judged) {
        return found;
    }
    lookup_embryo(active, meta, &key, now, len, judged)
}

/// [`lookup`] in the established table alone: `None` when the flow is not there, or is
/// there no more (its entries are removed), and the embryonic table decides.
#[inline(always)]
pub fn lookup_established(
    active: &Active<'_>,
    meta: &PacketMeta,
    len: u64,
) -> Option<(Lookup, &'static mut NextHop)> {
    let key = key(meta);
    let entry = unsafe { &mut *FLOWS.get_ptr_mut(&key)? };
    let found = established_entry(active, meta, &key, entry, clock::now_ns(), len, false)?;
    // The entry's own next-hop cache: a translated hit is forwarded without a second lookup.
    Some((found, &mut entry.hop))
}

/// [`lookup`] in the embryonic table alone, once the established table had no flow.
#[inline(always)]
pub fn lookup_embryo(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    now: u64,
    len: u64,
    judged: bool,
) -> Lookup {
    let entry = match EMBRYOS.get_ptr_mut(key) {
        Some(entry) => entry,
        None => {
            let Some(first) = waiting_for(meta, key) else { return Lookup::Miss };
            let first = unsafe { &mut *first };
            if let Some(found) = answer(active, meta, key, first, now, len) {
                return found;
            }
            match made_reply(key, first) {
                Some(entry) => entry,
                None => return Lookup::Miss,
            }
        }
    };
    embryo(active, meta, key, unsafe { &mut *entry }, now, len, judged)
}

/// A packet back of a lone flow (`TCP_LONE`, on the reply tuple `key`), judged without a
/// reply entry in what is nearly every case: the flow decided under the running policy
/// and not idle. It passes as the flow's and counts in its entry; a SYN-ACK marks the
/// flow answered (its initiator's ACK then confirms it), a reset ends it. `None`: another
/// case, for which [`made_reply`] makes the reply entry and the embryo path judges it.
#[inline(always)]
fn answer(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    first: &mut FlowValue,
    now: u64,
    len: u64,
) -> Option<Lookup> {
    let timeout = active.config.embryo_timeout_ns(meta.family, meta.proto, first);
    let idle = now.saturating_sub(first.last_seen_ns) > timeout;
    if !decided_now(active, first) || (idle && !answered_within(first, now, timeout)) {
        return None;
    }
    count_rules(first.rules, len);
    if handshake(meta, first, true, None) {
        // Refused or aborted before it was established: over, and its RST passes.
        count(FLOW_STAT_EMBRYOS_CLOSED);
        let _ = EMBRYOS.remove(&key.reversed());
        return Some(Lookup::Hit(Action::PASS));
    }
    first.count_answer(len, now);
    Some(Lookup::Hit(Action::PASS))
}

/// Follows a TCP segment of an embryonic flow through its handshake, in the flow's forward
/// entry `first` (`back`: the segment comes from the answering end, and `reply` is the
/// flow's reply entry, if it has one); true: a reset ends the flow. Until answered, the
/// flow keeps its first SYN's sequence number + 1 in `seq`: only a SYN-ACK or a reset from
/// the answering end that acknowledges it, or a reset from the initiator at it, counts, as
/// its host takes only those (RFC 9293 3.10.7.3). A SYN with another number changes it
/// not: conntrack takes a later one as a new connection on the tuple, but so it would a
/// spoofer's, whose number it then knows (an outside review's find). Once answered, `seq`
/// holds the SYN-ACK's number + 1 (the SYN's is kept, see [`kept_syn`]), which only
/// another SYN-ACK that acknowledges the SYN changes (the first one lost past the gateway,
/// the server answered the SYN sent again anew), and a reset counts only at it. So an
/// off-path spoofer must guess a number to end the flow or to keep it from being
/// confirmed. What does not count passes unchanged, for its host to judge, as conntrack
/// ignores it: an ACK of an older connection on the tuple, say, which the initiator
/// answers with the reset that clears that connection.
#[inline(never)]
fn handshake(
    meta: &PacketMeta,
    first: &mut FlowValue,
    back: bool,
    reply: Option<&mut FlowValue>,
) -> bool {
    let (flags, seq, ack) = (meta.tcp_flags, meta.tcp_seq, meta.tcp_ack);
    let rst = flags & TH_RST != 0;
    let answered = first.tcp & TCP_ANSWERED != 0;
    // Picked up mid-stream (no SYN seen), or made by a build that kept no number: any
    // reset counts, and any SYN-ACK answers.
    let unknown = first.tcp & TCP_MIDSTREAM != 0 || (first.seq == 0 && !answered);
    if back && !rst && flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
        if !answered && (unknown || acks_syn(ack, first.seq)) {
            let syn = first.seq;
            *kept_syn(first, reply) = syn;
            first.tcp |= TCP_ANSWERED;
            first.seq = seq.wrapping_add(1);
        } else if answered && acks_syn(ack, *kept_syn(first, reply)) {
            first.seq = seq.wrapping_add(1);
        }
        return false;
    }
    rst && (unknown
        || match (back, answered) {
            (true, false) => flags & TH_ACK != 0 && acks_syn(ack, first.seq),
            (false, false) => acks_syn(seq, first.seq),
            (true, true) => seq == first.seq,
            (false, true) => flags & TH_ACK != 0 && ack == first.seq,
        })
}

/// Where an answered embryonic TCP flow keeps its SYN's number + 1, its `seq` holding the
/// answer's: the reply entry's `seq`, which holds no number of its own until the flow is
/// confirmed, or a lone flow's `hop` (`TCP_LONE`: the dataplane forwards no flow that
/// nothing rewrites, so it caches no next hop).
#[inline(always)]
fn kept_syn<'a>(first: &'a mut FlowValue, reply: Option<&'a mut FlowValue>) -> &'a mut u32 {
    match reply {
        Some(reply) => &mut reply.seq,
        None => &mut first.hop.generation,
    }
}

/// Whether `n` acknowledges a SYN whose number + 1 is `syn`: that, or up to 64 KiB past
/// it, as a SYN may carry data (TCP Fast Open) that its answer acknowledges too. (A blind
/// guess then hits one time in 65,536, an established flow's reset window one in 512.)
#[inline(always)]
fn acks_syn(n: u32, syn: u32) -> bool {
    n.wrapping_sub(syn) <= u32::from(u16::MAX)
}

/// Makes the reply entry of the lone flow `first` (on `key`), its answers counted in it,
/// and returns it.
#[inline(always)]
fn made_reply(key: &FlowKey, first: &mut FlowValue) -> Option<*mut FlowValue> {
    let reply = lone_reply(first)?;
    // Not over one another CPU's packet made meanwhile.
    let _ = EMBRYOS.insert(key, &*reply, u64::from(BPF_NOEXIST));
    EMBRYOS.get_ptr_mut(key)
}

/// The reply entry of the lone flow `first`, its answers counted in it, built in per-CPU
/// scratch; `first` is no longer lone.
#[inline(always)]
fn lone_reply(first: &mut FlowValue) -> Option<&'static mut FlowValue> {
    let reply = unsafe { &mut (*FLOW_SCRATCH.get_ptr_mut(0)?)[1] };
    reply_of(first, reply);
    first.not_lone();
    Some(reply)
}

/// [`waiting_first`] for a packet on `key`: a segment other than a SYN. A SYN opens a
/// flow of its own, not looked up here, so that the SYN of every new flow pays no lookup
/// more. (The second SYN of a simultaneous open is judged as a new flow's, which becomes
/// this one's reply if the policy lets it in: see `crossed`.)
#[inline(always)]
pub fn waiting_for(meta: &PacketMeta, key: &FlowKey) -> Option<*mut FlowValue> {
    if meta.tcp_flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN) == TH_SYN {
        return None;
    }
    waiting_first(key)
}

/// The entry of a lone flow (`TCP_LONE`) whose reply entry would have `key`: its stand-in
/// until it is made.
#[inline(always)]
pub fn waiting_first(key: &FlowKey) -> Option<*mut FlowValue> {
    if key.proto != IPPROTO_TCP {
        return None;
    }
    EMBRYOS.get_ptr_mut(&key.reversed()).filter(|e| unsafe { &**e }.lone())
}

/// The reply entry of the flow whose entry of the other direction is `forward` (see
/// `FlowValue::reply_into`). A call of its own: inlined in `commit`, it cost the new-flow
/// stage stack it does not have.
#[inline(never)]
fn reply_of(forward: &FlowValue, reply: &mut FlowValue) {
    forward.reply_into(reply);
}

#[inline(always)]
fn established(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    now: u64,
    len: u64,
    judged: bool,
) -> Option<Lookup> {
    let entry = unsafe { &mut *FLOWS.get_ptr_mut(key)? };
    established_entry(active, meta, key, entry, now, len, judged)
}

#[inline(always)]
fn established_entry(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    entry: &mut FlowValue,
    now: u64,
    len: u64,
    judged: bool,
) -> Option<Lookup> {
    if other_message(meta, entry) {
        return None;
    }
    let timeout = active.config.idle_timeout_ns(meta.family, meta.proto, entry.tcp, entry.idle_s);
    // Saturating: another CPU may have stamped the entry after this packet read the clock.
    let alive = now.saturating_sub(entry.last_seen_ns) <= timeout
        || seen_within(unsafe { FLOWS.get(&key.twin(entry)) }, now, timeout);
    if alive
        && backend_usable(active, meta, entry)
        && !reopens(meta, entry)
        && !taken_over(meta, key, entry)
    {
        if !judged && stale(active, entry) {
            return Some(Lookup::Stale);
        }
        touch(entry, now, len);
        snat::count_translated(meta, entry, len, now);
        if meta.proto == IPPROTO_TCP
            && in_sequence(entry, meta.tcp_seq)
            && meta.tcp_flags & (TH_FIN | TH_RST) != 0
        {
            track_close(entry, meta.tcp_flags, FLOWS.get_ptr_mut(&key.twin(entry)));
        }
        return Some(Lookup::Hit(Action::of(entry)));
    }
    // Idle too long, its backend gone, or its tuple reused: a new flow, decided afresh.
    // The old entries go now, or they would shadow the new flow's until it is confirmed.
    let _ = FLOWS.remove(&key.twin(entry));
    let _ = FLOWS.remove(key);
    None
}

/// Whether the other direction of a flow whose entry has idled past `timeout`, `twin`, was
/// seen within it: a flow is idle only when both directions are, as conntrack's one
/// timeout for both has it. One-way keepalives (IPsec NAT-T, WireGuard) keep their flow,
/// and the silent side's packet, long after, is still the flow's, not a new one's the
/// policy may deny; a client retrying unanswered keeps its embryo for the answer.
#[inline(always)]
fn seen_within(twin: Option<&FlowValue>, now: u64, timeout: u64) -> bool {
    twin.is_some_and(|t| now.saturating_sub(t.last_seen_ns) <= timeout)
}

/// How far from the sequence number last seen from its sender a segment of an established
/// TCP flow is believed: 4 MiB either way (retransmissions, reordering, data in flight).
/// An off-path spoofer must then guess the number, as conntrack's window check makes it;
/// hosts themselves ignore resets outside their window (RFC 5961).
const SEQ_WINDOW: u32 = 1 << 22;

/// Whether a segment of an established flow, at sequence number `seq`, is near where its
/// sender stands; one ahead moves the entry's mark on. Only such a segment's RST or FIN
/// closes the flow: one out of it (spoofed, most likely) passes to its host, which judges
/// it, and changes nothing here.
#[inline(always)]
fn in_sequence(entry: &mut FlowValue, seq: u32) -> bool {
    if entry.tcp & TCP_SEQ == 0 {
        entry.seq = seq;
        entry.tcp |= TCP_SEQ;
        return true;
    }
    let ahead = seq.wrapping_sub(entry.seq);
    if ahead < SEQ_WINDOW {
        // Not stored unchanged (a receiver's pure ACKs): the store would dirty a cache line
        // the rest of the hit leaves clean.
        if ahead != 0 {
            entry.seq = seq;
        }
        return true;
    }
    ahead.wrapping_neg() <= SEQ_WINDOW
}

/// A TCP flow being established learns where both senders stand from the segment that
/// does it, sent by `this` direction's: its sequence number, and its acknowledgement of
/// the other's.
#[inline(always)]
fn learn_sequences(meta: &PacketMeta, this: &mut FlowValue, other: &mut FlowValue) {
    if meta.proto != IPPROTO_TCP {
        return;
    }
    this.seq = meta.tcp_seq;
    this.tcp |= TCP_SEQ;
    if meta.tcp_flags & TH_ACK != 0 {
        other.seq = meta.tcp_ack;
        other.tcp |= TCP_SEQ;
    }
}

#[inline(always)]
fn touch(entry: &mut FlowValue, now: u64, len: u64) {
    clock::stamp(&mut entry.last_seen_ns, now);
    entry.packets += 1;
    entry.bytes += len;
    count_rules(entry.rules, len);
    count_lb(entry.service, entry.backend, len);
}

/// Counts a packet under the deciding rule of each side of its flow (`NO_RULE`: none).
#[inline(always)]
fn count_rules(rules: [u16; 2], len: u64) {
    for rule in rules {
        if let Some(c) = NSG_TRAFFIC.get_ptr_mut(u32::from(rule)) {
            unsafe {
                (*c).packets += 1;
                (*c).bytes += len;
            }
        }
    }
}

/// A packet of an embryonic flow passes as the flow's, and confirms it (moves it to the
/// established table) when it shows both ends take part, as conntrack's ASSURED does: for
/// TCP the initiator's ACK of the responder's SYN-ACK (the acknowledgement number must
/// match, so a blind spoofer cannot confirm), or any answer to a flow picked up mid-stream;
/// for other protocols an answer. A miss: the embryo is over (idle too long, its backend
/// gone, its tuple reused), and the packet starts a new flow. A flow whose answers bypass
/// the gateway is never confirmed: it idles out as an established flow would.
#[inline(always)]
fn embryo(
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    entry: &mut FlowValue,
    now: u64,
    len: u64,
    judged: bool,
) -> Lookup {
    if other_message(meta, entry) {
        return Lookup::Miss;
    }
    let timeout = active.config.embryo_timeout_ns(meta.family, meta.proto, entry);
    if now.saturating_sub(entry.last_seen_ns) > timeout
        && !answered_within(entry, now, timeout)
        && !seen_within(unsafe { EMBRYOS.get(&key.twin(entry)) }, now, timeout)
    {
        count(FLOW_STAT_EMBRYOS_EXPIRED);
        forget_embryo(key, entry);
        return Lookup::Miss;
    }
    if !backend_usable(active, meta, entry)
        || reopens(meta, entry)
        || (!judged && newly_balanced(active, meta, entry))
    {
        count(FLOW_STAT_EMBRYOS_CLOSED);
        forget_embryo(key, entry);
        return Lookup::Miss;
    }
    if !judged && stale(active, entry) {
        return Lookup::Stale;
    }
    touch(entry, now, len);
    snat::count_translated(meta, entry, len, now);
    let action = Action::of(entry);
    if entry.assured() {
        assured(meta, key, entry);
        return Lookup::Hit(action);
    }
    if meta.proto == IPPROTO_TCP {
        let flags = meta.tcp_flags;
        // A flow whose answers bypass the gateway lives here for good (never confirmed,
        // below). What comes on its reply tuple is not its backend's, and the client's RST
        // or FIN counts only in sequence: its entry follows the client's numbers from the
        // first packet on, as an established flow's does.
        if entry.replies_direct() {
            let believed = entry.reply == 0 && in_sequence(entry, meta.tcp_seq);
            if believed && flags & TH_RST != 0 {
                count(FLOW_STAT_EMBRYOS_CLOSED);
                forget_embryo(key, entry);
            } else if believed && flags & TH_FIN != 0 {
                // The server's FIN never passes, so the client's is only a half close: the
                // server may answer long after it. The flow keeps its idle timeout; a SYN on
                // its tuple is then a new connection (`reopens`).
                entry.tcp |= TCP_FIN;
            }
            return Lookup::Hit(action);
        }
        let ends = if entry.reply == 0 {
            handshake(meta, entry, false, None)
        } else {
            match EMBRYOS.get_ptr_mut(&key.twin(entry)) {
                Some(first) => handshake(meta, unsafe { &mut *first }, true, Some(entry)),
                // Its forward entry was pushed out: no number left to judge a reset by.
                None => flags & TH_RST != 0,
            }
        };
        if ends {
            // Refused or aborted before it was established: over, and its RST passes.
            count(FLOW_STAT_EMBRYOS_CLOSED);
            forget_embryo(key, entry);
            return Lookup::Hit(action);
        }
        let confirms = if entry.reply != 0 {
            flags & TH_SYN == 0 && entry.tcp & TCP_MIDSTREAM != 0
        } else {
            if flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
                crossed(key, entry);
            }
            entry.tcp & TCP_ANSWERED != 0
                && flags & (TH_SYN | TH_ACK) == TH_ACK
                && meta.tcp_ack == entry.seq
        };
        if !confirms {
            return Lookup::Hit(action);
        }
    } else if !exchanged_again(key, entry) {
        return Lookup::Hit(action);
    }
    // A flow whose answers bypass the gateway is never confirmed: what comes on its reply
    // tuple did not come from its backend (a spoofer filling the established table, say).
    if entry.replies_direct() {
        return Lookup::Hit(action);
    }
    // The confirming segment may carry its sender's FIN (a request sent and shut in one
    // go): counted, or the peer's FIN would leave the flow half closed for good.
    if meta.proto == IPPROTO_TCP && meta.tcp_flags & TH_FIN != 0 {
        entry.tcp |= TCP_FIN;
    }
    confirm(meta, key, entry);
    Lookup::Hit(action)
}

/// A SYN-ACK from the end that sent a waiting flow's SYN (`entry`'s): the other end's SYN
/// crossed it (a simultaneous open), and made a flow of its own on the reply tuple (see
/// `waiting_for`). That flow becomes this one's reply entry, as conntrack takes the second
/// SYN for the first one's reply: the other end's SYN-ACK then answers this flow, and the
/// handshake confirms it.
#[inline(always)]
fn crossed(key: &FlowKey, entry: &mut FlowValue) {
    if !entry.lone() {
        return;
    }
    let Some(other) = EMBRYOS.get_ptr_mut(&key.twin(entry)) else { return };
    let other = unsafe { &mut *other };
    if other.lone() {
        // Its own packets are the reply direction's, as the first flow's answers are.
        let (packets, bytes, seen) = (other.packets, other.bytes, other.last_seen_ns);
        reply_of(entry, other);
        other.packets += packets;
        other.bytes += bytes;
        other.last_seen_ns = other.last_seen_ns.max(seen);
        entry.not_lone();
        // Its flow is over, joined to this one: counted as closed, not left to look evicted.
        count(FLOW_STAT_EMBRYOS_CLOSED);
    }
}

/// Whether a packet of an embryonic flow of another protocol than TCP confirms it: an
/// answer shows both ends take part, but a lone exchange (a DNS query and its answer) is
/// over once done, and confirmed it would hold an entry of the established table, which
/// evicts nothing, for the protocol's whole idle timeout: a busy resolver behind a NAT
/// gateway filled it, and every new flow was refused. So a flow is confirmed by its second
/// packet either way once both ends have sent one (conntrack assures a UDP stream, not a
/// lone exchange, alike); until then it is an embryo, which newer flows may push out.
#[inline(always)]
fn exchanged_again(key: &FlowKey, entry: &FlowValue) -> bool {
    // `packets` counts this packet already. The answering side's entry: the other end
    // began the flow.
    entry.packets >= 2
        && (entry.reply != 0
            || unsafe { EMBRYOS.get(&key.twin(entry)) }.is_some_and(|t| t.packets > 0))
}

/// Moves an embryonic flow's two entries to the established table. A full table evicts no
/// established flow for it, nor refuses it: the flow stays embryonic, `ASSURED` (its packet
/// passes), and each of its packets tries again. Dropping the packet and forgetting the
/// embryo left a TCP client established and its server not.
#[inline(always)]
fn confirm(meta: &PacketMeta, key: &FlowKey, entry: &mut FlowValue) {
    let twin_key = key.twin(entry);
    let lone = entry.lone();
    let twin = match EMBRYOS.get_ptr_mut(&twin_key) {
        Some(twin) => twin,
        // A lone flow's reply entry is made now, straight into the established table.
        None if lone => match lone_reply(entry) {
            Some(reply) => reply,
            None => return,
        },
        // Its other half was evicted: stays embryonic, confirmed by no one; it idles out.
        None => return,
    };
    let twin = unsafe { &mut *twin };
    learn_sequences(meta, entry, twin);
    if !establish_embryo(key, entry, &twin_key, twin) && lone {
        // No room: the flow waits `ASSURED` in the embryonic table, with both entries.
        let _ = EMBRYOS.insert(&twin_key, &*twin, 0);
    }
}

/// A packet of an `ASSURED` embryo: judged as an established flow's (an RST or FIN counts
/// only in sequence, as a spoofer must otherwise guess it, and closes the flow, which the
/// agent's sweep then ends), then the move is tried again.
#[inline(always)]
fn assured(meta: &PacketMeta, key: &FlowKey, entry: &mut FlowValue) {
    let twin_key = key.twin(entry);
    let twin = EMBRYOS.get_ptr_mut(&twin_key);
    // Every segment moves the sequence mark on, as on an established flow: a FIN or RST
    // is judged against where its sender stands.
    if meta.proto == IPPROTO_TCP
        && in_sequence(entry, meta.tcp_seq)
        && meta.tcp_flags & (TH_FIN | TH_RST) != 0
    {
        track_close(entry, meta.tcp_flags, twin);
    }
    if let Some(twin) = twin {
        let _ = establish_embryo(key, entry, &twin_key, unsafe { &mut *twin });
    }
}

/// [`establish`] for an embryonic flow: once moved, it is confirmed and its embryo goes.
#[inline(always)]
fn establish_embryo(
    key: &FlowKey,
    entry: &mut FlowValue,
    twin_key: &FlowKey,
    twin: &mut FlowValue,
) -> bool {
    if establish(key, entry, twin_key, twin) {
        count(FLOW_STAT_EMBRYOS_CONFIRMED);
        forget_embryo(key, entry);
        return true;
    }
    false
}

/// Puts a flow's two entries into the established table, both or neither. A full table
/// refuses them: both are marked `ASSURED` (counted once, as the flow is refused), to stay
/// in the embryonic table as an established flow would be judged.
#[inline(always)]
fn establish(
    key: &FlowKey,
    entry: &mut FlowValue,
    twin_key: &FlowKey,
    twin: &mut FlowValue,
) -> bool {
    let assured = entry.assured();
    entry.tcp &= !ASSURED;
    twin.tcp &= !ASSURED;
    if FLOWS.insert(key, &*entry, 0).is_ok() {
        if FLOWS.insert(twin_key, &*twin, 0).is_ok() {
            return true;
        }
        let _ = FLOWS.remove(key);
    }
    if !assured {
        count(FLOW_STAT_EMBRYOS_REFUSED);
    }
    entry.tcp |= ASSURED;
    twin.tcp |= ASSURED;
    false
}

#[inline(always)]
fn forget_embryo(key: &FlowKey, entry: &FlowValue) {
    let _ = EMBRYOS.remove(&key.twin(entry));
    let _ = EMBRYOS.remove(key);
}

/// A function of its own (a BPF-to-BPF call), as `nsg::count_hit`: the trace check inlined
/// at each call would cost the new-flow stage stack it does not have.
#[inline(never)]
fn count(stat: u32) {
    if !trace::counting() {
        return;
    }
    if let Some(c) = FLOW_STATS.get_ptr_mut(stat) {
        // Per-CPU slot: plain adds are exact.
        unsafe { *c += 1 };
    }
}

/// An established flow keeps its backend while the backend is healthy; TCP flows keep it
/// until they end (a connection cannot move), other flows move to a healthy backend. A
/// backend's flag is one for all its rules: one whose own rule still picks it for the
/// packet (no probe judges that rule, its own probe passes, all are down and it sends to
/// all) keeps its flows, which would only be made again on the same backend, every packet.
#[inline(always)]
fn backend_usable(active: &Active<'_>, meta: &PacketMeta, entry: &FlowValue) -> bool {
    entry.backend == NO_BACKEND
        || entry.reply != 0
        || meta.proto == IPPROTO_TCP
        || BACKENDS.get(entry.backend).is_some_and(|b| b.healthy != 0)
        || matches!(lb::select(meta, active.config.flags), Lb::Selected(s)
            if s.service == entry.service && s.backend == entry.backend)
}

/// An untranslated flow, not yet established, decided before an apply after which a rule
/// serves its destination (a frontend added while a client's SYNs or datagrams went on): its
/// next packet is decided as a new flow, and balanced. (Kept, the flow went on unbalanced for
/// as long as the client kept trying.) An established connection goes on as it was (also one
/// whose answers bypass the gateway: only a SYN is decided afresh), and so does a flow to a
/// port no rule serves (the gateway's own address's: a handshake in flight would lose its
/// ACK). Looked up once per flow after an apply, not under a set change's mark: [`stale`]
/// then stamps it with the running generation.
#[inline(always)]
fn newly_balanced(active: &Active<'_>, meta: &PacketMeta, entry: &FlowValue) -> bool {
    entry.generation != active.config.decided()
        && entry.reply == 0
        && entry.backend == NO_BACKEND
        && entry.nat == NAT_NONE
        // A TCP flow's SYN sent again: anything else is of a connection under way (one whose
        // answers bypass the gateway stays an embryo for good).
        && (meta.proto != IPPROTO_TCP || meta.tcp_flags & (TH_SYN | TH_ACK) == TH_SYN)
        && active.config.flags & FLAG_NO_FRONTENDS == 0
        && matches!(lb::select(meta, active.config.flags), Lb::Selected(_) | Lb::NoBackend)
}

/// An ICMP packet that is not the message its entry's direction carries: a peer's echo
/// request on the reply entry of a host's pings (their key is the same), a request on the
/// reply entry of a flow its answer opened (as an earlier build wrote it, which let the
/// peer's requests in as the answers of the host's unsolicited echo reply), any message on
/// an entry without a mark (an earlier build's flow of a message other than echo, on the
/// key of an echo of identifier 0). Not the flow's: decided as new, by the policy, and the
/// flow is left as it is.
#[inline(always)]
pub fn other_message(meta: &PacketMeta, entry: &FlowValue) -> bool {
    meta.is_icmp()
        && (entry.seq != icmp_mark(meta)
            || (entry.reply != 0 && paired_mark(meta.family, entry.seq).1))
}

/// A SYN on the tuple of a closed connection (the client reused its port) opens a new one,
/// decided afresh like any first packet: it may go to another backend. A direct-reply flow
/// is over for this once the client has sent its FIN (the server's is never seen, and a
/// client sends no SYN on a connection it has half closed).
#[inline(always)]
fn reopens(meta: &PacketMeta, entry: &FlowValue) -> bool {
    let closed = if entry.replies_direct() { TCP_CLOSED | TCP_FIN } else { TCP_CLOSED };
    meta.proto == IPPROTO_TCP
        && entry.reply == 0
        && entry.tcp & closed != 0
        && meta.tcp_flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN) == TH_SYN
}

/// A closed connection's established entry at `key` gives way to a new flow that waits in
/// the embryonic table on the same tuple (two frontend ports of one client port reach one
/// backend port): whatever answers it, a SYN-ACK, a reset or mid-stream data, belongs to the
/// new flow. Looked up on closed entries only, rather than at every new flow.
#[inline(always)]
fn taken_over(meta: &PacketMeta, key: &FlowKey, entry: &FlowValue) -> bool {
    meta.proto == IPPROTO_TCP
        && entry.tcp & TCP_CLOSED != 0
        && unsafe { EMBRYOS.get(key) }.is_some()
}

/// The first packet of a flow (`key`: its key, `key(meta)`): load balancing (if it is for a
/// frontend), NSG classification (of the packet as it will reach the backend), then both
/// directions into the flow table.
#[inline(always)]
pub fn create(
    ctx: &impl Hook,
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    dir: u32,
    len: u64,
) -> Result<Action, DropReason> {
    // Connections start with a SYN. Any other segment without a flow starts one only when
    // its state can be rebuilt (a NAT translation still holds it), when the policy or its
    // load-balancing rule picks flows up mid-stream, or when it belongs to a connection of
    // this host itself (one from before the attach: the egress program sees the SYNs the
    // host sends now).
    let midstream = midstream(meta);
    let pickup = active.config.flags & FLAG_MIDSTREAM != 0;
    let [forward, reply] = fresh(active, meta, dir, len)?;
    // Rebuilt from a translation: established at once (a translation exists only for a
    // flow the policy allowed, one per translation, so this cannot flood the table).
    let mut rebuilt = false;
    // A NAT gateway whose port the SNAT stage claims once the policy allows the flow.
    let mut snat_gateway = None;
    // A frame sent to the whole link (a broadcast or multicast MAC) to a unicast address
    // not routed on (the entry stage drops those, and sends the rest here without a flow
    // lookup): it is neither balanced nor translated, and makes no flow (a plain one would
    // let the same tuple pass untranslated later); what is addressed to this host is judged
    // and left to the stack.
    let link_group = meta.link_group != 0 && meta.routed_dst();
    // Without a load balancer or a NAT gateway in the policy (flags the agent sets at
    // apply), their hash and trie lookups are skipped.
    let lookup_frontends = !link_group && active.config.flags & FLAG_NO_FRONTENDS == 0;
    let nat = active.config.flags & FLAG_NO_NAT == 0;
    let flags = active.config.flags;
    let lb = if lookup_frontends { lb::select(meta, flags) } else { Lb::NotFrontend };
    // A frontend's address on a port no rule serves: this host's own (a frontend may be),
    // or not routed on, it goes to the stack as any packet; routed on, it would go back to
    // the router that sent it here (a frontend announced over BGP lives in no table used
    // for forwarding), which sends it here again until its TTL runs out.
    if matches!(lb, Lb::NoRule) {
        trace::lb(LB_NO_RULE);
        if forward::routed_on(ctx, meta) {
            return Err(DropReason::NoLbRule);
        }
    }
    match lb {
        Lb::NotFrontend | Lb::NoRule => {
            // A translation outlives its flow entries: rebuild them from it.
            let translation = if nat && !link_group { snat::existing(key) } else { None };
            if let Some(t) = translation {
                rebuilt = midstream;
                // An echo request on a translation's reply tuple answers none of the host's
                // pings (see `other_message`): unsolicited, as any packet to a public address.
                if t.state != NAT_ACTIVE || (t.kind == NAT_DST && is_echo_request(meta)) {
                    if trace::counting() {
                        snat::unmatched(u32::from(t.gateway));
                    }
                    return Err(DropReason::NatUnmatched);
                }
                // Counted here, before classification: the new-flow stage's stack has no
                // room for the public-address lookup after it.
                if trace::counting() {
                    snat::count_rebuilt(meta, t, len);
                }
                forward.nat = t.kind;
                forward.nat_addr = t.addr;
                forward.nat_port = t.port;
                if t.kind == NAT_DST {
                    // The reply direction of an outbound flow: allowed as its reply, if
                    // the policy still allows the flow itself.
                    forward.reply = 1;
                    forward.direction = DIR_OUTBOUND as u8;
                }
            } else if let Some(gw) = if nat { snat::to_public_address(meta) } else { None } {
                if midstream {
                    return Err(DropReason::NoFlow);
                }
                if trace::counting() {
                    snat::unmatched(gw);
                }
                return Err(DropReason::NatUnmatched);
            } else {
                if midstream && forward::host_connection(ctx, meta) {
                    // A connection the host opened (it does not listen where the segment
                    // goes): judged as its SYN was, by the outbound rules, its flow the
                    // host's, this segment in its reply direction. Judged inbound, to the
                    // host's ephemeral port, the peer's segment of a connection whose flow
                    // had idled out was denied.
                    if !forward::host_listens(ctx, meta, false) {
                        forward.reply = 1;
                        forward.direction = DIR_OUTBOUND as u8;
                    }
                } else if midstream {
                    if !pickup {
                        return Err(DropReason::NoFlow);
                    }
                    count(FLOW_STAT_PICKED_UP);
                }
                // NSG outbound rules judge the private source, before translation.
                snat_gateway = if nat && !link_group { snat::gateway(meta, dir) } else { None };
            }
        }
        Lb::NoBackend => {
            trace::lb(LB_NO_BACKEND);
            return Err(if midstream { DropReason::NoFlow } else { DropReason::NoBackend });
        }
        Lb::Selected(sel) => {
            if midstream {
                if !pickup && !sel.midstream {
                    return Err(DropReason::NoFlow);
                }
                count(FLOW_STAT_PICKED_UP);
            }
            forward.nat = match (sel.encap, sel.floating_ip) {
                (true, _) => NAT_ENCAP,
                (false, true) => NAT_NEXT_HOP,
                (false, false) => NAT_DST,
            };
            forward.nat_addr = sel.addr;
            forward.nat_port = sel.port;
            forward.service = sel.service;
            forward.backend = sel.backend;
            forward.idle_s = sel.idle_s;
            // A direct-reply flow's entry follows the client's sequence numbers from its
            // first packet (see `embryo`).
            if matches!(forward.nat, NAT_NEXT_HOP | NAT_ENCAP) && meta.proto == IPPROTO_TCP {
                forward.seq = meta.tcp_seq;
                forward.tcp |= TCP_SEQ;
            }
        }
    }
    // One classification for every kind of new flow (each call site costs the verifier a
    // walk of the classifier): the packet as its flow's first packet reaches its host.
    let decision = classify(active, as_classified(meta, forward)?, true);
    // Here, not in `count_rules`, which the established path calls for every packet.
    if trace::counting() {
        count_rules(decision.rules, len);
    }
    if !decision.allowed {
        // The clock as `fresh` read it: a helper call fewer on the denied path.
        let now = forward.last_seen_ns;
        if !trace::denied(forward, decision.rules) {
            let (dir, generation) = (forward.direction, forward.generation);
            events::emit(EVENT_DENY, key, decision.rules, dir, generation, now, Some(forward));
        }
        return Err(DropReason::Policy);
    }
    // Allowed as from the virtual network (`AllowVnetInBound` allows any such source): only
    // where that source can be. A rebuilt translation's reply direction comes from outside.
    if snat::in_virtual_network(meta.family, &meta.src)
        && forward::spoofed(ctx, meta, dir == DIR_INBOUND)
    {
        return Err(DropReason::Spoofed);
    }
    forward.rules = decision.rules;
    if link_group {
        return Ok(Action::PASS);
    }
    // A packet the gateway will not send on (its TTL runs out here) claims no port and
    // makes no flow: the stack answers it with "time exceeded", quoting it as sent
    // (traceroute's first hop through a NAT gateway). Nor, as a first fragment, does it
    // leave its verdict to the rest of its datagram, which must not leave untranslated.
    // (A load balancer's keeps its embryo: the egress program finds the flow there to
    // translate the stack's error back.)
    if snat_gateway.is_some() && forward::ttl(ctx, meta)? <= 1 {
        return Ok(TO_STACK);
    }
    if let Some(gw) = snat_gateway {
        // The port claim runs in a stage of its own, which then commits the flow.
        return Ok(Action { nat: NAT_PENDING_SNAT, addr: [0; 4], port: gw as u16 });
    }
    commit(meta, key, forward, reply, rebuilt);
    count_lb(forward.service, forward.backend, len);
    Ok(Action::of(forward))
}

/// A TCP segment other than a SYN: it cannot start a connection.
#[inline(always)]
fn midstream(meta: &PacketMeta) -> bool {
    meta.proto == IPPROTO_TCP && meta.tcp_flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN) != TH_SYN
}

/// A new flow's two entries, the forward one filled in for the packet's direction `dir`, the
/// other left for [`commit`]. Built in per-CPU scratch, not on the stack: the stack of a
/// stage plus that of classification must stay within the verifier's 512 bytes.
#[inline(always)]
fn fresh(
    active: &Active<'_>,
    meta: &PacketMeta,
    dir: u32,
    len: u64,
) -> Result<&'static mut [FlowValue; 2], DropReason> {
    let pair = unsafe { &mut *FLOW_SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)? };
    // Field by field: a struct literal is built on the stack first, and the new-flow
    // stage's chain of frames has no room left for it.
    let f = &mut pair[0];
    f.generation = active.config.decided();
    f.last_seen_ns = clock::now_ns();
    f.packets = 1;
    f.bytes = len;
    f.rules = NO_RULES;
    f.direction = dir as u8;
    f.reply = 0;
    // Volatile: merged with the zeroes after it, the store began a memset at an odd offset,
    // which the compiler writes one byte at a time (21 stores at every new flow).
    unsafe { core::ptr::write_volatile(&mut f.nat, NAT_NONE) };
    f.nat_addr = [0; 4];
    f.nat_port = 0;
    f.idle_s = 0;
    f.service = NO_BACKEND;
    f.backend = NO_BACKEND;
    first_marks(meta, f);
    f.hop = NextHop::NONE;
    Ok(pair)
}

/// A new flow's `tcp` bits and `seq` from its first packet: a SYN's number + 1, which its
/// answer must acknowledge (see `handshake`), or an echo's mark. A call of its own:
/// inlined, it cost the new-flow stage stack it does not have.
#[inline(never)]
fn first_marks(meta: &PacketMeta, f: &mut FlowValue) {
    if meta.proto == IPPROTO_TCP {
        f.seq = meta.tcp_seq.wrapping_add(1);
        f.tcp = if midstream(meta) { TCP_MIDSTREAM } else { 0 };
    } else {
        f.seq = icmp_mark(meta);
        f.tcp = 0;
    }
}

/// The first packet of a flow the host itself sends (seen by the tc egress program): judged
/// by the rules of direction `dir` (outbound), both entries into the embryonic table. No
/// load balancing, no translation. A TCP segment other than a SYN starts one too, mid-stream
/// (a connection from before the attach, or whose flow expired): the host's own socket
/// vouches for it, and an answer confirms it. Answers that open nothing make no flow.
/// `key` is the packet's own (`key(meta)`), as its caller looked it up.
#[inline(always)]
pub fn create_host(
    ctx: &impl EbpfContext,
    active: &Active<'_>,
    meta: &PacketMeta,
    key: &FlowKey,
    dir: u32,
    len: u64,
) -> Result<(), DropReason> {
    // An ICMP error about no flow, a reset, or a SYN-ACK whose embryo is gone (pushed out by
    // a flood, say): it answers a packet and opens nothing. Judged, but it makes no flow,
    // which would let the peer's ICMP or segments in as its answers (a spoofer's blind ACK
    // would confirm a flow made from the SYN-ACK to its spoofed SYN).
    let tcp = if meta.proto == IPPROTO_TCP { meta.tcp_flags } else { 0 };
    if is_icmp_error(meta) || tcp & TH_RST != 0 || tcp & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK {
        return judge(active, meta, dir, len).map(|_| ());
    }
    let [forward, reply] = fresh(active, meta, dir, len)?;
    // A connection the host accepted (it listens where the segment comes from): its peer
    // opened it, and the inbound rules judge it, as they judged its SYN; its flow is made as
    // the peer's, this segment in its reply direction. Judged as the host's outbound, a
    // connection a policy change cut (its peer now denied) came back with the host's next
    // segment.
    let judged = if forward.tcp & TCP_MIDSTREAM != 0 && forward::host_listens(ctx, meta, true) {
        forward.reply = 1;
        forward.direction = DIR_INBOUND as u8;
        as_classified(meta, forward)?
    } else {
        meta
    };
    forward.rules = judge(active, judged, u32::from(forward.direction), len)?;
    if forward.tcp & TCP_MIDSTREAM != 0 {
        count(FLOW_STAT_PICKED_UP);
    }
    commit(meta, key, forward, reply, false);
    Ok(())
}

/// Puts a new flow's two entries into the embryonic table (the established one when
/// `established` and it has room): `forward` for the packet's own
/// direction, and the other direction, which comes back from where the packet goes with
/// the rewrite undone: a DNAT-ed flow's reply gets the frontend back as its source, a
/// SNAT-ed flow's reply the private host as its destination. (A SYN that nothing rewrites
/// makes its own alone, see `TCP_LONE`.)
#[inline(always)]
pub fn commit(
    meta: &PacketMeta,
    key: &FlowKey,
    forward: &mut FlowValue,
    reply: &mut FlowValue,
    established: bool,
) {
    // `xdpgate trace`'s flow is recorded, not created. An ICMP error about no flow answers
    // a packet and opens nothing (conntrack never makes one NEW): judged, it makes no
    // flow, which would let the peer's ICMP in as its answers.
    if trace::flow(forward) || is_icmp_error(meta) {
        return;
    }
    reply_of(forward, reply);
    if meta.is_icmp() {
        // The other direction carries a request's answer, or a rebuilt answer's request (a
        // NAT translation's reply direction); a message that asks nothing, nothing.
        let (paired, request) = paired_mark(meta.family, forward.seq);
        reply.seq = if request || forward.reply != 0 { paired } else { ICMP_NO_ANSWER };
    }
    if forward.nat == NAT_DST {
        reply.nat = NAT_SRC;
        reply.nat_addr = meta.dst;
        reply.nat_port = meta.dport;
    } else if forward.nat == NAT_SRC {
        reply.nat = NAT_DST;
        reply.nat_addr = meta.src;
        reply.nat_port = meta.sport;
    }
    let twin = key.twin(forward);
    if established {
        learn_sequences(meta, forward, reply);
        count(FLOW_STAT_REBUILT);
    }
    // A full established table: the rebuilt flow waits in the embryonic one, `ASSURED`.
    if !(established && establish(key, forward, &twin, reply)) {
        // A SYN that nothing rewrites waits alone, without a reply entry (`TCP_LONE`). A
        // full embryonic table evicts its least recently used entries; a failed insert
        // only means the next packet is decided again.
        let lone = forward.may_wait_alone(key.proto);
        if lone {
            forward.tcp |= TCP_LONE;
        }
        let _ = EMBRYOS.insert(key, &*forward, 0);
        if !lone {
            let _ = EMBRYOS.insert(&twin, &*reply, 0);
        }
        count(FLOW_STAT_EMBRYOS_CREATED);
    }
    if forward.reply == 0 {
        let (rules, now) = (forward.rules, forward.last_seen_ns);
        let (dir, generation) = (forward.direction, forward.generation);
        events::emit(EVENT_BEGIN, key, rules, dir, generation, now, Some(forward));
    }
}

/// The SNAT stage: claims a public port of gateway `gw` for the new flow whose forward entry
/// the policy stage left in `FLOW_SCRATCH`, and commits the flow.
#[inline(always)]
pub fn commit_snat(meta: &PacketMeta, gw: u32, len: u64) -> Result<Action, DropReason> {
    let now = clock::now_ns();
    let pair = FLOW_SCRATCH.get_ptr_mut(0).ok_or(DropReason::Internal)?;
    let [forward, reply] = unsafe { &mut *pair };
    // An ICMP error about no flow has no translation to leave by (see `commit`).
    if is_icmp_error(meta) {
        return Err(DropReason::NoFlow);
    }
    let claim = snat::allocate(meta, gw, now)?;
    forward.nat = NAT_SRC;
    forward.nat_addr = snat::public_address(gw, claim >> 16).ok_or(DropReason::Internal)?;
    forward.nat_port = claim as u16;
    forward.idle_s = snat::idle_s(gw, meta.proto);
    commit(meta, &key(meta), forward, reply, false);
    snat::count_translated(meta, forward, len, now);
    Ok(Action::of(forward))
}

/// NSG classification of a packet as the first of a flow: the deciding rule of each side, or
/// a policy drop (with its deny event).
#[inline(always)]
fn judge(
    active: &Active<'_>,
    meta: &PacketMeta,
    dir: u32,
    len: u64,
) -> Result<[u16; 2], DropReason> {
    let decision = classify(active, meta, true);
    count_rules(decision.rules, len);
    if !decision.allowed {
        let now = clock::now_ns();
        let generation = active.config.decided();
        events::emit(EVENT_DENY, &key(meta), decision.rules, dir as u8, generation, now, None);
        return Err(DropReason::Policy);
    }
    Ok(decision.rules)
}

#[inline(always)]
fn count_lb(service: u32, backend: u32, len: u64) {
    if service == NO_BACKEND || !trace::counting() {
        return;
    }
    for (map, index) in [(&SERVICE_STATS, service), (&BACKEND_STATS, backend)] {
        if let Some(c) = map.get_ptr_mut(index) {
            unsafe {
                (*c).packets += 1;
                (*c).bytes += len;
            }
        }
    }
}

/// Whether a flow was decided under an older policy, or while a set change rewrites the
/// trie (`GENERATION_CHANGING`: no flow's generation equals the slot's then), and the policy
/// asks for flows to be classified again. When it does not, the flow takes the new
/// generation, and its rules as the new policy numbers them, so that its packets count
/// under the rules that decided it (under no rule once that rule is gone), never under
/// whatever rule took its old number.
#[inline(always)]
fn stale(active: &Active<'_>, entry: &mut FlowValue) -> bool {
    if decided_now(active, entry) {
        return false;
    }
    if active.config.flags & FLAG_REEVALUATE != 0 {
        return true;
    }
    // A set change renumbers no rule: a flow of the generation it changes keeps its own.
    let generation = active.config.decided();
    if entry.generation == generation {
        return false;
    }
    // Only the last apply left where the rules it retired went: a flow idle across two
    // applies has numbers in a slot written since, and keeps no rule.
    let moved = entry.generation + 1 == generation;
    for rule in &mut entry.rules {
        *rule = if moved { moved_rule(active, *rule) } else { NO_RULE };
    }
    entry.generation = generation;
    false
}

/// Whether `entry` was decided under the running policy. Never under the mark: a build from
/// before it stamped flows with the marked value itself (2^63 + N), which would equal it.
#[inline(always)]
fn decided_now(active: &Active<'_>, entry: &FlowValue) -> bool {
    entry.generation == active.config.generation && !active.config.changing()
}

/// Whether the lookups would classify the flow of `entry` again (`Lookup::Stale`), for a
/// packet that only reads it: an ICMP error about the flow, `xdpgate trace`'s.
#[inline(always)]
pub fn judged_again(active: &Active<'_>, entry: &FlowValue) -> bool {
    !decided_now(active, entry) && active.config.flags & FLAG_REEVALUATE != 0
}

/// Whether the flow of `entry` (`key`'s, in the established table when `ESTABLISHED`, else
/// the embryonic one) has idled out as the lookups judge it, for a packet that only reads
/// it: both directions silent past its timeout. (The lookups then remove it; such a packet
/// leaves it to them.)
#[inline(always)]
pub fn idled_out<const ESTABLISHED: bool>(
    active: &Active<'_>,
    key: &FlowKey,
    entry: &FlowValue,
) -> bool {
    let (timeout, twin) = timeout_and_twin::<ESTABLISHED>(active, key, entry);
    silent(entry, twin, timeout)
}

/// Whether the flow of `entry` (as [`idled_out`] has it) vouches for an ICMP error about
/// it: not idled out, and not waiting in both directions to be classified again under a
/// newer policy. Each direction's own next packet classifies its entry again; one that
/// passed (the packet the error is about, most often) is the flow's verdict under the
/// running policy.
#[inline(always)]
pub fn vouches<const ESTABLISHED: bool>(
    active: &Active<'_>,
    key: &FlowKey,
    entry: &FlowValue,
) -> bool {
    let (timeout, twin) = timeout_and_twin::<ESTABLISHED>(active, key, entry);
    let again = judged_again(active, entry) && twin.is_none_or(|t| judged_again(active, t));
    !silent(entry, twin, timeout) && !again
}

/// The idle timeout of `entry` and its other direction's entry. The table a constant:
/// chosen at run time, the compiler merges the two tables' lookups into one call the
/// verifier cannot inline.
#[inline(always)]
fn timeout_and_twin<const ESTABLISHED: bool>(
    active: &Active<'_>,
    key: &FlowKey,
    entry: &FlowValue,
) -> (u64, Option<&'static FlowValue>) {
    let (family, proto) = (key.family, key.proto);
    if ESTABLISHED {
        let timeout = active.config.idle_timeout_ns(family, proto, entry.tcp, entry.idle_s);
        (timeout, unsafe { FLOWS.get(&key.twin(entry)) })
    } else {
        let timeout = active.config.embryo_timeout_ns(family, proto, entry);
        (timeout, unsafe { EMBRYOS.get(&key.twin(entry)) })
    }
}

/// Both directions of a flow silent for more than `timeout`.
#[inline(always)]
fn silent(entry: &FlowValue, twin: Option<&FlowValue>, timeout: u64) -> bool {
    let now = clock::now_ns();
    now.saturating_sub(entry.last_seen_ns) > timeout
        && !seen_within(twin, now, timeout)
        && !answered_within(entry, now, timeout)
}

/// Whether a lone flow's answers (its reply direction's packets, see `TCP_LONE`) were seen
/// within `timeout`.
#[inline(always)]
fn answered_within(entry: &FlowValue, now: u64, timeout: u64) -> bool {
    entry.lone() && now.saturating_sub(entry.answers().2) <= timeout
}

/// The number in the running slot of `rule`, a rule of the slot the last apply retired.
#[inline(always)]
fn moved_rule(active: &Active<'_>, rule: u16) -> u16 {
    // Numbered in the running slot already: another CPU moved this entry's rules first.
    if u32::from(rule) / (TABLES_PER_SLOT * MAX_RULES) == active.slot {
        return rule;
    }
    // `NO_RULE` is past the map's end: none.
    match NSG_RULE_MOVES.get(u32::from(rule)) {
        Some(&moved) if moved != 0 => moved - 1,
        _ => NO_RULE,
    }
}

/// Classifies the packet's flow, decided under an older policy, again (as its first packet
/// was): a flow the new policy denies is removed, both ways, and its packet dropped; one it
/// allows takes the new generation and deciding rules.
#[inline(always)]
pub fn reclassify(active: &Active<'_>, meta: &PacketMeta, len: u64) -> Result<(), DropReason> {
    let key = key(meta);
    // The entry the lookup found stale: not an established one of another ICMP message.
    let established = FLOWS.get_ptr_mut(&key).filter(|e| !other_message(meta, unsafe { &**e }));
    let (entry, established) = match established {
        Some(e) => (e, true),
        None => match EMBRYOS.get_ptr_mut(&key) {
            Some(e) => (e, false),
            // Gone meanwhile: the packet is decided afresh.
            None => return Ok(()),
        },
    };
    let entry = unsafe { &mut *entry };
    let generation = active.config.decided();
    // A rule's flow count counts a flow judged again after a change once, not each packet
    // of it under a set change's mark.
    let decision = classify(active, as_classified(meta, entry)?, !active.config.changing());
    // `xdpgate trace`'s packet: the verdict recorded, the entry left as it is.
    if trace::judged_again(decision.allowed, decision.rules) {
        return if decision.allowed { Ok(()) } else { Err(DropReason::Policy) };
    }
    if decision.allowed {
        entry.rules = decision.rules;
        entry.generation = generation;
        // Its twin too, judged with it: the first packet the other way would judge the
        // flow again, and count it in its rule's flows a second time.
        let twin_key = key.twin(entry);
        let twin =
            if established { FLOWS.get_ptr_mut(&twin_key) } else { EMBRYOS.get_ptr_mut(&twin_key) };
        if let Some(twin) = twin {
            let twin = unsafe { &mut *twin };
            twin.rules = decision.rules;
            twin.generation = generation;
        }
        return Ok(());
    }
    // The packet it denied, as a new flow's denied packet counts (an allowed one counts
    // under the flow's rules as it passes).
    count_rules(decision.rules, len);
    let now = clock::now_ns();
    let dir = entry.direction;
    events::emit(EVENT_DENY, &key, decision.rules, dir, generation, now, Some(entry));
    if established {
        let _ = FLOWS.remove(&key.twin(entry));
        let _ = FLOWS.remove(&key);
    } else {
        count(FLOW_STAT_EMBRYOS_CLOSED);
        forget_embryo(&key, entry);
    }
    Err(DropReason::Policy)
}

/// RST closes the flow; FIN closes it once both directions have sent one.
#[inline(always)]
fn track_close(entry: &mut FlowValue, flags: u8, twin: Option<*mut FlowValue>) {
    let twin = twin.map(|p| unsafe { &mut *p });
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

/// The datagram a fragment belongs to, as the receiver reassembles it: IPv4 by addresses,
/// protocol and id (RFC 791), IPv6 by addresses and id (RFC 8200 4.5). An IPv6 later
/// fragment names only the first header after its Fragment header, which is not the L4
/// protocol its first fragment was judged by when extension headers follow.
#[inline(always)]
fn frag_key(meta: &PacketMeta) -> FragKey {
    FragKey {
        src: meta.src,
        dst: meta.dst,
        id: meta.frag_id,
        proto: if meta.family == 6 { 0 } else { meta.proto },
        family: meta.family,
        _pad: [0; 2],
    }
}

/// The first fragment of a datagram was allowed with `action`: its later fragments follow
/// it, with the same address rewrite. (An ICMP error's later fragments only quote more of
/// the packet: they need just the outer address the error's rewrite gave the first.)
#[inline(always)]
pub fn remember_first_fragment(meta: &PacketMeta, action: &Action) {
    let nat = match action.nat {
        NAT_DST | NAT_SRC | NAT_NEXT_HOP | NAT_ENCAP => action.nat,
        NAT_ICMP_ERROR_DST => NAT_DST,
        NAT_ICMP_ERROR_SRC => NAT_SRC,
        _ => NAT_NONE,
    };
    let value = FragValue { addr: action.addr, nat, _pad: [0; 3] };
    let _ = FRAGS.insert(&frag_key(meta), &value, 0);
}

/// A non-first fragment carries no ports, so rules on ports cannot judge it: it passes when
/// its first fragment was allowed, rewritten as that one was. `None`: that is not known
/// ([`unknown_fragment`] decides).
#[inline(always)]
pub fn later_fragment(meta: &PacketMeta) -> Option<Action> {
    let first = unsafe { FRAGS.get(&frag_key(meta)) }?;
    Some(Action { nat: first.nat, addr: first.addr, port: 0 })
}

/// A non-first fragment whose first fragment was not allowed (or not seen) passes only when
/// no NSG applies to it at all.
#[inline(always)]
pub fn unknown_fragment(active: &Active<'_>, meta: &PacketMeta) -> Result<(), DropReason> {
    // Not counted as a rule's hit: no rule decides it (it carries no ports), and each of a
    // datagram's fragments would count as a flow of its own.
    if classify(active, meta, false).unfiltered { Ok(()) } else { Err(DropReason::Fragment) }
}

/// An unknown non-first fragment that a NAT gateway would translate: without its first
/// fragment's translation it cannot be, and must not leave with its private source. Nor can
/// one to a load balancer's frontend address be balanced: routed on from here, it would go
/// back to the router that sent it (a frontend address is in no forwarding table), and come
/// back until its TTL ran out.
#[inline(always)]
pub fn untranslated_fragment(
    ctx: &impl Hook,
    active: &Active<'_>,
    meta: &PacketMeta,
) -> Result<(), DropReason> {
    let flags = active.config.flags;
    if flags & FLAG_NO_NAT == 0 && snat::gateway(meta, u32::from(meta.dir)).is_some() {
        return Err(DropReason::Fragment);
    }
    if lb::frontend_address(meta, flags) && forward::routed_on(ctx, meta) {
        return Err(DropReason::Fragment);
    }
    Ok(())
}
