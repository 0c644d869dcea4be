//! The parser in the kernel, through BPF_PROG_TEST_RUN: crafted frames, including truncated
//! and malformed ones, each with its verdict and the counters it must move.

mod common;

use aya::programs::{TestRun, TestRunOptions};
use common::{
    Pins,
    packet::{
        ETH_LEN, L4, SYN, fix_ipv4_checksum, frame, frame_vlan, insert_ipv6_ext, set_ipv4_frag,
        set_ipv4_total_len,
    },
};
use xdpgate_dataplane::{self as dataplane, stats};

const PASS: u32 = 2;
const DROP: u32 = 1;

struct Case {
    name: &'static str,
    packet: Vec<u8>,
    verdict: u32,
    /// The drop reason counter that must move by one, if any.
    reason: Option<&'static str>,
}

fn case(name: &'static str, packet: Vec<u8>, verdict: u32, reason: Option<&'static str>) -> Case {
    Case { name, packet, verdict, reason }
}

fn tcp4() -> Vec<u8> {
    frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 443, SYN))
}

fn cases() -> Vec<Case> {
    let ip = ETH_LEN;
    let mut v = vec![
        case("ipv4 tcp", tcp4(), PASS, None),
        case("ipv4 udp", frame("203.0.113.7", "198.51.100.10", L4::Udp(5353, 53)), PASS, None),
        case("ipv4 icmp echo", frame("203.0.113.7", "198.51.100.10", L4::Echo(7)), PASS, None),
        case(
            "ipv6 tcp",
            frame("2001:db8:2::7", "2001:db8:1::10", L4::Tcp(40000, 443, SYN)),
            PASS,
            None,
        ),
        case("ipv6 udp", frame("2001:db8:2::7", "2001:db8:1::10", L4::Udp(5353, 53)), PASS, None),
        case("icmpv6 echo", frame("2001:db8:2::7", "2001:db8:1::10", L4::Echo(9)), PASS, None),
        case(
            "802.1Q ipv4 tcp",
            frame_vlan("203.0.113.7", "198.51.100.10", L4::Tcp(1, 2, SYN), &[100], b""),
            PASS,
            None,
        ),
        case(
            "QinQ ipv4 udp",
            frame_vlan("203.0.113.7", "198.51.100.10", L4::Udp(1, 2), &[100, 200], b""),
            PASS,
            None,
        ),
    ];

    // Three VLAN tags: beyond what the parser follows.
    let mut three = frame_vlan("203.0.113.7", "198.51.100.10", L4::Udp(1, 2), &[100, 200], b"");
    three.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
    v.push(case("three VLAN tags", three, DROP, Some("too_deep")));

    // ARP (not IP) goes to the kernel untouched.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0xa, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    v.push(case("arp", arp, PASS, None));

    let p = tcp4();
    v.push(case("ipv4 header truncated", p[..ETH_LEN + 12].to_vec(), DROP, Some("malformed")));

    let mut p = tcp4();
    p[ip] = 0x44;
    fix_ipv4_checksum(&mut p, ip);
    v.push(case("ipv4 ihl 4", p, DROP, Some("malformed")));

    let mut p = tcp4();
    p[ip] = 0x65;
    v.push(case("ipv4 ethertype with version 6", p, DROP, Some("malformed")));

    let mut p = tcp4();
    let len = (p.len() - ip) as u16;
    set_ipv4_total_len(&mut p, ip, len + 40);
    v.push(case("ipv4 total length past the frame", p, DROP, Some("malformed")));

    let mut p = tcp4();
    set_ipv4_total_len(&mut p, ip, 10);
    v.push(case("ipv4 total length below ihl", p, DROP, Some("malformed")));

    // IPv4 with 4 bytes of options (NOPs): the L4 header moves, still parsed.
    let mut p = tcp4();
    p.splice(ip + 20..ip + 20, [1, 1, 1, 1]);
    p[ip] = 0x46;
    let len = (p.len() - ip) as u16;
    set_ipv4_total_len(&mut p, ip, len);
    v.push(case("ipv4 options", p, PASS, None));

    // TCP header cut short: only 10 bytes of it inside the frame.
    let p = frame("203.0.113.7", "198.51.100.10", L4::Tcp(1, 2, SYN));
    let mut short = p[..ip + 30].to_vec();
    set_ipv4_total_len(&mut short, ip, 30);
    v.push(case("tcp header truncated", short, DROP, Some("malformed")));

    let mut p = tcp4();
    p[ip + 20 + 12] = 0x40;
    v.push(case("tcp data offset 4", p, DROP, Some("malformed")));

    let p = frame("203.0.113.7", "198.51.100.10", L4::Udp(1, 2));
    let mut short = p[..ip + 24].to_vec();
    set_ipv4_total_len(&mut short, ip, 24);
    v.push(case("udp header truncated", short, DROP, Some("malformed")));

    let p = frame("203.0.113.7", "198.51.100.10", L4::Echo(1));
    let mut short = p[..ip + 24].to_vec();
    set_ipv4_total_len(&mut short, ip, 24);
    v.push(case("icmp header truncated", short, DROP, Some("malformed")));
    let short = frame_vlan("2001:db8:2::7", "2001:db8:1::10", L4::Raw(58), &[], &[128, 0, 0, 0]);
    v.push(case("icmpv6 header truncated", short, DROP, Some("malformed")));
    // The other family's ICMP number is a plain protocol: no ICMP header to read, none
    // missing (4 bytes are too short for one).
    let bytes = [8, 0, 0, 0];
    let p = frame_vlan("203.0.113.7", "198.51.100.10", L4::Raw(58), &[], &bytes);
    v.push(case("ipv4 protocol 58, 4 bytes", p, PASS, None));
    let p = frame_vlan("2001:db8:2::7", "2001:db8:1::10", L4::Raw(1), &[], &bytes);
    v.push(case("ipv6 next header 1, 4 bytes", p, PASS, None));

    // Fragments: a later fragment carries no ports and is passed on to the pipeline; a first
    // fragment too short for its TCP header is dropped (tiny-fragment attack, RFC 1858).
    let mut p = tcp4();
    set_ipv4_frag(&mut p, ip, false, 100);
    v.push(case("ipv4 non-first fragment", p, PASS, None));
    let mut p = tcp4()[..ip + 28].to_vec();
    set_ipv4_total_len(&mut p, ip, 28);
    set_ipv4_frag(&mut p, ip, true, 0);
    v.push(case("ipv4 tiny first fragment", p, DROP, Some("malformed")));

    let p6 = frame("2001:db8:2::7", "2001:db8:1::10", L4::Tcp(40000, 443, SYN));
    v.push(case("ipv6 header truncated", p6[..ETH_LEN + 30].to_vec(), DROP, Some("malformed")));
    let mut p = p6.clone();
    p[ip] = 0x40;
    v.push(case("ipv6 ethertype with version 4", p, DROP, Some("malformed")));
    v.push(case(
        "ipv6 hop-by-hop, routing, dest-opts, fragment",
        insert_ipv6_ext(&p6, &[(0, 0), (43, 1), (60, 0), (44, 0)]),
        PASS,
        None,
    ));
    v.push(case(
        "ipv6 seven extension headers",
        insert_ipv6_ext(&p6, &[(0, 0), (60, 0), (60, 0), (60, 0), (60, 0), (60, 0), (60, 0)]),
        DROP,
        Some("too_deep"),
    ));
    // Extension header whose length runs past the end of the frame.
    let mut p = insert_ipv6_ext(&p6, &[(60, 0)]);
    p[ip + 40 + 1] = 40;
    v.push(case("ipv6 extension header past the frame", p, DROP, Some("malformed")));
    // Non-first IPv6 fragment: fragment offset 8 (bytes 64).
    let mut p = insert_ipv6_ext(&p6, &[(44, 0)]);
    p[ip + 40 + 2..ip + 40 + 4].copy_from_slice(&(8u16 << 3).to_be_bytes());
    v.push(case("ipv6 non-first fragment", p, PASS, None));
    v
}

#[test]
fn parser_verdicts_and_counters_in_kernel() {
    let pins = Pins::new();
    let mut ebpf = dataplane::load(&pins.dir).expect("load");
    let prog = dataplane::dataplane(&mut ebpf).expect("program");

    let mut failures = Vec::new();
    for c in cases() {
        let before = stats::read(&pins.dir).expect("stats");
        let mut out = vec![0u8; c.packet.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(&c.packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{}: test_run: {e}", c.name));
        let after = stats::read(&pins.dir).expect("stats");

        let verdict_name = ["aborted", "drop", "pass", "tx", "redirect"][c.verdict as usize];
        let counted = |s: &stats::Stats| s.iface("(unregistered)").unwrap().verdict(verdict_name);
        let (b, a) = (counted(&before), counted(&after));
        let mut problems = Vec::new();
        if res.return_value != c.verdict {
            problems.push(format!("verdict {} (want {})", res.return_value, c.verdict));
        }
        if (a.packets - b.packets, a.bytes - b.bytes) != (1, c.packet.len() as u64) {
            problems.push(format!(
                "{verdict_name} counter moved by {} packets {} bytes (want 1, {})",
                a.packets - b.packets,
                a.bytes - b.bytes,
                c.packet.len()
            ));
        }
        for (reason, _) in &after.drops {
            let delta = after.drops(reason) - before.drops(reason);
            let want = u64::from(c.reason == Some(*reason));
            if delta != want {
                problems.push(format!("drop reason {reason} moved by {delta} (want {want})"));
            }
        }
        if res.return_value == PASS && out[..res.data_size_out as usize] != c.packet[..] {
            problems.push("passed packet was modified".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", c.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "cases failed:\n{}", failures.join("\n"));
}

#[test]
fn noop_program_passes_everything() {
    let pins = Pins::new();
    let mut ebpf = dataplane::load(&pins.dir).expect("load");
    let prog = dataplane::program(&mut ebpf, dataplane::NOOP_PROGRAM).expect("program");
    for c in cases() {
        let res = prog
            .test_run(TestRunOptions { data_in: Some(&c.packet), ..Default::default() })
            .expect("test_run");
        assert_eq!(res.return_value, PASS, "{}", c.name);
    }
}
