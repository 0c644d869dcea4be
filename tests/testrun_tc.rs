//! The tc ingress pipeline (the tc attach mode) in the kernel, through BPF_PROG_TEST_RUN of
//! its classifiers on socket buffers: it loads beside the XDP one, its verdicts are tc
//! verdicts counted under the XDP verdict they correspond to, and it rewrites packets as the
//! XDP pipeline does (NAT out and back, load balancing, ICMP errors, TTL), with checksums
//! verified from scratch: the helpers that keep a socket buffer's checksum state right must
//! also leave a plain packet's checksums right.

mod common;

use std::net::IpAddr;

use common::{
    kernel::{DROP, Kernel, PASS, link_tc_pipeline},
    packet::{
        self, ACK, ETH_LEN, L4, SYN, checksums_ok, endpoints, frame, frame_vlan, quoted_endpoints,
    },
};
use xdpgate_common::iface::Role;
use xdpgate_dataplane::{counts::Traffic, stats};

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;

/// The dataplane with the tc ingress programs loaded and linked into `TC_PIPELINE` (as the
/// loader does for `attach --hook tc`).
struct Tc {
    k: Kernel,
}

impl Tc {
    fn new() -> Self {
        let mut k = Kernel::new();
        link_tc_pipeline(k.ebpf_mut());
        Self { k }
    }

    /// Runs one packet through the tc entry; returns the tc verdict and the packet as left.
    fn run_out(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.k.run_tc_out(packet)
    }

    /// A packet that must pass (`TC_ACT_UNSPEC`), its checksums right after any rewrite.
    fn through(&self, pkt: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run_out(pkt);
        assert_eq!(verdict, TC_ACT_UNSPEC, "verdict");
        checksums_ok(&out).unwrap_or_else(|e| panic!("bad {e} after rewrite"));
        out
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const NSG: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 443}
"#;

/// Allowed passes as `TC_ACT_UNSPEC` (the next tcx program, then the stack), denied is
/// `TC_ACT_SHOT`; both counted per interface under pass and drop, bytes the packet's length,
/// as `stats` reads them for XDP.
#[test]
fn verdicts_are_tc_verdicts_counted_as_xdp_ones() {
    let t = Tc::new();
    t.k.apply(NSG);
    t.k.arrive_as(Role::External);
    let pins = &t.k.pins.dir;
    let counted =
        |v: &str| stats::read(pins).unwrap().iface("lo").expect("lo registered").verdict(v);
    let allowed = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 443, SYN));
    let denied = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 22, SYN));
    let (pass0, drop0) = (counted("pass"), counted("drop"));
    let (v, out) = t.run_out(&allowed);
    assert_eq!(v, TC_ACT_UNSPEC, "allowed");
    assert_eq!(out, allowed, "passed untouched");
    let (v, _) = t.run_out(&denied);
    assert_eq!(v, TC_ACT_SHOT, "denied");
    // The established flow's next packet, decided by the entry stage alone.
    let (v, _) = t.run_out(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 443, ACK)));
    assert_eq!(v, TC_ACT_UNSPEC, "established");
    let (pass1, drop1) = (counted("pass"), counted("drop"));
    let delta = |a: Traffic, b: Traffic| (b.packets - a.packets, b.bytes - a.bytes);
    assert_eq!(delta(pass0, pass1), (2, 2 * allowed.len() as u64), "pass counted");
    assert_eq!(delta(drop0, drop1), (1, denied.len() as u64), "drop counted");
}

const NAT: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100, "2001:db8:e::100"]
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
"#;

/// SNAT out and back on socket buffers: TCP, UDP and ICMP echo, IPv4 and IPv6, checksums
/// verified from scratch.
#[test]
fn snat_out_and_back_on_skbs() {
    let t = Tc::new();
    t.k.apply(NAT);
    for (private, remote, public) in [
        ("198.51.100.10", "203.0.113.7", "192.0.2.100"),
        ("2001:db8:1::10", "2001:db8:2::7", "2001:db8:e::100"),
    ] {
        for l4 in [L4::Tcp(40000, 443, SYN), L4::Udp(40000, 53)] {
            t.k.arrive_as(Role::Internal);
            let out = t.through(&frame(private, remote, l4));
            let (src, dst, sport, dport) = endpoints(&out);
            assert_eq!((src, dst), (ip(public), ip(remote)), "{l4:?}: source translated");
            assert!(sport >= 1024, "{l4:?}: public port {sport}");
            t.k.arrive_as(Role::External);
            let back = match l4 {
                L4::Tcp(..) => L4::Tcp(dport, sport, SYN | ACK),
                _ => L4::Udp(dport, sport),
            };
            let out = t.through(&frame(remote, public, back));
            assert_eq!(endpoints(&out), (ip(remote), ip(private), dport, 40000), "{l4:?} back");
        }
        t.k.arrive_as(Role::Internal);
        let out = t.through(&frame(private, remote, L4::Echo(777)));
        assert_eq!(endpoints(&out).0, ip(public), "echo source translated");
    }
}

/// A UDP/IPv4 datagram sent without a checksum (0) keeps none through the rewrite
/// (`BPF_F_MARK_MANGLED_0`), rather than getting a wrong one.
#[test]
fn udp_without_checksum_keeps_none() {
    let t = Tc::new();
    t.k.apply(NAT);
    t.k.arrive_as(Role::Internal);
    let mut pkt = frame("198.51.100.10", "203.0.113.7", L4::Udp(40000, 53));
    let check = ETH_LEN + 20 + 6;
    pkt[check..check + 2].copy_from_slice(&[0, 0]);
    let out = t.through(&pkt);
    assert_eq!(endpoints(&out).0, ip("192.0.2.100"));
    assert_eq!(&out[check..check + 2], &[0, 0], "still no checksum");
}

/// An ICMP "fragmentation needed" quoting a translated packet is translated back on a
/// socket buffer too: outer destination, quoted source and port, both checksums.
#[test]
fn icmp_error_translated_back_on_skbs() {
    let t = Tc::new();
    t.k.apply(NAT);
    t.k.arrive_as(Role::Internal);
    let out = t.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40000, 443, SYN)));
    // The IP header and 8 bytes, as routers quote.
    let pkt = frame_vlan(
        "203.0.113.1",
        "192.0.2.100",
        L4::TooBig(1500),
        &[],
        &out[ETH_LEN..ETH_LEN + 28],
    );
    t.k.arrive_as(Role::External);
    let out = t.through(&pkt);
    let inner = ETH_LEN + 20 + 8;
    assert_eq!(&out[ETH_LEN + 16..ETH_LEN + 20], &[198, 51, 100, 10], "outer destination");
    assert_eq!(&out[inner + 12..inner + 16], &[198, 51, 100, 10], "quoted source address");
    assert_eq!(u16::from_be_bytes([out[inner + 20], out[inner + 21]]), 40000, "quoted port");
}

/// ICMPv6 "packet too big" quoting a translated IPv6 packet, on a socket buffer: the outer
/// destination is in ICMPv6's pseudo-header, the quoted source and port in its payload.
#[test]
fn icmpv6_error_translated_back_on_skbs() {
    let t = Tc::new();
    t.k.apply(NAT);
    t.k.arrive_as(Role::Internal);
    let out = t.through(&frame("2001:db8:1::10", "2001:db8:2::7", L4::Tcp(40000, 443, SYN)));
    let public = &out[ETH_LEN + 8..ETH_LEN + 24];
    assert_eq!(public, "2001:db8:e::100".parse::<std::net::Ipv6Addr>().unwrap().octets());
    let quote = &out[ETH_LEN..ETH_LEN + 40 + 8];
    let pkt = frame_vlan("2001:db8:2::1", "2001:db8:e::100", L4::TooBig(1280), &[], quote);
    let l4 = ETH_LEN + 40;
    t.k.arrive_as(Role::External);
    let out = t.through(&pkt);
    let private = "2001:db8:1::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let inner = l4 + 8;
    assert_eq!(&out[ETH_LEN + 24..ETH_LEN + 40], &private, "outer destination");
    assert_eq!(&out[inner + 8..inner + 24], &private, "quoted source address");
    assert_eq!(u16::from_be_bytes([out[inner + 40], out[inner + 41]]), 40000, "quoted port");
}

/// A private host's port unreachable about a translated reply leaves translated on a
/// socket buffer too: from the public address, quoting the reply as the remote sent it.
#[test]
fn icmp_error_from_the_private_host_leaves_translated_on_skbs() {
    let t = Tc::new();
    t.k.apply(NAT);
    for (private, remote, public) in [
        ("198.51.100.10", "203.0.113.7", "192.0.2.100"),
        ("2001:db8:1::10", "2001:db8:2::7", "2001:db8:e::100"),
    ] {
        t.k.arrive_as(Role::Internal);
        let port = endpoints(&t.through(&frame(private, remote, L4::Udp(40000, 53)))).2;
        t.k.arrive_as(Role::External);
        let reply = t.through(&frame(remote, public, L4::Udp(53, port)));
        t.k.arrive_as(Role::Internal);
        let error = frame_vlan(private, remote, L4::PortUnreachable, &[], &reply[ETH_LEN..]);
        let out = t.through(&error);
        assert_eq!(endpoints(&out).0, ip(public), "{private}: outer source");
        assert_eq!(quoted_endpoints(&out), (ip(remote), ip(public), 53, port), "{private}: quote");
    }
}

const LB: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
load_balancers:
  - name: lb
    frontends:
      - {name: v4, address: 192.0.2.10}
      - {name: v6, address: "2001:db8:f::10"}
    backend_pools:
      - {name: web4, backends: [198.51.100.11, 198.51.100.12]}
      - {name: web6, backends: ["2001:db8:1::11", "2001:db8:1::12"]}
    rules:
      - {name: http, frontend: v4, protocol: tcp, frontend_port: 80, backend_port: 8080, backend_pool: web4}
      - {name: http6, frontend: v6, protocol: tcp, frontend_port: 80, backend_port: 8080, backend_pool: web6}
"#;

/// The load balancer on socket buffers makes the same choice and the same bytes as on
/// frames: a client's packets through the tc pipeline and through the XDP one (each with
/// its own tables) come out identical, and so do the backend's replies and its ICMP errors.
#[test]
fn load_balancing_same_bytes_as_xdp() {
    let t = Tc::new();
    let x = Kernel::new();
    for k in [&t.k, &x] {
        k.apply(LB);
        k.arrive_as(Role::External);
    }
    for (client, vip) in [("203.0.113.7", "192.0.2.10"), ("2001:db8:2::7", "2001:db8:f::10")] {
        for port in [40000u16, 40001, 40002, 40003] {
            let syn = frame(client, vip, L4::Tcp(port, 80, SYN));
            let tc_out = t.through(&syn);
            let (v, xdp_out) = x.run_out(&syn);
            assert_eq!(v, PASS);
            assert_eq!(tc_out, xdp_out, "{client}:{port}: DNAT as XDP does it");
            let (_, backend, _, bport) = endpoints(&tc_out);
            assert_eq!(bport, 8080);
            let reply = frame(&backend.to_string(), client, L4::Tcp(8080, port, SYN | ACK));
            t.k.arrive_as(Role::Internal);
            x.arrive_as(Role::Internal);
            let tc_back = t.through(&reply);
            assert_eq!(x.run_out(&reply), (PASS, tc_back.clone()), "reply as XDP does it");
            assert_eq!(endpoints(&tc_back), (ip(vip), ip(client), 80, port), "un-DNAT");
            // The backend's error about the client's packet leaves from the frontend.
            let error = frame_vlan(
                &backend.to_string(),
                client,
                L4::PortUnreachable,
                &[],
                &tc_out[ETH_LEN..],
            );
            let tc_error = t.through(&error);
            assert_eq!(x.run_out(&error), (PASS, tc_error.clone()), "error as XDP does it");
            assert_eq!(endpoints(&tc_error).0, ip(vip), "error from the frontend");
            assert_eq!(
                quoted_endpoints(&tc_error),
                endpoints(&syn),
                "quoted as the client sent it"
            );
            t.k.arrive_as(Role::External);
            x.arrive_as(Role::External);
        }
    }
}

/// A truncated packet (TCP header cut short) is dropped as malformed (the pull finds nothing more to pull; no
/// loop through the parse stage).
#[test]
fn truncated_packet_dropped_once() {
    let t = Tc::new();
    t.k.apply(NSG);
    let pkt = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 443, SYN));
    let drops = t.k.drops("malformed");
    let (v, _) = t.run_out(&pkt[..ETH_LEN + 20 + 10]);
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(t.k.drops("malformed"), drops + 1);
}

/// A source-routed IPv4 packet (LSRR, SSRR), or an IPv6 one (a routing header with segments
/// left), is dropped as `source_route` at XDP and at tc,
/// also when its destination field names an address no NSG covers (the gateway's own): a
/// kernel that accepts source routing would forward it on to the route's next address, a
/// protected host's denied port, which nothing judged (seen passing before, after an
/// outside review). A router alert, a timestamp and padding pass as before.
#[test]
fn source_routed_packets_are_dropped_at_both_hooks() {
    let t = Tc::new();
    t.k.apply(NSG);
    t.k.arrive_as(Role::External);
    let server = [198, 51, 100, 10];
    let lsrr = [&[0x83, 7, 4][..], &server, &[0]].concat();
    let ssrr = [&[1, 0x89, 7, 4][..], &server].concat();
    // To the gateway's own address on the denied port 22, routed on to the server.
    let routed = |opts: &[u8]| {
        let f = frame("203.0.113.7", "203.0.113.1", L4::Tcp(40000, 22, SYN));
        packet::with_ipv4_options(&f, ETH_LEN, opts)
    };
    for (name, opts) in [("LSRR", &lsrr), ("SSRR after a NOP", &ssrr)] {
        let drops = t.k.drops("source_route");
        assert_eq!(t.k.run(&routed(opts)), DROP, "{name} at XDP");
        assert_eq!(t.run_out(&routed(opts)).0, TC_ACT_SHOT, "{name} at tc");
        assert_eq!(t.k.drops("source_route"), drops + 2, "{name}: counted");
    }
    // IPv6's: a segment routing header with a segment left, to the server (seen passing
    // after a second review).
    let mut v6 = frame("2001:db8:3::7", "2001:db8:2::1", L4::Udp(40002, 5000));
    let ip = ETH_LEN;
    let next = v6[ip + 6];
    let server: std::net::Ipv6Addr = "2001:db8:1::10".parse().unwrap();
    let rh = [&[next, 2, 4, 1, 0, 0, 0, 0][..], &server.octets()].concat();
    v6.splice(ip + 40..ip + 40, rh.iter().copied());
    v6[ip + 6] = 43;
    let len = u16::from_be_bytes([v6[ip + 4], v6[ip + 5]]) + rh.len() as u16;
    v6[ip + 4..ip + 6].copy_from_slice(&len.to_be_bytes());
    let drops = t.k.drops("source_route");
    assert_eq!(t.k.run(&v6), DROP, "segment routing at XDP");
    assert_eq!(t.run_out(&v6).0, TC_ACT_SHOT, "segment routing at tc");
    assert_eq!(t.k.drops("source_route"), drops + 2, "segment routing: counted");
    // Options that route nothing: an allowed packet still passes at both hooks.
    let mut timestamp = vec![68, 12, 5, 0];
    timestamp.resize(12, 0);
    for opts in [vec![148, 4, 0, 0], timestamp, vec![1, 1, 1, 0]] {
        let f = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40001, 443, SYN));
        let f = packet::with_ipv4_options(&f, ETH_LEN, &opts);
        assert_eq!(t.k.run(&f), PASS, "{opts:?} at XDP");
        assert_eq!(t.run_out(&f).0, TC_ACT_UNSPEC, "{opts:?} at tc");
    }
}

/// Every map lookup of every stage, at XDP, tc ingress and tc egress, is inlined by the
/// verifier or calls the map's own lookup: none goes through the generic helper, which the
/// verifier keeps where one call instruction may see two maps (LLVM merges lookups of two
/// maps that differ only in the map). Seen: the interface lookup's array and hash merged,
/// an indirect call on every packet (about 20 ns of an established flow's 70 over the no-op).
#[test]
fn no_stage_looks_up_a_map_through_the_generic_helper() {
    let mut tc = Tc::new();
    xdpgate_dataplane::egress_dataplane(tc.k.ebpf_mut()).expect("egress programs");
    let mut checked = 0;
    for (name, prog) in tc.k.ebpf_mut().programs() {
        let Ok(info) = prog.info() else { continue };
        let id = info.id().to_string();
        let out = common::run("bpftool", &["-j", "prog", "dump", "xlated", "id", &id]);
        let insns: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        let generic: Vec<_> = insns
            .as_array()
            .expect("instructions")
            .iter()
            .filter_map(|i| i["disasm"].as_str())
            .filter(|d| d.contains("call bpf_map_lookup_elem"))
            .collect();
        assert!(generic.is_empty(), "{name}: {generic:?}");
        checked += 1;
    }
    // The five XDP stages, the five tc ones and the egress ones at least.
    assert!(checked >= 12, "only {checked} programs loaded");
}
