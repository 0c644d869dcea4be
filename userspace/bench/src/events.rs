//! The first packet of a new flow as users run it: with the agent reading the flow-event
//! ring, and without.
//!
//! Every allowed first packet writes a `begin` event into the pinned ring buffer. What that
//! costs depends on the reader: a reader waiting in epoll that has caught up is woken
//! (through IRQ work) by the event, one with no waiter costs nothing beyond the write, and a
//! full ring costs only a failed reservation. Each case has its own freshly loaded
//! dataplane (so its own ring and flow tables):
//! - *consumer*: a thread reads the ring as the agent does (epoll on the ring's fd with a
//!   bounded timeout, then everything readable), on another CPU when there is one; each run
//!   starts once it has read every event so far (caught up);
//! - *no consumer*: nothing waits on the ring; the bench drains it between runs, so it has
//!   room for every event;
//! - *ring full*: the ring was filled before the runs and nothing reads it (what a bench
//!   without a reader measured once about 14,500 events were written).
//!
//! Every case: one packet per test run, many distinct flows (cold), against the no-op on the
//! same packets; the IRQ-work interrupts (`IWI` of /proc/interrupts, all CPUs) counted over
//! the xdpgate runs.

use std::{
    fmt::Write as _,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use xdpgate_common::events::{EVENT_RING_BYTES, FlowEvent};
use xdpgate_dataplane::{self as dataplane, PinDir, stats};

use crate::{
    common::{
        ALLOWED_PORT, Bench, Config, Family, Machine, Ratio, TCP_SYN, XDP_PASS, client,
        current_cpu, expect_verdict, irq_work_count, pin_to_cpu, run_each, server, tcp_frame,
        thousands,
    },
    nsg,
};

/// The consumer's bounded wait: it reads the ring at least this often even when no
/// wake-up comes, as the agent does.
pub const POLL_MS: i32 = xdpgate_common::events::EVENT_POLL_MS as i32;
/// User rules of the policy (the first-packet cost at other rule counts is in the NSG table).
const RULES: usize = 10;
/// First packets written to fill the ring of the ring-full case (more than it holds).
const FILL: u16 = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    ConsumerOtherCpu,
    ConsumerSameCpu,
    NoConsumer,
    RingFull,
}

impl Case {
    pub const ALL: [Case; 4] =
        [Case::ConsumerOtherCpu, Case::ConsumerSameCpu, Case::NoConsumer, Case::RingFull];

    pub fn label(self) -> &'static str {
        match self {
            Case::ConsumerOtherCpu => {
                "first packet, event reader on another CPU (caught up, in epoll)"
            }
            Case::ConsumerSameCpu => {
                "first packet, event reader on the same CPU (caught up, in epoll)"
            }
            Case::NoConsumer => "first packet, no consumer, ring has room",
            Case::RingFull => "first packet, no consumer, ring full (event lost)",
        }
    }
}

#[derive(Serialize)]
pub struct Row {
    pub case: Case,
    #[serde(flatten)]
    pub figures: Ratio,
    /// Median ns over the no-op (per-run differences).
    pub ns_over_noop: f64,
    /// New flows per second one CPU sustains at this cost (10^9 / ns per first packet,
    /// test-run overhead included).
    pub flows_per_sec: f64,
    /// IRQ-work interrupts per first packet over the xdpgate runs (all CPUs); none when
    /// /proc/interrupts has no IWI line.
    pub irq_work_per_packet: Option<f64>,
    pub packets_per_run: usize,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    /// /proc/loadavg when this section finished (the machine's is from the start).
    pub load_after: String,
    pub quick: bool,
    pub runs: usize,
    pub rules: usize,
    pub rows: Vec<Row>,
    pub poll_ms: i32,
    /// The CPU of the other-CPU consumer thread and of the bench (test runs, and the
    /// same-CPU consumer).
    pub consumer_cpu: usize,
    pub bench_cpu: usize,
    pub ring_bytes: u32,
    /// Events the consumer read, and the events the no-consumer case drained: each must be
    /// one per first packet.
    pub consumed: u64,
    pub drained: u64,
    /// Events lost to a full ring in the consumer and no-consumer cases (must be 0), and in
    /// the ring-full case (every first packet's).
    pub lost_with_room: u64,
    pub lost_ring_full: u64,
}

/// A thread reading the ring as the agent does, counting the events.
struct Consumer {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Consumer {
    fn spawn(pins: PinDir, cpu: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), seen.clone());
        let handle = std::thread::Builder::new()
            .name("event-consumer".into())
            .spawn(move || -> Result<()> {
                if !pin_to_cpu(cpu) {
                    bail!("cannot pin the event consumer to CPU {cpu}");
                }
                let mut ring = dataplane::event_ring(&pins)?;
                // SAFETY: plain epoll calls on a descriptor owned here, closed below.
                let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                if ep < 0 {
                    bail!("epoll_create1: {}", std::io::Error::last_os_error());
                }
                let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
                // SAFETY: as above; the ring's fd stays open while `ring` lives.
                if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut ev) }
                    < 0
                {
                    let e = std::io::Error::last_os_error();
                    // SAFETY: closing the descriptor created above.
                    unsafe { libc::close(ep) };
                    bail!("epoll_ctl: {e}");
                }
                while !s.load(Ordering::Relaxed) {
                    let mut out = libc::epoll_event { events: 0, u64: 0 };
                    // SAFETY: one event of room; the timeout bounds the wait.
                    unsafe { libc::epoll_wait(ep, &mut out, 1, POLL_MS) };
                    let mut k = 0;
                    while let Some(item) = ring.next() {
                        if item.len() >= size_of::<FlowEvent>() {
                            k += 1;
                        }
                    }
                    n.fetch_add(k, Ordering::Release);
                }
                // SAFETY: closing the descriptor created above.
                unsafe { libc::close(ep) };
                Ok(())
            })
            .context("spawning the event consumer")?;
        Ok(Self { stop, seen, handle: Some(handle) })
    }

    /// Waits until the consumer has read `n` events.
    fn wait_for(&self, n: u64) -> Result<()> {
        let t = Instant::now();
        while self.seen.load(Ordering::Acquire) < n {
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the event consumer read {} events in 10 s, want {n}",
                    self.seen.load(Ordering::Acquire)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().expect("running").join().map_err(|_| anyhow!("consumer panicked"))??;
        Ok(self.seen.load(Ordering::Acquire))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The first packets of run `r` of a case: a client of their own, distinct source ports.
fn first_packets(r: usize, n: u16) -> Vec<Vec<u8>> {
    let (src, dst) = (client(Family::IPv4, 1 + r as u16), server(Family::IPv4));
    (0..n).map(|i| tcp_frame(Family::IPv4, src, dst, 10_000 + i, ALLOWED_PORT, TCP_SYN)).collect()
}

/// Gate and no-op ns per packet, and IRQ work during the gate's runs.
fn measure_run(bench: &Bench, packets: &[Vec<u8>]) -> Result<(f64, f64, Option<u64>)> {
    let (gate, noop) = (bench.gate()?, bench.noop()?);
    let before = irq_work_count();
    let ns = run_each(gate, packets, |_, v, _| expect_verdict("first packet", v, XDP_PASS))?;
    let irq = before.zip(irq_work_count()).map(|(a, b)| b.saturating_sub(a));
    let noop_ns = run_each(noop, packets, |_, _, _| Ok(()))?;
    Ok((ns, noop_ns, irq))
}

#[derive(Default)]
struct Figures {
    ns: Vec<f64>,
    noop: Vec<f64>,
    irq: Option<u64>,
    packets: u64,
}

impl Figures {
    fn push(&mut self, (ns, noop, irq): (f64, f64, Option<u64>), packets: usize) {
        self.ns.push(ns);
        self.noop.push(noop);
        self.irq = match (self.ns.len(), self.irq, irq) {
            (1, _, i) => i,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.packets += packets as u64;
    }

    fn row(self, case: Case, packets_per_run: usize) -> Row {
        let over: Vec<f64> = self.ns.iter().zip(&self.noop).map(|(a, b)| a - b).collect();
        let ns_over_noop = crate::common::median(&over);
        let irq_work_per_packet = self.irq.map(|i| i as f64 / self.packets.max(1) as f64);
        let figures = Ratio::new(self.ns, self.noop);
        Row {
            case,
            flows_per_sec: 1e9 / figures.ns,
            ns_over_noop,
            figures,
            irq_work_per_packet,
            packets_per_run,
        }
    }
}

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    let policy = nsg::policy_yaml(Family::IPv4, RULES);
    let bench_cpu = current_cpu();
    // The agent is not pinned: it may run beside the traffic or on its CPU.
    let consumer_cpu = if machine.cpus > 1 { usize::from(bench_cpu == 0) } else { bench_cpu };
    let n = cfg.distinct;
    let per_run = usize::from(n);

    let other = Bench::new()?;
    other.apply(&policy)?;
    let other_reader = Consumer::spawn(other.pins.clone(), consumer_cpu)?;
    let same = Bench::new()?;
    same.apply(&policy)?;
    let same_reader = Consumer::spawn(same.pins.clone(), bench_cpu)?;

    let without = Bench::new()?;
    without.apply(&policy)?;
    let mut ring = dataplane::event_ring(&without.pins)?;
    let drain = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>| {
        let mut k = 0u64;
        while let Some(item) = ring.next() {
            k += u64::from(item.len() >= size_of::<FlowEvent>());
        }
        k
    };

    let full = Bench::new()?;
    full.apply(&policy)?;
    // Fill its ring: a client of its own, more first packets than events fit.
    let fill: Vec<Vec<u8>> = {
        let (src, dst) = (client(Family::IPv4, 120), server(Family::IPv4));
        (0..FILL)
            .map(|i| tcp_frame(Family::IPv4, src, dst, 10_000 + i, ALLOWED_PORT, TCP_SYN))
            .collect()
    };
    run_each(full.gate()?, &fill, |_, v, _| expect_verdict("filling the ring", v, XDP_PASS))?;
    let lost_before = stats::event_losses(&full.pins)?.1;
    if lost_before == 0 {
        bail!("{FILL} first packets did not fill the event ring");
    }

    let mut figs: [Figures; 4] = Default::default();
    let (mut produced, mut drained) = (0u64, 0u64);
    for r in 0..cfg.runs {
        eprintln!("  run {}/{} ...", r + 1, cfg.runs);
        let packets = first_packets(r, n);
        // Readers: caught up before the run.
        other_reader.wait_for(produced)?;
        figs[0].push(measure_run(&other, &packets)?, per_run);
        same_reader.wait_for(produced)?;
        figs[1].push(measure_run(&same, &packets)?, per_run);
        produced += u64::from(n);

        // No consumer: the previous run's events drained, so the ring has room.
        drained += drain(&mut ring);
        figs[2].push(measure_run(&without, &packets)?, per_run);

        figs[3].push(measure_run(&full, &packets)?, per_run);
    }
    other_reader.wait_for(produced)?;
    same_reader.wait_for(produced)?;
    let consumed = other_reader.finish()? + same_reader.finish()?;
    drained += drain(&mut ring);
    let total = cfg.runs as u64 * u64::from(n);
    if consumed != 2 * total || drained != total {
        bail!(
            "{total} first packets per case, but the readers read {consumed} events (of two \
             cases) and the drain {drained}: some first packet wrote no event"
        );
    }
    let lost_with_room = [&other, &same, &without]
        .iter()
        .map(|b| stats::event_losses(&b.pins).map(|l| l.1))
        .sum::<Result<u64>>()?;
    if lost_with_room != 0 {
        bail!("{lost_with_room} events lost with a reader or room in the ring");
    }
    let lost_ring_full = stats::event_losses(&full.pins)?.1 - lost_before;
    if lost_ring_full != total {
        bail!("{lost_ring_full} events lost to the full ring, want {total} (one per packet)");
    }
    let rows = Case::ALL.into_iter().zip(figs).map(|(c, f)| f.row(c, per_run)).collect();
    Ok(Report {
        machine: machine.clone(),
        load_after: crate::common::load_average(),
        quick: cfg.quick,
        runs: cfg.runs,
        rules: RULES,
        rows,
        poll_ms: POLL_MS,
        consumer_cpu,
        bench_cpu,
        ring_bytes: EVENT_RING_BYTES,
        consumed,
        drained,
        lost_with_room,
        lost_ring_full,
    })
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### First packet and the flow-event reader (BPF_PROG_TEST_RUN)\n");
    md.push_str(&r.machine.header(r.quick));
    let _ = writeln!(
        md,
        "| case | ns/packet | no-op ns/packet | ratio (xdpgate / no-op) | per-run range | ns over no-op | new flows/s per CPU | IRQ work per packet |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|---:|---:|---:|");
    for row in &r.rows {
        let f = &row.figures;
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2} | {:.2}-{:.2} | {:.0} | {} | {} |",
            row.case.label(),
            f.ns,
            f.noop_ns,
            f.ratio,
            f.ratio_range.0,
            f.ratio_range.1,
            row.ns_over_noop,
            thousands(row.flows_per_sec as u64),
            row.irq_work_per_packet.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: an NSG of {rules} inbound rules allowing the test packets (as in the NSG \
         table); each case in its own freshly loaded dataplane, with its own {ring} KiB event \
         ring. Per run, {dist} SYNs of distinct new flows (a client of its own per run, \
         distinct source ports), each run once (one packet per test run, cold), then the \
         no-op on the same packets; every one must pass and write its `begin` event. \
         *event reader*: a thread reads the ring as the agent does: `epoll_wait` on the ring's \
         fd with a {poll} ms timeout, then every event readable; each run starts once it has \
         read every earlier event; pinned to CPU {ccpu} (*another CPU*) or to CPU {bcpu}, the \
         test runs' (*same CPU*: the agent is not pinned, either happens). *no \
         consumer*: nothing waits on the ring, which is drained between runs. *ring full*: \
         {fill} first packets filled the ring before the runs and nothing reads it. Checked: \
         the readers read {consumed} events and the drain {drained}, one per first packet, \
         none lost; the full ring lost every run's event ({lost_full}). *new flows/s per CPU*: \
         10^9 / ns per first packet, the kernel's test-run overhead included. *IRQ work per \
         packet*: the rise of the IWI line of /proc/interrupts (all CPUs) over the xdpgate \
         runs, per packet: a ring-buffer commit that must wake a waiting reader does it \
         through IRQ work.",
        rules = r.rules,
        ring = r.ring_bytes / 1024,
        dist = thousands(r.rows.first().map_or(0, |x| x.packets_per_run as u64)),
        ccpu = r.consumer_cpu,
        bcpu = r.bench_cpu,
        poll = r.poll_ms,
        fill = thousands(u64::from(FILL)),
        consumed = thousands(r.consumed),
        drained = thousands(r.drained),
        lost_full = thousands(r.lost_ring_full),
    );
    let _ = writeln!(md, "\nLoad average when this section finished: {}.", r.load_after);
    md
}
