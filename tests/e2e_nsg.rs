//! Network security groups end to end on real interfaces: a client and a server namespace
//! joined through a gateway namespace by veth pairs; the `xdpgate` binary attaches in native
//! XDP mode to both gateway interfaces (client side external, server side internal) and
//! applies YAML policies; real TCP, UDP and ICMP cross the gateway, which forwards through
//! the kernel stack.
//!
//! Shown: allow, deny, stateful replies (past an outbound deny), priority overrides of default
//! rules, a policy swap cutting an open connection that is no longer allowed, and a failed
//! apply leaving the running policy in force.

mod common;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use common::{
    Netns,
    echo::EchoServer,
    gateway::{CLIENT4, CLIENT6, Gateway, SERVER4, SERVER6},
    packet::L4,
    tcp::{accept_within, read_within},
};

/// How long to wait for something the policy should drop.
const DROP_WAIT: Duration = Duration::from_millis(1500);
/// How long to wait for something that should get through.
const PASS_WAIT: Duration = Duration::from_secs(3);

/// The TCP ports the server's echo service listens on (both families).
const ECHO_PORTS: [u16; 4] = [22, 80, 8080, 8081];

/// The base policy: web allowed from the Internet, SSH denied ahead of a lower-priority allow,
/// mDNS allowed in, and an outbound deny on source port 5353 that would drop the mDNS
/// replies if flows were not stateful. One rule per line: tests replace or add lines.
const POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [80]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
      - {name: allow-ssh-clients, priority: 250, direction: inbound, access: allow, protocol: tcp, source: [203.0.113.0/24, 2001:db8:2::/64], destination: ["*"], destination_ports: [22]}
      - {name: allow-mdns-in, priority: 300, direction: inbound, access: allow, protocol: udp, source: [Internet], destination: ["*"], destination_ports: [5353]}
      - {name: deny-mdns-out, priority: 100, direction: outbound, access: deny, protocol: udp, source: ["*"], source_ports: [5353], destination: ["*"]}
"#;

const ALLOW_WEB: &str = "      - {name: allow-web, priority: 100, direction: inbound, access: allow, \
     protocol: tcp, source: [Internet], destination: [\"*\"], destination_ports: [80]}\n";

/// The base policy without its web rule.
fn policy_without_web() -> String {
    assert!(POLICY.contains(ALLOW_WEB), "ALLOW_WEB must be a line of POLICY");
    POLICY.replace(ALLOW_WEB, "")
}

/// The base policy with `extra` rule lines appended.
fn policy_with(extra: &[&str]) -> String {
    let mut p = POLICY.to_string();
    for line in extra {
        p += &format!("      - {line}\n");
    }
    p
}

/// client — gateway — server, xdpgate on both gateway interfaces, an echo service on the
/// server, and a directory for policy files.
struct Lab {
    // Field order is drop order: stop the service before the topology goes.
    _echo: EchoServer,
    net: Gateway,
}

impl std::ops::Deref for Lab {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.net
    }
}

impl Lab {
    fn new() -> Self {
        let net = Gateway::new();
        let addrs =
            ECHO_PORTS.iter().flat_map(|p| [sock(SERVER4, *p), sock(SERVER6, *p)]).collect();
        Self { _echo: EchoServer::start(&net.server, addrs), net }
    }

    /// `xdpgate apply` of `text`, which must succeed; returns its stdout.
    fn apply(&self, name: &str, text: &str) -> String {
        let out = self.net.apply(name, text);
        assert!(out.contains("applied"), "apply printed: {out}");
        out
    }

    fn try_apply(&self, path: &Path) -> Output {
        self.pins.try_xdpgate(&["apply", path.to_str().unwrap()])
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.pins.xdpgate(&["stats", "--json"])).expect("stats json")
    }

    /// Packets dropped by policy, over both interfaces.
    fn policy_drops(&self) -> u64 {
        let json = self.stats();
        json["drops"]["policy"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no policy drop counter: {json}"))
    }

    fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.client.run(move || TcpStream::connect_timeout(&addr, timeout))
    }

    /// A connection from the client that must work: echoes some data both ways.
    fn tcp_works(&self, addr: SocketAddr, what: &str) -> TcpStream {
        let mut s = self
            .connect(addr, PASS_WAIT)
            .unwrap_or_else(|e| panic!("{what}: connect to {addr} failed: {e}"));
        if let Err(e) = exchange(&mut s, 16 * 1024) {
            panic!("{what}: no echo from {addr}: {e}");
        }
        s
    }

    /// Connections from the client that the policy must drop, tried in parallel: each SYN
    /// gets no answer at all (a refusal would mean the SYN reached the server).
    fn tcp_blocked(&self, cases: &[(SocketAddr, &str)]) {
        let results: Vec<_> = std::thread::scope(|scope| {
            let tries: Vec<_> = cases
                .iter()
                .map(|(addr, _)| scope.spawn(move || self.connect(*addr, DROP_WAIT)))
                .collect();
            tries.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for ((addr, what), result) in cases.iter().zip(results) {
            match result {
                Ok(_) => panic!("{what}: connected to {addr}, the policy should drop the SYN"),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{what}: connect to {addr}: {e} (want a timeout: a silent drop)"),
            }
        }
    }

    fn ping(&self, from: &Netns, to: &str) -> Output {
        from.try_exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", to])
    }

    fn ping_works(&self, from: &Netns, to: &str, what: &str) {
        let out = self.ping(from, to);
        assert!(
            out.status.success(),
            "{what}: ping {to} from {} failed:\n{}",
            from.name,
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Pings (from, to, what) that must all go unanswered, sent in parallel.
    fn ping_blocked(&self, cases: &[(&Netns, &str, &str)]) {
        let outs: Vec<Output> = std::thread::scope(|scope| {
            let pings: Vec<_> = cases
                .iter()
                .map(|(from, to, _)| {
                    scope.spawn(move || from.try_exec("ping", &["-c", "1", "-W", "1", to]))
                })
                .collect();
            pings.into_iter().map(|p| p.join().unwrap()).collect()
        });
        for ((from, to, what), out) in cases.iter().zip(outs) {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                !out.status.success() && text.contains(" 0 received"),
                "{what}: ping {to} from {} should get no reply:\n{text}{}",
                from.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn udp(&self, ns: &Netns, addr: SocketAddr) -> UdpSocket {
        let s =
            ns.run(move || UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        s.set_read_timeout(Some(PASS_WAIT)).unwrap();
        s
    }
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    SocketAddr::new(ip, port)
}

/// Sends `len` bytes in 4 KiB chunks, reading each chunk's echo back before the next.
fn exchange(s: &mut TcpStream, len: usize) -> io::Result<()> {
    s.set_read_timeout(Some(PASS_WAIT))?;
    let mut sent = 0;
    let mut n = 0u8;
    while sent < len {
        let chunk = vec![n; 4096.min(len - sent)];
        s.write_all(&chunk)?;
        let mut back = vec![0u8; chunk.len()];
        s.read_exact(&mut back)?;
        if back != chunk {
            return Err(io::Error::other("echo differs from what was sent"));
        }
        sent += chunk.len();
        n = n.wrapping_add(1);
    }
    Ok(())
}

/// Writes on an established connection and expects no echo within [`DROP_WAIT`].
fn no_echo(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(DROP_WAIT)).unwrap();
    s.write_all(b"are you there?").unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => panic!("{what}: connection closed instead of going silent"),
        Ok(n) => panic!("{what}: got {n} bytes of echo, the flow should be cut"),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
        Err(e) => panic!("{what}: read: {e} (want a timeout)"),
    }
}

/// Receives one datagram, `None` on timeout.
fn recv(s: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn allow_deny_and_stateful_replies() {
    let started = Instant::now();
    let lab = Lab::new();

    // Attached but no policy yet: nothing is enforced, inbound ping works.
    lab.ping_works(&lab.client, SERVER4, "before any policy");

    lab.apply("base.yaml", POLICY);
    let drops_before = lab.policy_drops();

    // Allowed: TCP 80 from the Internet, both families, data both ways.
    lab.tcp_works(sock(SERVER4, 80), "allow-web over IPv4");
    lab.tcp_works(sock(SERVER6, 80), "allow-web over IPv6");

    // Denied: 22 by deny-ssh (priority 200 beats allow-ssh-clients at 250), 8080 by
    // DenyAllInBound; the server listens on both, so only the policy can stop them.
    lab.tcp_blocked(&[
        (sock(SERVER4, 22), "deny-ssh over IPv4"),
        (sock(SERVER6, 22), "deny-ssh over IPv6"),
        (sock(SERVER4, 8080), "DenyAllInBound for an unlisted port"),
        (sock(SERVER6, 8081), "DenyAllInBound for an unlisted port over IPv6"),
    ]);

    // UDP 5353: the query is allowed in, and its reply passes the gateway's internal side
    // although deny-mdns-out matches it: it belongs to an allowed flow.
    let mdns = lab.udp(&lab.server, sock(SERVER4, 5353));
    let asker = lab.udp(&lab.client, sock(CLIENT4, 0));
    asker.send_to(b"query", sock(SERVER4, 5353)).unwrap();
    let (query, from) = recv(&mdns, PASS_WAIT).expect("allow-mdns-in: query never arrived");
    assert_eq!(query, b"query");
    assert_eq!(from, asker.local_addr().unwrap(), "the gateway forwards, it does not NAT");
    mdns.send_to(b"answer", from).unwrap();
    let (answer, _) = recv(&asker, PASS_WAIT).expect("stateful reply to the mDNS query dropped");
    assert_eq!(answer, b"answer");

    // A new outbound flow from port 5353 is what deny-mdns-out is for: dropped. The same
    // datagram from another port is allowed by AllowInternetOutBound.
    let listener = lab.udp(&lab.client, sock(CLIENT4, 0));
    let listener_addr = listener.local_addr().unwrap();
    let drops = lab.policy_drops();
    mdns.send_to(b"unsolicited", listener_addr).unwrap();
    assert_eq!(recv(&listener, DROP_WAIT), None, "deny-mdns-out let a new flow from 5353 out");
    assert!(lab.policy_drops() > drops, "the unsolicited datagram was not a policy drop");
    let other = lab.udp(&lab.server, sock(SERVER4, 0));
    other.send_to(b"from elsewhere", listener_addr).unwrap();
    let (got, _) = recv(&listener, PASS_WAIT).expect("AllowInternetOutBound: datagram dropped");
    assert_eq!(got, b"from elsewhere");

    // ICMP: echo requests from the Internet hit DenyAllInBound; the server's own pings go out
    // by AllowInternetOutBound and their replies come back as part of the flow.
    lab.ping_blocked(&[
        (&lab.client, SERVER4, "DenyAllInBound for ICMP"),
        (&lab.client, SERVER6, "DenyAllInBound for ICMPv6"),
    ]);
    lab.ping_works(&lab.server, CLIENT4, "AllowInternetOutBound + stateful echo reply");
    lab.ping_works(&lab.server, CLIENT6, "AllowInternetOutBound + stateful ICMPv6 echo reply");

    // 4 SYNs, 1 datagram and 2 echo requests at least.
    let dropped = lab.policy_drops() - drops_before;
    assert!(dropped >= 7, "policy drop counter grew by only {dropped}");
    let stats = lab.stats();
    for iface in [&lab.ext, &lab.int] {
        let s = stats["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["interface"] == **iface)
            .unwrap_or_else(|| panic!("{iface} missing from stats: {stats}"));
        let packets = s["verdicts"]["drop"]["packets"].as_u64().unwrap_or(0);
        assert!(packets > 0, "no drop verdict counted on {iface}: {s}");
    }
    eprintln!("allow_deny_and_stateful_replies: {:?}", started.elapsed());
}

#[test]
fn user_rules_override_default_rules_by_priority() {
    let started = Instant::now();
    let lab = Lab::new();

    // Outbound: a priority-150 deny of ICMP to the Internet overrides AllowInternetOutBound
    // (65001) for ICMP only. No IPv6 packet has crossed the gateway yet, so the IPv6 TCP
    // below also needs neighbour discovery between server and gateway, ICMPv6 that the
    // dataplane must leave to the kernel rather than to this rule (ff02::/16 and fe80::/10
    // are outside the virtual network: to the rule they are Internet).
    lab.apply("base.yaml", POLICY);
    lab.ping_works(&lab.server, CLIENT4, "AllowInternetOutBound before the override");
    lab.apply(
        "no-ping-out.yaml",
        &policy_with(&["{name: deny-icmp-out, priority: 150, direction: outbound, access: deny, \
             protocol: icmp, source: [\"*\"], destination: [Internet]}"]),
    );
    let neigh = lab.server.exec("ip", &["-6", "neigh", "show", "2001:db8:1::1"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(!neigh.contains("lladdr"), "the server already knows the gateway: {neigh}");
    lab.tcp_works(sock(SERVER4, 80), "allow-web beside the outbound override");
    lab.tcp_works(
        sock(SERVER6, 80),
        "allow-web over IPv6 (and neighbour discovery) beside the ICMP override",
    );
    lab.ping_blocked(&[
        (&lab.server, CLIENT4, "deny-icmp-out (150) over AllowInternetOutBound"),
        (&lab.server, CLIENT6, "deny-icmp-out (150) over AllowInternetOutBound, IPv6"),
    ]);
    let other = lab.udp(&lab.server, sock(SERVER4, 0));
    let listener = lab.udp(&lab.client, sock(CLIENT4, 0));
    other.send_to(b"still out", listener.local_addr().unwrap()).unwrap();
    assert!(recv(&listener, PASS_WAIT).is_some(), "AllowInternetOutBound no longer allows UDP");

    // Inbound: with the client's networks peered, the client is VirtualNetwork and
    // AllowVnetInBound (65000) lets everything in, ICMP and any port; a priority-4000 deny
    // overrides it for TCP 8080 only.
    let peered = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
  peered: [203.0.113.0/24, 2001:db8:2::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: deny-vnet-8080, priority: 4000, direction: inbound, access: deny, protocol: tcp, source: [VirtualNetwork], destination: ["*"], destination_ports: [8080]}
"#;
    lab.apply("peered.yaml", peered);
    lab.tcp_works(sock(SERVER4, 8081), "AllowVnetInBound for a port no rule names");
    lab.tcp_works(sock(SERVER6, 22), "AllowVnetInBound for SSH");
    lab.ping_works(&lab.client, SERVER4, "AllowVnetInBound for ICMP");
    lab.tcp_blocked(&[
        (sock(SERVER4, 8080), "deny-vnet-8080 (4000) over AllowVnetInBound"),
        (sock(SERVER6, 8080), "deny-vnet-8080 (4000) over AllowVnetInBound, IPv6"),
    ]);
    eprintln!("user_rules_override_default_rules_by_priority: {:?}", started.elapsed());
}

#[test]
fn policy_swap_cuts_a_flow_no_longer_allowed() {
    let started = Instant::now();
    let lab = Lab::new();
    lab.apply("base.yaml", POLICY);

    let mut conn = lab.tcp_works(sock(SERVER4, 80), "allow-web before the swap");
    let mut conn6 = lab.tcp_works(sock(SERVER6, 80), "allow-web over IPv6 before the swap");
    exchange(&mut conn, 1000).expect("second exchange on the open connection");
    // Let delayed ACKs go out so neither end has anything left to send: the client's next
    // write is the first packet of the connection after the swap. (Were the server to send
    // after the swap, it would reopen the flow: see the test after this one.)
    quiesce();

    let drops = lab.policy_drops();
    lab.apply("without-web.yaml", &policy_without_web());
    // The open connections' next packets are classified again under the new policy, which
    // no longer allows them: no echo comes back.
    std::thread::scope(|scope| {
        scope.spawn(|| no_echo(&mut conn, "open IPv4 connection after allow-web was removed"));
        no_echo(&mut conn6, "open IPv6 connection after allow-web was removed");
    });
    assert!(lab.policy_drops() > drops, "the cut flows' packets were not policy drops");
    lab.tcp_blocked(&[
        (sock(SERVER4, 80), "a new connection without allow-web"),
        (sock(SERVER6, 80), "a new IPv6 connection without allow-web"),
    ]);

    // Restoring the rule lets new connections in again.
    lab.apply("base-again.yaml", POLICY);
    lab.tcp_works(sock(SERVER4, 80), "allow-web restored");
    lab.tcp_works(sock(SERVER6, 80), "allow-web restored, IPv6");
    eprintln!("policy_swap_cuts_a_flow_no_longer_allowed: {:?}", started.elapsed());
}

/// Waits long enough for delayed ACKs (40 ms on Linux, 200 ms at most) to have gone out.
fn quiesce() {
    std::thread::sleep(Duration::from_millis(250));
}

/// A cut connection must stay cut whichever end speaks next. Here the protected server
/// speaks first after the swap: its segment (server:8082 -> client) arrives on the internal
/// interface and finds no flow (the cut removed both entries). Not being a SYN, it starts
/// none (drop reason `no_flow`); were it classified as a new outbound flow,
/// AllowInternetOutBound would allow it and its reply entry would let the client back in.
#[test]
fn cut_flow_is_not_reopened_by_the_protected_host() {
    let lab = Lab::new();
    let allow_8082 = "{name: allow-8082, priority: 110, direction: inbound, access: allow, \
                      protocol: tcp, source: [Internet], destination: [\"*\"], \
                      destination_ports: [8082]}";
    lab.apply("with-8082.yaml", &policy_with(&[allow_8082]));
    let listener = lab.server.run(|| TcpListener::bind(sock(SERVER4, 8082)).expect("bind 8082"));
    let mut client = lab.connect(sock(SERVER4, 8082), PASS_WAIT).expect("allow-8082: connect");
    let mut server = accept_within(&listener, PASS_WAIT);
    client.write_all(b"hello").unwrap();
    assert_eq!(read_within(&mut server, PASS_WAIT).as_deref(), Some(&b"hello"[..]));
    server.write_all(b"welcome").unwrap();
    assert_eq!(read_within(&mut client, PASS_WAIT).as_deref(), Some(&b"welcome"[..]));
    quiesce();

    lab.apply("without-8082.yaml", POLICY);
    server.write_all(b"server push after the cut").unwrap();
    let got = read_within(&mut client, DROP_WAIT);
    client.write_all(b"client data after the cut").unwrap();
    let reached = read_within(&mut server, DROP_WAIT);
    assert!(
        got.is_none() && reached.is_none(),
        "the cut connection was reopened from inside: client got {:?}, server got {:?}",
        got.map(|b| String::from_utf8_lossy(&b).into_owned()),
        reached.map(|b| String::from_utf8_lossy(&b).into_owned()),
    );
}

#[test]
fn failed_apply_leaves_the_running_policy_in_force() {
    let started = Instant::now();
    let lab = Lab::new();
    let out = lab.apply("base.yaml", POLICY);
    assert!(out.contains("generation 1"), "{out}");
    let mut conn = lab.tcp_works(sock(SERVER4, 80), "allow-web");
    lab.tcp_blocked(&[(sock(SERVER4, 22), "deny-ssh")]);

    // Each invalid policy, had any of it gone in, would change behaviour: the web rule is
    // gone and SSH is allowed.
    let allow_ssh = "      - {name: allow-ssh, priority: 200, direction: inbound, access: allow, \
                     protocol: tcp, source: [\"*\"], destination: [\"*\"], destination_ports: [22]}\n";
    let broken: [(&str, String, &str, &str); 3] = [
        (
            "duplicate-priority.yaml",
            policy_without_web() + allow_ssh,
            "name: allow-ssh,",
            "priority 200 is already used by inbound rule deny-ssh",
        ),
        (
            "host-bits.yaml",
            policy_without_web()
                + &allow_ssh
                    .replace("priority: 200", "priority: 150")
                    .replace("source: [\"*\"]", "source: [203.0.113.1/24]"),
            "203.0.113.1/24",
            "host bits set",
        ),
        (
            "unknown-tag.yaml",
            policy_without_web()
                + &allow_ssh
                    .replace("priority: 200", "priority: 150")
                    .replace("source: [\"*\"]", "source: [Intranet]"),
            "Intranet",
            "unknown service tag or application security group \"Intranet\"",
        ),
    ];
    for (name, text, marker, reason) in &broken {
        let path = lab.write_policy(name, text);
        let line = text
            .lines()
            .position(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("{marker} not in {name}"))
            + 1;
        let out = lab.try_apply(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "apply of {name} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let location = format!("{}:{line}:", path.display());
        assert!(stderr.contains(&location), "{name}: stderr does not name {location}:\n{stderr}");
        assert!(
            stderr.contains(reason),
            "{name}: stderr does not give the reason {reason:?}:\n{stderr}"
        );
    }

    // Behaviour unchanged: the open connection still echoes, new ones on 80 work, 22 is still
    // denied, and the agent's record of the applied policy is still the base policy.
    exchange(&mut conn, 4096).expect("the open connection stopped working after failed applies");
    lab.tcp_works(sock(SERVER4, 80), "allow-web after failed applies");
    lab.tcp_works(sock(SERVER6, 80), "allow-web over IPv6 after failed applies");
    std::thread::scope(|scope| {
        scope.spawn(|| lab.tcp_blocked(&[(sock(SERVER4, 22), "deny-ssh after failed applies")]));
        lab.ping_blocked(&[(&lab.client, SERVER4, "DenyAllInBound after failed applies")]);
    });
    let (_, applied) = xdpgate_dataplane::apply::applied_source(&lab.pins.dir)
        .expect("record of the applied policy");
    assert_eq!(applied, POLICY, "a failed apply replaced the record of the applied policy");
    // No generation was used up: the next good apply is generation 2.
    let out = lab.apply("base-again.yaml", POLICY);
    assert!(out.contains("generation 2"), "failed applies advanced the generation: {out}");
    eprintln!("failed_apply_leaves_the_running_policy_in_force: {:?}", started.elapsed());
}

/// The base policy with a deny rule ahead of everything for the sources in the named set
/// `blocklist` (which starts with one address nobody uses), allow-web and ping from the
/// Internet after it.
fn policy_with_blocklist() -> String {
    let deny = "{name: deny-blocklist, priority: 100, direction: inbound, access: deny, \
                protocol: \"*\", source: [blocklist], destination: [\"*\"], \
                destination_ports: [\"*\"]}";
    let web_after = ALLOW_WEB.replace("priority: 100", "priority: 105");
    let ping = "{name: allow-ping, priority: 110, direction: inbound, access: allow, \
                protocol: icmp, source: [Internet], destination: [\"*\"]}";
    policy_with(&[deny, ping]).replace(ALLOW_WEB, &web_after) + "sets:\n  blocklist: [192.0.2.99]\n"
}

impl Lab {
    /// The elements of `blocklist` as `xdpgate set list --json` shows them.
    fn blocklist(&self) -> Vec<String> {
        let json: serde_json::Value =
            serde_json::from_str(&self.pins.xdpgate(&["set", "list", "--json"])).unwrap();
        let set = json.as_array().unwrap().iter().find(|s| s["name"] == "blocklist").unwrap();
        set["elements"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().into()).collect()
    }
}

/// A set may not grow its policy past a policy's share of the NSG field table (half, what
/// `check` allows), or the next apply or reload of the same file could not be written
/// beside it: refused, nothing changed, and the file applies again.
#[test]
fn a_set_add_past_a_policys_share_of_the_table_is_refused() {
    let lab = Lab::new();
    let hosts = |first: u32, n: u32| -> Vec<String> {
        (first..first + n).map(|a| std::net::Ipv4Addr::from(a).to_string()).collect()
    };
    let big = hosts(0x0a00_0000, 128_000);
    let text = policy_with_blocklist()
        .replace("blocklist: [192.0.2.99]", &format!("blocklist: [{}]", big.join(", ")));
    lab.apply("big-set.yaml", &text);
    let more = hosts(0x0b00_0000, 4_000);
    let mut args = vec!["set", "add", "blocklist"];
    args.extend(more.iter().map(String::as_str));
    let out = lab.pins.try_xdpgate(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at most 131072"), "{err}");
    assert_eq!(lab.blocklist().len(), 128_000, "the refused elements were kept");
    lab.apply("big-set-again.yaml", &text);
}

/// `xdpgate set add|del` changes what a rule naming the set matches, in the kernel and
/// without a re-apply: a real connection and ping from an added address stop (an open
/// connection from it too, as after an apply), come back after `del`, a later apply keeps the
/// run-time elements until `set reset`, and bad input changes nothing.
#[test]
fn set_add_and_del_block_and_allow_again_without_an_apply() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    lab.ping_works(&lab.client, SERVER4, "allowed before the set add");
    let mut open = lab.tcp_works(sock(SERVER4, 80), "allowed before the set add");
    quiesce();

    let out = lab.pins.xdpgate(&["set", "add", "blocklist", "203.0.113.0/24", "2001:db8:2::10"]);
    assert!(out.contains("2 elements added to set blocklist") && out.contains("written"), "{out}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", "203.0.113.0/24", "2001:db8:2::10/128"]);
    no_echo(&mut open, "a connection opened before its source was added to the blocklist");
    // An element the set has already changes no entry: no flow is judged again (seen
    // failing: it moved the generation on).
    let generation = |out: &str| out.rsplit("generation ").next().unwrap().trim().to_owned();
    let again = lab.pins.xdpgate(&["set", "add", "blocklist", "203.0.113.0/24"]);
    assert!(again.contains(" 0 NSG table entries written, 0 removed"), "{again}");
    assert_eq!(generation(&again), generation(&out), "{again}");
    lab.tcp_blocked(&[
        (sock(SERVER4, 80), "a new connection from a blocked source"),
        (sock(SERVER6, 80), "a new IPv6 connection from a blocked source"),
    ]);
    lab.ping_blocked(&[(&lab.client, SERVER4, "ping from a blocked source")]);
    let rules = lab.pins.xdpgate(&["rules"]);
    assert!(rules.contains("203.0.113.0/24"), "rules shows the set's elements:\n{rules}");
    // verify-flow asks the kernel's tables, and names the rule from the generation's record.
    let verify = lab.pins.try_xdpgate(&[
        "verify-flow",
        "--direction",
        "inbound",
        "--protocol",
        "tcp",
        "--local",
        "198.51.100.10:80",
        "--remote",
        "203.0.113.10:40000",
    ]);
    let answer = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "denied: {answer}");
    assert!(answer.contains("deny-blocklist") && !answer.contains("unknown"), "{answer}");

    // Bad input: a clear error naming it, nothing changed.
    for (args, says) in [
        (&["set", "add", "blocklist", "192.0.2.7", "203.0.113.300"][..], "203.0.113.300"),
        (&["set", "add", "blocklist", "203.0.113.10/24"], "host bits set"),
        (&["set", "add", "nosuch", "192.0.2.7"], "no set \"nosuch\""),
        (&["set", "del", "blocklist", "203.0.113.0/25"], "not in set blocklist: 203.0.113.0/25"),
    ] {
        let out = lab.pins.try_xdpgate(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", "203.0.113.0/24", "2001:db8:2::10/128"]);

    // A later apply of the file keeps the run-time elements.
    lab.apply("sets-again.yaml", &policy_with_blocklist());
    lab.tcp_blocked(&[(sock(SERVER4, 80), "still blocked after an apply")]);

    let out = lab.pins.xdpgate(&["set", "del", "blocklist", "203.0.113.0/24"]);
    assert!(out.contains("1 element deleted from set blocklist"), "{out}");
    lab.ping_works(&lab.client, SERVER4, "allowed again after set del");
    lab.tcp_works(sock(SERVER4, 80), "allowed again after set del");
    lab.tcp_blocked(&[(sock(SERVER6, 80), "the IPv6 element is still in the set")]);

    // reset: the file's elements again.
    lab.pins.xdpgate(&["set", "reset", "blocklist"]);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    lab.tcp_works(sock(SERVER6, 80), "allowed after set reset");
}

/// `set del` naming one element twice (or as X and X/32) deletes it once. The second copy
/// recorded a removal of an element the file never listed, which kept that address out of
/// the set once the file listed it: the file's block was not enforced (seen failing: the
/// connection was allowed after the apply of the file listing the client).
#[test]
fn a_set_del_naming_an_element_twice_deletes_it_once() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    lab.pins.xdpgate(&["set", "add", "blocklist", CLIENT4]);
    lab.pins.xdpgate(&["set", "del", "blocklist", CLIENT4, &format!("{CLIENT4}/32")]);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    let json: serde_json::Value =
        serde_json::from_str(&lab.pins.xdpgate(&["set", "list", "--json"])).unwrap();
    let set = json.as_array().unwrap().iter().find(|s| s["name"] == "blocklist").unwrap();
    assert_eq!(set["removed"], serde_json::json!([]), "a removal never asked for: {set}");
    let listed = policy_with_blocklist()
        .replace("blocklist: [192.0.2.99]", &format!("blocklist: [192.0.2.99, {CLIENT4}]"));
    lab.apply("listed.yaml", &listed);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", "203.0.113.10/32"]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked by the file's element")]);
}

/// A range is one element: `set del` takes it out whole, as written, and refuses one of
/// the prefixes it is made of (seen failing: `set del` of 203.0.113.8/30 took that piece
/// out of the file's range and let the client in).
#[test]
fn a_set_del_takes_a_range_out_whole_never_a_piece_of_it() {
    let lab = Lab::new();
    let range = "203.0.113.8-203.0.113.13";
    let text = policy_with_blocklist()
        .replace("blocklist: [192.0.2.99]", &format!("blocklist: [192.0.2.99, {range}]"));
    lab.apply("range.yaml", &text);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", range]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked by the file's range")]);
    let out = lab.pins.try_xdpgate(&["set", "del", "blocklist", "203.0.113.8/30"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not in set blocklist: 203.0.113.8/30"), "{err}");
    lab.tcp_blocked(&[(sock(SERVER4, 80), "still blocked: nothing was changed")]);
    // Added at run time, a range is one element too; written twice, still one (seen
    // failing: "2 elements added").
    let added = "198.51.100.200-198.51.100.202";
    let out = lab.pins.xdpgate(&["set", "add", "blocklist", added, added]);
    assert!(out.contains("1 element added to set blocklist"), "{out}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", added, range]);
    // Elements the set holds already (added, or the file's) are not counted as added (seen
    // failing: "2 elements added" with nothing written).
    let out = lab.pins.xdpgate(&["set", "add", "blocklist", added, "192.0.2.99"]);
    let said = format!("no element added to set blocklist ({added} 192.0.2.99/32 there already)");
    assert!(out.contains(&said) && out.contains(": 0 NSG table entries written"), "{out}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", added, range]);
    let out = lab.pins.xdpgate(&["set", "del", "blocklist", range, added]);
    assert!(out.contains("2 elements deleted from set blocklist"), "{out}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    lab.tcp_works(sock(SERVER4, 80), "allowed once the range is deleted");
}

/// A set change the state directory cannot record (/run read-only here) changes nothing,
/// and says so: it stops at the next generation's record, before any entry is written (for
/// a save that fails after the entries, see the next test). Before, the kernel enforced it
/// while `set list` denied it, the connections open before it went on, and the next apply
/// undid it (seen failing: the client was blocked after the failed command).
#[test]
fn a_set_change_that_cannot_be_recorded_changes_nothing() {
    /// The state directory bound read-only over itself, until dropped.
    struct ReadOnly(std::path::PathBuf);
    impl Drop for ReadOnly {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    let state = xdpgate_dataplane::state::dir(&lab.pins.dir);
    let dir = state.to_str().unwrap();
    common::run("mount", &["--bind", dir, dir]);
    let read_only = ReadOnly(state.clone());
    common::run("mount", &["-o", "remount,ro,bind", dir]);
    let out = lab.pins.try_xdpgate(&["set", "add", "blocklist", CLIENT4]);
    drop(read_only);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    lab.tcp_works(sock(SERVER4, 80), "allowed: the failed set add was put back");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!set_change_unfinished(&lab), "a change refused before it began left its mark");
    lab.pins.xdpgate(&["set", "add", "blocklist", CLIENT4]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked once the set add is recorded")]);
}

/// A set change whose `sets.json` cannot be saved after its trie entries were written (the
/// disk full at that moment: ENOSPC injected by strace into the rename) is put back in the
/// kernel and moves the generation on, so flows judged meanwhile are judged again: the
/// client still connects, the set is unchanged, nothing is left marked unfinished (seen
/// failing with the move on left out: the mark stayed). The put-back is what the read-only
/// case above saw fail before, when it still reached the entries.
#[test]
fn a_set_change_whose_sets_file_cannot_be_saved_is_put_back() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    let out = lab.set_with_second_rename(&["add", "blocklist", CLIENT4], "error=ENOSPC");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("No space left") && err.contains("nothing was changed"), "{err}");
    assert!(!set_change_unfinished(&lab), "the generation did not move on: {err}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    lab.tcp_works(sock(SERVER4, 80), "allowed: the failed set add was put back");
}

impl Lab {
    /// `xdpgate set ARGS` under strace, which tampers with its second rename (`how`: a
    /// signal or an error, as `strace -e inject` takes them): the first saves the next
    /// generation's record, the second `sets.json`, once the trie entries are written.
    fn set_with_second_rename(&self, args: &[&str], how: &str) -> Output {
        let renames = "rename,renameat,renameat2";
        let trace = format!("trace={renames}");
        let inject = format!("inject={renames}:{how}:when=2");
        self.set_under_strace(args, &["-o", "/dev/null", "-e", &trace, "-e", &inject])
    }

    /// `xdpgate set ARGS` under `strace -f -qq OPTIONS`.
    fn set_under_strace(&self, args: &[&str], options: &[&str]) -> Output {
        std::process::Command::new("strace")
            .args(["-f", "-qq"])
            .args(options)
            .arg("--")
            .arg(self.pins.command().get_program())
            .args(self.pins.command().get_args())
            .arg("set")
            .args(args)
            .output()
            .expect("strace (setup.sh installs it)")
    }
}

/// Whether `xdpgate status` says a set change is unfinished (running, or killed).
fn set_change_unfinished(lab: &Lab) -> bool {
    let status: serde_json::Value =
        serde_json::from_str(&lab.pins.xdpgate(&["status", "--json"])).unwrap();
    status["policy"]["set_change_unfinished"].as_bool().expect("set_change_unfinished")
}

/// `xdpgate set add` killed after its trie writes and before it moves the generation on
/// (SIGKILL from strace at its second rename: the save of `sets.json`, after the next
/// generation's record and the trie entries). The connection open
/// from the address it added to the blocklist is cut on its next packet, as a new one is
/// refused: no flow keeps a verdict from before entries the kernel enforces. An allowed
/// client still connects and talks while every flow is judged on each packet, `status`
/// says the change is unfinished, and the next set command finishes (here `set reset`, back
/// to the file: the client connects again). Seen failing before: the open connection went
/// on until the next writer.
#[test]
fn a_set_add_killed_before_the_generation_moves_on_leaves_no_old_verdict() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    let mut open = lab.tcp_works(sock(SERVER4, 80), "allowed before the set add");
    quiesce();
    // Its entries stamped with the value the mark will have, as programs from before the
    // mark stamp a flow they judge while it is set (seen failing with the mark not checked
    // in `stale`: such a flow counted as current, and went on).
    {
        use aya::maps::HashMap;
        use xdpgate_common::{
            flow::{FlowKey, FlowValue},
            maps::FLOWS,
            nsg::GENERATION_CHANGING,
        };
        let generation = xdpgate_dataplane::apply::active(&lab.pins.dir).unwrap().1.generation;
        let mut flows: HashMap<_, FlowKey, FlowValue> =
            lab.pins.dir.open_map(FLOWS).unwrap().try_into().unwrap();
        let keys: Vec<FlowKey> = flows.keys().map(Result::unwrap).collect();
        assert_eq!(keys.len(), 2, "the open connection's two entries");
        for key in keys {
            let value = flows.get(&key, 0).unwrap();
            let stamped = FlowValue { generation: generation | GENERATION_CHANGING, ..value };
            flows.insert(key, stamped, 0).unwrap();
        }
    }
    let out = lab.set_with_second_rename(&["add", "blocklist", CLIENT4], "signal=KILL");
    assert!(!out.status.success(), "not killed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"], "killed before sets.json was saved");
    no_echo(&mut open, "a connection open before the killed set add blocked its source");
    lab.tcp_blocked(&[(sock(SERVER4, 80), "a new connection from the source it blocked")]);
    // Its rule counts the connection once, not each packet judged again (seen failing: 42
    // flows for one 16 KiB exchange).
    let flows = || {
        let stats: serde_json::Value =
            serde_json::from_str(&lab.pins.xdpgate(&["stats", "--json"])).unwrap();
        let rules = stats["policy"]["rules"].as_array().unwrap().clone();
        rules.iter().find(|r| r["rule"] == "allow-web").unwrap()["flows"].as_u64().unwrap()
    };
    let before = flows();
    lab.tcp_works(sock(SERVER6, 80), "an allowed client while flows are judged on each packet");
    assert_eq!(flows(), before + 1, "allow-web's flows for one connection under the mark");
    assert!(set_change_unfinished(&lab), "status does not say the set change is unfinished");
    // Nor is `plan` of the running file taken for a comparison of what the kernel holds
    // (seen failing: "no changes", and nothing more).
    let (_, source) = xdpgate_dataplane::apply::applied_source(&lab.pins.dir).unwrap();
    let file = std::env::temp_dir().join(format!("{}.yaml", common::unique("plan")));
    std::fs::write(&file, source).unwrap();
    let plan = lab.pins.xdpgate(&["plan", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(plan.contains("an `xdpgate set` change is running or was killed"), "{plan}");

    lab.pins.xdpgate(&["set", "reset", "blocklist"]);
    assert!(!set_change_unfinished(&lab), "still unfinished after the next set command");
    lab.tcp_works(sock(SERVER4, 80), "allowed again once the next set command finished");
}

/// A set change that fails half-way and cannot put back what it wrote (its second entry's
/// write and the removal of its first fail, ENOSPC injected by strace) keeps its mark: the
/// tables differ from `sets.json` and the record, so flows stay judged on each packet and
/// `status` says so until the next set command, which makes the tables whole (seen failing:
/// the generation moved on and nothing said the change was unfinished).
#[test]
fn a_set_change_it_cannot_put_back_keeps_its_mark() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    let args = ["add", "blocklist", "192.0.2.1", "192.0.2.2"];
    // A run that succeeds, traced, says which bpf calls write its two entries: the last two
    // before its second rename (of `sets.json`; the first is the next generation's record).
    let log = std::env::temp_dir().join(format!("xgtest-set-{}.strace", std::process::id()));
    let traced = ["-o", log.to_str().unwrap(), "-e", "trace=bpf,rename,renameat,renameat2"];
    let out = lab.set_under_strace(&args, &traced);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let (mut calls, mut renames, mut writes) = (0, 0, Vec::new());
    for line in text.lines().filter(|l| !l.contains("resumed>")) {
        if line.contains(" bpf(") {
            calls += 1;
            writes.push((calls, line.contains("BPF_MAP_UPDATE_ELEM")));
        } else if line.contains(" rename") {
            renames += 1;
            if renames == 2 {
                break;
            }
        }
    }
    let last = &writes[writes.len() - 2..];
    assert!(renames == 2 && last.iter().all(|(_, update)| *update), "{text}");
    let second = last[1].0;
    lab.pins.xdpgate(&["set", "reset", "blocklist"]);

    let inject = format!("inject=bpf:error=ENOSPC:when={second}..{}", second + 1);
    let out = lab.set_under_strace(&args, &["-o", "/dev/null", "-e", "trace=bpf", "-e", &inject]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("half changed"), "{err}");
    assert!(err.contains("judged again on each packet"), "{err}");
    assert!(set_change_unfinished(&lab), "a half-changed set left no mark: {err}");
    lab.pins.xdpgate(&["set", "reset", "blocklist"]);
    assert!(!set_change_unfinished(&lab), "the next set command left the mark");
    lab.tcp_works(sock(SERVER4, 80), "allowed once the next set command made the tables whole");
}

/// The agent's `generation` and `pid` as `xdpgate status --json` shows them, once it has
/// applied its policy.
fn agent_state(lab: &Lab) -> Option<(u64, u32)> {
    let status: serde_json::Value =
        serde_json::from_str(&lab.pins.xdpgate(&["status", "--json"])).unwrap();
    let agent = &status["agent"];
    Some((agent["generation"].as_u64()?, agent["pid"].as_u64()? as u32))
}

fn wait_for_agent(lab: &Lab, what: &str, ok: impl Fn(u64) -> bool) -> (u64, u32) {
    let start = Instant::now();
    loop {
        if let Some((generation, pid)) = agent_state(lab)
            && ok(generation)
        {
            return (generation, pid);
        }
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `xdpgate set` works while an agent owns the dataplane, and the agent's SIGHUP reload of
/// its policy file keeps the run-time elements.
#[test]
fn an_agent_reload_keeps_the_sets_run_time_elements() {
    let lab = Lab::new();
    let node = format!(
        "interfaces:\n  - {{name: {}, role: external, hook: xdp}}\n  \
         - {{name: {}, role: internal, hook: xdp}}\n",
        lab.ext, lab.int
    );
    let _agent =
        common::agent::NodeAgent::start(&lab.gw, &lab.pins, &policy_with_blocklist(), &node);
    let (started, pid) = wait_for_agent(&lab, "the agent's apply", |g| g > 0);
    lab.tcp_works(sock(SERVER4, 80), "allowed under the agent");

    lab.pins.xdpgate(&["set", "add", "blocklist", CLIENT4]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked by set add under the agent")]);

    common::run("kill", &["-HUP", &pid.to_string()]);
    // set add moved the generation on by one; the reload applies the next one.
    wait_for_agent(&lab, "the agent's reload", |g| g > started + 1);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", "203.0.113.10/32"]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "still blocked after the agent's reload")]);

    lab.pins.xdpgate(&["set", "del", "blocklist", CLIENT4]);
    lab.tcp_works(sock(SERVER4, 80), "allowed again after set del under the agent");
}

/// `plan --json` (or `apply --diff --json`) of the policy file at `path`: whether it would
/// cut the live flow from `client`'s port (`flows_cut` counts closed connections' flows too).
fn cuts(lab: &Lab, args: &[&str], path: &Path, client: &TcpStream) -> bool {
    let mut all = args.to_vec();
    all.extend([path.to_str().unwrap(), "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&lab.pins.xdpgate(&all)).unwrap();
    let port = client.local_addr().unwrap().port();
    let cut = plan["cut"].as_array().unwrap_or_else(|| panic!("no cut list: {plan}"));
    cut.iter().any(|f| f["src_port"] == port && f["dst_port"] == 80)
}

/// An apply keeps a set's run-time changes only where they still differ from the file: a
/// set the file no longer declares loses them (declared again, it starts from its file), and
/// a file element removed at run time is back once the file, having dropped it, lists it
/// again. `plan` and `apply --diff` judge live flows against what apply would install (the
/// file with the kept changes). Seen failing before apply pruned `sets.json`: the re-declared
/// set blocked the client again; and before plan loaded the changes: the flow was cut.
#[test]
fn an_apply_forgets_the_run_time_changes_its_file_makes_moot() {
    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    lab.pins.xdpgate(&["set", "add", "blocklist", CLIENT4]);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked by set add")]);
    // A policy without the set (and its rule), then with it again.
    lab.apply("no-set.yaml", POLICY);
    lab.apply("sets-again.yaml", &policy_with_blocklist());
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"], "the set declared again");
    lab.tcp_works(sock(SERVER4, 80), "a set declared again holds its file's elements");

    let listed = policy_with_blocklist()
        .replace("blocklist: [192.0.2.99]", &format!("blocklist: [192.0.2.99, {CLIENT4}]"));
    lab.apply("listed.yaml", &listed);
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked by the file's element")]);
    lab.pins.xdpgate(&["set", "del", "blocklist", CLIENT4]);
    let mut open = lab.tcp_works(sock(SERVER4, 80), "allowed after set del");
    // The same file again keeps the run-time deletion: the open connection is not cut.
    let again = lab.write_policy("listed-again.yaml", &listed);
    assert!(!cuts(&lab, &["plan"], &again, &open), "plan cuts the open connection");
    assert!(!cuts(&lab, &["apply", "--diff"], &again, &open), "apply --diff cuts it");
    lab.apply("listed-again.yaml", &listed);
    exchange(&mut open, 100).expect("the open connection survives the same file's apply");
    // The file drops the element, then lists it again: it is in the set again.
    lab.apply("unlisted.yaml", &policy_with_blocklist());
    assert!(cuts(&lab, &["plan"], &again, &open), "plan of the file listing it again");
    lab.apply("listed-once-more.yaml", &listed);
    assert_eq!(lab.blocklist(), ["192.0.2.99/32", "203.0.113.10/32"]);
    no_echo(&mut open, "the connection from an element the file lists again");
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked again by the file's element")]);
}

/// A `set add` whose writes fail half-way changes nothing: with the NSG field table filled
/// to the brim by another writer (entries of a table no slot uses), the update in place of
/// an existing entry (203.0.113.0/24, which allow-ssh-clients names) succeeds and the new
/// entry after it (10.0.0.0/8) does not. The error says so, the entry written is restored
/// (the client in 203.0.113.0/24 still connects), the set and `sets.json` are as before;
/// with room again the same command works. Seen failing before the rollback (with the
/// up-front count that hid this case taken out): the client was blocked by a command that
/// reported failure.
#[test]
fn a_set_add_failing_half_way_changes_nothing() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use xdpgate_common::nsg::{FieldKey, KEY_HEADER_BITS, RuleBitmap};

    let lab = Lab::new();
    lab.apply("sets.yaml", &policy_with_blocklist());
    let mut fields: LpmTrie<_, FieldKey, RuleBitmap> =
        lab.pins.dir.open_map(xdpgate_common::maps::NSG_FIELDS).unwrap().try_into().unwrap();
    let junk = |i: u32| {
        let value = [i, 0, 0, 0];
        Key::new(KEY_HEADER_BITS + 32, FieldKey { table: 200, field: 0, _pad: [0; 2], value })
    };
    let mut filled = 0;
    while fields.insert(&junk(filled), RuleBitmap { words: [0; 64] }, 0).is_ok() {
        filled += 1;
    }
    assert!(filled > 200_000, "filled only {filled} entries");

    let out = lab.pins.try_xdpgate(&["set", "add", "blocklist", "203.0.113.0/24", "10.0.0.0/8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a set add into a full table succeeded");
    assert!(err.contains("full") && err.contains("nothing was changed"), "{err}");
    println!("refused: {err}");
    assert_eq!(lab.blocklist(), ["192.0.2.99/32"]);
    assert!(!set_change_unfinished(&lab), "the generation did not move on after the failure");
    lab.tcp_works(sock(SERVER4, 80), "allowed after a set add that failed");

    for i in 0..16 {
        fields.remove(&junk(i)).unwrap();
    }
    let out = lab.pins.xdpgate(&["set", "add", "blocklist", "203.0.113.0/24", "10.0.0.0/8"]);
    assert!(out.contains("2 elements added to set blocklist"), "{out}");
    lab.tcp_blocked(&[(sock(SERVER4, 80), "blocked once the set add has room")]);
}

/// A neighbour solicitation crafted to a routed address (hop limit 255, a payload) does not
/// cross the policy (no rule allows ICMPv6 in), also where the arrival interface's IPv6
/// forwarding is off while the host forwards (`all.forwarding`: an uplink that takes router
/// advertisements), where the FIB asked from that interface says only "forwarding
/// disabled" (seen failing there: forwarded to the server, payload and all). Neighbour
/// discovery between the hosts and the gateway goes on meanwhile (the SYN's handshake).
#[test]
fn a_crafted_solicitation_to_a_routed_address_does_not_cross_the_policy() {
    let gw = Gateway::new();
    gw.pins.apply(POLICY);
    let marker = "xdpgate-nd-marker";
    let listen = format!(
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
         s.settimeout(2)\n\
         print('ready', flush=True)\n\
         try:\n    \
             while True:\n        \
                 if b'{marker}' in s.recv(2048): print('got'); break\n\
         except socket.timeout: print('none')\n"
    );
    let send = format!(
        "import socket, ipaddress\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)\n\
         ns = bytes([135, 0, 0, 0, 0, 0, 0, 0]) + ipaddress.ip_address('{SERVER6}').packed\n\
         s.sendto(ns + b'{marker}' * 20, ('{SERVER6}', 0))\n"
    );
    for uplink_forwarding in ["1", "0"] {
        // `all` first: setting it sets every interface's.
        gw.gw.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        let key = format!("net.ipv6.conf.{}.forwarding={uplink_forwarding}", gw.ext);
        gw.gw.exec("sysctl", &["-qw", &key]);
        let mut server = std::process::Command::new("ip")
            .args(["netns", "exec", &gw.server.name, "python3", "-c", &listen])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = server.stdout.take().unwrap();
        let mut ready = [0u8; 6];
        out.read_exact(&mut ready).unwrap();
        let drops = || {
            let stats: serde_json::Value =
                serde_json::from_str(&gw.pins.xdpgate(&["stats", "--json"])).unwrap();
            stats["drops"]["policy"]["packets"].as_u64().unwrap()
        };
        let before = drops();
        gw.client.exec("python3", &["-c", &send]);
        let mut heard = String::new();
        out.read_to_string(&mut heard).unwrap();
        server.wait().unwrap();
        assert_eq!(heard.trim(), "none", "uplink forwarding {uplink_forwarding}: forwarded");
        let after = drops();
        assert!(after > before, "uplink forwarding {uplink_forwarding}: not dropped by policy");
    }
}

/// A full established table (64 flows, filled by answered UDP streams through the gateway)
/// refuses no new connection: a TCP connection of each family echoes 16 KiB and closes,
/// and the server's socket leaves LAST-ACK (its FIN and the client's last ACK passed); a
/// further UDP stream is answered too, and `flows` and `trace` call its flow `assured`.
/// `stats` counts the refused confirmations and no packet as `flow_table_full`. (Seen
/// failing before the fix: the connection's confirming ACK was dropped and its embryo
/// forgotten, so the client was established, the server was not, and the echo never came.)
#[test]
fn a_full_established_table_keeps_new_connections_working() {
    let started = Instant::now();
    let net = Gateway::attached_with(&["--flows", "64"]);
    let lab = Lab {
        _echo: EchoServer::start(&net.server, vec![sock(SERVER4, 80), sock(SERVER6, 80)]),
        net,
    };
    lab.apply("policy", POLICY);
    let mdns = lab.udp(&lab.server, sock(SERVER4, 5353));
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = mdns.recv_from(&mut buf) {
            if mdns.send_to(&buf[..n], from).is_err() {
                return;
            }
        }
    });
    // Two exchanges confirm a stream (one alone stays embryonic). Each stream's socket is
    // kept, so no later stream gets its port back and makes no new flow.
    let stream = |i: usize| {
        let s = lab.udp(&lab.client, sock(CLIENT4, 0));
        for round in 0..2 {
            s.send_to(format!("stream {i} round {round}").as_bytes(), sock(SERVER4, 5353)).unwrap();
            recv(&s, PASS_WAIT).unwrap_or_else(|| panic!("stream {i}: no answer in round {round}"));
        }
        s
    };
    let streams: Vec<_> = (0..64).map(stream).collect();
    let entries = |stats: &serde_json::Value| stats["flow_table"]["flows"]["entries"].as_u64();
    let full = lab.stats();
    assert_eq!(entries(&full), Some(128), "the established table is full: {}", full["flow_table"]);
    let before = lab.stats();
    for addr in [sock(SERVER4, 80), sock(SERVER6, 80)] {
        let mut s = lab.tcp_works(addr, "a connection while the table is full");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the server's FIN");
        assert!(rest.is_empty(), "{addr}: nothing after the echo");
    }
    // The server answers the client's FIN with its own; the client's ACK of that ends its
    // LAST-ACK (the state it stayed in while the ACK was dropped).
    let deadline = Instant::now() + PASS_WAIT;
    loop {
        let out = lab.server.exec("ss", &["-Htan", "state", "last-ack"]);
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "server sockets left in LAST-ACK: {left}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = stream(64);
    // Its flow waits among the embryos, confirmed: listed as `assured`, not `embryonic`,
    // which reads as a handshake or answer never seen (seen failing: `embryonic`).
    let port = last.local_addr().unwrap().port();
    let listed = flows_on_port(&lab, port);
    assert_eq!(listed.len(), 1, "one flow from port {port}: {listed:?}");
    assert_eq!(listed[0]["state"], "assured", "{:?}", listed[0]);
    let in_state =
        |state: &str| flows_where(&lab, &["--state", state]).iter().any(|f| f["src_port"] == port);
    assert!(in_state("assured"), "--state assured lists it");
    assert!(!in_state("embryonic") && !in_state("established"), "no other state lists it");
    // And `trace` of its next datagram says so (seen failing after an outside review:
    // "hit: embryonic flow").
    let (port, ext) = (port.to_string(), lab.ext.clone());
    let args = ["trace", "--json", "--iface", &ext, "--src", CLIENT4, "--dst", SERVER4];
    let udp = ["--protocol", "udp", "--src-port", &port, "--dst-port", "5353"];
    let traced: serde_json::Value =
        serde_json::from_str(&lab.pins.xdpgate(&[&args[..], &udp].concat())).expect("json");
    let lookup =
        traced["stages"].as_array().and_then(|s| s.iter().find(|s| s["stage"] == "lookup"));
    let lookup = lookup.and_then(|s| s["decision"].as_str()).unwrap_or_default();
    assert!(lookup.starts_with("hit: assured flow"), "{traced:#}");
    let after = lab.stats();
    assert_eq!(entries(&after), Some(128), "still full");
    let refused = |s: &serde_json::Value| s["flow_table"]["embryonic"]["refused"].as_u64().unwrap();
    assert!(
        refused(&after) > refused(&before),
        "confirmations refused: {} -> {}",
        refused(&before),
        refused(&after)
    );
    assert!(after["drops"]["policy"]["packets"].is_u64(), "drops by reason: {after}");
    let full = &after["drops"]["flow_table_full"]["packets"];
    assert!(full.as_u64().unwrap_or(0) == 0, "dropped as flow_table_full: {full}");
    drop((streams, lab));
    let _ = echo.join();
    println!(
        "a table of 64 flows, full: two TCP connections and a UDP stream worked, {} \
         confirmations refused, in {:?}",
        refused(&after) - refused(&before),
        started.elapsed()
    );
}

/// Datagrams from the internet side forged with sources of the virtual network (an inside
/// address, and the gateway's own inside address, which a backend's decapsulation may
/// trust), to a port only `AllowVnetInBound` opens, are dropped as `spoofed` at XDP and at
/// tc, IPv4 and IPv6; the internet's own allowed datagram passes, and the server's
/// datagram out (its own address, on its own side) too. (Seen failing before the check:
/// all four forged datagrams reached the server; an outside review's find.)
#[test]
fn virtual_network_sources_from_outside_are_dropped_at_both_hooks() {
    const OPEN_TO_INTERNET: u16 = 5353;
    const VNET_ONLY: u16 = 7000;
    // Link-local in the virtual network too: its sources name no place, and are not checked.
    let policy = "virtual_network:\n  address_space: [198.51.0.0/16, 2001:db8:1::/64, \
        fe80::/10]\n\
        nsgs:\n  - name: servers\n    subnets: [198.51.100.0/24, 2001:db8:1::/64]\n    rules:\n      \
        - {name: allow-mdns, priority: 100, direction: inbound, access: allow, protocol: udp, \
        source: Internet, destination: \"*\", destination_ports: [5353]}\n";
    for (hook, build) in [("xdp", Gateway::new as fn() -> Gateway), ("tc", Gateway::tc)] {
        let net = build();
        net.apply("policy", policy);
        let bind = |ip: &str, port: u16| {
            let addr = sock(ip, port);
            let s = net.server.run(move || UdpSocket::bind(addr).unwrap());
            s.set_nonblocking(true).unwrap();
            s
        };
        let closed = [bind(SERVER4, VNET_ONLY), bind(SERVER6, VNET_ONLY)];
        let open = [bind(SERVER4, OPEN_TO_INTERNET), bind(SERVER6, OPEN_TO_INTERNET)];
        let spoofed = || {
            let stats: serde_json::Value =
                serde_json::from_str(&net.pins.xdpgate(&["stats", "--json"])).unwrap();
            stats["drops"]["spoofed"]["packets"].as_u64().unwrap_or(0)
        };
        let gw_mac = net.gw.mac(&net.ext);
        let forge = |src: &str, dst: &str, port: u16| {
            let frame = common::packet::frame(src, dst, L4::Udp(port, VNET_ONLY));
            common::send_frame(&net.client, &net.client_if, gw_mac, frame).unwrap();
        };
        let forged = [
            ("198.51.100.20", SERVER4),
            ("198.51.100.1", SERVER4),
            ("2001:db8:1::20", SERVER6),
            ("2001:db8:1::1", SERVER6),
        ];
        for (src, dst) in forged {
            forge(src, dst, 40000);
        }
        // Then the internet's own, behind them on the same path.
        for dst in [SERVER4, SERVER6] {
            let frame = common::packet::frame_vlan(
                if dst == SERVER4 { CLIENT4 } else { CLIENT6 },
                dst,
                L4::Udp(40001, OPEN_TO_INTERNET),
                &[],
                b"from the internet",
            );
            common::send_frame(&net.client, &net.client_if, gw_mac, frame).unwrap();
        }
        let deadline = Instant::now() + PASS_WAIT;
        let mut heard = [false; 2];
        while heard != [true; 2] {
            assert!(Instant::now() < deadline, "{hook}: the internet's datagrams heard {heard:?}");
            for (s, h) in open.iter().zip(heard.iter_mut()) {
                *h |= s.recv_from(&mut [0u8; 64]).is_ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The forged ones went first: had they passed, they would be here.
        for s in &closed {
            let got = s.recv_from(&mut [0u8; 64]);
            assert!(got.is_err(), "{hook}: a forged datagram reached the server: {got:?}");
        }
        assert_eq!(spoofed(), 4, "{hook}: dropped as spoofed");
        // The server's own datagram out: a source of the virtual network, on its side.
        let client = net.client.run(|| UdpSocket::bind(sock(CLIENT4, 9999)).unwrap());
        client.set_read_timeout(Some(PASS_WAIT)).unwrap();
        net.server.run(|| {
            UdpSocket::bind(sock(SERVER4, 0)).unwrap().send_to(b"out", sock(CLIENT4, 9999)).unwrap()
        });
        assert!(client.recv_from(&mut [0u8; 64]).is_ok(), "{hook}: the server's datagram out");
        // The client's link-local datagram to the gateway's: its own link, not spoofed
        // (seen failing after a review: the FIB's way back to fe80:: took another link).
        let out =
            net.gw.exec("ip", &["-6", "-br", "addr", "show", "dev", &net.ext, "scope", "link"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let gw_ll = text.split_whitespace().nth(2).unwrap().split('/').next().unwrap().to_owned();
        let send = format!(
            "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); \
             s.sendto(b'll', ('{gw_ll}%{}', 9))",
            net.client_if
        );
        let gw_sock = net.gw.run(|| UdpSocket::bind(sock("::", 9)).unwrap());
        gw_sock.set_read_timeout(Some(PASS_WAIT)).unwrap();
        net.client.exec("python3", &["-c", &send]);
        let got = gw_sock.recv_from(&mut [0u8; 64]);
        assert!(got.is_ok(), "{hook}: the link-local datagram: {got:?}");
        assert_eq!(spoofed(), 4, "{hook}: a link-local source taken for forged");
        // Forwarding on per interface, off for `all` (and the loopback device): the check
        // asks from the arrival interface (seen failing after a review: no check at all).
        if hook == "xdp" {
            net.gw.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=0"]);
            for iface in [&net.ext, &net.int] {
                net.gw.exec("sysctl", &["-qw", &format!("net.ipv4.conf.{iface}.forwarding=1")]);
            }
            forge("198.51.100.20", SERVER4, 40002);
            let deadline = Instant::now() + PASS_WAIT;
            while spoofed() < 5 {
                let got = closed[0].recv_from(&mut [0u8; 64]);
                assert!(got.is_err(), "per-interface forwarding: a forged datagram passed");
                assert!(Instant::now() < deadline, "per-interface forwarding: not dropped");
                std::thread::sleep(Duration::from_millis(20));
            }
            // Address space no inside route covers, with a default route out: the way back
            // is the arrival interface, and a forged source there passes (a limit) until
            // the space has an unreachable route of its own.
            net.gw.exec("ip", &["route", "add", "default", "via", CLIENT4]);
            // A port each: the first one's flow would take the second one in.
            forge("198.51.7.7", SERVER4, 40003);
            closed[0].set_read_timeout(Some(PASS_WAIT)).unwrap();
            closed[0].set_nonblocking(false).unwrap();
            let got = closed[0].recv_from(&mut [0u8; 64]);
            assert!(got.is_ok_and(|(_, from)| from == sock("198.51.7.7", 40003)), "the limit");
            net.gw.exec("ip", &["route", "add", "unreachable", "198.51.0.0/16"]);
            forge("198.51.7.7", SERVER4, 40004);
            let deadline = Instant::now() + PASS_WAIT;
            while spoofed() < 6 {
                assert!(Instant::now() < deadline, "unreachable route: not dropped");
                std::thread::sleep(Duration::from_millis(20));
            }
            closed[0].set_nonblocking(true).unwrap();
            assert!(closed[0].recv_from(&mut [0u8; 64]).is_err(), "unreachable route: passed");
        }
    }
}

/// The flows `xdpgate flows --json --port` lists for `port`.
fn flows_on_port(gw: &Gateway, port: u16) -> Vec<serde_json::Value> {
    flows_where(gw, &["--port", &port.to_string()])
}

/// Every flow `xdpgate flows --json` lists with the filter `filter`.
fn flows_where(gw: &Gateway, filter: &[&str]) -> Vec<serde_json::Value> {
    let text = gw.pins.xdpgate(&[&["flows", "--json", "--top", "0"][..], filter].concat());
    serde_json::from_str(&text).expect("flows json")
}

/// TCP Fast Open through the gateway, both families: a SYN that carries data is answered
/// by a SYN-ACK that acknowledges the data too, which answers the flow as one at the SYN's
/// number + 1 does, and the handshake confirms it. Seen failing with the answer taken only
/// at the SYN's number + 1: the Fast Open flow stayed embryonic.
#[test]
fn a_fast_open_connection_is_confirmed() {
    let gw = Gateway::new();
    gw.apply("base.yaml", POLICY);
    // Both ends: the client's default; the server must enable it (cookie-checked).
    for ns in [&gw.client, &gw.server] {
        ns.exec("sysctl", &["-qw", "net.ipv4.tcp_fastopen=3"]);
    }
    for server in [SERVER4, SERVER6] {
        let family = if server.contains(':') { "AF_INET6" } else { "AF_INET" };
        // Echoes two connections' first read, then says how many SYNs' data it took.
        let listen = format!(
            "import socket\n\
             s = socket.socket(socket.{family})\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)\n\
             s.bind(('{server}', 80)); s.listen(); s.settimeout(10)\n\
             def taken():\n    \
                 t = [l.split() for l in open('/proc/net/netstat') if l.startswith('TcpExt:')]\n    \
                 return int(dict(zip(t[0], t[1]))['TCPFastOpenPassive'])\n\
             before = taken()\n\
             print('ready', flush=True)\n\
             for _ in range(2):\n    \
                 c, _ = s.accept(); c.sendall(c.recv(100)); c.close()\n\
             print(taken() - before)\n"
        );
        // The first connection gets a cookie; the second sends its data with its SYN.
        let connect = format!(
            "import socket\n\
             for _ in range(2):\n    \
                 c = socket.socket(socket.{family})\n    \
                 c.sendto(b'fast', socket.MSG_FASTOPEN, ('{server}', 80)); c.settimeout(5)\n    \
                 assert c.recv(100) == b'fast'\n    \
                 print(c.getsockname()[1]); c.close()\n"
        );
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &gw.server.name, "python3", "-c", &listen])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let ports = gw.client.exec("python3", &["-c", &connect]);
        let ports: Vec<u16> =
            String::from_utf8_lossy(&ports.stdout).lines().map(|l| l.parse().unwrap()).collect();
        line.clear();
        io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(line.trim(), "1", "{server}: the second SYN's data taken (Fast Open)");
        let flows = flows_on_port(&gw, 80);
        for port in ports {
            let flow = flows.iter().find(|f| f["src_port"] == port);
            let state = flow.map(|f| f["state"].clone());
            assert_eq!(state, Some("established".into()), "{server}:{port}: {flows:#?}");
        }
    }
}

/// A server's first SYN-ACK lost past the gateway, and the SYN sent again answered anew
/// with another sequence number (the listener was replaced meanwhile; a server with SYN
/// cookies does so too): that answer's ACK confirms the flow. Seen failing after an
/// outside review: the gateway kept the first answer's number, the flow stayed embryonic
/// and, idle past `embryonic_timeout`, the connection was cut.
#[test]
fn a_syn_answered_anew_is_confirmed() {
    let gw = Gateway::new();
    gw.apply("base.yaml", POLICY);
    let server = sock(SERVER4, 80);
    let first = gw.server.run(move || TcpListener::bind(server).unwrap());
    // The client's kernel never sees the server's SYN-ACKs while this stands.
    let nft = |args: &str| gw.client.exec("nft", &args.split(' ').collect::<Vec<_>>());
    nft("add table inet lose");
    nft("add chain inet lose in { type filter hook input priority 0 ; }");
    nft("add rule inet lose in tcp sport 80 tcp flags & (syn|ack) == syn|ack drop");
    let client = gw.client.spawn(move || TcpStream::connect_timeout(&server, PASS_WAIT * 2));
    // The gateway has counted the first SYN-ACK (the flow's reply direction).
    let start = Instant::now();
    let answered =
        || flows_on_port(&gw, 80).iter().any(|f| f["reply"]["packets"].as_u64() > Some(0));
    while !answered() {
        assert!(start.elapsed() < PASS_WAIT, "the gateway saw no SYN-ACK");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new listener: the SYN sent again gets an answer of its own, with a new number.
    drop(first);
    let second = gw.server.run(move || TcpListener::bind(server).unwrap());
    nft("delete table inet lose");
    let mut s = client.join().unwrap().expect("the connection, on the SYN sent again");
    let mut accepted = gw.server.run(move || accept_within(&second, PASS_WAIT));
    s.write_all(b"anew").unwrap();
    assert_eq!(read_within(&mut accepted, PASS_WAIT).as_deref(), Some(&b"anew"[..]));
    let flows = flows_on_port(&gw, s.local_addr().unwrap().port());
    let state = flows.first().map(|f| f["state"].clone());
    assert_eq!(state, Some("established".into()), "{flows:#?}");
}
