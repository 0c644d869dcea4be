//! The write lock for the agent's own periodic writes (NAT expiry, a health change's table
//! rebuild): they yield to other writers, but not forever. Tried without waiting; after
//! [`SKIPS_BEFORE_WAITING`] tries in a row found it busy, waited for (at most [`WAIT`]), so
//! a writer that keeps taking the lock (a loop of `xdpgate apply`) delays the job by a
//! bounded time instead of starving it: the wait catches the gap between two such writers.

use std::time::Duration;

use anyhow::Result;
use xdpgate_dataplane::{PinDir, state::WriteLock};

/// Busy tries (one a second for the agent's ticks) before the next one waits.
pub const SKIPS_BEFORE_WAITING: u32 = 3;

/// The longest a waiting try delays its job: a writer that holds the lock longer without
/// a break is waited for again at the next try.
pub const WAIT: Duration = Duration::from_secs(2);

/// How often a waiting try looks at the lock again.
const POLL: Duration = Duration::from_millis(5);

/// Logged when a job's tries start waiting for the lock.
pub const WAITING: &str = "another writer keeps the write lock: waiting for it";

/// One job's tries at the lock.
#[derive(Debug, Default)]
pub struct LockTurn {
    /// Tries in a row that found the lock busy.
    skipped: u32,
}

impl LockTurn {
    /// The lock, or `None` when this try yields to another writer (counted). A waiting try
    /// polls without blocking the agent's thread: its tasks (probes, the metrics endpoint)
    /// run meanwhile; its loop (signals, health changes) resumes after the wait.
    pub async fn take(&mut self, pins: &PinDir) -> Result<Option<WriteLock>> {
        let mut lock = WriteLock::try_acquire(pins)?;
        if lock.is_none() && self.skipped >= SKIPS_BEFORE_WAITING {
            if self.skipped == SKIPS_BEFORE_WAITING {
                log::info!("{WAITING} (up to {WAIT:?} a try)");
            }
            let deadline = tokio::time::Instant::now() + WAIT;
            while lock.is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
                lock = WriteLock::try_acquire(pins)?;
            }
        }
        self.skipped = if lock.is_some() { 0 } else { self.skipped + 1 };
        Ok(lock)
    }

    /// Tries in a row that found the lock busy.
    pub fn skipped(&self) -> u32 {
        self.skipped
    }
}
