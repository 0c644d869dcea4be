//! Floating IP (direct server return) and HA ports end to end, on the load-balancer
//! topology with two backends, applied one-shot (`xdpgate apply`, no probes):
//!
//!   client 203.0.113.10 -- ext0 [gw] int0 -- bridge -- b1 198.51.100.11, b2 198.51.100.12
//!   192.0.2.30:80/tcp, floating IP -> the backends, which own 192.0.2.30 themselves
//!   192.0.2.20, HA ports (every port, TCP and UDP) -> the backends, DNAT, ports kept

mod common;

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use common::lan::Lan;

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-dsr, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 80}
      - {name: allow-app, priority: 110, direction: inbound, access: allow, protocol: any,
         source: Internet, destination: "*", destination_ports: [7001, 5300]}
load_balancers:
  - name: lb
    frontends:
      - {name: dsr, address: 192.0.2.30}
      - {name: nva, address: 192.0.2.20}
    backend_pools:
      - {name: pool, backends: [198.51.100.11, 198.51.100.12]}
    rules:
      - {name: dsr-web, frontend: dsr, protocol: tcp, frontend_port: 80, backend_pool: pool,
         floating_ip: true}
      - {name: ha, frontend: nva, protocol: all, frontend_port: 0, backend_pool: pool}
"#;

/// Serves in backend namespace `ns`: TCP on ports 80 and 7001 and UDP on 5300, each
/// answering with the backend's name and the address the request was sent to.
fn serve(ns: &common::Netns, name: &'static str) {
    let (tcp, udp) = common::run_in(&ns.name, || {
        let tcp: Vec<TcpListener> =
            [80, 7001].map(|p| TcpListener::bind(("0.0.0.0", p)).expect("listen")).into();
        (tcp, UdpSocket::bind("0.0.0.0:5300").expect("bind"))
    });
    for l in tcp {
        thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let to = s.local_addr().unwrap().ip();
                let _ = s.write_all(format!("{name} {to}").as_bytes());
            }
        });
    }
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        // Sent from the address the datagram came to: the kernel picks the source, and with
        // HA ports that is the backend's own address, which the gateway translates back.
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
}

/// A TCP request from the client, connecting for at most `connect` seconds: the answer
/// (backend name and the address it was sent to).
fn tcp(lan: &Lan, to: &'static str, connect: u64) -> String {
    lan.client.run(move || {
        let addr: SocketAddr = to.parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(connect))
            .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        answer
    })
}

#[test]
fn floating_ip_and_ha_ports_end_to_end() {
    let lan = Lan::new(2);
    for (i, name) in ["b1", "b2"].into_iter().enumerate() {
        // With floating IP the backend owns the frontend address.
        lan.backends[i].exec("ip", &["addr", "add", "192.0.2.30/32", "dev", "lo"]);
        serve(&lan.backends[i], name);
    }
    // With floating IP the destination stays the frontend address, which only the backends
    // route: the gateway must know a backend's MAC to forward to it (the agent's health
    // probes resolve it; here, without an agent, a ping does).
    for i in 0..2 {
        lan.gw.exec("ping", &["-c", "1", "-W", "2", &common::lan::backend_addr(i)]);
    }
    lan.pins.apply(POLICY);

    // Floating IP: the backends receive the packets still addressed to the frontend and
    // answer from it themselves; new connections spread over both.
    let answers: Vec<String> = (0..20).map(|_| tcp(&lan, "192.0.2.30:80", 2)).collect();
    let names: HashSet<&str> = answers.iter().map(|a| a.split(' ').next().unwrap()).collect();
    assert_eq!(names, HashSet::from(["b1", "b2"]), "{answers:?}");
    assert!(answers.iter().all(|a| a.ends_with(" 192.0.2.30")), "sent to the VIP: {answers:?}");

    // HA ports: any port and protocol of the frontend is balanced, DNAT-ed to a backend's
    // own address with the port kept.
    let answers: Vec<String> = (0..20).map(|_| tcp(&lan, "192.0.2.20:7001", 2)).collect();
    let names: HashSet<&str> = answers.iter().map(|a| a.split(' ').next().unwrap()).collect();
    assert_eq!(names, HashSet::from(["b1", "b2"]), "{answers:?}");
    for a in &answers {
        let want = if a.starts_with("b1") { "b1 198.51.100.11" } else { "b2 198.51.100.12" };
        assert_eq!(a, want, "DNAT to the backend's address");
    }
    let udp = lan.client.run(|| {
        let s = UdpSocket::bind("203.0.113.10:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"ping", "192.0.2.20:5300").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = s.recv_from(&mut buf).expect("a UDP answer through HA ports");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    });
    assert!(udp.0 == "b1" || udp.0 == "b2", "{udp:?}");
    assert_eq!(udp.1.to_string(), "192.0.2.20:5300", "the answer comes from the frontend");
}

/// Floating IP with no neighbour entry for the backend (a rule without a probe, a gateway
/// just started or its neighbours flushed): the first SYN is dropped (`direct_unreachable`:
/// the stack, with no route to the frontend, answered "network unreachable", which ended the
/// connect at once), the agent resolves the backend's entry, and the SYN sent again gets
/// through (seen failing: "Network is unreachable" on every try, for good).
#[test]
fn floating_ip_without_a_neighbour_entry_connects_once_the_agent_resolves_it() {
    let lan = Lan::new(1);
    lan.backends[0].exec("ip", &["addr", "add", "192.0.2.30/32", "dev", "lo"]);
    serve(&lan.backends[0], "b1");
    let policy =
        POLICY.replace("backends: [198.51.100.11, 198.51.100.12]", "backends: [198.51.100.11]");
    let node = "interfaces:\n  - {name: ext0, role: external}\n  - {name: int0, role: internal}\n";
    let agent = common::agent::NodeAgent::start(&lan.gw, &lan.pins, &policy, node);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !lan.pins.agent_started(agent.pid()) {
        assert!(std::time::Instant::now() < deadline, "the agent did not start: {}", agent.log());
        thread::sleep(Duration::from_millis(50));
    }
    lan.gw.exec("ip", &["neigh", "flush", "dev", "int0"]);
    // `next-hop` says so (seen failing: "the dataplane passes it to the host's stack, which
    // resolves it and forwards it").
    let args = ["next-hop", "--json", "--src", "203.0.113.10:40000", "--dst", "192.0.2.30:80"];
    let hop: serde_json::Value = serde_json::from_str(&lan.pins.xdpgate(&args)).unwrap();
    assert_eq!(hop["forwarding"], "dropped", "{hop:#}");
    assert!(hop["reason"].as_str().unwrap().contains("direct_unreachable"), "{hop:#}");
    let unreachable =
        || xdpgate_dataplane::stats::read(&lan.pins.dir).unwrap().drops("direct_unreachable");
    let before = unreachable();
    // Long enough for the SYN sent again (after 1 s) once the agent's tick resolved it.
    let answer = tcp(&lan, "192.0.2.30:80", 5);
    assert_eq!(answer, "b1 192.0.2.30");
    assert!(unreachable() > before, "the first SYN was dropped, not passed to the stack");
}

/// A floating-IP packet too long for the route to its backend (the gateway's route to the
/// backends locked at MTU 1400, the client's link at 1500) is answered at XDP with ICMP
/// "fragmentation needed" from the frontend, naming 1400, and counted as `direct_too_big`:
/// the client's TCP sends smaller segments and a 20,000-byte upload arrives whole (seen
/// failing before: 16 drops, no MTU learnt, the upload stalled).
#[test]
fn floating_ip_packets_too_big_for_the_backend_route_teach_the_path_mtu() {
    let lan = Lan::new(2);
    for (i, backend) in lan.backends.iter().enumerate() {
        backend.exec("ip", &["addr", "add", "192.0.2.30/32", "dev", "lo"]);
        let listener = common::run_in(&backend.name, || TcpListener::bind("0.0.0.0:80").unwrap());
        thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut got = vec![0u8; 20_000];
                let read = s.read_exact(&mut got).map(|()| got.len());
                let _ = s.write_all(format!("got {read:?}").as_bytes());
            }
        });
        // Floating IP needs each backend's neighbour entry (see above).
        lan.gw.exec("ping", &["-c", "1", "-W", "2", &common::lan::backend_addr(i)]);
    }
    // The route's MTU, locked (the FIB applies only a locked one).
    let route = ["route", "change", "198.51.100.0/24", "dev", "int0", "src", "198.51.100.1"];
    lan.gw.exec("ip", &[&route[..], &["mtu", "lock", "1400"]].concat());
    lan.pins.apply(POLICY);
    let answer = lan.client.run(|| {
        let to = "192.0.2.30:80".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(&[7u8; 20_000]).map_err(|e| format!("upload: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        Ok::<_, String>(answer)
    });
    let stats: serde_json::Value =
        serde_json::from_str(&lan.pins.xdpgate(&["stats", "--json"])).unwrap();
    assert_eq!(answer, Ok("got Ok(20000)".into()), "the upload arrived whole: {}", stats["drops"]);
    let learnt = lan.client.exec("ip", &["route", "get", "192.0.2.30"]);
    let learnt = String::from_utf8_lossy(&learnt.stdout);
    assert!(learnt.contains("mtu 1400"), "the client learnt the path MTU: {learnt}");
    let answered = stats["drops"]["direct_too_big"]["packets"].as_u64().unwrap();
    assert!(answered > 0, "answered and counted as direct_too_big");
}
