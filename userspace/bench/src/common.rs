//! What every section shares: the run configuration, a dataplane loaded with pins of its
//! own, test runs, packets (documentation addresses only), medians, the machine and dates.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap, MapData, MapError},
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde::Serialize;
use xdpgate_common::{
    flow::{FlowKey, FlowValue},
    iface::{IfaceConfig, Role},
    maps::{EGRESS, EMBRYOS, FLOWS},
    words,
};
use xdpgate_dataplane::{
    self as dataplane, NOOP_PROGRAM, PROGRAM, PinDir, SizeRequest, apply, transaction,
};
use xdpgate_policy::{
    self as policy, compile,
    lb::{self, CompiledLb},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// How long and how often each section measures.
pub struct Config {
    pub quick: bool,
    pub runs: usize,
    /// Repeat count of the repeat-based cases.
    pub repeat: u32,
    /// Distinct packets per run of the per-packet (repeat 1) cases.
    pub distinct: u16,
    /// Compile-and-apply timings per figure.
    pub apply_runs: usize,
    /// Flows opened before the runs for the load balancer's and NAT's established cases.
    pub open_flows: u16,
    /// Maglev table swaps timed per backend count.
    pub update_runs: usize,
    /// Seconds of traffic per figure of the veth path, and runs of it.
    pub path_secs: f64,
    pub path_runs: usize,
    /// Rule counts of the veth path comparison.
    pub path_rules: Vec<usize>,
}

impl Config {
    pub fn new(quick: bool, runs: Option<usize>) -> Self {
        if quick {
            Self {
                quick,
                runs: runs.unwrap_or(3),
                repeat: 10_000,
                distinct: 200,
                apply_runs: 2,
                open_flows: 64,
                update_runs: 3,
                path_secs: 0.2,
                path_runs: 1,
                path_rules: vec![10, 1_000],
            }
        } else {
            Self {
                quick,
                runs: runs.unwrap_or(7),
                repeat: 1_000_000,
                distinct: 5_000,
                apply_runs: 5,
                open_flows: 1_000,
                update_runs: 7,
                path_secs: 1.0,
                path_runs: runs.unwrap_or(3).min(5),
                path_rules: vec![10, 1_000, 4_000],
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The dataplane under test

/// A dataplane loaded with maps pinned in a directory of its own, removed on drop.
pub struct Bench {
    pub pins: PinDir,
    ebpf: Option<Ebpf>,
}

impl Bench {
    pub fn new() -> Result<Self> {
        Self::new_sized(&SizeRequest::default())
    }

    /// [`Bench::new`] with the flow and translation tables sized as `sizes` asks.
    pub fn new_sized(sizes: &SizeRequest) -> Result<Self> {
        let pins = PinDir::new(unique_pin_dir("xdpgate-bench"));
        // From here on, drop removes the pins whatever fails.
        let mut bench = Self { pins, ebpf: None };
        let mut ebpf = dataplane::load_sized(&bench.pins, sizes)?;
        dataplane::dataplane(&mut ebpf)?;
        dataplane::program(&mut ebpf, NOOP_PROGRAM)?;
        bench.ebpf = Some(ebpf);
        // Test-run packets arrive on `lo` (ifindex 1). Register it like an attachment facing
        // the outside, so packets are inbound and take the registered-interface path.
        bench.arrive_as(Role::External)?;
        Ok(bench)
    }

    pub fn ebpf(&self) -> &Ebpf {
        self.ebpf.as_ref().expect("loaded")
    }

    /// Test-run packets arrive on `lo`; its role makes them inbound (external) or outbound.
    pub fn arrive_as(&self, role: Role) -> Result<()> {
        dataplane::write_iface(&self.pins, 1, Some(IfaceConfig { slot: 1, role: role as u32 }))?;
        Ok(())
    }

    /// Registers `ifindex` as an attachment of `role` in counter slot `slot`, and as an
    /// egress device XDP may redirect to (as `xdpgate attach` does). The devmap resolves
    /// the ifindex in the caller's network namespace.
    pub fn register(&self, ifindex: u32, slot: u32, role: Role) -> Result<()> {
        let config = IfaceConfig { slot, role: role as u32 };
        xdpgate_dataplane::write_iface(&self.pins, ifindex, Some(config))?;
        let mut egress: DevMapHash<_> = self.pins.open_map(EGRESS)?.try_into()?;
        egress.insert(ifindex, ifindex, None, 0).context("adding to the egress devmap")?;
        Ok(())
    }

    pub fn prog(&self, name: &str) -> Result<&Xdp> {
        let ebpf = self.ebpf();
        Ok(ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?)
    }

    pub fn gate(&self) -> Result<&Xdp> {
        self.prog(PROGRAM)
    }

    pub fn noop(&self) -> Result<&Xdp> {
        self.prog(NOOP_PROGRAM)
    }

    /// Parses, compiles and applies the NSG tables of a policy; returns the time of each
    /// step and the compiled policy's LPM entry count.
    pub fn apply(&self, src: &str) -> Result<(Duration, Duration, Duration, usize)> {
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

    /// Applies a whole policy as the agent does (NSG tables, load balancers, NAT gateways),
    /// every backend healthy.
    pub fn apply_all(&self, src: &str) -> Result<(policy::Policy, CompiledLb)> {
        let policy = policy::load_str(src, "bench.yaml").map_err(|e| anyhow!("{e}"))?;
        let (_, lbs) = transaction::apply_policy(&self.pins, &policy, src, &lb::AllHealthy)?;
        Ok((policy, lbs))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Close the programs and maps first, then remove the pins (nothing is attached
        // through this handle; attachments made elsewhere are detached by their owners).
        self.ebpf = None;
        remove_dataplane(&self.pins);
    }
}

/// Removes a dataplane the bench made: its pins and its state directory under
/// `/run/xdpgate` (which `xdpgate attach` and `apply` write beside them).
pub fn remove_dataplane(pins: &PinDir) {
    let _ = fs::remove_dir_all(pins.path());
    let _ = fs::remove_dir_all(xdpgate_dataplane::state::dir(pins));
}

/// What this process left behind of the dataplanes it made: pin directories and state
/// directories named by [`unique_pin_dir`]. The bench fails when there are any.
pub fn leftovers() -> Vec<PathBuf> {
    let ours = format!("-{}-", std::process::id());
    [Path::new("/sys/fs/bpf"), Path::new(xdpgate_dataplane::state::ROOT)]
        .iter()
        .filter_map(|dir| fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("xdpgate-bench") && n.contains(&ours))
        })
        .collect()
}

/// A fresh directory name under bpffs, unique to this process and call.
pub fn unique_pin_dir(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!("/sys/fs/bpf/{prefix}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs `packet` `repeat` times; returns the verdict and the kernel's ns per run.
pub fn run(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(packet), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Runs `packet` once, arriving on `ifindex` (of the caller's network namespace) as the
/// kernel's `xdp_md` context says, so the FIB lookup starts from that interface (0: no
/// context, the kernel's default, loopback). Returns the verdict, the kernel's ns and the
/// packet as the program left it (copied out after the timed run).
pub fn run_out_on(
    prog: &Xdp,
    ifindex: u32,
    packet: &[u8],
    out: &mut Vec<u8>,
) -> Result<(u32, f64)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    out.clear();
    out.resize(packet.len() + 256, 0);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(out.as_mut_slice()),
            ctx_in: (ifindex != 0).then_some(&ctx[..]),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// [`run_each`] with every packet arriving on `ifindex` (see [`run_out_on`]; 0: no context).
pub fn run_each_on(
    prog: &Xdp,
    ifindex: u32,
    packets: &[Vec<u8>],
    mut check: impl FnMut(usize, u32, &[u8]) -> Result<()>,
) -> Result<f64> {
    let mut out = Vec::new();
    let mut sum = 0.0;
    for (i, p) in packets.iter().enumerate() {
        let (v, ns) = run_out_on(prog, ifindex, p, &mut out)?;
        check(i, v, &out)?;
        sum += ns;
    }
    Ok(sum / packets.len().max(1) as f64)
}

/// IRQ-work interrupts (`IWI` in /proc/interrupts) so far, summed over the CPUs: how the
/// kernel defers a ring buffer's wake-up out of the producer's context.
pub fn irq_work_count() -> Option<u64> {
    let s = fs::read_to_string("/proc/interrupts").ok()?;
    let line = s.lines().find(|l| l.trim_start().starts_with("IWI:"))?;
    Some(
        line.trim_start()["IWI:".len()..]
            .split_whitespace()
            .map_while(|w| w.parse::<u64>().ok())
            .sum(),
    )
}

/// Runs every packet once (a test run of repeat 1 each); `check` sees each verdict and
/// output. Returns the mean of the kernel's per-run ns.
///
/// Packets the program rewrites cannot be repeated in one test run: the kernel feeds the
/// rewritten packet to the next repeat, which would then take another path.
pub fn run_each(
    prog: &Xdp,
    packets: &[Vec<u8>],
    check: impl FnMut(usize, u32, &[u8]) -> Result<()>,
) -> Result<f64> {
    run_each_on(prog, 0, packets, check)
}

pub fn expect_verdict(what: &str, got: u32, want: u32) -> Result<()> {
    if got != want {
        bail!("{what}: verdict {got}, want {want}: the benchmark would measure the wrong path");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Addresses and packets (documentation addresses only)

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Family {
    IPv4,
    IPv6,
}

pub const SUBNET_HOST_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const SUBNET_HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// The allowed service port, and a port no rule names (the denied case).
pub const ALLOWED_PORT: u16 = 443;
pub const DENIED_PORT: u16 = 8443;
/// Client of the established and denied cases; clients 1..=99 carry the first packets of
/// run 1..; all of them lie inside the allow rule's source and outside every filler's.
pub const CLIENT_FIXED: u16 = 100;

pub fn client(family: Family, n: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    match family {
        Family::IPv4 => a[..4].copy_from_slice(&[203, 0, 113, n as u8]),
        Family::IPv6 => a = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, n).octets(),
    }
    a
}

pub fn server(family: Family) -> [u8; 16] {
    match family {
        Family::IPv4 => addr4(SUBNET_HOST_V4),
        Family::IPv6 => SUBNET_HOST_V6.octets(),
    }
}

/// An IPv4 address in the 16-byte form the packet builder takes.
pub fn addr4(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_SYN_ACK: u8 = TCP_SYN | TCP_ACK;
/// Initial sequence numbers of the benchmark's TCP connections: the client's SYN carries
/// `CLIENT_ISN`, the server's (backend's, remote's) SYN-ACK `SERVER_ISN`; every later
/// client segment acknowledges `SERVER_ISN + 1`, which is what confirms an embryonic flow.
pub const CLIENT_ISN: u32 = 1_000;
pub const SERVER_ISN: u32 = 90_000;
pub const ETH_LEN: usize = 14;
pub const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

/// Ethernet + IPv4 or IPv6 + TCP (20 bytes) + a small payload, with correct lengths and
/// checksums (IPv4 header and TCP), numbered as a segment of the benchmark's connections:
/// a SYN is the client's first segment, a SYN-ACK the server's answer to it, any other
/// segment the client's after the handshake (see [`CLIENT_ISN`]).
pub fn tcp_frame(
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let (seq, ack) = match flags & TCP_SYN_ACK {
        TCP_SYN => (CLIENT_ISN, 0),
        TCP_SYN_ACK => (SERVER_ISN, CLIENT_ISN.wrapping_add(1)),
        _ => (CLIENT_ISN.wrapping_add(1), SERVER_ISN.wrapping_add(1)),
    };
    tcp_segment(family, src, dst, sport, dport, flags, seq, ack)
}

/// [`tcp_frame`] with the sequence and acknowledgement numbers given.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    const PAYLOAD: &[u8] = b"xdpgate-bench";
    let l4_len = 20 + PAYLOAD.len();
    let mut p = Vec::with_capacity(14 + 40 + l4_len);
    p.extend_from_slice(&MAC_DST);
    p.extend_from_slice(&MAC_SRC);
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
            let c = !fold(ones_sum(&p[ip..ip + 20], 0));
            p[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
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
    let l4 = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[0x50, flags]); // data offset 5 words; flags
    p.extend_from_slice(&64240u16.to_be_bytes()); // window
    p.extend_from_slice(&[0, 0, 0, 0]); // checksum (below), urgent pointer
    p.extend_from_slice(PAYLOAD);
    let c = !fold(ones_sum(&p[l4..], pseudo_sum(&p)));
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    p
}

fn ones_sum(data: &[u8], init: u32) -> u32 {
    let mut sum = init;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum of an untagged IPv4 or IPv6 frame's L4 checksum.
fn pseudo_sum(p: &[u8]) -> u32 {
    let ip = &p[ETH_LEN..];
    if ip[0] >> 4 == 4 {
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let ihl = usize::from(ip[0] & 0xf) * 4;
        ones_sum(&ip[12..20], 0) + u32::from(ip[9]) + (total - ihl) as u32
    } else {
        let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        ones_sum(&ip[8..40], 0) + u32::from(ip[6]) + len as u32
    }
}

/// Whether the IPv4 header and TCP checksums of an untagged frame verify from scratch.
pub fn checksums_ok(p: &[u8]) -> bool {
    let ip = &p[ETH_LEN..];
    let l4 = if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        if fold(ones_sum(&ip[..ihl], 0)) != 0xffff {
            return false;
        }
        &ip[ihl..usize::from(u16::from_be_bytes([ip[2], ip[3]]))]
    } else {
        &ip[40..40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))]
    };
    fold(ones_sum(l4, pseudo_sum(p))) == 0xffff
}

/// (source, destination, source port, destination port) of an untagged IPv4 TCP frame.
pub fn endpoints4(p: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = &p[ETH_LEN..];
    let a = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let l4 = &ip[usize::from(ip[0] & 0xf) * 4..];
    (a(12), a(16), u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
}

// ---------------------------------------------------------------------------------------
// Flow tables: which path a packet of a flow takes

/// Where a packet finds its flow: nowhere (it starts one), among the embryonic flows
/// (`EMBRYOS`: a miss in `FLOWS` first), or among the established ones (`FLOWS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    None,
    Embryonic,
    Established,
    /// In both tables: never left so by the dataplane.
    Both,
}

/// The flow tables of a dataplane under test.
pub struct FlowTables {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    embryos: HashMap<MapData, FlowKey, FlowValue>,
}

impl FlowTables {
    pub fn open(bench: &Bench) -> Result<Self> {
        Ok(Self {
            flows: bench.pins.open_map(FLOWS)?.try_into()?,
            embryos: bench.pins.open_map(EMBRYOS)?.try_into()?,
        })
    }

    /// The state of the flow of `frame` (an untagged TCP frame), by its key as it arrives.
    pub fn state(&self, frame: &[u8]) -> Result<FlowState> {
        let key = flow_key(frame)?;
        let has = |m: &HashMap<MapData, FlowKey, FlowValue>| match m.get(&key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e),
        };
        Ok(match (has(&self.flows)?, has(&self.embryos)?) {
            (false, false) => FlowState::None,
            (false, true) => FlowState::Embryonic,
            (true, false) => FlowState::Established,
            (true, true) => FlowState::Both,
        })
    }

    /// Fails unless the flow of every frame is in state `want`: otherwise the benchmark
    /// would measure another path than the one it names.
    pub fn expect(&self, what: &str, want: FlowState, frames: &[&[u8]]) -> Result<()> {
        for f in frames {
            let got = self.state(f)?;
            if got != want {
                let (s, d, sp, dp) = endpoints(f);
                bail!(
                    "{what}: the flow entry of {s}:{sp} -> {d}:{dp} is {got:?}, want {want:?}: \
                     the benchmark would measure the wrong path"
                );
            }
        }
        Ok(())
    }

    /// Entries in `FLOWS` and in `EMBRYOS`.
    pub fn entries(&self) -> (usize, usize) {
        let n = |m: &HashMap<MapData, FlowKey, FlowValue>| m.keys().filter_map(|k| k.ok()).count();
        (n(&self.flows), n(&self.embryos))
    }
}

/// Opens a TCP connection through a dataplane that does not rewrite it, as its two ends
/// would: the client's SYN (arriving from outside), the server's SYN-ACK (from inside), the
/// client's ACK of it; checks that every segment passes and that the ACK, not the SYN-ACK,
/// confirmed the flow. Returns the client's ACK, the segment of the established flow.
pub fn handshake(
    bench: &Bench,
    what: &str,
    family: Family,
    (client, cport): ([u8; 16], u16),
    (server, sport): ([u8; 16], u16),
) -> Result<Vec<u8>> {
    let gate = bench.gate()?;
    let tables = FlowTables::open(bench)?;
    let syn = tcp_frame(family, client, server, cport, sport, TCP_SYN);
    let syn_ack = tcp_frame(family, server, client, sport, cport, TCP_SYN_ACK);
    let ack = tcp_frame(family, client, server, cport, sport, TCP_ACK);
    expect_verdict(&format!("{what} (SYN)"), run(gate, &syn, 1)?.0, XDP_PASS)?;
    bench.arrive_as(Role::Internal)?;
    let answered = run(gate, &syn_ack, 1);
    bench.arrive_as(Role::External)?;
    expect_verdict(&format!("{what} (SYN-ACK)"), answered?.0, XDP_PASS)?;
    // (A flow nothing rewrites has no reply entry until confirmed.)
    tables.expect(&format!("{what}, answered"), FlowState::Embryonic, &[&syn])?;
    expect_verdict(&format!("{what} (ACK)"), run(gate, &ack, 1)?.0, XDP_PASS)?;
    tables.expect(what, FlowState::Established, &[&ack, &syn_ack])?;
    Ok(ack)
}

/// The flow key of an untagged IPv4 or IPv6 TCP frame, as the dataplane builds it.
pub fn flow_key(p: &[u8]) -> Result<FlowKey> {
    let ip = &p[ETH_LEN..];
    let (family, src, dst, l4) = match ip[0] >> 4 {
        4 => {
            let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
            s[..4].copy_from_slice(&ip[12..16]);
            d[..4].copy_from_slice(&ip[16..20]);
            (4, s, d, &ip[usize::from(ip[0] & 0xf) * 4..])
        }
        6 => (6, ip[8..24].try_into()?, ip[24..40].try_into()?, &ip[40..]),
        v => bail!("not an IP frame (version {v})"),
    };
    Ok(FlowKey {
        src: words(&src),
        dst: words(&dst),
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto: 6,
        family,
        kind: 0,
        _pad: 0,
    })
}

/// (source, destination, source port, destination port) of an untagged IPv4 or IPv6 TCP
/// frame, for messages.
fn endpoints(p: &[u8]) -> (IpAddr, IpAddr, u16, u16) {
    let ip = &p[ETH_LEN..];
    if ip[0] >> 4 == 4 {
        let (s, d, sp, dp) = endpoints4(p);
        return (s.into(), d.into(), sp, dp);
    }
    let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).expect("16 bytes"));
    (a(8), a(24), u16::from_be_bytes([ip[40], ip[41]]), u16::from_be_bytes([ip[42], ip[43]]))
}

// ---------------------------------------------------------------------------------------
// Figures

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// One figure against the no-op: medians, and the median and range of the per-run ratios
/// (each run's figure over the no-op's measured right after it, on the same packets).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratio {
    pub ns: f64,
    pub noop_ns: f64,
    pub ratio: f64,
    pub ratio_range: (f64, f64),
    pub runs_ns: Vec<f64>,
    pub runs_noop_ns: Vec<f64>,
}

impl Ratio {
    pub fn new(x: Vec<f64>, noop: Vec<f64>) -> Self {
        let ratios: Vec<f64> = x.iter().zip(&noop).map(|(a, b)| a / b).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self {
            ns: median(&x),
            noop_ns: median(&noop),
            ratio: median(&ratios),
            ratio_range: (lo, hi),
            runs_ns: x,
            runs_noop_ns: noop,
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub use xdpgate_dataplane::tables::thousands;

/// Bytes as KiB, MiB or GiB with one decimal.
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    if f >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    } else if f >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

// ---------------------------------------------------------------------------------------
// Machine and date

#[derive(Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub date: String,
    /// /proc/loadavg (1, 5 and 15 minutes) when the benchmark started.
    pub load_average: String,
}

impl Machine {
    pub fn detect() -> Self {
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
        let cpus =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1);
        Self { kernel, cpu, cpus, date: utc_now(), load_average: load_average() }
    }

    /// The heading lines every report starts with.
    pub fn header(&self, quick: bool) -> String {
        self.lines(
            quick,
            "  \nAbsolute figures vary by machine; the ratios (to a no-op XDP program, or to no \
             filter at all on the veth path), measured in the same run on the same packets, are \
             the claim.",
        )
    }

    /// [`Self::header`] without the claim of ratios, for a section that measures none.
    pub fn header_without_ratios(&self, quick: bool) -> String {
        self.lines(quick, "")
    }

    fn lines(&self, quick: bool, claim: &str) -> String {
        let mut s = String::new();
        if quick {
            s.push_str("**Quick run (`--quick`): a smoke test, not a measurement.**\n\n");
        }
        s.push_str(&format!(
            "Linux {}, {} ({} CPUs), {}, load average {} at the start.{claim}\n\n",
            self.kernel, self.cpu, self.cpus, self.date, self.load_average
        ));
        s
    }
}

/// A section's report that is only rows of its runs.
#[derive(Serialize)]
pub struct Rows<R> {
    pub machine: Machine,
    pub quick: bool,
    pub runs: usize,
    pub rows: Vec<R>,
}

pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Pins this thread to `cpu`; returns whether it worked.
pub fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned here.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Pins this thread to the CPU it runs on: test runs execute on the calling CPU, and the
/// per-CPU flow-table free lists and caches stay the same across runs.
pub fn pin_to_current_cpu() -> Option<usize> {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    (cpu >= 0 && pin_to_cpu(cpu as usize)).then_some(cpu as usize)
}

/// The CPU this thread runs on.
pub fn current_cpu() -> usize {
    // SAFETY: no preconditions.
    usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0)
}

/// The current UTC date and time, "YYYY-MM-DD HH:MM UTC".
pub fn utc_now() -> String {
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
