//! Differential test: random NSG policies and random packets, the kernel's verdict (through
//! BPF_PROG_TEST_RUN) against the reference evaluator's, case by case. Besides the verdict,
//! the NSG hit counters must show that the kernel decided by the same rule at every layer.
//!
//! The dataplane is stateful (an allowed packet opens a flow both ways) and the reference is
//! not, so every packet of a run has a 5-tuple never seen before, in either orientation.
//!
//! Knobs: `XDPGATE_DIFF_CASES` (packets of the random test, default 10000) and
//! `XDPGATE_DIFF_SEED` (decimal or 0x-hex; printed on failure). A mismatch is shrunk to a
//! minimal policy before it is reported.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use common::{
    kernel::{DROP, Kernel, PASS},
    packet::{ACK, FIN, L4, MAC_A, MAC_B, RST, SYN, frame},
    policygen::{
        DOC_RANGES, LITERALS, NsgSpec, PolicySpec, RuleSpec, fresh_priority, random_policy,
        random_rule, strings,
    },
    rng::{Rng, env_number},
};
use etherparse::{IpHeaders, IpNumber, PacketBuilder, PacketBuilderStep};
use ipnet::IpNet;
use xdpgate_common::{
    iface::Role,
    maps::NSG_HITS,
    nsg::{BITMAP_WORDS, MAX_RULES, TABLES_PER_SLOT},
};
use xdpgate_dataplane::{apply, verify};
use xdpgate_policy::{
    Access, Direction, Layer, Policy, Ports, Protocol, compile, load_str,
    reference::{Packet, Verdict, evaluate},
};

const DEFAULT_SEED: u64 = 0x5eed_d1ff;
const DEFAULT_CASES: usize = 10_000;

fn seed() -> u64 {
    env_number("XDPGATE_DIFF_SEED").unwrap_or(DEFAULT_SEED)
}

fn cases() -> usize {
    env_number("XDPGATE_DIFF_CASES").map_or(DEFAULT_CASES, |n| n as usize)
}

// ---------------------------------------------------------------------------------------
// Packets.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp(u16, u16, u8),
    Udp(u16, u16),
    Echo {
        id: u16,
        reply: bool,
    },
    /// An ICMP(v6) message other than echo, by type.
    Icmp(u8),
    /// Another IP protocol (ESP, AH, GRE, SCTP, the other family's ICMP), no ports.
    Raw(u8),
}

#[derive(Clone, Copy, Debug)]
struct Pkt {
    dir: Direction,
    src: IpAddr,
    dst: IpAddr,
    kind: Kind,
}

type Tuple = (IpAddr, IpAddr, u16, u16, u8);

impl Pkt {
    fn proto(&self) -> u8 {
        match self.kind {
            Kind::Tcp(..) => 6,
            Kind::Udp(..) => 17,
            Kind::Echo { .. } | Kind::Icmp(_) if self.src.is_ipv6() => 58,
            Kind::Echo { .. } | Kind::Icmp(_) => 1,
            Kind::Raw(p) => p,
        }
    }

    /// The flow-table key the dataplane uses.
    fn tuple(&self) -> Tuple {
        let (a, b) = match self.kind {
            Kind::Tcp(s, d, _) | Kind::Udp(s, d) => (s, d),
            Kind::Echo { id, .. } => (id, id),
            Kind::Icmp(_) | Kind::Raw(_) => (0, 0),
        };
        (self.src, self.dst, a, b, self.proto())
    }

    fn reference(&self) -> Packet {
        let (sport, dport) = match self.kind {
            Kind::Tcp(s, d, _) | Kind::Udp(s, d) => (Some(s), Some(d)),
            _ => (None, None),
        };
        Packet {
            direction: self.dir,
            proto: self.proto(),
            src: self.src,
            dst: self.dst,
            sport,
            dport,
        }
    }

    fn frame(&self) -> Vec<u8> {
        let (s, d) = (self.src.to_string(), self.dst.to_string());
        let payload = b"xdpgate-differential";
        let mut out = Vec::new();
        match self.kind {
            Kind::Tcp(sp, dp, flags) => return frame(&s, &d, L4::Tcp(sp, dp, flags)),
            Kind::Udp(sp, dp) => return frame(&s, &d, L4::Udp(sp, dp)),
            Kind::Echo { id, reply: false } => return frame(&s, &d, L4::Echo(id)),
            Kind::Echo { id, reply: true } if self.src.is_ipv6() => {
                ip_step(self.src, self.dst).icmpv6_echo_reply(id, 1).write(&mut out, payload)
            }
            Kind::Echo { id, reply: true } => {
                ip_step(self.src, self.dst).icmpv4_echo_reply(id, 1).write(&mut out, payload)
            }
            Kind::Icmp(t) if self.src.is_ipv6() => {
                ip_step(self.src, self.dst).icmpv6_raw(t, 0, [0; 4]).write(&mut out, payload)
            }
            Kind::Icmp(t) => {
                ip_step(self.src, self.dst).icmpv4_raw(t, 0, [0; 4]).write(&mut out, payload)
            }
            // The other family's ICMP number carries that family's echo request: what a
            // family-blind parser would take for an echo with an identifier.
            Kind::Raw(p @ (1 | 58)) => {
                let kind = if p == 58 { 128 } else { 8 };
                let echo = [&[kind, 0, 0, 0, 0x12, 0x34, 0, 1][..], payload].concat();
                ip_step(self.src, self.dst).write(&mut out, IpNumber(p), &echo)
            }
            Kind::Raw(p) => ip_step(self.src, self.dst).write(&mut out, IpNumber(p), payload),
        }
        .expect("build packet");
        out
    }
}

fn ip_step(src: IpAddr, dst: IpAddr) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    }
}

fn sock(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

impl fmt::Display for Pkt {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let dir = match self.dir {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        };
        let (s, d) = (self.src, self.dst);
        match self.kind {
            Kind::Tcp(sp, dp, flags) => {
                write!(f, "{dir} tcp {} -> {} flags {flags:#04x}", sock(s, sp), sock(d, dp))
            }
            Kind::Udp(sp, dp) => write!(f, "{dir} udp {} -> {}", sock(s, sp), sock(d, dp)),
            Kind::Echo { id, reply } => {
                let what = if reply { "reply" } else { "request" };
                write!(f, "{dir} icmp echo {what} id {id} {s} -> {d} (proto {})", self.proto())
            }
            Kind::Icmp(t) => write!(f, "{dir} icmp type {t} {s} -> {d} (proto {})", self.proto()),
            Kind::Raw(p) => write!(f, "{dir} ip proto {p} {s} -> {d}"),
        }
    }
}

/// A user rule to aim packets at: its addresses (the local side narrowed to its NSG's
/// associations, both sides to the documentation ranges), protocol and ports.
struct Target {
    dir: Direction,
    src: Vec<IpNet>,
    dst: Vec<IpNet>,
    protocol: Protocol,
    sport: Ports,
    dport: Ports,
}

/// Addresses and ports worth sending, from a loaded policy: every prefix it names (inside
/// the documentation ranges) and the edges of every port range; and its user rules as
/// targets.
struct Universe {
    nets4: Vec<IpNet>,
    nets6: Vec<IpNet>,
    /// Subnets and hosts NSGs are associated with.
    local4: Vec<IpNet>,
    local6: Vec<IpNet>,
    ports: Vec<u16>,
    doc: Vec<IpNet>,
    targets: Vec<Target>,
}

impl Universe {
    fn new(policy: &Policy) -> Self {
        let doc: Vec<IpNet> = DOC_RANGES.iter().map(|s| s.parse().unwrap()).collect();
        let in_doc = |nets: &[IpNet]| compile::intersect(nets, &doc);
        let mut all: Vec<IpNet> = doc.clone();
        let mut local: Vec<IpNet> = Vec::new();
        let mut ports: Vec<u16> = vec![0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 65535];
        let mut targets = Vec::new();
        for nsg in &policy.nsgs {
            let associated: Vec<IpNet> = nsg.subnets.iter().chain(&nsg.hosts).copied().collect();
            local.extend(in_doc(&associated));
            for r in &nsg.rules {
                let (src, dst) = (in_doc(&r.source), in_doc(&r.destination));
                all.extend(src.iter().chain(&dst));
                for range in r.source_ports.iter().chain(&r.destination_ports).flatten() {
                    ports.extend([range.lo, range.hi]);
                    ports.extend(range.lo.checked_sub(1));
                    ports.extend(range.hi.checked_add(1));
                }
                if r.default {
                    continue;
                }
                let (src, dst) = match r.direction {
                    Direction::Inbound => (src, compile::intersect(&dst, &associated)),
                    Direction::Outbound => (compile::intersect(&src, &associated), dst),
                };
                if !src.is_empty() && !dst.is_empty() {
                    targets.push(Target {
                        dir: r.direction,
                        src,
                        dst,
                        protocol: r.protocol,
                        sport: r.source_ports.clone(),
                        dport: r.destination_ports.clone(),
                    });
                }
            }
        }
        all.extend(&local);
        for v in [&mut all, &mut local] {
            v.sort();
            v.dedup();
        }
        ports.sort_unstable();
        ports.dedup();
        let split = |v: &[IpNet], six: bool| -> Vec<IpNet> {
            v.iter().filter(|n| matches!(n, IpNet::V6(_)) == six).copied().collect()
        };
        Self {
            nets4: split(&all, false),
            nets6: split(&all, true),
            local4: split(&local, false),
            local6: split(&local, true),
            ports,
            doc,
            targets,
        }
    }

    /// An address of `nets`: often an edge of one; in `outside` percent of the calls, one
    /// in five is just outside it.
    fn addr(&self, rng: &mut Rng, nets: &[IpNet], outside: u64) -> IpAddr {
        let outside = rng.percent(outside);
        let net = *rng.pick(nets);
        let (lo, hi) = match net {
            IpNet::V4(n) => {
                (u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast())))
            }
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        };
        let v = match rng.below(if outside { 10 } else { 8 }) {
            0 | 1 => lo,
            2 | 3 => hi,
            8 => lo.wrapping_sub(1),
            9 => hi.wrapping_add(1),
            _ => lo + rng.u128() % (hi - lo).saturating_add(1).max(1),
        };
        let addr = match net {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
        };
        if self.doc.iter().any(|d| d.contains(&addr)) { addr } else { net.network() }
    }

    fn port(&self, rng: &mut Rng) -> u16 {
        match rng.below(10) {
            0..=5 => *rng.pick(&self.ports),
            6 => rng.range(1024, 65535) as u16,
            _ => rng.u16(),
        }
    }

    /// A port inside `ports` (often at an edge of one of its ranges), or any for `*`.
    fn port_in(&self, rng: &mut Rng, ports: &Ports, ephemeral: bool) -> u16 {
        match ports {
            Some(ranges) => {
                let r = *rng.pick(ranges);
                match rng.below(4) {
                    0 => r.lo,
                    1 => r.hi,
                    _ => rng.range(u64::from(r.lo), u64::from(r.hi)) as u16,
                }
            }
            None if ephemeral && rng.percent(60) => rng.range(1024, 65535) as u16,
            None => self.port(rng),
        }
    }

    fn packet(&self, rng: &mut Rng) -> Pkt {
        if !self.targets.is_empty() && rng.percent(50) {
            return self.aimed(rng);
        }
        let dir = if rng.percent(50) { Direction::Inbound } else { Direction::Outbound };
        let six = rng.percent(40);
        let (nets, local) =
            if six { (&self.nets6, &self.local6) } else { (&self.nets4, &self.local4) };
        let near = if !local.is_empty() && rng.percent(85) {
            self.addr(rng, local, 20)
        } else {
            self.addr(rng, nets, 100)
        };
        // A quarter east-west: both ends in the policy's own addresses, so the source's
        // outbound and the destination's inbound layers both judge it.
        let far = if !local.is_empty() && rng.percent(25) {
            self.addr(rng, local, 20)
        } else {
            self.addr(rng, nets, 100)
        };
        let (src, dst) = match dir {
            Direction::Inbound => (far, near),
            Direction::Outbound => (near, far),
        };
        let proto = rng.weighted(&[(34, 0), (25, 1), (14, 2), (4, 3), (8, 4), (15, 5), (6, 6)]);
        let kind = self.kind(rng, proto, six, &None, &None);
        Pkt { dir, src, dst, kind }
    }

    /// A packet meant to match one user rule (unless a rule before it matches too).
    fn aimed(&self, rng: &mut Rng) -> Pkt {
        let t = rng.pick(&self.targets);
        let has = |nets: &[IpNet], six: bool| nets.iter().any(|n| matches!(n, IpNet::V6(_)) == six);
        let families: Vec<bool> =
            [false, true].into_iter().filter(|&six| has(&t.src, six) && has(&t.dst, six)).collect();
        if families.is_empty() {
            // v4 sources with v6 destinations: nothing can match this rule.
            return self.packet(rng);
        }
        let six = *rng.pick(&families);
        let of = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter().filter(|n| matches!(n, IpNet::V6(_)) == six).copied().collect()
        };
        let src = self.addr(rng, &of(&t.src), 5);
        let dst = self.addr(rng, &of(&t.dst), 5);
        let proto = match t.protocol {
            Protocol::Tcp => 0,
            Protocol::Udp => 1,
            // ICMP of the other family is no ICMP: the rule's near miss.
            Protocol::Icmp => rng.weighted(&[(6, 2), (2, 3), (2, 4), (3, 6)]),
            Protocol::Esp | Protocol::Ah => 5,
            Protocol::Any => {
                rng.weighted(&[(40, 0), (40, 1), (8, 2), (4, 3), (4, 4), (4, 5), (4, 6)])
            }
        };
        let mut kind = self.kind(rng, proto, six, &t.sport, &t.dport);
        match (t.protocol, &mut kind) {
            (Protocol::Esp, Kind::Raw(p)) => *p = 50,
            (Protocol::Ah, Kind::Raw(p)) => *p = 51,
            _ => {}
        }
        Pkt { dir: t.dir, src, dst, kind }
    }

    /// The L4 part: 0 TCP, 1 UDP, 2 echo request, 3 echo reply, 4 other ICMP, 5 no ports,
    /// 6 the other family's ICMP protocol number (a plain protocol here).
    fn kind(&self, rng: &mut Rng, proto: u8, six: bool, sport: &Ports, dport: &Ports) -> Kind {
        let ports = |rng: &mut Rng| {
            let s = if sport.is_none() && rng.percent(40) {
                self.port(rng)
            } else {
                self.port_in(rng, sport, true)
            };
            (s, self.port_in(rng, dport, false))
        };
        match proto {
            0 => {
                let (s, d) = ports(rng);
                Kind::Tcp(s, d, *rng.pick(&[SYN, SYN, SYN, ACK, SYN | ACK, FIN | ACK, RST, 0]))
            }
            1 => {
                let (s, d) = ports(rng);
                Kind::Udp(s, d)
            }
            2 => Kind::Echo { id: rng.u16(), reply: false },
            3 => Kind::Echo { id: rng.u16(), reply: true },
            4 => {
                Kind::Icmp(if six { *rng.pick(&[1, 2, 3, 4]) } else { *rng.pick(&[3, 5, 11, 13]) })
            }
            5 => Kind::Raw(*rng.pick(&[50, 50, 51, 51, 47, 132])),
            _ => Kind::Raw(if six { 1 } else { 58 }),
        }
    }
}

/// 5-tuples used so far, both orientations: the kernel remembers allowed flows.
#[derive(Default)]
struct Tuples(HashSet<Tuple>);

impl Tuples {
    fn claim(&mut self, p: &Pkt) -> bool {
        let t = p.tuple();
        let r = (t.1, t.0, t.3, t.2, t.4);
        if self.0.contains(&t) || self.0.contains(&r) {
            return false;
        }
        self.0.insert(t);
        self.0.insert(r);
        true
    }

    /// A random packet with a tuple never used before.
    fn fresh(&mut self, rng: &mut Rng, u: &Universe) -> Pkt {
        for _ in 0..200 {
            let p = u.packet(rng);
            if self.claim(&p) {
                return p;
            }
        }
        // The universe is crowded (a very long run): TCP with random ports always fits.
        loop {
            let mut p = u.packet(rng);
            p.kind = Kind::Tcp(rng.u16(), rng.u16(), SYN);
            if self.claim(&p) {
                return p;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running cases.

struct Harness {
    k: Kernel,
    role: Option<Role>,
    hits: PerCpuArray<MapData, u64>,
}

struct Applied {
    spec: PolicySpec,
    policy: Policy,
    /// (layer, NSG, rule) -> global rule index in the active slot.
    index: HashMap<(Layer, String, String), u32>,
}

#[derive(Default)]
struct Tally {
    packets: usize,
    allowed: usize,
    by_user_rule: usize,
    by_default_rule: usize,
    two_layers: usize,
    unfiltered: usize,
    /// Packets the kernel classified, by table and bitmap word of each layer's deciding rule
    /// (`Applied::index`'s numbering: `table * MAX_RULES + bit`).
    words: BTreeMap<(u32, u32), usize>,
    /// Tables with rules whose IPv4 addresses the kernel searched in ranges, and those it
    /// looked up in the trie (`PinnedTables::ranged`): both ways must agree with the
    /// reference.
    ranged_tables: usize,
    trie_tables: usize,
}

impl Tally {
    /// `rules`: the deciding rules the kernel counted (see `Harness::check`).
    fn record(&mut self, v: &Verdict, rules: &[u32]) {
        for &r in rules {
            *self.words.entry((r / MAX_RULES, r % MAX_RULES / 64)).or_default() += 1;
        }
        self.packets += 1;
        self.allowed += usize::from(v.allowed);
        match v.decided_by.len() {
            0 => self.unfiltered += 1,
            2 => self.two_layers += 1,
            _ => {}
        }
        if let Some(last) = v.decided_by.last() {
            if last.priority >= 65000 {
                self.by_default_rule += 1;
            } else {
                self.by_user_rule += 1;
            }
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} allowed, {} denied; decided by a user rule {}, by a default rule {}, \
             at two layers {}, unfiltered {}; tables with IPv4 ranges {}, without {}",
            self.allowed,
            self.packets - self.allowed,
            self.by_user_rule,
            self.by_default_rule,
            self.two_layers,
            self.unfiltered,
            self.ranged_tables,
            self.trie_tables
        )
    }
}

fn describe(v: &Verdict) -> String {
    let rules: Vec<String> = v
        .decided_by
        .iter()
        .map(|r| {
            let access = if r.access == Access::Allow { "allow" } else { "deny" };
            let (dir, layer, nsg, rule, prio) = (r.direction, r.layer, &r.nsg, &r.rule, r.priority);
            format!("{dir:?} {layer:?} {nsg}/{rule} (priority {prio}, {access})")
        })
        .collect();
    let verdict = if v.allowed { "allow" } else { "deny" };
    if rules.is_empty() {
        format!("{verdict} (no NSG applies)")
    } else {
        format!("{verdict} decided by [{}]", rules.join(", "))
    }
}

impl Harness {
    fn new() -> Self {
        let k = Kernel::new();
        let hits = k.pins.dir.open_map(NSG_HITS).unwrap().try_into().unwrap();
        Self { k, role: None, hits }
    }

    /// Loads, applies and indexes a policy; `Err` with the loader's message if invalid.
    fn apply(&mut self, spec: &PolicySpec) -> Result<Applied, String> {
        let yaml = spec.yaml();
        let policy = load_str(&yaml, "differential.yaml").map_err(|e| e.to_string())?;
        self.k.apply(&yaml);
        let compiled = compile::compile(&policy).expect("compile");
        let (slot, _) = apply::active(&self.k.pins.dir).expect("active slot");
        let mut index = HashMap::new();
        for (t, table) in compiled.tables.iter().enumerate() {
            let table_id = slot * TABLES_PER_SLOT + t as u32;
            for (bit, r) in table.rules.iter().enumerate() {
                index.insert(
                    (r.layer, r.nsg.clone(), r.rule.name.clone()),
                    table_id * MAX_RULES + bit as u32,
                );
            }
        }
        Ok(Applied { spec: spec.clone(), policy, index })
    }

    fn hits(&self, index: u32) -> u64 {
        self.hits.get(&index, 0).expect("NSG_HITS").iter().sum()
    }

    /// Runs one packet. `Ok`: the reference's verdict and the deciding rules the kernel
    /// counted (none for a segment it did not classify); `Err` describes a disagreement.
    fn check(&mut self, a: &Applied, p: &Pkt) -> Result<(Verdict, Vec<u32>), Mismatch> {
        let role = match p.dir {
            Direction::Inbound => Role::External,
            Direction::Outbound => Role::Internal,
        };
        if self.role != Some(role) {
            self.k.arrive_as(role);
            self.role = Some(role);
        }
        let want = evaluate(&a.policy, &p.reference());
        let counters: Vec<u32> = want
            .decided_by
            .iter()
            .map(|r| a.index[&(r.layer, r.nsg.clone(), r.rule.clone())])
            .collect();
        let before: Vec<u64> = counters.iter().map(|&i| self.hits(i)).collect();
        let got = self.k.run(&p.frame());
        // A TCP segment other than a SYN starts no flow whatever the rules say (drop reason
        // no_flow), and is never classified, so no rule counts it.
        let starts_flow =
            !matches!(p.kind, Kind::Tcp(_, _, flags) if flags & (SYN | ACK | FIN | RST) != SYN);
        let expected = if want.allowed && starts_flow { PASS } else { DROP };
        if got != expected {
            let got = match got {
                PASS => "PASS".to_owned(),
                DROP => "DROP".to_owned(),
                v => format!("action {v}"),
            };
            let what = format!("{p}: kernel {got}, reference {}", describe(&want));
            return Err(Mismatch { verdict: true, what });
        }
        let moved: Vec<u64> =
            counters.iter().zip(&before).map(|(&i, b)| self.hits(i).wrapping_sub(*b)).collect();
        let want_moved = u64::from(starts_flow);
        if moved.iter().any(|&m| m != want_moved) {
            return Err(Mismatch {
                verdict: false,
                what: format!(
                    "{p}: verdicts agree, but the hit counters of the reference's deciding rules \
                 moved by {moved:?} (want {want_moved} each): reference {}",
                    describe(&want)
                ),
            });
        }
        Ok((want, if starts_flow { counters } else { Vec::new() }))
    }
}

/// A disagreement: on the verdict, or only on the deciding rule.
struct Mismatch {
    verdict: bool,
    what: String,
}

struct Failure {
    policy_no: usize,
    spec: PolicySpec,
    pkt: Pkt,
    mismatch: Mismatch,
}

/// Removes parts of the policy while the packet still shows a disagreement of the same kind
/// (`verdict` or rule only): chunks of rules first, then single NSGs, rules, associations,
/// list items and optional sections.
fn shrink(
    h: &mut Harness,
    spec: &PolicySpec,
    pkt: &Pkt,
    verdict: bool,
) -> (PolicySpec, String, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tries = 0;
    let mut best = spec.clone();
    let mut what = String::new();
    let mut still_fails = |h: &mut Harness, cand: &PolicySpec, what: &mut String| -> bool {
        tries += 1;
        let Ok(a) = h.apply(cand) else { return false };
        match h.check(&a, pkt) {
            Err(m) if m.verdict == verdict => {
                *what = m.what;
                true
            }
            _ => false,
        }
    };
    if !still_fails(h, &best, &mut what) {
        return (best, "(the disagreement did not reproduce)".to_owned(), tries);
    }
    // Chunks of rules, halving.
    for n in 0..best.nsgs.len() {
        let mut chunk = best.nsgs[n].rules.len().div_ceil(2);
        while chunk >= 1 && Instant::now() < deadline {
            let mut start = 0;
            while start < best.nsgs[n].rules.len() && Instant::now() < deadline {
                let mut cand = best.clone();
                let end = (start + chunk).min(cand.nsgs[n].rules.len());
                cand.nsgs[n].rules.drain(start..end);
                if still_fails(h, &cand, &mut what) {
                    best = cand;
                } else {
                    start += chunk;
                }
            }
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    // Single removals until nothing more can go.
    loop {
        let mut progressed = false;
        let mut i = 0;
        while let Some(cand) = mutate(&best, i) {
            if Instant::now() > deadline {
                return (best, what, tries);
            }
            if still_fails(h, &cand, &mut what) {
                best = cand;
                progressed = true;
            } else {
                i += 1;
            }
        }
        if !progressed {
            return (best, what, tries);
        }
    }
}

/// The `i`-th simplification of `spec`, `None` past the last.
fn mutate(spec: &PolicySpec, mut i: usize) -> Option<PolicySpec> {
    let mut s = spec.clone();
    let mut take = |n: usize| -> Option<usize> {
        if i < n {
            Some(i)
        } else {
            i -= n;
            None
        }
    };
    if let Some(j) = take(s.nsgs.len()) {
        s.nsgs.remove(j);
        return Some(s);
    }
    for n in 0..s.nsgs.len() {
        if let Some(j) = take(s.nsgs[n].rules.len()) {
            s.nsgs[n].rules.remove(j);
            return Some(s);
        }
        if let Some(j) = take(s.nsgs[n].subnets.len()) {
            s.nsgs[n].subnets.remove(j);
            return Some(s);
        }
        if let Some(j) = take(s.nsgs[n].hosts.len()) {
            s.nsgs[n].hosts.remove(j);
            return Some(s);
        }
    }
    for n in 0..s.nsgs.len() {
        for r in 0..s.nsgs[n].rules.len() {
            if simplify_rule(&mut s.nsgs[n].rules[r], &mut take) {
                return Some(s);
            }
        }
    }
    if !s.peered.is_empty() && take(1).is_some() {
        s.peered.clear();
        return Some(s);
    }
    if !s.probes.is_empty() && take(1).is_some() {
        s.probes.clear();
        return Some(s);
    }
    if let Some(j) = take(s.tags.len()) {
        s.tags.remove(j);
        return Some(s);
    }
    if let Some(j) = take(s.asgs.len()) {
        s.asgs.remove(j);
        return Some(s);
    }
    if s.address_space.len() > 1
        && let Some(j) = take(s.address_space.len())
    {
        s.address_space.remove(j);
        return Some(s);
    }
    None
}

/// Drops one item of a list of the rule (or a port restriction) if `take` picks it.
fn simplify_rule(rule: &mut RuleSpec, take: &mut impl FnMut(usize) -> Option<usize>) -> bool {
    for items in [&mut rule.source, &mut rule.destination] {
        if items.len() > 1
            && let Some(j) = take(items.len())
        {
            items.remove(j);
            return true;
        }
    }
    for ports in [&mut rule.source_ports, &mut rule.destination_ports] {
        if let Some(items) = ports {
            if items.len() > 1
                && let Some(j) = take(items.len())
            {
                items.remove(j);
                return true;
            }
            if take(1).is_some() {
                *ports = None;
                return true;
            }
        }
    }
    false
}

/// Panics with every disagreement, the first one shrunk to a minimal policy.
fn report(h: &mut Harness, test: &str, seed: u64, failures: &[Failure], total: usize) {
    if failures.is_empty() {
        return;
    }
    // A wrong verdict makes the clearer example.
    let first = failures.iter().find(|f| f.mismatch.verdict).unwrap_or(&failures[0]);
    let mut msg = format!(
        "{test}: {} of {total} packets disagree with the reference (seed {seed}; rerun with \
         XDPGATE_DIFF_SEED={seed})\n",
        failures.len()
    );
    for f in failures.iter().take(20) {
        let _ = writeln!(msg, "  policy #{}: {}", f.policy_no, f.mismatch.what);
    }
    let _ = writeln!(
        msg,
        "\nshrinking this disagreement of policy #{}:\n  {}\npolicy #{0} as generated:\n{}",
        first.policy_no,
        first.mismatch.what,
        first.spec.yaml()
    );
    let (small, what, tries) = shrink(h, &first.spec, &first.pkt, first.mismatch.verdict);
    let _ = writeln!(
        msg,
        "shrunk in {tries} tries to {} rule(s):\n{}\npacket: {}\n{what}",
        small.rule_count(),
        small.yaml(),
        first.pkt
    );
    panic!("{msg}");
}

/// One test's kernel, randomness, used tuples and results.
struct Run {
    h: Harness,
    rng: Rng,
    tuples: Tuples,
    tally: Tally,
    failures: Vec<Failure>,
    policies: usize,
}

impl Run {
    fn new(seed: u64) -> Self {
        Self {
            h: Harness::new(),
            rng: Rng(seed),
            tuples: Tuples::default(),
            tally: Tally::default(),
            failures: Vec::new(),
            policies: 0,
        }
    }

    /// Applies `spec` and checks `packets` fresh random packets against it.
    fn policy(&mut self, spec: &PolicySpec, packets: usize) {
        self.policies += 1;
        let policy_no = self.policies;
        let applied = self.h.apply(spec).unwrap_or_else(|e| {
            panic!("generated policy #{policy_no} rejected: {e}\n{}", spec.yaml())
        });
        let tables = verify::PinnedTables::open(&self.h.k.pins.dir).expect("pinned tables");
        for t in (0..TABLES_PER_SLOT).filter(|&t| tables.config.rule_counts[t as usize] > 0) {
            if tables.ranged(t) {
                self.tally.ranged_tables += 1;
            } else {
                self.tally.trie_tables += 1;
            }
        }
        let universe = Universe::new(&applied.policy);
        for _ in 0..packets {
            let pkt = self.tuples.fresh(&mut self.rng, &universe);
            match self.h.check(&applied, &pkt) {
                Ok((v, rules)) => self.tally.record(&v, &rules),
                Err(mismatch) => {
                    self.tally.packets += 1;
                    let spec = applied.spec.clone();
                    self.failures.push(Failure { policy_no, spec, pkt, mismatch });
                }
            }
        }
    }

    fn report(&mut self, test: &str, seed: u64) {
        report(&mut self.h, test, seed, &self.failures, self.tally.packets);
    }
}

#[test]
fn kernel_agrees_with_reference_on_random_policies() {
    let (seed, total) = (seed(), cases());
    let start = Instant::now();
    let mut run = Run::new(seed);
    let mut rules = 0;
    while run.tally.packets < total {
        let spec = random_policy(&mut run.rng);
        let n = (run.rng.range(100, 300) as usize).min(total - run.tally.packets);
        rules += spec.rule_count();
        run.policy(&spec, n);
    }
    let tally = &run.tally;
    println!(
        "differential: {} policies ({rules} user rules), {} packets, {} mismatches \
         (seed {seed}) in {:.1?}\n  {tally}",
        run.policies,
        tally.packets,
        run.failures.len(),
        start.elapsed()
    );
    run.report("random policies", seed);
    // A generator that only ever allows (or denies) would prove little.
    let tally = &run.tally;
    if total >= 1000 {
        assert!(tally.allowed * 10 > tally.packets, "too few allowed packets: {tally}");
        assert!((tally.packets - tally.allowed) * 10 > tally.packets, "too few denied: {tally}");
        assert!(tally.by_user_rule * 5 > tally.packets, "user rules decide too rarely: {tally}");
        assert!(tally.two_layers * 20 > tally.packets, "two layers too rarely: {tally}");
        assert!(tally.ranged_tables > 0, "no table searched its IPv4 ranges: {tally}");
    }
}

// ---------------------------------------------------------------------------------------
// Edge cases the random generator reaches rarely.

fn rule(
    name: String,
    priority: u32,
    inbound: bool,
    access: &str,
    protocol: &str,
    source: &[&str],
    destination: &[&str],
) -> RuleSpec {
    RuleSpec {
        name,
        priority,
        inbound,
        direction: if inbound { "inbound" } else { "outbound" }.to_owned(),
        access: access.to_owned(),
        protocol: protocol.to_owned(),
        source: strings(source),
        destination: strings(destination),
        source_ports: None,
        destination_ports: None,
    }
}

fn vnet() -> PolicySpec {
    PolicySpec {
        address_space: strings(&["198.51.100.0/24", "2001:db8:1::/64"]),
        peered: strings(&["192.0.2.128/25"]),
        ..Default::default()
    }
}

const NESTED4: &[&str] = &[
    "0.0.0.0/0",
    "192.0.0.0/8",
    "198.0.0.0/8",
    "203.0.0.0/8",
    "198.51.0.0/16",
    "198.51.100.0/24",
    "198.51.100.0/25",
    "198.51.100.0/26",
    "198.51.100.0/28",
    "198.51.100.7/32",
    "198.51.100.200/32",
    "203.0.113.0/24",
    "203.0.113.128/25",
    "203.0.113.200/32",
    "192.0.2.0/24",
    "192.0.2.0/25",
    "192.0.2.1/32",
];

const NESTED6: &[&str] = &[
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1::/64",
    "2001:db8:1::/80",
    "2001:db8:1::/96",
    "2001:db8:1::7/128",
    "2001:db8:2::/64",
    "2001:db8:2::/120",
    "2001:db8:2::5/128",
];

fn prefix_len(s: &str) -> u8 {
    s.parse::<IpNet>().unwrap().prefix_len()
}

/// Rules on every nested prefix, as source and as destination, both directions, with
/// priorities in `order`: 0 longest prefix first, 1 shortest first, else random.
fn nested_policy(rng: &mut Rng, order: usize) -> PolicySpec {
    let mut spec = vnet();
    let mut nested: Vec<&str> = NESTED4.iter().chain(NESTED6).copied().collect();
    for (n, (subnets, hosts)) in [
        (&["198.51.100.0/25", "2001:db8:1::/80"][..], &["198.51.100.7", "2001:db8:1::7"][..]),
        (&["198.51.100.128/25", "2001:db8:1:0:1::/80"][..], &["198.51.100.200"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        match order {
            0 => nested.sort_by_key(|s| std::cmp::Reverse(prefix_len(s))),
            1 => nested.sort_by_key(|s| prefix_len(s)),
            _ => rng.shuffle(&mut nested),
        }
        let mut rules = Vec::new();
        for inbound in [true, false] {
            let mut priority = 100 + rng.range(0, 5) as u32;
            for (i, item) in nested.iter().enumerate() {
                for as_source in [true, false] {
                    let (src, dst): (&[&str], &[&str]) =
                        if as_source { (&[item], &["*"]) } else { (&["*"], &[item]) };
                    let access = if rng.percent(50) { "allow" } else { "deny" };
                    let protocol = *rng.pick(&["any", "any", "tcp", "udp", "icmp"]);
                    let name =
                        format!("{}{}{i}", if inbound { "in" } else { "out" }, u8::from(as_source));
                    rules.push(rule(name, priority, inbound, access, protocol, src, dst));
                    priority += rng.range(1, 3) as u32;
                }
            }
        }
        spec.nsgs.push(NsgSpec {
            name: format!("nested{n}"),
            subnets: strings(subnets),
            hosts: vec![],
            rules,
        });
        // A host NSG inside (and one outside) the subnet, with its own nested rules.
        let mut host_rules = Vec::new();
        for (i, item) in nested.iter().enumerate() {
            if !rng.percent(40) {
                continue;
            }
            let inbound = rng.percent(50);
            let access = if rng.percent(50) { "allow" } else { "deny" };
            let (src, dst): (&[&str], &[&str]) =
                if rng.percent(50) { (&[item], &["*"]) } else { (&["*"], &[item]) };
            host_rules.push(rule(
                format!("h{i}"),
                200 + i as u32,
                inbound,
                access,
                "any",
                src,
                dst,
            ));
        }
        spec.nsgs.push(NsgSpec {
            name: format!("host{n}"),
            subnets: vec![],
            hosts: strings(hosts),
            rules: host_rules,
        });
    }
    spec
}

/// Abutting port ranges covering all 65536 ports (as destination or source ports), the full
/// range spelled out, and adjacent ranges in one list, with random accesses.
fn ports_policy(rng: &mut Rng) -> PolicySpec {
    let mut spec = vnet();
    let mut rules = Vec::new();
    let mut used = HashSet::new();
    for inbound in [true, false] {
        for dst_field in [true, false] {
            let mut cuts: Vec<u32> = vec![1, 1000, 1024, 2000, 8000, 8081, 65535];
            cuts.extend((0..4).map(|_| rng.range(1, 65535) as u32));
            cuts.sort_unstable();
            cuts.dedup();
            let mut lo = 0;
            for hi in cuts.into_iter().chain([65536]) {
                let range = if hi - 1 == lo { lo.to_string() } else { format!("{lo}-{}", hi - 1) };
                let protocol = *rng.pick(&["tcp", "udp", "any"]);
                let access = if rng.percent(50) { "allow" } else { "deny" };
                let mut r = rule(
                    format!("p{}", rules.len()),
                    fresh_priority(rng, &mut used, inbound),
                    inbound,
                    access,
                    protocol,
                    &["*"],
                    &["*"],
                );
                let ports = Some(vec![range]);
                if dst_field {
                    r.destination_ports = ports
                } else {
                    r.source_ports = ports
                }
                if rng.percent(30) {
                    r.source = vec![(*rng.pick(LITERALS)).to_owned()];
                }
                rules.push(r);
                lo = hi;
            }
        }
        // The whole range, spelled out and as adjacent halves, for any protocol: packets
        // without ports (ICMP, ESP) must not match them.
        for (i, ports) in
            [vec!["0-65535"], vec!["0-1023", "1024-65535"], vec!["0-32767", "32768-65535"]]
                .into_iter()
                .enumerate()
        {
            for dst_field in [true, false] {
                let access = if rng.percent(50) { "allow" } else { "deny" };
                let src: &[&str] = match i {
                    0 => &["203.0.113.0/25", "2001:db8:2::/64"],
                    1 => &["203.0.113.128/25", "192.0.2.0/24"],
                    _ => &["198.51.100.0/24", "2001:db8:1::/64"],
                };
                let mut r = rule(
                    format!("full{i}{}{}", u8::from(dst_field), if inbound { "i" } else { "o" }),
                    fresh_priority(rng, &mut used, inbound),
                    inbound,
                    access,
                    "any",
                    src,
                    &["*"],
                );
                let ports = Some(strings(&ports));
                if dst_field {
                    r.destination_ports = ports
                } else {
                    r.source_ports = ports
                }
                rules.push(r);
            }
        }
    }
    spec.nsgs.push(NsgSpec {
        name: "ports".to_owned(),
        subnets: strings(&["198.51.100.0/24", "2001:db8:1::/64"]),
        hosts: vec![],
        rules,
    });
    spec
}

/// Three NSGs (two subnet, one host) using the same priorities, each in both directions.
fn ties_policy(rng: &mut Rng) -> PolicySpec {
    let mut spec = vnet();
    let names = vec![];
    for (n, (subnets, hosts)) in [
        (&["198.51.100.0/25", "2001:db8:1::/80"][..], &[][..]),
        (&["198.51.100.128/25", "2001:db8:1:0:1::/80"][..], &[][..]),
        (&[][..], &["198.51.100.10", "198.51.100.130", "2001:db8:1::10", "192.0.2.130"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rules = Vec::new();
        for p in 100..=115 {
            for inbound in [true, false] {
                let name = format!("{}{p}", if inbound { "i" } else { "o" });
                rules.push(random_rule(rng, name, p, inbound, &names));
            }
        }
        spec.nsgs.push(NsgSpec {
            name: format!("tie{n}"),
            subnets: strings(subnets),
            hosts: strings(hosts),
            rules,
        });
    }
    spec
}

/// The two halves of the subnet whose NSGs fill its inbound subnet-layer table, and their
/// user rules: one NSG holds at most 3,997 (priorities 100-4096), and each brings three
/// default rules a direction.
const FULL_SUBNETS: [[&str; 2]; 2] =
    [["198.51.100.0/25", "2001:db8:1::/80"], ["198.51.100.128/25", "2001:db8:1:0:1::/80"]];
const FULL_FIRST: usize = 2000;
const FULL_SECOND: usize = MAX_RULES as usize - FULL_FIRST - 2 * 3;

/// The inbound subnet-layer table filled to exactly `MAX_RULES` rules by two NSGs, defaults
/// included.
fn full_table_policy(rng: &mut Rng) -> PolicySpec {
    let mut spec = vnet();
    let names = vec![];
    let mut priorities: Vec<u32> = (100..=4096).collect();
    let mut nsg = |name: &str, subnets: &[&str], inbound: usize, outbound: usize| {
        let mut rules = Vec::new();
        for (is_in, count) in [(true, inbound), (false, outbound)] {
            rng.shuffle(&mut priorities);
            for &p in &priorities[..count] {
                let name = format!("{}{p}", if is_in { "i" } else { "o" });
                rules.push(random_rule(rng, name, p, is_in, &names));
            }
        }
        NsgSpec { name: name.to_owned(), subnets: strings(subnets), hosts: vec![], rules }
    };
    let big = nsg("big", &FULL_SUBNETS[0], FULL_FIRST, 2000);
    let second = nsg("second", &FULL_SUBNETS[1], FULL_SECOND, 100);
    spec.nsgs.extend([big, second]);
    spec
}

/// The inbound subnet-layer table filled to `MAX_RULES` rules as in `full_table_policy`,
/// but with narrow rules: one source address of a few dozen and a destination port of its
/// own (a short range, for one rule in eight) each, so that a packet aimed at a rule is
/// decided by that rule wherever in the table it sits, and most others by a default rule
/// at the table's end. The classifier's scan then decides in most words of the bitmaps,
/// the last one included, where broad random rules rarely let a packet get past the first
/// words. Whether its ports' classes fit the class arrays (they take nearly all of them)
/// decides which way the scan narrows its words; `testrun_nsg`'s full table runs both.
fn deep_table_policy(rng: &mut Rng) -> PolicySpec {
    let mut spec = vnet();
    let mut priorities: Vec<u32> = (100..=4096).collect();
    let mut port = 1000u16;
    let mut nsg = |name: &str, subnets: &[&str], count: usize| {
        rng.shuffle(&mut priorities);
        let rules = priorities[..count]
            .iter()
            .map(|&p| {
                let source = if rng.percent(50) {
                    format!("203.0.113.{}", rng.range(1, 40))
                } else {
                    format!("2001:db8:2::{:x}", rng.range(1, 40))
                };
                let width = if rng.percent(12) { rng.range(2, 5) as u16 } else { 1 };
                let ports = match width {
                    1 => port.to_string(),
                    w => format!("{port}-{}", port + w - 1),
                };
                port += width;
                let access = if rng.percent(50) { "allow" } else { "deny" };
                let protocol = *rng.pick(&["tcp", "udp", "*"]);
                let mut r = rule(format!("d{p}"), p, true, access, protocol, &[&source], &["*"]);
                r.destination_ports = Some(vec![ports]);
                r
            })
            .collect();
        NsgSpec { name: name.to_owned(), subnets: strings(subnets), hosts: vec![], rules }
    };
    let big = nsg("big", &FULL_SUBNETS[0], FULL_FIRST);
    let second = nsg("second", &FULL_SUBNETS[1], FULL_SECOND);
    spec.nsgs.extend([big, second]);
    spec
}

/// The global id (slot and table) of the table `spec` fills to `MAX_RULES` rules, as the
/// last apply placed it.
fn full_table_id(h: &Harness, spec: &PolicySpec) -> u32 {
    let policy = load_str(&spec.yaml(), "full.yaml").unwrap_or_else(|e| panic!("{e}"));
    let compiled = compile::compile(&policy).expect("compile");
    let full = compiled.tables.iter().position(|t| t.rules.len() == MAX_RULES as usize);
    let (slot, _) = apply::active(&h.k.pins.dir).expect("active slot");
    slot * TABLES_PER_SLOT + full.expect("a full table") as u32
}

#[test]
fn kernel_agrees_with_reference_on_edge_cases() {
    let seed = seed();
    let start = Instant::now();
    let mut run = Run::new(seed ^ 0xed9e);
    let rng = &mut run.rng;
    let mut policies: Vec<(&str, PolicySpec, usize)> = Vec::new();
    for order in 0..4 {
        policies.push(("nested prefixes", nested_policy(rng, order), 300));
    }
    for _ in 0..3 {
        policies.push(("abutting port ranges", ports_policy(rng), 300));
    }
    for _ in 0..3 {
        policies.push(("priority ties", ties_policy(rng), 200));
    }

    // A full table loads; one rule more does not.
    let full = full_table_policy(rng);
    let loaded = load_str(&full.yaml(), "full.yaml").unwrap_or_else(|e| panic!("{e}"));
    let compiled = compile::compile(&loaded).expect("compile");
    let sizes: Vec<usize> = compiled.tables.iter().map(|t| t.rules.len()).collect();
    assert!(sizes.contains(&(MAX_RULES as usize)), "no full table: {sizes:?}");
    let mut over = full.clone();
    let free = (100..=4096)
        .find(|p| !over.nsgs[1].rules.iter().any(|r| r.inbound && r.priority == *p))
        .expect("a free priority");
    over.nsgs[1].rules.push(rule("extra".to_owned(), free, true, "allow", "any", &["*"], &["*"]));
    let err = load_str(&over.yaml(), "over.yaml").expect_err("4097 rules in one table");
    assert!(err.to_string().contains("exceed the table size"), "{err}");
    policies.push(("full table", full, 400));
    let narrow = deep_table_policy(rng);

    let mut kinds = Vec::new();
    for (kind, spec, packets) in &policies {
        let t = Instant::now();
        run.policy(spec, *packets);
        kinds.push(format!("{kind} ({} rules) {:.1?}", spec.rule_count(), t.elapsed()));
    }
    // The full table of narrow rules last, to see which words of its table decided.
    let (t, before) = (Instant::now(), run.tally.words.clone());
    run.policy(&narrow, 600);
    let table = full_table_id(&run.h, &narrow);
    let words: Vec<u32> = (0..BITMAP_WORDS as u32)
        .filter(|&w| run.tally.words.get(&(table, w)) > before.get(&(table, w)))
        .collect();
    kinds.push(format!(
        "full table of narrow rules ({} rules) {:.1?}, decided in {} of its {BITMAP_WORDS} words",
        narrow.rule_count(),
        t.elapsed(),
        words.len()
    ));
    println!(
        "differential edge cases: {} policies, {} packets, {} mismatches (seed {seed}) in \
         {:.1?}\n  {}\n  {}",
        run.policies,
        run.tally.packets,
        run.failures.len(),
        start.elapsed(),
        kinds.join("\n  "),
        run.tally
    );
    run.report("edge cases", seed);
    // Both ways of finding IPv4 addresses: the narrow full table's ports take nearly all
    // the slot's classes, so its tables keep the trie (two, in the default seed).
    let tally = &run.tally;
    assert!(tally.ranged_tables > 0 && tally.trie_tables > 0, "one way only: {tally}");
    // Not a test of the scan unless it had to go deep: decisions in most words of the full
    // table's bitmaps, and in its last (the defaults', and the last user rules').
    assert!(words.len() >= BITMAP_WORDS * 3 / 4, "decided in too few words: {words:?}");
    let last = BITMAP_WORDS as u32 - 1;
    assert!(words.contains(&last), "never decided in the last word: {words:?}");
}
