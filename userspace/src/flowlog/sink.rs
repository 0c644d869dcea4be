//! Where flow-log lines go: stdout, or a file rotated at a size. Lines are written in
//! batches ([`Lines`]: a walk's or a ring drain's lines in a few large writes, not one write
//! each), and a failed write is followed by one reopen per batch, not per line: on a full
//! disk a walk of a million flows would otherwise reopen the file a million times. The
//! flow log's thread ([`super::Writer`]) does all of it.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::Value;

/// Bytes of lines gathered for one write (it ends at the line that reaches this): few system
/// calls, and a failure costs little.
const CHUNK: usize = 1 << 20;

/// Lines as the log holds them (compact JSON and a line break each), in one buffer: a walk's
/// lines are made on its thread and freed on the flow log's as one allocation, not one per
/// line (freeing a million small strings took a second).
#[derive(Debug, Default)]
pub struct Lines {
    bytes: Vec<u8>,
    /// Where each line ends in `bytes`.
    ends: Vec<usize>,
}

impl Lines {
    pub fn push(&mut self, line: &Value) {
        serde_json::to_writer(&mut self.bytes, line).expect("a JSON value serializes");
        self.bytes.push(b'\n');
        self.ends.push(self.bytes.len());
    }

    /// Adds `other`'s lines after these.
    pub fn append(&mut self, other: Lines) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(other.ends.iter().map(|end| at + end));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The buffer's size.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Each line: where it starts and ends in the buffer.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied())
    }
}

/// Where log lines go: stdout, or a file rotated to `FILE.1` when it reaches `max_bytes`.
pub enum Sink {
    Stdout,
    File(FileSink),
}

pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    /// Rotated files kept (FILE.1 ..= FILE.keep).
    keep: u32,
    file: File,
    written: u64,
    /// The file ends in part of a line that could not be cut off: the next line starts on
    /// a new one.
    mid_line: bool,
    /// Bytes past which the next line rotates the file: `max_bytes`, or after a rotation
    /// that failed, `max_bytes` more than the file then held.
    rotate_at: u64,
    /// A regular file, rotated and cut. Not a FIFO a log shipper reads, nor a device
    /// (`/dev/stdout`): renaming or removing the path would break it for everyone.
    regular: bool,
    /// Why the last rotation failed, while the file is past its limit for it: a state, not
    /// the error of one batch (the lines after it are written, and are no sign it works).
    rotation: Option<String>,
}

/// Cuts a partial last line (left by a write that failed half-way) off the file, so every
/// line stays whole JSON. Returns the length, and whether the file still ends mid-line (it
/// could not be cut): then the next line starts with a line break.
fn cut_partial_line(file: &File, len: u64) -> (u64, bool) {
    let take = len.min(64 << 10);
    let mut tail = vec![0u8; take as usize];
    if take == 0 || file.read_exact_at(&mut tail, len - take).is_err() {
        return (len, false);
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) if i + 1 == tail.len() => return (len, false),
        Some(i) => len - take + i as u64 + 1,
        None if take == len => 0,
        // No line end in the last 64 KiB: not a flow log to cut.
        None => return (len, true),
    };
    match file.set_len(keep) {
        // Quiet: after every failed write of a full disk; `Sink::open` tells of one found.
        Ok(()) => (keep, false),
        Err(_) => (len, true),
    }
}

/// Opens the flow log at `path` for appending (created mode 0640), in a directory only root
/// or the agent's user can change. The agent runs as root and appends to, cuts and rotates
/// what it finds at the path: in a directory another user can write, a symlink or hard
/// link planted there would make it write to any file, and a FIFO would hand that user the
/// log. The rule is logrotate's: the directory owned by root or the agent's user, not
/// writable by others, nor by its group unless that is root's. What is in such a directory
/// was put there by root and is taken as it is (a symlink such as `/dev/stdout`, a file of
/// a log shipper's user). The file is opened through the directory's resolved path, as
/// checked.
fn open_own(path: &Path) -> Result<File> {
    let shown = path.display();
    let name = path.file_name().with_context(|| format!("flow log {shown}: no file name"))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = fs::canonicalize(parent)
        .with_context(|| format!("flow log {shown}: its directory {}", parent.display()))?;
    let meta = fs::metadata(&dir).with_context(|| format!("flow log {shown}"))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let others = if meta.uid() != 0 && meta.uid() != me {
        Some(format!("owned by uid {}", meta.uid()))
    } else if mode & 0o002 != 0 {
        Some(format!("writable by every user (mode {mode:o})"))
    } else if mode & 0o020 != 0 && meta.gid() != 0 {
        Some(format!("writable by group {} (mode {mode:o})", meta.gid()))
    } else {
        None
    };
    if let Some(others) = others {
        anyhow::bail!(
            "flow log {shown}: its directory {} is {others}: another user could put a link or \
             a file there for the agent (uid {me}) to write to; name a file in a directory \
             only root can change, such as /var/log/xdpgate",
            dir.display()
        );
    }
    OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o640)
        .open(dir.join(name))
        .with_context(|| format!("opening flow log {shown}"))
}

impl FileSink {
    /// Opens `path` for appending, created mode 0640 (flow logs name every peer: not for
    /// every local user); and the bytes of a partial last line it cut off.
    fn open(path: PathBuf, max_bytes: u64, keep: u32) -> Result<(Self, u64)> {
        let file = open_own(&path)?;
        let meta = file.metadata().with_context(|| format!("flow log {}", path.display()))?;
        let regular = meta.is_file();
        let len = if regular { meta.len() } else { 0 };
        let (written, mid_line) = if regular { cut_partial_line(&file, len) } else { (0, false) };
        let rotate_at = max_bytes;
        let sink = Self {
            path,
            max_bytes,
            keep,
            file,
            written,
            mid_line,
            rotate_at,
            regular,
            rotation: None,
        };
        Ok((sink, len - written))
    }

    fn reopen(&mut self) -> Result<()> {
        let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
        let (was, rotate_at, rotation) = (id(&self.file), self.rotate_at, self.rotation.clone());
        (*self, _) = Self::open(self.path.clone(), self.max_bytes, self.keep)?;
        // The same file again (after a failed write, a SIGHUP), not cut since (copytruncate):
        // a rotation that failed is still not tried before its time, and still past its
        // limit.
        let tried_at = rotate_at.saturating_sub(self.max_bytes);
        if was.is_some() && id(&self.file) == was && self.written >= tried_at {
            (self.rotate_at, self.rotation) = (rotate_at, rotation);
        }
        Ok(())
    }

    /// `FILE.n` (FILE itself for 0).
    fn numbered(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        if n > 0 {
            p.push(format!(".{n}"));
        }
        PathBuf::from(p)
    }

    /// Shifts FILE.1 .. FILE.keep-1 up by one (the oldest, FILE.keep, is replaced), moves
    /// FILE to FILE.1 (with `keep` 0: deletes it), and starts a new FILE.
    fn rotate(&mut self) -> Result<()> {
        let moved = if self.keep == 0 {
            fs::remove_file(&self.path).with_context(|| {
                format!("removing the full flow log {} (--flow-log-keep 0)", self.path.display())
            })
        } else {
            for n in (1..self.keep).rev() {
                match fs::rename(self.numbered(n), self.numbered(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| {
                            format!("rotating flow log {}", self.numbered(n).display())
                        });
                    }
                    _ => {}
                }
            }
            fs::rename(&self.path, self.numbered(1)).with_context(|| {
                format!(
                    "rotating flow log {} to {}",
                    self.path.display(),
                    Path::new(&self.numbered(1)).display()
                )
            })
        };
        match moved {
            Ok(()) => {}
            // Removed under us: nothing to rotate, start a new file.
            Err(e)
                if e.downcast_ref::<io::Error>().map(io::Error::kind)
                    == Some(io::ErrorKind::NotFound) =>
            {
                log::warn!(
                    "flow log {} was removed; writing to a new file there",
                    self.path.display()
                );
            }
            Err(e) => return Err(e),
        }
        self.reopen()
    }

    fn write_lines(&mut self, lines: &Lines) -> Result<()> {
        // Lines from `start` on are not written yet.
        let mut start = 0;
        for (from, to) in lines.spans() {
            let pending = self.written + (from - start) as u64;
            if self.regular && pending > 0 && pending + (to - from) as u64 > self.rotate_at {
                self.flush(&lines.bytes[start..from])?;
                start = from;
                // A rotation that failed (a rename refused): the lines go on into the file
                // past the limit, which `rotation` tells of until one succeeds.
                if let Err(e) = self.rotate() {
                    // Not again for every line: each try shifts the older files once more.
                    self.rotate_at = self.written.saturating_add(self.max_bytes);
                    let e = e.context("the flow log grows past its limit until it rotates");
                    self.rotation = Some(format!("{e:#}"));
                }
            }
            if to - start >= CHUNK {
                self.flush(&lines.bytes[start..to])?;
                start = to;
            }
        }
        self.flush(&lines.bytes[start..])
    }

    /// Writes `chunk` (whole lines). After a failed write (or one before it, which left the
    /// file mid-line), writes once more what did not land, to the file at the path.
    fn flush(&mut self, chunk: &[u8]) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        if !self.mid_line && self.file.write_all(chunk).is_ok() {
            self.written += chunk.len() as u64;
            return Ok(());
        }
        // Until a reopen tells otherwise, the file may end in part of a line.
        self.mid_line = true;
        let landed = landed(&self.file, chunk, self.written);
        self.reopen()?;
        self.append(&chunk[landed..])
            .with_context(|| format!("writing flow log {}", self.path.display()))
    }

    fn append(&mut self, text: &[u8]) -> io::Result<()> {
        let result = (if self.mid_line { self.file.write_all(b"\n") } else { Ok(()) })
            .and_then(|()| self.file.write_all(text));
        // What part got written is unknown: ask the file.
        self.mid_line = true;
        self.reopen().map_err(io::Error::other)?;
        result
    }
}

/// How much of `chunk`, written at offset `before` of `file`, a failed write left there: the
/// whole lines of it the file holds once its partial last line is cut off. The file asked is
/// the one written to, wherever it was moved since. 0 when the file holds anything else
/// there (another writer): then the whole chunk is written again, and a line may be in the
/// log twice; none is lost or cut.
fn landed(file: &File, chunk: &[u8], before: u64) -> usize {
    let len = file.metadata().map_or(before, |m| m.len());
    let (after, mid_line) = cut_partial_line(file, len);
    let n = match after.checked_sub(before).and_then(|n| usize::try_from(n).ok()) {
        Some(n) if !mid_line && n <= chunk.len() => n,
        _ => return 0,
    };
    let mut there = vec![0u8; n];
    if file.read_exact_at(&mut there, before).is_ok() && there == chunk[..n] { n } else { 0 }
}

impl Sink {
    /// `-` for stdout, else a file appended to, rotated at `max_bytes` with `keep` old
    /// files kept.
    pub fn open(target: &str, max_bytes: u64, keep: u32) -> Result<Self> {
        if target == "-" {
            return Ok(Sink::Stdout);
        }
        let (f, cut) = FileSink::open(PathBuf::from(target), max_bytes, keep)?;
        if cut > 0 {
            log::warn!("flow log: cut a partial last line of {cut} bytes");
        }
        Ok(Sink::File(f))
    }

    /// Opens the file at the path anew (logrotate style: after the old one was moved away,
    /// lines go to a new file at the same path).
    pub fn reopen(&mut self) -> Result<()> {
        if let Sink::File(f) = self {
            f.reopen()?;
        }
        Ok(())
    }

    /// Reopens the file if the path no longer names the file being written (removed or
    /// moved away); returns its path if it did.
    pub fn follow(&mut self) -> Result<Option<PathBuf>> {
        let Sink::File(f) = self else { return Ok(None) };
        let same = match (fs::metadata(&f.path), f.file.metadata()) {
            (Ok(p), Ok(o)) => (p.dev(), p.ino()) == (o.dev(), o.ino()),
            _ => false,
        };
        if same {
            return Ok(None);
        }
        f.reopen()?;
        Ok(Some(f.path.clone()))
    }

    /// Writes `lines` in order, in as few writes as rotation allows. A file whose write
    /// fails is reopened (a partial last line cut off) and what did not land written once
    /// more; if that fails too, it and the rest of the batch are lost, and the error is
    /// returned. A rotation that fails loses no line: [`Sink::rotation`] tells of it.
    pub fn write_lines(&mut self, lines: &Lines) -> Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&lines.bytes)
                    .and_then(|()| out.flush())
                    .context("writing flow log to stdout")
            }
            Sink::File(f) => f.write_lines(lines),
        }
    }

    /// Why the file is past its size limit: its last rotation failed (none since).
    pub fn rotation(&self) -> Option<&str> {
        match self {
            Sink::Stdout => None,
            Sink::File(f) => f.rotation.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A flow log in a directory another user can write, where that user could plant a
    /// symlink or a hard link to a file of root's (or a FIFO to read the log from), is
    /// refused, and the file behind the link left as it was (seen failing: the symlinked
    /// file lost its last, unterminated line, and would have taken flow records). In a
    /// directory only root can change, a link root made is followed, and a file of another
    /// user's is written. Needs root (it gives files away).
    #[test]
    fn a_flow_log_where_another_user_could_plant_it_is_refused() {
        use std::os::unix::fs::{chown, lchown, symlink};
        assert_eq!(unsafe { libc::geteuid() }, 0, "run as root: the test gives files away");
        let top = std::env::temp_dir().join(format!("xgplant{}", std::process::id()));
        let _ = fs::remove_dir_all(&top);
        let dir = top.join("logs");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
        let victim = top.join("victim");
        let content = "root-only line\nsetting=1";
        fs::write(&victim, content).unwrap();
        let nobody = 65534;
        let log = dir.join("flows.jsonl");
        let open = || Sink::open(log.to_str().unwrap(), 1 << 20, 1);
        symlink(&victim, &log).unwrap();
        lchown(&log, Some(nobody), None).unwrap();
        for (owner, mode, why) in [
            (nobody, 0o755, "owned by uid 65534"),
            (0, 0o777, "writable by every user (mode 777)"),
            (0, 0o1777, "writable by every user (mode 1777)"),
        ] {
            chown(&dir, Some(owner), None).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            let err = open().err().unwrap_or_else(|| panic!("{why}: opened")).to_string();
            assert!(err.contains(why), "{why}: {err}");
            assert_eq!(fs::read_to_string(&victim).unwrap(), content, "{why}: {err}");
        }
        // Root's directory: what is in it is root's doing, a link followed, a file of another
        // user's written to.
        chown(&dir, Some(0), None).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(open(), Ok(Sink::File(_))), "a link in root's directory");
        fs::remove_file(&log).unwrap();
        fs::write(&log, "{}\n").unwrap();
        chown(&log, Some(nobody), None).unwrap();
        let Ok(mut sink) = open() else { panic!("a shipper's file in root's directory") };
        let mut lines = Lines::default();
        lines.push(&json!({"a": 1}));
        sink.write_lines(&lines).unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "{}\n{\"a\":1}\n");
        let _ = fs::remove_dir_all(&top);
    }

    #[test]
    fn a_partial_last_line_is_cut_off() {
        let dir = std::env::temp_dir().join(format!("xgflowlog{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (before, after, mid_line) in [
            ("", "", false),
            ("{\"a\":1}\n", "{\"a\":1}\n", false),
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n", false),
            ("{\"b\":", "", false),
        ] {
            let path = dir.join("f.jsonl");
            fs::write(&path, before).unwrap();
            let (f, cut) = FileSink::open(path.clone(), 1 << 20, 1).unwrap();
            assert_eq!(fs::read_to_string(&path).unwrap(), after, "{before:?}");
            assert_eq!((f.written, f.mid_line), (after.len() as u64, mid_line));
            assert_eq!(cut as usize, before.len() - after.len());
        }
        // A long line with no line end in the last 64 KiB is not ours to cut.
        let path = dir.join("g.jsonl");
        fs::write(&path, format!("x\n{}", "y".repeat(70_000))).unwrap();
        let (f, cut) = FileSink::open(path.clone(), 1 << 20, 1).unwrap();
        assert_eq!((f.written, f.mid_line, cut), (70_002, true, 0));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Each line 32 bytes, files rotated past 100 bytes (three lines each): after 20 lines,
    /// written one by one or in batches, FILE and FILE.1 ..= FILE.keep hold the newest lines
    /// in order, and nothing older is kept; with keep 0 only FILE.
    #[test]
    fn rotation_keeps_n_files() {
        for (keep, batch) in [0u32, 1, 3].into_iter().flat_map(|k| [1, 7, 20].map(|b| (k, b))) {
            let dir =
                std::env::temp_dir().join(format!("xgrotate{}-{keep}-{batch}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("flows.jsonl");
            let mut sink = Sink::open(path.to_str().unwrap(), 100, keep).unwrap();
            let line = |i: u32| json!({"line": format!("{i:020}")});
            for first in (0..20).step_by(batch) {
                let mut lines = Lines::default();
                (first..20.min(first + batch as u32)).for_each(|i| lines.push(&line(i)));
                sink.write_lines(&lines).unwrap();
            }
            let mut names: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let want: Vec<String> = std::iter::once("flows.jsonl".to_string())
                .chain((1..=keep).map(|n| format!("flows.jsonl.{n}")))
                .collect();
            assert_eq!(names, want, "keep {keep}, batches of {batch}");
            // Oldest first: FILE.keep .. FILE.1, then FILE.
            let text: String = (1..=keep)
                .rev()
                .map(|n| dir.join(format!("flows.jsonl.{n}")))
                .chain(std::iter::once(path.clone()))
                .map(|p| fs::read_to_string(p).unwrap())
                .collect();
            let lines: Vec<u32> = text
                .lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["line"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap()
                })
                .collect();
            let kept = 3 * keep as usize + 2;
            assert_eq!(
                lines,
                (20 - kept as u32..20).collect::<Vec<_>>(),
                "keep {keep}, batches of {batch}"
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }

    /// A rotation that fails (FILE.1 a directory here) loses no line: the file grows past
    /// the limit, which the sink tells of until a rotation succeeds, and rotation is tried
    /// again only after another `max_bytes` (seen failing: every line from the fourth on
    /// was dropped). Cut to nothing where it is (copytruncate), the file is within its
    /// limit again.
    #[test]
    fn a_failed_rotation_loses_no_line() {
        let dir = std::env::temp_dir().join(format!("xgrotfail{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("flows.jsonl.1")).unwrap();
        fs::write(dir.join("flows.jsonl.1").join("x"), "keep").unwrap();
        let path = dir.join("flows.jsonl");
        let mut sink = Sink::open(path.to_str().unwrap(), 100, 1).unwrap();
        // One 32-byte line, as a batch of its own.
        let write = |sink: &mut Sink, i: u32| {
            let mut lines = Lines::default();
            lines.push(&json!({"line": format!("{i:020}")}));
            sink.write_lines(&lines).unwrap();
        };
        let rotate_at = |sink: &Sink| match sink {
            Sink::File(f) => f.rotate_at,
            Sink::Stdout => unreachable!(),
        };
        let mut tries = Vec::new();
        let mut over = Vec::new();
        for i in 0..9 {
            let before = rotate_at(&sink);
            write(&mut sink, i);
            // Each try that fails moves the limit on.
            if rotate_at(&sink) != before {
                tries.push(i);
            }
            over.push(sink.rotation().is_some());
            // As a SIGHUP, or a failed write, reopens the same file.
            sink.reopen().unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 9, "every line is in the file: {text}");
        // 32-byte lines: tried at the fourth (past 100 bytes) and at the seventh (100 more),
        // not at each line after the fourth.
        assert_eq!(tries, [3, 6]);
        // Past its limit from the fourth line on, and said so at every batch after it, not
        // only at those that tried (seen failing: each later batch returned Ok, and the
        // agent logged "working again" with the file still growing).
        assert_eq!(over, [false, false, false, true, true, true, true, true, true]);
        let message = sink.rotation().unwrap().to_owned();
        assert!(message.contains("grows past its limit"), "{message}");
        // A reopen that fails (the directory moved away) keeps the file, and the state.
        let away = dir.with_extension("away");
        fs::rename(&dir, &away).unwrap();
        assert!(sink.reopen().is_err());
        fs::rename(&away, &dir).unwrap();
        assert_eq!(sink.rotation(), Some(message.as_str()), "after a failed reopen");
        fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        sink.reopen().unwrap();
        assert_eq!(sink.rotation(), None, "cut in place");
        (0..9).for_each(|i| write(&mut sink, i));
        assert!(sink.rotation().is_some(), "past the limit again");
        // The obstacle gone, the next try rotates, and the state ends.
        fs::remove_dir_all(dir.join("flows.jsonl.1")).unwrap();
        (9..12).for_each(|i| write(&mut sink, i));
        assert!(dir.join("flows.jsonl.1").is_file(), "rotated");
        assert_eq!(sink.rotation(), None);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A FIFO (a log shipper's) is never rotated: the path stays the FIFO, no FILE.1 is
    /// made, and every line reaches the reader (seen failing: the FIFO was renamed to
    /// FILE.1 and a regular file made in its place, read by no one).
    #[test]
    fn a_fifo_is_not_rotated() {
        use std::os::unix::fs::FileTypeExt;
        let dir = std::env::temp_dir().join(format!("xgfifo{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("flows.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader =
            OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let mut sink = Sink::open(fifo.to_str().unwrap(), 100, 1).unwrap();
        let mut lines = Lines::default();
        (0..10).for_each(|i| lines.push(&json!({"line": format!("{i:020}")})));
        sink.write_lines(&lines).unwrap();
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still the FIFO");
        assert!(!dir.join("flows.fifo.1").exists(), "nothing rotated");
        let mut got = String::new();
        std::io::Read::read_to_string(&mut reader, &mut got)
            .or_else(|e| match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            })
            .unwrap();
        assert_eq!(got.lines().count(), 10, "{got}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// After a failed write, what landed is counted only when it is whole lines of the chunk
    /// in the file written to; a partial line is cut off; else the whole chunk is written
    /// again.
    #[test]
    fn what_a_failed_write_left() {
        let dir = std::env::temp_dir().join(format!("xglanded{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.jsonl");
        let chunk = b"{\"a\":1}\n{\"b\":2}\n";
        let prefix = "{\"p\":0}\n";
        for (file, want, left) in [
            // Nothing, the first line, both, the first and part of the second.
            ("", 0, ""),
            ("{\"a\":1}\n", 8, "{\"a\":1}\n"),
            ("{\"a\":1}\n{\"b\":2}\n", 16, "{\"a\":1}\n{\"b\":2}\n"),
            ("{\"a\":1}\n{\"b", 8, "{\"a\":1}\n"),
            // Another writer's line of the same length (seen counted as ours before).
            ("{\"x\":1}\n", 0, "{\"x\":1}\n"),
        ] {
            fs::write(&path, format!("{prefix}{file}")).unwrap();
            let f = OpenOptions::new().read(true).append(true).open(&path).unwrap();
            assert_eq!(landed(&f, chunk, prefix.len() as u64), want, "{file:?}");
            assert_eq!(fs::read_to_string(&path).unwrap(), format!("{prefix}{left}"), "{file:?}");
        }
        // A file shorter than where the chunk went (not the one written).
        fs::write(&path, "").unwrap();
        let f = OpenOptions::new().read(true).append(true).open(&path).unwrap();
        assert_eq!(landed(&f, chunk, prefix.len() as u64), 0);
        let _ = fs::remove_dir_all(&dir);
    }
}
