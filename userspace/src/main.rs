//! `xdpgate`: the command-line agent.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use xdpgate::{
    agent, apply, compile,
    dataplane::{self, Mode, PinDir},
    evaluate, flowlog, flows, lb, metrics, nat, netns, pktgen,
    policy::{self, reference::Packet},
    rules, stats, status,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Inbound,
    Outbound,
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
    /// Replace the running programs on every attached interface with this build's, keeping
    /// flows, NAT translations, policy and counters (the pinned maps).
    Upgrade,
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
    /// Would this flow be allowed, and by which rule? Answered from the compiled tables the
    /// kernel uses, like Azure's IP flow verify.
    ///
    /// Example: xdpgate verify-flow --direction inbound --protocol tcp
    ///          --local 198.51.100.10:80 --remote 203.0.113.7:40000
    VerifyFlow {
        #[arg(long, value_enum)]
        direction: DirectionArg,
        /// tcp, udp, icmp (ICMPv6 for IPv6 addresses), esp, ah, or a protocol number.
        #[arg(long)]
        protocol: String,
        /// Address of the protected side, with :PORT for TCP and UDP ([v6]:PORT).
        #[arg(long)]
        local: String,
        /// Address of the other side, with :PORT for TCP and UDP.
        #[arg(long)]
        remote: String,
        /// Policy file to ask about (default: the applied policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the effective rules: service tags, application security groups and default
    /// rules expanded, in evaluation order.
    Rules {
        /// Policy file to show (default: the applied policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run the agent: apply POLICY, probe the load balancers' backends and keep each
    /// service's table to its healthy backends. SIGHUP reloads the policy; on exit the
    /// dataplane keeps running.
    Run {
        #[arg(long)]
        policy: PathBuf,
        /// Health probes in flight at once.
        #[arg(long, default_value_t = 64)]
        probe_concurrency: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics (in the agent's network
        /// namespace), or `off`.
        #[arg(long, value_name = "ADDR", default_value = metrics::DEFAULT_ADDR)]
        metrics_addr: metrics::ListenAddr,
        /// Write flow logs (JSON lines: begin, deny, end with packets and bytes each way)
        /// to FILE, or to stdout with `-`.
        #[arg(long, value_name = "FILE")]
        flow_log: Option<String>,
        /// Rotate the flow log to FILE.1 when it reaches this many bytes.
        #[arg(long, default_value_t = 100 << 20)]
        flow_log_max_bytes: u64,
    },
    /// Show the load balancers: frontends, backends, health and counters.
    Lb {
        #[arg(long)]
        json: bool,
    },
    /// Show the NAT gateways: ports in use per public address, failed allocations.
    Nat {
        #[arg(long)]
        json: bool,
    },
    /// Print the dataplane's counters once in the Prometheus text format (what
    /// `xdpgate run --metrics-addr` serves at /metrics).
    Metrics,
    /// List the flows in the flow table, most bytes first: 5-tuple of the first packet,
    /// direction, deciding rule, NAT or backend, traffic each way and idle time.
    ///
    /// Example: xdpgate flows --port 443 --top 50
    Flows {
        /// Show at most N flows (0: all).
        #[arg(long, value_name = "N", default_value_t = 20)]
        top: usize,
        /// Only flows with this address at either end.
        #[arg(long, value_name = "IP")]
        addr: Option<IpAddr>,
        /// Only flows with this port at either end.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Only flows decided by this rule (RULE or NSG/RULE).
        #[arg(long, value_name = "NAME")]
        rule: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show where the dataplane is attached (role, XDP mode), the pin directory, the running
    /// policy and the size of the flow table.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Send generated UDP/TCP frames out of an interface at up to line rate: BPF_PROG_TEST_RUN
    /// in live-frames mode with the object's xdp_tx program (no kernel pktgen needed). Reports
    /// what left from the interface's TX counters. `pktgen sink` holds a baseline program
    /// (xdp_noop) on the receiving interface instead of xdpgate.
    ///
    /// Example: xdpgate --netns gen pktgen --iface veth0 --count 1000000 --dst-mac MAC
    Pktgen(pktgen::Args),
    /// Show packet and byte counters per interface and verdict, and drops by reason.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The policy named on the command line, or else the one applied to this dataplane.
fn chosen_policy(pins: &PinDir, file: Option<PathBuf>) -> Result<policy::Policy> {
    match file {
        Some(f) => Ok(agent::load(&f)?.0),
        None => {
            let (path, source) = apply::applied_source(pins).ok_or_else(|| {
                anyhow!("no policy applied here yet; name one with --policy FILE")
            })?;
            policy::load_str(&source, &path.display().to_string()).map_err(|e| anyhow!("{e}"))
        }
    }
}

/// `IP` or `IP:PORT` (`[IPv6]:PORT`).
fn endpoint(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    Ok((s.parse().with_context(|| format!("{s:?} is not an address or address:port"))?, None))
}

fn protocol_number(name: &str, v6: bool) -> Result<u8> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" if v6 => 58,
        "icmp" => 1,
        "esp" => 50,
        "ah" => 51,
        n => n.parse().map_err(|_| {
            anyhow!("unknown protocol {name:?} (tcp, udp, icmp, esp, ah or a number)")
        })?,
    })
}

fn main() -> std::process::ExitCode {
    // Like other command-line tools: a closed pipe (`xdpgate metrics | head`) ends the
    // process quietly instead of a panic on write.
    // SAFETY: restoring the default disposition of one signal at startup.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error chain, without a backtrace: these are messages for the operator.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
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
        Command::Upgrade => {
            for name in dataplane::upgrade(&pins)? {
                println!("upgraded {name}");
            }
        }
        Command::Detach { iface, all } => {
            let names = if all { pins.attached()? } else { iface.into_iter().collect() };
            for name in names {
                dataplane::detach(&pins, &name)?;
                println!("detached from {name}");
            }
        }
        Command::Check { file } => {
            let (policy, _) = agent::load(&file)?;
            let (compiled, _) = agent::compile_all(&policy)?;
            // With the numbers apply uses, for whatever policy runs before or after it.
            compile::check_capacity(&policy, &compiled)
                .with_context(|| format!("{}: cannot be applied", file.display()))?;
            let rules: usize = policy.nsgs.iter().map(|n| n.rules.len()).sum();
            println!(
                "{}: ok ({} NSGs, {rules} effective rules, {} of {} NSG table entries a \
                 policy may use)",
                file.display(),
                policy.nsgs.len(),
                compiled.field_entries(),
                compile::NSG_FIELDS_PER_POLICY,
            );
        }
        Command::VerifyFlow { direction, protocol, local, remote, policy, json } => {
            let policy = chosen_policy(&pins, policy)?;
            let (local, local_port) = endpoint(&local)?;
            let (remote, remote_port) = endpoint(&remote)?;
            if local.is_ipv4() != remote.is_ipv4() {
                bail!("--local and --remote must be of the same address family");
            }
            let proto = protocol_number(&protocol, local.is_ipv6())?;
            let pkt = match direction {
                DirectionArg::Inbound => Packet {
                    direction: policy::Direction::Inbound,
                    proto,
                    src: remote,
                    dst: local,
                    sport: remote_port,
                    dport: local_port,
                },
                DirectionArg::Outbound => Packet {
                    direction: policy::Direction::Outbound,
                    proto,
                    src: local,
                    dst: remote,
                    sport: local_port,
                    dport: remote_port,
                },
            };
            if (proto == 6 || proto == 17) && (pkt.sport.is_none() || pkt.dport.is_none()) {
                bail!("TCP and UDP need ports on both --local and --remote (ADDRESS:PORT)");
            }
            let verdict = evaluate::evaluate(&compile::compile(&policy)?, &pkt);
            if json {
                let refs: Vec<_> = verdict
                    .decided_by
                    .iter()
                    .map(|r| {
                        serde_json::json!({"layer": r.layer, "nsg": r.nsg, "rule": r.rule,
                        "priority": r.priority, "access": r.access})
                    })
                    .collect();
                println!("{}", serde_json::json!({"allowed": verdict.allowed, "decided_by": refs}));
            } else {
                print!("{}", rules::render_verdict(&verdict));
            }
        }
        Command::Rules { policy, json } => {
            let policy = chosen_policy(&pins, policy)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                print!("{}", rules::render(&policy));
            }
        }
        Command::Apply { file } => {
            let (policy, source) = agent::load(&file)?;
            // One-shot: backends the dataplane has taken out stay out (`xdpgate run` probes
            // them and brings them back); every other backend counts as healthy.
            let down = lb::pinned_unhealthy(&pins)?;
            let health = |b: std::net::IpAddr| !down.contains(&b);
            let (generation, _) = agent::apply_policy(&pins, &policy, &source, &health)?;
            println!("applied {} as generation {generation}", file.display());
        }
        Command::Run { policy, probe_concurrency, metrics_addr, flow_log, flow_log_max_bytes } => {
            let sink = flow_log.map(|f| flowlog::Sink::open(&f, flow_log_max_bytes)).transpose()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(agent::run(
                &pins,
                &policy,
                probe_concurrency,
                metrics_addr.0,
                sink,
            ))?;
        }
        Command::Metrics => print!("{}", metrics::render(&pins)?),
        Command::Flows { top, addr, port, rule, json } => {
            let list = flows::list(&pins, &flows::Filter { addr, port, rule }, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", flows::render(&list));
            }
        }
        Command::Status { json } => {
            let status = status::read(&pins)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
        }
        Command::Lb { json } => {
            let policy = chosen_policy(&pins, None)?;
            let report = lb::report(&pins, &lb::compile(&policy)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", lb::render(&report));
            }
        }
        Command::Nat { json } => {
            let policy = chosen_policy(&pins, None)?;
            let report = nat::report(&pins, &policy)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", nat::render(&report));
            }
        }
        Command::Pktgen(args) => pktgen::main(args)?,
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
