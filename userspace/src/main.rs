//! `xdpgate`: the command-line agent.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result, anyhow, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum as _};
use xdpgate::{
    agent, agent_state, bgp, capture, cli_docs, flowlog, flows_cmd, metrics, observe, plan, status,
    trace, verify_flow,
    views::{self, OutputArgs},
};
use xdpgate_common::{iface::Role, maps::DEFAULT_PIN_DIR};
use xdpgate_dataplane::{
    self as dataplane, Hook, Ingress, Mode, PinDir, apply, lb, nat, netns, state::WriteLock, stats,
    transaction,
};
use xdpgate_policy::{self as policy, compile};

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
    /// a quarter as many). Default 524,288; 520 bytes of kernel memory per flow (260 MiB
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

#[derive(Subcommand)]
enum Command {
    /// Attach the dataplane to an interface (stays attached after this command exits).
    ///
    /// Example: xdpgate attach --iface eth0 --role external
    Attach {
        /// The interface to attach to (in the --netns namespace when given).
        #[arg(long)]
        iface: String,
        /// Which side the interface faces: external (packets arriving are inbound) or
        /// internal (a protected subnet: packets arriving are outbound).
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
        /// The interface to detach from.
        #[arg(long, required_unless_present = "all")]
        iface: Option<String>,
        /// Detach from every interface the pin directory records.
        #[arg(long)]
        all: bool,
    },
    /// Validate a policy file without touching the kernel. Errors name file, line, field and
    /// reason.
    Check {
        /// The policy file (YAML).
        file: PathBuf,
        /// Also check a node file (the interfaces `xdpgate run --node` attaches).
        #[arg(long, value_name = "FILE")]
        node: Option<PathBuf>,
    },
    /// Validate, compile and swap in a policy atomically; on any error the running policy
    /// stays in force.
    Apply {
        /// The policy file (YAML).
        file: PathBuf,
        /// Show what applying would change (as `xdpgate plan`), and apply nothing.
        #[arg(long)]
        diff: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show what applying POLICY would change, and change nothing: NSGs, rules (by NSG and
    /// rule name, with the changed fields), load balancers and NAT gateways added, removed
    /// and changed, and the live flows the change would cut (denied by the new rules; those
    /// whose backend or NAT gateway address goes away are listed apart: a reload does not
    /// cut them), the first few named.
    ///
    /// Example: xdpgate plan policy.yaml
    Plan(plan::Args),
    VerifyFlow(verify_flow::Args),
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
        /// The policy file to apply and reload on SIGHUP.
        #[arg(long, value_name = "FILE")]
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
        #[command(flatten)]
        flow_log: flowlog::FlowLogArgs,
    },
    /// Show the load balancers: frontends, backends, health, drained backends, live flows
    /// and counters; `lb drain` / `lb enable` take a backend out of rotation and back.
    Lb(xdpgate::lb::LbArgs),
    /// Named address sets of the running policy: list them, or add and delete elements in
    /// the kernel without a re-apply (kept by later applies and reloads).
    Set(xdpgate::set::SetArgs),
    /// Show the NAT gateways: ports in use per public address, failed allocations, packets
    /// and bytes translated each way, drops.
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
    /// yet; assured: confirmed, waiting for room in a full established table; established),
    /// 5-tuple of the first packet, direction, deciding rule, NAT or backend, traffic each
    /// way and idle time.
    ///
    /// Example: xdpgate flows --port 443 --top 50; xdpgate flows delete --port 22
    Flows(flows_cmd::Args),
    /// Show where the dataplane is attached (role, hook and XDP mode), the pin directory, the running
    /// policy, the flow table's entries in use, and the sizes and memory of the flow and NAT
    /// tables.
    Status {
        #[command(flatten)]
        output: OutputArgs,
    },
    Observe(observe::ObserveArgs),
    /// Show packet and byte counters per interface and verdict, and drops by reason.
    Stats {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Where the dataplane would send a flow, like Network Watcher's next hop: the FIB's
    /// answer (bpf_fib_lookup as the forwarding stage asks it) after any load-balancer or
    /// NAT translation: egress interface, gateway, neighbour, MTU, and whether the
    /// dataplane redirects it or hands it to the host's stack.
    ///
    /// Example: xdpgate next-hop --src 203.0.113.7 --dst 198.51.100.10:80
    NextHop(views::nexthop::NextHopArgs),
    /// Would SRC reach DST:PORT, and if not, why: the load balancer and its backends'
    /// health, the NSG layers of both ends (Azure's order, from the kernel's tables), the NAT
    /// gateway and the next hop, with the first step that blocks.
    ///
    /// Exit status: 0 reachable, 1 not, 2 error (nothing was answered).
    ///
    /// Example: xdpgate connectivity --src 203.0.113.7 --dst 198.51.100.10:443
    Connectivity(views::connectivity::ConnectivityArgs),
    /// What this gateway connects, like Network Watcher's topology: interfaces (role, hook,
    /// XDP mode, addresses), subnets, NSGs and their associations, load balancers with
    /// frontends and backend health, NAT gateways with their public addresses. As a table,
    /// JSON, Graphviz DOT, or SVG (drawn by Graphviz's `dot`).
    ///
    /// Example: xdpgate topology --format svg > topology.svg
    Topology(views::topology::TopologyArgs),
    /// What this node announces over BGP (the agent's table of frontend routes, with why
    /// the others are withheld), or BIRD's configuration for it (`bgp bird-config`).
    ///
    /// Example: xdpgate bgp; xdpgate bgp bird-config --node /etc/xdpgate/node.yaml
    Bgp(views::bgp::BgpArgs),
    /// Drain this node: the agent withdraws every BGP announcement of it, so the routers
    /// send new connections to the other gateways (kept across agent restarts).
    ///
    /// Example: xdpgate drain --wait 10
    Drain(bgp::drain_cmd::DrainArgs),
    /// Undo `xdpgate drain`: the agent announces the node's frontends again.
    Undrain(bgp::drain_cmd::DrainArgs),
    /// On a backend: strip the gateways' IP-in-IP encapsulation (xdpgate's own XDP
    /// decapsulation program) for the frontends it serves.
    ///
    /// Example: xdpgate decap attach eth0 --frontend 192.0.2.10; xdpgate decap status
    Decap(xdpgate::decap::DecapArgs),
    /// Print a shell completion script.
    Completions(cli_docs::CompletionsArgs),
    /// Print the man page (roff), or write one page per command into --dir.
    Man(cli_docs::ManArgs),
}

/// The policy named on the command line, or else the one applied to this dataplane.
fn chosen_policy(pins: &PinDir, file: Option<PathBuf>) -> Result<policy::Policy> {
    match file {
        Some(f) => Ok(policy::load(&f)?.0),
        None => {
            let (path, source) = apply::applied_source(pins).ok_or_else(|| {
                anyhow!("no policy applied here yet; name one with --policy FILE")
            })?;
            let changes = dataplane::sets::changes(pins)?;
            policy::load_str_with_sets(&source, &path.display().to_string(), &changes)
                .map_err(|e| anyhow!("{e}"))
        }
    }
}

fn main() -> ExitCode {
    // Like other command-line tools: a closed pipe (`xdpgate metrics | head`) ends the
    // process quietly instead of a panic on write.
    // SAFETY: restoring the default disposition of one signal at startup.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // verify-flow's status is its answer (0 allowed, 1 denied), so its errors need another.
    let verify = matches!(cli.command, Command::VerifyFlow(_) | Command::Connectivity(_));
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
    if verify { ExitCode::from(verify_flow::ERROR) } else { ExitCode::FAILURE }
}

impl Command {
    /// Whether the command reads or changes the dataplane's pins (or the state saved beside
    /// them), so that the pin directory is checked first: a user without privileges is told
    /// so instead of seeing an empty or missing dataplane.
    fn uses_pins(&self) -> bool {
        match self {
            Command::Check { .. } | Command::Completions(_) | Command::Man(_) => false,
            Command::VerifyFlow(args) => args.policy.is_none(),
            Command::Rules { policy, .. } => policy.is_none(),
            Command::Bgp(args) => args.action.is_none(),
            _ => true,
        }
    }
}

/// Whether process `pid` runs this build: this executable file, or one of the same bytes
/// (a copy; not the file an upgrade replaced under its name).
fn runs_this_binary(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (theirs, ours) = (format!("/proc/{pid}/exe"), std::env::current_exe());
    let Ok(ours) = ours else { return false };
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let same_file = matches!(
        (std::fs::metadata(&theirs).map(id), std::fs::metadata(&ours).map(id)),
        (Ok(a), Ok(b)) if a == b
    );
    same_file || matches!((std::fs::read(&theirs), std::fs::read(&ours)), (Ok(a), Ok(b)) if a == b)
}

fn run(cli: Cli) -> Result<ExitCode> {
    // The pins first: a user without privileges is told so, not that the namespace could
    // not be entered (the pins are the host's bpffs, the same from any network namespace).
    let pins = PinDir::new(&cli.pin_dir);
    if cli.command.uses_pins() {
        pins.check()?;
    }
    if let Some(ns) = &cli.netns {
        netns::enter(ns)?;
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
            // Before anything is made: a refused attach leaves nothing behind.
            let sizes = tables.request();
            dataplane::check_attach(&pins, &iface, &sizes)?;
            pins.ensure()?;
            let _lock = WriteLock::acquire(&pins)?;
            // Under the lock: another attach may have made the dataplane meanwhile.
            let first = pins.pinned_files()?.is_empty();
            if let Err(e) = dataplane::attach_sized(&pins, &iface, role, ingress, &sizes) {
                // A first attach that failed (the driver refused the program, say) takes its
                // tables with it: left pinned, they held their memory and fixed their sizes
                // for the next attach.
                if first {
                    for pin in pins.pinned_files().unwrap_or_default() {
                        let _ = std::fs::remove_file(pin);
                    }
                }
                return Err(e);
            }
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
            if let Some(pid) = dataplane::state::agent_pid(&pins).filter(|&p| !runs_this_binary(p))
            {
                println!(
                    "the agent (pid {pid}) runs another build: restart it with this one (an \
                     earlier build's views, metrics and flow log may not read what this upgrade \
                     changed)"
                );
            }
        }
        Command::Detach { iface, all } => {
            let names = if all { pins.attached()? } else { iface.into_iter().collect() };
            if names.is_empty() {
                println!("not attached to any interface under {}", pins.path().display());
            }
            let _lock = if names.is_empty() { None } else { Some(WriteLock::acquire(&pins)?) };
            for name in &names {
                dataplane::detach(&pins, name)?;
                println!("detached from {name}");
            }
            // A running agent attaches its node file's interfaces again within seconds,
            // unfiltered until then: said, as the operator may mean it (to have one attached
            // anew with the node file's hook) or not.
            if let Some(agent) = agent_state::read(&pins).filter(|a| a.running(&pins)) {
                let back: Vec<&str> = names
                    .iter()
                    .filter(|n| agent.node_interfaces.contains(n))
                    .map(String::as_str)
                    .collect();
                if !back.is_empty() {
                    let (verb, it) = if back.len() == 1 { ("is", "it") } else { ("are", "them") };
                    eprintln!(
                        "warning: {} {verb} in the node file of the running agent (pid {}), \
                         which attaches {it} again within 10 s, unfiltered until then; to keep \
                         {it} detached, stop the agent first, or take {it} out of its node file \
                         and restart it",
                        back.join(", "),
                        agent.pid,
                    );
                }
            }
            // A running agent withdraws within a second; a crashed one's routes go now.
            let withdrawn = bgp::announce::withdraw_without_agent(&pins, "the node is detached")?;
            if withdrawn > 0 {
                println!("withdrew {withdrawn} BGP announcements no agent looks after");
            }
        }
        Command::Check { file, node } => {
            if let Some(node) = node {
                let n = xdpgate::node::load(&node)?;
                println!("{}: ok ({} interfaces)", node.display(), n.interfaces.len());
            }
            let (policy, compiled) = plan::load_checked(&file, &Default::default())?;
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
        Command::VerifyFlow(args) => return verify_flow::run(&pins, args),
        Command::Rules { policy, output } => {
            views::print(&chosen_policy(&pins, policy)?, output.format())?;
        }
        Command::Plan(args) => plan::run(&pins, args)?,
        Command::Apply { file, diff: true, output } => {
            plan::run(&pins, plan::Args { file, output })?
        }
        Command::Apply { file, .. } => {
            // Sets keep their run-time changes (`xdpgate set`) over the file's elements.
            let (policy, source) =
                policy::load_with_sets(&file, &dataplane::sets::changes(&pins)?)?;
            // One-shot: backends the dataplane has taken out stay out (`xdpgate run` probes
            // them and brings them back); every other backend counts as healthy.
            let down = lb::pinned_unhealthy(&pins)?;
            let health = |b: std::net::IpAddr| !down.contains(&b);
            let (generation, lbs) = transaction::apply_policy(&pins, &policy, &source, &health)
                .with_context(|| format!("{}: cannot be applied", file.display()))?;
            println!("applied {} as generation {generation}", file.display());
            for w in xdpgate::host_cover::warnings(&pins, &policy).unwrap_or_default() {
                eprintln!("warning: {w}");
            }
            // Under the write lock: an agent starting now announces after this, not before;
            // and only while this policy runs (a later apply withdraws for its own).
            let withdrawn = WriteLock::acquire(&pins).and_then(|_lock| {
                if apply::active(&pins)?.1.generation != generation {
                    return Ok(0);
                }
                bgp::announce::withdraw_removed_without_agent(&pins, &lbs)
            });
            match withdrawn {
                Ok(0) => {}
                Ok(n) => {
                    let s = if n == 1 { "" } else { "s" };
                    println!("withdrew the route of {n} frontend{s} the policy no longer has");
                }
                // The policy is in force all the same.
                Err(e) => eprintln!(
                    "warning: withdrawing the BGP routes of frontends the policy no longer has \
                     failed: {e:#}"
                ),
            }
        }
        Command::Run { policy, node, probe_concurrency, metrics_addr, flow_log } => {
            // The agent reports write errors (a closed stdout flow log) instead of dying.
            // SAFETY: setting one signal's disposition before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            let node = node.map(|n| xdpgate::node::load(&n)).transpose()?;
            let log = flow_log.open()?.map(|s| flowlog::FlowLog::new(s, flow_log.flow_log_probes));
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(agent::run(
                &pins,
                agent::RunConfig {
                    policy,
                    node,
                    max_concurrent: probe_concurrency,
                    metrics_addr: metrics_addr.0,
                    flow_log: log,
                    flow_log_interval: flow_log.interval(),
                },
            ))?;
        }
        Command::Metrics => print!("{}", metrics::render(&pins)?),
        Command::Flows(args) => flows_cmd::run(&pins, args)?,
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
        Command::Status { output } => {
            views::print(&status::read(&pins)?, output.format())?;
        }
        Command::Lb(args) => xdpgate::lb::run(&pins, args)?,
        Command::Set(args) => xdpgate::set::run(&pins, args)?,
        Command::Nat { output } => {
            let report = nat::report(&pins, &apply::running_record(&pins)?)?;
            views::print(report.as_slice(), output.format())?;
        }
        Command::Observe(args) => observe::run(&pins, args)?,
        Command::Stats { output } => {
            views::print(&stats::read(&pins)?, output.format())?;
        }
        Command::NextHop(args) => views::nexthop::run(&pins, &args)?,
        Command::Topology(args) => views::topology::run(&pins, &args)?,
        Command::Bgp(args) => views::bgp::run(&pins, args)?,
        Command::Drain(args) => bgp::drain_cmd::run(&pins, &args, true)?,
        Command::Undrain(args) => bgp::drain_cmd::run(&pins, &args, false)?,
        Command::Decap(args) => xdpgate::decap::run(&pins, args)?,
        Command::Connectivity(args) => {
            if !views::connectivity::run(&pins, &args)? {
                return Ok(ExitCode::from(views::connectivity::UNREACHABLE));
            }
        }
        Command::Completions(args) => {
            cli_docs::completions(Cli::command(), &args, &mut std::io::stdout().lock())?;
        }
        Command::Man(args) => cli_docs::man(Cli::command(), &args, &mut std::io::stdout().lock())?,
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
        let next_hop = ["next-hop", "--src", "203.0.113.9", "--dst", "198.51.100.2:80"];
        let connectivity = ["connectivity", "--src", "203.0.113.9", "--dst", "198.51.100.2:80"];
        let views: [&[&str]; 10] = [
            &["status"],
            &["stats"],
            &["flows"],
            &["lb"],
            &["nat"],
            &["rules"],
            &verify,
            &next_hop,
            &connectivity,
            &["topology"],
        ];
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

    /// Spans of time are refused past a year, and negative or not finite, when the command
    /// line is read: larger ones overflowed the clocks they were added to, and the agent
    /// panicked after installing its policy, `capture` after emptying its file, `drain`
    /// after writing its record (seen failing: the large values accepted, and capture's
    /// `-1`, `inf` and `NaN`).
    #[test]
    fn spans_of_time_are_bounded() {
        let run = ["run", "--policy", "p.yaml"];
        let capture = ["capture", "-w", "out.pcap"];
        let drain = ["drain"];
        // `--flag=value`, so that a negative value reaches the flag's parser.
        let parse = |command: &[&str], flag: &str, value: &str| {
            let flag = format!("{flag}={value}");
            Cli::try_parse_from(["xdpgate"].iter().chain(command).chain([&flag.as_str()]))
        };
        // (command, flag, refused values, taken values)
        type Case<'a> = (&'a [&'a str], &'a str, &'a [&'a str], &'a [&'a str]);
        let cases: [Case; 3] = [
            (
                &run,
                "--flow-log-interval",
                &["31536001", "18446744073709551615", "-1"],
                &["0", "60", "31536000"],
            ),
            (
                &capture,
                "--duration",
                &["31536001", "1e20", "inf", "NaN", "-1"],
                &["0", "2.5", "31536000"],
            ),
            (&drain, "--wait", &["31536001", "18446744073709551615", "-1"], &["0", "31536000"]),
        ];
        for (command, flag, bad, good) in cases {
            for value in bad {
                assert!(parse(command, flag, value).is_err(), "{flag}={value} accepted");
            }
            for value in good {
                if let Err(e) = parse(command, flag, value) {
                    panic!("{flag}={value}: {e}");
                }
            }
        }
    }

    /// `decap remove` needs a frontend or a gateway; `--missing-ok` qualifies frontends and
    /// is no choice of its own (seen failing: the usage line offered it as one).
    #[test]
    fn decap_remove_needs_a_frontend_or_a_gateway() {
        let mut cli = Cli::command();
        let usage = cli
            .find_subcommand_mut("decap")
            .and_then(|d| d.find_subcommand_mut("remove"))
            .expect("decap remove")
            .render_usage()
            .to_string();
        assert!(usage.contains("<--frontend <ADDR>|--gateway <ADDR|PREFIX>>"), "{usage}");
        for bad in [&["--missing-ok"][..], &[][..], &["--gateway", "192.0.2.1", "--missing-ok"]] {
            let args = ["xdpgate", "decap", "remove"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
        }
        for good in [
            &["--frontend", "192.0.2.10", "--missing-ok"][..],
            &["--gateway", "192.0.2.1"],
            &["--frontend", "192.0.2.10", "--gateway", "192.0.2.1"],
        ] {
            let args = ["xdpgate", "decap", "remove"].iter().chain(good);
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{good:?}: {e}");
            }
        }
    }

    /// `--help` explains every command, flag and listed value.
    #[test]
    fn every_command_flag_and_value_has_help() {
        let missing = xdpgate::cli_docs::without_help(&Cli::command());
        assert!(missing.is_empty(), "without help text:\n{}", missing.join("\n"));
    }

    /// Completion scripts name every command and flag, and the shells that are installed
    /// here accept them.
    #[test]
    fn completions_for_bash_zsh_and_fish() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["xdpgate", "completions", shell]).unwrap();
            let Command::Completions(args) = cli.command else { panic!("completions") };
            let mut script = Vec::new();
            cli_docs::completions(Cli::command(), &args, &mut script).unwrap();
            let script = String::from_utf8(script).unwrap();
            for word in ["verify-flow", "batch", "flows", "completions", "pin-dir"] {
                assert!(script.contains(word), "{shell}: {word} missing");
            }
            let checked = std::process::Command::new(shell)
                .arg("-n")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map(|mut child| {
                    use std::io::Write as _;
                    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
                    child.wait().unwrap()
                });
            match checked {
                Ok(status) => assert!(status.success(), "{shell} -n rejects the script"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{shell}: {e}"),
            }
        }
    }

    /// The man page is roff generated from the same definition: every command is in it.
    #[test]
    fn man_page_lists_every_command() {
        let mut page = Vec::new();
        cli_docs::man(Cli::command(), &cli_docs::ManArgs { dir: None }, &mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH xdpgate"), "{page}");
        for sub in Cli::command().get_subcommands() {
            // roff writes a hyphen as \-.
            let name = sub.get_name().replace('-', "\\-");
            assert!(page.contains(&name), "{name} missing");
        }
        let dir = std::env::temp_dir().join(format!("xdpgate-man-{}", std::process::id()));
        let mut listed = Vec::new();
        cli_docs::man(Cli::command(), &cli_docs::ManArgs { dir: Some(dir.clone()) }, &mut listed)
            .unwrap();
        let listed = String::from_utf8(listed).unwrap();
        assert!(listed.contains("xdpgate-verify-flow.1"), "{listed}");
        let flows = std::fs::read_to_string(dir.join("xdpgate-flows.1")).unwrap();
        assert!(flows.contains("top"), "{flows}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
