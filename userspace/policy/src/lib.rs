//! Policies, with no kernel access: the YAML format, its validated and expanded model, the
//! reference evaluator of NSG semantics, and the compiled images the dataplane crate
//! writes (NSG tables, load balancers with their Maglev tables, NAT gateways), with the
//! names saved beside each generation.

pub mod compile;
pub mod evaluate;
pub mod lb;
pub mod maglev;
pub mod model;
pub mod names;
pub mod nat;
pub mod prefix_set;
pub mod reference;
pub mod sets;
pub mod tree;
pub mod yaml;

use std::path::Path;

use anyhow::{Result, anyhow};
pub use model::*;
pub use yaml::{
    PolicyError, PolicyErrors, load_file, load_str, load_str_with_sets, printable, read_source,
    unforwardable, unreachable,
};

/// Loads a policy file; every validation error is listed as file:line: field: reason.
pub fn load(file: &Path) -> Result<(Policy, String)> {
    load_with_sets(file, &sets::SetChanges::default())
}

/// Loads a policy file with the sets changed at run time laid over its own (what runs).
pub fn load_with_sets(file: &Path, changes: &sets::SetChanges) -> Result<(Policy, String)> {
    let source = yaml::read_source(file).map_err(|e| anyhow!("reading {}: {e}", file.display()))?;
    let policy = load_str_with_sets(&source, &file.display().to_string(), changes)
        .map_err(|errors| anyhow!("invalid policy, nothing changed:\n{errors}"))?;
    Ok((policy, source))
}

/// Compiles every part of a policy and checks it fits the dataplane's tables, touching
/// nothing: what `xdpgate check` runs, and what `apply` does before it changes anything.
pub fn compile_all(policy: &Policy) -> Result<(compile::Compiled, lb::CompiledLb)> {
    // Counts first: compiling a virtual network too large for them costs every NSG's
    // default rules an entry per prefix (100,000 prefixes under 300 NSGs took 30 s).
    nat::check(policy)?;
    let tables = compile::compile(policy)?;
    let lbs = lb::compile(policy)?;
    Ok((tables, lbs))
}

/// A small deterministic generator for the randomised tests: `next(n)` is below `n`
/// (xorshift64; `seed` not 0).
#[cfg(test)]
fn test_rng(mut state: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, sync::mpsc, time::Duration};

    /// A policy "file" that never ends (a FIFO whose writer stays, as `/dev/zero` would be)
    /// is refused, not read until memory runs out (nor waited for, as a trickle would be).
    #[test]
    fn a_file_without_end_is_refused() {
        let dir = std::env::temp_dir().join(format!("xgpolicy{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("policy.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let writer = fifo.clone();
        // More than the limit, then the pipe held open without an end (the test's end ends
        // it); bounded, so that a reader without a limit waits rather than fills memory.
        std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(writer).unwrap();
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..34 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_secs(60));
        });
        let (tx, rx) = mpsc::channel();
        let reader = fifo.clone();
        std::thread::spawn(move || tx.send(super::load(&reader).map(|_| ())));
        let answer = rx.recv_timeout(Duration::from_secs(20));
        let _ = std::fs::remove_dir_all(&dir);
        let err = answer.expect("an answer, not a read without end").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    /// A virtual network past the NAT tables' share is refused before the NSG tables are
    /// compiled: here a rule also needs more NSG entries than the table holds, and the
    /// error is the count (seen failing: the entries' error, found by compiling, which
    /// costs every NSG's default rules an entry per virtual-network prefix).
    #[test]
    fn counts_are_checked_before_compiling() {
        let space: Vec<String> =
            (0..600).map(|i| format!("10.0.{}.{}/32", i / 256, i % 256)).collect();
        // About 290,000 IPv6 prefixes, past the NSG field table's 262,144 entries.
        let ranges: Vec<String> = (1..1_300)
            .map(|n| format!("\"{n:x}::1-{n:x}:ffff:ffff:ffff:ffff:ffff:ffff:fffe\""))
            .collect();
        let src = format!(
            "virtual_network:\n  address_space: [{}]\nnsgs:\n  - name: n\n    subnets: \
             [10.0.0.0/32]\n    rules:\n      - {{name: r, priority: 100, direction: inbound, \
             access: allow, protocol: tcp, source: [{}], destination: '*'}}\n",
            space.join(", "),
            ranges.join(", ")
        );
        let policy = crate::load_str(&src, "p.yaml").unwrap_or_else(|e| panic!("{e}"));
        let Err(err) = super::compile_all(&policy) else { panic!("compiled") };
        let err = format!("{err:#}");
        assert!(
            err.contains("600 virtual-network prefixes; a policy may use at most 512"),
            "{err}"
        );
    }

    /// A file another process holds a write lease on (Samba's oplocks, an NFS server's
    /// delegations) is read once the lease is given up, as a plain open waits for it (seen
    /// failing after the open stopped waiting: "Resource temporarily unavailable").
    #[test]
    fn a_leased_file_is_read_once_the_lease_is_given_up() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("xglease{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "virtual_network: {address_space: [10.0.0.0/8]}\n").unwrap();
        let holder = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // The lease's break is told by SIGIO, whose default ends the process.
        // SAFETY: fcntl and signal on an open descriptor and a standard signal.
        unsafe {
            libc::signal(libc::SIGIO, libc::SIG_IGN);
            assert_eq!(libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK), 0);
        }
        let fd = holder.as_raw_fd();
        let giver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: as above; the holder outlives this thread (joined below).
            unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        });
        let read = crate::read_source(&path);
        giver.join().unwrap();
        drop(holder);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(read.as_ref().is_ok_and(|s| s.starts_with("virtual_network")), "{read:?}");
    }

    /// A path that is a regular file when looked at and a FIFO when opened (a link swapped
    /// in between) is refused, not waited on: the file opened is the one checked. Another
    /// thread swaps the link back and forth; one that waits on the FIFO is freed by a writer
    /// after two seconds, and counted (seen failing: 1 in about 150 `xdpgate check` runs hung
    /// while the link was being swapped).
    #[test]
    fn a_link_swapped_to_a_fifo_is_not_waited_on() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        };
        let dir = std::env::temp_dir().join(format!("xgswap{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (file, fifo, link) = (dir.join("file"), dir.join("fifo"), dir.join("policy.yaml"));
        std::fs::write(&file, "virtual_network: {address_space: [10.0.0.0/8]}\n").unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let stop = Arc::new(AtomicBool::new(false));
        let (done, waited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let swapper = {
            let (stop, file, fifo, link, dir) =
                (stop.clone(), file.clone(), fifo.clone(), link.clone(), dir.clone());
            std::thread::spawn(move || {
                let tmp = dir.join("tmp");
                for i in 0.. {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(if i % 2 == 0 { &file } else { &fifo }, &tmp)
                        .unwrap();
                    std::fs::rename(&tmp, &link).unwrap();
                }
            })
        };
        // Frees a reader stuck on the FIFO: the reads go on, the wait is counted.
        let freer = {
            let (stop, done, waited, fifo) =
                (stop.clone(), done.clone(), waited.clone(), fifo.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while !stop.load(Relaxed) {
                    std::thread::sleep(Duration::from_secs(2));
                    let now = done.load(Relaxed);
                    if now == seen && !stop.load(Relaxed) {
                        waited.fetch_add(1, Relaxed);
                        // Not waiting for a reader itself: without one it fails at once.
                        use std::os::unix::fs::OpenOptionsExt;
                        let mut open = std::fs::OpenOptions::new();
                        drop(open.write(true).custom_flags(libc::O_NONBLOCK).open(&fifo));
                    }
                    seen = now;
                }
            })
        };
        for _ in 0..20_000 {
            let _ = crate::read_source(&link);
            done.fetch_add(1, Relaxed);
        }
        stop.store(true, Relaxed);
        swapper.join().unwrap();
        freer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(waited.load(Relaxed), 0, "reads waited on the FIFO");
    }
}
