//! The route's MTU holds for what the tc pipeline forwards itself (a NAT flow's packets), as
//! it does at XDP: a packet longer than the route allows, with DF set, is left to the stack
//! (which drops it and sends "fragmentation needed"), not redirected past the limit.
//!
//!   server 198.51.100.10 -- int [gw] ext -- client 203.0.113.10
//!   on the gateway: 203.0.113.0/24 via ext with `mtu lock 1280`; NAT 198.51.100.0/24 → 192.0.2.100
//!
//! The gateway's own ICMP errors about a translated packet reach its sender quoting what it
//! sent, for a NAT gateway's private host and a load balancer's client alike.

mod common;

use std::{net::UdpSocket, thread, time::Duration};

use common::gateway::{CLIENT4, Gateway, SERVER4, UDP_LB_AND_NAT_POLICY};

const NAT_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

/// Echo replies to `count` DF pings of `size` bytes of payload from the server to the client.
fn replies(net: &Gateway, size: u16, count: u32) -> u32 {
    let out = net.server.try_exec(
        "ping",
        &[
            "-n",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            CLIENT4,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(", ")
        .find_map(|part| part.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("ping output: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn tc_forwarding_keeps_to_the_route_mtu() {
    let net = Gateway::tc();
    net.apply("nat.yaml", NAT_POLICY);
    net.gw.exec(
        "ip",
        &["route", "replace", "203.0.113.0/24", "dev", &net.ext, "mtu", "lock", "1280"],
    );

    // Within the route's MTU (1,228 bytes of IP): through, and by the tc program's redirect
    // (but the first, which goes through the stack while the gateway resolves the client's
    // address).
    assert_eq!(replies(&net, 1200, 3), 3, "pings that fit the route");
    let stats: serde_json::Value =
        serde_json::from_str(&net.pins.xdpgate(&["stats", "--json"])).unwrap();
    let int = stats["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["interface"] == net.int.as_str()))
        .unwrap_or_else(|| panic!("{} missing: {stats}", net.int));
    let redirected = int["verdicts"]["redirect"]["packets"].as_u64().unwrap_or(0);
    assert!(redirected >= 2, "{redirected} packets redirected from {}: {int}", net.int);

    // 1,428 bytes of IP with DF over a 1,280-byte route: never delivered.
    assert_eq!(replies(&net, 1400, 3), 0, "DF pings longer than the route's MTU");
}

/// The gateway's own ICMP errors about a source-translated flow's packet reach the private
/// host, quoting what it sent: "fragmentation needed" over the small route (path-MTU
/// discovery through this hop) and "time exceeded" for TTL 1 (traceroute's first hop), at
/// either hook. They used to go to the public address: the packet was translated before
/// the stack was left to answer.
fn snat_host_gets_the_gateways_own_errors(net: Gateway) {
    net.apply("nat.yaml", NAT_POLICY);
    net.gw.exec(
        "ip",
        &["route", "replace", "203.0.113.0/24", "dev", &net.ext, "mtu", "lock", "1280"],
    );
    // TTL 1 before the gateway knows the client's address (no neighbour entry: the packet
    // could not be sent from here anyway), then once it does (a usable next hop).
    let text = ping_text(&net, &["-t", "1"]);
    assert!(
        text.contains("Time to live exceeded"),
        "no time-exceeded (no neighbour):
{text}"
    );
    assert!(
        text.contains("From 198.51.100.1"),
        "from the gateway's hop:
{text}"
    );
    assert_eq!(replies(&net, 56, 2), 2, "plain pings");
    let text = ping_text(&net, &["-t", "1"]);
    assert!(
        text.contains("Time to live exceeded"),
        "no time-exceeded came back:
{text}"
    );
    let text = ping_text(&net, &["-M", "do", "-s", "1400"]);
    assert!(
        text.contains("Frag needed"),
        "no fragmentation-needed came back:
{text}"
    );
    assert!(text.contains("mtu = 1280"), "{text}");
}

fn ping_text(net: &Gateway, args: &[&str]) -> String {
    let args = [&["-n"], args, &["-c", "2", "-i", "0.3", "-W", "1", CLIENT4]].concat();
    let out = net.server.try_exec("ping", &args);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn tc_snat_host_gets_the_gateways_own_errors() {
    snat_host_gets_the_gateways_own_errors(Gateway::tc());
}

#[test]
fn xdp_snat_host_gets_the_gateways_own_errors() {
    let net = Gateway::new();
    // An XDP redirect into a veth needs NAPI at its peer: GRO on at the hosts' ends.
    for ns in [&net.client, &net.server] {
        let out = ns.exec("ip", &["-o", "link", "show", "type", "veth"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).and_then(|n| n.split('@').next()).unwrap();
            ns.exec("ethtool", &["-K", name, "gro", "on"]);
        }
    }
    snat_host_gets_the_gateways_own_errors(net);
}

/// The path MTU the client's kernel has learnt for `dst`, if any (`ip route get`'s cache).
fn learnt_mtu(net: &Gateway, dst: &str) -> Option<u32> {
    let out = net.client.exec("ip", &["-4", "route", "get", dst]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu").and_then(|_| words.next()).map(|n| n.parse().unwrap())
}

/// A load balancer's client gets the gateway's own "fragmentation needed" about its datagram
/// (too long for the route to the backend) quoting the datagram as it sent it, to the
/// frontend, so it learns the path MTU to the frontend, at either hook. (The stack answers
/// the translated packet: until the egress program translated its error, the error quoted
/// the backend, and the client learnt nothing for the frontend; seen failing so.)
#[test]
fn lb_client_learns_the_path_mtu_from_the_gateways_own_error() {
    for hook in ["xdp", "tc"] {
        let net = Gateway::with_hooks(hook, hook);
        net.take_redirects();
        net.apply("lb.yaml", UDP_LB_AND_NAT_POLICY);
        net.gw.exec(
            "ip",
            &["route", "replace", "198.51.100.0/24", "dev", &net.int, "mtu", "lock", "1280"],
        );
        let client = net.client.run(|| UdpSocket::bind((CLIENT4, 0)).unwrap());
        client.connect("192.0.2.10:53").unwrap();
        // 1,428 bytes of IP, with DF (Linux's default for UDP): through the client's link,
        // not the gateway's route on. Sent again while nothing is learnt (the first may meet
        // an unresolved neighbour, and an error of the stack's is rate-limited).
        for _ in 0..10 {
            // Refused once the error is in (EMSGSIZE): no matter.
            let _ = client.send(&[0u8; 1400]);
            thread::sleep(Duration::from_millis(200));
            if learnt_mtu(&net, "192.0.2.10").is_some() {
                break;
            }
        }
        assert_eq!(learnt_mtu(&net, "192.0.2.10"), Some(1280), "{hook}: the frontend's path MTU");
        assert_eq!(learnt_mtu(&net, SERVER4), None, "{hook}: nothing learnt for the backend");

        // TTL 1: the gateway's "time exceeded" reaches the client's socket (its quote is what
        // the socket sent) from the gateway's own address, as a router's does, so that
        // traceroute shows the hop (seen failing while the egress program gave it the
        // frontend's address: "2 11 0 192.0.2.10").
        let out = net.client.try_exec("python3", &["-c", TIME_EXCEEDED]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "2 11 0 203.0.113.1", "{hook}: {out:?}");
    }
}

/// Sends a UDP datagram with TTL 1 to the frontend on a connected socket with `IP_RECVERR`,
/// and prints the ICMP error the socket took for its own: origin, type, code, and the
/// address it came from (`SO_EE_OFFENDER`).
const TIME_EXCEEDED: &str = r#"
import select, socket, struct
IP_RECVERR = 11  # linux/in.h; not every Python names it
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
s.connect(("192.0.2.10", 53))
for _ in range(5):
    s.send(b"hop?")
    if select.select([s], [], [], 1)[0]:
        break
_, anc, _, _ = s.recvmsg(64, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
for level, kind, data in anc:
    if level == socket.IPPROTO_IP and kind == IP_RECVERR:
        _, origin, icmp_type, code = struct.unpack("=IBBB", data[:7])
        print(origin, icmp_type, code, socket.inet_ntoa(data[20:24]))
"#;
