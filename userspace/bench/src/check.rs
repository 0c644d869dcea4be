//! `xdpgate check` of large and adversarial files: what an operator's `check`, `apply` and
//! the agent's reload spend loading and compiling a policy (`plan::load_checked`, what
//! `check` runs) or reading a node file. Each case is a file built here at a size where an
//! earlier build took seconds to minutes, or gigabytes, by comparing every pair of items;
//! its answer (loaded, or refused with the expected error) is checked, as a different one
//! would mean another path was measured.

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    common::{Config, Machine, Rows, median},
    memory::status_kib,
};

#[derive(Serialize)]
pub struct Row {
    pub case: &'static str,
    /// The file's size in bytes.
    pub bytes: usize,
    /// Median over the runs.
    pub seconds: f64,
    /// The process's peak resident memory while checking, over its resident memory before
    /// (VmHWM reset through /proc/self/clear_refs), largest of the runs.
    pub peak_growth_mib: f64,
    /// What `check` answered: `ok`, or the error expected.
    pub answer: String,
}

pub type Report = Rows<Row>;

/// A case: its name, the file (a policy, or a node file checked beside `POLICY`), and what
/// `check` must answer.
struct Case {
    name: &'static str,
    node: bool,
    text: String,
    /// What its refusal must say; `None`: it loads.
    error: Option<&'static str>,
}

/// The policy a node file is checked with.
const POLICY: &str = "virtual_network: {address_space: [10.0.0.0/8]}\n";

fn cases(scale: usize) -> Vec<Case> {
    let n = |full: usize| full / scale;
    let policy = |text: String| (false, text);
    let node = |text: String| (true, text);
    [
        (
            "100,000 subnets in two NSGs, each of the second in one of the first",
            policy(subnets_in_two_nsgs(n(100_000))),
            Some("overlaps subnet"),
        ),
        (
            "3,990 rules to * over 60,000 subnets",
            policy(rules_over_subnets(n(60_000), n(3_990), "'*'")),
            None,
        ),
        (
            "3,990 rules to [*, an address in a subnet] over 60,000 subnets",
            policy(rules_over_subnets(n(60_000), n(3_990), "['0.0.0.0/0', '::/0', 10.0.0.9]")),
            None,
        ),
        (
            "3,990 rules to a /9 over 60,000 subnets (half of them)",
            policy(rules_over_subnets(n(60_000), n(3_990), "10.0.0.0/9")),
            None,
        ),
        (
            "500 rules to VirtualNetwork over 20,000 subnets",
            policy(rules_over_subnets(n(20_000), n(500), "VirtualNetwork")),
            None,
        ),
        (
            "3,990 one-address rules over 60,000 subnets",
            policy(rules_over_subnets(n(60_000), n(3_990), ONE_ADDRESS)),
            None,
        ),
        (
            "20,000 unknown names among 20,000 groups",
            policy(unknown_names(n(20_000))),
            Some("unknown service tag or application security group"),
        ),
        (
            "20,000 LB rules over a 65,000-backend pool",
            policy(lb_rules(n(20_000).max(200), n(65_000))),
            Some("load-balancing and inbound NAT rules"),
        ),
        (
            "a virtual network of 100,000 prefixes under 300 NSGs",
            policy(large_virtual_network(n(100_000), n(300))),
            Some("virtual-network prefixes; a policy may use at most"),
        ),
        (
            "NAT: 40,000 /28 public prefixes, 40,000 address-space prefixes",
            policy(nat_public(n(40_000), n(40_000))),
            Some("a NAT gateway has at most 16"),
        ),
        (
            "NAT: 300,000 /28 public prefixes",
            policy(nat_public(1, n(300_000))),
            Some("a NAT gateway has at most 16"),
        ),
        (
            "NAT: 40,000 IPv6 subnets, 40,000 IPv4 public addresses",
            policy(nat_families(n(40_000))),
            Some("but the gateway has no IPv6 public address"),
        ),
        ("node file: 200,000 BGP peers", node(bgp_peers(n(200_000))), None),
    ]
    .into_iter()
    .map(|(name, (node, text), error)| Case { name, node, text, error })
    .collect()
}

/// The `i`th address of 10.0.0.0/8 in steps of `2^shift` addresses.
fn ten(i: usize, shift: u32) -> String {
    std::net::Ipv4Addr::from(0x0a00_0000 | ((i as u32) << shift)).to_string()
}

fn subnets_in_two_nsgs(count: usize) -> String {
    let mut s = String::from("virtual_network: {address_space: [10.0.0.0/8]}\nnsgs:\n");
    for (nsg, length) in [("a", 24), ("b", 25)] {
        let _ = writeln!(s, "  - name: {nsg}\n    subnets:");
        for i in 0..count / 2 {
            let _ = writeln!(s, "      - {}/{length}", ten(i, 8));
        }
    }
    s
}

/// [`rules_over_subnets`]: each rule's destination one address of a subnet of its own.
const ONE_ADDRESS: &str = "";

/// One NSG of `subnets` /24s with `rules` inbound rules whose destination is `local` (or
/// [`ONE_ADDRESS`]).
fn rules_over_subnets(subnets: usize, rules: usize, local: &str) -> String {
    let mut s = String::from("virtual_network: {address_space: [10.0.0.0/8]}\nnsgs:\n");
    s.push_str("  - name: n\n    subnets:\n");
    for i in 0..subnets {
        let _ = writeln!(s, "      - {}/24", ten(i, 8));
    }
    s.push_str("    rules:\n");
    for i in 0..rules {
        let destination = match local {
            ONE_ADDRESS => ten((i * subnets / rules) << 8 | 9, 0),
            other => other.to_owned(),
        };
        let _ = writeln!(
            s,
            "      - {{name: r{i}, priority: {}, direction: inbound, access: allow, protocol: \
             tcp, source: 192.0.2.{}, destination: {destination}, destination_ports: {}}}",
            100 + i,
            i % 256,
            1000 + i
        );
    }
    s
}

fn unknown_names(count: usize) -> String {
    let mut s = String::from(
        "virtual_network: {address_space: [10.0.0.0/8]}\napplication_security_groups:\n",
    );
    for i in 0..count {
        let _ = writeln!(s, "  group-{i:05}: [{}]", ten(i, 0));
    }
    s.push_str("nsgs:\n  - name: n\n    subnets: [10.0.0.0/16]\n    rules:\n");
    s.push_str(
        "      - {name: r, priority: 100, direction: inbound, access: allow, protocol: tcp, \
         destination: '*', source: [",
    );
    let typos: Vec<String> = (0..count).map(|i| format!("grop-{i:05}")).collect();
    s.push_str(&typos.join(", "));
    s.push_str("]}\n");
    s
}

fn lb_rules(rules: usize, backends: usize) -> String {
    let mut s = String::from(
        "virtual_network: {address_space: [10.0.0.0/8]}\nload_balancers:\n  - name: lb\n    \
         frontends: [{name: f, address: 192.0.2.10}]\n    backend_pools:\n      - name: p\n        \
         backends:\n",
    );
    for i in 0..backends {
        let _ = writeln!(s, "          - {}", ten(i + 1, 0));
    }
    s.push_str("    rules:\n");
    for i in 0..rules {
        let _ = writeln!(
            s,
            "      - {{name: r{i}, frontend: f, protocol: tcp, frontend_port: {}, backend_pool: p}}",
            1 + i
        );
    }
    s
}

/// An address space of `prefixes` /32s, each of the first `nsgs` an NSG's subnet.
fn large_virtual_network(prefixes: usize, nsgs: usize) -> String {
    let mut s = String::from("virtual_network:\n  address_space:\n");
    for i in 0..prefixes {
        let _ = writeln!(s, "    - {}/32", ten(i, 0));
    }
    s.push_str("nsgs:\n");
    for i in 0..nsgs {
        let _ = writeln!(s, "  - {{name: n{i}, subnets: [{}/32]}}", ten(i, 0));
    }
    s
}

/// A NAT gateway of `publics` /28s in an address space of `space` /32s.
fn nat_public(space: usize, publics: usize) -> String {
    let mut s = String::from("virtual_network:\n  address_space:\n");
    for i in 0..space {
        let _ = writeln!(s, "    - {}/32", ten(i, 0));
    }
    s.push_str("nat_gateways:\n  - name: g\n    subnets: [10.0.0.0/32]\n    public_addresses:\n");
    for i in 0..publics {
        let public = std::net::Ipv4Addr::from(0xcb00_0000 | ((i as u32) << 4));
        let _ = writeln!(s, "      - {public}/28");
    }
    s
}

fn nat_families(count: usize) -> String {
    let mut s = String::from(
        "virtual_network: {address_space: [10.0.0.0/8, '2001:db8::/32']}\nnat_gateways:\n  - \
         name: g\n    public_addresses:\n",
    );
    for i in 0..count {
        let public = std::net::Ipv4Addr::from(0xc612_0000 | i as u32);
        let _ = writeln!(s, "      - {public}");
    }
    s.push_str("    subnets:\n");
    for i in 0..count {
        let _ = writeln!(s, "      - '2001:db8:{i:x}::/48'");
    }
    s
}

fn bgp_peers(count: usize) -> String {
    let mut s = String::from(
        "interfaces: [{name: eth0, role: external}]\nbgp:\n  router_id: 203.0.113.2\n  \
         local_as: 65001\n  peers:\n",
    );
    for i in 0..count {
        let _ =
            writeln!(s, "    - {{address: '2001:db8::{:x}:{:x}', as: 65000}}", i >> 16, i & 0xffff);
    }
    s
}

/// `check` of `case` once: seconds, peak growth in KiB, and the answer.
fn check_once(case: &Case, dir: &Path) -> Result<(f64, u64, String)> {
    let policy = dir.join("policy.yaml");
    let node = dir.join("node.yaml");
    if case.node {
        fs::write(&policy, POLICY)?;
        fs::write(&node, &case.text)?;
    } else {
        fs::write(&policy, &case.text)?;
    }
    // What earlier cases freed goes back to the system, so that their pages do not hide
    // this one's growth.
    // SAFETY: glibc's malloc_trim takes no pointers.
    unsafe { libc::malloc_trim(0) };
    fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let answer = if case.node {
        xdpgate::node::load(&node).map(|_| ())
    } else {
        xdpgate::plan::load_checked(&policy, &Default::default()).map(|_| ())
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:").saturating_sub(before);
    let answer = match (answer, case.error) {
        (Ok(()), None) => "ok".to_owned(),
        (Err(e), Some(want)) if format!("{e:#}").contains(want) => {
            format!("refused: …{want}…")
        }
        (got, _) => {
            bail!("{}: unexpected answer: {:?}", case.name, got.map_err(|e| format!("{e:#}")))
        }
    };
    Ok((seconds, peak, answer))
}

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    let dir = std::env::temp_dir().join(format!("xdpgate-bench-check-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for case in cases(if cfg.quick { 10 } else { 1 }) {
            let mut seconds = Vec::new();
            let (mut peak, mut answer) = (0, String::new());
            for _ in 0..cfg.runs {
                let (s, p, a) = check_once(&case, &dir)?;
                seconds.push(s);
                peak = peak.max(p);
                answer = a;
            }
            let row = Row {
                case: case.name,
                bytes: case.text.len(),
                seconds: median(&seconds),
                peak_growth_mib: peak as f64 / 1024.0,
                answer,
            };
            eprintln!("  {}: {:.2} s, {:.0} MiB", row.case, row.seconds, row.peak_growth_mib);
            rows.push(row);
        }
        Ok(rows)
    })();
    let _ = fs::remove_dir_all(&dir);
    Ok(Report { machine: machine.clone(), quick: cfg.quick, runs: cfg.runs, rows: result? })
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::from("### `xdpgate check` of large and adversarial files\n\n");
    md.push_str(&r.machine.header_without_ratios(r.quick));
    md.push_str("| case | file | seconds | peak growth | answer |\n|---|---:|---:|---:|---|\n");
    for row in &r.rows {
        let _ = writeln!(
            md,
            "| {} | {:.1} MB | {:.2} | {:.0} MiB | {} |",
            row.case,
            row.bytes as f64 / 1e6,
            row.seconds,
            row.peak_growth_mib,
            row.answer
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: each file is built by the bench{}. The time is `plan::load_checked` (what \
         `check` runs: load and compile; `node::load` for the node file, beside a one-line \
         policy) in the bench's process, the median of {} runs; memory is the peak resident \
         growth while checking (VmHWM reset before, freed memory returned first with \
         `malloc_trim`), the largest of the runs: in a process that checked the cases before, \
         it can be above what a fresh `xdpgate check` of the file peaks at. The answer is \
         checked (loaded, or refused with the expected error); that it took the fast way \
         only the time shows.",
        if r.quick { ", at a tenth of the size each name gives (quick)" } else { "" },
        r.runs,
    );
    md
}
