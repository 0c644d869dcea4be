//! Scale-out behind ECMP (issue 16, items 5 and 6), end to end with real TCP connections:
//!
//! ```text
//!   client 203.0.113.66, 2001:db8:2::66
//!     |
//!   router: BIRD, merge paths (ECMP), five-tuple hash      backends 198.51.100.11-13,
//!     |  \  \______________________________ br0 _________  2001:db8:1::11-13 (the frontends
//!   gw1  gw2  gw3: xdpgate run --node, BIRD                on lo), answering the client
//!                                                          directly through the router
//! ```
//!
//! Three gateways announce the IPv4 and the IPv6 frontend over BGP; the router spreads the
//! connections over them with hash-threshold ECMP. Every gateway has the same policy (one
//! file) and its own node file (gw1 and gw2 at XDP, gw3 at tc). The backends sit in a subnet
//! of their own behind the router: the gateways encapsulate (`forwarding: ipip`) and the
//! backends decapsulate with deploy/backend/xdpgate-backend.sh (xdpgate's decap program:
//! this kernel has no ipip module). Long-lived connections of both families (each echoing
//! a sequence number every 100 ms) must survive, step by step: a gateway's agent stopped
//! cleanly (SIGTERM: it withdraws first) and started again; a gateway's link cut and
//! restored; a gateway gone silent (its packets dropped at the router, the link up: the
//! 3 s hold timer ends the session) and heard again; a gateway's BIRD killed and restarted;
//! a fleet roll (drain, stop the agent, `xdpgate upgrade`, start it, undrain, on each
//! gateway in turn). A backend that crashes ends its own connections only, and a drain
//! after every gateway has taken it out ends none. Each step prints its figures, and a
//! summary table ends the run. With `XDPGATE_LONG=1`: 300 connections, and the same with
//! floating IP (the gateways on the backends' segment).
//!
//! Skipped, with a message, only when `bird` is not installed (setup.sh installs bird2).

mod common;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use common::{
    Netns, Pins,
    agent::NodeAgent,
    assert_ingress_hook,
    bgp::{self, Bird, Peer},
    echo_conns::{EchoBackend, EchoClients, Summary},
    long, unique, veth,
};
use serde_json::Value;

const VIP: &str = "192.0.2.10";
const VIP6: &str = "2001:db8::10";
const CLIENT: &str = "203.0.113.66";
const CLIENT6: &str = "2001:db8:2::66";
/// The frontends' routes at the router.
const PREFIXES: [(&str, &str); 2] = [("v4", "192.0.2.10/32"), ("v6", "2001:db8::10/128")];
/// BGP hold time of every session (keepalives every second).
const HOLD: u16 = 3;
/// No echo for this long breaks a connection.
const LIMIT: Duration = Duration::from_secs(3);
/// The same in steps where a stall is no fault: a cut path (the hold time's stall on top)
/// and the fleet roll (a program load on a loaded machine, TCP's backoff after a lost
/// segment). There a connection breaks only when reset or echoed wrong; its stalls are
/// figures.
const CUT_LIMIT: Duration = Duration::from_secs(20);

/// Backend `i`'s addresses.
fn backend(i: usize) -> (String, String) {
    (format!("198.51.100.{}", 11 + i), format!("2001:db8:1::{}", 11 + i))
}

/// How the gateways reach the backends.
#[derive(Clone, Copy, PartialEq)]
enum Reach {
    /// Floating IP: the gateways have a leg on the backends' segment.
    FloatingIp,
    /// Encapsulation (`forwarding: ipip`): the backends are behind the router, in a subnet
    /// of their own, and strip the outer header with xdpgate's decap program (this kernel
    /// has no ipip module) set up by deploy/backend/xdpgate-backend.sh.
    Encap,
}

/// One policy for every gateway: the two frontends, three backends each, probed every
/// 500 ms from the gateways' link addresses, flows picked up mid-stream, an NSG allowing
/// the web port in.
fn policy(reach: Reach) -> String {
    let (v4, v6): (Vec<_>, Vec<_>) = (0..3).map(backend).unzip();
    let forwarding = match reach {
        Reach::FloatingIp => "floating_ip: true, midstream_pickup: true",
        // Mid-stream pickup is on by default for encapsulating rules.
        Reach::Encap => "forwarding: ipip",
    };
    format!(
        "
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
# The gateways' probes (sent from their addresses towards the router), admitted by the
# backends' NSG as Azure's admits AzureLoadBalancer.
health_probe_source: [203.0.113.0/28, '2001:db8:ff::/48']
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {{name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: '*', destination_ports: 80}}
load_balancers:
  - name: edge
    frontends:
      - {{name: vip, address: {VIP}}}
      - {{name: vip6, address: '{VIP6}'}}
    backend_pools:
      - {{name: web, backends: [{}]}}
      - {{name: web6, backends: ['{}']}}
    probes:
      - {{name: up, protocol: tcp, port: 8080, interval: 500, timeout: 400, threshold: 2}}
    rules:
      - {{name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_pool: web,
         probe: up, {forwarding}}}
      - {{name: http6, frontend: vip6, protocol: tcp, frontend_port: 80, backend_pool: web6,
         probe: up, {forwarding}}}
",
        v4.join(", "),
        v6.join("', '")
    )
}

/// One gateway. Field order is drop order: the agent and BIRD, then the pins (their drop
/// detaches, in the namespace), the namespace last.
struct Gateway {
    agent: Option<NodeAgent>,
    bird: Option<Bird>,
    pins: Pins,
    ns: Netns,
    /// Its number n (1-3): link 203.0.113.(4n-3)/30 and 2001:db8:ff:n::/64, the router's
    /// end first.
    n: u8,
    /// Its interface towards the router, and the router's towards it.
    iface: String,
    router_iface: String,
    node: String,
    bird_conf: String,
}

impl Gateway {
    fn new(router: &Netns, n: u8, reach: Reach, lan: &str) -> Self {
        let ns = Netns::new("sogw");
        let (router_v4, router_v6) =
            (format!("203.0.113.{}", 4 * n - 3), format!("2001:db8:ff:{n}::1"));
        let (router_iface, iface) = veth(
            router,
            &format!("{router_v4}/30,{router_v6}/64"),
            &ns,
            &format!("203.0.113.{}/30,2001:db8:ff:{n}::2/64", 4 * n - 2),
        );
        // Frames the gateway's XDP sends back to the router arrive through veth's NAPI,
        // which runs only with GRO on (or an XDP program) on the receiving end.
        router.exec("ethtool", &["-K", &router_iface, "gro", "on"]);
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // The link cut keeps the addresses (a link that comes back has them).
            "net.ipv6.conf.all.keep_addr_on_down=1",
        ] {
            ns.exec("sysctl", &["-qw", key]);
        }
        // Both hooks in one fleet: gw1 and gw2 at XDP, gw3 at tc.
        let hook = if n < 3 { "xdp" } else { "tc" };
        let mut interfaces = format!("  - {{name: {iface}, role: external, hook: {hook}}}\n");
        if reach == Reach::FloatingIp {
            // A leg on the backends' segment (the router's bridge).
            let (port, int) =
                veth(router, "", &ns, &format!("198.51.100.{}/24,2001:db8:1::{0}/64", 1 + n));
            router.exec("ip", &["link", "set", &port, "master", lan]);
            router.exec("ethtool", &["-K", &port, "gro", "on"]);
            interfaces += &format!("  - {{name: {int}, role: internal, hook: {hook}}}\n");
        }
        let node = format!(
            "interfaces:\n{interfaces}bgp:\n  router_id: 203.0.113.{}\n  local_as: 65001\n  \
             hold_time: {HOLD}\n  peers:\n    - {{address: {router_v4}, as: 65000}}\n    \
             - {{address: '{router_v6}', as: 65000}}\n",
            4 * n - 2
        );
        let node_file = std::env::temp_dir().join(format!("{}.yaml", unique("sonode")));
        std::fs::write(&node_file, &node).unwrap();
        let pins = Pins::in_netns(&ns);
        let bird_conf =
            pins.xdpgate(&["bgp", "bird-config", "--node", node_file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&node_file);
        let mut gw =
            Self { agent: None, bird: None, pins, ns, n, iface, router_iface, node, bird_conf };
        gw.default_routes();
        gw.bird = Some(Bird::start(&gw.ns, &gw.bird_conf));
        gw
    }

    /// Routes to everything else through the router (put back after a link cut, which
    /// removes them).
    fn default_routes(&self) {
        let n = self.n;
        self.ns.exec(
            "ip",
            &["route", "replace", "default", "via", &format!("203.0.113.{}", 4 * n - 3)],
        );
        self.ns.exec(
            "ip",
            &["-6", "route", "replace", "default", "via", &format!("2001:db8:ff:{n}::1")],
        );
    }

    /// Starts its agent and waits until the agent has written its BGP record (from then on
    /// `drain --wait` and `undrain --wait` have an agent to wait for).
    fn start_agent(&mut self, policy: &str) {
        let agent = NodeAgent::start(&self.ns, &self.pins, policy, &self.node);
        let pid = agent.pid();
        self.agent = Some(agent);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.pins.try_xdpgate(&["bgp", "--json"]);
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if report["agent_running"] == true && report["agent"]["pid"] == pid {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: agent {pid} not running: {report}",
                self.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn name(&self) -> String {
        format!("gw{}", self.n)
    }

    /// This gateway's state, for a failure's message.
    fn explain(&self) -> String {
        let mut out = format!("\n--- {} (router side {}):\n", self.name(), self.router_iface);
        for args in [&["bgp"][..], &["status"], &["lb"]] {
            let o = self.pins.try_xdpgate(args);
            out += &String::from_utf8_lossy(&o.stdout);
            out += &String::from_utf8_lossy(&o.stderr);
        }
        out + &self.bird.as_ref().map_or("bird: not running\n".into(), Bird::show)
    }

    /// Packets its load-balancing rules have passed so far (`xdpgate lb --json`).
    fn lb_packets(&self) -> u64 {
        let report: Value =
            serde_json::from_str(&self.pins.xdpgate(&["lb", "--json"])).expect("lb --json");
        report
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["traffic"]["packets"].as_u64())
            .sum()
    }

    /// Polls `xdpgate lb --json` until both addresses of a backend are unhealthy.
    fn wait_backend_down(&self, (v4, v6): &(String, String)) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let report: Value =
                serde_json::from_str(&self.pins.xdpgate(&["lb", "--json"])).expect("lb --json");
            let healthy = report
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["backends"].as_array().into_iter().flatten())
                .filter(|b| b["address"] == v4.as_str() || b["address"] == v6.as_str())
                .any(|b| b["healthy"] != false);
            if !healthy {
                return;
            }
            assert!(Instant::now() < deadline, "{}: {v4} still healthy: {report}", self.name());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client ends of the TCP flows to the frontends this gateway saw a packet of in
    /// the last `within` seconds.
    fn flows(&self, within: f64) -> BTreeSet<SocketAddr> {
        let out = self.pins.xdpgate(&["flows", "--json", "--port", "80"]);
        let flows: Value = serde_json::from_str(&out).expect("flows --json");
        flows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["idle_seconds"].as_f64().is_some_and(|s| s < within))
            .filter_map(|f| {
                let ip: IpAddr = f["src"].as_str()?.parse().ok()?;
                Some(SocketAddr::new(ip, f["src_port"].as_u64()? as u16))
            })
            .collect()
    }
}

/// One backend: its namespace (the frontends on lo) and its echo service.
struct Backend {
    server: Option<EchoBackend>,
    /// Its decapsulation (encapsulating mode), undone on drop.
    decap: Option<BackendScript>,
    /// Held for the topology's life.
    _ns: Netns,
}

impl Backend {
    fn new(router: &Netns, lan: &str, i: usize, reach: Reach) -> Self {
        let ns = Netns::new("sobe");
        let (v4, v6) = backend(i);
        let (port, _) = veth(router, "", &ns, &format!("{v4}/24,{v6}/64"));
        router.exec("ip", &["link", "set", &port, "master", lan]);
        router.exec("ethtool", &["-K", &port, "gro", "on"]);
        ns.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
        ns.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        let decap = match reach {
            Reach::Encap => Some(BackendScript::up(&ns)),
            Reach::FloatingIp => {
                for vip in [format!("{VIP}/32"), format!("{VIP6}/128")] {
                    let mut args = vec!["addr", "add", &vip, "dev", "lo"];
                    if vip.contains(':') {
                        args.push("nodad");
                    }
                    ns.exec("ip", &args);
                }
                None
            }
        };
        let server = Some(EchoBackend::start(&ns, 80, 8080));
        Self { server, decap, _ns: ns }
    }

    /// Packets its decap program decapsulated and passed on untouched.
    fn decap_counts(&self) -> (u64, u64) {
        let Some(d) = &self.decap else { return (0, 0) };
        let status: Value =
            serde_json::from_str(&d.pins.xdpgate(&["decap", "status", "--json"])).unwrap();
        (status["decapsulated"].as_u64().unwrap_or(0), status["passed"].as_u64().unwrap_or(0))
    }
}

/// A backend as deploy/backend/xdpgate-backend.sh sets it up (`up` with both frontends,
/// xdpgate's decap program, a pin directory of its own); `down` on drop.
struct BackendScript {
    ns: String,
    pins: Pins,
}

impl BackendScript {
    fn up(ns: &Netns) -> Self {
        let this = Self { ns: ns.name.clone(), pins: Pins::in_netns(ns) };
        // The gateways' outer sources: the addresses of their links to the router.
        let gateways = ["--gateway", "203.0.113.0/28", "--gateway", "2001:db8:ff::/48"];
        this.run(&[&["up", VIP, VIP6, "--decap", "xdpgate"][..], &gateways].concat());
        this
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/backend/xdpgate-backend.sh");
        let out = std::process::Command::new("sh")
            .arg(script)
            .args(args)
            .args(["--netns", &self.ns, "--pin-dir"])
            .arg(self.pins.dir.path())
            .env("XDPGATE", common::xdpgate_bin())
            .output()
            .expect("run xdpgate-backend.sh");
        assert!(
            out.status.success() || std::thread::panicking(),
            "xdpgate-backend.sh {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for BackendScript {
    fn drop(&mut self) {
        self.run(&["down"]);
    }
}

/// The whole topology.
struct Fleet {
    gateways: Vec<Gateway>,
    backends: Vec<Backend>,
    router_bird: Option<Bird>,
    client: Netns,
    router: Netns,
    policy: String,
}

impl Fleet {
    fn new(reach: Reach) -> Self {
        let router = Netns::new("sort");
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            router.exec("sysctl", &["-qw", key]);
        }
        bgp::hash_five_tuple(&router);
        let client = Netns::new("socl");
        let (_, client_if) = veth(
            &router,
            "203.0.113.65/26,2001:db8:2::1/64",
            &client,
            &format!("{CLIENT}/26,{CLIENT6}/64"),
        );
        client.exec("ip", &["route", "add", "default", "via", "203.0.113.65"]);
        client.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        // The gateways' XDP hands frames on without the note that completes a partial
        // checksum: the client computes its own.
        client.exec("ethtool", &["-K", &client_if, "tx", "off"]);
        // The backends' segment: a bridge in the router.
        let lan = "br0";
        router.exec("ip", &["link", "add", lan, "type", "bridge"]);
        router.exec("ip", &["addr", "add", "198.51.100.1/24", "dev", lan]);
        router.exec("ip", &["addr", "add", "2001:db8:1::1/64", "dev", lan, "nodad"]);
        router.exec("ip", &["link", "set", lan, "up"]);
        let backends = (0..3).map(|i| Backend::new(&router, lan, i, reach)).collect();
        let gateways: Vec<Gateway> =
            (1..=3).map(|n| Gateway::new(&router, n, reach, lan)).collect();
        let peers: Vec<Peer> = (1..=3u8)
            .map(|n| Peer {
                v4: format!("203.0.113.{}", 4 * n - 2),
                v6: format!("2001:db8:ff:{n}::2"),
            })
            .collect();
        let router_bird = Some(Bird::start(&router, &bgp::router_config(&peers, HOLD)));
        let mut fleet =
            Self { gateways, backends, router_bird, client, router, policy: policy(reach) };
        let policy = fleet.policy.clone();
        for gw in &mut fleet.gateways {
            gw.start_agent(&policy);
            let hook = if gw.n < 3 { "xdp" } else { "tc" };
            assert_ingress_hook(&gw.pins, &gw.ns, &gw.iface, hook);
        }
        fleet
    }

    /// Polls until the router's next hops to both frontends are the gateways numbered in
    /// `up`; returns how long that took.
    fn wait_paths(&self, up: &[u8], what: &str) -> Duration {
        let ifaces: Vec<&str> = self
            .gateways
            .iter()
            .filter(|g| up.contains(&g.n))
            .map(|g| g.router_iface.as_str())
            .collect();
        let explain = || {
            let mut out = String::new();
            for g in &self.gateways {
                out += &g.explain();
            }
            out + &self.router_bird.as_ref().map_or(String::new(), Bird::show)
        };
        let want = bgp::hops_through(&PREFIXES, &ifaces);
        bgp::wait_next_hops(&self.router, &PREFIXES, &want, what, explain)
    }

    /// Drops every packet to and from gateway `n` at the router (`nft`), its link left up:
    /// a path gone silent, which only the BGP hold timer notices. `false` lets them pass
    /// again.
    fn silence(&self, n: u8, on: bool) {
        let table = format!("cut{n}");
        if !on {
            self.router.exec("nft", &["delete", "table", "inet", &table]);
            return;
        }
        let dev = &self.gateways[usize::from(n) - 1].router_iface;
        let rules = format!(
            "table inet {table} {{\n\
             chain cut_in {{ type filter hook input priority 0; iifname {dev} drop; }}\n\
             chain cut_out {{ type filter hook output priority 0; oifname {dev} drop; }}\n\
             chain cut_through {{ type filter hook forward priority 0; iifname {dev} drop; \
             oifname {dev} drop; }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}.nft", unique("cut")));
        std::fs::write(&file, rules).unwrap();
        self.router.exec("nft", &["-f", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
    }

    fn gw(&mut self, n: u8) -> &mut Gateway {
        &mut self.gateways[usize::from(n) - 1]
    }
}

/// One line of the summary table.
struct Row {
    step: String,
    up: usize,
    figures: Summary,
    /// The step's wall time, and how long after the change the router had its new next
    /// hops and every connection had echoed again.
    took: Duration,
    routes: Duration,
    traffic: Duration,
}

/// Runs a step: `act` does it and returns when the change happened (the command that
/// triggers the router's change); then the router's next hops must become the gateways of
/// `up`, and every live connection must echo again. Prints and records the step's
/// figures; asserts that `broken` connections have broken so far, no more.
fn step(
    rows: &mut Vec<Row>,
    conns: &EchoClients,
    fleet: &mut Fleet,
    (name, up, broken): (&str, &[u8], usize),
    act: impl FnOnce(&mut Fleet) -> Instant,
) {
    conns.mark();
    let start = Instant::now();
    let changed = act(fleet);
    fleet.wait_paths(up, name);
    let converged = Instant::now();
    let routes = converged - changed;
    let traffic = routes + conns.wait_echoing(converged, Duration::from_secs(30));
    // A second round of echoes, counted at each gateway: the connections carry on, through
    // the gateways the router uses and no other.
    let before: Vec<u64> = fleet.gateways.iter().map(Gateway::lb_packets).collect();
    conns.wait_echoing(Instant::now(), Duration::from_secs(10));
    let through: Vec<u64> =
        fleet.gateways.iter().zip(before).map(|(g, b)| g.lb_packets() - b).collect();
    let figures = conns.summary();
    let took = start.elapsed();
    println!(
        "{name}: {} gateways up, {} alive, {} broken, {} bytes in {:.1} s, {} stalled over \
         1 s, longest stall {:.2} s, routes {:.2} s, traffic {:.2} s",
        up.len(),
        figures.alive,
        figures.broken,
        figures.bytes,
        took.as_secs_f64(),
        figures.stalled,
        figures.longest_stall.as_secs_f64(),
        routes.as_secs_f64(),
        traffic.as_secs_f64()
    );
    println!("  packets through gw1, gw2, gw3 in a round of echoes: {through:?}");
    assert_eq!(figures.broken, broken, "{name}: broken {:?}", figures.broken_list);
    for (gw, packets) in fleet.gateways.iter().zip(&through) {
        let used = up.contains(&gw.n);
        assert_eq!(*packets > 0, used, "{name}: {packets} packets through {}", gw.name());
    }
    rows.push(Row { step: name.to_owned(), up: up.len(), figures, took, routes, traffic });
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<29} {:>3} {:>5} {:>6} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7}\n",
        "step",
        "gws",
        "alive",
        "broken",
        "bytes",
        "secs",
        "stalled",
        "stall s",
        "route s",
        "flows s"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<29} {:>3} {:>5} {:>6} {:>7} {:>6.1} {:>7} {:>7.2} {:>7.2} {:>7.2}",
            r.step,
            r.up,
            r.figures.alive,
            r.figures.broken,
            r.figures.bytes,
            r.took.as_secs_f64(),
            r.figures.stalled,
            r.figures.longest_stall.as_secs_f64(),
            r.routes.as_secs_f64(),
            r.traffic.as_secs_f64()
        );
    }
    out
}

fn scale_out(reach: Reach) {
    if !bgp::bird_installed() {
        eprintln!("skipping: `bird` is not installed (setup.sh installs Debian's bird2)");
        return;
    }
    let mut fleet = Fleet::new(reach);
    let all = [1, 2, 3];
    let up_after = fleet.wait_paths(&all, "all gateways up");
    println!(
        "routes through all three gateways {:.1} s after the agents started",
        up_after.as_secs_f64()
    );

    // Connections of both families, several source ports each.
    let per_family = if long() { 150 } else { 60 };
    let frontends: Vec<SocketAddr> =
        [VIP, VIP6].iter().map(|v| SocketAddr::new(v.parse().unwrap(), 80)).collect();
    let conns = EchoClients::open(&fleet.client, &frontends, per_family, LIMIT);
    let mut rows = Vec::new();
    step(&mut rows, &conns, &mut fleet, ("all up", &all, 0), |_| Instant::now());
    // Spread over the gateways (each connection on one: none has moved yet).
    let mut seen = BTreeSet::new();
    for gw in &fleet.gateways {
        let flows = gw.flows(1.0);
        let v6 = flows.iter().filter(|a| a.is_ipv6()).count();
        println!(
            "{}: {} connections ({} IPv4, {v6} IPv6)",
            gw.name(),
            flows.len(),
            flows.len() - v6
        );
        assert!(flows.len() > v6 && v6 > 0, "{}: no connection of a family", gw.name());
        seen.extend(flows);
    }
    let ends: BTreeSet<SocketAddr> = conns.states().iter().map(|c| c.local).collect();
    assert_eq!(seen, ends, "the gateways' flows are not the client's connections");

    // A clean stop: SIGTERM withdraws, the others take its flows (picked up mid-stream).
    step(&mut rows, &conns, &mut fleet, ("gw1 agent stopped (SIGTERM)", &[2, 3], 0), |f| {
        let now = Instant::now();
        let status = f.gw(1).agent.as_mut().unwrap().terminate();
        assert!(status.success(), "xdpgate run exited with {status}");
        now
    });
    step(&mut rows, &conns, &mut fleet, ("gw1 agent started again", &all, 0), |f| {
        let now = Instant::now();
        let policy = f.policy.clone();
        f.gw(1).start_agent(&policy);
        now
    });

    // A cut link (the gateway's end down): the router's BIRD sees the link go and ends the
    // session at once.
    conns.set_limit(CUT_LIMIT);
    step(&mut rows, &conns, &mut fleet, ("gw2 link cut", &[1, 3], 0), |f| {
        let (gw, now) = (f.gw(2), Instant::now());
        gw.ns.exec("ip", &["link", "set", &gw.iface, "down"]);
        now
    });
    step(&mut rows, &conns, &mut fleet, ("gw2 link restored", &all, 0), |f| {
        let (gw, now) = (f.gw(2), Instant::now());
        gw.ns.exec("ip", &["link", "set", &gw.iface, "up"]);
        gw.default_routes();
        now
    });

    // A path gone silent (nothing in or out, the link up): the router's hold timer (3 s)
    // ends the session; until then the gateway's share stalls.
    step(&mut rows, &conns, &mut fleet, ("gw2 silent (hold timer)", &[1, 3], 0), |f| {
        let now = Instant::now();
        f.silence(2, true);
        now
    });
    step(&mut rows, &conns, &mut fleet, ("gw2 heard again", &all, 0), |f| {
        let now = Instant::now();
        f.silence(2, false);
        now
    });

    // A crashed BIRD (SIGKILL): the router's session ends at once (its socket closes).
    step(&mut rows, &conns, &mut fleet, ("gw3 BIRD killed", &[1, 2], 0), |f| {
        let now = Instant::now();
        f.gw(3).bird = None;
        now
    });
    step(&mut rows, &conns, &mut fleet, ("gw3 BIRD started again", &all, 0), |f| {
        let (gw, now) = (f.gw(3), Instant::now());
        gw.bird = Some(Bird::start(&gw.ns, &gw.bird_conf));
        now
    });

    // A fleet roll: each gateway drained, its agent stopped, its dataplane upgraded, the
    // agent started, the gateway undrained (at CUT_LIMIT still).
    for n in 1..=3u8 {
        let others: Vec<u8> = all.into_iter().filter(|&m| m != n).collect();
        let drained = format!("roll: gw{n} drained");
        step(&mut rows, &conns, &mut fleet, (&drained, &others, 0), |f| {
            let now = Instant::now();
            f.gw(n).pins.xdpgate(&["drain", "--wait", "10"]);
            now
        });
        let back = format!("roll: gw{n} upgraded, undrained");
        step(&mut rows, &conns, &mut fleet, (&back, &all, 0), |f| {
            let policy = f.policy.clone();
            let gw = f.gw(n);
            let status = gw.agent.as_mut().unwrap().terminate();
            assert!(status.success(), "xdpgate run exited with {status}");
            gw.pins.xdpgate(&["upgrade"]);
            gw.start_agent(&policy);
            let now = Instant::now();
            gw.pins.xdpgate(&["undrain", "--wait", "10"]);
            now
        });
    }

    conns.set_limit(LIMIT);

    // A backend crashes: its connections end (reset), the others carry on.
    let lost: BTreeSet<SocketAddr> = fleet.backends[2].server.as_ref().unwrap().accepted();
    let ends_lost: BTreeSet<SocketAddr> =
        conns.states().iter().map(|c| c.local).filter(|a| lost.contains(a)).collect();
    println!("backend 3 holds {} connections", ends_lost.len());
    assert!(!ends_lost.is_empty(), "backend 3 got no connection");
    let expected = ends_lost.len();
    // Its probe fails on every gateway, which takes it out of their Maglev tables.
    step(&mut rows, &conns, &mut fleet, ("backend 3 crashed, out", &all, expected), |f| {
        let now = Instant::now();
        f.backends[2].server.take().unwrap().crash();
        for gw in &f.gateways {
            gw.wait_backend_down(&backend(2));
        }
        now
    });
    let broken: BTreeSet<SocketAddr> =
        conns.summary().broken_list.iter().map(|(a, _)| *a).collect();
    assert_eq!(broken, ends_lost, "broken connections are not the crashed backend's");
    // The rebuilt tables agree across the gateways: the connections gw1 carries move to
    // the others, which pick them up with their own tables.
    step(&mut rows, &conns, &mut fleet, ("then gw1 drained", &[2, 3], expected), |f| {
        let now = Instant::now();
        f.gw(1).pins.xdpgate(&["drain", "--wait", "10"]);
        now
    });

    for (i, b) in fleet.backends.iter().enumerate() {
        let accepted = b.server.as_ref().map_or(ends_lost.len(), |s| s.accepted().len());
        let (decapsulated, passed) = b.decap_counts();
        println!(
            "backend {}: {accepted} connections, {decapsulated} packets decapsulated, \
             {passed} passed",
            i + 1
        );
        assert!(
            reach != Reach::Encap || decapsulated > 0,
            "backend {}: nothing decapsulated",
            i + 1
        );
    }
    println!("\n{}", table(&rows));
}

/// The same with floating IP, the backends on the gateways' segment (`XDPGATE_LONG=1`).
#[test]
fn connections_survive_gateways_going_and_coming_back_floating_ip() {
    if !long() {
        eprintln!("skipping: the floating-IP variant runs with XDPGATE_LONG=1");
        return;
    }
    scale_out(Reach::FloatingIp);
}

#[test]
fn connections_survive_gateways_going_and_coming_back_encapsulated() {
    scale_out(Reach::Encap);
}
