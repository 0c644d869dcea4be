//! Hostile policies.
//!
//! * Property test (a seeded generator of its own): valid YAML documents mutated every way
//!   a hand or a tool can break them (lines deleted, duplicated, swapped, re-indented; tokens
//!   replaced by huge numbers, YAML specials, unicode, addresses that are almost right;
//!   characters inserted; deep nesting; alias bombs) go through `policy::load_str`, which
//!   must never panic; every rejection lists errors shaped `file:line:column: field: reason`
//!   (line inside the document, non-empty reason, bounded length, in line order); what it
//!   accepts must compile.
//! * In the kernel: a good policy applied, then `xdpgate apply` of many rejected policies:
//!   each fails, and the running generation, the record of the applied policy and the
//!   verdicts (a known allowed and a known denied packet through BPF_PROG_TEST_RUN, and an
//!   established flow) stay as they were.
//!
//! Knobs: `XDPGATE_POLICY_CASES` (mutated documents, default 2000; `XDPGATE_LONG=1` makes it
//! 30000), `XDPGATE_POLICY_SEED` (decimal or 0x-hex, printed on failure); `XDPGATE_SHOW=1`
//! prints rejections that name no line or no field.

mod common;

use std::{
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    isolated,
    kernel::{DROP, Kernel, PASS},
    long,
    packet::{ACK, L4, SYN, frame},
    rng::{Rng, env_number},
};
use xdpgate_common::iface::Role;
use xdpgate_dataplane::apply;
use xdpgate_policy::{compile, lb, load_str, printable};

const DEFAULT_SEED: u64 = 0x9071_c1e5;

/// A policy in block style (every field on a line of its own, so line mutations hit single
/// fields), with NSGs, a load balancer and a NAT gateway.
const BLOCK: &str = r#"virtual_network:
  address_space:
    - 198.51.100.0/24
    - 2001:db8:1::/64
  peered: [192.0.2.128/25]
health_probe_source: [192.0.2.1]
service_tags:
  Partners:
    - 203.0.113.64/26
    - "203.0.113.200-203.0.113.210"
application_security_groups:
  web: [198.51.100.10, 198.51.100.11]
settings:
  tcp_idle_timeout: 240
  udp_idle_timeout: 60
  icmp_idle_timeout: 30
  reevaluate_flows: true
nsgs:
  - name: web-nsg
    subnets:
      - 198.51.100.0/25
    hosts: [198.51.100.200]
    rules:
      - name: allow-web
        priority: 100
        direction: inbound
        access: allow
        protocol: tcp
        source: Internet
        source_ports: "*"
        destination: web
        destination_ports: [80, 443, "8000-8080"]
      - name: deny-ssh
        priority: 200
        direction: Inbound
        access: Deny
        protocol: TCP
        source: ["*"]
        destination: "*"
        destination_ports: 22
      - name: partners
        priority: 300
        direction: inbound
        access: allow
        protocol: any
        source: Partners
        destination: 2001:db8:1::/64
      - name: no-smtp-out
        priority: 100
        direction: outbound
        access: deny
        protocol: tcp
        source: VirtualNetwork
        destination: Internet
        destination_ports: [25]
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - name: pool
        backends:
          - 198.51.100.11
          - {address: 198.51.100.12, weight: 3}
    probes:
      - {name: up, protocol: http, port: 8080, path: /health, interval: 1000, timeout: 500, threshold: 2}
    rules:
      - name: http
        frontend: vip
        protocol: tcp
        frontend_port: 80
        backend_port: 8080
        backend_pool: pool
        probe: up
        distribution: source_ip
    inbound_nat_rules:
      - {name: ssh, frontend: vip, protocol: tcp, frontend_port: 2201, backend: 198.51.100.11, backend_port: 22}
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100, 192.0.2.104/30]
    subnets: [198.51.100.128/25]
    tcp_idle_timeout: 4
    udp_idle_timeout: 240
    port_reuse_cooldown: 10
    ports: "1024-65535"
"#;

/// The same kind of policy in flow style (a rule per line).
const FLOW: &str = r#"virtual_network: {address_space: [198.51.100.0/24, 2001:db8:1::/64]}
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [80, 443]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
      - {name: mdns, priority: 400, direction: inbound, access: allow, protocol: udp, source: [Internet], destination: ["*"], destination_ports: [5353]}
      - {name: deny-mdns-out, priority: 100, direction: outbound, access: deny, protocol: udp, source: ["*"], destination: ["*"], source_ports: [5353]}
"#;

fn example() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/example.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Mutations.

const NUMBERS: &[&str] = &[
    "-1",
    "0",
    "-0",
    "1",
    "99",
    "100",
    "4096",
    "4097",
    "65000",
    "65535",
    "65536",
    "7200",
    "7201",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e309",
    "1.5",
    "0x50",
    "0o17",
    "0b11",
    "1_000",
    ".inf",
    "-.inf",
    ".nan",
    "+80",
];

const SPECIALS: &[&str] = &[
    "~",
    "null",
    "true",
    "false",
    "yes",
    "no",
    "\"\"",
    "''",
    "[]",
    "{}",
    "\"*\"",
    "*",
    "&a",
    "*a",
    "!!binary aGVsbG8=",
    "!!str",
    "!!int 80",
    "!!float 1",
    "!!map {}",
    "!custom x",
    "|",
    ">",
    "-",
    "?",
    ":",
    "#",
    "'",
    "\"",
    "[",
    "]",
    "{",
    "}",
    ",",
    "%YAML 1.2",
    "---",
    "...",
    "<<: {}",
    "@",
    "`",
];

const WORDS: &[&str] = &[
    "ünïcødé",
    "🦀",
    "名前",
    "\u{202e}deny",
    "allow\u{200b}",
    "Ａｌｌｏｗ",
    "ınbound",
    "\u{feff}",
    "Internet",
    "VirtualNetwork",
    "AzureLoadBalancer",
    "internet",
    "web",
    "pool",
    "vip",
    "up",
    "natgw",
    "allow",
    "deny",
    "inbound",
    "outbound",
    "tcp",
    "udp",
    "icmp",
    "esp",
    "ah",
    "any",
    "all",
    "http",
    "https",
    "source_ip",
    "send_to_all",
    "name",
    "priority",
    "rules",
    "nsgs",
    "subnets",
    "hosts",
    "source",
    "destination",
    "destination_ports",
    "unknown_field",
];

const ADDRESSES: &[&str] = &[
    "0.0.0.0/0",
    "::/0",
    "198.51.100.1/24",
    "198.51.100.0/33",
    "256.1.1.1",
    "198.51.100",
    "198.51.100.0/",
    "/24",
    "2001:db8::/129",
    "2001:db8:::1",
    "::ffff:198.51.100.10",
    "fe80::1%eth0",
    "198.51.100.20-198.51.100.10",
    "198.51.100.10-2001:db8::1",
    "198.51.100.10-198.51.100.10",
    "203.0.113.0/24",
    "2001:db8:1::/64",
    "192.0.2.100",
    "198.51.100.11",
    "0-65535",
    "65535-0",
    "80-",
    "-80",
    "1-2-3",
    "1024-65536",
];

fn random_value(rng: &mut Rng) -> String {
    match rng.below(10) {
        0..=2 => rng.one_of(NUMBERS).to_owned(),
        3 | 4 => rng.one_of(SPECIALS).to_owned(),
        5 | 6 => rng.one_of(WORDS).to_owned(),
        7 | 8 => rng.one_of(ADDRESSES).to_owned(),
        _ => match rng.below(4) {
            0 => "a".repeat(1 + rng.below(10_000)),
            1 => format!("\"{}\"", "\\u0000".repeat(1 + rng.below(10))),
            2 => format!("{}{}", rng.one_of(WORDS), rng.one_of(NUMBERS)),
            _ => (0..1 + rng.below(8))
                .map(|_| char::from_u32(0x20 + rng.below(0x2fff) as u32).unwrap_or('?'))
                .collect(),
        },
    }
}

/// Splits a line into tokens and the separators between them, so one token can be swapped.
fn tokens(line: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        let sep = c.is_whitespace() || "[]{},:\"'".contains(c);
        match (sep, start) {
            (true, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, line.len()));
    }
    out
}

fn char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One mutation of `doc`; returns the new document and what was done.
fn mutate(rng: &mut Rng, doc: &str) -> (String, String) {
    let mut lines: Vec<String> = doc.lines().map(str::to_owned).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    let at = rng.below(n);
    let what = match rng.below(16) {
        0 => {
            lines.remove(at);
            format!("deleted line {}", at + 1)
        }
        1 => {
            let l = lines[at].clone();
            lines.insert(at, l);
            format!("duplicated line {}", at + 1)
        }
        2 => {
            let other = rng.below(n);
            lines.swap(at, other);
            format!("swapped lines {} and {}", at + 1, other + 1)
        }
        3 => {
            let l = lines.remove(at);
            let to = rng.below(lines.len() + 1);
            lines.insert(to, l);
            format!("moved line {} to {}", at + 1, to + 1)
        }
        4 => {
            let l = &mut lines[at];
            match rng.below(4) {
                0 => l.insert(0, ' '),
                1 => l.insert_str(0, "  "),
                2 => l.insert(0, '\t'),
                _ => {
                    if l.starts_with(' ') {
                        l.remove(0);
                    }
                }
            }
            format!("re-indented line {}", at + 1)
        }
        5..=9 => {
            let toks = tokens(&lines[at]);
            if toks.is_empty() {
                lines[at] = random_value(rng);
                format!("replaced blank line {}", at + 1)
            } else {
                let (s, e) = toks[rng.below(toks.len())];
                let v = random_value(rng);
                let old = lines[at][s..e].to_owned();
                lines[at].replace_range(s..e, &v);
                format!(
                    "line {}: replaced {old:?} by {:?}",
                    at + 1,
                    v.chars().take(60).collect::<String>()
                )
            }
        }
        10 => {
            // A field line with a random value, somewhere, at a random indentation.
            let indent = " ".repeat(2 * rng.below(5));
            let key = rng.one_of(WORDS);
            let l = format!("{indent}{key}: {}", random_value(rng));
            lines.insert(at, l);
            format!("inserted a {key} line at {}", at + 1)
        }
        11 => {
            // Characters inserted or removed inside a line.
            let l = &mut lines[at];
            let i = char_boundary(l, rng.below(l.len() + 1));
            if rng.percent(50) || l.is_empty() {
                let c = rng.one_of(&[
                    "\"", "'", "[", "{", ":", "#", "-", " ", "\t", "\\", "&", "*", "!", "|", "é",
                    "\u{0}", "\r",
                ]);
                l.insert_str(i, c);
                format!("line {}: inserted {c:?}", at + 1)
            } else {
                let j = char_boundary(l, i + 1 + rng.below(4));
                let cut = l[i..j].to_owned();
                l.replace_range(i..j, "");
                format!("line {}: removed {cut:?}", at + 1)
            }
        }
        12 => {
            // Deep nesting in place of a value.
            let depth = *rng.one_of(&[&100usize, &127, &128, &129, &130, &1000]);
            let flow = rng.percent(50);
            let v = if flow {
                "[".repeat(depth) + &"]".repeat(depth)
            } else {
                "{a: ".repeat(depth) + "1" + &"}".repeat(depth)
            };
            let toks = tokens(&lines[at]);
            if let Some(&(s, e)) = toks.last() {
                lines[at].replace_range(s..e, &v);
            } else {
                lines[at] = format!("x: {v}");
            }
            format!("line {}: nested {depth} deep", at + 1)
        }
        13 => {
            // A block of nested mappings, each more indented.
            let depth = *rng.one_of(&[&20usize, &50, &200]);
            let block: Vec<String> =
                (0..depth).map(|d| format!("{}k{d}:", " ".repeat(2 * d))).collect();
            let mut out = lines[..at].to_vec();
            out.extend(block);
            out.extend_from_slice(&lines[at..]);
            lines = out;
            format!("inserted mappings nested {depth} deep at line {}", at + 1)
        }
        14 => {
            // An alias bomb: each level refers to the one before ten times.
            let levels = 1 + rng.below(9);
            let mut bomb = vec!["bomb0: &b0 [x, x, x, x, x, x, x, x, x, x]".to_owned()];
            for l in 1..levels {
                let refs = vec![format!("*b{}", l - 1); 10].join(", ");
                bomb.push(format!("bomb{l}: &b{l} [{refs}]"));
            }
            lines.splice(0..0, bomb);
            format!("alias bomb of {levels} levels at the top")
        }
        _ => {
            // The whole document: CRLF, a BOM, a second document, tabs, or nothing at all.
            match rng.below(6) {
                0 => return (doc.replace('\n', "\r\n"), "CRLF line endings".into()),
                1 => return (format!("\u{feff}{doc}"), "byte-order mark".into()),
                2 => return (format!("{doc}---\n{doc}"), "two documents".into()),
                3 => return (doc.replace("  ", "\t"), "tabs for indentation".into()),
                4 => {
                    return (
                        doc[..char_boundary(doc, rng.below(doc.len()))].to_owned(),
                        "cut short".into(),
                    );
                }
                _ => return (String::new(), "empty".into()),
            }
        }
    };
    let mut out = lines.join("\n");
    out.push('\n');
    (out, what)
}

/// Checks one document: no panic; a rejection explains itself; an acceptance compiles.
/// Returns a problem, or which way it went.
fn check(doc: &str) -> Result<Outcome, String> {
    let result = catch_unwind(AssertUnwindSafe(|| load_str(doc, "fuzz.yaml")))
        .map_err(|e| format!("load_str panicked: {}", panic_text(&e)))?;
    // Lines as YAML counts them: CR LF, LF and a lone CR each end one.
    let lines = doc.replace("\r\n", "\n").chars().filter(|c| matches!(c, '\n' | '\r')).count() + 1;
    match result {
        Ok(policy) => {
            let compiled = catch_unwind(AssertUnwindSafe(|| {
                (compile::compile(&policy).map(|_| ()), lb::compile(&policy).map(|_| ()))
            }))
            .map_err(|e| format!("compiling an accepted policy panicked: {}", panic_text(&e)))?;
            match compiled {
                (Ok(()), Ok(())) => Ok(Outcome::Accepted),
                (Err(e), _) | (_, Err(e)) => {
                    Err(format!("accepted by the loader, rejected when compiled: {e:#}"))
                }
            }
        }
        Err(errors) => {
            if errors.0.is_empty() {
                return Err("rejected without a single error".into());
            }
            let mut previous = (0, 0);
            for e in &errors.0 {
                let shown = e.to_string();
                let at = if e.line > 0 {
                    format!("fuzz.yaml:{}:{}: ", e.line, e.column)
                } else {
                    "fuzz.yaml: ".to_owned()
                };
                // Control characters escaped: no message drives the terminal.
                let (field, reason) = (printable(&e.field), printable(&e.reason));
                let want = if e.field.is_empty() {
                    format!("{at}{reason}")
                } else {
                    format!("{at}{field}: {reason}")
                };
                if e.file != "fuzz.yaml" || shown != want {
                    return Err(format!(
                        "error not shaped file:line:column: field: reason: {shown:?}"
                    ));
                }
                if shown.chars().any(char::is_control) {
                    return Err(format!("a control character in the error: {shown:?}"));
                }
                if e.line > 0 && e.column == 0 {
                    return Err(format!("error with a line but no column: {shown:?}"));
                }
                // Messages echo values elided: none may run on for a whole huge value.
                if shown.chars().count() > 1000 {
                    return Err(format!("error {} characters long", shown.chars().count()));
                }
                if e.reason.trim().is_empty() {
                    return Err(format!("error without a reason: {shown:?}"));
                }
                if e.line > lines + 1 {
                    return Err(format!(
                        "error at line {} of a {lines}-line document: {shown:?}",
                        e.line
                    ));
                }
                if (e.line, e.column) < previous {
                    return Err(format!("errors out of line order: {errors}"));
                }
                previous = (e.line, e.column);
            }
            let located = errors.0.iter().any(|e| e.line > 0);
            if !located && std::env::var("XDPGATE_SHOW").is_ok() {
                eprintln!("UNLOCATED: {errors}");
            }
            if located
                && !errors.0.iter().any(|e| !e.field.is_empty())
                && std::env::var("XDPGATE_SHOW").is_ok()
            {
                eprintln!("UNFIELDED: {errors}");
            }
            Ok(Outcome::Rejected { located, fielded: errors.0.iter().any(|e| !e.field.is_empty()) })
        }
    }
}

enum Outcome {
    Accepted,
    Rejected { located: bool, fielded: bool },
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".into())
}

#[test]
fn mutated_policies_never_panic_and_explain_every_rejection() {
    let seed = env_number("XDPGATE_POLICY_SEED").unwrap_or(DEFAULT_SEED);
    let total = env_number("XDPGATE_POLICY_CASES")
        .map_or(if long() { 30_000 } else { 2000 }, |n| n as usize);
    let bases = [("block", BLOCK.to_owned()), ("flow", FLOW.to_owned()), ("example", example())];
    for (name, doc) in &bases {
        if let Err(e) = load_str(doc, name) {
            panic!("base policy {name} does not load: {e}");
        }
    }
    // Panics are caught and reported; keep their noise out of the output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut rng = Rng(seed);
    let (mut accepted, mut rejected, mut unlocated, mut unfielded) = (0, 0, 0, 0);
    let mut slowest = (Duration::ZERO, String::new());
    let mut failures: Vec<String> = Vec::new();
    for case in 0..total {
        let (base, mut doc) = bases[rng.below(bases.len())].clone();
        let mut steps = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let (d, what) = mutate(&mut rng, &doc);
            doc = d;
            steps.push(what);
        }
        let t = Instant::now();
        let outcome = check(&doc);
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, steps.join("; "));
        }
        match outcome {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(Outcome::Rejected { located, fielded }) => {
                rejected += 1;
                unlocated += usize::from(!located);
                unfielded += usize::from(!fielded);
            }
            Err(problem) if failures.len() < 10 => {
                let path =
                    std::env::temp_dir().join(format!("xdpgate-policy-fuzz-{seed:x}-{case}.yaml"));
                let _ = std::fs::write(&path, &doc);
                failures.push(format!(
                    "case {case} ({base}: {}): {problem}\n    document saved as {}",
                    steps.join("; "),
                    path.display()
                ));
            }
            Err(_) => {}
        }
        // A bound against hangs, not a speed target (debug build, shared CI machine).
        if took > Duration::from_secs(30) {
            failures.push(format!("case {case} ({base}: {}): took {took:?}", steps.join("; ")));
        }
    }
    std::panic::set_hook(hook);
    println!(
        "policy mutations (seed {seed:#x}): {total} documents in {:.1?}: {accepted} accepted, \
         {rejected} rejected ({unlocated} without any line, {unfielded} without any field); \
         slowest {:.1?} ({})",
        started.elapsed(),
        slowest.0,
        slowest.1
    );
    assert!(
        failures.is_empty(),
        "policy fuzz failed (seed {seed:#x}; rerun with XDPGATE_POLICY_SEED={seed:#x} \
         XDPGATE_POLICY_CASES={total}):\n{}",
        failures.join("\n")
    );
    assert!(rejected * 2 > total && accepted * 20 > total, "mutations too mild or too wild");
}

fn error_lines(doc: &str) -> Vec<String> {
    let errors = load_str(doc, "p.yaml").expect_err("the policy should be rejected");
    errors.0.iter().map(ToString::to_string).collect()
}

/// One run reports every problem, each at its line and column: an unknown field does not
/// hide the rest, and a wrong type does not stop the reading.
#[test]
fn every_error_is_reported_in_one_run() {
    let doc = "\
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/25]
    colour: blue
    rules:
      - name: a
        priority: high
        direction: inbound
        access: allow
        protocol: tcp
        source: Intranet
        destination: \"*\"
      - name: b
        priority: 5000
        direction: inbound
        access: allow
        protocol: tcp
        source: \"*\"
        destination: \"*\"
        destination_ports: [80, http]
";
    assert_eq!(
        error_lines(doc),
        [
            "p.yaml:6:5: nsgs[0]: unknown field \"colour\"; expected one of: name, subnets, \
             hosts, rules",
            "p.yaml:9:19: nsgs[0].rules[0].priority: expected an integer, found string \"high\"",
            "p.yaml:13:17: nsgs[0].rules[0].source: unknown service tag or application \
             security group \"Intranet\"; did you mean \"Internet\"?",
            "p.yaml:16:19: nsgs[0].rules[1].priority: priority 5000 is out of range 100-4096",
            "p.yaml:22:33: nsgs[0].rules[1].destination_ports[1]: invalid port \"http\"",
        ]
    );
}

/// Names that are almost right get a suggestion: fields, service tags, application
/// security groups.
#[test]
fn near_misses_get_a_suggestion() {
    let doc = "\
virtual_network: {address_space: [198.51.100.0/24]}
application_security_groups: {web-servers: [198.51.100.10]}
nsgs:
  - name: web
    subnets: [198.51.100.0/25]
    rules:
      - {name: a, prority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internt, destination: [web-server]}
";
    assert_eq!(
        error_lines(doc),
        [
            "p.yaml:7:19: nsgs[0].rules[0]: unknown field \"prority\"; did you mean \
             \"priority\"?",
            "p.yaml:8:18: nsgs[0].rules[0].source: unknown service tag or application \
             security group \"Internt\"; did you mean \"Internet\"?",
            "p.yaml:8:41: nsgs[0].rules[0].destination[0]: unknown service tag or application \
             security group \"web-server\"; did you mean \"web-servers\"?",
        ]
    );
}

/// A 10 MB key or value is named by its first 40 characters, not echoed whole.
#[test]
fn huge_keys_and_values_are_elided() {
    let huge = "k".repeat(10 << 20);
    let vnet = "virtual_network: {address_space: [198.51.100.0/24]}\n";
    let docs = [
        // Implicit keys are limited to 1024 characters by YAML; explicit ones (`? key`) not.
        ("an unknown key", format!("{vnet}? {huge}\n: 1\n")),
        ("a service tag name", format!("{vnet}service_tags:\n  ? {huge}\n  : [192.0.2.0/24]\n")),
        ("an address", format!("virtual_network: {{address_space: [\"{huge}\"]}}\n")),
        ("an NSG name", format!("{vnet}nsgs:\n  - {{name: {huge}, subnets: [198.51.100.0/25]}}\n")),
    ];
    for (what, doc) in docs {
        let started = Instant::now();
        let errors = error_lines(&doc).join("\n");
        // A bound against hangs, as for the pathological documents (debug build, shared CI).
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: {:?}", started.elapsed());
        assert!(errors.len() < 600, "{what}: {} bytes: {}", errors.len(), &errors[..600]);
        assert!(errors.contains(&format!("{}…", "k".repeat(40))), "{what}: {errors}");
    }
}

/// Nesting is bounded before anything recurses: 100,000 levels are refused at once.
#[test]
fn deep_nesting_is_refused_quickly() {
    let docs = [
        ("flow lists", "[".repeat(100_000)),
        ("block lists", "- ".repeat(100_000) + "x\n"),
        ("flow mappings in a value", format!("nsgs: {}", "{a: ".repeat(100_000))),
    ];
    for (what, doc) in docs {
        let started = Instant::now();
        let errors = error_lines(&doc);
        let took = started.elapsed();
        println!("100,000 levels of {what}: refused in {took:.1?}");
        assert!(took < Duration::from_secs(1), "{what}: {took:?}");
        assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        assert!(errors[0].ends_with("nested deeper than 64 levels"), "{what}: {errors:?}");
    }
}

/// A file wrong 100,000 times is answered quickly with the first 1,000 errors and a count.
#[test]
fn a_flood_of_errors_is_bounded() {
    let mut doc = String::from("virtual_network: {address_space: [198.51.100.0/24]}\n");
    for i in 0..100_000 {
        let _ = writeln!(doc, "unknown{i}: 1");
    }
    let started = Instant::now();
    let errors = error_lines(&doc);
    let took = started.elapsed();
    // Linear work (a quadratic search took 288 s); the bound is loose for a loaded debug build.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_eq!(errors.len(), 1001);
    assert!(errors[0].starts_with("p.yaml:2:1: unknown field \"unknown0\""), "{}", errors[0]);
    assert_eq!(errors[1000], "p.yaml:1001:1: 99000 more errors not shown");
}

/// Names are limited to Azure's 80 characters.
#[test]
fn names_longer_than_80_characters_are_refused() {
    let name = "r".repeat(81);
    let doc = format!(
        "virtual_network: {{address_space: [198.51.100.0/24]}}\nnsgs:\n  - name: web\n    \
         subnets: [198.51.100.0/25]\n    rules:\n      - {{name: {name}, priority: 100, \
         direction: inbound, access: allow, protocol: tcp, source: \"*\", destination: \"*\"}}\n"
    );
    assert_eq!(
        error_lines(&doc),
        [format!(
            "p.yaml:6:16: nsgs[0].rules[0].name: name \"{}…\" is 81 characters long; at most 80 \
             are allowed",
            "r".repeat(40)
        )]
    );
    assert!(load_str(&doc.replace(&name, &"r".repeat(80)), "p.yaml").is_ok());
}

/// Documents built to hurt: each must load or fail quickly and without a panic.
#[test]
fn pathological_documents() {
    let rule = |i: usize| {
        format!(
            "      - {{name: r{i}, priority: {}, direction: inbound, access: allow, protocol: tcp, \
             source: [\"203.0.113.{}\"], destination: [\"*\"], destination_ports: [{}]}}\n",
            100 + i,
            i % 256,
            1 + i
        )
    };
    let many_rules = |n: usize| {
        let mut d = String::from(
            "virtual_network: {address_space: [198.51.100.0/24]}\nnsgs:\n  - name: big\n    subnets: [198.51.100.0/24]\n    rules:\n",
        );
        for i in 0..n {
            d += &rule(i);
        }
        d
    };
    let mut bomb = String::from(
        "a: &a [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n",
    );
    for l in 1..10 {
        let _ = writeln!(
            bomb,
            "{}: &{} [{}]",
            (b'a' + l) as char,
            (b'a' + l) as char,
            vec![format!("*{}", (b'a' + l - 1) as char); 9].join(", ")
        );
    }
    let merge_bomb = {
        let mut d = String::from("base: &m {name: x}\n");
        for i in 0..2000 {
            let _ = writeln!(d, "k{i}: {{<<: *m}}");
        }
        d
    };
    let docs: Vec<(&str, String)> = vec![
        ("3997 rules in one direction (every priority)", many_rules(3997)),
        ("flow nesting 100000 deep at the top", "[".repeat(100_000) + &"]".repeat(100_000)),
        (
            "flow nesting 5000 deep in a value",
            format!("nsgs: {}{}\n", "[".repeat(5000), "]".repeat(5000)),
        ),
        (
            "mapping nesting 5000 deep in a value",
            format!("nsgs: {}1{}\n", "{a: ".repeat(5000), "}".repeat(5000)),
        ),
        ("block nesting 5000 deep", (0..5000).map(|d| format!("{}k:\n", " ".repeat(d))).collect()),
        ("billion laughs", bomb.clone()),
        ("billion laughs inside a policy", format!("{bomb}{}", BLOCK)),
        ("merge-key repetition", merge_bomb),
        (
            "a 10 MB name",
            format!(
                "virtual_network: {{address_space: [198.51.100.0/24]}}\nnsgs:\n  - name: {}\n",
                "n".repeat(10 << 20)
            ),
        ),
        (
            "100000 address items",
            format!(
                "virtual_network:\n  address_space: [{}]\n",
                (0..100_000)
                    .map(|i| format!("2001:db8:{:x}:{:x}::/64", i >> 16, i & 0xffff))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("100000 lines of comments", "# x\n".repeat(100_000) + BLOCK),
        ("only a comment", "# nothing\n".into()),
        ("a scalar", "42\n".into()),
        ("a list", "- a\n- b\n".into()),
        ("NUL bytes", format!("{}\0\0\0", BLOCK)),
        ("lone surrogate escape", "virtual_network: {address_space: [\"\\ud800\"]}\n".into()),
        ("a key 1 MB long", format!("{}: 1\n", "k".repeat(1 << 20))),
    ];
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (name, doc) in &docs {
        // On a thread of its own: a stack overflow would take the whole test binary down,
        // a hang is caught by the deadline.
        let d = doc.clone();
        let t = Instant::now();
        let worker = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || check(&d).map(|o| matches!(o, Outcome::Accepted)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !worker.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !worker.is_finished() {
            failures.push(format!("{name}: still loading after 60 s"));
            continue;
        }
        let took = t.elapsed();
        match worker.join() {
            Ok(Ok(accepted)) => report.push(format!(
                "{name}: {} in {took:.1?}",
                if accepted { "accepted" } else { "rejected" }
            )),
            Ok(Err(problem)) => failures.push(format!("{name}: {problem}")),
            Err(e) => failures.push(format!("{name}: {}", panic_text(&e))),
        }
        // A bound against hangs, not a speed target (debug build, shared CI machine).
        if took > Duration::from_secs(30) {
            failures.push(format!("{name}: took {took:.1?}"));
        }
    }
    std::panic::set_hook(hook);
    println!("pathological documents:\n  {}", report.join("\n  "));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Rejected applies against a running dataplane.

const GOOD: &str = r#"virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: web
    subnets: [198.51.100.0/24, 2001:db8:1::/64]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: ["*"], destination: ["*"], destination_ports: [80]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
"#;

/// What must not change while rejected policies come and go: the generation, the record of
/// the applied policy, and the verdicts.
struct Running<'a> {
    k: &'a Kernel,
    generation: u64,
    source: String,
    port: u16,
}

impl Running<'_> {
    fn check(&mut self, after: &str) -> Vec<String> {
        let mut f = Vec::new();
        let (_, config) = apply::active(&self.k.pins.dir).unwrap();
        if config.generation != self.generation {
            f.push(format!("{after}: generation {} (was {})", config.generation, self.generation));
        }
        match apply::applied_source(&self.k.pins.dir) {
            Some((_, s)) if s == self.source => {}
            _ => f.push(format!("{after}: the record of the applied policy changed")),
        }
        self.port += 1;
        let allowed = frame("203.0.113.7", "198.51.100.10", L4::Tcp(self.port, 80, SYN));
        if self.k.run(&allowed) != PASS {
            f.push(format!("{after}: a new connection to the allowed port 80 is dropped"));
        }
        let denied = frame("203.0.113.7", "198.51.100.10", L4::Tcp(self.port, 22, SYN));
        if self.k.run(&denied) != DROP {
            f.push(format!("{after}: a new connection to the denied port 22 passes"));
        }
        let other = frame("203.0.113.7", "198.51.100.10", L4::Tcp(self.port, 8080, SYN));
        if self.k.run(&other) != DROP {
            f.push(format!("{after}: a new connection to port 8080 (DenyAllInBound) passes"));
        }
        let established = frame("203.0.113.7", "198.51.100.10", L4::Tcp(999, 80, ACK));
        if self.k.run(&established) != PASS {
            f.push(format!("{after}: the established connection is cut"));
        }
        f
    }
}

#[test]
fn rejected_applies_leave_the_running_policy_in_force() {
    let seed = env_number("XDPGATE_POLICY_SEED").unwrap_or(DEFAULT_SEED) ^ 0xa991;
    let wanted = if long() { 1000 } else { 150 };
    let started = Instant::now();
    let (tried, failures) = isolated(false, move |_| {
        let k = Kernel::new();
        let dir = std::env::temp_dir().join(common::unique("relpol"));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(&good, GOOD).unwrap();
        let out = k.pins.xdpgate(&["apply", good.to_str().unwrap()]);
        assert!(out.contains("generation 1"), "{out}");
        k.arrive_as(Role::External);
        assert_eq!(k.run(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(999, 80, SYN))), PASS);
        let mut running = Running { k: &k, generation: 1, source: GOOD.to_owned(), port: 30000 };
        let mut failures = running.check("after the good apply");
        assert!(failures.is_empty(), "{failures:?}");

        // Mutations of the good policy (and of the others) that the loader rejects.
        let mut rng = Rng(seed);
        let bases = [GOOD.to_owned(), BLOCK.to_owned(), FLOW.to_owned()];
        let mut tried = 0;
        let mut attempts = 0;
        while tried < wanted && attempts < wanted * 50 {
            attempts += 1;
            let mut doc = bases[if rng.percent(60) { 0 } else { rng.below(3) }].clone();
            for _ in 0..1 + rng.below(2) {
                doc = mutate(&mut rng, &doc).0;
            }
            if doc.len() > 1 << 20 || load_str(&doc, "x.yaml").is_ok() {
                continue;
            }
            tried += 1;
            let path = dir.join(format!("bad{tried}.yaml"));
            std::fs::write(&path, &doc).unwrap();
            let out = k.pins.try_xdpgate(&["apply", path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let name = format!("rejected policy {}", path.display());
            if out.status.success() {
                failures.push(format!(
                    "{name}: apply succeeded: {}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            } else if !stderr.contains("nothing changed")
                || !stderr.contains(&format!("{}:", path.display()))
            {
                failures.push(format!("{name}: stderr does not locate the problem:\n{stderr}"));
            }
            failures.extend(running.check(&name));
            if failures.len() > 10 {
                break;
            }
        }
        // No generation was spent: the next good apply is generation 2.
        let out = k.pins.xdpgate(&["apply", good.to_str().unwrap()]);
        if !out.contains("generation 2") {
            failures.push(format!("rejected applies advanced the generation: {out}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        (tried, failures)
    });
    println!(
        "rejected applies: {tried} invalid policies through `xdpgate apply` in {:.1?}, the \
         running policy checked after each",
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(tried >= wanted / 2, "only {tried} rejected policies generated");
}

/// A policy the loader accepts but the dataplane cannot hold: 17 NAT gateways (its table
/// has 16). `xdpgate apply` fails, as it should; but nothing may change ("on any error the
/// running policy stays in force").
#[test]
fn a_policy_that_fails_to_install_changes_nothing() {
    let (failures, stderr) = isolated(false, |_| {
        let k = Kernel::new();
        let dir = std::env::temp_dir().join(common::unique("relpol"));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(&good, GOOD).unwrap();
        k.pins.xdpgate(&["apply", good.to_str().unwrap()]);
        k.arrive_as(Role::External);
        assert_eq!(k.run(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(999, 80, SYN))), PASS);
        let mut running = Running { k: &k, generation: 1, source: GOOD.to_owned(), port: 30000 };

        // Without allow-web (had any of it gone in, port 80 would be closed), with 17 NAT
        // gateways on /29s of the address space.
        let mut bad = GOOD.replace(
            "access: allow, protocol: tcp, source: [\"*\"]",
            "access: deny, protocol: tcp, source: [\"*\"]",
        );
        bad += "nat_gateways:\n";
        for i in 0..17 {
            let _ = writeln!(
                bad,
                "  - {{name: gw{i}, public_addresses: [192.0.2.{}], subnets: [198.51.100.{}/29]}}",
                100 + i,
                8 * i
            );
        }
        let path = dir.join("seventeen-gateways.yaml");
        std::fs::write(&path, &bad).unwrap();
        let check = k.pins.try_xdpgate(&["check", path.to_str().unwrap()]);
        let out = k.pins.try_xdpgate(&["apply", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut failures = Vec::new();
        if out.status.success() {
            failures.push("apply of 17 NAT gateways succeeded".to_owned());
        }
        if check.status.success() {
            failures.push(format!(
                "`xdpgate check` accepts it: {}",
                String::from_utf8_lossy(&check.stdout).trim()
            ));
        }
        failures.extend(running.check("after the failed apply"));
        let _ = std::fs::remove_dir_all(&dir);
        (failures, stderr)
    });
    assert!(failures.is_empty(), "{}\n(apply said: {})", failures.join("\n"), stderr.trim());
}

// ---------------------------------------------------------------------------------------
// Capacity: `check` and `apply` use the same numbers.

/// GOOD with two UDP rules (so the TCP verdicts `Running` checks stay GOOD's) on every odd
/// destination port, the NSG also on a host: each of the four tables of a slot gets 32,768
/// port entries, so the policy needs just over half of `NSG_FIELDS` (262,144 entries for
/// both slots). `allow_web` false turns GOOD's allow rule into a deny.
fn over_half(allow_web: bool) -> String {
    let ports: Vec<String> = (1..=65535u32).step_by(2).map(|p| p.to_string()).collect();
    let ports = ports.join(", ");
    let mut doc = GOOD.replace(
        "subnets: [198.51.100.0/24, 2001:db8:1::/64]",
        "subnets: [198.51.100.0/24, 2001:db8:1::/64]\n    hosts: [198.51.100.200]",
    );
    if !allow_web {
        doc = doc.replace(
            "name: allow-web, priority: 100, direction: inbound, access: allow",
            "name: allow-web, priority: 100, direction: inbound, access: deny",
        );
    }
    for (name, priority, direction) in [("bulk-in", 300, "inbound"), ("bulk-out", 300, "outbound")]
    {
        let _ = writeln!(
            doc,
            "      - {{name: {name}, priority: {priority}, direction: {direction}, access: deny, \
             protocol: udp, source: [\"*\"], destination: [\"*\"], destination_ports: [{ports}]}}"
        );
    }
    doc
}

fn nsg_field_entries(pins: &xdpgate_dataplane::PinDir) -> usize {
    let map = pins.open_map(xdpgate_common::maps::NSG_FIELDS).unwrap();
    let trie: aya::maps::LpmTrie<
        _,
        xdpgate_common::nsg::FieldKey,
        xdpgate_common::nsg::RuleBitmap,
    > = map.try_into().unwrap();
    trie.keys().filter_map(Result::ok).count()
}

/// A policy that needs more than half of the NSG field trie could not always be replaced
/// (the running policy keeps its half while the new one is written): the real `xdpgate
/// check` refuses it and says why; one a little smaller passes.
#[test]
fn check_refuses_a_policy_over_the_nsg_field_capacity() {
    let dir = std::env::temp_dir().join(common::unique("relcap"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("over-half.yaml");
    std::fs::write(&path, over_half(true)).unwrap();
    let out = std::process::Command::new(common::xdpgate_bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted it: {}", String::from_utf8_lossy(&out.stdout));
    assert!(
        stderr.contains("cannot be applied")
            && stderr.contains("a policy may use at most 131072 (half"),
        "{stderr}"
    );
    // Without the outbound bulk rule: half the port entries, and it fits.
    let fits: String = over_half(true)
        .lines()
        .filter(|l| !l.contains("bulk-out"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, fits).unwrap();
    let out = std::process::Command::new(common::xdpgate_bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("of 131072 NSG table entries"));
}

/// A policy over a table's capacity that only compiling finds (4,098 backends in two pools,
/// each within the table) is refused with the file's name by `check` and a one-shot
/// `apply`, as every other error of the file is (seen failing: the message named no file).
#[test]
fn check_names_the_file_of_a_policy_over_the_rule_capacity() {
    let dir = std::env::temp_dir().join(common::unique("relcap"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("many-backends.yaml");
    let mut doc = String::from(
        "virtual_network:\n  address_space: [198.51.100.0/24]\nload_balancers:\n  - name: lb\n    \
         frontends: [{name: f, address: 192.0.2.10}]\n    backend_pools:\n",
    );
    for pool in 1..=2 {
        doc += &format!("      - name: p{pool}\n        backends:\n");
        for i in 0..2049 {
            doc += &format!("          - 10.{pool}.{}.{}\n", i >> 8, i & 255);
        }
    }
    doc += "    rules:\n";
    for pool in 1..=2 {
        doc += &format!(
            "      - {{name: r{pool}, frontend: f, protocol: tcp, frontend_port: {}, \
             backend_pool: p{pool}}}\n",
            80 + pool
        );
    }
    std::fs::write(&path, doc).unwrap();
    let k = Kernel::new();
    for command in ["check", "apply"] {
        let out = k.pins.try_xdpgate(&[command, path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{command} took it: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains(&format!("{}: cannot be applied", path.display()))
                && stderr.contains("4098 backends exceed the table size 4096"),
            "{command}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A policy over half the trie, applied over a small one: refused before anything is
/// written, as `check` refuses it, and the running policy, its record and the trie stay
/// exactly as they were. (Before: applied, since it fitted beside the small one; then
/// neither the same file could be applied again, nor a set element added or removed. Seen
/// failing.)
#[test]
fn apply_refuses_a_policy_over_half_the_nsg_field_trie() {
    let (failures, stderr) = isolated(false, |_| {
        let k = Kernel::new();
        let dir = std::env::temp_dir().join(common::unique("relcap"));
        std::fs::create_dir_all(&dir).unwrap();
        let first = dir.join("first.yaml");
        std::fs::write(&first, GOOD).unwrap();
        k.pins.xdpgate(&["apply", first.to_str().unwrap()]);
        k.arrive_as(Role::External);
        assert_eq!(k.run(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(999, 80, SYN))), PASS);
        let (_, config) = apply::active(&k.pins.dir).unwrap();
        let source = GOOD.to_owned();
        let mut running = Running { k: &k, generation: config.generation, source, port: 30000 };
        let entries = nsg_field_entries(&k.pins.dir);

        let second = dir.join("second.yaml");
        std::fs::write(&second, over_half(false)).unwrap();
        let started = Instant::now();
        let out = k.pins.try_xdpgate(&["apply", second.to_str().unwrap()]);
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut failures = Vec::new();
        if out.status.success() {
            failures.push("the second policy was applied".to_owned());
        }
        if !stderr.contains("a policy may use at most 131072 (half") {
            failures.push("the message does not say a policy may use half the trie".into());
        }
        let after = nsg_field_entries(&k.pins.dir);
        if after != entries {
            failures.push(format!("NSG_FIELDS held {entries} entries, now {after}"));
        }
        failures.extend(running.check("after the refused apply"));
        let _ = std::fs::remove_dir_all(&dir);
        println!("refused in {took:.1?}; {entries} entries in NSG_FIELDS");
        (failures, stderr)
    });
    assert!(failures.is_empty(), "{}\n(apply said: {})", failures.join("\n"), stderr.trim());
}
