//! The `xdpgate` binary's own layer, above `xdpgate-dataplane` and `xdpgate-policy`: the
//! agent's jobs (reload, health probes, NAT expiry, flow log, metrics) and the operator
//! views.

pub mod agent;
pub mod agent_state;
pub mod capture;
pub mod filter;
pub mod flowlog;
pub mod health;
pub mod metrics;
pub mod node;
pub mod status;
pub mod trace;
pub mod views;
