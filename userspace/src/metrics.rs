//! Prometheus metrics: the dataplane's counters in the text exposition format (version
//! 0.0.4, encoded by the `prometheus` crate), served over HTTP (hyper) by
//! `xdpgate run --metrics-addr` and printed once by `xdpgate metrics`.
//!
//! The server answers `GET /metrics` (and `HEAD`) and nothing else: it has no control
//! endpoints, and binds to loopback unless told otherwise.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use prometheus::{
    Encoder, TextEncoder,
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
    task::JoinHandle,
};

use xdpgate_dataplane::{
    PinDir, apply, drain,
    lb::{self, ServiceReport},
    nat,
    probes::ProbeKey,
    stats::{self, Stats},
};

use crate::{
    agent_state::{self, AgentState, Live},
    health::{ProbeCounts, ProbeStats},
};

/// Where `xdpgate run` serves metrics unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9477";
/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections held at once. When all are taken, a new one takes the place of the oldest
/// that is not being answered (stalled clients cannot starve scrapes); when every one is
/// being answered, the new one is closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a connection lives, answer included (a client that never reads its answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the kernel queues until they are accepted (capped by net.core.somaxconn).
/// tokio's default of 128 overflows under a flood of reconnecting slow clients, and the
/// kernel then drops SYNs, a scrape's among them.
const LISTEN_BACKLOG: u32 = 4096;

/// `--metrics-addr`: an address to listen on, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse().map(|a| Self(Some(a))).map_err(|_| {
            format!("{s:?} is not ADDRESS:PORT (for example 127.0.0.1:9477 or [::1]:9477) or off")
        })
    }
}

/// Counter or gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A sample value: counts or fractional seconds. (The exposition carries every value as
/// a float; counts are exact up to 2^53.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn get(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }
}

/// One metric family: its name, kind and help text, and its samples in order.
#[derive(Clone, Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, Value)>,
}

impl Family {
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self { name, kind, help, samples: Vec::new() }
    }

    pub fn add(&mut self, labels: Vec<(&'static str, String)>, value: Value) {
        self.samples.push((labels, value));
    }

    /// The family in the `prometheus` crate's data model, labels in the order given.
    fn to_proto(&self) -> MetricFamily {
        let mut mf = MetricFamily::default();
        mf.set_name(self.name.into());
        mf.set_help(self.help.into());
        mf.set_field_type(match self.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
        });
        let metrics = self
            .samples
            .iter()
            .map(|(labels, value)| {
                let mut m = Metric::from_label(
                    labels
                        .iter()
                        .map(|(k, v)| {
                            let mut l = LabelPair::default();
                            l.set_name((*k).into());
                            l.set_value(v.clone());
                            l
                        })
                        .collect(),
                );
                match self.kind {
                    Kind::Counter => {
                        let mut c = proto::Counter::default();
                        c.set_value(value.get());
                        m.set_counter(c);
                    }
                    Kind::Gauge => {
                        let mut g = proto::Gauge::default();
                        g.set_value(value.get());
                        m.set_gauge(g);
                    }
                }
                m
            })
            .collect();
        mf.set_metric(metrics);
        mf
    }
}

/// The text exposition of `families`, in order. Families without samples are left out
/// (the encoder refuses them, and they carry nothing).
pub fn exposition(families: &[Family]) -> Result<String> {
    let protos: Vec<MetricFamily> =
        families.iter().filter(|f| !f.samples.is_empty()).map(Family::to_proto).collect();
    let mut out = Vec::new();
    TextEncoder::new().encode(&protos, &mut out).context("encoding the metrics")?;
    String::from_utf8(out).context("encoding the metrics")
}

/// Everything the metrics are made of, read at one time.
#[derive(Debug)]
pub struct Snapshot {
    pub stats: Stats,
    /// Load balancers of the applied policy.
    pub services: Vec<ServiceReport>,
    /// Generation of the running policy (0 before the first apply).
    pub generation: u64,
    /// An `xdpgate set` change is running or was killed (`apply::changing`).
    pub set_change_unfinished: bool,
    /// When the applied policy was saved, in seconds since the Unix epoch.
    pub applied_at: Option<f64>,
    pub nat: Vec<nat::GatewayReport>,
    /// The running agent's last policy load (none without a running agent).
    pub agent: Option<AgentState>,
    /// The agent's health probes so far (served by the agent only).
    pub probes: Vec<(ProbeKey, ProbeCounts)>,
}

impl Snapshot {
    /// `served`: read for the agent's own endpoint, with its probe results and its state as
    /// it holds it (`agent.json` may be unwritable: a full `/run`); else the state is read
    /// from that file, and there are no probe results.
    pub fn read(pins: &PinDir, served: Option<(&ProbeStats, &Live)>) -> Result<Self> {
        let stats = stats::read(pins)?;
        let (_, config) = apply::active(pins)?;
        // Names come from the running generation's record: nothing is recompiled per scrape.
        let record = apply::running(pins)?;
        let (services, nat) = match &record {
            // A broken drain file is the agent's to report (`status`), not each scrape's.
            Some(r) => {
                let drained = drain::read(pins)?.0;
                (lb::report(pins, r, |lb, b| drained.contains(lb, b), None)?, nat::report(pins, r)?)
            }
            None => (Vec::new(), Vec::new()),
        };
        let applied_at = record.map(|r| r.applied_unix as f64);
        Ok(Self {
            stats,
            services,
            generation: config.generation,
            set_change_unfinished: apply::changing(pins)?,
            applied_at,
            nat,
            agent: match served {
                Some((_, live)) => live.get(),
                None => agent_state::read(pins).filter(|a| a.running(pins)),
            },
            probes: served.map(|(probes, _)| probes.snapshot()).unwrap_or_default(),
        })
    }

    /// The metric families, in exposition order.
    pub fn families(&self) -> Vec<Family> {
        use Kind::{Counter, Gauge};
        use Value::Int;
        let mut if_packets = Family::new(
            "xdpgate_interface_packets_total",
            Counter,
            "Packets the dataplane saw arrive on an interface, by XDP verdict.",
        );
        let mut if_bytes = Family::new(
            "xdpgate_interface_bytes_total",
            Counter,
            "Bytes of the packets the dataplane saw arrive on an interface, by XDP verdict.",
        );
        for i in &self.stats.interfaces {
            for (verdict, t) in &i.verdicts {
                let labels = vec![
                    ("interface", i.iface.clone()),
                    ("role", i.role.unwrap_or("").to_string()),
                    ("verdict", verdict.to_string()),
                ];
                if_packets.add(labels.clone(), Int(t.packets));
                if_bytes.add(labels, Int(t.bytes));
            }
        }
        let mut eg_packets = Family::new(
            "xdpgate_interface_egress_packets_total",
            Counter,
            "Packets the host itself sent out of an interface, by the egress program's verdict.",
        );
        let mut eg_bytes = Family::new(
            "xdpgate_interface_egress_bytes_total",
            Counter,
            "Bytes of the packets the host itself sent out of an interface, by the egress \
             program's verdict.",
        );
        for i in &self.stats.interfaces {
            for (verdict, t) in &i.egress {
                let labels = vec![
                    ("interface", i.iface.clone()),
                    ("role", i.role.unwrap_or("").to_string()),
                    ("verdict", verdict.to_string()),
                ];
                eg_packets.add(labels.clone(), Int(t.packets));
                eg_bytes.add(labels, Int(t.bytes));
            }
        }

        let mut drops = Family::new(
            "xdpgate_drops_total",
            Counter,
            "Packets the dataplane dropped, by reason.",
        );
        for (reason, n) in &self.stats.drops {
            drops.add(vec![("reason", reason.to_string())], Int(*n));
        }

        let mut rules = Family::new(
            "xdpgate_rule_flows_total",
            Counter,
            "Flows a network security group rule of the running policy decided (allowed or \
             denied); counted once per flow, and once per denied packet.",
        );
        let mut rule_packets = Family::new(
            "xdpgate_rule_packets_total",
            Counter,
            "Packets of the flows a network security group rule decided (both ways), or that it \
             denied; kept across reloads while the rule keeps its NSG, name, direction and layer.",
        );
        let mut rule_bytes = Family::new(
            "xdpgate_rule_bytes_total",
            Counter,
            "Bytes of the packets xdpgate_rule_packets_total counts.",
        );
        for r in self.stats.policy.iter().flat_map(|p| &p.rules) {
            let labels = vec![
                ("nsg", r.nsg.clone()),
                ("rule", r.rule.clone()),
                ("direction", format!("{:?}", r.direction).to_lowercase()),
                ("layer", format!("{:?}", r.layer).to_lowercase()),
                ("priority", r.priority.to_string()),
            ];
            rules.add(labels.clone(), Int(r.flows));
            rule_packets.add(labels.clone(), Int(r.traffic.packets));
            rule_bytes.add(labels, Int(r.traffic.bytes));
        }

        let mut fe_packets = Family::new(
            "xdpgate_frontend_packets_total",
            Counter,
            "Packets a load-balancing or inbound NAT rule sent on to its backends.",
        );
        let mut fe_bytes = Family::new(
            "xdpgate_frontend_bytes_total",
            Counter,
            "Bytes a load-balancing or inbound NAT rule sent on to its backends.",
        );
        let mut be_packets = Family::new(
            "xdpgate_backend_packets_total",
            Counter,
            "Packets load balancing sent to a backend, over every rule it serves (one sample \
             per backend: the dataplane counts per backend, not per rule).",
        );
        let mut be_bytes = Family::new(
            "xdpgate_backend_bytes_total",
            Counter,
            "Bytes load balancing sent to a backend, over every rule it serves (one sample per \
             backend).",
        );
        let mut be_healthy = Family::new(
            "xdpgate_backend_healthy",
            Gauge,
            "1 while a rule's health probe says a backend can take new flows, else 0. Only \
             for rules with a probe: see xdpgate_load_balancer_backends{state=\"unprobed\"}.",
        );
        let mut lb_backends = Family::new(
            "xdpgate_load_balancer_backends",
            Gauge,
            "Backends of a load-balancing or inbound NAT rule by state: healthy and unhealthy \
             (by the rule's probe), or unprobed (the rule has no probe; health unknown).",
        );
        let mut lb_health = Family::new(
            "xdpgate_load_balancer_health_percent",
            Gauge,
            "Share of a probed rule's backends that its probe finds healthy, in percent (as \
             Azure's health probe status).",
        );
        // A backend serving several rules has one counter: sample it once.
        let mut counted = std::collections::BTreeSet::new();
        for s in &self.services {
            let svc = || vec![("load_balancer", s.load_balancer.clone()), ("rule", s.rule.clone())];
            fe_packets.add(svc(), Int(s.packets));
            fe_bytes.add(svc(), Int(s.bytes));
            for b in &s.backends {
                if counted.insert(b.address) {
                    let labels = vec![("backend", b.address.to_string())];
                    be_packets.add(labels.clone(), Int(b.packets));
                    be_bytes.add(labels, Int(b.bytes));
                }
                if s.probe.is_some() {
                    let mut labels = svc();
                    labels.push(("backend", b.address.to_string()));
                    be_healthy.add(labels, Int(b.healthy_in_rule.into()));
                }
            }
            let healthy = s.backends.iter().filter(|b| b.healthy_in_rule).count();
            let states = match s.probe {
                Some(_) => vec![("healthy", healthy), ("unhealthy", s.backends.len() - healthy)],
                None => vec![("unprobed", s.backends.len())],
            };
            for (state, n) in states {
                let mut labels = svc();
                labels.push(("state", state.into()));
                lb_backends.add(labels, Int(n as u64));
            }
            if s.probe.is_some() && !s.backends.is_empty() {
                let percent = 100.0 * healthy as f64 / s.backends.len() as f64;
                lb_health.add(svc(), Value::Float(percent));
            }
        }
        let mut probes = Family::new(
            "xdpgate_probes_total",
            Counter,
            "Health probes the agent ran, by backend, load balancer, probe and result (success or \
             failure).",
        );
        let mut probe_seconds = Family::new(
            "xdpgate_probe_duration_seconds_total",
            Counter,
            "Time the agent's health probes of a backend took in all (divide its rate by \
             xdpgate_probes_total's for the mean latency); a timed-out probe counts its timeout.",
        );
        let mut probe_last = Family::new(
            "xdpgate_probe_last_duration_seconds",
            Gauge,
            "Time the last health probe of a backend took.",
        );
        for (key, c) in &self.probes {
            let labels = || {
                vec![
                    ("backend", key.backend.to_string()),
                    ("load_balancer", key.lb.clone()),
                    ("probe", key.probe.clone()),
                ]
            };
            for (result, n) in [("success", c.successes), ("failure", c.failures)] {
                let mut l = labels();
                l.push(("result", result.into()));
                probes.add(l, Int(n));
            }
            probe_seconds.add(labels(), Value::Float(c.seconds_total));
            probe_last.add(labels(), Value::Float(c.last_seconds));
        }

        let table = &self.stats.flow_table;
        let mut flows = Family::new(
            "xdpgate_flows",
            Gauge,
            "Entries in the table of established flows (one per direction of each flow; the \
             agent removes idle ones).",
        );
        flows.add(Vec::new(), Int(table.flows.entries));
        let mut capacity = Family::new(
            "xdpgate_flow_table_capacity",
            Gauge,
            "Flows a flow table holds at two entries each: flows (established) or embryonic \
             (not confirmed yet, or assured: confirmed, waiting for room in the flows table; a \
             TCP flow nothing rewrites takes one entry there).",
        );
        let mut entries = Family::new(
            "xdpgate_flow_table_entries",
            Gauge,
            "Entries in a flow table, one per direction of each flow: the table is full at \
             twice its capacity.",
        );
        for (name, cap, n) in [
            ("flows", table.flows.capacity, table.flows.entries),
            ("embryonic", table.embryonic.capacity, table.embryonic.entries),
        ] {
            capacity.add(vec![("table", name.into())], Int(cap));
            entries.add(vec![("table", name.into())], Int(n));
        }
        let mut embryos = Family::new(
            "xdpgate_embryonic_flows_total",
            Counter,
            "Embryonic (not yet confirmed) flows by outcome: created, and ended as confirmed, \
             expired (with those the agent ended: lone exchanges, ASSURED flows, and embryos \
             of NAT translations it expired), \
             closed, deleted (by `xdpgate flows delete`), or evicted by newer embryonic flows \
             (derived: created less the other outcomes and the live ones).",
        );
        let e = &table.embryonic;
        for (outcome, n) in [
            ("created", e.created),
            ("confirmed", e.confirmed),
            ("expired", e.expired),
            ("closed", e.closed),
            ("deleted", e.deleted),
            ("evicted", e.evicted),
        ] {
            embryos.add(vec![("outcome", outcome.into())], Int(n));
        }
        let mut refused = Family::new(
            "xdpgate_embryonic_confirmations_refused_total",
            Counter,
            "Flows the full established table had no room for as they were confirmed (each \
             counted once): they wait in the embryonic table, judged as established flows, \
             until there is room.",
        );
        refused.add(Vec::new(), Int(table.embryonic.refused));
        let mut rebuilt = Family::new(
            "xdpgate_flows_rebuilt_total",
            Counter,
            "Established flows rebuilt from a live NAT translation after their entries were gone.",
        );
        rebuilt.add(Vec::new(), Int(table.rebuilt));
        let mut picked_up = Family::new(
            "xdpgate_flows_picked_up_total",
            Counter,
            "TCP segments other than a SYN taken up as new flows (mid-stream pickup).",
        );
        picked_up.add(Vec::new(), Int(table.picked_up));
        let mut generation = Family::new(
            "xdpgate_policy_generation",
            Gauge,
            "Generation of the running policy: 1 for the first apply, plus 1 for each later one.",
        );
        generation.add(Vec::new(), Int(self.generation));
        let mut unfinished = Family::new(
            "xdpgate_set_change_unfinished",
            Gauge,
            "1 while an `xdpgate set` change runs, or after one was killed: every flow is judged \
             on each packet (with reevaluate_flows) until the next set change or apply.",
        );
        unfinished.add(Vec::new(), Int(u64::from(self.set_change_unfinished)));
        let mut applied = Family::new(
            "xdpgate_policy_applied_timestamp_seconds",
            Gauge,
            "When the running policy was applied, in seconds since the Unix epoch.",
        );
        if let Some(t) = self.applied_at {
            applied.add(Vec::new(), Value::Float(t));
        }

        let mut events = Family::new(
            "xdpgate_flow_events_dropped_total",
            Counter,
            "Flow-log events the dataplane held back: over the denied-flow rate limit, or lost \
             to a full ring buffer.",
        );
        events
            .add(vec![("reason", "rate_limited".into())], Int(self.stats.flow_events_rate_limited));
        events.add(vec![("reason", "ring_full".into())], Int(self.stats.flow_events_lost));
        let mut nat_ports = Family::new(
            "xdpgate_nat_ports_in_use",
            Gauge,
            "Ports of a NAT gateway's public address held by translations (or cooling down).",
        );
        let mut nat_port_range = Family::new(
            "xdpgate_nat_ports_per_address",
            Gauge,
            "Ports in a NAT gateway's range on each of its public addresses (a port serves \
             one translation per destination address and port).",
        );
        let mut nat_translations = Family::new(
            "xdpgate_nat_translations",
            Gauge,
            "Active translations of a NAT gateway (as Azure's total SNAT connection count).",
        );
        let mut nat_created = Family::new(
            "xdpgate_nat_translations_created_total",
            Counter,
            "New flows through a NAT gateway that got a public port (as Azure's SNAT connection \
             count, successful).",
        );
        let mut nat_failures = Family::new(
            "xdpgate_nat_allocation_failures_total",
            Counter,
            "New flows through a NAT gateway that found no free public port (dropped, as \
             xdpgate_drops_total{reason=\"nat_exhausted\"}).",
        );
        // Azure's NAT gateway metrics: Bytes and Packets by direction, Dropped Packets.
        let mut nat_packets = Family::new(
            "xdpgate_nat_packets_total",
            Counter,
            "Packets a NAT gateway translated, by direction: outbound (private hosts to the \
             internet, source translated) and inbound (their replies).",
        );
        let mut nat_bytes = Family::new(
            "xdpgate_nat_bytes_total",
            Counter,
            "Bytes (from the IP header on) of the packets a NAT gateway translated, by \
             direction.",
        );
        let mut nat_dropped = Family::new(
            "xdpgate_nat_dropped_packets_total",
            Counter,
            "Packets dropped for a NAT gateway, by reason: nat_exhausted (a new flow found no \
             free public port), nat_unmatched (to a public address, matching no translation).",
        );
        // Gateways of the running policy (translations no gateway has are `xdpgate nat`'s).
        for (name, g) in self.nat.iter().filter_map(|g| Some((g.name.as_ref()?, g))) {
            let gw = || vec![("gateway", name.clone())];
            if let Some(t) = &g.traffic {
                for (direction, c) in [("outbound", t.outbound), ("inbound", t.inbound)] {
                    let labels =
                        || vec![("gateway", name.clone()), ("direction", direction.into())];
                    nat_packets.add(labels(), Int(c.packets));
                    nat_bytes.add(labels(), Int(c.bytes));
                }
                for (reason, n) in &t.dropped {
                    nat_dropped.add(
                        vec![("gateway", name.clone()), ("reason", (*reason).into())],
                        Int(*n),
                    );
                }
            }
            for (addr, n) in &g.addresses {
                nat_ports.add(
                    vec![("gateway", name.clone()), ("address", addr.to_string())],
                    Int(*n as u64),
                );
            }
            nat_port_range.add(gw(), Int(g.ports_per_address.into()));
            nat_translations.add(gw(), Int(g.translations as u64));
            if let Some(n) = g.created {
                nat_created.add(gw(), Int(n));
            }
            nat_failures.add(gw(), Int(g.failed_allocations));
        }

        // As Prometheus reports its own configuration reloads.
        let mut reload_ok = Family::new(
            "xdpgate_config_last_reload_successful",
            Gauge,
            "Whether the agent's last load of its policy file succeeded (1) or failed (0); \
             after a failure the previous policy stays in force.",
        );
        let mut reload_at = Family::new(
            "xdpgate_config_last_reload_success_timestamp_seconds",
            Gauge,
            "When the agent last loaded its policy file successfully.",
        );
        if let Some(agent) = &self.agent {
            reload_ok.add(Vec::new(), Int(u64::from(agent.last_reload.successful)));
            if let Some(t) = agent.last_success_unix {
                reload_at.add(Vec::new(), Value::Float(t));
            }
        }

        let mut build = Family::new(
            "xdpgate_build_info",
            Gauge,
            "Always 1; the labels name the running xdpgate's version.",
        );
        build.add(vec![("version", env!("CARGO_PKG_VERSION").into())], Int(1));

        vec![
            build,
            if_packets,
            if_bytes,
            eg_packets,
            eg_bytes,
            drops,
            rules,
            rule_packets,
            rule_bytes,
            fe_packets,
            fe_bytes,
            be_packets,
            be_bytes,
            be_healthy,
            lb_backends,
            lb_health,
            probes,
            probe_seconds,
            probe_last,
            flows,
            capacity,
            entries,
            embryos,
            refused,
            rebuilt,
            picked_up,
            generation,
            applied,
            unfinished,
            events,
            nat_ports,
            nat_port_range,
            nat_translations,
            nat_created,
            nat_failures,
            nat_packets,
            nat_bytes,
            nat_dropped,
            reload_ok,
            reload_at,
        ]
    }

    pub fn render(&self) -> Result<String> {
        exposition(&self.families())
    }
}

/// The metrics of the dataplane pinned in `pins`, in the text exposition format.
pub fn render(pins: &PinDir) -> Result<String> {
    Snapshot::read(pins, None)?.render()
}

/// As [`render`], with the agent's probe results and its state as it is.
fn render_served(pins: &PinDir, probes: &ProbeStats, agent: &Live) -> Result<String> {
    Snapshot::read(pins, Some((probes, agent)))?.render()
}

/// The connections the server holds, oldest first.
#[derive(Default)]
struct Connections(Mutex<ConnTable>);

#[derive(Default)]
struct ConnTable {
    next_id: u64,
    open: BTreeMap<u64, Conn>,
}

struct Conn {
    /// Notified to close the connection.
    close: Arc<Notify>,
    /// Set while its request is being answered.
    answering: Arc<AtomicBool>,
}

impl Connections {
    fn table(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection: free, or taken from the oldest connection not being
    /// answered (closed). None when all are being answered.
    fn admit(self: &Arc<Self>) -> Option<(Slot, Arc<Notify>, Arc<AtomicBool>)> {
        let mut table = self.table();
        if table.open.len() >= MAX_CONNECTIONS {
            let oldest = table
                .open
                .iter()
                .find(|(_, c)| !c.answering.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            let evicted = table.open.remove(&oldest).expect("listed");
            // notify_one keeps the wake-up if the task is not waiting yet.
            evicted.close.notify_one();
        }
        let id = table.next_id;
        table.next_id += 1;
        let conn = Conn { close: Arc::new(Notify::new()), answering: Arc::default() };
        let handles = (conn.close.clone(), conn.answering.clone());
        table.open.insert(id, conn);
        Some((Slot { conns: self.clone(), id }, handles.0, handles.1))
    }

    fn close_all(&self) {
        for (_, c) in std::mem::take(&mut self.table().open) {
            c.close.notify_one();
        }
    }
}

/// A connection's place in the table, given back when the connection ends.
struct Slot {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.table().open.remove(&self.id);
    }
}

/// The metrics server of `xdpgate run`; stops, with every connection, when dropped.
pub struct Server {
    task: JoinHandle<()>,
    conns: Arc<Connections>,
    addr: SocketAddr,
}

impl Server {
    /// The address it listens on (the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        self.conns.close_all();
    }
}

/// Binds `addr` now (so a bad address or a port in use fails the caller) and serves
/// `GET /metrics` in tasks of the current runtime until the returned server is dropped.
/// What a scrape reads: the pinned dataplane, and the agent's probe results.
#[derive(Clone)]
struct Source {
    pins: PinDir,
    probes: ProbeStats,
    /// The agent's own state, not `agent.json` (which a full `/run` leaves unwritten).
    agent: Live,
    last: Shared,
}

/// One render at a time (each reads the dataplane's maps, the flow tables among them), and
/// its text for every request that came in while it ran: a flood of scrapes costs one
/// render after another, however many wait. A lone scraper always gets a render begun
/// after its request.
#[derive(Clone, Default)]
struct Shared(Arc<tokio::sync::Mutex<Option<(Instant, Rendered)>>>);

type Rendered = Arc<Result<String, String>>;

impl Shared {
    /// The text of a render begun after `arrived`, or of a new one by `render`. The render
    /// runs in a task of its own, which holds the turn until it is done: a request that goes
    /// away meanwhile does not let another render start beside it.
    async fn get(
        &self,
        arrived: Instant,
        render: impl FnOnce() -> Result<String> + Send + 'static,
    ) -> Rendered {
        let mut last = self.0.clone().lock_owned().await;
        if let Some((_, text)) = last.as_ref().filter(|(begun, _)| *begun >= arrived) {
            return text.clone();
        }
        let begun = Instant::now();
        let task = tokio::spawn(async move {
            let text = tokio::task::spawn_blocking(move || render().map_err(|e| format!("{e:#}")))
                .await
                .unwrap_or_else(|e| Err(format!("rendering the metrics: {e}")));
            let text = Arc::new(text);
            *last = Some((begun, text.clone()));
            text
        });
        task.await.unwrap_or_else(|e| Arc::new(Err(format!("rendering the metrics: {e}"))))
    }
}

pub async fn spawn(
    addr: SocketAddr,
    pins: PinDir,
    probes: ProbeStats,
    agent: Live,
) -> Result<Server> {
    let listener = listen(addr).with_context(|| format!("listening on {addr}"))?;
    let addr = listener.local_addr()?;
    info!("metrics at http://{addr}/metrics");
    let conns = Arc::new(Connections::default());
    let source = Source { pins, probes, agent, last: Shared::default() };
    let task = tokio::spawn(accept_loop(listener, source, conns.clone()));
    Ok(Server { task, conns, addr })
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    // As TcpListener::bind does: a restarted agent can bind again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(listener: TcpListener, source: Source, conns: Arc<Connections>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((slot, close, answering)) = conns.admit() else {
            debug!("metrics: {MAX_CONNECTIONS} requests being answered, closing {peer}");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = tokio::time::timeout(
                    CONNECTION_TIMEOUT,
                    serve_connection(stream, source, answering),
                ) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("metrics: {peer}: {e}"),
                    Err(_) => debug!("metrics: {peer}: closed after {CONNECTION_TIMEOUT:?}"),
                },
                () = close.notified() => debug!("metrics: {peer}: closed for a newer connection"),
            }
            drop(slot);
        });
        // Let the new connection read its request before more are accepted: a scrape
        // then marks itself answered before a flood of new connections can displace it.
        tokio::task::yield_now().await;
    }
}

/// One request per connection (no keep-alive), its head read within HEADER_TIMEOUT.
async fn serve_connection(
    stream: TcpStream,
    source: Source,
    answering: Arc<AtomicBool>,
) -> hyper::Result<()> {
    let service = service_fn(move |req| answer(req, source.clone(), answering.clone()));
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .max_headers(32)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

async fn answer(
    req: Request<Incoming>,
    source: Source,
    answering: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(text(StatusCode::NOT_FOUND, "not found: try GET /metrics\n".into()));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: try GET\n".into());
        r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    // A request being answered keeps its connection (it is not displaced).
    answering.store(true, Ordering::Release);
    let (pins, probes, agent) = (source.pins.clone(), source.probes.clone(), source.agent.clone());
    let rendered = source.last.get(arrived, move || render_served(&pins, &probes, &agent)).await;
    answering.store(false, Ordering::Release);
    Ok(match rendered.as_ref() {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body.clone())));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(CONTENT_TYPE));
            r
        }
        Err(e) => {
            warn!("metrics: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the dataplane's counters failed: {e}\n"),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use xdpgate_dataplane::{
        counts::Traffic,
        lb::BackendReport,
        stats::{EmbryonicTable, EstablishedTable, FlowTable, IfaceStats, PolicyStats, RuleHits},
    };
    use xdpgate_policy::{Direction, Layer};

    fn snapshot() -> Snapshot {
        let t = |packets, bytes| Traffic { packets, bytes };
        Snapshot {
            stats: Stats {
                interfaces: vec![
                    IfaceStats {
                        iface: "eth0".into(),
                        role: Some("external"),
                        verdicts: vec![("drop", t(3, 180)), ("pass", t(10, 1500))],
                        egress: vec![("pass", t(4, 400)), ("drop", t(1, 60))],
                    },
                    IfaceStats {
                        iface: "(unregistered)".into(),
                        role: None,
                        verdicts: vec![("pass", t(0, 0))],
                        egress: vec![("pass", t(0, 0)), ("drop", t(0, 0))],
                    },
                ],
                drops: vec![("malformed", 0), ("policy", 3)],
                policy: Some(PolicyStats {
                    generation: 4,
                    rules: vec![RuleHits {
                        nsg: "web \"edge\"".into(),
                        rule: "allow\\web\nnew".into(),
                        direction: Direction::Inbound,
                        layer: Layer::Subnet,
                        priority: 100,
                        flows: 7,
                        traffic: Traffic { packets: 11, bytes: 1_500 },
                    }],
                }),
                flow_events_rate_limited: 5,
                flow_events_lost: 0,
                flow_table: FlowTable {
                    flows: EstablishedTable { capacity: 524_288, entries: 6 },
                    embryonic: EmbryonicTable {
                        capacity: 131_072,
                        live: 2,
                        entries: 5,
                        created: 30,
                        confirmed: 20,
                        expired: 3,
                        refused: 1,
                        closed: 2,
                        deleted: 1,
                        evicted: 2,
                    },
                    rebuilt: 4,
                    picked_up: 9,
                },
                nat_gateways: Vec::new(),
            },
            services: vec![ServiceReport {
                load_balancer: "lb".into(),
                rule: "http".into(),
                frontends: vec!["192.0.2.10:80/tcp".into()],
                probe: Some("up".into()),
                packets: 20,
                bytes: 2000,
                outer_source: None,
                backends: vec![
                    BackendReport {
                        address: "198.51.100.11".parse::<IpAddr>().unwrap(),
                        // Out by another rule's probe, in by this rule's.
                        healthy: false,
                        healthy_in_rule: true,
                        drained: false,
                        flows: 0,
                        packets: 12,
                        bytes: 1200,
                        rules_sending: vec!["edge/http".into()],
                    },
                    BackendReport {
                        address: "2001:db8::11".parse::<IpAddr>().unwrap(),
                        healthy: false,
                        healthy_in_rule: false,
                        drained: false,
                        flows: 0,
                        packets: 8,
                        bytes: 800,
                        rules_sending: vec!["edge/http".into()],
                    },
                ],
                maglev: None,
            }],
            generation: 4,
            set_change_unfinished: true,
            applied_at: Some(1_700_000_000.25),
            nat: vec![nat::GatewayReport {
                name: Some("egress".into()),
                addresses: vec![("203.0.113.5".parse().unwrap(), 17)],
                translations: 17,
                created: Some(40),
                failed_allocations: 2,
                ports_per_address: 64_512,
                traffic: Some(nat::GatewayTraffic {
                    outbound: Traffic { packets: 30, bytes: 3_000 },
                    inbound: Traffic { packets: 25, bytes: 9_000 },
                    dropped: vec![("nat_exhausted", 2), ("nat_unmatched", 5)],
                }),
            }],
            agent: Some(AgentState {
                pid: 1,
                policy_file: "/etc/xdpgate/policy.yaml".into(),
                generation: 4,
                last_reload: crate::agent_state::Reload {
                    at: "2023-11-14T22:13:30Z".into(),
                    unix: 1_700_000_010.0,
                    successful: false,
                    errors: vec!["invalid policy".into()],
                },
                last_success_unix: Some(1_700_000_000.5),
                failing: Vec::new(),
                written_unix: None,
                node_interfaces: Vec::new(),
            }),
            probes: vec![(
                ProbeKey {
                    backend: "198.51.100.11".parse().unwrap(),
                    lb: "lb".into(),
                    probe: "up".into(),
                },
                ProbeCounts { successes: 9, failures: 1, seconds_total: 0.5, last_seconds: 0.25 },
            )],
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let text = snapshot().render().unwrap();
        assert!(
            text.contains(
                r#"xdpgate_rule_flows_total{nsg="web \"edge\"",rule="allow\\web\nnew",direction="inbound",layer="subnet",priority="100"} 7"#
            ),
            "{text}"
        );
        for (family, value) in [("packets", 11), ("bytes", 1_500)] {
            let want = format!(
                r#"xdpgate_rule_{family}_total{{nsg="web \"edge\"",rule="allow\\web\nnew",direction="inbound",layer="subnet",priority="100"}} {value}"#
            );
            assert!(text.contains(&want), "{want} in {text}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = snapshot().render().unwrap();
        let mut declared: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line in\n{text}");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.iter().all(|(n, _)| n != name), "{name} declared twice");
                declared.push((name.to_string(), String::new()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let last = declared.last_mut().expect("TYPE after HELP");
                assert_eq!(last.0, name, "TYPE follows the HELP of the same metric");
                assert!(kind == "counter" || kind == "gauge", "{line}");
                last.1 = kind.to_string();
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (current, kind) = declared.last().expect("a sample after HELP/TYPE");
                assert_eq!(name, current, "sample outside its family: {line}");
                assert_eq!(kind.ends_with("counter"), name.ends_with("_total"), "{line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "value of {line}");
            }
        }
        let names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "xdpgate_build_info",
                "xdpgate_interface_packets_total",
                "xdpgate_interface_bytes_total",
                "xdpgate_interface_egress_packets_total",
                "xdpgate_interface_egress_bytes_total",
                "xdpgate_drops_total",
                "xdpgate_rule_flows_total",
                "xdpgate_rule_packets_total",
                "xdpgate_rule_bytes_total",
                "xdpgate_frontend_packets_total",
                "xdpgate_frontend_bytes_total",
                "xdpgate_backend_packets_total",
                "xdpgate_backend_bytes_total",
                "xdpgate_backend_healthy",
                "xdpgate_load_balancer_backends",
                "xdpgate_load_balancer_health_percent",
                "xdpgate_probes_total",
                "xdpgate_probe_duration_seconds_total",
                "xdpgate_probe_last_duration_seconds",
                "xdpgate_flows",
                "xdpgate_flow_table_capacity",
                "xdpgate_flow_table_entries",
                "xdpgate_embryonic_flows_total",
                "xdpgate_embryonic_confirmations_refused_total",
                "xdpgate_flows_rebuilt_total",
                "xdpgate_flows_picked_up_total",
                "xdpgate_policy_generation",
                "xdpgate_policy_applied_timestamp_seconds",
                "xdpgate_set_change_unfinished",
                "xdpgate_flow_events_dropped_total",
                "xdpgate_nat_ports_in_use",
                "xdpgate_nat_ports_per_address",
                "xdpgate_nat_translations",
                "xdpgate_nat_translations_created_total",
                "xdpgate_nat_allocation_failures_total",
                "xdpgate_nat_packets_total",
                "xdpgate_nat_bytes_total",
                "xdpgate_nat_dropped_packets_total",
                "xdpgate_config_last_reload_successful",
                "xdpgate_config_last_reload_success_timestamp_seconds",
            ]
        );
    }

    /// Names, HELP texts, label order and values as scraped.
    #[test]
    fn samples_carry_their_labels_and_values() {
        let text = snapshot().render().unwrap();
        for want in [
            "# HELP xdpgate_drops_total Packets the dataplane dropped, by reason.",
            "# TYPE xdpgate_drops_total counter",
            r#"xdpgate_drops_total{reason="policy"} 3"#,
            r#"xdpgate_interface_packets_total{interface="eth0",role="external",verdict="pass"} 10"#,
            r#"xdpgate_interface_bytes_total{interface="eth0",role="external",verdict="drop"} 180"#,
            r#"xdpgate_interface_packets_total{interface="(unregistered)",role="",verdict="pass"} 0"#,
            r#"xdpgate_interface_egress_packets_total{interface="eth0",role="external",verdict="drop"} 1"#,
            r#"xdpgate_interface_egress_bytes_total{interface="eth0",role="external",verdict="pass"} 400"#,
            r#"xdpgate_frontend_packets_total{load_balancer="lb",rule="http"} 20"#,
            r#"xdpgate_frontend_bytes_total{load_balancer="lb",rule="http"} 2000"#,
            r#"xdpgate_backend_packets_total{backend="198.51.100.11"} 12"#,
            r#"xdpgate_backend_bytes_total{backend="2001:db8::11"} 800"#,
            r#"xdpgate_load_balancer_backends{load_balancer="lb",rule="http",state="healthy"} 1"#,
            r#"xdpgate_load_balancer_backends{load_balancer="lb",rule="http",state="unhealthy"} 1"#,
            r#"xdpgate_load_balancer_health_percent{load_balancer="lb",rule="http"} 50"#,
            r#"xdpgate_probes_total{backend="198.51.100.11",load_balancer="lb",probe="up",result="success"} 9"#,
            r#"xdpgate_probes_total{backend="198.51.100.11",load_balancer="lb",probe="up",result="failure"} 1"#,
            r#"xdpgate_probe_duration_seconds_total{backend="198.51.100.11",load_balancer="lb",probe="up"} 0.5"#,
            r#"xdpgate_probe_last_duration_seconds{backend="198.51.100.11",load_balancer="lb",probe="up"} 0.25"#,
            r#"xdpgate_nat_ports_per_address{gateway="egress"} 64512"#,
            r#"xdpgate_nat_translations{gateway="egress"} 17"#,
            r#"xdpgate_nat_translations_created_total{gateway="egress"} 40"#,
            "# TYPE xdpgate_nat_packets_total counter",
            r#"xdpgate_nat_packets_total{gateway="egress",direction="outbound"} 30"#,
            r#"xdpgate_nat_packets_total{gateway="egress",direction="inbound"} 25"#,
            r#"xdpgate_nat_bytes_total{gateway="egress",direction="outbound"} 3000"#,
            r#"xdpgate_nat_bytes_total{gateway="egress",direction="inbound"} 9000"#,
            "# TYPE xdpgate_nat_dropped_packets_total counter",
            r#"xdpgate_nat_dropped_packets_total{gateway="egress",reason="nat_exhausted"} 2"#,
            r#"xdpgate_nat_dropped_packets_total{gateway="egress",reason="nat_unmatched"} 5"#,
            concat!(r#"xdpgate_build_info{version=""#, env!("CARGO_PKG_VERSION"), r#""} 1"#),
            r#"xdpgate_backend_healthy{load_balancer="lb",rule="http",backend="198.51.100.11"} 1"#,
            r#"xdpgate_backend_healthy{load_balancer="lb",rule="http",backend="2001:db8::11"} 0"#,
            "# TYPE xdpgate_backend_healthy gauge",
            "xdpgate_flows 6",
            "# TYPE xdpgate_flows gauge",
            r#"xdpgate_flow_table_capacity{table="flows"} 524288"#,
            r#"xdpgate_flow_table_capacity{table="embryonic"} 131072"#,
            r#"xdpgate_flow_table_entries{table="flows"} 6"#,
            r#"xdpgate_flow_table_entries{table="embryonic"} 5"#,
            "# TYPE xdpgate_embryonic_flows_total counter",
            r#"xdpgate_embryonic_flows_total{outcome="created"} 30"#,
            r#"xdpgate_embryonic_flows_total{outcome="confirmed"} 20"#,
            r#"xdpgate_embryonic_flows_total{outcome="expired"} 3"#,
            r#"xdpgate_embryonic_flows_total{outcome="closed"} 2"#,
            r#"xdpgate_embryonic_flows_total{outcome="deleted"} 1"#,
            r#"xdpgate_embryonic_flows_total{outcome="evicted"} 2"#,
            "# TYPE xdpgate_embryonic_confirmations_refused_total counter",
            "xdpgate_embryonic_confirmations_refused_total 1",
            "xdpgate_flows_rebuilt_total 4",
            "xdpgate_flows_picked_up_total 9",
            "xdpgate_policy_generation 4",
            "xdpgate_policy_applied_timestamp_seconds 1700000000.25",
            "xdpgate_set_change_unfinished 1",
            "# HELP xdpgate_flow_events_dropped_total Flow-log events the dataplane held back: \
             over the denied-flow rate limit, or lost to a full ring buffer.",
            r#"xdpgate_flow_events_dropped_total{reason="rate_limited"} 5"#,
            r#"xdpgate_flow_events_dropped_total{reason="ring_full"} 0"#,
            "# TYPE xdpgate_nat_ports_in_use gauge",
            r#"xdpgate_nat_ports_in_use{gateway="egress",address="203.0.113.5"} 17"#,
            r#"xdpgate_nat_allocation_failures_total{gateway="egress"} 2"#,
            "# TYPE xdpgate_config_last_reload_successful gauge",
            "xdpgate_config_last_reload_successful 0",
            "xdpgate_config_last_reload_success_timestamp_seconds 1700000000.5",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    /// The encoder refuses a family without samples: such families are left out, and the
    /// rest still render.
    #[test]
    fn families_without_samples_are_left_out() {
        let mut s = snapshot();
        s.services.clear();
        s.applied_at = None;
        s.agent = None;
        let text = s.render().unwrap();
        for gone in [
            "xdpgate_backend_healthy",
            "xdpgate_policy_applied_timestamp_seconds",
            "xdpgate_config_last_reload_successful",
        ] {
            assert!(!text.contains(gone), "{gone} in\n{text}");
        }
        assert!(text.contains("# TYPE xdpgate_flows gauge\nxdpgate_flows 6\n"), "{text}");
    }

    /// The `xdpgate_*` names in `text` (`xdpgate_*` itself, a wildcard in prose, is not one).
    fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
        text.match_indices("xdpgate_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                rest[..end].to_string()
            })
            .filter(|n| n.len() > "xdpgate_".len())
            .collect()
    }

    /// Every metric the Grafana dashboard and the Prometheus alert rules in deploy/ use is
    /// one the agent serves (and the dashboard is JSON whose panels all query something).
    #[test]
    fn every_metric_the_dashboard_and_alerts_use_is_served() {
        let served: Vec<&str> = snapshot().families().iter().map(|f| f.name).collect();
        let dashboard = include_str!("../../deploy/grafana/xdpgate-dashboard.json");
        let alerts = include_str!("../../deploy/prometheus/xdpgate-alerts.yml");
        let parsed: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
        let panels = parsed["panels"].as_array().expect("panels");
        for p in panels.iter().filter(|p| p["type"] != "row") {
            let exprs = p["targets"].as_array().expect("targets");
            assert!(
                !exprs.is_empty()
                    && exprs.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())),
                "panel {} queries nothing",
                p["title"]
            );
        }
        for (file, text) in [("dashboard", dashboard), ("alerts", alerts)] {
            let used = metric_names(text);
            assert!(used.len() > 5, "{file}: {used:?}");
            for name in &used {
                assert!(served.contains(&name.as_str()), "{file} uses {name}, which is not served");
            }
        }
        // The alerts the issue asks for are there.
        for alert in [
            "XdpgateBackendDown",
            "XdpgateNatPortsNearExhaustion",
            "XdpgateDropSpike",
            "XdpgateReloadFailed",
            "XdpgateFlowTableNearFull",
        ] {
            assert!(alerts.contains(&format!("alert: {alert}\n")), "{alert} missing");
        }
    }

    #[test]
    fn listen_addr_parses_addresses_and_off() {
        assert_eq!("off".parse(), Ok(ListenAddr(None)));
        assert_eq!(
            DEFAULT_ADDR.parse(),
            Ok(ListenAddr(Some(SocketAddr::from(([127, 0, 0, 1], 9477)))))
        );
        assert_eq!("[::1]:9000".parse::<ListenAddr>().unwrap().0.unwrap().port(), 9000);
        assert!("localhost".parse::<ListenAddr>().is_err());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A server for a pin directory that holds no dataplane: `/metrics` answers 500.
    async fn server() -> Server {
        let pins = PinDir::new("/nonexistent/xdpgate-metrics-test");
        spawn("127.0.0.1:0".parse().unwrap(), pins, ProbeStats::default(), Live::default())
            .await
            .unwrap()
    }

    /// Sends `req` and reads the whole answer (the server closes after one).
    async fn exchange(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The server on a real socket: `/metrics` is served (here failing with 500, as the
    /// pin directory holds no dataplane), other paths are 404, other methods 405.
    #[test]
    fn server_answers_only_metrics() {
        runtime().block_on(async {
            let server = server().await;
            let addr = server.local_addr();
            let get = |req: &'static str| exchange(addr, req);
            let other = get("GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
            assert!(other.to_ascii_lowercase().contains("connection: close\r\n"), "{other}");
            let post = get("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
            assert!(post.to_ascii_lowercase().contains("allow: get, head\r\n"), "{post}");
            let garbage = get("hello\r\n\r\n").await;
            assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
            let metrics = get("GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(metrics.starts_with("HTTP/1.1 500 "), "{metrics}");
            assert!(metrics.contains("no pinned map"), "{metrics}");
            let head = get("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 500 "), "{head}");
            assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
            let http10 = get("GET /metrics HTTP/1.0\r\n\r\n").await;
            assert!(http10.starts_with("HTTP/1.0 500 "), "{http10}");
        });
    }

    /// A client that stalls in its request head is dropped after HEADER_TIMEOUT, and one
    /// that sends nothing too.
    #[test]
    fn stalled_request_heads_time_out() {
        runtime().block_on(async {
            let server = server().await;
            let addr = server.local_addr();
            let start = tokio::time::Instant::now();
            let mut partial = TcpStream::connect(addr).await.unwrap();
            partial.write_all(b"GET /metrics HTTP/1.1\r\nHost:").await.unwrap();
            let mut silent = TcpStream::connect(addr).await.unwrap();
            for s in [&mut partial, &mut silent] {
                let mut out = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out));
                assert!(read.await.is_ok(), "the server kept a stalled connection 20 s");
                let held = start.elapsed();
                assert!(
                    (HEADER_TIMEOUT..HEADER_TIMEOUT + Duration::from_secs(2)).contains(&held),
                    "dropped after {held:?}"
                );
            }
        });
    }

    /// With every place taken by stalled clients, a scrape displaces the oldest of them
    /// and is answered at once (not after their header timeout).
    #[test]
    fn stalled_clients_make_room_for_a_scrape() {
        runtime().block_on(async {
            let server = server().await;
            let addr = server.local_addr();
            let mut stalled = Vec::new();
            for _ in 0..2 * MAX_CONNECTIONS {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
                stalled.push(s);
            }
            let start = tokio::time::Instant::now();
            let answer = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(answer.contains("no pinned map"), "{answer}");
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "answered after {:?}",
                start.elapsed()
            );
            // The server held no more than its cap: the oldest stalled clients were closed.
            let mut closed = 0;
            for s in &mut stalled {
                let mut b = [0u8; 16];
                // End of stream, or a reset for a client closed before its head was read.
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                {
                    closed += 1;
                }
            }
            assert!(
                closed >= MAX_CONNECTIONS,
                "{closed} of {} stalled clients closed",
                stalled.len()
            );
        });
    }

    /// Dropping the server closes the connections it holds, not just the listener.
    #[test]
    fn dropping_the_server_closes_its_connections() {
        runtime().block_on(async {
            let server = server().await;
            let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            // The server has accepted it once the connection is in its table.
            while server.conns.table().open.is_empty() {
                tokio::task::yield_now().await;
            }
            drop(server);
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out));
            assert!(matches!(read.await, Ok(Ok(0))), "connection still open");
        });
    }

    /// Requests waiting while a render begins share it (seen failing with a render per
    /// request: 20 for 20 requests); one that comes in while a render runs gets the next
    /// (a render begun after it), and a request that goes away mid-render does not let a
    /// second render start beside it.
    #[tokio::test]
    async fn scrapes_during_a_render_share_it() {
        use std::sync::atomic::AtomicUsize;
        let (shared, renders, running) =
            (Shared::default(), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let render = |renders: Arc<AtomicUsize>, running: Arc<AtomicUsize>| {
            move || {
                let n = renders.fetch_add(1, Ordering::SeqCst) + 1;
                assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "two renders at once");
                std::thread::sleep(Duration::from_millis(300));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(format!("render {n}"))
            }
        };
        let get = |arrived: Instant| {
            let (shared, f) = (shared.clone(), render(renders.clone(), running.clone()));
            tokio::spawn(async move { shared.get(arrived, f).await })
        };
        let arrived = Instant::now();
        let requests: Vec<_> = (0..20).map(|_| get(arrived)).collect();
        for r in requests {
            assert_eq!(r.await.unwrap().as_deref(), Ok("render 1"));
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // One that comes in mid-render: the next render, after that one.
        let first = get(Instant::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let later = get(Instant::now());
        assert_eq!(first.await.unwrap().as_deref(), Ok("render 2"));
        assert_eq!(later.await.unwrap().as_deref(), Ok("render 3"));
        // One that goes away mid-render: the next waits for that render to end.
        let gone = get(Instant::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone.abort();
        assert_eq!(get(Instant::now()).await.unwrap().as_deref(), Ok("render 5"));
        assert_eq!(renders.load(Ordering::SeqCst), 5);
    }
}
