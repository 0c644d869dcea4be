//! `xdpgate capture`: writes the packets a filter selects, copied by the dataplane at its
//! ingress hook (XDP or tc) as they arrive (`pre`) and as the pipeline leaves them (`post`:
//! after NAT or load balancing, with the verdict), to a pcap or pcapng file or standard
//! output. The filter runs in the kernel (`CAPTURE_CONFIG`), so only what matches is copied;
//! the capture holds a lease there that it refreshes while it runs, so a killed capture
//! stops costing once the lease runs out.

use std::{
    borrow::Cow,
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::Path,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{
    Array, MapData, PerCpuArray, PerCpuValues,
    perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer},
};
use ipnet::IpNet;
use pcap_file::{
    DataLink,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};
use xdpgate_common::{
    capture::{
        CAPTURE_CONFIG, CAPTURE_PERF, CAPTURE_SCRATCH, CaptureConfig, CaptureRecord, MAX_SNAPLEN,
        POINT_POST, POINT_PRE, PROTO_ICMP_ANY,
    },
    stats::{DROP_REASON_NAMES, VERDICT_NAMES},
};
use xdpgate_dataplane::{
    PinDir, ifindex,
    lease::{Held, Lease},
    link_info, monotonic_ns,
    state::Tool,
};

use crate::filter::{FlowFilter, Protocol};

/// How long a lease lasts; its thread renews it every `RENEW`.
const LEASE: Duration = Duration::from_secs(2);
const RENEW: Duration = Duration::from_millis(500);
/// Pages of each CPU's perf ring (256 KiB with 4 KiB pages).
const RING_PAGES: usize = 64;

/// Capture packets at the dataplane's ingress hook into a pcap or pcapng file.
///
/// Example: xdpgate capture --iface eth0 --dst 198.51.100.10 --port 443 -w - | tcpdump -nr -
#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Write to FILE, or to standard output with `-` (for `tcpdump -r -`).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: String,
    /// File format: pcap, or pcapng with each packet's capture point, verdict and drop
    /// reason as its comment.
    #[arg(long, value_enum, default_value = "pcap")]
    pub format: Format,
    /// Only packets arriving on this interface, one xdpgate is attached to (default: every
    /// attached one).
    #[arg(long)]
    pub iface: Option<String>,
    /// Which copies to take: pre (as the packet arrived), post (as the pipeline leaves it:
    /// rewritten by NAT or load balancing, MACs set when forwarded, with its verdict), both.
    #[arg(long, value_enum, default_value = "both")]
    pub point: Point,
    /// Stop after writing this many packets (each copy counts).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop before the file would grow past this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = crate::dates::fractional_seconds)]
    pub duration: Option<f64>,
    /// Bytes kept of each packet (at most 65535).
    #[arg(long, default_value_t = 262, value_parser = clap::value_parser!(u32).range(1..=MAX_SNAPLEN as i64))]
    pub snaplen: u32,
    /// Which packets, judged as they arrive (before any translation); --rule, --verdict
    /// and --reason are not known then and are refused.
    #[command(flatten)]
    pub filter: FlowFilter,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Classic pcap: packets only.
    Pcap,
    /// pcapng, with each copy's point, verdict and drop reason as its comment.
    Pcapng,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Point {
    /// The packet as it arrives.
    Pre,
    /// The packet as the pipeline leaves it (rewritten, with its verdict).
    Post,
    /// Both copies.
    Both,
}

/// Why a capture ended, and what it wrote.
pub struct Summary {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub stopped_by: &'static str,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The kernel filter for `args`: a clear error for what the kernel cannot judge at arrival.
pub fn config(args: &CaptureArgs) -> Result<CaptureConfig> {
    let f = &args.filter;
    if f.rule.is_some() || f.verdict.is_some() || f.reason.is_some() {
        bail!(
            "capture selects packets as they arrive, before they are judged: --rule, --verdict \
             and --reason cannot select them (capture with the address, port and protocol \
             flags, and read the verdict from --format pcapng's comments)"
        );
    }
    let mut c = CaptureConfig {
        snaplen: args.snaplen,
        port: f.port.unwrap_or(0),
        points: match args.point {
            Point::Pre => POINT_PRE,
            Point::Post => POINT_POST,
            Point::Both => POINT_PRE | POINT_POST,
        },
        ..Default::default()
    };
    c.proto = match f.protocol {
        None => 0,
        Some(Protocol::AnyIcmp) => PROTO_ICMP_ANY,
        Some(Protocol::Number(0)) => bail!("--protocol 0 (IPv6 hop-by-hop) cannot be captured"),
        Some(Protocol::Number(PROTO_ICMP_ANY)) => bail!("--protocol 255 cannot be captured"),
        Some(Protocol::Number(n)) => n,
    };
    if let Some(port) = f.port
        && !matches!(f.protocol, None | Some(Protocol::Number(6 | 17)))
    {
        bail!("--port {port} needs a protocol with ports: tcp or udp (or no --protocol)");
    }
    let family = |n: &IpNet| if n.addr().is_ipv6() { 6 } else { 4 };
    if let (Some(s), Some(d)) = (&f.src, &f.dst)
        && family(s) != family(d)
    {
        bail!("--src {s} and --dst {d} are of different address families");
    }
    for (net, addr, mask) in
        [(&f.src, &mut c.src, &mut c.src_mask), (&f.dst, &mut c.dst, &mut c.dst_mask)]
    {
        if let Some(n) = net {
            c.family = family(n);
            (*addr, *mask) = (words(n.network()), words(n.netmask()));
        }
    }
    if let Some(name) = &args.iface {
        c.ifindex = ifindex(name)?;
    }
    Ok(c)
}

fn words(a: IpAddr) -> [u32; 4] {
    xdpgate_common::words(&xdpgate_common::family_bytes(a).1)
}

/// The capture's hold on the kernel filter (`dataplane::lease`): renewed while it runs,
/// cleared when it ends (a killed capture's runs out within `LEASE`).
struct CaptureLease {
    map: Array<MapData, CaptureConfig>,
    scratch: PerCpuArray<MapData, CaptureRecord>,
    config: CaptureConfig,
    /// The perf rings' map, and where their readers go once opened (at the lease's start).
    rings: Option<(PerfEventArray<MapData>, mpsc::Sender<Rings>)>,
}

/// One perf ring per online CPU.
type Rings = Vec<PerfEventArrayBuffer<MapData>>;

impl Held for CaptureLease {
    fn begin(&mut self) -> Result<()> {
        // No mark left from a capture that ended between a packet's two copies.
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        self.scratch.set(0, PerCpuValues::try_from(vec![CaptureRecord::default(); cpus])?, 0)?;
        // Opened under the lock (a refused capture must not open its own over a running
        // one's) and before the lease starts the copies (none goes to a CPU without one).
        if let Some((mut perf, out)) = self.rings.take() {
            let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
            let rings = cpus
                .iter()
                .map(|&cpu| perf.open(cpu, Some(RING_PAGES)))
                .collect::<Result<Rings, _>>()
                .context("opening the capture's perf rings")?;
            let _ = out.send(rings);
        }
        Ok(())
    }

    fn until(&self) -> Result<u64> {
        Ok(self.map.get(&0, 0)?.lease_until_ns)
    }

    fn renew(&mut self, until: u64) -> Result<()> {
        self.config.lease_until_ns = until;
        Ok(self.map.set(0, self.config, 0)?)
    }

    fn release(&mut self) {
        let _ = self.map.set(0, CaptureConfig::default(), 0);
    }
}

/// Takes the capture lock and the lease on the kernel filter; the perf rings the copies go
/// to, open from the lease's start.
fn take_lease(pins: &PinDir, config: CaptureConfig) -> Result<(Lease, Rings)> {
    let map = pins
        .open_map(CAPTURE_CONFIG)
        .context("this dataplane has no capture support: run `xdpgate upgrade`")?
        .try_into()?;
    let scratch = pins.open_map(CAPTURE_SCRATCH)?.try_into()?;
    let perf = pins.open_map(CAPTURE_PERF)?.try_into()?;
    let (out, opened) = mpsc::channel();
    let held = CaptureLease { map, scratch, config, rings: Some((perf, out)) };
    let lease = Lease::take(pins, Tool::Capture, held, LEASE, RENEW)?;
    Ok((lease, opened.recv().context("the capture's perf rings")?))
}

/// Where the format's writer puts each record first, so that its exact size is known
/// before it goes to the output (`--max-bytes`); shared, as the writers keep theirs.
#[derive(Clone, Default)]
struct Staged(Rc<RefCell<Vec<u8>>>);

impl Write for Staged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The file's format writer.
enum Writer {
    Pcap(PcapWriter<Staged>),
    PcapNg(PcapNgWriter<Staged>, Vec<u32>),
}

/// Where the packets go, in the chosen format, and the bytes written so far.
struct Sink {
    writer: Writer,
    staged: Staged,
    out: Box<dyn Write>,
    written: u64,
}

impl Sink {
    fn new(out: Box<dyn Write>, format: Format, snaplen: u32) -> Result<Self> {
        let staged = Staged::default();
        let writer = Self::writer(staged.clone(), format, snaplen)?;
        let mut sink = Sink { writer, staged, out, written: 0 };
        // The file's header.
        sink.commit(None)?;
        Ok(sink)
    }

    /// Bytes of the file's header in `format`.
    fn header_len(format: Format, snaplen: u32) -> Result<u64> {
        let staged = Staged::default();
        Self::writer(staged.clone(), format, snaplen)?;
        Ok(staged.0.borrow().len() as u64)
    }

    /// Sends what is staged to the output, unless the file would pass `max` bytes (then
    /// nothing is written: false).
    fn commit(&mut self, max: Option<u64>) -> Result<bool> {
        let staged = std::mem::take(&mut *self.staged.0.borrow_mut());
        if max.is_some_and(|m| self.written + staged.len() as u64 > m) {
            return Ok(false);
        }
        self.out.write_all(&staged)?;
        self.written += staged.len() as u64;
        Ok(true)
    }

    fn writer(out: Staged, format: Format, snaplen: u32) -> Result<Writer> {
        Ok(match format {
            Format::Pcap => Writer::Pcap(PcapWriter::with_header(
                out,
                PcapHeader {
                    snaplen,
                    ts_resolution: pcap_file::TsResolution::NanoSecond,
                    endianness: pcap_file::Endianness::native(),
                    ..Default::default()
                },
            )?),
            Format::Pcapng => Writer::PcapNg(PcapNgWriter::new(out)?, Vec::new()),
        })
    }

    /// Writes one copy (and, in pcapng, its interface's description the first time), unless
    /// the file would pass `max` bytes: then nothing, and false.
    fn write(
        &mut self,
        rec: &CaptureRecord,
        data: &[u8],
        snaplen: u32,
        max: Option<u64>,
    ) -> Result<bool> {
        self.stage(rec, data, snaplen)?;
        self.commit(max)
    }

    fn stage(&mut self, rec: &CaptureRecord, data: &[u8], snaplen: u32) -> Result<()> {
        let time = wall_time(rec.time_ns);
        match &mut self.writer {
            Writer::Pcap(w) => {
                w.write_packet(&PcapPacket::new(time, rec.len, data))?;
            }
            Writer::PcapNg(w, ifaces) => {
                let id = match ifaces.iter().position(|&i| i == rec.ifindex) {
                    Some(id) => id,
                    None => {
                        let name = iface_name(rec.ifindex);
                        w.write_pcapng_block(InterfaceDescriptionBlock {
                            linktype: DataLink::ETHERNET,
                            snaplen,
                            options: vec![
                                InterfaceDescriptionOption::IfName(Cow::Owned(name)),
                                InterfaceDescriptionOption::IfTsResol(9),
                            ],
                        })?;
                        ifaces.push(rec.ifindex);
                        ifaces.len() - 1
                    }
                };
                w.write_pcapng_block(EnhancedPacketBlock {
                    interface_id: id as u32,
                    timestamp: time,
                    original_len: rec.len,
                    data: Cow::Borrowed(data),
                    options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment(rec)))],
                })?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A copy's pcapng comment: `xdpgate pre`, or `xdpgate post verdict=drop reason=policy`.
pub fn comment(rec: &CaptureRecord) -> String {
    if rec.point == POINT_PRE {
        return "xdpgate pre".into();
    }
    let verdict = VERDICT_NAMES.get(usize::from(rec.verdict)).copied().unwrap_or("aborted");
    match (verdict, DROP_REASON_NAMES.get(usize::from(rec.reason))) {
        ("drop", Some(reason)) => format!("xdpgate post verdict=drop reason={reason}"),
        _ => format!("xdpgate post verdict={verdict}"),
    }
}

fn iface_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("if{ifindex}"))
}

/// CLOCK_MONOTONIC `ns` as time since the epoch.
fn wall_time(ns: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(Duration::from_nanos(monotonic_ns().saturating_sub(ns)))
}

/// Runs the capture until a bound, an interrupt or the reader's end; the summary goes to
/// standard error (standard output may be the capture).
pub fn run(pins: &PinDir, args: &CaptureArgs) -> Result<Summary> {
    let config = config(args)?;
    // No copy would ever come from an interface the dataplane does not see, as `trace` says.
    if let Some(name) = &args.iface {
        link_info(pins, name).with_context(|| format!("{name} is not attached to xdpgate"))?;
    }
    // Before the file is opened (truncated): a bound the header alone would pass.
    if let Some(max) = args.max_bytes {
        let header = Sink::header_len(args.format, args.snaplen)?;
        if max < header {
            let format = if args.format == Format::Pcap { "pcap" } else { "pcapng" };
            bail!(
                "--max-bytes {max} is less than the {header}-byte {format} header: the header \
                 alone would pass it"
            );
        }
    }
    // Before the lease: a Ctrl-C as it starts must end the capture, not kill the process
    // and leave the kernel copying packets until the lease runs out.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // The lease (and its lock) first: a capture refused for another's must not open the
    // perf rings over that one's, nor truncate its file.
    let (lease, mut rings) = take_lease(pins, config)?;
    let out: Box<dyn Write> = if args.write == "-" {
        Box::new(BufWriter::new(io::stdout().lock()))
    } else {
        Box::new(BufWriter::new(open_output(Path::new(&args.write))?))
    };
    let mut sink = Sink::new(out, args.format, args.snaplen)?;
    // A reader that goes away (tcpdump -c) ends the capture as a bound would: a write
    // error, not a signal that skips clearing the lease.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs_f64(s));
    let mut summary = Summary { packets: 0, bytes: 0, lost: 0, stopped_by: "" };
    let stop = loop {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break "interrupted";
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break "duration";
        }
        wait_readable(&rings, Duration::from_millis(100));
        if let Some(why) = drain(&mut rings, &mut sink, args, &mut summary)? {
            break why;
        }
    };
    drop(lease);
    sink.flush()
        .or_else(|e| if e.kind() == io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) })?;
    summary.stopped_by = stop;
    summary.bytes = sink.written;
    Ok(summary)
}

/// The capture file at `path`, empty, root's only: whole packets, payloads and all, as
/// dumpcap makes them (mode 0600). It may be in a directory others write to (`/tmp`), so
/// it is not a link another user put there for root to write through (to a file of
/// root's: the last component is not followed, a file with other names is refused), nor a
/// file or FIFO another user made beforehand (readable by them, or theirs to read later).
/// A FIFO or device of this user's own (`/dev/null`, a pipe to a reader) is written as it
/// is.
fn open_output(path: &Path) -> Result<File> {
    let shown = path.display();
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    refuse_others_links(path, me)?;
    let belongs =
        |uid: u32| anyhow!("{shown} belongs to uid {uid}, not to this user ({me}): not written to");
    // Before the open too: another user's FIFO with no reader fails it otherwise.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_symlink()
        && meta.uid() != me
    {
        return Err(belongs(meta.uid()));
    }
    // Not blocking: a FIFO without a reader would hold the open (and the capture's lock)
    // for good, signals and all; its owner is checked first.
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| {
            format!("creating {shown} (a symbolic link is not followed, a FIFO needs a reader)")
        })?;
    let meta = file.metadata().with_context(|| format!("{shown}"))?;
    if meta.uid() != me {
        return Err(belongs(meta.uid()));
    }
    let kind = meta.file_type();
    // Blocking from here: a reader slower than the packets holds the capture up, as it must.
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_WRONLY))
        .with_context(|| format!("{shown}"))?;
    if kind.is_fifo() || kind.is_char_device() {
        return Ok(file);
    }
    if !kind.is_file() {
        bail!("{shown} is not a regular file, a FIFO or a character device: not written to");
    }
    if meta.nlink() != 1 {
        bail!("{shown} has {} names (hard links): not written to", meta.nlink());
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{shown}: making it root's only"))?;
    file.set_len(0).with_context(|| format!("emptying {shown}"))?;
    Ok(file)
}

/// Refuses a path through a symbolic link of a user other than root and `me` (a directory
/// of root's reached through a link in `/tmp`, say): only the last component is opened
/// without following.
fn refuse_others_links(path: &Path, me: u32) -> Result<()> {
    let absolute = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    for dir in absolute.ancestors().skip(1) {
        let Ok(meta) = std::fs::symlink_metadata(dir) else { continue };
        if meta.file_type().is_symlink() && meta.uid() != 0 && meta.uid() != me {
            bail!(
                "{}: {} is a symbolic link of uid {}: not followed",
                path.display(),
                dir.display(),
                meta.uid()
            );
        }
    }
    Ok(())
}

fn wait_readable(rings: &[PerfEventArrayBuffer<MapData>], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = rings
        .iter()
        .map(|r| libc::pollfd { fd: r.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.as_millis() as i32) };
}

/// Writes what the rings hold; `Some(why)` once a bound is reached or the reader is gone.
fn drain(
    rings: &mut [PerfEventArrayBuffer<MapData>],
    sink: &mut Sink,
    args: &CaptureArgs,
    summary: &mut Summary,
) -> Result<Option<&'static str>> {
    let head = size_of::<CaptureRecord>();
    for ring in rings.iter_mut() {
        let mut sample = Vec::new();
        let flow = ring.try_fold((), |(), event| {
            let (h, t) = match event {
                PerfEvent::Lost { count } => {
                    summary.lost += count;
                    return std::ops::ControlFlow::Continue(());
                }
                PerfEvent::Sample { head, tail } => (head, tail),
            };
            sample.clear();
            sample.extend_from_slice(h);
            sample.extend_from_slice(t);
            if sample.len() < head {
                return std::ops::ControlFlow::Continue(());
            }
            let rec: CaptureRecord =
                unsafe { std::ptr::read_unaligned(sample.as_ptr().cast::<CaptureRecord>()) };
            let cap = (rec.cap_len as usize).min(sample.len() - head);
            let data = &sample[head..head + cap];
            if args.count.is_some_and(|n| summary.packets >= n) {
                return std::ops::ControlFlow::Break(Ok("count"));
            }
            match sink.write(&rec, data, args.snaplen, args.max_bytes) {
                Ok(true) => summary.packets += 1,
                Ok(false) => return std::ops::ControlFlow::Break(Ok("max_bytes")),
                Err(e) => return std::ops::ControlFlow::Break(Err(e)),
            }
            if args.count.is_some_and(|n| summary.packets >= n) {
                return std::ops::ControlFlow::Break(Ok("count"));
            }
            std::ops::ControlFlow::Continue(())
        });
        match flow {
            std::ops::ControlFlow::Break(Ok(why)) => return Ok(Some(why)),
            std::ops::ControlFlow::Break(Err(e)) if broken_pipe(&e) => return Ok(Some("reader")),
            std::ops::ControlFlow::Break(Err(e)) => return Err(e),
            std::ops::ControlFlow::Continue(()) => {}
        }
    }
    match sink.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Some("reader")),
        r => r.map(|()| None).map_err(Into::into),
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<pcap_file::PcapError>().is_some_and(|p| {
                matches!(p, pcap_file::PcapError::IoError(e) if e.kind() == io::ErrorKind::BrokenPipe)
            })
    })
}
