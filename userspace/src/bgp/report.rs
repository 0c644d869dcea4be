//! What this node announces over BGP, as `xdpgate bgp` and `xdpgate status` show it: the
//! agent's record and the kernel table.

use anyhow::Result;
use serde::Serialize;
use xdpgate_dataplane::{PinDir, host_routes};

use super::announce::{self, Announcements, Withheld};

/// What `xdpgate bgp` shows.
#[derive(Debug, Serialize)]
pub struct BgpReport {
    /// Whether `xdpgate drain` is in force.
    pub node_drained: bool,
    /// Whether the agent that wrote `agent` still runs.
    pub agent_running: bool,
    /// The agent's routes in its kernel table now that the daemon learns (announces).
    pub routes: Vec<std::net::IpAddr>,
    /// The agent's routes in the table that another's hides from the daemon, and by which
    /// (the agent takes them out within a second, saying so in its record).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<Withheld>,
    /// The agent's last record; none if no agent with a bgp: section ran here.
    pub agent: Option<Announcements>,
}

pub fn report(pins: &PinDir) -> Result<BgpReport> {
    let agent = announce::read(pins)?;
    let (mut routes, mut hidden) = (Vec::new(), Vec::new());
    if let Some(a) = &agent {
        let listing = host_routes::read(a.table)?;
        for address in listing.ours() {
            match listing.hiding(address) {
                Some(other) => {
                    hidden.push(Withheld { address, reason: announce::hidden(a.table, other) })
                }
                None => routes.push(address),
            }
        }
    }
    let (node_drained, _) = announce::drained_or_last(pins);
    Ok(BgpReport {
        node_drained,
        agent_running: agent.as_ref().is_some_and(|a| a.agent_running(pins)),
        routes,
        hidden,
        agent,
    })
}
