//! NAT gateways against the dataplane's table sizes.

use anyhow::{Result, bail};
use xdpgate_common::{
    maps::NAT_PREFIXES,
    nat::{MAX_NAT_GATEWAYS, MAX_PUBLIC_ADDRS},
};

use crate::Policy;

/// Prefixes a policy may put in each NAT prefix trie: half of it, since the new entries are
/// written beside the old ones before those go.
pub const NAT_PREFIXES_PER_POLICY: usize = NAT_PREFIXES as usize / 2;
/// Public addresses a policy may use, for the same reason.
pub const NAT_PUBLIC_PER_POLICY: usize = (MAX_NAT_GATEWAYS as usize * MAX_PUBLIC_ADDRS) / 2;

/// Every way the policy's NAT gateways overflow the dataplane's tables, whatever policy runs
/// before or after it: the numbers both `check` and `apply` use.
pub fn problems(policy: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    let gws = policy.nat_gateways.len();
    if gws > MAX_NAT_GATEWAYS as usize {
        out.push(format!("{gws} NAT gateways exceed the table size {MAX_NAT_GATEWAYS}"));
    }
    let subnets: usize = policy.nat_gateways.iter().map(|g| g.subnets.len()).sum();
    for (what, n) in [
        ("NAT gateway subnet prefixes", subnets),
        ("virtual-network prefixes", policy.virtual_network.len()),
    ] {
        if n > NAT_PREFIXES_PER_POLICY {
            out.push(format!(
                "{n} {what}; a policy may use at most {NAT_PREFIXES_PER_POLICY} (half the \
                 table: old and new entries are both there while a policy is replaced)"
            ));
        }
    }
    let public: usize = policy.nat_gateways.iter().map(|g| g.public_addresses.len()).sum();
    if public > NAT_PUBLIC_PER_POLICY {
        out.push(format!(
            "{public} NAT public addresses; a policy may use at most {NAT_PUBLIC_PER_POLICY} \
             (half the table: old and new entries are both there while a policy is replaced)"
        ));
    }
    out
}

/// Whether the policy's NAT gateways fit the dataplane's tables (see [`problems`]).
pub fn check(policy: &Policy) -> Result<()> {
    let problems = problems(policy);
    if !problems.is_empty() {
        bail!("the policy does not fit the dataplane's tables:\n  {}", problems.join("\n  "));
    }
    Ok(())
}
