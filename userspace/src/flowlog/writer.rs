//! The flow log's own thread: every write, reopen and check of the file happens there, so
//! that a slow disk, or one that stops answering (a dead NFS server, a pipe no one reads),
//! holds up only the flow log, never the agent's loop (reloads, failovers, NAT expiry,
//! signals). Lines wait in a queue of bounded size: a batch handed over while the queue is
//! at its limit is dropped, and that is reported at once.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};
use tokio::sync::mpsc;

use super::sink::{Lines, Sink};

/// Bytes of lines waiting for the thread past which a batch is dropped: the queue holds at
/// most this and one batch more (a walk's lines may be more than this alone).
const QUEUE_BYTES: usize = 64 << 20;

enum Job {
    Write(Lines),
    /// End the thread (other senders, a walk's [`Queue`], may still be about).
    Stop,
    /// Open the file at the path anew (SIGHUP).
    Reopen,
    /// Open the file at the path anew if it is no longer the one written.
    Follow,
}

/// What the thread did.
#[derive(Debug)]
pub enum Done {
    /// A batch written, or not.
    Wrote(Result<()>),
    /// The file at the path opened anew: at a reopen, or (with its path) because the one
    /// written was moved or removed.
    Path(Result<Option<PathBuf>>),
    /// The file went past its size limit as a rotation failed (`Err`), or rotated since
    /// (`Ok`): sent when that changes.
    Rotation(Result<()>),
}

pub struct Writer {
    queue: Queue,
    /// A check of the path is queued and not yet done: one is enough (they come every
    /// second, and would pile up behind a write that never ends).
    following: Arc<AtomicBool>,
    /// What the thread did, in the order it was asked (a dropped batch is reported at once
    /// instead, by [`Writer::write`]).
    pub done: mpsc::UnboundedReceiver<Done>,
}

impl Writer {
    pub fn spawn(sink: Sink) -> Self {
        Self::spawn_bounded(sink, QUEUE_BYTES)
    }

    fn spawn_bounded(mut sink: Sink, limit: usize) -> Self {
        let (jobs, todo) = std_mpsc::channel();
        let (tx, done) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let following = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicUsize::new(0));
        let (left, checking, done_one) = (queued.clone(), following.clone(), finished.clone());
        thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || {
                let mut rotation = None;
                for job in todo {
                    let done = match job {
                        Job::Write(lines) => {
                            let written = sink.write_lines(&lines);
                            left.fetch_sub(lines.bytes(), Ordering::SeqCst);
                            done_one.fetch_add(1, Ordering::SeqCst);
                            Done::Wrote(written)
                        }
                        Job::Stop => break,
                        Job::Reopen => Done::Path(sink.reopen().map(|()| None)),
                        Job::Follow => {
                            checking.store(false, Ordering::SeqCst);
                            Done::Path(sink.follow())
                        }
                    };
                    // With no one to tell, the jobs are still done.
                    let _ = tx.send(done);
                    if sink.rotation() != rotation.as_deref() {
                        rotation = sink.rotation().map(str::to_owned);
                        let _ = tx.send(Done::Rotation(
                            rotation.clone().map_or(Ok(()), |e| Err(anyhow!(e))),
                        ));
                    }
                }
            })
            .expect("starting the flow log's thread");
        Self { queue: Queue { jobs, queued, finished, limit }, following, done }
    }

    /// Queues `lines` to be written ([`Queue::write`]).
    pub fn write(&self, lines: Lines) -> Result<()> {
        self.queue.write(lines)
    }

    /// A handle to queue lines from another thread (a walk's).
    pub fn queue(&self) -> Queue {
        self.queue.clone()
    }

    /// Whether the queue is at its limit: a batch handed over now is dropped.
    pub fn behind(&self) -> bool {
        self.queue.queued.load(Ordering::SeqCst) >= self.queue.limit
    }

    /// Asks for the file at the path to be opened anew; the result comes as [`Done::Path`].
    pub fn reopen(&self) {
        let _ = self.queue.jobs.send(Job::Reopen);
    }

    /// Asks for the file at the path to be opened anew if it is no longer the one written;
    /// the result comes as [`Done::Path`].
    pub fn follow(&self) {
        if !self.following.swap(true, Ordering::SeqCst) {
            let _ = self.queue.jobs.send(Job::Follow);
        }
    }

    /// Waits (blocking) for the next thing the thread did.
    pub fn wait(&mut self) -> Option<Done> {
        self.done.blocking_recv()
    }

    /// Lets the thread write what is queued, for at most `limit`; returns the results, and
    /// the bytes left unwritten. Lines queued after this (by a walk under way) are dropped.
    pub async fn finish(mut self, limit: Duration) -> (Vec<Done>, usize) {
        let Self { queue, done: ref mut results, .. } = self;
        // The thread ends once it has done every job before this one.
        let _ = queue.jobs.send(Job::Stop);
        let mut done = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            while let Some(d) = results.recv().await {
                done.push(d);
            }
        })
        .await;
        // Read before what came in meanwhile: a batch the thread counted off as it timed out
        // has its result in the channel.
        let left = queue.queued.load(Ordering::SeqCst);
        while let Ok(d) = results.try_recv() {
            done.push(d);
        }
        (done, left)
    }
}

/// Where lines are queued for the flow log's thread, from any thread.
#[derive(Clone)]
pub struct Queue {
    jobs: std_mpsc::Sender<Job>,
    /// Bytes of the batches queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// Batches the thread has finished (written or not): its progress.
    finished: Arc<AtomicUsize>,
    limit: usize,
}

impl Queue {
    /// Waits until less than half the limit is queued (the other half is left to the
    /// agent's loop's own batches), for as long as the thread writes (finishes a batch at
    /// least once every `stall`) and `stop` is not set; whether there is room.
    pub fn wait_for_room(&self, stall: Duration, stop: &AtomicBool) -> bool {
        let mut finished = self.finished.load(Ordering::SeqCst);
        let mut since = Instant::now();
        while self.queued.load(Ordering::SeqCst) >= self.limit / 2 {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = self.finished.load(Ordering::SeqCst);
            if now != finished {
                (finished, since) = (now, Instant::now());
            } else if since.elapsed() >= stall {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Queues `lines` to be written; the result comes as [`Done::Wrote`]. `Err`: dropped, as
    /// the queue is at its limit (the thread is behind) or the thread is gone.
    pub fn write(&self, lines: Lines) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let bytes = lines.bytes();
        let before = self.queued.fetch_add(bytes, Ordering::SeqCst);
        let queued = if before >= self.limit {
            Err(anyhow!(
                "lines dropped: {} MiB of lines or more wait to be written (the disk is slow or \
                 not answering)",
                self.limit >> 20
            ))
        } else {
            self.jobs.send(Job::Write(lines)).map_err(|_| anyhow!("the flow log's thread is gone"))
        };
        if queued.is_err() {
            self.queued.fetch_sub(bytes, Ordering::SeqCst);
        }
        queued
    }
}

/// For tests: a writer to a FIFO `flows.fifo` in a fresh temporary directory (returned),
/// with a queue of `limit` bytes, and the pipe held open for reading and writing (so the
/// thread's open does not wait) and sized to `pipe_bytes`: the thread waits in a write once
/// that much is unread.
#[cfg(test)]
pub(super) fn fifo_writer(
    tag: &str,
    limit: usize,
    pipe_bytes: i32,
) -> (PathBuf, Writer, std::fs::File) {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join(format!("{tag}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("flows.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sink = Sink::open(fifo.to_str().unwrap(), 1 << 30, 1).unwrap();
    let writer = Writer::spawn_bounded(sink, limit);
    let pipe = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    // SAFETY: F_SETPIPE_SZ on an open pipe.
    assert!(unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, pipe_bytes) } >= pipe_bytes);
    (dir, writer, pipe)
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Read};

    use serde_json::json;

    use super::*;

    fn batch(lines: usize) -> Lines {
        let mut batch = Lines::default();
        (0..lines).for_each(|i| batch.push(&json!({"i": i, "pad": "x".repeat(990)})));
        batch
    }

    /// A pipe no one reads stops the thread in the first batch's write: later batches queue
    /// while less than the limit waits, and one after is dropped at once; the loop never
    /// waits.
    #[test]
    fn a_batch_past_the_queue_limit_is_dropped() {
        let (dir, writer, pipe) = fifo_writer("xgwriter", 100 << 10, 64 << 10);
        // 70 KB: more than the pipe holds, and the thread waits in its write; the queue
        // takes batches while it holds less than its limit.
        writer.write(batch(70)).unwrap();
        writer.write(batch(20)).unwrap();
        writer.write(batch(20)).unwrap();
        assert!(writer.behind());
        let dropped = writer.write(batch(20)).unwrap_err();
        assert!(format!("{dropped:#}").contains("lines dropped"), "{dropped:#}");
        // Read what the thread writes until it is done (it closes the pipe): the first three
        // batches, not the fourth.
        drop(writer);
        drop(pipe);
        let mut text = String::new();
        fs::File::open(dir.join("flows.fifo")).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text.lines().count(), 110);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A wait for room in the queue (less than half the limit) lasts while the thread
    /// writes, however long that takes, and gives up once it has finished no batch for the
    /// stall time, or at once when asked to stop.
    #[test]
    fn a_wait_for_room_lasts_while_the_thread_writes() {
        let (dir, writer, pipe) = fifo_writer("xgroom", 400 << 10, 64 << 10);
        let queue = writer.queue();
        // 40 batches of about 10 KB: the pipe takes six, the thread waits in the seventh's
        // write, and more than 300 KB wait.
        for _ in 0..40 {
            queue.write(batch(10)).unwrap();
        }
        let (go, stop) = (AtomicBool::new(false), AtomicBool::new(true));
        // No one reads: nothing is written, and the wait gives up; asked to stop, at once.
        let started = Instant::now();
        assert!(!queue.wait_for_room(Duration::from_millis(300), &go));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let started = Instant::now();
        assert!(!queue.wait_for_room(Duration::from_secs(60), &stop));
        assert!(started.elapsed() < Duration::from_secs(1));
        // A reader, 10 KB every 100 ms: the thread finishes a batch about every 100 ms. For
        // the first 2 s another writer queues as much as is read (the queue does not
        // shrink, but the thread writes); then the wait lasts until less than 200 KB wait
        // (about 1.5 s more).
        let reading = Arc::new(AtomicBool::new(true));
        let (go_on, other) = (reading.clone(), writer.queue());
        let reader = thread::spawn(move || {
            let (mut buf, mut pipe) = (vec![0u8; 10 << 10], pipe);
            for i in 0.. {
                if !go_on.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
                let _ = pipe.read(&mut buf);
                if i < 20 {
                    other.write(batch(10)).unwrap();
                }
            }
            pipe
        });
        let started = Instant::now();
        assert!(queue.wait_for_room(Duration::from_secs(1), &go));
        let waited = started.elapsed();
        assert!(waited > Duration::from_secs(2) && waited < Duration::from_secs(20), "{waited:?}");
        assert!(queue.queued.load(Ordering::SeqCst) < 200 << 10);
        reading.store(false, Ordering::SeqCst);
        // The thread is left waiting in a write (the sink's own descriptor keeps the pipe
        // open for reading); the test does not wait for it.
        drop(reader.join().unwrap());
        drop((queue, writer));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A rotation that fails is told once, as a state (`Rotation(Err)`) that holds over the
    /// batches written past the limit after it, and ends (`Rotation(Ok)`) once a rotation
    /// succeeds; every batch is written.
    #[test]
    fn a_failed_rotation_is_told_until_one_succeeds() {
        let dir = std::env::temp_dir().join(format!("xgrotstate{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // FILE.1 a directory with a file in it: FILE cannot be renamed onto it.
        fs::create_dir_all(dir.join("flows.jsonl.1")).unwrap();
        fs::write(dir.join("flows.jsonl.1").join("x"), "keep").unwrap();
        let path = dir.join("flows.jsonl");
        let mut writer = Writer::spawn(Sink::open(path.to_str().unwrap(), 3100, 1).unwrap());
        let next = |writer: &mut Writer| match writer.wait() {
            Some(Done::Wrote(r)) => format!("wrote {}", r.is_ok()),
            Some(Done::Rotation(r)) => format!("rotation {}", r.is_ok()),
            other => panic!("{other:?}"),
        };
        // 1,007-byte lines: the fourth would pass 3,100 bytes and rotates.
        for _ in 0..6 {
            writer.write(batch(1)).unwrap();
        }
        let told: Vec<String> = (0..7).map(|_| next(&mut writer)).collect();
        let wrote = "wrote true";
        assert_eq!(told, [wrote, wrote, wrote, wrote, "rotation false", wrote, wrote]);
        fs::remove_dir_all(dir.join("flows.jsonl.1")).unwrap();
        // The next try, 3,100 bytes on (at the seventh), rotates.
        for _ in 0..3 {
            writer.write(batch(1)).unwrap();
        }
        let told: Vec<String> = (0..4).map(|_| next(&mut writer)).collect();
        assert_eq!(told, ["wrote true", "rotation true", "wrote true", "wrote true"]);
        assert!(dir.join("flows.jsonl.1").is_file());
        let _ = fs::remove_dir_all(&dir);
    }
}
