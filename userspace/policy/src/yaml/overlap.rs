//! Which subnets of different owners (NSGs, NAT gateways) overlap, found through a
//! [`PrefixSet`] rather than by comparing every pair (100,000 subnets took 20 s that way).

use std::collections::HashMap;

use ipnet::IpNet;

use crate::prefix_set::PrefixSet;

/// A subnet by its owner's index and its own index in the owner's list.
pub(super) type At = (usize, usize);

/// For each subnet that overlaps (contains, or lies in) a subnet of an earlier owner, that
/// subnet and the first one of an earlier owner it overlaps, by owner and then list order.
/// One per subnet, so that the answer stays as small as the input.
pub(super) fn first_overlaps<'a>(owners: impl IntoIterator<Item = &'a [IpNet]>) -> Vec<(At, At)> {
    let subnets: Vec<(At, IpNet)> = (owners.into_iter().enumerate())
        .flat_map(|(owner, list)| {
            list.iter().enumerate().map(move |(i, s)| ((owner, i), s.trunc()))
        })
        .collect();
    let set = PrefixSet::new(subnets.iter().map(|(_, s)| s));
    // Subnet -> where it is written, in owner and list order (so the first is the least).
    let mut written: HashMap<IpNet, Vec<At>> = HashMap::new();
    for &(at, subnet) in &subnets {
        written.entry(subnet).or_default().push(at);
    }
    // Subnet -> the least subnet that lies in it and is longer.
    let mut within: HashMap<IpNet, At> = HashMap::new();
    for &(at, subnet) in &subnets {
        for outer in set.containing(&subnet).filter(|o| o.prefix_len() < subnet.prefix_len()) {
            within.entry(outer).and_modify(|least| *least = (*least).min(at)).or_insert(at);
        }
    }
    let mut found = Vec::new();
    for &(at, subnet) in &subnets {
        let first = (set.containing(&subnet).map(|outer| written[&outer][0]))
            .chain(within.get(&subnet).copied())
            .filter(|earlier| earlier.0 < at.0)
            .min();
        if let Some(earlier) = first {
            found.push((at, earlier));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Every pair compared, as the check did before.
    fn by_pairs(owners: &[Vec<IpNet>]) -> Vec<(At, At)> {
        let mut found = Vec::new();
        for (o, list) in owners.iter().enumerate() {
            for (i, b) in list.iter().enumerate() {
                let first = (owners[..o].iter().enumerate())
                    .flat_map(|(p, l)| l.iter().enumerate().map(move |(j, a)| ((p, j), a)))
                    .find(|(_, a)| a.contains(b) || b.contains(*a));
                if let Some((earlier, _)) = first {
                    found.push(((o, i), earlier));
                }
            }
        }
        found
    }

    fn check(owners: &[Vec<IpNet>]) {
        let found = first_overlaps(owners.iter().map(Vec::as_slice));
        assert_eq!(found, by_pairs(owners), "{owners:?}");
    }

    #[test]
    fn overlaps_as_every_pair_compared_finds_them() {
        check(&[nets(&["10.0.0.0/8", "192.0.2.0/24"]), nets(&["10.1.0.0/16", "198.51.100.0/24"])]);
        // The later one contains the earlier ones; the least earlier one is named.
        check(&[
            nets(&["10.1.2.0/24"]),
            nets(&["10.1.0.0/16", "10.1.3.0/24"]),
            nets(&["10.0.0.0/8"]),
        ]);
        // The same subnet twice in one owner is not an overlap; in two owners it is.
        check(&[nets(&["10.0.0.0/24", "10.0.0.0/24"]), nets(&["10.0.0.0/24"])]);
        // Families apart, /0 and host routes.
        check(&[nets(&["::/0"]), nets(&["0.0.0.0/0", "2001:db8::1/128"]), nets(&["10.0.0.1/32"])]);
        check(&[nets(&["2001:db8::/32"]), nets(&["2001:db8:1::/48", "2001:db9::/32"])]);
        check(&[vec![], nets(&["10.0.0.0/8"]), vec![]]);
    }

    #[test]
    fn random_subnets_agree_with_every_pair_compared() {
        // A small deterministic generator: prefixes in a narrow space, so they overlap often.
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..300 {
            let owners: Vec<Vec<IpNet>> = (0..1 + next(4))
                .map(|_| {
                    (0..next(6))
                        .map(|_| {
                            let addr =
                                std::net::Ipv4Addr::from(0x0a00_0000 | ((next(256) as u32) << 16));
                            IpNet::new_assert(addr.into(), 8 + next(9) as u8).trunc()
                        })
                        .collect()
                })
                .collect();
            check(&owners);
        }
    }
}
