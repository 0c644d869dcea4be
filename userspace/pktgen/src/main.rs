//! `xdpgate-pktgen`: a traffic generator on `BPF_PROG_TEST_RUN` in live-frames mode (the
//! mechanism of xdp-trafficgen), for machines whose kernel has no pktgen module and for rates
//! AF_PACKET senders cannot reach.
//!
//! How frames leave: the object's `xdp_tx` program (it returns `XDP_TX`) is test-run with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` and an `xdp_md` context whose `ingress_ifindex` names the
//! sending interface. In that mode the kernel turns the frame into real `xdp_frame`s from a
//! page pool and acts on the verdict: `XDP_TX` becomes a redirect back to the "ingress"
//! device, that is a transmission through its `ndo_xdp_xmit`. (`XDP_PASS` would inject the
//! frame into this namespace's own stack as if it had been received: nothing would leave,
//! which is why `xdp_noop` cannot drive a generator.) Every run of the program sends one
//! frame.
//!
//! On a veth, `ndo_xdp_xmit` puts the frame straight into the peer's receive ring, which
//! exists only while the peer has an XDP program attached (xdpgate, or `xdpgate-pktgen sink`)
//! or GRO turned on (`ethtool -K PEER gro on`); otherwise the kernel refuses the frames and
//! the TX counters stay still. Frames that find the peer's ring full are dropped and counted
//! as the sender's `tx_dropped`.
//!
//! Live frames repeat one frame's bytes, so each test run sends one template: the generator
//! cycles through `--flows` templates, source ports varying first and then source addresses,
//! `--burst` frames of each per run. `--rate` shortens the bursts and sleeps between runs.
//! What was sent is read back from the interface's TX counters in this namespace.
//!
//! Where the kernel refuses live-frames test runs (EPERM on some hardened or sandboxed
//! kernels, EINVAL before Linux 5.18), `--via auto` (the default) sends through an AF_PACKET
//! socket instead (`packet.rs`) and says so in its report; `--via live` fails instead.
//!
//! `xdpgate-pktgen sink` is the other end for benchmarks: it attaches a baseline program of
//! the object (`xdp_noop` by default) to an interface until stopped, and reports what the
//! interface received.

mod frame;

use std::{
    fs,
    net::IpAddr,
    path::PathBuf,
    str::FromStr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use serde::Serialize;
use xdpgate_common::maps::{
    BACKEND_STATS, BACKENDS, FLOWS, FRAGS, FRONTENDS, MAGLEV, NAT_MAP, NAT_PUBLIC, NAT_SUBNETS,
    NSG_CLASS_IDS, NSG_CLASSES, NSG_FIELDS, NSG_HITS, NSG_RULES, SERVICE_STATS, VNET,
};
use xdpgate_dataplane::{
    self as dataplane, EBPF_OBJ, Mode, NOOP_PROGRAM, PinDir, TX_PROGRAM, netns,
};

use xdpgate_pktgen::packet::{PacketSocket, Sent};

use crate::frame::{AddrRange, FrameSpec, Mac, PortRange, Proto};

/// The largest live-frames batch the kernel accepts (`TEST_XDP_MAX_BATCH`).
pub const MAX_BATCH: u32 = 256;

/// Send generated UDP/TCP frames out of an interface at up to line rate: BPF_PROG_TEST_RUN in
/// live-frames mode with the xdpgate object's xdp_tx program (no kernel pktgen needed), or an
/// AF_PACKET socket where the kernel refuses live frames. Reports what left from the
/// interface's TX counters. `xdpgate-pktgen sink` holds a baseline
/// program (xdp_noop) on the receiving interface instead of xdpgate.
///
/// Example: xdpgate-pktgen --netns gen --iface veth0 --count 1000000 --dst-mac MAC
#[derive(clap::Parser, Debug)]
#[command(version, subcommand_negates_reqs = true)]
pub struct Args {
    /// Run in the named network namespace (as created by `ip netns add`), keeping the host's
    /// bpffs.
    #[arg(long, global = true)]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub sink: Option<Sub>,
    /// None only with a subcommand: sending needs at least --iface.
    #[command(flatten)]
    pub send: Option<SendArgs>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Attach a baseline program of the object (xdp_noop by default) to an interface until
    /// stopped (SIGINT/SIGTERM) or --duration ends, then report what it received: the far end
    /// of a generator on a veth, measured without xdpgate.
    Sink(SinkArgs),
}

/// What to send, where, how much and how fast.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// Interface to send from (in --netns, if given). On a veth, the peer needs an XDP program
    /// or GRO on to take the frames.
    #[arg(long)]
    pub iface: String,
    /// Frames to send (default 1,000,000 unless --duration is given).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Send for this many seconds instead of a count (with --count: whichever ends first).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub duration: Option<f64>,
    /// Target packets per second (e.g. 50000, 2.5M); 0 for as fast as possible. Approximated
    /// by shorter bursts and sleeping between test runs.
    #[arg(long, value_name = "PPS", default_value = "0", value_parser = parse_rate)]
    pub rate: u64,
    /// udp or tcp (TCP segments are SYNs: the first packet of a flow).
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: Proto,
    /// Source address, or a range FIRST-LAST, varied across templates after the ports.
    #[arg(long, value_name = "IP[-IP]", default_value = "203.0.113.1")]
    pub src: String,
    /// Destination address (same family as --src).
    #[arg(long, value_name = "IP", default_value = "198.51.100.1")]
    pub dst: IpAddr,
    /// Source port, or a range FIRST-LAST, varied first across templates.
    #[arg(long, value_name = "PORT[-PORT]", default_value = "10000-60000")]
    pub sport: String,
    /// Destination port.
    #[arg(long, value_name = "PORT", default_value_t = 9)]
    pub dport: u16,
    /// Distinct frames (flows) to cycle through.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub flows: u32,
    /// Frame size in bytes without the FCS (default 60, Ethernet's minimum, or the headers'
    /// length when longer: 74 for TCP over IPv6).
    #[arg(long, value_name = "BYTES")]
    pub size: Option<usize>,
    /// Destination MAC: the receiving interface's, or it may treat the frames as someone
    /// else's (default broadcast).
    #[arg(long, value_name = "MAC", default_value = "ff:ff:ff:ff:ff:ff", value_parser = parse_mac)]
    pub dst_mac: Mac,
    /// Source MAC (default: the sending interface's).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub src_mac: Option<Mac>,
    /// Frames of one template per test run (one system call; through AF_PACKET, --batch
    /// frames per call) before the next template.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub burst: u32,
    /// Frames the kernel builds and flushes at a time (1-256); through AF_PACKET, frames per
    /// system call.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub batch: u32,
    /// How frames leave: live-frames test runs, an AF_PACKET socket, or live frames unless
    /// the kernel refuses them.
    #[arg(long, value_enum, default_value = "auto")]
    pub via: Via,
    /// Sender threads, taking turns through the templates. One keeps a CPU busy; on a veth
    /// more only contend for the peer's one receive ring.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Run every sender on this CPU (frames are built and sent on the sender's CPU; on a
    /// veth, the peer's XDP program runs there too unless its NAPI is threaded).
    #[arg(long, value_name = "N")]
    pub cpu: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How frames leave (see the module's documentation).
#[derive(clap::ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Live frames, or AF_PACKET where the kernel refuses them.
    Auto,
    /// `BPF_PROG_TEST_RUN` live frames through `xdp_tx` only.
    Live,
    /// An AF_PACKET socket past the qdisc.
    Packet,
}

/// A baseline program held on an interface.
#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Interface to attach to (in --netns, if given).
    #[arg(long)]
    pub iface: String,
    /// Program of the xdpgate object to attach.
    #[arg(long, default_value = NOOP_PROGRAM)]
    pub program: String,
    /// native (driver) XDP, or skb (generic).
    #[arg(long, value_enum, default_value = "native")]
    pub mode: Mode,
    /// Stop after this many seconds (default: at SIGINT or SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub duration: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn main() -> std::process::ExitCode {
    // A closed pipe (`xdpgate-pktgen ... | head`) ends the process quietly instead of a panic
    // on write, as in `xdpgate`.
    // SAFETY: restoring the default disposition of one signal at startup.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The command line, with sending options and `sink` refused together. Checked here, not by
/// clap's args_conflicts_with_subcommands, which would refuse the global --netns before
/// `sink` too.
fn parse<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory as _, Parser as _};
    let args = Args::try_parse_from(argv)?;
    if args.sink.is_some() && args.send.is_some() {
        return Err(Args::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            "sending options cannot be used with `sink`; give the sink's own after it",
        ));
    }
    Ok(args)
}

fn run(args: Args) -> Result<()> {
    if let Some(ns) = &args.netns {
        netns::enter(ns)?;
    }
    match args.sink {
        Some(Sub::Sink(sink_args)) => {
            let report = sink(&sink_args)?;
            if sink_args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        None => {
            let args =
                args.send.ok_or_else(|| anyhow!("xdpgate-pktgen needs --iface IF (or `sink`)"))?;
            let report = send(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sending

/// What a generator run did.
#[derive(Debug, Serialize)]
pub struct SendReport {
    pub iface: String,
    pub proto: Proto,
    pub family: &'static str,
    pub size: usize,
    pub flows: usize,
    /// How the frames left: `live` or `packet` (never `auto`).
    pub via: Via,
    /// Why not live frames, when `--via auto` fell back to AF_PACKET.
    pub live_refused: Option<&'static str>,
    /// Frames handed to the kernel (program runs, or frames an AF_PACKET socket took).
    pub submitted: u64,
    /// From the interface's TX counters: what left (on a veth: what the peer took in).
    pub tx_packets: u64,
    /// A veth whose peer runs XDP counts an AF_PACKET frame without its 14-byte Ethernet
    /// header (it has been pulled off the skb by then), a live frame whole.
    pub tx_bytes: u64,
    /// Frames the interface dropped (on a veth: the peer's receive ring was full).
    pub tx_dropped: u64,
    /// Through AF_PACKET: frames the kernel handed back with ENOBUFS, not sent again (part
    /// of `submitted`). A veth without a qdisc dropped them and counts them in `tx_dropped`
    /// too; a device whose queue was stopped (a NIC's full ring) counts them nowhere.
    pub refused: u64,
    /// Wall-clock seconds from the first to the last send's return.
    pub seconds: f64,
    /// tx_packets / seconds.
    pub pps: f64,
    /// tx_bytes * 8 / seconds (frames without preamble, FCS and gap).
    pub bits_per_second: f64,
    /// Whether a signal cut the run short.
    pub interrupted: bool,
    /// Milliseconds the senders waited for the kernel to release XDP memory-model ids
    /// (see `Run::wait_for_memory_ids`); 0 unless about 65,000 runs a second or more.
    pub memory_id_waits_ms: u64,
}

impl SendReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "pktgen: {} frames submitted on {} ({}-byte {} {}, {} flows) in {:.3} s\n\
             sent ({} TX counters): {} packets, {} bytes in {:.3} s: {}, {:.3} Gbit/s\n",
            self.submitted,
            self.iface,
            self.size,
            format!("{:?}", self.proto).to_uppercase(),
            self.family,
            self.flows,
            self.seconds,
            self.iface,
            self.tx_packets,
            self.tx_bytes,
            self.seconds,
            human_rate(self.pps),
            self.bits_per_second / 1e9,
        );
        match (&self.via, &self.live_refused) {
            (Via::Packet, Some(why)) => {
                out += &format!("  through AF_PACKET: the kernel refused live frames ({why})\n")
            }
            (Via::Packet, None) => out += "  through AF_PACKET\n",
            _ => {}
        }
        if self.via == Via::Packet {
            out += "  (a veth whose peer runs XDP counts these frames' bytes without their \
                    14-byte Ethernet header)\n";
        }
        if self.refused > 0 {
            out += &format!(
                "  {} frames handed back by the kernel (ENOBUFS: dropped by {}, or its queue \
                 was stopped), not sent again\n",
                self.refused, self.iface
            );
        }
        if self.tx_dropped > 0 {
            out += &format!(
                "  {} frames dropped by {} (on a veth: the peer's receive ring was full, or the \
                 peer is down)\n",
                self.tx_dropped, self.iface
            );
        }
        if self.submitted > 0 && self.tx_packets == 0 && self.tx_dropped == 0 {
            out += &format!(
                "  nothing left {}: on a veth the peer needs an XDP program attached (xdpgate, \
                 or `xdpgate-pktgen sink`) or GRO on (`ethtool -K PEER gro on`)\n",
                self.iface
            );
        }
        if self.interrupted {
            out += "  interrupted: stopped early\n";
        }
        if self.memory_id_waits_ms > 0 {
            out += &format!(
                "  waited {} ms for the kernel's XDP memory-model ids (one per test run, \
                 released about a second after it: use a larger --burst)\n",
                self.memory_id_waits_ms
            );
        }
        out
    }
}

/// Sends as `args` say and reports from the interface counters.
pub fn send(args: &SendArgs) -> Result<SendReport> {
    if !(1..=MAX_BATCH).contains(&args.batch) {
        bail!("--batch must be 1-{MAX_BATCH}");
    }
    if args.burst == 0 || args.flows == 0 || args.count == Some(0) {
        bail!("--burst, --flows and --count must be at least 1");
    }
    let ifindex = dataplane::ifindex(&args.iface)?;
    let src_mac = match args.src_mac {
        Some(mac) => mac,
        None => hw_addr(&args.iface)?,
    };
    let mut spec = FrameSpec {
        src_mac,
        dst_mac: args.dst_mac,
        src: AddrRange::from_str(&args.src)?,
        dst: args.dst,
        sport: PortRange::from_str(&args.sport)?,
        dport: args.dport,
        proto: args.proto,
        size: 0,
    };
    spec.size = args.size.unwrap_or(spec.headers_len().max(60));
    let templates = spec.templates(args.flows)?;

    // Live frames need the object's xdp_tx, held in the XDP dispatcher; AF_PACKET nothing.
    let mut ebpf = if args.via == Via::Packet { None } else { Some(load_object()?) };
    let mut live = None;
    let mut _hold = None;
    if let Some(ebpf) = &mut ebpf {
        let prog = dataplane::program(ebpf, TX_PROGRAM)?;
        _hold = DispatcherHold::new(prog)
            .inspect_err(|e| {
                eprintln!(
                    "pktgen: warning: cannot hold {TX_PROGRAM} in the XDP dispatcher ({e:#}); \
                     each test run will wait for RCU twice: use large --burst"
                )
            })
            .ok();
        live = Some(Out::Live { prog: &*prog, ifindex, batch: args.batch });
    }
    let packet = || -> Result<Out<'_>> {
        let socket = PacketSocket::new(ifindex)
            .with_context(|| format!("an AF_PACKET socket on {}", args.iface))?;
        Ok(Out::Packet { socket, batch: args.batch as usize })
    };

    let count = match (args.count, args.duration) {
        (Some(c), _) => c,
        (None, Some(_)) => u64::MAX,
        (None, None) => 1_000_000,
    };
    // With a rate, about a thousand sends a second: short bursts, even pacing.
    let burst = if args.rate > 0 {
        u64::from(args.burst).min((args.rate / 1000).max(1))
    } else {
        u64::from(args.burst)
    };

    let stop = install_stop_handler()?;
    let before = dev_counters(&args.iface)?;
    let start = Instant::now();
    let new_run = |out| Run {
        out,
        templates: &templates,
        burst,
        rate: args.rate,
        deadline: args.duration.map(Duration::from_secs_f64),
        start,
        threads: args.threads.max(1),
        cpu: args.cpu,
        budget: AtomicU64::new(count),
        submitted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        last_progress_ms: AtomicU64::new(0),
        id_waits_ms: AtomicU64::new(0),
        stop,
    };
    let mut run = new_run(match live {
        Some(live) => live,
        None => packet()?,
    });
    // The first send, before the senders start, finds out whether the kernel takes live
    // frames: sender 0 goes on from the template after it.
    if let Some(cpu) = args.cpu {
        pin_cpu(cpu)?;
    }
    let mut first = 0;
    let mut live_refused = None;
    let first_interrupted = match run.step(&mut first) {
        Ok(step) => step == Step::Interrupted,
        Err(e) => match refused(&e).filter(|_| run.out.is_live()) {
            Some(why) if args.via == Via::Auto => {
                eprintln!(
                    "pktgen: the kernel refuses live frames ({e}): sending through AF_PACKET"
                );
                live_refused = Some(why);
                _hold = None;
                run = new_run(packet()?);
                first = 0;
                false
            }
            Some(why) => bail!(
                "this kernel refuses live-frames test runs ({why}: {e}); --via packet (or \
                 auto) sends through an AF_PACKET socket"
            ),
            None => return Err(e.context(run.out.describe(&args.iface, ifindex))),
        },
    };
    let results: Vec<Result<bool>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..run.threads)
            .map(|t| {
                let run = &run;
                s.spawn(move || run.worker(if t == 0 { first } else { t }))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(anyhow!("a sender panicked"))))
            .collect()
    });
    let mut interrupted = first_interrupted;
    for r in results {
        interrupted |= r.with_context(|| run.out.describe(&args.iface, ifindex))?;
    }
    let submitted = run.submitted.load(Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    // A veth counts a frame when the peer's NAPI has taken it from the ring: let it finish.
    let after = settled_counters(&args.iface)?;

    let tx_packets = after.tx_packets.saturating_sub(before.tx_packets);
    let tx_bytes = after.tx_bytes.saturating_sub(before.tx_bytes);
    Ok(SendReport {
        iface: args.iface.clone(),
        proto: args.proto,
        family: if args.dst.is_ipv4() { "IPv4" } else { "IPv6" },
        size: templates[0].len(),
        flows: templates.len(),
        via: if run.out.is_live() { Via::Live } else { Via::Packet },
        live_refused,
        submitted,
        tx_packets,
        tx_bytes,
        tx_dropped: after.tx_dropped.saturating_sub(before.tx_dropped),
        refused: run.refused.load(Ordering::Relaxed),
        seconds,
        pps: rate(tx_packets, seconds),
        bits_per_second: rate(tx_bytes * 8, seconds),
        memory_id_waits_ms: run.id_waits_ms.load(Ordering::Relaxed),
        interrupted,
    })
}

/// Keeps the generator's program in the kernel's XDP dispatcher for as long as it lives.
///
/// A test run that repeats its program more than once adds the program to the dispatcher
/// (the trampoline native XDP calls through) and takes it out after; each change waits for
/// an RCU grace period, twice about 12 ms here, whatever the burst, which would cap a
/// generator of 4,096-frame runs near 150 kpps. A program attached to a device is in the
/// dispatcher already and a test run only counts one more user. So the program is attached,
/// in generic mode, to the loopback device of a private network namespace made for it:
/// nothing is ever received there (its `lo` is down and nothing else lives in it). The
/// namespace is held by a descriptor only, and vanishes with the attachment when this
/// process closes it or exits.
struct DispatcherHold {
    _netns: fs::File,
}

impl DispatcherHold {
    fn new(prog: &mut Xdp) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        let home = fs::File::open("/proc/thread-self/ns/net").context("opening this netns")?;
        // SAFETY: unshare and setns act on this thread only; `home` is a netns descriptor.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        let attached = fs::File::open("/proc/thread-self/ns/net")
            .context("opening the private netns")
            .and_then(|ns| {
                prog.attach_to_if_index(1, XdpMode::Skb)
                    .context("attaching to the private netns's lo in generic mode")?;
                Ok(ns)
            });
        // Back home whatever happened: everything after runs in the caller's namespace.
        // SAFETY: as above.
        if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("returning to this netns: {}", std::io::Error::last_os_error());
        }
        Ok(Self { _netns: attached? })
    }
}

/// One generator run shared by its sender threads.
struct Run<'a> {
    out: Out<'a>,
    templates: &'a [Vec<u8>],
    burst: u64,
    rate: u64,
    deadline: Option<Duration>,
    start: Instant,
    threads: usize,
    cpu: Option<usize>,
    /// Frames not yet handed out to a sender.
    budget: AtomicU64,
    /// Frames the kernel has taken (program runs, or frames of `sendmmsg`), all senders.
    submitted: AtomicU64,
    /// Of them, frames an AF_PACKET socket handed back (`Sent::refused`).
    refused: AtomicU64,
    /// When a send last succeeded, in ms from `start`.
    last_progress_ms: AtomicU64,
    /// Time spent waiting for the kernel's XDP memory-model ids.
    id_waits_ms: AtomicU64,
    stop: &'static AtomicBool,
}

impl Run<'_> {
    /// Takes up to `n` frames from the budget.
    fn reserve(&self, n: u64) -> u64 {
        let mut left = self.budget.load(Ordering::Relaxed);
        loop {
            let take = n.min(left);
            if take == 0 {
                return 0;
            }
            match self.budget.compare_exchange_weak(
                left,
                left - take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => left = now,
            }
        }
    }

    /// Each test run registers a page pool under one of the kernel's 65,534 XDP
    /// memory-model ids, and a pool whose frames are still in flight when the run returns
    /// (on their way to the peer, or queued there) keeps its id until they are freed and
    /// the kernel retries its release (once a second). So runs of one frame (`--burst 1`)
    /// faster than that, or whose frames are held, run out of ids: the run fails with
    /// ENOSPC and is tried again once some are released. Gives up after
    /// 30 s without a release (the kernel has been seen to take 15 s to release 50,000).
    fn wait_for_memory_ids(&self, e: &std::io::Error) -> Result<()> {
        let waited = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
        let total = self.id_waits_ms.fetch_add(10, Ordering::Relaxed) + 10;
        let since = self.last_progress_ms.load(Ordering::Relaxed);
        let now = self.start.elapsed().as_millis() as u64;
        if now.saturating_sub(since) > 30_000 {
            bail!(
                "the kernel's XDP memory-model ids stayed exhausted for 30 s (page pools of \
                 earlier test runs not released; waited {total} ms in all, this wait {:?}): {e}",
                waited.elapsed()
            );
        }
        Ok(())
    }

    /// A sender: from template `next`, then every `threads`-th, one send of `burst` frames
    /// each. Returns whether a signal stopped it.
    fn worker(&self, mut next: usize) -> Result<bool> {
        if let Some(cpu) = self.cpu {
            pin_cpu(cpu)?;
        }
        loop {
            match self.step(&mut next)? {
                Step::Sent => {}
                Step::Done => return Ok(false),
                Step::Interrupted => return Ok(true),
            }
        }
    }

    /// One send of template `next` (and `next` moved on), or why none.
    fn step(&self, next: &mut usize) -> Result<Step> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(Step::Interrupted);
        }
        if self.deadline.is_some_and(|d| self.start.elapsed() >= d) {
            return Ok(Step::Done);
        }
        let n = self.reserve(self.burst);
        if n == 0 {
            return Ok(Step::Done);
        }
        let frame = &self.templates[*next % self.templates.len()];
        let Sent { taken, refused } = match self.out.send(frame, n) {
            Ok(sent) => sent,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Step::Interrupted),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && self.out.is_live() => {
                self.wait_for_memory_ids(&e)?;
                // The frames were not sent: they go back to the budget, the template stays.
                self.budget.fetch_add(n, Ordering::Relaxed);
                return Ok(Step::Sent);
            }
            Err(e) => return Err(e.into()),
        };
        *next += self.threads;
        let total = self.submitted.fetch_add(taken, Ordering::Relaxed) + taken;
        self.refused.fetch_add(refused, Ordering::Relaxed);
        if taken < n {
            return Ok(Step::Interrupted);
        }
        self.last_progress_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if self.rate > 0 {
            let due = Duration::from_secs_f64(total as f64 / self.rate as f64);
            if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        Ok(Step::Sent)
    }
}

/// What one `Run::step` did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Sent a burst, or will try it again.
    Sent,
    /// The count or the duration is reached.
    Done,
    /// A signal came.
    Interrupted,
}

/// Where the frames go.
enum Out<'a> {
    /// Live-frames test runs of `xdp_tx` "received" on `ifindex`, `batch` frames built and
    /// flushed at a time.
    Live { prog: &'a Xdp, ifindex: u32, batch: u32 },
    /// An AF_PACKET socket, `batch` frames per `sendmmsg`.
    Packet { socket: PacketSocket, batch: usize },
}

impl Out<'_> {
    fn is_live(&self) -> bool {
        matches!(self, Out::Live { .. })
    }

    /// Sends `frame` `n` times; returns how many the kernel took (fewer only if a signal
    /// came: a live-frames run it cuts short fails with EINTR, its frames uncounted).
    fn send(&self, frame: &[u8], n: u64) -> std::io::Result<Sent> {
        match self {
            Out::Live { prog, ifindex, batch } => {
                let ctx = xdp_md(frame.len(), *ifindex);
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    // A burst is at most `--burst`, a u32.
                    repeat: n as u32,
                    attrs: TestRunAttrs::new().xdp_live_frames(*batch),
                    ..Default::default()
                })
                .map(|_| Sent { taken: n, refused: 0 })
                .map_err(|e| match e {
                    aya::programs::ProgramError::SyscallError(s) => s.io_error,
                    e => std::io::Error::other(e),
                })
            }
            Out::Packet { socket, batch } => socket.send(frame, n, *batch),
        }
    }

    /// What failed, for an error's context.
    fn describe(&self, iface: &str, ifindex: u32) -> String {
        match self {
            Out::Live { .. } => {
                format!("live-frames test run of {TX_PROGRAM} on {iface} (ifindex {ifindex})")
            }
            Out::Packet { .. } => format!("sendmmsg on an AF_PACKET socket on {iface}"),
        }
    }
}

/// The errno's name when a live-frames test run failed because the kernel will not do them
/// at all: EPERM where a hardened or sandboxed kernel forbids them, EINVAL before Linux 5.18
/// (no such flag), EOPNOTSUPP or ENOTSUPP (524) where XDP test runs are not built in.
fn refused(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<std::io::Error>()?.raw_os_error()? {
        libc::EPERM => Some("EPERM"),
        libc::EINVAL => Some("EINVAL"),
        libc::EOPNOTSUPP => Some("EOPNOTSUPP"),
        524 => Some("ENOTSUPP"),
        _ => None,
    }
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { n as f64 / seconds } else { 0.0 }
}

/// "1.235 Mpps", "18.3 kpps", "12 pps".
pub fn human_rate(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.3} Mpps", pps / 1e6)
    } else if pps >= 1e3 {
        format!("{:.1} kpps", pps / 1e3)
    } else {
        format!("{pps:.0} pps")
    }
}

/// The 24-byte `struct xdp_md` given as `ctx_in`: data at 0 (no metadata), data_end at the
/// frame's length, and the interface the program runs "on" (where XDP_TX sends).
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let fields: [u32; 6] = [0, len as u32, 0, ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, f) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&f.to_ne_bytes());
    }
    out
}

/// Pins this thread to `cpu`.
fn pin_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t owned here, then plain libc calls.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Receiving: a baseline program held on an interface

#[derive(Debug, Serialize)]
pub struct SinkReport {
    pub iface: String,
    pub program: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub seconds: f64,
    pub pps: f64,
}

impl SinkReport {
    pub fn render(&self) -> String {
        format!(
            "sink: {} on {} for {:.3} s: received {} packets, {} bytes ({}), {} dropped\n",
            self.program,
            self.iface,
            self.seconds,
            self.rx_packets,
            self.rx_bytes,
            human_rate(self.pps),
            self.rx_dropped
        )
    }
}

/// Attaches `args.program` to `args.iface` until SIGINT/SIGTERM or the duration ends; the
/// program goes with this process.
pub fn sink(args: &SinkArgs) -> Result<SinkReport> {
    let ifindex = dataplane::ifindex(&args.iface)?;
    let stop = install_stop_handler()?;
    let mut ebpf = load_object()?;
    let prog = dataplane::program(&mut ebpf, &args.program)?;
    let mode = match args.mode {
        Mode::Native => XdpMode::Driver,
        Mode::Skb => XdpMode::Skb,
    };
    prog.attach_to_if_index(ifindex, mode).with_context(|| {
        format!("attaching {} to {} ({:?} mode)", args.program, args.iface, args.mode)
    })?;
    eprintln!("sink: {} attached to {} ({:?} mode)", args.program, args.iface, args.mode);
    let before = dev_counters(&args.iface)?;
    let start = Instant::now();
    let deadline = args.duration.map(Duration::from_secs_f64);
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| start.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = dev_counters(&args.iface)?;
    drop(ebpf); // detaches
    let rx_packets = after.rx_packets.saturating_sub(before.rx_packets);
    Ok(SinkReport {
        iface: args.iface.clone(),
        program: args.program.clone(),
        rx_packets,
        rx_bytes: after.rx_bytes.saturating_sub(before.rx_bytes),
        rx_dropped: after.rx_dropped.saturating_sub(before.rx_dropped),
        seconds,
        pps: rate(rx_packets, seconds),
    })
}

// ---------------------------------------------------------------------------------------
// The object, loaded without disturbing anyone's pins

/// Maps the generator and the baseline programs never touch, shrunk so that loading the
/// object does not allocate the dataplane's tables (hundreds of MB) for nothing.
const UNUSED_BIG_MAPS: [&str; 16] = [
    NSG_FIELDS,
    NSG_CLASS_IDS,
    NSG_CLASSES,
    NSG_RULES,
    NSG_HITS,
    FLOWS,
    FRAGS,
    FRONTENDS,
    MAGLEV,
    BACKENDS,
    SERVICE_STATS,
    BACKEND_STATS,
    NAT_MAP,
    NAT_PUBLIC,
    NAT_SUBNETS,
    VNET,
];

/// Loads the eBPF object with its maps pinned in a directory of this process's own, which
/// is removed once loaded (the maps live on through their descriptors): a generator never
/// shares or leaves behind the dataplane's pinned state.
pub fn load_object() -> Result<Ebpf> {
    let dir = PinDir::new(format!("/sys/fs/bpf/xdpgate-pktgen-{}", std::process::id()));
    dir.ensure()?;
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(dir.path().to_path_buf());
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir.path());
    for name in UNUSED_BIG_MAPS {
        loader.map_max_entries(name, 64);
    }
    loader.load(EBPF_OBJ).context("loading the xdpgate eBPF object")
}

// ---------------------------------------------------------------------------------------
// Stopping on SIGINT/SIGTERM

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set a flag instead of killing the process, so that a run cut short
/// still reports and cleans up. A test run in progress returns EINTR.
fn install_stop_handler() -> Result<&'static AtomicBool> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                bail!("installing a signal handler: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(&STOP)
}

// ---------------------------------------------------------------------------------------
// Interface counters and addresses, in the current network namespace

/// An interface's counters from /proc/net/dev (of this thread's network namespace: /sys
/// shows the namespace it was mounted in).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DevCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

pub fn dev_counters(iface: &str) -> Result<DevCounters> {
    let text = fs::read_to_string("/proc/thread-self/net/dev")
        .context("reading /proc/thread-self/net/dev")?;
    parse_net_dev(&text, iface)
        .ok_or_else(|| anyhow!("{iface} is not in /proc/net/dev of this network namespace"))
}

/// Reads the counters until two reads 20 ms apart agree (at most about a second).
fn settled_counters(iface: &str) -> Result<DevCounters> {
    let mut last = dev_counters(iface)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let now = dev_counters(iface)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

fn parse_net_dev(text: &str, iface: &str) -> Option<DevCounters> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let v: Vec<u64> = rest.split_whitespace().map(|f| f.parse().ok()).collect::<Option<_>>()?;
        (v.len() >= 12).then(|| DevCounters {
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_dropped: v[11],
        })
    })
}

/// The MAC address of `iface` (SIOCGIFHWADDR).
fn hw_addr(iface: &str) -> Result<Mac> {
    if iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} is too long");
    }
    // SAFETY: a datagram socket and a zeroed ifreq with a NUL-terminated name; the socket is
    // closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            bail!("reading the MAC address of {iface}: {err}");
        }
        let data = req.ifr_ifru.ifru_hwaddr.sa_data;
        Ok(std::array::from_fn(|i| data[i] as u8))
    }
}

pub fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address")))
        .collect::<Result<_, _>>()?;
    parts.try_into().map_err(|_| format!("{s:?} is not a MAC address (six hex bytes)"))
}

/// A `--duration`: more than 0 seconds, at most a year (a larger one overflowed the clock
/// it was added to, and the generator panicked after it had attached its program).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 86_400.0;
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= YEAR => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds above 0 and at most {YEAR} (a year)")),
    }
}

/// "50000", "750k", "2.5M".
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.strip_suffix(['k', 'K']) {
        Some(n) => (n, 1e3),
        None => match s.strip_suffix(['m', 'M']) {
            Some(n) => (n, 1e6),
            None => (s, 1.0),
        },
    };
    let v: f64 =
        num.parse().map_err(|_| format!("{s:?} is not a rate (e.g. 50000, 750k, 2.5M)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} is not a rate"));
    }
    Ok((v * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_macs_and_counters_parse() {
        assert_eq!(parse_rate("50000"), Ok(50_000));
        assert_eq!(parse_rate("750k"), Ok(750_000));
        assert_eq!(parse_rate("2.5M"), Ok(2_500_000));
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Ok([2, 0, 10, 255, 0, 1]));
        assert!(parse_mac("02:00:0a:ff:00").is_err());
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  \
             veth0: 1000 10 0 2 0 0 0 0 64000 1000 0 7 0 0 0 0\n";
        assert_eq!(
            parse_net_dev(text, "veth0"),
            Some(DevCounters {
                rx_bytes: 1000,
                rx_packets: 10,
                rx_dropped: 2,
                tx_bytes: 64000,
                tx_packets: 1000,
                tx_dropped: 7
            })
        );
        assert_eq!(parse_net_dev(text, "veth"), None);
    }

    /// --netns is global: before or after `sink` alike; sending options and `sink` exclude
    /// each other.
    #[test]
    fn command_lines_parse() {
        let p = |line: &str| parse(std::iter::once("xdpgate-pktgen").chain(line.split(' ')));
        for line in ["--netns gen sink --iface v0", "sink --netns gen --iface v0"] {
            let args = p(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(args.netns.as_deref(), Some("gen"), "{line}");
            assert!(matches!(args.sink, Some(Sub::Sink(ref s)) if s.iface == "v0"), "{line}");
            assert!(args.send.is_none(), "{line}");
        }
        let args = p("--netns gen --iface v0 --count 5 --rate 2.5M").unwrap();
        let send = args.send.expect("sending");
        assert_eq!((send.iface.as_str(), send.count, send.rate), ("v0", Some(5), 2_500_000));
        assert!(args.sink.is_none());
        let e = p("--iface v0 sink --iface v1").unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(p("--count 5").is_err(), "sending needs --iface");
        assert!(p("sink --iface v0 --count 5").is_err(), "the sink does not count");
        assert_eq!(p("--iface v0").unwrap().send.unwrap().via, Via::Auto);
        assert_eq!(p("--iface v0 --via packet").unwrap().send.unwrap().via, Via::Packet);
        assert!(p("--iface v0 --via pktgen").is_err());
        // Durations are refused past a year, at 0 and below, and not finite (seen failing:
        // the sink took all of them, the sender 1e20, and both panicked on them).
        for bad in ["1e20", "31536001", "0", "-1", "inf", "NaN"] {
            for line in [
                format!("--iface v0 --duration={bad}"),
                format!("sink --iface v0 --duration={bad}"),
            ] {
                assert!(p(&line).is_err(), "{line}");
            }
        }
        assert_eq!(p("--iface v0 --duration 2.5").unwrap().send.unwrap().duration, Some(2.5));
        assert!(p("sink --iface v0 --duration 31536000").is_ok());
    }

    /// Only the errnos of a kernel that will not do live frames at all make `--via auto` fall
    /// back: an interrupted or out-of-ids run is the generator's to handle, a bad address a
    /// failure.
    #[test]
    fn refusals_are_told_from_failures() {
        let err = |errno| anyhow::Error::from(std::io::Error::from_raw_os_error(errno));
        assert_eq!(refused(&err(libc::EPERM)), Some("EPERM"));
        assert_eq!(refused(&err(libc::EINVAL)), Some("EINVAL"));
        assert_eq!(refused(&err(524)), Some("ENOTSUPP"));
        for errno in [libc::EINTR, libc::ENOSPC, libc::EFAULT, libc::ENXIO] {
            assert_eq!(refused(&err(errno)), None, "errno {errno}");
        }
        assert_eq!(refused(&anyhow!("not an io::Error")), None);
    }

    #[test]
    fn xdp_md_names_the_interface() {
        let md = xdp_md(60, 7);
        assert_eq!(u32::from_ne_bytes(md[4..8].try_into().unwrap()), 60);
        assert_eq!(u32::from_ne_bytes(md[12..16].try_into().unwrap()), 7);
        assert_eq!(md.iter().filter(|b| **b != 0).count(), 2);
    }
}
