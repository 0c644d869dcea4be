//! NAT gateways against the dataplane's table sizes.

use anyhow::{Result, bail};
use xdpgate_common::{maps::NAT_PREFIXES, nat::MAX_NAT_GATEWAYS};

use crate::Policy;

/// Whether the policy's NAT gateways fit the dataplane's tables.
pub fn check(policy: &Policy) -> Result<()> {
    let gws = policy.nat_gateways.len();
    if gws > MAX_NAT_GATEWAYS as usize {
        bail!("{gws} NAT gateways exceed the table size {MAX_NAT_GATEWAYS}");
    }
    let subnets: usize = policy.nat_gateways.iter().map(|g| g.subnets.len()).sum();
    let prefixes = subnets.max(policy.virtual_network.len());
    if prefixes > NAT_PREFIXES as usize {
        bail!(
            "{prefixes} NAT subnet or virtual-network prefixes exceed the table size {NAT_PREFIXES}"
        );
    }
    Ok(())
}
