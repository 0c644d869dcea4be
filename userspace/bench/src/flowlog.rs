//! The flow log and the agent's loop: a walk's `continuing` lines made text on the walk's
//! thread, handed to `FlowLog::write_interim` as the agent's loop does after each walk of
//! the flow table (which queues them), and written by the flow log's own thread, to a file
//! on the disk the bench runs from and to one whose every write fails as on a full disk
//! (`/dev/full`). What the loop spends is time it reads no flow events and handles no
//! signal; the two threads' time is the flow log's own.

use std::{fmt::Write as _, fs, path::Path, sync::atomic::AtomicBool, time::Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use xdpgate::flowlog::{
    self, Done, FlowLog, Lines, ProbeConnections, ProbeTraffic, Probes, Reported, Sink,
};
use xdpgate_dataplane::{
    PinDir,
    flows::{self, Names},
};

use crate::{
    common::{Config, Machine, Rows, median, thousands},
    memory::status_kib,
};

/// Lines per walk (a walk of a table with this many flows with traffic since their last
/// record); the quick run writes a tenth.
const LINES: usize = 200_000;

#[derive(Serialize)]
pub struct Row {
    pub target: String,
    pub lines: usize,
    /// Medians over the runs, µs per line: the walk's thread making text of the lines, the
    /// loop queueing them, the flow log's thread writing them.
    pub text_us_per_line: f64,
    pub loop_us_per_line: f64,
    pub write_us_per_line: f64,
    /// Write system calls per 1,000 lines (the process's `syscw` in /proc).
    pub writes_per_1000_lines: f64,
    /// Whether the writes succeeded (they must on the file, and fail on the full disk).
    pub written: bool,
}

pub type Report = Rows<Row>;

/// One walk for interim records of a table whose every flow had traffic since its last
/// record (a `Reported` that knows each flow at half its counts): the agent's walk
/// (`flowlog::interim_lines`, on its thread, which queues its lines in chunks as it goes),
/// the loop queueing the last of them, and the flow log's thread writing them to a file.
#[derive(Serialize, Clone, Copy)]
pub struct Walk {
    pub lines: usize,
    pub walk_secs: f64,
    pub loop_secs: f64,
    /// From the end of the walk until every line is written.
    pub write_secs: f64,
    /// The lines' bytes.
    pub bytes: u64,
    /// The process's peak resident memory during the walk and the write, over its resident
    /// memory before (VmHWM reset through /proc/self/clear_refs).
    pub peak_growth_bytes: u64,
}

/// [`Walk`] of the established table in `pins`, which must hold `flows` flows with traffic.
pub fn walk(pins: &PinDir, flows: usize) -> Result<Walk> {
    let names = Names::read(pins)?;
    // Every flow known to the walks, its last record at half its counts: a walk of flows
    // that all had traffic since their last records, the agent's steady state. (Counted
    // from zero, each would be a first record, of which one walk holds only 4 MiB.)
    let reported = Reported::default();
    reported.seed(|each| {
        flows::established(pins, |mut flow| {
            for v in flow.forward.iter_mut().chain(flow.reply.iter_mut()) {
                (v.packets, v.bytes) = (v.packets / 2, v.bytes / 2);
            }
            each(flow)
        })
    })?;
    let probes = Probes { traffic: ProbeTraffic::Omit, connections: ProbeConnections::default() };
    let dir = std::env::temp_dir().join(format!("xdpgate-bench-walk-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("flows.jsonl");
    let mut log =
        FlowLog::new(Sink::open(file.to_str().context("path")?, u64::MAX, 1)?, ProbeTraffic::Omit);
    fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    let rss_before = status_kib("VmRSS:");
    let started = Instant::now();
    let queue = log.writer.queue();
    let go = AtomicBool::new(false);
    let walked = flowlog::interim_lines(pins, &names, &reported, &probes, &queue, &go);
    if let Some(e) = walked.failed {
        bail!("the walk failed: {e:#}");
    }
    let walk_secs = started.elapsed().as_secs_f64();
    if let Some(e) = walked.dropped {
        bail!("the walk's lines were dropped: {e:#}");
    }
    let (loop_secs, write_secs, written) = write(&mut log, walked.rest, walked.chunks);
    let peak_growth_bytes = status_kib("VmHWM:").saturating_sub(rss_before) << 10;
    let text = fs::read(&file).with_context(|| format!("reading {}", file.display()));
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = written {
        bail!("writing the walk's lines: {e:#}");
    }
    let text = text?;
    let lines = text.iter().filter(|&&b| b == b'\n').count();
    if lines != flows {
        bail!("a walk of {flows} flows with traffic wrote {lines} lines");
    }
    let bytes = text.len() as u64;
    Ok(Walk { lines, walk_secs, loop_secs, write_secs, bytes, peak_growth_bytes })
}

/// Hands `lines` to the flow log as the agent's loop does, and waits for its thread to have
/// written them and the `before` batches queued earlier: the loop's seconds, the seconds
/// until all were written, and the first failure.
fn write(log: &mut FlowLog, lines: Lines, before: usize) -> (f64, f64, Result<()>) {
    let started = Instant::now();
    let some = !lines.is_empty();
    let mut result = log.write_interim(lines);
    let batches = before + usize::from(some && result.is_ok());
    let loop_secs = started.elapsed().as_secs_f64();
    for _ in 0..batches {
        let wrote = match log.writer.wait() {
            Some(Done::Wrote(wrote)) => wrote,
            other => Err(anyhow::anyhow!("the flow log's thread did {other:?}")),
        };
        result = result.and(wrote);
    }
    (loop_secs, started.elapsed().as_secs_f64(), result)
}

/// A `continuing` line as docs/flowlog.md shows one, of flow `i`.
fn line(i: usize) -> Value {
    let t = json!({"bytes": 426, "packets": 3});
    json!({
        "decision": "allow", "delta": {"forward": t, "reply": t}, "direction": "inbound",
        "dst": "198.51.100.10", "dst_port": 5353, "forward": t, "nsg": "servers",
        "protocol": "udp", "reply": t, "rule": "allow-dns",
        "rules": {"inbound": {"nsg": "servers", "rule": "allow-dns"}, "outbound": null},
        "src": format!("203.0.113.{}", i % 250), "src_port": 1024 + i % 60_000,
        "state": "continuing", "time": "2026-11-30T11:05:28.710Z", "version": 2,
    })
}

/// This process's write system calls so far.
fn writes() -> Result<u64> {
    let io = fs::read_to_string("/proc/self/io").context("reading /proc/self/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw: "))
        .and_then(|n| n.trim().parse().ok())
        .context("no syscw in /proc/self/io")
}

pub fn measure(cfg: &Config, machine: &Machine) -> Result<Report> {
    let lines = if cfg.quick { LINES / 10 } else { LINES };
    let dir = std::env::temp_dir().join(format!("xdpgate-bench-flowlog-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("flows.jsonl");
    let targets = [
        ("a file (no rotation)", file.as_path()),
        ("a full disk (/dev/full)", Path::new("/dev/full")),
    ];
    let mut rows = Vec::new();
    for (target, path) in targets {
        let (mut text_us, mut loop_us, mut write_us, mut calls, mut written) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), true);
        for _ in 0..cfg.runs {
            let _ = fs::remove_file(&file);
            let sink = Sink::open(path.to_str().context("path")?, u64::MAX, 1)?;
            let mut log = FlowLog::new(sink, ProbeTraffic::Omit);
            // A probe target, so that each line is checked against it as the agent's are.
            let probes = Probes {
                traffic: ProbeTraffic::Omit,
                connections: ProbeConnections {
                    targets: [("192.0.2.1".parse()?, 80)].into(),
                    local: ["192.0.2.2".parse()?].into(),
                },
            };
            let walk: Vec<Value> = (0..lines).map(line).collect();
            let started = Instant::now();
            let mut texts = Lines::default();
            for l in walk {
                probes.push(&mut texts, l);
            }
            let walk = texts;
            text_us.push(started.elapsed().as_secs_f64() * 1e6 / lines as f64);
            let before = writes()?;
            let (loop_secs, write_secs, result) = write(&mut log, walk, 0);
            loop_us.push(loop_secs * 1e6 / lines as f64);
            write_us.push(write_secs * 1e6 / lines as f64);
            calls.push((writes()? - before) as f64 * 1000.0 / lines as f64);
            written = result.is_ok();
        }
        // The wrong outcome would mean the wrong path was measured.
        if written != (path == file) {
            bail!("flow-log writes to {target}: written {written}");
        }
        if written && fs::read_to_string(&file)?.lines().count() != lines {
            bail!("flow-log writes to {target}: not every line is in the file");
        }
        rows.push(Row {
            target: target.into(),
            lines,
            text_us_per_line: median(&text_us),
            loop_us_per_line: median(&loop_us),
            write_us_per_line: median(&write_us),
            writes_per_1000_lines: median(&calls),
            written,
        });
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(Report { machine: machine.clone(), quick: cfg.quick, runs: cfg.runs, rows })
}

pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### Flow-log lines and the agent's loop\n");
    md.push_str(&r.machine.header_without_ratios(r.quick));
    let _ = writeln!(
        md,
        "| written to | lines per walk | µs per line: the walk's thread making text | the loop queueing | the flow log's thread writing | write calls per 1,000 lines | written |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
    for row in &r.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.3} | {:.2} | {:.1} | {} |",
            row.target,
            thousands(row.lines as u64),
            row.text_us_per_line,
            row.loop_us_per_line,
            row.write_us_per_line,
            row.writes_per_1000_lines,
            if row.written { "yes" } else { "no (as it must)" },
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: one walk's `continuing` lines made text as the walk's thread makes them \
         (`Probes::push`: checked against a probe target, serialized into one buffer), handed \
         to `FlowLog::write_interim` as the agent's loop does after each walk (it queues them \
         for the flow log's thread), and waited for until that thread has written them (µs \
         per line from the hand-over). Median of {} runs. Write calls are the process's \
         `syscw` (/proc/self/io). On the full disk every write fails with ENOSPC and the file \
         is reopened after a failure.\n",
        r.runs
    );
    md
}
