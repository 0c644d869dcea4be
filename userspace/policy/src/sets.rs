//! Named address sets changed at run time (`xdpgate set add|del`, nftables' `add element`):
//! the elements added to and removed from each set of the policy file, kept beside the
//! running policy and laid over the file's elements whenever the policy is loaded, so a
//! later apply or reload keeps them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use anyhow::{Result, bail};
use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use serde::{Deserialize, Serialize};

/// An element of a set as written: an address, a prefix or a range of addresses, kept
/// as its first and last address. A range is one element, never the prefixes that cover
/// it: `set del` takes out a whole element, not a piece of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    first: IpAddr,
    last: IpAddr,
}

impl Element {
    /// `first` to `last`; `None` unless both are of one family, in order.
    pub fn range(first: IpAddr, last: IpAddr) -> Option<Self> {
        (first.is_ipv4() == last.is_ipv4() && first <= last).then_some(Self { first, last })
    }

    /// The fewest prefixes covering exactly this element, what the tables hold.
    pub fn prefixes(&self) -> Vec<IpNet> {
        match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect(),
            (IpAddr::V6(a), IpAddr::V6(b)) => Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect(),
            _ => unreachable!("Element::range keeps one family"),
        }
    }

    /// An address, prefix or range; `None` if `text` is none of them (a name).
    pub(crate) fn literal(text: &str) -> Option<Result<Element, String>> {
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Some(Ok(IpNet::from(addr).into()));
        }
        if text.contains('/') {
            return Some(parse_prefix(text).map(Element::from));
        }
        if let Some((lo, hi)) = text.split_once('-')
            && (lo.trim().parse::<IpAddr>().is_ok() || hi.trim().parse::<IpAddr>().is_ok())
        {
            return Some(parse_range(text, lo.trim(), hi.trim()));
        }
        // Names start with a letter; this was meant as an address.
        if text.starts_with(|c: char| c.is_ascii_digit()) || text.contains(':') {
            return Some(Err(format!("invalid address \"{text}\"")));
        }
        None
    }
}

impl From<IpNet> for Element {
    fn from(net: IpNet) -> Self {
        Self { first: net.network(), last: net.broadcast() }
    }
}

/// A prefix where the element is one (an address as `/32` or `/128`), else `first-last`.
impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefixes()[..] {
            [net] => net.fmt(f),
            _ => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

impl std::str::FromStr for Element {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::literal(text)
            .unwrap_or_else(|| Err(format!("\"{text}\" is not an address, prefix or range")))
    }
}

/// A prefix in CIDR notation. Host bits are rejected rather than truncated: they are
/// usually a typo in the address or the length.
pub(crate) fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text.parse().map_err(|_| format!("invalid prefix \"{text}\""))?;
    if net != net.trunc() {
        return Err(format!(
            "invalid prefix \"{text}\": host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `lo-hi`, the addresses from `lo` to `hi`.
fn parse_range(text: &str, lo: &str, hi: &str) -> Result<Element, String> {
    let parse = |s: &str| {
        s.parse::<IpAddr>().map_err(|_| format!("invalid range \"{text}\": bad address \"{s}\""))
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    Element::range(lo, hi).ok_or_else(|| {
        if lo.is_ipv4() == hi.is_ipv4() {
            format!("invalid range \"{text}\": start is after end")
        } else {
            format!("invalid range \"{text}\": addresses of different families")
        }
    })
}

impl Serialize for Element {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// As written, so that `sets.json` files saved before ranges were kept whole (each a list
/// of prefixes) still read: each prefix an element.
impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What runs differs from the file: per set, the elements added and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetChanges(pub BTreeMap<String, Delta>);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub added: BTreeSet<Element>,
    pub removed: BTreeSet<Element>,
}

impl SetChanges {
    /// The elements of set `name` whose file lists `file`: added ones in, removed ones out.
    pub fn effective(&self, name: &str, file: &[Element]) -> Vec<Element> {
        let mut out: BTreeSet<Element> = file.iter().copied().collect();
        if let Some(d) = self.0.get(name) {
            out.extend(&d.added);
            out.retain(|n| !d.removed.contains(n));
        }
        out.into_iter().collect()
    }

    /// Adds `nets` to set `name` (an element already there stays, once).
    pub fn add(&mut self, name: &str, nets: &[Element]) {
        let d = self.0.entry(name.to_owned()).or_default();
        for n in nets {
            d.removed.remove(n);
            d.added.insert(*n);
        }
    }

    /// An error naming those of `nets` that are not elements of set `name` (whose file
    /// lists `file`) as written: `del` takes out elements, it does not cut a prefix out of
    /// one.
    pub fn check_elements(&self, name: &str, nets: &[Element], file: &[Element]) -> Result<()> {
        let current = self.effective(name, file);
        let missing: Vec<String> =
            nets.iter().filter(|n| !current.contains(n)).map(Element::to_string).collect();
        if !missing.is_empty() {
            bail!("not in set {name}: {} (nothing was changed)", missing.join(", "));
        }
        Ok(())
    }

    /// Removes `nets` from set `name` (see [`Self::check_elements`]).
    pub fn del(&mut self, name: &str, nets: &[Element]) {
        let d = self.0.entry(name.to_owned()).or_default();
        for n in nets {
            if !d.added.remove(n) {
                d.removed.insert(*n);
            }
        }
    }

    /// Forgets the changes to set `name`: it holds the file's elements again.
    pub fn reset(&mut self, name: &str) {
        self.0.remove(name);
    }

    /// The changes that still mean something over a policy file whose sets are `file`:
    /// none for a set the file no longer declares, no added element the file now lists
    /// itself (the file has taken it over), no removed element the file no longer lists.
    /// What each set holds over that file is the same with either; kept after an apply
    /// instead of these, the old changes would come back with a set declared again, and a
    /// file element removed once would stay out when the file lists it again.
    pub fn pruned(&self, file: &BTreeMap<String, Vec<Element>>) -> Self {
        let mut out = BTreeMap::new();
        for (name, d) in &self.0 {
            let Some(elements) = file.get(name) else { continue };
            let listed: BTreeSet<Element> = elements.iter().copied().collect();
            let delta = Delta {
                added: d.added.difference(&listed).copied().collect(),
                removed: d.removed.intersection(&listed).copied().collect(),
            };
            if !delta.added.is_empty() || !delta.removed.is_empty() {
                out.insert(name.clone(), delta);
            }
        }
        Self(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Element> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn changes_lay_over_the_file_and_del_takes_only_elements() {
        let file = nets(&["192.0.2.0/24", "198.51.100.7/32"]);
        let mut c = SetChanges::default();
        c.add("block", &nets(&["203.0.113.0/24"]));
        assert_eq!(
            c.effective("block", &file),
            nets(&["192.0.2.0/24", "198.51.100.7/32", "203.0.113.0/24"])
        );
        let gone = nets(&["192.0.2.0/24", "203.0.113.0/24"]);
        c.check_elements("block", &gone, &file).unwrap();
        c.del("block", &gone);
        assert_eq!(c.effective("block", &file), nets(&["198.51.100.7/32"]));
        // A file element removed at run time stays out; added again, it is back.
        assert!(c.0["block"].removed.contains(&"192.0.2.0/24".parse().unwrap()));
        assert!(c.0["block"].added.is_empty());
        let err = c.check_elements("block", &nets(&["192.0.2.0/25"]), &file).unwrap_err();
        assert!(err.to_string().contains("not in set block: 192.0.2.0/25"), "{err}");
        c.add("block", &nets(&["192.0.2.0/24"]));
        assert_eq!(c.effective("block", &file), file);
        c.reset("block");
        assert_eq!(c, SetChanges::default());
    }

    /// A range is one element (seen failing: `del` of one of its prefixes took that piece
    /// out); written as the one prefix it may be, it is that prefix.
    #[test]
    fn a_range_is_one_element() {
        let file = nets(&["192.0.2.8-192.0.2.13", "2001:db8::-2001:db8::ff"]);
        assert_eq!(file[0].prefixes(), nets_of(&["192.0.2.8/30", "192.0.2.12/31"]));
        assert_eq!(file[0].to_string(), "192.0.2.8-192.0.2.13");
        assert_eq!(file[1].to_string(), "2001:db8::/120");
        let mut c = SetChanges::default();
        let err = c.check_elements("block", &nets(&["192.0.2.8/30"]), &file).unwrap_err();
        assert!(err.to_string().contains("not in set block: 192.0.2.8/30"), "{err}");
        let whole = nets(&["192.0.2.8-192.0.2.13", "2001:db8::/120"]);
        c.check_elements("block", &whole, &file).unwrap();
        c.del("block", &whole);
        assert!(c.effective("block", &file).is_empty());
        // As JSON (`sets.json`): as written, and prefixes saved before still read.
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"192.0.2.8-192.0.2.13\""), "{json}");
        assert_eq!(serde_json::from_str::<SetChanges>(&json).unwrap(), c);
        let old = r#"{"block":{"added":["198.51.100.0/31","198.51.100.2/32"],"removed":[]}}"#;
        let old: SetChanges = serde_json::from_str(old).unwrap();
        assert_eq!(old.effective("block", &[]), nets(&["198.51.100.0/31", "198.51.100.2"]));
        let host_bits = r#"{"b":{"added":["1.2.3.4/8"],"removed":[]}}"#;
        assert!(serde_json::from_str::<SetChanges>(host_bits).is_err());
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(Element::range(addr("192.0.2.9"), addr("192.0.2.8")), None);
        assert_eq!(Element::range(addr("192.0.2.9"), addr("::1")), None);
    }

    fn nets_of(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn pruning_keeps_only_what_differs_from_the_file() {
        let mut c = SetChanges::default();
        c.add("block", &nets(&["203.0.113.0/24", "198.51.100.7/32"]));
        c.del("block", &nets(&["192.0.2.0/24"]));
        c.add("gone", &nets(&["203.0.113.9/32"]));
        let file: BTreeMap<String, Vec<Element>> =
            [("block".to_owned(), nets(&["192.0.2.0/24", "198.51.100.7/32"]))].into();
        let pruned = c.pruned(&file);
        assert_eq!(pruned.effective("block", &file["block"]), c.effective("block", &file["block"]));
        let mut want = SetChanges::default();
        want.add("block", &nets(&["203.0.113.0/24"]));
        want.del("block", &nets(&["192.0.2.0/24"]));
        assert_eq!(pruned, want);
        // The file no longer lists the removed element: nothing is left to remove.
        let file: BTreeMap<String, Vec<Element>> = [("block".to_owned(), Vec::new())].into();
        let mut want = SetChanges::default();
        want.add("block", &nets(&["203.0.113.0/24", "198.51.100.7/32"]));
        assert_eq!(c.pruned(&file), want);
        assert_eq!(c.pruned(&BTreeMap::new()), SetChanges::default());
    }
}
