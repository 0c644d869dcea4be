//! Prometheus metrics: the dataplane's counters in the text exposition format (version
//! 0.0.4), served over HTTP by `xdpgate run --metrics-addr` and printed once by
//! `xdpgate metrics`.
//!
//! The server answers `GET /metrics` (and `HEAD`) and nothing else: it has no control
//! endpoints, and binds to loopback unless told otherwise.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    str::FromStr,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow};
use log::{debug, info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::{
    agent_state::{self, AgentState},
    apply,
    dataplane::PinDir,
    flows, lb,
    lb::ServiceReport,
    nat, policy,
    stats::{self, Stats},
};

/// Where `xdpgate run` serves metrics unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9477";
/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Scrapes served at once; further connections are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// A client has this long to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

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

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A sample value: counters stay exact integers, times are fractional seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v.is_infinite() => {
                f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// One metric family: its `# HELP` and `# TYPE` lines and its samples.
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
}

/// `\`, `"` and line feeds escaped, as label values need.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `\` and line feeds escaped, as `# HELP` text needs.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The text exposition of `families`, in order.
pub fn exposition(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        debug_assert!(valid_name(f.name), "metric name {:?}", f.name);
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.name());
        for (labels, value) in &f.samples {
            out += f.name;
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    debug_assert!(valid_name(k) && !k.contains(':'), "label name {k:?}");
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {value}");
        }
    }
    out
}

/// Everything the metrics are made of, read at one time.
#[derive(Debug)]
pub struct Snapshot {
    pub stats: Stats,
    /// Load balancers of the applied policy.
    pub services: Vec<ServiceReport>,
    /// Generation of the running policy (0 before the first apply).
    pub generation: u64,
    /// When the applied policy was saved, in seconds since the Unix epoch.
    pub applied_at: Option<f64>,
    /// Entries in the flow table.
    pub flows: u64,
    pub nat: Vec<nat::GatewayReport>,
    /// The running agent's last policy load (none without a running agent).
    pub agent: Option<AgentState>,
}

impl Snapshot {
    pub fn read(pins: &PinDir) -> Result<Self> {
        let stats = stats::read(pins)?;
        let (_, config) = apply::active(pins)?;
        let applied = apply::applied_source(pins);
        let (services, nat) = match &applied {
            Some((path, source)) => {
                let policy = policy::load_str(source, &path.display().to_string())
                    .map_err(|e| anyhow!("the applied policy {}: {e}", path.display()))?;
                (lb::report(pins, &lb::compile(&policy)?)?, nat::report(pins, &policy)?)
            }
            None => (Vec::new(), Vec::new()),
        };
        let applied_at = applied
            .and_then(|(path, _)| std::fs::metadata(path).ok()?.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        Ok(Self {
            stats,
            services,
            generation: config.generation,
            applied_at,
            flows: flows::count(pins)?,
            nat,
            agent: agent_state::read(pins).filter(AgentState::running),
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
        for r in self.stats.policy.iter().flat_map(|p| &p.rules) {
            rules.add(
                vec![
                    ("nsg", r.nsg.clone()),
                    ("rule", r.rule.clone()),
                    ("direction", format!("{:?}", r.direction).to_lowercase()),
                    ("layer", format!("{:?}", r.layer).to_lowercase()),
                    ("priority", r.priority.to_string()),
                ],
                Int(r.flows),
            );
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
            "Packets load balancing sent to a backend (over every rule the backend serves).",
        );
        let mut be_bytes = Family::new(
            "xdpgate_backend_bytes_total",
            Counter,
            "Bytes load balancing sent to a backend (over every rule the backend serves).",
        );
        let mut be_healthy = Family::new(
            "xdpgate_backend_healthy",
            Gauge,
            "1 while a backend's health probe says it can take new flows, else 0.",
        );
        for s in &self.services {
            let svc = || vec![("load_balancer", s.load_balancer.clone()), ("rule", s.rule.clone())];
            fe_packets.add(svc(), Int(s.packets));
            fe_bytes.add(svc(), Int(s.bytes));
            for b in &s.backends {
                let mut labels = svc();
                labels.push(("backend", b.address.to_string()));
                be_packets.add(labels.clone(), Int(b.packets));
                be_bytes.add(labels.clone(), Int(b.bytes));
                be_healthy.add(labels, Int(b.healthy.into()));
            }
        }

        let mut flows = Family::new(
            "xdpgate_flows",
            Gauge,
            "Entries in the flow table (one per direction of each flow; idle entries stay until \
             reused or evicted).",
        );
        flows.add(Vec::new(), Int(self.flows));
        let mut generation = Family::new(
            "xdpgate_policy_generation",
            Gauge,
            "Generation of the running policy: 1 for the first apply, plus 1 for each later one.",
        );
        generation.add(Vec::new(), Int(self.generation));
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
        let mut nat_failures = Family::new(
            "xdpgate_nat_allocation_failures_total",
            Counter,
            "New flows through a NAT gateway that found no free public port.",
        );
        for g in &self.nat {
            for (addr, n) in &g.addresses {
                nat_ports.add(
                    vec![("gateway", g.name.clone()), ("address", addr.to_string())],
                    Int(*n as u64),
                );
            }
            nat_failures.add(vec![("gateway", g.name.clone())], Int(g.failed_allocations));
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

        vec![
            if_packets,
            if_bytes,
            drops,
            rules,
            fe_packets,
            fe_bytes,
            be_packets,
            be_bytes,
            be_healthy,
            flows,
            generation,
            applied,
            events,
            nat_ports,
            nat_failures,
            reload_ok,
            reload_at,
        ]
    }

    pub fn render(&self) -> String {
        exposition(&self.families())
    }
}

/// The metrics of the dataplane pinned in `pins`, in the text exposition format.
pub fn render(pins: &PinDir) -> Result<String> {
    Ok(Snapshot::read(pins)?.render())
}

/// Serves `GET /metrics` on `addr` until the task is dropped or fails to accept.
pub async fn serve(addr: SocketAddr, pins: PinDir) -> Result<()> {
    let listener = bind(addr).await?;
    serve_on(listener, pins).await
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("metrics: listening on {addr}"))
}

/// Serves scrapes on an already bound listener.
pub async fn serve_on(listener: TcpListener, pins: PinDir) -> Result<()> {
    info!("metrics at http://{}/metrics", listener.local_addr()?);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("metrics: {MAX_CONNECTIONS} scrapes in progress, closing {peer}");
            continue;
        };
        let pins = pins.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, pins).await {
                debug!("metrics: {peer}: {e:#}");
            }
            drop(slot);
        });
    }
}

/// The metrics server of `xdpgate run`; stops when dropped.
pub struct Server(JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `addr` now (so a bad address or a port in use fails the caller) and serves in a
/// task of the current runtime.
pub async fn spawn(addr: SocketAddr, pins: PinDir) -> Result<Server> {
    let listener = bind(addr).await?;
    Ok(Server(tokio::spawn(async move {
        if let Err(e) = serve_on(listener, pins).await {
            warn!("metrics server stopped: {e:#}");
        }
    })))
}

/// Reads the request head (the body, if any, is ignored) and answers it.
async fn handle(mut stream: TcpStream, pins: PinDir) -> Result<()> {
    let mut head = Vec::with_capacity(512);
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST {
                return Ok(false);
            }
        }
    })
    .await
    .context("request timed out")??;

    let line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or_default())
        .trim_end()
        .to_string();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let response = match (method, target, version) {
        _ if !complete => response("400 Bad Request", "text/plain", "bad request\n".into(), true),
        (Some(m @ ("GET" | "HEAD")), Some(t), Some(v)) if v.starts_with("HTTP/") => {
            let path = t.split(['?', '#']).next().unwrap_or_default();
            if path == "/metrics" {
                let pins = pins.clone();
                match tokio::task::spawn_blocking(move || render(&pins)).await? {
                    Ok(body) => response("200 OK", CONTENT_TYPE, body, m == "GET"),
                    Err(e) => {
                        warn!("metrics: {e:#}");
                        let body = format!("reading the dataplane's counters failed: {e:#}\n");
                        response("500 Internal Server Error", "text/plain", body, m == "GET")
                    }
                }
            } else {
                response(
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics\n".into(),
                    m == "GET",
                )
            }
        }
        (Some(_), Some(_), Some(v)) if v.starts_with("HTTP/") => {
            response("404 Not Found", "text/plain", "not found: try GET /metrics\n".into(), true)
        }
        _ => response("400 Bad Request", "text/plain", "bad request\n".into(), true),
    };
    stream.write_all(&response).await?;
    stream.shutdown().await?;
    Ok(())
}

fn response(status: &str, content_type: &str, body: String, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        lb::BackendReport,
        policy::{Direction, Layer},
        stats::{IfaceStats, PolicyStats, RuleHits, Traffic},
    };

    fn snapshot() -> Snapshot {
        let t = |packets, bytes| Traffic { packets, bytes };
        Snapshot {
            stats: Stats {
                interfaces: vec![
                    IfaceStats {
                        iface: "eth0".into(),
                        role: Some("external"),
                        verdicts: vec![("drop", t(3, 180)), ("pass", t(10, 1500))],
                    },
                    IfaceStats {
                        iface: "(unregistered)".into(),
                        role: None,
                        verdicts: vec![("pass", t(0, 0))],
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
                    }],
                }),
                flow_events_rate_limited: 5,
                flow_events_lost: 0,
            },
            services: vec![ServiceReport {
                load_balancer: "lb".into(),
                rule: "http".into(),
                frontends: vec!["192.0.2.10:80/tcp".into()],
                packets: 20,
                bytes: 2000,
                backends: vec![
                    BackendReport {
                        address: "198.51.100.11".parse::<IpAddr>().unwrap(),
                        healthy: true,
                        packets: 12,
                        bytes: 1200,
                    },
                    BackendReport {
                        address: "2001:db8::11".parse::<IpAddr>().unwrap(),
                        healthy: false,
                        packets: 8,
                        bytes: 800,
                    },
                ],
            }],
            generation: 4,
            applied_at: Some(1_700_000_000.25),
            flows: 6,
            nat: Vec::new(),
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
            }),
        }
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("line\nbreak"), r"line\nbreak");
        assert_eq!(escape_label_value("plain-name_1.2"), "plain-name_1.2");
        assert_eq!(escape_help("a \\ b\nc \"quoted\""), "a \\\\ b\\nc \"quoted\"");
        let text = snapshot().render();
        assert!(
            text.contains(
                r#"xdpgate_rule_flows_total{nsg="web \"edge\"",rule="allow\\web\nnew",direction="inbound",layer="subnet",priority="100"} 7"#
            ),
            "{text}"
        );
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = snapshot().render();
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
                "xdpgate_interface_packets_total",
                "xdpgate_interface_bytes_total",
                "xdpgate_drops_total",
                "xdpgate_rule_flows_total",
                "xdpgate_frontend_packets_total",
                "xdpgate_frontend_bytes_total",
                "xdpgate_backend_packets_total",
                "xdpgate_backend_bytes_total",
                "xdpgate_backend_healthy",
                "xdpgate_flows",
                "xdpgate_policy_generation",
                "xdpgate_policy_applied_timestamp_seconds",
                "xdpgate_flow_events_dropped_total",
                "xdpgate_nat_ports_in_use",
                "xdpgate_nat_allocation_failures_total",
                "xdpgate_config_last_reload_successful",
                "xdpgate_config_last_reload_success_timestamp_seconds",
            ]
        );
    }

    #[test]
    fn samples_carry_their_labels_and_values() {
        let text = snapshot().render();
        for want in [
            "# HELP xdpgate_drops_total Packets the dataplane dropped, by reason.",
            "# TYPE xdpgate_drops_total counter",
            r#"xdpgate_drops_total{reason="policy"} 3"#,
            r#"xdpgate_interface_packets_total{interface="eth0",role="external",verdict="pass"} 10"#,
            r#"xdpgate_interface_bytes_total{interface="eth0",role="external",verdict="drop"} 180"#,
            r#"xdpgate_interface_packets_total{interface="(unregistered)",role="",verdict="pass"} 0"#,
            r#"xdpgate_frontend_packets_total{load_balancer="lb",rule="http"} 20"#,
            r#"xdpgate_frontend_bytes_total{load_balancer="lb",rule="http"} 2000"#,
            r#"xdpgate_backend_packets_total{load_balancer="lb",rule="http",backend="198.51.100.11"} 12"#,
            r#"xdpgate_backend_bytes_total{load_balancer="lb",rule="http",backend="2001:db8::11"} 800"#,
            r#"xdpgate_backend_healthy{load_balancer="lb",rule="http",backend="198.51.100.11"} 1"#,
            r#"xdpgate_backend_healthy{load_balancer="lb",rule="http",backend="2001:db8::11"} 0"#,
            "# TYPE xdpgate_backend_healthy gauge",
            "xdpgate_flows 6",
            "# TYPE xdpgate_flows gauge",
            "xdpgate_policy_generation 4",
            "xdpgate_policy_applied_timestamp_seconds 1700000000.25",
            "# TYPE xdpgate_config_last_reload_successful gauge",
            "xdpgate_config_last_reload_successful 0",
            "xdpgate_config_last_reload_success_timestamp_seconds 1700000000.5",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn families_without_samples_keep_their_help_and_type() {
        let mut s = snapshot();
        s.services.clear();
        s.applied_at = None;
        s.agent = None;
        let text = s.render();
        assert!(text.contains("# TYPE xdpgate_backend_healthy gauge\n# HELP xdpgate_flows"));
        assert!(
            text.contains("# TYPE xdpgate_policy_applied_timestamp_seconds gauge\n# HELP"),
            "{text}"
        );
        assert!(
            text.ends_with("# TYPE xdpgate_config_last_reload_success_timestamp_seconds gauge\n"),
            "{text}"
        );
    }

    #[test]
    fn special_floats_use_the_exposition_spelling() {
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
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

    /// The server on a real socket: `/metrics` is served (here failing with 500, as the
    /// pin directory holds no dataplane), anything else is 404.
    #[test]
    fn server_answers_only_metrics() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let pins = PinDir::new("/nonexistent/xdpgate-metrics-test");
            let server = tokio::spawn(serve_on(listener, pins));
            let get = |req: &'static str| async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            let other = get("GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
            let post = get("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 404 "), "{post}");
            let garbage = get("hello\r\n\r\n").await;
            assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
            let metrics = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(metrics.starts_with("HTTP/1.1 500 "), "{metrics}");
            assert!(metrics.contains("no pinned map"), "{metrics}");
            server.abort();
        });
    }
}
