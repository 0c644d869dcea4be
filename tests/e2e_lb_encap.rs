//! The encapsulating load balancer end to end (`forwarding: ipip`), at XDP and at tc: real
//! TCP and UDP from a client through an xdpgate gateway (an agent with a node file that
//! names its outer source addresses) to backends in another subnet behind a router; the
//! backends decapsulate (deploy/backend/xdpgate-backend.sh with xdpgate's decap program:
//! this kernel has no ipip module; at the gateway's hook, so the tc variant also runs the
//! tc decap program on GRO aggregates) and answer the client directly, by a path that does
//! not cross the gateway.
//!
//!   client 203.0.113.10 -- g_c [gw] g_r 10.0.1.2 -- r_g [router] br -- b1 198.51.100.11
//!      \                                                     |      \-- b2 198.51.100.12
//!       \---------------- (replies) c_rt -- r_c -------------/
//!
//! IPv6 alike (2001:db8:c::10, 2001:db8:a::2, 2001:db8:1::11/12). Each test: connections
//! spread over both backends as the gateway's flow table says and carry data both ways; a
//! connection whose flow was deleted at the gateway carries on (mid-stream pickup, same
//! backend); an NSG deny on a frontend port still denies; a bulk transfer fits thanks to
//! the script's MSS; a UDP datagram too big once encapsulated is answered with ICMP "too
//! big" at XDP (the client learns the MTU and sends it again in fragments that fit) and
//! dropped and counted at tc (`encap_too_big`), while one that fits is answered. At tc, UDP datagrams arriving as one
//! GSO aggregate are encapsulated and answered. A connection idle past the embryonic
//! timeout while its backend is drained keeps that backend (its flow, never confirmed,
//! idles out after the TCP timeout).

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{Netns, Pins, agent::NodeAgent, run_in, veth};
use serde_json::Value;

const VIP4: &str = "192.0.2.10";
const VIP6: &str = "2001:db8:f::10";
const CLIENT4: &str = "203.0.113.10";
const CLIENT6: &str = "2001:db8:c::10";
const WAIT: Duration = Duration::from_secs(3);

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: backends
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 80}
      - {name: allow-dns, priority: 110, direction: inbound, access: allow, protocol: udp,
         source: Internet, destination: "*", destination_ports: 53}
      - {name: deny-81, priority: 120, direction: inbound, access: deny, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 81}
load_balancers:
  - name: lb
    frontends:
      - {name: v4, address: 192.0.2.10}
      - {name: v6, address: "2001:db8:f::10"}
    backend_pools:
      - {name: web4, backends: [198.51.100.11, 198.51.100.12]}
      - {name: web6, backends: ["2001:db8:1::11", "2001:db8:1::12"]}
    rules:
      - {name: web4, frontend: v4, protocol: tcp, frontend_port: 80, backend_pool: web4, forwarding: ipip}
      - {name: denied4, frontend: v4, protocol: tcp, frontend_port: 81, backend_pool: web4, forwarding: ipip}
      - {name: dns4, frontend: v4, protocol: udp, frontend_port: 53, backend_pool: web4, forwarding: ipip}
      - {name: web6, frontend: v6, protocol: tcp, frontend_port: 80, backend_pool: web6, forwarding: ipip}
      - {name: denied6, frontend: v6, protocol: tcp, frontend_port: 81, backend_pool: web6, forwarding: ipip}
      - {name: dns6, frontend: v6, protocol: udp, frontend_port: 53, backend_pool: web6, forwarding: ipip}
"#;

struct Lab {
    // Field order is drop order: the agent and the pins (detach) before the namespaces.
    _agent: NodeAgent,
    pins: Pins,
    backends: Vec<Backend>,
    client: Netns,
    gw: Netns,
    /// The gateway's interface towards the client.
    g_c: String,
    _router: Netns,
}

/// A backend namespace set up by the backend script, which undoes it on drop (its state in
/// /run goes with it), before the namespace and the pins go.
struct Backend {
    pins: Pins,
    ns: Netns,
}

impl Backend {
    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new("sh")
            .arg(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../deploy/backend/xdpgate-backend.sh"),
            )
            .args(args)
            .args(["--netns", &self.ns.name, "--pin-dir"])
            .arg(self.pins.dir.path())
            .env("XDPGATE", common::xdpgate_bin())
            .output()
            .expect("run the backend script")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!("xdpgate-backend.sh down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn sh(ns: &Netns, cmd: &str) {
    let parts: Vec<&str> = cmd.split_whitespace().collect();
    ns.exec(parts[0], &parts[1..]);
}

/// The packets interface `dev` in `ns` has received (a GSO aggregate counts once).
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.exec("ip", &["-s", "-j", "link", "show", "dev", dev]);
    let link: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    link[0]["stats64"]["rx"]["packets"].as_u64().expect("rx packets")
}

impl Lab {
    fn new(hook: &str) -> Self {
        Self::with_policy(hook, POLICY)
    }

    fn with_policy(hook: &str, policy: &str) -> Self {
        let xdp = hook == "xdp";
        let client = Netns::new("ecc");
        let gw = Netns::new("ecg");
        let router = Netns::new("ecr");
        let (c_gw, g_c) = veth(
            &client,
            "203.0.113.10/24,2001:db8:c::10/64",
            &gw,
            "203.0.113.1/24,2001:db8:c::1/64",
        );
        let (g_r, r_g) =
            veth(&gw, "10.0.1.2/24,2001:db8:a::2/64", &router, "10.0.1.1/24,2001:db8:a::1/64");
        let (c_rt, _r_c) =
            veth(&client, "10.0.9.2/30,2001:db8:9::2/64", &router, "10.0.9.1/30,2001:db8:9::1/64");
        // The client reaches the frontends by the gateway; the answers come back by the
        // router's link, from the frontend address: no reverse-path filter for them.
        sh(&client, "ip route add default via 203.0.113.1");
        sh(&client, "ip -6 route add default via 2001:db8:c::1");
        for dev in ["all", "default", c_gw.as_str(), c_rt.as_str()] {
            client.exec("sysctl", &["-qw", &format!("net.ipv4.conf.{dev}.rp_filter=0")]);
        }
        for ns in [&gw, &router] {
            sh(ns, "sysctl -qw net.ipv4.ip_forward=1");
            sh(ns, "sysctl -qw net.ipv6.conf.all.forwarding=1");
        }
        sh(&gw, "ip route add 198.51.100.0/24 via 10.0.1.1");
        sh(&gw, "ip -6 route add 2001:db8:1::/64 via 2001:db8:a::1");
        sh(&router, "ip route add 203.0.113.0/24 via 10.0.9.2");
        sh(&router, "ip -6 route add 2001:db8:c::/64 via 2001:db8:9::2");
        sh(&router, "ip link add name br0 type bridge");
        sh(&router, "ip addr add 198.51.100.1/24 dev br0");
        sh(&router, "ip addr add 2001:db8:1::1/64 dev br0 nodad");
        sh(&router, "ip link set br0 up");
        // Frames an XDP program redirects into a veth reach its peer only through NAPI,
        // which veth runs with GRO on; a local sender's partial checksums do not survive an
        // XDP redirect (see common::lan).
        client.exec("ethtool", &["-K", &c_gw, "tx", if xdp { "off" } else { "on" }]);
        if xdp {
            // The gateway's ICMP "too big" goes back out of its veth by redirect: NAPI.
            client.exec("ethtool", &["-K", &c_gw, "gro", "on"]);
        }
        router.exec("ethtool", &["-K", &r_g, "gro", "on"]);
        if !xdp {
            for dev in [&g_c, &g_r] {
                gw.exec("ethtool", &["-K", dev, "gro", "on"]);
            }
        }

        let mut backends = Vec::new();
        for i in 0..2 {
            let b = Netns::new("ecb");
            let (b_if, r_b) = veth(
                &b,
                &format!("198.51.100.{}/24,2001:db8:1::{}/64", 11 + i, 11 + i),
                &router,
                "",
            );
            router.exec("ip", &["link", "set", &r_b, "master", "br0"]);
            router.exec("ethtool", &["-K", &r_b, "gro", "on"]);
            sh(&b, "ip route add default via 198.51.100.1");
            sh(&b, "ip -6 route add default via 2001:db8:1::1");
            // The backends decapsulate at the gateway's hook: at tc they take GRO aggregates
            // of IP-in-IP (GRO on at their end, the router's end segmenting none itself).
            if !xdp {
                b.exec("ethtool", &["-K", &b_if, "gro", "on"]);
                router.exec("ethtool", &["-K", &r_b, "tso", "off"]);
            }
            let backend = Backend { pins: Pins::in_netns(&b), ns: b };
            let out = backend.script(&[
                "up",
                VIP4,
                VIP6,
                "--decap",
                "xdpgate",
                "--hook",
                hook,
                "--interface",
                &b_if,
                // The gateway's `encapsulation:` sources.
                "--gateway",
                "10.0.1.2",
                "--gateway",
                "2001:db8:a::2",
            ]);
            assert!(
                out.status.success(),
                "xdpgate-backend.sh up: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            serve(&backend.ns, if i == 0 { "b1" } else { "b2" });
            backends.push(backend);
        }

        let pins = Pins::in_netns(&gw);
        let node = format!(
            "interfaces:\n  - {{name: {g_c}, role: external, hook: {hook}}}\n  \
             - {{name: {g_r}, role: internal, hook: {hook}}}\n\
             encapsulation: {{source4: 10.0.1.2, source6: \"2001:db8:a::2\"}}\n"
        );
        let agent = NodeAgent::start(&gw, &pins, policy, &node);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = pins.try_xdpgate(&["status", "--json"]);
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let attached = status["interfaces"].as_array().map_or(0, |a| a.len());
            if out.status.success()
                && attached == 2
                && status["policy"]["generation"].as_u64() > Some(0)
            {
                break;
            }
            assert!(Instant::now() < deadline, "the agent did not attach and apply: {status}");
            thread::sleep(Duration::from_millis(100));
        }
        // The gateway sends encapsulated packets only to a next hop whose MAC it knows
        // (an agent's health probes would resolve it; this policy has none).
        sh(&gw, "ping -c 1 -W 2 10.0.1.1");
        sh(&gw, "ping -6 -c 1 -W 2 2001:db8:a::1");
        Lab { _agent: agent, pins, backends, client, gw, g_c, _router: router }
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.pins.xdpgate(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("xdpgate {args:?}: {e}: {out}"))
    }

    fn drops(&self, reason: &str) -> u64 {
        self.json(&["stats", "--json"])["drops"][reason]["packets"].as_u64().unwrap()
    }

    /// The gateway's flow of the client's connection from `client`:`port`.
    fn flow(&self, client: &str, port: u16) -> Value {
        let args = ["flows", "--json", "--top", "0", "--addr", client, "--port", &port.to_string()];
        let flows = self.json(&args);
        flows
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["src"] == client && f["src_port"] == port)
            .unwrap_or_else(|| panic!("no flow from {client} port {port}: {flows}"))
            .clone()
    }

    /// The backend the gateway's flow table names for the client's connection from
    /// `client`:`port` (a flow that has seen no reply). Both families' connections may use
    /// one port.
    fn flow_backend(&self, client: &str, port: u16) -> IpAddr {
        let flow = self.flow(client, port);
        assert_eq!(flow["nat"]["kind"], "ipip", "{flow}");
        // No check of the flow's reply count: the router reaches the client by its own
        // link, so no reply could cross the gateway. That the backends answer directly, from
        // the frontend address, shows in the client's connections working at all (an answer
        // from another address would be reset); e2e_decap checks the replies' bytes.
        flow["load_balancer"]["backend"].as_str().unwrap().parse().unwrap()
    }
}

/// Serves in backend namespace `ns`: TCP on port 80 (every address, both families: the
/// frontends are on `lo`), greeting with the backend's name and then echoing; UDP on the
/// frontends' port 53 (bound to them, so the answers leave from the frontend address),
/// answering each datagram with the backend's name and its length.
fn serve(ns: &Netns, name: &'static str) {
    let (tcp, udp) = run_in(&ns.name, || {
        let tcp = TcpListener::bind("[::]:80").expect("listen");
        let udp = [VIP4, VIP6].map(|a| UdpSocket::bind((a, 53)).expect("bind UDP"));
        (tcp, udp)
    });
    thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let _ = s.write_all(format!("{name}\n").as_bytes());
                let mut buf = [0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    for u in udp {
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(format!("{name} {n}").as_bytes(), from);
            }
        });
    }
}

/// A connection from the client: the backend's greeting read, the stream kept.
fn connect(lab: &Lab, vip: &str, port: u16) -> std::io::Result<(TcpStream, String)> {
    let addr = SocketAddr::new(vip.parse().unwrap(), port);
    run_in(&lab.client.name, move || {
        let s = TcpStream::connect_timeout(&addr, WAIT)?;
        s.set_read_timeout(Some(WAIT))?;
        let mut line = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut line)?;
        Ok((s, line.trim().to_owned()))
    })
}

/// Writes `data` and reads it back.
fn echo(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("the echo");
    assert!(back == data, "echoed unchanged");
}

fn end_to_end(hook: &str) {
    let started = Instant::now();
    let lab = Lab::new(hook);
    let addr = |name: &str, v6: bool| -> IpAddr {
        let i = if name == "b1" { 11 } else { 12 };
        if v6 { format!("2001:db8:1::{i}") } else { format!("198.51.100.{i}") }.parse().unwrap()
    };
    for (vip, v6) in [(VIP4, false), (VIP6, true)] {
        // Spread over both backends, each connection where the gateway's flow says, data
        // both ways.
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut kept = Vec::new();
        for _ in 0..16 {
            let (mut s, name) = connect(&lab, vip, 80).expect("connect to the frontend");
            let port = s.local_addr().unwrap().port();
            let client = if v6 { CLIENT6 } else { CLIENT4 };
            assert_eq!(lab.flow_backend(client, port), addr(&name, v6), "{vip}: {name} answered");
            echo(&mut s, format!("hello {port}\n").as_bytes());
            *seen.entry(name.clone()).or_default() += 1;
            kept.push((s, name));
        }
        println!("{hook} {vip}: connections per backend {seen:?}");
        assert_eq!(seen.len(), 2, "{vip}: both backends take connections: {seen:?}");

        // The gateway forgets a live connection's flow: its next segment is taken up
        // mid-stream and reaches the same backend (another would reset it).
        let (mut s, name) = kept.pop().unwrap();
        let port = s.local_addr().unwrap().port();
        let picked = lab.json(&["stats", "--json"])["flow_table"]["picked_up"].as_u64().unwrap();
        let client = if v6 { CLIENT6 } else { CLIENT4 };
        lab.pins.xdpgate(&["flows", "delete", "--addr", client, "--port", &port.to_string()]);
        echo(&mut s, b"after the flow was deleted\n");
        assert_eq!(lab.flow_backend(client, port), addr(&name, v6), "picked up, same backend");
        let now = lab.json(&["stats", "--json"])["flow_table"]["picked_up"].as_u64().unwrap();
        assert!(now > picked, "counted as picked up: {picked} -> {now}");

        // A bulk transfer: the client's full-sized segments fit once encapsulated (the
        // script lowered the MSS the backends advertise).
        let (mut s, _) = connect(&lab, vip, 80).expect("connect");
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut s = s.try_clone().unwrap();
            let data = data.clone();
            thread::spawn(move || s.write_all(&data).expect("bulk write"))
        };
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).expect("bulk echo");
        writer.join().unwrap();
        assert!(back == data, "{vip}: 256 KiB both ways");

        // The NSG judges the backends' port 81: denied, counted.
        let denied = lab.drops("policy");
        assert!(connect(&lab, vip, 81).is_err(), "{vip}: port 81 denied");
        assert!(lab.drops("policy") > denied, "counted as policy drops");

        // UDP: a datagram that fits once encapsulated is answered by a backend; one that
        // does not (DF: Linux sets it on datagrams within the path MTU) is not, and is
        // counted as `encap_too_big`. At XDP the gateway answers it with ICMP
        // "fragmentation needed" / "packet too big" naming the MTU less the outer header,
        // which the client's kernel learns: it sends the same datagram again in fragments
        // that fit, and a backend answers (seen failing before: no MTU learnt, never
        // answered). At tc it is only dropped, each time.
        let header = if v6 { 40 + 8 } else { 20 + 8 };
        let outer = if v6 { 40 } else { 20 };
        let fits = 1500 - outer - header;
        let too_big = lab.drops("encap_too_big");
        let to = SocketAddr::new(vip.parse().unwrap(), 53);
        let answers = run_in(&lab.client.name, move || {
            let bind = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let u = UdpSocket::bind(bind).unwrap();
            u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            [fits, fits + 1, fits + 1].map(|n| {
                u.send_to(&vec![0u8; n], to).expect("send");
                let mut buf = [0u8; 64];
                u.recv_from(&mut buf)
                    .ok()
                    .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
            })
        });
        let [small, big, again] = answers;
        assert!(small.is_some_and(|a| a.ends_with(&format!(" {fits}"))), "{vip}: fits");
        assert_eq!(big, None, "{vip}: {} bytes do not fit once encapsulated", fits + 1);
        let learnt = String::from_utf8_lossy(&lab.client.exec("ip", &["route", "get", vip]).stdout)
            .into_owned();
        if hook == "xdp" {
            assert!(learnt.contains(&format!("mtu {}", 1500 - outer)), "{vip}: {learnt}");
            assert!(
                again.is_some_and(|a| a.ends_with(&format!(" {}", fits + 1))),
                "{vip}: sent again in fragments that fit"
            );
            assert_eq!(lab.drops("encap_too_big"), too_big + 1, "{vip}: answered and counted");
        } else {
            assert!(!learnt.contains(" mtu "), "{vip}: {learnt}");
            assert_eq!(again, None, "{vip}: dropped again");
            assert_eq!(lab.drops("encap_too_big"), too_big + 2, "{vip}: counted each time");
        }
        for (mut s, _) in kept {
            echo(&mut s, b"still there\n");
        }
    }
    // `next-hop` asks the FIB about the outer packet, as the dataplane does: from the node's
    // outer source, IP in IP. A policy route for the client's own address towards the
    // backends (a blackhole) is not the encapsulated packet's. (Before: asked from the
    // client's address, it said "no route" while the packets were sent. Seen failing.)
    lab.gw.exec("ip", &["route", "add", "blackhole", "198.51.100.0/24", "table", "100"]);
    lab.gw.exec("ip", &["rule", "add", "from", CLIENT4, "lookup", "100", "pref", "100"]);
    let hop = lab.json(&[
        "next-hop",
        "--json",
        "--src",
        &format!("{CLIENT4}:40000"),
        "--dst",
        &format!("{VIP4}:80"),
    ]);
    assert_eq!(hop["looked_up"]["src"], "10.0.1.2", "{hop:#}");
    assert_eq!(
        (&hop["forwarding"], &hop["looked_up"]["protocol"]),
        (&"redirect".into(), &"4".into()),
        "{hop:#}"
    );
    let (mut s, _) = connect(&lab, VIP4, 80).expect("connect under the client's policy route");
    echo(&mut s, b"sent as next-hop says\n");
    lab.gw.exec("ip", &["rule", "del", "pref", "100"]);
    // The agent sends from the node file's sources, and `lb` says so.
    for service in lab.json(&["lb", "--json"]).as_array().unwrap() {
        let rule = service["rule"].as_str().unwrap();
        let source = if rule.ends_with('4') { "10.0.1.2" } else { "2001:db8:a::2" };
        assert_eq!(service["outer_source"], source, "{service}");
    }
    for (i, b) in lab.backends.iter().enumerate() {
        let status: Value =
            serde_json::from_str(&b.pins.xdpgate(&["decap", "status", "--json"])).unwrap();
        assert_eq!(status["interfaces"][0]["hook"], hook, "b{}: {status}", i + 1);
        println!("{hook} backend b{}: decapsulated {}", i + 1, status["decapsulated"]);
    }
    println!("{hook}: {:.1} s", started.elapsed().as_secs_f64());
}

/// An `ipip` connection idle past the embryonic timeout (4 s here) while its backend is
/// drained: its flow, never confirmed (the answers bypass the gateway), is still there, so
/// its next data reaches the same backend (a re-pick would send it to the other backend,
/// which would reset it), as `lb drain` promises. New connections go to the other backend.
fn idle_connection_keeps_its_drained_backend(hook: &str) {
    let started = Instant::now();
    let lab = Lab::with_policy(hook, &format!("{POLICY}settings: {{embryonic_timeout: 4}}\n"));
    let (mut s, name) = connect(&lab, VIP4, 80).expect("connect to the frontend");
    echo(&mut s, b"hello\n");
    let port = s.local_addr().unwrap().port();
    let backend = lab.flow_backend(CLIENT4, port);
    lab.pins.xdpgate(&["lb", "drain", "lb", &backend.to_string()]);
    let (_, other) = connect(&lab, VIP4, 80).expect("a new connection");
    assert_ne!(other, name, "new connections avoid the drained backend");

    // Idle past the embryonic timeout (and a tick of the dataplane's coarse clock).
    let deadline = Instant::now() + Duration::from_secs(20);
    let flow = loop {
        let flow = lab.flow(CLIENT4, port);
        if flow["idle_seconds"].as_f64().unwrap() > 5.0 {
            break flow;
        }
        assert!(Instant::now() < deadline, "the flow did not idle 5 s: {flow}");
        thread::sleep(Duration::from_millis(200));
    };
    println!("{hook}: idle flow {flow}");
    assert_eq!((&flow["state"], &flow["expired"]), (&"embryonic".into(), &false.into()), "{flow}");
    echo(&mut s, b"after 5 s idle, the backend drained\n");
    assert_eq!(lab.flow_backend(CLIENT4, port), backend, "still its backend");
    println!("{hook}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn idle_connection_keeps_its_drained_backend_xdp() {
    idle_connection_keeps_its_drained_backend("xdp");
}

#[test]
fn idle_connection_keeps_its_drained_backend_tc() {
    idle_connection_keeps_its_drained_backend("tc");
}

#[test]
fn encapsulated_load_balancing_xdp() {
    end_to_end("xdp");
}

#[test]
fn encapsulated_load_balancing_tc() {
    end_to_end("tc");
}

/// `UDP_SEGMENT` (Linux: `linux/udp.h`).
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `count` datagrams of `size` bytes from the client to `vip`:53 as one GSO aggregate
/// (UDP_SEGMENT); returns the answers that came within 2 s of each other.
fn send_aggregate(lab: &Lab, vip: &str, size: usize, count: usize) -> Vec<String> {
    let to = SocketAddr::new(vip.parse().unwrap(), 53);
    run_in(&lab.client.name, move || {
        let bind = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let u = UdpSocket::bind(bind).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let segment = size as libc::c_int;
        // SAFETY: a valid socket and an int option of its size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&u),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&raw const segment).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        u.send_to(&vec![7u8; size * count], to).expect("send the aggregate");
        let mut answers = Vec::new();
        let mut buf = [0u8; 64];
        while answers.len() < count {
            let Ok((n, _)) = u.recv_from(&mut buf) else { break };
            answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        answers
    })
}

/// At tc, UDP datagrams that arrive as one GSO aggregate (the client's UDP_SEGMENT send
/// crosses the veth whole) are encapsulated, each segment growing by the outer header, and
/// every datagram is answered; none is dropped (the kernel refuses to grow such an aggregate
/// unless its segments keep their size: it was counted as `malformed`). An aggregate whose
/// segments fit the MTU only unencapsulated is dropped as `encap_too_big`: the outer header
/// is charged to each segment.
#[test]
fn udp_gso_aggregate_encapsulated_at_tc() {
    const DATAGRAMS: usize = 8;
    const SIZE: usize = 1000;
    let lab = Lab::new("tc");
    for (vip, ip_header) in [(VIP4, 20), (VIP6, 40)] {
        let malformed = lab.drops("malformed");
        let received = rx_packets(&lab.gw, &lab.g_c);
        let answers = send_aggregate(&lab, vip, SIZE, DATAGRAMS);
        let arrived = rx_packets(&lab.gw, &lab.g_c) - received;
        println!("{vip}: {DATAGRAMS} datagrams arrived at the gateway as {arrived} packets");
        assert!(arrived < DATAGRAMS as u64, "{vip}: an aggregate arrived ({arrived} packets)");
        assert_eq!(lab.drops("malformed"), malformed, "{vip}: nothing dropped as malformed");
        assert_eq!(answers.len(), DATAGRAMS, "{vip}: every datagram answered: {answers:?}");
        assert!(answers.iter().all(|a| a.ends_with(&format!(" {SIZE}"))), "{answers:?}");

        let too_big = lab.drops("encap_too_big");
        let full = 1500 - ip_header - 8;
        let answers = send_aggregate(&lab, vip, full, 4);
        assert_eq!(answers, Vec::<String>::new(), "{vip}: {full}-byte segments do not fit");
        assert_eq!(lab.drops("encap_too_big"), too_big + 1, "{vip}: the aggregate, counted once");
        assert_eq!(lab.drops("malformed"), malformed, "{vip}: nothing dropped as malformed");
    }
}
