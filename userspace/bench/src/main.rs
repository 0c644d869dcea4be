//! `cargo xtask bench`: the cost of the xdpgate dataplane, measured in the kernel with
//! `BPF_PROG_TEST_RUN` and always reported as a ratio to a no-op XDP program run in the same
//! process on the same packets; the agent's table work; memory; and peers on the same
//! traffic.
//!
//! Sections (each writes `target/bench/<section>.md` and `.json`; all of them together
//! `target/bench/README.md` and the chart `target/bench/ratios.svg`):
//! - `nsg`: NSG established/embryonic/first-packet cases at 10-4,000 rules, IPv4 and IPv6,
//!   and the time to compile and apply a policy of 4,000 rules;
//! - `lb`: load balancer, first packet and established flows with 2/16/256 backends, and
//!   the Maglev table swap after a probe failure;
//! - `nat`: NAT gateway, first packet (port claim) and established translated flows;
//! - `memory`: every map at its configured size, the flow table at 1M flows, the agent's
//!   resident memory with 4,096 rules and 256 backends;
//! - `events`: the first packet of a new flow with the flow-event ring read as the agent
//!   reads it (on another CPU, on the same one), with nobody reading but room, and full;
//! - `forward`: LB and NAT established flows with forwarding on (XDP_REDIRECT, MACs
//!   rewritten) beside an NSG-only flow;
//! - `flows`: the established path with 1,000, 100,000 and 1,000,000 live flows, cold;
//! - `flowlog`: the agent's loop writing a walk's flow-log lines, to a file and a full disk;
//! - `check`: `xdpgate check` of large and adversarial policy and node files;
//! - `peers`: nftables (linear chain and verdict map), no filter and xdpgate in packets per
//!   second through a real veth path, and xdp-filter's per-packet cost against the no-op;
//! - `throughput`: TCP throughput (iperf3) and CPU per gigabyte through a veth gateway for
//!   kernel forwarding, nftables (filter, SNAT, DNAT) and xdpgate (filter, NAT, LB).
//!
//! A benchmark, not a test: nothing is asserted about speed. Verdicts, rewritten packets,
//! flow states (an "established" flow must be in the established table, after a full TCP
//! handshake) and table counts are checked, as a wrong one would mean the wrong path was
//! measured.

mod check;
mod common;
mod events;
mod flowlog;
mod flows;
mod forward;
mod latency;
mod lb;
mod memory;
mod nat;
mod nsg;
mod peers;
mod report;
mod throughput;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::common::{Config, Machine};

#[derive(Parser)]
#[command(about = "Benchmark the xdpgate dataplane against a no-op XDP program and its peers")]
struct Args {
    /// Small repeat counts and short traffic: a smoke test of the benchmark, not a
    /// measurement.
    #[arg(long)]
    quick: bool,
    /// Measurements per figure (the median is reported); default 7, 3 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Where to write the reports (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only these sections (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Internal: measure the agent's resident memory in this fresh process, print JSON.
    #[arg(long, hide = true)]
    memory_probe: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Nsg,
    Lb,
    Nat,
    Memory,
    Peers,
    Events,
    Forward,
    Flows,
    Flowlog,
    Check,
    Throughput,
}

/// What one invocation measured, section by section.
#[derive(Default)]
pub struct Results {
    pub nsg: Option<nsg::Report>,
    pub lb: Option<lb::Report>,
    pub nat: Option<nat::Report>,
    pub memory: Option<memory::Report>,
    pub peers: Option<peers::Report>,
    pub events: Option<events::Report>,
    pub forward: Option<forward::Report>,
    pub flows: Option<flows::Report>,
    pub flowlog: Option<flowlog::Report>,
    pub check: Option<check::Report>,
    pub throughput: Option<throughput::Report>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.memory_probe {
        return memory::probe();
    }
    let cfg = Config::new(args.quick, args.runs);
    if cfg.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let out = args.out.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("workspace root")
            .join("target/bench")
    });
    let cpu = common::pin_to_current_cpu();
    let machine = Machine::detect();
    eprintln!(
        "xdpgate-bench: kernel {}, {}, {} runs per figure, repeat {}, {} distinct packets{}",
        machine.kernel,
        machine.cpu,
        cfg.runs,
        cfg.repeat,
        cfg.distinct,
        cpu.map(|c| format!(", pinned to CPU {c}")).unwrap_or_default()
    );
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let sections = Sections {
        out: &out,
        only: &args.only,
        libxdp_before: Path::new(peers::LIBXDP_DIR).exists(),
    };
    let started = Instant::now();
    let results = Results {
        nsg: sections.run(Section::Nsg, "NSG", || nsg::measure(&cfg, &machine), nsg::markdown)?,
        lb: sections.run(
            Section::Lb,
            "load balancer",
            || lb::measure(&cfg, &machine),
            lb::markdown,
        )?,
        nat: sections.run(
            Section::Nat,
            "NAT gateway",
            || nat::measure(&cfg, &machine),
            nat::markdown,
        )?,
        memory: sections.run(
            Section::Memory,
            "memory",
            || memory::measure(cfg.quick, &machine),
            memory::markdown,
        )?,
        peers: sections.run(
            Section::Peers,
            "peers",
            || peers::measure(&cfg, &machine, cpu),
            peers::markdown,
        )?,
        events: sections.run(
            Section::Events,
            "first packets and the event reader",
            || events::measure(&cfg, &machine),
            events::markdown,
        )?,
        forward: sections.run(
            Section::Forward,
            "established flows with forwarding on",
            || forward::measure(&cfg, &machine),
            forward::markdown,
        )?,
        flows: sections.run(
            Section::Flows,
            "established flows with many flows live",
            || flows::measure(&cfg, &machine),
            flows::markdown,
        )?,
        flowlog: sections.run(
            Section::Flowlog,
            "flow-log lines on the agent's loop",
            || flowlog::measure(&cfg, &machine),
            flowlog::markdown,
        )?,
        check: sections.run(
            Section::Check,
            "check of large and adversarial files",
            || check::measure(&cfg, &machine),
            check::markdown,
        )?,
        throughput: sections.run(
            Section::Throughput,
            "TCP throughput through a veth gateway",
            || throughput::measure(&cfg, &machine),
            throughput::markdown,
        )?,
    };
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("xdpgate-bench: done in {elapsed:.0} s");

    let svg = report::svg(&results);
    fs::write(out.join("ratios.svg"), svg).context("writing ratios.svg")?;
    let readme = report::readme(&results, &machine, &cfg, elapsed);
    fs::write(out.join("README.md"), &readme).context("writing README.md")?;
    print!("{readme}");
    eprintln!("wrote {}/{{README.md, ratios.svg, <section>.md, <section>.json}}", out.display());
    Ok(())
}

/// The sections asked for, where their reports go, and whether libxdp's directory was
/// there before the run.
struct Sections<'a> {
    out: &'a Path,
    only: &'a [Section],
    libxdp_before: bool,
}

impl Sections<'_> {
    /// Runs `section` when asked for: measures it, writes its reports and fails when it left
    /// anything behind.
    fn run<R: Serialize>(
        &self,
        section: Section,
        what: &str,
        measure: impl FnOnce() -> Result<R>,
        markdown: fn(&R) -> String,
    ) -> Result<Option<R>> {
        if !self.only.is_empty() && !self.only.contains(&section) {
            return Ok(None);
        }
        eprintln!("{what} ...");
        let report = measure()?;
        let name = section.to_possible_value().expect("no section is skipped");
        write(self.out, name.get_name(), &markdown(&report), &report)?;
        left_nothing(self.libxdp_before, name.get_name())?;
        Ok(Some(report))
    }
}

/// Fails when `section` left a dataplane of its own behind (pins or state directory), or
/// libxdp's directory that was not there before the run (`libxdp_before`).
fn left_nothing(libxdp_before: bool, section: &str) -> Result<()> {
    let mut left = common::leftovers();
    if !libxdp_before && Path::new(peers::LIBXDP_DIR).exists() {
        left.push(peers::LIBXDP_DIR.into());
    }
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        bail!("the {section} section left behind: {}", list.join(", "));
    }
    Ok(())
}

/// Writes `<name>.md` and `<name>.json`.
fn write(out: &Path, name: &str, md: &str, report: &impl Serialize) -> Result<()> {
    fs::write(out.join(format!("{name}.md")), md).with_context(|| format!("writing {name}.md"))?;
    fs::write(out.join(format!("{name}.json")), serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {name}.json"))?;
    Ok(())
}
