//! The generator's command line, run as a program: it refuses what it cannot send, with a
//! usage error, before it touches any interface. (Building this test also makes
//! `cargo test --workspace` build the binary that the kernel tests in `tests/` drive.)

use std::process::Command;

fn pktgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xdpgate-pktgen")).args(args).output().expect("spawn")
}

#[test]
fn help_and_usage_errors() {
    let help = pktgen(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("sink"));
    let missing = pktgen(&["--count", "10"]);
    assert_eq!(missing.status.code(), Some(2), "no --iface is a usage error");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--iface"));
}
