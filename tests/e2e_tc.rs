//! The tc attach mode end to end (`xdpgate attach --hook tc`): the ingress pipeline at tc
//! ingress (tcx) of veth gateways, with the offloads XDP forwarding breaks left on (TSO and
//! checksum offload on the hosts, GRO on the gateway): the NSG filter, the NAT gateway and
//! the load balancer carry multi-megabyte TCP transfers byte-exact; `status` shows the
//! hook, `detach` removes it, `upgrade` keeps the flows, the agent's node file attaches with
//! `hook: tc`, and one interface never gets both hooks.
//!
//! Topologies from tests/common: `Gateway::tc()` (client -- [gw] -- server, IPv4 and IPv6)
//! and `Lan::with_hook(3, "tc")` (client -- [gw] -- bridge of backends).

mod common;

use std::{
    collections::HashSet,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::{
    Netns, Pins,
    echo::EchoServer,
    gateway::{CLIENT4, Gateway, SERVER4, SERVER6},
    lan::{Lan, backend_addr},
    veth,
};

/// Long enough for a transfer of several MB on a loaded 2-core VM, short enough that a
/// broken path fails the test rather than hanging it.
const IO_WAIT: Duration = Duration::from_secs(20);

/// NSG: web (80) allowed from the Internet, SSH (22) denied.
const NSG_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [80]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
"#;

/// The protected subnet reaches the Internet through 192.0.2.100 (routed to the gateway:
/// the client's default route is the gateway).
const NAT_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

/// Frontend 192.0.2.10:80 to three backends on 8080, no probe (always healthy: no agent
/// needed).
const LB_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 8080}
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: web, backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: web}
"#;

/// `len` deterministic bytes from `seed` (xorshift): a lost, repeated, reordered or
/// corrupted stretch shows in a comparison.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// What one connection carried: the peer as the server saw it, and whether the upload
/// arrived exactly.
struct Served {
    peer: SocketAddr,
    upload_exact: bool,
}

/// A transfer service on `addrs` in `ns`: each connection uploads `up` bytes of
/// `pattern(up, 1)`, then gets `greeting` and `pattern(down, 2)` back, then EOF. Stops
/// listening on drop (a listener left open would keep its namespace alive).
struct Transfers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    served: std::sync::mpsc::Receiver<Served>,
}

impl Transfers {
    fn start(ns: &Netns, addrs: Vec<SocketAddr>, greeting: &str, up: usize, down: usize) -> Self {
        let listeners: Vec<TcpListener> = ns.run(move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("{a}: {e}")))
                .collect()
        });
        let (tx, served) = std::sync::mpsc::channel();
        let reply = Arc::new([greeting.as_bytes(), &pattern(down, 2)].concat());
        let expect = Arc::new(pattern(up, 1));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (tx, reply, expect, stop) =
                    (tx.clone(), reply.clone(), expect.clone(), stop.clone());
                l.set_nonblocking(true).unwrap();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut conn = match l.accept() {
                            Ok((conn, _)) => conn,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                            Err(e) => panic!("accept: {e}"),
                        };
                        let (tx, reply, expect) = (tx.clone(), reply.clone(), expect.clone());
                        thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(IO_WAIT));
                            let _ = conn.set_write_timeout(Some(IO_WAIT));
                            let mut got = vec![0u8; expect.len()];
                            let upload_exact = conn.read_exact(&mut got).is_ok() && got == *expect;
                            let peer = conn.peer_addr().expect("peer");
                            // Reported before the answer: once the client has it all, the
                            // report is there to read.
                            let _ = tx.send(Served { peer, upload_exact });
                            let _ = conn.write_all(&reply);
                            let _ = conn.shutdown(Shutdown::Write);
                        });
                    }
                })
            })
            .collect();
        Self { stop, threads, served }
    }

    /// The next connection served.
    fn next(&self) -> Served {
        self.served.recv_timeout(IO_WAIT).expect("no connection was served")
    }
}

impl Drop for Transfers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// From `ns`, connects to `to`, uploads `pattern(up, 1)` and reads everything back; returns
/// what came back, or the error that cut it short.
fn transfer(ns: &Netns, to: SocketAddr, up: usize) -> io::Result<Vec<u8>> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(IO_WAIT))?;
        s.set_write_timeout(Some(IO_WAIT))?;
        let upload = pattern(up, 1);
        // Read while writing: the server answers only after the whole upload, but a
        // short-sighted client could still fill both windows.
        let mut reader = s.try_clone()?;
        let read = thread::spawn(move || {
            let mut back = Vec::new();
            reader.read_to_end(&mut back).map(|_| back)
        });
        s.write_all(&upload)?;
        read.join().expect("reader")
    })
}

/// Asserts that `back` is `greeting` then `pattern(down, 2)`.
fn assert_download(back: &[u8], greeting: &str, down: usize, what: &str) {
    assert!(back.starts_with(greeting.as_bytes()), "{what}: wrong greeting");
    let rest = &back[greeting.len()..];
    assert_eq!(rest.len(), down, "{what}: {} of {down} bytes arrived", rest.len());
    assert!(rest == pattern(down, 2), "{what}: the download differs from what was sent");
}

fn json(pins: &Pins, args: &[&str]) -> serde_json::Value {
    let out = pins.xdpgate(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// The `stats --json` entry of interface `iface`.
fn iface_stats(stats: &serde_json::Value, iface: &str) -> serde_json::Value {
    stats["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["interface"] == iface))
        .unwrap_or_else(|| panic!("{iface} missing from stats: {stats}"))
        .clone()
}

/// Packets and bytes of `verdict` on one interface of `stats --json`.
fn verdict(iface: &serde_json::Value, verdict: &str) -> (u64, u64) {
    let v = &iface["verdicts"][verdict];
    (v["packets"].as_u64().unwrap_or(0), v["bytes"].as_u64().unwrap_or(0))
}

/// The flows counted for rule `rule` of NSG `nsg` (stats' rule hits).
fn rule_hits(stats: &serde_json::Value, nsg: &str, rule: &str) -> u64 {
    stats["policy"]["rules"]
        .as_array()
        .and_then(|all| all.iter().find(|h| h["nsg"] == nsg && h["rule"] == rule))
        .and_then(|h| h["flows"].as_u64())
        .unwrap_or_else(|| panic!("no counter for {nsg}/{rule}: {stats}"))
}

/// The gateway interface's setting `feature` as `ethtool -k` shows it (`on`, `off`).
fn offload(ns: &Netns, iface: &str, feature: &str) -> String {
    let out = String::from_utf8_lossy(&ns.exec("ethtool", &["-k", iface]).stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{feature}: ")))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("{iface}: no {feature} in ethtool -k: {out}"))
}

/// Waits until `ok` holds (each call reads the state it checks), at most `limit`.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tc_filter_passes_allowed_transfers_exactly_and_drops_denied_ports() {
    let net = Gateway::tc();
    for iface in [&net.ext, &net.int] {
        // The case XDP forwarding breaks: segmentation offload on, GRO on at the gateway.
        assert_eq!(offload(&net.gw, iface, "tcp-segmentation-offload"), "on", "{iface}");
        assert_eq!(offload(&net.gw, iface, "generic-receive-offload"), "on", "{iface}");
    }
    net.apply("nsg.yaml", NSG_POLICY);
    const UP: usize = 2 << 20;
    const DOWN: usize = 6 << 20;
    let addrs = [SERVER4, SERVER6].iter().flat_map(|ip| [sock(ip, 80), sock(ip, 22)]).collect();
    let server = Transfers::start(&net.server, addrs, "web\n", UP, DOWN);
    let before = json(&net.pins, &["stats", "--json"]);

    for ip in [SERVER4, SERVER6] {
        let back = transfer(&net.client, sock(ip, 80), UP)
            .unwrap_or_else(|e| panic!("allow-web to {ip}: {e}"));
        assert_download(&back, "web\n", DOWN, &format!("allow-web to {ip}"));
        let served = server.next();
        assert!(served.upload_exact, "allow-web to {ip}: the upload differs from what was sent");
    }

    // The server listens on 22 too: only the policy can stop these.
    for ip in [SERVER4, SERVER6] {
        let to = sock(ip, 22);
        let tried = net.client.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)));
        match tried {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            other => panic!("deny-ssh to {ip}: want a timeout (SYN dropped), got {other:?}"),
        }
    }

    let after = json(&net.pins, &["stats", "--json"]);
    let ext = iface_stats(&after, &net.ext);
    let drops = verdict(&ext, "drop").0 - verdict(&iface_stats(&before, &net.ext), "drop").0;
    // One SYN per family at least (retransmitted SYNs are dropped too).
    assert!(drops >= 2, "{} drop verdicts on {}: {ext}", drops, net.ext);
    assert!(rule_hits(&after, "web", "deny-ssh") >= 2, "{after}");
    assert!(rule_hits(&after, "web", "allow-web") >= 2, "{after}");
    // The programs ran on GRO aggregates: more bytes per packet than one frame holds.
    let (packets, bytes) = verdict(&iface_stats(&after, &net.int), "pass");
    assert!(
        packets > 0 && bytes / packets > 1514,
        "{packets} packets, {bytes} bytes on {}",
        net.int
    );
    eprintln!(
        "tc filter: {} bytes per packet passed on {} (GRO aggregates)",
        bytes / packets,
        net.int
    );
}

#[test]
fn tc_nat_gateway_translates_a_download_exactly() {
    let net = Gateway::tc();
    net.apply("nat.yaml", NAT_POLICY);
    // The "internet" host is the topology's client; the protected host its server.
    const UP: usize = 1 << 20;
    const DOWN: usize = 8 << 20;
    let internet = Transfers::start(&net.client, vec![sock(CLIENT4, 8080)], "", UP, DOWN);
    for round in 0..2 {
        let back = transfer(&net.server, sock(CLIENT4, 8080), UP)
            .unwrap_or_else(|e| panic!("download {round} through NAT: {e}"));
        assert_download(&back, "", DOWN, &format!("download {round} through NAT"));
        let served = internet.next();
        assert!(served.upload_exact, "upload {round} through NAT differs");
        assert_eq!(
            served.peer.ip().to_string(),
            "192.0.2.100",
            "the internet saw the pool address"
        );
        assert!(served.peer.port() >= 1024, "{}", served.peer);
    }
    let nat = json(&net.pins, &["nat", "--json"]);
    assert!(nat[0]["addresses"][0]["ports_in_use"].as_u64().unwrap() >= 1, "ports in use: {nat}");
}

#[test]
fn tc_load_balancer_spreads_connections_and_carries_them_exactly() {
    let lan = Lan::with_hook(3, "tc");
    lan.pins.apply(LB_POLICY);
    const UP: usize = 256 << 10;
    const DOWN: usize = 2 << 20;
    let backends: Vec<Transfers> = (0..3)
        .map(|i| {
            let addr = sock(&backend_addr(i), 8080);
            Transfers::start(&lan.backends[i], vec![addr], &format!("b{}\n", i + 1), UP, DOWN)
        })
        .collect();
    // Twelve connections, and more until each backend has had one: the source ports are the
    // kernel's choice, so twelve alone miss a backend about once in 40 runs (3 * (2/3)^12);
    // sixty miss one about once in 10^10.
    let mut seen = Vec::new();
    let all = HashSet::from(["b1", "b2", "b3"]);
    while seen.len() < 12 || seen.iter().map(String::as_str).collect::<HashSet<_>>() != all {
        let n = seen.len();
        assert!(n < 60, "60 connections and a backend never chosen: {seen:?}");
        let back = transfer(&lan.client, sock("192.0.2.10", 80), UP)
            .unwrap_or_else(|e| panic!("connection {n} to the frontend: {e}"));
        let name = String::from_utf8_lossy(&back[..3]).into_owned();
        assert_download(&back, &name, DOWN, &format!("connection {n} (from {name})"));
        seen.push(name.trim().to_owned());
    }
    // Every connection was reported before its answer was sent: all of them are there.
    let mut reported = 0;
    for (i, b) in backends.iter().enumerate() {
        while let Ok(served) = b.served.try_recv() {
            assert!(served.upload_exact, "an upload to b{} differs", i + 1);
            assert_eq!(served.peer.ip().to_string(), CLIENT4, "DNAT only: the client's address");
            reported += 1;
        }
    }
    assert_eq!(reported, seen.len());
}

#[test]
fn tc_status_detach_and_one_hook_per_interface() {
    let net = Gateway::tc();
    let status = json(&net.pins, &["status", "--json"]);
    for i in status["interfaces"].as_array().unwrap() {
        assert!(i["egress_program_id"].as_u64().is_some(), "the egress program as with XDP: {i}");
    }
    let text = net.pins.xdpgate(&["status"]);
    let row = text.lines().find(|l| l.starts_with(net.ext.as_str())).expect("a row");
    assert_eq!(row.split_whitespace().nth(3), Some("tc"), "{text}");

    // From the host's namespace, status finds the tcx link's device in the gateway's.
    let host = Command::new(common::xdpgate_bin())
        .arg("--pin-dir")
        .arg(net.pins.dir.path())
        .args(["status", "--json"])
        .output()
        .expect("spawn xdpgate");
    let host: serde_json::Value = serde_json::from_slice(&host.stdout).expect("status json");
    for i in host["interfaces"].as_array().unwrap() {
        assert_eq!(
            (i["place"].as_str(), i["netns"].as_str()),
            (Some("netns"), Some(net.gw.name.as_str())),
            "{i}"
        );
        assert_eq!(
            (i["hook"].as_str(), i["program"].as_str()),
            (Some("tc"), Some("xdpgate_tc")),
            "{i}"
        );
    }

    // Every stage of the tc pipeline is linked, the entry itself too (it re-enters itself
    // once after pulling headers out of the skb's paged data).
    let pin = net.pins.dir.map(xdpgate_common::maps::TC_PIPELINE);
    let dump = common::run("bpftool", &["-j", "map", "dump", "pinned", pin.to_str().unwrap()]);
    let slots: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool json");
    // Without BTF bpftool gives keys as little-endian bytes in hex; only filled slots.
    let filled: Vec<u64> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes = e["key"].as_array().expect("key bytes");
            bytes.iter().rev().fold(0, |n, b| {
                n << 8
                    | u64::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
            })
        })
        .collect();
    assert_eq!(
        filled,
        (0..u64::from(xdpgate_common::maps::TC_STAGES)).collect::<Vec<_>>(),
        "{slots}"
    );

    // Another hook on an attached interface is refused, and nothing changes.
    for (args, why) in [
        (vec!["--hook", "xdp"], "already attached"),
        (vec!["--hook", "tc"], "already attached"),
        (vec![], "already attached"),
    ] {
        let out = net.pins.try_xdpgate(&[&["attach", "--iface", &net.ext][..], &args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why) && err.contains("--hook tc"), "{err}");
    }
    common::assert_ingress_hook(&net.pins, &net.gw, &net.ext, "tc");
    // --mode is XDP's: refused with --hook tc, before anything is loaded.
    let out =
        net.pins.try_xdpgate(&["attach", "--iface", &net.int, "--hook", "tc", "--mode", "skb"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("applies to XDP only"), "{err}");

    // Detach removes the tcx program from the device and the interface from status.
    let ext = net.ext.clone();
    let tcx = move || {
        use aya::programs::{SchedClassifier, tc::TcAttachType};
        let (_, progs) = SchedClassifier::query_tcx(&ext, TcAttachType::Ingress).expect("query");
        progs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect::<Vec<_>>()
    };
    let on_ext = net.gw.run(tcx.clone());
    assert_eq!(on_ext, ["xdpgate_tc"], "tcx ingress of {}", net.ext);
    net.pins.xdpgate(&["detach", "--iface", &net.ext]);
    let on_ext = net.gw.run(tcx);
    assert!(on_ext.is_empty(), "left at tcx ingress of {}: {on_ext:?}", net.ext);
    let status = json(&net.pins, &["status", "--json"]);
    let names: Vec<&str> = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["interface"].as_str().unwrap())
        .collect();
    assert_eq!(names, [net.int.as_str()], "{status}");

    // And the interface can be attached again, with either hook.
    net.pins.xdpgate(&["attach", "--iface", &net.ext, "--hook", "xdp"]);
    common::assert_ingress_hook(&net.pins, &net.gw, &net.ext, "xdp");
}

#[test]
fn tc_upgrade_keeps_flows() {
    let net = Gateway::tc();
    net.apply("nsg.yaml", NSG_POLICY);
    let _echo = EchoServer::start(&net.server, vec![sock(SERVER4, 80)]);
    let mut conn = net
        .client
        .run(|| TcpStream::connect_timeout(&sock(SERVER4, 80), Duration::from_secs(3)))
        .expect("connect");
    conn.set_read_timeout(Some(IO_WAIT)).unwrap();
    let echo = |conn: &mut TcpStream, len: usize| {
        let sent = pattern(len, 3);
        for chunk in sent.chunks(4096) {
            conn.write_all(chunk).unwrap();
            let mut back = vec![0u8; chunk.len()];
            conn.read_exact(&mut back).expect("echo");
            assert_eq!(back, chunk);
        }
    };
    echo(&mut conn, 1 << 20);
    let port = conn.local_addr().unwrap().port();
    let flow_packets = || {
        let flows = json(&net.pins, &["flows", "--json", "--top", "0", "--port", "80"]);
        flows
            .as_array()
            .and_then(|all| all.iter().find(|f| f["src_port"] == port))
            .map(|f| f["forward"]["packets"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no flow from port {port}: {flows}"))
    };
    let before = flow_packets();
    let programs = |status: &serde_json::Value| -> Vec<(String, u64, u64)> {
        status["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["hook"].as_str().unwrap().to_owned(),
                    i["program_id"].as_u64().unwrap(),
                    i["link_id"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let old = programs(&json(&net.pins, &["status", "--json"]));

    let out = net.pins.xdpgate(&["upgrade"]);
    assert!(out.contains(&format!("upgraded {}", net.ext)), "{out}");
    let new = programs(&json(&net.pins, &["status", "--json"]));
    for ((hook, old_prog, old_link), (new_hook, new_prog, new_link)) in old.iter().zip(&new) {
        assert_eq!((hook.as_str(), new_hook.as_str()), ("tc", "tc"));
        assert_ne!(old_prog, new_prog, "the program was replaced");
        assert_eq!(old_link, new_link, "in the same pinned link");
    }
    common::assert_ingress_hook(&net.pins, &net.gw, &net.ext, "tc");

    // The open connection goes on, in the same flow entry: a recreated one would count
    // only the few packets since.
    echo(&mut conn, 4096);
    let after = flow_packets();
    assert!(after > before, "the flow's count went from {before} to {after}: not the same flow");
}

/// The agent's node file attaches an interface at tc with `hook: tc`.
#[test]
fn tc_agent_attaches_node_file_interfaces_with_hook_tc() {
    let a = Netns::new("tca");
    let b = Netns::new("tcb");
    let (_, vb) = veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let pins = Pins::in_netns(&b);
    let _agent = common::agent::NodeAgent::start(
        &b,
        &pins,
        "virtual_network:\n  address_space: [198.51.100.0/24]\n",
        &format!("interfaces:\n  - {{name: {vb}, role: internal, hook: tc}}\n"),
    );
    wait_for("the agent to attach", Duration::from_secs(20), || {
        let status = json(&pins, &["status", "--json"]);
        status["interfaces"]
            .as_array()
            .is_some_and(|all| all.iter().any(|i| i["interface"] == vb.as_str()))
    });
    common::assert_ingress_hook(&pins, &b, &vb, "tc");
}

/// An XDP interface forwards NAT replies to a tc-attached one through the stack: only
/// XDP-attached interfaces are XDP redirect targets (the `EGRESS` devmap). The server's
/// interface runs no NAPI (GRO off, no XDP), so a frame XDP redirected into the gateway's
/// veth towards it would be dropped.
#[test]
fn an_xdp_interface_forwards_to_a_tc_interface_through_the_stack() {
    let net = Gateway::with_hooks("xdp", "tc");
    // The internet host sends through XDP, which rewrites in place: full checksums (as the
    // XDP tests do); the server's end has no NAPI.
    net.client.exec("ethtool", &["-K", &net.client_if, "tx", "off"]);
    net.server.exec("ethtool", &["-K", &net.server_if, "gro", "off"]);
    net.apply("nat.yaml", NAT_POLICY);
    const UP: usize = 64 << 10;
    const DOWN: usize = 2 << 20;
    let internet = Transfers::start(&net.client, vec![sock(CLIENT4, 8080)], "", UP, DOWN);
    let back = transfer(&net.server, sock(CLIENT4, 8080), UP)
        .unwrap_or_else(|e| panic!("download through NAT, XDP outside, tc inside: {e}"));
    assert_download(&back, "", DOWN, "download through NAT, XDP outside, tc inside");
    let served = internet.next();
    assert!(served.upload_exact);
    assert_eq!(served.peer.ip().to_string(), "192.0.2.100", "the internet saw the pool address");
}

/// Without `--hook`, a veth gets the tc hook (its driver's default); `--mode` asks for XDP,
/// and `--hook xdp` still attaches XDP to a veth.
#[test]
fn a_veth_attached_without_hook_gets_tc() {
    let a = Netns::new("dha");
    let b = Netns::new("dhb");
    let (_, vb) = veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let pins = Pins::in_netns(&b);
    for (args, hook) in [
        (&[][..], "tc"),
        (&["--mode", "native"][..], "xdp"),
        (&["--hook", "xdp"][..], "xdp"),
        (&["--hook", "tc"][..], "tc"),
    ] {
        let attach = [&["attach", "--iface", &vb, "--role", "internal"][..], args].concat();
        pins.xdpgate(&attach);
        common::assert_ingress_hook(&pins, &b, &vb, hook);
        pins.xdpgate(&["detach", "--iface", &vb]);
    }
}
