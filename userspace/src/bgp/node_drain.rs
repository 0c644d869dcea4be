//! Whether the whole node is drained (`xdpgate drain`): kept in `node_drain.json` in the
//! state directory, so it survives agent restarts; the agent reads it every second. When the
//! file cannot be read, `announce::drained_or_last` goes by the announcements' record; the
//! command is `drain_cmd.rs`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use xdpgate_dataplane::{PinDir, state};

const FILE: &str = "node_drain.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrain {
    pub drained: bool,
    /// When it was drained, in seconds since the Unix epoch.
    pub since_unix_seconds: Option<u64>,
}

/// The node's drain state (not drained when the file is absent).
pub fn read(pins: &PinDir) -> Result<NodeDrain> {
    state::read_json(pins, FILE)
}

/// Drains or undrains the node; whether it changed anything. A file that does not parse
/// (broken by hand) must not hold up a drain: it is replaced, and said so.
pub fn set(pins: &PinDir, drained: bool) -> Result<bool> {
    let was = match read(pins) {
        Err(e) if e.root_cause().is::<serde_json::Error>() => {
            eprintln!("warning: {e:#}; replacing it");
            NodeDrain { drained: !drained, since_unix_seconds: None }
        }
        was => was?,
    };
    if was.drained == drained {
        return Ok(false);
    }
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = NodeDrain { drained, since_unix_seconds: drained.then_some(since) };
    state::write_json(pins, FILE, &now)?;
    Ok(true)
}
