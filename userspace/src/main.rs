//! `xdpgate`: the command-line agent.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xdpgate::{
    dataplane::{self, Mode, PinDir},
    netns, stats,
};
use xdpgate_common::{iface::Role, maps::DEFAULT_PIN_DIR};

#[derive(Parser)]
#[command(version, about = "XDP packet filter, L4 load balancer and NAT", long_about = None)]
struct Cli {
    /// Run in the named network namespace (as created by `ip netns add`), keeping the host's
    /// bpffs so pins stay visible.
    #[arg(long, global = true)]
    netns: Option<String>,
    /// Directory in bpffs where maps and links are pinned.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "XDPGATE_PIN_DIR")]
    pin_dir: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// Faces the outside: packets arriving here are inbound.
    External,
    /// Faces a protected subnet: packets arriving here are outbound.
    Internal,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the dataplane to an interface (stays attached after this command exits).
    ///
    /// Example: xdpgate attach --iface eth0 --role external
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "external")]
        role: RoleArg,
        /// native (driver) XDP, or skb (generic) for drivers without native support.
        #[arg(long, value_enum, default_value = "native")]
        mode: Mode,
    },
    /// Detach the dataplane from an interface, or from every interface with --all.
    Detach {
        #[arg(long, required_unless_present = "all")]
        iface: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Show packet and byte counters per interface and verdict, and drops by reason.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        netns::enter(ns)?;
    }
    let pins = PinDir::new(&cli.pin_dir);
    match cli.command {
        Command::Attach { iface, role, mode } => {
            let role = match role {
                RoleArg::External => Role::External,
                RoleArg::Internal => Role::Internal,
            };
            dataplane::attach(&pins, &iface, role, mode)?;
            println!("attached to {iface} ({role:?}, {mode:?} mode)");
        }
        Command::Detach { iface, all } => {
            let names = if all { pins.attached()? } else { iface.into_iter().collect() };
            for name in names {
                dataplane::detach(&pins, &name)?;
                println!("detached from {name}");
            }
        }
        Command::Stats { json } => {
            let stats = stats::read(&pins)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats).context("encoding JSON")?);
            } else {
                print!("{}", stats.render());
            }
        }
    }
    Ok(())
}
