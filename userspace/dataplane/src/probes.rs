//! What the running agent's health probes say, per backend and probe: a backend failing one
//! service's probe stays in the tables of services with another probe it passes, while its
//! one health flag in the dataplane (kept for established flows and `xdpgate lb`) says
//! "down" once any probe fails.
//!
//! The agent keeps it in `probes.json` in the state directory, written under the write lock
//! with every table it builds, so `xdpgate lb drain` and `enable` rebuild from the same
//! health the agent uses (the flag alone would take such a backend out of every table).

use std::{collections::BTreeSet, fmt, net::IpAddr};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use xdpgate_policy::lb::{BackendHealth, ServiceSpec};

use crate::{PinDir, state};

const FILE: &str = "probes.json";

/// One backend under one probe. A probe's name is unique within its load balancer only, so
/// the load balancer is part of it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProbeKey {
    pub backend: IpAddr,
    pub lb: String,
    pub probe: String,
}

impl ProbeKey {
    /// `backend` under `service`'s probe; none for a service without one.
    pub fn of(service: &ServiceSpec, backend: IpAddr) -> Option<Self> {
        let probe = service.probe.as_ref()?.name.clone();
        Some(Self { backend, lb: service.lb.clone(), probe })
    }
}

/// The probe as logs name it: `load balancer/probe`.
impl fmt::Display for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.lb, self.probe)
    }
}

/// The backends under probes that fail, as agent `pid` has them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHealth {
    pub pid: u32,
    pub down: BTreeSet<ProbeKey>,
    /// Every probe the agent runs: the next agent tells one of them that passed from one
    /// they did not run (added or renamed since), which it knows nothing of.
    #[serde(default)]
    pub probed: BTreeSet<ProbeKey>,
}

impl ProbeHealth {
    /// Saves it for the CLI; the caller holds the write lock and has just built tables from
    /// it.
    pub fn save(&self, pins: &PinDir) -> Result<()> {
        state::write_json(pins, FILE, &Some(self))
    }

    /// What the agent that runs now last built tables from; none when no agent runs (or
    /// it has not saved one yet: the file is another agent's). Read under the write lock.
    pub fn of_running_agent(pins: &PinDir) -> Result<Option<Self>> {
        let Some(pid) = state::agent_pid(pins) else { return Ok(None) };
        Ok(Self::saved(pins)?.filter(|h| h.pid == pid))
    }

    /// What the agent that saved last built tables from, whether it runs or not (a starting
    /// agent's predecessor); none without a file.
    pub fn saved(pins: &PinDir) -> Result<Option<Self>> {
        state::read_json(pins, FILE)
    }
}

/// Unhealthy for the flag if any probe fails; in a service's table, only if that service's
/// probe fails (a backend with no probe is healthy).
impl BackendHealth for ProbeHealth {
    fn healthy(&self, backend: IpAddr) -> bool {
        !self.down.iter().any(|k| k.backend == backend)
    }

    fn healthy_in(&self, service: &ServiceSpec, backend: IpAddr) -> bool {
        ProbeKey::of(service, backend).is_none_or(|k| !self.down.contains(&k))
    }
}
