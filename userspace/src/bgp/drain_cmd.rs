//! `xdpgate drain` / `xdpgate undrain`: the whole node stops announcing its frontends over
//! BGP (and starts again), so the routers send new connections to the other gateways, e.g.
//! before an upgrade. The state is
//! [`super::node_drain`]'s.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use xdpgate_dataplane::{PinDir, host_routes};

use super::{announce, node_drain::set};

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
