//! `xdpgate run`: the long-running agent that applies a policy, probes the backends and
//! keeps each service's Maglev table to its healthy backends.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Result, anyhow};
use aya_log::EbpfLogger;
use log::{info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use xdpgate_common::events::FlowEvent;

use xdpgate_dataplane::{
    self as dataplane, PinDir, flows,
    lb::{self, LbMaps},
    nat,
    state::{AgentLock, WriteLock},
    transaction,
};
use xdpgate_policy::{
    self as policy,
    lb::{BackendHealth, CompiledLb, ServiceSpec},
};

use crate::{
    flowlog,
    health::{Change, Health, Prober, Target},
};

/// The probe targets of every service that has a probe.
fn targets(lbs: &CompiledLb) -> Vec<Target> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in &lbs.services {
        let Some(probe) = &s.probe else { continue };
        for (b, _) in &s.pool {
            let backend = lbs.backends[*b as usize];
            if seen.insert((backend, probe.name.clone())) {
                out.push(Target { backend, probe: probe.clone() });
            }
        }
    }
    out
}

/// Health of backend `b` for service purposes: unhealthy if any probe of a service it
/// belongs to says so (a backend with no probe is healthy).
struct HealthView<'a> {
    lbs: &'a CompiledLb,
    down: &'a HashSet<(IpAddr, String)>,
}

impl HealthView<'_> {
    fn for_service(&self, service: usize, b: u32) -> bool {
        self.healthy_in(&self.lbs.services[service], self.lbs.backends[b as usize])
    }
}

impl BackendHealth for HealthView<'_> {
    fn healthy(&self, backend: IpAddr) -> bool {
        !self.down.iter().any(|(a, _)| *a == backend)
    }

    fn healthy_in(&self, service: &ServiceSpec, backend: IpAddr) -> bool {
        service.probe.as_ref().is_none_or(|p| !self.down.contains(&(backend, p.name.clone())))
    }
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

/// Runs until SIGINT or SIGTERM; SIGHUP re-reads the policy file. The dataplane keeps
/// running from its pinned state after the agent exits.
pub async fn run(
    pins: &PinDir,
    file: &Path,
    max_concurrent: usize,
    metrics_addr: Option<std::net::SocketAddr>,
    mut flow_log: Option<flowlog::Sink>,
) -> Result<()> {
    // Serves GET /metrics until run returns (the server stops when dropped).
    let _metrics = match metrics_addr {
        Some(addr) => Some(crate::metrics::spawn(addr, pins.clone()).await?),
        None => None,
    };
    // This process is the dataplane's one writer of policy until it exits.
    let _owner = AgentLock::acquire(pins)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    // The dataplane's flow events, read as they come when a flow log is wanted.
    let mut events = match flow_log {
        Some(_) => {
            let ring = dataplane::event_ring(pins)?;
            // SAFETY: the ring owns its map fd, open until the AsyncFd drops it.
            Some(
                unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                    .map_err(|e| anyhow!("{e}"))?,
            )
        }
        None => None,
    };
    // Backends out of service, by probe. They stay out across a reload, and across a
    // restart (from the flags of the running dataplane), until their probes succeed
    // `threshold` times: neither puts a dead backend back into rotation.
    let mut down: HashSet<(IpAddr, String)> = HashSet::new();
    let mut was_down = lb::pinned_unhealthy(pins)?;
    loop {
        let (policy, source) = policy::load(file)?;
        let (tables, lbs) = policy::compile_all(&policy)?;
        let targets = targets(&lbs);
        down = targets
            .iter()
            .map(|t| (t.backend, t.probe.name.clone()))
            .filter(|k| down.contains(k) || was_down.contains(&k.0))
            .collect();
        was_down.clear();
        let view = HealthView { lbs: &lbs, down: &down };
        let generation = {
            let lock = WriteLock::acquire(pins)?;
            transaction::install(&lock, pins, &policy, &source, &tables, &lbs, &view)?
        };
        info!("applied {} as generation {generation}", file.display());
        for (backend, probe) in &down {
            info!("backend {backend} starts unhealthy (probe {probe}), as it was");
        }
        let (tx, mut rx) = mpsc::channel::<Change>(256);
        let prober = Prober::spawn(targets, &down, max_concurrent, tx);
        let mut maps = LbMaps::open(pins)?;
        let mut expiry = tokio::time::interval(std::time::Duration::from_secs(1));
        let names = flows::Names::read(pins)?;
        // Programs come and go with attach and upgrade: look for new ones every tick.
        let mut loggers = Vec::new();
        let reload = loop {
            tokio::select! {
                ready = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                    let mut guard = ready?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() >= std::mem::size_of::<FlowEvent>() {
                            // SAFETY: the dataplane writes whole FlowEvents (plain data).
                            let e: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                            if let Some(sink) = flow_log.as_mut() {
                                sink.write(&flowlog::event_line(&names, &e))?;
                            }
                        }
                    }
                    guard.clear_ready();
                }
                Some(change) = rx.recv() => {
                    on_change(&mut maps, &lbs, &mut down, &change)?;
                }
                _ = expiry.tick() => {
                    dataplane_loggers(pins, &mut loggers)?;
                    for (_, logger) in &mut loggers {
                        logger.flush();
                    }
                    let e = nat::expire(pins, &policy, nat::monotonic_ns())?;
                    if e.expired + e.released > 0 {
                        info!("NAT: {} translations idled out, {} ports free again", e.expired, e.released);
                    }
                    if let Some(sink) = flow_log.as_mut() {
                        for line in flowlog::sweep(pins, &names)? {
                            sink.write(&line)?;
                        }
                    }
                }
                _ = hup.recv() => break true,
                _ = term.recv() => break false,
                _ = tokio::signal::ctrl_c() => break false,
            }
        };
        prober.stop();
        if !reload {
            info!("stopping; the dataplane keeps running from its pinned state");
            return Ok(());
        }
        info!("SIGHUP: reloading {}", file.display());
    }
}

/// A backend changed state: rebuild the tables of the services it serves.
fn on_change(
    maps: &mut LbMaps,
    lbs: &CompiledLb,
    down: &mut HashSet<(IpAddr, String)>,
    change: &Change,
) -> Result<()> {
    let key = (change.backend, change.probe.clone());
    match change.health {
        Health::Unhealthy => {
            warn!(
                "backend {} unhealthy (probe {}): {}",
                change.backend, change.probe, change.reason
            );
            down.insert(key);
        }
        Health::Healthy => {
            info!(
                "backend {} healthy again (probe {}): {}",
                change.backend, change.probe, change.reason
            );
            down.remove(&key);
        }
    }
    let view = HealthView { lbs, down };
    let ids: HashMap<IpAddr, u32> =
        lbs.backends.iter().enumerate().map(|(i, a)| (*a, i as u32)).collect();
    let Some(&b) = ids.get(&change.backend) else { return Ok(()) };
    for (id, s) in lbs.services.iter().enumerate() {
        let affected = s.probe.as_ref().is_some_and(|p| p.name == change.probe)
            && s.pool.iter().any(|(m, _)| *m == b);
        if affected {
            maps.update_service(lbs, id as u32, &|m| view.for_service(id, m))?;
            info!("service {}/{}: table rebuilt", s.lb, s.rule);
        }
    }
    // The health flag last: once it (and so `xdpgate lb`) says a backend is out, no table
    // still sends it new flows.
    maps.set_backend(b, change.backend, view.healthy(change.backend))?;
    Ok(())
}
