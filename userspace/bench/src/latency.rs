//! The floor under a lookup in a table far larger than the caches: how long one load takes
//! whose address the load before it gave (as a hash lookup reads its bucket, then the entry
//! the bucket points to), from random cache lines of a buffer as large as the table, in
//! 4-KiB pages as the kernel's vmalloc gives a BPF map's memory.

use std::time::Instant;

use anyhow::{Result, bail};

const LINE: usize = 64;
const STEPS: usize = 2_000_000;

/// ns per dependent load from random cache lines of `bytes` of memory (median of `runs`).
pub fn dependent_load_ns(bytes: usize, runs: usize) -> Result<f64> {
    let lines = bytes / LINE;
    if lines < 2 {
        bail!("{bytes} bytes hold no chain of cache lines");
    }
    // SAFETY: a private anonymous mapping, unmapped below; nothing else refers to it.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if buf == libc::MAP_FAILED {
        bail!("mmap of {bytes} bytes: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the mapping above, `bytes` long.
    unsafe { libc::madvise(buf, bytes, libc::MADV_NOHUGEPAGE) };
    let base = buf.cast::<u8>();
    // One cycle through every line in random order (Sattolo's shuffle): each line holds the
    // address of the next.
    let mut order: Vec<u32> = (0..lines as u32).collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in (1..lines).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % i as u64) as usize);
    }
    for w in 0..lines {
        let (from, to) = (order[w] as usize, order[(w + 1) % lines] as usize);
        // SAFETY: both offsets are lines inside the mapping, aligned for a pointer.
        unsafe { base.add(from * LINE).cast::<*const u8>().write(base.add(to * LINE)) };
    }
    let mut samples = Vec::new();
    let mut p = base.cast_const();
    for _ in 0..runs {
        let t = Instant::now();
        for _ in 0..STEPS {
            // SAFETY: every line holds the address of a line of the mapping.
            p = unsafe { p.cast::<*const u8>().read_volatile() };
        }
        samples.push(t.elapsed().as_nanos() as f64 / STEPS as f64);
    }
    std::hint::black_box(p);
    // SAFETY: the mapping above, no longer used.
    unsafe { libc::munmap(buf, bytes) };
    Ok(crate::common::median(&samples))
}
