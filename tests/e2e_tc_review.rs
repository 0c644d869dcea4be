//! Review regressions of the tc attach mode: where `--hook tc` must behave as `--hook xdp`
//! (and the kernel's own forwarding) does.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::gateway::{CLIENT4, Gateway};

/// The protected subnet reaches the Internet through 192.0.2.100: its packets are forwarded
/// by xdpgate itself (a translated flow), not handed to the stack.
const NAT_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

/// Echo replies `ping` got from the server namespace to the client.
fn ping_from_server(net: &Gateway, args: &[&str]) -> (usize, String) {
    let args = [args, &["-c", "3", "-i", "0.3", "-W", "1", CLIENT4]].concat();
    let out = net.server.try_exec("ping", &args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let replies = text.lines().filter(|l| l.contains("bytes from")).count();
    (replies, text)
}

/// A route MTU the FIB enforces on forwarded packets (a locked one: `bpf_fib_lookup` honours
/// it, as the stack's forwarding does) holds for translated flows forwarded at tc as at XDP:
/// a DF packet longer than the route's MTU is not sent over it (the stack drops it and
/// answers "fragmentation needed"). The tc hook used to give the FIB no length, so only the
/// device MTU was checked, and never for a GSO aggregate.
fn route_mtu_holds(net: Gateway) {
    net.apply("nat.yaml", NAT_POLICY);
    let (replies, text) = ping_from_server(&net, &["-s", "56"]);
    assert!(replies > 0, "the translated path works for short packets:\n{text}");
    net.gw.exec(
        "ip",
        &["route", "replace", "203.0.113.0/24", "dev", &net.ext, "mtu", "lock", "1280"],
    );
    // 1428 bytes of IP with DF set, over a route of 1280.
    let (replies, text) = ping_from_server(&net, &["-M", "do", "-s", "1400"]);
    assert_eq!(replies, 0, "DF packets longer than the route MTU crossed it:\n{text}");
    // Shorter than the route MTU they still go.
    let (replies, text) = ping_from_server(&net, &["-M", "do", "-s", "1200"]);
    assert!(replies > 0, "packets within the route MTU must pass:\n{text}");
}

#[test]
fn tc_route_mtu_holds_for_forwarded_packets() {
    route_mtu_holds(Gateway::tc());
}

/// The same at XDP: what the tc hook must match.
#[test]
fn xdp_route_mtu_holds_for_forwarded_packets() {
    let net = Gateway::new();
    // An XDP redirect into a veth needs NAPI (GRO) on its peer to be received there.
    for ns in [&net.client, &net.server] {
        let links = String::from_utf8_lossy(&ns.exec("ip", &["-o", "link"]).stdout).into_owned();
        for name in links.lines().filter_map(|l| l.split(": ").nth(1)) {
            let name = name.split('@').next().unwrap();
            if name != "lo" {
                ns.exec("ethtool", &["-K", name, "gro", "on"]);
            }
        }
    }
    route_mtu_holds(net);
}

/// The interfaces of `ns` other than lo.
fn links(ns: &common::Netns) -> Vec<String> {
    let out = String::from_utf8_lossy(&ns.exec("ip", &["-o", "link"]).stdout).into_owned();
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// The same for GSO aggregates (a TSO sender's segments of 1448 bytes arrive at the gateway
/// as one socket buffer): their segments are longer than the route's MTU, so they must not
/// be sent over it either (the stack's forwarding checks each segment's length:
/// `skb_gso_validate_network_len`). The tc hook redirected them whatever the route said.
/// The gateway's interface towards the client segments what it sends (no TSO), so the
/// client sees the segments' lengths; aggregates of shorter segments (after path-MTU
/// discovery) may cross.
#[test]
fn tc_route_mtu_holds_for_gso_aggregates() {
    let net = Gateway::tc();
    net.apply("nat.yaml", NAT_POLICY);
    net.gw.exec(
        "ip",
        &["route", "replace", "203.0.113.0/24", "dev", &net.ext, "mtu", "lock", "1280"],
    );
    net.gw.exec("ethtool", &["-K", &net.ext, "tso", "off", "gso", "off"]);
    let listener: TcpListener =
        net.client.run(|| TcpListener::bind((CLIENT4, 5001)).expect("bind"));
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    // Anything over 1280 bytes of IP (+ 14 of Ethernet) arriving at the client.
    let iface = links(&net.client).pop().expect("client interface");
    let mut dump = common::KillOnDrop::new(
        Command::new("ip")
            .args(["netns", "exec", &net.client.name, "timeout", "8", "tcpdump", "-i", &iface])
            .args(["-n", "-c", "1", "ip and greater 1300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump"),
    );
    // Capture only once tcpdump says it listens.
    let mut err = BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(err.read_line(&mut line).expect("tcpdump stderr") > 0, "tcpdump did not start");
    }
    net.server.run(|| {
        let mut s = TcpStream::connect((CLIENT4, 5001)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = dump.wait_with_output().expect("tcpdump");
    let _ = reader.join();
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(seen.trim().is_empty(), "packets longer than the route MTU crossed it:\n{seen}");
}

/// An L3 device (tun here; WireGuard, ipip and GRE alike) has no Ethernet header: its
/// packets start at the IP header, which the parser would read as Ethernet (the EtherType
/// being the source address's first two bytes) and pass as non-IP, so the NSG would judge
/// none of them while `attach` said it was attached (seen: SYNs from a tun to a port the
/// NSG denies reached the server, with either hook). Refused, for either hook, leaving
/// nothing attached.
#[test]
fn attach_refuses_a_device_without_ethernet_header() {
    let ns = common::Netns::new("l3dev");
    ns.exec("ip", &["tuntap", "add", "mode", "tun", "name", "tun0"]);
    ns.exec("ip", &["link", "set", "tun0", "up"]);
    let pins = common::Pins::in_netns(&ns);
    for hook in [&["--hook", "tc"][..], &["--hook", "xdp", "--mode", "skb"]] {
        let args = [&["attach", "--iface", "tun0", "--role", "external"][..], hook].concat();
        let out = pins.try_xdpgate(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "attach {hook:?} to a tun device succeeded:\n{text}");
        assert!(text.contains("not an Ethernet interface"), "{text}");
        assert!(!pins.dir.link("tun0").exists(), "a link was pinned");
        let link = String::from_utf8_lossy(&ns.exec("ip", &["-d", "link", "show", "tun0"]).stdout)
            .into_owned();
        assert!(!link.contains("xdp"), "an XDP program stayed on tun0:\n{link}");
    }
    // Nothing at tcx either (ingress or egress).
    let tc = ns.try_exec("tc", &["filter", "show", "dev", "tun0", "ingress"]);
    let tcx = ns.try_exec("bpftool", &["net", "show", "dev", "tun0"]);
    let shown =
        String::from_utf8_lossy(&tc.stdout).into_owned() + &String::from_utf8_lossy(&tcx.stdout);
    assert!(!shown.contains("xdpgate"), "a program stayed on tun0:\n{shown}");
}

/// The gateway's own ICMP errors about a translated flow reach the private host, as
/// nftables' NAT delivers them (checked by hand on the same topology): "fragmentation
/// needed" for a DF packet too long for the route (path-MTU discovery through the
/// gateway's own hop) and "time exceeded" for TTL 1 (traceroute's first hop). Seen failing
/// at XDP and tc before TCDP's 851c636: the NAT rewrite was done before the TTL and MTU
/// sent the packet to the stack, whose error then went to the public address.
#[test]
fn tc_snat_host_gets_the_gateways_own_icmp_errors() {
    let net = Gateway::tc();
    net.apply("nat.yaml", NAT_POLICY);
    net.gw.exec(
        "ip",
        &["route", "replace", "203.0.113.0/24", "dev", &net.ext, "mtu", "lock", "1280"],
    );
    let (_, text) = ping_from_server(&net, &["-M", "do", "-s", "1400"]);
    assert!(text.contains("Frag needed"), "no fragmentation-needed error came back:\n{text}");
    let (_, text) = ping_from_server(&net, &["-t", "1"]);
    assert!(text.contains("Time to live exceeded"), "no time-exceeded came back:\n{text}");
}

/// A node file's `hook: tc` for an interface already attached with XDP (by hand, or under
/// an earlier node file: the agent attaches only interfaces without a link) is not in force:
/// the agent says so (`status`: failing "node file") rather than leaving the operator to
/// believe it is. It used to say nothing.
#[test]
fn agent_reports_an_interface_on_another_hook_than_its_node_file() {
    let node = XdpNode::with_agent("nh", ", hook: tc");
    let failing = node.agent_status_until(|agent| {
        let failing = agent["failing"].to_string();
        failing.contains("node file says hook: tc").then_some(failing)
    });
    let vb = &node.iface;
    assert!(
        failing.contains(&format!("{vb} is attached with hook xdp, the node file says hook: tc")),
        "the agent did not report the hook mismatch; failing: {failing}"
    );
    // Left as it was: switching would leave the interface unfiltered for a moment.
    common::assert_ingress_hook(&node.pins, &node.netns, vb, "xdp");
}

/// A node file that names no hook leaves an interface attached before the per-driver
/// default (XDP on a veth) as it is, and reports nothing: only a hook the node file names is
/// held against the running one.
#[test]
fn agent_keeps_an_earlier_hook_when_the_node_file_names_none() {
    let node = XdpNode::with_agent("nn", "");
    // The agent writes its state once its first pass over the node file is done.
    let agent = node.agent_status_until(|agent| (agent["running"] == true).then(|| agent.clone()));
    assert!(!agent["failing"].to_string().contains("hook"), "reported: {agent}");
    common::assert_ingress_hook(&node.pins, &node.netns, &node.iface, "xdp");
}

/// A node whose interface was attached with XDP by hand, then an agent started with a node
/// file naming that interface (`hook` is the rest of its entry, e.g. ", hook: tc").
/// Fields drop in order: the agent before its pins and namespaces.
struct XdpNode {
    _agent: common::agent::NodeAgent,
    pins: common::Pins,
    iface: String,
    netns: common::Netns,
    _peer: common::Netns,
}

impl XdpNode {
    fn with_agent(tag: &str, hook: &str) -> Self {
        let peer = common::Netns::new(&format!("{tag}a"));
        let netns = common::Netns::new(&format!("{tag}b"));
        let (_, iface) = common::veth(&peer, "198.51.100.1/24", &netns, "198.51.100.2/24");
        let pins = common::Pins::in_netns(&netns);
        pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &iface, "--role", "internal"]);
        let agent = common::agent::NodeAgent::start(
            &netns,
            &pins,
            "virtual_network:\n  address_space: [198.51.100.0/24]\n",
            &format!("interfaces:\n  - {{name: {iface}, role: internal{hook}}}\n"),
        );
        Self { _agent: agent, pins, iface, netns, _peer: peer }
    }

    /// Polls `status --json` until `found` returns something for its "agent" object.
    fn agent_status_until<T>(&self, found: impl Fn(&serde_json::Value) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.pins.xdpgate(&["status", "--json"]);
            let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
            if let Some(t) = found(&status["agent"]) {
                return t;
            }
            assert!(Instant::now() < deadline, "not seen in 20 s; status: {status}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Recreates `name` in `b` as a new veth to `a` (a container's veth after a restart: same
/// name, a new device).
fn recreate(a: &common::Netns, b: &common::Netns, name: &str) {
    b.exec("ip", &["link", "del", name]);
    common::run(
        "ip",
        &[
            "link", "add", name, "netns", &b.name, "type", "veth", "peer", "name", "p0", "netns",
            &a.name,
        ],
    );
    b.exec("ip", &["link", "set", name, "up"]);
}

/// An attached device deleted and created again under its name (a veth of a restarted
/// container: the tc hook's very case) is attached again: by `attach`, and by the agent for
/// a node-file interface. Its old links, detached by the kernel with the old device, used
/// to stay pinned: `attach` refused ("already attached ... with --hook tc") and the agent
/// saw nothing missing, so the new device ran unfiltered.
#[test]
fn recreated_device_is_attached_again() {
    let a = common::Netns::new("rca");
    let b = common::Netns::new("rcb");
    b.exec("ip", &["link", "add", "gw0", "type", "veth", "peer", "name", "p0", "netns", &a.name]);
    b.exec("ip", &["link", "set", "gw0", "up"]);
    let pins = common::Pins::in_netns(&b);
    let attach = ["attach", "--iface", "gw0", "--role", "internal", "--hook", "tc"];
    pins.xdpgate(&attach);
    recreate(&a, &b, "gw0");
    let out = pins.try_xdpgate(&attach);
    assert!(
        out.status.success(),
        "attach of the recreated device refused:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_ingress_hook(&pins, &b, "gw0", "tc");

    // The agent, for a node-file interface.
    recreate(&a, &b, "gw0");
    let _agent = common::agent::NodeAgent::start(
        &b,
        &pins,
        "virtual_network:\n  address_space: [198.51.100.0/24]\n",
        "interfaces:\n  - {name: gw0, role: internal, hook: tc}\n",
    );
    let ifindex = || {
        let out = pins.xdpgate(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
        status["interfaces"].as_array().and_then(|all| {
            all.iter().find(|i| i["interface"] == "gw0").map(|i| i["ifindex"].clone())
        })
    };
    // Until status shows the link on a live device (or the agent had its time).
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = |shown: &Option<serde_json::Value>| {
        shown.as_ref().and_then(serde_json::Value::as_u64).is_some_and(|i| i != 0)
    };
    let mut shown = ifindex();
    while !live(&shown) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        shown = ifindex();
    }
    assert!(live(&shown), "the agent did not attach the recreated gw0: status ifindex {shown:?}");
    common::assert_ingress_hook(&pins, &b, "gw0", "tc");
}

/// `upgrade` with one attached device deleted upgrades the others and says it skipped that
/// one. It used to fail half way ("replacing the egress program on g2: Link has been
/// severed"), after replacing g1's egress program but not its ingress one.
#[test]
fn upgrade_skips_a_deleted_device() {
    let a = common::Netns::new("uga");
    let b = common::Netns::new("ugb");
    for (g, p) in [("g1", "p1"), ("g2", "p2")] {
        b.exec("ip", &["link", "add", g, "type", "veth", "peer", "name", p, "netns", &a.name]);
        b.exec("ip", &["link", "set", g, "up"]);
    }
    let pins = common::Pins::in_netns(&b);
    pins.xdpgate(&["attach", "--iface", "g1", "--role", "internal", "--hook", "tc"]);
    pins.xdpgate(&["attach", "--iface", "g2", "--role", "external", "--hook", "tc"]);
    let ids = || {
        let out = pins.xdpgate(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
        let g1 = status["interfaces"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["interface"] == "g1").cloned())
            .expect("g1 in status");
        (g1["program_id"].as_u64(), g1["egress_program_id"].as_u64())
    };
    let before = ids();
    b.exec("ip", &["link", "del", "g2"]);
    let out = pins.try_xdpgate(&["upgrade"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "upgrade failed:\n{text}");
    assert!(text.contains("upgraded g1") && text.contains("skipped g2"), "{text}");
    let after = ids();
    assert!(
        after.0 != before.0 && after.1 != before.1,
        "g1's programs not both replaced: {before:?} -> {after:?}"
    );
    common::assert_ingress_hook(&pins, &b, "g1", "tc");
}

/// Devices of two network namespaces with one ifindex cannot share a dataplane, which tells
/// interfaces apart by ifindex: the second attach is refused, naming the first, which keeps
/// its role and its registration (seen failing: the second took its role over, and its
/// detach unregistered it; a NAT gateway's internal interface let private sources out
/// untranslated).
#[test]
fn a_device_of_another_namespace_with_the_same_ifindex_is_refused() {
    let a = common::Netns::new("ixa");
    let b = common::Netns::new("ixb");
    let peer = common::Netns::new("ixp");
    a.exec("ip", &["link", "add", "x0", "type", "veth", "peer", "name", "p0", "netns", &peer.name]);
    b.exec("ip", &["link", "add", "y0", "type", "veth", "peer", "name", "q0", "netns", &peer.name]);
    let ifindex = |ns: &common::Netns, dev: &str| -> u64 {
        let out = ns.exec("ip", &["-j", "link", "show", "dev", dev]);
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip json");
        links[0]["ifindex"].as_u64().expect("ifindex")
    };
    assert_eq!(ifindex(&a, "x0"), ifindex(&b, "y0"), "the first device of a new namespace");
    for (ns, dev) in [(&a, "x0"), (&b, "y0")] {
        ns.exec("ip", &["link", "set", dev, "up"]);
    }
    let mut pins = common::Pins::in_netns(&a);
    pins.xdpgate(&["attach", "--iface", "x0", "--role", "internal"]);
    pins.netns = Some(b.name.clone());
    let out = pins.try_xdpgate(&["attach", "--iface", "y0", "--role", "external"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("as x0 has"), "{err}");
    let out = pins.try_xdpgate(&["detach", "--iface", "y0"]);
    assert!(!out.status.success(), "y0 was never attached");
    pins.netns = Some(a.name.clone());
    let status: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["status", "--json"])).expect("status json");
    let x0 = status["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["interface"] == "x0").cloned());
    assert_eq!(x0.as_ref().map(|i| i["role"].clone()), Some("internal".into()), "{status}");
    let map = pins.dir.path().join("IFACES");
    let out = common::run("bpftool", &["-j", "map", "dump", "pinned", map.to_str().unwrap()]);
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "IFACES: {entries}");
}

/// Each recreation of an attached device attached again keeps one registration (one of the
/// 63 interface slots): the deleted device's is forgotten, a live one's is kept. They used to
/// pile up, one per restart of the container, until `attach` failed with every slot in use.
#[test]
fn recreated_device_does_not_leak_interface_slots() {
    let a = common::Netns::new("lka");
    let b = common::Netns::new("lkb");
    for g in ["keep0", "gw0"] {
        let p = format!("p{g}");
        b.exec("ip", &["link", "add", g, "type", "veth", "peer", "name", &p, "netns", &a.name]);
        b.exec("ip", &["link", "set", g, "up"]);
    }
    let pins = common::Pins::in_netns(&b);
    pins.xdpgate(&["attach", "--iface", "keep0", "--role", "external", "--hook", "tc"]);
    let attach = ["attach", "--iface", "gw0", "--role", "internal", "--hook", "tc"];
    pins.xdpgate(&attach);
    for _ in 0..3 {
        recreate(&a, &b, "gw0");
        pins.xdpgate(&attach);
    }
    let map = pins.dir.path().join("IFACES");
    let out = common::run("bpftool", &["-j", "map", "dump", "pinned", map.to_str().unwrap()]);
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(entries.as_array().map(Vec::len), Some(2), "IFACES: {entries}");
    let status: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["status", "--json"])).expect("status json");
    let role = |name: &str| {
        status["interfaces"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["interface"] == name).map(|i| i["role"].clone()))
    };
    assert_eq!(role("keep0"), Some("external".into()), "{status}");
    assert_eq!(role("gw0"), Some("internal".into()), "{status}");
    // Deleted and then detached (not attached again): its slot is freed too (seen failing:
    // kept, one per device, until every slot was in use).
    b.exec("ip", &["link", "del", "gw0"]);
    pins.xdpgate(&["detach", "--iface", "gw0"]);
    let out = common::run("bpftool", &["-j", "map", "dump", "pinned", map.to_str().unwrap()]);
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "IFACES: {entries}");
}
