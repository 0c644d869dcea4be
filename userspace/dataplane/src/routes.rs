//! The route generation under which the dataplane caches each forwarded flow's next hop
//! (`flow::NextHop`): bumping it makes every flow ask the kernel's FIB again on its next
//! packet. The agent bumps it when it hears of a route, neighbour, address or link change
//! ([`Watch`]), and when it starts (it may have missed changes while none ran).

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use xdpgate_common::maps::ROUTE_GENERATION;

use crate::PinDir;

/// Makes every cached next hop stale. Returns the new generation.
pub fn invalidate(pins: &PinDir) -> Result<u32> {
    let mut map: Array<MapData, u32> = pins.open_map(ROUTE_GENERATION)?.try_into()?;
    let next = map.get(&0, 0)?.wrapping_add(1);
    map.set(0, next, 0)?;
    Ok(next)
}

/// The rtnetlink groups whose messages can change a FIB answer (`RTMGRP_*`, and group n as
/// bit n-1): links, neighbours, IPv4 and IPv6 addresses, routes and policy-routing rules,
/// IPv4 and IPv6 netconf (forwarding turned on or off), and nexthop objects.
const GROUPS: u32 =
    0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 1 << 18 | 1 << 23 | 1 << 24 | 1 << 31;

/// A netlink socket subscribed to the changes that can move a next hop, in the network
/// namespace of the thread that opens it.
pub struct Watch(OwnedFd);

impl Watch {
    pub fn open() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .context("opening a netlink socket for route changes")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))
            .context("subscribing to route, neighbour and link changes")?;
        Ok(Self(fd))
    }

    /// Reads every message waiting; true if there was any (or the kernel dropped some for
    /// want of room, which says as much). Never blocks.
    pub fn drain(&self) -> Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut changed = false;
        loop {
            match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Ok(changed),
                Ok(_) => changed = true,
                Err(nix::errno::Errno::EAGAIN) => return Ok(changed),
                Err(nix::errno::Errno::ENOBUFS) => changed = true,
                Err(e) => return Err(io::Error::from(e)).context("reading route changes"),
            }
        }
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
