//! Random NSG policies as data, rendered to YAML (so a failing one can be shrunk), over a
//! fixed universe of documentation addresses and ports. Shared by the differential tests.

use std::{collections::HashSet, fmt::Write as _, net::IpAddr};

use ipnet::IpNet;

use super::rng::Rng;

#[derive(Clone, Debug)]
pub struct RuleSpec {
    pub name: String,
    pub priority: u32,
    pub inbound: bool,
    /// As written (case varies).
    pub direction: String,
    pub access: String,
    pub protocol: String,
    pub source: Vec<String>,
    pub destination: Vec<String>,
    /// `None`: the field is omitted (defaults to "*").
    pub source_ports: Option<Vec<String>>,
    pub destination_ports: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct NsgSpec {
    pub name: String,
    pub subnets: Vec<String>,
    pub hosts: Vec<String>,
    pub rules: Vec<RuleSpec>,
}

#[derive(Clone, Debug, Default)]
pub struct PolicySpec {
    pub address_space: Vec<String>,
    pub peered: Vec<String>,
    pub probes: Vec<String>,
    pub tags: Vec<(String, Vec<String>)>,
    pub asgs: Vec<(String, Vec<String>)>,
    pub nsgs: Vec<NsgSpec>,
}

pub fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| if s.parse::<u16>().is_ok() { s.clone() } else { format!("\"{s}\"") })
        .collect();
    format!("[{}]", quoted.join(", "))
}

impl PolicySpec {
    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "virtual_network:\n  address_space: {}", list(&self.address_space));
        if !self.peered.is_empty() {
            let _ = writeln!(y, "  peered: {}", list(&self.peered));
        }
        if !self.probes.is_empty() {
            let _ = writeln!(y, "health_probe_source: {}", list(&self.probes));
        }
        for (key, map) in
            [("service_tags", &self.tags), ("application_security_groups", &self.asgs)]
        {
            if !map.is_empty() {
                let _ = writeln!(y, "{key}:");
                for (name, items) in map {
                    let _ = writeln!(y, "  {name}: {}", list(items));
                }
            }
        }
        y.push_str("nsgs:\n");
        for n in &self.nsgs {
            let _ = writeln!(y, "  - name: {}", n.name);
            if !n.subnets.is_empty() {
                let _ = writeln!(y, "    subnets: {}", list(&n.subnets));
            }
            if !n.hosts.is_empty() {
                let _ = writeln!(y, "    hosts: {}", list(&n.hosts));
            }
            if n.rules.is_empty() {
                continue;
            }
            y.push_str("    rules:\n");
            for r in &n.rules {
                let _ = write!(
                    y,
                    "      - {{name: {}, priority: {}, direction: {}, access: {}, protocol: \"{}\", \
                     source: {}, destination: {}",
                    r.name,
                    r.priority,
                    r.direction,
                    r.access,
                    r.protocol,
                    list(&r.source),
                    list(&r.destination)
                );
                if let Some(p) = &r.source_ports {
                    let _ = write!(y, ", source_ports: {}", list(p));
                }
                if let Some(p) = &r.destination_ports {
                    let _ = write!(y, ", destination_ports: {}", list(p));
                }
                y.push_str("}\n");
            }
        }
        y
    }

    pub fn rule_count(&self) -> usize {
        self.nsgs.iter().map(|n| n.rules.len()).sum()
    }
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// The universe policies and packets are drawn from. Addresses are documentation addresses:
// 198.51.100.0/24 and 2001:db8:1::/64 the virtual network, 192.0.2.128/25 sometimes peered,
// 203.0.113.0/24, 2001:db8:2::/64 and 192.0.2.0/24 outside. Rules may name prefixes that
// cover more (198.0.0.0/8, ::/0); packets never use addresses outside the documentation ranges.

pub const DOC_RANGES: [&str; 4] =
    ["198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24", "2001:db8::/32"];

pub const SUBNETS: &[&str] = &[
    "198.51.100.0/26",
    "198.51.100.64/26",
    "198.51.100.128/26",
    "198.51.100.192/26",
    "198.51.100.0/25",
    "198.51.100.128/25",
    "198.51.100.0/24",
    "198.51.100.96/28",
    "192.0.2.128/26",
    "2001:db8:1::/80",
    "2001:db8:1:0:1::/80",
    "2001:db8:1::/64",
    "2001:db8:1::/65",
    "2001:db8:1:0:8000::/65",
    "2001:db8:1::/96",
];

pub const HOSTS: &[&str] = &[
    "198.51.100.5",
    "198.51.100.10",
    "198.51.100.11",
    "198.51.100.20",
    "198.51.100.70",
    "198.51.100.100",
    "198.51.100.130",
    "198.51.100.200",
    "192.0.2.130",
    "203.0.113.50",
    "2001:db8:1::10",
    "2001:db8:1::20",
    "2001:db8:1:0:1::5",
    "2001:db8:1:0:8000::1",
];

/// Address items that are literals (fit for service tags too).
pub const LITERALS: &[&str] = &[
    "198.51.100.0/24",
    "198.51.100.0/25",
    "198.51.100.128/25",
    "198.51.100.0/26",
    "198.51.100.64/26",
    "198.51.100.192/26",
    "198.51.100.0/28",
    "198.51.100.16/28",
    "198.51.100.64/28",
    "198.51.100.10",
    "198.51.100.10/32",
    "198.51.100.70",
    "198.51.100.130",
    "198.51.100.10-198.51.100.20",
    "198.51.100.60-198.51.100.70",
    "203.0.113.0/24",
    "203.0.113.0/26",
    "203.0.113.128/25",
    "203.0.113.7",
    "203.0.113.1-203.0.113.100",
    "192.0.2.0/24",
    "192.0.2.128/25",
    "192.0.2.0/28",
    "192.0.2.130",
    "192.0.2.100-192.0.2.140",
    "2001:db8:1::/64",
    "2001:db8:1::/80",
    "2001:db8:1::/96",
    "2001:db8:1:0:8000::/65",
    "2001:db8:1::10",
    "2001:db8:1::10/128",
    "2001:db8:1::10-2001:db8:1::20",
    "2001:db8:2::/64",
    "2001:db8:2::/112",
    "2001:db8:2::7",
    "2001:db8:2::-2001:db8:2::ff",
];

/// Address items only rules use: everything, covering prefixes and the built-in tags.
pub const WIDE: &[&str] = &[
    "*",
    "any",
    "0.0.0.0/0",
    "::/0",
    "198.0.0.0/8",
    "198.51.0.0/16",
    "2001:db8::/32",
    "Internet",
    "Internet",
    "VirtualNetwork",
    "VirtualNetwork",
    "AzureLoadBalancer",
];

pub const PORTS: &[&str] = &[
    "*",
    "22",
    "53",
    "80",
    "443",
    "0",
    "65535",
    "1000-2000",
    "2001-3000",
    "8000-8080",
    "0-1023",
    "1024-65535",
    "79-81",
    "442-444",
    "0-65535",
];

pub fn cased(rng: &mut Rng, word: &str) -> String {
    match rng.below(10) {
        0 => word.to_ascii_uppercase(),
        1 => {
            let mut c = word.chars();
            c.next().map_or_else(String::new, |f| f.to_ascii_uppercase().to_string() + c.as_str())
        }
        _ => word.to_owned(),
    }
}

pub fn address_items(rng: &mut Rng, names: &[String]) -> Vec<String> {
    let n = rng.weighted(&[(60, 1), (25, 2), (15, 3)]);
    (0..n)
        .map(|_| match rng.below(10) {
            0..=2 => (*rng.pick(WIDE)).to_owned(),
            3 if !names.is_empty() => rng.pick(names).clone(),
            4 => (*rng.pick(HOSTS)).to_owned(),
            _ => (*rng.pick(LITERALS)).to_owned(),
        })
        .collect()
}

/// The family (IPv6: `true`) of every item of `items`, when all are addresses, prefixes or
/// ranges of one; `None` where a name or `*` stands, or the families mix.
pub fn literal_family<S: AsRef<str>>(items: &[S]) -> Option<bool> {
    let mut family = None;
    for item in items {
        let first = item.as_ref().trim_matches('"').split('-').next().unwrap_or_default();
        let v6 = match (first.parse::<IpNet>(), first.parse::<IpAddr>()) {
            (Ok(net), _) => net.addr().is_ipv6(),
            (_, Ok(addr)) => addr.is_ipv6(),
            _ => return None,
        };
        if *family.get_or_insert(v6) != v6 {
            return None;
        }
    }
    family
}

/// Whether a rule's two sides are written out in addresses of different families: it could
/// match no packet, and the policy refuses it.
pub fn families_clash<S: AsRef<str>>(source: &[S], destination: &[S]) -> bool {
    matches!((literal_family(source), literal_family(destination)), (Some(a), Some(b)) if a != b)
}

pub fn port_items(rng: &mut Rng) -> Option<Vec<String>> {
    if rng.percent(35) {
        return None;
    }
    let n = rng.weighted(&[(65, 1), (25, 2), (10, 3)]);
    Some((0..n).map(|_| (*rng.pick(PORTS)).to_owned()).collect())
}

pub fn random_rule(
    rng: &mut Rng,
    name: String,
    priority: u32,
    inbound: bool,
    names: &[String],
) -> RuleSpec {
    let protocol = rng.weighted(&[
        (30, "tcp"),
        (20, "udp"),
        (15, "icmp"),
        (14, "any"),
        (8, "*"),
        (5, "esp"),
        (5, "ah"),
    ]);
    let ported = matches!(protocol, "tcp" | "udp" | "any" | "*");
    let star = || Some(vec!["*".to_owned()]);
    let (source_ports, destination_ports) = if ported {
        // Source ports are restricted less often, as in real policies.
        let sp = if rng.percent(25) { port_items(rng) } else { None };
        (sp, port_items(rng))
    } else {
        match rng.below(3) {
            0 => (None, None),
            1 => (None, star()),
            _ => (star(), star()),
        }
    };
    let source = address_items(rng, names);
    let destination = loop {
        let destination = address_items(rng, names);
        if !families_clash(&source, &destination) {
            break destination;
        }
    };
    RuleSpec {
        name,
        priority,
        inbound,
        direction: cased(rng, if inbound { "inbound" } else { "outbound" }),
        access: {
            let access = if rng.percent(50) { "allow" } else { "deny" };
            cased(rng, access)
        },
        protocol: cased(rng, protocol),
        source,
        destination,
        source_ports,
        destination_ports,
    }
}

/// A priority not used yet by the rules of this direction.
pub fn fresh_priority(rng: &mut Rng, used: &mut HashSet<(bool, u32)>, inbound: bool) -> u32 {
    loop {
        let p = if rng.percent(10) {
            *rng.pick(&[100, 101, 4095, 4096])
        } else {
            rng.range(100, 4096) as u32
        };
        if used.insert((inbound, p)) {
            return p;
        }
    }
}

pub fn overlaps(a: &str, b: &str) -> bool {
    let (a, b): (IpNet, IpNet) = (a.parse().unwrap(), b.parse().unwrap());
    a.contains(&b) || b.contains(&a)
}

pub fn random_policy(rng: &mut Rng) -> PolicySpec {
    let mut spec = PolicySpec::default();
    spec.address_space.push((*rng.pick(&["198.51.100.0/24", "198.51.100.0/25"])).to_owned());
    if rng.percent(90) {
        spec.address_space.push((*rng.pick(&["2001:db8:1::/64", "2001:db8:1::/65"])).to_owned());
    }
    if rng.percent(50) {
        spec.peered.push("192.0.2.128/25".to_owned());
    }
    if rng.percent(15) {
        spec.peered.push("2001:db8:2::/112".to_owned());
    }
    if rng.percent(30) {
        spec.probes = vec![
            (*rng.pick(&["192.0.2.1", "203.0.113.9", "2001:db8:2::9", "192.0.2.0/28"])).to_owned(),
        ];
    }
    let mut names: Vec<String> = Vec::new();
    if rng.percent(30) {
        let n = rng.range(1, 2);
        spec.tags
            .push(("Tag1".to_owned(), (0..n).map(|_| (*rng.pick(LITERALS)).to_owned()).collect()));
        names.push("Tag1".to_owned());
    }
    if rng.percent(30) {
        let n = rng.range(1, 3);
        spec.asgs
            .push(("asg1".to_owned(), (0..n).map(|_| (*rng.pick(HOSTS)).to_owned()).collect()));
        names.push("asg1".to_owned());
    }

    let mut subnets: Vec<&str> = SUBNETS.to_vec();
    rng.shuffle(&mut subnets);
    let mut hosts: Vec<&str> = HOSTS.to_vec();
    rng.shuffle(&mut hosts);
    // Subnets first, then hosts, often inside one of the subnets (two layers then apply).
    let mut taken: Vec<&str> = Vec::new();
    let mut nsgs: Vec<NsgSpec> = Vec::new();
    for i in 0..rng.range(1, 3) {
        let mut nsg =
            NsgSpec { name: format!("nsg{i}"), subnets: vec![], hosts: vec![], rules: vec![] };
        for _ in 0..rng.weighted(&[(20, 0), (40, 1), (30, 2), (10, 3)]) {
            if let Some(pos) = subnets.iter().position(|s| !taken.iter().any(|t| overlaps(s, t))) {
                let s = subnets.remove(pos);
                taken.push(s);
                nsg.subnets.push(s.to_owned());
            }
        }
        nsgs.push(nsg);
    }
    for nsg in &mut nsgs {
        let want_hosts = if nsg.subnets.is_empty() {
            rng.range(1, 3)
        } else {
            rng.weighted(&[(35, 0), (40, 1), (25, 2)])
        };
        for _ in 0..want_hosts {
            let inside = |h: &&str| {
                let a: IpAddr = h.parse().unwrap();
                taken.iter().any(|t| t.parse::<IpNet>().unwrap().contains(&a))
            };
            let pos = match hosts.iter().position(inside) {
                Some(pos) if rng.percent(60) => Some(pos),
                _ => hosts.len().checked_sub(1),
            };
            if let Some(pos) = pos {
                nsg.hosts.push(hosts.remove(pos).to_owned());
            }
        }
    }
    for mut nsg in nsgs {
        if nsg.subnets.is_empty() && nsg.hosts.is_empty() {
            continue;
        }
        let mut used = HashSet::new();
        for j in 0..rng.weighted(&[(5, 0), (30, 5), (40, 15), (25, 30)]) {
            let inbound = rng.percent(55);
            let priority = fresh_priority(rng, &mut used, inbound);
            nsg.rules.push(random_rule(rng, format!("r{j}"), priority, inbound, &names));
        }
        spec.nsgs.push(nsg);
    }
    spec
}
