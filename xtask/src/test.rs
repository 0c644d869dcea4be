//! `cargo xtask test`: every test binary of the workspace, built once, then run two at a time.
//!
//! Within a binary the tests run one at a time: many are timed, and some change state of
//! their process. Binaries name their namespaces, links, pins and state directories after
//! their process; a few use up what the whole machine has and run with no other beside them
//! ([`ALONE`]). The suite waits on traffic and timers far more than it computes, so two
//! binaries at a time about halve its time on a 2-vCPU machine.

use std::{
    collections::VecDeque,
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use cargo_metadata::Message;

use crate::run;

/// Test binaries run at once unless `XDPGATE_TEST_JOBS` says otherwise.
const DEFAULT_JOBS: usize = 2;

/// How long one test binary may run: the longest takes about 4 minutes on the slowest VM.
const BINARY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Test targets run first, one at a time, with no other binary beside them: `quick` (the
/// bench) holds gigabytes of tables and keeps both CPUs busy; `e2e_pktgen` holds most of the
/// kernel's XDP memory-model ids, which another traffic generator then waits for;
/// `testrun_events` counts interrupt work on its CPU, which another binary's wake-ups add to.
const ALONE: [&str; 3] = ["quick", "e2e_pktgen", "testrun_events"];

/// A built test binary and how Cargo would run it.
struct Binary {
    /// What the summary names: the test target, or `unittests`, the source and the crate.
    label: String,
    /// The target's name, as [`ALONE`] names it.
    target: String,
    /// What Cargo prints after `Running`: the test's source.
    src: String,
    exe: PathBuf,
    /// Cargo runs a test binary in its package's directory.
    dir: PathBuf,
}

/// What one binary did.
struct Outcome {
    label: String,
    passed: u64,
    failed: u64,
    ok: bool,
}

pub fn test(root: &Path, args: &[String]) -> Result<()> {
    if !args.is_empty() {
        // A chosen part (`-p xdpgate --test e2e_nsg`, a filter, `-- --nocapture`): Cargo's
        // own runner, so every argument means what it means to `cargo test`; what follows
        // `--` goes to the test binaries after `--test-threads=1`.
        let (cargo, harness) = match args.iter().position(|a| a == "--") {
            Some(i) => (&args[..i], &args[i + 1..]),
            None => (args, &[][..]),
        };
        // The workspace's default members (every crate but the eBPF one) unless `-p` says.
        return run(Command::new("cargo")
            .current_dir(root)
            .arg("test")
            .args(cargo)
            .args(["--", "--test-threads=1"])
            .args(harness));
    }
    let jobs = match std::env::var("XDPGATE_TEST_JOBS") {
        Ok(v) => v.parse().ok().filter(|&n| n > 0).with_context(|| {
            format!("XDPGATE_TEST_JOBS={v:?}: expected a number of test binaries above 0")
        })?,
        Err(_) => DEFAULT_JOBS,
    };
    let started = Instant::now();
    let binaries = build(root)?;
    for name in ALONE {
        let found = binaries.iter().filter(|b| b.target == name).count();
        ensure!(found == 1, "{found} test targets named {name:?} (ALONE names one)");
    }
    let (alone, together): (VecDeque<Binary>, VecDeque<Binary>) =
        binaries.into_iter().partition(|b| ALONE.contains(&b.target.as_str()));
    let total = alone.len() + together.len();
    let print = Mutex::new(());
    let outcomes = Mutex::new(Vec::new());
    for bin in &alone {
        outcomes.lock().unwrap().push(run_binary(bin, &print));
    }
    let queue = Mutex::new(together);
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    // Its own statement: the queue's lock must not last the binary's run.
                    let Some(bin) = queue.lock().unwrap().pop_front() else { break };
                    let outcome = run_binary(&bin, &print);
                    outcomes.lock().unwrap().push(outcome);
                }
            });
        }
    });
    // Doc tests are compiled as they run: Cargo's runner, after the binaries.
    let doc = run(Command::new("cargo")
        .current_dir(root)
        .args(["test", "--doc", "--"])
        .arg("--test-threads=1"));
    let outcomes = outcomes.into_inner().unwrap();
    let passed: u64 = outcomes.iter().map(|o| o.passed).sum();
    let failed: u64 = outcomes.iter().map(|o| o.failed).sum();
    let bad: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.label.as_str()).collect();
    println!(
        "\nxtask test: {total} test binaries, {jobs} at a time, {passed} tests passed, \
         {failed} failed, in {:.1} minutes",
        started.elapsed().as_secs_f64() / 60.0
    );
    match (bad.is_empty(), doc) {
        (true, doc) => doc,
        (false, Ok(())) => bail!("test binaries failed: {}", bad.join(", ")),
        (false, Err(e)) => bail!("test binaries failed: {}; doc tests: {e:#}", bad.join(", ")),
    }
}

/// Builds every test binary of the workspace (Cargo's diagnostics on stderr) and lists them.
fn build(root: &Path) -> Result<VecDeque<Binary>> {
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning cargo test --no-run")?;
    let mut binaries = Vec::new();
    for message in Message::parse_stream(BufReader::new(child.stdout.take().unwrap())) {
        let Message::CompilerArtifact(artifact) = message.context("reading Cargo's messages")?
        else {
            continue;
        };
        let Some(exe) = artifact.executable.filter(|_| artifact.profile.test) else {
            continue;
        };
        let dir = artifact.manifest_path.parent().context("a manifest without a directory")?;
        let target = &artifact.target;
        let src = target.src_path.strip_prefix(dir).unwrap_or(&target.src_path).to_string();
        // A crate's library and program have unit tests of the same crate name.
        let label = if target.is_test() {
            target.name.clone()
        } else {
            format!("unittests {src} ({})", target.name)
        };
        let target = target.name.clone();
        binaries.push(Binary { label, target, src, exe: exe.into(), dir: dir.into() });
    }
    if !child.wait().context("waiting for cargo test --no-run")?.success() {
        bail!("building the tests failed");
    }
    ensure!(!binaries.is_empty(), "cargo test --no-run reported no test binary");
    // Cargo's messages come in the order builds finish; a name order keeps runs alike.
    binaries.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(binaries.into())
}

/// Runs one binary's tests one at a time, its output printed in one piece when it ends.
fn run_binary(bin: &Binary, print: &Mutex<()>) -> Outcome {
    eprintln!("xtask test: starting {} (output in {})", bin.label, log_path(bin).display());
    let started = Instant::now();
    let (status, output) = match spawn_merged(bin) {
        Ok(done) => done,
        Err(e) => (false, format!("{e:#}\n")),
    };
    let (mut passed, mut failed) = (0, 0);
    for line in output.lines().filter(|l| l.starts_with("test result:")) {
        passed += count_before(line, " passed;");
        failed += count_before(line, " failed;");
    }
    let _guard = print.lock().unwrap();
    println!("     Running {} ({})", bin.src, bin.exe.display());
    print!("{output}");
    println!("xtask test: {} took {:.1} s", bin.label, started.elapsed().as_secs_f64());
    Outcome { label: bin.label.clone(), passed, failed, ok: status }
}

/// Runs the binary with its stdout and stderr in one file beside it, as a terminal would
/// show them. A file, not a pipe: a daemon a test leaves behind holding its output must not
/// keep the run waiting.
fn spawn_merged(bin: &Binary) -> Result<(bool, String)> {
    let log = log_path(bin);
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(&bin.exe)
        .arg("--test-threads=1")
        .current_dir(&bin.dir)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("running {}", bin.exe.display()))?;
    let started = Instant::now();
    // A binary that hangs is killed, so the run ends and its output shows which test hung
    // (one test at a time, libtest names each as it starts). Only the binary: what it
    // started and its guards would have removed is left (a killed run's leftovers).
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > BINARY_TIMEOUT {
            child.kill()?;
            child.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let bytes = std::fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut output = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_none() {
        output += &format!("\nxtask test: killed after {} s\n", BINARY_TIMEOUT.as_secs());
    }
    Ok((status.is_some_and(|s| s.success()), output))
}

/// Where a binary's output goes: beside it.
fn log_path(bin: &Binary) -> PathBuf {
    bin.exe.with_extension("log")
}

/// The number before `word` in a `test result:` line.
fn count_before(line: &str, word: &str) -> u64 {
    line.split_once(word)
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
