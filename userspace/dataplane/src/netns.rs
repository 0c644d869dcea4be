//! Entering a named network namespace (`ip netns add NAME`) without changing the mount
//! namespace, so the pins in the host's bpffs stay visible (`ip netns exec` remounts /sys).

use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result, bail};

/// Moves this thread (call it before spawning others) into `/run/netns/NAME`.
pub fn enter(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path)
        .with_context(|| format!("network namespace {name:?}: cannot open {}", path.display()))?;
    // SAFETY: a valid fd to a netns file; CLONE_NEWNET checks the kind.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name:?}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
