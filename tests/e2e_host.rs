//! Host mode end to end, as a VM's NIC NSG would be used: xdpgate attached (role external)
//! to the host's own interface, an "internet" namespace on the other end of a veth, and a
//! host NSG that allows only SSH inbound and denies TCP 25 outbound. The host's own traffic
//! leaves through the tc egress program, which judges it with the outbound rules and records
//! its flows, so the answers arriving at XDP match statefully.
//!
//! Also: forwarded packets through a gateway are left to XDP; `upgrade` adds the egress
//! program where an older build attached none, and `detach` removes both programs; a
//! connection open before the attach carries on; headers outside the socket buffer's linear
//! area are pulled in; a SYN-ACK whose embryo is gone makes no flow; the host's flows pass
//! while a set change is unfinished (every packet judged again).

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use common::{
    Netns, Pins,
    echo::EchoServer,
    gateway::{CLIENT4, CLIENT6, Gateway, SERVER4, SERVER6},
    packet::{L4, SYN, frame_vlan},
    send_frame, veth,
};
use serde_json::Value;

/// How long to wait for what the policy should drop, and for what should get through.
const DROP_WAIT: Duration = Duration::from_millis(1500);
const PASS_WAIT: Duration = Duration::from_secs(5);

const HOST4: &str = "198.51.100.10";
const HOST6: &str = "2001:db8:1::10";
const NET4: &str = "203.0.113.20";
const NET6: &str = "2001:db8:2::20";

const POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: host-nsg
    hosts: [198.51.100.10, 2001:db8:1::10]
    rules:
      - {name: allow-ssh, priority: 100, direction: inbound, access: allow, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [22]}
      - {name: deny-smtp-out, priority: 100, direction: outbound, access: deny, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [25]}
"#;

/// A TCP service that counts the connections it accepts and answers each with an HTTP
/// response, then closes.
struct Server {
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, addrs: Vec<SocketAddr>) -> Self {
        // Sockets belong to the namespace they are created in, whichever thread uses them.
        let listeners: Vec<TcpListener> = ns.run(move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("{a}: {e}")))
                .collect()
        });
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for l in &listeners {
                    if let Ok((mut s, _)) = l.accept() {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { accepted, stop, thread: Some(thread) }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Packets the egress program judged on `iface` (passed and dropped), and the packets XDP
/// redirected there.
fn egress_judged(s: &Value, iface: &str) -> u64 {
    egress(s, iface, "pass") + egress(s, iface, "drop")
}

/// The programs on the tcx egress hook of `ifname` in `ns`, by name.
fn tcx_egress(ns: &Netns, ifname: &str) -> Vec<String> {
    let ifname = ifname.to_string();
    ns.run(move || {
        use aya::programs::{SchedClassifier, TcAttachType};
        let (_, progs) = SchedClassifier::query_tcx(&ifname, TcAttachType::Egress).unwrap();
        progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect()
    })
}

/// An HTTP GET from namespace `ns` to `to`: the response, or why there is none.
fn http_get(ns: &Netns, to: SocketAddr, wait: Duration) -> Result<String, String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, wait).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(wait)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").map_err(|e| format!("send: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
        Ok(out)
    })
}

fn connects(ns: &Netns, to: SocketAddr, wait: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&to, wait).is_ok())
}

fn stats(pins: &Pins) -> Value {
    serde_json::from_str(&pins.xdpgate(&["stats", "--json"])).expect("stats json")
}

fn drops(s: &Value, reason: &str) -> u64 {
    s["drops"][reason]["packets"].as_u64().unwrap()
}

fn rule_hits(s: &Value, rule: &str) -> u64 {
    s["policy"]["rules"].as_array().unwrap().iter().find(|r| r["rule"] == rule).unwrap()["flows"]
        .as_u64()
        .unwrap()
}

/// The egress program's count of the host's own packets with `verdict` on `iface`.
fn egress(s: &Value, iface: &str, verdict: &str) -> u64 {
    let i = s["interfaces"].as_array().unwrap().iter().find(|i| i["interface"] == iface).unwrap();
    i["egress"][verdict]["packets"].as_u64().unwrap()
}

struct Lab {
    // Field order is drop order: detach (needs the namespace) before the namespaces go.
    pins: Pins,
    host: Netns,
    net: Netns,
    /// The host's interface, and the internet's end of the link.
    iface: String,
    inet_if: String,
    /// The internet's web server (80) and mail server (25).
    web: Server,
    mail: Server,
    /// The host's own listeners: SSH (22), and a web server (80) the policy keeps closed.
    host_ssh: Server,
    host_web: Server,
}

impl Lab {
    fn new() -> Self {
        let host = Netns::new("xghh");
        let net = Netns::new("xghi");
        let (iface, inet_if) =
            veth(&host, &format!("{HOST4}/24,{HOST6}/64"), &net, &format!("{NET4}/24,{NET6}/64"));
        // One link, two networks: each side reaches the other's directly.
        host.exec("ip", &["route", "add", "203.0.113.0/24", "dev", &iface]);
        host.exec("ip", &["-6", "route", "add", "2001:db8:2::/64", "dev", &iface]);
        net.exec("ip", &["route", "add", "198.51.100.0/24", "dev", &inet_if]);
        net.exec("ip", &["-6", "route", "add", "2001:db8:1::/64", "dev", &inet_if]);
        let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
        let web = Server::start(&net, vec![sa(NET4, 80), sa(NET6, 80)]);
        let mail = Server::start(&net, vec![sa(NET4, 25), sa(NET6, 25)]);
        let host_ssh = Server::start(&host, vec![sa(HOST4, 22), sa(HOST6, 22)]);
        let host_web = Server::start(&host, vec![sa(HOST4, 80), sa(HOST6, 80)]);
        // Counts the segments to port 25 that reach the internet's stack.
        net.exec("nft", &["add", "table", "inet", "xgh"]);
        let hook = "{ type filter hook input priority 0; }";
        net.exec("nft", &["add", "chain", "inet", "xgh", "input", hook]);
        net.exec("nft", &["add", "rule", "inet", "xgh", "input", "tcp", "dport", "25", "counter"]);
        let pins = Pins::in_netns(&host);
        Self { host, net, pins, iface, inet_if, web, mail, host_ssh, host_web }
    }

    /// Segments to TCP port 25 that reached the internet namespace.
    fn smtp_segments(&self) -> u64 {
        let out = self.net.exec("nft", &["list", "chain", "inet", "xgh", "input"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let n = text.split("counter packets ").nth(1).and_then(|r| r.split(' ').next());
        n.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no nft counter: {text}"))
    }

    fn attach_and_apply(&self) {
        self.attach_and_apply_with(&[]);
    }

    fn attach_and_apply_with(&self, extra: &[&str]) {
        let args =
            [&["attach", "--hook", "xdp", "--iface", &self.iface, "--role", "external"][..], extra]
                .concat();
        self.pins.xdpgate(&args);
        self.pins.apply(POLICY);
    }
}

/// The scenario for one family: `host` and `net` are the two ends' addresses.
fn host_mode(lab: &Lab, host: &str, net: &str) {
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);

    // The host's own HTTP GET to the internet: its SYN makes the flow, the answers match it.
    let got = http_get(&lab.host, sa(net, 80), PASS_WAIT);
    assert!(
        got.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.0 200") && r.ends_with("hello")),
        "the host's own HTTP GET to {net} failed: {got:?}\n{}",
        lab.pins.xdpgate(&["stats"])
    );

    // Its ping: the echo replies match the flow its request made.
    let out = lab.host.try_exec("ping", &["-c", "1", "-W", "2", net]);
    assert!(
        out.status.success(),
        "the host's ping to {net}: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // SSH into the host is allowed; its web server is not reachable from outside.
    assert!(connects(&lab.net, sa(host, 22), PASS_WAIT), "SSH to {host} refused");
    assert!(!connects(&lab.net, sa(host, 80), DROP_WAIT), "TCP 80 to {host} got through");
    assert_eq!(lab.host_web.accepted(), 0, "TCP 80 to {host} got through");

    // Its connection to port 25 is blocked by the outbound rule: the SYN never leaves.
    let before = stats(&lab.pins);
    assert!(!connects(&lab.host, sa(net, 25), DROP_WAIT), "the host reached {net}:25");
    let after = stats(&lab.pins);
    assert_eq!(lab.smtp_segments(), 0, "a SYN to {net}:25 reached the internet");
    assert_eq!(lab.mail.accepted(), 0);
    assert!(
        rule_hits(&after, "deny-smtp-out") > rule_hits(&before, "deny-smtp-out"),
        "deny-smtp-out not counted: {after}"
    );
    assert!(drops(&after, "policy") > drops(&before, "policy"), "{after}");
    assert!(
        egress(&after, &lab.iface, "drop") > egress(&before, &lab.iface, "drop"),
        "no egress drop counted: {after}"
    );
    assert!(egress(&after, &lab.iface, "pass") > 0, "{after}");
    assert!(lab.web.accepted() > 0 && lab.host_ssh.accepted() > 0);

    // verify-flow, asked of the kernel, agrees with what the host's traffic met.
    let endpoint = |a: &str, p: u16| sa(a, p).to_string();
    for (direction, local, remote, allowed, rule) in [
        ("outbound", endpoint(host, 40000), endpoint(net, 25), false, "deny-smtp-out"),
        ("outbound", endpoint(host, 40000), endpoint(net, 80), true, "AllowInternetOutBound"),
        ("inbound", endpoint(host, 22), endpoint(net, 40000), true, "allow-ssh"),
        ("inbound", endpoint(host, 80), endpoint(net, 40000), false, "DenyAllInBound"),
    ] {
        let args = ["verify-flow", "--json", "--direction", direction, "--protocol", "tcp"];
        let out =
            lab.pins.try_xdpgate(&[&args[..], &["--local", &local, "--remote", &remote]].concat());
        let v: Value = serde_json::from_slice(&out.stdout).expect("verify-flow json");
        let rules: Vec<&str> =
            v["decided_by"].as_array().unwrap().iter().filter_map(|h| h["rule"].as_str()).collect();
        assert_eq!(
            (out.status.code(), v["allowed"].as_bool(), rules.last().copied()),
            (Some(i32::from(!allowed)), Some(allowed), Some(rule)),
            "verify-flow {direction} {local} {remote}: {v}"
        );
    }

    // Both programs are there, as status shows them.
    let status: Value =
        serde_json::from_str(&lab.pins.xdpgate(&["status", "--json"])).expect("status json");
    let iface = &status["interfaces"][0];
    assert!(iface["egress_program_id"].as_u64().is_some(), "{status}");
}

/// `apply` in host mode names this host's addresses that no NSG covers and that reach it
/// unfiltered through the attached interface, its automatic IPv6 link-local one above all
/// (an outside review connected a neighbour to a denied port through it, unsaid); listed
/// under the NSG's `hosts`, it is covered and no longer named.
#[test]
fn apply_names_the_hosts_addresses_no_nsg_covers() {
    let lab = Lab::new();
    lab.pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &lab.iface, "--role", "external"]);
    let out =
        lab.host.exec("ip", &["-6", "-o", "addr", "show", "dev", &lab.iface, "scope", "link"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let link_local = text
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address on {}: {text}", lab.iface))
        .to_string();
    let apply = |policy: &str| {
        let file = std::env::temp_dir().join(format!("xgh-cover-{}.yaml", std::process::id()));
        std::fs::write(&file, policy).unwrap();
        let out = lab.pins.try_xdpgate(&["apply", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = apply(POLICY);
    let named = format!("this host's {link_local}: packets to it");
    assert!(
        said.contains(&format!("warning: {} is in host mode", lab.iface)) && said.contains(&named),
        "{said}"
    );
    let covered = POLICY.replace("2001:db8:1::10]", &format!("2001:db8:1::10, \"{link_local}\"]"));
    let said = apply(&covered);
    assert!(!said.contains("host mode"), "{said}");
}

/// Without `--netns`, run from another namespace that has an interface of the attached
/// one's name (another device), `apply` says nothing of that namespace's addresses (seen
/// failing after a second review: it named them as the host's).
#[test]
fn apply_elsewhere_names_no_other_namespaces_addresses() {
    let lab = Lab::new();
    lab.pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &lab.iface, "--role", "external"]);
    // The same name in the other namespace, at an index the host's device does not have.
    let peer = format!("{}p", lab.iface);
    let link = ["link", "add", "name", &lab.iface, "index", "4000", "type", "veth", "peer", "name"];
    lab.net.exec("ip", &[&link[..], &[peer.as_str()]].concat());
    lab.net.exec("ip", &["addr", "add", "198.51.100.10/32", "dev", &lab.iface]);
    lab.net.exec("ip", &["addr", "add", "192.0.2.99/32", "dev", &lab.iface]);
    let file = std::env::temp_dir().join(format!("xgh-elsewhere-{}.yaml", std::process::id()));
    std::fs::write(&file, POLICY).unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.net.name))
        .arg(common::xdpgate_bin())
        .args(["--pin-dir", lab.pins.dir.path().to_str().unwrap(), "apply"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("192.0.2.99") && !stderr.contains("host mode"), "{stderr}");
}

#[test]
fn host_protects_itself_ipv4() {
    let lab = Lab::new();
    lab.attach_and_apply();
    host_mode(&lab, HOST4, NET4);
}

#[test]
fn host_protects_itself_ipv6() {
    let lab = Lab::new();
    lab.attach_and_apply();
    host_mode(&lab, HOST6, NET6);
}

/// With the running generation marked changing, as an `xdpgate set` killed half-way leaves
/// it (`GENERATION_CHANGING`), every packet's flow is judged again, at XDP and at the egress
/// program, and each stage then takes the flow as judged: the host's own HTTP GET (its flow
/// made at egress, its answers at XDP) and ping work, and its SMTP stays blocked. (The
/// gateway's side is in `e2e_nsg`'s killed `set add`.) Seen failing with the egress stage's
/// `JUDGED` left out: the GET timed out, its packets sent round between the two stages.
#[test]
fn the_hosts_own_flows_pass_while_a_set_change_is_unfinished() {
    use aya::maps::Array;
    use xdpgate_common::{
        maps::POLICY_CONFIG,
        nsg::{GENERATION_CHANGING, PolicyConfig},
    };
    let lab = Lab::new();
    lab.attach_and_apply();
    let (slot, config) = xdpgate_dataplane::apply::active(&lab.pins.dir).unwrap();
    let mut configs: Array<_, PolicyConfig> =
        lab.pins.dir.open_map(POLICY_CONFIG).unwrap().try_into().unwrap();
    let changing = PolicyConfig { generation: config.generation | GENERATION_CHANGING, ..config };
    configs.set(slot, changing, 0).unwrap();
    assert!(xdpgate_dataplane::apply::changing(&lab.pins.dir).unwrap());
    host_mode(&lab, HOST4, NET4);
    host_mode(&lab, HOST6, NET6);
}

/// On a gateway, forwarded packets were judged by XDP where they arrived: the egress program
/// leaves them alone (`ingress_ifindex` is set on a forwarded socket buffer) and judges only
/// what the gateway itself sends.
#[test]
fn forwarded_packets_are_not_the_hosts_own() {
    let lab = Gateway::new();
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let _echo = EchoServer::start(&lab.server, vec![sa(SERVER4, 80), sa(SERVER6, 80)]);
    lab.pins.apply(
        r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [80]}
"#,
    );
    // Forwarded both ways: connections in, pings out; the kernel forwards them (XDP passes
    // them up, as it has no devmap route to the namespaces' veth peers).
    for server in [SERVER4, SERVER6] {
        let to = sa(server, 80);
        let echoed = lab.client.run(move || {
            let mut s = TcpStream::connect_timeout(&to, PASS_WAIT)?;
            s.set_read_timeout(Some(PASS_WAIT))?;
            s.write_all(b"hello")?;
            let mut back = [0u8; 5];
            s.read_exact(&mut back).map(|()| back)
        });
        assert!(echoed.is_ok_and(|b| &b == b"hello"), "TCP 80 to {server} through the gateway");
    }
    for client in [CLIENT4, CLIENT6] {
        let out = lab.server.try_exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", client]);
        assert!(out.status.success(), "the server's ping to {client} through the gateway");
    }
    let s = stats(&lab.pins);
    for iface in [&lab.ext, &lab.int] {
        assert_eq!(egress_judged(&s, iface), 0, "forwarded packets judged on egress: {s}");
    }
    // The gateway's own ping is its own: judged (no NSG for its address: allowed), and the
    // replies match its flow.
    let out = lab.gw.try_exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", CLIENT4]);
    assert!(out.status.success(), "the gateway's own ping");
    let s = stats(&lab.pins);
    assert!(egress(&s, &lab.ext, "pass") >= 2, "the gateway's own ping not judged: {s}");
    assert_eq!(egress(&s, &lab.int, "pass"), 0, "{s}");
}

/// An interface attached by a build without the egress program (its XDP link alone, as
/// unpinning the egress link leaves it): the host's own packets leave unjudged, status
/// says the program is missing, and `upgrade` adds it. A later upgrade replaces it in place,
/// and `detach` removes both programs.
#[test]
fn upgrade_adds_the_egress_program_and_detach_removes_both() {
    let lab = Lab::new();
    lab.attach_and_apply();
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let status = || -> Value {
        serde_json::from_str(&lab.pins.xdpgate(&["status", "--json"])).expect("status json")
    };
    let egress_ids = || {
        let s = status();
        let i = &s["interfaces"][0];
        (i["egress_link_id"].as_u64(), i["egress_program_id"].as_u64())
    };
    let tcx = || tcx_egress(&lab.host, &lab.iface);
    assert_eq!(tcx(), ["xdpgate_egress"]);

    std::fs::remove_file(lab.pins.dir.egress_link(&lab.iface)).unwrap();
    assert_eq!(egress_ids(), (None, None));
    assert!(tcx().is_empty(), "{:?}", tcx());
    assert!(lab.pins.xdpgate(&["status"]).contains("none (xdpgate upgrade adds it)"));
    // Without it the host's own packets leave unjudged: its SYN to port 25 reaches the
    // internet (the answer, judged at arrival by the outbound rules as the host's
    // connection's, is dropped).
    let sent = lab.smtp_segments();
    assert!(!connects(&lab.host, sa(NET4, 25), DROP_WAIT), "the host reached port 25");
    assert!(lab.smtp_segments() > sent, "without the egress program the SYN stays in");

    // From another network namespace the program cannot be attached: refused, nothing
    // changes.
    let xdp_prog = || status()["interfaces"][0]["program_id"].as_u64();
    let before = xdp_prog();
    let out = std::process::Command::new(common::xdpgate_bin())
        .arg("--pin-dir")
        .arg(lab.pins.dir.path())
        .arg("upgrade")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--netns"), "{err}");
    assert_eq!(xdp_prog(), before, "a refused upgrade replaced the XDP program");
    assert_eq!(egress_ids(), (None, None));

    let out = lab.pins.xdpgate(&["upgrade"]);
    assert!(out.contains(&format!("upgraded {} (egress program added)", lab.iface)), "{out}");
    let (link, prog) = egress_ids();
    assert!(link.is_some() && prog.is_some());
    let got = http_get(&lab.host, sa(NET4, 80), PASS_WAIT);
    assert!(got.is_ok(), "the host's own HTTP GET after upgrade: {got:?}");
    let sent = lab.smtp_segments();
    assert!(!connects(&lab.host, sa(NET4, 25), DROP_WAIT), "the host reached port 25");
    assert_eq!(lab.smtp_segments(), sent, "the egress program keeps the SYN to port 25 in");

    // In place: the same link runs the new program.
    let out = lab.pins.xdpgate(&["upgrade"]);
    assert!(out.contains(&format!("upgraded {}\n", lab.iface)), "{out}");
    let (link2, prog2) = egress_ids();
    assert_eq!(link2, link);
    assert_ne!(prog2, prog);

    lab.pins.xdpgate(&["detach", "--iface", &lab.iface]);
    assert!(!lab.pins.dir.egress_link(&lab.iface).exists());
    assert!(tcx().is_empty(), "{:?}", tcx());
}

/// A frame of the host's whose headers lie outside the socket buffer's linear area (a packet
/// socket puts only the Ethernet header there for a frame of a page or more): the egress
/// program pulls them in and judges the packet, rather than dropping it as malformed.
#[test]
fn headers_outside_the_linear_area_are_pulled_and_judged() {
    let lab = Lab::new();
    for (ns, ifname) in [(&lab.host, &lab.iface), (&lab.net, &lab.inet_if)] {
        ns.exec("ip", &["link", "set", ifname, "mtu", "9000"]);
    }
    let inet_mac = lab.net.mac(&lab.inet_if);
    // veth has no native XDP for this MTU: the refused attach leaves nothing behind, the
    // egress program included.
    let out = lab
        .pins
        .try_xdpgate(&["attach", "--hook", "xdp", "--iface", &lab.iface, "--role", "external"]);
    assert!(!out.status.success());
    assert!(tcx_egress(&lab.host, &lab.iface).is_empty());
    assert!(!lab.pins.dir.egress_link(&lab.iface).exists());
    assert!(lab.pins.xdpgate(&["status"]).contains("not attached to any interface"));
    lab.attach_and_apply_with(&["--mode", "skb"]);
    let sink = lab.net.run(|| UdpSocket::bind((NET4, 5000)).unwrap());
    sink.set_read_timeout(Some(PASS_WAIT)).unwrap();
    let payload = vec![7u8; 6000];

    // Allowed (AllowInternetOutBound): arrives whole.
    let before = stats(&lab.pins);
    let sent = send_frame(
        &lab.host,
        &lab.iface,
        inet_mac,
        frame_vlan(HOST4, NET4, L4::Udp(40000, 5000), &[], &payload),
    );
    assert!(sent.is_ok(), "{sent:?}: {}", lab.pins.xdpgate(&["stats"]));
    let mut buf = vec![0u8; 9000];
    let got = sink.recv_from(&mut buf).map(|(n, _)| n);
    let after = stats(&lab.pins);
    assert_eq!(got.ok(), Some(payload.len()), "the host's large datagram: {after}");
    assert_eq!(drops(&after, "malformed"), drops(&before, "malformed"));

    // Denied by deny-smtp-out: judged as a SYN to port 25, not as a malformed packet.
    let tcp = frame_vlan(HOST4, NET4, L4::Tcp(40001, 25, SYN), &[], &payload);
    // Dropped on its way out: the sender is told (ENOBUFS).
    let sent = send_frame(&lab.host, &lab.iface, inet_mac, tcp);
    assert!(sent.is_err(), "the denied frame was sent");
    let last = stats(&lab.pins);
    assert_eq!(rule_hits(&last, "deny-smtp-out"), rule_hits(&after, "deny-smtp-out") + 1, "{last}");
    assert_eq!(drops(&last, "policy"), drops(&after, "policy") + 1, "{last}");
    assert_eq!(drops(&last, "malformed"), drops(&before, "malformed"), "{last}");
    assert_eq!(lab.smtp_segments(), 0);
}

/// Entries of the flow tables (`EMBRYOS`, `FLOWS`) with TCP port `port` on either side.
fn flow_entries(pins: &Pins, map: &str, port: u16) -> Vec<xdpgate_common::flow::FlowKey> {
    use xdpgate_common::flow::{FlowKey, FlowValue};
    let table: aya::maps::HashMap<_, FlowKey, FlowValue> =
        pins.dir.open_map(map).unwrap().try_into().unwrap();
    table.keys().filter_map(Result::ok).filter(|k| k.sport == port || k.dport == port).collect()
}

/// A SYN-ACK the host sends for a SYN whose embryo is gone (a flood pushes embryos out)
/// makes no flow: a spoofer's blind ACK to its own spoofed SYN then confirms nothing.
#[test]
fn a_syn_ack_without_its_embryo_makes_no_flow() {
    use xdpgate_common::{flow::FlowKey, maps::EMBRYOS, maps::FLOWS};
    let lab = Lab::new();
    lab.attach_and_apply();
    // A spoofed source on the internet's side of the link: nobody there answers the host's
    // SYN-ACKs (a reset would end the embryo), so the host retransmits them.
    const SPOOF: &str = "203.0.113.99";
    const PORT: u16 = 40999;
    let hex = lab.net.mac(&lab.inet_if).map(|b| format!("{b:02x}")).join(":");
    lab.host.exec(
        "ip",
        &["neigh", "add", SPOOF, "lladdr", &hex, "dev", &lab.iface, "nud", "permanent"],
    );
    let host_mac = lab.host.mac(&lab.iface);
    let syn = frame_vlan(SPOOF, HOST4, L4::Tcp(PORT, 22, SYN), &[], &[]);
    send_frame(&lab.net, &lab.inet_if, host_mac, syn).unwrap();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + PASS_WAIT;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut embryos: aya::maps::HashMap<_, FlowKey, xdpgate_common::flow::FlowValue> =
        lab.pins.dir.open_map(EMBRYOS).unwrap().try_into().unwrap();
    // The SYN's one entry (`TCP_LONE`), the host's SYN-ACK counted in it.
    wait_for("the SYN's embryo and its SYN-ACK", &|| {
        let keys = flow_entries(&lab.pins, EMBRYOS, PORT);
        keys.len() == 1 && embryos.get(&keys[0], 0).is_ok_and(|v| v.answers().0 > 0)
    });
    // Pushed out, as by a flood, after the first SYN-ACK.
    let passed = egress(&stats(&lab.pins), &lab.iface, "pass");
    for key in flow_entries(&lab.pins, EMBRYOS, PORT) {
        embryos.remove(&key).unwrap();
    }
    // The kernel retransmits the SYN-ACK after a second.
    wait_for("the retransmitted SYN-ACK", &|| {
        egress(&stats(&lab.pins), &lab.iface, "pass") > passed
    });
    assert_eq!(flow_entries(&lab.pins, EMBRYOS, PORT), [], "a flow made from the SYN-ACK");
    // The spoofer's blind ACK: no flow to confirm, dropped.
    let before = drops(&stats(&lab.pins), "no_flow");
    let ack = frame_vlan(SPOOF, HOST4, L4::Tcp(PORT, 22, common::packet::ACK), &[], &[]);
    send_frame(&lab.net, &lab.inet_if, host_mac, ack).unwrap();
    wait_for("the blind ACK's drop", &|| drops(&stats(&lab.pins), "no_flow") > before);
    assert_eq!(flow_entries(&lab.pins, FLOWS, PORT), []);
    assert_eq!(flow_entries(&lab.pins, EMBRYOS, PORT), []);
}

/// A connection the host opened before the attach carries on: the host's next segment has
/// no flow, and starts one mid-stream (its socket vouches for it) that the outbound rules
/// allow and the peer's answer confirms.
#[test]
fn the_hosts_connection_from_before_the_attach_carries_on() {
    use xdpgate_common::maps::FLOWS;
    let lab = Lab::new();
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let _echo = EchoServer::start(&lab.net, vec![sa(NET4, 8080), sa(NET6, 8080)]);
    let exchange = |s: &mut TcpStream, what: &[u8]| -> std::io::Result<Vec<u8>> {
        s.set_read_timeout(Some(PASS_WAIT))?;
        s.write_all(what)?;
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).map(|()| back)
    };
    let mut conns: Vec<TcpStream> = [NET4, NET6]
        .into_iter()
        .map(|a| {
            let to = sa(a, 8080);
            lab.host.run(move || TcpStream::connect_timeout(&to, PASS_WAIT).expect("connect"))
        })
        .collect();
    for s in &mut conns {
        assert_eq!(exchange(s, b"before").unwrap(), b"before");
    }
    lab.attach_and_apply();
    for s in &mut conns {
        let got = exchange(s, b"after the attach");
        assert!(
            got.as_deref().is_ok_and(|b| b == b"after the attach"),
            "{:?}: {got:?}\n{}",
            s.peer_addr(),
            lab.pins.xdpgate(&["stats"])
        );
    }
    // Both picked up, and confirmed: two entries each in the established table.
    assert_eq!(stats(&lab.pins)["flow_table"]["picked_up"], 2);
    assert_eq!(flow_entries(&lab.pins, FLOWS, 8080).len(), 4);
}

/// The agent, killed and its files removed on drop (even when the test fails).
struct FlowLogAgent {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for FlowLogAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The host's own flows reach the flow log as any flow does: its HTTP GET as a `begin` line
/// (outbound, decided on the source side by the host NSG), its SYN to port 25 as a `deny`
/// line naming deny-smtp-out on that side.
#[test]
fn the_hosts_own_flows_are_in_the_flow_log() {
    let lab = Lab::new();
    lab.pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &lab.iface, "--role", "external"]);
    let dir = std::env::temp_dir().join(common::unique("xghlog"));
    std::fs::create_dir_all(&dir).unwrap();
    let (policy, log) = (dir.join("policy.yaml"), dir.join("flows.jsonl"));
    std::fs::write(&policy, POLICY).unwrap();
    let child =
        lab.pins.agent(&policy).arg("--flow-log").arg(&log).spawn().expect("spawn xdpgate run");
    let _agent = FlowLogAgent { child, dir };
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let lines = || -> Vec<Value> {
        common::whole_lines(&log)
            .iter()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    };
    let find = |ls: &[Value], state: &str, dport: u64| {
        ls.iter()
            .find(|l| l["state"] == state && l["dst_port"] == dport && l["src"] == HOST4)
            .cloned()
    };
    // Until the agent has applied its policy, nothing is enforced.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while {
        let out = lab.pins.try_xdpgate(&["status", "--json"]);
        let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        st["policy"]["generation"].as_u64().unwrap_or(0) == 0
    } {
        assert!(std::time::Instant::now() < deadline, "the agent applied no policy");
        std::thread::sleep(Duration::from_millis(50));
    }
    let smtp = lab.smtp_segments();
    // The host's traffic, again until both lines are there (the agent opens its flow log
    // as it starts).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (begin, deny) = loop {
        let _ = http_get(&lab.host, sa(NET4, 80), PASS_WAIT);
        let _ = connects(&lab.host, sa(NET4, 25), DROP_WAIT);
        let ls = lines();
        if let (Some(b), Some(d)) = (find(&ls, "begin", 80), find(&ls, "deny", 25)) {
            break (b, d);
        }
        assert!(std::time::Instant::now() < deadline, "flow log lines missing: {ls:#?}");
    };
    assert_eq!(
        (begin["direction"].as_str(), begin["decision"].as_str(), begin["dst"].as_str()),
        (Some("outbound"), Some("allow"), Some(NET4)),
        "{begin}"
    );
    assert_eq!(begin["rules"]["outbound"]["nsg"], "host-nsg", "{begin}");
    assert_eq!(begin["rules"]["inbound"], Value::Null, "{begin}");
    assert_eq!(
        (deny["rule"].as_str(), deny["decision"].as_str()),
        (Some("deny-smtp-out"), Some("deny")),
        "{deny}"
    );
    assert_eq!(deny["rules"]["outbound"]["rule"], "deny-smtp-out", "{deny}");
    assert_eq!(lab.smtp_segments(), smtp, "a SYN to {NET4}:25 reached the internet");
}

/// Sends `bytes` from namespace `ns` to the echo service at `to` and reads them back: the
/// bytes that came back, or why not.
fn echo_exchange(ns: &Netns, to: SocketAddr, bytes: usize) -> Result<usize, String> {
    ns.run(move || {
        let s = TcpStream::connect_timeout(&to, PASS_WAIT).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(PASS_WAIT)).unwrap();
        s.set_write_timeout(Some(PASS_WAIT)).unwrap();
        let mut reader = s.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < bytes {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        let chunk = vec![7u8; 256 * 1024];
        let mut writer = &s;
        for _ in 0..bytes / chunk.len() {
            writer.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
        }
        Ok(back.join().unwrap())
    })
}

/// BIG TCP (a device's GSO size above 64 KiB, kernel 6.3+ for IPv4): the host's stack hands
/// its egress hook aggregates longer than an IP length field can say, with the length 0 (an
/// IPv6 payload length of 0 likewise). They are the host's own, judged by their flow like any
/// other, not dropped as malformed. (Before: `malformed` drops, and the host's upload stalled.)
#[test]
fn the_hosts_big_tcp_aggregates_pass() {
    let lab = Lab::new();
    let size = "196608";
    // (Debian 12's `ip` cannot set `gso_ipv4_max_size`, so IPv4 aggregates stay at 64 KiB.)
    lab.host.exec("ip", &["link", "set", "dev", &lab.iface, "gso_max_size", size]);
    lab.attach_and_apply();
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let _echo = EchoServer::start(&lab.net, vec![sa(NET4, 7), sa(NET6, 7)]);
    let bytes = 16 << 20;
    for net in [NET4, NET6] {
        let before = stats(&lab.pins);
        let got = echo_exchange(&lab.host, sa(net, 7), bytes);
        let after = stats(&lab.pins);
        let malformed = drops(&after, "malformed") - drops(&before, "malformed");
        assert_eq!(
            (got, malformed),
            (Ok(bytes), 0),
            "{} MiB to {net}:7 and back; bytes back, and malformed drops",
            bytes >> 20
        );
        // The aggregates were big: more bytes than 64 KiB per packet on average would be
        // impossible otherwise, so check the counters saw some.
        let i =
            after["interfaces"].as_array().unwrap().iter().find(|i| i["interface"] == lab.iface);
        let pass = &i.unwrap()["egress"]["pass"];
        let (packets, b) = (pass["packets"].as_u64(), pass["bytes"].as_u64());
        println!("{net}: egress passed {packets:?} packets, {b:?} bytes in all");
    }
}

/// The host's NSG with a deny of the named set `blocked` (empty at first) before an allow
/// of TCP 7000 inbound.
const CUT_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
sets:
  blocked: []
nsgs:
  - name: host-nsg
    hosts: [198.51.100.10, 2001:db8:1::10]
    rules:
      - {name: deny-blocked, priority: 100, direction: inbound, access: deny, protocol: "*", source: blocked, destination: "*", destination_ports: "*"}
      - {name: allow-7000, priority: 110, direction: inbound, access: allow, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [7000]}
"#;

/// A TCP connection from namespace `client` to a listener of namespace `server` at `to`:
/// its two ends (client, server), and the listener, kept (whether the host listens decides
/// how its segments without a flow are judged).
fn connection(
    client: &Netns,
    server: &Netns,
    to: SocketAddr,
) -> (TcpStream, TcpStream, TcpListener) {
    let listener = server.run(move || TcpListener::bind(to).expect("bind"));
    let client = client.run(move || TcpStream::connect_timeout(&to, PASS_WAIT).expect("connect"));
    let (server, _) = listener.accept().expect("accept");
    (client, server, listener)
}

/// Whether `what`, written to `from`, reaches `to` within `wait`.
fn says(from: &mut TcpStream, to: &mut TcpStream, what: &[u8], wait: Duration) -> bool {
    to.set_read_timeout(Some(wait)).unwrap();
    from.write_all(what).unwrap();
    let mut got = vec![0u8; what.len()];
    to.read_exact(&mut got).is_ok_and(|()| got == what)
}

/// A connection the host accepted (its peer opened it, the inbound rules allowed it) keeps
/// the inbound rules as its judge when its flow is gone and the host sends next: with the
/// flow merely deleted, the host's segment passes and the peer's answer makes the flow again,
/// by the allow rule; once a set change denies the peer, the cut holds both ways. (Judged as
/// a new outbound flow, the host's next segment made one, by `AllowInternetOutBound`, and
/// the denied peer's segments passed as its answers: seen failing before the fix, the host's
/// segment reached the denied peer in both families.)
#[test]
fn an_accepted_connection_cut_by_a_deny_stays_cut_when_the_host_sends() {
    accepted_connection_cut("xdp");
}

#[test]
fn an_accepted_connection_cut_by_a_deny_stays_cut_when_the_host_sends_at_tc() {
    accepted_connection_cut("tc");
}

fn accepted_connection_cut(hook: &str) {
    let lab = Lab::new();
    let args = ["attach", "--hook", hook, "--iface", &lab.iface, "--role", "external"];
    lab.pins.xdpgate(&args);
    lab.pins.apply(CUT_POLICY);
    let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    for (host, net) in [(HOST4, NET4), (HOST6, NET6)] {
        let to = sa(host, 7000);
        let (mut client, mut server, _listener) = connection(&lab.net, &lab.host, to);
        assert!(says(&mut client, &mut server, b"hello", PASS_WAIT), "{net} to {to}");
        assert!(says(&mut server, &mut client, b"welcome", PASS_WAIT), "{to} to {net}");

        // Its flow gone, the host speaks first, its peer muted: the host's segment alone
        // makes the flow again, the inbound rule's (so that errors about its segments, a
        // router's "fragmentation needed", pass as the flow's; seen failing while it
        // passed without a flow).
        lab.pins.xdpgate(&["flows", "delete", "--addr", net]);
        lab.net.exec("nft", &["add", "table", "inet", "xgmute"]);
        let hook = "{ type filter hook output priority 0; }";
        lab.net.exec("nft", &["add", "chain", "inet", "xgmute", "out", hook]);
        lab.net
            .exec("nft", &["add", "rule", "inet", "xgmute", "out", "tcp", "dport", "7000", "drop"]);
        server.write_all(b"still here").unwrap();
        let flows = |lab: &Lab| lab.pins.xdpgate(&["flows", "--addr", net]);
        let start = std::time::Instant::now();
        while !flows(&lab).contains("allow-7000") {
            assert!(
                start.elapsed() < PASS_WAIT,
                "no flow made by the host's segment:\n{}",
                flows(&lab)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!flows(&lab).contains("AllowInternetOutBound"), "{}", flows(&lab));
        lab.net.exec("nft", &["delete", "table", "inet", "xgmute"]);
        let mut got = [0u8; 10];
        client.set_read_timeout(Some(PASS_WAIT)).unwrap();
        client.read_exact(&mut got).expect("the host's segment after its flow was deleted");
        assert_eq!(&got, b"still here");
        assert!(says(&mut client, &mut server, b"me too", PASS_WAIT), "{net} to {to}");

        // The peer denied: the host's next segment does not bring the connection back.
        let before = stats(&lab.pins);
        lab.pins.xdpgate(&["set", "add", "blocked", net]);
        assert!(
            !says(&mut server, &mut client, b"cut?", DROP_WAIT),
            "{to} reached the denied {net}\n{}",
            lab.pins.xdpgate(&["flows", "--addr", net])
        );
        assert!(!says(&mut client, &mut server, b"cut!", DROP_WAIT), "{net} reached {to}");
        let after = stats(&lab.pins);
        assert!(
            rule_hits(&after, "deny-blocked") > rule_hits(&before, "deny-blocked"),
            "deny-blocked not counted: {after}"
        );
        assert!(
            egress(&after, &lab.iface, "drop") > egress(&before, &lab.iface, "drop"),
            "the host's segments were not dropped at egress: {after}"
        );
    }
}

/// A connection the host opened whose flow is gone (idled out, or deleted): when the peer
/// speaks first, its segment is judged as the host's SYN was, by the outbound rules, and
/// the connection carries on both ways, at XDP and at tc, both families. (Judged inbound,
/// to the host's ephemeral port, it was denied by `DenyAllInBound`: seen failing, nothing
/// reached the host.)
#[test]
fn the_hosts_own_connection_carries_on_when_the_peer_speaks_first_after_its_flow_went() {
    for hook in ["xdp", "tc"] {
        let lab = Lab::new();
        let args = ["attach", "--hook", hook, "--iface", &lab.iface, "--role", "external"];
        lab.pins.xdpgate(&args);
        lab.pins.apply(POLICY);
        let sa = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
        for net in [NET4, NET6] {
            let to = sa(net, 7100);
            let (mut client, mut server, _listener) = connection(&lab.host, &lab.net, to);
            assert!(says(&mut client, &mut server, b"hello", PASS_WAIT), "{hook}: to {to}");
            lab.pins.xdpgate(&["flows", "delete", "--addr", net]);
            assert!(
                says(&mut server, &mut client, b"news", PASS_WAIT),
                "{hook}: {to} speaking first after the flow went\n{}",
                lab.pins.xdpgate(&["stats"])
            );
            assert!(says(&mut client, &mut server, b"thanks", PASS_WAIT), "{hook}: to {to}");
            let flows = lab.pins.xdpgate(&["flows", "--addr", net]);
            assert!(flows.contains("AllowInternetOutBound"), "{hook}: {flows}");
        }
    }
}
