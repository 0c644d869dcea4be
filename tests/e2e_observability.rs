//! Observability end to end: Prometheus metrics scraped over real HTTP from `xdpgate run`,
//! `xdpgate flows` and `xdpgate status`, checked against traffic of known shape.
//!
//!   client 203.0.113.10 -- ext [gw: xdpgate, agent] int -- server 198.51.100.10
//!   frontend 192.0.2.10:8080 -> server :8080
//!
//! The agent applies the policy (generation 1) and serves metrics inside the gateway's
//! network namespace; the test scrapes it from a thread that entered that namespace.

mod common;

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{Netns, Pins, echo::EchoServer, unique, veth};
use serde_json::Value as Json;
use xdpgate_common::maps::{EMBRYO_ENTRIES, FLOW_ENTRIES};

const CLIENT: &str = "203.0.113.10";
const SERVER: &str = "198.51.100.10";
const FRONTEND: &str = "192.0.2.10";
const METRICS_PORT: u16 = 19477;

/// Allowed web connections, denied SSH attempts, pings (one echo flow), and connections
/// through the load balancer.
const N_WEB: usize = 5;
const M_SSH: usize = 3;
const K_PINGS: usize = 3;
const L_LB: usize = 4;
/// Bytes each web connection sends (and gets echoed back).
const WEB_BYTES: usize = 4096;

const POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-web, priority: 100, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [80]}
      - {name: allow-lb, priority: 110, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [8080]}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [22]}
      - {name: allow-ping, priority: 300, direction: inbound, access: allow, protocol: icmp, source: [Internet], destination: ["*"]}
load_balancers:
  - name: edge
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: servers, backends: [198.51.100.10]}
    rules:
      - {name: alt-web, frontend: vip, protocol: tcp, frontend_port: 8080, backend_port: 8080, backend_pool: servers}
"#;

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// client - gateway - server with xdpgate attached natively on both gateway interfaces.
struct Lab {
    // Drop order: the agent, the service, the pins (detach needs the gateway namespace),
    // then the namespaces.
    agent: Option<Child>,
    _echo: EchoServer,
    pins: Pins,
    client: Netns,
    gw: Netns,
    server: Netns,
    gw_ext: String,
    gw_int: String,
    policy: PathBuf,
}

impl Lab {
    fn new() -> Self {
        Self::with_policy(POLICY)
    }

    fn with_policy(policy_yaml: &str) -> Self {
        let client = Netns::new("xgoc");
        let gw = Netns::new("xgog");
        let server = Netns::new("xgos");
        let (client_if, gw_ext) = veth(&client, &format!("{CLIENT}/24"), &gw, "203.0.113.1/24");
        let (gw_int, server_if) = veth(&gw, "198.51.100.1/24", &server, &format!("{SERVER}/24"));
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        for (ns, ifname, via) in
            [(&client, &client_if, "203.0.113.1"), (&server, &server_if, "198.51.100.1")]
        {
            ns.exec("ip", &["route", "add", "default", "via", via]);
            // Frames XDP redirects into a veth need NAPI (GRO) on the receiving peer, and
            // senders must complete their checksums (no offload note survives a redirect).
            ns.exec("ethtool", &["-K", ifname, "gro", "on", "tx", "off"]);
        }

        let pins = Pins::in_netns(&gw);
        for (iface, role) in [(&gw_ext, "external"), (&gw_int, "internal")] {
            pins.xdpgate(&["attach", "--hook", "xdp", "--iface", iface, "--role", role]);
        }
        let echo =
            EchoServer::start(&server, [80, 22, 8080].iter().map(|p| sock(SERVER, *p)).collect());
        let policy = std::env::temp_dir().join(format!("{}.yaml", unique("obspol")));
        std::fs::write(&policy, policy_yaml).unwrap();
        Self { agent: None, _echo: echo, pins, client, gw, server, gw_ext, gw_int, policy }
    }

    fn log_path(&self) -> PathBuf {
        self.policy.with_extension("log")
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `xdpgate run` in the gateway namespace, serving metrics on `metrics_addr`.
    fn start_agent(&mut self, metrics_addr: &str) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = self
            .pins
            .command()
            .args(["run", "--policy"])
            .arg(&self.policy)
            .args(["--metrics-addr", metrics_addr])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn xdpgate run");
        self.agent = Some(child);
    }

    /// Stops the agent with SIGTERM; it must exit cleanly.
    fn stop_agent(&mut self) {
        let mut child = self.agent.take().expect("agent running");
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}; log:\n{}", self.agent_log());
    }

    fn wait_for(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; agent log:\n{}",
                self.agent_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// An HTTP GET to the agent's metrics port, from inside the gateway namespace.
    fn http_get(&self, path: &str) -> io::Result<HttpResponse> {
        let path = path.to_string();
        self.gw.run(move || http_get(sock("127.0.0.1", METRICS_PORT), &path))
    }

    fn json(&self, args: &[&str]) -> Json {
        let out = self.pins.xdpgate(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("xdpgate {args:?}: {e}:\n{out}"))
    }

    fn flows(&self, filter: &[&str]) -> Vec<Json> {
        let mut args = vec!["flows", "--json"];
        args.extend_from_slice(filter);
        self.json(&args).as_array().expect("flows array").clone()
    }

    /// A connection from the client that must work: sends `len` bytes and reads the echo.
    fn tcp_exchange(&self, addr: SocketAddr, len: usize) {
        self.client.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let data = vec![7u8; len];
            s.write_all(&data).unwrap();
            let mut back = vec![0u8; len];
            s.read_exact(&mut back).unwrap_or_else(|e| panic!("echo from {addr}: {e}"));
            s.shutdown(Shutdown::Write).unwrap();
            // Wait for the server's FIN: the connection closes in order.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
    }

    /// Waits until every connection's last packet has crossed the gateway: the client's ACK
    /// of the server's FIN, which ends the server's LAST-ACK state.
    fn wait_last_acks(&self) {
        self.wait_for("the connections' last ACKs", Duration::from_secs(10), || {
            self.server.exec("ss", &["-Htn", "state", "last-ack"]).stdout.is_empty()
        });
    }

    /// Connection attempts that must time out (SYNs dropped), tried in parallel.
    fn tcp_blocked(&self, addr: SocketAddr, n: usize) {
        let tries: Vec<_> = (0..n)
            .map(|_| {
                self.client
                    .spawn(move || TcpStream::connect_timeout(&addr, Duration::from_millis(1500)))
            })
            .collect();
        for t in tries {
            match t.join().unwrap() {
                Ok(_) => panic!("connected to {addr}: the policy should drop the SYN"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::TimedOut, "connect to {addr}: {e}"),
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = std::fs::remove_file(&self.policy);
        let _ = std::fs::remove_file(self.log_path());
    }
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 GET; the server closes the connection after its answer.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no head end: {raw:?}")))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line: {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().into(), v.trim().into()))
        .collect();
    let resp = HttpResponse { status, headers, body: body.to_string() };
    if let Some(len) = resp.header("Content-Length") {
        assert_eq!(len.parse::<usize>().unwrap(), resp.body.len(), "Content-Length");
    }
    Ok(resp)
}

fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("exposition parses")
}

/// The value of the sample of `name` whose labels include `labels`; panics unless exactly
/// one sample matches.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected value {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {} samples match", found.len());
    found[0]
}

fn is_counter(scrape: &prometheus_parse::Scrape, name: &str) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| s.metric == name && matches!(s.value, prometheus_parse::Value::Counter(_)))
}

/// What identifies each flow of a list (its first packet's 5-tuple), in list order.
fn ids(flows: &[Json]) -> Vec<String> {
    flows
        .iter()
        .map(|f| {
            format!(
                "{} {}:{} {}:{}",
                f["protocol"], f["src"], f["src_port"], f["dst"], f["dst_port"]
            )
        })
        .collect()
}

const FAMILIES: [&str; 19] = [
    "xdpgate_build_info",
    "xdpgate_interface_packets_total",
    "xdpgate_interface_bytes_total",
    "xdpgate_drops_total",
    "xdpgate_rule_flows_total",
    "xdpgate_frontend_packets_total",
    "xdpgate_frontend_bytes_total",
    "xdpgate_backend_packets_total",
    "xdpgate_backend_bytes_total",
    "xdpgate_load_balancer_backends",
    "xdpgate_flows",
    "xdpgate_flow_table_capacity",
    "xdpgate_flow_table_entries",
    "xdpgate_embryonic_flows_total",
    "xdpgate_embryonic_confirmations_refused_total",
    "xdpgate_flows_rebuilt_total",
    "xdpgate_flows_picked_up_total",
    "xdpgate_policy_generation",
    "xdpgate_policy_applied_timestamp_seconds",
];

#[test]
fn metrics_flows_and_status_match_known_traffic() {
    let started = Instant::now();
    let mut lab = Lab::new();
    lab.start_agent(&format!("127.0.0.1:{METRICS_PORT}"));
    // The endpoint answers once the agent listens; the policy is in once generation is 1.
    lab.wait_for(
        "the agent to apply the policy and serve metrics",
        Duration::from_secs(10),
        || {
            lab.http_get("/metrics").is_ok_and(|r| {
                r.status == 200 && r.body.lines().any(|l| l == "xdpgate_policy_generation 1")
            })
        },
    );
    let setup = started.elapsed();

    // Known traffic.
    for _ in 0..N_WEB {
        lab.tcp_exchange(sock(SERVER, 80), WEB_BYTES);
    }
    lab.tcp_blocked(sock(SERVER, 22), M_SSH);
    let ping =
        lab.client.try_exec("ping", &["-c", &K_PINGS.to_string(), "-i", "0.2", "-W", "2", SERVER]);
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && text.contains(&format!("{K_PINGS} received")),
        "ping:\n{text}"
    );
    for _ in 0..L_LB {
        lab.tcp_exchange(sock(FRONTEND, 8080), 1000);
    }
    lab.wait_last_acks();
    let traffic = started.elapsed() - setup;

    // (a) The metrics endpoint, over HTTP, parsed by a Prometheus text-format parser.
    let resp = lab.http_get("/metrics").expect("scrape");
    assert_eq!(resp.status, 200, "{}", resp.body);
    let ctype = resp.header("Content-Type").unwrap_or_default();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "Content-Type {ctype:?}");
    let scrape = parse_metrics(&resp.body);
    for family in FAMILIES {
        assert!(scrape.docs.contains_key(family), "no # HELP for {family}:\n{}", resp.body);
        assert!(resp.body.contains(&format!("# TYPE {family} ")), "no # TYPE for {family}");
        if family.ends_with("_total") {
            assert!(is_counter(&scrape, family), "{family} is not typed counter");
        }
    }
    let rule =
        |name: &str| sample(&scrape, "xdpgate_rule_flows_total", &[("nsg", "web"), ("rule", name)]);
    assert_eq!(rule("allow-web"), N_WEB as f64, "allow-web flows");
    assert_eq!(rule("allow-lb"), L_LB as f64, "allow-lb flows");
    assert_eq!(rule("allow-ping"), 1.0, "{K_PINGS} pings are one echo flow");
    assert!(rule("deny-ssh") >= M_SSH as f64, "deny-ssh: {}", rule("deny-ssh"));
    let allow_web_labels = &[
        ("rule", "allow-web"),
        ("direction", "inbound"),
        ("layer", "subnet"),
        ("priority", "100"),
    ];
    assert_eq!(sample(&scrape, "xdpgate_rule_flows_total", allow_web_labels), N_WEB as f64);
    let policy_drops = sample(&scrape, "xdpgate_drops_total", &[("reason", "policy")]);
    assert!(policy_drops >= M_SSH as f64, "policy drops {policy_drops}");
    for (iface, role) in [(&lab.gw_ext, "external"), (&lab.gw_int, "internal")] {
        let labels = [("interface", iface.as_str()), ("role", role), ("verdict", "pass")];
        let packets = sample(&scrape, "xdpgate_interface_packets_total", &labels);
        let bytes = sample(&scrape, "xdpgate_interface_bytes_total", &labels);
        assert!(packets > 0.0 && bytes > packets, "{iface}: {packets} packets, {bytes} bytes");
    }
    // At least the SYN and one data segment of each connection reach the frontend.
    let lb = [("load_balancer", "edge"), ("rule", "alt-web")];
    let fe = sample(&scrape, "xdpgate_frontend_packets_total", &lb);
    assert!(fe >= 2.0 * L_LB as f64, "frontend packets {fe}");
    assert!(sample(&scrape, "xdpgate_frontend_bytes_total", &lb) >= (L_LB * 1000) as f64);
    let be = [("backend", SERVER)];
    assert_eq!(sample(&scrape, "xdpgate_backend_packets_total", &be), fe, "one backend takes all");
    // The rule has no probe: its backend's health is unknown, not 1.
    let unprobed = [("load_balancer", "edge"), ("rule", "alt-web"), ("state", "unprobed")];
    assert_eq!(sample(&scrape, "xdpgate_load_balancer_backends", &unprobed), 1.0);
    assert_eq!(sample(&scrape, "xdpgate_policy_generation", &[]), 1.0);
    let flows_gauge = sample(&scrape, "xdpgate_flows", &[]);
    assert!(flows_gauge >= (2 * (N_WEB + L_LB + 1)) as f64, "flow entries {flows_gauge}");
    let table = |name, t| sample(&scrape, name, &[("table", t)]);
    assert_eq!(table("xdpgate_flow_table_entries", "flows"), flows_gauge);
    // The default sizes, in flows (two entries each).
    assert_eq!(
        (
            table("xdpgate_flow_table_capacity", "flows"),
            table("xdpgate_flow_table_capacity", "embryonic")
        ),
        (f64::from(FLOW_ENTRIES / 2), f64::from(EMBRYO_ENTRIES / 2))
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let applied = sample(&scrape, "xdpgate_policy_applied_timestamp_seconds", &[]);
    assert!((now - 120.0..=now + 1.0).contains(&applied), "applied at {applied}, now {now}");

    // Nothing but /metrics is served.
    assert_eq!(lab.http_get("/").unwrap().status, 404);
    assert_eq!(lab.http_get("/metrics/x").unwrap().status, 404);
    // The one-shot command prints the same families and values.
    let once = parse_metrics(&lab.pins.xdpgate(&["metrics"]));
    assert_eq!(sample(&once, "xdpgate_rule_flows_total", &[("rule", "allow-web")]), N_WEB as f64);
    assert_eq!(sample(&once, "xdpgate_policy_generation", &[]), 1.0);

    // (b) xdpgate flows.
    let web = lab.flows(&["--rule", "allow-web"]);
    assert_eq!(web.len(), N_WEB, "{web:#?}");
    let mut client_ports = Vec::new();
    for f in &web {
        assert_eq!(
            (&f["protocol"], &f["src"], &f["dst"], &f["dst_port"], &f["direction"], &f["nsg"]),
            (
                &"tcp".into(),
                &CLIENT.into(),
                &SERVER.into(),
                &80.into(),
                &"inbound".into(),
                &"web".into()
            ),
            "{f:#}"
        );
        assert_eq!(f["layer"], "subnet");
        assert_eq!(f["generation"], 1);
        for dir in ["forward", "reply"] {
            assert!(f[dir]["packets"].as_u64().unwrap() > 0, "no {dir} packets: {f:#}");
            assert!(f[dir]["bytes"].as_u64().unwrap() > WEB_BYTES as u64, "{dir} bytes: {f:#}");
        }
        assert!(f["nat"].is_null() && f["load_balancer"].is_null(), "{f:#}");
        assert!(!f["incomplete"].as_bool().unwrap() && !f["expired"].as_bool().unwrap());
        client_ports.push(f["src_port"].as_u64().unwrap());
    }
    client_ports.sort();
    client_ports.dedup();
    assert_eq!(client_ports.len(), N_WEB, "one flow per connection");
    assert_eq!(ids(&lab.flows(&["--port", "80"])), ids(&web), "--port 80 selects the web flows");
    assert_eq!(lab.flows(&["--rule", "web/allow-web", "--addr", SERVER]).len(), N_WEB);
    // `--port` matches either side: the web flow from that client port, and whatever other
    // flow uses the same number (the kernel gives connections to different destinations the
    // same ephemeral port at times: this asked for exactly one flow, and failed then).
    let one_port = client_ports[0];
    let on_port = |f: &&Json| f["src_port"] == one_port || f["dst_port"] == one_port;
    let either: Vec<Json> = lab.flows(&[]).iter().filter(on_port).cloned().collect();
    let mut either = ids(&either);
    let matched = lab.flows(&["--port", &one_port.to_string()]);
    assert!(matched.iter().any(|f| f["src_port"] == one_port && f["dst_port"] == 80));
    let mut matched = ids(&matched);
    either.sort();
    matched.sort();
    assert_eq!(matched, either, "--port matches the client's port too");
    assert!(lab.flows(&["--rule", "deny-ssh"]).is_empty(), "denied attempts create no flows");
    // A rule no kept generation has (a typo) is an error, for a listing and a deletion: an
    // empty answer would read as "no such flows" (seen failing: the listing succeeded with
    // no flow).
    for args in
        [&["flows", "--rule", "allow-wbe"][..], &["flows", "delete", "--rule", "web/allow-wbe"]]
    {
        let out = lab.pins.try_xdpgate(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("no rule of that name"), "{args:?}: {err}");
    }
    assert_eq!(lab.flows(&["--rule", "web/allow-web"]).len(), N_WEB, "the typo deleted flows");
    assert!(lab.flows(&["--port", "22"]).is_empty());

    let lb_flows = lab.flows(&["--port", "8080"]);
    assert_eq!(lb_flows.len(), L_LB, "{lb_flows:#?}");
    for f in &lb_flows {
        assert_eq!(
            (&f["dst"], &f["dst_port"], &f["rule"]),
            (&FRONTEND.into(), &8080.into(), &"allow-lb".into())
        );
        assert_eq!(f["nat"], serde_json::json!({"kind": "dnat", "address": SERVER, "port": 8080}));
        assert_eq!(
            f["load_balancer"],
            serde_json::json!({"name": "edge", "rule": "alt-web", "backend": SERVER})
        );
        assert!(
            f["forward"]["packets"].as_u64().unwrap() > 0
                && f["reply"]["packets"].as_u64().unwrap() > 0
        );
    }
    assert_eq!(
        ids(&lab.flows(&["--addr", SERVER, "--rule", "allow-lb"])),
        ids(&lb_flows),
        "the backend is an end"
    );

    let ping_flows = lab.flows(&["--rule", "allow-ping"]);
    assert_eq!(ping_flows.len(), 1, "{ping_flows:#?}");
    let p = &ping_flows[0];
    assert_eq!(
        (&p["protocol"], &p["src"], &p["dst"]),
        (&"icmp".into(), &CLIENT.into(), &SERVER.into())
    );
    assert!(p["icmp_id"].is_u64() && p["src_port"].is_null());
    assert_eq!(
        (p["forward"]["packets"].as_u64(), p["reply"]["packets"].as_u64()),
        (Some(K_PINGS as u64), Some(K_PINGS as u64))
    );

    let all = lab.flows(&["--addr", CLIENT, "--top", "0"]);
    assert_eq!(all.len(), N_WEB + L_LB + 1, "{all:#?}");
    let total =
        |f: &Json| f["forward"]["bytes"].as_u64().unwrap() + f["reply"]["bytes"].as_u64().unwrap();
    assert!(all.windows(2).all(|w| total(&w[0]) >= total(&w[1])), "not sorted by bytes");
    let top2 = lab.flows(&["--addr", CLIENT, "--top", "2"]);
    assert_eq!(ids(&top2), ids(&all[..2]));
    // --json lists every flow without --top (the table's default of 20 is for people).
    assert!(lab.flows(&["--addr", CLIENT]).len() == all.len(), "--json without --top");
    let table = lab.pins.xdpgate(&["flows", "--rule", "allow-web"]);
    assert_eq!(table.lines().filter(|l| l.contains("web/allow-web")).count(), N_WEB, "{table}");

    // (c) xdpgate status.
    let status = lab.json(&["status", "--json"]);
    assert_eq!(status["pin_dir"], lab.pins.dir.path().to_str().unwrap());
    assert_eq!(status["policy"]["generation"], 1, "{status:#}");
    // The record of the running generation.
    assert!(
        status["policy"]["applied_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("generations/1.json"))
    );
    assert!(status["policy"]["applied_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(status["flow_entries"].as_u64().unwrap() >= (2 * (N_WEB + L_LB + 1)) as u64);
    let ifaces = status["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2, "{status:#}");
    for (name, role) in [(&lab.gw_ext, "external"), (&lab.gw_int, "internal")] {
        let i = ifaces
            .iter()
            .find(|i| i["interface"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} missing: {status:#}"));
        assert_eq!(
            (&i["role"], &i["xdp_mode"], &i["program"]),
            (&role.into(), &"native".into(), &"xdpgate".into()),
            "{i:#}"
        );
    }
    let text = lab.pins.xdpgate(&["status"]);
    assert!(text.contains("generation 1") && text.contains(lab.gw_ext.as_str()), "{text}");
    let checks = started.elapsed() - setup - traffic;

    // `--metrics-addr off`: a restarted agent (generation 2) serves nothing.
    lab.stop_agent();
    lab.start_agent("off");
    lab.wait_for("the restarted agent to apply generation 2", Duration::from_secs(10), || {
        lab.json(&["status", "--json"])["policy"]["generation"] == 2
    });
    let err = lab.http_get("/metrics").err().expect("no metrics server with --metrics-addr off");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    lab.stop_agent();
    eprintln!(
        "metrics_flows_and_status_match_known_traffic: setup {setup:?}, traffic {traffic:?}, \
         checks {checks:?}, total {:?}",
        started.elapsed()
    );
}

/// One backend behind two probed load-balancing rules, a third whose probe fails (nothing
/// listens on its port) and an inbound NAT rule (no probe).
const SHARED_BACKEND_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-lb, priority: 110, direction: inbound, access: allow, protocol: tcp, source: [Internet], destination: ["*"], destination_ports: [8080, 80]}
load_balancers:
  - name: edge
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: servers, backends: [198.51.100.10]}
    probes:
      - {name: up, protocol: tcp, port: 8080, interval: 1000, timeout: 1000, threshold: 2}
      - {name: closed, protocol: tcp, port: 9, interval: 200, timeout: 150, threshold: 2}
    rules:
      - {name: alt-web, frontend: vip, protocol: tcp, frontend_port: 8080, backend_port: 8080, backend_pool: servers, probe: up}
      - {name: alt-web2, frontend: vip, protocol: tcp, frontend_port: 8081, backend_port: 8080, backend_pool: servers, probe: up}
      - {name: shut, frontend: vip, protocol: tcp, frontend_port: 8082, backend_port: 9, backend_pool: servers, probe: closed}
    inbound_nat_rules:
      - {name: to-server, frontend: vip, protocol: tcp, frontend_port: 2201, backend: 198.51.100.10, backend_port: 80}
"#;

/// The sum of every sample of `name` whose labels include `labels`.
fn sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{name}: unexpected value {other:?}"),
        })
        .sum()
}

/// A backend that serves three rules is counted once: `sum by (backend)` of its packets is
/// what the frontends sent it (it was three times that). Its health is reported only under
/// the rules that probe it; the inbound NAT rule reports it unprobed. Probe results and
/// latency, the health percentage and build_info are served.
#[test]
fn a_backend_of_several_rules_is_counted_once_and_unprobed_rules_report_no_health() {
    let mut lab = Lab::with_policy(SHARED_BACKEND_POLICY);
    lab.start_agent(&format!("127.0.0.1:{METRICS_PORT}"));
    lab.wait_for("the agent to apply the policy", Duration::from_secs(10), || {
        lab.http_get("/metrics").is_ok_and(|r| {
            r.status == 200 && r.body.lines().any(|l| l == "xdpgate_policy_generation 1")
        })
    });
    for _ in 0..L_LB {
        lab.tcp_exchange(sock(FRONTEND, 8080), 1000);
    }
    lab.wait_last_acks();
    let scrape = parse_metrics(&lab.http_get("/metrics").unwrap().body);
    let fe = sum(&scrape, "xdpgate_frontend_packets_total", &[]);
    assert_eq!(sum(&scrape, "xdpgate_backend_packets_total", &[("backend", SERVER)]), fe);
    assert_eq!(
        sum(&scrape, "xdpgate_backend_bytes_total", &[("backend", SERVER)]),
        sum(&scrape, "xdpgate_frontend_bytes_total", &[])
    );
    // Health: under the probed rules only, once the first probe is in, and by each rule's
    // own probe: the backend fails `shut`'s and stays healthy in the others (seen failing:
    // their series followed the backend's one flag, 0 once any probe failed).
    lab.wait_for(
        "a successful probe, and the closed port's probe failed",
        Duration::from_secs(10),
        || {
            let scrape = parse_metrics(&lab.http_get("/metrics").unwrap().body);
            sum(&scrape, "xdpgate_probes_total", &[("result", "success")]) >= 1.0
                && sum(&scrape, "xdpgate_backend_healthy", &[("rule", "shut")]) == 0.0
                && sum(
                    &scrape,
                    "xdpgate_load_balancer_backends",
                    &[("rule", "shut"), ("state", "unhealthy")],
                ) == 1.0
        },
    );
    let scrape = parse_metrics(&lab.http_get("/metrics").unwrap().body);
    let labels = [("load_balancer", "edge"), ("rule", "shut")];
    assert_eq!(sample(&scrape, "xdpgate_load_balancer_health_percent", &labels), 0.0);
    for rule in ["alt-web", "alt-web2"] {
        let labels = [("rule", rule), ("backend", SERVER)];
        assert_eq!(sample(&scrape, "xdpgate_backend_healthy", &labels), 1.0, "{rule}");
        let labels = [("rule", rule), ("state", "healthy")];
        assert_eq!(sample(&scrape, "xdpgate_load_balancer_backends", &labels), 1.0);
        let labels = [("load_balancer", "edge"), ("rule", rule)];
        assert_eq!(sample(&scrape, "xdpgate_load_balancer_health_percent", &labels), 100.0);
    }
    assert_eq!(sum(&scrape, "xdpgate_backend_healthy", &[("rule", "to-server")]), 0.0);
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "xdpgate_backend_healthy"
                && s.labels.get("rule") == Some("to-server")),
        "an unprobed rule reports no health"
    );
    let unprobed = [("rule", "to-server"), ("state", "unprobed")];
    assert_eq!(sample(&scrape, "xdpgate_load_balancer_backends", &unprobed), 1.0);
    assert!(!scrape.samples.iter().any(|s| s.metric == "xdpgate_load_balancer_health_percent"
        && s.labels.get("rule") == Some("to-server")));
    // One probe target (backend, load balancer, probe), shared by both rules.
    let probe = [("backend", SERVER), ("load_balancer", "edge"), ("probe", "up")];
    let ok = sample(
        &scrape,
        "xdpgate_probes_total",
        &[probe[0], probe[1], probe[2], ("result", "success")],
    );
    assert!(ok >= 1.0, "successful probes {ok}");
    assert_eq!(
        sample(
            &scrape,
            "xdpgate_probes_total",
            &[probe[0], probe[1], probe[2], ("result", "failure")]
        ),
        0.0
    );
    let took = sample(&scrape, "xdpgate_probe_duration_seconds_total", &probe);
    // Its timeout is a second: a loaded machine's slow connect is no failure here.
    assert!(took > 0.0 && took < ok, "{took} s for {ok} probes (timeout 1 s)");
    let last = sample(&scrape, "xdpgate_probe_last_duration_seconds", &probe);
    assert!(last > 0.0 && last < 1.0, "last probe {last} s");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(sample(&scrape, "xdpgate_build_info", &[("version", version)]), 1.0);
    lab.stop_agent();
}

/// NAT gateway metrics for known traffic: three connections out through the gateway are
/// three translations created and active, on one public address of the gateway's range, and
/// at least their SYNs and SYN-ACKs translated each way.
#[test]
fn nat_gateway_metrics_count_translations() {
    nat_gateway_metrics(common::gateway::Gateway::new());
}

/// The same at the tc hook.
#[test]
fn nat_gateway_metrics_count_translations_at_tc() {
    nat_gateway_metrics(common::gateway::Gateway::tc());
}

fn nat_gateway_metrics(lab: common::gateway::Gateway) {
    lab.take_redirects();
    lab.apply("policy.yaml", common::gateway::TRANSLATING_POLICY);
    let listener = lab.client.run(|| std::net::TcpListener::bind("203.0.113.10:9000").unwrap());
    thread::spawn(move || while listener.accept().is_ok() {});
    for _ in 0..3 {
        lab.server.run(|| {
            TcpStream::connect_timeout(&sock(CLIENT, 9000), Duration::from_secs(3))
                .expect("out through the NAT gateway");
        });
    }
    let scrape = parse_metrics(&lab.pins.xdpgate(&["metrics"]));
    let gw = [("gateway", "natgw")];
    assert_eq!(sample(&scrape, "xdpgate_nat_translations_created_total", &gw), 3.0);
    assert_eq!(sample(&scrape, "xdpgate_nat_translations", &gw), 3.0);
    assert_eq!(sample(&scrape, "xdpgate_nat_allocation_failures_total", &gw), 0.0);
    let address = [("gateway", "natgw"), ("address", "192.0.2.100")];
    assert_eq!(sample(&scrape, "xdpgate_nat_ports_in_use", &address), 3.0);
    // The default range: 1024-65535.
    assert_eq!(sample(&scrape, "xdpgate_nat_ports_per_address", &gw), 64_512.0);
    // Each connect returned once its SYN went out and its SYN-ACK came back, translated.
    for direction in ["outbound", "inbound"] {
        let labels = [("gateway", "natgw"), ("direction", direction)];
        let packets = sample(&scrape, "xdpgate_nat_packets_total", &labels);
        let bytes = sample(&scrape, "xdpgate_nat_bytes_total", &labels);
        assert!(packets >= 3.0, "{direction}: {packets} packets");
        // IPv4 and TCP headers at least (no link-layer header).
        assert!(bytes >= 40.0 * packets, "{direction}: {bytes} bytes in {packets} packets");
    }
    let unmatched = [("gateway", "natgw"), ("reason", "nat_unmatched")];
    assert_eq!(sample(&scrape, "xdpgate_nat_dropped_packets_total", &unmatched), 0.0);
}

/// A request head cut off before its end: the server must wait for more or give up.
const PARTIAL_HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: slow\r\n";

/// A slow client: connects, sends a partial request head and stalls.
fn slow_connection(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.write_all(PARTIAL_HEAD)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Keeps `n` slow connections to `addr` open until `stop` is set: every one the server
/// closes (or answers, which ends it too) is opened again at once. Adds 1 to `ready` once
/// all `n` are open. Returns how many connections it opened in all, and in how many passes
/// over them.
fn slowloris(addr: SocketAddr, n: usize, ready: &AtomicUsize, stop: &AtomicBool) -> (usize, usize) {
    let mut conns: Vec<Option<TcpStream>> = (0..n)
        .map(|_| {
            loop {
                match slow_connection(addr) {
                    Ok(s) => break Some(s),
                    Err(_) if !stop.load(Ordering::Relaxed) => {}
                    Err(_) => break None,
                }
            }
        })
        .collect();
    ready.fetch_add(1, Ordering::SeqCst);
    let (mut opened, mut passes) = (n, 0);
    while !stop.load(Ordering::Relaxed) {
        passes += 1;
        for c in conns.iter_mut() {
            let open = c.as_mut().is_some_and(|s| {
                matches!(s.read(&mut [0u8; 256]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            });
            if !open {
                *c = slow_connection(addr).ok();
                opened += 1;
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    (opened, passes)
}

/// 1,000 clients that each send part of a request and stall, and reconnect whenever the
/// server drops them, must not starve scrapes: every scrape made meanwhile is answered,
/// promptly and in full. A slow client alone is dropped after the header timeout.
#[test]
fn slow_connections_do_not_starve_scrapes() {
    const SLOW: usize = 1000;
    const UNDER_ATTACK: Duration = Duration::from_secs(6);
    let mut lab = Lab::new();
    lab.start_agent(&format!("127.0.0.1:{METRICS_PORT}"));
    lab.wait_for(
        "the agent to apply the policy and serve metrics",
        Duration::from_secs(10),
        || {
            lab.http_get("/metrics").is_ok_and(|r| {
                r.status == 200 && r.body.lines().any(|l| l == "xdpgate_policy_generation 1")
            })
        },
    );
    let addr = sock("127.0.0.1", METRICS_PORT);

    // Ten attackers, so that one waiting out a dropped SYN holds back only its own share.
    const ATTACKERS: usize = 10;
    let (ready, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let (ready, stop) = (ready.clone(), stop.clone());
            lab.gw.spawn(move || slowloris(addr, SLOW / ATTACKERS, &ready, &stop))
        })
        .collect();
    lab.wait_for("every slow connection to be open", Duration::from_secs(60), || {
        ready.load(Ordering::SeqCst) == ATTACKERS
    });
    let start = Instant::now();
    let (mut scrapes, mut slowest) = (0, Duration::ZERO);
    let mut failures = Vec::new();
    while start.elapsed() < UNDER_ATTACK {
        let t = Instant::now();
        match lab.http_get("/metrics") {
            Ok(r) if r.status == 200 => {
                let scrape = parse_metrics(&r.body);
                assert_eq!(sample(&scrape, "xdpgate_policy_generation", &[]), 1.0);
            }
            Ok(r) => failures.push(format!("status {}: {}", r.status, r.body)),
            Err(e) => failures.push(e.to_string()),
        }
        scrapes += 1;
        slowest = slowest.max(t.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (opened, passes) = attackers
        .into_iter()
        .map(|a| a.join().unwrap())
        .fold((0, 0), |(o, p), (ao, ap)| (o + ao, p + ap));
    eprintln!(
        "slow_connections_do_not_starve_scrapes: {SLOW} slow clients opened {opened} \
         connections ({passes} passes); {scrapes} scrapes, {} failed, slowest {slowest:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "{} of {scrapes} scrapes failed: {failures:?}", failures.len());
    assert!(slowest < Duration::from_secs(2), "slowest scrape {slowest:?}");

    // One slow client, alone: the server hangs up on it after its header timeout.
    let lone = lab.gw.run(move || {
        let mut s = slow_connection(addr).unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let start = Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        start.elapsed()
    });
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(6)).contains(&lone),
        "a stalled request head was dropped after {lone:?}"
    );

    lab.stop_agent();
}
