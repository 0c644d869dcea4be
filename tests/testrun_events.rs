//! Flow events in the kernel, through BPF_PROG_TEST_RUN: an allowed flow sends one `begin`
//! event with its tuple and rule, a denied flow a `deny` event, and a flood of denied
//! packets is held to the per-CPU rate limit, with what was held back counted.

mod common;

use aya::{
    maps::RingBuf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use common::{
    kernel::{DROP, Kernel, PASS, link_tc_pipeline},
    packet::{L4, SYN, fragment, frame, frame_vlan},
};
use xdpgate::flowlog;
use xdpgate_common::{
    events::{
        DENY_EVENTS_PER_SEC, EVENT_BEGIN, EVENT_DENY, EVENT_DROP, EVENT_VERSION, EVENT_WAKE_BYTES,
        EVENT_WAKE_GAP_NS, FlowEvent, MONITOR_DROPS_PER_SEC,
    },
    flow::IcmpFlow,
    iface::Role,
    maps::EVENTS,
    stats::DROP_REASON_NAMES,
};

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 80}
"#;

fn drain(k: &Kernel) -> Vec<FlowEvent> {
    let mut ring: RingBuf<_> = k.pins.dir.open_map(EVENTS).unwrap().try_into().unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(FlowEvent::from_record(&item).expect("a whole event"));
    }
    out
}

/// A NAT gateway with public address 192.0.2.100, packets arriving from outside, no
/// events yet.
fn at_a_nat_gateway() -> Kernel {
    let k = Kernel::new();
    k.apply(
        r#"
virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - {name: natgw, public_addresses: [192.0.2.100], subnets: [198.51.100.0/24]}
"#,
    );
    k.arrive_as(Role::External);
    drain(&k);
    k
}

/// A packet to a NAT gateway's public address that matches no translation reaches the flow
/// log as a drop with its reason (before: counted only), with the version-2 fields: the
/// interface, TCP flags and length.
#[test]
fn nat_unmatched_drops_reach_the_flow_log() {
    let k = at_a_nat_gateway();
    let pkt = frame("203.0.113.7", "192.0.2.100", L4::Tcp(443, 5555, SYN));
    assert_eq!(k.run(&pkt), DROP);
    let events = drain(&k);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!((e.kind, e.version, e.key.dport), (EVENT_DROP, EVENT_VERSION, 5555));
    assert_eq!(DROP_REASON_NAMES[usize::from(e.reason)], "nat_unmatched");
    assert_eq!((e.tcp_flags, e.bytes as usize), (SYN, pkt.len()));
    assert_eq!(e.ifindex, 1, "the interface it arrived by (lo, as `arrive_as` registers)");
}

/// A dropped ICMP message other than echo names its kind, as its flow's key would (seen
/// failing after an outside review: kind 0, read as a ping of identifier 0).
#[test]
fn a_dropped_icmp_message_names_its_kind() {
    let k = at_a_nat_gateway();
    let timestamp = [13u8, 0, 0xf2, 0xfd, 0, 1, 0, 1];
    assert_eq!(k.run(&frame_vlan("203.0.113.7", "192.0.2.100", L4::Raw(1), &[], &timestamp)), DROP);
    let events = drain(&k);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(DROP_REASON_NAMES[usize::from(events[0].reason)], "nat_unmatched");
    assert_eq!(events[0].key.icmp_flow(), Some(IcmpFlow::Type(13)), "{:?}", events[0].key);
}

#[test]
fn allowed_and_denied_flows_send_events() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    drain(&k);
    assert_eq!(k.run(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 80, SYN))), PASS);
    assert_eq!(k.run(&frame("203.0.113.7", "198.51.100.10", L4::Tcp(40001, 22, SYN))), DROP);
    let events = drain(&k);
    assert_eq!(events.len(), 2, "{events:?}");
    let (begin, deny) = (&events[0], &events[1]);
    assert_eq!(
        (begin.kind, begin.key.sport, begin.key.dport, begin.key.proto),
        (EVENT_BEGIN, 40000, 80, 6)
    );
    assert_eq!((deny.kind, deny.key.dport), (EVENT_DENY, 22));
    assert_eq!(begin.generation, 1);
    // The rule numbers name the deciding rules of the running policy.
    let names = xdpgate_dataplane::flows::Names::read(&k.pins.dir).unwrap();
    let line = flowlog::event_line(&names, begin, None);
    assert_eq!(
        (line["nsg"].as_str(), line["rule"].as_str(), line["state"].as_str()),
        (Some("web"), Some("allow-web"), Some("begin"))
    );
    let line = flowlog::event_line(&names, deny, None);
    assert_eq!(
        (line["rule"].as_str(), line["decision"].as_str()),
        (Some("DenyAllInBound"), Some("deny"))
    );
    assert_eq!(
        (line["reason"].as_str(), line["tcp_flags"].as_str()),
        (Some("policy"), Some("SYN"))
    );
}

/// An east-west flow's events name the deciding rule of each side: the source subnet's
/// outbound rule and the destination subnet's inbound rule.
#[test]
fn east_west_events_name_both_sides() {
    let k = Kernel::new();
    k.apply(
        r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: a
    subnets: [198.51.100.0/25]
    rules:
      - {name: a-web-out, priority: 100, direction: outbound, access: allow, protocol: tcp,
         source: "*", destination: "*", destination_ports: 80}
  - name: b
    subnets: [198.51.100.128/25]
    rules:
      - {name: b-web-in, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: "*", destination: "*", destination_ports: 80}
      - {name: b-no-ssh, priority: 110, direction: inbound, access: deny, protocol: tcp,
         source: "*", destination: "*", destination_ports: 22}
"#,
    );
    k.arrive_as(Role::Internal);
    drain(&k);
    assert_eq!(k.run(&frame("198.51.100.10", "198.51.100.140", L4::Tcp(40000, 80, SYN))), PASS);
    assert_eq!(k.run(&frame("198.51.100.10", "198.51.100.140", L4::Tcp(40001, 22, SYN))), DROP);
    let events = drain(&k);
    assert_eq!(events.len(), 2, "{events:?}");
    let names = xdpgate_dataplane::flows::Names::read(&k.pins.dir).unwrap();
    let begin = flowlog::event_line(&names, &events[0], None);
    assert_eq!(
        (begin["rule"].as_str(), begin["direction"].as_str(), begin["state"].as_str()),
        (Some("b-web-in"), Some("outbound"), Some("begin")),
        "{begin}"
    );
    assert_eq!(begin["rules"]["outbound"]["rule"], "a-web-out", "{begin}");
    assert_eq!(begin["rules"]["inbound"]["nsg"], "b", "{begin}");
    let deny = flowlog::event_line(&names, &events[1], None);
    assert_eq!(
        (deny["rule"].as_str(), deny["decision"].as_str()),
        (Some("b-no-ssh"), Some("deny"))
    );
    // The source side let it out (its default rule) before the destination denied it.
    assert_eq!(deny["rules"]["outbound"]["rule"], "AllowVnetOutBound", "{deny}");
}

#[test]
fn a_flood_of_denied_packets_is_rate_limited_and_counted() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    drain(&k);
    const FLOOD: u32 = 20_000;
    let denied = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 22, SYN));
    // The limit is per CPU (each CPU has its own bucket): keep the flood on one CPU, which
    // the kernel's test-run loop would otherwise be free to leave between runs.
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
    let (suppressed_before, lost_before) =
        xdpgate_dataplane::stats::event_losses(&k.pins.dir).unwrap();
    let start = std::time::Instant::now();
    let prog: &Xdp = k.entry();
    let res = prog
        .test_run(TestRunOptions { data_in: Some(&denied), repeat: FLOOD, ..Default::default() })
        .expect("test_run");
    let elapsed = start.elapsed();
    assert_eq!(res.return_value, DROP);
    let sent = drain(&k).len() as u64;
    let (suppressed, lost) = xdpgate_dataplane::stats::event_losses(&k.pins.dir).unwrap();
    let (suppressed, lost) = (suppressed - suppressed_before, lost - lost_before);
    println!(
        "{FLOOD} denied packets in {elapsed:?}: {sent} events, {suppressed} suppressed, {lost} lost"
    );
    assert_eq!(
        sent + suppressed + lost,
        u64::from(FLOOD),
        "every denied packet is an event or counted"
    );
    // A full bucket, plus what refills while the flood runs (one per millisecond).
    let allowance =
        DENY_EVENTS_PER_SEC + elapsed.as_millis() as u64 * DENY_EVENTS_PER_SEC / 1000 + 1;
    assert!(sent <= allowance, "{sent} events exceed the rate limit ({allowance})");
    assert!(sent >= DENY_EVENTS_PER_SEC / 2, "the bucket starts full: {sent} events");
}

/// Rare events reach the agent's log through aya-log: here a stage goes missing from the
/// pipeline (the new-flow stage, which a new flow's first packet enters from the entry
/// stage; the policy stage, which a first fragment enters), the dataplane fails closed and
/// says why.
#[test]
fn a_missing_stage_fails_closed_and_is_logged() {
    use std::sync::{Arc, Mutex};
    use xdpgate_common::maps::{PIPELINE, PIPELINE_NEW, PIPELINE_POLICY};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<String>>>);
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            self.0.lock().unwrap().push(format!("{}", record.args()));
        }
        fn flush(&self) {}
    }

    let syn = frame_vlan("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 80, SYN), &[], &[0; 32]);
    let [first_fragment, _] = fragment(&syn, 24, 7);
    for (stage, packet) in [(PIPELINE_NEW, &syn), (PIPELINE_POLICY, &first_fragment)] {
        let mut k = Kernel::new();
        k.apply(POLICY);
        let capture = Capture::default();
        let mut logger =
            aya_log::EbpfLogger::init_with_logger(k.ebpf_mut(), capture.clone()).expect("logger");
        let mut pipeline: aya::maps::ProgramArray<_> =
            k.pins.dir.open_map(PIPELINE).unwrap().try_into().unwrap();
        pipeline.clear_index(&stage).unwrap();

        let before = k.drops("internal");
        assert_eq!(k.run(packet), DROP, "stage {stage} missing: fails closed");
        assert_eq!(k.drops("internal"), before + 1, "stage {stage}");
        logger.flush();
        let lines = capture.0.lock().unwrap().clone();
        let logged = lines.iter().any(|l| l.contains("pipeline stage or scratch map missing"));
        assert!(logged, "stage {stage}: {lines:?}");
    }
}

/// IRQ work interrupts taken so far on `cpu` (a ring buffer's wake-up is one).
fn irq_work(cpu: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap();
    let line = text.lines().find(|l| l.trim_start().starts_with("IWI:")).expect("an IWI line");
    line.split_whitespace().nth(1 + cpu).unwrap().parse().unwrap()
}

/// Runs this thread on one CPU, so the program runs (and queues its IRQ work) there.
fn pin_to_cpu() -> usize {
    let cpu = unsafe { libc::sched_getcpu() } as usize;
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    assert_eq!(unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) }, 0);
    cpu
}

/// A new flow's event does not wake the reader (an interrupt per flow, several microseconds
/// of its first packet) even when the reader has caught up: it polls. Filled past
/// `EVENT_WAKE_BYTES`, the ring wakes it, so a burst cannot overrun it between polls, but at
/// most once per `EVENT_WAKE_GAP_NS` on a CPU: a reader behind a flood is awake already.
/// (Before: 200 wake-ups for 200 flows, one per event; later, one per event past the level.)
#[test]
fn events_wake_the_reader_only_once_the_ring_fills() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let cpu = pin_to_cpu();
    let mut ring: RingBuf<_> = k.pins.dir.open_map(EVENTS).unwrap().try_into().unwrap();
    let mut read = || {
        let mut n = 0;
        while ring.next().is_some() {
            n += 1;
        }
        n
    };
    read();
    let syn = |port: u16| frame("203.0.113.7", "198.51.100.10", L4::Tcp(port, 80, SYN));
    // Caught up before every flow: the case in which the kernel would wake the reader.
    let before = irq_work(cpu);
    for port in 1000..1200 {
        assert_eq!(k.run(&syn(port)), PASS);
        assert_eq!(read(), 1);
    }
    let woken = irq_work(cpu) - before;
    // Other IRQ work on this CPU (timers, other tests' programs) may add a few.
    assert!(woken < 20, "{woken} IRQ work interrupts for 200 events");

    // Filled to just below the wake-up level, then past it.
    let record = (size_of::<FlowEvent>() + 8) as u32;
    let below = (EVENT_WAKE_BYTES - 1) / record;
    let before = irq_work(cpu);
    for i in 0..below {
        assert_eq!(k.run(&syn(2000 + i as u16)), PASS);
    }
    let quiet = irq_work(cpu) - before;
    let (before, start) = (irq_work(cpu), std::time::Instant::now());
    let past = 2_000u16;
    for i in 0..past {
        assert_eq!(k.run(&syn(30000 + i)), PASS);
    }
    let (woken, gaps) =
        (irq_work(cpu) - before, start.elapsed().as_nanos() as u64 / EVENT_WAKE_GAP_NS);
    println!("{woken} IRQ work interrupts for {past} events past the level in {gaps} ms");
    assert!(quiet < 20, "{quiet} IRQ work interrupts for {below} events below the level");
    assert!(woken >= 1, "the reader was not woken past the level");
    // One per gap at most, and the few of other IRQ work on this CPU.
    assert!(woken <= gaps + 1 + 20, "{woken} IRQ work interrupts for {past} events in {gaps} ms");
    assert_eq!(read(), below as usize + past as usize, "none lost");
}

/// The dataplane's tc ingress programs from a second load of the object on the same pins
/// (as `attach --hook tc` beside an XDP attachment loads its own), in `TC_PIPELINE`.
fn second_object_at_tc(k: &Kernel) -> aya::Ebpf {
    let mut ebpf = xdpgate_dataplane::load(&k.pins.dir).expect("a second load");
    link_tc_pipeline(&mut ebpf);
    ebpf
}

/// The rate limits are per CPU for the whole dataplane, not per loaded object: a flood of
/// denied packets through the XDP programs and then through the tc programs of a second
/// load, on one CPU, gets one bucket's worth of events in the flow log and in an
/// observer's ring, not one per object. (Before: twice as many, each object had its own.)
#[test]
fn the_rate_limits_hold_across_loaded_objects() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let tc = second_object_at_tc(&k);
    let _observer = xdpgate_dataplane::monitor::take(&k.pins.dir).unwrap();
    let mut monitor = xdpgate_dataplane::monitor::ring(&k.pins.dir).unwrap();
    drain(&k);
    while monitor.next().is_some() {}
    pin_to_cpu();
    const FLOOD: u32 = 3_000;
    let denied = frame("203.0.113.7", "198.51.100.10", L4::Tcp(40000, 22, SYN));
    let start = std::time::Instant::now();
    let xdp = k.entry().test_run(TestRunOptions {
        data_in: Some(&denied),
        repeat: FLOOD,
        ..Default::default()
    });
    assert_eq!(xdp.expect("test_run at XDP").return_value, DROP);
    let prog: &SchedClassifier = tc.program("xdpgate_tc").unwrap().try_into().unwrap();
    let at_tc = prog.test_run(TestRunOptions {
        data_in: Some(&denied),
        repeat: FLOOD,
        ..Default::default()
    });
    assert_eq!(at_tc.expect("test_run at tc").return_value, 2, "TC_ACT_SHOT");
    let elapsed = start.elapsed();
    let logged = drain(&k).len() as u64;
    let mut observed = 0u64;
    while monitor.next().is_some() {
        observed += 1;
    }
    // A full bucket, plus what refills while the floods run.
    let allowance = |per_sec: u64| per_sec + elapsed.as_millis() as u64 * per_sec / 1000 + 1;
    let (log_limit, observe_limit) =
        (allowance(DENY_EVENTS_PER_SEC), allowance(MONITOR_DROPS_PER_SEC));
    println!("2 x {FLOOD} denied packets in {elapsed:?}: {logged} logged, {observed} observed");
    assert!(logged <= log_limit, "{logged} flow-log events exceed the limit ({log_limit})");
    assert!(observed <= observe_limit, "{observed} observed exceed the limit ({observe_limit})");
    assert!(observed >= MONITOR_DROPS_PER_SEC / 2, "the bucket starts full: {observed} events");
}

/// An observer's ring starts empty of an earlier observer's events, and its own come from
/// the start of its lease: read away before the lease starts them (before: `observe` read
/// the ring away after taking the lease, and lost a packet sent as the lease showed).
#[test]
fn an_observer_sees_its_own_events_only() {
    let k = Kernel::new();
    k.apply(POLICY);
    k.arrive_as(Role::External);
    let denied = |sport| frame("203.0.113.7", "198.51.100.10", L4::Tcp(sport, 22, SYN));
    let earlier = xdpgate_dataplane::monitor::take(&k.pins.dir).unwrap();
    assert_eq!(k.run(&denied(40001)), DROP);
    drop(earlier);
    let _observer = xdpgate_dataplane::monitor::take(&k.pins.dir).unwrap();
    assert_eq!(k.run(&denied(40002)), DROP);
    let mut ring = xdpgate_dataplane::monitor::ring(&k.pins.dir).unwrap();
    let mut sports = Vec::new();
    while let Some(item) = ring.next() {
        sports.push(FlowEvent::from_record(&item).expect("a whole event").key.sport);
    }
    assert_eq!(sports, [40002], "the observer's events (source ports)");
}
