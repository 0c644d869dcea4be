//! `xdpgate decap`: the backend's side of the encapsulating load balancer. Attaches
//! xdpgate's decapsulation program to the interface the gateways' IP-in-IP packets arrive
//! by (`xdpgate_dataplane::decap`), names the gateways it decapsulates from and the
//! frontends it decapsulates for, and shows its state.

use std::net::IpAddr;

use anyhow::{Result, bail};
use ipnet::IpNet;
use xdpgate_dataplane::{
    Hook, Ingress, Mode, PinDir,
    decap::{self, Status},
};

use crate::views::{self, OutputArgs, View};

#[derive(Debug, clap::Args)]
pub struct DecapArgs {
    #[command(subcommand)]
    pub action: DecapAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum DecapAction {
    /// Attach the decapsulation program to an interface (XDP or tc ingress; stays attached
    /// after this command exits). Where it is attached already, its program is replaced in place by
    /// this build's (gateways, frontends and counters kept) and the gateways and frontends
    /// added. IP-in-IP (IPv4 or IPv6 outer header) from a gateway whose inner destination
    /// is one of the frontends loses its outer header and goes to the host's stack (a
    /// gateway's with outer IPv4 options, IPv6 extension headers or fragmented passes
    /// untouched). IP-in-IP from any other source is dropped when its inner destination is
    /// one of the frontends, behind outer IPv4 options or up to 4 IPv6 extension headers
    /// and in a first fragment too, when it carries a tunnel again (or inner IPv6 followed
    /// by an extension header), and when its inner header or extension chain is not whole
    /// within the outer datagram; any other source's IPv6 with a longer extension chain is
    /// dropped too; a stranger's later fragments (their first one shows the inner header)
    /// pass. All others pass untouched. Frames with a VLAN tag are not examined:
    /// attach it to the VLAN's device.
    ///
    /// Example: xdpgate decap attach eth0 --gateway 198.51.100.1 --gateway 2001:db8:1::1
    /// --frontend 192.0.2.10 --frontend 2001:db8::10
    Attach(AttachArgs),
    /// Stop decapsulating for frontends, or from gateways (the program stays attached).
    /// A gateway is named as it was added; an unknown one, or the last one, is refused and
    /// nothing is removed (to stop decapsulating altogether, detach the program).
    ///
    /// Example: xdpgate decap remove --gateway 198.51.100.1
    Remove(RemoveArgs),
    /// Detach the decapsulation program from an interface, or from every one with --all;
    /// the last detach removes its frontends and counters.
    Detach(DetachArgs),
    /// Show where the decapsulation program runs, its frontends and its packet counts.
    Status {
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The interface the encapsulated packets arrive by, untagged (a VLAN's device, not
    /// its parent; in the --netns namespace when given).
    #[arg(value_name = "IFACE")]
    pub iface: String,
    /// A frontend (load balancer) address this backend serves: its packets are
    /// decapsulated. Repeat for more.
    #[arg(long = "frontend", value_name = "ADDR", required = true)]
    pub frontends: Vec<IpAddr>,
    /// The outer source address (or prefix) of a gateway's IP-in-IP, as its
    /// `encapsulation:` source: only packets from these are decapsulated (anyone else could
    /// pass by the gateways' policy). Repeat for more; 0.0.0.0/0 and ::/0 trust any host.
    #[arg(long = "gateway", value_name = "ADDR|PREFIX", required = true,
          value_parser = crate::filter::parse_net)]
    pub gateways: Vec<IpNet>,
    /// Where it runs: xdp (per frame, before the kernel makes a socket buffer) or tc (tcx
    /// ingress, first in the chain: per socket buffer, after GRO).
    #[arg(long, value_enum, default_value = "xdp")]
    pub hook: Hook,
    /// XDP only: native (in the driver, the default) or skb (generic XDP, any driver).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub what: RemoveTargets,
    /// Leave out a frontend the program does not decapsulate for, instead of refusing
    /// (for scripts whose own records may have drifted from the program's).
    #[arg(long, requires = "frontends")]
    pub missing_ok: bool,
}

/// What to remove: frontends, gateways or both (`--missing-ok` is no choice of its own).
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct RemoveTargets {
    /// A frontend address to stop decapsulating for. Repeat for more.
    #[arg(long = "frontend", value_name = "ADDR")]
    pub frontends: Vec<IpAddr>,
    /// A gateway (outer source address or prefix, as `attach --gateway` added it) to stop
    /// decapsulating from: its IP-in-IP for the frontends is then dropped as a stranger's.
    /// Repeat for more; at least one must be left.
    #[arg(long = "gateway", value_name = "ADDR|PREFIX", value_parser = crate::filter::parse_net)]
    pub gateways: Vec<IpNet>,
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The interface to detach from.
    #[arg(value_name = "IFACE", required_unless_present = "all", conflicts_with = "all")]
    pub iface: Option<String>,
    /// Detach from every interface the decapsulation program is attached to.
    #[arg(long)]
    pub all: bool,
}

pub fn run(pins: &PinDir, args: DecapArgs) -> Result<()> {
    match args.action {
        DecapAction::Attach(a) => {
            let ingress = match (a.hook, a.mode) {
                (Hook::Xdp, mode) => Ingress::Xdp(mode.unwrap_or_default()),
                (Hook::Tc, None) => Ingress::Tc,
                (Hook::Tc, Some(mode)) => bail!(
                    "--mode {} applies to XDP only: --hook tc attaches at tc ingress (tcx), \
                     which has no modes; leave out --mode",
                    decap::mode_name(mode)
                ),
            };
            let done = decap::attach(pins, &a.iface, &a.frontends, &a.gateways, ingress)?;
            let how = if done.attached {
                format!("attached to {} {}", a.iface, decap::ingress_name(ingress))
            } else {
                format!("program on {} replaced with this build's", a.iface)
            };
            println!(
                "decap {how}; gateways added: {}; frontends added: {}",
                list(&done.trusted),
                list(&done.added)
            );
        }
        DecapAction::Remove(RemoveArgs { what: r, missing_ok }) => {
            let removed = decap::remove(pins, &r.gateways, &r.frontends, missing_ok)?;
            if !r.gateways.is_empty() {
                println!("decap gateways removed: {}", list(&removed.gateways));
            }
            if !r.frontends.is_empty() {
                println!("decap frontends removed: {}", list(&removed.frontends));
            }
            if !removed.missing.is_empty() {
                println!("not decapsulated for: {}", list(&removed.missing));
            }
        }
        DecapAction::Detach(d) => {
            let names = if d.all { decap::attached(pins)? } else { d.iface.into_iter().collect() };
            if names.is_empty() {
                println!("the decap program is attached to no interface");
            }
            for name in names {
                decap::detach(pins, &name)?;
                println!("decap detached from {name}");
            }
        }
        DecapAction::Status { output } => views::print(&decap::status(pins)?, output.format())?,
    }
    Ok(())
}

fn list(addrs: &[impl ToString]) -> String {
    if addrs.is_empty() {
        return "none".into();
    }
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl View for Status {
    fn json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(self)?)
    }

    fn text(&self) -> String {
        if self.interfaces.is_empty() {
            return format!("the decap program is attached to no interface ({})\n", self.pin_dir);
        }
        let ifaces: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| {
                let place = match (i.live, i.hook, i.mode) {
                    (false, _, _) => "device deleted",
                    (true, Hook::Tc, _) => "tc",
                    (true, Hook::Xdp, Some(mode)) => mode,
                    (true, Hook::Xdp, None) => "XDP, other namespace",
                };
                format!("{} ({place}, program {})", i.interface, i.program_id)
            })
            .collect();
        format!(
            "decap program ({}) on: {}\ngateways: {}\nfrontends: {}\npackets: {} decapsulated, \
             {} IP-in-IP passed (not for a frontend here), {} from no gateway (dropped if for \
             a frontend here or cut short), {} not IP-in-IP\n",
            self.pin_dir,
            ifaces.join(", "),
            list(&self.gateways),
            list(&self.frontends),
            self.decapsulated,
            self.passed,
            self.untrusted,
            self.not_tunnel
        )
    }
}
