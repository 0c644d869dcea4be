//! Flow logs in the spirit of Azure's NSG flow logs (version 2): one JSON object per line
//! and flow tuple, with `"version": 2`, the NSG and rule that decided it, the decision and
//! the flow state: `begin`, `continuing` (an interim record of a long flow, Azure's "C"),
//! `end`; `deny`. `continuing` and `end` records carry the packets and bytes each way, in
//! all and since the flow's previous record. `begin` and `deny` come from the dataplane's
//! ring buffer; `end` from the agent's sweep of idle flows (`flows::remove_idle`, which
//! runs with or without a flow log) and, for flows through a NAT gateway, from the expiry
//! of their translations (`nat::expire`); `continuing` from a walk of the flow table every
//! `--flow-log-interval`. The agent's own health-probe connections are left out, or marked.
//! The schema is in docs/flowlog.md.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};
use xdpgate_common::{
    events::{EVENT_AT_EGRESS, EVENT_BEGIN, EVENT_DENY, FlowEvent, NO_REASON},
    flow::{FlowKey, FlowValue},
    nsg::DIR_INBOUND,
    stats::DROP_REASON_NAMES,
};

use xdpgate_dataplane::{
    PinDir,
    flows::{self, Flow, FlowEntries, Names, RuleName},
    nat::monotonic_ns,
    stats::{self, Traffic},
};

use crate::status::rfc3339;

mod sink;
mod writer;
pub use sink::{Lines, Sink};
pub use writer::{Done, Writer};

/// The schema version every record carries.
pub const VERSION: u32 = 2;

/// The flow log's flags of `xdpgate run`.
#[derive(clap::Args, Debug, Clone)]
pub struct FlowLogArgs {
    /// Write flow logs (JSON lines, schema version 2: begin, continuing and end with packets
    /// and bytes each way; deny, drop) to FILE, or to stdout with `-`.
    #[arg(long, value_name = "FILE")]
    pub flow_log: Option<String>,
    /// Rotate the flow log to FILE.1 when it reaches this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 100 << 20)]
    pub flow_log_max_bytes: u64,
    /// Rotated flow logs kept: FILE.1 (newest) to FILE.N; older ones are deleted. 0 keeps
    /// none (a full file is deleted).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub flow_log_keep: u32,
    /// Write an interim (`continuing`) record of each flow that had traffic since its last
    /// record every SECONDS (Azure's version 2 "C" records); 0: none.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub flow_log_interval: u64,
    /// The agent's own health-probe connections: left out of the flow log (`omit`), or
    /// written with `"probe": true` (`mark`).
    #[arg(long, value_enum, value_name = "HOW", default_value_t = ProbeTraffic::Omit)]
    pub flow_log_probes: ProbeTraffic,
}

impl FlowLogArgs {
    /// The interval of interim records; none when 0.
    pub fn interval(&self) -> Option<Duration> {
        (self.flow_log_interval > 0).then(|| Duration::from_secs(self.flow_log_interval))
    }

    /// The sink, when a flow log is wanted.
    pub fn open(&self) -> Result<Option<Sink>> {
        self.flow_log
            .as_deref()
            .map(|f| Sink::open(f, self.flow_log_max_bytes, self.flow_log_keep))
            .transpose()
    }
}

/// What the flow log does with the agent's own health-probe connections.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeTraffic {
    /// Leave the agent's probe connections out of the flow log.
    Omit,
    /// Log them, marked `"probe": true`.
    Mark,
}

/// The dataplane's monotonic nanoseconds as wall-clock seconds since the Unix epoch.
pub fn wall_clock(mono_ns: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now - (monotonic_ns().saturating_sub(mono_ns)) as f64 / 1e9
}

/// Seconds since the Unix epoch as RFC 3339 in UTC with milliseconds.
pub fn time(unix: f64) -> String {
    let ms = (unix.max(0.0) * 1e3).round() as u64;
    let whole = rfc3339(ms / 1000);
    format!("{}.{:03}Z", whole.trim_end_matches('Z'), ms % 1000)
}

fn rule_name(r: Option<&RuleName>) -> Value {
    r.map_or(Value::Null, |r| json!({"nsg": r.nsg, "rule": r.rule}))
}

/// The deciding rule (`nsg`, `rule`: the destination side's when an NSG applied there, else
/// the source side's) and the rule of each side (`rules.outbound`, `rules.inbound`).
fn rule_fields(out: &mut Map<String, Value>, rules: &flows::SideRules) {
    out.insert("nsg".into(), rules.deciding().map_or(Value::Null, |r| json!(r.nsg)));
    out.insert("rule".into(), rules.deciding().map_or(Value::Null, |r| json!(r.rule)));
    out.insert(
        "rules".into(),
        json!({"outbound": rule_name(rules.outbound.as_ref()), "inbound": rule_name(rules.inbound.as_ref())}),
    );
}

/// `version`, `time`, `state` and `decision`, the fields every record has.
fn record(time_unix: f64, state: &str, decision: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("version".into(), json!(VERSION));
    m.insert("time".into(), json!(time(time_unix)));
    m.insert("state".into(), json!(state));
    m.insert("decision".into(), json!(decision));
    m
}

/// The 5-tuple of the flow's first packet: `protocol`, `src`, `src_port`, `dst`,
/// `dst_port` (ports for TCP, UDP and SCTP only; `icmp_id` for ICMP echo).
fn tuple(out: &mut Map<String, Value>, key: &FlowKey) {
    let ports = matches!(key.proto, 6 | 17 | 132);
    let name = flows::protocol_name(key.family, key.proto);
    // Named, or its number (as a number).
    out.insert("protocol".into(), name.parse::<u8>().map_or_else(|_| json!(name), |n| json!(n)));
    out.insert("src".into(), json!(flows::addr(&key.src, key.family).to_string()));
    out.insert("src_port".into(), if ports { json!(key.sport) } else { Value::Null });
    out.insert("dst".into(), json!(flows::addr(&key.dst, key.family).to_string()));
    out.insert("dst_port".into(), if ports { json!(key.dport) } else { Value::Null });
    if xdpgate_common::is_icmp(key.family, key.proto) {
        out.insert("icmp_id".into(), json!(key.sport));
    }
}

fn direction(d: u8) -> &'static str {
    if u32::from(d) == DIR_INBOUND { "inbound" } else { "outbound" }
}

/// The log line of a dataplane event: `begin` (an allowed flow's first packet), `deny` (an
/// NSG rule denied the packet) or `drop` (dropped for another reason the flow log hears of:
/// `nat_unmatched`). Version-2 events add the interface (`interface`, named as the event was
/// read, and `hook`: `ingress` or `egress` for the host's own packets), the drop `reason`,
/// the packet's `tcp_flags`, and for a begin the rewrite (`nat`) and backend
/// (`load_balancer`), named as `xdpgate flows` names them.
pub fn event_line(names: &Names, e: &FlowEvent, interface: Option<&str>) -> Value {
    let (state, decision) = match e.kind {
        EVENT_BEGIN => ("begin", "allow"),
        EVENT_DENY => ("deny", "deny"),
        _ => ("drop", "drop"),
    };
    let mut m = record(wall_clock(e.time_ns), state, decision);
    m.insert("direction".into(), json!(direction(e.direction)));
    if matches!(e.key.family, 4 | 6) {
        tuple(&mut m, &e.key);
    } else {
        // Dropped before its headers were read.
        for k in ["protocol", "src", "src_port", "dst", "dst_port"] {
            m.insert(k.into(), Value::Null);
        }
    }
    // The event as the first entry of its flow: the same naming as flows and `end` lines.
    let entry = FlowValue {
        generation: e.generation,
        rules: e.rules,
        direction: e.direction,
        nat: e.nat,
        nat_addr: e.nat_addr,
        nat_port: e.nat_port,
        service: e.service,
        backend: e.backend,
        ..FlowValue::default()
    };
    let flow = FlowEntries { key: e.key, forward: Some(entry), reply: None }.describe(names);
    rule_fields(&mut m, &flow.rules);
    if e.version >= 2 {
        if e.kind == EVENT_BEGIN {
            if let Some(nat) = &flow.nat {
                m.insert("nat".into(), json!(nat));
            }
            if let Some(lb) = &flow.load_balancer {
                m.insert("load_balancer".into(), json!(lb));
            }
        }
        m.insert("interface".into(), json!(interface));
        m.insert(
            "hook".into(),
            json!(if e.point == EVENT_AT_EGRESS { "egress" } else { "ingress" }),
        );
        if e.key.proto == 6 {
            m.insert("tcp_flags".into(), json!(crate::observe::tcp_flags(e.tcp_flags)));
        }
    }
    if e.reason != NO_REASON {
        let reason = DROP_REASON_NAMES.get(usize::from(e.reason)).copied();
        m.insert("reason".into(), json!(reason));
    }
    Value::Object(m)
}

fn traffic(t: Traffic) -> Value {
    json!({"packets": t.packets, "bytes": t.bytes})
}

fn minus(a: Traffic, b: Traffic) -> Traffic {
    Traffic { packets: a.packets.saturating_sub(b.packets), bytes: a.bytes.saturating_sub(b.bytes) }
}

/// Packets and bytes in the first packet's direction, and back.
pub type EachWay = (Traffic, Traffic);

/// What a record of a flow counts: its totals each way, and the totals its delta counts
/// from.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Counts {
    totals: EachWay,
    before: EachWay,
}

impl Counts {
    /// The counts of a flow as a read of its entries found it, after a record of `last`
    /// (zero if none).
    /// - A direction whose entry the read did not find keeps `last`'s totals: the read fell
    ///   between the removals (or the inserts) of the flow's two entries.
    /// - A direction the read found with fewer packets than `last` is a new flow on the same
    ///   tuple (the dataplane ended the old one, idle or reopened, without a record): it
    ///   counts from zero.
    fn of(read: &FlowEntries, flow: &Flow, last: EachWay) -> Self {
        let new = (read.forward.is_some() && flow.forward.packets < last.0.packets)
            || (read.reply.is_some() && flow.reply.packets < last.1.packets);
        let before = if new { EachWay::default() } else { last };
        let totals = (
            if read.forward.is_some() { flow.forward } else { before.0 },
            if read.reply.is_some() { flow.reply } else { before.1 },
        );
        Self { totals, before }
    }
}

/// A `continuing` or `end` line: the flow as a read of its entries found it, its totals
/// each way and what came since its previous record.
fn flow_line(read: &FlowEntries, flow: &Flow, state: &str, time_unix: f64, c: Counts) -> Value {
    let ((forward, reply), before) = (c.totals, c.before);
    let mut m = record(time_unix, state, "allow");
    m.insert("direction".into(), json!(flow.direction));
    tuple(&mut m, &read.key);
    rule_fields(&mut m, &flow.rules);
    if let Some(nat) = &flow.nat {
        m.insert("nat".into(), json!(nat));
    }
    if let Some(lb) = &flow.load_balancer {
        m.insert("load_balancer".into(), json!(lb));
    }
    m.insert("forward".into(), traffic(forward));
    m.insert("reply".into(), traffic(reply));
    m.insert(
        "delta".into(),
        json!({
            "forward": traffic(minus(forward, before.0)),
            "reply": traffic(minus(reply, before.1)),
        }),
    );
    Value::Object(m)
}

/// What the flow log has written of live flows, by the key of each flow's first packet's
/// direction, shared by the `end` lines and the walks for `continuing` ones; and whether a
/// walk's lines are counted and not written yet (an `end` line then waits for them: one of
/// them may be its flow's last `continuing` line, which it counts from). That flag is set
/// under the lock, and read without it by the agent's loop while a walk counts.
#[derive(Clone, Default)]
pub struct Reported(Arc<(Mutex<ReportedState>, AtomicBool)>);

#[derive(Default)]
struct ReportedState {
    /// Totals of each flow's last `continuing` record: what the next `delta` counts from;
    /// and whether the last walk missed the flow. A flow the agent removes (its sweep, the
    /// NAT expiry) is taken out as it is removed ([`Reported::removed`]); one gone
    /// otherwise (`flows delete`, the dataplane's own removals) is forgotten when a second
    /// walk misses it.
    last: HashMap<FlowKey, (EachWay, bool)>,
    /// While a walk is under way (begun, its lines not counted yet): the flows the agent
    /// removed since it began. It may have read them before they were removed, and must not
    /// count them again.
    ended: Option<HashSet<FlowKey>>,
}

impl Reported {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReportedState> {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flow was removed, its `end` line to come: the totals of its last record (zero if
    /// none), for that line to count from. Taken as it is removed, not when the line is
    /// written, so no walk in between forgets them, and a walk under way that read the flow
    /// writes nothing of it.
    pub fn removed(&self, key: &FlowKey) -> EachWay {
        let mut m = self.lock();
        if let Some(ended) = &mut m.ended {
            ended.insert(*key);
        }
        m.last.remove(key).map(|(totals, _)| totals).unwrap_or_default()
    }

    fn begin_walk(&self) {
        self.lock().ended = Some(HashSet::new());
    }

    /// Counts the flows a walk read: those with traffic since their last record, by index
    /// in `live`, with their counts. Flows the walk did not find are forgotten when a second
    /// walk misses them too. Their lines are then unwritten ([`Reported::written`]).
    fn count(&self, live: &[(FlowEntries, Flow)]) -> Vec<(usize, Counts)> {
        let keys: HashSet<FlowKey> = live.iter().map(|(e, _)| e.key).collect();
        let mut guard = self.lock();
        let ReportedState { last, ended } = &mut *guard;
        let ended = ended.take().unwrap_or_default();
        last.retain(|k, (_, missed)| {
            let seen = keys.contains(k);
            let keep = seen || !*missed;
            *missed = !seen;
            keep
        });
        let mut counted = Vec::new();
        for (i, (read, flow)) in live.iter().enumerate() {
            if ended.contains(&read.key) {
                continue;
            }
            let before = last.get(&read.key).map(|&(totals, _)| totals).unwrap_or_default();
            let counts = Counts::of(read, flow, before);
            if counts.totals != before {
                counted.push((i, counts));
                last.insert(read.key, (counts.totals, false));
            }
        }
        self.0.1.store(!counted.is_empty(), Ordering::SeqCst);
        counted
    }

    /// A walk's lines are counted and not written yet.
    fn unwritten(&self) -> bool {
        self.0.1.load(Ordering::SeqCst)
    }

    /// The walk's lines are written.
    fn written(&self) {
        self.0.1.store(false, Ordering::SeqCst);
    }
}

/// The `end` line of a flow the agent removed (its sweep, or the NAT expiry), with its
/// packets and bytes both ways and since `last`, what [`Reported::removed`] gave.
pub fn end_line(names: &Names, ended: &FlowEntries, last: EachWay) -> Value {
    let seen = ended.forward.iter().chain(ended.reply.iter()).map(|v| v.last_seen_ns).max();
    let flow = ended.describe(names);
    let counts = Counts::of(ended, &flow, last);
    flow_line(ended, &flow, "end", wall_clock(seen.unwrap_or(0)), counts)
}

/// The `continuing` lines of one walk of the flow table, as the log holds them: one for each
/// flow with traffic since its last record. Runs on a blocking thread: a walk of a big table
/// takes a while, and so does making text of its lines (several µs each), which the agent's
/// loop would otherwise spend. The lines are built outside the lock the sweep's removals
/// take.
pub fn interim_lines(
    pins: &PinDir,
    names: &Names,
    reported: &Reported,
    probes: &Probes,
) -> Result<Lines> {
    reported.begin_walk();
    let live = flows::established(pins, names)?;
    let mut lines = Lines::default();
    continuing(&live, reported, |line| probes.push(&mut lines, line));
    Ok(lines)
}

/// Hands `line` the `continuing` line of each flow of `live` with traffic since its last
/// record, one at a time (a million of them at once took gigabytes).
fn continuing(live: &[(FlowEntries, Flow)], reported: &Reported, mut line: impl FnMut(Value)) {
    let now = wall_clock(monotonic_ns());
    for (i, counts) in reported.count(live) {
        line(flow_line(&live[i].0, &live[i].1, "continuing", now, counts));
    }
}

/// The agent's own health-probe connections: a local address to a probe target's port on
/// a backend (TCP; HTTP and HTTPS probes are TCP too).
#[derive(Clone, Debug, Default)]
pub struct ProbeConnections {
    /// Backend and port of each probe target.
    pub targets: HashSet<(IpAddr, u16)>,
    /// The host's addresses (in the agent's network namespace).
    pub local: HashSet<IpAddr>,
}

impl ProbeConnections {
    /// Whether a line (with `src`, `src_port`, `dst`, `dst_port`, `protocol`) is one of them.
    pub fn matches(&self, line: &Value) -> bool {
        let end = |a: &str, p: &str| -> Option<(IpAddr, u16)> {
            Some((line[a].as_str()?.parse().ok()?, u16::try_from(line[p].as_u64()?).ok()?))
        };
        let (Some(src), Some(dst)) = (end("src", "src_port"), end("dst", "dst_port")) else {
            return false;
        };
        line["protocol"] == "tcp"
            && ((self.targets.contains(&dst) && self.local.contains(&src.0))
                || (self.targets.contains(&src) && self.local.contains(&dst.0)))
    }

    /// The host's addresses now.
    pub fn local_addresses() -> Result<HashSet<IpAddr>> {
        let addrs = nix::ifaddrs::getifaddrs().context("listing the host's addresses")?;
        Ok(addrs
            .filter_map(|a| a.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect())
    }
}

/// How the agent's probe connections are logged: which they are, and what is done with them.
#[derive(Clone, Debug)]
pub struct Probes {
    pub traffic: ProbeTraffic,
    pub connections: ProbeConnections,
}

impl Probes {
    /// Adds `line` to `lines`, marked if a probe connection's and asked to, or leaves it
    /// out if asked to.
    pub fn push(&self, lines: &mut Lines, mut line: Value) {
        if self.connections.matches(&line) {
            match self.traffic {
                ProbeTraffic::Omit => return,
                ProbeTraffic::Mark => line["probe"] = json!(true),
            }
        }
        lines.push(&line);
    }
}

/// The flow log: its thread, which writes the sink, and how probe connections are treated.
/// Its writes queue lines for the thread, whose result comes later on `writer.done`; `Err`:
/// dropped at once ([`Writer::write`]).
pub struct FlowLog {
    pub writer: Writer,
    pub probes: Probes,
    pub reported: Reported,
    /// `end` lines waiting for a walk's lines ([`FlowLog::write_ends`]).
    held: Vec<Value>,
    /// Interface names by index, looked up once.
    ifnames: HashMap<u32, Option<String>>,
}

impl FlowLog {
    /// Starts the flow log's thread.
    pub fn new(sink: Sink, probes: ProbeTraffic) -> Self {
        Self {
            writer: Writer::spawn(sink),
            probes: Probes { traffic: probes, connections: ProbeConnections::default() },
            reported: Reported::default(),
            held: Vec::new(),
            ifnames: HashMap::new(),
        }
    }

    /// The line of a dataplane event.
    pub fn event_line(&mut self, names: &Names, e: &FlowEvent) -> Value {
        let interface = (e.version >= 2)
            .then(|| self.ifnames.entry(e.ifindex).or_insert_with(|| stats::ifname(e.ifindex)))
            .and_then(|n| n.as_deref());
        event_line(names, e, interface)
    }

    /// Writes the `end` lines of flows the agent removed, as one batch, or holds them while
    /// a walk's lines are counted and not written yet: they may count from one of those,
    /// which comes first.
    pub fn write_ends(&mut self, lines: Vec<Value>) -> Result<()> {
        if self.reported.unwritten() {
            self.held.extend(lines);
            return Ok(());
        }
        self.write_lines(lines)
    }

    /// Writes a walk's `continuing` lines ([`interim_lines`]), then the `end` lines held for
    /// them, as one batch.
    pub fn write_interim(&mut self, mut lines: Lines) -> Result<()> {
        self.reported.written();
        for line in std::mem::take(&mut self.held) {
            self.probes.push(&mut lines, line);
        }
        self.write_all(lines)
    }

    /// Writes `lines` in order as one batch ([`Sink::write_lines`]), probe connections left
    /// out or marked as asked.
    pub fn write_lines(&mut self, lines: impl IntoIterator<Item = Value>) -> Result<()> {
        let mut batch = Lines::default();
        for line in lines {
            self.probes.push(&mut batch, line);
        }
        self.write_all(batch)
    }

    fn write_all(&mut self, lines: Lines) -> Result<()> {
        self.writer.write(lines)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A flow with `packets` each way, both its entries read.
    fn flow(packets: u64) -> (FlowEntries, Flow) {
        let t = Traffic { packets, bytes: 100 * packets };
        let key = FlowKey { sport: 1000, dport: 53, proto: 17, family: 4, ..FlowKey::default() };
        let entry = Some(FlowValue::default());
        let entries = FlowEntries { key, forward: entry, reply: entry };
        let flow = Flow {
            state: flows::FlowState::Established,
            protocol: "udp".into(),
            src: [192, 0, 2, 1].into(),
            src_port: Some(1000),
            dst: [198, 51, 100, 1].into(),
            dst_port: Some(53),
            icmp_id: None,
            direction: "inbound",
            generation: 1,
            nsg: None,
            rule: None,
            layer: None,
            rule_index: None,
            rules: flows::SideRules::default(),
            nat: None,
            load_balancer: None,
            forward: t,
            reply: t,
            idle_seconds: 0.0,
            expired: false,
            incomplete: false,
        };
        (entries, flow)
    }

    /// A walk that read `live`, its lines counted.
    fn walked(reported: &Reported, live: &[(FlowEntries, Flow)]) -> Vec<Value> {
        reported.begin_walk();
        lines_of(live, reported)
    }

    /// The `continuing` lines of `live`, counted.
    fn lines_of(live: &[(FlowEntries, Flow)], reported: &Reported) -> Vec<Value> {
        let mut lines = Vec::new();
        continuing(live, reported, |l| lines.push(l));
        lines
    }

    fn delta(l: &Value) -> u64 {
        l["delta"]["forward"]["packets"].as_u64().unwrap()
    }

    fn packets(l: &Value) -> [u64; 4] {
        let at = |v: &Value, d: &str| v[d]["packets"].as_u64().unwrap();
        [at(l, "forward"), at(l, "reply"), at(&l["delta"], "forward"), at(&l["delta"], "reply")]
    }

    /// What a record counts, by what the read found and the flow's last record.
    #[test]
    fn counts_of_a_read() {
        let t = |packets: u64| Traffic { packets, bytes: 100 * packets };
        let (whole, _) = flow(0);
        let (reply_only, forward_only) =
            (FlowEntries { forward: None, ..whole }, FlowEntries { reply: None, ..whole });
        for (what, read, (f, r), last, totals, before) in [
            ("both read", whole, (8, 6), (3, 3), (8, 6), (3, 3)),
            ("the forward entry gone", reply_only, (0, 5), (3, 3), (3, 5), (3, 3)),
            ("the reply entry gone", forward_only, (4, 0), (3, 3), (4, 3), (3, 3)),
            ("a new flow on the tuple", whole, (1, 1), (3, 3), (1, 1), (0, 0)),
            ("a new flow, half inserted", forward_only, (1, 0), (8, 8), (1, 0), (0, 0)),
            ("a new flow's reply", reply_only, (0, 1), (8, 8), (0, 1), (0, 0)),
        ] {
            let (_, mut flow) = flow(0);
            (flow.forward, flow.reply) = (t(f), t(r));
            let counts = Counts::of(&read, &flow, (t(last.0), t(last.1)));
            let want =
                Counts { totals: (t(totals.0), t(totals.1)), before: (t(before.0), t(before.1)) };
            assert_eq!(counts, want, "{what}");
        }
    }

    /// A walk that reads one of a flow's two entries (between their removals, or their
    /// inserts) counts the other direction as the flow's last record did: no line when the
    /// entry it read has nothing new, and only what that entry has new otherwise.
    #[test]
    fn a_direction_the_walk_did_not_read_keeps_its_last_totals() {
        let reported = Reported::default();
        let (whole, f3) = flow(3);
        assert_eq!(walked(&reported, &[(whole, f3)]).len(), 1);
        // The reply entry alone, as `established` describes it: no forward traffic.
        let (_, mut lone) = flow(3);
        (lone.forward, lone.incomplete) = (Traffic::default(), true);
        let reply_only = FlowEntries { forward: None, ..whole };
        assert!(walked(&reported, &[(reply_only, lone.clone())]).is_empty());
        lone.reply = Traffic { packets: 5, bytes: 500 };
        let lines = walked(&reported, &[(reply_only, lone)]);
        assert_eq!(lines.iter().map(packets).collect::<Vec<_>>(), [[3, 5, 0, 2]]);
        // The forward entry alone, the first time a flow is read (between its inserts).
        let (_, mut first) = flow(1);
        first.reply = Traffic::default();
        let other = Reported::default();
        let forward_only = FlowEntries { reply: None, ..whole };
        let lines = walked(&other, &[(forward_only, first)]);
        assert_eq!(lines.iter().map(packets).collect::<Vec<_>>(), [[1, 0, 1, 0]]);
    }

    /// The walk and the sweep race (the walk reads on its own thread, the sweep removes on
    /// another, the agent's loop counts the walk's lines and writes every line): a flow the
    /// walk read before the sweep removed it gets no `continuing` line after its `end`, and
    /// a new flow on its tuple counts from zero.
    #[test]
    fn continuing_and_end_lines_race_without_double_counting() {
        let reported = Reported::default();
        let (read, f3) = flow(3);
        assert_eq!(
            walked(&reported, &[(read, f3.clone())]).iter().map(delta).collect::<Vec<_>>(),
            [3]
        );
        // Nothing new: no line.
        assert!(walked(&reported, &[(read, f3)]).is_empty());

        // A walk reads the flow (8 packets), the sweep removes it, then the loop counts the
        // walk's lines: nothing of the flow.
        let (_, f8) = flow(8);
        reported.begin_walk();
        assert_eq!(reported.removed(&read.key).0.packets, 3, "the end counts from the last record");
        assert!(lines_of(&[(read, f8.clone())], &reported).is_empty());
        // A new flow with the same tuple, read by a later walk: reported from zero.
        assert_eq!(
            walked(&reported, &[(read, f8.clone())]).iter().map(delta).collect::<Vec<_>>(),
            [8]
        );

        // A flow missed by two walks is forgotten; removals while no walk is under way
        // leave nothing behind (with no interim records, nothing else would clear them).
        walked(&reported, &[]);
        walked(&reported, &[]);
        assert!(reported.lock().last.is_empty());
        reported.removed(&read.key);
        assert!(reported.lock().ended.is_none());
    }

    /// The walk counts its lines on its thread, the agent's loop writes them: an `end` line
    /// that comes in between (it counts from one of them) waits for them.
    #[test]
    fn an_end_line_waits_for_the_walks_lines() {
        let dir = std::env::temp_dir().join(format!("xgorder{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let sink = Sink::open(path.to_str().unwrap(), 1 << 20, 1).unwrap();
        let mut log = FlowLog::new(sink, ProbeTraffic::Omit);
        let states = || -> Vec<String> {
            let text = fs::read_to_string(&path).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["state"].to_string())
                .collect()
        };
        let (read, f3) = flow(3);
        let mut lines = Lines::default();
        walked(&log.reported, &[(read, f3)]).iter().for_each(|l| lines.push(l));
        assert_eq!(log.reported.removed(&read.key).0.packets, 3, "counts from the unwritten line");
        let written = |log: &mut FlowLog| match log.writer.wait() {
            Some(Done::Wrote(result)) => result.unwrap(),
            other => panic!("{other:?}"),
        };
        log.write_ends(vec![json!({"state": "end"})]).unwrap();
        assert_eq!(log.held.len(), 1, "held");
        log.write_interim(lines).unwrap();
        written(&mut log);
        assert_eq!(states(), ["\"continuing\"", "\"end\""]);
        // Nothing unwritten: an end line goes out at once.
        log.write_ends(vec![json!({"state": "end"})]).unwrap();
        written(&mut log);
        assert_eq!(states().len(), 3);
        // Nothing to write: nothing queued.
        log.write_interim(Lines::default()).unwrap();
        assert!(log.writer.done.try_recv().is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
