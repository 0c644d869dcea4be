//! Answers "would this packet be allowed, and by which rule?" from the compiled tables, the
//! way the dataplane does: longest-prefix match per field, AND of the bitmaps, lowest bit.
//! `verify-flow` uses it, so the operator sees what the kernel will do, not what a second
//! implementation of the semantics thinks.

use std::{collections::HashMap, net::IpAddr};

use xdpgate_common::nsg::{
    FIELD_DPORT, FIELD_DST4, FIELD_DST6, FIELD_PROTO, FIELD_SPORT, FIELD_SRC4, FIELD_SRC6,
    RuleBitmap, table_in_slot,
};

use crate::{
    Access, Direction, Layer,
    compile::{Compiled, FieldEntry, Table, dir_index, layer_index, mask},
    reference::{Packet, RuleRef, Verdict},
};

/// One table's field entries, indexed for longest-prefix lookups.
struct Lpm<'a> {
    table: &'a Table,
    entries: HashMap<FieldEntry, &'a RuleBitmap>,
}

impl<'a> Lpm<'a> {
    fn new(table: &'a Table) -> Self {
        Self { table, entries: table.fields.iter().map(|(e, b)| (*e, b)).collect() }
    }

    /// The bitmap of the longest entry of `field` covering the first `bits` bits of `value`.
    fn lookup(&self, field: u8, value: [u8; 16], bits: u8) -> Option<&'a RuleBitmap> {
        (0..=bits).rev().find_map(|len| self.entries.get(&(field, mask(value, len), len)).copied())
    }

    fn first_match(&self, pkt: &Packet) -> Option<usize> {
        let (fs, fd, bits, src, dst) = match (pkt.src, pkt.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                (FIELD_SRC4, FIELD_DST4, 32, v4(s.octets()), v4(d.octets()))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => (FIELD_SRC6, FIELD_DST6, 128, s.octets(), d.octets()),
            _ => return None,
        };
        let port = |p: Option<u16>| match p {
            // Ports count only for TCP and UDP, as in the dataplane.
            Some(p) if pkt.proto == 6 || pkt.proto == 17 => (port_value(p), 16),
            _ => ([0; 16], 0),
        };
        let (sp, sp_bits) = port(pkt.sport);
        let (dp, dp_bits) = port(pkt.dport);
        let mut proto = [0u8; 16];
        proto[0] = pkt.proto;
        let maps = [
            self.lookup(fs, src, bits)?,
            self.lookup(fd, dst, bits)?,
            self.lookup(FIELD_SPORT, sp, sp_bits)?,
            self.lookup(FIELD_DPORT, dp, dp_bits)?,
            self.lookup(FIELD_PROTO, proto, 8)?,
        ];
        (0..self.table.rules.len())
            .find(|&bit| maps.iter().all(|m| m.words[bit / 64] >> (bit % 64) & 1 == 1))
    }
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

/// Evaluates `pkt` against the compiled tables: inbound subnet then host layer, outbound host
/// then subnet; every layer whose table has a matching rule must allow.
pub fn evaluate(compiled: &Compiled, pkt: &Packet) -> Verdict {
    let layers = match pkt.direction {
        Direction::Inbound => [Layer::Subnet, Layer::Host],
        Direction::Outbound => [Layer::Host, Layer::Subnet],
    };
    let mut decided_by = Vec::new();
    for layer in layers {
        let table =
            &compiled.tables[table_in_slot(dir_index(pkt.direction), layer_index(layer)) as usize];
        let Some(bit) = Lpm::new(table).first_match(pkt) else { continue };
        let r = &table.rules[bit];
        decided_by.push(RuleRef {
            layer,
            nsg: r.nsg.clone(),
            rule: r.rule.name.clone(),
            priority: r.rule.priority,
            access: r.rule.access,
        });
        if r.rule.access == Access::Deny {
            return Verdict { allowed: false, decided_by };
        }
    }
    Verdict { allowed: true, decided_by }
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
        assert_eq!(names(&cases[4]), (false, vec!["no-ssh".to_owned()]));
        assert_eq!(names(&cases[10]), (true, vec![]));
    }
}
