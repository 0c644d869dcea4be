//! `xdpgate trace`: one crafted packet run through the loaded programs with
//! `BPF_PROG_TEST_RUN`, carrying a marker (XDP metadata, or the socket buffer's control
//! block at tc) that the programs trust only while it equals the one the running trace
//! armed (`TRACE_ARMED`); each stage writes its decision into this CPU's
//! `TraceRecord` for it, and leaves out what would change the state real packets see (no
//! flow entry, NAT port claim, rule or interface counter, flow event or capture copy).

use crate::pod;

/// `PerCpuArray<TraceRecord>` of one entry.
pub const TRACE: &str = "TRACE";

/// `Array<u64>` of one: the marker of the trace running now, 0 when none runs. The trace
/// command draws it at random and writes it under its lock just before its test run, and
/// clears it after: a packet's metadata or control block (which a program before ours can
/// write: another tcx program, a redirecting device) cannot know it, so no real packet is
/// taken for a trace's. The packet carries it as the first 8 bytes of XDP metadata, or
/// `cb[0]` and `cb[1]` of a socket buffer (low word first).
pub const TRACE_ARMED: &str = "TRACE_ARMED";

/// `TraceRecord::stages` bits: the stages the packet went through.
pub const STAGE_PARSE: u8 = 1;
pub const STAGE_LOOKUP: u8 = 2;
pub const STAGE_NEW_FLOW: u8 = 4;
pub const STAGE_SNAT: u8 = 8;
pub const STAGE_ACT: u8 = 16;
pub const STAGE_END: u8 = 32;

/// `TraceRecord::lookup`: no lookup (no policy, or not an IP packet the tables hold).
pub const LOOKUP_NONE: u8 = 0;
pub const LOOKUP_MISS: u8 = 1;
pub const LOOKUP_ESTABLISHED: u8 = 2;
pub const LOOKUP_EMBRYONIC: u8 = 3;

/// `TraceRecord::lb`.
pub const LB_NOT_FRONTEND: u8 = 0;
pub const LB_SELECTED: u8 = 1;
pub const LB_NO_BACKEND: u8 = 2;
/// A frontend's address on a port or protocol no rule serves.
pub const LB_NO_RULE: u8 = 3;

/// `TraceRecord::nsg`.
pub const NSG_NOT_ASKED: u8 = 0;
pub const NSG_ALLOWED: u8 = 1;
pub const NSG_DENIED: u8 = 2;

/// What the stages decided for the traced packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    /// The flow's rewrite (`flow::NAT_*` in `nat`): address and port after it.
    pub nat_addr: [u32; 4],
    /// Load balancing: service and backend chosen.
    pub service: u32,
    pub backend: u32,
    /// Policy generation of the flow found (lookup hit), or of the policy classifying.
    pub generation: u64,
    /// Deciding rule of each side (`FlowValue::rules`, by `DIR_*`).
    pub rules: [u16; 2],
    pub nat_port: u16,
    /// The NAT gateway whose port the SNAT stage would claim; `u16::MAX`: none.
    pub snat_gateway: u16,
    /// Set from the entry stage to the end of the traced packet's pipeline.
    pub active: u8,
    pub stages: u8,
    pub lookup: u8,
    pub lb: u8,
    pub nsg: u8,
    pub nat: u8,
    /// The XDP verdict the pipeline ended with (tc's mapped to it), and a drop's reason.
    pub verdict: u8,
    pub reason: u8,
    /// The packet's direction (`DIR_*`) by its arrival interface's role.
    pub dir: u8,
    /// The flow entry found: its direction and whether it is a reply direction.
    pub flow_direction: u8,
    pub flow_reply: u8,
    /// 1: the embryonic entry found is `ASSURED` (confirmed, waiting for room in the
    /// established table). A byte of the padding, and `lookup` stays `LOOKUP_EMBRYONIC`, so
    /// a CLI and programs of different builds still read each other's records.
    pub assured: u8,
    pub _pad: [u8; 4],
}

pod!(TraceRecord);
