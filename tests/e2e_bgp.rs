//! Scale-out behind ECMP (issue 16, first part), end to end: a router namespace running BIRD
//! with `merge paths on` (ECMP into its kernel table) and two gateway namespaces, each with
//! xdpgate attached by its agent (`xdpgate run --node`, with a `bgp:` section) and BIRD
//! configured by `xdpgate bgp bird-config`, peering with the router. The router's kernel
//! table is read for the state each step waits for:
//!
//! * the frontend /32 appears with both gateways as next hops;
//! * `xdpgate drain` on one leaves the other; `xdpgate undrain` brings it back;
//! * every backend of one gateway unhealthy (its probe fails) withdraws that gateway's path,
//!   and its recovery announces it again;
//! * SIGTERM of an agent withdraws its path before it exits;
//! * SIGKILL of an agent leaves its path (its dataplane runs on); a daemon gone silent
//!   (SIGSTOP) is withdrawn by the router's hold timer;
//! * a bad `bgp:` section in a node file is a clear error, for `check` and for `run`.
//!
//! Skipped, with a message, only when `bird` is not installed (setup.sh installs bird2).

mod common;

use std::{
    collections::BTreeSet,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Netns, Pins, agent::NodeAgent, unique, veth, xdpgate_bin};
use serde_json::Value;

const VIP: &str = "192.0.2.10";
const BACKEND: &str = "198.51.100.11";

/// One load balancer: the frontend, one backend (an address of each gateway's own, where
/// the test holds a listener for the probe), probed every 200 ms.
const POLICY: &str = "
virtual_network:
  address_space: [198.51.100.0/24]
load_balancers:
  - name: edge
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: web, backends: [198.51.100.11]}
    probes:
      - {name: up, protocol: tcp, port: 8080, interval: 200, timeout: 150, threshold: 2}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: web, probe: up}
";

/// A BIRD daemon in a namespace with its own config, control socket and pid file; killed
/// and its files removed on drop (a failing test included).
struct Bird {
    child: Child,
    dir: PathBuf,
}

impl Bird {
    fn start(ns: &Netns, config: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("bird"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config).unwrap();
        // -f: in the foreground, so this child is the daemon.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bird");
        Self { child, dir }
    }

    /// Freezes the daemon (SIGSTOP): it sends nothing more and its sessions stay open, as a
    /// hung or cut-off node's do, so only the peers' hold timers end them.
    fn freeze(&self) {
        // SAFETY: kill(2) on our own child (`ip netns exec` execs bird in its place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// `birdc show protocols` and `show route`, for a failure's message.
    fn show(&self) -> String {
        let ctl = self.dir.join("bird.ctl");
        let mut out = String::new();
        for what in ["protocols", "route"] {
            let o = Command::new("birdc").arg("-s").arg(&ctl).args(["show", what]).output();
            out += &o.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stdout).into());
        }
        out
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The router: BGP from each gateway, the best paths merged into one multipath route.
fn router_config(gateways: &[&str]) -> String {
    let mut out = "router id 203.0.113.1;\nprotocol device {}\n\
                   protocol kernel {\n  merge paths on;\n  ipv4 { import none; export all; };\n}\n"
        .to_owned();
    for (i, gw) in gateways.iter().enumerate() {
        out += &format!(
            "protocol bgp gw{i} {{\n  local as 65000;\n  neighbor {gw} as 65001;\n  hold time 9;\n  \
             keepalive time 3;\n  connect delay time 1;\n  connect retry time 2;\n  \
             graceful restart off;\n  ipv4 {{ import all; export none; }};\n}}\n"
        );
    }
    out
}

/// The next hops of the router's route to the frontend (none: no route).
fn next_hops(router: &Netns) -> BTreeSet<String> {
    let out = router.exec("ip", &["-j", "route", "show", &format!("{VIP}/32")]);
    let routes: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let mut hops = BTreeSet::new();
    for r in routes.as_array().into_iter().flatten() {
        if let Some(gw) = r["gateway"].as_str() {
            hops.insert(gw.to_owned());
        }
        for n in r["nexthops"].as_array().into_iter().flatten() {
            hops.extend(n["gateway"].as_str().map(str::to_owned));
        }
    }
    hops
}

/// Polls the router's table until the frontend's next hops are `want`; on a timeout, says
/// what each gateway and daemon has.
fn wait_hops(router: &Netns, want: &[&str], what: &str, gateways: &[&Gateway]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = next_hops(router);
        if now == want {
            return;
        }
        if Instant::now() >= deadline {
            let mut seen = String::new();
            for g in gateways {
                let table = g.ns.try_exec("ip", &["route", "show", "table", "4242"]);
                let bgp = g.pins.try_xdpgate(&["bgp"]);
                seen += &format!(
                    "\n--- gateway {}: table 4242:\n{}xdpgate bgp:\n{}{}bird:\n{}",
                    g.addr,
                    String::from_utf8_lossy(&table.stdout),
                    String::from_utf8_lossy(&bgp.stdout),
                    String::from_utf8_lossy(&bgp.stderr),
                    g.bird.as_ref().map_or(String::new(), Bird::show)
                );
            }
            panic!("{what}: next hops {now:?}, wanted {want:?}{seen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `xdpgate bgp --json` of a gateway.
fn bgp_report(pins: &Pins) -> Value {
    serde_json::from_str(&pins.xdpgate(&["bgp", "--json"])).expect("bgp --json")
}

struct Gateway {
    ns: Netns,
    pins: Pins,
    addr: &'static str,
    node_file: PathBuf,
    /// The backend's probe port: open while held.
    backend: Option<TcpListener>,
    agent: Option<NodeAgent>,
    bird: Option<Bird>,
}

impl Gateway {
    /// A gateway peering with `router` (without BIRD when `bird` is false: the agent's
    /// table alone).
    fn new(router: &Netns, router_addr: &str, addr: &'static str, bird: bool) -> Self {
        let ns = Netns::new("bgpgw");
        let (_, iface) = veth(router, &format!("{router_addr}/30"), &ns, &format!("{addr}/30"));
        ns.exec("ip", &["addr", "add", &format!("{BACKEND}/32"), "dev", "lo"]);
        let node = format!(
            "interfaces:\n  - {{name: {iface}, role: external}}\nbgp:\n  router_id: {addr}\n  \
             local_as: 65001\n  peers:\n    - {{address: {router_addr}, as: 65000}}\n"
        );
        let node_file = std::env::temp_dir().join(format!("{}.yaml", unique("bgpnode")));
        std::fs::write(&node_file, &node).unwrap();
        let pins = Pins::in_netns(&ns);
        let bird_conf =
            pins.xdpgate(&["bgp", "bird-config", "--node", node_file.to_str().unwrap()]);
        let bird = bird.then(|| Bird::start(&ns, &bird_conf));
        let mut gw = Self { ns, pins, addr, node_file, backend: None, agent: None, bird };
        gw.open_backend();
        gw.agent = Some(NodeAgent::start(&gw.ns, &gw.pins, POLICY, &node));
        gw
    }

    /// The agent's table (`ip route show table 4242`; empty while the kernel has no such
    /// table yet).
    fn table(&self) -> String {
        let out = self.ns.try_exec("ip", &["route", "show", "table", "4242"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn open_backend(&mut self) {
        self.backend =
            Some(self.ns.run(|| TcpListener::bind((BACKEND, 8080)).expect("backend listener")));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The agent before the pins (their drop detaches), the namespace last.
        self.agent = None;
        let _ = std::fs::remove_file(&self.node_file);
    }
}

#[test]
fn gateways_announce_the_frontend_over_bgp_and_withdraw_it() {
    if Command::new("bird").arg("--version").output().is_err() {
        eprintln!("skipping: `bird` is not installed (setup.sh installs Debian's bird2)");
        return;
    }
    let router = Netns::new("bgprt");
    let mut g1 = Gateway::new(&router, "203.0.113.1", "203.0.113.2", true);
    let mut g2 = Gateway::new(&router, "203.0.113.5", "203.0.113.6", true);
    let _router_bird = Bird::start(&router, &router_config(&[g1.addr, g2.addr]));

    // Both gateways announce: the router spreads the frontend over both (ECMP).
    wait_hops(&router, &[g1.addr, g2.addr], "both gateways up", &[&g1, &g2]);
    let table = g1.table();
    assert!(table.contains(&format!("{VIP} dev lo proto 245")), "table 4242: {table}");

    // Drain one node: the other carries the frontend; status and `bgp` say so.
    let out = g1.pins.xdpgate(&["drain", "--wait", "10"]);
    assert!(out.contains("node drained"), "{out}");
    wait_hops(&router, &[g2.addr], "g1 drained", &[&g1, &g2]);
    let report = bgp_report(&g1.pins);
    assert_eq!(report["node_drained"], true, "{report}");
    assert_eq!(report["routes"], serde_json::json!([]), "{report}");
    let status: Value = serde_json::from_str(&g1.pins.xdpgate(&["status", "--json"])).unwrap();
    assert_eq!(status["bgp"]["node_drained"], true, "{status}");
    g1.pins.xdpgate(&["undrain", "--wait", "10"]);
    wait_hops(&router, &[g1.addr, g2.addr], "g1 undrained", &[&g1, &g2]);

    // Every backend of g1 down (its probe fails): g1 withdraws; back up: announced again.
    g1.backend = None;
    wait_hops(&router, &[g2.addr], "g1's backends down", &[&g1, &g2]);
    let report = bgp_report(&g1.pins);
    let withheld = &report["agent"]["withheld"][0];
    assert_eq!(withheld["address"], VIP, "{report}");
    assert_eq!(withheld["reason"], "no healthy, non-drained backend", "{report}");
    g1.open_backend();
    wait_hops(&router, &[g1.addr, g2.addr], "g1's backends up again", &[&g1, &g2]);

    // SIGTERM: the agent withdraws before it exits (its dataplane stays attached).
    let status = g1.agent.as_mut().unwrap().terminate();
    assert!(status.success(), "xdpgate run exited with {status}");
    assert_eq!(g1.table(), "", "routes left after SIGTERM");
    wait_hops(&router, &[g2.addr], "g1's agent stopped", &[&g1, &g2]);

    // A crashed agent (SIGKILL) leaves its routes: its dataplane still filters and forwards
    // from the pinned maps, so the path still leads to a working gateway.
    g2.agent = None;
    let table = g2.table();
    assert!(table.contains(VIP), "g2's table after its agent was killed: {table}");
    assert_eq!(next_hops(&router), BTreeSet::from([g2.addr.to_owned()]));
    // A dead node (its daemon silent) is withdrawn by the router's hold timer (9 s).
    let frozen = Instant::now();
    g2.bird.as_ref().unwrap().freeze();
    wait_hops(&router, &[], "g2's daemon frozen", &[&g1, &g2]);
    println!("hold timer: the router withdrew g2 {:.1?} after its daemon froze", frozen.elapsed());
}

#[test]
fn an_agent_without_bgp_removes_the_routes_a_killed_one_left() {
    let router = Netns::new("bgprt");
    let mut gw = Gateway::new(&router, "203.0.113.1", "203.0.113.2", false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.table().contains(VIP) {
        assert!(Instant::now() < deadline, "never announced: {}", gw.table());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Killed: its route stays (as in the crash case above). The next agent's node file has
    // no bgp: section; nothing would look after that route, so it goes.
    gw.agent = None;
    assert!(gw.table().contains(VIP));
    let node = std::fs::read_to_string(&gw.node_file).unwrap();
    let without = &node[..node.find("bgp:").unwrap()];
    gw.agent = Some(NodeAgent::start(&gw.ns, &gw.pins, POLICY, without));
    while !gw.table().is_empty() {
        assert!(Instant::now() < deadline + Duration::from_secs(10), "left: {}", gw.table());
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = bgp_report(&gw.pins);
    assert!(report["agent"].is_null(), "{report}");
}

#[test]
fn a_bad_bgp_section_is_a_clear_error() {
    let dir = std::env::temp_dir().join(unique("bgpbad"));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    for (bgp, why) in [
        (
            "bgp: {table: 254, router_id: 203.0.113.2, local_as: 65001, peers: [{address: \
             203.0.113.1, as: 65000}]}",
            "line 3, column 14: bgp: table: 254 is one of the kernel's own tables",
        ),
        ("bgp: {router_id: 203.0.113.2, local_as: 65001}", "bgp: peers is missing"),
        (
            "bgp: {router_id: gw1, local_as: 65001, peers: [{address: 203.0.113.1, as: 1}]}",
            "bgp: router_id: expected an IPv4 address, found string \"gw1\"",
        ),
    ] {
        let node = dir.join("node.yaml");
        std::fs::write(&node, format!("interfaces:\n  - {{name: eth0, role: external}}\n{bgp}\n"))
            .unwrap();
        let out = Command::new(xdpgate_bin())
            .arg("check")
            .arg(&policy)
            .arg("--node")
            .arg(&node)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{bgp}: {err}");
        // The agent refuses it before it changes anything.
        let pins = Pins::new();
        let out = pins.try_xdpgate(&[
            "run",
            "--policy",
            policy.to_str().unwrap(),
            "--node",
            node.to_str().unwrap(),
            "--metrics-addr",
            "off",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "run, {bgp}: {err}");
        let status: Value = serde_json::from_str(&pins.xdpgate(&["status", "--json"])).unwrap();
        assert!(status["policy"].is_null() && status["agent"].is_null(), "{status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
