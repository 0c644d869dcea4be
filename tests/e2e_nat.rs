//! The NAT gateway end to end: a host in a private subnet reaches a server on the
//! "internet" through xdpgate; the server only ever sees the pool address; TCP (a real
//! download), UDP (fragmented too) and ping work; translations idle out; a small pool runs
//! out and recovers; ICMP errors from the protected side leave translated.
//!
//!   host 198.51.100.10 -- int0 [gw] ext0 -- 203.0.113.10 server
//!                        public address 192.0.2.100 (routed to the gateway)

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    Netns, Pins,
    gateway::{CLIENT4, Gateway, SERVER4, UDP_LB_AND_NAT_POLICY},
    run, unique,
};
use xdpgate_common::{
    flow::FlowKey,
    nat::{NAT_ACTIVE, NAT_COOLDOWN, NatEntry},
};

fn policy(extra: &str) -> String {
    format!(
        r#"
virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
{extra}"#
    )
}

struct Lab {
    // Field order is drop order: detach (needs the namespace) before the namespaces go.
    pins: Pins,
    host: Netns,
    gw: Netns,
    server: Netns,
    agent: Option<Child>,
    file: std::path::PathBuf,
}

impl Lab {
    fn new(extra: &str) -> Self {
        let host = Netns::new("nh");
        let gw = Netns::new("ng");
        let server = Netns::new("ns");
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", &host.name, "type", "veth", "peer", "name", "int0",
                "netns", &gw.name,
            ],
        );
        run(
            "ip",
            &[
                "link",
                "add",
                "ext0",
                "netns",
                &gw.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &server.name,
            ],
        );
        host.exec("ip", &["addr", "add", "198.51.100.10/24", "dev", "eth0"]);
        gw.exec("ip", &["addr", "add", "198.51.100.1/24", "dev", "int0"]);
        gw.exec("ip", &["addr", "add", "203.0.113.1/24", "dev", "ext0"]);
        server.exec("ip", &["addr", "add", "203.0.113.10/24", "dev", "eth0"]);
        for (ns, dev) in [(&host, "eth0"), (&gw, "int0"), (&gw, "ext0"), (&server, "eth0")] {
            ns.exec("ip", &["link", "set", dev, "up"]);
        }
        host.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
        // The internet routes the pool address to the gateway; it knows nothing of 198.51.100.0/24.
        server.exec("ip", &["route", "add", "192.0.2.100/32", "via", "203.0.113.1"]);
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // Frames XDP redirects into a veth need NAPI (GRO) on the receiving peer, and
        // senders must compute full checksums (see tests/e2e_lb.rs).
        for ns in [&host, &server] {
            ns.exec("ethtool", &["-K", "eth0", "gro", "on"]);
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        }
        let pins = Pins::in_netns(&gw);
        pins.xdpgate(&["attach", "--hook", "xdp", "--iface", "ext0", "--role", "external"]);
        pins.xdpgate(&["attach", "--hook", "xdp", "--iface", "int0", "--role", "internal"]);
        let file = std::env::temp_dir().join(format!("{}.yaml", unique("natpol")));
        std::fs::write(&file, policy(extra)).unwrap();
        let agent = pins.agent(&file).spawn().expect("spawn xdpgate run");
        let pid = agent.id();
        let lab = Self { host, gw, server, pins, agent: Some(agent), file };
        // Its whole start, not only the policy: the start also bumps the route generation,
        // which a test waiting for a later bump must not mistake for its own.
        lab.wait("the agent to start", Duration::from_secs(10), |l| l.pins.agent_started(pid));
        lab
    }

    fn wait(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Self) -> bool) -> Duration {
        let start = Instant::now();
        while !ok(self) {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    fn nat(&self) -> serde_json::Value {
        serde_json::from_str(&self.pins.xdpgate(&["nat", "--json"])).unwrap()
    }

    /// The first gateway's translated traffic: `{"outbound": {"packets", "bytes"}, ..}`.
    fn traffic(&self) -> serde_json::Value {
        self.nat()[0]["traffic"].clone()
    }

    /// Packets dropped for the first gateway for `reason`.
    fn dropped(&self, reason: &str) -> u64 {
        self.traffic()["dropped"][reason]["packets"].as_u64().unwrap()
    }

    /// Writes `policy` to the agent's file, signals a reload and waits until the agent has
    /// recorded it: the NSG tables switch generation before the NAT tables are installed,
    /// and the agent's record follows the whole reload.
    fn reload(&self, policy: &str) {
        // The generation of the agent's last successful load.
        let generation = || {
            let record = self.pins.agent_record().unwrap_or_default();
            let ok = record["last_reload"]["successful"] == true;
            record["generation"].as_u64().filter(|_| ok).unwrap_or(0)
        };
        let before = generation();
        std::fs::write(&self.file, policy).unwrap();
        let pid = self.agent.as_ref().unwrap().id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        self.wait("the reload", Duration::from_secs(10), |_| generation() > before);
    }

    fn ports_in_use(&self) -> u64 {
        self.nat()[0]["addresses"][0]["ports_in_use"].as_u64().unwrap()
    }

    /// A UDP exchange from the host's `sport` to the server's echo on 5353: the address the
    /// server saw, if the reply came back.
    fn udp(&self, sport: u16) -> Option<String> {
        self.udp_of(sport, 8).map(|(seen, _)| seen)
    }

    /// The same with a datagram of `size` bytes, answered by one as long: the address the
    /// server saw and the size of the answer.
    fn udp_of(&self, sport: u16, size: usize) -> Option<(String, usize)> {
        self.host.run(move || {
            let s = UdpSocket::bind(("198.51.100.10", sport)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
            s.send_to(&vec![b'?'; size], "203.0.113.10:5353").unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            let text = String::from_utf8_lossy(&buf[..n]);
            Some((text.trim_end_matches('.').to_owned(), n))
        })
    }

    /// Answers each datagram with the address it came from, padded to the datagram's size.
    fn udp_echo(&self) {
        let sock = self.server.run(|| UdpSocket::bind("203.0.113.10:5353").unwrap());
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut answer = from.ip().to_string().into_bytes();
                answer.resize(answer.len().max(n), b'.');
                let _ = sock.send_to(&answer, from);
            }
        });
    }
}

/// The gateway `name` in `nat` (`xdpgate nat --json`).
fn gateway<'a>(nat: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    nat.as_array().unwrap().iter().find(|g| g["nat_gateway"] == name)
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

#[test]
fn hosts_reach_the_internet_through_the_pool_address() {
    let lab = Lab::new("    udp_idle_timeout: 4\n    port_reuse_cooldown: 0\n");

    // TCP: a 1 MiB download; the server sees the pool address.
    const SIZE: usize = 1 << 20;
    let listener = lab.server.run(|| TcpListener::bind("203.0.113.10:8080").unwrap());
    let server = thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.write_all(&vec![42u8; SIZE]).unwrap();
        peer
    });
    let got = lab.host.run(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([203, 0, 113, 10], 8080)),
            Duration::from_secs(3),
        )
        .expect("connect through NAT");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        buf.len()
    });
    let peer = server.join().unwrap();
    assert_eq!(got, SIZE, "the whole download arrived");
    assert_eq!(peer.ip().to_string(), "192.0.2.100", "the server saw the pool address");
    assert!(peer.port() >= 1024);

    // UDP and ping.
    lab.udp_echo();
    assert_eq!(lab.udp(40000).as_deref(), Some("192.0.2.100"));
    // A datagram too big for one packet goes out in fragments and comes back in fragments:
    // translated whole both ways.
    let big = lab.udp_of(40001, 4000);
    assert_eq!(big, Some(("192.0.2.100".to_owned(), 4000)), "a fragmented exchange");
    let ping = lab.host.try_exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", "203.0.113.10"]);
    assert!(ping.status.success(), "ping through NAT: {}", String::from_utf8_lossy(&ping.stdout));
    assert!(lab.ports_in_use() >= 2, "{}", lab.nat());

    // The UDP and ICMP translations idle out (4 s for UDP, 30 s... ICMP uses the UDP
    // timeout too) and their ports are free again; the agent expires them once a second.
    let took = lab.wait("translations to idle out", Duration::from_secs(10), |l| {
        l.nat()[0]["addresses"][0]["ports_in_use"].as_u64().unwrap() <= 1
    });
    println!("UDP/ICMP translations expired after {took:?} (idle timeout 4 s)");
}

#[test]
fn a_small_pool_runs_out_and_recovers() {
    let lab =
        Lab::new("    ports: \"2000-2001\"\n    udp_idle_timeout: 4\n    port_reuse_cooldown: 0\n");
    lab.udp_echo();
    assert_eq!(lab.udp(41000).as_deref(), Some("192.0.2.100"));
    assert_eq!(lab.udp(41001).as_deref(), Some("192.0.2.100"));
    assert_eq!(lab.udp(41002), None, "two ports, two flows: the third finds none");
    let failed = lab.nat()[0]["failed_allocations"].as_u64().unwrap();
    assert!(failed >= 1, "{}", lab.nat());
    // Each failed allocation is a packet dropped for the gateway.
    assert_eq!(lab.dropped("nat_exhausted"), failed, "{}", lab.nat());
    // The first two flows still work.
    assert_eq!(lab.udp(41000).as_deref(), Some("192.0.2.100"));
    // Once they idle out, new flows get ports again.
    lab.wait("the pool to recover", Duration::from_secs(12), |l| l.udp(41003).is_some());
    let _ = &lab.gw;
}

/// Azure's NAT gateway metrics, exact for datagrams the test sends: packets and bytes (from
/// the IP header on) each way, packets dropped as unmatched; kept by an agent reload of the
/// same policy, gone with a gateway the policy removes.
#[test]
fn a_gateway_counts_its_packets_bytes_and_drops() {
    let lab = Lab::new("    udp_idle_timeout: 60\n");
    lab.udp_echo();
    let before = lab.traffic();
    // Datagrams of 100 bytes, each answered by one as long: 128 bytes from the IP header on.
    const N: u64 = 10;
    for _ in 0..N {
        assert_eq!(lab.udp_of(42000, 100), Some(("192.0.2.100".to_owned(), 100)));
    }
    let after = lab.traffic();
    for direction in ["outbound", "inbound"] {
        let moved = |key: &str| {
            after[direction][key].as_u64().unwrap() - before[direction][key].as_u64().unwrap()
        };
        assert_eq!(moved("packets"), N, "{direction}: {after}");
        assert_eq!(moved("bytes"), N * 128, "{direction}: {after}");
    }
    assert_eq!(lab.dropped("nat_unmatched"), 0, "{after}");

    // Datagrams from the internet to the public address that match no translation.
    const UNMATCHED: u64 = 3;
    lab.server.run(|| {
        let s = UdpSocket::bind("203.0.113.10:0").unwrap();
        for _ in 0..UNMATCHED {
            s.send_to(b"stray", "192.0.2.100:9").unwrap();
        }
    });
    lab.wait("the unmatched drops", Duration::from_secs(5), |l| {
        l.dropped("nat_unmatched") >= UNMATCHED
    });
    assert_eq!(lab.dropped("nat_unmatched"), UNMATCHED);

    let metrics = lab.pins.xdpgate(&["metrics"]);
    let out = after["outbound"]["packets"].as_u64().unwrap();
    for want in [
        "# HELP xdpgate_nat_packets_total ".to_owned(),
        format!(r#"xdpgate_nat_packets_total{{gateway="natgw",direction="outbound"}} {out}"#),
        "# HELP xdpgate_nat_bytes_total ".to_owned(),
        format!(
            r#"xdpgate_nat_bytes_total{{gateway="natgw",direction="inbound"}} {}"#,
            after["inbound"]["bytes"]
        ),
        "# HELP xdpgate_nat_dropped_packets_total ".to_owned(),
        format!(
            r#"xdpgate_nat_dropped_packets_total{{gateway="natgw",reason="nat_unmatched"}} {UNMATCHED}"#
        ),
    ] {
        assert!(metrics.contains(&want), "{want} missing from\n{metrics}");
    }
    let stats: serde_json::Value =
        serde_json::from_str(&lab.pins.xdpgate(&["stats", "--json"])).unwrap();
    assert_eq!(stats["nat_gateways"][0]["nat_gateway"], "natgw", "{stats}");
    assert_eq!(stats["nat_gateways"][0]["outbound"], after["outbound"], "{stats}");

    // A reload of the same policy keeps the counters.
    let counted = lab.nat()[0]["traffic"].clone();
    lab.reload(&policy("    udp_idle_timeout: 60\n"));
    assert_eq!(lab.nat()[0]["traffic"], counted, "kept across a reload");

    // A policy whose gateway has another name: the old one's counters go with it.
    lab.reload(&policy("    udp_idle_timeout: 60\n").replace("natgw", "natgw2"));
    let nat = lab.nat();
    assert_eq!(nat[0]["nat_gateway"], "natgw2", "{nat}");
    for direction in ["outbound", "inbound"] {
        assert_eq!(nat[0]["traffic"][direction]["packets"], 0, "{nat}");
    }
    assert_eq!(lab.dropped("nat_unmatched"), 0, "{nat}");
    // Its own traffic counts from there (the live translation is its now).
    assert_eq!(lab.udp_of(42000, 100), Some(("192.0.2.100".to_owned(), 100)));
    assert_eq!(lab.traffic()["outbound"]["packets"], 1, "{}", lab.nat());
}

/// The cached next hop of the translated flow from the host's `sport` to the server's
/// echo port: the MAC it is sent to and the interface it leaves by.
fn cached_hop(pins: &Pins, sport: u16) -> ([u8; 6], u32) {
    use aya::maps::HashMap;
    use xdpgate_common::flow::FlowValue;
    let flows: HashMap<_, FlowKey, FlowValue> =
        pins.dir.open_map(xdpgate_common::maps::FLOWS).unwrap().try_into().unwrap();
    let key = FlowKey {
        src: [u32::from_ne_bytes([198, 51, 100, 10]), 0, 0, 0],
        dst: [u32::from_ne_bytes([203, 0, 113, 10]), 0, 0, 0],
        sport,
        dport: 7,
        proto: 6,
        family: 4,
        kind: 0,
        _pad: 0,
    };
    let hop = flows.get(&key, 0).expect("the connection's established entry").hop;
    (hop.dmac, hop.ifindex)
}

fn route_generation(pins: &Pins) -> u32 {
    let map: aya::maps::Array<_, u32> =
        pins.dir.open_map(xdpgate_common::maps::ROUTE_GENERATION).unwrap().try_into().unwrap();
    map.get(&0, 0).unwrap()
}

/// One message echoed over `s`, within `wait`.
fn echoed(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

/// A translated flow keeps its next hop (the server's MAC, the external interface) in its
/// entry instead of asking the FIB per packet. When the server's MAC changes and the gateway
/// learns it, the agent hears the neighbour change over netlink and bumps the route
/// generation, so the very next segment goes to the new MAC (not one retransmission); it
/// hears forwarding turned off too. With no agent running, the cached hop gives way by age,
/// within a second.
#[test]
fn a_translated_flow_follows_its_next_hop_when_it_changes() {
    let mut lab = Lab::new("");
    // Retransmissions are what the test counts: only for a lost segment, not for a loaded
    // machine's late echo (no tail-loss probe; a second before a timeout, not 200 ms). A
    // segment lost to the old MAC is still sent again within the echo's 3 s.
    lab.host.exec("sysctl", &["-qw", "net.ipv4.tcp_early_retrans=0"]);
    lab.host.exec("ip", &["route", "change", "default", "via", "198.51.100.1", "rto_min", "1s"]);
    let _echo =
        common::echo::EchoServer::start(&lab.server, vec!["203.0.113.10:7".parse().unwrap()]);
    let mut s = lab.host.run(|| {
        TcpStream::connect_timeout(&"203.0.113.10:7".parse().unwrap(), Duration::from_secs(3))
            .expect("connect through NAT")
    });
    assert!(echoed(&mut s, Duration::from_secs(3)));
    let sport = s.local_addr().unwrap().port();
    let ext0: u32 =
        String::from_utf8_lossy(&lab.gw.exec("cat", &["/sys/class/net/ext0/ifindex"]).stdout)
            .trim()
            .parse()
            .unwrap();
    assert_eq!(cached_hop(&lab.pins, sport), (lab.server.mac("eth0"), ext0), "cached");

    // The server moves to another MAC; the gateway's neighbour entry follows.
    let move_to = |mac: &str| {
        lab.server.exec("ip", &["link", "set", "dev", "eth0", "address", mac]);
        lab.gw.exec(
            "ip",
            &["neigh", "replace", "203.0.113.10", "lladdr", mac, "dev", "ext0", "nud", "reachable"],
        );
    };
    let generation = route_generation(&lab.pins);
    let retransmitted = common::retransmissions(&s);
    move_to("02:00:00:00:00:07");
    lab.wait("the agent to bump the route generation", Duration::from_secs(5), |l| {
        route_generation(&l.pins) != generation
    });
    assert!(echoed(&mut s, Duration::from_secs(3)), "echo after the MAC change");
    assert_eq!(common::retransmissions(&s), retransmitted, "no segment lost to the old MAC");
    assert_eq!(cached_hop(&lab.pins, sport).0, [2, 0, 0, 0, 0, 7]);
    // Forwarding turned off is heard too (netconf): no cached hop forwards past it.
    let generation = route_generation(&lab.pins);
    lab.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
    lab.wait("a bump for forwarding turned off", Duration::from_secs(5), |l| {
        route_generation(&l.pins) != generation
    });
    lab.gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);

    // No agent: nothing bumps the generation; the cached hop is asked again after at most
    // 100 ticks (0.1-1 s), and TCP's retransmission gets through.
    let mut agent = lab.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    let generation = route_generation(&lab.pins);
    move_to("02:00:00:00:00:08");
    assert!(echoed(&mut s, Duration::from_secs(5)), "echo after the second MAC change");
    assert_eq!(route_generation(&lab.pins), generation);
    assert_eq!(cached_hop(&lab.pins, sport).0, [2, 0, 0, 0, 0, 8]);
}

/// `flows delete` ends a translated flow cleanly: its entries and its translation go (the
/// port is free again: here the pool's only port, so a second flow gets it), and the
/// deleted flow's next datagram starts a new flow with a new translation.
#[test]
fn flows_delete_ends_the_translation_of_a_deleted_flow() {
    let lab = Lab::new(
        "    ports: \"2000-2000\"\n    udp_idle_timeout: 120\n    port_reuse_cooldown: 0\n",
    );
    lab.udp_echo();
    assert_eq!(lab.udp(42000).as_deref(), Some("192.0.2.100"));
    assert_eq!(lab.udp(42001), None, "one port, taken by the first flow");
    assert_eq!(lab.nat()[0]["translations"], 1, "{}", lab.nat());

    let out = lab.pins.xdpgate(&["flows", "delete", "--port", "42000"]);
    assert!(out.starts_with("deleted 1 flows (2 entries, 1 NAT translations)"), "{out}");
    assert_eq!(lab.nat()[0]["translations"], 0, "{}", lab.nat());
    assert_eq!(lab.ports_in_use(), 0, "without a cooldown the port is free at once");
    let flows = lab.pins.xdpgate(&["flows", "--json", "--top", "0", "--port", "42000"]);
    assert_eq!(flows.trim(), "[]");
    // The freed port serves another flow.
    assert_eq!(lab.udp(42001).as_deref(), Some("192.0.2.100"), "the freed port is reused");
}

impl Lab {
    /// The live flows of the host's UDP port `sport` (through the gateway, translated).
    fn flows_of(&self, sport: u16) -> Vec<serde_json::Value> {
        let out = self.pins.xdpgate(&["flows", "--json", "--port", &sport.to_string()]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    }

    /// Whether the gateway's ports agree with the live flows: each live flow holds its
    /// translation, and no port is held for a flow that is gone (without a cooldown).
    fn ports_agree_with_flows(&self, sport: u16) -> Result<(), String> {
        let nat = self.nat();
        let flows = self.flows_of(sport);
        let (translations, ports) = (nat[0]["translations"].as_u64(), self.ports_in_use());
        let live = flows.len() as u64;
        if translations == Some(live) && ports == live {
            Ok(())
        } else {
            Err(format!("{live} live flows, NAT {nat}; flows {flows:?}"))
        }
    }
}

/// `flows delete` of a translated flow while its datagrams keep coming: whatever packet
/// falls between the steps of the delete, the gateway's port is never freed under a live
/// flow (the translation ends before the entries go, and the port is freed after). With
/// the entries removed first, a datagram in between rebuilt the flow from the translation,
/// which then ended under it: a live flow with no translation and its port free for another.
#[test]
fn flows_delete_under_traffic_never_frees_a_port_under_a_live_flow() {
    let lab = Lab::new(
        "    ports: \"2000-2000\"\n    udp_idle_timeout: 120\n    port_reuse_cooldown: 0\n",
    );
    lab.udp_echo();
    let sock = Arc::new(lab.host.run(|| UdpSocket::bind("198.51.100.10:42100").unwrap()));
    for round in 0..30 {
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (sock, stop) = (sock.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = sock.send_to(b"?", "203.0.113.10:5353");
                }
            })
        };
        lab.wait("the flow", Duration::from_secs(5), |l| l.flows_of(42100).len() == 1);
        let out = lab.pins.xdpgate(&["flows", "delete", "--port", "42100"]);
        assert!(out.starts_with("deleted 1 flows (2 entries, 1 NAT translations)"), "{out}");
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        // Datagrams and answers still in flight settle within moments; a flow left without
        // its translation stays so (for its 120 s idle timeout).
        let start = Instant::now();
        while let Err(e) = lab.ports_agree_with_flows(42100) {
            assert!(start.elapsed() < Duration::from_secs(3), "round {round}: {e}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `flows delete` is a writer: while another holds the dataplane's write lock it waits,
/// and gives up (within the lock's wait) with nothing deleted; once the lock is free it
/// deletes.
#[test]
fn flows_delete_waits_for_another_writer() {
    let lab = Lab::new("    udp_idle_timeout: 120\n    port_reuse_cooldown: 0\n");
    lab.udp_echo();
    assert_eq!(lab.udp(42200).as_deref(), Some("192.0.2.100"));
    let lock = xdpgate_dataplane::state::WriteLock::acquire(&lab.pins.dir).unwrap();
    let out = lab.pins.try_xdpgate(&["flows", "delete", "--port", "42200"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deleted under another writer's lock");
    assert!(err.contains("another xdpgate is changing the dataplane"), "{err}");
    assert_eq!(lab.flows_of(42200).len(), 1, "nothing deleted");
    assert_eq!(lab.nat()[0]["translations"], 1, "{}", lab.nat());
    drop(lock);
    let out = lab.pins.xdpgate(&["flows", "delete", "--port", "42200"]);
    assert!(out.starts_with("deleted 1 flows (2 entries, 1 NAT translations)"), "{out}");
    assert_eq!(lab.nat()[0]["translations"], 0, "{}", lab.nat());
}

/// Ending a translation takes its gateway's port cooldown from the running policy's record:
/// without one (the state directory lost it), `flows delete` of a translated flow refuses
/// and deletes nothing (it used to remove the entries and leave the translation, from which
/// the flow's next packet rebuilt it).
#[test]
fn flows_delete_without_the_policy_record_refuses_and_deletes_nothing() {
    let lab = Lab::new("    udp_idle_timeout: 120\n    port_reuse_cooldown: 0\n");
    lab.udp_echo();
    assert_eq!(lab.udp(42300).as_deref(), Some("192.0.2.100"));
    let generation = xdpgate_dataplane::apply::active(&lab.pins.dir).unwrap().1.generation;
    let record = xdpgate_dataplane::state::path_of(&lab.pins.dir, generation);
    let aside = record.with_extension("aside");
    std::fs::rename(&record, &aside).unwrap();
    let out = lab.pins.try_xdpgate(&["flows", "delete", "--port", "42300"]);
    std::fs::rename(&aside, &record).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deleted without the gateway's cooldown");
    assert!(
        err.contains("translated by a NAT gateway") && err.contains("nothing was deleted"),
        "{err}"
    );
    assert_eq!(lab.flows_of(42300).len(), 1, "nothing deleted");
    assert_eq!(lab.nat()[0]["translations"], 1, "{}", lab.nat());
}

/// A writer that keeps taking the write lock (a loop of `apply`: held 1 s, free for 20 ms)
/// does not stop translations from expiring: the agent's turn at the lock waits for it and
/// catches the gap. An idle translation ends within its idle timeout (4 s) plus about 2 s;
/// the test allows 14 (seen failing before: the agent only tried the lock once a tick and
/// the translation stayed).
#[test]
fn translations_expire_under_a_writer_that_keeps_the_lock() {
    let lab = Lab::new("    udp_idle_timeout: 4\n    port_reuse_cooldown: 0\n");
    lab.udp_echo();
    assert_eq!(lab.udp(42300).as_deref(), Some("192.0.2.100"));
    assert_eq!(lab.nat()[0]["translations"], 1, "{}", lab.nat());
    let busy = Arc::new(AtomicBool::new(true));
    let writer = {
        let (busy, pins) = (busy.clone(), lab.pins.dir.path().to_owned());
        thread::spawn(move || {
            let pins = xdpgate_dataplane::PinDir::new(pins);
            let (mut held, start) = (0u32, Instant::now());
            // Bounded, so that a failing test does not leave it holding the lock.
            while busy.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(20) {
                let lock = xdpgate_dataplane::state::WriteLock::acquire(&pins).unwrap();
                held += 1;
                thread::sleep(Duration::from_secs(1));
                drop(lock);
                thread::sleep(Duration::from_millis(20));
            }
            held
        })
    };
    let took = lab.wait("the translation to expire", Duration::from_secs(14), |l| {
        l.nat()[0]["translations"] == 0
    });
    busy.store(false, Ordering::SeqCst);
    let held = writer.join().unwrap();
    println!(
        "the translation expired {took:?} after the exchange; the writer held the lock {held} times"
    );
}

/// A reload that renumbers the gateways (a new one listed first): the packets of a flow
/// translated before it still count under its gateway, by name. The programs remember, per
/// CPU, which gateway owns the last public address they counted, until the addresses
/// change; the host's datagrams all leave from one CPU, so one memory serves them all.
#[test]
fn a_renumbered_gateway_keeps_counting_its_flows() {
    renumbered_gateway_keeps_counting(false);
}

/// The same renumbering by a writer that does not bump `NAT_PUBLIC_VERSION` (a build from
/// before it, as after `xdpgate upgrade` under a running agent; played here by removing
/// the pin, which the agent then cannot open): what the programs remember is still
/// forgotten within a second.
#[test]
fn a_renumbering_unknown_to_the_programs_is_followed_within_a_second() {
    renumbered_gateway_keeps_counting(true);
}

fn renumbered_gateway_keeps_counting(older_writer: bool) {
    let lab = Lab::new("    udp_idle_timeout: 60\n");
    lab.udp_echo();
    let outbound = |name: &str| {
        let nat = lab.nat();
        gateway(&nat, name).map_or(0, |g| g["traffic"]["outbound"]["packets"].as_u64().unwrap())
    };
    let exchange = || {
        lab.host.run(|| {
            pin_to_cpu(0);
            let s = UdpSocket::bind(("198.51.100.10", 41000)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
            s.send_to(b"?", "203.0.113.10:5353").unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).expect("the echo through the gateway");
            assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end_matches('.'), "192.0.2.100");
        })
    };
    for _ in 0..3 {
        exchange();
    }
    assert_eq!(outbound("natgw"), 3, "{}", lab.nat());

    if older_writer {
        std::fs::remove_file(lab.pins.dir.path().join("NAT_PUBLIC_VERSION")).unwrap();
    }
    lab.reload(
        "virtual_network:\n  address_space: [198.51.100.0/24]\nnat_gateways:\n  - name: first\n    \
         public_addresses: [192.0.2.200]\n    subnets: [198.51.100.128/25]\n    \
         udp_idle_timeout: 4\n  - name: natgw\n    \
         public_addresses: [192.0.2.100]\n    subnets: [198.51.100.0/25]\n    \
         udp_idle_timeout: 60\n",
    );
    assert_eq!(lab.nat()[1]["nat_gateway"], "natgw", "renumbered: {}", lab.nat());
    if older_writer {
        // The time the programs keep an answer (`PUBLIC_MEMO_NS` in ebpf/src/snat.rs).
        thread::sleep(Duration::from_millis(1100));
    }
    for _ in 0..4 {
        exchange();
    }
    assert_eq!((outbound("natgw"), outbound("first")), (7, 0), "{}", lab.nat());
    // The translation is its gateway's, by address: reported under it, and idle for as long
    // as its timeout allows (60 s), not the 4 s of the gateway that now has its index.
    let translations = |l: &Lab| {
        let nat = l.nat();
        let of = |name: &str| {
            gateway(&nat, name)
                .map(|g| (g["translations"].clone(), g["addresses"][0]["ports_in_use"].clone()))
        };
        (of("natgw"), of("first"))
    };
    let held = (Some((1.into(), 1.into())), Some((0.into(), 0.into())));
    assert_eq!(translations(&lab), held, "{}", lab.nat());
    if !older_writer {
        // Past the other gateway's timeout; the agent expires translations once a second.
        thread::sleep(Duration::from_secs(6));
        assert_eq!(translations(&lab), held, "kept for its own gateway's timeout: {}", lab.nat());
    }
}

/// A reload that takes a translation's public address from every gateway (its gateway
/// removed, or replaced by one with another address) does not cut its flow: the flow keeps
/// its rewrite, and its translation idles out as the flow would, by the timeout it began
/// with (4 s), its port cooling down for the default 10 s, as a later reload may give the
/// address back. Seen failing before: with no gateway the translation and its flow were
/// never expired; with another in its place they took that one's 60 s.
#[test]
fn a_translation_whose_gateway_is_removed_still_idles_out() {
    orphaned_translation_idles_out("");
}

#[test]
fn a_translation_whose_address_no_gateway_has_still_idles_out() {
    orphaned_translation_idles_out(
        "nat_gateways:\n  - name: other\n    public_addresses: [192.0.2.200]\n    \
         subnets: [198.51.100.0/24]\n    udp_idle_timeout: 60\n",
    );
}

fn orphaned_translation_idles_out(gateways: &str) {
    let lab = Lab::new("    udp_idle_timeout: 4\n");
    lab.udp_echo();
    assert_eq!(lab.udp(42320).as_deref(), Some("192.0.2.100"));
    lab.reload(&format!("virtual_network:\n  address_space: [198.51.100.0/24]\n{gateways}"));
    assert_eq!(lab.udp(42320).as_deref(), Some("192.0.2.100"), "the flow keeps its rewrite");
    // The states (`NAT_ACTIVE`, `NAT_COOLDOWN`) of the translation's entries: its forward
    // and reply tuples.
    let translation = || {
        let map: aya::maps::HashMap<_, FlowKey, NatEntry> =
            lab.pins.dir.open_map(xdpgate_common::maps::NAT_MAP).unwrap().try_into().unwrap();
        let mut states: Vec<u32> = map.iter().map(|e| e.unwrap().1.state).collect();
        states.sort();
        states
    };
    assert_eq!(translation(), [NAT_ACTIVE, NAT_ACTIVE], "the translation's two entries");
    // `xdpgate nat` shows it under no gateway, after the running policy's.
    let others = usize::from(!gateways.is_empty());
    let orphans = |l: &Lab| {
        let nat = l.nat();
        let gateways = nat.as_array().unwrap();
        let names: Vec<_> = gateways.iter().map(|g| g["nat_gateway"].clone()).collect();
        assert_eq!(names.last(), Some(&serde_json::Value::Null), "{nat}");
        assert_eq!(names.len(), others + 1, "{nat}");
        let o = gateways.last().unwrap();
        assert_eq!(
            o["addresses"],
            serde_json::json!([{"address": "192.0.2.100", "ports_in_use": 1}]),
            "{nat}"
        );
        o["translations"].as_u64().unwrap()
    };
    assert_eq!(orphans(&lab), 1);
    // Both, as the expiry removes the flow's entries before it ends the translation.
    let took = lab.wait("the translation to idle out", Duration::from_secs(14), |l| {
        l.flows_of(42320).is_empty() && translation() == [NAT_COOLDOWN]
    });
    assert!(took > Duration::from_secs(3), "idled out after {took:?}, before its 4 s");
    // Its port cools down: in use, with no translation.
    assert_eq!(orphans(&lab), 0);
}

/// Keeps the calling thread on `cpu`.
fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// What a connected UDP socket hears after sending one datagram: `ConnectionRefused` when
/// an ICMP port unreachable it takes for its own came back, `WouldBlock` when nothing did.
fn answer_to(s: &UdpSocket) -> std::io::ErrorKind {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send(b"anyone?").unwrap();
    match s.recv(&mut [0u8; 64]) {
        Ok(n) => panic!("an answer of {n} bytes"),
        Err(e) => e.kind(),
    }
}

/// The protected side's ICMP errors leave translated, at both hooks: a backend's port
/// unreachable reaches the client from the frontend, a private host's reaches the internet
/// host from the public address, each quoting the datagram as its sender sent it, so the
/// sender's connected socket is told "connection refused". (Untranslated they came from the
/// private address, which no socket of the sender's matches: it waited out its timeout.)
#[test]
fn port_unreachable_from_the_protected_side_reaches_the_sender_translated() {
    for hook in ["xdp", "tc"] {
        let net = Gateway::with_hooks(hook, hook);
        net.take_redirects();
        net.apply("errors.yaml", UDP_LB_AND_NAT_POLICY);

        let client = net.client.run(|| UdpSocket::bind((CLIENT4, 0)).unwrap());
        client.connect("192.0.2.10:53").unwrap();
        assert_eq!(
            answer_to(&client),
            std::io::ErrorKind::ConnectionRefused,
            "{hook}: the client's socket hears the backend's port unreachable"
        );

        // The internet host learns the server's public address and port from a datagram,
        // then writes back after the server's socket has closed.
        let internet = net.client.run(|| UdpSocket::bind((CLIENT4, 7000)).unwrap());
        internet.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let server = net.server.run(|| UdpSocket::bind((SERVER4, 0)).unwrap());
        server.send_to(b"hello", (CLIENT4, 7000)).unwrap();
        let (_, public) = internet.recv_from(&mut [0u8; 64]).expect("a datagram through NAT");
        assert_eq!(public.ip().to_string(), "192.0.2.100", "{hook}: translated");
        drop(server);
        internet.connect(public).unwrap();
        assert_eq!(
            answer_to(&internet),
            std::io::ErrorKind::ConnectionRefused,
            "{hook}: the internet host's socket hears the private host's port unreachable"
        );
    }
}
