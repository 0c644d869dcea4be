//! Flow logs in the spirit of Azure's NSG flow logs: one JSON object per line and flow
//! tuple, with the NSG and rule that decided it, the decision and the flow state (`begin`,
//! `end`; `deny`), and for ended flows the packets and bytes each way. `begin` and `deny`
//! come from the dataplane's ring buffer; `end` from the agent's sweep of idle flows
//! (`flows::remove_idle`), which runs with or without a flow log.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use xdpgate_common::{
    events::{EVENT_BEGIN, FlowEvent},
    flow::{FlowKey, FlowValue},
    nsg::DIR_INBOUND,
};

use xdpgate_dataplane::{
    flows::{self, Ended, Names, RuleName},
    nat::monotonic_ns,
};

/// Where log lines go: stdout, or a file rotated to `FILE.1` when it reaches `max_bytes`.
pub enum Sink {
    Stdout,
    File(FileSink),
}

pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
    /// The file ends in part of a line that could not be cut off: the next line starts on
    /// a new one.
    mid_line: bool,
}

/// Cuts a partial last line (left by a write that failed half-way) off the file, so every
/// line stays whole JSON. Returns the length, and whether the file still ends mid-line (it
/// could not be cut): then the next line starts with a line break.
fn cut_partial_line(file: &File, len: u64) -> (u64, bool) {
    let take = len.min(64 << 10);
    let mut tail = vec![0u8; take as usize];
    if take == 0 || file.read_exact_at(&mut tail, len - take).is_err() {
        return (len, false);
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) if i + 1 == tail.len() => return (len, false),
        Some(i) => len - take + i as u64 + 1,
        None if take == len => 0,
        // No line end in the last 64 KiB: not a flow log to cut.
        None => return (len, true),
    };
    match file.set_len(keep) {
        Ok(()) => {
            log::warn!("flow log: cut a partial last line of {} bytes", len - keep);
            (keep, false)
        }
        Err(_) => (len, true),
    }
}

impl FileSink {
    /// Opens `path` for appending, created mode 0640 (flow logs name every peer: not for
    /// every local user).
    fn open(path: PathBuf, max_bytes: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .with_context(|| format!("opening flow log {}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (written, mid_line) = cut_partial_line(&file, len);
        Ok(Self { path, max_bytes, file, written, mid_line })
    }

    fn reopen(&mut self) -> Result<()> {
        *self = Self::open(self.path.clone(), self.max_bytes)?;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        match fs::rename(&self.path, &rotated) {
            Ok(()) => {}
            // Removed under us: nothing to rotate, start a new file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::warn!(
                    "flow log {} was removed; writing to a new file there",
                    self.path.display()
                );
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "rotating flow log {} to {}",
                        self.path.display(),
                        Path::new(&rotated).display()
                    )
                });
            }
        }
        self.reopen()
    }

    fn append(&mut self, text: &str) -> io::Result<()> {
        let text = if self.mid_line { format!("\n{text}") } else { text.to_owned() };
        let result = self.file.write_all(text.as_bytes());
        // After a failure, what part got written is unknown: ask the file.
        self.reopen().map_err(io::Error::other)?;
        result
    }
}

impl Sink {
    /// `-` for stdout, else a file appended to.
    pub fn open(target: &str, max_bytes: u64) -> Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout);
        }
        Ok(Sink::File(FileSink::open(PathBuf::from(target), max_bytes)?))
    }

    /// Opens the file at the path anew (logrotate style: after the old one was moved away,
    /// lines go to a new file at the same path).
    pub fn reopen(&mut self) -> Result<()> {
        if let Sink::File(f) = self {
            f.reopen()?;
        }
        Ok(())
    }

    /// Reopens the file if the path no longer names the file being written (removed or
    /// moved away); returns its path if it did.
    pub fn follow(&mut self) -> Result<Option<PathBuf>> {
        let Sink::File(f) = self else { return Ok(None) };
        let same = match (fs::metadata(&f.path), f.file.metadata()) {
            (Ok(p), Ok(o)) => (p.dev(), p.ino()) == (o.dev(), o.ino()),
            _ => false,
        };
        if same {
            return Ok(None);
        }
        f.reopen()?;
        Ok(Some(f.path.clone()))
    }

    /// Writes one line; a file that fails is reopened and the line tried once more.
    pub fn write(&mut self, line: &Value) -> Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        match self {
            Sink::Stdout => {
                io::stdout().write_all(text.as_bytes()).context("writing flow log to stdout")?
            }
            Sink::File(f) => {
                if f.written > 0 && f.written + text.len() as u64 > f.max_bytes {
                    f.rotate()?;
                }
                if f.mid_line || f.file.write_all(text.as_bytes()).is_err() {
                    // A failed write (or one before): reopen, and once more from a new line.
                    f.reopen()?;
                    f.append(&text)
                        .with_context(|| format!("writing flow log {}", f.path.display()))?;
                } else {
                    f.written += text.len() as u64;
                }
            }
        }
        Ok(())
    }
}

/// Converts the dataplane's monotonic nanoseconds to wall-clock seconds.
pub fn wall_clock(mono_ns: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now - (monotonic_ns().saturating_sub(mono_ns)) as f64 / 1e9
}

fn protocol(family: u8, p: u8) -> Value {
    match p {
        6 => json!("tcp"),
        17 => json!("udp"),
        // ICMP of the flow's family; the other family's number is a plain protocol.
        p if xdpgate_common::is_icmp(family, p) => json!("icmp"),
        n => json!(n),
    }
}

fn tuple(key: &FlowKey) -> Value {
    json!({
        "src": flows::addr(&key.src, key.family).to_string(),
        "sport": key.sport,
        "dst": flows::addr(&key.dst, key.family).to_string(),
        "dport": key.dport,
        "protocol": protocol(key.family, key.proto),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The deciding rule (`nsg`, `rule`: the destination side's when an NSG applied there, else
/// the source side's) and the rule of each side (`rules.outbound`, `rules.inbound`).
fn rule_fields(names: &Names, rules: [u16; 2], generation: u64) -> Value {
    let sides = names.rules(rules, generation);
    let name = |r: Option<&RuleName>| r.map(|r| json!({"nsg": r.nsg, "rule": r.rule}));
    json!({
        "nsg": sides.deciding().map(|r| &r.nsg),
        "rule": sides.deciding().map(|r| &r.rule),
        "rules": {"outbound": name(sides.outbound.as_ref()), "inbound": name(sides.inbound.as_ref())},
    })
}

/// The log line of a dataplane event.
pub fn event_line(names: &Names, e: &FlowEvent) -> Value {
    let begin = e.kind == EVENT_BEGIN;
    merge(
        merge(
            json!({
                "time": wall_clock(e.time_ns),
                "direction": if u32::from(e.direction) == DIR_INBOUND { "inbound" } else { "outbound" },
                "decision": if begin { "allow" } else { "deny" },
                "state": if begin { "begin" } else { "deny" },
            }),
            tuple(&e.key),
        ),
        rule_fields(names, e.rules, e.generation),
    )
}

/// The `end` line of a flow the agent's sweep removed, with its packets and bytes both ways
/// (zero for a direction whose entry was already gone).
pub fn end_line(names: &Names, ended: &Ended) -> Value {
    let main = ended.main();
    let traffic = |v: Option<FlowValue>| v.map_or((0, 0), |v| (v.packets, v.bytes));
    let (packets_forward, bytes_forward) = traffic(ended.forward);
    let (packets_reverse, bytes_reverse) = traffic(ended.reply);
    let last = ended.forward.iter().chain(ended.reply.iter()).map(|v| v.last_seen_ns).max();
    merge(
        merge(
            json!({
                "time": wall_clock(last.unwrap_or(0)),
                "direction": if u32::from(main.direction) == DIR_INBOUND { "inbound" } else { "outbound" },
                "decision": "allow",
                "state": "end",
                "packets_forward": packets_forward,
                "bytes_forward": bytes_forward,
                "packets_reverse": packets_reverse,
                "bytes_reverse": bytes_reverse,
            }),
            tuple(&ended.key),
        ),
        rule_fields(names, main.rules, main.generation),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_last_line_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("xgflowlog{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (before, after, mid_line) in [
            ("", "", false),
            ("{\"a\":1}\n", "{\"a\":1}\n", false),
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n", false),
            ("{\"b\":", "", false),
        ] {
            let path = dir.join("f.jsonl");
            fs::write(&path, before).unwrap();
            let f = FileSink::open(path.clone(), 1 << 20).unwrap();
            assert_eq!(fs::read_to_string(&path).unwrap(), after, "{before:?}");
            assert_eq!((f.written, f.mid_line), (after.len() as u64, mid_line));
        }
        // A long line with no line end in the last 64 KiB is not ours to cut.
        let path = dir.join("g.jsonl");
        fs::write(&path, format!("x\n{}", "y".repeat(70_000))).unwrap();
        let f = FileSink::open(path.clone(), 1 << 20).unwrap();
        assert_eq!((f.written, f.mid_line), (70_002, true));
        let _ = fs::remove_dir_all(&dir);
    }
}
