//! Flow logs end to end: the agent (`xdpgate run --flow-log FILE`) writes one JSON line per
//! flow begin, deny and end for known traffic through a gateway, with the deciding rule and,
//! at the end, the packets and bytes each way. And the sweep behind the `end` lines, which
//! runs without a flow log too: idle flows leave the flow table, used ones stay.

mod common;

use std::{
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    echo::udp_echo,
    gateway::{CLIENT4, Gateway, SERVER4, TRANSLATING_POLICY},
};
use serde_json::{Value, json};

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
settings: {udp_idle_timeout: 4}
nsgs:
  - name: servers
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-dns, priority: 100, direction: inbound, access: allow, protocol: udp,
         source: Internet, destination: "*", destination_ports: 5353}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 22}
"#;

#[test]
fn flow_log_lines_for_known_traffic() {
    let lab = Gateway::new();
    let client = &lab.client;
    let (policy, log) = (lab.write_policy("policy.yaml", POLICY), lab.dir.join("flows.jsonl"));
    let agent = start_agent(&lab, &policy, &log, &[]);
    let lines = || read_lines(&log);
    wait_for_policy(&lab);

    // Known traffic: three UDP flows of two exchanges each, two SSH attempts.
    udp_echo(&lab.server, "198.51.100.10:5353");
    for sport in [41000u16, 41001, 41002] {
        client.run(move || {
            let s = UdpSocket::bind(("203.0.113.10", sport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for _ in 0..2 {
                s.send_to(&[7u8; 100], "198.51.100.10:5353").unwrap();
                let mut buf = [0u8; 512];
                s.recv_from(&mut buf).expect("reply through the gateway");
            }
        });
    }
    for sport in [42000u16, 42001] {
        client.run(move || {
            let s = socket2_connect(sport);
            assert!(s.is_none(), "SSH is denied");
        });
    }

    // The UDP flows idle out after 4 s; the agent logs their end within a second or two.
    let ends =
        |ls: &[Value]| ls.iter().filter(|l| l["state"] == "end" && l["dst_port"] == 5353).count();
    let start = Instant::now();
    while ends(&lines()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(12), "end lines missing:\n{:#?}", lines());
        thread::sleep(Duration::from_millis(200));
    }
    drop(agent);
    let all = lines();

    for l in &all {
        assert_eq!(l["version"], 2, "{l}");
        let t = l["time"].as_str().unwrap_or_default();
        assert!(t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T', "time {t}");
    }
    let begins: Vec<&Value> =
        all.iter().filter(|l| l["state"] == "begin" && l["dst_port"] == 5353).collect();
    assert_eq!(begins.len(), 3, "{all:#?}");
    for b in &begins {
        assert_eq!(
            (b["src"].as_str(), b["dst"].as_str(), b["protocol"].as_str(), b["direction"].as_str()),
            (Some(CLIENT4), Some(SERVER4), Some("udp"), Some("inbound"))
        );
        assert_eq!(
            (b["nsg"].as_str(), b["rule"].as_str(), b["decision"].as_str()),
            (Some("servers"), Some("allow-dns"), Some("allow"))
        );
    }
    for e in all.iter().filter(|l| l["state"] == "end" && l["dst_port"] == 5353) {
        assert_eq!(
            (e["forward"]["packets"].as_u64(), e["reply"]["packets"].as_u64()),
            (Some(2), Some(2)),
            "{e}"
        );
        // 100-byte payloads in 142-byte frames (Ethernet + IPv4 + UDP).
        assert_eq!(
            (e["forward"]["bytes"].as_u64(), e["reply"]["bytes"].as_u64()),
            (Some(284), Some(284)),
            "{e}"
        );
        // No interim record came before (the default interval is 60 s): all since begin.
        assert_eq!(e["delta"]["forward"], e["forward"], "{e}");
        assert_eq!(e["delta"]["reply"], e["reply"], "{e}");
        assert_eq!(e["rule"].as_str(), Some("allow-dns"));
    }
    let denies: Vec<&Value> = all.iter().filter(|l| l["state"] == "deny").collect();
    assert!(denies.len() >= 2, "{all:#?}");
    for d in &denies {
        assert_eq!(
            (d["dst_port"].as_u64(), d["rule"].as_str(), d["decision"].as_str()),
            (Some(22), Some("deny-ssh"), Some("deny"))
        );
    }
}

/// The established flow table is not LRU: nothing but the agent's sweep frees an idle flow's
/// entries, and the agent sweeps with no flow log as well. A flow left idle leaves
/// `xdpgate flows` once its 4 s timeout has passed (not before), while a flow in use all
/// along stays.
#[test]
fn idle_flows_leave_the_table_without_a_flow_log() {
    let lab = Gateway::new();
    let (client, server, pins) = (&lab.client, &lab.server, &lab.pins);
    let policy = lab.write_policy("policy.yaml", POLICY);
    let mut agent =
        common::KillOnDrop::new(pins.agent(&policy).spawn().expect("spawn xdpgate run"));
    let json = |args: &[&str]| -> Value {
        serde_json::from_str(&pins.xdpgate(args)).expect("JSON output")
    };
    let start = Instant::now();
    while json(&["status", "--json"])["agent"]["running"] != true {
        assert!(start.elapsed() < Duration::from_secs(10), "the agent did not start");
        thread::sleep(Duration::from_millis(50));
    }

    udp_echo(server, "198.51.100.10:5353");
    let exchange = |s: &UdpSocket| {
        s.send_to(&[7u8; 100], "198.51.100.10:5353").unwrap();
        let mut buf = [0u8; 512];
        s.recv_from(&mut buf).expect("reply through the gateway");
    };
    let socket = |sport: u16| {
        client.run(move || {
            let s = UdpSocket::bind(("203.0.113.10", sport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
    };
    // The busy flow: an exchange every 300 ms until the test ends.
    let (busy, stop) = (socket(41101), Arc::new(AtomicBool::new(false)));
    exchange(&busy);
    let busy_thread = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(300));
                exchange(&busy);
            }
        })
    };
    let idle = socket(41100);
    exchange(&idle);
    exchange(&idle);
    let last_packet = Instant::now();

    let listed = || -> Vec<(u64, String)> {
        json(&["flows", "--json", "--top", "0", "--port", "5353"])
            .as_array()
            .expect("a list")
            .iter()
            .map(|f| (f["src_port"].as_u64().unwrap(), f["state"].as_str().unwrap().to_string()))
            .collect()
    };
    let has = |l: &[(u64, String)], port| l.iter().any(|(p, _)| *p == port);
    let first = listed();
    assert!(first.contains(&(41100, "established".into())), "{first:?}");
    let gone_after = loop {
        let l = listed();
        // Read after the list, so an early removal cannot pass for a late one.
        let elapsed = last_packet.elapsed();
        assert!(has(&l, 41101), "the flow in use left the table after {elapsed:.1?}: {l:?}");
        if !has(&l, 41100) {
            break elapsed;
        }
        assert!(elapsed < Duration::from_secs(12), "the idle flow is still listed: {l:?}");
        thread::sleep(Duration::from_millis(200));
    };
    // Its last packet was a little before `last_packet`, on the kernel's coarse clock.
    assert!(
        gone_after >= Duration::from_millis(3_900),
        "the idle flow left the table {gone_after:.1?} after its last packet, before its 4 s \
         timeout"
    );
    stop.store(true, Ordering::Relaxed);
    busy_thread.join().expect("the busy flow's exchanges all answered");
    let stats = json(&["stats", "--json"]);
    let _ = agent.kill();
    let _ = agent.wait();
    // The busy flow's two entries, and nothing of the idle one.
    assert_eq!(stats["flow_table"]["flows"]["entries"], 2, "{}", stats["flow_table"]);
    println!("the idle flow left the table {gone_after:.1?} after its last packet (timeout 4 s)");
}

/// `xdpgate run` in the gateway's namespace with `policy` and a flow log at `log`, and
/// `extra` flags.
fn start_agent(
    lab: &Gateway,
    policy: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
) -> Agent {
    let child = lab
        .pins
        .agent(policy)
        .arg("--flow-log")
        .arg(log)
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log.with_extension("agent.log")).unwrap())
        .spawn()
        .expect("spawn xdpgate run");
    Agent(child, log.with_extension("agent.log"))
}

/// The agent process and its log, killed when dropped (the log printed if the test fails).
struct Agent(std::process::Child, std::path::PathBuf);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if thread::panicking() {
            eprintln!("agent log:\n{}", std::fs::read_to_string(&self.1).unwrap_or_default());
            let flow_log = self.1.with_extension("").with_extension("jsonl");
            eprintln!("flow log:\n{}", std::fs::read_to_string(flow_log).unwrap_or_default());
        }
    }
}

/// Every line of the flow log at `path`, parsed.
fn read_lines(path: &std::path::Path) -> Vec<Value> {
    common::whole_lines(path)
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent runs and has applied its policy.
fn wait_for_policy(lab: &Gateway) {
    wait_until("the agent to apply its policy", Duration::from_secs(10), || {
        let out = lab.pins.try_xdpgate(&["status", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| {
            s["agent"]["running"] == true && s["agent"]["last_reload"]["successful"] == true
        })
    });
}

/// A UDP flow from the client's port 41500 to the echo server, and its flow-log records.
struct EchoFlow {
    socket: UdpSocket,
    log: PathBuf,
}

impl EchoFlow {
    const KEY: (&str, &str, u16, u16) = ("203.0.113.10", "198.51.100.10", 41500, 5353);

    /// A gateway with the agent writing interim records every second, and the echo server.
    fn start(lab: &Gateway) -> (Agent, Self) {
        let (policy, log) = (lab.write_policy("policy.yaml", POLICY), lab.dir.join("flows.jsonl"));
        let agent = start_agent(lab, &policy, &log, &["--flow-log-interval", "1"]);
        wait_for_policy(lab);
        udp_echo(&lab.server, "198.51.100.10:5353");
        let socket = lab.client.run(|| {
            let s = UdpSocket::bind((Self::KEY.0, Self::KEY.2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        });
        (agent, Self { socket, log })
    }

    /// `n` 100-byte datagrams (142-byte frames) there and back.
    fn exchange(&self, n: usize) {
        for _ in 0..n {
            self.socket.send_to(&[7u8; 100], (Self::KEY.1, Self::KEY.3)).unwrap();
            let mut buf = [0u8; 512];
            self.socket.recv_from(&mut buf).expect("reply through the gateway");
        }
    }

    /// The flow's records in `state`, in the order written.
    fn records(&self, state: &str) -> Vec<Value> {
        let all = of_flow(&self.log, Self::KEY.2, Self::KEY.3);
        all.into_iter().filter(|l| l["state"] == state).collect()
    }

    /// Waits for a `continuing` record of `packets` forward packets, the flow's last.
    fn wait_for_continuing(&self, packets: u64) {
        let what = format!("a continuing record of {packets} packets");
        wait_until(&what, Duration::from_secs(5), || {
            self.records("continuing").last().is_some_and(|l| forward_packets(l) == packets)
        });
    }

    /// Waits for the end record (the flow idles out after 4 s); returns the flow's
    /// records.
    fn ended(&self) -> Vec<Value> {
        ended(&self.log, Self::KEY.2, Self::KEY.3)
    }
}

/// Waits for the `end` record of the flow from `sport` to `dport`, and for a walk and a
/// sweep more (a line written after the end would come by then); returns its `continuing`
/// records and its `end`, as written: one `end`, the last.
fn ended(log: &Path, sport: u16, dport: u16) -> Vec<Value> {
    wait_until("the end record", Duration::from_secs(15), || {
        of_flow(log, sport, dport).iter().any(|l| l["state"] == "end")
    });
    thread::sleep(Duration::from_millis(2500));
    let mut records = of_flow(log, sport, dport);
    records.retain(|l| l["state"] != "begin");
    let ends: Vec<_> = records.iter().map(|r| r["state"] == "end").collect();
    assert_eq!(ends.iter().filter(|&&e| e).count(), 1, "{records:#?}");
    assert_eq!(ends.last(), Some(&true), "the end comes last: {records:#?}");
    records
}

/// The records of the flow from `sport` to `dport`, in the order written.
fn of_flow(log: &Path, sport: u16, dport: u16) -> Vec<Value> {
    let mut lines = read_lines(log);
    lines.retain(|l| l["src_port"] == sport && l["dst_port"] == dport);
    lines
}

fn forward_packets(l: &Value) -> u64 {
    l["forward"]["packets"].as_u64().unwrap()
}

/// Checks that each record's delta is its totals less the previous record's (none: zero),
/// that no total goes down, that a `continuing` record comes only with new traffic, and
/// that each names `rule`; returns the last totals (forward packets and bytes, reply
/// packets and bytes).
fn totals_add_up(records: &[Value], rule: &str) -> [u64; 4] {
    let mut before = [0; 4];
    for r in records {
        let at = |v: &Value, d: &str, f: &str| v[d][f].as_u64().unwrap();
        let now = [
            at(r, "forward", "packets"),
            at(r, "forward", "bytes"),
            at(r, "reply", "packets"),
            at(r, "reply", "bytes"),
        ];
        let delta = [
            at(&r["delta"], "forward", "packets"),
            at(&r["delta"], "forward", "bytes"),
            at(&r["delta"], "reply", "packets"),
            at(&r["delta"], "reply", "bytes"),
        ];
        let since = std::array::from_fn(|i| now[i].checked_sub(before[i]));
        assert!(since.iter().all(Option::is_some), "counted down from {before:?}: {r}");
        assert_eq!(delta.map(Some), since, "{r}");
        assert!(r["state"] == "end" || now != before, "{r}");
        assert_eq!((r["version"].as_u64(), r["rule"].as_str()), (Some(2), Some(rule)), "{r}");
        before = now;
    }
    before
}

/// A long UDP flow gets `continuing` records every second: each carries the flow's totals
/// and what came since the flow's previous record, and its `end` record what came after the
/// last one. Known traffic: three datagrams, a pause, five more.
#[test]
fn interim_records_of_a_long_flow_carry_the_traffic_since_the_last_record() {
    let lab = Gateway::new();
    let (_agent, flow) = EchoFlow::start(&lab);
    flow.exchange(3);
    flow.wait_for_continuing(3);
    flow.exchange(5);
    flow.wait_for_continuing(8);
    let records = flow.ended();
    assert!(records.len() >= 3, "{records:#?}");
    assert_eq!(
        totals_add_up(&records, "allow-dns"),
        [8, 8 * 142, 8, 8 * 142],
        "the end record's totals"
    );
    // The record of all eight counts the five since the record of the first three (one
    // more record between them would have taken some).
    let three = records.iter().position(|r| forward_packets(r) == 3).unwrap();
    let eight = records.iter().position(|r| forward_packets(r) == 8).unwrap();
    let since: u64 = records[three + 1..=eight]
        .iter()
        .map(|r| r["delta"]["forward"]["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(since, 5, "{records:#?}");
    for r in &records {
        println!("{r}");
    }
}

/// An agent restarted while a flow runs (an upgrade needs one) counts the flow's records
/// from its totals as it starts: the first record after the restart carries what came
/// since, not the flow's whole life again (seen failing: 8 packets, the 3 before the
/// restart counted twice), and no record's delta counts anything twice. A flow that began
/// while no agent ran counts from zero (its `begin` event waited in the ring; seen failing
/// with every running flow counted from the agent's start: no record, its 4 in no delta).
#[test]
fn an_agent_restart_counts_no_packet_twice() {
    let lab = Gateway::new();
    let (agent, flow) = EchoFlow::start(&lab);
    flow.exchange(3);
    flow.wait_for_continuing(3);
    drop(agent);
    let unlogged = lab.client.run(|| {
        let s = UdpSocket::bind((EchoFlow::KEY.0, 41501)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    for _ in 0..4 {
        unlogged.send_to(&[7u8; 100], (EchoFlow::KEY.1, EchoFlow::KEY.3)).unwrap();
        unlogged.recv_from(&mut [0u8; 512]).expect("reply through the gateway");
    }
    let policy = lab.dir.join("policy.yaml");
    let _agent = start_agent(&lab, &policy, &flow.log, &["--flow-log-interval", "1"]);
    wait_for_policy(&lab);
    flow.exchange(5);
    flow.wait_for_continuing(8);
    let first = |log: &Path| {
        of_flow(log, 41501, EchoFlow::KEY.3).into_iter().find(|l| l["state"] == "continuing")
    };
    wait_until("the unlogged flow's record", Duration::from_secs(5), || first(&flow.log).is_some());
    let record = first(&flow.log).unwrap();
    assert_eq!(record["delta"]["forward"]["packets"], 4, "{record}");
    let records = flow.ended();
    let delta = |r: &Value| r["delta"]["forward"]["packets"].as_u64().unwrap();
    let after = records.iter().position(|r| forward_packets(r) == 8).unwrap();
    assert!(delta(&records[after]) <= 5, "counted again: {records:#?}");
    let counted: u64 = records.iter().map(delta).sum();
    assert!(counted <= 8, "{counted} packets in the deltas of a flow of 8: {records:#?}");
    assert_eq!(forward_packets(records.last().unwrap()), 8, "{records:#?}");
}

/// The sweep removes a flow's two entries one after the other, and a walk for interim
/// records (or a sweep) that reads the table between the two sees one. The direction it did
/// not read keeps the totals of the flow's last record: nothing is counted down. Here the
/// forward entry is removed by hand, and the reply entry left to idle out alone.
#[test]
fn a_flow_read_with_one_entry_gone_is_not_counted_down() {
    use aya::maps::HashMap;
    use xdpgate_common::flow::{FlowKey, FlowValue};
    let lab = Gateway::new();
    let (_agent, flow) = EchoFlow::start(&lab);
    flow.exchange(3);
    flow.wait_for_continuing(3);
    let mut flows: HashMap<_, FlowKey, FlowValue> =
        lab.pins.dir.open_map(xdpgate_common::maps::FLOWS).unwrap().try_into().unwrap();
    let (src, dst, sport, dport) = EchoFlow::KEY;
    flows
        .remove(&common::packet::flow_key(src, dst, sport, dport, 17))
        .expect("its forward entry (gone only if the record took longer than the flow's 4 s)");
    let records = flow.ended();
    assert_eq!(totals_add_up(&records, "allow-dns"), [3, 3 * 142, 3, 3 * 142], "{records:#?}");
    assert_eq!(records.last().unwrap()["delta"]["forward"]["packets"], 0, "{records:#?}");
}

/// POLICY with a load balancer whose probe the agent runs against the server.
const PROBED_LB: &str = r#"
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: servers, backends: [198.51.100.10]}
    probes:
      - {name: up, protocol: tcp, port: 7070, interval: 200, timeout: 150, threshold: 2}
    rules:
      - {name: web, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 7070,
         backend_pool: servers, probe: up}
"#;

/// The agent probes its backend (TCP to 198.51.100.10:7070 every 200 ms): by default none
/// of those connections is in the flow log, while a client's flow is; with
/// `--flow-log-probes mark` they are, marked `"probe": true` (and only they are).
#[test]
fn the_agents_probe_connections_are_left_out_or_marked() {
    let lab = Gateway::new();
    let policy = lab.write_policy("policy.yaml", &format!("{POLICY}{PROBED_LB}"));
    let log = lab.dir.join("flows.jsonl");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = lab.server.run(|| std::net::TcpListener::bind("198.51.100.10:7070").unwrap());
    {
        let accepted = accepted.clone();
        thread::spawn(move || {
            for c in listener.incoming() {
                drop(c);
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    udp_echo(&lab.server, "198.51.100.10:5353");
    let client_flow = |sport: u16| {
        lab.client.run(move || {
            let s = UdpSocket::bind(("203.0.113.10", sport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(&[7u8; 100], "198.51.100.10:5353").unwrap();
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).expect("reply through the gateway");
        })
    };
    let probe_port = |l: &Value| l["src_port"] == 7070 || l["dst_port"] == 7070;
    let client_begin = |sport: u16| {
        read_lines(&log).iter().any(|l| l["state"] == "begin" && l["src_port"] == sport)
    };

    let agent = start_agent(&lab, &policy, &log, &[]);
    wait_for_policy(&lab);
    let base = accepted.load(Ordering::Relaxed);
    wait_until("ten probes", Duration::from_secs(10), || {
        accepted.load(Ordering::Relaxed) >= base + 10
    });
    client_flow(41600);
    wait_until("the client's begin record", Duration::from_secs(5), || client_begin(41600));
    let omitted = read_lines(&log);
    assert!(!omitted.iter().any(probe_port), "probe connections logged: {omitted:#?}");
    drop(agent);

    std::fs::remove_file(&log).unwrap();
    let _agent = start_agent(&lab, &policy, &log, &["--flow-log-probes", "mark"]);
    wait_for_policy(&lab);
    wait_until("a marked probe connection", Duration::from_secs(10), || {
        read_lines(&log).iter().any(|l| l["probe"] == true)
    });
    client_flow(41601);
    wait_until("the client's begin record", Duration::from_secs(5), || client_begin(41601));
    let marked = read_lines(&log);
    for l in &marked {
        assert_eq!(l["probe"] == true, probe_port(l), "{l}");
    }
    for l in marked.iter().filter(|l| l["probe"] == true) {
        println!("{l}");
    }
    let probes = marked.iter().filter(|l| l["probe"] == true).count();
    println!("{probes} of {} lines were the agent's probe connections", marked.len());
}

/// Event lines name where and why: a load-balanced flow's begin has its backend and
/// rewrite, a NAT'd one its public address and port, each the interface it arrived on and
/// its TCP flags; a denied SYN has reason `policy`; a packet to the NAT gateway's public
/// address that matches no translation is a `drop` line with reason `nat_unmatched`.
#[test]
fn event_lines_name_interface_reason_flags_and_translation() {
    let lab = Gateway::new();
    lab.take_redirects();
    let policy = lab.write_policy("policy.yaml", TRANSLATING_POLICY);
    let log = lab.dir.join("flows.jsonl");
    let _agent = start_agent(&lab, &policy, &log, &[]);
    wait_for_policy(&lab);
    let line = |what: &str, want: &dyn Fn(&Value) -> bool| -> Value {
        let mut found = None;
        wait_until(what, Duration::from_secs(5), || {
            found = read_lines(&log).into_iter().find(|l| want(l));
            found.is_some()
        });
        found.unwrap()
    };

    let web = lab.server.run(|| std::net::TcpListener::bind("198.51.100.10:8080").unwrap());
    thread::spawn(move || while web.accept().is_ok() {});
    lab.client.run(|| {
        TcpStream::connect_timeout(&"192.0.2.10:80".parse().unwrap(), Duration::from_secs(3))
            .expect("the load balancer forwards to the backend");
    });
    let b = line("the load-balanced begin", &|l| l["state"] == "begin" && l["dst_port"] == 80);
    assert_eq!(
        (&b["version"], &b["dst"], &b["interface"], &b["hook"], &b["tcp_flags"]),
        (&json!(2), &json!("192.0.2.10"), &json!(lab.ext), &json!("ingress"), &json!("SYN")),
        "{b}"
    );
    assert_eq!(b["load_balancer"], json!({"name": "lb", "rule": "http", "backend": SERVER4}));
    assert_eq!(b["nat"], json!({"kind": "dnat", "address": SERVER4, "port": 8080}), "{b}");
    assert_eq!((b["rule"].as_str(), b.get("reason")), (Some("allow-web"), None), "{b}");

    let listener = lab.client.run(|| std::net::TcpListener::bind("203.0.113.10:9000").unwrap());
    thread::spawn(move || while listener.accept().is_ok() {});
    lab.server.run(|| {
        TcpStream::connect_timeout(&"203.0.113.10:9000".parse().unwrap(), Duration::from_secs(3))
            .expect("out through the NAT gateway");
    });
    let n = line("the NAT'd begin", &|l| l["state"] == "begin" && l["dst_port"] == 9000);
    assert_eq!(
        (&n["direction"], &n["src"], &n["interface"], &n["nat"]["kind"], &n["nat"]["address"]),
        (
            &json!("outbound"),
            &json!(SERVER4),
            &json!(lab.int),
            &json!("snat"),
            &json!("192.0.2.100")
        ),
        "{n}"
    );
    assert!(n["nat"]["port"].as_u64().is_some_and(|p| p > 0), "{n}");
    assert!(n.get("load_balancer").is_none(), "{n}");

    lab.client.run(|| socket2_connect(42100).is_none());
    let d = line("the deny", &|l| l["state"] == "deny" && l["src_port"] == 42100);
    assert_eq!(
        (&d["decision"], &d["reason"], &d["tcp_flags"], &d["rule"], &d["interface"]),
        (&json!("deny"), &json!("policy"), &json!("SYN"), &json!("deny-ssh"), &json!(lab.ext)),
        "{d}"
    );

    lab.client.run(|| {
        UdpSocket::bind("203.0.113.10:0").unwrap().send_to(b"x", "192.0.2.100:7777").unwrap();
    });
    let u = line("the nat_unmatched drop", &|l| l["state"] == "drop" && l["dst_port"] == 7777);
    assert_eq!(
        (&u["decision"], &u["reason"], &u["protocol"], &u["interface"], &u["dst"]),
        (
            &json!("drop"),
            &json!("nat_unmatched"),
            &json!("udp"),
            &json!(lab.ext),
            &json!("192.0.2.100")
        ),
        "{u}"
    );
    for l in [&b, &n, &d, &u] {
        println!("{l}");
    }
}

/// A TCP connection attempt from a fixed source port, with a short timeout.
/// A flow through a NAT gateway is not the sweep's to end: it ends with its translation,
/// which the NAT expiry removes once idle (4 s here). Its `end` record comes from there, once,
/// after its `continuing` one (every second here), with its totals and its translation.
/// Seen failing before: no `end` record at all.
#[test]
fn a_flow_through_a_nat_gateway_ends_with_a_record() {
    let lab = Gateway::new();
    lab.take_redirects();
    let policy = format!("{TRANSLATING_POLICY}    udp_idle_timeout: 4\n");
    let (policy, log) = (lab.write_policy("policy.yaml", &policy), lab.dir.join("flows.jsonl"));
    let _agent = start_agent(&lab, &policy, &log, &["--flow-log-interval", "1"]);
    wait_for_policy(&lab);
    udp_echo(&lab.client, "203.0.113.10:5300");
    lab.server.run(|| {
        let s = UdpSocket::bind("198.51.100.10:41600").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for _ in 0..3 {
            s.send_to(&[7u8; 100], "203.0.113.10:5300").unwrap();
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).expect("the reply, through the NAT gateway");
        }
    });
    let records = ended(&log, 41600, 5300);
    assert!(records.len() >= 2, "a continuing record, then the end: {records:#?}");
    assert_eq!(totals_add_up(&records, "AllowInternetOutBound"), [3, 3 * 142, 3, 3 * 142]);
    let end = records.last().unwrap();
    assert_eq!(
        (&end["direction"], &end["src"], &end["nat"]["kind"], &end["nat"]["address"]),
        (&json!("outbound"), &json!(SERVER4), &json!("snat"), &json!("192.0.2.100")),
        "{end}"
    );
    for r in &records {
        println!("{r}");
    }
}

/// A TCP connection attempt from a fixed source port, with a short timeout.
fn socket2_connect(sport: u16) -> Option<TcpStream> {
    // std cannot bind a TCP client to a port; use a raw socket call.
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a fresh fd, which the TcpStream then owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_port = sport.to_be();
        addr.sin_addr.s_addr = u32::from_ne_bytes([203, 0, 113, 10]);
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let stream = TcpStream::from_raw_fd(fd);
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as u16;
        to.sin_port = 22u16.to_be();
        to.sin_addr.s_addr = u32::from_ne_bytes([198, 51, 100, 10]);
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        let ready = libc::poll(&mut pfd, 1, 1500);
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as u32;
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        );
        (ready > 0 && err == 0).then_some(stream)
    }
}

/// `xdpgate set add` moves the running generation on in place (no reload): the agent's flow
/// log still names the rule that decided a flow after it. Seen failing before the agent
/// followed the generation: the deny line had no `rule` until a SIGHUP.
#[test]
fn flow_log_lines_name_the_rule_after_a_set_add() {
    let lab = Gateway::new();
    let listed = "      - {name: deny-listed, priority: 100, direction: inbound, access: deny, \
                  protocol: udp, source: listed, destination: \"*\", destination_ports: 5353}\n";
    let text = POLICY
        .replace("priority: 100,", "priority: 150,")
        .replace("    rules:\n", &format!("    rules:\n{listed}"))
        + "sets:\n  listed: [192.0.2.99]\n";
    let (policy, log) = (lab.write_policy("policy.yaml", &text), lab.dir.join("flows.jsonl"));
    let _agent = start_agent(&lab, &policy, &log, &[]);
    wait_for_policy(&lab);
    udp_echo(&lab.server, "198.51.100.10:5353");
    let out = lab.pins.xdpgate(&["set", "add", "listed", CLIENT4]);
    assert!(out.contains("1 element added to set listed"), "{out}");
    lab.client.run(|| {
        let s = UdpSocket::bind(("203.0.113.10", 41700)).unwrap();
        s.send_to(&[7u8; 100], "198.51.100.10:5353").unwrap();
    });
    let denied = || -> Option<Value> {
        read_lines(&log)
            .into_iter()
            .find(|l| l["state"] == "deny" && l["src_port"] == 41700 && l["dst_port"] == 5353)
    };
    wait_until("the deny line", Duration::from_secs(10), || denied().is_some());
    let line = denied().unwrap();
    assert_eq!(
        (line["nsg"].as_str(), line["rule"].as_str(), line["decision"].as_str()),
        (Some("servers"), Some("deny-listed"), Some("deny")),
        "{line}"
    );
}

/// A flow's `begin` line comes before its `continuing` ones, also for a flow a walk finds
/// while its `begin` event still waits in the ring (read every 100 ms). The agent's loop is
/// held up once (stopped 150 ms, as a long reload would hold it), which moves its ring reads
/// to 50 ms after each walk starts; then new UDP flows every 10 ms for 4 s, each with two
/// exchanges (so established, with traffic, as the walks every second find it). (Seen
/// failing before the agent read the ring ahead of a walk's lines: 10 and 13 of 400
/// flows' first line was `continuing`.)
#[test]
fn a_flows_begin_comes_before_its_continuing_records() {
    let lab = Gateway::new();
    let (agent, flow) = EchoFlow::start(&lab);
    flow.exchange(2);
    flow.wait_for_continuing(2);
    // Walks start on the agent's 1 s tick: at this millisecond of every second.
    let time = flow.records("continuing")[0]["time"].as_str().unwrap().to_owned();
    let walk_ms: u64 = time[20..23].parse().unwrap();
    let now_ms = || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64
    };
    let resume_at = (now_ms() + 300) / 1000 * 1000 + 1000 + (walk_ms + 550) % 1000;
    thread::sleep(Duration::from_millis(resume_at - 150 - now_ms()));
    common::sigstop(agent.0.id());
    thread::sleep(Duration::from_millis(resume_at.saturating_sub(now_ms())));
    common::run("kill", &["-CONT", &agent.0.id().to_string()]);

    const FLOWS: u16 = 400;
    const FIRST: u16 = 43000;
    lab.client.run(|| {
        for sport in FIRST..FIRST + FLOWS {
            let s = UdpSocket::bind((EchoFlow::KEY.0, sport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Two exchanges: one alone is a lone exchange, never established.
            for _ in 0..2 {
                s.send_to(&[7u8; 100], (EchoFlow::KEY.1, EchoFlow::KEY.3)).unwrap();
                s.recv_from(&mut [0u8; 512]).expect("reply through the gateway");
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let last = FIRST + FLOWS - 1;
    wait_until("the last flow's continuing record", Duration::from_secs(10), || {
        of_flow(&flow.log, last, EchoFlow::KEY.3).iter().any(|l| l["state"] == "continuing")
    });
    let lines = read_lines(&flow.log);
    let (mut continued, mut disordered) = (0, Vec::new());
    for sport in FIRST..FIRST + FLOWS {
        let of: Vec<&Value> = lines.iter().filter(|l| l["src_port"] == sport).collect();
        assert!(!of.is_empty(), "no line of port {sport}");
        if of[0]["state"] != "begin" {
            disordered.push(of[0]);
        }
        continued += usize::from(of.iter().any(|l| l["state"] == "continuing"));
    }
    // Every flow lived through a walk with traffic since its begin.
    assert_eq!(continued, usize::from(FLOWS), "flows with a continuing record");
    assert!(disordered.is_empty(), "{} flows' first line: {disordered:#?}", disordered.len());
}
