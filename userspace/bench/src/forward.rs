//! Established load-balanced and NATed flows with real forwarding, beside an NSG-only flow.
//!
//! The other sections run where forwarding is off, so `bpf_fib_lookup` gives up at once and
//! nothing is redirected. Here the test runs happen in a network namespace of their own
//! with forwarding on: an external interface (`ext0`, facing the clients and remotes) and an
//! internal one (`int0`, facing the backends and private hosts), both registered as
//! `xdpgate attach` does (a counter slot and role in `IFACES`, an entry in the `EGRESS`
//! devmap), routes to both sides and a permanent neighbour for every address, and each test
//! packet arriving on the interface it would (the `xdp_md` context's ingress ifindex). A
//! rewritten packet then leaves by `XDP_REDIRECT` with its MAC addresses rewritten and its
//! TTL decremented, every one checked. An NSG-only flow needs no rewrite: XDP passes it and
//! the kernel forwards it, which is the comparison the targets name.
//!
//! What is not measured: in `BPF_PROG_TEST_RUN` the verdict XDP_REDIRECT is returned, the
//! devmap enqueue and the transmit (`xdp_do_redirect`, the veth's `ndo_xdp_xmit`) are not
//! run.

use std::{fmt::Write as _, fs::File, net::Ipv4Addr, os::fd::AsRawFd, process::Command};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use xdpgate_common::iface::Role;

use crate::{
    common::{
        Bench, Config, Family, FlowState, FlowTables, Machine, Ratio, TCP_ACK, TCP_SYN,
        TCP_SYN_ACK, XDP_PASS, XDP_REDIRECT, addr4, checksums_ok, endpoints4, expect_verdict,
        median, pin_to_cpu, run_each_on, tcp_frame, thousands,
    },
    lb, nat,
};

/// Backends of the load balancer (the LB section's middle count).
const BACKENDS: usize = 16;
const MAC_EXT: [u8; 6] = [0x02, 0, 0, 0, 0xe0, 0];
const MAC_INT: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0];
/// The neighbour MAC of every address on the internal side, and on the external side.
const MAC_INSIDE: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 1];
const MAC_OUTSIDE: [u8; 6] = [0x02, 0, 0, 0, 0xc0, 1];
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const NSG_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Lb,
    Nat,
    NsgOnly,
    LbForwardingOff,
    NatForwardingOff,
}

impl Case {
    pub const ALL: [Case; 5] =
        [Case::Lb, Case::Nat, Case::NsgOnly, Case::LbForwardingOff, Case::NatForwardingOff];

    pub fn label(self) -> &'static str {
        match self {
            Case::Lb => "LB established (ACK: flow hit, DNAT, FIB, MACs, redirect)",
            Case::Nat => "NAT established (ACK: flow hit, SNAT, FIB, MACs, redirect)",
            Case::NsgOnly => "NSG-only established (ACK: flow hit, XDP_PASS to the kernel)",
            Case::LbForwardingOff => {
                "LB established, forwarding off (flow hit, DNAT, FIB gives up, XDP_PASS)"
            }
            Case::NatForwardingOff => {
                "NAT established, forwarding off (flow hit, SNAT, FIB gives up, XDP_PASS)"
            }
        }
    }
}

#[derive(Serialize)]
pub struct Row {
    pub case: Case,
    #[serde(flatten)]
    pub figures: Ratio,
    /// Median of the per-run ns over the no-op.
    pub ns_over_noop: f64,
    /// ns over the no-op ÷ the NSG-only flow's ns over the no-op.
    pub over_nsg: f64,
    pub packets_per_run: usize,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    /// /proc/loadavg when this section finished (the machine's is from the start).
    pub load_after: String,
    pub quick: bool,
    pub runs: usize,
    pub backends: usize,
    pub open_flows: usize,
    pub rows: Vec<Row>,
}

/// A network namespace of this process, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Result<Self> {
        let name = format!("xdpgate-bench-fwd-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        Ok(Self(name))
    }

    /// Runs `ip -n <ns> -batch -` with these lines.
    fn batch(&self, lines: &[String]) -> Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", &self.0, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running ip")?;
        child.stdin.take().expect("piped").write_all(lines.join("\n").as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("ip -n {} -batch failed: {status}", self.0);
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The gateway's two sides, routes and neighbours; forwarding on.
fn topology(ns: &Netns) -> Result<()> {
    let mut lines = vec![
        format!("link add ext0 address {} type veth peer name ext1", mac(MAC_EXT)),
        format!("link add int0 address {} type veth peer name int1", mac(MAC_INT)),
    ];
    for dev in ["lo", "ext0", "ext1", "int0", "int1"] {
        lines.push(format!("link set {dev} up"));
    }
    lines.push("route add 198.51.100.0/24 dev int0".into());
    lines.push("route add 203.0.113.0/24 dev ext0".into());
    let inside = (0..BACKENDS).map(lb::backend).chain([nat::PRIVATE]);
    for a in inside {
        lines.push(format!("neigh replace {a} lladdr {} dev int0 nud permanent", mac(MAC_INSIDE)));
    }
    for a in [CLIENT, NSG_CLIENT, REMOTE] {
        lines.push(format!("neigh replace {a} lladdr {} dev ext0 nud permanent", mac(MAC_OUTSIDE)));
    }
    ns.batch(&lines)?;
    ip(&["netns", "exec", &ns.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
}

/// Moves this thread into `ns` (the bpffs mount stays the host's).
fn enter(ns: &Netns) -> Result<()> {
    let f = File::open(format!("/run/netns/{}", ns.0)).context("opening the namespace")?;
    // SAFETY: setns on an open namespace descriptor; affects this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns IPv4 forwarding of this thread's namespace on or off (the FIB lookup of an XDP
/// program gives up at once when the arrival interface does not forward).
fn ip_forward(on: bool) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", if on { "1" } else { "0" })
        .context("writing net.ipv4.ip_forward")
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name}"),
        i => Ok(i),
    }
}

/// A forwarded frame: redirected, MACs of the egress side and the neighbour, TTL 63,
/// checksums right. Returns its (source, destination, source port, destination port).
fn check_forwarded(
    what: &str,
    v: u32,
    out: &[u8],
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
) -> Result<(Ipv4Addr, Ipv4Addr, u16, u16)> {
    expect_verdict(what, v, XDP_REDIRECT)?;
    if out[..6] != dst_mac || out[6..12] != src_mac {
        bail!("{what}: MACs not rewritten for the next hop");
    }
    if out[14 + 8] != 63 {
        bail!("{what}: TTL {} after forwarding, want 63", out[14 + 8]);
    }
    if !checksums_ok(out) {
        bail!("{what}: checksums wrong after the rewrite");
    }
    Ok(endpoints4(out))
}

const TO_INSIDE: ([u8; 6], [u8; 6]) = (MAC_INT, MAC_INSIDE);
const TO_OUTSIDE: ([u8; 6], [u8; 6]) = (MAC_EXT, MAC_OUTSIDE);

/// One case: its dataplane, the ACKs of its established flows and their arrival interface.
struct Flows {
    acks: Vec<Vec<u8>>,
    ifindex: u32,
}

/// Load balancer: flows established by their handshakes, every segment forwarded.
fn lb_flows(cfg: &Config, bench: &Bench, ext: u32, int: u32) -> Result<Flows> {
    let gate = bench.gate()?;
    let (c, fe) = (addr4(CLIENT), addr4(lb::FRONTEND));
    let open = usize::from(cfg.open_flows);
    let syns: Vec<Vec<u8>> = (0..cfg.open_flows)
        .map(|j| tcp_frame(Family::IPv4, c, fe, 30_000 + j, lb::FRONTEND_PORT, TCP_SYN))
        .collect();
    let mut picked = Vec::new();
    run_each_on(gate, ext, &syns, |_, v, out| {
        let (_, d, _, dp) = check_forwarded("LB SYN", v, out, TO_INSIDE)?;
        if dp != lb::BACKEND_PORT || !(0..BACKENDS).any(|i| lb::backend(i) == d) {
            bail!("LB SYN not translated to a backend ({d}:{dp})");
        }
        picked.push(d);
        Ok(())
    })?;
    let syn_acks: Vec<Vec<u8>> = picked
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let sport = lb::BACKEND_PORT;
            tcp_frame(Family::IPv4, addr4(*b), c, sport, 30_000 + j as u16, TCP_SYN_ACK)
        })
        .collect();
    run_each_on(gate, int, &syn_acks, |_, v, out| {
        let (s, _, sp, _) = check_forwarded("LB SYN-ACK", v, out, TO_OUTSIDE)?;
        if (s, sp) != (lb::FRONTEND, lb::FRONTEND_PORT) {
            bail!("LB SYN-ACK not translated back to the frontend ({s}:{sp})");
        }
        Ok(())
    })?;
    let acks: Vec<Vec<u8>> = (0..usize::from(cfg.distinct))
        .map(|i| {
            let sport = 30_000 + (i % open) as u16;
            tcp_frame(Family::IPv4, c, fe, sport, lb::FRONTEND_PORT, TCP_ACK)
        })
        .collect();
    run_each_on(gate, ext, &acks[..open], |j, v, out| {
        if check_forwarded("LB ACK", v, out, TO_INSIDE)?.1 != picked[j] {
            bail!("LB ACK went to another backend than its SYN");
        }
        Ok(())
    })?;
    let tables = FlowTables::open(bench)?;
    for (ack, syn_ack) in acks.iter().zip(&syn_acks) {
        tables.expect("LB flow", FlowState::Established, &[ack, syn_ack])?;
    }
    Ok(Flows { acks, ifindex: ext })
}

/// NSG only: flows from a client straight to a backend's address; nothing rewritten, every
/// segment passed to the kernel.
fn nsg_flows(cfg: &Config, bench: &Bench, ext: u32, int: u32) -> Result<Flows> {
    let gate = bench.gate()?;
    let (c, b) = (addr4(NSG_CLIENT), addr4(lb::backend(0)));
    let open = usize::from(cfg.open_flows);
    let pass = |what: &'static str| move |_, v, _: &[u8]| expect_verdict(what, v, XDP_PASS);
    let syns: Vec<Vec<u8>> = (0..cfg.open_flows)
        .map(|j| tcp_frame(Family::IPv4, c, b, 30_000 + j, lb::BACKEND_PORT, TCP_SYN))
        .collect();
    run_each_on(gate, ext, &syns, pass("NSG SYN"))?;
    let syn_acks: Vec<Vec<u8>> = (0..cfg.open_flows)
        .map(|j| tcp_frame(Family::IPv4, b, c, lb::BACKEND_PORT, 30_000 + j, TCP_SYN_ACK))
        .collect();
    run_each_on(gate, int, &syn_acks, pass("NSG SYN-ACK"))?;
    let acks: Vec<Vec<u8>> = (0..usize::from(cfg.distinct))
        .map(|i| {
            let sport = 30_000 + (i % open) as u16;
            tcp_frame(Family::IPv4, c, b, sport, lb::BACKEND_PORT, TCP_ACK)
        })
        .collect();
    run_each_on(gate, ext, &acks[..open], pass("NSG ACK"))?;
    let tables = FlowTables::open(bench)?;
    for (ack, syn_ack) in acks.iter().zip(&syn_acks) {
        tables.expect("NSG flow", FlowState::Established, &[ack, syn_ack])?;
    }
    Ok(Flows { acks, ifindex: ext })
}

/// NAT gateway: a private host's flows to a remote, established by their handshakes.
fn nat_flows(cfg: &Config, bench: &Bench, ext: u32, int: u32) -> Result<Flows> {
    let gate = bench.gate()?;
    let (p, r) = (addr4(nat::PRIVATE), addr4(REMOTE));
    let open = usize::from(cfg.open_flows);
    let syns: Vec<Vec<u8>> = (0..cfg.open_flows)
        .map(|j| tcp_frame(Family::IPv4, p, r, 30_000 + j, nat::REMOTE_PORT, TCP_SYN))
        .collect();
    let mut ports = Vec::new();
    run_each_on(gate, int, &syns, |_, v, out| {
        let (s, _, sp, _) = check_forwarded("NAT SYN", v, out, TO_OUTSIDE)?;
        if s != nat::PUBLIC {
            bail!("NAT SYN not translated ({s}:{sp})");
        }
        ports.push(sp);
        Ok(())
    })?;
    let syn_acks: Vec<Vec<u8>> = ports
        .iter()
        .map(|&port| {
            tcp_frame(Family::IPv4, r, addr4(nat::PUBLIC), nat::REMOTE_PORT, port, TCP_SYN_ACK)
        })
        .collect();
    run_each_on(gate, ext, &syn_acks, |j, v, out| {
        let (_, d, _, dp) = check_forwarded("NAT SYN-ACK", v, out, TO_INSIDE)?;
        if (d, dp) != (nat::PRIVATE, 30_000 + j as u16) {
            bail!("NAT SYN-ACK not translated back ({d}:{dp})");
        }
        Ok(())
    })?;
    let acks: Vec<Vec<u8>> = (0..usize::from(cfg.distinct))
        .map(|i| {
            let sport = 30_000 + (i % open) as u16;
            tcp_frame(Family::IPv4, p, r, sport, nat::REMOTE_PORT, TCP_ACK)
        })
        .collect();
    run_each_on(gate, int, &acks[..open], |j, v, out| {
        if check_forwarded("NAT ACK", v, out, TO_OUTSIDE)?.2 != ports[j] {
            bail!("NAT ACK left from another public port than its SYN");
        }
        Ok(())
    })?;
    let tables = FlowTables::open(bench)?;
    for (ack, syn_ack) in acks.iter().zip(&syn_acks) {
        tables.expect("NAT flow", FlowState::Established, &[ack, syn_ack])?;
    }
    Ok(Flows { acks, ifindex: int })
}

/// Checks one measured packet of `case` as it leaves.
fn check(case: Case, v: u32, out: &[u8]) -> Result<()> {
    match case {
        Case::Lb => {
            let (_, d, _, dp) = check_forwarded("LB established", v, out, TO_INSIDE)?;
            if dp != lb::BACKEND_PORT || !(0..BACKENDS).any(|i| lb::backend(i) == d) {
                bail!("LB established flow not translated to a backend");
            }
        }
        Case::Nat => {
            if check_forwarded("NAT established", v, out, TO_OUTSIDE)?.0 != nat::PUBLIC {
                bail!("NAT established flow not translated");
            }
        }
        Case::NsgOnly => expect_verdict("NSG established", v, XDP_PASS)?,
        Case::LbForwardingOff | Case::NatForwardingOff => {
            expect_verdict("established, forwarding off", v, XDP_PASS)?;
            let (s, d, _, dp) = endpoints4(out);
            let translated = if case == Case::LbForwardingOff {
                dp == lb::BACKEND_PORT && (0..BACKENDS).any(|i| lb::backend(i) == d)
            } else {
                s == nat::PUBLIC
            };
            if !translated || !checksums_ok(out) || out[14 + 8] != 64 {
                bail!("{case:?}: not translated, or forwarded");
            }
        }
    }
    Ok(())
}

fn measure_in_ns(cfg: &Config, cpu: usize, ns: &Netns) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    pin_to_cpu(cpu);
    enter(ns)?;
    let (ext, int) = (ifindex("ext0")?, ifindex("int0")?);
    let register = |b: &Bench| -> Result<()> {
        b.register(ext, 2, Role::External)?;
        b.register(int, 3, Role::Internal)
    };
    // The load balancer's policy (with its NSG) serves the LB and NSG-only flows.
    let lb_bench = Bench::new()?;
    register(&lb_bench)?;
    lb_bench.apply_all(&lb::policy_yaml(BACKENDS))?;
    let nat_bench = Bench::new()?;
    register(&nat_bench)?;
    nat_bench.apply_all(&nat::policy_yaml())?;
    let (lb, nat) = (lb_flows(cfg, &lb_bench, ext, int)?, nat_flows(cfg, &nat_bench, ext, int)?);
    let nsg = nsg_flows(cfg, &lb_bench, ext, int)?;
    // The same flows, with forwarding on and then off (each row's order in `Case::ALL`).
    let cases = [
        (&lb_bench, &lb),
        (&nat_bench, &nat),
        (&lb_bench, &nsg),
        (&lb_bench, &lb),
        (&nat_bench, &nat),
    ];
    let mut figs = vec![(Vec::new(), Vec::new()); cases.len()];
    for r in 0..cfg.runs {
        eprintln!("  run {}/{} ...", r + 1, cfg.runs);
        for ((case, (bench, flows)), fig) in Case::ALL.into_iter().zip(cases).zip(&mut figs) {
            let off = matches!(case, Case::LbForwardingOff | Case::NatForwardingOff);
            ip_forward(!off)?;
            // As the agent does when it hears of the change: cached next hops are stale.
            xdpgate_dataplane::routes::invalidate(&bench.pins)?;
            let (gate, noop) = (bench.gate()?, bench.noop()?);
            fig.0.push(run_each_on(gate, flows.ifindex, &flows.acks, |_, v, out| {
                check(case, v, out)
            })?);
            fig.1.push(run_each_on(noop, flows.ifindex, &flows.acks, |_, _, _| Ok(()))?);
        }
        ip_forward(true)?;
    }
    Ok(figs)
}

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    let ns = Netns::new()?;
    topology(&ns)?;
    let cpu = crate::common::current_cpu();
    // A thread of its own enters the namespace; the rest of the bench stays in the host's.
    let figs = std::thread::scope(|s| {
        s.spawn(|| measure_in_ns(cfg, cpu, &ns)).join().map_err(|_| anyhow!("thread panicked"))
    })??;
    let over = |(x, noop): &(Vec<f64>, Vec<f64>)| {
        median(&x.iter().zip(noop).map(|(a, b)| a - b).collect::<Vec<_>>())
    };
    let nsg_over = over(&figs[2]);
    let rows = Case::ALL
        .into_iter()
        .zip(figs)
        .map(|(case, f)| {
            let ns_over_noop = over(&f);
            Row {
                case,
                ns_over_noop,
                over_nsg: ns_over_noop / nsg_over,
                figures: Ratio::new(f.0, f.1),
                packets_per_run: usize::from(cfg.distinct),
            }
        })
        .collect();
    Ok(Report {
        machine: machine.clone(),
        load_after: crate::common::load_average(),
        quick: cfg.quick,
        runs: cfg.runs,
        backends: BACKENDS,
        open_flows: usize::from(cfg.open_flows),
        rows,
    })
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Established flows with forwarding on (BPF_PROG_TEST_RUN)\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(
        md,
        "| case | ns/packet | no-op ns/packet | ratio (xdpgate / no-op) | per-run range | ns over no-op | ÷ NSG-only (ns over no-op) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|---:|---:|");
    for row in &r.rows {
        let f = &row.figures;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2} | {:.2}-{:.2} | {:.0} | {:.2} |",
            row.case.label(),
            f.ns,
            f.noop_ns,
            f.ratio,
            f.ratio_range.0,
            f.ratio_range.1,
            row.ns_over_noop,
            row.over_nsg
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: a network namespace of its own with IPv4 forwarding on, two veth \
         interfaces registered as `xdpgate attach` registers them (slot and role in `IFACES`, \
         the `EGRESS` devmap): `ext0` (external: 203.0.113.0/24, the clients and the remote) \
         and `int0` (internal: 198.51.100.0/24, the backends and the private host), a route to \
         each side and a permanent neighbour for every address. Each packet arrives on its \
         interface (the ingress ifindex of the test run's `xdp_md` context). *LB*: the LB \
         section's policy with {backends} backends; *NAT*: the NAT section's gateway; \
         *NSG-only*: flows from a client straight to a backend's address under the LB \
         policy's NSG. {open} flows per case established by their handshakes (SYN, SYN-ACK, \
         ACK, every segment checked: rewritten segments redirected), then {dist} ACKs of \
         them per run, one packet per test run, and the no-op on the same packets with the \
         same context. Checked for every LB and NAT packet: verdict XDP_REDIRECT, source MAC \
         the egress interface's, destination MAC the neighbour's, TTL decremented, \
         translated, checksums right from scratch; NSG-only: XDP_PASS (an unrewritten flow \
         is left to the kernel, which forwards it). Not measured: XDP_REDIRECT is the \
         verdict only, `BPF_PROG_TEST_RUN` (without live frames) neither enqueues the frame \
         on the devmap nor transmits it. The last column is the row's ns over the no-op \
         divided by the NSG-only flow's.",
        backends = r.backends,
        open = thousands(r.open_flows as u64),
        dist = thousands(r.rows.first().map_or(0, |x| x.packets_per_run as u64)),
    );
    let _ = writeln!(md, "\nLoad average when this section finished: {}.", r.load_after);
    md
}
