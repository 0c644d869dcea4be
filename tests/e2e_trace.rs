//! `xdpgate trace` against a live gateway (tests/common's `Gateway`, at XDP and at tc): the
//! deciding rule of an allowed and a denied packet is `verify-flow`'s, a load balancer's
//! frontend shows its backend and rewrite, a NAT gateway's flow its SNAT stage, and no trace
//! leaves a flow entry, a NAT claim or a moved counter behind.

mod common;

use common::gateway::{CLIENT4, Gateway, SERVER4};

/// NSG: web (80) allowed from the Internet, SSH (22) denied; a load balancer 192.0.2.10:80
/// over three backends; the subnet's NAT gateway 192.0.2.100.
const POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [80, 8080]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: web, backends: [198.51.100.11, 198.51.100.12, 198.51.100.13]}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: web}
      - {name: ssh, frontend: vip, protocol: tcp, frontend_port: 22, backend_pool: web}
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn trace(gw: &Gateway, iface: &str, src: &str, dst: &str, port: &str) -> serde_json::Value {
    trace_with(gw, iface, src, dst, port, &[])
}

/// `trace` of a TCP packet with `extra` arguments.
fn trace_with(
    gw: &Gateway,
    iface: &str,
    src: &str,
    dst: &str,
    port: &str,
    extra: &[&str],
) -> serde_json::Value {
    let args = ["trace", "--json", "--iface", iface, "--src", src, "--dst", dst];
    let tcp = ["--protocol", "tcp", "--dst-port", port];
    json(&gw.pins.xdpgate(&[&args[..], &tcp, extra].concat()))
}

/// The deciding rules verify-flow names for an inbound TCP flow to `SERVER4:port`, and
/// whether it allows it.
fn verify(gw: &Gateway, port: u16) -> (bool, Vec<String>) {
    let out = gw.pins.try_xdpgate(&[
        "verify-flow",
        "--json",
        "--direction",
        "inbound",
        "--protocol",
        "tcp",
        "--local",
        &format!("{SERVER4}:{port}"),
        "--remote",
        &format!("{CLIENT4}:40000"),
    ]);
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let rules = v["decided_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{}/{}", h["nsg"].as_str().unwrap(), h["rule"].as_str().unwrap()))
        .collect();
    (v["allowed"].as_bool().unwrap(), rules)
}

fn rule_of(t: &serde_json::Value) -> String {
    rule_on(t, "inbound")
}

/// The deciding rule of a trace's `side`, inbound or outbound.
fn rule_on(t: &serde_json::Value, side: &str) -> String {
    let r = &t["rules"][side];
    format!("{}/{}", r["nsg"].as_str().unwrap_or("?"), r["rule"].as_str().unwrap_or("?"))
}

/// Everything a trace must leave alone, in two parts: the flows, the NAT translations and
/// every counter but the interfaces'; and the interfaces' counters, which the links' own
/// packets (ARP) also move.
fn state(gw: &Gateway) -> (serde_json::Value, serde_json::Value) {
    let mut flows = json(&gw.pins.xdpgate(&["flows", "--json", "--top", "0"]));
    // The one field that moves by itself: time since the flow's last packet.
    for f in flows.as_array_mut().unwrap() {
        f.as_object_mut().unwrap().remove("idle_seconds");
    }
    let nat = json(&gw.pins.xdpgate(&["nat", "--json"]));
    let mut stats = json(&gw.pins.xdpgate(&["stats", "--json"]));
    let interfaces = stats.as_object_mut().unwrap().remove("interfaces").unwrap();
    (serde_json::json!({"flows": flows, "nat": nat, "stats": stats}), interfaces)
}

/// Runs `traces` (traces and reads of the tables only: no packet crosses the gateway) and
/// checks they left [`state`] alone. The tables and the other counters are compared once,
/// from before the first try to after the last, so that a trace that changed them only once
/// (later tries finding its entry in place) fails. The interface counters are compared
/// around each try: the tests' links carry no IPv6 ([`Gateway::without_ipv6`]), whose
/// multicast listener reports moved them between the reads in a CI run, but any other
/// packet the links send by themselves could still come between two reads, so a difference
/// there is the traces' only if each of five tries shows one.
fn assert_leaves_state_alone(gw: &Gateway, what: &str, mut traces: impl FnMut()) {
    let (first, mut before) = state(gw);
    for tries in 1.. {
        traces();
        let (last, after) = state(gw);
        if after == before || tries == 5 {
            assert_eq!(
                last, first,
                "{what}: the tables or counters, from the first try to the last"
            );
            assert_eq!(after, before, "{what}: the interface counters, in each of {tries} tries");
            return;
        }
        before = after;
    }
}

fn traces_agree_with_verify_flow(gw: Gateway) {
    gw.pins.apply(POLICY);
    assert_leaves_state_alone(&gw, "a trace changed the flows, translations or counters", || {
        traces_and_verify_flow(&gw)
    });
}

fn traces_and_verify_flow(gw: &Gateway) {
    let allowed = trace(gw, &gw.ext, CLIENT4, SERVER4, "80");
    let (ok, rules) = verify(gw, 80);
    assert!(ok);
    assert_eq!(allowed["verdict"], "pass", "{allowed:#}");
    assert_eq!(vec![rule_of(&allowed)], rules, "{allowed:#}");
    assert_eq!(rule_of(&allowed), "web/allow-web");

    let denied = trace(gw, &gw.ext, CLIENT4, SERVER4, "22");
    let (ok, rules) = verify(gw, 22);
    assert!(!ok);
    assert_eq!(
        (&denied["verdict"], &denied["reason"]),
        (&"drop".into(), &"policy".into()),
        "{denied:#}"
    );
    assert_eq!(vec![rule_of(&denied)], rules, "{denied:#}");
    assert_eq!(rule_of(&denied), "web/deny-ssh");

    let lb = trace(gw, &gw.ext, CLIENT4, "192.0.2.10", "80");
    let stages = lb["stages"].as_array().unwrap();
    let said = |name: &str| {
        stages
            .iter()
            .find(|s| s["stage"] == name)
            .map(|s| s["decision"].as_str().unwrap().to_owned())
    };
    let chosen = said("lb").unwrap_or_else(|| panic!("no lb stage: {lb:#}"));
    let backend = ["198.51.100.11", "198.51.100.12", "198.51.100.13"]
        .into_iter()
        .find(|b| chosen.ends_with(&format!("backend {b}")))
        .unwrap_or_else(|| panic!("no backend in {chosen:?}"));
    assert!(chosen.starts_with("lb/http"), "{chosen}");
    let rewrite = said("rewrite").unwrap_or_else(|| panic!("no rewrite: {lb:#}"));
    assert_eq!(rewrite, format!("destination to {backend}:8080 (load balancer)"));
    assert_eq!(rule_of(&lb), "web/allow-web");

    // A frontend's packet the NSG denies (at its backend's port 22) shows the load
    // balancer's choice, and no rewrite. (Before: "not a frontend". Seen failing.)
    let denied = trace(gw, &gw.ext, CLIENT4, "192.0.2.10", "22");
    let stages = denied["stages"].as_array().unwrap();
    let said =
        |name: &str| stages.iter().find(|s| s["stage"] == name).map(|s| s["decision"].clone());
    let chosen = said("lb").unwrap_or_else(|| panic!("no lb stage: {denied:#}"));
    assert!(chosen.as_str().unwrap().starts_with("lb/ssh: backend 198.51.100.1"), "{denied:#}");
    assert_eq!((rule_of(&denied), said("rewrite")), ("web/deny-ssh".into(), None), "{denied:#}");
    assert_eq!(denied["verdict"], "drop", "{denied:#}");

    let out = trace(gw, &gw.int, SERVER4, CLIENT4, "443");
    let stages: Vec<_> =
        out["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(stages.contains(&"snat"), "{out:#}");

    let text = gw.pins.xdpgate(&[
        "trace",
        "--iface",
        &gw.ext,
        "--src",
        CLIENT4,
        "--dst",
        SERVER4,
        "--protocol",
        "tcp",
        "--dst-port",
        "22",
    ]);
    assert!(
        text.contains("denied by inbound web/deny-ssh") && text.contains("verdict: drop (policy)"),
        "{text}"
    );
}

/// A packet of a live flow is reported from the flow's entry (a hit), and the entry is left
/// as it was; its reply direction's rewrite is the NAT gateway's undone; a packet the policy
/// drops is not rewritten; bad flags are refused. (Before: the reply's rewrite was labelled
/// "(load balancer)", and a dropped packet of a translated flow showed a rewrite. Seen
/// failing.)
#[test]
fn a_flow_packet_is_a_hit_and_leaves_its_entry_alone() {
    let gw = Gateway::tc().without_ipv6();
    gw.pins.apply(POLICY);
    // A datagram from the subnet opens a flow through the NAT gateway.
    let rx = gw.client.run(|| {
        let s = std::net::UdpSocket::bind((CLIENT4, 5300)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s
    });
    gw.server.run(|| {
        let s = std::net::UdpSocket::bind((SERVER4, 40100)).unwrap();
        s.send_to(b"flow", (CLIENT4, 5300)).unwrap();
    });
    let (_, public) = rx.recv_from(&mut [0u8; 16]).expect("the datagram crossed the gateway");
    let flows = |gw: &Gateway| {
        json(&gw.pins.xdpgate(&["flows", "--json", "--top", "0", "--port", "40100"]))
    };
    let start = std::time::Instant::now();
    while flows(&gw).as_array().is_none_or(|a| a.is_empty()) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no flow for the datagram");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_leaves_state_alone(&gw, "the trace touched the flow's entry or a counter", || {
        let out = gw.pins.xdpgate(&[
            "trace",
            "--iface",
            &gw.int,
            "--src",
            SERVER4,
            "--dst",
            CLIENT4,
            "--protocol",
            "udp",
            "--src-port",
            "40100",
            "--dst-port",
            "5300",
        ]);
        assert!(out.contains("lookup    hit: ") && out.contains("source to 192.0.2.100:"), "{out}");
    });
    let stage = |t: &serde_json::Value, name: &str| {
        let stages = t["stages"].as_array().unwrap();
        stages
            .iter()
            .find(|s| s["stage"] == name)
            .map(|s| s["decision"].as_str().unwrap().to_owned())
    };
    let udp = |iface: &str, src: &str, sport: u16, dst: &str, dport: u16| {
        let args = ["trace", "--json", "--iface", iface, "--src", src, "--dst", dst];
        let (sport, dport) = (sport.to_string(), dport.to_string());
        let udp = ["--protocol", "udp", "--src-port", &sport, "--dst-port", &dport];
        json(&gw.pins.xdpgate(&[&args[..], &udp].concat()))
    };
    let answer = udp(&gw.ext, CLIENT4, 5300, &public.ip().to_string(), public.port());
    let undone = format!("destination back to {SERVER4}:40100 (NAT gateway's reply)");
    let lookup = stage(&answer, "lookup").unwrap_or_default();
    assert!(lookup.contains("reply direction") && lookup.ends_with(&undone), "{answer:#}");

    // Judged again under a policy that denies it: dropped before any rewrite.
    let deny = "      - {name: deny-5300, priority: 100, direction: outbound, access: deny, \
                protocol: udp, source: [\"*\"], destination: [\"*\"], destination_ports: [5300]}\n";
    let denying = POLICY.replacen("load_balancers:", &format!("{deny}load_balancers:"), 1);
    gw.pins.apply(&denying);
    let dropped = udp(&gw.int, SERVER4, 40100, CLIENT4, 5300);
    assert_eq!(
        (&dropped["verdict"], rule_on(&dropped, "outbound")),
        (&"drop".into(), "web/deny-5300".into()),
        "{dropped:#}"
    );
    assert_eq!(stage(&dropped, "rewrite"), None, "{dropped:#}");

    for (args, says) in [
        (
            &["--protocol", "udp", "--dst-port", "53", "--tcp-flags", "S"][..],
            "only for --protocol tcp",
        ),
        (&["--protocol", "icmp", "--dst-port", "53"][..], "icmp has no ports"),
        (&["--protocol", "esp"][..], "trace crafts tcp, udp or icmp"),
    ] {
        let full =
            [&["trace", "--iface", &gw.ext, "--src", CLIENT4, "--dst", SERVER4][..], args].concat();
        let out = gw.pins.try_xdpgate(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn trace_at_xdp_agrees_with_verify_flow_and_changes_nothing() {
    traces_agree_with_verify_flow(Gateway::new().without_ipv6());
}

#[test]
fn trace_at_tc_agrees_with_verify_flow_and_changes_nothing() {
    traces_agree_with_verify_flow(Gateway::tc().without_ipv6());
}

/// Traces run side by side each report their own packet: one at a time (the second waits),
/// neither clearing the other's record before it is read.
#[test]
fn concurrent_traces_each_report_their_own_packet() {
    let gw = Gateway::tc();
    gw.pins.apply(POLICY);
    std::thread::scope(|s| {
        for (port, verdict) in [("80", "pass"), ("22", "drop")] {
            let gw = &gw;
            s.spawn(move || {
                for _ in 0..25 {
                    let t = trace(gw, &gw.ext, CLIENT4, SERVER4, port);
                    assert_eq!(t["verdict"], verdict, "port {port}: {t:#}");
                }
            });
        }
    });
}

/// With mid-stream pickup on, a traced TCP segment of no flow (an ACK) goes through the
/// new-flow stage as a picked-up flow would, and moves no counter (picked_up included).
#[test]
fn a_traced_midstream_segment_moves_no_counter() {
    let gw = Gateway::tc().without_ipv6();
    gw.pins.apply(&format!("settings:\n  midstream_pickup: true\n{POLICY}"));
    assert_leaves_state_alone(&gw, "the traced segment moved a counter", || {
        let t = trace_with(&gw, &gw.ext, CLIENT4, SERVER4, "80", &["--tcp-flags", "A"]);
        assert_eq!(t["verdict"], "pass", "{t:#}");
        assert_eq!(rule_of(&t), "web/allow-web", "{t:#}");
    });
}

/// The marker the trace command put on its packets before markers were drawn at random:
/// what a forger would write.
const OLD_MARKER: u64 = 0x7872_6761_7465_5452;

/// `bpf(2)` with `attr` (a `union bpf_attr` laid out by hand); the returned descriptor.
fn bpf(cmd: u32, attr: &mut [u64; 18]) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: attr is as large as the kernel's bpf_attr and valid for `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    assert!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches, at tcx ingress of `ifname` ahead of every other program (xdpgate's), a
/// classifier that writes `marker` into the socket buffer's `cb[0]` and `cb[1]` and passes
/// it on; held while the returned link lives. Run in the interface's namespace.
fn mark_cb_before_xdpgate(ifname: &str, marker: u64) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    // r2 = lo; *(u32 *)(r1 + cb[0]) = r2; r2 = hi; *(u32 *)(r1 + cb[1]) = r2;
    // r0 = TCX_NEXT (-1); exit. Instructions: code, dst | src << 4, offset, immediate.
    let insn = |code: u8, regs: u8, off: i16, imm: i32| {
        u64::from(code)
            | u64::from(regs) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    };
    let (mov_imm, stx_w, exit) = (0xb7, 0x63, 0x95);
    let insns = [
        insn(mov_imm, 2, 0, marker as u32 as i32),
        insn(stx_w, 1 | 2 << 4, 48, 0),
        insn(mov_imm, 2, 0, (marker >> 32) as u32 as i32),
        insn(stx_w, 1 | 2 << 4, 52, 0),
        insn(mov_imm, 0, 0, -1),
        insn(exit, 0, 0, 0),
    ];
    let license = c"GPL";
    let mut attr = [0u64; 18];
    // prog_type (SCHED_CLS), insn_cnt; insns; license.
    attr[0] = 3 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let prog = bpf(5, &mut attr); // BPF_PROG_LOAD
    let ifindex = xdpgate_dataplane::ifindex(ifname).unwrap();
    let mut attr = [0u64; 18];
    // prog_fd, target_ifindex; attach_type BPF_TCX_INGRESS (46), flags BPF_F_BEFORE (8)
    // with no relative program: ahead of all.
    attr[0] = prog.as_raw_fd() as u64 | u64::from(ifindex) << 32;
    attr[1] = 46 | 8 << 32;
    bpf(28, &mut attr) // BPF_LINK_CREATE
}

/// A real packet whose control block another tcx program set to a trace marker before
/// xdpgate's program ran is handled as real traffic: its flow is created, it is translated
/// by the NAT gateway and counted.
#[test]
fn a_real_packet_carrying_a_marker_is_not_taken_for_a_trace() {
    let gw = Gateway::tc();
    gw.pins.apply(POLICY);
    let int = gw.int.clone();
    let _link = gw.gw.run(move || mark_cb_before_xdpgate(&int, OLD_MARKER));
    let rx = gw.client.run(|| {
        let s = std::net::UdpSocket::bind((CLIENT4, 5400)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s
    });
    gw.server.run(|| {
        let s = std::net::UdpSocket::bind((SERVER4, 40200)).unwrap();
        s.send_to(b"real", (CLIENT4, 5400)).unwrap();
    });
    let mut buf = [0u8; 16];
    let (n, from) = rx.recv_from(&mut buf).expect("the datagram crossed the gateway");
    assert_eq!(&buf[..n], b"real");
    assert_eq!(from.ip().to_string(), "192.0.2.100", "translated by the NAT gateway");
    let flows = json(&gw.pins.xdpgate(&["flows", "--json", "--top", "0", "--port", "40200"]));
    assert_eq!(flows.as_array().map(Vec::len), Some(1), "{flows:#}");
}

/// UDP 9000 allowed from the Internet, but not from the set `blocked` (empty at first); UDP
/// and embryonic flows idle out after 4 s.
const STALE_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
settings: {udp_idle_timeout: 4, embryonic_timeout: 4}
sets:
  blocked: []
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: deny-blocked, priority: 100, direction: inbound, access: deny, protocol: "*", source: blocked, destination: "*", destination_ports: "*"}
      - {name: allow-udp, priority: 110, direction: inbound, access: allow, protocol: udp, source: [Internet], destination: ["*"], destination_ports: [9000]}
"#;

/// A packet of a flow the running policy would judge again (decided before a set change
/// denied its source) is traced as the real packet is decided: classified again, dropped
/// by the deny, the entry left as it is; a real datagram then meets the same. A packet of a
/// flow idled out is a new flow's. (Before: `pass`, from the entry, while real datagrams
/// were dropped; and a hit on the idle entry. Both seen failing.)
#[test]
fn a_flow_judged_again_or_idled_out_is_traced_as_the_lookups_see_it() {
    let gw = Gateway::new().without_ipv6();
    gw.pins.apply(STALE_POLICY);
    let send = |gw: &Gateway, port: u16| {
        gw.client.run(move || {
            let s = std::net::UdpSocket::bind((CLIENT4, port)).unwrap();
            s.send_to(b"flow", (SERVER4, 9000)).unwrap();
        })
    };
    let flows = |gw: &Gateway, port: u16| {
        let out = gw.pins.xdpgate(&["flows", "--json", "--top", "0", "--port", &port.to_string()]);
        json(&out).as_array().unwrap().len()
    };
    let wait_flows = |gw: &Gateway, port: u16, want: usize| {
        let start = std::time::Instant::now();
        while flows(gw, port) != want {
            assert!(start.elapsed().as_secs() < 10, "port {port}: not {want} flows");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let udp = |gw: &Gateway, port: u16| {
        let args = ["trace", "--json", "--iface", &gw.ext, "--src", CLIENT4, "--dst", SERVER4];
        let port = port.to_string();
        let udp = ["--protocol", "udp", "--src-port", &port, "--dst-port", "9000"];
        json(&gw.pins.xdpgate(&[&args[..], &udp].concat()))
    };
    let lookup = |t: &serde_json::Value| {
        let stages = t["stages"].as_array().unwrap();
        let s = stages.iter().find(|s| s["stage"] == "lookup").expect("a lookup stage");
        s["decision"].as_str().unwrap().to_owned()
    };

    send(&gw, 6122);
    wait_flows(&gw, 6122, 1);
    let t = udp(&gw, 6122);
    assert_eq!((&t["verdict"], rule_of(&t)), (&"pass".into(), "web/allow-udp".into()), "{t:#}");

    gw.pins.xdpgate(&["set", "add", "blocked", CLIENT4]);
    assert_leaves_state_alone(&gw, "a trace judging a flow again changed it", || {
        let t = udp(&gw, 6122);
        assert_eq!(
            (&t["verdict"], &t["reason"], rule_of(&t)),
            (&"drop".into(), &"policy".into(), "web/deny-blocked".into()),
            "{t:#}"
        );
        assert!(lookup(&t).contains("classified again"), "{t:#}");
    });
    send(&gw, 6122);
    wait_flows(&gw, 6122, 0);

    gw.pins.xdpgate(&["set", "del", "blocked", CLIENT4]);
    send(&gw, 6123);
    wait_flows(&gw, 6123, 1);
    assert!(lookup(&udp(&gw, 6123)).starts_with("hit: embryonic flow"));
    // Past the 4 s timeouts: the lookups would take it for a new flow.
    std::thread::sleep(std::time::Duration::from_millis(5500));
    let t = udp(&gw, 6123);
    assert_eq!(
        (lookup(&t), &t["verdict"]),
        ("miss: no flow, a new flow".into(), &"pass".into()),
        "{t:#}"
    );
}

/// The packets the external interface's ingress program redirected and passed, from the
/// dataplane's own counters.
fn external_verdicts(gw: &Gateway) -> (u64, u64) {
    let stats = xdpgate_dataplane::stats::read(&gw.pins.dir).expect("stats");
    let ext = stats.interfaces.iter().find(|i| i.role == Some("external")).expect("external");
    (ext.verdict("redirect").packets, ext.verdict("pass").packets)
}

/// A packet of an open load-balanced connection (both ways) is traced as the act stage
/// forwards it, which a trace does not run for an existing flow: redirected where the hooks
/// allow it (XDP into an XDP interface; tc into any attached one), else passed to the
/// stack, as the dataplane's counters show for the connection's real packets. (Before:
/// `pass`, the record's default, while the packets were redirected. Seen failing.)
#[test]
fn an_existing_translated_flow_is_traced_as_the_act_stage_forwards_it() {
    use std::{
        io::Write,
        net::{TcpListener, TcpStream},
        time::Duration,
    };
    for (int_hook, forward) in [("xdp", "redirect"), ("tc", "pass")] {
        let gw = Gateway::with_hooks("xdp", int_hook);
        gw.take_redirects();
        gw.pins.apply(common::gateway::TRANSLATING_POLICY);
        // The neighbours, so that the FIB answers in full from the first packet.
        gw.gw.exec("ping", &["-c", "1", "-W", "1", SERVER4]);
        gw.gw.exec("ping", &["-c", "1", "-W", "1", CLIENT4]);
        let listener = gw.server.run(|| TcpListener::bind((SERVER4, 8080)).expect("listen"));
        let to: std::net::SocketAddr = "192.0.2.10:80".parse().unwrap();
        let mut conn = gw
            .client
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect"));
        let _accepted = common::tcp::accept_within(&listener, Duration::from_secs(5));
        let (redirected, passed) = external_verdicts(&gw);
        conn.write_all(b"through the load balancer").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let (now_redirected, now_passed) = external_verdicts(&gw);
        let real = if now_redirected > redirected { "redirect" } else { "pass" };
        assert!(now_redirected > redirected || now_passed > passed, "no packet counted");
        assert_eq!(real, forward, "xdp->{int_hook}: the dataplane's counters");

        let port = conn.local_addr().unwrap().port().to_string();
        let t = trace_with(
            &gw,
            &gw.ext,
            CLIENT4,
            "192.0.2.10",
            "80",
            &["--src-port", &port, "--tcp-flags", "AP"],
        );
        let stage = |t: &serde_json::Value, name: &str| {
            let stages = t["stages"].as_array().unwrap();
            let s = stages.iter().find(|s| s["stage"] == name);
            s.map(|s| s["decision"].as_str().unwrap().to_owned()).unwrap_or_default()
        };
        assert!(stage(&t, "lookup").starts_with("hit: established flow"), "{t:#}");
        assert_eq!(t["verdict"], forward, "xdp->{int_hook}: {t:#}");
        assert!(stage(&t, "forward").contains(&gw.int), "{t:#}");
        // The backend's answers: tc, or XDP, redirects them into the XDP interface.
        let back = gw.pins.xdpgate(&[
            "trace",
            "--json",
            "--iface",
            &gw.int,
            "--src",
            SERVER4,
            "--src-port",
            "8080",
            "--dst",
            CLIENT4,
            "--dst-port",
            &port,
            "--protocol",
            "tcp",
            "--tcp-flags",
            "A",
        ]);
        let back = json(&back);
        assert!(stage(&back, "lookup").contains("reply direction"), "{back:#}");
        assert_eq!(back["verdict"], "redirect", "{int_hook}->xdp: {back:#}");
    }
}
