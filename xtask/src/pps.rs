//! `cargo xtask pps`: packets per second through a real veth path, xdpgate against a no-op
//! XDP program, with the same generator in the same run.
//!
//! ```text
//!   [gen ns] ppsgN ==veth==> ppsdN [dut ns]   program on ppsdN: xdp_noop | xdpgate
//!   xdpgate-pktgen (live frames, xdp_tx;       the DUT's stack drops what is passed
//!   --via packet: AF_PACKET)
//! ```
//!
//! The generator (`xdpgate-pktgen`, on CPU 0) sends 60-byte UDP frames of 256 flows from
//! 203.0.113.0/24 to 198.51.100.10:9, addressed to the DUT's MAC. Each round measures, in
//! turn:
//! - `xdp_noop` held by `xdpgate-pktgen sink`: XDP_PASS, so the DUT's stack takes every frame
//!   and drops it (the address is not the DUT's and it does not forward);
//! - xdpgate with an NSG that allows the traffic: established flows, XDP_PASS, the same stack
//!   drop after;
//! - xdpgate with an NSG that denies it: a denied packet creates no flow, so every one is
//!   classified, then dropped in XDP.
//!
//! What counts is what the DUT took in: the generator's TX counter on a veth is the number of
//! frames the peer's NAPI took from its ring (frames that found the ring full are counted as
//! dropped, and left out). Where the DUT's work runs:
//! - one CPU (always): the veth's NAPI runs in softirq on the generator's CPU right after
//!   each batch, so a figure is the cost of generator plus DUT, serialised;
//! - two CPUs (`--two-cpus`): threaded NAPI, its kthread pinned to CPU 1, the generator on
//!   CPU 0 offering more than the DUT can take.
//!
//! Writes `target/bench/pps.md`.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "pps", about = "Packets per second through veth: xdpgate against xdp_noop")]
struct Args {
    /// One short round: a smoke test of the benchmark, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Seconds each measurement sends for (default 3, 1 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Rounds, each measuring every case in turn; medians are reported (default 3, 1 with
    /// --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Also measure with the DUT's veth NAPI threaded and pinned to CPU 1, the generator on
    /// CPU 0 (see the limits in the report: on a 2-CPU VM this is not the cleaner figure).
    #[arg(long)]
    two_cpus: bool,
    /// How the generator sends (its `--via`): live frames, or an AF_PACKET socket, for a
    /// kernel that refuses live frames (slower: each frame an skb the veth copies again).
    #[arg(long, default_value = "live", value_parser = ["live", "packet"])]
    via: String,
}

/// Flows the generator cycles through.
const FLOWS: u32 = 256;
const DST: &str = "198.51.100.10";

const ALLOW: &str = "virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: pps
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-gen, priority: 100, direction: inbound, access: allow, protocol: udp, source: [203.0.113.0/24], destination: [\"*\"], destination_ports: [9]}
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Noop,
    Allow,
    Deny,
}

const CASES: [Case; 3] = [Case::Noop, Case::Allow, Case::Deny];

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Noop => "`xdp_noop` (baseline)",
            Case::Allow => "xdpgate, NSG allows (established flows)",
            Case::Deny => "xdpgate, NSG denies (each packet classified)",
        }
    }

    fn verdict(self) -> &'static str {
        match self {
            Case::Noop | Case::Allow => "pass: DUT stack drops it",
            Case::Deny => "drop in XDP",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Placement {
    OneCpu,
    TwoCpus,
}

/// One generator run, from its JSON report.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Frames the DUT took in per second.
    pps: f64,
    /// Frames the generator offered per second (taken in or dropped at a full ring).
    offered: f64,
    tx_dropped: f64,
}

pub fn pps(root: &Path, raw: &[String]) -> Result<()> {
    let args = Args::try_parse_from(std::iter::once("pps".to_string()).chain(raw.iter().cloned()))
        .map_err(|e| anyhow!("{e}"))?;
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 3.0 });
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    super::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "xdpgate",
        "-p",
        "xdpgate-pktgen",
    ]))?;
    let bins = Bins {
        xdpgate: root.join("target/release/xdpgate"),
        pktgen: root.join("target/release/xdpgate-pktgen"),
    };
    let out_dir = root.join("target/bench");
    fs::create_dir_all(&out_dir)?;
    let allow = out_dir.join("pps-allow.yaml");
    let deny = out_dir.join("pps-deny.yaml");
    fs::write(&allow, ALLOW)?;
    let denying = ALLOW.replace("allow-gen", "deny-gen").replace("access: allow", "access: deny");
    fs::write(&deny, denying)?;

    let machine = machine(cpus);
    let lab = Lab::new(bins, &args.via)?;
    let mut placements = vec![Placement::OneCpu];
    if args.two_cpus {
        if cpus < 2 {
            bail!("--two-cpus needs two CPUs");
        }
        placements.push(Placement::TwoCpus);
    }
    // samples[placement][case] over rounds
    let mut samples = vec![vec![Vec::new(); CASES.len()]; placements.len()];
    for round in 0..rounds {
        for (p, &placement) in placements.iter().enumerate() {
            // Alternate the order so a slow drift of the machine does not favour one case.
            let mut order: Vec<usize> = (0..CASES.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for c in order {
                let case = CASES[c];
                eprintln!("pps: round {}/{rounds}, {placement:?}, {case:?} ...", round + 1);
                let s = lab.measure(case, placement, seconds, &allow, &deny)?;
                eprintln!(
                    "pps:   {:.3} Mpps taken in, {:.3} Mpps offered",
                    s.pps / 1e6,
                    s.offered / 1e6
                );
                samples[p][c].push(s);
            }
        }
    }
    drop(lab);

    let md = markdown(&machine, &placements, &samples, seconds, rounds, &args.via);
    print!("{md}");
    let path = out_dir.join("pps.md");
    fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("pps: wrote {}", path.display());
    Ok(())
}

/// The release binaries the benchmark runs.
struct Bins {
    xdpgate: PathBuf,
    pktgen: PathBuf,
}

/// Two namespaces joined by a veth pair, a pin directory, and whatever is attached; all
/// removed on drop.
struct Lab {
    bins: Bins,
    /// The generator's `--via`.
    via: String,
    gen_ns: String,
    dut_ns: String,
    gen_if: String,
    dut_if: String,
    dut_mac: String,
    pins: String,
}

impl Lab {
    fn new(bins: Bins, via: &str) -> Result<Self> {
        let id = std::process::id() % 10_000;
        let lab = Self {
            bins,
            via: via.to_string(),
            gen_ns: format!("xgpps-gen{id}"),
            dut_ns: format!("xgpps-dut{id}"),
            gen_if: format!("ppsg{id}"),
            dut_if: format!("ppsd{id}"),
            dut_mac: String::new(),
            pins: format!("/sys/fs/bpf/xgpps{id}"),
        };
        // From here on, drop cleans up whatever was made.
        let mut lab = lab;
        for ns in [&lab.gen_ns, &lab.dut_ns] {
            sh("ip", &["netns", "add", ns])?;
            // No IPv6 autoconfiguration chatter in the counters; the DUT does not forward.
            for sysctl in [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
                "net.ipv4.ip_forward=0",
            ] {
                sh("ip", &["netns", "exec", ns, "sysctl", "-qw", sysctl])?;
            }
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let veth = format!(
            "link add {} netns {} type veth peer name {} netns {}",
            lab.gen_if, lab.gen_ns, lab.dut_if, lab.dut_ns
        );
        sh("ip", &veth.split_whitespace().collect::<Vec<_>>())?;
        sh("ip", &["-n", &lab.dut_ns, "addr", "add", "203.0.113.254/24", "dev", &lab.dut_if])?;
        for (ns, ifname) in [(&lab.gen_ns, &lab.gen_if), (&lab.dut_ns, &lab.dut_if)] {
            sh("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        let link = sh("ip", &["-n", &lab.dut_ns, "-o", "link", "show", &lab.dut_if])?;
        lab.dut_mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| anyhow!("no MAC address in: {link}"))?
            .to_string();
        Ok(lab)
    }

    fn xdpgate(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bins.xdpgate);
        cmd.args(["--pin-dir", &self.pins, "--netns", &self.dut_ns]).args(args);
        output(&mut cmd)
    }

    fn attached(&self) -> bool {
        sh("ip", &["-n", &self.dut_ns, "link", "show", &self.dut_if])
            .is_ok_and(|l| l.contains("prog/xdp"))
    }

    /// Attaches the case's program, measures one generator run, detaches.
    fn measure(
        &self,
        case: Case,
        placement: Placement,
        seconds: f64,
        allow: &Path,
        deny: &Path,
    ) -> Result<Sample> {
        let mut sink = None;
        match case {
            Case::Noop => {
                let child = Command::new(&self.bins.pktgen)
                    .args(["--netns", &self.dut_ns, "sink", "--iface", &self.dut_if])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawning xdpgate-pktgen sink")?;
                sink = Some(Sink(child));
                let deadline = Instant::now() + Duration::from_secs(10);
                while !self.attached() {
                    if Instant::now() > deadline {
                        bail!("the sink did not attach xdp_noop to {}", self.dut_if);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Case::Allow | Case::Deny => {
                self.xdpgate(&[
                    "attach",
                    "--hook",
                    "xdp",
                    "--iface",
                    &self.dut_if,
                    "--role",
                    "external",
                ])?;
                let policy = if case == Case::Allow { allow } else { deny };
                self.xdpgate(&["apply", &policy.to_string_lossy()])?;
            }
        }
        let result = self.placed(placement).and_then(|()| {
            // Warm up (and, for the allow policy, open the flows), then measure.
            self.generate(0.3)?;
            self.generate(seconds)
        });
        match sink.take() {
            Some(s) => drop(s),
            None => {
                self.xdpgate(&["detach", "--iface", &self.dut_if])?;
            }
        }
        result
    }

    /// Puts the DUT's NAPI where `placement` says (after an attach: a veth has NAPI only
    /// while an XDP program is attached, and a new attach brings a new NAPI thread).
    fn placed(&self, placement: Placement) -> Result<()> {
        let threaded = if placement == Placement::TwoCpus { "1" } else { "0" };
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.dut_ns,
                "sh",
                "-c",
                &format!("echo {threaded} > /sys/class/net/{}/threaded", self.dut_if),
            ],
        )?;
        if placement == Placement::TwoCpus {
            let prefix = format!("napi/{}-", self.dut_if);
            let mut pinned = 0;
            for entry in fs::read_dir("/proc")? {
                let path = entry?.path();
                let Ok(comm) = fs::read_to_string(path.join("comm")) else { continue };
                if comm.trim_end().starts_with(&prefix) {
                    let pid = path.file_name().unwrap().to_string_lossy().into_owned();
                    sh("taskset", &["-pc", "1", &pid])?;
                    pinned += 1;
                }
            }
            if pinned == 0 {
                bail!("no NAPI thread {prefix}* found to pin to CPU 1");
            }
        }
        Ok(())
    }

    fn generate(&self, seconds: f64) -> Result<Sample> {
        let args = format!(
            "--netns {} --iface {} --duration {seconds} --cpu 0 --dst-mac {} \
             --src 203.0.113.1-203.0.113.200 --sport 10000-10063 --flows {FLOWS} --dst {DST} \
             --dport 9 --via {} --json",
            self.gen_ns, self.gen_if, self.dut_mac, self.via
        );
        let json = output(Command::new(&self.bins.pktgen).args(args.split_whitespace()))?;
        let secs = number(&json, "seconds")?;
        Ok(Sample {
            pps: number(&json, "pps")?,
            offered: number(&json, "submitted")? / secs,
            tx_dropped: number(&json, "tx_dropped")?,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.xdpgate(&["detach", "--all"]);
        let _ = fs::remove_dir_all(&self.pins);
        // The dataplane crate's `state::dir` (xtask does not depend on it); the pin path has
        // no `_` or `%`, which that name would escape.
        let state =
            PathBuf::from("/run/xdpgate").join(self.pins.trim_matches('/').replace('/', "_"));
        let _ = fs::remove_dir_all(state);
        for ns in [&self.gen_ns, &self.dut_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A running `xdpgate-pktgen sink`: SIGINT on drop (it detaches and exits), then reaped.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command; its stdout, or an error with its output.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    output(Command::new(cmd).args(args))
}

/// The number after `"key":` in a flat JSON object (xtask has no JSON parser).
fn number(json: &str, key: &str) -> Result<f64> {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).ok_or_else(|| anyhow!("no {key} in {json}"))? + pat.len();
    let rest = json[at..].trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().with_context(|| format!("{key} in {json}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

struct Machine {
    kernel: String,
    cpu: String,
    cpus: usize,
    date: String,
    load_average: String,
}

fn machine(cpus: usize) -> Machine {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default().trim().to_string();
    Machine {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        cpus,
        date,
        load_average: read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn markdown(
    m: &Machine,
    placements: &[Placement],
    samples: &[Vec<Vec<Sample>>],
    seconds: f64,
    rounds: usize,
    via: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Packets per second through veth (`cargo xtask pps`)\n");
    let _ = writeln!(
        md,
        "Linux {}, {} ({} CPUs), {}, load average {} at the start.\n",
        m.kernel, m.cpu, m.cpus, m.date, m.load_average
    );
    for (p, placement) in placements.iter().enumerate() {
        let title = match placement {
            Placement::OneCpu => {
                "**One CPU**: generator and the DUT's XDP (veth NAPI in softirq) on CPU 0, \
                 serialised: each figure is the generator's cost plus the DUT's."
            }
            Placement::TwoCpus => {
                "**Two CPUs**: generator on CPU 0; the DUT's veth NAPI threaded, its kthread \
                 pinned to CPU 1. The generator offers more than the DUT takes; the excess is \
                 dropped at the veth ring and not counted."
            }
        };
        let _ = writeln!(md, "{title}\n");
        let _ = writeln!(
            md,
            "| program on the DUT's veth | verdict | Mpps taken in | ns/packet | \
             pps ratio (xdpgate / no-op) | ns/packet added to no-op | Mpps offered |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
        let noop = &samples[p][0];
        for (c, case) in CASES.iter().enumerate() {
            let runs = &samples[p][c];
            let pps = median(runs.iter().map(|s| s.pps).collect());
            let offered = median(runs.iter().map(|s| s.offered).collect());
            let (ratio, added) = if *case == Case::Noop {
                ("1.00".to_string(), "-".to_string())
            } else {
                // Per round, against the no-op measured in the same round.
                let ratio = median(runs.iter().zip(noop).map(|(s, n)| s.pps / n.pps).collect());
                let added =
                    median(runs.iter().zip(noop).map(|(s, n)| 1e9 / s.pps - 1e9 / n.pps).collect());
                (format!("{ratio:.2}"), format!("{added:+.0}"))
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {:.0} | {ratio} | {added} | {:.3} |",
                case.label(),
                case.verdict(),
                pps / 1e6,
                1e9 / pps,
                offered / 1e6
            );
        }
        let dropped: f64 = samples[p].iter().flatten().map(|s| s.tx_dropped).sum();
        if *placement == Placement::OneCpu && dropped > 0.0 {
            let _ = writeln!(md, "\n({dropped:.0} frames found the ring full in this placement.)");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "Method: `cargo xtask pps{}`. Generator: `xdpgate-pktgen` ({}) in its own network namespace, 60-byte UDP/IPv4 frames of {FLOWS} flows \
         (64 source ports x 4 addresses of 203.0.113.0/24) to {DST}:9, addressed to the DUT's \
         MAC, over a veth pair into the DUT's namespace. Each figure is the median of {rounds} \
         round(s) of {seconds} s (after 0.3 s of warm-up); each round measures every case in turn, \
         in alternating order, attaching the program afresh. *Mpps taken in*: the generator's \
         TX counter (on a veth, the frames the DUT's NAPI took from its ring) per second. \
         *ns/packet*: 1 / that rate, so in the one-CPU placement it includes the generator's \
         own cost, which is why the ratio understates the dataplane's relative cost; the \
         *added* ns/packet (per round, against that round's no-op) is the dataplane's own \
         cost on this path. The no-op passes every frame to the DUT's stack, which drops it \
         (not its address, no forwarding: IpInAddrErrors); xdpgate's allow case takes the \
         same path after its flow lookup, its deny case stops in XDP. The object has no \
         XDP_DROP program, so there is no drop baseline for the deny case: its ratio compares \
         a classification and drop in XDP with a pass through the stack.\n",
        if via == "live" { "" } else { " --via packet" },
        if via == "live" {
            "BPF_PROG_TEST_RUN live frames, `xdp_tx`"
        } else {
            "an AF_PACKET socket, 64 frames per `sendmmsg`, past the qdisc: each frame an skb, \
             which the veth copies into a page for the DUT's XDP, so the generator's share of \
             the one-CPU figures is larger than with live frames"
        },
    );
    let _ = writeln!(
        md,
        "Limits: a {}-CPU machine shared by the generator, the DUT and whatever else runs \
         (see the load average); figures vary by machine and load, so the ratios and added \
         costs are the claim, not the absolute rates. In the one-CPU placement generator and \
         DUT take turns on one CPU: the rates are those of the pair, never of the DUT alone. \
         A veth is not a NIC: frames are handed over by pointer, with no DMA and no driver \
         ring, and it has one receive queue, so the DUT's XDP gets one CPU at most whatever \
         the machine. Line-rate figures need NICs and kernel pktgen (see `vagrant/`).",
        m.cpus
    );
    if let Some(p) = placements.iter().position(|p| *p == Placement::TwoCpus) {
        let one = median(samples[0][0].iter().map(|s| s.pps).collect());
        let two = median(samples[p][0].iter().map(|s| s.pps).collect());
        let _ = writeln!(
            md,
            "\nThe two-CPU placement does not isolate the DUT cleanly on a small VM: the \
             generator sends each test run's frames at full speed, so the veth's 256-frame \
             ring overflows even when the average rate is below the DUT's capacity, the NAPI \
             kthread is an ordinary thread competing for CPU 1 with everything else, and each \
             wake-up crosses the hypervisor. Here the no-op took in {:.3} Mpps on its own CPU \
             against {:.3} Mpps sharing the generator's.",
            two / 1e6,
            one / 1e6
        );
    }
    md
}
