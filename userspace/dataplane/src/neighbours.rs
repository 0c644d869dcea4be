//! Neighbour entries the dataplane needs and cannot make: `bpf_fib_lookup` reads the
//! neighbour table, never fills it. A packet the stack takes instead resolves its next hop
//! itself; a floating-IP or encapsulated packet cannot go there (its destination is a
//! frontend the stack has no route to, or its source this node's own), so the dataplane
//! drops it and records the next hop it found missing (`NEIGHBOURS_WANTED`), which the
//! agent resolves here each tick: the client's next try gets through.

use std::net::IpAddr;

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use xdpgate_common::{flow::NeighbourKey, maps::NEIGHBOURS_WANTED};

use crate::{PinDir, fib, flows};

/// Resolves every next hop the dataplane found missing, and forgets it. Returns how many;
/// 0 for a dataplane of a build from before the map.
pub fn resolve_wanted(pins: &PinDir) -> Result<usize> {
    if !pins.map(NEIGHBOURS_WANTED).exists() {
        return Ok(0);
    }
    let mut map: HashMap<MapData, NeighbourKey, u64> =
        pins.open_map(NEIGHBOURS_WANTED)?.try_into()?;
    let wanted: Vec<NeighbourKey> = map.keys().filter_map(Result::ok).collect();
    let mut errors = Vec::new();
    for key in &wanted {
        // Forgotten first: a packet wanting it again after the solicitation asks again.
        let _ = map.remove(key);
        let addr: IpAddr = flows::addr(&key.addr, key.family);
        if let Err(e) = fib::resolve(key.ifindex, addr) {
            errors.push(format!("{e:#}"));
        }
    }
    match errors.first() {
        Some(first) => anyhow::bail!("{first} ({} of {} failed)", errors.len(), wanted.len()),
        None => Ok(wanted.len()),
    }
}
