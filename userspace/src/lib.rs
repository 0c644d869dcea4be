//! The `xdpgate` binary's own layer, above `xdpgate-dataplane` and `xdpgate-policy`: the
//! agent's jobs (reload, health probes, NAT expiry, flow log, metrics) and the operator
//! views.

pub mod agent;
pub mod agent_state;
pub mod bgp;
pub mod capture;
pub mod cli_docs;
pub mod dates;
pub mod decap;
pub mod filter;
pub mod flowlog;
pub mod flows_cmd;
pub mod health;
pub mod host_addrs;
pub mod host_cover;
pub mod lb;
pub mod lock_turn;
pub mod metrics;
pub mod node;
pub mod observe;
pub mod plan;
pub mod set;
pub mod status;
pub mod trace;
pub mod verify_flow;
pub mod views;
