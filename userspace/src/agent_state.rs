//! What the running agent tells operators about itself: its pid, and how its last policy
//! load went (time, success, every error). `xdpgate run` writes it to `agent.json` in the
//! state directory; `xdpgate status` and the metrics read it.

use std::{
    fs,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use xdpgate_dataplane::{PinDir, state};

use crate::status::rfc3339;

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
}

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
/// [`AgentState::running`]).
pub fn read(pins: &PinDir) -> Option<AgentState> {
    serde_json::from_slice(&fs::read(path(pins)).ok()?).ok()
}

impl AgentState {
    /// Is the process that wrote this still there?
    pub fn running(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Writes `agent.json` whole: a reader sees the old or the new state, never a part.
    pub fn write(&self, pins: &PinDir) -> Result<()> {
        state::ensure_dir(pins)?;
        state::write_atomic(&path(pins), &serde_json::to_vec_pretty(self)?, 0o600)
    }
}

pub fn remove(pins: &PinDir) {
    let _ = fs::remove_file(path(pins));
}
