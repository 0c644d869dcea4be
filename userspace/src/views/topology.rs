//! `xdpgate topology`: what this gateway connects, like Network Watcher's topology view:
//! the interfaces of this network namespace (role, hook and XDP mode where xdpgate is
//! attached, addresses), the subnets they reach, the NSGs and what they are associated
//! with, the load balancers with their frontends and backends' health, and the NAT gateways
//! with their public addresses; as text, JSON, Graphviz DOT, or SVG drawn by `dot`.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use serde::Serialize;
use xdpgate_dataplane::{Hook, PinDir};
use xdpgate_policy::{LbProtocol, LoadBalancer, NatGateway, Nsg, Policy};

use super::{
    Grid, View,
    nexthop::{self, BackendHealth, Rotation, backend_health, running_policy},
};
use crate::status;

/// A network interface of this namespace.
#[derive(Debug, Clone, Serialize)]
pub struct Interface {
    /// Name, index, and xdpgate's role and hook where attached.
    #[serde(flatten)]
    pub link: nexthop::Interface,
    /// The XDP mode as the kernel reports it (native, skb, none) where attached.
    pub xdp_mode: Option<String>,
    pub addresses: Vec<IpNet>,
}

/// A subnet the gateway reaches or the policy names.
#[derive(Debug, Clone, Serialize)]
pub struct Subnet {
    pub prefix: IpNet,
    /// The interface it is connected to, when one is.
    pub interface: Option<String>,
    pub nsg: Option<String>,
    pub nat_gateway: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NsgNode {
    pub name: String,
    pub subnets: Vec<IpNet>,
    pub hosts: Vec<IpNet>,
    /// Rules, Azure's defaults included.
    pub rules: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// A load-balancing rule or an inbound NAT rule.
    pub rule: String,
    pub kind: &'static str,
    pub frontend: IpAddr,
    /// 0: every port (HA ports).
    pub frontend_port: u16,
    pub protocol: &'static str,
    pub backends: Vec<BackendHealth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LbNode {
    pub name: String,
    pub services: Vec<Service>,
    /// Frontend addresses no rule uses: a packet to one is dropped (`no_lb_rule`) where
    /// it would be routed on.
    pub unused_frontends: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatNode {
    pub name: String,
    pub public_addresses: Vec<IpAddr>,
    pub subnets: Vec<IpNet>,
    pub port_first: u16,
    pub port_last: u16,
}

/// What `topology` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Topology {
    /// The policy generation drawn (none applied: interfaces and subnets only).
    pub generation: Option<u64>,
    pub interfaces: Vec<Interface>,
    pub subnets: Vec<Subnet>,
    pub nsgs: Vec<NsgNode>,
    pub load_balancers: Vec<LbNode>,
    pub nat_gateways: Vec<NatNode>,
}

/// Every interface of the current namespace but loopback, with its addresses.
fn interfaces(attached: &[status::IfaceStatus]) -> Result<Vec<Interface>> {
    let mut addrs = nexthop::interface_networks()?;
    let mut out = Vec::new();
    for i in nix::net::if_::if_nameindex().context("listing interfaces")?.iter() {
        let name = i.name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let a = attached.iter().find(|a| a.name == name && a.place == "here");
        out.push(Interface {
            xdp_mode: a.filter(|a| a.hook == Some(Hook::Xdp)).map(|a| a.xdp_mode.clone()),
            addresses: addrs.remove(&name).unwrap_or_default(),
            link: nexthop::Interface {
                ifindex: i.index(),
                role: a.and_then(|a| a.role),
                hook: a.and_then(|a| a.hook),
                interface: name,
            },
        });
    }
    Ok(out)
}

fn lb_protocol(p: LbProtocol) -> &'static str {
    match p {
        LbProtocol::Tcp => "tcp",
        LbProtocol::Udp => "udp",
        LbProtocol::All => "all",
    }
}

/// Reads the topology of this namespace and the running policy.
pub fn read(pins: &PinDir) -> Result<Topology> {
    let attached = if pins.path().exists() { status::read(pins)?.interfaces } else { vec![] };
    let interfaces = interfaces(&attached)?;
    let policy = if pins.path().exists() { running_policy(pins)? } else { None };
    let rotation = Rotation::read(pins, policy.as_ref())?;
    let generation = match &policy {
        Some(_) => xdpgate_dataplane::apply::running(pins)?.map(|r| r.generation),
        None => None,
    };
    Ok(build(interfaces, policy.as_ref(), &rotation, generation))
}

fn build(
    interfaces: Vec<Interface>,
    policy: Option<&Policy>,
    rotation: &Rotation,
    generation: Option<u64>,
) -> Topology {
    let (nsg_list, lb_list, nat_list): (&[Nsg], &[LoadBalancer], &[NatGateway]) = match policy {
        Some(p) => (&p.nsgs, &p.load_balancers, &p.nat_gateways),
        None => (&[], &[], &[]),
    };
    // The connected prefixes, then the policy's subnets not among them.
    let mut prefixes: Vec<IpNet> = Vec::new();
    for net in interfaces.iter().flat_map(|i| &i.addresses) {
        let net = net.trunc();
        if !net.addr().is_loopback()
            && !matches!(net.addr(), IpAddr::V6(a) if a.is_unicast_link_local())
            && !prefixes.contains(&net)
        {
            prefixes.push(net);
        }
    }
    let named =
        nsg_list.iter().flat_map(|n| &n.subnets).chain(nat_list.iter().flat_map(|g| &g.subnets));
    for net in named {
        if !prefixes.contains(net) {
            prefixes.push(*net);
        }
    }
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let subnets = prefixes
        .into_iter()
        .map(|prefix| Subnet {
            prefix,
            interface: interfaces
                .iter()
                .find(|i| i.addresses.iter().any(|a| overlaps(&a.trunc(), &prefix)))
                .map(|i| i.link.interface.clone()),
            nsg: nsg_list
                .iter()
                .find(|n| n.subnets.iter().any(|s| overlaps(s, &prefix)))
                .map(|n| n.name.clone()),
            nat_gateway: nat_list
                .iter()
                .find(|g| g.subnets.iter().any(|s| overlaps(s, &prefix)))
                .map(|g| g.name.clone()),
        })
        .collect();
    let nsgs = nsg_list
        .iter()
        .map(|n| NsgNode {
            name: n.name.clone(),
            subnets: n.subnets.clone(),
            hosts: n.hosts.clone(),
            rules: n.rules.len(),
        })
        .collect();
    let load_balancers = lb_list
        .iter()
        .map(|lb| {
            let mut services: Vec<Service> = lb
                .rules
                .iter()
                .map(|r| Service {
                    rule: r.name.clone(),
                    kind: "load_balancing",
                    frontend: lb.frontends[r.frontend].address,
                    frontend_port: r.frontend_port,
                    protocol: lb_protocol(r.protocol),
                    backends: backend_health(lb, r, rotation),
                })
                .collect();
            services.extend(lb.inbound_nat_rules.iter().map(|r| {
                Service {
                    rule: r.name.clone(),
                    kind: "inbound_nat",
                    frontend: lb.frontends[r.frontend].address,
                    frontend_port: r.frontend_port_start,
                    protocol: lb_protocol(r.protocol),
                    backends: r
                        .mappings
                        .iter()
                        .map(|(_, a)| BackendHealth { address: *a, healthy: true, drained: false })
                        .collect(),
                }
            }));
            let used: HashSet<usize> = (lb.rules.iter().map(|r| r.frontend))
                .chain(lb.inbound_nat_rules.iter().map(|r| r.frontend))
                .collect();
            let unused_frontends = (lb.frontends.iter().enumerate())
                .filter(|(i, _)| !used.contains(i))
                .map(|(_, f)| f.address)
                .collect();
            LbNode { name: lb.name.clone(), services, unused_frontends }
        })
        .collect();
    let nat_gateways = nat_list
        .iter()
        .map(|g| NatNode {
            name: g.name.clone(),
            public_addresses: g.public_addresses.clone(),
            subnets: g.subnets.clone(),
            port_first: g.ports.lo,
            port_last: g.ports.hi,
        })
        .collect();
    Topology { generation, interfaces, subnets, nsgs, load_balancers, nat_gateways }
}

fn frontend(s: &Service) -> String {
    let addr = match s.frontend {
        IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    };
    match (s.frontend_port, s.kind) {
        (0, _) => format!("{addr}:*/{}", s.protocol),
        (p, "inbound_nat") if s.backends.len() > 1 => {
            format!("{addr}:{p}-{}/{}", u32::from(p) + s.backends.len() as u32 - 1, s.protocol)
        }
        (p, _) => format!("{addr}:{p}/{}", s.protocol),
    }
}

fn list<T: ToString>(v: &[T]) -> String {
    if v.is_empty() { "-".into() } else { v.iter().map(T::to_string).collect::<Vec<_>>().join(" ") }
}

fn attachment(i: &Interface) -> String {
    match (i.link.role, i.link.hook) {
        (Some(role), Some(hook)) => {
            let mode = i.xdp_mode.as_deref().map_or(String::new(), |m| format!(" {m}"));
            format!("{role}, {}{mode}", hook.name())
        }
        _ => "not attached".into(),
    }
}

impl View for Topology {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let mut g = Grid::new(&["INTERFACE", "XDPGATE", "ADDRESSES"]);
        for i in &self.interfaces {
            g.row([i.link.interface.clone(), attachment(i), list(&i.addresses)]);
        }
        out += &g.render();
        let mut g = Grid::new(&["SUBNET", "INTERFACE", "NSG", "NAT GATEWAY"]);
        for s in &self.subnets {
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            g.row([s.prefix.to_string(), dash(&s.interface), dash(&s.nsg), dash(&s.nat_gateway)]);
        }
        out += "\n";
        out += &g.render();
        match self.generation {
            None => {
                out += "\n(no policy applied: no NSGs, load balancers or NAT gateways)\n";
                return out;
            }
            Some(g) => {
                let _ = writeln!(out, "\npolicy generation {g}");
            }
        }
        if !self.nsgs.is_empty() {
            let mut g = Grid::new(&["NSG", "SUBNETS", "HOSTS", "RULES"]).right(&[3]);
            for n in &self.nsgs {
                g.row([n.name.clone(), list(&n.subnets), list(&n.hosts), n.rules.to_string()]);
            }
            out += "\n";
            out += &g.render();
        }
        if !self.load_balancers.is_empty() {
            let mut g = Grid::new(&["LOAD BALANCER", "RULE", "FRONTEND", "BACKENDS"]);
            for lb in &self.load_balancers {
                for s in &lb.services {
                    let backends: Vec<String> = s
                        .backends
                        .iter()
                        .map(|b| {
                            if b.healthy {
                                b.address.to_string()
                            } else {
                                format!("{} (DOWN)", b.address)
                            }
                        })
                        .collect();
                    g.row([lb.name.clone(), s.rule.clone(), frontend(s), list(&backends)]);
                }
                for f in &lb.unused_frontends {
                    g.row([lb.name.clone(), "(no rule uses it)".into(), f.to_string(), "-".into()]);
                }
            }
            out += "\n";
            out += &g.render();
        }
        if !self.nat_gateways.is_empty() {
            let mut g = Grid::new(&["NAT GATEWAY", "PUBLIC ADDRESSES", "PORTS", "SUBNETS"]);
            for n in &self.nat_gateways {
                g.row([
                    n.name.clone(),
                    list(&n.public_addresses),
                    format!("{}-{}", n.port_first, n.port_last),
                    list(&n.subnets),
                ]);
            }
            out += "\n";
            out += &g.render();
        }
        out
    }
}

/// A DOT string literal.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

impl Topology {
    /// The picture in Graphviz's DOT language: the gateway's interfaces in one cluster,
    /// subnets beside them, NSGs on what they guard, load balancers to their backends
    /// (green healthy, red dashed down), NAT gateways from their subnets to the external
    /// interfaces.
    pub fn dot(&self) -> String {
        let mut d = String::from(
            "digraph xdpgate {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=10];\n  \
             edge [fontname=\"Helvetica\", fontsize=9];\n  subgraph cluster_gateway {\n    \
             label=\"xdpgate gateway\";\n    style=rounded;\n",
        );
        for i in &self.interfaces {
            let label = format!("{}\n{}\n{}", i.link.interface, attachment(i), list(&i.addresses));
            let style = if i.link.hook.is_some() { "bold" } else { "dashed" };
            let _ = writeln!(
                d,
                "    {} [shape=box, style={style}, label={}];",
                q(&format!("if:{}", i.link.interface)),
                q(&label)
            );
        }
        d += "  }\n";
        let subnet_of = |a: &IpAddr| {
            self.subnets
                .iter()
                .filter(|s| s.prefix.contains(a))
                .max_by_key(|s| s.prefix.prefix_len())
        };
        for s in &self.subnets {
            let id = q(&format!("subnet:{}", s.prefix));
            let _ = writeln!(
                d,
                "  {id} [shape=ellipse, label={}];",
                q(&format!("subnet\n{}", s.prefix))
            );
            if let Some(i) = &s.interface {
                let _ = writeln!(d, "  {} -> {id} [dir=none];", q(&format!("if:{i}")));
            }
        }
        for n in &self.nsgs {
            let id = q(&format!("nsg:{}", n.name));
            let _ = writeln!(
                d,
                "  {id} [shape=note, style=filled, fillcolor=lightyellow, label={}];",
                q(&format!("NSG {}\n{} rules", n.name, n.rules))
            );
            for s in &n.subnets {
                let _ = writeln!(
                    d,
                    "  {id} -> {} [style=dotted, dir=none, label=\"guards\"];",
                    q(&format!("subnet:{s}"))
                );
            }
            for h in &n.hosts {
                let host = q(&format!("host:{h}"));
                let _ = writeln!(
                    d,
                    "  {host} [shape=box, style=rounded, label={}];",
                    q(&h.to_string())
                );
                let _ = writeln!(d, "  {id} -> {host} [style=dotted, dir=none, label=\"guards\"];");
            }
        }
        let external: Vec<&Interface> =
            self.interfaces.iter().filter(|i| i.link.role == Some("external")).collect();
        let mut backends_drawn = HashSet::new();
        for lb in &self.load_balancers {
            for s in &lb.services {
                let id = q(&format!("lb:{}/{}", lb.name, s.rule));
                let _ = writeln!(
                    d,
                    "  {id} [shape=component, style=filled, fillcolor=lightblue, label={}];",
                    q(&format!("LB {} / {}\n{}", lb.name, s.rule, frontend(s)))
                );
                // Frontends are reached from outside.
                for i in &external {
                    let _ = writeln!(
                        d,
                        "  {} -> {id} [color=grey];",
                        q(&format!("if:{}", i.link.interface))
                    );
                }
                for b in &s.backends {
                    let bid = q(&format!("backend:{}", b.address));
                    if backends_drawn.insert(b.address) {
                        let _ = writeln!(
                            d,
                            "  {bid} [shape=box, style=rounded, label={}];",
                            q(&format!("backend\n{}", b.address))
                        );
                        if let Some(sub) = subnet_of(&b.address) {
                            let _ = writeln!(
                                d,
                                "  {} -> {bid} [style=dashed, dir=none];",
                                q(&format!("subnet:{}", sub.prefix))
                            );
                        }
                    }
                    let (color, style, label) = match (b.healthy, b.drained) {
                        (true, false) => ("darkgreen", "solid", "healthy"),
                        (true, true) => ("orange", "dashed", "drained"),
                        (false, _) => ("red", "dashed", "down"),
                    };
                    let _ = writeln!(
                        d,
                        "  {id} -> {bid} [color={color}, style={style}, label={label}];"
                    );
                }
            }
        }
        for n in &self.nat_gateways {
            let id = q(&format!("nat:{}", n.name));
            let _ = writeln!(
                d,
                "  {id} [shape=hexagon, style=filled, fillcolor=lightgrey, label={}];",
                q(&format!(
                    "NAT {}\n{}\nports {}-{}",
                    n.name,
                    list(&n.public_addresses),
                    n.port_first,
                    n.port_last
                ))
            );
            for s in &n.subnets {
                let _ = writeln!(d, "  {} -> {id} [label=\"SNAT\"];", q(&format!("subnet:{s}")));
            }
            for i in &external {
                let _ = writeln!(d, "  {id} -> {};", q(&format!("if:{}", i.link.interface)));
            }
        }
        d += "}\n";
        d
    }
}

/// How `topology` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyFormat {
    /// Tables, for people.
    Table,
    /// JSON, for programs.
    Json,
    /// Graphviz DOT (render with `dot -Tsvg`).
    Dot,
    /// SVG, drawn by Graphviz's `dot` (which must be on PATH; Debian: graphviz).
    Svg,
}

/// `xdpgate topology`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopologyArgs {
    /// Print JSON (same as -o json).
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// Output format: table, json, dot or svg (--format is the same flag).
    #[arg(short = 'o', long, visible_alias = "format", value_enum, default_value = "table")]
    pub output: TopologyFormat,
}

/// Runs `dot -Tsvg` over `dot`.
pub fn svg(dot: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "--format svg needs Graphviz's `dot` on PATH, and it is not installed \
                 (Debian: apt-get install graphviz); --format dot prints the graph to render \
                 elsewhere"
            ),
            _ => anyhow!(e).context("running dot"),
        })?;
    child.stdin.take().expect("piped").write_all(dot.as_bytes()).context("writing to dot")?;
    let out = child.wait_with_output().context("running dot")?;
    if !out.status.success() {
        bail!("dot failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

pub fn run(pins: &PinDir, args: &TopologyArgs) -> Result<()> {
    let topology = read(pins)?;
    let format = if args.json { TopologyFormat::Json } else { args.output };
    let out = match format {
        TopologyFormat::Table => return super::print(&topology, super::Format::Table),
        TopologyFormat::Json => return super::print(&topology, super::Format::Json),
        TopologyFormat::Dot => topology.dot().into_bytes(),
        TopologyFormat::Svg => svg(&topology.dot())?,
    };
    std::io::stdout().lock().write_all(&out).context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        Topology {
            generation: Some(3),
            interfaces: vec![
                Interface {
                    link: nexthop::Interface {
                        interface: "ext0".into(),
                        ifindex: 2,
                        role: Some("external"),
                        hook: Some(Hook::Xdp),
                    },
                    xdp_mode: Some("native".into()),
                    addresses: vec![net("203.0.113.1/24")],
                },
                Interface {
                    link: nexthop::Interface {
                        interface: "int\"0".into(),
                        ifindex: 3,
                        role: None,
                        hook: None,
                    },
                    xdp_mode: None,
                    addresses: vec![],
                },
            ],
            subnets: vec![Subnet {
                prefix: net("198.51.100.0/24"),
                interface: Some("int\"0".into()),
                nsg: Some("web".into()),
                nat_gateway: Some("gw".into()),
            }],
            nsgs: vec![NsgNode {
                name: "web".into(),
                subnets: vec![net("198.51.100.0/24")],
                hosts: vec![net("198.51.100.7/32")],
                rules: 8,
            }],
            load_balancers: vec![LbNode {
                name: "edge".into(),
                services: vec![Service {
                    rule: "ssh".into(),
                    kind: "inbound_nat",
                    frontend: ip("2001:db8::10"),
                    frontend_port: 2200,
                    protocol: "tcp",
                    backends: vec![
                        BackendHealth {
                            address: ip("198.51.100.11"),
                            healthy: true,
                            drained: false,
                        },
                        BackendHealth {
                            address: ip("198.51.100.12"),
                            healthy: false,
                            drained: false,
                        },
                    ],
                }],
                unused_frontends: vec![ip("192.0.2.12")],
            }],
            nat_gateways: vec![NatNode {
                name: "gw".into(),
                public_addresses: vec![ip("192.0.2.100")],
                subnets: vec![net("198.51.100.0/24")],
                port_first: 1024,
                port_last: 65535,
            }],
        }
    }

    #[test]
    fn text_has_one_table_per_kind() {
        let text = topology().text();
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let line = |start: &str| text.lines().find(|l| l.starts_with(start)).map(words);
        assert_eq!(line("ext0").unwrap(), ["ext0", "external,", "xdp", "native", "203.0.113.1/24"]);
        assert_eq!(line("int\"0").unwrap(), ["int\"0", "not", "attached", "-"]);
        assert_eq!(line("198.51.100.0/24").unwrap(), ["198.51.100.0/24", "int\"0", "web", "gw"]);
        assert_eq!(
            line("edge").unwrap(),
            [
                "edge",
                "ssh",
                "[2001:db8::10]:2200-2201/tcp",
                "198.51.100.11",
                "198.51.100.12",
                "(DOWN)"
            ]
        );
        assert!(text.contains("policy generation 3"), "{text}");
        let unused = text.lines().find(|l| l.contains("192.0.2.12")).map(words);
        assert_eq!(unused.unwrap(), ["edge", "(no", "rule", "uses", "it)", "192.0.2.12", "-"]);
    }

    /// A frontend no rule uses is listed (seen failing: it was shown nowhere, while its
    /// packets were dropped as `no_lb_rule`).
    #[test]
    fn a_frontend_no_rule_uses_is_listed() {
        const POLICY: &str = r#"
virtual_network: {address_space: [198.51.100.0/24]}
load_balancers:
  - name: edge
    frontends:
      - {name: vip, address: 192.0.2.10}
      - {name: ssh, address: 192.0.2.11}
      - {name: spare, address: 192.0.2.12}
    backend_pools:
      - {name: web, backends: [198.51.100.11]}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_pool: web}
    inbound_nat_rules:
      - {name: admin, frontend: ssh, protocol: tcp, frontend_port: 2201,
         backend: 198.51.100.11, backend_port: 22}
"#;
        let policy = xdpgate_policy::load_str(POLICY, "test").unwrap();
        let t = build(vec![], Some(&policy), &Rotation::default(), Some(1));
        let spare: IpAddr = "192.0.2.12".parse().unwrap();
        assert_eq!(t.load_balancers[0].unused_frontends, [spare]);
        assert_eq!(t.load_balancers[0].services.len(), 2);
    }

    #[test]
    fn dot_quotes_names_and_draws_health() {
        let dot = topology().dot();
        assert!(dot.contains("\"if:int\\\"0\" [shape=box, style=dashed"), "{dot}");
        assert!(dot.contains("\"lb:edge/ssh\" -> \"backend:198.51.100.12\" [color=red"), "{dot}");
        assert!(dot.contains("\"subnet:198.51.100.0/24\" -> \"backend:198.51.100.11\""), "{dot}");
        assert!(dot.contains("\"nat:gw\" -> \"if:ext0\""), "{dot}");
        // Balanced braces and quotes: what any DOT reader needs first.
        assert_eq!(dot.matches('{').count(), dot.matches('}').count());
        assert_eq!(dot.replace("\\\"", "").matches('"').count() % 2, 0, "{dot}");
    }
}
