//! The NSG dataplane's per-packet cost, for policies of 10 to 4,000 inbound user rules that
//! do not match the test packet plus one allow rule for it at the lowest priority (the
//! worst bit position), and the time to compile and apply such a policy.
//!
//! - established flow: an ACK segment of an allowed flow (established before by a full
//!   handshake) repeated N times: every repeat is one hit in the established table;
//! - embryonic flow: the SYN of a flow no one answered, sent again N times: every repeat
//!   misses the established table and hits the embryonic one (a SYN retransmission, or a
//!   SYN flood's repeated tuple);
//! - first packet, allowed: many distinct allowed packets, each run once (repeat 1), so
//!   each is classified and creates its flow entry;
//! - the answer's first packet: the server's SYN-ACK of each of those flows, run once: it
//!   misses both tables, finds the flow by the reversed key and is counted there (such a
//!   flow has no reply entry until it is confirmed);
//! - the confirming ACK: the client's ACK of each of those flows, run once: it moves the
//!   flow to the established table;
//! - first packet, denied: a packet to a port no rule names, so only `DenyAllInBound` (the
//!   table's last bit) matches, repeated N times; a denied packet creates no flow, so every
//!   repeat is classified. Its port's class has rules only in the bitmaps' last word, so the
//!   scan reads that word alone;
//! - first packet, denied at the service port: a connection attempt to the allowed port
//!   from a source no rule allows, repeated N times: the port's class has rules in every
//!   word, so the scan visits them all before `DenyAllInBound` (reading two of the five
//!   bitmaps of each: the source's has no rule before the last word).

use std::fmt::Write as _;

use anyhow::{Result, bail};
use aya::programs::Xdp;
use serde::Serialize;
use xdpgate_common::iface::Role;

use crate::common::{
    ALLOWED_PORT, Bench, CLIENT_FIXED, Config, DENIED_PORT, Family, FlowState, FlowTables, Machine,
    SUBNET_HOST_V4, SUBNET_HOST_V6, TCP_ACK, TCP_SYN, TCP_SYN_ACK, XDP_DROP, XDP_PASS, addr4,
    client, expect_verdict, handshake, median, ms, run, server, tcp_frame, thousands,
};

/// User-rule counts measured (the inbound subnet table holds 4,096 rules, defaults included).
pub const RULE_COUNTS: [usize; 4] = [10, 100, 1_000, 4_000];
/// Priorities 100-4096: the most user rules one NSG can hold in one direction.
const NSG_MAX_USER_RULES: usize = 3_997;
/// Rule count of the compile-and-apply timing.
const APPLY_RULES: usize = 4_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Established,
    Embryonic,
    FirstAllowed,
    FirstAnswer,
    Confirming,
    FirstDenied,
    FirstDeniedScanned,
}

impl Case {
    pub const ALL: [Case; 7] = [
        Case::Established,
        Case::Embryonic,
        Case::FirstAllowed,
        Case::FirstAnswer,
        Case::Confirming,
        Case::FirstDenied,
        Case::FirstDeniedScanned,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Case::Established => "established flow",
            Case::Embryonic => "embryonic flow (unanswered SYN again)",
            Case::FirstAllowed => "first packet, allowed",
            Case::FirstAnswer => "the answer's first packet (SYN-ACK)",
            Case::Confirming => "the confirming ACK (the handshake's last)",
            Case::FirstDenied => "first packet, denied",
            Case::FirstDeniedScanned => "first packet, denied at the service port (every word)",
        }
    }
}

#[derive(Serialize)]
pub struct Row {
    pub case: Case,
    pub rules: usize,
    /// Rules in the inbound subnet table, defaults included.
    pub table_rules: usize,
    pub family: Family,
    /// Median over the runs of the kernel-reported ns per packet.
    pub ns: f64,
    pub noop_ns: f64,
    /// Median of the per-run ratios (each run's xdpgate figure over the no-op figure measured
    /// right after it), which cancels slow and fast moments of the machine pairwise.
    pub ratio: f64,
    /// Lowest and highest per-run ratio.
    pub ratio_range: (f64, f64),
    /// Packets per run: the repeat count, or the number of distinct packets.
    pub packets_per_run: u64,
    pub runs_ns: Vec<f64>,
    pub runs_noop_ns: Vec<f64>,
}

#[derive(Serialize)]
pub struct ApplyRow {
    pub family: Family,
    pub rules: usize,
    pub table_rules: usize,
    /// Sum of the LPM field entries of all tables of the compiled policy.
    pub lpm_entries: usize,
    /// Medians in milliseconds, into a freshly loaded dataplane (empty slot).
    pub parse_ms: f64,
    pub compile_ms: f64,
    pub apply_ms: f64,
    pub total_ms: f64,
    /// Median total of applying the same policy again (the slot written still holds an equal
    /// policy from two applies before, which is cleared first).
    pub reapply_total_ms: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub runs: usize,
    pub repeat: u32,
    pub distinct_packets: u16,
    pub apply_runs: usize,
    pub results: Vec<Row>,
    pub compile_apply: Vec<ApplyRow>,
}

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    let results = measure_all(cfg)?;
    let mut compile_apply = Vec::new();
    for family in [Family::IPv4, Family::IPv6] {
        eprintln!("  compile and apply, {family:?}, {APPLY_RULES} rules ...");
        compile_apply.push(measure_apply(cfg, family, APPLY_RULES)?);
    }
    Ok(Report {
        machine: machine.clone(),
        quick: cfg.quick,
        runs: cfg.runs,
        repeat: cfg.repeat,
        distinct_packets: cfg.distinct,
        apply_runs: cfg.apply_runs,
        results,
        compile_apply,
    })
}

// ---------------------------------------------------------------------------------------
// Policies

/// How the user rules of a policy are laid out.
pub struct Layout {
    /// User rules in the NSG of the test subnet (the allow rule included).
    pub main: usize,
    /// Filler rules in a second NSG on the other half of the subnet, at the same layer (so in
    /// the same table): only when the count exceeds what one NSG's priorities allow.
    pub extra: usize,
}

impl Layout {
    pub fn new(rules: usize) -> Self {
        assert!(rules >= 1);
        let main = rules.min(NSG_MAX_USER_RULES);
        Self { main, extra: rules - main }
    }

    /// Rules in the inbound subnet table: user rules and each NSG's three inbound defaults.
    pub fn table_rules(&self) -> usize {
        self.main + self.extra + if self.extra > 0 { 6 } else { 3 }
    }
}

/// One inbound user rule of a generated policy.
pub struct UserRule {
    pub name: String,
    pub priority: usize,
    pub allow: bool,
    pub udp: bool,
    /// A prefix or address.
    pub source: String,
    /// `None`: any destination.
    pub destination: Option<String>,
    pub port: u16,
}

/// One NSG of a generated policy.
pub struct Nsg {
    pub name: &'static str,
    /// The upper half of the subnet (198.51.100.128/25), or the lower half with the server.
    pub upper: bool,
    pub rules: Vec<UserRule>,
}

impl Nsg {
    pub fn subnet_v4(&self) -> &'static str {
        if self.upper { "198.51.100.128/25" } else { "198.51.100.0/25" }
    }

    fn subnet_v6(&self) -> &'static str {
        if self.upper { "2001:db8:1:0:8000::/65" } else { "2001:db8:1::/65" }
    }
}

/// The NSGs of a policy with `rules` inbound user rules: `rules - 1` fillers that do not
/// match the test packets (another destination port, or a source outside the clients) and
/// one allow rule for the test packets at the lowest priority, 4096, so the last user bit of
/// the table. The second NSG (only past 3,997 rules) comes first: rules of equal priority
/// sort by NSG order, which keeps the test subnet's allow rule and DenyAllInBound at the end
/// of the table.
pub fn nsgs(family: Family, rules: usize) -> Vec<Nsg> {
    let layout = Layout::new(rules);
    let mut filler = 0usize;
    let mut nsg = |name: &'static str, upper: bool, fillers: usize, allow: bool| {
        let mut out = Vec::new();
        for k in 0..fillers {
            let i = filler;
            filler += 1;
            // Even: the clients' prefix, another destination port (one per rule).
            // Odd: the service port, from a source outside the clients.
            let host = (i / 2) % 120 + 4 + if upper { 128 } else { 0 };
            let (source, destination, port) = match (family, i % 2) {
                (Family::IPv4, 0) => ("203.0.113.0/24".to_string(), None, 1024 + i as u16),
                (Family::IPv4, _) => (
                    format!("203.0.113.{}", 128 + (i / 2) % 128),
                    Some(format!("198.51.100.{host}")),
                    ALLOWED_PORT,
                ),
                (Family::IPv6, 0) => ("2001:db8:2::/64".to_string(), None, 1024 + i as u16),
                (Family::IPv6, _) => (
                    format!("2001:db8:2:1::{:x}", i / 2 + 1),
                    Some(if upper {
                        format!("2001:db8:1:0:8000::{host:x}")
                    } else {
                        format!("2001:db8:1::{host:x}")
                    }),
                    ALLOWED_PORT,
                ),
            };
            out.push(UserRule {
                name: format!("f{i}"),
                priority: 100 + k,
                allow: !i.is_multiple_of(3),
                udp: i % 4 == 3,
                source,
                destination,
                port,
            });
        }
        if allow {
            let (source, destination) = match family {
                Family::IPv4 => ("203.0.113.0/25".to_string(), SUBNET_HOST_V4.to_string()),
                Family::IPv6 => ("2001:db8:2::/64".to_string(), SUBNET_HOST_V6.to_string()),
            };
            out.push(UserRule {
                name: "allow-bench".into(),
                priority: 4096,
                allow: true,
                udp: false,
                source,
                destination: Some(destination),
                port: ALLOWED_PORT,
            });
        }
        Nsg { name, upper, rules: out }
    };
    let mut out = Vec::new();
    if layout.extra > 0 {
        out.push(nsg("bench-other-half", true, layout.extra, false));
    }
    out.push(nsg("bench", false, layout.main - 1, true));
    out
}

/// A YAML list item: quoted when YAML would misread it (IPv6, `*`).
fn item(s: &str) -> String {
    if s.contains(':') || s == "*" { format!("\"{s}\"") } else { s.to_string() }
}

/// The `nsgs:` entries of [`nsgs`] as policy YAML.
pub fn nsgs_yaml(nsgs: &[Nsg]) -> String {
    let mut y = String::from("nsgs:\n");
    for n in nsgs {
        let _ = write!(
            y,
            "  - name: {}\n    subnets: [{}, {}]\n    rules:\n",
            n.name,
            n.subnet_v4(),
            item(n.subnet_v6())
        );
        for r in &n.rules {
            let _ = writeln!(
                y,
                "      - {{name: {}, priority: {}, direction: inbound, access: {}, \
                 protocol: {}, source: [{}], destination: [{}], destination_ports: [{}]}}",
                r.name,
                r.priority,
                if r.allow { "allow" } else { "deny" },
                if r.udp { "udp" } else { "tcp" },
                item(&r.source),
                item(r.destination.as_deref().unwrap_or("*")),
                r.port
            );
        }
    }
    y
}

/// The whole benchmark policy with `rules` inbound user rules.
pub fn policy_yaml(family: Family, rules: usize) -> String {
    format!(
        "# Generated by xdpgate-bench.\n\
         virtual_network:\n  address_space: [198.51.100.0/24, 2001:db8:1::/64]\n{}",
        nsgs_yaml(&nsgs(family, rules))
    )
}

// ---------------------------------------------------------------------------------------
// Measurements

fn row(case: Case, rules: usize, family: Family, packets: u64, x: Vec<f64>, noop: Vec<f64>) -> Row {
    let r = crate::common::Ratio::new(x, noop);
    Row {
        case,
        rules,
        table_rules: Layout::new(rules).table_rules(),
        family,
        ns: r.ns,
        noop_ns: r.noop_ns,
        ratio: r.ratio,
        ratio_range: r.ratio_range,
        packets_per_run: packets,
        runs_ns: r.runs_ns,
        runs_noop_ns: r.runs_noop_ns,
    }
}

/// One policy under test: its own freshly loaded dataplane (so the flow table starts empty
/// and every "first packet" really is one), its packets and the figures of each run.
struct Setup {
    family: Family,
    rules: usize,
    bench: Bench,
    established: Vec<u8>,
    /// The SYN of a flow no one answers: it stays embryonic.
    embryonic: Vec<u8>,
    denied: Vec<u8>,
    /// To the allowed port from a source no rule allows.
    scanned: Vec<u8>,
    /// (xdpgate, no-op) ns per packet, one entry per run.
    est: (Vec<f64>, Vec<f64>),
    emb: (Vec<f64>, Vec<f64>),
    den: (Vec<f64>, Vec<f64>),
    scan: (Vec<f64>, Vec<f64>),
    first: (Vec<f64>, Vec<f64>),
    answer: (Vec<f64>, Vec<f64>),
    confirm: (Vec<f64>, Vec<f64>),
}

impl Setup {
    fn new(family: Family, rules: usize) -> Result<Self> {
        let bench = Bench::new()?;
        bench.apply(&policy_yaml(family, rules))?;
        let fixed = client(family, CLIENT_FIXED);
        let dst = server(family);
        // Establish the flow as its two ends would (SYN, SYN-ACK, ACK), open an embryonic
        // one with a SYN no one answers, and check each path's verdict before timing it.
        let established =
            handshake(&bench, "established flow", family, (fixed, 40_000), (dst, ALLOWED_PORT))?;
        let embryonic = tcp_frame(family, fixed, dst, 40_002, ALLOWED_PORT, TCP_SYN);
        let denied = tcp_frame(family, fixed, dst, 40_001, DENIED_PORT, TCP_SYN);
        let scanned = tcp_frame(family, stranger(family), dst, 40_003, ALLOWED_PORT, TCP_SYN);
        let gate = bench.gate()?;
        expect_verdict("established flow", run(gate, &established, 1)?.0, XDP_PASS)?;
        expect_verdict("embryonic flow", run(gate, &embryonic, 1)?.0, XDP_PASS)?;
        expect_verdict("first packet, denied", run(gate, &denied, 1)?.0, XDP_DROP)?;
        expect_verdict("denied at the service port", run(gate, &scanned, 1)?.0, XDP_DROP)?;
        let tables = FlowTables::open(&bench)?;
        tables.expect("established flow", FlowState::Established, &[&established])?;
        tables.expect("embryonic flow", FlowState::Embryonic, &[&embryonic])?;
        tables.expect("first packet, denied", FlowState::None, &[&denied, &scanned])?;
        Ok(Self {
            family,
            rules,
            bench,
            established,
            embryonic,
            denied,
            scanned,
            est: Default::default(),
            emb: Default::default(),
            den: Default::default(),
            scan: Default::default(),
            first: Default::default(),
            answer: Default::default(),
            confirm: Default::default(),
        })
    }

    /// Run `r` of every case; each xdpgate figure is followed at once by the no-op's.
    fn measure(&mut self, cfg: &Config, r: usize) -> Result<()> {
        let gate = self.bench.gate()?;
        let noop = self.bench.noop()?;

        let repeat = |what, packet: &[u8], want, figures: &mut (Vec<f64>, Vec<f64>)| {
            repeated(gate, noop, cfg.repeat, what, packet, want, figures)
        };
        // Established: every repeat is a hit in the established table.
        repeat("established flow", &self.established, XDP_PASS, &mut self.est)?;
        // Embryonic: every repeat misses the established table and hits the embryonic one.
        repeat("embryonic flow", &self.embryonic, XDP_PASS, &mut self.emb)?;
        // Denied: every repeat is classified, ending at the last bit; the port's class
        // leaves one word to scan, the service port's every word.
        repeat("first packet, denied", &self.denied, XDP_DROP, &mut self.den)?;
        repeat("denied at the service port", &self.scanned, XDP_DROP, &mut self.scan)?;

        // A handshake per flow, a client of its own per run and distinct source ports: all
        // the SYNs (first packets), then all the SYN-ACKs, then all the ACKs that confirm
        // the flows, each packet run once (cold).
        let family = self.family;
        let (src, dst) = (client(family, 1 + r as u16), server(family));
        let each = |from, to, flags, out: bool| -> Vec<Vec<u8>> {
            (0..cfg.distinct)
                .map(|i| {
                    let (sport, dport) =
                        if out { (10_000 + i, ALLOWED_PORT) } else { (ALLOWED_PORT, 10_000 + i) };
                    tcp_frame(family, from, to, sport, dport, flags)
                })
                .collect()
        };
        let syns = each(src, dst, TCP_SYN, true);
        once_each(gate, noop, "first packet, allowed", &syns, &mut self.first)?;
        // The answers come in from the servers' side.
        self.bench.arrive_as(Role::Internal)?;
        let answers = each(dst, src, TCP_SYN_ACK, false);
        let answered =
            once_each(gate, noop, "the answer's first packet", &answers, &mut self.answer);
        self.bench.arrive_as(Role::External)?;
        answered?;
        let acks = each(src, dst, TCP_ACK, true);
        once_each(gate, noop, "the confirming ACK", &acks, &mut self.confirm)
    }

    fn finish(self, cfg: &Config) -> Result<Vec<Row>> {
        // Sanity: the measured flows are still where their rows say; every handshake
        // confirmed its flow (both entries established), so each first packet was
        // classified and made its flow, and each answer found it; and the embryonic table
        // holds only the unanswered SYN's entry (one: a flow nothing rewrites has no reply
        // entry until confirmed).
        let tables = FlowTables::open(&self.bench)?;
        tables.expect("established flow", FlowState::Established, &[&self.established])?;
        tables.expect("embryonic flow", FlowState::Embryonic, &[&self.embryonic])?;
        let (flows, embryos) = tables.entries();
        let want = 2 * (cfg.runs * usize::from(cfg.distinct) + 1);
        if (flows, embryos) != (want, 1) {
            bail!(
                "{flows} established and {embryos} embryonic entries after the runs, want \
                 {want} and 1: some handshakes did not confirm their flow"
            );
        }
        let (rules, family) = (self.rules, self.family);
        let repeat = u64::from(cfg.repeat);
        let distinct = u64::from(cfg.distinct);
        Ok(vec![
            row(Case::Established, rules, family, repeat, self.est.0, self.est.1),
            row(Case::Embryonic, rules, family, repeat, self.emb.0, self.emb.1),
            row(Case::FirstAllowed, rules, family, distinct, self.first.0, self.first.1),
            row(Case::FirstAnswer, rules, family, distinct, self.answer.0, self.answer.1),
            row(Case::Confirming, rules, family, distinct, self.confirm.0, self.confirm.1),
            row(Case::FirstDenied, rules, family, repeat, self.den.0, self.den.1),
            row(Case::FirstDeniedScanned, rules, family, repeat, self.scan.0, self.scan.1),
        ])
    }
}

/// A source outside every rule's: only the `*` sources of the default rules match it.
fn stranger(family: Family) -> [u8; 16] {
    match family {
        Family::IPv4 => addr4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        Family::IPv6 => std::net::Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1).octets(),
    }
}

/// Runs `packet` `repeat` times through `gate` (it must end in `want`), then as often
/// through `noop`, and adds the ns per packet of each to `figures`.
fn repeated(
    gate: &Xdp,
    noop: &Xdp,
    repeat: u32,
    what: &str,
    packet: &[u8],
    want: u32,
    figures: &mut (Vec<f64>, Vec<f64>),
) -> Result<()> {
    let (v, ns) = run(gate, packet, repeat)?;
    expect_verdict(what, v, want)?;
    figures.0.push(ns);
    figures.1.push(run(noop, packet, repeat)?.1);
    Ok(())
}

/// Runs each of `packets` once through `gate`, then through `noop`, and adds the mean ns
/// per packet of each (the kernel's per-run figure, its timer overhead included) to
/// `figures`. Each must pass.
fn once_each(
    gate: &Xdp,
    noop: &Xdp,
    what: &str,
    packets: &[Vec<u8>],
    figures: &mut (Vec<f64>, Vec<f64>),
) -> Result<()> {
    let mut sum = 0.0;
    for p in packets {
        let (v, ns) = run(gate, p, 1)?;
        expect_verdict(what, v, XDP_PASS)?;
        sum += ns;
    }
    let mut sum_noop = 0.0;
    for p in packets {
        sum_noop += run(noop, p, 1)?.1;
    }
    let n = packets.len() as f64;
    figures.0.push(sum / n);
    figures.1.push(sum_noop / n);
    Ok(())
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
// Report

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### NSG dataplane cost (BPF_PROG_TEST_RUN)\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(
        md,
        "| case | rules | family | ns/packet | no-op ns/packet | ratio (xdpgate / no-op) |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|");
    for case in Case::ALL {
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
         *established flow*: an allowed TCP ACK segment of a flow established before by \
         its handshake (the client's SYN, the server's SYN-ACK, the client's ACK of it, which \
         moves the flow from the embryonic to the established table; checked), repeated \
         {rep} times (each is one hit in the established table). *embryonic flow*: the SYN of \
         an allowed flow no one answered, sent again {rep} times (each misses the \
         established table and hits the embryonic one: what a SYN retransmission or a \
         flood's repeated tuple costs; the flow is checked to stay embryonic). *first \
         packet, denied*: a packet to a port no rule names, so only DenyAllInBound (the \
         table's last rule) matches, repeated {rep} times (denied packets create no flow, so \
         each repeat is classified; the port's class has rules only in the bitmaps' last \
         word, so the scan reads that word alone). *first packet, denied at the service \
         port*: the allowed port from a source no rule allows (192.0.2.1, 2001:db8:3::1), \
         repeated the same way: the port's class has rules in every word, so the scan visits \
         them all (reading the source's and the port's bitmaps of each; the source's has no \
         rule before the last word). *first packet, allowed*: {dist} distinct \
         packets (distinct source ports), each run once and classified, creating its flow (its \
         one embryonic entry, in the new-flow stage; checked after the runs); the \
         kernel's per-run time (its timer overhead included) is averaged, and the no-op runs on \
         the same packets the same way. *the answer's first packet*: the server's SYN-ACK of \
         each of those flows, once each after them all, averaged the same way (each misses \
         both tables, finds its flow by the reversed key and is counted there). *the \
         confirming ACK*: the client's ACK of each, once each after all the SYN-ACKs, \
         averaged the same way (each confirms its flow: both entries into the established \
         table; checked after the runs). *rules*: inbound user rules that do not match the test \
         packets (other destination ports or other sources), the last being the allow rule for \
         them at priority 4096, plus the NSG's default rules. One NSG can use only 3,997 \
         priorities (100-4096), so at 4,000 rules 3 fillers sit in a second NSG on the other \
         half of the subnet, at the same layer and so in the same table (4,006 rules with both \
         NSGs' defaults). The bench thread is pinned to one CPU. The kernel reports \
         whole nanoseconds per run, rounded down: for the repeat-based cases each figure \
         carries up to 1 ns of that error into the ratio (about 12% of a no-op of 8 ns, 3% of \
         one of 30). Re-apply: the same \
         policy applied again, first clearing the equal policy left in the inactive slot.",
        runs = r.runs,
        rep = thousands(u64::from(r.repeat)),
        dist = thousands(u64::from(r.distinct_packets)),
    );
    md
}
