//! Applying a whole policy (NSG tables and load balancers), and `xdpgate run`: the
//! long-running agent that applies a policy, probes the backends and keeps each service's
//! Maglev table to its healthy backends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use log::{debug, error, info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use xdpgate_common::events::{EVENT_POLL_MS, FlowEvent};
use xdpgate_dataplane::{
    self as dataplane, PinDir, apply,
    drain::{self, Drained},
    flows::{self, FlowEntries, Swept},
    lb::{self, LbMaps},
    nat,
    probes::{ProbeHealth, ProbeKey},
    routes,
    state::{self, AgentLock, LOCK_WAIT, WriteLock},
    transaction,
};
use xdpgate_policy::{
    self as policy, Policy, compile,
    lb::{BackendHealth, CompiledLb},
    sets::SetChanges,
};

use crate::{
    agent_state::{self, AgentState, Live, Reload},
    bgp::announce,
    flowlog,
    health::{Change, Found, Health, ProbeStats, Prober, Start, Target},
    host_cover,
    lock_turn::LockTurn,
    node::{self, Node},
};

/// The probe targets of every service that has a probe.
fn targets(lbs: &CompiledLb) -> Vec<Target> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in &lbs.services {
        let Some(probe) = &s.probe else { continue };
        for (b, _) in &s.pool {
            let backend = lbs.backends[*b as usize];
            let target = Target { backend, lb: s.lb.clone(), probe: probe.clone() };
            if seen.insert(target.key()) {
                out.push(target);
            }
        }
    }
    out
}

/// Which of `targets` start down where no prober has them: those in `down`, and, of a
/// backend the dataplane's flag has down (`flagged`: some probe of it failed), those not
/// `known` (whose state nothing says: a probe added or renamed, or any, when the saved
/// health is lost). A dead backend never comes back into rotation on its own, and one
/// failing a probe stays in the rules whose probe it passes.
fn starting_down(
    targets: &[Target],
    down: &BTreeSet<ProbeKey>,
    known: impl Fn(&ProbeKey) -> bool,
    flagged: &HashSet<IpAddr>,
) -> BTreeSet<ProbeKey> {
    let starts_down =
        |k: &ProbeKey| down.contains(k) || (!known(k) && flagged.contains(&k.backend));
    targets.iter().map(Target::key).filter(starts_down).collect()
}

/// Which of `targets` start down as the agent starts ([`starting_down`]): those the last
/// agent saved as failing, and of a flagged backend, those it did not run, and all of them
/// when the file has none failing (it is older than the flag: its save failed).
fn down_at_start(
    targets: &[Target],
    saved: &ProbeHealth,
    flagged: &HashSet<IpAddr>,
) -> BTreeSet<ProbeKey> {
    let failing = |b: IpAddr| saved.down.iter().any(|k| k.backend == b);
    let known = |k: &ProbeKey| saved.probed.contains(k) && failing(k.backend);
    starting_down(targets, &saved.down, known, flagged)
}

/// `targets` as a reload starts their probes: each where the stopped prober `found` it, and
/// one it did not run (added, or renamed) down if its backend is down under another probe.
fn going_on(targets: Vec<Target>, found: &Found) -> Start {
    let flagged = found
        .iter()
        .filter(|(_, (_, t))| t.health() == Health::Unhealthy)
        .map(|(k, _)| k.backend)
        .collect();
    let down = starting_down(&targets, &BTreeSet::new(), |k| found.contains_key(k), &flagged);
    Start::new(targets, found, &down)
}

/// Adds loggers for the aya-log records (rare events only) of every program of this
/// dataplane not yet covered: the programs that use its pinned scratch map.
fn dataplane_loggers(
    pins: &PinDir,
    have: &mut Vec<(u32, EbpfLogger<&'static dyn log::Log>)>,
) -> Result<()> {
    for id in dataplane::program_ids(pins)? {
        if !have.iter().any(|(have, _)| *have == id)
            && let Ok(logger) = EbpfLogger::init_from_id(id)
        {
            have.push((id, logger));
        }
    }
    Ok(())
}

/// What `xdpgate run` is told at start.
pub struct RunConfig {
    pub policy: PathBuf,
    /// Interfaces to attach when they are not (the node file); none: attach nothing.
    pub node: Option<Node>,
    pub max_concurrent: usize,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub flow_log: Option<flowlog::FlowLog>,
    /// How often the flow log's interim records are written; none: never.
    pub flow_log_interval: Option<Duration>,
}

/// The policy the agent runs, compiled.
struct Running {
    policy: Policy,
    /// The policy's source as applied (the file's text), which its generations' records
    /// hold: one of another source is another writer's.
    source: String,
    lbs: CompiledLb,
    names: Arc<flows::Names>,
    /// The sets' run-time changes as last read (`xdpgate set`), for the state directory
    /// should it go: the kernel still enforces them.
    sets: SetChanges,
}

/// When the sweep of idle flows may run next: a pass starts at most once per max(1 s, 20
/// times the last pass's duration), so however big the flow table, the sweep takes at most
/// a twentieth of one CPU (a pass over a million entries takes about a second).
#[derive(Debug)]
struct Pace {
    next: Instant,
}

impl Pace {
    const MIN: Duration = Duration::from_secs(1);
    const FACTOR: u32 = 20;

    fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    fn done(&mut self, started: Instant, took: Duration) {
        self.next = started + Self::MIN.max(took * Self::FACTOR);
    }
}

/// A reload asked by SIGHUP and waiting for the write lock. Several SIGHUPs in one wait make
/// one reload, given up as busy (as a one-shot writer would) once `LOCK_WAIT` has passed
/// since the last of them, so that a late SIGHUP's edit waits as long as the first's.
#[derive(Debug, Default)]
struct PendingReload {
    asked: Option<Instant>,
}

impl PendingReload {
    /// A SIGHUP at `now`; true if it is the first of this wait.
    fn ask(&mut self, now: Instant) -> bool {
        self.asked.replace(now).is_none()
    }

    /// True, and the reload dropped, if it has waited `LOCK_WAIT` by `now`.
    fn gave_up(&mut self, now: Instant) -> bool {
        self.asked.take_if(|asked| now >= *asked + LOCK_WAIT).is_some()
    }

    /// True, and the reload taken, if one is asked.
    fn take(&mut self) -> bool {
        self.asked.take().is_some()
    }
}

/// Removed flows the sweep sends ahead of the agent's loop, at most: their `end` lines
/// are written in batches of up to this many.
const SWEEP_ENDS: usize = 1024;

/// The sweep of idle established flows (`flows::remove_idle`). The dataplane never frees
/// their entries (`FLOWS` is not LRU), so it runs whether or not there is a flow log. A pass
/// runs on a blocking thread, so a big table does not hold up events, probes or signals;
/// with a flow log it sends the flows it removes back for their `end` lines.
struct Sweeper {
    pace: Pace,
    /// The pass under way: when it started, and its thread.
    pass: Option<(Instant, JoinHandle<Result<Swept>>)>,
    /// Flows the pass removed, with the totals of their last records, for the flow log;
    /// open until the pass is done and every one has been taken.
    ends: Option<mpsc::Receiver<(FlowEntries, flowlog::EachWay)>>,
    stop: Arc<AtomicBool>,
}

impl Sweeper {
    fn new() -> Self {
        Self {
            pace: Pace { next: Instant::now() },
            pass: None,
            ends: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts a pass if none is under way and one is due; with the flow log's `reported`,
    /// the flows it removes come back for their `end` lines.
    fn start(
        &mut self,
        pins: &PinDir,
        names: &Arc<flows::Names>,
        reported: Option<&flowlog::Reported>,
    ) {
        let now = Instant::now();
        if self.pass.is_some() || self.ends.is_some() || !self.pace.due(now) {
            return;
        }
        let (pins, names, stop) = (pins.clone(), names.clone(), self.stop.clone());
        let (tx, rx) = mpsc::channel(SWEEP_ENDS);
        self.ends = reported.is_some().then_some(rx);
        let reported = reported.cloned();
        let handle = tokio::task::spawn_blocking(move || {
            flows::remove_idle(&pins, &names, &stop, |ended| {
                if let Some(reported) = &reported {
                    let last = reported.removed(&ended.key);
                    // The agent's loop is gone (it is stopping): the pass ends.
                    tx.blocking_send((ended, last))
                        .map_err(|_| anyhow!("the agent is stopping"))?;
                }
                Ok(())
            })
        });
        self.pass = Some((now, handle));
    }

    /// The pass under way has ended: paces the next one; returns what it did.
    fn finished(
        &mut self,
        joined: Result<Result<Swept>, tokio::task::JoinError>,
    ) -> Result<(Swept, Duration)> {
        let (started, _) = self.pass.take().expect("a pass was under way");
        let took = started.elapsed();
        self.pace.done(started, took);
        let swept = joined.map_err(|e| anyhow!("the sweep's thread failed: {e}"))??;
        Ok((swept, took))
    }

    /// Ends a pass under way soon (at the next entry it looks at); returns the flows it
    /// removed whose `end` lines are still to be written (the channel closes once the pass
    /// is over).
    fn stop(&mut self) -> Option<mpsc::Receiver<(FlowEntries, flowlog::EachWay)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.ends.take()
    }
}

/// The flow log's interim (`continuing`) records: a walk of the flow table every interval,
/// on a blocking thread.
struct Interim {
    every: Option<Duration>,
    next: Instant,
    pass: Option<JoinHandle<flowlog::Walked>>,
    /// Set as the agent stops: a walk under way writes what it has.
    stop: Arc<AtomicBool>,
}

impl Interim {
    fn new(every: Option<Duration>) -> Self {
        let next = Instant::now() + every.unwrap_or_default();
        Self { every, next, pass: None, stop: Arc::default() }
    }

    /// Starts a walk if one is due and none is under way.
    fn start(&mut self, pins: &PinDir, names: &Arc<flows::Names>, log: &flowlog::FlowLog) {
        let Some(every) = self.every else { return };
        let now = Instant::now();
        if self.pass.is_some() || now < self.next {
            return;
        }
        self.next = now + every;
        let (pins, names) = (pins.clone(), names.clone());
        let (reported, probes, queue) =
            (log.reported.clone(), log.probes.clone(), log.writer.queue());
        let stop = self.stop.clone();
        self.pass = Some(tokio::task::spawn_blocking(move || {
            flowlog::interim_lines(&pins, &names, &reported, &probes, &queue, &stop)
        }));
    }
}

/// The probe targets of the running policy and the host's addresses, for telling the
/// agent's own probe connections in the flow log.
fn refresh_probe_connections(log: &mut flowlog::FlowLog, lbs: &CompiledLb, failing: &mut Failing) {
    log.probes.connections.targets =
        targets(lbs).iter().map(|t| (t.backend, t.probe.port)).collect();
    if let Some(local) =
        failing.check("host addresses", flowlog::ProbeConnections::local_addresses())
    {
        log.probes.connections.local = local;
    }
}

/// Recurring jobs that fail are logged once per distinct error, not every second, and
/// again when they work again; what fails now is kept for `agent.json`.
#[derive(Default)]
struct Failing(BTreeMap<&'static str, String>);

impl Failing {
    fn check<T>(&mut self, job: &'static str, result: Result<T>) -> Option<T> {
        match result {
            Ok(v) => {
                if self.0.remove(job).is_some() {
                    info!("{job}: working again");
                }
                Some(v)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.0.get(job) != Some(&msg) {
                    error!("{job}: {msg} (the agent goes on and retries)");
                    self.0.insert(job, msg);
                }
                None
            }
        }
    }

    /// For `agent.json` (and `status`, and the metrics): each error cut to its first
    /// `LISTED_ERROR` characters, as a failing attach's verifier log runs to megabytes (it is
    /// logged whole, once).
    fn list(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(job, msg)| match msg.char_indices().nth(LISTED_ERROR) {
                Some((cut, _)) => format!(
                    "{job}: {}... ({} bytes more in the agent's log)",
                    &msg[..cut],
                    msg.len() - cut
                ),
                None => format!("{job}: {msg}"),
            })
            .collect()
    }
}

/// How much of a failing job's error `agent.json` keeps, in characters.
const LISTED_ERROR: usize = 1000;

/// Loads and compiles the policy file, touching nothing.
fn prepare(pins: &PinDir, file: &Path) -> Result<(Policy, String, compile::Compiled, CompiledLb)> {
    // With the sets' run-time changes (`xdpgate set`), which a reload keeps.
    let (policy, source) = policy::load_with_sets(file, &dataplane::sets::changes(pins)?)?;
    let (tables, lbs) = policy::compile_all(&policy)
        .with_context(|| format!("{}: cannot be applied", file.display()))?;
    Ok((policy, source, tables, lbs))
}

/// What a restore applies (see `policy_lost`): the policy the agent ran, from the record
/// of `generation`, its last, with the sets' run-time changes; its policy file only when
/// that record is gone too. Not the file first: one broken or edited since the last reload
/// would leave the dataplane unfiltered, or put an edit in force without a reload.
fn prepare_restore(
    pins: &PinDir,
    file: &Path,
    generation: u64,
) -> Result<(Policy, String, compile::Compiled, CompiledLb)> {
    let Ok(Some(record)) = dataplane::state::record(pins, generation) else {
        warn!(
            "dataplane: the record of generation {generation} is gone: applying {} again",
            file.display()
        );
        return prepare(pins, file);
    };
    prepare_source(
        pins,
        &format!("{} as generation {generation} ran it", file.display()),
        record.source,
    )
}

/// A policy the agent ran, `source` (`what` names it), loaded with the sets' run-time
/// changes and compiled, touching nothing: what a restore and the undoing of another
/// writer's apply put in force again. Not the file, which may have been edited since
/// without a reload.
fn prepare_source(
    pins: &PinDir,
    what: &str,
    source: String,
) -> Result<(Policy, String, compile::Compiled, CompiledLb)> {
    let changes = dataplane::sets::changes(pins)?;
    let policy = policy::yaml::load_str_with_sets(&source, what, &changes)
        .map_err(|errors| anyhow!("{what} no longer loads:\n{errors}"))?;
    let (tables, lbs) =
        policy::compile_all(&policy).with_context(|| format!("{what}: cannot be applied"))?;
    Ok((policy, source, tables, lbs))
}

/// Whether the running generation is another writer's: its record holds another policy
/// than `source`, the agent's (`xdpgate set` moves the generation on with the same
/// source), or it has none and is none the agent knows of (`names`; their records are
/// written again before this is asked). Only a one-shot `apply` in the moments the agent's
/// lock was gone with its state directory can do that.
fn applied_by_another(pins: &PinDir, source: &str, names: &flows::Names) -> Option<anyhow::Error> {
    let (_, config) = apply::active(pins).ok()?;
    let generation = config.generation;
    let why = match dataplane::state::record(pins, generation).ok()? {
        Some(record) if record.source != source => "its record holds another policy",
        Some(_) => return None,
        None if names.records().iter().any(|r| r.generation == generation) => return None,
        None => "its record is gone, and the agent never knew it",
    };
    Some(anyhow!(
        "generation {generation} was applied by another writer while this agent's lock was \
         gone with its state directory ({why}): the agent applies its own policy again"
    ))
}

/// Logs every line of a failed load, so each error is its own timestamped log line.
fn log_errors(what: &str, e: &anyhow::Error) {
    error!("{what}");
    for line in format!("{e:#}").lines() {
        error!("  {line}");
    }
}

/// Runs until SIGINT or SIGTERM; SIGHUP re-reads the policy file and reopens the flow log.
/// The dataplane keeps running from its pinned state after the agent exits.
///
/// Only start-up can fail: an unreadable or invalid policy, or no dataplane to run it. After
/// that, no error ends the agent: a reload that fails keeps the running policy (recorded in
/// `agent.json` for `xdpgate status` and the metrics), and a failing job (health-change table
/// rebuild, NAT expiry, flow log) is logged and retried.
pub async fn run(pins: &PinDir, config: RunConfig) -> Result<()> {
    let RunConfig {
        policy: file,
        node,
        max_concurrent,
        metrics_addr,
        mut flow_log,
        flow_log_interval,
    } = config;
    let file = file.as_path();
    // A file-size limit (systemd's LimitFSIZE=) makes a flow-log write past it fail (EFBIG),
    // as a full disk does, instead of ending the agent.
    // SAFETY: setting a signal's disposition to ignore.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // First: a SIGTERM or SIGHUP during start-up is handled once it is done, instead of
    // ending the process with the default action.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    // Fails before anything changes, with every error.
    let (policy, source, tables, lbs) = prepare(pins, file)?;
    // This process is the dataplane's one writer of policy until it exits: a one-shot
    // `apply` is refused meanwhile, so the agent never runs on a stale copy.
    let mut owner = AgentLock::acquire(pins)?;
    let bgp_table = node.as_ref().and_then(|n| n.bgp.as_ref()).map(|b| b.table);
    match bgp_table {
        Some(table) => announce::claim_table(pins, table)?,
        None => announce::drop_claim(pins)?,
    }
    // Probe results and durations, for the metrics; kept across reloads.
    let probe_stats = ProbeStats::default();
    // The agent's state, for its metrics whether or not `agent.json` can be written.
    let live = Live::default();
    // Serves GET /metrics until run returns (the server stops when dropped). An address
    // that cannot be bound (a port in use: any local user can take an unprivileged one) is
    // tried again every 10 s, listed as failing meanwhile: the dataplane's agent does not
    // stay down for its metrics.
    let serve_metrics = || async {
        match metrics_addr {
            Some(addr) => {
                crate::metrics::spawn(addr, pins.clone(), probe_stats.clone(), live.clone())
                    .await
                    .map(Some)
            }
            None => Ok(None),
        }
    };
    let mut failing = Failing::default();
    let mut metrics = failing.check("metrics", serve_metrics().await).flatten();
    if let Some(node) = &node
        && !node::missing(pins, node).is_empty()
    {
        // After a reboot: create the maps (pinned) and apply the policy before the first
        // attach, so no packet meets an empty policy.
        load_if_gone(pins, node).context("loading the dataplane")?;
    }
    dataplane::event_ring(pins).map_err(|_| {
        anyhow!(
            "no dataplane is loaded under {}: attach interfaces first (xdpgate attach) or \
             list them in a node file (xdpgate run --node FILE)",
            pins.path().display()
        )
    })?;
    // Backends out of service, by probe. They stay out across a reload, and across a
    // restart (from the flags of the running dataplane), until their probes succeed
    // `threshold` times: neither puts a dead backend back into rotation.
    // The last agent's health, probe by probe, says which probes of a flagged backend
    // failed; where it says nothing of a backend, every probe of it starts down.
    let flagged = lb::pinned_unhealthy(pins)?;
    let saved = ProbeHealth::saved(pins).unwrap_or_else(|e| {
        warn!("the last agent's probe health: {e:#}; starting from the backends' flags");
        None
    });
    let saved = saved.unwrap_or_default();
    let targets_now = targets(&lbs);
    let down_now = down_at_start(&targets_now, &saved, &flagged);
    let start = Start::new(targets_now, &Found::new(), &down_now);
    let mut down = start.health(std::process::id());
    let sources = encap(&node, &lbs)?;
    // The state directory first: the apply writes into it.
    let installed = xdpgate_dataplane::state::ensure_dir(pins)
        .and_then(|_| transaction::install(pins, &policy, &source, &tables, &lbs, &down, sources));
    // One that failed after its switch runs all the same, as after a reload; one that failed
    // before it (its state directory full, say) leaves the running generation in
    // force, which the agent goes on from when it is this file's whole: exiting would leave
    // the dataplane with no agent (no probes, no sweep, no NAT expiry) for as long as the
    // directory stays so, the service manager starting it again and again.
    let (generation, lbs, start_error) = match installed {
        Ok((generation, lbs)) => (generation, lbs, None),
        Err(e) => match e.downcast::<transaction::AppliedPartly>() {
            Ok(partly) => (partly.generation, partly.lbs.clone(), Some(anyhow!("{partly}"))),
            Err(e) => match in_force(pins, &source, &lbs) {
                Some((generation, lbs)) => (generation, lbs, Some(e)),
                None => return Err(e),
            },
        },
    };
    for key in &down.down {
        info!("backend {} starts unhealthy (probe {key}), as it was", key.backend);
    }
    // Before any event or removal, and before agent.json says this agent runs: flows an
    // earlier agent logged count from their totals now, not from zero (seen: a restart
    // doubled every long flow's packets). None yet on a first start.
    if let Some(log) = flow_log.as_ref()
        && let Err(e) = flowlog::seed_running(pins, &log.reported)
    {
        warn!("flow log: reading the running flows' totals: {e:#}; counting them from zero");
    }
    let mut state = AgentState {
        pid: std::process::id(),
        policy_file: file.to_path_buf(),
        generation,
        last_reload: Reload::now(&Ok(generation)),
        last_success_unix: None,
        failing: Vec::new(),
        written_unix: None,
        node_interfaces: node.iter().flat_map(|n| &n.interfaces).map(|i| i.name.clone()).collect(),
    };
    reloaded(pins, file, &mut state, "start", start_error.map_or(Ok(generation), Err));
    if let Some(node) = &node {
        attach_node(pins, node, LOCK_WAIT, &mut failing);
    }
    failing.check("bgp announcements", announce::forget_other_table(pins, bgp_table));
    let names = Arc::new(flows::Names::read(pins)?);
    let sets = dataplane::sets::changes(pins).unwrap_or_default();
    let mut running = Running { policy, source, lbs, names, sets };
    warn_uncovered(pins, &running.policy);
    let mut sweeper = Sweeper::new();
    let mut interim = Interim::new(flow_log_interval);
    if let Some(log) = flow_log.as_mut() {
        refresh_probe_connections(log, &running.lbs, &mut failing);
    }

    // The dataplane's flow events, read as they come when a flow log is wanted.
    let mut events = match flow_log {
        Some(_) => Some(event_reader(pins)?),
        None => None,
    };
    // Next hops cached by the dataplane follow route, neighbour and link changes at once.
    let mut routes = match routes::Watch::open().and_then(|w| {
        // SAFETY: the watch owns its socket, open until the AsyncFd drops it.
        unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }
            .map_err(|e| anyhow!("{e}"))
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            error!("{e:#}: cached next hops follow route changes only by age (within a second)");
            None
        }
    };
    // Changes made while no agent ran.
    failing.check("route generation", routes::invalidate(pins));
    let mut event_poll = tokio::time::interval(std::time::Duration::from_millis(EVENT_POLL_MS));
    event_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut maps = LbMaps::open(pins)?;
    let mut health_tables = HealthTables::built_from(&down);
    // Read again after the install, which read the file under the lock (replacing it from
    // its copy if it did not parse): a file that does not read fails the start either way.
    let mut drains = Drains::read(pins)?;
    // The agent's writes (a reload, table rebuilds, NAT expiry) wait for the write lock in
    // one turn polled beside the loop's other arms: another writer's long hold delays
    // them, not the loop (signals, probe results, BGP changes).
    let mut turn = LockTurn::default();
    // A reload asked and NAT expiry due, for the next turn.
    let mut reload = PendingReload::default();
    // The tick that asked for a NAT expiry pass, if one is due.
    let mut nat_due: Option<Instant> = None;
    // Paced as the sweep is: a pass over a full translation table holds the loop (and the
    // write lock) for a while, and must not every second.
    let mut nat_pace = Pace { next: Instant::now() };
    let mut expiry = tokio::time::interval(std::time::Duration::from_secs(1));
    // Programs come and go with attach and upgrade: look for new ones every tick.
    let mut loggers = Vec::new();
    // Flow events the rate limit held back and those lost to a full ring (a flood of new
    // flows) so far: their lines are missing from the flow log, which a `gap` record in it
    // says, and for a full ring the agent's log too.
    let mut events_missing = dataplane::stats::event_losses(pins).unwrap_or_default();
    let mut ticks = 0u64;
    // Set when another agent took the dataplane after this one lost its lock (see `renew`).
    let mut taken_over = false;
    // Set while the dataplane runs no policy of the agent's (see `policy_lost`), until a
    // reload has applied it again; then the node file's interfaces are attached at once.
    let mut restoring = false;
    // Another writer applied a policy while the agent's lock was gone (`applied_by_another`):
    // the next reload applies the agent's own again.
    let mut overridden = false;
    // A SIGHUP since the last reload: the next one reads the file.
    let mut file_asked = false;
    let mut attach_soon = false;
    let (mut tx, mut rx) = mpsc::channel::<Change>(256);
    let mut prober = Prober::spawn_counted(start, max_concurrent, tx.clone(), probe_stats.clone());
    // Announced only once nothing above can fail: an agent that exits on an error leaves no
    // route that nothing looks after.
    announce_node(
        pins,
        node.as_ref(),
        &running.lbs,
        &down,
        &health_tables,
        &drains.0,
        &probe_stats,
        &mut failing,
    );
    save_state(pins, &mut state, &failing, &live);
    loop {
        tokio::select! {
            ready = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        error!("flow log: reading the dataplane's events failed: {e}; flow begin and deny lines stop (end lines go on)");
                        events = None;
                        continue;
                    }
                };
                log_events(pins, guard.get_inner_mut(), &mut running.names, flow_log.as_mut(), &mut failing);
                guard.clear_ready();
            }
            ready = async { routes.as_mut().expect("guarded").readable_mut().await }, if routes.is_some() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        error!("route watch failed: {e}; cached next hops follow route changes only by age");
                        routes = None;
                        continue;
                    }
                };
                let changed = guard.get_inner().drain();
                guard.clear_ready();
                if failing.check("route watch", changed) == Some(true) {
                    failing.check("route generation", routes::invalidate(pins));
                }
            }
            // The dataplane wakes the reader only once the ring fills: read it on a tick.
            _ = event_poll.tick(), if events.is_some() => {
                let ring = events.as_mut().expect("guarded").get_mut();
                log_events(pins, ring, &mut running.names, flow_log.as_mut(), &mut failing);
            }
            joined = async { (&mut sweeper.pass.as_mut().expect("guarded").1).await }, if sweeper.pass.is_some() => {
                if let Some((swept, took)) = failing.check("flow sweep", sweeper.finished(joined)) {
                    debug!(
                        "flow sweep: {} of {} entries removed in {took:.1?}",
                        swept.removed, swept.seen
                    );
                }
            }
            ended = async { sweeper.ends.as_mut().expect("guarded").recv().await }, if sweeper.ends.is_some() => {
                match ended {
                    Some(first) => {
                        if let Some(log) = flow_log.as_mut() {
                            let ends = sweeper.ends.as_mut().expect("guarded");
                            log_ends(first, ends, &running.names, log, &mut failing);
                        }
                    }
                    // The pass is done and every flow it removed is logged.
                    None => sweeper.ends = None,
                }
            }
            Some(done) = async { flow_log.as_mut().expect("guarded").writer.done.recv().await }, if flow_log.is_some() => {
                let behind = flow_log.as_ref().is_some_and(|l| l.writer.behind());
                writer_did(done, behind, &mut failing);
            }
            joined = async { interim.pass.as_mut().expect("guarded").await }, if interim.pass.is_some() => {
                interim.pass = None;
                if let Some(log) = flow_log.as_mut() {
                    let ring = events.as_mut().map(AsyncFd::get_mut);
                    write_walk(pins, joined, ring, &mut running.names, log, &mut failing);
                }
            }
            Some(change) = rx.recv() => {
                health_tables.change(&mut down, &change);
                turn.want(pins);
                announce_node(pins, node.as_ref(), &running.lbs, &down, &health_tables, &drains.0, &probe_stats, &mut failing);
            }
            tick_at = expiry.tick() => {
                // An interface of the node file that appears late (or came back) is
                // attached; tried every 10 s, as a failing attach loads the programs.
                ticks += 1;
                // Translations end under the write lock, as `flows delete` ends them; a
                // health change's rebuild that failed is retried with them.
                // The tick's own instant: a whole second after the last one's, however late
                // the loop comes to it.
                let now = tick_at.into_std();
                if nat_due.is_none() && nat_pace.due(now) {
                    nat_due = Some(now);
                }
                turn.want(pins);
                if reload.gave_up(Instant::now()) {
                    // As long as a one-shot writer waits, and then as it gives up.
                    reloaded(pins, file, &mut state, "reload", Err(WriteLock::busy(pins, LOCK_WAIT)));
                    save_state(pins, &mut state, &failing, &live);
                }
                tick(pins, &mut loggers, flow_log.as_mut(), &mut failing);
                // Next hops a floating-IP or encapsulated packet found unresolved (and was
                // dropped for): resolved now, so the client's next try gets through.
                failing.check("neighbour resolution", dataplane::neighbours::resolve_wanted(pins));
                if let Some(log) = flow_log.as_mut()
                    && let Ok(now) = dataplane::stats::event_losses(pins)
                    && now != events_missing
                {
                    let limited = now.0.saturating_sub(events_missing.0);
                    let lost = now.1.saturating_sub(events_missing.1);
                    if lost > 0 {
                        warn!(
                            "flow log: {lost} flow events lost to a full event ring (a flood of \
                             new flows): their begin and deny lines are missing ({} in all)",
                            now.1
                        );
                    }
                    if limited + lost > 0 {
                        queued(&mut failing, log.write_lines([flowlog::gap_line(lost, limited)]));
                    }
                    events_missing = now;
                }
                if metrics.is_none() && metrics_addr.is_some() && ticks.is_multiple_of(10) {
                    metrics = failing.check("metrics", serve_metrics().await).flatten();
                }
                // Read before the lock is looked at: a directory that went in between is
                // seen as gone, and its (absent) file not taken for "no changes".
                let sets_now = dataplane::sets::changes(pins);
                if owner.held(pins) {
                    // Its lock where it was (a directory moved away and back): whatever
                    // failed to take it again meanwhile is over.
                    failing.check("taking the agent lock again", Ok(()));
                    if let Ok(now) = sets_now {
                        running.sets = now;
                    }
                } else if !renew(pins, &mut owner, &running, &mut state, bgp_table, &mut failing, &live, (&mut overridden, &mut reload, &mut turn)) {
                    taken_over = true;
                    break;
                }
                follow_generation(pins, &mut running.names, &mut failing);
                // `lb drain` and `enable` (which rebuild the tables themselves), and a file
                // that stops or starts reading again (`status`): within a second.
                drains.refresh(pins, None, &mut failing);
                // Drain, undrain, a detach or a reattach: within a second. Before the
                // reattach below, so that a detached node is withdrawn in every case.
                announce_node(pins, node.as_ref(), &running.lbs, &down, &health_tables, &drains.0, &probe_stats, &mut failing);
                // Tried at once, then every 10 s while the policy is still not in force.
                if policy_lost(pins) && (!restoring || ticks.is_multiple_of(10)) {
                    restoring = true;
                    restore(pins, node.as_ref(), file, &mut failing);
                    reload.ask(Instant::now());
                    turn.want(pins);
                }
                // Never onto a dataplane without the policy: an interface attached to it
                // would pass everything.
                if let Some(node) = &node
                    && (ticks.is_multiple_of(10) || attach_soon)
                    && !restoring
                    && !node::missing(pins, node).is_empty()
                {
                    attach_soon = false;
                    attach_node(pins, node, Duration::ZERO, &mut failing);
                }
                sweeper.start(pins, &running.names, flow_log.as_ref().map(|l| &l.reported));
                if let Some(log) = flow_log.as_mut() {
                    refresh_probe_connections(log, &running.lbs, &mut failing);
                    interim.start(pins, &running.names, log);
                }
                // Failures (and recoveries) of any job since the last write, at most once a
                // second; and every few seconds all the same, so that a state it could not
                // write is seen to be old (`agent_state::read`).
                if failing.list() != state.failing || ticks.is_multiple_of(agent_state::REWRITE_SECS) {
                    save_state(pins, &mut state, &failing, &live);
                }
            }
            _ = hup.recv() => {
                if let Some(log) = flow_log.as_ref() {
                    log.writer.reopen();
                }
                // Read and applied in the next turn at the write lock: a SIGHUP during
                // another writer's hold is applied after it (several, once).
                if reload.ask(Instant::now()) || overridden {
                    info!("SIGHUP: reloading {}", file.display());
                }
                // The file, even where the reload asked already would apply the policy the
                // agent ran (undoing another writer's apply): the operator's newer word.
                file_asked = true;
                turn.want(pins);
            }
            taken = turn.taken(), if turn.wanted() => {
                let Some(lock) = failing.check("write lock", taken) else { continue };
                if reload.take() {
                    // The state directory gone since the last tick: the sets' run-time
                    // changes (and the records) written again first, or the policy would be
                    // loaded without the changes the kernel enforces.
                    // A one-shot apply found meanwhile is undone by this reload if it applies
                    // the file, else by the next.
                    if !owner.held(pins) {
                        info!("the reload found the agent lock gone: taking it again first");
                        if !renew(pins, &mut owner, &running, &mut state, bgp_table, &mut failing, &live, (&mut overridden, &mut reload, &mut turn)) {
                            taken_over = true;
                            break;
                        }
                    }
                    // Loaded under the lock, so no `xdpgate set` comes between the load of the
                    // sets' changes and the install.
                    let prepared = if restoring {
                        prepare_restore(pins, file, state.generation)
                    } else if overridden && !file_asked {
                        let what = format!("{} as the agent ran it", file.display());
                        prepare_source(pins, &what, running.source.clone())
                    } else {
                        prepare(pins, file)
                    };
                    let result = match prepared {
                        Err(e) => Err(e),
                        Ok((policy, source, tables, lbs)) => {
                            // The old probes stop, so that no change of theirs lands on the new
                            // tables; the new ones go on from their counts (a change still
                            // queued is in them), and on failure the old ones do.
                            let found = prober.stop();
                            (tx, rx) = mpsc::channel::<Change>(256);
                            let start = going_on(targets(&lbs), &found);
                            let down_new = start.health(down.pid);
                            let installed = encap(&node, &lbs).and_then(|sources| {
                                transaction::install_under(&lock, pins, &policy, &source, &tables, &lbs, &down_new, sources)
                            });
                            // Failed after its switch: the new policy runs all the same, and the
                            // agent goes on from it (its load balancers above all: a health
                            // change rebuilds their tables).
                            let installed = match installed {
                                Ok((generation, lbs)) => Ok((generation, lbs, None)),
                                Err(e) => match e.downcast::<transaction::AppliedPartly>() {
                                    Ok(partly) => {
                                        let error = anyhow!("{partly}");
                                        Ok((partly.generation, partly.lbs, Some(error)))
                                    }
                                    Err(e) => Err(e),
                                },
                            };
                            match installed {
                                Ok((generation, lbs, error)) => {
                                    let names = failing.check("reading the new policy's rule names", flows::Names::read(pins));
                                    let names = names.map(Arc::new).unwrap_or(running.names);
                                    let sets = std::mem::take(&mut running.sets);
                                    running = Running { policy, source, lbs, names, sets };
                                    down = down_new;
                                    health_tables = HealthTables::built_from(&down);
                                    prober = Prober::spawn_counted(start, max_concurrent, tx.clone(), probe_stats.clone());
                                    error.map_or(Ok(generation), Err)
                                }
                                Err(e) => {
                                    let start = going_on(targets(&running.lbs), &found);
                                    // Changes the old channel held go to the tables as they would have.
                                    let (now, was) = (start.down(), down.down.clone());
                                    for key in now.symmetric_difference(&was) {
                                        let health = if now.contains(key) { Health::Unhealthy } else { Health::Healthy };
                                        let reason = "as its probes found before the reload".into();
                                        health_tables.change(&mut down, &Change { key: key.clone(), health, reason });
                                    }
                                    prober = Prober::spawn_counted(start, max_concurrent, tx.clone(), probe_stats.clone());
                                    Err(e)
                                }
                            }
                        }
                    };
                    let ok = result.is_ok();
                    file_asked = false;
                    reloaded(pins, file, &mut state, "reload", result);
                    if ok {
                        warn_uncovered(pins, &running.policy);
                    }
                    if overridden && ok {
                        overridden = false;
                        info!("the agent's policy is in force again");
                        failing.check("another writer", Ok(()));
                    }
                    if restoring && !policy_lost(pins) {
                        restoring = false;
                        attach_soon = true;
                        info!("the policy is in force again on the dataplane's new maps");
                        failing.check("dataplane", Ok(()));
                        // Route changes heard while the maps were gone failed to be marked.
                        failing.check("route generation", routes::invalidate(pins));
                        // The maps the agent held are not the dataplane's any more.
                        if let Some(m) = failing.check("load balancer maps", LbMaps::open(pins)) {
                            maps = m;
                        }
                        if events.is_some() {
                            events = failing.check("flow log events", event_reader(pins));
                        }
                    }
                    announce_node(pins, node.as_ref(), &running.lbs, &down, &health_tables, &drains.0, &probe_stats, &mut failing);
                    save_state(pins, &mut state, &failing, &live);
                }
                if health_tables.rebuild(&lock, pins, &mut maps, &running.lbs, &down, &mut drains, &mut failing) {
                    announce_node(pins, node.as_ref(), &running.lbs, &down, &health_tables, &drains.0, &probe_stats, &mut failing);
                }
                if let Some(asked) = nat_due.take() {
                    let started = Instant::now();
                    let ended = expire_nat(&lock, pins, &running, &mut failing);
                    // Paced from the tick that asked, not from when the lock came (a few ms
                    // later): from then, the next tick would find it not due, and passes
                    // would run every other second.
                    nat_pace.done(asked, started.elapsed());
                    if let Some(log) = flow_log.as_mut() {
                        let lines = ended.iter().map(|e| {
                            flowlog::end_line(&running.names, e, log.reported.removed(&e.key))
                        });
                        let lines = lines.collect();
                        queued(&mut failing, log.write_ends(lines));
                    }
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Nothing of it was written: the turn had not come.
    if reload.take() {
        info!("the reload waiting for the write lock is not applied: the agent stops");
    }
    // First, while the dataplane is certainly in force: the peers stop sending here. Not
    // when another agent runs it now: the routes and the state file are that one's.
    if !taken_over && let Some(bgp) = node.as_ref().and_then(|n| n.bgp.as_ref()) {
        match announce::withdraw_all(pins, std::process::id(), bgp.table, "the agent stopped") {
            Ok(n) => info!("bgp: withdrew {n} routes from table {} before stopping", bgp.table),
            Err(e) => error!("bgp: withdrawing this node's routes failed: {e:#}"),
        }
    }
    drop(prober);
    // The flows the sweep removed, and removes until it stops at its next entry, get their
    // `end` lines (they are gone from the table), after the lines of a walk under way.
    let ends = sweeper.stop();
    if let Some(log) = flow_log.as_mut() {
        if let Some(pass) = interim.pass.take() {
            interim.stop.store(true, Ordering::Relaxed);
            let (walked, ring) = (pass.await, events.as_mut().map(AsyncFd::get_mut));
            write_walk(pins, walked, ring, &mut running.names, log, &mut failing);
        }
        if let Some(mut ends) = ends {
            while let Some(first) = ends.recv().await {
                log_ends(first, &mut ends, &running.names, log, &mut failing);
            }
        }
    }
    if let Some(flowlog::FlowLog { writer, .. }) = flow_log {
        let (done, left) = writer.finish(FLOW_LOG_STOP).await;
        done.into_iter().for_each(|d| writer_did(d, false, &mut failing));
        if left > 0 {
            error!(
                "flow log: {left} bytes of lines not known to be written: the file did not take \
                 them within {FLOW_LOG_STOP:?}"
            );
        }
    }
    if taken_over {
        return Err(anyhow!("another agent took the dataplane at {}", pins.path().display()));
    }
    agent_state::remove(pins);
    info!("stopping; the dataplane keeps running from its pinned state");
    Ok(())
}

/// The generation in force and `lbs` numbered as it has them, when it runs `source` whole
/// (no change of it left unfinished).
fn in_force(pins: &PinDir, source: &str, lbs: &CompiledLb) -> Option<(u64, CompiledLb)> {
    let record = apply::running(pins).ok()??;
    if record.source != source || apply::changing(pins).unwrap_or(true) {
        return None;
    }
    Some((record.generation, lbs.clone().carried(&record.backends, &record.services).ok()?))
}

/// Records and logs the result of a reload (`what`: or of the agent's start, its first apply).
fn reloaded(pins: &PinDir, file: &Path, state: &mut AgentState, what: &str, result: Result<u64>) {
    state.last_reload = Reload::now(&result);
    match result {
        Ok(generation) => {
            info!("applied {} as generation {generation}", file.display());
            state.generation = generation;
            state.last_success_unix = Some(state.last_reload.unix);
        }
        Err(e) => {
            // What the kernel runs now (an apply that failed part-way may have switched the
            // NSG tables already).
            if let Ok((_, config)) = apply::active(pins) {
                state.generation = config.generation;
            }
            log_errors(
                &format!(
                    "{what} of {} failed; generation {} stays in force:",
                    file.display(),
                    state.generation
                ),
                &e,
            );
        }
    }
}

/// Logs the host's addresses that host mode leaves open (see [`host_cover`]).
fn warn_uncovered(pins: &PinDir, policy: &Policy) {
    match host_cover::warnings(pins, policy) {
        Ok(warnings) => warnings.iter().for_each(|w| warn!("{w}")),
        Err(e) => warn!("{e:#}"),
    }
}

/// Writes `agent.json`, and gives the state to the agent's metrics endpoint. A failed write
/// is logged (the agent's work does not depend on it) and removes the file: an older state
/// (a reload that went well) must not stand for this one; `status` then says the agent
/// wrote none.
fn save_state(pins: &PinDir, state: &mut AgentState, failing: &Failing, live: &Live) {
    state.failing = failing.list();
    state.written_unix = Some(agent_state::now_unix());
    live.set(state);
    if let Err(e) = state.write(pins) {
        if agent_state::remove(pins) {
            warn!("agent state: {e:#}; agent.json removed, so that no older state stands for it");
        } else {
            warn!(
                "agent state: {e:#}; agent.json could not be removed either: it is not taken \
                 for this agent's state {} s after it was written",
                agent_state::STALE_SECS
            );
        }
    }
}

/// Brings the node's BGP announcements in line with its state (with a node file that has a
/// `bgp:` section).
#[expect(clippy::too_many_arguments, reason = "the state a route follows, each needed")]
fn announce_node(
    pins: &PinDir,
    node: Option<&Node>,
    lbs: &CompiledLb,
    down: &ProbeHealth,
    tables: &HealthTables,
    drained: &Drained,
    probes: &ProbeStats,
    failing: &mut Failing,
) {
    let Some(node) = node.filter(|n| n.bgp.is_some()) else { return };
    let answered = probes
        .snapshot()
        .into_iter()
        .filter(|(_, counts)| counts.successes > 0)
        .map(|(key, _)| key)
        .collect();
    let held = tables.held(down);
    let probed = drain::WithDrained { health: down, drained };
    let in_tables = drain::WithDrained { health: &held, drained };
    let answered = |health| announce::Answered { health, answered: &answered };
    let result = announce::update(pins, node, lbs, &answered(&in_tables), &answered(&probed));
    failing.check("bgp announcements", result);
}

/// The outer sources of encapsulation the node file gives or its interfaces have (without
/// one, the transaction finds them on the attached interfaces).
fn encap(node: &Option<Node>, lbs: &CompiledLb) -> Result<xdpgate_dataplane::encap::Chosen> {
    let avoid = xdpgate_dataplane::encap::frontends(lbs);
    node.as_ref().map_or(Ok(Default::default()), |n| n.encap_sources(&avoid))
}

/// The reader of the dataplane's flow events, woken as they come.
fn event_reader(pins: &PinDir) -> Result<AsyncFd<RingBuf<MapData>>> {
    let ring = dataplane::event_ring(pins)?;
    // SAFETY: the ring owns its map fd, open until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| anyhow!("{e}"))
}

/// Whether the dataplane runs no policy: its maps gone (its pin directory removed, say) or
/// made anew (no policy applied to them: re-made by hand for other table sizes, or made by
/// the agent's own attach after that). Its interfaces, if attached, pass everything. The
/// agent's policy is in force from its start-up on, so this is never its own doing.
fn policy_lost(pins: &PinDir) -> bool {
    apply::active(pins).map_or(true, |(_, config)| config.generation == 0)
}

/// Readies a dataplane that lost its policy for the reload that applies it again, as at
/// start-up: with a node file, its maps are made again if they are gone (the pin directory
/// too). Recorded as failing until the policy is in force again.
fn restore(pins: &PinDir, node: Option<&Node>, file: &Path, failing: &mut Failing) {
    let made =
        node.map_or(Ok(()), |node| load_if_gone(pins, node).context("making its maps again"));
    let lost = anyhow!(
        "no policy in force (its maps were removed or made anew): applying the policy it ran \
         again ({} as its last generation's record holds it), no interface of the node file \
         attached until then",
        file.display()
    );
    let error = match made {
        Ok(()) => lost,
        Err(e) => e.context(lost),
    };
    warn!("dataplane: {error:#}");
    failing.check("dataplane", Err::<(), _>(error));
}

/// Creates and pins the dataplane's maps at the node file's sizes, when they are not there.
fn load_if_gone(pins: &PinDir, node: &Node) -> Result<()> {
    if dataplane::event_ring(pins).is_err() {
        dataplane::load_sized(pins, &node.tables)?;
    }
    Ok(())
}

/// Attaches the interfaces of the node file that have no pinned link.
fn attach_node(pins: &PinDir, node: &Node, wait: Duration, failing: &mut Failing) {
    // `None`: another writer has the dataplane; the next tick tries again.
    let Some((attached, errors)) = node::attach_missing(pins, node, wait) else { return };
    for name in attached {
        info!("attached to {name} (node file)");
    }
    let result = match errors.as_slice() {
        [] => Ok(()),
        errors => Err(anyhow!(
            "{}",
            errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>().join("; ")
        )),
    };
    failing.check("node file", result);
}

/// Writes the flow events waiting in the ring to the flow log, in batches.
fn log_events(
    pins: &PinDir,
    ring: &mut RingBuf<MapData>,
    names: &mut Arc<flows::Names>,
    mut flow_log: Option<&mut flowlog::FlowLog>,
    failing: &mut Failing,
) {
    let mut lines = Vec::new();
    while let Some(item) = ring.next() {
        // Of either version: records of programs before an upgrade stay in the ring.
        if let Some(e) = FlowEvent::from_record(&item)
            && let Some(log) = flow_log.as_deref_mut()
        {
            // `xdpgate set` moves the generation on in place (its record saved first), with
            // no reload: the names of a newer generation are read when its first event comes.
            if e.generation > names.generation()
                && let Some(newer) =
                    failing.check("reading the rule names", flows::Names::read(pins))
            {
                *names = Arc::new(newer);
            }
            lines.push(log.event_line(names, &e));
            // A ring filled as fast as it is read is written as it goes, not held.
            if lines.len() == EVENT_BATCH {
                queued(failing, log.write_lines(lines.drain(..)));
            }
        }
    }
    if let Some(log) = flow_log {
        queued(failing, log.write_lines(lines));
    }
}

/// Flow events written together at most.
const EVENT_BATCH: usize = 4096;

/// Re-reads the rule names once the running generation is not theirs (`xdpgate set` moves
/// it on without a reload), for the end and interim lines of flows decided after.
fn follow_generation(pins: &PinDir, names: &mut Arc<flows::Names>, failing: &mut Failing) {
    let Some((_, config)) = failing.check("policy generation", apply::active(pins)) else { return };
    if config.generation != names.generation()
        && let Some(newer) = failing.check("reading the rule names", flows::Names::read(pins))
    {
        *names = Arc::new(newer);
    }
}

/// How long a stopping agent waits for the flow log's thread to write what is queued.
const FLOW_LOG_STOP: Duration = Duration::from_secs(5);

/// Logs and records what the flow log's thread did; `behind`: its queue is at its limit.
fn writer_did(done: flowlog::Done, behind: bool, failing: &mut Failing) {
    match done {
        flowlog::Done::Wrote(result) => {
            let ok = result.is_ok();
            failing.check("flow log", result);
            // Lines it dropped stay listed until it writes and takes batches again.
            if ok && !behind {
                failing.check("flow log queue", Ok(()));
            }
        }
        // Lines are written past the limit meanwhile: not a write failure, a state of its
        // own until a rotation succeeds.
        flowlog::Done::Rotation(result) => {
            failing.check("flow log rotation", result);
        }
        // A job of its own: finding the file in place says nothing of whether writes work,
        // so it must not clear a write failure that `status` shows.
        flowlog::Done::Path(result) => {
            if let Some(Some(path)) = failing.check("flow log path", result) {
                warn!(
                    "flow log {} was moved or removed; writing to a new file there",
                    path.display()
                );
            }
        }
    }
}

/// Records lines the flow log dropped as they were handed over (its thread is behind), under
/// a job of its own: a write of lines queued before, reported after, must not clear it.
fn queued(failing: &mut Failing, result: Result<()>) {
    if result.is_err() {
        failing.check("flow log queue", result);
    }
}

/// Writes the `end` lines of `first` and of the flows after it the sweep has sent already
/// (what its channel holds), as one batch.
fn log_ends(
    first: (FlowEntries, flowlog::EachWay),
    ends: &mut mpsc::Receiver<(FlowEntries, flowlog::EachWay)>,
    names: &flows::Names,
    log: &mut flowlog::FlowLog,
    failing: &mut Failing,
) {
    let mut lines = vec![flowlog::end_line(names, &first.0, first.1)];
    while lines.len() < SWEEP_ENDS
        && let Ok((ended, last)) = ends.try_recv()
    {
        lines.push(flowlog::end_line(names, &ended, last));
    }
    queued(failing, log.write_ends(lines));
}

/// Writes the lines of a walk for interim records (what it counted, also when its read
/// failed part-way, which is logged), then the `end` lines held for them. First the events
/// waiting in `ring`: the `begin` line of a flow the walk found as it began goes before
/// the flow's first record.
fn write_walk(
    pins: &PinDir,
    joined: Result<flowlog::Walked, tokio::task::JoinError>,
    ring: Option<&mut RingBuf<MapData>>,
    names: &mut Arc<flows::Names>,
    log: &mut flowlog::FlowLog,
    failing: &mut Failing,
) {
    if let Some(ring) = ring {
        log_events(pins, ring, names, Some(&mut *log), failing);
    }
    let mut walked = joined.unwrap_or_else(|e| flowlog::Walked {
        failed: Some(anyhow!("the interim records' thread failed: {e}")),
        ..Default::default()
    });
    failing.check("flow log interim records", walked.failed.take().map_or(Ok(()), Err));
    if let Some(dropped) = walked.dropped {
        queued(failing, Err(dropped));
    }
    queued(failing, log.write_interim(walked.rest));
}

/// Ends the translations idle past their timeout, under the write lock; returns the
/// established flows it removed.
fn expire_nat(
    _lock: &WriteLock,
    pins: &PinDir,
    running: &Running,
    failing: &mut Failing,
) -> Vec<FlowEntries> {
    let mut ended = Vec::new();
    let expired = nat::expire(pins, &running.policy, nat::monotonic_ns(), &mut ended);
    if let Some(e) = failing.check("NAT expiry", expired)
        && e.expired + e.released > 0
    {
        info!("NAT: {} translations idled out, {} ports free again", e.expired, e.released);
    }
    ended
}

/// Takes the agent lock again once its file is gone from the state directory (see
/// [`AgentLock::held`]), and writes the agent's state there again. A one-shot apply that
/// got in while the lock was gone is logged and marked `overridden`, with a reload asked
/// (`undo`: the flag, the reload and the lock turn), or the agent would go on from its own
/// copy (a health change rebuilding a load balancer the running policy no longer has).
/// False when another agent has taken the dataplane meanwhile: this one stops, as it would
/// not have started.
#[expect(clippy::too_many_arguments, reason = "the agent's state it renews, each needed")]
fn renew(
    pins: &PinDir,
    owner: &mut AgentLock,
    running: &Running,
    state: &mut AgentState,
    bgp_table: Option<u32>,
    failing: &mut Failing,
    live: &Live,
    undo: (&mut bool, &mut PendingReload, &mut LockTurn),
) -> bool {
    if let Some(pid) = state::agent_pid(pins) {
        error!(
            "another agent (pid {pid}) took the dataplane after this one's lock went with the \
             state directory ({}): this agent stops",
            state::dir(pins).display()
        );
        return false;
    }
    if let Some(lock) = failing.check("taking the agent lock again", AgentLock::acquire(pins)) {
        *owner = lock;
        save_state(pins, state, failing, live);
        // The records of the generations it read (the running one's above all), which went
        // with the directory: reloads number the load balancers' services and backends as
        // the running generation does (live flows name them by id), and the views name its
        // rules.
        for record in running.names.records().iter().rev() {
            if matches!(dataplane::state::record(pins, record.generation), Ok(None)) {
                // Dated when it was made: `status` tells the generation's age by its file.
                let saved = dataplane::state::save(pins, record).and_then(|()| {
                    let at = UNIX_EPOCH + Duration::from_secs(record.applied_unix);
                    let file = std::fs::File::open(state::path_of(pins, record.generation))?;
                    Ok(file.set_modified(at)?)
                });
                failing.check("writing the generations' records again", saved);
            }
        }
        // And the sets' run-time changes, which the kernel still enforces: `xdpgate set`
        // shows and undoes them, and the next reload keeps them.
        let sets = &running.sets;
        let none = SetChanges::default();
        if *sets != none && matches!(dataplane::sets::changes(pins), Ok(c) if c == none) {
            failing.check("writing the sets' changes again", dataplane::sets::save(pins, sets));
        }
        // Said once it is so.
        error!(
            "the state directory {} lost this agent's lock (removed?): taken again, and the \
             records of the generations it knows and the sets' run-time changes written \
             again; the drains it held are lost",
            state::dir(pins).display()
        );
        // Its claim went with the directory.
        if let Some(table) = bgp_table {
            failing.check("claiming the bgp table again", announce::claim_table(pins, table));
        }
    }
    if let Some(e) = applied_by_another(pins, &running.source, &running.names) {
        error!("{e:#}");
        failing.check("another writer", Err::<(), _>(e));
        let (overridden, reload, turn) = undo;
        *overridden = true;
        reload.ask(Instant::now());
        turn.want(pins);
    }
    true
}

/// The once-a-second jobs that need no write lock; none of their errors ends the agent.
fn tick(
    pins: &PinDir,
    loggers: &mut Vec<(u32, EbpfLogger<&'static dyn log::Log>)>,
    flow_log: Option<&mut flowlog::FlowLog>,
    failing: &mut Failing,
) {
    failing.check("dataplane log readers", dataplane_loggers(pins, loggers));
    for (_, logger) in loggers.iter_mut() {
        logger.flush();
    }
    // On the flow log's thread: a file that no longer answers must not hold up the loop.
    if let Some(log) = flow_log {
        log.writer.follow();
    }
}

/// The drained backends (`lb drain`'s `drained.json`) as the agent last read them. A file
/// that does not parse (edited by hand, say) holds back no table rebuild and no BGP update:
/// they go on from its copy (a drained backend stays out, a failing one still leaves), or
/// with no copy, from the drains read before; `status` lists the error until the file
/// reads again.
struct Drains(Drained);

impl Drains {
    fn read(pins: &PinDir) -> Result<Self> {
        let (drained, broken) = drain::read(pins)?;
        if let Some(e) = broken {
            warn!("drained backends: {e:#}");
        }
        info!("drained backends: {drained}");
        Ok(Self(drained))
    }

    /// Reads the file again (under the write lock when `lock`, which keeps its copy up to
    /// date); its copy's drains, or those last read, when it cannot be.
    fn refresh(
        &mut self,
        pins: &PinDir,
        lock: Option<&WriteLock>,
        failing: &mut Failing,
    ) -> &Drained {
        let read = match lock {
            Some(lock) => drain::read_locked(pins, lock),
            None => drain::read(pins),
        };
        let read = match read {
            Ok((drained, None)) => Ok(drained),
            Ok((drained, Some(broken))) => {
                self.take(drained);
                Err(broken)
            }
            Err(e) => Err(e.context(format!("going on from the drains last read ({})", self.0))),
        };
        if let Some(drained) = failing.check("drained backends", read) {
            self.take(drained);
        }
        &self.0
    }

    fn take(&mut self, drained: Drained) {
        if drained != self.0 {
            info!("drained backends: {drained}");
            self.0 = drained;
        }
    }
}

/// Health changes of backends and the tables and flags that must follow them: rebuilt in
/// the agent's next turn at the write lock; a rebuild that fails stays pending and is
/// retried in the turn of the next tick.
struct HealthTables {
    /// Backends under probes that changed since the tables were last rebuilt for them.
    pending: BTreeSet<ProbeKey>,
    /// The pairs the tables hold as down: `down` as they were last built from, pair by
    /// pair (a pair whose rebuild failed keeps what the tables still have).
    built_down: BTreeSet<ProbeKey>,
}

impl HealthTables {
    /// Tables just built whole from `down`.
    fn built_from(down: &ProbeHealth) -> Self {
        Self { pending: BTreeSet::new(), built_down: down.down.clone() }
    }

    /// A backend changed state: `down` follows at once (in the order the changes come),
    /// then, in the next turn at the lock, the tables of the services it serves.
    fn change(&mut self, down: &mut ProbeHealth, change: &Change) {
        let key = &change.key;
        match change.health {
            Health::Unhealthy => {
                warn!("backend {} unhealthy (probe {key}): {}", key.backend, change.reason);
                down.down.insert(key.clone());
            }
            Health::Healthy => {
                info!("backend {} healthy again (probe {key}): {}", key.backend, change.reason);
                down.down.remove(key);
            }
        }
        self.pending.insert(key.clone());
    }

    /// `down` as the tables hold it: a (backend, probe) counts as down while its probe
    /// says so or the tables have it out (its recovery not rebuilt yet: the write lock was
    /// busy, or the rebuild failed). BGP announces from it, so that a frontend whose backend
    /// is back is announced once its tables send that backend new flows, not before; a
    /// withdrawal waits for no table, and a flap the tables never saw withdraws nothing.
    fn held(&self, down: &ProbeHealth) -> ProbeHealth {
        ProbeHealth { down: down.down.union(&self.built_down).cloned().collect(), ..down.clone() }
    }

    /// Rebuilds what the pending changes touch, from `down` as it is now; a change whose
    /// tables and flag were all written is no longer pending (then `true`, some were).
    #[expect(clippy::too_many_arguments, reason = "the inputs of a table, each needed")]
    fn rebuild(
        &mut self,
        // As one writer with `xdpgate lb drain`: the drained backends read under the lock
        // stay out of the tables rebuilt under it, and drain rebuilds from the health saved
        // with them.
        lock: &WriteLock,
        pins: &PinDir,
        maps: &mut LbMaps,
        lbs: &CompiledLb,
        down: &ProbeHealth,
        drains: &mut Drains,
        failing: &mut Failing,
    ) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        failing.check("saving the probes' health", down.save(pins));
        let with_drained =
            drain::WithDrained { health: down, drained: drains.refresh(pins, Some(lock), failing) };
        let ids: HashMap<IpAddr, u32> =
            lbs.backends.iter().enumerate().map(|(i, a)| (*a, i as u32)).collect();
        let id = |key: &ProbeKey| ids.get(&key.backend).copied();
        let mut result = Ok(());
        let mut failed = BTreeSet::new();
        for (sid, s) in lbs.services.iter().enumerate() {
            let affecting: Vec<&ProbeKey> = self
                .pending
                .iter()
                .filter(|k| {
                    ProbeKey::of(s, k.backend).as_ref() == Some(*k)
                        && id(k).is_some_and(|b| s.pool.iter().any(|(m, _)| *m == b))
                })
                .collect();
            if affecting.is_empty() {
                continue;
            }
            let healthy = |m: u32| with_drained.healthy_in(s, lbs.backends[m as usize]);
            match maps.update_service(lbs, sid as u32, &healthy) {
                // The table keeps its previous backends; the next tick tries again.
                Err(e) => {
                    result = Err(e.context(format!("service {}/{}", s.lb, s.rule)));
                    failed.extend(affecting.into_iter().cloned());
                }
                Ok(()) => info!("service {}/{}: table rebuilt", s.lb, s.rule),
            }
        }
        // The health flags last: once one (and so `xdpgate lb`) says a backend is out, no
        // table still sends it new flows.
        for key in &self.pending {
            let Some(b) = id(key) else { continue };
            if let Err(e) = maps.set_backend(b, key.backend, down.healthy(key.backend)) {
                result = Err(e.context(format!("the health flag of backend {}", key.backend)));
                failed.insert(key.clone());
            }
        }
        failing.check("rebuilding tables after a health change", result);
        let done: Vec<_> = self.pending.difference(&failed).cloned().collect();
        for key in &done {
            self.pending.remove(key);
            if down.down.contains(key) {
                self.built_down.insert(key.clone());
            } else {
                self.built_down.remove(key);
            }
        }
        !done.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing attach's error carries the verifier's log, megabytes of it: the state file
    /// keeps its first thousand characters and says how much more the log has (seen failing:
    /// it kept all of it).
    #[test]
    fn a_failing_jobs_error_is_kept_short_for_the_state_file() {
        let mut failing = Failing::default();
        let log = "verifier: ".to_owned() + &"insn\n".repeat(200_000);
        failing.check::<()>("node file", Err(anyhow!("{log}")));
        failing.check::<()>("route watch", Err(anyhow!("no netlink")));
        let list = failing.list();
        assert_eq!(list[1], "route watch: no netlink");
        assert!(list[0].starts_with("node file: verifier: insn\ninsn"), "{}", &list[0][..40]);
        assert!(list[0].len() < 1100, "{} bytes", list[0].len());
        assert!(
            list[0].ends_with(&format!("... ({} bytes more in the agent's log)", log.len() - 1000))
        );
    }

    #[test]
    fn the_sweep_runs_at_most_once_per_twenty_times_its_duration_or_a_second() {
        let t0 = Instant::now();
        let mut pace = Pace { next: t0 };
        assert!(pace.due(t0));
        // A quick pass: the next one a second after the last began.
        pace.done(t0, Duration::from_millis(10));
        assert!(!pace.due(t0 + Duration::from_millis(999)));
        assert!(pace.due(t0 + Duration::from_secs(1)));
        // A pass of 300 ms (a big table): the next one 6 s after it began, so the sweep
        // keeps to a twentieth of a CPU.
        let t1 = t0 + Duration::from_secs(1);
        pace.done(t1, Duration::from_millis(300));
        assert!(!pace.due(t1 + Duration::from_millis(5_999)));
        assert!(pace.due(t1 + Duration::from_secs(6)));
    }

    #[test]
    fn each_sighup_restarts_the_reloads_wait_for_the_write_lock() {
        let t0 = Instant::now();
        let mut reload = PendingReload::default();
        assert!(!reload.gave_up(t0 + LOCK_WAIT), "none asked");
        assert!(reload.ask(t0), "the first SIGHUP of the wait");
        // Another SIGHUP a second before the first one's wait ends: the same reload, whose
        // wait now runs from it.
        let t1 = t0 + LOCK_WAIT - Duration::from_secs(1);
        assert!(!reload.ask(t1), "a later SIGHUP of the same wait");
        assert!(!reload.gave_up(t0 + LOCK_WAIT), "given up as the first SIGHUP's wait ends");
        assert!(!reload.gave_up(t1 + LOCK_WAIT - Duration::from_millis(1)));
        assert!(reload.gave_up(t1 + LOCK_WAIT), "waited LOCK_WAIT since the last SIGHUP");
        assert!(!reload.take(), "given up: nothing left to apply");
        // A new wait after that starts afresh, and is taken by the turn.
        assert!(reload.ask(t1 + LOCK_WAIT));
        assert!(reload.take());
        assert!(!reload.take());
    }
    /// Probe names are unique within one load balancer only: two load balancers' probes of
    /// one name on one backend are two probes, each judging its own rules.
    #[test]
    fn probes_of_one_name_in_two_load_balancers_are_two() {
        let yaml = r#"
virtual_network: {address_space: [198.51.100.0/24]}
load_balancers:
  - name: public
    frontends: [{name: f, address: 192.0.2.10}]
    backend_pools: [{name: p, backends: [198.51.100.11]}]
    probes: [{name: health, protocol: tcp, port: 443}]
    rules:
      - {name: https, frontend: f, protocol: tcp, frontend_port: 443, backend_port: 443,
         backend_pool: p, probe: health}
  - name: internal
    frontends: [{name: f, address: 192.0.2.20}]
    backend_pools: [{name: p, backends: [198.51.100.11]}]
    probes: [{name: health, protocol: http, port: 8080, path: /ready}]
    rules:
      - {name: app, frontend: f, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: p, probe: health}
"#;
        let policy = policy::yaml::load_str(yaml, "two.yaml").unwrap();
        let (_, lbs) = policy::compile_all(&policy).unwrap();
        let targets = targets(&lbs);
        let mut ports: Vec<u16> = targets.iter().map(|t| t.probe.port).collect();
        ports.sort();
        assert_eq!(ports, [443, 8080], "one probe per load balancer");
        // The internal load balancer's probe fails: its rule loses the backend, the public
        // one's keeps it.
        let failing = targets.iter().find(|t| t.probe.port == 8080).unwrap();
        let down = ProbeHealth { pid: 1, down: [failing.key()].into(), ..Default::default() };
        let backend: std::net::IpAddr = [198, 51, 100, 11].into();
        let in_rule = |lb: &str| {
            let s = lbs.services.iter().find(|s| s.lb == lb).unwrap();
            down.healthy_in(s, backend)
        };
        assert!(in_rule("public"));
        assert!(!in_rule("internal"));
    }
    /// At a start, the last agent's saved health says which probes of a flagged backend
    /// failed, and the others start up; where it says nothing of a backend (or is lost),
    /// every probe of a flagged backend starts down. At a reload, each probe goes on where
    /// the old prober found it (a renamed one under its old name), and one it did not run
    /// (added) starts down if its backend is down under another.
    #[test]
    fn which_probes_start_down() {
        let probe = |name: &str| policy::model::Probe {
            name: name.into(),
            kind: policy::model::ProbeKind::Tcp,
            port: 80,
            path: "/".into(),
            interval_ms: 5000,
            timeout_ms: 5000,
            threshold: 2,
        };
        let (x, y): (IpAddr, IpAddr) = ([198, 51, 100, 11].into(), [198, 51, 100, 12].into());
        let t = |backend, name: &str| Target { backend, lb: "lb".into(), probe: probe(name) };
        let targets = [t(x, "http"), t(x, "https"), t(y, "http")];
        let flagged = HashSet::from([x]);
        let keys = |ks: &[&Target]| ks.iter().map(|t| t.key()).collect::<BTreeSet<_>>();
        // Restart: x failed "http" only; "tls" (added, or "https" renamed) the last agent
        // did not run, and it starts down with x flagged (seen failing when "known" was any
        // probe of the backend: it started up).
        let saved = ProbeHealth {
            pid: 1,
            down: keys(&[&targets[0]]),
            probed: keys(&[&targets[0], &targets[1], &targets[2]]),
        };
        let now = [t(x, "http"), t(x, "https"), t(y, "http"), t(x, "tls")];
        assert_eq!(down_at_start(&now, &saved, &flagged), keys(&[&now[0], &now[3]]));
        // A file older than the flag (its save failed): x's probes all start down (seen
        // failing: "http" started up).
        let stale = ProbeHealth { down: BTreeSet::new(), ..saved.clone() };
        let down = down_at_start(&now, &stale, &flagged);
        assert_eq!(down, keys(&[&now[0], &now[1], &now[3]]));
        // Restart without the saved health: every probe of x.
        let none = BTreeSet::new();
        let lost = starting_down(&targets, &none, |_| false, &flagged);
        assert_eq!(lost, keys(&[&targets[0], &targets[1]]));
        // Reload: "https" renamed "tls" (the same probe otherwise); x down under "http", up
        // under "https", y up: "tls" goes on from "https" (before 2026-12-05 it started down,
        // as a new probe, for x).
        let down = crate::health::Tracker::new(Health::Unhealthy);
        let up = crate::health::Tracker::new(Health::Healthy);
        let found: Found = [
            (targets[0].key(), (probe("http"), down)),
            (targets[1].key(), (probe("https"), up.clone())),
            (targets[2].key(), (probe("http"), up)),
        ]
        .into();
        let renamed = vec![t(x, "http"), t(x, "tls"), t(y, "http"), t(y, "tls")];
        let start = going_on(renamed.clone(), &found);
        assert_eq!(start.down(), keys(&[&renamed[0]]));
        // Added, with no probe of its own gone: new, down for the backend down under another.
        let added = vec![t(x, "http"), t(x, "https"), t(x, "tls"), t(y, "http")];
        let start = going_on(added.clone(), &found);
        assert_eq!(start.down(), keys(&[&added[0], &added[2]]));
    }
}
