//! The load balancer in the kernel, through BPF_PROG_TEST_RUN: frontends, Maglev selection,
//! DNAT of the client's packets and un-DNAT of the replies with checksums verified from
//! scratch, IPv4 and IPv6, TCP and UDP, stickiness, inbound NAT rules, NSGs judging the
//! translated packet, and what happens when every backend is down.

mod common;

use std::{collections::HashSet, net::IpAddr};

use common::{
    kernel::{DROP, Kernel, PASS},
    packet::{
        ACK, ETH_LEN, FIN, L4, RST, SYN, endpoints, flow_key, frame, frame_vlan, quoted_endpoints,
        tcp_frame,
    },
};
use xdpgate_common::iface::Role;

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: backends
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: [8080, 22]}
      - {name: allow-dns, priority: 110, direction: inbound, access: allow, protocol: udp,
         source: Internet, destination: "*", destination_ports: 53}
load_balancers:
  - name: lb
    frontends:
      - {name: v4, address: 192.0.2.10}
      - {name: v6, address: "2001:db8:f::10"}
    backend_pools:
      - {name: web4, backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]}
      - {name: web6, backends: ["2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"]}
    probes:
      - {name: up, protocol: tcp, port: 8080}
    rules:
      - {name: http, frontend: v4, protocol: tcp, frontend_port: 80, backend_port: 8080, backend_pool: web4, probe: up}
      - {name: sticky, frontend: v4, protocol: tcp, frontend_port: 81, backend_port: 8080, backend_pool: web4, distribution: source_ip}
      - {name: closed, frontend: v4, protocol: tcp, frontend_port: 82, backend_port: 9999, backend_pool: web4}
      - {name: dns6, frontend: v6, protocol: udp, frontend_port: 53, backend_pool: web6}
      - {name: http6, frontend: v6, protocol: tcp, frontend_port: 80, backend_port: 8080, backend_pool: web6}
    inbound_nat_rules:
      - {name: ssh, frontend: v4, protocol: tcp, frontend_port: 2201, backend: 198.51.100.12, backend_port: 22}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The backend a TCP segment from the client to the IPv4 frontend is sent to.
fn backend_of(k: &Kernel, sport: u16, dport: u16, flags: u8) -> IpAddr {
    endpoints(&k.through(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(sport, dport, flags)))).1
}

/// The backends `n` new connections to port 80, from consecutive ports, reach.
fn spread(k: &Kernel, first_sport: u16, n: u16) -> HashSet<IpAddr> {
    (first_sport..first_sport + n).map(|p| backend_of(k, p, 80, SYN)).collect()
}

#[test]
fn dnat_to_a_backend_and_back_v4_tcp() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let syn = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 80, SYN));
    let out = k.through(&syn);
    let (src, backend, sport, dport) = endpoints(&out);
    assert_eq!(
        (src, sport, dport),
        (ip("203.0.113.7"), 40000, 8080),
        "client side kept, port mapped"
    );
    assert!(
        ["198.51.100.11", "198.51.100.12", "198.51.100.13"].map(ip).contains(&backend),
        "{backend}"
    );
    assert_eq!(out.len(), syn.len());

    // Later packets of the flow go to the same backend.
    for _ in 0..3 {
        let out = k.through(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 80, ACK)));
        assert_eq!(endpoints(&out).1, backend);
    }

    // The backend's reply gets the frontend back as its source.
    k.arrive_as(Role::Internal);
    let reply = frame(&backend.to_string(), "203.0.113.7", L4::Tcp(8080, 40000, SYN | ACK));
    let out = k.through(&reply);
    assert_eq!(endpoints(&out), (ip("192.0.2.10"), ip("203.0.113.7"), 80, 40000));
}

#[test]
fn dnat_v6_udp_and_tcp() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let out = k.through(&frame("2001:db8:2::7", "2001:db8:f::10", L4::Udp(5000, 53)));
    let (_, backend, _, dport) = endpoints(&out);
    assert_eq!(dport, 53, "backend_port 0 keeps the frontend port");
    assert!(backend.to_string().starts_with("2001:db8:1::1"), "{backend}");
    k.arrive_as(Role::Internal);
    let out = k.through(&frame(&backend.to_string(), "2001:db8:2::7", L4::Udp(53, 5000)));
    assert_eq!(endpoints(&out), (ip("2001:db8:f::10"), ip("2001:db8:2::7"), 53, 5000));

    k.arrive_as(Role::External);
    let out = k.through(&frame("2001:db8:2::7", "2001:db8:f::10", L4::Tcp(40000, 80, SYN)));
    assert_eq!(endpoints(&out).3, 8080);
}

/// A backend's port unreachable about a client's datagram reaches the client from the
/// frontend, quoting the datagram as the client sent it (frontend address and port): the
/// client's socket sees it, and no backend address leaves. Over TCP too (a firewall's
/// administratively prohibited, say).
#[test]
fn a_backends_icmp_error_leaves_from_the_frontend() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (client, frontend, l4) in [
        ("2001:db8:2::7", "2001:db8:f::10", L4::Udp(5000, 53)),
        ("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 80, SYN)),
    ] {
        k.arrive_as(Role::External);
        let sent = frame(client, frontend, l4);
        let got = k.through(&sent);
        let backend = endpoints(&got).1.to_string();
        k.arrive_as(Role::Internal);
        let out =
            k.through(&frame_vlan(&backend, client, L4::PortUnreachable, &[], &got[ETH_LEN..]));
        let (src, dst, ..) = endpoints(&out);
        assert_eq!((src, dst), (ip(frontend), ip(client)), "{l4:?}: outer addresses");
        assert_eq!(quoted_endpoints(&out), endpoints(&sent), "{l4:?}: the quote as sent");
    }
}

#[test]
fn flows_spread_and_source_ip_sticks() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let spread: HashSet<IpAddr> = (0..60).map(|i| backend_of(&k, 41000 + i, 80, SYN)).collect();
    assert_eq!(spread.len(), 3, "60 flows of the 5-tuple rule reach every backend: {spread:?}");
    let sticky: HashSet<IpAddr> = (0..30).map(|i| backend_of(&k, 42000 + i, 81, SYN)).collect();
    assert_eq!(sticky.len(), 1, "source_ip: one client, one backend: {sticky:?}");
}

#[test]
fn inbound_nat_rule_and_nsg_on_the_translated_packet() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let out = k.through(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 2201, SYN)));
    assert_eq!(endpoints(&out), (ip("203.0.113.7"), ip("198.51.100.12"), 40000, 22));
    // Port 82 balances to backend port 9999, which the NSG does not allow.
    let before = k.drops("policy");
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40001, 82, SYN))), DROP);
    assert_eq!(k.drops("policy"), before + 1);
    // A frontend port nobody listens on is no frontend: the packet is judged as addressed.
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40002, 443, SYN))), PASS);
}

/// A client's flow to an address that became a frontend while the client kept trying (SYNs
/// sent again, datagrams) is balanced from its next packet on: it was forwarded untranslated
/// for as long as the client kept trying (seen failing). A connection under way (its answers
/// bypassing the gateway: its flow never leaves the embryonic table) goes on as it was.
/// With no load balancer before, and with one that did not have the address.
#[test]
fn a_flow_begun_before_its_address_became_a_frontend_is_balanced() {
    let none = &POLICY[..POLICY.find("load_balancers:").unwrap()];
    let other = POLICY
        .replace("{name: v4, address: 192.0.2.10}", "{name: v4, address: 192.0.2.99}")
        .replace("address: \"2001:db8:f::10\"", "address: \"2001:db8:f::99\"");
    assert_ne!(other, POLICY);
    let web4 = ["198.51.100.11", "198.51.100.12", "198.51.100.13"].map(ip);
    let web6 = ["2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"].map(ip);
    for before in [none, other.as_str()] {
        let k = Kernel::new();
        k.apply(before);
        k.arrive_as(Role::External);
        let syn = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 80, SYN));
        let dns = frame("2001:db8:2::7", "2001:db8:f::10", L4::Udp(40000, 53));
        // A connection whose answers bypass the gateway: its flow stays an embryo.
        let direct = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40001, 80, SYN));
        let going_on = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40001, 80, ACK));
        for p in [&syn, &dns, &direct, &going_on] {
            assert_eq!(k.through(p), *p, "no frontend yet: on as addressed");
        }
        k.apply(POLICY);
        assert!(web4.contains(&endpoints(&k.through(&syn)).1), "the SYN sent again balanced");
        assert!(web6.contains(&endpoints(&k.through(&dns)).1), "the next datagram balanced");
        // Seen failing: its segment found its flow forgotten, and was dropped (`no_flow`).
        assert_eq!(k.through(&going_on), going_on, "a connection under way goes on as it was");
    }
}

/// A handshake to a frontend address on a port no rule serves (the gateway's own address,
/// left to its stack) completes while a set change's mark is up: its flow, decided under the
/// running generation, is not taken for one an apply made a frontend's (seen failing: its
/// ACK found the flow forgotten, and was dropped as `no_flow`).
#[test]
fn a_handshake_to_a_frontends_unserved_port_completes_under_a_set_changes_mark() {
    use aya::maps::Array;
    use xdpgate_common::{
        maps::POLICY_CONFIG,
        nsg::{GENERATION_CHANGING, PolicyConfig},
    };
    let k = Kernel::new();
    k.apply(POLICY);
    let (slot, config) = xdpgate_dataplane::apply::active(&k.pins.dir).unwrap();
    let mut configs: Array<_, PolicyConfig> =
        k.pins.dir.open_map(POLICY_CONFIG).unwrap().try_into().unwrap();
    let changing = PolicyConfig { generation: config.generation | GENERATION_CHANGING, ..config };
    configs.set(slot, changing, 0).unwrap();
    k.arrive_as(Role::External);
    let syn = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40100, 443, SYN));
    assert_eq!(k.through(&syn), syn);
    k.arrive_as(Role::Internal);
    let answer = frame("192.0.2.10", "203.0.113.7", L4::Tcp(443, 40100, SYN | ACK));
    assert_eq!(k.through(&answer), answer);
    k.arrive_as(Role::External);
    let ack = frame("203.0.113.7", "192.0.2.10", L4::Tcp(40100, 443, ACK));
    assert_eq!(k.run(&ack), PASS, "the handshake's ACK");
}

#[test]
fn all_backends_down() {
    let k = Kernel::new();
    k.apply_with_health(POLICY, |_| false);
    k.arrive_as(Role::External);
    let before = k.drops("no_backend");
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40000, 80, SYN))), DROP);
    assert_eq!(k.drops("no_backend"), before + 1, "no new flows by default");
    // Inbound NAT rules do not depend on probes.
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40001, 2201, SYN))), PASS);

    let send_to_all = POLICY.replace(
        "backend_pool: web4, probe: up}",
        "backend_pool: web4, probe: up, all_down: send_to_all}",
    );
    k.apply_with_health(&send_to_all, |_| false);
    let out = k.through(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40002, 80, SYN)));
    assert_eq!(endpoints(&out).3, 8080, "send_to_all still balances");
}

#[test]
fn unhealthy_backend_gets_no_new_flows() {
    let k = Kernel::new();
    k.apply_with_health(POLICY, |b| b != ip("198.51.100.11"));
    k.arrive_as(Role::External);
    let seen = spread(&k, 43000, 60);
    assert!(!seen.contains(&ip("198.51.100.11")), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// `xdpgate apply` (one-shot, no probes of its own) keeps out the backends the dataplane
/// has taken out, and only those.
#[test]
fn a_one_shot_apply_keeps_unhealthy_backends_out() {
    let k = Kernel::new();
    k.apply_with_health(POLICY, |b| b != ip("198.51.100.11"));
    k.pins.apply(POLICY);
    k.arrive_as(Role::External);
    let seen = spread(&k, 46000, 60);
    assert_eq!(seen, HashSet::from([ip("198.51.100.12"), ip("198.51.100.13")]));
}

/// A TCP connection keeps its backend after the backend fails its probe, even through a
/// retransmitted SYN; a new connection on the tuple of a closed one is balanced afresh.
#[test]
fn closed_connection_reopened_on_its_tuple_is_balanced_afresh() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let backend_of = |sport: u16, flags: u8| backend_of(&k, sport, 80, flags);
    let first = backend_of(44000, SYN);
    let open = (44001..44200).find(|p| backend_of(*p, SYN) == first).expect("same backend");
    // The client's reset, at its SYN's number + 1 (`L4::Tcp`'s SYN is at 1000).
    k.through(&tcp_frame("203.0.113.7", "192.0.2.10", (44000, 80), RST, 1001, 0));

    k.apply_with_health(POLICY, |b| b != first);
    assert_eq!(backend_of(open, SYN), first, "a retransmitted SYN keeps its backend");
    assert_ne!(backend_of(44000, SYN), first, "a reopened connection avoids the failed backend");
}

/// Two frontend ports of one client port can reach one backend port: the second connection
/// reuses the backend-side tuple of the first. Once the first has closed (its entries linger
/// for a while), the backend's answer to the second must come back from the second's
/// frontend port, not from the closed connection's: a SYN-ACK, and a reset refusing it
/// (seen failing when only a SYN-ACK took the tuple over: the reset left from :81).
#[test]
fn a_closed_connection_does_not_shadow_a_new_one_on_its_backend_tuple() {
    let (c, vip) = ("203.0.113.7", "192.0.2.10");
    let (b, p) = port_sharing_a_backend();

    for answer in [SYN | ACK, RST | ACK] {
        let k = Kernel::new();
        k.apply(POLICY);
        let (b, bs) = (b, b.to_string());
        let to = |role, pkt: Vec<u8>| {
            k.arrive_as(role);
            endpoints(&k.through(&pkt))
        };
        // A connection to :81, established and closed by FINs both ways.
        assert_eq!(to(Role::External, tcp_frame(c, vip, (p, 81), SYN, 1000, 0)).1, b);
        let back = to(Role::Internal, tcp_frame(&bs, c, (8080, p), SYN | ACK, 5000, 1001));
        assert_eq!(back, (ip(vip), ip(c), 81, p));
        to(Role::External, tcp_frame(c, vip, (p, 81), ACK, 1001, 5001));
        to(Role::External, tcp_frame(c, vip, (p, 81), FIN | ACK, 1001, 5001));
        to(Role::Internal, tcp_frame(&bs, c, (8080, p), FIN | ACK, 5001, 1002));
        to(Role::External, tcp_frame(c, vip, (p, 81), ACK, 1002, 5002));
        // The client's next connection from the same port, to :80, reaches the same backend
        // port, and the answer comes back from :80.
        let out = to(Role::External, tcp_frame(c, vip, (p, 80), SYN, 9000, 0));
        assert_eq!((out.1, out.3), (b, 8080));
        let back = to(Role::Internal, tcp_frame(&bs, c, (8080, p), answer, 7000, 9001));
        assert_eq!(back, (ip(vip), ip(c), 80, p), "answer {answer:#x} left as the closed one's");
    }
}

/// A backend and a port of the client 203.0.113.7 whose connections to both :81 (the sticky
/// rule) and :80 (the 5-tuple rule) go there, found in a dataplane of its own (Maglev is
/// deterministic).
fn port_sharing_a_backend() -> (IpAddr, u16) {
    let probe = Kernel::new();
    probe.apply(POLICY);
    probe.arrive_as(Role::External);
    let b = backend_of(&probe, 45999, 81, SYN);
    let p = (45000..45999).find(|&p| backend_of(&probe, p, 80, SYN) == b).expect("a port");
    (b, p)
}

/// `flows delete` of a new flow whose backend-side tuple a closed connection's established
/// entry shares removes the new flow only: the closed connection's reply entry stays (seen
/// failing: the delete took it too, as the entry of a flow confirmed during its read).
#[test]
fn deleting_a_new_flow_leaves_another_flows_entry_on_its_backend_tuple() {
    use xdpgate_dataplane::flows::{self, FlowState};
    let (c, vip) = ("203.0.113.7", "192.0.2.10");
    let (b, p) = port_sharing_a_backend();
    let k = Kernel::new();
    k.apply(POLICY);
    let bs = b.to_string();
    let to = |role, pkt: Vec<u8>| {
        k.arrive_as(role);
        k.run(&pkt)
    };
    // A connection to :81, established and closed by FINs both ways.
    to(Role::External, tcp_frame(c, vip, (p, 81), SYN, 1000, 0));
    to(Role::Internal, tcp_frame(&bs, c, (8080, p), SYN | ACK, 5000, 1001));
    to(Role::External, tcp_frame(c, vip, (p, 81), ACK, 1001, 5001));
    to(Role::External, tcp_frame(c, vip, (p, 81), FIN | ACK, 1001, 5001));
    to(Role::Internal, tcp_frame(&bs, c, (8080, p), FIN | ACK, 5001, 1002));
    let shared = flow_key(&bs, c, 8080, p, 6);
    assert!(k.established(&shared).is_some(), "the closed connection's reply entry");
    // The client's next connection from the same port, to :80: the same backend tuple.
    to(Role::External, tcp_frame(c, vip, (p, 80), SYN, 9000, 0));
    let keep = |f: &flows::Flow| f.src_port == Some(p) && f.dst_port == Some(80);
    let out = xdpgate_dataplane::delete::flows(
        &k.pins.dir,
        Some(FlowState::Embryonic),
        keep,
        None,
        false,
    )
    .unwrap();
    assert_eq!(out.flows.len(), 1);
    assert!(k.embryo(&flow_key(c, vip, p, 80, 6)).is_none(), "the new flow deleted");
    assert!(k.established(&shared).is_some(), "the closed connection's reply entry deleted");
}

/// A load-balancing rule's `idle_timeout` applies to its flows; flows of other rules keep
/// the policy's timeout (TCP: 240 s).
#[test]
fn rule_idle_timeout_applies_to_its_flows() {
    let k = Kernel::new();
    let policy =
        POLICY.replace("distribution: source_ip}", "distribution: source_ip, idle_timeout: 4}");
    k.apply(&policy);
    k.arrive_as(Role::External);
    let packet = |dport, flags| frame("203.0.113.7", "192.0.2.10", L4::Tcp(45000, dport, flags));
    for port in [80, 81] {
        assert_ne!(k.run(&packet(port, SYN)), DROP);
        assert_ne!(k.run(&packet(port, ACK)), DROP);
    }
    std::thread::sleep(std::time::Duration::from_millis(4500));
    assert_ne!(k.run(&packet(80, ACK)), DROP, "the default rule's flow is still there");
    let before = k.drops("no_flow");
    assert_eq!(k.run(&packet(81, ACK)), DROP, "after 4.5 s idle the 4 s rule's flow is gone");
    assert_eq!(k.drops("no_flow"), before + 1);
}

/// A fragmented datagram to a frontend reaches the backend whole, and so does the
/// backend's fragmented answer on its way back.
#[test]
fn fragmented_datagrams_reach_the_backend_whole() {
    let k = Kernel::new();
    k.apply(POLICY);
    let data: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
    k.arrive_as(Role::External);
    let query = frame_vlan("2001:db8:2::7", "2001:db8:f::10", L4::Udp(40400, 53), &[], &data);
    let (_, backend, _, port) = endpoints(&k.through_fragmented(&query, 7));
    assert!(backend.to_string().starts_with("2001:db8:1::1"), "to a web6 backend: {backend}");
    assert_eq!(port, 53);

    k.arrive_as(Role::Internal);
    let answer = frame_vlan(&backend.to_string(), "2001:db8:2::7", L4::Udp(53, 40400), &[], &data);
    let back = k.through_fragmented(&answer, 8);
    assert_eq!(endpoints(&back), (ip("2001:db8:f::10"), ip("2001:db8:2::7"), 53, 40400));
}

const HA_AND_FLOATING: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
load_balancers:
  - name: lb
    frontends:
      - {name: appliance, address: 192.0.2.20}
      - {name: dsr, address: 192.0.2.30}
    backend_pools:
      - {name: nvas, backends: [198.51.100.21, 198.51.100.22]}
      - {name: web, backends: [198.51.100.31]}
    rules:
      - {name: ha-ports, frontend: appliance, protocol: all, frontend_port: 0, backend_pool: nvas}
      - {name: dsr-web, frontend: dsr, protocol: tcp, frontend_port: 80, backend_pool: web, floating_ip: true}
"#;

/// A port both policies serve is balanced throughout while applies switch its frontend
/// address between HA ports and a port rule: the new keys go in before the stale ones go,
/// and the address's own entry says HA ports, or no rule, only once its keys are in.
/// (Before: a window in each apply sent such SYNs on untranslated, or dropped them. Seen
/// failing.) Protocol 255, whose key is the address's own entry's, is balanced by HA ports.
#[test]
fn a_port_both_policies_serve_is_balanced_while_they_switch() {
    const APPLIES: usize = 16;
    let ha = HA_AND_FLOATING.to_owned();
    let port = ha.replace(
        "{name: ha-ports, frontend: appliance, protocol: all, frontend_port: 0,",
        "{name: ha-ports, frontend: appliance, protocol: tcp, frontend_port: 80,",
    );
    assert_ne!(ha, port);
    let k = std::sync::Arc::new(Kernel::new());
    k.apply(&ha);
    k.arrive_as(Role::External);
    let mut raw = frame("203.0.113.7", "192.0.2.20", L4::Udp(1, 2));
    raw[ETH_LEN + 9] = 255;
    common::packet::fix_ipv4_checksum(&mut raw, ETH_LEN);
    let nvas = ["198.51.100.21", "198.51.100.22"].map(ip);
    assert!(nvas.contains(&endpoints(&k.through(&raw)).1), "protocol 255 balanced");
    let pins = k.pins.dir.path().to_owned();
    let applier = std::thread::spawn(move || {
        let pins = xdpgate_dataplane::PinDir::new(pins);
        for i in 0..APPLIES {
            let src = if i % 2 == 0 { &port } else { &ha };
            let p = xdpgate_policy::load_str(src, "t.yaml").unwrap();
            xdpgate_dataplane::transaction::apply_policy(&pins, &p, src, &|_| true).unwrap();
        }
    });
    let (mut sent, mut missed) = (0u32, 0u32);
    while !applier.is_finished() {
        let sport = 10_000 + (sent % 50_000) as u16;
        let (verdict, out) =
            k.run_out(&frame("203.0.113.7", "192.0.2.20", L4::Tcp(sport, 80, SYN)));
        if verdict == DROP || !nvas.contains(&endpoints(&out).1) {
            missed += 1;
        }
        sent += 1;
    }
    applier.join().unwrap();
    eprintln!("{sent} SYNs over {APPLIES} applies, {missed} not balanced");
    assert!(sent > 1_000, "{sent} SYNs");
    assert_eq!(missed, 0, "{missed} of {sent} SYNs to a port both policies serve not balanced");
}

/// With the service table full, a new rule takes a retired rule's id: the retired rule's
/// frontend keys, which still name that id until they go, go before the id's Maglev table is
/// rewritten for the new rule. (Before: for the whole rewrite, a SYN to the retired rule's
/// frontend was sent to the new rule's backends. Seen failing.)
#[test]
fn a_retired_rules_frontend_never_reaches_the_rule_taking_its_id() {
    const APPLIES: usize = 8;
    let nat_rules: String = (0..xdpgate_common::lb::MAX_SERVICES - 1)
        .map(|i| {
            format!(
                "      - {{name: n{i}, frontend: a, protocol: tcp, frontend_port: {}, \
                 backend: 198.51.100.30, backend_port: 22}}\n",
                2000 + i
            )
        })
        .collect();
    let policy = |rule: &str, frontend: &str, pool: &str| {
        format!(
            r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: backends
    subnets: [198.51.100.0/24]
    rules:
      - {{name: web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: "*"}}
load_balancers:
  - name: lb
    frontends:
      - {{name: a, address: 192.0.2.10}}
      - {{name: b, address: 192.0.2.11}}
    backend_pools:
      - {{name: pa, backends: [198.51.100.21]}}
      - {{name: pb, backends: [198.51.100.22]}}
    rules:
      - {{name: {rule}, frontend: {frontend}, protocol: tcp, frontend_port: 80, backend_pool: {pool}}}
    inbound_nat_rules:
{nat_rules}"#
        )
    };
    let (old, new) = (policy("old", "a", "pa"), policy("new", "b", "pb"));
    let k = std::sync::Arc::new(Kernel::new());
    k.apply(&old);
    k.arrive_as(Role::External);
    let syn = |to: &str, sport: u16| frame("203.0.113.7", to, L4::Tcp(sport, 80, SYN));
    assert_eq!(endpoints(&k.through(&syn("192.0.2.10", 1))).1, ip("198.51.100.21"));
    let pins = k.pins.dir.path().to_owned();
    let applier = std::thread::spawn(move || {
        let pins = xdpgate_dataplane::PinDir::new(pins);
        for i in 0..APPLIES {
            let src = if i % 2 == 0 { &new } else { &old };
            let p = xdpgate_policy::load_str(src, "t.yaml").unwrap();
            xdpgate_dataplane::transaction::apply_policy(&pins, &p, src, &|_| true).unwrap();
        }
    });
    let (mut sent, mut wrong) = (0u32, Vec::new());
    while !applier.is_finished() {
        let sport = 10_000 + (sent % 50_000) as u16;
        for (to, other) in [("192.0.2.10", "198.51.100.22"), ("192.0.2.11", "198.51.100.21")] {
            let (verdict, out) = k.run_out(&syn(to, sport));
            if verdict != DROP && endpoints(&out).1 == ip(other) {
                wrong.push(to);
            }
            sent += 1;
        }
    }
    applier.join().unwrap();
    eprintln!("{sent} SYNs over {APPLIES} applies, {} to the other rule's backend", wrong.len());
    assert!(sent > 1_000, "{sent} SYNs");
    assert!(wrong.is_empty(), "{} of {sent} SYNs reached the other rule's backend", wrong.len());
}

/// HA ports: every protocol and port of the frontend is balanced, ports kept.
#[test]
fn ha_ports_balance_every_port_and_protocol() {
    let k = Kernel::new();
    k.apply(HA_AND_FLOATING);
    k.arrive_as(Role::External);
    let nvas = ["198.51.100.21", "198.51.100.22"].map(ip);
    for (l4, dport) in [
        (L4::Tcp(40000, 443, SYN), 443),
        (L4::Udp(40001, 4500), 4500),
        (L4::Tcp(40002, 22, SYN), 22),
    ] {
        let out = k.through(&frame("203.0.113.7", "192.0.2.20", l4));
        let (_, backend, _, port) = endpoints(&out);
        assert!(nvas.contains(&backend), "{l4:?} went to {backend}");
        assert_eq!(port, dport, "HA ports keep the destination port");
    }
    // ICMP echo too: the destination becomes a backend, the identifier stays.
    let out = k.through(&frame("203.0.113.7", "192.0.2.20", L4::Echo(5)));
    assert!(nvas.contains(&endpoints(&out).1));
}

/// Floating IP (direct server return): the destination stays the frontend address; the
/// flow remembers the backend as the next hop.
#[test]
fn floating_ip_keeps_the_frontend_address() {
    let k = Kernel::new();
    k.apply(HA_AND_FLOATING);
    k.arrive_as(Role::External);
    let syn = frame("203.0.113.7", "192.0.2.30", L4::Tcp(40000, 80, SYN));
    let out = k.through(&syn);
    assert_eq!(out, syn, "nothing rewritten");
    let key = xdpgate_common::flow::FlowKey {
        src: words4("203.0.113.7"),
        dst: words4("192.0.2.30"),
        sport: 40000,
        dport: 80,
        proto: 6,
        family: 4,
        kind: 0,
        _pad: 0,
    };
    let entry = k.flow(&key).expect("flow entry");
    assert_eq!(entry.nat, xdpgate_common::flow::NAT_NEXT_HOP);
    assert_eq!(entry.nat_addr, words4("198.51.100.31"), "next hop: the backend");
}

fn words4(a: &str) -> [u32; 4] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.parse::<std::net::Ipv4Addr>().unwrap().octets());
    xdpgate_common::words(&b)
}

/// The frontend lookups of new flows follow the policy applied: off without a load
/// balancer (a frontend left in the map is not looked at), on again as soon as a policy
/// has one, off again when it goes.
#[test]
fn frontend_lookups_switch_with_the_policy() {
    use aya::maps::HashMap;
    use xdpgate_common::{
        lb::{FrontendKey, Service},
        maps::FRONTENDS,
        nsg::FLAG_NO_FRONTENDS,
    };
    let without = POLICY.split("load_balancers:").next().unwrap();
    let k = Kernel::new();
    let skips = || {
        let (_, config) = xdpgate_dataplane::apply::active(&k.pins.dir).unwrap();
        config.flags & FLAG_NO_FRONTENDS != 0
    };
    let to_vip = |sport| frame("203.0.113.7", "192.0.2.10", L4::Tcp(sport, 80, SYN));
    k.arrive_as(Role::External);

    k.apply(without);
    assert!(skips(), "no load balancer: no frontend lookups");
    assert_eq!(endpoints(&k.through(&to_vip(40000))).1, ip("192.0.2.10"), "a plain flow");

    k.apply(POLICY);
    assert!(!skips(), "a load balancer applied after none turns the lookups on");
    let backend = endpoints(&k.through(&to_vip(40001))).1;
    assert!(backend.to_string().starts_with("198.51.100.1"), "balanced: {backend}");
    let frontends: HashMap<_, FrontendKey, Service> =
        k.pins.dir.open_map(FRONTENDS).unwrap().try_into().unwrap();
    let saved: Vec<(FrontendKey, Service)> = frontends.iter().map(|e| e.unwrap()).collect();
    assert!(!saved.is_empty());

    k.apply(without);
    assert!(skips(), "the load balancer removed: lookups off again");
    // Put the frontends back behind the agent's back: a new flow must not look at them.
    let mut frontends: HashMap<_, FrontendKey, Service> =
        k.pins.dir.open_map(FRONTENDS).unwrap().try_into().unwrap();
    for (key, svc) in &saved {
        frontends.insert(key, svc, 0).unwrap();
    }
    assert_eq!(endpoints(&k.through(&to_vip(40002))).1, ip("192.0.2.10"), "not balanced");
}

/// The live Maglev digests of every rule (`xdpgate lb --maglev --json`), by rule name.
fn maglev_digests(k: &Kernel) -> Vec<(String, serde_json::Value)> {
    let report: serde_json::Value =
        serde_json::from_str(&k.pins.xdpgate(&["lb", "--maglev", "--json"])).unwrap();
    let rules = report.as_array().unwrap().iter();
    rules.map(|s| (s["rule"].as_str().unwrap().to_owned(), s["maglev"].clone())).collect()
}

/// Issue 16's "every node chooses the same backend": gateways of a fleet share no state, so
/// a flow that moves between them keeps its backend only if their tables agree. Node A
/// applies the policy once; node B reaches it by another way (a fourth backend, a backend
/// down) and lists its pools in another order (a file generated on another machine): both
/// report the same live tables and send 600 random flows, of both families, to the same
/// backends. Node C, one backend down, differs: the comparison can tell.
#[test]
fn every_node_builds_the_same_tables_and_picks_the_same_backend() {
    let reorder = |pool4: &str| {
        POLICY.replace("[198.51.100.11, 198.51.100.12, 198.51.100.13]", pool4).replace(
            r#"["2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"]"#,
            r#"["2001:db8:1::13", "2001:db8:1::12", "2001:db8:1::11"]"#,
        )
    };
    let grown = reorder("[198.51.100.14, 198.51.100.13, 198.51.100.11, 198.51.100.12]");
    let reordered = reorder("[198.51.100.13, 198.51.100.11, 198.51.100.12]");
    let a = Kernel::new();
    a.apply(POLICY);
    let b = Kernel::new();
    b.apply(&grown);
    b.apply_with_health(&grown, |ip| ip.to_string() != "198.51.100.11");
    b.apply(&reordered);
    let c = Kernel::new();
    c.apply_with_health(POLICY, |ip| ip.to_string() != "198.51.100.12");

    let (tables_a, tables_b, tables_c) =
        (maglev_digests(&a), maglev_digests(&b), maglev_digests(&c));
    // Every rule with a Maglev table has one (the inbound NAT rule has a fixed backend).
    let with_table: Vec<&str> =
        tables_a.iter().filter(|(_, m)| !m.is_null()).map(|(r, _)| r.as_str()).collect();
    assert_eq!(with_table, ["http", "sticky", "closed", "dns6", "http6"], "{tables_a:?}");
    assert_eq!(tables_a, tables_b, "the same policy, the same tables, whatever the history");
    let http = |t: &[(String, serde_json::Value)]| t[0].1["digest"].clone();
    assert_ne!(http(&tables_a), http(&tables_c), "a backend down changes the probed rule's table");
    assert_eq!(tables_a[1], tables_c[1], "a rule without the probe keeps its table");

    let mut rng = common::rng::Rng(16);
    let (mut differ_c, mut seen) = (0, HashSet::new());
    for k in [&a, &b, &c] {
        k.arrive_as(Role::External);
    }
    for i in 0..600 {
        let (client, frontend, l4) = if i % 2 == 0 {
            let client = format!("203.0.113.{}", rng.range(1, 255));
            (client, "192.0.2.10", L4::Tcp(rng.range(1024, 65535) as u16, 80, SYN))
        } else {
            let client = format!("2001:db8:2::{:x}", rng.range(1, 0xffff));
            (client, "2001:db8:f::10", L4::Udp(rng.range(1024, 65535) as u16, 53))
        };
        let packet = frame(&client, frontend, l4);
        let picked: Vec<IpAddr> = [&a, &b, &c].map(|k| endpoints(&k.through(&packet)).1).into();
        assert_eq!(picked[0], picked[1], "flow {i} from {client}: nodes A and B disagree");
        differ_c += usize::from(picked[0] != picked[2]);
        seen.insert(picked[0]);
    }
    assert_eq!(seen.len(), 6, "the flows reach every backend of both pools: {seen:?}");
    assert!(differ_c > 0, "node C's missing backend takes its flows elsewhere");
}

/// `lb --maglev` never reports a table a writer is rewriting (F16: it read the 16,381 slots
/// without the lock, so a rebuild in between gave a torn digest, a false mismatch across a
/// fleet): while a writer holds the lock over a half-rewritten live table, it waits and then
/// gives up saying so; once the writer is done it reads the table whole.
#[test]
fn maglev_view_never_reads_a_table_being_rewritten() {
    use aya::maps::{Array, HashMap};
    use xdpgate_common::{
        lb::{FrontendKey, Service, maglev_index},
        maps::{FRONTENDS, MAGLEV},
    };
    let k = Kernel::new();
    k.apply(POLICY);
    let before = maglev_digests(&k);
    let frontends: HashMap<_, FrontendKey, Service> =
        k.pins.dir.open_map(FRONTENDS).unwrap().try_into().unwrap();
    let (_, svc) = frontends.iter().map(|e| e.unwrap()).find(|(_, s)| s.id == 0).unwrap();
    let mut maglev: Array<_, u32> = k.pins.dir.open_map(MAGLEV).unwrap().try_into().unwrap();
    let slot = |s: u32| maglev_index(svc.id, u32::from(svc.table), s);
    let saved: Vec<u32> = (0..64).map(|s| maglev.get(&slot(s), 0).unwrap()).collect();
    let other = *saved.iter().find(|&&b| b != saved[0]).expect("two backends in 64 slots");

    // A writer half-way through: the first slots rewritten, the lock held.
    let lock = xdpgate_dataplane::state::WriteLock::acquire(&k.pins.dir).unwrap();
    for s in 0..64 {
        maglev.set(slot(s), other, 0).unwrap();
    }
    let out = k.pins.try_xdpgate(&["lb", "--maglev", "--json"]);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "reported the table being rewritten: {stdout}");
    assert!(stderr.contains("is changing the dataplane"), "{stderr}");
    for (s, b) in saved.iter().enumerate() {
        maglev.set(slot(s as u32), *b, 0).unwrap();
    }
    drop(lock);
    assert_eq!(maglev_digests(&k), before, "read whole once the writer is done");
}

/// The key of a TCP segment from the client 203.0.113.7 to `dst`.
fn client_key(dst: &str, sport: u16, dport: u16) -> xdpgate_common::flow::FlowKey {
    xdpgate_common::flow::FlowKey {
        src: words4("203.0.113.7"),
        dst: words4(dst),
        sport,
        dport,
        proto: 6,
        family: 4,
        kind: 0,
        _pad: 0,
    }
}

/// A TCP segment from the client 203.0.113.7 to `dst`.
fn client_segment(dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frame("203.0.113.7", dst, L4::Tcp(sport, dport, flags))
}

/// Makes the embryonic flow of `key` (both its entries) `by` ns older than the clock, as if
/// idle that long.
fn age_embryo(k: &Kernel, key: &xdpgate_common::flow::FlowKey, by: u64) {
    use aya::maps::HashMap as BpfHashMap;
    use xdpgate_common::{flow::FlowKey, flow::FlowValue, maps::EMBRYOS};
    let mut map: BpfHashMap<_, FlowKey, FlowValue> =
        k.pins.dir.open_map(EMBRYOS).unwrap().try_into().unwrap();
    let forward = map.get(key, 0).expect("embryonic");
    for key in [*key, key.twin(&forward)] {
        let mut v = map.get(&key, 0).expect("both entries");
        v.last_seen_ns = xdpgate_dataplane::monotonic_ns() - by;
        map.insert(key, v, 0).unwrap();
    }
}

const S: u64 = 1_000_000_000;

/// A flow whose answers bypass the gateway (floating IP here, `ipip` alike) is never
/// confirmed, so it stays embryonic; it idles out after its protocol's (or rule's) timeout,
/// not the embryonic one, and the client's packets keep it: a connection idle past
/// `embryonic_timeout` keeps its backend. A DNAT flow's embryo still goes after the
/// embryonic timeout.
#[test]
fn direct_reply_flows_idle_out_after_their_idle_timeout() {
    use xdpgate_common::flow::FLOW_STAT_EMBRYOS_EXPIRED;
    let k = Kernel::new();
    k.apply(&format!(
        "{HA_AND_FLOATING}settings: {{embryonic_timeout: 4, tcp_idle_timeout: 240}}\n"
    ));
    k.arrive_as(Role::External);
    let (key, segment) = (client_key, client_segment);
    let age = |key: &xdpgate_common::flow::FlowKey, by: u64| age_embryo(&k, key, by);

    // Floating IP: 5 s idle is past the embryonic timeout, not the TCP one: the next
    // segment is the flow's (counted in its entry; nothing expired).
    let direct = key("192.0.2.30", 40000, 80);
    for flags in [SYN, ACK] {
        assert_eq!(k.run(&segment("192.0.2.30", 40000, 80, flags)), PASS);
    }
    let before = k.embryo(&direct).expect("a floating-IP flow stays embryonic");
    let expired = k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED);
    age(&direct, 5 * S);
    assert_eq!(k.run(&segment("192.0.2.30", 40000, 80, ACK)), PASS, "idle 5 s, still its flow");
    let after = k.embryo(&direct).expect("kept");
    assert_eq!(after.packets, before.packets + 1, "{before:?} then {after:?}");
    let idle = xdpgate_dataplane::monotonic_ns().saturating_sub(after.last_seen_ns);
    assert!(idle < 4 * S, "the client's segment refreshed it: idle {idle} ns");
    assert_eq!(k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED), expired, "nothing expired");
    // Past the TCP timeout it is over: the ACK starts no flow (no pickup for this rule).
    age(&direct, 241 * S);
    let no_flow = k.drops("no_flow");
    assert_eq!(k.run(&segment("192.0.2.30", 40000, 80, ACK)), DROP, "idle 241 s: gone");
    assert_eq!(
        (k.drops("no_flow"), k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED)),
        (no_flow + 1, expired + 1)
    );

    // A DNAT flow (HA ports) that saw no answer: 5 s idle is past its embryonic timeout.
    let dnat = key("192.0.2.20", 40001, 443);
    assert_eq!(k.run(&segment("192.0.2.20", 40001, 443, SYN)), PASS);
    age(&dnat, 5 * S);
    assert_eq!(k.run(&segment("192.0.2.20", 40001, 443, ACK)), DROP, "a DNAT embryo expires");
    assert_eq!(k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED), expired + 2);
}

/// A flow whose answers bypass the gateway is never confirmed, whatever comes on its reply
/// tuple: a client spoofing its backend's SYN-ACK and then acknowledging it, or answering a
/// flow picked up mid-stream, could otherwise move as many flows as it likes into the
/// established table, which evicts none (seen failing before: both were confirmed).
#[test]
fn spoofed_answers_do_not_confirm_a_direct_reply_flow() {
    let k = Kernel::new();
    k.apply(
        &HA_AND_FLOATING
            .replace("floating_ip: true}", "floating_ip: true, midstream_pickup: true}"),
    );
    let (c, vip) = ("203.0.113.7", "192.0.2.30");
    let flow = |port| client_key(vip, port, 80);
    // A SYN, the "backend's" SYN-ACK from the frontend address, the client's ACK of it.
    k.arrive_as(Role::External);
    assert_eq!(k.run(&tcp_frame(c, vip, (40100, 80), SYN, 1000, 0)), PASS);
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&tcp_frame(vip, c, (80, 40100), SYN | ACK, 5000, 1001)), PASS);
    k.arrive_as(Role::External);
    assert_eq!(k.run(&tcp_frame(c, vip, (40100, 80), ACK, 1001, 5001)), PASS);
    // Picked up mid-stream, then an "answer".
    assert_eq!(k.run(&tcp_frame(c, vip, (40101, 80), ACK, 1000, 1)), PASS);
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&tcp_frame(vip, c, (80, 40101), ACK, 1, 1000)), PASS);
    for port in [40100, 40101] {
        assert!(k.established(&flow(port)).is_none(), "{port}: confirmed");
        assert!(k.embryo(&flow(port)).is_some(), "{port}: still embryonic");
    }
}

/// A direct-reply flow's RST or FIN counts only in the client's sequence, and nothing on its
/// reply tuple counts: it lives in the embryonic table for good, where a spoofer's reset
/// would otherwise cut it (seen failing: the first spoofed reset forgot the flow).
#[test]
fn a_direct_reply_flow_believes_only_the_clients_resets_in_sequence() {
    use xdpgate_common::flow::TCP_FIN;
    let k = Kernel::new();
    k.apply(HA_AND_FLOATING);
    let (c, vip) = ("203.0.113.7", "192.0.2.30");
    let client = |flags, seq: u32| {
        k.arrive_as(Role::External);
        k.run(&tcp_frame(c, vip, (40200, 80), flags, seq, 1))
    };
    let flow = client_key(vip, 40200, 80);
    assert_eq!(client(SYN, 1000), PASS);
    assert_eq!(client(ACK, 1001), PASS);
    assert_eq!(client(RST, 1001 + (1 << 23)), PASS);
    assert_eq!(client(FIN | ACK, 1001u32.wrapping_sub(1 << 23)), PASS);
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&tcp_frame(vip, c, (80, 40200), RST | ACK, 5000, 1001)), PASS);
    let kept = k.embryo(&flow).expect("spoofed resets forgot the flow");
    assert_eq!(kept.tcp & TCP_FIN, 0, "a spoofed FIN half closed it");
    // The client's own, at its number: a FIN half closes it, a reset ends it.
    assert_eq!(client(FIN | ACK, 1001), PASS);
    assert_ne!(k.embryo(&flow).expect("half closed").tcp & TCP_FIN, 0);
    assert_eq!(client(RST, 1002), PASS);
    assert!(k.embryo(&flow).is_none(), "the client's reset ends it");
}

/// The server's FIN of a direct-reply flow never passes the gateway, so the client's FIN
/// is only a half close: the server may answer long after it. A half-closed flow keeps its
/// idle timeout (the client's request and FIN, a server silent for longer than a closed
/// connection's 10 s, then the client's ACK of the answer: still its flow and backend),
/// still idles out after it, and a SYN on its tuple is a new connection, decided afresh.
#[test]
fn a_half_closed_direct_reply_flow_keeps_its_flow() {
    use xdpgate_common::flow::{FLOW_STAT_EMBRYOS_CLOSED, FLOW_STAT_EMBRYOS_EXPIRED};
    let k = Kernel::new();
    k.apply(&format!("{HA_AND_FLOATING}settings: {{tcp_idle_timeout: 240}}\n"));
    k.arrive_as(Role::External);
    let (key, segment) = (client_key, client_segment);
    let age = |key: &xdpgate_common::flow::FlowKey, by: u64| age_embryo(&k, key, by);
    let half_close = |sport| {
        for flags in [SYN, ACK, ACK, FIN | ACK] {
            assert_eq!(k.run(&segment("192.0.2.30", sport, 80, flags)), PASS);
        }
        k.embryo(&key("192.0.2.30", sport, 80)).expect("embryonic")
    };

    // Silent for 11 s after the client's FIN: the client's ACK is still the flow's (this
    // rule picks nothing up mid-stream: a lost flow would drop it, `no_flow`).
    let flow = key("192.0.2.30", 40000, 80);
    let before = half_close(40000);
    let (expired, no_flow) = (k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED), k.drops("no_flow"));
    age(&flow, 11 * S);
    let verdict = k.run(&segment("192.0.2.30", 40000, 80, ACK));
    let after = k.embryo(&flow);
    assert_eq!(
        (verdict, k.drops("no_flow"), k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED)),
        (PASS, no_flow, expired),
        "the client's ACK 11 s after its FIN: {before:?} then {after:?}"
    );
    let after = after.expect("kept");
    assert_eq!(
        (after.packets, after.backend, after.nat_addr),
        (before.packets + 1, before.backend, before.nat_addr),
        "the same flow, to the same backend"
    );
    // It still idles out after the TCP timeout.
    age(&flow, 241 * S);
    assert_eq!(k.run(&segment("192.0.2.30", 40000, 80, ACK)), DROP, "idle 241 s: gone");
    assert_eq!(k.flow_stat(FLOW_STAT_EMBRYOS_EXPIRED), expired + 1);

    // The connection over (the server's FIN, unseen, and the client's last ACK), the client
    // reuses its port: the SYN is a new connection, decided afresh.
    let reused = key("192.0.2.30", 40001, 80);
    half_close(40001);
    assert_eq!(k.run(&segment("192.0.2.30", 40001, 80, ACK)), PASS);
    let ended = k.flow_stat(FLOW_STAT_EMBRYOS_CLOSED);
    assert_eq!(k.run(&segment("192.0.2.30", 40001, 80, SYN)), PASS);
    assert_eq!(k.embryo(&reused).expect("a new flow").packets, 1, "decided afresh");
    assert_eq!(k.flow_stat(FLOW_STAT_EMBRYOS_CLOSED), ended + 1);
}

/// A reload that drops a backend from the front of a pool, and a rule before the others,
/// keeps the ids of the rest: a flow to another backend is still named by its backend and
/// rule (the dropped rule's name stays, retired, for its flows), and that backend's counter
/// goes on from its own total (seen failing: the ids after the dropped ones shifted down,
/// and the flow was named by its neighbours and counted on the dropped backend's total).
/// The dropped backend and rule are in no table and not shown.
#[test]
fn a_reload_that_drops_a_backend_keeps_the_others_ids() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let dropped = ip("198.51.100.11");
    let (sport, backend) =
        (44000..).map(|p| (p, backend_of(&k, p, 80, SYN))).find(|(_, b)| *b != dropped).unwrap();
    for _ in 0..3 {
        k.through(&client_segment("192.0.2.10", sport, 80, ACK));
    }
    // The backends' counters, as the `closed` rule (same pool) shows them, and the rules.
    let counted = |k: &Kernel| {
        let report = running_report(&k.pins.dir).unwrap();
        let closed = report.iter().find(|s| s.rule == "closed").unwrap();
        let packets =
            |a: IpAddr| closed.backends.iter().find(|b| b.address == a).map(|b| b.packets);
        let rules: Vec<String> = report.iter().map(|s| s.rule.clone()).collect();
        (packets(backend).unwrap(), packets(dropped), rules)
    };
    let (before, _, _) = counted(&k);
    assert!(before >= 4, "the flow's packets counted on its backend: {before}");
    let http = "      - {name: http, frontend: v4, protocol: tcp, frontend_port: 80, \
                backend_port: 8080, backend_pool: web4, probe: up}\n";
    assert!(POLICY.contains(http));
    let reloaded = POLICY.replace(http, "").replace(
        "backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]",
        "backends: [198.51.100.12, 198.51.100.13]",
    );
    k.apply(&reloaded);
    let entry = k.flow(&client_key("192.0.2.10", sport, 80)).expect("the flow stays");
    let names = xdpgate_dataplane::flows::Names::read(&k.pins.dir).unwrap();
    assert_eq!(names.backend(entry.backend), Some(backend), "named by its own backend");
    let service = names.service(entry.service).unwrap();
    assert_eq!((service.lb.as_str(), service.rule.as_str()), ("lb", "http"));
    let (after, gone, rules) = counted(&k);
    assert_eq!(after, before, "its backend's counter goes on from its own total");
    assert_eq!(gone, None, "the dropped backend is in no pool");
    assert!(!rules.contains(&"http".to_string()), "a retired rule is not shown: {rules:?}");
    // New flows (of many clients: `sticky` hashes the client's address) go to the two
    // backends that stay.
    let seen: HashSet<IpAddr> = (1..60)
        .map(|i| {
            let client = format!("203.0.113.{i}");
            endpoints(&k.through(&frame(&client, "192.0.2.10", L4::Tcp(45000, 81, SYN)))).1
        })
        .collect();
    assert!(!seen.contains(&dropped) && seen.len() == 2, "{seen:?}");
    // Out for being dropped, not for its health: added back by a one-shot apply (which
    // keeps out what the dataplane has taken out), it takes flows again (seen failing: the
    // retired backend's flag kept it out for good).
    let unhealthy = xdpgate_dataplane::lb::pinned_unhealthy(&k.pins.dir).unwrap();
    assert!(!unhealthy.contains(&dropped), "{unhealthy:?}");
    k.apply_with_health(POLICY, |b| !unhealthy.contains(&b));
    let back: HashSet<IpAddr> = (46000..46060).map(|p| backend_of(&k, p, 80, SYN)).collect();
    assert!(back.contains(&dropped), "{back:?}");
}

/// Once every service id has been used, a new rule takes the lowest retired rule's id, and
/// its counters start from zero, not from that rule's total (seen failing without the
/// reset: the new rule showed the old one's packets).
#[test]
fn a_reused_service_id_starts_its_counters_from_zero() {
    let k = Kernel::new();
    k.arrive_as(Role::External);
    // One rule, renamed at each reload: each name a new service.
    let policy = |rule: &str| {
        format!(
            "virtual_network: {{address_space: [198.51.100.0/24]}}
load_balancers:
  - name: lb
    frontends: [{{name: v4, address: 192.0.2.10}}]
    backend_pools: [{{name: web4, backends: [198.51.100.11]}}]
    rules:
      - {{name: {rule}, frontend: v4, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: web4}}
"
        )
    };
    let packets = |rule: &str| {
        let report = running_report(&k.pins.dir).unwrap();
        report.iter().find(|s| s.rule == rule).unwrap().packets
    };
    k.apply(&policy("first"));
    backend_of(&k, 46000, 80, SYN);
    assert!(packets("first") >= 1);
    let max = xdpgate_common::lb::MAX_SERVICES as usize;
    for i in 0..max {
        k.apply(&policy(&format!("r{i}")));
    }
    let record = xdpgate_dataplane::apply::running(&k.pins.dir).unwrap().unwrap();
    assert_eq!(record.services.len(), max, "every id taken");
    let last = format!("r{}", max - 1);
    assert_eq!(record.services[0].rule, last, "the lowest retired id went to the newest rule");
    assert_eq!(packets(&last), 0);
}

/// The running agent's probes.json in a format this build cannot read (an agent of an older
/// build, before its restart): `xdpgate lb` and the metrics still report, with the
/// backends' flags standing in for the rule's probe (seen failing: the report failed).
#[test]
fn an_unreadable_probe_health_falls_back_to_the_flags() {
    let k = Kernel::new();
    k.apply_with_health(POLICY, |b| b != ip("198.51.100.11"));
    let _agent = xdpgate_dataplane::state::AgentLock::acquire(&k.pins.dir).unwrap();
    let old = format!(r#"{{"pid":{},"down":[["198.51.100.11","up"]]}}"#, std::process::id());
    let file = xdpgate_dataplane::state::dir(&k.pins.dir).join("probes.json");
    std::fs::write(file, old).unwrap();
    let report = running_report(&k.pins.dir).expect("a report");
    let http = report.iter().find(|s| s.rule == "http").unwrap();
    let in_rule: Vec<(String, bool)> =
        http.backends.iter().map(|b| (b.address.to_string(), b.healthy_in_rule)).collect();
    assert_eq!(
        in_rule,
        [
            ("198.51.100.11".into(), false),
            ("198.51.100.12".into(), true),
            ("198.51.100.13".into(), true)
        ]
    );
    // A drain would rebuild tables from the flags, taking .11 out of rules whose probe it
    // passes, where the agent would not put it back: refused, nothing changed.
    let drain = xdpgate_dataplane::drain::set(&k.pins.dir, "lb", ip("198.51.100.12"), true);
    let e = format!("{:#}", drain.expect_err("refused"));
    assert!(e.contains("another build"), "{e}");
    assert!(drains_in_force(&k.pins.dir).is_empty(), "nothing drained");
}

/// A UDP flow whose backend's health flag is down (it failed a probe of another rule) but
/// whose own rule still picks it (here an inbound NAT rule, which no probe judges) keeps
/// its flow: moving would pick the same backend. (Before: each of its packets tore the flow
/// down and made it again, a new embryo and a flow-log `begin` every time, never confirmed.)
#[test]
fn a_flow_its_rule_would_pick_again_stays_when_its_backends_flag_is_down() {
    use xdpgate_common::flow::FLOW_STAT_EMBRYOS_CREATED;
    let policy = POLICY.replace(
        "    inbound_nat_rules:\n",
        "    inbound_nat_rules:\n      - {name: dns-nat, frontend: v4, protocol: udp, \
         frontend_port: 5300, backend: 198.51.100.12, backend_port: 53}\n",
    );
    let k = Kernel::new();
    k.apply(&policy);
    let ask = || {
        k.arrive_as(Role::External);
        let out = k.through(&frame("203.0.113.7", "192.0.2.10", L4::Udp(40000, 5300)));
        assert_eq!(endpoints(&out), (ip("203.0.113.7"), ip("198.51.100.12"), 40000, 53));
    };
    ask();
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&frame("198.51.100.12", "203.0.113.7", L4::Udp(53, 40000))), PASS);
    ask();
    let key = flow_key("203.0.113.7", "192.0.2.10", 40000, 5300, 17);
    assert!(k.established(&key).is_some(), "confirmed by a second exchange");
    // 198.51.100.12 fails the `up` probe of the `http` rule.
    k.apply_with_health(&policy, |b| b != ip("198.51.100.12"));
    ask();
    let created = k.flow_stat(FLOW_STAT_EMBRYOS_CREATED);
    for _ in 0..3 {
        ask();
    }
    assert_eq!(k.flow_stat(FLOW_STAT_EMBRYOS_CREATED), created, "no flow made again");
    assert!(k.established(&key).is_some(), "the flow stays established");
}

/// A drain is of a backend of a load balancer: once an apply removes the backend from its
/// pools, the drain goes with it, and the same address added back later is a backend in
/// rotation. (Before: it stayed drained for good, getting no new flows, and `lb enable`
/// refused while it was absent.)
#[test]
fn a_drain_ends_with_its_backends_removal() {
    let k = Kernel::new();
    k.apply(POLICY);
    let drained = ip("198.51.100.11");
    xdpgate_dataplane::drain::set(&k.pins.dir, "lb", drained, true).unwrap();
    k.arrive_as(Role::External);
    assert!(!spread(&k, 47000, 60).contains(&drained), "drained");
    let without = POLICY.replace(
        "backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]",
        "backends: [198.51.100.12, 198.51.100.13]",
    );
    k.apply(&without);
    k.apply(POLICY);
    k.arrive_as(Role::External);
    assert!(spread(&k, 48000, 60).contains(&drained), "back in rotation");
    assert!(drains_in_force(&k.pins.dir).is_empty());
}

/// `xdpgate lb`'s report of the running policy.
fn running_report(
    pins: &xdpgate_dataplane::PinDir,
) -> anyhow::Result<Vec<xdpgate_dataplane::lb::ServiceReport>> {
    let record = xdpgate_dataplane::apply::running(pins)?.unwrap();
    let drained = drains_in_force(pins);
    xdpgate_dataplane::lb::report(pins, &record, |lb, b| drained.contains(lb, b), None)
}

/// The drains in force, from a file that parses.
fn drains_in_force(pins: &xdpgate_dataplane::PinDir) -> xdpgate_dataplane::drain::Drained {
    let (drained, broken) = xdpgate_dataplane::drain::read(pins).unwrap();
    assert!(broken.is_none(), "{broken:?}");
    drained
}

/// `xdpgate lb` counts a backend's live flows: an embryo idle past the embryonic timeout
/// (the next packet finds no flow; the sweep removes it) is not one (seen failing: counted
/// for as long as the entry stayed, while `flows` marked it expired).
#[test]
fn an_expired_embryo_is_no_live_flow_of_its_backend() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let out = k.through(&frame("203.0.113.7", "192.0.2.10", L4::Tcp(40200, 80, SYN)));
    let backend = endpoints(&out).1;
    let live = |k: &Kernel| {
        let report = running_report(&k.pins.dir).unwrap();
        let http = report.iter().find(|s| s.rule == "http").unwrap();
        http.backends.iter().find(|b| b.address == backend).unwrap().flows
    };
    assert_eq!(live(&k), 1, "the SYN's embryo");
    age_embryo(&k, &client_key("192.0.2.10", 40200, 80), 61 * S);
    assert_eq!(live(&k), 0, "idle past the embryonic timeout (60 s)");
}
