//! Per-rule packets and bytes through BPF_PROG_TEST_RUN: every packet of a flow, both ways,
//! counts under the deciding rule of each side (an east-west flow under two), with the
//! frame's length; a denied packet under the rule that denied it.

mod common;

use common::{
    kernel::{DROP, Kernel, PASS},
    packet::{ACK, L4, SYN, frame, set_ipv4_frag},
};
use xdpgate_common::iface::Role;
use xdpgate_dataplane::stats;

/// Two protected subnets: a's host may reach b's web port; b denies port 22 from a.
const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: a
    subnets: [198.51.100.0/25]
    rules:
      - {name: a-web-out, priority: 100, direction: outbound, access: allow, protocol: tcp,
         source: ["*"], destination: [198.51.100.128/25], destination_ports: [80]}
  - name: b
    subnets: [198.51.100.128/25]
    rules:
      - {name: b-web-in, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: [198.51.100.0/25], destination: ["*"], destination_ports: [80]}
      - {name: b-no-ssh, priority: 110, direction: inbound, access: deny, protocol: tcp,
         source: [198.51.100.0/25], destination: ["*"], destination_ports: [22]}
"#;

/// Flows, packets and bytes of `rule`.
fn counters(k: &Kernel, rule: &str) -> (u64, u64, u64) {
    let stats = stats::read(&k.pins.dir).unwrap();
    let rules = stats.policy.expect("a policy is applied").rules;
    let r = rules.iter().find(|r| r.rule == rule).unwrap_or_else(|| panic!("no rule {rule}"));
    (r.flows, r.traffic.packets, r.traffic.bytes)
}

#[test]
fn an_east_west_flow_counts_both_ways_under_each_sides_rule() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    let (a, b) = ("198.51.100.10", "198.51.100.140");
    let syn = frame(a, b, L4::Tcp(40000, 80, SYN));
    let syn_ack = frame(b, a, L4::Tcp(80, 40000, SYN | ACK));
    // The first SYN is classified; its retransmission and the answer are the flow's.
    for pkt in [&syn, &syn, &syn_ack] {
        assert_eq!(k.run(pkt), PASS);
    }
    let bytes = (2 * syn.len() + syn_ack.len()) as u64;
    assert_eq!(counters(&k, "a-web-out"), (1, 3, bytes), "the source side's rule");
    assert_eq!(counters(&k, "b-web-in"), (1, 3, bytes), "the destination side's rule");

    // Two denied SYNs: each decided, and counted, by the deny rule; the source side's
    // AllowVnetOutBound passed them first and counts them too.
    let denied = frame(a, b, L4::Tcp(40001, 22, SYN));
    let vnet_out = counters(&k, "AllowVnetOutBound");
    for _ in 0..2 {
        assert_eq!(k.run(&denied), DROP);
    }
    let len = denied.len() as u64;
    assert_eq!(counters(&k, "b-no-ssh"), (2, 2, 2 * len));
    let after = counters(&k, "AllowVnetOutBound");
    assert_eq!(after, (vnet_out.0 + 2, vnet_out.1 + 2, vnet_out.2 + 2 * len));
    // Nothing else counted the web flow's packets.
    assert_eq!(counters(&k, "DenyAllInBound"), (0, 0, 0));
}

/// A flow judged again after an apply counts once in its rule's flows, though its packets
/// then come both ways (seen failing: twice, the second direction's entry judged again
/// too; an outside review's find).
#[test]
fn a_flow_judged_again_after_an_apply_counts_once() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    let (a, b) = ("198.51.100.10", "198.51.100.140");
    let syn = frame(a, b, L4::Tcp(40002, 80, SYN));
    let syn_ack = frame(b, a, L4::Tcp(80, 40002, SYN | ACK));
    let ack = frame(a, b, L4::Tcp(40002, 80, ACK));
    for pkt in [&syn, &syn_ack, &ack] {
        assert_eq!(k.run(pkt), PASS);
    }
    // The rule renamed: its counters start afresh, and every flow is judged again.
    k.apply(&POLICY.replace("b-web-in", "b-web-in-2"));
    for pkt in [&ack, &frame(b, a, L4::Tcp(80, 40002, ACK)), &ack] {
        assert_eq!(k.run(pkt), PASS);
    }
    assert_eq!(counters(&k, "b-web-in-2").0, 1, "the flow counted once");
}

/// `POLICY` with b's web rule moved down a place: a deny rule takes its number.
fn policy_telnet_first() -> String {
    let web = "      - {name: b-web-in, priority: 100,";
    assert!(POLICY.contains(web));
    let telnet = "      - {name: b-no-telnet, priority: 100, direction: inbound, access: deny, \
                  protocol: tcp, source: [\"*\"], destination: [\"*\"], destination_ports: [23]}\n";
    POLICY.replace(web, &format!("{telnet}      - {{name: b-web-in, priority: 105,"))
}

/// A flow kept across applies without re-evaluation counts under the rules that decided it,
/// as each new policy numbers them: never under the deny rule that took its rule's old
/// number, and under no rule once its rule is gone or it sat idle through two applies.
#[test]
fn a_flow_kept_without_reevaluation_counts_under_its_own_rules() {
    let keep = |policy: &str| format!("settings: {{reevaluate_flows: false}}\n{policy}");
    let k = Kernel::new();
    k.apply(&keep(POLICY));
    k.arrive_as(Role::Internal);
    let (a, b) = ("198.51.100.10", "198.51.100.140");
    let data = frame(a, b, L4::Tcp(40000, 80, ACK));
    let answer = frame(b, a, L4::Tcp(80, 40000, ACK));
    for pkt in [&frame(a, b, L4::Tcp(40000, 80, SYN)), &frame(b, a, L4::Tcp(80, 40000, SYN | ACK))]
    {
        assert_eq!(k.run(pkt), PASS);
    }
    // The same policy again (the other slot), a packet each way under it; then one where
    // the deny rule takes b-web-in's place (back in the first slot).
    k.apply(&keep(POLICY));
    assert_eq!((k.run(&data), k.run(&answer)), (PASS, PASS));
    k.apply(&keep(&policy_telnet_first()));
    let (web_in, web_out) = (counters(&k, "b-web-in"), counters(&k, "a-web-out"));
    for _ in 0..3 {
        assert_eq!((k.run(&data), k.run(&answer)), (PASS, PASS), "the flow is kept");
    }
    let bytes = 3 * (data.len() + answer.len()) as u64;
    assert_eq!(counters(&k, "b-no-telnet"), (0, 0, 0), "the deny rule saw no packet");
    assert_eq!(counters(&k, "b-web-in"), (web_in.0, web_in.1 + 6, web_in.2 + bytes));
    assert_eq!(counters(&k, "a-web-out"), (web_out.0, web_out.1 + 6, web_out.2 + bytes));

    // Idle through two applies, the second of which gives the flow's old number to the
    // b-no-ssh deny rule: its packets count under no rule (only the last apply says where
    // rules went).
    k.apply(&keep(POLICY));
    k.apply(&keep(POLICY));
    let rules = ["b-web-in", "b-no-ssh", "a-web-out"];
    let before: Vec<_> = rules.iter().map(|r| counters(&k, r)).collect();
    assert_eq!((k.run(&data), k.run(&answer)), (PASS, PASS), "the flow is kept");
    assert_eq!(rules.iter().map(|r| counters(&k, r)).collect::<Vec<_>>(), before);
}

/// A denied datagram's later fragments count under no rule: no rule decides them (they
/// carry no ports; dropped as `fragment`). A flow a new policy denies counts its denied
/// packet under the deny rule, as a new flow's denied packet does. (Before: each later
/// fragment counted a flow under DenyAllInBound, and the flow's denied packet no packet or
/// byte. Seen failing.)
#[test]
fn denied_fragments_and_a_flow_cut_by_a_change_count_as_they_were_decided() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::Internal);
    let (a, b) = ("198.51.100.10", "198.51.100.140");
    let ip = common::packet::ETH_LEN;
    let mut first = frame(a, b, L4::Tcp(40002, 22, SYN));
    set_ipv4_frag(&mut first, ip, true, 0);
    let mut later = frame(a, b, L4::Tcp(40002, 22, SYN));
    set_ipv4_frag(&mut later, ip, false, 100);
    let vnet_out = counters(&k, "AllowVnetOutBound");
    assert_eq!(k.run(&first), DROP);
    let fragments = k.drops("fragment");
    for _ in 0..2 {
        assert_eq!(k.run(&later), DROP);
    }
    assert_eq!(k.drops("fragment"), fragments + 2, "the later fragments dropped as such");
    let len = first.len() as u64;
    assert_eq!(counters(&k, "b-no-ssh"), (1, 1, len), "the first fragment, denied");
    assert_eq!(counters(&k, "DenyAllInBound"), (0, 0, 0), "no rule for the later ones");
    let after = counters(&k, "AllowVnetOutBound");
    assert_eq!(after, (vnet_out.0 + 1, vnet_out.1 + 1, vnet_out.2 + len));

    // The web flow, then a policy whose b-web-in denies it (reevaluate_flows, the default).
    for pkt in [&frame(a, b, L4::Tcp(40003, 80, SYN)), &frame(b, a, L4::Tcp(80, 40003, SYN | ACK))]
    {
        assert_eq!(k.run(pkt), PASS);
    }
    k.apply(&POLICY.replace(
        "{name: b-web-in, priority: 100, direction: inbound, access: allow",
        "{name: b-web-in, priority: 100, direction: inbound, access: deny",
    ));
    let before = counters(&k, "b-web-in");
    let data = frame(a, b, L4::Tcp(40003, 80, ACK));
    assert_eq!(k.run(&data), DROP, "the flow is cut");
    let len = data.len() as u64;
    assert_eq!(counters(&k, "b-web-in"), (before.0 + 1, before.1 + 1, before.2 + len));
}
