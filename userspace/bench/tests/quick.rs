//! `xdpgate-bench --quick`, every section, in the suite: the benchmark is code users run to
//! check this project's figures, and a section that stops goes unseen otherwise (the `flows`
//! section stopped at 100,000 flows for a day in 2026-12). Its figures here mean nothing: the
//! build is a debug one (`cargo xtask test` runs it with no other test binary beside it).

use std::{path::Path, process::Command};

/// The sections and their report names, as `--only` takes them.
const SECTIONS: [&str; 11] = [
    "nsg",
    "lb",
    "nat",
    "memory",
    "peers",
    "events",
    "forward",
    "flows",
    "flowlog",
    "check",
    "throughput",
];

#[test]
fn every_section_of_the_quick_benchmark_runs_and_reports() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-quick");
    let _ = std::fs::remove_dir_all(&out);
    // Its reports on stdout and progress on stderr, shown only when it fails.
    let run = Command::new(env!("CARGO_BIN_EXE_xdpgate-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .output()
        .expect("spawn xdpgate-bench");
    assert!(
        run.status.success(),
        "xdpgate-bench --quick failed: {}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    for name in SECTIONS.iter().map(|s| format!("{s}.md")).chain(["README.md".into()]) {
        let text = std::fs::read_to_string(out.join(&name))
            .unwrap_or_else(|e| panic!("{name} not written: {e}"));
        assert!(text.contains("Quick run"), "{name} does not say it is a quick run:\n{text}");
    }
}
