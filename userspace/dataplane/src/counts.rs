//! Counts kept apart from the dataplane's per-CPU counters (the embryonic flows ended from
//! userspace), and the shapes counters take in reports; below `stats`, `flows` and `nat`,
//! which all count.

use anyhow::Result;
use serde::Serialize;
use xdpgate_common::{flow::FlowValue, stats::Counter};

use crate::{PinDir, state};

#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Traffic {
    fn from(c: Counter) -> Self {
        Self { packets: c.packets, bytes: c.bytes }
    }
}

/// A flow entry's traffic in its direction.
impl From<&FlowValue> for Traffic {
    fn from(v: &FlowValue) -> Self {
        Self { packets: v.packets, bytes: v.bytes }
    }
}

/// A packet count in JSON: `{"packets": n}`, the shape of every counter.
#[derive(Serialize)]
struct Packets {
    packets: u64,
}

pub(crate) fn drops_by_reason<S: serde::Serializer>(
    pairs: &[(&'static str, u64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|&(name, packets)| (name, Packets { packets })))
}

/// The files that count embryos ended from userspace: the dataplane's counters are per
/// CPU, which userspace cannot add to without losing the dataplane's own adds, and uncounted
/// they would pass for evicted ones. In the state directory, which lives as long as the
/// pinned counters (both go at a reboot). `embryos-ended`: those the agent's sweep (lone
/// exchanges) and NAT expiry (the embryos of the translations it expires) ended, written by
/// the agent alone; `embryos-deleted`: those `flows delete` removed, under the write lock.
pub(crate) const ENDED: &str = "embryos-ended";
pub(crate) const DELETED: &str = "embryos-deleted";

/// A count kept in file `name` of the state directory; 0 when none (or unreadable).
pub(crate) fn embryo_count(pins: &PinDir, name: &str) -> u64 {
    let path = state::dir(pins).join(name);
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Adds `n` to the count in file `name`, one writer at a time (see [`ENDED`]).
fn add_embryo_count(pins: &PinDir, name: &str, n: u64) -> Result<()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if n == 0 {
        return Ok(());
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Made again if a cleaner of `/run` removed it (the count then starts from zero).
    state::ensure_dir(pins)?;
    let total = embryo_count(pins, name) + n;
    state::write_atomic(&state::dir(pins).join(name), total.to_string().as_bytes(), 0o600)
}

/// Starts the counts of embryos ended from userspace afresh, as the dataplane's counters
/// are made anew.
pub fn forget_ended_embryos(pins: &PinDir) {
    for name in [ENDED, DELETED] {
        let _ = std::fs::remove_file(state::dir(pins).join(name));
    }
}

/// Counts `n` more embryos ended by the agent (its sweep thread and its loop).
pub fn add_ended_embryos(pins: &PinDir, n: u64) -> Result<()> {
    add_embryo_count(pins, ENDED, n)
}

/// Counts `n` more embryos removed by `flows delete`, which holds the write lock.
pub fn add_deleted_embryos(pins: &PinDir, n: u64) -> Result<()> {
    add_embryo_count(pins, DELETED, n)
}
