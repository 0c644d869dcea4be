//! Answers "would this packet be allowed, and by which rule?" the way the dataplane's
//! classifier (`ebpf/src/nsg.rs`) does: per table, a longest-prefix match per field, the AND
//! of the five bitmaps, the lowest bit; the source's outbound layers (host, subnet), then the
//! destination's inbound layers (subnet, host); a layer's rule denies when `NSG_RULES` says
//! deny.
//!
//! [`decide`] is written once over [`NsgTables`], which both a compiled image ([`Compiled`])
//! and the kernel's pinned maps (`xdpgate_dataplane::verify::PinnedTables`) implement. So `verify-flow` answers from
//! the very tables packets use, and `--policy FILE` from the tables that file compiles to,
//! with the same code.

use std::net::IpAddr;

use anyhow::{Result, bail};
use xdpgate_common::nsg::{
    ACCESS_DENY, BITMAP_WORDS, FIELD_DPORT, FIELD_DST4, FIELD_DST6, FIELD_PROTO, FIELD_SPORT,
    FIELD_SRC4, FIELD_SRC6, RuleBitmap, proto_value, table_in_slot,
};

use crate::{
    Access, Direction, Layer,
    compile::{Compiled, FieldEntry, access_code, dir_index, layer_index, mask},
    reference::{self, Packet, RuleRef, Verdict},
};

/// The NSG tables of one policy slot, wherever they are kept. Tables are numbered within
/// the slot (`table_in_slot`).
pub trait NsgTables {
    /// Rules in table `t`; 0 when no NSG applies at that layer in that direction.
    fn rule_count(&self, t: u32) -> Result<u32>;
    /// The bitmap of the longest entry of `field` in table `t` covering the first `bits`
    /// bits of `value` (left-aligned bytes).
    fn lookup(&self, t: u32, field: u8, value: [u8; 16], bits: u8) -> Result<Option<RuleBitmap>>;
    /// The access code (`ACCESS_ALLOW`, `ACCESS_DENY`) of rule `bit` of table `t`.
    fn access(&self, t: u32, bit: u32) -> Result<u32>;
}

/// The rule that decided at one layer, as the dataplane knows it: a table and a bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Outbound: a layer of the source; inbound: a layer of the destination.
    pub direction: Direction,
    pub layer: Layer,
    /// Table within the slot (`table_in_slot(dir, layer)`).
    pub table: u32,
    /// Rule number in the table: its rank by priority.
    pub bit: u32,
    pub access: Access,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// One hit per layer that had a matching rule, in evaluation order; a deny ends it.
    pub decided_by: Vec<Hit>,
}

/// Decides `pkt` over `tables` exactly as the classifier does: the layers of
/// [`reference::PATH`], the source's outbound ones then the destination's inbound ones.
pub fn decide(tables: &impl NsgTables, pkt: &Packet) -> Result<Decision> {
    let mut decided_by = Vec::new();
    for (direction, layer) in reference::PATH {
        let t = table_in_slot(dir_index(direction), layer_index(layer));
        let count = tables.rule_count(t)?;
        if count == 0 {
            continue;
        }
        let Some(bit) = match_table(tables, t, count, pkt)? else { continue };
        // As in the kernel: only an explicit deny code denies.
        let access =
            if tables.access(t, bit)? == ACCESS_DENY { Access::Deny } else { Access::Allow };
        decided_by.push(Hit { direction, layer, table: t, bit, access });
        if access == Access::Deny {
            return Ok(Decision { allowed: false, decided_by });
        }
    }
    Ok(Decision { allowed: true, decided_by })
}

fn match_table(tables: &impl NsgTables, t: u32, count: u32, pkt: &Packet) -> Result<Option<u32>> {
    let (family, fs, fd, bits, src, dst) = match (pkt.src, pkt.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            (4, FIELD_SRC4, FIELD_DST4, 32, v4(s.octets()), v4(d.octets()))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => (6, FIELD_SRC6, FIELD_DST6, 128, s.octets(), d.octets()),
        _ => bail!("source and destination must be of the same address family"),
    };
    // Ports count only for TCP and UDP; other packets look up a port field's /0 entry.
    let port = |p: Option<u16>| match p {
        Some(p) if pkt.proto == 6 || pkt.proto == 17 => (port_value(p), 16),
        _ => ([0; 16], 0),
    };
    let (sp, sp_bits) = port(pkt.sport);
    let (dp, dp_bits) = port(pkt.dport);
    let mut proto = [0u8; 16];
    proto[..2].copy_from_slice(&proto_value(family, pkt.proto));
    let mut maps = Vec::with_capacity(5);
    for (field, value, bits) in [
        (fs, src, bits),
        (fd, dst, bits),
        (FIELD_SPORT, sp, sp_bits),
        (FIELD_DPORT, dp, dp_bits),
        (FIELD_PROTO, proto, 16),
    ] {
        match tables.lookup(t, field, value, bits)? {
            Some(b) => maps.push(b),
            None => return Ok(None),
        }
    }
    let words = (count.div_ceil(64) as usize).min(BITMAP_WORDS);
    for i in 0..words {
        let w = maps.iter().fold(!0u64, |acc, m| acc & m.words[i]);
        if w != 0 {
            return Ok(Some(i as u32 * 64 + w.trailing_zeros()));
        }
    }
    Ok(None)
}

fn v4(o: [u8; 4]) -> [u8; 16] {
    let mut v = [0; 16];
    v[..4].copy_from_slice(&o);
    v
}

fn port_value(p: u16) -> [u8; 16] {
    let mut v = [0; 16];
    v[..2].copy_from_slice(&p.to_be_bytes());
    v
}

/// A compiled image's tables: what `apply` would write into a slot.
impl NsgTables for Compiled {
    fn rule_count(&self, t: u32) -> Result<u32> {
        Ok(self.tables.get(t as usize).map_or(0, |t| t.rules.len() as u32))
    }

    fn lookup(&self, t: u32, field: u8, value: [u8; 16], bits: u8) -> Result<Option<RuleBitmap>> {
        let Some(table) = self.tables.get(t as usize) else { return Ok(None) };
        // Entries are sorted by (field, value, length): a binary search per candidate length.
        Ok((0..=bits).rev().find_map(|len| {
            let key: FieldEntry = (field, mask(value, len), len);
            table.fields.binary_search_by(|(e, _)| e.cmp(&key)).ok().map(|i| table.fields[i].1)
        }))
    }

    fn access(&self, t: u32, bit: u32) -> Result<u32> {
        let rule = self.tables.get(t as usize).and_then(|t| t.rules.get(bit as usize));
        Ok(rule.map_or(0, |r| access_code(r.rule.access)))
    }
}

/// The rule behind a hit, by the names of `names`.
pub fn name(names: &Compiled, hit: &Hit) -> Option<RuleRef> {
    let r = names.tables.get(hit.table as usize)?.rules.get(hit.bit as usize)?;
    Some(RuleRef {
        direction: hit.direction,
        layer: hit.layer,
        nsg: r.nsg.clone(),
        rule: r.rule.name.clone(),
        priority: r.rule.priority,
        access: hit.access,
    })
}

/// Evaluates `pkt` against compiled tables, naming the deciding rules.
pub fn evaluate(compiled: &Compiled, pkt: &Packet) -> Verdict {
    let d = decide(compiled, pkt).expect("a compiled image has every table");
    Verdict {
        allowed: d.allowed,
        decided_by: d.decided_by.iter().filter_map(|h| name(compiled, h)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile::compile, load_str, reference};

    const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
application_security_groups:
  web: [198.51.100.10]
nsgs:
  - name: subnet
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: [Internet], destination: [web], destination_ports: [80, "8000-8080"]}
      - {name: no-ssh, priority: 110, direction: inbound, access: deny, protocol: tcp,
         source: ["*"], destination: ["*"], destination_ports: [22]}
  - name: host
    hosts: [198.51.100.10]
    rules:
      - {name: no-8080, priority: 100, direction: inbound, access: deny, protocol: tcp,
         source: ["*"], destination: ["*"], destination_ports: [8080]}
"#;

    fn pkt(
        direction: Direction,
        proto: u8,
        src: &str,
        sport: Option<u16>,
        dst: &str,
        dport: Option<u16>,
    ) -> Packet {
        Packet {
            direction,
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
        }
    }

    #[test]
    fn compiled_tables_agree_with_the_reference() {
        let policy = load_str(POLICY, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        use Direction::*;
        let cases = [
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(80)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(8080)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.10", Some(8079)),
            pkt(Inbound, 6, "203.0.113.7", Some(40000), "198.51.100.11", Some(80)),
            pkt(Inbound, 6, "198.51.100.20", Some(40000), "198.51.100.10", Some(22)),
            pkt(Inbound, 6, "198.51.100.20", Some(40000), "198.51.100.10", Some(23)),
            pkt(Inbound, 1, "203.0.113.7", None, "198.51.100.10", None),
            pkt(Outbound, 17, "198.51.100.10", Some(5000), "203.0.113.7", Some(53)),
            pkt(Outbound, 17, "198.51.100.10", Some(5000), "192.0.2.1", Some(53)),
            pkt(Inbound, 6, "2001:db8:2::7", Some(1), "2001:db8:1::10", Some(80)),
            pkt(Inbound, 6, "203.0.113.7", Some(1), "192.0.2.9", Some(80)),
        ];
        for p in &cases {
            assert_eq!(evaluate(&compiled, p), reference::evaluate(&policy, p), "{p:?}");
        }
        // And the expected answers, so agreement is not agreement on nonsense.
        let names = |p: &Packet| {
            let v = evaluate(&compiled, p);
            (v.allowed, v.decided_by.iter().map(|r| r.rule.as_str().to_owned()).collect::<Vec<_>>())
        };
        // The host NSG has no rule for port 80 but its defaults: DenyAllInBound.
        assert_eq!(names(&cases[0]), (false, vec!["web".to_owned(), "DenyAllInBound".to_owned()]));
        assert_eq!(names(&cases[1]), (false, vec!["web".to_owned(), "no-8080".to_owned()]));
        assert_eq!(names(&cases[3]), (false, vec!["DenyAllInBound".to_owned()]));
        // Both ends in the subnet: its outbound side lets it out, its inbound side denies.
        assert_eq!(
            names(&cases[4]),
            (false, vec!["AllowVnetOutBound".to_owned(), "no-ssh".to_owned()])
        );
        assert_eq!(names(&cases[10]), (true, vec![]));
    }

    #[test]
    fn icmp_is_icmp_of_the_packets_family() {
        const ICMP: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: subnet
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: icmp, priority: 100, direction: inbound, access: allow, protocol: icmp,
         source: ["*"], destination: ["*"]}
      - {name: esp, priority: 110, direction: inbound, access: allow, protocol: esp,
         source: ["*"], destination: ["*"]}
"#;
        let policy = load_str(ICMP, "t.yaml").unwrap();
        let compiled = compile(&policy).unwrap();
        let allowed = |proto, src, dst| {
            let p = pkt(Direction::Inbound, proto, src, None, dst, None);
            let v = evaluate(&compiled, &p);
            assert_eq!(v, reference::evaluate(&policy, &p), "{p:?}");
            v.allowed
        };
        let (v4, v6) = (("203.0.113.7", "198.51.100.10"), ("2001:db8:2::7", "2001:db8:1::10"));
        assert!(allowed(1, v4.0, v4.1) && allowed(58, v6.0, v6.1));
        // The other family's number is a plain protocol: DenyAllInBound.
        assert!(!allowed(58, v4.0, v4.1) && !allowed(1, v6.0, v6.1));
        assert!(allowed(50, v4.0, v4.1) && allowed(50, v6.0, v6.1));
        // The protocol field holds [proto, family]: ICMP's number with its family (16 bits),
        // ESP's number alone (8 bits, either family), the defaults' any (/0).
        let protos: Vec<_> = compiled.tables[0]
            .fields
            .iter()
            .filter(|((field, ..), _)| *field == FIELD_PROTO)
            .map(|((_, v, len), _)| (v[0], v[1], *len))
            .collect();
        assert_eq!(protos, [(0, 0, 0), (1, 4, 16), (50, 0, 8), (58, 6, 16)]);
    }
}
