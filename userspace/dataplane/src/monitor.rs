//! The observers' side of the dataplane's events (`xdpgate observe`): the `MONITOR` ring,
//! the lease that makes the dataplane write it, and what its rate limit held back.

use std::time::Duration;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use xdpgate_common::{
    events::{MONITOR_HELD_BACK, MONITOR_LEASE_NS, MONITOR_LOST},
    maps::{MONITOR, MONITOR_LEASE, MONITOR_STATS},
};

use crate::{
    PinDir,
    lease::{Held, Lease},
    monotonic_ns,
    state::Tool,
};

/// The maps of a dataplane loaded before `observe` existed are missing until `upgrade`.
fn open(pins: &PinDir, name: &str) -> Result<aya::maps::Map> {
    pins.open_map(name).with_context(|| {
        format!(
            "the dataplane at {} has no {name} map: its programs predate `observe`; run \
             `xdpgate upgrade`",
            pins.path().display()
        )
    })
}

/// The observers' lease: while it runs, the dataplane writes `MONITOR`.
struct MonitorLease {
    lease: Array<MapData, u64>,
    /// Read away as the lease begins (then closed).
    ring: Option<RingBuf<MapData>>,
}

impl Held for MonitorLease {
    /// Events in the ring before the lease (an earlier observer's) are not this one's:
    /// read away under the observers' lock, before the lease starts the events, so that a
    /// packet sent once the lease shows is never read away with them.
    fn begin(&mut self) -> Result<()> {
        if let Some(mut ring) = self.ring.take() {
            while ring.next().is_some() {}
        }
        Ok(())
    }

    fn until(&self) -> Result<u64> {
        Ok(self.lease.get(&0, 0)?)
    }

    fn renew(&mut self, until: u64) -> Result<()> {
        Ok(self.lease.set(0, until, 0)?)
    }

    fn release(&mut self) {
        let _ = self.lease.set(0, 0, 0);
    }
}

/// Takes the observers' lease (one observer at a time) and starts the events, the ring
/// empty; dropped, it ends at once; its holder killed, it runs out within
/// `MONITOR_LEASE_NS`.
pub fn take(pins: &PinDir) -> Result<Lease> {
    let held =
        MonitorLease { lease: open(pins, MONITOR_LEASE)?.try_into()?, ring: Some(ring(pins)?) };
    Lease::take(pins, Tool::Observe, held, Duration::from_nanos(MONITOR_LEASE_NS), RENEW)
}

/// How often the lease is renewed (a third of its length: two renewals may be late).
const RENEW: Duration = Duration::from_nanos(MONITOR_LEASE_NS / 3);

/// The observers' ring.
pub fn ring(pins: &PinDir) -> Result<RingBuf<MapData>> {
    Ok(open(pins, MONITOR)?.try_into()?)
}

/// Whether an observer's lease runs now (as the dataplane sees it).
pub fn observed(pins: &PinDir) -> Result<bool> {
    let map: Array<MapData, u64> = open(pins, MONITOR_LEASE)?.try_into()?;
    Ok(map.get(&0, 0)? > monotonic_ns())
}

/// Drop events the rate limit held back and events lost to a full ring, since the
/// dataplane was loaded (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub held_back: u64,
    pub lost: u64,
}

pub fn dropped(pins: &PinDir) -> Result<Dropped> {
    let stats: PerCpuArray<MapData, u64> = open(pins, MONITOR_STATS)?.try_into()?;
    let sum = |i: u32| -> Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
    Ok(Dropped { held_back: sum(MONITOR_HELD_BACK)?, lost: sum(MONITOR_LOST)? })
}
