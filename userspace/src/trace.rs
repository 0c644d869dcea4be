//! `xdpgate trace`: one crafted packet through the programs attached to an interface, run
//! with `BPF_PROG_TEST_RUN` (the kernel runs the pinned entry program and its tail calls
//! on a copy; nothing is sent), marked so that each stage records its decision in the
//! per-CPU `TRACE` record and changes nothing a real packet would see: no flow entry, NAT
//! port claim, rule or interface counter, flow event or capture copy.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use etherparse::PacketBuilder;
use serde::Serialize;
use xdpgate_common::{
    flow::{NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_NONE, NAT_SRC},
    nsg::DIR_INBOUND,
    stats::{DROP_REASON_NAMES, VERDICT_NAMES},
    trace::{
        LB_NO_BACKEND, LB_NO_RULE, LB_NOT_FRONTEND, LB_SELECTED, LOOKUP_EMBRYONIC,
        LOOKUP_ESTABLISHED, LOOKUP_MISS, NSG_ALLOWED, NSG_DENIED, STAGE_ACT, STAGE_END,
        STAGE_NEW_FLOW, STAGE_PARSE, STAGE_SNAT, TRACE, TRACE_ARMED, TraceRecord,
    },
};
use xdpgate_dataplane::{
    Hook, PinDir, apply, fib,
    flows::{self, FlowState, Names, SideRules},
    ifindex, link_info,
    state::{Tool, ToolLock},
};

use crate::{
    filter::Protocol,
    views::{
        OutputArgs, View,
        nexthop::{self, Forwarding},
        to_json,
    },
};

/// Send one crafted packet through the dataplane attached to an interface
/// (BPF_PROG_TEST_RUN: nothing is sent) and show each stage's decision: parse, flow lookup,
/// load balancing, NSG layers and deciding rule, SNAT, rewrite, forwarding, verdict.
///
/// The trace changes no state: no flow entry, NAT port claim or counter is left behind.
///
/// Example: xdpgate trace --iface eth0 --src 203.0.113.7 --dst 198.51.100.10
///          --protocol tcp --dst-port 443
#[derive(clap::Args)]
pub struct TraceArgs {
    /// The interface the packet arrives on (attached to xdpgate).
    #[arg(long)]
    pub iface: String,
    /// Source address.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination address.
    #[arg(long)]
    pub dst: IpAddr,
    /// tcp, udp or icmp (an echo request; ICMPv6 for IPv6 addresses).
    #[arg(long, value_parser = Protocol::from_str_arg)]
    pub protocol: Protocol,
    /// Source port (TCP, UDP; for ICMP the echo identifier).
    #[arg(long, default_value_t = 40000)]
    pub src_port: u16,
    /// Destination port (TCP, UDP); required for them.
    #[arg(long)]
    pub dst_port: Option<u16>,
    /// TCP flags as letters: S (SYN), A (ACK), F (FIN), R (RST), P (PSH), U (URG); default S.
    #[arg(long, value_name = "LETTERS")]
    pub tcp_flags: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// What the stages decided, for the operator.
#[derive(Serialize)]
pub struct Report {
    pub interface: String,
    pub hook: &'static str,
    pub packet: PacketDesc,
    /// Each stage the packet went through, in order, with its decision.
    pub stages: Vec<Stage>,
    /// pass, drop, redirect (sent out of another interface by the dataplane); unknown for
    /// an existing flow's packet whose forwarding could not be told.
    pub verdict: &'static str,
    /// A drop's reason, as `xdpgate stats` names it.
    pub reason: Option<&'static str>,
    /// The deciding rule of each side, where an NSG applied.
    pub rules: SideRules,
    /// Policy generation that decided.
    pub generation: u64,
    /// Always true: the trace left no flow entry, claim or counter.
    pub state_changed: bool,
}

#[derive(Serialize)]
pub struct PacketDesc {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub protocol: String,
    pub tcp_flags: Option<String>,
}

#[derive(Serialize)]
pub struct Stage {
    pub stage: &'static str,
    pub decision: String,
}

impl View for Report {
    fn json(&self) -> Result<serde_json::Value> {
        to_json(self)
    }

    fn text(&self) -> String {
        let p = &self.packet;
        let port = |a: &IpAddr, port: Option<u16>| match (a, port) {
            (IpAddr::V6(_), Some(n)) => format!("[{a}]:{n}"),
            (_, Some(n)) => format!("{a}:{n}"),
            _ => a.to_string(),
        };
        let mut s = format!(
            "trace {} {} > {}{} on {} ({})\n",
            p.protocol,
            port(&p.src, p.src_port),
            port(&p.dst, p.dst_port),
            p.tcp_flags.as_ref().map(|f| format!(" [{f}]")).unwrap_or_default(),
            self.interface,
            self.hook
        );
        for st in &self.stages {
            s.push_str(&format!("  {:<9} {}\n", st.stage, st.decision));
        }
        s.push_str(&format!(
            "verdict: {}{}\n",
            self.verdict,
            self.reason.map(|r| format!(" ({r})")).unwrap_or_default()
        ));
        s
    }
}

impl Protocol {
    fn from_str_arg(s: &str) -> Result<Protocol, String> {
        let p: Protocol = s.parse()?;
        match p {
            Protocol::AnyIcmp | Protocol::Number(6 | 17 | 58) => Ok(p),
            _ => Err(format!("trace crafts tcp, udp or icmp packets, not {s:?}")),
        }
    }
}

/// Builds the frame (Ethernet to the interface's own MAC).
fn frame(args: &TraceArgs, mac: [u8; 6]) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x01], mac);
    let ip = match (args.src, args.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        (s, d) => bail!("--src {s} and --dst {d} are of different address families"),
    };
    let mut out = Vec::new();
    let payload = [0u8; 0];
    match args.protocol {
        Protocol::Number(6) => {
            let dport = args.dst_port.ok_or_else(|| anyhow!("tcp needs --dst-port"))?;
            let mut b = ip.tcp(args.src_port, dport, 1, 64240);
            for c in tcp_flags(args).chars() {
                b = match c.to_ascii_uppercase() {
                    'S' => b.syn(),
                    'A' => b.ack(1),
                    'F' => b.fin(),
                    'R' => b.rst(),
                    'P' => b.psh(),
                    'U' => b.urg(0),
                    other => bail!("--tcp-flags: unknown flag {other:?} (S, A, F, R, P, U)"),
                };
            }
            b.write(&mut out, &payload)?;
        }
        _ if args.tcp_flags.is_some() => bail!("--tcp-flags: only for --protocol tcp"),
        Protocol::Number(17) => {
            let dport = args.dst_port.ok_or_else(|| anyhow!("udp needs --dst-port"))?;
            ip.udp(args.src_port, dport).write(&mut out, &payload)?;
        }
        _ => {
            if args.dst_port.is_some() {
                bail!("--dst-port: icmp has no ports");
            }
            if args.src.is_ipv6() {
                ip.icmpv6_echo_request(args.src_port, 1).write(&mut out, &payload)?;
            } else {
                ip.icmpv4_echo_request(args.src_port, 1).write(&mut out, &payload)?;
            }
        }
    }
    Ok(out)
}

/// How long a trace waits for another one to finish (each takes milliseconds).
const TRACE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr, what: &str) -> Result<i64> {
    // SAFETY: attr is a valid bpf_attr for `cmd`; its pointers outlive the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr, size_of::<bpf_attr>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(ret)
}

/// A marker for one trace: random, never 0 (which means no trace runs).
fn marker() -> Result<u64> {
    let mut m = 0u64;
    while m == 0 {
        let mut b = [0u8; 8];
        // SAFETY: writes at most 8 bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 8 {
            return Err(std::io::Error::last_os_error()).context("drawing the trace's marker");
        }
        m = u64::from_ne_bytes(b);
    }
    Ok(m)
}

/// The running trace's marker in `TRACE_ARMED`: the programs trust a packet's marker only
/// while it is there; cleared on drop.
struct Armed(Array<MapData, u64>);

impl Armed {
    fn arm(pins: &PinDir, marker: u64) -> Result<Self> {
        let mut map: Array<MapData, u64> = pins
            .open_map(TRACE_ARMED)
            .context("this dataplane predates trustworthy trace markers: run `xdpgate upgrade`")?
            .try_into()?;
        map.set(0, marker, 0)?;
        Ok(Self(map))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = self.0.set(0, 0, 0);
    }
}

/// Runs the frame through program `prog_id` with the trace `marker`; the verdict.
fn test_run(prog_id: u32, hook: Hook, ifindex: u32, frame: &[u8], marker: u64) -> Result<u32> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = prog_id;
    // The kernel opens a program by id for CAP_SYS_ADMIN alone (CAP_BPF is not enough).
    let fd = bpf(
        bpf_cmd::BPF_PROG_GET_FD_BY_ID,
        &mut attr,
        "opening the attached entry program by its id (BPF_PROG_GET_FD_BY_ID needs \
         CAP_SYS_ADMIN)",
    )?;
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let (data, ctx): (Vec<u8>, Vec<u32>) = match hook {
        // The marker as XDP metadata ahead of the frame; xdp_md: data, data_end, data_meta,
        // ingress_ifindex, rx_queue_index, egress_ifindex.
        Hook::Xdp => {
            let data = [&marker.to_ne_bytes()[..], frame].concat();
            (data.clone(), vec![8, data.len() as u32, 0, ifindex, 0, 0])
        }
        // __sk_buff: ifindex at word 10, cb[0..2] at words 12 and 13.
        Hook::Tc => {
            let mut skb = vec![0u32; 48];
            skb[10] = ifindex;
            skb[12] = marker as u32;
            skb[13] = (marker >> 32) as u32;
            (frame.to_vec(), skb)
        }
    };
    let mut out = vec![0u8; data.len() + 256];
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.test.prog_fd = fd.as_raw_fd() as u32;
    attr.test.data_in = data.as_ptr() as u64;
    attr.test.data_size_in = data.len() as u32;
    attr.test.data_out = out.as_mut_ptr() as u64;
    attr.test.data_size_out = out.len() as u32;
    attr.test.ctx_in = ctx.as_ptr() as u64;
    attr.test.ctx_size_in = (ctx.len() * 4) as u32;
    attr.test.repeat = 1;
    bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr, "BPF_PROG_TEST_RUN")?;
    // SAFETY: the kernel filled the test member it was given.
    Ok(unsafe { attr.test.retval })
}

fn mac(ifname: &str) -> Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .with_context(|| format!("reading the MAC address of {ifname}"))?;
    let bytes: Vec<u8> =
        text.trim().split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    bytes.try_into().map_err(|_| anyhow!("{ifname} has no Ethernet address"))
}

/// Runs the trace and reads what the stages recorded.
pub fn run(pins: &PinDir, args: &TraceArgs) -> Result<Report> {
    let link = link_info(pins, &args.iface)
        .with_context(|| format!("{} is not attached to xdpgate", args.iface))?;
    let ifindex = ifindex(&args.iface)?;
    let frame = frame(args, mac(&args.iface).unwrap_or([0; 6]))?;
    let mut map: PerCpuArray<MapData, TraceRecord> = pins
        .open_map(TRACE)
        .context("this dataplane cannot trace: run `xdpgate upgrade`")?
        .try_into()?;
    // From clearing the record to reading it: another trace would clear it in between.
    let _lock = ToolLock::acquire(pins, Tool::Trace, TRACE_WAIT)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
    map.set(0, PerCpuValues::try_from(vec![TraceRecord::default(); cpus])?, 0)?;
    let marker = marker()?;
    let armed = Armed::arm(pins, marker)?;
    test_run(link.prog_id, link.hook, ifindex, &frame, marker)?;
    drop(armed);
    let rec = map
        .get(&0, 0)?
        .iter()
        .copied()
        .find(|r| r.stages != 0)
        .ok_or_else(|| anyhow!("the programs recorded nothing: a build without tracing?"))?;
    let names = Names::read(pins).ok();
    let mut report = report(args, link.hook, &rec, names.as_ref(), pins);
    if forwarded_untraced(&rec, report.verdict) {
        act_forwarding(pins, args, ifindex, &rec, &mut report);
    }
    // The dataplane sends a load balancer's packet on either way; whether its answers can
    // come back is the routes' to say.
    if rec.nat == NAT_DST && rec.lb == LB_SELECTED && report.verdict != "drop" {
        let backend = flows::addr(&rec.nat_addr, if args.src.is_ipv6() { 6 } else { 4 });
        let to_backend = fib::lookup(&fib::Query {
            src: args.src,
            dst: backend,
            proto: 0,
            sport: 0,
            dport: 0,
            ifindex,
        })?;
        if let Some(egress) = to_backend.ifindex
            && let Some(why) = nexthop::reply_bypass(egress, args.src, backend)?
        {
            report.stages.push(Stage { stage: "reply", decision: why });
        }
    }
    Ok(report)
}

/// Whether the packet is one of an existing translated flow, which the act stage would
/// rewrite and forward, but which the trace stopped before it (a trace leaves the entry
/// alone): the record's verdict is not the act stage's.
fn forwarded_untraced(r: &TraceRecord, verdict: &str) -> bool {
    let hit = matches!(r.lookup, LOOKUP_ESTABLISHED | LOOKUP_EMBRYONIC);
    hit && r.stages & STAGE_ACT == 0 && r.nat != NAT_NONE && verdict != "drop"
}

/// Says how the act stage would forward the packet of an existing translated flow `r`,
/// arriving by `ifindex`: as `next-hop` does, by the FIB's answer for the packet as
/// rewritten; where that cannot be told, that the verdict is unknown.
fn act_forwarding(
    pins: &PinDir,
    args: &TraceArgs,
    ifindex: u32,
    r: &TraceRecord,
    report: &mut Report,
) {
    let (verdict, decision) = match nexthop_of(pins, args, ifindex, r) {
        Ok(hop) => {
            let verdict = match hop.forwarding {
                Forwarding::Redirect => "redirect",
                // A floating-IP or encapsulated packet it cannot send itself.
                Forwarding::Dropped => "drop",
                // Whatever the FIB says otherwise, the dataplane leaves the packet to the
                // stack (which may then drop it: the reason says why).
                _ => "pass",
            };
            let how = "as the act stage would, by the FIB's answer now: a trace does not run \
                       it for an existing flow's packet";
            (verdict, format!("{} ({how})", hop.reason))
        }
        Err(e) => (
            "unknown",
            format!(
                "not traced: the act stage forwards an existing flow's packet, and how could \
                 not be told ({e:#}); `xdpgate next-hop` says where its packets go"
            ),
        ),
    };
    report.verdict = verdict;
    report.stages.retain(|s| s.stage != "forward");
    report.stages.push(Stage { stage: "forward", decision });
}

/// The act stage's forwarding of `r`'s packet, rewritten by the flow's translation.
fn nexthop_of(
    pins: &PinDir,
    args: &TraceArgs,
    ifindex: u32,
    r: &TraceRecord,
) -> Result<nexthop::NextHop> {
    let family = if args.src.is_ipv6() { 6 } else { 4 };
    let proto = match args.protocol {
        Protocol::Number(n) => n,
        Protocol::AnyIcmp => xdpgate_common::icmp_proto(family),
    };
    let ports = has_ports(args);
    let packet = nexthop::Flow {
        protocol: (family, proto),
        src: args.src,
        dst: args.dst,
        src_port: ports.then_some(args.src_port),
        dst_port: args.dst_port.filter(|_| ports),
    };
    let to = flows::addr(&r.nat_addr, family);
    let port = Some(r.nat_port).filter(|_| ports);
    // Where the act stage sends it: the rewritten destination, or source; a floating IP's
    // and an encapsulated packet go to the backend with their destination kept.
    let looked_up = match r.nat {
        NAT_DST => nexthop::Flow { dst: to, dst_port: port, ..packet },
        NAT_SRC => nexthop::Flow { src: to, src_port: port, ..packet },
        NAT_NEXT_HOP => nexthop::Flow { dst: to, ..packet },
        NAT_ENCAP => nexthop::encapsulated(pins, &nexthop::Flow { dst: to, ..packet })
            .map_err(|why| anyhow!(why))?,
        other => bail!("a rewrite the trace does not know ({other})"),
    };
    nexthop::act_forwarding(pins, ifindex, looked_up)
}

fn report(
    args: &TraceArgs,
    hook: Hook,
    r: &TraceRecord,
    names: Option<&Names>,
    pins: &PinDir,
) -> Report {
    let v6 = args.src.is_ipv6();
    let mut stages = Vec::new();
    let mut add = |stage: &'static str, decision: String| stages.push(Stage { stage, decision });
    let hit = matches!(r.lookup, LOOKUP_ESTABLISHED | LOOKUP_EMBRYONIC);
    let current = apply::active(pins).map(|(_, c)| c.generation).unwrap_or(0);
    // A flow judged again holds the new verdict's rules, numbered as the running policy
    // numbers them (`r.generation` stays the entry's, for the lookup's line).
    let judged_again = hit && r.stages & STAGE_NEW_FLOW != 0;
    let numbered = if judged_again { current } else { r.generation };
    let rules = names.map(|n| n.rules(r.rules, numbered)).unwrap_or_default();
    let rule_text = |rules: &SideRules| {
        let side = |name: &str, r: &Option<xdpgate_dataplane::flows::RuleName>| {
            r.as_ref().map(|r| format!("{name} {}/{} ({:?})", r.nsg, r.rule, r.layer))
        };
        let both: Vec<String> =
            [side("outbound", &rules.outbound), side("inbound", &rules.inbound)]
                .into_iter()
                .flatten()
                .collect();
        if both.is_empty() { "no rule named".to_owned() } else { both.join(", ") }
    };
    // A reply direction undoes its flow's rewrite: a load balancer's reply gets the
    // frontend back as its source, a NAT gateway's reply the private host as its destination.
    let reply = r.flow_reply != 0;
    let nat_text = |nat: u8, a: [u32; 4], port: u16| {
        let a = flows::addr(&a, if v6 { 6 } else { 4 });
        match (nat, reply) {
            (NAT_DST, false) => format!("destination to {a}:{port} (load balancer)"),
            (NAT_SRC, true) => format!("source back to {a}:{port} (load balancer's reply)"),
            (NAT_NEXT_HOP, _) => format!("to backend {a} unchanged (floating IP / DSR)"),
            (NAT_ENCAP, _) => format!("encapsulated to backend {a} (IP-in-IP / DSR)"),
            (NAT_SRC, false) => format!("source to {a}:{port} (NAT gateway)"),
            (NAT_DST, true) => format!("destination back to {a}:{port} (NAT gateway's reply)"),
            _ => "none".to_owned(),
        }
    };
    if r.stages & STAGE_PARSE != 0 {
        let dir = if u32::from(r.dir) == DIR_INBOUND { "inbound" } else { "outbound" };
        add(
            "parse",
            format!(
                "IPv{} {}, {dir} by the interface's role",
                if v6 { 6 } else { 4 },
                proto_name(args)
            ),
        );
    } else {
        add("parse", "not judged (no policy applied, or not a packet the pipeline parses)".into());
    }
    match r.lookup {
        LOOKUP_MISS => add("lookup", "miss: no flow, a new flow".into()),
        LOOKUP_ESTABLISHED | LOOKUP_EMBRYONIC => {
            // Named as `flows` names it.
            let state = match (r.lookup, r.assured) {
                (LOOKUP_ESTABLISHED, _) => FlowState::Established,
                (_, 0) => FlowState::Embryonic,
                _ => FlowState::Assured,
            }
            .name();
            let reply = if reply { ", reply direction" } else { "" };
            let rewrite = nat_text(r.nat, r.nat_addr, r.nat_port);
            // Judged again, the record holds the rules of the new verdict (the `nsg` stage).
            let line = if judged_again {
                format!(
                    "hit: {state} flow{reply}, decided under an older policy (generation {}): \
                     classified again; rewrite: {rewrite}",
                    r.generation
                )
            } else {
                let stale = if current != 0 && current != r.generation {
                    " (decided under an older policy, kept: reevaluate_flows is off)"
                } else {
                    ""
                };
                format!(
                    "hit: {state} flow{reply}{stale}; rules: {}; rewrite: {rewrite}",
                    rule_text(&rules)
                )
            };
            add("lookup", line);
        }
        _ => {}
    }
    // A flow judged again keeps its backend: no load balancer's choice to show. A frontend
    // that chose no backend made no flow (no new-flow stage), yet says so.
    if r.stages & STAGE_NEW_FLOW != 0 && !hit || r.lb != LB_NOT_FRONTEND {
        match r.lb {
            LB_SELECTED => {
                let backend = names.and_then(|n| n.backend(r.backend));
                let service = names.and_then(|n| n.service(r.service));
                add(
                    "lb",
                    format!(
                        "{}: backend {}",
                        service
                            .map(|s| format!("{}/{}", s.lb, s.rule))
                            .unwrap_or_else(|| format!("service {}", r.service)),
                        backend.map(|b| b.to_string()).unwrap_or_else(|| format!("#{}", r.backend))
                    ),
                );
            }
            LB_NO_BACKEND => add("lb", "frontend without a backend for new flows".into()),
            LB_NO_RULE => add(
                "lb",
                "frontend address, but no rule serves this port or protocol (routed on, \
                 it is dropped; to this host, its stack's)"
                    .into(),
            ),
            _ => add("lb", "not a frontend".into()),
        }
    }
    if r.stages & STAGE_NEW_FLOW != 0 {
        let nsg = match r.nsg {
            NSG_ALLOWED if rules.outbound.is_none() && rules.inbound.is_none() => {
                "allowed: no NSG applies".to_owned()
            }
            NSG_ALLOWED => format!("allowed by {}", rule_text(&rules)),
            NSG_DENIED => format!("denied by {}", rule_text(&rules)),
            _ => "not asked".to_owned(),
        };
        add("nsg", nsg);
    }
    if r.stages & STAGE_SNAT != 0 {
        add(
            "snat",
            format!("NAT gateway #{}: a port would be claimed (not for a trace)", r.snat_gateway),
        );
    }
    let verdict = VERDICT_NAMES.get(usize::from(r.verdict)).copied().unwrap_or("aborted");
    // The act stage rewrote the packet; a new flow (or one judged again) the policy stage
    // dropped was never rewritten.
    let rewritten = r.stages & STAGE_NEW_FLOW != 0 && r.nat != NAT_NONE && verdict != "drop";
    if r.stages & STAGE_ACT != 0 || rewritten {
        add("rewrite", nat_text(r.nat, r.nat_addr, r.nat_port));
    }
    if r.stages & STAGE_END != 0 {
        add(
            "forward",
            match verdict {
                "redirect" => "sent out by the dataplane (by the FIB's next hop)".into(),
                "pass" => "to the kernel's stack (it routes or delivers)".into(),
                "drop" => "dropped".into(),
                v => v.to_owned(),
            },
        );
    }
    let reason = (verdict == "drop")
        .then(|| DROP_REASON_NAMES.get(usize::from(r.reason)).copied())
        .flatten();
    Report {
        interface: args.iface.clone(),
        hook: hook.name(),
        packet: PacketDesc {
            src: args.src,
            dst: args.dst,
            src_port: has_ports(args).then_some(args.src_port),
            dst_port: has_ports(args).then_some(args.dst_port).flatten(),
            protocol: proto_name(args).to_owned(),
            tcp_flags: (args.protocol == Protocol::Number(6)).then(|| tcp_flags(args)),
        },
        stages,
        verdict,
        reason,
        rules,
        generation: r.generation,
        state_changed: false,
    }
}

fn tcp_flags(args: &TraceArgs) -> String {
    args.tcp_flags.as_deref().unwrap_or("S").to_ascii_uppercase()
}

fn has_ports(args: &TraceArgs) -> bool {
    matches!(args.protocol, Protocol::Number(p) if flows::has_ports(p))
}

fn proto_name(args: &TraceArgs) -> &'static str {
    match args.protocol {
        Protocol::Number(6) => "tcp",
        Protocol::Number(17) => "udp",
        _ if args.src.is_ipv6() => "icmpv6",
        _ => "icmp",
    }
}
