//! `xdpgate verify-flow` answers from the kernel's tables: after the saved record is
//! replaced it still gives the kernel's verdict (checked against a packet through the loaded
//! program); its exit status is the answer; and over random policies and flows, the
//! pinned-map evaluation equals the compiled image's and the reference evaluator's.

mod common;

use std::{net::IpAddr, process::Output};

use aya::maps::{MapData, PerCpuArray};
use common::{
    Pins,
    kernel::{DROP, Kernel, PASS},
    packet::{L4, SYN, frame},
    policygen::{DOC_RANGES, HOSTS, PolicySpec, random_policy},
    rng::Rng,
    unique,
};
use ipnet::IpNet;
use xdpgate_common::{iface::Role, maps::NSG_HITS};
use xdpgate_dataplane::{
    apply, flows, state, transaction,
    verify::{self, PinnedTables, Source},
};
use xdpgate_policy::{
    Direction, compile,
    evaluate::{self, decide},
    load_str,
    names::Record,
    reference::{self, Packet},
};

fn policy(rule: &str, ports: &str) -> String {
    format!(
        "virtual_network:\n  address_space: [198.51.100.0/24]\nnsgs:\n  - name: web\n    \
         subnets: [198.51.100.0/24]\n    rules:\n      - {{name: {rule}, priority: 100, \
         direction: inbound, access: allow, protocol: tcp, source: [\"*\"], destination: \
         [\"*\"], destination_ports: [\"{ports}\"]}}\n"
    )
}

fn verify(pins: &Pins, extra: &[&str], port: u16) -> Output {
    let local = format!("198.51.100.10:{port}");
    let mut args = vec![
        "verify-flow",
        "--direction",
        "inbound",
        "--protocol",
        "tcp",
        "--local",
        &local,
        "--remote",
        "203.0.113.7:40000",
    ];
    args.extend_from_slice(extra);
    pins.try_xdpgate(&args)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every NSG hit counter summed over CPUs and rules.
fn hits(pins: &Pins) -> u64 {
    let hits: PerCpuArray<MapData, u64> = pins.dir.open_map(NSG_HITS).unwrap().try_into().unwrap();
    hits.iter().map(|v| v.unwrap().iter().sum::<u64>()).sum()
}

#[test]
fn answers_from_the_kernel_when_the_saved_policy_differs() {
    let kernel = Kernel::new();
    let pins = &kernel.pins;
    pins.apply(&policy("allow-a", "1000-1999"));
    // Generation 1's record replaced by one of another policy (two rules, other ports).
    let (slot, _) = apply::active(&pins.dir).unwrap();
    let record_of = |src: &str| {
        let p = load_str(src, "t.yaml").unwrap();
        Record::new(1, slot, src, &p, &compile::compile(&p).unwrap(), Vec::new(), Vec::new())
    };
    let two_rules = policy("allow-b", "3000-3999").replace(
        "    rules:\n",
        "    rules:\n      - {name: allow-c, priority: 200, direction: inbound, access: allow, \
         protocol: udp, source: [\"*\"], destination: [\"*\"], destination_ports: [53]}\n",
    );
    let real = state::record(&pins.dir, 1).unwrap().expect("generation 1's record");
    state::save(&pins.dir, &record_of(&two_rules)).unwrap();

    let (flows_before, hits_before) = (flows::count(&pins.dir).unwrap(), hits(pins));
    let open = verify(pins, &[], 1005);
    let closed = verify(pins, &[], 3005);
    assert_eq!(open.status.code(), Some(0), "port 1005 is open in the kernel:\n{}", text(&open));
    assert_eq!(closed.status.code(), Some(1), "port 3005 is closed:\n{}", text(&closed));
    let open = text(&open);
    assert!(open.starts_with("Allowed (asked the kernel: generation 1, slot 1)"), "{open}");
    // The record does not fit generation 1's tables: rules are not named from it.
    assert!(open.contains("rule #0 of the inbound subnet table (allow)"), "{open}");
    assert!(open.contains("rule names unknown"), "{open}");
    assert!(!open.contains("allow-b"), "{open}");
    // Asking created no flow and counted no hit.
    assert_eq!((flows::count(&pins.dir).unwrap(), hits(pins)), (flows_before, hits_before));

    // The kernel agrees: a SYN to each port through the loaded program.
    kernel.arrive_as(Role::External);
    let syn = |port| frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, port, SYN));
    assert_eq!(kernel.run(&syn(1005)), PASS);
    assert_eq!(kernel.run(&syn(3005)), DROP);

    // With the kernel's own record saved again, the deciding rules have names.
    state::save(&pins.dir, &real).unwrap();
    let named = text(&verify(pins, &[], 1006));
    assert!(named.contains("web/allow-a (priority 100, inbound subnet layer, allow)"), "{named}");
    assert!(!named.contains("rule names unknown"), "{named}");
    let denied = text(&verify(pins, &[], 3005));
    assert!(denied.contains("web/DenyAllInBound (priority 65500"), "{denied}");
}

#[test]
fn exit_status_is_the_answer() {
    let kernel = Kernel::new();
    let pins = &kernel.pins;
    // Nothing applied yet: an error, not a denial.
    let out = verify(pins, &[], 1005);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no policy applied"), "{}", text(&out));

    pins.apply(&policy("allow-a", "1000-1999"));
    assert_eq!(verify(pins, &[], 1999).status.code(), Some(0));
    assert_eq!(verify(pins, &[], 2000).status.code(), Some(1));
    let json = verify(pins, &["--json"], 2000);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["source"]["kernel"]["generation"], 1);
    assert_eq!(v["decided_by"][0]["rule"], "DenyAllInBound");

    // --policy FILE: that file compiled, and it says so.
    let file = std::env::temp_dir().join(format!("{}.yaml", unique("policy")));
    std::fs::write(&file, policy("allow-b", "3000-3999")).unwrap();
    let f = file.to_str().unwrap();
    let out = verify(pins, &["--policy", f], 3005);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(&format!("asked {f} compiled here, not the kernel")));
    assert!(text(&out).contains("web/allow-b"), "{}", text(&out));
    assert_eq!(verify(pins, &["--policy", f], 1005).status.code(), Some(1));
    std::fs::remove_file(&file).unwrap();

    // Errors: a missing policy file, a bad address, TCP without ports.
    for args in [vec!["--policy", "/nonexistent/policy.yaml"], vec!["--remote", "203.0.113.999:1"]]
    {
        let out = verify(pins, &args, 1005);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).starts_with("error: "), "{}", text(&out));
    }
    let out = pins.try_xdpgate(&[
        "verify-flow",
        "--direction",
        "inbound",
        "--protocol",
        "tcp",
        "--local",
        "198.51.100.10",
        "--remote",
        "203.0.113.7",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Another pin directory with nothing in it.
    let empty = Pins::new();
    let out = verify(&empty, &[], 1005);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn answers_are_whole_generations_while_policies_are_applied() {
    const APPLIES: u64 = 60;
    let kernel = Kernel::new();
    let (a, b) = (policy("allow-a", "1000-1999"), policy("allow-b", "3000-3999"));
    let first = kernel.apply(&a);
    let pins = kernel.pins.dir.path().to_owned();
    // A at odd generations, B at even ones.
    let applier = std::thread::spawn(move || {
        let pins = xdpgate_dataplane::PinDir::new(pins);
        for i in 1..=APPLIES {
            let src = if (first + i) % 2 == 1 { &a } else { &b };
            let p = load_str(src, "t.yaml").unwrap();
            transaction::apply_policy(&pins, &p, src, &|_| true).unwrap();
        }
    });
    let pkt = Packet {
        direction: Direction::Inbound,
        proto: 6,
        src: "203.0.113.7".parse().unwrap(),
        dst: "198.51.100.10".parse().unwrap(),
        sport: Some(40000),
        dport: Some(1005),
    };
    let (mut answers, mut named) = (0, 0);
    let mut generations = std::collections::BTreeSet::new();
    while !applier.is_finished() {
        let answer = verify::verify_flow(&kernel.pins.dir, None, &pkt).unwrap();
        let Source::Kernel { generation, .. } = answer.source else { panic!("{answer:?}") };
        let a_applied = generation % 2 == 1;
        assert_eq!(answer.decision.allowed, a_applied, "generation {generation}: {answer:?}");
        if let Some(Some(r)) = answer.names.first() {
            assert_eq!(r.rule, if a_applied { "allow-a" } else { "DenyAllInBound" }, "{answer:?}");
            named += 1;
        }
        answers += 1;
        generations.insert(generation);
    }
    applier.join().unwrap();
    eprintln!("{answers} answers ({named} named) over {} generations", generations.len());
    assert!(generations.len() > 10, "{generations:?}");
}

/// A random address in `net`.
fn inside(rng: &mut Rng, net: IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = (rng.next() as u32) & !u32::from(n.netmask());
            IpAddr::from((u32::from(n.network()) | host).to_be_bytes())
        }
        IpNet::V6(n) => {
            let host = rng.u128() & !u128::from(n.netmask());
            IpAddr::from((u128::from(n.network()) | host).to_be_bytes())
        }
    }
}

/// Addresses packets are drawn from: the generator's hosts, and random addresses inside the
/// documentation ranges (which cover every prefix the generator writes).
fn address(rng: &mut Rng, v6: bool) -> IpAddr {
    let hosts: Vec<IpAddr> =
        HOSTS.iter().map(|h| h.parse().unwrap()).filter(|a: &IpAddr| a.is_ipv6() == v6).collect();
    if rng.percent(50) {
        return *rng.pick(&hosts);
    }
    let ranges: Vec<IpNet> = DOC_RANGES
        .iter()
        .map(|r| r.parse().unwrap())
        .filter(|n: &IpNet| n.addr().is_ipv6() == v6)
        .collect();
    let range = *rng.pick(&ranges);
    inside(rng, range)
}

/// Mostly an address some NSG of `spec` is associated with, so that rules get to decide.
fn local_address(rng: &mut Rng, spec: &PolicySpec, v6: bool) -> IpAddr {
    let nets: Vec<IpNet> = spec
        .nsgs
        .iter()
        .flat_map(|n| n.subnets.iter().chain(&n.hosts))
        .map(|s| s.parse().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).unwrap())
        .filter(|n: &IpNet| n.addr().is_ipv6() == v6)
        .collect();
    if nets.is_empty() || rng.percent(15) {
        return address(rng, v6);
    }
    let net = *rng.pick(&nets);
    inside(rng, net)
}

fn port(rng: &mut Rng) -> u16 {
    // The generator's range edges, and anything.
    const EDGES: &[u16] =
        &[0, 1, 22, 53, 79, 80, 81, 442, 443, 444, 999, 1000, 1023, 1024, 2000, 2001, 3000, 8080];
    if rng.percent(60) { rng.one_of(EDGES) } else { rng.u16() }
}

fn random_packet(rng: &mut Rng, spec: &PolicySpec) -> Packet {
    let v6 = rng.percent(30);
    let direction = if rng.percent(50) { Direction::Inbound } else { Direction::Outbound };
    let (local, remote) = (local_address(rng, spec, v6), address(rng, v6));
    let (src, dst) = match direction {
        Direction::Inbound => (remote, local),
        Direction::Outbound => (local, remote),
    };
    let proto = rng.one_of(&[6, 6, 17, 17, if v6 { 58 } else { 1 }, 50, 51, 47, 132]);
    let ported = proto == 6 || proto == 17;
    let (sport, dport) = if ported { (Some(port(rng)), Some(port(rng))) } else { (None, None) };
    Packet { direction, proto, src, dst, sport, dport }
}

#[test]
fn pinned_tables_agree_with_the_compiled_image_and_the_reference() {
    const POLICIES: usize = 12;
    const FLOWS: usize = 600;
    let seed = 0x7e41_f10d;
    let mut rng = Rng(seed);
    let kernel = Kernel::new();
    let pins = &kernel.pins.dir;
    let (mut allowed, mut denied, mut hits) = (0, 0, 0);
    for round in 0..POLICIES {
        let spec = random_policy(&mut rng);
        let yaml = spec.yaml();
        let policy = load_str(&yaml, "random.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let compiled = compile::compile(&policy).unwrap();
        let generation = kernel.apply(&yaml);
        let pinned = PinnedTables::open(pins).unwrap();
        assert_eq!(pinned.generation(), generation);
        assert_eq!(pinned.differs_from(&compiled).unwrap(), None, "seed {seed:#x} round {round}");
        for i in 0..FLOWS {
            let pkt = random_packet(&mut rng, &spec);
            let from_kernel = decide(&pinned, &pkt).unwrap();
            let from_image = decide(&compiled, &pkt).unwrap();
            let why = || format!("seed {seed:#x} round {round} flow {i}: {pkt:?}\n{yaml}");
            assert_eq!(from_kernel, from_image, "{}", why());
            let named = from_kernel.decided_by.iter().map(|h| evaluate::name(&compiled, h));
            let verdict = reference::evaluate(&policy, &pkt);
            assert_eq!(from_kernel.allowed, verdict.allowed, "{}", why());
            assert_eq!(
                named.map(Option::unwrap).collect::<Vec<_>>(),
                verdict.decided_by,
                "{}",
                why()
            );
            // The whole path verify-flow takes (names checked against the kernel) now and then.
            if i % 100 == 0 {
                let answer = verify::verify_flow(pins, None, &pkt).unwrap();
                assert_eq!(answer.source, Source::Kernel { generation, slot: pinned.slot });
                assert_eq!(answer.unnamed, None);
                let names: Vec<_> = answer.names.into_iter().map(Option::unwrap).collect();
                assert_eq!(names, verdict.decided_by, "{}", why());
            }
            hits += from_kernel.decided_by.len();
            if from_kernel.allowed { allowed += 1 } else { denied += 1 }
        }
    }
    eprintln!(
        "{POLICIES} policies x {FLOWS} flows: {allowed} allowed, {denied} denied, {hits} rule hits"
    );
    // Not agreement on nothing: both answers and real rule matches occur often.
    let total = POLICIES * FLOWS;
    assert!(allowed > total / 10 && denied > total / 10, "{allowed} allowed, {denied} denied");
    assert!(hits > total / 2, "{hits} hits");
}

/// `icmp` is ICMP of the packet's family: verify-flow, asked the kernel or a policy file,
/// by protocol number or as `icmp`, the compiled image and the reference evaluator give the
/// kernel's answer and deciding rule for ICMP, ICMPv6, IPv4 protocol 58 and IPv6 next
/// header 1.
#[test]
fn icmp_by_family_agrees_with_the_kernel() {
    use common::crossfamily::{CASES, POLICY};
    let kernel = Kernel::new();
    kernel.apply(POLICY);
    kernel.arrive_as(Role::External);
    let file = std::env::temp_dir().join(format!("{}.yaml", unique("policy")));
    std::fs::write(&file, POLICY).unwrap();
    let policy = load_str(POLICY, "t.yaml").unwrap();
    let compiled = compile::compile(&policy).unwrap();
    let mut f = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let allowed = kernel.run(&c.frame(2000 + i as u16)) == PASS;
        if allowed != c.allowed {
            f.push(format!("{}: the kernel allowed {allowed}", c.name));
        }
        let number = c.proto.to_string();
        let names = if c.is_icmp() { vec![number.as_str(), "icmp"] } else { vec![number.as_str()] };
        for proto in names {
            for from in [None, Some(file.to_str().unwrap())] {
                let mut args = vec![
                    "verify-flow",
                    "--direction",
                    "inbound",
                    "--protocol",
                    proto,
                    "--local",
                    c.dst,
                    "--remote",
                    c.src,
                    "--json",
                ];
                args.extend(from.iter().flat_map(|f| ["--policy", f]));
                let out = kernel.pins.try_xdpgate(&args);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out)));
                let rule = v["decided_by"].as_array().and_then(|d| d.last()).map(|h| &h["rule"]);
                if out.status.code() != Some(i32::from(!allowed)) || rule != Some(&c.rule.into()) {
                    f.push(format!("{}: verify-flow {args:?} answered {v}", c.name));
                }
            }
        }
        let pkt = Packet {
            direction: Direction::Inbound,
            proto: c.proto,
            src: c.src.parse().unwrap(),
            dst: c.dst.parse().unwrap(),
            sport: None,
            dport: None,
        };
        let want = reference::evaluate(&policy, &pkt);
        if want.allowed != allowed
            || want.decided_by.last().map(|r| r.rule.as_str()) != Some(c.rule)
        {
            f.push(format!("{}: the reference evaluator answered {want:?}", c.name));
        }
        if evaluate::evaluate(&compiled, &pkt) != want {
            f.push(format!("{}: the compiled image disagrees with the reference", c.name));
        }
    }
    std::fs::remove_file(&file).unwrap();
    assert!(f.is_empty(), "{}", f.join("\n"));
}

/// Runs `xdpgate verify-flow --batch - EXTRA` with `input` on standard input.
fn verify_batch(pins: &Pins, extra: &[&str], input: impl AsRef<[u8]>) -> Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(common::xdpgate_bin())
        .args(["--pin-dir", pins.dir.path().to_str().unwrap(), "verify-flow", "--batch", "-"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_ref()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_batch_answers_as_single_calls_do_and_goes_on_past_a_bad_line() {
    let kernel = Kernel::new();
    let pins = &kernel.pins;
    let src = policy("allow-a", "1000-1999").replace(
        "    rules:\n",
        "    rules:\n      - {name: deny-dns, priority: 101, direction: inbound, access: deny, \
         protocol: udp, source: [\"*\"], destination: [\"*\"], destination_ports: [53]}\n      - {name: no-out, priority: 102, direction: \
         outbound, access: deny, protocol: \"*\", source: [\"*\"], destination: \
         [192.0.2.0/24]}\n",
    );
    pins.apply(&src);
    let flows = [
        ("inbound", "tcp", "198.51.100.10:1500", "203.0.113.7:40000"),
        ("inbound", "tcp", "198.51.100.10:2500", "203.0.113.7:40000"),
        ("inbound", "udp", "198.51.100.10:53", "203.0.113.7:5353"),
        ("outbound", "tcp", "198.51.100.10:40000", "203.0.113.7:443"),
        ("outbound", "icmp", "198.51.100.10", "192.0.2.9"),
        ("inbound", "icmp", "198.51.100.10", "203.0.113.7"),
    ];
    let single = |extra: &[&str], (d, p, l, r): (&str, &str, &str, &str)| {
        let args = [
            &["verify-flow", "--direction", d, "--protocol", p, "--local", l, "--remote", r],
            extra,
            &["--json"],
        ]
        .concat();
        let out = pins.try_xdpgate(&args);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}: {}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut input = String::from("# direction protocol local remote\n\n");
    for (i, (d, p, l, r)) in flows.iter().enumerate() {
        input += &format!("{d} {p} {l} {r}\n");
        if i == 2 {
            // Errors in the middle: a port on a portless protocol, a word missing.
            input += "inbound icmp 198.51.100.10:80 203.0.113.7\ninbound tcp 198.51.100.10:80\n";
        }
    }
    let file = std::env::temp_dir().join(format!("{}.yaml", unique("policy")));
    std::fs::write(&file, &src).unwrap();
    for extra in [&[][..], &["--policy", file.to_str().unwrap()]] {
        let out = verify_batch(pins, extra, &input);
        assert_eq!(out.status.code(), Some(2), "a bad line makes the status 2: {}", text(&out));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), flows.len() + 2, "{}", text(&out));
        let (errors, answers): (Vec<_>, Vec<_>) =
            lines.into_iter().partition(|v| v.get("error").is_some());
        assert_eq!(errors[0]["line"], 6);
        assert_eq!(errors[0]["input"], "inbound icmp 198.51.100.10:80 203.0.113.7");
        assert!(errors[0]["error"].as_str().unwrap().contains("icmp has no ports"), "{errors:?}");
        assert_eq!(errors[1]["line"], 7);
        assert!(errors[1]["error"].as_str().unwrap().contains("found 3 words"), "{errors:?}");
        let mut allowed = Vec::new();
        for (mut batch, flow) in answers.into_iter().zip(flows) {
            assert!(batch["line"].as_u64().is_some(), "{batch}");
            batch.as_object_mut().unwrap().remove("line");
            assert_eq!(batch, single(extra, flow), "{flow:?}");
            allowed.push(batch["allowed"].as_bool().unwrap());
        }
        // The answers are not all alike: the batch is checked on allows and denies.
        assert_eq!(allowed, [true, false, false, true, false, false], "{extra:?}");
    }
    // Every line answered: status 0.
    let out = verify_batch(pins, &[], "inbound tcp 198.51.100.10:1500 203.0.113.7:40000\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A line that is not UTF-8 is a bad line: the batch goes on past it. (Before: it ended
    // the batch, unanswered. Seen failing.)
    let good = b"inbound tcp 198.51.100.10:1500 203.0.113.7:40000\n";
    let out = verify_batch(pins, &[], [&good[..], b"\xff\xfe bad\r\n", good].concat());
    let lines: Vec<serde_json::Value> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(lines.len(), 3, "{}", text(&out));
    assert_eq!(
        (&lines[1]["line"], &lines[1]["error"]),
        (&2.into(), &"the line is not UTF-8".into())
    );
    assert_eq!((&lines[2]["line"], &lines[2]["allowed"]), (&3.into(), &true.into()));
    std::fs::remove_file(&file).unwrap();
}
