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
//! file) and its own node file. Long-lived connections of both families (each echoing a
//! sequence number every 100 ms) must survive, step by step: a gateway's agent stopped
//! cleanly (SIGTERM: it withdraws first) and started again; a gateway's link cut (the
//! router's BGP session ends: hold time 3 s) and restored; a gateway's BIRD killed and
//! restarted; a fleet roll (drain, stop the agent, `xdpgate upgrade`, start it, undrain,
//! on each gateway in turn). A backend that crashes ends its own connections only. Each
//! step prints its figures, and a summary table ends the run.
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
    bgp::{self, Bird, Peer},
    echo_conns::{EchoBackend, EchoClients, Summary},
    unique, veth,
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
/// No echo for this long breaks a connection (in a step that cuts a path, the hold time's
/// stall is allowed on top).
const LIMIT: Duration = Duration::from_secs(3);
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
}

/// One policy for every gateway: the two frontends, three backends each, probed every
/// 500 ms, flows picked up mid-stream, an NSG allowing the web port in.
fn policy(reach: Reach) -> String {
    let (v4, v6): (Vec<_>, Vec<_>) = (0..3).map(backend).unzip();
    let forwarding = match reach {
        Reach::FloatingIp => "floating_ip: true",
    };
    format!(
        "
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
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
         probe: up, {forwarding}, midstream_pickup: true}}
      - {{name: http6, frontend: vip6, protocol: tcp, frontend_port: 80, backend_pool: web6,
         probe: up, {forwarding}, midstream_pickup: true}}
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
        let mut interfaces = format!("  - {{name: {iface}, role: external}}\n");
        if reach == Reach::FloatingIp {
            // A leg on the backends' segment (the router's bridge).
            let (port, int) =
                veth(router, "", &ns, &format!("198.51.100.{}/24,2001:db8:1::{0}/64", 1 + n));
            router.exec("ip", &["link", "set", &port, "master", lan]);
            router.exec("ethtool", &["-K", &port, "gro", "on"]);
            interfaces += &format!("  - {{name: {int}, role: internal}}\n");
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
    /// Held for the topology's life.
    _ns: Netns,
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
        let backends = (0..3)
            .map(|i| {
                let ns = Netns::new("sobe");
                let (v4, v6) = backend(i);
                let (port, _) = veth(&router, "", &ns, &format!("{v4}/24,{v6}/64"));
                router.exec("ip", &["link", "set", &port, "master", lan]);
                router.exec("ethtool", &["-K", &port, "gro", "on"]);
                ns.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
                ns.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
                for vip in [format!("{VIP}/32"), format!("{VIP6}/128")] {
                    let mut args = vec!["addr", "add", &vip, "dev", "lo"];
                    if vip.contains(':') {
                        args.push("nodad");
                    }
                    ns.exec("ip", &args);
                }
                let server = Some(EchoBackend::start(&ns, 80, 8080));
                Backend { server, _ns: ns }
            })
            .collect();
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
    routes: Duration,
    traffic: Duration,
}

/// Runs a step: `act` does it (returning the gateways up afterwards and how long the
/// router took to have exactly those); then every live connection must echo again. Prints
/// and records the step's figures; asserts that none broke (beyond `broken_before`).
fn step(
    rows: &mut Vec<Row>,
    conns: &EchoClients,
    fleet: &mut Fleet,
    name: &str,
    broken_before: usize,
    act: impl FnOnce(&mut Fleet) -> (usize, Duration),
) {
    conns.mark();
    let (up, routes) = act(fleet);
    let converged = Instant::now();
    let traffic = routes + conns.wait_echoing(converged, Duration::from_secs(30));
    // A second round of echoes: the connections carry on, not just answered once.
    conns.wait_echoing(Instant::now(), Duration::from_secs(10));
    let figures = conns.summary();
    println!(
        "{name}: {up} gateways up, {} alive, {} broken, {} bytes, {} stalled over 1 s, \
         longest stall {:.2} s, routes {:.2} s, traffic {:.2} s",
        figures.alive,
        figures.broken,
        figures.bytes,
        figures.stalled,
        figures.longest_stall.as_secs_f64(),
        routes.as_secs_f64(),
        traffic.as_secs_f64()
    );
    assert_eq!(figures.broken, broken_before, "{name}: broken {:?}", figures.broken_list);
    rows.push(Row { step: name.to_owned(), up, figures, routes, traffic });
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<32} {:>3} {:>5} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7}\n",
        "step", "gws", "alive", "broken", "bytes", "stalled", "stall s", "route s", "flows s"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<32} {:>3} {:>5} {:>6} {:>8} {:>7} {:>7.2} {:>7.2} {:>7.2}",
            r.step,
            r.up,
            r.figures.alive,
            r.figures.broken,
            r.figures.bytes,
            r.figures.stalled,
            r.figures.longest_stall.as_secs_f64(),
            r.routes.as_secs_f64(),
            r.traffic.as_secs_f64()
        );
    }
    out
}

fn long() -> bool {
    std::env::var_os("XDPGATE_LONG").is_some_and(|v| v == "1")
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
    step(&mut rows, &conns, &mut fleet, "all up", 0, |_| (3, Duration::ZERO));
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
    step(&mut rows, &conns, &mut fleet, "gw1 agent stopped (SIGTERM)", 0, |f| {
        let status = f.gw(1).agent.as_mut().unwrap().terminate();
        assert!(status.success(), "xdpgate run exited with {status}");
        (2, f.wait_paths(&[2, 3], "gw1's agent stopped"))
    });
    step(&mut rows, &conns, &mut fleet, "gw1 agent started again", 0, |f| {
        let policy = f.policy.clone();
        f.gw(1).start_agent(&policy);
        (3, f.wait_paths(&all, "gw1's agent back"))
    });

    // A cut link (the gateway's end down): the router's BIRD sees the link go and ends the
    // session at once.
    conns.set_limit(CUT_LIMIT);
    step(&mut rows, &conns, &mut fleet, "gw2 link cut", 0, |f| {
        let gw = f.gw(2);
        gw.ns.exec("ip", &["link", "set", &gw.iface.clone(), "down"]);
        (2, f.wait_paths(&[1, 3], "gw2's link cut"))
    });
    step(&mut rows, &conns, &mut fleet, "gw2 link restored", 0, |f| {
        let gw = f.gw(2);
        gw.ns.exec("ip", &["link", "set", &gw.iface.clone(), "up"]);
        gw.default_routes();
        (3, f.wait_paths(&all, "gw2's link restored"))
    });

    // A path gone silent (nothing in or out, the link up): the router's hold timer (3 s)
    // ends the session; until then the gateway's share stalls.
    step(&mut rows, &conns, &mut fleet, "gw2 silent (hold timer)", 0, |f| {
        f.silence(2, true);
        (2, f.wait_paths(&[1, 3], "gw2 silent"))
    });
    step(&mut rows, &conns, &mut fleet, "gw2 heard again", 0, |f| {
        f.silence(2, false);
        (3, f.wait_paths(&all, "gw2 heard again"))
    });

    // A crashed BIRD (SIGKILL): the router's session ends at once (its socket closes).
    step(&mut rows, &conns, &mut fleet, "gw3 BIRD killed", 0, |f| {
        f.gw(3).bird = None;
        (2, f.wait_paths(&[1, 2], "gw3's BIRD killed"))
    });
    step(&mut rows, &conns, &mut fleet, "gw3 BIRD started again", 0, |f| {
        let gw = f.gw(3);
        gw.bird = Some(Bird::start(&gw.ns, &gw.bird_conf));
        (3, f.wait_paths(&all, "gw3's BIRD back"))
    });
    conns.set_limit(LIMIT);

    // A fleet roll: each gateway drained, its agent stopped, its dataplane upgraded, the
    // agent started, the gateway undrained.
    for n in 1..=3u8 {
        let others: Vec<u8> = all.into_iter().filter(|&m| m != n).collect();
        step(&mut rows, &conns, &mut fleet, &format!("roll: gw{n} drained"), 0, |f| {
            f.gw(n).pins.xdpgate(&["drain", "--wait", "10"]);
            (2, f.wait_paths(&others, "drained"))
        });
        step(&mut rows, &conns, &mut fleet, &format!("roll: gw{n} upgraded, undrained"), 0, |f| {
            let policy = f.policy.clone();
            let gw = f.gw(n);
            let status = gw.agent.as_mut().unwrap().terminate();
            assert!(status.success(), "xdpgate run exited with {status}");
            gw.pins.xdpgate(&["upgrade"]);
            gw.start_agent(&policy);
            gw.pins.xdpgate(&["undrain", "--wait", "10"]);
            (3, f.wait_paths(&all, "undrained"))
        });
    }

    // A backend crashes: its connections end (reset), the others carry on.
    let lost: BTreeSet<SocketAddr> = fleet.backends[2].server.as_ref().unwrap().accepted();
    let ends_lost: BTreeSet<SocketAddr> = conns
        .states()
        .iter()
        .map(|c| c.local)
        .filter(|a| lost.contains(&SocketAddr::new(a.ip().to_canonical(), a.port())))
        .collect();
    println!("backend 3 holds {} connections", ends_lost.len());
    assert!(!ends_lost.is_empty(), "backend 3 got no connection");
    let expected = ends_lost.len();
    step(&mut rows, &conns, &mut fleet, "backend 3 crashed", expected, |f| {
        f.backends[2].server.take().unwrap().crash();
        (3, Duration::ZERO)
    });
    let broken: BTreeSet<SocketAddr> =
        conns.summary().broken_list.iter().map(|(a, _)| *a).collect();
    assert_eq!(broken, ends_lost, "broken connections are not the crashed backend's");

    println!("\n{}", table(&rows));
}

#[test]
fn connections_survive_gateways_going_and_coming_back_floating_ip() {
    scale_out(Reach::FloatingIp);
}
