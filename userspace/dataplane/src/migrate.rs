//! Carrying the flow tables over to a build whose `FlowValue` has another layout. The
//! tables' pin names carry the layout's version (`FLOWS_V2`), so the new build pins its own
//! tables beside the old ones, which the old programs go on using until they are replaced:
//! `upgrade` copies the flows over, swaps the programs, copies what the old programs added
//! meanwhile, and then unpins the old tables. Every step can be repeated, so an upgrade
//! stopped at any point is finished by running it again.

use anyhow::{Context, Result};
use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use xdpgate_common::{
    flow::{FlowKey, FlowValue, NextHop},
    maps::{EMBRYOS, EMBRYOS_V1, FLOWS, FLOWS_V1},
};

use crate::{PinDir, table};

/// The tables of an earlier layout and the tables that replace them.
const TABLES: [(&str, &str); 2] = [(FLOWS_V1, FLOWS), (EMBRYOS_V1, EMBRYOS)];

/// `FlowValue` before the next-hop cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlowValueV1 {
    generation: u64,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
    rules: [u16; 2],
    direction: u8,
    reply: u8,
    tcp: u8,
    nat: u8,
    nat_addr: [u32; 4],
    nat_port: u16,
    idle_s: u16,
    service: u32,
    backend: u32,
    ack: u32,
}

// SAFETY: plain data of integers, without padding (72 bytes, as the kernel holds it).
unsafe impl Pod for FlowValueV1 {}

impl From<FlowValueV1> for FlowValue {
    fn from(v: FlowValueV1) -> Self {
        FlowValue {
            generation: v.generation,
            last_seen_ns: v.last_seen_ns,
            packets: v.packets,
            bytes: v.bytes,
            rules: v.rules,
            direction: v.direction,
            reply: v.reply,
            tcp: v.tcp,
            nat: v.nat,
            nat_addr: v.nat_addr,
            nat_port: v.nat_port,
            idle_s: v.idle_s,
            service: v.service,
            backend: v.backend,
            ack: v.ack,
            hop: NextHop::NONE,
        }
    }
}

/// Whether tables of an earlier layout are pinned under `pins`, to be carried over.
pub fn pending(pins: &PinDir) -> bool {
    TABLES.iter().any(|(old, _)| pins.map(old).exists())
}

/// Copies the entries of the earlier layout's tables that the new tables lack (entries the
/// new programs made since are newer, and kept). Returns how many were copied.
pub fn copy(pins: &PinDir) -> Result<u64> {
    let mut copied = 0;
    for (old, new) in TABLES {
        if !pins.map(old).exists() {
            continue;
        }
        let from: HashMap<MapData, FlowKey, FlowValueV1> = pins
            .open_map(old)?
            .try_into()
            .with_context(|| format!("{old}: not a flow table of the earlier layout"))?;
        let mut to: HashMap<MapData, FlowKey, FlowValue> = pins.open_map(new)?.try_into()?;
        let mut entries = Vec::new();
        table::for_each(&from, |k, v| {
            entries.push((*k, FlowValue::from(*v)));
            Ok(())
        })?;
        for (k, v) in entries {
            // BPF_NOEXIST: an entry already there is as new or newer. A full table (of the
            // same size, so only if flows came meanwhile) refuses the rest: they are decided
            // again on their next packet.
            if to.insert(k, v, u64::from(aya_obj::generated::BPF_NOEXIST)).is_ok() {
                copied += 1;
            }
        }
    }
    Ok(copied)
}

/// Unpins the earlier layout's tables; the kernel frees them once no program uses them.
pub fn finish(pins: &PinDir) -> Result<()> {
    for (old, _) in TABLES {
        let path = pins.map(old);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_layout_is_the_current_one_without_the_next_hop() {
        assert_eq!(size_of::<FlowValueV1>(), 72);
        assert_eq!(size_of::<FlowValue>(), 72 + size_of::<NextHop>());
    }
}
