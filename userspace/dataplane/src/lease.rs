//! A lease in a pinned map that keeps a piece of the dataplane working for a command while
//! the command runs (`observe`'s events, `capture`'s copies) and lapses by itself when the
//! command dies. A thread of its own renews it, so a command blocked writing to a slow
//! reader keeps it; should it lapse all the same (the process stopped, say), the renewal
//! says so on standard error. Only the holder of the tool's `ToolLock` may hold the lease,
//! so a renewal or a release never touches another command's lease.

use std::{
    sync::mpsc::{self, RecvTimeoutError, Sender},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{
    PinDir, monotonic_ns,
    state::{Tool, ToolLock},
};

/// What a leased map holds and how to move its end.
pub trait Held: Send + 'static {
    /// Readies the map before the first renewal, under the lock.
    fn begin(&mut self) -> Result<()> {
        Ok(())
    }
    /// When the lease now written in the kernel ends (CLOCK_MONOTONIC ns).
    fn until(&self) -> Result<u64>;
    /// Writes the lease with its end at `until`.
    fn renew(&mut self, until: u64) -> Result<()>;
    /// Ends the lease at once.
    fn release(&mut self);
}

/// A held lease, renewed every `every` for `length` by its own thread until dropped; then
/// released.
pub struct Lease {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _lock: ToolLock,
}

impl Lease {
    /// Takes `tool`'s lock (or fails naming the holder) and then the lease in `held`.
    pub fn take(
        pins: &PinDir,
        tool: Tool,
        mut held: impl Held,
        length: Duration,
        every: Duration,
    ) -> Result<Self> {
        let lock = ToolLock::acquire(pins, tool, Duration::ZERO)?;
        unheld(&held, tool, length)?;
        held.begin()?;
        // The end last written: a lease that says another is not this command's any more.
        let mut mine = monotonic_ns() + length.as_nanos() as u64;
        held.renew(mine)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Ends when the holder drops its sender.
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                match renew(&mut held, tool, length, mine) {
                    Ok(Some(until)) => mine = until,
                    // Left to its holder: no renewal, and no release.
                    Ok(None) => return,
                    Err(e) => {
                        eprintln!("xdpgate {}: renewing its lease failed: {e:#}", tool.name())
                    }
                }
            }
            if held.until().is_ok_and(|until| until == mine) {
                held.release();
            }
        });
        Ok(Self { stop: Some(stop), thread: Some(thread), _lock: lock })
    }
}

/// Returns once no other command holds the lease in the kernel: the lock alone does not
/// say so when its file went with the state directory (a cleaner of /run) while its holder
/// ran on, renewing its lease. A lease whose holder died lapses within `length`; one that is
/// renewed meanwhile, or runs longer, is another command's.
fn unheld(held: &impl Held, tool: Tool, length: Duration) -> Result<()> {
    let first = held.until()?;
    let give_up = monotonic_ns() + length.as_nanos() as u64;
    loop {
        let (until, now) = (held.until()?, monotonic_ns());
        if until <= now {
            return Ok(());
        }
        if until != first || now > give_up {
            bail!(
                "another xdpgate {} holds its lease in the dataplane (its lock file is gone: \
                 the state directory was removed under it); nothing was changed",
                tool.name()
            );
        }
        std::thread::sleep(Duration::from_nanos(until - now).min(Duration::from_millis(50)));
    }
}

/// Renews the lease last written to end at `mine`; its new end, or `None` when another
/// command holds it now (this one was held up past its end, and its lock file went with the
/// state directory: see [`unheld`]).
fn renew(held: &mut impl Held, tool: Tool, length: Duration, mine: u64) -> Result<Option<u64>> {
    let (was, now) = (held.until()?, monotonic_ns());
    if was != mine && was > now {
        eprintln!(
            "xdpgate {}: another xdpgate {} holds its lease now (this process was held up past \
             its own): the dataplane no longer sends to this one",
            tool.name(),
            tool.name()
        );
        return Ok(None);
    }
    if was < now {
        eprintln!(
            "xdpgate {}: its lease ran out {} ms ago (this process was held up), and the \
             dataplane stopped sending to it until now: what happened meanwhile is missing",
            tool.name(),
            (now - was) / 1_000_000
        );
    }
    let until = now + length.as_nanos() as u64;
    held.renew(until)?;
    Ok(Some(until))
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Instant,
    };

    use super::*;
    use crate::state;

    /// A lease in memory, shared with the test as the pinned map is with other commands.
    #[derive(Clone)]
    struct Memory(Arc<Mutex<u64>>);

    impl Held for Memory {
        fn until(&self) -> Result<u64> {
            Ok(*self.0.lock().unwrap())
        }
        fn renew(&mut self, until: u64) -> Result<()> {
            *self.0.lock().unwrap() = until;
            Ok(())
        }
        fn release(&mut self) {
            *self.0.lock().unwrap() = 0;
        }
    }

    /// The pin and state directories, removed however the test ends.
    struct Dirs(PinDir);

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(state::dir(&self.0));
            let _ = std::fs::remove_dir_all(self.0.path());
        }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A lease another command took over (this one held up past its end, its lock file gone
    /// with the state directory) is left to it: not renewed over, and not released when this
    /// one ends, whether a renewal or the end finds it; its own lease is released (seen
    /// failing with the renewal's check of the end it last wrote taken out: it went on
    /// renewing over the other's; with the end's taken out: it released the other's).
    #[test]
    fn a_lease_another_command_holds_is_left_to_it() {
        let dirs = Dirs(PinDir::new(format!("/tmp/xgtest-lease-{}", std::process::id())));
        std::fs::create_dir_all(dirs.0.path()).unwrap();
        let memory = Memory(Arc::new(Mutex::new(0)));
        let (length, every) = (Duration::from_millis(300), Duration::from_millis(20));
        let lease = Lease::take(&dirs.0, Tool::Observe, memory.clone(), length, every).unwrap();
        let first = memory.until().unwrap();
        wait_for("renewed", || memory.until().unwrap() != first);
        let theirs = monotonic_ns() + 60_000_000_000;
        let renewing = lease.thread.as_ref().unwrap();
        // Written again should a renewal that read its own end just before overwrite it (as
        // the other command's renewal then finds this one's and gives up); a renewal that
        // never checks overwrites it every time and never gives up.
        wait_for("the renewal gives the lease up", || {
            let mut until = memory.0.lock().unwrap();
            if *until != theirs {
                *until = theirs;
            }
            renewing.is_finished()
        });
        assert_eq!(memory.until().unwrap(), theirs, "renewed over the other's");
        drop(lease);
        assert_eq!(memory.until().unwrap(), theirs, "released the other's");
        // Taken over between two renewals: this command's end leaves it too.
        *memory.0.lock().unwrap() = 0;
        let rarely = Duration::from_secs(3600);
        let lease = Lease::take(&dirs.0, Tool::Observe, memory.clone(), length, rarely).unwrap();
        *memory.0.lock().unwrap() = theirs;
        drop(lease);
        assert_eq!(memory.until().unwrap(), theirs, "released the other's at its end");
        // Theirs ended: this command's next lease is its own, and released at its end.
        *memory.0.lock().unwrap() = 0;
        let lease = Lease::take(&dirs.0, Tool::Observe, memory.clone(), length, every).unwrap();
        assert!(memory.until().unwrap() > monotonic_ns(), "taken");
        drop(lease);
        assert_eq!(memory.until().unwrap(), 0, "released");
    }
}
