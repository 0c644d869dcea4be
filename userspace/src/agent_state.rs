//! What the running agent tells operators about itself: its pid, and how its last policy
//! load went (time, success, every error). `xdpgate run` writes it to `agent.json` in the
//! state directory; `xdpgate status` and the metrics read it.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use xdpgate_dataplane::{PinDir, state};

use crate::dates::rfc3339;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    /// The policy file the agent loads (at start and on SIGHUP).
    pub policy_file: PathBuf,
    /// Generation of the policy the agent last applied.
    pub generation: u64,
    pub last_reload: Reload,
    /// When a load last succeeded, in seconds since the Unix epoch.
    pub last_success_unix: Option<f64>,
    /// Recurring jobs that are failing now (flow log, NAT expiry, attaching an interface
    /// of the node file, ...), one message each.
    #[serde(default)]
    pub failing: Vec<String>,
    /// When the agent wrote this, in seconds since the Unix epoch: it writes it again every
    /// [`REWRITE_SECS`] (absent from agents before 2026-12-05).
    #[serde(default)]
    pub written_unix: Option<f64>,
    /// The interfaces of its node file, which it attaches again whenever they are detached
    /// (absent from agents before 2026-12-06).
    #[serde(default)]
    pub node_interfaces: Vec<String>,
}

/// How often a running agent writes its state again, changed or not.
pub const REWRITE_SECS: u64 = 5;

/// How old a running agent's state may be before it is not taken for the agent's: older, it
/// could not write it since (a read-only `/run`, or a full one where the file could not be
/// removed either), and it may say a reload went well that failed since.
pub const STALE_SECS: f64 = 15.0;

/// One attempt to load the policy file (the first one at start, then one per SIGHUP).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reload {
    /// RFC 3339 UTC, and seconds since the Unix epoch.
    pub at: String,
    /// `unix` in state files of agents before the JSON names were unified.
    #[serde(rename = "unix_seconds", alias = "unix")]
    pub unix: f64,
    pub successful: bool,
    /// Every error, one per line of the report (empty on success).
    pub errors: Vec<String>,
}

impl Reload {
    pub fn now(result: &Result<u64>) -> Self {
        let unix = now_unix();
        let errors = match result {
            Ok(_) => Vec::new(),
            Err(e) => format!("{e:#}").lines().map(str::to_owned).collect(),
        };
        Self { at: rfc3339(unix as u64), unix, successful: result.is_ok(), errors }
    }
}

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

pub fn path(pins: &PinDir) -> PathBuf {
    state::dir(pins).join("agent.json")
}

/// The state the agent last wrote, if any (whether or not it still runs: see
/// [`AgentState::running`]); but not that of a running agent that has not written it for
/// [`STALE_SECS`], which is not its state now.
pub fn read(pins: &PinDir) -> Option<AgentState> {
    let state: AgentState = serde_json::from_slice(&fs::read(path(pins)).ok()?).ok()?;
    let stale = state.written_unix.is_some_and(|w| now_unix() - w > STALE_SECS);
    (!stale || !state.running(pins)).then_some(state)
}

impl AgentState {
    /// Does the agent that wrote this still run the dataplane at `pins`? Asked of the agent
    /// lock, which the kernel releases when its holder dies: a process that merely exists
    /// under the pid (reused after the agent was killed) is not it.
    pub fn running(&self, pins: &PinDir) -> bool {
        state::agent_pid(pins) == Some(self.pid)
    }

    /// Writes `agent.json` whole: a reader sees the old or the new state, never a part.
    pub fn write(&self, pins: &PinDir) -> Result<()> {
        state::ensure_dir(pins)?;
        state::write_atomic(&path(pins), &serde_json::to_vec_pretty(self)?, 0o600)
    }
}

/// Removes `agent.json`; whether it is gone.
pub fn remove(pins: &PinDir) -> bool {
    match fs::remove_file(path(pins)) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The running agent's state as it is now, for the agent's own metrics endpoint, which so
/// reports a reload even when `agent.json` cannot be written (a full `/run`).
#[derive(Clone, Default)]
pub struct Live(Arc<Mutex<Option<AgentState>>>);

impl Live {
    pub fn set(&self, state: &AgentState) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(state.clone());
    }

    pub fn get(&self) -> Option<AgentState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file whose pid another process has now (pid 1 here) is not a running agent;
    /// the holder of the agent lock is (seen failing: any live pid counted as the agent).
    #[test]
    fn a_running_agent_is_the_agent_locks_holder() {
        let pins = PinDir::new(format!("/tmp/xgtest-agent-state-{}", std::process::id()));
        let mut agent = AgentState {
            pid: 1,
            policy_file: "policy.yaml".into(),
            generation: 1,
            last_reload: Reload::now(&Ok(1)),
            last_success_unix: None,
            failing: Vec::new(),
            written_unix: None,
            node_interfaces: Vec::new(),
        };
        assert!(!agent.running(&pins), "pid 1, no agent lock held");
        let lock = state::AgentLock::acquire(&pins).unwrap();
        assert!(!agent.running(&pins), "pid 1 while another process holds the lock");
        agent.pid = std::process::id();
        assert!(agent.running(&pins), "the lock's holder");
        drop(lock);
        assert!(!agent.running(&pins), "the lock released");
        fs::remove_dir_all(state::dir(&pins)).unwrap();
    }
}
