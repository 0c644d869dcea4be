//! The flow tables from userspace (BPF_PROG_TEST_RUN and the pinned maps): the agent's sweep
//! of idle established flows (`flows::remove_idle`), what `xdpgate flows` lists from both
//! tables, the flow-table section of `xdpgate stats`, and what a sweep of a million entries
//! costs.

mod common;

use std::{
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use aya::maps::HashMap as BpfHashMap;
use common::{
    crossfamily::{self, Case},
    kernel::{Kernel, PASS},
    packet::{ACK, L4, SYN, flow_key, frame},
};
use xdpgate_common::{
    flow::{ASSURED, FlowKey, FlowValue, NAT_DST, NAT_SRC, NO_RULES, TCP_CLOSED},
    iface::Role,
    lb::NO_BACKEND,
    maps::{EMBRYO_ENTRIES, EMBRYOS, FLOW_ENTRIES, FLOWS, NAT_MAP},
    nat::{NAT_ACTIVE, NAT_COOLDOWN, NatEntry},
    nsg::DIR_INBOUND,
};
use xdpgate_dataplane::{
    PinDir,
    flows::{self, Filter, FlowEntries, FlowState, Names},
    monotonic_ns, stats, table,
};

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
settings: {udp_idle_timeout: 30, tcp_idle_timeout: 240}
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-udp, priority: 100, direction: inbound, access: allow, protocol: udp,
         source: ["*"], destination: ["*"]}
"#;

const S: u64 = 1_000_000_000;

fn entry(reply: u8, last_seen_ns: u64) -> FlowValue {
    FlowValue {
        generation: 1,
        last_seen_ns,
        packets: 1,
        bytes: 100,
        rules: NO_RULES,
        direction: DIR_INBOUND as u8,
        reply,
        service: NO_BACKEND,
        backend: NO_BACKEND,
        ..Default::default()
    }
}

fn table_of(pins: &PinDir, name: &str) -> BpfHashMap<aya::maps::MapData, FlowKey, FlowValue> {
    pins.open_map(name).unwrap().try_into().unwrap()
}

/// One UDP exchange through the program: the request arrives outside, the answer inside.
/// A request, its answer and a second request: an established flow (a lone exchange stays
/// embryonic).
fn udp_exchange(k: &Kernel, client: (&str, u16), server: (&str, u16)) {
    let request = frame(client.0, server.0, L4::Udp(client.1, server.1));
    k.arrive_as(Role::External);
    assert_eq!(k.run(&request), PASS, "request");
    k.arrive_as(Role::Internal);
    assert_eq!(k.run(&frame(server.0, client.0, L4::Udp(server.1, client.1))), PASS, "answer");
    k.arrive_as(Role::External);
    assert_eq!(k.run(&request), PASS, "second request");
}

fn sweep(k: &Kernel) -> (flows::Swept, Vec<FlowEntries>) {
    let names = Names::read(&k.pins.dir).unwrap();
    let mut ended = Vec::new();
    let swept = flows::remove_idle(&k.pins.dir, &names, &AtomicBool::new(false), |e| {
        ended.push(e);
        Ok(())
    })
    .expect("sweep");
    (swept, ended)
}

/// `ASSURED` embryos (established flows the full table had no room for) are walked for the
/// flow log and swept as established flows are: a closed one idle past its 10 s is removed
/// and its end handed on, an open one idle 61 s (past the embryonic timeout, within TCP's
/// 240 s) stays, and an unassured TCP embryo is left to the LRU (seen failing: neither
/// walked nor swept, so their flows had no `continuing` or `end` records).
#[test]
fn assured_embryos_are_logged_and_swept_as_established() {
    let k = Kernel::new();
    k.apply(POLICY);
    let server = "198.51.100.10";
    let now = monotonic_ns();
    let mut embryos = table_of(&k.pins.dir, EMBRYOS);
    let (closed, open, plain) =
        (("203.0.113.5", 40005), ("203.0.113.6", 40006), ("203.0.113.7", 40007));
    for (c, tcp, idle) in [(closed, ASSURED | TCP_CLOSED, 11), (open, ASSURED, 61), (plain, 0, 11)]
    {
        for (key, reply) in
            [(flow_key(c.0, server, c.1, 80, 6), 0), (flow_key(server, c.0, 80, c.1, 6), 1)]
        {
            embryos.insert(key, FlowValue { tcp, ..entry(reply, now - idle * S) }, 0).unwrap();
        }
    }
    let mut walked = Vec::new();
    flows::established(&k.pins.dir, |e| walked.push(e.key)).unwrap();
    let fwd = |c: (&str, u16)| flow_key(c.0, server, c.1, 80, 6);
    assert_eq!(walked, [fwd(closed), fwd(open)], "walked for the flow log");
    let (_, ended) = sweep(&k);
    let ended: Vec<FlowKey> = ended.iter().map(|e| e.key).collect();
    assert_eq!(ended, [fwd(closed)], "swept");
    assert!(k.embryo(&fwd(closed)).is_none(), "the closed one removed");
    assert!(k.embryo(&fwd(open)).is_some() && k.embryo(&fwd(plain)).is_some(), "kept");
}

/// A last-seen stamp a little ahead of the clock a packet read (another CPU stamped the
/// entry after this packet read its clock, or read the coarse clock a tick later) is no idle
/// time: the packet is the flow's, not the first of a new one, and the stamp stays.
#[test]
fn a_stamp_ahead_of_the_packets_clock_is_no_idle_time() {
    let k = Kernel::new();
    k.apply(POLICY);
    let (client, server) = (("203.0.113.1", 5001), ("198.51.100.10", 53));
    udp_exchange(&k, client, server);
    let fwd = flow_key(client.0, server.0, client.1, server.1, 17);
    let mut map = table_of(&k.pins.dir, FLOWS);
    let mut before = map.get(&fwd, 0).expect("established");
    // The coarse clock lags CLOCK_MONOTONIC by up to a tick (10 ms at HZ=100).
    before.last_seen_ns = monotonic_ns() + 20_000_000;
    map.insert(fwd, before, 0).unwrap();
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame(client.0, server.0, L4::Udp(client.1, server.1))), PASS);
    let after = k.established(&fwd).expect("still the established flow");
    assert_eq!(after.packets, before.packets + 1, "{before:?} then {after:?}");
    assert_eq!(after.last_seen_ns, before.last_seen_ns, "a stamp never moves back");
}

#[test]
fn the_sweep_removes_idle_flows_and_keeps_used_ones() {
    let k = Kernel::new();
    k.apply(POLICY);
    let server = "198.51.100.10";
    // Real flows, made by packets: one to be left idle, one in use, one whose forward
    // direction went quiet while its answers go on.
    let (idle, used, one_way) =
        (("203.0.113.1", 5001), ("203.0.113.2", 5002), ("203.0.113.3", 5003));
    for client in [idle, used, one_way] {
        udp_exchange(&k, client, (server, 53));
    }
    let fwd = |c: (&str, u16)| flow_key(c.0, server, c.1, 53, 17);
    let back = |c: (&str, u16)| flow_key(server, c.0, 53, c.1, 17);
    for c in [idle, used, one_way] {
        assert!(k.flow(&fwd(c)).is_some() && k.flow(&back(c)).is_some(), "{c:?} established");
    }
    let mut map = table_of(&k.pins.dir, FLOWS);
    let now = monotonic_ns();
    let age = |map: &mut BpfHashMap<_, FlowKey, FlowValue>, key: &FlowKey, by: u64| {
        let mut v = map.get(key, 0).unwrap();
        v.last_seen_ns = now - by;
        map.insert(key, v, 0).unwrap();
    };
    // Idle past the 30 s UDP timeout both ways; the one-way flow only forward.
    age(&mut map, &fwd(idle), 31 * S);
    age(&mut map, &back(idle), 31 * S);
    age(&mut map, &fwd(one_way), 31 * S);
    // Entries written directly: a reply whose forward entry is gone (idle: removed); TCP
    // flows idle for 11 s, one closed (10 s timeout: removed), one open (240 s: kept); a
    // load-balanced flow (its twin found through the rewrite), idle.
    let orphan = flow_key(server, "203.0.113.4", 53, 5004, 17);
    map.insert(orphan, entry(1, now - 31 * S), 0).unwrap();
    let (closed_c, open_c) = (("203.0.113.5", 40005), ("203.0.113.6", 40006));
    for (c, tcp) in [(closed_c, TCP_CLOSED), (open_c, 0)] {
        for (k_, reply) in
            [(flow_key(c.0, server, c.1, 80, 6), 0), (flow_key(server, c.0, 80, c.1, 6), 1)]
        {
            map.insert(k_, FlowValue { tcp, ..entry(reply, now - 11 * S) }, 0).unwrap();
        }
    }
    let frontend = "192.0.2.10";
    let lb_fwd = flow_key("203.0.113.7", frontend, 40007, 80, 6);
    let lb_back = flow_key(server, "203.0.113.7", 8080, 40007, 6);
    let mut lb_entry = FlowValue { tcp: TCP_CLOSED, ..entry(0, now - 11 * S) };
    (lb_entry.nat, lb_entry.nat_port) = (NAT_DST, 8080);
    lb_entry.nat_addr = flow_key(server, server, 0, 0, 6).src;
    map.insert(lb_fwd, lb_entry, 0).unwrap();
    let mut lb_reply = FlowValue { tcp: TCP_CLOSED, ..entry(1, now - 11 * S) };
    (lb_reply.nat, lb_reply.nat_port) = (NAT_SRC, 80);
    lb_reply.nat_addr = flow_key(frontend, frontend, 0, 0, 6).src;
    map.insert(lb_back, lb_reply, 0).unwrap();
    // Flows through a NAT gateway, idle: one whose translation is active (left to the NAT
    // expiry, which removes both), one whose translation is gone, one whose translation is
    // cooling down (the NAT expiry marks it so just before it removes the flow, and writes
    // its end: not the sweep's).
    let public = "192.0.2.50";
    let snat = |host: &str, port: u16| {
        let fwd = flow_key(host, "203.0.113.9", port, 443, 6);
        let back = flow_key("203.0.113.9", public, 443, port, 6);
        let mut out = entry(0, now - 11 * S);
        (out.tcp, out.nat, out.nat_port) = (TCP_CLOSED, NAT_SRC, port);
        out.nat_addr = back.dst;
        let mut answer = entry(1, now - 11 * S);
        (answer.tcp, answer.nat, answer.nat_port) = (TCP_CLOSED, NAT_DST, port);
        answer.nat_addr = fwd.src;
        (fwd, out, back, answer)
    };
    let (nat_kept, nat_gone, nat_cooling) =
        (snat("198.51.100.20", 40010), snat("198.51.100.21", 40011), snat("198.51.100.22", 40012));
    for (f, fv, b, bv) in [nat_kept, nat_gone, nat_cooling] {
        map.insert(f, fv, 0).unwrap();
        map.insert(b, bv, 0).unwrap();
    }
    let mut translations: BpfHashMap<_, FlowKey, NatEntry> =
        k.pins.dir.open_map(NAT_MAP).unwrap().try_into().unwrap();
    let (f, _, b, _) = nat_kept;
    let t = |addr: [u32; 4], port, kind| NatEntry {
        addr,
        port,
        kind,
        gateway: 0,
        state: NAT_ACTIVE,
        time_ns: now - 11 * S,
    };
    translations.insert(b, t(f.src, f.sport, NAT_DST), 0).unwrap();
    translations.insert(f, t(b.dst, b.dport, NAT_SRC), 0).unwrap();
    let (f, _, b, _) = nat_cooling;
    let cooling = NatEntry { state: NAT_COOLDOWN, ..t(f.src, f.sport, NAT_DST) };
    translations.insert(b, cooling, 0).unwrap();
    // Embryonic flows, long idle: one never answered, which the sweep leaves to the table's
    // LRU, and a lone exchange (a request and its answer), which it ends.
    let mut embryos = table_of(&k.pins.dir, EMBRYOS);
    let embryo = flow_key("203.0.113.8", server, 5008, 53, 17);
    let exchange = flow_key("203.0.113.9", server, 5009, 53, 17);
    // An hour ago, or at boot on a machine up for less.
    let long_ago = now.saturating_sub(3600 * S);
    let unanswered = FlowValue { packets: 0, bytes: 0, ..entry(1, long_ago) };
    embryos.insert(embryo, entry(0, long_ago), 0).unwrap();
    embryos.insert(flow_key(server, "203.0.113.8", 53, 5008, 17), unanswered, 0).unwrap();
    embryos.insert(exchange, entry(0, long_ago), 0).unwrap();
    embryos.insert(exchange.reversed(), entry(1, long_ago), 0).unwrap();
    assert_eq!(flows::count(&k.pins.dir).unwrap(), 19);

    let (swept, mut ended) = sweep(&k);
    assert_eq!((swept.seen, swept.removed), (23, 11), "{ended:#?}");
    ended.sort_by_key(|e| e.key.sport);
    let summary: Vec<(FlowKey, Option<u64>, Option<u64>)> = ended
        .iter()
        .map(|e| (e.key, e.forward.map(|v| v.packets), e.reply.map(|v| v.packets)))
        .collect();
    assert_eq!(
        summary,
        [
            // Told from the first packet's direction however the walk met it.
            (fwd(idle), Some(2), Some(1)),
            (flow_key("203.0.113.4", server, 5004, 53, 17), None, Some(1)),
            (exchange, Some(1), Some(1)),
            (flow_key(closed_c.0, server, closed_c.1, 80, 6), Some(1), Some(1)),
            (lb_fwd, Some(1), Some(1)),
            (nat_gone.0, Some(1), Some(1)),
        ]
    );
    for (f, _, b, _) in [nat_kept, nat_cooling] {
        assert!(k.flow(&f).is_some() && k.flow(&b).is_some(), "translated: {f:?}");
    }
    let present = |key: &FlowKey| k.flow(key).is_some();
    assert!(!present(&fwd(idle)) && !present(&back(idle)) && !present(&orphan));
    assert!(!present(&lb_fwd) && !present(&lb_back));
    assert!(!present(&flow_key(closed_c.0, server, closed_c.1, 80, 6)));
    for c in [used, one_way] {
        assert!(present(&fwd(c)) && present(&back(c)), "{c:?} kept both ways");
    }
    assert!(present(&flow_key(open_c.0, server, open_c.1, 80, 6)), "open TCP flow kept");
    assert_eq!(flows::count(&k.pins.dir).unwrap(), 10);
    assert!(embryos.get(&embryo, 0).is_ok(), "an unanswered embryo is not swept");
    assert!(embryos.get(&exchange, 0).is_err(), "a lone exchange is");

    // The flow kept is the one packets use: its counter goes on, no new flow replaces it.
    let before = k.flow(&fwd(used)).unwrap();
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame(used.0, server, L4::Udp(used.1, 53))), PASS);
    let after = k.flow(&fwd(used)).unwrap();
    assert_eq!(after.packets, before.packets + 1, "{before:?} then {after:?}");
    assert!(after.last_seen_ns >= before.last_seen_ns);
    // A second pass finds nothing more.
    assert_eq!(sweep(&k).0.removed, 0);

    // `xdpgate flows` lists both tables, each flow with its state.
    let list = |state| {
        let filter = Filter { state, ..Default::default() };
        let mut l: Vec<(FlowState, u16)> = flows::list(&k.pins.dir, &filter, 0)
            .unwrap()
            .iter()
            .map(|f| (f.state, f.src_port.unwrap()))
            .collect();
        l.sort_by_key(|(_, p)| *p);
        l
    };
    let established = [5002, 5003, 40006, 40010, 40012].map(|p| (FlowState::Established, p));
    assert_eq!(list(Some(FlowState::Established)), established);
    assert_eq!(list(Some(FlowState::Embryonic)), [(FlowState::Embryonic, 5008)]);
    assert_eq!(list(None).len(), 6);
    let shown = flows::list(&k.pins.dir, &Filter::default(), 0).unwrap();
    let embryo_shown = shown.iter().find(|f| f.state == FlowState::Embryonic).unwrap();
    assert!(embryo_shown.expired && !embryo_shown.incomplete, "{embryo_shown:?}");

    // `xdpgate stats`: sizes from the maps, entries and live embryos counted.
    let table = stats::read(&k.pins.dir).unwrap().flow_table;
    assert_eq!((table.flows.capacity, table.flows.entries), (u64::from(FLOW_ENTRIES / 2), 10));
    assert_eq!(
        (table.embryonic.capacity, table.embryonic.live, table.embryonic.entries),
        (u64::from(EMBRYO_ENTRIES / 2), 1, 2)
    );
}

/// The sweep of a table of a million entries: what a pass costs when nothing is idle, and
/// when half of it is. Printed per 100,000 entries; the figures in the README come from here.
#[test]
fn sweep_cost_on_a_million_entries() {
    let k = Kernel::new();
    k.apply(POLICY);
    let mut map = table_of(&k.pins.dir, FLOWS);
    let pairs: u32 = 500_000;
    let now = monotonic_ns();
    let t = Instant::now();
    for i in 0..pairs {
        // Every other flow idle past the 30 s UDP timeout.
        let seen = if i % 2 == 0 { now - 31 * S } else { now };
        let client = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let port = 1024 + (i % 60_000) as u16;
        map.insert(flow_key(&client, "198.51.100.10", port, 53, 17), entry(0, seen), 0).unwrap();
        map.insert(flow_key("198.51.100.10", &client, 53, port, 17), entry(1, seen), 0).unwrap();
    }
    let filled = t.elapsed();
    let walk = |what: &str| {
        let t = Instant::now();
        let n = table::count(&map).unwrap();
        let took = t.elapsed();
        println!("{what}: {n} entries read in {took:.1?} ({:.1?} per 100k)", per_100k(took, n));
        n
    };
    assert_eq!(walk("batched read"), u64::from(2 * pairs));
    // aya's key walk, as every reader did before: one call per key.
    let t = Instant::now();
    let keys = map.keys().count();
    let took = t.elapsed();
    println!(
        "key walk (no values): {keys} keys in {took:.1?} ({:.1?} per 100k)",
        per_100k(took, keys as u64)
    );

    let t = Instant::now();
    let (swept, ended) = sweep(&k);
    let took = t.elapsed();
    println!(
        "sweep, half idle: {} entries read, {} removed in {took:.1?} ({:.1?} per 100k entries \
         read)",
        swept.seen,
        swept.removed,
        per_100k(took, swept.seen)
    );
    // Every entry in use, and each idle flow once or twice: a twin removed before the walk
    // reached it is not seen.
    assert!((u64::from(pairs) * 3 / 2..=u64::from(2 * pairs)).contains(&swept.seen), "{swept:?}");
    assert_eq!(swept.removed, u64::from(pairs));
    assert_eq!(ended.len(), pairs as usize / 2);
    assert!(ended.iter().all(|e| e.forward.is_some() && e.reply.is_some()));
    let t = Instant::now();
    let (swept, _) = sweep(&k);
    let took = t.elapsed();
    println!(
        "sweep, nothing idle: {} entries in {took:.1?} ({:.1?} per 100k); table filled in {filled:.1?}",
        swept.seen,
        per_100k(took, swept.seen)
    );
    assert_eq!((swept.seen, swept.removed), (u64::from(pairs), 0));
}

fn per_100k(took: Duration, n: u64) -> Duration {
    took.mul_f64(100_000.0 / n.max(1) as f64)
}

/// A flow of the other family's ICMP number is a plain protocol's: keyed and listed without
/// an echo identifier, named by its number, and kept until the UDP idle timeout where ICMP
/// flows idle out after ICMP's.
#[test]
fn the_other_familys_icmp_number_is_a_plain_protocol_in_the_flow_table() {
    let k = Kernel::new();
    let settings = "settings: {icmp_idle_timeout: 5, udp_idle_timeout: 240}";
    k.apply(&format!("{settings}\n{}", crossfamily::POLICY));
    // ICMP and ICMPv6 echoes to the pingable hosts, and the other family's numbers to the
    // hosts whose allow-any rule lets them in; each answered and sent again, so each is established.
    let cases: Vec<Case> = crossfamily::CASES.iter().filter(|c| c.allowed).copied().collect();
    let key = |c: &Case, id: u16| {
        let port = if c.is_icmp() { id } else { 0 };
        flow_key(c.src, c.dst, port, port, c.proto)
    };
    for (i, c) in cases.iter().enumerate() {
        let id = 3000 + i as u16;
        k.arrive_as(Role::External);
        assert_eq!(k.run(&c.frame(id)), PASS, "{}", c.name);
        k.arrive_as(Role::Internal);
        assert_eq!(k.run(&c.answer(id)), PASS, "{}: the answer", c.name);
        k.arrive_as(Role::External);
        assert_eq!(k.run(&c.frame(id)), PASS, "{}: again", c.name);
        assert!(k.established(&key(c, id)).is_some(), "{}: established", c.name);
    }
    let mut shown: Vec<_> = flows::list(&k.pins.dir, &Filter::default(), 0)
        .unwrap()
        .into_iter()
        .map(|f| (f.dst.to_string(), f.protocol, f.icmp_id, f.src_port))
        .collect();
    shown.sort();
    let want = [
        (crossfamily::PINGABLE4, "icmp", Some(3000)),
        (crossfamily::PINGABLE6, "icmpv6", Some(3001)),
        (crossfamily::NO_PING4, "58", None),
        (crossfamily::NO_PING6, "1", None),
    ];
    let mut want: Vec<_> =
        want.iter().map(|(d, p, id)| (d.to_string(), p.to_string(), *id, None)).collect();
    want.sort();
    assert_eq!(shown, want);

    // Ten seconds idle: past ICMP's timeout, well within UDP's.
    let mut map = table_of(&k.pins.dir, FLOWS);
    let now = monotonic_ns();
    let keys: Vec<FlowKey> = map.keys().map(|k| k.unwrap()).collect();
    for key in keys {
        let v = map.get(&key, 0).unwrap();
        map.insert(key, FlowValue { last_seen_ns: now - 10 * S, ..v }, 0).unwrap();
    }
    let (swept, _) = sweep(&k);
    assert_eq!(swept.removed, 4, "both entries of the two ICMP flows");
    for (i, c) in cases.iter().enumerate() {
        let kept = k.established(&key(c, 3000 + i as u16)).is_some();
        assert_eq!(kept, !c.is_icmp(), "{}: kept", c.name);
    }
}

/// A dataplane holding four embryonic UDP flows from 203.0.113.9 (ports 6001-6004) to the
/// returned server's port 53.
fn four_udp_embryos() -> (Kernel, &'static str) {
    let k = Kernel::new();
    k.apply(POLICY);
    let server = "198.51.100.10";
    k.arrive_as(Role::External);
    for port in 6001..=6004 {
        assert_eq!(k.run(&frame("203.0.113.9", server, L4::Udp(port, 53))), PASS);
    }
    (k, server)
}

/// An embryonic flow that lost one of its two entries to the table's LRU cannot be confirmed
/// any more (its answer finds no flow, or the other half is gone): `stats` counts it evicted,
/// not live. (A SYN flood in CI once showed 131,521 "live" of 131,072: forward entries whose
/// reply entries had been pushed out.)
#[test]
fn an_embryo_missing_either_entry_is_counted_evicted_not_live() {
    let (k, server) = four_udp_embryos();
    let read = || stats::read(&k.pins.dir).unwrap().flow_table.embryonic;
    let e = read();
    assert_eq!((e.created, e.live, e.entries, e.evicted), (4, 4, 8, 0), "{e:?}");

    let mut embryos = table_of(&k.pins.dir, EMBRYOS);
    // One loses its reply entry, another its forward entry.
    embryos.remove(&flow_key(server, "203.0.113.9", 53, 6001, 17)).unwrap();
    embryos.remove(&flow_key("203.0.113.9", server, 6002, 53, 17)).unwrap();
    let e = read();
    assert_eq!((e.created, e.live, e.entries, e.evicted), (4, 2, 6, 2), "{e:?}");
}

/// Embryonic flows `flows delete` removes are counted as deleted, not as pushed out by newer
/// flows: `evicted` is what an operator watches for a flood. A flow that had already lost
/// an entry to the LRU stays counted as evicted when its other half is deleted.
#[test]
fn deleted_embryos_are_not_counted_evicted() {
    let (k, server) = four_udp_embryos();
    table_of(&k.pins.dir, EMBRYOS).remove(&flow_key(server, "203.0.113.9", 53, 6003, 17)).unwrap();
    let read = || stats::read(&k.pins.dir).unwrap().flow_table.embryonic;
    assert_eq!((read().live, read().evicted), (3, 1));

    let gone = [Some(6001), Some(6002), Some(6003)];
    let deleted = xdpgate_dataplane::delete::flows(
        &k.pins.dir,
        None,
        |f| gone.contains(&f.src_port),
        None,
        false,
    )
    .unwrap();
    assert_eq!((deleted.flows.len(), deleted.entries), (3, 5));
    let e = read();
    // Seen failing before deleted embryos were counted: evicted 3.
    assert_eq!((e.created, e.live, e.entries, e.deleted, e.evicted), (4, 1, 2, 2, 1), "{e:?}");

    // The state directory removed (a cleaner of `/run`): the delete still succeeds, and the
    // count starts again there (seen failing after a review: an error after the flows were
    // deleted, with no list of them).
    std::fs::remove_dir_all(xdpgate_dataplane::state::dir(&k.pins.dir)).unwrap();
    let deleted =
        xdpgate_dataplane::delete::flows(&k.pins.dir, None, |_| true, None, false).unwrap();
    assert_eq!((deleted.flows.len(), deleted.entries), (1, 2));
    assert_eq!(read().deleted, 1);
}

/// `flows --json` is for programs: every flow unless --top says otherwise. The table keeps a
/// default of 20 for people and says what it left out.
#[test]
fn flows_json_lists_every_flow_and_the_table_says_what_it_holds_back() {
    let k = Kernel::new();
    k.apply(POLICY);
    for port in 0..25 {
        udp_exchange(&k, ("203.0.113.1", 6000 + port), ("198.51.100.10", 53));
    }
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = k.pins.xdpgate(&[&["flows", "--json"], args].concat());
        serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
    };
    assert_eq!(json(&[]).len(), 25);
    assert_eq!(json(&["--top", "5"]).len(), 5);
    assert_eq!(json(&["--top", "0"]).len(), 25);
    let text = k.pins.xdpgate(&["flows"]);
    let rows = text.lines().filter(|l| l.starts_with("established")).count();
    assert_eq!(rows, 20, "{text}");
    assert!(
        text.ends_with("showing 20 of 25 flows (--top N for more, --top 0 for all)\n"),
        "{text}"
    );
    let all = k.pins.xdpgate(&["flows", "--top", "0"]);
    assert_eq!(all.lines().filter(|l| l.starts_with("established")).count(), 25, "{all}");
    assert!(!all.contains("showing"), "{all}");
}

/// A SYN waiting alone (`TCP_LONE`) is a live embryonic flow, not an evicted one, answered
/// or not; `flows` shows its answers as its reply direction's.
#[test]
fn a_lone_syn_is_live() {
    let k = Kernel::new();
    k.apply(POLICY);
    let (inside, remote) = ("198.51.100.10", "203.0.113.9");
    k.arrive_as(Role::Internal);
    for port in [7001, 7002] {
        assert_eq!(k.run(&frame(inside, remote, L4::Tcp(port, 443, SYN))), PASS);
    }
    let read = || stats::read(&k.pins.dir).unwrap().flow_table.embryonic;
    let e = read();
    // Seen failing before lone flows counted: live 0, evicted 2.
    assert_eq!((e.created, e.live, e.entries, e.evicted), (2, 2, 2, 0), "{e:?}");
    k.arrive_as(Role::External);
    assert_eq!(k.run(&frame(remote, inside, L4::Tcp(443, 7001, SYN | ACK))), PASS);
    let e = read();
    assert_eq!((e.created, e.live, e.entries, e.evicted), (2, 2, 2, 0), "{e:?}");
    let shown: Vec<_> = flows::list(&k.pins.dir, &Filter::default(), 0)
        .unwrap()
        .into_iter()
        .map(|f| (f.src_port, f.forward.packets, f.reply.packets, f.incomplete))
        .collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    // Not incomplete: whole with its one entry (seen failing after a review: incomplete).
    let want = [(Some(7001), 1, 1, false), (Some(7002), 1, 0, false)];
    assert!(want.iter().all(|w| shown.contains(w)), "{shown:?}");
    table_of(&k.pins.dir, EMBRYOS).remove(&flow_key(inside, remote, 7001, 443, 6)).unwrap();
    let e = read();
    assert_eq!((e.created, e.live, e.entries, e.evicted), (2, 1, 1, 1), "{e:?}");
    // Deleted whole with its one entry, not evicted (seen failing: evicted 2).
    let deleted =
        xdpgate_dataplane::delete::flows(&k.pins.dir, None, |_| true, None, false).unwrap();
    assert_eq!((deleted.flows.len(), deleted.entries), (1, 1));
    let e = read();
    assert_eq!((e.live, e.entries, e.deleted, e.evicted), (0, 0, 1, 1), "{e:?}");
}
