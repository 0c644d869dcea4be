//! `xdpgate observe`: a live stream of the dataplane's events (flows that begin, denied and
//! dropped packets), filtered, as text lines or JSON lines. Like `hubble observe` and
//! `cilium-dbg monitor --type drop`.
//!
//! The events come from the `MONITOR` ring, which the dataplane writes only while an
//! observer holds the lease (`dataplane::monitor`): separate from the agent's flow-log ring,
//! so observing takes nothing from the flow log and works without an agent. Filters are
//! applied here, in userspace: the kernel's rate limit counts every drop event, matching or
//! not.

use std::{
    collections::HashMap,
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;
use xdpgate_common::{
    events::{EVENT_AT_EGRESS, FlowEvent, NO_REASON},
    flow::{IcmpFlow, NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_SRC},
    lb::NO_BACKEND,
    nsg::DIR_INBOUND,
    stats::DROP_REASON_NAMES,
};
use xdpgate_dataplane::{
    PinDir,
    flows::{self, Names, SideRules},
    monitor, stats,
};

use crate::{
    dates,
    filter::{FlowFilter, Subject, Verdict},
    views::{OutputArgs, flows::endpoint},
};

/// Watch the dataplane's events live: new flows, denied and dropped packets.
///
/// One line per event: verdict (allowed, translated, denied, dropped), drop reason, deciding
/// rule, interface, addresses and ports before and after translation, backend and TCP
/// flags. Ctrl-C ends it. Filters are applied by observe, not in the kernel.
///
/// Drops are reported per packet up to a rate limit (per CPU); what it held back is
/// reported each second. One observer at a time; works with or without the agent, and takes
/// nothing from its flow log.
///
/// Example: xdpgate observe --type drop --dst 198.51.100.0/24 --port 22
#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub filter: FlowFilter,
    /// Which events: drop (denied and dropped packets), flow (flows that began), or all.
    #[arg(long = "type", value_enum, default_value = "all")]
    pub kind: EventType,
    /// Stop after N events (of those the filters select).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Print one JSON object a line instead of text (`-o json` likewise).
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Every event.
    All,
    /// Packets denied by a rule or dropped for another reason.
    Drop,
    /// Flows that began (allowed or translated).
    Flow,
}

/// A rule as events name it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rule {
    pub nsg: String,
    pub rule: String,
}

/// Source and destination after translation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Translated {
    pub src: IpAddr,
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Backend {
    pub load_balancer: Option<String>,
    pub rule: Option<String>,
    pub address: Option<IpAddr>,
}

/// One event as `observe` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub time: String,
    pub verdict: Verdict,
    /// Why it was dropped (`xdpgate stats`'s drop reasons); none for allowed flows.
    pub reason: Option<&'static str>,
    pub interface: Option<String>,
    pub ifindex: u32,
    /// `ingress` (XDP or tc) or `egress` (the host's own packets).
    pub hook: &'static str,
    pub direction: &'static str,
    pub protocol: serde_json::Value,
    /// The packet as it arrived; none for drops before its headers were parsed.
    pub src: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst: Option<IpAddr>,
    pub dst_port: Option<u16>,
    /// An ICMP echo's identifier, or another ICMP message's kind (as `xdpgate flows`).
    pub icmp_id: Option<u16>,
    pub icmp_type: Option<u8>,
    /// `SYN`, `SYN|ACK`, ...: TCP only.
    pub tcp_flags: Option<String>,
    /// The deciding rule (the destination side's where an NSG applied there).
    pub rule: Option<Rule>,
    pub translated: Option<Translated>,
    pub backend: Option<Backend>,
    pub bytes: u32,
    pub generation: u64,
    #[serde(skip)]
    rules: SideRules,
    #[serde(skip)]
    proto: u8,
}

const TCP_FLAG_NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

/// `SYN|ACK` and the like; `none` for no flags.
pub fn tcp_flags(flags: u8) -> String {
    let set: Vec<&str> = TCP_FLAG_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| flags & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() { "none".into() } else { set.join("|") }
}

/// `time_ns` (the dataplane's monotonic clock) as RFC 3339 UTC with milliseconds.
fn time(mono_ns: u64) -> String {
    dates::rfc3339_millis(dates::wall_clock(mono_ns))
}

/// Reads events with the names they need: rules, backends (re-read when a newer policy
/// generation shows up) and interfaces.
pub struct Describer {
    pins: PinDir,
    names: Option<Names>,
    /// The newest generation `names` were read for.
    known: Option<u64>,
    ifnames: HashMap<u32, Option<String>>,
}

impl Describer {
    pub fn new(pins: &PinDir) -> Self {
        Self { pins: pins.clone(), names: None, known: None, ifnames: HashMap::new() }
    }

    /// The names of `generation` and those before it: read again only for a newer one (not
    /// per event: a flood of drops would read the records thousands of times a second).
    fn names(&mut self, generation: u64) -> Option<&Names> {
        if self.known.is_none_or(|known| generation > known) {
            // No policy yet (or its records unreadable): events go unnamed.
            self.names = Names::read(&self.pins).ok();
            self.known = Some(self.names.as_ref().map_or(generation, |n| n.generation()));
        }
        self.names.as_ref()
    }

    pub fn describe(&mut self, e: &FlowEvent) -> Event {
        let family = e.key.family;
        let parsed = family == 4 || family == 6;
        let ports = flows::has_ports(e.key.proto);
        let addr = |w: &[u32; 4]| parsed.then(|| flows::addr(w, family));
        let port = |p: u16| (parsed && ports).then_some(p);
        let verdict = match e.verdict() {
            "translated" => Verdict::Translated,
            "allowed" => Verdict::Allowed,
            "denied" => Verdict::Denied,
            _ => Verdict::Dropped,
        };
        let (src, dst) = (addr(&e.key.src), addr(&e.key.dst));
        let icmp = e.key.icmp_flow().filter(|_| parsed);
        let translated = match (e.nat, src, dst) {
            (NAT_DST, Some(src), Some(_)) => Some(Translated {
                src,
                src_port: port(e.key.sport),
                dst: flows::addr(&e.nat_addr, family),
                dst_port: port(e.nat_port),
            }),
            (NAT_SRC, Some(_), Some(dst)) => Some(Translated {
                src: flows::addr(&e.nat_addr, family),
                src_port: port(e.nat_port),
                dst,
                dst_port: port(e.key.dport),
            }),
            _ => None,
        };
        // Borrowed, not cloned: the records of a big policy are large.
        let names = self.names(e.generation);
        let rules = names.map(|n| n.rules(e.rules, e.generation)).unwrap_or_default();
        let backend = (e.service != NO_BACKEND).then(|| {
            let service = names.and_then(|n| n.service(e.service));
            Backend {
                load_balancer: service.map(|s| s.lb.clone()),
                rule: service.map(|s| s.rule.clone()),
                address: names.and_then(|n| n.backend(e.backend)).or(matches!(
                    e.nat,
                    NAT_NEXT_HOP | NAT_DST | NAT_ENCAP
                )
                .then(|| flows::addr(&e.nat_addr, family))),
            }
        });
        let interface =
            self.ifnames.entry(e.ifindex).or_insert_with(|| stats::ifname(e.ifindex)).clone();
        Event {
            time: time(e.time_ns),
            verdict,
            reason: (e.reason != NO_REASON)
                .then(|| DROP_REASON_NAMES.get(usize::from(e.reason)).copied())
                .flatten(),
            interface,
            ifindex: e.ifindex,
            hook: if e.point == EVENT_AT_EGRESS { "egress" } else { "ingress" },
            direction: if u32::from(e.direction) == DIR_INBOUND { "inbound" } else { "outbound" },
            protocol: if parsed {
                protocol_json(family, e.key.proto)
            } else {
                serde_json::Value::Null
            },
            src,
            src_port: port(e.key.sport),
            dst,
            dst_port: port(e.key.dport),
            icmp_id: icmp.and_then(IcmpFlow::identifier),
            icmp_type: icmp.and_then(IcmpFlow::message_type),
            tcp_flags: (parsed && e.key.proto == 6).then(|| tcp_flags(e.tcp_flags)),
            rule: rules.deciding().map(|r| Rule { nsg: r.nsg.clone(), rule: r.rule.clone() }),
            translated,
            backend,
            bytes: e.bytes,
            generation: e.generation,
            rules,
            proto: e.key.proto,
        }
    }
}

/// A protocol's name, or its number for those without one.
fn protocol_json(family: u8, proto: u8) -> serde_json::Value {
    let name = flows::protocol_name(family, proto);
    match name.parse::<u8>() {
        Ok(n) => n.into(),
        Err(_) => name.into(),
    }
}

impl Event {
    fn subject(&self) -> Option<Subject<'_>> {
        let t = self.translated.as_ref();
        Some(Subject {
            src: self.src?,
            src_port: self.src_port,
            dst: self.dst?,
            dst_port: self.dst_port,
            proto: self.proto,
            translated_src: t.filter(|t| Some(t.src) != self.src).map(|t| (t.src, t.src_port)),
            translated_dst: t
                .filter(|t| Some(t.dst) != self.dst)
                .map(|t| (t.dst, t.dst_port))
                .or_else(|| self.backend.as_ref()?.address.map(|a| (a, self.dst_port))),
            rules: [self.rules.outbound.as_ref(), self.rules.inbound.as_ref()],
            verdict: Some(self.verdict),
            reason: self.reason,
        })
    }

    /// Whether the filter selects it. An event without addresses (dropped before parsing)
    /// meets only filters that ask nothing of the packet.
    pub fn selected(&self, kind: EventType, f: &FlowFilter) -> bool {
        let dropped = matches!(self.verdict, Verdict::Denied | Verdict::Dropped);
        let wanted = match kind {
            EventType::All => true,
            EventType::Drop => dropped,
            EventType::Flow => !dropped,
        };
        wanted
            && match self.subject() {
                Some(s) => f.matches(&s),
                None => {
                    let asks_packet = f.src.is_some()
                        || f.dst.is_some()
                        || f.port.is_some()
                        || f.protocol.is_some()
                        || f.rule.is_some();
                    !asks_packet
                        && f.verdict.is_none_or(|v| v == self.verdict)
                        && f.reason.as_deref().is_none_or(|r| Some(r) == self.reason)
                }
            }
    }

    /// One line, within 100 columns for IPv4:
    /// `12:00:01.250 denied veth0 in tcp 203.0.113.7:40000 -> 198.51.100.10:22 SYN web/deny-ssh`
    pub fn line(&self) -> String {
        let clock = self.time.get(11..23).unwrap_or(&self.time);
        let what = match self.reason {
            Some(r) if self.verdict != Verdict::Denied => format!("{} {r}", self.verdict.name()),
            _ => self.verdict.name().to_string(),
        };
        let dir = if self.direction == "inbound" { "in" } else { "out" };
        let at = if self.hook == "egress" { "(egress)" } else { "" };
        let iface = self.interface.clone().unwrap_or_else(|| format!("#{}", self.ifindex));
        let mut line = format!("{clock} {what} {iface}{at} {dir}");
        match (self.src, self.dst) {
            (Some(src), Some(dst)) => {
                let proto = match &self.protocol {
                    serde_json::Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                let mut from = endpoint(src, self.src_port);
                let mut to = endpoint(dst, self.dst_port);
                if let Some(t) = &self.translated {
                    if t.src != src || t.src_port != self.src_port {
                        from += &format!(" => {}", endpoint(t.src, t.src_port));
                    }
                    if t.dst != dst || t.dst_port != self.dst_port {
                        to += &format!(" => {}", endpoint(t.dst, t.dst_port));
                    }
                }
                line += &format!(" {proto} {from} -> {to}");
                match (self.icmp_id, self.icmp_type) {
                    (Some(id), _) => line += &format!(" id {id}"),
                    (None, Some(kind)) => line += &format!(" type {kind}"),
                    (None, None) => {}
                }
            }
            _ => line += " (not parsed)",
        }
        if let Some(flags) = &self.tcp_flags {
            line += &format!(" {flags}");
        }
        if let Some(b) = &self.backend {
            let name = format!(
                "{}/{}",
                b.load_balancer.as_deref().unwrap_or("?"),
                b.rule.as_deref().unwrap_or("?")
            );
            match b.address {
                Some(a) if self.translated.is_none() => line += &format!(" lb {name} -> {a}"),
                _ => line += &format!(" lb {name}"),
            }
        }
        if let Some(r) = &self.rule {
            line += &format!(" {}/{}", r.nsg, r.rule);
        }
        line
    }
}

/// Set by SIGINT and SIGTERM: the loop ends at its next turn.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// How often the held-back count is read (the lease renews itself: `dataplane::lease`).
const TICK: Duration = Duration::from_secs(1);
/// How long one wait for events lasts (the dataplane wakes readers only once the ring
/// fills).
const POLL_MS: i32 = 100;

pub fn run(pins: &PinDir, args: ObserveArgs) -> Result<()> {
    let json = args.output.format() == crate::views::Format::Json;
    // SAFETY: installs a handler that only stores to an atomic; without SA_RESTART, so a
    // signal ends the wait below at once. Before the lease: a Ctrl-C as it starts must end
    // it, not kill the process and leave the lease to run out.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    let lease = monitor::take(pins)?;
    // Empty as the lease began (`monitor::take`).
    let mut ring = monitor::ring(pins)?;
    let mut describer = Describer::new(pins);
    let mut last = monitor::dropped(pins)?;
    let mut tick = Instant::now();
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    if !json {
        eprintln!("observing the dataplane at {} (Ctrl-C ends)", pins.path().display());
    }
    while !STOP.load(Ordering::Relaxed) && args.count.is_none_or(|n| shown < n) {
        let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        while let Some(item) = ring.next() {
            let Some(e) = FlowEvent::from_record(&item) else { continue };
            let event = describer.describe(&e);
            if !event.selected(args.kind, &args.filter) {
                continue;
            }
            let text = if json { serde_json::to_string(&event)? } else { event.line() };
            writeln!(out, "{text}").context("writing to stdout")?;
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                break;
            }
        }
        out.flush().context("writing to stdout")?;
        if tick.elapsed() >= TICK {
            let now = monitor::dropped(pins)?;
            let (held, lost) = (now.held_back - last.held_back, now.lost - last.lost);
            let secs = tick.elapsed().as_secs_f64();
            if held + lost > 0 {
                let text = if json {
                    serde_json::json!({"time": dates::rfc3339(unix_now()), "held_back": held, "lost": lost, "interval_seconds": secs}).to_string()
                } else {
                    format!(
                        "... {held} events held back by the rate limit in the last second{}",
                        if lost > 0 { format!(", {lost} lost (ring full)") } else { String::new() }
                    )
                };
                writeln!(out, "{text}").context("writing to stdout")?;
            }
            last = now;
            tick = Instant::now();
        }
    }
    drop(lease);
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use xdpgate_common::{
        events::{EVENT_BEGIN, EVENT_DROP, EVENT_VERSION},
        flow::FlowKey,
        stats::DropReason,
    };

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        filter: FlowFilter,
    }

    fn filter(args: &[&str]) -> FlowFilter {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).unwrap().filter
    }

    fn words(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    fn describe(e: &FlowEvent) -> Event {
        // No dataplane there: events go unnamed.
        Describer::new(&PinDir::new("/nonexistent/xdpgate-observe-test")).describe(e)
    }

    #[test]
    fn a_load_balanced_flow_shows_the_backend_it_went_to() {
        let e = FlowEvent {
            kind: EVENT_BEGIN,
            version: EVENT_VERSION,
            key: FlowKey {
                src: words([203, 0, 113, 7]),
                dst: words([192, 0, 2, 10]),
                sport: 40000,
                dport: 80,
                proto: 6,
                family: 4,
                kind: 0,
                _pad: 0,
            },
            tcp_flags: 0x02,
            nat: NAT_DST,
            nat_addr: words([198, 51, 100, 10]),
            nat_port: 8080,
            service: 0,
            backend: 0,
            ..Default::default()
        };
        let ev = describe(&e);
        assert_eq!(ev.verdict, Verdict::Translated);
        let t = ev.translated.as_ref().unwrap();
        assert_eq!(
            (t.dst.to_string(), t.dst_port, t.src_port),
            ("198.51.100.10".into(), Some(8080), Some(40000))
        );
        let line = ev.line();
        assert!(
            line.contains("tcp 203.0.113.7:40000 -> 192.0.2.10:80 => 198.51.100.10:8080 SYN"),
            "{line}"
        );
        assert!(filter(&["--dst", "198.51.100.0/24"]).matches(&ev.subject().unwrap()));
        assert!(ev.selected(EventType::Flow, &filter(&["--port", "8080"])));
        assert!(!ev.selected(EventType::Drop, &filter(&[])));
    }

    /// An ICMP event names the echo's identifier, or another message's kind, as `flows`
    /// does (seen failing: neither was shown).
    #[test]
    fn an_icmp_event_names_its_identifier_or_kind() {
        let key = |kind, id| FlowKey {
            src: words([203, 0, 113, 7]),
            dst: words([198, 51, 100, 10]),
            sport: id,
            dport: id,
            proto: 1,
            family: 4,
            kind,
            _pad: 0,
        };
        let event = |key| FlowEvent {
            kind: EVENT_BEGIN,
            version: EVENT_VERSION,
            key,
            ..Default::default()
        };
        let ping = describe(&event(key(0, 7)));
        assert_eq!((ping.icmp_id, ping.icmp_type, ping.src_port), (Some(7), None, None));
        assert!(ping.line().contains("icmp 203.0.113.7 -> 198.51.100.10 id 7"), "{}", ping.line());
        let timestamp = describe(&event(key(13, 0)));
        assert_eq!((timestamp.icmp_id, timestamp.icmp_type), (None, Some(13)));
        assert!(timestamp.line().contains("198.51.100.10 type 13"), "{}", timestamp.line());
    }

    #[test]
    fn a_drop_before_parsing_has_no_addresses_and_meets_only_packetless_filters() {
        let e = FlowEvent {
            kind: EVENT_DROP,
            version: EVENT_VERSION,
            reason: DropReason::Malformed as u8,
            ifindex: 1,
            ..Default::default()
        };
        let ev = describe(&e);
        assert_eq!(
            (ev.src, ev.protocol.clone(), ev.reason),
            (None, serde_json::Value::Null, Some("malformed"))
        );
        assert!(ev.line().contains("dropped malformed"), "{}", ev.line());
        assert!(ev.selected(EventType::Drop, &filter(&["--reason", "malformed"])));
        assert!(!ev.selected(EventType::Drop, &filter(&["--reason", "no_flow"])));
        assert!(!ev.selected(EventType::All, &filter(&["--port", "22"])));
    }
}
