//! Maps read and written in batches (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`), which
//! aya 0.14 lacks: one bpf() call per few thousand entries, where aya's iterator makes one
//! per key plus one per value. A flow table of a million entries is walked by the agent's
//! sweep, by `xdpgate stats` and by every scrape.
//!
//! The kernel walks a hash map's buckets in order and returns whole buckets, so an entry is
//! seen at most once even while the dataplane adds and removes entries (unlike a key walk,
//! which starts again from the top when the key it stands on is removed); entries added or
//! removed during the walk may or may not be seen.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::{Context, Result, bail};
use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap as _, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call. The kernel copies whole buckets, and answers ENOSPC when one
/// bucket holds more than that; then the call is repeated with room for more.
const BATCH: usize = 4096;

/// Calls `f` with every entry of `map`, a batch at a time. `f` may change the map (remove
/// entries, including ones not yet seen: they are then not seen).
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(&K, &V) -> Result<()>,
) -> Result<()> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut room = BATCH;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The kernel's position between calls: a bucket index for hash maps (u32), kept in a
    // u64 as libbpf does.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        keys.resize(room, MaybeUninit::uninit());
        values.resize(room, MaybeUninit::uninit());
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // The batch member is the one BPF_MAP_LOOKUP_BATCH reads.
        attr.batch.in_batch = if first { 0 } else { &raw const position as u64 };
        attr.batch.out_batch = &raw mut next as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = room as u32;
        attr.batch.map_fd = fd as u32;
        // SAFETY: attr is a valid bpf_attr for the command; the buffers hold `room` keys and
        // values of the map's key and value sizes (aya checked them when `map` was made), and
        // they and the batch positions outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &mut attr,
                size_of::<bpf_attr>(),
            )
        };
        let error = (ret < 0).then(io::Error::last_os_error);
        if error.as_ref().and_then(io::Error::raw_os_error) == Some(libc::ENOSPC) {
            // One bucket holds more than `room` entries (nothing was copied).
            room *= 2;
            continue;
        }
        // SAFETY: as above: the kernel wrote `count` back.
        let count = unsafe { attr.batch.count } as usize;
        if let Some(e) = &error
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(aya::sys::SyscallError {
                call: "BPF_MAP_LOOKUP_BATCH",
                io_error: io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0)),
            })
            .context("reading a map in batches (Linux 5.6 or later)");
        }
        for i in 0..count.min(room) {
            // SAFETY: the kernel filled the first `count` keys and values, and any bytes are
            // a valid K and V (Pod).
            let (k, v) = unsafe { (keys[i].assume_init_ref(), values[i].assume_init_ref()) };
            f(k, v)?;
        }
        // ENOENT: the walk is done (the last batch may still have held entries). A batch
        // without entries that is not the end would never end.
        if error.is_some() || count == 0 {
            return Ok(());
        }
        position = next;
        first = false;
    }
}

/// Entries in `map`.
pub fn count<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<u64> {
    let mut n = 0;
    for_each(map, |_, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// Writes `values` into `array` from index `first` on in one `BPF_MAP_UPDATE_BATCH` call
/// (Linux 5.6): a port field's 16,385 entries and its classes, or a Maglev table's 16,381
/// slots, one `bpf()` call each took tens of milliseconds (an apply of 127 load-balancing
/// rules about 3 s).
pub fn update_batch<V: Pod>(array: &Array<MapData, V>, first: u32, values: &[V]) -> Result<()> {
    let keys: Vec<u32> = (first..first + values.len() as u32).collect();
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = values.len() as u32;
    attr.batch.map_fd = array.map().fd().as_fd().as_raw_fd() as u32;
    // SAFETY: attr is a valid bpf_attr for the command; the buffers hold `count` keys and
    // values of the map's key and value sizes (aya checked them when `array` was made), and
    // outlive the call, which only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            &mut attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(aya::sys::SyscallError {
            call: "BPF_MAP_UPDATE_BATCH",
            io_error: std::io::Error::last_os_error(),
        }
        .into());
    }
    // SAFETY: the kernel wrote back how many it updated.
    let done = unsafe { attr.batch.count } as usize;
    if done != values.len() {
        bail!("BPF_MAP_UPDATE_BATCH updated {done} of {} entries", values.len());
    }
    Ok(())
}
