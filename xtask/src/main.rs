//! `cargo xtask`: the project's build, test and demo entry points.

mod bench;
mod pps;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xdpgate developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build and the tests need (idempotent, fast when done).
    Setup,
    /// Run every test: unit, BPF_PROG_TEST_RUN and end-to-end (as root; two test binaries at
    /// a time, one test at a time in each).
    Test {
        /// Extra arguments for `cargo test` (`-p xdpgate --test e2e_nsg`, a test name
        /// filter, `-- --nocapture`): with any, Cargo runs the chosen tests itself, one at a
        /// time.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a demo topology in network namespaces, attach xdpgate and send real traffic.
    Demo,
    /// Measure per-packet cost against a no-op XDP program (NSG, load balancer, NAT), memory,
    /// and peers (writes target/bench/*.md, *.json and ratios.svg).
    Bench {
        /// Extra arguments for the benchmark (e.g. `--quick`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Packets per second through a veth pair, xdpgate against xdp_noop, with the generator
    /// `xdpgate-pktgen`, live frames or `--via packet` (writes target/bench/pps.md).
    Pps {
        /// Extra arguments (`--quick`, `--seconds N`, `--rounds N`, `--via packet`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg(root().join("setup.sh")))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = root();
    match cli.task {
        Task::Setup => setup(),
        Task::Test { .. } => {
            setup()?;
            // The words after `test` as given: clap drops a leading `--` (`cargo xtask test
            // -- --nocapture`), which tells Cargo's options from the test binaries'.
            let args: Vec<String> = std::env::args().skip(2).collect();
            test::test(&root, &args)
        }
        Task::Demo => {
            setup()?;
            run(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "xdpgate",
            ]))?;
            run(Command::new("bash")
                .arg(root.join("xtask/demo.sh"))
                .arg(root.join("target/release/xdpgate"))
                .current_dir(&root))
        }
        Task::Bench { args } => {
            setup()?;
            bench::bench(&root, &args)
        }
        Task::Pps { args } => {
            setup()?;
            pps::pps(&root, &args)
        }
    }
}
