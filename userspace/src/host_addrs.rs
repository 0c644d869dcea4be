//! This host's addresses, in the current network namespace, as `getifaddrs` lists them: the
//! one place the views, the flow log and host mode's warning read them from.

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use nix::sys::socket::SockaddrStorage;

/// One address of one interface.
pub struct HostAddr {
    pub interface: String,
    pub ip: IpAddr,
    /// Its subnet, where the kernel lists a netmask.
    pub net: Option<IpNet>,
}

/// Every address of every interface (loopback included).
pub fn list() -> Result<Vec<HostAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing this host's addresses")?;
    Ok(addrs
        .filter_map(|a| {
            let ip = to_ip(a.address.as_ref()?)?;
            let net =
                a.netmask.as_ref().and_then(to_ip).and_then(|m| IpNet::with_netmask(ip, m).ok());
            Some(HostAddr { interface: a.interface_name, ip, net })
        })
        .collect())
}

/// Whether `addr` is one of this host's addresses.
pub fn is_local(addr: IpAddr) -> Result<bool> {
    Ok(list()?.iter().any(|a| a.ip == addr))
}

fn to_ip(s: &SockaddrStorage) -> Option<IpAddr> {
    s.as_sockaddr_in()
        .map(|s| IpAddr::V4(s.ip()))
        .or_else(|| s.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
}
