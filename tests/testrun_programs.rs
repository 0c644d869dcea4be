//! Every program of the dataplane's object (and of the backends' decapsulation object)
//! loads, and with room to spare: the kernel's verifier gives up after 1,000,000
//! instructions processed, and how many a program needs moves with the kernel. A stable kernel update (6.18.44 build v1147 to v1272) took the
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
    let mut report = Vec::new();
    let mut ebpf = xdpgate_dataplane::load(&pins.dir).expect("load the object");
    for (name, prog) in ebpf.programs_mut() {
        let loaded = match prog {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => panic!("{name}: a program type this test does not load"),
        };
        match loaded {
            Ok(()) => judge(name, prog, &mut report),
            Err(e) => report.push(format!("{name}: not loaded: {}", first_line(&e))),
        }
    }
    // The backends' decapsulation object, which loads its programs itself.
    match xdpgate_dataplane::decap::load(&pins.dir) {
        Ok(mut decap) => decap.programs_mut().for_each(|(n, p)| judge(n, p, &mut report)),
        Err(e) => report.push(format!("decap object: {e:#}").chars().take(300).collect()),
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

/// Notes a loaded program's verified instructions, and in `report` if over the budget.
fn judge(name: &str, prog: &Program, report: &mut Vec<String>) {
    let info = match prog {
        Program::Xdp(p) => p.info(),
        Program::SchedClassifier(p) => p.info(),
        _ => panic!("{name}: a program type this test does not load"),
    };
    let insns = info
        .unwrap_or_else(|e| panic!("{name}: loaded, but no info: {e}"))
        .verified_instruction_count()
        .unwrap_or_else(|| panic!("{name}: the kernel does not say what it verified (5.16+)"));
    eprintln!("{name}: {insns} instructions verified");
    if insns > BUDGET {
        report.push(format!("{name}: {insns} instructions verified, over {BUDGET}"));
    }
}

/// The error's first line: the verifier's log that follows it runs to megabytes.
fn first_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    if let Some(source) = e.source() {
        text = format!("{text}: {source}");
    }
    text.chars().take(300).collect()
}
