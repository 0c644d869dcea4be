//! Entering a named network namespace (`ip netns add NAME`) without changing the mount
//! namespace, so the pins in the host's bpffs stay visible (`ip netns exec` remounts /sys).

use std::{fs::File, path::Path};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// Moves this thread (call it before spawning others) into `/run/netns/NAME`.
pub fn enter(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path)
        .with_context(|| format!("network namespace {name:?}: cannot open {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {name:?}"))
}
