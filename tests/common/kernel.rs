//! The dataplane loaded for `BPF_PROG_TEST_RUN`, with its own pins: apply policies, choose
//! the direction test packets arrive in, run packets, read counters.

use aya::{
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use xdpgate::{apply, compile, policy, stats};
use xdpgate_common::{
    flow::{FlowKey, FlowValue},
    iface::{IfaceConfig, Role},
    maps::{FLOWS, IFACES},
};

use super::Pins;

pub const PASS: u32 = 2;
pub const DROP: u32 = 1;

pub struct Kernel {
    pub pins: Pins,
    ebpf: aya::Ebpf,
}

impl Kernel {
    pub fn new() -> Self {
        let pins = Pins::new();
        let mut ebpf = xdpgate::dataplane::load(&pins.dir).expect("load");
        xdpgate::dataplane::dataplane(&mut ebpf).expect("programs");
        Self { pins, ebpf }
    }

    /// Loads, compiles and applies a policy from YAML text; returns the new generation.
    pub fn apply(&self, src: &str) -> u64 {
        let policy = policy::load_str(src, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let compiled = compile::compile(&policy).expect("compile");
        let generation = apply::apply(&self.pins.dir, &compiled, &policy.settings).expect("apply");
        // As the CLI does, so `stats` can name the rules.
        apply::save_applied(&self.pins.dir, src).expect("save");
        generation
    }

    /// Flows decided by a rule of the running policy (summed over layers).
    pub fn rule_flows(&self, rule: &str) -> u64 {
        let stats = stats::read(&self.pins.dir).unwrap();
        stats.policy.expect("a policy is applied").rules.iter().filter(|r| r.rule == rule).map(|r| r.flows).sum()
    }

    /// The flow-table entry of a 5-tuple, if any.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        let flows: aya::maps::HashMap<_, FlowKey, FlowValue> =
            self.pins.dir.open_map(FLOWS).unwrap().try_into().unwrap();
        flows.get(key, 0).ok()
    }

    /// Packets from test runs arrive on `lo`; its role makes them inbound or outbound.
    pub fn arrive_as(&self, role: Role) {
        let mut ifaces: HashMap<_, u32, IfaceConfig> =
            self.pins.dir.open_map(IFACES).unwrap().try_into().unwrap();
        ifaces.insert(1, IfaceConfig { slot: 1, role: role as u32 }, 0).unwrap();
    }

    fn entry(&self) -> &Xdp {
        self.ebpf.program(xdpgate::dataplane::PROGRAM).unwrap().try_into().unwrap()
    }

    /// Runs one packet; returns the XDP verdict.
    pub fn run(&self, packet: &[u8]) -> u32 {
        self.entry()
            .test_run(TestRunOptions { data_in: Some(packet), ..Default::default() })
            .expect("test_run")
            .return_value
    }

    pub fn drops(&self, reason: &str) -> u64 {
        stats::read(&self.pins.dir).unwrap().drops(reason)
    }
}
