//! Scale-out behind ECMP (issue 16, first part): the agent keeps a host route per frontend
//! it wants announced in a kernel table of its own ([`announce`]), an existing BGP daemon
//! (BIRD, [`bird`]) learns that table and announces it to the routers. `xdpgate drain`
//! ([`drain_cmd`], its state in [`node_drain`]) makes the whole node withdraw.

pub mod announce;
pub mod bird;
pub mod drain_cmd;
pub mod node_drain;
pub mod report;
