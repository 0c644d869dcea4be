//! `xdpgate`: the command-line agent.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum as _};
use xdpgate::{
    agent, capture, flowlog, metrics, status, trace,
    views::{self, OutputArgs},
};
use xdpgate_common::{iface::Role, maps::DEFAULT_PIN_DIR};
use xdpgate_dataplane::{
    self as dataplane, Hook, Ingress, Mode, PinDir, apply, flows, lb, nat, netns, state::WriteLock,
    stats, transaction, verify,
};
use xdpgate_policy::{self as policy, compile, reference::Packet};

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

/// Table sizes, fixed when the dataplane is first attached (the maps are created then);
/// later attaches, `upgrade` and the agent keep the pinned sizes.
#[derive(clap::Args)]
struct TablesArgs {
    /// Established flows the flow table holds (two entries each; the embryonic table holds
    /// a quarter as many). Default 524,288; 440 bytes of kernel memory per flow (220 MiB
    /// at the default). Only on the first attach: a size other than the pinned one is
    /// refused.
    #[arg(long, value_name = "N")]
    flows: Option<u32>,
    /// NAT translations the translation table holds (two entries each). Default 262,144;
    /// 272 bytes per translation. Only on the first attach, like --flows.
    #[arg(long, value_name = "N")]
    nat_translations: Option<u32>,
}

impl TablesArgs {
    fn request(&self) -> dataplane::SizeRequest {
        dataplane::SizeRequest { flows: self.flows, nat_translations: self.nat_translations }
    }
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
        /// Where the pipeline runs on this interface's ingress: xdp (per frame, before the
        /// kernel makes an skb: physical NICs) or tc (tcx ingress, per skb after GRO: veth
        /// and drivers without native XDP, where XDP loses TSO/GRO). Default: tc for veth
        /// and virtual drivers without native XDP, xdp for the rest (and with --mode).
        #[arg(long, value_enum)]
        hook: Option<Hook>,
        /// XDP only: native (driver, the default) or skb (generic) for drivers without
        /// native support. Refused with --hook tc.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        #[command(flatten)]
        tables: TablesArgs,
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
    Check {
        file: PathBuf,
        /// Also check a node file (the interfaces `xdpgate run --node` attaches).
        #[arg(long, value_name = "FILE")]
        node: Option<PathBuf>,
    },
    /// Validate, compile and swap in a policy atomically; on any error the running policy
    /// stays in force.
    Apply { file: PathBuf },
    /// Would this flow be allowed, and by which rule? Like Azure's IP flow verify.
    ///
    /// Answered from the NSG tables the kernel is using (the active slot's pinned maps, read
    /// without running the program: no flow is created, no counter moves), evaluated as the
    /// dataplane does; the answer names the generation and slot it asked. Rules are named
    /// from the saved policy when its tables are the kernel's, and otherwise it says so.
    /// With --policy FILE it compiles that file instead and says so.
    ///
    /// Exit status: 0 allowed, 1 denied, 2 error (nothing was answered).
    ///
    /// Example: xdpgate verify-flow --direction inbound --protocol tcp
    ///          --local 198.51.100.10:80 --remote 203.0.113.7:40000
    VerifyFlow {
        /// Which way the flow's first packet goes: inbound (remote to local) or outbound
        /// (local to remote). Both sides' NSGs judge it: the source's outbound layers, then
        /// the destination's inbound layers.
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
        /// Compile this policy file and ask it instead of the kernel.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the effective rules: service tags, application security groups and default
    /// rules expanded, in evaluation order.
    Rules {
        /// Policy file to show (default: the applied policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Run the agent: apply POLICY, probe the load balancers' backends and keep each
    /// service's table to its healthy backends. SIGHUP reloads the policy (one that fails
    /// changes nothing: see `status`) and reopens the flow log; on exit the dataplane keeps
    /// running.
    Run {
        #[arg(long)]
        policy: PathBuf,
        /// Node file listing this machine's interfaces, their roles and hooks (XDP in a mode,
        /// or tc); those not attached (after a reboot, say) are attached at start. `tables:`
        /// sizes the flow and NAT tables when they are created (as attach --flows,
        /// --nat-translations).
        ///
        /// tables: {flows: 1000000, nat_translations: 262144}
        /// interfaces:
        ///   - {name: eth0, role: external}
        ///   - {name: eth1, role: internal, mode: skb}
        ///   - {name: veth0, role: internal, hook: tc}
        #[arg(long, value_name = "FILE", verbatim_doc_comment)]
        node: Option<PathBuf>,
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
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show the NAT gateways: ports in use per public address, failed allocations.
    Nat {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the dataplane's counters once in the Prometheus text format (what
    /// `xdpgate run --metrics-addr` serves at /metrics).
    Metrics,
    /// Capture packets at the ingress hook (XDP or tc), before and after NAT or load
    /// balancing, into a pcap or pcapng file (like Network Watcher packet capture, xdpdump).
    ///
    /// Example: xdpgate capture --iface eth0 --dst 198.51.100.10 --port 443 -w - | tcpdump -nr -
    Capture(capture::CaptureArgs),
    /// Send one crafted packet through the attached programs (BPF_PROG_TEST_RUN, nothing is
    /// sent, no state changed) and show each stage's decision.
    ///
    /// Example: xdpgate trace --iface eth0 --src 203.0.113.7 --dst 198.51.100.10
    ///          --protocol tcp --dst-port 443
    Trace(trace::TraceArgs),
    /// List the flows in the flow tables, most bytes first: state (embryonic: not confirmed
    /// yet; established), 5-tuple of the first packet, direction, deciding rule, NAT or
    /// backend, traffic each way and idle time.
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
        /// Only flows in this state: embryonic or established.
        #[arg(long, value_name = "STATE")]
        state: Option<flows::FlowState>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show where the dataplane is attached (role, hook and XDP mode), the pin directory, the running
    /// policy, the flow table's entries in use, and the sizes and memory of the flow and NAT
    /// tables.
    Status {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show packet and byte counters per interface and verdict, and drops by reason.
    Stats {
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// The policy named on the command line, or else the one applied to this dataplane.
fn chosen_policy(pins: &PinDir, file: Option<PathBuf>) -> Result<policy::Policy> {
    match file {
        Some(f) => Ok(policy::load(&f)?.0),
        None => {
            let (path, source) = apply::applied_source(pins).ok_or_else(|| {
                anyhow!("no policy applied here yet; name one with --policy FILE")
            })?;
            policy::load_str(&source, &path.display().to_string()).map_err(|e| anyhow!("{e}"))
        }
    }
}

/// The record of the running generation, or an error that says why there is none.
fn running_record(pins: &PinDir) -> Result<policy::names::Record> {
    apply::running(pins)?
        .ok_or_else(|| anyhow!("no policy applied to {} yet", pins.path().display()))
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
        "icmp" => xdpgate_common::icmp_proto(if v6 { 6 } else { 4 }),
        "esp" => 50,
        "ah" => 51,
        n => n.parse().map_err(|_| {
            anyhow!("unknown protocol {name:?} (tcp, udp, icmp, esp, ah or a number)")
        })?,
    })
}

fn main() -> ExitCode {
    // Like other command-line tools: a closed pipe (`xdpgate metrics | head`) ends the
    // process quietly instead of a panic on write.
    // SAFETY: restoring the default disposition of one signal at startup.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // verify-flow's status is its answer (0 allowed, 1 denied), so its errors need another.
    let verify = matches!(cli.command, Command::VerifyFlow { .. });
    match run(cli) {
        Ok(code) => code,
        Err(e) => report(&e, verify),
    }
}

/// Exit status when the kernel refused for want of privileges (EX_NOPERM of sysexits.h).
const EXIT_NO_PERMISSION: u8 = 77;

/// Prints the error chain (without a backtrace: these are messages for the operator) and
/// chooses the exit status. Every refusal for want of privileges, wherever it came from
/// (the pin directory's check, a pinned map, a bpf() call), reads "permission denied: needs
/// root or CAP_BPF" followed by what failed.
fn report(e: &anyhow::Error, verify: bool) -> ExitCode {
    if dataplane::is_permission_error(e) {
        let chain = format!("{e:#}");
        if chain.contains(dataplane::NEEDS_PRIVILEGES) {
            eprintln!("error: {chain}");
        } else {
            eprintln!("error: {}: {chain}", dataplane::NEEDS_PRIVILEGES);
        }
        return ExitCode::from(EXIT_NO_PERMISSION);
    }
    eprintln!("error: {e:#}");
    if verify { ExitCode::from(VERIFY_ERROR) } else { ExitCode::FAILURE }
}

impl Command {
    /// Whether the command reads or changes the dataplane's pins (or the state saved beside
    /// them), so that the pin directory is checked first: a user without privileges is told
    /// so instead of seeing an empty or missing dataplane.
    fn uses_pins(&self) -> bool {
        match self {
            Command::Check { .. } => false,
            Command::VerifyFlow { policy, .. } | Command::Rules { policy, .. } => policy.is_none(),
            _ => true,
        }
    }
}

/// `verify-flow` exit statuses besides 0 (allowed).
const VERIFY_DENIED: u8 = 1;
const VERIFY_ERROR: u8 = 2;

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(ns) = &cli.netns {
        netns::enter(ns)?;
    }
    let pins = PinDir::new(&cli.pin_dir);
    if cli.command.uses_pins() {
        pins.check()?;
    }
    match cli.command {
        Command::Attach { iface, role, hook, mode, tables } => {
            let role = match role {
                RoleArg::External => Role::External,
                RoleArg::Internal => Role::Internal,
            };
            let ingress = match (hook, mode) {
                (Some(Hook::Xdp), mode) => Ingress::Xdp(mode.unwrap_or_default()),
                (None, Some(mode)) => Ingress::Xdp(mode),
                (Some(Hook::Tc), None) => Ingress::Tc,
                (None, None) => match Hook::default_for(&iface)? {
                    Hook::Xdp => Ingress::Xdp(Mode::default()),
                    Hook::Tc => Ingress::Tc,
                },
                (Some(Hook::Tc), Some(mode)) => bail!(
                    "--mode {} applies to XDP only: --hook tc attaches at tc ingress (tcx), \
                     which has no modes; leave out --mode",
                    mode.to_possible_value().expect("no skipped values").get_name()
                ),
            };
            // Before anything is made: a size out of range changes nothing.
            let sizes = tables.request();
            sizes.check()?;
            pins.ensure()?;
            let _lock = WriteLock::acquire(&pins)?;
            dataplane::attach_sized(&pins, &iface, role, ingress, &sizes)?;
            let how = match ingress {
                Ingress::Xdp(mode) => format!("XDP in {mode:?} mode"),
                Ingress::Tc => "tc ingress with tcx".into(),
            };
            println!("attached to {iface} ({role:?}, {how}; egress program with tcx)");
        }
        Command::Upgrade => {
            let _lock = WriteLock::acquire(&pins)?;
            for name in pins.attached()?.iter().filter(|n| dataplane::link_gone(&pins, n)) {
                println!(
                    "skipped {name}: its device was deleted (attach it again when it is back)"
                );
            }
            for (name, egress_added) in dataplane::upgrade(&pins)? {
                let added = if egress_added { " (egress program added)" } else { "" };
                println!("upgraded {name}{added}");
            }
        }
        Command::Detach { iface, all } => {
            let names = if all { pins.attached()? } else { iface.into_iter().collect() };
            if names.is_empty() {
                println!("not attached to any interface under {}", pins.path().display());
            }
            let _lock = if names.is_empty() { None } else { Some(WriteLock::acquire(&pins)?) };
            for name in names {
                dataplane::detach(&pins, &name)?;
                println!("detached from {name}");
            }
        }
        Command::Check { file, node } => {
            if let Some(node) = node {
                let n = xdpgate::node::load(&node)?;
                println!("{}: ok ({} interfaces)", node.display(), n.interfaces.len());
            }
            let (policy, _) = policy::load(&file)?;
            let (compiled, _) = policy::compile_all(&policy)?;
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
        Command::VerifyFlow { direction, protocol, local, remote, policy, output } => {
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
            let answer = verify::verify_flow(&pins, policy.as_deref(), &pkt)?;
            views::print(&answer, output.format())?;
            if !answer.decision.allowed {
                return Ok(ExitCode::from(VERIFY_DENIED));
            }
        }
        Command::Rules { policy, output } => {
            views::print(&chosen_policy(&pins, policy)?, output.format())?;
        }
        Command::Apply { file } => {
            let (policy, source) = policy::load(&file)?;
            // One-shot: backends the dataplane has taken out stay out (`xdpgate run` probes
            // them and brings them back); every other backend counts as healthy.
            let down = lb::pinned_unhealthy(&pins)?;
            let health = |b: std::net::IpAddr| !down.contains(&b);
            let (generation, _) = transaction::apply_policy(&pins, &policy, &source, &health)?;
            println!("applied {} as generation {generation}", file.display());
        }
        Command::Run {
            policy,
            node,
            probe_concurrency,
            metrics_addr,
            flow_log,
            flow_log_max_bytes,
        } => {
            // The agent reports write errors (a closed stdout flow log) instead of dying.
            // SAFETY: setting one signal's disposition before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            let node = node.map(|n| xdpgate::node::load(&n)).transpose()?;
            let sink = flow_log.map(|f| flowlog::Sink::open(&f, flow_log_max_bytes)).transpose()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(agent::run(
                &pins,
                agent::RunConfig {
                    policy,
                    node,
                    max_concurrent: probe_concurrency,
                    metrics_addr: metrics_addr.0,
                    flow_log: sink,
                },
            ))?;
        }
        Command::Metrics => print!("{}", metrics::render(&pins)?),
        Command::Trace(args) => {
            let output = args.output;
            views::print(&trace::run(&pins, &args)?, output.format())?;
        }
        Command::Capture(args) => {
            let s = capture::run(&pins, &args)?;
            eprintln!(
                "{} packets captured ({} bytes written), {} lost; stopped by {}",
                s.packets, s.bytes, s.lost, s.stopped_by
            );
        }
        Command::Flows { top, addr, port, rule, state, output } => {
            let list = flows::list(&pins, &flows::Filter { addr, port, rule, state }, top)?;
            views::print(list.as_slice(), output.format())?;
        }
        Command::Status { output } => {
            views::print(&status::read(&pins)?, output.format())?;
        }
        Command::Lb { output } => {
            let report = lb::report(&pins, &running_record(&pins)?)?;
            views::print(report.as_slice(), output.format())?;
        }
        Command::Nat { output } => {
            let report = nat::report(&pins, &running_record(&pins)?)?;
            views::print(report.as_slice(), output.format())?;
        }
        Command::Stats { output } => {
            views::print(&stats::read(&pins)?, output.format())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every view takes the output layer's options.
    #[test]
    fn every_view_takes_json_and_output() {
        let verify = [
            "verify-flow",
            "--direction",
            "inbound",
            "--protocol",
            "icmp",
            "--local",
            "198.51.100.2",
            "--remote",
            "203.0.113.9",
        ];
        let views: [&[&str]; 7] =
            [&["status"], &["stats"], &["flows"], &["lb"], &["nat"], &["rules"], &verify];
        for view in views {
            for flags in [&["--json"][..], &["-o", "json"], &["--output", "table"]] {
                let args = ["xdpgate"].iter().chain(view).chain(flags);
                if let Err(e) = Cli::try_parse_from(args) {
                    panic!("{view:?} {flags:?}: {e}");
                }
            }
        }
        // Commands that are not views do not pretend to print JSON.
        assert!(Cli::try_parse_from(["xdpgate", "detach", "--all", "--json"]).is_err());
    }
}
