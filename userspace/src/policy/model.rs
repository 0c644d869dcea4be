//! The validated, expanded form of a policy: what the compiler and the evaluators consume.
//! Service tags, application security groups and default rules are already expanded here.

use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Allow,
    Deny,
}

/// `Icmp` covers ICMP (1) and ICMPv6 (58).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Esp,
    Ah,
    Any,
}

impl Protocol {
    /// IP protocol numbers this matches; empty for `Any`.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[6],
            Protocol::Udp => &[17],
            Protocol::Icmp => &[1, 58],
            Protocol::Esp => &[50],
            Protocol::Ah => &[51],
            Protocol::Any => &[],
        }
    }

    pub fn matches(self, proto: u8) -> bool {
        self == Protocol::Any || self.numbers().contains(&proto)
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// `None` is `*` (any port, and also packets that carry no port: ICMP, ESP, AH, non-first
/// fragments). `Some(ranges)` matches only packets with a port inside one of the ranges.
pub type Ports = Option<Vec<PortRange>>;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rule {
    pub name: String,
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub protocol: Protocol,
    /// Expanded to prefixes; "any" is `0.0.0.0/0` and `::/0`.
    pub source: Vec<IpNet>,
    pub destination: Vec<IpNet>,
    pub source_ports: Ports,
    pub destination_ports: Ports,
    /// One of Azure's default rules (priority 65000 and above).
    pub default: bool,
}

/// What an NSG is associated with. Subnets of different NSGs never overlap and a host
/// belongs to at most one NSG (validation guarantees it).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Nsg {
    pub name: String,
    /// Subnet prefixes (the subnet layer).
    pub subnets: Vec<IpNet>,
    /// Host addresses as /32 or /128 (the network-interface layer).
    pub hosts: Vec<IpNet>,
    /// Effective rules of both directions, defaults included, sorted by (direction, priority).
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Settings {
    /// Idle timeouts in seconds.
    pub tcp_idle_timeout: u32,
    pub udp_idle_timeout: u32,
    pub icmp_idle_timeout: u32,
    /// After a policy change, flows decided under the old policy are classified again
    /// (default true): removing an allow rule cuts the flows it allowed.
    pub reevaluate_flows: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tcp_idle_timeout: 240,
            udp_idle_timeout: 240,
            icmp_idle_timeout: 30,
            reevaluate_flows: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    pub nsgs: Vec<Nsg>,
    pub settings: Settings,
}

/// The layer an NSG is applied at. Inbound: subnet then host; outbound: host then subnet;
/// every layer that has an NSG for the local address must allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Subnet,
    Host,
}

impl Nsg {
    /// The association prefixes of `layer`.
    pub fn associated(&self, layer: Layer) -> &[IpNet] {
        match layer {
            Layer::Subnet => &self.subnets,
            Layer::Host => &self.hosts,
        }
    }
}
