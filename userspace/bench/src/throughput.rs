//! TCP throughput and CPU per gigabyte through a veth gateway, for each dataplane, in the
//! same run: iperf3 (4 streams) from one namespace to another through a gateway namespace
//! that forwards with the kernel alone, with nftables (filter, SNAT, DNAT to 3 backends) or
//! with xdpgate (NSG filter, NAT gateway, load balancer; attached and configured with the
//! real CLI, at XDP and at tc ingress with `--hook tc`). Several rounds, the case order alternating; every figure is also given as a
//! ratio to plain forwarding in the same direction in the same round.
//!
//! ```text
//!   [inet] 203.0.113.10 -- i0 | g0 [gateway] g1 | l0 -- [lan] 198.51.100.10-13
//!                      203.0.113.1           198.51.100.1
//!   load-balanced frontend 192.0.2.10:443 (backends .11-.13), NAT public address 192.0.2.100
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use xdpgate_dataplane::PinDir;

use crate::{
    common::{
        ALLOWED_PORT, Config, Family, Machine, median, remove_dataplane, thousands, unique_pin_dir,
    },
    nsg,
    peers::{Ns, ip_exec, nft_flush, nft_load, nft_ruleset, nsenter, sh, which, with_netns},
};

const INET_CLIENT: &str = "203.0.113.10";
const LAN_HOST: &str = "198.51.100.10";
const BACKENDS: [&str; 3] = ["198.51.100.11", "198.51.100.12", "198.51.100.13"];
const FRONTEND: &str = "192.0.2.10";
const NAT_PUBLIC: &str = "192.0.2.100";
/// The gateway's address on the inet side: what nftables' masquerade uses.
const GW_INET: &str = "203.0.113.1";
const STREAMS: usize = 4;

/// Which way the TCP connections (and the data) go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// The iperf3 client in `inet`, the server in `lan`.
    Inbound,
    /// The iperf3 client in `lan`, the server in `inet`.
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Plain,
    NftFilter,
    NftSnat,
    NftDnat,
    XdpgateFilter,
    XdpgateNat,
    XdpgateLb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Case {
    pub kind: Kind,
    pub dir: Dir,
    /// User rules of the filter cases (0 otherwise).
    pub rules: usize,
    /// Checksum offload and TSO left on at the endpoints (the veth default), in a topology
    /// of its own; otherwise off.
    pub offload: bool,
    /// xdpgate attached at tc ingress (`--hook tc`) rather than XDP.
    pub tc: bool,
}

impl Case {
    pub fn label(&self) -> String {
        let n = thousands(self.rules as u64);
        let label: String = match self.kind {
            Kind::Plain => match self.dir {
                Dir::Inbound => "kernel forwarding, inet → lan".into(),
                Dir::Outbound => "kernel forwarding, lan → inet".into(),
            },
            Kind::NftFilter => format!("nftables filter, {n} rules, established first"),
            Kind::NftSnat => "nftables SNAT (masquerade)".into(),
            Kind::NftDnat => "nftables DNAT to 3 backends (numgen map)".into(),
            Kind::XdpgateFilter => format!("xdpgate NSG filter, {n} rules"),
            Kind::XdpgateNat => "xdpgate NAT gateway (SNAT)".into(),
            Kind::XdpgateLb => "xdpgate load balancer, 3 backends".into(),
        };
        let label = if self.tc { label.replacen("xdpgate", "xdpgate tc", 1) } else { label };
        if self.offload { format!("{label}; TSO on") } else { label }
    }

    /// (client namespace is inet, destination address).
    fn target(&self) -> &'static str {
        match (self.kind, self.dir) {
            (Kind::NftDnat | Kind::XdpgateLb, _) => FRONTEND,
            (_, Dir::Inbound) => LAN_HOST,
            (_, Dir::Outbound) => INET_CLIENT,
        }
    }

    /// Where the server sees its connections come from.
    fn expected_remote(&self) -> &'static str {
        match self.kind {
            Kind::NftSnat => GW_INET,
            Kind::XdpgateNat => NAT_PUBLIC,
            _ if self.dir == Dir::Inbound => INET_CLIENT,
            _ => LAN_HOST,
        }
    }

    /// The addresses the server may see its connections arrive at.
    fn expected_local(&self) -> &'static [&'static str] {
        match (self.kind, self.dir) {
            (Kind::NftDnat | Kind::XdpgateLb, _) => &BACKENDS,
            (_, Dir::Inbound) => &[LAN_HOST],
            (_, Dir::Outbound) => &[INET_CLIENT],
        }
    }
}

/// One iperf3 run of one case.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub round: usize,
    pub gbps: f64,
    pub bytes: u64,
    pub retransmits: u64,
    /// CPU seconds over the run: softirq + irq of all CPUs (from /proc/stat), and the
    /// iperf3 client's and server's own (user + system, from their rusage).
    pub softirq_s: f64,
    pub endpoints_s: f64,
    pub wall_s: f64,
    /// The data connections as the server saw them: its local address per connection.
    pub server_local: Vec<String>,
    /// What showed the path was exercised (nftables counters, xdpgate counters).
    pub evidence: String,
}

#[derive(Serialize)]
pub struct Row {
    pub case: Case,
    pub label: String,
    pub samples: Vec<Sample>,
    /// Medians over the rounds.
    pub gbps: f64,
    /// Median of per-round ratios to plain forwarding in the same direction.
    pub ratio: f64,
    pub retransmits: f64,
    /// CPU seconds per gigabyte (10⁹ bytes received by the server): softirq + irq, the
    /// iperf3 processes'; and the softirq + irq figure's excess over plain forwarding's in
    /// the same round (median of per-round differences).
    pub softirq_s_per_gb: f64,
    pub endpoints_s_per_gb: f64,
    pub softirq_s_per_gb_over_plain: f64,
    /// Connections per backend over all rounds (load-balancing cases).
    pub per_backend: Vec<(String, usize)>,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub secs: u32,
    pub rounds: usize,
    pub streams: usize,
    pub rows: Vec<Row>,
    pub skipped: Vec<String>,
    /// Problems seen in checks that do not void a figure (e.g. a backend that got no
    /// connection by chance in a short run).
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Topology

struct Topology {
    inet: Ns,
    gw: Ns,
    lan: Ns,
    g0: String,
    g1: String,
}

impl Topology {
    fn new(offload: bool) -> Result<Self> {
        let (inet, gw, lan) = (Ns::new("xgti")?, Ns::new("xgtg")?, Ns::new("xgtl")?);
        let tag = format!("{}{}", std::process::id() % 100_000, if offload { "o" } else { "" });
        let (i0, g0, g1, l0) = (
            format!("xt{tag}i0"),
            format!("xt{tag}g0"),
            format!("xt{tag}g1"),
            format!("xt{tag}l0"),
        );
        for (a, an, b, bn) in [(&i0, &inet, &g0, &gw), (&g1, &gw, &l0, &lan)] {
            sh(
                "ip",
                &[
                    "link", "add", a, "netns", &an.0, "type", "veth", "peer", "name", b, "netns",
                    &bn.0,
                ],
            )?;
        }
        let addr =
            |ns: &Ns, a: &str, dev: &str| sh("ip", &["-n", &ns.0, "addr", "add", a, "dev", dev]);
        addr(&inet, &format!("{INET_CLIENT}/24"), &i0)?;
        addr(&gw, &format!("{GW_INET}/24"), &g0)?;
        addr(&gw, "198.51.100.1/24", &g1)?;
        addr(&lan, &format!("{LAN_HOST}/24"), &l0)?;
        for b in BACKENDS {
            addr(&lan, &format!("{b}/24"), &l0)?;
        }
        for (ns, dev) in [(&inet, &i0), (&gw, &g0), (&gw, &g1), (&lan, &l0)] {
            sh("ip", &["-n", &ns.0, "link", "set", dev, "up"])?;
            // GRO on every veth end, as a gateway would run (it also gives each veth the
            // NAPI instance XDP redirects into). Checksum offload off at the endpoints:
            // xdpgate rewrites and redirects frames in XDP, where a partial checksum would
            // stay unfinished; the same for every case.
            let endpoint = !offload && (dev == &i0 || dev == &l0);
            let mut args = vec!["-K", dev.as_str(), "gro", "on"];
            if endpoint {
                args.extend(["tx", "off"]);
            }
            ip_exec(&ns.0, "ethtool", &args)?;
        }
        sh("ip", &["-n", &inet.0, "route", "add", "default", "via", GW_INET])?;
        sh("ip", &["-n", &lan.0, "route", "add", "default", "via", "198.51.100.1"])?;
        for s in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"] {
            ip_exec(&gw.0, "sysctl", &["-qw", s])?;
        }
        Ok(Self { inet, gw, lan, g0, g1 })
    }

    fn ns(&self, dir: Dir, client: bool) -> &str {
        match (dir, client) {
            (Dir::Inbound, true) | (Dir::Outbound, false) => &self.inet.0,
            _ => &self.lan.0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// iperf3, CPU accounting

/// Spawns `cmd` in namespace `ns` on every CPU (the benchmark pins itself to one, and a
/// child would inherit that).
fn spawn_in(ns: &str, args: &[&str]) -> Result<Child> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only sched_setaffinity (a syscall) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in 0..libc::CPU_SETSIZE as usize {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {}", args.join(" ")))
}

/// Whether a TCP socket listens on `port` in namespace `ns` (IPv4 or dual-stack IPv6).
fn listening(ns: &str, port: u16) -> Result<bool> {
    let needle = format!(":{port:04X} ");
    with_netns(ns, || {
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let text = fs::read_to_string(f).unwrap_or_default();
            if text.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
            }) {
                return Ok(true);
            }
        }
        Ok(false)
    })
}

/// (softirq + irq CPU seconds of all CPUs, user + system seconds of the children waited
/// for) so far.
fn cpu_seconds() -> Result<(f64, f64)> {
    let text = fs::read_to_string("/proc/stat")?;
    let line = text.lines().next().ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 7 {
        bail!("unexpected /proc/stat: {line}");
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: getrusage fills the zeroed struct owned here.
    let children = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        let t = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    };
    Ok(((f[5] + f[6]) as f64 / hz, children))
}

/// Runs one iperf3 test of `case`: a one-off server, the client with 4 streams for `secs`.
fn iperf(topo: &Topology, case: Case, secs: u32, round: usize) -> Result<Sample> {
    let port = ALLOWED_PORT.to_string();
    let server_ns = topo.ns(case.dir, false);
    let mut server = spawn_in(server_ns, &["iperf3", "-s", "-1", "-J", "-p", &port])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !listening(server_ns, ALLOWED_PORT)? {
        if Instant::now() > deadline || server.try_wait()?.is_some() {
            let _ = server.kill();
            bail!("the iperf3 server did not start listening");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs_arg = secs.to_string();
    let streams = STREAMS.to_string();
    let mut args = vec!["iperf3", "-c", case.target(), "-p", &port, "-P", &streams];
    args.extend(["-t", &secs_arg, "-J", "--connect-timeout", "3000"]);
    if case.dir == Dir::Outbound {
        args.extend(["-B", LAN_HOST]);
    }
    let (s0, c0) = cpu_seconds()?;
    let t0 = Instant::now();
    let client = spawn_in(topo.ns(case.dir, true), &args)?.wait_with_output()?;
    let wall_s = t0.elapsed().as_secs_f64();
    let s1 = cpu_seconds()?.0;
    // The one-off server exits after its test; a failed client may leave it waiting.
    let server_deadline = Instant::now() + Duration::from_secs(5);
    while server.try_wait()?.is_none() {
        if Instant::now() > server_deadline {
            let _ = server.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let server = server.wait_with_output()?;
    // Both iperf3 processes have been waited for: their CPU time is in the children's.
    let c1 = cpu_seconds()?.1;
    let c: serde_json::Value = serde_json::from_slice(&client.stdout).with_context(|| {
        format!("iperf3 client output: {}", String::from_utf8_lossy(&client.stderr))
    })?;
    if let Some(e) = c["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let received = &c["end"]["sum_received"];
    let bytes = received["bytes"].as_u64().ok_or_else(|| anyhow!("iperf3: no bytes received"))?;
    let gbps = received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    let retransmits = c["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let s: serde_json::Value =
        serde_json::from_slice(&server.stdout).context("iperf3 server output")?;
    let conns = s["start"]["connected"].as_array().cloned().unwrap_or_default();
    if conns.len() != STREAMS {
        bail!("the server saw {} data connections, not {STREAMS}", conns.len());
    }
    let mut server_local = Vec::new();
    for x in &conns {
        let local = x["local_host"].as_str().unwrap_or("?").trim_start_matches("::ffff:");
        let remote = x["remote_host"].as_str().unwrap_or("?").trim_start_matches("::ffff:");
        if !case.expected_local().contains(&local) || remote != case.expected_remote() {
            bail!(
                "a connection reached the server at {local} from {remote}, not at {:?} from {}: \
                 not the intended path",
                case.expected_local(),
                case.expected_remote()
            );
        }
        server_local.push(local.to_string());
    }
    if bytes == 0 {
        bail!("iperf3 moved no data");
    }
    Ok(Sample {
        round,
        gbps,
        bytes,
        retransmits,
        softirq_s: s1 - s0,
        endpoints_s: c1 - c0,
        wall_s,
        server_local,
        evidence: String::new(),
    })
}

// ---------------------------------------------------------------------------------------
// Configuring the gateway

fn xdpgate_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("xdpgate");
    if !bin.exists() {
        bail!("{} not found: build it (cargo build --release -p xdpgate)", bin.display());
    }
    Ok(bin)
}

/// `xdpgate --netns GW --pin-dir DIR <args>`.
fn xdpgate(topo: &Topology, pins: &str, args: &[&str]) -> Result<String> {
    let bin = xdpgate_bin()?;
    let mut full = vec!["--netns", topo.gw.0.as_str(), "--pin-dir", pins];
    full.extend_from_slice(args);
    sh(bin.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?, &full)
}

/// (packets, bytes) of XDP verdict `verdict` summed over the gateway's interfaces.
fn xdpgate_verdict(topo: &Topology, pins: &str, verdict: &str) -> Result<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&xdpgate(topo, pins, &["stats", "--json"])?)?;
    let mut sum = (0, 0);
    for i in v["interfaces"].as_array().into_iter().flatten() {
        let t = &i["verdicts"][verdict];
        sum.0 += t["packets"].as_u64().unwrap_or(0);
        sum.1 += t["bytes"].as_u64().unwrap_or(0);
    }
    Ok(sum)
}

/// Packets counted by nftables rules with `counter` in the gateway, per rule comment.
fn nft_counters(topo: &Topology) -> Result<BTreeMap<String, (u64, u64)>> {
    let v: serde_json::Value =
        serde_json::from_str(&nsenter(&topo.gw.0, "nft", &["-j", "list", "ruleset"])?)?;
    let mut out = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(comment) = rule["comment"].as_str() else { continue };
        for e in rule["expr"].as_array().into_iter().flatten() {
            if let Some(c) = e.get("counter") {
                let p = c["packets"].as_u64().unwrap_or(0);
                let b = c["bytes"].as_u64().unwrap_or(0);
                out.insert(comment.to_string(), (p, b));
            }
        }
    }
    Ok(out)
}

const NAT_POLICY: &str = "# Generated by xdpgate-bench (throughput).
virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: tp-natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
";

const LB_POLICY: &str = "# Generated by xdpgate-bench (throughput).
virtual_network:
  address_space: [198.51.100.0/24]
load_balancers:
  - name: tp-lb
    frontends: [{name: fe, address: 192.0.2.10}]
    backend_pools:
      - {name: pool, backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]}
    rules:
      - {name: iperf, frontend: fe, protocol: tcp, frontend_port: 443, backend_port: 443,
         backend_pool: pool}
";

/// The nftables rulesets of the NAT cases, each NAT rule counted.
fn nft_nat(kind: Kind, topo: &Topology) -> String {
    match kind {
        Kind::NftSnat => format!(
            "table ip xgt {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"{}\" ip saddr 198.51.100.0/24 counter masquerade comment \"nat\"\n  }}\n}}\n",
            topo.g0
        ),
        _ => format!(
            "table ip xgt {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             ip daddr {FRONTEND} tcp dport {ALLOWED_PORT} counter dnat to numgen inc mod 3 map \
             {{ 0 : {}, 1 : {}, 2 : {} }} comment \"nat\"\n  }}\n}}\n",
            BACKENDS[0], BACKENDS[1], BACKENDS[2]
        ),
    }
}

struct Gateway<'a> {
    topo: &'a Topology,
    filter_rulesets: BTreeMap<usize, String>,
}

impl Gateway<'_> {
    /// Configures the gateway for `case`, runs iperf3, checks the counters that show the
    /// case's path was taken, and removes the configuration again.
    fn measure(&mut self, case: Case, secs: u32, round: usize) -> Result<Sample> {
        let topo = self.topo;
        match case.kind {
            Kind::Plain => iperf(topo, case, secs, round),
            Kind::NftFilter | Kind::NftSnat | Kind::NftDnat => {
                let ruleset = match case.kind {
                    Kind::NftFilter => self.filter_rulesets[&case.rules].clone(),
                    k => nft_nat(k, topo),
                };
                let r = nft_load(&topo.gw.0, &ruleset).and_then(|()| {
                    let mut s = iperf(topo, case, secs, round)?;
                    let counters = nft_counters(topo)?;
                    let (name, min_packets) = if case.kind == Kind::NftFilter {
                        ("established", 1000)
                    } else {
                        ("nat", 5)
                    };
                    let (p, b) = counters.get(name).copied().unwrap_or_default();
                    if p < min_packets {
                        bail!("nftables rule `{name}` counted {p} packets: not the intended path");
                    }
                    s.evidence = format!(
                        "nft rule `{name}`: {} packets, {} bytes",
                        thousands(p),
                        thousands(b)
                    );
                    Ok(s)
                });
                nft_flush(&topo.gw.0);
                r
            }
            Kind::XdpgateFilter | Kind::XdpgateNat | Kind::XdpgateLb => {
                // A dataplane of its own per run, removed after it: its tables' memory is
                // preallocated, and one per case kept for the whole run (13 of them) would
                // not fit in this VM's memory beside the other work on it.
                let pins = unique_pin_dir("xdpgate-bench-tp");
                let policy = match case.kind {
                    Kind::XdpgateFilter => nsg::policy_yaml(Family::IPv4, case.rules),
                    Kind::XdpgateNat => NAT_POLICY.into(),
                    _ => LB_POLICY.into(),
                };
                let file = std::env::temp_dir()
                    .join(format!("xdpgate-bench-tp-{}.yaml", std::process::id()));
                fs::write(&file, policy)?;
                let hook = if case.tc { "tc" } else { "xdp" };
                let r = (|| {
                    for (iface, role) in [(&topo.g0, "external"), (&topo.g1, "internal")] {
                        let mut args = vec!["attach", "--iface", iface, "--role", role];
                        // Tables for a few flows (the default size takes 328 MiB).
                        args.extend(["--hook", hook, "--flows", "65536"]);
                        args.extend(["--nat-translations", "65536"]);
                        xdpgate(topo, &pins, &args)?;
                    }
                    xdpgate(topo, &pins, &["apply", file.to_str().unwrap_or_default()])?;
                    // At tc a translated packet may be handed to the stack (pass) rather than
                    // redirected, by design: the server's view of each connection already
                    // shows the translation, so both verdicts count as the path there.
                    let verdicts: &[&str] = match (case.kind, case.tc) {
                        (Kind::XdpgateFilter, _) => &["pass"],
                        (_, false) => &["redirect"],
                        (_, true) => &["pass", "redirect"],
                    };
                    let counted = || -> Result<Vec<(u64, u64)>> {
                        verdicts.iter().map(|v| xdpgate_verdict(topo, &pins, v)).collect()
                    };
                    let before = counted()?;
                    let mut s = iperf(topo, case, secs, round)?;
                    let after = counted()?;
                    let moved: Vec<(u64, u64)> =
                        after.iter().zip(&before).map(|(a, b)| (a.0 - b.0, a.1 - b.1)).collect();
                    let b: u64 = moved.iter().map(|m| m.1).sum();
                    let verdict = verdicts.join("+");
                    // Most of the data must have gone through xdpgate with that verdict (a
                    // few first packets go to the stack before the neighbours are known).
                    if (b as f64) < 0.5 * s.bytes as f64 {
                        bail!(
                            "xdpgate ({hook}) counted {} bytes as {verdict} for {} moved: not the \
                             intended path",
                            thousands(b),
                            thousands(s.bytes)
                        );
                    }
                    let each: Vec<String> = verdicts
                        .iter()
                        .zip(&moved)
                        .map(|(v, (p, b))| {
                            format!("{v}: {} packets, {} bytes", thousands(*p), thousands(*b))
                        })
                        .collect();
                    s.evidence = format!("xdpgate {hook} {}", each.join("; "));
                    Ok(s)
                })();
                let _ = xdpgate(topo, &pins, &["detach", "--all"]);
                remove_dataplane(&PinDir::new(&pins));
                let _ = fs::remove_file(&file);
                r
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Measurement

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    which("iperf3")?;
    which("nsenter")?;
    which("ethtool")?;
    let (secs, rounds) = if cfg.quick { (2, 1) } else { (5, cfg.path_runs.max(2)) };
    let filter_rules: Vec<usize> = if cfg.quick { vec![100] } else { vec![100, 1_000] };
    eprintln!("  throughput: setting up inet, gateway and lan namespaces ...");
    let topo = Topology::new(false)?;
    // Not with --quick: the same gateway with the endpoints' offloads left on.
    let topo_offload = if cfg.quick { None } else { Some(Topology::new(true)?) };
    let rulesets: BTreeMap<usize, String> = filter_rules
        .iter()
        .map(|&n| (n, nft_ruleset(&nsg::nsgs(Family::IPv4, n), false, true).0))
        .collect();
    let mut gw = Gateway { topo: &topo, filter_rulesets: rulesets.clone() };
    let mut gw_offload =
        topo_offload.as_ref().map(|topo| Gateway { topo, filter_rulesets: rulesets.clone() });
    let plain = |dir| Case { kind: Kind::Plain, dir, rules: 0, offload: false, tc: false };
    let case = |kind, dir, rules, offload, tc| Case { kind, dir, rules, offload, tc };
    let mut cases = vec![plain(Dir::Inbound), plain(Dir::Outbound)];
    let have_nft = which("nft").is_ok();
    let mut skipped = Vec::new();
    if !have_nft {
        skipped.push("nftables: nft is not installed".into());
    }
    let (inbound, outbound) = (Dir::Inbound, Dir::Outbound);
    for &rules in &filter_rules {
        if have_nft {
            cases.push(case(Kind::NftFilter, inbound, rules, false, false));
        }
        for tc in [false, true] {
            cases.push(case(Kind::XdpgateFilter, inbound, rules, false, tc));
        }
    }
    if have_nft {
        cases.push(case(Kind::NftSnat, outbound, 0, false, false));
        cases.push(case(Kind::NftDnat, inbound, 0, false, false));
    }
    for tc in [false, true] {
        cases.push(case(Kind::XdpgateNat, outbound, 0, false, tc));
        cases.push(case(Kind::XdpgateLb, inbound, 0, false, tc));
    }
    if gw_offload.is_some() {
        // Every case with TSO on too: the plain forwarding of both directions for the ratios.
        let mut more = vec![(Kind::Plain, inbound, 0), (Kind::Plain, outbound, 0)];
        if have_nft {
            more.extend([
                (Kind::NftFilter, inbound, 100),
                (Kind::NftSnat, outbound, 0),
                (Kind::NftDnat, inbound, 0),
            ]);
        }
        for (kind, dir, rules) in more {
            cases.push(case(kind, dir, rules, true, false));
        }
        for tc in [false, true] {
            cases.push(case(Kind::XdpgateFilter, inbound, 100, true, tc));
            cases.push(case(Kind::XdpgateNat, outbound, 0, true, tc));
            cases.push(case(Kind::XdpgateLb, inbound, 0, true, tc));
        }
    }

    let mut samples: BTreeMap<Case, Vec<Sample>> = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for round in 0..rounds {
        eprintln!("  throughput, round {}/{rounds} ...", round + 1);
        // Alternate the order: a trend over the run (other load, thermal) then favours no case.
        let order: Vec<Case> =
            if round % 2 == 0 { cases.clone() } else { cases.iter().rev().copied().collect() };
        for case in order {
            if failed.contains_key(&case) {
                continue;
            }
            let gw = match gw_offload.as_mut() {
                Some(g) if case.offload => g,
                _ => &mut gw,
            };
            match gw.measure(case, secs, round) {
                Ok(s) => {
                    eprintln!(
                        "    {}: {:.2} Gbit/s, {} retransmits{}",
                        case.label(),
                        s.gbps,
                        s.retransmits,
                        if s.evidence.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", s.evidence)
                        }
                    );
                    samples.entry(case).or_default().push(s);
                }
                Err(e) => {
                    eprintln!("    not measured: {}: {e:#}", case.label());
                    failed.insert(case, format!("{}: {e:#}", case.label()));
                }
            }
        }
    }
    skipped.extend(failed.into_values());

    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    let per_gb = |s: &Sample, x: f64| x / (s.bytes as f64 / 1e9);
    for case in &cases {
        let Some(runs) = samples.get(case) else { continue };
        let reference = samples
            .get(&Case { offload: case.offload, ..plain(case.dir) })
            .cloned()
            .unwrap_or_default();
        let same_round = |s: &Sample| reference.iter().find(|r| r.round == s.round);
        let ratios: Vec<f64> =
            runs.iter().filter_map(|s| Some(s.gbps / same_round(s)?.gbps)).collect();
        let over: Vec<f64> = runs
            .iter()
            .filter_map(|s| {
                let r = same_round(s)?;
                Some(per_gb(s, s.softirq_s) - per_gb(r, r.softirq_s))
            })
            .collect();
        let mut per_backend = Vec::new();
        if matches!(case.kind, Kind::NftDnat | Kind::XdpgateLb) {
            for b in BACKENDS {
                let n = runs.iter().flat_map(|s| &s.server_local).filter(|l| *l == b).count();
                if n == 0 {
                    warnings.push(format!(
                        "{}: backend {b} received none of the {} connections",
                        case.label(),
                        runs.len() * STREAMS
                    ));
                }
                per_backend.push((b.to_string(), n));
            }
        }
        let m = |f: &dyn Fn(&Sample) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        rows.push(Row {
            case: *case,
            label: case.label(),
            gbps: m(&|s| s.gbps),
            ratio: if ratios.is_empty() { f64::NAN } else { median(&ratios) },
            retransmits: m(&|s| s.retransmits as f64),
            softirq_s_per_gb: m(&|s| per_gb(s, s.softirq_s)),
            endpoints_s_per_gb: m(&|s| per_gb(s, s.endpoints_s)),
            softirq_s_per_gb_over_plain: if over.is_empty() { f64::NAN } else { median(&over) },
            per_backend,
            samples: runs.clone(),
        });
    }
    if rows.iter().all(|r| r.case.kind != Kind::Plain) {
        bail!("plain forwarding could not be measured: {}", skipped.join("; "));
    }
    Ok(Report {
        machine: machine.clone(),
        quick: cfg.quick,
        secs,
        rounds,
        streams: STREAMS,
        rows,
        skipped,
        warnings,
    })
}

// ---------------------------------------------------------------------------------------
// Markdown

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### TCP throughput through a veth gateway (iperf3)\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(
        md,
        "| case | direction | Gbit/s | ratio to plain forwarding | retransmits | softirq+irq CPU s/GB | over plain | iperf3 CPU s/GB | per round Gbit/s | checked |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|---|");
    for x in &r.rows {
        let dir = match x.case.dir {
            Dir::Inbound => "inet → lan",
            Dir::Outbound => "lan → inet",
        };
        let runs: Vec<String> = x.samples.iter().map(|s| format!("{:.2}", s.gbps)).collect();
        let mut checked = x.samples.last().map(|s| s.evidence.clone()).unwrap_or_default();
        if !x.per_backend.is_empty() {
            let b: Vec<String> = x.per_backend.iter().map(|(a, n)| format!("{a}: {n}")).collect();
            let _ = write!(
                checked,
                "{}connections per backend: {}",
                if checked.is_empty() { "" } else { "; " },
                b.join(", ")
            );
        }
        let plain = x.case.kind == Kind::Plain;
        let _ = writeln!(
            md,
            "| {} | {dir} | {:.2} | {} | {:.0} | {:.3} | {} | {:.3} | {} | {} |",
            x.label,
            x.gbps,
            if plain { "1".into() } else { format!("{:.2}", x.ratio) },
            x.retransmits,
            x.softirq_s_per_gb,
            if plain { "-".into() } else { format!("{:+.3}", x.softirq_s_per_gb_over_plain) },
            x.endpoints_s_per_gb,
            runs.join(", "),
            if checked.is_empty() { "-".into() } else { checked },
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: three network namespaces, `inet` (203.0.113.10) — veth — `gateway` — veth — \
         `lan` (198.51.100.10, and the backends .11-.13 on the same interface); GRO on at every \
         veth end, checksum offload off at the two endpoints (so no TSO: xdpgate rewrites and \
         redirects frames in XDP, where a partial checksum would stay unfinished; the same \
         settings in every case). `iperf3 -c … -P {streams} -t {secs} -J` to a one-off `iperf3 -s \
         -1` on port 443, {rounds} round(s), each running every case, the order reversed every \
         other round; medians; the ratio is the median of each round's Gbit/s over plain \
         forwarding's in the same direction in the same round. Cases: *kernel forwarding*: \
         nothing on the gateway but `ip_forward`; *nftables filter*: the NSG benchmark's \
         policy as a linear chain in the forward hook behind `ct state established,related \
         accept`; *nftables SNAT*: `masquerade` out of the inet side (lan → inet); *nftables \
         DNAT*: `dnat to numgen inc mod 3 map` of the three backends, for the frontend \
         192.0.2.10:443; *xdpgate*: `xdpgate --netns GW --pin-dir DIR attach` on both gateway \
         veths (native XDP, or tc ingress with `--hook tc` in the *xdpgate tc* rows; external \
         towards inet, internal towards lan; a fresh pin directory per run, tables for 65,536 \
         flows and 65,536 NAT translations) and `xdpgate apply` \
         of the NSG benchmark's policy, a NAT gateway (public address 192.0.2.100 for \
         198.51.100.0/24) or a load balancer (192.0.2.10:443 to the three backends); no agent. \
         Checked in every run: the server's view of each data connection (local address: the \
         expected host or a backend; remote address: the client, the masquerade address or \
         the NAT public address), nftables counters (the `established` rule's, or the NAT \
         rule's, one packet per connection) and xdpgate's verdict counters (at least half of \
         the bytes moved went through xdpgate as `pass` for the filter, `redirect` for NAT \
         and LB; at tc `pass` or `redirect`). CPU: /proc/stat of all CPUs over the client's run — *softirq+irq* holds the \
         gateway's forwarding, nftables and veth XDP (all run in softirq on veth) but also the \
         endpoints' TCP receive processing, the same work in every case, hence the *over \
         plain* column (median of per-round differences to plain forwarding in the same \
         direction), the closest to the gateway's own cost; it also holds other softirq work on \
         the machine (the load average is in the header). *iperf3 CPU*: user + system time of \
         the client and server processes (their rusage): the endpoints' copies and TCP \
         sending, which slower paths make costlier per byte (more retransmits, smaller \
         batches). Per GB: over the 10⁹ bytes the server received.",
        streams = r.streams,
        secs = r.secs,
        rounds = r.rounds,
    );
    if r.rows.iter().any(|x| x.case.offload) {
        let _ = writeln!(
            md,
            "\nRows marked *TSO on*: a second gateway, the same but with the endpoints' checksum \
             offload and TSO left on (the veth default): the senders pass 64 KB segments that \
             cross both veths whole while nothing on the gateway runs XDP; once XDP runs on a \
             veth, its peer stops offering TSO and XDP sees every 1,500-byte frame. Their \
             ratios are to kernel forwarding in that topology. A frame whose checksum the \
             sender left to offload (CHECKSUM_PARTIAL) loses that state when XDP redirects it, \
             so the receiver drops it as corrupt: xdpgate's NAT and load balancer at XDP cannot \
             carry such traffic through a veth gateway. At tc (`--hook tc`) the pipeline runs \
             on the skb after GRO, offloads stay on and partial checksums stay valid."
        );
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(md, "\nWarnings: {}.", r.warnings.join("; "));
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(md, "\nNot measured: {}.", r.skipped.join("; "));
    }
    md.push('\n');
    md
}
