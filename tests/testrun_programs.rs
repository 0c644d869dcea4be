//! Every program of the dataplane's object loads, and with room to spare: the kernel's
//! verifier gives up after 1,000,000 instructions processed, and how many a program needs
//! moves with the kernel. A stable kernel update (6.18.44 build v1147 to v1272) took the
//! egress new-flow stage from loading to "BPF program is too large", and every `attach`
//! failed; the XDP tests, which load only the XDP stages, did not notice.

mod common;

use aya::programs::Program;
use common::Pins;

/// The kernel's limit (`BPF_COMPLEXITY_LIMIT_INSNS`).
const LIMIT: u32 = 1_000_000;

/// What a program may take here: half the limit, so that a kernel whose verifier walks
/// twice as much of it still loads it.
const BUDGET: u32 = LIMIT / 2;

#[test]
fn every_program_verifies_within_half_the_kernels_limit() {
    let pins = Pins::new();
    let mut ebpf = xdpgate_dataplane::load(&pins.dir).expect("load the object");
    let mut report = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        let (loaded, info) = match prog {
            Program::Xdp(p) => (p.load(), p.info()),
            Program::SchedClassifier(p) => (p.load(), p.info()),
            _ => panic!("{name}: a program type this test does not load"),
        };
        let insns = match (loaded, info) {
            (Ok(()), Ok(info)) => info.verified_instruction_count().unwrap_or(0),
            (Err(e), _) => {
                report.push(format!("{name}: not loaded: {}", first_line(&e)));
                continue;
            }
            (Ok(()), Err(e)) => panic!("{name}: loaded, but no info: {e}"),
        };
        eprintln!("{name}: {insns} instructions verified");
        if insns > BUDGET {
            report.push(format!("{name}: {insns} instructions verified, over {BUDGET}"));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

/// The error's first line: the verifier's log that follows it runs to megabytes.
fn first_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    if let Some(source) = e.source() {
        text = format!("{text}: {source}");
    }
    text.chars().take(300).collect()
}
