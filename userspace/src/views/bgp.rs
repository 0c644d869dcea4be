//! `xdpgate bgp`: what this node announces ([`crate::bgp::report`]), and
//! `xdpgate bgp bird-config --node FILE`: BIRD's configuration for this node.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use xdpgate_dataplane::PinDir;

use super::{OutputArgs, View};
use crate::bgp::{
    announce::{self, Withheld},
    bird,
    report::{BgpReport, report},
};

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

impl View for BgpReport {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
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

pub fn run(pins: &PinDir, args: BgpArgs) -> Result<()> {
    match args.action {
        None => {
            if let (_, Some(e)) = announce::drained_or_last(pins) {
                eprintln!("warning: {e:#}; the node shown drained or not as the agent last had it");
            }
            super::print(&report(pins)?, args.output.format())
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
