//! Flow logs in the spirit of Azure's NSG flow logs: one JSON object per line and flow
//! tuple, with the NSG and rule that decided it, the decision and the flow state (`begin`,
//! `end`; `deny`), and for ended flows the packets and bytes each way. `begin` and `deny`
//! come from the dataplane's ring buffer; `end` from the agent's sweep of idle flows.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::PathBuf,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use xdpgate_common::{
    events::{EVENT_BEGIN, FlowEvent},
    flow::FlowKey,
    nsg::DIR_INBOUND,
};

use xdpgate_dataplane::{
    PinDir,
    flows::{self, Names},
    nat::monotonic_ns,
};

/// Where log lines go: stdout, or a file rotated to `FILE.1` when it reaches `max_bytes`.
pub enum Sink {
    Stdout,
    File { path: PathBuf, max_bytes: u64, file: File, written: u64 },
}

impl Sink {
    /// `-` for stdout, else a file appended to.
    pub fn open(target: &str, max_bytes: u64) -> Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout);
        }
        let path = PathBuf::from(target);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {target}"))?;
        let written = file.metadata()?.len();
        Ok(Sink::File { path, max_bytes, file, written })
    }

    pub fn write(&mut self, line: &Value) -> Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        match self {
            Sink::Stdout => io::stdout().write_all(text.as_bytes())?,
            Sink::File { path, max_bytes, file, written } => {
                if *written > 0 && *written + text.len() as u64 > *max_bytes {
                    let mut rotated = path.clone().into_os_string();
                    rotated.push(".1");
                    fs::rename(&*path, &rotated)?;
                    *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                    *written = 0;
                }
                file.write_all(text.as_bytes())?;
                *written += text.len() as u64;
            }
        }
        Ok(())
    }
}

/// Converts the dataplane's monotonic nanoseconds to wall-clock seconds.
fn wall_clock(mono_ns: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now - (monotonic_ns().saturating_sub(mono_ns)) as f64 / 1e9
}

fn protocol(p: u8) -> Value {
    match p {
        6 => json!("tcp"),
        17 => json!("udp"),
        1 | 58 => json!("icmp"),
        n => json!(n),
    }
}

fn tuple(key: &FlowKey) -> Value {
    json!({
        "src": flows::addr(&key.src, key.family).to_string(),
        "sport": key.sport,
        "dst": flows::addr(&key.dst, key.family).to_string(),
        "dport": key.dport,
        "protocol": protocol(key.proto),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn rule_fields(names: &Names, rule: u32, generation: u64) -> Value {
    match names.rule(rule, generation) {
        Some((nsg, rule, _)) => json!({"nsg": nsg, "rule": rule}),
        None => json!({"nsg": null, "rule": null}),
    }
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
        rule_fields(names, e.rule, e.generation),
    )
}

/// Removes flows idle past their timeout from the flow table and returns an `end` line for
/// each, with its packets and bytes both ways. (The dataplane already treats them as gone;
/// this makes their end visible and frees the entries.)
pub fn sweep(pins: &PinDir, names: &Names) -> Result<Vec<Value>> {
    let mut lines = Vec::new();
    for (key, fwd, back) in flows::remove_idle(pins, names)? {
        let last = fwd.last_seen_ns.max(back.map_or(0, |b| b.last_seen_ns));
        lines.push(merge(
            merge(
                json!({
                    "time": wall_clock(last),
                    "direction": if u32::from(fwd.direction) == DIR_INBOUND { "inbound" } else { "outbound" },
                    "decision": "allow",
                    "state": "end",
                    "packets_forward": fwd.packets,
                    "bytes_forward": fwd.bytes,
                    "packets_reverse": back.map_or(0, |b| b.packets),
                    "bytes_reverse": back.map_or(0, |b| b.bytes),
                }),
                tuple(&key),
            ),
            rule_fields(names, fwd.rule, fwd.generation),
        ));
    }
    Ok(lines)
}
