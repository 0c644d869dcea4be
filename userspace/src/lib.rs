//! The xdpgate agent: loads the XDP dataplane, attaches it to interfaces, pins its state in
//! bpffs and reads it back.

pub mod agent;
pub mod apply;
pub mod compile;
pub mod dataplane;
pub mod evaluate;
pub mod flowlog;
pub mod flows;
pub mod health;
pub mod lb;
pub mod maglev;
pub mod metrics;
pub mod nat;
pub mod netns;
pub mod policy;
pub mod rules;
pub mod stats;
pub mod status;

/// The compiled eBPF object (built by `build.rs` from `ebpf/`).
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpgate"));
