//! `cargo xtask bench`: the NSG dataplane benchmark (`xdpgate-bench`), built in release mode.
//! It prints a Markdown table and writes `target/bench/nsg.md` and `target/bench/nsg.json`.

use std::{path::Path, process::Command};

use anyhow::Result;

/// Runs the benchmark binary with `args` (e.g. `--quick`) from the workspace root.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    super::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["run", "--release", "-p", "xdpgate", "--bin", "xdpgate-bench", "--"])
            .args(args),
    )
}
