//! `xdpgate drain` / `xdpgate undrain`: the whole node stops announcing its frontends over
//! BGP (and starts again), so the routers send new connections to the other gateways, e.g.
//! before an upgrade. The state is `node_drain.json` in the state directory: it survives
//! agent restarts, and the agent reads it every second.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use xdpgate_dataplane::{PinDir, host_routes, state};

use super::announce;

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

/// Whether the node is drained, for what must go on when the file cannot be read (broken
/// by hand): then as the agent's record last had it (drained without one: a node whose
/// state is unknown is not announced), with the error.
pub fn drained_or_last(pins: &PinDir) -> (bool, Option<anyhow::Error>) {
    match read(pins) {
        Ok(d) => (d.drained, None),
        Err(e) => {
            let last = announce::read(pins).ok().flatten();
            (last.is_none_or(|l| l.node_drained), Some(e))
        }
    }
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

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Wait up to this many seconds until the agent has removed (drain) or put back
    /// (undrain) the node's routes in its announcement table, and fail if it has not; an
    /// undrain fails, too, when the agent announces none of the node's frontends.
    #[arg(long, value_name = "SECONDS", value_parser = crate::dates::seconds)]
    pub wait: Option<u64>,
}

/// `xdpgate drain` (`drained`) or `xdpgate undrain`.
pub fn run(pins: &PinDir, args: &DrainArgs, drained: bool) -> Result<()> {
    let agent = announce::read(pins)?.filter(|a| a.agent_running(pins));
    let running = agent.is_some();
    let wait = match (args.wait, agent) {
        (Some(seconds), Some(agent)) => Some((seconds, agent)),
        (Some(_), None) => bail!(
            "--wait: no agent with a bgp: section in its node file runs, so nothing would \
             happen to wait for; nothing changed"
        ),
        (None, _) => None,
    };
    let changed = set(pins, drained)?;
    let what = if drained { "drained" } else { "undrained" };
    if changed {
        println!("node {what}");
    } else {
        println!("node was already {what}");
    }
    if drained && !running {
        // A crashed agent's routes stay; drained, the node must not be announced.
        let withdrawn = announce::withdraw_without_agent(pins, "the node is drained")?;
        if withdrawn > 0 {
            println!("withdrew the {withdrawn} BGP announcements a stopped agent left");
        }
    }
    let Some((seconds, agent)) = wait else {
        println!(
            "{}",
            match (running, drained) {
                (false, _) =>
                    "no agent with a bgp: section in its node file runs now: the next \
                               one to start keeps to this",
                (true, true) => "the agent withdraws this node's BGP announcements within a second",
                (true, false) => "the agent announces this node's frontends again within a second",
            }
        );
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        // The agent's record says what it wants; the kernel table says what is done.
        let now = announce::read(pins)?.unwrap_or_default();
        let routes = host_routes::list(agent.table)?;
        let done = now.node_drained == drained && announce::same(&routes, &now.announced);
        // Undrained with every frontend held back (no healthy backend, say), the node is not
        // back in service, though there is nothing more to do.
        let serving = drained || !now.announced.is_empty() || now.withheld.is_empty();
        if done && serving && now.agent_running(pins) {
            println!("table {} announces: {}", agent.table, announce::list(&routes));
            return Ok(());
        }
        if Instant::now() >= deadline {
            if done && !serving {
                let why: Vec<String> =
                    now.withheld.iter().map(|w| format!("{} ({})", w.address, w.reason)).collect();
                bail!(
                    "the node is undrained, but the agent announces none of its frontends \
                     within {seconds} s: {}",
                    why.join(", ")
                );
            }
            bail!(
                "the agent has not {} within {seconds} s (table {} holds: {})",
                if drained { "withdrawn the node's routes" } else { "announced the node again" },
                agent.table,
                announce::list(&routes)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
