//! Peers on the same traffic.
//!
//! (a) Packets per second through a real veth path: a generator namespace blasts pre-built
//! frames into a device under test (DUT) namespace, which filters and forwards them to a
//! sink namespace. Filters compared: none, xdpgate (the NSG benchmark's policies), nftables
//! (the same rules as a user would write them: a linear chain, and one verdict-map lookup)
//! and xdp-filter. BPF_PROG_TEST_RUN cannot run nftables, hence the real path.
//!
//! (b) xdp-filter's per-packet cost in BPF_PROG_TEST_RUN against the no-op, next to xdpgate
//! with a comparable (small) rule set.

use std::{
    collections::HashSet,
    ffi::CString,
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::loaded_programs;
use serde::Serialize;
use xdpgate_common::iface::Role;
use xdpgate_dataplane::{self as dataplane, Mode, PinDir, netns};
use xdpgate_pktgen::packet::PacketSocket;

use crate::{
    common::{
        ALLOWED_PORT, Bench, CLIENT_FIXED, Config, DENIED_PORT, ETH_LEN, Family, FlowState,
        FlowTables, Machine, Ratio, TCP_ACK, TCP_SYN, XDP_DROP, XDP_PASS, client, current_cpu,
        expect_verdict, handshake, median, pin_to_cpu, remove_dataplane, run, server, tcp_frame,
        thousands, unique_pin_dir,
    },
    nsg::{self, Nsg},
};

// ---------------------------------------------------------------------------------------
// Report

/// What runs on the DUT's ingress veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Candidate {
    None,
    Xdpgate,
    NftLinear,
    NftMap,
    XdpFilter,
}

impl Candidate {
    pub fn label(self) -> &'static str {
        match self {
            Candidate::None => "no filter (no-op XDP + forwarding)",
            Candidate::Xdpgate => "xdpgate",
            Candidate::NftLinear => "nftables, linear chain",
            Candidate::NftMap => "nftables, verdict map",
            Candidate::XdpFilter => "xdp-filter (allow-list: dst port 443)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// ACK segments of an allowed flow (established: xdpgate's by a handshake before),
    /// forwarded to the sink.
    Allowed,
    /// SYNs to a port no rule allows: only the default deny matches.
    Denied,
}

#[derive(Serialize)]
pub struct PathRow {
    pub filter: Candidate,
    /// User rules of the policy (0: no filter; xdp-filter: one port entry).
    pub rules: usize,
    pub traffic: Traffic,
    /// Median packets per second the figure counts: forwarded to the sink (allowed traffic,
    /// and everything with no filter), or taken in by the DUT and dropped (denied).
    pub pps: f64,
    /// Median of the per-run ratios to no filter on the same traffic in the same run.
    pub ratio_to_none: f64,
    pub runs_pps: Vec<f64>,
    /// Medians: what the generator's socket got accepted by its veth (the veth hands a frame
    /// back when the DUT's receive ring is full), what the DUT took in, what reached the
    /// sink.
    pub sent_pps: f64,
    pub taken_pps: f64,
    pub forwarded_pps: f64,
    /// Median CPU ns the DUT's receive thread (threaded NAPI of its ingress veth, where
    /// the XDP program, the stack's forwarding or nftables, and the sink's XDP drop run)
    /// spent per packet taken in, and the median of its per-run ratios to no filter's.
    pub dut_ns_per_packet: Option<f64>,
    pub dut_ns_ratio_to_none: Option<f64>,
}

#[derive(Serialize)]
pub struct PathReport {
    pub secs_per_figure: f64,
    pub runs: usize,
    pub generator_cpu: usize,
    /// The CPU the DUT's receive processing (threaded NAPI of its ingress veth) was pinned
    /// to, if it could be.
    pub dut_cpu: Option<usize>,
    pub rows: Vec<PathRow>,
    /// Filters or rule counts that could not be measured, and why.
    pub skipped: Vec<String>,
    /// nftables rules loaded per rule count (linear chain rules, map elements).
    pub nft_sizes: Vec<(usize, usize, usize)>,
    /// The generator's ceiling: packets per second the DUT takes in when its veth drops
    /// everything in XDP at once (median, and per run).
    pub ceiling_pps: f64,
    pub ceiling_runs: Vec<f64>,
    /// The DUT's NAPI thread CPU ns per packet then (its floor: receive and XDP drop).
    pub ceiling_dut_ns: Option<f64>,
}

#[derive(Serialize)]
pub struct TestRunRow {
    pub program: String,
    pub rules: String,
    pub packet: String,
    pub verdict: u32,
    #[serde(flatten)]
    pub figures: Ratio,
}

#[derive(Serialize)]
pub struct FilterReport {
    pub repeat: u32,
    pub runs: usize,
    pub rows: Vec<TestRunRow>,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub path: Result<PathReport, String>,
    pub xdp_filter: Result<FilterReport, String>,
}

pub fn measure(cfg: &Config, machine: &Machine, cpu: Option<usize>) -> Result<Report> {
    let pins = PinDir::new(unique_pin_dir("xdpgate-bench-peers"));
    pins.ensure()?;
    let xdp_filter = test_run_xdp_filter(cfg).map_err(|e| {
        eprintln!("  xdp-filter in BPF_PROG_TEST_RUN: not measured: {e:#}");
        format!("{e:#}")
    });
    let path = veth_path(cfg, &pins, cpu).map_err(|e| {
        eprintln!("  veth path: not measured: {e:#}");
        format!("{e:#}")
    });
    remove_dataplane(&pins);
    Ok(Report { machine: machine.clone(), quick: cfg.quick, path, xdp_filter })
}

// ---------------------------------------------------------------------------------------
// Commands, namespaces, raw bpf

pub(crate) fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command in namespace `ns` without a new mount namespace (`ip netns exec` would
/// remount /sys and hide bpffs, which libxdp and bpftool need).
pub(crate) fn nsenter(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net=/run/netns/{ns}");
    let mut full = vec![net.as_str(), cmd];
    full.extend_from_slice(args);
    sh("nsenter", &full)
}

/// Runs a command in `ns` through `ip netns exec` (its own /sys: for sysfs of the ns).
pub(crate) fn ip_exec(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, cmd];
    full.extend_from_slice(args);
    sh("ip", &full)
}

/// Runs `f` with this thread in network namespace `ns`, then returns it to its own.
pub(crate) fn with_netns<T>(ns: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
    netns::enter(ns)?;
    let result = f();
    // SAFETY: a valid netns fd; CLONE_NEWNET checks the kind.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Carrying on in the wrong namespace would measure nonsense.
        panic!("cannot return to the original network namespace");
    }
    result
}

fn ifindex(name: &str) -> Result<u32> {
    dataplane::ifindex(name)
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: attr is a zero-padded `union bpf_attr` of the size passed, whose pointers
    // outlive the call; the kernel may write results back into it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as i32) }
}

/// Loads a two-instruction XDP program returning XDP_DROP: the sink that discards what
/// reaches it (counted by its interface) without the stack.
fn load_drop_program() -> Result<OwnedFd> {
    // r0 = 1 (XDP_DROP); exit.
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = CString::new("GPL")?;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&6u32.to_ne_bytes()); // BPF_PROG_TYPE_XDP
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes()); // insn_cnt
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"xgb_sink");
    let fd = bpf(5, &mut attr).context("BPF_PROG_LOAD of the sink's drop program")?; // BPF_PROG_LOAD
    // SAFETY: the kernel just returned this new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches an XDP program to `ifindex` (of the calling thread's netns) with a bpf_link;
/// dropping the returned fd detaches it.
fn link_xdp(prog: BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&37u32.to_ne_bytes()); // BPF_XDP
    let fd = bpf(28, &mut attr).context("BPF_LINK_CREATE (XDP)")?; // BPF_LINK_CREATE
    // SAFETY: the kernel just returned this new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An open program by id (`BPF_PROG_GET_FD_BY_ID`).
fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(13, &mut attr).with_context(|| format!("opening program {id}"))?; // BPF_PROG_GET_FD_BY_ID
    // SAFETY: the kernel just returned this new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_PROG_TEST_RUN` on any XDP program fd (aya's `TestRun` wants a program it can name
/// the attach type of): `packet` `repeat` times; returns the verdict and ns per run.
fn run_fd(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(packet.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    bpf(10, &mut attr).context("BPF_PROG_TEST_RUN")?; // BPF_PROG_TEST_RUN
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
    Ok((retval, f64::from(duration)))
}

/// A name unique to this process and call, fit for namespaces and interfaces (15 chars).
pub(crate) fn unique(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let json = sh("ip", &["-j", "-n", ns, "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let text = v[0]["address"].as_str().ok_or_else(|| anyhow!("no MAC for {dev}"))?;
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// (rx packets, tx packets) of `dev` in namespace `ns`, from its /proc/net/dev.
fn counters(ns: &str, dev: &str) -> Result<(u64, u64)> {
    with_netns(ns, || {
        let text = fs::read_to_string("/proc/thread-self/net/dev")?;
        for line in text.lines() {
            let Some((name, rest)) = line.split_once(':') else { continue };
            if name.trim() != dev {
                continue;
            }
            let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if f.len() >= 10 {
                return Ok((f[1], f[9]));
            }
        }
        bail!("no counters for {dev} in {ns}")
    })
}

// ---------------------------------------------------------------------------------------
// (b) xdp-filter in BPF_PROG_TEST_RUN

/// Loads xdp-filter on a veth of a namespace of its own, with the allow rule it can
/// express (TCP/UDP destination port 443, everything else dropped), and removes it again.
struct XdpFilterGuard {
    ns: String,
    dev: String,
    /// libxdp's directory under bpffs did not exist before: removed again when empty.
    made_libxdp_dir: bool,
}

/// Where libxdp keeps its dispatchers' pins; it leaves the directory behind, empty.
pub const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl XdpFilterGuard {
    fn load(ns: &str, dev: &str) -> Result<Self> {
        if std::path::Path::new("/sys/fs/bpf/xdp-filter").exists() {
            bail!(
                "xdp-filter is in use on this machine (/sys/fs/bpf/xdp-filter exists): its \
                 state is global, so it is left alone"
            );
        }
        which("xdp-filter")?;
        let made_libxdp_dir = !std::path::Path::new(LIBXDP_DIR).exists();
        let guard = Self { ns: ns.into(), dev: dev.into(), made_libxdp_dir };
        nsenter(ns, "xdp-filter", &["load", "--policy", "deny", dev])?;
        nsenter(ns, "xdp-filter", &["port", &ALLOWED_PORT.to_string()])?;
        Ok(guard)
    }

    /// The id of the XDP program on the device.
    fn prog_id(&self) -> Result<u32> {
        let json = nsenter(&self.ns, "bpftool", &["-j", "net", "show", "dev", &self.dev])?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        v[0]["xdp"][0]["id"]
            .as_u64()
            .map(|id| id as u32)
            .ok_or_else(|| anyhow!("no XDP program on {} in bpftool's answer: {json}", self.dev))
    }
}

impl Drop for XdpFilterGuard {
    fn drop(&mut self) {
        let _ = nsenter(&self.ns, "xdp-filter", &["unload", &self.dev]);
        if self.made_libxdp_dir {
            // Only when empty: another libxdp user may have pinned something meanwhile.
            let _ = fs::remove_dir(LIBXDP_DIR);
        }
    }
}

pub(crate) fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} is not installed");
    }
    Ok(())
}

/// A namespace removed (with its interfaces) on drop.
pub(crate) struct Ns(pub(crate) String);

impl Ns {
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self(name);
        sh("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
        // No IPv6 autoconfiguration noise on the test links.
        ip_exec(&ns.0, "sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ip_exec(&ns.0, "sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

/// One row of the xdp-filter comparison: program, rules, packet, verdict, runs' ns and the
/// no-op's.
type Case = (String, String, &'static str, u32, Vec<f64>, Vec<f64>);

fn test_run_xdp_filter(cfg: &Config) -> Result<FilterReport> {
    eprintln!("  xdp-filter and xdpgate (few rules) in BPF_PROG_TEST_RUN ...");
    let ns = Ns::new("xgbf")?;
    sh("ip", &["-n", &ns.0, "link", "add", "xf0", "type", "veth", "peer", "name", "xf1"])?;
    sh("ip", &["-n", &ns.0, "link", "set", "xf0", "up"])?;
    sh("ip", &["-n", &ns.0, "link", "set", "xf1", "up"])?;
    let guard = XdpFilterGuard::load(&ns.0, "xf0")?;
    let id = guard.prog_id()?;
    let filter = prog_fd_by_id(id)?;
    let name = loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string));

    let fixed = client(Family::IPv4, CLIENT_FIXED);
    let dst = server(Family::IPv4);
    let allowed = tcp_frame(Family::IPv4, fixed, dst, 40_000, ALLOWED_PORT, TCP_ACK);
    let denied = tcp_frame(Family::IPv4, fixed, dst, 40_001, DENIED_PORT, TCP_SYN);

    // xdpgate with the smallest comparable policy (1 user rule) and the 10-rule policy,
    // its allowed flow established by a handshake.
    let mut benches = Vec::new();
    for rules in [1usize, 10] {
        let bench = Bench::new()?;
        bench.apply(&nsg::policy_yaml(Family::IPv4, rules))?;
        let ends = ((fixed, 40_000), (dst, ALLOWED_PORT));
        handshake(&bench, "xdpgate, allowed flow", Family::IPv4, ends.0, ends.1)?;
        benches.push((rules, bench));
    }
    expect_verdict("xdp-filter, allowed", run_fd(filter.as_fd(), &allowed, 1)?.0, XDP_PASS)?;
    expect_verdict("xdp-filter, denied", run_fd(filter.as_fd(), &denied, 1)?.0, XDP_DROP)?;

    // (label, rules, packet label, verdict, figures)
    let mut cases: Vec<Case> = Vec::new();
    let prog_label = format!("xdp-filter ({})", name.as_deref().unwrap_or("?"));
    let noop = benches[0].1.noop()?.fd()?.as_fd().try_clone_to_owned()?;
    for r in 0..cfg.runs {
        let _ = r;
        let mut k = 0;
        let mut push = |label: &str, rules: &str, what: &'static str, v: u32, ns: f64, nn: f64| {
            if cases.len() <= k {
                cases.push((label.into(), rules.into(), what, v, Vec::new(), Vec::new()));
            }
            cases[k].4.push(ns);
            cases[k].5.push(nn);
            k += 1;
        };
        for (pkt, what, want) in [
            (&allowed, "allowed (ACK to port 443)", XDP_PASS),
            (&denied, "denied (SYN to port 8443)", XDP_DROP),
        ] {
            let (v, ns) = run_fd(filter.as_fd(), pkt, cfg.repeat)?;
            expect_verdict(what, v, want)?;
            let nn = run_fd(noop.as_fd(), pkt, cfg.repeat)?.1;
            push(&prog_label, "dst port 443 (allow-list), policy deny", what, v, ns, nn);
        }
        for (rules, bench) in &benches {
            let gate = bench.gate()?;
            let noop = bench.noop()?;
            for (pkt, what, want) in [
                (&allowed, "allowed (ACK of an established flow)", XDP_PASS),
                (&denied, "denied (SYN to port 8443, full classification)", XDP_DROP),
            ] {
                let (v, ns) = run(gate, pkt, cfg.repeat)?;
                expect_verdict(what, v, want)?;
                let nn = run(noop, pkt, cfg.repeat)?.1;
                let rules =
                    format!("{rules} user rule{} + 3 defaults", if *rules == 1 { "" } else { "s" });
                push("xdpgate", &rules, what, v, ns, nn);
            }
        }
    }
    for (_, bench) in &benches {
        FlowTables::open(bench)?.expect(
            "xdpgate, allowed flow, after the runs",
            FlowState::Established,
            &[&allowed],
        )?;
    }
    drop(filter);
    drop(guard);
    Ok(FilterReport {
        repeat: cfg.repeat,
        runs: cfg.runs,
        rows: cases
            .into_iter()
            .map(|(program, rules, packet, verdict, x, n)| TestRunRow {
                program,
                rules,
                packet: packet.into(),
                verdict,
                figures: Ratio::new(x, n),
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------
// (a) The veth path

/// generator ns [g0] --veth-- [d0] DUT ns [d1] --veth-- [s0] sink ns.
struct Topology {
    gen_ns: Ns,
    dut: Ns,
    sink: Ns,
    d0: String,
    s0: String,
    g0_index: u32,
    d0_index: u32,
    g0_mac: [u8; 6],
    d0_mac: [u8; 6],
    _sink_prog: OwnedFd,
    _sink_link: OwnedFd,
}

impl Topology {
    fn new() -> Result<Self> {
        let (gen_ns, dut, sink) = (Ns::new("xgbg")?, Ns::new("xgbd")?, Ns::new("xgbs")?);
        let tag = std::process::id() % 100_000;
        let (g0, d0, d1, s0) = (
            format!("xg{tag}g0"),
            format!("xg{tag}d0"),
            format!("xg{tag}d1"),
            format!("xg{tag}s0"),
        );
        sh(
            "ip",
            &[
                "link", "add", &g0, "netns", &gen_ns.0, "type", "veth", "peer", "name", &d0,
                "netns", &dut.0,
            ],
        )?;
        sh(
            "ip",
            &[
                "link", "add", &d1, "netns", &dut.0, "type", "veth", "peer", "name", &s0, "netns",
                &sink.0,
            ],
        )?;
        sh("ip", &["-n", &dut.0, "addr", "add", "203.0.113.254/24", "dev", &d0])?;
        sh("ip", &["-n", &dut.0, "addr", "add", "198.51.100.1/24", "dev", &d1])?;
        sh("ip", &["-n", &sink.0, "addr", "add", "198.51.100.2/24", "dev", &s0])?;
        for (ns, dev) in [(&gen_ns, &g0), (&dut, &d0), (&dut, &d1), (&sink, &s0)] {
            sh("ip", &["-n", &ns.0, "link", "set", dev, "up"])?;
        }
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            &format!("net.ipv4.conf.{d0}.rp_filter=0"),
        ] {
            ip_exec(&dut.0, "sysctl", &["-qw", s])?;
        }
        let s0_mac = mac(&sink.0, &s0)?;
        let s0_text = s0_mac.map(|b| format!("{b:02x}")).join(":");
        sh(
            "ip",
            &[
                "-n",
                &dut.0,
                "neigh",
                "replace",
                "198.51.100.10",
                "lladdr",
                &s0_text,
                "dev",
                &d1,
                "nud",
                "permanent",
            ],
        )?;
        // GRO would only add work to the DUT's receive path for these unmergeable segments.
        let _ = ip_exec(&dut.0, "ethtool", &["-K", &d0, "gro", "off"]);
        let g0_index = with_netns(&gen_ns.0, || ifindex(&g0))?;
        let d0_index = with_netns(&dut.0, || ifindex(&d0))?;
        let sink_prog = load_drop_program()?;
        let s0_index = with_netns(&sink.0, || ifindex(&s0))?;
        let sink_link = with_netns(&sink.0, || link_xdp(sink_prog.as_fd(), s0_index))?;
        Ok(Self {
            g0_mac: mac(&gen_ns.0, &g0)?,
            d0_mac: mac(&dut.0, &d0)?,
            gen_ns,
            dut,
            sink,
            d0,
            s0,
            g0_index,
            d0_index,
            _sink_prog: sink_prog,
            _sink_link: sink_link,
        })
    }

    /// A frame from the generator to the DUT's MAC.
    fn frame(&self, mut f: Vec<u8>) -> Vec<u8> {
        f[0..6].copy_from_slice(&self.d0_mac);
        f[6..12].copy_from_slice(&self.g0_mac);
        f
    }

    /// Moves the DUT's receive processing to its own thread pinned to `cpu` (threaded
    /// NAPI); returns the threads pinned. Done after every attach: the veth's NAPI
    /// instance, and so its thread, comes and goes with the XDP program.
    fn pin_dut(&self, cpu: usize) -> Vec<i32> {
        let ok = ip_exec(
            &self.dut.0,
            "sh",
            &["-c", &format!("echo 1 > /sys/class/net/{}/threaded", self.d0)],
        );
        if ok.is_err() {
            return Vec::new();
        }
        let prefix = format!("napi/{}-", self.d0);
        let mut pinned = Vec::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
                let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                if comm.trim().starts_with(&prefix) {
                    // SAFETY: plain libc calls on a zeroed cpu_set_t owned here.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        if libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set) == 0 {
                            pinned.push(pid);
                        }
                    }
                }
            }
        }
        pinned
    }

    /// (DUT taken in, sink received) so far.
    fn counts(&self) -> Result<(u64, u64)> {
        Ok((counters(&self.dut.0, &self.d0)?.0, counters(&self.sink.0, &self.s0)?.0))
    }
}

/// Frames per `sendmmsg` call of the generator.
const GEN_BATCH: usize = 64;

/// Sends `frame` out of the generator's veth for `secs` (or just `count` frames) from a
/// thread in the generator namespace pinned to `cpu`: `xdpgate-pktgen`'s AF_PACKET sender,
/// 64 copies per `sendmmsg`, no qdisc. Every frame is copied into a fresh skb, so what the
/// DUT does to a packet never leaks into the next one. Returns (frames sent, seconds).
fn blast(
    topo: &Topology,
    frame: &[u8],
    secs: f64,
    count: Option<usize>,
    cpu: usize,
) -> Result<(u64, f64)> {
    let gen_ns = topo.gen_ns.0.clone();
    let ifindex = topo.g0_index;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(u64, f64)> {
            netns::enter(&gen_ns)?;
            pin_to_cpu(cpu);
            let socket = PacketSocket::new(ifindex).context("the generator's AF_PACKET socket")?;
            let start = Instant::now();
            let mut sent = 0u64;
            loop {
                let n = count.map_or(GEN_BATCH, |c| (c - sent as usize).min(GEN_BATCH));
                // What the veth accepted: a frame handed back (its DUT's ring full) is sent
                // again.
                let s = socket.send(frame, n as u64, GEN_BATCH).context("sendmmsg")?;
                sent += s.taken - s.refused;
                let done = match count {
                    Some(c) => sent as usize >= c,
                    None => start.elapsed().as_secs_f64() >= secs,
                };
                if done {
                    break;
                }
            }
            Ok((sent, start.elapsed().as_secs_f64()))
        })
        .join()
        .map_err(|_| anyhow!("generator thread panicked"))?
    })
}

/// One measurement's counts.
#[derive(Clone, Copy, Default)]
struct Sample {
    offered: f64,
    taken: f64,
    forwarded: f64,
    /// CPU ns of the DUT's NAPI thread per packet taken in.
    dut_ns: Option<f64>,
}

struct Path {
    topo: Topology,
    /// The DUT's NAPI threads (pids), found again after every attach.
    napi: std::cell::RefCell<Vec<i32>>,
    gen_cpu: usize,
    dut_cpu: Option<usize>,
    secs: f64,
    allowed: Vec<u8>,
    syn: Vec<u8>,
    denied: Vec<u8>,
}

impl Path {
    fn blast(&self, frame: &[u8], secs: f64, count: Option<usize>) -> Result<(u64, f64)> {
        blast(&self.topo, frame, secs, count, self.gen_cpu)
    }

    /// CPU time (ns) the DUT's NAPI threads have run so far.
    fn dut_runtime(&self) -> Option<u64> {
        let pids = self.napi.borrow();
        if pids.is_empty() {
            return None;
        }
        let mut sum = 0;
        for pid in pids.iter() {
            let s = fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
            sum += s.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(sum)
    }

    fn sample(&self, frame: &[u8]) -> Result<Sample> {
        // A short warm-up, then the measured stretch.
        self.blast(frame, self.secs / 10.0, None)?;
        std::thread::sleep(Duration::from_millis(20));
        let (t0, f0) = self.topo.counts()?;
        let r0 = self.dut_runtime();
        let (sent, secs) = self.blast(frame, self.secs, None)?;
        std::thread::sleep(Duration::from_millis(20));
        let (t1, f1) = self.topo.counts()?;
        let r1 = self.dut_runtime();
        Ok(Sample {
            offered: sent as f64 / secs,
            taken: (t1 - t0) as f64 / secs,
            forwarded: (f1 - f0) as f64 / secs,
            dut_ns: match (r0, r1) {
                (Some(a), Some(b)) if t1 > t0 => Some((b - a) as f64 / (t1 - t0) as f64),
                _ => None,
            },
        })
    }

    /// Sends the allowed flow's SYN (which opens it for a stateful filter; xdpgate's flow is
    /// established before, see [`veth_path`]), then measures allowed and denied traffic.
    fn measure(&self, filtering: bool) -> Result<(Sample, Sample)> {
        self.blast(&self.syn, 0.0, Some(1))?;
        std::thread::sleep(Duration::from_millis(5));
        let allowed = self.sample(&self.allowed)?;
        if allowed.forwarded < 0.5 * allowed.taken || allowed.taken == 0.0 {
            bail!(
                "allowed traffic: {:.0} pps taken in, {:.0} forwarded: not the intended path",
                allowed.taken,
                allowed.forwarded
            );
        }
        let denied = self.sample(&self.denied)?;
        if filtering && denied.forwarded > 0.01 * denied.taken {
            bail!(
                "denied traffic: {:.0} of {:.0} pps forwarded: not filtered",
                denied.forwarded,
                denied.taken
            );
        }
        if !filtering && denied.forwarded < 0.5 * denied.taken {
            bail!(
                "no filter, but only {:.0} of {:.0} pps forwarded",
                denied.forwarded,
                denied.taken
            );
        }
        Ok((allowed, denied))
    }

    fn pin(&self) {
        *self.napi.borrow_mut() =
            self.dut_cpu.map(|cpu| self.topo.pin_dut(cpu)).unwrap_or_default();
    }
}

/// The nftables rulesets of a generated policy: `linear` one rule per NSG rule in priority
/// order, `map` one lookup in a verdict map of (source, destination, protocol, port)
/// intervals per NSG, then the defaults. Returns (ruleset, rules, map elements).
/// With `established_first`, the forward chain begins with `ct state established,related
/// counter accept` (commented `established`), as a stateful gateway's ruleset does.
pub(crate) fn nft_ruleset(
    nsgs: &[Nsg],
    map: bool,
    established_first: bool,
) -> (String, usize, usize) {
    let mut out = String::from("table inet xgb {\n");
    let (mut rules, mut elements) = (0, 0);
    let chain = |n: &Nsg| n.name.replace('-', "_");
    for n in nsgs {
        let c = chain(n);
        if map {
            let mut seen = HashSet::new();
            let _ = writeln!(
                out,
                "  map {c} {{\n    type ipv4_addr . ipv4_addr . inet_proto . inet_service : verdict\n    flags interval\n    elements = {{"
            );
            let mut items = Vec::new();
            for r in &n.rules {
                let dst = r.destination.clone().unwrap_or_else(|| "0.0.0.0/0".into());
                let proto = if r.udp { "udp" } else { "tcp" };
                // The first (higher-priority) rule of equal fields wins, as in the chain.
                if seen.insert((r.source.clone(), dst.clone(), proto, r.port)) {
                    let verdict = if r.allow { "accept" } else { "drop" };
                    items.push(format!(
                        "      {} . {dst} . {proto} . {} : {verdict}",
                        r.source, r.port
                    ));
                }
            }
            elements += items.len();
            let _ = writeln!(out, "{}\n    }}\n  }}", items.join(",\n"));
        }
        let _ = writeln!(out, "  chain {c} {{");
        if map {
            let _ = writeln!(out, "    ip saddr . ip daddr . meta l4proto . th dport vmap @{c}");
            rules += 1;
        } else {
            for r in &n.rules {
                let dst =
                    r.destination.as_ref().map(|d| format!(" ip daddr {d}")).unwrap_or_default();
                let proto = if r.udp { "udp" } else { "tcp" };
                let verdict = if r.allow { "accept" } else { "drop" };
                let _ = writeln!(
                    out,
                    "    ip saddr {}{dst} {proto} dport {} {verdict} comment \"{}\"",
                    r.source, r.port, r.name
                );
                rules += 1;
            }
        }
        // AllowVnetInBound; DenyAllInBound is the final drop. (AllowAzureLoadBalancerInBound,
        // the agent's probe source, is left out: no test packet comes from it.)
        let _ = writeln!(
            out,
            "    ip saddr 198.51.100.0/24 ip daddr 198.51.100.0/24 accept\n    drop\n  }}"
        );
        rules += 2;
    }
    let _ = writeln!(
        out,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
    );
    if established_first {
        out.push_str("    ct state established,related counter accept comment \"established\"\n");
        rules += 1;
    }
    for n in nsgs {
        let _ = writeln!(out, "    ip daddr {} jump {}", n.subnet_v4(), chain(n));
        rules += 1;
    }
    out.push_str("  }\n}\n");
    (out, rules, elements)
}

pub(crate) fn nft_load(ns: &str, ruleset: &str) -> Result<()> {
    let mut child = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{ns}"), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child.stdin.take().expect("piped").write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("nft -f failed: {}", err.lines().take(6).collect::<Vec<_>>().join(" / "));
    }
    Ok(())
}

pub(crate) fn nft_flush(ns: &str) {
    let _ = nsenter(ns, "nft", &["flush", "ruleset"]);
}

/// What a configuration attaches to the DUT's ingress veth; removed on drop.
enum Attached<'a> {
    Link(#[allow(dead_code)] OwnedFd),
    Xdpgate(&'a Topology, &'a PinDir),
    XdpFilter(#[allow(dead_code)] XdpFilterGuard),
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if let Attached::Xdpgate(topo, pins) = self {
            let _ = with_netns(&topo.dut.0, || dataplane::detach(pins, &topo.d0));
        }
    }
}

/// A configuration of the DUT: what runs there, with how many rules.
type Key = (Candidate, usize);

/// Per (filter, rules): the samples of each run (allowed, denied); what failed, and why.
struct Collector {
    samples: Vec<(Key, Vec<(Sample, Sample)>)>,
    failed: HashSet<Key>,
    skipped: Vec<String>,
}

impl Collector {
    fn record(&mut self, key: Key, s: Result<(Sample, Sample)>) {
        match s {
            Ok(s) => match self.samples.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(s),
                None => self.samples.push((key, vec![s])),
            },
            Err(e) => {
                if self.failed.insert(key) {
                    let msg = format!("{} ({} rules): {e:#}", key.0.label(), key.1);
                    eprintln!("    not measured: {msg}");
                    self.skipped.push(msg);
                }
            }
        }
    }
}

fn veth_path(cfg: &Config, _pins: &PinDir, main_cpu: Option<usize>) -> Result<PathReport> {
    eprintln!("  veth path: setting up generator, DUT and sink namespaces ...");
    which("nsenter")?;
    let online = crate::common::Machine::detect().cpus;
    let gen_cpu = main_cpu.unwrap_or_else(current_cpu);
    let dut_cpu = (online > 1).then_some(if gen_cpu == 0 { 1 } else { 0 });
    let topo = Topology::new()?;
    // The no-op and xdp_tx programs, and one dataplane per rule count.
    let base = Bench::new()?;
    let fixed = client(Family::IPv4, CLIENT_FIXED);
    let dst = server(Family::IPv4);
    let path = Path {
        allowed: topo.frame(tcp_frame(Family::IPv4, fixed, dst, 40_000, ALLOWED_PORT, TCP_ACK)),
        syn: topo.frame(tcp_frame(Family::IPv4, fixed, dst, 40_000, ALLOWED_PORT, TCP_SYN)),
        denied: topo.frame(tcp_frame(Family::IPv4, fixed, dst, 40_001, DENIED_PORT, TCP_SYN)),
        topo,
        napi: Default::default(),
        gen_cpu,
        dut_cpu,
        secs: cfg.path_secs,
    };
    debug_assert!(path.allowed.len() > ETH_LEN);
    let topo = &path.topo;

    // One dataplane per rule count, its allowed flow established by a handshake run with
    // BPF_PROG_TEST_RUN on the same maps the attached program uses (the SYN-ACK would not
    // pass xdpgate on the path: it is attached on the DUT's ingress veth only).
    let mut gates = Vec::new();
    for &rules in &cfg.path_rules {
        let bench = Bench::new()?;
        bench.apply(&nsg::policy_yaml(Family::IPv4, rules))?;
        let ends = ((fixed, 40_000), (dst, ALLOWED_PORT));
        handshake(&bench, "xdpgate, allowed flow", Family::IPv4, ends.0, ends.1)?;
        gates.push((rules, bench));
    }
    let allowed_plain = tcp_frame(Family::IPv4, fixed, dst, 40_000, ALLOWED_PORT, TCP_ACK);
    // The allowed traffic measured an established flow only if the flow is still one.
    let still_established = |bench: &Bench| {
        FlowTables::open(bench)?.expect(
            "xdpgate, allowed flow, after the path",
            FlowState::Established,
            &[&allowed_plain],
        )
    };
    let mut nft = Vec::new();
    let mut nft_sizes = Vec::new();
    for &rules in &cfg.path_rules {
        let nsgs = nsg::nsgs(Family::IPv4, rules);
        let (linear, n_linear, _) = nft_ruleset(&nsgs, false, false);
        let (map, n_map, elements) = nft_ruleset(&nsgs, true, false);
        nft_sizes.push((rules, n_linear, elements));
        let _ = n_map;
        nft.push((rules, linear, map));
    }
    let mut skipped: Vec<String> = Vec::new();
    if which("nft").is_err() {
        skipped.push("nftables: nft is not installed".into());
    }
    let xdp_filter_ok = match which("xdp-filter") {
        Ok(()) if std::path::Path::new("/sys/fs/bpf/xdp-filter").exists() => {
            skipped.push("xdp-filter: in use on this machine (its state is global)".into());
            false
        }
        Ok(()) => true,
        Err(e) => {
            skipped.push(format!("xdp-filter: {e}"));
            false
        }
    };

    let mut c = Collector { samples: Vec::new(), failed: HashSet::new(), skipped };
    let drop_prog = load_drop_program()?;
    let mut ceiling = Vec::new();
    let noop_fd = || -> Result<OwnedFd> { Ok(base.noop()?.fd()?.as_fd().try_clone_to_owned()?) };

    for run in 0..cfg.path_runs {
        eprintln!("  veth path, run {}/{} ...", run + 1, cfg.path_runs);
        // The generator's ceiling: the DUT drops everything at once in XDP.
        let attached = with_netns(&topo.dut.0, || link_xdp(drop_prog.as_fd(), topo.d0_index))
            .map(Attached::Link)?;
        path.pin();
        ceiling.push(path.sample(&path.allowed)?);
        drop(attached);

        // No filter first: the reference of every ratio of this run.
        let attached = with_netns(&topo.dut.0, || link_xdp(noop_fd()?.as_fd(), topo.d0_index))
            .map(Attached::Link)?;
        path.pin();
        c.record((Candidate::None, 0), path.measure(false));
        drop(attached);

        for (i, &rules) in cfg.path_rules.iter().enumerate() {
            // xdpgate, attached as `xdpgate attach` does, with the NSG benchmark's policy.
            let pins = &gates[i].1.pins;
            let r = with_netns(&topo.dut.0, || {
                dataplane::attach(pins, &topo.d0, Role::External, Mode::Native)
            })
            .map(|()| Attached::Xdpgate(topo, pins));
            match r {
                Ok(attached) => {
                    path.pin();
                    let s = path.measure(true);
                    drop(attached);
                    let s = s.and_then(|s| still_established(&gates[i].1).map(|()| s));
                    c.record((Candidate::Xdpgate, rules), s);
                }
                Err(e) => c.record((Candidate::Xdpgate, rules), Err(e)),
            }

            // nftables behind the no-op, in the forward hook.
            if which("nft").is_ok() {
                for (filter, ruleset) in
                    [(Candidate::NftLinear, &nft[i].1), (Candidate::NftMap, &nft[i].2)]
                {
                    if c.failed.contains(&(filter, rules)) {
                        continue;
                    }
                    let attached =
                        with_netns(&topo.dut.0, || link_xdp(noop_fd()?.as_fd(), topo.d0_index))
                            .map(Attached::Link)?;
                    path.pin();
                    let r = nft_load(&topo.dut.0, ruleset).and_then(|()| path.measure(true));
                    nft_flush(&topo.dut.0);
                    c.record((filter, rules), r);
                    drop(attached);
                }
            }
        }

        if xdp_filter_ok && !c.failed.contains(&(Candidate::XdpFilter, 1)) {
            match XdpFilterGuard::load(&topo.dut.0, &topo.d0) {
                Ok(g) => {
                    let attached = Attached::XdpFilter(g);
                    path.pin();
                    c.record((Candidate::XdpFilter, 1), path.measure(true));
                    drop(attached);
                }
                Err(e) => c.record((Candidate::XdpFilter, 1), Err(e)),
            }
        }
    }

    // Rows: medians, and per-run ratios to no filter on the same traffic.
    let Collector { samples, skipped, .. } = c;
    let none: Vec<(Sample, Sample)> = samples
        .iter()
        .find(|(k, _)| k.0 == Candidate::None)
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if none.is_empty() {
        bail!("no filter at all could not be measured: {}", skipped.join("; "));
    }
    let mut rows = Vec::new();
    for ((filter, rules), runs) in &samples {
        for traffic in [Traffic::Allowed, Traffic::Denied] {
            let pick = |s: &(Sample, Sample)| if traffic == Traffic::Allowed { s.0 } else { s.1 };
            let metric = |s: Sample| {
                if traffic == Traffic::Allowed || *filter == Candidate::None {
                    s.forwarded
                } else {
                    s.taken
                }
            };
            let runs_pps: Vec<f64> = runs.iter().map(|s| metric(pick(s))).collect();
            let ratios: Vec<f64> =
                runs.iter().zip(&none).map(|(s, n)| metric(pick(s)) / pick(n).forwarded).collect();
            rows.push(PathRow {
                filter: *filter,
                rules: *rules,
                traffic,
                pps: median(&runs_pps),
                ratio_to_none: median(&ratios),
                runs_pps,
                sent_pps: median(&runs.iter().map(|s| pick(s).offered).collect::<Vec<_>>()),
                taken_pps: median(&runs.iter().map(|s| pick(s).taken).collect::<Vec<_>>()),
                forwarded_pps: median(&runs.iter().map(|s| pick(s).forwarded).collect::<Vec<_>>()),
                dut_ns_per_packet: opt_median(runs.iter().map(|s| pick(s).dut_ns)),
                dut_ns_ratio_to_none: opt_median(
                    runs.iter().zip(&none).map(|(s, n)| Some(pick(s).dut_ns? / pick(n).dut_ns?)),
                ),
            });
        }
    }
    Ok(PathReport {
        secs_per_figure: cfg.path_secs,
        runs: cfg.path_runs,
        generator_cpu: gen_cpu,
        dut_cpu,
        rows,
        skipped,
        nft_sizes,
        ceiling_pps: median(&ceiling.iter().map(|s| s.taken).collect::<Vec<_>>()),
        ceiling_dut_ns: opt_median(ceiling.iter().map(|s| s.dut_ns)),
        ceiling_runs: ceiling.iter().map(|s| s.taken).collect(),
    })
}

/// The median of the values present, if every one is.
fn opt_median(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty()).map(|v| median(&v))
}

// ---------------------------------------------------------------------------------------
// Markdown

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Peers on the same traffic\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(md, "#### (a) Packets per second through a veth path\n");
    match &r.path {
        Ok(p) => path_markdown(&mut md, p),
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}\n");
        }
    }
    let _ = writeln!(md, "#### (b) xdp-filter in BPF_PROG_TEST_RUN, against the no-op\n");
    match &r.xdp_filter {
        Ok(f) => filter_markdown(&mut md, f),
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}\n");
        }
    }
    md
}

fn mpps(x: f64) -> String {
    if x >= 1e6 { format!("{:.2} M", x / 1e6) } else { format!("{:.0} k", x / 1e3) }
}

fn path_markdown(md: &mut String, p: &PathReport) {
    let _ = writeln!(
        md,
        "| filter | rules | traffic | DUT CPU ns/packet | DUT cost ratio to no filter | DUT capacity (10⁹ / ns) pps | measured pps | DUT busy | reached the sink pps |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|");
    let order = [
        Candidate::None,
        Candidate::Xdpgate,
        Candidate::NftLinear,
        Candidate::NftMap,
        Candidate::XdpFilter,
    ];
    let opt = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
    for traffic in [Traffic::Allowed, Traffic::Denied] {
        let mut rows: Vec<&PathRow> = p.rows.iter().filter(|x| x.traffic == traffic).collect();
        rows.sort_by_key(|x| {
            (x.filter != Candidate::None, x.rules, order.iter().position(|f| *f == x.filter))
        });
        for x in rows {
            let busy = x.dut_ns_per_packet.map(|ns| (ns * x.taken_pps / 1e9).min(1.0));
            let bound = if busy.is_some_and(|b| b < 0.9) { " ᵍ" } else { "" };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {}{} | {} | {} |",
                x.filter.label(),
                if x.filter == Candidate::None { "-".into() } else { thousands(x.rules as u64) },
                match traffic {
                    Traffic::Allowed => "allowed, established (forwarded)",
                    Traffic::Denied if x.filter == Candidate::None =>
                        "denied (not filtered: forwarded)",
                    Traffic::Denied => "denied (dropped)",
                },
                opt(x.dut_ns_per_packet, 0),
                opt(x.dut_ns_ratio_to_none, 2),
                x.dut_ns_per_packet.map_or("-".into(), |ns| mpps(1e9 / ns)),
                mpps(x.pps),
                bound,
                busy.map_or("-".into(), |b| format!("{:.0}%", 100.0 * b)),
                mpps(x.forwarded_pps)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n*DUT CPU ns/packet*: the run time of the DUT's receive thread over the packets it \
         took in — the figure that compares filters here, with its ratio to no filter's in the \
         same run (lower is cheaper) and the capacity it implies for one CPU. *measured pps*: \
         what reached the sink (allowed traffic, and everything with no filter) or what the \
         DUT took in and dropped (denied traffic). ᵍ generator-bound: the DUT's receive thread \
         was busy less than 90% of the time (*DUT busy*: its CPU time over the wall time), so \
         the measured pps are the generator's, not the DUT's; the generator is also slower \
         then, as it pays for waking the DUT's thread, so measured pps of different rows are \
         not comparable. Generator ceiling, measured in each run with the DUT's veth dropping \
         everything in XDP at once: {} pps ({} CPU ns per packet in the DUT's receive thread \
         then: the veth's own receive cost, which every row carries).",
        mpps(p.ceiling_pps),
        opt(p.ceiling_dut_ns, 0)
    );
    let nft: Vec<String> = p
        .nft_sizes
        .iter()
        .map(|(n, linear, elements)| {
            format!(
                "{} rules: {} chain rules, or {} map elements",
                thousands(*n as u64),
                thousands(*linear as u64),
                thousands(*elements as u64)
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "\nMethod: three network namespaces joined by veth pairs: generator → DUT → sink. The \
         generator is an AF_PACKET socket in the generator namespace sending one pre-built \
         frame with `sendmmsg` (64 per call, no qdisc) from a thread pinned to CPU {gcpu}. The \
         DUT's ingress veth runs its receive processing in a threaded-NAPI kernel thread \
         pinned to CPU {dcpu}: its XDP program, then for passed packets the stack's IPv4 \
         forwarding (static neighbour) with nftables' forward hook, out to the sink, whose \
         veth drops everything in XDP — the sink's drop runs in the same thread, a small \
         constant cost in every row that forwards. Counted from /proc/net/dev of each \
         namespace: packets the DUT's veth took in, and packets that reached the sink, over \
         {secs} s per figure after a short warm-up; the DUT's CPU per packet is the NAPI \
         thread's run time (/proc/PID/schedstat) over the packets taken in. {runs} run(s), \
         each measuring every filter in turn; medians; every ratio is the median of each \
         run's figure over no filter's in the same run on the same traffic. The veth pushes \
         back on the generator when the DUT's receive ring is full (nothing is lost in \
         between), so the measured pps are the slower of generator and DUT. Traffic: *allowed*: ACK segments of one flow \
         (203.0.113.100:40000 → 198.51.100.10:443), after its SYN — for xdpgate a hit in \
         the established table (the flow is established beforehand by its handshake, run \
         with BPF_PROG_TEST_RUN on the attached dataplane's maps, and checked still \
         established after each figure), a full \
         pass over the chain for stateless nftables; *denied*: SYNs to port 8443 that only \
         the default deny matches. Filters: *no filter*: the no-op XDP program on the DUT's \
         veth and kernel forwarding (an XDP program on the veth gives it the NAPI thread; \
         every configuration has one); *xdpgate*: attached as `xdpgate attach` does (native \
         mode, role external) with the NSG benchmark's policy; allowed packets return \
         XDP_PASS to the same stack; *nftables*: the same rules in the forward hook behind \
         the no-op, one chain per NSG entered by destination subnet, as a user would write \
         them: *linear chain* one rule per NSG rule in priority order (`ip saddr S ip daddr D \
         tcp dport P accept|drop`), *verdict map* one lookup in a map of (source, \
         destination, protocol, port) intervals per packet; then AllowVnetInBound and a \
         final drop ({nft}); stateless, as a one-way generator cannot establish conntrack \
         state (no replies), so every packet is matched in full; *xdp-filter*: `xdp-filter \
         load --policy deny` and `xdp-filter port 443` (it cannot AND a port with addresses \
         or match prefixes, so the rule's address parts are not expressible).\n\n\
         Limits — why the cost ratios, not the pps, are the claim: a 2-CPU VM shares its \
         CPUs with whatever else runs on the machine (the load average is in the header), so \
         pps move by ±20% or more between runs; veth is not a NIC (no DMA, no interrupts, one \
         receive queue, one CPU for all of the DUT's work, a copy of every frame into a page \
         for XDP: about {floor} ns of the DUT's CPU per packet before any filter runs, which \
         flattens every ratio here compared with BPF_PROG_TEST_RUN's); the generator (at \
         most about {ceil} pps on its CPU) cannot outrun the cheap paths, so their measured \
         pps are the generator's and only the DUT's CPU per packet tells them apart; the \
         CPU per packet of a thread that also sleeps and wakes carries some of that \
         overhead; one flow: no RSS spreading, no cache pressure from many flows or \
         rules' data; nftables without conntrack is the cheapest way to run these rules in \
         nftables, with `ct state established accept` first established packets would skip \
         the chain but pay for conntrack (not measured: it needs reply traffic). The \
         live-frames generator (xdpgate's `xdp_tx` in BPF_PROG_TEST_RUN live mode) is not \
         used: its page pool hands out recycled pages without copying the frame in again, \
         and the DUT's stack rewrites forwarded packets in place (MAC header, TTL), so it \
         sends stale frames; with one fresh pool per batch it manages a few thousand pps \
         here.{skipped}\n",
        gcpu = p.generator_cpu,
        secs = p.secs_per_figure,
        runs = p.runs,
        nft = nft.join("; "),
        dcpu = p.dut_cpu.map_or("(none: one CPU)".into(), |c| c.to_string()),
        ceil = mpps(p.ceiling_pps),
        floor = opt(p.ceiling_dut_ns, 0),
        skipped = if p.skipped.is_empty() {
            String::new()
        } else {
            format!("\n\nNot measured: {}.", p.skipped.join("; "))
        },
    );
}

fn filter_markdown(md: &mut String, f: &FilterReport) {
    let _ = writeln!(
        md,
        "| program | rules | packet | ns/packet | no-op ns/packet | ratio (program / no-op) |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|");
    for x in &f.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} |",
            x.program, x.rules, x.packet, x.figures.ns, x.figures.noop_ns, x.figures.ratio
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: xdp-filter loaded with `xdp-filter load --policy deny` (all features: \
         Ethernet, IPv4, IPv6, TCP, UDP) on a veth of a namespace of its own and `xdp-filter \
         port 443`; its program (found with `bpftool net show`, opened by id) run with \
         BPF_PROG_TEST_RUN, each packet repeated {rep} times, {runs} runs, \
         median; the no-op right after on the same packet. xdpgate with the NSG benchmark's \
         smallest policies (1 user rule: the allow rule; 10 rules) on the same packets: the \
         allowed packet is an ACK of a flow established by its handshake (SYN, SYN-ACK, ACK; \
         a hit in the established table, checked), the denied \
         packet a SYN to port 8443 (denied packets create no flow: a full classification \
         every time). xdp-filter is stateless: every packet takes its lookups (MAC, \
         addresses, port) whatever came before.\n",
        rep = thousands(u64::from(f.repeat)),
        runs = f.runs
    );
}

/// The path report's rows for the chart: (label, ratio).
pub fn chart_rows(r: &Report) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Ok(p) = &r.path {
        for x in &p.rows {
            if x.filter == Candidate::None {
                continue;
            }
            let t = if x.traffic == Traffic::Allowed { "allowed" } else { "denied" };
            let rules = if x.filter == Candidate::XdpFilter {
                String::new()
            } else {
                format!(", {} rules", thousands(x.rules as u64))
            };
            let name = match x.filter {
                Candidate::Xdpgate => "xdpgate",
                Candidate::NftLinear => "nft chain",
                Candidate::NftMap => "nft map",
                Candidate::XdpFilter => "xdp-filter",
                Candidate::None => "none",
            };
            if let Some(r) = x.dut_ns_ratio_to_none {
                out.push((format!("{name}{rules}, {t}"), r));
            }
        }
    }
    out
}
