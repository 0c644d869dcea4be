//! The validated, expanded form of a policy: what the compiler and the evaluators consume.
//! Service tags, application security groups and default rules are already expanded here.

use ipnet::IpNet;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Allow,
    Deny,
}

/// `Icmp` is ICMP of the packet's address family: protocol 1 under IPv4, next header 58
/// under IPv6 (`xdpgate_common::is_icmp`). The other family's number is a plain protocol
/// that only `Any` matches.
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
    /// The IP protocol number this matches in either family; `None` for `Icmp`, whose
    /// number is its family's (`xdpgate_common::icmp_proto`), and for `Any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Esp => Some(50),
            Protocol::Ah => Some(51),
            Protocol::Icmp | Protocol::Any => None,
        }
    }

    /// Whether a packet of address family `family` (4 or 6) and protocol `proto` matches.
    pub fn matches(self, family: u8, proto: u8) -> bool {
        match self {
            Protocol::Any => true,
            Protocol::Icmp => xdpgate_common::is_icmp(family, proto),
            p => p.number() == Some(proto),
        }
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

/// A rule side's prefixes.
pub type Prefixes = std::sync::Arc<[IpNet]>;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rule {
    pub name: String,
    pub priority: u32,
    pub direction: Direction,
    pub access: Access,
    pub protocol: Protocol,
    /// Expanded to prefixes; "any" is `0.0.0.0/0` and `::/0`. Shared, not copied, where
    /// every NSG's default rules name the same tag.
    pub source: Prefixes,
    pub destination: Prefixes,
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
    /// Seconds an embryonic (unconfirmed) flow may idle (default 60; conntrack uses 60-120
    /// for a TCP handshake).
    pub embryonic_timeout: u32,
    /// Take up a TCP segment other than a SYN that has no flow as a new flow (default
    /// false), for every flow; load-balancing rules can ask for it on their own.
    pub midstream_pickup: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tcp_idle_timeout: 240,
            udp_idle_timeout: 240,
            icmp_idle_timeout: 30,
            reevaluate_flows: true,
            embryonic_timeout: 60,
            midstream_pickup: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    pub nsgs: Vec<Nsg>,
    pub load_balancers: Vec<LoadBalancer>,
    pub nat_gateways: Vec<NatGateway>,
    /// The virtual network's address space and peered ranges (the `VirtualNetwork` tag):
    /// traffic between these addresses is never source-NATed.
    pub virtual_network: Vec<IpNet>,
    pub settings: Settings,
    /// Named address sets with their elements as the file lists them; rules name them like
    /// service tags, and match [`Policy::set_elements`].
    pub sets: std::collections::BTreeMap<String, Vec<crate::sets::Element>>,
    /// The run-time changes (`xdpgate set`) the policy was loaded with.
    pub set_changes: crate::sets::SetChanges,
}

impl Policy {
    /// The elements set `name` runs with: the file's with the run-time changes.
    pub fn set_elements(&self, name: &str) -> Option<Vec<crate::sets::Element>> {
        Some(self.set_changes.effective(name, self.sets.get(name)?))
    }
}

/// An Azure-style NAT gateway: outbound flows from its subnets to destinations outside the
/// virtual network leave with one of its public addresses and a port from its range.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NatGateway {
    pub name: String,
    /// Public addresses (prefixes expanded), one family or both; at most 16.
    pub public_addresses: Vec<std::net::IpAddr>,
    /// Subnets whose outbound traffic it translates (never overlapping another gateway's).
    pub subnets: Vec<IpNet>,
    /// Seconds a TCP translation may idle (Azure: 4-120 minutes; default 4 minutes).
    pub tcp_idle_timeout: u32,
    /// Seconds a UDP or ICMP translation may idle (default 240; 4..=7200 accepted).
    pub udp_idle_timeout: u32,
    /// Seconds a released port stays unused for the same destination (default 10).
    pub port_reuse_cooldown: u32,
    /// Inclusive port range to allocate from (default 1024-65535).
    pub ports: PortRange,
}

impl NatGateway {
    /// `port_reuse_cooldown` unless the policy sets one.
    pub const DEFAULT_PORT_REUSE_COOLDOWN: u32 = 10;
}

/// An Azure-style Layer-4 load balancer. All cross references (frontend, pool, probe) are
/// validated and resolved to indices into this load balancer's lists.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoadBalancer {
    pub name: String,
    pub frontends: Vec<Frontend>,
    pub pools: Vec<BackendPool>,
    pub probes: Vec<Probe>,
    /// Load-balancing rules, HA-ports rules included (protocol `All`, frontend port 0).
    pub rules: Vec<LbRule>,
    pub inbound_nat_rules: Vec<InboundNatRule>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Frontend {
    pub name: String,
    pub address: std::net::IpAddr,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackendPool {
    pub name: String,
    /// Unique addresses, in the order written.
    pub backends: Vec<Backend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Backend {
    pub address: std::net::IpAddr,
    /// Relative share of new flows, 1..=100 (default 1).
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// Healthy when a TCP connection to the port is accepted.
    Tcp,
    /// Healthy only when `GET path` answers 200.
    Http,
    /// Like `Http`, over TLS (the backend's certificate is not verified, as Azure does not).
    Https,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Probe {
    pub name: String,
    pub kind: ProbeKind,
    pub port: u16,
    /// Request path for HTTP(S) probes (default "/").
    pub path: String,
    /// Milliseconds between probes of one backend (default 5000, 100..=300000).
    pub interval_ms: u32,
    /// Milliseconds a probe may take (default the interval, at most the interval).
    pub timeout_ms: u32,
    /// Consecutive results that change a backend's state: this many failures take it out,
    /// this many successes put it back (default 2, 1..=100).
    pub threshold: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LbProtocol {
    Tcp,
    Udp,
    /// Every protocol (HA-ports rules).
    All,
}

/// Which packet fields pick the backend (Azure's distribution modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// 5-tuple hash.
    Default,
    /// Source and destination address.
    SourceIp,
    /// Source and destination address and protocol.
    SourceIpProtocol,
}

/// What new flows do when every backend of the pool is unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllDown {
    /// No new flows (default): they are dropped and counted.
    NoNewFlows,
    /// Spread new flows over every backend, healthy or not.
    SendToAll,
}

/// How a load-balancing rule's packets reach the backend (`forwarding:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// The destination becomes the backend (default); replies come back through the gateway,
    /// which translates them back.
    Dnat,
    /// Floating IP: the destination stays the frontend address, the packet goes to the
    /// backend on an attached segment, which answers the client directly.
    FloatingIp,
    /// As floating IP, wrapped in an outer IP header to the backend (IPv4 in IPv4, IPv6 in
    /// IPv6), so the backend may sit in any subnet.
    Ipip,
}

impl Forwarding {
    /// The packet reaches the backend with the frontend address and port (direct server
    /// return).
    pub fn keeps_destination(self) -> bool {
        self != Forwarding::Dnat
    }

    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Dnat => "dnat",
            Forwarding::FloatingIp => "floating_ip",
            Forwarding::Ipip => "ipip",
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LbRule {
    pub name: String,
    /// Index into `LoadBalancer::frontends`.
    pub frontend: usize,
    pub protocol: LbProtocol,
    /// 0 with protocol `All`: an HA-ports rule, every port of the frontend.
    pub frontend_port: u16,
    /// 0: the frontend port (required for HA ports).
    pub backend_port: u16,
    /// Index into `LoadBalancer::pools`.
    pub pool: usize,
    /// Index into `LoadBalancer::probes`; `None`: backends are always considered healthy.
    pub probe: Option<usize>,
    pub distribution: Distribution,
    /// Seconds its flows may idle (4..=7200); 0 (the default): the policy's timeout for the
    /// flow's protocol.
    pub idle_timeout: u32,
    /// How packets reach the backend (`floating_ip: true` is the older spelling of
    /// `forwarding: floating_ip`).
    pub forwarding: Forwarding,
    /// Take up a TCP segment other than a SYN with no flow as a new flow through this rule:
    /// Maglev sends it to the backend it chose before while the backends are unchanged (for
    /// flows that move between gateways, or whose flow state was lost). On by default with
    /// `forwarding: ipip`, whose flows move between gateways behind ECMP.
    pub midstream_pickup: bool,
    pub all_down: AllDown,
}

/// Forwards one frontend port to one backend, or a frontend port range across a pool: the
/// i-th port of the range goes to the i-th backend of the pool.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InboundNatRule {
    pub name: String,
    pub frontend: usize,
    /// Tcp or Udp.
    pub protocol: LbProtocol,
    /// First frontend port of the range (the only one for a single-backend rule).
    pub frontend_port_start: u16,
    /// Explicit (frontend port, backend address) pairs this rule produces, in order.
    pub mappings: Vec<(u16, std::net::IpAddr)>,
    pub backend_port: u16,
}

/// The layer an NSG is applied at. Inbound: subnet then host; outbound: host then subnet;
/// every layer that has an NSG for the local address must allow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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
