//! The dataplane loaded for `BPF_PROG_TEST_RUN`, with its own pins: apply policies, choose
//! the direction test packets arrive in, run packets, read counters.

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use xdpgate_common::{
    flow::{FlowKey, FlowValue},
    iface::{IfaceConfig, Role},
    maps::{EMBRYOS, FLOW_STATS, FLOWS, NAT_MAP},
    nat::NatEntry,
};
use xdpgate_dataplane::{stats, transaction};
use xdpgate_policy::{self as policy, lb::CompiledLb};

use super::{
    Pins,
    packet::{checksums_ok, fragment, reassemble},
};

pub const PASS: u32 = 2;
pub const DROP: u32 = 1;

pub struct Kernel {
    pub pins: Pins,
    ebpf: aya::Ebpf,
}

impl Kernel {
    /// The dataplane with its tables at the default sizes.
    pub fn new() -> Self {
        Self::sized(&xdpgate_dataplane::SizeRequest::default())
    }

    /// The dataplane with its flow and NAT tables sized as `attach --flows N
    /// --nat-translations N` would (a small table fills fast).
    pub fn sized(sizes: &xdpgate_dataplane::SizeRequest) -> Self {
        let pins = Pins::new();
        let mut ebpf = xdpgate_dataplane::load_sized(&pins.dir, sizes).expect("load");
        xdpgate_dataplane::dataplane(&mut ebpf).expect("programs");
        Self { pins, ebpf }
    }

    /// Loads, compiles and applies a policy from YAML text; returns the new generation.
    pub fn apply(&self, src: &str) -> u64 {
        self.apply_with_health(src, |_| true).0
    }

    /// Applies as the agent does, with `healthy` saying which backends (by address) the
    /// probes of their services have found healthy.
    pub fn apply_with_health(
        &self,
        src: &str,
        healthy: impl Fn(IpAddr) -> bool,
    ) -> (u64, CompiledLb) {
        let policy = policy::load_str(src, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        transaction::apply_policy(&self.pins.dir, &policy, src, &healthy).expect("apply")
    }

    /// Flows decided by a rule of the running policy (summed over layers).
    pub fn rule_flows(&self, rule: &str) -> u64 {
        let stats = stats::read(&self.pins.dir).unwrap();
        stats
            .policy
            .expect("a policy is applied")
            .rules
            .iter()
            .filter(|r| r.rule == rule)
            .map(|r| r.flows)
            .sum()
    }

    /// The flow entry of a 5-tuple, established or embryonic, if any.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.established(key).or_else(|| self.embryo(key))
    }

    /// The established-flow entry of a 5-tuple, if any.
    pub fn established(&self, key: &FlowKey) -> Option<FlowValue> {
        self.lookup(FLOWS, key)
    }

    /// The embryonic-flow entry of a 5-tuple, if any.
    pub fn embryo(&self, key: &FlowKey) -> Option<FlowValue> {
        self.lookup(EMBRYOS, key)
    }

    /// Writes the flow entry of `key`, changed, under `into`, in the table that holds it:
    /// an entry as another build would have written it.
    pub fn change_flow(&self, key: &FlowKey, into: &FlowKey, change: impl FnOnce(&mut FlowValue)) {
        let table = if self.established(key).is_some() { FLOWS } else { EMBRYOS };
        let mut map: aya::maps::HashMap<_, FlowKey, FlowValue> =
            self.pins.dir.open_map(table).unwrap().try_into().unwrap();
        let mut entry = map.get(key, 0).expect("a flow entry to change");
        change(&mut entry);
        map.insert(into, entry, 0).unwrap();
    }

    fn lookup(&self, table: &str, key: &FlowKey) -> Option<FlowValue> {
        let map: aya::maps::HashMap<_, FlowKey, FlowValue> =
            self.pins.dir.open_map(table).unwrap().try_into().unwrap();
        map.get(key, 0).ok()
    }

    /// Entries the pinned flow table holds at most (`FLOWS`'s size).
    pub fn flow_table_entries(&self) -> u32 {
        xdpgate_dataplane::tables::pinned_entries(&self.pins.dir, FLOWS)
            .unwrap()
            .expect("FLOWS pinned")
    }

    /// Packets from test runs arrive on `lo`; its role makes them inbound or outbound.
    pub fn arrive_as(&self, role: Role) {
        let config = IfaceConfig { slot: 1, role: role as u32 };
        xdpgate_dataplane::write_iface(&self.pins.dir, 1, Some(config)).unwrap();
    }

    pub fn ebpf(&self) -> &aya::Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut aya::Ebpf {
        &mut self.ebpf
    }

    pub fn entry(&self) -> &Xdp {
        self.ebpf.program(xdpgate_dataplane::PROGRAM).unwrap().try_into().unwrap()
    }

    /// Runs one packet; returns the XDP verdict.
    pub fn run(&self, packet: &[u8]) -> u32 {
        self.run_out(packet).0
    }

    /// Runs one packet; returns the verdict and the packet as the program left it.
    pub fn run_out(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.entry(), packet)
    }

    /// Runs one packet through the tc entry (`xdpgate_tc`, linked by [`link_tc_pipeline`]);
    /// returns the tc verdict and the packet as the program left it.
    pub fn run_tc_out(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &aya::programs::SchedClassifier =
            self.ebpf.program("xdpgate_tc").unwrap().try_into().unwrap();
        test_run(prog, packet)
    }

    /// Runs a packet that must pass, checking its checksums from scratch after whatever
    /// rewrite it got; returns it as it leaves.
    pub fn through(&self, pkt: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run_out(pkt);
        assert_eq!(verdict, PASS, "verdict");
        checksums_ok(&out).unwrap_or_else(|e| panic!("bad {e} after rewrite"));
        out
    }

    /// Both fragments of datagram `dgram` (split 64 bytes after the IP header) through the
    /// program; returns the datagram they make once reassembled, checked whole: checksums
    /// right, the later fragment's data unchanged.
    pub fn through_fragmented(&self, dgram: &[u8], id: u32) -> Vec<u8> {
        let [first, later] = fragment(dgram, 64, id);
        let (v1, first) = self.run_out(&first);
        let (v2, later) = self.run_out(&later);
        assert_eq!((v1, v2), (PASS, PASS), "both fragments pass");
        let whole = reassemble(&first, &later);
        checksums_ok(&whole).unwrap_or_else(|e| panic!("bad {e} in the reassembled datagram"));
        let tail = later.len() - (first.len() - 64);
        assert_eq!(whole[whole.len() - tail..], dgram[dgram.len() - tail..], "data unchanged");
        whole
    }

    /// A `FLOW_STATS` counter (`FLOW_STAT_*`), summed over CPUs.
    pub fn flow_stat(&self, index: u32) -> u64 {
        let map: aya::maps::PerCpuArray<_, u64> =
            self.pins.dir.open_map(FLOW_STATS).unwrap().try_into().unwrap();
        map.get(&index, 0).unwrap().iter().sum()
    }

    pub fn drops(&self, reason: &str) -> u64 {
        stats::read(&self.pins.dir).unwrap().drops(reason)
    }

    /// The NAT table's entries (two per translation: each direction's key).
    pub fn translations(&self) -> usize {
        self.nat_map().keys().count()
    }

    /// Empties the NAT table.
    pub fn clear_translations(&self) {
        let mut map = self.nat_map();
        for key in map.keys().map(Result::unwrap).collect::<Vec<_>>() {
            map.remove(&key).unwrap();
        }
    }

    fn nat_map(&self) -> aya::maps::HashMap<aya::maps::MapData, FlowKey, NatEntry> {
        self.pins.dir.open_map(NAT_MAP).unwrap().try_into().unwrap()
    }
}

/// Runs `packet` through `prog` once; the verdict and the packet as the program left it
/// (room for 256 bytes more: encapsulation grows it).
fn test_run<P>(prog: &P, packet: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("test_run");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// Loads the tc ingress programs of `ebpf` and links them into `TC_PIPELINE` (as the loader
/// does for `attach --hook tc`).
pub fn link_tc_pipeline(ebpf: &mut aya::Ebpf) {
    use xdpgate_common::maps::{
        PIPELINE_ACT, PIPELINE_NEW, PIPELINE_POLICY, PIPELINE_SNAT, TC_PARSE, TC_PIPELINE,
    };
    let stages = [
        (TC_PARSE, "xdpgate_tc"),
        (PIPELINE_POLICY, "xdpgate_tc_policy"),
        (PIPELINE_NEW, "xdpgate_tc_new_flow"),
        (PIPELINE_SNAT, "xdpgate_tc_snat"),
        (PIPELINE_ACT, "xdpgate_tc_act"),
    ];
    for (index, name) in stages {
        let prog: &mut aya::programs::SchedClassifier =
            ebpf.program_mut(name).unwrap_or_else(|| panic!("{name}")).try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
        let fd = prog.fd().unwrap().try_clone().unwrap();
        let mut array: aya::maps::ProgramArray<_> =
            ebpf.map_mut(TC_PIPELINE).unwrap().try_into().unwrap();
        array.set(index, &fd, 0).unwrap();
    }
}
