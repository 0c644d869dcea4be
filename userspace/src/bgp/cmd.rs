//! `xdpgate bgp`: what this node announces (the agent's record and the kernel table), and
//! `xdpgate bgp bird-config --node FILE`: BIRD's configuration for this node.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use serde::Serialize;
use xdpgate_dataplane::{PinDir, host_routes};

use super::{
    announce::{self, Announcements, Withheld},
    bird, node_drain,
};
use crate::views::{self, OutputArgs, View};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BgpArgs {
    #[command(subcommand)]
    pub action: Option<BgpAction>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BgpAction {
    /// Print BIRD 2's configuration for this node (from the node file's bgp: section).
    ///
    /// Example: xdpgate bgp bird-config --node /etc/xdpgate/node.yaml > /etc/bird/bird.conf
    BirdConfig {
        /// The node file (as `xdpgate run --node`).
        #[arg(long, value_name = "FILE")]
        node: PathBuf,
    },
}

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

impl View for BgpReport {
    fn json(&self) -> Result<serde_json::Value> {
        views::to_json(self)
    }

    fn text(&self) -> String {
        let mut out = format!(
            "node           {}\n",
            if self.node_drained { "drained (xdpgate undrain)" } else { "not drained" }
        );
        let Some(a) = &self.agent else {
            out += "announcements  none: no agent with a bgp: section in its node file ran here\n";
            return out;
        };
        let agent = if self.agent_running { "running" } else { "not running" };
        out += &format!("agent          pid {} ({agent}), table {}\n", a.pid, a.table);
        out += &format!("announced      {}\n", announce::list(&self.routes));
        let recorded = |h: &&Withheld| a.withheld.iter().any(|w| w.address == h.address);
        for w in a.withheld.iter().chain(self.hidden.iter().filter(|h| !recorded(h))) {
            out += &format!("withheld       {}: {}\n", w.address, w.reason);
        }
        for addr in &a.no_peer {
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            out += &format!(
                "no peer        {addr}: the node file's bgp: section has no {family} peer (a \
                 BIRD from bgp bird-config does not announce it)\n"
            );
        }
        out
    }
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
    let (node_drained, _) = node_drain::drained_or_last(pins);
    Ok(BgpReport {
        node_drained,
        agent_running: agent.as_ref().is_some_and(|a| a.agent_running(pins)),
        routes,
        hidden,
        agent,
    })
}

pub fn run(pins: &PinDir, args: BgpArgs) -> Result<()> {
    match args.action {
        None => {
            if let (_, Some(e)) = node_drain::drained_or_last(pins) {
                eprintln!("warning: {e:#}; the node shown drained or not as the agent last had it");
            }
            views::print(&report(pins)?, args.output.format())
        }
        Some(BgpAction::BirdConfig { node }) => {
            let n = crate::node::load(&node)?;
            let bgp = n
                .bgp
                .ok_or_else(|| anyhow!("node file {}: has no bgp: section", node.display()))?;
            print!("{}", bird::config(&bgp));
            Ok(())
        }
    }
}
