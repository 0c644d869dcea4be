//! East-west traffic end to end: connections between two protected subnets behind one
//! gateway must pass the source's outbound NSG layers (host, then subnet) and then the
//! destination's inbound layers (subnet, then host), whatever the roles of the gateway's
//! interfaces (Azure: traffic between two VMs needs the source NIC's and subnet's outbound
//! rules and the destination subnet's and NIC's inbound rules).
//!
//! ```text
//!   a1 198.51.100.10      --gw_a [gw] gw_b-- switch (bridge) --+-- b1 198.51.100.140
//!      2001:db8:a::10           routes                          |      2001:db8:b::140
//!   subnet A 198.51.100.0/25                                    +-- b2 198.51.100.141
//!            2001:db8:a::/64                                           2001:db8:b::141
//!                                   subnet B 198.51.100.128/25, 2001:db8:b::/64
//! ```
//!
//! One policy holds every case (each case has a rule of its own, so its counter says which
//! rule acted). Each test attaches the two gateway interfaces with one combination of roles
//! and runs the table of cases over IPv4, then IPv6, checking for each: the real TCP
//! connection (allowed ones echo data, denied ones get no answer at all), the drop counter
//! (reason `policy`), the deciding rules' hit counters, the rule the flow entry records for
//! each side and its direction label (the arrival interface's role), and `xdpgate
//! verify-flow` (from the kernel and with `--policy FILE`, asked from either end) against
//! what the kernel did. Every mismatch is collected, so a failure lists all of them.

mod common;

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use common::{Netns, Pins, echo::EchoServer, unique, veth};

/// How long a connection the policy must drop is given (two SYNs: at 0 s and 1 s).
const DROP_WAIT: Duration = Duration::from_millis(1500);
/// How long a connection that must work is given.
const PASS_WAIT: Duration = Duration::from_secs(3);

const POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:a::/64, 2001:db8:b::/64]
nsgs:
  - name: nsg-a
    subnets: [198.51.100.0/25, 2001:db8:a::/64]
    rules:
      - {name: deny-8080-to-b, priority: 100, direction: outbound, access: deny, protocol: tcp, source: ["*"], destination: [198.51.100.128/25, 2001:db8:b::/64], destination_ports: [8080]}
      - {name: allow-web-to-b, priority: 200, direction: outbound, access: allow, protocol: tcp, source: ["*"], destination: [198.51.100.128/25, 2001:db8:b::/64], destination_ports: [80]}
      - {name: deny-ssh-from-b, priority: 100, direction: inbound, access: deny, protocol: tcp, source: [198.51.100.128/25, 2001:db8:b::/64], destination: ["*"], destination_ports: [22]}
      - {name: allow-8080-from-b, priority: 110, direction: inbound, access: allow, protocol: tcp, source: [198.51.100.128/25, 2001:db8:b::/64], destination: ["*"], destination_ports: [8080]}
      - {name: allow-web-from-b, priority: 200, direction: inbound, access: allow, protocol: tcp, source: [198.51.100.128/25, 2001:db8:b::/64], destination: ["*"], destination_ports: [80]}
  - name: nsg-b
    subnets: [198.51.100.128/25, 2001:db8:b::/64]
    rules:
      - {name: deny-telnet-from-a, priority: 100, direction: inbound, access: deny, protocol: tcp, source: [198.51.100.0/25, 2001:db8:a::/64], destination: ["*"], destination_ports: [23]}
      - {name: allow-8080-from-a, priority: 110, direction: inbound, access: allow, protocol: tcp, source: [198.51.100.0/25, 2001:db8:a::/64], destination: ["*"], destination_ports: [8080]}
      - {name: allow-web-from-a, priority: 200, direction: inbound, access: allow, protocol: tcp, source: [198.51.100.0/25, 2001:db8:a::/64], destination: ["*"], destination_ports: [80]}
      - {name: allow-web-to-a, priority: 200, direction: outbound, access: allow, protocol: tcp, source: ["*"], destination: [198.51.100.0/25, 2001:db8:a::/64], destination_ports: [80]}
  - name: nsg-b1
    hosts: [198.51.100.140, 2001:db8:b::140]
    rules:
      - {name: deny-ssh-from-vnet, priority: 100, direction: inbound, access: deny, protocol: tcp, source: [VirtualNetwork], destination: ["*"], destination_ports: [22]}
      - {name: deny-8080-out, priority: 100, direction: outbound, access: deny, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [8080]}
"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    A1,
    B1,
    B2,
}

impl Host {
    fn ip(self, v6: bool) -> IpAddr {
        let s = match (self, v6) {
            (Host::A1, false) => "198.51.100.10",
            (Host::B1, false) => "198.51.100.140",
            (Host::B2, false) => "198.51.100.141",
            (Host::A1, true) => "2001:db8:a::10",
            (Host::B1, true) => "2001:db8:b::140",
            (Host::B2, true) => "2001:db8:b::141",
        };
        s.parse().unwrap()
    }

    /// The TCP ports its echo service listens on: every port a case connects to.
    fn ports(self) -> &'static [u16] {
        match self {
            Host::A1 | Host::B1 => &[22, 80, 8080],
            Host::B2 => &[23, 80],
        }
    }
}

/// A rule as verify-flow, the counters and the flow table name it: NSG, rule, direction.
type Rule = (&'static str, &'static str, &'static str);

struct Case {
    what: &'static str,
    from: Host,
    to: Host,
    port: u16,
    allowed: bool,
    /// The hits the verdict is made of, in evaluation order (source's outbound host and
    /// subnet layers, then destination's inbound subnet and host layers, up to the first
    /// deny); for a denied flow the last one denies. Each must be named by verify-flow.
    decided_by: &'static [Rule],
    /// For an allowed flow, the rule its entry records for each side, outbound (source)
    /// then inbound (destination): the last layer of that side that had an NSG.
    flow: Option<[Rule; 2]>,
}

impl Case {
    /// Rules whose hit counters the connection must move: the deny, or each side's rule.
    fn counted(&self) -> Vec<Rule> {
        match self.flow {
            Some(sides) => sides.to_vec(),
            None => self.decided_by.last().into_iter().copied().collect(),
        }
    }
}

const CASES: &[Case] = &[
    Case {
        what: "a1 -> b1:22, denied by b1's host NSG (destination host layer)",
        from: Host::A1,
        to: Host::B1,
        port: 22,
        allowed: false,
        decided_by: &[
            ("nsg-a", "AllowVnetOutBound", "outbound"),
            ("nsg-b", "AllowVnetInBound", "inbound"),
            ("nsg-b1", "deny-ssh-from-vnet", "inbound"),
        ],
        flow: None,
    },
    Case {
        what: "a1 -> b1:80, allowed by both sides and b1's host NSG",
        from: Host::A1,
        to: Host::B1,
        port: 80,
        allowed: true,
        decided_by: &[
            ("nsg-a", "allow-web-to-b", "outbound"),
            ("nsg-b", "allow-web-from-a", "inbound"),
            ("nsg-b1", "AllowVnetInBound", "inbound"),
        ],
        flow: Some([
            ("nsg-a", "allow-web-to-b", "outbound"),
            ("nsg-b1", "AllowVnetInBound", "inbound"),
        ]),
    },
    Case {
        what: "a1 -> b2:23, denied by B's subnet NSG (destination subnet layer)",
        from: Host::A1,
        to: Host::B2,
        port: 23,
        allowed: false,
        decided_by: &[
            ("nsg-a", "AllowVnetOutBound", "outbound"),
            ("nsg-b", "deny-telnet-from-a", "inbound"),
        ],
        flow: None,
    },
    Case {
        what: "a1 -> b2:80, allowed by A's outbound and B's inbound rule",
        from: Host::A1,
        to: Host::B2,
        port: 80,
        allowed: true,
        decided_by: &[
            ("nsg-a", "allow-web-to-b", "outbound"),
            ("nsg-b", "allow-web-from-a", "inbound"),
        ],
        flow: Some([
            ("nsg-a", "allow-web-to-b", "outbound"),
            ("nsg-b", "allow-web-from-a", "inbound"),
        ]),
    },
    Case {
        what: "a1 -> b1:8080, denied by A's outbound rule although B's inbound allows it",
        from: Host::A1,
        to: Host::B1,
        port: 8080,
        allowed: false,
        decided_by: &[("nsg-a", "deny-8080-to-b", "outbound")],
        flow: None,
    },
    Case {
        what: "b1 -> a1:22, denied by A's subnet NSG inbound",
        from: Host::B1,
        to: Host::A1,
        port: 22,
        allowed: false,
        decided_by: &[
            ("nsg-b1", "AllowVnetOutBound", "outbound"),
            ("nsg-b", "AllowVnetOutBound", "outbound"),
            ("nsg-a", "deny-ssh-from-b", "inbound"),
        ],
        flow: None,
    },
    Case {
        what: "b1 -> a1:8080, denied by b1's host NSG outbound although A's inbound allows it",
        from: Host::B1,
        to: Host::A1,
        port: 8080,
        allowed: false,
        decided_by: &[("nsg-b1", "deny-8080-out", "outbound")],
        flow: None,
    },
    Case {
        what: "b2 -> a1:80, allowed by B's outbound and A's inbound rule",
        from: Host::B2,
        to: Host::A1,
        port: 80,
        allowed: true,
        decided_by: &[
            ("nsg-b", "allow-web-to-a", "outbound"),
            ("nsg-a", "allow-web-from-b", "inbound"),
        ],
        flow: Some([
            ("nsg-b", "allow-web-to-a", "outbound"),
            ("nsg-a", "allow-web-from-b", "inbound"),
        ]),
    },
];

/// Subnet A and subnet B behind a gateway namespace, xdpgate attached to both gateway
/// interfaces with the roles given, echo services on every host, and the policy applied.
struct Lab {
    // Field order is drop order: services, then the attachments (detached from inside the
    // gateway namespace), then the namespaces.
    _echo: Vec<EchoServer>,
    pins: Pins,
    a1: Netns,
    _gw: Netns,
    _switch: Netns,
    b1: Netns,
    b2: Netns,
    policy: PolicyFile,
}

/// The policy file, removed on drop (also when the lab fails to come up).
struct PolicyFile(PathBuf);

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Lab {
    fn new(role_a: &str, role_b: &str) -> Self {
        let a1 = Netns::new("ewa");
        let gw = Netns::new("ewg");
        let switch = Netns::new("ews");
        let b1 = Netns::new("ewb");
        let b2 = Netns::new("ewb");
        let (gw_a, _) = veth(
            &gw,
            "198.51.100.1/25,2001:db8:a::1/64",
            &a1,
            "198.51.100.10/25,2001:db8:a::10/64",
        );
        let (gw_b, uplink) = veth(&gw, "198.51.100.129/25,2001:db8:b::1/64", &switch, "");
        // Subnet B is one L2 segment: b1 and b2 are distinct hosts on a bridge.
        switch.exec("ip", &["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        switch.exec("ip", &["link", "set", "br0", "up"]);
        switch.exec("ip", &["link", "set", &uplink, "master", "br0"]);
        for (ns, v4, v6) in
            [(&b1, "198.51.100.140", "2001:db8:b::140"), (&b2, "198.51.100.141", "2001:db8:b::141")]
        {
            let (port, _) = veth(&switch, "", ns, &format!("{v4}/25,{v6}/64"));
            switch.exec("ip", &["link", "set", &port, "master", "br0"]);
        }
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        for (ns, v4, v6) in [
            (&a1, "198.51.100.1", "2001:db8:a::1"),
            (&b1, "198.51.100.129", "2001:db8:b::1"),
            (&b2, "198.51.100.129", "2001:db8:b::1"),
        ] {
            ns.exec("ip", &["route", "add", "default", "via", v4]);
            ns.exec("ip", &["-6", "route", "add", "default", "via", v6]);
        }
        let pins = Pins::in_netns(&gw);
        for (iface, role) in [(&gw_a, role_a), (&gw_b, role_b)] {
            let out = pins.xdpgate(&["attach", "--hook", "xdp", "--iface", iface, "--role", role]);
            assert!(out.contains("attached"), "{out}");
        }
        let policy = PolicyFile(std::env::temp_dir().join(format!("{}.yaml", unique("eastwest"))));
        std::fs::write(&policy.0, POLICY).expect("write policy");
        let out = pins.xdpgate(&["apply", policy.0.to_str().unwrap()]);
        assert!(out.contains("applied"), "apply printed: {out}");

        let echo = [(Host::A1, &a1), (Host::B1, &b1), (Host::B2, &b2)]
            .into_iter()
            .map(|(host, ns)| {
                let addrs = host
                    .ports()
                    .iter()
                    .flat_map(|p| {
                        [SocketAddr::new(host.ip(false), *p), SocketAddr::new(host.ip(true), *p)]
                    })
                    .collect();
                EchoServer::start(ns, addrs)
            })
            .collect();
        Self { _echo: echo, pins, a1, _gw: gw, _switch: switch, b1, b2, policy }
    }

    fn ns(&self, host: Host) -> &Netns {
        match host {
            Host::A1 => &self.a1,
            Host::B1 => &self.b1,
            Host::B2 => &self.b2,
        }
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.pins.xdpgate(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("xdpgate {args:?}: {e}: {out}"))
    }

    /// Packets dropped with reason `policy`.
    fn policy_drops(&self) -> u64 {
        let stats = self.json(&["stats", "--json"]);
        stats["drops"]["policy"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no policy drop counter: {stats}"))
    }

    /// The hit counter of every rule of the running policy.
    fn hits(&self) -> Vec<(Rule, u64)> {
        let stats = self.json(&["stats", "--json"]);
        let rules = stats["policy"]["rules"].as_array().unwrap_or_else(|| panic!("{stats}"));
        CASES
            .iter()
            .flat_map(Case::counted)
            .map(|r| {
                let n = rules
                    .iter()
                    .find(|h| h["nsg"] == r.0 && h["rule"] == r.1 && h["direction"] == r.2)
                    .and_then(|h| h["flows"].as_u64())
                    .unwrap_or_else(|| panic!("no counter for {r:?} in {stats}"));
                (r, n)
            })
            .collect()
    }
}

/// A connection's outcome: the stream (kept open so its flow stays) or why there is none.
fn connect(ns: &Netns, to: SocketAddr, allowed: bool) -> io::Result<TcpStream> {
    let wait = if allowed { PASS_WAIT } else { DROP_WAIT };
    let mut s = ns.run(move || TcpStream::connect_timeout(&to, wait))?;
    if allowed {
        // Data both ways: the flow carries traffic, not just a handshake.
        s.set_read_timeout(Some(PASS_WAIT))?;
        s.write_all(b"east-west")?;
        let mut back = [0u8; 9];
        s.read_exact(&mut back)?;
        if &back != b"east-west" {
            return Err(io::Error::other("echo differs from what was sent"));
        }
    }
    Ok(s)
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// `xdpgate verify-flow --json` for `case`, asked from the source's end (`outbound`) or the
/// destination's (`inbound`), of the kernel or of `policy` compiled.
fn verify(lab: &Lab, case: &Case, v6: bool, from_source: bool, policy: Option<&str>) -> Output {
    let src = endpoint(case.from.ip(v6), 40000);
    let dst = endpoint(case.to.ip(v6), case.port);
    let (direction, local, remote) =
        if from_source { ("outbound", &src, &dst) } else { ("inbound", &dst, &src) };
    let mut args = vec![
        "verify-flow",
        "--json",
        "--direction",
        direction,
        "--protocol",
        "tcp",
        "--local",
        local,
        "--remote",
        remote,
    ];
    if let Some(p) = policy {
        args.extend(["--policy", p]);
    }
    lab.pins.try_xdpgate(&args)
}

/// `allowed` and the hits of a verify-flow JSON answer, in one line.
fn summary(v: &serde_json::Value) -> String {
    let hits: Vec<String> = v["decided_by"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let s = |k: &str| h[k].as_str().unwrap_or("?").to_string();
            format!("{}/{} ({})", s("nsg"), s("rule"), s("direction"))
        })
        .collect();
    format!("allowed: {}, decided_by: [{}]", v["allowed"], hits.join(", "))
}

/// What is wrong with a verify-flow answer, if anything.
fn check_verdict(case: &Case, out: &Output) -> Option<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Some(format!(
            "exit status {:?}, not JSON: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    let want = if case.allowed { 0 } else { 1 };
    if out.status.code() != Some(want) || v["allowed"] != case.allowed {
        return Some(format!("exit status {:?}, want {want}; {}", out.status.code(), summary(&v)));
    }
    let hits = v["decided_by"].as_array().cloned().unwrap_or_default();
    let named = |r: &Rule| {
        hits.iter().any(|h| h["nsg"] == r.0 && h["rule"] == r.1 && h["direction"] == r.2)
    };
    let missing: Vec<_> = case.decided_by.iter().filter(|r| !named(r)).collect();
    if !missing.is_empty() {
        return Some(format!("lacks {missing:?}; {}", summary(&v)));
    }
    None
}

/// Runs every case over one family, subnet A's interface attached as `role_a` and subnet
/// B's as `role_b`; returns what went wrong.
fn run_family(lab: &Lab, v6: bool, role_a: &str, role_b: &str) -> Vec<String> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let mut failures = Vec::new();
    let (drops_before, hits_before) = (lab.policy_drops(), lab.hits());

    // All the cases at once: the denied ones all wait out DROP_WAIT together.
    let outcomes: Vec<io::Result<TcpStream>> = std::thread::scope(|scope| {
        let tries: Vec<_> = CASES
            .iter()
            .map(|c| {
                let ns = lab.ns(c.from);
                let to = SocketAddr::new(c.to.ip(v6), c.port);
                scope.spawn(move || connect(ns, to, c.allowed))
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (case, outcome) in CASES.iter().zip(&outcomes) {
        let what = format!("{family} {}", case.what);
        match (case.allowed, outcome) {
            (true, Ok(_)) => {}
            (true, Err(e)) => failures.push(format!("{what}: the connection failed: {e}")),
            (false, Ok(_)) => {
                failures.push(format!("{what}: connected; the SYN should be dropped"))
            }
            (false, Err(e)) if e.kind() == io::ErrorKind::TimedOut => {}
            (false, Err(e)) => {
                failures.push(format!("{what}: {e} (want a timeout: a silent drop)"))
            }
        }
    }

    // Every denied SYN is a policy drop, and each case's own rules counted it.
    let denied = CASES.iter().filter(|c| !c.allowed).count() as u64;
    let dropped = lab.policy_drops() - drops_before;
    if dropped < denied {
        failures.push(format!("{family}: {dropped} policy drops for {denied} denied connections"));
    }
    let hits_after = lab.hits();
    for case in CASES {
        for rule in case.counted() {
            let count = |hits: &[(Rule, u64)]| hits.iter().find(|(r, _)| *r == rule).unwrap().1;
            if count(&hits_after) <= count(&hits_before) {
                failures.push(format!(
                    "{family} {}: the hit counter of {}/{} ({}) did not grow ({})",
                    case.what,
                    rule.0,
                    rule.1,
                    rule.2,
                    count(&hits_after)
                ));
            }
        }
    }

    // The flow entry of an allowed connection names the deciding rule of each side, and
    // its direction label is the role of the interface its first packet arrived on.
    for (case, outcome) in CASES.iter().zip(&outcomes) {
        let (Some(sides), Ok(stream)) = (case.flow, outcome) else { continue };
        let local = stream.local_addr().unwrap();
        let flows = lab.json(&["flows", "--json", "--top", "0", "--addr", &local.ip().to_string()]);
        let flow = flows.as_array().and_then(|fs| {
            fs.iter().find(|f| {
                f["src"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(local.ip())
                    && f["src_port"] == local.port()
                    && f["dst"].as_str().and_then(|s| s.parse::<IpAddr>().ok())
                        == Some(case.to.ip(v6))
                    && f["dst_port"] == case.port
            })
        });
        let Some(flow) = flow else {
            failures.push(format!("{family} {}: no flow from {local} in {flows}", case.what));
            continue;
        };
        for (nsg, rule, side) in sides {
            let named = &flow["rules"][side];
            if named["nsg"] != nsg || named["rule"] != rule {
                failures.push(format!(
                    "{family} {}: the flow's {side} rule is not {nsg}/{rule}: {flow}",
                    case.what
                ));
            }
        }
        let arrival = if case.from == Host::A1 { role_a } else { role_b };
        let label = if arrival == "internal" { "outbound" } else { "inbound" };
        if flow["direction"] != label {
            failures.push(format!(
                "{family} {}: arrived on an {arrival} interface, the flow says {}",
                case.what, flow["direction"]
            ));
        }
    }
    drop(outcomes);

    // verify-flow agrees with the kernel, asked from either end, of the kernel's tables and
    // of the policy file.
    let file = lab.policy.0.to_str().unwrap();
    for case in CASES {
        for from_source in [true, false] {
            for policy in [None, Some(file)] {
                let out = verify(lab, case, v6, from_source, policy);
                if let Some(why) = check_verdict(case, &out) {
                    failures.push(format!(
                        "{family} {}: verify-flow --direction {}{}: {why}",
                        case.what,
                        if from_source { "outbound" } else { "inbound" },
                        if policy.is_some() { " --policy FILE" } else { "" },
                    ));
                }
            }
        }
    }
    failures
}

/// The table of cases, IPv4 then IPv6, with the gateway's interface facing subnet A attached
/// as `role_a` and the one facing subnet B as `role_b`.
fn east_west(role_a: &str, role_b: &str) {
    let started = Instant::now();
    let lab = Lab::new(role_a, role_b);
    let mut failures = run_family(&lab, false, role_a, role_b);
    failures.extend(run_family(&lab, true, role_a, role_b));
    assert!(
        failures.is_empty(),
        "subnet A's interface {role_a}, subnet B's {role_b}: {} failures:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    eprintln!("east-west, A {role_a}, B {role_b}: {:?}", started.elapsed());
}

#[test]
fn both_interfaces_internal() {
    east_west("internal", "internal");
}

#[test]
fn both_interfaces_external() {
    east_west("external", "external");
}

#[test]
fn subnet_a_internal_subnet_b_external() {
    east_west("internal", "external");
}

#[test]
fn subnet_a_external_subnet_b_internal() {
    east_west("external", "internal");
}
