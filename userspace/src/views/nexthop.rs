//! `xdpgate next-hop`: where the dataplane would send a flow. The running policy's load
//! balancers and NAT gateways translate it first (as the new-flow stage would), then the
//! kernel's FIB is asked exactly as the forwarding stage asks it (`bpf_fib_lookup` from XDP,
//! see `xdpgate_dataplane::fib`), and the answer is read against the interfaces xdpgate is
//! attached to: redirected by the dataplane, or handed to the host's stack.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use serde::Serialize;
use xdpgate_dataplane::{
    Hook, PinDir, apply, drain,
    fib::{self, NeighbourState, Outcome},
    flows::protocol_name,
    lb, probes,
};
use xdpgate_policy::{LbProtocol, Policy};

use crate::{
    host_addrs,
    status::{self, IfaceStatus},
};

use super::{OutputArgs, View};

/// A flow as the operator names it, shared by `next-hop` and `connectivity`.
#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    /// Source of the flow: ADDRESS, or ADDRESS:PORT ([v6]:PORT) for TCP and UDP.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub src: String,
    /// Destination of the flow: ADDRESS, or ADDRESS:PORT ([v6]:PORT) for TCP and UDP.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub dst: String,
    /// tcp, udp, icmp (ICMPv6 for IPv6 addresses), icmpv6, esp, ah, sctp or a protocol
    /// number. Default: tcp when --dst has a port, icmp otherwise.
    #[arg(long)]
    pub protocol: Option<String>,
    /// The interface the flow arrives by. Default: the one the route back to --src leaves
    /// by (none when --src is this host's own address).
    #[arg(long, value_name = "NAME")]
    pub iface: Option<String>,
}

/// A flow, parsed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Flow {
    #[serde(serialize_with = "ser_protocol")]
    pub protocol: (u8, u8),
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

fn ser_protocol<S: serde::Serializer>(p: &(u8, u8), s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&protocol_name(p.0, p.1))
}

impl Flow {
    pub fn proto(&self) -> u8 {
        self.protocol.1
    }

    /// `tcp 10.0.0.1:4000 -> 192.0.2.1:80`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} -> {}",
            protocol_name(self.protocol.0, self.protocol.1),
            endpoint_string(self.src, self.src_port),
            endpoint_string(self.dst, self.dst_port)
        )
    }
}

pub fn endpoint_string(addr: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => SocketAddr::new(addr, p).to_string(),
        None => addr.to_string(),
    }
}

fn parse_endpoint(flag: &str, s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    s.parse().map(|a| (a, None)).map_err(|_| {
        anyhow!("{flag} {s:?} is not an address or address:port (IPv6 with a port: [v6]:PORT)")
    })
}

/// What `dst` is, and why no unicast route leads to it: multicast, the limited broadcast
/// or unspecified.
fn not_unicast(dst: IpAddr) -> Option<&'static str> {
    match dst {
        a if a.is_multicast() => Some(
            "a multicast address (the kernel forwards multicast only by a multicast router's \
             routes, and takes it in for the groups this host joined)",
        ),
        a if a.is_unspecified() => Some("the unspecified address (no packet goes to it)"),
        IpAddr::V4(a) if a.is_broadcast() => {
            Some("the limited broadcast address (it stays on the link it is sent on)")
        }
        _ => None,
    }
}

impl FlowArgs {
    pub fn flow(&self) -> Result<Flow> {
        let (src, src_port) = parse_endpoint("--src", &self.src)?;
        let (dst, dst_port) = parse_endpoint("--dst", &self.dst)?;
        if src.is_ipv4() != dst.is_ipv4() {
            bail!("--src and --dst must be of the same address family");
        }
        if let Some(what) = not_unicast(dst) {
            bail!("--dst {dst} is {what}; next-hop and connectivity answer for a unicast one");
        }
        let family = if src.is_ipv4() { 4 } else { 6 };
        let default = if dst_port.is_some() { "tcp" } else { "icmp" };
        let name = self.protocol.as_deref().unwrap_or(default);
        let proto = crate::filter::protocol_number(name, family).map_err(|e| anyhow!(e))?;
        let ported = proto == 6 || proto == 17;
        if !ported && (src_port.is_some() || dst_port.is_some()) {
            bail!("protocol {name} has no ports: leave the port out of --src and --dst");
        }
        if ported && dst_port.is_none() {
            bail!("{name} needs a destination port: --dst ADDRESS:PORT ([v6]:PORT for IPv6)");
        }
        // An unnamed source port: any ephemeral one (it changes no route, nor, unless a rule
        // names source ports, a verdict).
        let src_port = if ported { Some(src_port.unwrap_or(49152)) } else { None };
        Ok(Flow { protocol: (family, proto), src, dst, src_port, dst_port })
    }
}

/// The policy applied to this dataplane, if any.
pub fn running_policy(pins: &PinDir) -> Result<Option<Policy>> {
    let Some((path, source)) = apply::applied_source(pins) else { return Ok(None) };
    xdpgate_policy::load_str(&source, &path.display().to_string())
        .map(Some)
        .map_err(|e| anyhow!("the applied policy {}: {e}", path.display()))
}

/// A backend of a load-balancing rule and whether the dataplane sends new flows to it: it
/// does when the backend is healthy and not drained (`xdpgate lb drain`).
#[derive(Debug, Clone, Serialize)]
pub struct BackendHealth {
    pub address: IpAddr,
    pub healthy: bool,
    pub drained: bool,
}

impl BackendHealth {
    /// Whether it takes new flows.
    pub fn in_rotation(&self) -> bool {
        self.healthy && !self.drained
    }
}

/// What decides which backends take new flows: the running agent's probes (per probe and
/// backend, as it builds each rule's table), else the dataplane's health flags (down when
/// any probe of a backend fails, what `apply` builds from without an agent); and the
/// operator's drains.
#[derive(Default)]
pub struct Rotation {
    pub unhealthy: HashSet<IpAddr>,
    pub probes: Option<probes::ProbeHealth>,
    pub drained: drain::Drained,
}

impl Rotation {
    /// As the dataplane in `pins` holds them (nothing, without a `policy`).
    pub fn read(pins: &PinDir, policy: Option<&Policy>) -> Result<Self> {
        if policy.is_none() {
            return Ok(Self::default());
        }
        Ok(Self {
            unhealthy: lb::pinned_unhealthy(pins)?,
            probes: probes::ProbeHealth::of_running_agent(pins)?,
            drained: drain::read_warned(pins)?,
        })
    }

    /// Whether `backend` passes `lb`'s probe `probe` (a rule without one: always).
    fn healthy(
        &self,
        lb: &xdpgate_policy::LoadBalancer,
        probe: Option<usize>,
        backend: IpAddr,
    ) -> bool {
        let Some(probe) = probe else { return true };
        match &self.probes {
            Some(p) => !p.down.contains(&probes::ProbeKey {
                backend,
                lb: lb.name.clone(),
                probe: lb.probes[probe].name.clone(),
            }),
            None => !self.unhealthy.contains(&backend),
        }
    }
}

/// What the dataplane does to the flow's addresses before it forwards it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Translation {
    /// A load-balancing rule's frontend: the destination becomes a backend.
    LoadBalancer {
        load_balancer: String,
        rule: String,
        backends: Vec<BackendHealth>,
        /// The backend looked up here: the one the running tables give this flow (`picked`),
        /// or where its ports are not known (or for ICMP), the first one new flows may go to.
        /// `None`: none takes new flows.
        backend: Option<IpAddr>,
        /// Whether `backend` is the flow's own, as the dataplane's Maglev table picks it.
        picked: bool,
        backend_port: Option<u16>,
        /// Direct server return: the destination address stays the frontend's (floating IP,
        /// or encapsulation: `forwarding`).
        floating_ip: bool,
        /// `dnat`, `floating_ip` or `ipip` (then the FIB is asked about the outer packet,
        /// to the backend, as here).
        forwarding: &'static str,
        /// All backends down, and the rule sends new flows to all of them anyway.
        send_to_all: bool,
    },
    /// An inbound NAT rule: one frontend port to one backend.
    InboundNat { load_balancer: String, rule: String, backend: IpAddr, backend_port: u16 },
    /// A NAT gateway: the source becomes one of its public addresses.
    NatGateway { gateway: String, public_addresses: Vec<IpAddr>, port_first: u16, port_last: u16 },
}

/// A load-balancing rule's backends with their health as its table is built (a rule
/// without a probe counts every backend healthy) and their drains.
pub fn backend_health(
    lb: &xdpgate_policy::LoadBalancer,
    rule: &xdpgate_policy::LbRule,
    rotation: &Rotation,
) -> Vec<BackendHealth> {
    lb.pools[rule.pool]
        .backends
        .iter()
        .map(|b| BackendHealth {
            address: b.address,
            healthy: rotation.healthy(lb, rule.probe, b.address),
            drained: rotation.drained.contains(&lb.name, b.address),
        })
        .collect()
}

fn lb_protocol_matches(p: LbProtocol, proto: u8) -> bool {
    match p {
        LbProtocol::Tcp => proto == 6,
        LbProtocol::Udp => proto == 17,
        LbProtocol::All => true,
    }
}

/// The translation the new-flow stage would give `flow`, arriving inbound or outbound.
pub fn translation(
    policy: &Policy,
    rotation: &Rotation,
    flow: &Flow,
    outbound: bool,
) -> Option<Translation> {
    let port = flow.dst_port.unwrap_or(0);
    for lb in &policy.load_balancers {
        for rule in &lb.rules {
            let fe = &lb.frontends[rule.frontend];
            if fe.address != flow.dst
                || !lb_protocol_matches(rule.protocol, flow.proto())
                || (rule.frontend_port != 0 && rule.frontend_port != port)
            {
                continue;
            }
            let backends = backend_health(lb, rule, rotation);
            let send_to_all = !backends.iter().any(BackendHealth::in_rotation)
                && rule.all_down == xdpgate_policy::AllDown::SendToAll;
            let backend =
                backends.iter().find(|b| b.in_rotation() || send_to_all).map(|b| b.address);
            let backend_port = flow.dst_port.map(|p| match rule.backend_port {
                0 => p,
                b => b,
            });
            return Some(Translation::LoadBalancer {
                load_balancer: lb.name.clone(),
                rule: rule.name.clone(),
                backends,
                backend,
                picked: false,
                backend_port,
                floating_ip: rule.forwarding.keeps_destination(),
                forwarding: rule.forwarding.name(),
                send_to_all,
            });
        }
        for rule in &lb.inbound_nat_rules {
            let fe = &lb.frontends[rule.frontend];
            if fe.address != flow.dst || !lb_protocol_matches(rule.protocol, flow.proto()) {
                continue;
            }
            if let Some((_, backend)) = rule.mappings.iter().find(|(p, _)| *p == port) {
                return Some(Translation::InboundNat {
                    load_balancer: lb.name.clone(),
                    rule: rule.name.clone(),
                    backend: *backend,
                    backend_port: rule.backend_port,
                });
            }
        }
    }
    if !outbound
        || !routed(flow.dst)
        || policy.virtual_network.iter().any(|n| n.contains(&flow.dst))
    {
        return None;
    }
    // The gateway of the longest subnet holding the source (subnets never overlap across
    // gateways, so there is at most one).
    policy
        .nat_gateways
        .iter()
        .filter(|g| g.subnets.iter().any(|n| n.contains(&flow.src)))
        .map(|g| {
            let public: Vec<IpAddr> = g
                .public_addresses
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == flow.src.is_ipv4())
                .collect();
            Translation::NatGateway {
                gateway: g.name.clone(),
                public_addresses: public,
                port_first: g.ports.lo,
                port_last: g.ports.hi,
            }
        })
        .next()
}

/// Whether `dst` is routed on: a NAT gateway leaves multicast, broadcast and IPv6
/// link-local destinations untranslated, as the dataplane's `snat::routed` does.
fn routed(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => !a.is_multicast() && !a.is_broadcast(),
        IpAddr::V6(a) => !a.is_multicast() && !a.is_unicast_link_local(),
    }
}

impl Translation {
    /// The flow as the forwarding stage sees it after this translation (`None`: no backend
    /// to send it to).
    pub fn apply(&self, flow: &Flow) -> Option<Flow> {
        let mut out = *flow;
        match self {
            // With a floating IP the destination stays the frontend's, but the packet is
            // still sent towards the backend: the FIB is asked about the backend alike.
            Translation::LoadBalancer { backend, backend_port, floating_ip, .. } => {
                out.dst = (*backend)?;
                if !floating_ip {
                    out.dst_port = *backend_port;
                }
            }
            Translation::InboundNat { backend, backend_port, .. } => {
                out.dst = *backend;
                out.dst_port = flow.dst_port.map(|_| *backend_port);
            }
            Translation::NatGateway { public_addresses, port_first, .. } => {
                out.src = *public_addresses.first()?;
                out.src_port = flow.src_port.map(|_| *port_first);
            }
        }
        Some(out)
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Translation::LoadBalancer {
                load_balancer,
                rule,
                backends,
                backend,
                picked,
                backend_port,
                floating_ip,
                forwarding,
                send_to_all,
            } => {
                let healthy = backends.iter().filter(|b| b.healthy).count();
                let drained = match backends.iter().filter(|b| b.drained).count() {
                    0 => String::new(),
                    n => format!(", {n} drained"),
                };
                let to = match backend {
                    Some(b) if *forwarding == "ipip" => {
                        format!("backend {b} (encapsulated: dst kept)")
                    }
                    Some(b) if *floating_ip => format!("backend {b} (floating IP: dst kept)"),
                    Some(b) => format!("backend {}", endpoint_string(*b, *backend_port)),
                    None if healthy > 0 => {
                        "no backend in rotation (the healthy ones are drained)".into()
                    }
                    None => "no healthy backend".into(),
                };
                let all = if *send_to_all { ", all down: sent to all" } else { "" };
                let which = match backend {
                    Some(_) if !*picked => ", the first of them: the flow's ports pick its own",
                    _ => "",
                };
                format!(
                    "load balancer {load_balancer}, rule {rule}: {to} ({healthy} of {} \
                     backends healthy{drained}{all}{which})",
                    backends.len()
                )
            }
            Translation::InboundNat { load_balancer, rule, backend, backend_port } => format!(
                "load balancer {load_balancer}, inbound NAT rule {rule}: backend {}",
                SocketAddr::new(*backend, *backend_port)
            ),
            Translation::NatGateway { gateway, public_addresses, port_first, port_last } => {
                let addrs: Vec<String> = public_addresses.iter().map(|a| a.to_string()).collect();
                format!(
                    "NAT gateway {gateway}: source becomes {} port {port_first}-{port_last}",
                    if addrs.is_empty() {
                        "(no public address of this family)".into()
                    } else {
                        addrs.join(" or ")
                    }
                )
            }
        }
    }
}

/// An interface with what xdpgate knows of it.
#[derive(Debug, Clone, Serialize)]
pub struct Interface {
    pub interface: String,
    pub ifindex: u32,
    /// external or internal, when xdpgate is attached to it.
    pub role: Option<&'static str>,
    /// xdp or tc, when attached.
    pub hook: Option<Hook>,
}

/// The neighbour entry the packet needs.
#[derive(Debug, Clone, Serialize)]
pub struct NeighbourReport {
    pub address: IpAddr,
    /// The kernel's state for it, or none when there is no entry.
    pub state: NeighbourState,
    pub mac: Option<String>,
}

/// How the packet leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// The dataplane redirects it out of the egress interface itself.
    Redirect,
    /// The dataplane passes it to the host's stack, which routes it.
    Stack,
    /// Delivered to this host.
    Local,
    /// Dropped by the kernel as it arrives: a loopback address on a packet from outside
    /// (a martian).
    Martian,
    /// Nowhere: no route (or a blackhole, unreachable or prohibit route).
    NoRoute,
    /// The stack cannot reach the next hop: its neighbour entry failed.
    NeighbourFailed,
    /// Forwarding is off on the arrival interface.
    ForwardingDisabled,
    /// No backend takes new flows.
    NoBackend,
    /// To a frontend address on a port or protocol no rule serves, routed on: dropped
    /// (`no_lb_rule`).
    NoLbRule,
    /// Through a NAT gateway, a protocol it has no port to claim for: dropped
    /// (`nat_untranslatable`).
    NatUntranslatable,
    /// A floating-IP or encapsulated packet the dataplane cannot send itself (no neighbour
    /// entry yet, an interface it may not redirect to): it cannot go to the host's stack
    /// instead, so it is dropped (`direct_unreachable`, `encap_unreachable`).
    Dropped,
}

/// What `next-hop` says.
#[derive(Debug, Clone, Serialize)]
pub struct NextHop {
    pub flow: Flow,
    /// The interface the flow arrives by; `None`: sent by this host.
    pub arrival: Option<Interface>,
    pub translation: Option<Translation>,
    /// The flow the FIB was asked about (after translation).
    pub looked_up: Option<Flow>,
    /// How it was asked.
    pub method: &'static str,
    pub outcome: Option<Outcome>,
    pub egress: Option<Interface>,
    pub gateway: Option<IpAddr>,
    pub neighbour: Option<NeighbourReport>,
    pub mtu: Option<u32>,
    pub forwarding: Forwarding,
    /// Why, in words.
    pub reason: String,
    /// Why the answers would not come back through the gateway (see [`reply_bypass`]), in
    /// words; `None`: they do, or nothing is translated.
    pub reply_bypasses_gateway: Option<String>,
}

impl NextHop {
    /// `flow` arriving by `arrival`, not looked up yet.
    fn new(flow: Flow, arrival: Option<Interface>) -> Self {
        NextHop {
            flow,
            arrival,
            translation: None,
            looked_up: None,
            method: METHOD,
            outcome: None,
            egress: None,
            gateway: None,
            neighbour: None,
            mtu: None,
            forwarding: Forwarding::NoBackend,
            reason: String::new(),
            reply_bypasses_gateway: None,
        }
    }
}

const METHOD: &str = "bpf_fib_lookup from XDP (BPF_PROG_TEST_RUN), as the forwarding stage";

fn interface(ifindex: u32, attached: &[IfaceStatus]) -> Interface {
    let a = attached.iter().find(|i| i.ifindex == Some(ifindex) && i.place == "here");
    Interface {
        interface: fib::ifname(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}")),
        ifindex,
        role: a.and_then(|a| a.role),
        hook: a.and_then(|a| a.hook),
    }
}

/// The interface the route back to `src` leaves by: where its packets arrive. `None` when
/// `src` is this host's (or unreachable from here).
fn arrival_of(flow: &Flow) -> Result<Option<u32>> {
    // A loopback address is no source the FIB routes from (IPv6 finds no route): the way
    // back is the route to the source alone.
    let src = match flow.dst {
        IpAddr::V4(a) if a.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(a) if a.is_loopback() => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        a => a,
    };
    let back = fib::lookup(&fib::Query {
        src,
        dst: flow.src,
        proto: flow.proto(),
        sport: flow.dst_port.unwrap_or(0),
        dport: flow.src_port.unwrap_or(0),
        ifindex: LOOPBACK,
    })?;
    Ok(back.ifindex)
}

/// The loopback device's ifindex (always 1).
const LOOPBACK: u32 = 1;

/// Why the kernel drops `flow` as it arrives by `arrival`, if it does: a loopback
/// destination (or source) on a packet from outside is a martian (IPv4's 127/8 is routed
/// where the interface's `route_localnet` is on).
fn martian(flow: &Flow, arrival: Option<&Interface>) -> Option<String> {
    let a = arrival.filter(|a| a.ifindex != LOOPBACK)?;
    let (which, addr) = [("destination", flow.dst), ("source", flow.src)]
        .into_iter()
        .find(|(_, addr)| addr.is_loopback())?;
    let localnet =
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{}/route_localnet", a.interface));
    if addr.is_ipv4() && localnet.is_ok_and(|v| v.trim() == "1") {
        return None;
    }
    Some(format!(
        "{addr} is a loopback address: the kernel drops a packet with that {which} arriving \
         by {}, not the loopback device, as a martian",
        a.interface
    ))
}

/// Answers `next-hop` for `flow` arriving by `iface` (or the interface the route to its
/// source leaves by).
pub fn resolve(pins: &PinDir, flow: &Flow, iface: Option<&str>) -> Result<NextHop> {
    let attached = if pins.path().exists() { status::read(pins)?.interfaces } else { vec![] };
    let arrival = match iface {
        Some(name) => Some(fib::ifindex(name)?),
        None if host_addrs::is_local(flow.src)? => None,
        None => Some(arrival_of(flow)?.ok_or_else(|| {
            anyhow!(
                "no route back to {}: cannot tell which interface its packets arrive by; \
                 name it with --iface",
                flow.src
            )
        })?),
    };
    let arrival = arrival.map(|i| interface(i, &attached));
    let outbound = arrival.as_ref().is_some_and(|a| a.role == Some("internal"));
    let policy = if pins.path().exists() { running_policy(pins)? } else { None };
    let rotation = Rotation::read(pins, policy.as_ref())?;
    // Arriving by an interface xdpgate is not attached to, nothing translates it: the
    // stack routes the destination as it is.
    let unattached = arrival.as_ref().is_some_and(|a| a.hook.is_none());
    let mut translation = policy
        .as_ref()
        .filter(|_| !unattached)
        .and_then(|p| translation(p, &rotation, flow, outbound));
    if let Some(Translation::LoadBalancer { backend: Some(backend), picked, .. }) =
        translation.as_mut()
    {
        // The flow's own backend where its fields are known: TCP and UDP with both ports,
        // a protocol without ports (an echo's identifier is not asked for).
        let ports = match flow.proto() {
            6 | 17 => flow.src_port.zip(flow.dst_port),
            p if xdpgate_common::is_icmp(flow.protocol.0, p) => None,
            _ => Some((0, 0)),
        };
        if let Some(ports) = ports
            && let Ok(Some(own)) = lb::pick(pins, flow.src, flow.dst, flow.proto(), ports)
        {
            (*backend, *picked) = (own, true);
        }
    }
    let mut hop = NextHop { translation: translation.clone(), ..NextHop::new(*flow, arrival) };
    if let Some(why) = martian(flow, hop.arrival.as_ref()) {
        (hop.looked_up, hop.forwarding, hop.reason) = (Some(*flow), Forwarding::Martian, why);
        return Ok(hop);
    }
    // A NAT gateway claims a port, or an echo's identifier: the dataplane drops what has
    // neither (ESP, GRE, ICMP other than echo), as its `snat::translatable` says, untranslated
    // and unrouted.
    if let Some(Translation::NatGateway { gateway, .. }) = &translation
        && !matches!(flow.proto(), 6 | 17)
        && !xdpgate_common::is_icmp(flow.protocol.0, flow.proto())
    {
        hop.translation = None;
        hop.forwarding = Forwarding::NatUntranslatable;
        hop.reason = format!(
            "NAT gateway {gateway} translates TCP, UDP and ICMP echo only: the dataplane \
             drops {} from its subnets (nat_untranslatable)",
            protocol_name(flow.protocol.0, flow.proto())
        );
        return Ok(hop);
    }
    let looked_up = match &translation {
        Some(t) => match t.apply(flow) {
            Some(f) => f,
            None => {
                hop.reason = format!("no backend to send it to: {}", t.describe());
                return Ok(hop);
            }
        },
        None => *flow,
    };
    // An encapsulated flow leaves as its outer packet, from the node's outer source, IP in
    // IP: the dataplane asks the FIB about that one.
    let looked_up = match &translation {
        Some(Translation::LoadBalancer { forwarding: "ipip", .. }) => {
            match encapsulated(pins, &looked_up) {
                Ok(outer) => outer,
                Err(why) => {
                    hop.reason = why;
                    return Ok(hop);
                }
            }
        }
        _ => looked_up,
    };
    let translated = hop.translation.is_some();
    let answer = route(&mut hop, looked_up, &attached, policy.is_some(), translated)?;
    // A frontend's address on a port no rule serves, which the route sends on: the dataplane
    // drops it (it would go back to the router that sent it).
    let frontend = policy.as_ref().filter(|_| hop.translation.is_none()).and_then(|p| {
        p.load_balancers.iter().find(|lb| lb.frontends.iter().any(|f| f.address == flow.dst))
    });
    if let (Some(lb), Some(Interface { hook: Some(_), .. })) = (frontend, &hop.arrival)
        && answer.outcome.routed()
    {
        hop.forwarding = Forwarding::NoLbRule;
        hop.reason = format!(
            "{} is a frontend of load balancer {} and no rule of it serves this {}: the \
             dataplane drops it (no_lb_rule), which the route would send on (a frontend \
             announced over BGP: back to the router)",
            flow.dst,
            lb.name,
            if flow.dst_port.is_some() { "port" } else { "protocol" }
        );
    }
    let dnat = matches!(
        &hop.translation,
        Some(Translation::LoadBalancer { forwarding: "dnat", .. } | Translation::InboundNat { .. })
    );
    if let (true, Some(_), Some(e)) = (dnat, &hop.arrival, &hop.egress) {
        hop.reply_bypasses_gateway = reply_bypass(e.ifindex, flow.src, looked_up.dst)?;
    }
    Ok(hop)
}

/// The outer packet of the encapsulated flow `inner` (IP in IP to its backend, from the
/// node's outer source of its family), as the dataplane asks the FIB about it; `Err`: why
/// there is none.
pub fn encapsulated(pins: &PinDir, inner: &Flow) -> Result<Flow, String> {
    let sources = xdpgate_dataplane::encap::read(pins).unwrap_or_default();
    let (source, outer) = match inner.dst {
        IpAddr::V4(_) => (sources.v4.map(IpAddr::from), 4),
        IpAddr::V6(_) => (sources.v6.map(IpAddr::from), 41),
    };
    let src =
        source.ok_or("no outer source address of its family (forwarding: ipip)".to_owned())?;
    let protocol = (inner.protocol.0, outer);
    Ok(Flow { protocol, src, dst: inner.dst, src_port: None, dst_port: None })
}

/// Asks the FIB about `looked_up` (the flow as the forwarding stage sees it: translated,
/// or its outer packet) arriving by `hop.arrival`, and fills in how it leaves: the answer,
/// egress, gateway, neighbour, MTU, forwarding and its reason. `translated`: the act stage
/// forwards it (only then may the dataplane redirect it).
fn route(
    hop: &mut NextHop,
    looked_up: Flow,
    attached: &[IfaceStatus],
    applied: bool,
    translated: bool,
) -> Result<fib::Answer> {
    hop.looked_up = Some(looked_up);
    let answer = fib::lookup(&fib::Query {
        src: looked_up.src,
        dst: looked_up.dst,
        proto: looked_up.proto(),
        sport: looked_up.src_port.unwrap_or(0),
        dport: looked_up.dst_port.unwrap_or(0),
        ifindex: hop.arrival.as_ref().map_or(LOOPBACK, |a| a.ifindex),
    })?;
    hop.outcome = Some(answer.outcome);
    hop.egress = answer.ifindex.map(|i| interface(i, attached));
    hop.gateway = answer.neighbour.filter(|_| answer.via_gateway);
    if let (Some(egress), Some(n)) = (&hop.egress, answer.neighbour) {
        let entry = fib::neighbour(egress.ifindex, n)?;
        hop.neighbour = Some(NeighbourReport {
            address: n,
            state: entry.as_ref().map_or(NeighbourState::None, |e| e.state),
            mac: entry.and_then(|e| e.mac).or(answer.dmac).map(|m| fib::mac_string(&m)),
        });
        hop.mtu = match answer.mtu {
            Some(m) if m > 0 => Some(u32::from(m)),
            _ => fib::link_mtu(&egress.interface).ok(),
        };
    }
    (hop.forwarding, hop.reason) = judge(hop, &answer, looked_up.dst, applied, translated)?;
    Ok(answer)
}

/// How the act stage forwards a packet of an existing translated flow arriving by the
/// interface `arrival`, rewritten as `looked_up` (the outer packet, for IP in IP): as for
/// the flow's first packet, by the FIB's answer. For `trace`, which does not run the act
/// stage for a packet of an existing flow.
pub fn act_forwarding(pins: &PinDir, arrival: u32, looked_up: Flow) -> Result<NextHop> {
    let attached = status::read(pins)?.interfaces;
    let mut hop = NextHop::new(looked_up, Some(interface(arrival, &attached)));
    route(&mut hop, looked_up, &attached, true, true)?;
    Ok(hop)
}

/// The subnets of each interface of the current namespace: its addresses with their
/// prefixes (link-local ones left out: they name no subnet the gateway routes).
pub fn interface_networks() -> Result<BTreeMap<String, Vec<IpNet>>> {
    let mut nets: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    for a in host_addrs::list()? {
        if let Some(net) =
            a.net.filter(|n| !matches!(n.addr(), IpAddr::V6(a) if a.is_unicast_link_local()))
        {
            nets.entry(a.interface).or_default().push(net);
        }
    }
    Ok(nets)
}

/// Why the answers of a load balancer's destination-translated flow, which keeps its
/// source, would not come back through the gateway, for a client and the backend it is
/// sent to by the link `egress`: the backend is the client itself, or both are in one of
/// the subnets of that link, so the backend answers it there directly, from its own
/// address, and the client, which called the frontend, does not take the answer (a backend
/// calling its own frontend: hairpin), whichever way the client's packets came in. `None`:
/// the client is in another subnet (behind a router, or in a second subnet of the link,
/// which the backend reaches through its gateway).
pub fn reply_bypass(egress: u32, client: IpAddr, backend: IpAddr) -> Result<Option<String>> {
    let link = fib::ifname(egress).unwrap_or_else(|| format!("ifindex {egress}"));
    let shared = interface_networks()?
        .remove(&link)
        .unwrap_or_default()
        .into_iter()
        .find(|n| n.contains(&client) && n.contains(&backend));
    let who = match shared {
        _ if client == backend => {
            format!("the backend {backend} is the client itself: it answers itself")
        }
        Some(net) => format!(
            "the backend {backend} and {client} share the subnet {} on {link}: the backend \
             answers it directly",
            net.trunc()
        ),
        None => return Ok(None),
    };
    Ok(Some(format!(
        "{who}, from {backend}, not through the gateway, and the client, which called the \
         frontend, does not take that answer (a backend cannot reach its own load balancer \
         through the gateway: hairpin)"
    )))
}

/// How the packet leaves, and why.
fn judge(
    hop: &NextHop,
    answer: &fib::Answer,
    dst: IpAddr,
    applied: bool,
    translated: bool,
) -> Result<(Forwarding, String)> {
    let egress = hop.egress.as_ref().map_or("-", |e| e.interface.as_str());
    // A floating-IP or encapsulated packet cannot go to the host's stack (its destination a
    // frontend the stack has no route to, or its source this node's own): what the
    // dataplane cannot send itself it drops, under this reason.
    let stackless = match &hop.translation {
        Some(Translation::LoadBalancer { forwarding: "ipip", .. }) => {
            Some(("an encapsulated", "encap_unreachable"))
        }
        Some(Translation::LoadBalancer { forwarding: "floating_ip", .. }) => {
            Some(("a floating-IP", "direct_unreachable"))
        }
        _ => None,
    };
    let arrival = match &hop.arrival {
        None => {
            return Ok(match answer.outcome {
                o if o.routed() => (
                    Forwarding::Stack,
                    match hop.egress.as_ref().and_then(|e| e.hook) {
                        Some(_) => format!(
                            "sent by this host: the host's stack routes it out of {egress}, \
                             where the dataplane's egress program judges it"
                        ),
                        None => {
                            format!("sent by this host: the host's stack routes it out of {egress}")
                        }
                    },
                ),
                _ if host_addrs::is_local(dst)? => no_route(Outcome::NotForwarded, dst)?,
                // The helper checks forwarding on the interface it is asked from, here the
                // loopback device, before it looks at any route.
                Outcome::ForwardingDisabled => (
                    Forwarding::Stack,
                    "sent by this host: the FIB can be asked only from the loopback device, \
                     where forwarding is off, so the route is unknown here (the host's stack \
                     routes it)"
                        .into(),
                ),
                _ => no_route(answer.outcome, dst)?,
            });
        }
        Some(a) => a,
    };
    let Some(hook) = arrival.hook else {
        return Ok(match answer.outcome {
            o if o.routed() => (
                Forwarding::Stack,
                format!(
                    "{} is not attached to xdpgate: the host's stack forwards it out of \
                     {egress} without the dataplane",
                    arrival.interface
                ),
            ),
            _ => no_route(answer.outcome, dst)?,
        });
    };
    Ok(match answer.outcome {
        Outcome::Success if !applied => (
            Forwarding::Stack,
            format!(
                "no policy applied yet: the dataplane passes every packet to the host's stack, \
                 which forwards it out of {egress}"
            ),
        ),
        // Only translated flows are forwarded by the dataplane itself (the act stage).
        Outcome::Success if !translated => (
            Forwarding::Stack,
            format!(
                "no translation: the dataplane passes it (once allowed) to the host's stack, \
                 which forwards it out of {egress} by this same FIB answer"
            ),
        ),
        Outcome::Success => {
            let egress_hook = hop.egress.as_ref().and_then(|e| e.hook);
            // XDP redirects only into interfaces attached with XDP (the EGRESS devmap); tc
            // to any registered interface.
            let redirects = match hook {
                Hook::Xdp => egress_hook == Some(Hook::Xdp),
                Hook::Tc => egress_hook.is_some(),
            };
            if redirects {
                (
                    Forwarding::Redirect,
                    format!("the dataplane ({}) redirects it out of {egress}", hook.name()),
                )
            } else if let Some((kind, reason)) = stackless {
                (
                    Forwarding::Dropped,
                    format!(
                        "{egress} is not a redirect target of the {} hook, and {kind} packet                          cannot go to the host's stack: the dataplane drops it ({reason});                          attach {egress} to xdpgate",
                        hook.name()
                    ),
                )
            } else {
                (
                    Forwarding::Stack,
                    format!(
                        "{egress} is not a redirect target of the {} hook ({}): the dataplane \
                         passes it to the host's stack, which forwards it",
                        hook.name(),
                        match hook {
                            Hook::Xdp => "XDP redirects only to interfaces attached with XDP",
                            Hook::Tc => "tc redirects only to attached interfaces",
                        }
                    ),
                )
            }
        }
        Outcome::NoNeighbour if let Some((kind, reason)) = stackless => (
            Forwarding::Dropped,
            format!(
                "no resolved neighbour for {} on {egress}, and {kind} packet cannot go to the                  host's stack: the dataplane drops it ({reason}) until the running agent has                  resolved the entry (within a second: a SYN sent again gets through)",
                answer.neighbour.map_or("-".into(), |n| n.to_string()),
            ),
        ),
        Outcome::NoNeighbour => match hop.neighbour.as_ref().map(|n| n.state) {
            Some(NeighbourState::Failed) => (
                Forwarding::NeighbourFailed,
                format!(
                    "next hop {} on {egress} does not answer (neighbour entry failed): the \
                     stack drops it with host unreachable",
                    answer.neighbour.map_or("-".into(), |n| n.to_string())
                ),
            ),
            state => (
                Forwarding::Stack,
                format!(
                    "no resolved neighbour for {} on {egress} ({}): the dataplane passes it \
                     to the host's stack, which resolves it and forwards it",
                    answer.neighbour.map_or("-".into(), |n| n.to_string()),
                    state.map_or("no entry", |s| if s == NeighbourState::None {
                        "no entry"
                    } else {
                        s.name()
                    })
                ),
            ),
        },
        Outcome::ForwardingDisabled => (
            Forwarding::ForwardingDisabled,
            format!("forwarding is disabled on {}", arrival.interface),
        ),
        o => no_route(o, dst)?,
    })
}

fn no_route(outcome: Outcome, dst: IpAddr) -> Result<(Forwarding, String)> {
    Ok(match outcome {
        Outcome::NotForwarded if host_addrs::is_local(dst)? => {
            (Forwarding::Local, format!("{dst} is this host's own address: delivered locally"))
        }
        Outcome::NotForwarded => (Forwarding::NoRoute, format!("no route to {dst}")),
        Outcome::ForwardingDisabled => (
            Forwarding::ForwardingDisabled,
            "forwarding is disabled on the arrival interface".into(),
        ),
        o => (Forwarding::NoRoute, format!("no route to {dst}: the FIB says {}", outcome_name(o))),
    })
}

pub fn outcome_name(o: Outcome) -> String {
    match serde_json::to_value(o) {
        Ok(serde_json::Value::String(s)) => s.replace('_', " "),
        _ => format!("{o:?}"),
    }
}

fn iface_line(i: &Interface) -> String {
    match (i.role, i.hook) {
        (Some(role), Some(hook)) => format!("{} ({role}, {})", i.interface, hook.name()),
        _ => format!("{} (not attached to xdpgate)", i.interface),
    }
}

impl View for NextHop {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    fn text(&self) -> String {
        let mut out = format!("flow         {}\n", self.flow.describe());
        out += &format!(
            "arrives by   {}\n",
            self.arrival.as_ref().map_or("this host (its own traffic)".into(), iface_line)
        );
        if let Some(t) = &self.translation {
            out += &format!("translation  {}\n", super::wrap(&t.describe(), 13));
        }
        if let Some(l) = &self.looked_up {
            out += &format!("looked up    {}\n", l.describe());
        }
        if let Some(o) = self.outcome {
            out += &format!("fib          {}\n", outcome_name(o));
        }
        if let Some(e) = &self.egress {
            out += &format!("egress       {}\n", iface_line(e));
        }
        if self.egress.is_some() {
            out += &format!(
                "gateway      {}\n",
                self.gateway.map_or("none (directly connected)".into(), |g| g.to_string())
            );
        }
        if let Some(n) = &self.neighbour {
            out += &format!(
                "neighbour    {} {}{}\n",
                n.address,
                n.state.name(),
                n.mac.as_ref().map_or(String::new(), |m| format!(" {m}"))
            );
        }
        if let Some(m) = self.mtu {
            out += &format!("mtu          {m}\n");
        }
        out += &format!("next hop     {}\n", super::wrap(&self.reason, 13));
        if let Some(why) = &self.reply_bypasses_gateway {
            out += &format!("reply        {}\n", super::wrap(why, 13));
        }
        out
    }
}

/// `xdpgate next-hop`.
#[derive(Debug, Clone, clap::Args)]
pub struct NextHopArgs {
    #[command(flatten)]
    pub flow: FlowArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(pins: &PinDir, args: &NextHopArgs) -> Result<()> {
    let flow = args.flow.flow()?;
    let hop = resolve(pins, &flow, args.flow.iface.as_deref())?;
    super::print(&hop, args.output.format())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend shared by two rules with different probes, failing only one of them, is
    /// in the other rule's table, as the agent builds it: the views follow the agent's
    /// probes, not the dataplane's flag, which is down when any probe fails (seen failing:
    /// "no healthy backend" for the rule that still served). Without an agent, the flag.
    #[test]
    fn a_backend_is_healthy_under_the_probes_it_passes() {
        let policy = xdpgate_policy::load_str(
            "virtual_network: {address_space: [198.51.100.0/24]}\nload_balancers:\n  - name: \
             edge\n    frontends: [{name: vip, address: 192.0.2.10}]\n    backend_pools: [{name: \
             p, backends: [198.51.100.11]}]\n    probes:\n      - {name: open, protocol: tcp, \
             port: 8080}\n      - {name: closed, protocol: tcp, port: 9}\n    rules:\n      - \
             {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_pool: p, \
             probe: open}\n      - {name: alt, frontend: vip, protocol: tcp, frontend_port: 82, \
             backend_pool: p, probe: closed}\n",
            "p.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let backend: IpAddr = "198.51.100.11".parse().unwrap();
        let key = probes::ProbeKey { backend, lb: "edge".into(), probe: "closed".into() };
        let mut rotation = Rotation {
            unhealthy: [backend].into(),
            probes: Some(probes::ProbeHealth { down: [key].into(), ..Default::default() }),
            drained: Default::default(),
        };
        let lb = &policy.load_balancers[0];
        let healthy = |r: &Rotation, rule: usize| backend_health(lb, &lb.rules[rule], r)[0].healthy;
        assert!(healthy(&rotation, 0), "http's probe passes");
        assert!(!healthy(&rotation, 1), "alt's probe fails");
        rotation.probes = None;
        assert!(!healthy(&rotation, 0) && !healthy(&rotation, 1), "the flag, without an agent");
    }

    fn args(src: &str, dst: &str, protocol: Option<&str>) -> FlowArgs {
        FlowArgs {
            src: src.into(),
            dst: dst.into(),
            protocol: protocol.map(str::to_string),
            iface: None,
        }
    }

    #[test]
    fn flows_are_read_with_clear_errors() {
        let f = args("203.0.113.7", "192.0.2.10:80", None).flow().unwrap();
        assert_eq!((f.proto(), f.src_port, f.dst_port), (6, Some(49152), Some(80)));
        let f = args("2001:db8::1", "2001:db8::2", None).flow().unwrap();
        assert_eq!(f.proto(), 58);
        assert_eq!(serde_json::to_value(f).unwrap()["protocol"], "icmpv6");
        let err = |a: FlowArgs| format!("{:#}", a.flow().unwrap_err());
        assert!(err(args("203.0.113.7", "192.0.2.10:80", Some("icmp"))).contains("has no ports"));
        assert!(err(args("203.0.113.7", "192.0.2.10", Some("udp"))).contains("destination port"));
        assert!(
            err(args("2001:db8::1", "2001:db8::2:80", Some("tcp"))).contains("destination port")
        );
        assert!(err(args("203.0.113.7", "2001:db8::2", None)).contains("same address family"));
        assert!(err(args("nowhere", "192.0.2.1", None)).contains("--src \"nowhere\""));
        assert!(err(args("203.0.113.7", "192.0.2.1", Some("gre"))).contains("unknown protocol"));
        assert!(err(args("2001:db8::1", "ff02::1", None)).contains("ff02::1 is a multicast"));
        assert!(err(args("203.0.113.7", "0.0.0.0", None)).contains("the unspecified address"));
        // The names the views print read back (before, `esp`, which they print for 50, was
        // an unknown protocol).
        let f = args("203.0.113.7", "192.0.2.1", Some("esp")).flow().unwrap();
        assert_eq!((f.proto(), f.describe()), (50, "esp 203.0.113.7 -> 192.0.2.1".into()));
        assert_eq!(args("2001:db8::1", "2001:db8::2", Some("icmpv6")).flow().unwrap().proto(), 58);
    }
}
