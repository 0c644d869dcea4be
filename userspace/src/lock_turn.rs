//! The agent's turns at the dataplane's write lock, for its own writes (a reload, a health
//! change's table rebuild, NAT expiry). A turn is a future the agent's loop polls beside its
//! other arms, kept across the loop's iterations: while another writer holds the lock (a
//! loop of `xdpgate apply`, an `lb --maglev` reading), the agent goes on serving signals,
//! probe results and BGP changes, and its writes wait, in one turn, until the lock is free.

use std::{future::Future, pin::Pin, time::Duration};

use anyhow::Result;
use xdpgate_dataplane::{PinDir, state::WriteLock};

/// How often a waiting turn looks at the lock again: soon enough to catch the gap between
/// two writers (`xdpgate apply` polls as often).
const POLL: Duration = Duration::from_millis(5);

/// Logged when a turn finds another writer holding the lock.
pub const WAITING: &str = "another writer holds the write lock: the agent's writes wait for it";

/// The agent's turn at the write lock: none, or one under way.
#[derive(Default)]
pub struct LockTurn {
    /// Polled by the loop's arm (see [`LockTurn::taken`]); dropped only once it is done,
    /// so a wait is never restarted when another arm runs.
    wait: Option<Pin<Box<dyn Future<Output = Result<WriteLock>>>>>,
}

impl LockTurn {
    /// Asks for a turn, unless one is under way (the writes that want it share it).
    pub fn want(&mut self, pins: &PinDir) {
        if self.wait.is_none() {
            self.wait = Some(Box::pin(wait(pins.clone())));
        }
    }

    /// Is a turn under way?
    pub fn wanted(&self) -> bool {
        self.wait.is_some()
    }

    /// The lock, once the turn under way has it (or the error that ended it). Cancel-safe:
    /// dropped before then (another arm of the loop ran), the turn goes on at the next call.
    pub async fn taken(&mut self) -> Result<WriteLock> {
        let taken = self.wait.as_mut().expect("a turn under way").await;
        self.wait = None;
        taken
    }
}

/// Waits, without blocking the agent's thread, until no other writer holds the lock.
async fn wait(pins: PinDir) -> Result<WriteLock> {
    let asked = tokio::time::Instant::now();
    let mut busy = false;
    loop {
        if let Some(lock) = WriteLock::try_acquire(&pins)? {
            if busy {
                log::info!("the write lock is free after {:.1?}", asked.elapsed());
            }
            return Ok(lock);
        }
        if !busy {
            log::info!("{WAITING}");
            busy = true;
        }
        tokio::time::sleep(POLL).await;
    }
}
