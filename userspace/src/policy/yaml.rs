//! Loads an NSG policy from YAML: deserializes the raw document, validates it (collecting
//! every error with its line) and expands service tags, application security groups and
//! default rules into a [`Policy`]. `policies/example.yaml` documents the format.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    path::Path,
};

use ipnet::{IpNet, Ipv4Net, Ipv4Subnets, Ipv6Net, Ipv6Subnets};
use serde::{Deserialize, Deserializer, de};
use xdpgate_common::nsg::MAX_RULES;

use super::{
    locate::LineIndex,
    model::{Access, Direction, Layer, Nsg, Policy, PortRange, Ports, Protocol, Rule, Settings},
};

/// One problem in a policy file, located by line and YAML path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when unknown (e.g. the file could not be read).
    pub line: usize,
    /// YAML path such as `nsgs[0].rules[2].priority`; empty for the whole document.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy file, in line order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Loads and validates the policy in `src`; `file` names it in errors.
pub fn load_str(src: &str, file: &str) -> Result<Policy, PolicyErrors> {
    let raw: RawPolicy =
        serde_yaml::from_str(src).map_err(|e| PolicyErrors(vec![serde_error(&e, file)]))?;
    Loader { file, lines: LineIndex::new(src), errors: Vec::new() }.load(&raw)
}

/// Reads, loads and validates the policy file at `path`.
pub fn load_file(path: &Path) -> Result<Policy, PolicyErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(src) => load_str(&src, &file),
        Err(e) => Err(PolicyErrors(vec![PolicyError {
            file,
            line: 0,
            field: String::new(),
            reason: format!("cannot read: {e}"),
        }])),
    }
}

/// serde_yaml renders errors as `path: message at line L column C`; split that back up.
fn serde_error(e: &serde_yaml::Error, file: &str) -> PolicyError {
    let mut message = e.to_string();
    let line = e.location().map_or(0, |l| {
        message = message.replacen(&format!(" at line {} column {}", l.line(), l.column()), "", 1);
        l.line()
    });
    let (field, reason) = match message.split_once(": ") {
        Some((path, reason)) if !path.contains(char::is_whitespace) => (path, reason),
        _ => ("", message.as_str()),
    };
    let mut reason = reason.to_owned();
    // The most likely alias is an unquoted `*` meant as "any".
    if reason.contains("while scanning an alias") {
        reason += " (write \"*\" quoted)";
    }
    PolicyError { file: file.to_owned(), line, field: field.to_owned(), reason }
}

// ---------------------------------------------------------------------------------------
// The raw document, as written. Enumerations and numbers with a range are kept loose
// (strings, i64) so that validation, not serde, reports them, and reports all of them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    virtual_network: RawVirtualNetwork,
    #[serde(default)]
    health_probe_source: List,
    #[serde(default)]
    service_tags: BTreeMap<String, List>,
    #[serde(default)]
    application_security_groups: BTreeMap<String, List>,
    #[serde(default)]
    settings: RawSettings,
    #[serde(default)]
    nsgs: Vec<RawNsg>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVirtualNetwork {
    address_space: List,
    #[serde(default)]
    peered: List,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    tcp_idle_timeout: Option<i64>,
    udp_idle_timeout: Option<i64>,
    icmp_idle_timeout: Option<i64>,
    reevaluate_flows: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNsg {
    name: String,
    #[serde(default)]
    subnets: List,
    #[serde(default)]
    hosts: List,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    priority: i64,
    direction: String,
    access: String,
    protocol: String,
    source: List,
    #[serde(default = "List::any")]
    source_ports: List,
    destination: List,
    #[serde(default = "List::any")]
    destination_ports: List,
}

/// A list of scalars that may also be written as a single scalar. Integers are kept as
/// text so ports can be written either way.
#[derive(Debug, Default)]
struct List {
    items: Vec<String>,
    /// Written as a sequence: items have their own paths (`field[i]`).
    is_seq: bool,
}

impl List {
    fn any() -> Self {
        Self { items: vec!["*".to_owned()], is_seq: false }
    }

    /// Each item with its YAML path.
    fn iter<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (String, &'a str)> + 'a {
        self.items.iter().enumerate().map(move |(i, item)| {
            let item_path = if self.is_seq { format!("{path}[{i}]") } else { path.to_owned() };
            (item_path, item.as_str())
        })
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ListVisitor)
    }
}

struct ListVisitor;

impl<'de> de::Visitor<'de> for ListVisitor {
    type Value = List;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, an integer or a list of them")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<List, E> {
        Ok(List { items: vec![v.to_owned()], is_seq: false })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<List, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<List, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
        let mut items = Vec::new();
        while let Some(Scalar(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(List { items, is_seq: true })
    }
}

/// A string or integer item of a [`List`].
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl de::Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

// ---------------------------------------------------------------------------------------
// Validation and expansion.

const PRIORITIES: RangeInclusive<i64> = 100..=4096;
const TIMEOUTS: RangeInclusive<i64> = 4..=7200;
const ANY_V4: IpNet = IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0));
const ANY_V6: IpNet = IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0));
const BUILT_IN_TAGS: [&str; 3] = ["VirtualNetwork", "Internet", "AzureLoadBalancer"];
const DEFAULT_RULE_NAMES: [&str; 6] = [
    "AllowVnetInBound",
    "AllowAzureLoadBalancerInBound",
    "DenyAllInBound",
    "AllowVnetOutBound",
    "AllowInternetOutBound",
    "DenyAllOutBound",
];

/// Validates a raw policy, collecting errors located by [`LineIndex`].
struct Loader<'a> {
    file: &'a str,
    lines: LineIndex,
    errors: Vec<PolicyError>,
}

/// A parsed value and the YAML path it came from, for errors found later.
struct Located<T> {
    value: T,
    path: String,
}

/// What names in `source`/`destination` expand to.
struct Names {
    virtual_network: Vec<IpNet>,
    internet: Vec<IpNet>,
    load_balancer: Vec<IpNet>,
    /// User service tags and application security groups.
    user: HashMap<String, Vec<IpNet>>,
}

impl Names {
    fn get(&self, name: &str) -> Option<&[IpNet]> {
        match name {
            "VirtualNetwork" => Some(&self.virtual_network),
            "Internet" => Some(&self.internet),
            "AzureLoadBalancer" => Some(&self.load_balancer),
            _ => self.user.get(name).map(Vec::as_slice),
        }
    }
}

/// An NSG with the locations of its associations, for the cross-NSG checks.
struct LoadedNsg {
    nsg: Nsg,
    subnets: Vec<Located<IpNet>>,
    hosts: Vec<Located<IpAddr>>,
}

impl Loader<'_> {
    fn load(mut self, raw: &RawPolicy) -> Result<Policy, PolicyErrors> {
        let settings = self.settings(&raw.settings);
        let names = self.names(raw);
        self.check_unique_nsg_names(&raw.nsgs);
        let nsgs: Vec<LoadedNsg> =
            raw.nsgs.iter().enumerate().map(|(i, nsg)| self.nsg(i, nsg, &names)).collect();
        self.check_subnet_overlaps(&nsgs);
        self.check_host_overlaps(&nsgs);
        self.check_table_sizes(&nsgs);
        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| e.line);
            return Err(PolicyErrors(self.errors));
        }
        Ok(Policy { nsgs: nsgs.into_iter().map(|n| n.nsg).collect(), load_balancers: Vec::new(), settings })
    }

    fn error(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line: self.lines.line(field),
            field: field.to_owned(),
            reason: reason.into(),
        });
    }

    /// The value of `result`, or `None` after recording its error at `field`.
    fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|reason| self.error(field, reason)).ok()
    }

    fn settings(&mut self, raw: &RawSettings) -> Settings {
        let default = Settings::default();
        Settings {
            tcp_idle_timeout: self
                .timeout("tcp_idle_timeout", raw.tcp_idle_timeout)
                .unwrap_or(default.tcp_idle_timeout),
            udp_idle_timeout: self
                .timeout("udp_idle_timeout", raw.udp_idle_timeout)
                .unwrap_or(default.udp_idle_timeout),
            icmp_idle_timeout: self
                .timeout("icmp_idle_timeout", raw.icmp_idle_timeout)
                .unwrap_or(default.icmp_idle_timeout),
            reevaluate_flows: raw.reevaluate_flows.unwrap_or(default.reevaluate_flows),
        }
    }

    fn timeout(&mut self, name: &str, value: Option<i64>) -> Option<u32> {
        let value = value?;
        let checked = in_range(value, &TIMEOUTS)
            .ok_or_else(|| format!("timeout {value} is out of range 4-7200 seconds"));
        self.check(&format!("settings.{name}"), checked)
    }

    fn names(&mut self, raw: &RawPolicy) -> Names {
        let vnet = &raw.virtual_network;
        if vnet.address_space.items.is_empty() {
            self.error("virtual_network.address_space", "must not be empty");
        }
        let mut virtual_network =
            self.literals("virtual_network.address_space", &vnet.address_space);
        virtual_network.extend(self.literals("virtual_network.peered", &vnet.peered));
        let mut names = Names {
            internet: complement(&virtual_network),
            virtual_network: normalized(virtual_network),
            load_balancer: normalized(
                self.literals("health_probe_source", &raw.health_probe_source),
            ),
            user: HashMap::new(),
        };
        for (name, items) in &raw.service_tags {
            let path = format!("service_tags.{name}");
            self.check_user_name(&path, name, "service tag");
            let prefixes = self.literals(&path, items);
            names.user.insert(name.clone(), normalized(prefixes));
        }
        for (name, members) in &raw.application_security_groups {
            let path = format!("application_security_groups.{name}");
            self.check_user_name(&path, name, "application security group");
            if raw.service_tags.contains_key(name) {
                self.error(&path, format!("{name} is also defined as a service tag"));
            }
            let addresses = self.addresses(&path, members);
            let prefixes = addresses.into_iter().map(|a| a.value.into()).collect();
            names.user.insert(name.clone(), normalized(prefixes));
        }
        names
    }

    fn check_user_name(&mut self, path: &str, name: &str, what: &str) {
        if BUILT_IN_TAGS.contains(&name) || is_any(name) {
            self.error(path, format!("{what} {name} would shadow the built-in {name}"));
        }
    }

    fn check_unique_nsg_names(&mut self, nsgs: &[RawNsg]) {
        let mut seen: HashMap<&str, String> = HashMap::new();
        for (i, nsg) in nsgs.iter().enumerate() {
            let path = format!("nsgs[{i}].name");
            if let Some(first) = seen.get(nsg.name.as_str()) {
                let line = self.lines.line(first);
                self.error(&path, format!("NSG name {} is already used (line {line})", nsg.name));
            } else {
                seen.insert(nsg.name.as_str(), path);
            }
        }
    }

    fn nsg(&mut self, i: usize, raw: &RawNsg, names: &Names) -> LoadedNsg {
        let path = format!("nsgs[{i}]");
        if raw.name.is_empty() {
            self.error(&format!("{path}.name"), "must not be empty");
        }
        if raw.subnets.items.is_empty() && raw.hosts.items.is_empty() {
            self.error(&path, "not associated with any subnet or host");
        }
        let subnets = self.subnets(&format!("{path}.subnets"), &raw.subnets);
        let hosts = self.addresses(&format!("{path}.hosts"), &raw.hosts);
        let mut rules = self.rules(&path, &raw.rules, names);
        rules.extend(default_rules(names));
        rules.sort_by_key(|r| (r.direction, r.priority));
        let nsg = Nsg {
            name: raw.name.clone(),
            subnets: normalized(subnets.iter().map(|s| s.value).collect()),
            hosts: normalized(hosts.iter().map(|h| h.value.into()).collect()),
            rules,
        };
        LoadedNsg { nsg, subnets, hosts }
    }

    fn subnets(&mut self, path: &str, list: &List) -> Vec<Located<IpNet>> {
        list.iter(path)
            .filter_map(|(path, text)| {
                let value = self.check(&path, parse_subnet(text))?;
                Some(Located { value, path })
            })
            .collect()
    }

    fn addresses(&mut self, path: &str, list: &List) -> Vec<Located<IpAddr>> {
        list.iter(path)
            .filter_map(|(path, text)| {
                let value = self.check(&path, parse_address(text))?;
                Some(Located { value, path })
            })
            .collect()
    }

    /// Addresses, prefixes and ranges (no names).
    fn literals(&mut self, path: &str, list: &List) -> Vec<IpNet> {
        let mut prefixes = Vec::new();
        for (path, text) in list.iter(path) {
            let parsed = parse_literal(text)
                .unwrap_or_else(|| Err(format!("\"{text}\" is not an address, prefix or range")));
            prefixes.extend(self.check(&path, parsed).unwrap_or_default());
        }
        prefixes
    }

    /// A rule's `source` or `destination`: literals, `*` and names.
    fn endpoints(&mut self, path: &str, list: &List, names: &Names) -> Vec<IpNet> {
        if list.items.is_empty() {
            self.error(path, "must not be empty (use \"*\" for any address)");
        }
        let mut prefixes = Vec::new();
        for (path, text) in list.iter(path) {
            let parsed = if is_any(text) {
                Ok(vec![ANY_V4, ANY_V6])
            } else if let Some(named) = names.get(text) {
                Ok(named.to_vec())
            } else {
                parse_literal(text).unwrap_or_else(|| {
                    Err(format!("unknown service tag or application security group \"{text}\""))
                })
            };
            prefixes.extend(self.check(&path, parsed).unwrap_or_default());
        }
        normalized(prefixes)
    }

    fn ports(&mut self, path: &str, list: &List) -> Ports {
        if list.items.is_empty() {
            self.error(path, "must not be empty (use \"*\" for any port)");
        }
        let mut ranges = Vec::new();
        let mut any = false;
        for (path, text) in list.iter(path) {
            match self.check(&path, parse_port_item(text)) {
                Some(Some(range)) => ranges.push(range),
                Some(None) => any = true,
                None => {}
            }
        }
        (!any).then(|| merge_port_ranges(ranges))
    }

    fn rules(&mut self, nsg_path: &str, raw: &[RawRule], names: &Names) -> Vec<Rule> {
        let mut names_seen: HashMap<&str, String> = HashMap::new();
        let mut priorities_seen: HashMap<(Direction, i64), (String, &str)> = HashMap::new();
        let mut rules = Vec::new();
        for (j, r) in raw.iter().enumerate() {
            let path = format!("{nsg_path}.rules[{j}]");
            if let Some(first) = names_seen.get(r.name.as_str()) {
                let line = self.lines.line(first);
                self.error(
                    &format!("{path}.name"),
                    format!("rule name {} is already used (line {line})", r.name),
                );
            } else {
                names_seen.insert(&r.name, path.clone());
            }
            if let Ok(direction) = parse_direction(&r.direction) {
                let key = (direction, r.priority);
                if let Some((first, first_name)) = priorities_seen.get(&key) {
                    let line = self.lines.line(first);
                    self.error(
                        &format!("{path}.priority"),
                        format!(
                            "priority {} is already used by {} rule {first_name} (line {line})",
                            r.priority,
                            direction_name(direction),
                        ),
                    );
                } else {
                    priorities_seen.insert(key, (path.clone(), &r.name));
                }
            }
            rules.extend(self.rule(&path, r, names));
        }
        rules
    }

    /// One user rule; `None` if any of its fields is invalid (all of them are reported).
    fn rule(&mut self, path: &str, r: &RawRule, names: &Names) -> Option<Rule> {
        let errors_before = self.errors.len();
        let field = |name: &str| format!("{path}.{name}");
        if r.name.is_empty() {
            self.error(&field("name"), "must not be empty");
        } else if DEFAULT_RULE_NAMES.contains(&r.name.as_str()) {
            self.error(&field("name"), format!("{} is the name of a default rule", r.name));
        }
        let priority = self.check(&field("priority"), parse_priority(r.priority));
        let direction = self.check(&field("direction"), parse_direction(&r.direction));
        let access = self.check(&field("access"), parse_access(&r.access));
        let protocol = self.check(&field("protocol"), parse_protocol(&r.protocol));
        let source = self.endpoints(&field("source"), &r.source, names);
        let destination = self.endpoints(&field("destination"), &r.destination, names);
        let source_ports = self.ports(&field("source_ports"), &r.source_ports);
        let destination_ports = self.ports(&field("destination_ports"), &r.destination_ports);
        if let Some(protocol) = protocol.filter(|p| !has_ports(*p)) {
            for (name, ports) in
                [("source_ports", &source_ports), ("destination_ports", &destination_ports)]
            {
                if ports.is_some() {
                    let reason = format!("must be \"*\" for protocol {}", protocol_name(protocol));
                    self.error(&field(name), reason);
                }
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Rule {
            name: r.name.clone(),
            priority: priority?,
            direction: direction?,
            access: access?,
            protocol: protocol?,
            source,
            destination,
            source_ports,
            destination_ports,
            default: false,
        })
    }

    fn check_subnet_overlaps(&mut self, nsgs: &[LoadedNsg]) {
        for (i, later) in nsgs.iter().enumerate() {
            for earlier in &nsgs[..i] {
                for b in &later.subnets {
                    for a in &earlier.subnets {
                        if a.value.contains(&b.value) || b.value.contains(&a.value) {
                            let line = self.lines.line(&a.path);
                            let reason = format!(
                                "subnet {} of NSG {} overlaps subnet {} of NSG {} (line {line})",
                                b.value, later.nsg.name, a.value, earlier.nsg.name
                            );
                            self.error(&b.path, reason);
                        }
                    }
                }
            }
        }
    }

    fn check_host_overlaps(&mut self, nsgs: &[LoadedNsg]) {
        // Host -> (index of its NSG, path of its first association).
        let mut owners: HashMap<IpAddr, (usize, &str)> = HashMap::new();
        for (i, loaded) in nsgs.iter().enumerate() {
            for host in &loaded.hosts {
                match owners.get(&host.value) {
                    Some(&(owner, _)) if owner == i => {}
                    Some(&(owner, first)) => {
                        let line = self.lines.line(first);
                        let reason = format!(
                            "host {} of NSG {} is already associated with NSG {} (line {line})",
                            host.value, loaded.nsg.name, nsgs[owner].nsg.name
                        );
                        self.error(&host.path, reason);
                    }
                    None => {
                        owners.insert(host.value, (i, &host.path));
                    }
                }
            }
        }
    }

    /// Each (direction, layer) is one kernel table shared by every NSG at that layer.
    fn check_table_sizes(&mut self, nsgs: &[LoadedNsg]) {
        for direction in [Direction::Inbound, Direction::Outbound] {
            for layer in [Layer::Subnet, Layer::Host] {
                let count: usize = nsgs
                    .iter()
                    .filter(|n| !n.nsg.associated(layer).is_empty())
                    .map(|n| n.nsg.rules.iter().filter(|r| r.direction == direction).count())
                    .sum();
                if count > MAX_RULES as usize {
                    let reason = format!(
                        "{} {}-layer rules: {count} exceed the table size {MAX_RULES}",
                        direction_name(direction),
                        layer_name(layer),
                    );
                    self.error("nsgs", reason);
                }
            }
        }
    }
}

/// Azure's default rules, present in every NSG below all user rules.
fn default_rules(names: &Names) -> Vec<Rule> {
    use Access::{Allow, Deny};
    use Direction::{Inbound, Outbound};
    let any = [ANY_V4, ANY_V6];
    let vnet = &names.virtual_network[..];
    let rule =
        |name: &str, priority, direction, access, source: &[IpNet], destination: &[IpNet]| Rule {
            name: name.to_owned(),
            priority,
            direction,
            access,
            protocol: Protocol::Any,
            source: source.to_vec(),
            destination: destination.to_vec(),
            source_ports: None,
            destination_ports: None,
            default: true,
        };
    vec![
        rule("AllowVnetInBound", 65000, Inbound, Allow, vnet, vnet),
        rule("AllowAzureLoadBalancerInBound", 65001, Inbound, Allow, &names.load_balancer, &any),
        rule("DenyAllInBound", 65500, Inbound, Deny, &any, &any),
        rule("AllowVnetOutBound", 65000, Outbound, Allow, vnet, vnet),
        rule("AllowInternetOutBound", 65001, Outbound, Allow, &any, &names.internet),
        rule("DenyAllOutBound", 65500, Outbound, Deny, &any, &any),
    ]
}

// ---------------------------------------------------------------------------------------
// Scalar parsers: `Err` carries the reason shown to the user.

fn is_any(text: &str) -> bool {
    text == "*" || text.eq_ignore_ascii_case("any")
}

fn in_range(value: i64, range: &RangeInclusive<i64>) -> Option<u32> {
    u32::try_from(value).ok().filter(|_| range.contains(&value))
}

fn parse_priority(priority: i64) -> Result<u32, String> {
    in_range(priority, &PRIORITIES)
        .ok_or_else(|| format!("priority {priority} is out of range 100-4096"))
}

fn parse_direction(text: &str) -> Result<Direction, String> {
    match text.to_ascii_lowercase().as_str() {
        "inbound" => Ok(Direction::Inbound),
        "outbound" => Ok(Direction::Outbound),
        _ => Err(format!("unknown direction \"{text}\"; expected inbound or outbound")),
    }
}

fn parse_access(text: &str) -> Result<Access, String> {
    match text.to_ascii_lowercase().as_str() {
        "allow" => Ok(Access::Allow),
        "deny" => Ok(Access::Deny),
        _ => Err(format!("unknown access \"{text}\"; expected allow or deny")),
    }
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "icmp" => Ok(Protocol::Icmp),
        "esp" => Ok(Protocol::Esp),
        "ah" => Ok(Protocol::Ah),
        "any" | "*" => Ok(Protocol::Any),
        _ => {
            Err(format!("unknown protocol \"{text}\"; expected tcp, udp, icmp, esp, ah, any or *"))
        }
    }
}

/// Whether packets of `protocol` can carry ports, so a port-restricted rule makes sense.
fn has_ports(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Tcp | Protocol::Udp | Protocol::Any)
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::Subnet => "subnet",
        Layer::Host => "host",
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Esp => "esp",
        Protocol::Ah => "ah",
        Protocol::Any => "any",
    }
}

/// An address, prefix or range as prefixes; `None` if `text` is none of them (a name).
fn parse_literal(text: &str) -> Option<Result<Vec<IpNet>, String>> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(Ok(vec![addr.into()]));
    }
    if text.contains('/') {
        return Some(parse_prefix(text).map(|p| vec![p]));
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

/// A prefix in CIDR notation. Host bits are rejected rather than truncated: they are
/// usually a typo in the address or the length.
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text.parse().map_err(|_| format!("invalid prefix \"{text}\""))?;
    if net != net.trunc() {
        return Err(format!(
            "invalid prefix \"{text}\": host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `lo-hi` as the fewest prefixes covering exactly that range.
fn parse_range(text: &str, lo: &str, hi: &str) -> Result<Vec<IpNet>, String> {
    let parse = |s: &str| {
        s.parse::<IpAddr>().map_err(|_| format!("invalid range \"{text}\": bad address \"{s}\""))
    };
    match (parse(lo)?, parse(hi)?) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) if lo <= hi => {
            Ok(Ipv4Subnets::new(lo, hi, 0).map(IpNet::V4).collect())
        }
        (IpAddr::V6(lo), IpAddr::V6(hi)) if lo <= hi => {
            Ok(Ipv6Subnets::new(lo, hi, 0).map(IpNet::V6).collect())
        }
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            Err(format!("invalid range \"{text}\": start is after end"))
        }
        _ => Err(format!("invalid range \"{text}\": addresses of different families")),
    }
}

fn parse_subnet(text: &str) -> Result<IpNet, String> {
    if !text.contains('/') {
        return Err(format!("\"{text}\" is not a prefix such as 198.51.100.0/24"));
    }
    parse_prefix(text)
}

fn parse_address(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| {
        if text.contains(['/', '-']) {
            format!("\"{text}\" is not a single address")
        } else {
            format!("invalid address \"{text}\"")
        }
    })
}

/// A port, a range `lo-hi`, or `None` for `*`.
fn parse_port_item(text: &str) -> Result<Option<PortRange>, String> {
    if is_any(text) {
        return Ok(None);
    }
    let port = |s: &str| -> Result<u16, String> {
        let n: u64 = s.trim().parse().map_err(|_| format!("invalid port \"{text}\""))?;
        u16::try_from(n).map_err(|_| format!("port {n} is out of range 0-65535"))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => (port(text)?, port(text)?),
    };
    if lo > hi {
        return Err(format!("invalid port range \"{text}\": start is after end"));
    }
    Ok(Some(PortRange { lo, hi }))
}

/// Sorted, with overlapping and adjacent ranges merged.
fn merge_port_ranges(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(range.hi),
            _ => merged.push(range),
        }
    }
    merged
}

/// Sorted and deduplicated.
fn normalized(mut prefixes: Vec<IpNet>) -> Vec<IpNet> {
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

/// An inclusive range of addresses as integers (IPv4 ones widened).
type Span = (u128, u128);

/// Every address of both families outside `nets`, as prefixes.
fn complement(nets: &[IpNet]) -> Vec<IpNet> {
    let (mut v4, mut v6): (Vec<Span>, Vec<Span>) = (Vec::new(), Vec::new());
    for net in nets {
        match net {
            IpNet::V4(n) => {
                v4.push((u32::from(n.network()).into(), u32::from(n.broadcast()).into()))
            }
            IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
        }
    }
    let v4_gaps = gaps(v4, u32::MAX.into()).into_iter().flat_map(|(lo, hi)| {
        Ipv4Subnets::new(Ipv4Addr::from(lo as u32), Ipv4Addr::from(hi as u32), 0).map(IpNet::V4)
    });
    let v6_gaps = gaps(v6, u128::MAX).into_iter().flat_map(|(lo, hi)| {
        Ipv6Subnets::new(Ipv6Addr::from(lo), Ipv6Addr::from(hi), 0).map(IpNet::V6)
    });
    v4_gaps.chain(v6_gaps).collect()
}

/// The inclusive ranges within `0..=max` that none of `ranges` covers.
fn gaps(mut ranges: Vec<Span>, max: u128) -> Vec<Span> {
    ranges.sort();
    let mut gaps = Vec::new();
    // The first address not covered so far; `None` once everything up to `max` is.
    let mut next = Some(0);
    for (lo, hi) in ranges {
        let Some(start) = next else { break };
        if lo > start {
            gaps.push((start, lo - 1));
        }
        if hi >= start {
            next = (hi < max).then(|| hi + 1);
        }
    }
    gaps.extend(next.map(|start| (start, max)));
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid policy; tests append to or replace parts of it. Line numbers matter.
    const BASE: &str = "\
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
application_security_groups:
  web: [198.51.100.10, 198.51.100.11]
nsgs:
  - name: web-nsg
    subnets: [198.51.100.0/25]
    rules:
      - name: allow-http
        priority: 100
        direction: inbound
        access: allow
        protocol: tcp
        source: Internet
        destination: [web]
        destination_ports: [80, 443]
";

    fn load(src: &str) -> Result<Policy, PolicyErrors> {
        load_str(src, "policy.yaml")
    }

    fn errors(src: &str) -> Vec<String> {
        load(src).expect_err("policy should be rejected").0.iter().map(|e| e.to_string()).collect()
    }

    /// BASE with a second rule (lines 17-24) with some `field: value` lines replaced or
    /// (after line 24) added.
    fn with_rule(fields: &[(&str, &str)]) -> String {
        let mut rule = vec![
            ("name", "second"),
            ("priority", "200"),
            ("direction", "inbound"),
            ("access", "deny"),
            ("protocol", "udp"),
            ("source", "\"*\""),
            ("destination", "\"*\""),
            ("destination_ports", "53"),
        ];
        for &(key, value) in fields {
            match rule.iter_mut().find(|(k, _)| *k == key) {
                Some(field) => field.1 = value,
                None => rule.push((key, value)),
            }
        }
        let mut src = BASE.to_owned();
        for (i, (key, value)) in rule.iter().enumerate() {
            let marker = if i == 0 { "- " } else { "  " };
            src += &format!("      {marker}{key}: {value}\n");
        }
        src
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(items: &[&str]) -> Vec<IpNet> {
        items.iter().map(|s| net(s)).collect()
    }

    #[test]
    fn loads_and_expands() {
        use Direction::{Inbound, Outbound};
        let policy = load(BASE).unwrap();
        assert_eq!(policy.settings, Settings::default());
        let [nsg] = &policy.nsgs[..] else { panic!("one NSG") };
        assert_eq!(nsg.subnets, nets(&["198.51.100.0/25"]));
        assert!(nsg.hosts.is_empty());
        let order: Vec<_> = nsg.rules.iter().map(|r| (r.direction, r.priority)).collect();
        assert_eq!(
            order,
            [
                (Inbound, 100),
                (Inbound, 65000),
                (Inbound, 65001),
                (Inbound, 65500),
                (Outbound, 65000),
                (Outbound, 65001),
                (Outbound, 65500)
            ]
        );
        let http = &nsg.rules[0];
        assert_eq!(http.destination, nets(&["198.51.100.10/32", "198.51.100.11/32"]));
        assert_eq!(
            http.destination_ports,
            Some(vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }])
        );
        assert_eq!(http.source_ports, None);
        assert!(!http.default && nsg.rules[1..].iter().all(|r| r.default));
        // Internet: everything outside the virtual network, in both families.
        let internet = &http.source;
        assert!(internet.contains(&net("0.0.0.0/1")) && internet.contains(&net("198.51.101.0/24")));
        assert!(!internet.iter().any(|p| p.contains(&net("198.51.100.0/24"))));
        assert!(
            internet.contains(&net("2001:db8:1:1::/64")) && internet.contains(&net("8000::/1"))
        );
        assert!(!internet.iter().any(|p| p.contains(&net("2001:db8:1::/64"))));
        assert_eq!(nsg.rules[1].source, nets(&["198.51.100.0/24", "2001:db8:1::/64"]));
        // No health probe source configured: the load balancer rule matches nothing.
        assert!(nsg.rules[2].source.is_empty());
    }

    #[test]
    fn expands_items() {
        let src = with_rule(&[
            ("source", "[any, 192.0.2.1, 192.0.2.8/29, \"192.0.2.1-192.0.2.6\", 2001:db8:2::5]"),
            ("destination_ports", "[\"*\", 80]"),
            ("source_ports", "[\"8000-8080\", 8081, 1, \"2\", 70-80]"),
        ]);
        let policy = load(&src).unwrap();
        let rule = policy.nsgs[0].rules.iter().find(|r| r.name == "second").unwrap();
        let mut expected = nets(&[
            "0.0.0.0/0",
            "::/0",
            "192.0.2.1/32",
            "192.0.2.8/29",
            "192.0.2.2/31",
            "192.0.2.4/31",
            "192.0.2.6/32",
            "2001:db8:2::5/128",
        ]);
        expected.sort();
        assert_eq!(rule.source, expected);
        assert_eq!(rule.destination_ports, None);
        let range = |lo, hi| PortRange { lo, hi };
        assert_eq!(rule.source_ports, Some(vec![range(1, 2), range(70, 80), range(8000, 8081)]));
    }

    #[test]
    fn complement_covers_the_rest() {
        assert_eq!(complement(&[]), nets(&["0.0.0.0/0", "::/0"]));
        let rest = complement(&nets(&["0.0.0.0/1", "192.0.0.0/2", "::/0"]));
        assert_eq!(rest, nets(&["128.0.0.0/2"]));
        let rest = complement(&nets(&["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "::1/128"]));
        assert_eq!(rest[..3], nets(&["0.0.0.0/5", "8.0.0.0/7", "12.0.0.0/6"]));
        assert_eq!(rest[rest.len() - 128..][0], net("::/128"));
        assert!(
            rest.contains(&net("::2/127")) && !rest.iter().any(|p| p.contains(&net("::1/128")))
        );
    }

    #[test]
    fn ports_default_to_any() {
        let src = BASE.replace("        destination_ports: [80, 443]\n", "");
        let rule = &load(&src).unwrap().nsgs[0].rules[0];
        assert_eq!((&rule.source_ports, &rule.destination_ports), (&None, &None));
    }

    #[test]
    fn priority_out_of_range() {
        assert_eq!(
            errors(&with_rule(&[("priority", "50")])),
            ["policy.yaml:18: nsgs[0].rules[1].priority: priority 50 is out of range 100-4096"]
        );
        assert_eq!(
            errors(&with_rule(&[("priority", "4097")])),
            ["policy.yaml:18: nsgs[0].rules[1].priority: priority 4097 is out of range 100-4096"]
        );
    }

    #[test]
    fn duplicate_priority() {
        assert_eq!(
            errors(&with_rule(&[("priority", "100")])),
            ["policy.yaml:18: nsgs[0].rules[1].priority: \
                 priority 100 is already used by inbound rule allow-http (line 9)"]
        );
        // Directions have separate priorities.
        assert!(load(&with_rule(&[("priority", "100"), ("direction", "Outbound")])).is_ok());
    }

    #[test]
    fn duplicate_names() {
        assert_eq!(
            errors(&with_rule(&[("name", "allow-http")])),
            [
                "policy.yaml:17: nsgs[0].rules[1].name: rule name allow-http is already used (line 9)"
            ]
        );
        assert_eq!(
            errors(&with_rule(&[("name", "DenyAllInBound")])),
            ["policy.yaml:17: nsgs[0].rules[1].name: DenyAllInBound is the name of a default rule"]
        );
        let src = format!("{BASE}  - name: web-nsg\n    hosts: [198.51.100.200]\n");
        assert_eq!(
            errors(&src),
            ["policy.yaml:17: nsgs[1].name: NSG name web-nsg is already used (line 6)"]
        );
    }

    #[test]
    fn bad_addresses() {
        let src = with_rule(&[
            ("source", "[198.51.100.300, 198.51.100.1/24, 198.51.100.0/33]"),
            (
                "destination",
                "[\"192.0.2.9-192.0.2.1\", \"192.0.2.1-2001:db8::1\", \"192.0.2.1-x\"]",
            ),
        ]);
        assert_eq!(
            errors(&src),
            [
                "policy.yaml:22: nsgs[0].rules[1].source[0]: invalid address \"198.51.100.300\"",
                "policy.yaml:22: nsgs[0].rules[1].source[1]: invalid prefix \"198.51.100.1/24\": \
                 host bits set; did you mean 198.51.100.0/24?",
                "policy.yaml:22: nsgs[0].rules[1].source[2]: invalid prefix \"198.51.100.0/33\"",
                "policy.yaml:23: nsgs[0].rules[1].destination[0]: \
                 invalid range \"192.0.2.9-192.0.2.1\": start is after end",
                "policy.yaml:23: nsgs[0].rules[1].destination[1]: \
                 invalid range \"192.0.2.1-2001:db8::1\": addresses of different families",
                "policy.yaml:23: nsgs[0].rules[1].destination[2]: \
                 invalid range \"192.0.2.1-x\": bad address \"x\"",
            ]
        );
    }

    #[test]
    fn unknown_names() {
        assert_eq!(
            errors(&with_rule(&[("source", "Intranet")])),
            ["policy.yaml:22: nsgs[0].rules[1].source: \
                 unknown service tag or application security group \"Intranet\""]
        );
        // Built-in names are case-sensitive.
        assert_eq!(errors(&with_rule(&[("destination", "[internet]")])).len(), 1);
    }

    #[test]
    fn bad_ports() {
        let src = with_rule(&[("destination_ports", "[65536, \"90-80\", http, \"1-70000\", -1]")]);
        assert_eq!(
            errors(&src),
            [
                "policy.yaml:24: nsgs[0].rules[1].destination_ports[0]: \
                 port 65536 is out of range 0-65535",
                "policy.yaml:24: nsgs[0].rules[1].destination_ports[1]: \
                 invalid port range \"90-80\": start is after end",
                "policy.yaml:24: nsgs[0].rules[1].destination_ports[2]: invalid port \"http\"",
                "policy.yaml:24: nsgs[0].rules[1].destination_ports[3]: \
                 port 70000 is out of range 0-65535",
                "policy.yaml:24: nsgs[0].rules[1].destination_ports[4]: invalid port \"-1\"",
            ]
        );
        assert_eq!(
            errors(&with_rule(&[("protocol", "icmp")])),
            ["policy.yaml:24: nsgs[0].rules[1].destination_ports: must be \"*\" for protocol icmp"]
        );
        assert_eq!(
            errors(&with_rule(&[("destination_ports", "[]")])),
            ["policy.yaml:24: nsgs[0].rules[1].destination_ports: \
                 must not be empty (use \"*\" for any port)"]
        );
    }

    #[test]
    fn bad_enumerations() {
        let src = with_rule(&[("direction", "in"), ("access", "permit"), ("protocol", "gre")]);
        assert_eq!(
            errors(&src),
            [
                "policy.yaml:19: nsgs[0].rules[1].direction: \
                 unknown direction \"in\"; expected inbound or outbound",
                "policy.yaml:20: nsgs[0].rules[1].access: \
                 unknown access \"permit\"; expected allow or deny",
                "policy.yaml:21: nsgs[0].rules[1].protocol: \
                 unknown protocol \"gre\"; expected tcp, udp, icmp, esp, ah, any or *",
            ]
        );
        let src =
            with_rule(&[("direction", "Outbound"), ("access", "DENY"), ("protocol", "\"*\"")]);
        let policy = load(&src).unwrap();
        let rule = policy.nsgs[0].rules.iter().find(|r| r.name == "second").unwrap();
        assert_eq!(
            (rule.direction, rule.access, rule.protocol),
            (Direction::Outbound, Access::Deny, Protocol::Any)
        );
    }

    #[test]
    fn table_size() {
        let rules = |count: usize| -> String {
            (0..count)
                .map(|i| {
                    format!(
                        "      - {{name: r{i}, priority: {}, direction: inbound, access: allow, \
                         protocol: any, source: '*', destination: '*', destination_ports: '*'}}\n",
                        100 + i
                    )
                })
                .collect()
        };
        let nsg = |name: &str, association: &str, count| {
            format!("  - name: {name}\n    {association}\n    rules:\n{}", rules(count))
        };
        // NSG a fills 3997 + 3 default inbound subnet-layer rules; b adds its own + 3.
        let src = |association: &str, count| {
            format!(
                "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n{}{}",
                nsg("a", "subnets: [198.51.100.0/25]", 3997),
                nsg("b", association, count)
            )
        };
        assert!(load(&src("subnets: [198.51.100.128/25]", 93)).is_ok());
        assert_eq!(
            errors(&src("subnets: [198.51.100.128/25]", 94)),
            ["policy.yaml:3: nsgs: inbound subnet-layer rules: 4097 exceed the table size 4096"]
        );
        // The host layer has tables of its own.
        assert!(load(&src("hosts: [198.51.100.200]", 94)).is_ok());
    }

    #[test]
    fn associations() {
        let src = format!("{BASE}  - name: lonely\n");
        assert_eq!(
            errors(&src),
            ["policy.yaml:17: nsgs[1]: not associated with any subnet or host"]
        );
        let src = format!(
            "{BASE}  - name: inner\n    subnets: [198.51.100.0/26]\n    hosts: [198.51.100.10]\n  \
             - name: other\n    hosts:\n      - 2001:db8:1::1\n      - 198.51.100.10\n      \
             - 198.51.100.0/24\n"
        );
        assert_eq!(
            errors(&src),
            [
                "policy.yaml:18: nsgs[1].subnets[0]: \
                 subnet 198.51.100.0/26 of NSG inner overlaps subnet 198.51.100.0/25 of NSG \
                 web-nsg (line 7)",
                "policy.yaml:23: nsgs[2].hosts[1]: \
                 host 198.51.100.10 of NSG other is already associated with NSG inner (line 19)",
                "policy.yaml:24: nsgs[2].hosts[2]: \"198.51.100.0/24\" is not a single address",
            ]
        );
    }

    #[test]
    fn settings_and_tags() {
        let src = BASE.replace(
            "application_security_groups:\n  web: [198.51.100.10, 198.51.100.11]\n",
            "application_security_groups:\n  web: [198.51.100.10, 198.51.100.0/24]\n  \
             Internet: [192.0.2.1]\nservice_tags:\n  web: [192.0.2.0/24]\n  \
             Mon: [foo, \"192.0.2.10-192.0.2.12\"]\nsettings:\n  tcp_idle_timeout: 3\n  \
             udp_idle_timeout: 7200\n  icmp_idle_timeout: 7201\n",
        );
        assert_eq!(
            errors(&src),
            [
                "policy.yaml:4: application_security_groups.web: \
                 web is also defined as a service tag",
                "policy.yaml:4: application_security_groups.web[1]: \
                 \"198.51.100.0/24\" is not a single address",
                "policy.yaml:5: application_security_groups.Internet: \
                 application security group Internet would shadow the built-in Internet",
                "policy.yaml:8: service_tags.Mon[0]: \"foo\" is not an address, prefix or range",
                "policy.yaml:10: settings.tcp_idle_timeout: \
                 timeout 3 is out of range 4-7200 seconds",
                "policy.yaml:12: settings.icmp_idle_timeout: \
                 timeout 7201 is out of range 4-7200 seconds",
            ]
        );
    }

    #[test]
    fn serde_errors() {
        let src = BASE.replace("        priority: 100", "        priority: 100\n        prio: 1");
        assert_eq!(
            errors(&src),
            ["policy.yaml:11: nsgs[0].rules[0]: unknown field `prio`, expected one of `name`, \
                 `priority`, `direction`, `access`, `protocol`, `source`, `source_ports`, \
                 `destination`, `destination_ports`"]
        );
        let src = BASE.replace("priority: 100", "priority: high");
        assert_eq!(
            errors(&src),
            ["policy.yaml:10: nsgs[0].rules[0].priority: \
                 invalid type: string \"high\", expected i64"]
        );
        let src = BASE.replace("    rules:", "   rules:");
        assert_eq!(errors(&src).len(), 1);
        assert_eq!(
            errors(&BASE.replace("source: Internet", "source: *")),
            ["policy.yaml:14: did not find expected alphabetic or numeric character, \
                 while scanning an alias at line 14 column 17 (write \"*\" quoted)"]
        );
        assert_eq!(errors("nsgs: []\n"), ["policy.yaml:1: missing field `virtual_network`"]);
    }

    #[test]
    fn empty_address_space() {
        let src = BASE.replace("[198.51.100.0/24, 2001:db8:1::/64]", "[]");
        assert_eq!(
            errors(&src),
            ["policy.yaml:2: virtual_network.address_space: must not be empty"]
        );
    }

    #[test]
    fn read_error() {
        let err = load_file(Path::new("/nonexistent/policy.yaml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/nonexistent/policy.yaml:0: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn example_policy_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/example.yaml");
        let policy = load_file(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
        assert!(policy.nsgs.len() >= 2);
    }
}
