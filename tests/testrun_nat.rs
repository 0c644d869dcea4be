//! The NAT gateway in the kernel, through BPF_PROG_TEST_RUN: outbound flows take a public
//! address and port, replies are translated back, checksums verified from scratch both
//! ways for TCP, UDP and ICMP echo over IPv4 and IPv6, ICMP errors quoting a translated
//! packet are translated back, unmatched inbound packets and a full pool are counted drops,
//! and port claims from both CPUs never collide.

mod common;

use std::{collections::HashSet, net::IpAddr};

use common::{
    kernel::{DROP, Kernel, PASS},
    packet::{
        ACK, ETH_LEN, L4, RST, SYN, checksums_ok, endpoints, flow_key, fragment, frame, frame_vlan,
        insert_ipv6_ext, quoted_endpoints, set_ttl, tcp_frame,
    },
};
use xdpgate_common::iface::Role;
use xdpgate_dataplane::flows::FlowEntries;

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100, "2001:db8:e::100"]
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
"#;

/// A private host, a remote one and the gateway's public address, of each family.
const HOSTS: [(&str, &str, &str); 2] = [
    ("198.51.100.10", "203.0.113.7", "192.0.2.100"),
    ("2001:db8:1::10", "2001:db8:2::7", "2001:db8:e::100"),
];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn snat_out_and_back_tcp_udp_v4_v6() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote, public) in HOSTS {
        for l4 in [L4::Tcp(40000, 443, SYN), L4::Udp(40000, 53)] {
            k.arrive_as(Role::Internal);
            let out = k.through(&frame(private, remote, l4));
            let (src, dst, sport, dport) = endpoints(&out);
            assert_eq!(
                (src, dst),
                (ip(public), ip(remote)),
                "{l4:?}: the source becomes the public address"
            );
            assert!(sport >= 1024, "{l4:?}: public port {sport} from the range");
            let rport = if matches!(l4, L4::Tcp(..)) { 443 } else { 53 };
            assert_eq!(dport, rport);

            // The remote's reply is translated back to the private host.
            k.arrive_as(Role::External);
            let back = match l4 {
                L4::Tcp(..) => L4::Tcp(rport, sport, SYN | ACK),
                _ => L4::Udp(rport, sport),
            };
            let out = k.through(&frame(remote, public, back));
            assert_eq!(endpoints(&out), (ip(remote), ip(private), rport, 40000), "{l4:?}");
        }
    }
}

#[test]
fn snat_icmp_echo_by_identifier() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote, public) in HOSTS {
        k.arrive_as(Role::Internal);
        let out = k.through(&frame(private, remote, L4::Echo(777)));
        let id =
            u16::from_be_bytes([out[ETH_LEN + ip_len(&out) + 4], out[ETH_LEN + ip_len(&out) + 5]]);
        assert_eq!(endpoints(&out).0, ip(public));
        // The echo reply (type 0 / 129) to the public address and identifier.
        k.arrive_as(Role::External);
        let mut reply = frame(remote, public, L4::Echo(id));
        let l4 = ETH_LEN + ip_len(&reply);
        let old_type = reply[l4];
        reply[l4] = if old_type == 8 { 0 } else { 129 };
        // Keep the checksum right for the changed type (8 -> 0 or 128 -> 129).
        let c = u16::from_be_bytes([reply[l4 + 2], reply[l4 + 3]]);
        let c = fix16(c, u16::from(old_type) << 8, u16::from(reply[l4]) << 8);
        reply[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        checksums_ok(&reply).expect("reply built right");
        let out = k.through(&reply);
        let back_id = u16::from_be_bytes([out[l4 + 4], out[l4 + 5]]);
        assert_eq!(
            (endpoints(&out).1, back_id),
            (ip(private), 777),
            "back to the host and its identifier"
        );
        // The remote's own echo request with that identifier is no reply, though it has the
        // reply's key (seen failing: passed, translated to the host).
        let request = frame(remote, public, L4::Echo(id));
        assert_eq!(k.run(&request), DROP, "an echo request taken for a reply");
        assert_eq!(endpoints(&k.through(&reply)).1, ip(private), "the replies go on");
    }
}

/// An error quoting an echo reply "from" the public address, on the key of a host's pings
/// out, is about no flow: dropped, not translated to the host, while one quoting the
/// host's request is translated back (seen failing after an outside review: the host got
/// an error quoting a reply it never sent).
#[test]
fn an_error_quoting_an_echo_reply_the_host_never_sent_is_dropped() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote, public) in HOSTS {
        k.arrive_as(Role::Internal);
        let request = k.through(&frame(private, remote, L4::Echo(778)));
        let l4 = ETH_LEN + ip_len(&request);
        let mut reply = request.clone();
        reply[l4] = if request[l4] == 8 { 0 } else { 129 };
        k.arrive_as(Role::External);
        let error = |quoted: &[u8]| frame_vlan(remote, public, L4::PortUnreachable, &[], quoted);
        assert_eq!(k.run(&error(&reply[ETH_LEN..])), DROP, "{remote}: quoting a reply");
        let out = k.through(&error(&request[ETH_LEN..]));
        assert_eq!(endpoints(&out).1, ip(private), "{remote}: quoting the request");
    }
}

/// A translated flow lives in the flow table as long as its translation: a TCP connection
/// idle longer than the policy's TCP timeout, but not the gateway's, still works.
#[test]
fn translated_flows_idle_as_long_as_their_translation() {
    let k = Kernel::new();
    k.apply(&format!("settings: {{tcp_idle_timeout: 4}}\n{POLICY}"));
    k.arrive_as(Role::Internal);
    let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40100, 443, SYN)));
    let port = endpoints(&out).2;
    k.arrive_as(Role::External);
    k.through(&frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, port, SYN | ACK)));
    std::thread::sleep(std::time::Duration::from_millis(4500));
    k.arrive_as(Role::Internal);
    let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40100, 443, ACK)));
    assert_eq!(endpoints(&out).2, port, "still translated after 4.5 s idle");
    k.arrive_as(Role::External);
    let back = k.through(&frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, port, ACK)));
    assert_eq!(endpoints(&back), (ip("203.0.113.7"), ip("198.51.100.10"), 443, 40100));
}

/// A UDP datagram too big for one packet (a large DNS answer, say) is translated whole,
/// both ways: the first fragment's ports and checksum, every fragment's addresses.
#[test]
fn fragmented_datagrams_are_translated_whole() {
    let k = Kernel::new();
    k.apply(POLICY);
    let data: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    for (private, remote, public) in HOSTS {
        k.arrive_as(Role::Internal);
        let out = frame_vlan(private, remote, L4::Udp(40300, 53), &[], &data);
        let (src, dst, port, dport) = endpoints(&k.through_fragmented(&out, 0x1234));
        assert_eq!((src, dst, dport), (ip(public), ip(remote), 53), "outbound");

        k.arrive_as(Role::External);
        let back = frame_vlan(remote, public, L4::Udp(53, port), &[], &data);
        let whole = k.through_fragmented(&back, 0x5678);
        assert_eq!(endpoints(&whole), (ip(remote), ip(private), 53, 40300), "the reply");
    }
}

/// A later fragment from a NAT subnet to the outside whose first fragment was never seen
/// (dropped as `nat_exhausted`, or forged) cannot be translated and must not leave with its
/// private source, NSG or not (seen failing: no NSG applied, so it passed untranslated).
#[test]
fn an_unknown_later_fragment_does_not_leave_untranslated() {
    let k = Kernel::new();
    k.apply(POLICY);
    let data: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    for (private, remote) in [("198.51.100.10", "203.0.113.7"), ("2001:db8:1::10", "2001:db8:2::7")]
    {
        k.arrive_as(Role::Internal);
        let [_, later] =
            fragment(&frame_vlan(private, remote, L4::Udp(40400, 53), &[], &data), 304, 0x4321);
        let before = k.drops("fragment");
        assert_eq!(k.run(&later), DROP, "{private}: a later fragment without its first");
        assert_eq!(k.drops("fragment"), before + 1, "{private}");
    }
    // Inside the virtual network nothing is translated: with no NSG it passes as before.
    let [_, later] = fragment(
        &frame_vlan("198.51.100.10", "198.51.100.20", L4::Udp(40400, 53), &[], &data),
        304,
        0x4322,
    );
    assert_eq!(k.run(&later), PASS, "inside the virtual network");
}

/// Multicast, broadcast and IPv6 link-local destinations are never routed on: a NAT
/// gateway does not translate packets to them (mDNS, SSDP), nor claims a port for them
/// (seen failing: mDNS left with the public address). IPv4 link-local is: Linux forwards it
/// by its routes, so it must not leave with the private source.
#[test]
fn multicast_broadcast_and_link_local_are_not_translated() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    for (private, dst) in [
        ("198.51.100.10", "224.0.0.251"),
        ("198.51.100.10", "239.255.255.250"),
        ("198.51.100.10", "255.255.255.255"),
        ("2001:db8:1::10", "ff02::fb"),
        ("2001:db8:1::10", "fe80::1"),
    ] {
        let (verdict, out) = k.run_out(&frame(private, dst, L4::Udp(5353, 5353)));
        assert_ne!(verdict, DROP, "{dst}");
        assert_eq!(endpoints(&out).0, ip(private), "{dst}: the source is left as it is");
    }
    let out = k.through(&frame("198.51.100.10", "169.254.169.254", L4::Udp(5353, 80)));
    assert_eq!(endpoints(&out).0, ip("192.0.2.100"), "IPv4 link-local is translated");
}

fn ip_len(p: &[u8]) -> usize {
    if p[ETH_LEN] >> 4 == 4 { usize::from(p[ETH_LEN] & 0xf) * 4 } else { 40 }
}

fn fix16(check: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!check) + u32::from(!old) + u32::from(new);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// An ICMP "fragmentation needed" from a router on the way, quoting the translated packet,
/// reaches the private host with its addresses and ports translated back.
#[test]
fn icmp_error_quoting_a_translated_packet_is_translated_back() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40000, 443, SYN)));
    // The IP header and 8 bytes, as routers quote.
    let pkt = frame_vlan(
        "203.0.113.1",
        "192.0.2.100",
        L4::TooBig(1500),
        &[],
        &out[ETH_LEN..ETH_LEN + 28],
    );
    k.arrive_as(Role::External);
    let out = k.through(&pkt);
    let inner = ETH_LEN + 20 + 8;
    assert_eq!(&out[ETH_LEN + 16..ETH_LEN + 20], &[198, 51, 100, 10], "outer destination");
    assert_eq!(&out[inner + 12..inner + 16], &[198, 51, 100, 10], "quoted source address");
    assert_eq!(u16::from_be_bytes([out[inner + 20], out[inner + 21]]), 40000, "quoted source port");
}

/// A router's error quoting the whole translated datagram reaches the private host quoting
/// it as the host sent it, its UDP checksum included (checked from scratch by `through`;
/// seen failing: left as it was, for the public address and port), IPv4 and IPv6.
#[test]
fn an_error_quoting_a_whole_datagram_is_translated_back_whole() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote, public, router) in [
        ("198.51.100.10", "203.0.113.7", "192.0.2.100", "203.0.113.1"),
        ("2001:db8:1::10", "2001:db8:2::7", "2001:db8:e::100", "2001:db8:2::1"),
    ] {
        k.arrive_as(Role::Internal);
        let out = k.through(&frame(private, remote, L4::Udp(40000, 53)));
        k.arrive_as(Role::External);
        let error = frame_vlan(router, public, L4::PortUnreachable, &[], &out[ETH_LEN..]);
        let back = k.through(&error);
        assert_eq!(endpoints(&back).1, ip(private), "{private}: outer destination");
        assert_eq!(quoted_endpoints(&back), (ip(private), ip(remote), 40000, 53), "{private}");
    }
}

/// A Packet Too Big quoting a translated datagram's first fragment (a Fragment header
/// before its UDP header), or a packet with a Destination Options header, reaches the
/// private host with the quote translated back: path-MTU discovery for fragmented IPv6
/// datagrams through the NAT gateway. (Before: the quote's L4 header was looked for right
/// after its IPv6 header; dropped as `nat_unmatched`. Seen failing.) A quote of a later
/// fragment holds no ports: it is about no flow.
#[test]
fn an_ipv6_error_quoting_extension_headers_is_translated_back() {
    let k = Kernel::new();
    k.apply(POLICY);
    let (private, remote, public, router) =
        ("2001:db8:1::10", "2001:db8:2::7", "2001:db8:e::100", "2001:db8:2::1");
    k.arrive_as(Role::Internal);
    let out = k.through(&frame_vlan(private, remote, L4::Udp(40000, 53), &[], &[7u8; 64]));
    let [first, later] = fragment(&out, 32, 0x5eed);
    let dest_opts = insert_ipv6_ext(&out, &[(60, 0)]);
    k.arrive_as(Role::External);
    for (what, quote) in [("first fragment", &first), ("destination options", &dest_opts)] {
        let error = frame_vlan(router, public, L4::TooBig(1280), &[], &quote[ETH_LEN..]);
        let (verdict, back) = k.run_out(&error);
        assert_ne!(verdict, DROP, "{what}: {:?}", k.drops("nat_unmatched"));
        let inner = ETH_LEN + 40 + 8;
        let addr = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&back[at..at + 16]).unwrap());
        assert_eq!(addr(ETH_LEN + 24), ip(private), "{what}: outer destination");
        assert_eq!(addr(inner + 8), ip(private), "{what}: quoted source");
        let l4 = inner + 48;
        assert_eq!(u16::from_be_bytes([back[l4], back[l4 + 1]]), 40000, "{what}: quoted port");
    }
    let error = frame_vlan(router, public, L4::TooBig(1280), &[], &later[ETH_LEN..]);
    assert_eq!(k.run(&error), DROP, "a later fragment's quote");
}

/// A packet whose TTL runs out at the gateway (traceroute's first hop) makes no translation,
/// port claim or flow: it goes to the stack as sent, which answers it with "time exceeded".
/// The same packet with a TTL of 2 is translated. (Before: each probe held a port and an
/// embryo, and counted as translated. Seen failing.)
#[test]
fn a_packet_whose_ttl_runs_out_here_makes_no_translation() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote) in [("198.51.100.10", "203.0.113.7"), ("2001:db8:1::10", "2001:db8:2::7")]
    {
        k.arrive_as(Role::Internal);
        let mut probe = frame(private, remote, L4::Udp(40500, 33434));
        set_ttl(&mut probe, 1);
        assert_eq!(k.run_out(&probe), (PASS, probe.clone()), "{private}: to the stack as sent");
        let key = flow_key(private, remote, 40500, 33434, 17);
        assert!(k.flow(&key).is_none(), "{private}: no flow");
        assert_eq!(k.translations(), 0, "{private}: no translation");
        set_ttl(&mut probe, 2);
        assert_ne!(endpoints(&k.through(&probe)).0, ip(private), "{private}: TTL 2 is translated");
        assert!(k.translations() > 0, "{private}: its translation");
        k.clear_translations();
    }
}

/// A first fragment whose TTL runs out at the gateway goes to the stack as sent, and the
/// rest of its datagram does not leave untranslated: its later fragments (their TTL not out)
/// are dropped as any whose first fragment was not translated. (Before: the first
/// fragment's "no rewrite" was remembered, and its later fragments, any number of them,
/// were routed on with the private source. Found by an outside review; seen failing.)
#[test]
fn a_first_fragment_whose_ttl_runs_out_lets_no_later_one_leave_untranslated() {
    let k = Kernel::new();
    k.apply(POLICY);
    let data: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    for (private, remote) in [("198.51.100.10", "203.0.113.7"), ("2001:db8:1::10", "2001:db8:2::7")]
    {
        k.arrive_as(Role::Internal);
        let datagram = frame_vlan(private, remote, L4::Udp(40600, 53), &[], &data);
        let [mut first, later] = fragment(&datagram, 304, 0x4444);
        set_ttl(&mut first, 1);
        assert_eq!(k.run_out(&first), (PASS, first.clone()), "{private}: to the stack as sent");
        let before = k.drops("fragment");
        let (verdict, out) = k.run_out(&later);
        assert_eq!(
            verdict,
            DROP,
            "{private}: a later fragment passed, source {:?}",
            endpoints(&out).0
        );
        assert_eq!(k.drops("fragment"), before + 1, "{private}");
        assert_eq!(k.translations(), 0, "{private}: no translation");
    }
}

/// A private host's port unreachable about a reply it got through the gateway leaves from
/// the public address, quoting the reply as the remote host sent it (public address and
/// port): the remote's socket takes it for its own, and no private address leaves.
#[test]
fn icmp_error_from_the_private_host_leaves_translated() {
    let k = Kernel::new();
    k.apply(POLICY);
    for (private, remote, public) in HOSTS {
        k.arrive_as(Role::Internal);
        let port = endpoints(&k.through(&frame(private, remote, L4::Udp(40000, 53)))).2;
        k.arrive_as(Role::External);
        let reply = k.through(&frame(remote, public, L4::Udp(53, port)));
        assert_eq!(endpoints(&reply), (ip(remote), ip(private), 53, 40000));

        // The private host's socket is gone: it answers the reply with an error quoting it.
        k.arrive_as(Role::Internal);
        let out =
            k.through(&frame_vlan(private, remote, L4::PortUnreachable, &[], &reply[ETH_LEN..]));
        let (src, dst, ..) = endpoints(&out);
        assert_eq!((src, dst), (ip(public), ip(remote)), "{private}: outer addresses");
        assert_eq!(
            quoted_endpoints(&out),
            (ip(remote), ip(public), 53, port),
            "{private}: the quote is the reply as the remote sent it"
        );
    }
}

#[test]
fn unmatched_inbound_and_inside_traffic() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let before = k.drops("nat_unmatched");
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, 5555, SYN))), DROP);
    assert_eq!(k.drops("nat_unmatched"), before + 1);
    // Within the virtual network nothing is translated.
    k.arrive_as(Role::Internal);
    let pkt = frame("198.51.100.10", "198.51.100.20", L4::Tcp(40000, 22, SYN));
    let (verdict, out) = k.run_out(&pkt);
    assert_eq!((verdict, out), (PASS, pkt));
}

/// Protocols a NAT gateway cannot translate (ESP, GRE, ICMP other than echo and errors)
/// are dropped as `nat_untranslatable`, not as a failed allocation: no pool ran out (seen
/// failing: counted as `nat_exhausted` and among the gateway's failed allocations, which
/// tell an operator the pool is too small). An ICMP message other than echo is so even
/// beside the host's ping of identifier 0 (seen failing on ea91ac1, before the flow key's
/// ICMP kind: it passed on that ping's flow).
#[test]
fn an_untranslatable_protocol_is_no_failed_allocation() {
    use aya::maps::{MapData, PerCpuArray};
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    let failures = || -> u64 {
        let map: PerCpuArray<MapData, u64> =
            k.pins.dir.open_map(xdpgate_common::maps::NAT_FAILURES).unwrap().try_into().unwrap();
        map.get(&0, 0).unwrap().iter().sum()
    };
    let timestamp = [13u8, 0, 0xf2, 0xfd, 0, 1, 0, 1];
    let packets = [
        frame_vlan("198.51.100.10", "203.0.113.7", L4::Raw(50), &[], &[0u8; 16]),
        frame_vlan("198.51.100.10", "203.0.113.7", L4::Raw(47), &[], &[0u8; 8]),
        frame_vlan("198.51.100.10", "203.0.113.7", L4::Raw(1), &[], &timestamp),
        frame_vlan("2001:db8:1::10", "2001:db8:2::7", L4::Raw(50), &[], &[0u8; 16]),
    ];
    for (i, pkt) in packets.iter().enumerate() {
        assert_eq!(k.run(pkt), DROP, "packet {i}");
        assert_eq!(k.drops("nat_untranslatable"), i as u64 + 1, "packet {i}");
    }
    // Nor does it ride the translation of a ping of identifier 0 to the same peer (ports 0
    // both: the flow key's ICMP kind tells them apart, in the flow and NAT tables alike).
    k.through(&frame("198.51.100.10", "203.0.113.7", L4::Echo(0)));
    assert_eq!(k.run(&packets[2]), DROP, "a timestamp request beside a ping of id 0");
    assert_eq!(k.drops("nat_untranslatable"), packets.len() as u64 + 1);
    assert_eq!((k.drops("nat_exhausted"), failures()), (0, 0));
}

#[test]
fn a_small_pool_runs_out_and_ports_serve_many_destinations() {
    let k = Kernel::new();
    k.apply(&POLICY.replace("    subnets:", "    ports: \"2000-2003\"\n    subnets:"));
    k.arrive_as(Role::Internal);
    let mut ports = HashSet::new();
    for i in 0..4 {
        let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40000 + i, 443, SYN)));
        ports.insert(endpoints(&out).2);
    }
    assert_eq!(ports, HashSet::from([2000, 2001, 2002, 2003]), "four flows, four ports");
    let before = k.drops("nat_exhausted");
    assert_eq!(
        k.run(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(40004, 443, SYN))),
        DROP,
        "pool full"
    );
    assert_eq!(k.drops("nat_exhausted"), before + 1);
    // The same ports serve another destination.
    let out = k.through(&frame("198.51.100.10", "203.0.113.8", L4::Tcp(40004, 443, SYN)));
    assert!((2000..=2003).contains(&endpoints(&out).2));
    // `xdpgate nat` counts the ports in use, not the translations: four of four, with five
    // translations (seen failing: 5 ports in use of a range of 4).
    let record = xdpgate_dataplane::apply::running(&k.pins.dir).unwrap().unwrap();
    let report = xdpgate_dataplane::nat::report(&k.pins.dir, &record).unwrap();
    let ports_in_use = report[0].addresses[0].1;
    assert_eq!((ports_in_use, report[0].translations, report[0].ports_per_address), (4, 5, 4));
    // Existing translations are untouched by the failure.
    k.arrive_as(Role::External);
    let port = *ports.iter().next().unwrap();
    let out = k.through(&frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, port, SYN | ACK)));
    assert_eq!(endpoints(&out).1, ip("198.51.100.10"));
}

/// A gateway with several public addresses spreads its private hosts evenly over those of
/// their family, each host on one address for all its flows (seen failing: the search for
/// an address started at a hash of 16 values and wrapped to the first address from every
/// start past the last, so three IPv4 addresses took 14, 1 and 1 sixteenths of the hosts).
#[test]
fn hosts_spread_evenly_over_the_public_addresses_of_their_family() {
    let k = Kernel::new();
    let publics = ["192.0.2.100", "2001:db8:e::100", "192.0.2.101", "192.0.2.102"];
    k.apply(&POLICY.replace(
        r#"[192.0.2.100, "2001:db8:e::100"]"#,
        r#"[192.0.2.100, "2001:db8:e::100", 192.0.2.101, 192.0.2.102]"#,
    ));
    k.arrive_as(Role::Internal);
    let hosts = 240;
    let mut taken: std::collections::BTreeMap<IpAddr, u32> =
        publics.iter().map(|p| (ip(p), 0)).collect();
    for h in 1..=hosts {
        let private = format!("198.51.100.{h}");
        let mut of_host = HashSet::new();
        for port in [40000, 40001] {
            let out = k.through(&frame(&private, "203.0.113.7", L4::Udp(port, 53)));
            of_host.insert(endpoints(&out).0);
        }
        assert_eq!(of_host.len(), 1, "{private} left from {of_host:?}: one address per host");
        *taken.get_mut(of_host.iter().next().unwrap()).unwrap() += 1;
    }
    eprintln!("hosts per public address: {taken:?}");
    assert_eq!(taken[&ip("2001:db8:e::100")], 0, "IPv4 hosts take IPv4 addresses: {taken:?}");
    // 80 each if even; a binomial spread of 240 over three stays well inside 50..=110.
    for p in ["192.0.2.100", "192.0.2.101", "192.0.2.102"] {
        assert!((50..=110).contains(&taken[&ip(p)]), "hosts per public address: {taken:?}");
    }
}

/// Two threads pinned to different CPUs create flows to one destination at once; every
/// flow must get its own public port.
#[test]
fn port_claims_from_both_cpus_never_collide() {
    let k = std::sync::Arc::new(Kernel::new());
    k.apply(&POLICY.replace("    subnets:", "    ports: \"10000-19999\"\n    subnets:"));
    k.arrive_as(Role::Internal);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let k = k.clone();
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(t % cpus, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                (0..400u16)
                    .map(|i| {
                        let sport = 20000 + t as u16 * 1000 + i;
                        let (v, out) =
                            k.run_out(&frame("198.51.100.10", "203.0.113.7", L4::Udp(sport, 53)));
                        assert_eq!(v, PASS);
                        endpoints(&out).2
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let ports: Vec<u16> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let unique: HashSet<u16> = ports.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ports.len(),
        "{} flows, {} distinct public ports",
        ports.len(),
        unique.len()
    );
}

/// A lone exchange's translation goes after the embryonic timeout (60 s), not the
/// gateway's UDP one (240 s): held longer, a resolver's queries would crowd the embryonic
/// table (seen failing: still there after 61 s), with its flow and its `end`; so does one
/// whose embryo newer ones pushed out. A confirmed flow keeps the gateway's.
#[test]
fn a_lone_exchange_goes_after_the_embryonic_timeout() {
    let k = Kernel::new();
    k.apply(POLICY);
    let policy = xdpgate_policy::load_str(POLICY, "t.yaml").unwrap();
    let exchange = |sport: u16, again: bool| {
        let request = frame("198.51.100.10", "203.0.113.7", L4::Udp(sport, 53));
        k.arrive_as(Role::Internal);
        let (public, _, port, _) = endpoints(&k.through(&request));
        k.arrive_as(Role::External);
        assert_eq!(k.run(&frame("203.0.113.7", &public.to_string(), L4::Udp(53, port))), PASS);
        if again {
            k.arrive_as(Role::Internal);
            assert_eq!(k.run(&request), PASS);
        }
    };
    exchange(40000, false);
    exchange(40001, true);
    exchange(40002, false);
    let (lone, confirmed, pushed_out) = (
        flow_key("198.51.100.10", "203.0.113.7", 40000, 53, 17),
        flow_key("198.51.100.10", "203.0.113.7", 40001, 53, 17),
        flow_key("198.51.100.10", "203.0.113.7", 40002, 53, 17),
    );
    assert!(k.embryo(&lone).is_some() && k.established(&confirmed).is_some());
    // Both entries of the third pushed out by newer embryos (the LRU table's way under a
    // flood): it goes after the embryonic timeout all the same (seen failing: the gateway's
    // 240 s, its port held four times as long).
    use xdpgate_common::{
        flow::{FlowKey, FlowValue},
        maps::EMBRYOS,
    };
    let mut embryos: aya::maps::HashMap<_, FlowKey, FlowValue> =
        k.pins.dir.open_map(EMBRYOS).unwrap().try_into().unwrap();
    let entry = embryos.get(&pushed_out, 0).unwrap();
    embryos.remove(&pushed_out.twin(&entry)).unwrap();
    embryos.remove(&pushed_out).unwrap();
    let now = xdpgate_dataplane::nat::monotonic_ns();
    let mut ended = Vec::new();
    let e = xdpgate_dataplane::nat::expire(&k.pins.dir, &policy, now + 61_000_000_000, &mut ended)
        .unwrap();
    assert_eq!(e.expired, 2, "the lone exchange, and the one pushed out");
    // Its end handed on, as a confirmed flow's (seen failing: none, as the flow was not in
    // the established table).
    let flow = |e: &FlowEntries| (e.key, e.forward.map(|v| v.packets), e.reply.map(|v| v.packets));
    assert_eq!(ended.iter().map(flow).collect::<Vec<_>>(), [(lone, Some(1), Some(1))]);
    assert!(k.flow(&lone).is_none() && k.established(&confirmed).is_some());
    // Counted as expired, not as pushed out by newer embryos (seen failing: evicted 1); the
    // one pushed out as pushed out.
    let e = xdpgate_dataplane::stats::read(&k.pins.dir).unwrap().flow_table.embryonic;
    assert_eq!((e.created, e.confirmed, e.expired, e.evicted, e.live), (3, 1, 1, 1, 0), "{e:?}");
}

const S: u64 = 1_000_000_000;

/// The translations `nat::expire` ends at `now`, their flows' ends added to `ended`.
fn expire_after(
    k: &Kernel,
    policy: &xdpgate_policy::Policy,
    now: u64,
    ended: &mut Vec<FlowEntries>,
) -> usize {
    xdpgate_dataplane::nat::expire(&k.pins.dir, policy, now, ended).unwrap().expired
}

/// A flow the full established table had no room for (its embryo `ASSURED`, as the
/// dataplane marks it) keeps its translation for the gateway's UDP timeout, not the
/// embryonic one, and its `end` is handed on when it goes (seen failing after an outside
/// review: expired as a lone exchange at 61 s, a new public port for the stream; and with
/// that fixed, no `end`).
#[test]
fn an_assured_flow_keeps_its_translation_as_established() {
    use xdpgate_common::{
        flow::{ASSURED, FlowKey, FlowValue},
        maps::EMBRYOS,
    };
    let k = Kernel::new();
    k.apply(POLICY);
    let policy = xdpgate_policy::load_str(POLICY, "t.yaml").unwrap();
    let request = frame("198.51.100.10", "203.0.113.7", L4::Udp(40100, 53));
    k.arrive_as(Role::Internal);
    let (public, _, port, _) = endpoints(&k.through(&request));
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame("203.0.113.7", &public.to_string(), L4::Udp(53, port))), PASS);
    let key = flow_key("198.51.100.10", "203.0.113.7", 40100, 53, 17);
    let mut embryos: aya::maps::HashMap<_, FlowKey, FlowValue> =
        k.pins.dir.open_map(EMBRYOS).unwrap().try_into().unwrap();
    let forward = embryos.get(&key, 0).unwrap();
    for k_ in [key, key.twin(&forward)] {
        let mut v = embryos.get(&k_, 0).unwrap();
        v.tcp |= ASSURED;
        embryos.insert(k_, v, 0).unwrap();
    }
    let now = xdpgate_dataplane::nat::monotonic_ns();
    let mut ended = Vec::new();
    let mut expire = |after_s: u64| expire_after(&k, &policy, now + after_s * S, &mut ended);
    assert_eq!(expire(61), 0, "kept past the embryonic timeout");
    assert_eq!(expire(241), 1, "gone after the gateway's UDP timeout");
    assert_eq!(ended.iter().map(|e| e.key).collect::<Vec<_>>(), [key], "its end handed on");
    assert!(k.embryo(&key).is_none());
}

/// A half-open TCP translation (a SYN never answered, or a handshake the remote reset) goes
/// after the embryonic timeout (60 s), as Azure's half-open timer frees such a port early;
/// held for the gateway's TCP idle timeout (240 s), a scan from one host filled the shared
/// table (seen failing: none expired after 61 s). One answered and not acknowledged yet
/// keeps the 240 s (a live connection can stay so when half its embryo is pushed out), as
/// does an established connection.
#[test]
fn a_half_open_tcp_translation_goes_after_the_embryonic_timeout() {
    let k = Kernel::new();
    k.apply(POLICY);
    let policy = xdpgate_policy::load_str(POLICY, "t.yaml").unwrap();
    // The remote's answers to the SYN from `sport`, then the host's.
    let handshake = |sport: u16, answers: &[u8], then: &[u8]| {
        k.arrive_as(Role::Internal);
        let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Tcp(sport, 443, SYN)));
        let (public, _, port, _) = endpoints(&out);
        k.arrive_as(Role::External);
        for &flags in answers {
            // Acknowledging the SYN (`L4::Tcp`'s is at 1000).
            let answer =
                tcp_frame("203.0.113.7", &public.to_string(), (443, port), flags, 1000, 1001);
            assert_eq!(k.run(&answer), PASS);
        }
        k.arrive_as(Role::Internal);
        for &flags in then {
            // The answers' sequence number is 1000: acknowledged as 1001.
            let next = tcp_frame("198.51.100.10", "203.0.113.7", (sport, 443), flags, 1001, 1001);
            assert_eq!(k.run(&next), PASS);
        }
    };
    handshake(40200, &[], &[]);
    handshake(40201, &[SYN | ACK], &[]);
    handshake(40202, &[RST | ACK], &[]);
    handshake(40203, &[SYN | ACK], &[ACK]);
    let key = |sport| flow_key("198.51.100.10", "203.0.113.7", sport, 443, 6);
    assert!(k.established(&key(40203)).is_some(), "the full handshake confirmed its flow");
    let now = xdpgate_dataplane::nat::monotonic_ns();
    let mut ended = Vec::new();
    let mut expire = |after_s: u64| expire_after(&k, &policy, now + after_s * S, &mut ended);
    assert_eq!(expire(59), 0, "within the embryonic timeout");
    assert_eq!(expire(61), 2, "the unanswered and the reset translations");
    for sport in [40200, 40202] {
        assert!(k.flow(&key(sport)).is_none(), "{sport}: its entries went with it");
    }
    assert!(k.embryo(&key(40201)).is_some() && k.established(&key(40203)).is_some());
    // The one ended here with its embryo counts as expired, not as pushed out by newer
    // embryos; the reset one as closed by the dataplane (seen failing: evicted 1).
    let counts = || {
        let e = xdpgate_dataplane::stats::read(&k.pins.dir).unwrap().flow_table.embryonic;
        (e.created, e.confirmed, e.expired, e.closed, e.evicted, e.live)
    };
    assert_eq!(counts(), (4, 1, 1, 1, 0, 1));
    assert_eq!(expire(239), 0, "the others idle for the gateway's 240 s");
    assert_eq!(expire(241), 2);
    assert_eq!(counts(), (4, 1, 2, 1, 0, 0));
}

/// The agent's expiry: an idle translation releases its port only after the cooldown, so
/// the port is not reused for the same destination at once; then it is free again.
#[test]
fn idle_translations_cool_down_before_their_port_is_reused() {
    let k = Kernel::new();
    let src = POLICY.replace("    subnets:", "    ports: \"3000-3000\"\n    udp_idle_timeout: 4\n    port_reuse_cooldown: 10\n    subnets:");
    k.apply(&src);
    let policy = xdpgate_policy::load_str(&src, "t.yaml").unwrap();
    k.arrive_as(Role::Internal);
    let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Udp(40000, 53)));
    assert_eq!(endpoints(&out).2, 3000);
    assert_eq!(
        k.run(&frame("198.51.100.10", "203.0.113.7", L4::Udp(40001, 53))),
        DROP,
        "one port, taken"
    );
    // The answer and a second datagram confirm the flow: established, its end goes to the
    // flow log.
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.100", L4::Udp(53, 3000))), PASS);
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&frame("198.51.100.10", "203.0.113.7", L4::Udp(40000, 53))), PASS);

    let now = xdpgate_dataplane::nat::monotonic_ns();
    let s = |secs: u64| secs * 1_000_000_000;
    let mut ended = Vec::new();
    let expire = |at: u64, ended: &mut Vec<FlowEntries>| {
        xdpgate_dataplane::nat::expire(&k.pins.dir, &policy, at, ended).unwrap()
    };
    assert_eq!(
        expire(now + s(2), &mut ended),
        xdpgate_dataplane::nat::Expired::default(),
        "not idle long enough"
    );
    let e = expire(now + s(5), &mut ended);
    assert_eq!((e.expired, e.released), (1, 0), "idle: expired, the port cooling down");
    let flow = |e: &FlowEntries| (e.key, e.forward.map(|v| v.packets), e.reply.map(|v| v.packets));
    let first = flow_key("198.51.100.10", "203.0.113.7", 40000, 53, 17);
    assert_eq!(ended.iter().map(flow).collect::<Vec<_>>(), [(first, Some(2), Some(1))]);
    assert_eq!(
        k.run(&frame("198.51.100.10", "203.0.113.7", L4::Udp(40001, 53))),
        DROP,
        "still cooling down"
    );
    // The reply to the old translation no longer gets through.
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame("203.0.113.7", "192.0.2.100", L4::Udp(53, 3000))), DROP);
    let e = expire(now + s(5 + 11), &mut ended);
    assert_eq!((e.expired, e.released), (0, 1), "cooldown over: released");
    assert_eq!(ended.len(), 1, "a released port ends no flow");
    k.arrive_as(Role::Internal);
    let out = k.through(&frame("198.51.100.10", "203.0.113.7", L4::Udp(40001, 53)));
    assert_eq!(endpoints(&out).2, 3000, "the port serves a new flow");
}

/// The NAT lookups of new flows follow the policy applied: off without a NAT gateway (a
/// public address left in the map is not looked at), on as soon as a policy has one, kept
/// on after it goes while its translations are left, off once none is.
#[test]
fn nat_lookups_switch_with_the_policy() {
    use aya::maps::HashMap;
    use xdpgate_common::{
        flow::FlowKey,
        maps::{NAT_MAP, NAT_PUBLIC},
        nat::{AddrKey, NatEntry},
        nsg::FLAG_NO_NAT,
    };
    let without = POLICY.split("nat_gateways:").next().unwrap();
    let k = Kernel::new();
    let skips = || {
        let (_, config) = xdpgate_dataplane::apply::active(&k.pins.dir).unwrap();
        config.flags & FLAG_NO_NAT != 0
    };
    let out = |sport| frame("198.51.100.10", "203.0.113.7", L4::Tcp(sport, 443, SYN));
    let to_public = |sport| frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, sport, SYN));

    k.apply(without);
    assert!(skips(), "no NAT gateway: no NAT lookups");
    k.arrive_as(Role::Internal);
    assert_eq!(endpoints(&k.through(&out(40000))).0, ip("198.51.100.10"), "not translated");

    k.apply(POLICY);
    assert!(!skips(), "a NAT gateway applied after none turns the lookups on");
    assert_eq!(endpoints(&k.through(&out(40001))).0, ip("192.0.2.100"), "translated");
    let public: HashMap<_, AddrKey, u32> =
        k.pins.dir.open_map(NAT_PUBLIC).unwrap().try_into().unwrap();
    let saved: Vec<(AddrKey, u32)> = public.iter().map(|e| e.unwrap()).collect();
    k.arrive_as(Role::External);
    assert_eq!(k.run(&to_public(50000)), DROP, "no translation for this tuple");

    k.apply(without);
    assert!(!skips(), "the gateway removed, its translation left: lookups still on");

    let mut translations: HashMap<_, FlowKey, NatEntry> =
        k.pins.dir.open_map(NAT_MAP).unwrap().try_into().unwrap();
    let keys: Vec<FlowKey> = translations.keys().map(|k| k.unwrap()).collect();
    assert!(!keys.is_empty());
    for key in keys {
        translations.remove(&key).unwrap();
    }
    k.apply(without);
    assert!(skips(), "no gateway, no translation: lookups off");
    // Put the public addresses back behind the agent's back: a new flow must not look at
    // them (it would be dropped as addressed to a public address without a translation).
    let mut public: HashMap<_, AddrKey, u32> =
        k.pins.dir.open_map(NAT_PUBLIC).unwrap().try_into().unwrap();
    for (key, gw) in &saved {
        public.insert(key, gw, 0).unwrap();
    }
    assert_eq!(k.run(&to_public(50001)), PASS, "judged as a plain flow");
}
