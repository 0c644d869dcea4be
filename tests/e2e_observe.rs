//! `xdpgate observe` end to end, with real traffic through the gateway: a denied packet with
//! its rule, interface, reason and TCP flags (at XDP and at tc ingress); a load-balanced and
//! a NAT'd flow with their translated addresses and backend, and a `nat_unmatched` drop;
//! filters; a flood held to the rate limit with the held-back count reported; one observer
//! at a time, and a killed one's lease running out; the agent's flow log unaffected.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::{TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::gateway::{CLIENT4, Gateway, SERVER4, TRANSLATING_POLICY as POLICY};
use serde_json::Value;
use xdpgate_common::maps::MONITOR_LEASE;
use xdpgate_dataplane::{monitor, monotonic_ns};

/// A running `xdpgate observe --json`, its lines collected as they come.
struct Observer {
    child: common::KillOnDrop,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Observer {
    /// Starts one and waits until its lease runs: from then on the dataplane writes events
    /// into a ring the observer emptied before (`monitor::take`), so none sent after is lost.
    fn start(lab: &Gateway, args: &[&str]) -> Self {
        let mut child = common::KillOnDrop::new(
            Command::new(common::xdpgate_bin())
                .args(["--netns", &lab.gw.name, "--pin-dir"])
                .arg(lab.pins.dir.path())
                .args(["observe", "--json"])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn xdpgate observe"),
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, sink) = (child.stdout.take().unwrap(), lines.clone());
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("each line is JSON");
                sink.lock().unwrap().push(v);
            }
        });
        let start = Instant::now();
        while !monitor::observed(&lab.pins.dir).unwrap() {
            assert!(start.elapsed() < Duration::from_secs(10), "the observer took no lease");
            assert!(child.try_wait().unwrap().is_none(), "the observer exited");
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, lines }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line that `want` accepts; returns it.
    fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.lines().into_iter().find(&want) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no {what} in:\n{:#?}",
                self.lines()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn lab(hooks: [&str; 2]) -> Gateway {
    let lab = Gateway::with_hooks(hooks[0], hooks[1]);
    lab.apply("policy.yaml", POLICY);
    lab
}

/// One SSH connection attempt from the client (denied: it times out).
fn try_ssh(lab: &Gateway) {
    lab.client.run(|| {
        let to = "198.51.100.10:22".parse().unwrap();
        assert!(TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_err());
    });
}

fn denied_packet_is_named(hooks: [&str; 2]) {
    let lab = lab(hooks);
    let observer = Observer::start(&lab, &["--type", "drop"]);
    try_ssh(&lab);
    let e = observer.wait_for("denied SSH", |v| v["dst_port"] == 22);
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str(), e["rule"].clone()),
        (Some("denied"), Some("policy"), serde_json::json!({"nsg": "servers", "rule": "deny-ssh"})),
        "{e}"
    );
    assert_eq!((e["interface"].as_str(), e["hook"].as_str()), (Some(&*lab.ext), Some("ingress")));
    assert_eq!((e["src"].as_str(), e["dst"].as_str()), (Some(CLIENT4), Some(SERVER4)));
    assert_eq!((e["protocol"].as_str(), e["tcp_flags"].as_str()), (Some("tcp"), Some("SYN")));
    assert_eq!(e["direction"], "inbound");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    // `--type drop`: the allowed flows of other tests' kind are not shown.
    assert!(observer.lines().iter().all(|v| v["verdict"] != "allowed"));
}

#[test]
fn a_denied_packet_is_named_at_xdp() {
    denied_packet_is_named(["xdp", "xdp"]);
}

#[test]
fn a_denied_packet_is_named_at_tc() {
    denied_packet_is_named(["tc", "tc"]);
}

/// The host's own packets are judged by the tc egress program, which sends its events too:
/// the gateway's own ping out names the interface it leaves by, with hook `egress`.
#[test]
fn the_hosts_own_flows_are_seen_at_egress() {
    let lab = lab(["xdp", "xdp"]);
    let observer = Observer::start(&lab, &["--type", "flow", "--protocol", "icmp"]);
    lab.gw.exec("ping", &["-c", "1", "-W", "2", CLIENT4]);
    let e = observer.wait_for("the gateway's ping", |v| v["hook"] == "egress");
    assert_eq!(
        (e["src"].as_str(), e["dst"].as_str(), e["interface"].as_str()),
        (Some("203.0.113.1"), Some(CLIENT4), Some(&*lab.ext)),
        "{e}"
    );
    assert_eq!(
        (e["verdict"].as_str(), e["direction"].as_str()),
        (Some("allowed"), Some("outbound"))
    );
    // A ping: its identifier, no ports and no other kind.
    let null = Some(&Value::Null);
    assert!(
        e["icmp_id"].is_u64() && e.get("src_port") == null && e.get("icmp_type") == null,
        "{e}"
    );
}

/// Text output: one line per event, within 100 columns, ending after `--count`.
#[test]
fn text_lines_name_the_event_within_100_columns() {
    let lab = lab(["xdp", "xdp"]);
    let mut child = common::KillOnDrop::new(
        Command::new(common::xdpgate_bin())
            .args(["--netns", &lab.gw.name, "--pin-dir"])
            .arg(lab.pins.dir.path())
            .args(["observe", "--type", "drop", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xdpgate observe"),
    );
    let start = Instant::now();
    while !monitor::observed(&lab.pins.dir).unwrap() {
        assert!(start.elapsed() < Duration::from_secs(10), "the observer took no lease");
        thread::sleep(Duration::from_millis(20));
    }
    try_ssh(&lab);
    // A deadline, not a wait without end: an event that never comes fails the test.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the observer printed no event");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(line.len() <= 100, "{} columns: {line}", line.len());
    for part in [
        "denied",
        &format!("{} in", lab.ext),
        "tcp 203.0.113.10:",
        "-> 198.51.100.10:22 SYN servers/deny-ssh",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
}

/// A load-balanced flow shows the backend it was sent to; a NAT'd one the public address
/// and port it left with; a packet to the public address that matches no translation is a
/// `nat_unmatched` drop. (At tc: an XDP redirect into a veth needs an XDP program on its
/// peer, which the client and server do not have.)
#[test]
fn translated_flows_show_their_backend_and_public_address() {
    let lab = lab(["tc", "tc"]);
    let observer = Observer::start(&lab, &[]);
    let web = lab.server.run(|| TcpListener::bind("198.51.100.10:8080").unwrap());
    thread::spawn(move || while web.accept().is_ok() {});
    let connected = lab.client.run(|| {
        TcpStream::connect_timeout(&"192.0.2.10:80".parse().unwrap(), Duration::from_secs(3))
            .map(|_| ())
    });
    assert!(
        connected.is_ok(),
        "the load balancer forwards to the backend: {connected:?}\n{:#?}\n{}",
        observer.lines(),
        lab.pins.xdpgate(&["stats"])
    );
    let e = observer.wait_for("load-balanced flow", |v| v["dst_port"] == 80);
    assert_eq!(e["verdict"], "translated", "{e}");
    assert_eq!((e["dst"].as_str(), e["src"].as_str()), (Some("192.0.2.10"), Some(CLIENT4)));
    assert_eq!(
        (e["translated"]["dst"].as_str(), e["translated"]["dst_port"].as_u64()),
        (Some(SERVER4), Some(8080)),
        "{e}"
    );
    assert_eq!(
        e["backend"],
        serde_json::json!({"load_balancer": "lb", "rule": "http", "address": SERVER4})
    );
    assert_eq!(
        (e["rule"]["rule"].as_str(), e["tcp_flags"].as_str()),
        (Some("allow-web"), Some("SYN"))
    );

    // Out through the NAT gateway: the server connects to the client.
    let listener = lab.client.run(|| TcpListener::bind("203.0.113.10:9000").unwrap());
    thread::spawn(move || while listener.accept().is_ok() {});
    lab.server.run(|| {
        TcpStream::connect_timeout(&"203.0.113.10:9000".parse().unwrap(), Duration::from_secs(3))
            .expect("out through the NAT gateway");
    });
    let e = observer.wait_for("NAT'd flow", |v| v["dst_port"] == 9000);
    assert_eq!(
        (e["verdict"].as_str(), e["direction"].as_str()),
        (Some("translated"), Some("outbound"))
    );
    assert_eq!((e["src"].as_str(), e["interface"].as_str()), (Some(SERVER4), Some(&*lab.int)));
    assert_eq!(e["translated"]["src"], "192.0.2.100", "{e}");
    assert!(e["translated"]["src_port"].as_u64().is_some(), "{e}");
    assert_eq!(e["translated"]["dst"], CLIENT4);

    // To the public address, matching no translation.
    lab.client.run(|| {
        UdpSocket::bind("203.0.113.10:0").unwrap().send_to(b"x", "192.0.2.100:7777").unwrap();
    });
    let e = observer.wait_for("nat_unmatched drop", |v| v["dst_port"] == 7777);
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str()),
        (Some("dropped"), Some("nat_unmatched"))
    );
    assert_eq!((e["interface"].as_str(), e["protocol"].as_str()), (Some(&*lab.ext), Some("udp")));
}

/// The filters select: only denied packets to port 22 are shown, not the allowed DNS flow
/// sent before them.
#[test]
fn filters_select_events() {
    let lab = lab(["xdp", "xdp"]);
    let observer =
        Observer::start(&lab, &["--dst", "198.51.100.0/24", "--port", "22", "--verdict", "denied"]);
    common::echo::udp_echo(&lab.server, "198.51.100.10:5353");
    lab.client.run(|| {
        let s = UdpSocket::bind("203.0.113.10:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(b"q", "198.51.100.10:5353").unwrap();
        s.recv_from(&mut [0u8; 64]).expect("DNS answered");
        // Denied, but not port 22.
        s.send_to(b"q", "198.51.100.10:9999").unwrap();
    });
    try_ssh(&lab);
    observer.wait_for("denied SSH", |v| v["dst_port"] == 22);
    for v in observer.lines() {
        assert_eq!(
            (v["dst_port"].as_u64(), v["verdict"].as_str()),
            (Some(22), Some("denied")),
            "{v}"
        );
    }
}

/// A flood of denied packets gets at most the rate limit's events (per CPU); the rest are
/// counted and the observer says how many it missed.
#[test]
fn a_flood_is_rate_limited_and_the_held_back_count_reported() {
    let lab = lab(["xdp", "xdp"]);
    let observer = Observer::start(&lab, &["--type", "drop", "--port", "9999"]);
    const FLOOD: usize = 30_000;
    resolve_gateway(&lab);
    // A veth drops what its peer's ring cannot take before the gateway's program sees it:
    // the packets the gateway saw are those the client's end did not drop.
    let dropped_before = tx_dropped(&lab);
    lab.client.run(|| {
        let s = UdpSocket::bind("203.0.113.10:0").unwrap();
        for _ in 0..FLOOD {
            s.send_to(&[0u8; 16], "198.51.100.10:9999").unwrap();
        }
    });
    let seen = FLOOD - (tx_dropped(&lab) - dropped_before);
    let report = observer.wait_for("held-back report", |v| v["held_back"].as_u64() > Some(0));
    // Every denied packet is an event or counted (held back, or lost to a full ring); the
    // counts cover every drop, these and any other.
    let accounted = |lines: &[Value]| {
        let n = |key: &str| lines.iter().filter_map(|v| v[key].as_u64()).sum::<u64>() as usize;
        lines.iter().filter(|v| v["dst_port"] == 9999).count() + n("held_back") + n("lost")
    };
    let start = Instant::now();
    while accounted(&observer.lines()) < seen {
        assert!(start.elapsed() < Duration::from_secs(10), "{seen} seen: {:#?}", observer.lines());
        thread::sleep(Duration::from_millis(100));
    }
    let shown = observer.lines().iter().filter(|v| v["dst_port"] == 9999).count();
    println!(
        "{FLOOD} denied datagrams, {seen} reached the gateway: {shown} events, first report {report}"
    );
    assert!(shown > 0 && shown < seen, "{shown} events for {seen} packets");
    let e = observer.wait_for("an event", |v| v["dst_port"] == 9999);
    assert_eq!(e["rule"]["rule"], "DenyAllInBound", "{e}");
}

/// Makes the client know the gateway's MAC address: until then its kernel queues a few
/// hundred packets and drops the rest, which the gateway never sees.
fn resolve_gateway(lab: &Gateway) {
    lab.client.run(|| {
        UdpSocket::bind("203.0.113.10:0").unwrap().send_to(b"", "198.51.100.10:9").unwrap();
    });
    let start = Instant::now();
    loop {
        let out = lab.client.exec("ip", &["-j", "neigh", "show", "203.0.113.1"]);
        let neigh: Value = serde_json::from_slice(&out.stdout).expect("ip json");
        if neigh[0]["state"].as_array().is_some_and(|s| s.contains(&"REACHABLE".into())) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the gateway's address: {neigh}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The packets the client's veth dropped on sending (its peer's ring was full).
fn tx_dropped(lab: &Gateway) -> usize {
    let out = lab.client.exec("ip", &["-j", "-s", "link", "show", "dev", &lab.client_if]);
    let links: Value = serde_json::from_slice(&out.stdout).expect("ip json");
    links[0]["stats64"]["tx"]["dropped"].as_u64().expect("tx dropped") as usize
}

/// One observer at a time: a second is refused and says why. One killed with SIGKILL stops
/// costing once its lease runs out (the dataplane writes no more events), and a new observer
/// then works.
#[test]
fn a_killed_observer_stops_costing_and_a_new_one_works() {
    let lab = lab(["xdp", "xdp"]);
    let mut first = Observer::start(&lab, &["--type", "drop"]);
    let second = lab.pins.try_xdpgate(&["observe", "--count", "1"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("another xdpgate observe"), "{err}");

    first.child.kill().unwrap(); // SIGKILL: no chance to end its lease
    first.child.wait().unwrap();
    // 50 ms past the lease's end: the dataplane reads it on its coarse clock, which lags by
    // up to two ticks.
    let lapsed = lease_end(&lab) + 50_000_000;
    let start = Instant::now();
    while monitor::observed(&lab.pins.dir).unwrap() || monotonic_ns() < lapsed {
        assert!(start.elapsed() < Duration::from_secs(10), "the lease never ran out");
        thread::sleep(Duration::from_millis(20));
    }
    // Nothing reads the ring now: a denied packet must leave it empty.
    let mut ring = monitor::ring(&lab.pins.dir).unwrap();
    while ring.next().is_some() {}
    let policy_drops = || {
        let v: Value = serde_json::from_str(&lab.pins.xdpgate(&["stats", "--json"])).unwrap();
        v.to_string()
    };
    let before = policy_drops();
    try_ssh(&lab);
    while policy_drops() == before {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(ring.next().is_none(), "the dataplane still writes events for a dead observer");
    drop(ring);

    let again = Observer::start(&lab, &["--type", "drop", "--count", "1"]);
    try_ssh(&lab);
    again.wait_for("denied SSH", |v| v["dst_port"] == 22);
}

/// Ctrl-C (SIGINT) ends an observer cleanly: exit status 0, and its lease ended at once
/// (not left to run out).
#[test]
fn ctrl_c_ends_the_observer_and_its_lease() {
    let lab = lab(["xdp", "xdp"]);
    let mut observer = Observer::start(&lab, &[]);
    // SAFETY: a signal to the child this test spawned.
    assert_eq!(unsafe { libc::kill(observer.child.id() as i32, libc::SIGINT) }, 0);
    let status = observer.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!monitor::observed(&lab.pins.dir).unwrap(), "the lease outlived its observer");
}

/// The agent's flow log gets its events while an observer runs: the two rings are separate.
#[test]
fn the_flow_log_keeps_its_events_while_observing() {
    let lab = lab(["xdp", "xdp"]);
    let policy = lab.write_policy("policy.yaml", POLICY);
    let log = lab.dir.join("flows.jsonl");
    let _agent = common::KillOnDrop::new(
        lab.pins.agent(&policy).arg("--flow-log").arg(&log).spawn().expect("spawn xdpgate run"),
    );
    let start = Instant::now();
    loop {
        let v: Value = serde_json::from_str(&lab.pins.xdpgate(&["status", "--json"])).unwrap();
        if v["agent"]["running"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the agent did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let observer = Observer::start(&lab, &["--type", "drop"]);
    try_ssh(&lab);
    observer.wait_for("denied SSH", |v| v["dst_port"] == 22);
    let start = Instant::now();
    let logged = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"deny\"") && l.contains("\"dst_port\":22"))
            .count()
    };
    while logged() == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the flow log got no deny");
        thread::sleep(Duration::from_millis(100));
    }
}

/// When the observers' lease now ends (CLOCK_MONOTONIC ns).
fn lease_end(lab: &Gateway) -> u64 {
    let map: aya::maps::Array<aya::maps::MapData, u64> =
        lab.pins.dir.open_map(MONITOR_LEASE).unwrap().try_into().unwrap();
    map.get(&0, 0).unwrap()
}

/// An observer blocked writing to a reader that stopped reading, under sustained events,
/// keeps its lease (a thread of its own renews it): the dataplane keeps sending it events.
#[test]
fn an_observer_blocked_on_its_reader_keeps_its_lease() {
    let lab = lab(["xdp", "xdp"]);
    let mut child = common::KillOnDrop::new(
        Command::new(common::xdpgate_bin())
            .args(["--netns", &lab.gw.name, "--pin-dir"])
            .arg(lab.pins.dir.path())
            .args(["observe", "--json", "--type", "drop"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xdpgate observe"),
    );
    // Held, never read: the pipe fills.
    let unread = child.stdout.take().unwrap();
    let pid = child.id();
    let wchan = || std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let start = Instant::now();
    while !wchan().contains("pipe_write") {
        assert!(start.elapsed() < Duration::from_secs(20), "the observer never blocked");
        // Denied datagrams: drop events, up to the rate limit's 1,000 a second per CPU.
        lab.client.run(|| {
            let s = UdpSocket::bind("203.0.113.10:0").unwrap();
            for _ in 0..500 {
                s.send_to(&[0u8; 16], "198.51.100.10:9999").unwrap();
            }
        });
        thread::sleep(Duration::from_millis(50));
    }
    let held = lease_end(&lab);
    let start = Instant::now();
    // 50 ms past it: the dataplane's coarse clock lags by up to two ticks.
    while monotonic_ns() < held + 50_000_000 {
        assert!(start.elapsed() < Duration::from_secs(10));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(wchan().contains("pipe_write"), "the observer is still blocked");
    assert!(monitor::observed(&lab.pins.dir).unwrap(), "the blocked observer's lease lapsed");
    drop(unread);
}
