//! `cargo xtask bench`: the dataplane benchmark (`xdpgate-bench`), built in release mode and
//! run as root. Sections: NSG (10-4,000 rules, IPv4/IPv6, compile and apply), load balancer
//! (2/16/256 backends, Maglev table swap), NAT gateway, memory (every map, 1M-entry flow
//! table, agent RSS), peers (nftables and xdp-filter on the same traffic), events (first
//! packets with and without a reader of the flow-event ring), forward (LB and NAT
//! established with forwarding on), flows (1,000 to 1,000,000 live flows) and throughput
//! (iperf3 through a veth gateway: kernel forwarding, nftables, xdpgate). Each writes
//! `target/bench/<section>.md` and `.json`; together they write `target/bench/README.md`
//! and the chart `target/bench/ratios.svg`, and the README is printed.
//!
//! Arguments are passed through: `--quick` (a smoke test, about 30 s), `--runs N`,
//! `--only nsg,lb,nat,memory,peers,events,forward,flows,throughput`, `--out DIR`.

use std::{path::Path, process::Command};

use anyhow::Result;

/// Runs the benchmark binary with `args` (e.g. `--quick`) from the workspace root.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    // The throughput section drives the real CLI, found beside the benchmark binary.
    super::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "xdpgate",
    ]))?;
    super::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["run", "--release", "-p", "xdpgate-bench", "--"])
            .args(args),
    )
}
