//! `xdpgate lb`: shows the load balancers (`views::lb`), and `lb drain` / `lb enable` take a
//! backend out of a load balancer's rotation and put it back (`xdpgate_dataplane::drain`).

use std::net::IpAddr;

use anyhow::Result;
use xdpgate_dataplane::{PinDir, apply, drain, lb, state};

use crate::views::{self, OutputArgs};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LbArgs {
    #[command(subcommand)]
    pub action: Option<LbAction>,
    /// Also read each rule's live Maglev table: its digest (equal on every gateway that
    /// picks the same backend for every flow: compare them across a fleet) and the slots
    /// each backend owns. Waits (10 s at most) for a writer changing the tables.
    #[arg(long)]
    pub maglev: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum LbAction {
    /// Take a backend out of a load balancer's rotation (admin-disable): it gets no new
    /// flows, its flows finish. Kept across reloads and restarts until `lb enable`.
    ///
    /// Example: xdpgate lb drain edge 198.51.100.11
    Drain(Target),
    /// Put a drained backend back into rotation (it takes new flows again if its probes
    /// say it is healthy).
    Enable(Target),
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The load balancer's name in the policy.
    #[arg(value_name = "LB")]
    pub load_balancer: String,
    /// The backend's address, as its backend pool lists it.
    #[arg(value_name = "BACKEND")]
    pub backend: IpAddr,
}

pub fn run(pins: &PinDir, args: LbArgs) -> Result<()> {
    let (target, drain) = match args.action {
        None => {
            // Before the record: the tables read are the record's, whole.
            let lock = args.maglev.then(|| state::ReadLock::acquire(pins)).transpose()?;
            let record = apply::running_record(pins)?;
            let drained = drain::read_warned(pins)?;
            let report = lb::report(pins, &record, |lb, b| drained.contains(lb, b), lock.as_ref())?;
            // Let writers (the agent's failover among them) go before printing: a reader
            // of the output may be slow, or never read (`| less`).
            drop(lock);
            // With no agent, health is what the probes last said, however old.
            let probed = report.iter().any(|s| s.probe.is_some());
            if probed && state::agent_pid(pins).is_none() {
                eprintln!(
                    "warning: no agent runs (xdpgate run): nothing probes the backends, and \
                     their health is as the probes last left it"
                );
            }
            return views::print(report.as_slice(), args.output.format());
        }
        Some(LbAction::Drain(t)) => (t, true),
        Some(LbAction::Enable(t)) => (t, false),
    };
    let changed = drain::set(pins, &target.load_balancer, target.backend, drain)?;
    let what = if drain { "drained" } else { "enabled" };
    let who = format!("backend {} of {}", changed.backend, changed.load_balancer);
    if changed.unchanged {
        println!("{who} was already {what}");
    } else {
        println!("{who} {what}: tables of {} rebuilt", changed.services.join(", "));
    }
    Ok(())
}
