//! Backends an operator took out of rotation (`xdpgate lb drain`, Katran's and HAProxy's
//! admin-disable): a drained backend leaves the Maglev tables of its load balancer's
//! services, as an unhealthy one does, but its health flag stays up, so the flows already
//! pinned to it keep it until they end.
//!
//! The drained backends are kept in `drained.json` in the state directory, written under
//! the write lock. Every writer that builds a Maglev table (apply, the agent's start,
//! reload and health changes, drain and enable themselves) reads it under that lock, so a
//! drain survives reloads and restarts and the agent never puts a drained backend back.
//! Drain and enable rebuild from the health the running agent builds from (`probes`), and
//! save the state only once the tables are rebuilt.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use xdpgate_policy::{
    Policy,
    lb::{BackendHealth, CompiledLb, ServiceSpec},
};

use crate::{
    PinDir, apply,
    lb::{self, LbMaps},
    probes::ProbeHealth,
    state::{self, WriteLock},
};

/// Drained backends, as (load balancer, backend address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drained(BTreeSet<(String, IpAddr)>);

impl Drained {
    pub fn contains(&self, lb: &str, backend: IpAddr) -> bool {
        self.0.contains(&(lb.to_owned(), backend))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The drains of backends `policy` still has in their load balancer's pools: one
    /// removed is forgotten, and its address added back later is a backend in rotation.
    pub fn pruned(&self, policy: &Policy) -> Self {
        let has =
            |lb: &str, backend: IpAddr| {
                policy.load_balancers.iter().filter(|l| l.name == lb).any(|l| {
                    l.pools.iter().any(|p| p.backends.iter().any(|b| b.address == backend))
                })
            };
        Self(self.0.iter().filter(|(lb, backend)| has(lb, *backend)).cloned().collect())
    }
}

/// `lb/address, ...`, or `none`.
impl std::fmt::Display for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let each: Vec<String> = self.0.iter().map(|(lb, b)| format!("{lb}/{b}")).collect();
        f.write_str(&each.join(", "))
    }
}

/// The drained backends' file.
pub const FILE: &str = "drained.json";
/// A copy of the drains in force: what every reader goes on from when the file does not
/// parse (edited by hand), so a broken file neither puts a drained backend back nor stops
/// a reader.
const COPY: &str = "drained.saved.json";

/// The drained backends in force (none when the file is absent). When the file does not
/// parse, those of the copy, with the parse error (`Some`) for the caller to warn of; an
/// error when the copy does not read either (absent: the file is of a build before it).
pub fn read(pins: &PinDir) -> Result<(Drained, Option<anyhow::Error>)> {
    let broken = match state::read_json(pins, FILE) {
        Err(e) if e.root_cause().is::<serde_json::Error>() => e,
        read => return Ok((read?, None)),
    };
    let no_copy = match read_copy(pins) {
        Ok(Some(drained)) => {
            let warning = anyhow!("{broken:#}; going on from its copy ({drained})");
            return Ok((drained, Some(warning)));
        }
        Ok(None) => format!("{COPY} is absent"),
        Err(e) => format!("{e:#}"),
    };
    Err(anyhow!(
        "{broken:#}; no copy to go on from ({no_copy}): mend it, or remove it to drain none"
    ))
}

/// [`read`] for a command that shows the drains: a broken file's error is logged as a
/// warning, and the command goes on from the copy.
pub fn read_warned(pins: &PinDir) -> Result<Drained> {
    let (drained, broken) = read(pins)?;
    if let Some(e) = broken {
        log::warn!("{e:#}");
    }
    Ok(drained)
}

/// [`read`] under the write lock, which also brings the copy up to date with a file that
/// reads: hand edits and builds before the copy write the file alone. Failing that is only
/// logged: the copy is a fallback.
pub fn read_locked(pins: &PinDir, _lock: &WriteLock) -> Result<(Drained, Option<anyhow::Error>)> {
    let (drained, broken) = read(pins)?;
    if broken.is_some() {
        return Ok((drained, broken));
    }
    let current = match read_copy(pins) {
        Ok(Some(copy)) => copy == drained,
        // Never drained: nothing to keep.
        Ok(None) => drained.is_empty(),
        Err(_) => false,
    };
    if !current {
        save_copy(pins, &drained);
    }
    Ok((drained, None))
}

/// The copy; `None` when absent.
fn read_copy(pins: &PinDir) -> Result<Option<Drained>> {
    state::read_json(pins, COPY)
}

fn save_copy(pins: &PinDir, drained: &Drained) {
    if let Err(e) = state::write_json(pins, COPY, drained) {
        log::warn!("bringing {COPY} up to date with {FILE}: {e:#}");
    }
}

/// Saves the drained backends; under the write lock. The file decides whether it is
/// saved; its copy follows, or failing that, the next [`read_locked`] brings it up to date.
pub fn save(pins: &PinDir, drained: &Drained) -> Result<()> {
    state::write_json(pins, FILE, drained)?;
    save_copy(pins, drained);
    Ok(())
}

/// `health` with the drained backends taken out of their load balancers' tables. The
/// overall flag (`healthy`) is left alone: it is what keeps established flows on a backend.
pub struct WithDrained<'a> {
    pub health: &'a dyn BackendHealth,
    pub drained: &'a Drained,
}

impl BackendHealth for WithDrained<'_> {
    fn healthy(&self, backend: IpAddr) -> bool {
        self.health.healthy(backend)
    }

    fn healthy_in(&self, service: &ServiceSpec, backend: IpAddr) -> bool {
        !self.drained.contains(&service.lb, backend) && self.health.healthy_in(service, backend)
    }
}

/// What [`set`] did.
#[derive(Debug, Serialize)]
pub struct Changed {
    pub load_balancer: String,
    pub backend: IpAddr,
    pub drained: bool,
    /// `lb/rule` of the services whose tables were rebuilt.
    pub services: Vec<String>,
    /// Whether the backend was already in that state (nothing changed).
    pub unchanged: bool,
}

/// Drains (`drain`) or enables backend `backend` of load balancer `lb` in the running
/// policy: saves the state, then rebuilds the tables of the load balancer's services that
/// have it in their pool (each swapped whole). Backends taken out by probes stay out.
pub fn set(pins: &PinDir, lb_name: &str, backend: IpAddr, drain: bool) -> Result<Changed> {
    let lock = WriteLock::acquire(pins)?;
    let record = apply::running_record(pins)?;
    let policy = xdpgate_policy::load_str(&record.source, "the applied policy")
        .map_err(|e| anyhow!("the applied policy no longer loads: {e}"))?;
    let lbs = xdpgate_policy::lb::compile(&policy)?.carried(&record.backends, &record.services)?;
    let Some(lb_policy) = policy.load_balancers.iter().find(|l| l.name == lb_name) else {
        let names: Vec<&str> = policy.load_balancers.iter().map(|l| l.name.as_str()).collect();
        bail!("no load balancer {lb_name:?} in the applied policy (it has: {})", list(&names));
    };
    let members: BTreeSet<IpAddr> =
        lb_policy.pools.iter().flat_map(|p| p.backends.iter().map(|b| b.address)).collect();
    if !members.contains(&backend) {
        let names: Vec<String> = members.iter().map(IpAddr::to_string).collect();
        bail!(
            "{backend} is not a backend of load balancer {lb_name:?} (its pools have: {})",
            list(&names)
        );
    }
    // A file that does not parse must not hold up a drain, nor undo the others: it is
    // replaced, from its copy.
    let (old, broken) = read_locked(pins, &lock)?;
    if let Some(e) = &broken {
        log::warn!("{e:#}");
    }
    let mut drained = old.clone();
    let key = (lb_name.to_owned(), backend);
    let unchanged = if drain { !drained.0.insert(key) } else { !drained.0.remove(&key) };
    // The tables first, the state after: a rebuild that fails leaves the drain as it was
    // (each table is swapped whole, so those already rebuilt are rebuilt back).
    let mut services = Vec::new();
    let done = rebuild(pins, &lbs, &drained, lb_name, backend, &mut services)
        .and_then(|()| save(pins, &drained));
    if let Err(e) = done {
        return Err(match services.is_empty() {
            true => e.context("nothing was changed"),
            false => undo(pins, &lbs, &old, lb_name, backend, e),
        });
    }
    if broken.is_some() {
        log::warn!("replaced {FILE}: it holds the drains in force again");
    }
    Ok(Changed { load_balancer: lb_name.to_owned(), backend, drained: drain, services, unchanged })
}

/// Rebuilds the tables as `old` has them after `failed`, and says how that went.
fn undo(
    pins: &PinDir,
    lbs: &CompiledLb,
    old: &Drained,
    lb_name: &str,
    backend: IpAddr,
    failed: anyhow::Error,
) -> anyhow::Error {
    match rebuild(pins, lbs, old, lb_name, backend, &mut Vec::new()) {
        Ok(()) => failed.context("nothing was changed"),
        Err(e) => failed.context(format!(
            "the tables rebuilt before it could not be rebuilt back ({e:#}): they may differ \
             from the saved drain state until the next health change, reload or drain"
        )),
    }
}

/// Rebuilds the tables of `lb_name`'s services with `backend` in their pool, with the
/// health the agent builds them from (its probes', per service), or with no agent running,
/// the dataplane's flags; `done` gets each one rebuilt. The caller holds the write lock.
fn rebuild(
    pins: &PinDir,
    lbs: &CompiledLb,
    drained: &Drained,
    lb_name: &str,
    backend: IpAddr,
    done: &mut Vec<String>,
) -> Result<()> {
    // Unreadable (an agent of another build): nothing is rebuilt, as the flags would take
    // a backend out of rules whose probe it passes, and the agent would not put it back.
    let agent = ProbeHealth::of_running_agent(pins).context(
        "the running agent's probe health (is it of another build? restart it on this one)",
    )?;
    let down = lb::pinned_unhealthy(pins)?;
    let flags = |b: IpAddr| !down.contains(&b);
    let probes: &dyn BackendHealth = match &agent {
        Some(agent) => agent,
        None => &flags,
    };
    let health = WithDrained { health: probes, drained };
    let mut maps = LbMaps::open(pins)?;
    for (id, spec) in lbs.services.iter().enumerate() {
        let member = spec.pool.iter().any(|(b, _)| lbs.backends[*b as usize] == backend);
        if spec.lb != lb_name || !member {
            continue;
        }
        let healthy = |b: u32| health.healthy_in(spec, lbs.backends[b as usize]);
        maps.update_service(lbs, id as u32, &healthy)
            .with_context(|| format!("rebuilding the table of {}/{}", spec.lb, spec.rule))?;
        done.push(format!("{}/{}", spec.lb, spec.rule));
    }
    Ok(())
}

fn list<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file broken by hand reads as its copy, with the error; with no copy (a file of a
    /// build before it), only the error: no drain is dropped by a guess. Under the lock, a
    /// file that reads (a hand edit) brings the copy up to date.
    #[test]
    fn a_broken_file_reads_as_its_copy() {
        let pins = PinDir::new(format!("/tmp/xgtest-drain-read-{}", std::process::id()));
        std::fs::create_dir_all(pins.path()).unwrap();
        let dir = state::dir(&pins);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(&pins).unwrap().0, Drained::default(), "no file: none drained");
        let backend = |b: &str| ("lb".to_owned(), b.parse().unwrap());
        let one = Drained([backend("198.51.100.12")].into());
        save(&pins, &one).unwrap();
        std::fs::write(dir.join(FILE), "{").unwrap();
        let (drained, broken) = read(&pins).unwrap();
        assert_eq!(drained, one);
        let broken = format!("{:#}", broken.expect("the parse error"));
        assert!(broken.contains("; going on from its copy (lb/198.51.100.12)"), "{broken}");

        let two = Drained([backend("198.51.100.11"), backend("198.51.100.12")].into());
        std::fs::write(dir.join(FILE), serde_json::to_vec(&two).unwrap()).unwrap();
        let lock = WriteLock::acquire(&pins).unwrap();
        assert_eq!(read_locked(&pins, &lock).unwrap().0, two);
        assert_eq!(read_copy(&pins).unwrap(), Some(two.clone()), "the copy follows the hand edit");
        std::fs::write(dir.join(FILE), "{").unwrap();
        assert_eq!(read(&pins).unwrap().0, two);

        std::fs::write(dir.join(COPY), "[").unwrap();
        let error = format!("{:#}", read(&pins).expect_err("a broken copy: an error"));
        assert!(error.contains("remove it to drain none"), "{error}");
        std::fs::remove_file(dir.join(COPY)).unwrap();
        let error = format!("{:#}", read(&pins).expect_err("no copy: an error"));
        assert!(error.contains("drained.saved.json is absent"), "{error}");

        // A file of a build before the copy gets one; a removed file empties it.
        std::fs::write(dir.join(FILE), serde_json::to_vec(&one).unwrap()).unwrap();
        read_locked(&pins, &lock).unwrap();
        assert_eq!(read_copy(&pins).unwrap(), Some(one));
        std::fs::remove_file(dir.join(FILE)).unwrap();
        assert_eq!(read_locked(&pins, &lock).unwrap().0, Drained::default());
        assert_eq!(read_copy(&pins).unwrap(), Some(Drained::default()));
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir(pins.path()).unwrap();
    }
}
