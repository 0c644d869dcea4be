//! A whole policy applied as one transaction by the dataplane's one writer: NSG tables into
//! the inactive slot, the generation's record saved, the flip, then the load balancers and
//! NAT gateways (before the flip when no policy runs yet).

use anyhow::{Result, bail};
use xdpgate_policy::{
    Policy, compile, compile_all,
    lb::{self, BackendHealth, CompiledLb},
    names::Record,
};

use crate::{
    PinDir, apply, drain,
    encap::{self, Applier, Chosen},
    lb::{self as lb_maps, LbMaps},
    nat,
    probes::ProbeHealth,
    sets,
    state::{self, WriteLock},
};

/// A transaction that failed after its switch: the new policy is in force (its NSG tables,
/// generation and record) and a step after the switch failed (the load balancers' and NAT
/// gateways' tables, the sets' kept changes, the probes' health). Its writer must go on
/// from the new policy, as installed, not from the one before; applying it again finishes
/// the job.
#[derive(Debug, thiserror::Error)]
#[error(
    "generation {generation} is in force, but a step after its switch failed (apply it again \
     to finish): {error:#}"
)]
pub struct AppliedPartly {
    pub generation: u64,
    /// The load balancers as installed (see [`install`]).
    pub lbs: CompiledLb,
    pub error: anyhow::Error,
}

/// Compiles everything first (so a policy that cannot be compiled changes nothing), then
/// swaps the NSG tables in and installs the load balancers, as one writer (the pin
/// directory's write lock). Refuses while an agent owns the dataplane: the agent would go
/// on from its own copy of the policy. Returns the generation and the compiled load
/// balancers.
pub fn apply_policy(
    pins: &PinDir,
    policy: &Policy,
    source: &str,
    health: &dyn BackendHealth,
) -> Result<(u64, CompiledLb)> {
    let (tables, lbs) = compile_all(policy)?;
    let lock = WriteLock::acquire(pins)?;
    if let Some(pid) = state::agent_pid(pins) {
        bail!(
            "the agent (pid {pid}) owns the dataplane at {}: nothing changed. Change the policy \
             file it runs and reload it (`systemctl reload xdpgate`, or `kill -HUP {pid}`)",
            pins.path().display()
        );
    }
    // The outer sources the dataplane has (the agent's, from its node file) stay.
    let kept = Chosen::kept(pins, &encap::frontends(&lbs))?;
    install_locked(&lock, pins, policy, source, &tables, &lbs, health, kept, Applier::Cli)
}

/// Applies a policy already compiled, as the dataplane's one writer (waits for the lock).
/// What the agent does: it owns the dataplane, so no agent check. Its probes' health is
/// saved with the tables built from it, under the same lock. `sources`: the node file's
/// outer source addresses for encapsulation, or found on its interfaces (the others are
/// found on the attached ones, see `encap`). Returns the generation and the load balancers
/// as installed (numbered as the running generation had them, [`CompiledLb::carried`]).
pub fn install(
    pins: &PinDir,
    policy: &Policy,
    source: &str,
    tables: &compile::Compiled,
    lbs: &CompiledLb,
    health: &ProbeHealth,
    sources: Chosen,
) -> Result<(u64, CompiledLb)> {
    let lock = WriteLock::acquire(pins)?;
    install_under(&lock, pins, policy, source, tables, lbs, health, sources)
}

/// [`install`] under a write lock the caller took (the agent's reload waits for it without
/// blocking its loop).
#[expect(clippy::too_many_arguments, reason = "the transaction's inputs, each needed")]
pub fn install_under(
    lock: &WriteLock,
    pins: &PinDir,
    policy: &Policy,
    source: &str,
    tables: &compile::Compiled,
    lbs: &CompiledLb,
    health: &ProbeHealth,
    sources: Chosen,
) -> Result<(u64, CompiledLb)> {
    let (generation, lbs) =
        install_locked(lock, pins, policy, source, tables, lbs, health, sources, Applier::Agent)?;
    if let Err(e) = health.save(pins) {
        let error = e.context("the probes' health was not saved for `xdpgate lb drain`");
        return Err(AppliedPartly { generation, lbs, error }.into());
    }
    Ok((generation, lbs))
}

/// The second half of [`apply_policy`], under the write lock. The record of the new
/// generation is saved before the flip, so whatever instant a writer dies at, the running
/// generation has its record.
#[expect(clippy::too_many_arguments, reason = "the transaction's inputs, each needed")]
fn install_locked(
    lock: &WriteLock,
    pins: &PinDir,
    policy: &Policy,
    source: &str,
    tables: &compile::Compiled,
    lbs: &CompiledLb,
    health: &dyn BackendHealth,
    sources: Chosen,
    applier: Applier,
) -> Result<(u64, CompiledLb)> {
    // The sets' run-time changes the policy was loaded with are still the kept ones (an
    // `xdpgate set` between the load and this lock would otherwise be undone).
    let kept = sets::changes(pins)?;
    if kept.pruned(&policy.sets) != policy.set_changes.pruned(&policy.sets) {
        bail!(
            "a set was changed (xdpgate set) while this policy was loaded: nothing changed, \
             apply it again"
        );
    }
    let (_, running) = apply::active(pins)?;
    let running = state::record(pins, running.generation)?;
    // Numbered as the running generation has them: flow entries and counters name backends
    // and services by id.
    let lbs = &match &running {
        Some(r) => lbs.clone().carried(&r.backends, &r.services)?,
        None => lbs.clone(),
    };
    // Refused here, before anything is written, when a rule needs a source the node lacks.
    let sources = sources.complete_on(&pins.attached()?, &encap::frontends(lbs))?;
    let mut encap_sources = encap::check(pins, lbs, &sources, applier)?;
    let mut maps = LbMaps::open(pins)?;
    let mut nat_maps = nat::NatMaps::open(pins)?;
    let lookups =
        apply::Lookups::of(pins, !lbs.addresses.is_empty(), !policy.nat_gateways.is_empty())?;
    let mut prepared = apply::prepare(pins, tables, &policy.settings, lookups, running.as_ref())?;
    let record = Record::new(
        prepared.generation,
        prepared.slot,
        source,
        policy,
        tables,
        lb::service_names(lbs),
        lbs.backends.clone(),
    );
    state::save(pins, &record)?;
    // Before the first policy the dataplane passes every packet untouched, so the load
    // balancers and NAT gateways go in first and the first policy starts whole. The other
    // order left a moment (forever, if the writer died in it) where a SYN to a frontend
    // found no frontend and started a plain flow to its address, which outlived the install.
    // Drained backends stay out of the tables whatever the probes say.
    let (drained, broken) = drain::read_locked(pins, lock)?;
    let health = drain::WithDrained { health, drained: &drained };
    let mut install = || -> Result<()> {
        lb_maps::restart_counters(pins, lbs, running.as_ref())?;
        maps.install(lbs, &health, running.as_ref())?;
        nat_maps.install(pins, policy, running.as_ref())?;
        encap::install(encap_sources.as_mut(), lbs, &sources)
    };
    // Past the flip the new policy runs: a failure from here on is reported as partly applied.
    let generation = prepared.generation;
    let partly = |error: anyhow::Error| -> anyhow::Error {
        AppliedPartly { generation, lbs: lbs.clone(), error }.into()
    };
    if prepared.running_generation() == 0 {
        install()?;
        apply::switch(pins, &mut prepared)?;
    } else {
        apply::switch(pins, &mut prepared)?;
        install().map_err(partly)?;
    }
    // Only now: until the flip the drains and kept changes are those of the policy still
    // running.
    let still = drained.pruned(policy);
    if let Some(e) = &broken {
        log::warn!("{e:#}");
    }
    if still != drained {
        drain::save(pins, &still).map_err(|e| {
            partly(e.context("the drains of backends the policy no longer has were not forgotten"))
        })?;
    } else if broken.is_some() {
        // Only a repair: the drains in force are the copy's either way.
        match drain::save(pins, &still) {
            Ok(()) => log::warn!("replaced {}: it holds the drains in force again", drain::FILE),
            Err(e) => log::warn!("replacing {}: {e:#}", drain::FILE),
        }
    }
    let pruned = kept.pruned(&policy.sets);
    if pruned != kept {
        sets::save(pins, &pruned).map_err(|e| {
            partly(e.context(
                "the sets' run-time changes of sets or elements the file no longer has were not \
                 forgotten",
            ))
        })?;
    }
    Ok((prepared.generation, lbs.clone()))
}
