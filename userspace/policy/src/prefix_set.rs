//! A set of address prefixes that answers "which members contain this prefix" with one hash
//! lookup per prefix length among its members, and "which lie within it" with a binary
//! search of its members in order, not a comparison with each member: the policy checks and
//! the compiler ask it of every subnet, and 100,000 subnets compared pairwise took seconds.

use std::{collections::HashSet, ops::Range};

use ipnet::IpNet;

/// [`PrefixSet::narrowed`]'s answer.
pub struct Narrowed {
    /// Ranges of [`PrefixSet::members`], apart.
    pub runs: Vec<Range<usize>>,
    /// Prefixes inside a member and not members, sorted, apart.
    pub inside: Vec<IpNet>,
}

pub struct PrefixSet {
    members: HashSet<IpNet>,
    /// The members by family, address and length: those within a prefix are a run.
    sorted: Vec<IpNet>,
    /// The prefix lengths among the members, by family (`[0]` IPv4, `[1]` IPv6).
    lengths: [[bool; 129]; 2],
}

impl PrefixSet {
    /// The set of `nets`, host bits cleared.
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut set =
            Self { members: HashSet::new(), sorted: Vec::new(), lengths: [[false; 129]; 2] };
        for net in nets {
            let net = net.trunc();
            set.lengths[family(&net)][usize::from(net.prefix_len())] = true;
            if set.members.insert(net) {
                set.sorted.push(net);
            }
        }
        set.sorted.sort_unstable();
        set
    }

    /// The members that contain `net` or are it, shortest first.
    pub fn containing(&self, net: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        let (lengths, net) = (&self.lengths[family(net)], *net);
        (0..=net.prefix_len())
            .filter(move |&len| lengths[usize::from(len)])
            .map(move |len| IpNet::new_assert(net.addr(), len).trunc())
            .filter(|outer| self.members.contains(outer))
    }

    /// Whether a member contains `net` or is it.
    pub fn covers(&self, net: &IpNet) -> bool {
        self.containing(net).next().is_some()
    }

    /// The members that lie within `net` or are it, in order ([`Self::run_within`]).
    pub fn within(&self, net: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        self.sorted[self.run_within(&net.trunc())].iter().copied()
    }

    /// The members, in order.
    pub fn members(&self) -> &[IpNet] {
        &self.sorted
    }

    /// What narrowing `nets` gives ([`Self::narrow`]), in two parts: runs of the members in
    /// order (those within a prefix of `nets`; runs apart), and the prefixes of `nets` that
    /// lie inside a member without being one, less those within another prefix of `nets`
    /// (what narrowing gives beyond these lies within one of them). A compiler can then give
    /// the members of all rules' runs their bits in one walk, not entry by entry per rule and
    /// member (3,990 rules over 60,000 subnets took from 37 s to minutes that way). Binary
    /// searches, not a walk of the members.
    pub fn narrowed(&self, nets: &[IpNet]) -> Narrowed {
        let mut outer: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
        outer.sort_unstable();
        // Sorted, a prefix comes before those within it: keep the outermost of each nest,
        // whose runs of members are then apart.
        outer.dedup_by(|later, kept| kept.contains(&*later));
        let runs = outer.iter().map(|n| self.run_within(n)).filter(|r| !r.is_empty()).collect();
        // Of the outermost only: one within another prefix of `nets` is within what that one
        // gives (a member it lies in, or a prefix inside one), whose bits a longest match
        // finds over it.
        let inside =
            outer.into_iter().filter(|n| !self.members.contains(n) && self.covers(n)).collect();
        Narrowed { runs, inside }
    }

    /// Where in [`Self::members`] those within `net` (host bits clear) or equal to it are:
    /// one run, from `net` to its last address. (A member in between and not within `net`
    /// would be a shorter prefix at an address inside it, which no aligned prefix is.)
    fn run_within(&self, net: &IpNet) -> Range<usize> {
        let start = self.sorted.partition_point(|m| m < net);
        let last = IpNet::new_assert(net.broadcast(), net.max_prefix_len());
        start..self.sorted.partition_point(|m| *m <= last)
    }

    /// The prefixes of `nets` narrowed to the members: where one contains the other, the
    /// longer. Sorted, each once.
    pub fn narrow(&self, nets: &[IpNet]) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = (nets.iter().filter(|n| self.covers(n)).copied())
            .chain(nets.iter().flat_map(|n| self.within(n)))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn family(net: &IpNet) -> usize {
    usize::from(matches!(net, IpNet::V6(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_containing_a_prefix() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "::/0", "192.0.2.9/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let set = PrefixSet::new(&nets);
        let containing = |s: &str| -> Vec<String> {
            set.containing(&s.parse().unwrap()).map(|n| n.to_string()).collect()
        };
        assert_eq!(containing("10.1.2.3/32"), ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32"]);
        assert_eq!(containing("10.1.0.0/16"), ["10.0.0.0/8", "10.1.0.0/16"]);
        assert_eq!(containing("10.0.0.0/7"), Vec::<String>::new());
        assert_eq!(containing("2001:db8::/32"), ["::/0"]);
        // Host bits are cleared, in members and in questions.
        assert_eq!(containing("192.0.2.1/32"), ["192.0.2.0/24"]);
        assert!(set.covers(&"192.0.2.200/25".parse().unwrap()));
        assert!(!set.covers(&"0.0.0.0/0".parse().unwrap()));
        let within = |s: &str| -> Vec<String> {
            set.within(&s.parse().unwrap()).map(|n| n.to_string()).collect()
        };
        assert_eq!(
            within("0.0.0.0/0"),
            ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.0.2.0/24"]
        );
        assert_eq!(within("10.1.0.0/16"), ["10.1.0.0/16", "10.1.2.3/32"]);
        assert_eq!(within("10.1.2.0/24"), ["10.1.2.3/32"]);
        assert_eq!(within("10.2.0.0/16"), Vec::<String>::new());
        assert_eq!(within("2001:db8::/32"), Vec::<String>::new());
        assert_eq!(within("::/0"), ["::/0"]);
    }

    /// A random prefix from a small space, so that members and sides nest and meet.
    fn prefix(next: &mut dyn FnMut(u64) -> u64) -> IpNet {
        if next(6) == 0 {
            let addr = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(next(4)) << 88);
            return IpNet::new_assert(addr.into(), [0, 32, 36, 40][next(4) as usize]).trunc();
        }
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (next(16) as u32) << 12);
        IpNet::new_assert(addr.into(), [0, 8, 12, 14, 16, 18, 20, 32][next(8) as usize]).trunc()
    }

    #[test]
    fn narrowed_is_narrowing_in_two_parts() {
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d);
        let (mut runs, mut inside) = (0, 0);
        for _ in 0..20_000 {
            let members: Vec<IpNet> = (0..1 + next(6)).map(|_| prefix(&mut next)).collect();
            let set = PrefixSet::new(&members);
            let side: Vec<IpNet> = (0..1 + next(4)).map(|_| prefix(&mut next)).collect();
            let n = set.narrowed(&side);
            let mut parts: Vec<IpNet> = (n.runs.iter())
                .flat_map(|r| set.members()[r.clone()].iter().copied())
                .chain(n.inside.iter().copied())
                .collect();
            let all = parts.len();
            parts.sort_unstable();
            parts.dedup();
            assert_eq!(parts.len(), all, "runs and inside apart: {members:?} {side:?}");
            // What narrowing gives, less prefixes within one of these (which a longest
            // match answers with that one's bits).
            let narrow = set.narrow(&side);
            assert!(parts.iter().all(|p| narrow.contains(p)), "{members:?} {side:?}");
            for n in narrow.iter().filter(|n| !parts.contains(n)) {
                assert!(parts.iter().any(|p| p.contains(n)), "{n} {members:?} {side:?}");
            }
            runs += usize::from(!n.runs.is_empty());
            inside += usize::from(!n.inside.is_empty());
        }
        // Both parts are common enough to be tested.
        assert!(runs > 2_000 && inside > 2_000, "{runs} {inside}");
    }
}
