//! `xdpgate`: the command-line agent.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xdpgate::{
    apply, compile,
    dataplane::{self, Mode, PinDir},
    netns, policy, stats,
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
    /// Validate a policy file without touching the kernel. Errors name file, line, field and
    /// reason.
    Check { file: PathBuf },
    /// Validate, compile and swap in a policy atomically; on any error the running policy
    /// stays in force.
    Apply { file: PathBuf },
    /// Show packet and byte counters per interface and verdict, and drops by reason.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Loads a policy, printing every validation error (file:line: field: reason).
fn load_policy(file: &std::path::Path) -> Result<policy::Policy> {
    policy::load_file(file)
        .map_err(|errors| anyhow::anyhow!("invalid policy, nothing changed:\n{errors}"))
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
        Command::Check { file } => {
            let policy = load_policy(&file)?;
            let compiled = compile::compile(&policy)?;
            let rules: usize = compiled.tables.iter().map(|t| t.rules.len()).sum();
            println!(
                "{}: ok ({} NSGs, {rules} effective rules)",
                file.display(),
                policy.nsgs.len()
            );
        }
        Command::Apply { file } => {
            let policy = load_policy(&file)?;
            let compiled = compile::compile(&policy)?;
            let source = std::fs::read_to_string(&file)?;
            let generation = apply::apply(&pins, &compiled, &policy.settings)?;
            apply::save_applied(&pins, &source)?;
            println!("applied {} as generation {generation}", file.display());
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
