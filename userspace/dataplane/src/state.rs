//! What the control plane keeps beside the pinned maps, and the locks that make it the only
//! writer of one dataplane.
//!
//! - The *write lock* is an exclusive `flock` on the pin directory, held by every writer from
//!   reading the active slot to the flip (and by attach, detach and upgrade).
//! - The *agent lock* is held by `xdpgate run` for its lifetime, so a one-shot `apply` knows an
//!   agent owns the dataplane and refuses instead of leaving the agent with a stale policy.
//! - One *record* per generation (`generations/<N>.json` in the state directory, root's and
//!   private) holds the policy source and the names of the rules of each table, written
//!   atomically *before* the flip. Readers take the generation from the kernel and read its
//!   record, so the saved policy always equals the running one, even when a writer is killed
//!   at any instant; recent generations stay, so flows decided under them keep their names.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use xdpgate_policy::names::Record;

use crate::PinDir;

/// How many generations' records are kept (flows decided under older ones lose their names).
pub const KEEP_GENERATIONS: u64 = 32;

/// How long a writer waits for another one to finish before it gives up.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Where xdpgate keeps the records of the dataplane pinned at `pins` (bpffs holds only maps
/// and links): its path with `/` written `_`, and `_` and `%` escaped (`%5F`, `%25`), so no
/// two pin directories share one (`/sys/fs/bpf/a_b` and `/sys/fs/bpf/a/b` did).
///
/// A directory of the earlier name (`_` not escaped), when this one does not exist yet and
/// the pin directory does, is this dataplane's only if no other directory could have had
/// that name (one reading its `_` and `/` otherwise). Then, while an agent of an earlier
/// build holds it, it is used as it is (the agent's lock, its records); once none does, it
/// is moved to this name. Otherwise it is left to whoever it is, and this one starts anew.
pub fn dir(pins: &PinDir) -> PathBuf {
    let path = pins.path().to_string_lossy();
    let path = path.trim_matches('/');
    let mut name = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '/' => name.push('_'),
            '_' => name.push_str("%5F"),
            '%' => name.push_str("%25"),
            c => name.push(c),
        }
    }
    let dir = Path::new(ROOT).join(&name);
    let earlier = Path::new(ROOT).join(path.replace('/', "_"));
    if earlier == dir
        || dir.exists()
        || !earlier.is_dir()
        || !pins.path().is_dir()
        || !only_reading(path)
    {
        return dir;
    }
    if agent_pid_in(&earlier).is_some() {
        return earlier;
    }
    // Atomic: of two processes at once, one moves it and the other finds it moved.
    let _ = fs::rename(&earlier, &dir);
    dir
}

/// Whether `path` (a pin directory's, without its leading `/`) is the only existing
/// directory among the paths that read its `/` and `_` either way: the only one an earlier
/// build's state directory name (every `/` written `_`) can have been of.
fn only_reading(path: &str) -> bool {
    let seps: Vec<usize> = path.match_indices(['/', '_']).map(|(i, _)| i).collect();
    // Past this, too many readings to ask about: left alone.
    if seps.len() > 12 {
        return false;
    }
    (0..1u32 << seps.len()).all(|choice| {
        let mut reading = path.as_bytes().to_vec();
        for (bit, &i) in seps.iter().enumerate() {
            reading[i] = if choice >> bit & 1 == 1 { b'/' } else { b'_' };
        }
        let reading = String::from_utf8(reading).expect("only ASCII bytes replaced");
        reading == path || !Path::new("/").join(reading).is_dir()
    })
}

/// Where the state directories are, one per pin directory.
pub const ROOT: &str = "/run/xdpgate";

/// Creates the state directory (and /run/xdpgate) private to root, and makes it so where
/// an older build left it open.
pub fn ensure_dir(pins: &PinDir) -> Result<PathBuf> {
    let dir = dir(pins);
    let generations = dir.join("generations");
    for d in [Path::new(ROOT), dir.as_path(), generations.as_path()] {
        match fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
        // An older build made these 0755.
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", d.display()))?;
    }
    Ok(dir)
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, whole: a
/// private temporary file, synced, renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        if let Some(parent) = path.parent() {
            File::open(parent).and_then(|d| d.sync_all()).ok();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        remove_stale_temporaries(path);
    }
    result
}

/// How old a writer's temporary file must be before another may take it for a killed
/// writer's: a live one keeps its for milliseconds (and its pid may be of another pid
/// namespace, where it looks dead).
const STALE_TEMPORARY: Duration = Duration::from_secs(60);

/// Removes the temporary files of [`write_atomic`] in `path`'s directory (one of the state
/// directory's, all xdpgate's own) that writers killed between creating and renaming them
/// left, of whatever file (a generation's record is never written again): of no live
/// process, and old.
fn remove_stale_temporaries(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((_, pid)) = name.to_str().and_then(|n| n.rsplit_once(".tmp")) else { continue };
        let Ok(pid) = pid.parse::<libc::pid_t>() else { continue };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMPORARY));
        // Signal 0: whether a process of that pid exists.
        let dead = pid > 0 && unsafe { libc::kill(pid, 0) } == -1 && Errno::last() == Errno::ESRCH;
        if old && dead {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A JSON file `name` of the state directory, or `T::default()` when there is none.
pub fn read_json<T: serde::de::DeserializeOwned + Default>(pins: &PinDir, name: &str) -> Result<T> {
    let path = dir(pins).join(name);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `value` as the JSON file `name` of the state directory, whole (root's, private).
pub fn write_json<T: serde::Serialize>(pins: &PinDir, name: &str, value: &T) -> Result<()> {
    let path = ensure_dir(pins)?.join(name);
    write_atomic(&path, &serde_json::to_vec_pretty(value)?, 0o600)
        .with_context(|| format!("saving {}", path.display()))
}

/// `flock` on an open file, waiting up to `wait` (polling: flock has no timeout of its own).
/// `None` when another holder kept it that long.
fn flock(mut file: File, arg: FlockArg, wait: Duration) -> std::io::Result<Option<Flock<File>>> {
    let start = Instant::now();
    loop {
        match Flock::lock(file, arg) {
            Ok(locked) => return Ok(Some(locked)),
            Err((back, Errno::EWOULDBLOCK)) if start.elapsed() < wait => file = back,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The exclusive right to change the dataplane at one pin directory; released on drop
/// (and by the kernel when the holder dies, so a killed writer never wedges the next one).
pub struct WriteLock(#[expect(dead_code, reason = "held for its lock")] Flock<File>);

impl WriteLock {
    pub fn acquire(pins: &PinDir) -> Result<Self> {
        Self::acquire_within(pins, LOCK_WAIT)
    }

    /// The lock if no other writer holds it now (`None` if one does), without waiting.
    pub fn try_acquire(pins: &PinDir) -> Result<Option<Self>> {
        Self::try_acquire_within(pins, Duration::ZERO)
    }

    /// The lock once no other writer holds it, waiting at most `wait` (`None` if one still
    /// does).
    pub fn try_acquire_within(pins: &PinDir, wait: Duration) -> Result<Option<Self>> {
        Ok(lock_dir(pins, FlockArg::LockExclusiveNonblock, wait)?.map(Self))
    }

    pub fn acquire_within(pins: &PinDir, wait: Duration) -> Result<Self> {
        Self::try_acquire_within(pins, wait)?.ok_or_else(|| Self::busy(pins, wait))
    }

    /// The error of a writer that waited `wait` for the lock in vain.
    pub fn busy(pins: &PinDir, wait: Duration) -> anyhow::Error {
        anyhow::anyhow!(
            "another xdpgate is changing the dataplane at {} and did not finish within {} s; \
             nothing was changed, try again",
            pins.path().display(),
            wait.as_secs()
        )
    }
}

/// How long a reader that must not see a writer's change half done waits for the writer.
pub const READ_WAIT: Duration = Duration::from_secs(10);

/// Shared by readers, exclusive of the [`WriteLock`]: a reader of many map entries that
/// must see one writer's change whole or not at all (`xdpgate lb --maglev`); released on
/// drop. Writers wait for it as for another writer.
pub struct ReadLock(#[expect(dead_code, reason = "held for its lock")] Flock<File>);

impl ReadLock {
    /// The lock once no writer holds it, waiting at most [`READ_WAIT`].
    pub fn acquire(pins: &PinDir) -> Result<Self> {
        match lock_dir(pins, FlockArg::LockSharedNonblock, READ_WAIT)? {
            Some(locked) => Ok(Self(locked)),
            None => bail!(
                "another xdpgate is changing the dataplane at {} and did not finish within {} s; \
                 try again",
                pins.path().display(),
                READ_WAIT.as_secs()
            ),
        }
    }
}

/// The pin directory locked as `arg` says, waiting at most `wait` (`None`: still held).
fn lock_dir(pins: &PinDir, arg: FlockArg, wait: Duration) -> Result<Option<Flock<File>>> {
    let dir = pins.path();
    let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    flock(file, arg, wait).with_context(|| format!("locking {}", dir.display()))
}

/// How long a starting agent waits for the agent lock (see [`AgentLock::acquire`]).
const AGENT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Held by `xdpgate run` while it owns the dataplane at one pin directory.
pub struct AgentLock(Flock<File>);

fn agent_lock_path(pins: &PinDir) -> PathBuf {
    dir(pins).join(AGENT_LOCK)
}

const AGENT_LOCK: &str = "agent.lock";

impl AgentLock {
    /// Takes ownership of the dataplane for this process, or says which agent has it. Waits
    /// a moment: a command asking whether an agent runs ([`agent_pid`]) holds the lock
    /// shared for an instant, and must not keep an agent from starting.
    pub fn acquire(pins: &PinDir) -> Result<Self> {
        match pid_lock(pins, &agent_lock_path(pins), AGENT_LOCK_WAIT)? {
            Ok(locked) => Ok(Self(locked)),
            Err(pid) => {
                bail!(
                    "an agent (pid {pid}) already runs the dataplane at {}",
                    pins.path().display()
                )
            }
        }
    }

    /// Whether the lock still guards the dataplane: its file is the one at its path. With
    /// the state directory removed (`rm -rf /run/xdpgate`, a cleaner of `/run`), it holds a
    /// file no one finds, and an `apply` or a second agent would go on beside its holder.
    pub fn held(&self, pins: &PinDir) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (fs::metadata(agent_lock_path(pins)), self.0.metadata()) {
            (Ok(path), Ok(ours)) => (path.dev(), path.ino()) == (ours.dev(), ours.ino()),
            _ => false,
        }
    }
}

/// The commands that each hold one part of a dataplane's kernel state for as long as they
/// run, one at a time: `observe` reads the observers' ring (a second reader would take the
/// first one's events), `capture` the one kernel filter, `trace` the per-CPU record its test
/// run fills (another trace would clear it before it is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Observe,
    Capture,
    Trace,
}

impl Tool {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Observe => "observe",
            Tool::Capture => "capture",
            Tool::Trace => "trace",
        }
    }

    /// Why only one runs at a time.
    fn why(self) -> &'static str {
        match self {
            Tool::Observe => "one observer at a time (each would take the other's events)",
            Tool::Capture => "one capture at a time (the dataplane has one capture filter)",
            Tool::Trace => "one trace at a time (each would clear the other's record)",
        }
    }
}

/// Held by a `Tool` while it runs; released on drop or when its holder dies, so only the
/// holder writes that tool's lease or record.
pub struct ToolLock(#[expect(dead_code, reason = "held for its lock")] Flock<File>);

impl ToolLock {
    /// Takes the lock, waiting up to `wait` for another holder to finish; or says which
    /// process holds it.
    pub fn acquire(pins: &PinDir, tool: Tool, wait: Duration) -> Result<Self> {
        let path = dir(pins).join(format!("{}.lock", tool.name()));
        match pid_lock(pins, &path, wait)? {
            Ok(locked) => Ok(Self(locked)),
            Err(pid) => bail!(
                "another xdpgate {} (pid {pid}) is running on the dataplane at {}; {}: stop it \
                 first",
                tool.name(),
                pins.path().display(),
                tool.why()
            ),
        }
    }
}

/// Locks the file at `path` for this process and writes its pid there; or the pid of the
/// process that holds it. The kernel releases it when the holder dies.
pub fn pid_lock(pins: &PinDir, path: &Path, wait: Duration) -> Result<Result<Flock<File>, String>> {
    ensure_dir(pins)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let Some(mut locked) = flock(file, FlockArg::LockExclusiveNonblock, wait)? else {
        return Ok(Err(fs::read_to_string(path).unwrap_or_default().trim().to_string()));
    };
    (|| -> std::io::Result<()> {
        locked.set_len(0)?;
        write!(locked, "{}", std::process::id())
    })()
    .with_context(|| format!("writing this process's pid to {}", path.display()))?;
    Ok(Ok(locked))
}

/// The pid of the agent that owns the dataplane at `pins`, if one runs.
pub fn agent_pid(pins: &PinDir) -> Option<u32> {
    agent_pid_in(&dir(pins))
}

/// The pid of the agent whose state directory is `dir`, if one runs.
pub fn agent_pid_in(dir: &Path) -> Option<u32> {
    let path = dir.join(AGENT_LOCK);
    let file = File::open(&path).ok()?;
    match flock(file, FlockArg::LockSharedNonblock, Duration::ZERO) {
        Ok(None) => Some(fs::read_to_string(&path).ok()?.trim().parse().unwrap_or(0)),
        _ => None,
    }
}

fn record_path(pins: &PinDir, generation: u64) -> PathBuf {
    dir(pins).join("generations").join(format!("{generation}.json"))
}

/// Saves the record of a generation about to be switched on, and forgets old ones.
pub fn save(pins: &PinDir, record: &Record) -> Result<()> {
    ensure_dir(pins)?;
    let path = record_path(pins, record.generation);
    write_atomic(&path, &serde_json::to_vec(record)?, 0o600)
        .context("saving the record of the applied policy")?;
    let oldest = record.generation.saturating_sub(KEEP_GENERATIONS);
    if let Ok(entries) = fs::read_dir(path.parent().expect("in a directory")) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let generation =
                name.to_str().and_then(|n| n.strip_suffix(".json")?.parse::<u64>().ok());
            // Newer ones are leftovers of writers killed before their flip: the next
            // apply of that number overwrites them.
            if generation.is_some_and(|g| g <= oldest) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The record of `generation`, if it is still kept.
pub fn record(pins: &PinDir, generation: u64) -> Result<Option<Record>> {
    let path = record_path(pins, generation);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let record: Record =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(record))
}

/// The records of the kept generations up to `newest`, newest first.
pub fn recent(pins: &PinDir, newest: u64) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for g in (newest.saturating_sub(KEEP_GENERATIONS - 1)..=newest).rev() {
        if let Some(r) = record(pins, g)? {
            out.push(r);
        }
    }
    Ok(out)
}

/// Where the record of `generation` lives (its modification time is when it was applied).
pub fn path_of(pins: &PinDir, generation: u64) -> PathBuf {
    record_path(pins, generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file a killed writer left in a state directory is removed by the next
    /// write there once it is old, whatever file it was for; a fresh one, or one of a live
    /// process, stays (seen failing: the killed writer's stayed for good).
    #[test]
    fn a_killed_writers_temporary_file_goes_with_the_next_write() {
        let dir = std::env::temp_dir().join(format!("xgtmp{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // A pid no process has: a child's, reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let aged = std::time::SystemTime::now() - STALE_TEMPORARY - Duration::from_secs(5);
        let stale = dir.join(format!("sets.tmp{dead}"));
        let fresh = dir.join(format!("sets.tmp{}", dead + 1_000_000));
        let live = dir.join("sets.tmp1");
        let other = dir.join(format!("agent.tmp{dead}"));
        for (file, when) in
            [(&stale, Some(aged)), (&fresh, None), (&live, Some(aged)), (&other, Some(aged))]
        {
            let f = File::create(file).unwrap();
            if let Some(t) = when {
                f.set_modified(t).unwrap();
            }
        }
        write_atomic(&dir.join("sets.json"), b"{}", 0o600).unwrap();
        let left: Vec<bool> = [&stale, &fresh, &live, &other].iter().map(|f| f.exists()).collect();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, [false, true, true, false], "stale, fresh, live, another file's");
    }

    /// Pin directories whose paths differ only in `/` against `_` have state directories of
    /// their own (seen failing: both were `/run/xdpgate/sys_fs_bpf_x_a_b`, and one's `set add`
    /// recompiled the other's policy); one of the earlier name is taken over.
    #[test]
    fn every_pin_directory_has_a_state_directory_of_its_own() {
        let tag = format!("xgstate{}", std::process::id());
        let pins = |p: &str| PinDir::new(format!("/sys/fs/bpf/{tag}/{p}"));
        let names = ["a_b", "a/b", "a%5Fb", "a/_b", "a_/b", "a__b"];
        let dirs: Vec<PathBuf> = names.iter().map(|p| dir(&pins(p))).collect();
        for (i, d) in dirs.iter().enumerate() {
            for (j, e) in dirs.iter().enumerate().skip(i + 1) {
                assert_ne!(d, e, "{} and {}", names[i], names[j]);
            }
        }
        assert_eq!(
            dir(&PinDir::new("/sys/fs/bpf/xdpgate")),
            Path::new(ROOT).join("sys_fs_bpf_xdpgate"),
            "a path without `_` or `%` keeps its name"
        );
        // Made by an earlier build for `.../keep_me`: not taken while `.../keep/me` is
        // there too, which could have had that name; else used as it is while an earlier
        // agent holds it (no lock taken from it), and moved to the new name once none does,
        // its records kept.
        fs::create_dir_all(ROOT).unwrap();
        let earlier = Path::new(ROOT).join(format!("sys_fs_bpf_{tag}_keep_me"));
        fs::create_dir_all(&earlier).unwrap();
        fs::write(earlier.join("record"), "kept").unwrap();
        let bpffs = Path::new("/sys/fs/bpf").join(&tag);
        fs::create_dir_all(bpffs.join("keep/me")).unwrap();
        fs::create_dir_all(bpffs.join("keep_me")).unwrap();
        let new = Path::new(ROOT).join(format!("sys_fs_bpf_{tag}_keep%5Fme"));
        assert_eq!(dir(&pins("keep_me")), new);
        assert!(earlier.exists() && !new.exists(), "taken from .../keep/me");
        fs::remove_dir_all(bpffs.join("keep")).unwrap();
        fs::write(earlier.join(AGENT_LOCK), "4242").unwrap();
        let lock = File::open(earlier.join(AGENT_LOCK)).unwrap();
        let held = flock(lock, FlockArg::LockExclusiveNonblock, Duration::ZERO).unwrap();
        assert_eq!(dir(&pins("keep_me")), earlier, "an earlier agent's, while it runs");
        assert!(earlier.exists() && !new.exists());
        drop(held);
        assert_eq!(dir(&pins("keep_me")), new);
        assert_eq!(fs::read_to_string(new.join("record")).unwrap(), "kept");
        assert!(!earlier.exists());
        fs::remove_dir_all(new).unwrap();
        // A path with `%` and no `_` has one reading: its own (seen failing: never moved).
        let earlier = Path::new(ROOT).join(format!("sys_fs_bpf_{tag}_p%q"));
        fs::create_dir_all(&earlier).unwrap();
        fs::create_dir_all(bpffs.join("p%q")).unwrap();
        let new = dir(&pins("p%q"));
        assert_eq!(new, Path::new(ROOT).join(format!("sys_fs_bpf_{tag}_p%25q")));
        assert!(new.exists() && !earlier.exists());
        fs::remove_dir_all(new).unwrap();
        fs::remove_dir_all(bpffs).unwrap();
    }

    /// A command asking whether an agent runs, at the instant one starts, does not stop it
    /// (seen failing: "an agent (pid ) already runs"); a running agent still does.
    #[test]
    fn an_agent_starts_beside_a_command_asking_for_it() {
        let pins = PinDir::new(format!("/tmp/xgtest-agent-lock-{}", std::process::id()));
        ensure_dir(&pins).unwrap();
        let file = File::create(agent_lock_path(&pins)).unwrap();
        let asking = flock(file, FlockArg::LockSharedNonblock, Duration::ZERO).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(asking);
        });
        let agent = AgentLock::acquire(&pins);
        release.join().unwrap();
        let agent = agent.expect("the agent starts");
        assert_eq!(agent_pid(&pins), Some(std::process::id()));
        let second = AgentLock::acquire(&pins).err().expect("a second agent is refused");
        assert!(second.to_string().contains("already runs"), "{second:#}");
        drop(agent);
        fs::remove_dir_all(dir(&pins)).unwrap();
    }
}
