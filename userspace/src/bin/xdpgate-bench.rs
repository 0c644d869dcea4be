//! `cargo xtask bench`: the per-packet cost of the NSG dataplane, measured in the kernel with
//! `BPF_PROG_TEST_RUN` and always reported as a ratio to a no-op XDP program run in the same
//! process on the same packets, plus the time to compile and apply a large policy.
//!
//! Cases, for policies of 10 to 4,000 inbound user rules that do not match the test packet
//! plus one allow rule for it at the lowest priority (the worst bit position):
//! - established flow: an ACK segment of an allowed flow (opened by its SYN before) repeated
//!   N times: every repeat is one flow-table hit;
//! - first packet, allowed: many distinct allowed packets, each run once (repeat 1), so
//!   each is classified and creates its flow entries;
//! - first packet, denied: a packet only `DenyAllInBound` (the table's last bit) matches,
//!   repeated N times; a denied packet creates no flow, so every repeat is classified.
//!
//! A benchmark, not a test: nothing is asserted about speed. The verdicts are checked, as a
//! wrong verdict would mean the wrong path was measured.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use serde::Serialize;
use xdpgate::{
    apply, compile,
    dataplane::{self, NOOP_PROGRAM, PROGRAM, PinDir},
    policy,
};
use xdpgate_common::{
    flow::{FlowKey, FlowValue},
    iface::{IfaceConfig, Role},
    maps::{FLOWS, IFACES},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// User-rule counts measured (the inbound subnet table holds 4,096 rules, defaults included).
const RULE_COUNTS: [usize; 4] = [10, 100, 1_000, 4_000];
/// Priorities 100-4096: the most user rules one NSG can hold in one direction.
const NSG_MAX_USER_RULES: usize = 3_997;
/// Rule count of the compile-and-apply timing.
const APPLY_RULES: usize = 4_000;

#[derive(Parser)]
#[command(about = "Benchmark the xdpgate NSG dataplane against a no-op XDP program")]
struct Args {
    /// Small repeat counts: a smoke test of the benchmark, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Measurements per figure (the median is reported); default 7, 3 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Where to write nsg.md and nsg.json (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Config {
    runs: usize,
    /// Repeat count of the repeat-based cases.
    repeat: u32,
    /// Distinct packets of the "first packet, allowed" case.
    distinct: u16,
    /// Compile-and-apply timings per figure.
    apply_runs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Family {
    IPv4,
    IPv6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Case {
    Established,
    FirstAllowed,
    FirstDenied,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Established => "established flow",
            Case::FirstAllowed => "first packet, allowed",
            Case::FirstDenied => "first packet, denied",
        }
    }
}

#[derive(Serialize)]
struct Row {
    case: Case,
    rules: usize,
    /// Rules in the inbound subnet table, defaults included.
    table_rules: usize,
    family: Family,
    /// Median over the runs of the kernel-reported ns per packet.
    ns: f64,
    noop_ns: f64,
    /// Median of the per-run ratios (each run's xdpgate figure over the no-op figure measured
    /// right after it), which cancels slow and fast moments of the machine pairwise.
    ratio: f64,
    /// Lowest and highest per-run ratio.
    ratio_range: (f64, f64),
    /// Packets per run: the repeat count, or the number of distinct packets.
    packets_per_run: u64,
    runs_ns: Vec<f64>,
    runs_noop_ns: Vec<f64>,
}

#[derive(Serialize)]
struct ApplyRow {
    family: Family,
    rules: usize,
    table_rules: usize,
    /// Sum of the LPM field entries of all tables of the compiled policy.
    lpm_entries: usize,
    /// Medians in milliseconds, into a freshly loaded dataplane (empty slot).
    parse_ms: f64,
    compile_ms: f64,
    apply_ms: f64,
    total_ms: f64,
    /// Median total of applying the same policy again (the slot written still holds an equal
    /// policy from two applies before, which is cleared first).
    reapply_total_ms: f64,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    cpus: usize,
    date: String,
    /// /proc/loadavg (1, 5 and 15 minutes) when the benchmark started.
    load_average: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    quick: bool,
    runs: usize,
    repeat: u32,
    distinct_packets: u16,
    apply_runs: usize,
    results: Vec<Row>,
    compile_apply: Vec<ApplyRow>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = if args.quick {
        Config { runs: args.runs.unwrap_or(3), repeat: 10_000, distinct: 200, apply_runs: 2 }
    } else {
        Config { runs: args.runs.unwrap_or(7), repeat: 1_000_000, distinct: 5_000, apply_runs: 5 }
    };
    if cfg.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let out = args.out.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("target/bench")
    });
    let cpu = pin_to_current_cpu();
    let machine = machine();
    eprintln!(
        "xdpgate-bench: kernel {}, {}, {} runs per figure, repeat {}, {} distinct packets{}",
        machine.kernel,
        machine.cpu,
        cfg.runs,
        cfg.repeat,
        cfg.distinct,
        cpu.map(|c| format!(", pinned to CPU {c}")).unwrap_or_default()
    );

    let started = Instant::now();
    let results = measure_all(&cfg)?;
    let mut compile_apply = Vec::new();
    for family in [Family::IPv4, Family::IPv6] {
        eprintln!("  compile and apply, {family:?}, {APPLY_RULES} rules ...");
        compile_apply.push(measure_apply(&cfg, family, APPLY_RULES)?);
    }
    eprintln!("xdpgate-bench: done in {:.0} s", started.elapsed().as_secs_f64());

    let report = Report {
        machine,
        quick: args.quick,
        runs: cfg.runs,
        repeat: cfg.repeat,
        distinct_packets: cfg.distinct,
        apply_runs: cfg.apply_runs,
        results,
        compile_apply,
    };
    let md = markdown(&report);
    print!("{md}");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("nsg.md"), &md).context("writing nsg.md")?;
    fs::write(out.join("nsg.json"), serde_json::to_string_pretty(&report)? + "\n")
        .context("writing nsg.json")?;
    eprintln!("wrote {} and {}", out.join("nsg.md").display(), out.join("nsg.json").display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The dataplane under test

/// A dataplane loaded with maps pinned in a directory of its own, removed on drop.
struct Bench {
    pins: PinDir,
    ebpf: Option<Ebpf>,
}

impl Bench {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = format!(
            "/sys/fs/bpf/xdpgate-bench-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinDir::new(path);
        // From here on, drop removes the pins whatever fails.
        let mut bench = Self { pins, ebpf: None };
        let mut ebpf = dataplane::load(&bench.pins)?;
        dataplane::dataplane(&mut ebpf)?;
        dataplane::program(&mut ebpf, NOOP_PROGRAM)?;
        // Test-run packets arrive on `lo` (ifindex 1). Register it like an attachment facing
        // the outside, so packets are inbound and take the registered-interface path.
        let mut ifaces: HashMap<_, u32, IfaceConfig> =
            ebpf.map_mut(IFACES).ok_or_else(|| anyhow!("map {IFACES} missing"))?.try_into()?;
        ifaces.insert(1, IfaceConfig { slot: 1, role: Role::External as u32 }, 0)?;
        bench.ebpf = Some(ebpf);
        Ok(bench)
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        let ebpf = self.ebpf.as_ref().expect("loaded");
        Ok(ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?)
    }

    /// Parses, compiles and applies a policy; returns the time of each step and the compiled
    /// policy's LPM entry count.
    fn apply(&self, src: &str) -> Result<(Duration, Duration, Duration, usize)> {
        let t0 = Instant::now();
        let policy = policy::load_str(src, "bench.yaml").map_err(|e| anyhow!("{e}"))?;
        let t1 = Instant::now();
        let compiled = compile::compile(&policy)?;
        let t2 = Instant::now();
        apply::apply(&self.pins, &compiled, &policy.settings)?;
        let t3 = Instant::now();
        let entries = compiled.tables.iter().map(|t| t.fields.len()).sum();
        Ok((t1 - t0, t2 - t1, t3 - t2, entries))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Close the programs and maps first, then remove the pins (nothing is attached).
        self.ebpf = None;
        let _ = fs::remove_dir_all(self.pins.path());
        let _ = fs::remove_dir_all(apply::state_dir(&self.pins));
    }
}

/// Runs `packet` `repeat` times; returns the verdict and the kernel's ns per run.
fn run(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(packet), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

fn expect_verdict(what: &str, got: u32, want: u32) -> Result<()> {
    if got != want {
        bail!("{what}: verdict {got}, want {want}: the benchmark would measure the wrong path");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Addresses and packets (documentation addresses only)

const SUBNET_HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const SUBNET_HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// The allowed service port, and a port no rule names (the denied case).
const ALLOWED_PORT: u16 = 443;
const DENIED_PORT: u16 = 8443;
/// Client of the established and denied cases; clients 1..=99 carry the first packets of
/// run 1..; all of them lie inside the allow rule's source and outside every filler's.
const CLIENT_FIXED: u16 = 100;

fn client(family: Family, n: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    match family {
        Family::IPv4 => a[..4].copy_from_slice(&[203, 0, 113, n as u8]),
        Family::IPv6 => a = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, n).octets(),
    }
    a
}

fn server(family: Family) -> [u8; 16] {
    let mut a = [0u8; 16];
    match family {
        Family::IPv4 => a[..4].copy_from_slice(&SUBNET_HOST_V4.octets()),
        Family::IPv6 => a = SUBNET_HOST_V6.octets(),
    }
    a
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Ethernet + IPv4 or IPv6 + TCP (20 bytes) + a small payload, with correct lengths (the
/// dataplane does not check checksums; the IPv4 header checksum is set anyway).
fn tcp_frame(
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    const PAYLOAD: &[u8] = b"xdpgate-bench";
    let l4_len = 20 + PAYLOAD.len();
    let mut p = Vec::with_capacity(14 + 40 + l4_len);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0b]); // destination MAC
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a]); // source MAC
    match family {
        Family::IPv4 => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let ip = p.len();
            p.extend_from_slice(&[0x45, 0]); // version 4, IHL 5; DSCP/ECN
            p.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes()); // total length
            p.extend_from_slice(&[0, 1, 0x40, 0]); // id 1; DF, offset 0
            p.extend_from_slice(&[64, 6, 0, 0]); // TTL, TCP, checksum (below)
            p.extend_from_slice(&src[..4]);
            p.extend_from_slice(&dst[..4]);
            let mut sum: u32 =
                p[ip..ip + 20].chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            p[ip + 10..ip + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        }
        Family::IPv6 => {
            p.extend_from_slice(&0x86ddu16.to_be_bytes());
            p.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, class, flow label
            p.extend_from_slice(&(l4_len as u16).to_be_bytes()); // payload length
            p.extend_from_slice(&[6, 64]); // next header TCP, hop limit
            p.extend_from_slice(&src);
            p.extend_from_slice(&dst);
        }
    }
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&1000u32.to_be_bytes()); // sequence
    p.extend_from_slice(&(if flags & TCP_ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
    p.extend_from_slice(&[0x50, flags]); // data offset 5 words; flags
    p.extend_from_slice(&64240u16.to_be_bytes()); // window
    p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    p.extend_from_slice(PAYLOAD);
    p
}

// ---------------------------------------------------------------------------------------
// Policies

/// How the user rules of a policy are laid out.
struct Layout {
    /// User rules in the NSG of the test subnet (the allow rule included).
    main: usize,
    /// Filler rules in a second NSG on the other half of the subnet, at the same layer (so in
    /// the same table): only when the count exceeds what one NSG's priorities allow.
    extra: usize,
}

impl Layout {
    fn new(rules: usize) -> Self {
        assert!(rules >= 1);
        let main = rules.min(NSG_MAX_USER_RULES);
        Self { main, extra: rules - main }
    }

    /// Rules in the inbound subnet table: user rules and each NSG's three inbound defaults.
    fn table_rules(&self) -> usize {
        self.main + self.extra + if self.extra > 0 { 6 } else { 3 }
    }
}

/// A policy with `rules` inbound user rules: `rules - 1` fillers that do not match the test
/// packets (another destination port, or a source outside the clients) and one allow rule
/// for the test packets at the lowest priority, 4096, so the last user bit of the table.
fn policy_yaml(family: Family, rules: usize) -> String {
    let layout = Layout::new(rules);
    let mut y = String::new();
    y.push_str(
        "# Generated by xdpgate-bench.\n\
         virtual_network:\n  address_space: [198.51.100.0/24, 2001:db8:1::/64]\nnsgs:\n",
    );
    let mut filler = 0usize;
    let mut nsg = |y: &mut String, name: &str, upper: bool, fillers: usize, allow: bool| {
        let subnets = if upper {
            "[198.51.100.128/25, \"2001:db8:1:0:8000::/65\"]"
        } else {
            "[198.51.100.0/25, \"2001:db8:1::/65\"]"
        };
        let _ = write!(y, "  - name: {name}\n    subnets: {subnets}\n    rules:\n");
        for k in 0..fillers {
            let i = filler;
            filler += 1;
            let access = if i.is_multiple_of(3) { "deny" } else { "allow" };
            let protocol = if i % 4 == 3 { "udp" } else { "tcp" };
            // Even: the clients' prefix, another destination port (one per rule).
            // Odd: the service port, from a source outside the clients.
            let host = (i / 2) % 120 + 4 + if upper { 128 } else { 0 };
            let (source, destination, port) = match (family, i % 2) {
                (Family::IPv4, 0) => ("203.0.113.0/24".to_string(), "\"*\"".to_string(), 1024 + i),
                (Family::IPv4, _) => (
                    format!("203.0.113.{}", 128 + (i / 2) % 128),
                    format!("198.51.100.{host}"),
                    usize::from(ALLOWED_PORT),
                ),
                (Family::IPv6, 0) => {
                    ("\"2001:db8:2::/64\"".to_string(), "\"*\"".to_string(), 1024 + i)
                }
                (Family::IPv6, _) => (
                    format!("\"2001:db8:2:1::{:x}\"", i / 2 + 1),
                    if upper {
                        format!("\"2001:db8:1:0:8000::{host:x}\"")
                    } else {
                        format!("\"2001:db8:1::{host:x}\"")
                    },
                    usize::from(ALLOWED_PORT),
                ),
            };
            let _ = writeln!(
                y,
                "      - {{name: f{i}, priority: {}, direction: inbound, access: {access}, \
                 protocol: {protocol}, source: [{source}], destination: [{destination}], \
                 destination_ports: [{port}]}}",
                100 + k
            );
        }
        if allow {
            let (source, destination) = match family {
                Family::IPv4 => ("203.0.113.0/25".to_string(), SUBNET_HOST_V4.to_string()),
                Family::IPv6 => {
                    ("\"2001:db8:2::/64\"".to_string(), format!("\"{SUBNET_HOST_V6}\""))
                }
            };
            let _ = writeln!(
                y,
                "      - {{name: allow-bench, priority: 4096, direction: inbound, access: allow, \
                 protocol: tcp, source: [{source}], destination: [{destination}], \
                 destination_ports: [{ALLOWED_PORT}]}}"
            );
        }
    };
    // The second NSG comes first: rules of equal priority sort by NSG order, which keeps the
    // test subnet's allow rule and DenyAllInBound at the end of the table.
    if layout.extra > 0 {
        nsg(&mut y, "bench-other-half", true, layout.extra, false);
    }
    nsg(&mut y, "bench", false, layout.main - 1, true);
    y
}

// ---------------------------------------------------------------------------------------
// Measurements

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

fn row(case: Case, rules: usize, family: Family, packets: u64, x: Vec<f64>, noop: Vec<f64>) -> Row {
    let (ns, noop_ns) = (median(&x), median(&noop));
    let ratios: Vec<f64> = x.iter().zip(&noop).map(|(a, b)| a / b).collect();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Row {
        case,
        rules,
        table_rules: Layout::new(rules).table_rules(),
        family,
        ns,
        noop_ns,
        ratio: median(&ratios),
        ratio_range: (lo, hi),
        packets_per_run: packets,
        runs_ns: x,
        runs_noop_ns: noop,
    }
}

/// One policy under test: its own freshly loaded dataplane (so the flow table starts empty
/// and every "first packet" really is one), its packets and the figures of each run.
struct Setup {
    family: Family,
    rules: usize,
    bench: Bench,
    established: Vec<u8>,
    denied: Vec<u8>,
    /// (xdpgate, no-op) ns per packet, one entry per run.
    est: (Vec<f64>, Vec<f64>),
    den: (Vec<f64>, Vec<f64>),
    first: (Vec<f64>, Vec<f64>),
}

impl Setup {
    fn new(family: Family, rules: usize) -> Result<Self> {
        let bench = Bench::new()?;
        bench.apply(&policy_yaml(family, rules))?;
        let fixed = client(family, CLIENT_FIXED);
        let dst = server(family);
        let established = tcp_frame(family, fixed, dst, 40_000, ALLOWED_PORT, TCP_ACK);
        let denied = tcp_frame(family, fixed, dst, 40_001, DENIED_PORT, TCP_SYN);
        // Open the flow with its SYN (a TCP flow starts with one), then check each path's
        // verdict before timing it.
        let syn = tcp_frame(family, fixed, dst, 40_000, ALLOWED_PORT, TCP_SYN);
        let gate = bench.prog(PROGRAM)?;
        expect_verdict("established flow (SYN)", run(gate, &syn, 1)?.0, XDP_PASS)?;
        expect_verdict("established flow", run(gate, &established, 1)?.0, XDP_PASS)?;
        expect_verdict("first packet, denied", run(gate, &denied, 1)?.0, XDP_DROP)?;
        Ok(Self {
            family,
            rules,
            bench,
            established,
            denied,
            est: Default::default(),
            den: Default::default(),
            first: Default::default(),
        })
    }

    /// Run `r` of the three cases; each xdpgate figure is followed at once by the no-op's.
    fn measure(&mut self, cfg: &Config, r: usize) -> Result<()> {
        let gate = self.bench.prog(PROGRAM)?;
        let noop = self.bench.prog(NOOP_PROGRAM)?;

        // Established: every repeat is a flow hit.
        let (v, ns) = run(gate, &self.established, cfg.repeat)?;
        expect_verdict("established flow", v, XDP_PASS)?;
        self.est.0.push(ns);
        self.est.1.push(run(noop, &self.established, cfg.repeat)?.1);

        // Denied: every repeat is a full classification ending at the last bit.
        let (v, ns) = run(gate, &self.denied, cfg.repeat)?;
        expect_verdict("first packet, denied", v, XDP_DROP)?;
        self.den.0.push(ns);
        self.den.1.push(run(noop, &self.denied, cfg.repeat)?.1);

        // First packets: a client of its own per run and distinct source ports, each packet
        // run once; the kernel's per-run figure (timer overhead included) is averaged, and
        // the no-op runs on the very same packets.
        let (src, dst) = (client(self.family, 1 + r as u16), server(self.family));
        let packets: Vec<Vec<u8>> = (0..cfg.distinct)
            .map(|i| tcp_frame(self.family, src, dst, 10_000 + i, ALLOWED_PORT, TCP_SYN))
            .collect();
        let (mut sum, mut sum_noop) = (0.0, 0.0);
        for p in &packets {
            let (v, ns) = run(gate, p, 1)?;
            expect_verdict("first packet, allowed", v, XDP_PASS)?;
            sum += ns;
        }
        for p in &packets {
            sum_noop += run(noop, p, 1)?.1;
        }
        self.first.0.push(sum / f64::from(cfg.distinct));
        self.first.1.push(sum_noop / f64::from(cfg.distinct));
        Ok(())
    }

    fn finish(self, cfg: &Config) -> Result<Vec<Row>> {
        // Sanity: every first packet created its two flow entries (forward and reply), so
        // each was classified; with the established flow, that is all the table holds.
        let flows: HashMap<_, FlowKey, FlowValue> = self.bench.pins.open_map(FLOWS)?.try_into()?;
        let count = flows.keys().filter_map(|k| k.ok()).count();
        let want = 2 * (cfg.runs * usize::from(cfg.distinct) + 1);
        if count != want {
            bail!("{count} flow entries after the runs, want {want}: some first packets were not");
        }
        let (rules, family) = (self.rules, self.family);
        let repeat = u64::from(cfg.repeat);
        let distinct = u64::from(cfg.distinct);
        Ok(vec![
            row(Case::Established, rules, family, repeat, self.est.0, self.est.1),
            row(Case::FirstAllowed, rules, family, distinct, self.first.0, self.first.1),
            row(Case::FirstDenied, rules, family, repeat, self.den.0, self.den.1),
        ])
    }
}

/// Every policy is loaded first; each run then measures them all in turn, so a slow moment
/// of the machine touches one run of many rows rather than every run of one row.
fn measure_all(cfg: &Config) -> Result<Vec<Row>> {
    let mut setups = Vec::new();
    for family in [Family::IPv4, Family::IPv6] {
        for rules in RULE_COUNTS {
            eprintln!("  loading the dataplane with {rules} {family:?} rules ...");
            setups.push(Setup::new(family, rules)?);
        }
    }
    for r in 0..cfg.runs {
        eprintln!("  run {}/{} ...", r + 1, cfg.runs);
        for s in &mut setups {
            s.measure(cfg, r)?;
        }
    }
    let mut rows = Vec::new();
    for s in setups {
        rows.extend(s.finish(cfg)?);
    }
    Ok(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Wall-clock time of load_str + compile + apply: into a freshly loaded dataplane (median of
/// `apply_runs` loads), and again into one that already holds equal policies in both slots.
fn measure_apply(cfg: &Config, family: Family, rules: usize) -> Result<ApplyRow> {
    let src = policy_yaml(family, rules);
    let (mut parse, mut comp, mut appl, mut total, mut again) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut lpm_entries = 0;
    for _ in 0..cfg.apply_runs {
        let bench = Bench::new()?;
        let (p, c, a, n) = bench.apply(&src)?;
        lpm_entries = n;
        parse.push(ms(p));
        comp.push(ms(c));
        appl.push(ms(a));
        total.push(ms(p + c + a));
    }
    let bench = Bench::new()?;
    bench.apply(&src)?;
    bench.apply(&src)?;
    for _ in 0..cfg.apply_runs {
        let (p, c, a, _) = bench.apply(&src)?;
        again.push(ms(p + c + a));
    }
    Ok(ApplyRow {
        family,
        rules,
        table_rules: Layout::new(rules).table_rules(),
        lpm_entries,
        parse_ms: median(&parse),
        compile_ms: median(&comp),
        apply_ms: median(&appl),
        total_ms: median(&total),
        reapply_total_ms: median(&again),
    })
}

// ---------------------------------------------------------------------------------------
// Machine, date, report

/// Pins this thread to the CPU it runs on: test runs execute on the calling CPU, and the
/// per-CPU flow-table free lists and caches stay the same across runs.
fn pin_to_current_cpu() -> Option<usize> {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned here.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return None;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        (libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0)
            .then_some(cpu as usize)
    }
}

fn machine() -> Machine {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // Online CPUs of the machine (the affinity mask is one CPU once pinned).
    // SAFETY: sysconf has no preconditions.
    let cpus = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1);
    let load_average = fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Machine { kernel, cpu, cpus, date: utc_now(), load_average }
}

/// The current UTC date and time, "YYYY-MM-DD HH:MM UTC".
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "### NSG dataplane cost (BPF_PROG_TEST_RUN)\n");
    if r.quick {
        let _ = writeln!(md, "**Quick run (`--quick`): a smoke test, not a measurement.**\n");
    }
    let _ = writeln!(
        md,
        "Linux {}, {} ({} CPUs), {}, load average {} at the start.  \n\
         Absolute figures vary by machine; the ratios to a no-op XDP program, measured in the \
         same run on the same packets, are the claim.\n",
        m.kernel, m.cpu, m.cpus, m.date, m.load_average
    );
    let _ = writeln!(
        md,
        "| case | rules | family | ns/packet | no-op ns/packet | ratio (xdpgate / no-op) |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|");
    for case in [Case::Established, Case::FirstAllowed, Case::FirstDenied] {
        for row in r.results.iter().filter(|x| x.case == case) {
            let _ = writeln!(
                md,
                "| {} | {} | {:?} | {:.1} | {:.1} | {:.2} |",
                case.label(),
                thousands(row.rules as u64),
                row.family,
                row.ns,
                row.noop_ns,
                row.ratio
            );
        }
    }
    let _ = writeln!(
        md,
        "\nCompile and apply ({} runs, median, wall clock: YAML parse + compile + write to the \
         maps and flip the slot):\n",
        r.apply_runs
    );
    let _ = writeln!(
        md,
        "| rules | family | LPM entries | parse ms | compile ms | apply ms | total ms | re-apply total ms |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|");
    for a in &r.compile_apply {
        let _ = writeln!(
            md,
            "| {} | {:?} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            thousands(a.rules as u64),
            a.family,
            thousands(a.lpm_entries as u64),
            a.parse_ms,
            a.compile_ms,
            a.apply_ms,
            a.total_ms,
            a.reapply_total_ms
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: `cargo xtask bench`. Each figure is the median of {runs} runs; each run \
         measures every row in turn, the no-op right after xdpgate on the same packets, and \
         the ratio is the median of the per-run ratios (so it need not equal the quotient of \
         the two medians). \
         *established flow*: an allowed TCP ACK segment of a flow opened by a SYN before, \
         repeated {rep} times (each is one flow-table hit). *first packet, denied*: a packet only DenyAllInBound (the \
         table's last rule) matches, repeated {rep} times (denied packets create no flow, so \
         each repeat is a full classification). *first packet, allowed*: {dist} distinct \
         packets (distinct source ports), each run once and classified, creating its flow; the \
         kernel's per-run time (its timer overhead included) is averaged, and the no-op runs on \
         the same packets the same way. *rules*: inbound user rules that do not match the test \
         packets (other destination ports or other sources), the last being the allow rule for \
         them at priority 4096, plus the NSG's default rules. One NSG can use only 3,997 \
         priorities (100-4096), so at 4,000 rules 3 fillers sit in a second NSG on the other \
         half of the subnet, at the same layer and so in the same table (4,006 rules with both \
         NSGs' defaults). The bench thread is pinned to one CPU. The kernel reports \
         whole nanoseconds per run, rounded down: for the repeat-based cases a no-op figure \
         near 8 ns carries up to 1 ns (about 12%) of that error into the ratio. Re-apply: the same \
         policy applied again, first clearing the equal policy left in the inactive slot.",
        runs = r.runs,
        rep = thousands(u64::from(r.repeat)),
        dist = thousands(u64::from(r.distinct_packets)),
    );
    md
}
