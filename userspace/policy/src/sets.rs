//! Named address sets changed at run time (`xdpgate set add|del`, nftables' `add element`):
//! the elements added to and removed from each set of the policy file, kept beside the
//! running policy and laid over the file's elements whenever the policy is loaded, so a
//! later apply or reload keeps them.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What runs differs from the file: per set, the elements added and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetChanges(pub BTreeMap<String, Delta>);

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub added: BTreeSet<IpNet>,
    pub removed: BTreeSet<IpNet>,
}

impl SetChanges {
    /// The elements of set `name` whose file lists `file`: added ones in, removed ones out.
    pub fn effective(&self, name: &str, file: &[IpNet]) -> Vec<IpNet> {
        let mut out: BTreeSet<IpNet> = file.iter().copied().collect();
        if let Some(d) = self.0.get(name) {
            out.extend(&d.added);
            out.retain(|n| !d.removed.contains(n));
        }
        out.into_iter().collect()
    }

    /// Adds `nets` to set `name` (an element already there stays, once).
    pub fn add(&mut self, name: &str, nets: &[IpNet]) {
        let d = self.0.entry(name.to_owned()).or_default();
        for n in nets {
            d.removed.remove(n);
            d.added.insert(*n);
        }
    }

    /// An error naming those of `nets` that are not elements of set `name` (whose file
    /// lists `file`) as written: `del` takes out elements, it does not cut a prefix out of
    /// one.
    pub fn check_elements(&self, name: &str, nets: &[IpNet], file: &[IpNet]) -> Result<()> {
        let current = self.effective(name, file);
        let missing: Vec<String> =
            nets.iter().filter(|n| !current.contains(n)).map(IpNet::to_string).collect();
        if !missing.is_empty() {
            bail!("not in set {name}: {} (nothing was changed)", missing.join(", "));
        }
        Ok(())
    }

    /// Removes `nets` from set `name` (see [`Self::check_elements`]).
    pub fn del(&mut self, name: &str, nets: &[IpNet]) {
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
    pub fn pruned(&self, file: &BTreeMap<String, Vec<IpNet>>) -> Self {
        let mut out = BTreeMap::new();
        for (name, d) in &self.0 {
            let Some(elements) = file.get(name) else { continue };
            let listed: BTreeSet<IpNet> = elements.iter().copied().collect();
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

    fn nets(list: &[&str]) -> Vec<IpNet> {
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

    #[test]
    fn pruning_keeps_only_what_differs_from_the_file() {
        let mut c = SetChanges::default();
        c.add("block", &nets(&["203.0.113.0/24", "198.51.100.7/32"]));
        c.del("block", &nets(&["192.0.2.0/24"]));
        c.add("gone", &nets(&["203.0.113.9/32"]));
        let file: BTreeMap<String, Vec<IpNet>> =
            [("block".to_owned(), nets(&["192.0.2.0/24", "198.51.100.7/32"]))].into();
        let pruned = c.pruned(&file);
        assert_eq!(pruned.effective("block", &file["block"]), c.effective("block", &file["block"]));
        let mut want = SetChanges::default();
        want.add("block", &nets(&["203.0.113.0/24"]));
        want.del("block", &nets(&["192.0.2.0/24"]));
        assert_eq!(pruned, want);
        // The file no longer lists the removed element: nothing is left to remove.
        let file: BTreeMap<String, Vec<IpNet>> = [("block".to_owned(), Vec::new())].into();
        let mut want = SetChanges::default();
        want.add("block", &nets(&["203.0.113.0/24", "198.51.100.7/32"]));
        assert_eq!(c.pruned(&file), want);
        assert_eq!(c.pruned(&BTreeMap::new()), SetChanges::default());
    }
}
