//! Per-CPU counters that follow their rule or gateway across a reload: the values a new
//! index starts with are those of its old index, or zero for one that is new.

use anyhow::{Result, anyhow};
use aya::{
    Pod,
    maps::{MapData, PerCpuArray, PerCpuValues},
};

/// What index `old` of `map` holds on every CPU, or zeros when there is no old index.
pub fn carried<V: Pod + Default>(
    map: &PerCpuArray<MapData, V>,
    old: Option<u32>,
) -> Result<PerCpuValues<V>> {
    match old {
        Some(old) => Ok(PerCpuValues::try_from(map.get(&old, 0)?.to_vec())?),
        None => zeros(),
    }
}

/// Zero on every CPU.
pub fn zeros<V: Pod + Default>() -> Result<PerCpuValues<V>> {
    Ok(PerCpuValues::try_from(vec![V::default(); nr_cpus()?])?)
}

/// Sets each index `i` of `map` to what index `from[i]` held (zero for `None`), every value
/// read before any is written (so indexes may swap). Indexes that stay put are not written,
/// so a packet counted at one meanwhile is not lost.
pub fn remap<V: Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    from: &[Option<u32>],
) -> Result<()> {
    let mut moves = Vec::new();
    for (i, &old) in from.iter().enumerate() {
        if old != Some(i as u32) {
            moves.push((i as u32, carried(map, old)?));
        }
    }
    for (i, values) in moves {
        map.set(i, values, 0)?;
    }
    Ok(())
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(m, e)| anyhow!("{m}: {e}"))
}
