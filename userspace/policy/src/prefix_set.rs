//! A set of address prefixes that answers "which members contain this prefix" with one hash
//! lookup per prefix length among its members, and "which lie within it" with a binary
//! search of its members in order, not a comparison with each member: the policy checks and
//! the compiler ask it of every subnet, and 100,000 subnets compared pairwise took seconds.

use std::collections::HashSet;

use ipnet::IpNet;

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

    /// The members that lie within `net` or are it, in order. (A member after `net` in the
    /// order and not within it starts past its last address, so they are one run.)
    pub fn within(&self, net: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
        let net = net.trunc();
        let start = self.sorted.partition_point(|m| *m < net);
        self.sorted[start..].iter().copied().take_while(move |m| net.contains(m))
    }

    /// The members, in order.
    pub fn members(&self) -> &[IpNet] {
        &self.sorted
    }

    /// Whether every member lies within a prefix of `nets` written as `/0` (`*`): then
    /// narrowing `nets` gives all the members.
    pub fn all_within(&self, nets: &[IpNet]) -> bool {
        [(false, 0), (true, 1)].iter().all(|&(v6, f)| {
            !self.lengths[f].iter().any(|&l| l)
                || nets.iter().any(|n| n.prefix_len() == 0 && matches!(n, IpNet::V6(_)) == v6)
        })
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
}
